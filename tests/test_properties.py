"""Property tests (hypothesis) of the primitives, the exact MMSE solver, the histograms and the
weights/checkpoint loaders, on random shapes, bit widths 2..8, every grid kind and values that
include zeros, subnormals, tiny (1e-30) and huge (1e30) magnitudes."""

import io
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from omse.core.granularity import PerChannel
from omse.core.grids import Grid
from omse.core.mmse import mmse_solve
from omse.core.primitives import (
    dequantize,
    fake_quantize,
    pack_int4,
    quant_error,
    quantize,
    unpack_int4,
)
from omse.core.ranges import MMSE, MinMax
from omse.core.stats import HistogramStats
from omse.errors import OmseError
from omse.nn.layers import quantize_weight_terms

torch.set_num_threads(1)

# OMSE_FUZZ_EXAMPLES=2000 pytest tests/test_properties.py: a longer hunt than the default run
_N = int(os.environ.get("OMSE_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=_N,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FEW = settings(SETTINGS, max_examples=max(10, _N // 2))

KINDS = st.sampled_from(["full", "narrow", "unsigned"])
BITS = st.integers(2, 8)
# float32 subnormals (1e-45 .. 1e-38), tiny, ordinary and huge magnitudes
SPECIAL = st.sampled_from(
    [0.0, -0.0, 1.4e-45, -1.4e-45, 3e-42, -1e-40, 1e-38, 1e-30, -1e-30, 1e30, -1e30, 3e34, 1.0]
)
ORDINARY = st.floats(-100.0, 100.0)
WIDE = st.floats(-1e35, 1e35, allow_nan=False, allow_infinity=False)
# ordinary values are scaled by a common magnitude; special and wide ones are taken as they are
ELEMENT = st.one_of(
    ORDINARY.map(lambda v: (v, True)), st.one_of(SPECIAL, WIDE).map(lambda v: (v, False))
)
MAGNITUDE = st.sampled_from([1.0, 1e-30, 1e30, 1e-40, 3e-3])


def _values(draw, n: int) -> torch.Tensor:
    """``n`` finite float32 values (at most 1e35 in magnitude)."""
    mag = draw(MAGNITUDE)
    vals = draw(st.lists(ELEMENT, min_size=n, max_size=n))
    x = torch.tensor([v * mag if scaled else v for v, scaled in vals], dtype=torch.float32)
    assert torch.isfinite(x).all()
    return x


@st.composite
def slices(draw, max_rows=4, max_cols=40):
    """A float32 ``[S, n]`` tensor of :func:`_values`."""
    s = draw(st.integers(1, max_rows))
    n = draw(st.integers(1, max_cols))
    return _values(draw, s * n).reshape(s, n)


def _rel(a, b, x=None):
    """``a <= b`` up to float64 rounding: relative 1e-9, plus 1e-20 of the rows' energy ``x``
    (an exact zero error can come out as ~1e-30 of the energy after normalising by max|x|)."""
    atol = 1e-300 if x is None else 1e-20 * (x.double() ** 2).sum(-1) + 1e-300
    return a <= b * (1 + 1e-9) + atol


# -- solvers --------------------------------------------------------------------------------------


@SETTINGS
@given(x=slices(), bits=BITS, kind=KINDS)
def test_mmse_error_at_most_minmax(x, bits, kind):
    grid = Grid(bits, kind)
    x64 = x.double()
    res = mmse_solve(x64, grid)
    assert torch.isfinite(res.scale).all() and (res.scale > 0).all()
    e_mm = quant_error(x64, MinMax().fit(x64, grid), grid)
    assert _rel(res.sse, e_mm, x).all()
    # the reported error is the error of the reported step
    e = quant_error(x64, res.scale, grid)
    assert (torch.abs(e - res.sse) <= 1e-9 * res.sse + 1e-20 * (x64**2).sum(1) + 1e-300).all()
    # and through the range setters (with their all-zero fallback) as users get it
    e_fit = quant_error(x64, MMSE().fit(x64, grid), grid)
    assert _rel(e_fit, quant_error(x64, MinMax().fit(x64, grid), grid), x).all()


@SETTINGS
@given(x=slices(), bits=BITS, kind=KINDS)
def test_per_channel_error_at_most_per_tensor(x, bits, kind):
    grid = Grid(bits, kind)
    x64 = x.double()
    per_channel = mmse_solve(x64, grid).sse.sum()
    per_tensor = mmse_solve(x64.reshape(1, -1), grid).sse.sum()
    assert _rel(per_channel, per_tensor, x.reshape(-1))


@SETTINGS
@given(x=slices(), bits=st.integers(2, 7), kind=KINDS)
def test_error_non_increasing_in_bits(x, bits, kind):
    x64 = x.double()
    lo = mmse_solve(x64, Grid(bits, kind)).sse
    hi = mmse_solve(x64, Grid(bits + 1, kind)).sse
    assert _rel(hi, lo, x).all()


@SETTINGS
@given(x=slices(max_rows=1, max_cols=20), bits=BITS, kind=KINDS, data=st.data())
def test_weighted_solve_equals_repeated_values(x, bits, kind, data):
    """Integer weights (histogram counts) mean repeated values: the same optimal error."""
    grid = Grid(bits, kind)
    # counts >= 1, as histogram bins give; see test_zero_weight_large_values_* for zeros
    counts = data.draw(st.lists(st.integers(1, 4), min_size=x.shape[1], max_size=x.shape[1]))
    w = torch.tensor(counts, dtype=torch.float64).reshape(1, -1)
    x64 = x.double()
    weighted = mmse_solve(x64, grid, w).sse
    rep = x64.reshape(-1).repeat_interleave(torch.tensor(counts)).reshape(1, -1)
    repeated = mmse_solve(rep, grid).sse
    assert _close(weighted, repeated, rep)


@pytest.mark.parametrize(
    ("w_big", "method"),
    [
        (0.0, "sweep"),  # zero-weight values are dropped before the solve
        (0.0, "vectorised"),
        (1e-40, "sweep"),  # its window comes from the weighted values' own clipping cost
        pytest.param(
            1e-40,
            "vectorised",
            marks=pytest.mark.xfail(
                strict=True,
                reason="known limitation of the vectorised method: it misses the optimum when "
                "nearly-zero-weight values are > 1e18 x the weighted ones (omse's own inputs "
                "never have this: weights are histogram counts >= 1 or absent)",
            ),
        ),
    ],
)
def test_zero_weight_large_values_do_not_hide_the_optimum(w_big, method):
    x = torch.tensor([[1.0, 3.0, 2.0**-60]], dtype=torch.float64)
    w = torch.tensor([[w_big, w_big, 1.0]], dtype=torch.float64)
    res = mmse_solve(x, Grid(4), w, method=method)
    # the step 2^-60 / 7 represents the weighted value exactly; clipping costs only w_big * ...
    s = torch.tensor([2.0**-60 / 7], dtype=torch.float64)
    q = torch.clamp(torch.round(x / s), -8, 7)
    best = float((w * (x - s * q) ** 2).sum())
    assert float(res.sse[0]) <= best * (1 + 1e-9) + 1e-300


def _close(a, b, x):
    return ((a - b).abs() <= 1e-9 * torch.maximum(a, b) + 1e-20 * (x.double() ** 2).sum(-1)).all()


@SETTINGS
@given(x=slices(), bits=BITS, kind=KINDS, k=st.integers(-20, 20))
def test_solver_is_scale_equivariant(x, bits, kind, k):
    """Scaling the data by a power of two scales the optimal step and error exactly."""
    grid = Grid(bits, kind)
    x64 = x.double()
    a = mmse_solve(x64, grid)
    b = mmse_solve(x64 * 2.0**k, grid)
    nz = x64.abs().amax(1) > 0
    assert torch.equal(b.scale[nz], a.scale[nz] * 2.0**k)
    assert torch.equal(b.sse, a.sse * 4.0**k)


@SETTINGS
@given(x=slices(), bits=BITS)
def test_narrow_grid_is_sign_symmetric(x, bits):
    grid = Grid(bits, "narrow")
    x64 = x.double()
    assert _close(mmse_solve(x64, grid).sse, mmse_solve(-x64, grid).sse, x64)


@SETTINGS
@given(parts=st.deferred(lambda: chunks()), bits=BITS)
def test_histogram_mmse_at_most_minmax_on_its_points(parts, bits):
    """On a histogram, MMSE solves the weighted problem on bin centroids: never worse there."""
    h = HistogramStats(256)
    for p in parts:
        h.update(p)
    assume(h.n > 0 and h.absmax > 0)
    v, w = h.points()
    energy = float((w * v * v).sum())
    for kind in ("full", "narrow", "unsigned"):
        grid = Grid(bits, kind)

        def err(s, grid=grid):
            q = torch.clamp(torch.round(v / s), grid.qmin, grid.qmax)
            return float((w * (v - s * q) ** 2).sum())

        s_mmse, s_mm = MMSE().fit(h, grid), MinMax().fit(h, grid)
        assert s_mmse > 0 and torch.isfinite(s_mmse)
        assert err(s_mmse) <= err(s_mm) * (1 + 1e-9) + 1e-20 * energy + 1e-300


@FEW
@given(
    x=slices(max_rows=4, max_cols=12),
    bits=st.integers(2, 6),
    kind=st.sampled_from(["full", "narrow"]),
)
def test_residual_term_reduces_error(x, bits, kind):
    w = x.reshape(x.shape[0], 1, 1, -1)  # a conv weight [out, in, kh, kw]
    grid = Grid(bits, kind)
    w64 = w.double()
    one = quantize_weight_terms(w, grid, PerChannel(0), "mmse", terms=1)
    two = quantize_weight_terms(w, grid, PerChannel(0), "mmse", terms=2)
    assert torch.equal(one[0][0], two[0][0]) and torch.equal(one[0][1], two[0][1])
    d1 = dequantize(one[0][0], one[0][1], torch.float64)
    d2 = d1 + dequantize(two[1][0], two[1][1], torch.float64)
    e1 = ((w64 - d1) ** 2).sum()
    e2 = ((w64 - d2) ** 2).sum()
    # float32 residual rounding: relative 2^-23
    assert e2 <= e1 * (1 + 1e-6) + 1e-300


def test_residual_term_strictly_reduces_error_on_ordinary_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    for bits in (2, 4):
        terms = quantize_weight_terms(w, Grid(bits), PerChannel(0), "mmse", terms=2)
        d1 = dequantize(*terms[0])
        d2 = d1 + dequantize(*terms[1])
        e1 = ((w - d1) ** 2).sum(dim=(1, 2, 3))
        e2 = ((w - d2) ** 2).sum(dim=(1, 2, 3))
        assert (e2 < e1 * 0.5).all()


# -- primitives -----------------------------------------------------------------------------------


@SETTINGS
@given(x=slices(), bits=BITS, kind=KINDS)
def test_fake_quantize_is_idempotent(x, bits, kind):
    grid = Grid(bits, kind)
    g = PerChannel(0)
    scale = g.expand(MMSE().fit(x.double(), grid).float(), x)
    assume(torch.isfinite(scale).all() and (scale > 0).all())
    once = fake_quantize(x, scale, grid)
    assert torch.equal(fake_quantize(once, scale, grid), once)
    q = quantize(x, scale, grid)
    assert torch.equal(quantize(dequantize(q, scale), scale, grid), q)
    assert torch.equal(dequantize(q, scale), once)
    assert int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax


@SETTINGS
@given(
    codes=st.lists(st.integers(-8, 7), max_size=257),
    shape_rows=st.integers(1, 3),
)
def test_pack_unpack_signed_round_trip(codes, shape_rows):
    q = torch.tensor(codes, dtype=torch.int8)
    assume(q.numel() % shape_rows == 0)
    q = q.reshape(shape_rows, -1)
    p = pack_int4(q)
    assert p.numel() == (q.numel() + 1) // 2
    assert torch.equal(unpack_int4(p, q.numel(), signed=True).reshape(q.shape), q)


@SETTINGS
@given(codes=st.lists(st.integers(0, 15), max_size=257))
def test_pack_unpack_unsigned_round_trip(codes):
    q = torch.tensor(codes, dtype=torch.int16)
    back = unpack_int4(pack_int4(q), q.numel(), signed=False)
    assert back.tolist() == codes


# -- histograms -----------------------------------------------------------------------------------


@st.composite
def chunks(draw):
    k = draw(st.integers(1, 5))
    out = []
    for _ in range(k):
        out.append(_values(draw, draw(st.integers(0, 30))))
    return out


@SETTINGS
@given(parts=chunks(), bins=st.sampled_from([4, 8, 64, 256, 4096]))
def test_histogram_merge_equals_single_pass(parts, bins):
    whole = HistogramStats(bins).update(torch.cat(parts))
    streamed = HistogramStats(bins)
    merged = HistogramStats(bins)
    for p in parts:
        streamed.update(p)
        merged = merged.merge(HistogramStats(bins).update(p))
    for h in (streamed, merged):
        assert torch.equal(h.counts, whole.counts)
        assert h.radius == whole.radius and h.n == whole.n
        assert (h.min, h.max) == (whole.min, whole.max)
    assert whole.counts.sum() == whole.n
    if whole.n:
        assert whole.radius > whole.absmax or whole.radius == whole.absmax == 0.0


# -- loaders: corrupted bytes raise OmseError, never crash or hang -----------------------------


def _weights_files():
    from safetensors.torch import save

    sd = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4), "n": torch.arange(5)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return {"safetensors": save(sd), "torch": buf.getvalue()}


FILES = _weights_files()


@st.composite
def corrupted(draw, data: bytes):
    b = bytearray(data)
    how = draw(st.sampled_from(["truncate", "flip", "insert", "zero", "prefix"]))
    if how == "truncate":
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    elif how == "insert":
        i = draw(st.integers(0, len(b)))
        b[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif how == "zero":
        i = draw(st.integers(0, len(b) - 1))
        j = min(len(b), i + draw(st.integers(1, 256)))
        b[i:j] = bytes(j - i)
    else:
        b = bytearray(draw(st.binary(max_size=16))) + b[draw(st.integers(0, 16)) :]
    return bytes(b)


def _check_loader(load, path):
    t0 = time.perf_counter()
    try:
        out = load(path)
    except OmseError:
        out = None
    assert time.perf_counter() - t0 < 10.0
    return out


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@SETTINGS
@given(
    data=st.one_of(
        corrupted(FILES["safetensors"]), corrupted(FILES["torch"]), st.binary(max_size=200)
    ),
    suffix=st.sampled_from([".safetensors", ".pt", ".bin"]),
)
def test_load_weights_fuzz(tmp_path_factory, data, suffix):
    from omse.zoo.models import load_weights

    p = tmp_path_factory.mktemp("fuzz") / f"w{suffix}"
    p.write_bytes(data)
    out = _check_loader(load_weights, p)
    if out is not None:
        assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())


def _ckpt_arch():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).eval()


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    """A packed checkpoint of a small quantized model (4-bit codes and 8-bit override)."""
    ckpt = pytest.importorskip("omse.deploy.checkpoint")
    from omse.config import QuantConfig
    from omse.transforms.pipeline import quantize as omse_quantize

    q = omse_quantize(
        _ckpt_arch(),
        [torch.randn(2, 3, 6, 6)],
        QuantConfig.preset("fast", overrides={"4": {"weight_bits": 8}}),
    )
    p = tmp_path_factory.mktemp("ckpt") / "q.safetensors"
    try:
        ckpt.save(q, p)
        back = ckpt.load(p, model=_ckpt_arch())
    except Exception as e:  # a model the checkpoint format does not cover yet
        pytest.skip(f"omse.deploy.checkpoint cannot round-trip the test model: {e}")
    probe = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(back(probe), q(probe))  # the uncorrupted file is loadable
    return ckpt, p.read_bytes()


@FEW
@given(
    seed=st.integers(0, 2**32 - 1),
    how=st.sampled_from(["truncate", "flip", "zero", "header"]),
    with_model=st.booleans(),
)
def test_checkpoint_load_fuzz(checkpoint_file, tmp_path_factory, seed, how, with_model):
    import random

    ckpt, data = checkpoint_file
    rng = random.Random(seed)
    b = bytearray(data)
    if how == "truncate":
        b = b[: rng.randrange(len(b))]
    elif how == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == "zero":
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 256))
        b[i:j] = bytes(j - i)
    else:  # inside the JSON header (first 8 bytes: its length)
        hlen = int.from_bytes(b[:8], "little")
        for _ in range(rng.randint(1, 4)):
            b[8 + rng.randrange(hlen)] = rng.choice(b'{}[]",:0123456789abcxyz ')
    p = tmp_path_factory.mktemp("ckfuzz") / "q.safetensors"
    p.write_bytes(bytes(b))
    arch = _ckpt_arch() if with_model else None
    _check_loader(lambda path: ckpt.load(path, model=arch), p)
