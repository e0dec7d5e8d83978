"""Agreement metrics between a reference (FP32) model and its quantized copy, and the Wilson
interval of a measured accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime import progress as progress_bar

__all__ = ["Agreement", "compare_logits", "predict", "sqnr_db", "wilson_interval"]


@dataclass(frozen=True)
class Agreement:
    """``agreement``: fraction of inputs whose top-1 class matches FP32's; ``kl``: mean
    KL(FP32 || quantized) of the softmax outputs (nats); ``top1``: fraction correct against labels
    (None without labels)."""

    agreement: float
    kl: float
    top1: float | None
    n: int


def compare_logits(
    ref: torch.Tensor, out: torch.Tensor, labels: torch.Tensor | None = None
) -> Agreement:
    """ref, out ``[N, classes]`` logits (labels ``[N]``) -> :class:`Agreement`."""
    ref, out = ref.double(), out.double()
    agree = (ref.argmax(1) == out.argmax(1)).double().mean().item()
    lp, lq = torch.log_softmax(ref, 1), torch.log_softmax(out, 1)
    kl = (lp.exp() * (lp - lq)).sum(1).mean().item()
    top1 = None if labels is None else (out.argmax(1) == labels).double().mean().item()
    return Agreement(agree, kl, top1, ref.shape[0])


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: torch.Tensor,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 50,
    progress: bool = False,
    desc: str = "evaluating",
) -> torch.Tensor:
    """Logits of ``model`` on ``inputs [N, ...]`` in batches -> ``[N, classes]``."""
    outs = []
    for i in progress_bar(
        range(0, inputs.shape[0], batch_size), desc=desc, disable=not progress, leave=False
    ):
        x = inputs[i : i + batch_size]
        outs.append(model(preprocess(x) if preprocess else x).float())
    return torch.cat(outs)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||ref||^2 / ||ref - approx||^2)`` in dB."""
    sig = ref.double().pow(2).sum()
    noise = (ref.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(sig / noise))


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``successes / n`` (95% for the
    default ``z``): ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. Unlike the normal
    approximation it stays inside [0, 1] and is sound near 0% and 100%."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(
            f"wilson_interval: need 0 <= successes <= n and n > 0, got {successes}/{n}"
        )
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
