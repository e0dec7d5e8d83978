"""omse beside its peers: same models, calibration data, metric and run.

For every model and setting (W4A32, W4A8, W4A4 and W8A8 as reference) this runs

- omse: kernel-wise MMSE weights, MMSE per-tensor activations (``QuantConfig(W, A)``); the same
  with bias correction (``mmse+bc``: no extra MACs, like every peer recipe); and the default 4-bit
  recipe ``QuantConfig(W, A, extra_mac_budget=0.10, bias_correction=True)`` (``mmse+res10+bc``:
  residual tensors on at most 10% extra integer MACs);
- Brevitas (a) ``ptq-mse``: MSE scales for per-channel weights and per-tensor activations on every
  Conv/Linear input (Brevitas' ``layerwise`` backend, the one that quantizes what omse quantizes),
  (b) ``best``: graph equalization (20 iterations, merge bias) + the same quantizers + GPTQ (act
  order) + bias correction, the strongest recipe of its ImageNet PTQ example that runs here;
- NNCF (a) ``ptq-histogram``: ``nncf.quantize`` with per-channel abs-max weights and the
  HISTOGRAM (quantization-error minimising) activation range estimator, bias correction off,
  (b) ``best``: the same + SmoothQuant on convolutions + fast bias correction; and for W4A32 its
  ``compress_weights(INT4_SYM)`` weight-only mode, to show what it does to Conv2d;
- AIMET (a) ``ptq-tf-enhanced``: BN folding + QuantSim (tf_enhanced, per-channel weights),
  (b) ``best``: cross-layer equalization + AdaRound + QuantSim, if ``aimet_torch`` imports.

Every tool gets the same float model. EfficientNet-Lite0 is first converted by
``benchmarks/lite0_fx.py`` into an equivalent ``torch.fx``-traceable copy (plain ``nn.Conv2d`` with
explicit ``nn.ZeroPad2d`` for asymmetric SAME padding, one ReLU6 module per use) whose logits are
checked to be identical; omse quantizes that same copy. The metric is top-1 agreement with the FP32
model (plus labelled top-1 and mean KL(FP32 || quantized)) from ``omse.analysis.metrics``.

What a tool refuses (an exception, or a graph that does not hold what was asked for) is recorded
in the row's ``refused`` field, never replaced by a different setting without saying so.

Usage::

    python benchmarks/peers.py                      # everything (long: run with nohup)
    python benchmarks/peers.py --quick --models fmnist-resnet20 --settings W4A8
    python benchmarks/peers.py --tools omse,brevitas --resume

Optional extra (pyproject ``bench``): ``brevitas==0.13.4``, ``nncf==3.4.0``; NNCF's TORCH_FX backend
needs ``torchao`` (its 4-bit path is broken there, see the notes), AIMET needs ``aimet-torch`` whose
import requires ``torchvision`` (see ``load_aimet``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# NNCF compiles a C++ extension on first use; on a busy 2-core machine that takes ~100 s, longer
# than its default 60 s load timeout (after which it leaves a stale lock file behind).
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

SETTINGS: dict[str, tuple[int, int | None]] = {
    "W4A32": (4, None),
    "W4A8": (4, 8),
    "W4A4": (4, 4),
    "W8A8": (8, 8),
}
MODELS = ("fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg", "efficientnet-lite0")
TOOLS = ("omse", "brevitas", "nncf", "aimet")


def setting_name(wb: int, ab: int | None) -> str:
    return f"W{wb}A{ab or 32}"


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        mod = sys.modules.get(dist.replace("-", "_"))
        return getattr(mod, "__version__", None)


class Refused(Exception):
    """The tool declined the requested setting (message says exactly what and where)."""


# ---------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One model with its calibration batches and evaluation set, preprocessed once."""

    name: str
    model: nn.Module  # the float model every tool receives (adapted copy for Lite0)
    calib: list[torch.Tensor]
    inputs: torch.Tensor
    labels: torch.Tensor | None
    ref: torch.Tensor = field(default=None)  # type: ignore[assignment]
    eval_batch: int = 50
    original: nn.Module | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ref is None:
            self.ref = self.predict(self.model)

    def predict(self, model: nn.Module) -> torch.Tensor:
        from omse.analysis.metrics import predict

        return predict(model, self.inputs, batch_size=self.eval_batch)

    @property
    def n_calib(self) -> int:
        return sum(int(b.shape[0]) for b in self.calib)

    @property
    def example(self) -> torch.Tensor:
        return self.calib[0][:1]


def load_workload(name: str, quick: bool = False) -> Workload | None:
    """The model ``name`` with its data, or None if its weights do not exist yet."""
    from omse.errors import CheckpointError

    if name == "efficientnet-lite0":
        from lite0_fx import check_equivalent, traceable_lite0

        from omse.zoo.tasks import get_task

        task = get_task(name)
        original = task.build()
        n_views, n_calib = (40, 8) if quick else (200, 32)
        views, labels = task.evaluation(n_views)  # preprocessed
        calib = task.calibration(n_calib)
        adapted = traceable_lite0(original)
        diff = check_equivalent(original, adapted, calib[:8])
        wl = Workload(
            name,
            adapted,
            list(calib.split(8)),
            views,
            labels,
            eval_batch=50,
            original=original,
        )
        full = wl.predict(original)
        wl.notes = {
            "eval": f"{n_views} views of the 20 foolbox ImageNet images",
            "calibration": f"{n_calib} images from scikit-image/matplotlib (disjoint from eval)",
            "adapter": "benchmarks/lite0_fx.py traceable copy used by every tool, omse included",
            "adapter_max_abs_diff_calib": diff,
            "adapter_max_abs_diff_eval": float((full - wl.ref).abs().max()),
        }
        return wl
    from omse.zoo.tasks import get_task

    task = get_task(name)
    try:
        model = task.build()
    except CheckpointError as e:
        print(f"[skip] {name}: {e}", flush=True)
        return None
    n_test, n_calib = (1000, 64) if quick else (10000, 256)
    x_test, y_test = task.evaluation(n_test)
    wl = Workload(
        name,
        model,
        list(task.calibration(n_calib).split(32)),
        x_test,
        y_test,
        eval_batch=1000,
    )
    wl.notes = {
        "eval": f"first {n_test} Fashion-MNIST test images",
        "calibration": f"first {n_calib} Fashion-MNIST train images",
    }
    return wl


# ---------------------------------------------------------------------------------------------
# rows and the harness
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    tool: str
    version: str | None
    config: str
    model: str
    weight_bits: int
    act_bits: int | None
    agreement: float | None = None
    top1: float | None = None
    kl: float | None = None
    calib_seconds: float | None = None
    eval_seconds: float | None = None
    refused: str | None = None
    notes: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    n_eval: int = 0
    n_calib: int = 0
    threads: int = 0

    @property
    def key(self) -> tuple:
        return (self.tool, self.config, self.model, self.weight_bits, self.act_bits)

    @property
    def setting(self) -> str:
        return setting_name(self.weight_bits, self.act_bits)


@dataclass
class Outcome:
    """What a runner returns: the quantized model (None if refused), its exact configuration,
    notes, and optionally a partial refusal (the model ran but not as asked)."""

    model: nn.Module | None
    kwargs: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    refused: str | None = None
    extra_seconds: float = 0.0  # shared preparation done once for several settings


Runner = Callable[[Workload, int, int | None, dict], Outcome]


def _short(e: BaseException, n: int = 600) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}"


def evaluate(
    wl: Workload,
    tool: str,
    ver: str | None,
    config: str,
    runner: Runner,
    wb: int,
    ab: int | None,
    cache: dict,
    log: Callable[[str], None] = print,
) -> Row:
    from omse.analysis.metrics import compare_logits

    row = Row(
        tool,
        ver,
        config,
        wl.name,
        wb,
        ab,
        n_eval=int(wl.inputs.shape[0]),
        n_calib=wl.n_calib,
        threads=torch.get_num_threads(),
    )
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = runner(wl, wb, ab, cache)
    except Refused as e:
        row.refused = str(e)
        row.calib_seconds = round(time.perf_counter() - t0, 2)
        log(f"  {tool:8s} {config:22s} {row.setting:6s} REFUSED: {row.refused[:160]}")
        return row
    except Exception as e:  # a crash is reported as such, not hidden
        row.refused = "failed: " + _short(e)
        row.notes = traceback.format_exc(limit=3)[-800:]
        row.calib_seconds = round(time.perf_counter() - t0, 2)
        log(f"  {tool:8s} {config:22s} {row.setting:6s} FAILED: {row.refused[:200]}")
        return row
    row.calib_seconds = round(time.perf_counter() - t0 + out.extra_seconds, 2)
    row.kwargs = out.kwargs
    row.notes = "; ".join(out.notes)
    row.refused = out.refused
    if out.model is not None:
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = wl.predict(out.model.eval())
        row.eval_seconds = round(time.perf_counter() - t1, 2)
        a = compare_logits(wl.ref, logits, wl.labels)
        row.agreement, row.kl, row.top1 = a.agreement, a.kl, a.top1
    del out
    mark = f" [{row.refused[:100]}]" if row.refused else ""
    agree = "-" if row.agreement is None else f"{row.agreement:6.1%}"
    log(
        f"  {tool:8s} {config:22s} {row.setting:6s} agreement {agree} "
        f"calib {row.calib_seconds:.1f}s{mark}"
    )
    return row


# ---------------------------------------------------------------------------------------------
# omse
# ---------------------------------------------------------------------------------------------


def run_omse(
    budget: float | None = None, on_original: bool = False, bias_correction: bool = False
) -> Runner:
    def runner(wl: Workload, wb: int, ab: int | None, cache: dict) -> Outcome:
        from omse.config import QuantConfig
        from omse.errors import ConfigError
        from omse.transforms.pipeline import Calibration, quantize

        kwargs: dict[str, Any] = {"weight_bits": wb, "act_bits": ab}
        if budget is not None:
            kwargs["extra_mac_budget"] = budget
        if bias_correction:
            kwargs["bias_correction"] = True
        try:
            cfg = QuantConfig.preset("fast", **kwargs)
        except (ConfigError, TypeError) as e:
            raise Refused("omse option not available: " + _short(e)) from None
        model = wl.original if on_original else wl.model
        if model is None:
            raise Refused("no original model for this workload")
        cal = Calibration()
        try:
            q = quantize(model, wl.calib, cfg, calibration=cal)
        except (ConfigError, NotImplementedError, ImportError) as e:
            raise Refused("omse option not available: " + _short(e)) from None
        n = sum(1 for m in q.modules() if type(m).__name__ == "QuantizedLayer")
        notes = [f"{n} Conv/Linear layers quantized, BN folded ({len(cal.folded)})"]
        if cal.left_float:
            notes.append("left float: " + ", ".join(cal.left_float))
        if on_original:
            notes.append("on the original (unadapted) EfficientNet-Lite0 module")
        return Outcome(q, {"QuantConfig": cfg.to_dict(), "fold_bn": True}, notes)

    return runner


# ---------------------------------------------------------------------------------------------
# Brevitas
# ---------------------------------------------------------------------------------------------


def _brevitas_quant_maps(wb: int, ab: int | None) -> tuple[dict, dict]:
    from brevitas_examples.imagenet_classification.ptq.ptq_common import create_quant_maps

    kw = {
        "dtype": torch.float32,
        "bias_bit_width": None,
        "weight_bit_width": wb,
        "weight_param_method": "mse",
        "weight_scale_type": "float_scale",
        "weight_quant_type": "sym",
        "weight_quant_granularity": "per_channel",
        "weight_narrow_range": False,
        "weight_quant_format": "int",
        "act_quant_format": "int",
        "act_bit_width": ab,
        "act_scale_type": "float_scale",
        "act_scale_computation_type": "static",
        "act_param_method": "mse",
        "act_quant_type": "sym",
        "act_quant_granularity": "per_tensor",
        "act_quant_percentile": 99.999,
    }
    _, layerwise_map, _, _ = create_quant_maps(**kw)
    shown = {k: (str(v) if k == "dtype" else v) for k, v in kw.items()}
    return layerwise_map, shown


def run_brevitas(best: bool) -> Runner:
    """Brevitas on the float model, quantizing the input and weight of every Conv/Linear.

    ``best`` follows the order of Brevitas' ImageNet PTQ example (equalize, quantize, calibrate,
    GPTQ, bias correction) with one change that does not alter the result: GPTQ runs with
    ``use_quant_activations=False``, so its weights do not depend on the activation bits; they are
    computed once per (model, weight bits) and loaded (with their scales) into the model of each
    activation setting, whose activations are then calibrated and bias-corrected. The time of that
    shared GPTQ run is added to every setting's ``calib_seconds``.
    """

    def runner(wl: Workload, wb: int, ab: int | None, cache: dict) -> Outcome:
        import brevitas.nn as qnn
        from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
        from brevitas.graph.gptq import gptq_mode
        from brevitas.graph.quantize import layerwise_quantize, preprocess_for_quantize
        from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

        pre_kw = {
            "trace_model": True,
            "equalize_iters": 20 if best else 0,
            "equalize_merge_bias": True,
            "merge_bn": True,
            # Brevitas' default (True) changes the float function: on EfficientNet-Lite0 the
            # preprocessed float model alone loses ~45% agreement (see notes). AIMET >= 2.4 no
            # longer makes this swap either; equalization then stops at ReLU6.
            "relu6_to_relu": False,
        }
        notes: list[str] = []
        extra = 0.0
        steps = ["preprocess_for_quantize", "layerwise_quantize"]
        gptq_kw = {"act_order": True, "use_quant_activations": False, "create_weight_orig": False}
        if best:
            key = ("brevitas-gptq", wl.name, wb)
            if key not in cache:
                t0 = time.perf_counter()
                pm = preprocess_for_quantize(copy.deepcopy(wl.model).eval(), **pre_kw)
                base_map, _ = _brevitas_quant_maps(wb, None)
                base = layerwise_quantize(copy.deepcopy(pm), compute_layer_map=base_map).eval()
                with torch.no_grad():
                    base(wl.calib[0])  # initialises the weight scales (MSE search)
                    with gptq_mode(base, **gptq_kw) as gptq:
                        for _ in range(gptq.num_layers):
                            for b in wl.calib:
                                gptq.model(b)
                            gptq.update()
                state = copy.deepcopy(base.state_dict())
                seconds = time.perf_counter() - t0
                t_diag = time.perf_counter()  # diagnostics, not part of the recipe's time
                same = _agree(wl, pm)
                relu = preprocess_for_quantize(
                    copy.deepcopy(wl.model).eval(), **{**pre_kw, "relu6_to_relu": True}
                )
                same_relu = _agree(wl, relu)
                extra = -(time.perf_counter() - t_diag)
                cache[key] = (pm, state, seconds, same, same_relu)
                del base, relu
            else:
                extra = cache[key][2]
            pm, state, seconds, same, same_relu = cache[key]
            notes.append(
                f"equalized float model keeps {same:.1%} agreement (with Brevitas' default "
                f"relu6_to_relu=True it would keep {same_relu:.1%}); GPTQ ({seconds:.0f}s) "
                f"computed once for W{wb} and shared by its settings (included in calib_seconds)"
            )
            model = copy.deepcopy(pm)
        else:
            model = preprocess_for_quantize(copy.deepcopy(wl.model).eval(), **pre_kw)
        layer_map, map_kw = _brevitas_quant_maps(wb, ab)
        qmodel = layerwise_quantize(model, compute_layer_map=layer_map).eval()
        with torch.no_grad():
            if best:
                missing, unexpected = qmodel.load_state_dict(state, strict=False)
                bad = [k for k in missing if "weight" in k and "input_quant" not in k]
                if bad or unexpected:
                    raise RuntimeError(f"GPTQ state does not fit: {bad[:3]} {unexpected[:3]}")
                steps.append(f"gptq_mode({gptq_kw}) [shared per weight width]")
            qmodel(wl.calib[0])  # initialises the weight quantizers (MSE search on weights)
            if ab is not None:
                with calibration_mode(qmodel):
                    for b in wl.calib:
                        qmodel(b)
                steps.append("calibration_mode (act MSE)")
            if best:
                with bias_correction_mode(qmodel):
                    for b in wl.calib:
                        qmodel(b)
                steps.append("bias_correction_mode")
        convs = sum(isinstance(m, qnn.QuantConv2d) for m in qmodel.modules())
        lins = sum(isinstance(m, qnn.QuantLinear) for m in qmodel.modules())
        floats = sum(
            isinstance(m, nn.Conv2d | nn.Linear) and not isinstance(m, QuantWBIOL)
            for m in qmodel.modules()
        )
        notes.append(
            f"{convs} QuantConv2d + {lins} QuantLinear ({floats} float Conv/Linear left); "
            "inputs of every Conv/Linear quantized (layerwise backend, signed sym quantizers)"
        )
        kwargs = {
            "preprocess_for_quantize": pre_kw,
            "create_quant_maps": map_kw,
            "backend": "layerwise",
            "steps": steps,
        }
        return Outcome(qmodel, kwargs, notes, extra_seconds=extra)

    return runner


def _agree(wl: Workload, model: nn.Module) -> float:
    """Top-1 agreement of a (transformed) float model with the FP32 reference."""
    with torch.no_grad():
        return float((wl.predict(model).argmax(1) == wl.ref.argmax(1)).double().mean())


# ---------------------------------------------------------------------------------------------
# NNCF
# ---------------------------------------------------------------------------------------------


def _nncf_quantizers(model: nn.Module) -> str:
    c: Counter = Counter()
    for name, m in model.named_modules():
        if hasattr(m, "num_bits") and "Quantizer" in type(m).__name__:
            kind = "w" if ("pre_hooks" in name and "__1." in name) else "a"
            pc = "ch" if getattr(m, "per_channel", False) else "t"
            c[f"{kind}{int(m.num_bits)}{pc}"] += 1
    names = {"w": "weights", "a": "activations"}
    parts = [
        f"{n} {names[k[0]]} {k[1:-2] if k.endswith('ch') else k[1:-1]}b per-"
        f"{'channel' if k.endswith('ch') else 'tensor'}"
        for k, n in sorted(c.items())
    ]
    return "NNCF quantizers: " + ", ".join(parts)


def run_nncf(best: bool) -> Runner:
    def runner(wl: Workload, wb: int, ab: int | None, cache: dict) -> Outcome:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
            QuantizationParameters,
        )
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet

        notes = []
        a_bits = ab
        if ab is None:
            a_bits = 16
            notes.append("activations at 16 bits: nncf.quantize cannot leave activations in float")
        adv_kw: dict[str, Any] = {
            "weights_quantization_params": QuantizationParameters(num_bits=wb, per_channel=True),
            "activations_quantization_params": QuantizationParameters(num_bits=a_bits),
            "weights_range_estimator_params": RangeEstimatorParametersSet.MINMAX,
            "activations_range_estimator_params": RangeEstimatorParametersSet.HISTOGRAM,
            "disable_bias_correction": not best,
        }
        q_kw: dict[str, Any] = {
            "subset_size": len(wl.calib),
            "preset": nncf.QuantizationPreset.PERFORMANCE,
            "target_device": nncf.TargetDevice.NPU,
            "fast_bias_correction": True,
        }
        if best:
            adv_kw["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(
                convolution=0.15, matmul=0.95
            )
            # SmoothQuant is only in NNCF's pipeline for model_type=TRANSFORMER; preset stays
            # PERFORMANCE (symmetric activations), set explicitly above.
            q_kw["model_type"] = nncf.ModelType.TRANSFORMER
        shown = {
            "nncf.quantize": {k: str(v) for k, v in q_kw.items()},
            "AdvancedQuantizationParameters": {k: str(v) for k, v in adv_kw.items()},
        }
        dataset = nncf.Dataset(wl.calib)
        ignored = None
        for attempt in range(2):
            adv = AdvancedQuantizationParameters(**adv_kw)
            extra = {"ignored_scope": ignored} if ignored is not None else {}
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    q = nncf.quantize(
                        copy.deepcopy(wl.model).eval(),
                        dataset,
                        advanced_parameters=adv,
                        **q_kw,
                        **extra,
                    )
                break
            except (ValueError, nncf.ValidationError, RuntimeError) as e:
                msg = " ".join(str(e).split())
                pooled = "adaptive_avg_pool2d" in msg or "avg_pool2d" in msg
                if attempt == 0 and pooled:
                    # NPU allows only 8/16-bit activations into AvgPool: leave the pool's input
                    # unquantized (the classifier input is still quantized after the pool).
                    notes.append("refused first: " + msg[:300])
                    ignored = nncf.IgnoredScope(
                        types=["adaptive_avg_pool2d", "avg_pool2d"], validate=False
                    )
                    shown["ignored_scope"] = "types=['adaptive_avg_pool2d', 'avg_pool2d']"
                    continue
                raise Refused(msg[:600]) from None
        notes.append(_nncf_quantizers(q))
        return Outcome(q, shown, notes)

    return runner


def run_nncf_int4_weights(wl: Workload, wb: int, ab: int | None, cache: dict) -> Outcome:
    """NNCF's weight-only INT4 mode (the only way to leave activations in float)."""
    import nncf

    if not (wb == 4 and ab is None):
        raise Refused("weight-only mode: run for W4A32 only")
    kw = {
        "mode": nncf.CompressWeightsMode.INT4_SYM,
        "ratio": 1.0,
        "group_size": -1,
        "all_layers": True,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.compress_weights(
            copy.deepcopy(wl.model).eval(), dataset=nncf.Dataset(wl.calib[:1]), **kw
        )
    kinds: Counter = Counter()
    for name, m in q.named_modules():
        t = type(m).__name__
        if "Decompressor" in t:
            layer = name.split("post_hooks.")[-1].split(":weight")[0].replace(":", ".")
            try:
                mod = wl.model.get_submodule(layer)
                lt = type(mod).__name__
            except AttributeError:
                lt = "?"
            kinds[(t.replace("WeightsDecompressor", ""), lt)] += 1
    summary = ", ".join(f"{n} {lt} -> {k}" for (k, lt), n in sorted(kinds.items()))
    int8 = sum(n for (k, _), n in kinds.items() if k.startswith("INT8"))
    refused = None
    if int8:
        refused = f"partial: INT4_SYM with all_layers=True, ratio=1.0 still leaves {int8} layers at INT8 ({summary})"
    return Outcome(
        q, {"nncf.compress_weights": {k: str(v) for k, v in kw.items()}}, [summary], refused
    )


# ---------------------------------------------------------------------------------------------
# AIMET
# ---------------------------------------------------------------------------------------------

_AIMET: dict[str, Any] = {}


def _torchvision_stub() -> dict[str, Any]:
    """Placeholder ``torchvision`` modules for AIMET's import-time references (dict keys like
    ``torchvision.ops.RoIPool``, ``from torchvision import datasets, transforms``). Calling any of
    them raises. Removed from ``sys.modules`` again right after AIMET is imported."""
    import importlib.machinery
    import types

    def missing(*a, **k):
        raise RuntimeError("torchvision is not installed (placeholder used to import AIMET)")

    mods = {
        n: types.ModuleType(n)
        for n in (
            "torchvision",
            "torchvision.ops",
            "torchvision.transforms",
            "torchvision.datasets",
        )
    }
    for n, m in mods.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
    tv = mods["torchvision"]
    tv.__version__ = "0+placeholder"
    tv.ops, tv.transforms, tv.datasets = (
        mods["torchvision.ops"],
        mods["torchvision.transforms"],
        mods["torchvision.datasets"],
    )
    for cls in ("RoIPool", "RoIAlign", "MultiScaleRoIAlign", "DeformConv2d"):
        setattr(tv.ops, cls, type(cls, (), {"__init__": missing}))
    for fn in ("roi_align", "roi_pool", "nms", "deform_conv2d"):
        setattr(tv.ops, fn, missing)
    for cls in ("Resize", "Compose", "ToTensor", "Normalize", "CenterCrop"):
        setattr(tv.transforms, cls, type(cls, (), {"__init__": missing}))
    return mods


def load_aimet(path: str | None) -> dict[str, Any]:
    """Import aimet_torch (from ``path`` if given). aimet-torch 2.42.0 imports torchvision at
    module level (``aimet_torch/utils.py``: ``from torchvision import datasets, transforms``);
    PyPI's torchvision does not import beside torch 2.13.0+cpu here and must not be installed,
    so if torchvision is missing a placeholder is put in ``sys.modules`` for the import only."""
    if _AIMET:
        return _AIMET
    if path and path not in sys.path:
        sys.path.append(path)
    if importlib.util.find_spec("aimet_torch") is None:
        raise Refused(
            "aimet-torch is not installed: its PyPI wheel requires torchvision, which would "
            "replace or break torch 2.13.0+cpu here; install it with --no-deps into a separate "
            "directory and pass --aimet-path"
        )
    stub = None
    if importlib.util.find_spec("torchvision") is None:
        stub = _torchvision_stub()
        sys.modules.update(stub)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import aimet_torch
            from aimet_common.defs import QuantScheme
            from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
            from aimet_torch.batch_norm_fold import fold_all_batch_norms
            from aimet_torch.cross_layer_equalization import equalize_model
            from aimet_torch.quantsim import QuantizationSimModel
    except ImportError as e:
        raise Refused("aimet_torch does not import: " + _short(e)) from None
    finally:
        if stub is not None:
            for n in stub:
                sys.modules.pop(n, None)
    cfg = (
        Path(aimet_torch.__file__).parent / "common/quantsim_config/default_config_per_channel.json"
    )
    _AIMET.update(
        QuantScheme=QuantScheme,
        Adaround=Adaround,
        AdaroundParameters=AdaroundParameters,
        fold_all_batch_norms=fold_all_batch_norms,
        equalize_model=equalize_model,
        QuantizationSimModel=QuantizationSimModel,
        config=str(cfg),
        version=version("aimet-torch") or getattr(aimet_torch, "__version__", None),
        torchvision_placeholder=stub is not None,
    )
    return _AIMET


def run_aimet(best: bool, adaround_iters: int, path: str | None) -> Runner:
    def runner(wl: Workload, wb: int, ab: int | None, cache: dict) -> Outcome:
        A = load_aimet(path)
        qs = A["QuantScheme"].post_training_tf_enhanced
        shape = tuple(wl.example.shape)
        notes = []
        if A["torchvision_placeholder"]:
            notes.append("aimet_torch imported with a torchvision placeholder (not installed)")
        key = ("aimet-prep", wl.name, best, wb)
        prep_seconds = 0.0
        if key not in cache:
            t0 = t_start = time.perf_counter()
            model = copy.deepcopy(wl.model).eval()
            enc_dir = None
            with contextlib.redirect_stdout(io.StringIO()):
                if best:
                    A["equalize_model"](model, input_shapes=shape)
                else:
                    A["fold_all_batch_norms"](model, input_shapes=shape)
                t_diag = time.perf_counter()  # diagnostics, not part of the recipe's time
                same = _agree(wl, model)
                t0 += time.perf_counter() - t_diag
                if best:
                    enc_dir = tempfile.mkdtemp(prefix="aimet_adaround_")
                    params = A["AdaroundParameters"](
                        data_loader=[(b, None) for b in wl.calib],
                        num_batches=len(wl.calib),
                        default_num_iterations=adaround_iters,
                    )
                    model = A["Adaround"].apply_adaround(
                        model,
                        wl.example,
                        params,
                        path=enc_dir,
                        filename_prefix="adaround",
                        default_param_bw=wb,
                        default_quant_scheme=qs,
                        default_config_file=A["config"],
                    )
            cache[key] = (model, enc_dir, same, time.perf_counter() - t0)
            prep_seconds = -(t0 - t_start)  # the diagnostics' time, taken out of calib_seconds
        else:
            prep_seconds = cache[key][3]  # shared with the other settings of this weight width
        model, enc_dir, same, shared = cache[key]
        if best:
            notes.append(
                f"CLE (BN fold, cross-layer scaling, high-bias folding; conv-ReLU6-conv pairs are "
                f"not scaled since aimet-torch 2.4) alone keeps {same:.1%} agreement; AdaRound "
                f"{adaround_iters} iterations/layer, computed once for W{wb} ({shared:.0f}s, "
                "included in calib_seconds of every setting)"
            )
        sim_kw = {
            "quant_scheme": "post_training_tf_enhanced",
            "default_output_bw": ab or 8,
            "default_param_bw": wb,
            "config_file": "default_config_per_channel.json",
        }
        with contextlib.redirect_stdout(io.StringIO()):
            sim = A["QuantizationSimModel"](
                model,
                wl.example,
                quant_scheme=qs,
                default_output_bw=ab or 8,
                default_param_bw=wb,
                config_file=A["config"],
            )
            if best:
                sim.set_and_freeze_param_encodings(os.path.join(enc_dir, "adaround.encodings"))
            if ab is None:
                _aimet_disable_activations(sim.model)
                sim_kw["activation quantizers"] = "removed (input/output quantizers set to None)"

            def forward(m, _):
                with torch.no_grad():
                    for b in wl.calib:
                        m(b)

            sim.compute_encodings(forward, None)
        notes.append(_aimet_quantizers(sim.model))
        kwargs = {
            "prep": "equalize_model + Adaround.apply_adaround" if best else "fold_all_batch_norms",
            "QuantizationSimModel": sim_kw,
        }
        if best:
            kwargs["AdaroundParameters"] = {
                "num_batches": len(wl.calib),
                "default_num_iterations": adaround_iters,
                "default_quant_scheme": "post_training_tf_enhanced",
            }
        return Outcome(sim.model, kwargs, notes, extra_seconds=prep_seconds)

    return runner


def _aimet_disable_activations(model: nn.Module) -> None:
    for m in model.modules():
        for attr in ("input_quantizers", "output_quantizers"):
            ql = getattr(m, attr, None)
            if ql is not None:
                for i in range(len(ql)):
                    ql[i] = None


def _aimet_quantizers(model: nn.Module) -> str:
    c: Counter = Counter()
    for m in model.modules():
        pq = getattr(m, "param_quantizers", None)
        if pq is not None:
            w = dict(pq.items()).get("weight")
            if w is not None:
                c[f"weights {int(w.bitwidth)}b"] += 1
        for attr in ("input_quantizers", "output_quantizers"):
            for q in getattr(m, attr, None) or []:
                if q is not None:
                    c[f"activations {int(q.bitwidth)}b"] += 1
    return "AIMET quantizers: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items()))


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------


@dataclass
class Method:
    tool: str
    config: str
    runner: Runner
    dist: str | None = None  # distribution whose version is reported
    settings: tuple[str, ...] | None = None  # None = every setting
    models: tuple[str, ...] | None = None  # None = every model

    @property
    def label(self) -> str:
        return f"{self.tool} {self.config}"


def methods(tools: list[str], adaround_iters: int, aimet_path: str | None) -> list[Method]:
    out: list[Method] = []
    if "omse" in tools:
        out += [
            Method("omse", "mmse", run_omse(), "omse"),
            # no extra MACs, like every peer recipe
            Method("omse", "mmse+bc", run_omse(bias_correction=True), "omse"),
            # the default 4-bit recipe: residual tensors on 10% extra MACs + bias correction
            Method("omse", "mmse+res10+bc", run_omse(budget=0.10, bias_correction=True), "omse"),
            Method(
                "omse",
                "mmse (unadapted Lite0)",
                run_omse(on_original=True),
                "omse",
                settings=("W4A8",),
                models=("efficientnet-lite0",),
            ),
        ]
    if "brevitas" in tools:
        out += [
            Method("brevitas", "ptq-mse", run_brevitas(best=False), "brevitas"),
            Method("brevitas", "best: eq+gptq+bc", run_brevitas(best=True), "brevitas"),
        ]
    if "nncf" in tools:
        out += [
            Method("nncf", "ptq-histogram", run_nncf(best=False), "nncf"),
            Method("nncf", "best: sq+fbc", run_nncf(best=True), "nncf"),
            Method("nncf", "int4-weight-only", run_nncf_int4_weights, "nncf", settings=("W4A32",)),
        ]
    if "aimet" in tools:
        out += [
            Method("aimet", "ptq-tf-enhanced", run_aimet(False, adaround_iters, aimet_path)),
            Method("aimet", "best: cle+adaround", run_aimet(True, adaround_iters, aimet_path)),
        ]
    return out


def method_version(m: Method) -> str | None:
    if m.tool == "aimet":
        return _AIMET.get("version") or version("aimet-torch")
    return version(m.dist) if m.dist else None


def unavailable(m: Method) -> str | None:
    mod = {"brevitas": "brevitas", "nncf": "nncf"}.get(m.tool)
    if mod and importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed (pip install omse[bench])"
    return None


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


def _cell(r: Row) -> str:
    if r.agreement is None:
        return "refused" if not (r.refused or "").startswith("failed") else "failed"
    s = f"{r.agreement:.1%}"
    if r.refused:
        s += "†"
    if r.act_bits is None and r.tool == "nncf" and "16 bits" in r.notes:
        s += " (A16)"
    return s


def markdown_tables(rows: list[Row], settings: list[str]) -> str:
    """Agreement per method and setting (one table per model), then every row in detail."""
    out = []
    models = list(dict.fromkeys(r.model for r in rows))
    for model in models:
        mrows = [r for r in rows if r.model == model]
        labels = list(dict.fromkeys((r.tool, r.config) for r in mrows))
        out.append(f"### {model}: top-1 agreement with FP32\n")
        out.append("| tool | config | version | " + " | ".join(settings) + " |")
        out.append("|---|---|---|" + "---|" * len(settings))
        for tool, config in labels:
            cells = []
            ver = ""
            for s in settings:
                hit = [r for r in mrows if (r.tool, r.config) == (tool, config) and r.setting == s]
                cells.append(_cell(hit[0]) if hit else "")
                ver = ver or (hit[0].version or "" if hit else "")
            out.append(f"| {tool} | {config} | {ver} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("### Every row\n")
    out.append(
        "| model | tool | config | setting | agreement | top-1 | KL | calib s | refused / notes |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agree = "-" if r.agreement is None else f"{r.agreement:.1%}"
        top1 = "-" if r.top1 is None else f"{r.top1:.1%}"
        kl = "-" if r.kl is None else f"{r.kl:.3f}"
        cs = "-" if r.calib_seconds is None else f"{r.calib_seconds:.1f}"
        text = (f"**{r.refused}** " if r.refused else "") + (r.notes or "")
        text = " ".join(text.split()).replace("|", "/")
        out.append(
            f"| {r.model} | {r.tool} | {r.config} | {r.setting} | {agree} | {top1} | {kl} | "
            f"{cs} | {text[:400]} |"
        )
    return "\n".join(out) + "\n"


def write_json(rows: list[Row], path: Path) -> None:
    from omse.io import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(r) for r in rows], indent=2) + "\n", force=True)


def read_json(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    return [Row(**d) for d in json.loads(path.read_text())]


def plot(rows: list[Row], settings: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    if not models:
        return
    labels = list(dict.fromkeys(f"{r.tool} {r.config}" for r in rows))
    cmap = plt.get_cmap("tab20")
    colors = {lab: cmap(i % 20) for i, lab in enumerate(labels)}
    ncols = min(2, len(models))
    nrows = -(-len(models) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(8 * ncols, 4.2 * nrows), squeeze=False)
    width = 0.8 / max(len(labels), 1)
    for ax, model in zip(axes.flat, models):
        for j, lab in enumerate(labels):
            for i, s in enumerate(settings):
                hit = [
                    r
                    for r in rows
                    if r.model == model and f"{r.tool} {r.config}" == lab and r.setting == s
                ]
                if not hit:
                    continue
                r = hit[0]
                x = i - 0.4 + (j + 0.5) * width
                if r.agreement is None:
                    ax.plot(x, 0.02, marker="x", color="red", markersize=6)
                else:
                    ax.bar(
                        x,
                        100 * r.agreement,
                        width,
                        color=colors[lab],
                        hatch="//" if r.refused else None,
                        edgecolor="black" if r.refused else None,
                        linewidth=0.3,
                    )
        ax.set_xticks(range(len(settings)), settings)
        ax.set_ylim(0, 102)
        ax.set_ylabel("top-1 agreement with FP32 (%)")
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[lab]) for lab in labels]
    handles.append(plt.Line2D([], [], marker="x", color="red", linestyle=""))
    fig.legend(
        handles,
        [*labels, "refused / failed"],
        loc="lower center",
        ncol=min(5, len(labels) + 1),
        fontsize=8,
    )
    fig.suptitle(
        "Post-training quantization peers, same models, data and metric (hatched: partial)"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def header(rows: list[Row], workloads: dict[str, dict], seconds: float) -> str:
    vers = {d: version(d) for d in ("torch", "torchao")}
    for r in rows:
        if r.version:
            vers.setdefault(r.tool, r.version)
    lines = [
        "# omse and its peers\n",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v),
        f"- run: `python benchmarks/peers.py {' '.join(sys.argv[1:])}`, {seconds / 60:.1f} min "
        f"wall (load average at the end {os.getloadavg()[0]:.1f}: timings are on a shared, "
        "busy machine)",
        "- metric: top-1 agreement with the FP32 model (omse.analysis.metrics.compare_logits); "
        "† = the tool did not do exactly what was asked (see notes)",
    ]
    for name, notes in workloads.items():
        lines.append(f"- {name}: " + "; ".join(f"{k}: {v}" for k, v in notes.items()))
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _split(values: list[str] | None, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    if not values:
        return list(allowed)
    out = [v for item in values for v in item.split(",") if v]
    bad = [v for v in out if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", help=f"default: all of {', '.join(MODELS)}")
    p.add_argument("--settings", nargs="*", help=f"default: {', '.join(SETTINGS)}")
    p.add_argument("--tools", nargs="*", help=f"default: {', '.join(TOOLS)}")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small eval/calibration sets and 20 AdaRound iterations (a smoke run)",
    )
    p.add_argument(
        "--adaround-iters",
        type=int,
        default=None,
        help="AdaRound iterations per layer (default 1000, 200 for Lite0, 20 with --quick)",
    )
    p.add_argument(
        "--aimet-path",
        default=os.environ.get("OMSE_AIMET_PATH"),
        help="directory holding aimet_torch installed with --no-deps (env OMSE_AIMET_PATH)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-json", default="results/peers.json")
    p.add_argument("--out-png", default="results/peers.png")
    p.add_argument("--out-md", default="results/peers.md")
    p.add_argument(
        "--resume", action="store_true", help="keep rows already in --out-json, run the rest"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every tool in this process (default: one subprocess per model and tool)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_in_process(
    models: list[str],
    tools: list[str],
    settings: list[str],
    args: argparse.Namespace,
    rows: list[Row],
    out_json: Path | None,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], dict[str, dict]]:
    """Run ``tools`` on ``models`` in this process; rows already in ``rows`` are skipped."""
    done = {r.key for r in rows}
    meta: dict[str, dict] = {}
    warm_imports(tools, args.aimet_path)  # import time is not calibration time
    for name in models:
        t0 = time.perf_counter()
        wl = load_workload(name, args.quick)
        if wl is None:
            continue
        meta[name] = dict(wl.notes)
        fp = wl.labels is not None and float((wl.ref.argmax(1) == wl.labels).double().mean())
        meta[name]["fp32_top1"] = f"{fp:.1%}"
        log(f"   {name} loaded in {time.perf_counter() - t0:.1f}s; FP32 top-1 {fp:.1%}")
        cache: dict = {}
        iters = adaround_iterations(name, args)
        for m in methods(tools, iters, args.aimet_path):
            if m.models is not None and name not in m.models:
                continue
            for s in settings:
                if m.settings is not None and s not in m.settings:
                    continue
                wb, ab = SETTINGS[s]
                if (m.tool, m.config, name, wb, ab) in done:
                    continue
                why = unavailable(m)
                if why:
                    row = Row(m.tool, None, m.config, name, wb, ab, refused=why)
                else:
                    row = evaluate(wl, m.tool, None, m.config, m.runner, wb, ab, cache, log)
                    row.version = method_version(m)
                rows = [r for r in rows if r.key != row.key] + [row]
                if out_json is not None:
                    write_json(rows, out_json)
        del cache, wl
    return rows, meta


def adaround_iterations(model: str, args: argparse.Namespace) -> int:
    """AdaRound iterations per layer: ``--adaround-iters``, else 20 (quick), 200 for
    EfficientNet-Lite0 and 1000 for the Fashion-MNIST nets (AIMET's default, 10000, would take
    days on this 2-core CPU)."""
    if args.adaround_iters:
        return args.adaround_iters
    if args.quick:
        return 20
    return 200 if model == "efficientnet-lite0" else 1000


def warm_imports(tools: list[str], aimet_path: str | None) -> None:
    mods = {
        "omse": ["omse.transforms.pipeline"],
        "brevitas": ["brevitas.graph.quantize", "brevitas.graph.gptq"],
        "nncf": ["nncf", "nncf.torch"],
    }
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for tool in tools:
            for mod in mods.get(tool, []):
                with contextlib.suppress(ImportError):
                    importlib.import_module(mod)
            if tool == "aimet":
                with contextlib.suppress(Refused):
                    load_aimet(aimet_path)


def run_isolated(
    models: list[str],
    tools: list[str],
    settings: list[str],
    args: argparse.Namespace,
    rows: list[Row],
    out_json: Path,
) -> tuple[list[Row], dict[str, dict]]:
    """One subprocess per (model, tool): NNCF patches torch functions on import (after which
    AIMET's QuantSim fails with "PyTorch doesn't support overriding <built-in method cat>") and
    AIMET needs its torchvision placeholder, so no tool sees another's side effects."""
    import subprocess

    meta: dict[str, dict] = {}
    for name in models:
        print(f"== {name}", flush=True)
        for tool in tools:
            with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
                part = Path(tmp) / "rows.json"
                write_json([r for r in rows if r.model == name and r.tool == tool], part)
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    "--resume",
                    "--models",
                    name,
                    "--tools",
                    tool,
                    "--settings",
                    *settings,
                    "--threads",
                    str(args.threads),
                    "--out-json",
                    str(part),
                ]
                if args.quick:
                    cmd.append("--quick")
                if args.adaround_iters:
                    cmd += ["--adaround-iters", str(args.adaround_iters)]
                if args.aimet_path:
                    cmd += ["--aimet-path", args.aimet_path]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, check=False)
                seconds = time.perf_counter() - t0
                got = read_json(part)
                keys = {r.key for r in got}
                rows = [r for r in rows if r.key not in keys] + got
                meta_path = part.with_suffix(".meta.json")
                if meta_path.is_file():
                    for k, v in json.loads(meta_path.read_text()).items():
                        meta.setdefault(k, {}).update(v)
                meta.setdefault(name, {})[f"{tool} wall time"] = f"{seconds / 60:.1f} min"
                if proc.returncode != 0:
                    print(f"[warn] worker {name}/{tool} exited with {proc.returncode}", flush=True)
                write_json(rows, out_json)
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = _split(args.models, MODELS, "models")
    settings = _split(args.settings, list(SETTINGS), "settings")
    tools = _split(args.tools, TOOLS, "tools")
    out_json, out_png, out_md = Path(args.out_json), Path(args.out_png), Path(args.out_md)
    rows = read_json(out_json) if args.resume else []
    t_start = time.perf_counter()
    if args.worker:
        rows, meta = run_in_process(models, tools, settings, args, rows, out_json)
        json_text = json.dumps(meta, indent=2, default=str) + "\n"
        out_json.with_suffix(".meta.json").write_text(json_text)
        return 0
    if args.in_process:
        rows, meta = run_in_process(models, tools, settings, args, rows, out_json)
    else:
        rows, meta = run_isolated(models, tools, settings, args, rows, out_json)
    seconds = time.perf_counter() - t_start
    write_json(rows, out_json)
    md = header(rows, meta, seconds) + markdown_tables(rows, settings)
    print(md, flush=True)
    from omse.io import atomic_write_text

    atomic_write_text(out_md, md, force=True)
    plot(rows, settings, out_png)
    print(f"wrote {out_json}, {out_md}, {out_png} in {seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
