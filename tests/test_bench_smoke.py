"""The `make bench` code path (benchmarks/bench.py, render_readme.py) on a tiny model."""

import json
from pathlib import Path

import pytest
import torch
from benchmark_loader import load_benchmark
from torch import nn

from omse.core.ranges import MMSE


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench")


def _tiny_task(bench):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    x = torch.randn(80, 1, 12, 12)
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:8] = (labels[:8] + 1) % 5  # FP32 is not perfect
    calib = list(torch.randn(32, 1, 12, 12).split(16))
    info = {"calibration": "32 random", "eval": "80 random", "primary": "top1"}
    return bench.Task("tiny", model, calib, x, labels, None, 40, info)


def test_bench_grid_and_order(bench):
    grid = bench.bench_configs()
    assert len(grid) == 4 * 5 * 2
    assert len({c.key for c in grid}) == len(grid)
    order = bench.run_order(grid)
    assert sorted(c.key for c in order) == sorted(c.key for c in grid)
    assert all(c.granularity == "per_channel" for c in order[:20])
    cfg = bench.BenchConfig("W4A8", "mmse+res10", "per_channel").build()
    assert cfg.residuals.extra_mac_budget == pytest.approx(0.10)
    assert cfg.weights.method == MMSE()
    assert bench.BenchConfig("W4A32", "aciq", "per_tensor").build().activations.bits is None


def test_run_task_writes_json_table_and_plot(bench, tmp_path):
    task = _tiny_task(bench)
    configs = [
        bench.BenchConfig("W8A8", "minmax", "per_tensor"),
        bench.BenchConfig("W4A8", "mmse", "per_channel"),
        bench.BenchConfig("W4A4", "percentile", "per_channel"),
        bench.BenchConfig("W4A32", "aciq", "per_tensor"),
        bench.BenchConfig("W4A8", "mmse+res10", "per_channel"),
        bench.BenchConfig("W4A8", "nonsense", "per_channel"),  # recorded as n/a, no crash
    ]
    out = tmp_path / "bench_tiny.json"
    res = bench.run_task(task, configs, out, log=lambda s: None)
    saved = json.loads(out.read_text())
    assert saved["rows"] == res["rows"]
    rows = {r["key"]: r for r in res["rows"]}
    assert rows["FP32"]["top1"] == pytest.approx(0.9) and rows["FP32"]["agreement"] == 1.0
    assert rows["W4A8/nonsense/per_channel"]["status"] == "n/a"
    assert "ConfigError" in rows["W4A8/nonsense/per_channel"]["error"]
    w8 = rows["W8A8/minmax/per_tensor"]
    assert w8["status"] == "ok" and w8["agreement"] > 0.9
    for r in res["rows"]:
        if r["status"] == "ok":
            assert 0.0 <= r["agreement"] <= 1.0 and r["kl"] >= 0.0
            assert r["top1_drop"] == pytest.approx(rows["FP32"]["top1"] - r["top1"])
    # table rows follow the grid order, whatever order they ran in
    keys = [r["key"] for r in res["rows"]]
    assert keys[0] == "FP32" and keys.index("W8A8/minmax/per_tensor") < keys.index(
        "W4A8/mmse/per_channel"
    )

    # --resume keeps measured rows and reruns only the failed one
    calls = []
    bench.run_task(task, configs, out, resume=True, log=calls.append)
    assert len([c for c in calls if c.startswith("  ")]) == 1
    assert len(json.loads(out.read_text())["rows"]) == len(res["rows"])

    table = bench.markdown_table(res)
    assert "| W4A8 | mmse |" in table and "n/a" in table
    png = bench.plot(bench.load_results(tmp_path, ["tiny"]), tmp_path / "bench.png")
    assert png.is_file() and png.stat().st_size > 5000


def test_render_readme(bench, tmp_path):
    render = load_benchmark("render_readme")
    task = _tiny_task(bench)
    bench.run_task(
        task,
        [bench.BenchConfig("W4A8", "mmse", "per_channel")],
        tmp_path / "bench_tiny.json",
        log=lambda s: None,
    )
    (tmp_path / "peers.json").write_text(
        json.dumps({"rows": [{"library": "x", "top1": 0.5, "note": "a|b"}], "model": "m"})
    )
    (tmp_path / "latency.json").write_text(json.dumps([{"backend": "onnx", "ms": 1.25}]))
    text = render.render(tmp_path)
    assert "**Summary**" in text and "| tiny | mmse |" in text
    assert "**tiny**" in text
    assert "| library | top1 | note |" in text and "a\\|b" in text
    assert "| backend | ms |" in text and "1.25" in text
    # the latency section is the latency benchmark's own tables, from its real JSON
    real = Path(__file__).resolve().parents[1] / "results" / "latency.json"
    (tmp_path / "latency.json").write_text(real.read_text())
    text = render.render(tmp_path)
    assert "| model | batch | graph | torch ms | ORT ms | ORT vs ORT FP32 |" in text
    assert "| efficientnet-lite0 | 1 | omse_w4a8def_int8 |" in text
    assert render.main(["--results", str(tmp_path / "empty")]) == 1
