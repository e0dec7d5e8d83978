"""What the int8 target costs in accuracy: EfficientNet-Lite0 quantized for ``target="int4"``
(residual terms as free-step branches, float bias, no output quantizers) and ``target="int8"``
(residual step ``s1/k`` merged into one 8-bit kernel, int32 biases, output quantizers where an
integer runtime requantizes), and the int8 graph itself in onnxruntime and OpenVINO.

Same protocol as ``benchmarks/accuracy.py``: top-1 agreement with FP32 over the deterministic
bank of views of the 20 foolbox ImageNet images, calibrated on photographs that are never
evaluation images.

    python benchmarks/targets.py [--views 200] [--calib 32] [--settings W4A8,W4A4]

Prints a markdown table and writes ``results/targets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from omse.analysis.metrics import compare_logits, predict
from omse.config import QuantConfig
from omse.deploy.export import export_onnx
from omse.io import atomic_write_text
from omse.nn.layers import quantized_layers
from omse.runtime import tune_allocator
from omse.transforms.pipeline import quantize
from omse.zoo.tasks import get_task

SETTINGS = {"W4A8": (4, 8), "W4A4": (4, 4), "W8A8": (8, 8)}
BUDGETS = (0.0, 0.05, 0.10, 0.25)


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"input": b})[0] for b in np.array_split(x, 8)])


def _openvino(path: Path, x: np.ndarray) -> np.ndarray | None:
    try:
        from omse.deploy.openvino import compile_onnx, run
    except ImportError:
        return None
    try:
        c = compile_onnx(path, threads=2, precision_hint="f32")
    except Exception as e:  # openvino missing: recorded as None
        print(f"  OpenVINO: {e}", flush=True)
        return None
    return np.concatenate([run(c, b) for b in np.array_split(x, 8)])


def run(setting: str, budget: float, target: str, ctx, work: Path) -> dict:
    wb, ab = SETTINGS[setting]
    cfg = QuantConfig(
        weight_bits=wb, act_bits=ab, extra_mac_budget=budget, bias_correction=True, target=target
    )
    t0 = time.perf_counter()
    q = quantize(ctx["model"], ctx["batches"], cfg)
    secs = time.perf_counter() - t0
    sim = predict(q, ctx["views"], None)
    a = compare_logits(ctx["ref"], sim, ctx["labels"])
    layers = quantized_layers(q)
    total = sum(ql.macs for ql in layers.values())
    row = {
        "setting": setting,
        "budget": budget,
        "target": target,
        "agreement": a.agreement,
        "kl": a.kl,
        "top1": a.top1,
        "extra_macs_fraction": sum(ql.extra_macs() for ql in layers.values()) / max(total, 1),
        "output_quantizers": sum(ql.out_scale is not None for ql in layers.values()),
        "calib_seconds": round(secs, 2),
    }
    if target == "int8":
        x = ctx["views"].numpy()
        path = export_onnx(q, torch.from_numpy(x[:1]), work / "q.onnx", force=True)
        for name, fn in (("ort", _ort), ("openvino", _openvino)):
            out = fn(path, x)
            if out is None:
                continue
            row[f"{name}_vs_sim"] = float((out.argmax(1) == sim.numpy().argmax(1)).mean())
            row[f"{name}_vs_fp32"] = compare_logits(
                ctx["ref"], torch.from_numpy(out), ctx["labels"]
            ).agreement
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | extra-MAC budget | int4 target (simulated) | int8 target (simulated) "
        "| int8 graph, onnxruntime | int8 graph, OpenVINO | ORT / OpenVINO vs simulation |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in dict.fromkeys(r["setting"] for r in rows):
        for b in dict.fromkeys(r["budget"] for r in rows if r["setting"] == s):
            r4 = next(
                (r for r in rows if (r["setting"], r["budget"], r["target"]) == (s, b, "int4")),
                None,
            )
            r8 = next(
                (r for r in rows if (r["setting"], r["budget"], r["target"]) == (s, b, "int8")),
                None,
            )

            def pct(r, k):
                return "-" if r is None or r.get(k) is None else f"{r[k]:.1%}"

            lines.append(
                f"| {s} | {b:.0%} | {pct(r4, 'agreement')} | {pct(r8, 'agreement')} | "
                f"{pct(r8, 'ort_vs_fp32')} | {pct(r8, 'openvino_vs_fp32')} | "
                f"{pct(r8, 'ort_vs_sim')} / {pct(r8, 'openvino_vs_sim')} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=200)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--settings", default="W4A8,W4A4,W8A8")
    ap.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    ap.add_argument("--out", default="results/targets.json")
    args = ap.parse_args(argv)
    tune_allocator()
    task = get_task("efficientnet-lite0")
    model = task.build()
    views, labels = task.evaluation(args.views)  # preprocessed
    ctx = {
        "model": model,
        "views": views,
        "labels": labels,
        "batches": list(task.calibration(args.calib).split(8)),
        "ref": predict(model, views, None),
    }
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="omse-targets-") as tmp:
        for s in args.settings.split(","):
            budgets = [0.0] if s == "W8A8" else [float(b) for b in args.budgets.split(",")]
            for b in budgets:
                for target in ("int4", "int8"):
                    r = run(s, b, target, ctx, Path(tmp))
                    rows.append(r)
                    print(
                        f"{s} budget {b:.0%} {target}: agreement {r['agreement']:.1%}"
                        + (f", ORT {r['ort_vs_fp32']:.1%}" if "ort_vs_fp32" in r else ""),
                        flush=True,
                    )
    result = {
        "model": "efficientnet-lite0",
        "views": args.views,
        "calibration_images": args.calib,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n", force=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
