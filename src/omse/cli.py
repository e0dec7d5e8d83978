"""Command line: ``omse demo | quantize | eval | report | export | save | inspect``.

Every failure omse anticipates is one line on stderr and exit code 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import OmseError

__all__ = ["main", "build_parser"]


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="built-in model name (see `omse models`), package.module:factory, or a float "
        "ONNX file (model.onnx; calibration images sized from its input's static dims)",
    )
    p.add_argument(
        "--weights", help="weights file for a package.module:factory model (safetensors)"
    )
    p.add_argument("--calib", help="folder of calibration images (default: the model's own set)")
    p.add_argument("--calib-size", type=int, default=32, help="number of calibration images")
    p.add_argument("--weight-bits", "-w", type=int, default=4)
    p.add_argument("--act-bits", "-a", default="8", help="activation bits, or 'float'")
    p.add_argument("--method", default="mmse", help="weight and activation range method")
    p.add_argument(
        "--granularity", default="per_channel", help="per_channel | per_tensor | per_group<N>"
    )
    p.add_argument(
        "--budget", type=float, default=0.0, help="extra MACs for residual tensors (fraction)"
    )
    p.add_argument(
        "--target",
        default="int4",
        choices=["int4", "int8"],
        help="hardware the model is for: int8 (onnxruntime CPU, OpenVINO, TensorRT: one 8-bit "
        "integer kernel per layer, residual tensors merged at no run-time cost) or int4 "
        "(accelerators with 4-bit MACs; residual tensors are extra MACs)",
    )
    p.add_argument("--first-last-8bit", action="store_true", help="first and last layer at W8A8")
    p.add_argument(
        "--skip", action="append", default=[], help="module name (pattern) left in float"
    )
    p.add_argument("--bias-correction", action="store_true")
    p.add_argument("--equalize", action="store_true")
    p.add_argument("--output-aware", action="store_true", help="= --rounding gptq")
    p.add_argument(
        "--rounding",
        default="nearest",
        choices=["nearest", "gptq", "learned"],
        help="first-term rounding: nearest, gptq, or learned (AdaRound-style, layer by layer)",
    )
    p.add_argument("--strict", action="store_true", help="fail on layers omse cannot quantize")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit code 2, as every anticipated failure)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="omse", description="Post-training low-bit quantization by exact MMSE.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
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
        help="write the packed quantized checkpoint here (.safetensors), or the quantized ONNX "
        "graph for --target (.onnx)",
    )

    e = sub.add_parser("eval", help="evaluate a saved omse checkpoint (or FP32 model) against FP32")
    e.add_argument("model", help="built-in model name, or a checkpoint written by `omse save`")
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

    s = sub.add_parser("save", help="quantize and save a packed 4-bit checkpoint")
    _add_quant_args(s)
    s.add_argument("--out", required=True)

    sub.add_parser("models", help="list built-in models")
    return ap


def _config_from_args(args) -> Any:
    from .config import QuantConfig
    from .zoo.demo import LITE0_FIRST_LAST

    act = (
        None
        if str(args.act_bits).lower() in ("float", "none", "32")
        else _int(args.act_bits, "--act-bits")
    )
    overrides = {}
    if args.first_last_8bit:
        if args.model == "efficientnet-lite0":
            overrides = LITE0_FIRST_LAST
        else:
            overrides = {
                "__first__": {"weight_bits": 8, "act_bits": 8},
                "__last__": {"weight_bits": 8, "act_bits": 8},
            }
    return QuantConfig(
        weight_bits=args.weight_bits,
        act_bits=act,
        weight_method=args.method,
        act_method=args.method,
        granularity=args.granularity,
        extra_mac_budget=args.budget,
        skip=tuple(args.skip),
        overrides=overrides,
        bias_correction=args.bias_correction,
        equalize=args.equalize,
        output_aware=args.output_aware,
        rounding=args.rounding,
        strict=args.strict,
        target=args.target,
    )


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


def _load_task(args):
    """(model, preprocess, calib batches, eval inputs, eval labels, name)."""
    from .zoo.data import load_image_folder
    from .zoo.models import REGISTRY, load_user_model
    from .zoo.tasks import get_task

    if args.calib_size < 1:
        raise OmseError(f"--calib-size must be >= 1, got {args.calib_size}")
    if args.weights and args.model in REGISTRY:
        raise OmseError(
            f"--weights is for package.module:factory models; {args.model!r} is built in "
            "and ships its own weights"
        )
    if args.model in REGISTRY:
        task = get_task(args.model)
        model = task.build()
        pre = None  # the task's inputs come preprocessed
        ev_x, ev_y = task.evaluation(2000 if task.spec.task == "fmnist" else 200)
        if args.calib and task.spec.task != "fmnist":
            folder = load_image_folder(args.calib, task.spec.input_shape[-1], args.calib_size)
            calib = task.spec.preprocess(folder)
        else:
            calib = task.calibration(args.calib_size)
    else:
        pre = None
        if not args.calib:
            raise OmseError("a user model needs --calib FOLDER (calibration images)")
        if _is_onnx_path(args.model):
            return _load_onnx_task(args)
        model = load_user_model(args.model, args.weights)
        calib = load_image_folder(args.calib, limit=args.calib_size)
        ev_x, ev_y = calib, None  # no evaluation set known for a user's model: report on calib
    batches = [
        pre(calib[i : i + 8]) if pre else calib[i : i + 8] for i in range(0, calib.shape[0], 8)
    ]
    return model, pre, batches, ev_x, ev_y


def _is_onnx_path(model: str) -> bool:
    return model.lower().endswith(".onnx")


def _load_onnx_task(args):
    """``_load_task`` for a float ONNX image model: calibration images at the input's static
    ``(C, H, W)`` (224 for a dynamic H or W; a non-square size is a centre crop of a square
    one; 1 channel: grey), the model converted and checked on the first batch."""
    from .transforms.onnx_import import load_onnx, onnx_io, read_onnx
    from .zoo.data import load_image_folder

    if args.weights:
        raise OmseError("--weights is for package.module:factory models; an ONNX file has its own")
    io = onnx_io(read_onnx(args.model)[0])
    if len(io["input_names"]) != 1:
        raise OmseError(
            f"{args.model} has {len(io['input_names'])} inputs ({io['input_names']}); the "
            "command line calibrates image models with one input: use omse.quantize in Python"
        )
    dims = io["shapes"][io["input_names"][0]]
    if len(dims) != 4:
        raise OmseError(f"{args.model}: input of shape {dims} is not an (N, C, H, W) image batch")
    c, h, w = (d if isinstance(d, int) else None for d in dims[1:])
    h, w = h or 224, w or 224
    calib = load_image_folder(args.calib, max(h, w), args.calib_size)
    top, left = (calib.shape[2] - h) // 2, (calib.shape[3] - w) // 2
    calib = calib[:, :, top : top + h, left : left + w]
    if c == 1:
        calib = calib.mean(1, keepdim=True)
    elif c not in (None, 3):
        raise OmseError(f"{args.model}: an input of {c} channels is not an RGB or grey image")
    batches = list(calib.split(8))
    return load_onnx(args.model, sample=batches[0]), None, batches, calib, None


def _quantize_and_eval(args) -> tuple[Any, dict[str, Any]]:
    from .analysis.metrics import compare_logits, predict
    from .transforms.pipeline import Calibration, quantize

    model, pre, batches, ev_x, ev_y = _load_task(args)
    cfg = _config_from_args(args)
    if "__first__" in cfg.overrides:
        from dataclasses import replace

        cfg = replace(cfg, overrides=_resolve_first_last(model, cfg.overrides))
    cal = Calibration()
    qmodel = quantize(model, batches, cfg, calibration=cal, progress=True)
    ref = predict(model, ev_x, pre, progress=True, desc="FP32")
    out = predict(qmodel, ev_x, pre, progress=True, desc="quantized")
    a = compare_logits(ref, out, ev_y)
    res = {
        "model": args.model,
        "config": cfg.to_dict(),
        "agreement": a.agreement,
        "kl": a.kl,
        "top1": a.top1,
        "fp32_top1": compare_logits(ref, ref, ev_y).top1,
        "eval_inputs": a.n,
        "calib_batches": cal.batches,
        "calib_seconds": round(cal.seconds, 3),
        "left_float": cal.left_float,
    }
    return (model, qmodel, pre, batches, ev_x), res


def _write_json(path: str | None, obj: dict, force: bool) -> None:
    if path:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n", force=force)


def _print_result(res: dict) -> None:
    top1 = "-" if res["top1"] is None else f"{res['top1']:.1%}"
    print(
        f"{res['model']}: agreement with FP32 {res['agreement']:.1%}, KL {res['kl']:.4f}, "
        f"top-1 {top1} (FP32 {res['fp32_top1'] if res['fp32_top1'] is None else format(res['fp32_top1'], '.1%')}), "
        f"{res['eval_inputs']} inputs, calibration {res['calib_seconds']:.1f} s"
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
    print(f"\nwrote {args.json} in {time.perf_counter() - t:.0f} s")
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


def cmd_quantize(args) -> int:
    _check_outputs(args, args.json, args.out)
    (_, qmodel, _, batches, _), res = _quantize_and_eval(args)
    _print_result(res)
    if args.out and _is_onnx_path(args.out):
        from .deploy.export import export_onnx

        export_onnx(qmodel, batches[0][:1], args.out, force=args.force, target=args.target)
        print(f"wrote {args.out} (target {args.target})")
    elif args.out:
        from .deploy.checkpoint import save

        save(qmodel, args.out, force=args.force, model_name=_registry_name(args.model))
        print(f"wrote {args.out}")
    _write_json(args.json, res, args.force)
    return 0


def cmd_eval(args) -> int:
    from .analysis.metrics import compare_logits, predict
    from .zoo.models import REGISTRY, get_model
    from .zoo.tasks import get_task

    _check_outputs(args, args.json)
    if args.model in REGISTRY:
        spec = get_model(args.model)
        ref_model, qmodel, name = spec.build(), None, args.model
    else:
        from .deploy.checkpoint import read_header
        from .zoo.models import load_checkpoint

        header = read_header(args.model)
        name = header.get("model")
        if name not in REGISTRY:
            raise OmseError(f"checkpoint {args.model} names model {name!r}, not a built-in model")
        spec = get_model(name)
        ref_model, qmodel = spec.build(), load_checkpoint(args.model)
    task = get_task(spec.name)
    xs, ys = task.evaluation(None if spec.task == "fmnist" else args.views)
    ref = predict(ref_model, xs, None, progress=True, desc="FP32")
    out = predict(qmodel, xs, None, progress=True, desc="quantized") if qmodel else ref
    a = compare_logits(ref, out, ys)
    res = {
        "model": name,
        "agreement": a.agreement,
        "kl": a.kl,
        "top1": a.top1,
        "n": a.n,
        "fp32_top1": compare_logits(ref, ref, ys).top1,
    }
    print(json.dumps(res, indent=2))
    _write_json(args.json, res, args.force)
    return 0


def cmd_report(args) -> int:
    from .analysis.report import report

    _check_outputs(args, args.json)
    (model, qmodel, pre, batches, _), res = _quantize_and_eval(args)
    _print_result(res)
    paths = report(qmodel, batches, args.out_dir, force=args.force)
    for p in paths:
        print(f"wrote {p}")
    _write_json(args.json, res, args.force)
    return 0


def cmd_export(args) -> int:
    from .deploy.export import export_onnx

    _check_outputs(args, args.out, args.json)
    (_, qmodel, _, batches, _), res = _quantize_and_eval(args)
    _print_result(res)
    export_onnx(
        qmodel,
        batches[0][:1],
        args.out,
        force=args.force,
        target=args.target,
        container=args.container,
        integer=args.integer,
    )
    print(f"wrote {args.out} (target {args.target})")
    _write_json(args.json, res, args.force)
    return 0


def cmd_save(args) -> int:
    from .deploy.checkpoint import save

    _check_outputs(args, args.out, args.json)
    (_, qmodel, *_), res = _quantize_and_eval(args)
    _print_result(res)
    save(qmodel, args.out, force=args.force, model_name=_registry_name(args.model))
    print(f"wrote {args.out}")
    _write_json(args.json, res, args.force)
    return 0


def cmd_models(args) -> int:
    from .zoo.models import REGISTRY

    for name, spec in REGISTRY.items():
        print(f"{name}\t{spec.task}\tinput {list(spec.input_shape)}")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
    "save": cmd_save,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .runtime import tune_allocator

    tune_allocator()
    try:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
