"""The plans of ``target="int8"`` from one trace per ``quantize`` call (:func:`omse.transforms.
calibration.plan_trace`): the model is exported once, and a later calibration round (the float
fallback's) reuses that trace; every quantizer equals what the two traces per round (output
plan, then op plan with the shared input quantizers attached) give, on models with shared input
quantizers, a module called several times, op sites and the fallback's second round. Where one
trace could differ from the two (a site on constants, which the exporter folds without its
marker), the plans trace the model themselves."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omse.config import ActQuant, QuantConfig, WeightQuant
from omse.nn.layers import quantized_layers
from omse.nn.ops import op_quantizers
from omse.transforms import calibration, pipeline
from omse.transforms.pipeline import Calibration, quantize


class _Blocks(nn.Module):
    """Residual blocks whose output a layer and a skip ``Add`` read (shared input quantizers),
    one ``nn.ReLU`` module called four times, ``cat``, ``max_pool2d``, SiLU, nearest
    ``interpolate`` and a sigmoid gate: op sites of every kind."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(16, 8, 3, padding=1)
        self.c5 = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.stem(x))  # read by c1 and the skip Add
        y = self.c2(self.relu(self.c1(x)))
        x = self.relu(x + y)  # read by c3 and the next skip Add
        z = F.silu(self.c3(x))
        z = torch.cat([z, F.max_pool2d(z, 3, 1, 1)], 1)
        x = self.relu(x + self.c4(z))  # read by c5 and the Resize
        up = F.interpolate(x, scale_factor=2.0, mode="nearest")
        g = self.head(up) * torch.sigmoid(up[:, :4])
        return g, self.fc(self.c5(x).mean((2, 3)))


class _ConstantSite(nn.Module):
    """A site on constants: ``a * b`` of two buffers (2-d or more), which the exporter folds
    into one initializer unless a marker stands behind it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.register_buffer("a", torch.rand(1, 8, 1, 1) + 0.5)
        self.register_buffer("b", torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)) + self.a * self.b)


def _config(**kw) -> QuantConfig:
    return QuantConfig.preset("fast", target="int8", **kw)


def _quantize(model, batches, config, one_trace: bool, monkeypatch):
    """Quantize with one trace (the pipeline as it is) or with the plans' own two traces per
    round; returns (quantized model, calibration, torch.onnx.export calls)."""
    exports = []
    export = torch.onnx.export

    def counted(*a, **k):
        exports.append(1)
        return export(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", counted)
        if not one_trace:
            m.setattr(pipeline, "plan_trace", lambda *a, **k: None)
        cal = Calibration()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize(model, batches, config, calibration=cal)
    return q, cal, len(exports)


def _quantizers(q) -> dict:
    """Every quantizer the plans and the activation pass set, and the model's tensors."""
    layers = {
        n: (ql.act_scale, ql.a_grid, ql.out_scale, ql.out_grid, ql.input_from, ql.cfg)
        for n, ql in quantized_layers(q).items()
    }
    ops = op_quantizers(q)
    return {"layers": layers, "ops": ops.to_dict() if ops else None, "state": q.state_dict()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _batches(shape=(4, 3, 8, 8), n=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("fx", [False, True], ids=["module", "graph_module"])
def test_one_trace_gives_the_quantizers_of_two(fx, monkeypatch):
    model = _Blocks().eval()
    if fx:
        model = torch.fx.symbolic_trace(model)
    batches = _batches()
    q1, cal1, n1 = _quantize(model, batches, _config(), True, monkeypatch)
    q2, cal2, n2 = _quantize(model, batches, _config(), False, monkeypatch)
    assert (n1, n2) == (1, 2)
    one, two = _quantizers(q1), _quantizers(q2)
    # the model has what the one trace must reproduce: shared input quantizers (one on the
    # ReLU module called four times) and op sites that get quantizers of their own
    assert any(v[4] for v in two["layers"].values())
    assert "own" in two["ops"]["kinds"].values() and "same" in two["ops"]["kinds"].values()
    assert _same(one, two)
    assert cal1.output_quantized == cal2.output_quantized


@pytest.mark.parametrize("fx", [False, True], ids=["module", "graph_module"])
def test_the_fallback_round_reuses_the_trace(fx, monkeypatch):
    """The float fallback calibrates a second time, on a fresh copy of the same model (a
    GraphModule's copy has a class of its own): one export in all, and every quantizer as with
    two traces in each round."""
    from test_fallback import _Stem

    model = _Stem(spread=2000.0).eval()
    if fx:
        model = torch.fx.symbolic_trace(model)
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    config = QuantConfig(
        target="int8",
        weights=WeightQuant(bits=8),
        budget=None,
        residuals=None,
        bias_correction=False,
    )
    q1, cal1, n1 = _quantize(model, batches, config, True, monkeypatch)
    q2, cal2, n2 = _quantize(model, batches, config, False, monkeypatch)
    assert cal1.fallback and cal1.fallback == cal2.fallback  # two rounds
    assert (n1, n2) == (1, 4)
    assert _same(_quantizers(q1), _quantizers(q2))


def test_a_site_on_constants_traces_twice(monkeypatch):
    """A marker behind constants keeps the exporter from folding them: the one trace could
    differ from the plan's own, so the plans trace the model themselves (same quantizers)."""
    model = _ConstantSite().eval()
    batches = _batches()
    q1, _, n1 = _quantize(model, batches, _config(), True, monkeypatch)
    q2, _, n2 = _quantize(model, batches, _config(), False, monkeypatch)
    assert n1 == 1 + 2 and n2 == 2  # the one trace, refused, then the plans' two
    assert _same(_quantizers(q1), _quantizers(q2))


def test_weight_only_needs_no_trace(monkeypatch):
    config = _config(activations=ActQuant(bits=None))
    _, _, n = _quantize(_Blocks().eval(), _batches(), config, True, monkeypatch)
    assert n == 0


def test_plan_trace_is_reused_only_for_the_same_model():
    """A trace carries over to a model of the same modules (a later round's fresh copy), not to
    another model, nor to one whose activation quantizers are set already."""
    import copy

    from omse.transforms.statistics import first_row

    def wrapped(model):
        run = pipeline._Run(model, _batches(), _config(), Calibration(), False)
        run.example = run.batches[0]
        pipeline._wrap(run)
        return run

    r1 = wrapped(copy.deepcopy(_Blocks().eval()))
    t1 = calibration.plan_trace(r1.qmodel, r1.layers, r1.example)
    assert t1 is not None
    assert op_quantizers(r1.qmodel) is not None  # attached for the plans
    r2 = wrapped(copy.deepcopy(_Blocks().eval()))
    assert calibration.plan_trace(r2.qmodel, r2.layers, r2.example, reuse=t1) is t1
    r3 = wrapped(_ConstantSite().eval())
    t3 = calibration.plan_trace(r3.qmodel, r3.layers, r3.example, reuse=t1)
    assert t3 is None and op_quantizers(r3.qmodel) is None  # refused, nothing attached
    r4 = wrapped(copy.deepcopy(_Blocks().eval()))
    ql = r4.layers["c1"]
    ql.set_act(torch.tensor(0.1), ql.a_grid or calibration.Grid(8, "full"))
    assert calibration.plan_trace(r4.qmodel, r4.layers, first_row(r4.example), reuse=t1) is None
