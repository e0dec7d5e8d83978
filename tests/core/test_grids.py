"""Integer grids: ranges of every kind and bit width, validation with clear errors."""

import pytest

from omse.core.grids import MAX_BITS, MIN_BITS, Grid, make_grid
from omse.errors import ConfigError, OmseError

BITS = range(MIN_BITS, MAX_BITS + 1)


@pytest.mark.parametrize("bits", BITS)
def test_full_grid_is_twos_complement(bits):
    g = Grid(bits, "full")
    assert (g.qmin, g.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert g.levels == 2**bits and g.signed


@pytest.mark.parametrize("bits", BITS)
def test_narrow_grid_is_symmetric(bits):
    g = Grid(bits, "narrow")
    assert g.qmin == -g.qmax == -(2 ** (bits - 1) - 1)
    assert g.levels == 2**bits - 1 and g.signed


@pytest.mark.parametrize("bits", BITS)
def test_unsigned_grid(bits):
    g = Grid(bits, "unsigned")
    assert (g.qmin, g.qmax) == (0, 2**bits - 1)
    assert g.levels == 2**bits and not g.signed


def test_default_kind_and_make_grid():
    assert Grid(4) == make_grid(4) == make_grid(4, "full")
    assert make_grid(3, "narrow") == Grid(3, "narrow")
    assert str(Grid(4)) == "full4[-8,7]"
    assert str(Grid(2, "unsigned")) == "unsigned2[0,3]"


def test_grids_are_hashable_and_frozen():
    assert len({Grid(4), Grid(4), Grid(4, "narrow")}) == 2
    with pytest.raises(AttributeError):
        Grid(4).bits = 5  # type: ignore[misc]


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4])
def test_bits_out_of_range(bits):
    with pytest.raises(ConfigError, match=r"2\.\.8"):
        Grid(bits)


@pytest.mark.parametrize("bits", [4.0, "4", True, None])
def test_bits_must_be_int(bits):
    with pytest.raises(ConfigError, match="bits"):
        Grid(bits)  # type: ignore[arg-type]


def test_unknown_kind():
    with pytest.raises(ConfigError, match="grid kind 'asym'"):
        make_grid(4, "asym")


def test_config_error_is_an_omse_error_and_value_error():
    with pytest.raises(OmseError):
        Grid(12)
    with pytest.raises(ValueError):
        Grid(12)


@pytest.mark.parametrize("bits", BITS)
def test_affine_grid_shifts_the_unsigned_range(bits):
    n = 2**bits
    for z in (0, 1, n // 2, n - 1):
        g = Grid(bits, "unsigned", z)
        assert (g.qmin, g.qmax) == (-z, n - 1 - z) and g.levels == n and not g.signed
        assert Grid(*g.to_list()) == g
    assert Grid(bits, "unsigned").to_list() == [bits, "unsigned"]  # old layout, no zero point
    assert str(Grid(8, "unsigned", 3)) == "unsigned8z3[-3,252]"


def test_affine_grid_validation():
    with pytest.raises(ConfigError, match="needs an unsigned grid"):
        Grid(8, "full", 3)
    with pytest.raises(ConfigError, match="outside 0..15"):
        Grid(4, "unsigned", 16)
    with pytest.raises(ConfigError, match="zero_point must be an int"):
        Grid(4, "unsigned", 1.5)
