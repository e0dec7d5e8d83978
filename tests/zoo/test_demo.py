"""The default job (``make demo``) runs end to end on a few views and writes its JSON and report."""

from __future__ import annotations

import json

import pytest

from omse.zoo.demo import demo_report, run_demo


@pytest.mark.slow
@pytest.mark.models
def test_demo_quick_writes_the_table_and_the_report(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("foolbox")
    out = tmp_path / "demo.json"
    result = run_demo(
        n_calib=8, n_views=10, out_json=out, progress=False, quick=True, log=lambda s: None
    )
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["method"] == "fp32" and len(saved["rows"]) == len(result["rows"]) > 2
    assert all(isinstance(r["method"], str) for r in saved["rows"])
    paths = demo_report(calib_size=8, out_dir=tmp_path / "report")
    assert {p.suffix for p in paths} == {".md", ".csv", ".png"}
