"""Network sensitivity (omse.transforms.sensitivity) and the ``network`` residual criterion:
brute force first (the model rebuilt with one layer's quantized weights), then what the
criterion is for (residual tensors go where the model's output feels them)."""

from __future__ import annotations

import copy

import pytest
import torch
from nets import tiny_batches, tiny_net
from torch import nn

import omse
from omse.config import QuantConfig
from omse.nn.layers import quantized_layers
from omse.transforms.residuals import select_residuals
from omse.transforms.sensitivity import network_errors
from omse.transforms.statistics import Needs, collect


def _weights_only(model, batches, **kw):
    cfg = QuantConfig.preset("fast", weight_bits=3, act_bits=None, **kw)
    return omse.quantize(model, batches, cfg, fold_bn=False)


def test_network_errors_match_the_model_rebuilt_with_one_quantized_layer():
    model, batches = tiny_net(), tiny_batches()
    q = _weights_only(model, batches)
    layers = quantized_layers(q)
    got = network_errors(q, layers, batches)
    assert set(got) == set(layers)
    with torch.no_grad():
        ref = [model(b).double() for b in batches]
        energy = sum(float((r * r).sum()) for r in ref)
        for name, ql in layers.items():
            m = copy.deepcopy(model)
            m.get_submodule(name).weight.data = ql.dequantized_weight()
            err = sum(float(((m(b).double() - r) ** 2).sum()) for b, r in zip(batches, ref))
            assert got[name] == pytest.approx(err / energy, rel=1e-4, abs=1e-12), name
    assert all(ql.quant_enabled for ql in layers.values())  # flags restored


def test_network_errors_restore_a_float_layer_and_read_dict_outputs():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 3)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x), "n": torch.ones(1, dtype=torch.long)}

    torch.manual_seed(0)
    batches = [torch.randn(5, 6) for _ in range(3)]
    q = _weights_only(DictOut().eval(), batches)
    layers = quantized_layers(q)
    layers["b"].set_quant_enabled(False)
    got = network_errors(q, layers, batches)
    assert not layers["b"].quant_enabled and layers["a"].quant_enabled
    assert got["a"] > 0 and got["b"] > 0


class Branches(nn.Module):
    """Two parallel Linears of the same statistics; the model's output reads one of them 100
    times louder: their relative layer-output errors are alike, their effect on the output not."""

    def __init__(self):
        super().__init__()
        self.loud, self.quiet = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return torch.cat([100.0 * self.loud(x), 0.01 * self.quiet(x)], 1)


def test_network_criterion_gives_the_budget_to_the_layer_the_output_feels():
    torch.manual_seed(0)
    model = Branches().eval()
    batches = [torch.randn(32, 16) for _ in range(2)]
    picked = {}
    for crit in ("output", "network"):
        q = _weights_only(model, batches, extra_mac_budget=0.25, residual_criterion=crit)
        picked[crit] = {n: ql.extra_kernels() for n, ql in quantized_layers(q).items()}
    # half the budget's kernels: the layer-relative ranking splits them between the branches,
    # the network ranking gives them all to the loud one
    assert picked["output"]["quiet"] > 0
    assert picked["network"] == {"loud": 8, "quiet": 0}


def test_network_criterion_needs_the_sensitivities():
    model, batches = tiny_net(), tiny_batches()
    q = _weights_only(model, batches)
    layers = quantized_layers(q)
    stats = collect(q, layers, batches, Needs(patch_moments=True))
    with pytest.raises(ValueError, match="sensitivity"):
        select_residuals(layers, stats, 0.1, "network")


def test_residual_kernels_stay_within_their_bytes():
    """With a byte allowance (``target="int4"`` under a budget) the kernels' bytes, each layer's
    once-per-term cost included, stay within it: here three kernels and one layer's scatter."""
    model, batches = tiny_net(), tiny_batches()
    q = _weights_only(model, batches)
    layers = quantized_layers(q)
    stats = collect(q, layers, batches, Needs(patch_moments=True))
    cost = {n: (10.0, 7.0) for n in layers}
    counts = select_residuals(layers, stats, 1.0, "output", 2, None, 37.0, cost)
    spent = sum(10 * c + 7 for c in counts.values() if c)
    assert 0 < spent <= 37
    assert sum(counts.values()) == 3  # the first layer's 7 + 3 kernels fill the allowance
    with pytest.raises(ValueError, match="together"):
        select_residuals(layers, stats, 1.0, max_bytes=5.0)
