"""The package as users install it: the wheel builds, installs into a fresh virtual environment
and works there with no other step (``omse --help``, a quantization, an export).

The wheel is built from a copy of the sources (``pyproject.toml``, ``README.md``, ``LICENSE``,
``src/``) with ``python -m build --wheel --no-isolation`` (the build backend this environment
has; no network). The fresh environment reuses this one's installed dependencies (torch, onnx,
...) through a ``.pth`` path entry rather than installing them again: its own site-packages,
where the wheel goes, comes first, and pip resolves the wheel's dependencies with ``--no-index``
from what that path provides (a missing or wrong dependency fails the install). This
environment's editable omse is not visible there (its ``.pth`` hook is not processed through
a path entry); the test checks that ``omse`` is imported from the fresh environment.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import omse

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # ~15 s; make test and .ci/run run it

TINYNET = """
import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    ).eval()
"""


def _run(cmd, cwd, env, timeout=300):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("build", reason="the wheel test needs `build` (the test extra)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
    _run(cmd + [str(src)], src, env)
    (whl,) = out.glob("omse-*.whl")
    return whl


def test_wheel_contents(wheel):
    assert wheel.name.startswith(f"omse-{omse.__version__}-"), "the one version string"
    names = zipfile.ZipFile(wheel).namelist()
    assert f"omse-{omse.__version__}.dist-info/licenses/LICENSE" in names
    assert "omse/zoo/weights/fmnist-resnet20.safetensors" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    meta = zipfile.ZipFile(wheel).read(f"omse-{omse.__version__}.dist-info/METADATA").decode()
    assert f"Version: {omse.__version__}" in meta and "License-Expression: Apache-2.0" in meta
    for extra in ("models", "onnx", "tflite", "openvino", "transformers", "peers", "docs"):
        assert f"Provides-Extra: {extra}" in meta


def test_wheel_installs_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, dict(os.environ))
    py, omse_bin = venv / "bin" / "python", venv / "bin" / "omse"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    site = _run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    )
    # this environment's dependencies, after the fresh site-packages (see the module docstring)
    Path(site.stdout.strip(), "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-index", str(wheel)], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    where = _run([py, "-c", "import omse; print(omse.__file__, omse.__version__)"], work, env)
    assert str(venv) in where.stdout and omse.__version__ in where.stdout

    assert "quantize" in _run([omse_bin, "--help"], work, env).stdout

    import numpy as np
    from PIL import Image

    (work / "tinynet.py").write_text(TINYNET)
    (work / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
            work / "imgs" / f"{i}.png"
        )
    data = ["--calib", "imgs", "--input-size", "32", "--recipe", "fast"]
    q = _run(
        [omse_bin, "--threads", "1", "quantize", "tinynet:build", *data, "--target", "int8"]
        + ["--out", "q.onnx"]
        + ["--json", "q.json"],
        work,
        env,
    )
    assert "agreement with FP32" in q.stdout and (work / "q.onnx").is_file()
    assert json.loads((work / "q.json").read_text())["config"]["target"] == "int8"
    _run(
        [omse_bin, "--threads", "1", "export", "tinynet:build", *data, "--out", "e.onnx"], work, env
    )
    run = (
        "import numpy as np, onnxruntime as ort\n"
        "for f in ('q.onnx', 'e.onnx'):\n"
        "    s = ort.InferenceSession(f, providers=['CPUExecutionProvider'])\n"
        "    y = s.run(None, {s.get_inputs()[0].name: np.zeros((2, 3, 32, 32), np.float32)})\n"
        "    assert y[0].shape == (2, 4), y[0].shape\n"
    )
    _run([py, "-c", run], work, env)
