"""Streaming histogram statistics: exact counts across range doublings and merges, quantiles,
moments, bounded memory and clear errors."""

import math

import numpy as np
import pytest
import torch
from benchmark_loader import load_benchmark
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omse.core.stats as stats_module
from omse.core.stats import DEFAULT_BINS, DeferredBinning, HistogramStats, merge_in_order
from omse.errors import CalibrationError, NonFiniteError

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


# -- the compiled update against the torch implementation it replaced ---------------------------
def _reference_update(h: HistogramStats, x: torch.Tensor) -> HistogramStats:
    """``HistogramStats.update`` before the compiled kernel (commit cbf1438), verbatim: the
    reference the kernel's counts and per-bin sums must equal bit for bit."""
    v = x.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return h
    lo, hi = torch.aminmax(v)
    vmin, vmax = float(lo), float(hi)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise CalibrationError("calibration values contain NaN or Inf")
    amax = max(abs(vmin), abs(vmax))
    if amax >= h.radius:
        h._grow_to(amax)
    h.n += v.numel()
    h.min, h.max = min(h.min, vmin), max(h.max, vmax)
    h.sum += float(v.sum())
    v2 = v * v
    h.sum_sq += float(v2.sum())
    h.sum_abs += float(v.abs().sum())
    h.sum_4 += float((v2 * v2).sum())
    if h.radius > 0:
        half = h.bins // 2
        idx = (v / h.radius).mul_(half).floor_().long().add_(half)
        idx = idx.clamp_(0, h.bins - 1)
        h.counts += torch.bincount(idx, minlength=h.bins).to(torch.float64)
        h.sums.index_add_(0, idx, v)
    else:
        h.counts[h.bins // 2] += v.numel()
    return h


MOMENTS_RTOL = 1e-12  # the kernel's moments against torch's sums (float64 rounding only)


def assert_same(new: HistogramStats, ref: HistogramStats) -> None:
    """Counts, per-bin sums, range, n and extremes equal; moments to float64 rounding."""
    assert torch.equal(new.counts, ref.counts)
    assert torch.equal(new.sums, ref.sums)
    assert (new.radius, new.n, new.min, new.max) == (ref.radius, ref.n, ref.min, ref.max)
    for m in ("sum", "sum_sq", "sum_abs", "sum_4"):
        a, b = getattr(new, m), getattr(ref, m)
        scale = max(abs(b), ref.sum_abs if m == "sum" else 0.0)  # sum may cancel to ~0
        assert abs(a - b) <= MOMENTS_RTOL * scale + 1e-300, (m, a, b)


def both(chunks, bins=4096):
    new, ref = HistogramStats(bins), HistogramStats(bins)
    for c in chunks:
        new.update(c)
        _reference_update(ref, c)
    return new, ref


def test_compiled_path_is_used_on_cpu():
    from omse.core.stats import _kernels

    assert _kernels() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_equals_the_torch_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 33, 31, generator=g) * 3.0
    chunks = [
        x.to(dtype),
        x.clamp(min=0).to(dtype),  # ReLU: half zeros
        (x * 1e-3).to(dtype),  # inside the range: no doubling
        (x * 40.0).to(dtype),  # doubling
        torch.zeros(100, dtype=dtype),
        x.clamp(0, 6).to(dtype),  # many values exactly at 6
    ]
    assert_same(*both(chunks))
    assert_same(*both(chunks[::-1], bins=64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_of_a_large_tensor_equals_the_torch_reference(dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3_000_000, generator=g) * 2.0).to(dtype)
    assert_same(*both([x, x.abs() * 5]))


def test_update_of_non_contiguous_and_integer_inputs():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 12, 10, generator=g)
    for v in (x.transpose(0, 2), x[:, ::3], x.expand(2, 8, 12, 10), -x, x[..., 1], x.conj()):
        assert_same(*both([v]))
    assert_same(*both([torch.arange(-50, 70), torch.tensor([True, False])]))
    assert_same(*both([torch.zeros(10), torch.tensor([1e-320, -3e-321], dtype=torch.float64)], 16))


def test_update_keeps_gradients_untouched():
    x = torch.randn(100, requires_grad=True)
    assert_same(*both([x * 2]))
    assert x.grad is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_values_raise_and_leave_the_histogram_untouched(bad, dtype):
    from omse.errors import NonFiniteError

    h = single(torch.randn(50), 64)
    before = (h.counts.clone(), h.sums.clone(), h.n, h.sum, h.radius)
    x = torch.randn(1000).to(dtype)
    x[500] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        h.update(x)
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        _reference_update(HistogramStats(64), x)
    assert torch.equal(h.counts, before[0]) and torch.equal(h.sums, before[1])
    assert (h.n, h.sum, h.radius) == before[2:]


def test_torch_path_equals_the_compiled_path(monkeypatch):
    """The fallback (no numba, or tensors on another device) bins as the kernel does."""
    import omse.core.stats as stats

    g = torch.Generator().manual_seed(7)
    chunks = [torch.randn(5000, generator=g) * 10.0**k for k in (-2, 0, 3)] + [torch.zeros(9)]
    compiled = HistogramStats(256)
    for c in chunks:
        compiled.update(c)
    monkeypatch.setattr(stats, "_KERNEL", [None])
    fallback, ref = both(chunks, 256)
    assert_same(fallback, ref)
    assert_same(compiled, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_take_the_torch_path():
    g = torch.Generator().manual_seed(8)
    chunks = [torch.randn(10_000, generator=g) * 10.0**k for k in (-1, 2)]
    h = HistogramStats(256)
    for c in chunks:
        h.update(c.cuda())
    assert_same(h, both(chunks, 256)[1])


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(1, 7), min_size=1, max_size=4), min_size=1, max_size=4),
    scales=st.lists(
        st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 3.0, 1e4, 1e30]), min_size=4, max_size=4
    ),
    dtype=st.sampled_from(_DTYPES),
    nonneg=st.booleans(),
    bins=st.sampled_from([4, 64, 4096]),
    seed=st.integers(0, 2**16),
)
def test_update_equals_the_torch_reference_property(shapes, scales, dtype, nonneg, bins, seed):
    """Random shapes, dtypes, signs and magnitudes; ranges grow (and shrink) across updates."""
    g = torch.Generator().manual_seed(seed)
    new, ref = HistogramStats(bins), HistogramStats(bins)
    for k, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * scales[k]
        x = (x.abs() if nonneg else x).to(dtype)
        if not torch.isfinite(x).all():
            continue  # beyond float16's range: not a finite input
        new.update(x)
        _reference_update(ref, x)
    assert_same(new, ref)


# -- the compiled kernels against the implementations they replaced ------------------------------


_REF = load_benchmark("kernels_1a53d9c")  # the kernels of commit 1a53d9c, verbatim
_moments_1a53d9c, _bins_1a53d9c = _REF.moments_1a53d9c, _REF.bins_1a53d9c


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.int64)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.sampled_from([1, 2, 7, 2047, 2048, 2049, 4096, 5000, 20_000]),
    dtype=st.sampled_from([np.float32, np.float64]),
    zeros=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    negative_zeros=st.booleans(),
    bins=st.sampled_from([4, 64, 4096]),
    prior=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_previous_kernel_bit_for_bit(
    n, dtype, zeros, negative_zeros, bins, prior, seed
):
    """``bin_values`` (chunked index pass, zeros only counted) gives the counts and per-bin sums
    of the previous serial kernel, bit for bit, and ``scan_values`` its moments: on ReLU-like
    data with runs of zeros of either sign, onto empty histograms and onto histograms already
    holding values."""
    from omse.core.binning import bin_values, scan_values

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4)
    x[rng.random(n) < zeros] = -0.0 if negative_zeros else 0.0
    x = x.astype(dtype)
    amax = float(np.abs(x).max())
    radius = math.ldexp(1.0, math.frexp(amax)[1]) if amax > 0 else 1.0
    start_c = np.zeros(bins)
    start_s = np.zeros(bins)
    if prior:  # values of earlier batches in every bin, the middle one included
        start_c[:] = rng.integers(1, 5, bins)
        start_s[:] = rng.standard_normal(bins)
    c, s, m = start_c.copy(), start_s.copy(), np.zeros(4)
    bin_values(x, radius, c, s)
    vmin, vmax, finite = scan_values(x, None, m)
    assert finite and (vmin, vmax) == (float(x.min()), float(x.max()))
    c0, s0, m0 = start_c.copy(), start_s.copy(), np.zeros(4)
    _moments_1a53d9c(x, m0)
    _bins_1a53d9c(x, radius, c0, s0)
    assert np.array_equal(c, c0)
    assert np.array_equal(_bits(s), _bits(s0))
    # the scan sums the moments in lanes of its own (it reads the extremes in the same loop):
    # within float64 rounding of the previous kernel's, not bit for bit
    np.testing.assert_allclose(m, m0, rtol=1e-13, atol=0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.sampled_from([1, 3, 4095, 4096, 4097, 9000]),
    dtype=st.sampled_from([np.float32, np.float64]),
    clamp=st.sampled_from([None, (-0.3, 2.0), (0.0, 6.0), (1.0, 1.5), (-5.0, -1.0)]),
    special=st.sampled_from(["none", "zeros", "-zeros", "nan", "inf", "-inf"]),
    seed=st.integers(0, 2**16),
)
def test_scan_and_clamped_bins_equal_numpy_clip_then_the_previous_kernel(
    n, dtype, clamp, special, seed
):
    """``scan_values`` (one read: extremes from the values' bit patterns as ordered integers,
    finiteness, moments) and ``bin_values`` with a clamp give what ``numpy.clip`` (bounds
    rounded to the dtype) then ``min``/``max`` and the previous serial binning give, bit for bit,
    and the previous moments within float64 rounding; NaN is refused with or without a clamp, an infinity only
    without one (a clamp takes it to its bound, as ``clip`` does)."""
    from omse.core.binning import bin_values, scan_values

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-2, 2)).astype(dtype)
    fill = {"zeros": 0.0, "-zeros": -0.0, "nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    if special in fill:
        x[rng.random(n) < 0.3] = fill[special]
        x[rng.integers(n)] = fill[special]
    ref = x if clamp is None else np.clip(x, dtype(clamp[0]), dtype(clamp[1]))
    m = np.zeros(4)
    vmin, vmax, finite = scan_values(x, clamp, m)
    bad = special == "nan" or (special in ("inf", "-inf") and clamp is None)
    assert finite == (not bad)
    if bad:
        return
    assert (vmin, vmax) == (float(ref.min()), float(ref.max()))
    m0 = np.zeros(4)
    _moments_1a53d9c(ref, m0)
    np.testing.assert_allclose(m, m0, rtol=1e-13, atol=0)
    amax = max(abs(vmin), abs(vmax))
    radius = math.ldexp(1.0, math.frexp(amax)[1]) if amax > 0 else 1.0
    c, s = np.zeros(256), np.zeros(256)
    bin_values(x, radius, c, s, clamp)
    c0, s0 = np.zeros(256), np.zeros(256)
    _bins_1a53d9c(ref, radius, c0, s0)
    assert np.array_equal(c, c0)
    assert np.array_equal(_bits(s), _bits(s0)) or np.array_equal(s, s0)  # -0.0 sums: see above


def test_zeros_are_counted_in_the_middle_bin_and_leave_its_sum():
    from omse.core.binning import bin_values, scan_values

    x = np.array([0.0, -0.0, 0.25, 0.0, -0.25, -0.0, 0.0], np.float32)
    c, s, m = np.zeros(8), np.zeros(8), np.zeros(4)
    bin_values(x, 1.0, c, s)  # bins of width 1/4: 0.25 -> bin 5, -0.25 -> bin 3
    assert c.tolist() == [0, 0, 0, 1, 5, 1, 0, 0]
    assert s.tolist() == [0, 0, 0, -0.25, 0, 0.25, 0, 0]
    assert not np.signbit(s[4])
    scan_values(x, None, m)
    assert m.tolist() == [0.0, 0.125, 0.5, 2 * 0.25**4]
    # a middle-bin sum of -0.0 (never reached by adding values: set by hand) is left to the
    # serial additions, which turn it into +0.0 as the torch path does
    c, s = np.zeros(8), np.zeros(8)
    s[4] = -0.0
    bin_values(np.array([0.0], np.float32), 1.0, c, s)
    assert c[4] == 1 and not np.signbit(s[4])


def _torch_absorb(a: HistogramStats, b: HistogramStats) -> HistogramStats:
    """``a.absorb(b)`` by the torch path."""
    a._absorb_bins_torch(b)
    a.n += b.n
    a.min, a.max = min(a.min, b.min), max(a.max, b.max)
    a.sum, a.sum_sq = a.sum + b.sum, a.sum_sq + b.sum_sq
    a.sum_abs, a.sum_4 = a.sum_abs + b.sum_abs, a.sum_4 + b.sum_4
    return a


def _copy(h: HistogramStats) -> HistogramStats:
    out = HistogramStats(h.bins, h.radius, h.counts.clone(), h.sums.clone())
    out.n, out.min, out.max = h.n, h.min, h.max
    out.sum, out.sum_sq, out.sum_abs, out.sum_4 = h.sum, h.sum_sq, h.sum_abs, h.sum_4
    return out


def _bit_equal(a: HistogramStats, b: HistogramStats) -> bool:
    return (
        torch.equal(a.counts, b.counts)
        and torch.equal(a.sums.view(torch.int64), b.sums.view(torch.int64))
        and (a.radius, a.n, a.min, a.max) == (b.radius, b.n, b.min, b.max)
        and (a.sum, a.sum_sq, a.sum_abs, a.sum_4) == (b.sum, b.sum_sq, b.sum_abs, b.sum_4)
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scales=st.lists(st.sampled_from([0.0, 1e-3, 1.0, 7.0, 1e3]), min_size=2, max_size=5),
    bins=st.sampled_from([4, 64, 4096]),
    seed=st.integers(0, 2**16),
)
def test_compiled_absorb_equals_the_torch_absorb(scales, bins, seed):
    """Folding per-batch histograms into a total (as ``collect`` does, in batch order) with the
    compiled merge gives the torch path's total bit for bit: ranges growing and shrinking,
    zero-only and empty histograms on either side; the absorbed histogram is left untouched."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for k, scale in enumerate(scales):
        h = HistogramStats(bins)
        if k % 3 != 2 or scale == 0.0:  # some empty ones
            h.update(torch.randn(300, generator=g) * scale)
        parts.append(h)
    compiled, reference = HistogramStats(bins), HistogramStats(bins)
    for p in parts:
        before = _copy(p)
        compiled.absorb(p)
        _torch_absorb(reference, p)
        assert _bit_equal(p, before)
    assert _bit_equal(compiled, reference)
    assert compiled.counts.sum() == sum(p.n for p in parts)


def test_absorb_of_itself_doubles_every_bin():
    h = single(torch.tensor([-1.5, 0.25, 0.25, 3.0]), 16)
    ref = _torch_absorb(_copy(h), _copy(h))
    assert _bit_equal(h.absorb(h), ref)
    assert h.n == 8 and h.counts.sum() == 8


@pytest.mark.parametrize(
    "scale,radius",
    [
        (1e-310, 2.0**-1027),  # 1/R overflows: the serial loop bins
        (1e-300, 2.0**-995),
        (1e307, 2.0**1023),  # 1/R = 2^-1023, subnormal and exact
        (3.0, 4.0),
    ],
)
def test_kernel_at_the_extremes_of_the_range_equals_the_previous_kernel(scale, radius):
    from omse.core.binning import bin_values

    rng = np.random.default_rng(3)
    x = np.clip(rng.standard_normal(5000) * scale / 4, -radius / 2, radius / 2)
    x[::3] = 0.0
    c, s = np.zeros(64), np.zeros(64)
    bin_values(x, radius, c, s)
    c0, s0 = np.zeros(64), np.zeros(64)
    _bins_1a53d9c(x, radius, c0, s0)
    assert np.array_equal(c, c0) and np.array_equal(_bits(s), _bits(s0))
    assert c.sum() == 5000 and c[32] >= 5000 // 3


# -- deferred binning -----------------------------------------------------------------------------


def _state(h: HistogramStats) -> tuple:
    """Everything a histogram holds, bit for bit (floats by their bits)."""
    return (
        h.radius,
        h.n,
        h.min,
        h.max,
        h.sum.hex(),
        h.sum_sq.hex(),
        h.sum_abs.hex(),
        h.sum_4.hex(),
        h.counts.numpy().tobytes(),
        h.sums.numpy().tobytes(),
    )


def _passes(seed: int, n_hists: int = 5, n_passes: int = 3) -> list[list[tuple[int, torch.Tensor]]]:
    """Per pass, updates ``(histogram index, values)``: several per histogram, ranges that grow
    within and across passes, float32 and float64, zeros, a non-contiguous view."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in range(n_passes):
        ups = []
        for k in range(n_hists * 3):
            x = torch.randn(int(torch.randint(1, 5000, (1,), generator=gen)), generator=gen)
            x = x * 10.0 ** float(torch.randint(-3, 4, (1,), generator=gen)) * (p + 1)
            if k % 4 == 1:
                x = x.double()
            if k % 5 == 2:
                x = torch.relu(x)
            if k % 7 == 3:
                x = torch.randn(40, 30, generator=gen).t()
            ups.append((k % n_hists, x))
        out.append(ups)
    return out


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_deferred_binning_equals_updates_in_order_bit_for_bit(workers, seed):
    passes = _passes(seed)
    ref = [HistogramStats(256) for _ in range(5)]
    for ups in passes:
        for i, x in ups:
            ref[i].update(x)
    got = [HistogramStats(256) for _ in range(5)]
    with DeferredBinning(workers) as d:
        for ups in passes:
            for i, x in ups:
                got[i].update(x)
            assert all(h.n == 0 for h in got) or d._futures == []  # nothing binned during a pass
            assert d.submit()
            d.wait()
    assert [_state(h) for h in got] == [_state(h) for h in ref]


def test_deferred_values_changed_in_place_make_the_pass_run_again():
    x = torch.randn(1000)
    h, ref = HistogramStats(128), HistogramStats(128).update(x.clone())
    with DeferredBinning(2) as d:
        h.update(x)
        x.mul_(2.0)  # the model changes the observed tensor after it was queued (exactly)
        assert not d.submit()
        assert h.n == 0  # nothing of the pass was binned
        x.div_(2.0)
        with d.paused():
            h.update(x)  # bins at once
            assert h.n == 1000
        assert d.submit()
    assert _state(h) == _state(ref)


def test_deferred_binning_past_its_memory_bound_bins_the_rest_at_once():
    passes = _passes(3, n_passes=1)
    ref = [HistogramStats(256) for _ in range(5)]
    got = [HistogramStats(256) for _ in range(5)]
    for i, x in passes[0]:
        ref[i].update(x)
    with DeferredBinning(2, max_bytes=20_000) as d:
        for k, (i, x) in enumerate(passes[0]):
            got[i].update(x)
            if k == len(passes[0]) - 1:
                assert d._mode == "direct"
        assert d.submit()
    assert [_state(h) for h in got] == [_state(h) for h in ref]


def test_deferred_binning_past_its_bound_with_a_changed_value_drops_the_pass():
    x, y = torch.randn(3000), torch.randn(3000)
    h = HistogramStats(64)
    with DeferredBinning(1, max_bytes=16_000) as d:
        h.update(x)
        x.mul_(2.0)
        h.update(y)  # past the bound: the queue is checked, x changed
        h.update(y)  # dropped: the pass runs again
        assert h.n == 0 and not d.submit()


def test_deferred_binning_past_its_bound_with_a_nan_drops_the_pass():
    """Past the memory bound the queue bins at once; a NaN met there makes the pass run again
    (binning at once, where the first NaN raises in the forward's order), not an error from an
    unrelated later update."""
    h = HistogramStats(64)
    with DeferredBinning(1, max_bytes=16_000) as d:
        h.update(torch.tensor([1.0, float("nan")]))
        h.update(torch.randn(5000))  # past the bound: the queue is binned, the NaN found
        h.update(torch.randn(10))  # dropped: the pass runs again
        assert not d.submit()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_deferred_non_finite_values_raise_from_wait_after_every_bin_is_in(bad, workers):
    """The workers check finiteness as they bin (the calling thread reads nothing): the error
    comes from ``wait``, once every other histogram of the submission is binned (the worker
    that met it goes on with the others)."""
    h, g = HistogramStats(64), HistogramStats(64)
    with DeferredBinning(workers) as d:
        h.update(torch.ones(3))
        h.update(torch.tensor([1.0, bad]))  # queued, not read
        g.update(torch.ones(5))
        assert h.n == 0
        assert d.submit()
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            d.wait()
        assert g.n == 5 and d._futures == []
    # the clamp does not hide a NaN (torch.clamp keeps it), and bounds an Inf as torch does
    with DeferredBinning(1) as d:
        h2 = HistogramStats(64)
        h2.update(torch.tensor([1.0, bad]), (-2.0, 2.0))
        assert d.submit()
        if bad != bad:
            with pytest.raises(NonFiniteError):
                d.wait()
        else:
            d.wait()
            assert h2.n == 2
            assert (h2.min, h2.max) == ((1.0, 2.0) if bad > 0 else (-2.0, 1.0))


@pytest.mark.parametrize("workers", [1, 2])
def test_deferred_clamps_equal_torch_clamp_bit_for_bit(workers):
    """``update(x, (lo, hi))`` bins what ``update(x.clamp(lo, hi))`` bins, deferred or not:
    float32 values against bounds float32 cannot hold (rounded as torch rounds them), float64
    values, one-sided bounds, a non-contiguous view."""
    gen = torch.Generator().manual_seed(3)
    cases = [
        (torch.randn(5000, generator=gen) * 3, (-0.1, 6.0)),
        (torch.randn(3000, generator=gen).double() * 3, (-0.1, 6.0)),
        (torch.randn(4000, generator=gen) * 1e3, (0.0, float("inf"))),
        (torch.randn(4000, generator=gen), (-float("inf"), 1.0 / 3.0)),
        (torch.randn(60, 50, generator=gen).t() * 7, (-6.0, 6.0)),
    ]
    ref = [HistogramStats(256) for _ in cases]
    direct = [HistogramStats(256) for _ in cases]
    got = [HistogramStats(256) for _ in cases]
    for h, (x, c) in zip(ref, cases, strict=True):
        h.update(x.clamp(*c))
    for h, (x, c) in zip(direct, cases, strict=True):
        h.update(x, c)
    with DeferredBinning(workers) as d:
        for h, (x, c) in zip(got, cases, strict=True):
            h.update(x, c)
        assert all(h.n == 0 for h in got)
        assert d.submit()
    assert [_state(h) for h in got] == [_state(h) for h in ref] == [_state(h) for h in direct]


def test_inference_tensors_and_other_threads_bin_at_once():
    import threading

    h, g = HistogramStats(64), HistogramStats(64)
    with DeferredBinning(2) as d:
        with torch.inference_mode():
            h.update(torch.randn(10))
        assert h.n == 10
        t = threading.Thread(target=lambda: g.update(torch.randn(7)))
        t.start()
        t.join()
        assert g.n == 7
        assert d.submit()


def test_deferred_binning_blocks_do_not_nest():
    outer = DeferredBinning(1)
    with outer, pytest.raises(CalibrationError, match="nest"), DeferredBinning(1):
        pass
    assert getattr(stats_module._DEFERRED, "active", None) is None  # the outer block ended
