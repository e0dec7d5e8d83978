"""Output-aware rounding (GPTQ-style) of the first weight term, keeping its MMSE scales.

:func:`gptq_terms` re-rounds each kernel column by column with error feedback through the
inverse of the layer's patch second moment ``H`` (:class:`~omse.transforms.statistics.
LayerStatistics`, ``patch_moments``): it minimises ``||W X - Q(W) X||^2`` over the calibration
patches ``X`` instead of ``||W - Q(W)||^2``. Needs: ``Needs(patch_moments=True)``.
"""

from __future__ import annotations

import torch

from ..nn.layers import QuantizedLayer
from .statistics import LayerStatistics

__all__ = ["gptq_terms"]


def _as_matrix(q: QuantizedLayer, G: int) -> torch.Tensor:
    """Weight ``[out, ...]`` -> ``[G, out/G, K]`` (rows of one group share the input patches)."""
    w = q.float_weight.to(torch.float64)
    out = w.shape[0]
    return w.reshape(G, out // G, -1)


def _damped_inverse_chol(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*mean(diag) I)^-1`` per group: ``[G, K, K]``."""
    K = H.shape[-1]
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    lam = damp * diag.mean(-1).clamp_min(1e-12)
    Hd = H + lam[:, None, None] * torch.eye(K, dtype=H.dtype)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(Hd)
        if not bool((info > 0).any()):
            break
        Hd = Hd + lam[:, None, None] * torch.eye(K, dtype=H.dtype) * 10
    Hinv = torch.cholesky_inverse(L)
    U, _ = torch.linalg.cholesky_ex(Hinv, upper=True)
    return U


@torch.no_grad()
def gptq_terms(
    q: QuantizedLayer, st: LayerStatistics, damp: float = 0.01, act_order: bool = True
) -> None:
    """Re-round term 0 of ``q`` with GPTQ error feedback, keeping its (MMSE) scales."""
    codes, scale, _ = q.terms()[0]
    if scale.dim() == 0 or scale.numel() != codes.shape[0]:
        return  # per-tensor / per-group scales: keep MMSE rounding
    G = st.H.shape[0]
    W = _as_matrix(q, G).clone()  # [G, R, K]
    _, R, K = W.shape
    s = scale.reshape(G, R, 1).to(torch.float64)
    H = st.H.clone()
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    if dead.any():
        H[dead.unsqueeze(-1).expand_as(H) & torch.eye(K, dtype=torch.bool)] = 1.0
        W[dead.unsqueeze(1).expand_as(W)] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)  # [G, K]
        W = torch.gather(W, 2, perm[:, None, :].expand_as(W))
        H = torch.gather(
            torch.gather(H, 1, perm[:, :, None].expand_as(H)), 2, perm[:, None, :].expand_as(H)
        )
    U = _damped_inverse_chol(H, damp)
    grid = q.w_grid
    Q = torch.zeros_like(W)
    block = 128
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].clone()
        Err = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            d = U1[:, i, i].unsqueeze(1)
            qv = torch.clamp(torch.round(w / s[..., 0]), grid.qmin, grid.qmax)
            Q[:, :, i1 + i] = qv
            err = (w - qv * s[..., 0]) / d
            W1[:, :, i:] -= err.unsqueeze(2) * U1[:, i, i:].unsqueeze(1)
            Err[:, :, i] = err
        W[:, :, i2:] -= Err @ U[:, i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        Q = torch.gather(Q, 2, inv[:, None, :].expand_as(Q))
    new_codes = Q.reshape(codes.shape).to(codes.dtype)
    terms = [(new_codes, scale)] + [(c, sc) for c, sc, _ in q.terms()[1:]]
    masks = [m for _, _, m in q.terms()[1:]]
    q.set_weight_terms(terms, masks or None)
