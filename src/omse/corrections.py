"""Output-aware corrections on top of kernel-wise MMSE (post-training, no labels).

- :func:`collect_layer_statistics`: one streaming pass recording, for every quantized layer, the
  second moment of the inputs its weight really sees (im2col patches: ``H [groups, K, K]``), the
  mean of those patches (``[groups, K]``) and its MACs. Inputs are captured at ``F.conv2d`` /
  ``F.linear`` themselves, so padding done inside subclassed modules is included.
- :func:`gptq_terms`: output-aware rounding of each kernel (GPTQ-style error feedback through the
  inverse of ``H``), starting from the MMSE scales: minimises ``||W X - Q(W) X||^2``.
- :func:`select_residuals`: residual tensors ``Q2 = quant(W - s1 Q1)`` (and ``Q3``) per kernel,
  chosen greedily by error reduced per extra MAC under ``extra_mac_budget``; the error is the
  layer-output error ``e^T H e`` (``criterion="output"``) or the weight MSE (``"weight"``),
  relative to the layer's output energy.
- :func:`bias_correction`: adds ``(W - Q(W)) E[x]`` to each bias, the expected output shift.
- :func:`equalize`: cross-layer equalization of consecutive layer pairs connected through
  positively homogeneous functions (identity, ReLU); the FP32 function is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .grids import Grid
from .layers import QuantizedLayer, max_code_ratio, quantize_weight_terms, ratio_residual_term
from .primitives import dequantize, quantize

__all__ = [
    "LayerStats",
    "collect_layer_statistics",
    "gptq_terms",
    "select_residuals",
    "bias_correction",
    "equalize",
    "apply_corrections",
]


@dataclass
class LayerStats:
    """Streaming input statistics of one layer: ``H [G, K, K]`` (sum of patch outer products),
    ``mean [G, K]`` (sum of patches), ``count`` patches, and MACs per sample."""

    H: torch.Tensor
    sum: torch.Tensor
    count: int = 0
    macs: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.H / max(self.count, 1)


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def _patches(layer: nn.Module, x: torch.Tensor, conv_args: tuple) -> torch.Tensor:
    """The layer's input as patches ``[G, N, K]`` (K = in/groups * prod(kernel))."""
    if isinstance(layer, nn.Linear) or layer.weight.dim() == 2:
        return x.reshape(1, -1, x.shape[-1])
    stride, padding, dilation, groups = conv_args
    w = layer.weight
    if w.dim() == 3:  # conv1d as 2d
        x = x.unsqueeze(-2)
        ks = (1, w.shape[-1])
        stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
    else:
        ks = tuple(w.shape[-2:])
    if isinstance(padding, str):
        raise NotImplementedError("string padding")
    cols = F.unfold(x, ks, dilation=dilation, padding=padding, stride=stride)  # [B, C*k, L]
    B, CK, L = cols.shape
    K = CK // groups
    return cols.reshape(B, groups, K, L).permute(1, 0, 3, 2).reshape(groups, B * L, K)


@contextlib.contextmanager
def _capture(layers: dict[str, QuantizedLayer], fn) -> Iterator[None]:
    """Call ``fn(layer, input, conv_args)`` whenever F.conv*/F.linear runs with a layer's weight."""
    by_weight = {id(q.layer.weight): q for q in layers.values()}
    orig = {n: getattr(F, n) for n in ("conv1d", "conv2d", "linear")}

    def wrap(name):
        def f(input, weight, bias=None, *args, **kwargs):
            q = by_weight.get(id(weight))
            if q is not None:
                if name == "linear":
                    fn(q, input, None)
                else:
                    a = list(args) + [None] * 4
                    stride = kwargs.get("stride", a[0] if a[0] is not None else 1)
                    padding = kwargs.get("padding", a[1] if a[1] is not None else 0)
                    dilation = kwargs.get("dilation", a[2] if a[2] is not None else 1)
                    groups = kwargs.get("groups", a[3] if a[3] is not None else 1)
                    nd = 1 if name == "conv1d" else 2

                    def tup(v):
                        return tuple(v) if isinstance(v, list | tuple) else (v,) * nd

                    fn(
                        q,
                        input,
                        (
                            tup(stride),
                            padding if isinstance(padding, str) else tup(padding),
                            tup(dilation),
                            groups,
                        ),
                    )
            return orig[name](input, weight, bias, *args, **kwargs)

        return f

    for n in orig:
        setattr(F, n, wrap(n))
    try:
        yield
    finally:
        for n, f in orig.items():
            setattr(F, n, f)


@torch.no_grad()
def collect_layer_statistics(
    model: nn.Module, layers: dict[str, QuantizedLayer], batches: list, progress: bool = False
) -> dict[str, LayerStats]:
    """One pass: per layer ``H``, patch sums and MACs (inputs as the quantized model feeds them)."""
    from .api import run_model

    stats: dict[str, LayerStats] = {}

    def record(q: QuantizedLayer, x: torch.Tensor, conv_args) -> None:
        p = _patches(q.layer, x.detach().to(torch.float64), conv_args)  # [G, N, K]
        st = stats.get(q.name)
        if st is None:
            G, _, K = p.shape
            st = stats[q.name] = LayerStats(
                torch.zeros(G, K, K, dtype=torch.float64), torch.zeros(G, K, dtype=torch.float64)
            )
        st.H += p.transpose(1, 2) @ p
        st.sum += p.sum(1)
        st.count += p.shape[1]
        out_per_sample = p.shape[1] // max(x.shape[0], 1) if x.dim() > 1 else p.shape[1]
        st.macs = int(out_per_sample * q.float_weight.numel())

    with _capture(layers, record):
        for b in tqdm(batches, desc="layer statistics", disable=not progress, leave=False):
            run_model(model, b)
    for q in layers.values():
        if q.name in stats:
            q.macs = stats[q.name].macs
    return stats


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
    q: QuantizedLayer, st: LayerStats, damp: float = 0.01, act_order: bool = True
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


def _kernel_errors(q: QuantizedLayer, st: LayerStats | None, approx: torch.Tensor, criterion: str):
    """Per-kernel error of ``approx`` vs the float weight: ``[out]``, relative to the layer's
    output energy (output criterion) or weight energy (weight criterion)."""
    w = q.float_weight.to(torch.float64)
    e = (w - approx.to(torch.float64)).reshape(w.shape[0], -1)
    if criterion == "weight" or st is None:
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
    stats: dict[str, LayerStats],
    budget: float,
    criterion: str = "output",
    max_terms: int = 2,
) -> dict[str, int]:
    """Give residual tensors to the kernels that buy the most error reduction per extra MAC.

    Extra MACs stay within ``budget * sum(layer MACs)``. Returns the extra kernels per layer.
    """
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
        err_prev = _kernel_errors(q, stats.get(name), approx, criterion)
        out = w.shape[0]
        cost = q.macs / out
        if cfg.target == "int8":  # s2 = s1 / k: the two terms merge into one 8-bit kernel
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
            err_t = _kernel_errors(q, stats.get(name), acc, criterion)
            gain = (err_prev - err_t).clamp_min(0)
            for k in torch.nonzero(gain > 0).squeeze(1).tolist():
                cands.append((float(gain[k]) / cost, name, t, k, cost))
            err_prev = err_t
    cands.sort(key=lambda c: -c[0])
    chosen: dict[str, list[torch.Tensor]] = {
        n: [torch.zeros(q.float_weight.shape[0], dtype=torch.bool) for _ in range(max_terms - 1)]
        for n, q in layers.items()
    }
    spent = 0.0
    for _, name, t, k, cost in cands:
        if spent + cost > allowance:
            continue
        if t > 1 and not chosen[name][t - 2][k]:
            continue  # a third term only on a kernel that has the second
        chosen[name][t - 1][k] = True
        spent += cost
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


@torch.no_grad()
def bias_correction(
    qmodel: nn.Module,
    model: nn.Module | None,
    layers: dict[str, QuantizedLayer],
    batches: list,
    progress: bool = False,
) -> None:
    """Add the expected output shift ``(W - Q(W)) E[x]`` to each layer's bias (E over the
    calibration inputs the quantized model feeds the layer)."""
    stats = collect_layer_statistics(qmodel, layers, batches, progress)
    for name, q in layers.items():
        st = stats.get(name)
        if st is None:
            continue
        G = st.H.shape[0]
        e = q.float_weight.to(torch.float64) - q.dequantized_weight().to(torch.float64)
        eg = e.reshape(G, -1, st.mean.shape[-1])
        shift = torch.einsum("grk,gk->gr", eg, st.mean).reshape(-1)
        layer = q.layer
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(layer.weight.dtype), requires_grad=False)
        else:
            layer.bias.data += shift.to(layer.bias.dtype)


_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.LeakyReLU, nn.Dropout)


@torch.no_grad()
def equalize(
    model: nn.Module, example: torch.Tensor, iterations: int = 4, tol: float = 1e-4
) -> list[tuple[str, str]]:
    """Cross-layer equalization (Nagel et al. 2019) of traced pairs ``A -> (ReLU) -> B``.

    Candidate pairs: in a traced forward, A's output tensor reaches B only through positively
    homogeneous modules (identity, ReLU). Channel ``i`` of A is divided by
    ``r_i = sqrt(range_A_i / range_B_i)`` and B's input channel ``i`` multiplied by it, which evens
    out per-channel weight ranges. Each pair is kept only if the model's output on ``example`` is
    unchanged (relative max error ``tol``): a tensor that something else also reads (a skip
    connection, a functional op) would change it. Returns the equalized pairs.
    """
    from .fold import QUANTIZABLE

    names = {m: n for n, m in model.named_modules()}
    example = example[:4]
    alive: dict[int, torch.Tensor] = {}  # keep traced tensors alive so ids are not reused
    producer: dict[int, nn.Module] = {}
    consumers: dict[nn.Module, list[nn.Module]] = {}
    handles = []

    def pre(mod, inp):
        if inp and isinstance(inp[0], torch.Tensor) and isinstance(mod, QUANTIZABLE):
            src = producer.get(id(inp[0]))
            if src is not None:
                consumers.setdefault(src, []).append(mod)

    def post(mod, inp, out):
        if not isinstance(out, torch.Tensor):
            return
        alive[id(out)] = out
        if isinstance(mod, QUANTIZABLE):
            producer[id(out)] = mod
        elif isinstance(mod, _HOMOGENEOUS) and inp and id(inp[0]) in producer:
            producer[id(out)] = producer[id(inp[0])]

    for m in model.modules():
        if isinstance(m, (*QUANTIZABLE, *_HOMOGENEOUS)):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        ref = model(example)
    finally:
        for h in handles:
            h.remove()
    alive.clear()
    if not isinstance(ref, torch.Tensor):
        return []
    scale = ref.abs().max().clamp_min(1e-12)
    done = []
    for a, cons in consumers.items():
        if len(cons) != 1 or not isinstance(a, nn.Conv2d | nn.Linear):
            continue
        b = cons[0]
        if not isinstance(b, nn.Conv2d | nn.Linear):
            continue
        gb = _groups(b)
        if a.weight.shape[0] != b.weight.shape[1] * gb or _groups(a) not in (1, a.weight.shape[0]):
            continue
        if gb not in (1, b.weight.shape[0]):
            continue
        saved = (a.weight.clone(), None if a.bias is None else a.bias.clone(), b.weight.clone())
        for _ in range(iterations):
            ra = a.weight.reshape(a.weight.shape[0], -1).abs().amax(1)
            if gb == 1:
                rb = b.weight.transpose(0, 1).reshape(b.weight.shape[1], -1).abs().amax(1)
            else:  # depthwise B: its input channel i is its kernel i
                rb = b.weight.reshape(b.weight.shape[0], -1).abs().amax(1)
            r = torch.sqrt(ra / rb.clamp_min(1e-12)).clamp(1e-4, 1e4)
            r = torch.where((ra > 0) & (rb > 0), r, torch.ones_like(r))
            a.weight.div_(r.reshape([-1] + [1] * (a.weight.dim() - 1)))
            if a.bias is not None:
                a.bias.div_(r)
            if gb == 1:
                b.weight.mul_(r.reshape([1, -1] + [1] * (b.weight.dim() - 2)))
            else:
                b.weight.mul_(r.reshape([-1] + [1] * (b.weight.dim() - 1)))
        err = (model(example) - ref).abs().max() / scale
        if bool(torch.isfinite(err)) and err <= tol:
            done.append((names[a], names[b]))
        else:  # something else reads A's output: undo this pair
            a.weight.copy_(saved[0])
            if saved[1] is not None:
                a.bias.copy_(saved[1])
            b.weight.copy_(saved[2])
    return done


def apply_corrections(
    qmodel: nn.Module,
    layers: dict[str, QuantizedLayer],
    batches: list,
    config: QuantConfig,
    progress: bool = False,
) -> dict[str, object]:
    """Output-aware rounding and residual selection (the weight-side corrections), in order."""
    info: dict[str, object] = {}
    need_stats = config.output_aware or config.extra_mac_budget > 0
    if not need_stats:
        return info
    stats = collect_layer_statistics(qmodel, layers, batches, progress)
    if config.output_aware:
        for name, q in tqdm(layers.items(), desc="output-aware", disable=not progress, leave=False):
            if name in stats:
                gptq_terms(q, stats[name])
        if config.extra_mac_budget > 0:  # inputs changed with the new upstream weights
            stats = collect_layer_statistics(qmodel, layers, batches, progress)
    if config.extra_mac_budget > 0:
        info["residual_kernels"] = select_residuals(
            layers, stats, config.extra_mac_budget, config.residual_criterion, config.max_terms
        )
    return info


def _unused() -> None:  # pragma: no cover - keeps imports used by type checkers
    _ = (Grid, quantize, math)
