"""Granularity of a quantizer's scales, as types.

Each granularity maps a tensor to a 2-D view ``[slices, n]`` whose rows share one scale, and maps
a vector of ``slices`` scales back to a shape that broadcasts against the tensor.

- ``PerTensor()``: one scale; weight ``[out, in, kh, kw] -> scale []``.
- ``PerChannel(axis=0)``: one scale per index along ``axis`` ("kernel-wise" for ``axis=0``);
  weight ``[out, in, kh, kw] -> scale [out, 1, 1, 1]``.
- ``PerGroup(size, axis=1, channel_axis=0)``: one scale per output channel and per block of
  ``size`` consecutive indices along ``axis``; weight ``[out, in, kh, kw] -> scale
  [out, in/size, 1, 1, 1]`` in the grouped layout (see :meth:`PerGroup.to_slices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["Granularity", "PerTensor", "PerChannel", "PerGroup", "parse_granularity"]


class Granularity:
    """Base class: how a tensor is partitioned into slices that share one scale."""

    def to_slices(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def expand(self, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def num_slices(self, x: torch.Tensor) -> int:
        return self.to_slices(x).shape[0]


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor: ``x [...] -> slices [1, numel]``."""

    def to_slices(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)

    def expand(self, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return scale.reshape(())

    def __str__(self) -> str:
        return "per_tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per index along ``axis``: ``x [..., C@axis, ...] -> slices [C, numel/C]``."""

    axis: int = 0

    def _axis(self, x: torch.Tensor) -> int:
        if x.dim() == 0:
            raise ConfigError("PerChannel needs a tensor with at least one dimension")
        ax = self.axis if self.axis >= 0 else x.dim() + self.axis
        if not 0 <= ax < x.dim():
            raise ConfigError(
                f"PerChannel(axis={self.axis}) is out of range for shape {tuple(x.shape)}"
            )
        return ax

    def to_slices(self, x: torch.Tensor) -> torch.Tensor:
        ax = self._axis(x)
        return x.movedim(ax, 0).reshape(x.shape[ax], -1)

    def expand(self, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ax = self._axis(like)
        shape = [1] * like.dim()
        shape[ax] = like.shape[ax]
        return scale.reshape(shape)

    def __str__(self) -> str:
        return "per_channel"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``channel_axis`` index and per block of ``size`` indices along ``axis``.

    weight ``[out, in, kh, kw]`` with ``PerGroup(8)`` -> slices ``[out * in/8, 8*kh*kw]``;
    :meth:`expand` returns scales shaped ``[out, in/8, 1, 1, 1]`` reshaped to broadcast on the
    weight as ``[out, in, 1, 1]`` (each scale repeated over its block).
    """

    size: int
    axis: int = 1
    channel_axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"PerGroup size must be a positive int, got {self.size!r}")

    def _check(self, x: torch.Tensor) -> tuple[int, int]:
        if x.dim() < 2:
            raise ConfigError("PerGroup needs a tensor with at least two dimensions")
        ax, cax = self.axis % x.dim(), self.channel_axis % x.dim()
        if x.shape[ax] % self.size:
            raise ConfigError(
                f"PerGroup(size={self.size}) does not divide dimension {ax} of size {x.shape[ax]}"
            )
        return ax, cax

    def to_slices(self, x: torch.Tensor) -> torch.Tensor:
        ax, cax = self._check(x)
        y = x.movedim((cax, ax), (0, 1))
        c, g = y.shape[0], y.shape[1] // self.size
        y = y.reshape(c, g, self.size, *y.shape[2:])
        return y.reshape(c * g, -1)

    def expand(self, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ax, cax = self._check(like)
        c, g = like.shape[cax], like.shape[ax] // self.size
        s = scale.reshape(c, g, 1).expand(c, g, self.size).reshape(c, g * self.size)
        shape = [1] * like.dim()
        shape[cax], shape[ax] = c, like.shape[ax]
        if cax > ax:
            s = s.t()
        return s.reshape(shape)

    def __str__(self) -> str:
        return f"per_group{self.size}"


def parse_granularity(value: str | Granularity) -> Granularity:
    """Accept a granularity object or one of ``per_tensor``, ``per_channel``, ``per_group<N>``."""
    if isinstance(value, Granularity):
        return value
    v = str(value).strip().lower().replace("-", "_")
    if v in ("per_tensor", "tensor"):
        return PerTensor()
    if v in ("per_channel", "channel", "kernel", "kernelwise", "kernel_wise"):
        return PerChannel(0)
    if v.startswith("per_group"):
        try:
            return PerGroup(int(v[len("per_group") :]))
        except ValueError:
            pass
    raise ConfigError(
        f"granularity {value!r} is unknown; use 'per_tensor', 'per_channel' or 'per_group<N>'"
    )
