import copy

import pytest
import torch
import torch.nn.functional as F
from nets import tiny_batches, tiny_net
from torch import nn

import omse
from omse.config import QuantConfig
from omse.core.primitives import dequantize
from omse.nn.layers import quantized_layers
from omse.transforms.equalize import equalize
from omse.transforms.rounding import gptq_terms
from omse.transforms.statistics import Needs, collect


def _budgeted(budget, criterion="output", max_terms=2, bits=3):
    cfg = QuantConfig.preset(
        "fast",
        weight_bits=bits,
        act_bits=8,
        extra_mac_budget=budget,
        residual_criterion=criterion,
        max_terms=max_terms,
    )
    return omse.quantize(tiny_net(), tiny_batches(), cfg)


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.1, 0.25, 1.0, 2.0])
@pytest.mark.parametrize("criterion", ["output", "weight", "network"])
def test_budget_never_exceeded(budget, criterion):
    q = _budgeted(budget, criterion, max_terms=3)
    layers = quantized_layers(q)
    total = sum(ql.macs for ql in layers.values())
    extra = sum(ql.extra_macs() for ql in layers.values())
    assert extra <= budget * total + 1e-9
    if budget >= 0.1:
        assert extra > 0


def test_sum_of_integer_convolutions_equals_simulated_layer():
    q = _budgeted(1.0)
    layers = quantized_layers(q)
    ql = layers["dw"]
    assert ql.n_terms == 2 and ql.extra_kernels() > 0
    x = torch.rand(2, 8, 12, 12)
    xq = ql.quantize_input(x)
    a_int = torch.round(xq / ql.act_scale)  # integer activations
    conv = ql.layer
    total = 0
    for codes, scale, _mask in ql.terms():
        # integer convolution, accumulated exactly (float64 holds the int32 range), then scaled
        acc = F.conv2d(
            a_int.double(),
            codes.double(),
            None,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        total = total + acc * (scale.reshape(1, -1, 1, 1).double() * float(ql.act_scale))
    total = total + conv.bias.double().reshape(1, -1, 1, 1)
    with torch.no_grad():
        sim = ql(x).double()
    assert torch.allclose(total, sim, rtol=1e-5, atol=1e-5)


def test_error_never_rises_when_a_term_is_added():
    q1 = _budgeted(0.0)
    q2 = _budgeted(1.0, max_terms=2)
    q3 = _budgeted(2.0, max_terms=3)
    for name in quantized_layers(q1):
        errs = []
        for q in (q1, q2, q3):
            ql = quantized_layers(q)[name]
            errs.append(
                float(
                    ((ql.float_weight - ql.dequantized_weight()) ** 2)
                    .reshape(ql.float_weight.shape[0], -1)
                    .sum(1)
                    .max()
                )
            )
            # per kernel: never worse than one term
            e = (
                ((ql.float_weight - ql.dequantized_weight()) ** 2)
                .reshape(ql.float_weight.shape[0], -1)
                .sum(1)
            )
            ref = quantized_layers(q1)[name]
            e1 = (
                ((ref.float_weight - ref.dequantized_weight()) ** 2)
                .reshape(ref.float_weight.shape[0], -1)
                .sum(1)
            )
            assert (e <= e1 + 1e-12).all()
        assert errs[1] <= errs[0] + 1e-12 and errs[2] <= errs[1] + 1e-12


def test_output_criterion_targets_output_error():
    """Same budget: the output criterion leaves a lower layer-output error than the weight one."""
    b = tiny_batches()
    res = {}
    for crit in ("output", "weight"):
        q = omse.quantize(
            tiny_net(),
            b,
            QuantConfig.preset(
                "fast", weight_bits=3, act_bits=None, extra_mac_budget=0.3, residual_criterion=crit
            ),
        )
        layers = quantized_layers(q)
        st = collect(q, layers, b, Needs(patch_moments=True))
        tot = 0.0
        for name, ql in layers.items():
            G = st[name].H.shape[0]
            e = (
                (ql.float_weight - ql.dequantized_weight())
                .double()
                .reshape(G, -1, st[name].H.shape[-1])
            )
            w = ql.float_weight.double().reshape(G, -1, st[name].H.shape[-1])
            M = st[name].second_moment
            tot += float(
                torch.einsum("grk,gkj,grj->", e, M, e) / torch.einsum("grk,gkj,grj->", w, M, w)
            )
        res[crit] = tot
    assert res["output"] <= res["weight"]


def test_gptq_reduces_layer_output_error():
    b = tiny_batches()
    q = omse.quantize(tiny_net(), b, QuantConfig.preset("fast", weight_bits=3, act_bits=None))
    layers = quantized_layers(q)
    st = collect(q, layers, b, Needs(patch_moments=True))
    for name, ql in layers.items():
        M = st[name].second_moment
        G = M.shape[0]

        def out_err(ql=ql, G=G, M=M):
            e = (ql.float_weight - ql.dequantized_weight()).double().reshape(G, -1, M.shape[-1])
            return float(torch.einsum("grk,gkj,grj->", e, M, e))

        before = out_err()
        gptq_terms(ql, st[name])
        assert out_err() <= before * 1.0001, name


def test_bias_correction_removes_mean_output_shift():
    b = tiny_batches(6)
    res = {}
    for bc in (False, True):
        q = omse.quantize(
            tiny_net(),
            b,
            QuantConfig.preset("fast", weight_bits=3, act_bits=None, bias_correction=bc),
        )
        ref_q = copy.deepcopy(q)
        for ql in quantized_layers(ref_q).values():
            ql.set_quant_enabled(False)
        # mean shift of the pointwise layer's output on the calibration data
        outs = {}
        for key, model in (("q", q), ("f", ref_q)):
            acc = []
            h = model.pw.register_forward_hook(
                lambda m, i, o, acc=acc: acc.append(o.mean((0, 2, 3)))
            )
            for x in b:
                model(x)
            h.remove()
            outs[key] = torch.stack(acc).mean(0)
        res[bc] = float((outs["q"] - outs["f"]).abs().mean().detach())
    assert res[True] < res[False]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.r = nn.ReLU()
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.r2 = nn.ReLU()
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.r2(self.b(self.r(self.a(x)))))


def test_equalization_keeps_fp32_function_and_evens_ranges():
    torch.manual_seed(0)
    m = Chain().eval()
    with torch.no_grad():
        m.a.weight.mul_(torch.logspace(-2, 1, 8).reshape(-1, 1, 1, 1))
    x = torch.randn(4, 3, 10, 10)
    ref = m(x)
    e = copy.deepcopy(m)
    pairs = equalize(e, x)
    assert ("a", "b") in pairs and ("b", "c") in pairs
    assert torch.allclose(e(x), ref, rtol=1e-4, atol=1e-5)

    def spread(w):
        r = w.detach().reshape(w.shape[0], -1).abs().amax(1)
        return float(r.max() / r.min())

    assert spread(e.a.weight) < spread(m.a.weight)


def test_equalization_refuses_relu6_pairs():
    """ReLU6 is not positively homogeneous: such pairs are left alone."""
    m = tiny_net()
    x = tiny_batches(1)[0]
    e = copy.deepcopy(m)
    assert ("dw", "pw") not in equalize(e, x)
    assert torch.allclose(e(x), m(x), rtol=1e-4, atol=1e-5)


def test_residual_terms_quantize_the_residual():
    q = _budgeted(1.0)
    ql = quantized_layers(q)["pw"]
    (c1, s1, _), (c2, s2, m2) = ql.terms()
    resid = ql.float_weight - dequantize(c1, s1)
    # on the chosen kernels the second term approximates the residual better than zero does
    err0 = (resid[m2] ** 2).sum()
    err1 = ((resid - dequantize(c2, s2))[m2] ** 2).sum()
    assert err1 < err0
