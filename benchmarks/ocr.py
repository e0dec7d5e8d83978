"""OCR from ONNX files: rapidocr's PP-OCRv4 detector, direction classifier and CTC recognizer
quantized by omse straight from their ``.onnx`` files, against the float ONNX models in
onnxruntime.

Models: the three ONNX files of PyPI ``rapidocr-onnxruntime`` 1.4.4 (:func:`omse.zoo.ocr.
rapidocr_models`), with rapidocr's own preprocessing (:mod:`omse.zoo.ocr`). Data: synthetic text
lines and pages rendered with PIL (:func:`omse.zoo.ocr.text_lines` / ``text_pages``);
calibration and evaluation images come from different seeds and disjoint token sets (asserted).
The recognizer reads lines padded to one width (``48 x 480``, a ratio of 10, as rapidocr pads a
batch to its widest line); the classifier reads the same lines, every other one turned 180
degrees; the detector reads square pages of 480 pixels with rapidocr's ``limit_side_len`` set to
480 (its default, 736, would upscale them 1.5x and make the benchmark 2.4x slower on two cores),
so the page is not resized.

Metrics against FP32 (the float model in onnxruntime CPU): recognizer, exact agreement of the
greedy CTC decode and mean character error rate (CER, FP32's text as reference); detector, IoU of
the probability map binarised at 0.3 (DB post-processing's threshold) with FP32's, per page,
averaged; classifier, top-1 agreement. FP32 itself is scored against the rendered ground truth
(text without its leading/trailing spaces; orientation labels; the DB map against the ink boxes)
to show the data is in distribution.

Rows: W8A8, W4A8 and W4A4 with the recipe (kernel-wise MMSE, residual tensors within 10% extra
MACs, bias correction) and plain kernel-wise MMSE W4A8; each quantized twice, for
``target="int4"`` (simulation and the QDQ INT4 export in onnxruntime) and ``target="int8"``
(simulation and the integer export in onnxruntime). ``--overrides`` adds recognizer rows that
keep groups of layers at 8 bits to show where its error comes from.

    python benchmarks/ocr.py [--quick] [--models det,cls,rec] [--rows ...] [--overrides]

Prints a markdown table and writes ``results/ocr.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from omse.analysis.metrics import wilson_interval
from omse.config import Budget, QuantConfig
from omse.deploy.export import export_onnx
from omse.io import atomic_write_text
from omse.nn.layers import quantized_layers
from omse.runtime import cpu_name, tune_allocator
from omse.transforms.onnx_import import load_onnx
from omse.transforms.pipeline import Calibration, quantize
from omse.zoo import ocr

DB_THRESHOLD = 0.3  # rapidocr's Det.thresh
REC_RATIO = 10.0  # every recognizer batch padded to 48 x 480
# load_onnx's parity tolerance, atol + rtol * (max - min) of each output. Its default (1e-4)
# refused the recognizer on a calibration batch: its 6625-way softmax differed from
# onnxruntime's by 1.24e-4 against 1.1e-4 allowed (summation order, not a mistranslation), so the
# models are imported once with 1e-3 and the measured difference is recorded.
IMPORT_RTOL = 1e-3
# Every QuantConfig field the rows rely on, written out (defaults may move).
COMMON = {
    "weight_method": "mmse",
    "act_method": "mmse",
    "granularity": "per_channel",
    "weight_grid": "full",
    "act_grid": "full",
    "residual_criterion": "output",
    "max_terms": 2,
    "equalize": False,
    "output_aware": False,
    "rounding": "nearest",
    "scale_dtype": "float16",
    "strict": False,
}
RECIPE = {"extra_mac_budget": 0.1, "bias_correction": True}
PLAIN = {"extra_mac_budget": 0.0, "bias_correction": False}
ROWS = {
    "W8A8 recipe": {"weight_bits": 8, "act_bits": 8, **RECIPE},
    "W4A8 recipe": {"weight_bits": 4, "act_bits": 8, **RECIPE},
    "W4A4 recipe": {"weight_bits": 4, "act_bits": 4, **RECIPE},
    "W4A8 MMSE": {"weight_bits": 4, "act_bits": 8, **PLAIN},
    # affine activation grids (a zero point fitted with each step): the recognizer's convolutions
    # read hardswish outputs of range ~[-0.4, 6], on which a signed grid wastes half its codes
    "W8A8 recipe + affine act.": {"weight_bits": 8, "act_bits": 8, **RECIPE, "act_grid": "affine"},
    "W4A8 recipe + affine act.": {"weight_bits": 4, "act_bits": 8, **RECIPE, "act_grid": "affine"},
    "W4A4 recipe + affine act.": {"weight_bits": 4, "act_bits": 4, **RECIPE, "act_grid": "affine"},
    # residual tensors ranked by each layer's measured effect on the model's output (one pass
    # over the calibration lines per layer) instead of each layer's own relative output error
    "W4A8 recipe + network criterion": {
        "weight_bits": 4,
        "act_bits": 8,
        **RECIPE,
        "residual_criterion": "network",
    },
    "W4A8 recipe at 25%": {"weight_bits": 4, "act_bits": 8, **RECIPE, "extra_mac_budget": 0.25},
    "W4A8 recipe at 25% + network criterion": {
        "weight_bits": 4,
        "act_bits": 8,
        **RECIPE,
        "extra_mac_budget": 0.25,
        "residual_criterion": "network",
    },
    # learned rounding (AdaRound-style, layer by layer) on top of the recipe; not in the default
    # --rows (minutes per model): `--rows "W4A8 recipe + learned rounding"`
    "W4A8 recipe + learned rounding": {
        "weight_bits": 4,
        "act_bits": 8,
        **RECIPE,
        "rounding": "learned",
    },
}
ROWS["W4A8 recipe + learned rounding + network criterion"] = {
    **ROWS["W4A8 recipe + learned rounding"],
    "residual_criterion": "network",
}
# the default recipe's per-layer precision: each layer at 4 or 8 bits within 0.6x of the 8-bit
# weight bytes, with the guard (which grows the budget where the plan's output error is more
# than 3 dB above its 8-bit-weight version's) and held at 0.6x; skewed inputs on affine grids
ROWS["default recipe 0.6x + guard"] = {
    "weight_bits": 4,
    "act_bits": 8,
    **RECIPE,
    "act_grid": "auto",
    "budget": Budget(0.6),
}
ROWS["default recipe 0.6x held"] = {
    **ROWS["default recipe 0.6x + guard"],
    "budget": Budget(0.6, guard_db=None),
}
ROWS["best recipe 0.6x held"] = {  # QuantConfig.preset("best"): + learned rounding (minutes)
    **ROWS["default recipe 0.6x held"],
    "rounding": "learned",
}
ROWS["default recipe 0.6x held + GPTQ"] = {  # output-aware (GPTQ) rounding of the 4-bit layers
    **ROWS["default recipe 0.6x held"],
    "rounding": "gptq",
}
DEFAULT_ROWS = ("W8A8 recipe", "W4A8 recipe", "W4A4 recipe", "W4A8 MMSE")
TARGETS = ("int4", "int8")


# ----------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One model: its file, calibration batches, evaluation batches (float32 numpy), how an
    output batch is summarised, and how two summaries compare."""

    name: str
    path: Path
    calib: list[np.ndarray]
    evaluation: list[np.ndarray]
    summarize: Callable[[list[np.ndarray]], object]
    compare: Callable[[object, object], dict]
    truth: Callable[..., dict]  # (summary, FP32's summary or None) -> metrics vs the truth
    weights: int = 0  # float weight elements (rank >= 2) in the ONNX file
    module: torch.nn.Module | None = None  # the float model, imported once


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    """Equal batches of ``size`` images, calibration and evaluation alike (recognizer lines are
    padded to one width, as rapidocr pads a batch to its widest line)."""
    if len(x) % size:
        raise SystemExit(f"ocr.py: {len(x)} images do not split into batches of {size}")
    return [x[i : i + size] for i in range(0, len(x), size)]


def _rec_task(path: Path, calib_lines, eval_lines, batch: int) -> Task:
    charset = ocr.rapidocr_charset(path)
    truth_text = [x.text for x in eval_lines]

    def summarize(outs):
        return ocr.ctc_greedy_decode(np.concatenate(outs), charset)

    def compare(texts, ref):
        return {
            "text_agreement": float(np.mean([a == b for a, b in zip(texts, ref)])),
            # leading/trailing spaces ignored (FP32 itself emits them at a line's margins on a
            # near tie between ' ' and blank; the ground truth has none)
            "stripped_agreement": float(
                np.mean([a.strip() == b.strip() for a, b in zip(texts, ref)])
            ),
            "cer": float(np.mean([ocr.char_error_rate(a, b) for a, b in zip(texts, ref)])),
        }

    def truth(texts, ref=None):
        stripped = [t.strip() for t in texts]
        exact = [a == b for a, b in zip(stripped, truth_text)]
        out = {
            "exact_vs_rendered": float(np.mean(exact)),
            "cer_vs_rendered": float(
                np.mean([ocr.char_error_rate(a, b) for a, b in zip(stripped, truth_text)])
            ),
        }
        if ref is not None:  # of the lines FP32 reads exactly, those this model reads exactly too
            fp32 = [a.strip() == b for a, b in zip(ref, truth_text)]
            kept = sum(e and f for e, f in zip(exact, fp32))
            n = sum(fp32)
            out["fp32_exact_kept"] = {
                "kept": kept,
                "of": n,
                "share": kept / max(n, 1),
                "interval95": list(wilson_interval(kept, n)) if n else None,
            }
        return out

    pre = [x.bgr() for x in calib_lines], [x.bgr() for x in eval_lines]
    return Task(
        "rec",
        path,
        _batches(ocr.rec_preprocess(pre[0], max_wh_ratio=REC_RATIO), batch),
        _batches(ocr.rec_preprocess(pre[1], max_wh_ratio=REC_RATIO), batch),
        summarize,
        compare,
        truth,
    )


def _cls_task(path: Path, calib_lines, eval_lines, batch: int) -> Task:
    cal, _ = ocr.turned(calib_lines)
    ev, labels = ocr.turned(eval_lines)

    def summarize(outs):
        return np.concatenate(outs).argmax(1)

    def compare(pred, ref):
        return {"top1_agreement": float((pred == ref).mean())}

    def truth(pred, ref=None):
        return {"accuracy_vs_labels": float((pred == labels).mean())}

    return Task(
        "cls",
        path,
        _batches(ocr.cls_preprocess(cal), batch),
        _batches(ocr.cls_preprocess(ev), batch),
        summarize,
        compare,
        truth,
    )


def _det_task(path: Path, calib_pages, eval_pages, batch: int, side: int) -> Task:
    def prep(pages):
        return np.concatenate([ocr.det_preprocess(p.bgr(), limit_side_len=side) for p in pages])

    masks = [p.mask for p in eval_pages]

    def summarize(outs):
        return np.concatenate(outs)[:, 0] > DB_THRESHOLD

    def compare(m, ref):
        ious = [ocr.mask_iou(a, b) for a, b in zip(m, ref)]
        return {"iou": float(np.mean(ious)), "iou_min": float(np.min(ious))}

    def truth(m, ref=None):
        inside = [float(a[b].sum() / max(a.sum(), 1)) for a, b in zip(m, masks)]
        covered = [float(a[b].mean()) for a, b in zip(m, masks)]
        return {
            "map_pixels_inside_ink_boxes": float(np.mean(inside)),
            "ink_box_pixels_covered": float(np.mean(covered)),
        }

    return Task(
        "det",
        path,
        _batches(prep(calib_pages), batch),
        _batches(prep(eval_pages), batch),
        summarize,
        compare,
        truth,
    )


# ----------------------------------------------------------------------------- running
def _session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_ort(path: Path, batches: list[np.ndarray], threads: int) -> list[np.ndarray]:
    s = _session(path, threads)
    name = s.get_inputs()[0].name
    return [s.run(None, {name: b})[0] for b in batches]


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def _run_torch(model: torch.nn.Module, batches: list[np.ndarray]) -> list[np.ndarray]:
    return [_first(model(torch.from_numpy(b))).numpy() for b in batches]


def _onnx_weights(path: Path) -> int:
    """Elements of the float tensors of rank >= 2 (the weights) among the model's initializers
    and ``Constant`` nodes."""
    m = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in m.graph.initializer]
    arrays += [
        numpy_helper.to_array(a.t)
        for n in m.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    return int(sum(a.size for a in arrays if a.ndim >= 2 and a.dtype.kind == "f"))


def _config(spec: dict, target: str, overrides: dict | None = None) -> QuantConfig:
    return QuantConfig(**{**COMMON, **spec}, target=target, overrides=overrides or {})


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]


def run_row(
    task: Task, label: str, spec: dict, target: str, ref, args, work: Path, overrides=None
) -> dict:
    row: dict = {"model": task.name, "row": label, "target": target, "config": {**spec}}
    if overrides:
        row["overrides"] = overrides
    cfg = _config(spec, target, overrides)
    cal = Calibration()
    t0 = time.perf_counter()
    try:
        q = quantize(task.module, [torch.from_numpy(b) for b in task.calib], cfg, calibration=cal)
    except Exception as e:  # recorded: the row shows why it has no numbers
        row["error"] = f"quantize: {_err(e)}"
        if args.debug:
            traceback.print_exc()
        return row
    row["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    if cal.precision is not None:  # the per-layer plan: its bytes against the 8-bit weights'
        plan = cal.precision
        row["precision"] = {
            "summary": plan.summary(),
            "bytes_fraction": round(plan.bytes / max(plan.bytes_8bit, 1), 4),
            # with the residual tensors (target int4): the file's weight bytes
            "file_bytes_fraction": round(
                (plan.bytes + plan.residual_bytes) / max(plan.bytes_8bit, 1), 4
            ),
            "guard": plan.guard,
        }
    row["float_fallback"] = {n: round(db, 2) for n, db in cal.fallback.items()}
    layers = quantized_layers(q)
    qweights = sum(ql.layer.weight.numel() for ql in layers.values())
    macs = sum(ql.macs for ql in layers.values())
    row["quantized_layers"] = len(layers)
    row["weights_quantized_fraction"] = qweights / max(task.weights, 1)
    row["extra_macs_fraction"] = sum(ql.extra_macs() for ql in layers.values()) / max(macs, 1)
    row["left_float"] = list(cal.left_float)
    sim = task.summarize(_run_torch(q, task.evaluation))
    row["sim_vs_fp32"] = task.compare(sim, ref)
    row["sim_vs_truth"] = task.truth(sim, ref)
    try:
        path = export_onnx(
            q,
            torch.from_numpy(task.calib[0]),
            work / f"{task.name}_{target}.onnx",
            force=True,
            target=target,
        )
        outs = task.summarize(_run_ort(path, task.evaluation, args.threads))
        row["ort_vs_fp32"] = task.compare(outs, ref)
        row["ort_vs_truth"] = task.truth(outs, ref)
        row["ort_vs_sim"] = task.compare(outs, sim)
    except Exception as e:  # recorded
        row["export_error"] = _err(e)
        if args.debug:
            traceback.print_exc()
    return row


# ----------------------------------------------------------------------------- report
def _cell(task: str, m: dict | None) -> str:
    if not m:
        return "-"
    if task == "rec":
        stripped = f", {m['stripped_agreement']:.1%} stripped" if "stripped_agreement" in m else ""
        return f"{m['text_agreement']:.1%} (CER {m['cer']:.3f}{stripped})"
    if task == "det":
        return f"IoU {m['iou']:.3f}"
    return f"{m['top1_agreement']:.1%}"


def _kept(m: dict | None) -> str:
    """The recognizer's share of FP32's exact texts kept, with its 95% interval ('' if none)."""
    k = (m or {}).get("fp32_exact_kept")
    if not k or not k["of"]:
        return ""
    lo, hi = k["interval95"]
    return (
        f"; FP32's exact texts kept {k['kept']}/{k['of']} = {k['share']:.1%} [{lo:.1%}, {hi:.1%}]"
    )


def table(rows: list[dict]) -> str:
    head = (
        "| model | row | int4 target, simulated | int4 graph, ORT (vs sim.) "
        "| int8 target, simulated | int8 graph, ORT (vs sim.) | quantize s (int4 / int8) "
        "| weights quantized |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["model"], r["row"]) for r in rows))
    for model, label in keys:
        by = {r["target"]: r for r in rows if (r["model"], r["row"]) == (model, label)}
        cells = []
        for t in TARGETS:
            r = by.get(t, {})
            if "error" in r:
                cells += [f"failed: {r['error'][:80]}", "-"]
                continue
            ort_c = _cell(model, r.get("ort_vs_fp32"))
            if r.get("ort_vs_sim"):
                ort_c += f" ({_cell(model, r['ort_vs_sim'])})"
            elif "export_error" in r:
                ort_c = f"export failed: {r['export_error'][:80]}"
            cells += [
                _cell(model, r.get("sim_vs_fp32")) + _kept(r.get("sim_vs_truth")),
                ort_c + _kept(r.get("ort_vs_truth")),
            ]
        secs = " / ".join(
            f"{by[t]['quantize_seconds']:.0f}" if "quantize_seconds" in by.get(t, {}) else "-"
            for t in TARGETS
        )
        frac = next(
            (
                f"{by[t]['weights_quantized_fraction']:.1%}"
                for t in TARGETS
                if "weights_quantized_fraction" in by.get(t, {})
            ),
            "-",
        )
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + f" | {secs} | {frac} |")
    return "\n".join(lines)


def _environment(args) -> dict:
    cpu = cpu_name()
    try:
        from importlib.metadata import version

        rapid = version("rapidocr-onnxruntime")
    except Exception:  # recorded as unknown
        rapid = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ort_threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "rapidocr_onnxruntime": rapid,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-lines", type=int, default=32)
    ap.add_argument("--eval-lines", type=int, default=80)
    ap.add_argument("--calib-pages", type=int, default=8)
    ap.add_argument("--eval-pages", type=int, default=20)
    ap.add_argument(
        "--page",
        type=int,
        default=480,
        help="page side in pixels (square pages; also the detector's limit_side_len)",
    )
    ap.add_argument("--quick", action="store_true", help="8/16 lines, 2/4 pages")
    ap.add_argument("--models", default="det,cls,rec")
    ap.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"of: {', '.join(ROWS)}".replace("%", "%%")
    )
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument(
        "--int8-rows", default="", help="rows also quantized for target int8 (default: all)"
    )
    ap.add_argument("--overrides", action="store_true", help="recognizer rows with 8-bit groups")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=1)
    ap.add_argument("--out", default="results/ocr.json")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_lines, args.eval_lines = 8, 16
        args.calib_pages, args.eval_pages = 2, 4
    if args.calib_seed == args.eval_seed:
        ap.error("--calib-seed and --eval-seed must differ")
    tune_allocator()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    paths = ocr.rapidocr_models()
    models = args.models.split(",")
    cal_lines = ocr.text_lines(args.calib_lines, "calib", args.calib_seed)
    ev_lines = ocr.text_lines(args.eval_lines, "eval", args.eval_seed)
    ocr.assert_disjoint(cal_lines, ev_lines)
    tasks = []
    if "rec" in models:
        tasks.append(_rec_task(paths["rec"], cal_lines, ev_lines, 8))
    if "cls" in models:
        tasks.append(_cls_task(paths["cls"], cal_lines, ev_lines, 8))
    if "det" in models:
        cal_pages = ocr.text_pages(args.calib_pages, "calib", args.calib_seed, args.page, args.page)
        ev_pages = ocr.text_pages(args.eval_pages, "eval", args.eval_seed, args.page, args.page)
        ocr.assert_disjoint(cal_pages, ev_pages)
        ocr.assert_disjoint(cal_pages, ev_lines)
        ocr.assert_disjoint(cal_lines, ev_pages)
        tasks.append(_det_task(paths["det"], cal_pages, ev_pages, 2, args.page))
    result = {
        "environment": _environment(args),
        "data": {
            "calibration_lines": args.calib_lines,
            "evaluation_lines": args.eval_lines,
            "calibration_pages": args.calib_pages,
            "evaluation_pages": args.eval_pages,
            "page_side": args.page,
            "seeds": {"calibration": args.calib_seed, "evaluation": args.eval_seed},
            "vocabulary": {s: len(ocr.vocabulary(s)) for s in ocr.SPLITS},
            "rec_input": f"[N, 3, 48, {int(48 * REC_RATIO)}]",
            "cls_input": "[N, 3, 48, 192]",
            "examples": [x.text for x in ev_lines[:8]],
        },
        "arguments": vars(args),
        "common_config": COMMON,
        "import": {},
        "fp32": {},
        "rows": [],
    }
    rows = result["rows"]
    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory(prefix="omse-ocr-") as tmp:
        for task in tasks:
            task.weights = _onnx_weights(task.path)
            t0 = time.perf_counter()
            task.module = load_onnx(
                task.path, sample=torch.from_numpy(task.calib[0]), rtol=IMPORT_RTOL
            )
            info = task.module.omse_onnx
            result["import"][task.name] = {
                "seconds": round(time.perf_counter() - t0, 2),
                "max_abs_diff_vs_onnxruntime": info.max_abs_diff,
                "tolerance": info.tolerance,
                "rtol": IMPORT_RTOL,
                "matmul_weights": {k: list(v) for k, v in info.matmul_weights.items()},
                "matmul_weight_fraction": info.matmul_fraction,
            }
            t0 = time.perf_counter()
            ref = task.summarize(_run_ort(task.path, task.evaluation, args.threads))
            result["fp32"][task.name] = {
                **task.truth(ref),
                "onnx_weight_elements": task.weights,
                "ort_seconds": round(time.perf_counter() - t0, 2),
            }
            print(f"{task.name} FP32 (onnxruntime): {result['fp32'][task.name]}", flush=True)
            int8_rows = args.int8_rows.split(",") if args.int8_rows else list(ROWS)
            plan = [
                (
                    label,
                    ROWS[label],
                    None,
                    tuple(t for t in targets if t == "int4" or label in int8_rows),
                )
                for label in args.rows.split(",")
            ]
            if args.overrides and task.name == "rec":
                plan += rec_override_rows(task.module)
            for label, spec, ovr, row_targets in plan:
                for target in row_targets:
                    r = run_row(task, label, spec, target, ref, args, Path(tmp), ovr)
                    rows.append(r)
                    print(
                        f"{task.name} {label} {target}: "
                        + (
                            r.get("error")
                            or f"sim {_cell(task.name, r['sim_vs_fp32'])}"
                            f"{_kept(r['sim_vs_truth'])}, ORT {_cell(task.name, r.get('ort_vs_fp32'))}"
                            f"{_kept(r.get('ort_vs_truth'))} {r.get('export_error', '')}"
                            f" ({r['quantize_seconds']:.0f} s)"
                        ),
                        flush=True,
                    )
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2, default=str) + "\n", force=True)
    print()
    print(table(rows))
    print(f"\n{result['seconds']:.0f} s in all")
    return 0


def rec_override_rows(module: torch.nn.Module) -> list[tuple[str, dict, dict | None, tuple]]:
    """Diagnostic recognizer rows (``target="int4"`` only): the W4A8 and W8A8 recipes with float
    activations, and the W4A8 / W8A8 recipes with the inputs of the Linear layers (the SVTR
    block's attention and MLP and the CTC head: ONNX MatMuls that omse rewrites into
    ``omse_linear*``) left in float."""
    del module  # the groups are named by pattern
    float_in = {"omse_linear*": {"act_bits": None}}
    return [
        (
            "W4A32 recipe (float activations)",
            {**ROWS["W4A8 recipe"], "act_bits": None},
            None,
            ("int4",),
        ),
        (
            "W8A32 recipe (float activations)",
            {**ROWS["W8A8 recipe"], "act_bits": None},
            None,
            ("int4",),
        ),
        ("W4A8 recipe, Linear inputs float", ROWS["W4A8 recipe"], float_in, ("int4",)),
        ("W8A8 recipe, Linear inputs float", ROWS["W8A8 recipe"], float_in, ("int4",)),
    ]


if __name__ == "__main__":
    sys.exit(main())
