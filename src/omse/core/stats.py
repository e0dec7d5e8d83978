"""Streaming, mergeable, memory-bounded tensor statistics for calibration.

:class:`HistogramStats` keeps a fixed number of bins over a symmetric range ``[-R, R]`` where
``R`` is a power of two strictly above every magnitude seen; when a batch reaches ``R`` the range
doubles and adjacent bins merge pairwise, exactly: ``bins`` is a power of two too, so a value's bin
``floor(x * (bins/2)/R) + bins/2`` is computed without rounding, and the counts after any sequence
of doublings or merges equal those of a single pass over all the data. Each bin stores its count
and the sum of its values, so the centroid of each bin is known and the MMSE problem can be solved
on ``bins`` weighted points instead of every value seen. Memory is ``O(bins)``, independent of the number of batches.

Speed: :meth:`HistogramStats.update` reads a CPU tensor in its own dtype with the compiled kernels
of :mod:`omse.core.binning`: one vectorised read for the extremes, finiteness and moments of the
(clamped) values, one for the bins (about 1.6-1.9 ns per float32 value on one core for 43 K-692 K
values, against about 20 for the torch path they replaced, which other devices still take). Both paths give the same counts and
per-bin sums bit for bit (``tests/core/test_stats.py`` keeps the torch path as the reference, and
checks the kernels against those of commit 1a53d9c, ``benchmarks/kernels_1a53d9c.py``). The kernel runs on one
core per histogram; a calibration pass (:func:`omse.transforms.statistics.collect`) holds its
updates in a :class:`DeferredBinning` block and bins a batch's histograms side by side on
``torch.get_num_threads()`` threads after its forward pass: bit for bit the same histograms, and
binning no longer the serial part of a pass on a machine with many cores.
:meth:`HistogramStats.absorb` merges CPU histograms with the compiled
:func:`~omse.core.binning.absorb_bins`: the torch path's float operations, in place.

Sharded calibration (:mod:`omse.distributed`): :meth:`HistogramStats.absorb` adds one histogram
to another in a fixed order of float operations, :func:`merge_in_order` folds a list that way and
:func:`all_reduce_histogram` folds the histograms of every rank of a process group in rank order,
so that every rank holds the same histogram bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue

import numpy as np
import torch

from ..errors import CalibrationError, NonFiniteError

__all__ = [
    "HistogramStats",
    "DEFAULT_BINS",
    "DeferredBinning",
    "merge_in_order",
    "all_reduce_histogram",
]

DEFAULT_BINS = 4096
_MAX_MAGNITUDE = 2.0**1022


@dataclass
class HistogramStats:
    """Running statistics of every value seen: count, min, max, moments and a fine histogram.

    ``counts [bins]`` and ``sums [bins]`` (float64) cover ``[-R, R]`` in equal bins.
    """

    bins: int = DEFAULT_BINS
    radius: float = 0.0
    counts: torch.Tensor = field(default=None)  # type: ignore[assignment]
    sums: torch.Tensor = field(default=None)  # type: ignore[assignment]
    n: int = 0
    min: float = math.inf
    max: float = -math.inf
    sum: float = 0.0
    sum_sq: float = 0.0
    sum_abs: float = 0.0
    sum_4: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int):
            raise CalibrationError(f"histogram bins must be an int, got {self.bins!r}")
        if self.bins < 4 or self.bins & (self.bins - 1):
            # pairwise merging on range doubling maps old bin j to new bin j//2 + bins/4, and
            # power-of-two bins make the bin index of every value exact
            raise CalibrationError(f"histogram bins must be a power of two >= 4, got {self.bins}")
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
            self.sums = torch.zeros(self.bins, dtype=torch.float64)

    # -- updating ---------------------------------------------------------------------------------
    @staticmethod
    def _radius_for(amax: float) -> float:
        """The smallest power of two strictly greater than ``amax`` (0 for 0)."""
        if amax <= 0.0:
            return 0.0
        if amax >= _MAX_MAGNITUDE:
            raise CalibrationError(
                f"calibration values reach {amax:.3g}; magnitudes >= 2^1022 cannot be histogrammed"
            )
        return math.ldexp(1.0, math.frexp(amax)[1])  # amax = m * 2^e, 0.5 <= m < 1

    def _grow_to(self, amax: float) -> None:
        """Double the range until it is strictly above ``amax``; bins merge pairwise (exact)."""
        self._double_to(self._radius_for(amax))

    def _double_to(self, radius: float) -> None:
        """Double the range up to the power of two ``radius``, merging bins pairwise (exact)."""
        if self.radius == 0.0:
            self.radius = radius
            return
        while self.radius < radius:
            b = self.bins
            # old bins cover the middle half of the new range: new bin j = old 2j', 2j'+1
            new_c = torch.zeros(b, dtype=torch.float64)
            new_s = torch.zeros(b, dtype=torch.float64)
            new_c[b // 4 : 3 * b // 4] = self.counts.view(-1, 2).sum(1)
            new_s[b // 4 : 3 * b // 4] = self.sums.view(-1, 2).sum(1)
            self.counts, self.sums, self.radius = new_c, new_s, self.radius * 2.0

    def update(self, x: torch.Tensor, clamp: tuple[float, float] | None = None) -> HistogramStats:
        """Add every value of ``x`` (any shape, dtype and device), clamped to ``clamp = (lo,
        hi)`` first where given (the values ``x.clamp(lo, hi)`` holds). Returns ``self``.

        Raises :class:`~omse.errors.NonFiniteError` for NaN or Inf values (``self`` untouched).
        A CPU tensor is read by the compiled kernels of :mod:`omse.core.binning` (two reads in
        its own dtype, the clamp applied as each value is read: no copy), others by torch; both
        give the same extremes, counts and per-bin sums bit for bit and the same moments up to
        float64 rounding (see there). Inside a :class:`DeferredBinning` block on this thread a
        float32/float64 CPU tensor is queued as it is, and read on the block's worker threads
        (the same values, operations and order per histogram; a NaN or Inf then raises from
        :meth:`DeferredBinning.wait`)."""
        v = x.detach().reshape(-1)
        if not v.is_floating_point():
            v = v.to(torch.float64)
        if v.numel() == 0:
            return self
        deferred = getattr(_DEFERRED, "active", None)
        if deferred is not None and deferred.take(self, v, clamp):
            return self
        if v.device.type == "cpu" and _kernels() is not None and self._plain():
            if v.dtype not in (torch.float32, torch.float64):
                if clamp is not None:  # bounds rounded to the values' own dtype, as torch does
                    v, clamp = v.clamp(*clamp), None
                v = v.to(torch.float32)  # float16 and bfloat16 widen exactly
            self._add_cpu(v, clamp)
            return self
        if clamp is not None:
            v = v.clamp(*clamp)
        lo, hi = torch.aminmax(v)  # NaN propagates to both; exact in any float dtype
        vmin, vmax = float(lo), float(hi)
        if not (math.isfinite(vmin) and math.isfinite(vmax)):
            raise NonFiniteError("calibration values contain NaN or Inf")
        self._range_to(v.numel(), vmin, vmax)
        self._bin_torch(v.to(torch.float64))
        return self

    def _add_cpu(self, v: torch.Tensor, clamp: tuple[float, float] | None) -> None:
        """:meth:`update`'s work for a float32/float64 CPU tensor ``v [n]``, by the compiled
        kernels of :mod:`omse.core.binning` (numba releases the GIL: a :class:`DeferredBinning`
        worker runs it too): one read for the extremes, finiteness and moments of the values
        clamped to ``clamp`` (bounds rounded to ``v``'s dtype, as ``torch.clamp`` rounds them),
        then one for the bins. Raises :class:`~omse.errors.NonFiniteError` for NaN or Inf values
        (``self`` untouched)."""
        kernels = _kernels()
        a = v.resolve_conj().resolve_neg().contiguous().numpy()
        m = np.zeros(4)
        vmin, vmax, finite = kernels.scan_values(a, clamp, m)
        if not finite:
            raise NonFiniteError("calibration values contain NaN or Inf")
        self._range_to(a.size, vmin, vmax)
        if self.radius == 0.0:  # all zeros so far: they go to the middle bin, moments are 0
            self.counts[self.bins // 2] += a.size
            return
        kernels.bin_values(a, self.radius, self.counts.numpy(), self.sums.numpy(), clamp)
        self.sum += float(m[0])
        self.sum_sq += float(m[1])
        self.sum_abs += float(m[2])
        self.sum_4 += float(m[3])

    def _range_to(self, n: int, vmin: float, vmax: float) -> None:
        """Count ``n`` finite values of extremes ``vmin``, ``vmax``: the range grows to hold
        them, then the count and extremes."""
        amax = max(abs(vmin), abs(vmax))
        if amax >= self.radius:
            self._grow_to(amax)
        self.n += n
        self.min, self.max = min(self.min, vmin), max(self.max, vmax)

    def _plain(self) -> bool:
        """True when ``counts`` and ``sums`` are contiguous float64 CPU tensors (the kernels')."""
        c, s = self.counts, self.sums
        return (
            c.dtype is torch.float64
            and s.dtype is torch.float64
            and c.is_cpu
            and s.is_cpu
            and c.is_contiguous()
            and s.is_contiguous()
        )

    def _bin_torch(self, v: torch.Tensor) -> None:
        """Moments, counts and per-bin sums of the finite float64 values ``v [n]`` (``|v| <
        radius``), by torch (any device)."""
        self.sum += float(v.sum())
        v2 = v * v
        self.sum_sq += float(v2.sum())
        self.sum_abs += float(v.abs().sum())
        self.sum_4 += float((v2 * v2).sum())
        if self.radius > 0:
            half = self.bins // 2
            # R and half are powers of two: v / R * half is exact (|v| < R; two steps, as half / R
            # can overflow for tiny R), and so is floor(v/2R * half) = floor(floor(v/R * half) / 2):
            # bins agree across range doublings
            idx = (v / self.radius).mul_(half).floor_().long().add_(half)
            idx = idx.clamp_(0, self.bins - 1)  # defensive: |v| < R keeps idx in range
            self.counts += torch.bincount(idx, minlength=self.bins).to(self.counts)
            self.sums.index_add_(0, idx.to(self.sums.device), v.to(self.sums.device))
        else:  # all zeros so far: keep them in the middle bin
            self.counts[self.bins // 2] += v.numel()

    def absorb(self, other: HistogramStats) -> HistogramStats:
        """Add ``other``'s values to ``self`` in place (``other`` untouched); returns ``self``.

        Both histograms are brought to the larger range by exact pairwise doubling, then counts,
        per-bin sums and moments are added: ``self`` op ``other``, in that order, so a sequence
        of absorbs is one fixed sequence of float additions. CPU float64 bins are merged in place
        by :func:`omse.core.binning.absorb_bins` (the same operations, no temporary tensors),
        others by torch."""
        if other.bins != self.bins:
            raise CalibrationError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        kernels = _kernels()
        if kernels is not None and self._plain() and other._plain():
            self.radius = kernels.absorb_bins(
                self.counts.numpy(),
                self.sums.numpy(),
                self.radius,
                other.counts.numpy(),
                other.sums.numpy(),
                other.radius,
            )
        else:
            self._absorb_bins_torch(other)
        self.n += other.n
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.sum, self.sum_sq = self.sum + other.sum, self.sum_sq + other.sum_sq
        self.sum_abs, self.sum_4 = self.sum_abs + other.sum_abs, self.sum_4 + other.sum_4
        return self

    def _absorb_bins_torch(self, other: HistogramStats) -> None:
        """``other``'s counts and per-bin sums added to ``self``'s, by torch (any device): both
        brought to the larger range by pairwise doubling, then added bin by bin."""
        radius = max(self.radius, other.radius)
        self._double_to(radius)  # a zero-only histogram keeps its counts in the middle bin
        oc, osum = other.counts, other.sums
        if 0.0 < other.radius < radius:
            tmp = HistogramStats(other.bins, other.radius, oc.clone(), osum.clone())
            tmp._double_to(radius)
            oc, osum = tmp.counts, tmp.sums
        self.counts += oc
        self.sums += osum

    def merge(self, other: HistogramStats) -> HistogramStats:
        """Combine two statistics of the same bin count into a new one (inputs untouched)."""
        if other.bins != self.bins:
            raise CalibrationError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        return HistogramStats(self.bins).absorb(self).absorb(other)

    # -- reading ----------------------------------------------------------------------------------
    @property
    def nonnegative(self) -> bool:
        """True when no negative value was seen (an unsigned grid then loses nothing)."""
        return self.n > 0 and self.min >= 0.0

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.n else 0.0

    @property
    def mean(self) -> float:
        return self.sum / self.n

    @property
    def var(self) -> float:
        return max(self.sum_sq / self.n - self.mean**2, 0.0)

    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted sample ``(values [k], weights [k])``: bin centroids of the non-empty bins."""
        nz = self.counts > 0
        c = self.counts[nz]
        return self.sums[nz] / c, c

    def quantile(self, q: float) -> float:
        """Approximate ``q``-quantile of ``|x|`` from the histogram (linear within bins)."""
        if self.n == 0:
            raise CalibrationError("no calibration values were seen")
        b = self.bins
        # fold the symmetric histogram onto |x|: bin j (right half) and its mirror
        right = self.counts[b // 2 :]
        left = self.counts[: b // 2].flip(0)
        mag = right + left
        cdf = torch.cumsum(mag, 0) / mag.sum()
        j = int(
            torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)).clamp(max=b // 2 - 1)
        )
        width = self.radius / (b // 2)
        prev = float(cdf[j - 1]) if j > 0 else 0.0
        frac = (q - prev) / max(float(cdf[j]) - prev, 1e-300)
        return min((j + min(max(frac, 0.0), 1.0)) * width, self.absmax)

    def nbytes(self) -> int:
        """Memory held by the statistics (bytes); constant in the number of batches."""
        return self.counts.element_size() * self.counts.numel() * 2 + 8 * 8


_KERNEL: list = []  # [the module omse.core.binning, or None], filled on first use


def _kernels():
    """The compiled kernels (the module :mod:`omse.core.binning`), or None where numba cannot be
    imported (the torch paths then bin and merge). Imported (and compiled, cached on disk) on
    first use, as the sweep is."""
    if not _KERNEL:
        try:
            from . import binning
        except ImportError:  # pragma: no cover - numba is a dependency; a broken install falls back
            binning = None
        _KERNEL.append(binning)
    return _KERNEL[0]


DEFERRED_BYTES = 1 << 30
"""The most bytes of values a :class:`DeferredBinning` block holds unbinned in one pass (tensors
of the pass, referenced, not copied); past it, the pass's later updates bin at once."""

_DEFERRED = threading.local()  # .active: the DeferredBinning of this thread's block, if any


class DeferredBinning:
    """Histogram updates of CPU tensors held (by reference) while a forward pass runs, then
    binned on worker threads: several histograms at once, each one's values in the order they
    came, so every histogram ends bit for bit as :meth:`HistogramStats.update` alone leaves it.

    - ``with DeferredBinning(workers) as d:`` on the thread that runs the model: each
      :meth:`HistogramStats.update` of a float32/float64 CPU tensor on that thread queues the
      values (by reference, with the clamp asked for); the workers compute the clamp, extremes
      and finiteness with the bins (the calling thread reads nothing). Other threads' updates,
      and other dtypes, bin at once.
    - :meth:`submit`, after the pass: returns False, binning nothing and dropping the queue,
      when a queued tensor was changed in place since it was queued (its version counter: an
      in-place op of the model, such as a residual ``out += x``, on a tensor observed earlier);
      the caller then runs the pass again outside the block. Otherwise starts binning the queue
      in the background and returns True. It first waits for the previous submission, so one
      histogram's updates keep their order across passes.
    - :meth:`wait`: blocks until the submitted bins are in, then re-raises a worker's error
      (:class:`~omse.errors.NonFiniteError` for NaN or Inf values; the caller that wants the
      first tensor named runs the pass again with updates binned at once, as
      :func:`omse.transforms.statistics.collect` does). A histogram with queued values is not
      read, absorbed or updated elsewhere before then.
    - Past ``max_bytes`` of queued values in one pass the queue is checked and binned at once,
      and the pass's later updates bin as they come (memory stays bounded).

    Inference tensors (``torch.inference_mode``) have no version counter: they bin at once.
    """

    def __init__(self, workers: int, max_bytes: int = DEFERRED_BYTES):
        self.workers = max(1, int(workers))
        self.max_bytes = max_bytes
        self._queue: list[tuple[HistogramStats, torch.Tensor, tuple | None, int]] = []
        self._bytes = 0
        self._mode = "queue"  # "queue", "direct" (past max_bytes) or "stale" (pass to rerun)
        self._futures: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> DeferredBinning:
        if getattr(_DEFERRED, "active", None) is not None:
            raise CalibrationError("DeferredBinning blocks do not nest")
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="omse-binning")
        _DEFERRED.active = self
        return self

    def __exit__(self, *exc) -> None:
        _DEFERRED.active = None
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._queue.clear()
            assert self._pool is not None
            self._pool.shutdown(wait=True, cancel_futures=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Updates on this thread bin at once inside the block (after the submitted bins)."""
        self.wait()
        _DEFERRED.active = None
        try:
            yield
        finally:
            _DEFERRED.active = self

    def take(
        self, hist: HistogramStats, v: torch.Tensor, clamp: tuple[float, float] | None = None
    ) -> bool:
        """Queue the values ``v [n]`` (clamped to ``clamp`` when binned) for ``hist`` (True), or
        False: bin them now."""
        if self._mode == "stale":
            return True  # the pass runs again: its values are dropped
        if (
            self._mode == "direct"
            or v.device.type != "cpu"
            or v.dtype not in (torch.float32, torch.float64)
            or v.is_inference()
            or _kernels() is None
            or not hist._plain()
        ):
            return False
        self._queue.append((hist, v, clamp, v._version))
        self._bytes += v.numel() * v.element_size()
        if self._bytes > self.max_bytes:
            try:
                ok = self._start()
                self.wait()
            except NonFiniteError:  # the pass runs again, binning at once: that names the tensor
                ok = False
            self._mode = "direct" if ok else "stale"
        return True

    def submit(self) -> bool:
        """End of a pass: start binning its queue (True), or False when the pass must run again
        (see the class docstring)."""
        mode, self._mode = self._mode, "queue"
        if mode == "stale":
            return False
        return self._start()

    def _start(self) -> bool:
        self.wait()
        queue, self._queue, self._bytes = self._queue, [], 0
        if any(v._version != version for _, v, _, version in queue):
            return False
        groups: dict[int, list] = {}
        for hist, v, clamp, _ in queue:
            groups.setdefault(id(hist), []).append((hist, v, clamp))
        # the largest first, each taken by the next free worker: the workers finish together,
        # and a pass's hundreds of histograms cost one task per worker, not one each
        todo: SimpleQueue = SimpleQueue()
        for g in sorted(groups.values(), key=lambda g: -sum(v.numel() for _, v, _ in g)):
            todo.put(g)
        assert self._pool is not None
        n = min(self.workers, len(groups))
        self._futures = [self._pool.submit(_drain, todo) for _ in range(n)]
        return True

    def wait(self) -> None:
        """Block until the submitted bins are all in, then raise the first error of a worker
        (in submission order), if any."""
        futures, self._futures = self._futures, []
        errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e


def _drain(todo: SimpleQueue) -> None:
    """A worker's task: bin the queued groups (one histogram's updates each) until none is
    left; a group's error does not stop the others (the first is raised at the end)."""
    error: BaseException | None = None
    while True:
        try:
            group = todo.get_nowait()
        except Empty:
            break
        try:
            for hist, v, clamp in group:  # one histogram's updates, in their order
                hist._add_cpu(v, clamp)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other groups
            error = error or e
    if error is not None:
        raise error


def merge_in_order(parts: list[HistogramStats]) -> HistogramStats:
    """``parts[0]`` absorbing ``parts[1]``, then ``parts[2]``, ... (a new histogram; inputs
    untouched): the fixed order that makes a sharded reduction reproducible bit for bit."""
    if not parts:
        raise CalibrationError("no histograms to merge")
    out = HistogramStats(parts[0].bins)
    for p in parts:
        out.absorb(p)
    return out


def all_reduce_histogram(h: HistogramStats, group=None) -> HistogramStats:
    """The histogram of every value every rank of ``group`` (default: the default process
    group; ``h`` itself without one) has seen in its ``h``, the same on every rank.

    Ranges differ between ranks (each doubles on its own data), so an all-reduce SUM of the bins
    would add unrelated bins; instead every rank's histogram is gathered (rank order) and folded
    with :meth:`HistogramStats.absorb`, which first brings both sides to the common range (the
    largest radius, i.e. the MAX of the absmax rounded up to a power of two) by exact pairwise
    doubling and then adds counts and per-bin sums. Counts, ``n``, ``min`` and ``max`` equal
    those of one histogram of the concatenated data exactly; per-bin sums and moments equal
    ``merge_in_order`` of the ranks' histograms bit for bit on every rank.
    """
    from ..distributed import gather, is_distributed

    if not is_distributed(group):
        return h
    return merge_in_order(gather(h, group))
