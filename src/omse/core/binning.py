"""The binning step of :meth:`omse.core.stats.HistogramStats.update`, compiled for the CPU (numba).

One call does what the torch path does in six passes (a float64 copy, four reductions, a
bincount and an ``index_add_``): per value, its bin ``floor(v / R * half) + half`` in float64
(the torch path's operations, in its order, so the index is the same bit for bit), the bin's count
and sum, and the four moments ``sum v``, ``sum v^2``, ``sum |v|``, ``sum v^4``.

- Counts are integers held in float64: exact, equal to the torch path's.
- Per-bin sums are added in the values' order, one value at a time, as ``index_add_`` on a 1-D
  CPU tensor does: equal bit for bit (zeros, which leave a sum unchanged, are only counted: see
  :func:`_bins`).
- The moments are summed in a second, vectorised loop (float additions reassociated into SIMD
  lanes within blocks of :data:`_BLOCK` values, the blocks' sums then added in order): within float64 rounding of torch's pairwise sums (relative differences about ``1e-15``
  measured up to ``2 * 10^7`` values), not bit for bit; the lanes depend on the CPU's vector
  width, as torch's reductions do.

:func:`absorb_bins` adds one histogram's bins to another's (:meth:`~omse.core.stats.
HistogramStats.absorb`): the same float operations as the torch path, in place, without its
temporary tensors (pairwise merges on range doubling, then one addition per bin).

Values are read in their own dtype (float32 or float64: one compiled signature each, no float64
copy) and widened exactly. Range, extremes and finiteness are the caller's
(:meth:`~omse.core.stats.HistogramStats.update`, from ``torch.aminmax``) before the bins are read.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["bin_values", "absorb_bins"]


_BLOCK = 1 << 12  # values per partial sum of the moments


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _moments(v, moments):
    """``sum v, sum v^2, sum |v|, sum v^4`` of ``v [n]`` added to ``moments [4]``: per block of
    :data:`_BLOCK` values (SIMD lanes), then block by block in order (two levels, so the
    rounding error stays about that of a pairwise sum)."""
    n = v.shape[0]
    t1 = t2 = ta = t4 = 0.0
    for lo in range(0, n, _BLOCK):
        w = v[lo : lo + _BLOCK]  # a slice: the inner loop vectorises (an index range does not)
        s1 = s2 = sa = s4 = 0.0
        for i in range(w.shape[0]):
            x = np.float64(w[i])
            x2 = x * x
            s1 += x
            s2 += x2
            sa += abs(x)
            s4 += x2 * x2
        t1 += s1
        t2 += s2
        ta += sa
        t4 += s4
    moments[0] += t1
    moments[1] += t2
    moments[2] += ta
    moments[3] += t4


_CHUNK = 2048  # values per index pass of the binning (its bin indices stay in the L1 cache)
_SPARE = 8  # extra slots the zeros' additions rotate over (no chain of stores on one bin); 2^k


@numba.njit(cache=True, nogil=True)
def _bins_serial(v, radius, counts, sums):
    """Count and sum every value of ``v [n]`` into its bin of ``counts``/``sums [bins]`` over
    ``[-radius, radius]``, one value at a time in order (no reassociation: exact bins). The
    binning of commit 1a53d9c; :func:`_bins` falls back on it where its shortcuts do not hold."""
    bins = counts.shape[0]
    half = bins // 2
    fhalf = float(half)
    for i in range(v.shape[0]):
        x = np.float64(v[i])
        # R and half are powers of two: x / R * half is exact (two steps, as the torch path)
        j = int(np.floor((x / radius) * fhalf)) + half
        j = min(max(j, 0), bins - 1)  # defensive, as the torch path's clamp
        counts[j] += 1.0
        sums[j] += x


@numba.njit(cache=True, nogil=True)
def _bins(v, radius, counts, sums):
    """:func:`_bins_serial`'s counts and per-bin sums, bit for bit, faster: each bin's sum still
    adds its values one at a time in their order.

    Per chunk of :data:`_CHUNK` values, a vectorised pass computes the bin indices, then a serial
    pass adds. ``x / R`` is computed as ``x * (1/R)``: ``R = 2^k``, so ``1/R`` is exact (where it
    does not overflow: else the serial loop bins) and both are the rounded value of the same real
    number. Zeros (either sign) belong to the middle bin; their additions go to one of
    :data:`_SPARE` spare slots instead (a chain of read-modify-writes on one bin is what a ReLU's
    zeros cost): counts are integers, so the middle bin's count is the same whichever slot a zero
    was counted in, and adding a zero leaves a bin sum unchanged, because a bin sum is never
    ``-0.0`` (every sum starts at ``+0.0``, and a round-to-nearest sum is ``-0.0`` only when both
    addends are). Should the middle bin's sum be ``-0.0`` anyway, the serial loop bins."""
    bins = counts.shape[0]
    half = bins // 2
    fhalf = float(half)
    inv = 1.0 / radius
    if not inv < np.inf or (sums[half] == 0.0 and np.signbit(sums[half])):
        _bins_serial(v, radius, counts, sums)
        return
    cnt = np.empty(bins + _SPARE)
    sm = np.empty(bins + _SPARE)
    cnt[:bins] = counts
    sm[:bins] = sums
    cnt[bins:] = 0.0
    sm[bins:] = 0.0
    idx = np.empty(_CHUNK, np.int32)
    for lo in range(0, v.shape[0], _CHUNK):
        w = v[lo : lo + _CHUNK]
        for i in range(w.shape[0]):
            x = np.float64(w[i])
            j = np.int32(np.floor((x * inv) * fhalf)) + np.int32(
                half
            )  # two steps, as the torch path
            j = min(max(j, np.int32(0)), np.int32(bins - 1))  # defensive, as the torch path
            idx[i] = np.int32(bins) + np.int32(i & (_SPARE - 1)) if x == 0.0 else j
        for i in range(w.shape[0]):
            j = idx[i]
            cnt[j] += 1.0
            sm[j] += np.float64(w[i])
    counts[:] = cnt[:bins]
    sums[:] = sm[:bins]
    zeros = 0.0
    for k in range(bins, bins + _SPARE):
        zeros += cnt[k]
    counts[half] += zeros


@numba.njit(cache=True, nogil=True)
def bin_values(v, radius, counts, sums, moments):
    """Add ``v [n]`` (float32 or float64, every ``|v| < radius``; ``radius`` a power of two > 0)
    into ``counts [bins]`` and ``sums [bins]`` (float64, ``bins`` a power of two) over
    ``[-radius, radius]``, and ``sum v, sum v^2, sum |v|, sum v^4`` into ``moments [4]``."""
    _moments(v, moments)
    _bins(v, radius, counts, sums)


@numba.njit(cache=True, nogil=True)
def _double(counts, sums):
    """Double the range of ``counts``/``sums [bins]`` once, in place: new bin ``bins/4 + m`` is
    old bin ``2m`` plus old bin ``2m + 1`` (``m < bins/2``), the outer quarters empty (the torch
    path's ``view(-1, 2).sum(1)`` into zeros)."""
    b = counts.shape[0]
    c = counts.copy()
    s = sums.copy()
    counts[:] = 0.0
    sums[:] = 0.0
    q = b // 4
    for m in range(b // 2):
        counts[q + m] = c[2 * m] + c[2 * m + 1]
        sums[q + m] = s[2 * m] + s[2 * m + 1]


@numba.njit(cache=True, nogil=True)
def absorb_bins(counts, sums, radius, other_counts, other_sums, other_radius):
    """Add ``other_counts``/``other_sums`` (range ``other_radius``) to ``counts``/``sums`` (range
    ``radius``; all float64 ``[bins]``, radii powers of two or 0 for a zero-only histogram) in
    place, the other side untouched; returns the common range ``max(radius, other_radius)``.

    Each side is first brought to the common range by pairwise doubling (:func:`_double`; a
    zero-only side just takes the range), then every bin adds ``self + other``: the float
    operations of :meth:`omse.core.stats.HistogramStats.absorb`'s torch path, in its order. The
    other side is doubled on a copy of its occupied bins only (``[first, last]`` non-empty: an
    empty bin's sum is ``+0.0``, and adding ``+0.0`` to a bin sum, never ``-0.0``, changes
    nothing, so the bins outside need no operation)."""
    b = counts.shape[0]
    target = max(radius, other_radius)
    if radius == 0.0:
        radius = target
    while radius < target:
        _double(counts, sums)
        radius *= 2.0
    first = 0
    while first < b and other_counts[first] == 0.0:
        first += 1
    if first == b:  # nothing to add
        return target
    last = b - 1
    while other_counts[last] == 0.0:
        last -= 1
    c = other_counts[first : last + 1].copy()
    s = other_sums[first : last + 1].copy()
    r = other_radius
    while 0.0 < r < target:  # old bin j -> new bin b/4 + j // 2, pairs (2m, 2m + 1) added
        lo, hi = b // 4 + first // 2, b // 4 + last // 2
        nc = np.zeros(hi - lo + 1)
        ns = np.zeros(hi - lo + 1)
        for j in range(first, last + 1):
            k = b // 4 + j // 2 - lo
            if j % 2 == 0:
                nc[k] = c[j - first]
                ns[k] = s[j - first]
            else:  # old 2m + 1 after old 2m (0.0 where 2m is outside: 0.0 + x is x here)
                nc[k] = nc[k] + c[j - first]
                ns[k] = ns[k] + s[j - first]
        c, s, first, last = nc, ns, lo, hi
        r *= 2.0
    for k in range(first, last + 1):
        counts[k] += c[k - first]
        sums[k] += s[k - first]
    return target
