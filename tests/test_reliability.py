"""Reliability of the quantize API: bad input gets a clear OmseError, the input model and data are
never modified, interrupted runs leave nothing behind, results are bit-reproducible (also across
processes) and the calibration statistics take memory independent of the number of batches."""

import copy
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from omse.config import QuantConfig
from omse.errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    OmseError,
    UnsupportedLayerError,
)
from omse.io import atomic_path
from omse.nn.layers import quantized_layers
from omse.transforms.pipeline import Calibration, quantize
from omse.zoo.models import get_model, load_user_model, load_weights

FAST = QuantConfig.preset("fast")  # plain MMSE, the defaults these tests were written for

torch.set_num_threads(1)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def batches(n=3, seed=1, shape=(4, 3, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


class Custom(nn.Module):
    """A user layer with a weight matrix that omse does not know (an einsum: ``x @ W`` would be
    rewritten into an nn.Linear, see tests/transforms/test_functional.py)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.einsum("bi,ij->bj", x, self.weight)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.custom = Custom()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.up(self.conv(x)).mean((2, 3))
        y, _ = self.lstm(self.custom(y)[:, None])
        return self.fc(y[:, 0])


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# -- bad input: unsupported layers ----------------------------------------------------------------


def test_unsupported_layers_left_in_float_and_listed():
    torch.manual_seed(0)
    model = Mixed().eval()
    cal = Calibration()
    with pytest.warns(UserWarning, match="float") as rec:
        q = quantize(model, batches(2), FAST, calibration=cal)
    msg = " ".join(str(w.message) for w in rec)
    for name in ("custom (Custom)", "lstm (LSTM)"):
        assert name in msg and name in cal.left_float
    assert sorted(quantized_layers(q)) == ["conv", "fc", "up"]  # ConvTranspose2d is quantized
    for name in ("custom", "lstm"):
        assert type(getattr(q, name)) is type(getattr(model, name))
        for (k, v), (_, v0) in zip(
            getattr(q, name).state_dict().items(), getattr(model, name).state_dict().items()
        ):
            assert torch.equal(v, v0), k


def test_unsupported_layers_strict_raises():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=r"custom \(Custom\).*lstm \(LSTM\)"):
        quantize(Mixed().eval(), batches(2), QuantConfig.preset("fast", strict=True))
    # skipping them explicitly satisfies strict
    q = quantize(
        Mixed().eval(), batches(2), QuantConfig.preset("fast", strict=True, skip=("custom", "lstm"))
    )
    assert sorted(quantized_layers(q)) == ["conv", "fc", "up"]


# -- bad input: weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("param", ["3.weight", "7.bias", "1.weight"])
def test_non_finite_weights_name_the_parameter(bad, param):
    model = small_net()
    with torch.no_grad():
        dict(model.named_parameters())[param].view(-1)[0] = bad
    with pytest.raises(ConfigError, match=f"parameter '{param}' contains NaN or Inf"):
        quantize(model, batches(1))


def test_non_finite_batchnorm_statistics_name_the_buffer():
    model = small_net()
    model[1].running_var[2] = float("nan")
    with pytest.raises(ConfigError, match="buffer '1.running_var' contains NaN or Inf"):
        quantize(model, batches(1))


# -- bad input: calibration data ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_batch_is_named(bad):
    data = batches(4)
    data[2][1, 0, 3, 3] = bad
    with pytest.raises(CalibrationError, match="calibration batch 2 contains NaN or Inf"):
        quantize(small_net(), data)


class Overflowing(nn.Module):
    """Finite inputs, but the hidden activation overflows to Inf for large inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        with torch.no_grad():
            self.a.weight.fill_(0.01)
            self.a.bias.zero_()

    def forward(self, x):
        return self.b(torch.exp(self.a(x) * 1e4))


def test_non_finite_activation_names_layer_and_batch():
    torch.manual_seed(0)
    data = [torch.zeros(2, 4), torch.zeros(2, 4), torch.full((2, 4), 5.0)]
    with pytest.raises(
        CalibrationError, match=r"layer 'b' got NaN or Inf inputs on calibration batch 2"
    ):
        quantize(Overflowing().eval(), data)


@pytest.mark.parametrize(
    "data",
    [[], (), iter([]), (b for b in []), {}.values()],
    ids=["list", "tuple", "iter", "generator", "dict_values"],
)
def test_empty_calibration_iterable(data):
    with pytest.raises(CalibrationError, match="calib_batches is empty"):
        quantize(small_net(), data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "is None"),
        (torch.randn(4, 3, 8, 8), "single tensor"),
        (5, "not iterable"),
        (["not a tensor"], "batch of type str"),
        ([[]], "batch of type list"),
    ],
)
def test_calibration_data_of_the_wrong_kind(data, match):
    with pytest.raises(CalibrationError, match=match):
        quantize(small_net(), data)


def test_batches_of_inconsistent_shape():
    data = batches(2) + [torch.randn(4, 3, 9, 9)]
    with pytest.raises(CalibrationError, match=r"calibration batch 2 has shape \(4, 3, 9, 9\)"):
        quantize(small_net(), data)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((4, 5, 8, 8), torch.float32), ((4, 8, 8), torch.float32), ((4, 3, 8, 8), torch.float64)],
)
def test_batches_the_model_cannot_take(shape, dtype):
    data = [torch.randn(*shape, dtype=dtype)]
    want = re.escape(f"model failed to run calibration batch 0 (shape {shape}, dtype {dtype})")
    with pytest.raises(CalibrationError, match=want):
        quantize(small_net(), data)
    # without BatchNorm folding, the failure surfaces in the calibration pass, equally named
    with pytest.raises(CalibrationError, match="calibration batch 0"):
        quantize(small_net(), data, fold_bn=False)


class PickyModel(nn.Module):
    """A model that validates its inputs itself (values in [0, 1])."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.min() < 0:
            raise ValueError("inputs must be in [0, 1]")
        return self.fc(x)


def test_later_batch_the_model_cannot_take_is_named():
    data = [torch.rand(2, 4), torch.rand(2, 4), -torch.rand(2, 4)]
    with pytest.raises(CalibrationError, match=r"batch 2 \(shape \(2, 4\).*must be in \[0, 1\]"):
        quantize(PickyModel().eval(), data)
    with pytest.raises(CalibrationError, match="batch 2 has shape"):
        quantize(PickyModel().eval(), [torch.rand(2, 4), torch.rand(2, 4), torch.rand(2, 5)])


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_batches_are_refused(dtype):
    data = [torch.zeros(4, 3, 8, 8, dtype=dtype)]
    with pytest.raises(CalibrationError, match=f"dtype {dtype}"):
        quantize(small_net(), data)


def test_training_mode_model_warns_and_quantizes_an_eval_copy():
    model = small_net().train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="training mode"):
        q = quantize(model, batches(2), FAST)
    assert model.training and not q.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics untouched


@pytest.mark.parametrize("bits", [0, 1, 9, 32])
def test_bits_outside_range(bits):
    with pytest.raises(ConfigError, match="weight_bits"):
        quantize(small_net(), batches(1), QuantConfig.preset("fast", weight_bits=bits))
    with pytest.raises(ConfigError, match="act_bits"):
        QuantConfig.preset("fast", act_bits=bits)
    with pytest.raises(ConfigError, match="weight_bits"):
        QuantConfig.preset("fast", overrides={"0": {"weight_bits": bits}})


@pytest.mark.parametrize("budget", [-0.5, 2.0001, 10, float("nan"), float("inf")])
def test_budget_outside_range(budget):
    with pytest.raises(ConfigError, match=r"extra_mac_budget.*\[0, 2\]"):
        QuantConfig.preset("fast", extra_mac_budget=budget)


def test_model_and_config_types_checked():
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        quantize("resnet", batches(1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="QuantConfig"):
        quantize(small_net(), batches(1), {"weight_bits": 4})  # type: ignore[arg-type]


def test_uninitialized_lazy_module():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ConfigError, match="'1.weight' is uninitialized"):
        quantize(model, [torch.randn(2, 4)])


def test_model_without_quantizable_layers():
    with pytest.raises(ConfigError, match="no Conv/ConvTranspose/Linear"):
        quantize(nn.Sequential(nn.ReLU()).eval(), batches(1))


# -- bad input: models and weights files ----------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(OmseError, match="unknown model 'resnet9000'.*efficientnet-lite0"):
        get_model("resnet9000")
    with pytest.raises(OmseError, match="unknown model 'resnet9000'.*module:factory"):
        load_user_model("resnet9000")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "omse_usermod.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))\n\n"
        "def broken():\n    raise RuntimeError('factory exploded')\n\n"
        "def not_a_module():\n    return 42\n"
    )
    (tmp_path / "omse_badimport.py").write_text("import omse_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_module_factory_that_does_not_import(user_module):
    with pytest.raises(OmseError, match="cannot import module 'omse_no_such_module_xyz'"):
        load_user_model("omse_no_such_module_xyz:factory")
    with pytest.raises(
        OmseError, match="cannot import module 'omse_badimport'.*omse_no_such_dependency"
    ):
        load_user_model("omse_badimport:factory")
    with pytest.raises(OmseError, match="has no callable 'nothere'"):
        load_user_model("omse_usermod:nothere")
    with pytest.raises(OmseError, match="broken\\(\\) failed: RuntimeError: factory exploded"):
        load_user_model("omse_usermod:broken")
    with pytest.raises(OmseError, match="returned int, not a torch.nn.Module"):
        load_user_model("omse_usermod:not_a_module")


def test_user_model_with_matching_weights(user_module):
    m = load_user_model("omse_usermod:factory")
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    save_file(sd, user_module / "w.safetensors")
    m2 = load_user_model("omse_usermod:factory", user_module / "w.safetensors")
    assert all(torch.equal(m2.state_dict()[k], sd[k]) for k in sd)
    assert not m2.training


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("shape", "size mismatch"),
        ("missing", "Missing key"),
        ("extra", "Unexpected key"),
    ],
)
def test_weights_that_do_not_match_the_architecture(user_module, change, match):
    sd = load_user_model("omse_usermod:factory").state_dict()
    if change == "shape":
        sd["0.weight"] = torch.randn(5, 3, 3, 3)
    elif change == "missing":
        del sd["3.bias"]
    else:
        sd["extra.weight"] = torch.randn(2)
    path = user_module / "w.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=f"does not match omse_usermod:factory.*{match}"):
        load_user_model("omse_usermod:factory", path)


def _good_weights(tmp_path):
    sd = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    return sd


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
@pytest.mark.parametrize("keep", [0, 1, 7, 8, 9, 40, 0.5, 0.99])
def test_truncated_weights_file(tmp_path, name, keep):
    _good_weights(tmp_path)
    data = (tmp_path / name).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / f"trunc_{name}"
    bad.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="trunc_"):
        load_weights(bad)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_corrupted_weights_file(tmp_path, name):
    _good_weights(tmp_path)
    data = bytearray((tmp_path / name).read_bytes())
    data[: min(64, len(data))] = b"\xff" * min(64, len(data))
    bad = tmp_path / f"bad_{name}"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_weights(bad)


def test_weights_file_missing_or_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nothere.safetensors")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_weights(tmp_path)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_weights(tmp_path / "empty.safetensors")


def test_good_weights_load(tmp_path):
    sd = _good_weights(tmp_path)
    for name in ("w.safetensors", "w.pt"):
        got = load_weights(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    assert set(load_weights(tmp_path / "ckpt.pt")) == set(sd)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        load_weights(tmp_path / "meta.pt")


class _Exploit:
    """Unpickling this creates the marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin", ".pth"])
@pytest.mark.parametrize("how", ["pickle", "torch_zip", "torch_legacy"])
def test_pickle_is_refused_never_unpickled(tmp_path, suffix, how):
    marker = tmp_path / "PWNED"
    payload = {"a.weight": torch.ones(2), "evil": _Exploit(str(marker))}
    path = tmp_path / f"weights{suffix}"
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(how == "torch_zip"))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights"):
        load_weights(path)
    assert not marker.exists()


def test_pickle_marker_mechanism_works(tmp_path):
    # guard for the test above: plain unpickling of the payload does create the marker
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Exploit(str(marker)))).close()
    assert marker.exists()


# -- nothing lost ---------------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m), m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
    )


def _same(a, b):
    sd_a, *rest_a = a
    sd_b, *rest_b = b
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert sd_a[k].dtype == sd_b[k].dtype and torch.equal(sd_a[k], sd_b[k]), k
    assert rest_a == rest_b


def _has_corrections():
    try:
        import omse.transforms.residuals  # noqa: F401
    except Exception:
        return False
    return True


CONFIGS = [
    QuantConfig.preset("fast"),
    QuantConfig.preset(
        "fast", weight_bits=2, act_bits=4, weight_method="minmax", granularity="per_tensor"
    ),
    QuantConfig.preset("fast", act_bits=None, weight_method="aciq", act_method="percentile"),
    pytest.param(
        QuantConfig(extra_mac_budget=0.5, bias_correction=True),
        marks=pytest.mark.skipif(
            not _has_corrections(), reason="omse.transforms.residuals not there yet"
        ),
    ),
    pytest.param(
        QuantConfig.preset("fast", equalize=True),
        marks=pytest.mark.skipif(
            not _has_corrections(), reason="omse.transforms.residuals not there yet"
        ),
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("training", [False, True])
def test_input_model_and_batches_are_never_modified(cfg, training):
    model = small_net().train(training)
    data = batches(3)
    data_before = [b.clone() for b in data]
    before = _snapshot(model)
    q = _quiet(quantize, model, data, cfg)
    _same(before, _snapshot(model))
    assert all(torch.equal(a, b) for a, b in zip(data, data_before))
    assert q is not model and not q.training
    assert not any(p.requires_grad for p in q.parameters())
    # the quantized copy shares no storage with the input model
    ptrs = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in q.state_dict().values() if t.numel()}


def test_interrupted_calibration_iterable_leaves_no_output_and_input_intact(tmp_path):
    model = small_net()
    before = _snapshot(model)

    def stream():
        yield from batches(2)
        raise KeyboardInterrupt  # Ctrl-C while reading batch 2

    out = tmp_path / "q.pt"
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_bytes(b"header, then the model")
        torch.save(quantize(model, stream(), FAST).state_dict(), tmp)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    _same(before, _snapshot(model))


def test_interrupt_inside_the_forward_pass_leaves_no_output_and_no_hooks(tmp_path):
    model = small_net()
    calls = []

    def interrupt_on_batch_2(mod, inp):
        calls.append(1)
        if len(calls) == 4:  # folding traces 2 forwards on batch 0; then batches 0, 1, 2
            raise KeyboardInterrupt

    handle = model[0].register_forward_pre_hook(interrupt_on_batch_2)
    before = _snapshot(model)
    out = tmp_path / "q.pt"
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_bytes(b"partial")
        q = quantize(model, batches(4), FAST)
        torch.save(q.state_dict(), tmp)
    assert len(calls) == 4
    assert not out.exists() and list(tmp_path.iterdir()) == []
    _same(before, _snapshot(model))  # omse removed every hook it added
    handle.remove()


# -- reproducible ---------------------------------------------------------------------------------

REPRO = r"""
import hashlib, torch
from torch import nn
from omse.transforms.pipeline import quantize
from omse.nn.layers import quantized_layers
from omse.config import QuantConfig

def quant_hash():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(3)]
    probe = torch.randn(6, 3, 12, 12, generator=gen)
    h = hashlib.sha256()
    for cfg in (
        QuantConfig(),
        QuantConfig(weight_bits=3, act_bits=4, granularity="per_tensor"),
        QuantConfig.preset(
            "best", act_bits=4, rounding_scope="block", rounding_iters=20, rounding_learn_act=True
        ),
    ):
        q = quantize(model, data, cfg)
        for name, layer in sorted(quantized_layers(q).items()):
            h.update(name.encode())
            for codes, scale, mask in layer.terms():
                for t in (codes, scale, mask):
                    h.update(t.contiguous().numpy().tobytes())
            h.update(layer.act_scale.numpy().tobytes())
        with torch.no_grad():
            h.update(q(probe).numpy().tobytes())
    return h.hexdigest()
"""


def _repro_hash() -> str:
    ns: dict = {}
    exec(REPRO, ns)
    return ns["quant_hash"]()


def test_two_runs_are_bit_identical():
    model, data = small_net(), batches(3)
    q1, q2 = quantize(model, data, FAST), quantize(model, data, FAST)
    l1, l2 = quantized_layers(q1), quantized_layers(q2)
    assert l1.keys() == l2.keys()
    for name in l1:
        for t1, t2 in zip(l1[name].terms(), l2[name].terms()):
            for a, b in zip(t1, t2):
                assert a.dtype == b.dtype and torch.equal(a, b), name
        assert torch.equal(l1[name].act_scale, l2[name].act_scale)
    probe = batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(q1(probe), q2(probe))


def test_bit_identical_across_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="123")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", REPRO + "\nprint(quant_hash())"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == _repro_hash()


# -- bounded memory -------------------------------------------------------------------------------


def _stats_bytes(n_batches: int) -> tuple[int, int]:
    cal = Calibration()
    quantize(
        small_net(),
        batches(n_batches, shape=(2, 3, 8, 8)),
        QuantConfig.preset("fast", act_bins=256),
        calibration=cal,
    )
    return sum(h.nbytes() for h in cal.stats.values()), len(cal.stats)


def test_streaming_statistics_size_independent_of_batches():
    few, layers_few = _stats_bytes(2)
    many, layers_many = _stats_bytes(20)
    assert layers_few == layers_many == 3
    assert few == many == 3 * (2 * 256 * 8 + 64)
