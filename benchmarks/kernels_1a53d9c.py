"""The binning kernels of commit 1a53d9c, verbatim: the reference the statistics pass's kernels
are checked against (``tests/core/test_stats.py``: counts and per-bin sums bit for bit, moments
to float64 rounding) and the "before" implementation ``calibration_speed.py`` times beside them.
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 1 << 12  # values per partial sum of the moments


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def moments_1a53d9c(v, moments):
    """``sum v, sum v^2, sum |v|, sum v^4`` of ``v [n]`` added to ``moments [4]``: per block of
    :data:`BLOCK` values (SIMD lanes), then block by block in order."""
    n = v.shape[0]
    t1 = t2 = ta = t4 = 0.0
    for lo in range(0, n, BLOCK):
        w = v[lo : lo + BLOCK]
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


@numba.njit(cache=True, nogil=True)
def bins_1a53d9c(v, radius, counts, sums):
    """The serial binning loop: every value, zeros included, one at a time into its bin of
    ``counts``/``sums`` over ``[-radius, radius]``."""
    bins = counts.shape[0]
    half = bins // 2
    fhalf = float(half)
    for i in range(v.shape[0]):
        x = np.float64(v[i])
        j = int(np.floor((x / radius) * fhalf)) + half
        j = min(max(j, 0), bins - 1)
        counts[j] += 1.0
        sums[j] += x
