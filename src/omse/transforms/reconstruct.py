"""Block reconstruction (BRECQ, Li et al. 2021; QDrop, Wei et al. 2022): the rounding of every
weight of a block learned against the block's FP32 output on calibration data, block after
block, from the exact MMSE steps.

For each block (a module of the model's own hierarchy, :func:`find_blocks`), in the order the
model runs them:

1. its inputs are captured twice over the calibration batches (the forward stops at the block):
   from the FP32 network (``x_fp``) and from the network with every block before it already
   quantized and reconstructed (``x_q``); its target is its own FP32 output on ``x_fp``;
2. Adam learns, for each weight of each of its quantized layers, whether it rounds down or up,
   ``Q = clamp(floor(W/s) + h(V), qmin, qmax)`` (AdaRound's rectified sigmoid ``h`` and annealed
   regulariser, :mod:`omse.transforms.learned`), minimising

       L = sum_out ||f_q(x) - f(x_fp)||^2 / ||f(x_fp)||^2 + reg * mean(1 - |2 h(V) - 1|^beta)

   on minibatches of ``batch`` rows (sampled with a seeded generator, so the result is
   deterministic), with ``x`` the quantized input ``x_q`` where an activation-drop draw says so
   and ``x_fp`` elsewhere;
3. activations in the loop: each quantized layer's input is fake-quantized with its calibrated
   step (straight-through rounding), and with probability ``drop`` per element left in float
   (QDrop; ``drop=0`` is BRECQ's quantized-input reconstruction; ``act_loop=False`` keeps every
   activation float, as AdaRound does);
4. optionally the activation steps (``learn_act``) and the weight steps (``learn_scales``, one
   factor per kernel shared by all of its terms, so a residual's step stays an integer fraction
   of the first term's) are learned too, on a log scale with a tenth of the rounding learning
   rate, from their MMSE values;
5. the hard codes (``h >= 0.5``) are installed if they lower the block's output error on all its
   calibration rows, measured without drop; otherwise the block keeps its start.

``terms="first"`` learns the first weight term's rounding (residual terms stay as they are);
``terms="all"`` learns every term's (a residual term's codes only on the kernels that carry it).

Memory: one block's inputs (both) and target outputs on the calibration set, plus the block's
activations of one minibatch for the backward pass. The weights of the rest of the model are
not touched.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..config import INTEGER_TARGETS
from ..core.primitives import SCALE_DTYPES, dequantize, scale_neighbours
from ..distributed import gather, unshard, world
from ..errors import ConfigError
from ..nn.layers import QuantizedLayer
from ..runtime import progress as progress_bar
from .learned import GAMMA, ZETA, rectified_sigmoid, rounding_regulariser
from .statistics import float_outputs, run_model

__all__ = ["Block", "find_blocks", "reconstruct", "TERMS"]

TERMS = ("first", "all")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """A module reconstructed as one: its module path and its quantized layers (module paths)."""

    name: str
    layers: tuple[str, ...]


def find_blocks(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    patterns: Sequence[str] = (),
    max_layers: int = 8,
) -> list[Block]:
    """The blocks of ``model`` whose quantized layers (``layers``, by module path) are learned
    together, in module order.

    ``patterns`` (``fnmatch`` module names): every module matching one is a block (the outermost
    match wins); each quantized layer outside them is a block of its own. Without patterns the
    hierarchy decides: walking down from the model, a child holding quantized layers is a block
    when it is neither a container (``Sequential``/``ModuleList``/``ModuleDict``) nor holds more
    than ``max_layers`` of them (a residual block, an inverted-residual block, a transformer
    layer); containers and larger modules are walked into; a quantized layer met on the way is
    a block of its own (a stem, a head, a plain ``Sequential`` of convolutions).

    Raises :class:`ConfigError` for a pattern that matches no module holding a quantized layer.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer) and n in layers]

    def inside(path: str) -> tuple[str, ...]:
        return tuple(n for n in names if n == path or n.startswith(path + "."))

    blocks: list[Block] = []
    if patterns:
        claimed: set[str] = set()
        for path, _ in model.named_modules():
            if not path or any(path.startswith(b.name + ".") for b in blocks):
                continue
            if any(fnmatch.fnmatchcase(path, p) for p in patterns) and inside(path):
                blocks.append(Block(path, inside(path)))
                claimed.update(inside(path))
        bad = [
            p
            for p in patterns
            if not any(fnmatch.fnmatchcase(b.name, p) for b in blocks)
            and not any(fnmatch.fnmatchcase(n, p) and inside(n) for n, _ in model.named_modules())
        ]
        if bad:
            raise ConfigError(
                f"LearnedRounding blocks patterns {bad} match no module that holds a quantized "
                f"layer; modules with quantized layers include {names[:6]}"
            )
        blocks += [Block(n, (n,)) for n in names if n not in claimed]
        order = {n: i for i, n in enumerate(names)}
        return sorted(blocks, key=lambda b: order[b.layers[0]])

    def visit(prefix: str, module: nn.Module) -> None:
        for cname, child in module.named_children():
            path = f"{prefix}.{cname}" if prefix else cname
            held = inside(path)
            if not held:
                continue
            if isinstance(child, QuantizedLayer):
                blocks.append(Block(path, (path,)))
            elif isinstance(child, _CONTAINERS) or len(held) > max_layers:
                visit(path, child)
            else:
                blocks.append(Block(path, held))

    visit("", model)
    return blocks


class _Stop(Exception):
    """Raised by the capture hook: the forward has reached the block."""


def _capture(model: nn.Module, module: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` of ``module``'s first call on each batch (the forward stops there),
    in global batch order: under ``torch.distributed`` every rank gets every rank's calls (rank
    ``r`` holds global batches ``r, r+N, ...``), so every rank learns the same block."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    run_model(model, b)
                except _Stop:
                    continue
    finally:
        handle.remove()
    return unshard(gather(calls)) if world()[1] > 1 else calls


class _Rows:
    """A block's calls as rows: the tensor leaves of ``(args, kwargs)`` whose first dimension is
    the call's batch size are concatenated over the calls (``[N, ...]``); every other leaf must
    be the same in all calls. ``take(idx)`` rebuilds ``(args, kwargs)`` for rows ``idx``."""

    def __init__(self, calls: list):
        flat = [tree_flatten(c) for c in calls]
        self.spec = flat[0][1]
        leaves = [f[0] for f in flat]
        sizes = [
            next((v.shape[0] for v in lv if torch.is_tensor(v) and v.dim()), 0) for lv in leaves
        ]
        if any(f[1] != self.spec for f in flat) or not all(sizes):
            raise ConfigError("block inputs differ in structure between calibration batches")
        self.n = sum(sizes)
        self.leaves: list = []
        self.batched: list[bool] = []
        for j, first in enumerate(leaves[0]):
            col = [lv[j] for lv in leaves]
            if all(torch.is_tensor(v) and v.dim() and v.shape[0] == s for v, s in zip(col, sizes)):
                self.leaves.append(torch.cat(col))
                self.batched.append(True)
            else:
                same = all(
                    (torch.equal(v, first) if torch.is_tensor(v) else v == first) for v in col
                )
                if not same:
                    raise ConfigError(
                        "a block input that is not batched differs between calibration batches"
                    )
                self.leaves.append(first)
                self.batched.append(False)

    def take(self, idx: torch.Tensor | slice) -> tuple[tuple, dict]:
        vals = [v[idx] if b else v for v, b in zip(self.leaves, self.batched)]
        return tree_unflatten(vals, self.spec)

    def mixed(self, other: _Rows, idx: torch.Tensor, masks: _Masks):
        """Rows ``idx`` of ``self``, of ``other`` where a mask is True (floating tensor leaves,
        element by element)."""
        vals = []
        for v, o, b in zip(self.leaves, other.leaves, self.batched):
            if b and v.is_floating_point():
                a, f = v[idx], o[idx]
                vals.append(torch.where(masks(a.shape), f, a))
            else:
                vals.append(v[idx] if b else v)
        return tree_unflatten(vals, self.spec)


class _ActQuant(torch.autograd.Function):
    """``s * clamp(round(x / s), qmin, qmax)`` with straight-through rounding (the gradient
    passes to ``x`` inside the grid's range and, LSQ's, to ``s``), each element where ``keep``
    is True left float (QDrop)."""

    @staticmethod
    def forward(ctx, x, s, qmin: int, qmax: int, keep):
        r = x / s
        c = torch.clamp(torch.round(r), qmin, qmax)
        y = c * s
        inside = (r >= qmin) & (r <= qmax)
        if keep is not None:
            y = torch.where(keep, x, y)
            inside = inside | keep
        ctx.save_for_backward(inside, r if s.requires_grad else None, keep)
        ctx.qmin, ctx.qmax = qmin, qmax
        return y

    @staticmethod
    def backward(ctx, grad):
        inside, r, keep = ctx.saved_tensors
        gx = grad * inside
        gs = None
        if r is not None:
            c = torch.clamp(torch.round(r), ctx.qmin, ctx.qmax)
            d = torch.where((r >= ctx.qmin) & (r <= ctx.qmax), c - r, c)
            if keep is not None:
                d = d.masked_fill(keep, 0.0)
            gs = (grad * d).sum().reshape(())
        return gx, gs, None, None, None


class _Masks:
    """Bernoulli(``p``) masks for QDrop from one pool of seeded draws: each mask is a window of
    the (doubled) pool at a seeded random offset, so a mask of any size costs a slice, not a
    draw per element (the pool grows to the largest mask asked for)."""

    def __init__(self, p: float, gen: torch.Generator):
        self.p, self.gen = p, gen
        self.pool = torch.zeros(0, dtype=torch.bool)

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        n = math.prod(shape)
        if n > self.pool.numel() // 2:
            size = 1 << max(n - 1, 1).bit_length()
            half = torch.rand(size, generator=self.gen) < self.p
            self.pool = torch.cat([half, half])
        off = int(torch.randint(0, self.pool.numel() // 2, (1,), generator=self.gen))
        return self.pool[off : off + n].view(shape)


class _Learner:
    """Set as ``QuantizedLayer.learner`` on a block's layers while it is reconstructed: holds the
    rounding logits ``V`` per term, the optional log-step factors, and the activation drop."""

    def __init__(self, qs: dict[str, QuantizedLayer], terms: str, learn_scales: bool, learn_act):
        self.v: dict[tuple[str, int], torch.Tensor] = {}
        self.base: dict[tuple[str, int], torch.Tensor] = {}
        self.w_log: dict[str, torch.Tensor] = {}
        self.a_log: dict[str, torch.Tensor] = {}
        self.fixed: dict[str, torch.Tensor] = {}
        self.drop = 0.0
        self.act_loop = True
        self.soft = True
        self.masks: _Masks | None = None
        for q in qs.values():
            name = q.name
            w = q.float_weight.to(torch.float32)
            learned = range(len(q.terms())) if terms == "all" else range(1)
            fixed = torch.zeros_like(w)
            resid = w
            for t, (codes, scale, _) in enumerate(q.terms()):
                if t in learned:
                    r = resid / scale
                    base = torch.floor(r)
                    frac = (r - base).clamp(1e-4, 1 - 1e-4)
                    p = (frac - GAMMA) / (ZETA - GAMMA)
                    self.base[name, t] = base
                    self.v[name, t] = torch.log(p / (1 - p)).requires_grad_(True)
                else:
                    fixed = fixed + dequantize(codes, scale)
                resid = resid - dequantize(codes, scale)
            self.fixed[name] = fixed
            if learn_scales:
                self.w_log[name] = torch.zeros_like(q.terms()[0][1]).requires_grad_(True)
            if learn_act and q.act_scale is not None and q.a_grid is not None:
                self.a_log[name] = torch.zeros((), requires_grad=True)
        self.qs = qs

    def parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(rounding logits, log-step factors)."""
        return list(self.v.values()), [*self.w_log.values(), *self.a_log.values()]

    def h(self, key) -> torch.Tensor:
        hv = rectified_sigmoid(self.v[key])
        return hv if self.soft else (hv >= 0.5).to(hv.dtype)

    def codes(self, q: QuantizedLayer, t: int) -> torch.Tensor:
        codes, _, mask = q.terms()[t]
        grid = q.w_grid
        c = torch.clamp(self.base[q.name, t] + self.h((q.name, t)), grid.qmin, grid.qmax)
        return c * mask.reshape([-1] + [1] * (c.dim() - 1)) if t else c

    def weight(self, q: QuantizedLayer) -> torch.Tensor:
        w = self.fixed[q.name]
        f = torch.exp(self.w_log[q.name]) if q.name in self.w_log else None
        for t, (_, scale, _) in enumerate(q.terms()):
            if (q.name, t) in self.v:
                w = w + self.codes(q, t) * (scale if f is None else scale * f)
        return w

    def input(self, q: QuantizedLayer, x: torch.Tensor) -> torch.Tensor:
        if not self.act_loop or q.act_scale is None or q.a_grid is None:
            return x
        s = q.act_scale.to(x.dtype)
        if q.name in self.a_log:
            s = s * torch.exp(self.a_log[q.name])
        keep = self.masks(x.shape) if self.drop > 0 and self.masks is not None else None
        return _ActQuant.apply(x, s, q.a_grid.qmin, q.a_grid.qmax, keep)

    def regulariser(self, beta: float) -> torch.Tensor:
        total = sum(v.numel() for v in self.v.values())
        return (
            sum(rounding_regulariser(rectified_sigmoid(v), beta) for v in self.v.values()) / total
        )

    @torch.no_grad()
    def install(self, scale_dtype: str) -> None:
        """Write the hard codes (and learned steps) into the layers."""
        self.soft = False
        for q in self.qs.values():
            name, terms = q.name, q.terms()
            s0 = terms[0][1]
            new0 = s0
            if name in self.w_log:  # the nearest value the checkpoint's scale dtype holds
                want = s0 * torch.exp(self.w_log[name])
                lo, hi = scale_neighbours(want, SCALE_DTYPES[scale_dtype])
                new0 = torch.where(hi - want < want - lo, hi, lo)
            new = []
            for t, (codes, scale, _) in enumerate(terms):
                c = self.codes(q, t).to(codes.dtype) if (name, t) in self.v else codes
                if t == 0:
                    s = new0
                elif q.cfg.target in INTEGER_TARGETS:
                    s = new0 / torch.round(s0 / scale)
                else:
                    s = scale * (new0 / s0)
                new.append((c, s))
            q.set_weight_terms(new, [m for _, _, m in terms[1:]] or None)
            if name in self.a_log:
                q.set_act(q.act_scale * torch.exp(self.a_log[name]), q.a_grid)


def _loss(block: nn.Module, args, kwargs, target: list[torch.Tensor], energy: float):
    out = float_outputs(block(*args, **kwargs))
    return sum(((o - t) ** 2).sum() for o, t in zip(out, target)) / energy


def _eval_loss(block, rows: _Rows, target: list, energy: float, chunk: int) -> float:
    total = 0.0
    with torch.no_grad():
        for i in range(0, rows.n, chunk):
            a, k = rows.take(slice(i, i + chunk))
            total += float(_loss(block, a, k, [t[i : i + chunk] for t in target], energy))
    return total


@torch.no_grad()
def _target(block: nn.Module, qs, rows: _Rows, chunk: int) -> list[torch.Tensor]:
    _set_enabled(qs, False)
    try:
        parts = []
        for i in range(0, rows.n, chunk):
            a, k = rows.take(slice(i, i + chunk))
            parts.append(float_outputs(block(*a, **k)))
    finally:
        _set_enabled(qs, True)
    outs = [torch.cat(col) for col in zip(*parts)]
    if not outs or any(o.shape[0] != rows.n for o in outs):
        raise ConfigError("a block's output has no floating tensor with the batch dimension first")
    return outs


def _set_enabled(layers: dict[str, QuantizedLayer], enabled: bool) -> None:
    for q in layers.values():
        q.set_quant_enabled(enabled)


def reconstruct(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    batches: list,
    blocks: list[Block],
    *,
    iters: int = 500,
    lr: float = 1e-2,
    reg: float = 0.01,
    batch: int = 8,
    drop: float = 0.5,
    act_loop: bool = True,
    learn_act: bool = False,
    learn_scales: bool = False,
    terms: str = "first",
    seed: int = 0,
    warmup: float = 0.2,
    progress: bool = False,
) -> dict[str, dict]:
    """Reconstruct ``blocks`` of ``model`` (whose quantized layers are ``layers``) one after the
    other on the calibration ``batches`` (see the module docstring); installs the learned codes
    in place. Returns, per block, its layers, the relative output error (``sum ||f_q - f||^2 /
    sum ||f||^2`` on all calibration rows) before and after, whether the learned codes were kept,
    and the seconds it took."""
    if terms not in TERMS:
        raise ConfigError(f"terms={terms!r}: use one of {list(TERMS)}")
    info: dict[str, dict] = {}
    for p in model.parameters():  # only the rounding (and steps) learn
        p.requires_grad_(False)
    for bi, blk in enumerate(blocks):
        t0 = time.perf_counter()
        module = model.get_submodule(blk.name)
        qs = {n: layers[n] for n in blk.layers}
        _set_enabled(layers, False)
        try:
            calls_fp = _capture(model, module, batches)
        finally:
            _set_enabled(layers, True)
        calls_q = _capture(model, module, batches)
        if not calls_fp:
            info[blk.name] = {"layers": list(blk.layers), "skipped": "not run by the model"}
            continue
        x_fp, x_q = _Rows(calls_fp), _Rows(calls_q)
        chunk = max(batch, 1)
        target = _target(module, qs, x_fp, chunk)
        energy = float(sum((t**2).sum() for t in target)) or 1.0
        learner = _Learner(qs, terms, learn_scales, learn_act)
        learner.act_loop = act_loop
        learner.soft = False
        for q in qs.values():
            q.learner = learner
        try:
            before = _eval_loss(module, x_q, target, energy, chunk)
            learner.soft = True
            v, logs = learner.parameters()
            groups = [{"params": v, "lr": lr}] + ([{"params": logs, "lr": lr / 10}] if logs else [])
            opt = torch.optim.Adam(groups)
            g = torch.Generator().manual_seed(seed * 100003 + bi)
            learner.masks, learner.drop = _Masks(drop, g), (drop if act_loop else 0.0)
            start = int(warmup * iters)
            n = min(batch, x_q.n)
            with torch.enable_grad():
                for it in progress_bar(
                    range(iters), desc=f"reconstruct {blk.name}", disable=not progress, leave=False
                ):
                    idx = torch.randperm(x_q.n, generator=g)[:n]
                    if act_loop and drop > 0:
                        a, k = x_q.mixed(x_fp, idx, learner.masks)
                    else:
                        a, k = x_q.take(idx)
                    loss = _loss(module, a, k, [t[idx] for t in target], energy * n / x_q.n)
                    if it >= start:
                        tt = (it - start) / max(iters - start, 1)
                        beta = 2 + 18 * 0.5 * (1 + math.cos(math.pi * tt))  # 20 -> 2
                        loss = loss + reg * learner.regulariser(beta)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            learner.soft, learner.drop = False, 0.0
            after = _eval_loss(module, x_q, target, energy, chunk)
            kept = after < before
            if kept:
                learner.install(next(iter(qs.values())).cfg.scale_dtype)
        finally:
            for q in qs.values():
                q.learner = None
        info[blk.name] = {
            "layers": list(blk.layers),
            "before": before,
            "after": min(after, before),
            "kept": kept,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return info
