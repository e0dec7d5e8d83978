"""Calibration time against onnxruntime's ``quantize_static``, same models, data and machine.

For each model, every candidate quantizes the same calibration images, in rounds: each round
runs every candidate once in a shuffled order (fixed seed), so load from other processes hits
them alike; medians over ``--repeats`` rounds, and every median as a ratio to ``quantize_static``
MinMax's of the same run:

- ``ort MinMax`` / ``ort Percentile``: onnxruntime's ``quantize_static`` (QDQ, per-channel int8
  weights, int8 activations) of the float ONNX file, timed end to end as a user runs it: opset
  13 conversion, ``quant_pre_process``, ``quantize_static`` (:func:`detection.ort_static`);
- ``omse fast`` / ``omse default``: ``omse.quantize(model, batches, config)`` with
  ``QuantConfig.preset("fast", target="int8")`` (plain MMSE, every layer at 4 bits, one
  statistics pass, plus the float fallback's estimate; ``omse fast 8-bit``: the same with
  ``weight_bits=8``, the width the preset's docstring recommends for accuracy, whose float
  fallback round reuses the first round's statistics) and ``QuantConfig(target="int8")`` (the
  default recipe: per-layer precision within 0.6x of the 8-bit weight bytes and its guard,
  residual tensors, bias correction, float fallback): ``calibration`` is the ``quantize`` call,
  ``end to end`` adds ``omse.export_onnx`` (the file a user deploys, as ``quantize_static``
  writes one); for the default, ``report`` times ``omse.report`` on the same batches after
  it (the per-layer report: two passes over the batches, no statistics recomputed). PyTorch models are quantized as modules; detectors from their ONNX files (import
  and onnxruntime check included);
- ``float forward``: the float model omse calibrates (the ONNX file as omse imports it) run
  over the same batches (torch, no gradients): the unit of the ``statistics pass`` column, the
  activation statistics pass of each omse recipe's last round (``Calibration.timings``).

Models: EfficientNet-Lite0 and the Fashion-MNIST zoo (``omse.zoo``; 32 calibration images in
batches of 16, as ``benchmarks/latency.py``), YOLOX-nano and NanoDet-m from ``--data`` (the
project's ``../shared/data``; see ``benchmarks/detection.py`` for where a user gets them; 32
unannotated COCO images, batches of 1 as their ONNX files take them). Missing models are
skipped. One untimed warm-up run of each candidate first (imports, numba's cache, onnxruntime's
first session), so the medians are what a process quantizing a second model pays. Threads:
``--threads`` for torch; onnxruntime's calibration session takes its default (one per core), so
on this 2-core machine both sides use both cores by default. torch's OpenMP threads wait as
libgomp has them by default (a user's process); ``--omp-passive`` makes them sleep at once
(``OMP_WAIT_POLICY=PASSIVE``), which costs omse's many small parallel regions far more than
onnxruntime's calibration (its own pool spins by default either way).

    python benchmarks/calibration_time.py [--models ...] [--repeats 3] [--threads 2]
        [--omp-passive] [--data ../shared/data]

Prints a markdown table and writes ``results/calibration_time.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

# torch's OpenMP threads wait as in a user's process (libgomp's default: spin briefly, then
# sleep) unless --omp-passive asks them to sleep at once (OMP_WAIT_POLICY=PASSIVE, as the latency
# benchmarks run; read when torch loads OpenMP, so taken from argv before the import). An
# OMP_WAIT_POLICY in the environment wins either way.
if "--omp-passive" in sys.argv[1:]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import detection  # noqa: E402
from heldout import DEFAULT_DATA  # noqa: E402

import omse  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.runtime import cpu_name  # noqa: E402
from omse.transforms.onnx_import import load_onnx  # noqa: E402

ZOO = ("efficientnet-lite0", "fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")
DETECTORS = ("yolox", "nanodet")
CALIB = 32


def _zoo_case(name: str, work: Path):
    """(float ONNX path, torch model, batches) of a zoo model, or None when it cannot run."""
    from omse.zoo.models import get_model
    from omse.zoo.tasks import get_task

    try:
        model = get_model(name).build().eval()
        calib = get_task(name).calibration(CALIB).contiguous()
    except Exception as e:  # weights or data missing: say so, run the others
        print(f"skip {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    path = work / f"{name}.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            calib[:1],
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
            opset_version=13,
            dynamo=False,
        )
    return path, model, list(calib.split(16))


def _detector_case(name: str, data: Path):
    m = detection.models(data)[name]
    folder = data / detection.CALIB_DIR
    if not m.path.is_file() or not folder.is_dir():
        print(f"skip {name}: {m.path} or {folder} missing", file=sys.stderr)
        return None
    calib = detection.calibration_inputs(m, data, CALIB)
    return m.path, None, [torch.from_numpy(x) for x in calib]


def candidates(src: Path, model, batches: list, work: Path) -> dict[str, Callable[[], dict]]:
    """``{label: run}``; each run quantizes once and returns its timings (seconds)."""
    arrays = [b.numpy() for b in batches]

    def ort(method: str):
        def run():
            t = time.perf_counter()
            detection.ort_static(src, work / f"ort_{method}.onnx", arrays, method)
            return {"calibration": time.perf_counter() - t}

        return run

    def ours(config: omse.QuantConfig, report: bool = False):
        def run():
            cal = omse.Calibration()
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fallback's and the guard's lines
                q = omse.quantize(
                    model if model is not None else str(src), batches, config, calibration=cal
                )
                t1 = time.perf_counter()
                omse.export_onnx(q, batches[0], str(work / "omse.onnx"), force=True)
                t2 = time.perf_counter()
                if report:
                    omse.report(q, batches, work / "report", force=True)
            times = {"calibration": t1 - t, "end_to_end": t2 - t}
            if "statistics pass" in cal.timings:
                times["statistics_pass"] = cal.timings["statistics pass"]
            if report:
                times["report"] = time.perf_counter() - t2
            return times

        return run

    # the float model omse calibrates (the ONNX file imported as omse imports it)
    floats = model if model is not None else load_onnx(str(src), sample=batches[0])

    def forward():
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                floats(b)
        return {"forward": time.perf_counter() - t}

    return {
        "float forward": forward,
        "ort MinMax": ort("MinMax"),
        "ort Percentile": ort("Percentile"),
        "omse fast": ours(omse.QuantConfig.preset("fast", target="int8")),
        "omse fast 8-bit": ours(omse.QuantConfig.preset("fast", weight_bits=8, target="int8")),
        "omse default": ours(omse.QuantConfig(target="int8"), report=True),
    }


def bench(name: str, case, repeats: int, work: Path, seed: int) -> dict:
    src, model, batches = case
    runs = candidates(src, model, batches, work)
    times: dict[str, list[dict]] = {k: [] for k in runs}
    rng = random.Random(seed)
    for run in runs.values():  # warm-up, not timed: imports, compiled kernels' caches
        with contextlib.suppress(Exception):  # the timed rounds record a failure
            run()
    for r in range(repeats):
        order = list(runs)
        rng.shuffle(order)
        for label in order:
            try:
                times[label].append(runs[label]())
            except Exception as e:  # a failed candidate is recorded, the others still run
                traceback.print_exc()
                times[label].append({"error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{name} round {r + 1}: {label} {times[label][-1]}", file=sys.stderr)
    med = {
        k: {
            key: statistics.median(t[key] for t in ts if key in t)
            for key in ("calibration", "end_to_end", "report", "statistics_pass", "forward")
            if any(key in t for t in ts)
        }
        for k, ts in times.items()
    }
    ref = med["ort MinMax"].get("calibration")
    fwd = med["float forward"].get("forward")
    rows = []
    for k, m in med.items():
        row = {"candidate": k, "median_seconds": {a: round(b, 2) for a, b in m.items()}}
        if ref:
            row["vs_ort_minmax"] = {
                a: round(b / ref, 2)
                for a, b in m.items()
                if a in ("calibration", "end_to_end", "report")
            }
        if fwd and "statistics_pass" in m:
            row["statistics_pass_vs_float_forward"] = round(m["statistics_pass"] / fwd, 2)
        errors = [t["error"] for t in times[k] if "error" in t]
        if errors:
            row["errors"] = errors
        rows.append(row)
    images = sum(int(b.shape[0]) for b in batches)
    return {"model": name, "images": images, "batches": len(batches), "rows": rows}


def table(result: dict) -> str:
    lines = [
        "| model | candidate | calibration s (median) | x `quantize_static` MinMax | "
        "end to end s | x MinMax | `omse.report` s (x calibration) | statistics pass s "
        "(x float forward) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        for r in m["rows"]:
            s, x = r["median_seconds"], r.get("vs_ort_minmax", {})

            def f(d, k, fmt):
                return format(d[k], fmt) if k in d else "-"

            lines.append(
                f"| {m['model']} | {r['candidate']} | {f(s, 'calibration', '.1f')} | "
                f"{f(x, 'calibration', '.2f')} | {f(s, 'end_to_end', '.1f')} | "
                f"{f(x, 'end_to_end', '.2f')} | "
                + (
                    f"{s['report']:.1f} ({s['report'] / s['calibration']:.2f})"
                    if "report" in s and s.get("calibration")
                    else "-"
                )
                + " | "
                + (
                    f"{s['statistics_pass']:.2f} ({r['statistics_pass_vs_float_forward']:.2f})"
                    if "statistics_pass_vs_float_forward" in r
                    else f"{s['forward']:.2f} (float forward)"
                    if "forward" in s
                    else "-"
                )
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(ZOO + DETECTORS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument(
        "--omp-passive",
        action="store_true",
        help="torch's idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE; default: "
        "libgomp's own policy, as a user's process runs)",
    )
    ap.add_argument("--out", default="results/calibration_time.json")
    args = ap.parse_args(argv)
    if args.omp_passive and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # libgomp reads the policy when torch loads it: only the command line's flag, read at
        # import, or the environment can set it
        ap.error("--omp-passive takes effect from the command line or OMP_WAIT_POLICY=PASSIVE")
    torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(ZOO + DETECTORS))
    if unknown:
        ap.error(f"unknown models {unknown}; use some of {ZOO + DETECTORS}")
    result = {
        "benchmark": "calibration_time",
        "machine": {
            "cpu": cpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads,
            "onnxruntime": detection.ort.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "libgomp default"),
        },
        "repeats": args.repeats,
        "models": [],
        "skipped": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            case = (
                _detector_case(name, Path(args.data))
                if name in DETECTORS
                else _zoo_case(name, work)
            )
            if case is None:
                result["skipped"].append(name)
                continue
            result["models"].append(bench(name, case, args.repeats, work, args.seed))
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n", force=True)
    print(table(result))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n", force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
