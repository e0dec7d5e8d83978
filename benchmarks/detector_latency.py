"""The detectors' int8 files against onnxruntime's own: latency in onnxruntime and OpenVINO,
integer kernels, float compute left between them, and agreement with omse's simulation.

For YOLOX-nano and NanoDet-m (``--data``, the project's ``../shared/data``; see
``benchmarks/detection.py`` for where a user gets the models and images), one run builds:

- ``fp32``: the ONNX file itself;
- ``ortq_w8a8``: onnxruntime's ``quantize_static`` of it (QDQ, per-channel int8 weights, uint8
  activations as onnxruntime defaults to and ``benchmarks/latency.py`` has it, MinMax;
  :func:`detection.ort_static`), calibrated on the same images as omse;
- ``omse_default_int8``: ``omse.export_onnx(omse.quantize(path, calib, QuantConfig(target=
  "int8")))``, the default recipe and export (default weight type);
- with ``--no-fallback``, ``omse_no_fallback_int8``: the same without the float fallback
  (``ActQuant(fallback_db=None)``), which shows what the fallback's float layers cost;

then times them interleaved as ``benchmarks/latency.py`` does (its session settings: ``--threads``
intra-op threads, no spin-waiting, one inter-op thread; OpenVINO CPU with its f32 hint and one
stream; every candidate once per round in a shuffled order, medians; speed-ups over the same
runtime's FP32 median of the same run), on one held-out image (``--images`` more for the
agreement). The files take one image (their input's batch is 1), so batch 1 only. Per graph:
onnxruntime's optimized graph's integer kernels and the float compute nodes left between them
(:func:`latency._graph_kernels`), and the largest difference of each output between omse's file
in onnxruntime and omse's simulation (the quantized module) on held-out images: exact only where
onnxruntime's int8 arithmetic is (an x86 CPU without VNNI runs the u8s8 kernels exactly for the
weight codes the default writes; a VNNI CPU too; AVX2 without VNNI saturates pairs beyond +-64).

    python benchmarks/detector_latency.py --data ../shared/data [--models yolox,nanodet]
        [--threads 2] [--rounds 60] [--calib 32] [--images 8] [--no-fallback]

Prints a markdown table and writes ``results/detector_latency.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

# torch's OpenMP workers sleep at once, as benchmarks/latency.py times (read when torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import detection  # noqa: E402
import latency as L  # noqa: E402
from heldout import DEFAULT_DATA  # noqa: E402

import omse  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402


def _eval_images(data: Path, m, n: int) -> list[np.ndarray]:
    """The first ``n`` annotated images (never calibration), preprocessed for ``m``."""
    return [m.preprocess(im)[0] for _, im in detection.load_images(data / detection.EVAL_DIR, n)]


def bench(name: str, data: Path, args, work: Path, ovr) -> dict:
    m = detection.models(data)[name]
    calib = detection.calibration_inputs(m, data, args.calib)
    held = _eval_images(data, m, args.images)
    paths = {"fp32": m.path}
    t = time.perf_counter()
    detection.ort_static(m.path, work / f"{name}.ortq.onnx", calib, "MinMax", "QUInt8")
    paths["ortq_w8a8"] = work / f"{name}.ortq.onnx"
    seconds = {"ortq_w8a8": round(time.perf_counter() - t, 2)}
    default = omse.QuantConfig(target="int8")
    configs = {"omse_default_int8": default}
    if args.no_fallback:
        off = replace(default.activations, fallback_db=None)
        configs["omse_no_fallback_int8"] = replace(default, activations=off)
    fallback, quantized = {}, {}
    for g, cfg in configs.items():
        t = time.perf_counter()
        cal = omse.Calibration()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's line
            qg = omse.quantize(
                str(m.path), [torch.from_numpy(x) for x in calib], cfg, calibration=cal
            )
        omse.export_onnx(qg, torch.from_numpy(calib[0]), str(work / f"{name}.{g}.onnx"), force=True)
        paths[g] = work / f"{name}.{g}.onnx"
        seconds[g] = round(time.perf_counter() - t, 2)
        fallback[g], quantized[g] = sorted(cal.fallback), qg
    q = quantized["omse_default_int8"]  # its file is compared with the simulation below

    graphs, sessions, compiled = {}, {}, {}
    for g, p in paths.items():
        opt = work / f"{name}.{g}.opt.onnx"
        sessions[g] = L._ort_session(p, args.threads, optimized=opt)
        graphs[g] = {"file_bytes": Path(p).stat().st_size, **L._graph_kernels(opt)}
        if ovr is not None:
            compiled[g], _ = ovr.compile(Path(p))
            graphs[g]["openvino"] = ovr.layers(compiled[g])
    x = held[0]
    inp = {g: s.get_inputs()[0].name for g, s in sessions.items()}
    fns = {f"ort_{g}": (lambda s=s, g=g: s.run(None, {inp[g]: x})) for g, s in sessions.items()}
    fns |= {f"ov_{g}": (lambda c=c: ovr.run_timed(c, x)) for g, c in compiled.items()}
    timing = L._interleaved(fns, args.rounds, args.warmup, args.seconds, args.seed)
    for k, v in timing.items():
        ref = timing["ort_fp32" if k.startswith("ort_") else "ov_fp32"]["median_ms"]
        v["speedup_vs_fp32"] = round(ref / v["median_ms"], 3)

    # omse's file in onnxruntime against omse's simulation, output by output
    diffs = []
    with torch.no_grad():
        for h in held:
            sim = q(torch.from_numpy(h))
            sim = [sim] if torch.is_tensor(sim) else list(sim)
            got = sessions["omse_default_int8"].run(None, {inp["omse_default_int8"]: h})
            diffs.append(
                max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got, sim, strict=True))
            )
    return {
        "model": name,
        "input": list(x.shape),
        "calib_images": len(calib),
        "held_out_images": len(held),
        "quantize_seconds": seconds,
        "float_fallback_layers": fallback,
        "latency": timing,
        "graphs": graphs,
        "omse_vs_simulation_max_abs": max(diffs),
        "omse_vs_simulation_exact_images": sum(d == 0.0 for d in diffs),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| model | graph | ORT ms | ORT vs FP32 | OpenVINO ms | OV vs FP32 | ORT integer kernels "
        "| float compute between them |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for g in r["graphs"]:
            o, v, k = r["latency"].get(f"ort_{g}"), r["latency"].get(f"ov_{g}"), r["graphs"][g]
            between = [f"{b['op']} {b['name']}" for b in k.get("float_between_integer_kernels", [])]
            lines.append(
                f"| {r['model']} | {g} | {o['median_ms']:.2f} | {o['speedup_vs_fp32']:.2f}x | "
                + (f"{v['median_ms']:.2f} | {v['speedup_vs_fp32']:.2f}x" if v else "- | -")
                + f" | {k.get('integer_kernels', '-')} | "
                + (
                    ", ".join(between[:8]) + (" ..." if len(between) > 8 else "")
                    if between
                    else "none"
                )
                + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--models", default="yolox,nanodet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-fallback",
        action="store_true",
        help="time the default without its float fallback as well (omse_no_fallback_int8: every "
        "layer's activations at 8 bits), the fallback's price in latency",
    )
    ap.add_argument("--out", default="results/detector_latency.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    ovr = L.OpenVino(args.threads, "f32")
    ovr = ovr if ovr.available else None
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="omse-detlat-") as tmp:
        for name in [n for n in args.models.split(",") if n]:
            m = detection.models(data).get(name)
            if m is None or not m.path.is_file() or not (data / detection.CALIB_DIR).is_dir():
                print(
                    f"skip {name}: model or {detection.CALIB_DIR} missing under {data}",
                    file=sys.stderr,
                )
                skipped.append(name)
                continue
            results.append(bench(name, data, args, Path(tmp), ovr))
    cpu, flags = L._cpu()
    out = {
        "benchmark": "detector_latency",
        "machine": {
            "cpu": cpu,
            "flags": flags,
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "openvino": None if ovr is None else ovr.version,
            "torch": torch.__version__,
            "threads": args.threads,
        },  # fmt: skip
        "rounds": args.rounds,
        "models": results,
        "skipped": skipped,
    }
    print(table(results))
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n", force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
