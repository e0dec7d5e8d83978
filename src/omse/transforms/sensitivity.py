"""Network sensitivity: how much of the model's output error each layer's weight error causes.

:func:`network_errors` quantizes one layer's weights at a time (every other layer float, the
activations as they are) and measures the model's output error on the calibration batches,
relative to the output's energy:

    E_l = sum_b ||f_l(x_b) - f(x_b)||^2 / sum_b ||f(x_b)||^2

``f`` is the float model, ``f_l`` the model with layer ``l``'s current weight terms; every tensor
the model returns counts (a tuple, list or dict of tensors is flattened). Residual selection
(``residual_criterion="network"``, :mod:`omse.transforms.residuals`) divides ``E_l`` by the
layer's own relative output error to weigh its kernels' error reductions in units of model-output
error: a layer whose error reaches the output amplified (a classifier's or CTC head's input, a
narrow bottleneck) gets residual tensors before one whose error the rest of the network absorbs.

Cost: one forward pass over the calibration batches per quantized layer, plus one in float.
Under a ``torch.distributed`` process group each rank runs its own batches and the per-batch sums
are added in global batch order, so every rank gets the errors one process gets.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gather, world
from ..nn.layers import QuantizedLayer
from ..runtime import progress as progress_bar
from .statistics import float_outputs, run_model

__all__ = ["network_errors", "sum_in_batch_order"]


def _outputs(model: nn.Module, batch) -> list[torch.Tensor]:
    return [t.detach() for t in float_outputs(run_model(model, batch))]


def sum_in_batch_order(local: list[float], size: int) -> float:
    """Sum of per-batch values over all ranks in global batch order (rank ``r``'s ``i``-th batch
    is global batch ``i * size + r``): the same float as one process summing them in order."""
    if size == 1:
        return float(sum(local))
    parts = gather(local)
    steps = max(len(p) for p in parts)
    return float(sum(p[i] for i in range(steps) for p in parts if i < len(p)))


@torch.no_grad()
def network_errors(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    batches: list,
    progress: bool = False,
) -> dict[str, float]:
    """``{layer name: E_l}``, the model's relative output error with only that layer's weights
    quantized (see the module docstring). The layers' ``quant_enabled`` flags are restored."""
    if not layers:
        return {}
    _, size = world()
    before = {n: q.quant_enabled for n, q in layers.items()}
    try:
        for q in layers.values():
            q.set_quant_enabled(False)
        ref = [_outputs(model, b) for b in batches]
        if any(not r for r in ref):
            raise ValueError("the model returned no floating-point tensor on a calibration batch")
        energy = sum_in_batch_order(
            [sum(float((t.double() ** 2).sum()) for t in r) for r in ref], size
        )
        energy = max(energy, 1e-300)
        errors = {}
        items = list(layers.items())
        for name, q in progress_bar(items, desc="sensitivity", disable=not progress, leave=False):
            q.set_quant_enabled(True)
            local = []
            for b, r in zip(batches, ref, strict=True):
                out = _outputs(model, b)
                local.append(
                    sum(
                        float(((o.double() - t.double()) ** 2).sum())
                        for o, t in zip(out, r, strict=True)
                    )
                )
            q.set_quant_enabled(False)
            errors[name] = sum_in_batch_order(local, size) / energy
    finally:
        for n, q in layers.items():
            q.set_quant_enabled(before[n])
    return errors
