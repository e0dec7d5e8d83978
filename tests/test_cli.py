"""The command line on bad input: one clear line on stderr, exit code 2, no traceback (``--debug``
shows it); inputs are never modified; outputs are atomic and never silently overwritten."""

import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from omse.cli import main
from omse.config import QuantConfig
from omse.errors import OmseError

torch.set_num_threads(1)

MODULE = """
import torch
from torch import nn


def factory():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def grey():  # expects 1-channel inputs: RGB calibration images do not fit
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class FunctionalUp(nn.Module):  # its weight is used functionally: omse cannot wrap it
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 2, 2))

    def forward(self, x):
        return torch.nn.functional.conv_transpose2d(x, self.weight, stride=2)


class Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8)
        self.up = FunctionalUp()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.up(self.conv(x)).mean((2, 3)))


def with_upsampling():
    torch.manual_seed(0)
    return Up()


def broken():
    raise RuntimeError("factory exploded")


SEEN = []


def to_pm1(x):  # [0, 1] -> [-1, 1]: the same as --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5
    SEEN.append(tuple(x.shape))
    return x * 2 - 1


def batches():  # a calibration loader: (inputs, labels) tuples, 4 samples each
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 20, 24, generator=g), torch.zeros(4)) for _ in range(3)]


def tensors():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 3, 20, 24, generator=g) for _ in range(3))


def dicts():  # keyword batches: nn.Sequential.forward(input)
    return [{"input": x} for x, _ in batches()]


def not_iterable():
    return 3
"""


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A user model module, its weights, a calibration folder and bad variants of each."""
    d = tmp_path_factory.mktemp("cli")
    (d / "omse_climod.py").write_text(MODULE)
    (d / "omse_cli_badimport.py").write_text("import omse_no_such_dependency\n")
    imgs = d / "imgs"
    imgs.mkdir()
    for i in range(3):
        a = (np.random.RandomState(i).rand(40, 48, 3) * 255).astype("uint8")
        Image.fromarray(a).save(imgs / f"{i}.png")
    held = d / "held_out"
    held.mkdir()
    for i in range(4):
        a = (np.random.RandomState(100 + i).rand(44, 36, 3) * 255).astype("uint8")
        Image.fromarray(a).save(held / f"{i}.png")
    (d / "empty").mkdir()
    bad_imgs = d / "bad_imgs"
    bad_imgs.mkdir()
    (bad_imgs / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    sys.path.insert(0, str(d))
    try:
        import omse_climod

        sd = omse_climod.factory().state_dict()
    finally:
        sys.path.remove(str(d))
    save_file(sd, d / "w.safetensors")
    wrong = dict(sd)
    wrong["0.weight"] = torch.randn(8, 3, 3, 3)
    save_file(wrong, d / "wrong.safetensors")
    (d / "trunc.safetensors").write_bytes((d / "w.safetensors").read_bytes()[:100])
    nan = {k: v.clone() for k, v in sd.items()}
    nan["0.weight"][0, 0, 0, 0] = math.nan
    save_file(nan, d / "nan.safetensors")
    marker = d / "PWNED"
    payload = {"0.weight": torch.ones(1), "x": _Exploit(str(marker))}
    (d / "pickle.safetensors").write_bytes(pickle.dumps(payload))
    torch.save(payload, d / "pickle.pt")
    return d


@pytest.fixture
def cli(work, monkeypatch, capsys):
    """Run ``omse`` in-process in the work folder: ``(exit code, stdout, stderr)``."""
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))

    def run(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _one_error_line(err: str) -> str:
    """The stderr of a failed run: exactly one ``omse: error:`` line and no traceback."""
    assert "Traceback" not in err
    lines = [seg for line in err.splitlines() for seg in line.split("\r") if "error" in seg]
    assert len(lines) == 1, err
    assert lines[0].startswith("omse: error: ")
    return lines[0]


def _fingerprint(folder: Path) -> dict:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


USER = ["omse_climod:factory", "--weights", "w.safetensors", "--calib", "imgs"]

BAD_INPUTS = [
    (["quantize", "resnet9000"], "unknown model 'resnet9000'"),
    (
        ["quantize", "omse_cli_nomod:factory", "--calib", "imgs"],
        "cannot import module 'omse_cli_nomod'",
    ),
    (["quantize", "omse_cli_badimport:factory", "--calib", "imgs"], "omse_no_such_dependency"),
    (["quantize", "omse_climod:nothere", "--calib", "imgs"], "has no callable 'nothere'"),
    (["quantize", "omse_climod:broken", "--calib", "imgs"], "factory exploded"),
    (
        ["quantize", "omse_climod:factory", "--weights", "wrong.safetensors", "--calib", "imgs"],
        "does not match",
    ),
    (
        ["quantize", "omse_climod:factory", "--weights", "trunc.safetensors", "--calib", "imgs"],
        "not a valid safetensors",
    ),
    (
        ["quantize", "omse_climod:factory", "--weights", "nothere.safetensors", "--calib", "imgs"],
        "does not exist",
    ),
    (
        ["quantize", "omse_climod:factory", "--weights", "pickle.safetensors", "--calib", "imgs"],
        "pickle.safetensors",
    ),
    (
        ["quantize", "omse_climod:factory", "--weights", "pickle.pt", "--calib", "imgs"],
        "refused, not unpickled",
    ),
    (
        ["quantize", "omse_climod:factory", "--weights", "nan.safetensors", "--calib", "imgs"],
        "parameter '0.weight' contains NaN",
    ),
    (["quantize", *USER, "-w", "9"], "weight_bits=9"),
    (["quantize", *USER, "-w", "1"], "weight_bits=1"),
    (["quantize", *USER, "-a", "12"], "act_bits=12"),
    (["quantize", *USER, "-a", "eight"], "--act-bits must be an integer"),
    (["quantize", *USER, "--budget", "3"], "extra_mac_budget=3.0 is outside"),
    (["quantize", *USER, "--budget", "-0.5"], "extra_mac_budget=-0.5 is outside"),
    (["quantize", *USER, "--budget", "nan"], "extra_mac_budget=nan"),
    (["quantize", *USER, "--granularity", "per_row"], "granularity 'per_row'"),
    (["quantize", *USER, "--granularity", "per_group3"], "does not divide"),
    (["quantize", *USER, "--method", "l3"], "weight_method='l3'"),
    (["quantize", "omse_climod:factory", "--calib", "nothere"], "does not exist"),
    (["quantize", "omse_climod:factory", "--calib", "empty"], "holds no images"),
    (["quantize", "omse_climod:factory", "--calib", "bad_imgs"], "cannot read image"),
    (
        ["quantize", "omse_climod:factory", "--calib", "imgs", "--calib-size", "0"],
        "--calib-size must be >= 1",
    ),
    (["quantize", "omse_climod:factory"], "needs --calib"),
    (
        ["quantize", "omse_climod:grey", "--calib", "imgs"],
        "model failed to run calibration batch 0",
    ),
    (
        ["quantize", "omse_climod:with_upsampling", "--calib", "imgs", "--strict"],
        r"up (FunctionalUp)",
    ),
    (
        ["quantize", "fmnist-resnet20", "--weights", "w.safetensors"],
        "--weights is for package.module:factory",
    ),
    (["quantize", *USER, "--json", "w.safetensors", "--force"], "is one of the inputs"),
    (["quantize", *USER, "--json", "imgs"], "already exists"),
    (["quantize", *USER, "--input-size", "0"], "--input-size must be H or HxW"),
    (["quantize", *USER, "--input-size", "big"], "--input-size must be H or HxW"),
    (["quantize", *USER, "--mean", "0.5", "0.5", "0.5"], "--mean and --std go together"),
    (["quantize", *USER, "--mean", *"000", "--std", "1", "0", "1"], "--std values must be > 0"),
    (
        ["quantize", *USER, "--transform", "omse_climod:to_pm1", "--mean", *"000", "--std", *"111"],
        "--transform replaces --mean/--std",
    ),
    (["quantize", *USER, "--transform", "omse_climod:nothere"], "has no callable 'nothere'"),
    (["quantize", *USER, "--input-size", "64", "--resize", "40"], "use a resize of at least 64"),
    (["quantize", *USER, "--eval", "nothere"], "evaluation folder nothere does not exist"),
    (["quantize", *USER, "--calib-loader", "omse_climod:batches"], "not both"),
    (
        ["quantize", "omse_climod:factory", "--calib-loader", "omse_climod:not_iterable"],
        "must return an iterable of batches",
    ),
    (["quantize", "fmnist-resnet20", "--input-size", "32"], "--input-size is for package"),
    (["quantize", "fmnist-resnet20", "--calib", "imgs"], "28x28 Fashion-MNIST images"),
    (["eval", "fmnist-resnet20", "--eval", "imgs"], "28x28 Fashion-MNIST images"),
    (["eval", "fmnist-resnet20", "--mean", *"000", "--std", *"111"], "--mean is for package"),
    (["quantize", *USER, "--recipe", "best", "--output-aware"], "contradicts rounding='learned'"),
    (
        ["quantize", "omse_cli_nomod:factory", "--calib", "imgs"],
        "add that folder to PYTHONPATH",
    ),
]


@pytest.mark.parametrize(("argv", "match"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(cli, work, argv, match):
    before = _fingerprint(work)
    rc, out, err = cli(*argv)
    assert rc == 2
    line = _one_error_line(err)
    assert match in line
    assert _fingerprint(work) == before  # nothing written, nothing modified
    assert not (work / "PWNED").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["quantize"], "the following arguments are required: model"),
        (["quantize", "x", "-w", "four"], "invalid int value: 'four'"),
        (["quantize", "x", "--budget", "lots"], "invalid float value"),
        (["quantize", "x", "--recipe", "turbo"], "invalid choice: 'turbo'"),
        (["quantize", "x", "--mean", "0.5"], "expected 3 arguments"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["--threads", "0", "models"], "--threads must be >= 1"),
        (["export", "x", "--format", "tflite", "--out", "o"], "invalid choice: 'tflite'"),
        (["export", "x", "--int8-weights", "u4", "--out", "o"], "invalid choice: 'u4'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_code_2(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("omse") and "error: " in err and match in err


def test_debug_shows_the_traceback(cli):
    with pytest.raises(OmseError, match="unknown model"):
        cli("--debug", "quantize", "resnet9000")
    # the underlying exception stays chained for the traceback
    with pytest.raises(OmseError, match="does not match") as e:
        cli("--debug", "quantize", *USER[:2], "wrong.safetensors", "--calib", "imgs")
    assert isinstance(e.value.__cause__, RuntimeError) and "size mismatch" in str(e.value.__cause__)


def test_success_writes_json_and_keeps_inputs(cli, work):
    out = work / "run1.json"
    before = _fingerprint(work)
    rc, stdout, err = cli("quantize", *USER, "--json", out)
    assert rc == 0, err
    assert "agreement with FP32" in stdout and out.is_file()
    after = _fingerprint(work)
    del after["run1.json"]
    assert after == before  # weights, module and images untouched
    content = out.read_bytes()
    mtime = out.stat().st_mtime_ns
    # existing output: refused without --force, untouched
    rc, _, err = cli("quantize", *USER, "--json", out)
    assert rc == 2 and "already exists" in _one_error_line(err) and "--force" in err
    assert out.read_bytes() == content and out.stat().st_mtime_ns == mtime
    # with --force it is replaced
    rc, _, err = cli("quantize", *USER, "--json", out, "--force")
    assert rc == 0, err
    assert out.stat().st_mtime_ns != mtime
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".run1")) == []


def test_unsupported_layers_warned_not_fatal_without_strict(cli, work):
    with pytest.warns(UserWarning, match=r"float \(unsupported type\): up \(FunctionalUp\)"):
        rc, out, err = cli(
            "quantize", "omse_climod:with_upsampling", "--calib", "imgs", "--json", "up.json"
        )
    assert rc == 0
    assert json.loads((work / "up.json").read_text())["left_float"] == ["up (FunctionalUp)"]


def test_keyboard_interrupt_during_calibration_leaves_no_output(cli, work, monkeypatch):
    import omse.transforms.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(omse.transforms.pipeline, "collect", interrupted)
    out = work / "interrupted.json"
    rc, _, err = cli("quantize", *USER, "--json", out)
    assert rc == 130 and "interrupted; no partial output" in err
    assert not out.exists()
    assert not [p for p in work.iterdir() if "interrupted" in p.name]


def test_keyboard_interrupt_while_writing_keeps_the_old_output(cli, work, monkeypatch):
    out = work / "kept.json"
    out.write_text("old results\n")
    real = pathlib.Path.write_bytes

    def half_then_interrupt(self, data):
        real(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_bytes", half_then_interrupt)
    rc, _, err = cli("quantize", *USER, "--json", out, "--force")
    monkeypatch.undo()
    assert rc == 130
    assert out.read_text() == "old results\n"
    assert not [p for p in work.iterdir() if p.name.startswith(".kept.json")]


def _omse_bin() -> str:
    exe = Path(sys.executable).parent / "omse"
    return str(exe) if exe.exists() else "omse"


def test_installed_command_in_a_subprocess(work):
    env = dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1")
    args = [_omse_bin(), "quantize", "omse_climod:factory", "--weights", "wrong.safetensors"]
    args += ["--calib", "imgs"]
    before = _fingerprint(work)
    r = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    line = _one_error_line(r.stderr)
    assert "does not match omse_climod:factory" in line and "size mismatch" in line
    assert r.stderr.strip() == line
    assert _fingerprint(work) == before


@pytest.mark.parametrize(
    "extra", [[], ["--integer"], ["--container", "int8"], ["--target", "int8", "--budget", "0.1"]]
)
def test_export_writes_a_graph_onnxruntime_runs(cli, work, extra):
    ort = pytest.importorskip("onnxruntime")
    out = work / f"m{len(extra)}{'i' if '--integer' in extra else ''}.onnx"
    rc, stdout, err = cli("export", *USER, "--out", out, *extra)
    assert rc == 0, err
    assert f"wrote {out}" in stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).rand(2, *sess.get_inputs()[0].shape[1:]).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert y.shape[0] == 2 and np.isfinite(y).all()
    onnx = pytest.importorskip("onnx")
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ("Mul" in ops) == ("--integer" in extra)


@pytest.mark.parametrize("mode", ["auto", "s8", "u8"])
def test_export_int8_weights_from_the_command_line(cli, work, mode):
    onnx = pytest.importorskip("onnx")
    from omse.deploy.export import weight_types

    out = work / f"m_{mode}.onnx"
    argv = ["--target", "int8", "-w", "8", "-a", "8", "--int8-weights", mode, "--force"]
    rc, stdout, err = cli("export", *USER, "--out", out, *argv)
    assert rc == 0, err
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["omse.int8_weights"] == mode
    types = weight_types(out)
    # 8-bit weights of target int8 are 7-bit codes (within +-64), INT8, but for the first layer
    # (8 bits: UINT8 in "auto"); "s8" / "u8" write every layer INT8 / UINT8
    n = len(types["INT8"]) + len(types["UINT8"])
    assert n > 1 and len(types["UINT8"]) == {"auto": 1, "s8": 0, "u8": n}[mode]
    line = [ln for ln in stdout.splitlines() if ln.startswith("int8 weights: ")]
    s8 = len(types["INT8"])
    assert line == [
        f"int8 weights: {s8} layers INT8 (codes within +-64, exact on any x86), {n - s8} UINT8 "
        "(full range; slower on VNNI CPUs); --int8-weights s8|u8|auto"
    ]


@pytest.fixture(scope="module")
def tiny_onnx(work):
    """tests/nets.py's TinyNet as a float ONNX file (static 12x12 input, dynamic batch)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("onnx2torch") is None:  # imported only with omse's stand-in
        pytest.skip("onnx2torch is not installed (make install installs it)")
    from nets import tiny_net

    path = work / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tiny_net(), torch.randn(1, 3, 12, 12), str(path), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        )  # fmt: skip
    return path


@pytest.mark.parametrize("cmd", ["quantize", "export"])
def test_onnx_model_in_quantized_onnx_out(cli, work, tiny_onnx, cmd):
    ort = pytest.importorskip("onnxruntime")
    out = work / f"tiny.{cmd}.q.onnx"
    before = tiny_onnx.read_bytes()
    argv = ["--calib", "imgs", "-w", "4", "-a", "8", "--target", "int8", "--out", out]
    rc, stdout, err = cli(cmd, tiny_onnx, *argv)
    assert rc == 0, err
    assert f"wrote {out} (target int8)" in stdout
    assert tiny_onnx.read_bytes() == before
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [3, 12, 12]  # calibrated at the ONNX input's size
    for n in (1, 3):
        x = np.random.RandomState(n).rand(n, 3, 12, 12).astype(np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        assert y.shape == (n, 10) and np.isfinite(y).all()


def test_onnx_model_errors_are_one_line(cli, work, tiny_onnx):
    rc, _, err = cli("quantize", "missing.onnx", "--calib", "imgs")
    assert rc == 2 and "missing.onnx does not exist" in _one_error_line(err)
    rc, _, err = cli("quantize", tiny_onnx, "--calib", "imgs", "--out", tiny_onnx, "--force")
    assert rc == 2 and "is one of the inputs" in _one_error_line(err)


def _config(*argv: str):
    from omse.cli import _config_from_args, build_parser

    return _config_from_args(build_parser().parse_args(["quantize", "m:f", *argv]))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], QuantConfig()),
        (["--recipe", "default"], QuantConfig(extra_mac_budget=0.10, bias_correction=True)),
        (
            ["--recipe", "fast"],
            QuantConfig(extra_mac_budget=0.0, bias_correction=False, budget=None),
        ),
        (["--recipe", "best"], QuantConfig(rounding="learned")),
        (["--recipe", "fast", "--budget", "0.2"], QuantConfig.preset("fast", extra_mac_budget=0.2)),
        (
            ["--recipe", "fast", "--bias-correction"],
            QuantConfig.preset("fast", bias_correction=True),
        ),
        (["--no-bias-correction", "--budget", "0"], QuantConfig.preset("fast", budget=0.6)),
        (["--max-weight-bytes", "none"], QuantConfig(budget=None)),
        (
            ["--max-weight-bytes", "0.75x", "--guard-db", "off"],
            QuantConfig(budget={"weight_bytes": 0.75, "guard_db": None}),
        ),
        (
            ["--recipe", "fast", "--max-weight-bytes", "1.5MB"],
            QuantConfig.preset("fast", budget=1_500_000),
        ),
        (["--guard-db", "6"], QuantConfig(budget={"weight_bytes": 0.6, "guard_db": 6.0})),
        (["--residual-criterion", "network"], QuantConfig(residual_criterion="network")),
        (["--recipe", "best", "--rounding", "nearest"], QuantConfig()),
        (
            [
                "--recipe",
                "best",
                "--rounding-scope",
                "block",
                "--rounding-iters",
                "50",
                "--rounding-blocks",
                "layers.*",
                "--rounding-blocks",
                "head",
                "--rounding-learn-act",
            ],
            QuantConfig(
                rounding="learned",
                rounding_scope="block",
                rounding_iters=50,
                rounding_blocks=("layers.*", "head"),
                rounding_learn_act=True,
            ),
        ),
        (["-w", "3", "-a", "float"], QuantConfig(weight_bits=3, act_bits=None)),
        (
            ["-a", "4", "--method", "minmax"],
            QuantConfig(act_bits=4, weight_method="minmax", act_method="minmax"),
        ),
        (["--target", "int8", "--equalize"], QuantConfig(target="int8", equalize=True)),
        (["--output-aware", "--strict"], QuantConfig(output_aware=True, strict=True)),
        (
            ["--skip", "fc", "--granularity", "per_tensor"],
            QuantConfig(skip=("fc",), granularity="per_tensor"),
        ),
    ],
)
def test_recipe_with_flags_overriding_it(argv, expected):
    assert _config(*argv) == expected


def _run_json(cli, work, name, *argv):
    rc, out, err = cli("quantize", *argv, "--json", work / name, "--force")
    assert rc == 0, err
    return json.loads((work / name).read_text()), out


def test_default_recipe_runs_and_is_recorded(cli, work):
    res, _ = _run_json(cli, work, "recipe.json", *USER)
    assert res["config"]["version"] == 5 and res["recipe"] == "default"
    assert QuantConfig.from_dict(res["config"]) == QuantConfig()
    fast, _ = _run_json(cli, work, "fast.json", *USER, "--recipe", "fast")
    assert QuantConfig.from_dict(fast["config"]) == QuantConfig.preset("fast")
    assert fast["calib_batches"] == res["calib_batches"] == 1


def test_user_model_preprocessing_and_held_out_evaluation(cli, work):
    import omse_climod

    size = ["--input-size", "20x24", "--resize", "30"]
    norm, out = _run_json(
        cli, work, "norm.json", *USER, *size, "--mean", *["0.5"] * 3, "--std", *["0.5"] * 3
    )
    # no --eval: measured on the calibration images, and said so
    assert not norm["eval_held_out"] and "calibration images: optimistic" in norm["eval_on"]
    assert "on 3 calibration inputs (calibration images: optimistic" in out
    omse_climod.SEEN.clear()
    tf, _ = _run_json(cli, work, "tf.json", *USER, *size, "--transform", "omse_climod:to_pm1")
    assert omse_climod.SEEN and all(s[1:] == (3, 20, 24) for s in omse_climod.SEEN)
    # the transform is the same normalisation: the same quantized model, the same figures
    assert (tf["agreement"], tf["kl"]) == (norm["agreement"], norm["kl"])
    held, out = _run_json(cli, work, "held.json", *USER, *size, "--eval", "held_out")
    assert held["eval_held_out"] and held["eval_inputs"] == 4
    assert "on 4 held-out images from held_out" in out
    two, _ = _run_json(cli, work, "two.json", *USER, "--eval", "held_out", "--eval-size", "2")
    assert two["eval_inputs"] == 2


@pytest.mark.parametrize("loader", ["batches", "tensors", "dicts"])
def test_calibration_loader(cli, work, loader):
    target = f"omse_climod:{loader}"
    res, _ = _run_json(cli, work, "loader.json", "omse_climod:factory", "--calib-loader", target)
    assert res["calib_batches"] == 3 and res["eval_inputs"] == 12
    assert not res["eval_held_out"]
    part, _ = _run_json(
        cli,
        work,
        "loader.json",
        "omse_climod:factory",
        "--calib-loader",
        target,
        "--calib-size",
        "5",
    )
    assert part["calib_batches"] == 2  # batches of 4 until 5 samples


def test_eval_of_a_user_models_checkpoint(cli, work):
    ckpt = work / "user.omse.safetensors"
    res, _ = _run_json(
        cli, work, "saved.json", *USER, "--eval", "held_out", "--out", ckpt, "--force"
    )
    rc, _, err = cli("eval", ckpt)
    assert rc == 2 and "--model package.module:factory" in _one_error_line(err)
    rc, _, err = cli("eval", ckpt, "--model", "omse_climod:factory")
    assert rc == 2 and "--eval FOLDER" in _one_error_line(err)
    out = work / "eval.json"
    rc, _, err = cli(
        "eval",
        ckpt,
        "--model",
        "omse_climod:factory",
        "--weights",
        "w.safetensors",
        "--eval",
        "held_out",
        "--json",
        out,
        "--force",
    )
    assert rc == 0, err
    ev = json.loads(out.read_text())
    assert ev["model"] == "omse_climod:factory" and ev["n"] == 4
    assert "held-out" in ev["eval_on"]
    assert ev["agreement"] == res["agreement"]
    assert ev["kl"] == pytest.approx(res["kl"], abs=1e-6)
    rc, _, err = cli("eval", "fmnist-resnet20", "--model", "omse_climod:factory")
    assert rc == 2 and "--model is for a user model's checkpoint" in _one_error_line(err)


def test_module_from_the_current_folder_without_pythonpath(work):
    """The console script (unlike ``python -c``) does not put the current folder on sys.path:
    omse does, as ``python -m`` would."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")  # omse only, not `work`
    args = [_omse_bin(), "quantize", "omse_climod:factory", "--weights", "w.safetensors"]
    args += ["--calib", "imgs", "--recipe", "fast"]
    r = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "agreement with FP32" in r.stdout


USER_NET = '''
import torch
from torch import nn
import torch.nn.functional as F


class UserNet(nn.Module):
    """Residual adds, SiLU, a depthwise conv, interpolate and cat: a small U-shaped net."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(24, 2, 1)

    def forward(self, x):
        y = F.silu(self.stem(x))
        y = y + self.pw(F.silu(self.dw(y)))  # residual add
        z = F.silu(self.down(y))
        z = F.interpolate(z, scale_factor=2.0, mode="nearest")  # even H, W
        return self.head(torch.cat([y, z], 1))


def build():
    torch.manual_seed(0)
    return UserNet().eval()
'''


def test_user_model_onnx_in_onnx_out_at_two_batches_and_two_sizes(cli, work):
    """A model defined in the user's own file, exported by the user to float ONNX with dynamic
    batch, height and width, quantized from the command line (ONNX in) and written as int8 and
    int4 ONNX (ONNX out) that run at two batch sizes and two input sizes."""
    import importlib
    import importlib.util
    import warnings

    ort = pytest.importorskip("onnxruntime")
    if importlib.util.find_spec("onnx2torch") is None:  # imported only with omse's stand-in
        pytest.skip("onnx2torch is not installed (make install installs it)")

    (work / "omse_usernet.py").write_text(USER_NET)
    net = importlib.import_module("omse_usernet").build()
    src = work / "usernet.onnx"
    dyn = {0: "N", 2: "H", 3: "W"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, torch.rand(1, 3, 32, 32), str(src), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["mask"],
            dynamic_axes={"image": dyn, "mask": dyn},
        )  # fmt: skip
    for target in ("int8", "int4"):
        out = work / f"usernet.{target}.onnx"
        argv = ["--calib", "imgs", "--input-size", "32", "--target", target, "--out", out]
        rc, stdout, err = cli("quantize", src, *argv, "--force")
        assert rc == 0, err
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["image"]
        assert [o.name for o in sess.get_outputs()] == ["mask"]
        ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        for n, h, w in [(1, 32, 32), (3, 32, 32), (2, 48, 40), (1, 24, 56)]:
            x = np.random.RandomState(n * h + w).rand(n, 3, h, w).astype(np.float32)
            y = sess.run(None, {"image": x})[0]
            y0 = ref.run(None, {"image": x})[0]
            assert y.shape == y0.shape == (n, 2, h, w)
            # quantized, not float, and close to the float model at every shape
            rel = np.abs(y - y0).mean() / np.abs(y0).mean()
            assert 0 < rel < 0.2, (target, n, h, w, rel)


@pytest.mark.parametrize("target", ["int8", "int4"])
def test_export_dynamic_axes_and_names_from_the_command_line(cli, work, target):
    ort = pytest.importorskip("onnxruntime")
    out = work / f"climod.dyn.{target}.onnx"
    argv = [*USER, "--target", target, "--out", out, "--force", "--input-names", "image"]
    rc, _, err = cli("export", *argv, "--output-names", "logits", "--dynamic-axes", "image:2=h,3=w")
    assert rc == 0, err
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert sess.get_inputs()[0].shape == ["batch", 3, "h", "w"]
    for n, h, w in [(1, 40, 48), (5, 64, 36)]:  # two batch sizes, two image sizes
        x = np.random.RandomState(h).rand(n, 3, h, w).astype(np.float32)
        assert sess.run(None, {"image": x})[0].shape == (n, 3)


@pytest.mark.parametrize(
    "spec", ["image", "image:2", "image:x=h", ":2=h", "image:2=h,3"], ids=lambda s: repr(s)
)
def test_export_bad_dynamic_axes_is_one_line(cli, work, spec):
    out = work / "climod.bad.onnx"
    rc, _, err = cli("export", *USER, "--out", out, "--force", "--dynamic-axes", spec)
    assert rc == 2 and "--dynamic-axes" in _one_error_line(err) and "NAME:AXIS=DIM" in err
    assert not out.exists()


def test_ocr_recognizer_onnx_in_onnx_out_from_the_command_line(cli, work):
    """The PP-OCRv4 recognizer that rapidocr ships, quantized from its file with the calibration
    loader omse.zoo.ocr provides and written back as ONNX: the graph keeps the file's input and
    output names, runs at two batch sizes and two line widths, and reads the held-out lines as
    FP32 does (the printed agreement is per CTC step, over the classes)."""
    import importlib.util

    ort = pytest.importorskip("onnxruntime")
    from omse.zoo import ocr

    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed (make install installs it)")
    try:
        src = ocr.rapidocr_models()["rec"]
    except OmseError as e:
        pytest.skip(str(e))
    out = work / "rec.q.onnx"
    argv = ["--calib-loader", "omse.zoo.ocr:rec_calibration", "--recipe", "fast", "-w", "8"]
    rc, stdout, err = cli(
        "--threads", "1", "quantize", src, *argv, "--target", "int8", "--out", out,
        "--json", work / "rec.json", "--force",
    )  # fmt: skip
    assert rc == 0, err
    res = json.loads((work / "rec.json").read_text())
    assert res["output_sqnr_db"] > 5 and res["agreement"] > 0.9  # per step, 16 calib. lines
    charset = ocr.rapidocr_charset(src)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [i.name for i in ref.get_inputs()]
    assert [o.name for o in sess.get_outputs()] == [o.name for o in ref.get_outputs()]
    name = ref.get_inputs()[0].name
    lines = [x.bgr() for x in ocr.text_lines(8, "eval", 1, max_wh_ratio=320 / 48)]
    for n, width in [(1, 320), (3, 480), (8, 320), (8, 480)]:
        x = ocr.rec_preprocess(lines[:n], max_wh_ratio=width / 48)
        y = sess.run(None, {name: x})[0]
        y0 = ref.run(None, {name: x})[0]
        assert y.shape == y0.shape == (n, width // 8, len(charset))
        texts, fp32 = ocr.ctc_greedy_decode(y, charset), ocr.ctc_greedy_decode(y0, charset)
        cer = np.mean([ocr.char_error_rate(a, b) for a, b in zip(texts, fp32)])
        assert cer <= 0.2, (n, width, texts, fp32)  # measured 0.0-0.1 (W8A8, int8 kernels)


def _image_onnx(path, dynamic, meta=None):
    """tests/nets.py's TinyNet (any H x W: it ends in a global mean) as a float ONNX file at
    32x40, with the given ``{axis: name}`` input axes dynamic and ``meta`` as metadata_props."""
    import importlib.util
    import warnings

    import onnx

    if importlib.util.find_spec("onnx2torch") is None:  # imported only with omse's stand-in
        pytest.skip("onnx2torch is not installed (make install installs it)")
    from nets import tiny_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tiny_net(), torch.randn(1, 3, 32, 40), str(path), dynamo=False, opset_version=17,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": dynamic, "logits": {0: "N"}},
        )  # fmt: skip
    if meta:
        m = onnx.load(path)
        onnx.helper.set_model_props(m, meta)
        onnx.save(m, path)
    return path


NHW = {0: "N", 2: "H", 3: "W"}


@pytest.mark.parametrize(
    "dynamic, meta, line",
    [
        ({0: "N"}, None, "input size 32x40 from the model's static input shape; images centre-"),
        (NHW, {"imgsz": "[24, 36]"}, "input size 24x36 from the model's metadata (imgsz); images c"),
        (NHW, {"input_shape": "[1, 3, 28, 30]"}, "input size 28x30 from the model's metadata (inp"),
        (NHW, {"img_size": "44"}, "input size 44x44 from the model's metadata (img_size)"),
        (NHW, None, "input size 224x224 from the default for a dynamic side (the input's shape "
         "is ['N', 3, 'H', 'W'] and its metadata names no size: imgsz, img_size"),
        (NHW, {"author": "Ultralytics", "imgsz": "[24, 36]", "stride": "32"},
         "input size 24x36 from the model's metadata (imgsz); images letterboxed (centred, pad "
         "114): the model's metadata is Ultralytics'"),
    ],
)  # fmt: skip
def test_onnx_input_size_from_the_model_in_one_line(cli, work, dynamic, meta, line):
    """No --input-size: the size comes from the input's static H, W, else the metadata, else
    the default, and one line says which (and how the images were fitted to it)."""
    src = _image_onnx(work / f"size{len(dynamic)}{len(meta or {})}.onnx", dynamic, meta)
    rc, out, err = cli("quantize", src, "--calib", "imgs", "--recipe", "fast")
    assert rc == 0, err
    said = [s for s in out.splitlines() if s.startswith("input size")]
    assert len(said) == 1 and said[0].startswith(line), out


def test_onnx_metadata_size_errors_name_what_to_do(cli, work):
    bad = _image_onnx(work / "badmeta.onnx", NHW, {"imgsz": "large"})
    rc, _, err = cli("quantize", bad, "--calib", "imgs")
    assert rc == 2 and "metadata imgsz='large' names no image size" in _one_error_line(err)
    assert "give --input-size HxW" in err
    clash = _image_onnx(work / "clash.onnx", {0: "N", 3: "W"}, {"imgsz": "[24, 36]"})
    rc, _, err = cli("quantize", clash, "--calib", "imgs")
    assert rc == 2 and "contradicts the input's static shape" in _one_error_line(err)
    rc, out, err = cli(
        "quantize", bad, "--calib", "imgs", "--input-size", "32x40", "--recipe", "fast"
    )
    assert rc == 0 and "input size 32x40 from --input-size" in out, err


def test_user_model_default_size_is_said(cli, work):
    rc, out, err = cli("quantize", *USER, "--recipe", "fast")
    assert rc == 0, err
    assert "input size 224x224 from the default (give --input-size HxW for another)" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--resize", "pad"], "--resize must be crop, letterbox, stretch or a shorter side N"),
        (["--pad-value", "0"], "--pad-value goes with --resize letterbox, not crop"),
        (["--resize", "stretch", "--letterbox-pad", "center"], "--letterbox-pad goes with --res"),
        (["--resize", "letterbox", "--pad-value", "256"], "--pad-value must be a grey level"),
    ],
)
def test_resize_errors_are_one_line(cli, work, argv, match):
    rc, _, err = cli("quantize", *USER, *argv)
    assert rc == 2 and match in _one_error_line(err)


@pytest.mark.parametrize("resize", ["crop", "letterbox", "stretch"])
def test_eval_images_are_fitted_as_the_calibration_images(cli, work, resize):
    """--eval of the calibration folder itself gives the figures of no --eval (which measures
    on the calibration inputs): the same preprocessing, image for image."""
    src = _image_onnx(work / "fit.onnx", NHW)
    argv = [src, "--calib", "imgs", "--input-size", "32x40", "--recipe", "fast"]
    argv += ["--resize", resize] + (
        ["--letterbox-pad", "bottom-right"] if resize == "letterbox" else []
    )
    same, out = _run_json(cli, work, "fit.json", *argv)
    held, _ = _run_json(cli, work, "fit_eval.json", *argv, "--eval", "imgs")
    assert held["eval_held_out"] and not same["eval_held_out"]
    assert (held["agreement"], held["kl"]) == (same["agreement"], same["kl"])
    phrase = {"crop": "centre-cropped", "letterbox": "letterboxed (padded bottom-right, pad 114)",
              "stretch": "stretched"}[resize]  # fmt: skip
    assert f"input size 32x40 from --input-size; images {phrase}" in out


PRELU_NET = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4), nn.PReLU(8), nn.Conv2d(8, 8, 1), nn.PReLU(),
        nn.LayerNorm([5, 6]), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
"""


def test_parameters_left_float_are_one_line(cli, work):
    """PReLU slopes (and other parameters omse leaves float) are counted in one line with their
    share of the weight values, each listed with its reason in the --json file."""
    (work / "omse_prelu.py").write_text(PRELU_NET)
    argv = ["quantize", "omse_prelu:build", "--calib", "imgs", "--input-size", "20x24"]
    rc, out, err = cli(*argv, "--recipe", "fast")
    assert rc == 0, err
    lines = [s for s in out.splitlines() if "left float" in s]
    weights = 3 * 8 * 9 + 8 + 8 * 8 + 8 + 8 * 3 + 3  # convs and linear, with biases
    floats = 8 + 1 + 2 * 30  # the slopes, then LayerNorm's weight and bias
    pct = f"{floats / (weights + floats):.2%}"
    assert lines == [
        f"4 parameters left float ({pct} of weight values: LayerNorm (2), PReLU slopes (2)); "
        "--json lists each and why"
    ], out
    res, out = _run_json(cli, work, "prelu.json", *argv[1:], "--recipe", "fast")
    assert f"listed with reasons in {work / 'prelu.json'}" in out
    rows = {r["name"]: r for r in res["float_weights"]}
    assert sorted(rows) == ["1.weight", "3.weight", "4.bias", "4.weight"]
    assert rows["1.weight"]["kind"] == "PReLU" and rows["1.weight"]["values"] == 8
    assert res["float_share"] == pytest.approx(floats / (weights + floats))
    rc, out, _ = cli("quantize", *USER, "--recipe", "fast")  # all quantized: no line
    assert rc == 0 and "left float" not in out


DETECTOR = '''
import torch
from torch import nn


class TinyDetector(nn.Module):
    """[N, 3, 64, 64] -> [N, 4 + 3, 84]: a YOLOv8-style head over strides 8/16/32 (cx, cy, w, h
    in input pixels, 3 sigmoided class scores, no objectness)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.down4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.down5 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 7, 1)

    def forward(self, x):
        f3 = torch.relu(self.stem(x))
        f4 = torch.relu(self.down4(f3))
        f5 = torch.relu(self.down5(f4))
        outs = []
        for f, s in ((f3, 8), (f4, 16), (f5, 32)):
            y = self.head(f)
            gy, gx = torch.meshgrid(
                torch.arange(y.shape[2]), torch.arange(y.shape[3]), indexing="ij"
            )
            cx = (gx + 0.5 + torch.tanh(y[:, 0])) * s
            cy = (gy + 0.5 + torch.tanh(y[:, 1])) * s
            wh = 2 * s * torch.exp(y[:, 2:4].clamp(-2, 2))
            cls = torch.sigmoid(4 * y[:, 4:])
            outs.append(torch.cat([cx[:, None], cy[:, None], wh, cls], 1).flatten(2))
        return torch.cat(outs, 2)


def detector():
    torch.manual_seed(0)
    return TinyDetector()
'''


def test_detector_is_judged_by_its_detections(cli, work):
    """A YOLOv8-style [N, 4+C, A] output: recall/precision of FP32's detections, never the
    per-position argmax; --task forces or refuses a comparison."""
    (work / "omse_clidet.py").write_text(DETECTOR)
    argv = ["omse_clidet:detector", "--calib", "imgs", "--input-size", "64", "--eval", "held_out"]
    res, out = _run_json(cli, work, "det.json", *argv)
    assert res["task"] == "detect" and res["decoder"] == "yolov8"
    assert res["fp32_detections"] > 0 and 0 <= res["det_recall"] <= 1
    assert res["agreement"] is None and "argmax" not in out
    line = f"recall {res['det_recall']:.2f}, precision {res['det_precision']:.2f} (IoU 0.5, score 0.25)"
    assert f"detections kept vs FP32: {line} on 4 images" in out
    forced, _ = _run_json(cli, work, "det2.json", *argv, "--task", "detect")
    assert forced["det_recall"] == res["det_recall"]
    dense, out = _run_json(cli, work, "det3.json", *argv, "--task", "dense")
    assert dense["task"] == "dense" and "per-position argmax agreement" in out
    rc, _, err = cli("quantize", *argv, "--task", "classify")
    assert rc == 2 and "--task classify compares [N, classes] outputs" in _one_error_line(err)
    # a classifier is not a detector: forced detection is refused, auto keeps its top-1
    rc, _, err = cli("quantize", *USER, "--task", "detect")
    assert rc == 2 and "--task detect: outputs [[3, 3]] are not a detector" in _one_error_line(err)
    cls, _ = _run_json(cli, work, "cls.json", *USER)
    assert cls["task"] == "classify" and cls["agreement"] is not None


def test_tflite_out_int4_filters_run_in_tflm(cli, work, tiny_onnx):
    pytest.importorskip("tflite_micro")
    from omse.deploy.tflite_sim import simulate, tflm_run
    from omse.tflite_format import read_model

    out = work / "tiny.tflite"
    argv = ["--calib", "imgs", "--recipe", "fast", "--out", out, "--tflite-io", "int8"]
    rc, stdout, err = cli("quantize", tiny_onnx, *argv)
    assert rc == 0, err
    line = next(ln for ln in stdout.splitlines() if ln.startswith(f"wrote {out}"))
    assert "INT4" in line and "int8 input/output" in line
    data = out.read_bytes()
    m = read_model(data)
    shape = list(m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]].shape)
    assert shape == [1, 3, 12, 12]  # the input the ONNX model takes
    x = np.random.RandomState(0).randint(-128, 128, shape).astype(np.int8)
    assert np.array_equal(simulate(data, [x])[0], tflm_run(data, [x])[0])
    rc, _, err = cli("quantize", tiny_onnx, "--calib", "imgs", "--max-bytes", "0.6x")
    assert rc == 2 and "--out FILE.tflite" in _one_error_line(err)
    rc, _, err = cli("quantize", tiny_onnx, "--calib", "imgs", "--target", "int4", "--out",
                     work / "t4.tflite")  # fmt: skip
    assert rc == 2 and "--target tflite" in _one_error_line(err)


STEM_NET = '''
import torch
from torch import nn


class Stem(nn.Module):
    """One stem channel 2000x the others through a SiLU, read with equal weight next: no
    per-tensor 8-bit step holds that tensor (tests/transforms/test_fallback.py)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            gain = torch.ones(8)
            gain[0] = 2000.0
            self.stem.weight.mul_(gain[:, None, None, None])
            self.stem.bias.mul_(gain)
            self.body.weight[:, 0].div_(2000.0)

    def forward(self, x):
        return self.head(torch.relu(self.body(nn.functional.silu(self.stem(x)))))


def build():
    torch.manual_seed(0)
    return Stem()
'''


def test_float_fallback_is_said_in_one_line_and_recorded(cli, work):
    """The layers the float fallback gives float activations are named in one warning line and
    listed in the JSON (``float_fallback``), not among the parameters left float: their
    weights are quantized, at 8 bits."""
    (work / "omse_clistem.py").write_text(STEM_NET)
    argv = ["omse_clistem:build", "--calib", "imgs", "--input-size", "16", "--target", "int8"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = cli("quantize", *argv, "--json", work / "stem.json", "--force")
    assert rc == 0, err
    res = json.loads((work / "stem.json").read_text())
    said = [str(w.message) for w in caught if "float fallback" in str(w.message)]
    assert len(said) == 1 and "activations stay float, weights at 8 bits" in said[0]
    assert res["float_fallback"] and all(n in said[0] for n in res["float_fallback"])
    assert res["float_weights"] == [] and "left float" not in out
    assert all(res["precision"]["bits"][n] == 8 for n in res["float_fallback"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, _ = cli("quantize", *argv, "--float-fallback", "off")
    assert rc == 0 and not [w for w in caught if "float fallback" in str(w.message)]


def test_range_choice_is_said_in_one_line_and_switched_off_by_its_flag(cli, work, monkeypatch):
    """--range-choice on (the default) records the layers whose activation quantizers took the
    min-max step in the JSON (``min_max_ranges``) and says how many in one line; off keeps every
    MMSE step and says nothing. The estimate is stubbed to prefer every min-max step (what it
    measures is tested in tests/transforms/test_range_choice.py)."""
    import omse.transforms.pipeline as pipeline

    def prefer_min_max(model, layers, candidates, batches, probes=1, seed=0):
        return {
            n: {(max(len(i) - 1, 0), max(len(o) - 1, 0)): 1e-9} for n, (i, o) in candidates.items()
        }

    monkeypatch.setattr(pipeline, "range_errors", prefer_min_max)
    (work / "omse_clistem.py").write_text(STEM_NET)
    argv = ["omse_clistem:build", "--calib", "imgs", "--input-size", "16", "--target", "int8"]
    runs = {}
    for flag in ("on", "off"):
        path = work / f"ranges_{flag}.json"
        rc, out, err = cli("quantize", *argv, "--range-choice", flag, "--json", path, "--force")
        assert rc == 0, err
        runs[flag] = (json.loads(path.read_text()), out + err)
    on, off = runs["on"][0], runs["off"][0]
    assert on["config"]["activations"]["choose_range"] is True
    assert off["config"]["activations"]["choose_range"] is False
    assert off["min_max_ranges"] == {} and "activation ranges" not in runs["off"][1]
    said = [ln for ln in runs["on"][1].splitlines() if "activation ranges" in ln]
    assert on["min_max_ranges"] and set(on["min_max_ranges"]) <= set(on["precision"]["bits"])
    assert len(said) == 1
    assert f"{len(on['min_max_ranges'])} layer(s) take the min-max step" in said[0]


def test_heldout_check_against_the_8bit_weight_version_warns_on_a_collapse():
    """--eval: the quantized model's output SQNR on held-out inputs against its 8-bit-weight
    version's; a gap over HELDOUT_GAP_DB is one warning naming the layers that cost most (here
    the layer made to collapse at 4 bits), and a plan all at 8 bits needs no check."""
    from nets import Collapsing

    from omse import cli as omse_cli
    from omse.analysis.metrics import predict
    from omse.config import Budget
    from omse.transforms.pipeline import Calibration, quantize

    model = Collapsing().eval()
    calib = [torch.randn(32, 32) for _ in range(4)]
    held = torch.randn(64, 32)  # never calibrated on
    cfg = QuantConfig(budget=Budget(0.6, guard_db=None))
    cal = Calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, calib, cfg, calibration=cal)
    ref, out = predict(model, held), predict(q, held)
    vs8 = omse_cli._heldout_vs_8bit(q, cal, cfg, held, None, ref, out, False)
    assert vs8 is not None and vs8["layers_below_8bit"] >= 1
    assert vs8["gap_db"] > omse_cli.HELDOUT_GAP_DB and vs8["costliest"][0] == "b"
    assert vs8["gap_db"] == pytest.approx(vs8["sqnr_8bit_db"] - vs8["sqnr_db"], abs=0.02)
    assert vs8["out"].shape == out.shape
    # the model is restored: its 4-bit outputs again
    torch.testing.assert_close(predict(q, held), out)
    m = {"agreement": 0.5}
    vs8 |= {"agreement_8bit": 0.9}
    with pytest.warns(UserWarning, match=r"held-out .* below its 8-bit-weight version.*: b"):
        omse_cli._warn_heldout(vs8, m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        omse_cli._warn_heldout({**vs8, "gap_db": 1.0}, m)  # within the tolerance: quiet
    # every layer at 8 bits (the int8 target): nothing below 8 bits, no extra pass
    cal8 = Calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q8 = quantize(model, calib, QuantConfig(target="int8"), calibration=cal8)
    out8 = predict(q8, held)
    assert (
        omse_cli._heldout_vs_8bit(
            q8, cal8, QuantConfig(target="int8"), held, None, ref, out8, False
        )
        is None
    )
