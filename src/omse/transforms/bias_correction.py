"""Bias correction: the systematic output shift of quantized weights, ``(W - Q(W)) E[x]``, added
back to each layer's bias (Nagel et al. 2019; Finkelstein et al. 2019). Needs the mean patch each
layer gets from the quantized network (``Needs(patch_means=True)``, activations quantized).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import QuantizedLayer
from .statistics import LayerStatistics

__all__ = ["bias_correction"]


@torch.no_grad()
def bias_correction(layers: dict[str, QuantizedLayer], stats: dict[str, LayerStatistics]) -> int:
    """Add the expected output shift ``(W - Q(W)) E[x]`` to each layer's bias, E over the patches
    the quantized model feeds the layer (``stats`` from ``Needs(patch_means=True)`` with the
    activations quantized). Returns the number of layers corrected."""
    done = 0
    for name, q in layers.items():
        st = stats.get(name)
        if st is None or st.sum is None:
            continue
        G = st.sum.shape[0]
        e = q.float_weight.to(torch.float64) - q.dequantized_weight().to(torch.float64)
        eg = e.reshape(G, -1, st.mean.shape[-1])
        shift = torch.einsum("grk,gk->gr", eg, st.mean).reshape(-1)
        layer = q.layer
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(layer.weight.dtype), requires_grad=False)
        else:
            with torch.no_grad():  # in place, so the layer sees the change (version counter)
                layer.bias += shift.to(layer.bias.dtype)
        done += 1
    return done
