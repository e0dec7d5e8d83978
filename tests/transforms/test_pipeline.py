import copy

import pytest
import torch
from nets import tiny_batches, tiny_net
from torch import nn

import omse
from omse.config import QuantConfig
from omse.core.grids import Grid
from omse.nn.layers import QuantizedLayer, quantized_layers
from omse.transforms.fold import fold_batchnorm
from omse.transforms.pipeline import Calibration


def test_quantize_returns_new_module_and_leaves_input_untouched():
    m = tiny_net()
    before = copy.deepcopy(m.state_dict())
    q = omse.quantize(m, tiny_batches(), QuantConfig.preset("fast", weight_bits=4, act_bits=8))
    assert q is not m
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(isinstance(x, QuantizedLayer) for x in m.modules())
    layers = quantized_layers(q)
    assert set(layers) == {"conv1", "dw", "pw", "fc"}


def test_every_layer_kernelwise_and_activations_calibrated():
    m = tiny_net()
    q = omse.quantize(m, tiny_batches(), QuantConfig.preset("fast", weight_bits=4, act_bits=4))
    layers = quantized_layers(q)
    for name, ql in layers.items():
        codes, scale, _ = ql.terms()[0]
        assert codes.dtype == torch.int8
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
        assert scale.shape[0] == ql.float_weight.shape[0], name  # one scale per kernel
        assert ql.act_scale is not None and ql.act_scale > 0
    # inputs after ReLU / ReLU6 are non-negative: unsigned grids; the image input is signed
    assert layers["dw"].a_grid.kind == "unsigned"
    assert layers["pw"].a_grid.kind == "unsigned"
    assert layers["conv1"].a_grid.kind == "full"
    assert layers["fc"].a_grid.kind == "full"  # BN output, signed


def test_quantized_output_close_to_float_at_8_bits():
    m = tiny_net()
    b = tiny_batches()
    q = omse.quantize(m, b, QuantConfig.preset("fast", weight_bits=8, act_bits=8))
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        ref, out = m(x), q(x)
    rel = (ref - out).norm() / ref.norm()
    assert rel < 0.05


def test_overrides_and_skip_by_name():
    cfg = QuantConfig.preset(
        "fast",
        weight_bits=4,
        act_bits=4,
        overrides={"conv*": {"weight_bits": 8, "act_bits": 8}},
        skip=("fc",),
    )
    q = omse.quantize(tiny_net(), tiny_batches(), cfg)
    layers = quantized_layers(q)
    assert "fc" not in layers and isinstance(q.fc, nn.Linear)
    assert layers["conv1"].w_grid.bits == 8 and layers["conv1"].a_grid.bits == 8
    assert layers["pw"].w_grid.bits == 4 and layers["pw"].a_grid.bits == 4


def test_float_activations_and_per_tensor_weights():
    q = omse.quantize(
        tiny_net(),
        tiny_batches(),
        QuantConfig.preset("fast", weight_bits=4, act_bits=None, granularity="per_tensor"),
    )
    for ql in quantized_layers(q).values():
        assert ql.act_scale is None
        assert ql.terms()[0][1].dim() == 0


def test_fold_batchnorm_preserves_function():
    m = tiny_net()
    x = torch.randn(4, 3, 12, 12)
    ref = m(x)
    f = copy.deepcopy(m)
    pairs = fold_batchnorm(f, x)
    assert sorted(pairs) == [("conv1", "bn1"), ("dw", "bn2"), ("pw", "bn3")]
    assert isinstance(f.bn1, nn.Identity)
    assert torch.allclose(f(x), ref, atol=1e-5, rtol=1e-4)


def test_calibration_statistics_do_not_grow_with_batches():
    sizes = []
    for n in (2, 12):
        cal = Calibration()
        omse.quantize(
            tiny_net(),
            tiny_batches(n),
            QuantConfig.preset("fast", weight_bits=4, act_bits=8),
            calibration=cal,
        )
        sizes.append(sum(s.nbytes() for s in cal.stats.values()))
        assert cal.batches == n
    assert sizes[0] == sizes[1]


def test_macs_recorded():
    q = omse.quantize(
        tiny_net(), tiny_batches(1), QuantConfig.preset("fast", weight_bits=4, act_bits=8)
    )
    layers = quantized_layers(q)
    assert layers["conv1"].macs == 12 * 12 * 8 * 3 * 9
    assert layers["dw"].macs == 12 * 12 * 8 * 9
    assert layers["fc"].macs == 16 * 10


@pytest.mark.parametrize("method", ["minmax", "percentile", "aciq", "mmse"])
def test_every_range_method_runs(method):
    q = omse.quantize(
        tiny_net(),
        tiny_batches(2),
        QuantConfig.preset(
            "fast", weight_bits=4, act_bits=8, weight_method=method, act_method=method
        ),
    )
    out = q(torch.randn(2, 3, 12, 12))
    assert torch.isfinite(out).all()


def test_set_integer_mode_matches_fake_quantization():
    """Integer mode (codes convolved exactly, rescaled after) computes the same values as fake
    quantization up to float rounding, and can be switched back; bad input is refused."""
    from omse.nn.layers import set_integer

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 36, 5),
    ).eval()
    x = torch.randn(16, 3, 8, 8)
    q = omse.quantize(net, [x[:8]], QuantConfig.preset("fast", weight_bits=4, act_bits=8))
    with torch.no_grad():
        fake = q(x)
        assert set_integer(q) is q
        assert all(ql.integer for ql in quantized_layers(q).values())
        exact = q(x)
        set_integer(q, False)
        assert torch.equal(q(x), fake)
    assert (exact - fake).abs().max() <= 1e-5 * fake.abs().max()
    for ql in quantized_layers(q).values():
        bound = ql.accumulator_bound()
        codes = ql.terms()[0][0].abs().reshape(ql.terms()[0][0].shape[0], -1).sum(1).max()
        assert bound == int(codes) * max(-ql.a_grid.qmin, ql.a_grid.qmax) < 2**24
    with pytest.raises(omse.ConfigError, match="enabled"):
        set_integer(q, "yes")
    with pytest.raises(omse.ConfigError, match="no quantized layer"):
        set_integer(net)


def test_set_integer_warns_where_float32_cannot_hold_the_accumulator():
    from omse.nn.layers import set_integer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40000, 2)).eval()  # 8-bit x 8-bit codes over 40000 inputs
    x = torch.randn(4, 40000)
    q = omse.quantize(net, [x], QuantConfig.preset("fast", weight_bits=8, act_bits=8))
    with pytest.warns(UserWarning, match=r"1 layer \(0\) can accumulate.*2\^24"):
        set_integer(q)


def test_affine_act_grid_fits_zero_points_on_skewed_inputs():
    """Hardswish outputs ([-0.375, ...]) get a zero point, the non-negative input of the layer
    after a ReLU none; the model's output error drops against signed grids."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Hardswish(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
    ).eval()
    calib = [torch.randn(8, 3, 12, 12) * 2 for _ in range(4)]
    x = torch.randn(32, 3, 12, 12) * 2
    errs = {}
    for grid in ("full", "affine"):
        q = omse.quantize(net, calib, QuantConfig.preset("fast", weight_bits=8, act_grid=grid))
        layers = quantized_layers(q)
        with torch.no_grad():
            errs[grid] = float(((q(x) - net(x)) ** 2).mean())
    assert layers["2"].a_grid.kind == "unsigned" and layers["2"].a_grid.zero_point > 0
    assert layers["4"].a_grid == Grid(8, "unsigned")  # after the ReLU
    assert errs["affine"] < 0.8 * errs["full"]


def _silu_net() -> nn.Module:
    """Conv -> SiLU -> Conv -> SiLU -> Conv, as YOLOX's stem: pre-activations reach -80 on
    channels the SiLU sends to 0 (a large negative bias), up to ~+20 on the others."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 1),
        nn.SiLU(),
        nn.Conv2d(16, 8, 1),
    ).eval()
    with torch.no_grad():
        net[0].weight.mul_(4.0)
        net[0].bias.copy_(torch.linspace(-60.0, 2.0, 16))
    return net


def test_silu_output_quantizers_skip_the_dead_tail_and_get_zero_points(monkeypatch):
    """target="int8", YOLOX's failure in small: the output quantizer in front of a SiLU is
    calibrated on the output clamped at SILU_FLOOR (the SiLU is flat below it), not on the -60
    tail that set its step before; the SiLU's [-0.28, x] outputs get affine grids by default
    (act_grid="auto": skewed). The model's output error drops well below the former result
    (no floor, signed grids), and the floor alone already helps the signed grids."""
    from omse.transforms import calibration
    from omse.transforms.graph import SILU_FLOOR

    net = _silu_net()
    calib = [torch.randn(8, 3, 12, 12) * 2 for _ in range(4)]
    x = torch.randn(16, 3, 12, 12) * 2
    errs, layers = {}, {}

    def run(label, grid):
        cfg = QuantConfig.preset("fast", weight_bits=8, act_grid=grid, target="int8")
        q = omse.quantize(net, calib, cfg)
        layers[label] = quantized_layers(q)
        with torch.no_grad():
            errs[label] = float(((q(x) - net(x)) ** 2).mean())

    run("auto", "auto")
    run("full", "full")
    with monkeypatch.context() as m:
        m.setattr(calibration, "SILU_FLOOR", -float("inf"))
        run("before", "full")
    with torch.no_grad():
        y0 = net[0](torch.cat(calib))
    lo, hi = float(y0.min()), float(y0.max())
    assert lo < -40 and hi < -lo / 2  # the tail the SiLU discards sets a signed grid's step
    assert float(layers["before"]["0"].out_scale) >= -lo / 128 * 0.9
    for label in ("auto", "full"):  # floored: the step covers [-8, hi], not [lo, hi]
        s = float(layers[label]["0"].out_scale)
        assert s <= max(hi, -SILU_FLOOR) / 127 * 1.01 < -lo / 128 * 0.5
    for name in ("2", "4"):  # SiLU outputs [-0.28, x]: zero points with "auto"
        assert layers["auto"][name].a_grid.zero_point > 0
        assert layers["full"][name].a_grid == Grid(8, "full")
    assert errs["full"] < 0.5 * errs["before"]
    assert errs["auto"] < 0.8 * errs["full"]
