"""Peak memory of calibration: EfficientNet-Lite0, W4A8 kernel-wise MMSE, on 16, 64 and 256 images.

Each size runs in a fresh subprocess (``--child N``) so that one run's allocations cannot hide in
another's peak. The child loads the model and the calibration images, preprocesses them into
batches of 8 with ``get_model("efficientnet-lite0").preprocess``, then resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``, Linux) and runs ``omse.quantize``. Reported per size:

- ``data MB``: the preprocessed calibration batches (``quantize`` keeps them all in memory, since
  the pipeline can pass over them more than once; this part grows with the number of images);
- ``RSS before MB``: resident memory after loading model and data, before ``quantize``;
- ``peak MB``: the highest resident memory during ``quantize`` (VmHWM after the reset);
- ``quantize MB``: ``peak - before``, the working memory of quantization itself. Its peak comes
  from the exact MMSE solve of the largest weight matrix (the 1000 x 1280 classifier), before any
  calibration batch is seen, so it is independent of the number of images;
- ``calib pass MB``: the peak of the streaming calibration pass alone (the loop over the batches
  that fills the histograms), above the resident memory at its start: one batch's activations
  and the statistics. This is what bounded memory means, and it stays flat;
- ``stats KB``: ``sum(HistogramStats.nbytes())`` over ``Calibration().stats``: constant.

Calibration images: :func:`omse.zoo.data.calibration_images` has at most 102 distinct views (17 bundled
photographs x 6 crops). Sizes above that are filled deterministically with further views of the
same crops: vertical flips, then 90-degree rotations (transposes), then rotated mirrors; so 256
images = 102 crops + 102 vertical flips + 52 transposed crops. This measures memory, not accuracy.

Run: ``.venv/bin/python benchmarks/memory.py`` (writes results/memory.json, prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from omse.runtime import reset_peak_rss, status_kb

SIZES = (16, 64, 256)
BATCH = 8
ROOT = Path(__file__).resolve().parents[1]


def calibration_set(n: int):
    """``n`` calibration images ``[n, 3, 224, 224]``: the distinct crops of
    :func:`omse.zoo.data.calibration_images`, then flipped / transposed views of them (see module doc)."""
    import torch

    from omse.errors import OmseError
    from omse.zoo.data import calibration_images

    base = None
    for k in (n, 102, 96):
        try:
            base = calibration_images(min(n, k))
            break
        except OmseError:
            continue
    if base is None:
        raise SystemExit("no calibration images available")
    views = [base, base.flip(-2), base.transpose(-1, -2), base.transpose(-1, -2).flip(-1)]
    out = torch.cat(views)[:n]
    if out.shape[0] < n:
        raise SystemExit(f"only {out.shape[0]} calibration views, asked for {n}")
    return out.contiguous()


def child(n: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from omse.config import QuantConfig
    from omse.transforms.pipeline import Calibration, quantize
    from omse.zoo.models import get_model

    spec = get_model("efficientnet-lite0")
    model = spec.build()
    images = calibration_set(n)
    batches = [spec.preprocess(images[i : i + BATCH]) for i in range(0, n, BATCH)]
    del images
    data_bytes = sum(b.numel() * b.element_size() for b in batches)
    before = status_kb("VmRSS")
    reset = reset_peak_rss()
    # the calibration pass alone: peak above the RSS at its start (needs the peak reset)
    import omse.transforms.pipeline

    orig = omse.transforms.pipeline.collect  # the pipeline's calibration pass(es)
    box: dict = {}

    def measured(*a, **k):
        box["peak_so_far"] = status_kb("VmHWM")
        box["rss0"] = status_kb("VmRSS")
        box["reset"] = reset_peak_rss()
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            box["secs"] = time.perf_counter() - t
            box["hwm"] = status_kb("VmHWM")

    omse.transforms.pipeline.collect = measured
    cal = Calibration()
    t0 = time.perf_counter()
    quantize(
        model,
        batches,
        QuantConfig.preset(
            "fast",
            weight_bits=4,
            act_bits=8,
            weight_method="mmse",
            act_method="mmse",
            granularity="per_channel",
        ),
        calibration=cal,
    )
    secs = time.perf_counter() - t0
    omse.transforms.pipeline.collect = orig
    peak = max(status_kb("VmHWM") or 0, box.get("peak_so_far") or 0) if reset else None
    if peak is None:  # no reset possible: the process-lifetime peak (includes loading)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calib_pass = box["hwm"] - box["rss0"] if box.get("reset") and box.get("rss0") else None
    return {
        "images": n,
        "batches": len(batches),
        "data_mb": round(data_bytes / 2**20, 1),
        "rss_before_mb": round(before / 1024, 1) if before else None,
        "peak_mb": round(peak / 1024, 1),
        "quantize_mb": round((peak - before) / 1024, 1) if before else None,
        "calib_pass_mb": round(calib_pass / 1024, 1) if calib_pass is not None else None,
        "calib_pass_seconds": round(box.get("secs", float("nan")), 1),
        "stats_kb": round(sum(h.nbytes() for h in cal.stats.values()) / 1024, 1),
        "stats_tensors": len(cal.stats),
        "seconds": round(secs, 1),
        "peak_reset": reset,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| images | batches | data MB | RSS before MB | peak MB | quantize MB (peak - before) "
        "| calib pass MB | stats KB | quantize s | calib pass s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images']} | {r['batches']} | {r['data_mb']} | {r['rss_before_mb']} | "
            f"{r['peak_mb']} | {r['quantize_mb']} | {r['calib_pass_mb']} | {r['stats_kb']} | "
            f"{r['seconds']} | {r['calib_pass_seconds']} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--json", default=str(ROOT / "results" / "memory.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads)))
        return 0
    rows = []
    for n in args.sizes:
        r = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            sys.stderr.write(r.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{n} images: peak {rows[-1]['peak_mb']} MB", file=sys.stderr)
    import torch

    from omse.io import atomic_write_text

    result = {
        "model": "efficientnet-lite0",
        "config": "W4A8, kernel-wise MMSE weights, MMSE activations",
        "batch_size": BATCH,
        "images": "omse.zoo.data.calibration_images crops; beyond 102: flipped/transposed views",
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "rows": rows,
    }
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n", force=True)
    print(markdown(rows))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
