"""The activation fits of a calibration (:func:`omse.transforms.calibration.fit_all`): shared by
torch's threads, each the fit a loop makes, bit for bit and in order; the first failing job (in
order) raises; one thread is the loop itself."""

from __future__ import annotations

import pytest
import torch

from omse.core.ranges import MMSE
from omse.core.stats import HistogramStats
from omse.errors import CalibrationError
from omse.transforms.calibration import _fit, fit_all


def _histograms(n: int = 12) -> list[HistogramStats]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        st = HistogramStats(bins=512)
        for _ in range(2):
            x = torch.randn(4096, generator=g) * (i + 1)
            if i % 3 == 0:
                x = x.relu()  # non-negative: the unsigned grid
            elif i % 3 == 1:
                x = x + 2.5 * (i + 1)  # skewed: an affine grid with "auto"
            st.update(x)
        out.append(st)
    return out


@pytest.mark.parametrize("kind", ["auto", "affine", "full"])
def test_fit_all_is_the_loop_bit_for_bit_in_order(two_threads, kind):
    jobs = [(MMSE(), kind, st, bits) for st in _histograms() for bits in (4, 8)]
    loop = [_fit(*job) for job in jobs]
    shared = fit_all(_fit, jobs)
    assert len(shared) == len(loop)
    for (s1, g1), (s2, g2) in zip(loop, shared, strict=True):
        assert g1 == g2
        assert torch.equal(s1, s2)


def test_fit_all_raises_the_first_failing_job(two_threads):
    sts = _histograms(4)

    def fit(method, kind, st, bits):
        if bits in (2, 3):
            raise CalibrationError(f"job {bits}")
        return _fit(method, kind, st, 8)

    jobs = [(MMSE(), "auto", st, b) for st, b in zip(sts, (8, 2, 3, 8), strict=True)]
    with pytest.raises(CalibrationError, match="job 2"):
        fit_all(fit, jobs)


def test_one_thread_runs_the_loop_in_this_thread():
    import threading

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = set()

        def fit(method, kind, st, bits):
            seen.add(threading.get_ident())
            return _fit(method, kind, st, bits)

        fit_all(fit, [(MMSE(), "auto", st, 8) for st in _histograms(3)])
        assert seen == {threading.get_ident()}
    finally:
        torch.set_num_threads(n)
