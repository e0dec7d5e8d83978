"""Model-level API: ``omse.quantize(model, calib_batches, QuantConfig(...)) -> quantized copy``.

Pipeline: copy -> fold BatchNorm -> wrap every Conv/Linear in a :class:`QuantizedLayer` with
kernel-wise MMSE weights -> one streaming calibration pass (histograms of every quantized layer's
input, weights already quantized) -> MMSE activation scales -> optional residual tensors within a
MAC budget and post-training corrections (:mod:`omse.corrections`).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .errors import CalibrationError, ConfigError, UnsupportedLayerError, model_forward_errors
from .fold import QUANTIZABLE, _set_module, fold_batchnorm
from .graph import layer_routes, shared_input_candidates, trace
from .grids import Grid
from .layers import QuantizedLayer, layer_macs_per_output, share_input_quantizer
from .ranges import make_range_setter
from .stats import HistogramStats

__all__ = [
    "quantize",
    "quantized_layers",
    "set_integer",
    "Calibration",
    "prepare_batches",
    "UNSUPPORTED",
]

OUTPUT_BITS = 8
"""Bits of the output quantizers ``target="int8"`` places (the requantized output of an 8-bit
integer kernel); only input quantizers of this width are shared with them."""

# Layer types with weights that omse does not quantize (left in float with a warning).
UNSUPPORTED = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Conv3d,
    nn.LSTM,
    nn.GRU,
    nn.RNN,
    nn.MultiheadAttention,
    nn.Bilinear,
)


@dataclass
class Calibration:
    """What calibration produced: per-layer input statistics, timings and notes."""

    stats: dict[str, HistogramStats] = field(default_factory=dict)
    seconds: float = 0.0
    folded: list[tuple[str, str]] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)
    equalized: list[tuple[str, str]] = field(default_factory=list)
    corrections: dict = field(default_factory=dict)
    batches: int = 0
    output_stats: dict[str, HistogramStats] = field(default_factory=dict)
    output_quantized: list[str] = field(default_factory=list)


def _first_tensor(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        raise ConfigError(
            "dict batches are passed as keyword arguments; use calib batches of tensors"
        )
    raise CalibrationError(
        f"calibration batch of type {type(batch).__name__} is not a tensor or (inputs, labels) tuple"
    )


def prepare_batches(calib_batches: Iterable) -> list:
    """Validate calibration data; returns a re-iterable list of model inputs.

    Each batch is a tensor, an ``(inputs, ...)`` tuple (the first item is used) or a dict of
    keyword tensors (transformers). One-shot iterators are read once into a list.
    """
    if calib_batches is None:
        raise CalibrationError("calib_batches is None; pass an iterable of input batches")
    if isinstance(calib_batches, torch.Tensor):
        raise CalibrationError(
            "calib_batches is a single tensor; pass an iterable of batches, e.g. [x] or x.split(8)"
        )
    try:
        batches = list(calib_batches) if isinstance(calib_batches, Iterator) else calib_batches
        items = list(batches)
    except TypeError:
        raise CalibrationError(
            f"calib_batches of type {type(calib_batches).__name__} is not iterable"
        ) from None
    if not items:
        raise CalibrationError("calib_batches is empty; omse needs at least one calibration batch")
    out = []
    ref_shape = None
    for i, b in enumerate(items):
        if isinstance(b, dict):
            for k, v in b.items():
                if (
                    isinstance(v, torch.Tensor)
                    and v.is_floating_point()
                    and not torch.isfinite(v).all()
                ):
                    raise CalibrationError(f"calibration batch {i} input {k!r} contains NaN or Inf")
            out.append(b)
            continue
        x = _first_tensor(b)
        if not x.is_floating_point():
            raise CalibrationError(
                f"calibration batch {i} has dtype {x.dtype}; the model's inputs must be floating point"
            )
        if not torch.isfinite(x).all():
            raise CalibrationError(f"calibration batch {i} contains NaN or Inf")
        if ref_shape is None:
            ref_shape = x.shape[1:]
        elif x.shape[1:] != ref_shape:
            raise CalibrationError(
                f"calibration batch {i} has shape {tuple(x.shape)}, unlike batch 0 {tuple((-1, *ref_shape))}"
            )
        out.append(x)
    return out


def run_model(model: nn.Module, batch) -> torch.Tensor:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every :class:`QuantizedLayer` of ``model`` by its (original) layer name."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantizedLayer)}


def set_integer(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run every quantized layer whose input is quantized as an integer runtime does (``True``)
    or as fake quantization (``False``, the default after :func:`quantize`); returns ``model``.

    Integer mode convolves integer codes (exact while :meth:`QuantizedLayer.accumulator_bound`
    stays below 2^24) and rescales by ``s_x * s_w``: the same values in exact arithmetic, but
    independent of summation order, so it matches ``export_onnx(..., integer=True)`` executed by
    onnxruntime. Calibration and corrections always run in fake-quantization mode.
    """
    if not isinstance(enabled, bool):
        raise ConfigError(f"enabled={enabled!r}: use True or False")
    layers = quantized_layers(model)
    if not layers:
        raise ConfigError("the model has no quantized layer; quantize it with omse.quantize first")
    for q in layers.values():
        q.integer = enabled
    if enabled:
        big = [n for n, q in layers.items() if q.accumulator_bound() >= 2**24]
        if big:
            warnings.warn(
                f"layers {big} can accumulate |sums| >= 2^24, which float32 does not hold "
                "exactly: integer mode still computes them, but not bit-exactly in every order",
                stacklevel=2,
            )
    return model


def _check_weights(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        if nn.parameter.is_lazy(p):
            raise ConfigError(
                f"parameter {n!r} is uninitialized (a Lazy module); run the model once on an "
                "input before quantizing it"
            )
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ConfigError(f"parameter {n!r} contains NaN or Inf; omse cannot quantize it")
    for n, b in model.named_buffers():  # e.g. BatchNorm running statistics, folded into weights
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise ConfigError(f"buffer {n!r} contains NaN or Inf; omse cannot quantize the model")


def plan_output_quantizers(
    qmodel: nn.Module, layers: dict[str, QuantizedLayer], example
) -> tuple[dict[str, tuple[float, float]], dict[str, str], dict[str, float]]:
    """For ``target="int8"``: the layers that need an output quantizer, with the ``(lo, hi)``
    range the ``Relu``/``Clip`` after them impose (see :func:`omse.graph.layer_routes`): those
    whose output does not reach exactly one quantized input through quantizer-transparent ops;
    and ``{consumer: producer}`` for the quantized inputs that read such an output beside other
    readers, or a module output whose quantizer another layer's input carries (see
    :class:`~omse.layers.SharedInputQuantizer`): they share that quantizer (one scale per tensor,
    as an integer runtime holds it); and ``{consumer: hi}`` for inputs reached through a ``Clip(.., hi)`` whose
    scale :func:`cap_activation_scales` caps."""
    if all(ql.cfg.act_bits is None for ql in layers.values()):
        return {}, {}, {}  # weight-only: no activation quantizer to place
    if isinstance(example, dict):
        raise ConfigError(
            "target='int8' traces the model on one input tensor; dict (keyword) inputs are not "
            "supported yet: use target='int4'"
        )
    proto, qls = trace(qmodel, example[:1])
    routes = layer_routes(proto)
    names = [ql.name for ql in qls]
    carriers: dict[str, str] = {}  # module -> the layer whose input quantizer it carries
    shares: dict[str, str] = {}
    for layer, module in _producer_modules(
        qmodel, example[:1], [names[i] for i in shared_input_candidates(proto)]
    ).items():
        if layers[layer].cfg.act_bits != OUTPUT_BITS:
            continue  # a narrower input grid stays that layer's own (the skip path keeps 8 bits)
        first = carriers.get(module)
        if first is None:
            carriers[module] = layer
            share_input_quantizer(qmodel, layers[layer], module)
        elif layers[layer].cfg.act_bits == layers[first].cfg.act_bits:
            shares[layer] = first  # two quantized readers of one tensor: one quantizer
    plan, caps = {}, {}
    for i, ql in enumerate(qls):
        r = routes.get(i)
        if r is None:  # the layer does not reach the traced output (unused)
            continue
        fused = r.kind == "fused" and qls[r.consumer].cfg.act_bits is not None
        if fused and set(r.chain) <= {"Relu", "Clip"} and r.clamp[1] < float("inf"):
            caps[qls[r.consumer].name] = r.clamp[1]
        if not fused and ql.cfg.act_bits is not None:  # graph outputs too: QGemm then DQ
            plan[ql.name] = r.clamp
            for j in r.shared:
                if qls[j].cfg.act_bits == OUTPUT_BITS:
                    shares[qls[j].name] = ql.name
    return plan, shares, caps


@torch.no_grad()
def _producer_modules(model: nn.Module, example: torch.Tensor, wanted: list[str]) -> dict[str, str]:
    """``{layer: module}``: for each quantized layer in ``wanted``, the innermost module (not a
    quantized layer) whose forward returns the very tensor the layer gets as input."""
    produced: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keeps traced tensors alive so ids are not reused
    found: dict[str, str] = {}
    handles = []

    def post(_mod, _inp, out, name):
        if isinstance(out, torch.Tensor) and id(out) not in produced:
            produced[id(out)] = name  # "" for a quantized layer: its output quantizer is shared
            alive.append(out)

    def pre(mod, inp):
        if mod.name in wanted and inp and id(inp[0]) in produced:
            found[mod.name] = produced[id(inp[0])]

    for name, m in model.named_modules():
        if not name:
            continue
        if isinstance(m, QuantizedLayer) and m.name in wanted:
            handles.append(m.register_forward_pre_hook(pre))
        tag = "" if isinstance(m, QuantizedLayer) else name
        handles.append(m.register_forward_hook(lambda mod, i, o, n=tag: post(mod, i, o, n)))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in found.items() if v}


def cap_activation_scales(layers: dict[str, QuantizedLayer], caps: dict[str, float]) -> None:
    """Lower each capped input scale so that its grid ends at or below the cap (``qmax * s <=
    hi``): the ``Clip(.., hi)`` in front of the layer (a ReLU6) is then implied by the quantizer,
    and an integer runtime fuses the producer's requantization with it."""
    for name, hi in caps.items():
        ql = layers[name]
        if ql.act_scale is None or ql.a_grid is None or ql.a_grid.qmax <= 0:
            continue
        qmax = torch.tensor(float(ql.a_grid.qmax), dtype=torch.float32)
        s = ql.act_scale.to(torch.float32)
        if bool(qmax * s <= hi):
            continue
        s = torch.tensor(hi, dtype=torch.float32) / qmax
        while bool(qmax * s > hi):  # float32 rounding: step down until the grid fits
            s = torch.nextafter(s, torch.zeros_like(s))
        ql.set_act(s, ql.a_grid)


def set_output_scales(layers: dict[str, QuantizedLayer], stats: dict[str, HistogramStats]) -> None:
    """MMSE (the layer's ``act_method``) output scales for the layers that have output stats, on
    8-bit grids (:data:`OUTPUT_BITS`: what an int8 kernel's requantized output holds, whatever
    the input grids are); unsigned grids for non-negative outputs."""
    for name, st in stats.items():
        layer = layers[name]
        cfg = layer.cfg
        if st.n == 0:
            continue
        grid = Grid(OUTPUT_BITS, "unsigned" if st.nonnegative else cfg.act_grid)  # type: ignore[arg-type]
        layer.set_output(make_range_setter(cfg.act_method).fit(st, grid), grid)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    batches: list,
    bins: int,
    progress: bool,
    out_clamp: dict[str, tuple[float, float]] | None = None,
    out_stats: dict[str, HistogramStats] | None = None,
) -> dict[str, HistogramStats]:
    """One pass over ``batches``: a histogram of every layer's input, and its MACs per sample;
    for the layers in ``out_clamp``, also a histogram of their output clamped to its range
    (filled into ``out_stats``)."""
    stats = {n: HistogramStats(bins) for n in layers}
    out_clamp = out_clamp or {}
    if out_stats is not None:
        out_stats.update({n: HistogramStats(bins) for n in out_clamp})
    handles = []
    batch_idx = [0]

    def hook(mod: QuantizedLayer, inp):
        x = inp[0]
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise CalibrationError(
                f"layer {mod.name!r} got NaN or Inf inputs on calibration batch {batch_idx[0]}"
            )
        stats[mod.name].update(x)
        return None

    def macs_hook(mod: QuantizedLayer, inp, out):
        per_sample = out.numel() // max(out.shape[0], 1) if out.dim() > 1 else out.numel()
        channels = mod.float_weight.shape[0]
        mod.macs = int(per_sample // channels * channels * layer_macs_per_output(mod.layer))
        if out_stats is not None and mod.name in out_clamp:
            lo, hi = out_clamp[mod.name]
            out_stats[mod.name].update(out.clamp(lo, hi))

    for m in layers.values():
        handles.append(m.register_forward_pre_hook(hook))
        handles.append(m.register_forward_hook(macs_hook))
    try:
        for i, b in enumerate(tqdm(batches, desc="calibrating", disable=not progress, leave=False)):
            batch_idx[0] = i
            with model_forward_errors(i, b):
                run_model(model, b)
    finally:
        for h in handles:
            h.remove()
    return stats


def set_activation_scales(
    layers: dict[str, QuantizedLayer], stats: dict[str, HistogramStats]
) -> None:
    """MMSE (or the configured method) input scales; unsigned grids for non-negative inputs."""
    for name, layer in layers.items():
        cfg = layer.cfg
        st = stats.get(name)
        if cfg.act_bits is None or st is None or st.n == 0:
            layer.set_act(None, None)
            continue
        kind = "unsigned" if st.nonnegative else cfg.act_grid
        grid = Grid(cfg.act_bits, kind)  # type: ignore[arg-type]
        scale = make_range_setter(cfg.act_method).fit(st, grid)
        layer.set_act(scale, grid)


def quantize(
    model: nn.Module,
    calib_batches: Iterable,
    config: QuantConfig | None = None,
    *,
    fold_bn: bool = True,
    progress: bool = False,
    calibration: Calibration | None = None,
) -> nn.Module:
    """Return a quantized copy of ``model`` (``model`` itself is not modified).

    Args:
        model: a PyTorch module; Conv1d/Conv2d (grouped, depthwise) and Linear layers are
            quantized, other layers with weights are left in float (listed in a warning).
        calib_batches: an iterable of input batches (tensors, ``(inputs, labels)`` tuples or dicts
            of keyword tensors); 16-64 images are typical. Never evaluation data.
        config: :class:`QuantConfig`; default W4A8, kernel-wise MMSE.
        fold_bn: fold BatchNorm into the preceding layer first.
        progress: show progress bars.
        calibration: if given, filled with statistics, timings and notes.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an omse.QuantConfig, got {type(config).__name__}")
    cal = calibration if calibration is not None else Calibration()
    t0 = time.perf_counter()
    batches = prepare_batches(calib_batches)
    _check_weights(model)
    if model.training:
        warnings.warn(
            "model is in training mode; omse quantizes an eval() copy (BatchNorm uses running stats)",
            stacklevel=2,
        )
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)

    first = batches[0]
    if fold_bn and not isinstance(first, dict):
        with model_forward_errors(0, first):
            cal.folded = fold_batchnorm(qmodel, first)

    if config.equalize and not isinstance(first, dict):
        from .corrections import equalize

        cal.equalized = equalize(qmodel, first)

    names = [n for n, _ in qmodel.named_modules() if n]
    bad = config.unmatched_patterns(names)
    if bad:
        warnings.warn(f"override/skip patterns match no module: {bad}", stacklevel=2)

    targets: dict[str, nn.Module] = {}
    for name, m in qmodel.named_modules():
        if not name or config.is_skipped(name):
            continue
        if isinstance(m, QUANTIZABLE):
            if any(name.startswith(t + ".") for t in targets):
                continue
            targets[name] = m
        elif isinstance(m, UNSUPPORTED) or (
            type(m).__module__.split(".")[0] != "torch"
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        ):
            cal.left_float.append(f"{name} ({type(m).__name__})")
    if cal.left_float:
        msg = "omse leaves these layers in float (unsupported type): " + ", ".join(cal.left_float)
        if config.strict:
            raise UnsupportedLayerError(msg + "; remove strict=True or add them to skip")
        warnings.warn(msg, stacklevel=2)
    if not targets:
        raise ConfigError("the model has no Conv/Linear layer to quantize (after skip)")

    layers: dict[str, QuantizedLayer] = {}
    for name, m in tqdm(targets.items(), desc="weights", disable=not progress, leave=False):
        ql = QuantizedLayer(m, name, config.for_layer(name))
        _set_module(qmodel, name, ql)
        layers[name] = ql

    if config.extra_mac_budget > 0 or config.output_aware:
        from .corrections import apply_corrections

        cal.corrections = apply_corrections(qmodel, layers, batches, config, progress=progress)

    out_clamp: dict[str, tuple[float, float]] = {}
    shares: dict[str, str] = {}
    caps: dict[str, float] = {}
    if config.target == "int8":
        out_clamp, shares, caps = plan_output_quantizers(qmodel, layers, first)
        cal.output_quantized = sorted(out_clamp)

    cal.stats = collect_input_stats(
        qmodel, layers, batches, config.act_bins, progress, out_clamp, cal.output_stats
    )
    set_activation_scales(layers, cal.stats)
    cap_activation_scales(layers, caps)
    set_output_scales(layers, cal.output_stats)
    for consumer, producer in shares.items():  # one quantizer per tensor
        src = layers[producer]
        if src.out_scale is not None:
            layers[consumer].set_act(src.out_scale, src.out_grid)
        elif src.act_scale is not None:
            layers[consumer].set_act(src.act_scale, src.a_grid)
    if config.bias_correction:
        from .corrections import bias_correction

        bias_correction(qmodel, model, layers, batches, progress=progress)
    cal.batches = len(batches)
    cal.seconds = time.perf_counter() - t0
    qmodel.omse_config = config  # type: ignore[attr-defined]
    return qmodel
