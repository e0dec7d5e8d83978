"""Granularity types: to_slices / expand shapes and round trips on conv weights [out, in, kh, kw]."""

import pytest
import torch

from omse.core.granularity import PerChannel, PerGroup, PerTensor, parse_granularity
from omse.errors import ConfigError

torch.set_num_threads(1)


W = torch.randn(6, 8, 3, 3)


@pytest.fixture
def w():
    return torch.arange(6 * 8 * 3 * 3, dtype=torch.float32).reshape(6, 8, 3, 3)


def test_per_tensor(w):
    g = PerTensor()
    sl = g.to_slices(w)
    assert sl.shape == (1, w.numel())
    s = g.expand(torch.tensor([2.0]), w)
    assert s.shape == () and float(s) == 2.0
    assert g.num_slices(w) == 1 and str(g) == "per_tensor"


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -4])
def test_per_channel_round_trip(w, axis):
    g = PerChannel(axis)
    sl = g.to_slices(w)
    ax = axis % 4
    assert sl.shape == (w.shape[ax], w.numel() // w.shape[ax])
    # every row holds exactly the elements of one index along the axis
    for c in range(w.shape[ax]):
        assert torch.equal(sl[c].sort().values, w.select(ax, c).reshape(-1).sort().values)
    # expand: scale c multiplies exactly index c along the axis
    scale = torch.arange(1, w.shape[ax] + 1, dtype=torch.float32)
    e = g.expand(scale, w)
    assert e.dim() == 4 and e.shape[ax] == w.shape[ax] and e.numel() == w.shape[ax]
    prod = w * e
    for c in range(w.shape[ax]):
        assert torch.equal(prod.select(ax, c), w.select(ax, c) * (c + 1))


def test_per_channel_kernelwise_shape(w):
    assert PerChannel(0).expand(torch.ones(6), w).shape == (6, 1, 1, 1)
    assert str(PerChannel()) == "per_channel"


def test_per_channel_errors():
    with pytest.raises(ConfigError, match="out of range"):
        PerChannel(4).to_slices(W)
    with pytest.raises(ConfigError, match="at least one dimension"):
        PerChannel(0).to_slices(torch.tensor(1.0))


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_per_group_round_trip(w, size):
    g = PerGroup(size)
    sl = g.to_slices(w)
    n_groups = 6 * (8 // size)
    assert sl.shape == (n_groups, size * 9)
    # slice k = (out o, group j): the block w[o, j*size:(j+1)*size]
    for k in range(n_groups):
        o, j = divmod(k, 8 // size)
        assert torch.equal(sl[k], w[o, j * size : (j + 1) * size].reshape(-1))
    # expand: scale k applies exactly to block k
    scale = torch.arange(1, n_groups + 1, dtype=torch.float32)
    e = g.expand(scale, w)
    assert e.shape == (6, 8, 1, 1)
    back = g.to_slices(w * e)
    assert torch.equal(back, sl * scale[:, None])
    assert str(g) == f"per_group{size}"


def test_per_group_other_axes(w):
    # groups along the kernel height, channel axis 1
    g = PerGroup(3, axis=2, channel_axis=1)
    sl = g.to_slices(w)
    assert sl.shape == (8, 6 * 3 * 3)
    scale = torch.arange(1, 9, dtype=torch.float32)
    e = g.expand(scale, w)
    assert torch.equal(g.to_slices(w * e), sl * scale[:, None])


def test_per_group_linear_weight():
    w = torch.randn(5, 12)
    g = PerGroup(4)
    sl = g.to_slices(w)
    assert sl.shape == (15, 4)
    assert torch.equal(sl.reshape(5, 12), w)
    e = g.expand(torch.arange(15.0), w)
    assert e.shape == (5, 12)


def test_per_group_errors():
    with pytest.raises(ConfigError, match="does not divide"):
        PerGroup(3).to_slices(W)
    with pytest.raises(ConfigError, match="positive"):
        PerGroup(0)
    with pytest.raises(ConfigError, match="two dimensions"):
        PerGroup(2).to_slices(torch.randn(8))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("per_tensor", PerTensor()),
        ("tensor", PerTensor()),
        ("per_channel", PerChannel(0)),
        ("per-channel", PerChannel(0)),
        ("kernel-wise", PerChannel(0)),
        ("PER_GROUP8", PerGroup(8)),
        ("per_group16", PerGroup(16)),
    ],
)
def test_parse_granularity(text, expected):
    assert parse_granularity(text) == expected
    assert parse_granularity(expected) is expected


@pytest.mark.parametrize("text", ["per_row", "per_groupx", "per_group0", ""])
def test_parse_granularity_rejects(text):
    with pytest.raises(ConfigError, match="granularity|PerGroup"):
        parse_granularity(text)
