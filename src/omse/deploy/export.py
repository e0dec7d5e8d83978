"""ONNX export of a quantized model as a QDQ graph that onnxruntime executes.

:func:`export_onnx` writes one ONNX file (opset 21, IR 10) in which

- every quantized layer's **weights** are integer initializers (``INT4`` for grids of <= 4 bits,
  ``INT8`` for 5..8 bits) followed by a ``DequantizeLinear`` with the kernel-wise scales on
  axis 0 (or one per-tensor scale); residual terms (``W ~ s1*Q1 + s2*Q2``) are separate integer
  tensors in separate branches of the same layer (the layer runs once per term, only the first
  branch carries the bias, and the branch outputs are added: by linearity this is the simulated
  layer); a residual branch holds only the kernels that carry the term where the layer can
  convolve them alone (``Gather`` of those channels of a depthwise layer's input, and a zero
  channel ``Pad``-ded on + ``Gather`` to put its outputs back on the layer's channels), so it
  costs the bytes and MACs of those kernels only;
- every quantized layer's **input** goes through ``QuantizeLinear`` -> ``DequantizeLinear`` with
  the calibrated scale and the grid's own integer type, so saturation is the grid's range:
  ``UINT8``/``INT8`` zero points for 8-bit grids; for 4-bit grids the type is given by
  ``output_dtype=UINT4/INT4`` with no zero-point input (zero point 0): onnxruntime 1.32 throws in
  its ``Clip -> QuantizeLinear`` rewrite on a UINT4/INT4 zero-point tensor and its
  ``Relu -> QuantizeLinear`` rewrite would drop a Relu before a signed INT4 one; both rewrites
  only match a 3-input ``QuantizeLinear``. Grids that are not a whole container (2/3/5/6/7 bits,
  ``narrow``) get an exact ``Clip`` to ``[qmin*s, qmax*s]`` in front of the ``QuantizeLinear``;
- the **bias** of a quantized Conv is a separate ``Add`` (onnxruntime rounds a Conv bias to
  int32 at scale ``s_x*s_w`` when its other inputs come from ``DequantizeLinear``, which the
  simulation does not do);
- everything else (padding, activations, pooling, residual adds, float layers) is the model's own
  float graph as traced by ``torch.onnx.export`` (TorchScript exporter, opset 20, then declared
  opset 21: no op it emits changed meaning).

onnxruntime (CPU) executes this graph as ``DequantizeLinear`` + float ``Conv``/``Gemm``: it has no
integer convolution for 4-bit tensors. ``container="int8"`` stores the same integer values in
8-bit containers (``INT8`` weights, ``UINT8``/``INT8`` activations, plus ``Clip`` for 4-bit
activation grids) and, for layers whose input is quantized, the bias as ``INT32`` at scale
``s_x * s_w`` (the QDQ form of ``QLinearConv``/``QGemm``): onnxruntime fuses every
``DQ -> Conv [-> Relu/Clip] -> Q`` group of that graph into an integer kernel (a layer whose output
feeds a residual add or a pooling is not such a group and stays float; a layer with a float input,
``act_bits=None``, is ``DequantizeLinear`` on its INT8 weights feeding a float op). The int32 bias moves
each output by less than half an accumulator step ``s_x*s_w/2``; everything else is the same
arithmetic. Weights whose codes lie within +-64 go out as ``INT8`` (u8s8 kernels, exact on every
x86 CPU: 8-bit weights of ``target="int8"`` are quantized on 7 bits for that,
:func:`omse.transforms.calibration.int8_weight_grid`); codes beyond (merged residual kernels)
go out as ``UINT8`` at zero point 128 (the same values) by default, so that onnxruntime's x86
kernels are exact on CPUs without VNNI too (its u8s8 kernels add product pairs in saturating
int16 there; see ``int8_weights`` of :func:`export_onnx`).

Parity: onnxruntime and torch sum in different orders, so a pre-activation within float rounding
of a rounding boundary can be quantized one step apart; in a deep 4-bit network those flips
cascade, and ORT differs from the float32 simulation as much as the simulation differs from
itself computed in float64 (see ``tests/test_export.py``). ``integer=True`` removes that noise:
each layer whose input is quantized runs on the integer codes (``DequantizeLinear`` with scale 1
for input and weights, so every partial sum is an integer below 2^24 and exact in any order),
then a ``Mul`` by ``s_x * s_w`` per output channel and the bias ``Add``: the arithmetic of an
integer runtime (int32 accumulator, then rescale). :func:`omse.set_integer` runs the simulation
the same way, and onnxruntime's outputs equal it bit for bit (measured on EfficientNet-Lite0 and
the zoo; the tests assert within one output step and top-1 agreement >= 99.5%).

How it is built: the quantized layers are swapped for export twins that mark their input and
weights with custom ``omse::Marker`` nodes while ``torch.onnx.export`` traces the model; the marked
graph is then rewritten with ``onnx.helper`` (markers -> Q/DQ and integer initializers) and
checked with the ONNX checker (``full_check``).

Layer types: ``Linear`` (``Gemm``/``MatMul``), ``Conv1d/2d/3d`` (``Conv``) and
``ConvTranspose1d/2d/3d`` (``ConvTranspose``). A transposed convolution's integer weight is
stored in omse's canonical layout ``[out, in/groups, k...]`` (one scale per output channel on
axis 0) and regrouped to ONNX's ``[in, out/groups, k...]`` after its ``DequantizeLinear``
(``Transpose``, with a ``Reshape`` on each side for ``groups > 1``: no single axis of that layout
is the output channel). onnxruntime's CPU provider has no integer ``ConvTranspose`` kernel, so on
``target="int8"`` it runs ``DequantizeLinear -> ConvTranspose -> QuantizeLinear`` in float (the
same values: integer-valued inputs and weights, the int32 bias dequantized), not fused;
``benchmarks/latency.py`` lists such layers as not integer. OpenVINO's CPU plugin runs the
ungrouped ones as u8 ``Deconvolution`` kernels (grouped ones in f32), with the same outputs
(``tests/deploy/test_export_layers.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..config import INTEGER_TARGETS, TARGETS
from ..core.granularity import PerChannel, PerGroup, PerTensor
from ..core.grids import Grid
from ..errors import ConfigError, OmseError, UnsupportedLayerError
from ..io import atomic_path, check_output_path
from ..nn.layers import (
    S8_SAFE_CODE,
    WRAPPABLE,
    QuantizedLayer,
    is_depthwise,
    is_transposed,
    layer_weight,
    quantized_layers,
)
from ..nn.ops import OpQuantizers, op_quantizers
from ..transforms.graph import (
    DOMAIN,
    TRACE_OPSET,
    TracedLayer,
    const_value,
    float_output,
    fold_constants,
    fold_pads,
    layer_routes,
    marker_attrs,
    trace,
)
from .nbits import apply_matmul_nbits

__all__ = [
    "export_onnx",
    "to_onnx_model",
    "weight_only",
    "uint8_weight_layers",
    "weight_types",
    "with_int8_weights",
    "MIN_OPSET",
    "MAX_OPSET",
    "INT8_WEIGHTS",
    "S8_SAFE_CODE",
]

MIN_OPSET = 13  # per-axis DequantizeLinear
MAX_OPSET = 21  # INT4/UINT4 Q/DQ need 21; the traced graph is opset 20 (no semantic change to 21)

Container = Literal["int4", "int8"]
Int8Weights = Literal["auto", "s8", "u8"]
INT8_WEIGHTS = ("auto", "s8", "u8")
# S8_SAFE_CODE (omse.nn.layers): onnxruntime's x86 u8s8 kernels on CPUs without VNNI (AVX2,
# AVX-512 without VNNI) multiply uint8 activations by int8 weights with vpmaddubsw, which adds
# each pair of products in saturating int16: |x1*w1 + x2*w2| <= 255 * 64 * 2 = 32640 cannot
# saturate for int8 codes in [-64, 64]
UINT8_LAYERS_KEY = "omse.uint8_weight_layers"
INT8_LAYERS_KEY = "omse.int8_weight_layers"
INT8_WEIGHTS_KEY = "omse.int8_weights"
Target = Literal["int4", "int8", "tflite"]
ExampleInput = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]
ExportTerm = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""One weight term as the graph holds it: ``(codes, scale, kernels)`` (see :func:`_export_terms`)."""


def weight_only(ql: QuantizedLayer) -> bool:
    """A Linear with a float input and one term of <= 4-bit weights: onnxruntime runs it as
    ``MatMulNBits`` (4-bit weights in blocks along the input dimension) for ``target="int8"``."""
    return (
        isinstance(ql.layer, nn.Linear)
        and (ql.act_scale is None or ql.a_grid is None)
        and ql.w_grid.bits <= 4
        and ql.n_terms == 1
    )


def _float_input(ql: QuantizedLayer) -> bool:
    """A layer without an input quantizer (``act_bits=None``, e.g. the float fallback's): for
    ``target="int8"`` it runs as a float op on its dequantized integer weights."""
    return ql.act_scale is None or ql.a_grid is None


def _check_layer(ql: QuantizedLayer) -> None:
    if not isinstance(ql.layer, WRAPPABLE):
        raise UnsupportedLayerError(
            f"layer {ql.name!r} ({type(ql.layer).__name__}) cannot be exported: the ONNX exporter "
            "supports quantized Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear layers"
        )
    g = ql.cfg.granularity
    blocked = isinstance(g, PerGroup) and (g.axis, g.channel_axis) == (1, 0)
    if blocked and not weight_only(ql):
        raise UnsupportedLayerError(
            f"layer {ql.name!r} has {g} weight scales: the exporter writes blocked (per-group) "
            "weights only for weight-only Linear layers (float input, <= 4-bit weights, as "
            "MatMulNBits); quantize it per_channel, or its input in float (act_bits=None)"
        )
    if not (blocked or isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)):
        raise UnsupportedLayerError(
            f"layer {ql.name!r} has {g} weight scales, which the ONNX exporter cannot represent "
            "(it writes per-tensor or per-output-channel DequantizeLinear); quantize it "
            "per_channel or per_tensor, or skip it"
        )
    out = ql.float_weight.shape[0]
    for t, (q, s, _) in enumerate(ql.terms()):
        if blocked:
            continue
        if s.numel() not in (1, out) or (s.numel() == out and out > 1 and s.shape[0] != out):
            raise UnsupportedLayerError(
                f"layer {ql.name!r} term {t} has scales of shape {tuple(s.shape)}, neither "
                "per-tensor nor one per output channel; the ONNX exporter cannot represent it"
            )
        if int(q.min()) < ql.w_grid.qmin or int(q.max()) > ql.w_grid.qmax:
            raise UnsupportedLayerError(
                f"layer {ql.name!r} term {t} has codes outside its grid {ql.w_grid}"
            )


def _update_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set ``entries`` in ``model.metadata_props``, replacing entries of the same keys."""
    meta = {p.key: p.value for p in model.metadata_props} | entries
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def _carry_source_io(model: onnx.ModelProto, io: Mapping | None) -> None:
    """Give the exported ``model`` what an imported ONNX file declared (``io``: the module's
    ``omse_io``, see :func:`omse.transforms.onnx_import.load_onnx`), in place: its
    ``metadata_props`` (omse's own entries win a clash of keys) and, output by output in order,
    each static output dimension (the exporter leaves a dimension computed from the input's
    dynamic sides unnamed or symbolic). Raises :class:`ConfigError` where the exported graph's
    static dimension contradicts the source's."""
    if not io:
        return
    source_meta = dict(io.get("metadata") or {})
    if source_meta:
        ours = {p.key: p.value for p in model.metadata_props}
        del model.metadata_props[:]
        _update_metadata(model, source_meta | ours)
    shapes = io.get("output_shapes") or []
    outs = list(model.graph.output)
    if len(shapes) != len(outs):
        return  # a model whose outputs changed since the import: nothing to match by position
    for out, dims in zip(outs, shapes):
        tshape = out.type.tensor_type.shape
        if len(tshape.dim) != len(dims):
            continue
        for a, (d, src) in enumerate(zip(tshape.dim, dims)):
            if not isinstance(src, int):
                continue
            if d.HasField("dim_value") and d.dim_value != src:
                raise ConfigError(
                    f"output {out.name!r} axis {a}: the source ONNX file declares {src}, the "
                    f"quantized model computes {d.dim_value}"
                )
            d.Clear()
            d.dim_value = src


def uint8_weight_layers(model: onnx.ModelProto | str | Path) -> list[str] | None:
    """The layers an omse export wrote with UINT8 weights (``int8_weights="auto"``, codes
    beyond +-:data:`S8_SAFE_CODE`), from its metadata; None for a graph without 8-bit weight
    containers (or not written by omse)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return None if UINT8_LAYERS_KEY not in meta else list(json.loads(meta[UINT8_LAYERS_KEY]))


def weight_types(model: onnx.ModelProto | str | Path) -> dict[str, list[str]] | None:
    """``{"INT8": [layers], "UINT8": [layers]}``: the 8-bit weight containers an omse export
    wrote, from its metadata; None for a graph without 8-bit weight containers."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if UINT8_LAYERS_KEY not in meta:
        return None
    return {
        "INT8": list(json.loads(meta.get(INT8_LAYERS_KEY, "[]"))),
        "UINT8": list(json.loads(meta[UINT8_LAYERS_KEY])),
    }


def with_int8_weights(model: onnx.ModelProto) -> int:
    """Rewrite, in place, the UINT8 weights (zero point 128) of an ``int8_weights="auto"``
    export as INT8 (zero point 0): the ``"s8"`` graph, for runtimes that want int8 weights
    (OpenVINO's CPU plugin runs convolutions with UINT8 weights in float). Returns how many
    weight tensors changed."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    changed = 0
    for node in g.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        w, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if w is None or zp is None or not w.name.endswith(".w_codes"):
            continue
        if w.data_type != TensorProto.UINT8 or zp.data_type != TensorProto.UINT8:
            continue
        z = numpy_helper.to_array(zp).astype(np.int64)
        if not (z == 128).all():
            continue
        codes = numpy_helper.to_array(w).astype(np.int64) - 128
        w.CopyFrom(numpy_helper.from_array(codes.astype(np.int8), w.name))
        zp.CopyFrom(numpy_helper.from_array(np.zeros(z.shape, np.int8), zp.name))
        changed += 1
    if changed:
        types = weight_types(model) or {"INT8": [], "UINT8": []}
        s8 = json.dumps(types["INT8"] + types["UINT8"])
        _update_metadata(
            model, {INT8_WEIGHTS_KEY: "s8", UINT8_LAYERS_KEY: "[]", INT8_LAYERS_KEY: s8}
        )
    return changed


# -- rewriting ----------------------------------------------------------------------------------
def _container(grid: Grid, container: Container) -> tuple[int, int, int]:
    """``(onnx elem type, lo, hi)`` of the smallest container holding ``grid``."""
    if container == "int4" and grid.bits <= 4:
        return (TensorProto.UINT4, 0, 15) if not grid.signed else (TensorProto.INT4, -8, 7)
    return (TensorProto.UINT8, 0, 255) if not grid.signed else (TensorProto.INT8, -128, 127)


def _int_tensor(name: str, values: np.ndarray, elem: int) -> onnx.TensorProto:
    """An initializer of integer type ``elem`` (INT4/UINT4 packed by onnx) from int values."""
    if elem in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(
            name, elem, list(values.shape), values.astype(np.int64).reshape(-1).tolist()
        )
    np_type = {
        TensorProto.INT8: np.int8,
        TensorProto.UINT8: np.uint8,
        TensorProto.INT32: np.int32,
    }[elem]
    return numpy_helper.from_array(values.astype(np_type), name)


class _TransposedTwin(TracedLayer):
    """:class:`TracedLayer` of a transposed convolution: its branches' weights in the module's own
    layout ``[in, out/groups, k...]`` (the terms are canonical, see :func:`omse.nn.layers.canonical_weight`)."""

    def __init__(self, ql: QuantizedLayer, idx: int, terms, integer: bool):
        super().__init__(ql, idx, terms, integer)
        self.term_weights = [layer_weight(ql.layer, w) for w in self.term_weights]
        self.layer.weight = self.term_weights[0]


def _twin(ql: QuantizedLayer, idx: int, terms, integer: bool) -> TracedLayer:
    cls = _TransposedTwin if is_transposed(ql.layer) else TracedLayer
    return cls(ql, idx, terms, integer)


def _export_terms(ql: QuantizedLayer, target: Target) -> list[ExportTerm]:
    """The weight terms the graph holds, ``(codes, scale, kernels)``: one merged 8-bit kernel
    for ``int8``; else every term, a residual term cut to the kernels that carry it where the
    layer can convolve them alone (:meth:`~omse.nn.layers.QuantizedLayer.term_kernels`:
    ``kernels`` their output channels, None for a whole term; a term no kernel carries is left
    out)."""
    if target == "int8":
        return [(*ql.merged_term(), None)]
    out = ql.float_weight.shape[0]
    terms: list[ExportTerm] = []
    for t, (q, s, _) in enumerate(ql.terms()):
        idx = ql.term_kernels(t) if t else None
        if idx is not None:
            if idx.numel() == 0:
                continue
            q = q.index_select(0, idx)
            s = s.index_select(0, idx) if s.dim() and s.shape[0] == out and out > 1 else s
        terms.append((q, s, idx))
    return terms


class _Rewriter:
    """Markers -> Q/DQ nodes and integer initializers (see the module docstring)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[QuantizedLayer],
        container: Container,
        integer: bool = False,
        target: Target = "int4",
        int8_weights: Int8Weights = "auto",
        ops: OpQuantizers | None = None,
    ):
        self.model = model
        self.ops = ops
        self.layers = layers
        self.container = container
        self.integer = integer
        self.target = target
        self.int8_weights = int8_weights
        self.has_int8 = False  # a layer has 8-bit weight containers
        self.uint8_layers: list[str] = []  # layers written as UINT8 at zero point 128
        self.int8_layers: list[str] = []  # layers written as INT8 (8-bit containers)
        self.terms = [_export_terms(ql, target) for ql in layers]
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = {i.name for i in model.graph.initializer}
        self.names |= {o for n in model.graph.node for o in n.output}
        self.names |= {i.name for i in model.graph.input}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def const(self, base: str, arr: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def qdq_nodes(
        self, base: str, grid: Grid, scale: torch.Tensor, x: str, y: str, unit: bool = False
    ) -> list[onnx.NodeProto]:
        """``x -> [Clip] -> QuantizeLinear -> DequantizeLinear -> y`` on ``grid`` (``unit``: the
        DequantizeLinear yields the integer codes themselves, scale 1)."""
        s = np.float32(scale.item())
        elem, lo, hi = _container(grid, self.container)
        scale_n = self.const(f"{base}.scale", np.array(s, dtype=np.float32))
        if grid.zero_point:  # affine: stored codes u = q + z, dequantized as s * (u - z)
            zp = self.fresh(f"{base}.zero_point")
            self.inits.append(_int_tensor(zp, np.array(grid.zero_point), elem))
            q_inputs, q_attrs = [x, scale_n, zp], {}
            lo, hi = lo - grid.zero_point, hi - grid.zero_point
        elif self.target == "int8" and grid.signed:
            # every activation UINT8: a signed grid is the same values at zero point 128
            # (onnxruntime's integer Conv wants input and output of one type)
            zp = self.fresh(f"{base}.zero_point")
            self.inits.append(_int_tensor(zp, np.array(128), TensorProto.UINT8))
            q_inputs, q_attrs = [x, scale_n, zp], {}
        elif elem in (TensorProto.INT4, TensorProto.UINT4):
            # 4-bit: the type comes from output_dtype, with no zero-point input (= 0). A UINT4/INT4
            # zero-point tensor trips onnxruntime's Clip/Relu -> QuantizeLinear rewrites (1.32
            # throws on it in ClipQuantFusion, and ReluQuantTransformer would drop a Relu in front
            # of a signed INT4 QuantizeLinear); both only match a 3-input QuantizeLinear.
            q_inputs, q_attrs = [x, scale_n], {"output_dtype": elem}
        else:
            zp = self.fresh(f"{base}.zero_point")
            self.inits.append(_int_tensor(zp, np.array(0), elem))
            q_inputs, q_attrs = [x, scale_n, zp], {}
        narrow = (grid.qmin, grid.qmax) != (lo, hi)
        nodes = []
        if narrow and self.target != "int8":
            cmin = self.const(f"{base}.clip_min", np.array(np.float32(grid.qmin) * s))
            cmax = self.const(f"{base}.clip_max", np.array(np.float32(grid.qmax) * s))
            xc = self.fresh(f"{base}.clipped")
            nodes.append(helper.make_node("Clip", [x, cmin, cmax], [xc], name=f"{base}.clip"))
            q_inputs[0] = xc
        q = self.fresh(f"{base}.q")
        nodes.append(
            helper.make_node("QuantizeLinear", q_inputs, [q], name=f"{base}.quant", **q_attrs)
        )
        dq_inputs = [q, *q_inputs[1:]]
        if unit:
            dq_inputs[1] = self.const(f"{base}.unit_scale", np.array(1.0, dtype=np.float32))
        if narrow and self.target == "int8":
            # an integer kernel's output Q must follow it directly: the grid's narrower range is
            # a Clip on the dequantized codes (exact on grid values), requantized after it
            d = self.fresh(f"{base}.dq")
            nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [d], name=f"{base}.dq"))
            cmin = self.const(f"{base}.clip_min", np.array(np.float32(grid.qmin) * s))
            cmax = self.const(f"{base}.clip_max", np.array(np.float32(grid.qmax) * s))
            xc = self.fresh(f"{base}.clipped")
            nodes.append(helper.make_node("Clip", [d, cmin, cmax], [xc], name=f"{base}.clip"))
            q2 = self.fresh(f"{base}.q2")
            nodes.append(
                helper.make_node("QuantizeLinear", [xc, *q_inputs[1:]], [q2], name=f"{base}.q2")
            )
            dq_inputs[0] = q2
        nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [y], name=f"{base}.dequant"))
        return nodes

    def act_nodes(self, idx: int, x: str, y: str) -> list[onnx.NodeProto]:
        ql = self.layers[idx]
        return self.qdq_nodes(
            f"{ql.name}.act", ql.a_grid, ql.act_scale, x, y, unit=self._integer_layer(idx)
        )

    def _integer_layer(self, idx: int) -> bool:
        ql = self.layers[idx]
        return self.integer and ql.act_scale is not None and ql.a_grid is not None

    def mul_nodes(self, idx: int, term: int, x: str, y: str) -> list[onnx.NodeProto]:
        ql = self.layers[idx]
        s = self.terms[idx][term][1]
        m = ql.per_output_channel((ql.act_scale.to(torch.float32) * s).reshape(-1))
        base = f"{ql.name}.w{term}"
        mult = self.const(f"{base}.multiplier", m.detach().numpy().astype(np.float32))
        return [helper.make_node("Mul", [x, mult], [y], name=f"{base}.rescale")]

    def weight_scale(self, idx: int, term: int) -> np.ndarray:
        """Scales as the weight DequantizeLinear takes them: 0-d, ``[out]`` (axis 0) or, for
        per-group Linear weights, ``[out, in / group]`` (axis 1, ``block_size=group``)."""
        s = self.terms[idx][term][1].detach().to(torch.float32).numpy()
        g = self.layers[idx].cfg.granularity
        if isinstance(g, PerGroup):
            return s.reshape(s.shape[0], -1)[:, :: g.size]
        return s.reshape(()) if s.size == 1 else s.reshape(-1)

    def weight_nodes(self, idx: int, term: int, y: str) -> list[onnx.NodeProto]:
        ql = self.layers[idx]
        q = self.terms[idx][term][0]
        s = self.weight_scale(idx, term)
        if self._integer_layer(idx):  # the scale moves to the Mul after the layer
            s = np.array(1.0, dtype=np.float32)
        nbits = self.target == "int8" and weight_only(ql)
        if self.target == "int8" and not nbits:
            elem = TensorProto.INT8
        else:
            elem, _, _ = _container(ql.w_grid, "int4" if nbits else self.container)
        base = f"{ql.name}.w{term}"
        values, zero = q.to(torch.int64).numpy(), 0
        if elem == TensorProto.INT8:
            self.has_int8 = True
            # beyond +-64 u8s8 GEMM kernels can saturate without VNNI; depthwise kernels
            # multiply in 16 bits (exact for any codes)
            wide = int(np.abs(values).max(initial=0)) > S8_SAFE_CODE
            wide = wide and not is_depthwise(ql.layer)
            if self.int8_weights == "u8" or (self.int8_weights == "auto" and wide):
                # the same values as UINT8 at zero point 128: onnxruntime then runs its u8u8
                # kernels (16-bit products, exact on every x86 CPU) instead of u8s8
                elem, values, zero = TensorProto.UINT8, values + 128, 128
                if ql.name not in self.uint8_layers:
                    self.uint8_layers.append(ql.name)
            elif ql.name not in self.int8_layers:
                self.int8_layers.append(ql.name)
        codes = self.fresh(f"{base}.w_codes")
        self.inits.append(_int_tensor(codes, values, elem))
        scale = self.const(f"{base}.scale", s.astype(np.float32))
        attrs = {"axis": 0} if s.ndim == 1 else {}
        if s.ndim == 2:
            attrs = {"axis": 1, "block_size": ql.cfg.granularity.size}
        inputs = [codes, scale]
        if (self.target == "int8" and not nbits) or zero:
            # explicit zero points: QGemm fusion wants them, and UINT8 codes need 128
            inputs.append(self.fresh(f"{base}.zero_point"))
            self.inits.append(_int_tensor(inputs[-1], np.full(s.shape, zero, np.int64), elem))
        if not is_transposed(ql.layer):
            return [
                helper.make_node("DequantizeLinear", inputs, [y], name=f"{base}.dequant", **attrs)
            ]
        canon = self.fresh(f"{base}.canonical")
        nodes = [
            helper.make_node("DequantizeLinear", inputs, [canon], name=f"{base}.dequant", **attrs)
        ]
        return nodes + self.regroup_nodes(ql, tuple(q.shape), canon, y, f"{base}.layout")

    def regroup_nodes(
        self, ql: QuantizedLayer, shape: tuple, x: str, y: str, base: str
    ) -> list[onnx.NodeProto]:
        """Canonical ``[out, in/g, k...]`` -> ConvTranspose's ``[in, out/g, k...]``: ``Transpose``
        (``groups == 1``), else ``Reshape [g, out/g, in/g, k...] -> Transpose -> Reshape``."""
        g = ql.layer.groups
        out, cig, *k = shape
        nk = len(k)
        if g == 1:
            perm = [1, 0, *range(2, 2 + nk)]
            return [helper.make_node("Transpose", [x], [y], name=f"{base}.transpose", perm=perm)]
        s1 = self.const(f"{base}.grouped_shape", np.array([g, out // g, cig, *k], np.int64))
        s2 = self.const(f"{base}.layer_shape", np.array([g * cig, out // g, *k], np.int64))
        a, b = self.fresh(f"{base}.grouped"), self.fresh(f"{base}.regrouped")
        perm = [0, 2, 1, *range(3, 3 + nk)]
        return [
            helper.make_node("Reshape", [x, s1], [a], name=f"{base}.group"),
            helper.make_node("Transpose", [a], [b], name=f"{base}.transpose", perm=perm),
            helper.make_node("Reshape", [b, s2], [y], name=f"{base}.ungroup"),
        ]

    def int32_bias(self, idx: int, bias: np.ndarray) -> tuple[list[onnx.NodeProto], str]:
        ql = self.layers[idx]
        sb = ql.bias_scale()
        if sb is not None:  # target int8: the layer already adds codes * s_b (float32)
            s_b = sb.detach().numpy().astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                qb = np.round(bias.astype(np.float64) / s_b.astype(np.float64))
            qb = np.clip(np.nan_to_num(qb, nan=0.0), -(2**31) + 2**8, 2**31 - 2**8)
        else:
            s_x = np.float64(ql.act_scale.item())
            s_w = self.weight_scale(idx, 0).astype(np.float64)
            s_b = (s_x * np.broadcast_to(s_w, bias.shape)).astype(np.float32)
            qb = np.clip(np.round(bias.astype(np.float64) / s_b), -(2**31), 2**31 - 1)
        base = f"{ql.name}.bias"
        codes = self.fresh(f"{base}.b_codes")
        self.inits.append(_int_tensor(codes, qb, TensorProto.INT32))
        scale = self.const(f"{base}.scale", s_b)
        inputs = [codes, scale]
        if self.target == "int8":
            inputs.append(self.fresh(f"{base}.zero_point"))
            self.inits.append(_int_tensor(inputs[-1], np.zeros(s_b.shape), TensorProto.INT32))
        y = self.fresh(f"{base}.dq")
        node = helper.make_node("DequantizeLinear", inputs, [y], name=f"{base}.dequant", axis=0)
        return [node], y

    # -- target int8: where each layer's output is requantized -----------------------------------
    def _int8_plan(self) -> tuple[dict[int, tuple[str, int | None]], set[tuple[str, int]]]:
        """Per out marker: ``("output", None)`` (its own quantizer), ``("fused", j)`` (layer
        ``j``'s input quantizer moved up to it) or ``("float", None)`` (the graph output); and
        the input-quantizer markers ``(kind, j)`` that are then redundant (the tensor already
        carries the same quantizer)."""
        routes = layer_routes(self.model)
        plan: dict[int, tuple[str, int | None]] = {}
        dropped: set[tuple[str, int]] = set()
        for idx, r in routes.items():
            ql = self.layers[idx]
            if weight_only(ql):  # MatMulNBits: float in, float out
                plan[idx] = ("float", None)
            elif ql.out_scale is not None:
                plan[idx] = ("output", None)
                for j in r.shared:  # a reader that shares this quantizer needs no Q/DQ of its own
                    qj = self.layers[j]
                    if qj.a_grid == ql.out_grid and bool(qj.act_scale == ql.out_scale):
                        dropped.add(("act", j))
            elif r.kind == "fused" and self.layers[r.consumer].act_scale is not None:
                plan[idx] = ("fused", r.consumer)
                qj = self.layers[r.consumer]
                s = float(np.float32(qj.act_scale.item()))
                lo, hi = r.clamp
                covers = lo <= qj.a_grid.qmin * s and hi >= qj.a_grid.qmax * s
                if covers and all(op in ("Relu", "Clip", "Identity", "Dropout") for op in r.chain):
                    # nothing between the two quantizers changes a value
                    dropped.add((r.consumer_kind, r.consumer))
            elif r.kind == "graph_output" or float_output(ql, r) or _float_input(ql):
                # a graph output, a Linear whose output only float ops read (the integer
                # MatMul/Gemm yields float: MatMulIntegerToFloat / QGemm without output scale),
                # or a weight-only layer (float input: a float op on dequantized 8-bit weights)
                plan[idx] = ("float", None)
            else:
                reader = r.reader or f"layer {self.layers[r.consumer].name!r} (float input)"
                raise UnsupportedLayerError(
                    f"layer {ql.name!r}: its output goes to {reader} without an output "
                    "quantizer, so target='int8' cannot run it as an integer kernel; quantize "
                    "the model with QuantConfig(target='int8')"
                )
        # an input marker right after a shared (module-output) quantizer with its own scale, or
        # right after a site (omse.nn.ops) whose quantizer it shares
        producers = {o: n for n in self.model.graph.node for o in n.output}
        for node in self.model.graph.node:
            if self.ops is None or node.domain != DOMAIN or marker_attrs(node)[0] != "act":
                continue
            src = producers.get(node.input[0])
            if src is None or src.domain != DOMAIN or marker_attrs(src)[0] != "op":
                continue
            site, qj = marker_attrs(src)[1], self.layers[marker_attrs(node)[1]]
            sc = self.ops.scales.get(site)
            if sc is not None and qj.a_grid == self.ops.grids[site] and bool(qj.act_scale == sc):
                dropped.add(("act", marker_attrs(node)[1]))
        for node in self.model.graph.node:
            if node.domain != DOMAIN or marker_attrs(node)[0] != "act":
                continue
            src = producers.get(node.input[0])
            if src is None or src.domain != DOMAIN or marker_attrs(src)[0] != "tq":
                continue
            qj, qk = self.layers[marker_attrs(node)[1]], self.layers[marker_attrs(src)[1]]
            if qj.a_grid == qk.a_grid and bool(qj.act_scale == qk.act_scale):
                dropped.add(("act", marker_attrs(node)[1]))
        return plan, dropped

    def run(self, opset: int) -> onnx.ModelProto:
        g = self.model.graph
        if self.target == "int8" or self.container == "int8":
            # constant shape arithmetic (a static "same" padding) -> initializers, and zero Pads
            # into their Conv: the QDQ fusion needs DequantizeLinear -> Conv
            fold_constants(self.model)
            fold_pads(self.model)
        plan, dropped = self._int8_plan() if self.target == "int8" else ({}, set())
        new_nodes: list[onnx.NodeProto] = []
        w_out: dict[str, int] = {}  # dequantized term-0 weight output -> layer index
        act_done: dict[tuple, str] = {}  # (tensor, grid, step, integer) -> its dequantized copy
        for node in g.node:
            if node.domain != DOMAIN:
                new_nodes.append(node)
                continue
            kind, idx, term = marker_attrs(node)
            x, y = node.input[0], node.output[0]
            if kind == "op":  # a site between layers (omse.nn.ops), as the plan has it
                site = self.ops.kinds.get(idx, "none") if self.ops is not None else "none"
                op = self.ops.ops.get(idx, "op") if self.ops is not None else "op"
                if site != "none" and idx in self.ops.scales:
                    grid, sc = self.ops.grids[idx], self.ops.scales[idx]
                    new_nodes += self.qdq_nodes(f"{op}_{idx}.out", grid, sc, x, y)
                else:
                    new_nodes.append(helper.make_node("Identity", [x], [y], name=f"{op}_{idx}"))
                continue
            ql = self.layers[idx]
            if kind in ("act", "tq"):
                if ql.act_scale is None or ql.a_grid is None or (kind, idx) in dropped:
                    new_nodes.append(helper.make_node("Identity", [x], [y]))
                elif kind == "tq":  # the layer's input quantizer on the module output it shares
                    unit = self._integer_layer(idx)
                    s = ql.act_scale
                    new_nodes += self.qdq_nodes(f"{ql.name}.shared", ql.a_grid, s, x, y, unit)
                else:
                    # readers of one tensor with one quantizer (the projections reading a
                    # LayerNorm output) share one QuantizeLinear -> DequantizeLinear
                    key = (x, ql.a_grid, float(ql.act_scale.item()), self._integer_layer(idx))
                    if key in act_done:
                        new_nodes.append(helper.make_node("Identity", [act_done[key]], [y]))
                    else:
                        act_done[key] = y
                        new_nodes += self.act_nodes(idx, x, y)
            elif kind == "mul":
                new_nodes += self.mul_nodes(idx, term, x, y)
            elif kind == "out":
                how, j = plan.get(idx, ("output" if ql.out_scale is not None else "float", None))
                if how == "output":
                    new_nodes += self.qdq_nodes(f"{ql.name}.out", ql.out_grid, ql.out_scale, x, y)
                elif how == "fused":
                    qj = self.layers[j]
                    new_nodes += self.qdq_nodes(f"{ql.name}.requant", qj.a_grid, qj.act_scale, x, y)
                else:
                    new_nodes.append(helper.make_node("Identity", [x], [y]))
            else:
                new_nodes += self.weight_nodes(idx, term, node.output[0])
                if term == 0:
                    w_out[node.output[0]] = idx
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(self.inits)
        self.inits = []
        producers = {o: n for n in g.node for o in n.output}
        init_by_name = {i.name: i for i in g.initializer}
        if self.container == "int8" or self.target == "int8":
            nodes = self._quantize_biases(list(g.node), w_out, init_by_name, producers)
        else:
            nodes = self._separate_biases(list(g.node), w_out)
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(self.inits)
        if self.target == "int8":
            _drop_redundant_clips(self.model)
            _shape_before_dequantize(self.model)
        _remove_identities(self.model)
        _prune(self.model)
        del self.model.opset_import[:]
        self.model.opset_import.append(helper.make_opsetid("", opset))
        self.model.ir_version = 10 if opset >= 21 else 8
        if self.target == "int8" and any(weight_only(ql) for ql in self.layers):
            apply_matmul_nbits(self.model)  # weight-only Linear -> onnxruntime's 4-bit kernel
        if self.has_int8:  # which layers hold UINT8 weights (see export_onnx's int8_weights)
            _update_metadata(
                self.model,
                {
                    INT8_WEIGHTS_KEY: self.int8_weights,
                    UINT8_LAYERS_KEY: json.dumps(self.uint8_layers),
                    INT8_LAYERS_KEY: json.dumps(self.int8_layers),
                },
            )
        return self.model

    def _separate_biases(self, nodes, w_out):
        """Conv/Gemm(x, W, b) -> Add(Conv/Gemm(x, W), b): onnxruntime rounds a Conv's or Gemm's
        float bias to int32 (scale s_x * s_w) when the other inputs come from DequantizeLinear
        (its BiasQuantization pass); an Add keeps the simulated float bias exact."""
        out = []
        for node in nodes:
            if not (
                node.op_type in ("Conv", "ConvTranspose", "Gemm")
                and len(node.input) >= 3
                and node.input[1] in w_out
                and node.input[2]
            ):
                out.append(node)
                continue
            if node.op_type == "Gemm":
                at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if at.get("beta", 1.0) != 1.0:
                    out.append(node)
                    continue
            ql = self.layers[w_out[node.input[1]]]
            b = node.input[2]
            y = node.output[0]
            pre = self.fresh(f"{ql.name}.{node.op_type.lower()}")
            del node.input[2]
            node.output[0] = pre
            out.append(node)
            if node.op_type in ("Conv", "ConvTranspose"):
                rank = ql.float_weight.dim()
                shape = self.const(
                    f"{ql.name}.bias.shape", np.array([-1] + [1] * (rank - 2), dtype=np.int64)
                )
                b2 = self.fresh(f"{ql.name}.bias.reshaped")
                out.append(
                    helper.make_node("Reshape", [b, shape], [b2], name=f"{ql.name}.bias.reshape")
                )
                b = b2
            out.append(helper.make_node("Add", [pre, b], [y], name=f"{ql.name}.bias.add"))
        return out

    def _quantize_biases(self, nodes, w_out, init_by_name, producers):
        out = []
        for node in nodes:
            conv = node.op_type in ("Conv", "ConvTranspose", "Gemm")
            if conv and len(node.input) >= 3 and node.input[1] in w_out:
                idx = w_out[node.input[1]]
                ql = self.layers[idx]
                b = node.input[2]
                arr = None
                if b in init_by_name:
                    arr = numpy_helper.to_array(init_by_name[b])
                elif b in producers and producers[b].op_type == "Constant":
                    arr = numpy_helper.to_array(producers[b].attribute[0].t)
                ok_bias = arr is not None and arr.ndim == 1
                if node.op_type == "Gemm":
                    at = {x.name: helper.get_attribute_value(x) for x in node.attribute}
                    ok_bias = ok_bias and at.get("transB", 0) == 1 and at.get("alpha", 1.0) == 1.0
                    ok_bias = ok_bias and at.get("beta", 1.0) == 1.0
                if ok_bias and ql.act_scale is not None and ql.a_grid is not None:
                    bn, y = self.int32_bias(idx, arr)
                    out += bn
                    node.input[2] = y
            out.append(node)
        return out


def _qdq_range(graph: onnx.GraphProto, dq: onnx.NodeProto) -> tuple[float, float] | None:
    """``[(qmin - z) * s, (qmax - z) * s]``, the values a per-tensor 8-bit ``DequantizeLinear``
    yields (its container's range), or None."""
    inits = {i.name: i for i in graph.initializer}
    if len(dq.input) < 2 or dq.input[1] not in inits:
        return None
    s = numpy_helper.to_array(inits[dq.input[1]])
    if s.size != 1:
        return None
    if len(dq.input) < 3 or dq.input[2] not in inits:
        return None
    zp = inits[dq.input[2]]
    z = int(numpy_helper.to_array(zp).reshape(-1)[0])
    lo, hi = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}.get(
        zp.data_type, (None, None)
    )
    if lo is None:
        return None
    s = np.float32(s.item())
    return float(np.float32(lo - z) * s), float(np.float32(hi - z) * s)


def _drop_redundant_clips(model: onnx.ModelProto) -> int:
    """``DequantizeLinear -> Relu/Clip`` where the Relu/Clip cannot change any value the
    DequantizeLinear yields (``[lo, hi]`` covers its codes' range) becomes an ``Identity``: the
    quantizer already saturates there, and runtimes then see ``Q -> DQ -> next``."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    changed = 0
    for node in g.node:
        if node.op_type not in ("Relu", "Clip"):
            continue
        src = producers.get(node.input[0])
        if src is None or src.op_type != "DequantizeLinear":
            continue
        rng = _qdq_range(g, src)
        if rng is None:
            continue
        lo, hi = (0.0, float("inf")) if node.op_type == "Relu" else (-float("inf"), float("inf"))
        if node.op_type == "Clip":
            if len(node.input) > 1 and node.input[1]:
                v = const_value(g, node.input[1])
                lo = -float("inf") if v is None else float(v)
                if v is None:
                    continue
            if len(node.input) > 2 and node.input[2]:
                v = const_value(g, node.input[2])
                if v is None:
                    continue
                hi = float(v)
        if lo <= rng[0] and hi >= rng[1]:
            y = node.output[0]
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
            node.output[0] = y
            changed += 1
    return changed


def _shape_before_dequantize(model: onnx.ModelProto) -> None:
    """``DequantizeLinear -> Shape`` reads the integer tensor instead (the same shape): the
    runtime then does not dequantize a tensor only for its shape."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    for node in g.node:
        if node.op_type != "Shape" or node.domain != "":
            continue
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "DequantizeLinear" and src.domain == "":
            node.input[0] = src.input[0]


def _remove_identities(model: onnx.ModelProto) -> None:
    """Bypass ``Identity`` nodes (readers take the Identity's input) unless they produce a graph
    output."""
    g = model.graph
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    keep = []
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in alias:
                node.input[k] = alias[i]
        if node.op_type == "Identity" and node.domain == "" and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads (the float weights the markers replaced)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def _ops_changed_after_trace(model: onnx.ModelProto) -> set[str]:
    # ops whose semantics changed between the traced opset (20) and 21
    return {n.op_type for n in model.graph.node if n.op_type in ("GroupNormalization",)}


def _model_target(qls: list[QuantizedLayer]) -> str:
    targets = {ql.cfg.target for ql in qls}
    return targets.pop() if len(targets) == 1 else "int4"


@torch.no_grad()
def to_onnx_model(
    qmodel: nn.Module,
    example_input: ExampleInput,
    opset: int = 21,
    container: Container = "int4",
    integer: bool = False,
    target: Target | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
    int8_weights: Int8Weights = "auto",
) -> onnx.ModelProto:
    """The QDQ :class:`onnx.ModelProto` of ``qmodel`` (see :func:`export_onnx`), not written."""
    if not isinstance(integer, bool):
        raise ConfigError(f"integer={integer!r}: use True or False")
    if int8_weights not in INT8_WEIGHTS:
        raise ConfigError(f"int8_weights={int8_weights!r}: use one of {list(INT8_WEIGHTS)}")
    if container not in ("int4", "int8"):
        raise ConfigError(f"container={container!r}: use 'int4' or 'int8'")
    if target is not None and target not in TARGETS:
        raise ConfigError(f"target={target!r}: use one of {list(TARGETS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset={opset!r}: use an int in {MIN_OPSET}..{MAX_OPSET}")
    qls = list(quantized_layers(qmodel).values())
    if not qls:
        raise ConfigError("the model has no quantized layer; quantize it with omse.quantize first")
    target = target or _model_target(qls)
    if target == "tflite":  # the same integer graph; 4-bit codes in INT8 containers for ONNX
        target = "int8"
    if target == "int8":
        if integer:
            raise ConfigError(
                "integer=True writes the float-exact integer form for target='int4'; "
                "target='int8' already runs integer kernels"
            )
        container = "int8"
        for ql in qls:
            if ql.cfg.target not in INTEGER_TARGETS:
                raise ConfigError(
                    f"layer {ql.name!r} was quantized for target={ql.cfg.target!r}: an int8 "
                    "export needs the int8 simulation (merged residuals, output quantizers); "
                    "quantize with QuantConfig(target='int8')"
                )
            float_input = ql.act_scale is None or ql.a_grid is None
            if float_input and isinstance(ql.layer, nn.Linear) and ql.n_terms > 1:
                raise UnsupportedLayerError(
                    f"layer {ql.name!r} has a float input and {ql.n_terms} weight terms "
                    "(residual tensors): target='int8' runs weight-only Linear layers as "
                    "MatMulNBits, one 4-bit term; quantize with extra_mac_budget=0 (e.g. "
                    "QuantConfig.preset('fast', act_bits=None, ...)) or use target='int4'"
                )
    for ql in qls:
        _check_layer(ql)
        if opset < 21 and container == "int4":
            narrow = ql.w_grid.bits <= 4 or (ql.a_grid is not None and ql.a_grid.bits <= 4)
            if narrow:
                raise ConfigError(
                    f"layer {ql.name!r} has 4-bit tensors: INT4 needs opset 21 "
                    f"(got opset={opset}); use opset=21 or container='int8'"
                )
    proto, traced = trace(
        qmodel,
        example_input,
        twin=lambda ql, i: _twin(ql, i, _export_terms(ql, target), integer),
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
    )
    if opset > TRACE_OPSET:
        changed = _ops_changed_after_trace(proto)
        if changed:
            raise UnsupportedLayerError(
                f"ops {sorted(changed)} changed meaning in opset {opset}; export with opset=20 "
                "and container='int8'"
            )
    ops = op_quantizers(qmodel) if target == "int8" else None
    proto = _Rewriter(proto, traced, container, integer, target, int8_weights, ops).run(opset)
    _carry_source_io(proto, getattr(qmodel, "omse_io", None))
    proto.producer_name = "omse"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise OmseError(f"the exported ONNX graph does not validate: {e}") from None
    return proto


def export_onnx(
    qmodel: nn.Module,
    example_input: ExampleInput,
    path: str | Path,
    force: bool = False,
    opset: int = 21,
    *,
    target: Target | None = None,
    container: Container = "int4",
    integer: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes | None = None,
    int8_weights: Int8Weights = "auto",
) -> Path:
    """Write ``qmodel`` (from :func:`omse.quantize`) as a QDQ ONNX graph at ``path``.

    Args:
        qmodel: a quantized model; every quantized layer must be a Conv1d/2d/3d,
            ConvTranspose1d/2d/3d or Linear with per-channel (axis 0) or per-tensor weight scales.
        example_input: the inputs to trace with, as ``torch.onnx.export`` takes them: one
            tensor, a tuple of tensors (positional inputs) or a dict of keyword tensors (e.g. a
            tokenizer's ``input_ids`` and ``attention_mask``; the graph's inputs follow the
            order of ``qmodel.forward``'s parameters). Any batch size (``x[:1]`` is enough).
        path: output ``.onnx`` file, written atomically; an existing file needs ``force=True``.
        opset: ONNX opset (21 for INT4/UINT4 tensors; 13..20 with ``target="int8"`` or
            ``container="int8"``).
        target: the hardware the graph is for; default: the target the model was quantized for
            (:attr:`QuantConfig.target`).

            - ``"int8"``: runtimes with 8-bit integer kernels (onnxruntime CPU, OpenVINO,
              TensorRT, XNNPACK). Every quantized Conv/Gemm is ``DequantizeLinear -> op ->
              QuantizeLinear`` with an int32 bias, which onnxruntime fuses into ``QLinearConv``
              / ``QGemm``: one 8-bit kernel per layer (residual terms merged), the output
              requantized for the next layer, constant shape arithmetic folded and zero padding
              moved into the Conv. A layer with a float input (``act_bits=None``, as the
              float fallback sets it) is ``DequantizeLinear`` on its INT8 weights feeding a
              float op, its output float or requantized where the next integer kernel reads
              it (a one-term Linear of <= 4 bits: ``MatMulNBits``). onnxruntime fuses such a
              ``MatMul`` (a Linear on a token input) into ``MatMulNBits`` itself, which at its
              default ``session.qdq_matmulnbits_accuracy_level`` (4) quantizes that float
              input to int8 by blocks; ``0`` computes it as simulated. Needs a model
              quantized with ``QuantConfig(target="int8")``.
            - ``"int4"``: accelerators with 4-bit MACs: INT4 weight initializers, residual terms
              as branches (extra MACs), biases as float ``Add``.
        container: for ``target="int4"`` models: ``"int8"`` stores the same values in 8-bit
            containers with an int32 bias (the older QDQ form; prefer ``target="int8"``).
        integer: for ``target="int4"``: write the integer form of every layer whose input is
            quantized: its input ``DequantizeLinear`` and weight ``DequantizeLinear`` have scale
            1 (the layer runs on the integer codes, an exact accumulator while the sums stay
            below 2^24), followed by a ``Mul`` by the per-channel ``s_x * s_w`` and the bias
            ``Add``: the arithmetic of :func:`omse.set_integer`, so onnxruntime reproduces the
            simulation exactly instead of to within summation-order noise.
        input_names: the graph's input names, one per tensor of ``example_input``; default:
            the dict keys, else ``input`` (one input) / ``input_<i>``.
        output_names: one per output tensor; default ``output`` / ``output_<i>``.
        dynamic_axes: free dimensions, ``torch.onnx.export``'s form: tensor name ->
            ``{axis: "dim name"}`` or a list of axes (named ``<tensor>_dim<axis>``), e.g.
            ``{"input": {2: "height", 3: "width"}}`` or ``{"input_ids": {0: "batch", 1:
            "seq"}, "attention_mask": {0: "batch", 1: "seq"}}``. Axis 0 of every input and
            output (rank >= 1) is always dynamic (``"batch"``); these axes are added. Every
            target and form runs at any size of the dynamic axes: only shape arithmetic that
            reads no input is folded (see :mod:`omse.transforms.graph`), so a padding computed
            from a dynamic size stays a ``Pad`` in the graph (float compute between integer
            kernels), and with the batch-only default the int8 graph is fully folded.

            When ``qmodel`` has an attribute ``omse_io`` (a dict with ``input_names``,
            ``output_names``, ``dynamic_axes``, as an ONNX importer sets it), each is the
            default of its argument; its ``dynamic_axes`` are then the complete list (no batch
            axis is added). The file then also keeps the imported file's ``metadata_props``
            (``omse_io["metadata"]``: class names, strides, image size; omse's own keys win a
            clash) and its static output dimensions (``omse_io["output_shapes"]``).
        int8_weights: how 8-bit weight codes are stored (``target="int8"``, and
            ``container="int8"``), for onnxruntime's x86 kernels: without VNNI (AVX2, AVX-512
            without VNNI) its uint8 x int8 (u8s8) kernels add pairs of products in saturating
            int16 (``vpmaddubsw``), which codes beyond +-64 against input codes near 255
            overflow; uint8 x uint8 (u8u8) kernels widen to 16 bits first and are exact.

            - ``"auto"`` (default): a layer whose codes all lie in ``[-64, 64]`` keeps
              ``INT8`` weights (u8s8, exact and fastest on every CPU; every layer quantized
              with 8-bit weights for ``target="int8"``, whose grid is 7 bits), and so does a
              depthwise convolution (onnxruntime's depthwise kernels multiply in 16 bits:
              exact for any codes); any other (a merged residual kernel, up to +-128) is
              written as ``UINT8`` codes + 128 at zero
              point 128 (the same values), which onnxruntime runs as u8u8 ``QLinearConv`` /
              ``QGemm`` / ``MatMulIntegerToFloat`` / ``QLinearMatMul``: exact on every x86
              CPU, slower than u8s8 on VNNI CPUs. The graph depends on the weights only, not on
              the exporting CPU.
            - ``"s8"``: every layer ``INT8``: the fastest graph on CPUs with VNNI (AVX512-VNNI
              or AVX-VNNI) and on ARM, where u8s8 is exact; on x86 CPUs without VNNI its
              layers with codes beyond +-64 can saturate.
            - ``"u8"``: every layer ``UINT8`` (u8u8 everywhere; exact, slower).

            The graph's ``metadata_props`` name the mode (``omse.int8_weights``) and the
            layers written as UINT8 and INT8 (``omse.uint8_weight_layers``,
            ``omse.int8_weight_layers``, JSON lists; read them with :func:`weight_types`).

    Raises:
        UnsupportedLayerError: a layer the target cannot express (named in the message).
        ConfigError: an argument out of range, or a model quantized for another target; an
            ``example_input`` of another type, a name in ``dynamic_axes`` that is no input or
            output, an axis out of range, names of the wrong count (each naming the argument).

    Examples:
        >>> import torch, omse
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 10)
        ... ).eval()
        >>> calib = [torch.rand(4, 3, 9, 9) for _ in range(4)]  # 16 calibration inputs
        >>> q8 = omse.quantize(model, calib, omse.QuantConfig(target="int8"))
        >>> omse.export_onnx(q8, calib[0][:1], "model.onnx").name  # integer kernels in ORT
        'model.onnx'
        >>> import onnxruntime as ort
        >>> sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
        >>> sess.run(None, {sess.get_inputs()[0].name: calib[0].numpy()})[0].shape
        (4, 10)
    """
    p = check_output_path(path, force)
    proto = to_onnx_model(
        qmodel,
        example_input,
        opset=opset,
        container=container,
        integer=integer,
        target=target,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        int8_weights=int8_weights,
    )
    data = proto.SerializeToString()
    with atomic_path(p, force) as tmp:
        tmp.write_bytes(data)
    return p
