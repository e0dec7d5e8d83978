"""4-bit accuracy on EfficientNet-Lite0: residual-tensor budgets and an ablation of corrections.

Agreement with FP32 (top-1) over a deterministic bank of views of the 20 foolbox ImageNet images,
calibrated on photographs that are never evaluation images (omse.zoo.data.calibration_images).

    python benchmarks/accuracy.py [--views 200] [--calib 32] [--settings W4A32,W4A8,W4A4]
        [--budgets 0,0.05,0.1,0.25,1] [--ablation "name;name"]

Prints markdown tables, writes results/accuracy.json and results/accuracy_budget.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from omse.analysis.metrics import compare_logits, predict
from omse.config import QuantConfig
from omse.io import atomic_write_bytes, atomic_write_text
from omse.nn.layers import quantized_layers
from omse.runtime import tune_allocator
from omse.transforms.pipeline import Calibration, quantize
from omse.zoo.tasks import get_task

BUDGETS = (0.0, 0.05, 0.10, 0.25, 1.0)
ABLATION = {
    "MMSE (kernel-wise) only": {},
    "+ bias correction": {"bias_correction": True},
    "+ equalization": {"equalize": True},
    "+ output-aware rounding (GPTQ)": {"output_aware": True},
    "+ residuals 10% (weight-MSE criterion)": {
        "extra_mac_budget": 0.10,
        "residual_criterion": "weight",
    },
    "+ residuals 10% (output criterion)": {"extra_mac_budget": 0.10},
    "residuals 10% + bias correction": {"extra_mac_budget": 0.10, "bias_correction": True},
    # residual kernels ranked by each layer's measured effect on the model's output (one pass
    # over the calibration images per layer) instead of each layer's own relative output error
    "residuals 10% (network criterion) + bias correction": {
        "extra_mac_budget": 0.10,
        "bias_correction": True,
        "residual_criterion": "network",
    },
    "residuals 25% (network criterion) + bias correction": {
        "extra_mac_budget": 0.25,
        "bias_correction": True,
        "residual_criterion": "network",
    },
    "all: residuals 10% + bias corr. + equalization + GPTQ": {
        "extra_mac_budget": 0.10,
        "bias_correction": True,
        "equalize": True,
        "output_aware": True,
    },
}
SETTINGS = {"W4A32": (4, None), "W4A8": (4, 8), "W4A4": (4, 4)}


def run(setting: str, extra: dict, ctx) -> dict:
    wb, ab = SETTINGS[setting]
    cfg = QuantConfig.preset("fast", weight_bits=wb, act_bits=ab, **extra)
    cal = Calibration()
    t0 = time.perf_counter()
    q = quantize(ctx["model"], ctx["batches"], cfg, calibration=cal)
    secs = time.perf_counter() - t0
    out = predict(q, ctx["views"], ctx["pre"])
    a = compare_logits(ctx["ref"], out, ctx["labels"])
    layers = quantized_layers(q)
    total = sum(ql.macs for ql in layers.values())
    extra_macs = sum(ql.extra_macs() for ql in layers.values())
    return {
        "setting": setting,
        "config": {k: v for k, v in extra.items()},
        "agreement": a.agreement,
        "kl": a.kl,
        "top1": a.top1,
        "extra_macs_fraction": extra_macs / max(total, 1),
        "calib_seconds": round(secs, 2),
        "equalized_pairs": len(cal.equalized),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=200)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--settings", default="W4A8,W4A4,W4A32")
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS), help="'' = none")
    ap.add_argument("--ablation", default=";".join(ABLATION), help="rows, ';'-separated")
    ap.add_argument("--out", default="results/accuracy.json")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    unknown = [n for n in args.ablation.split(";") if n and n not in ABLATION]
    if unknown:
        ap.error(f"--ablation: unknown rows {unknown}; known: {list(ABLATION)}")
    ablation = {n: ABLATION[n] for n in args.ablation.split(";") if n}
    tune_allocator()
    settings = args.settings.split(",")
    task = get_task("efficientnet-lite0")
    model = task.build()
    views, labels = task.evaluation(args.views)  # preprocessed
    ctx = {
        "model": model,
        "pre": None,
        "views": views,
        "labels": labels,
        "batches": list(task.calibration(args.calib).split(8)),
        "ref": predict(model, views, None),
    }
    rows = {"budget": [], "ablation": []}
    for s in settings:
        for b in budgets:
            r = run(s, {"extra_mac_budget": b, "bias_correction": True}, ctx)
            r["budget"] = b
            rows["budget"].append(r)
            print(
                f"{s} budget {b:.0%}: agreement {r['agreement']:.1%} (extra {r['extra_macs_fraction']:.1%})",
                flush=True,
            )
        for name, extra in ablation.items():
            prev = [r for r in rows["budget"] if r["setting"] == s and r["budget"] == 0.10]
            if extra == {"extra_mac_budget": 0.10, "bias_correction": True} and prev:
                r = dict(prev[0], config=extra)
            else:
                r = run(s, extra, ctx)
            r["name"] = name
            rows["ablation"].append(r)
            print(f"{s} {name}: agreement {r['agreement']:.1%} kl {r['kl']:.3f}", flush=True)
        result = {
            "model": "efficientnet-lite0",
            "views": args.views,
            "calibration_images": args.calib,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            **rows,
        }
        atomic_write_text(
            Path(args.out), json.dumps(result, indent=2) + "\n", force=True
        )  # per setting
    print()
    print(tables(result))
    if rows["budget"]:
        plot(result, Path(args.out).with_name(Path(args.out).stem + "_budget.png"))
    return 0


def tables(result: dict) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in result["ablation"] + result["budget"]))
    lines = ["| correction | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    names = list(dict.fromkeys(r["name"] for r in result["ablation"]))
    for n in names:
        cells = []
        for s in settings:
            r = next(x for x in result["ablation"] if x["name"] == n and x["setting"] == s)
            cells.append(
                f"{r['agreement']:.1%} (KL {r['kl']:.2f}, +{r['extra_macs_fraction']:.1%} MACs)"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| extra-MAC budget (with bias correction) | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for b in dict.fromkeys(r["budget"] for r in result["budget"]):
        cells = []
        for s in settings:
            r = next((x for x in result["budget"] if x["budget"] == b and x["setting"] == s), None)
            cells.append(
                "-" if r is None else f"{r['agreement']:.1%} (used {r['extra_macs_fraction']:.1%})"
            )
        lines.append(f"| {b:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in dict.fromkeys(r["setting"] for r in result["budget"]):
        rs = [r for r in result["budget"] if r["setting"] == s]
        ax.plot(
            [100 * r["extra_macs_fraction"] for r in rs],
            [100 * r["agreement"] for r in rs],
            "o-",
            label=s,
        )
    ax.set_xscale("symlog", linthresh=5)
    ax.set_xlabel("extra integer MACs for residual tensors (%)")
    ax.set_ylabel("top-1 agreement with FP32 (%)")
    ax.set_title("EfficientNet-Lite0, kernel-wise MMSE + bias correction")
    ax.axhline(80, color="grey", ls=":", lw=1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), force=True)


if __name__ == "__main__":
    sys.exit(main())
