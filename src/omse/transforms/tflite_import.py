"""TFLite in: a float ``.tflite`` model as a torch module that :func:`omse.quantize` quantizes.

:func:`load_tflite` takes a path (or the file's bytes) and returns a ``torch.fx.GraphModule``
(class ``TFLiteModel``, eval mode) that computes what the file's first subgraph computes:

- **the same interface**: it takes the ``.tflite``'s inputs (positionally, in the file's order)
  in their layout and range (an image model takes ``[N, H, W, C]`` float32, NHWC, as LiteRT
  does) and returns its outputs (a tensor, or a tuple for several), in TFLite's layout;
- **torch layers for the weights**: ``CONV_2D``/``DEPTHWISE_CONV_2D`` become ``nn.Conv2d``
  (``conv0``, ``conv1``, ... / ``dw0``, ... with ``groups``; TFLite's ``[O, KH, KW, I]`` and
  ``[1, KH, KW, C*M]`` filters are permuted to torch's ``[O, I, KH, KW]``), ``FULLY_CONNECTED``
  becomes ``nn.Linear`` (``fc0``, ...), numbered in operator order (stable names), so the
  pipeline quantizes them as it does any torch model's; everything else is a plain function
  node (``F.relu``, ``F.relu6``, ``torch.clamp``, ``a + b``, ``F.avg_pool2d``, ``F.max_pool2d``,
  ``torch.softmax``, ...) and constants are buffers (``const0``, ...);
- **NCHW inside**: a 4-D input is permuted to NCHW once and 4-D tensors stay NCHW; a tensor goes
  back to NHWC only where TFLite's meaning needs its layout: ``RESHAPE`` and ``FULLY_CONNECTED``
  flatten in NHWC order (permuted first unless at most one of C, H, W exceeds 1: a
  ``[N, C, 1, 1]`` pooled map flattens as it is), ``SQUEEZE``, a ``MEAN`` whose kept axes would
  come out in another order, and a 4-D output;
- **any batch size** where the graph keeps axis 0 as the batch (every op but a ``RESHAPE`` that
  changes axis 0, which is kept at the file's size);
- TFLite's ``SAME`` padding: ``(out - 1) * stride + (k - 1) * dilation + 1 - in`` split with
  the extra element at the end; symmetric pads go into the layer, asymmetric ones into an
  explicit ``F.pad`` (``-inf`` for max pooling); ``SAME`` average pooling averages over the
  unpadded elements only (``count_include_pad=False``; asymmetric: a constant count map);
- ``module.omse_io``: ``{"input_names", "output_names", "dynamic_axes", "metadata",
  "output_shapes"}`` as :func:`~omse.transforms.onnx_import.load_onnx` writes it (a ``-1`` of a
  tensor's ``shape_signature`` is a dynamic axis, axis 0 always is one; ``metadata``: the file's
  metadata entries that are text), what :func:`omse.export_onnx` needs to write the quantized
  model with the same names; ``module.omse_tflite``: a :class:`TfliteImport` (source, layers by
  operator index, parity against LiteRT).

Steps: read (:func:`read_tflite`: a missing file, one that is not TFLite (bytes 4..8 are not
``TFL3``), a truncated or corrupt flatbuffer (any failure of the flatbuffers reader, a buffer
that points outside the file, a tensor index out of range) is a :class:`ConfigError` naming the
file), a check that it is a float model (:func:`check_float`: a quantized one is a
:class:`ConfigError` saying so), conversion (an op outside :data:`SUPPORTED_OPS` is an
:class:`UnsupportedLayerError` naming the op and its operator index), and, given a ``sample``
(:func:`omse.quantize` passes the first calibration batch), a parity check against the file in
LiteRT (``ai_edge_litert``'s interpreter, one sample at a time, the first 4): a
:class:`ConfigError` when an output differs by more than ``atol + rtol * (max - min)`` of
LiteRT's output.

Quantized weights in a float model: ``DEQUANTIZE`` of a constant (float16 weights, or int8 with
scales) is folded into a float32 constant, and int8 weights that a ``CONV_2D``/
``DEPTHWISE_CONV_2D``/``FULLY_CONNECTED`` reads directly (TFLite's "dynamic-range" quantization,
activations float: MLPerf Tiny's ``kws_ref_model_float32.tflite``) are dequantized
(``(q - zero_point) * scale``, per tensor or per channel). LiteRT runs the latter with hybrid
kernels that quantize the activations on the fly, which the float module does not do, so parity
is measured against the file with those weights stored as float32 (:func:`float_reference`).
A model with quantized *activations* is refused (:func:`check_float`).

Why a converter of our own: the ``.tflite`` schema is small and its float ops map one to one onto
torch functions; the graph is read with the flatbuffers object API of the schema module that
``ai-edge-litert`` ships (``pip install ai-edge-litert``, the ``tflite`` extra), imported lazily.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    UnsupportedLayerError,
    first_line,
)
from ..tflite_format import read_model, schema_module

__all__ = [
    "SUPPORTED_OPS",
    "TfliteImport",
    "check_float",
    "is_tflite",
    "load_tflite",
    "read_tflite",
    "tflite_io",
    "litert_outputs",
    "float_reference",
    "same_pads",
    "metadata",
]


SUPPORTED_OPS = (
    "ADD", "SUB", "MUL", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "AVERAGE_POOL_2D",
    "MAX_POOL_2D", "MEAN", "RESHAPE", "SQUEEZE", "SOFTMAX", "PAD", "CONCATENATION", "LOGISTIC",
    "HARD_SWISH", "RELU", "RELU6", "RELU_N1_TO_1", "TANH", "DEQUANTIZE",
)  # fmt: skip
"""The TFLite builtin ops :func:`load_tflite` converts (float32 tensors)."""

_FLOAT, _FLOAT16, _INT32, _INT64 = 0, 1, 2, 4
_QUANTIZED_TYPES = {3: "UINT8", 7: "INT16", 9: "INT8", 17: "INT4"}
_CONST_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64, 9: np.int8, 3: np.uint8}


def _names(enum: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass
class TfliteImport:
    """What :func:`load_tflite` did. ``layers``: ``{module name: (operator index, op)}`` for each
    ``nn.Conv2d``/``nn.Linear``; ``ops``: how many operators of each op the file has;
    ``dequantized``: float16 or int8 weights made float32 (by a ``DEQUANTIZE`` or directly);
    ``max_abs_diff``/``tolerance``: the parity check against LiteRT (``None`` without a
    sample); ``fixed_batch``: a ``RESHAPE`` that changes axis 0 fixes the batch to the file's."""

    source: str
    input_names: list[str]
    output_names: list[str]
    layers: dict[str, tuple[int, str]] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)
    dequantized: int = 0
    fixed_batch: bool = False
    max_abs_diff: float | None = None
    tolerance: float | None = None


# -- reading -----------------------------------------------------------------------------------
def is_tflite(model: Any) -> bool:
    """A path whose name ends in ``.tflite``, or ``bytes`` that carry TFLite's identifier."""
    if isinstance(model, bytes | bytearray):
        return bytes(model[4:8]) == b"TFL3"
    return isinstance(model, str | os.PathLike) and str(model).lower().endswith(".tflite")


def _ids(v: Any) -> list[int]:
    """A flatbuffers int vector (numpy array or None) as a list of ints."""
    return [] if v is None else [int(i) for i in v]


def read_tflite(model: str | os.PathLike | bytes) -> tuple[Any, bytes, str]:
    """``(schema.ModelT, the file's bytes, its description for messages)``.

    Raises :class:`ConfigError` for a missing file, a file that is not TFLite, a truncated or
    corrupt flatbuffer, or a model without a subgraph (never another exception: whatever the
    flatbuffers reader raises on bad bytes becomes that error)."""
    schema_module()  # a clear error without ai-edge-litert
    if isinstance(model, bytes | bytearray):
        data, src = bytes(model), "the TFLite model bytes"
    elif isinstance(model, str | os.PathLike):
        path = Path(model)
        src = str(path)
        if not path.is_file():
            raise ConfigError(f"TFLite model {path} does not exist (or is not a file)")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{path} cannot be read: {first_line(e)}") from e
    else:
        raise ConfigError(f"a TFLite model is a path or bytes, got {type(model).__name__}")
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ConfigError(
            f"{src} is not a TFLite model (bytes 4..8 are {data[4:8]!r}, a .tflite file has "
            "b'TFL3')"
        )
    try:  # the flatbuffer parsed and checked (indices in range, buffers inside the file)
        m = read_model(data)
    except CheckpointError as e:
        raise ConfigError(
            f"{src} is not a readable TFLite model (truncated or corrupt): "
            f"{first_line(e, 200).removeprefix('<bytes>: ')}"
        ) from e
    if not m.subgraphs:
        raise ConfigError(f"{src} is not a usable TFLite model: it has no subgraph")
    if not _ids(m.subgraphs[0].inputs) or not _ids(m.subgraphs[0].outputs):
        raise ConfigError(f"{src} is not a usable TFLite model: its graph has no input or output")
    return m, data, src


def _str(b: Any) -> str:
    if b is None:
        return ""
    return b.decode("utf-8", "replace") if isinstance(b, bytes | bytearray) else str(b)


def _shape(t: Any) -> list[int]:
    return [int(d) for d in (t.shape if t.shape is not None else [])]


def _buffer(model: Any, data: bytes, t: Any) -> np.ndarray | None:
    """Tensor ``t``'s constant data (uint8 bytes), or None for an activation."""
    if t.buffer <= 0:
        return None
    b = model.buffers[t.buffer]
    if b.offset > 1:
        return np.frombuffer(data, np.uint8, count=b.size, offset=b.offset)
    if b.data is None or len(b.data) == 0:
        return None
    return np.asarray(b.data, dtype=np.uint8)


def _dequantize(q: np.ndarray, quant: Any) -> np.ndarray:
    """``(q - zero_point) * scale`` per tensor or along ``quantizedDimension``: ``[*] -> [*]``."""
    scale = np.asarray(quant.scale, dtype=np.float64)
    zp = np.asarray(quant.zeroPoint if quant.zeroPoint is not None else [0], dtype=np.float64)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[quant.quantizedDimension] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.size > 1 else zp
    return ((q.astype(np.float64) - zp) * scale).astype(np.float32)


def tflite_io(model: Any) -> dict[str, Any]:
    """``{"input_names", "output_names", "dynamic_axes", "shapes"}`` of the first subgraph, as
    :func:`~omse.transforms.onnx_import.onnx_io` gives them: ``dynamic_axes[name] = {axis: "<name>_dim<axis>"}`` for axis 0 and
    every ``-1`` of ``shape_signature`` (axis 0 is named ``batch``); ``shapes[name]``: one entry
    per axis, the int of ``shape`` when static, else the dynamic axis' name."""
    g = model.subgraphs[0]
    io: dict[str, Any] = {"input_names": [], "output_names": [], "dynamic_axes": {}, "shapes": {}}
    for key, ids in (("input_names", g.inputs), ("output_names", g.outputs)):
        for i in ids if ids is not None else []:
            t = g.tensors[i]
            name = _str(t.name) or f"tensor{i}"
            io[key].append(name)
            shape = _shape(t)
            sig = [int(d) for d in (t.shapeSignature if t.shapeSignature is not None else shape)]
            dyn = {a: f"{name}_dim{a}" for a, d in enumerate(sig) if d < 0 and a > 0}
            if shape:
                dyn[0] = "batch"
            io["shapes"][name] = [dyn.get(a, d) for a, d in enumerate(shape)]
            if dyn:
                io["dynamic_axes"][name] = dict(sorted(dyn.items()))
    return io


def metadata(model: Any) -> dict[str, str]:
    """The model's metadata entries whose buffer is UTF-8 text (NULs stripped), by name."""
    out = {}
    for md in model.metadata or []:
        if not 0 < md.buffer < len(model.buffers or []):
            continue
        raw = model.buffers[md.buffer].data
        if raw is None:
            continue
        try:
            text = bytes(np.asarray(raw, np.uint8)).rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.isprintable():
            out[_str(md.name)] = text
    return out


def _opname(model: Any, op: Any, names: dict[int, str]) -> str:
    c = model.operatorCodes[op.opcodeIndex]
    code = max(int(c.builtinCode), int(c.deprecatedBuiltinCode))
    name = names.get(code, f"builtin {code}")
    return f"CUSTOM ({_str(c.customCode)})" if name == "CUSTOM" else name


def check_float(model: Any, data: bytes, src: str) -> None:
    """Refuse a quantized model: an activation (an input, output or operator tensor without
    constant data) that is INT8/UINT8/INT16/INT4. :class:`ConfigError` naming the tensor.

    Quantized *constants* pass: weights stored as int8 with their scales (TFLite's
    "dynamic-range" models, whose activations are float) and float16 weights are dequantized to
    float32 at conversion."""
    g = model.subgraphs[0]
    for i, t in enumerate(g.tensors or []):
        kind = _QUANTIZED_TYPES.get(int(t.type))
        if kind is None or _buffer(model, data, t) is not None:
            continue
        q = t.quantization
        how = (
            f" with scale {float(q.scale[0]):.4g}, zero point {int(q.zeroPoint[0])}"
            if q is not None and q.scale is not None and len(q.scale) and q.zeroPoint is not None
            else ""
        )
        raise ConfigError(
            f"a float .tflite is needed; this one is int8-quantized: {src}: tensor {i} "
            f"{_str(t.name)!r} is {kind}{how}. Give omse the float model it came from"
        )


# -- padding ----------------------------------------------------------------------------------
def same_pads(size: int, k: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's ``SAME`` padding of one spatial axis: ``(before, after)``, the odd element after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pads(opts: Any, hw: tuple[int, int], k: tuple[int, int], d: tuple[int, int] = (1, 1)):
    """``((top, bottom), (left, right))`` for the op's padding on an ``(H, W)`` input."""
    if int(opts.padding) == 1:  # VALID
        return (0, 0), (0, 0)
    return (
        same_pads(hw[0], k[0], int(opts.strideH), d[0]),
        same_pads(hw[1], k[1], int(opts.strideW), d[1]),
    )


# -- the converter --------------------------------------------------------------------------------
@dataclass
class _Val:
    """A TFLite tensor during conversion: an fx node (``layout`` ``"nchw"``: a 4-D tensor held
    permuted from TFLite's NHWC; ``"plain"``: TFLite's own layout) or a constant array."""

    node: fx.Node | None
    const: np.ndarray | None
    layout: str
    shape: list[int]  # TFLite's shape


_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)
_NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


def _identifier(name: str) -> str:
    s = re.sub(r"\W", "_", name).strip("_") or "input"
    return s if not s[0].isdigit() else f"x_{s}"


class _Converter:
    """Builds the fx graph, one handler per op (``_op_<NAME>``), in operator order."""

    def __init__(self, model: Any, data: bytes, src: str):
        self.schema = schema_module()
        self.model, self.data, self.src = model, data, src
        self.g = model.subgraphs[0]
        self.op_names = _names(self.schema.BuiltinOperator)
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.values: dict[int, _Val] = {}
        self.counts: dict[str, int] = {}
        self.info = TfliteImport(source=src, input_names=[], output_names=[])
        self.k, self.op_name = -1, ""

    # -- helpers
    def fail(self, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(
            f"{self.src}: operator {self.k} ({self.op_name}) {why}; omse's TFLite import "
            f"converts {', '.join(SUPPORTED_OPS)} on float32 tensors"
        )

    def fresh(self, prefix: str) -> str:
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return f"{prefix}{n}"

    def tensor(self, i: int) -> Any:
        return self.g.tensors[i]

    def const_array(self, i: int) -> np.ndarray | None:
        t = self.tensor(i)
        raw = _buffer(self.model, self.data, t)
        if raw is None:
            return None
        dtype = _CONST_DTYPES.get(int(t.type))
        if dtype is None:
            raise self.fail(f"has a constant of unsupported type {int(t.type)}")
        shape = _shape(t)
        count = int(np.prod(shape)) if shape else 1
        if raw.size < count * np.dtype(dtype).itemsize:
            raise ConfigError(
                f"{self.src} is not a readable TFLite model: tensor {_str(t.name)!r} holds "
                f"{raw.size} bytes, its shape {shape} needs {count * np.dtype(dtype).itemsize}"
            )
        return np.frombuffer(raw.tobytes(), dtype, count=count).reshape(shape).copy()

    def weights(self, i: int) -> np.ndarray | None:
        """Constant ``i`` as float32: float16 and int8 (with scales) weights dequantized (a
        ``DEQUANTIZE``'s output: the array it folded)."""
        if i in self.values:
            v = self.values[i]
            return None if v.const is None else v.const.astype(np.float32)
        arr = self.const_array(i)
        if arr is None or arr.dtype == np.float32:
            return arr
        q = self.tensor(i).quantization
        if arr.dtype == np.float16:
            out = arr.astype(np.float32)
        elif arr.dtype in (np.int8, np.uint8) and q is not None and q.scale is not None:
            out = _dequantize(arr, q)
        else:
            raise self.fail(f"has a {arr.dtype} weight without scales")
        self.info.dequantized += 1
        return out

    def value(self, i: int) -> _Val:
        """Tensor ``i``: what an op wrote, or its constant (quantized or float16 ones as
        float32)."""
        if i in self.values:
            return self.values[i]
        arr = self.const_array(i)
        if arr is not None and arr.dtype in (np.float16, np.int8, np.uint8):
            arr = self.weights(i)
        if arr is None:
            raise self.fail(f"reads tensor {i} {_str(self.tensor(i).name)!r}, which no op wrote")
        v = _Val(None, arr, "plain", list(arr.shape))
        self.values[i] = v
        return v

    def const_node(self, arr: np.ndarray) -> fx.Node:
        name = self.fresh("const")
        self.root.register_buffer(name, torch.from_numpy(np.array(arr, np.float32)))
        return self.graph.get_attr(name)

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def method(self, name: str, *args: Any) -> fx.Node:
        return self.graph.call_method(name, args)

    def module(self, prefix: str, mod: nn.Module, x: fx.Node) -> fx.Node:
        name = self.fresh(prefix)
        self.root.add_module(name, mod)
        self.info.layers[name] = (self.k, self.op_name)
        return self.graph.call_module(name, (x,))

    def nchw(self, v: _Val) -> fx.Node:
        """``v`` as an NCHW node (a plain 4-D tensor is permuted; a constant is transposed)."""
        if v.const is not None:
            return self.const_node(v.const.transpose(_TO_NCHW))
        if v.layout == "nchw":
            return v.node
        return self.method("permute", v.node, _TO_NCHW)

    def plain(self, v: _Val) -> fx.Node:
        """``v`` in TFLite's layout (an NCHW node permuted back to NHWC)."""
        if v.const is not None:
            return self.const_node(v.const)
        if v.layout == "plain":
            return v.node
        return self.method("permute", v.node, _TO_NHWC)

    def flat_plain(self, v: _Val) -> fx.Node:
        """``v`` for an op that reads it in NHWC memory order (reshape, flatten): permuted back
        only when more than one of C, H, W exceeds 1."""
        if v.const is None and v.layout == "nchw" and sum(d > 1 for d in v.shape[1:]) <= 1:
            return v.node
        return self.plain(v)

    def set(self, i: int, node: fx.Node, layout: str) -> None:
        self.values[i] = _Val(node, None, layout, _shape(self.tensor(i)))

    def activation(self, node: fx.Node, code: int) -> fx.Node:
        if code == 0:
            return node
        if code == 1:
            return self.call(F.relu, node)
        if code == 3:
            return self.call(F.relu6, node)
        if code == 2:
            return self.call(torch.clamp, node, min=-1.0, max=1.0)
        if code == 4:
            return self.call(torch.tanh, node)
        names = _names(self.schema.ActivationFunctionType)
        raise self.fail(f"has the fused activation {names.get(code, code)}")

    def inputs(self, op: Any) -> list[int]:
        return _ids(op.inputs)

    def x4(self, op: Any) -> _Val:
        v = self.value(self.inputs(op)[0])
        if len(v.shape) != 4:
            raise self.fail(f"needs a 4-D NHWC input, got shape {v.shape}")
        return v

    # -- the graph
    def run(self) -> fx.GraphModule:
        io = tflite_io(self.model)
        used: set[str] = set()
        for i, name in zip(self.g.inputs, io["input_names"]):
            arg = _identifier(name)
            while arg in used:
                arg += "_"
            used.add(arg)
            node = self.graph.placeholder(arg)
            shape = _shape(self.tensor(i))
            if int(self.tensor(i).type) != _FLOAT:
                raise ConfigError(
                    f"{self.src}: input {name!r} is of type {int(self.tensor(i).type)}; omse "
                    "converts float32 inputs only"
                )
            if len(shape) == 4:
                node = self.method("permute", node, _TO_NCHW)
                self.values[int(i)] = _Val(node, None, "nchw", shape)
            else:
                self.values[int(i)] = _Val(node, None, "plain", shape)
        for k, op in enumerate(self.g.operators or []):
            self.k, self.op_name = k, _opname(self.model, op, self.op_names)
            self.info.ops[self.op_name] = self.info.ops.get(self.op_name, 0) + 1
            handler = getattr(self, f"_op_{self.op_name}", None)
            if handler is None or self.op_name not in SUPPORTED_OPS:
                raise UnsupportedLayerError(
                    f"{self.src}: operator {k} is {self.op_name}, which omse's TFLite import does "
                    f"not convert (it converts {', '.join(SUPPORTED_OPS)})"
                )
            handler(op, op.builtinOptions)
        outs = []
        for i in self.g.outputs:
            v = self.value(int(i))
            outs.append(self.plain(v))
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        self.graph.lint()
        self.info.input_names, self.info.output_names = io["input_names"], io["output_names"]
        return fx.GraphModule(self.root, self.graph, class_name="TFLiteModel")

    # -- ops with weights
    def _conv(self, op: Any, o: Any, depthwise: bool) -> None:
        ins = self.inputs(op)
        x = self.x4(op)
        w = self.weights(ins[1])
        if w is None or w.ndim != 4:
            raise self.fail("needs a constant 4-D filter")
        b = self.weights(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        cin = x.shape[3]
        kh, kw = w.shape[1], w.shape[2]
        if depthwise:
            weight = w[0].transpose(2, 0, 1)[:, None]  # [KH, KW, C*M] -> [C*M, 1, KH, KW]
            cout, groups = w.shape[3], cin
            if cout % cin:
                raise self.fail(f"has {cout} filters for {cin} input channels")
        else:
            weight = w.transpose(0, 3, 1, 2)  # [O, KH, KW, I] -> [O, I, KH, KW]
            cout, groups = w.shape[0], cin // w.shape[3] if w.shape[3] else 0
            if not groups or cin % w.shape[3] or cout % groups:
                raise self.fail(f"has a filter {list(w.shape)} for {cin} input channels")
        d = (int(o.dilationHFactor) or 1, int(o.dilationWFactor) or 1)
        (t, bo), (le, r) = _pads(o, (x.shape[1], x.shape[2]), (kh, kw), d)
        node = self.nchw(x)
        pad: tuple[int, int] = (t, le)
        if t != bo or le != r:
            node = self.call(F.pad, node, (le, r, t, bo))
            pad = (0, 0)
        conv = nn.Conv2d(cin, cout, (kh, kw), (int(o.strideH), int(o.strideW)), pad, d, groups,
                         bias=b is not None)  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if b is not None:
                conv.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        y = self.module("dw" if depthwise else "conv", conv, node)
        self.set(int(op.outputs[0]), self.activation(y, int(o.fusedActivationFunction)), "nchw")

    def _op_CONV_2D(self, op: Any, o: Any) -> None:
        self._conv(op, o, depthwise=False)

    def _op_DEPTHWISE_CONV_2D(self, op: Any, o: Any) -> None:
        self._conv(op, o, depthwise=True)

    def _op_FULLY_CONNECTED(self, op: Any, o: Any) -> None:
        ins = self.inputs(op)
        x = self.value(ins[0])
        w = self.weights(ins[1])
        if w is None or w.ndim != 2:
            raise self.fail("needs a constant [out, in] weight")
        if int(o.weightsFormat) != 0:
            raise self.fail("has shuffled weights")
        b = self.weights(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        out_f, in_f = w.shape
        if x.const is not None:
            raise self.fail("has a constant input")
        node = self.flat_plain(x) if not o.keepNumDims else self.plain(x)
        if not o.keepNumDims and len(x.shape) != 2:
            node = self.method("reshape", node, (-1, in_f))
        fc = nn.Linear(in_f, out_f, bias=b is not None)
        with torch.no_grad():
            fc.weight.copy_(torch.from_numpy(w))
            if b is not None:
                fc.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        y = self.module("fc", fc, node)
        self.set(int(op.outputs[0]), self.activation(y, int(o.fusedActivationFunction)), "plain")

    # -- elementwise
    def _binary(self, op: Any, o: Any, fn: Callable, npfn: Callable) -> None:
        a, b = (self.value(i) for i in self.inputs(op)[:2])
        out = int(op.outputs[0])
        act = int(o.fusedActivationFunction) if o is not None else 0
        if a.const is not None and b.const is not None:
            r = npfn(a.const.astype(np.float32), b.const.astype(np.float32))
            if act:
                raise self.fail("has constant inputs and a fused activation")
            self.values[out] = _Val(None, r.astype(np.float32), "plain", list(r.shape))
            return
        rank = len(_shape(self.tensor(out)))
        nchw = rank == 4 and "nchw" in (a.layout if a.const is None else "",
                                        b.layout if b.const is None else "")  # fmt: skip

        def operand(v: _Val) -> fx.Node:
            if not nchw:
                return self.plain(v)
            if v.const is not None or v.layout == "plain":
                arr = v.const
                if arr is not None and arr.ndim < 4:
                    arr = arr.reshape([1] * (4 - arr.ndim) + list(arr.shape))
                    return self.const_node(arr.transpose(_TO_NCHW))
                if arr is None and len(v.shape) < 4:
                    node = self.method("reshape", v.node, tuple([1] * (4 - len(v.shape)) + v.shape))
                    return self.method("permute", node, _TO_NCHW)
            return self.nchw(v)

        y = self.call(fn, operand(a), operand(b))
        self.set(out, self.activation(y, act), "nchw" if nchw else "plain")

    def _op_ADD(self, op: Any, o: Any) -> None:
        self._binary(op, o, operator.add, np.add)

    def _op_SUB(self, op: Any, o: Any) -> None:
        self._binary(op, o, operator.sub, np.subtract)

    def _op_MUL(self, op: Any, o: Any) -> None:
        self._binary(op, o, operator.mul, np.multiply)

    def _unary(self, op: Any, fn: Callable, **kwargs: Any) -> None:
        v = self.value(self.inputs(op)[0])
        node = v.node if v.const is None else self.const_node(v.const)
        self.set(int(op.outputs[0]), self.call(fn, node, **kwargs), v.layout)

    def _op_RELU(self, op: Any, o: Any) -> None:
        self._unary(op, F.relu)

    def _op_RELU6(self, op: Any, o: Any) -> None:
        self._unary(op, F.relu6)

    def _op_RELU_N1_TO_1(self, op: Any, o: Any) -> None:
        self._unary(op, torch.clamp, min=-1.0, max=1.0)

    def _op_TANH(self, op: Any, o: Any) -> None:
        self._unary(op, torch.tanh)

    def _op_LOGISTIC(self, op: Any, o: Any) -> None:
        self._unary(op, torch.sigmoid)

    def _op_HARD_SWISH(self, op: Any, o: Any) -> None:
        self._unary(op, F.hardswish)

    def _op_SOFTMAX(self, op: Any, o: Any) -> None:
        v = self.value(self.inputs(op)[0])
        node = v.node if v.const is None else self.const_node(v.const)
        beta = float(o.beta) if o is not None else 1.0
        if beta != 1.0:
            node = self.call(operator.mul, node, beta)
        dim = 1 if v.layout == "nchw" else -1
        self.set(int(op.outputs[0]), self.call(torch.softmax, node, dim), v.layout)

    # -- pooling
    def _pool(self, op: Any, o: Any, kind: str) -> None:
        x = self.x4(op)
        k = (int(o.filterHeight), int(o.filterWidth))
        s = (int(o.strideH), int(o.strideW))
        (t, bo), (le, r) = _pads(o, (x.shape[1], x.shape[2]), k)
        node = self.nchw(x)
        if kind == "max":
            if t != bo or le != r:
                node = self.call(F.pad, node, (le, r, t, bo), value=float("-inf"))
                t = le = 0
            y = self.call(F.max_pool2d, node, k, s, (t, le))
        elif t == bo and le == r:
            y = self.call(F.avg_pool2d, node, k, s, (t, le), count_include_pad=False)
        else:  # asymmetric SAME: zero-padded sums, times k / (the unpadded elements counted)
            if not 0 < x.shape[1] * x.shape[2] <= 1 << 24:
                raise self.fail(f"has an implausible input shape {x.shape}")
            node = self.call(F.pad, node, (le, r, t, bo))
            ones = torch.ones(1, 1, x.shape[1], x.shape[2])
            counts = F.avg_pool2d(F.pad(ones, (le, r, t, bo)), k, s) * (k[0] * k[1])
            scale = self.const_node((k[0] * k[1] / counts).numpy())
            y = self.call(operator.mul, self.call(F.avg_pool2d, node, k, s), scale)
        self.set(int(op.outputs[0]), self.activation(y, int(o.fusedActivationFunction)), "nchw")

    def _op_AVERAGE_POOL_2D(self, op: Any, o: Any) -> None:
        self._pool(op, o, "avg")

    def _op_MAX_POOL_2D(self, op: Any, o: Any) -> None:
        self._pool(op, o, "max")

    # -- shapes
    def _axes(self, i: int, rank: int) -> list[int]:
        arr = self.const_array(i)
        if arr is None:
            raise self.fail("needs constant axes")
        return sorted({int(a) % rank for a in np.asarray(arr).reshape(-1)})

    def _op_MEAN(self, op: Any, o: Any) -> None:
        ins = self.inputs(op)
        v = self.value(ins[0])
        axes = self._axes(ins[1], len(v.shape))
        keep = bool(o.keepDims) if o is not None else False
        out = int(op.outputs[0])
        if v.layout == "nchw" and v.const is None:
            mapped = [_NHWC_TO_NCHW_AXIS[a] for a in axes]
            rest = [_NHWC_TO_NCHW_AXIS[a] for a in range(4) if a not in axes]
            if keep or rest == sorted(rest):
                y = self.call(torch.mean, v.node, mapped, keepdim=keep)
                self.set(out, y, "nchw" if keep else "plain")
                return
        y = self.call(torch.mean, self.plain(v), axes, keepdim=keep)
        self.set(out, y, "plain")

    def _reshape_to(self, v: _Val, shape: list[int]) -> tuple[fx.Node, bool]:
        """The reshape node; ``True`` when it keeps the batch free (axis 0 kept)."""
        node = self.flat_plain(v)
        if v.shape and shape and v.shape[0] == shape[0] and all(d > 0 for d in shape[1:]):
            return self.method("reshape", node, (-1, *shape[1:])), True
        return self.method("reshape", node, tuple(shape)), False

    def _op_RESHAPE(self, op: Any, o: Any) -> None:
        v = self.value(self.inputs(op)[0])
        out = int(op.outputs[0])
        shape = _shape(self.tensor(out))
        if v.const is not None:
            self.values[out] = _Val(None, v.const.reshape(shape), "plain", shape)
            return
        node, free = self._reshape_to(v, shape)
        self.info.fixed_batch |= not free
        self.set(out, node, "plain")

    def _op_SQUEEZE(self, op: Any, o: Any) -> None:
        v = self.value(self.inputs(op)[0])
        out = int(op.outputs[0])
        shape = _shape(self.tensor(out))
        if v.const is not None:
            self.values[out] = _Val(None, v.const.reshape(shape), "plain", shape)
            return
        dims = [int(d) % len(v.shape) for d in (o.squeezeDims if o and o.squeezeDims is not None
                                                else [])]  # fmt: skip
        if not dims:
            dims = [a for a, d in enumerate(v.shape) if d == 1]
        node = self.plain(v) if v.layout == "nchw" else v.node
        if 0 in dims:
            self.info.fixed_batch = True
        for a in sorted(dims, reverse=True):
            node = self.method("squeeze", node, a)
        self.set(out, node, "plain")

    def _op_PAD(self, op: Any, o: Any) -> None:
        ins = self.inputs(op)
        v = self.value(ins[0])
        p = self.const_array(ins[1])
        if p is None or v.const is not None:
            raise self.fail("needs constant paddings and a computed input")
        p = np.asarray(p).reshape(-1, 2).astype(int).tolist()
        if v.layout == "nchw":
            p = [p[a] for a in _TO_NCHW]
        node = v.node
        flat = tuple(int(x) for pair in reversed(p) for x in pair)
        if p and any(p[0]):
            self.info.fixed_batch = True
        self.set(int(op.outputs[0]), self.call(F.pad, node, flat), v.layout)

    def _op_CONCATENATION(self, op: Any, o: Any) -> None:
        vals = [self.value(i) for i in self.inputs(op)]
        rank = len(_shape(self.tensor(int(op.outputs[0]))))
        axis = int(o.axis) % rank
        nchw = rank == 4 and any(v.layout == "nchw" and v.const is None for v in vals)
        if nchw:
            nodes, axis = [self.nchw(v) for v in vals], _NHWC_TO_NCHW_AXIS[axis]
        else:
            nodes = [self.plain(v) for v in vals]
        y = self.call(torch.cat, nodes, axis)
        act = int(o.fusedActivationFunction)
        self.set(int(op.outputs[0]), self.activation(y, act), "nchw" if nchw else "plain")

    def _op_DEQUANTIZE(self, op: Any, o: Any) -> None:
        i = self.inputs(op)[0]
        if self.const_array(i) is None:
            raise self.fail("dequantizes a computed tensor (a quantized model)")
        out = self.weights(i)
        self.values[int(op.outputs[0])] = _Val(None, out, "plain", list(out.shape))


# -- parity --------------------------------------------------------------------------------------
def float_reference(data: bytes) -> bytes:
    """The file with every int8/uint8 weight (with scales) of a CONV_2D, DEPTHWISE_CONV_2D or
    FULLY_CONNECTED stored as float32 ``(q - zero_point) * scale``: what the torch module
    computes. LiteRT runs such "dynamic-range" weights with activations quantized to int8 on the
    fly (a hybrid kernel: ~2e-3 of the output range on the KWS reference model), so parity is
    measured against this float file; ``data`` itself when it has no such weights."""
    import flatbuffers

    schema = schema_module()
    m = schema.ModelT.InitFromPackedBuf(data, 0)
    names = _names(schema.BuiltinOperator)
    g = m.subgraphs[0]
    changed = False
    for op in g.operators or []:
        if _opname(m, op, names) not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        for i in list(op.inputs)[1:3]:
            t = g.tensors[i] if i >= 0 else None
            raw = None if t is None else _buffer(m, data, t)
            if raw is None or int(t.type) not in (3, 9) or t.quantization is None:
                continue
            q = np.frombuffer(raw.tobytes(), _CONST_DTYPES[int(t.type)]).reshape(_shape(t))
            buf = m.buffers[t.buffer]
            buf.data = np.frombuffer(_dequantize(q, t.quantization).tobytes(), np.uint8)
            buf.offset = buf.size = 0
            t.type, t.quantization = _FLOAT, None
            changed = True
    if not changed:
        return data
    b = flatbuffers.Builder(len(data) * 4 + 1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _inputs(sample: Any, names: list[str]) -> list[torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        sample = [sample]
    if isinstance(sample, dict):
        if sorted(sample) != sorted(names):
            raise CalibrationError(f"the TFLite model's inputs are {names}; got {sorted(sample)}")
        sample = [sample[n] for n in names]
    if not isinstance(sample, list | tuple) or len(sample) < len(names):
        raise CalibrationError(
            f"the sample for a TFLite model is a tensor, a tuple or a dict by input name "
            f"({names}), got {type(sample).__name__}"
        )
    return [torch.as_tensor(s) for s in sample[: len(names)]]


def litert_outputs(data: bytes, inputs: list[torch.Tensor], limit: int = 4) -> list[np.ndarray]:
    """The file's outputs in LiteRT's interpreter (one thread) on the first ``limit`` samples of
    ``inputs`` (each ``[N, *shape]``), one sample at a time, stacked on axis 0."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data, num_threads=1)
    interp.allocate_tensors()
    ins, outs = interp.get_input_details(), interp.get_output_details()
    n = min(int(inputs[0].shape[0]), limit)
    got: list[list[np.ndarray]] = [[] for _ in outs]
    for s in range(n):
        for d, x in zip(ins, inputs):
            interp.set_tensor(d["index"], x[s : s + 1].detach().cpu().numpy().astype(np.float32))
        interp.invoke()
        for j, d in enumerate(outs):
            got[j].append(interp.get_tensor(d["index"]).copy())
    return [np.concatenate(g) for g in got]


def _parity(module: nn.Module, data: bytes, src: str, inputs: list[torch.Tensor], rtol: float,
            atol: float, limit: int = 4) -> tuple[float, float]:  # fmt: skip
    try:
        ref = litert_outputs(float_reference(data), inputs, limit)
    except Exception as e:
        raise CalibrationError(
            f"{src} does not run in LiteRT on the sample {[tuple(x.shape) for x in inputs]} "
            f"(a TFLite image model takes NHWC [N, H, W, C] batches): {first_line(e)}"
        ) from e
    n = ref[0].shape[0]
    try:
        with torch.no_grad():
            out = module(*[x[:n].float() for x in inputs])
    except Exception as e:
        raise ConfigError(
            f"the module converted from {src} fails on the sample: {first_line(e)}"
        ) from e
    got = list(out) if isinstance(out, tuple) else [out]
    worst, worst_tol = 0.0, 0.0
    for k, (r, g) in enumerate(zip(ref, got)):
        r = np.asarray(r, np.float64)
        g = g.detach().double().numpy()
        if r.shape != g.shape:
            raise ConfigError(
                f"output {k} of the module converted from {src} has shape {g.shape}, LiteRT's "
                f"{r.shape}"
            )
        tol = atol + rtol * float(r.max() - r.min()) if r.size else atol
        diff = float(np.abs(r - g).max()) if r.size else 0.0
        if not diff <= tol:
            raise ConfigError(
                f"the module converted from {src} differs from LiteRT on output {k}: max abs "
                f"difference {diff:.3g} > tolerance {tol:.3g}; omse's TFLite import "
                "mis-translates an op of this model: report it"
            )
        if diff / tol >= worst / max(worst_tol, 1e-30):
            worst, worst_tol = diff, tol
    return worst, worst_tol


# -- the entry point -------------------------------------------------------------------------------
def load_tflite(
    model: str | os.PathLike | bytes,
    *,
    sample: Any = None,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> nn.Module:
    """A float ``.tflite`` model as a torch module (``torch.fx.GraphModule``, in eval mode).

    Args:
        model: a ``.tflite`` path, or the file's bytes.
        sample: an input batch to check the conversion on (in the file's layout: ``(N, H, W,
            C)`` for an image model), a tuple in the file's input order or a dict by input name;
            ``None`` skips the check. The first 4 samples run in LiteRT.
        rtol: the parity tolerance relative to each LiteRT output's range: an output may differ
            by ``atol + rtol * (max - min)``.
        atol: the absolute part of the parity tolerance.

    Returns:
        the module, with ``omse_io`` and ``omse_tflite`` (:class:`TfliteImport`) attributes (see
        the module docstring).

    Raises:
        ConfigError: ai-edge-litert missing; a missing, non-TFLite, truncated or corrupt file; a
            quantized model; a conversion that does not match LiteRT on ``sample``.
        UnsupportedLayerError: an op :data:`SUPPORTED_OPS` lacks (named with its operator index).
        CalibrationError: the model does not run in LiteRT on ``sample``.
    """
    m, data, src = read_tflite(model)
    check_float(m, data, src)
    conv = _Converter(m, data, src)
    try:
        module = conv.run().eval()
    except (ConfigError, UnsupportedLayerError):
        raise
    except Exception as e:  # an inconsistent file (shapes that do not fit its ops)
        raise ConfigError(
            f"{src}: operator {conv.k} ({conv.op_name}) cannot be converted: "
            f"{type(e).__name__}: {first_line(e, 200)}"
        ) from e
    io = tflite_io(m)
    info = conv.info
    if sample is not None:
        inputs = _inputs(sample, io["input_names"])
        info.max_abs_diff, info.tolerance = _parity(module, data, src, inputs, rtol, atol)
    module.omse_io = {k: io[k] for k in ("input_names", "output_names", "dynamic_axes")}
    module.omse_io["metadata"] = metadata(m)
    module.omse_io["output_shapes"] = [io["shapes"][n] for n in io["output_names"]]
    module.omse_tflite = info
    return module
