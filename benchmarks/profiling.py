"""cProfile tables of the benchmarks (``calibration_speed.py``, ``calibration_profile.py``)."""

from __future__ import annotations

import cProfile
import io
import pstats
from pathlib import Path


def top(prof: cProfile.Profile, k: int, by: str = "cumtime") -> list[dict]:
    """The ``k`` functions of most ``by`` time (``"cumtime"``: with what they call;
    ``"tottime"``: their own), as ``{"function", "calls", "tottime", "cumtime"}`` rows."""
    s = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in s.stats.items():
        where = f"{Path(file).name}:{line}({fn})" if line else fn
        rows.append({"function": where, "calls": nc, "tottime": tt, "cumtime": ct})
    rows.sort(key=lambda r: -r[by])
    return rows[:k]
