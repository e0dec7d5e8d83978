"""The quantization pipeline: ``omse.quantize(model, calib_batches, QuantConfig(...))``.

:func:`quantize` copies the model and runs a list of steps chosen by the configuration, each a
model transform that works in place and records what it did in :class:`Calibration`:

0. ``functional``: ``nn.MultiheadAttention`` becomes :class:`~omse.transforms.functional.Attention`
   (four ``nn.Linear``); on a :class:`torch.fx.GraphModule` (or a model torch.fx traces),
   ``matmul``/``linear`` on constant weights become ``nn.Linear`` (:mod:`omse.transforms.functional`;
   an eager model without such calls is left as it is);
1. ``fold``: BatchNorm folded into the layer before it (:func:`~omse.transforms.fold.fold_batchnorm`);
2. ``equalize``: cross-layer equalization (``equalize=True``);
3. ``wrap``: every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear becomes a
   :class:`~omse.nn.layers.QuantizedLayer` with kernel-wise weights (layers left in float are
   listed; at the end :attr:`Calibration.float_weights` lists every float parameter with its share
   of the weights and the reason);
3b. ``precision`` (``QuantConfig.budget``, the default): each layer's weights at
   ``weights.bits`` or 8 bits, the exact knapsack of the estimated model-output errors within
   the byte budget (:mod:`omse.transforms.precision`: one forward and backward pass);
4. ``weights``: learned or GPTQ rounding and residual tensors (``rounding``, ``residuals``),
   from one pass of patch moments; learned rounding reconstructs the model's blocks one after
   the other (:mod:`omse.transforms.reconstruct`: two partial passes per block to capture its
   inputs, after one pass of activation histograms for the steps the loop starts from) or,
   ``LearnedRounding(scope="layer")``, each layer from its own pass of patch moments;
5. ``plan``: for ``target="int8"`` and ``"tflite"``, where output and shared quantizers go (a
   trace, no pass);
6. ``activations``: one pass of input (and output) histograms, then the scales;
6b. ``ranges`` (``ActQuant.choose_range``, opt-in): each layer's own 8-bit activation
   quantizers keep the method's step or take the min-max step, by the estimated effect of each on
   the model's output (one forward and backward pass over 16 samples, shared with the float
   fallback; later rounds reuse the first round's choice);
7. ``bias``: bias correction from one pass of patch means with the activations quantized.

The budget's guard (:func:`_guard`, after the last step): one pass measures the calibrated
model's output error and that of its 8-bit-weight version; when the plan's output SQNR is more
than ``Budget.guard_db`` below, the budget grows and the steps run again on a fresh copy (at
most :data:`GUARD_ROUNDS` calibrations), with a warning that says so.

Passes over the calibration data (:mod:`omse.transforms.statistics`): one per stage whose
statistics must see the stage before: ``weights`` (the float activations of the wrapped model; a
second one when GPTQ rounding precedes residuals, since it changes every layer's input),
``activations`` (after the weights are final) and ``bias`` (after the activations are quantized).
A later round (the float fallback's, the guard's) reuses the activations pass of the round
before when it would see the same model, and bins only the histograms that pass did not make
(:class:`_StatsMemo`).

Sharded calibration: under an initialised ``torch.distributed`` process group, call
:func:`quantize` on every rank with that rank's batches (:func:`omse.distributed.shard`, or a
``DataLoader`` with a ``DistributedSampler``); every pass reduces its statistics across the ranks
(:mod:`omse.transforms.statistics`), the steps that trace or check the model on one example
batch (``fold``, ``equalize``, ``plan``) use rank 0's first batch (global batch 0) on every rank,
progress bars show on rank 0 only, and ``Calibration.batches`` counts the batches of all ranks.
Every rank returns the same model as one process given all batches in global order.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..config import GPTQ, INTEGER_TARGETS, LayerConfig, LearnedRounding, Nearest, QuantConfig
from ..core.granularity import PerTensor
from ..core.stats import HistogramStats
from ..distributed import all_max, broadcast, gather, is_main, run_checked, world
from ..errors import CalibrationError, ConfigError, UnsupportedLayerError, model_forward_errors
from ..nn.layers import WRAPPABLE, QuantizedLayer, quantized_layers
from ..nn.ops import op_quantizers
from ..runtime import name_list
from ..runtime import progress as progress_bar
from . import functional
from .bias_correction import bias_correction
from .calibration import (
    OUTPUT_BITS,
    FitCache,
    PlanTrace,
    cap_activation_scales,
    gather_site_stats,
    int8_weight_grid,
    keep_first_layer_8bit,
    min_max_quantizer,
    observe_sites,
    plan_op_quantizers,
    plan_output_quantizers,
    plan_trace,
    set_activation_scales,
    set_op_scales,
    set_output_scales,
    share_scales,
)
from .equalize import equalize
from .fold import _set_module, fold_batchnorm
from .learned import learned_rounding
from .onnx_import import load_onnx, matmul_constants
from .precision import (
    Choice,
    PrecisionPlan,
    activation_errors,
    calibrated_quantizers,
    candidate_weight,
    cheapest,
    choose,
    eight_bit_weights,
    output_errors,
    range_errors,
    relative_errors,
    residual_bytes,
    residual_kernel_bytes,
    scaled_error,
    weight_bytes,
)
from .reconstruct import find_blocks, reconstruct
from .residuals import select_residuals
from .rounding import gptq_terms
from .sensitivity import network_errors
from .statistics import LayerStatistics, Needs, collect, first_row, run_model, state_fingerprint
from .tflite_import import is_tflite, load_tflite

__all__ = ["quantize", "Calibration", "prepare_batches", "UNSUPPORTED"]

# Layer types with weights that omse does not quantize (left in float with a warning).
UNSUPPORTED = (
    nn.LSTM,
    nn.GRU,
    nn.RNN,
    nn.MultiheadAttention,
    nn.Bilinear,
)


@dataclass
class Calibration:
    """What calibration produced: per-layer input statistics, timings and notes."""

    stats: dict[str, HistogramStats] = field(default_factory=dict)
    seconds: float = 0.0
    folded: list[tuple[str, str]] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)
    equalized: list[tuple[str, str]] = field(default_factory=list)
    corrections: dict = field(default_factory=dict)
    batches: int = 0
    output_stats: dict[str, HistogramStats] = field(default_factory=dict)
    output_quantized: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    """What :func:`omse.transforms.functional.apply` rewrote (matmul/linear -> nn.Linear), or why
    it did not."""
    float_weights: list[functional.FloatWeight] = field(default_factory=list)
    """Every parameter left in float, with its share of the model's weight values and why."""
    precision: PrecisionPlan | None = None
    """Each layer's weight width, its candidates' bytes and estimated errors, the budget and
    the guard's measurements (``QuantConfig.budget``; None without a budget)."""
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Every calibration round's seconds, in order: of each step (``"wrap"``, ``"plan"``,
    ``"activations"``, ...), of its activation statistics pass alone (``"statistics pass"``,
    when the round made one rather than reusing the first round's), and of the measurement that
    ended it (``"fallback"``: the float fallback's estimate, after the first round; ``"guard"``:
    the budget guard's check). Where the time of a whole :func:`quantize` call went
    (``benchmarks/calibration_profile.py``)."""
    fallback: dict[str, float] = field(default_factory=dict)
    """The layers the float fallback (``ActQuant.fallback_db``) runs with float activations
    (their weights stay quantized, at 8 bits: :meth:`QuantConfig.with_float_activations`), each
    with the estimated output SQNR (dB) of the model with only that layer's activations
    quantized."""

    @property
    def timings(self) -> dict[str, float]:
        """The last round's :attr:`rounds` entry (the round in progress while one runs)."""
        return self.rounds[-1] if self.rounds else {}

    @property
    def float_share(self) -> float:
        """The share (0..1) of the model's weight values left in float."""
        return sum(f.share for f in self.float_weights)


def _first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        raise ConfigError(
            "dict batches are passed as keyword arguments; use calib batches of tensors"
        )
    raise CalibrationError(
        f"calibration batch of type {type(batch).__name__} is not a tensor or (inputs, labels) tuple"
    )


def prepare_batches(calib_batches: Iterable) -> list:
    """Validate calibration data; returns a re-iterable list of model inputs.

    Each batch is a tensor, an ``(inputs, ...)`` tuple (the first item is used) or a dict of
    keyword tensors (transformers). One-shot iterators are read once into a list.
    """
    if calib_batches is None:
        raise CalibrationError("calib_batches is None; pass an iterable of input batches")
    if isinstance(calib_batches, torch.Tensor):
        raise CalibrationError(
            "calib_batches is a single tensor; pass an iterable of batches, e.g. [x] or x.split(8)"
        )
    try:
        batches = list(calib_batches) if isinstance(calib_batches, Iterator) else calib_batches
        items = list(batches)
    except TypeError:
        raise CalibrationError(
            f"calib_batches of type {type(calib_batches).__name__} is not iterable"
        ) from None
    if not items:
        raise CalibrationError("calib_batches is empty; omse needs at least one calibration batch")
    out = []
    ref_shape = None
    for i, b in enumerate(items):
        if isinstance(b, dict):
            for k, v in b.items():
                if (
                    isinstance(v, torch.Tensor)
                    and v.is_floating_point()
                    and not torch.isfinite(v).all()
                ):
                    raise CalibrationError(f"calibration batch {i} input {k!r} contains NaN or Inf")
            out.append(b)
            continue
        x = _first_tensor(b)
        if not x.is_floating_point():
            raise CalibrationError(
                f"calibration batch {i} has dtype {x.dtype}; the model's inputs must be floating point"
            )
        if not torch.isfinite(x).all():
            raise CalibrationError(f"calibration batch {i} contains NaN or Inf")
        if ref_shape is None:
            ref_shape = x.shape[1:]
        elif x.shape[1:] != ref_shape:
            raise CalibrationError(
                f"calibration batch {i} has shape {tuple(x.shape)}, unlike batch 0 {tuple((-1, *ref_shape))}"
            )
        out.append(x)
    return out


def _check_weights(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        if nn.parameter.is_lazy(p):
            raise ConfigError(
                f"parameter {n!r} is uninitialized (a Lazy module); run the model once on an "
                "input before quantizing it"
            )
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ConfigError(f"parameter {n!r} contains NaN or Inf; omse cannot quantize it")
    for n, b in model.named_buffers():  # e.g. BatchNorm running statistics, folded into weights
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise ConfigError(f"buffer {n!r} contains NaN or Inf; omse cannot quantize the model")


def _checked_inputs(model: nn.Module, calib_batches: Iterable) -> list:
    batches = prepare_batches(calib_batches)
    _check_weights(model)
    return batches


@dataclass
class _Run:
    """What the steps of one :func:`quantize` call share."""

    qmodel: nn.Module
    batches: list
    config: QuantConfig
    cal: Calibration
    progress: bool
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    out_clamp: dict[str, tuple[float, float]] = field(default_factory=dict)
    shares: dict[str, tuple[str, str]] = field(default_factory=dict)
    caps: dict[str, float] = field(default_factory=dict)
    example: object = None  # global batch 0 (rank 0's first batch under torch.distributed)
    learned_act: dict[str, torch.Tensor] = field(default_factory=dict)
    plan: PrecisionPlan | None = None  # the guard's next round: the widths to apply, estimates
    w8: dict[str, torch.Tensor] = field(default_factory=dict)  # 8-bit weights of <8-bit layers
    site_stats: dict = field(default_factory=dict)  # op quantizer sites' histograms
    act_errors: dict[str, float] | None = None  # the range choice's estimates, for the fallback
    ranges: dict[str, tuple[int, int]] | None = None  # the range choice, kept across rounds
    traced: PlanTrace | None = None  # the plans' trace; a later round reuses it (same model)
    memo: _StatsMemo | None = None  # the activations pass's statistics; a later round may reuse


@dataclass
class _StatsMemo:
    """One round's activation statistics (:func:`_activations`) and the steps fitted to them,
    for the next round of the same :func:`quantize` call. The pass runs before any activation
    quantizer is set, so it is a function of the model's parameters and buffers and of whether
    op quantizers run (their site mode computes a SiLU as ``x * sigmoid(x)``, in float another
    rounding than ``silu``): a round whose model has the same :func:`state_fingerprint` and
    site mode (the float fallback's second round on ``target="int8"``, where the fallback's
    layers keep the 8-bit weights they had) reuses them, bit for bit what its own pass would
    give; the histograms the first round did not make (a new or other output clamp, an op site
    the new plan quantizes) come from a pass that bins only those (:meth:`top_up`)."""

    state: bytes
    sites_mode: tuple | None  # how the op sites run the forward (None: no op quantizers)
    needs: Needs
    stats: dict[str, LayerStatistics]
    site_stats: dict[int, HistogramStats]
    fits: FitCache = field(default_factory=FitCache)

    def reuse(
        self, state: bytes, sites_mode: tuple | None, needs: Needs, sites: set[int]
    ) -> tuple[dict[str, LayerStatistics], dict[int, HistogramStats], Needs, set[int]] | None:
        """The statistics a pass for ``needs`` and the op sites ``sites`` would gather, from
        these, and what they lack: ``(stats, site_stats, needs of the missing output
        histograms, missing sites)``; None when the pass would see other values."""
        if state != self.state or sites_mode != self.sites_mode or needs.bins != self.needs.bins:
            return None
        clamp, had = needs.clamps, self.needs.clamps
        stats = {
            n: replace(st, output=st.output if had.get(n) == clamp.get(n) else None)
            for n, st in self.stats.items()
        }
        missing = tuple((n, lo, hi) for n, lo, hi in needs.output_clamp if had.get(n) != (lo, hi))
        site_stats = {k: self.site_stats[k] for k in sites if k in self.site_stats}
        return (
            stats,
            site_stats,
            Needs(output_clamp=missing, bins=needs.bins),
            sites - site_stats.keys(),
        )

    def top_up(
        self,
        needs: Needs,
        more: dict[str, LayerStatistics],
        more_sites: dict[int, HistogramStats],
    ) -> None:
        """Add the output histograms of a pass for ``needs`` (``more``: the clamps
        :meth:`reuse` found missing) and its site histograms (``more_sites``) to the memo."""
        for n in needs.clamps:
            self.stats[n] = replace(self.stats[n], output=more[n].output)
        clamps = {**self.needs.clamps, **needs.clamps}
        self.needs = replace(self.needs, output_clamp=tuple((n, *c) for n, c in clamps.items()))
        self.site_stats.update(more_sites)


def _fold(r: _Run) -> None:
    with model_forward_errors(0, r.example):  # one sample traces the pairs and checks the fold
        r.cal.folded = fold_batchnorm(r.qmodel, first_row(r.example))


def _equalize(r: _Run) -> None:
    r.cal.equalized = equalize(r.qmodel, r.example)


def _wrap(r: _Run) -> None:
    config, qmodel, cal = r.config, r.qmodel, r.cal
    names = [n for n, _ in qmodel.named_modules() if n]
    bad = config.unmatched_patterns(names)
    if bad:
        warnings.warn(f"override/skip patterns match no module: {bad}", stacklevel=4)
    targets: dict[str, nn.Module] = {}
    floats: list[str] = []
    for name, m in qmodel.named_modules():
        if not name or config.is_skipped(name):
            continue
        if any(name.startswith(t + ".") for t in (*targets, *floats)):
            continue  # inside a wrapped layer, or read by a float layer's own forward
        if isinstance(m, WRAPPABLE):
            targets[name] = m
        elif isinstance(m, UNSUPPORTED) or (
            type(m).__module__.split(".")[0] not in ("torch", "onnx2torch")
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        ):
            floats.append(name)
            cal.left_float.append(f"{name} ({type(m).__name__})")
    cal.left_float += [f"{n} (ONNX MatMul on a constant weight)" for n in matmul_constants(qmodel)]
    if cal.left_float:
        total = sum(p.numel() for p in qmodel.parameters())
        share = sum(p.numel() for n in floats for p in qmodel.get_submodule(n).parameters())
        share /= max(total, 1)
        msg = (
            f"omse leaves {len(cal.left_float)} layer{'s' if len(cal.left_float) > 1 else ''} "
            f"in float (unsupported type): {name_list(cal.left_float)}"
        )
        msg += (
            f" ({share:.1%} of the model's weight values stay float in all; "
            "Calibration.left_float lists every layer, Calibration.float_weights each parameter "
            "and why)"
        )
        if config.strict:
            raise UnsupportedLayerError(msg + "; remove strict=True or add them to skip")
        warnings.warn(msg, stacklevel=4)
    if not targets:
        raise ConfigError(
            "the model has no Conv/ConvTranspose/Linear layer to quantize (after skip)"
        )
    tensorwise: list[str] = []
    for name, m in progress_bar(
        targets.items(), desc="weights", disable=not r.progress, leave=False
    ):
        cfg = _runtime_cfg(config.for_layer(name), m)
        if cfg != config.for_layer(name):
            tensorwise.append(name)
        ql = QuantizedLayer(m, name, cfg, int8_weight_grid(cfg, m))
        _set_module(qmodel, name, ql)
        r.layers[name] = ql
    if tensorwise:
        warnings.warn(
            f"{len(tensorwise)} Linear layer(s) get one weight scale per tensor at "
            f"{config.weights.bits} bits ({name_list(tensorwise)}): TensorFlow Lite Micro runs "
            "FULLY_CONNECTED with per-channel INT8 or per-tensor INT4 filters",
            stacklevel=4,
        )
    if config.target == "int8":
        keep_first_layer_8bit(qmodel, r.layers, r.example)


PROBE_SAMPLES = 32
"""Gaussian probes of the precision estimate: ``ceil(PROBE_SAMPLES / samples)`` per batch, at
most 4 (one for 32 calibration samples or more)."""


def _samples(batches: list) -> int:
    """Calibration samples in ``batches`` (rows of the first batch times the batches)."""
    if not batches:
        return 0
    first = batches[0]
    if isinstance(first, dict):
        t = next((v for v in first.values() if torch.is_tensor(v)), None)
        rows = 1 if t is None or t.dim() == 0 else t.shape[0]
    else:
        rows = first.shape[0] if first.dim() else 1
    return rows * len(batches)


def _runtime_cfg(cfg: LayerConfig, layer: nn.Module) -> LayerConfig:
    """``cfg`` as the target's runtime can run the layer: ``target="tflite"`` Linear layers of
    <= 4 bits get one scale per tensor (TFLM's FULLY_CONNECTED takes per-channel INT8 or
    per-tensor INT4 filters, no per-channel INT4 one)."""
    if cfg.target == "tflite" and isinstance(layer, nn.Linear) and cfg.weight_bits <= 4:
        return replace(cfg, granularity=PerTensor())
    return cfg


def _rewrap(r: _Run, name: str, bits: int) -> None:
    """Give layer ``name`` weights of ``bits`` bits (a new :class:`QuantizedLayer` from the
    float layer)."""
    q = r.layers[name]
    q.set_quant_enabled(False)  # the float weight back in the wrapped layer
    cfg = replace(r.config.for_layer(name), weight_bits=bits)
    cfg = _runtime_cfg(cfg, q.layer)
    ql = QuantizedLayer(q.layer, name, cfg, int8_weight_grid(cfg, q.layer))
    _set_module(r.qmodel, name, ql)
    r.layers[name] = ql


def _precision(r: _Run) -> None:
    """Per-layer weight widths within the byte budget (:mod:`omse.transforms.precision`): each
    choosable layer (no override sets its ``weight_bits``; below 8 bits) at its ``weight_bits``
    or at 8 bits, by the estimated model-output error of each (one forward and backward pass),
    the plan the exact knapsack finds; a layer whose fewer bits would take as many bytes (every
    layer on ``target="int8"``) takes 8 bits, without the pass. On ``target="int4"`` with
    residual tensors a layer below 8 bits is charged its residual kernels' share too
    (``PrecisionPlan.residual_share``; :func:`_residuals` spends what the widths leave). In the
    guard's later rounds the plan is given."""
    c, target = r.config, r.config.target
    plan = r.plan
    if plan is None:
        plan = PrecisionPlan()
        free = {
            n: q for n, q in r.layers.items() if not c.sets_weight_bits(n) and q.cfg.weight_bits < 8
        }
        plan.fixed = [n for n in r.layers if n not in free]
        plan.bytes_8bit = sum(weight_bytes(q, 8, target) for q in r.layers.values())
        plan.budget_bytes = c.budget.bytes_for(plan.bytes_8bit)
        # fewer bits that save no byte (int8 holds 4-bit codes in a byte) lose only accuracy:
        # those layers take 8 bits without the estimate's pass
        at8 = {
            n
            for n, q in free.items()
            if weight_bytes(q, q.cfg.weight_bits, target) >= weight_bytes(q, 8, target)
        }
        free = {n: q for n, q in free.items() if n not in at8}
        plan.fixed += sorted(at8)
        low = {n: {q.cfg.weight_bits: q.dequantized_weight()} for n, q in free.items()}
        samples = sum(gather(_samples(r.batches)))  # every rank's: the same probes on each
        probes = min(4, -(-PROBE_SAMPLES // max(samples, 1)))
        errs = output_errors(r.qmodel, r.layers, low, r.batches, probes)[0] if low else {}
        plan.choices = {}
        for n, q in free.items():
            (lb, lw), w8 = next(iter(low[n].items())), candidate_weight(q, 8)
            r.w8[n] = w8
            e8 = scaled_error(errs[n][lb], q.float_weight, lw, w8)
            plan.choices[n] = [
                Choice(lb, weight_bytes(q, lb, target), errs[n][lb]),
                Choice(8, weight_bytes(q, 8, target), e8),
            ]
        fixed_bytes = sum(
            weight_bytes(r.layers[n], 8 if n in at8 else r.layers[n].cfg.weight_bits, target)
            for n in plan.fixed
        )
        if target == "int4" and c.residuals is not None:  # residual kernels paid from it too
            plan.residual_share = c.residuals.extra_mac_budget
        chosen = choose(plan.choices, plan.budget_bytes - fixed_bytes, share=plan.residual_share)
        if chosen is None or fixed_bytes + plan.chosen_bytes(chosen) > plan.budget_bytes:
            # no plan within the budget once each layer below 8 bits is charged its residual
            # share: the least error at the fewest bytes, and what the budget leaves of it
            # still goes to residual kernels; below even that plan's bytes the plan takes them
            chosen = cheapest(plan.choices)
            least = fixed_bytes + plan.chosen_bytes(chosen)
            if least > plan.budget_bytes:
                if target != "int8":  # int8 holds every width in 8 bits: no bytes to save
                    warnings.warn(
                        f"weight budget {c.budget} ({plan.budget_bytes:,} bytes) is below the "
                        f"smallest plan ({least:,} bytes = "
                        f"{least / max(plan.bytes_8bit, 1):.2f}x the 8-bit weights): the plan "
                        "takes that",
                        stacklevel=4,
                    )
                plan.budget_bytes = least
        plan.bits = {
            n: 8 if n in at8 else chosen.get(n, q.cfg.weight_bits) for n, q in r.layers.items()
        }
        r.plan = plan
    changed = [n for n, bits in plan.bits.items() if bits != r.layers[n].cfg.weight_bits]
    for n in changed:
        _rewrap(r, n, plan.bits[n])
    if changed and c.target == "int8":
        keep_first_layer_8bit(r.qmodel, r.layers, r.example)
    plan.bytes = sum(weight_bytes(r.layers[n], b, target) for n, b in plan.bits.items())
    r.w8 = {  # the guard's 8-bit version of each layer below 8 bits
        n: r.w8[n] if n in r.w8 else candidate_weight(q, 8)
        for n, q in r.layers.items()
        if q.cfg.weight_bits < 8
    }
    r.cal.precision = plan


def _learned(r: _Run) -> None:
    """Learned rounding, layer after layer: each from the inputs the layers before it (already
    rounded) produce, one pass of that layer's patch moments each."""
    rounding, info = r.config.rounding, {}
    assert isinstance(rounding, LearnedRounding)
    needs = Needs(patch_moments=True)
    items = list(r.layers.items())
    for name, q in progress_bar(
        items, desc="learned rounding", disable=not r.progress, leave=False
    ):
        st = collect(r.qmodel, {name: q}, r.batches, needs, False, "layer statistics")[name]
        info[name] = learned_rounding(q, st, rounding.iters, rounding.lr, rounding.reg)
    r.cal.corrections["learned_rounding"] = info


def _residuals(r: _Run) -> None:
    """Residual kernels within the extra-MAC budget. Under a weight budget only the layers below
    8 bits compete (and only their patch moments are gathered): the budget is then a fraction of
    those layers' MACs; an 8-bit layer's residual would buy next to nothing. On
    ``target="int4"`` (each term its own tensor) their bytes stay within what the plan's widths
    leave of the byte budget too. ``target="tflite"`` under a byte budget takes none: a residual
    term is written as the layer's INT8 filter (``k*Q1 + Q2``), which the byte budget already
    weighs against that layer's plain 8 bits."""
    if r.config.target == "tflite" and r.cal.precision is not None:
        return
    layers = r.layers
    if r.cal.precision is not None:
        layers = {n: q for n, q in r.layers.items() if q.cfg.weight_bits < 8}
        if not layers:
            return
    plan, target = r.cal.precision, r.config.target
    max_bytes = kernel_bytes = None
    if plan is not None and target == "int4":  # written as their own tensors: within the budget
        max_bytes = max(0, plan.budget_bytes - plan.bytes)
        kernel_bytes = {n: residual_kernel_bytes(q, target) for n, q in layers.items()}
        if not max_bytes:
            return
    stats = collect(
        r.qmodel, layers, r.batches, Needs(patch_moments=True), r.progress, "layer statistics"
    )
    res = r.config.residuals
    assert res is not None
    sens = None
    if res.criterion == "network":
        sens = network_errors(r.qmodel, layers, r.batches, r.progress)
        r.cal.corrections["network_errors"] = sens
    r.cal.corrections["residual_kernels"] = select_residuals(
        layers, stats, res.extra_mac_budget, res.criterion, res.max_terms, sens,
        max_bytes, kernel_bytes,
    )  # fmt: skip


def _reconstruct(r: _Run) -> None:
    """Block reconstruction (:mod:`omse.transforms.reconstruct`), with residual kernels chosen
    before (``LearnedRounding(terms="all")``) or after it; activation steps calibrated first when the
    activations are in the loop."""
    c = r.config.rounding
    assert isinstance(c, LearnedRounding)
    if c.act_loop and any(q.cfg.act_bits is not None for q in r.layers.values()):
        _activations(r)  # the MMSE steps the loop starts from (calibrated again afterwards)
    budget = r.config.residuals is not None
    if budget and c.terms == "all":
        _residuals(r)
    blocks = find_blocks(r.qmodel, r.layers, c.blocks)
    info = reconstruct(
        r.qmodel,
        r.layers,
        r.batches,
        blocks,
        iters=c.iters,
        lr=c.lr,
        reg=c.reg,
        batch=c.batch,
        drop=c.drop,
        act_loop=c.act_loop,
        learn_act=c.learn_act,
        learn_scales=c.learn_scales,
        terms=c.terms,
        seed=c.seed,
        progress=r.progress,
    )
    r.cal.corrections["reconstruction"] = info
    if c.learn_act:
        r.learned_act = {n: q.act_scale for n, q in r.layers.items() if q.act_scale is not None}
    if budget and c.terms == "first":
        _residuals(r)


def _weights(r: _Run) -> None:
    """Learned or GPTQ rounding, then residual tensors (chosen from the errors that remain after
    rounding, from a pass of patch moments over the rounded model)."""
    config, layers = r.config, r.layers
    if isinstance(config.rounding, LearnedRounding) and config.rounding.scope == "block":
        _reconstruct(r)
        return
    if isinstance(config.rounding, LearnedRounding):
        _learned(r)
    elif isinstance(config.rounding, GPTQ):
        needs = Needs(patch_moments=True)
        stats = collect(r.qmodel, layers, r.batches, needs, r.progress, "layer statistics")
        for name, q in progress_bar(layers.items(), desc="output-aware", disable=not r.progress):
            if stats[name].H is not None:
                gptq_terms(q, stats[name])
    if config.residuals is not None:  # a new pass: the rounding changed every layer's input
        _residuals(r)


def _plan(r: _Run) -> None:
    """Output, shared and op quantizers (:mod:`omse.transforms.calibration`), from one trace of
    the model (:func:`plan_trace`), the previous round's when the model is the same."""
    r.traced = plan_trace(r.qmodel, r.layers, r.example, reuse=r.traced)
    r.out_clamp, r.shares, r.caps = plan_output_quantizers(r.qmodel, r.layers, r.example, r.traced)
    r.cal.output_quantized = sorted(r.out_clamp)
    plan_op_quantizers(r.qmodel, r.layers, r.example, r.out_clamp, r.traced)  # between the layers


def _activations(r: _Run) -> None:
    needs = Needs(
        input_histograms=True,
        output_clamp=tuple((n, lo, hi) for n, (lo, hi) in r.out_clamp.items()),
        bins=r.config.activations.bins,
    )
    ops = op_quantizers(r.qmodel)
    sites = {k for k, v in ops.kinds.items() if v == "own"} if ops is not None else set()
    state = state_fingerprint(r.qmodel)
    mode = None if ops is None else (ops.extra_sites,)
    kept = r.memo.reuse(state, mode, needs, sites) if r.memo is not None else None
    # every rank passes when one must (they agree in practice): a whole pass when the memo is of
    # no use, else one that bins only the histograms it lacks (None: every site)
    fresh = bool(all_max(int(kept is None)))
    lack, lack_sites = (needs, None) if fresh or kept is None else (kept[2], kept[3])
    if fresh or all_max(int(bool(lack.output_clamp or lack_sites))):
        t = time.perf_counter()
        with observe_sites(ops, r.config.activations.bins, only=lack_sites) as got:
            desc = "calibrating" if fresh else "top-up"
            more = collect(r.qmodel, r.layers, r.batches, lack, r.progress, desc)
        r.cal.timings["statistics pass"] = time.perf_counter() - t
        got = gather_site_stats(got) if ops is not None else {}
        if fresh:
            r.memo = _StatsMemo(state, mode, needs, more, got)
            kept = (more, got, lack, set())
        else:
            r.memo.top_up(lack, more, got)
            kept = r.memo.reuse(state, mode, needs, sites)  # now lacking nothing
    assert kept is not None
    stats, site_stats, _, _ = kept
    for n, q in r.layers.items():
        q.macs = stats[n].macs
    fits = r.memo.fits
    r.cal.stats = {n: st.input for n, st in stats.items() if st.input is not None}
    r.cal.output_stats = {n: st.output for n, st in stats.items() if st.output is not None}
    set_activation_scales(r.layers, r.cal.stats, fits)
    for n, s in r.learned_act.items():  # steps block reconstruction learned
        r.layers[n].set_act(s, r.layers[n].a_grid)
    cap_activation_scales(r.layers, r.caps)
    set_output_scales(r.layers, r.cal.output_stats, fits)
    share_scales(r.layers, r.shares)
    if ops is not None:
        set_op_scales(ops, r.layers, site_stats, r.config.base_layer(), fits)
    r.site_stats = site_stats


def _scored(r: _Run) -> dict[str, QuantizedLayer]:
    """The layers whose activation quantizers the range choice and the float fallback score:
    those with an input or output quantizer and 8-bit activations (fewer bits are the
    configuration's own choice)."""
    return {
        n: q
        for n, q in r.layers.items()
        if ((q.act_scale is not None and q.a_grid is not None) or q.out_grid is not None)
        and (q.cfg.act_bits or 0) >= 8
    }


def _first_samples(batches: list, samples: int) -> list:
    """This rank's share of the first global batches that hold at least ``samples`` samples
    (all if fewer): rank ``r``'s ``i``-th batch is global batch ``i * size + r``, so under
    ``torch.distributed`` the ranks together read what one process given every batch reads."""
    rank, size = world()
    sizes = (
        gather([_samples([b]) for b in batches]) if size > 1 else [[_samples([b]) for b in batches]]
    )
    order = sorted((i * size + r, n) for r, part in enumerate(sizes) for i, n in enumerate(part))
    count, seen = 0, 0
    for _, n in order:
        if seen >= samples:
            break
        count += 1
        seen += n
    return [b for i, b in enumerate(batches) if i * size + rank < count]


def _range_candidates(r: _Run, n: str, q: QuantizedLayer, op_shared: set) -> tuple[list, list]:
    """A scored layer's input and output quantizers: as calibrated first, then the min-max one
    (:func:`~omse.transforms.calibration.min_max_quantizer`) where the layer owns the quantizer:
    not an input it reads from another layer or an op site, that a ReLU6 caps, or that block
    reconstruction learned."""
    elsewhere = n in r.shares or n in r.caps or n in r.learned_act or n in op_shared
    ins, outs = calibrated_quantizers(q)
    st = r.cal.stats.get(n)
    if ins and not elsewhere and st is not None and st.n > 0:
        ins.append(min_max_quantizer(q.cfg, st, q.cfg.act_bits))
    st = r.cal.output_stats.get(n)
    if outs and st is not None and st.n > 0:
        outs.append(min_max_quantizer(q.cfg, st, OUTPUT_BITS))
    return ins, outs


def _ranges(r: _Run) -> None:
    """``ActQuant.choose_range``: each scored layer's own activation quantizers
    (:func:`_scored`, :func:`_range_candidates`) keep the calibrated step or take the min-max
    one, the pair of least estimated output error (:func:`range_errors`, one forward and
    backward pass over the first :data:`FALLBACK_SAMPLES` samples; a tie keeps the calibrated
    steps); readers of a changed quantizer follow it. The first round chooses (its errors are
    what the float fallback reads); :func:`quantize`'s later rounds apply the same choices
    without the pass (``r.ranges``). ``Calibration.corrections["min_max_ranges"]`` lists the
    layers whose quantizers took the min-max step."""
    ops = op_quantizers(r.qmodel)
    op_shared = set(ops.shared) if ops is not None else set()
    candidates = {n: _range_candidates(r, n, q, op_shared) for n, q in _scored(r).items()}
    if r.ranges is None:
        batches = _first_samples(r.batches, FALLBACK_SAMPLES)
        errors = range_errors(r.qmodel, r.layers, candidates, batches, probes=1)
        r.act_errors, r.ranges = {}, {}
        for n, errs in errors.items():
            r.ranges[n] = min(errs, key=lambda k: (errs[k], k))
            r.act_errors[n] = errs[r.ranges[n]]
    changed = {}
    for n, (i, j) in r.ranges.items():
        ins, outs = candidates.get(n, ([], []))
        if 0 < i < len(ins):
            r.layers[n].set_act(*ins[i])
            changed[n] = "input"
        if 0 < j < len(outs):
            r.layers[n].set_output(*outs[j])
            changed[n] = "input and output" if n in changed else "output"
    r.cal.corrections["min_max_ranges"] = changed
    if changed:  # readers of a changed quantizer take it again
        share_scales(r.layers, r.shares)
        if ops is not None:
            set_op_scales(ops, r.layers, r.site_stats, r.config.base_layer())


def _bias(r: _Run) -> None:
    stats = collect(r.qmodel, r.layers, r.batches, Needs(patch_means=True), r.progress, "bias")
    r.cal.corrections["bias_corrected"] = bias_correction(r.layers, stats)


def _steps(config: QuantConfig, fold_bn: bool, keyword_inputs: bool) -> list[Callable]:
    """The steps the configuration asks for, in order (see the module docstring)."""
    steps: list[Callable] = []
    if fold_bn and not keyword_inputs:
        steps.append(_fold)
    if config.equalize and not keyword_inputs:
        steps.append(_equalize)
    steps.append(_wrap)
    if config.budget is not None:
        steps.append(_precision)
    if not isinstance(config.rounding, Nearest) or config.residuals is not None:
        steps.append(_weights)
    if config.target in INTEGER_TARGETS:
        steps.append(_plan)
    steps.append(_activations)
    if config.activations.choose_range and config.activations.bits is not None:
        steps.append(_ranges)
    if config.bias_correction:
        steps.append(_bias)
    return steps


GUARD_ROUNDS = 3
"""At most this many calibrations of one :func:`quantize` call: the budget's plan, and up to two
larger budgets when the guard finds the plan too far below its 8-bit-weight version."""


def _fresh_copy(model: nn.Module, batches: list, cal: Calibration) -> nn.Module:
    """An eval copy of ``model`` without gradients, matmul/linear rewritten (see ``functional``),
    the ONNX import's attributes kept."""
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    qmodel, cal.rewritten = functional.apply(qmodel, batches[0])
    for attr in ("omse_io", "omse_onnx", "omse_tflite"):  # an fx.GraphModule's deepcopy drops them
        if hasattr(model, attr):
            setattr(qmodel, attr, copy.deepcopy(getattr(model, attr)))
    return qmodel


def _guard(r: _Run) -> PrecisionPlan | None:
    """The budget's guard: the calibrated model's relative output error ``e`` and that of its
    8-bit-weight version ``e8`` (every layer below 8 bits given its 8-bit MMSE weight, all else
    as calibrated), one pass. When ``10 log10(e / e8) > guard_db``, returns the plan of the next
    round: the smallest budget (in steps of 5% of the 8-bit weight bytes) whose estimated excess
    error, scaled by the measured/estimated ratio of this round, fits the tolerance with a 20%
    margin, or every layer at 8 bits in the last round. Otherwise ``None``."""
    plan, budget = r.plan, r.config.budget
    low = {n: q for n, q in r.layers.items() if q.cfg.weight_bits < 8}
    if plan is None or budget is None or budget.guard_db is None or not low:
        return None
    layers = r.layers
    flags = {n: q.quant_enabled for n, q in layers.items()}

    def float_run(batch):
        for q in layers.values():
            q.set_quant_enabled(False)
        try:
            return run_model(r.qmodel, batch)
        finally:
            for n, q in layers.items():
                q.set_quant_enabled(flags[n])

    def eight_bit_run(batch):
        with eight_bit_weights(low, r.w8):
            return run_model(r.qmodel, batch)

    e, e8 = relative_errors(r.batches, float_run, lambda b: run_model(r.qmodel, b), eight_bit_run)
    gap = 10 * math.log10(max(e, 1e-300) / max(e8, 1e-300))
    tol = budget.guard_db
    record = {"budget_bytes": plan.budget_bytes, "bytes": plan.bytes, "error": e,
              "error_8bit": e8, "gap_db": gap, "passed": gap <= tol}  # fmt: skip
    plan.guard.append(record)
    if gap <= tol or len(plan.guard) >= GUARD_ROUNDS:
        if gap > tol:
            warnings.warn(
                f"per-layer precision: the plan's output SQNR stays {gap:.1f} dB below its "
                f"8-bit-weight version's (guard {tol:g} dB) after {len(plan.guard)} rounds",
                stacklevel=3,
            )
        return None
    eight = {n: max(ch.bits for ch in cs) for n, cs in plan.choices.items()}
    est8 = plan.estimated_error(eight)
    ratio = (e - e8) / max(plan.estimated_error() - est8, 1e-300)
    allowed = 0.8 * e8 * (10 ** (tol / 10) - 1)
    fixed = plan.bytes - plan.chosen_bytes()  # the layers an override fixed
    bits = eight
    last = len(plan.guard) >= GUARD_ROUNDS - 1
    step = max(1, plan.bytes_8bit // 20)
    b = plan.budget_bytes + step
    while not last and b < plan.bytes_8bit:
        chosen = choose(plan.choices, b - fixed, share=plan.residual_share)
        if chosen is not None and ratio * (plan.estimated_error(chosen) - est8) <= allowed:
            bits = chosen
            break
        b += step
    grown = PrecisionPlan(
        bits={n: bits.get(n, q.cfg.weight_bits) for n, q in layers.items()},
        choices=plan.choices,
        fixed=plan.fixed,
        budget_bytes=min(b, plan.bytes_8bit) if bits is not eight else plan.bytes_8bit,
        bytes_8bit=plan.bytes_8bit,
        guard=plan.guard,
        residual_share=plan.residual_share,
    )
    n8 = sum(1 for v in grown.bits.values() if v >= 8)
    warnings.warn(
        f"per-layer precision: the {plan.budget_bytes / plan.bytes_8bit:.2f}x plan's output SQNR "
        f"is {gap:.1f} dB below its 8-bit-weight version's (guard {tol:g} dB); the budget grows "
        f"to {grown.budget_bytes / plan.bytes_8bit:.2f}x of the 8-bit weight bytes ({n8} of "
        f"{len(layers)} layers at 8 bits) and calibration runs again",
        stacklevel=3,
    )
    return grown


FALLBACK_SAMPLES = 16
"""Calibration samples (whole batches, from the first) the float fallback's estimate reads, one
Gaussian probe each: the layers it is for sit many dB below ``fallback_db``, so a rough estimate
(about +-1.5 dB) decides them at a quarter of a pass over 64 samples."""


def _fallback(r: _Run) -> list[str]:
    """The float fallback (``ActQuant.fallback_db``): each layer's activation quantizers scored
    by their estimated effect on the output alone (:func:`activation_errors`, one forward and
    backward pass over the first :data:`FALLBACK_SAMPLES` samples, the activations as
    calibrated; with ``ActQuant.choose_range`` the range choice's pass, its chosen steps); returns the layers below ``fallback_db`` dB, worst first, within
    ``fallback_macs`` of the model's MACs (recorded in ``Calibration.fallback``, one warning
    names them), or ``[]``. :func:`quantize` then calibrates again with those layers' activations
    float and their weights at 8 bits."""
    acts = r.config.activations
    if acts.bits is None or acts.fallback_db is None or r.config.target == "tflite":
        return []
    scored = _scored(r)
    if not scored:
        return []
    if r.act_errors is None:  # no range choice ran: the fallback's own pass
        batches = _first_samples(r.batches, FALLBACK_SAMPLES)
        r.act_errors = activation_errors(r.qmodel, r.layers, batches, probes=1)  # every layer float
    errors = {n: e for n, e in r.act_errors.items() if n in scored}
    limit = 10 ** (-acts.fallback_db / 10)
    total = sum(q.macs for q in r.layers.values())
    cap, used = acts.fallback_macs * total, 0
    chosen, over = [], []
    for n in sorted(errors, key=errors.get, reverse=True):
        if errors[n] <= limit:
            break
        over.append(n)
        if used + r.layers[n].macs <= cap:
            chosen.append(n)
            used += r.layers[n].macs
    if not over:
        return []
    db = {n: -10 * math.log10(max(errors[n], 1e-300)) for n in over}
    r.cal.fallback = {n: db[n] for n in chosen}
    left = [n for n in over if n not in chosen]
    listed = ", ".join(f"{n} ({db[n]:.1f} dB)" for n in chosen)
    msg = (
        f"float fallback: {len(chosen)} layer(s) whose 8-bit activations alone would bring "
        f"the output SQNR below {acts.fallback_db:g} dB: activations stay float, weights at 8 "
        f"bits: {listed} ({used / max(total, 1):.1%} of the MACs; "
        "ActQuant(fallback_db=None) keeps their activations at 8 bits)"
    )
    if left:
        msg += f"; {len(left)} more keep 8-bit activations, over fallback_macs: {name_list(left)}"
    warnings.warn(msg, stacklevel=3)
    return chosen


def _is_onnx(model) -> bool:
    """An ``onnx.ModelProto``, or a path that names an ``.onnx`` file or an existing file (a
    string such as a model's name is neither: :func:`quantize` refuses it as a bad type)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return True
    if not isinstance(model, str | os.PathLike):
        return False
    path = Path(model)
    return path.suffix.lower() == ".onnx" or path.is_file()


def quantize(
    model: nn.Module | str | os.PathLike,
    calib_batches: Iterable,
    config: QuantConfig | None = None,
    *,
    fold_bn: bool = True,
    progress: bool = False,
    calibration: Calibration | None = None,
) -> nn.Module:
    """Return a quantized copy of ``model`` (``model`` itself is not modified).

    Args:
        model: a PyTorch module or :class:`torch.fx.GraphModule`; Conv1d/2d/3d (grouped,
            depthwise), ConvTranspose1d/2d/3d and Linear layers are quantized, and so are
            ``matmul``/``linear`` calls on constant weights in a model torch.fx traces (rewritten
            into Linear layers first); other layers with weights are left in float (listed in a
            warning and, every parameter with its reason, in ``calibration.float_weights``). Or a
            float ONNX model (an ``.onnx`` path or an ``onnx.ModelProto``): converted by
            :func:`~omse.transforms.onnx_import.load_onnx` and checked against onnxruntime on
            the first calibration batch; the result carries ``omse_io`` (the graph's input and
            output names, dynamic axes) for :func:`omse.export_onnx`. Or a float TFLite model
            (a ``.tflite`` path or its bytes): converted by
            :func:`~omse.transforms.tflite_import.load_tflite` (the module takes the file's
            inputs, NHWC for images) and checked against LiteRT on the first calibration batch,
            with ``omse_io`` as for ONNX.
        calib_batches: an iterable of input batches (tensors, ``(inputs, labels)`` tuples or dicts
            of keyword tensors); 16-64 images are typical. Never evaluation data.
        config: :class:`QuantConfig`; default ``QuantConfig()``, the default recipe: W4A8,
            kernel-wise MMSE, residual tensors within 10% extra MACs, bias correction
            (``QuantConfig.preset("fast")`` for plain MMSE).
        fold_bn: fold BatchNorm into the preceding layer first.
        progress: show progress bars.
        calibration: if given, filled with statistics, timings and notes.

    Examples:
        >>> import torch, omse
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 10)
        ... ).eval()
        >>> calib = [torch.rand(4, 3, 9, 9) for _ in range(4)]  # 16 calibration inputs
        >>> qmodel = omse.quantize(model, calib)  # the default recipe
        >>> qmodel(calib[0]).shape
        torch.Size([4, 10])
        >>> fast = omse.quantize(model, calib, omse.QuantConfig.preset("fast", act_bits=4))
        >>> sorted(omse.quantized_layers(fast))
        ['0', '3']
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an omse.QuantConfig, got {type(config).__name__}")
    cal = calibration if calibration is not None else Calibration()
    t0 = time.perf_counter()
    if is_tflite(model):
        calib_batches = run_checked(prepare_batches, calib_batches)  # read once (a generator)
        model = load_tflite(model, sample=calib_batches[0])
    elif _is_onnx(model):
        calib_batches = run_checked(prepare_batches, calib_batches)  # read once (a generator)
        model = load_onnx(model, sample=calib_batches[0])
    elif not isinstance(model, nn.Module):
        what = (
            f"str {model!r} (no .onnx or .tflite file)"
            if isinstance(model, str)
            else type(model).__name__
        )
        raise ConfigError(
            "model must be a torch.nn.Module, an .onnx or .tflite path or an onnx.ModelProto, "
            f"got {what}"
            + (
                "; a built-in model: omse.zoo.models.build_architecture(name)"
                if what[:3] == "str"
                else ""
            )
        )
    batches = run_checked(_checked_inputs, model, calib_batches)  # all ranks stop together
    if model.training:
        warnings.warn(
            "model is in training mode; omse quantizes an eval() copy (BatchNorm uses running stats)",
            stacklevel=2,
        )
    progress = progress and is_main()
    example = broadcast(batches[0])
    plan, fallback, ranges, traced, memo = None, None, None, None, None
    rounds: list[dict[str, float]] = []
    # one round, unless the float fallback gives layers float activations (once, first) or the
    # budget's guard asks for a larger budget (at most GUARD_ROUNDS - 1 times)
    for _ in range(GUARD_ROUNDS + 1):
        fresh = Calibration()
        rounds.append({})
        fresh.rounds = rounds  # fresh.timings: this round's entry
        qmodel = _fresh_copy(model, batches, fresh)
        run = _Run(qmodel, batches, config, fresh, progress, example=example, plan=plan)
        run.ranges, run.memo = ranges, memo
        run.traced = traced  # the same model each round: its plans' trace carries over
        for step in _steps(config, fold_bn, isinstance(run.example, dict)):
            t = time.perf_counter()
            step(run)
            fresh.timings[step.__name__.lstrip("_")] = time.perf_counter() - t
        ranges, traced, memo = run.ranges, run.traced, run.memo
        if fallback is None:
            fallback = fresh.fallback
            t = time.perf_counter()
            chosen = _fallback(run)
            fresh.timings["fallback"] = time.perf_counter() - t
            if chosen:
                fallback = run.cal.fallback
                config = config.with_float_activations(chosen)
                plan = None
                continue
        t = time.perf_counter()
        plan = _guard(run)
        fresh.timings["guard"] = time.perf_counter() - t
        if plan is None:
            break
    fresh.fallback = fallback or {}
    if fresh.precision is not None:  # what residual terms (of any step) add beyond the plan
        fresh.precision.residual_bytes = sum(
            residual_bytes(q, config.target) for q in quantized_layers(qmodel).values()
        )
    cal.__dict__.update(fresh.__dict__)
    skipped = {n for n, _ in qmodel.named_modules() if n and config.is_skipped(n)}
    cal.float_weights = functional.float_weights(qmodel, skipped)
    cal.batches = sum(gather(len(batches)))
    cal.seconds = time.perf_counter() - t0
    qmodel.omse_config = config  # type: ignore[attr-defined]
    qmodel.omse_precision = cal.precision  # type: ignore[attr-defined]  # the report reads it
    return qmodel
