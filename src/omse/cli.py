"""Command line: ``omse demo | quantize | eval | report | export | save | models``.

``quantize``/``report``/``export``/``save`` start from a recipe (``--recipe fast|default|best``,
:meth:`omse.QuantConfig.preset`; default: the default recipe) and each flag given overrides one
of its fields. A user model (``package.module:factory``, imported from the current folder first)
takes its calibration images from ``--calib`` (resized, centre-cropped and normalised by
``--resize``/``--input-size``/``--mean``/``--std`` or ``--transform``) or its batches from
``--calib-loader``; the agreement with FP32 is measured on ``--eval`` images, else on the
calibration inputs, and every result says which (``eval_on``, ``eval_held_out``).

Every failure omse anticipates is one line on stderr and exit code 2; ``--debug`` shows the
traceback.

``torchrun --nproc-per-node N -m omse quantize|report|save|export ...`` shards calibration (and
evaluation) over ``N`` processes (:mod:`omse.distributed`): each rank calibrates on every N-th
batch, the statistics are reduced so the model is the one a single process makes, and rank 0
alone prints and writes outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .distributed import gather_rows, init_from_env, is_distributed, is_main, shard, world
from .errors import OmseError

__all__ = ["main", "build_parser"]


RECIPES = ("fast", "default", "best")
TASKS = ("auto", "classify", "detect", "dense", "sequence")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """A user model's images: size, resizing, normalisation, a calibration loader, held-out
    evaluation images (built-in models bring their own)."""
    g = p.add_argument_group("a user model's data (package.module:factory models)")
    g.add_argument(
        "--input-size",
        metavar="H[xW]",
        help="model input height and width in pixels (default 224; 'H' for a square)",
    )
    g.add_argument(
        "--resize",
        metavar="crop|letterbox|stretch|N",
        help="how images reach the input size: crop (shorter side to 8/7 of the input size, "
        "then the centre: classifiers; N: shorter side to N pixels), letterbox (aspect ratio "
        "kept, padded: detectors) or stretch. Default: crop, or letterbox for an ONNX file "
        "whose metadata is Ultralytics' (said in one line). --eval images get the same",
    )
    g.add_argument(
        "--pad-value",
        type=int,
        metavar="V",
        help="with --resize letterbox: the padding's grey level, 0..255 (default 114, as "
        "Ultralytics and YOLOX train)",
    )
    g.add_argument(
        "--letterbox-pad",
        choices=["center", "bottom-right"],
        help="with --resize letterbox: the image centred, padding on all sides (default: "
        "Ultralytics' LetterBox, the exports whose metadata omse reads), or at the top left, "
        "padding bottom and right (YOLOX)",
    )
    g.add_argument(
        "--mean", type=float, nargs=3, metavar="M", help="per-channel mean (RGB, images in [0, 1])"
    )
    g.add_argument("--std", type=float, nargs=3, metavar="S", help="per-channel std (RGB)")
    g.add_argument(
        "--transform",
        metavar="MODULE:FN",
        help="instead of --mean/--std: FN(images [N, 3, H, W] in [0, 1]) -> the model's input",
    )
    g.add_argument(
        "--eval",
        metavar="FOLDER",
        help="held-out evaluation images for the agreement with FP32 (never the calibration "
        "images)",
    )
    g.add_argument("--eval-size", type=int, metavar="N", help="use the first N --eval images")
    g.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="how outputs are compared with FP32: classify (top-1 of [N, classes]), detect "
        "(decoded boxes: recall/precision of FP32's detections), dense (per-position argmax over "
        "axis 1), sequence (argmax over the last axis); auto: detect for a recognised YOLO-style "
        "head, else by the output's rank",
    )


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="built-in model name (see `omse models`), package.module:factory, or a float "
        "ONNX file (model.onnx; calibration images sized from its input's static dims) or "
        "TFLite file (model.tflite: NHWC input, images sized from it)",
    )
    p.add_argument(
        "--weights", help="weights file for a package.module:factory model (safetensors)"
    )
    p.add_argument("--calib", help="folder of calibration images (default: the model's own set)")
    p.add_argument(
        "--calib-size",
        type=int,
        help="number of calibration images (default 32; with --calib-loader: all its batches, "
        "or batches until this many samples)",
    )
    p.add_argument(
        "--calib-loader",
        metavar="MODULE:FN",
        help="instead of --calib: FN() returns an iterable of calibration batches as the model "
        "takes them (tensors, (inputs, labels) tuples or dicts of keyword tensors)",
    )
    _add_data_args(p)
    r = p.add_argument_group(
        "recipe (the options below override the recipe's fields)",
    )
    r.add_argument(
        "--recipe",
        default="default",
        choices=RECIPES,
        help="default: W4A8 kernel-wise MMSE + residual tensors within 10%% extra MACs (merged "
        "into one 8-bit kernel, free at run time, with --target int8) + bias correction; fast: "
        "plain MMSE (no residuals, no bias correction; one calibration pass); best: default + "
        "learned rounding (minutes on ImageNet-sized models)",
    )
    r.add_argument("--weight-bits", "-w", type=int, help="weight bits (2-8; recipe: 4)")
    r.add_argument("--act-bits", "-a", help="activation bits (2-8), or 'float' (recipe: 8)")
    r.add_argument("--method", help="weight and activation range method (recipe: mmse)")
    r.add_argument(
        "--granularity", help="per_channel | per_tensor | per_group<N> (recipe: per_channel)"
    )
    r.add_argument(
        "--budget",
        type=float,
        help="extra MACs for residual tensors, a fraction (recipe: 0.1; fast: 0)",
    )
    r.add_argument(
        "--max-weight-bytes",
        metavar="B",
        help="per-layer weight precision: each layer at --weight-bits or 8 bits, by measured "
        "effect on the output, the weights within B: a fraction of the 8-bit weight bytes "
        "('0.6', '0.6x', '60%%'), bytes ('1.5MB', '800KiB') or 'none' (every layer at "
        "--weight-bits) (recipe: 0.6x; fast: none)",
    )
    r.add_argument(
        "--guard-db",
        metavar="DB",
        help="grow the weight budget while the plan's output SQNR on the calibration data is "
        "more than DB below its 8-bit-weight version's; 'off' for none (recipe: 3)",
    )
    r.add_argument(
        "--float-fallback",
        metavar="DB",
        help="run with float activations (weights at 8 bits) the layers whose 8-bit "
        "activations alone would bring the model's output SQNR below DB (estimated after "
        "calibration, within a quarter of the MACs; the model is then calibrated again; the "
        "JSON's float_fallback lists them); 'off' for none (default: 20)",
    )
    r.add_argument(
        "--range-choice",
        choices=["on", "off"],
        help="on: each 8-bit activation quantizer keeps its MMSE step or takes the min-max "
        "step, whichever has the smaller estimated effect on the model's output (the float "
        "fallback's pass; the JSON's min_max_ranges lists the layers); off (default): every "
        "step MMSE",
    )
    r.add_argument(
        "--residual-criterion",
        choices=["output", "weight", "network"],
        help="how kernels are ranked for the budget: layer-output error (recipe), weight MSE, or "
        "layer-output error weighed by the layer's measured effect on the model's output (one "
        "calibration pass per layer)",
    )
    r.add_argument(
        "--target",
        choices=["int4", "int8", "tflite"],
        help="hardware the model is for: int8 (onnxruntime CPU, OpenVINO, TensorRT: one 8-bit "
        "integer kernel per layer, residual tensors merged at no run-time cost), tflite (LiteRT "
        "and TensorFlow Lite Micro: int8 activations, packed INT4 or INT8 filters; the default "
        "with --out FILE.tflite) or int4 (accelerators with 4-bit MACs; residual tensors are "
        "extra MACs; the recipe's)",
    )
    r.add_argument("--first-last-8bit", action="store_true", help="first and last layer at W8A8")
    r.add_argument(
        "--skip", action="append", default=[], help="module name (pattern) left in float"
    )
    r.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        help="correct each layer's output mean (recipe: on; fast: off)",
    )
    r.add_argument(
        "--equalize", action=argparse.BooleanOptionalAction, help="cross-layer equalization"
    )
    r.add_argument("--output-aware", action="store_true", help="= --rounding gptq")
    r.add_argument(
        "--rounding",
        choices=["nearest", "gptq", "learned"],
        help="first-term rounding: nearest (recipe), gptq, or learned (learned against each "
        "block's FP32 output, activations in the loop: the best recipe)",
    )
    r.add_argument(
        "--rounding-scope",
        choices=["block", "layer"],
        help="what learned rounding reconstructs: layer (each layer from its patch moments; "
        "recipe) or block (the model's own blocks, BRECQ/QDrop style, activations in the loop)",
    )
    r.add_argument(
        "--rounding-blocks",
        action="append",
        default=[],
        metavar="PATTERN",
        help="module name (pattern) reconstructed as one block (repeatable; default: found "
        "from the model's module hierarchy)",
    )
    r.add_argument("--rounding-iters", type=int, help="learned rounding iterations per block")
    r.add_argument(
        "--rounding-learn-act",
        action="store_true",
        help="learn the activation steps with the rounding (from their MMSE values)",
    )
    r.add_argument("--strict", action="store_true", help="fail on layers omse cannot quantize")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def _add_onnx_io_args(p: argparse.ArgumentParser) -> None:
    """The exported graph's interface (``omse.export_onnx``'s ``dynamic_axes``, names)."""
    p.add_argument(
        "--dynamic-axes",
        action="append",
        default=[],
        metavar="NAME:AXIS=DIM[,AXIS=DIM]",
        help="free more axes of an input or output (axis 0 is dynamic already), e.g. "
        "input:2=height,3=width; repeatable",
    )
    p.add_argument("--input-names", metavar="A,B", help="the graph's input names")
    p.add_argument("--output-names", metavar="Y[,Z]", help="the graph's output names")
    p.add_argument(
        "--int8-weights",
        default="auto",
        choices=["auto", "s8", "u8"],
        help="8-bit weight storage: auto writes layers whose codes lie within +-64 (every 8-bit "
        "layer of target int8: 7-bit codes) as INT8 (u8s8 kernels, exact on any x86 CPU) and "
        "wider ones (merged residual kernels) as UINT8 at zero point 128 (u8u8: exact on x86 "
        "CPUs without VNNI, where u8s8 can saturate, but slower on VNNI CPUs); s8 writes INT8 "
        "everywhere (fastest on CPUs with VNNI and on ARM); u8 UINT8 everywhere",
    )


def _parse_dynamic_axes(items: list[str]) -> dict[str, dict[int, str]] | None:
    """``["input:2=height,3=width", ...]`` -> ``{"input": {2: "height", 3: "width"}}``."""
    out: dict[str, dict[int, str]] = {}
    for item in items:
        name, sep, spec = item.partition(":")
        axes = {}
        for part in spec.split(",") if sep else []:
            axis, eq, dim = part.partition("=")
            if not eq or not axis.strip().lstrip("-").isdigit() or not dim.strip():
                axes = None
                break
            axes[int(axis)] = dim.strip()
        if not name or not axes:
            raise OmseError(
                f"--dynamic-axes {item!r}: write NAME:AXIS=DIM[,AXIS=DIM], e.g. "
                "input:2=height,3=width"
            )
        out.setdefault(name, {}).update(axes)
    return out or None


def _names(text: str | None) -> list[str] | None:
    return None if not text else [n.strip() for n in text.split(",")]


def int8_weights_line(types: dict[str, list[str]]) -> str:
    """One line on the 8-bit weight containers of an export (the layer lists are in its
    metadata, :func:`omse.deploy.export.weight_types`)."""
    s8, u8 = len(types["INT8"]), len(types["UINT8"])
    return (
        f"int8 weights: {s8} layers INT8 (codes within +-64, exact on any x86), {u8} UINT8 "
        "(full range; slower on VNNI CPUs); --int8-weights s8|u8|auto"
    )


def _info(*lines: str) -> None:
    """Print informational lines (what was read, chosen, written), unless ``--quiet``: results,
    warnings and errors are printed whatever it says."""
    from .runtime import is_quiet

    if not is_quiet():
        for line in lines:
            print(line)


def _export_tflite(qmodel, batches: list, args, res: dict) -> dict[str, Any]:
    """``--out FILE.tflite``: write it and say what it holds (one line)."""
    from .deploy.tflite import export_tflite
    from .transforms.statistics import first_row

    out = export_tflite(
        qmodel, first_row(batches[0]), args.out, force=args.force, io=args.tflite_io,
        input_layout=args.input_layout,
    )  # fmt: skip
    kinds = out.filter_types()
    fb = res.get("tflite_budget")
    within = f" (budget {fb['max_bytes']:,}: {out.bytes / fb['max_bytes']:.3f}x)" if fb else ""
    _info(
        f"wrote {args.out}: {out.bytes:,} bytes{within}; filters {kinds.get('INT4', 0)} INT4, "
        f"{kinds.get('INT8', 0)} INT8; {args.tflite_io} input/output"
        + (f"; {len(out.requant)} requantizations inserted" if out.requant else "")
    )
    return {"bytes": out.bytes, "filters": out.layers, "requant": out.requant,
            "io": out.io, "input_layout": out.input_layout}  # fmt: skip


def _export(qmodel, batches: list, args, **kw):
    from .deploy.export import export_onnx, weight_types
    from .transforms.statistics import first_row

    path = export_onnx(
        qmodel,
        first_row(batches[0]),
        args.out,
        force=args.force,
        target=args.target,  # None: the target the model was quantized for
        input_names=_names(args.input_names),
        output_names=_names(args.output_names),
        dynamic_axes=_parse_dynamic_axes(args.dynamic_axes),
        int8_weights=args.int8_weights,
        **kw,
    )
    types = weight_types(path)
    if types:
        _info(int8_weights_line(types))
    return path, types


def _weight_types_json(types: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """An export's 8-bit weight containers for the JSON: every layer, by name (the printed line
    has the counts)."""
    if not types:
        return {}
    return {"int8_weight_layers": types["INT8"], "uint8_weight_layers": types["UINT8"]}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit code 2, as every anticipated failure)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


QUIET_HELP = (
    "print only results, warnings and errors: no progress display, no informational lines "
    "(what was read, chosen and written); the JSON (--json) keeps everything"
)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    """``--quiet`` after the command too (``omse quantize ... --quiet``); SUPPRESS keeps the
    value given before the command."""
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="omse", description="Post-training low-bit quantization by exact MMSE.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the default job: EfficientNet-Lite0 table (results/demo.json)")
    d.add_argument("--calib-size", type=int, default=16, help="calibration images (16-64)")
    d.add_argument("--views", type=int, default=200)
    d.add_argument("--json", default="results/demo.json")
    d.add_argument("--quick", action="store_true", help="fewer rows")
    d.add_argument("--no-report", action="store_true", help="skip the W4A4 per-layer report")

    q = sub.add_parser("quantize", help="quantize a model and evaluate it against FP32")
    _add_quant_args(q)
    q.add_argument(
        "--out",
        help="write the packed quantized checkpoint here (.safetensors), the quantized ONNX "
        "graph for --target (.onnx), or a LiteRT / TensorFlow Lite Micro model (.tflite: "
        "--target tflite unless given); with --blockwise, the output folder",
    )
    q.add_argument(
        "--max-bytes",
        metavar="B",
        help="with --out FILE.tflite: the file's size limit, in bytes (60000, 60KB) or as a "
        "fraction of the same model's all-INT8 file (0.6, 0.6x, 60%%); each layer's filter "
        "is INT4 or INT8 by measured sensitivity to fit it (the guard is off)",
    )
    q.add_argument(
        "--tflite-io",
        choices=["float32", "int8"],
        default="float32",
        help="with --out FILE.tflite: the file's input and output type (int8: with the "
        "calibrated scales and zero points, as TFLite's converter writes MCU models)",
    )
    q.add_argument(
        "--input-layout",
        choices=["model", "nhwc"],
        default="model",
        help="with --out FILE.tflite: 'model' keeps the input as the model takes it (an NCHW "
        "image stays NCHW, transposed inside); 'nhwc' makes 4-D inputs TFLite's NHWC",
    )
    q.add_argument(
        "--blockwise",
        action="store_true",
        help="models larger than memory: read a package.module:factory model's --weights "
        "(safetensors file or *.safetensors.index.json shards) block by block and write one "
        "packed checkpoint per block to the --out folder (omse.deploy.blockwise)",
    )
    q.add_argument(
        "--blocks",
        action="append",
        metavar="PATTERN",
        help="with --blockwise: the blocks' module names (a ModuleList, or fnmatch patterns, "
        "repeatable; default: the model's largest ModuleList/Sequential of repeated modules)",
    )
    _add_onnx_io_args(q)

    e = sub.add_parser("eval", help="evaluate a saved omse checkpoint (or FP32 model) against FP32")
    e.add_argument("model", help="built-in model name, or a checkpoint written by `omse save`")
    e.add_argument(
        "--model",
        dest="arch",
        metavar="MODULE:FACTORY",
        help="a user model's checkpoint: the architecture (and, with --weights, its FP32 "
        "reference weights; without, FACTORY() must return the trained FP32 model)",
    )
    e.add_argument("--weights", help="FP32 weights for --model (safetensors)")
    _add_data_args(e)
    e.add_argument("--views", type=int, default=200)
    e.add_argument("--json")
    e.add_argument("--force", action="store_true")

    r = sub.add_parser("report", help="per-layer report (markdown, CSV, PNG)")
    _add_quant_args(r)
    r.add_argument("--out-dir", default="results/report")

    x = sub.add_parser("export", help="quantize and export (ONNX QDQ)")
    _add_quant_args(x)
    x.add_argument("--format", default="onnx", choices=["onnx"])
    x.add_argument(
        "--container",
        default="int4",
        choices=["int4", "int8"],
        help="with --target int4: int4 writes INT4/UINT4 tensors (opset 21); int8 the same "
        "values in 8-bit containers (the older form; prefer --target int8)",
    )
    x.add_argument(
        "--integer",
        action="store_true",
        help="integer form: layers run on the integer codes and rescale after (a Mul), so "
        "onnxruntime reproduces omse's integer mode (omse.set_integer) bit for bit",
    )
    x.add_argument("--out", required=True)
    _add_onnx_io_args(x)

    s = sub.add_parser("save", help="quantize and save a packed 4-bit checkpoint")
    _add_quant_args(s)
    s.add_argument("--out", required=True)

    m = sub.add_parser("models", help="list built-in models")
    for p in (d, q, e, r, x, s, m):
        _add_quiet(p)
    return ap


def _config_from_args(args) -> Any:
    from .config import QuantConfig
    from .zoo.demo import LITE0_FIRST_LAST

    if args.act_bits is None:
        act = None  # the recipe's
    elif str(args.act_bits).lower() in ("float", "none", "32"):
        act = "float"
    else:
        act = _int(args.act_bits, "--act-bits")
    overrides = {}
    if args.first_last_8bit:
        if args.model == "efficientnet-lite0":
            overrides = LITE0_FIRST_LAST
        else:
            overrides = {
                "__first__": {"weight_bits": 8, "act_bits": 8},
                "__last__": {"weight_bits": 8, "act_bits": 8},
            }
    given = {
        "weight_bits": args.weight_bits,
        "act_bits": act,
        "weight_method": args.method,
        "act_method": args.method,
        "granularity": args.granularity,
        "extra_mac_budget": args.budget,
        "residual_criterion": args.residual_criterion,
        "bias_correction": args.bias_correction,
        "equalize": args.equalize,
        "rounding": args.rounding,
        "rounding_scope": args.rounding_scope,
        "rounding_iters": args.rounding_iters,
        "target": args.target or ("tflite" if _is_tflite_out(args) else None),
    }
    kw = {k: v for k, v in given.items() if v is not None}  # None: the recipe's value
    if act == "float":
        kw["act_bits"] = None
    if args.output_aware:
        kw["output_aware"] = True
    if args.strict:
        kw["strict"] = True
    if args.rounding_blocks:
        kw["rounding_blocks"] = tuple(args.rounding_blocks)
    if args.rounding_learn_act:
        kw["rounding_learn_act"] = True
    budget = _budget_from_args(args, QuantConfig.preset(args.recipe).budget)
    if budget is not _RECIPE:
        kw["budget"] = budget
    cfg = QuantConfig.preset(args.recipe, skip=tuple(args.skip), overrides=overrides, **kw)
    text = getattr(args, "float_fallback", None)
    if text is not None:
        from dataclasses import replace

        if text.strip().lower() in ("off", "none"):
            db = None
        else:
            try:
                db = float(text)
            except ValueError:
                raise OmseError(f"--float-fallback {text!r}: use a number of dB or 'off'") from None
        cfg = replace(cfg, activations=replace(cfg.activations, fallback_db=db))
    choice = getattr(args, "range_choice", None)
    if choice is not None:
        from dataclasses import replace

        cfg = replace(cfg, activations=replace(cfg.activations, choose_range=choice == "on"))
    return cfg


_RECIPE = object()


def _budget_from_args(args, recipe_budget):
    """``--max-weight-bytes`` / ``--guard-db`` as a :class:`~omse.config.Budget` (or None), or
    ``_RECIPE`` when neither is given."""
    from dataclasses import replace

    from .config import Budget, parse_budget

    text, guard = getattr(args, "max_weight_bytes", None), getattr(args, "guard_db", None)
    if text is None and guard is None:
        return _RECIPE
    try:
        budget = parse_budget(text) if text is not None else (recipe_budget or Budget())
    except OmseError as e:
        raise OmseError(f"--max-weight-bytes {text!r}: {e}") from None
    if guard is not None:
        if budget is None:
            raise OmseError("--guard-db goes with a weight budget, not --max-weight-bytes none")
        if guard.strip().lower() in ("off", "none"):
            budget = replace(budget, guard_db=None)
        else:
            try:
                budget = replace(budget, guard_db=float(guard))
            except ValueError:
                raise OmseError(f"--guard-db {guard!r}: use a number of dB or 'off'") from None
    return budget


def _int(v: str, name: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise OmseError(f"{name} must be an integer or 'float', got {v!r}") from None


def _resolve_first_last(model: torch.nn.Module, overrides: dict) -> dict:
    if "__first__" not in overrides:
        return overrides
    from .transforms.fold import QUANTIZABLE

    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    return {names[0]: overrides["__first__"], names[-1]: overrides["__last__"]}


_USER_DATA_ARGS = (
    "input_size",
    "resize",
    "pad_value",
    "letterbox_pad",
    "mean",
    "std",
    "transform",
)


def _reject_user_data_args(args, name: str) -> None:
    """Preprocessing options are for a user's model: a built-in model brings its own."""
    for k in _USER_DATA_ARGS:
        if getattr(args, k, None) is not None:
            raise OmseError(
                f"--{k.replace('_', '-')} is for package.module:factory models; {name!r} is "
                "built in and brings its own input size and preprocessing"
            )


def _input_size(text: str | None) -> tuple[int, int]:
    """``--input-size H`` or ``HxW`` -> ``(H, W)`` (default 224 x 224)."""
    if text is None:
        return 224, 224
    parts = text.lower().replace(",", "x").split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        hw = []
    if len(hw) not in (1, 2) or min(hw) < 1:
        raise OmseError(
            f"--input-size must be H or HxW in pixels (e.g. 224, 256x320), got {text!r}"
        )
    return (hw[0], hw[-1])


def _fit(args, default: str = "crop") -> dict[str, Any]:
    """``--resize``/``--pad-value``/``--letterbox-pad`` -> :func:`omse.zoo.data.fit_image`'s
    ``mode``, ``resize``, ``pad_value``, ``pad`` (``default``: the mode when ``--resize`` is not
    given). Refuses an unknown mode and letterbox options without letterbox."""
    from .zoo.data import RESIZE_MODES

    text = getattr(args, "resize", None)
    mode, short = default, None
    if text is not None:
        t = str(text).strip().lower()
        if t in RESIZE_MODES:
            mode = t
        elif t.isdigit() and int(t) > 0:
            mode, short = "crop", int(t)
        else:
            raise OmseError(
                f"--resize must be crop, letterbox, stretch or a shorter side N in pixels "
                f"(crop), got {text!r}"
            )
    pad_value, pad = getattr(args, "pad_value", None), getattr(args, "letterbox_pad", None)
    for flag, v in (("--pad-value", pad_value), ("--letterbox-pad", pad)):
        if v is not None and mode != "letterbox":
            raise OmseError(f"{flag} goes with --resize letterbox, not {mode}")
    if pad_value is not None and not 0 <= pad_value <= 255:
        raise OmseError(f"--pad-value must be a grey level 0..255, got {pad_value}")
    return {
        "mode": mode,
        "resize": short,
        "pad_value": 114 if pad_value is None else pad_value,
        "pad": pad or "center",
    }


def _describe_fit(fit: dict[str, Any]) -> str:
    """One phrase for :func:`_fit`'s settings, e.g. ``letterboxed (centred, pad 114)``."""
    if fit["mode"] == "letterbox":
        where = "centred" if fit["pad"] == "center" else "padded bottom-right"
        return f"letterboxed ({where}, pad {fit['pad_value']})"
    if fit["mode"] == "stretch":
        return "stretched to it"
    short = "8/7 of the input size" if fit["resize"] is None else f"{fit['resize']} pixels"
    return f"centre-cropped (shorter side resized to {short})"


class _Transform:
    """``--transform MODULE:FN`` applied to image batches, with errors that name it."""

    def __init__(self, target: str) -> None:
        from .zoo.models import import_object

        self.target, self.fn = target, import_object(target, "--transform")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        try:
            y = self.fn(x)
        except Exception as e:
            raise OmseError(
                f"--transform {self.target} failed on images {list(x.shape)}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not isinstance(y, torch.Tensor):
            raise OmseError(f"--transform {self.target} returned {type(y).__name__}, not a tensor")
        return y


class _Normalize:
    """``(x - mean) / std`` per RGB channel, images ``[N, 3, H, W]`` in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        if any(not s > 0 for s in std):
            raise OmseError(f"--std values must be > 0, got {std}")
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _user_preprocess(args):
    """The user model's preprocessing of ``[N, 3, H, W]`` images in [0, 1], or None."""
    if args.transform:
        if args.mean is not None or args.std is not None:
            raise OmseError("--transform replaces --mean/--std: give one or the other")
        return _Transform(args.transform)
    if (args.mean is None) != (args.std is None):
        raise OmseError("--mean and --std go together (3 floats each, RGB)")
    return None if args.mean is None else _Normalize(args.mean, args.std)


def _batch_len(b) -> int:
    if isinstance(b, dict):
        b = next((v for v in b.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(b, tuple | list) and b:
        b = b[0]
    return b.shape[0] if isinstance(b, torch.Tensor) and b.dim() else 1


def _loader_batches(target: str, limit: int | None) -> list:
    """The batches ``--calib-loader MODULE:FN`` yields (all, or until ``limit`` samples)."""
    from .zoo.models import import_object

    fn = import_object(target, "--calib-loader")
    try:
        it = iter(fn())
    except TypeError as e:
        raise OmseError(f"--calib-loader {target}() must return an iterable of batches: {e}") from e
    except Exception as e:
        raise OmseError(f"--calib-loader {target}() failed: {type(e).__name__}: {e}") from e
    batches, n = [], 0
    try:
        for b in it:
            batches.append(b)
            n += _batch_len(b)
            if limit is not None and n >= limit:
                break
    except OmseError:
        raise
    except Exception as e:
        raise OmseError(
            f"--calib-loader {target}: reading batch {len(batches)} failed: {type(e).__name__}: {e}"
        ) from e
    if not batches:
        raise OmseError(f"--calib-loader {target}() yielded no batches")
    return batches


def _eval_folder(args, size: tuple[int, int] | int, fit: dict | None = None) -> torch.Tensor:
    """The ``--eval`` images at ``size``, fitted as the calibration images are (``fit``:
    :func:`_fit`'s settings; default: from the flags)."""
    from .zoo.data import load_image_folder

    if args.eval_size is not None and args.eval_size < 1:
        raise OmseError(f"--eval-size must be >= 1, got {args.eval_size}")
    fit = _fit(args) if fit is None else fit
    return load_image_folder(args.eval, size, args.eval_size, role="evaluation", **fit)


_DEFAULT_SIZE = "the default (give --input-size HxW for another)"


def _user_data(
    args,
    size: tuple[int, int] | None = None,
    size_from: str = _DEFAULT_SIZE,
    fit: dict | None = None,
    fit_from: str = "",
):
    """A user model's (preprocess, calib batches, eval inputs, eval labels): images from
    ``--calib`` (or batches from ``--calib-loader``); evaluation on ``--eval`` images, else on
    the calibration data (labelled optimistic by :func:`_eval_label`).

    ``size``: the input ``(H, W)`` (default: ``--input-size``, else 224 x 224) and ``size_from``
    where it came from; ``fit``: :func:`_fit`'s settings (default: from the flags) and
    ``fit_from`` why, when not from the flags. Image folders are announced in one line: the size,
    where it came from, and how images were fitted to it."""
    from .zoo.data import load_image_folder

    if size is None and args.input_size is not None:
        size, size_from = _input_size(args.input_size), "--input-size"
    size = _input_size(None) if size is None else size
    pre = _user_preprocess(args)
    fit = _fit(args) if fit is None else fit
    if args.calib and not args.calib_loader:
        _info(
            f"input size {size[0]}x{size[1]} from {size_from}; images {_describe_fit(fit)}"
            + (f": {fit_from}" if fit_from else "")
        )
    if args.calib_loader:
        batches = _loader_batches(args.calib_loader, args.calib_size)
        ev_x = batches  # model inputs already: no preprocessing
    elif not args.calib:
        raise OmseError(
            "a user model needs --calib FOLDER (calibration images) or --calib-loader MODULE:FN"
        )
    else:
        calib = load_image_folder(args.calib, size, args.calib_size or 32, **fit)
        batches = [pre(b) if pre else b for b in calib.split(8)]
        ev_x = calib
    if args.eval:
        ev_x = _eval_folder(args, size, fit)
    return pre, batches, ev_x, None


def _load_task(args):
    """(model, preprocess, calib batches, eval inputs, eval labels)."""
    from .zoo.data import load_image_folder
    from .zoo.models import REGISTRY, load_user_model
    from .zoo.tasks import get_task

    if args.calib_size is not None and args.calib_size < 1:
        raise OmseError(f"--calib-size must be >= 1, got {args.calib_size}")
    if args.weights and args.model in REGISTRY:
        raise OmseError(
            f"--weights is for package.module:factory models; {args.model!r} is built in "
            "and ships its own weights"
        )
    if args.calib and args.calib_loader:
        raise OmseError("give --calib FOLDER or --calib-loader MODULE:FN, not both")
    if args.model in REGISTRY:
        _reject_user_data_args(args, args.model)
        task = get_task(args.model)
        model = task.build()
        pre = None  # the task's inputs come preprocessed
        fmnist = task.spec.task == "fmnist"
        if fmnist and (args.calib or args.eval):
            raise OmseError(
                f"{args.model} takes 28x28 Fashion-MNIST images: --calib/--eval image folders "
                "are for RGB models (use --calib-loader for your own batches)"
            )
        if args.eval:
            ev_x, ev_y = task.spec.preprocess(_eval_folder(args, task.spec.input_shape[-1])), None
        else:
            ev_x, ev_y = task.evaluation(2000 if fmnist else 200)
        n_calib = args.calib_size or 32
        if args.calib_loader:
            return model, pre, _loader_batches(args.calib_loader, args.calib_size), ev_x, ev_y
        if args.calib:
            folder = load_image_folder(args.calib, task.spec.input_shape[-1], n_calib)
            calib = task.spec.preprocess(folder)
        else:
            calib = task.calibration(n_calib)
    else:
        if _is_onnx_path(args.model):
            return _load_onnx_task(args)
        if _is_tflite_path(args.model):
            return _load_tflite_task(args)
        model = load_user_model(args.model, args.weights)
        return (model, *_user_data(args))
    batches = [
        pre(calib[i : i + 8]) if pre else calib[i : i + 8] for i in range(0, calib.shape[0], 8)
    ]
    return model, pre, batches, ev_x, ev_y


def _is_tflite_out(args) -> bool:
    out = getattr(args, "out", None)
    return bool(out) and str(out).lower().endswith(".tflite")


def _is_onnx_path(model: str) -> bool:
    return model.lower().endswith(".onnx")


def _onnx_input_size(args, proto, dims: list) -> tuple[tuple[int, int], str]:
    """The calibration images' ``(H, W)`` for an ONNX image model whose input has ``dims``
    ``[N, C, H, W]``, and where it came from: ``--input-size``, else the input's static ``H``
    and ``W``, else the size its ``metadata_props`` name (:data:`INPUT_SIZE_KEYS`), else 224 for
    each dynamic side. A metadata value that is no size, or one that contradicts a static side,
    is an error."""
    from .transforms.onnx_import import INPUT_SIZE_KEYS, metadata_input_size

    if args.input_size is not None:
        return _input_size(args.input_size), "--input-size"
    h, w = (d if isinstance(d, int) else None for d in dims[2:])
    if h and w:
        return (h, w), "the model's static input shape"
    meta = metadata_input_size(proto)
    if meta is not None:
        key, value, hw = meta
        if hw is None:
            raise OmseError(
                f"{args.model}: its metadata {key}={value!r} names no image size omse reads "
                "(S, [H, W] or [N, C, H, W]): give --input-size HxW"
            )
        if (h and h != hw[0]) or (w and w != hw[1]):
            raise OmseError(
                f"{args.model}: its metadata {key}={value!r} contradicts the input's static shape "
                f"{dims}: give --input-size HxW"
            )
        return hw, f"the model's metadata ({key})"
    keys = ", ".join(INPUT_SIZE_KEYS)
    return (h or 224, w or 224), (
        f"the default for a dynamic side (the input's shape is {dims} and its metadata names no "
        f"size: {keys}; give --input-size HxW if it was trained at another)"
    )


def _onnx_fit(args, proto) -> tuple[dict[str, Any], str]:
    """:func:`_fit`'s settings for an ONNX image model and why when not from the flags: without
    ``--resize``, letterbox for an Ultralytics export (its metadata's ``author`` says so, or it
    has Ultralytics' ``imgsz`` and ``stride``), which trains and predicts on letterboxed
    images; crop otherwise."""
    from .transforms.onnx_import import metadata

    meta = {k.lower(): v for k, v in metadata(proto).items()}
    ultralytics = "ultralytics" in meta.get("author", "").lower() or {"imgsz", "stride"} <= set(
        meta
    )
    if args.resize is not None or not ultralytics:
        return _fit(args), ""
    return _fit(args, "letterbox"), (
        "the model's metadata is Ultralytics' (its models see letterboxed images; --resize crop "
        "or stretch for another)"
    )


def _load_onnx_task(args):
    """``_load_task`` for a float ONNX image model: the user-model data options
    (:func:`_user_data`), with the input size from :func:`_onnx_input_size` and the resize mode
    from :func:`_onnx_fit`; the model converted and checked against onnxruntime on the first
    calibration batch."""
    from .transforms.onnx_import import load_onnx, onnx_io, read_onnx

    if args.weights:
        raise OmseError("--weights is for package.module:factory models; an ONNX file has its own")
    proto = read_onnx(args.model)[0]
    io = onnx_io(proto)
    if len(io["input_names"]) != 1 and not args.calib_loader:
        raise OmseError(
            f"{args.model} has {len(io['input_names'])} inputs ({io['input_names']}); calibration "
            "images feed one: give --calib-loader MODULE:FN (dict batches) or use omse.quantize"
        )
    dims = io["shapes"][io["input_names"][0]]
    size, size_from, fit, fit_from = None, _DEFAULT_SIZE, None, ""
    if not args.calib_loader:
        if len(dims) != 4:
            raise OmseError(
                f"{args.model}: input of shape {dims} is not an (N, C, H, W) image batch; give "
                "--calib-loader MODULE:FN"
            )
        c = dims[1] if isinstance(dims[1], int) else None
        if c not in (None, 3) and not args.transform:
            raise OmseError(
                f"{args.model}: an input of {c} channels is not an RGB image; give --transform "
                "MODULE:FN (RGB [N, 3, H, W] -> the model's input) or --calib-loader MODULE:FN"
            )
        size, size_from = _onnx_input_size(args, proto, dims)
        fit, fit_from = _onnx_fit(args, proto)
    pre, batches, ev_x, ev_y = _user_data(args, size, size_from, fit, fit_from)
    return load_onnx(args.model, sample=batches[0]), pre, batches, ev_x, ev_y


def _is_tflite_path(model: str) -> bool:
    return model.lower().endswith(".tflite")


class _ToNhwc:
    """A TFLite image model's preprocessing: the user's (``inner``: ``--mean``/``--std`` or
    ``--transform`` of ``[N, 3, H, W]`` images in [0, 1]), then NCHW -> NHWC, the layout the
    model takes. ``[N, 3, H, W] -> [N, H, W, C]``."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x) if self.inner is not None else x
        return y.permute(0, 2, 3, 1).contiguous() if y.dim() == 4 else y


def _load_tflite_task(args):
    """``_load_task`` for a float ``.tflite`` model: the user-model data options
    (:func:`_user_data`) at the input's static ``H`` x ``W`` (an NHWC ``[N, H, W, C]`` input; a
    contradicting ``--input-size`` is an error), images permuted to NHWC after the user's
    preprocessing (:class:`_ToNhwc`; pixels stay in [0, 1] unless ``--mean``/``--std`` or
    ``--transform`` scale them, e.g. ``--std`` of 1/255 for a model fed 0..255); the model
    converted and checked against LiteRT on the first calibration batch."""
    from .transforms.tflite_import import load_tflite, read_tflite, tflite_io

    if args.weights:
        raise OmseError("--weights is for package.module:factory models; a .tflite has its own")
    io = tflite_io(read_tflite(args.model)[0])
    names = io["input_names"]
    if len(names) != 1 and not args.calib_loader:
        raise OmseError(
            f"{args.model} has {len(names)} inputs ({names}); calibration images feed one: give "
            "--calib-loader MODULE:FN (tuple batches in the file's input order) or use "
            "omse.quantize"
        )
    if args.calib_loader:  # batches in the model's own layout
        pre, batches, ev_x, ev_y = _user_data(args)
        return load_tflite(args.model, sample=batches[0]), pre, batches, ev_x, ev_y
    dims = io["shapes"][names[0]]
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise OmseError(
            f"{args.model}: input of shape {dims} is not an (N, H, W, C) image batch of static "
            "size; give --calib-loader MODULE:FN"
        )
    h, w, c = dims[1:]
    if c != 3 and not args.transform:
        raise OmseError(
            f"{args.model}: an input of {c} channels is not an RGB image; give --transform "
            "MODULE:FN (RGB [N, 3, H, W] -> [N, C, H, W]; omse permutes it to NHWC) or "
            "--calib-loader MODULE:FN"
        )
    if args.input_size is not None and _input_size(args.input_size) != (h, w):
        raise OmseError(
            f"{args.model} takes {h}x{w} images (its input is {dims}, NHWC); --input-size "
            f"{args.input_size} contradicts it"
        )
    where = f"the .tflite's input shape {dims} (NHWC; pixels in [0, 1] unless --mean/--std)"
    pre, batches, ev_x, ev_y = _user_data(args, (h, w), where)
    nhwc = _ToNhwc(None)
    batches = [nhwc(b) for b in batches]
    return load_tflite(args.model, sample=batches[0]), _ToNhwc(pre), batches, ev_x, ev_y


def _eval_label(args, n: int) -> tuple[str, bool]:
    """What the agreement is measured on, and whether those inputs are held out."""
    from .zoo.models import REGISTRY

    if getattr(args, "eval", None):
        return f"{n} held-out images from {args.eval}", True
    if args.model in REGISTRY:
        if REGISTRY[args.model].task == "fmnist":
            return f"{n} Fashion-MNIST test images", True
        return f"{n} views of the 20 foolbox ImageNet images", True
    return (
        f"{n} calibration inputs (calibration images: optimistic; give --eval FOLDER for "
        "held-out images)",
        False,
    )


def _logits(model: torch.nn.Module, inputs, pre, desc: str, progress: bool = True) -> torch.Tensor:
    """``[N, classes]`` logits of ``model`` on a tensor of inputs (preprocessed by ``pre``) or
    on a list of calibration-loader batches (tensors, ``(inputs, ...)`` tuples or dicts)."""
    from .analysis.metrics import predict

    if isinstance(inputs, torch.Tensor):
        out = predict(model, inputs, pre, progress=progress, desc=desc)
    else:
        outs = []
        with torch.no_grad():
            for b in inputs:
                if isinstance(b, dict):
                    y = model(**b)
                else:
                    y = model(b[0] if isinstance(b, tuple | list) else b)
                y = getattr(y, "logits", y)
                outs.append(y[0] if isinstance(y, tuple | list) else y)
        if not all(isinstance(o, torch.Tensor) for o in outs):
            raise OmseError("the model's output is not a tensor of logits; agreement needs one")
        out = torch.cat([o.float() for o in outs])
    if out.dim() < 2:
        raise OmseError(
            f"the model's output has shape {list(out.shape)}: comparing it with FP32 needs "
            "[N, classes] logits or [N, C, ...] maps"
        )
    return out


def _compare(
    ref: torch.Tensor, out: torch.Tensor, labels, axis: int | None = None
) -> dict[str, Any]:
    """The quantized outputs against FP32's. ``[N, classes]`` logits: top-1 agreement, KL and
    top-1 accuracy (with labels). ``[N, C, ...]`` maps (detection, segmentation): the agreement
    of the per-position argmax over ``C`` (``None`` for one channel), output SQNR in dB.
    ``[N, T, classes]`` sequences (CTC recognizers, token logits): the per-step argmax over the
    last axis instead. ``axis``: the class axis of maps and sequences, instead of by rank."""
    from .analysis.metrics import compare_logits, sqnr_db

    if ref.dim() == 2 and axis is None:
        a = compare_logits(ref, out, labels)
        fp = compare_logits(ref, ref, labels).top1
        return {"agreement": a.agreement, "kl": a.kl, "top1": a.top1, "fp32_top1": fp, "n": a.n}
    axis = (-1 if ref.dim() == 3 else 1) if axis is None else axis
    c = ref.shape[axis]
    agree = None if c == 1 else float((ref.argmax(axis) == out.argmax(axis)).float().mean())
    return {
        "agreement": agree,
        "kl": None,
        "top1": None,
        "fp32_top1": None,
        "n": ref.shape[0],
        "output_sqnr_db": sqnr_db(ref, out),
    }


def _input_hw(inputs) -> tuple[int, int] | None:
    """``(H, W)`` of an image batch ``[N, C, H, W]`` (or of the first of a list of batches, or
    of a batch's first element), else None."""
    x = inputs[0] if isinstance(inputs, list) and inputs else inputs
    x = x[0] if isinstance(x, tuple | list) and x else x
    return tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None


def _compare_detections(name: str, ref, out, input_hw) -> dict[str, Any]:
    """Raw detector outputs (decoder ``name``) of FP32 and the quantized model -> the recall and
    precision of the quantized detections against FP32's (:mod:`omse.analysis.detection`'s
    defaults: score 0.25, NMS IoU 0.45, match IoU 0.5), and the raw output SQNR."""
    from .analysis import detection as det
    from .analysis.metrics import sqnr_db

    a = det.agreement(det.detect(name, [ref], input_hw), det.detect(name, [out], input_hw))
    return {
        "task": "detect",
        "decoder": name,
        "agreement": None,
        "kl": None,
        "top1": None,
        "fp32_top1": None,
        "n": ref.shape[0],
        "output_sqnr_db": sqnr_db(ref, out),
        "det_recall": a.recall,
        "det_precision": a.precision,
        "detections": a.n_out,
        "fp32_detections": a.n_ref,
        "det_settings": {
            "score": det.SCORE_THRESHOLD,
            "nms_iou": det.NMS_IOU,
            "iou": det.MATCH_IOU,
        },
    }


def _compare_task(task: str, ref, out, labels, input_hw) -> dict[str, Any]:
    """``--task``: the comparison of FP32's outputs ``ref`` with ``out`` (see its help); an
    output that does not fit the task is one error line."""
    from .analysis.detection import NotADetector, recognise

    shape = list(ref.shape)
    if task in ("auto", "detect"):
        try:
            return _compare_detections(recognise([ref.shape], input_hw), ref, out, input_hw)
        except NotADetector as e:
            if task == "detect":
                raise OmseError(f"--task detect: {e}") from e
        return {
            "task": "classify" if ref.dim() == 2 else "sequence" if ref.dim() == 3 else "dense",
            **_compare(ref, out, labels),
        }
    need = {"classify": ref.dim() == 2, "sequence": ref.dim() == 3, "dense": ref.dim() >= 3}
    if not need[task]:
        want = {"classify": "[N, classes]", "sequence": "[N, T, classes]", "dense": "[N, C, ...]"}
        raise OmseError(f"--task {task} compares {want[task]} outputs; the model's are {shape}")
    return {
        "task": task,
        **_compare(ref, out, labels, {"classify": None, "sequence": -1, "dense": 1}[task]),
    }


HELDOUT_GAP_DB = 3.0
"""The command line warns when the quantized model's output SQNR on the held-out inputs is more
than this many dB below its 8-bit-weight version's (the budget guard's tolerance, on data the
calibration never saw)."""


def _heldout_vs_8bit(qmodel, cal, cfg, inputs, pre, ref, out, bar) -> dict[str, Any] | None:
    """The quantized model against its 8-bit-weight version on the held-out inputs (one more
    pass, only when a per-layer plan left layers below 8 bits): their output SQNRs against FP32,
    the gap, and the layers whose bits cost most by the plan's estimates; ``"out"``: the 8-bit
    version's outputs (for the task's metric). None without such layers."""
    from .analysis.metrics import sqnr_db
    from .nn.layers import quantized_layers
    from .transforms.precision import costliest, eight_bit_weights

    plan = cal.precision
    if plan is None or cfg.budget is None:
        return None
    with eight_bit_weights(quantized_layers(qmodel)) as low:
        if not low:
            return None
        out8 = gather_rows(_logits(qmodel, inputs, pre, "8-bit weights", progress=bar))
    sq, sq8 = sqnr_db(ref, out), sqnr_db(ref, out8)
    return {
        "sqnr_db": round(sq, 2),
        "sqnr_8bit_db": round(sq8, 2),
        "gap_db": round(sq8 - sq, 2),
        "layers_below_8bit": len(low),
        "costliest": costliest(plan),
        "out": out8,
    }


def _warn_heldout(vs8: dict[str, Any] | None, m: dict[str, Any], held_out: bool = True) -> None:
    """One warning when the output SQNR on the evaluation inputs (``held_out``: inputs the
    calibration never saw) is more than :data:`HELDOUT_GAP_DB` below the 8-bit-weight version's
    (:func:`_heldout_vs_8bit`), with the task's figure for both."""
    if vs8 is None or vs8["gap_db"] <= HELDOUT_GAP_DB:
        return
    extra = ""
    if "agreement_8bit" in vs8:
        extra = f" (agreement {m['agreement']:.1%} against {vs8['agreement_8bit']:.1%})"
    elif "det_recall_8bit" in vs8:
        extra = f" (detections kept {m['det_recall']:.0%} against {vs8['det_recall_8bit']:.0%})"
    warnings.warn(
        f"on the {'held-out' if held_out else 'evaluation'} inputs the output SQNR "
        f"({vs8['sqnr_db']:.1f} dB) is "
        f"{vs8['gap_db']:.1f} dB below its 8-bit-weight version's ({vs8['sqnr_8bit_db']:.1f} "
        f"dB){extra}; the layers whose bits cost most: "
        f"{', '.join(vs8['costliest']) or '(set by overrides)'}; a larger --budget or "
        "--max-weight-bytes closes the gap",
        stacklevel=3,
    )


def _quantize_and_eval(args) -> tuple[Any, dict[str, Any]]:
    from .transforms.pipeline import Calibration, quantize

    model, pre, batches, ev_x, ev_y = _load_task(args)
    cfg = _config_from_args(args)
    if "__first__" in cfg.overrides:
        from dataclasses import replace

        cfg = replace(cfg, overrides=_resolve_first_last(model, cfg.overrides))
    fb = _tflite_file_budget(args, model, batches, cfg)
    if fb is not None:
        from dataclasses import replace

        from .config import Budget

        cfg = replace(cfg, budget=Budget(weight_bytes=fb.weight_bytes, guard_db=None))
    cal = Calibration()
    batches = shard(batches)  # under torchrun: this rank's calibration batches
    qmodel = quantize(model, batches, cfg, calibration=cal, progress=True)
    rank, size = world()
    mine, bar = ev_x[rank::size], is_main()  # evaluation rows too, gathered back in order
    ref = gather_rows(_logits(model, mine, pre, "FP32", progress=bar))
    out = gather_rows(_logits(qmodel, mine, pre, "quantized", progress=bar))
    hw = _input_hw(ev_x)
    m = _compare_task(args.task, ref, out, ev_y, hw)
    vs8 = _heldout_vs_8bit(qmodel, cal, cfg, mine, pre, ref, out, bar)
    if vs8 is not None:
        m8 = _compare_task(args.task, ref, vs8.pop("out"), ev_y, hw)
        for key in ("agreement", "det_recall"):
            if m.get(key) is not None and m8.get(key) is not None:
                vs8[f"{key}_8bit"] = m8[key]
    eval_on, held_out = _eval_label(args, m["n"])
    res = {
        "model": args.model,
        "recipe": args.recipe,
        "config": cfg.to_dict(),
        **{k: v for k, v in m.items() if k != "n"},
        "eval_inputs": m["n"],
        "eval_on": eval_on,
        "eval_held_out": held_out,
        "calib_batches": cal.batches,
        "calib_seconds": round(cal.seconds, 3),
        "left_float": cal.left_float,
        "float_weights": [vars(f) for f in cal.float_weights],
        "float_share": cal.float_share,
        "precision": _precision_json(cal.precision),
        "float_fallback": {n: round(db, 2) for n, db in cal.fallback.items()},
        "min_max_ranges": cal.corrections.get("min_max_ranges", {}),
        "heldout_vs_8bit": vs8,
    }
    _warn_heldout(vs8, m, held_out)
    if fb is not None:
        res["tflite_budget"] = vars(fb)
    return (model, qmodel, pre, batches, ev_x), res


def _tflite_file_budget(args, model, batches, cfg):
    """``--max-bytes``: the .tflite file budget as a weight budget (None without the flag)."""
    text = getattr(args, "max_bytes", None)
    if text is None:
        return None
    if not _is_tflite_out(args):
        raise OmseError("--max-bytes is the written .tflite's size: give --out FILE.tflite")
    if getattr(args, "max_weight_bytes", None) is not None:
        raise OmseError("--max-bytes and --max-weight-bytes are two budgets: give one")
    if cfg.target != "tflite":
        raise OmseError(f"--max-bytes needs --target tflite (got {cfg.target})")
    from .deploy.tflite import file_budget
    from .transforms.statistics import first_row

    fb = file_budget(
        model, batches, cfg, first_row(batches[0]), text, args.tflite_io, args.input_layout
    )
    _info(
        f"file budget {text}: {fb.max_bytes:,} bytes (the all-INT8 file is {fb.int8_bytes:,}; "
        f"{fb.overhead:,} of them graph and activation quantization): weights get "
        f"{fb.weight_bytes:,}"
    )
    return fb


def _precision_json(plan) -> dict[str, Any] | None:
    """The per-layer precision plan as JSON (None without a budget)."""
    if plan is None:
        return None
    return {
        "summary": plan.summary(),
        "budget_bytes": plan.budget_bytes,
        "bytes": plan.bytes,
        "bytes_8bit": plan.bytes_8bit,
        "residual_share": plan.residual_share,
        "residual_bytes": plan.residual_bytes,
        "bits": plan.bits,
        "fixed": plan.fixed,
        "guard": plan.guard,
        "choices": {
            n: [{"bits": c.bits, "bytes": c.bytes, "est_output_error": c.error} for c in cs]
            for n, cs in plan.choices.items()
        },
    }


def _write_json(path: str | None, obj: dict, force: bool) -> None:
    if path and is_main():
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n", force=force)


def _print_result(res: dict) -> None:
    def pc(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    if res.get("task") == "detect":
        what = _detection_line(res)
    elif res.get("output_sqnr_db") is not None:  # maps, not logits
        what = f"output SQNR vs FP32 {res['output_sqnr_db']:.1f} dB"
        if res["agreement"] is not None:
            what += f", per-position argmax agreement {res['agreement']:.1%}"
    else:
        what = (
            f"agreement with FP32 {res['agreement']:.1%}, KL {res['kl']:.4f}, "
            f"top-1 {pc(res['top1'])} (FP32 {pc(res['fp32_top1'])})"
        )
    print(f"{res['model']}: {what}, on {res['eval_on']}, calibration {res['calib_seconds']:.1f} s")


_FLOAT_KINDS = {"PReLU": "PReLU slopes"}
"""Plain words for the parameters of a module type left float, where they are clearer."""


def _float_weights_line(res: dict, json_path: str | None) -> str | None:
    """One line for the parameters left float (``res["float_weights"]``): their count, share of
    the model's weight values and kinds (most values first), and where each is listed with its
    reason; None when there are none. Kinds are module types, each with its count of parameters
    when there are several kinds."""
    rows = res.get("float_weights") or []
    if not rows:
        return None
    kinds: dict[str, list[int]] = {}
    for r in rows:
        kinds.setdefault(_FLOAT_KINDS.get(r["kind"], r["kind"]), []).append(r["values"])
    order = sorted(kinds, key=lambda k: -sum(kinds[k]))
    what = ", ".join(f"{k} ({len(kinds[k])})" if len(kinds) > 1 else k for k in order)
    share = res["float_share"]
    pct = f"{share:.2%}" if share >= 1e-4 or share == 0 else "<0.01%"
    where = f"listed with reasons in {json_path}" if json_path else "--json lists each and why"
    n = len(rows)
    return (
        f"{n} parameter{'s' if n > 1 else ''} left float ({pct} of weight values: {what}); {where}"
    )


def _print_float_weights(res: dict, args) -> None:
    """Print :func:`_float_weights_line` when there is one."""
    line = _float_weights_line(res, getattr(args, "json", None))
    if line:
        _info(line)


def _detection_line(res: dict) -> str:
    """A detector's result: FP32's detections the quantized model kept (a warning on stderr
    when it lost more than half of them)."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    s = res["det_settings"]
    if res["det_recall"] is not None and res["det_recall"] < 0.5:
        print(
            f"omse: warning: the quantized model lost {1 - res['det_recall']:.0%} of FP32's "
            f"{res['fp32_detections']} detections",
            file=sys.stderr,
        )
    return (
        f"detections kept vs FP32: recall {f(res['det_recall'])}, precision "
        f"{f(res['det_precision'])} (IoU {s['iou']}, score {s['score']}) on {res['eval_inputs']} "
        f"images ({res['fp32_detections']} FP32 detections, decoder {res['decoder']}), output "
        f"SQNR vs FP32 {res['output_sqnr_db']:.1f} dB"
    )


def _registry_name(model: str) -> str | None:
    from .zoo.models import REGISTRY

    return model if model in REGISTRY else None


def cmd_demo(args) -> int:
    from .zoo.demo import markdown_table, run_demo

    t = time.perf_counter()  # results/demo.json is the demo's own output, refreshed each run
    result = run_demo(
        n_calib=args.calib_size, n_views=args.views, out_json=args.json, quick=args.quick
    )
    print()
    print(markdown_table(result))
    if not args.no_report:
        from .zoo.demo import demo_report

        demo_report(calib_size=args.calib_size)
    _info(f"\nwrote {args.json} in {time.perf_counter() - t:.0f} s")
    return 0


def _check_outputs(args, *paths: str | None) -> None:
    """Before any work: refuse outputs that exist (without --force), that are an input file, or
    that name the same file twice."""
    from .io import check_output_path

    inputs = tuple(Path(p) for p in (getattr(args, "weights", None), args.model) if p)
    outs = [p for p in paths if p]
    if len({Path(p).resolve() for p in outs}) < len(outs):
        raise OmseError(f"two outputs name the same file: {', '.join(map(str, outs))}")
    for p in outs:
        check_output_path(p, args.force, inputs)


def cmd_quantize_blockwise(args) -> int:
    """``omse quantize MODULE:FACTORY --weights W --blockwise --out DIR``: block by block."""
    from .deploy.blockwise import empty_model, quantize_blockwise
    from .zoo.models import REGISTRY, import_object

    if args.model in REGISTRY or ":" not in args.model:
        raise OmseError(
            "--blockwise is for a package.module:factory model with --weights (safetensors); "
            f"{args.model!r} is not one"
        )
    if not args.weights or not args.out:
        raise OmseError("--blockwise needs --weights (the safetensors file or index) and --out DIR")
    if is_distributed():
        raise OmseError("--blockwise does not run sharded; run it without torchrun")
    if args.eval:
        raise OmseError(
            "--blockwise measures the error against FP32 on the calibration inputs (the FP32 "
            "model does not fit in memory): drop --eval"
        )
    _check_outputs(args, args.json)
    factory = import_object(args.model, "model")
    _, batches, _, _ = _user_data(args)
    cfg = _config_from_args(args)
    if "__first__" in cfg.overrides:
        from dataclasses import replace

        cfg = replace(cfg, overrides=_resolve_first_last(empty_model(factory), cfg.overrides))
    r = quantize_blockwise(
        factory,
        batches,
        cfg,
        weights=args.weights,
        out=args.out,
        blocks=args.blocks,
        force=args.force,
        compare=True,
        progress=True,
    )
    res = {
        "model": args.model,
        "recipe": args.recipe,
        "config": cfg.to_dict(),
        "blocks": len(r.blocks),
        "stem": r.stem,
        "head": r.head,
        "output_sqnr_db": r.sqnr_db[-1],
        "block_sqnr_db": r.sqnr_db[:-1],
        "eval_on": "calibration inputs: optimistic",
        "eval_held_out": False,
        "weight_mb": r.weight_bytes / 2**20,
        "largest_unit_mb": r.largest_unit_bytes / 2**20,
        "seconds": round(r.seconds, 3),
    }
    print(
        f"{args.model}: {len(r.blocks)} blocks, output SQNR vs FP32 {r.sqnr_db[-1]:.1f} dB on "
        f"the calibration inputs, {r.seconds:.1f} s; wrote {args.out}"
    )
    _write_json(args.json, res, args.force)
    return 0


def cmd_quantize(args) -> int:
    if args.blockwise:
        return cmd_quantize_blockwise(args)
    if args.blocks:
        raise OmseError("--blocks goes with --blockwise")
    _check_outputs(args, args.json, args.out)
    _parse_dynamic_axes(args.dynamic_axes)  # refused before any work
    if _is_tflite_out(args) and args.target not in (None, "tflite", "int8"):
        raise OmseError(
            f"--out {args.out} with --target {args.target}: a .tflite holds the integer graph "
            "of target='tflite' (or 'int8'); drop --target or use --target tflite"
        )
    if getattr(args, "max_bytes", None) is not None and not _is_tflite_out(args):
        raise OmseError("--max-bytes is the written .tflite's size: give --out FILE.tflite")
    (_, qmodel, _, batches, _), res = _quantize_and_eval(args)
    _print_result(res)
    _print_float_weights(res, args)
    if res.get("precision"):
        _info(res["precision"]["summary"])
    if res.get("min_max_ranges"):
        _info(
            f"activation ranges: {len(res['min_max_ranges'])} layer(s) take the min-max step, "
            "estimated to cost the output less than the MMSE one (JSON min_max_ranges; "
            "--range-choice off keeps every MMSE step)"
        )
    if args.out and is_main() and _is_tflite_out(args):
        res["tflite"] = _export_tflite(qmodel, batches, args, res)
    elif args.out and is_main() and _is_onnx_path(args.out):
        _, types = _export(qmodel, batches, args)
        res.update(_weight_types_json(types))
        _info(f"wrote {args.out} (target {res['config']['target']})")
    elif args.out and is_main():
        from .deploy.checkpoint import save

        save(qmodel, args.out, force=args.force, model_name=_registry_name(args.model))
        _info(f"wrote {args.out}")
    _write_json(args.json, res, args.force)
    return 0


def _eval_models(args):
    """``omse eval``'s (FP32 reference, quantized model or None, name, inputs, preprocess,
    labels)."""
    from .zoo.models import REGISTRY, get_model, load_checkpoint, load_user_model
    from .zoo.tasks import get_task

    if args.model in REGISTRY:
        name, qmodel = args.model, None
    else:
        from .deploy.checkpoint import read_header

        header = read_header(args.model)
        name = header.get("model")
        if name not in REGISTRY:
            if not args.arch:
                raise OmseError(
                    f"checkpoint {args.model} is of a user model (it names "
                    f"{'no built-in model' if name is None else repr(name)}): give its "
                    "architecture with --model package.module:factory (and --weights for the "
                    "FP32 reference) and held-out images with --eval FOLDER"
                )
            if not args.eval:
                raise OmseError(
                    f"a user model ({args.arch}) is evaluated on held-out images: give "
                    "--eval FOLDER"
                )
            ref = load_user_model(args.arch, args.weights)
            qmodel = load_checkpoint(args.model, load_user_model(args.arch))
            xs = _eval_folder(args, _input_size(args.input_size))
            return ref, qmodel, args.arch, xs, _user_preprocess(args), None
        qmodel = load_checkpoint(args.model)
    for flag, v in (("--model", args.arch), ("--weights", args.weights)):
        if v:
            raise OmseError(f"{flag} is for a user model's checkpoint; {name!r} is built in")
    _reject_user_data_args(args, name)
    spec = get_model(name)
    if args.eval and spec.task == "fmnist":
        raise OmseError(
            f"{name} takes 28x28 Fashion-MNIST images: --eval folders are for RGB models"
        )
    if args.eval:
        xs, ys = spec.preprocess(_eval_folder(args, spec.input_shape[-1])), None
    else:
        xs, ys = get_task(spec.name).evaluation(None if spec.task == "fmnist" else args.views)
    return spec.build(), qmodel, name, xs, None, ys


def cmd_eval(args) -> int:

    _check_outputs(args, args.json)
    ref_model, qmodel, name, xs, pre, ys = _eval_models(args)
    ref = _logits(ref_model, xs, pre, "FP32")
    out = _logits(qmodel, xs, pre, "quantized") if qmodel else ref
    m = _compare_task(args.task, ref, out, ys, _input_hw(xs))
    res = {
        "model": name,
        **m,
        "eval_on": _eval_label(argparse.Namespace(eval=args.eval, model=name), m["n"])[0],
    }
    print(json.dumps(res, indent=2))
    _write_json(args.json, res, args.force)
    return 0


def cmd_report(args) -> int:
    from .analysis.report import report

    _check_outputs(args, args.json)
    (model, qmodel, pre, batches, _), res = _quantize_and_eval(args)
    _print_result(res)
    _print_float_weights(res, args)
    paths = report(qmodel, batches, args.out_dir, force=args.force)
    _info(*(f"wrote {p}" for p in paths))
    _write_json(args.json, res, args.force)
    return 0


def cmd_export(args) -> int:
    _check_outputs(args, args.out, args.json)
    _parse_dynamic_axes(args.dynamic_axes)  # refused before any work
    (_, qmodel, _, batches, _), res = _quantize_and_eval(args)
    _print_result(res)
    _print_float_weights(res, args)
    if not is_main():
        return 0
    _, types = _export(qmodel, batches, args, container=args.container, integer=args.integer)
    res.update(_weight_types_json(types))
    _info(f"wrote {args.out} (target {res['config']['target']})")
    _write_json(args.json, res, args.force)
    return 0


def cmd_save(args) -> int:
    from .deploy.checkpoint import save

    _check_outputs(args, args.out, args.json)
    (_, qmodel, *_), res = _quantize_and_eval(args)
    _print_result(res)
    _print_float_weights(res, args)
    if not is_main():
        return 0
    save(qmodel, args.out, force=args.force, model_name=_registry_name(args.model))
    _info(f"wrote {args.out}")
    _write_json(args.json, res, args.force)
    return 0


def cmd_models(args) -> int:
    from .zoo.models import REGISTRY

    for name, spec in REGISTRY.items():
        print(f"{name}\t{spec.task}\tinput {list(spec.input_shape)}")
    return 0


_SHARDED = ("quantize", "report", "save", "export")
"""The commands that calibrate, so can run under torchrun."""

COMMANDS = {
    "demo": cmd_demo,
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
    "save": cmd_save,
    "models": cmd_models,
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    """``omse: warning: <message>`` (the CLI's form of a Python warning; ``--debug`` keeps
    Python's, with the file and line)."""
    return f"omse: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .runtime import is_quiet, set_quiet, tune_allocator

    tune_allocator()
    was_quiet = is_quiet()
    set_quiet(args.quiet)
    if not args.debug:  # one line per warning, without the source line that raised it
        warnings.formatwarning = _one_line_warning
    created = False
    try:
        created = init_from_env()  # torchrun: WORLD_SIZE / RANK in the environment
        if is_distributed() and args.cmd not in _SHARDED:
            raise OmseError(f"omse {args.cmd} does not run sharded; run it without torchrun")
        with (
            open(os.devnull, "w") as quiet,
            contextlib.redirect_stdout(sys.stdout if is_main() else quiet),
        ):  # rank 0 alone prints
            return COMMANDS[args.cmd](args)
    except OmseError as e:
        if args.debug:
            raise
        print(f"omse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("omse: interrupted; no partial output was written", file=sys.stderr)
        return 130
    finally:
        set_quiet(was_quiet)
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
