"""``.tflite`` export: omse's integer plan written for LiteRT and TensorFlow Lite Micro.

:func:`to_tflite` writes a quantized model (``QuantConfig(target="tflite")``, or ``"int8"``) as
one TFLite flatbuffer in which

- every activation is ``int8`` with one per-tensor scale and zero point (TFLite's asymmetric
  convention: omse's unsigned 8-bit grids become zero point ``z - 128``, the same real values);
- each convolution's filter is per-channel symmetric (zero point 0, ``quantized_dimension`` the
  output channel): packed ``INT4`` (two codes a byte) where the layer's weights are on a grid of
  <= 4 bits and one term, else ``INT8`` (8-bit layers, and 4-bit layers with a residual term,
  whose ``s2 = s1/k`` merges ``k*Q1 + Q2`` into one 8-bit filter exactly as ``target="int8"``
  does: no extra convolution at run time);
- biases are ``int32`` at ``s_x * s_w``; ReLU/ReLU6 after a layer are fused as TFLite fuses them;
- the ops between layers (``ADD``, ``MUL``, ``MEAN``, pooling, ``CONCATENATION``, ``PAD``,
  ``LOGISTIC``, ``SOFTMAX``, ``HARD_SWISH``, ``RESHAPE``, ...) run on ``int8`` with the scales
  omse calibrated; where a kernel fixes its output quantization (``LOGISTIC`` and ``SOFTMAX``:
  ``1/256`` at ``-128``) or needs its inputs on its output's grid (``CONCATENATION``), a
  ``QUANTIZE`` (int8 -> int8 requantization) is inserted and listed in :attr:`TFLiteExport.requant`.

The plan is read from the integer QDQ graph :func:`omse.deploy.export.to_onnx_model` writes for
the same model (``target="int8"`` semantics): which tensor has which quantizer, which ReLU folds,
which bias is int32 is decided there once, and both writers read it. This module only maps that
graph to TFLite's ops and layout: 4-D activations are NHWC (each ONNX tensor carries the axis
permutation its TFLite tensor has, so a ``Transpose`` that only changes layout costs nothing),
filters ``[O, H, W, I]`` (``[1, H, W, O]`` depthwise), fully connected weights ``[O, I]``.

``omse.deploy.tflite_sim.simulate`` is omse's integer simulation of the written file: the
arithmetic of TFLite Micro's reference kernels (fixed-point requantization multipliers, rounding,
clamps), equal to TFLM's output bit for bit (``tests/deploy/test_tflite.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..errors import ConfigError, UnsupportedLayerError
from ..io import atomic_path
from ..nn.layers import quantized_layers
from ..tflite_format import TFLiteBuilder
from .export import to_onnx_model

__all__ = [
    "TFLiteExport",
    "FileBudget",
    "to_tflite",
    "export_tflite",
    "quantize_tflite",
    "file_budget",
    "IO_TYPES",
    "INPUT_LAYOUTS",
]

IO_TYPES = ("float32", "int8")
INPUT_LAYOUTS = ("model", "nhwc")
IOType = Literal["float32", "int8"]
InputLayout = Literal["model", "nhwc"]

NHWC = (0, 2, 3, 1)
"""The ONNX (NCHW) axes a TFLite 4-D activation holds, in order: ``tflite = onnx.transpose(NHWC)``."""
FIXED_OUTPUT = {"LOGISTIC": (1.0 / 256.0, -128), "SOFTMAX": (1.0 / 256.0, -128)}
"""TFLite int8 kernels whose output quantization is fixed (scale, zero point)."""
_SHAPE_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}
FUSABLE = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL"}


@dataclass
class _T:
    """The TFLite tensor an ONNX tensor maps to: ``tflite = onnx.transpose(perm)``."""

    index: int
    perm: tuple[int, ...]
    shape: tuple[int, ...]  # the TFLite tensor's
    scale: float | None = None  # None: float32
    zero_point: int = 0

    @property
    def params(self) -> tuple[float, int] | None:
        return None if self.scale is None else (self.scale, self.zero_point)


@dataclass
class TFLiteExport:
    """A written ``.tflite``: its bytes and what the writer decided per layer.

    ``layers``: ``{layer name: "INT4" | "INT8"}`` (the filter type each quantized layer got);
    ``requant``: the ``QUANTIZE`` (int8 -> int8) ops inserted where a kernel fixes its
    quantization, as ``"after <op> <tensor>"`` lines; ``input_layout`` / ``io``: as written."""

    data: bytes
    layers: dict[str, str] = field(default_factory=dict)
    requant: list[str] = field(default_factory=list)
    io: str = "float32"
    input_layout: str = "model"

    @property
    def bytes(self) -> int:
        return len(self.data)

    def filter_types(self) -> dict[str, int]:
        """``{"INT4": n, "INT8": m}``: how many layers have each filter type."""
        out: dict[str, int] = {}
        for t in self.layers.values():
            out[t] = out.get(t, 0) + 1
        return out


def _perm_inverse(p: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, a in enumerate(p):
        inv[a] = i
    return tuple(inv)


def _const(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute:
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _filter_quant(scale: np.ndarray, n_out: int) -> tuple:
    """``(scale, zero point)`` of a filter or bias: per channel (``n_out`` of each), or one
    per tensor for a single scale."""
    if scale.size == 1:
        return float(scale.reshape(-1)[0]), 0
    return scale, np.zeros(n_out, np.int64)


def _same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite's ``SAME`` padding of one spatial axis: ``(before, after)``, more after."""
    out = -(-size // stride)
    eff = (k - 1) * dilation + 1
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


class _Writer:
    """Maps the integer QDQ ONNX graph of one model onto :class:`TFLiteBuilder` calls."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        layer_bits: Mapping[str, int],
        io: str,
        input_layout: str,
    ):
        self.proto = proto
        self.g = proto.graph
        self.layer_bits = dict(layer_bits)
        self.io = io
        self.input_layout = input_layout
        self.b = TFLiteBuilder(description="omse")
        self.const = _const(self.g)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.elem = {
            vi.name: vi.type.tensor_type.elem_type
            for vi in [*self.g.input, *self.g.value_info, *self.g.output]
        }
        for vi in [*self.g.input, *self.g.value_info, *self.g.output]:
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                self.shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.t: dict[str, _T] = {}
        self.transposed: dict[tuple[int, tuple[int, ...]], _T] = {}  # one TRANSPOSE per layout
        self.done: set[int] = set()  # ids of nodes consumed by a fused pattern
        self.layers: dict[str, str] = {}
        self.requant: list[str] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.graph_outputs = {o.name for o in self.g.output}

    # ---- tensors --------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        if name in self.const:
            return tuple(self.const[name].shape)
        raise UnsupportedLayerError(
            f"tensor {name!r} has no static shape in the traced graph; export with a fixed-size "
            "example input"
        )

    def new(self, name, onnx_shape, perm, params: tuple[float, int] | None) -> _T:
        shape = tuple(int(onnx_shape[a]) for a in perm)
        if params is None:
            idx = self.b.tensor(name, shape, "float32")
            return _T(idx, tuple(perm), shape)
        s, z = params
        idx = self.b.tensor(name, shape, "int8", scale=float(s), zero_point=int(z))
        return _T(idx, tuple(perm), shape, float(s), int(z))

    @staticmethod
    def layout(rank: int) -> tuple[int, ...]:
        return NHWC if rank == 4 else tuple(range(rank))

    def qparams(self, q: onnx.NodeProto) -> tuple[float, int]:
        """A QuantizeLinear's (scale, zero point) on TFLite's int8 (uint8 -> zero point - 128)."""
        s = float(np.asarray(self.const[q.input[1]]).reshape(-1)[0])
        zp = self.const.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if zp is None:
            return s, 0
        z = np.asarray(zp)
        if z.dtype == np.uint8:
            return s, int(z.reshape(-1)[0]) - 128
        if z.dtype != np.int8:
            raise UnsupportedLayerError(
                f"quantizer {q.name!r} is {z.dtype}: a .tflite holds int8 activations; quantize "
                "with QuantConfig(target='tflite') (8-bit activations)"
            )
        return s, int(z.reshape(-1)[0])

    def requantize(self, src: _T, params: tuple[float, int], name: str, why: str) -> _T:
        """``src`` on the grid ``params``: itself when it already is, else a QUANTIZE op."""
        if (
            src.params is not None
            and np.float32(src.scale) == np.float32(params[0])
            and (src.zero_point == params[1])
        ):
            return src
        dst = self.like(src, name, params)
        self.b.op("QUANTIZE", [src.index], [dst.index])
        self.requant.append(why)
        return dst

    def like(self, t: _T, name: str, params=None, shape=None) -> _T:
        """A new int8 tensor of ``t``'s layout (and shape unless given) on ``params`` (default
        ``t``'s grid)."""
        s, z = params if params is not None else (t.scale, t.zero_point)
        shape = tuple(t.shape if shape is None else shape)
        idx = self.b.tensor(name, shape, "int8", scale=float(s), zero_point=int(z))
        return _T(idx, t.perm, shape, float(s), int(z))

    # ---- the walk ---------------------------------------------------------------------------
    def value(self, name: str) -> np.ndarray | None:
        """A constant's value, through the Cast / Identity nodes the exporter puts after it."""
        if name in self.const:
            return np.asarray(self.const[name])
        node = self.producer.get(name)
        if node is not None and node.op_type in ("Cast", "Identity"):
            v = self.value(node.input[0])
            if v is not None and node.op_type == "Cast":
                return v.astype(onnx.helper.tensor_dtype_to_np_dtype(_attrs(node)["to"]))
            return v
        return None

    def fold_pads(self) -> None:
        """``Pad(x, zeros on H/W) -> Q -> DQ -> Conv`` becomes ``Q(x) -> DQ -> Conv(pads + ...)``
        where the Conv reads the padded tensor alone: zeros padded before the quantizer are its
        zero point, which is what the convolution's own padding adds (one tensor and one PAD op
        less in the file, TFLite's SAME padding where it matches)."""
        for pad in list(self.g.node):
            if pad.op_type != "Pad" or len(pad.input) < 2:
                continue
            mode = _attrs(pad).get("mode", b"constant")
            pads = self.value(pad.input[1])
            fill = self.value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
            if (
                mode not in (b"constant", "constant")
                or pads is None
                or (fill is not None and np.any(fill != 0))
            ):
                continue
            pads = [int(v) for v in pads.reshape(-1)]
            if len(pads) != 8 or any(pads[a] for a in (0, 1, 4, 5)) or min(pads) < 0:
                continue
            qs = self.readers.get(pad.output[0], [])
            if len(qs) != 1 or qs[0].op_type != "QuantizeLinear":
                continue
            dqs = self.readers.get(qs[0].output[0], [])
            convs = [u for dq in dqs for u in self.readers.get(dq.output[0], [])]
            if (
                len(dqs) != 1
                or dqs[0].op_type != "DequantizeLinear"
                or not convs
                or any(c.op_type != "Conv" or c.input[0] != dqs[0].output[0] for c in convs)
            ):
                continue
            for c in convs:
                own = [a for a in c.attribute if a.name == "pads"]
                old = list(own[0].ints) if own else [0, 0, 0, 0]
                new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
                if own:
                    c.attribute.remove(own[0])
                c.attribute.append(onnx.helper.make_attribute("pads", new))
            qs[0].input[0] = pad.input[0]
            for t in (qs[0].output[0], dqs[0].output[0]):  # now the unpadded tensor
                self.shapes[t] = self.shape(pad.input[0])
            self.readers[pad.input[0]].remove(pad)
            self.readers[pad.input[0]].append(qs[0])
            self.done.add(id(pad))

    def run(self) -> bytes:
        self.fold_pads()
        for inp in self.g.input:
            if inp.name in self.const:
                continue
            self.graph_input(inp.name)
        for node in self.g.node:
            if id(node) in self.done:
                continue
            self.visit(node)
        for o in self.g.output:
            t = self.t.get(o.name)
            if t is None:
                raise UnsupportedLayerError(f"graph output {o.name!r} was not produced")
            if t.perm != tuple(range(len(t.perm))):
                t = self.transpose_to(t, tuple(range(len(t.perm))), o.name + "_layout")
            if self.io == "float32" and t.scale is not None:
                f = self.b.tensor(o.name, t.shape, "float32")
                self.b.op("DEQUANTIZE", [t.index], [f])
                self.outputs.append(f)
            else:
                self.outputs.append(t.index)
        return self.b.finish(self.inputs, self.outputs)

    def graph_input(self, name: str) -> None:
        shape = self.shape(name)
        readers, qs, seen = [], [], [name]
        while seen:  # through layout ops (an NHWC model's Transpose) to the quantizers
            for r in self.readers.get(seen.pop(), []):
                if r.op_type in ("Transpose", "Identity", "Reshape", "Flatten"):
                    seen.append(r.output[0])
                elif r.op_type not in ("Shape", "Size"):
                    readers.append(r)
        qs = [r for r in readers if r.op_type == "QuantizeLinear"]
        if len(qs) != len(readers) or not qs:
            raise UnsupportedLayerError(
                f"model input {name!r} is read by float ops ({[r.op_type for r in readers]}): "
                "a .tflite integer graph quantizes its input first; quantize every layer's input "
                "(act_bits=8)"
            )
        params = self.qparams(qs[0])
        # the input as the model takes it, or (input_layout="nhwc") a 4-D one in NHWC
        perm = NHWC if len(shape) == 4 and self.input_layout == "nhwc" else tuple(range(len(shape)))
        if self.io == "int8":
            t = self.new(name, shape, perm, params)
            self.inputs.append(t.index)
        else:
            f = self.new(name, shape, perm, None)
            self.inputs.append(f.index)
            t = self.new(name + "_int8", shape, perm, params)
            self.b.op("QUANTIZE", [f.index], [t.index])
        self.t[name] = t  # transposed to NHWC where an op needs it (transpose_to); its
        # quantizers (QuantizeLinear visits) requantize it for a reader on another grid

    def transpose_to(self, t: _T, perm: tuple[int, ...], name: str) -> _T:
        """``t`` stored with ONNX axes ``perm`` (a TRANSPOSE op unless it already is)."""
        if t.perm == perm:
            return t
        key = (t.index, tuple(perm))
        if key in self.transposed:
            return self.transposed[key]
        # tflite_new[i] = onnx[perm[i]] = tflite_old[inv(t.perm)[perm[i]]]
        inv = _perm_inverse(t.perm)
        p = [inv[a] for a in perm]
        dst = self.like(t, name, shape=[t.shape[a] for a in p])
        dst.perm = perm
        pv = self.b.tensor(name + "_perm", [len(p)], "int32", data=np.asarray(p, np.int32))
        self.b.op("TRANSPOSE", [t.index, pv], [dst.index])
        self.transposed[key] = dst
        return dst

    def visit(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op == "DequantizeLinear":
            if node.input[0] in self.const:
                return  # a weight or bias: read by its layer
            src = self.t.get(node.input[0])
            if src is None:
                raise UnsupportedLayerError(f"{node.name!r}: dequantizes an unknown tensor")
            self.t[node.output[0]] = src
            return
        if op == "QuantizeLinear":
            src = self.t.get(node.input[0])
            if src is None or src.scale is None:
                raise UnsupportedLayerError(
                    f"{node.name!r} quantizes {node.input[0]!r}, a float tensor in the integer "
                    "plan: a .tflite holds every activation in int8; quantize the model with "
                    "QuantConfig(target='tflite')"
                )
            self.t[node.output[0]] = self.requantize(
                src, self.qparams(node), node.output[0], f"requantize {node.name}"
            )
            return
        if op in ("Identity", "Dropout"):
            self.t[node.output[0]] = self.t[node.input[0]]
            return
        if op in ("Shape", "Size", "Constant") or all(
            self.elem.get(o) in _SHAPE_TYPES for o in node.output
        ):
            return  # shape arithmetic: the shapes are static here
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise UnsupportedLayerError(
                f"ONNX op {op} ({node.name!r}) has no TFLite int8 form in omse's writer; "
                "keep the model to convolutions, fully connected layers, ADD/MUL, pooling, MEAN, "
                "CONCAT, PAD, RESHAPE and the activations LiteRT and TFLM run in int8"
            )
        handler(node)

    def out_grid(self, node: onnx.NodeProto) -> tuple[tuple[float, int], str, str, list]:
        """Follow ``node``'s output through Relu/Clip to its QuantizeLinear: ``(params, fused
        activation, name of the Q's output, consumed nodes)``."""
        t = node.output[0]
        chain: list[onnx.NodeProto] = []
        lo, hi = -np.inf, np.inf
        while True:
            users = self.readers.get(t, [])
            if len(users) != 1:
                raise UnsupportedLayerError(
                    f"{node.name!r}: its output {t!r} is read by {len(users)} ops before it is "
                    "quantized; a .tflite int8 graph requantizes every op's output"
                )
            u = users[0]
            if u.op_type == "QuantizeLinear":
                params = self.qparams(u)
                break
            if u.op_type == "Relu":
                lo = max(lo, 0.0)
            elif u.op_type == "Clip":
                a = self.const.get(u.input[1]) if len(u.input) > 1 and u.input[1] else None
                c = self.const.get(u.input[2]) if len(u.input) > 2 and u.input[2] else None
                lo = max(lo, float(a) if a is not None else -np.inf)
                hi = min(hi, float(c) if c is not None else np.inf)
            else:
                raise UnsupportedLayerError(
                    f"{node.name!r}: its output goes to {u.op_type} ({u.name!r}) unquantized; a "
                    ".tflite int8 graph requantizes every op's output"
                )
            chain.append(u)
            t = u.output[0]
        s, z = params
        qlo, qhi = (-128 - z) * s, (127 - z) * s  # what the int8 grid holds
        act = "NONE"
        if lo == 0.0 and hi == 6.0 and qhi > 6.0:
            act = "RELU6"
        elif lo == 0.0 and qlo < 0.0 and hi >= qhi:
            act = "RELU"
        elif lo == -1.0 and hi == 1.0 and (qlo < -1.0 or qhi > 1.0):
            act = "RELU_N1_TO_1"
        elif (lo > qlo + s / 2 or hi < qhi - s / 2) and chain:
            raise UnsupportedLayerError(
                f"{node.name!r}: a clamp to [{lo}, {hi}] that TFLite cannot fuse (RELU, RELU6, "
                "RELU_N1_TO_1) and the output grid does not impose"
            )
        return params, act, u.output[0], chain

    def emit(self, node, code, inputs, onnx_out_shape, perm, **options) -> None:
        """Add ``code`` writing the quantized output of ``node`` (through its Relu/Clip and Q)."""
        params, act, q_out, chain = self.out_grid(node)
        if act != "NONE":
            if code not in FUSABLE:
                raise UnsupportedLayerError(f"{node.name!r}: {code} fuses no activation")
            options["fused_activation_function"] = act
        fixed = FIXED_OUTPUT.get(code)
        out = self.new(q_out, onnx_out_shape, perm, fixed or params)
        self.b.op(code, inputs, [out.index], **options)
        if fixed is not None:
            out = self.requantize(out, params, q_out + "_requant", f"after {code} {node.name}")
        for c in chain:
            self.done.add(id(c))
        q = self.readers[chain[-1].output[0] if chain else node.output[0]][0]
        self.done.add(id(q))
        self.t[q_out] = out

    def act_in(self, name: str, perm: tuple[int, ...] | None = None) -> _T:
        t = self.t.get(name)
        if t is None or t.scale is None:
            raise UnsupportedLayerError(
                f"tensor {name!r} is float in the integer plan; a .tflite int8 op needs a "
                "quantized input (quantize with QuantConfig(target='tflite'))"
            )
        if perm is not None and t.perm != perm:
            t = self.transpose_to(t, perm, name + "_layout")
        return t

    # ---- layers -----------------------------------------------------------------------------
    def weight(self, dq_out: str) -> tuple[np.ndarray, np.ndarray, str]:
        """Codes (int), per-channel scales and layer name of a weight DequantizeLinear."""
        dq = self.producer[dq_out]
        codes = np.asarray(self.const[dq.input[0]]).astype(np.int32)
        scale = np.asarray(self.const[dq.input[1]], dtype=np.float32).reshape(-1)
        zp = self.const.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if zp is not None:
            z = np.asarray(zp).astype(np.int32)
            codes = codes - (z.reshape(-1, *([1] * (codes.ndim - 1))) if z.size > 1 else z)
        name = dq.name.rsplit(".w", 1)[0]
        return codes, scale, name

    def filter_type(self, name: str, codes: np.ndarray) -> str:
        bits = self.layer_bits.get(name, 8)
        if bits <= 4 and codes.min() >= -8 and codes.max() <= 7:
            return "int4"
        if codes.min() < -128 or codes.max() > 127:
            raise UnsupportedLayerError(f"layer {name!r}: weight codes exceed int8")
        return "int8"

    def bias(self, node, n_out: int, w_scale: np.ndarray, x: _T) -> int:
        if len(node.input) < 3 or not node.input[2]:
            data = np.zeros(n_out, np.int32)
        else:
            dq = self.producer[node.input[2]]
            if dq.op_type != "DequantizeLinear" or dq.input[0] not in self.const:
                raise UnsupportedLayerError(f"{node.name!r}: its bias is not an int32 tensor")
            data = np.asarray(self.const[dq.input[0]]).astype(np.int32).reshape(-1)
        scale, zp = _filter_quant(
            (np.float64(x.scale) * w_scale.astype(np.float64)).astype(np.float32), n_out
        )
        return self.b.tensor(node.name + "_bias", [n_out], "int32", data=data,
                             scale=scale, zero_point=zp, axis=0)  # fmt: skip

    def op_Conv(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        x_shape = self.shape(node.input[0])
        if len(x_shape) != 4:
            raise UnsupportedLayerError(
                f"{node.name!r}: {len(x_shape) - 2}-D convolution; a .tflite holds 2-D ones"
            )
        x = self.act_in(node.input[0], NHWC)
        codes, w_scale, lname = self.weight(node.input[1])
        o, i_g, kh, kw = codes.shape
        groups = int(a.get("group", 1))
        cin = x_shape[1]
        sh, sw = a.get("strides", [1, 1])
        dh, dw = a.get("dilations", [1, 1])
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedLayerError(f"{node.name!r}: auto_pad is not supported")
        x = self.pad_for(node, x, x_shape, (kh, kw), (sh, sw), (dh, dw), pads)
        padding = x.padding  # type: ignore[attr-defined]
        ftype = self.filter_type(lname, codes)
        self.layers[lname] = ftype.upper()
        out_shape = self.shape(node.output[0])
        if groups == 1:
            data = codes.transpose(0, 2, 3, 1)  # [O, H, W, I]
            code, opts = "CONV_2D", {}
        elif groups == cin and i_g == 1:
            data = codes.transpose(1, 2, 3, 0)  # [1, H, W, O]
            code, opts = "DEPTHWISE_CONV_2D", {"depth_multiplier": o // cin}
        else:
            raise UnsupportedLayerError(
                f"layer {lname!r}: a grouped convolution ({groups} groups of {i_g} channels); "
                "TFLite Micro runs ordinary and depthwise ones only"
            )
        scale, zp = _filter_quant(w_scale, o)
        w = self.b.tensor(lname + ".weight", list(data.shape), ftype, data=data.astype(np.int8),
                          scale=scale, zero_point=zp,
                          axis=0 if code == "CONV_2D" else 3)  # fmt: skip
        bias = self.bias(node, o, w_scale, x)
        self.emit(
            node, code, [x.index, w, bias], out_shape, NHWC, padding=padding, stride_h=sh,
            stride_w=sw, dilation_h_factor=dh, dilation_w_factor=dw, **opts,
        )  # fmt: skip

    def pad_for(self, node, x: _T, x_shape, k, stride, dilation, pads) -> _T:
        """``x`` with ``.padding`` set: VALID / SAME when the ONNX pads are TFLite's, else an
        explicit int8 PAD (at the zero point) and VALID."""
        t, left, b, r = pads[0], pads[1], pads[2], pads[3]
        if not any(pads):
            x.padding = "VALID"  # type: ignore[attr-defined]
            return x
        same = [_same_padding(x_shape[2 + i], k[i], stride[i], dilation[i]) for i in range(2)]
        if (t, b) == same[0] and (left, r) == same[1]:
            x.padding = "SAME"  # type: ignore[attr-defined]
            return x
        y = self.pad(x, [(0, 0), (t, b), (left, r), (0, 0)], node.name + "_pad")
        y.padding = "VALID"  # type: ignore[attr-defined]
        return y

    def pad(self, x: _T, nhwc_pads, name: str) -> _T:
        shape = [d + p0 + p1 for d, (p0, p1) in zip(x.shape, nhwc_pads, strict=True)]
        y = self.like(x, name, shape=shape)
        pv = self.b.tensor(name + "_pads", [len(nhwc_pads), 2], "int32",
                           data=np.asarray(nhwc_pads, np.int32))  # fmt: skip
        self.b.op("PAD", [x.index, pv], [y.index])
        return y

    def op_Gemm(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise UnsupportedLayerError(f"{node.name!r}: Gemm with transA/alpha/beta")
        x = self.act_in(node.input[0], (0, 1))
        codes, w_scale, lname = self.weight(node.input[1])
        if not a.get("transB", 0):
            codes = codes.T
        self.fully_connected(node, x, codes, w_scale, lname)

    def op_MatMul(self, node: onnx.NodeProto) -> None:
        x_shape = self.shape(node.input[0])
        x = self.act_in(node.input[0], tuple(range(len(x_shape))))
        codes, w_scale, lname = self.weight(node.input[1])
        self.fully_connected(node, x, codes.T, w_scale, lname, keep=len(x_shape) > 2)

    def fully_connected(self, node, x: _T, codes, w_scale, lname, keep: bool = False) -> None:
        o = codes.shape[0]
        ftype = self.filter_type(lname, codes)
        if ftype == "int4" and w_scale.size > 1:
            ftype = "int8"  # TFLM's FULLY_CONNECTED takes no per-channel INT4 filter
        self.layers[lname] = ftype.upper()
        scale, zp = _filter_quant(w_scale, o)
        w = self.b.tensor(lname + ".weight", list(codes.shape), ftype,
                          data=codes.astype(np.int8), scale=scale, zero_point=zp,
                          axis=0)  # fmt: skip
        bias = self.bias(node, o, w_scale, x)
        out_shape = self.shape(node.output[0])
        self.emit(node, "FULLY_CONNECTED", [x.index, w, bias], out_shape,
                  tuple(range(len(out_shape))), keep_num_dims=keep)  # fmt: skip

    # ---- ops between layers -----------------------------------------------------------------
    def binary(self, node, code) -> None:
        shape = self.shape(node.output[0])
        perm = self.layout(len(shape))
        ins = []
        for i in node.input[:2]:
            if len(self.shape(i)) != len(shape):
                raise UnsupportedLayerError(
                    f"{node.name!r}: {code} of tensors of different rank; broadcast explicitly"
                )
            ins.append(self.act_in(i, perm).index)
        self.emit(node, code, ins, shape, perm)

    def op_Add(self, node) -> None:
        self.binary(node, "ADD")

    def op_Sub(self, node) -> None:
        self.binary(node, "SUB")

    def op_Mul(self, node) -> None:
        self.binary(node, "MUL")

    def unary(self, node, code, **options) -> None:
        shape = self.shape(node.output[0])
        perm = self.layout(len(shape))
        x = self.act_in(node.input[0], perm)
        self.emit(node, code, [x.index], shape, perm, **options)

    def op_Sigmoid(self, node) -> None:
        self.unary(node, "LOGISTIC")

    def op_HardSwish(self, node) -> None:
        self.unary(node, "HARD_SWISH")

    def op_Tanh(self, node) -> None:
        self.unary(node, "TANH")

    def op_LeakyRelu(self, node) -> None:
        self.unary(node, "LEAKY_RELU", alpha=float(_attrs(node).get("alpha", 0.01)))

    def op_Relu(self, node) -> None:
        self.unary(node, "RELU")

    def op_Clip(self, node) -> None:
        lo = self.const.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = self.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if lo is not None and float(lo) == 0.0 and hi is not None and float(hi) == 6.0:
            self.unary(node, "RELU6")
        elif lo is not None and float(lo) == 0.0 and hi is None:
            self.unary(node, "RELU")
        else:
            raise UnsupportedLayerError(f"{node.name!r}: Clip({lo}, {hi}) has no int8 TFLite op")

    def op_Softmax(self, node) -> None:
        shape = self.shape(node.output[0])
        axis = int(_attrs(node).get("axis", -1)) % len(shape)
        perm = self.layout(len(shape))
        if perm[-1] != axis:  # the softmax axis last
            perm = tuple(a for a in range(len(shape)) if a != axis) + (axis,)
        x = self.act_in(node.input[0], perm)
        self.emit(node, "SOFTMAX", [x.index], shape, perm, beta=1.0)

    def op_GlobalAveragePool(self, node) -> None:
        shape = self.shape(node.output[0])
        x = self.act_in(node.input[0], NHWC)
        axes = self.b.tensor(node.name + "_axes", [2], "int32", data=np.asarray([1, 2], np.int32))
        self.emit(node, "MEAN", [x.index, axes], shape, NHWC, keep_dims=True)

    def op_ReduceMean(self, node) -> None:
        shape_in = self.shape(node.input[0])
        a = _attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = [int(v) for v in np.asarray(self.const[node.input[1]]).reshape(-1)]
        axes = sorted(int(v) % len(shape_in) for v in axes)
        keep = bool(a.get("keepdims", 1))
        x = self.t.get(node.input[0])
        if x is None:
            raise UnsupportedLayerError(f"{node.name!r}: the mean of a float tensor")
        perm = x.perm  # reduce in the layout the tensor has
        t_axes = [perm.index(v) for v in axes]
        av = self.b.tensor(node.name + "_axes", [len(t_axes)], "int32",
                           data=np.asarray(t_axes, np.int32))  # fmt: skip
        if keep:
            out_perm = perm
        else:  # the remaining ONNX axes, renumbered, in the order the tensor stores them
            out_perm = tuple(a - sum(v < a for v in axes) for a in perm if a not in axes)
        out_shape = self.shape(node.output[0])
        self.emit(node, "MEAN", [x.index, av], out_shape, out_perm, keep_dims=keep)

    def pool(self, node, code) -> None:
        a = _attrs(node)
        x_shape = self.shape(node.input[0])
        if len(x_shape) != 4:
            raise UnsupportedLayerError(f"{node.name!r}: {len(x_shape) - 2}-D pooling")
        kh, kw = a["kernel_shape"]
        sh, sw = a.get("strides", [1, 1])
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if a.get("ceil_mode", 0):
            raise UnsupportedLayerError(f"{node.name!r}: ceil_mode pooling")
        if code == "AVERAGE_POOL_2D" and any(pads) and a.get("count_include_pad", 0):
            raise UnsupportedLayerError(
                f"{node.name!r}: an average pooling that counts its padding; TFLite averages "
                "the valid elements (count_include_pad=False)"
            )
        x = self.act_in(node.input[0], NHWC)
        same = [_same_padding(x_shape[2 + i], (kh, kw)[i], (sh, sw)[i], 1) for i in range(2)]
        if not any(pads):
            padding = "VALID"
        elif (pads[0], pads[2]) == same[0] and (pads[1], pads[3]) == same[1]:
            padding = "SAME"
        else:
            raise UnsupportedLayerError(f"{node.name!r}: pooling pads {pads} are not TFLite's")
        # TFLite's int8 pooling keeps its input's quantization: requantized after if need be
        self.same_grid_op(node, code, x, self.shape(node.output[0]), NHWC, padding=padding,
                          stride_h=sh, stride_w=sw, filter_height=kh, filter_width=kw)  # fmt: skip

    def same_grid_op(self, node, code, x: _T, out_shape, perm, extra_inputs=(), **options):
        """An op whose int8 kernel keeps its input's grid: its output on ``x``'s grid, then a
        QUANTIZE onto the planned one if that differs."""
        params, act, q_out, chain = self.out_grid(node)
        if act != "NONE":
            raise UnsupportedLayerError(f"{node.name!r}: {code} fuses no activation")
        out = self.new(q_out + "_raw", out_shape, perm, x.params)
        self.b.op(code, [x.index, *extra_inputs], [out.index], **options)
        out = self.requantize(out, params, q_out, f"after {code} {node.name}")
        q = self.readers[node.output[0]][0]
        self.done.add(id(q))
        self.t[q_out] = out

    def op_MaxPool(self, node) -> None:
        self.pool(node, "MAX_POOL_2D")

    def op_AveragePool(self, node) -> None:
        self.pool(node, "AVERAGE_POOL_2D")

    def op_Pad(self, node) -> None:
        a = _attrs(node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = np.asarray(self.const[node.input[1]]).reshape(-1).astype(int)
        value = self.const.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if mode != "constant" or (value is not None and float(np.asarray(value)) != 0.0):
            raise UnsupportedLayerError(f"{node.name!r}: only zero padding has an int8 PAD")
        x_shape = self.shape(node.input[0])
        r = len(x_shape)
        perm = self.layout(r)
        x = self.act_in(node.input[0], perm)
        pairs = [(int(pads[a]), int(pads[a + r])) for a in perm]
        users = self.readers.get(node.output[0], [])
        y = self.pad(x, pairs, node.output[0])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            self.done.add(id(users[0]))
            self.t[users[0].output[0]] = self.requantize(
                y, self.qparams(users[0]), users[0].output[0], f"after PAD {node.name}"
            )
        self.t[node.output[0]] = y

    def reshape_to(self, node, out_shape) -> None:
        x_shape = self.shape(node.input[0])
        x = self.t.get(node.input[0])
        if x is None:
            raise UnsupportedLayerError(f"{node.name!r}: reshapes a float tensor")
        ident = tuple(range(len(x_shape)))
        # a flatten whose moved axes are all 1 is the same in either layout
        moved = [a for a in x.perm if x_shape[a] != 1]
        if moved != [a for a in ident if x_shape[a] != 1]:  # else the same bytes either way
            x = self.transpose_to(x, ident, node.input[0] + "_nchw")
        ident = tuple(range(len(out_shape)))
        mid = [int(v) for v in out_shape]
        y = self.like(x, node.output[0] + ("_nchw" if len(mid) == 4 else ""), shape=mid)
        y.perm = ident
        sv = self.b.tensor(node.output[0] + "_shape", [len(mid)], "int32",
                           data=np.asarray(mid, np.int32))  # fmt: skip
        self.b.op("RESHAPE", [x.index, sv], [y.index])
        self.t[node.output[0]] = self.transpose_to(y, self.layout(len(mid)), node.output[0])

    def op_Flatten(self, node) -> None:
        self.reshape_to(node, self.shape(node.output[0]))

    def op_Reshape(self, node) -> None:
        self.reshape_to(node, self.shape(node.output[0]))

    def op_Squeeze(self, node) -> None:
        self.reshape_to(node, self.shape(node.output[0]))

    def op_Unsqueeze(self, node) -> None:
        self.reshape_to(node, self.shape(node.output[0]))

    def op_Transpose(self, node) -> None:
        p = tuple(int(v) for v in _attrs(node)["perm"])
        x = self.t.get(node.input[0])
        if x is None:
            raise UnsupportedLayerError(f"{node.name!r}: transposes a float tensor")
        # out_onnx = x_onnx.transpose(p): tflite(x) = x_onnx.transpose(x.perm), so the same
        # storage is out_onnx.transpose(q) with p[q[i]] = x.perm[i]
        q = tuple(p.index(a) for a in x.perm)
        y = _T(x.index, q, x.shape, x.scale, x.zero_point)
        want = self.layout(len(p))
        self.t[node.output[0]] = self.transpose_to(y, want, node.output[0]) if q != want else y

    def op_Concat(self, node) -> None:
        shape = self.shape(node.output[0])
        axis = int(_attrs(node)["axis"]) % len(shape)
        perm = self.layout(len(shape))
        params, act, q_out, chain = self.out_grid(node)
        if act != "NONE":
            raise UnsupportedLayerError(f"{node.name!r}: CONCATENATION fuses no activation")
        ins = [
            self.requantize(self.act_in(i, perm), params, f"{i}_for_{node.name}",
                            f"before CONCATENATION {node.name}").index
            for i in node.input
        ]  # fmt: skip
        out = self.new(q_out, shape, perm, params)
        self.b.op("CONCATENATION", ins, [out.index], axis=perm.index(axis))
        self.done.add(id(self.readers[node.output[0]][0]))
        self.t[q_out] = out

    def op_Resize(self, node) -> None:
        a = _attrs(node)
        mode = a.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "nearest":
            raise UnsupportedLayerError(f"{node.name!r}: {mode} resize has no int8 TFLite form")
        out_shape = self.shape(node.output[0])
        x = self.act_in(node.input[0], NHWC)
        size = self.b.tensor(node.name + "_size", [2], "int32",
                             data=np.asarray(out_shape[2:], np.int32))  # fmt: skip
        self.same_grid_op(node, "RESIZE_NEAREST_NEIGHBOR", x, out_shape, NHWC, (size,))


def _static_proto(proto: onnx.ModelProto, example: Sequence[torch.Tensor]) -> onnx.ModelProto:
    """``proto`` with every input's dims fixed to the example's and shapes inferred."""
    for vi, x in zip(proto.graph.input, example, strict=False):
        dims = vi.type.tensor_type.shape.dim
        for d, n in zip(dims, x.shape, strict=True):
            d.ClearField("dim_param")
            d.dim_value = int(n)
    for vi in proto.graph.output:
        vi.type.tensor_type.ClearField("shape")
    del proto.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)


@torch.no_grad()
def to_tflite(
    qmodel: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    io: IOType = "float32",
    input_layout: InputLayout = "model",
) -> TFLiteExport:
    """The ``.tflite`` of ``qmodel`` (see the module docstring), not written.

    Args:
        qmodel: a model from :func:`omse.quantize` with ``QuantConfig(target="tflite")`` (or
            ``"int8"``: then every filter is INT8).
        example_input: one input (batch of 1) of the size the file will take; the file's shapes
            are static.
        io: ``"float32"`` (default): the file takes and returns float tensors (a QUANTIZE
            after the input, a DEQUANTIZE before each output); ``"int8"``: int8 tensors with the
            input's and outputs' scales and zero points.
        input_layout: ``"model"`` (default): the file takes the input the model takes (an NCHW
            image stays NCHW, transposed inside); ``"nhwc"``: 4-D inputs in TFLite's NHWC.
    """
    if io not in IO_TYPES:
        raise ConfigError(f"io={io!r}: use one of {list(IO_TYPES)}")
    if input_layout not in INPUT_LAYOUTS:
        raise ConfigError(f"input_layout={input_layout!r}: use one of {list(INPUT_LAYOUTS)}")
    qls = quantized_layers(qmodel)
    targets = {q.cfg.target for q in qls.values()}
    if not targets <= {"tflite", "int8"}:
        raise ConfigError(
            f"the model was quantized for target={sorted(targets)}: a .tflite needs the integer "
            "simulation; quantize with QuantConfig(target='tflite')"
        )
    example = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if any(x.shape[0] != 1 for x in example if x.dim()):
        example = tuple(x[:1] if x.dim() else x for x in example)
    proto = to_onnx_model(qmodel, example, target="int8", int8_weights="s8")
    proto = _static_proto(proto, example)
    bits = {n: (q.w_grid.bits if q.n_terms == 1 else 8) for n, q in qls.items()}
    w = _Writer(proto, bits, io, input_layout)
    data = w.run()
    return TFLiteExport(data, w.layers, w.requant, io, input_layout)


def export_tflite(
    qmodel: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | Path,
    force: bool = False,
    *,
    io: IOType = "float32",
    input_layout: InputLayout = "model",
) -> TFLiteExport:
    """Write :func:`to_tflite`'s file to ``path`` atomically (an existing file needs
    ``force=True``); returns the :class:`TFLiteExport` (bytes, filter type per layer)."""
    out = to_tflite(qmodel, example_input, io=io, input_layout=input_layout)
    with atomic_path(path, force) as tmp:
        Path(tmp).write_bytes(out.data)
    return out


@dataclass
class FileBudget:
    """How a ``.tflite`` byte budget became a weight budget (:func:`quantize_tflite`).

    ``int8_bytes``: the file with every filter INT8 (the reference the fractions are of);
    ``overhead``: its bytes that are not filters or biases (graph, activation quantization);
    ``max_bytes``: the file budget; ``weight_bytes``: what the per-layer precision selection
    may spend (``max_bytes - overhead``)."""

    int8_bytes: int
    overhead: int
    max_bytes: int
    weight_bytes: int


def file_budget(
    model,
    batches: list,
    config,
    example,
    max_bytes,
    io: str = "float32",
    input_layout: str = "model",
) -> FileBudget:
    """Measure the all-INT8 file of ``model`` (a quick 8-bit quantization: its bytes do not
    depend on the calibrated values) and turn ``max_bytes`` into a weight budget."""
    from ..config import QuantConfig, WeightQuant, parse_budget
    from ..transforms.pipeline import quantize
    from ..transforms.precision import weight_bytes

    w = config.weights
    probe_cfg = QuantConfig.preset(
        "fast",
        target="tflite",
        skip=config.skip,
        weights=WeightQuant(8, granularity=w.granularity, scale_dtype=w.scale_dtype),
    )
    probe = quantize(model, batches[:1], probe_cfg)
    int8 = to_tflite(probe, example, io=io, input_layout=input_layout)
    w8 = sum(weight_bytes(q, 8, "tflite") for q in quantized_layers(probe).values())
    overhead = int8.bytes - w8
    b = parse_budget(max_bytes)
    if b is None:
        raise ConfigError(f"max_bytes={max_bytes!r}: give bytes or a fraction of the int8 file")
    total = b.bytes_for(int8.bytes)
    if total <= overhead:
        raise ConfigError(
            f"max_bytes={max_bytes!r} ({total:,} bytes) leaves nothing for the weights: the "
            f"graph and activation quantization alone take {overhead:,} bytes (the all-INT8 file "
            f"is {int8.bytes:,})"
        )
    return FileBudget(int8.bytes, overhead, total, total - overhead)


def quantize_tflite(
    model,
    calib_batches,
    config=None,
    *,
    max_bytes: float | int | str | None = None,
    io: IOType = "float32",
    input_layout: InputLayout = "model",
    progress: bool = False,
) -> tuple[nn.Module, TFLiteExport, FileBudget | None]:
    """Quantize ``model`` for ``target="tflite"`` and write its ``.tflite`` in memory, the file
    within ``max_bytes`` when given.

    ``max_bytes``: the written file's bytes (an int, ``"60KB"``), or a fraction of the same
    model's all-INT8 file (``0.6``, ``"0.6x"``, ``"60%"``). The bytes that are not filters
    (graph, activation quantization) are measured on that INT8 file, and the rest is the per-layer
    precision selection's weight budget (:class:`~omse.config.Budget`, which counts each layer's
    filter, scales, zero points and bias as the file stores them); its guard is off (the budget
    is the user's limit). Returns ``(qmodel, export, budget)``."""
    from dataclasses import replace

    from ..config import Budget, QuantConfig
    from ..transforms.pipeline import prepare_batches, quantize
    from ..transforms.statistics import first_row

    config = config or QuantConfig(target="tflite")
    if config.target != "tflite":
        raise ConfigError(
            f"config.target={config.target!r}: a .tflite file budget is for target='tflite'"
        )
    batches = prepare_batches(calib_batches)
    example = first_row(batches[0])
    fb = None
    if max_bytes is not None:
        fb = file_budget(model, batches, config, example, max_bytes, io, input_layout)
        config = replace(config, budget=Budget(weight_bytes=fb.weight_bytes, guard_db=None))
    qmodel = quantize(model, batches, config, progress=progress)
    out = to_tflite(qmodel, example, io=io, input_layout=input_layout)
    return qmodel, out, fb
