"""ONNX in: a float ONNX model as a torch module that :func:`omse.quantize` quantizes.

:func:`load_onnx` takes a path or an ``onnx.ModelProto`` and returns the model as a
``torch.fx.GraphModule`` whose ONNX ``Conv``/``Gemm`` nodes are ``nn.Conv2d``/``nn.Linear``
modules (so the whole pipeline applies unchanged), with

- ``module.omse_io = {"input_names": [...], "output_names": [...], "dynamic_axes": {name:
  {axis: dim_name}}}`` read from the graph's inputs and outputs (a symbolic, unknown or ``-1``
  dimension is dynamic; an unnamed one is called ``<tensor>_dim<axis>``), ``"metadata"`` (the
  file's ``metadata_props``: class names, strides, image size) and ``"output_shapes"`` (one list
  per output, an int per static axis): what :func:`omse.export_onnx` needs to write the
  quantized model back with the same interface and metadata;
- ``module.omse_onnx``: an :class:`OnnxImport` (source, parity measured against onnxruntime,
  the weights that reach the graph through ``MatMul`` rather than a Conv/Gemm).

Steps: read (a missing or unreadable file, or an invalid model, is a :class:`ConfigError` naming
the file), copy (the user's ``ModelProto`` is never modified), ``Constant`` nodes holding tensors
become initializers (PaddleOCR exports keep every weight as a ``Constant``; the converter needs
initializers to build ``nn.Conv2d``), shape inference, a check that the converter knows every op
(an :class:`UnsupportedLayerError` listing each missing op and the nodes using it), conversion
(then two kinds of onnx2torch modules that an ONNX export would fix to the traced sizes are
replaced by the same math: opset-1..11 softmax by :class:`SoftmaxV1V11`, a ``Slice`` with
constant bounds by :class:`StaticSlice`), and, given a ``sample`` (:func:`omse.quantize` passes the first calibration batch), a parity check
against the float model in onnxruntime (CPU): a :class:`ConfigError` if the largest absolute
difference of any output exceeds ``rtol * (max - min)`` of that output (plus ``atol``).

Why a converter, and why ``onnx2torch``: omse's pipeline (BatchNorm folding, the statistics
passes, learned rounding, bias correction, the int8 plan) and its exporter work on torch modules;
quantizing natively on the ONNX graph would mean a second implementation of every one of them.
``onnx2torch`` (maintained, Apache-2.0, ~60 op families, opsets 9-17+) yields a plain
``fx.GraphModule`` that the pipeline already handles, and the round trip is checked numerically on
every import, so a converter mistake cannot pass unnoticed.

torchvision: ``onnx2torch`` imports it at import time, only for its ``NonMaxSuppression`` and
``RoiAlign`` converters. omse never installs torchvision (its PyPI build replaces the CPU torch),
so :func:`import_onnx2torch` imports ``onnx2torch`` with a stand-in ``torchvision`` module that is
in ``sys.modules`` only during that import; both converters are replaced by ones that raise
:class:`UnsupportedLayerError` (:data:`TORCHVISION_MESSAGE`), and the stand-in's ops raise the same
error if ever called. A ``torchvision`` the user imported before is left to ``onnx2torch`` as is.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from ..errors import CalibrationError, ConfigError, UnsupportedLayerError, first_line
from ..nn.ops import as_site

__all__ = [
    "OnnxImport",
    "SizedResize",
    "TORCHVISION_MESSAGE",
    "import_onnx2torch",
    "load_onnx",
    "read_onnx",
    "constants_to_initializers",
    "onnx_io",
    "metadata",
    "metadata_input_size",
    "INPUT_SIZE_KEYS",
    "matmul_constants",
    "onnx_outputs",
]

TORCHVISION_MESSAGE = (
    "NonMaxSuppression/RoiAlign need torchvision, which omse cannot install: remove these nodes "
    "(post-processing) from the graph before quantizing"
)
_TORCHVISION_OPS = ("NonMaxSuppression", "RoiAlign")
# the weight input of each op whose constant second operand is a layer's weight
_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


@dataclass
class OnnxImport:
    """What :func:`load_onnx` did. ``max_abs_diff``/``tolerance``: the parity check against
    onnxruntime (``None`` without a sample); ``matmul_weights``: ``{MatMul node: weight shape}``
    for weights the graph applies with ``MatMul`` (``torch.matmul`` on a constant after
    conversion, not an ``nn.Linear``); ``matmul_fraction``: their share of all weight elements
    (Conv, ConvTranspose, Gemm, MatMul)."""

    source: str
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    constants_moved: int = 0
    max_abs_diff: float | None = None
    tolerance: float | None = None
    matmul_weights: dict[str, tuple[int, ...]] = field(default_factory=dict)
    matmul_fraction: float = 0.0


# -- onnx2torch with a torchvision stand-in -------------------------------------------------------
def _refuse(*args: Any, **kwargs: Any):
    raise UnsupportedLayerError(TORCHVISION_MESSAGE)


def _standin() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    tv.__doc__ = "omse's stand-in for torchvision while onnx2torch is imported (not torchvision)"
    ops = types.ModuleType("torchvision.ops")
    for name in ("nms", "batched_nms", "box_convert", "roi_align"):
        setattr(ops, name, _refuse)
    tv.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": tv, "torchvision.ops": ops}


def import_onnx2torch() -> types.ModuleType:
    """Import ``onnx2torch`` (see the module docstring: a stand-in ``torchvision`` only during
    the import, unless the user imported torchvision already). Raises :class:`ConfigError` if it
    is not installed."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"]
    own = "torchvision" not in sys.modules
    fakes = _standin() if own else {}
    sys.modules.update(fakes)
    try:
        mod = importlib.import_module("onnx2torch")
    except ImportError as e:
        raise ConfigError(
            f"ONNX models need onnx2torch ({e}); install it without its torchvision dependency: "
            "pip install --no-deps onnx2torch==1.5.15 (make install does)"
        ) from e
    finally:
        for name, m in fakes.items():
            if sys.modules.get(name) is m:
                del sys.modules[name]
    if own:
        from onnx2torch.node_converters import registry

        for desc in list(registry._CONVERTER_REGISTRY):
            if desc.operation_type in _TORCHVISION_OPS:
                registry._CONVERTER_REGISTRY[desc] = _refuse
    return mod


# -- reading and preparing -------------------------------------------------------------------------
def read_onnx(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """``(a copy of the model, its description for messages)``; checked with the ONNX checker.

    Raises :class:`ConfigError` for a missing file, a file that is not ONNX, or an invalid model.
    """
    if isinstance(model, onnx.ModelProto):
        proto, src = onnx.ModelProto(), "the ONNX ModelProto"
        proto.CopyFrom(model)
    elif isinstance(model, str | os.PathLike):
        path = Path(model)
        src = str(path)
        if not path.is_file():
            raise ConfigError(f"ONNX model {path} does not exist (or is not a file)")
        try:
            proto = onnx.load(path)
        except Exception as e:  # protobuf DecodeError, external data missing, ...
            first = first_line(e, 200)
            raise ConfigError(f"{path} is not a readable ONNX model: {first}") from e
    else:
        raise ConfigError(
            f"an ONNX model is a path or an onnx.ModelProto, got {type(model).__name__}"
        )
    if not proto.graph.node:
        raise ConfigError(f"{src} is not a usable ONNX model: its graph has no nodes")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        first = first_line(e)
        raise ConfigError(f"{src} is not a valid ONNX model: {first}") from e
    return proto, src


_ATTR_DTYPES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn the main graph's ``Constant`` nodes holding a tensor or numbers into initializers of
    the same name, in place; returns how many. String, sparse and graph-output constants stay."""
    g = model.graph
    outputs = {o.name for o in g.output}
    keep, moved = [], 0
    for node in g.node:
        attr = node.attribute[0] if node.op_type == "Constant" and node.attribute else None
        if (
            node.domain not in ("", "ai.onnx")
            or attr is None
            or node.output[0] in outputs
            or (attr.name != "value" and attr.name not in _ATTR_DTYPES)
        ):
            keep.append(node)
            continue
        value = helper.get_attribute_value(attr)
        arr = (
            numpy_helper.to_array(value)
            if attr.name == "value"
            else np.asarray(value, dtype=_ATTR_DTYPES[attr.name])
        )
        g.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        moved += 1
    del g.node[:]
    g.node.extend(keep)
    return moved


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    shape = vi.type.tensor_type.shape
    out: list[int | str | None] = []
    for d in shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or None)
    return out


def onnx_io(model: onnx.ModelProto) -> dict[str, Any]:
    """``{"input_names", "output_names", "dynamic_axes", "shapes"}`` of the graph (initializers
    listed as inputs are not inputs). ``shapes[name]``: one entry per axis, an int when static,
    else the dimension's name (``None`` if unnamed)."""
    inits = {i.name for i in model.graph.initializer}
    ins = [v for v in model.graph.input if v.name not in inits]
    io: dict[str, Any] = {
        "input_names": [v.name for v in ins],
        "output_names": [v.name for v in model.graph.output],
        "dynamic_axes": {},
        "shapes": {},
    }
    for v in [*ins, *model.graph.output]:
        dims = _dims(v)
        io["shapes"][v.name] = dims
        dyn = {
            a: (d if isinstance(d, str) else f"{v.name}_dim{a}")
            for a, d in enumerate(dims)
            if not isinstance(d, int)
        }
        if dyn:
            io["dynamic_axes"][v.name] = dyn
    return io


INPUT_SIZE_KEYS = ("imgsz", "img_size", "image_size", "input_size", "input_shape")
"""``metadata_props`` keys that name a model's image size, in the order they are read
(Ultralytics writes ``imgsz`` as ``"[320, 320]"``; the others are common in other exporters)."""


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (in file order)."""
    return {p.key: p.value for p in model.metadata_props}


def _size_from_ints(v: list[int]) -> tuple[int, int] | None:
    """``(H, W)`` from a metadata value's integers: ``[S]`` (square), ``[H, W]``, ``[C, H, W]``
    / ``[H, W, C]`` and ``[N, C, H, W]`` / ``[N, H, W, C]`` (``C`` of 1 or 3 tells the layout; a
    ``-1``/``0`` batch is allowed); None when they name no positive size unambiguously."""
    if len(v) == 4:
        v = v[1:]
    if len(v) == 3:
        channels_first, channels_last = v[0] in (1, 3), v[2] in (1, 3)
        if channels_first == channels_last:
            return None
        v = v[1:] if channels_first else v[:2]
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or min(v) < 1:
        return None
    return v[0], v[1]


def metadata_input_size(model: onnx.ModelProto) -> tuple[str, str, tuple[int, int] | None] | None:
    """The image size the model's ``metadata_props`` name: ``(key, value, (H, W))`` for the first
    key of :data:`INPUT_SIZE_KEYS` present (compared without case), with ``(H, W)`` None when the
    value is no size (see :func:`_size_from_ints`); None when no such key is there."""
    found = {k.lower(): (k, v) for k, v in metadata(model).items()}
    for key in INPUT_SIZE_KEYS:
        if key in found:
            k, v = found[key]
            return k, v, _size_from_ints([int(t) for t in re.findall(r"-?\d+", v)])
    return None


def _unranked(model: onnx.ModelProto) -> set[str]:
    """Node outputs that shape inference left without a rank."""
    ranked = {
        v.name
        for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }
    return {o for n in model.graph.node for o in n.output if o and o not in ranked}


def _fill_ranks(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> int:
    """Give the tensors that shape inference left unranked (a ``Reshape`` to a computed shape,
    as PaddleOCR's recognizer has) their rank, read from one onnxruntime run of a copy that
    outputs them, on ``feeds``; only the rank is kept (every dimension stays unknown), so the
    converted module is not tied to the sample's size. Returns how many; on any failure, none
    (the conversion then names the node that needs a rank)."""
    missing = sorted(_unranked(model))
    if not missing:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in missing)
    try:
        values = onnx_outputs(probe, feeds)[len(model.graph.output) :]
    except Exception:
        return 0
    for name, v in zip(missing, values):
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
        model.graph.value_info.append(
            helper.make_tensor_value_info(name, elem, [None] * np.ndim(v))
        )
    return len(missing)


def _weight_elements(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], int]:
    """``({MatMul node: weight shape}, elements of every Conv/ConvTranspose/Gemm/MatMul
    weight)`` over the initializers that are those ops' weight operand."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    mm: dict[str, tuple[int, ...]] = {}
    total = 0
    for k, node in enumerate(model.graph.node):
        pos = _WEIGHT_OPS.get(node.op_type)
        if pos is None or len(node.input) <= pos:
            continue
        shape = inits.get(node.input[pos])
        if node.op_type == "MatMul" and shape is None and node.input[0] in inits:
            shape = inits[node.input[0]]  # constant @ activation
        if shape is None or len(shape) < 2:
            continue
        total += int(np.prod(shape))
        if node.op_type == "MatMul":
            mm[node.name or f"MatMul_{k}"] = shape
    return mm, total


def _check_ops(model: onnx.ModelProto, src: str) -> None:
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[str, list[str]] = {}
    for k, node in enumerate(model.graph.node):
        domain = node.domain or ""
        if domain == "ai.onnx":
            domain = ""
        try:
            get_converter(domain=domain, operation_type=node.op_type, version=opsets.get(domain, 1))
        except NotImplementedError:
            key = f"{node.op_type} (domain {domain!r}, opset {opsets.get(domain)})"
            missing.setdefault(key, []).append(node.name or f"#{k}")
    tv = [k for k in missing if k.split()[0] in _TORCHVISION_OPS]
    if tv:
        raise UnsupportedLayerError(f"{src}: {TORCHVISION_MESSAGE} (nodes {missing[tv[0]][:5]})")
    if missing:
        listed = "; ".join(f"{op}: nodes {', '.join(n[:5])}" for op, n in missing.items())
        raise UnsupportedLayerError(
            f"{src} has ops omse's ONNX converter (onnx2torch) lacks: {listed}. Export the model "
            "without them (e.g. a lower opset, or post-processing cut off) or quantize the "
            "PyTorch model instead"
        )


def _convert(onnx2torch: types.ModuleType, model: onnx.ModelProto, src: str) -> nn.Module:
    """``onnx2torch.convert`` with every converter's failure naming its node."""
    from unittest import mock

    from onnx2torch import converter as conv_mod
    from onnx2torch.node_converters import get_converter

    def named(**kw):
        conv = get_converter(**kw)

        def run(node, graph):
            try:
                return conv(node, graph)
            except UnsupportedLayerError as e:
                raise UnsupportedLayerError(f"{src}: node {node.name!r}: {e}") from e
            except Exception as e:
                raise UnsupportedLayerError(
                    f"{src}: onnx2torch cannot convert node {node.name!r} (op {kw['operation_type']}"
                    f", opset {kw['version']}): {type(e).__name__}: {str(e)[:200]}"
                ) from e

        return run

    names = onnx_io(model)["input_names"]
    keep_names = all(n.isidentifier() and not n.startswith("_") for n in names)
    with mock.patch.object(conv_mod, "get_converter", named):
        return onnx2torch.convert(model, save_input_names=keep_names)


# -- parity ----------------------------------------------------------------------------------------
def _feeds(sample: Any, names: list[str]) -> dict[str, torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        sample = [sample]
    if isinstance(sample, dict):
        feeds = dict(sample)
    elif isinstance(sample, list | tuple):
        feeds = dict(zip(names, sample))
    else:
        raise CalibrationError(
            f"the sample for an ONNX model is a tensor, a tuple or a dict by input name, got "
            f"{type(sample).__name__}"
        )
    if sorted(feeds) != sorted(names):
        raise CalibrationError(
            f"the ONNX model's inputs are {names}; the sample gives {sorted(feeds)}"
        )
    return feeds


def onnx_outputs(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (CPU, all graph optimizations off: the reference)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})


def _torch_outputs(module: nn.Module, feeds: dict[str, torch.Tensor], names: list[str]) -> list:
    with torch.no_grad():
        out = module(*[feeds[n] for n in names])
    outs = list(out) if isinstance(out, list | tuple) else [out]
    return [o.detach().cpu().numpy() for o in outs]


def _parity(
    module: nn.Module,
    model: onnx.ModelProto,
    src: str,
    feeds: dict[str, torch.Tensor],
    names: list[str],
    rtol: float,
    atol: float,
) -> tuple[float, float]:
    try:
        ref = onnx_outputs(model, feeds)
    except Exception as e:
        first = first_line(e)
        raise CalibrationError(
            f"{src} does not run in onnxruntime on the sample "
            f"({ {k: tuple(v.shape) for k, v in feeds.items()} }): {first}"
        ) from e
    try:
        got = _torch_outputs(module, feeds, names)
    except Exception as e:
        first = first_line(e)
        raise ConfigError(f"the module converted from {src} fails on the sample: {first}") from e
    if len(got) != len(ref):
        raise ConfigError(
            f"the module converted from {src} returns {len(got)} outputs, the ONNX model {len(ref)}"
        )
    worst, worst_tol = 0.0, 0.0
    for k, (r, g) in enumerate(zip(ref, got)):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            raise ConfigError(
                f"output {k} of the module converted from {src} has shape {g.shape}, "
                f"onnxruntime's {r.shape}"
            )
        tol = atol + rtol * float(r.max() - r.min()) if r.size else atol
        diff = float(np.abs(r - g).max()) if r.size else 0.0
        if not diff <= tol:  # also NaN
            raise ConfigError(
                f"the module converted from {src} differs from onnxruntime on output {k}: max "
                f"abs difference {diff:.3g} > tolerance {tol:.3g}; the converter (onnx2torch) "
                "mis-translates an op of this model: report it, or quantize the PyTorch model"
            )
        if diff / tol >= worst / max(worst_tol, 1e-30):
            worst, worst_tol = diff, tol
    return worst, worst_tol


# -- converted modules that fix shapes ----------------------------------------------------------
class SoftmaxV1V11(nn.Module):
    """ONNX ``Softmax``/``LogSoftmax`` of opsets 1-11: the input flattened to 2-D at ``axis``,
    softmax over the second dimension, reshaped back. The same math as onnx2torch's
    ``OnnxSoftmaxV1V11``, whose ``reshape(result, input.shape)`` an ONNX export records with the
    traced sizes as constants (the graph then refuses another batch size: "Reshape ... requested
    shape"); here the last-axis case (every recognizer's) is a plain softmax and the others reshape
    with ``reshape_as``, which exports as ``Shape -> Reshape``. ``[*] -> [*]``."""

    def __init__(self, axis: int, is_log: bool):
        super().__init__()
        self.axis, self.is_log = axis, is_log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = torch.log_softmax if self.is_log else torch.softmax
        if self.axis in (-1, x.dim() - 1):
            return fn(x, -1)
        return fn(torch.flatten(x, start_dim=self.axis), -1).reshape_as(x)


def _dynamic_softmax(module: nn.Module) -> int:
    """Replace onnx2torch's opset-1..11 softmax modules by :class:`SoftmaxV1V11` (in place);
    returns how many."""
    n = 0
    for name, sub in list(module.named_modules()):
        if type(sub).__name__ == "OnnxSoftmaxV1V11" and name:
            owner, _, attr = name.rpartition(".")
            setattr(
                module.get_submodule(owner) if owner else module,
                attr,
                SoftmaxV1V11(sub.axis, sub.is_log),
            )
            n += 1
    return n


class SizedResize(nn.Module):
    """ONNX ``Resize`` (opset 11+) to ``sizes`` computed in the graph (``Resize(x, roi, scales,
    Concat(Slice(Shape(x)), Shape(skip)[2:]))``: FPN and U-Net necks upsampling to a skip
    connection's size, ``F.interpolate(u, size=a.shape[-2:])``), with the same math as
    onnx2torch's ``OnnxResize``, which it wraps.

    Why: ``OnnxResize`` reads ``sizes.tolist()``; the TorchScript exporter records those Python
    ints as constants, so the exported graph resizes to the traced size whatever the input
    (onnxruntime then fails at any other size: "Concat ... Non concat axis dimensions must
    match"). Under ``torch.onnx.export`` this module emits one ``Resize`` node that takes the
    ``sizes`` tensor itself (the shape arithmetic before it stays in the graph), with the
    attributes the exporter writes for the ``F.interpolate`` that ``OnnxResize`` runs (nearest:
    ``asymmetric``/``floor``; linear and cubic: ``pytorch_half_pixel``, or ``align_corners``), so
    the exported graph computes what the module does. Constant ``scales`` and eager calls go to
    ``OnnxResize`` unchanged. ``[N, C, *S] -> [N, C, *sizes[2:]]``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def _onnx_attrs(self) -> dict[str, Any]:
        mode = self.inner.onnx_mode
        if mode == "nearest":
            return {"mode_s": "nearest", "coordinate_transformation_mode_s": "asymmetric",
                    "nearest_mode_s": "floor"}  # fmt: skip
        ctm = "align_corners" if self.inner.align_corners else "pytorch_half_pixel"
        return {"mode_s": mode, "coordinate_transformation_mode_s": ctm, "cubic_coeff_a_f": -0.75}

    def forward(
        self,
        input_tensor: torch.Tensor,
        roi: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def run() -> torch.Tensor:
            return self.inner(input_tensor, roi, scales, sizes)

        if sizes is None or sizes.nelement() == 0 or not torch.onnx.is_in_onnx_export():
            return run()
        from onnx2torch.utils.custom_export_to_onnx import DefaultExportToOnnx

        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # the values only: the node below is the graph's
        try:
            with torch.no_grad(), torch._C.DisableTorchFunction():  # no op site: see below
                y = run()
        finally:
            torch._C._set_tracing_state(state)

        empty = torch.zeros(0, dtype=torch.float32)
        out = DefaultExportToOnnx.export(
            lambda: y.detach(),
            "Resize",
            input_tensor,
            empty,
            empty,
            sizes.long(),
            self._onnx_attrs(),
        )
        # the op site the eager forward's interpolate is (target="int8"), on the graph's node
        return as_site(F.interpolate, (input_tensor,), {"mode": self.inner.onnx_mode}, out)


def _sized_resizes(module: nn.Module) -> int:
    """Wrap each onnx2torch ``OnnxResize`` of ``module`` in :class:`SizedResize` (in place);
    returns how many."""
    n = 0
    for name, sub in list(module.named_modules()):
        owner, _, attr = name.rpartition(".")
        parent = module.get_submodule(owner) if owner else module
        if type(sub).__name__ == "OnnxResize" and name and not isinstance(parent, SizedResize):
            setattr(parent, attr, SizedResize(sub))
            n += 1
    return n


def _ints(item: Any) -> Any:
    """One index item with Python ints in place of onnx2torch's 0-d tensors / numpy ints."""
    if not isinstance(item, slice):
        return item  # Ellipsis
    return slice(*(None if v is None else int(v) for v in (item.start, item.stop, item.step)))


class StaticSlice(nn.Module):
    """ONNX ``Slice`` (opset 10+) whose ``starts``/``ends``/``axes``/``steps`` are constants, as
    Python-int indexing: the slices that onnx2torch's ``OnnxSlice`` computes from those tensors on
    every call, computed once (the same numbers, the same flips and indexing).

    Why: ``OnnxSlice`` takes them as tensor inputs (initializer buffers). The TorchScript
    exporter's per-node shape inference sees them as graph inputs without values, so the length of
    ``Slice(Shape(x))`` is unknown, and so is the rank of a ``Reshape`` to ``Concat(...,
    Slice(Shape(x)), ...)``. The exporter fills that gap with the sizes recorded at trace time;
    the Reshape's output then counts as static and every later ``Shape`` of it is folded into a
    constant (PP-OCRv4's recognizer: ``[0, 20, 3, 8, 15]``, width 160, with or without constant
    folding). Python-int slices export as a ``Slice`` of known length: the rank is inferred, the
    sizes stay symbolic. ``[*] -> [*]``."""

    def __init__(self, flip_dims: list[int], index: tuple, neg_index: tuple):
        super().__init__()
        self.flip_dims, self.index, self.neg_index = flip_dims, index, neg_index

    @classmethod
    def from_tensors(cls, starts, ends, axes=None, steps=None) -> StaticSlice:
        """From ``OnnxSlice``'s inputs (1-D tensors), by onnx2torch's own ``_get_slices``."""
        from onnx2torch.node_converters.slice import _get_slices

        flip, pos, neg = _get_slices(starts, ends, axes, steps)
        return cls([int(d) for d in flip], tuple(map(_ints, pos)), tuple(map(_ints, neg)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_dims:
            x = torch.flip(x, dims=self.flip_dims)
        if self.index:
            x = x[self.index]
        if self.neg_index:
            x = x[self.neg_index]
        return x

    def extra_repr(self) -> str:
        return f"flip_dims={self.flip_dims}, index={self.index}, neg_index={self.neg_index}"


def _attr(module: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _static_slices(module: nn.Module) -> int:
    """Replace each onnx2torch ``OnnxSlice`` of ``module`` (an fx graph) whose ``starts``/
    ``ends``/``axes``/``steps`` are all initializers by :class:`StaticSlice` (in place; the node
    keeps only its data input); returns how many. A slice with a computed bound stays."""
    graph = getattr(module, "graph", None)
    if not isinstance(module, torch.fx.GraphModule) or graph is None:
        return 0
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or node.kwargs or len(node.args) < 3:
            continue
        sub = module.get_submodule(node.target)
        bounds = node.args[1:]
        if type(sub).__name__ != "OnnxSlice" or not all(
            isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in bounds
        ):
            continue
        owner, _, attr = node.target.rpartition(".")
        new = StaticSlice.from_tensors(*(_attr(module, a.target) for a in bounds))
        setattr(module.get_submodule(owner) if owner else module, attr, new)
        node.args = node.args[:1]
        for a in bounds:
            if not a.users:
                graph.erase_node(a)
        n += 1
    if n:
        graph.lint()
        module.recompile()
    return n


# -- the entry point -------------------------------------------------------------------------------
def load_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    sample: Any = None,
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> nn.Module:
    """A float ONNX model as a torch module (``torch.fx.GraphModule``, in eval mode).

    Args:
        model: an ``.onnx`` path or an ``onnx.ModelProto`` (never modified).
        sample: an input batch to check the conversion on: a tensor (e.g. ``(N, C, H, W)``
            float32 images for an image model), a tuple in the graph's input order, or a dict by
            input name; ``None`` skips the check.
        rtol: the parity tolerance relative to each reference output's range: an output may
            differ by ``atol + rtol * (max - min)`` (float32 summation order alone moves a deep
            recognizer's softmax by ~1.2e-4 of its range: measured on PP-OCRv4's).
        atol: the absolute part of the parity tolerance.

    Returns:
        the module, with ``omse_io`` and ``omse_onnx`` (:class:`OnnxImport`) attributes (see the
        module docstring). It takes the graph's inputs positionally (and by name when every name
        is a Python identifier).

    Raises:
        ConfigError: missing/unreadable/invalid file, or a conversion that does not match
            onnxruntime on ``sample``.
        UnsupportedLayerError: an op the converter lacks (each op and its nodes named), or a
            ``NonMaxSuppression``/``RoiAlign`` node (:data:`TORCHVISION_MESSAGE`).
        CalibrationError: the ONNX model does not run on ``sample``.
    """
    onnx2torch = import_onnx2torch()
    proto, src = read_onnx(model)
    moved = constants_to_initializers(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as e:  # an inconsistent graph (the checker does not infer shapes)
        first = first_line(e)
        raise ConfigError(f"{src}: ONNX shape inference fails: {first}") from e
    io = onnx_io(proto)
    _check_ops(proto, src)
    feeds = None if sample is None else _feeds(sample, io["input_names"])
    if feeds is not None:
        _fill_ranks(proto, feeds)
    module = _convert(onnx2torch, proto, src).eval()
    _dynamic_softmax(module)
    _static_slices(module)
    _sized_resizes(module)
    mm, total = _weight_elements(proto)
    info = OnnxImport(
        source=src,
        input_names=io["input_names"],
        output_names=io["output_names"],
        dynamic_axes=io["dynamic_axes"],
        constants_moved=moved,
        matmul_weights=mm,
        matmul_fraction=sum(int(np.prod(s)) for s in mm.values()) / total if total else 0.0,
    )
    if feeds is not None:
        info.max_abs_diff, info.tolerance = _parity(
            module, proto, src, feeds, io["input_names"], rtol, atol
        )
    module.omse_io = {k: io[k] for k in ("input_names", "output_names", "dynamic_axes")}
    module.omse_io["metadata"] = metadata(proto)
    module.omse_io["output_shapes"] = [io["shapes"][n] for n in io["output_names"]]
    module.omse_onnx = info
    return module


def matmul_constants(module: nn.Module) -> list[str]:
    """The converted ``MatMul`` modules of ``module`` (an fx graph from :func:`load_onnx`) that
    still multiply by a constant (an initializer buffer): weights that no Conv/Linear holds, so
    the pipeline leaves them in float unless a transform wraps them."""
    graph = getattr(module, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return []
    out = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        try:
            sub = module.get_submodule(node.target)
        except AttributeError:
            continue
        if type(sub).__name__ == "OnnxMatMul" and any(
            getattr(a, "op", None) == "get_attr" for a in node.args
        ):
            out.append(node.target)
    return out
