"""Pure tensor functions: quantize to integers, dequantize, fake-quantize, 4-bit packing.

Every function here takes tensors and a :class:`~omse.core.grids.Grid` and knows nothing of modules.
Scales are positive and broadcast against ``x`` (use a granularity's ``expand``).
Rounding is round-half-to-even (``torch.round``), as ONNX ``QuantizeLinear`` does.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError, ConfigError
from .grids import Grid

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "quant_error",
    "pack_int4",
    "unpack_int4",
    "SCALE_DTYPES",
    "scale_neighbours",
]

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Storage formats a weight scale may be restricted to (names as in configs)."""


def _check_scale(scale: torch.Tensor) -> None:
    if not torch.isfinite(scale).all() or (scale <= 0).any():
        raise ConfigError("quantization scales must be finite and > 0")


def quantize(x: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale), qmin, qmax)`` as int8 (int16 for unsigned 8-bit).

    x ``[...]`` and scale broadcastable to it -> codes ``[...]``.
    """
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    _check_scale(scale)
    q = torch.clamp(torch.round(x / scale), grid.qmin, grid.qmax)
    dtype = torch.int16 if grid.qmax > 127 else torch.int8
    return q.to(dtype)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Real values ``q * scale``: codes ``[...]`` and broadcastable scale -> ``[...]`` float."""
    return q.to(dtype) * torch.as_tensor(scale, dtype=dtype, device=q.device)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``scale * clamp(round(x / scale), qmin, qmax)`` in ``x``'s dtype (simulated quantization).
    Without autograd (no gradient mode, or neither input needing one) the last three steps run
    in place on the quotient: the same values, one allocation instead of four."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return torch.clamp(torch.round(x / scale), grid.qmin, grid.qmax) * scale
    return (x / scale).round_().clamp_(grid.qmin, grid.qmax).mul_(scale)


def scale_neighbours(scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of ``dtype`` that bracket each float32 ``scale``: ``(lo, hi)``, float32.

    scale ``[...]`` -> ``lo <= scale <= hi``, each exactly representable in ``dtype``, so a scale
    picked from them is stored in ``dtype`` without loss. Where ``scale`` lies outside the
    normal range of ``dtype`` (subnormal or near overflow, where its relative precision is lost)
    both are ``scale`` itself: that entry stays float32.
    """
    s = scale.to(torch.float32)
    if dtype == torch.float32:
        return s, s
    fi = torch.finfo(dtype)
    near = s.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, float("inf"))).to(torch.float32)
    down = torch.nextafter(near, torch.full_like(near, float("-inf"))).to(torch.float32)
    nf = near.to(torch.float32)
    lo = torch.where(nf <= s, nf, down)
    hi = torch.where(nf >= s, nf, up)
    ok = (s >= fi.tiny) & (s <= fi.max / 2)
    return torch.where(ok, lo, s), torch.where(ok, hi, s)


def quant_error(x: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Sum of squared quantization errors per slice: x ``[S, n]``, scale ``[S]`` -> ``[S]`` (float64)."""
    x64 = x.to(torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1)
    q = torch.clamp(torch.round(x64 / s), grid.qmin, grid.qmax)
    return ((x64 - s * q) ** 2).sum(dim=1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int values in [-8, 15]) two per byte, low nibble first.

    codes ``[...]`` (any integer dtype, numel N) -> uint8 ``[ceil(N/2)]``. Signed codes are stored
    in two's complement nibbles; :func:`unpack_int4` needs ``signed`` to read them back.
    """
    flat = q.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 15):
        raise ConfigError("pack_int4 takes codes in [-8, 7] (signed) or [0, 15] (unsigned)")
    nib = (flat & 0xF).to(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[ceil(N/2)]`` -> int8 codes ``[N]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise CheckpointError("packed 4-bit data must be a 1-D uint8 tensor")
    if packed.numel() != (numel + 1) // 2:
        raise CheckpointError(
            f"packed 4-bit data holds {packed.numel()} bytes, expected {(numel + 1) // 2} for {numel} values"
        )
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    q = torch.stack([lo, hi], dim=1).reshape(-1)[:numel]
    if signed:
        q = torch.where(q > 7, q - 16, q)
    return q.to(torch.int8)
