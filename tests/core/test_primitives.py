"""Pure tensor primitives: quantize, dequantize, fake_quantize, quant_error, 4-bit packing."""

import pytest
import torch

from omse.core.grids import Grid
from omse.core.primitives import (
    dequantize,
    fake_quantize,
    pack_int4,
    quant_error,
    quantize,
    unpack_int4,
)
from omse.errors import CheckpointError, ConfigError

torch.set_num_threads(1)


def test_quantize_rounds_half_to_even_and_clamps():
    x = torch.tensor([-9.0, -8.6, -0.5, 0.5, 1.5, 2.5, 6.7, 7.5, 100.0])
    q = quantize(x, torch.tensor(1.0), Grid(4))
    assert q.dtype == torch.int8
    assert q.tolist() == [-8, -8, 0, 0, 2, 2, 7, 7, 7]


def test_quantize_narrow_and_unsigned():
    x = torch.tensor([-9.0, -1.0, 0.0, 3.0, 20.0])
    assert quantize(x, torch.tensor(1.0), Grid(4, "narrow")).tolist() == [-7, -1, 0, 3, 7]
    assert quantize(x, torch.tensor(1.0), Grid(4, "unsigned")).tolist() == [0, 0, 0, 3, 15]


def test_unsigned_8bit_codes_use_int16():
    q = quantize(torch.tensor([300.0, 128.0]), torch.tensor(1.0), Grid(8, "unsigned"))
    assert q.dtype == torch.int16 and q.tolist() == [255, 128]
    assert quantize(torch.tensor([1.0]), torch.tensor(1.0), Grid(8)).dtype == torch.int8


def test_per_channel_scale_broadcast():
    x = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    s = torch.tensor([[1.0], [10.0]])
    assert quantize(x, s, Grid(4)).tolist() == [[1, 2], [1, 2]]
    assert torch.equal(dequantize(quantize(x, s, Grid(4)), s), x)


def test_dequantize_times_scale():
    q = torch.tensor([-8, 0, 7], dtype=torch.int8)
    assert dequantize(q, torch.tensor(0.5)).tolist() == [-4.0, 0.0, 3.5]
    assert dequantize(q, torch.tensor(0.5), torch.float64).dtype == torch.float64


@pytest.mark.parametrize("kind", ["full", "narrow", "unsigned"])
def test_fake_quantize_equals_dequantize_of_quantize(kind):
    x = torch.randn(64, 9) * 3
    s = torch.rand(64, 1) + 0.1
    g = Grid(4, kind)
    assert torch.equal(fake_quantize(x, s, g), dequantize(quantize(x, s, g), s))
    assert fake_quantize(x, s, g).dtype == x.dtype


def test_fake_quantize_keeps_dtype_float64():
    x = torch.randn(10, dtype=torch.float64)
    assert fake_quantize(x, torch.tensor(0.1), Grid(4)).dtype == torch.float64


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_quantize_rejects_bad_scales(bad):
    with pytest.raises(ConfigError, match="finite and > 0"):
        quantize(torch.ones(3), torch.tensor(bad), Grid(4))


def test_quant_error_per_slice():
    x = torch.tensor([[0.0, 1.0, 2.4], [0.0, 0.0, 0.0]])
    e = quant_error(x, torch.tensor([1.0, 1.0]), Grid(4))
    assert e.dtype == torch.float64
    assert e.tolist() == pytest.approx([0.16, 0.0])
    # clipping error: 20 clipped to 7
    assert quant_error(torch.tensor([[20.0]]), torch.tensor([1.0]), Grid(4)).item() == 169.0


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 33])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip(n, signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (n,), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == ((n + 1) // 2,)
    assert torch.equal(unpack_int4(p, n, signed), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([1, 2, -1], dtype=torch.int8)
    assert pack_int4(q).tolist() == [0x21, 0x0F]


def test_pack_accepts_any_shape():
    q = torch.randint(-8, 8, (3, 5, 1), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q), q.numel()).reshape(q.shape), q)


@pytest.mark.parametrize("bad", [[-9], [16], [0, 100]])
def test_pack_rejects_out_of_range(bad):
    with pytest.raises(ConfigError, match="pack_int4"):
        pack_int4(torch.tensor(bad))


def test_unpack_rejects_wrong_input():
    with pytest.raises(CheckpointError, match="uint8"):
        unpack_int4(torch.zeros(2, dtype=torch.int8), 4)
    with pytest.raises(CheckpointError, match="expected 2"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_neighbours_bracket_and_are_representable(dtype):
    from omse.core.primitives import scale_neighbours

    torch.manual_seed(0)
    fi = torch.finfo(dtype)
    s = torch.cat([torch.rand(1000) * 10 ** torch.empty(1000).uniform_(-4, 3), torch.tensor([1.0])])
    lo, hi = scale_neighbours(s, dtype)
    ok = (s >= fi.tiny) & (s <= fi.max / 2)
    assert ((lo <= s) & (s <= hi)).all()
    assert torch.equal(lo[ok].to(dtype).float(), lo[ok]) and torch.equal(
        hi[ok].to(dtype).float(), hi[ok]
    )
    assert ((hi - lo)[ok] <= s[ok] * 2 * fi.eps).all()  # adjacent values
    tiny = torch.tensor([1e-6, 1e30])  # outside float16's normal range: left as float32
    lo, hi = scale_neighbours(tiny, torch.float16)
    assert torch.equal(lo, tiny) and torch.equal(hi, tiny)
    exact = torch.tensor([0.5, 0.1]).to(dtype).float()  # already representable: both ends equal it
    lo, hi = scale_neighbours(exact, dtype)
    assert torch.equal(lo, exact) and torch.equal(hi, exact)
