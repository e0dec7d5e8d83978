"""QuantizedLayer: residual terms merged into one 8-bit kernel for target int8, output
quantizers and int32 biases."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from omse.config import LayerConfig
from omse.core.grids import Grid
from omse.core.mmse import mmse_scale
from omse.core.primitives import dequantize, quantize
from omse.errors import ConfigError
from omse.nn.layers import (
    QuantizedLayer,
    canonical_weight,
    layer_weight,
    max_code_ratio,
    ratio_residual_term,
)


@pytest.mark.parametrize(
    "bits,kind,expect", [(4, "full", 15), (4, "narrow", 17), (3, "full", 31), (8, "full", 0)]
)
def test_max_code_ratio_is_the_largest_k_that_fits_int8(bits, kind, expect):
    g = Grid(bits, kind)
    assert max_code_ratio(g) == expect
    # brute force over every pair of codes
    for k in (expect, expect + 1):
        if k == 0:
            continue
        fits = all(
            -128 <= k * a + b <= 127
            for a, b in itertools.product(range(g.qmin, g.qmax + 1), repeat=2)
        )
        assert fits == (k == expect)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), out=st.integers(1, 6), k_max=st.integers(1, 15))
def test_ratio_residual_is_the_best_admissible_step(seed, out, k_max):
    g = torch.Generator().manual_seed(seed)
    grid = Grid(4, "full")
    r = torch.randn(out, 3, 3, 3, generator=g) * 0.05
    s1 = torch.rand(out, 1, 1, 1, generator=g) * 0.1 + 0.01
    q2, s2 = ratio_residual_term(r, s1, grid, k_max)
    err = ((r - dequantize(q2, s2)) ** 2).reshape(out, -1).sum(1)
    for k in range(1, k_max + 1):  # no admissible step s1/k does better on any kernel
        s = s1 / k
        e = ((r - dequantize(quantize(r, s, grid), s)) ** 2).reshape(out, -1).sum(1)
        assert bool((err <= e + 1e-12).all())
    k = torch.round(s1 / s2)
    assert bool(((k >= 1) & (k <= k_max)).all())
    assert torch.equal(s1 / k, s2)


def _two_term_layer(target: str) -> QuantizedLayer:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, bias=True)
    ql = QuantizedLayer(conv, "conv", LayerConfig(weight_bits=4, act_bits=8, target=target))
    q1, s1, _ = ql.terms()[0]
    resid = ql.float_weight - dequantize(q1, s1)
    q2, s2 = ratio_residual_term(resid, s1, ql.w_grid, max_code_ratio(ql.w_grid))
    mask = torch.tensor([True, False, True, True, False, True])
    ql.set_weight_terms([(q1, s1), (q2, s2)], [mask])
    return ql


def test_merged_kernel_equals_the_two_term_simulation():
    ql = _two_term_layer("int8")
    (q1, s1, _), (q2, s2, m) = ql.terms()
    codes, scale = ql.merged_term()
    assert int(codes.min()) >= -128 and int(codes.max()) <= 127
    two_term = dequantize(q1, s1) + dequantize(q2, s2)
    merged = dequantize(codes, scale)
    torch.testing.assert_close(merged, two_term, rtol=1e-6, atol=1e-9)
    # kernels without a residual keep their 4-bit codes and step
    assert torch.equal(codes[~m], q1[~m].to(codes.dtype))
    # the int8 target computes with exactly the merged kernel
    assert torch.equal(ql.dequantized_weight(), merged)


def test_merged_kernel_is_kept_until_its_inputs_change():
    """merged_term is computed once per state: the same tensors while nothing changes, a new
    result when a term's codes change in place, the bias or the input step is replaced, or new
    terms are installed."""
    ql = _two_term_layer("int8")
    ql.set_act(torch.tensor(0.05), Grid(8, "full"))
    first = ql.merged_term()
    assert ql.merged_term() is first
    with torch.no_grad():
        ql.w_codes0[0].zero_()  # in place: same tensor, a new version
    again = ql.merged_term()
    assert again is not first and not torch.equal(again[0], first[0])
    assert torch.equal(again[0], ql._merge_terms()[0])
    with torch.no_grad():  # kernel 0 all zero and a bias int32 cannot hold: its step is raised
        ql.w_codes1[0].zero_()
        ql.layer.bias[0] = 1e6
    raised = ql.merged_term()
    assert torch.equal(raised[1], ql._merge_terms()[1]) and not torch.equal(raised[1], again[1])
    ql.set_act(torch.tensor(0.5), Grid(8, "full"))
    assert ql.merged_term() is not raised
    torch.testing.assert_close(ql.bias_scale(), 0.5 * ql._merge_terms()[1].reshape(-1))
    (q1, s1, _), (q2, s2, m) = ql.terms()
    ql.set_weight_terms([(q1, s1)])
    assert torch.equal(ql.merged_term()[0], q1.to(torch.int16))


def test_effective_bias_is_kept_with_the_merged_kernel():
    """The int32-rounded bias an integer-target layer adds is computed once per state (the
    merged kernel's key: terms, bias, input step), equals the rounding done afresh after each
    change, and is not kept where a step carries a graph (learned steps)."""
    ql = _two_term_layer("int8")
    ql.set_act(torch.tensor(0.05), Grid(8, "full"))

    def fresh():
        return ql._rounded_bias(ql.layer.bias, ql.bias_scale())

    first = ql.effective_bias()
    assert ql.effective_bias() is first and torch.equal(first, fresh())
    with torch.no_grad():  # bias correction adds in place: a new version
        ql.layer.bias += 0.37
    moved = ql.effective_bias()
    assert moved is not first and torch.equal(moved, fresh()) and not torch.equal(moved, first)
    ql.set_act(torch.tensor(0.5), Grid(8, "full"))  # a new input step: a new bias grid
    coarse = ql.effective_bias()
    assert coarse is not moved and torch.equal(coarse, fresh())
    with torch.no_grad():
        ql.w_codes0[1].add_(1)  # the kernel in place
    assert torch.equal(ql.effective_bias(), fresh())
    with torch.no_grad():  # new storage behind the same parameter (module.to, .half)
        ql.layer.bias.data = ql.layer.bias.data * 2
    assert torch.equal(ql.effective_bias(), fresh())
    learned = torch.tensor(0.25, requires_grad=True)
    ql.act_scale = learned
    a, b = ql.effective_bias(), ql.effective_bias()
    assert a is not b and a.requires_grad and torch.equal(a, b)


def test_unmergeable_terms_are_refused_by_name():
    ql = _two_term_layer("int4")
    q1, s1, _ = ql.terms()[0]
    q2, s2, m = ql.terms()[1]
    ql.set_weight_terms([(q1, s1), (q2, s2 * 1.3)], [m])  # not an integer fraction of s1
    with pytest.raises(ConfigError, match="'conv'.*target='int8'"):
        ql.merged_term()


def test_int8_bias_and_output_quantizer():
    ql = _two_term_layer("int8")
    ql.set_act(torch.tensor(0.05), Grid(8, "full"))
    x = torch.randn(2, 4, 7, 7)
    sb = ql.bias_scale()
    b = ql.effective_bias()
    codes = b / sb
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-3)
    assert float((b - ql.layer.bias.detach()).abs().max()) <= float(sb.max()) / 2 + 1e-9
    ql.set_output(torch.tensor(0.1), Grid(8, "full"))
    y = ql(x)
    torch.testing.assert_close(y / 0.1, torch.round(y / 0.1), rtol=0, atol=1e-4)
    ql.set_quant_enabled(False)  # the float original ignores every quantizer
    torch.testing.assert_close(ql(x), ql.layer(x))


# -- every weight-carrying layer type: kernel-wise along the output channel -----------------------


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose1d(4, 6, 3, groups=2),
        nn.ConvTranspose2d(6, 9, (3, 2), groups=3),
        nn.ConvTranspose2d(4, 4, 3, groups=4),  # depthwise
        nn.ConvTranspose3d(2, 4, 2),
        nn.Conv3d(4, 6, 3, groups=2),
    ],
    ids=lambda m: f"{type(m).__name__}-g{m.groups}",
)
def test_one_mmse_scale_per_output_channel(layer):
    torch.manual_seed(0)
    w = layer.weight.detach().clone()
    g = layer.groups
    ql = QuantizedLayer(layer, "l", LayerConfig(weight_bits=4, act_bits=8, scale_dtype="float32"))
    out = layer.out_channels
    # brute force: output channel o = gi * out/g + j of a transposed conv is w[gi*in/g:(gi+1)*in/g, j]
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        cin = layer.in_channels
        rows = [
            w[(o // (out // g)) * (cin // g) : (o // (out // g) + 1) * (cin // g), o % (out // g)]
            for o in range(out)
        ]
    else:
        rows = [w[o] for o in range(out)]
    expect = mmse_scale(torch.stack([r.reshape(-1) for r in rows]), 4, axis=0)
    _, s, _ = ql.terms()[0]
    assert s.shape == (out,) + (1,) * (w.dim() - 1)
    torch.testing.assert_close(s.reshape(-1), expect.reshape(-1), rtol=0, atol=0)
    # the canonical layout is a bijection, and the layer computes with the dequantized terms
    assert torch.equal(layer_weight(layer, canonical_weight(layer, w)), w)
    assert torch.equal(ql.layer.weight, layer_weight(layer, ql.dequantized_weight()))
