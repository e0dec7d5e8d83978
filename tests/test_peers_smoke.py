"""Smoke test of benchmarks/peers.py: the omse-side code path, tables, JSON and PNG writing on a
tiny conv model (peers only where installed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    path = ROOT / "benchmarks" / "peers.py"
    spec = importlib.util.spec_from_file_location("omse_bench_peers", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.fixture()
def workload(peers):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 12, 12, generator=g)
    model = _tiny()
    with torch.no_grad():
        labels = model(x[64:]).argmax(1)
    return peers.Workload("tiny", model, list(x[:64].split(32)), x[64:], labels, eval_batch=16)


def test_omse_rows_tables_json_png(peers, workload, tmp_path):
    rows = []
    for s in ("W4A8", "W8A8", "W4A32"):
        wb, ab = peers.SETTINGS[s]
        row = peers.evaluate(
            workload, "omse", "0", "mmse", peers.run_omse(), wb, ab, {}, log=lambda m: None
        )
        assert row.refused is None, row.refused
        assert 0.0 <= row.agreement <= 1.0 and row.kl >= 0.0 and row.top1 is not None
        assert row.calib_seconds >= 0 and row.n_eval == 32 and row.n_calib == 64
        assert row.kwargs["QuantConfig"]["weights"]["bits"] == wb
        rows.append(row)
    w8 = next(r for r in rows if r.weight_bits == 8)
    assert w8.agreement >= 0.9
    # a refusal is a row with no numbers, shown as such
    refused = peers.Row("nncf", "3.4.0", "ptq", "tiny", 4, 4, refused="HW config refuses A4")
    rows.append(refused)

    out = tmp_path / "peers.json"
    peers.write_json(rows, out)
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == 4
    for key in ("tool", "version", "config", "model", "weight_bits", "act_bits", "agreement"):
        assert key in data[0]
    assert {"top1", "kl", "calib_seconds", "refused", "notes"} <= set(data[0])
    assert [r.key for r in peers.read_json(out)] == [r.key for r in rows]

    md = peers.markdown_tables(rows, ["W4A32", "W4A8", "W4A4", "W8A8"])
    assert "### tiny: top-1 agreement with FP32" in md
    assert "| omse | mmse |" in md and "refused" in md
    png = tmp_path / "peers.png"
    peers.plot(rows, ["W4A32", "W4A8", "W4A4", "W8A8"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_omse_missing_option_is_a_refusal(peers, workload):
    row = peers.evaluate(
        workload,
        "omse",
        "0",
        "bad",
        peers.run_omse(budget=5.0),  # outside [0, 2]: ConfigError -> refused row
        4,
        8,
        {},
        log=lambda m: None,
    )
    assert row.agreement is None and "not available" in row.refused


def test_run_in_process_skips_missing_and_done(peers, workload, monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "load_workload", lambda name, quick=False: workload)
    args = Namespace(quick=True, adaround_iters=None, aimet_path=None)
    rows, meta = peers.run_in_process(
        ["tiny"], ["omse"], ["W4A8"], args, [], tmp_path / "rows.json", log=lambda m: None
    )
    assert {(r.tool, r.config, r.setting) for r in rows} == {
        ("omse", "mmse", "W4A8"),
        ("omse", "mmse+bc", "W4A8"),
        ("omse", "mmse+res10+bc", "W4A8"),
    }
    again, _ = peers.run_in_process(
        ["tiny"], ["omse"], ["W4A8"], args, rows, None, log=lambda m: None
    )
    assert [r.key for r in again] == [r.key for r in rows]  # nothing rerun


def test_brevitas_plain_on_tiny(peers, workload):
    pytest.importorskip("brevitas")
    pytest.importorskip("brevitas_examples")
    row = peers.evaluate(
        workload,
        "brevitas",
        "0.13.4",
        "ptq-mse",
        peers.run_brevitas(best=False),
        8,
        8,
        {},
        log=lambda m: None,
    )
    assert row.refused is None, row.refused
    assert row.agreement >= 0.8
    assert "QuantConv2d" in row.notes
