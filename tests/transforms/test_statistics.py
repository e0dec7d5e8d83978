"""Patch extraction (omse.transforms.statistics.patches): for every convolution type the
patches times the canonical weight reproduce the layer's output (brute force against torch)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from omse.config import LayerConfig
from omse.nn.layers import QuantizedLayer, canonical_weight
from omse.transforms.statistics import Needs, collect

CASES = [
    # (module, input shape)
    (
        nn.Conv3d(4, 6, (3, 2, 3), stride=(1, 2, 1), padding=(1, 0, 2), dilation=(1, 1, 2)),
        (2, 4, 5, 6, 7),
    ),
    (nn.Conv3d(4, 6, 3, padding=1, groups=2), (2, 4, 4, 4, 4)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), (2, 4, 5, 6)),
    (
        nn.ConvTranspose2d(
            6,
            4,
            (3, 2),
            stride=(2, 3),
            padding=(0, 1),
            output_padding=(1, 2),
            dilation=(1, 2),
            groups=2,
        ),
        (2, 6, 4, 5),
    ),
    (
        nn.ConvTranspose2d(4, 4, 4, stride=2, padding=3, groups=4),
        (2, 4, 6, 6),
    ),  # depthwise, cropping
    (
        nn.ConvTranspose3d(4, 6, (2, 3, 3), stride=(2, 1, 2), padding=(0, 1, 1), groups=2),
        (1, 4, 3, 4, 5),
    ),
]


@pytest.mark.parametrize(
    "layer,shape", CASES, ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else ""
)
def test_patches_times_canonical_weight_is_the_output(layer, shape):
    torch.manual_seed(0)
    layer = layer.double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    ref = layer(x)
    seen = {}
    q = QuantizedLayer(layer.float(), "l", LayerConfig(weight_bits=8, act_bits=None))
    q.set_quant_enabled(False)  # float weight: compare against the float layer
    stats = collect(q, {"l": q}, [x.float()], Needs(patch_moments=True))["l"]
    # the patches themselves, recomputed for one exact brute-force product
    from omse.transforms.statistics import _Capture, patches

    layer64 = q.layer.double()
    with _Capture(
        layer64.weight, lambda xi, call: seen.setdefault("p", patches(layer64, xi, call))
    ):
        layer64(x)
    p = seen["p"]  # [G, N, K]
    G, N, K = p.shape
    w = canonical_weight(layer64).reshape(G, -1, K)  # [G, out/G, K]
    y = torch.einsum("gnk,grk->ngr", p, w).reshape(N, -1)  # [B*L, out]
    bias = layer64.bias if layer64.bias is not None else 0
    expect = (ref - bias.reshape(1, -1, *([1] * (ref.dim() - 2)))).movedim(1, -1).reshape(N, -1)
    torch.testing.assert_close(y, expect, rtol=1e-10, atol=1e-10)
    # the pass's moments are those patches' (float32 input, float64 sums)
    assert stats.count == N
    torch.testing.assert_close(stats.H, p.transpose(1, 2) @ p, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "layer,shape", CASES[:4], ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else ""
)
def test_macs_count_every_multiply_once(layer, shape):
    layer = copy.deepcopy(layer).float()
    q = QuantizedLayer(layer, "l", LayerConfig(weight_bits=8, act_bits=None))
    x = torch.randn(*shape)
    st = collect(q, {"l": q}, [x], Needs())["l"]
    # brute force: a MAC is one (input element, weight element) pair that meets in the output,
    # counted by convolving ones with ones (every multiply adds 1 to the sum). A convolution's
    # zero padding counts as multiplies (it runs them): the input is padded with ones instead; a
    # transposed convolution's padding only crops outputs, its multiplies are those of padding 0
    kw = _kwargs(layer)
    size = list(shape[1:])
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        kw.update(padding=0, output_padding=0)
    else:
        size = [size[0]] + [n + 2 * p for n, p in zip(size[1:], layer.padding, strict=True)]
        kw.update(padding=0)
    ones = type(layer)(**kw, bias=False)
    ones.weight.data.fill_(1.0)
    macs = float(ones(torch.ones(1, *size)).sum())
    assert st.macs == int(macs)


def _kwargs(layer) -> dict:
    keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    kw = {k: getattr(layer, k) for k in keys}
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        kw["output_padding"] = layer.output_padding
    return kw
