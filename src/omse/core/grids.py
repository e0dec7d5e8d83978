"""Integer grids of uniform quantizers.

A grid is the integer range ``[qmin, qmax]`` a quantizer with step ``s`` maps onto:
``x -> s * clamp(round(x / s), qmin, qmax)``.

- ``full``: signed two's complement, ``[-2^(b-1), 2^(b-1) - 1]`` (what INT4/INT8 hardware has);
- ``narrow``: signed symmetric, ``[-(2^(b-1) - 1), 2^(b-1) - 1]``;
- ``unsigned``: ``[0, 2^b - 1]``, for tensors known to be non-negative; with a ``zero_point``
  ``z`` (an affine, "asymmetric" quantizer), ``[-z, 2^b - 1 - z]``: the stored code is
  ``u = q + z`` in ``[0, 2^b - 1]``, dequantized as ``s * (u - z)`` (ONNX ``QuantizeLinear``'s
  zero point). Real 0 stays exactly representable, so zero padding is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

__all__ = ["Grid", "GridKind", "make_grid", "MIN_BITS", "MAX_BITS"]

GridKind = Literal["full", "narrow", "unsigned"]
MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class Grid:
    """An integer range ``[qmin, qmax]`` for ``bits``-bit codes of kind ``kind``."""

    bits: int
    kind: GridKind = "full"
    zero_point: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(
                f"bits={self.bits} is outside {MIN_BITS}..{MAX_BITS}; omse supports 2- to 8-bit grids"
            )
        if self.kind not in ("full", "narrow", "unsigned"):
            raise ConfigError(
                f"grid kind {self.kind!r} is unknown; use 'full', 'narrow' or 'unsigned'"
            )
        z = self.zero_point
        if isinstance(z, bool) or not isinstance(z, int):
            raise ConfigError(f"zero_point must be an int, got {z!r}")
        if z and self.kind != "unsigned":
            raise ConfigError(f"zero_point={z} needs an unsigned grid, not {self.kind!r}")
        if not 0 <= z <= 2**self.bits - 1:
            raise ConfigError(f"zero_point={z} is outside 0..{2**self.bits - 1}")

    @property
    def qmin(self) -> int:
        if self.kind == "unsigned":
            return -self.zero_point
        if self.kind == "narrow":
            return -(2 ** (self.bits - 1) - 1)
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        if self.kind == "unsigned":
            return 2**self.bits - 1 - self.zero_point
        return 2 ** (self.bits - 1) - 1

    @property
    def signed(self) -> bool:
        return self.kind != "unsigned"

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def to_list(self) -> list:
        """``[bits, kind]`` (``[bits, kind, zero_point]`` with a zero point): ``Grid(*l)``."""
        return [self.bits, self.kind] + ([self.zero_point] if self.zero_point else [])

    def __str__(self) -> str:
        z = f"z{self.zero_point}" if self.zero_point else ""
        return f"{self.kind}{self.bits}{z}[{self.qmin},{self.qmax}]"


def make_grid(bits: int, kind: GridKind | str = "full") -> Grid:
    """Build a validated :class:`Grid` (``kind`` in ``full``, ``narrow``, ``unsigned``)."""
    return Grid(bits, kind)  # type: ignore[arg-type]
