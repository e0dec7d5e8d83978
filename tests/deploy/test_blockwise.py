"""Block-by-block quantization from safetensors: same model as in memory, bounded memory, refusals."""

from __future__ import annotations

import doctest
import gc
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import omse
from omse.deploy import blockwise, checkpoint
from omse.deploy.blockwise import (
    find_blocks,
    load_blockwise,
    quantize_blockwise,
    run_blockwise,
)
from omse.errors import CheckpointError, ConfigError
from omse.nn.layers import QuantizedLayer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]
FAST = omse.QuantConfig.preset("fast")


@pytest.fixture(scope="module", autouse=True)
def _gc_frozen():
    """quantize_blockwise runs gc.collect() after every block; in the pytest process each call
    scans every object loaded so far (~0.2 s, half of this module's time). What exists before
    the module is frozen out of the collector for its duration (gc.freeze): the collections scan
    only what the tests make, and everything is collectable again afterwards (gc.unfreeze)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


class Block(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Net(nn.Module):
    """A stem, a stack of residual MLP blocks, a norm and a head."""

    def __init__(self, n=4, d=32):
        super().__init__()
        self.stem = nn.Linear(16, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class Attn(nn.Module):
    """A transformer-like block called as ``block(x, mask)``, returning a tuple (HF style)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, mask):
        q, k, v = self.qkv(self.ln(x)).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / 8 + mask[:, None, :], -1) @ v
        x = x + self.o(a)
        return (x + self.mlp(x),)


class TinyLM(nn.Module):
    def __init__(self, n=3, d=32, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(12, d) * 0.1)
        self.layers = nn.ModuleList(Attn(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids, mask):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)[0]
        return self.lm_head(self.norm(x))


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _calib(n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def _shards(model: nn.Module, folder: Path, per_shard: int = 4) -> Path:
    """``model``'s state dict as Hugging Face-style shards + ``model.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    items = list(model.state_dict().items())
    wm = {}
    groups = [items[i : i + per_shard] for i in range(0, len(items), per_shard)]
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: v.contiguous() for n, v in group}, str(folder / name))
        wm |= {n: name for n, _ in group}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return index


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The seeded Net as one safetensors file and as shards with an index."""
    d = tmp_path_factory.mktemp("weights")
    model = _net()
    save_file(model.state_dict(), str(d / "model.safetensors"))
    return model, d / "model.safetensors", _shards(model, d / "shards")


def _reference(model: Net, calib: list, config) -> nn.Module:
    """The block-by-block semantics written with the public omse.quantize alone: each unit
    quantized on the outputs of the quantized units before it."""

    class Wrap(nn.Module):
        def __init__(self, *mods):
            super().__init__()
            self.mods = nn.ModuleList(mods)
            self.eval()

        def forward(self, x):
            for m in self.mods:
                x = m(x)
            return x

    q = Net(len(model.layers)).eval()
    stem = omse.quantize(Wrap(model.stem), calib, config)
    q.stem = stem.mods[0]
    xs = [q.stem(x) for x in calib]
    for i, blk in enumerate(model.layers):
        qb = omse.quantize(Wrap(blk), xs, config).mods[0]
        q.layers[i] = qb
        xs = [qb(x) for x in xs]
    head = omse.quantize(Wrap(model.norm, model.head), xs, config)
    q.norm, q.head = head.mods[0], head.mods[1]
    return q


def _layers(m: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: q for n, q in m.named_modules() if isinstance(q, QuantizedLayer)}


def _same_quantization(a: nn.Module, b: nn.Module) -> None:
    la, lb = _layers(a), _layers(b)
    assert sorted(la) == sorted(lb) and la
    for n in la:
        ta, tb = la[n].terms(), lb[n].terms()
        assert len(ta) == len(tb), n
        for (ca, sa, ma), (cb, sb, mb) in zip(ta, tb, strict=True):
            assert torch.equal(ca, cb) and torch.equal(sa, sb), n
            assert (ma is None and mb is None) or torch.equal(ma, mb), n
        for attr in ("act_scale", "out_scale"):
            va, vb = getattr(la[n], attr), getattr(lb[n], attr)
            assert (va is None and vb is None) or torch.equal(va, vb), (n, attr)
        assert torch.equal(la[n].layer.bias, lb[n].layer.bias), n


@pytest.mark.parametrize("config", [FAST, omse.QuantConfig()], ids=["fast", "default"])
def test_matches_in_memory_and_reference(files, tmp_path, config):
    """From one file, from shards and in memory: the same codes, scales, biases and outputs,
    bit for bit (the same float operations on the same values), equal to the reference built
    from omse.quantize unit by unit; the written folder reloads to the same outputs, whole or
    block by block."""
    model, single, index = files
    calib, x = _calib(), torch.randn(5, 16)
    mem = quantize_blockwise(model, calib, config)
    assert mem.blocks == [f"layers.{i}" for i in range(4)]
    assert mem.stem == ["stem"] and mem.head == ["head", "norm"]
    ref = _reference(model, calib, config)
    _same_quantization(mem.model, ref)
    assert torch.equal(mem.model(x), ref(x))
    one = quantize_blockwise(Net, calib, config, weights=single).model
    _same_quantization(one, mem.model)
    res = quantize_blockwise(Net, calib, config, weights=index, out=tmp_path / "q", compare=True)
    assert res.model is None and len(res.sqnr_db) == 5 and all(s > 10 for s in res.sqnr_db)
    back = load_blockwise(tmp_path / "q", Net)
    _same_quantization(back, mem.model)
    assert torch.equal(back(x), mem.model(x))
    assert torch.equal(run_blockwise(tmp_path / "q", Net, [x])[0], mem.model(x))
    blk = checkpoint.load(tmp_path / "q" / "block-00002.omse.safetensors", model=Block())
    assert torch.equal(blk(x[:, :0].new_ones(5, 32)), mem.model.layers[2](x.new_ones(5, 32)))
    assert sorted(_layers(back)) == sorted(q.name for q in _layers(back).values())


def test_weight_only_matches_whole_model_quantize(files):
    """A recipe whose result does not depend on calibration data across units (weight-only,
    nearest rounding, no residual budget): block by block == omse.quantize(whole model)."""
    model, single, _ = files
    cfg = omse.QuantConfig.preset("fast", act_bits=None)
    whole = omse.quantize(model, _calib(), cfg)
    bw = quantize_blockwise(Net, _calib(), cfg, weights=single).model
    _same_quantization(bw, whole)
    x = torch.randn(5, 16)
    assert torch.equal(bw(x), whole(x))


def test_transformer_blocks_with_extra_arguments(tmp_path):
    """Blocks called as ``block(x, mask)`` returning tuples, a stem with no quantizable layer
    (Embedding + a root parameter), dict batches; meta skeleton from a builder; overrides by
    full module names."""
    torch.manual_seed(0)
    lm = TinyLM().eval()
    save_file(lm.state_dict(), str(tmp_path / "lm.safetensors"))
    g = torch.Generator().manual_seed(2)
    calib = [
        {"ids": torch.randint(0, 50, (4, 12), generator=g), "mask": torch.zeros(4, 12)}
        for _ in range(3)
    ]
    cfg = omse.QuantConfig.preset("fast", overrides={"layers.1.mlp.*": {"weight_bits": 8}})
    mem = quantize_blockwise(lm, calib, cfg)
    disk = quantize_blockwise(TinyLM, calib, cfg, weights=tmp_path / "lm.safetensors")
    assert disk.stem == ["embed"] and disk.head == ["lm_head", "norm"]
    _same_quantization(disk.model, mem.model)
    assert torch.equal(disk.model(**calib[0]), mem.model(**calib[0]))
    ls = _layers(disk.model)
    assert ls["layers.1.mlp.0"].w_grid.bits == 8 and ls["layers.0.mlp.0"].w_grid.bits == 4
    assert "embed" not in ls and "lm_head" in ls


def test_find_blocks_and_patterns():
    net = Net()
    assert find_blocks(net) == [f"layers.{i}" for i in range(4)]
    assert find_blocks(net, "layers") == [f"layers.{i}" for i in range(4)]
    assert find_blocks(net, ["layers.*"]) == [f"layers.{i}" for i in range(4)]
    with pytest.raises(ConfigError, match="'blocks.\\*' matches no module"):
        find_blocks(net, ["blocks.*"])
    with pytest.raises(ConfigError, match="found no blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))


def test_refusals(files, tmp_path):
    model, single, index = files
    calib = _calib()
    for cfg, opt in (
        (omse.QuantConfig(equalize=True), "equalize"),
        (omse.QuantConfig(target="int8"), "int8"),
    ):
        with pytest.raises(ConfigError, match=opt):
            quantize_blockwise(Net, calib, cfg, weights=single)
    with pytest.raises(ConfigError, match="meta device"):
        quantize_blockwise(Net, calib, FAST)
    with pytest.raises(ConfigError, match="'nope.\\*' matches no module"):
        quantize_blockwise(Net, calib, FAST, weights=single, blocks=["nope.*"])
    with pytest.raises(CheckpointError, match="does not exist"):
        quantize_blockwise(Net, calib, FAST, weights=tmp_path / "missing.safetensors")
    # a missing shard, named with its index
    bad = tmp_path / "bad"
    bad_index = _shards(model, bad)
    gone = sorted(bad.glob("*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"shard .*{gone.name} .*index.json.* does not exist"):
        quantize_blockwise(Net, calib, FAST, weights=bad_index)
    # a tensor in no file
    sd = model.state_dict()
    del sd["layers.2.fc1.weight"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="'layers.2.fc1.weight' is in none"):
        quantize_blockwise(Net, calib, FAST, weights=tmp_path / "partial.safetensors")
    # wrong shapes: named with the file
    with pytest.raises(
        CheckpointError,
        match=r"'stem.weight' in .*model.safetensors has shape \[32, 16\], the model's 'stem.weight' is \[48, 16\]",
    ):
        quantize_blockwise(lambda: Net(d=48), calib, FAST, weights=single)
    # an index that maps a tensor to a shard without it
    doc = json.loads(index.read_text())
    doc["weight_map"]["extra.weight"] = doc["weight_map"]["stem.weight"]
    lying = index.parent / "lying.index.json"
    lying.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="'extra.weight'.*does not hold it"):
        quantize_blockwise(Net, calib, FAST, weights=lying)
    # pickles are refused, never loaded
    torch.save(model.state_dict(), tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        quantize_blockwise(Net, calib, FAST, weights=tmp_path / "model.bin")
    # the output must not exist (without force) nor hold the inputs
    (tmp_path / "exists").mkdir()
    with pytest.raises(omse.OmseError, match="already exists"):
        quantize_blockwise(Net, calib, FAST, weights=single, out=tmp_path / "exists")
    with pytest.raises(omse.OmseError, match="holds the weights"):
        quantize_blockwise(Net, calib, FAST, weights=index, out=index.parent, force=True)


def test_unchained_blocks_are_refused(files):
    class Scaled(Net):
        def forward(self, x):
            x = self.stem(x)
            for layer in self.layers:
                x = layer(x) * 0.5  # computed between blocks
            return self.head(self.norm(x))

    with pytest.raises(ConfigError, match="not called on the output of block 'layers.0'"):
        quantize_blockwise(Scaled, _calib(), FAST, weights=files[1])


def test_interrupted_run_leaves_no_output(files, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(blockwise, "_verify_chain", boom)
    with pytest.raises(KeyboardInterrupt):
        quantize_blockwise(Net, _calib(), FAST, weights=files[1], out=tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_docstring_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for fn in (quantize_blockwise, find_blocks, blockwise.empty_model):
        for test in doctest.DocTestFinder().find(fn, fn.__name__, globs={"torch": torch}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runner.run(test)
    assert runner.failures == 0 and runner.tries >= 8


ALLOC = "plain"  # glibc defaults ("tuned": omse.runtime.tune_allocator, as the CLI)
CHILD = r"""
import functools, gc, json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
import blockwise as bench
import omse
from omse.deploy.blockwise import quantize_blockwise
from omse.runtime import trim_heap, tune_allocator

torch.set_num_threads(1)
if sys.argv[6] == "tuned":
    tune_allocator()  # as the CLI does
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
weights, d, n, work = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
cfg = omse.QuantConfig.preset("fast", weight_method="minmax")
calib = bench.calibration(d)
# warm-up: the same path on a 2-block model, so torch's, omse's and safetensors' one-time
# initialisation is in the baseline
idx, _ = bench.write_model(work / "warm", 2, d)
quantize_blockwise(functools.partial(bench.build, d, 2), calib, cfg, weights=idx, out=work / "wq")
gc.collect()
# what the warm-up left alive is frozen out of the collector: the gc.collect() after each block
# scans only what that block made, not torch's and omse's modules again (~40% of the run)
gc.freeze()
trim_heap()
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
res = quantize_blockwise(functools.partial(bench.build, d, n), calib, cfg, weights=weights,
                         out=work / "q")
print("RESULT " + json.dumps({"growth": status("VmHWM") - base, "weights": res.weight_bytes,
                              "largest": res.largest_unit_bytes, "base": base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_is_bounded_by_one_block(tmp_path):
    """A model whose FP32 weights (353 MB, 176 blocks of 2 MB) are >= 4x the memory the
    process may add (88 MB above the resident memory of a process that imported torch and omse
    and quantized once) quantizes block by block within it: peak RSS (VmHWM) measured in a
    fresh process. Weight ranges are min-max here to keep the test fast; the exact MMSE solve
    adds a fixed transient (chunked, independent of the model): benchmarks/blockwise.py."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import blockwise as bench
    finally:
        sys.path.pop(0)
    d, n, cap = 256, 176, 88 * 2**20
    index, total = bench.write_model(tmp_path / "w", n, d, per_shard=16)
    assert total >= 4 * cap
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(ROOT / "benchmarks"),
            str(index),
            str(d),
            str(n),
            str(tmp_path),
            ALLOC,
        ],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-2000:]
    r = json.loads(line[0][7:])
    assert r["weights"] == total and r["largest"] < 2.1 * 2**20
    print(f"peak {r['growth'] / 2**20:.1f} MB above baseline, weights {total / 2**20:.0f} MB")
    assert r["growth"] <= cap, f"peak {r['growth'] / 2**20:.0f} MB above baseline > 88 MB"


def test_cli_blockwise(tmp_path, monkeypatch, capsys):
    """``omse quantize MODULE:FACTORY --weights INDEX --blockwise --out DIR``: the folder
    reloads to the model the API makes; misuse is refused in one line."""
    import inspect

    from omse.cli import main

    (tmp_path / "bwnets.py").write_text(  # the same Net, importable as bwnets:net
        "import torch\nfrom torch import nn\n\n"
        + inspect.getsource(Block)
        + inspect.getsource(Net)
        + "def net():\n    return Net()\n\n"
        + "def calib():\n"
        + "    g = torch.Generator().manual_seed(1)\n"
        + "    return [torch.randn(8, 16, generator=g) for _ in range(3)]\n"
    )
    monkeypatch.chdir(tmp_path)
    model = _net()
    index = _shards(model, tmp_path / "w")
    argv = ["quantize", "bwnets:net", "--weights", str(index), "--calib-loader", "bwnets:calib"]
    argv += ["--recipe", "fast", "--json", "r.json"]
    assert main([*argv, "--blockwise", "--out", "q"]) == 0
    out = capsys.readouterr().out
    assert "4 blocks, output SQNR vs FP32" in out and "wrote q" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["blocks"] == 4 and r["output_sqnr_db"] > 10 and r["eval_held_out"] is False
    import bwnets

    api = quantize_blockwise(model, bwnets.calib(), FAST).model
    x = torch.randn(5, 16)
    assert torch.equal(load_blockwise("q", bwnets.net)(x), api(x))
    assert main([*argv, "--blockwise", "--out", "q"]) == 2  # exists: needs --force
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", "bwnets:net", "--blockwise", "--out", "q2"]) == 2
    assert "--blockwise needs --weights" in capsys.readouterr().err
