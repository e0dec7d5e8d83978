"""The command line on bad input: one clear line on stderr, exit code 2, no traceback (``--debug``
shows it); inputs are never modified; outputs are atomic and never silently overwritten."""

import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from omse.cli import main
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
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["--threads", "0", "models"], "--threads must be >= 1"),
        (["export", "x", "--format", "tflite", "--out", "o"], "invalid choice: 'tflite'"),
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
