"""Calibration at the cost of an inference pass: the statistics pass against a float forward pass.

For each model, the activation statistics pass of :func:`omse.quantize` (``collect`` with
``Needs(input_histograms=True)`` and the output histograms of ``target="int8"``) is timed on the
wrapped model, in the state calibration runs it (the pass is captured inside ``quantize``),
against a float forward pass of the FP32 model over the same batches. Candidates, interleaved in
every repeat:

- ``forward``: the FP32 model over the calibration batches (``torch.no_grad``);
- ``stats``: the statistics pass as it is now (compiled binning, :mod:`omse.core.binning`);
- ``stats_old``: the same pass with the implementation before it (``HistogramStats.update``
  through a float64 copy, four reductions, ``bincount`` and ``index_add_``; the observer's own
  ``isfinite`` pass and the output clamp copy), restored here verbatim.

The histograms of ``stats`` and ``stats_old`` are compared (counts and per-bin sums equal, moments
to float64 rounding) on every model. Reported: median seconds, the ratios ``stats / forward`` and
``stats_old / stats``, and a cProfile top-15 (cumulative time) of one ``stats`` pass on
EfficientNet-Lite0. Writes ``results/calibration_speed.json``.

    OMP_NUM_THREADS=2 python benchmarks/calibration_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import platform
import pstats
import statistics
import time
from pathlib import Path

import torch

import omse.transforms.pipeline as pipeline
from omse.config import QuantConfig
from omse.core.stats import HistogramStats
from omse.errors import CalibrationError
from omse.io import atomic_write_text
from omse.transforms import statistics as st
from omse.transforms.pipeline import quantize
from omse.zoo.tasks import get_task

MODELS = ("efficientnet-lite0", "fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")


# -- the implementation before this benchmark's change (commit cbf1438), for the old timing ------
def _old_update(self: HistogramStats, x: torch.Tensor) -> HistogramStats:
    v = x.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return self
    lo, hi = torch.aminmax(v)
    vmin, vmax = float(lo), float(hi)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise CalibrationError("calibration values contain NaN or Inf")
    amax = max(abs(vmin), abs(vmax))
    if amax >= self.radius:
        self._grow_to(amax)
    self.n += v.numel()
    self.min, self.max = min(self.min, vmin), max(self.max, vmax)
    self.sum += float(v.sum())
    v2 = v * v
    self.sum_sq += float(v2.sum())
    self.sum_abs += float(v.abs().sum())
    self.sum_4 += float((v2 * v2).sum())
    if self.radius > 0:
        half = self.bins // 2
        idx = (v / self.radius).mul_(half).floor_().long().add_(half)
        idx = idx.clamp_(0, self.bins - 1)
        self.counts += torch.bincount(idx, minlength=self.bins).to(torch.float64)
        self.sums.index_add_(0, idx, v)
    else:
        self.counts[self.bins // 2] += v.numel()
    return self


def _old_input(self, q, x: torch.Tensor) -> None:
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise CalibrationError(
            f"layer {q.name!r} got NaN or Inf inputs on calibration batch {self.batch}"
        )
    s = self.stats[q.name]
    s.extra["input_numel"] = x.numel() // max(x.shape[0], 1) if x.dim() > 1 else x.numel()
    if self.needs.input_histograms:
        if s.input is None:
            s.input = HistogramStats(self.needs.bins)
        s.input.update(x)


def _old_output(self, q, y: torch.Tensor) -> None:
    s = self.stats[q.name]
    per_sample = y.numel() // max(y.shape[0], 1) if y.dim() > 1 else y.numel()
    s.macs = q.macs_per_sample(s.extra.get("input_numel", 0), per_sample)
    if q.name in self.clamp:
        lo, hi = self.clamp[q.name]
        if s.output is None:
            s.output = HistogramStats(self.needs.bins)
        s.output.update(y.clamp(lo, hi))


@contextlib.contextmanager
def old_implementation():
    """``HistogramStats.update`` and the observer's callbacks as they were (restored on exit)."""
    saved = HistogramStats.update, st._Observer.input, st._Observer.output
    HistogramStats.update, st._Observer.input, st._Observer.output = (
        _old_update,
        _old_input,
        _old_output,
    )
    try:
        yield
    finally:
        HistogramStats.update, st._Observer.input, st._Observer.output = saved


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
    """Counts and per-bin sums equal; the largest relative moment difference."""
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
    return {"counts_and_bin_sums_equal": bool(equal), "moments_max_rel_diff": worst}


def measure(name: str, n_images: int, batch: int, repeats: int, profile: bool) -> dict:
    task = get_task(name)
    model = task.build().eval()
    batches = list(task.calibration(n_images).split(batch))
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

        forward(), run(), old()  # warm-up: compiled kernels, allocator
        fns = {"forward": forward, "stats": run, "stats_old": old}
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

    with inside_activation_pass(hook):
        quantize(model, batches, config)
    sec, cpu_s = out["seconds"], out["cpu_seconds"]
    out.update(
        cpu_ratio_stats_forward=cpu_s["stats"] / cpu_s["forward"],
        cpu_ratio_old_forward=cpu_s["stats_old"] / cpu_s["forward"],
        model=name,
        images=n_images,
        batch=batch,
        input_shape=list(batches[0].shape[1:]),
        ratio_stats_forward=sec["stats"] / sec["forward"],
        ratio_old_forward=sec["stats_old"] / sec["forward"],
        speedup=sec["stats_old"] / sec["stats"],
    )
    return out


def top(prof: cProfile.Profile, k: int) -> list[dict]:
    """The ``k`` functions of most cumulative time."""
    s = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in s.stats.items():
        where = f"{Path(file).name}:{line}({fn})" if line else fn
        rows.append({"function": where, "calls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: -r["cumtime"])
    return rows[:k]


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
        "| model | images | layers (output hist.) | values / pass | forward (s) | statistics (s) "
        "| statistics / forward | before (s) | before / forward | speed-up | histograms equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        s = r["seconds"]
        lines.append(
            f"| {r['model']} | {r['images']} | {r['layers']} ({r['output_histograms']}) "
            f"| {r['values_per_pass'] / 1e6:.1f} M | {s['forward']:.3f} | {s['stats']:.3f} "
            f"| {r['ratio_stats_forward']:.2f}x ({r['cpu_ratio_stats_forward']:.2f}x) "
            f"| {s['stats_old']:.3f} "
            f"| {r['ratio_old_forward']:.2f}x ({r['cpu_ratio_old_forward']:.2f}x) "
            f"| {r['speedup']:.1f}x "
            f"| {'yes' if r['check']['counts_and_bin_sums_equal'] else 'NO'} "
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
    ap.add_argument("--images", type=int, default=32, help="Lite0 calibration images (224x224)")
    ap.add_argument("--fmnist-images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="results/calibration_speed.json")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        n = args.images if name == "efficientnet-lite0" else args.fmnist_images
        r = measure(name, n, args.batch, args.repeats, profile=name == "efficientnet-lite0")
        rows.append(r)
        print(
            f"{name}: statistics/forward {r['ratio_stats_forward']:.2f}x, CPU time "
            f"{r['cpu_ratio_stats_forward']:.2f}x (before {r['ratio_old_forward']:.2f}x, "
            f"{r['cpu_ratio_old_forward']:.2f}x)",
            flush=True,
        )
    result = {"machine": cpu(), "repeats": args.repeats, "models": rows}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n", force=True)
    m = result["machine"]
    print(
        f"\nCPU: {m['cpu']}, avx512_vnni: {m['avx512_vnni']}, {m['torch_threads']} torch threads\n"
    )
    print(tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
