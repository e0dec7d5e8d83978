"""The reading and binning steps of :meth:`omse.core.stats.HistogramStats.update`, compiled for
the CPU (numba).

Two reads of the values, where the torch path takes a clamped copy, an ``aminmax``, four
reductions, a float64 copy, a bincount and an ``index_add_``:

1. :func:`scan_values`, one vectorised read: the extremes (from the values' bit patterns as
   ordered integers: integer min/max reductions vectorise, float ones do not here), finiteness
   (the largest magnitude's bit pattern) and the four moments ``sum v``, ``sum v^2``,
   ``sum |v|``, ``sum v^4``, of the values clamped to ``[lo, hi]`` where a clamp is given (the
   extremes of the clamped values are the clamped extremes: clamping is monotonic).
2. :func:`bin_values`, once the range is known: per value, its bin ``floor(v / R * half) + half``
   in float64 (the torch path's operations, in its order, so the index is the same bit for bit),
   the bin's count and sum.

- Counts are integers held in float64: exact, equal to the torch path's.
- Per-bin sums are added in the values' order, one value at a time, as ``index_add_`` on a 1-D
  CPU tensor does: equal bit for bit (zeros, which leave a sum unchanged, are only counted: see
  :func:`_bins`).
- The moments are summed with float additions reassociated into SIMD lanes within blocks of
  :data:`_BLOCK` values, the blocks' sums then added in order: within float64 rounding of torch's
  pairwise sums (relative differences about ``1e-15`` measured up to ``2 * 10^7`` values), not
  bit for bit; the lanes depend on the CPU's vector width, as torch's reductions do.
- A clamp ``[lo, hi]`` (bounds in the values' dtype, as ``numpy.clip`` and ``torch.clamp`` round
  them) is applied to each value as it is read, in its dtype: the values ``clip`` would give,
  without the copy.

:func:`absorb_bins` adds one histogram's bins to another's (:meth:`~omse.core.stats.
HistogramStats.absorb`): the same float operations as the torch path, in place, without its
temporary tensors (pairwise merges on range doubling, then one addition per bin).

Values are read in their own dtype (float32 or float64: one compiled signature each, no float64
copy) and widened exactly.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["scan_values", "bin_values", "absorb_bins"]


_BLOCK = 1 << 12  # values per partial sum of the moments


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _scan_block(w, bits, lo, hi, clamp, mask, shift, kmin, kmax):
    """One block of :func:`scan_values`: ``(sum v, sum v^2, sum |v|, sum v^4, least key,
    greatest key, largest magnitude's bit pattern)`` of ``w [n]`` (``bits``: ``w`` viewed as
    signed integers of its width; ``mask`` all bits but the sign's, ``shift`` the sign bit's
    position, ``kmin``/``kmax`` the integer type's greatest and least values). A value's key
    ``b ^ ((b >> shift) & mask)`` orders as the value does (negative values' magnitude bits
    reversed; ``-0.0`` just below ``+0.0``). The moments read the values clamped where
    ``clamp``."""
    s1 = s2 = sa = s4 = 0.0
    amax = bits.dtype.type(0)
    for i in range(w.shape[0]):
        b = bits[i]
        k = b ^ ((b >> shift) & mask)
        kmin = min(kmin, k)
        kmax = max(kmax, k)
        amax = max(amax, b & mask)
        y = w[i]
        if clamp:
            y = min(max(y, lo), hi)
        x = np.float64(y)
        x2 = x * x
        s1 += x
        s2 += x2
        sa += abs(x)
        s4 += x2 * x2
    return s1, s2, sa, s4, kmin, kmax, amax


@numba.njit(cache=True, nogil=True)
def _scan(v, bits, lo, hi, clamp, mask, shift, kmin, kmax, moments):
    """:func:`_scan_block` over ``v`` block by block (blocks of :data:`_BLOCK` values, their
    moments added in order: two levels, so the rounding error stays about that of a pairwise
    sum); the moments are added to ``moments [4]``. Returns ``(least key, greatest key, largest
    magnitude's bit pattern)``."""
    t1 = t2 = ta = t4 = 0.0
    amax = bits.dtype.type(0)
    for i in range(0, v.shape[0], _BLOCK):
        # slices: the block's loop vectorises (an index range does not)
        w, wb = v[i : i + _BLOCK], bits[i : i + _BLOCK]
        s1, s2, sa, s4, kmin, kmax, m = _scan_block(w, wb, lo, hi, clamp, mask, shift, kmin, kmax)
        t1 += s1
        t2 += s2
        ta += sa
        t4 += s4
        amax = max(amax, m)
    moments[0] += t1
    moments[1] += t2
    moments[2] += ta
    moments[3] += t4
    return kmin, kmax, amax


def _scan_constants(dtype, it, inf_bits: int) -> tuple:
    """Per float dtype: its integer view type, sign-less mask, sign bit's position, the integer
    type's greatest and least values (the keys' starting min and max) and +inf's bit pattern."""
    nbits = 8 * np.dtype(dtype).itemsize
    info = np.iinfo(it)
    return it, it((1 << (nbits - 1)) - 1), it(nbits - 1), it(info.max), it(info.min), inf_bits


_SCAN = {  # computed once: scan_values runs for every histogram update of a calibration pass
    np.dtype(np.float32): _scan_constants(np.float32, np.int32, 0x7F800000),
    np.dtype(np.float64): _scan_constants(np.float64, np.int64, 0x7FF0000000000000),
}


def scan_values(v, clamp, moments):
    """``(min, max, finite)`` of the values of ``v [n]`` (float32 or float64, contiguous, n >=
    1) clamped to ``clamp = (lo, hi)`` where given (bounds rounded to ``v``'s dtype), in one
    read; ``sum v, sum v^2, sum |v|, sum v^4`` of the same values added to ``moments [4]``.
    ``finite`` is False when a value is NaN, or infinite without a clamp (a clamp takes an
    infinity to its bound, as ``clip`` does; NaN stays NaN); the other results are then
    meaningless."""
    t = v.dtype.type
    it, mask, shift, kmin0, kmax0, inf = _SCAN[v.dtype]
    lo, hi = (t(clamp[0]), t(clamp[1])) if clamp is not None else (t(0), t(0))
    kmin, kmax, amax = _scan(
        v, v.view(it), lo, hi, clamp is not None, mask, shift, kmin0, kmax0, moments
    )
    finite = int(amax) <= inf if clamp is not None else int(amax) < inf
    keys = np.array([kmin, kmax], dtype=it)
    ext = (keys ^ ((keys >> shift) & mask)).view(v.dtype)
    if clamp is not None:
        ext = np.minimum(np.maximum(ext, lo), hi)
    return float(ext[0]), float(ext[1]), finite


_CHUNK = 2048  # values per index pass of the binning (its bin indices stay in the L1 cache)
_SPARE = 8  # extra slots the zeros' additions rotate over (no chain of stores on one bin); 2^k


@numba.njit(cache=True, nogil=True)
def _bins_serial(v, radius, counts, sums, lo, hi, clamp):
    """Count and sum every value of ``v [n]`` (clamped to ``[lo, hi]`` where ``clamp``) into its
    bin of ``counts``/``sums [bins]`` over ``[-radius, radius]``, one value at a time in order
    (no reassociation: exact bins). The binning of commit 1a53d9c; :func:`_bins` falls back on
    it where its shortcuts do not hold."""
    bins = counts.shape[0]
    half = bins // 2
    fhalf = float(half)
    for i in range(v.shape[0]):
        y = v[i]
        if clamp:
            y = min(max(y, lo), hi)
        x = np.float64(y)
        # R and half are powers of two: x / R * half is exact (two steps, as the torch path)
        j = int(np.floor((x / radius) * fhalf)) + half
        j = min(max(j, 0), bins - 1)  # defensive, as the torch path's clamp
        counts[j] += 1.0
        sums[j] += x


@numba.njit(cache=True, nogil=True)
def _bins(v, radius, counts, sums, lo, hi, clamp):
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
        _bins_serial(v, radius, counts, sums, lo, hi, clamp)
        return
    cnt = np.empty(bins + _SPARE)
    sm = np.empty(bins + _SPARE)
    cnt[:bins] = counts
    sm[:bins] = sums
    cnt[bins:] = 0.0
    sm[bins:] = 0.0
    idx = np.empty(_CHUNK, np.int32)
    xs = np.empty(_CHUNK)
    for start in range(0, v.shape[0], _CHUNK):
        w = v[start : start + _CHUNK]
        for i in range(w.shape[0]):
            y = w[i]
            if clamp:
                y = min(max(y, lo), hi)
            x = np.float64(y)
            xs[i] = x
            j = np.int32(np.floor((x * inv) * fhalf)) + np.int32(
                half
            )  # two steps, as the torch path
            j = min(max(j, np.int32(0)), np.int32(bins - 1))  # defensive, as the torch path
            idx[i] = np.int32(bins) + np.int32(i & (_SPARE - 1)) if x == 0.0 else j
        for i in range(w.shape[0]):
            j = idx[i]
            cnt[j] += 1.0
            sm[j] += xs[i]
    counts[:] = cnt[:bins]
    sums[:] = sm[:bins]
    zeros = 0.0
    for k in range(bins, bins + _SPARE):
        zeros += cnt[k]
    counts[half] += zeros


def bin_values(v, radius, counts, sums, clamp=None):
    """Add ``v [n]`` (float32 or float64, contiguous; every value, clamped to ``clamp = (lo,
    hi)`` where given, ``|v| < radius``; ``radius`` a power of two > 0) into ``counts [bins]``
    and ``sums [bins]`` (float64, ``bins`` a power of two) over ``[-radius, radius]``."""
    t = v.dtype.type
    lo, hi = (t(clamp[0]), t(clamp[1])) if clamp is not None else (t(0), t(0))
    _bins(v, radius, counts, sums, lo, hi, clamp is not None)


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
