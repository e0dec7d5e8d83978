import csv
import math

import torch
from nets import tiny_batches, tiny_net
from torch import nn

import omse
from omse.analysis.metrics import sqnr_db
from omse.analysis.report import layer_reports
from omse.config import QuantConfig
from omse.nn.layers import quantized_layers


def test_report_files_and_computed_columns(tmp_path):
    b = tiny_batches()
    q = omse.quantize(
        tiny_net(), b, QuantConfig.preset("fast", weight_bits=4, act_bits=4, extra_mac_budget=0.2)
    )
    paths = omse.report(q, b, tmp_path / "rep")
    names = sorted(p.name for p in paths)
    assert names == ["float_weights.csv", "report.csv", "report.md", "report.png"]
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    layers = quantized_layers(q)
    assert [r["name"] for r in rows] == list(layers)
    for r in rows:
        ql = layers[r["name"]]
        assert int(r["macs"]) == ql.macs
        assert float(r["weight_sqnr_db"]) == sqnr_db(ql.float_weight, ql.dequantized_weight())
        assert int(r["extra_kernels"]) == ql.extra_kernels()
        assert math.isfinite(float(r["output_sqnr_db"]))
    assert sum(int(r["extra_macs"]) for r in rows) > 0
    assert "| layer |" in (tmp_path / "rep" / "report.md").read_text()


def test_more_bits_give_higher_sqnr():
    b = tiny_batches()
    lo = {
        r.name: r
        for r in layer_reports(
            omse.quantize(tiny_net(), b, QuantConfig.preset("fast", weight_bits=3, act_bits=3)), b
        )
    }
    hi = {
        r.name: r
        for r in layer_reports(
            omse.quantize(tiny_net(), b, QuantConfig.preset("fast", weight_bits=8, act_bits=8)), b
        )
    }
    for n in lo:
        assert hi[n].weight_sqnr_db > lo[n].weight_sqnr_db
        assert hi[n].output_sqnr_db > lo[n].output_sqnr_db
        assert hi[n].input_sqnr_db > lo[n].input_sqnr_db


def test_in_place_activations_do_not_corrupt_the_reference():
    m = tiny_net()
    m.act1.inplace = True  # the float pass's stored output must survive the in-place ReLU
    b = tiny_batches()
    rows = {
        r.name: r
        for r in layer_reports(
            omse.quantize(m, b, QuantConfig.preset("fast", weight_bits=8, act_bits=8)), b
        )
    }
    assert rows["conv1"].output_sqnr_db > 25


def test_weights_left_in_float_are_listed_with_share_and_reason(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    b = [torch.randn(4, 6)]
    cfg = QuantConfig(4, 8, bias_correction=False, extra_mac_budget=0.0, skip=("2",))
    q = omse.quantize(model, b, cfg)
    paths = omse.report(q, b, tmp_path / "rep")
    rows = list(csv.DictReader((tmp_path / "rep" / "float_weights.csv").open()))
    total = 6 * 8 + 8 + 8 + 8 + 8 * 3 + 3
    got = {r["name"]: (int(r["values"]), float(r["share"]), r["reason"]) for r in rows}
    assert set(got) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    assert got["2.weight"][:2] == (24, 24 / total)
    assert "skipped" in got["2.weight"][2] and "normalization" in got["1.weight"][2]
    md = next(p for p in paths if p.name == "report.md").read_text()
    assert "## Weights left in float" in md and f"{(8 + 8 + 24 + 3) / total:.2%}" in md
