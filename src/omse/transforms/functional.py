"""Weights used through functional calls: rewritten into modules, or listed with a reason.

:func:`apply` first replaces every ``nn.MultiheadAttention`` (its exact type; eager models too: a
module swap on a copy, no tracing) by :class:`Attention`, the same computation from four
``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) that the pipeline quantizes,
checked against the original module on the example batch (:func:`replace_attention`; modules with
``add_bias_kv``/``add_zero_attn`` stay float and listed). Then (Brevitas-style,
``apply(model) -> (model, notes)``) it rewrites, on a
:class:`torch.fx.GraphModule` (what onnx2torch produces for an ONNX model) or on a model that
:func:`torch.fx.symbolic_trace` traces (with :class:`Attention` a leaf), every

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
model differs, it is returned unchanged (its own class and ``forward``; with its attention
replaced), with the reason in the notes.

:func:`float_weights` lists every parameter the quantized model still holds in float (outside
:class:`~omse.nn.layers.QuantizedLayer`): module/parameter name, type, its share of the model's
weight values and why omse left it float (embedding, normalization not folded, recurrent cell,
attention with ``bias_k``/``add_zero_attn`` or not replaced, a custom module's functional use,
skipped by the configuration, ...).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedLayerError, first_line
from ..nn.layers import WRAPPABLE, QuantizedLayer
from .fold import _set_module
from .statistics import run_model

__all__ = [
    "apply",
    "Attention",
    "replace_attention",
    "rewrite_graph",
    "FloatWeight",
    "float_weights",
    "float_reason",
]

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
            owner, _, attr = target.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
        gm.delete_all_unused_submodules()  # after: it may drop a container emptied above
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


# -- nn.MultiheadAttention -> four nn.Linear ------------------------------------------------------
def _float_mask(mask: torch.Tensor | None, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask (``-inf`` there, 0
    elsewhere); a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ConfigError(f"Attention: {name} has dtype {mask.dtype}; pass a bool or float mask")
    return mask


class Attention(nn.Module):
    """:class:`torch.nn.MultiheadAttention`'s computation from four ``nn.Linear`` layers, which
    omse wraps and quantizes as any Linear.

    ``q_proj`` ``[E] -> [E]``, ``k_proj`` ``[kdim] -> [E]``, ``v_proj`` ``[vdim] -> [E]`` (from
    ``in_proj_weight`` ``[3E, E]`` sliced in three, or ``q/k/v_proj_weight``; biases from
    ``in_proj_bias`` ``[3E]``) and ``out_proj`` ``[E] -> [E]``. :meth:`forward` has
    ``nn.MultiheadAttention.forward``'s signature and semantics: ``query`` ``[L, N, E]``
    (``[N, L, E]`` with ``batch_first``, ``[L, E]`` unbatched), ``key``/``value`` ``[S, N,
    kdim/vdim]`` likewise; ``key_padding_mask`` ``[N, S]`` (``[S]``) and ``attn_mask`` ``[L, S]``
    or ``[N*H, L, S]``, boolean (True: not attended) or float (added to the logits);
    ``is_causal``: as torch, a hint that ``attn_mask`` is causal (required), except that with
    ``need_weights=False`` and no ``key_padding_mask`` torch applies the causal mask itself, and
    so does this module. Returns ``(output [L, N, E] or as the input's layout, weights [N, L, S]
    (averaged over heads) or [N, H, L, S], or None)``. Dropout on the attention weights (``p =
    dropout``) applies in training mode only, as in torch. A query whose every key is masked
    gets NaN with ``need_weights=True`` and 0 (then ``out_proj``'s bias) without, as in torch. Not covered (those modules stay
    ``nn.MultiheadAttention``): ``add_bias_kv`` and ``add_zero_attn``."""

    # torch's TransformerEncoder/-Layer read these before their fused fast path (which reads
    # in_proj_weight): with these values they call this module's forward instead
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(
                f"Attention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}"
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = float(dropout), batch_first
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention) -> Attention:
        """The same attention as ``mha`` (weights copied, its training mode kept); raises
        :class:`~omse.errors.UnsupportedLayerError` for ``add_bias_kv`` / ``add_zero_attn``."""
        if _mha_unsupported(mha):
            raise UnsupportedLayerError(
                "nn.MultiheadAttention with bias_k/bias_v or add_zero_attn has no Attention "
                "replacement; it stays float"
            )
        w = mha.out_proj.weight
        att = cls(
            mha.embed_dim,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.chunk(3)
        else:
            ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        bs = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for lin, wi, bi in zip((att.q_proj, att.k_proj, att.v_proj), ws, bs, strict=True):
            lin.weight.copy_(wi)
            if bi is not None:
                lin.bias.copy_(bi)
        att.out_proj.weight.copy_(w)
        if mha.out_proj.bias is not None:
            if att.out_proj.bias is None:  # bias=False leaves the in-projection without one only
                att.out_proj.bias = nn.Parameter(torch.empty_like(mha.out_proj.bias))
            att.out_proj.bias.copy_(mha.out_proj.bias)
        for p in att.parameters():
            p.requires_grad_(any(q.requires_grad for q in mha.parameters()))
        return att.train(mha.training)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
            f"vdim={self.vdim}, dropout={self.dropout}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """See the class docstring (shapes, masks, what is returned)."""
        batched = query.dim() == 3
        if not batched:  # as torch: a batch of one at dim 1
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        tgt, bsz, src = query.shape[0], query.shape[1], key.shape[0]
        h, hd = self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise ConfigError(
                "Attention: is_causal=True needs attn_mask (as nn.MultiheadAttention), e.g. "
                "nn.Transformer.generate_square_subsequent_mask(L)"
            )
        kpm = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and kpm is None and not need_weights:  # torch applies its own causal mask
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=query.device).triu(1)
        mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)  # [1, L, S]
        if kpm is not None:  # [N, S] -> [N*H, 1, S]
            kpm = kpm.reshape(bsz, 1, 1, src).expand(-1, h, -1, -1).reshape(bsz * h, 1, src)
            mask = kpm if mask is None else mask + kpm
        q = self.q_proj(query).reshape(tgt, bsz * h, hd).transpose(0, 1)  # [N*H, L, hd]
        k = self.k_proj(key).reshape(src, bsz * h, hd).transpose(0, 1)  # [N*H, S, hd]
        v = self.v_proj(value).reshape(src, bsz * h, hd).transpose(0, 1)
        logits = torch.bmm(q * math.sqrt(1.0 / hd), k.transpose(1, 2))  # [N*H, L, S]
        if mask is not None:
            logits = logits + mask
        weights = torch.softmax(logits, dim=-1)
        if not need_weights and mask is not None:  # torch's SDPA: a fully masked row gives 0
            weights = weights.masked_fill((mask == float("-inf")).all(-1, keepdim=True), 0.0)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt, bsz, self.embed_dim)
        out = self.out_proj(out)  # [L, N, E]
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.reshape(bsz, h, tgt, src)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights.squeeze(0) if not batched else weights


def _mha_unsupported(m: nn.MultiheadAttention) -> bool:
    return m.bias_k is not None or m.bias_v is not None or bool(m.add_zero_attn)


def replace_attention(model: nn.Module, example=None) -> tuple[nn.Module, list[str]]:
    """Every ``nn.MultiheadAttention`` of ``model`` (its exact type: a subclass may change
    ``forward``) replaced by :class:`Attention`, on a copy (``model`` itself is returned when it
    has none). With ``example`` (a batch: a tensor, or a dict of keyword inputs), each
    replacement is run on the inputs its module saw on it and kept only if its outputs are within
    ``1e-5`` of the max-norm; one note per module says what was done and why."""
    names = [n for n, m in model.named_modules() if type(m) is nn.MultiheadAttention]
    if not names:
        return model, []
    new = copy.deepcopy(model)  # the input is never modified
    calls: dict[str, tuple] = {}

    def hook(name):
        def record(module, args, kwargs, output):
            calls.setdefault(name, (args, kwargs, output))

        return record

    mods = {n: new.get_submodule(n) for n in names}
    if example is not None:
        handles = [
            mods[n].register_forward_hook(hook(n), with_kwargs=True)
            for n in names
            if not _mha_unsupported(mods[n])
        ]
        try:
            with torch.no_grad():
                run_model(new, example)
        finally:
            for hnd in handles:
                hnd.remove()
    notes = []
    for name in names:
        mha = mods[name]
        if _mha_unsupported(mha):
            notes.append(
                f"{name} (nn.MultiheadAttention): kept float: bias_k/bias_v or add_zero_attn"
            )
            continue
        att = Attention.from_mha(mha)
        checked = (
            "not checked (no example batch)"
            if example is None
            else "not called on the example batch: not checked"
        )
        if name in calls:
            args, kwargs, ref = calls[name]
            with torch.no_grad():
                got = att(*args, **kwargs)
            if not _same(ref, got):
                notes.append(
                    f"{name} (nn.MultiheadAttention): the Attention replacement changed its "
                    "outputs on the example batch: kept float"
                )
                continue
            checked = "same outputs on the example batch"
        _set_module(new, name, att)
        notes.append(
            f"{name} (nn.MultiheadAttention) -> omse Attention with nn.Linear q_proj, k_proj, "
            f"v_proj, out_proj ({checked})"
        )
    return new, notes


class _Tracer(fx.Tracer):
    """torch.fx's tracer with :class:`Attention` a leaf (its forward branches on shapes)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Attention) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@torch.no_grad()
def apply(model: nn.Module, example=None) -> tuple[nn.Module, list[str]]:
    """Replace ``nn.MultiheadAttention`` by :class:`Attention` (:func:`replace_attention`), then
    rewrite functional uses of constant weights into ``nn.Linear`` (module docstring).

    ``model``: a :class:`torch.fx.GraphModule` (a rewritten copy is returned) or any module (traced,
    :class:`Attention` a leaf; the rewritten GraphModule is returned only when it has something
    rewritten and, with ``example`` (one input batch, a tensor), computes the same outputs).
    The input model is never modified. Returns ``(model, notes)``: the notes say what was
    replaced or rewritten, or why not."""
    model, notes = replace_attention(model, example)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)  # the input is never modified
    else:
        try:
            gm = _trace(model)
        except Exception as e:  # torch.fx raises many types on untraceable code
            first = first_line(e, 200)
            return model, [
                *notes,
                f"not traced by torch.fx ({type(e).__name__}: {first}): left as is",
            ]
    modules = dict(gm.named_modules())
    if not any(_operands(gm, n, modules) is not None for n in gm.graph.nodes):
        return model, notes  # nothing to rewrite: no forward run, the model is untouched
    ref = model(example) if isinstance(example, torch.Tensor) else None
    rewrites = rewrite_graph(gm)
    if ref is not None and not _same(ref, gm(example)):
        return model, [*notes, "the matmul -> Linear rewrite changed the outputs: model left as is"]
    return gm, notes + rewrites


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
        if _mha_unsupported(module):
            return (
                "nn.MultiheadAttention with bias_k/bias_v or add_zero_attn: omse's Attention "
                "(four quantizable nn.Linear) does not cover them; its weights stay float"
            )
        return (
            "nn.MultiheadAttention not replaced by omse's Attention (a subclass, its outputs "
            "differed on the example batch, or the model was not passed through "
            "omse.transforms.functional.apply; Calibration.rewritten says which): its "
            "in_proj_weight and out_proj are read by F.multi_head_attention_forward"
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
    owners: dict[str, str] = {}  # modules whose own forward reads their children's weights
    for name, m in model.named_modules():
        parent = next((o for o in owners if name.startswith(o + ".")), None)
        if isinstance(m, nn.MultiheadAttention | nn.RNNBase) and parent is None:
            owners[name] = float_reason(m)
        own = [
            (n, p)
            for n, p in m.named_parameters(recurse=False)
            if id(p) not in inside and id(p) not in seen
        ]
        if not own:
            continue
        skip = any(name == s or name.startswith(s + ".") for s in skipped)
        reason = f"inside {parent}: {owners[parent]}" if parent else float_reason(m, skip)
        for n, p in own:
            seen.add(id(p))
            total += p.numel()
            rows.append(
                FloatWeight(f"{name}.{n}" if name else n, type(m).__name__, p.numel(), 0.0, reason)
            )
    for r in rows:
        r.share = r.values / max(total, 1)
    return rows
