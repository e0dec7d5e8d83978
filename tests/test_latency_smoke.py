"""benchmarks/latency.py end to end on one zoo net with tiny settings (the JSON it writes)."""

import importlib.util
import json

import pytest
from benchmark_loader import load_benchmark

MODEL = "fmnist-resnet20"


@pytest.fixture(scope="module")
def latency():
    return load_benchmark("latency")


def test_latency_main_writes_json(latency, tmp_path, one_torch_thread):
    why = latency._available(MODEL)
    if why:
        pytest.skip(f"{MODEL}: {why}")
    has_ov = importlib.util.find_spec("openvino") is not None
    argv = [
        "--models",
        MODEL,
        "--batches",
        "1",
        "4",
        "--rounds",
        "3",
        "--warmup",
        "2",
        "--threads",
        "1",
        "--recipes",
        "w4a8",
        "--targets",
        "int8",
        "int4",
        "--calib",
        "16",
        "--eval-fmnist",
        "64",
        "--silent",
        "--out-dir",
        str(tmp_path),
    ]
    if not has_ov:
        argv += ["--runtimes", "torch", "ort"]
    assert latency.main(argv) == 0

    data = json.loads((tmp_path / "latency.json").read_text())
    env = data["env"]
    assert env["threads"] == 1 and env["batches"] == [1, 4]
    for k in ("cpu", "cpu_flags", "onnxruntime", "torch", "load_average_before", "api"):
        assert k in env
    assert set(env["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni"}
    assert env["api"]["quant_config"] and env["api"]["export"]

    m = data["models"][MODEL]
    graphs = m["graphs"]
    assert m["errors"] == {} or set(m["errors"]) <= {"ortq_w8a8", "ov_ortq_w8a8"}, m["errors"]
    assert {"fp32", "omse_w4a8_int8", "omse_w4a8_int4"} <= set(graphs)
    g = graphs["omse_w4a8_int8"]
    assert g["file_bytes"] > 0 and g["recipe"] == "w4a8" and g["target"] == "int8"
    for info in graphs.values():
        o = info["ort"]
        assert o["integer_kernels"] >= 0 and o["float_conv_gemm_matmul"] >= 0
        assert isinstance(o["float_between_integer_kernels"], list)
        assert all({"op", "name"} <= set(b) for b in o["float_between_integer_kernels"])
    assert graphs["fp32"]["ort"]["integer_kernels"] == 0
    assert g["ort"]["integer_kernels"] > 0  # int8 target: onnxruntime fuses integer kernels
    if "ortq_w8a8" in graphs:
        assert "pre_process" in graphs["ortq_w8a8"]

    for bs in ("1", "4"):
        row = m["latency"][bs]
        assert {"torch_fp32", "ort_fp32", "ort_omse_w4a8_int8"} <= set(row)
        assert row["ort_fp32"]["speedup_vs_ort_fp32"] == pytest.approx(1.0)
        for v in row.values():
            assert v["runs"] == 3 and 0 < v["min_ms"] <= v["median_ms"] <= v["max_ms"]
            assert v["speedup_vs_ort_fp32"] > 0
        if has_ov and env["openvino_status"] == "ok":
            assert row["ov_fp32"]["speedup_vs_ov_fp32"] == pytest.approx(1.0)
            assert "ov_omse_w4a8_int8" in row

    p = m["parity"]
    assert p["n_inputs"] == 64
    for k in ("ort_fp32_vs_fp32", "ort_omse_w4a8_int8_vs_sim", "ort_omse_w4a8_int8_vs_fp32"):
        assert 0.0 <= p[k]["top1_agreement"] <= 1.0
    assert p["ort_fp32_vs_fp32"]["top1_agreement"] == 1.0
    assert p["ort_omse_w4a8_int8_vs_sim"]["top1_agreement"] >= 0.95

    sizes = json.loads((tmp_path / "sizes.json").read_text())["models"][MODEL]
    assert 0 < sizes["checkpoint_bytes"] < sizes["fp32_state_dict_bytes"] / 4
    assert set(sizes["onnx_bytes"]) == set(graphs)
