"""BatchNorm folding by tracing one forward pass (works on any module structure, no FX needed).

A BatchNorm whose input, in a traced forward, is exactly the output tensor of a Conv2d/Linear
(each called once) is folded into it: ``W' = W * g / sqrt(v + eps)`` per output channel and
``b' = beta + (b - mean) * g / sqrt(v + eps)``; the BatchNorm becomes ``nn.Identity``. The folded
model is checked against the original on the traced batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OmseError
from .dataflow import module_pairs

__all__ = ["fold_batchnorm", "QUANTIZABLE"]

QUANTIZABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    inv = (
        bn.weight / torch.sqrt(bn.running_var + bn.eps)
        if bn.affine
        else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    )
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    shape = [-1] + [1] * (w.dim() - 1)
    layer.weight.copy_(w * inv.reshape(shape))
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_b = beta + (b - bn.running_mean) * inv
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype))
    else:
        layer.bias.copy_(new_b)


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, example: torch.Tensor, rtol: float = 1e-3
) -> list[tuple[str, str]]:
    """Fold every traceable (layer, BatchNorm) pair of ``model`` in place; returns the pairs.

    ``example``: one input batch the model accepts. Raises :class:`OmseError` if the folded model's
    output differs from the original's by more than ``rtol`` (relative, max-norm).
    """
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    flow = module_pairs(model, example, QUANTIZABLE, _BN)
    ref = flow.output
    pairs = [(a, b) for a, b in flow.pairs if flow.called_once(a, b)]
    if not pairs:
        return []
    for layer, bn in pairs:
        _fold_pair(layer, bn)
        _set_module(model, names[bn], nn.Identity())
    out = model(example)
    model.train(was_training)
    if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor):
        err = (out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        if not torch.isfinite(err) or err > rtol:
            raise OmseError(
                f"BatchNorm folding changed the model's output (relative error {float(err):.2e}); "
                "a BatchNorm input is probably used elsewhere too. Pass fold_bn=False."
            )
    return [(names[a], names[b]) for a, b in pairs]
