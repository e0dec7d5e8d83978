"""Quantized layers: a wrapper that quantizes a Conv/Linear's input and computes with a weight
made of one or more low-precision integer tensors, ``W ~ sum_t s_t * Q_t`` (kernel-wise scales).

The wrapped module keeps its own ``forward`` (padding, grouping, subclasses all work); only its
``weight`` is replaced by the dequantized sum, so the simulation equals the sum of the separate
integer convolutions (by linearity, up to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LayerConfig
from .errors import ConfigError
from .granularity import Granularity
from .grids import Grid
from .primitives import (
    SCALE_DTYPES,
    dequantize,
    fake_quantize,
    quant_error,
    quantize,
    scale_neighbours,
)
from .ranges import make_range_setter

__all__ = ["QuantizedLayer", "quantize_weight_terms", "layer_macs_per_output"]


@torch.no_grad()
def quantize_weight_terms(
    weight: torch.Tensor,
    grid: Grid,
    granularity: Granularity,
    method: str = "mmse",
    terms: int = 1,
    scale_dtype: str = "float16",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize ``weight`` and then ``terms - 1`` successive residuals.

    weight ``[out, ...]`` -> list of ``(codes int8 [out, ...], scale broadcastable [out, 1, ...])``;
    term ``t`` quantizes ``weight - sum_{u<t} s_u * Q_u`` with its own range setting.
    ``scale_dtype`` (``float16`` by default): every fitted scale is moved to whichever of its two
    bracketing ``scale_dtype`` values gives the lower error, so a checkpoint stores it in that
    dtype without loss (a depthwise 3x3 kernel: 4.5 bytes of codes + 2 of scale, not + 4).
    Scales outside the normal range of ``scale_dtype`` stay float32.
    """
    setter = make_range_setter(method)
    dtype = SCALE_DTYPES[scale_dtype]
    out = []
    resid = weight.detach().to(torch.float32)
    for _ in range(terms):
        slices = granularity.to_slices(resid)
        scale = setter.fit(slices, grid).to(torch.float32)
        if dtype != torch.float32:
            lo, hi = scale_neighbours(scale, dtype)
            better_hi = quant_error(slices, hi, grid) < quant_error(slices, lo, grid)
            scale = torch.where(better_hi, hi, lo)
        scale = granularity.expand(scale, resid)
        q = quantize(resid, scale, grid)
        out.append((q, scale))
        resid = resid - dequantize(q, scale)
    return out


def layer_macs_per_output(layer: nn.Module) -> int:
    """Multiply-accumulates per output element: ``in/groups * prod(kernel)`` (Linear: ``in``)."""
    w = layer.weight
    return int(w[0].numel())


class QuantizedLayer(nn.Module):
    """A Conv/Linear with a quantized input and a weight of integer terms.

    Buffers: ``w_codes{t}`` int8 ``[out, ...]`` and ``w_scale{t}`` ``[out, 1, ...]`` per term
    ``t``; ``w_mask{t}`` bool ``[out]`` marks the kernels that carry term ``t >= 1`` (the others'
    codes are zero); ``act_scale`` 0-d (when the input is quantized). ``macs`` is the layer's
    MACs per sample (set during calibration) and ``float_weight`` the original folded weight.
    """

    def __init__(self, layer: nn.Module, name: str, cfg: LayerConfig):
        super().__init__()
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise ConfigError(f"layer {name!r} has no weight tensor to quantize")
        self.layer = layer
        self.name = name
        self.cfg = cfg
        self.w_grid = Grid(cfg.weight_bits, cfg.weight_grid)  # type: ignore[arg-type]
        self.a_grid: Grid | None = None
        self.register_buffer("float_weight", layer.weight.detach().clone(), persistent=False)
        self.register_buffer("act_scale", None)
        self.n_terms = 0
        self.macs = 0
        self.quant_enabled = True
        self.integer = False
        self.set_weight_terms(
            quantize_weight_terms(
                self.float_weight,
                self.w_grid,
                cfg.granularity,
                cfg.weight_method,
                1,
                cfg.scale_dtype,
            )
        )

    # -- weights ----------------------------------------------------------------------------------
    def set_weight_terms(
        self,
        terms: list[tuple[torch.Tensor, torch.Tensor]],
        masks: list[torch.Tensor] | None = None,
    ) -> None:
        """Install integer terms (and per-kernel masks for terms >= 1) and refresh the weight."""
        for t in range(self.n_terms):
            for k in (f"w_codes{t}", f"w_scale{t}", f"w_mask{t}"):
                if hasattr(self, k):
                    delattr(self, k)
        out = self.float_weight.shape[0]
        for t, (q, s) in enumerate(terms):
            m = torch.ones(out, dtype=torch.bool) if t == 0 or masks is None else masks[t - 1]
            shape = [-1] + [1] * (q.dim() - 1)
            q = torch.where(m.reshape(shape), q, torch.zeros_like(q))
            self.register_buffer(f"w_codes{t}", q)
            self.register_buffer(f"w_scale{t}", s.to(torch.float32))
            self.register_buffer(f"w_mask{t}", m)
        self.n_terms = len(terms)
        self.refresh_weight()

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``[(codes, scale, mask)]`` for every term."""
        return [
            (
                getattr(self, f"w_codes{t}"),
                getattr(self, f"w_scale{t}"),
                getattr(self, f"w_mask{t}"),
            )
            for t in range(self.n_terms)
        ]

    def dequantized_weight(self) -> torch.Tensor:
        w = torch.zeros_like(self.float_weight)
        for q, s, _ in self.terms():
            w = w + dequantize(q, s)
        return w

    @torch.no_grad()
    def refresh_weight(self) -> None:
        w = self.dequantized_weight() if self.quant_enabled else self.float_weight
        self.layer.weight.data = w.to(self.layer.weight.dtype)

    def set_quant_enabled(self, enabled: bool) -> None:
        """Switch between the quantized layer and its float (BN-folded) original."""
        self.quant_enabled = bool(enabled)
        self.refresh_weight()

    def extra_kernels(self) -> int:
        """Kernels carrying a residual term, summed over terms >= 1."""
        return int(sum(int(m.sum()) for _, _, m in self.terms()[1:]))

    def extra_macs(self) -> int:
        out = self.float_weight.shape[0]
        return self.macs * self.extra_kernels() // max(out, 1)

    # -- activations ------------------------------------------------------------------------------
    def set_act(self, scale: torch.Tensor | None, grid: Grid | None) -> None:
        self.act_scale = None if scale is None else scale.detach().to(torch.float32).reshape(())
        self.a_grid = grid

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is None or self.a_grid is None or not self.quant_enabled:
            return x
        return fake_quantize(x, self.act_scale, self.a_grid)

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The input's integer codes ``clamp(round(x / s_x), qmin, qmax)`` in ``x``'s dtype."""
        s = self.act_scale.to(x.dtype)
        return torch.clamp(torch.round(x / s), self.a_grid.qmin, self.a_grid.qmax)

    def multiplier(self, term: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Requantization multiplier ``s_x * s_w`` of term ``term`` (``dtype``), shaped to
        broadcast over the layer's output: ``[out, 1, ...]`` for a conv, ``[out]`` for a Linear,
        0-d for a per-tensor scale."""
        s = getattr(self, f"w_scale{term}")
        m = self.act_scale.to(dtype) * s.to(dtype)
        return m.reshape(()) if m.numel() == 1 else self.per_output_channel(m)

    def per_output_channel(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` with one value per output channel ``[out]`` shaped to broadcast over the layer's
        output: ``[out]`` for a Linear, ``[out, 1, ...]`` for a conv."""
        if isinstance(self.layer, nn.Linear):
            return v.reshape(-1)
        return v.reshape([-1] + [1] * (self.float_weight.dim() - 2))

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as an integer runtime computes it: the integer input codes convolved with
        each term's integer weight codes (an exact integer accumulator while every partial sum
        stays below 2^24 in float32, see :meth:`accumulator_bound`), times the multiplier
        ``s_x * s_w``, plus the float bias: ``(acc_0 * m_0 + b) + acc_1 * m_1 + ...``.

        Equal in exact arithmetic to the fake-quantized forward; in float it does not depend on
        the summation order of the convolution, so any runtime that computes the same graph
        (``export_onnx(..., integer=True)``) gets the same outputs.
        """
        xq = self.input_codes(x)
        layer = self.layer
        # the module's own forward (it may pad, as "same"-padding subclasses do) with the codes
        # as its weight and a zero bias (adding 0.0 to an integer is exact)
        zero_bias = None if layer.bias is None else torch.zeros_like(layer.bias, dtype=x.dtype)
        out = None
        for t, (q, _, _) in enumerate(self.terms()):
            params = {"weight": q.to(x.dtype)}
            if zero_bias is not None:
                params["bias"] = zero_bias
            acc = torch.func.functional_call(layer, params, (xq,))
            y = acc * self.multiplier(t, x.dtype)
            if t == 0 and layer.bias is not None:
                y = y + self.per_output_channel(layer.bias.to(x.dtype))
            out = y if out is None else out + y
        return out

    def accumulator_bound(self) -> int:
        """The largest ``|partial sum|`` the integer accumulator can reach: ``max|q_x| *
        max_kernel sum|q_w|`` over the terms (int); below ``2**24`` float32 sums it exactly."""
        if self.a_grid is None:
            return 0
        qx = max(abs(self.a_grid.qmin), abs(self.a_grid.qmax))
        per_kernel = [
            q.abs().to(torch.int64).reshape(q.shape[0], -1).sum(1).max() for q, _, _ in self.terms()
        ]
        return int(qx * max(int(v) for v in per_kernel))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (
            self.integer
            and self.quant_enabled
            and self.act_scale is not None
            and self.a_grid is not None
            and not args
            and not kwargs
        ):
            return self.integer_forward(x)
        return self.layer(self.quantize_input(x), *args, **kwargs)

    def extra_repr(self) -> str:
        a = str(self.a_grid) if self.a_grid is not None else "float"
        return f"name={self.name!r}, weight={self.w_grid} x{self.n_terms} {self.cfg.granularity}, act={a}"
