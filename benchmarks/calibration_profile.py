"""Where a default ``target="int8"`` calibration spends its time: each step of each round, and
the functions of most self time.

For EfficientNet-Lite0 (``omse.zoo``, 32 images in batches of 16), NanoDet-m and YOLOX-nano
(their ONNX files from ``--data``, 32 unannotated COCO images, batch 1; see
``benchmarks/detection.py`` for where a user gets them) and rapidocr's PP-OCRv4 recognizer (its
ONNX file from PyPI ``rapidocr-onnxruntime``, 32 synthetic calibration lines in batches of 8,
as ``benchmarks/ocr.py``), one untimed warm-up call, then one ``omse.quantize(model, batches,
QuantConfig(target="int8"))`` call under :mod:`cProfile`:

- ``steps``: ``Calibration.rounds``, every calibration round's step seconds (``wrap``,
  ``precision``, ``weights``, ``plan``, ``activations`` with its ``statistics pass``, ``bias``,
  and the float fallback's and budget guard's measurements), summed over the rounds, with each
  one's share of the call's wall time (the ``statistics pass`` is part of ``activations``);
- ``functions``: the ``--top`` functions of most self time (``tottime``) in the calling thread.
  The histogram binning that :class:`omse.core.stats.DeferredBinning` runs on worker threads is
  not in cProfile's view: the calling thread's wait for it is (``wait`` of ``threading``).

cProfile's own overhead inflates the many small Python calls (the wall times here run 10-30%
above an unprofiled call's, ``benchmarks/calibration_time.py``); the shares are what to read.

    python benchmarks/calibration_profile.py [--models lite0,nanodet,yolox,rec] [--threads 2]
        [--top 8] [--data ../shared/data]

Prints markdown tables and writes ``results/calibration_profile.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import detection  # noqa: E402
from heldout import DEFAULT_DATA  # noqa: E402
from profiling import top  # noqa: E402

import omse  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.runtime import cpu_name  # noqa: E402

MODELS = ("lite0", "nanodet", "yolox", "rec")
CALIB = 32  # calibration images (lines for the recognizer), as benchmarks/calibration_time.py


def _rec_case():
    """(ONNX path, batches) of rapidocr's recognizer on ``benchmarks/ocr.py``'s calibration
    lines, or None when rapidocr-onnxruntime is missing."""
    import ocr as O  # benchmarks/ocr.py

    from omse.zoo import ocr

    try:
        path = ocr.rapidocr_models()["rec"]
    except Exception as e:
        print(f"skip rec: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    lines = ocr.text_lines(CALIB, "calib", 0)
    task = O._rec_task(path, lines, lines[:8], 8)
    return str(path), [torch.from_numpy(x) for x in task.calib]


def case(name: str, data: Path):
    """(what ``quantize`` takes, batches), or None (said on stderr)."""
    if name == "lite0":
        from omse.zoo.models import get_model
        from omse.zoo.tasks import get_task

        try:
            model = get_model("efficientnet-lite0").build().eval()
            calib = get_task("efficientnet-lite0").calibration(CALIB).contiguous()
        except Exception as e:  # weights or data missing: say so, run the others
            print(f"skip lite0: {type(e).__name__}: {e}", file=sys.stderr)
            return None
        return model, list(calib.split(16))
    if name in ("nanodet", "yolox"):
        m = detection.models(data)[name]
        if not m.path.is_file() or not (data / detection.CALIB_DIR).is_dir():
            print(f"skip {name}: {m.path} or {data / detection.CALIB_DIR} missing", file=sys.stderr)
            return None
        return str(m.path), [
            torch.from_numpy(x) for x in detection.calibration_inputs(m, data, CALIB)
        ]
    if name == "rec":
        return _rec_case()
    raise SystemExit(f"calibration_profile.py: unknown model {name!r} (use {', '.join(MODELS)})")


def profile(name: str, model, batches: list, k: int) -> dict:
    cfg = omse.QuantConfig(target="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's line
        omse.quantize(model, batches, cfg)  # warm-up: imports, numba's cache
        cal = omse.Calibration()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        omse.quantize(model, batches, cfg, calibration=cal)
        prof.disable()
        wall = time.perf_counter() - t
    steps: dict[str, float] = defaultdict(float)
    for timings in cal.rounds:
        for step, sec in timings.items():
            steps[step] += sec
    return {
        "model": name,
        "batches": len(batches),
        "rounds": len(cal.rounds),
        "wall_seconds": round(wall, 3),
        "steps": {
            s: {"seconds": round(v, 3), "share": round(v / wall, 3)} for s, v in steps.items()
        },
        "functions": top(prof, k, by="tottime"),
    }


def tables(results: list[dict]) -> str:
    out = []
    for r in results:
        out.append(
            f"\n**{r['model']}**: {r['wall_seconds']:.1f} s profiled, {r['rounds']} round(s), "
            f"{r['batches']} batches\n"
        )
        out.append("| step (all rounds) | seconds | share of the call |")
        out.append("|---|---|---|")
        for s, v in sorted(r["steps"].items(), key=lambda kv: -kv[1]["seconds"]):
            label = "statistics pass (part of activations)" if s == "statistics pass" else s
            out.append(f"| {label} | {v['seconds']:.2f} | {100 * v['share']:.0f}% |")
        out.append("\n| function (self time) | calls | tottime s | cumtime s |")
        out.append("|---|---|---|---|")
        for f in r["functions"]:
            out.append(
                f"| `{f['function']}` | {f['calls']} | {f['tottime']:.2f} | {f['cumtime']:.2f} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="results/calibration_profile.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, skipped = [], []
    for name in [m for m in args.models.split(",") if m]:
        c = case(name, Path(args.data))
        if c is None:
            skipped.append(name)
            continue
        results.append(profile(name, *c, args.top))
        print(f"{name}: {results[-1]['wall_seconds']:.1f} s", file=sys.stderr)
    print(tables(results))
    out = {
        "benchmark": "calibration_profile",
        "machine": {
            "cpu": cpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "config": 'QuantConfig(target="int8")',
        "models": results,
        "skipped": skipped,
    }
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n", force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
