"""Speed and quality of the exact MMSE solver against a vectorised grid search.

Two workloads: every Conv2d/Linear weight of EfficientNet-Lite0 (4.6M values), kernel-wise (one
step per output channel), and per-group rows as language models use them (``--groups`` rows of
``--group-size`` Gaussian values). For each thread count and bit width: median wall time over
``--repeats`` interleaved runs of omse's exact solver and of a 100-point grid search over
(0, max|x|/qmax], their ratio, and the total squared error each leaves (the exact solver's is
never larger).

    python benchmarks/solver_speed.py [--bits 2,3,4,8] [--threads 1,2] [--repeats 3]

Prints a markdown table and writes results/solver_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from omse.core.grids import Grid
from omse.core.mmse import mmse_solve
from omse.core.primitives import quant_error
from omse.io import atomic_write_text
from omse.runtime import tune_allocator
from omse.zoo.models import get_model


def grid_search(slices: torch.Tensor, grid: Grid, points: int = 100) -> torch.Tensor:
    """Best of ``points`` steps in (0, max|x|/qmax] per row: ``[S, n] -> [S]`` (float32, chunked)."""
    amax = slices.abs().amax(1).clamp_min(1e-12)
    best_e = torch.full_like(amax, float("inf"))
    best_s = amax / grid.qmax
    for k in range(1, points + 1):
        s = amax * (k / points) / grid.qmax
        q = torch.clamp(torch.round(slices / s[:, None]), grid.qmin, grid.qmax)
        e = ((slices - q * s[:, None]) ** 2).sum(1)
        better = e < best_e
        best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return best_s


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(name, slices, bits, repeats):
    """Interleaved exact / grid runs on ``slices`` (a list of [S, n]): medians and errors."""
    grid = Grid(bits, "full")
    t_exact, t_grid = [], []
    for _ in range(repeats):
        t_exact.append(_timed(lambda: [mmse_solve(s, grid) for s in slices]))
        t_grid.append(_timed(lambda: [grid_search(s, grid) for s in slices]))
    exact = [mmse_solve(s, grid).scale for s in slices]
    gs = [grid_search(s, grid) for s in slices]
    e_exact = sum(float(quant_error(s, sc, grid).sum()) for s, sc in zip(slices, exact))
    e_grid = sum(float(quant_error(s, sc, grid).sum()) for s, sc in zip(slices, gs))
    te, tg = statistics.median(t_exact), statistics.median(t_grid)
    return {
        "workload": name,
        "bits": bits,
        "threads": torch.get_num_threads(),
        "exact_seconds": round(te, 3),
        "grid100_seconds": round(tg, 3),
        "ratio": round(te / tg, 3),
        "exact_sse": e_exact,
        "grid100_sse": e_grid,
        "grid_excess_error": e_grid / e_exact - 1.0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", type=int, default=100_000)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="results/solver_speed.json")
    args = ap.parse_args(argv)
    tune_allocator()
    model = get_model("efficientnet-lite0").build()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    workloads = {
        "lite0-kernelwise": [w.reshape(w.shape[0], -1) for w in weights],
        f"groups-{args.groups}x{args.group_size}": [
            torch.randn(args.groups, args.group_size, generator=torch.Generator().manual_seed(0))
        ],
    }
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, slices in workloads.items():
            for bits in [int(b) for b in args.bits.split(",")]:
                r = _measure(name, slices, bits, args.repeats)
                rows.append(r)
                print(
                    f"{name} {threads} thr, {bits} bits: exact {r['exact_seconds']:.2f} s, "
                    f"grid {r['grid100_seconds']:.2f} s, ratio {r['ratio']:.2f}",
                    flush=True,
                )
    result = {
        "model": "efficientnet-lite0",
        "tensors": len(weights),
        "values": sum(w.numel() for w in weights),
        "granularity": "per_channel",
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "rows": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n", force=True)
    print(
        "\n| workload | threads | bits | exact MMSE (s) | 100-point grid (s) | exact / grid "
        "| grid's extra squared error |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['workload']} | {r['threads']} | {r['bits']} | {r['exact_seconds']:.2f} | "
            f"{r['grid100_seconds']:.2f} | {r['ratio']:.2f} | {100 * r['grid_excess_error']:+.2f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
