"""Block reconstruction (``rounding_scope="block"``, :mod:`omse.transforms.reconstruct`) against
layer-wise learned rounding, and its parts alone and together: activations in the loop, QDrop's
drop, learned activation steps.

Data as ``benchmarks/rounding.py --zoo`` (the first 256 Fashion-MNIST training images calibrate,
the 10,000 test images evaluate; they never overlap), W4A4, MMSE + bias correction, no extra MACs;
then the limits: W8A4 with nearest rounding, and the first and last layer at W8A8.
``--lite0`` adds EfficientNet-Lite0 (32 calibration photos, 200 views) at W4A8 and W4A4.

    python benchmarks/reconstruct.py [--models fmnist-resnet20,fmnist-mobilenetv2] [--lite0]

Prints a markdown table and writes ``results/reconstruct.json`` after every row; a rerun keeps the
rows already there (same model, setting, recipe and iterations) and measures only the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import omse
from omse.analysis.metrics import compare_logits, predict
from omse.io import atomic_write_text
from omse.runtime import cpu_name
from omse.zoo.tasks import get_task

ROWS = {
    "layer (AdaRound from patch moments)": dict(rounding_scope="layer"),
    "block, activations float": dict(rounding_scope="block", rounding_act_loop=False),
    "block, activations quantized (BRECQ)": dict(rounding_scope="block", rounding_drop=0.0),
    "block + QDrop 0.5": dict(rounding_scope="block"),
    "block + QDrop + learned act steps": dict(rounding_scope="block", rounding_learn_act=True),
}


def _first_last(model: torch.nn.Module) -> dict:
    """The first and the last Conv/Linear at W8A8 (BRECQ's and QDrop's protocol)."""
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    return {n: {"weight_bits": 8, "act_bits": 8} for n in (names[0], names[-1])}


def _save(rows: list[dict], iters: int, out: Path) -> None:
    result = {
        "iters": iters,
        "machine": f"per row; {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "rows": rows,
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n", force=True)


def _key(r: dict) -> tuple:
    return r["model"], r["setting"], r["recipe"]


def run(name: str, ab: int, iters: int, done: list[dict], out: Path) -> list[dict]:
    task = get_task(name)
    model = task.build()
    fl = {"overrides": _first_last(model)}
    extra = {
        "nearest, W8A4 (weights not the limit?)": dict(rounding="nearest", weight_bits=8),
        "nearest, first/last W8A8": dict(rounding="nearest", **fl),
        "layer, first/last W8A8": dict(rounding_scope="layer", **fl),
        "block + QDrop, first/last W8A8": dict(rounding_scope="block", **fl),
        "block + QDrop + learned act steps, first/last W8A8": dict(
            rounding_scope="block", rounding_learn_act=True, **fl
        ),
    }
    if name == "efficientnet-lite0":
        x, y = task.evaluation(200)
        batches = list(task.calibration(32).split(8))
        bs = 50
    else:
        x, y = task.evaluation(None)
        batches = list(task.calibration(256).split(32))
        bs = 1000
    ref = predict(model, x, None, batch_size=bs)
    rows = done
    have = {_key(r) for r in done}
    for label, kw in {"nearest": dict(rounding="nearest"), **ROWS, **extra}.items():
        if (name, f"W4A{ab}", label) in have:
            continue
        base = dict(weight_bits=4, act_bits=ab, bias_correction=True, rounding="learned")
        cfg = omse.QuantConfig.preset("fast", **(base | {"rounding_iters": iters} | kw))
        t = time.perf_counter()
        q = omse.quantize(model, batches, cfg)
        secs = time.perf_counter() - t
        a = compare_logits(ref, predict(q, x, None, batch_size=bs), y)
        fp = compare_logits(ref, ref, y).top1
        rows.append(
            {
                "model": name,
                "setting": f"W4A{ab}",
                "recipe": label,
                "agreement": round(a.agreement, 4),
                "top1": round(a.top1, 4),
                "fp32_top1": round(fp, 4),
                "seconds": round(secs, 1),
                "cpu": cpu_name(),
            }
        )
        print(rows[-1], flush=True)
        _save(rows, iters, out)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="fmnist-resnet20,fmnist-mobilenetv2")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--lite0", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    out = Path("results/reconstruct.json")
    rows = []
    if out.exists():
        old = json.loads(out.read_text())
        rows = old["rows"] if old.get("iters") == args.iters else []
    for name in args.models.split(","):
        rows = run(name, 4, args.iters, rows, out)
    if args.lite0:
        for ab in (8, 4):
            rows = run("efficientnet-lite0", ab, args.iters, rows, out)
    print("\n| model | setting | recipe | agreement | top-1 (FP32) | calibration s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['setting']} | {r['recipe']} | {r['agreement']:.2%} | "
            f"{r['top1']:.2%} ({r['fp32_top1']:.2%}) | {r['seconds']} |"
        )
    _save(rows, args.iters, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
