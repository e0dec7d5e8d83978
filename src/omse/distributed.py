"""Calibration sharded over ``torch.distributed``: who this rank is, its share of the batches, and
collectives that keep every rank's result identical to one process that saw all the data.

Contract. Under an initialised process group of ``N`` ranks (gloo on CPU, nccl on GPUs), every
rank calls :func:`omse.quantize` with *its own* calibration batches: global batch ``i`` belongs
to rank ``i % N`` and is that rank's local batch ``i // N`` (:func:`shard`, the rank::world_size
split that ``DistributedSampler(shuffle=False, drop_last=False)`` makes of samples; give each rank
``DataLoader(dataset, batch_size, sampler=DistributedSampler(...))`` and the batches differ from
a single process's batching, so the result is then that of the batches the ranks saw, in the
order ``rank 0 batch 0, rank 1 batch 0, ..., rank 0 batch 1, ...``). The ranks then return the
same quantized model, bit for bit, as one process calling ``omse.quantize`` on all the batches
in global order (same torch version, same thread count per process, same device).

Why bit-identical. Every statistic omse gathers is a sum over batches of one partial per batch
(patch moments ``H``, patch sums, counts, histogram counts and per-bin sums, moments), and one
process folds the partials in batch order: ``acc = fold(fold(fold(empty, p0), p1), p2) ...``.
Float addition is not associative, so a sharded run must not sum its partials per rank and add
the ranks' totals (that regroups the additions), nor all-reduce them (the reduction tree of a
backend is its own). Instead :func:`omse.transforms.statistics.collect` gathers, after each
local step ``k``, the ``N`` per-batch partials of global batches ``kN .. kN+N-1`` to every rank
(:func:`gather`, rank order) and every rank folds them in that order: the same additions in the
same order as one process, on every rank, so every rank then solves the same problems on the
same numbers. Integer-valued quantities (counts) and min/max are exact in any order anyway.
Memory stays that of ``N`` partials per layer; one collective per local batch per pass.
A rank whose batch fails sends the error instead of its partial, so every rank stops with it
(no rank is left waiting in a collective).

Outside a process group (or with one rank) every function here is the identity / a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .errors import CalibrationError, ConfigError

__all__ = [
    "world",
    "is_distributed",
    "is_main",
    "shard",
    "unshard",
    "gather",
    "gather_rows",
    "broadcast",
    "all_max",
    "run_checked",
    "init_from_env",
]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group); ``(0, 1)`` without one."""
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_distributed(group=None) -> bool:
    """True under an initialised process group of more than one rank."""
    return world(group)[1] > 1


def is_main(group=None) -> bool:
    """True on rank 0 (and outside a process group): the rank that prints and writes outputs."""
    return world(group)[0] == 0


def shard(items: Sequence, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of ``items``: ``items[rank::world_size]`` (deterministic; default: this
    process's rank and world size). Every rank must get at least one item."""
    r0, w0 = world()
    rank = r0 if rank is None else rank
    world_size = w0 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"shard: rank {rank} is not in a world of {world_size} ranks")
    items = list(items)
    if len(items) < world_size:
        raise ConfigError(
            f"{len(items)} calibration batches cannot be shared by {world_size} ranks (each rank "
            "needs at least one); use more, smaller batches or fewer ranks"
        )
    return items[rank::world_size]


def unshard(parts: Sequence[Sequence]) -> list:
    """Inverse of :func:`shard`: ``parts[r]`` is rank ``r``'s share; returns the items in global
    order (item ``i`` is ``parts[i % N][i // N]``)."""
    n = len(parts)
    total = sum(len(p) for p in parts)
    return [parts[i % n][i // n] for i in range(total)]


def gather(obj: Any, group=None) -> list:
    """Every rank's ``obj`` (picklable) in rank order, on every rank; ``[obj]`` without a group."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_rows(t, group=None):
    """Inverse of sharding a tensor's rows rank::world_size: every rank's ``t [n_r, ...]`` (rank
    ``r`` holding global rows ``r, r+N, ...``) -> the full ``[sum n_r, ...]`` in global order, on
    every rank (e.g. evaluation logits, so that metrics are computed on all rows at once)."""
    import torch

    parts = gather(t, group)
    if len(parts) == 1:
        return t
    out = torch.empty((sum(p.shape[0] for p in parts), *t.shape[1:]), dtype=t.dtype)
    for r, p in enumerate(parts):
        out[r :: len(parts)] = p
    return out


def broadcast(obj: Any, src: int = 0, group=None) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself without a group."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_max(value: int, group=None) -> int:
    """The largest ``value`` over the ranks."""
    return max(gather(int(value), group))


def run_checked(fn, *args, group=None):
    """``fn(*args)`` on every rank; when it raises on any rank, every rank raises (the failing
    rank its own error, the others a :class:`CalibrationError` naming that rank), so that no rank
    waits forever in the next collective. One collective; outside a group just ``fn(*args)``."""
    if not is_distributed(group):
        return fn(*args)
    try:
        out = fn(*args)
    except Exception as e:
        gather(f"{type(e).__name__}: {e}", group)
        raise
    for r, err in enumerate(gather(None, group)):
        if err is not None:
            raise CalibrationError(f"rank {r} failed: {err}")
    return out


def init_from_env() -> bool:
    """Initialise the default process group from the ``torchrun`` environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when ``WORLD_SIZE > 1`` and none exists: nccl
    when CUDA is available (each rank on device ``LOCAL_RANK``), gloo otherwise. Returns True
    when it created the group (the caller then destroys it)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    if size <= 1 or _dist() is not None:
        return False
    if "RANK" not in os.environ:
        raise ConfigError("WORLD_SIZE is set but RANK is not; launch with torchrun")
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True
