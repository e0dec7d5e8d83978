"""The exact solver's new pieces: the separable interval lower bound (brute force), the window
below ``2 * s0`` (level-subset argument, dense grid), device placement, and per-group rows."""

import pytest
import torch

from omse import Grid, mmse_solve
from omse.core.mmse import _Rows32
from omse.core.primitives import quant_error


def _brute_errors(x: torch.Tensor, grid: Grid, steps: torch.Tensor) -> torch.Tensor:
    """Exact errors of rows ``x [S, n]`` at every step ``steps [P]`` -> ``[S, P]`` (float64)."""
    s = steps.reshape(1, -1, 1)
    q = torch.clamp(torch.round(x[:, None, :] / s), grid.qmin, grid.qmax)
    return ((x[:, None, :] - s * q) ** 2).sum(2)


@pytest.mark.parametrize(
    ("bits", "kind"), [(2, "full"), (4, "full"), (4, "unsigned"), (8, "narrow")]
)
def test_interval_lower_bound_is_below_every_step_in_the_interval(bits, kind):
    gen = torch.Generator().manual_seed(bits)
    grid = Grid(bits, kind)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    a = x.abs()
    cap = (x > 0) * float(grid.qmax) + (x < 0) * float(-grid.qmin)
    r32 = _Rows32(a, cap, None)
    top = a.amax(1) / max(grid.qmax, 1)
    for lo_f, hi_f in [(0.05, 0.2), (0.5, 0.55), (0.9, 1.0), (1.0, 3.0), (0.99, 1.01)]:
        lo, hi = top * lo_f, top * hi_f
        lb = r32.interval_lb(lo, hi)
        steps = torch.linspace(0.0, 1.0, 2001, dtype=torch.float64)
        for i in range(x.shape[0]):
            s = lo[i] + (hi[i] - lo[i]) * steps
            e = _brute_errors(x[i : i + 1], grid, s)[0]
            assert lb[i] <= e.min() * (1 + 1e-12) + 1e-300
            # not vacuous: on a 2% interval at <= 4 bits it holds most of the error
            if lo_f == 0.99 and bits <= 4:
                assert lb[i] >= 0.5 * e.min()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_optimum_lies_below_twice_the_unclipped_step(bits):
    """E(m s) >= E(s) for unclipped s, so steps above 2 * s0 never beat the solver's answer."""
    gen = torch.Generator().manual_seed(100 + bits)
    grid = Grid(bits, "full")
    x = torch.randn(5, 33, generator=gen, dtype=torch.float64)
    res = mmse_solve(x, grid)
    s0 = torch.maximum(
        x.clamp(min=0).amax(1) / (grid.qmax + 0.5), (-x).clamp(min=0).amax(1) / (-grid.qmin + 0.5)
    )
    for i in range(5):
        steps = s0[i] * torch.linspace(2.0, 9.0, 3000, dtype=torch.float64)
        e = _brute_errors(x[i : i + 1], grid, steps)[0]
        assert res.sse[i] <= e.min() * (1 + 1e-9)


def _per_group_case(device: str) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(400, 32, generator=gen, dtype=torch.float64)
    x[::7] *= 1e-4
    x[3] = 0.0
    for bits in (2, 4, 8):
        grid = Grid(bits, "full")
        res = mmse_solve(x.to(device), grid)
        assert res.scale.device.type == device and res.sse.device.type == device
        sc, se = res.scale.cpu(), res.sse.cpu()
        assert torch.allclose(se, quant_error(x, sc, grid), rtol=1e-9, atol=1e-30)
        # every row at least as good as a dense grid of 3000 steps over (0, 1.2 max|x|/qmax]
        top = x.abs().amax(1).clamp_min(1e-30) / grid.qmax
        steps = torch.linspace(1e-3, 1.2, 3000, dtype=torch.float64)
        q = torch.clamp(
            torch.round(x[:, None, :] / (top[:, None, None] * steps[None, :, None])),
            grid.qmin,
            grid.qmax,
        )
        dense = ((x[:, None, :] - top[:, None, None] * steps[None, :, None] * q) ** 2).sum(2)
        assert (se <= dense.amin(1) * (1 + 1e-9) + 1e-30).all()


def test_per_group_rows_on_cpu():
    _per_group_case("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_group_rows_on_cuda():
    _per_group_case("cuda")
