"""Writing and reading TFLite flatbuffers (schema version 3).

:class:`TFLiteBuilder` assembles a one-subgraph model tensor by tensor and operator by operator
and serializes it; :func:`read_model` parses a ``.tflite`` file into the schema's object API
(``schema.ModelT``) and turns every malformed input into a :class:`~omse.errors.CheckpointError`;
:func:`op_name` and :func:`tensor_array` read what the simulator needs back out of a model.

The schema is the generated module shipped with ``ai-edge-litert``
(``ai_edge_litert.schema_py_generated``), imported lazily: without it every entry point raises a
:class:`~omse.errors.ConfigError` saying how to install it.

Conventions:

* dtypes are named ``"float32"``, ``"int8"``, ``"int4"``, ``"int16"``, ``"int32"``, ``"int64"``,
  ``"uint8"``.
* ``"int4"`` constants are given and returned as int8 codes in ``[-8, 7]`` of the logical shape and
  stored two per byte, element ``2i`` in the low nibble and ``2i + 1`` in the high nibble of byte
  ``i`` (what TFLM's ``UnpackDenseInt4IntoInt8`` and LiteRT read; an odd count pads the last high
  nibble with 0).
* quantization is per-tensor (scalar scale / zero point) or per-channel (1-D arrays along
  ``axis``, TFLite's ``quantized_dimension``).
* every constant buffer is 16-byte aligned (as the TFLite converter writes them), buffer 0 is the
  empty buffer every activation tensor points at.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import primitives
from .errors import CheckpointError, ConfigError

__all__ = [
    "DTYPES",
    "TFLiteBuilder",
    "read_model",
    "op_name",
    "tensor_array",
    "tensor_dtype",
    "pack_int4",
    "unpack_int4",
    "schema_module",
]

DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "int8": np.int8,
    "int4": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
}
"""dtype name -> numpy dtype of the values (``int4`` values are held as int8 codes)."""

_TYPE_NAMES = {
    "float32": "FLOAT32",
    "int8": "INT8",
    "int4": "INT4",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
}

# op name -> name of its builtin options table (ops without options are absent).
_OPTIONS = {
    "CONV_2D": "Conv2DOptions",
    "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions",
    "ADD": "AddOptions",
    "SUB": "SubOptions",
    "MUL": "MulOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "MEAN": "ReducerOptions",
    "SUM": "ReducerOptions",
    "RESHAPE": "ReshapeOptions",
    "SQUEEZE": "SqueezeOptions",
    "CONCATENATION": "ConcatenationOptions",
    "PAD": "PadOptions",
    "PADV2": "PadV2Options",
    "SOFTMAX": "SoftmaxOptions",
    "HARD_SWISH": "HardSwishOptions",
    "LEAKY_RELU": "LeakyReluOptions",
    "QUANTIZE": "QuantizeOptions",
    "DEQUANTIZE": "DequantizeOptions",
    "TRANSPOSE": "TransposeOptions",
    "RESIZE_NEAREST_NEIGHBOR": "ResizeNearestNeighborOptions",
    "STRIDED_SLICE": "StridedSliceOptions",
}

# option field (camelCase) -> schema enum class whose member names a string value may use.
_ENUM_FIELDS = {
    "padding": "Padding",
    "fusedActivationFunction": "ActivationFunctionType",
    "weightsFormat": "FullyConnectedOptionsWeightsFormat",
    "quantizedBiasType": "TensorType",
}


def schema_module() -> Any:
    """The generated TFLite schema module (``ai_edge_litert.schema_py_generated``)."""
    try:
        import ai_edge_litert.schema_py_generated as schema
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "TFLite support needs the ai-edge-litert package: pip install ai-edge-litert "
            f"(or `make install`) ({e})"
        ) from e
    return schema


def _flatbuffers() -> Any:
    try:
        import flatbuffers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"TFLite support needs the flatbuffers package: pip install flatbuffers ({e})"
        ) from e
    return flatbuffers


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """int codes in ``[-8, 7]`` (any shape, row-major) -> uint8 bytes ``[ceil(n / 2)]``, element
    ``2i`` in the low nibble of byte ``i`` (TFLite's INT4 order: the checkpoints' too,
    :func:`omse.core.primitives.pack_int4`)."""
    flat = np.asarray(codes).astype(np.int64).ravel()
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ConfigError(
            f"int4 codes must lie in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]"
        )
    return primitives.pack_int4(torch.from_numpy(flat)).numpy()


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes (low nibble first) -> int8 codes ``[count]`` in ``[-8, 7]``."""
    b = np.asarray(packed, dtype=np.uint8).ravel()
    if b.size * 2 < count:
        raise CheckpointError(f"int4 buffer holds {b.size * 2} codes, {count} expected")
    b = b[: (count + 1) // 2]
    return primitives.unpack_int4(torch.from_numpy(b.copy()), count).numpy()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


class _AlignedBuilder:
    """A ``flatbuffers.Builder`` whose uint8 vectors (the buffers' data) are 16-byte aligned."""

    @staticmethod
    def make(size: int = 1024) -> Any:
        flatbuffers = _flatbuffers()

        class Builder(flatbuffers.Builder):
            def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 (flatbuffers API)
                if x.dtype != np.uint8 or x.ndim != 1:
                    return super().CreateNumpyVector(x)
                payload = x.tobytes()
                self.StartVector(1, len(payload), 16)
                self.head = self.head - len(payload)
                self.Bytes[self.head : self.head + len(payload)] = payload
                self.vectorNumElems = len(payload)
                return self.EndVector()

        return Builder(size)


def _check_quant(
    name: str,
    shape: tuple[int, ...],
    scale: float | np.ndarray | None,
    zero_point: int | np.ndarray | None,
    axis: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Validated ``(scale float32 [C], zero_point int64 [C])`` or None without quantization."""
    if scale is None:
        if zero_point is not None:
            raise ConfigError(f"tensor {name!r}: a zero point needs a scale")
        return None
    s = np.atleast_1d(np.asarray(scale, dtype=np.float32)).ravel()
    zp = np.zeros(s.shape, np.int64) if zero_point is None else zero_point
    z = np.atleast_1d(np.asarray(zp, dtype=np.int64)).ravel()
    if z.size == 1 and s.size > 1:
        z = np.repeat(z, s.size)
    if z.size != s.size:
        raise ConfigError(f"tensor {name!r}: {s.size} scales but {z.size} zero points")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ConfigError(f"tensor {name!r}: quantization scales must be finite and > 0")
    if s.size > 1:
        if not -len(shape) <= axis < len(shape):
            raise ConfigError(f"tensor {name!r}: axis {axis} out of range for shape {shape}")
        if shape[axis] != s.size:
            raise ConfigError(
                f"tensor {name!r}: {s.size} per-channel scales for dimension {axis} of size "
                f"{shape[axis]}"
            )
    return s, z


class TFLiteBuilder:
    """Assemble a one-subgraph TFLite model: add tensors, then operators, then :meth:`finish`.

    >>> b = TFLiteBuilder()
    >>> x = b.tensor("x", [1, 4], "int8", scale=0.1, zero_point=-3)
    >>> y = b.tensor("y", [1, 4], "int8", scale=0.1, zero_point=-3)
    >>> b.op("RELU", [x], [y])
    >>> model_bytes = b.finish([x], [y])
    """

    def __init__(self, description: str = "omse"):
        self.schema = schema_module()
        self.description = description
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.schema.BufferT()]
        self.operators: list[Any] = []
        self.opcodes: list[Any] = []
        self._opcode_index: dict[tuple[int, int], int] = {}
        self._dtypes: list[str] = []

    # -- tensors --------------------------------------------------------------------------------

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str,
        data: np.ndarray | None = None,
        scale: float | np.ndarray | None = None,
        zero_point: int | np.ndarray | None = None,
        axis: int = 0,
    ) -> int:
        """Add a tensor and return its index.

        ``data`` makes it a constant (values of the logical ``shape``; for ``"int4"`` the int codes
        in ``[-8, 7]``, packed two per byte here). ``scale`` / ``zero_point``: per-tensor scalars or
        per-channel 1-D arrays along ``axis`` (TFLite's ``quantized_dimension``).
        """
        s = self.schema
        if dtype not in DTYPES:
            raise ConfigError(f"tensor {name!r}: unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ConfigError(f"tensor {name!r}: negative dimension in shape {shape}")
        t = s.TensorT()
        t.name = name
        t.shape = np.asarray(shape, dtype=np.int32)
        t.type = getattr(s.TensorType, _TYPE_NAMES[dtype])
        t.buffer = 0
        quant = _check_quant(name, shape, scale, zero_point, axis)
        if quant is not None:
            q = s.QuantizationParametersT()
            q.scale = quant[0]
            q.zeroPoint = quant[1]
            q.quantizedDimension = axis % len(shape) if len(shape) else 0
            t.quantization = q
        if data is not None:
            t.buffer = self._add_buffer(name, shape, dtype, data)
        self.tensors.append(t)
        self._dtypes.append(dtype)
        return len(self.tensors) - 1

    def _add_buffer(self, name: str, shape: tuple[int, ...], dtype: str, data: np.ndarray) -> int:
        arr = np.asarray(data)
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ConfigError(
                f"tensor {name!r}: data of {arr.size} values for shape {shape} "
                f"({int(np.prod(shape, dtype=np.int64))} values)"
            )
        if dtype == "int4":
            raw = pack_int4(arr)
        else:
            np_dtype = np.dtype(DTYPES[dtype])
            if np.issubdtype(np_dtype, np.integer):
                info = np.iinfo(np_dtype)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    raise ConfigError(f"tensor {name!r}: data out of the {dtype} range")
            raw = np.frombuffer(arr.astype(np_dtype.newbyteorder("<")).tobytes(), np.uint8)
        buf = self.schema.BufferT()
        buf.data = np.ascontiguousarray(raw, dtype=np.uint8)
        self.buffers.append(buf)
        return len(self.buffers) - 1

    # -- operators ------------------------------------------------------------------------------

    def op(self, code: str, inputs: Sequence[int], outputs: Sequence[int], **options: Any) -> None:
        """Add operator ``code`` (a builtin name such as ``"CONV_2D"``) reading ``inputs`` (-1: an
        absent optional input) and writing ``outputs``; ``options`` set fields of its builtin
        options (snake_case or camelCase; strings name schema enum members).

        Trailing -1 inputs are dropped (a conv or fully-connected op without bias gets 2 inputs):
        TFLM's DEPTHWISE_CONV_2D crashes on a -1 bias and LiteRT's CONV_2D refuses one, while both
        accept the shorter input list, which TFLite defines to mean the same.
        """
        s = self.schema
        builtin = getattr(s.BuiltinOperator, str(code), None)
        if not isinstance(builtin, int) or str(code).startswith("_"):
            raise ConfigError(f"unknown TFLite builtin operator {code!r}")
        for i in (*inputs, *outputs):
            if not (i == -1 or 0 <= i < len(self.tensors)):
                raise ConfigError(f"{code}: tensor index {i} out of range")
        if any(o == -1 for o in outputs):
            raise ConfigError(f"{code}: an output cannot be absent (-1)")
        inputs = list(inputs)
        while inputs and inputs[-1] == -1:  # trailing absent inputs are left out (see op())
            inputs.pop()
        op = s.OperatorT()
        op.inputs = np.asarray(inputs, dtype=np.int32)
        op.outputs = np.asarray(list(outputs), dtype=np.int32)
        opts = self._options(code, options)
        if opts is not None:
            op.builtinOptionsType = getattr(s.BuiltinOptions, _OPTIONS[code])
            op.builtinOptions = opts
        version = _op_version(code, [self._dtype(i) for i in inputs], options, len(inputs))
        op.opcodeIndex = self._opcode(builtin, version)
        self.operators.append(op)

    def _dtype(self, index: int) -> str | None:
        return None if index == -1 else self._dtypes[index]

    def _options(self, code: str, options: dict[str, Any]) -> Any:
        s = self.schema
        if code not in _OPTIONS:
            if options:
                raise ConfigError(f"{code} takes no options, got {sorted(options)}")
            return None
        cls = getattr(s, _OPTIONS[code] + "T")
        opts = cls()
        for key, value in options.items():
            field = _camel(key)
            if not hasattr(opts, field):
                fields = sorted(k for k in vars(opts))
                raise ConfigError(f"{code}: unknown option {key!r}; its options are {fields}")
            setattr(opts, field, self._option_value(code, field, value))
        return opts

    def _option_value(self, code: str, field: str, value: Any) -> Any:
        if isinstance(value, str):
            enum_name = _ENUM_FIELDS.get(field)
            enum = getattr(self.schema, enum_name, None) if enum_name else None
            member = getattr(enum, value.upper(), None) if enum is not None else None
            if not isinstance(member, int):
                raise ConfigError(f"{code}: option {field} cannot take the value {value!r}")
            return member
        if isinstance(value, (list, tuple, np.ndarray)):
            return np.asarray(value, dtype=np.int32)
        return value

    def _opcode(self, builtin: int, version: int) -> int:
        key = (builtin, version)
        if key not in self._opcode_index:
            oc = self.schema.OperatorCodeT()
            oc.builtinCode = builtin
            oc.deprecatedBuiltinCode = min(builtin, 127)  # 127: PLACEHOLDER_FOR_GREATER_OP_CODES
            oc.version = version
            self.opcodes.append(oc)
            self._opcode_index[key] = len(self.opcodes) - 1
        return self._opcode_index[key]

    # -- serialization --------------------------------------------------------------------------

    def finish(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        """The serialized model: one subgraph with these graph inputs and outputs."""
        s = self.schema
        for i in (*inputs, *outputs):
            if not 0 <= i < len(self.tensors):
                raise ConfigError(f"graph input/output tensor index {i} out of range")
        sg = s.SubGraphT()
        sg.tensors = list(self.tensors)
        sg.inputs = np.asarray(list(inputs), dtype=np.int32)
        sg.outputs = np.asarray(list(outputs), dtype=np.int32)
        sg.operators = list(self.operators)
        sg.name = "main"
        model = s.ModelT()
        model.version = 3
        model.description = self.description
        model.operatorCodes = list(self.opcodes)
        model.subgraphs = [sg]
        model.buffers = list(self.buffers)
        builder = _AlignedBuilder.make(1024 + sum(b.data.size for b in self.buffers[1:]))
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _op_version(code: str, in_types: list[str | None], options: dict[str, Any], n_in: int) -> int:
    """The operator version the TFLite converter writes for this signature (``op_version.cc``);
    the runtimes accept an op only at a version their kernel registers."""
    x = in_types[0] if in_types else None
    w = in_types[1] if len(in_types) > 1 else None
    if code in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return 7 if w == "int4" else 3 if x == "int8" else 1
    if code == "FULLY_CONNECTED":
        if n_in == 2 or (n_in == 3 and in_types[2] is None):
            return 6
        if options.get("keep_num_dims", options.get("keepNumDims")):
            return 5
        return 4 if w == "int8" else 10 if w == "int4" else 1
    if code == "QUANTIZE":
        return 2 if x != "float32" else 1
    if code == "RESIZE_NEAREST_NEIGHBOR":
        if options.get("half_pixel_centers", options.get("halfPixelCenters")):
            return 3
        return 2 if x == "int8" else 1
    if code in ("RESHAPE", "SQUEEZE", "HARD_SWISH", "LEAKY_RELU"):
        return 1
    return 2 if x == "int8" else 1


# -- reading --------------------------------------------------------------------------------------


_VECTOR_BUDGET = threading.local()
"""This thread's ``[elements read, limit]`` while :func:`_bounded_vectors` is active."""


def _bounded_vector_len(original):
    """``flatbuffers.table.Table.VectorLen`` that checks each length against the buffer while
    this thread is inside :func:`_bounded_vectors` (and is ``original`` elsewhere)."""
    from flatbuffers import encode, number_types

    def vector_len(self, off):
        n = original(self, off)
        budget = getattr(_VECTOR_BUDGET, "state", None)
        if budget is None:
            return n
        start = self.Pos + off
        start += encode.Get(number_types.UOffsetTFlags.packer_type, self.Bytes, start)
        if n < 0 or start + 4 + n > len(self.Bytes):
            raise ValueError(f"a vector of {n} elements at byte {start} overruns the buffer")
        # a well-formed file's vectors hold distinct bytes (each length is read a few times):
        # more elements than that are corrupt offsets pointing vectors at each other
        budget[0] += n
        if budget[0] > budget[1]:
            raise ValueError("vectors hold more elements than the file has bytes")
        return n

    vector_len.omse_bounded = True
    return vector_len


@contextlib.contextmanager
def _bounded_vectors(size: int) -> Iterator[None]:
    """While a flatbuffer of ``size`` bytes is unpacked on this thread, a vector whose length
    field claims more elements than the bytes after it hold is an error, not a loop of millions
    of reads (a corrupt length would otherwise make the object API build lists until memory
    runs out). ``Table.VectorLen`` is wrapped once per process; the wrapper checks only on a
    thread inside this block, so other threads' flatbuffers read as before."""
    from flatbuffers.table import Table

    if not getattr(Table.VectorLen, "omse_bounded", False):
        Table.VectorLen = _bounded_vector_len(Table.VectorLen)
    outer = getattr(_VECTOR_BUDGET, "state", None)
    _VECTOR_BUDGET.state = [0, 4 * size + 4096]
    try:
        yield
    finally:
        _VECTOR_BUDGET.state = outer


def read_model(source: str | Path | bytes | bytearray) -> Any:
    """Parse a ``.tflite`` (path or bytes) into ``schema.ModelT``.

    A missing file, a file without the ``TFL3`` identifier, a truncated or corrupt flatbuffer and
    a structurally inconsistent model (indices out of range, buffers shorter than their tensors)
    raise :class:`~omse.errors.CheckpointError` naming the source and the fault.
    """
    schema = schema_module()
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = "<bytes>", bytes(source)
    else:
        label = str(source)
        p = Path(source)
        if not p.is_file():
            raise CheckpointError(f"{label}: no such TFLite file")
        data = p.read_bytes()
    if len(data) < 8:
        raise CheckpointError(f"{label}: not a TFLite model ({len(data)} bytes, truncated)")
    if data[4:8] != b"TFL3":
        raise CheckpointError(
            f"{label}: not a TFLite model (file identifier {data[4:8]!r}, expected b'TFL3')"
        )
    root = int.from_bytes(data[0:4], "little")
    if root + 4 > len(data):
        raise CheckpointError(f"{label}: truncated or corrupt TFLite flatbuffer (root offset)")
    try:
        with _bounded_vectors(len(data)):
            model = schema.ModelT.InitFromPackedBuf(data, 0)
    except (MemoryError, RecursionError) as e:
        raise CheckpointError(f"{label}: corrupt TFLite flatbuffer ({type(e).__name__})") from e
    except Exception as e:  # flatbuffers raises struct.error, IndexError, ValueError, ...
        raise CheckpointError(
            f"{label}: truncated or corrupt TFLite flatbuffer ({type(e).__name__}: {e})"
        ) from e
    _validate(model, label)
    return model


def _validate(model: Any, label: str) -> None:
    """Structural checks the object API does not make: indices in range, buffers large enough."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{label}: corrupt TFLite model: {what}")

    subgraphs = model.subgraphs or []
    if not subgraphs:
        raise bad("no subgraph")
    n_buf = len(model.buffers or [])
    n_codes = len(model.operatorCodes or [])
    for g, sg in enumerate(subgraphs):
        tensors = sg.tensors or []
        n_t = len(tensors)
        for k, t in enumerate(tensors):
            if not 0 <= t.buffer < max(n_buf, 1):
                raise bad(f"subgraph {g} tensor {k} names buffer {t.buffer} of {n_buf}")
            shape = np.asarray(t.shape if t.shape is not None else [], dtype=np.int64)
            if np.any(shape < -1) or np.prod(np.maximum(shape, 1).astype(float)) > 2.0**31:
                raise bad(f"subgraph {g} tensor {k} has an implausible shape {shape.tolist()}")
        for which in ("inputs", "outputs"):
            idx = getattr(sg, which)
            if idx is not None and np.any((np.asarray(idx) < 0) | (np.asarray(idx) >= n_t)):
                raise bad(f"subgraph {g} {which} {list(idx)} out of range ({n_t} tensors)")
        for j, op in enumerate(sg.operators or []):
            if not 0 <= op.opcodeIndex < n_codes:
                raise bad(f"subgraph {g} operator {j} opcode index {op.opcodeIndex}")
            for which in ("inputs", "outputs"):
                idx = getattr(op, which)
                if idx is not None and np.any((np.asarray(idx) < -1) | (np.asarray(idx) >= n_t)):
                    raise bad(f"subgraph {g} operator {j} {which} {list(idx)} out of range")
        for k, t in enumerate(tensors):
            buf = model.buffers[t.buffer] if n_buf else None
            data = getattr(buf, "data", None)
            if data is None or len(data) == 0:
                continue
            need = _nbytes(model, t)
            if need is not None and len(data) < need:
                raise bad(f"subgraph {g} tensor {k} needs {need} bytes, its buffer has {len(data)}")


def _nbytes(model: Any, tensor: Any) -> int | None:
    shape = tensor.shape if tensor.shape is not None else []
    if any(int(d) < 0 for d in shape):
        return None
    n = int(np.prod(np.asarray(shape, dtype=np.int64)))
    name = tensor_dtype(tensor)
    if name is None:
        return None
    if name == "int4":
        return (n + 1) // 2
    return n * np.dtype(DTYPES[name]).itemsize


def tensor_dtype(tensor: Any) -> str | None:
    """The dtype name of a ``TensorT`` (None for types omse does not handle)."""
    schema = schema_module()
    for name, tname in _TYPE_NAMES.items():
        if tensor.type == getattr(schema.TensorType, tname):
            return name
    return None


def op_name(model: Any, operator: Any) -> str:
    """The builtin name of ``operator`` (``"CONV_2D"``, ...): the larger of the opcode's
    ``builtinCode`` and ``deprecatedBuiltinCode``, as TFLite's ``GetBuiltinCode`` reads it."""
    schema = schema_module()
    oc = model.operatorCodes[operator.opcodeIndex]
    code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
    names = _builtin_names(schema)
    if code not in names:
        raise CheckpointError(f"unknown TFLite builtin operator code {code}")
    return names[code]


_NAMES_CACHE: dict[int, str] = {}


def _builtin_names(schema: Any) -> dict[int, str]:
    if not _NAMES_CACHE:
        for k, v in vars(schema.BuiltinOperator).items():
            if not k.startswith("_") and isinstance(v, int):
                _NAMES_CACHE.setdefault(v, k)
    return _NAMES_CACHE


def tensor_array(model: Any, index: int, subgraph: int = 0) -> np.ndarray:
    """The constant data of tensor ``index`` in its logical shape and dtype (INT4 unpacked to int8
    codes); :class:`~omse.errors.CheckpointError` if the tensor has no data."""
    t = model.subgraphs[subgraph].tensors[index]
    buf = model.buffers[t.buffer]
    data = getattr(buf, "data", None)
    name = tensor_dtype(t)
    if data is None or len(data) == 0:
        raise CheckpointError(f"tensor {index} ({_tname(t)}) has no constant data")
    if name is None:
        raise CheckpointError(f"tensor {index} ({_tname(t)}) has an unsupported type {t.type}")
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else []))
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.asarray(data, dtype=np.uint8)
    if name == "int4":
        return unpack_int4(raw, n).reshape(shape)
    dt = np.dtype(DTYPES[name]).newbyteorder("<")
    need = n * dt.itemsize
    if raw.size < need:
        raise CheckpointError(f"tensor {index} ({_tname(t)}): buffer of {raw.size} < {need} bytes")
    return np.frombuffer(raw[:need].tobytes(), dtype=dt).astype(DTYPES[name]).reshape(shape)


def _tname(t: Any) -> str:
    n = t.name
    return n.decode() if isinstance(n, bytes) else str(n)
