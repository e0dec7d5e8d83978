"""Activation quantizers from calibration statistics: input scales, the output quantizers and
shared quantizers ``target="int8"`` places, and the scale caps behind a ReLU6; and the weight
grid ``target="int8"`` gives 8-bit weights (:func:`int8_weight_grid`).

- :func:`plan_output_quantizers` reads the traced dataflow (:func:`omse.transforms.graph.
  layer_routes`) and says which layers need an output quantizer (with the range the ops after
  them impose), which quantized inputs share a quantizer with another tensor's, and which input
  scales are capped; it attaches :class:`~omse.nn.layers.SharedInputQuantizer` hooks to module
  outputs read by a quantized layer and by other code (a residual block's output).
- :func:`set_activation_scales`, :func:`cap_activation_scales`, :func:`set_output_scales` and
  :func:`share_scales` turn histograms (:mod:`omse.transforms.statistics`) into scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from ..config import LayerConfig
from ..core.grids import Grid
from ..core.ranges import MinMax, fit_affine, make_range_setter
from ..core.stats import HistogramStats
from ..distributed import gather
from ..nn.layers import (
    S8_SAFE_CODE,
    QuantizedLayer,
    is_depthwise,
    quantize_weight_terms,
    share_input_quantizer,
)
from ..nn.ops import OpQuantizers, detach_op_quantizers, op_quantizers
from .graph import (
    DOMAIN,
    SILU_FLOOR,
    consumers,
    float_output,
    input_groups,
    layer_routes,
    marker_attrs,
    rewrite_markers,
    shared_input_candidates,
    trace,
)
from .statistics import first_row, run_model

__all__ = [
    "OUTPUT_BITS",
    "PlanTrace",
    "plan_trace",
    "int8_weight_grid",
    "keep_first_layer_8bit",
    "plan_output_quantizers",
    "plan_op_quantizers",
    "set_op_scales",
    "observe_sites",
    "gather_site_stats",
    "INTEGER_SITE_OPS",
    "PASSTHROUGH_SITE_OPS",
    "REQUANT_SITE_OPS",
    "set_activation_scales",
    "FitCache",
    "cap_activation_scales",
    "set_output_scales",
    "share_scales",
]

Share = tuple[str, str]
"""``(producer layer, "input" | "output")``: which of the producer's quantizers a consumer's input
shares (:func:`plan_output_quantizers`, :func:`share_scales`)."""

OUTPUT_BITS = 8
"""Bits of the output quantizers ``target="int8"`` places (the requantized output of an 8-bit
integer kernel); only input quantizers of this width are shared with them."""


INTEGER_SITE_OPS = (
    "Sigmoid",
    "Mul",
    "Add",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "LeakyRelu",
)
"""Ops onnxruntime's CPU provider runs on 8-bit tensors when every input comes from a
``DequantizeLinear`` and the output goes to a ``QuantizeLinear`` (its QDQ selectors: unary
``QLinearSigmoid`` / ``QLinearAveragePool`` / ``QLinearGlobalAveragePool`` /
``QLinearLeakyRelu``, binary ``QLinearAdd`` / ``QLinearMul``, variadic ``QLinearConcat``).
``Softmax`` has a selector too (``QLinearSoftmax``) but is left float: omse's simulation does
not model its integer kernel."""
PASSTHROUGH_SITE_OPS = ("MaxPool", "Resize", "Slice", "Split")
"""Ops whose output codes are input codes: onnxruntime drops ``DequantizeLinear -> op ->
QuantizeLinear`` with equal parameters and runs them on the 8-bit tensor (``Tensor.chunk`` /
``split`` trace to ``Slice`` or ``Split``; ``Resize`` in its ``"nearest"`` mode only)."""
REQUANT_SITE_OPS = ("Resize",)
"""Float ops of ``target="int8"`` (a linear ``Resize``: no integer kernel in onnxruntime) whose
output gets a quantizer when their input has one, so that the integer op reading them runs as
one (``DequantizeLinear -> Resize -> QuantizeLinear -> QLinearAdd``, as ``quantize_static``
writes an upsampling path)."""
TFLITE_INTEGER_SITE_OPS = ("HardSwish", "Tanh", "Softmax")
"""Further :data:`INTEGER_SITE_OPS` of ``target="tflite"`` (int8 kernels in LiteRT and TFLM)."""
TFLITE_FIXED_OUTPUT = {"Sigmoid": 1.0 / 256.0, "Softmax": 1.0 / 256.0}
"""Sites of ``target="tflite"`` whose output step TFLite's int8 kernel fixes (on ``[0, 255]``,
zero point -128 in TFLite's int8)."""
TFLITE_PASSTHROUGH_SITE_OPS = ("Pad",)
"""Further :data:`PASSTHROUGH_SITE_OPS` of ``target="tflite"`` (zero padding at the zero point)."""
_REFORMS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Transpose"}


@dataclass
class PlanTrace:
    """One trace of a wrapped model (:func:`plan_trace`) that both plans read: the graph with
    the op quantizers' site markers (``kind="op"``) and a ``"mod"`` marker on the output of each
    module a quantized layer reads directly (``modules[idx]``), i.e. where
    :func:`plan_output_quantizers` may attach a shared input quantizer."""

    proto: onnx.ModelProto
    names: list[str]  # quantized layers in marker-index order
    modules: list[str]  # "mod" marker idx -> module name
    producers: dict[str, str]  # layer -> the module whose output is its input
    signature: tuple  # the model's structure, for reuse on a copy of the same model

    def output_graph(self) -> onnx.ModelProto | None:
        """The graph :func:`plan_output_quantizers` traces (no op quantizers, no shared input
        quantizers): every ``"op"`` and ``"mod"`` marker removed (None: see
        :func:`~omse.transforms.graph.rewrite_markers`)."""
        return rewrite_markers(
            self.proto, lambda kind, idx: None if kind in ("op", "mod") else (kind, idx)
        )

    def op_graph(self, layers: dict[str, QuantizedLayer]) -> onnx.ModelProto | None:
        """The graph :func:`plan_op_quantizers` traces once the shared input quantizers are
        attached (``layer.input_from``): the ``"mod"`` marker of a module that carries layer
        ``L``'s input quantizer becomes ``("tq", L's marker index)``, the others are removed."""
        index = {n: i for i, n in enumerate(self.names)}
        carried = {layers[n].input_from: index[n] for n in self.names if layers[n].input_from}
        modules = self.modules
        if not set(carried) <= set(modules):
            return None  # a quantizer on a module the trace did not mark

        def edit(kind, idx):
            if kind != "mod":
                return kind, idx
            module = modules[idx]
            return ("tq", carried[module]) if module in carried else None

        return rewrite_markers(self.proto, edit)


def _signature(qmodel: nn.Module, layers: dict[str, QuantizedLayer]) -> tuple | None:
    """What a trace for the plans depends on: the module tree (types; a GraphModule's code),
    or None where a layer has an activation quantizer, a learner or a shared input quantizer
    already (state the trace reads: no reuse then)."""
    for ql in layers.values():
        if ql.act_scale is not None or ql.out_scale is not None or ql.learner is not None:
            return None
        if ql.input_from:
            return None
    code = getattr(qmodel, "code", None)  # a GraphModule copy has a class of its own: by name
    return (
        code,
        tuple((n, type(m).__module__, type(m).__qualname__) for n, m in qmodel.named_modules()),
    )


def plan_trace(
    qmodel: nn.Module,
    layers: dict[str, QuantizedLayer],
    example,
    reuse: PlanTrace | None = None,
) -> PlanTrace | None:
    """For ``target="int8"`` and ``"tflite"``: attach :class:`~omse.nn.ops.OpQuantizers` to
    ``qmodel`` and trace it once for both plans (:class:`PlanTrace`), or return ``reuse`` (a
    trace of an identical copy of the model: the fresh copy of a later calibration round) when
    its signature matches. Returns None, attaching nothing, for a weight-only model, a model
    with op quantizers or activation quantizers already, and where the one trace could differ
    from the two (a marker on a constant): the plans then trace the model themselves."""
    if all(ql.cfg.act_bits is None for ql in layers.values()):
        return None
    if op_quantizers(qmodel) is not None:
        return None
    signature = _signature(qmodel, layers)
    if signature is None:
        return None
    if reuse is not None and reuse.signature == signature and set(reuse.names) == set(layers):
        return reuse
    example = first_row(example)
    producers = _producer_modules(qmodel, example, list(layers))
    inside = tuple(n + "." for n in layers)  # a wrapped layer's own modules carry no quantizer
    modules = sorted({m for m in producers.values() if not m.startswith(inside)})
    ops = op_quantizers(qmodel, create=True)
    ops.extra_sites = any(ql.cfg.target == "tflite" for ql in layers.values())
    try:
        proto, qls = trace(qmodel, example, marks=modules)
    except BaseException:
        detach_op_quantizers(qmodel)
        raise
    traced = PlanTrace(proto, [ql.name for ql in qls], modules, producers, signature)
    if set(traced.names) != set(layers) or traced.output_graph() is None:
        detach_op_quantizers(qmodel)
        return None
    return traced


def plan_op_quantizers(
    qmodel: nn.Module,
    layers: dict[str, QuantizedLayer],
    example,
    out_plan: dict[str, tuple[float, float]],
    traced: PlanTrace | None = None,
) -> OpQuantizers | None:
    """For ``target="int8"``: attach :class:`~omse.nn.ops.OpQuantizers` to ``qmodel`` and plan
    each site (see :mod:`omse.nn.ops`) on the traced graph, in graph order. A tensor is
    *quantized* when a Q/DQ produces it in the export: a layer output with an output quantizer
    (``out_plan``) or a requantization for its reader, a quantized input, a planned site, and a
    reshape of a quantized tensor (the same values, moved). A site of :data:`INTEGER_SITE_OPS`
    whose inputs are all quantized (or of :data:`REQUANT_SITE_OPS` whose input is) gets
    ``"none"`` when its output goes straight to a quantized layer's input (that quantizer is its
    output quantizer), ``"fused"`` when it reaches one through reshapes and one-output
    passthrough ops only, ``"none"`` when a ``Relu`` site follows (which then gets ``"own"`` on
    an unsigned grid: onnxruntime folds the Relu into the quantizer), else ``"own"``; a site of
    :data:`PASSTHROUGH_SITE_OPS` on a quantized input, and a ``Concat`` whose inputs all carry
    one quantizer, gets ``"same"`` (or ``"none"`` before a
    quantized input, which then shares the site quantizer its input has: one quantizer per
    tensor, so that the runtime runs the op on the codes). Returns None (nothing attached) for a
    model without sites or without activation quantizers. ``traced``: the model's
    :func:`plan_trace` (its :meth:`PlanTrace.op_graph` stands in for the trace)."""
    if all(ql.cfg.act_bits is None for ql in layers.values()):
        return None
    example = first_row(example)
    ops = op_quantizers(qmodel, create=True)
    tflite = any(ql.cfg.target == "tflite" for ql in layers.values())
    ops.extra_sites = tflite
    integer_ops = INTEGER_SITE_OPS + (TFLITE_INTEGER_SITE_OPS if tflite else ())
    passthrough_ops = PASSTHROUGH_SITE_OPS + (TFLITE_PASSTHROUGH_SITE_OPS if tflite else ())
    proto = traced.op_graph(layers) if traced is not None else None
    if proto is not None:
        qls = [layers[n] for n in traced.names]
    else:
        proto, qls = trace(qmodel, example)
    g = proto.graph
    routes = layer_routes(proto)
    readers = consumers(g)
    producers = {o: n for n in g.node for o in n.output}
    quant: dict[str, tuple[str, str | int]] = {}  # quantized tensor -> whose quantizer it has
    deferred: set[int] = set()  # Relu sites that quantize for the integer op before them

    def reads(t: str) -> list:
        return [u for u in readers.get(t, []) if u.op_type not in ("Shape", "Size")]

    def is_marker(n, kinds) -> bool:
        return n.domain == DOMAIN and marker_attrs(n)[0] in kinds

    def quantized_input(n) -> bool:
        return is_marker(n, ("act", "tq")) and qls[marker_attrs(n)[1]].cfg.act_bits is not None

    def passes_codes(n) -> bool:
        """``n``'s output codes are its input codes (a passthrough op, a ``Resize`` only in its
        ``"nearest"`` mode)."""
        if n.op_type not in passthrough_ops:
            return False
        mode = next((a.s for a in n.attribute if a.name == "mode"), b"nearest")
        return n.op_type != "Resize" or mode == b"nearest"

    def one_source(n) -> bool:
        """``n`` is a ``Concat`` whose inputs all carry one quantizer (an SPP block's input and
        its max pools): its output is on that grid already, as the input codes put together."""
        ins = [i for i in n.input if i]
        return (
            n.op_type == "Concat"
            and all(i in quant for i in ins)
            and len({quant[i] for i in ins}) == 1
        )

    def reached_layer(t: str) -> str | None:
        """The layer whose quantized input ``t`` reaches through reshapes and one-output
        passthrough ops only (``MaxPool`` of the quantized values is the quantized ``MaxPool``),
        if any."""
        while True:
            users = reads(t)
            if len(users) != 1:
                return None
            u = users[0]
            if quantized_input(u):
                return qls[marker_attrs(u)[1]].name
            moves = u.domain == "" and (
                u.op_type in _REFORMS or (passes_codes(u) and len(u.output) == 1)
            )
            if not moves and not is_marker(u, ("op",)):
                return None
            t = u.output[0]

    def to_quantizer(t: str) -> bool:
        """``t`` goes to one quantized input, through ``Relu`` / ``Clip`` at most (which
        onnxruntime folds into that quantizer, or runs on its 8-bit input)."""
        while True:
            users = reads(t)
            if len(users) != 1:
                return False
            if quantized_input(users[0]):
                return True
            if users[0].domain != "" or users[0].op_type not in ("Relu", "Clip"):
                return False
            t = users[0].output[0]

    for node in g.node:
        if node.domain != DOMAIN:
            src = quant.get(node.input[0]) if node.input else None
            if node.op_type in ("Relu", "Clip") and src is not None and src[0] == "out":
                # a layer's output quantizer is calibrated on the clamped values: the clamp
                # keeps the tensor on that grid (the export drops it where it is redundant)
                quant[node.output[0]] = src
            elif node.op_type in _REFORMS and src is not None:
                quant[node.output[0]] = src  # the same values, moved (a channel shuffle)
            continue
        kind, idx, _ = marker_attrs(node)
        out = node.output[0]
        if kind == "out":
            ql, r = qls[idx], routes.get(idx)
            fused = r is not None and r.kind == "fused"
            if ql.name in out_plan:
                quant[out] = ("out", ql.name)
            elif fused and qls[r.consumer].cfg.act_bits is not None:
                quant[out] = ("act", qls[r.consumer].name)
            continue
        if kind in ("act", "tq"):
            if qls[idx].cfg.act_bits is None:
                continue
            src = quant.get(node.input[0])
            if kind == "act" and src is not None and src[0] == "site":
                # a layer reading a site's tensor beside other readers: one quantizer per tensor
                ops.shared[qls[idx].name] = int(src[1])
                quant[out] = src
            else:
                quant[out] = ("act", qls[idx].name)
            continue
        if kind != "op":
            continue
        p = producers.get(node.input[0])
        op = p.op_type if p is not None and p.domain == "" else "?"
        ops.ops[idx] = op
        users = reads(out)
        direct = to_quantizer(out)
        site = "none"
        passes = op != "?" and (passes_codes(p) or one_source(p))
        requant = op in REQUANT_SITE_OPS and not tflite and not passes
        if passes and p.input[0] in quant:
            site = "none" if direct else "same"
        elif (requant and p.input[0] in quant) or (
            op in integer_ops and all(i in quant for i in p.input if i)
        ):
            target = None if direct else reached_layer(out)
            relu = len(users) == 1 and users[0].op_type == "Relu" and users[0].domain == ""
            after = reads(users[0].output[0]) if relu else []
            if relu and len(after) == 1 and is_marker(after[0], ("op",)):
                deferred.add(marker_attrs(after[0])[1])
            elif target is not None:
                site = "fused"
                ops.fused[idx] = target
            elif not direct:
                site = "own"
        elif op == "Relu" and idx in deferred:
            site = "none" if direct else "own"
        ops.kinds[idx] = site
        if site == "none" and passes and p.input[0] in quant:
            quant[out] = quant[p.input[0]]  # codes passed through: the reader shares them
        elif site == "none" and node.input[0] in quant:
            quant[out] = quant[node.input[0]]  # nothing between: the same tensor
        elif site == "same":
            src = quant[p.input[0]]
            ops.sources[idx] = src
            quant[out] = src
        elif site == "fused":
            quant[out] = ("act", ops.fused[idx])  # that layer's quantizer: one per tensor
        elif site != "none":
            quant[out] = ("site", idx)
    if all(k == "none" for k in ops.kinds.values()):
        detach_op_quantizers(qmodel)  # every op is float or feeds a quantizer directly
        return None
    return ops


@contextlib.contextmanager
def observe_sites(
    ops: OpQuantizers | None, bins: int, only: set[int] | None = None
) -> Iterator[dict[int, HistogramStats]]:
    """While the block runs, the output histograms of ``ops``' ``"own"`` sites (those of
    ``only``, if given; filled in place; empty for ``ops=None``)."""
    stats: dict[int, HistogramStats] = {}
    if ops is None:
        yield stats
        return

    def see(site: int, y: torch.Tensor) -> None:
        if ops.kinds.get(site) == "own" and (only is None or site in only):
            with torch._C.DisableTorchFunction():  # the histogram's ops: no mode sees them
                if site not in stats:
                    stats[site] = HistogramStats(bins)
                stats[site].update(y.detach())

    ops.observer = see
    try:
        yield stats
    finally:
        ops.observer = None


def gather_site_stats(stats: dict[int, HistogramStats]) -> dict[int, HistogramStats]:
    """Every rank's site histograms merged (in rank order; ``stats`` itself on one process), so
    that all ranks fit the same site scales."""
    parts = gather(stats)
    if len(parts) == 1:
        return stats
    out: dict[int, HistogramStats] = {}
    for part in parts:
        for site, st in part.items():
            out[site] = st if site not in out else out[site].absorb(st)
    return out


def set_op_scales(
    ops: OpQuantizers,
    layers: dict[str, QuantizedLayer],
    stats: dict[int, HistogramStats],
    cfg: LayerConfig,
    fits: FitCache | None = None,
) -> None:
    """Each ``"own"`` site's step and grid from its output histogram (MMSE, or ``cfg``'s
    ``act_method``, on :data:`OUTPUT_BITS`; unsigned for non-negative outputs, ``cfg``'s
    ``act_grid`` otherwise); a layer that reads a site's tensor beside other readers takes that
    quantizer as its input quantizer (one per tensor); each ``"fused"`` site takes its layer's
    input quantizer, each ``"same"`` site its input's (for the export: the simulation leaves
    those values as they are). ``fits`` (optional) keeps and reuses the fitted steps."""
    todo: dict[int, FitJob] = {}
    for site, kind in ops.kinds.items():
        if kind == "own" and ops.extra_sites and ops.ops.get(site) in TFLITE_FIXED_OUTPUT:
            # TFLite's int8 LOGISTIC / SOFTMAX write this grid: no requantization after them
            ops.set_quantizer(
                site, torch.tensor(TFLITE_FIXED_OUTPUT[ops.ops[site]]), Grid(8, "unsigned")
            )
        elif kind == "own" and site in stats and stats[site].n > 0:
            todo[site] = (cfg.act_method, cfg.act_grid, stats[site], OUTPUT_BITS)
        elif kind == "own":
            ops.set_quantizer(site, None, None)
    for site, fitted in zip(todo, fit_all(fits or _fit, list(todo.values())), strict=True):
        ops.set_quantizer(site, *fitted)
    for name, site in ops.shared.items():
        if site in ops.scales and layers[name].cfg.act_bits == OUTPUT_BITS:
            layers[name].set_act(ops.scales[site], ops.grids[site])

    def source(src: tuple) -> tuple:
        kind, who = src
        if kind == "site":
            return ops.scales.get(who), ops.grids.get(who)
        ql = layers[who]
        return (ql.out_scale, ql.out_grid) if kind == "out" else (ql.act_scale, ql.a_grid)

    for site, kind in ops.kinds.items():
        if kind == "fused":
            ql = layers[ops.fused[site]]
            ops.set_quantizer(site, ql.act_scale, ql.a_grid)
        elif kind == "same":
            ops.set_quantizer(site, *source(ops.sources[site]))
        elif kind == "none":
            ops.set_quantizer(site, None, None)


def int8_weight_grid(cfg: LayerConfig, layer: nn.Module | None = None) -> Grid:
    """The grid a layer's weights are quantized on: the config's, except 8-bit weights of
    ``target="int8"`` outside depthwise convolutions (and the first layer, see
    :func:`keep_first_layer_8bit`), which get 7 bits (codes in ``[-64, 63]``,
    within :data:`~omse.nn.layers.S8_SAFE_CODE`): their INT8 export is then exact in
    onnxruntime's uint8 x int8 GEMM kernels on every x86 CPU (without VNNI those add product
    pairs in saturating int16) and runs as u8s8, not u8u8, on VNNI CPUs, and OpenVINO runs it as
    int8; onnxruntime's own ``reduce_range`` makes the same choice. A depthwise convolution
    (:func:`~omse.nn.layers.is_depthwise`) keeps 8 bits: onnxruntime's depthwise kernels
    multiply in 16 bits, exact for any codes, and its 9-weight kernels lose the most to a
    coarser grid (EfficientNet-Lite0 W8A8: ``benchmarks/int8_weights.py``). Merged residual
    kernels of 4-bit terms (``k*Q1 + Q2``, up to +-128) keep their codes: the export writes
    those layers as UINT8 unless depthwise (``export_onnx(int8_weights="auto")``)."""
    grid = Grid(cfg.weight_bits, cfg.weight_grid)  # type: ignore[arg-type]
    if cfg.target != "int8" or max(-grid.qmin, grid.qmax) <= S8_SAFE_CODE:
        return grid
    if layer is not None and is_depthwise(layer):
        return grid
    return Grid(S8_SAFE_CODE.bit_length(), cfg.weight_grid)  # type: ignore[arg-type]


@torch.no_grad()
def keep_first_layer_8bit(qmodel: nn.Module, layers: dict[str, QuantizedLayer], example) -> str:
    """For ``target="int8"``: the first quantized layer the model runs (the one reading its
    input: a detector's or classifier's stem) keeps the 8-bit grid its config names where
    :func:`int8_weight_grid` narrowed it to 7 bits; its weights are quantized again. Returns its
    name ("" if none changed). Measured on EfficientNet-Lite0 W8A8 (200 views, output SQNR
    against FP32): 8 bits everywhere 22.1 dB; 7 bits everywhere 17.5 dB; 7 bits but depthwise
    18.9 dB; and the stem at 8 bits too 20.9 dB (onnxruntime's ``quantize_static`` W8A8 18.4
    dB). The export writes that layer as UINT8 (``int8_weights="auto"``; exact on every x86
    CPU) unless its codes stay within +-64."""
    order: list[QuantizedLayer] = []
    handles = [
        ql.register_forward_pre_hook(lambda m, _i: order.append(m) if not order else None)
        for ql in layers.values()
    ]
    try:
        run_model(qmodel, first_row(example))
    finally:
        for h in handles:
            h.remove()
    if not order:
        return ""
    ql = order[0]
    grid = Grid(ql.cfg.weight_bits, ql.cfg.weight_grid)  # type: ignore[arg-type]
    if ql.cfg.target != "int8" or ql.w_grid == grid:
        return ""
    ql.w_grid = grid
    cfg = ql.cfg
    ql.set_weight_terms(
        quantize_weight_terms(
            ql.float_weight, grid, cfg.granularity, cfg.weight_method, 1, cfg.scale_dtype
        )
    )
    return ql.name


def plan_output_quantizers(
    qmodel: nn.Module,
    layers: dict[str, QuantizedLayer],
    example,
    traced: PlanTrace | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[str, Share], dict[str, float]]:
    """For ``target="int8"``: the layers that need an output quantizer, with the ``(lo, hi)``
    range the ``Relu``/``Clip`` after them impose (see :func:`omse.transforms.graph.layer_routes`):
    those whose output does not reach exactly one quantized input through quantizer-transparent
    ops, except a Linear whose output only float ops read (see below); ``{consumer: (producer,
    kind)}`` for the quantized inputs that share a quantizer: ``kind="output"``, the producer's
    output quantizer (the consumer reads that output beside other readers); ``kind="input"``,
    the producer's input quantizer (both read one tensor: a module output that carries the
    producer's quantizer for every reader, or a tensor only float ops read besides them, such as
    a LayerNorm output read by the query, key and value projections): one scale per tensor, as
    an integer runtime holds it; and ``{consumer: hi}`` for inputs reached through a ``Clip(..,
    hi)`` whose scale :func:`cap_activation_scales` caps.

    A Linear runs as an integer kernel with a float output (onnxruntime's
    ``MatMulIntegerToFloat`` / ``QGemm`` without an output scale), so where no integer op reads
    its output (:attr:`~omse.transforms.graph.Route.integer_reader`: a transformer's residual
    ``Add`` -> ``LayerNormalization``, ``Gelu``, the attention ``MatMul``) it gets no output
    quantizer: 8-bit per-tensor steps there would only round away the residual stream's outlier
    channels, which the runtime dequantizes at once. The same holds for a module output that
    only float ops read besides its quantized readers: no shared quantizer is attached to it.

    ``traced``: the model's :func:`plan_trace`, read instead of a trace and a forward pass
    (its :meth:`PlanTrace.output_graph` and producers)."""
    if all(ql.cfg.act_bits is None for ql in layers.values()):
        return {}, {}, {}  # weight-only: no activation quantizer to place
    example = first_row(example)
    proto = traced.output_graph() if traced is not None else None
    if proto is not None:
        qls = [layers[n] for n in traced.names]
    else:
        proto, qls = trace(qmodel, example)
    routes = layer_routes(proto)
    names = [ql.name for ql in qls]
    carriers: dict[str, str] = {}  # module -> the layer whose input quantizer it carries
    shares: dict[str, Share] = {}
    wanted = [names[i] for i in shared_input_candidates(proto)]
    if traced is not None:  # in the order the layers ran, as _producer_modules finds them
        chosen = set(wanted)
        producers = {n: m for n, m in traced.producers.items() if n in chosen}
    else:
        producers = _producer_modules(qmodel, example, wanted)
    for layer, module in producers.items():
        if layers[layer].cfg.act_bits != OUTPUT_BITS:
            continue  # a narrower input grid stays that layer's own (the skip path keeps 8 bits)
        first = carriers.get(module)
        if first is None:
            carriers[module] = layer
            share_input_quantizer(qmodel, layers[layer], module)
        elif layers[layer].cfg.act_bits == layers[first].cfg.act_bits:
            shares[layer] = (first, "input")  # two quantized readers of one tensor: one quantizer
    for group in input_groups(proto):  # readers of one tensor without a carried quantizer
        group = [
            names[i] for i in group if names[i] not in shares and names[i] not in carriers.values()
        ]
        bits = [layers[n].cfg.act_bits for n in group]
        for n, b in zip(group[1:], bits[1:], strict=True):
            if b is not None and b == bits[0]:
                shares[n] = (group[0], "input")
    plan, caps = {}, {}
    for i, ql in enumerate(qls):
        r = routes.get(i)
        if r is None:  # the layer does not reach the traced output (unused)
            continue
        fused = r.kind == "fused" and qls[r.consumer].cfg.act_bits is not None
        if fused and set(r.chain) <= {"Relu", "Clip"} and r.clamp[1] < float("inf"):
            caps[qls[r.consumer].name] = r.clamp[1]
        if fused or ql.cfg.act_bits is None:
            continue
        if float_output(ql, r):
            continue  # an integer kernel with a float output: nothing to requantize
        lo, hi = r.clamp
        if r.silu:  # the SiLU sends the far negative tail to ~0: do not spend codes on it
            lo = max(lo, SILU_FLOOR)
        plan[ql.name] = (lo, hi)  # graph outputs too: QGemm then DQ
        for j in r.shared:
            if qls[j].cfg.act_bits == OUTPUT_BITS:
                shares[qls[j].name] = (ql.name, "output")
    return plan, shares, caps


@torch.no_grad()
def _producer_modules(model: nn.Module, example, wanted: list[str]) -> dict[str, str]:
    """``{layer: module}``: for each quantized layer in ``wanted``, the innermost module (not a
    quantized layer) whose forward returns the very tensor the layer gets as input."""
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps traced tensors alive so ids are not reused
    found: dict[str, str] = {}
    handles = []

    def post(_mod, _inp, out, name):
        if isinstance(out, torch.Tensor) and id(out) not in produced:
            produced[id(out)] = name  # "" for a quantized layer: its output quantizer is shared
            alive.append(out)

    def pre(mod, inp):
        if mod.name in wanted and inp and id(inp[0]) in produced:
            found[mod.name] = produced[id(inp[0])]

    for name, m in model.named_modules():
        if not name:
            continue
        if isinstance(m, QuantizedLayer) and m.name in wanted:
            handles.append(m.register_forward_pre_hook(pre))
        tag = "" if isinstance(m, QuantizedLayer) else name
        handles.append(m.register_forward_hook(lambda mod, i, o, n=tag: post(mod, i, o, n)))
    try:
        run_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in found.items() if v}


def cap_activation_scales(layers: dict[str, QuantizedLayer], caps: dict[str, float]) -> None:
    """Lower each capped input scale so that its grid ends at or below the cap (``qmax * s <=
    hi``): the ``Clip(.., hi)`` in front of the layer (a ReLU6) is then implied by the quantizer,
    and an integer runtime fuses the producer's requantization with it."""
    for name, hi in caps.items():
        ql = layers[name]
        if ql.act_scale is None or ql.a_grid is None or ql.a_grid.qmax <= 0:
            continue
        qmax = torch.tensor(float(ql.a_grid.qmax), dtype=torch.float32)
        s = ql.act_scale.to(torch.float32)
        if bool(qmax * s <= hi):
            continue
        s = torch.tensor(hi, dtype=torch.float32) / qmax
        while bool(qmax * s > hi):  # float32 rounding: step down until the grid fits
            s = torch.nextafter(s, torch.zeros_like(s))
        ql.set_act(s, ql.a_grid)


SKEW = 4.0
"""A signed activation tensor is *skewed* when ``SKEW * -min <= max`` (SiLU outputs ``[-0.28,
x]``, hardswish ``[-0.375, 6]``, a pre-SiLU output clamped at :data:`~omse.transforms.graph.
SILU_FLOOR`): a signed ``full`` grid then leaves at least 96 of its 128 negative codes unused, a
step nearly twice the affine grid's. With ``act_grid="auto"`` (the default) such a tensor gets the
affine grid of :func:`~omse.core.ranges.fit_affine` (a zero point fitted with the step; never worse
than the signed grid in squared error, which is one of its candidates); a tensor that is not
skewed keeps the signed grid of zero point 0."""


def _skewed(st: HistogramStats) -> bool:
    return st.min < 0.0 < st.max and SKEW * -st.min <= st.max


class FitCache:
    """Steps already fitted to histograms that no longer change, by histogram identity and
    settings (method, grid kind, bits): a later round of :func:`omse.quantize` that reuses a
    round's statistics (the float fallback's) reuses their fits instead of solving them again.
    Holds its histograms, so an identity stays theirs while it lives; a method that cannot be
    hashed is fitted every time."""

    def __init__(self) -> None:
        self._fits: dict[tuple, tuple[HistogramStats, torch.Tensor, Grid]] = {}

    def __call__(
        self, method, kind: str, st: HistogramStats, bits: int
    ) -> tuple[torch.Tensor, Grid]:
        try:
            key = (id(st), method, kind, bits)
            hash(key)
        except TypeError:
            return _fit(method, kind, st, bits)
        hit = self._fits.get(key)
        if hit is None:
            hit = (st, *_fit(method, kind, st, bits))
            self._fits[key] = hit
        return hit[1].clone(), hit[2]


FitJob = tuple[object, str, HistogramStats, int]
"""The arguments of one fit: ``(act_method, act_grid kind, histogram, bits)``."""


def fit_all(
    fit: Callable[..., tuple[torch.Tensor, Grid]], jobs: list[FitJob]
) -> list[tuple[torch.Tensor, Grid]]:
    """``[fit(*job) for job in jobs]``, the jobs shared by ``torch.get_num_threads()`` threads:
    each fit is independent (its histogram's points, the compiled sweep, which releases the GIL,
    and small tensor ops), so the results are the loop's, bit for bit and in order; the first
    job (in order) that raises raises here."""
    threads = min(torch.get_num_threads(), len(jobs))
    if threads <= 1:
        return [fit(*job) for job in jobs]
    # a pool of its own: the sweep's pool (which a fit may use) must not wait behind these
    with ThreadPoolExecutor(threads, thread_name_prefix="omse-fit") as pool:
        return list(pool.map(lambda job: fit(*job), jobs))


def _fit(method, kind: str, st: HistogramStats, bits: int) -> tuple[torch.Tensor, Grid]:
    """Step and grid of one activation tensor: unsigned for non-negative values; affine (the
    zero point fitted with the step, :func:`fit_affine`) for ``"affine"`` and, with ``"auto"``,
    for a skewed tensor (:data:`SKEW`); else the configured signed kind (``"auto"``: ``"full"``)."""
    setter = make_range_setter(method)
    if kind == "affine" or (kind == "auto" and _skewed(st)):
        return fit_affine(setter, st, bits)
    kind = "full" if kind == "auto" else kind
    grid = Grid(bits, "unsigned" if st.nonnegative else kind)  # type: ignore[arg-type]
    return setter.fit(st, grid), grid


def min_max_quantizer(cfg: LayerConfig, st: HistogramStats, bits: int) -> tuple[torch.Tensor, Grid]:
    """The step and grid :func:`set_activation_scales` would fit to ``st`` with the min-max
    range (nothing clipped) in place of ``cfg``'s ``act_method``, on the same kind of grid: the
    other candidate of ``ActQuant.choose_range``."""
    return _fit(MinMax(), cfg.act_grid, st, bits)


def set_output_scales(
    layers: dict[str, QuantizedLayer],
    stats: dict[str, HistogramStats],
    fits: FitCache | None = None,
) -> None:
    """MMSE (the layer's ``act_method``) output scales for the layers that have output stats, on
    8-bit grids (:data:`OUTPUT_BITS`: what an int8 kernel's requantized output holds, whatever
    the input grids are); unsigned grids for non-negative outputs, affine ones (a fitted zero
    point) for the others with ``act_grid="affine"`` and for skewed ones with ``"auto"``
    (:data:`SKEW`). ``fits`` (optional) keeps and reuses the fitted steps."""
    todo = {n: layers[n].cfg for n, st in stats.items() if st.n > 0}
    jobs = [(cfg.act_method, cfg.act_grid, stats[n], OUTPUT_BITS) for n, cfg in todo.items()]
    for name, fitted in zip(todo, fit_all(fits or _fit, jobs), strict=True):
        layers[name].set_output(*fitted)


def set_activation_scales(
    layers: dict[str, QuantizedLayer],
    stats: dict[str, HistogramStats],
    fits: FitCache | None = None,
) -> None:
    """MMSE (or the configured method) input scales; unsigned grids for non-negative inputs,
    affine grids (a fitted zero point) for the others with ``act_grid="affine"`` and for skewed
    ones with ``"auto"`` (:data:`SKEW`). ``fits`` (optional) keeps and reuses the fitted steps."""
    todo: dict[str, FitJob] = {}
    for name, layer in layers.items():
        cfg = layer.cfg
        st = stats.get(name)
        if cfg.act_bits is None or st is None or st.n == 0:
            layer.set_act(None, None)
            continue
        todo[name] = (cfg.act_method, cfg.act_grid, st, cfg.act_bits)
    for name, fitted in zip(todo, fit_all(fits or _fit, list(todo.values())), strict=True):
        layers[name].set_act(*fitted)


def share_scales(layers: dict[str, QuantizedLayer], shares: dict[str, Share]) -> None:
    """Give each ``consumer`` of ``shares`` its producer's quantizer: its output quantizer
    (``"output"``) or its input quantizer (``"input"``: both read one tensor): one scale per
    tensor."""
    for consumer, (producer, kind) in shares.items():
        src = layers[producer]
        if kind == "output" and src.out_scale is not None:
            layers[consumer].set_act(src.out_scale, src.out_grid)
        elif kind == "input" and src.act_scale is not None:
            layers[consumer].set_act(src.act_scale, src.a_grid)
