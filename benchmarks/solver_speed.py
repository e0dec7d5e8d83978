"""Speed and quality of the exact MMSE solver against a vectorised grid search.

Every Conv2d/Linear weight of EfficientNet-Lite0 (4.6M values), kernel-wise (one step per output
channel). For each bit width: wall time of omse's exact solver and of a 100-point grid search over
(0, max|x|/qmax], and the total squared error each leaves (the exact solver's is never larger).

    python benchmarks/solver_speed.py [--bits 2,3,4,8] [--threads 2]

Prints a markdown table and writes results/solver_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/solver_speed.json")
    args = ap.parse_args(argv)
    tune_allocator()
    torch.set_num_threads(args.threads)
    model = get_model("efficientnet-lite0").build()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    slices = [w.reshape(w.shape[0], -1) for w in weights]
    n_values = sum(w.numel() for w in weights)
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        grid = Grid(bits, "full")
        t0 = time.perf_counter()
        exact = [mmse_solve(s, grid).scale for s in slices]
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        gs = [grid_search(s, grid) for s in slices]
        t_grid = time.perf_counter() - t0
        e_exact = sum(float(quant_error(s, sc, grid).sum()) for s, sc in zip(slices, exact))
        e_grid = sum(float(quant_error(s, sc, grid).sum()) for s, sc in zip(slices, gs))
        rows.append(
            {
                "bits": bits,
                "exact_seconds": round(t_exact, 3),
                "grid100_seconds": round(t_grid, 3),
                "exact_sse": e_exact,
                "grid100_sse": e_grid,
                "grid_excess_error": e_grid / e_exact - 1.0,
            }
        )
        print(f"bits {bits}: exact {t_exact:.2f} s, grid {t_grid:.2f} s", flush=True)
    result = {
        "model": "efficientnet-lite0",
        "tensors": len(weights),
        "values": n_values,
        "granularity": "per_channel",
        "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
        "rows": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n", force=True)
    print(
        f"\nEfficientNet-Lite0, {len(weights)} weight tensors, {n_values:,} values, kernel-wise\n\n"
        "| bits | exact MMSE (s) | 100-point grid (s) | grid's extra squared error |\n|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['bits']} | {r['exact_seconds']:.2f} | {r['grid100_seconds']:.2f} | "
            f"{100 * r['grid_excess_error']:+.2f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
