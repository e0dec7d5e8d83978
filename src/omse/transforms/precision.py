"""Per-layer weight precision under a byte budget, chosen by each choice's effect on the output.

Three jobs, one function each:

1. :func:`output_errors` estimates, for every layer ``l`` and candidate weight ``W_c`` (the
   layer's weights quantized at ``c`` bits), the model's relative output error with that layer
   alone quantized, without a pass per layer and candidate. It linearises the network after the
   layer: with ``dy = F(x, W_c - W)`` the change of the layer's output and ``J`` the Jacobian of
   the model's outputs ``f`` by it,

       E[l, c] = sum_samples ||J dy||^2 / sum_samples ||f||^2

   and ``||J dy||^2 = E_v[(v^T J dy)^2]`` for ``v ~ N(0, I)`` over the outputs, so one backward
   pass of ``v . f`` per probe gives ``g = J^T v`` at every layer at once, and each sample adds
   ``<g, dy>^2``. Cost per batch: one forward, one convolution per candidate and layer (``dy``),
   one backward per probe. The pipeline measures each layer's lowest width only and scales the
   8-bit error from it (:func:`scaled_error`). The estimate is unbiased when dim 0 of every layer's output is the
   batch (samples independent); ``tests/transforms/test_precision.py`` checks it against the
   measured error (:func:`omse.transforms.sensitivity.network_errors`) and its ranking.
2. :func:`choose` picks one candidate per layer minimising the summed errors with the summed
   bytes within the budget: an exact multiple-choice knapsack by dynamic programming over bytes
   (costs in units of ``ceil(budget / resolution)`` bytes, rounded up, so the plan never exceeds
   the budget; exact when the unit is one byte).
3. :func:`relative_errors` measures a model's output error against reference outputs (the guard
   of :func:`omse.quantize` compares the chosen plan with its 8-bit-weight version).

Weight bytes are counted as the target writes them (:func:`weight_bytes`): codes of ``bits``
bits packed (``target="int4"``: INT4 for <= 4 bits, INT8 above), or one byte each
(``target="int8"``: onnxruntime and OpenVINO hold 4-bit codes in INT8), plus one scale per kernel
in ``scale_dtype`` and the int32 bias.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import PACKED_INT4_TARGETS
from ..core.grids import Grid
from ..core.primitives import SCALE_DTYPES, dequantize, fake_quantize
from ..distributed import world
from ..errors import model_forward_errors
from ..nn.layers import QuantizedLayer, is_depthwise, layer_weight, quantize_weight_terms
from ..nn.ops import op_quantizers
from .sensitivity import sum_in_batch_order
from .statistics import float_outputs, run_model

__all__ = [
    "Choice",
    "PrecisionPlan",
    "candidate_weight",
    "weight_bytes",
    "residual_bytes",
    "residual_kernel_bytes",
    "candidate_cost",
    "output_errors",
    "activation_errors",
    "range_errors",
    "calibrated_quantizers",
    "scaled_error",
    "choose",
    "cheapest",
    "relative_errors",
]


@dataclass(frozen=True)
class Choice:
    """One candidate of one layer: its weight bits, bytes as written and estimated error."""

    bits: int
    bytes: int
    error: float


@dataclass
class PrecisionPlan:
    """What the precision step chose (kept in ``Calibration.precision``).

    ``bits``: the weight bits of every layer; ``choices``: every layer's candidates; ``fixed``:
    layers whose bits an override set (not chosen); ``budget_bytes`` / ``bytes`` /
    ``bytes_8bit``: the budget, the plan's weight bytes and those of every layer at 8 bits;
    ``guard``: the guard's measurements (see :func:`omse.quantize`), one dict per round.
    """

    bits: dict[str, int] = field(default_factory=dict)
    choices: dict[str, list[Choice]] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)
    budget_bytes: int = 0
    bytes: int = 0
    bytes_8bit: int = 0
    guard: list[dict] = field(default_factory=list)
    residual_share: float = 0.0
    """Room for residual kernels in the budget (``target="int4"`` with residual tensors: the
    residuals' ``extra_mac_budget``): the widths are chosen with a layer below 8 bits costing
    ``1 + residual_share`` times its bytes (:func:`candidate_cost`), and the residual kernels
    within what the widths leave of the budget."""
    residual_bytes: int = 0
    """Bytes the residual terms the recipe added after the plan take in the target's ONNX file,
    beyond :attr:`bytes` (:func:`residual_bytes`)."""

    def estimated_error(self, bits: dict[str, int] | None = None) -> float:
        """Sum of the chosen candidates' estimated errors (``bits`` or the plan's)."""
        bits = self.bits if bits is None else bits
        return float(
            sum(c.error for n, cs in self.choices.items() for c in cs if c.bits == bits.get(n))
        )

    def chosen_bytes(self, bits: dict[str, int] | None = None) -> int:
        """Sum of the chosen candidates' bytes (``bits`` or the plan's; choosable layers)."""
        bits = self.bits if bits is None else bits
        return sum(c.bytes for n, cs in self.choices.items() for c in cs if c.bits == bits.get(n))

    def summary(self) -> str:
        """One line: how many layers at each width and the bytes against the 8-bit model."""
        counts: dict[int, int] = {}
        for b in self.bits.values():
            counts[b] = counts.get(b, 0) + 1
        parts = ", ".join(f"{counts[b]} at {b}-bit" for b in sorted(counts))
        share = self.bytes / max(self.bytes_8bit, 1)
        line = (
            f"weights: {parts}; {self.bytes:,} bytes = {share:.2f}x the 8-bit model "
            f"(budget {self.budget_bytes / max(self.bytes_8bit, 1):.2f}x)"
        )
        if self.residual_bytes:
            total = self.bytes + self.residual_bytes
            line += (
                f"; with the residual tensors {total:,} bytes = "
                f"{total / max(self.bytes_8bit, 1):.2f}x"
            )
        return line


def candidate_weight(q: QuantizedLayer, bits: int) -> torch.Tensor:
    """The layer's weight quantized at ``bits`` with its own grid kind, granularity, range
    setting and scale format (one term), dequantized: ``[out, ...]`` canonical layout."""
    cfg = q.cfg
    ((codes, scale),) = quantize_weight_terms(
        q.float_weight, Grid(bits, cfg.weight_grid), cfg.granularity, cfg.weight_method, 1,
        cfg.scale_dtype,
    )  # fmt: skip
    return dequantize(codes, scale)


@contextlib.contextmanager
def eight_bit_weights(
    layers: dict[str, QuantizedLayer], w8: dict[str, torch.Tensor] | None = None
) -> Iterator[list[str]]:
    """Inside the block, every layer below 8 bits computes with its 8-bit weight (``w8[name]``
    where given, else :func:`candidate_weight`), everything else as calibrated: the model's
    *8-bit-weight version*, which the budget's guard and the command line's held-out check
    compare with. Yields the names of those layers; their weights are restored after."""
    low = {n: q for n, q in layers.items() if q.cfg.weight_bits < 8 and q.quant_enabled}
    try:
        for n, q in low.items():
            w = w8[n] if w8 is not None and n in w8 else candidate_weight(q, 8)
            q.layer.weight.data = layer_weight(q.layer, w).to(q.layer.weight.dtype)
        yield list(low)
    finally:
        for q in low.values():
            q.refresh_weight()


def costliest(plan: PrecisionPlan, k: int = 3) -> list[str]:
    """The ``k`` layers whose chosen width costs the most estimated output error against their
    8-bit candidate (the plan's own estimates), most first."""
    cost = {}
    for n, cs in plan.choices.items():
        errors = {c.bits: c.error for c in cs}
        bits = plan.bits.get(n)
        if bits is not None and bits < 8 and 8 in errors and bits in errors:
            cost[n] = errors[bits] - errors[8]
    return sorted(cost, key=cost.get, reverse=True)[:k]


TFLITE_CHANNEL_BYTES = 12
"""Bytes per output channel of a ``.tflite`` filter's quantization: a float32 scale and an int64
zero point (TFLite's schema stores both per channel)."""


def _term_bytes(q: QuantizedLayer, bits: int, target: str, kernels: int | None = None) -> int:
    """Bytes of one weight term of the layer as the target writes it: codes (``bits`` bits packed
    two to a byte for <= 4 bits on :data:`~omse.config.PACKED_INT4_TARGETS`, else one byte each)
    and one scale per kernel in the layer's ``scale_dtype`` (per-group scales counted per group;
    a ``.tflite`` holds a float32 scale and an int64 zero point per channel). ``kernels``: the
    term holds that many of the layer's kernels only (default: all)."""
    out = q.float_weight.shape[0]
    kernels = out if kernels is None else kernels
    code_bits = 4 if (bits <= 4 and target in PACKED_INT4_TARGETS) else 8
    codes = math.ceil(q.float_weight.numel() // max(out, 1) * kernels * code_bits / 8)
    n_scales = q.cfg.granularity.to_slices(q.float_weight).shape[0]
    if n_scales == out:
        n_scales = kernels
    elif n_scales > out:  # per group: as many per kernel
        n_scales = n_scales // out * kernels
    per_scale = SCALE_DTYPES[q.cfg.scale_dtype].itemsize
    return codes + n_scales * (TFLITE_CHANNEL_BYTES if target == "tflite" else per_scale)


def weight_bytes(q: QuantizedLayer, bits: int, target: str) -> int:
    """Bytes of the layer's weights as the target writes them: one term (:func:`_term_bytes`)
    and an int32 bias."""
    bias = getattr(q.layer, "bias", None)
    return _term_bytes(q, bits, target) + (0 if bias is None else 4 * bias.numel())


INDEX_BYTES = 8
"""Bytes per entry of the int64 ``Gather`` indices a residual branch of selected kernels adds."""


def residual_bytes(q: QuantizedLayer, target: str) -> int:
    """Bytes a layer's terms past the first add to its ONNX file. On ``target="int4"`` each is
    its own branch (:mod:`omse.deploy.export`): the kernels that carry it
    (:meth:`~omse.nn.layers.QuantizedLayer.term_kernels`: their codes and scales, plus the int64
    indices that scatter the branch's output back to the layer's channels, and for a depthwise
    layer those that gather its input channels), or a whole term of the layer's shape where the
    layer cannot convolve a subset alone. On ``"int8"`` the terms are one merged 8-bit kernel
    (:meth:`~omse.nn.layers.QuantizedLayer.merged_term`), which :func:`weight_bytes` counts at a
    byte per code already, and ``"tflite"`` takes none under a budget; 0 for one term."""
    if target != "int4":
        return 0
    total = 0
    for t in range(1, q.n_terms):
        idx = q.term_kernels(t)
        if idx is None:
            total += _term_bytes(q, q.w_grid.bits, target)
        elif idx.numel():
            total += _cut_term_bytes(q, target, idx.numel())
    return total


def _cut_term_bytes(q: QuantizedLayer, target: str, k: int) -> int:
    """Bytes of a residual term cut to ``k`` of the layer's kernels: their codes and scales,
    the int64 indices that scatter the branch's output back to the layer's channels and, for a
    depthwise layer, those that gather its ``k`` input channels."""
    gathers = q.float_weight.shape[0] + (k if is_depthwise(q.layer) else 0)
    return _term_bytes(q, q.w_grid.bits, target, k) + INDEX_BYTES * gathers


def residual_kernel_bytes(q: QuantizedLayer, target: str) -> tuple[float, float]:
    """What a residual kernel of the layer adds to its ``target="int4"`` file (see
    :func:`residual_bytes`): ``(per kernel, once per term)``: a kernel's codes, scale and (a
    depthwise layer) input index; once, the scatter's indices (and a byte of packing). A layer
    whose terms are written whole costs a whole term once, nothing per kernel."""
    if not q.cuts_terms():
        return 0.0, float(_term_bytes(q, q.w_grid.bits, target))
    out = q.float_weight.shape[0]
    once = _cut_term_bytes(q, target, 0)  # the scatter's indices
    per = (_cut_term_bytes(q, target, out) - once) / max(out, 1)
    return per, float(once + 1)  # + a byte of packing


def _delta_output(q: QuantizedLayer, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """``F(x, dw)``: the layer's output change for a weight change ``dw`` (canonical layout),
    the bias left out (the map is linear in the weight)."""
    params = {"weight": layer_weight(q.layer, dw).to(x.dtype)}
    if getattr(q.layer, "bias", None) is not None:
        params["bias"] = torch.zeros_like(q.layer.bias)
    return torch.func.functional_call(q.layer, params, (x,))


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    """``[B, ...] -> [B]`` sums over every dim but the first (a 0-d or 1-d tensor: one sample)."""
    return t.reshape(t.shape[0], -1).sum(1) if t.dim() > 1 else t.reshape(1, -1).sum(1)


def _probe_passes(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    keys: dict[str, list],
    batches: Iterable,
    probes: int,
    seed: int,
    measure: Callable[[str, torch.Tensor, torch.Tensor, list[torch.Tensor]], dict[object, float]],
) -> tuple[dict[str, dict[object, float]], float]:
    """The probe loop of :func:`output_errors` and :func:`activation_errors`: the model in
    float (every layer's flag and the op quantizers restored after), per batch one forward pass and ``probes``
    backward passes of Gaussian probes ``v . f``; for every call of every layer in ``keys``,
    ``measure(name, x, y, gs)`` (the call's input, float output and output gradients, one per
    probe) returns ``{key: sum over the batch's samples of E_v[<g, dy>^2]}`` for the layer's
    ``keys`` (a layer not called adds 0 to each). Returns
    ``({layer: {key: sum over batches / energy}}, energy)`` with ``energy = sum ||f||^2``,
    summed in global batch order."""
    rank, size = world()
    sums: dict[str, dict[object, list[float]]] = {n: {k: [] for k in ks} for n, ks in keys.items()}
    energies: list[float] = []
    before = {n: q.quant_enabled for n, q in layers.items()}
    # per layer and call (a module may run several times per forward, e.g. a shared head):
    # the call's input and output, and its output's gradient for each probe
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    grads: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []

    def hook(name: str):
        def fn(mod: QuantizedLayer, args, out):
            if not torch.is_tensor(out) or not out.is_floating_point():
                return None
            seen = calls.setdefault(name, [])
            key = (name, len(seen))
            seen.append((args[0].detach(), out.detach()))
            if not out.requires_grad:  # the first layers: the graph starts here
                out = out.detach().requires_grad_(True)
            # a copy: autograd keeps a leaf's incoming gradient as its .grad and adds the next
            # probe's into it in place
            out.register_hook(lambda g: grads.setdefault(key, []).append(g.detach().clone()))
            return out

        return fn

    ops = op_quantizers(model)
    ops_enabled = ops.enabled if ops is not None else None
    try:
        if ops is not None:  # op quantizers round: no gradient flows through them
            ops.enabled = False
        for n, q in layers.items():
            q.set_quant_enabled(False)
            if n in keys:
                handles.append(q.register_forward_hook(hook(n)))
        for i, batch in enumerate(batches):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i * size + rank)
            grads.clear()
            calls.clear()
            with torch.enable_grad(), model_forward_errors(i * size + rank, batch):
                outs = float_outputs(run_model(model, batch))
                if not outs:
                    raise ValueError(
                        "the model returned no floating-point tensor on a calibration batch"
                    )
                energies.append(sum(float((o.detach().double() ** 2).sum()) for o in outs))
                live = [o for o in outs if o.requires_grad]
                for p in range(probes if live else 0):
                    vs = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in live]
                    torch.autograd.backward(live, vs, retain_graph=p < probes - 1)
            with torch.no_grad():
                for n, ks in keys.items():
                    acc = dict.fromkeys(ks, 0.0)
                    for k, (x, y) in enumerate(calls.get(n, [])):
                        gs = grads.get((n, k), [])
                        if gs:
                            for key, v in measure(n, x, y, gs).items():
                                acc[key] += v
                    for key, v in acc.items():
                        sums[n][key].append(v)
            del outs, live
    finally:
        for h in handles:
            h.remove()
        for n, q in layers.items():
            q.set_quant_enabled(before[n])
        if ops is not None:
            ops.enabled = ops_enabled
    energy = max(sum_in_batch_order(energies, size), 1e-300)
    errors = {
        n: {k: sum_in_batch_order(v, size) / energy for k, v in cs.items()}
        for n, cs in sums.items()
    }
    return errors, energy


def _probe_sum(gs: list[torch.Tensor], dy: torch.Tensor) -> float:
    """``sum over samples of mean over probes of <g, dy>^2`` (per-sample dot products in
    float32, squares in float64)."""
    acc = 0.0
    for g in gs:
        t = _per_sample(g * dy).double()
        acc += float((t * t).sum())
    return acc / len(gs)


def _centered(q: QuantizedLayer, dy: torch.Tensor) -> torch.Tensor:
    """``dy`` less its mean per output channel over the batch's samples and positions (channels
    at dim 1 of a convolution's output, last for a Linear layer's): what is left of a weight
    change's output change once bias correction adds its mean back."""
    if dy.dim() < 2:
        return dy - dy.mean()
    if isinstance(q.layer, nn.Linear):
        dims = tuple(range(dy.dim() - 1))
    else:
        dims = (0, *range(2, dy.dim()))
    return dy - dy.mean(dim=dims, keepdim=True)


def output_errors(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    candidates: dict[str, dict[int, torch.Tensor]],
    batches: Iterable,
    probes: int = 1,
    seed: int = 0,
    centered: bool = False,
) -> tuple[dict[str, dict[int, float]], float]:
    """Estimated relative output error of every layer's candidates (see the module docstring).

    ``candidates``: ``{layer: {bits: dequantized weight [out, ...]}}``. A layer that runs more
    than once per forward adds every call's error (``||J dy||^2`` summed over calls, their cross
    terms left out). The layers run in float
    (weights and activations; their flags are restored). Returns ``({layer: {bits: E}}, energy)``
    with ``energy = sum ||f||^2`` over the batches. ``probes`` Gaussian probes per batch, drawn
    from ``seed`` and the global batch index (the result is deterministic, and under
    ``torch.distributed`` every rank gets what one process given all batches gets).

    ``centered``: the error bias correction leaves (:func:`_centered`): each candidate's output
    change less its mean per output channel over the batch (the batch's mean stands for the
    calibration set's, which :func:`omse.transforms.bias_correction.bias_correction` adds back).
    A layer whose error is mostly such a shift (a projection convolution's, a depthwise one's)
    then no longer looks as harmful as a layer of the same error that no bias fixes.
    """

    def measure(n: str, x: torch.Tensor, _y: torch.Tensor, gs: list[torch.Tensor]):
        q = layers[n]
        out = {}
        for b, w in candidates[n].items():
            dy = _delta_output(q, x, w - q.float_weight)
            out[b] = _probe_sum(gs, _centered(q, dy) if centered else dy)
        return out

    keys = {n: list(cs) for n, cs in candidates.items()}
    return _probe_passes(model, layers, keys, batches, probes, seed, measure)


def activation_errors(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    batches: Iterable,
    probes: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """``{layer: E}``: the estimated relative output error of the model with only that layer's
    activation quantizers on (its input's and, where it has one, its output's, at the steps
    calibration set), weights and everything else in float: :func:`range_errors` with each
    quantizer's calibrated step as its one candidate. The :func:`omse.quantize` step that gives
    float activations (8-bit weights) to the layers whose 8-bit activations alone cost the model
    most (``ActQuant.fallback_db``) reads it."""
    candidates = {n: calibrated_quantizers(q) for n, q in layers.items()}
    errors = range_errors(model, layers, candidates, batches, probes, seed)
    return {n: e[(0, 0)] for n, e in errors.items()}


Quantizer = tuple[torch.Tensor, Grid]
"""A step and its grid."""


def calibrated_quantizers(q: QuantizedLayer) -> tuple[list[Quantizer], list[Quantizer]]:
    """A layer's input and output quantizers as calibration set them (an empty list: none)."""
    ins = [(q.act_scale, q.a_grid)] if q.act_scale is not None and q.a_grid is not None else []
    outs = [(q.out_scale, q.out_grid)] if q.out_scale is not None and q.out_grid is not None else []
    return ins, outs


def range_errors(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    candidates: dict[str, tuple[list[Quantizer], list[Quantizer]]],
    batches: Iterable,
    probes: int = 1,
    seed: int = 0,
) -> dict[str, dict[tuple[int, int], float]]:
    """``{layer: {(i, j): E}}``: the estimated relative output error of the model with only that
    layer's activation quantizers on, its input quantized by candidate ``i`` of its input list
    and its output by candidate ``j`` of its output list (``candidates[layer] = (inputs,
    outputs)``, each a list of ``(step, grid)``; an empty list: that quantizer is off, index 0),
    weights and everything else in float. ``E = sum <g, dy>^2 / sum ||f||^2`` as in
    :func:`output_errors`, with ``dy = F(fq_i(x) - x, W)`` for the input (the layer is linear in
    its input; ``F`` without the bias) plus ``fq_j(y) - y`` for the output (their cross term
    left in: each pair is scored whole). One forward and ``probes`` backward passes per batch
    score every pair of every layer (the same probes for all, so the pairs of one layer compare
    on the same noise). The float fallback (:func:`activation_errors`) and the range choice of
    :func:`omse.quantize` (``ActQuant.choose_range``) read it."""

    def measure(n: str, x: torch.Tensor, y: torch.Tensor, gs: list[torch.Tensor]):
        q = layers[n]
        ins, outs = candidates[n]
        dys_in = [_delta_output(q, fake_quantize(x, s, g) - x, q.float_weight) for s, g in ins] or [
            None
        ]
        dys_out = [fake_quantize(y, s, g) - y for s, g in outs] or [None]
        res = {}
        for i, di in enumerate(dys_in):
            for j, do in enumerate(dys_out):
                dy = torch.zeros_like(y)  # a layer without activation quantizers: 0
                if di is not None:
                    dy = dy + di
                if do is not None:
                    dy = dy + do
                res[(i, j)] = _probe_sum(gs, dy)
        return res

    keys = {
        n: [(i, j) for i in range(max(len(c[0]), 1)) for j in range(max(len(c[1]), 1))]
        for n, c in candidates.items()
    }
    errors, _ = _probe_passes(model, layers, keys, batches, probes, seed, measure)
    return errors


def scaled_error(
    error: float, weight: torch.Tensor, approx: torch.Tensor, other: torch.Tensor
) -> float:
    """The estimated output error of a layer's weight ``other`` from the estimate ``error`` of
    ``approx`` (both ``[out, ...]``, ``weight`` the float one): scaled by their squared weight
    errors' ratio, ``error * ||other - weight||^2 / ||approx - weight||^2``.

    The pipeline measures (:func:`output_errors`) only each layer's lowest width and scales the
    8-bit error so: quantization noise of either width is spread over the kernels alike, and the
    8-bit error is ~1/250 of the 4-bit one, so the approximation moves a layer's gain from
    8 bits (``E4 - E8``) by well under 1% (``tests/transforms/test_precision.py`` checks it
    against the measured 8-bit estimate). It saves one convolution per layer."""
    w = weight.double()
    den = float(((approx.double() - w) ** 2).sum())
    if den <= 0:
        return 0.0
    return error * float(((other.double() - w) ** 2).sum()) / den


def choose(
    choices: dict[str, list[Choice]], budget: int, resolution: int = 32768, share: float = 0.0
) -> dict[str, int] | None:
    """One candidate per layer: the least summed error with the summed bytes ``<= budget``.

    Exact multiple-choice knapsack over bytes in units of ``max(1, ceil(budget / resolution))``
    (each cost rounded up to the unit, so the plan returned never exceeds ``budget``; with a
    one-byte unit the optimum is exact). ``share``: a candidate below its layer's widest costs
    ``(1 + share)`` times its bytes, room for the residual kernels such a layer may take
    (:func:`candidate_cost`). Ties go to the fewer bytes. ``None`` when even the cheapest
    candidates exceed the budget. Returns ``{layer: bits}``.
    """
    names = list(choices)
    if not names:
        return {}
    cost = {n: [candidate_cost(c, cs, share) for c in cs] for n, cs in choices.items()}
    unit = max(1, math.ceil(budget / resolution))
    cap = budget // unit
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, c in enumerate(choices[n]):
            w = math.ceil(cost[n][j] / unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = best[: cap + 1 - w] + c.error
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best, picks[i] = new, pick
    if not np.isfinite(best).any():
        return None
    # least error; among equal errors the fewest units
    end = int(np.flatnonzero(best == best[np.isfinite(best)].min())[0])
    out = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(picks[i, end])
        out[names[i]] = choices[names[i]][j].bits
        end -= math.ceil(cost[names[i]][j] / unit)
    return out


def candidate_cost(c: Choice, layer_choices: list[Choice], share: float = 0.0) -> int:
    """What the knapsack charges for ``c``: its bytes, times ``1 + share`` when it is below
    the widest of its layer's candidates (the layer may then take residual kernels of up to
    ``share`` of its bytes; :func:`choose`)."""
    if share and c.bits < max(x.bits for x in layer_choices):
        return math.ceil(c.bytes * (1 + share))
    return c.bytes


def _squared(a: list[torch.Tensor], b: list[torch.Tensor] | None = None) -> float:
    """``sum ||a - b||^2`` over paired tensors (``sum ||a||^2`` without ``b``), in float64."""
    if b is None:
        return float(sum(float((t.double() ** 2).sum()) for t in a))
    return float(
        sum(float(((t.double() - u.double()) ** 2).sum()) for t, u in zip(a, b, strict=True))
    )


def cheapest(choices: dict[str, list[Choice]]) -> dict[str, int]:
    """Each layer at its fewest bytes, the least error among equal bytes: the optimum of
    :func:`choose` at the smallest budget any plan fits. Returns ``{layer: bits}``."""
    return {n: min(cs, key=lambda c: (c.bytes, c.error)).bits for n, cs in choices.items()}


@torch.no_grad()
def relative_errors(
    batches: Iterable, reference: Callable[[object], object], *models: Callable[[object], object]
) -> list[float]:
    """``sum ||f_m - f_ref||^2 / sum ||f_ref||^2`` over the batches for each of ``models``,
    every floating-point output counted, one batch at a time (nothing stored). ``reference`` and
    ``models`` are callables ``batch -> output`` (they may switch one model between states).
    Sums in global batch order under ``torch.distributed``."""
    _, size = world()
    den: list[float] = []
    nums: list[list[float]] = [[] for _ in models]
    for i, batch in enumerate(batches):
        with model_forward_errors(i, batch):
            ref = [t.detach() for t in float_outputs(reference(batch))]
            den.append(_squared(ref))
            for k, m in enumerate(models):
                nums[k].append(_squared(float_outputs(m(batch)), ref))
    total = max(sum_in_batch_order(den, size), 1e-300)
    return [sum_in_batch_order(v, size) / total for v in nums]
