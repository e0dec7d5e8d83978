"""ONNX export of a quantized model as a QDQ graph that onnxruntime executes.

:func:`export_onnx` writes one ONNX file (opset 21, IR 10) in which

- every quantized layer's **weights** are integer initializers (``INT4`` for grids of <= 4 bits,
  ``INT8`` for 5..8 bits) followed by a ``DequantizeLinear`` with the kernel-wise scales on
  axis 0 (or one per-tensor scale); residual terms (``W ~ s1*Q1 + s2*Q2``) are separate integer
  tensors in separate branches of the same layer (the layer runs once per term, only the first
  branch carries the bias, and the branch outputs are added: by linearity this is the simulated
  layer);
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
feeds a residual add or a pooling is not such a group and stays float). The int32 bias moves
each output by less than half an accumulator step ``s_x*s_w/2``; everything else is the same
arithmetic.

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
"""

from __future__ import annotations

import copy
import io
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .errors import ConfigError, OmseError, UnsupportedLayerError
from .fold import QUANTIZABLE
from .granularity import PerChannel, PerTensor
from .grids import Grid
from .io import atomic_path, check_output_path
from .layers import QuantizedLayer
from .primitives import dequantize, fake_quantize

__all__ = ["export_onnx", "onnx_weight_codes", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 13  # per-axis DequantizeLinear
MAX_OPSET = 21  # INT4/UINT4 Q/DQ need 21; the traced graph is opset 20 (no semantic change to 21)
_TRACE_OPSET = 20
_DOMAIN = "omse"

Container = Literal["int4", "int8"]


# -- marking ------------------------------------------------------------------------------------
class _Marker(torch.autograd.Function):
    """Identity-like op that traces as ``omse::Marker(x)`` with the layer index, kind and term.

    ``kind="act"``: the input activation of layer ``idx`` (forward returns its fake quantization);
    ``kind="w"``: term ``term`` of the weight of layer ``idx`` (forward returns it unchanged).
    """

    @staticmethod
    def forward(ctx, x, value, kind: str, idx: int, term: int):  # noqa: ARG004
        return value.clone()

    @staticmethod
    def symbolic(g, x, value, kind: str, idx: int, term: int):  # noqa: ARG004
        out = g.op(f"{_DOMAIN}::Marker", x, kind_s=kind, idx_i=idx, term_i=term)
        out.setType(x.type())
        return out


class _ExportLayer(nn.Module):
    """Stand-in for a :class:`QuantizedLayer` while tracing: marked input, one branch per term."""

    def __init__(self, ql: QuantizedLayer, idx: int, integer: bool = False):
        super().__init__()
        self.idx = idx
        self.ql = ql
        self.layer = ql.layer
        self.act_scale = ql.act_scale
        self.a_grid = ql.a_grid
        self.integer = integer and ql.act_scale is not None and ql.a_grid is not None
        if self.integer:  # integer codes in float containers, rescaled after the layer
            self.term_weights = [q.to(torch.float32) for q, _, _ in ql.terms()]
        else:
            self.term_weights = [dequantize(q, s).to(torch.float32) for q, s, _ in ql.terms()]
        # the wrapped module reads self.weight in its own forward; it becomes a plain attribute
        # that each branch points at its marked term
        del self.layer.weight
        self.layer.weight = self.term_weights[0]

    def forward(self, x, *args, **kwargs):
        if self.integer:
            return self._integer_forward(x, *args, **kwargs)
        if self.act_scale is not None and self.a_grid is not None:
            x = _Marker.apply(x, fake_quantize(x, self.act_scale, self.a_grid), "act", self.idx, 0)
        bias = self.layer.bias
        out = None
        try:
            for t, w in enumerate(self.term_weights):
                self.layer.weight = _Marker.apply(w, w, "w", self.idx, t)
                if t == 1 and bias is not None:
                    self.layer.bias = None
                y = self.layer(x, *args, **kwargs)
                out = y if out is None else out + y
        finally:
            self.layer.bias = bias
        return out

    def _integer_forward(self, x, *args, **kwargs):
        """Mirror of :meth:`QuantizedLayer.integer_forward` with markers: input codes, integer
        weight codes, ``Mul`` by ``s_x * s_w`` per term, the bias added to term 0."""
        xq = _Marker.apply(x, self.ql.input_codes(x), "act", self.idx, 0)
        bias = self.layer.bias
        out = None
        try:
            self.layer.bias = None
            for t, w in enumerate(self.term_weights):
                self.layer.weight = _Marker.apply(w, w, "w", self.idx, t)
                acc = self.layer(xq, *args, **kwargs)
                y = _Marker.apply(acc, acc * self.ql.multiplier(t), "mul", self.idx, t)
                if t == 0 and bias is not None:
                    y = y + self.ql.per_output_channel(bias)
                out = y if out is None else out + y
        finally:
            self.layer.bias = bias
        return out


def _check_layer(ql: QuantizedLayer) -> None:
    if not isinstance(ql.layer, QUANTIZABLE):
        raise UnsupportedLayerError(
            f"layer {ql.name!r} ({type(ql.layer).__name__}) cannot be exported: the ONNX exporter "
            "supports quantized Conv1d, Conv2d and Linear layers"
        )
    g = ql.cfg.granularity
    if not (isinstance(g, PerTensor) or (isinstance(g, PerChannel) and g.axis == 0)):
        raise UnsupportedLayerError(
            f"layer {ql.name!r} has {g} weight scales, which the ONNX exporter cannot represent "
            "(it writes per-tensor or per-output-channel DequantizeLinear); quantize it "
            "per_channel or per_tensor, or skip it"
        )
    out = ql.float_weight.shape[0]
    for t, (q, s, _) in enumerate(ql.terms()):
        if s.numel() not in (1, out) or (s.numel() == out and out > 1 and s.shape[0] != out):
            raise UnsupportedLayerError(
                f"layer {ql.name!r} term {t} has scales of shape {tuple(s.shape)}, neither "
                "per-tensor nor one per output channel; the ONNX exporter cannot represent it"
            )
        if int(q.min()) < ql.w_grid.qmin or int(q.max()) > ql.w_grid.qmax:
            raise UnsupportedLayerError(
                f"layer {ql.name!r} term {t} has codes outside its grid {ql.w_grid}"
            )


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


def onnx_weight_codes(model: onnx.ModelProto) -> dict[str, tuple[int, np.ndarray]]:
    """Integer weight initializers written by :func:`export_onnx`: ``{name: (elem type, values)}``
    (values as int64, INT4 unpacked by onnx)."""
    out = {}
    for init in model.graph.initializer:
        if init.name.endswith(".w_codes") or ".w_codes" in init.name:
            out[init.name] = (init.data_type, numpy_helper.to_array(init).astype(np.int64))
    return out


class _Rewriter:
    def __init__(
        self,
        model: onnx.ModelProto,
        layers: list[QuantizedLayer],
        container: Container,
        integer: bool = False,
    ):
        self.model = model
        self.layers = layers
        self.container = container
        self.integer = integer
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

    def act_nodes(self, idx: int, x: str, y: str) -> list[onnx.NodeProto]:
        ql = self.layers[idx]
        grid, s = ql.a_grid, np.float32(ql.act_scale.item())
        elem, lo, hi = _container(grid, self.container)
        base = f"{ql.name}.act"
        scale = self.const(f"{base}.scale", np.array(s, dtype=np.float32))
        if elem in (TensorProto.INT4, TensorProto.UINT4):
            # 4-bit: the type comes from output_dtype, with no zero-point input (= 0). A UINT4/INT4
            # zero-point tensor trips onnxruntime's Clip/Relu -> QuantizeLinear rewrites (1.32
            # throws on it in ClipQuantFusion, and ReluQuantTransformer would drop a Relu in front
            # of a signed INT4 QuantizeLinear); both only match a 3-input QuantizeLinear.
            q_inputs, q_attrs = [x, scale], {"output_dtype": elem}
        else:
            zp = self.fresh(f"{base}.zero_point")
            self.inits.append(_int_tensor(zp, np.array(0), elem))
            q_inputs, q_attrs = [x, scale, zp], {}
        nodes = []
        if (grid.qmin, grid.qmax) != (lo, hi):
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
        if self._integer_layer(idx):  # dequantize to the integer codes themselves
            dq_inputs[1] = self.const(f"{base}.unit_scale", np.array(1.0, dtype=np.float32))
        nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [y], name=f"{base}.dequant"))
        return nodes

    def _integer_layer(self, idx: int) -> bool:
        ql = self.layers[idx]
        return self.integer and ql.act_scale is not None and ql.a_grid is not None

    def mul_nodes(self, idx: int, term: int, x: str, y: str) -> list[onnx.NodeProto]:
        ql = self.layers[idx]
        m = ql.multiplier(term).detach().to(torch.float32).numpy()
        base = f"{ql.name}.w{term}"
        mult = self.const(f"{base}.multiplier", m.astype(np.float32))
        return [helper.make_node("Mul", [x, mult], [y], name=f"{base}.rescale")]

    def weight_scale(self, idx: int, term: int) -> np.ndarray:
        _, s, _ = self.layers[idx].terms()[term]
        s = s.detach().to(torch.float32).numpy()
        return s.reshape(()) if s.size == 1 else s.reshape(-1)

    def weight_nodes(self, idx: int, term: int, y: str) -> list[onnx.NodeProto]:
        ql = self.layers[idx]
        q, _, _ = ql.terms()[term]
        s = self.weight_scale(idx, term)
        if self._integer_layer(idx):  # the scale moves to the Mul after the layer
            s = np.array(1.0, dtype=np.float32)
        elem, _, _ = _container(ql.w_grid, self.container)
        base = f"{ql.name}.w{term}"
        codes = self.fresh(f"{base}.w_codes")
        self.inits.append(_int_tensor(codes, q.to(torch.int64).numpy(), elem))
        scale = self.const(f"{base}.scale", s.astype(np.float32))
        attrs = {"axis": 0} if s.ndim == 1 else {}
        return [
            helper.make_node(
                "DequantizeLinear", [codes, scale], [y], name=f"{base}.dequant", **attrs
            )
        ]

    def int32_bias(self, idx: int, bias: np.ndarray) -> tuple[list[onnx.NodeProto], str]:
        ql = self.layers[idx]
        s_x = np.float64(ql.act_scale.item())
        s_w = self.weight_scale(idx, 0).astype(np.float64)
        s_b = (s_x * np.broadcast_to(s_w, bias.shape)).astype(np.float32)
        qb = np.clip(np.round(bias.astype(np.float64) / s_b), -(2**31), 2**31 - 1)
        base = f"{ql.name}.bias"
        codes = self.fresh(f"{base}.b_codes")
        self.inits.append(_int_tensor(codes, qb, TensorProto.INT32))
        scale = self.const(f"{base}.scale", s_b)
        y = self.fresh(f"{base}.dq")
        node = helper.make_node(
            "DequantizeLinear", [codes, scale], [y], name=f"{base}.dequant", axis=0
        )
        return [node], y

    def run(self, opset: int) -> onnx.ModelProto:
        g = self.model.graph
        init_by_name = {i.name: i for i in g.initializer}
        producers = {o: n for n in g.node for o in n.output}
        new_nodes: list[onnx.NodeProto] = []
        w_out: dict[str, int] = {}  # dequantized term-0 weight output -> layer index
        for node in g.node:
            if node.domain != _DOMAIN:
                new_nodes.append(node)
                continue
            a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            kind = a["kind"].decode() if isinstance(a["kind"], bytes) else a["kind"]
            idx, term = int(a["idx"]), int(a["term"])
            if kind == "act":
                new_nodes += self.act_nodes(idx, node.input[0], node.output[0])
            elif kind == "mul":
                new_nodes += self.mul_nodes(idx, term, node.input[0], node.output[0])
            else:
                new_nodes += self.weight_nodes(idx, term, node.output[0])
                if term == 0:
                    w_out[node.output[0]] = idx
        if self.container == "int8":
            new_nodes = self._quantize_biases(new_nodes, w_out, init_by_name, producers)
        else:
            new_nodes = self._separate_biases(new_nodes, w_out)
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(self.inits)
        _prune(self.model)
        del self.model.opset_import[:]
        self.model.opset_import.append(helper.make_opsetid("", opset))
        self.model.ir_version = 10 if opset >= 21 else 8
        return self.model

    def _separate_biases(self, nodes, w_out):
        """Conv/Gemm(x, W, b) -> Add(Conv/Gemm(x, W), b): onnxruntime rounds a Conv's or Gemm's
        float bias to int32 (scale s_x * s_w) when the other inputs come from DequantizeLinear
        (its BiasQuantization pass); an Add keeps the simulated float bias exact."""
        out = []
        for node in nodes:
            if not (
                node.op_type in ("Conv", "Gemm")
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
            if node.op_type == "Conv":
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
            if node.op_type in ("Conv", "Gemm") and len(node.input) >= 3 and node.input[1] in w_out:
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


def _find_op_module(model: nn.Module, example: torch.Tensor, message: str) -> str | None:
    """The module that calls the operator named in an exporter error (by re-tracing), if any."""
    m = re.search(r"'(aten::[A-Za-z0-9_.]+)'", message)
    if not m:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(model, (example,), check_trace=False).inlined_graph
    except Exception:
        return None
    for node in graph.nodes():
        if node.kind() == m.group(1):
            scope = node.scopeName().split("/")[-1]
            name = scope.removeprefix("__module.") if scope.startswith("__module.") else None
            try:
                if name:
                    model.get_submodule(name)
                    return name
            except AttributeError:
                return None
    return None


@torch.no_grad()
def to_onnx_model(
    qmodel: nn.Module,
    example_input: torch.Tensor,
    opset: int = 21,
    container: Container = "int4",
    integer: bool = False,
) -> onnx.ModelProto:
    """The QDQ :class:`onnx.ModelProto` of ``qmodel`` (see :func:`export_onnx`), not written."""
    if not isinstance(integer, bool):
        raise ConfigError(f"integer={integer!r}: use True or False")
    if container not in ("int4", "int8"):
        raise ConfigError(f"container={container!r}: use 'int4' or 'int8'")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset={opset!r}: use an int in {MIN_OPSET}..{MAX_OPSET}")
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError("example_input must be one input tensor (a batch, e.g. x[:1])")
    model = copy.deepcopy(qmodel).eval()
    qls = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    if not qls:
        raise ConfigError("the model has no quantized layer; quantize it with omse.quantize first")
    for ql in qls:
        _check_layer(ql)
        if opset < 21 and container == "int4":
            narrow = ql.w_grid.bits <= 4 or (ql.a_grid is not None and ql.a_grid.bits <= 4)
            if narrow:
                raise ConfigError(
                    f"layer {ql.name!r} has 4-bit tensors: INT4 needs opset 21 "
                    f"(got opset={opset}); use opset=21 or container='int8'"
                )
    names = {m: n for n, m in model.named_modules()}
    for i, ql in enumerate(qls):
        name = names[ql]
        twin = _ExportLayer(ql, i, integer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)

    # which module was being traced when the exporter failed (for the error message)
    stack: list[str] = []
    handles = []
    mod_names = {m: n for n, m in model.named_modules()}

    def enter(mod, _inp):
        stack.append(mod_names[mod])

    def leave(_mod, _inp, _out):
        stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example_input,),
                buf,
                dynamo=False,
                opset_version=min(opset, _TRACE_OPSET),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                custom_opsets={_DOMAIN: 1},
                do_constant_folding=True,
            )
    except OmseError:
        raise
    except Exception as e:
        for h in handles:
            h.remove()
        handles = []
        where = stack[-1] if stack and stack[-1] else _find_op_module(model, example_input, str(e))
        where_s = (
            f" in module {where!r} ({type(model.get_submodule(where)).__name__})" if where else ""
        )
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UnsupportedLayerError(
            f"the model cannot be exported to ONNX{where_s}: {msg}"
        ) from None
    finally:
        for h in handles:
            h.remove()
    proto = onnx.load_from_string(buf.getvalue())
    if opset > _TRACE_OPSET:
        changed = _ops_changed_after_trace(proto)
        if changed:
            raise UnsupportedLayerError(
                f"ops {sorted(changed)} changed meaning in opset {opset}; export with opset=20 "
                "and container='int8'"
            )
    proto = _Rewriter(proto, qls, container, integer).run(opset)
    proto.producer_name = "omse"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise OmseError(f"the exported ONNX graph does not validate: {e}") from None
    return proto


def export_onnx(
    qmodel: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    force: bool = False,
    opset: int = 21,
    *,
    container: Container = "int4",
    integer: bool = False,
) -> Path:
    """Write ``qmodel`` (from :func:`omse.quantize`) as a QDQ ONNX graph at ``path``.

    Args:
        qmodel: a quantized model; every quantized layer must be a Conv1d/Conv2d/Linear with
            per-channel (axis 0) or per-tensor weight scales.
        example_input: one input batch for tracing (the batch dimension is exported dynamic).
        path: output ``.onnx`` file, written atomically; an existing file needs ``force=True``.
        opset: ONNX opset (21 for INT4/UINT4 tensors; 13..20 with ``container="int8"``).
        container: ``"int4"`` (default: 4-bit tensors as INT4/UINT4) or ``"int8"`` (same values
            in 8-bit containers with an int32 bias, the form onnxruntime fuses into integer
            ``QLinearConv``/``QGemm`` kernels).
        integer: write the integer form of every layer whose input is quantized: its input
            ``DequantizeLinear`` and weight ``DequantizeLinear`` have scale 1 (the layer runs on
            the integer codes, an exact accumulator while the sums stay below 2^24), followed by
            a ``Mul`` by the per-channel ``s_x * s_w`` and the bias ``Add``. The same arithmetic
            as :func:`omse.set_integer` mode, so onnxruntime reproduces the simulation exactly
            instead of to within summation-order noise.

    Raises:
        UnsupportedLayerError: a layer the exporter cannot represent (named in the message).
    """
    p = check_output_path(path, force)
    proto = to_onnx_model(qmodel, example_input, opset=opset, container=container, integer=integer)
    data = proto.SerializeToString()
    with atomic_path(p, force) as tmp:
        tmp.write_bytes(data)
    return p
