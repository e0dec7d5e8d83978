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


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, groups=2),
        lambda: nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1),
        lambda: nn.Conv3d(4, 6, 3, padding=1),
    ],
    ids=["ConvTranspose2d", "ConvTranspose1d", "Conv3d"],
)
def test_output_aware_rounding_lowers_the_real_output_error(make):
    """GPTQ and learned rounding on the new layer types, judged by running the layer (brute
    force), not by the patch moments they optimise."""
    from omse.transforms.learned import learned_rounding
    from omse.transforms.rounding import gptq_terms

    torch.manual_seed(0)
    layer = make().eval()
    nd = layer.weight.dim() - 2
    x = torch.relu(torch.randn(16, layer.in_channels, *([6] * nd)))
    ref = layer(x)

    def err(q: QuantizedLayer) -> float:
        with torch.no_grad():
            return float(((q.layer(x) - ref) ** 2).sum())

    errs = {}
    for how in ("nearest", "gptq", "learned"):
        q = QuantizedLayer(copy.deepcopy(layer), "l", LayerConfig(weight_bits=3, act_bits=None))
        st = collect(q, {"l": q}, [x], Needs(patch_moments=True))["l"]
        if how == "gptq":
            gptq_terms(q, st)
        elif how == "learned":
            learned_rounding(q, st, iters=200)
        errs[how] = err(q)
    assert errs["gptq"] < errs["nearest"]
    assert errs["learned"] < errs["nearest"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        lambda: nn.Conv3d(4, 6, 3, padding=1, bias=False),
    ],
    ids=["ConvTranspose2d", "Conv3d"],
)
def test_bias_correction_removes_the_mean_output_shift(make):
    from omse.transforms.bias_correction import bias_correction

    torch.manual_seed(0)
    layer = make().eval()
    nd = layer.weight.dim() - 2
    x = torch.relu(torch.randn(8, layer.in_channels, *([5] * nd))) + 0.5  # a non-zero mean
    ref = layer(x)
    q = QuantizedLayer(copy.deepcopy(layer), "l", LayerConfig(weight_bits=3, act_bits=None))
    dims = [0, *range(2, ref.dim())]
    with torch.no_grad():
        before = (q.layer(x) - ref).mean(dims).abs().max()
        st = collect(q, {"l": q}, [x], Needs(patch_means=True))
        assert bias_correction({"l": q}, st) == 1
        after = (q.layer(x) - ref).mean(dims).abs().max()
    assert float(before) > 1e-3 and float(after) < 1e-5


def test_histograms_of_a_pass_equal_the_torch_paths(monkeypatch):
    """The statistics pass gives the same histograms with the compiled binning as with the torch
    path (counts and per-bin sums bit for bit), output ranges clamped or not, an in-place ReLU
    after a histogrammed output included."""
    import math

    import omse.core.stats as stats

    torch.manual_seed(0)
    cfg = LayerConfig(weight_bits=8, act_bits=None)
    layers = {
        "a": QuantizedLayer(nn.Conv2d(3, 8, 3, padding=1), "a", cfg),
        "b": QuantizedLayer(nn.Conv2d(8, 4, 1), "b", cfg),
        "c": QuantizedLayer(nn.Conv2d(4, 4, 3, groups=4), "c", cfg),
    }
    model = nn.Sequential(layers["a"], nn.ReLU(inplace=True), layers["b"], layers["c"]).eval()
    batches = [torch.randn(2, 3, 9, 9) * 10.0**k for k in (-2, 0, 1)]
    needs = Needs(
        input_histograms=True,
        output_clamp=(("a", 0.0, math.inf), ("c", -math.inf, math.inf)),
        bins=256,
    )
    new = collect(model, layers, batches, needs)
    monkeypatch.setattr(stats, "_KERNEL", [None])
    ref = collect(model, layers, batches, needs)
    for name in layers:
        for f in ("input", "output"):
            a, b = getattr(new[name], f), getattr(ref[name], f)
            assert (a is None) == (b is None) == (f == "output" and name == "b")
            if a is not None:
                assert torch.equal(a.counts, b.counts) and torch.equal(a.sums, b.sums)
                assert (a.n, a.min, a.max, a.radius) == (b.n, b.min, b.max, b.radius)
                assert a.sum_sq == pytest.approx(b.sum_sq, rel=1e-12)
        assert new[name].macs == ref[name].macs > 0
    assert new["a"].output.min == 0.0  # the clamp applied


def test_deferred_binning_of_a_pass_equals_binning_each_update_at_once(monkeypatch):
    """The pass bins its histograms after each batch, on worker threads (DeferredBinning): the
    same histograms bit for bit as binning each update as it comes, also when the model changes
    an observed tensor in place after it was observed (that batch runs again, the later ones
    bin at once)."""
    import math

    import omse.core.stats as stats

    torch.manual_seed(0)
    cfg = LayerConfig(weight_bits=8, act_bits=None)
    layers = {
        "a": QuantizedLayer(nn.Conv2d(3, 8, 3, padding=1), "a", cfg),
        "b": QuantizedLayer(nn.Conv2d(8, 4, 1), "b", cfg),
    }

    class Net(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.a, self.b, self.inplace, self.calls = layers["a"], layers["b"], inplace, 0

        def forward(self, x):
            self.calls += 1
            h = torch.relu(self.a(x))
            z = self.b(h)  # b's input histogram holds h
            if self.inplace:
                h.mul_(0.5)  # after it was observed, as a residual's `out += x`
            return z.sum() + h.sum()

    batches = [torch.randn(2, 3, 9, 9) * 10.0**k for k in (-2, 0, 1)]
    clamps = (("b", -math.inf, math.inf), ("a", -0.1, 1.0 / 3.0))  # a's clamped on the workers
    needs = Needs(input_histograms=True, output_clamp=clamps, bins=256)
    for inplace in (False, True):
        net = Net(inplace).eval()
        new = collect(net, layers, batches, needs)
        assert net.calls == len(batches) + inplace  # the first batch again, the others once
        with monkeypatch.context() as m:
            m.setattr(stats.DeferredBinning, "take", lambda self, *a: False)
            ref = collect(net, layers, batches, needs)
        for name in layers:
            for f in ("input", "output"):
                assert _state(getattr(new[name], f)) == _state(getattr(ref[name], f)), (name, f)
        assert new["b"].input is not None and new["b"].output is not None
        assert new["a"].output.max == pytest.approx(1.0 / 3.0)


def test_non_finite_values_found_while_binning_name_the_layer_or_the_batch():
    """NaN or Inf are found by the binning workers after the forward: the batch runs again
    binning each update at once, whose check names the layer; a batch that does not fail again
    (a model that is not deterministic) is named with what was seen."""
    from omse.errors import CalibrationError

    cfg = LayerConfig(weight_bits=8, act_bits=None)
    layers = {"a": QuantizedLayer(nn.Linear(4, 4), "a", cfg)}

    class Net(nn.Module):
        def __init__(self, bad_calls):
            super().__init__()
            self.a, self.bad_calls, self.calls = layers["a"], bad_calls, 0

        def forward(self, x):
            self.calls += 1
            return self.a(x * float("nan") if self.calls in self.bad_calls else x)

    batches = [torch.randn(2, 4), torch.randn(2, 4)]
    needs = Needs(input_histograms=True, bins=64)
    net = Net({2, 3})  # batch 1, and its run again
    with pytest.raises(
        CalibrationError, match=r"layer 'a' got NaN or Inf inputs on calibration batch 1"
    ):
        collect(net, layers, batches, needs)
    assert net.calls == 3
    net = Net({2})  # batch 1 only: its run again is finite
    with pytest.raises(CalibrationError, match="calibration batch 1 gave NaN or Inf values"):
        collect(net, layers, batches, needs)
    assert net.calls == 3


def _state(h) -> tuple | None:
    """Everything a histogram holds (bins as lists: equal floats, bit for bit here)."""
    if h is None:
        return None
    moments = (h.sum, h.sum_sq, h.sum_abs, h.sum_4)
    return (h.radius, h.n, h.min, h.max, moments, h.counts.tolist(), h.sums.tolist())


def test_deferred_binning_leaves_an_int8_calibration_unchanged(monkeypatch):
    """A whole int8 calibration with op quantizers (SiLU as Sigmoid and Mul, a global pool):
    every layer's and op site's step equal with the deferred binning and without."""
    import omse
    import omse.core.stats as stats
    from omse.transforms.calibration import op_quantizers

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip
    batches = [torch.randn(4, 3, 10, 10) for _ in range(3)]
    config = omse.QuantConfig.preset("fast", target="int8", weight_bits=8)

    def steps():
        q = omse.quantize(model, batches, config)
        ops = op_quantizers(q)
        assert ops is not None and ops.scales
        layers = {
            n: (ql.act_scale.item(), None if ql.out_scale is None else ql.out_scale.item())
            for n, ql in omse.quantized_layers(q).items()
        }
        return layers, {k: v.item() for k, v in ops.scales.items()}

    new = steps()
    monkeypatch.setattr(stats.DeferredBinning, "take", lambda self, *a: False)
    assert steps() == new


SUM_CASES = [
    (nn.Conv2d(4, 6, 3, padding=1), (2, 4, 9, 8)),
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1)), (3, 4, 11, 10)),
    (nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (2, 6, 7, 7)),  # depthwise
    (nn.Conv2d(4, 8, 5, stride=1, padding=0, groups=2), (1, 4, 8, 9)),
    (nn.Conv2d(4, 4, 1), (2, 4, 3, 3)),
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),  # through the patches
    (nn.Linear(5, 3), (2, 7, 5)),
]


@pytest.mark.parametrize(
    "layer,shape", SUM_CASES, ids=lambda c: repr(c) if isinstance(c, nn.Module) else ""
)
def test_patch_sums_are_the_patches_summed(layer, shape):
    """Bias correction's patch sums, computed without building the patches, equal the patches'
    sum (and their count), and the pass that needs only the means reads them."""
    from omse.transforms.statistics import _Capture, patch_sums, patches

    torch.manual_seed(1)
    x = torch.randn(*shape)
    seen = {}
    with _Capture(layer.weight, lambda xi, call: seen.setdefault("call", call)):
        layer(x)
    call = seen.get("call")
    total, n = patch_sums(layer, x, call)
    p = patches(layer, x.to(torch.float64), call)
    assert n == p.shape[1] and total.dtype == torch.float64
    torch.testing.assert_close(total, p.sum(1), rtol=1e-12, atol=1e-12)
    q = QuantizedLayer(copy.deepcopy(layer), "l", LayerConfig(weight_bits=8, act_bits=None))
    q.set_quant_enabled(False)
    st = collect(q, {"l": q}, [x, x[:1]], Needs(patch_means=True))["l"]
    assert st.count == n + patch_sums(layer, x[:1], call)[1] and st.H is None
    torch.testing.assert_close(st.sum, total + patch_sums(layer, x[:1], call)[0])
