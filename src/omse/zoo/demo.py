"""The default job: EfficientNet-Lite0 at FP32, W8A8, W4A32, W4A8 and W4A4, with min-max and MMSE,
per-tensor and kernel-wise weights, evaluated against FP32 on a bank of ImageNet views."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..analysis.metrics import compare_logits, predict
from ..analysis.report import layer_reports, markdown, write_report
from ..config import QuantConfig
from ..io import atomic_write_text
from ..transforms.pipeline import Calibration, quantize
from .data import calibration_sources
from .tasks import get_task

__all__ = ["DemoRow", "run_demo", "markdown_table", "demo_configs"]

LITE0_FIRST_LAST = {
    "_conv_stem": {"weight_bits": 8, "act_bits": 8},
    "_fc": {"weight_bits": 8, "act_bits": 8},
}


@dataclass
class DemoRow:
    method: str
    weight_bits: int | None
    act_bits: int | None
    granularity: str | None
    agreement: float
    kl: float
    top1: float
    calib_seconds: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def demo_configs(quick: bool = False) -> list[tuple[str, QuantConfig]]:
    """The (note, config) pairs of the demo table: each row's recipe written out, the plain
    rows on the ``fast`` preset (no residuals, no bias correction)."""

    def plain(**kw) -> QuantConfig:
        return QuantConfig.preset("fast", **kw)

    out = []
    settings = [(8, 8), (4, None), (4, 8), (4, 4)]
    for wb, ab in settings:
        for method in ("minmax", "mmse"):
            for gran in ("per_tensor", "per_channel"):
                if quick and gran == "per_tensor" and wb == 8:
                    continue
                kw = dict(weight_method=method, act_method=method, granularity=gran)
                out.append(("", plain(weight_bits=wb, act_bits=ab, **kw)))
    out.append(
        (
            "first/last 8-bit",
            plain(weight_bits=4, act_bits=4, overrides=LITE0_FIRST_LAST),
        )
    )
    for wb, ab in [(4, None), (4, 8), (4, 4)]:  # every layer at 4 bits (no per-layer budget)
        cfg = QuantConfig(weight_bits=wb, act_bits=ab, extra_mac_budget=0.10, budget=None)
        out.append(("+ residuals at 10% MACs + bias correction", cfg))
    # the default recipe: each layer at 4 or 8 bits within the budget (as its guard grew it)
    out.append(("the default recipe, QuantConfig()", QuantConfig()))
    return out


def run_demo(
    n_calib: int = 16,
    n_views: int = 200,
    out_json: str | Path | None = "results/demo.json",
    progress: bool = True,
    quick: bool = False,
    extra: list[tuple[str, QuantConfig]] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the default job and return the JSON-able result (also written to ``out_json``)."""
    t_start = time.perf_counter()
    torch.manual_seed(0)
    task = get_task("efficientnet-lite0")
    model = task.build()
    views, labels = task.evaluation(n_views)  # preprocessed
    pre = None
    calib_batches = list(task.calibration(n_calib).split(8))
    ref = predict(model, views, pre, batch_size=8, progress=progress, desc="FP32")
    fp = compare_logits(ref, ref, labels)
    rows = [DemoRow("fp32", None, None, None, 1.0, 0.0, float(fp.top1), 0.0)]
    log(
        f"EfficientNet-Lite0: {n_views} views of 20 foolbox ImageNet images, {n_calib} calibration images"
    )
    for note, cfg in demo_configs(quick) + (extra or []):
        cal = Calibration()
        t0 = time.perf_counter()
        q = quantize(model, calib_batches, cfg, calibration=cal, progress=False)
        secs = time.perf_counter() - t0
        w, act_bits = cfg.weights, cfg.activations.bits
        desc = f"W{w.bits}A{act_bits or 32}"
        out = predict(q, views, pre, batch_size=8, progress=progress, desc=desc)
        a = compare_logits(ref, out, labels)
        plan = cal.precision
        if plan is not None and plan.bits:  # the widths the per-layer plan chose
            n8 = sum(b >= 8 for b in plan.bits.values())
            share = plan.bytes / max(plan.bytes_8bit, 1)
            note += f" ({n8} of {len(plan.bits)} layers 8-bit, {share:.2f}x the 8-bit bytes)"
        row = DemoRow(
            getattr(w.method, "name", str(w.method)),
            w.bits,
            act_bits,
            str(w.granularity),
            a.agreement,
            a.kl,
            float(a.top1),
            round(secs, 2),
            note,
        )
        rows.append(row)
        log(
            f"  {row.method:7s} W{row.weight_bits}A{row.act_bits or 32:<3} {row.granularity:12s} "
            f"agreement {row.agreement:6.1%} kl {row.kl:.3f} top1 {row.top1:.0%} {note}"
        )
    result = {
        "model": "efficientnet-lite0",
        "rows": [r.as_dict() for r in rows],
        "eval": {"views": n_views, "images": 20, "source": "foolbox data/imagenet_*.jpg"},
        "calibration": {
            "images": n_calib,
            "sources": [p.name for p in calibration_sources()][:n_calib],
            "views": "centre crops, then mirrors and corners (omse.zoo.data.calibration_images)",
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - t_start, 1),  # the table's wall time
    }
    if out_json:
        atomic_write_text(Path(out_json), json.dumps(result, indent=2) + "\n", force=True)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| method | W | A | weights | agreement | KL | top-1 (of 20 labels x views) | calib s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['weight_bits'] or 32} | {r['act_bits'] or 32} | "
            f"{r['granularity'] or '-'} | {r['agreement']:.1%} | {r['kl']:.3f} | {r['top1']:.1%} | "
            f"{r['calib_seconds']:.1f} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def demo_report(
    calib_size: int = 16, out_dir: str | Path = "results/report_w4a4", budget: float = 0.10
) -> list[Path]:
    """The demo's W4A4 report on EfficientNet-Lite0 (MMSE, residuals at ``budget``)."""
    task = get_task("efficientnet-lite0")
    model = task.build()
    batches = list(task.calibration(calib_size).split(8))
    # every layer at 4 bits (no per-layer budget): the report is of the W4A4 recipe
    cfg = QuantConfig(weight_bits=4, act_bits=4, extra_mac_budget=budget, budget=None)
    q = quantize(model, batches, cfg)
    rows = layer_reports(q, batches)
    title = f"EfficientNet-Lite0 W4A4, MMSE + residuals at {budget:.0%} MACs + bias correction"
    paths = write_report(rows, out_dir, title, force=True)
    print(f"\nper-layer report ({', '.join(str(p) for p in paths)}), the 8 worst layers:")
    print(markdown(rows, worst=8))
    return paths
