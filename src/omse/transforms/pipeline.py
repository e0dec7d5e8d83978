"""The quantization pipeline: ``omse.quantize(model, calib_batches, QuantConfig(...))``.

:func:`quantize` copies the model and runs a list of steps chosen by the configuration, each a
model transform that works in place and records what it did in :class:`Calibration`:

0. ``functional``: ``nn.MultiheadAttention`` becomes :class:`~omse.transforms.functional.Attention`
   (four ``nn.Linear``); on a :class:`torch.fx.GraphModule` (or a model torch.fx traces),
   ``matmul``/``linear`` on constant weights become ``nn.Linear`` (:mod:`omse.transforms.functional`;
   an eager model without such calls is left as it is);
1. ``fold``: BatchNorm folded into the layer before it (:func:`~omse.transforms.fold.fold_batchnorm`);
2. ``equalize``: cross-layer equalization (``equalize=True``);
3. ``wrap``: every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear becomes a
   :class:`~omse.nn.layers.QuantizedLayer` with kernel-wise weights (layers left in float are
   listed; at the end :attr:`Calibration.float_weights` lists every float parameter with its share
   of the weights and the reason);
4. ``weights``: learned or GPTQ rounding and residual tensors (``rounding``,
   ``extra_mac_budget``), from one pass of patch moments; learned rounding reconstructs the
   model's blocks one after the other (:mod:`omse.transforms.reconstruct`: two partial passes
   per block to capture its inputs, after one pass of activation histograms for the steps the
   loop starts from) or, ``rounding_scope="layer"``, each layer from its own pass of patch
   moments;
5. ``plan``: for ``target="int8"``, where output and shared quantizers go (a trace, no pass);
6. ``activations``: one pass of input (and output) histograms, then the scales;
7. ``bias``: bias correction from one pass of patch means with the activations quantized.

Passes over the calibration data (:mod:`omse.transforms.statistics`): one per stage whose
statistics must see the stage before: ``weights`` (the float activations of the wrapped model; a
second one when GPTQ rounding precedes residuals, since it changes every layer's input),
``activations`` (after the weights are final) and ``bias`` (after the activations are quantized).

Sharded calibration: under an initialised ``torch.distributed`` process group, call
:func:`quantize` on every rank with that rank's batches (:func:`omse.distributed.shard`, or a
``DataLoader`` with a ``DistributedSampler``); every pass reduces its statistics across the ranks
(:mod:`omse.transforms.statistics`), the steps that trace or check the model on one example
batch (``fold``, ``equalize``, ``plan``) use rank 0's first batch (global batch 0) on every rank,
progress bars show on rank 0 only, and ``Calibration.batches`` counts the batches of all ranks.
Every rank returns the same model as one process given all batches in global order.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantConfig
from ..core.stats import HistogramStats
from ..distributed import broadcast, gather, is_main, run_checked
from ..errors import CalibrationError, ConfigError, UnsupportedLayerError, model_forward_errors
from ..nn.layers import WRAPPABLE, QuantizedLayer
from ..nn.ops import op_quantizers
from . import functional
from .bias_correction import bias_correction
from .calibration import (
    cap_activation_scales,
    gather_site_stats,
    int8_weight_grid,
    keep_first_layer_8bit,
    observe_sites,
    plan_op_quantizers,
    plan_output_quantizers,
    set_activation_scales,
    set_op_scales,
    set_output_scales,
    share_scales,
)
from .equalize import equalize
from .fold import _set_module, fold_batchnorm
from .learned import learned_rounding
from .onnx_import import load_onnx, matmul_constants
from .reconstruct import find_blocks, reconstruct
from .residuals import select_residuals
from .rounding import gptq_terms
from .sensitivity import network_errors
from .statistics import Needs, collect

__all__ = ["quantize", "Calibration", "prepare_batches", "UNSUPPORTED"]

# Layer types with weights that omse does not quantize (left in float with a warning).
UNSUPPORTED = (
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
    rewritten: list[str] = field(default_factory=list)
    """What :func:`omse.transforms.functional.apply` rewrote (matmul/linear -> nn.Linear), or why
    it did not."""
    float_weights: list[functional.FloatWeight] = field(default_factory=list)
    """Every parameter left in float, with its share of the model's weight values and why."""

    @property
    def float_share(self) -> float:
        """The share (0..1) of the model's weight values left in float."""
        return sum(f.share for f in self.float_weights)


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


def _checked_inputs(model: nn.Module, calib_batches: Iterable) -> list:
    batches = prepare_batches(calib_batches)
    _check_weights(model)
    return batches


@dataclass
class _Run:
    """What the steps of one :func:`quantize` call share."""

    qmodel: nn.Module
    batches: list
    config: QuantConfig
    cal: Calibration
    progress: bool
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    out_clamp: dict[str, tuple[float, float]] = field(default_factory=dict)
    shares: dict[str, tuple[str, str]] = field(default_factory=dict)
    caps: dict[str, float] = field(default_factory=dict)
    example: object = None  # global batch 0 (rank 0's first batch under torch.distributed)
    learned_act: dict[str, torch.Tensor] = field(default_factory=dict)


def _fold(r: _Run) -> None:
    with model_forward_errors(0, r.example):
        r.cal.folded = fold_batchnorm(r.qmodel, r.example)


def _equalize(r: _Run) -> None:
    r.cal.equalized = equalize(r.qmodel, r.example)


def _wrap(r: _Run) -> None:
    config, qmodel, cal = r.config, r.qmodel, r.cal
    names = [n for n, _ in qmodel.named_modules() if n]
    bad = config.unmatched_patterns(names)
    if bad:
        warnings.warn(f"override/skip patterns match no module: {bad}", stacklevel=4)
    targets: dict[str, nn.Module] = {}
    floats: list[str] = []
    for name, m in qmodel.named_modules():
        if not name or config.is_skipped(name):
            continue
        if any(name.startswith(t + ".") for t in (*targets, *floats)):
            continue  # inside a wrapped layer, or read by a float layer's own forward
        if isinstance(m, WRAPPABLE):
            targets[name] = m
        elif isinstance(m, UNSUPPORTED) or (
            type(m).__module__.split(".")[0] not in ("torch", "onnx2torch")
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        ):
            floats.append(name)
            cal.left_float.append(f"{name} ({type(m).__name__})")
    cal.left_float += [f"{n} (ONNX MatMul on a constant weight)" for n in matmul_constants(qmodel)]
    if cal.left_float:
        total = sum(p.numel() for p in qmodel.parameters())
        share = sum(p.numel() for n in floats for p in qmodel.get_submodule(n).parameters())
        share /= max(total, 1)
        msg = "omse leaves these layers in float (unsupported type): " + ", ".join(cal.left_float)
        msg += (
            f" ({share:.1%} of the model's weight values stay float in all; "
            "Calibration.float_weights lists each parameter and why)"
        )
        if config.strict:
            raise UnsupportedLayerError(msg + "; remove strict=True or add them to skip")
        warnings.warn(msg, stacklevel=4)
    if not targets:
        raise ConfigError(
            "the model has no Conv/ConvTranspose/Linear layer to quantize (after skip)"
        )
    for name, m in tqdm(targets.items(), desc="weights", disable=not r.progress, leave=False):
        cfg = config.for_layer(name)
        ql = QuantizedLayer(m, name, cfg, int8_weight_grid(cfg, m))
        _set_module(qmodel, name, ql)
        r.layers[name] = ql
    if config.target == "int8":
        keep_first_layer_8bit(qmodel, r.layers, r.example)


def _learned(r: _Run) -> None:
    """Learned rounding, layer after layer: each from the inputs the layers before it (already
    rounded) produce, one pass of that layer's patch moments each."""
    config, info = r.config, {}
    needs = Needs(patch_moments=True)
    items = list(r.layers.items())
    for name, q in tqdm(items, desc="learned rounding", disable=not r.progress, leave=False):
        st = collect(r.qmodel, {name: q}, r.batches, needs, False, "layer statistics")[name]
        info[name] = learned_rounding(
            q, st, config.rounding_iters, config.rounding_lr, config.rounding_reg
        )
    r.cal.corrections["learned_rounding"] = info


def _residuals(r: _Run) -> None:
    stats = collect(
        r.qmodel, r.layers, r.batches, Needs(patch_moments=True), r.progress, "layer statistics"
    )
    c = r.config
    sens = None
    if c.residual_criterion == "network":
        sens = network_errors(r.qmodel, r.layers, r.batches, r.progress)
        r.cal.corrections["network_errors"] = sens
    r.cal.corrections["residual_kernels"] = select_residuals(
        r.layers, stats, c.extra_mac_budget, c.residual_criterion, c.max_terms, sens
    )


def _reconstruct(r: _Run) -> None:
    """Block reconstruction (:mod:`omse.transforms.reconstruct`), with residual kernels chosen
    before (``rounding_terms="all"``) or after it; activation steps calibrated first when the
    activations are in the loop."""
    c = r.config
    if c.rounding_act_loop and any(q.cfg.act_bits is not None for q in r.layers.values()):
        _activations(r)  # the MMSE steps the loop starts from (calibrated again afterwards)
    budget = c.extra_mac_budget > 0
    if budget and c.rounding_terms == "all":
        _residuals(r)
    blocks = find_blocks(r.qmodel, r.layers, c.rounding_blocks)
    info = reconstruct(
        r.qmodel,
        r.layers,
        r.batches,
        blocks,
        iters=c.rounding_iters,
        lr=c.rounding_lr,
        reg=c.rounding_reg,
        batch=c.rounding_batch,
        drop=c.rounding_drop,
        act_loop=c.rounding_act_loop,
        learn_act=c.rounding_learn_act,
        learn_scales=c.rounding_learn_scales,
        terms=c.rounding_terms,
        seed=c.rounding_seed,
        progress=r.progress,
    )
    r.cal.corrections["reconstruction"] = info
    if c.rounding_learn_act:
        r.learned_act = {n: q.act_scale for n, q in r.layers.items() if q.act_scale is not None}
    if budget and c.rounding_terms == "first":
        _residuals(r)


def _weights(r: _Run) -> None:
    """Learned or GPTQ rounding, then residual tensors (chosen from the errors that remain after
    rounding, from a pass of patch moments over the rounded model)."""
    config, layers = r.config, r.layers
    if config.rounding == "learned" and config.rounding_scope == "block":
        _reconstruct(r)
        return
    if config.rounding == "learned":
        _learned(r)
    elif config.rounding == "gptq":
        needs = Needs(patch_moments=True)
        stats = collect(r.qmodel, layers, r.batches, needs, r.progress, "layer statistics")
        for name, q in tqdm(layers.items(), desc="output-aware", disable=not r.progress):
            if stats[name].H is not None:
                gptq_terms(q, stats[name])
    if config.extra_mac_budget > 0:  # a new pass: the rounding changed every layer's input
        _residuals(r)


def _plan(r: _Run) -> None:
    r.out_clamp, r.shares, r.caps = plan_output_quantizers(r.qmodel, r.layers, r.example)
    r.cal.output_quantized = sorted(r.out_clamp)
    plan_op_quantizers(r.qmodel, r.layers, r.example, r.out_clamp)  # between the layers


def _activations(r: _Run) -> None:
    needs = Needs(
        input_histograms=True,
        output_clamp=tuple((n, lo, hi) for n, (lo, hi) in r.out_clamp.items()),
        bins=r.config.act_bins,
    )
    ops = op_quantizers(r.qmodel)
    with observe_sites(ops, r.config.act_bins) as site_stats:
        stats = collect(r.qmodel, r.layers, r.batches, needs, r.progress)
    site_stats = gather_site_stats(site_stats) if ops is not None else {}
    r.cal.stats = {n: st.input for n, st in stats.items() if st.input is not None}
    r.cal.output_stats = {n: st.output for n, st in stats.items() if st.output is not None}
    set_activation_scales(r.layers, r.cal.stats)
    for n, s in r.learned_act.items():  # steps block reconstruction learned
        r.layers[n].set_act(s, r.layers[n].a_grid)
    cap_activation_scales(r.layers, r.caps)
    set_output_scales(r.layers, r.cal.output_stats)
    share_scales(r.layers, r.shares)
    if ops is not None:
        set_op_scales(ops, r.layers, site_stats, r.config.base_layer())


def _bias(r: _Run) -> None:
    stats = collect(r.qmodel, r.layers, r.batches, Needs(patch_means=True), r.progress, "bias")
    r.cal.corrections["bias_corrected"] = bias_correction(r.layers, stats)


def _steps(config: QuantConfig, fold_bn: bool, keyword_inputs: bool) -> list[Callable]:
    """The steps the configuration asks for, in order (see the module docstring)."""
    steps: list[Callable] = []
    if fold_bn and not keyword_inputs:
        steps.append(_fold)
    if config.equalize and not keyword_inputs:
        steps.append(_equalize)
    steps.append(_wrap)
    if config.rounding != "nearest" or config.extra_mac_budget > 0:
        steps.append(_weights)
    if config.target == "int8":
        steps.append(_plan)
    steps.append(_activations)
    if config.bias_correction:
        steps.append(_bias)
    return steps


def _is_onnx(model) -> bool:
    """An ``onnx.ModelProto``, or a path that names an ``.onnx`` file or an existing file (a
    string such as a model's name is neither: :func:`quantize` refuses it as a bad type)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return True
    if not isinstance(model, str | os.PathLike):
        return False
    path = Path(model)
    return path.suffix.lower() == ".onnx" or path.is_file()


def quantize(
    model: nn.Module | str | os.PathLike,
    calib_batches: Iterable,
    config: QuantConfig | None = None,
    *,
    fold_bn: bool = True,
    progress: bool = False,
    calibration: Calibration | None = None,
) -> nn.Module:
    """Return a quantized copy of ``model`` (``model`` itself is not modified).

    Args:
        model: a PyTorch module or :class:`torch.fx.GraphModule`; Conv1d/2d/3d (grouped,
            depthwise), ConvTranspose1d/2d/3d and Linear layers are quantized, and so are
            ``matmul``/``linear`` calls on constant weights in a model torch.fx traces (rewritten
            into Linear layers first); other layers with weights are left in float (listed in a
            warning and, every parameter with its reason, in ``calibration.float_weights``). Or a
            float ONNX model (an ``.onnx`` path or an ``onnx.ModelProto``): converted by
            :func:`~omse.transforms.onnx_import.load_onnx` and checked against onnxruntime on
            the first calibration batch; the result carries ``omse_io`` (the graph's input and
            output names, dynamic axes) for :func:`omse.export_onnx`.
        calib_batches: an iterable of input batches (tensors, ``(inputs, labels)`` tuples or dicts
            of keyword tensors); 16-64 images are typical. Never evaluation data.
        config: :class:`QuantConfig`; default ``QuantConfig()``, the default recipe: W4A8,
            kernel-wise MMSE, residual tensors within 10% extra MACs, bias correction
            (``QuantConfig.preset("fast")`` for plain MMSE).
        fold_bn: fold BatchNorm into the preceding layer first.
        progress: show progress bars.
        calibration: if given, filled with statistics, timings and notes.

    Example:
        >>> import torch, omse
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 10)
        ... ).eval()
        >>> calib = [torch.rand(4, 3, 9, 9) for _ in range(4)]  # 16 calibration inputs
        >>> qmodel = omse.quantize(model, calib)  # the default recipe
        >>> qmodel(calib[0]).shape
        torch.Size([4, 10])
        >>> fast = omse.quantize(model, calib, omse.QuantConfig.preset("fast", act_bits=4))
        >>> sorted(omse.quantized_layers(fast))
        ['0', '3']
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an omse.QuantConfig, got {type(config).__name__}")
    cal = calibration if calibration is not None else Calibration()
    t0 = time.perf_counter()
    if _is_onnx(model):
        calib_batches = run_checked(prepare_batches, calib_batches)  # read once (a generator)
        model = load_onnx(model, sample=calib_batches[0])
    elif not isinstance(model, nn.Module):
        what = f"str {model!r} (no .onnx file)" if isinstance(model, str) else type(model).__name__
        raise ConfigError(
            f"model must be a torch.nn.Module, an .onnx path or an onnx.ModelProto, got {what}"
            + (
                "; a built-in model: omse.zoo.models.build_architecture(name)"
                if what[:3] == "str"
                else ""
            )
        )
    batches = run_checked(_checked_inputs, model, calib_batches)  # all ranks stop together
    if model.training:
        warnings.warn(
            "model is in training mode; omse quantizes an eval() copy (BatchNorm uses running stats)",
            stacklevel=2,
        )
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    qmodel, cal.rewritten = functional.apply(qmodel, batches[0])
    for attr in ("omse_io", "omse_onnx"):  # an fx.GraphModule's deepcopy drops them
        if hasattr(model, attr):
            setattr(qmodel, attr, copy.deepcopy(getattr(model, attr)))
    progress = progress and is_main()
    run = _Run(qmodel, batches, config, cal, progress, example=broadcast(batches[0]))
    for step in _steps(config, fold_bn, isinstance(run.example, dict)):
        step(run)
    skipped = {n for n, _ in qmodel.named_modules() if n and config.is_skipped(n)}
    cal.float_weights = functional.float_weights(qmodel, skipped)
    cal.batches = sum(gather(len(batches)))
    cal.seconds = time.perf_counter() - t0
    qmodel.omse_config = config  # type: ignore[attr-defined]
    return qmodel
