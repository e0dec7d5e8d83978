"""benchmarks/detector_latency.py end to end on NanoDet-m with tiny settings (the JSON it writes);
skips without the project's shared data (``../shared/data`` or ``$OMSE_DATA``)."""

import json
import os
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

DATA = Path(
    os.environ.get("OMSE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


@pytest.mark.skipif(
    not (DATA / "detection" / "nanodet_m").is_dir(), reason="needs ../shared/data (or $OMSE_DATA)"
)
def test_detector_latency_main_writes_json(tmp_path, one_torch_thread):
    bench = load_benchmark("detector_latency")
    out = tmp_path / "detector_latency.json"
    argv = ["--data", str(DATA), "--models", "nanodet", "--threads", "1", "--rounds", "3"]
    argv += ["--warmup", "1", "--seconds", "1", "--calib", "2", "--images", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["skipped"] == [] and data["machine"]["threads"] == 1
    (m,) = data["models"]
    assert m["model"] == "nanodet" and m["calib_images"] == 2 and m["held_out_images"] == 1
    graphs = m["graphs"]
    assert set(graphs) == {"fp32", "ortq_w8a8", "omse_default_int8"}
    assert graphs["fp32"]["integer_kernels"] == 0
    assert graphs["omse_default_int8"]["integer_kernels"] > 0  # integer kernels in onnxruntime
    assert graphs["ortq_w8a8"]["integer_kernels"] > 0
    for k in ("ort_fp32", "ort_ortq_w8a8", "ort_omse_default_int8"):
        v = m["latency"][k]
        assert v["runs"] == 3 and 0 < v["min_ms"] <= v["median_ms"] <= v["max_ms"]
    assert m["latency"]["ort_fp32"]["speedup_vs_fp32"] == pytest.approx(1.0)
    assert m["omse_vs_simulation_max_abs"] >= 0.0
