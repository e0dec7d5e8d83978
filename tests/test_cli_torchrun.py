"""``torchrun --nproc-per-node 2 -m omse quantize``: the checkpoint and results of 2 ranks equal
those of one process byte for byte, and rank 0 alone prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["--threads", "1", "quantize", "fmnist-resnet20", "--calib-size", "32"]
ARGS += ["--budget", "0.1", "--bias-correction"]


def _run(cmd: list[str], out: Path, tag: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    files = ["--json", str(out / f"{tag}.json"), "--out", str(out / f"{tag}.safetensors")]
    res = subprocess.run(cmd + ARGS + files, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_process_writes(tmp_path):
    one = _run([sys.executable, "-m", "omse"], tmp_path, "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    two = _run(torchrun + ["--master-port", "29517", "-m", "omse"], tmp_path, "two")
    assert (tmp_path / "one.safetensors").read_bytes() == (
        tmp_path / "two.safetensors"
    ).read_bytes()
    a, b = (json.loads((tmp_path / f"{t}.json").read_text()) for t in ("one", "two"))
    for r in (a, b):
        r.pop("calib_seconds")
    assert a == b and a["calib_batches"] == 4
    assert two.count("agreement with FP32") == 1 and one.count("agreement with FP32") == 1


def test_python_dash_m_omse_runs_the_cli():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    res = subprocess.run(
        [sys.executable, "-m", "omse", "models"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "fmnist-resnet20" in res.stdout
