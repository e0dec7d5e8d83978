"""omse.analysis.metrics.wilson_interval against published values."""

from __future__ import annotations

import pytest

from omse.analysis.metrics import wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_newcombe_table(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=6e-5) and hi == pytest.approx(high, abs=6e-5)


def test_wilson_bounds_and_errors():
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[0] == pytest.approx(1 - wilson_interval(0, 10)[1])
    lo, hi = wilson_interval(918, 1000)
    assert lo < 0.918 < hi and hi - lo < 0.04
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
