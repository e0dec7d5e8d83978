"""The project's own error types: every failure omse reports on purpose is one of these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "OmseError",
    "ConfigError",
    "CalibrationError",
    "NonFiniteError",
    "CheckpointError",
    "UnsupportedLayerError",
    "model_forward_errors",
    "first_line",
]


class OmseError(Exception):
    """Base class: a clear, user-facing failure (the CLI prints it in one line and exits 2)."""


class ConfigError(OmseError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class CalibrationError(OmseError, ValueError):
    """Calibration data is empty, malformed or non-finite."""


class NonFiniteError(CalibrationError):
    """Calibration values hold NaN or Inf."""


class CheckpointError(OmseError, ValueError):
    """A checkpoint or weights file is missing, truncated, corrupted or of the wrong kind."""


class UnsupportedLayerError(OmseError, TypeError):
    """A layer cannot be quantized or exported (raised under ``strict=True``)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of ``e``'s message (its type's name if empty), at most ``limit`` chars."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def _describe(batch: object) -> str:
    shape, dtype = getattr(batch, "shape", None), getattr(batch, "dtype", None)
    if shape is not None:
        return f"shape {tuple(shape)}, dtype {dtype}"
    if isinstance(batch, dict):
        return f"keys {sorted(map(str, batch))}"
    return type(batch).__name__


@contextlib.contextmanager
def model_forward_errors(batch_index: int, batch: object) -> Iterator[None]:
    """Turn a failure of the user's model on calibration batch ``batch_index`` (wrong shape,
    dtype, device, ...) into a :class:`CalibrationError` naming the batch; omse's own errors and
    ``KeyboardInterrupt`` pass through unchanged. The original exception is chained (``--debug``)."""
    try:
        yield
    except OmseError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as e:
        first = first_line(e)
        raise CalibrationError(
            f"the model failed to run calibration batch {batch_index} ({_describe(batch)}): {first}"
        ) from e
