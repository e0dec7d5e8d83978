"""Streaming histogram statistics: exact counts across range doublings and merges, quantiles,
moments, bounded memory and clear errors."""

import math

import pytest
import torch

from omse.core.stats import DEFAULT_BINS, HistogramStats, merge_in_order
from omse.errors import CalibrationError

torch.set_num_threads(1)


def single(x, bins=64):
    return HistogramStats(bins).update(x)


def streamed(chunks, bins=64):
    h = HistogramStats(bins)
    for c in chunks:
        h.update(c)
    return h


def test_moments_and_extremes():
    x = torch.tensor([-2.0, 0.5, 1.0, 3.0])
    h = single(x)
    assert h.n == 4 and h.min == -2.0 and h.max == 3.0 and h.absmax == 3.0
    assert h.mean == pytest.approx(0.625)
    assert h.var == pytest.approx(float(x.double().var(unbiased=False)))
    assert h.sum_abs == pytest.approx(6.5) and h.sum_4 == pytest.approx(16 + 0.0625 + 1 + 81)
    assert not h.nonnegative and single(x.abs()).nonnegative
    assert h.counts.sum() == 4


def test_radius_is_power_of_two_strictly_above_max():
    for amax, radius in [(3.0, 4.0), (4.0, 8.0), (1.0, 2.0), (0.3, 0.5), (1e-30, 2.0**-99)]:
        h = single(torch.tensor([amax], dtype=torch.float64))
        assert h.radius == radius, amax
        assert h.radius > amax


def test_value_equal_to_a_power_of_two_keeps_its_bin_after_doubling():
    # regression: a value exactly at the old radius used to be clamped into the last bin and then
    # merged into a different bin than a single pass would use
    a, b = torch.tensor([1.0, -0.5]), torch.tensor([3.0])
    assert torch.equal(streamed([a, b], 8).counts, single(torch.cat([a, b]), 8).counts)


def test_range_doubling_is_exact():
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(500, generator=gen) * 10.0**k for k in range(-3, 4)]
    h1 = streamed(chunks, 256)
    h2 = single(torch.cat(chunks), 256)
    assert h1.radius == h2.radius
    assert torch.equal(h1.counts, h2.counts)
    assert torch.allclose(h1.sums, h2.sums, rtol=1e-12, atol=1e-12)
    assert (h1.n, h1.min, h1.max) == (h2.n, h2.min, h2.max)


def test_doubling_from_tiny_and_subnormal_ranges():
    chunks = [
        torch.tensor([1e-320, -3e-321], dtype=torch.float64),
        torch.tensor([1e-200, -1e-150], dtype=torch.float64),
        torch.tensor([2.0, -7.5], dtype=torch.float64),
    ]
    h1, h2 = streamed(chunks, 16), single(torch.cat(chunks), 16)
    assert torch.equal(h1.counts, h2.counts)
    # sign is kept: negative values in the left half, positive in the right half
    h = single(torch.tensor([1e-320, -1e-320], dtype=torch.float64), 8)
    assert h.counts[:4].sum() == 1 and h.counts[4:].sum() == 1


def test_merge_equals_single_pass():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(1000, generator=gen) * 0.1
    b = torch.randn(700, generator=gen) * 50
    c = torch.zeros(30)
    for parts in ([a, b], [b, a], [a, c], [c, b, a], [c, c]):
        merged = HistogramStats(128)
        for p in parts:
            merged = merged.merge(single(p, 128))
        ref = single(torch.cat(parts), 128)
        assert torch.equal(merged.counts, ref.counts)
        assert merged.radius == ref.radius and merged.n == ref.n
        assert (merged.min, merged.max) == (ref.min, ref.max)
        assert merged.sum == pytest.approx(ref.sum, rel=1e-9, abs=1e-9)


def test_merge_leaves_inputs_untouched():
    a, b = single(torch.randn(100)), single(torch.randn(100) * 100)
    ca, cb = a.counts.clone(), b.counts.clone()
    a.merge(b)
    assert torch.equal(a.counts, ca) and torch.equal(b.counts, cb)


def test_merge_rejects_other_bins():
    with pytest.raises(CalibrationError, match="bins"):
        HistogramStats(64).merge(HistogramStats(128))


def test_zeros_only_then_values():
    h = streamed([torch.zeros(10), torch.tensor([1.0, -1.0])], 8)
    assert h.counts[4] == 10 and h.counts.sum() == 12
    assert torch.equal(h.counts, single(torch.tensor([0.0] * 10 + [1.0, -1.0]), 8).counts)
    assert single(torch.zeros(5), 8).radius == 0.0


def test_points_are_bin_centroids():
    x = torch.tensor([0.1, 0.11, 0.9, -0.5])
    v, w = single(x, 4).points()  # radius 1, bins of width 0.5
    assert w.tolist() == [1.0, 2.0, 1.0]
    assert v.tolist() == pytest.approx([-0.5, 0.105, 0.9])
    assert float((v * w).sum()) == pytest.approx(float(x.sum()))


def test_quantile_of_absolute_values():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=gen)
    h = single(x, DEFAULT_BINS)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = float(torch.quantile(x.abs()[:100_000].double(), q))
        assert h.quantile(q) == pytest.approx(exact, rel=0.03)
    assert h.quantile(1.0) <= h.absmax
    assert h.quantile(0.0) >= 0.0


def test_quantile_uniform_is_linear():
    x = torch.linspace(-1, 1, 100_001)[:-1]
    h = single(x, 1024)
    assert h.quantile(0.5) == pytest.approx(0.5, abs=1e-3)
    assert h.quantile(0.25) == pytest.approx(0.25, abs=1e-3)


def test_quantile_needs_data():
    with pytest.raises(CalibrationError, match="no calibration values"):
        HistogramStats().quantile(0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        HistogramStats().update(torch.tensor([1.0, bad]))


def test_huge_values_are_refused_clearly():
    h = HistogramStats(8).update(torch.tensor([1e300], dtype=torch.float64))
    assert math.isfinite(h.radius)
    with pytest.raises(CalibrationError, match="2\\^1022"):
        HistogramStats(8).update(torch.tensor([1.7e308], dtype=torch.float64))


@pytest.mark.parametrize("bins", [0, 2, 6, 12, 258, 3, 4.0, True])
def test_bins_must_be_a_power_of_two(bins):
    with pytest.raises(CalibrationError, match="bins"):
        HistogramStats(bins)


def test_empty_update_is_a_no_op():
    h = HistogramStats(8).update(torch.empty(0))
    assert h.n == 0 and h.radius == 0.0


def test_nbytes_constant_in_the_number_of_updates():
    h = HistogramStats(256)
    before = h.nbytes()
    for k in range(20):
        h.update(torch.randn(1000) * 2.0**k)
    assert h.nbytes() == before == 2 * 256 * 8 + 64


# -- sharded reduction (omse.distributed) ----------------------------------------------------------
_RANK_DATA = {  # ranges 2^-7 .. 2^7 apart: the ranks' histograms double to different radii
    0: lambda g: torch.randn(3000, generator=g) * 1e-2,
    1: lambda g: torch.cat([torch.randn(500, generator=g) * 40, torch.zeros(7)]),
}


def _rank_hist(rank: int, bins: int = 256) -> HistogramStats:
    g = torch.Generator().manual_seed(10 + rank)
    return streamed(_RANK_DATA[rank](g).split(300), bins)


def _stats_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from omse.core.stats import all_reduce_histogram

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.save(all_reduce_histogram(_rank_hist(rank)), f"{out}/hist{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_absorb_in_place_equals_merge_and_leaves_the_other_untouched():
    a, b = _rank_hist(1), _rank_hist(0)  # b's narrower range doubles on a copy
    b_counts = b.counts.clone()
    merged = a.merge(b)
    a.absorb(b)
    assert torch.equal(a.counts, merged.counts) and torch.equal(a.sums, merged.sums)
    assert (a.radius, a.n, a.sum_sq) == (merged.radius, merged.n, merged.sum_sq)
    assert torch.equal(b.counts, b_counts) and b.radius < a.radius


def test_merge_in_order_of_different_ranges_is_the_histogram_of_all_data():
    # brute force: every value binned once at the final radius
    g0, g1 = torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)
    data = torch.cat([_RANK_DATA[0](g0), _RANK_DATA[1](g1)]).double()
    merged = merge_in_order([_rank_hist(0), _rank_hist(1)])
    half = merged.bins // 2
    idx = (data / merged.radius * half).floor().long() + half
    assert torch.equal(merged.counts, torch.bincount(idx, minlength=merged.bins).double())
    sums = torch.zeros(merged.bins, dtype=torch.float64).index_add_(0, idx, data)
    torch.testing.assert_close(merged.sums, sums, rtol=1e-12, atol=1e-15)
    assert merged.radius == 2.0 ** math.frexp(float(data.abs().max()))[1]
    assert (merged.n, merged.min, merged.max) == (data.numel(), data.min(), data.max())
    with pytest.raises(CalibrationError, match="no histograms"):
        merge_in_order([])


def test_all_reduce_across_two_processes_equals_merge_in_rank_order(tmp_path):
    import torch.multiprocessing as mp

    from omse.core.stats import all_reduce_histogram

    mp.spawn(_stats_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    want = merge_in_order([_rank_hist(0), _rank_hist(1)])
    for r in range(2):
        got = torch.load(tmp_path / f"hist{r}.pt", weights_only=False)
        assert torch.equal(got.counts, want.counts) and torch.equal(got.sums, want.sums)
        assert (got.radius, got.n, got.min, got.max) == (want.radius, want.n, want.min, want.max)
        assert (got.sum, got.sum_sq, got.sum_abs, got.sum_4) == (
            want.sum,
            want.sum_sq,
            want.sum_abs,
            want.sum_4,
        )
    h = _rank_hist(0)
    assert all_reduce_histogram(h) is h  # no process group: itself
