"""The project's own error types: every failure omse reports on purpose is one of these."""

from __future__ import annotations

__all__ = [
    "OmseError",
    "ConfigError",
    "CalibrationError",
    "CheckpointError",
    "UnsupportedLayerError",
]


class OmseError(Exception):
    """Base class: a clear, user-facing failure (the CLI prints it in one line and exits 2)."""


class ConfigError(OmseError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class CalibrationError(OmseError, ValueError):
    """Calibration data is empty, malformed or non-finite."""


class CheckpointError(OmseError, ValueError):
    """A checkpoint or weights file is missing, truncated, corrupted or of the wrong kind."""


class UnsupportedLayerError(OmseError, TypeError):
    """A layer cannot be quantized or exported (raised under ``strict=True``)."""
