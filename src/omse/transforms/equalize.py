"""Cross-layer equalization (Nagel et al. 2019) of layer pairs joined by positively homogeneous
functions: the FP32 function is unchanged, the per-channel weight ranges are evened out.

:func:`equalize` finds candidate pairs ``A -> (ReLU) -> B`` by tracing one forward pass with
module hooks, rescales them, and keeps a pair only if the model's output on the example is
unchanged (so a tensor something else also reads is never rescaled).
"""

from __future__ import annotations

import torch
from torch import nn

from .dataflow import module_pairs
from .fold import QUANTIZABLE

__all__ = ["equalize"]


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.LeakyReLU, nn.Dropout)


@torch.no_grad()
def equalize(
    model: nn.Module, example: torch.Tensor, iterations: int = 4, tol: float = 1e-4
) -> list[tuple[str, str]]:
    """Cross-layer equalization (Nagel et al. 2019) of traced pairs ``A -> (ReLU) -> B``.

    Candidate pairs: in a traced forward, A's output tensor reaches B only through positively
    homogeneous modules (identity, ReLU). Channel ``i`` of A is divided by
    ``r_i = sqrt(range_A_i / range_B_i)`` and B's input channel ``i`` multiplied by it, which evens
    out per-channel weight ranges. Each pair is kept only if the model's output on ``example`` is
    unchanged (relative max error ``tol``): a tensor that something else also reads (a skip
    connection, a functional op) would change it. Returns the equalized pairs.
    """
    names = {m: n for n, m in model.named_modules()}
    example = example[:4]
    flow = module_pairs(model, example, QUANTIZABLE, QUANTIZABLE, _HOMOGENEOUS)
    ref = flow.output
    consumers: dict[nn.Module, list[nn.Module]] = {}
    for a, b in flow.pairs:
        consumers.setdefault(a, []).append(b)
    if not isinstance(ref, torch.Tensor):
        return []
    scale = ref.abs().max().clamp_min(1e-12)
    done = []
    for a, cons in consumers.items():
        if len(cons) != 1 or not isinstance(a, nn.Conv2d | nn.Linear):
            continue
        b = cons[0]
        if not isinstance(b, nn.Conv2d | nn.Linear):
            continue
        gb = _groups(b)
        if a.weight.shape[0] != b.weight.shape[1] * gb or _groups(a) not in (1, a.weight.shape[0]):
            continue
        if gb not in (1, b.weight.shape[0]):
            continue
        saved = (a.weight.clone(), None if a.bias is None else a.bias.clone(), b.weight.clone())
        for _ in range(iterations):
            ra = a.weight.reshape(a.weight.shape[0], -1).abs().amax(1)
            if gb == 1:
                rb = b.weight.transpose(0, 1).reshape(b.weight.shape[1], -1).abs().amax(1)
            else:  # depthwise B: its input channel i is its kernel i
                rb = b.weight.reshape(b.weight.shape[0], -1).abs().amax(1)
            r = torch.sqrt(ra / rb.clamp_min(1e-12)).clamp(1e-4, 1e4)
            r = torch.where((ra > 0) & (rb > 0), r, torch.ones_like(r))
            a.weight.div_(r.reshape([-1] + [1] * (a.weight.dim() - 1)))
            if a.bias is not None:
                a.bias.div_(r)
            if gb == 1:
                b.weight.mul_(r.reshape([1, -1] + [1] * (b.weight.dim() - 2)))
            else:
                b.weight.mul_(r.reshape([-1] + [1] * (b.weight.dim() - 1)))
        err = (model(example) - ref).abs().max() / scale
        if bool(torch.isfinite(err)) and err <= tol:
            done.append((names[a], names[b]))
        else:  # something else reads A's output: undo this pair
            a.weight.copy_(saved[0])
            if saved[1] is not None:
                a.bias.copy_(saved[1])
            b.weight.copy_(saved[2])
    return done
