"""Peak memory of block-by-block quantization against model size (``omse.deploy.blockwise``).

Synthetic models: a stem ``Linear(64, d)``, ``n`` residual MLP blocks (``LayerNorm(d)``,
``Linear(d, 4d)``, GELU, ``Linear(4d, d)``) and a head (``LayerNorm``, ``Linear(d, 10)``) with
seeded random FP32 weights, written as Hugging Face-style safetensors shards (a few blocks per
shard) with a ``model.safetensors.index.json``, one block at a time (the writer never holds the
model). Every run is a fresh subprocess (``--child``) that imports torch and omse, builds the
calibration batches, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and then:

- ``blockwise``: ``quantize_blockwise(builder, calib, config, weights=index, out=folder)``, the
  builder's parameters on ``meta``; with ``--cap-ratio R`` also under ``RLIMIT_DATA`` = the
  private data already mapped + weights / R (glibc's reserved address space counts there, so
  it fails well above the RSS peak: ``tests/deploy/test_blockwise.py`` asserts on RSS);
- ``in-memory``: loads the whole model from the shards and runs ``omse.quantize(model, calib,
  config)``, the path that needs the model in memory.

The baseline is taken after one tiny MMSE solve, which loads numba and the compiled solver
(about 160 MB, once per process, as importing torch is). Reported: ``peak MB`` (VmHWM, the highest
resident memory, the baseline included),
``above baseline MB`` (peak minus the resident memory before the run: what quantization added)
and wall seconds. Recipe: ``QuantConfig.preset("fast")`` (kernel-wise MMSE W4A8; the exact
MMSE solve dominates the time, ~1.5 s per million weights on this VM).

Run: ``python benchmarks/blockwise.py`` (default sizes 128, 256 and 512 MB of FP32 weights;
in-memory up to 256 MB; ``--config '{"weight_method": "minmax"}'`` for min-max weight ranges), writes ``results/blockwise.json`` and ``results/blockwise.png`` and
prints a markdown table. Temporary files go to a folder under ``--tmp`` (default: the system's),
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omse.runtime import reset_peak_rss, status_kb

ROOT = Path(__file__).resolve().parents[1]
D = 512  # hidden width: a block holds 2 * 4 * D^2 weights = 8 MB in FP32
IN = 64
OUT = 10
BLOCKS_PER_SHARD = 8
CALIB = (4, 8, 16)  # batches, batch size, tokens: activations [8, 16, D] per batch


def build(d: int = D, n: int = 4):
    """The synthetic model (default initialisation; the files hold the benchmark's weights)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 4 * d)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(4 * d, d)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(self.norm(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(IN, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, OUT)

        def forward(self, x):
            x = self.stem(x)
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x))

    return Net().eval()


def blocks_for(mb: float, d: int = D) -> int:
    """The number of blocks whose FP32 weights make ``mb`` MB (MiB) with width ``d``."""
    per_block = (8 * d * d + 5 * d) * 4
    return max(1, round(mb * 2**20 / per_block))


def write_model(folder: Path, n: int, d: int = D, seed: int = 0, per_shard: int = BLOCKS_PER_SHARD):
    """Seeded random FP32 weights of ``build(d, n)`` as safetensors shards + index; returns the
    index path and the FP32 weight bytes. One shard's tensors are in memory at a time."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def lin(name, i, o):
        return {
            f"{name}.weight": torch.randn(o, i, generator=g) / i**0.5,
            f"{name}.bias": torch.randn(o, generator=g) * 0.02,
        }

    def norm(name):
        return {
            f"{name}.weight": 1 + 0.1 * torch.randn(d, generator=g),
            f"{name}.bias": 0.1 * torch.randn(d, generator=g),
        }

    groups = [{**lin("stem", IN, d)}]
    for b0 in range(0, n, per_shard):
        sd = {}
        for b in range(b0, min(n, b0 + per_shard)):
            sd |= norm(f"blocks.{b}.norm") | lin(f"blocks.{b}.fc1", d, 4 * d)
            sd |= lin(f"blocks.{b}.fc2", 4 * d, d)
        groups.append(sd)
    groups[-1] |= norm("norm") | lin("head", d, OUT)
    total, weight_map = 0, {}
    for k, sd in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(sd, str(folder / name))
        for t, v in sd.items():
            weight_map[t] = name
            total += v.numel() * 4
        del sd
        groups[k] = {}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index, total


def calibration(d: int = D):
    import torch

    g = torch.Generator().manual_seed(1)
    n, b, t = CALIB
    return [torch.randn(b, t, IN, generator=g) for _ in range(n)]


def child(args) -> None:
    import functools

    import torch

    import omse
    from omse.deploy.blockwise import quantize_blockwise

    torch.set_num_threads(1)
    # the baseline includes omse's solver as it includes torch: numba and the compiled MMSE
    # kernel (about 160 MB, loaded once per process on the first solve)
    omse.mmse_solve(torch.randn(4, 9), omse.Grid(4))
    calib = calibration(args.d)
    cfg = omse.QuantConfig.preset(args.recipe, **json.loads(args.config))
    builder = functools.partial(build, args.d, args.n)
    limited = None
    if args.limit_mb:
        data = status_kb("VmData") * 1024
        limited = data + int(args.limit_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_DATA, (limited, resource.RLIM_INFINITY))
    rss0 = status_kb("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    if args.child == "blockwise":
        res = quantize_blockwise(builder, calib, cfg, weights=args.weights, out=args.out)
        extra = {
            "largest_unit_mb": res.largest_unit_bytes / 2**20,
            "activation_mb": res.activation_bytes / 2**20,
        }
    else:
        from safetensors.torch import load_file

        model = builder()
        index = json.loads(Path(args.weights).read_text())
        for shard in sorted(set(index["weight_map"].values())):
            model.load_state_dict(load_file(str(Path(args.weights).parent / shard)), strict=False)
        qmodel = omse.quantize(model, calib, cfg)
        extra = {"layers": len(omse.quantized_layers(qmodel))}
    seconds = time.perf_counter() - t0
    peak = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "mode": args.child,
        "seconds": seconds,
        "rss_before_mb": rss0 / 1024,
        "peak_mb": peak / 1024,
        "above_baseline_mb": (peak - rss0) / 1024,
        "rlimit_data_mb": None if limited is None else limited / 2**20,
        "limit_mb": args.limit_mb,
        "peak_counter_reset": reset,
        **extra,
    }
    print("RESULT " + json.dumps(out))


def run_child(
    mode: str,
    weights: Path,
    n: int,
    d: int,
    out: Path | None,
    limit_mb: float | None = None,
    config: str = "{}",
):
    cmd = [sys.executable, __file__, "--child", mode, "--weights", str(weights), "--n", str(n)]
    cmd += ["--d", str(d), "--config", config]
    if out is not None:
        cmd += ["--out", str(out)]
    if limit_mb:
        cmd += ["--limit-mb", str(limit_mb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"mode": mode, "failed": True, "returncode": p.returncode, "error": " | ".join(tail)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("blockwise", "o"), ("in-memory", "s")):
        pts = [(r["model_mb"], r[mode]["peak_mb"]) for r in rows if not r[mode].get("failed")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{mode} peak RSS")
    xs = [r["model_mb"] for r in rows]
    ax.plot(xs, xs, ":", color="grey", label="FP32 weights")
    ax.set_xlabel("model FP32 weights (MB)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("omse: block-by-block vs in-memory quantization (W4A8 MMSE)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["blockwise", "in-memory"])
    ap.add_argument("--weights")
    ap.add_argument("--out")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--d", type=int, default=D)
    ap.add_argument("--limit-mb", type=float)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--config", default="{}", help="QuantConfig fields over the recipe (JSON)")
    ap.add_argument("--sizes", type=float, nargs="+", default=[128, 256, 512])
    ap.add_argument(
        "--cap-ratio",
        type=float,
        help="also cap the child's added private data (RLIMIT_DATA) at weights / RATIO",
    )
    ap.add_argument("--in-memory-max", type=float, default=256, help="largest in-memory size (MB)")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=str(ROOT / "results" / "blockwise.json"))
    ap.add_argument("--png", default=str(ROOT / "results" / "blockwise.png"))
    ap.add_argument("--replot", action="store_true", help="redraw --png from --json only")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.replot:
        return plot(json.loads(Path(args.json).read_text())["rows"], Path(args.png))

    rows = []
    work = Path(tempfile.mkdtemp(prefix="omse-blockwise-", dir=args.tmp))
    try:
        for mb in args.sizes:
            n = blocks_for(mb, args.d)
            folder = work / f"m{n}"
            index, total = write_model(folder, n, args.d)
            model_mb = total / 2**20
            limit = model_mb / args.cap_ratio if args.cap_ratio else None
            bw = run_child(
                "blockwise", index, n, args.d, work / f"q{n}", limit_mb=limit, config=args.config
            )
            mem = (
                run_child("in-memory", index, n, args.d, None, config=args.config)
                if mb <= args.in_memory_max
                else {"mode": "in-memory", "skipped": True, "failed": True}
            )
            rows.append({"model_mb": model_mb, "blocks": n, "blockwise": bw, "in-memory": mem})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work / f"q{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "blockwise",
        "recipe": args.recipe,
        "config": json.loads(args.config),
        "width": args.d,
        "calibration": {"batches": CALIB[0], "shape": [CALIB[1], CALIB[2], IN]},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), OMP_NUM_THREADS=1",
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, Path(args.png))

    def cell(r, k, f="{:.0f}"):
        return "-" if r.get("failed") or k not in r else f.format(r[k])

    print(
        "\n| FP32 weights (MB) | blocks | block-by-block peak RSS (MB) | above baseline (MB) "
        "| time (s) | in-memory peak RSS (MB) | above baseline (MB) | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, m = r["blockwise"], r["in-memory"]
        print(
            f"| {r['model_mb']:.0f} | {r['blocks']} | {cell(b, 'peak_mb')} | "
            f"{cell(b, 'above_baseline_mb')} | {cell(b, 'seconds', '{:.1f}')} | "
            f"{cell(m, 'peak_mb')} | {cell(m, 'above_baseline_mb')} | {cell(m, 'seconds', '{:.1f}')} |"
        )
    print(f"\nwrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
