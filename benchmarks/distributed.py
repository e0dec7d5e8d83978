"""Calibration wall time with 1 and 2 ranks (torch.distributed, gloo, one torch thread per rank).

fmnist-resnet20 from omse.zoo, 256 Fashion-MNIST training images in 8 batches of 32; 2 ranks get
4 batches each (omse.distributed.shard). Each measurement spawns fresh processes (a FileStore
rendezvous), warms up on one batch, then times ``omse.quantize`` per configuration from a
barrier to the slowest rank's end; 1-rank and 2-rank runs are interleaved ``--repeats`` times and
the medians reported. Every run also checks that the 2-rank model equals the 1-rank model (a
SHA-256 over every code, scale and bias). Writes results/distributed.json.

    python benchmarks/distributed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import omse
from omse.distributed import shard
from omse.io import atomic_write_text
from omse.zoo.tasks import get_task

MODEL = "fmnist-resnet20"
N_CALIB, BATCH = 256, 32
CONFIGS = {
    "mmse": dict(extra_mac_budget=0.0, bias_correction=False),
    "mmse+res10+bc": dict(extra_mac_budget=0.1, bias_correction=True),
}
COMMON = dict(
    weight_bits=4, act_bits=8, weight_method="mmse", act_method="mmse", granularity="per_channel"
)


def _digest(q) -> str:
    h = hashlib.sha256()
    for _, ql in omse.quantized_layers(q).items():
        for codes, scale, _mask in ql.terms():
            h.update(codes.to(torch.int8).numpy().tobytes())
            h.update(scale.to(torch.float32).numpy().tobytes())
        for t in (ql.act_scale, ql.layer.bias):
            if t is not None:
                h.update(t.detach().to(torch.float32).numpy().tobytes())
    return h.hexdigest()


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        task = get_task(MODEL)
        model = task.build()
        batches = shard(list(task.calibration(N_CALIB).split(BATCH)), rank, world)
        res = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            omse.quantize(model, batches[:1], omse.QuantConfig(**COMMON))  # warm-up
            for name, kw in CONFIGS.items():
                dist.barrier()
                t0 = time.perf_counter()
                q = omse.quantize(model, batches, omse.QuantConfig(**COMMON, **kw))
                dt = time.perf_counter() - t0
                res[name] = {"seconds": dt, "sha256": _digest(q)}
        for name in CONFIGS:  # the slowest rank's time is the run's time
            times = [None] * world
            dist.all_gather_object(times, res[name]["seconds"])
            res[name]["seconds"] = max(times)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def measure(world: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/out.json"
        mp.spawn(_worker, args=(world, f"file://{d}/store", out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/distributed.json")
    args = ap.parse_args()
    runs = []
    for rep in range(args.repeats):
        for world in (1, 2) if rep % 2 == 0 else (2, 1):  # interleaved, order alternating
            load = os.getloadavg()[0]
            r = measure(world)
            runs.append({"ranks": world, "load_1min_before": load, **r})
            print(world, "rank(s):", {k: round(v["seconds"], 2) for k, v in r.items()}, flush=True)
    summary = {}
    for name in CONFIGS:
        med = {
            w: statistics.median(x[name]["seconds"] for x in runs if x["ranks"] == w)
            for w in (1, 2)
        }
        digests = {x[name]["sha256"] for x in runs}
        summary[name] = {
            "seconds_1_rank": round(med[1], 3),
            "seconds_2_ranks": round(med[2], 3),
            "speedup": round(med[1] / med[2], 3),
            "identical_models": len(digests) == 1,
        }
    out = {
        "model": MODEL,
        "calibration": f"{N_CALIB} Fashion-MNIST training images, batches of {BATCH}",
        "backend": "gloo",
        "threads_per_rank": 1,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "summary": summary,
        "runs": runs,
    }
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n", force=True)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
