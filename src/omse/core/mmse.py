"""Exact Minimum Mean Squared Error step sizes for uniform symmetric quantizers.

For a slice ``x`` (n values, optional non-negative weights ``w``) the step ``s`` minimises

    E(s) = sum_i w_i (x_i - s * clamp(round(x_i / s), qmin, qmax))^2 .

E is continuous and piecewise quadratic in ``s``: between consecutive *breakpoints*
``s = |x_i| / (k + 1/2)`` every code ``q_i`` is fixed and ``E(s) = A - 2 s B + s^2 C`` with
``B = sum w |x| |q|`` and ``C = sum w q^2``. At a breakpoint the derivative drops (a concave
kink), so the global minimum is the stationary point ``B / C`` of one piece. :func:`mmse_solve`
finds it exactly:

1. an upper bound ``U`` from min-max and a few Lloyd iterations (``s <- B/C``);
2. a window ``(s_lo, s_hi)`` outside which ``E >= U`` provably: below ``s_lo`` the clipping error
   of the largest values alone exceeds ``U``; above ``s_hi`` the values that round to zero do;
3. every breakpoint inside the window, sorted per slice (all slices at once, in padded rows), with
   ``B`` and ``C`` swept by cumulative sums and each piece's minimiser clamped into the piece.

The answer is the global optimum over all ``s > 0`` (not only over ``(0, max|x|/qmax]``), up to
float64 rounding. Work is ``O(T log T)`` with ``T`` the breakpoints in the window (2-3 per value
at 4 bits). That is the ``"vectorised"`` method, torch operations on the input's device (CUDA
included). On the CPU, :func:`mmse_solve` uses :mod:`omse.core.sweep` instead: the same optimum
from a compiled sweep that counts breakpoints into bins and sorts only the few bins no bound rules
out, in 0.2-0.5 of a 100-point grid search's time at 2-4 bits (``benchmarks/solver_speed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .grids import Grid, GridKind

__all__ = ["DEFAULT_METHOD", "MMSEResult", "mmse_solve", "mmse_solve_grids", "mmse_scale"]

_LLOYD_STEPS = 4
_UB_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.28, 0.2)
_TOPK_CLIP_BOUND = 64
_BNB_TRIGGER = 3.0
_CHUNK_VALUES = 1 << 18
_BNB_MIN_N = 4096
_BNB_POINTS = 512
_BNB_ROUNDS = 4


DEFAULT_METHOD = "auto"
"""The method of :func:`mmse_solve` calls that name none. ``"vectorised"`` reproduces, to the last
bit, the steps of omse before the compiled sweep (tests/transforms/test_recorded.py sets it)."""


@dataclass(frozen=True)
class MMSEResult:
    """Optimal steps ``scale [S]`` and their summed squared errors ``sse [S]`` (x's units^2)."""

    scale: torch.Tensor
    sse: torch.Tensor


def _levels(a: torch.Tensor, s: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """|code| of magnitudes ``a [S, n]`` at steps ``s [S, 1]``, clipped at ``cap [S, n]``.

    Ties ``a/s = k + 1/2`` go to the lower level, matching the breakpoint convention below; the
    error is the same either way, since E is continuous.
    """
    return torch.minimum(torch.clamp(torch.ceil(a / s - 0.5), min=0.0), cap)


def _sse(a, w, cap, s):
    q = _levels(a, s, cap)
    return (w * (a - s * q) ** 2).sum(1), q


class _Side:
    """Sorted magnitudes of one sign of each row, with prefix sums of w, w*a, w*a^2."""

    def __init__(self, mask: torch.Tensor, a: torch.Tensor, w: torch.Tensor, cap: float):
        am = torch.where(mask, a, 0.0)
        wm = torch.where(mask, w, 0.0)
        self.a, order = torch.sort(am, dim=1)
        wm = torch.gather(wm, 1, order)
        z = torch.zeros(a.shape[0], 1, dtype=torch.float64, device=a.device)
        self.P = [torch.cat([z, torch.cumsum(t, 1)], 1) for t in (wm, wm * self.a, wm * self.a**2)]
        self.cap = cap

    def sse(self, s: torch.Tensor) -> torch.Tensor:
        """Exact error at steps ``s [S, G]`` -> ``[S, G]``."""
        Q = int(self.cap)
        if Q == 0:  # no code on this side: every value costs w a^2
            return self.P[2][:, -1:].expand_as(s)
        q = torch.arange(Q + 1, dtype=torch.float64, device=s.device).reshape(1, 1, -1)
        ss = s[:, :, None]
        u = (q - 0.5).clamp_min(0.0) * ss
        v = torch.where(q == Q, torch.full_like(u, float("inf")), (q + 0.5) * ss)
        return self._seg_rows(u, v, q * ss)

    def _seg_rows(self, u, v, c):
        S, G, K = u.shape
        i = torch.searchsorted(self.a, u.reshape(S, G * K).contiguous())
        j = torch.maximum(torch.searchsorted(self.a, v.reshape(S, G * K).contiguous()), i)
        s0, s1, s2 = (torch.gather(P, 1, j) - torch.gather(P, 1, i) for P in self.P)
        cc = c.reshape(S, G * K)
        return (s2 - 2.0 * cc * s1 + cc * cc * s0).clamp_min(0.0).reshape(S, G, K).sum(2)

    def lower_bound(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Lower bound of the error over each step interval ``[lo, hi]`` (``[S, G]`` each).

        Values whose code is the same at both ends cost their distance to the segment
        ``q*[lo, hi]``; values changing code once cost the smaller of the two codes' distances;
        values changing code more than once are bounded by 0.
        """
        Q = int(self.cap)
        inf = float("inf")
        lo_, h = lo[:, :, None], hi[:, :, None]
        if Q == 0:
            return self.sse(lo)  # constant in s
        q = torch.arange(Q + 1, dtype=torch.float64, device=lo.device).reshape(1, 1, -1)
        segs = []
        # constant code q: a in [(q-1/2)h, (q+1/2)lo_); q = 0: [0, lo_/2); q = Q: [(Q-1/2)h, inf)
        lo_c = (q - 0.5).clamp_min(0.0) * h
        hi_c = torch.where(q == Q, torch.full_like(lo_c, inf), (q + 0.5) * lo_)
        segs.append((lo_c, torch.minimum(hi_c, q * lo_), q * lo_))
        segs.append((torch.maximum(lo_c, q * h), hi_c, q * h))
        # one transition q+1 -> q (q < Q)
        qt = q[..., :Q]
        L = torch.maximum(
            (qt + 0.5) * lo_, torch.where(qt >= 1, (qt - 0.5) * h, torch.zeros_like(qt * h))
        )
        R = torch.minimum(
            (qt + 0.5) * h,
            torch.where(qt + 1 < Q, (qt + 1.5) * lo_, torch.full_like(qt * lo_, inf)),
        )
        ac = 0.5 * ((qt + 1) * lo_ + qt * h)
        segs.append((torch.maximum(L, qt * h), torch.minimum(R, ac), qt * h))
        segs.append((torch.maximum(L, ac), torch.minimum(R, (qt + 1) * lo_), (qt + 1) * lo_))
        total = 0.0
        for u, v, c in segs:
            u, v, c = torch.broadcast_tensors(u, v, c)
            total = total + self._seg_rows(u, torch.maximum(u, v), c)
        return total


def _bnb_window(sides, s_lo, s_hi, best_s, best_e, points: int = _BNB_POINTS):
    """One round of branch and bound: split ``(s_lo, s_hi)`` geometrically into ``points``
    intervals, evaluate the error at the knots (improving the best step) and keep the hull of the
    intervals whose lower bound is below the best error."""
    t = torch.linspace(0.0, 1.0, points + 1, dtype=torch.float64, device=s_lo.device)
    knots = s_lo[:, None] * (s_hi / s_lo)[:, None] ** t[None, :]
    E = sum(sd.sse(knots) for sd in sides)
    j = E.argmin(1, keepdim=True)
    e_best = torch.gather(E, 1, j).squeeze(1)
    better = e_best < best_e
    best_s = torch.where(better, torch.gather(knots, 1, j).squeeze(1), best_s)
    best_e = torch.where(better, e_best, best_e)
    lb = sum(sd.lower_bound(knots[:, :-1], knots[:, 1:]) for sd in sides)
    keep = lb < best_e[:, None] * (1 + 1e-12)
    inf = torch.full_like(lb, float("inf"))
    new_lo = torch.where(keep, knots[:, :-1], inf).amin(1)
    new_hi = torch.where(keep, knots[:, 1:], -inf).amax(1)
    new_lo = torch.minimum(
        torch.where(torch.isfinite(new_lo), new_lo, best_s), best_s * (1 - 1e-12)
    )
    new_hi = torch.maximum(
        torch.where(torch.isfinite(new_hi), new_hi, best_s), best_s * (1 + 1e-12)
    )
    return new_lo.clamp_min(1e-300), new_hi, best_s, best_e


def mmse_solve(
    slices: torch.Tensor,
    grid: Grid,
    weights: torch.Tensor | None = None,
    *,
    method: str | None = None,
) -> MMSEResult:
    """Exact MMSE steps per row: slices ``[S, n]`` (weights ``[S, n]`` >= 0) -> ``MMSEResult``.

    Rows that are all zero (or whose values no code can represent, e.g. only negative values on an
    unsigned grid) get step ``1`` (any step is optimal there) in normalised units.

    ``method``: ``"sweep"``, the compiled binned sweep of :mod:`omse.core.sweep` (CPU, threads as
    ``torch.get_num_threads()``); ``"vectorised"``, torch operations on the input's device (CUDA
    included), in chunks of about 2^18 values so that transient memory stays bounded (a 1000 x 1280
    classifier needs ~100 MB instead of ~1 GB); ``"auto"``: the sweep for CPU tensors, vectorised
    elsewhere; None: :data:`DEFAULT_METHOD`. Both return the global optimum (up to float64
    rounding; their steps can differ in the last bits); results are float64 on the input's device.
    """
    method = DEFAULT_METHOD if method is None else method
    if method not in ("auto", "sweep", "vectorised"):
        raise ConfigError(f"mmse_solve method must be auto, sweep or vectorised, got {method!r}")
    if slices.dim() != 2:
        raise ConfigError(f"mmse_solve takes a [slices, n] tensor, got shape {tuple(slices.shape)}")
    if slices.shape[1] == 0:
        raise ConfigError("mmse_solve got empty slices")
    if method == "auto":
        method = "sweep" if slices.device.type == "cpu" else "vectorised"
    if method == "sweep":  # numpy from here on: no torch kernel's threads compete with the sweep's
        from .sweep import sweep_rows  # numba: imported (and compiled, cached) on first use

        xn, wn = (None if t is None else _numpy(t.detach().cpu()) for t in (slices, weights))
        if wn is not None:
            wn = np.broadcast_to(wn, xn.shape)
            if not np.isfinite(wn).all() or (wn < 0).any():
                raise ConfigError("mmse_solve weights must be finite and >= 0")
        scale, sse = sweep_rows(
            xn, float(grid.qmax), float(-grid.qmin), wn, threads=torch.get_num_threads()
        )
        if np.isnan(sse).any():  # the kernel's mark for a row holding NaN or Inf
            raise ConfigError("mmse_solve got NaN or Inf values")
        dev = slices.device
        return MMSEResult(torch.from_numpy(scale).to(dev), torch.from_numpy(sse).to(dev))
    x = slices.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ConfigError("mmse_solve got NaN or Inf values")
    w = None
    if weights is not None:
        w = weights.detach().to(device=x.device, dtype=torch.float64).expand_as(x)
        if (w < 0).any() or not torch.isfinite(w).all():
            raise ConfigError("mmse_solve weights must be finite and >= 0")
    if x.shape[0] > 1 and x.numel() > _CHUNK_VALUES:
        rows = max(1, _CHUNK_VALUES // max(x.shape[1], 1))
        parts = [
            _solve_rows(x[i : i + rows], grid, None if w is None else w[i : i + rows])
            for i in range(0, x.shape[0], rows)
        ]
        return MMSEResult(torch.cat([p.scale for p in parts]), torch.cat([p.sse for p in parts]))
    return _solve_rows(x, grid, w)


def mmse_solve_grids(values: torch.Tensor, weights: torch.Tensor, grids: list[Grid]) -> MMSEResult:
    """Exact MMSE steps of one weighted set of values (``[n]``, weights ``[n]`` >= 0) on each of
    ``grids`` -> ``MMSEResult`` with ``scale [len(grids)]`` and ``sse [len(grids)]`` (float64):
    ``mmse_solve(values[None], g, weights[None])`` for every ``g``, bit for bit, in one call of
    the compiled sweep (an affine grid's zero points; CPU tensors) or one :func:`mmse_solve` per
    grid (elsewhere)."""
    if values.device.type != "cpu" or DEFAULT_METHOD == "vectorised":
        parts = [mmse_solve(values.reshape(1, -1), g, weights.reshape(1, -1)) for g in grids]
        return MMSEResult(torch.cat([p.scale for p in parts]), torch.cat([p.sse for p in parts]))
    from .sweep import sweep_rows

    xn, wn = _numpy(values.detach().reshape(1, -1)), _numpy(weights.detach().reshape(1, -1))
    if not np.isfinite(wn).all() or (wn < 0).any():
        raise ConfigError("mmse_solve weights must be finite and >= 0")
    qpos = np.array([float(g.qmax) for g in grids])
    qneg = np.array([float(-g.qmin) for g in grids])
    scale, sse = sweep_rows(xn, qpos, qneg, wn, threads=torch.get_num_threads())
    if np.isnan(sse).any():
        raise ConfigError("mmse_solve got NaN or Inf values")
    return MMSEResult(torch.from_numpy(scale), torch.from_numpy(sse))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a float32 (no copy) or float64 array (other dtypes through torch)."""
    if t.dtype not in (torch.float32, torch.float64):
        t = t.double()
    return t.numpy()


def _solve_rows(x: torch.Tensor, grid: Grid, w: torch.Tensor | None) -> MMSEResult:
    """The vectorised solve of float64 rows ``x [S, n]`` (validated; weights ``w`` or None)."""
    S, n = x.shape
    dev = x.device
    if w is None:
        w = torch.ones_like(x)
    else:
        # a value of weight 0 adds nothing to E(s) at any step: drop it (as 0) so that it cannot
        # set the normalisation, the min-max start or the search window
        x = torch.where(w > 0, x, torch.zeros_like(x))

    # Normalise each row by its largest magnitude: the problem is scale-equivariant.
    amax = x.abs().amax(1)
    norm = torch.where(amax > 0, amax, torch.ones_like(amax))
    a = x.abs() / norm[:, None]
    qpos, qneg = float(grid.qmax), float(-grid.qmin)
    cap = torch.where(x >= 0, qpos, qneg).to(torch.float64)
    cap = torch.where(x == 0, torch.zeros_like(cap), cap)
    A = (w * a * a).sum(1)

    # 1. Upper bound: min-max and fractions of it, then Lloyd iterations from the best.
    pos_max = torch.where(x > 0, a, 0.0).amax(1)
    neg_max = torch.where(x < 0, a, 0.0).amax(1)
    s_mm = torch.zeros(S, dtype=torch.float64, device=dev)
    if qpos > 0:
        s_mm = torch.maximum(s_mm, pos_max / qpos)
    if qneg > 0:
        s_mm = torch.maximum(s_mm, neg_max / qneg)
    representable = s_mm > 0
    s_mm = torch.where(representable, s_mm, torch.ones_like(s_mm))
    best_s, best_e = s_mm.clone(), torch.full((S,), float("inf"), dtype=torch.float64, device=dev)
    for f in _UB_FRACTIONS:
        s = s_mm * f
        e, _ = _sse(a, w, cap, s[:, None])
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    s = best_s
    for _ in range(_LLOYD_STEPS):
        _, q = _sse(a, w, cap, s[:, None])
        B, C = (w * a * q).sum(1), (w * q * q).sum(1)
        s = torch.where(C > 0, B / C.clamp_min(1e-300), s)
        e, _ = _sse(a, w, cap, s[:, None])
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    U = best_e

    # 2. Window. Above s_hi: values with a < s/2 round to zero, costing >= U.
    a_sorted, order = torch.sort(a, dim=1)
    w_sorted = torch.gather(w, 1, order)
    cap_sorted = torch.gather(cap, 1, order)
    zero_cost = torch.cumsum(w_sorted * a_sorted**2, dim=1)
    j = torch.searchsorted(zero_cost, U[:, None].contiguous(), right=False).clamp(max=n - 1)
    s_hi = torch.minimum(2.0 * torch.gather(a_sorted, 1, j).squeeze(1), torch.full_like(U, 2.0))
    s_hi = torch.maximum(s_hi, best_s * (1 + 1e-12))
    # Below s_lo: clipping of the largest values alone, sum w (a - cap*s)_+^2, costs >= U.
    k = min(_TOPK_CLIP_BOUND, n)
    ta, tw, tc = a_sorted[:, -k:], w_sorted[:, -k:], cap_sorted[:, -k:]
    lo, hi = torch.zeros_like(U), best_s.clone()
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        clip = (tw * torch.clamp(ta - tc * mid[:, None], min=0.0) ** 2).sum(1)
        ok = clip >= U  # every s <= mid costs >= U
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    s_lo = torch.minimum(lo, best_s * (1 - 1e-12)).clamp_min(1e-300)

    # Many breakpoints per value (high bit widths, long slices): shrink the window first by
    # branch and bound on exact interval lower bounds computed from prefix sums (O(levels log n)).
    est = (a * (1.0 / s_lo[:, None] - 1.0 / s_hi[:, None])).clamp(max=qpos + qneg).sum(1)
    if n >= _BNB_MIN_N and float(est.sum()) > _BNB_TRIGGER * S * n:
        sides = [_Side(x > 0, a, w, qpos), _Side(x < 0, a, w, qneg)]
        for _ in range(_BNB_ROUNDS):
            s_lo, s_hi, best_s, best_e = _bnb_window(sides, s_lo, s_hi, best_s, best_e)
        U = best_e

    # 3. Breakpoints bp = a / (k + 1/2) inside (s_lo, s_hi), k in [0, cap - 1].
    level0 = _levels(a, s_lo[:, None], cap)  # codes just above s_lo
    k_lo = torch.clamp(torch.floor(a / s_hi[:, None] - 0.5) + 1.0, min=0.0)
    k_hi = level0 - 1.0
    counts = torch.clamp(k_hi - k_lo + 1.0, min=0.0).to(torch.int64).reshape(-1)
    elem = torch.repeat_interleave(torch.arange(S * n, device=dev), counts)
    T = elem.numel()
    offsets = torch.cumsum(counts, 0) - counts
    kk = k_lo.reshape(-1)[elem] + (torch.arange(T, device=dev) - offsets[elem]).to(torch.float64)
    row = elem // n
    a_e, w_e = a.reshape(-1)[elem], w.reshape(-1)[elem]

    # Rows padded to [S, 1 + max count]: column 0 holds the state (B0, C0) just above s_lo,
    # then the row's breakpoints (entries are grouped by row since elements are row-major).
    row_tot = counts.reshape(S, n).sum(1)
    row_start = torch.cumsum(row_tot, 0) - row_tot
    pos = torch.arange(T, device=dev) - row_start[row] + 1
    width = int(row_tot.max()) + 1 if S else 1
    bp = torch.full((S, width), float("inf"), dtype=torch.float64, device=dev)
    dB = torch.zeros((S, width), dtype=torch.float64, device=dev)
    dC = torch.zeros((S, width), dtype=torch.float64, device=dev)
    bp[row, pos] = a_e / (kk + 0.5)
    dB[row, pos] = -w_e * a_e
    dC[row, pos] = -w_e * (2.0 * kk + 1.0)
    bp[:, 0] = s_lo
    dB[:, 0] = (w * a * level0).sum(1)
    dC[:, 0] = (w * level0 * level0).sum(1)
    bp, order = torch.sort(bp, dim=1, stable=True)  # s_lo stays first: every breakpoint > s_lo
    Bp = torch.cumsum(torch.gather(dB, 1, order), 1)
    Cp = torch.cumsum(torch.gather(dC, 1, order), 1)
    nxt = torch.minimum(torch.cat([bp[:, 1:], s_hi[:, None]], 1), s_hi[:, None])
    s_star = torch.where(Cp > 0, Bp / Cp.clamp_min(1e-300), bp)
    s_star = torch.minimum(torch.maximum(s_star, bp), nxt)
    E = A[:, None] - 2.0 * s_star * Bp + s_star * s_star * Cp
    E = torch.where(bp < s_hi[:, None], E, torch.full_like(E, float("inf")))
    j_best = torch.argmin(E, dim=1, keepdim=True)  # first (smallest step) among ties
    sweep_s = torch.gather(s_star, 1, j_best).squeeze(1)
    sweep_s = torch.where(torch.isfinite(sweep_s), sweep_s, best_s)

    # Exact re-evaluation; keep the upper-bound point where rounding made the sweep worse.
    e_sweep, _ = _sse(a, w, cap, sweep_s[:, None])
    use_sweep = e_sweep <= best_e
    s_opt = torch.where(use_sweep, sweep_s, best_s)
    e_opt = torch.where(use_sweep, e_sweep, best_e)
    s_opt = torch.where(representable, s_opt, torch.ones_like(s_opt))
    e_opt = torch.where(representable, e_opt, A)
    return MMSEResult(scale=s_opt * norm, sse=e_opt * norm * norm)


def mmse_scale(
    x: torch.Tensor,
    bits: int,
    grid: GridKind | str | Grid = "full",
    axis: int | None = None,
) -> torch.Tensor:
    """Globally optimal MMSE step of ``x`` on a ``bits``-bit grid.

    ``axis=None``: one step for the whole tensor, a 0-d tensor. ``axis=a``: one step per index
    along ``a`` (e.g. weight ``[out, in, kh, kw]``, ``axis=0`` -> ``[out]``), vectorised over slices.
    Returned in ``x``'s floating dtype; units of ``x``.
    """
    g = grid if isinstance(grid, Grid) else Grid(bits, grid)  # type: ignore[arg-type]
    if isinstance(grid, Grid) and grid.bits != bits:
        raise ConfigError(f"bits={bits} disagrees with grid {grid}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConfigError("mmse_scale takes a floating-point tensor")
    if x.numel() == 0:
        raise ConfigError("mmse_scale got an empty tensor")
    if axis is None:
        slices = x.reshape(1, -1)
    else:
        if x.dim() == 0 or not -x.dim() <= axis < x.dim():
            raise ConfigError(f"axis={axis} is out of range for shape {tuple(x.shape)}")
        slices = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    res = mmse_solve(slices, g)
    out = res.scale.to(x.dtype)
    return out.reshape(()) if axis is None else out
