"""Range setting: choose a quantizer's step from statistics. One interface: ``fit(stats) -> scale``.

``stats`` is either a tensor's slices ``[S, n]`` (weights: exact values, one scale per row) or a
:class:`~omse.core.stats.HistogramStats` (activations: one scale per tensor). Every method returns
positive finite steps: ``[S]`` for slices, a 0-d tensor for a histogram.

- :class:`MinMax`: ``max|x| / qmax`` (no clipping).
- :class:`Percentile`: the ``p``-quantile of ``|x|`` as clipping point.
- :class:`ACIQ`: fit a Laplace or Gaussian and take its analytic MMSE clipping point.
- :class:`MMSE`: the exact minimiser of the squared quantization error (:mod:`omse.core.mmse`).

:func:`fit_affine` adds the zero point of an affine (asymmetric) activation grid: every zero
point is tried, each with the method's step, and the pair of least squared error is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..errors import CalibrationError, ConfigError
from .grids import Grid
from .mmse import mmse_solve, mmse_solve_grids
from .stats import HistogramStats

__all__ = [
    "RangeSetter",
    "MinMax",
    "Percentile",
    "ACIQ",
    "MMSE",
    "fit_affine",
    "make_range_setter",
    "range_setter_to_dict",
    "METHODS",
]

Stats = torch.Tensor | HistogramStats


class RangeSetter(Protocol):
    name: str

    def fit(self, stats: Stats, grid: Grid) -> torch.Tensor: ...


def _clip_to_scale(clip: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Step that puts the clipping magnitude ``clip`` at the grid's largest positive code."""
    return clip / grid.qmax


def _fallback(scale: torch.Tensor) -> torch.Tensor:
    # an all-zero slice (step 0): any step is exact; 1 keeps codes and exports well defined.
    # Tiny but positive steps are kept: data of magnitude 1e-13 deserves a step of 1e-14.
    ok = torch.isfinite(scale) & (scale >= torch.finfo(torch.float32).tiny)
    return torch.where(ok, scale, torch.ones_like(scale))


def _absmax(stats: Stats, grid: Grid) -> torch.Tensor:
    if isinstance(stats, HistogramStats):
        if stats.n == 0:
            raise CalibrationError("no calibration values were seen")
        if grid.zero_point:  # affine: each side must fit its own end of the grid
            need = max(max(stats.max, 0.0) / grid.qmax, max(-stats.min, 0.0) / -grid.qmin)
            return torch.tensor(need * grid.qmax, dtype=torch.float64)
        hi = stats.max if not grid.signed else stats.absmax
        # signed full grid: the negative side reaches -qmin*s > qmax*s; both sides must fit
        lo = -stats.min if grid.signed else 0.0
        need = max(hi / grid.qmax, lo / -grid.qmin if grid.qmin < 0 else 0.0)
        return torch.tensor(need * grid.qmax, dtype=torch.float64)
    x = stats.to(torch.float64)
    if grid.signed:
        return torch.maximum(
            x.clamp(min=0).amax(1), (-x).clamp(min=0).amax(1) * grid.qmax / -grid.qmin
        )
    return x.clamp(min=0).amax(1)


@dataclass(frozen=True)
class MinMax:
    """``s = max|x| / qmax``: nothing is clipped (the baseline)."""

    name: str = "minmax"

    def fit(self, stats: Stats, grid: Grid) -> torch.Tensor:
        return _fallback(_clip_to_scale(_absmax(stats, grid), grid))


@dataclass(frozen=True)
class Percentile:
    """Clip at the ``percentile`` (in %) of ``|x|``."""

    percentile: float = 99.99
    name: str = "percentile"

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")

    def fit(self, stats: Stats, grid: Grid) -> torch.Tensor:
        q = self.percentile / 100.0
        if isinstance(stats, HistogramStats):
            clip = torch.tensor(stats.quantile(q), dtype=torch.float64)
        else:
            x = stats.to(torch.float64).abs()
            clip = torch.quantile(x, q, dim=1) if x.shape[1] <= 16_000_000 else x.amax(1)
        return _fallback(_clip_to_scale(clip, grid))


@functools.lru_cache(maxsize=64)
def _unit_optimum(family: str, grid: Grid) -> float:
    """MMSE step of a unit Laplace (b=1) or Gaussian (sigma=1) on ``grid``, from 2^16 quantiles.

    Non-negative grids use the half distribution (|X|), as after a ReLU of a symmetric variable.
    """
    n = 1 << 16
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if family == "laplace":
        x = torch.where(u < 0.5, torch.log(2 * u), -torch.log(2 * (1 - u)))
    else:
        x = math.sqrt(2.0) * torch.erfinv(2 * u - 1)
    if not grid.signed:
        x = x.abs()
    return float(mmse_solve(x.reshape(1, -1), grid).scale[0])


@dataclass(frozen=True)
class ACIQ:
    """Analytic clipping: fit ``family`` (``laplace``, ``gauss`` or ``auto`` by kurtosis) and scale
    the distribution's exact MMSE step (computed once per grid) by the fitted spread."""

    family: Literal["auto", "laplace", "gauss"] = "auto"
    name: str = "aciq"

    def fit(self, stats: Stats, grid: Grid) -> torch.Tensor:
        if isinstance(stats, HistogramStats):
            if stats.n == 0:
                raise CalibrationError("no calibration values were seen")
            n = stats.n
            m2, m4, mabs = stats.sum_sq / n, stats.sum_4 / n, stats.sum_abs / n
            m2, m4, mabs = (torch.tensor([v], dtype=torch.float64) for v in (m2, m4, mabs))
        else:
            x = stats.to(torch.float64)
            m2, m4, mabs = (x**2).mean(1), (x**4).mean(1), x.abs().mean(1)
        kurt = m4 / torch.clamp(m2 * m2, min=1e-300)
        # about the origin (symmetric quantizers): Laplace b = E|x|, Gaussian sigma = sqrt(E x^2)
        lap = torch.tensor(_unit_optimum("laplace", grid), dtype=torch.float64) * mabs
        gau = torch.tensor(_unit_optimum("gauss", grid), dtype=torch.float64) * m2.sqrt()
        if self.family == "laplace":
            s = lap
        elif self.family == "gauss":
            s = gau
        else:  # Laplace kurtosis 6, Gaussian 3 (and half-distributions alike)
            s = torch.where(kurt > 4.5, lap, gau)
        s = _fallback(s)
        return s.reshape(()) if isinstance(stats, HistogramStats) else s


@dataclass(frozen=True)
class MMSE:
    """Exact minimiser of ``sum (x - s*clamp(round(x/s)))^2`` (histogram: on bin centroids)."""

    name: str = "mmse"

    def fit(self, stats: Stats, grid: Grid) -> torch.Tensor:
        if isinstance(stats, HistogramStats):
            if stats.n == 0:
                raise CalibrationError("no calibration values were seen")
            v, w = stats.points()
            return _fallback(mmse_solve(v.reshape(1, -1), grid, w.reshape(1, -1)).scale).reshape(())
        return _fallback(mmse_solve(stats, grid).scale)


ZERO_POINT_STRIDES = (16, 4, 1)
"""The MMSE zero-point search of :func:`fit_affine`, coarse to fine: every 16th zero point (and
the signed grid's), then every 4th and every one around the best."""

ZERO_POINT_KEEP = 1.2
"""A zero point is refined while its squared error is within this factor of the best so far."""


def _zero_point_candidates(
    pv: torch.Tensor, pw: torch.Tensor, bits: int
) -> dict[int, torch.Tensor]:
    """``{z: exact MMSE step}`` of the zero points :func:`fit_affine` compares: with few
    zero points (up to 32: ``bits <= 5``) all of them; else coarse to fine
    (:data:`ZERO_POINT_STRIDES`): each level solves the zero points at its stride within one
    stride of the previous level's around every zero point whose error (the compiled sweep's) is
    within :data:`ZERO_POINT_KEEP` of the best, and the candidates are those within 1% of the
    best error found. The error over ``z`` is smooth with one basin on activation histograms:
    on the tests' skewed, two-mode and leaky histograms this finds the exhaustive search's zero
    point (``tests/core/test_ranges.py``) at about a quarter of the solves."""
    zmax = 2**bits - 2
    errors: dict[int, float] = {}
    steps: dict[int, torch.Tensor] = {}

    def solve(zs: list[int]) -> None:
        res = mmse_solve_grids(pv, pw, [Grid(bits, "unsigned", z) for z in zs])
        errors.update(zip(zs, res.sse.tolist(), strict=True))
        steps.update(zip(zs, res.scale, strict=True))

    if zmax <= 32:
        solve(list(range(1, zmax + 1)))
        return steps

    first, prev = ZERO_POINT_STRIDES[0], ZERO_POINT_STRIDES[0]
    solve(sorted({*range(1, zmax + 1, first), zmax, 2 ** (bits - 1)}))
    for stride in ZERO_POINT_STRIDES[1:]:
        best = min(errors.values())
        near = {
            z
            for c, e in errors.items()
            if e <= ZERO_POINT_KEEP * best
            for z in range(max(1, c - prev + stride), min(zmax, c + prev - stride) + 1, stride)
        }
        if near - errors.keys():
            solve(sorted(near - errors.keys()))
        prev = stride
    best = min(errors.values())
    return {z: steps[z] for z in sorted(errors) if errors[z] <= best * 1.01 + 1e-300}


def fit_affine(setter: RangeSetter, stats: HistogramStats, bits: int) -> tuple[torch.Tensor, Grid]:
    """Step and affine grid of one activation tensor: ``(s, Grid(bits, "unsigned", z))``.

    A non-negative tensor gets zero point 0 (the unsigned grid). Otherwise the zero points
    ``z = 1 .. 2^b - 2`` (one code at least on either side of zero) are tried, with the step
    ``setter`` fits on ``[-z, 2^b - 1 - z]``, and the pair of least squared error over the
    histogram's bin centroids is kept (the smallest ``z`` on a tie). With :class:`MMSE` the
    zero points are searched coarse to fine (:func:`_zero_point_candidates`: every zero point
    up to 5 bits), each with its exact step; other setters try every zero point. ``z =
    2^(b-1)`` is the signed ``full`` grid and always tried, so the result is never worse than it.
    """
    if not isinstance(stats, HistogramStats):
        raise ConfigError("affine activation grids are fitted from histograms")
    if stats.n == 0:
        raise CalibrationError("no calibration values were seen")
    if stats.nonnegative:
        grid = Grid(bits, "unsigned")
        return setter.fit(stats, grid), grid
    v, w = stats.points()
    if type(setter) is MMSE:  # exact steps from one call of the solver per search level
        found = _zero_point_candidates(v, w, bits)
        zs = list(found)
        fitted = [_fallback(st).reshape(()) for st in found.values()]
    else:
        zs = list(range(1, 2**bits - 1))
        fitted = [setter.fit(stats, Grid(bits, "unsigned", z)) for z in zs]
    v, w = v.to(torch.float64), w.to(torch.float64)
    best: tuple[float, torch.Tensor, Grid] | None = None
    for z, s in zip(zs, fitted, strict=True):
        grid = Grid(bits, "unsigned", z)
        sd = s.to(torch.float64)
        err = float((((v - torch.clamp(torch.round(v / sd), -z, grid.qmax) * sd) ** 2) * w).sum())
        if best is None or err < best[0]:
            best = (err, s, grid)
    assert best is not None
    return best[1], best[2]


METHODS = {"minmax": MinMax, "percentile": Percentile, "aciq": ACIQ, "mmse": MMSE}


def make_range_setter(value: str | dict | RangeSetter) -> RangeSetter:
    """A range setter from its name (``minmax``, ``percentile``, ``aciq``, ``mmse``), a dict
    ``{"name": ..., **parameters}`` (as :func:`range_setter_to_dict` writes it), or itself."""
    if isinstance(value, dict):
        params = dict(value)
        name = params.pop("name", None)
        cls = METHODS.get(str(name).lower()) if name is not None else None
        if cls is None:
            raise ConfigError(f"range method {value!r} is unknown; use one of {sorted(METHODS)}")
        try:
            return cls(**params)
        except TypeError as e:
            raise ConfigError(f"range method {value!r}: {e}") from None
    if not isinstance(value, str):
        if not callable(getattr(value, "fit", None)):
            raise ConfigError(
                f"range method {value!r} is neither a name ({sorted(METHODS)}) nor an object "
                "with fit(stats, grid)"
            )
        return value
    try:
        return METHODS[value.lower()]()
    except KeyError:
        raise ConfigError(
            f"range method {value!r} is unknown; use one of {sorted(METHODS)}"
        ) from None


def range_setter_to_dict(rs: RangeSetter) -> str | dict:
    """``rs`` as configs store it: its name when every parameter has its default (``"mmse"``),
    else ``{"name": ..., **parameters}`` (``{"name": "percentile", "percentile": 99.9}``)."""
    name = getattr(rs, "name", None)
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None or not dataclasses.is_dataclass(rs):
        raise ConfigError(
            f"range method {rs!r} cannot be serialized (not one of {sorted(METHODS)})"
        )
    params = {f.name: getattr(rs, f.name) for f in dataclasses.fields(rs) if f.name != "name"}
    if rs == cls():
        return name
    return {"name": name, **params}
