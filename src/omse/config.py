"""Typed quantization configuration, validated on construction, with per-layer overrides.

Strings are parsed at the edge: ``weight_method="percentile"`` becomes a
:class:`~omse.core.ranges.Percentile`, ``granularity="per_group32"`` a
:class:`~omse.core.granularity.PerGroup`; objects (``Percentile(99.9)``, ``ACIQ("laplace")``) are
taken as they are. :meth:`QuantConfig.to_dict` / :meth:`QuantConfig.from_dict` write and read a
versioned plain dict (JSON, checkpoint headers).

The dataclass defaults are the default recipe, the best measured at a cost users accept by
default: kernel-wise MMSE weights at 4 or 8 bits per layer, chosen by measured effect on the
model's output within 60% of the 8-bit weight bytes (:class:`Budget`, with a guard that grows the
budget when the plan is far worse than 8 bits), 8-bit activations, residual tensors within 10%
extra MACs for the 4-bit layers (merged into one 8-bit kernel at no run-time cost with
``target="int8"``) and bias correction.
:meth:`QuantConfig.preset` names the recipes: ``"fast"`` (plain MMSE, one calibration pass: the
defaults before config version 3), ``"default"`` (``QuantConfig()``) and ``"best"`` (the default
+ learned rounding). A saved dict of version 1, 2 or 3 keeps its old meaning: a field it lacks
takes that version's default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from .core.granularity import Granularity, PerChannel, parse_granularity
from .core.grids import MAX_BITS, MIN_BITS
from .core.primitives import SCALE_DTYPES
from .core.ranges import RangeSetter, make_range_setter, range_setter_to_dict
from .errors import ConfigError

__all__ = [
    "QuantConfig",
    "LayerConfig",
    "Budget",
    "parse_budget",
    "TARGETS",
    "INTEGER_TARGETS",
    "PACKED_INT4_TARGETS",
    "CONFIG_VERSION",
    "PRESETS",
    "layer_config_to_dict",
    "layer_config_from_dict",
]

_GRIDS = ("full", "narrow")
ACT_GRIDS = ("auto", "full", "narrow", "affine")
TARGETS = ("int4", "int8", "tflite")
"""What runs the model: ``int4`` (QDQ ONNX, 4-bit tensors as INT4), ``int8`` (integer kernels of
onnxruntime/OpenVINO: every width in 8-bit containers) or ``tflite`` (LiteRT / TensorFlow Lite
Micro: int8 activations, per-channel INT4 or INT8 filters)."""
INTEGER_TARGETS = frozenset({"int8", "tflite"})
"""Targets whose runtimes run integer kernels between layers: a residual term merges into one
8-bit kernel (``s2 = s1/k``), each layer's output and the ops between layers are requantized,
biases are int32 at ``s_x * s_w``."""
PACKED_INT4_TARGETS = frozenset({"int4", "tflite"})
"""Targets that store weight codes of <= 4 bits two to a byte."""
ROUNDINGS = ("nearest", "gptq", "learned")
SCOPES = ("block", "layer")
ROUNDING_TERMS = ("first", "all")
CONFIG_VERSION = 4
"""Version of :meth:`QuantConfig.to_dict`'s layout (1: methods as names only, a ``seed``; 2: the
plain-MMSE defaults, no residual tensors and no bias correction; 3: the default recipe at one
weight width; 4: per-layer weight widths under a byte ``budget``)."""
_RETIRED = {"residual_terms", "seed"}  # fields of version 1 that nothing read
_OLD_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"extra_mac_budget": 0.0, "bias_correction": False}
)
"""The defaults of versions 1 and 2 that version 3 changed: what a field missing from such a dict
means."""
_V3_DEFAULTS: Mapping[str, Any] = MappingProxyType({"budget": None})
"""The defaults of versions 1-3 that version 4 changed (every layer at ``weight_bits``)."""
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "fast": MappingProxyType({**_OLD_DEFAULTS, **_V3_DEFAULTS}),
        "default": MappingProxyType({}),
        "best": MappingProxyType({"rounding": "learned"}),
    }
)
"""Named recipes, as changes to the dataclass defaults (see :meth:`QuantConfig.preset`)."""


def _method(name: str, value: Any) -> RangeSetter:
    try:
        return make_range_setter(value)
    except ConfigError as e:
        raise ConfigError(f"{name}={value!r}: {e}") from None


def _plain(v: Any) -> Any:
    """A config value as JSON holds it (range setters and granularities by name)."""
    if isinstance(v, Granularity):
        return str(v)
    if hasattr(v, "fit"):
        return range_setter_to_dict(v)
    return v


def _check_bits(name: str, value: int | None, allow_none: bool) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{name} must be set (an int in {MIN_BITS}..{MAX_BITS})")
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        extra = " or None for float activations" if allow_none else ""
        raise ConfigError(
            f"{name}={value!r} is invalid: use an int in {MIN_BITS}..{MAX_BITS}{extra}"
        )


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ConfigError(f"target={target!r}: use one of {list(TARGETS)}")


_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2}


@dataclass(frozen=True)
class Budget:
    """How many bytes the quantized weights may take: per-layer precision selection.

    Each layer's weights are written at ``QuantConfig.weight_bits`` or at 8 bits, whichever the
    selection (:mod:`omse.transforms.precision`) finds buys the least model-output error per
    byte, with every layer's weight bytes as the target writes them (codes, scales, bias) summed
    within the budget.

    Args:
        weight_bytes: a float in (0, 1]: a fraction of the weight bytes of the same model with
            every layer at 8 bits (``0.6`` = 60%); or an int > 1: bytes.
        guard_db: the guard: when the chosen plan's output SQNR on the calibration data (weights
            as chosen, activations quantized) is more than ``guard_db`` dB below that of its
            8-bit-weight version, the budget grows (up to every layer at 8 bits) until it is
            not, and a warning says so. ``None``: no guard.
    """

    weight_bytes: float | int = 0.6
    guard_db: float | None = 3.0

    def __post_init__(self) -> None:
        b = self.weight_bytes
        ok = not isinstance(b, bool) and (
            (isinstance(b, float) and 0.0 < b <= 1.0) or (isinstance(b, int) and b > 1)
        )
        if not ok:
            raise ConfigError(
                f"budget weight_bytes={b!r}: use a fraction of the 8-bit weight bytes in (0, 1] "
                "(e.g. 0.6) or a number of bytes (an int > 1)"
            )
        g = self.guard_db
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | float) or g < 0):
            raise ConfigError(f"budget guard_db={g!r}: use a number of dB >= 0, or None")

    def bytes_for(self, bytes_8bit: int) -> int:
        """The budget in bytes for a model whose weights take ``bytes_8bit`` at 8 bits."""
        if isinstance(self.weight_bytes, float):
            return int(self.weight_bytes * bytes_8bit)
        return int(self.weight_bytes)

    def __str__(self) -> str:
        b = self.weight_bytes
        return f"{b:g}x" if isinstance(b, float) else f"{b} bytes"


def parse_budget(value: Any) -> Budget | None:
    """A :class:`Budget` from what users write: ``None``/``"none"`` (every layer at
    ``weight_bits``), a fraction (``0.6``, ``"0.6"``, ``"0.6x"``, ``"60%"``), bytes (``120000``,
    ``"1.5MB"``, ``"800KiB"``), a dict of :class:`Budget` fields, or a :class:`Budget`."""
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, Mapping):
        return Budget(**value)
    if isinstance(value, bool):
        raise ConfigError(f"budget={value!r}: use a fraction such as 0.6, bytes, or None")
    if isinstance(value, int | float):
        return Budget(float(value) if isinstance(value, float) or value in (0, 1) else value)
    if isinstance(value, str):
        t = value.strip().lower().replace(",", "").replace("_", "")
        if t in ("none", "off", ""):
            return None
        try:
            if t.endswith("%"):
                return Budget(float(t[:-1]) / 100)
            if t.endswith("x"):
                return Budget(float(t[:-1]))
            for unit in sorted(_UNITS, key=len, reverse=True):
                if t.endswith(unit) and t[: -len(unit)].strip():
                    return Budget(int(float(t[: -len(unit)]) * _UNITS[unit]))
            v = float(t)
            return Budget(v if v <= 1 else int(v))
        except ValueError:
            pass
    raise ConfigError(
        f"budget={value!r}: use a fraction of the 8-bit weight bytes (0.6, '0.6x', '60%'), "
        "bytes (120000, '1.5MB', '800KiB') or None"
    )


@dataclass(frozen=True)
class LayerConfig:
    """What one layer gets: weight bits/granularity/method/grid, input-activation bits/method.

    ``act_bits=None`` leaves the layer's input in float. ``weight_method`` / ``act_method``: a
    range setter or its name. ``scale_dtype``: the format weight scales are restricted to and stored in (``float16``,
    ``bfloat16`` or ``float32``). ``target``: the hardware the layer is quantized for (see
    :class:`QuantConfig`).
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    weight_method: str | RangeSetter = "mmse"
    act_method: str | RangeSetter = "mmse"
    granularity: str | Granularity = field(default_factory=lambda: PerChannel(0))
    weight_grid: str = "full"
    act_grid: str = "auto"
    scale_dtype: str = "float16"
    target: str = "int4"

    def __post_init__(self) -> None:
        _check_target(self.target)
        _check_bits("weight_bits", self.weight_bits, allow_none=False)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        if self.target == "tflite" and self.act_bits != 8:
            raise ConfigError(
                f"act_bits={self.act_bits!r} with target='tflite': LiteRT and TensorFlow Lite "
                "Micro run int8 activations; use act_bits=8 (or target='int4' for other widths)"
            )
        for k in ("weight_method", "act_method"):
            object.__setattr__(self, k, _method(k, getattr(self, k)))
        if self.weight_grid not in _GRIDS:
            raise ConfigError(f"weight_grid={self.weight_grid!r}: use 'full' or 'narrow'")
        if self.act_grid not in ACT_GRIDS:
            raise ConfigError(
                f"act_grid={self.act_grid!r}: use 'auto', 'full', 'narrow' or 'affine' (unsigned is "
                "chosen automatically for non-negative inputs)"
            )
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"scale_dtype={self.scale_dtype!r}: use one of {sorted(SCALE_DTYPES)}"
            )


@dataclass(frozen=True)
class QuantConfig:
    """Model-wide quantization settings.

    Args:
        weight_bits: bits of every weight tensor (2..8).
        act_bits: bits of every quantized layer's input activation (2..8), or None for float.
        weight_method / act_method: range setting, ``mmse`` (default), ``minmax``,
            ``percentile`` or ``aciq``, or a range setter object (``Percentile(99.9)``).
        granularity: weight scales ``per_channel`` (kernel-wise, default), ``per_tensor`` or
            ``per_group<N>`` (or a :class:`~omse.core.granularity.Granularity`).
        weight_grid: ``full`` (two's complement, default) or ``narrow`` (symmetric).
        act_grid: the grid of activations that take negative values (non-negative ones always
            get the unsigned grid): ``auto`` (default: ``full``, except a skewed tensor, whose
            negative side is at most a quarter of its positive side, such as a SiLU's output
            ``[-0.28, x]``, which gets ``affine``: :data:`omse.transforms.calibration.SKEW`),
            ``full`` (signed, zero point 0), ``narrow`` or ``affine`` (unsigned codes with a zero point, fitted with the step by least squared
            error: :func:`omse.core.ranges.fit_affine`; for skewed inputs such as a hardswish's
            ``[-0.375, 6]``, where a signed grid spends half its codes on the small negative side).
        overrides: per-layer changes by module name (``fnmatch`` patterns allowed), e.g.
            ``{"_conv_stem": {"weight_bits": 8, "act_bits": 8}}``; the first matching pattern wins.
        skip: module names (patterns allowed) left entirely in float.
        budget: per-layer weight precision (a :class:`Budget`, or what :func:`parse_budget`
            reads): each layer at ``weight_bits`` or at 8 bits, chosen by its estimated effect
            on the model's output, the weights within the budget, with a guard against a plan
            far worse than 8 bits (default ``Budget(0.6)``: 60% of the 8-bit weight bytes, 3 dB).
            ``None``: every layer at ``weight_bits``. Layers whose ``weight_bits`` an override
            sets keep it. With ``target="int8"`` every width is written in 8 bits, so the
            cheapest error is every layer at 8 bits.
        extra_mac_budget: extra integer MACs allowed for residual tensors, as a fraction of the
            quantized model's MACs (default 0.10; 0 = none; 1.0 = every kernel gets one extra
            term); under a weight ``budget``, of the MACs of the layers below 8 bits, which alone
            get residual tensors. With ``target="int8"`` the terms merge into one 8-bit kernel: no extra MACs
            at run time.
        residual_criterion: how kernels are ranked for the budget: ``output`` (layer-output error
            on calibration data, default), ``weight`` (weight MSE) or ``network`` (layer-output
            error weighed by the layer's measured effect on the model's output: one extra pass
            over the calibration batches per layer, :mod:`omse.transforms.sensitivity`).
        max_terms: the most tensors one kernel may get (1 + residual terms).
        bias_correction / equalize: post-training corrections (see README); bias correction
            is on by default, equalization off.
        rounding: how the first weight term rounds: ``nearest`` (default), ``gptq`` (GPTQ-style
            error feedback; ``output_aware=True`` is the same) or ``learned`` (AdaRound-style,
            learned against each block's FP32 output on calibration data, from the MMSE steps).
        rounding_scope: what ``rounding="learned"`` reconstructs: ``"layer"`` (default, the best
            measured on EfficientNet-Lite0 at the CPU budget: each layer against its output from
            its patch moments, no activations stored: :mod:`omse.transforms.learned`) or
            ``"block"`` (the model's own blocks, one after the other, with activations in the
            loop, BRECQ/QDrop-style: :mod:`omse.transforms.reconstruct`).
        rounding_blocks: module-name patterns (``fnmatch``) of the blocks; default: found from
            the module hierarchy (:func:`omse.transforms.reconstruct.find_blocks`).
        rounding_iters / rounding_lr / rounding_reg: Adam iterations (per block or layer),
            learning rate and regulariser weight of ``rounding="learned"``.
        rounding_batch: calibration rows per iteration of block reconstruction.
        rounding_act_loop / rounding_drop: quantize the activations inside a block while its
            rounding is learned, each element left float with probability ``rounding_drop``
            (QDrop; 0 = always quantized).
        rounding_learn_act / rounding_learn_scales: learn the activation steps / the weight
            steps (one factor per kernel) with the rounding, from their MMSE values.
        rounding_terms: ``"first"`` (the first weight term's rounding is learned; residual
            kernels are then chosen from the errors that remain) or ``"all"`` (residuals chosen
            first, then every term's rounding learned).
        rounding_seed: seed of the minibatch and drop draws (the result is deterministic).
        strict: raise on layers omse cannot quantize instead of warning.
        act_bins: histogram bins of the streaming activation statistics.
        scale_dtype: the format weight scales are restricted to and stored in: ``float16``
            (default; each fitted scale moves to the better of its two float16 neighbours, a
            relative change <= 2^-11), ``bfloat16`` or ``float32``.
        target: the hardware the model is quantized for, ``"int4"`` (default: accelerators
            with 4-bit MACs; residual tensors are extra integer convolutions) or ``"int8"``
            (runtimes with 8-bit integer kernels: onnxruntime CPU, OpenVINO, TensorRT, XNNPACK).
            ``"int8"`` changes what is simulated so that the export runs as integer kernels end
            to end: each residual term's step is an integer fraction ``s1/k`` of the first
            term's, so the two merge into one 8-bit kernel (no extra MACs at run time); a layer
            whose output goes anywhere but one quantized layer's input gets an 8-bit output
            quantizer (the requantized output of an integer kernel); biases are rounded to
            int32 at ``s_x * s_w``. ``"tflite"`` (LiteRT, TensorFlow Lite Micro:
            :func:`omse.export_tflite`) simulates the same integer graph with 8-bit activations
            and weights of <= 4 bits stored as packed INT4 filters (half the bytes of INT8), so
            the per-layer precision budget buys 4-bit layers there. Exports default to the
            model's target.
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    weight_method: str | RangeSetter = "mmse"
    act_method: str | RangeSetter = "mmse"
    granularity: str | Granularity = "per_channel"
    weight_grid: str = "full"
    act_grid: str = "auto"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    budget: Budget | float | int | str | None = field(default_factory=Budget)
    extra_mac_budget: float = 0.10
    residual_criterion: str = "output"
    max_terms: int = 2
    bias_correction: bool = True
    equalize: bool = False
    output_aware: bool = False
    rounding: str = "nearest"
    rounding_iters: int = 500
    rounding_lr: float = 1e-2
    rounding_reg: float = 0.01
    rounding_scope: str = "layer"
    rounding_blocks: tuple[str, ...] = ()
    rounding_batch: int = 8
    rounding_act_loop: bool = True
    rounding_drop: float = 0.5
    rounding_learn_act: bool = False
    rounding_learn_scales: bool = False
    rounding_terms: str = "first"
    rounding_seed: int = 0
    strict: bool = False
    act_bins: int = 4096
    scale_dtype: str = "float16"
    target: str = "int4"

    def __post_init__(self) -> None:
        _check_target(self.target)
        object.__setattr__(self, "budget", parse_budget(self.budget))
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        for k in ("weight_method", "act_method"):
            object.__setattr__(self, k, _method(k, getattr(self, k)))
        skip = (self.skip,) if isinstance(self.skip, str) else self.skip
        try:
            skip = tuple(skip)
        except TypeError:
            raise ConfigError(f"skip={self.skip!r}: use a list of module name patterns") from None
        if not all(isinstance(p, str) for p in skip):
            raise ConfigError(f"skip={self.skip!r}: every pattern must be a string")
        object.__setattr__(self, "skip", skip)
        for k in (
            "bias_correction",
            "equalize",
            "output_aware",
            "strict",
            "rounding_act_loop",
            "rounding_learn_act",
            "rounding_learn_scales",
        ):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"{k}={getattr(self, k)!r}: use True or False")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={self.rounding!r}: use one of {list(ROUNDINGS)}")
        if self.output_aware:
            if self.rounding not in ("nearest", "gptq"):
                raise ConfigError(
                    f"output_aware=True is rounding='gptq'; it contradicts rounding={self.rounding!r}"
                )
            object.__setattr__(self, "rounding", "gptq")
        it, lr, rg = self.rounding_iters, self.rounding_lr, self.rounding_reg
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ConfigError(f"rounding_iters={it!r}: use an int >= 1")
        for k, v in (("rounding_lr", lr), ("rounding_reg", rg)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e3:
                raise ConfigError(f"{k}={v!r}: use a number in [0, 1000)")
        if self.rounding_scope not in SCOPES:
            raise ConfigError(f"rounding_scope={self.rounding_scope!r}: use one of {list(SCOPES)}")
        if self.rounding_terms not in ROUNDING_TERMS:
            raise ConfigError(
                f"rounding_terms={self.rounding_terms!r}: use one of {list(ROUNDING_TERMS)}"
            )
        blocks = (
            (self.rounding_blocks,)
            if isinstance(self.rounding_blocks, str)
            else self.rounding_blocks
        )
        try:
            blocks = tuple(blocks)
        except TypeError:
            raise ConfigError(
                f"rounding_blocks={self.rounding_blocks!r}: use a list of module name patterns"
            ) from None
        if not all(isinstance(p, str) and p for p in blocks):
            raise ConfigError(
                f"rounding_blocks={blocks!r}: every pattern must be a non-empty string"
            )
        object.__setattr__(self, "rounding_blocks", blocks)
        for k in ("rounding_batch", "rounding_seed"):
            v = getattr(self, k)
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v < (1 if k == "rounding_batch" else 0)
            ):
                raise ConfigError(f"{k}={v!r}: use an int >= {1 if k == 'rounding_batch' else 0}")
        d = self.rounding_drop
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1:
            raise ConfigError(f"rounding_drop={d!r}: use a probability in [0, 1)")
        if self.rounding_learn_act and not self.rounding_act_loop:
            raise ConfigError(
                "rounding_learn_act=True needs the activations in the loop: set rounding_act_loop=True"
            )
        self.base_layer()  # validates bits, methods and grids
        b = self.extra_mac_budget
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 <= float(b) <= 2.0:
            raise ConfigError(
                f"extra_mac_budget={b!r} is outside [0, 2] (a fraction of the model's MACs)"
            )
        if self.residual_criterion not in ("output", "weight", "network"):
            raise ConfigError(
                f"residual_criterion={self.residual_criterion!r}: use 'output', 'weight' or 'network'"
            )
        if (
            isinstance(self.max_terms, bool)
            or not isinstance(self.max_terms, int)
            or not 1 <= self.max_terms <= 4
        ):
            raise ConfigError(f"max_terms={self.max_terms!r}: use 1..4")
        if self.target in INTEGER_TARGETS and self.max_terms > 2:
            raise ConfigError(
                f"max_terms={self.max_terms} with target={self.target!r}: two terms merge into "
                "one 8-bit kernel, three do not; use max_terms=2 or target='int4'"
            )
        if (
            isinstance(self.act_bins, bool)
            or not isinstance(self.act_bins, int)
            or self.act_bins < 256
            or self.act_bins & (self.act_bins - 1)
        ):
            raise ConfigError(f"act_bins={self.act_bins!r}: use a power of two >= 256")
        if not isinstance(self.overrides, dict):
            raise ConfigError("overrides must be a dict {module name pattern: {field: value}}")
        allowed = {f.name for f in fields(LayerConfig)}
        for pattern, ov in self.overrides.items():
            if not isinstance(pattern, str):
                raise ConfigError(
                    f"override key {pattern!r} must be a module name (pattern) string"
                )
            if not isinstance(ov, dict):
                raise ConfigError(f"override for {pattern!r} must be a dict of LayerConfig fields")
            bad = set(ov) - allowed
            if "target" in ov:
                raise ConfigError(
                    f"override for {pattern!r} sets 'target': the target is model-wide; set "
                    "QuantConfig(target=...)"
                )
            if bad:
                raise ConfigError(
                    f"override for {pattern!r} has unknown fields {sorted(bad)}; allowed: {sorted(allowed)}"
                )
            try:
                replace(self.base_layer(), **ov)  # validate now, not mid-run
            except ConfigError as e:
                raise ConfigError(f"override for {pattern!r}: {e}") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """A named recipe, with any field changed by ``overrides``.

        - ``"fast"``: plain kernel-wise MMSE, no residual tensors, no bias correction (one
          calibration pass; 9.5% agreement on EfficientNet-Lite0 at W4A8);
        - ``"default"``: ``QuantConfig()``: residual tensors within 10% extra MACs + bias
          correction (93.0% on Lite0 at W4A8);
        - ``"best"``: the default + ``rounding="learned"`` (minutes of calibration on Lite0).

        Example: ``QuantConfig.preset("fast", act_bits=4)``.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: use one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def base_layer(self) -> LayerConfig:
        return LayerConfig(
            weight_bits=self.weight_bits,
            act_bits=self.act_bits,
            weight_method=self.weight_method,
            act_method=self.act_method,
            granularity=self.granularity,
            weight_grid=self.weight_grid,
            act_grid=self.act_grid,
            scale_dtype=self.scale_dtype,
            target=self.target,
        )

    def is_skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def for_layer(self, name: str) -> LayerConfig:
        """The layer's settings: the base config with the first matching override applied."""
        base = self.base_layer()
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return replace(base, **ov)
        return base

    def sets_weight_bits(self, name: str) -> bool:
        """Whether the first override matching ``name`` sets ``weight_bits`` (the layer then
        keeps them: per-layer precision selection leaves it alone)."""
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return "weight_bits" in ov
        return False

    def unmatched_patterns(self, names: list[str]) -> list[str]:
        """Override and skip patterns that match no module name (likely typos)."""
        pats = list(self.overrides) + list(self.skip)
        return [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def to_dict(self) -> dict[str, Any]:
        """A plain, versioned dict (JSON-ready): range setters and granularities by name."""
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        d["skip"] = list(self.skip)
        if self.budget is not None:
            d["budget"] = {
                "weight_bytes": self.budget.weight_bytes,
                "guard_db": self.budget.guard_db,
            }
        d["rounding_blocks"] = list(self.rounding_blocks)
        d["overrides"] = {
            k: {kk: _plain(vv) for kk, vv in v.items()} for k, v in self.overrides.items()
        }
        return {"version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """The config :meth:`to_dict` wrote (this version or an older one; a field an older dict
        lacks takes that version's default)."""
        d = dict(d)
        version = d.pop("version", 1)
        if version not in (1, 2, 3, CONFIG_VERSION):
            raise ConfigError(
                f"QuantConfig version {version!r} is not one omse reads (1, 2, 3, {CONFIG_VERSION})"
            )
        for k in _RETIRED:
            d.pop(k, None)
        if version < 3:
            d = {**_OLD_DEFAULTS, **d}
        if version < 4:
            d = {**_V3_DEFAULTS, **d}
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ConfigError(f"unknown QuantConfig fields {sorted(bad)}")
        for k in ("skip", "rounding_blocks"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def layer_config_to_dict(cfg: LayerConfig) -> dict[str, Any]:
    """A :class:`LayerConfig` as a plain dict (checkpoint headers)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def layer_config_from_dict(d: dict[str, Any]) -> LayerConfig:
    """The :class:`LayerConfig` :func:`layer_config_to_dict` wrote (retired fields ignored)."""
    return LayerConfig(**{k: v for k, v in d.items() if k not in _RETIRED})
