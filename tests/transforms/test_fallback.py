"""The float fallback (``ActQuant.fallback_db``): the linearised activation error against the
measured one, the fallback firing on a model whose 8-bit activations collapse (and the fallback
measurably restoring it), staying quiet on a well-conditioned model, and its configuration."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from omse.config import ActQuant, QuantConfig, WeightQuant
from omse.errors import ConfigError
from omse.nn.layers import layer_weight, quantized_layers
from omse.transforms.pipeline import Calibration, quantize
from omse.transforms.precision import activation_errors, relative_errors


def _w8a8(**kw) -> QuantConfig:
    return QuantConfig(
        target="int8",
        weights=WeightQuant(bits=8),
        budget=None,
        residuals=None,
        bias_correction=False,
        **kw,
    )


def _measured_activation_errors(model, layers, batches) -> dict[str, float]:
    """Per layer, the measured relative output error with only that layer's activation
    quantizers on (its weights float, every other layer float)."""
    flags = {n: q.quant_enabled for n, q in layers.items()}
    out = {}
    try:
        for q in layers.values():
            q.set_quant_enabled(False)
        for n, q in layers.items():

            def only(batch, q=q):
                q.set_quant_enabled(True)
                q.layer.weight.data = layer_weight(q.layer, q.float_weight)
                try:
                    return model(batch)
                finally:
                    q.set_quant_enabled(False)

            (out[n],) = relative_errors(batches, model, only)
    finally:
        for n, q in layers.items():
            q.set_quant_enabled(flags[n])
    return out


def test_activation_errors_equal_the_measured_ones_on_a_linear_network():
    """Nothing nonlinear after the quantizers: the probe estimate is the measured error within
    its sampling error, for 4-bit activations (large enough to measure)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 6)).eval()
    batches = [torch.randn(32, 16) * torch.linspace(0.1, 3, 16) for _ in range(4)]
    q = quantize(net, batches, QuantConfig(weights=WeightQuant(bits=8), budget=None,
                                           residuals=None, bias_correction=False,
                                           activations=ActQuant(bits=4, fallback_db=None)))  # fmt: skip
    layers = dict(quantized_layers(q))
    est = activation_errors(q, layers, batches, probes=64)
    measured = _measured_activation_errors(q, layers, batches)
    for n in layers:
        assert measured[n] > 1e-4, n  # 4-bit activations: a measurable error
        assert est[n] == pytest.approx(measured[n], rel=0.15), n
    assert all(q.quant_enabled for q in layers.values())  # flags restored


class _Stem(nn.Module):
    """A stem whose output channels span very different ranges, through a SiLU (which no
    equalization crosses), read with equal weight by the next layer: one per-tensor 8-bit step
    sized for the large channel rounds the small channels away (a YOLOX-style stem)."""

    def __init__(self, spread: float):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 64, 3, padding=1)  # most of the MACs
        self.head = nn.Conv2d(64, 4, 3, padding=1)
        with torch.no_grad():
            gain = torch.ones(8)
            gain[0] = spread  # channel 0 huge, the others small
            self.stem.weight.mul_(gain[:, None, None, None])
            self.stem.bias.mul_(gain)
            self.body.weight[:, 0].div_(spread)  # channel 0 weighs no more than the others

    def forward(self, x):
        x = torch.relu(self.body(nn.functional.silu(self.stem(x))))
        return self.head(torch.relu(self.tail(x)))


def _quantize(model, batches, config):
    cal = Calibration()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(model, batches, config, calibration=cal)
    said = [str(w.message) for w in caught if "float fallback" in str(w.message)]
    return q, cal, said


def test_fallback_fires_on_a_collapsing_stem_and_restores_the_output():
    model = _Stem(spread=2000.0).eval()
    torch.manual_seed(1)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    held = [torch.randn(8, 3, 16, 16) for _ in range(2)]  # held out
    q, cal, said = _quantize(model, calib, _w8a8())
    q_off, cal_off, said_off = _quantize(
        model, calib, _w8a8(activations=ActQuant(fallback_db=None))
    )
    assert cal_off.fallback == {} and said_off == []
    # the layers that read or write the mixed tensor stay float, and say so in one line
    assert set(cal.fallback) & {"stem", "body"}
    assert len(said) == 1 and all(n in said[0] for n in cal.fallback)
    assert all(db < 20 for db in cal.fallback.values())
    assert not {"tail", "head"} & set(cal.fallback)
    names = dict(quantized_layers(q))
    assert not set(cal.fallback) & set(names)  # left float: not quantized layers any more
    assert {r.name for r in cal.float_weights if "float fallback" in r.reason} >= {
        f"{n}.weight" for n in cal.fallback
    }
    (e_on,) = relative_errors(held, model, q)
    (e_off,) = relative_errors(held, model, q_off)
    assert e_on < e_off / 10  # measured on held-out inputs: at least 10 dB better


def test_fallback_stays_quiet_on_a_well_conditioned_model():
    model = _Stem(spread=1.0).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    q, cal, said = _quantize(model, calib, _w8a8())
    assert cal.fallback == {} and said == []
    assert set(dict(quantized_layers(q))) == {"stem", "body", "tail", "head"}


def test_fallback_keeps_within_its_share_of_the_macs():
    model = _Stem(spread=2000.0).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    _, cal, said = _quantize(model, calib, _w8a8(activations=ActQuant(fallback_macs=0.0)))
    assert cal.fallback == {}
    assert len(said) == 1 and "over fallback_macs" in said[0]


def test_no_fallback_for_tflite():
    model = _Stem(spread=2000.0).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    _, cal, said = _quantize(model, calib, QuantConfig(target="tflite", budget=None))
    assert cal.fallback == {} and said == []


@pytest.mark.parametrize(
    "kw",
    [{"fallback_db": -1}, {"fallback_db": True}, {"fallback_macs": 1.5}, {"fallback_macs": -0.1}],
)
def test_fallback_config_is_checked(kw):
    with pytest.raises(ConfigError, match="fallback"):
        ActQuant(**kw)


def test_fallback_config_round_trips():
    cfg = QuantConfig(activations=ActQuant(fallback_db=15.0, fallback_macs=0.1))
    back = QuantConfig.from_dict(cfg.to_dict())
    assert back.activations.fallback_db == 15.0 and back.activations.fallback_macs == 0.1
