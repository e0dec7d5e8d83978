"""Speed and quality of the exact MMSE solver against a vectorised grid search.

Workloads: every Conv2d/Linear weight of EfficientNet-Lite0 (4.6M values), kernel-wise (one step
per output channel, 50 calls as omse makes them), and per-group rows as language models use them
(Gaussian values in groups of 32 and of 128, 6.4M values each). For each thread count and bit
width: the median wall time over ``--repeats`` interleaved runs of omse's exact solver (the compiled
sweep, ``mmse_solve``'s CPU default) and of a 100-point grid search over (0, max|x|/qmax], their
ratio, and the total squared error each leaves (the exact solver's is never larger). The
vectorised torch method (the solver before the sweep, and the one used on GPUs) is timed once per
row at the first thread count for reference. The first call in a process, which loads the
compiled kernel from numba's cache, is timed apart and not in the medians.

    python benchmarks/solver_speed.py [--bits 2,3,4,8] [--threads 1,2] [--repeats 5]

Prints a markdown table and writes results/solver_speed.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from omse.core.grids import Grid
from omse.core.mmse import mmse_solve
from omse.core.primitives import quant_error
from omse.io import atomic_write_text
from omse.runtime import cpu_name, tune_allocator
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


def _sse(slices, scales, grid) -> float:
    return sum(
        float(quant_error(s.double(), sc.double(), grid).sum()) for s, sc in zip(slices, scales)
    )


def _measure(name, slices, bits, repeats, vectorised) -> dict:
    """Interleaved sweep / grid runs on ``slices`` (a list of [S, n]): medians and errors."""
    grid = Grid(bits, "full")
    t_exact, t_grid = [], []
    for _ in range(repeats):
        t_exact.append(_timed(lambda: [mmse_solve(s, grid) for s in slices]))
        t_grid.append(_timed(lambda: [grid_search(s, grid) for s in slices]))
    exact = [mmse_solve(s, grid).scale for s in slices]
    e_exact, e_grid = (
        _sse(slices, exact, grid),
        _sse(slices, [grid_search(s, grid) for s in slices], grid),
    )
    te, tg = statistics.median(t_exact), statistics.median(t_grid)
    row = {
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
    if vectorised:
        tv = _timed(lambda: [mmse_solve(s, grid, method="vectorised") for s in slices])
        vec = [mmse_solve(s, grid, method="vectorised").scale for s in slices]
        row |= {
            "vectorised_seconds": round(tv, 3),
            "vectorised_ratio": round(tv / tg, 3),
            "vectorised_sse": _sse(slices, vec, grid),
        }
    return row


def _first_call_seconds() -> float:
    """Wall time of the first ``mmse_solve`` in a new process (the compiled kernel's cache load)."""
    code = (
        "import time, torch; from omse import Grid, mmse_solve; t = time.perf_counter(); "
        "mmse_solve(torch.randn(4, 9), Grid(4)); print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/solver_speed.json")
    args = ap.parse_args(argv)
    tune_allocator()
    first = [_first_call_seconds() for _ in range(2)]  # the first may compile: cache then warm
    model = get_model("efficientnet-lite0").build()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    gen = torch.Generator().manual_seed(0)
    workloads = {
        "lite0-kernelwise": [w.reshape(w.shape[0], -1) for w in weights],
        "groups-200000x32": [torch.randn(200_000, 32, generator=gen)],
        "groups-50000x128": [torch.randn(50_000, 128, generator=gen)],
    }
    mmse_solve(torch.randn(4, 9), Grid(4))  # load the compiled kernel before timing
    rows = []
    for t, threads in enumerate(int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, slices in workloads.items():
            for bits in [int(b) for b in args.bits.split(",")]:
                r = _measure(name, slices, bits, args.repeats, vectorised=t == 0)
                rows.append(r)
                print(
                    f"{name} {threads} thr, {bits} bits: exact {r['exact_seconds']:.2f} s, "
                    f"grid {r['grid100_seconds']:.2f} s, ratio {r['ratio']:.2f}",
                    flush=True,
                )
    result = {
        "weights_values": sum(w.numel() for w in weights),
        "repeats": args.repeats,
        "first_call_seconds": first,
        "machine": f"{cpu_name()}, torch {torch.__version__}",
        "rows": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n", force=True)
    print(
        "\n| workload | threads | bits | exact sweep (s) | 100-point grid (s) | sweep / grid "
        "| vectorised / grid | grid's extra squared error |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        vec = f"{r['vectorised_ratio']:.2f}" if "vectorised_ratio" in r else ""
        print(
            f"| {r['workload']} | {r['threads']} | {r['bits']} | {r['exact_seconds']:.2f} | "
            f"{r['grid100_seconds']:.2f} | {r['ratio']:.2f} | {vec} | "
            f"{100 * r['grid_excess_error']:+.2f}% |"
        )
    print(f"\nfirst call in a new process: {first} s (numba's cached kernel loaded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
