"""Range setters: every method returns positive finite steps; ACIQ's analytic optimum matches the

MMSE oracles; MMSE is never worse than the others."""

import csv
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

from omse.core.grids import Grid
from omse.core.primitives import quant_error
from omse.core.ranges import (
    ACIQ,
    METHODS,
    MMSE,
    MinMax,
    Percentile,
    _unit_optimum,
    fit_affine,
    make_range_setter,
)
from omse.core.stats import HistogramStats
from omse.errors import CalibrationError, ConfigError

torch.set_num_threads(1)

ORACLES = Path(__file__).parents[1] / "data" / "mmse_oracles.csv"
SETTERS = [MinMax(), Percentile(), Percentile(99.0), ACIQ(), ACIQ("laplace"), ACIQ("gauss"), MMSE()]
GRIDS = [Grid(4), Grid(3, "narrow"), Grid(8), Grid(4, "unsigned"), Grid(2)]


def _data(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 300, generator=gen, dtype=torch.float64)
    return {
        "gauss": x,
        "heavy": x**3,
        "relu": x.clamp(min=0),
        "zeros": torch.zeros(5, 300, dtype=torch.float64),
        "constant": torch.full((5, 300), -0.25, dtype=torch.float64),
        "one": x[:, :1],
        "mixed_rows": torch.cat([x[:2], torch.zeros(1, 300, dtype=torch.float64), x[3:] * 1e6]),
    }[kind]


KINDS = ["gauss", "heavy", "relu", "zeros", "constant", "one", "mixed_rows"]


@pytest.mark.parametrize("setter", SETTERS, ids=lambda s: f"{s.name}")
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_slices_give_positive_finite_steps(setter, grid, kind):
    x = _data(kind)
    s = setter.fit(x, grid)
    assert s.shape == (x.shape[0],)
    assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("setter", SETTERS, ids=lambda s: f"{s.name}")
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_histograms_give_positive_finite_step(setter, grid, kind):
    h = HistogramStats(512).update(_data(kind))
    s = setter.fit(h, grid)
    assert s.dim() == 0 and torch.isfinite(s) and s > 0


@pytest.mark.parametrize("setter", SETTERS, ids=lambda s: f"{s.name}")
def test_empty_histogram_is_a_calibration_error(setter):
    with pytest.raises(CalibrationError, match="no calibration values"):
        setter.fit(HistogramStats(), Grid(4))


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_minmax_never_clips(grid):
    x = _data("heavy")
    s = MinMax().fit(x, grid)
    lo = x.min(1).values / s
    hi = x.max(1).values / s
    assert (hi <= grid.qmax + 1e-9).all()
    if grid.signed:
        assert (lo >= grid.qmin - 1e-9).all()


def test_minmax_histogram_matches_slices():
    x = _data("gauss")
    for grid in GRIDS:
        hs = MinMax().fit(HistogramStats(512).update(x), grid)
        ts = MinMax().fit(x.reshape(1, -1), grid)
        assert float(hs) == pytest.approx(float(ts[0]), rel=1e-12)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("kind", ["gauss", "heavy", "relu", "mixed_rows"])
def test_mmse_error_is_lowest(grid, kind):
    x = _data(kind)
    e_mmse = quant_error(x, MMSE().fit(x, grid), grid)
    for setter in SETTERS:
        e = quant_error(x, setter.fit(x, grid), grid)
        assert (e_mmse <= e * (1 + 1e-9) + 1e-12).all(), setter


def test_histogram_mmse_close_to_exact():
    x = _data("heavy").reshape(1, -1)
    grid = Grid(4)
    exact = MMSE().fit(x, grid)
    approx = MMSE().fit(HistogramStats(4096).update(x), grid)
    e_exact = quant_error(x, exact, grid)
    e_approx = quant_error(x, approx.reshape(1), grid)
    assert float(e_approx) <= float(e_exact) * 1.02


def _oracle_steps():
    with ORACLES.open() as f:
        return {
            (r["distribution"], r["grid"], int(r["bits"])): float(r["step"])
            for r in csv.DictReader(f)
        }


@pytest.mark.parametrize("family", ["gauss", "laplace"])
@pytest.mark.parametrize("kind", ["full", "narrow"])
def test_aciq_unit_optimum_matches_oracle(family, kind):
    want = _oracle_steps()[(family, kind, 4)]
    assert _unit_optimum(family, Grid(4, kind)) == pytest.approx(want, rel=0.02)


def test_aciq_unit_optimum_relu_gauss_matches_oracle():
    want = _oracle_steps()[("relu_gauss", "unsigned", 4)]
    assert _unit_optimum("gauss", Grid(4, "unsigned")) == pytest.approx(want, rel=0.02)


def test_aciq_scales_with_spread():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(1, 200_000, generator=gen, dtype=torch.float64)
    s = ACIQ("gauss").fit(g * 3.0, Grid(4))
    assert float(s) == pytest.approx(3.0 * _unit_optimum("gauss", Grid(4)), rel=0.01)
    # auto picks the Gaussian for Gaussian data and the Laplace for Laplace data
    assert float(ACIQ().fit(g, Grid(4))) == pytest.approx(float(ACIQ("gauss").fit(g, Grid(4))))
    u = torch.rand(1, 200_000, generator=gen, dtype=torch.float64) - 0.5
    lap = -torch.sign(u) * torch.log1p(-2 * u.abs())
    assert float(ACIQ().fit(lap, Grid(4))) == pytest.approx(
        float(ACIQ("laplace").fit(lap, Grid(4)))
    )


def test_percentile_clips_at_quantile():
    x = torch.linspace(-1, 1, 10_001, dtype=torch.float64).reshape(1, -1)
    s = Percentile(50.0).fit(x, Grid(4))
    assert float(s) == pytest.approx(0.5 / 7, rel=1e-3)


@pytest.mark.parametrize("p", [0.0, -1.0, 100.5])
def test_percentile_validation(p):
    with pytest.raises(ConfigError, match="percentile"):
        Percentile(p)


def test_make_range_setter():
    for name, cls in METHODS.items():
        assert isinstance(make_range_setter(name), cls)
        assert isinstance(make_range_setter(name.upper()), cls)
    s = MMSE()
    assert make_range_setter(s) is s
    with pytest.raises(ConfigError, match="range method 'l2'"):
        make_range_setter("l2")


def test_tiny_magnitudes_keep_their_own_step():
    """Data of magnitude 1e-13 gets a step of that order, not the all-zero fallback of 1."""
    from omse.core.grids import Grid
    from omse.core.ranges import MMSE, MinMax

    x = torch.tensor([[1e-13, -3e-13, 2e-13, 5e-14]], dtype=torch.float64)
    for setter in (MMSE(), MinMax()):
        s = setter.fit(x, Grid(4))
        assert 1e-15 < float(s[0]) < 1e-12


def _hist(x: torch.Tensor) -> HistogramStats:
    st = HistogramStats(4096)
    st.update(x)
    return st


def _sse(v, w, s, g):
    s = s.to(torch.float64)
    return float((((v - torch.clamp(torch.round(v / s), g.qmin, g.qmax) * s) ** 2) * w).sum())


def test_fit_affine_is_the_best_zero_point_and_beats_the_signed_grid():
    torch.manual_seed(0)
    x = torch.nn.functional.hardswish(torch.randn(20000) * 2)  # skewed: [-0.375, ~8]
    st = _hist(x)
    v, w = (t.to(torch.float64) for t in st.points())
    s, g = fit_affine(MMSE(), st, 8)
    assert g.kind == "unsigned" and 0 < g.zero_point < 40  # most codes for the positive side
    best = _sse(v, w, s, g)
    for z in range(1, 255):  # brute force over the zero point, MMSE step each
        gz = Grid(8, "unsigned", z)
        assert best <= _sse(v, w, MMSE().fit(st, gz), gz) + 1e-12
    full = Grid(8)
    assert best < 0.5 * _sse(v, w, MMSE().fit(st, full), full)  # a signed grid wastes a bit
    # the fitted quantizer is no worse than the signed grid on the raw values either
    xa = torch.clamp(torch.round(x / s), g.qmin, g.qmax) * s
    sf = MMSE().fit(st, full)
    xf = torch.clamp(torch.round(x / sf), full.qmin, full.qmax) * sf
    assert ((x - xa) ** 2).sum() < ((x - xf) ** 2).sum()


def test_fit_affine_non_negative_and_minmax():
    st = _hist(torch.rand(1000) * 3)
    s, g = fit_affine(MMSE(), st, 4)
    assert g == Grid(4, "unsigned") and torch.equal(s, MMSE().fit(st, Grid(4, "unsigned")))
    st = _hist(torch.linspace(-1.0, 3.0, 1001))
    s, g = fit_affine(MinMax(), st, 8)  # nothing clipped: both ends inside the grid
    assert g.qmin * float(s) <= -1.0 + 1e-6 and g.qmax * float(s) >= 3.0 - 1e-6
    assert abs(g.zero_point - 64) <= 1  # 1/4 of the range below zero
    with pytest.raises(ConfigError, match="histograms"):
        fit_affine(MMSE(), torch.randn(2, 5), 8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_fit_affine_batched_steps_equal_one_solve_per_zero_point(bits, threads):
    """The zero points' steps come from one call of the sweep (per-row grids): bit for bit the
    steps of one MMSE solve per zero point, whatever the threads."""
    from omse.core.mmse import mmse_solve_grids

    torch.manual_seed(bits)
    x = torch.nn.functional.silu(torch.randn(30000) * 3) * torch.rand(30000)
    st = _hist(x)
    v, w = st.points()
    grids = [Grid(bits, "unsigned", z) for z in range(1, 2**bits - 1)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batched = mmse_solve_grids(v, w, grids).scale
    finally:
        torch.set_num_threads(before)
    one_by_one = torch.stack([MMSE().fit(st, g) for g in grids])
    assert torch.equal(batched.to(one_by_one.dtype), one_by_one)
    s, g = fit_affine(MMSE(), st, bits)
    k = g.zero_point - 1
    assert torch.equal(s, one_by_one[k])


def _exhaustive_affine(st: HistogramStats, bits: int) -> tuple[torch.Tensor, Grid]:
    """The oracle: every zero point's exact MMSE step, the least error (smallest z on a tie)."""
    v, w = (t.to(torch.float64) for t in st.points())
    best = None
    for z in range(1, 2**bits - 1):
        g = Grid(bits, "unsigned", z)
        s = MMSE().fit(st, g)
        e = _sse(v, w, s, g)
        if best is None or e < best[0]:
            best = (e, s, g)
    return best[1], best[2]


SHAPES = {  # activation-like distributions with a negative part: one basin, skewed, two modes
    "silu": lambda x, u: torch.nn.functional.silu(x * 3),
    "hardswish": lambda x, u: torch.nn.functional.hardswish(x * 2),
    "gelu_scaled": lambda x, u: torch.nn.functional.gelu(x * 4) * u,
    "gauss": lambda x, u: x,
    "laplace_shift": lambda x, u: torch.sign(x) * torch.log1p(x.abs() * 5) + 0.7,
    "two_modes": lambda x, u: torch.where(u < 0.3, x * 0.2 - 2.0, x * 0.5 + 3.0),
    "leaky": lambda x, u: torch.nn.functional.leaky_relu(x * 2, 0.1),
}


@settings(max_examples=40, deadline=None)
@given(
    shape=hst.sampled_from(sorted(SHAPES)),
    seed=hst.integers(0, 2**16),
    n=hst.integers(200, 20000),
    bits=hst.sampled_from([6, 7, 8]),
)
def test_fit_affine_search_finds_the_exhaustive_zero_point(shape, seed, n, bits):
    """The coarse-to-fine zero-point search returns the exhaustive search's step and grid."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    st_ = _hist(SHAPES[shape](x, u).float())
    if st_.nonnegative:
        return
    s, g = fit_affine(MMSE(), st_, bits)
    so, go = _exhaustive_affine(st_, bits)
    assert g == go and torch.equal(s, so)
