"""Residual tensors within an extra-MAC budget: ``W ~ s1*Q1 + s2*Q2`` for the kernels that buy the
most error reduction per extra MAC.

:func:`select_residuals` proposes, per kernel, the quantized residual ``Q2 = quant(W - s1*Q1)``
(``target="int4"``: its own MMSE step; ``target="int8"``: the best step ``s1/k``, so that the two
terms merge into one 8-bit kernel) and gives them greedily to the kernels with the largest error
reduced per extra MAC. The error is the layer-output error ``e^T H e`` (``criterion="output"``,
needs ``Needs(patch_moments=True)``) or the weight MSE (``"weight"``), relative to the layer's
output energy.
"""

from __future__ import annotations

import torch

from ..config import INTEGER_TARGETS
from ..core.primitives import dequantize
from ..nn.layers import QuantizedLayer, max_code_ratio, quantize_weight_terms, ratio_residual_term
from .statistics import LayerStatistics

__all__ = ["select_residuals"]


def _kernel_errors(
    q: QuantizedLayer, st: LayerStatistics | None, approx: torch.Tensor, criterion: str
):
    """Per-kernel error of ``approx`` vs the float weight: ``[out]``, relative to the layer's
    output energy (output criterion) or weight energy (weight criterion)."""
    w = q.float_weight.to(torch.float64)
    e = (w - approx.to(torch.float64)).reshape(w.shape[0], -1)
    if criterion == "weight" or st is None or st.H is None:
        return (e * e).sum(1) / (w * w).sum().clamp_min(1e-300)
    G = st.H.shape[0]
    M = st.second_moment  # [G, K, K]
    eg = e.reshape(G, -1, e.shape[1])
    wg = w.reshape(G, -1, e.shape[1])
    err = torch.einsum("grk,gkj,grj->gr", eg, M, eg).reshape(-1)
    energy = torch.einsum("grk,gkj,grj->gr", wg, M, wg).sum().clamp_min(1e-300)
    return err.clamp_min(0) / energy


@torch.no_grad()
def select_residuals(
    layers: dict[str, QuantizedLayer],
    stats: dict[str, LayerStatistics],
    budget: float,
    criterion: str = "output",
    max_terms: int = 2,
    sensitivity: dict[str, float] | None = None,
    max_bytes: float | None = None,
    kernel_bytes: dict[str, tuple[float, float]] | None = None,
) -> dict[str, int]:
    """Give residual tensors to the kernels that buy the most error reduction per extra MAC.

    Extra MACs stay within ``budget * sum(layer MACs)``. ``sensitivity`` (needed by, and only
    read with, ``criterion="network"``): each layer's model-output error with its weights alone
    quantized. ``max_bytes``: the extra bytes stay within it too, a kernel of layer ``n``
    costing ``kernel_bytes[n] = (per kernel, once per layer and term)`` (see
    :func:`omse.transforms.precision.residual_kernel_bytes`); the kernels then go by error
    reduced per share of both allowances. Returns the extra kernels per layer.
    """
    if (max_bytes is None) != (kernel_bytes is None):
        raise ValueError("max_bytes and kernel_bytes go together")
    if criterion == "network" and sensitivity is None:
        raise ValueError("criterion='network' needs each layer's sensitivity (network_errors)")
    layer_criterion = "output" if criterion == "network" else criterion
    total_macs = sum(q.macs for q in layers.values())
    allowance = budget * total_macs
    cands = []  # (gain per MAC, layer name, term index, kernel, cost)
    proposals: dict[str, list] = {}
    for name, q in layers.items():
        if q.macs == 0:
            continue
        cfg = q.cfg
        w = q.float_weight
        approx = q.dequantized_weight()
        err_prev = _kernel_errors(q, stats.get(name), approx, layer_criterion)
        weight = 1.0
        if criterion == "network":  # layer-relative error -> model-output error
            weight = sensitivity.get(name, 0.0) / max(float(err_prev.sum()), 1e-300)
        out = w.shape[0]
        cost = q.macs / out
        if cfg.target in INTEGER_TARGETS:  # s2 = s1 / k: the two terms merge into one 8-bit kernel
            k_max = max_code_ratio(q.w_grid)
            if k_max < 2:
                continue  # (8-bit weights) no finer residual step fits one 8-bit kernel
            extra_terms = [ratio_residual_term(w - approx, q.terms()[0][1], q.w_grid, k_max)]
        else:
            extra_terms = quantize_weight_terms(
                w - approx,
                q.w_grid,
                cfg.granularity,
                cfg.weight_method,
                max_terms - 1,
                cfg.scale_dtype,
            )
        proposals[name] = extra_terms
        acc = approx
        for t, (c, sc) in enumerate(extra_terms, start=1):
            acc = acc + dequantize(c, sc)
            err_t = _kernel_errors(q, stats.get(name), acc, layer_criterion)
            gain = (err_prev - err_t).clamp_min(0)
            share = cost / max(allowance, 1e-300)
            if kernel_bytes is not None:
                share += kernel_bytes[name][0] / max(max_bytes, 1e-300)
            for k in torch.nonzero(gain > 0).squeeze(1).tolist():
                cands.append((weight * float(gain[k]) / share, name, t, k, cost))
            err_prev = err_t
    cands.sort(key=lambda c: -c[0])
    chosen: dict[str, list[torch.Tensor]] = {
        n: [torch.zeros(q.float_weight.shape[0], dtype=torch.bool) for _ in range(max_terms - 1)]
        for n, q in layers.items()
    }
    spent, spent_bytes = 0.0, 0.0
    for _, name, t, k, cost in cands:
        if spent + cost > allowance:
            continue
        if t > 1 and not chosen[name][t - 2][k]:
            continue  # a third term only on a kernel that has the second
        extra = 0.0
        if kernel_bytes is not None:
            per, once = kernel_bytes[name]
            extra = per + (0.0 if bool(chosen[name][t - 1].any()) else once)
            if spent_bytes + extra > max_bytes:
                continue
        chosen[name][t - 1][k] = True
        spent += cost
        spent_bytes += extra
    counts = {}
    for name, q in layers.items():
        masks = chosen[name]
        if name not in proposals or not any(bool(m.any()) for m in masks):
            continue
        t0 = q.terms()[0]
        terms = [(t0[0], t0[1])] + list(proposals[name])
        # drop trailing terms nobody uses
        while len(terms) > 1 and not bool(masks[len(terms) - 2].any()):
            terms.pop()
        q.set_weight_terms(terms, masks[: len(terms) - 1])
        counts[name] = q.extra_kernels()
    return counts
