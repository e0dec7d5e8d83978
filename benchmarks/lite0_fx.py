"""A ``torch.fx``-traceable copy of EfficientNet-Lite0 for the peer benchmark.

``efficientnet_lite_pytorch`` subclasses ``nn.Conv2d`` with its own ``forward`` (TF "SAME" padding
through a ``static_padding`` sub-module) and reuses one ``nn.ReLU6`` module at every activation of
a block and of the stem/head. Module-swapping quantizers (Brevitas, NNCF, AIMET) trip on both: a
swapped conv loses its padding, and one activation quantizer would be shared by many tensors.

:func:`traceable_lite0` rebuilds the network from plain modules, with the same weights and the
same module names as the original (``_conv_stem``, ``_blocks.3._depthwise_conv``, ``_fc``, ...):

- each conv is a plain ``nn.Conv2d``; symmetric SAME padding (every stride-1 conv) becomes the
  conv's own ``padding``, asymmetric padding (stride-2 convs: ``(0, 1, 0, 1)`` or ``(1, 2, 1, 2)``)
  an explicit ``nn.ZeroPad2d`` module named ``<conv>_pad`` just before it;
- every activation is its own ``nn.ReLU6`` module (``_act0``, ``_act1`` in a block, ``_stem_act``,
  ``_head_act``);
- dropout (identity in eval) is dropped; pooling is ``nn.AdaptiveAvgPool2d`` + ``flatten``.

:func:`check_equivalent` verifies that the copy computes the same logits as the original.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["traceable_lite0", "check_equivalent", "TraceableLite0", "LiteBlock"]


def _split_conv(conv: nn.Conv2d) -> tuple[nn.Module | None, nn.Conv2d]:
    """A library ``Conv2dStaticSamePadding`` -> (optional ZeroPad2d, plain nn.Conv2d) with the same
    weights and the same output."""
    pad_mod = getattr(conv, "static_padding", None)
    pad = tuple(pad_mod.padding) if isinstance(pad_mod, nn.ZeroPad2d) else (0, 0, 0, 0)
    left, right, top, bottom = pad
    symmetric = left == right and top == bottom
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=tuple(conv.stride),
        padding=(top, left) if symmetric else 0,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return (None if symmetric else nn.ZeroPad2d(pad)), new


class LiteBlock(nn.Module):
    """MBConv block without squeeze-excitation (Lite): [1x1 expand-BN-ReLU6] -> depthwise-BN-ReLU6
    -> 1x1 project-BN [+ input]."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = block._block_args
        self.expand = args.expand_ratio != 1
        if self.expand:
            _, self._expand_conv = _split_conv(block._expand_conv)
            self._bn0 = block._bn0
            self._act0 = nn.ReLU6()
        pad, self._depthwise_conv = _split_conv(block._depthwise_conv)
        self.has_pad = pad is not None
        if self.has_pad:
            self._depthwise_conv_pad = pad
        self._bn1 = block._bn1
        self._act1 = nn.ReLU6()
        _, self._project_conv = _split_conv(block._project_conv)
        self._bn2 = block._bn2
        s = args.stride if isinstance(args.stride, int) else args.stride[0]
        self.residual = bool(args.id_skip and s == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = self._act0(self._bn0(self._expand_conv(y)))
        if self.has_pad:
            y = self._depthwise_conv_pad(y)
        y = self._act1(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.residual:
            y = y + x
        return y


class TraceableLite0(nn.Module):
    """EfficientNet-Lite0 from plain modules (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model._global_params, "relu_fn", None) != "relu6":
            raise ValueError("only the ReLU6 EfficientNet-Lite models are supported")
        if getattr(model._global_params, "local_pooling", False):
            raise ValueError("local_pooling EfficientNet-Lite variants are not supported")
        pad, self._conv_stem = _split_conv(model._conv_stem)
        self.stem_pad = pad is not None
        if self.stem_pad:
            self._conv_stem_pad = pad
        self._bn0 = model._bn0
        self._stem_act = nn.ReLU6()
        self._blocks = nn.Sequential(*[LiteBlock(b) for b in model._blocks])
        pad, self._conv_head = _split_conv(model._conv_head)
        if pad is not None:
            raise ValueError("unexpected padding on the 1x1 head conv")
        self._bn1 = model._bn1
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = model._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem_pad:
            x = self._conv_stem_pad(x)
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x)
        return self._fc(torch.flatten(x, 1))


def traceable_lite0(model: nn.Module) -> nn.Module:
    """A traceable, module-per-use copy of an ``efficientnet_lite_pytorch`` Lite model (eval)."""
    import copy

    return TraceableLite0(copy.deepcopy(model).eval()).eval()


@torch.no_grad()
def check_equivalent(
    original: nn.Module, adapted: nn.Module, x: torch.Tensor, atol: float = 1e-4
) -> float:
    """Max abs difference of the logits on ``x``; raises if above ``atol`` or if the adapted model
    does not trace with ``torch.fx``."""
    import torch.fx

    a = original.eval()(x)
    b = adapted.eval()(x)
    diff = float((a - b).abs().max())
    if diff > atol or not torch.equal(a.argmax(1), b.argmax(1)):
        raise AssertionError(f"adapted model differs from the original: max |diff| {diff:.3g}")
    traced = torch.fx.symbolic_trace(adapted)
    diff_fx = float((traced(x) - b).abs().max())
    if diff_fx > atol:
        raise AssertionError(f"fx-traced adapted model differs: max |diff| {diff_fx:.3g}")
    return diff
