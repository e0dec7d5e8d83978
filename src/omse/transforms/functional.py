"""Weights used through functional calls: rewritten into modules, or listed with a reason.

:func:`apply` (Brevitas-style, ``apply(model) -> (model, notes)``) rewrites, on a
:class:`torch.fx.GraphModule` (what onnx2torch produces for an ONNX model) or on a model that
:func:`torch.fx.symbolic_trace` traces, every

- ``torch.matmul(x, W)``, ``x @ W``, ``torch.mm(x, W)``, ``x.matmul(W)`` and onnx2torch's
  ``OnnxMatMul`` module on ``(x, W)``, with ``W`` a 2-D floating parameter, buffer or constant
  (a ``get_attr`` node) on the right: into ``nn.Linear(in, out, bias=False)`` with weight
  ``W^T`` ``[out, in]``;
- ``F.linear(x, W, b)`` with ``W`` (and ``b``, if any) such constants: into ``nn.Linear`` with
  weight ``W`` and bias ``b``,

so that the pipeline wraps and quantizes them as any Linear. The rewritten model computes the same
function (``linear(x, W^T) = x @ W``; checked on an example batch when one is given, to a relative
``1e-5`` of the output's max-norm: a GEMM on the transposed layout may sum in another order). An
eager model is traced only to find such calls: if it has none, or does not trace, or the traced
model differs, it is returned unchanged (its own class and ``forward``), with the reason in the
notes.

:func:`float_weights` lists every parameter the quantized model still holds in float (outside
:class:`~omse.nn.layers.QuantizedLayer`): module/parameter name, type, its share of the model's
weight values and why omse left it float (embedding, normalization not folded, recurrent cell,
attention, a custom module's functional use, skipped by the configuration, ...).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.layers import WRAPPABLE, QuantizedLayer

__all__ = ["apply", "rewrite_graph", "FloatWeight", "float_weights", "float_reason"]

_MATMULS = {torch.matmul, operator.matmul, torch.mm}
_LINEARS = {F.linear, torch._C._nn.linear}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__"}


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


def _is_onnx_matmul(module: nn.Module) -> bool:
    return type(module).__name__ == "OnnxMatMul" and type(module).__module__.startswith(
        "onnx2torch"
    )


def _operands(gm: fx.GraphModule, node: fx.Node, modules: dict) -> tuple | None:
    """``(x, W^T or W as Linear weight [out, in], bias or None, how)`` of a rewritable node."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_function" and node.target in _LINEARS:
        x = args[0]
        w = _attr(gm, args[1] if len(args) > 1 else kwargs.get("weight"))
        bnode = args[2] if len(args) > 2 else kwargs.get("bias")
        b = None if bnode is None else _attr(gm, bnode)
        if w is None or (bnode is not None and b is None):
            return None
        return x, w, b, "linear"
    matmul = (
        (node.op == "call_function" and node.target in _MATMULS)
        or (node.op == "call_method" and node.target in _MATMUL_METHODS)
        or (node.op == "call_module" and _is_onnx_matmul(modules[node.target]))
    )
    if not matmul or len(args) != 2 or kwargs:
        return None
    w = _attr(gm, args[1])
    if w is None or w.dim() != 2:
        return None
    return args[0], w.t(), None, "matmul"


def rewrite_graph(gm: fx.GraphModule) -> list[str]:
    """Rewrite ``gm`` in place (see the module docstring); returns one note per rewrite."""
    modules = dict(gm.named_modules())
    notes, k, sources = [], 0, set()
    for node in list(gm.graph.nodes):
        ops = _operands(gm, node, modules)
        if ops is None:
            continue
        x, w, b, how = ops
        if w.dim() != 2 or not w.is_floating_point() or (b is not None and b.dim() != 1):
            continue
        out, inp = w.shape
        src = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bsrc = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        sources |= {str(n.target) for n in (src, bsrc) if isinstance(n, fx.Node)}
        what = f"{how} {node.name} on {src.target!r} {tuple(w.shape[::-1] if how == 'matmul' else w.shape)}"
        lin = nn.Linear(inp, out, bias=b is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        lin.requires_grad_(False)
        name = f"omse_linear{k}"
        while hasattr(gm, name):
            k += 1
            name = f"omse_linear{k}"
        k += 1
        gm.add_module(name, lin)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        notes.append(f"{what} -> nn.Linear {name!r} ({inp} -> {out})")
    if notes:
        gm.graph.eliminate_dead_code()
        used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        for target in sources - used:  # the weight now lives in its Linear only
            # (before deleting unused submodules: onnx2torch keeps constants as buffers of an
            # `initializers` submodule, which that deletion may remove)
            owner, _, attr = target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return notes


def _same(a, b, rtol: float = 1e-5) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        scale = a.abs().max().clamp_min(1e-12) if a.numel() else 1.0
        return bool(((a - b).abs().max() <= rtol * scale).all()) if a.numel() else True
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y, rtol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rtol) for k in a)
    return type(a) is type(b)


@torch.no_grad()
def apply(model: nn.Module, example=None) -> tuple[nn.Module, list[str]]:
    """Rewrite functional uses of constant weights into ``nn.Linear`` (module docstring).

    ``model``: a :class:`torch.fx.GraphModule` (rewritten in place) or any module (traced; the
    rewritten GraphModule is returned only when it has something rewritten and, with
    ``example`` (one input batch, a tensor), computes the same outputs). Returns ``(model,
    notes)``: the notes say what was rewritten, or why nothing was."""
    if isinstance(model, fx.GraphModule):
        gm = model
        ref = model(example) if isinstance(example, torch.Tensor) else None
    else:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:  # torch.fx raises many types on untraceable code
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return model, [f"not traced by torch.fx ({type(e).__name__}: {first}): left as is"]
        ref = model(example) if isinstance(example, torch.Tensor) else None
    notes = rewrite_graph(gm)
    if not notes:
        return model, []
    if ref is not None and not _same(ref, gm(example)):
        return model, ["the matmul -> Linear rewrite changed the outputs: model left as is"]
    return gm, notes


# -- what stays float ---------------------------------------------------------------------------
@dataclass
class FloatWeight:
    """A parameter left in float: ``name`` (``module.param``), the module's type, its number of
    values, its share of the model's weight values (0..1) and the reason."""

    name: str
    kind: str
    values: int
    share: float
    reason: str


_NORMS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def float_reason(module: nn.Module, skipped: bool = False) -> str:
    """Why omse leaves ``module``'s own parameters in float (one sentence)."""
    if skipped:
        return "skipped by the configuration (QuantConfig.skip)"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding table: a lookup, no multiply for an integer kernel to run"
    if isinstance(module, _NORMS):
        return "normalization scale/shift not folded into a preceding Conv/Linear"
    if isinstance(module, nn.RNNBase):
        return "recurrent layer: omse has no quantized recurrent cell"
    if isinstance(module, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention: its in_proj_weight/out_proj run inside "
            "F.multi_head_attention_forward, which omse does not rewrite"
        )
    if isinstance(module, WRAPPABLE):
        return "not wrapped (the model is not quantized, or the layer is inside another one)"
    if isinstance(module, nn.Bilinear):
        return "bilinear form: no Conv/Linear kernel to quantize"
    if isinstance(module, fx.GraphModule):
        return (
            "used by a graph operation omse does not rewrite (only matmul/linear with the "
            "constant on the right become nn.Linear)"
        )
    if type(module).__module__.split(".")[0] == "torch":
        return f"{type(module).__name__} parameter: not a Conv/Linear weight"
    return (
        f"custom module {type(module).__name__}: its forward uses the parameter directly "
        "(functional use); omse quantizes nn.Conv*/ConvTranspose*/Linear modules and, on models "
        "torch.fx traces, matmul/linear on constants"
    )


def float_weights(model: nn.Module, skipped: set[str] = frozenset()) -> list[FloatWeight]:
    """Every parameter of ``model`` outside a :class:`QuantizedLayer`, by module, with its share
    of all the model's weight values (quantized layers count their float weight) and the reason
    (:func:`float_reason`); ``skipped``: module names the configuration skipped."""
    inside: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLayer):
            inside |= {id(p) for p in m.parameters()}
            total += m.float_weight.numel() + sum(
                p.numel() for n, p in m.layer.named_parameters() if n != "weight"
            )
    rows = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        own = [
            (n, p)
            for n, p in m.named_parameters(recurse=False)
            if id(p) not in inside and id(p) not in seen
        ]
        if not own:
            continue
        skip = any(name == s or name.startswith(s + ".") for s in skipped)
        reason = float_reason(m, skip)
        for n, p in own:
            seen.add(id(p))
            total += p.numel()
            rows.append(
                FloatWeight(f"{name}.{n}" if name else n, type(m).__name__, p.numel(), 0.0, reason)
            )
    for r in rows:
        r.share = r.values / max(total, 1)
    return rows
