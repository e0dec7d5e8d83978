"""OpenVINO (CPU plugin) as a second, independent runtime for omse's ONNX exports.

Contract
    :func:`compile_onnx` reads an ONNX file written by :func:`omse.deploy.export.export_onnx` with
    ``openvino.Core().read_model`` and compiles it for the ``CPU`` device with a fixed number of
    inference threads, one performance hint, and the exported dynamic batch dimension left
    dynamic (the model is never reshaped), so one compiled model runs any batch size.
    :func:`run` executes one batch ``[N, *input_shape]`` and returns the first output
    ``[N, *output_shape]`` (logits ``[N, classes]`` for omse's models) as a new float32 array.
    :func:`precision_counts` reads the *executed* graph (``compiled.get_runtime_model()``) and
    reports in which precision each convolution / fully-connected / matmul layer ran.
    Every failure (openvino missing, a file that is missing or does not read or compile, a
    batch of the wrong shape) is an :class:`~omse.errors.OmseError` naming the file or shape.

What the CPU plugin does with omse's graphs (openvino 2026.4, measured on the Fashion-MNIST zoo
and EfficientNet-Lite0, W4A8)
    - It reads every export, ``INT4`` ``DequantizeLinear`` weights included. Activation
      ``QuantizeLinear -> DequantizeLinear`` pairs become ``FakeQuantize``; its low-precision
      transformations then run a layer in integer arithmetic (``u8``/``i8`` activations x ``i8``
      weights, int32 accumulation, ``*_I8``/``*_i8`` kernels) only when its weights are 8-bit:
    - ``container="int8"``: every quantized convolution and the classifier run in ``u8``/``i8``.
    - ``UINT8`` weights (zero point 128, what ``int8_weights="auto"`` writes for codes beyond
      +-64 so that onnxruntime's kernels are exact on x86 CPUs without VNNI): the plugin runs
      such a convolution in ``f32``. :func:`compile_onnx` therefore compiles an export listing
      UINT8 layers (metadata ``omse.uint8_weight_layers``) from a copy with those weights as
      INT8 (:func:`omse.deploy.export.with_int8_weights`, the ``"s8"`` graph); reading the
      file with ``openvino`` directly, export with ``int8_weights="s8"``.
    - ``container="int4"`` (default): no convolution runs in integer arithmetic; the 4-bit
      weights are decompressed to floats and the convolutions run in ``f32`` (or ``bf16``, see
      below). A ``FullyConnected`` keeps ``i4`` weights (weight-only compression: float
      activations; reported precision ``i4``).
    - ``integer=True`` with INT4 weights: the same float convolutions on integer codes.
    - **Precision hint.** With ``precision_hint=None`` the plugin's default applies, which is
      ``bf16`` on CPUs with AMX or AVX512_BF16: every float layer (and the dequantized 4-bit
      convolutions) then runs in bfloat16, several output steps away from omse's float32
      simulation. ``precision_hint="f32"`` is the setting for parity checks.
    - **Dynamic quantization.** By default the plugin quantizes the float input of a
      ``FullyConnected`` with compressed (e.g. ``i4``) weights to int8 on the fly, in groups of
      32 (``DYNAMIC_QUANTIZATION_GROUP_SIZE``); that re-rounds an already quantized activation.
      :func:`compile_onnx` turns it off whenever ``precision_hint="f32"`` (or
      ``dynamic_quantization=False``).

Performance hint
    ``"LATENCY"`` (default) puts all ``threads`` on one stream that runs one request at a time:
    the right setting for a benchmark timing one synchronous call at a given batch size, as
    :func:`run` does. ``"THROUGHPUT"`` splits the threads into several streams, which only pays
    with several requests in flight (openvino's ``AsyncInferQueue``); :func:`run` alone would
    leave all but one stream idle.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from ..errors import ConfigError, OmseError

if TYPE_CHECKING:
    from openvino import CompiledModel

__all__ = [
    "COMPUTE_LAYER_TYPES",
    "LayerPrecision",
    "PrecisionReport",
    "compile_onnx",
    "precision_counts",
    "run",
]

COMPUTE_LAYER_TYPES = frozenset(
    {
        "Convolution",  # the CPU plugin reports grouped/depthwise convolutions as Convolution too
        "GroupConvolution",
        "Deconvolution",
        "BinaryConvolution",
        "FullyConnected",  # a MatMul/Gemm with constant weights
        "FullyConnectedCompressed",
        "MatMul",  # activation x activation
        "Gemm",
    }
)
"""``layerType`` values (CPU plugin runtime info) that :func:`precision_counts` counts."""

PRECISION_HINTS = ("f32", "bf16", "f16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
_FLOAT = frozenset({"f32", "bf16", "f16", "f64"})
_INTEGER = frozenset({"u8", "i8"})


class LayerPrecision(TypedDict):
    """One executed convolution-like layer of the runtime model."""

    name: str  # the runtime layer's friendly name, e.g. "/layers/layers.0/conv1/layer/Conv/..."
    layer_type: str  # 'layerType', e.g. "Convolution", "FullyConnected"
    precision: str  # 'runtimePrecision', e.g. "u8", "i8", "f32", "bf16", "i4"
    output_precision: str  # 'outputPrecisions', e.g. "u8" when the next FakeQuantize was fused
    primitive: str  # 'primitiveType', the kernel, e.g. "brgconv_avx512_amx_I8", "undef_f32"
    integer: bool  # True when the layer multiplied integer activations by integer weights


class PrecisionReport(TypedDict):
    """What :func:`precision_counts` returns."""

    counts: dict[str, dict[str, int]]  # layer type -> runtime precision -> number of layers
    float_layers: list[str]  # names of the layers that computed in floating point
    layers: list[LayerPrecision]  # every counted layer, in execution order


def _import_openvino(what: str) -> Any:
    try:
        import openvino
    except ImportError as e:
        raise OmseError(
            f"cannot {what}: the package openvino is not installed ({e}); "
            "install it with `pip install -e '.[openvino]'` (openvino==2026.4.1)"
        ) from None
    return openvino


def _ov_message(e: BaseException, limit: int = 300) -> str:
    """The informative lines of an openvino exception (it prefixes C++ source locations)."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith("Exception from src/")]
    return (" ".join(keep) or type(e).__name__)[:limit]


def _with_int8_weights(p: Path) -> Path:
    """``p``, or, for an export with UINT8 weights (``int8_weights="auto"``), a temporary copy
    with them as INT8: the CPU plugin runs a convolution with UINT8 weights in ``f32``."""
    import tempfile

    import onnx

    from .export import uint8_weight_layers, with_int8_weights

    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not ONNX, or unreadable: read_model reports it
        return p
    if (
        not uint8_weight_layers(model)
        or model.graph.initializer
        and any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    ):
        return p
    with_int8_weights(model)
    fd, name = tempfile.mkstemp(prefix=f"{p.stem}.s8.", suffix=".onnx")
    with open(fd, "wb") as f:
        f.write(model.SerializeToString())
    return Path(name)


def compile_onnx(
    path: str | Path,
    threads: int = 2,
    precision_hint: str | None = None,
    *,
    performance_hint: str = "LATENCY",
    dynamic_quantization: bool | None = None,
) -> CompiledModel:
    """Read the ONNX file ``path`` and compile it for openvino's CPU plugin.

    Args:
        path: an ``.onnx`` file (e.g. from :func:`omse.deploy.export.export_onnx`); its input shape is
            kept as exported, so a dynamic batch dimension stays dynamic.
        threads: ``INFERENCE_NUM_THREADS``, the number of threads the plugin computes with (>= 1).
        precision_hint: ``INFERENCE_PRECISION_HINT`` for the layers that compute in floating
            point: ``"f32"`` (use it to compare with omse's float32 simulation), ``"bf16"``,
            ``"f16"``, or ``None`` for the plugin's default (``bf16`` on CPUs with AMX or
            AVX512_BF16, ``f32`` otherwise). Integer (``u8``/``i8``) layers are not affected.
        performance_hint: ``"LATENCY"`` (one stream holding all threads: one synchronous request
            at a time, as :func:`run` and a per-batch latency benchmark issue them),
            ``"THROUGHPUT"`` or ``"CUMULATIVE_THROUGHPUT"`` (several streams, for several
            requests in flight).
        dynamic_quantization: whether the plugin may quantize the float input of a layer with
            compressed weights to int8 on the fly (``DYNAMIC_QUANTIZATION_GROUP_SIZE``). ``None``:
            off when ``precision_hint == "f32"``, the plugin's default (on) otherwise.

    Returns:
        an ``openvino.CompiledModel`` mapping float32 ``[N, *input_shape]`` to the model's
        outputs (``[N, classes]`` logits for omse's classifiers); see :func:`run`.

    Raises:
        ConfigError: a bad ``threads``, ``precision_hint`` or ``performance_hint``.
        OmseError: openvino is not installed, or the file is missing, unreadable or does not
            compile (the message names the file).
    """
    p = Path(path)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads={threads!r}: use a positive integer")
    if precision_hint is not None and precision_hint not in PRECISION_HINTS:
        raise ConfigError(
            f"precision_hint={precision_hint!r}: use one of {', '.join(PRECISION_HINTS)} or None"
        )
    if performance_hint not in PERFORMANCE_HINTS:
        raise ConfigError(
            f"performance_hint={performance_hint!r}: use one of {', '.join(PERFORMANCE_HINTS)}"
        )
    ov = _import_openvino(f"run the ONNX model {p} in OpenVINO")
    if not p.is_file():
        raise OmseError(f"ONNX model {p} not found (or not a file); cannot compile it in OpenVINO")
    config: dict[str, Any] = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": performance_hint,
    }
    if precision_hint is not None:
        config["INFERENCE_PRECISION_HINT"] = precision_hint
    if dynamic_quantization is None:
        dynamic_quantization = precision_hint != "f32"
    if dynamic_quantization is False:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    core = ov.Core()
    src = _with_int8_weights(p)
    try:
        try:
            model = core.read_model(str(src))
        except (RuntimeError, ValueError, OSError) as e:
            raise OmseError(
                f"OpenVINO cannot read the ONNX model {p} (corrupt, truncated or not ONNX?): "
                f"{_ov_message(e)}"
            ) from e
        try:
            return core.compile_model(model, "CPU", config)
        except (RuntimeError, ValueError, TypeError) as e:
            raise OmseError(
                f"OpenVINO's CPU plugin cannot compile the ONNX model {p}: {_ov_message(e)}"
            ) from e
    finally:
        if src != p:
            src.unlink(missing_ok=True)


def run(compiled: CompiledModel, x: np.ndarray) -> np.ndarray:
    """Run one batch through ``compiled`` (from :func:`compile_onnx`).

    Args:
        compiled: a compiled model with one input; any batch size its input shape admits (the
            exported dynamic ``batch`` dimension admits all), so one compiled model serves
            batches of 1, 32, ... in turn.
        x: the input batch ``[N, *input_shape]`` (e.g. ``[N, 1, 28, 28]``), converted to the
            model's input element type (float32) if needed.

    Returns:
        the first output ``[N, *output_shape]`` (``[N, 10]`` logits for the Fashion-MNIST zoo),
        a new array that later calls do not overwrite.

    Raises:
        OmseError: ``x`` does not fit the model's input shape, or inference fails.
    """
    ov = _import_openvino("run an OpenVINO model")
    port = compiled.input(0)
    dtype = port.get_element_type().to_dtype()
    arr = np.ascontiguousarray(np.asarray(x), dtype=dtype)
    want = port.get_partial_shape()
    if not want.compatible(ov.PartialShape(list(arr.shape))):
        raise OmseError(
            f"input of shape {tuple(arr.shape)} does not fit the model's input {want} "
            f"(name {port.any_name!r})"
        )
    try:
        request = compiled.create_infer_request()
        request.infer({0: arr})
        return np.array(request.get_output_tensor(0).data, copy=True)
    except RuntimeError as e:
        raise OmseError(
            f"OpenVINO inference failed on a batch of shape {tuple(arr.shape)}: {_ov_message(e)}"
        ) from e


def _rt(info: Any, key: str) -> str:
    return info[key].astype(str) if key in info else ""


def _is_integer(precision: str, primitive: str) -> bool:
    """Integer arithmetic: 8-bit integer inputs and an integer kernel. A weight-compressed layer
    (``i4``/``u8`` weights, kernel ``..._f32``/``..._bf16``) computes in floating point."""
    kernel = primitive.rsplit("_", 1)[-1].lower()
    return precision in _INTEGER and kernel not in _FLOAT


def precision_counts(compiled: CompiledModel) -> PrecisionReport:
    """Count the executed convolution-like layers of ``compiled`` by the precision they ran in.

    Reads ``compiled.get_runtime_model()``: each executed layer's runtime info has
    ``layerType`` (one of :data:`COMPUTE_LAYER_TYPES` is counted), ``runtimePrecision`` (``u8``
    or ``i8`` for integer inference, ``f32``/``bf16`` for float, ``i4`` for a fully-connected
    layer with compressed 4-bit weights and float activations), ``outputPrecisions`` and
    ``primitiveType`` (the kernel).

    Returns:
        ``{"counts": {layer_type: {precision: n}}, "float_layers": [name, ...],
        "layers": [LayerPrecision, ...]}``, e.g. ``counts == {"Convolution": {"u8": 20, "i8": 1},
        "FullyConnected": {"u8": 1}}`` for an ``int8``-container ResNet-20. ``float_layers``
        lists (in execution order) every counted layer that did not run in integer arithmetic,
        weight-compressed ones included.
    """
    counts: dict[str, Counter[str]] = {}
    layers: list[LayerPrecision] = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = _rt(info, "layerType")
        if layer_type not in COMPUTE_LAYER_TYPES:
            continue
        precision = _rt(info, "runtimePrecision")
        primitive = _rt(info, "primitiveType")
        counts.setdefault(layer_type, Counter())[precision] += 1
        layers.append(
            LayerPrecision(
                name=op.get_friendly_name(),
                layer_type=layer_type,
                precision=precision,
                output_precision=_rt(info, "outputPrecisions"),
                primitive=primitive,
                integer=_is_integer(precision, primitive),
            )
        )
    return PrecisionReport(
        counts={t: dict(c) for t, c in counts.items()},
        float_layers=[layer["name"] for layer in layers if not layer["integer"]],
        layers=layers,
    )
