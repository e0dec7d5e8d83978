"""Which module feeds which, from one traced forward pass with module hooks.

:func:`module_pairs` runs the model once and records, for every ``consumer``-type module, the
``producer``-type module whose output tensor it received as input, looking through modules of the
``passthrough`` types (their output counts as their input's producer's). It also counts how many
times each module was called, since a module called twice has no single output tensor. Used by
BatchNorm folding (a Conv/Linear feeding a BatchNorm) and cross-layer equalization (a Conv/Linear
feeding another through ReLUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Dataflow", "module_pairs"]


@dataclass
class Dataflow:
    """``pairs``: ``(producer, consumer)`` in call order; ``calls``: module -> times called;
    ``output``: the model's output on the traced example."""

    pairs: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)
    calls: dict[nn.Module, int] = field(default_factory=dict)
    output: object = None

    def called_once(self, *modules: nn.Module) -> bool:
        return all(self.calls.get(m) == 1 for m in modules)


@torch.no_grad()
def module_pairs(
    model: nn.Module,
    example: torch.Tensor,
    producers: tuple[type, ...],
    consumers: tuple[type, ...],
    passthrough: tuple[type, ...] = (),
) -> Dataflow:
    """Trace ``model(example)`` once (see the module docstring); hooks are removed afterwards."""
    flow = Dataflow()
    produced: dict[int, nn.Module] = {}
    alive: list[torch.Tensor] = []  # keep traced tensors alive so their ids are not reused
    handles = []

    def pre(mod, inp):
        flow.calls[mod] = flow.calls.get(mod, 0) + 1
        if isinstance(mod, consumers) and inp and isinstance(inp[0], torch.Tensor):
            src = produced.get(id(inp[0]))
            if src is not None:
                flow.pairs.append((src, mod))

    def post(mod, inp, out):
        if not isinstance(out, torch.Tensor):
            return
        alive.append(out)
        if isinstance(mod, producers):
            produced[id(out)] = mod
        elif isinstance(mod, passthrough) and inp and id(inp[0]) in produced:
            produced[id(out)] = produced[id(inp[0])]

    for m in model.modules():
        if isinstance(m, (*producers, *consumers, *passthrough)):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        flow.output = model(example)
    finally:
        for h in handles:
            h.remove()
        alive.clear()
    return flow
