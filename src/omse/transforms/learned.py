"""Learned rounding (AdaRound, Nagel et al. 2020) of the first weight term against each layer's
output on calibration data, from the exact MMSE scales.

Each weight rounds down or up, ``Q = clamp(floor(W/s) + h(V), qmin, qmax)``, with ``h`` the
rectified sigmoid ``clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (``zeta = 1.1``,
``gamma = -0.1``) and ``V`` learned by Adam on

    L(V) = sum_g tr((W - s*Q)_g E[x x^T]_g (W - s*Q)_g^T) / tr(W_g E[x x^T]_g W_g^T)
           + lambda * sum (1 - |2 h(V) - 1|^beta),

the layer's output error on the calibration patches (``E[x x^T]``: the patch second moment of
:class:`~omse.transforms.statistics.LayerStatistics`, so the objective needs no stored
activations) relative to its output energy, plus AdaRound's regulariser with ``beta`` annealed
from 20 to 2 after a warm-up, which drives every ``h`` to 0 or 1. ``V`` starts where ``h`` equals
the fractional part of ``W/s`` (rounding to nearest, up to ties). The steps stay the MMSE ones.

Post-training only: no labels, no end-to-end training. The pipeline reconstructs layer after
layer in module order, each from the inputs the network with the layers before it already
rounded produces (one statistics pass per layer). Deterministic: nothing is sampled.
"""

from __future__ import annotations

import math

import torch

from ..nn.layers import QuantizedLayer
from .statistics import LayerStatistics

__all__ = ["learned_rounding", "rectified_sigmoid", "rounding_regulariser", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, elementwise."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regulariser(hv: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum (1 - |2 h - 1|^beta)``: 0 when every ``h`` is 0 or 1 (a scalar)."""
    return (1 - (2 * hv - 1).abs().pow(beta)).sum()


def _output_error(e: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``sum_g tr(e_g M_g e_g^T)``: e ``[G, R, K]``, M ``[G, K, K]``."""
    return torch.einsum("grk,gkj,grj->", e, M, e)


def learned_rounding(
    q: QuantizedLayer,
    st: LayerStatistics,
    iters: int = 500,
    lr: float = 1e-2,
    reg: float = 0.01,
    warmup: float = 0.2,
) -> dict[str, float]:
    """Learn the rounding of ``q``'s first term against its output on the patches of ``st``
    (needs ``Needs(patch_moments=True)``); installs the new codes. Returns the relative output
    error of nearest rounding and of the learned rounding (``{"nearest": ..., "learned":
    ...}``), both measured on the same patches; if learning does not lower it, the nearest
    codes are kept."""
    codes, scale, _ = q.terms()[0]
    if st is None or st.H is None or scale.numel() not in (1, codes.shape[0]):
        return {}
    G = st.H.shape[0]
    out = codes.shape[0]
    w = q.float_weight.to(torch.float32).reshape(G, out // G, -1)  # [G, R, K]
    s = scale.to(torch.float32).expand(out, *([1] * (codes.dim() - 1))).reshape(G, out // G, 1)
    M = (st.H / max(st.count, 1)).to(torch.float32)  # [G, K, K]
    energy = _output_error(w, M).clamp_min(1e-30)
    grid = q.w_grid
    base = torch.floor(w / s)
    frac = (w / s - base).clamp(1e-4, 1 - 1e-4)
    # h(v) = frac: sigmoid(v) = (frac - gamma) / (zeta - gamma)
    p = (frac - GAMMA) / (ZETA - GAMMA)
    v = torch.log(p / (1 - p)).clone().requires_grad_(True)

    def codes_of(hv: torch.Tensor) -> torch.Tensor:
        return torch.clamp(base + hv, grid.qmin, grid.qmax)

    def rel_error(qv: torch.Tensor) -> float:
        return float(_output_error(w - s * qv, M) / energy)

    nearest = torch.clamp(torch.round(w / s), grid.qmin, grid.qmax)
    err_nearest = rel_error(nearest)
    opt = torch.optim.Adam([v], lr=lr)
    start = int(warmup * iters)
    with torch.enable_grad():
        for it in range(iters):
            hv = rectified_sigmoid(v)
            loss = _output_error(w - s * codes_of(hv), M) / energy
            if it >= start:
                t = (it - start) / max(iters - start, 1)
                beta = 2 + 18 * 0.5 * (1 + math.cos(math.pi * t))  # 20 -> 2
                loss = loss + reg * rounding_regulariser(hv, beta) / hv.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        learned = codes_of((rectified_sigmoid(v) >= 0.5).to(torch.float32))
    err_learned = rel_error(learned)
    if err_learned < err_nearest:
        new = learned.reshape(codes.shape).to(codes.dtype)
        terms = [(new, scale)] + [(c, sc) for c, sc, _ in q.terms()[1:]]
        masks = [m for _, _, m in q.terms()[1:]]
        q.set_weight_terms(terms, masks or None)
    return {"nearest": err_nearest, "learned": min(err_learned, err_nearest)}
