"""benchmarks/ocr.py without the models: its tasks' metrics on known masks and labels, the
configs it writes out, and the table (failed rows included)."""

from pathlib import Path

import numpy as np
import pytest
from benchmark_loader import load_benchmark

import omse
from omse.zoo import ocr


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ocr")


def test_det_task_batches_and_iou(bench):
    cal = ocr.text_pages(2, "calib", 0, 64, 64)
    ev = ocr.text_pages(2, "eval", 1, 64, 64)
    task = bench._det_task(Path("det.onnx"), cal, ev, 2, 64)
    assert [b.shape for b in task.calib] == [(2, 3, 64, 64)]
    maps = np.zeros((2, 1, 64, 64), np.float32)
    maps[0, 0, :8] = 0.9  # page 0: 8 rows above the threshold
    maps[1, 0, :4] = 0.31
    ref = task.summarize([maps])
    other = maps.copy()
    other[0, 0, 4:8] = 0.29  # below DB's 0.3: half of page 0's rows
    got = task.compare(task.summarize([other]), ref)
    assert got["iou"] == pytest.approx((0.5 + 1.0) / 2) and got["iou_min"] == 0.5
    assert task.compare(ref, ref) == {"iou": 1.0, "iou_min": 1.0}


def test_cls_task_turns_every_other_line(bench):
    lines = ocr.text_lines(8, "eval", 1)
    task = bench._cls_task(Path("cls.onnx"), ocr.text_lines(8, "calib", 0), lines, 8)
    probs = np.tile([[0.9, 0.1], [0.2, 0.8]], (4, 1)).astype(np.float32)
    pred = task.summarize([probs])
    assert task.truth(pred) == {"accuracy_vs_labels": 1.0}
    assert task.compare(pred, 1 - pred) == {"top1_agreement": 0.0}
    with pytest.raises(SystemExit, match="batches of 3"):
        bench._batches(np.zeros((8, 1)), 3)


def test_configs_write_the_fields_they_rely_on(bench):
    cfg = bench._config(bench.ROWS["W4A8 recipe"], "int8")
    assert (cfg.weights.bits, cfg.activations.bits, cfg.residuals.extra_mac_budget) == (4, 8, 0.1)
    assert cfg.bias_correction and cfg.target == "int8" and cfg.rounding == omse.Nearest()
    plain = bench._config(bench.ROWS["W4A8 MMSE"], "int4")
    assert plain.residuals is None and not plain.bias_correction


def test_table_shows_numbers_and_failures(bench):
    ok = {"text_agreement": 0.9, "cer": 0.01}
    rows = [
        {
            "model": "rec",
            "row": "W4A8 recipe",
            "target": "int4",
            "sim_vs_fp32": ok,
            "ort_vs_fp32": ok,
            "ort_vs_sim": {"text_agreement": 1.0, "cer": 0.0},
            "quantize_seconds": 12.3,
            "weights_quantized_fraction": 0.616,
        },
        {"model": "rec", "row": "W4A8 recipe", "target": "int8", "error": "quantize: X"},
    ]
    t = bench.table(rows)
    assert "| rec | W4A8 recipe | 90.0% (CER 0.010) | 90.0% (CER 0.010) (100.0% (CER 0.000))" in t
    assert "failed: quantize: X" in t and "| 12 / - | 61.6% |" in t
