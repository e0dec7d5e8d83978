"""Learned rounding (omse.transforms.learned): never worse than nearest rounding on the layer's
output error, better on layers where rounding matters, deterministic, and every code one
rounding step from W/s (down or up) within the grid."""

from __future__ import annotations

import warnings

import pytest
import torch
from nets import tiny_batches, tiny_net
from torch import nn

import omse
from omse.config import LayerConfig
from omse.nn.layers import QuantizedLayer
from omse.transforms.learned import learned_rounding
from omse.transforms.statistics import Needs, collect


def _layer_and_stats(seed: int = 0, correlated: bool = True):
    torch.manual_seed(seed)
    lin = nn.Linear(32, 16)
    q = QuantizedLayer(lin, "lin", LayerConfig(weight_bits=3, act_bits=None))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(256, 32, generator=g)
    if correlated:  # strongly correlated inputs: where rounding choices interact
        x = x @ (torch.eye(32) + 0.8 * torch.randn(32, 32, generator=g))
    model = nn.Sequential(q)
    st = collect(model, {"lin": q}, list(x.split(64)), Needs(patch_moments=True))["lin"]
    return q, st, x


def _rel_output_error(q: QuantizedLayer, x: torch.Tensor) -> float:
    w = q.float_weight
    e = x @ (w - q.dequantized_weight()).T
    return float((e**2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_rounding_lowers_the_output_error(seed):
    q, st, x = _layer_and_stats(seed)
    nearest_codes = q.terms()[0][0].clone()
    before = _rel_output_error(q, x)
    info = learned_rounding(q, st, iters=300)
    after = _rel_output_error(q, x)
    assert info["nearest"] == pytest.approx(before, rel=1e-3)
    assert info["learned"] == pytest.approx(after, rel=1e-3)
    assert after < before * 0.9  # correlated inputs: learning pays
    codes, scale, _ = q.terms()[0]
    ratio = q.float_weight / scale
    # each code is floor(W/s) or floor(W/s) + 1, clamped to the grid
    lo = torch.clamp(torch.floor(ratio), q.w_grid.qmin, q.w_grid.qmax)
    hi = torch.clamp(torch.floor(ratio) + 1, q.w_grid.qmin, q.w_grid.qmax)
    assert bool(((codes == lo) | (codes == hi)).all())
    assert not torch.equal(codes, nearest_codes)


def test_learned_rounding_is_deterministic():
    a, st_a, _ = _layer_and_stats(3)
    b, st_b, _ = _layer_and_stats(3)
    learned_rounding(a, st_a, iters=100)
    learned_rounding(b, st_b, iters=100)
    assert torch.equal(a.terms()[0][0], b.terms()[0][0])


def test_pipeline_learned_rounding_and_config():
    cfg = omse.QuantConfig.preset(
        "fast",
        weight_bits=4,
        act_bits=8,
        rounding="learned",
        rounding_scope="layer",
        rounding_iters=50,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = omse.Calibration()
        q = omse.quantize(tiny_net(), tiny_batches(), cfg, calibration=cal)
    info = cal.corrections["learned_rounding"]
    assert set(info) == set(omse.quantized_layers(q))
    assert all(v["learned"] <= v["nearest"] + 1e-12 for v in info.values() if v)
    assert omse.QuantConfig.preset("fast", output_aware=True).rounding == omse.GPTQ()
    with pytest.raises(omse.ConfigError, match="rounding"):
        omse.QuantConfig.preset("fast", rounding="stochastic")
    with pytest.raises(omse.ConfigError, match="contradicts"):
        omse.QuantConfig.preset("fast", rounding="learned", output_aware=True)
