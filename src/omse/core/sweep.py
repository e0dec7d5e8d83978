"""The exact MMSE step of each row by a binned breakpoint sweep, compiled for the CPU (numba).

Same problem and answer as :func:`omse.core.mmse.mmse_solve` (see there for ``E(s)``, its pieces
and breakpoints), found with work linear in the breakpoints and no sort of them. Per row, in
``t = 1/s`` where breakpoints ``t = (k + 1/2) / a`` of a value are evenly spaced:

1. an upper bound ``U``: min-max and Lloyd steps (``s <- B/C``) from it;
2. a window: the optimum lies in ``(0, 2 s_mm]`` (at ``s >= 2 s_mm`` the lattice of step ``s/2``
   holds, inside every value's range, a point at least as near as the lattice of step ``s``), and
   above ``s_lo``, where clipping alone costs ``U`` (one pass bins the clipping thresholds
   ``a / cap``; the cost is exact at the bin edges and solved exactly inside the bin that
   crosses ``U`` for the values above it);
3. the breakpoints in the window are counted into uniform ``t`` bins (their ``sum w a`` and
   ``sum w (2k + 1)``), which gives the exact state ``(B, C)``, hence ``E``, at every bin edge
   (the edges tighten ``U``). ``E`` is convex on each piece with curvature ``>= 2 C`` and its
   slope drops by ``2 w a`` at each breakpoint, so on a bin it lies above two parabolas through
   the bin's ends (``max`` of which is convex) and, more loosely, above two lines: a bin whose
   bound exceeds ``U`` is ruled out; one with at most one breakpoint is solved in closed form;
4. the other bins are swept exactly: their breakpoints sorted, each piece's minimiser clamped
   into the piece.

Rows are independent problems: threads take contiguous shares of them (the compiled kernel
releases the GIL; the pool belongs to the process that made it, so a forked child makes its
own). Each row's arithmetic is sequential, so the answer does not depend on the thread count.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["sweep_rows"]

_BINS_PER_VALUE = 8  # at most this many bins per value (bounds memory at high bit widths)
_MAX_BINS = 1 << 16  # and per row (a 10^6-value row: about 5 MB of bins)
_CLIP_BINS = 256  # at most this many bins of clipping thresholds (lower end of the window)
_LLOYD = 3  # evaluations for the upper bound: min-max, then Lloyd steps
_PARALLEL_MIN = 1 << 14  # fewer values are solved on the calling thread


@numba.njit(cache=True, inline="always")
def _code(a: float, t: float, cap: float) -> float:
    """|code| of magnitude ``a`` at ``t = 1/s`` (ties to the lower level), clipped at ``cap``."""
    q = np.ceil(a * t - 0.5)
    if q < 0.0:
        return 0.0
    return cap if q > cap else q


@numba.njit(cache=True, inline="always")
def _bin(tb: float, t_lo: float, inv_w: float, nb: int) -> int:
    """Bin of breakpoint ``tb`` among ``nb`` bins of width ``1/inv_w`` from ``t_lo``."""
    return min(max(int((tb - t_lo) * inv_w), 0), nb - 1)


@numba.njit(cache=True)
def _evaluate(a, w, cap, n, s):
    """``(E, B, C)`` at step ``s`` over the first ``n`` values: error, ``sum w a q``, ``sum w q^2``
    (codes ``ceil(a / s - 1/2)`` clipped to ``[0, cap]``, ``a / s`` as ``a * (1 / s)``)."""
    e = b = c = 0.0
    inv_s = 1.0 / s
    for i in range(n):
        q = np.ceil(a[i] * inv_s - 0.5)
        q = 0.0 if q < 0.0 else (cap[i] if q > cap[i] else q)
        r = a[i] - s * q
        e += w[i] * r * r
        b += w[i] * a[i] * q
        c += w[i] * q * q
    return e, b, c


@numba.njit(cache=True, inline="always")
def _piece(A, B, C, lo, hi):
    """Minimiser and minimum of ``A - 2 s B + s^2 C`` over ``s`` in ``[lo, hi]``."""
    s = B / C if C > 0.0 else lo
    s = min(max(s, lo), hi)
    return s, A - 2.0 * s * B + s * s * C


@numba.njit(cache=True, inline="always")
def _better(e, s, best_e, best_s):
    return e < best_e or (e == best_e and s < best_s)


@numba.njit(cache=True, inline="always")
def _take(A, B, C, lo, hi, opt_s, opt_e):
    """The better of ``(opt_s, opt_e)`` and the piece ``(B, C)``'s minimum over ``[lo, hi]``."""
    s, e = _piece(A, B, C, lo, hi)
    return (s, e) if _better(e, s, opt_e, opt_s) else (opt_s, opt_e)


@numba.njit(cache=True)
def _lower_bound(El, Er, dl, dr, D, c, lo, hi):
    """Lower bound of ``E`` on ``[lo, hi]`` from its ends (values ``El``, ``Er``; slopes ``dl`` just
    above ``lo`` and ``dr`` just below ``hi``), total slope drop ``D`` and curvature ``>= 2c``."""
    g1 = dl - D  # E(s) >= El + g1 (s - lo) + c (s - lo)^2
    g2 = dr + D  # E(s) >= Er - g2 (hi - s) + c (hi - s)^2
    best = math.inf
    for k in range(4):
        if k == 0:
            s = lo - g1 / (2.0 * c) if c > 0.0 else lo
        elif k == 1:
            s = hi - g2 / (2.0 * c) if c > 0.0 else hi
        elif k == 2:
            s = lo
        else:  # where the two parabolas cross (their difference is linear in s)
            u0 = El - (Er - g2 * (hi - lo) + c * (hi - lo) ** 2)
            u1 = (El + g1 * (hi - lo) + c * (hi - lo) ** 2) - Er
            if (u0 > 0.0) == (u1 > 0.0) or u0 == u1:
                continue
            s = lo + (hi - lo) * u0 / (u0 - u1)
        s = min(max(s, lo), hi)
        v1 = El + g1 * (s - lo) + c * (s - lo) ** 2
        v2 = Er - g2 * (hi - s) + c * (hi - s) ** 2
        best = min(best, max(v1, v2))
    return best


@numba.njit(cache=True)
def _clip_bound(h0, h1, h2, nh, width, U):
    """Largest step at which clipping alone costs ``U``, from the clipping thresholds ``a / cap``
    binned into ``nh`` bins of width ``width`` from 0 (``h0, h1, h2``: each bin's ``sum w cap^2``,
    ``sum w a cap``, ``sum w a^2``): every smaller step costs more. 0 where no step does.

    Clipping costs ``g(s) = sum w (a - cap s)^2`` over the values with ``a / cap > s``, decreasing
    in ``s``. Down from the top bin, ``g`` is exact at each bin's lower edge; in the bin where it
    first reaches ``U``, the values of the bins above alone (a lower bound of ``g`` there, a
    quadratic) are solved exactly for ``U``."""
    P0 = P1 = P2 = 0.0
    for j in range(nh - 1, -1, -1):
        hi = (j + 1) * width
        q0, q1, q2 = P0, P1, P2  # the bins above j
        P0, P1, P2 = P0 + h0[j], P1 + h1[j], P2 + h2[j]
        lo = j * width
        if P2 - 2.0 * lo * P1 + lo * lo * P0 >= U:
            if q0 > 0.0 and q2 - 2.0 * lo * q1 + lo * lo * q0 >= U:
                d = max(q1 * q1 - q0 * (q2 - U), 0.0)
                return min(max((q1 - math.sqrt(d)) / q0, lo), hi)
            return lo
    return 0.0


@numba.njit(cache=True)
def _solve_row(x, wr, weighted, qpos, qneg, ws):
    a, w, cap, inv_a, k0, k1, h0, h1, h2, dB, dC, cnt, tone, keep, Bs, Cs, s_e, E_e = ws
    n = x.size
    amax = pos_max = neg_max = 0.0
    for i in range(n):
        if not math.isfinite(x[i]):
            return math.nan, math.nan
        wi = wr[i] if weighted else 1.0
        v = x[i] if wi > 0.0 else 0.0
        w[i] = wi
        a[i] = abs(v)
        cap[i] = qpos if v > 0.0 else (qneg if v < 0.0 else 0.0)
        amax = max(amax, a[i])
        if v > 0.0 and qpos > 0.0:
            pos_max = max(pos_max, a[i])
        elif v < 0.0 and qneg > 0.0:
            neg_max = max(neg_max, a[i])
    norm = amax if amax > 0.0 else 1.0
    inv_norm = 1.0 / norm
    inv_p = 1.0 / qpos if qpos > 0.0 else 0.0
    inv_q = 1.0 / qneg if qneg > 0.0 else 0.0
    s_mm = 0.0
    if qpos > 0.0:
        s_mm = max(s_mm, pos_max * inv_norm / qpos)
    if qneg > 0.0:
        s_mm = max(s_mm, neg_max * inv_norm / qneg)
    # clipping thresholds a / cap (clipped below this step) binned over (0, s_mm]
    nh = min(max(n, 16), _CLIP_BINS)
    h0[:nh] = 0.0
    h1[:nh] = 0.0
    h2[:nh] = 0.0
    hw = s_mm / nh if s_mm > 0.0 else 1.0
    inv_hw = 1.0 / hw
    A = 0.0
    for i in range(n):
        a[i] *= inv_norm
        a2 = w[i] * a[i] * a[i]
        A += a2
        if cap[i] > 0.0 and w[i] > 0.0:
            ic = inv_p if cap[i] == qpos else inv_q
            j = min(int(a[i] * ic * inv_hw), nh - 1)
            h0[j] += w[i] * cap[i] * cap[i]
            h1[j] += w[i] * a[i] * cap[i]
            h2[j] += a2
    if not s_mm > 0.0:  # no value any code can represent: every step is optimal
        return norm, A * norm * norm

    # 1. Upper bound.
    best_s, best_e = s_mm, math.inf
    s = s_mm
    for _ in range(_LLOYD):
        e, b, c = _evaluate(a, w, cap, n, s)
        if _better(e, s, best_e, best_s):
            best_s, best_e = s, e
        if not c > 0.0:
            break
        s = b / c
    U = best_e
    lloyd_s, lloyd_e = best_s, best_e

    # 2. Window (s_lo, s_hi]; in t = 1/s: [t_lo, t_hi).
    s_hi = max(2.0 * s_mm, best_s * (1.0 + 1e-12))
    lo = _clip_bound(h0, h1, h2, nh, hw, U)
    s_lo = max(min(lo * (1.0 - 1e-9), best_s * (1.0 - 1e-12)), 1e-300)
    t_lo, t_hi = 1.0 / s_hi, 1.0 / s_lo

    # 3. Bins: state at t_lo, and breakpoints (k0[i] .. k1[i] - 1 of each value) per bin.
    B0 = C0 = 0.0
    total = 0.0
    for i in range(n):
        q0 = _code(a[i], t_lo, cap[i])
        q1 = _code(a[i], t_hi, cap[i])
        k0[i], k1[i] = int(q0), int(q1)
        B0 += w[i] * a[i] * q0
        C0 += w[i] * q0 * q0
        total += q1 - q0
        inv_a[i] = 1.0 / a[i] if q1 > q0 else 0.0
    nb = int(max(1.0, min(total, _BINS_PER_VALUE * n + 16.0, _MAX_BINS)))
    width = (t_hi - t_lo) / nb
    inv_w = 1.0 / width
    dB[:nb] = 0.0
    dC[:nb] = 0.0
    cnt[:nb] = 0
    for i in range(n):
        wa = w[i] * a[i]
        for kk in range(k0[i], k1[i]):
            tb = (kk + 0.5) * inv_a[i]
            j = _bin(tb, t_lo, inv_w, nb)
            dB[j] += wa
            dC[j] += w[i] * (2.0 * kk + 1.0)
            cnt[j] += 1
            tone[j] = tb  # a breakpoint of the bin (its only one where the count is 1)

    # E at every bin edge (s_e[j] = 1 / t_j) bounds the optimum: U. Bs[j], Cs[j]: the state
    # (B, C) for t just above t_j. eps: float64 rounding of E, below which bins are kept.
    eps = 1e-11 * A
    B, C = B0, C0
    s_e[0] = s_hi
    E_e[0] = A - 2.0 * s_hi * B + s_hi * s_hi * C
    for j in range(nb):
        Bs[j], Cs[j] = B, C
        B, C = B + dB[j], C + dC[j]
        lo = 1.0 / (t_lo + (j + 1) * width) if j < nb - 1 else s_lo
        s_e[j + 1] = lo
        E_e[j + 1] = A - 2.0 * lo * B + lo * lo * C
        U = min(U, E_e[j + 1])
    Bs[nb], Cs[nb] = B, C

    # Each bin: ruled out by a cheap bound from its ends, or solved exactly (at most one
    # breakpoint), or kept for the sweep where its tighter lower bound is below U.
    keep[:nb] = False
    opt_s, opt_e = math.inf, math.inf
    m = runs = 0
    # kept bins closer than `gap` share a run: enumerating the gap's breakpoints (about
    # total / nb per bin) costs less than enumerating every value for one more run
    gap = max(1, int(n * nb / max(total, 1.0)))
    last = -gap - 1
    for j in range(nb):
        lo, hi = s_e[j + 1], s_e[j]
        B, C, B1, C1 = Bs[j], Cs[j], Bs[j + 1], Cs[j + 1]
        dl = -2.0 * B1 + 2.0 * lo * C1  # slope just above lo
        dr = -2.0 * B + 2.0 * hi * C  # slope just below hi
        D = 2.0 * dB[j]  # total drop of the slope across the bin
        h = hi - lo
        if max(E_e[j + 1] + min(0.0, dl - D) * h, E_e[j] - max(0.0, dr + D) * h) > U + eps:
            continue
        if cnt[j] == 0:
            opt_s, opt_e = _take(A, B, C, lo, hi, opt_s, opt_e)
        elif cnt[j] == 1:
            sb = min(max(1.0 / tone[j], lo), hi)
            opt_s, opt_e = _take(A, B, C, sb, hi, opt_s, opt_e)
            opt_s, opt_e = _take(A, B1, C1, lo, sb, opt_s, opt_e)
        elif _lower_bound(E_e[j + 1], E_e[j], dl, dr, D, C, lo, hi) <= U + eps:
            keep[j] = True
            m += cnt[j]
            runs += 1 if j - last > gap else 0
            last = j

    # 4. Exact sweep of the kept bins: their breakpoints (found near each run of kept bins, or by
    # enumerating all again where runs are many), sorted.
    if m > 0:
        tb_all = np.empty(m)
        bin_all = np.empty(m, np.int64)
        db_all = np.empty(m)
        dc_all = np.empty(m)
        # runs of kept bins; where they are many, one run over every bin
        every = runs * n >= total
        runs = 1 if every else runs
        r_lo = np.zeros(runs, np.int64)
        r_hi = np.full(runs, nb - 1)
        if not every:
            r, last = -1, -gap - 1
            for j in range(nb):
                if keep[j]:
                    if j - last > gap:
                        r += 1
                        r_lo[r] = j
                    r_hi[r] = last = j
        p = 0
        for i in range(n):
            for u in range(runs if k1[i] > k0[i] else 0):
                ka = max(k0[i], int(_code(a[i], t_lo + r_lo[u] * width, cap[i])) - 1)
                kb = min(k1[i], int(_code(a[i], t_lo + (r_hi[u] + 1) * width, cap[i])) + 2)
                for kk in range(ka, kb):
                    tb = (kk + 0.5) * inv_a[i]
                    j = _bin(tb, t_lo, inv_w, nb)
                    if keep[j] and r_lo[u] <= j <= r_hi[u] and p < m:
                        tb_all[p] = tb
                        bin_all[p] = j
                        db_all[p] = w[i] * a[i]
                        dc_all[p] = w[i] * (2.0 * kk + 1.0)
                        p += 1
        m = p
        tb_all, bin_all = tb_all[:m], bin_all[:m]
        order = np.argsort(tb_all, kind="mergesort")  # bins increase with t
        cur = -1
        B = C = t_prev = 0.0
        for idx in range(m + 1):
            if idx < m:
                o = order[idx]
                j = bin_all[o]
            else:
                j = -2
            if j != cur:
                if cur >= 0:  # close the last piece of the bin
                    t_end = t_lo + (cur + 1) * width if cur < nb - 1 else t_hi
                    opt_s, opt_e = _take(A, B, C, 1.0 / t_end, 1.0 / t_prev, opt_s, opt_e)
                if idx == m:
                    break
                cur = j
                B, C = Bs[j], Cs[j]
                t_prev = t_lo + j * width if j > 0 else t_lo
            tb = tb_all[o]
            opt_s, opt_e = _take(A, B, C, 1.0 / max(tb, t_prev), 1.0 / t_prev, opt_s, opt_e)
            B += db_all[o]
            C += dc_all[o]
            t_prev = max(tb, t_prev)

    # Exact re-evaluation; keep the Lloyd point where rounding made the sweep's worse.
    e_opt, _, _ = _evaluate(a, w, cap, n, opt_s)
    if not e_opt <= lloyd_e:
        opt_s, e_opt = lloyd_s, lloyd_e
    return opt_s * norm, e_opt * norm * norm


@numba.njit(cache=True, nogil=True)
def _sweep(x, w, weighted, qpos, qneg, scale, sse, r0, r1):
    n = x.shape[1]
    nb = min(_BINS_PER_VALUE * n + 16, _MAX_BINS)
    f = np.empty
    ws = (f(n), f(n), f(n), f(n), f(n, np.int64), f(n, np.int64), f(_CLIP_BINS),
          f(_CLIP_BINS), f(_CLIP_BINS), f(nb), f(nb), f(nb, np.int64), f(nb), f(nb, np.bool_),
          f(nb + 1), f(nb + 1), f(nb + 1), f(nb + 1))  # fmt: skip
    for r in range(r0, r1):
        scale[r], sse[r] = _solve_row(
            x[r % x.shape[0]], w[r % w.shape[0]], weighted, qpos[r], qneg[r], ws
        )


def sweep_rows(
    x: np.ndarray,
    qpos: float | np.ndarray,
    qneg: float | np.ndarray,
    w: np.ndarray | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact steps and errors of rows ``x [S, n]`` (weights ``w [S, n]`` >= 0, or None) on the grid
    with ``qpos`` positive and ``qneg`` negative levels -> ``(scale [S], sse [S])``, float64, in
    ``x``'s units (and units squared); NaN for a row holding NaN or Inf. ``threads`` threads take
    contiguous shares of the rows.

    ``qpos`` / ``qneg`` may also be arrays ``[R]``, one grid per row: then ``x`` (and ``w``) of
    one row are solved on each of the ``R`` grids (an affine grid's zero points), ``R`` results."""
    # C-ordered and writable, float32 or float64: one compiled signature each, no copy of float32
    x = np.require(x, np.float32 if x.dtype == np.float32 else np.float64, ["C", "W"])
    qp, qn = (
        np.atleast_1d(np.asarray(qpos, np.float64)),
        np.atleast_1d(np.asarray(qneg, np.float64)),
    )
    S = max(x.shape[0], qp.size, qn.size)
    if x.shape[0] not in (1, S) or qp.size not in (1, S) or qn.size not in (1, S):
        raise ValueError(f"sweep_rows: {x.shape[0]} rows against {qp.size} / {qn.size} grids")
    qp, qn = (
        np.ascontiguousarray(np.broadcast_to(qp, S)),
        np.ascontiguousarray(np.broadcast_to(qn, S)),
    )
    scale, sse = np.empty(S), np.empty(S)
    weighted = w is not None
    ww = np.require(np.broadcast_to(w, x.shape), np.float64, ["C", "W"]) if weighted else _NO_W
    args = (x, ww, weighted, qp, qn, scale, sse)
    parts = min(threads, S) if x.shape[1] * S >= _PARALLEL_MIN else 1
    if parts <= 1:
        _sweep(*args, 0, S)
        return scale, sse
    cuts = [S * k // parts for k in range(parts + 1)]
    list(_pool(parts).map(lambda k: _sweep(*args, cuts[k], cuts[k + 1]), range(parts)))
    return scale, sse


_POOL: dict[tuple[int, int], ThreadPoolExecutor] = {}
_NO_W = np.ones((1, 1))  # the weights argument of unweighted rows (not read)


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads owned by this process (a forked child makes its own: the
    parent's threads do not exist there)."""
    key = (os.getpid(), threads)
    if key not in _POOL:
        _POOL[key] = ThreadPoolExecutor(threads, thread_name_prefix="omse-sweep")
    return _POOL[key]
