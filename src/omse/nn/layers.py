"""Quantized layers: a wrapper that quantizes a Conv/Linear's input and computes with a weight
made of one or more low-precision integer tensors, ``W ~ sum_t s_t * Q_t`` (kernel-wise scales).

The wrapped module keeps its own ``forward`` (padding, grouping, subclasses all work); only its
``weight`` is replaced by the dequantized sum, so the simulation equals the sum of the separate
integer convolutions (by linearity, up to float rounding).

Wrapped types (:data:`WRAPPABLE`): ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d``.
Every weight a layer holds is kept in one **canonical layout**, output channel first: ``[out,
in/groups, k...]`` (:func:`canonical_weight`). A convolution's weight already is; a transposed
convolution's ``[in, out/groups, k...]`` is regrouped (:func:`canonical_weight` /
:func:`layer_weight`, a bijection), so kernel-wise scales are one per *output* channel and every
correction (GPTQ, learned rounding, residuals, bias correction) reads rows as output channels for
every type. ``float_weight``, ``w_codes{t}`` and ``w_scale{t}`` are canonical; only
``layer.weight`` has the module's own layout.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from ..config import INTEGER_TARGETS, LayerConfig
from ..core.granularity import Granularity
from ..core.grids import Grid
from ..core.primitives import (
    SCALE_DTYPES,
    dequantize,
    fake_quantize,
    quant_error,
    quantize,
    scale_neighbours,
)
from ..core.ranges import make_range_setter
from ..errors import ConfigError
from ..runtime import name_list

__all__ = [
    "QuantizedLayer",
    "WRAPPABLE",
    "is_transposed",
    "is_depthwise",
    "canonical_weight",
    "layer_weight",
    "quantize_weight_terms",
    "ratio_residual_term",
    "max_code_ratio",
    "layer_macs_per_output",
    "INT8_RANGE",
    "S8_SAFE_CODE",
    "DOMAIN",
    "Marker",
    "SharedInputQuantizer",
    "share_input_quantizer",
    "quantized_layers",
    "set_integer",
    "layer_depth",
    "inside_layer",
]

DOMAIN = "omse"
"""The ONNX domain of omse's tracing markers."""

INT8_RANGE = (-128, 127)
"""The codes an 8-bit integer kernel holds: merged residual kernels must fit."""

S8_SAFE_CODE = 64
"""The largest weight code magnitude that onnxruntime's x86 uint8 x int8 (u8s8) kernels multiply
exactly on every CPU: without VNNI (AVX2, AVX-512 without VNNI) they add each pair of products in
saturating int16 (``vpmaddubsw``), and ``|x1*w1 + x2*w2| <= 255 * 64 * 2 = 32640`` cannot
saturate. 8-bit weights of ``target="int8"`` are planned on a 7-bit grid (codes in ``[-64, 63]``,
:func:`omse.transforms.calibration.int8_weight_grid`) so that they stay within it, except in
depthwise convolutions (:func:`is_depthwise`): onnxruntime's depthwise kernels widen inputs and
weights to 16 bits before multiplying (``qdwconv`` in MLAS), exact for any 8-bit codes."""


_DEPTH = threading.local()


def layer_depth() -> int:
    """How many quantized layers (or their tracing twins) are running on this thread: the ops
    inside them are no sites of :class:`omse.nn.ops.OpQuantizers`."""
    return getattr(_DEPTH, "n", 0)


@contextlib.contextmanager
def inside_layer():
    """Count one running quantized layer (see :func:`layer_depth`)."""
    _DEPTH.n = layer_depth() + 1
    try:
        yield
    finally:
        _DEPTH.n -= 1


WRAPPABLE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""The module types :class:`QuantizedLayer` wraps."""


def is_transposed(layer: nn.Module) -> bool:
    """Whether ``layer`` is a transposed convolution (weight ``[in, out/groups, k...]``)."""
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise convolution: one input and one output channel per group (``groups ==
    in_channels == out_channels > 1``), which onnxruntime runs with its depthwise kernels."""
    if not isinstance(layer, nn.modules.conv._ConvNd) or is_transposed(layer):
        return False
    return 1 < layer.groups == layer.in_channels == layer.out_channels


def canonical_weight(layer: nn.Module, w: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` (default ``layer.weight``) in the canonical layout ``[out, in/groups, k...]``.

    A transposed convolution's ``[in, out/groups, k...]`` becomes ``[groups, in/groups,
    out/groups, k...] -> [groups, out/groups, in/groups, k...] -> [out, in/groups, k...]``: row
    ``co = g * out/groups + j`` is output channel ``co`` (group ``g``); every other layer's
    weight is returned as is."""
    w = layer.weight if w is None else w
    if not is_transposed(layer):
        return w
    g = layer.groups
    cin, cog, *k = w.shape
    return w.reshape(g, cin // g, cog, *k).transpose(1, 2).reshape(g * cog, cin // g, *k)


def layer_weight(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`canonical_weight`: canonical ``w`` in ``layer``'s own layout."""
    if not is_transposed(layer):
        return w
    g = layer.groups
    out, cig, *k = w.shape
    return w.reshape(g, out // g, cig, *k).transpose(1, 2).reshape(g * cig, out // g, *k)


@torch.no_grad()
def quantize_weight_terms(
    weight: torch.Tensor,
    grid: Grid,
    granularity: Granularity,
    method: str = "mmse",
    terms: int = 1,
    scale_dtype: str = "float16",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize ``weight`` and then ``terms - 1`` successive residuals.

    weight ``[out, ...]`` -> list of ``(codes int8 [out, ...], scale broadcastable [out, 1, ...])``;
    term ``t`` quantizes ``weight - sum_{u<t} s_u * Q_u`` with its own range setting.
    ``scale_dtype`` (``float16`` by default): every fitted scale is moved to whichever of its two
    bracketing ``scale_dtype`` values gives the lower error, so a checkpoint stores it in that
    dtype without loss (a depthwise 3x3 kernel: 4.5 bytes of codes + 2 of scale, not + 4).
    Scales outside the normal range of ``scale_dtype`` stay float32.
    """
    setter = make_range_setter(method)
    dtype = SCALE_DTYPES[scale_dtype]
    out = []
    resid = weight.detach().to(torch.float32)
    for _ in range(terms):
        slices = granularity.to_slices(resid)
        scale = setter.fit(slices, grid).to(torch.float32)
        if dtype != torch.float32:
            lo, hi = scale_neighbours(scale, dtype)
            better_hi = quant_error(slices, hi, grid) < quant_error(slices, lo, grid)
            scale = torch.where(better_hi, hi, lo)
        scale = granularity.expand(scale, resid)
        q = quantize(resid, scale, grid)
        out.append((q, scale))
        resid = resid - dequantize(q, scale)
    return out


class Marker(torch.autograd.Function):
    """Traces as ``omse::Marker(x)`` with the layer index, kind and term; forward returns
    ``value`` (the fake-quantized input, the weight term or the output). See :mod:`omse.transforms.graph`."""

    @staticmethod
    def forward(ctx, x, value, kind: str, idx: int, term: int):  # noqa: ARG004
        return value.clone()

    @staticmethod
    def symbolic(g, x, value, kind: str, idx: int, term: int):  # noqa: ARG004
        out = g.op(f"{DOMAIN}::Marker", x, kind_s=kind, idx_i=idx, term_i=term)
        out.setType(x.type())
        return out


def max_code_ratio(grid: Grid, container: tuple[int, int] = INT8_RANGE) -> int:
    """The largest integer ``k`` for which ``k * Q1 + Q2`` (``Q1``, ``Q2`` on ``grid``) always
    fits ``container``: 15 for the 4-bit full grid in int8 (``15 * -8 - 8 = -128``), 17 for the
    narrow one, 0 where no ratio fits (8-bit weights)."""
    lo, hi = container
    k_lo = (lo - grid.qmin) // grid.qmin if grid.qmin < 0 else hi
    k_hi = (hi - grid.qmax) // grid.qmax if grid.qmax > 0 else hi
    return max(0, min(k_lo, k_hi))


@torch.no_grad()
def ratio_residual_term(
    resid: torch.Tensor, s1: torch.Tensor, grid: Grid, k_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MMSE residual term whose step divides the first term's: ``s2 = s1 / k`` per kernel.

    resid ``[out, ...]`` (``W - s1 * Q1``), s1 ``[out, 1, ...]`` (or 0-d) -> ``(Q2 [out, ...]
    int8, s2 [out, 1, ...] float32)`` with ``k`` in ``1..k_max`` chosen per kernel by exhaustive
    search (the exact optimum over the admissible steps). Then ``s1*Q1 + s2*Q2 = s2 * (k*Q1 +
    Q2)``: one integer kernel of codes ``k*Q1 + Q2`` (which fit 8 bits for ``k <= k_max``, see
    :func:`max_code_ratio`).
    """
    if k_max < 1:
        raise ConfigError(f"no integer step ratio fits {grid} twice in one 8-bit kernel")
    r = resid.detach().to(torch.float32)
    out = r.shape[0]
    s1 = torch.as_tensor(s1, dtype=torch.float32).expand(
        [out] + [1] * (r.dim() - 1) if s1.numel() == 1 else s1.shape
    )
    best_err = torch.full((out,), float("inf"))
    best_s = s1.clone()
    for k in range(1, k_max + 1):
        s = s1 / k
        err = ((r - dequantize(quantize(r, s, grid), s)) ** 2).reshape(out, -1).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better.reshape(s.shape[:1] + (1,) * (s.dim() - 1)), s, best_s)
    return quantize(r, best_s, grid), best_s


def layer_macs_per_output(layer: nn.Module) -> int:
    """Multiply-accumulates per output element of a convolution or Linear: ``in/groups *
    prod(kernel)`` (Linear: ``in``). A transposed convolution has ``out/groups * prod(kernel)``
    per *input* element instead (what this returns for it; see
    :meth:`QuantizedLayer.macs_per_sample`)."""
    w = layer.weight
    return int(w[0].numel())


def _step(scale: torch.Tensor | None) -> torch.Tensor | None:
    """A per-tensor step as layers hold it: a float32 0-d tensor of its own (no shared storage)."""
    return None if scale is None else scale.detach().to(torch.float32).reshape(()).clone()


class QuantizedLayer(nn.Module):
    """A Conv/ConvTranspose/Linear (:data:`WRAPPABLE`) with a quantized input and a weight of
    integer terms.

    Buffers, in the canonical layout (:func:`canonical_weight`): ``w_codes{t}`` int8 ``[out,
    ...]`` and ``w_scale{t}`` ``[out, 1, ...]`` per term ``t``; ``w_mask{t}`` bool ``[out]`` marks the kernels that carry term ``t >= 1`` (the others'
    codes are zero); ``act_scale`` 0-d (when the input is quantized). ``macs`` is the layer's
    MACs per sample (set during calibration) and ``float_weight`` the original folded weight.
    ``observer`` and ``learner`` are set for one calibration pass / one block reconstruction only
    (:mod:`omse.transforms.statistics`, :mod:`omse.transforms.reconstruct`).
    """

    def __init__(self, layer: nn.Module, name: str, cfg: LayerConfig, w_grid: Grid | None = None):
        super().__init__()
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise ConfigError(f"layer {name!r} has no weight tensor to quantize")
        self.layer = layer
        self.name = name
        self.cfg = cfg
        # the weight grid: the config's (``weight_bits``, ``weight_grid``) unless the caller's
        # plan narrows it (8-bit weights of target="int8": 7-bit codes, see S8_SAFE_CODE)
        self.w_grid = w_grid or Grid(cfg.weight_bits, cfg.weight_grid)  # type: ignore[arg-type]
        self.a_grid: Grid | None = None
        self.register_buffer(
            "float_weight", canonical_weight(layer).detach().clone(), persistent=False
        )
        self.register_buffer("act_scale", None)
        self.register_buffer("out_scale", None)
        self.out_grid: Grid | None = None
        self.n_terms = 0
        self.input_from: str | None = None  # module whose output carries this input quantizer
        # set by omse.transforms.statistics.collect for one pass: sees the layer's input, the
        # input its convolution really gets (padding included) and its output
        self.observer = None
        # set by omse.transforms.reconstruct while it learns a block: supplies the weight
        # (soft-rounded terms) and quantizes the input (straight-through, QDrop)
        self.learner = None
        self.macs = 0
        self.quant_enabled = True
        self.integer = False
        self.set_weight_terms(
            quantize_weight_terms(
                self.float_weight,
                self.w_grid,
                cfg.granularity,
                cfg.weight_method,
                1,
                cfg.scale_dtype,
            )
        )

    # -- weights ----------------------------------------------------------------------------------
    def set_weight_terms(
        self,
        terms: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor] | None = None,
    ) -> None:
        """Install integer terms (and per-kernel masks for terms >= 1) and refresh the weight."""
        for t in range(self.n_terms):
            for k in (f"w_codes{t}", f"w_scale{t}", f"w_mask{t}"):
                if hasattr(self, k):
                    delattr(self, k)
        out = self.float_weight.shape[0]
        for t, (q, s) in enumerate(terms):
            m = torch.ones(out, dtype=torch.bool) if t == 0 or masks is None else masks[t - 1]
            shape = [-1] + [1] * (q.dim() - 1)
            q = torch.where(m.reshape(shape), q, torch.zeros_like(q))
            self.register_buffer(f"w_codes{t}", q)
            self.register_buffer(f"w_scale{t}", s.to(torch.float32))
            self.register_buffer(f"w_mask{t}", m)
        self.n_terms = len(terms)
        self.refresh_weight()

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(codes, scale, mask)]`` for every term."""
        return [
            (
                getattr(self, f"w_codes{t}"),
                getattr(self, f"w_scale{t}"),
                getattr(self, f"w_mask{t}"),
            )
            for t in range(self.n_terms)
        ]

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: ``sum_t s_t * Q_t``; for ``target="int8"`` the
        merged kernel ``s * (k*Q1 + Q2)`` (:meth:`merged_term`), the same value up to float
        rounding and exactly what the int8 export holds."""
        if self.cfg.target in INTEGER_TARGETS and self.n_terms > 1:
            q, s = self.merged_term()
            return dequantize(q, s)
        w = torch.zeros_like(self.float_weight)
        for q, s, _ in self.terms():
            w = w + dequantize(q, s)
        return w

    def merged_term(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight as one integer kernel: ``(codes int16 [out, ...], scale [out, 1, ...])``.

        One term: its own codes and scale. Two terms whose steps satisfy ``s2 = s1 / k`` (``k``
        an integer, as :func:`ratio_residual_term` fits them): kernels with a residual get
        codes ``k*Q1 + Q2`` at step ``s2``, the others keep ``Q1`` at ``s1``. Raises
        :class:`ConfigError` for terms that do not merge into 8 bits.

        Every forward of an integer-target layer reads it (its bias step): the result is kept
        until a term's tensors, the bias or the input step are replaced or changed in place
        (their identity, version counters and storage are the key).
        """
        return self._integer_state()[0]

    def _integer_state(self) -> list:
        """``[merged_term result, effective bias, bias step]`` (the last two None until
        :meth:`effective_bias` / :meth:`bias_scale` compute them), kept until a term's tensors,
        the bias or the input step are replaced or changed in place (see :meth:`merged_term`)."""
        with torch._C.DisableTorchFunction():  # bookkeeping, once per forward: no mode sees it
            state = (*(t for term in self.terms() for t in term), getattr(self.layer, "bias", None))
            state = (*state, self.act_scale)
            # in-place changes move the version; `.data = ...` (module.to(), .half()) the storage
            versions = tuple(
                None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in state
            )
            cached = self.__dict__.get("_merged_cache")
            if (
                cached is not None
                and len(cached[0]) == len(state)
                and all(a is b for a, b in zip(cached[0], state, strict=True))
                and cached[1] == versions
            ):
                return cached[2]
        entry = [self._merge_terms(), None, None]
        self.__dict__["_merged_cache"] = (state, versions, entry)
        return entry

    def _merge_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`merged_term`, computed."""
        terms = self.terms()
        q1, s1, _ = terms[0]
        if len(terms) == 1:
            return q1.to(torch.int16), self._bias_safe(q1, s1)
        if len(terms) > 2:
            raise ConfigError(
                f"layer {self.name!r}: {len(terms)} terms do not merge into one kernel"
            )
        q2, s2, m = terms[1]
        out = q1.shape[0]
        shape = [out] + [1] * (q1.dim() - 1)
        s1 = s1.expand(shape) if s1.numel() == 1 else s1
        k = torch.round(s1 / s2)
        ok = (k >= 1) & (s1 / k == s2)
        mk = m.reshape(shape)
        codes = torch.where(mk, k * q1.to(torch.float32) + q2.to(torch.float32), q1.float())
        lo, hi = INT8_RANGE
        if not bool(ok[m].all()) or int(codes.min()) < lo or int(codes.max()) > hi:
            raise ConfigError(
                f"layer {self.name!r}: its residual term is not an integer fraction of the first "
                "that fits one 8-bit kernel; quantize with QuantConfig(target='int8')"
            )
        return codes.to(torch.int16), self._bias_safe(codes, torch.where(mk, s2, s1))

    def weight_code_peak(self) -> int:
        """``max |code|`` of the kernel the int8 export holds (:meth:`merged_term`): within
        :data:`S8_SAFE_CODE` its INT8 weights are exact in onnxruntime's u8s8 kernels on every
        x86 CPU."""
        return int(self.merged_term()[0].abs().max()) if self.n_terms else 0

    def _bias_safe(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` with the kernels whose codes are all zero raised, where needed, so that the
        bias still fits int32 at ``s_x * s_w`` (such a kernel's output is its bias alone)."""
        b = getattr(self.layer, "bias", None)
        if b is None or self.act_scale is None:
            return scale
        out = codes.shape[0]
        shape = [out] + [1] * (codes.dim() - 1)
        s = scale.expand(shape) if scale.numel() == 1 else scale
        need = (b.detach().abs().to(torch.float32) / float(self.act_scale)) / (2**31 - 2**8)
        zero = (codes.reshape(out, -1) == 0).all(1)
        raise_to = torch.where(zero & (s.reshape(-1) < need), need, s.reshape(-1))
        return raise_to.reshape(shape) if bool((raise_to != s.reshape(-1)).any()) else scale

    @torch.no_grad()
    def refresh_weight(self) -> None:
        w = self.dequantized_weight() if self.quant_enabled else self.float_weight
        self.layer.weight.data = layer_weight(self.layer, w).to(self.layer.weight.dtype)

    def set_quant_enabled(self, enabled: bool) -> None:
        """Switch between the quantized layer and its float (BN-folded) original."""
        self.quant_enabled = bool(enabled)
        self.refresh_weight()

    def macs_per_sample(self, input_numel: int, output_numel: int) -> int:
        """Multiply-accumulates per sample from the per-sample element counts of the layer's
        input and output: ``output * in/groups * prod(k)`` (Linear, convolutions), ``input *
        out/groups * prod(k)`` (transposed convolutions, each input element meets every weight of
        its group once)."""
        if is_transposed(self.layer):
            return int(input_numel * self.layer.weight[0].numel())
        out = self.float_weight.shape[0]
        return int(output_numel // out * out * layer_macs_per_output(self.layer))

    def extra_kernels(self) -> int:
        """Kernels carrying a residual term, summed over terms >= 1."""
        return int(sum(int(m.sum()) for _, _, m in self.terms()[1:]))

    def cuts_terms(self) -> bool:
        """Whether the layer can compute a subset of its kernels alone (a Linear, a convolution
        or transposed convolution with ``groups == 1``, a depthwise convolution on the same
        channels of its input), so that a writer running each term as its own branch holds
        only the kernels a residual term selects (:meth:`term_kernels`)."""
        return getattr(self.layer, "groups", 1) == 1 or is_depthwise(self.layer)

    def term_kernels(self, t: int) -> torch.Tensor | None:
        """The output channels a writer that runs each term as its own branch
        (``target="int4"``) convolves term ``t >= 1`` for: their indices (int64, ascending,
        possibly none) where the layer :meth:`cuts_terms`; None where the whole term is written
        (other grouped convolutions, or every kernel selected). Only those kernels' codes and
        scales are stored then, and the branch's output is scattered back to the layer's
        channels."""
        m = self.terms()[t][2]
        if bool(m.all()) or not self.cuts_terms():
            return None
        return torch.nonzero(m).reshape(-1)

    def extra_macs(self) -> int:
        out = self.float_weight.shape[0]
        return self.macs * self.extra_kernels() // max(out, 1)

    # -- activations ------------------------------------------------------------------------------
    def set_act(self, scale: torch.Tensor | None, grid: Grid | None) -> None:
        self.act_scale, self.a_grid = _step(scale), grid

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.learner is not None:
            return self.learner.input(self, x)
        if self.act_scale is None or self.a_grid is None or not self.quant_enabled:
            return x
        return fake_quantize(x, self.act_scale, self.a_grid)

    def set_output(self, scale: torch.Tensor | None, grid: Grid | None) -> None:
        """Quantize the layer's output with ``scale`` on ``grid`` (``None``: leave it float).

        Set for ``target="int8"`` where the output goes to anything but one quantized layer's
        input (a residual add, a pooling): the integer kernel's requantized output."""
        self.out_scale, self.out_grid = _step(scale), grid

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        if self.out_scale is None or self.out_grid is None or not self.quant_enabled:
            return y
        return fake_quantize(y, self.out_scale, self.out_grid)

    def bias_scale(self) -> torch.Tensor | None:
        """The int32 bias step ``s_x * s_w`` per output channel ``[out]`` for ``target="int8"``
        layers with a quantized input and a bias (as integer kernels hold it), else None."""
        layer = self.layer
        if (
            self.cfg.target not in INTEGER_TARGETS
            or self.act_scale is None
            or self.a_grid is None
            or getattr(layer, "bias", None) is None
        ):
            return None
        entry = self._integer_state()
        learned = self.act_scale.requires_grad  # a learned step's graph is built anew each time
        if entry[2] is not None and not learned:
            return entry[2]
        s = entry[0][1].reshape(-1).to(torch.float32)
        sb = (self.act_scale.to(torch.float32) * s).expand(layer.bias.shape[0])
        if not learned:
            entry[2] = sb
        return sb

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the layer adds: rounded to the int32 grid of :meth:`bias_scale` where that
        applies (the bias an integer runtime adds), else the float bias."""
        b = getattr(self.layer, "bias", None)
        if b is None or not self.quant_enabled:
            return b
        sb = self.bias_scale()
        if sb is None:
            return b
        if sb.requires_grad:  # a learned step's graph is built anew each time
            return self._rounded_bias(b, sb)
        entry = self._integer_state()  # its key holds the bias and the steps sb is made of
        if entry[1] is None:
            entry[1] = self._rounded_bias(b, sb)
        return entry[1]

    @staticmethod
    def _rounded_bias(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        codes = torch.round(b.detach().to(torch.float64) / sb.to(torch.float64))
        codes = torch.nan_to_num(codes, nan=0.0).clamp(-(2**31) + 2**8, 2**31 - 2**8)
        return (codes.to(torch.float32) * sb).to(b.dtype)

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The input's integer codes ``clamp(round(x / s_x), qmin, qmax)`` in ``x``'s dtype."""
        s = self.act_scale.to(x.dtype)
        return torch.clamp(torch.round(x / s), self.a_grid.qmin, self.a_grid.qmax)

    def multiplier(self, term: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Requantization multiplier ``s_x * s_w`` of term ``term`` (``dtype``), shaped to
        broadcast over the layer's output: ``[out, 1, ...]`` for a conv, ``[out]`` for a Linear,
        0-d for a per-tensor scale."""
        s = getattr(self, f"w_scale{term}")
        m = self.act_scale.to(dtype) * s.to(dtype)
        return m.reshape(()) if m.numel() == 1 else self.per_output_channel(m)

    def per_output_channel(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` with one value per output channel ``[out]`` shaped to broadcast over the layer's
        output: ``[out]`` for a Linear, ``[out, 1, ...]`` for a conv."""
        if isinstance(self.layer, nn.Linear):
            return v.reshape(-1)
        return v.reshape([-1] + [1] * (self.float_weight.dim() - 2))

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as an integer runtime computes it: the integer input codes convolved with
        each term's integer weight codes (an exact integer accumulator while every partial sum
        stays below 2^24 in float32, see :meth:`accumulator_bound`), times the multiplier
        ``s_x * s_w``, plus the float bias: ``(acc_0 * m_0 + b) + acc_1 * m_1 + ...``.

        Equal in exact arithmetic to the fake-quantized forward; in float it does not depend on
        the summation order of the convolution, so any runtime that computes the same graph
        (``export_onnx(..., integer=True)``) gets the same outputs.
        """
        xq = self.input_codes(x)
        layer = self.layer
        # the module's own forward (it may pad, as "same"-padding subclasses do) with the codes
        # as its weight and a zero bias (adding 0.0 to an integer is exact)
        zero_bias = None if layer.bias is None else torch.zeros_like(layer.bias, dtype=x.dtype)
        bias = self.effective_bias()
        out = None
        for t, (q, _, _) in enumerate(self.terms()):
            params = {"weight": layer_weight(layer, q.to(x.dtype))}
            if zero_bias is not None:
                params["bias"] = zero_bias
            acc = torch.func.functional_call(layer, params, (xq,))
            y = acc * self.multiplier(t, x.dtype)
            if t == 0 and bias is not None:
                y = y + self.per_output_channel(bias.to(x.dtype))
            out = y if out is None else out + y
        return self.quantize_output(out)

    def accumulator_bound(self) -> int:
        """The largest ``|partial sum|`` the integer accumulator can reach: ``max|q_x| *
        max_kernel sum|q_w|`` over the terms (int); below ``2**24`` float32 sums it exactly."""
        if self.a_grid is None:
            return 0
        qx = max(abs(self.a_grid.qmin), abs(self.a_grid.qmax))
        per_kernel = [
            q.abs().to(torch.int64).reshape(q.shape[0], -1).sum(1).max() for q, _, _ in self.terms()
        ]
        return int(qx * max(int(v) for v in per_kernel))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with inside_layer():
            return self._forward(x, *args, **kwargs)

    def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        obs = self.observer
        if obs is not None:
            obs.input(self, x)
        if (
            self.integer
            and self.quant_enabled
            and self.act_scale is not None
            and self.a_grid is not None
            and not args
            and not kwargs
        ):
            return self.integer_forward(x)
        x = self.quantize_input(x)
        bias = None  # the int32-grid bias, computed outside the capture (no mode sees it)
        if self.learner is None and self.quant_enabled and self.bias_scale() is not None:
            bias = self.effective_bias()
        with contextlib.nullcontext() if obs is None else obs.capture(self):
            if self.learner is not None:
                w = layer_weight(self.layer, self.learner.weight(self))
                y = torch.func.functional_call(self.layer, {"weight": w}, (x, *args), kwargs)
            elif bias is not None:
                y = self._with_bias(x, bias, args, kwargs)
            else:
                y = self.layer(x, *args, **kwargs)
        if obs is not None:
            obs.output(self, y)
        return self.quantize_output(y)

    def _with_bias(self, x: torch.Tensor, bias: torch.Tensor, args: tuple, kwargs: dict):
        """The wrapped layer's forward with ``bias`` in place of its own: a plain ``nn.Conv1d/
        2d/3d`` or ``nn.Linear`` without hooks computes it directly (the same call its forward
        makes), any other through ``torch.func.functional_call``."""
        layer = self.layer
        plain = not (
            args
            or kwargs
            or layer._forward_hooks
            or layer._forward_pre_hooks
            or layer._backward_hooks
            or layer._backward_pre_hooks
            or _module._global_forward_hooks
            or _module._global_forward_pre_hooks
            or _module._global_backward_hooks
            or _module._global_backward_pre_hooks
        )
        if plain and type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return layer._conv_forward(x, layer.weight, bias)
        if plain and type(layer) is nn.Linear:
            return F.linear(x, layer.weight, bias)
        params = {"weight": layer.weight, "bias": bias}
        return torch.func.functional_call(layer, params, (x, *args), kwargs)

    def extra_repr(self) -> str:
        a = str(self.a_grid) if self.a_grid is not None else "float"
        o = f", out={self.out_grid}" if self.out_grid is not None else ""
        return (
            f"name={self.name!r}, weight={self.w_grid} x{self.n_terms} {self.cfg.granularity}, "
            f"act={a}{o}, target={self.cfg.target}"
        )


class SharedInputQuantizer:
    """Forward hook of a module whose output is a quantized layer's input *and* read by other
    code (a residual block's output, read by the next block's first layer and its skip
    connection): the output is quantized with that layer's input quantizer for every reader, so
    the tensor has one scale, as an integer runtime holds it (``target="int8"``). The layer's
    own input quantizer is then the identity (the same scale twice). While :func:`omse.transforms.graph.trace`
    runs it marks the tensor (``kind="tq"``)."""

    def __init__(self, layer: QuantizedLayer):
        self.layer = layer

    def __call__(self, module: nn.Module, inputs, output):  # noqa: ARG002
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        q = self.layer.quantize_input(output)
        idx = getattr(self.layer, "trace_idx", None)
        if idx is not None:
            return Marker.apply(output, q, "tq", idx, 0)
        return q


def share_input_quantizer(model: nn.Module, layer: QuantizedLayer, module_name: str) -> None:
    """Quantize ``module_name``'s output with ``layer``'s input quantizer (see
    :class:`SharedInputQuantizer`); recorded as ``layer.input_from`` (checkpoints keep it)."""
    module = model.get_submodule(module_name)
    for h in list(module._forward_hooks.values()):
        if isinstance(h, SharedInputQuantizer):
            raise ConfigError(f"module {module_name!r} already has a shared input quantizer")
    module.register_forward_hook(SharedInputQuantizer(layer))
    layer.input_from = module_name


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every :class:`QuantizedLayer` of ``model`` by its (original) layer name."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantizedLayer)}


def set_integer(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every quantized layer whose input is quantized as an integer runtime does (``True``)
    or as fake quantization (``False``, the default after :func:`quantize`); returns ``model``.

    Integer mode convolves integer codes (exact while :meth:`QuantizedLayer.accumulator_bound`
    stays below 2^24) and rescales by ``s_x * s_w``: the same values in exact arithmetic, but
    independent of summation order, so it matches ``export_onnx(..., integer=True)`` executed by
    onnxruntime. Calibration and corrections always run in fake-quantization mode.
    """
    if not isinstance(enabled, bool):
        raise ConfigError(f"enabled={enabled!r}: use True or False")
    layers = quantized_layers(model)
    if not layers:
        raise ConfigError("the model has no quantized layer; quantize it with omse.quantize first")
    for q in layers.values():
        q.integer = enabled
    if enabled:
        big = [n for n, q in layers.items() if q.accumulator_bound() >= 2**24]
        if big:
            warnings.warn(
                f"{len(big)} layer{'s' if len(big) > 1 else ''} ({name_list(big)}) can "
                "accumulate |sums| >= 2^24, which float32 does not hold "
                "exactly: integer mode still computes them, but not bit-exactly in every order",
                stacklevel=2,
            )
    return model
