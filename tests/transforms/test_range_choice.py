"""The activation range choice (``ActQuant.choose_range``): the estimate of each step pair against
the measured output error, the choice taking the step whose measured output error is smaller
where the tail of a tensor carries the output, readers of a changed quantizer following it, one
estimate pass per ``quantize`` call (later rounds reuse the choice), and ``choose_range=False``
keeping every MMSE step (the default)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import omse.transforms.pipeline as pipeline
from omse.config import ActQuant, QuantConfig, WeightQuant
from omse.core.primitives import fake_quantize
from omse.nn.layers import quantized_layers
from omse.transforms.calibration import min_max_quantizer
from omse.transforms.pipeline import Calibration, quantize
from omse.transforms.precision import range_errors, relative_errors


def _config(**acts) -> QuantConfig:
    acts.setdefault("choose_range", True)
    return QuantConfig(
        weights=WeightQuant(bits=8),
        budget=None,
        residuals=None,
        bias_correction=False,
        activations=ActQuant(**acts),
    )


def _quantize(model, batches, config):
    cal = Calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, batches, config, calibration=cal)
    return q, cal


def _only_input(model, layers, name, step, grid, batches) -> float:
    """The measured relative output error with only ``name``'s input quantized at ``step``
    (weights and every other quantizer float), against the float model."""
    on = [False]

    def pre(mod, args):
        return (fake_quantize(args[0], step, grid),) if on[0] else None

    def run(quantized: bool):
        def f(batch):
            on[0] = quantized
            return model(batch)

        return f

    flags = {n: q.quant_enabled for n, q in layers.items()}
    hook = layers[name].register_forward_pre_hook(pre)
    for q in layers.values():
        q.set_quant_enabled(False)
    try:
        (e,) = relative_errors(batches, run(False), run(True))
    finally:
        hook.remove()
        for n, q in layers.items():
            q.set_quant_enabled(flags[n])
    return e


class _Tail(nn.Module):
    """``fc`` reads 16 features, per tensor: feature 0 heavy-tailed and weighted 20x, the others
    narrow. The MMSE step of the whole tensor clips feature 0's tail, which is what the output
    is made of; the min-max step does not."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 4)
        self.out = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.normal_(0, 0.05)
            self.fc.weight[:, 0] = 1.0

    def forward(self, x):
        return self.out(self.fc(x))


def _tail_batches(n=4, bs=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 16, generator=g) * 0.3
        x[:, 0] = torch.distributions.Laplace(0.0, 2.0).sample((bs,))
        out.append(x)
    return out


def test_range_errors_equal_the_measured_ones_for_each_candidate():
    """A linear network: the probe estimate of each input step (MMSE, min-max) is the measured
    error within its sampling error, and the pair keys are (input, output) indices."""
    batches = _tail_batches()
    q, cal = _quantize(_Tail().eval(), batches, _config(bits=4, choose_range=False))
    layers = dict(quantized_layers(q))
    ql = layers["fc"]
    mm = min_max_quantizer(ql.cfg, cal.stats["fc"], 4)
    cands = {"fc": ([(ql.act_scale, ql.a_grid), mm], [])}
    est = range_errors(q, layers, cands, batches, probes=64)["fc"]
    assert set(est) == {(0, 0), (1, 0)}
    for i, (s, g) in enumerate(cands["fc"][0]):
        measured = _only_input(q, layers, "fc", s, g, batches)
        assert measured > 1e-4
        assert est[(i, 0)] == pytest.approx(measured, rel=0.15), i


def test_the_min_max_step_is_measurably_better_where_the_tail_carries_the_output():
    """What the choice is for, measured (4-bit inputs, where the steps differ most): the MMSE
    step of the tensor clips feature 0's tail, the min-max step costs the output far less on
    held-out inputs, and the estimate ranks them the same way."""
    batches, held = _tail_batches(), _tail_batches(seed=7)
    q, cal = _quantize(_Tail().eval(), batches, _config(bits=4, choose_range=False))
    layers = dict(quantized_layers(q))
    ql = layers["fc"]
    mm = min_max_quantizer(ql.cfg, cal.stats["fc"], 4)
    assert float(mm[0]) > 1.5 * float(ql.act_scale)  # a different step
    e_mmse = _only_input(q, layers, "fc", ql.act_scale, ql.a_grid, held)
    e_mm = _only_input(q, layers, "fc", *mm, held)
    assert e_mm < 0.5 * e_mmse
    est = range_errors(q, layers, {"fc": ([(ql.act_scale, ql.a_grid), mm], [])}, batches)["fc"]
    assert est[(1, 0)] < est[(0, 0)]


def test_the_choice_is_the_pair_of_least_estimate_and_a_tie_keeps_the_calibrated_steps(
    monkeypatch,
):
    """8-bit inputs are scored (4-bit ones are not: the configuration's own choice); each layer
    takes its pair of least estimated error, a tie keeps the calibrated steps, and
    ``Calibration.corrections["min_max_ranges"]`` names what changed."""
    seen = {}

    def stub(model, layers, candidates, batches, probes=1, seed=0):
        seen.update(candidates)
        return {"fc": {(0, 0): 2e-6, (1, 0): 1e-6}, "out": {(0, 0): 1e-6, (1, 0): 1e-6}}

    batches = _tail_batches()
    model = _Tail().eval()
    q_off, cal_off = _quantize(model, batches, _config(choose_range=False))
    assert "min_max_ranges" not in cal_off.corrections  # the step does not run
    monkeypatch.setattr(pipeline, "range_errors", stub)
    _, cal4 = _quantize(model, batches, _config(bits=4))
    assert not seen and cal4.corrections["min_max_ranges"] == {}
    q, cal = _quantize(model, batches, _config())
    assert set(seen) == {"fc", "out"} and all(len(seen[n][0]) == 2 for n in seen)
    assert cal.corrections["min_max_ranges"] == {"fc": "input"}
    on, off = dict(quantized_layers(q)), dict(quantized_layers(q_off))
    want = min_max_quantizer(on["fc"].cfg, cal.stats["fc"], 8)
    assert float(on["fc"].act_scale) == float(want[0].float()) and on["fc"].a_grid == want[1]
    assert float(on["out"].act_scale) == float(off["out"].act_scale)  # the tie


class _Fork(nn.Module):
    """``c0``'s output, requantized, is read by ``c1`` and ``c2``: both share its quantizer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = self.c0(x)
        return self.c3(torch.cat([self.c1(h), torch.relu(self.c2(h))], 1))


def test_shared_quantizers_hold_one_step_after_the_choice(monkeypatch):
    """Force every candidate pair to min-max: every consumer of a shared quantizer still reads its
    producer's step (``share_scales`` runs again), and op sites that take a layer's quantizer
    take the changed one."""
    seen = {}

    def all_min_max(model, layers, candidates, batches, probes=1, seed=0):
        out = {}
        for n, (ins, outs) in candidates.items():
            i, j = len(ins) - 1 if ins else 0, len(outs) - 1 if outs else 0
            out[n] = {(i, j): 0.0}
        seen["candidates"] = candidates
        return out

    monkeypatch.setattr(pipeline, "range_errors", all_min_max)
    model, batches = _Fork().eval(), [torch.randn(4, 3, 8, 8) for _ in range(3)]
    cfg = QuantConfig(
        target="int8",
        weights=WeightQuant(bits=8),
        budget=None,
        residuals=None,
        activations=ActQuant(choose_range=True),
    )
    shares = {}
    real_plan = pipeline._plan

    def plan(r):
        real_plan(r)
        shares.update(r.shares)

    monkeypatch.setattr(pipeline, "_plan", plan)  # _steps reads the module's _plan
    q, cal = _quantize(model, batches, cfg)
    layers = dict(quantized_layers(q))
    assert cal.corrections["min_max_ranges"]  # something changed
    assert shares == {"c1": ("c0", "output"), "c2": ("c0", "output")}
    assert "c0" in cal.corrections["min_max_ranges"]  # the producer's output changed
    for consumer, (producer, kind) in shares.items():
        src = layers[producer]
        want = src.out_scale if kind == "output" else src.act_scale
        assert float(layers[consumer].act_scale) == float(want), consumer
    for consumer in shares:  # a reader of another's quantizer is never a candidate itself
        assert len(seen["candidates"][consumer][0]) <= 1


def test_one_estimate_pass_per_quantize_call_later_rounds_reuse_the_choice(monkeypatch):
    """The fallback's second round applies the first round's choice without another pass."""
    calls = []
    real = pipeline.range_errors

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "range_errors", counted)
    from test_fallback import _Stem, _w8a8

    model = _Stem(spread=2000.0).eval()
    torch.manual_seed(1)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    q, cal = _quantize(model, calib, _w8a8(activations=ActQuant(choose_range=True)))
    assert cal.fallback  # a second round ran
    assert len(calls) == 1
