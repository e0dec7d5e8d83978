"""Calibration at the cost of an inference pass: the statistics pass against a float forward pass.

For each model, the activation statistics pass of :func:`omse.quantize` (``collect`` with
``Needs(input_histograms=True)`` and the output histograms of ``target="int8"``, the op-quantizer
sites' observers attached as ``quantize`` attaches them) is timed on the wrapped model, in the
state calibration runs it (the pass is captured inside ``quantize``), against a float forward
pass of the FP32 model over the same batches. Models: EfficientNet-Lite0 (32 images at 224x224,
batches of 8), the Fashion-MNIST zoo nets (256 images, batches of 8), and YOLOX-nano and
NanoDet-m from their ONNX files (32 batch-1 COCO images, preprocessed as
``benchmarks/detection.py`` does; the forward is the FP32 module ``omse.load_onnx`` makes) from
``--data`` (the project's ``../shared/data``; skipped, and said so, without it). Candidates,
interleaved in every repeat:

- ``forward``: the FP32 model over the calibration batches (``torch.no_grad``);
- ``qforward``: the wrapped model over the same batches in the state the pass runs it, without
  its observers (what the pass costs before any statistics: wrappers, op-quantizer sites);
- ``stats``: the statistics pass as it is now;
- ``stats_old``: the same pass with the implementation before this benchmark's last change
  (commit 1a53d9c: the serial binning loop of :mod:`omse.core.binning` that adds zeros like any
  value, and ``HistogramStats.absorb`` by torch), restored here verbatim, each update binned as
  it comes (before :class:`~omse.core.stats.DeferredBinning` bins a batch's histograms side by
  side after its forward pass).

The histograms of ``stats`` and ``stats_old`` are compared on every model: counts, per-bin sums,
ranges and extremes equal bit for bit, and the largest relative difference of the float64 moments
(the kernels sum them in SIMD lanes of their own: float64 rounding, not bit for bit). Reported: median seconds, the ratios ``stats / forward``,
``stats_old / forward`` and ``qforward / forward`` of wall-clock and of CPU-time medians, and a
cProfile top-15 (cumulative time) of one ``stats`` pass on ``--profile``. Writes
``results/calibration_speed.json``.

    OMP_NUM_THREADS=2 python benchmarks/calibration_speed.py --repeats 5 --threads 2 \
        [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import detection  # noqa: E402
from heldout import DEFAULT_DATA  # noqa: E402
from kernels_1a53d9c import bins_1a53d9c, moments_1a53d9c  # noqa: E402
from profiling import top  # noqa: E402

import omse.transforms.pipeline as pipeline  # noqa: E402
from omse.config import QuantConfig  # noqa: E402
from omse.core.stats import DeferredBinning, HistogramStats  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.ops import OPS_ATTR  # noqa: E402
from omse.transforms import statistics as st  # noqa: E402
from omse.transforms.onnx_import import load_onnx  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402
from omse.zoo.tasks import get_task  # noqa: E402

ZOO = ("efficientnet-lite0", "fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")
DETECTORS = ("yolox", "nanodet")
MODELS = ZOO + DETECTORS


# -- the implementation before this benchmark's change (commit 1a53d9c), for the old timing ------
def _old_update(self: HistogramStats, x: torch.Tensor, clamp=None) -> HistogramStats:
    v = x.detach().reshape(-1)
    if not v.is_floating_point():
        v = v.to(torch.float64)
    if v.numel() == 0:
        return self
    if clamp is not None:
        v = v.clamp(*clamp)
    lo, hi = torch.aminmax(v)
    vmin, vmax = float(lo), float(hi)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError("calibration values contain NaN or Inf")
    self._range_to(v.numel(), vmin, vmax)
    if self.radius == 0.0:
        self.counts[self.bins // 2] += v.numel()
        return self
    if v.dtype not in (torch.float32, torch.float64):
        v = v.to(torch.float32)
    a = v.resolve_conj().resolve_neg().contiguous().numpy()
    m = np.zeros(4)
    moments_1a53d9c(a, m)
    bins_1a53d9c(a, self.radius, self.counts.numpy(), self.sums.numpy())
    self.sum += float(m[0])
    self.sum_sq += float(m[1])
    self.sum_abs += float(m[2])
    self.sum_4 += float(m[3])
    return self


def _old_absorb(self: HistogramStats, other: HistogramStats) -> HistogramStats:
    if other.bins != self.bins:
        raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
    radius = max(self.radius, other.radius)
    self._double_to(radius)
    oc, osum = other.counts, other.sums
    if 0.0 < other.radius < radius:
        tmp = HistogramStats(other.bins, other.radius, oc.clone(), osum.clone())
        tmp._double_to(radius)
        oc, osum = tmp.counts, tmp.sums
    self.counts += oc
    self.sums += osum
    self.n += other.n
    self.min, self.max = min(self.min, other.min), max(self.max, other.max)
    self.sum, self.sum_sq = self.sum + other.sum, self.sum_sq + other.sum_sq
    self.sum_abs, self.sum_4 = self.sum_abs + other.sum_abs, self.sum_4 + other.sum_4
    return self


def _old_plain(self: HistogramStats) -> bool:
    return all(
        t.dtype == torch.float64 and t.device.type == "cpu" and t.is_contiguous()
        for t in (self.counts, self.sums)
    )


@contextlib.contextmanager
def old_implementation():
    """The binning and merging of commit 1a53d9c, each update binned as it comes (no
    :class:`~omse.core.stats.DeferredBinning`; restored on exit)."""
    names = ("update", "absorb", "_plain")
    saved = [getattr(HistogramStats, n) for n in names]
    take = DeferredBinning.take
    for n, f in zip(names, (_old_update, _old_absorb, _old_plain), strict=True):
        setattr(HistogramStats, n, f)
    DeferredBinning.take = lambda self, *a: False
    try:
        yield
    finally:
        for n, f in zip(names, saved, strict=True):
            setattr(HistogramStats, n, f)
        DeferredBinning.take = take


# -- measuring ----------------------------------------------------------------------------------
@contextlib.contextmanager
def inside_activation_pass(hook):
    """While entered, ``quantize``'s activation statistics pass first calls ``hook(qmodel,
    layers, batches, needs)``: the pass's arguments in the state calibration runs it."""
    real = pipeline.collect
    done = []

    def spy(qmodel, layers, bs, needs, *a, **k):
        if needs.input_histograms and not done:
            done.append(hook(qmodel, layers, bs, needs))
        return real(qmodel, layers, bs, needs, *a, **k)

    pipeline.collect = spy
    try:
        yield
    finally:
        pipeline.collect = real


def _time(fn) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of the process)`` of ``fn()``: on a shared machine the CPU
    time is the steadier figure (time spent descheduled is not in it)."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def _same(new: dict, old: dict) -> dict:
    """Counts, per-bin sums, ranges and extremes equal bit for bit; the largest relative moment
    difference (0 when the moments are equal too)."""
    equal, worst = True, 0.0
    for name, s in new.items():
        for f in ("input", "output"):
            a, b = getattr(s, f), getattr(old[name], f)
            if a is None and b is None:
                continue
            equal &= torch.equal(a.counts, b.counts) and torch.equal(a.sums, b.sums)
            equal &= (a.n, a.min, a.max, a.radius) == (b.n, b.min, b.max, b.radius)
            for m in ("sum", "sum_sq", "sum_abs", "sum_4"):
                x, y = getattr(a, m), getattr(b, m)
                worst = max(worst, abs(x - y) / max(abs(y), 1e-300))
    return {"histograms_bit_equal": bool(equal), "moments_max_rel_diff": worst}


def case(name: str, args) -> tuple | None:
    """``(FP32 model, what quantize takes, batches, images, batch size)`` of a model, or None
    (said on stderr) when its weights or data are missing."""
    if name in DETECTORS:
        data = Path(args.data)
        m = detection.models(data)[name]
        folder = data / detection.CALIB_DIR
        if not m.path.is_file() or not folder.is_dir():
            print(f"skip {name}: {m.path} or {folder} missing", file=sys.stderr)
            return None
        calib = detection.calibration_inputs(m, data, args.detector_images)
        batches = [torch.from_numpy(x) for x in calib]
        return load_onnx(m.path), str(m.path), batches, len(batches), 1
    n = args.images if name == "efficientnet-lite0" else args.fmnist_images
    try:
        task = get_task(name)
        model = task.build().eval()
        batches = list(task.calibration(n).split(args.batch))
    except Exception as e:  # weights or data missing: say so, run the others
        print(f"skip {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return model, model, batches, n, args.batch


def measure(name: str, c: tuple, repeats: int, profile: bool) -> dict:
    model, source, batches, n_images, batch = c
    config = QuantConfig.preset("fast", target="int8", weight_bits=8, act_bits=8)
    out: dict = {}

    def hook(qmodel, layers, bs, needs):
        run = lambda: st.collect(qmodel, layers, bs, needs)  # noqa: E731

        def forward():
            with torch.no_grad():
                for b in bs:
                    model(b)

        def old():
            with old_implementation():
                return run()

        def qforward():  # the wrapped model as the pass runs it, no observer
            ops = getattr(qmodel, OPS_ATTR, None)
            saved = None if ops is None else ops.observer
            if ops is not None:
                ops.observer = None
            try:
                with torch.no_grad():
                    for b in bs:
                        st.run_model(qmodel, b)
            finally:
                if ops is not None:
                    ops.observer = saved

        forward(), qforward(), run(), old()  # warm-up: compiled kernels, allocator
        fns = {"forward": forward, "qforward": qforward, "stats": run, "stats_old": old}
        wall: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):  # interleaved
            for k, fn in fns.items():
                w, c = _time(fn)
                wall[k].append(w)
                cpu[k].append(c)
        out["check"] = _same(run(), old())
        out["seconds"] = {k: statistics.median(v) for k, v in wall.items()}
        out["cpu_seconds"] = {k: statistics.median(v) for k, v in cpu.items()}
        out["all_seconds"], out["all_cpu_seconds"] = wall, cpu
        out["layers"] = len(layers)
        out["output_histograms"] = len(needs.output_clamp)
        out["values_per_pass"] = sum(
            s.input.n + (s.output.n if s.output is not None else 0) for s in run().values()
        )
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            run()
            prof.disable()
            out["profile"] = top(prof, 15)

    with inside_activation_pass(hook), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ONNX import's and the fallback's lines
        quantize(source, batches, config)
    sec, cpu_s = out["seconds"], out["cpu_seconds"]
    out.update(
        cpu_ratio_stats_forward=cpu_s["stats"] / cpu_s["forward"],
        cpu_ratio_old_forward=cpu_s["stats_old"] / cpu_s["forward"],
        cpu_ratio_qforward_forward=cpu_s["qforward"] / cpu_s["forward"],
        ratio_qforward_forward=sec["qforward"] / sec["forward"],
        model=name,
        images=n_images,
        batch=batch,
        input_shape=list(batches[0].shape[1:]),
        ratio_stats_forward=sec["stats"] / sec["forward"],
        ratio_old_forward=sec["stats_old"] / sec["forward"],
        speedup=sec["stats_old"] / sec["stats"],
    )
    return out


def cpu() -> dict:
    model, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    return {
        "cpu": model,
        "avx512_vnni": "avx512_vnni" in flags.split(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def tables(result: dict) -> str:
    lines = [
        "Wall-clock medians; in brackets the ratios of CPU time (process_time) medians.",
        "",
        "| model | images | layers (output hist.) | values / pass | forward (s) "
        "| wrapped forward / forward | statistics (s) "
        "| statistics / forward | before (s) | before / forward | speed-up | bit-equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['images']} | {r['layers']} ({r['output_histograms']}) "
            f"| {r['values_per_pass'] / 1e6:.1f} M | {s['forward']:.3f} "
            f"| {r['ratio_qforward_forward']:.2f}x ({r['cpu_ratio_qforward_forward']:.2f}x) "
            f"| {s['stats']:.3f} "
            f"| {r['ratio_stats_forward']:.2f}x ({r['cpu_ratio_stats_forward']:.2f}x) "
            f"| {s['stats_old']:.3f} "
            f"| {r['ratio_old_forward']:.2f}x ({r['cpu_ratio_old_forward']:.2f}x) "
            f"| {r['speedup']:.1f}x "
            f"| {'yes' if r['check']['histograms_bit_equal'] else 'NO'} "
            f"(moments {r['check']['moments_max_rel_diff']:.0e}) |"
        )
    for r in result["models"]:
        if "profile" not in r:
            continue
        lines += [
            "",
            f"cProfile of one statistics pass, {r['model']} (top 15 by cumulative time):",
            "",
            "| function | calls | tottime (s) | cumtime (s) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{p['function']}` | {p['calls']} | {p['tottime']:.3f} | {p['cumtime']:.3f} |"
            for p in r["profile"]
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--images", type=int, default=32, help="Lite0 calibration images (224x224)")
    ap.add_argument("--fmnist-images", type=int, default=256)
    ap.add_argument("--detector-images", type=int, default=32, help="batch-1 COCO images")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--profile", default="efficientnet-lite0", help="the model to profile")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="results/calibration_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, skipped = [], []
    for name in args.models.split(","):
        c = case(name, args)
        if c is None:
            skipped.append(name)
            continue
        r = measure(name, c, args.repeats, profile=name == args.profile)
        rows.append(r)
        print(
            f"{name}: statistics/forward {r['ratio_stats_forward']:.2f}x, CPU time "
            f"{r['cpu_ratio_stats_forward']:.2f}x (before {r['ratio_old_forward']:.2f}x, "
            f"{r['cpu_ratio_old_forward']:.2f}x; wrapped forward "
            f"{r['ratio_qforward_forward']:.2f}x, {r['cpu_ratio_qforward_forward']:.2f}x)",
            flush=True,
        )
    result = {"machine": cpu(), "repeats": args.repeats, "models": rows, "skipped": skipped}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n", force=True)
    m = result["machine"]
    print(
        f"\nCPU: {m['cpu']}, avx512_vnni: {m['avx512_vnni']}, {m['torch_threads']} torch threads\n"
    )
    print(tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
