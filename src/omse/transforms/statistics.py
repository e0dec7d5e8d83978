"""One calibration pass that gathers what the configured algorithms need, for every quantized
layer at once (NNCF's shape: an algorithm declares its statistics, one collection pass serves
them).

:func:`collect` runs the model once over the calibration batches with an observer on every
:class:`~omse.nn.layers.QuantizedLayer` and fills, per layer, what :class:`Needs` asks for:

- ``input_histograms``: a streaming histogram of the layer's input (activation scales);
- ``output_clamp``: for the named layers, a histogram of the output clamped to a range (the
  output quantizers of ``target="int8"``);
- ``patch_moments``: ``H [G, K, K]``, the sum of outer products of the im2col patches the layer's
  weight really multiplies (padding done inside a subclassed module's forward included), and the
  patch sums ``[G, K]`` (GPTQ rounding, the residual criterion);
- ``patch_means``: the patch sums alone (bias correction);
- always the layer's MACs per sample.

The patches are read where the wrapped module calls ``conv{1,2,3}d``/``conv_transpose{1,2,3}d``/
``linear`` with the layer's weight (a transposed convolution's patches are the windows of its
zero-inserted input, in the canonical weight order: :func:`patches`), through a :class:`torch.overrides.TorchFunctionMode` entered inside that layer's
forward only (thread-local and scoped: no torch function is replaced process-wide, and a module
that calls ``torch.conv2d`` directly is seen too). :data:`PASSES` counts the passes made.

Each batch fills its own :class:`LayerStatistics` (a partial) which is then folded into the
pass's totals with :meth:`LayerStatistics.absorb`, in batch order. Under a ``torch.distributed``
process group each rank passes its own batches (global batch ``i`` is rank ``i % N``'s batch
``i // N``, :func:`omse.distributed.shard`); after every local batch the ranks exchange their
partials (:func:`omse.distributed.gather`) and each folds them in rank order, i.e. in global
batch order: every rank ends with the statistics one process gets from all the batches, bit for
bit (the reasoning is in :mod:`omse.distributed`).

A pass is a function of the model's parameters and buffers, its quantizers and the batches:
:func:`state_fingerprint` digests the first two, so that a caller that runs the same pass again
(the float fallback's second round of :func:`omse.quantize`, whose pass sees the same weights
with every quantizer still unset) can keep the statistics it has instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..core.stats import DeferredBinning, HistogramStats
from ..distributed import all_max, gather, world
from ..errors import CalibrationError, NonFiniteError, model_forward_errors
from ..nn.layers import QuantizedLayer
from ..runtime import progress as progress_bar

__all__ = [
    "Needs",
    "LayerStatistics",
    "ConvCall",
    "collect",
    "first_row",
    "float_outputs",
    "patches",
    "run_model",
    "PASSES",
    "state_fingerprint",
]

PASSES = [0]
"""How many calibration passes :func:`collect` has made in this process (tests count them)."""


def first_row(batch):
    """The first sample of a batch, as the model takes it: a tensor ``[1, ...]``, a dict of
    keyword tensors each cut to its first row, or the inputs of an ``(inputs, labels)`` tuple."""
    if isinstance(batch, dict):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return first_row(batch[0])
    return batch[:1]


def run_model(model: nn.Module, batch) -> torch.Tensor:
    """``model(batch)``, or ``model(**batch)`` for a dict of keyword tensors."""
    return model(**batch) if isinstance(batch, dict) else model(batch)


def float_outputs(y) -> list[torch.Tensor]:
    """The floating-point tensors of a (nested) model output (tensor, tuple, list, dict), in
    pytree order."""
    return [v for v in tree_leaves(y) if torch.is_tensor(v) and v.is_floating_point()]


def state_fingerprint(model: nn.Module) -> bytes:
    """A digest of every parameter and buffer of ``model`` (names, dtypes, shapes and bytes):
    equal digests mean a forward pass computes the same values (given the same quantizers and
    inputs). BLAKE2b over the raw bytes, about 1 GB/s."""
    h = hashlib.blake2b(digest_size=20)
    for group in (model.named_parameters(), model.named_buffers()):
        for name, t in group:
            v = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}|{v.dtype}|{tuple(t.shape)};".encode())
            h.update(v.view(torch.uint8).numpy() if v.numel() else b"")
    return h.digest()


@dataclass(frozen=True)
class Needs:
    """The statistics one pass gathers (see the module docstring)."""

    input_histograms: bool = False
    output_clamp: tuple[tuple[str, float, float], ...] = ()
    patch_moments: bool = False
    patch_means: bool = False
    bins: int = 4096

    @property
    def patches(self) -> bool:
        return self.patch_moments or self.patch_means

    @property
    def clamps(self) -> dict[str, tuple[float, float]]:
        """``output_clamp`` by layer: ``{name: (lo, hi)}``."""
        return {n: (lo, hi) for n, lo, hi in self.output_clamp}


@dataclass
class LayerStatistics:
    """What one pass saw of one layer: histograms, patch moments (float64) and MACs."""

    input: HistogramStats | None = None
    output: HistogramStats | None = None
    H: torch.Tensor | None = None  # [G, K, K] sum of patch outer products
    sum: torch.Tensor | None = None  # [G, K] sum of patches
    count: int = 0  # patches seen
    macs: int = 0  # per sample
    extra: dict = field(default_factory=dict)

    def absorb(self, other: LayerStatistics) -> LayerStatistics:
        """Add ``other`` (the same layer's statistics of later batches) in place; returns
        ``self``. Histograms absorb, sums add in the order ``self + other``; ``macs`` and
        ``extra`` are per-layer facts, not sums (``other``'s, where ``self`` has none)."""
        for f in ("input", "output"):
            mine, theirs = getattr(self, f), getattr(other, f)
            if theirs is not None:
                setattr(self, f, theirs if mine is None else mine.absorb(theirs))
        self.H, self.sum = _add(self.H, other.H), _add(self.sum, other.sum)
        self.count += other.count
        self.macs = self.macs or other.macs
        self.extra = self.extra or other.extra
        return self

    @property
    def mean(self) -> torch.Tensor:
        """Mean patch ``[G, K]``."""
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` over patches ``[G, K, K]``."""
        return self.H / max(self.count, 1)


def _tup(v, nd: int) -> tuple:
    return tuple(v) if isinstance(v, list | tuple) else (v,) * nd


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where both are set, else whichever is (``None`` for neither)."""
    return b if a is None else a if b is None else a + b


@dataclass(frozen=True)
class ConvCall:
    """The geometry of one ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` call (tuples of ``nd``
    ints; ``padding`` may be a string for a plain convolution)."""

    nd: int
    stride: tuple
    padding: tuple | str
    dilation: tuple
    groups: int
    transposed: bool = False
    output_padding: tuple = ()


# positional parameters after (input, weight, bias), in torch's order
_CONV_PARAMS = ("stride", "padding", "dilation", "groups")
_TRANSPOSED_PARAMS = ("stride", "padding", "output_padding", "groups", "dilation")
_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def _conv_args(name: str, args: tuple, kwargs: dict) -> ConvCall | None:
    """The :class:`ConvCall` of a convolution call by torch function name, None for linear."""
    if name == "linear":
        return None
    transposed = name.startswith("conv_transpose")
    nd = int(name[-2])
    params = _TRANSPOSED_PARAMS if transposed else _CONV_PARAMS
    v = dict(_DEFAULTS)
    v.update({k: a for k, a in zip(params, args[3:], strict=False) if a is not None})
    v.update({k: a for k, a in kwargs.items() if k in v and a is not None})
    pad = v["padding"] if isinstance(v["padding"], str) else _tup(v["padding"], nd)
    return ConvCall(
        nd,
        _tup(v["stride"], nd),
        pad,
        _tup(v["dilation"], nd),
        int(v["groups"]),
        transposed,
        _tup(v["output_padding"], nd),
    )


def _im2col(x: torch.Tensor, ks: tuple, stride: tuple, dilation: tuple) -> torch.Tensor:
    """N-d im2col of an already padded ``x [B, C, *S]``: ``[B, L, C * prod(ks)]``, each patch in
    ``(c, k_1, ..., k_n)`` order (``F.unfold``'s, for any number of spatial dims)."""
    nd = len(ks)
    for d in range(nd):
        span = dilation[d] * (ks[d] - 1) + 1
        x = x.unfold(2 + d, span, stride[d])[..., :: dilation[d]]
    # [B, C, *L, *k] -> [B, *L, C, *k]
    B, C = x.shape[:2]
    x = x.movedim(1, 1 + nd)
    L = x.shape[1 : 1 + nd].numel()
    return x.reshape(B, L, C * torch.Size(ks).numel())


def _grouped(cols: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, L, C*k]`` patches -> ``[G, B*L, C/G*k]``."""
    B, L, CK = cols.shape
    K = CK // groups
    return cols.reshape(B, L, groups, K).permute(2, 0, 1, 3).reshape(groups, B * L, K)


def _transposed_patches(w: torch.Tensor, x: torch.Tensor, call: ConvCall) -> torch.Tensor:
    """The patches of a transposed convolution, in the canonical weight order.

    ``conv_transpose(x, W)`` equals a stride-1 convolution (dilation kept) of ``x`` with
    ``stride - 1`` zeros inserted between its pixels, padded by ``dilation * (k - 1) - padding``
    (plus ``output_padding`` at the end), with the kernel flipped: output pixel ``p`` is
    ``sum_{c,k} canon[o, c, k] * xd[c, p + (K - 1 - k) * dilation]``. So a patch is the window
    of the zero-inserted input read with its kernel axes reversed; ``patches @ canon_g^T``
    reproduces the layer's output exactly (``tests/transforms/test_statistics.py``).
    """
    nd = call.nd
    ks = tuple(w.shape[2:])
    B, C, *S = x.shape
    xd = x.new_zeros(B, C, *[(n - 1) * s + 1 for n, s in zip(S, call.stride, strict=True)])
    xd[(slice(None), slice(None), *[slice(None, None, s) for s in call.stride])] = x
    pad: list[int] = []
    for d in reversed(range(nd)):  # F.pad: last dim first; negative values crop
        lead = call.dilation[d] * (ks[d] - 1) - call.padding[d]
        pad += [lead, lead + call.output_padding[d]]
    xd = F.pad(xd, pad)
    cols = _im2col(xd, ks, (1,) * nd, call.dilation)  # [B, L, C*k]
    cols = cols.reshape(*cols.shape[:2], C, *ks).flip(list(range(3, 3 + nd)))
    return _grouped(cols.reshape(B, cols.shape[1], -1), call.groups)


def patches(layer: nn.Module, x: torch.Tensor, call: ConvCall | None) -> torch.Tensor:
    """The input a layer's weight multiplies, as patches ``[G, N, K]`` (``K = in/groups *
    prod(kernel)``, ``N`` patches over the batch: one per output pixel), each in the order of
    the canonical weight's row (:func:`omse.nn.layers.canonical_weight`), so that output
    channel ``o`` of group ``g`` at patch ``n`` is ``canon[o] . patches[g, n]``."""
    if call is None or layer.weight.dim() == 2:
        return x.reshape(1, -1, x.shape[-1])
    w = layer.weight
    if isinstance(call.padding, str):
        raise CalibrationError(
            f"a layer with padding={call.padding!r} cannot give input patches; use integer padding"
        )
    if call.transposed:
        return _transposed_patches(w, x, call)
    stride, padding, dilation, groups = call.stride, call.padding, call.dilation, call.groups
    if call.nd == 3:
        pad = [p for d in reversed(range(3)) for p in (padding[d], padding[d])]
        return _grouped(_im2col(F.pad(x, pad), tuple(w.shape[2:]), stride, dilation), groups)
    if w.dim() == 3:  # conv1d as 2d
        x = x.unsqueeze(-2)
        ks = (1, w.shape[-1])
        stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
    else:
        ks = tuple(w.shape[-2:])
    cols = F.unfold(x, ks, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
    B, CK, L = cols.shape
    K = CK // groups
    return cols.reshape(B, groups, K, L).permute(1, 0, 3, 2).reshape(groups, B * L, K)


def patch_sums(
    layer: nn.Module, x: torch.Tensor, call: ConvCall | None
) -> tuple[torch.Tensor, int]:
    """``(sum over patches [G, K] float64, number of patches)``: ``patches(layer, x, call)``
    summed over its ``N`` patches, without building them for a 2-d convolution (each kernel
    tap's sum is that of a strided window of the padded input: ``prod(kernel)`` reductions of
    the input's size instead of an im2col copy ``prod(kernel)`` times its size)."""
    w = layer.weight
    if (
        call is None
        or w.dim() != 4
        or call.nd != 2
        or call.transposed
        or isinstance(call.padding, str)
    ):
        p = patches(layer, x.to(torch.float64), call)
        return p.sum(1), p.shape[1]
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = w.shape[-2:], call.stride, call.padding, call.dilation
    ho, wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x.to(torch.float64), (pw, pw, ph, ph))
    sums = xp.new_zeros(C, kh, kw)
    for a in range(kh):
        for b in range(kw):
            window = xp[
                :,
                :,
                a * dh : a * dh + sh * (ho - 1) + 1 : sh,
                b * dw : b * dw + sw * (wo - 1) + 1 : sw,
            ]
            sums[:, a, b] = window.sum((0, 2, 3))
    return sums.reshape(call.groups, -1), B * ho * wo


class _Capture(TorchFunctionMode):
    """Calls ``fn(input, call)`` when a convolution, transposed convolution or ``linear`` runs
    on ``weight``."""

    _NAMES = (
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "linear",
    )

    def __init__(self, weight: torch.Tensor, fn):
        super().__init__()
        self.weight, self.fn = weight, fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self._NAMES and len(args) >= 2 and args[1] is self.weight:
            self.fn(args[0], _conv_args(name, args, kwargs))
        return func(*args, **kwargs)


class _Observer:
    """The per-layer callbacks of one :func:`collect` pass."""

    def __init__(self, needs: Needs, stats: dict[str, LayerStatistics]):
        self.needs = needs
        self.stats = stats
        self.clamp = needs.clamps
        self.batch = 0
        self._macs: dict[tuple[str, int, int], int] = {}  # (layer, in, out per sample) -> MACs

    def input(self, q: QuantizedLayer, x: torch.Tensor) -> None:
        """Checks ``x`` is finite (a NaN or Inf names the layer and batch), notes its size and
        adds it to the layer's input histogram where one is asked for (whose own check of the
        extremes is then the only read of ``x`` for finiteness)."""
        with torch._C.DisableTorchFunction():  # the statistics' own ops: no mode sees them
            self._input(q, x)

    def _input(self, q: QuantizedLayer, x: torch.Tensor) -> None:
        st = self.stats[q.name]
        st.extra["input_numel"] = x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel()
        try:
            if self.needs.input_histograms:
                if st.input is None:
                    st.input = HistogramStats(self.needs.bins)
                st.input.update(x)
            elif x.is_floating_point() and not _finite(x):
                raise NonFiniteError
        except NonFiniteError:
            raise CalibrationError(
                f"layer {q.name!r} got NaN or Inf inputs on calibration batch {self.batch}"
            ) from None

    @contextlib.contextmanager
    def capture(self, q: QuantizedLayer) -> Iterator[None]:
        if not self.needs.patches:
            yield
            return
        with _Capture(q.layer.weight, lambda x, a: self._patches(q, x, a)):
            yield

    def _patches(self, q: QuantizedLayer, x: torch.Tensor, conv_args) -> None:
        with torch._C.DisableTorchFunction():  # the statistics' own ops: no mode sees them
            self._patch_stats(q, x, conv_args)

    def _patch_stats(self, q: QuantizedLayer, x: torch.Tensor, conv_args) -> None:
        st = self.stats[q.name]
        if not self.needs.patch_moments:  # the sums alone (bias correction)
            total, n = patch_sums(q.layer, x.detach(), conv_args)
            if st.sum is None:
                st.sum = torch.zeros_like(total)
            st.sum += total
            st.count += n
            return
        p = patches(q.layer, x.detach().to(torch.float64), conv_args)  # [G, N, K]
        G, _, K = p.shape
        if st.sum is None:
            st.sum = torch.zeros(G, K, dtype=torch.float64)
            if self.needs.patch_moments:
                st.H = torch.zeros(G, K, K, dtype=torch.float64)
        if st.H is not None:
            st.H += p.transpose(1, 2) @ p
        st.sum += p.sum(1)
        st.count += p.shape[1]

    def output(self, q: QuantizedLayer, y: torch.Tensor) -> None:
        """Sets the layer's MACs and adds ``y`` clamped to the layer's output range to its
        output histogram, for the layers that have one (no clamp for ``(-inf, inf)``: the same
        values)."""
        with torch._C.DisableTorchFunction():  # the statistics' own ops: no mode sees them
            self._output(q, y)

    def _output(self, q: QuantizedLayer, y: torch.Tensor) -> None:
        st = self.stats[q.name]
        per_sample = y.numel() // max(y.shape[0], 1) if y.dim() > 1 else y.numel()
        key = (q.name, st.extra.get("input_numel", 0), per_sample)
        if key not in self._macs:  # a function of the layer and the sizes: once per pass
            self._macs[key] = q.macs_per_sample(key[1], per_sample)
        st.macs = self._macs[key]
        if q.name in self.clamp:
            lo, hi = self.clamp[q.name]
            if st.output is None:
                st.output = HistogramStats(self.needs.bins)
            unbounded = lo == -math.inf and hi == math.inf
            st.output.update(y, None if unbounded else (lo, hi))


def _finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x`` (one reduction, no boolean copy: NaN propagates to the extremes)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


@torch.no_grad()
def collect(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    batches: list,
    needs: Needs,
    progress: bool = False,
    desc: str = "calibrating",
) -> dict[str, LayerStatistics]:
    """One pass over ``batches``: the statistics ``needs`` asks for, per layer (and each layer's
    ``macs`` set). Each batch's histogram updates are binned after its forward pass, side by side
    on ``torch.get_num_threads()`` threads (:class:`~omse.core.stats.DeferredBinning`; bit for
    bit what binning each update at once gives). Raises :class:`CalibrationError` naming the
    batch the model fails on, or the layer that gets NaN/Inf inputs."""
    stats = {n: LayerStatistics() for n in layers}
    obs = _Observer(needs, stats)
    for q in layers.values():
        q.observer = obs
    PASSES[0] += 1
    rank, size = world()
    steps = all_max(len(batches)) if size > 1 else len(batches)

    inplace = False  # the model changed an observed tensor in place: later batches bin at once

    def forward(i: int, deferred: bool) -> None:
        obs.batch, obs.stats = i * size + rank, {n: LayerStatistics() for n in layers}
        mode = contextlib.nullcontext() if deferred else binner.paused()
        with mode, model_forward_errors(obs.batch, batches[i]):
            run_model(model, batches[i])

    def run(i: int) -> dict[str, LayerStatistics]:
        """Batch ``i``'s statistics: the forward pass, then its histograms binned on
        ``binner``'s threads; where the model changed an observed tensor in place, the batch
        again with every update binned at once (as the later batches then are). Where the
        binning found NaN or Inf values, the batch again binning at once, whose first update of
        such values raises naming its layer."""
        nonlocal inplace
        forward(i, deferred=not inplace)
        if not inplace and not binner.submit():
            inplace = True
            forward(i, deferred=False)
        try:
            binner.wait()
        except NonFiniteError:
            forward(i, deferred=False)
            raise CalibrationError(
                f"calibration batch {obs.batch} gave NaN or Inf values to a histogram"
            ) from None
        return obs.stats

    try:
        with DeferredBinning(torch.get_num_threads()) as binner:
            for i in progress_bar(
                range(steps), desc=desc, disable=not progress or rank > 0, leave=False
            ):
                part = None  # this rank's partial of global batch i * size + rank (None: no batch)
                if i < len(batches):
                    try:
                        part = run(i)
                    except Exception as e:
                        if size == 1:
                            raise
                        # the other ranks stop too, then re-raise
                        gather(f"{type(e).__name__}: {e}")
                        raise
                for r, p in enumerate(gather(part)):  # rank order = global batch order
                    if isinstance(p, str):
                        raise CalibrationError(f"rank {r} failed on its calibration batch {i}: {p}")
                    for name, st in (p or {}).items():
                        stats[name].absorb(st)
    finally:
        for q in layers.values():
            q.observer = None
    for name, q in layers.items():
        q.macs = stats[name].macs
    return stats
