"""Typed quantization configuration, validated on construction, with per-layer overrides.

:class:`QuantConfig` reads like the method: how the weights and activations are quantized
(:class:`WeightQuant`, :class:`ActQuant`), how the first weight term rounds (:class:`Nearest`,
:class:`GPTQ`, :class:`LearnedRounding`), the residual tensors (:class:`Residuals`), the weight
byte budget (:class:`Budget`), the target and the corrections. Each part is a frozen type;
strings are parsed at the edge: ``rounding="learned"`` becomes ``LearnedRounding()``,
``WeightQuant(method="percentile")`` a :class:`~omse.core.ranges.Percentile`,
``granularity="per_group32"`` a :class:`~omse.core.granularity.PerGroup`; objects
(``Percentile(99.9)``, ``ACIQ("laplace")``) are taken as they are. The flat keyword arguments of
earlier versions (``weight_bits=3``, ``extra_mac_budget=0``, ``rounding_iters=200``) are still
accepted and set the field of their part (:data:`FLAT_FIELDS`).
:meth:`QuantConfig.to_dict` / :meth:`QuantConfig.from_dict` write and read a versioned plain dict
(JSON, checkpoint headers).

The defaults are the default recipe, the best measured at a cost users accept by default:
kernel-wise MMSE weights at 4 or 8 bits per layer, chosen by measured effect on the model's output
within 60% of the 8-bit weight bytes (:class:`Budget`, with a guard that grows the budget when the
plan is far worse than 8 bits), 8-bit activations, residual tensors within 10% extra MACs for the
4-bit layers (merged into one 8-bit kernel at no run-time cost with ``target="int8"``) and bias
correction. :meth:`QuantConfig.preset` names the recipes: ``"fast"`` (plain MMSE, one calibration
pass: the defaults before config version 3), ``"default"`` (``QuantConfig()``) and ``"best"``
(the default + learned rounding). A saved dict of version 1 to 4 keeps its old meaning: a field it
lacks takes that version's default.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, ClassVar

from .core.granularity import Granularity, PerChannel, parse_granularity
from .core.grids import MAX_BITS, MIN_BITS
from .core.primitives import SCALE_DTYPES
from .core.ranges import MMSE, RangeSetter, make_range_setter, range_setter_to_dict
from .errors import ConfigError

__all__ = [
    "QuantConfig",
    "WeightQuant",
    "ActQuant",
    "Rounding",
    "Nearest",
    "GPTQ",
    "LearnedRounding",
    "Residuals",
    "Budget",
    "LayerConfig",
    "parse_budget",
    "parse_rounding",
    "TARGETS",
    "INTEGER_TARGETS",
    "PACKED_INT4_TARGETS",
    "CONFIG_VERSION",
    "FLAT_FIELDS",
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
CRITERIA = ("output", "weight", "network")
CONFIG_VERSION = 5
"""Version of :meth:`QuantConfig.to_dict`'s layout (1: methods as names only, a ``seed``; 2: the
plain-MMSE defaults, no residual tensors and no bias correction; 3: the default recipe at one
weight width; 4: per-layer weight widths under a byte ``budget``; 5: the fields grouped into
``weights``, ``activations``, ``rounding`` and ``residuals``, as :class:`QuantConfig` holds
them)."""
_RETIRED = {"residual_terms", "seed"}  # fields of version 1 that nothing read
_OLD_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"extra_mac_budget": 0.0, "bias_correction": False}
)
"""The defaults of versions 1 and 2 that version 3 changed: what a field missing from such a dict
means."""
_V3_DEFAULTS: Mapping[str, Any] = MappingProxyType({"budget": None})
"""The defaults of versions 1-3 that version 4 changed (every layer at ``weight_bits``)."""


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
    if isinstance(v, tuple):
        return list(v)
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


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r}: use True or False")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r}: use an int >= {low}")


def _check_weight_grid(name: str, grid: Any) -> None:
    if grid not in _GRIDS:
        raise ConfigError(f"{name}={grid!r}: use 'full' or 'narrow'")


def _check_act_grid(name: str, grid: Any) -> None:
    if grid not in ACT_GRIDS:
        raise ConfigError(
            f"{name}={grid!r}: use 'auto', 'full', 'narrow' or 'affine' (unsigned is chosen "
            "automatically for non-negative inputs)"
        )


def _check_scale_dtype(name: str, dtype: Any) -> None:
    if dtype not in SCALE_DTYPES:
        raise ConfigError(f"{name}={dtype!r}: use one of {sorted(SCALE_DTYPES)}")


def _patterns(name: str, value: Any, nonempty: bool = False) -> tuple[str, ...]:
    """A tuple of module-name patterns from one string or an iterable of them."""
    pats = (value,) if isinstance(value, str) else value
    try:
        pats = tuple(pats)
    except TypeError:
        raise ConfigError(f"{name}={value!r}: use a list of module name patterns") from None
    if not all(isinstance(p, str) and (p or not nonempty) for p in pats):
        what = "a non-empty string" if nonempty else "a string"
        raise ConfigError(f"{name}={value!r}: every pattern must be {what}")
    return pats


def _build(cls: type, value: Any, what: str) -> Any:
    """``value`` as a ``cls``: itself, or made from a dict of its fields."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in fields(cls)}
        bad = sorted(set(value) - names)
        if bad:
            raise ConfigError(f"{what}: unknown fields {bad}; allowed: {sorted(names)}")
        return cls(**value)
    raise ConfigError(f"{what}={value!r}: use a {cls.__name__} or a dict of its fields")


@dataclass(frozen=True)
class WeightQuant:
    """How every weight tensor is quantized (per layer, :attr:`QuantConfig.overrides` may change
    it).

    Args:
        bits: bits of the weight codes (2..8); under a :class:`Budget` each layer gets these or 8.
        method: range setting, ``"mmse"`` (default), ``"minmax"``, ``"percentile"`` or
            ``"aciq"``, or a range setter object (``Percentile(99.9)``).
        granularity: weight scales ``"per_channel"`` (kernel-wise, default), ``"per_tensor"`` or
            ``"per_group<N>"`` (or a :class:`~omse.core.granularity.Granularity`).
        grid: ``"full"`` (two's complement, default) or ``"narrow"`` (symmetric).
        scale_dtype: the format weight scales are restricted to and stored in: ``"float16"``
            (default; each fitted scale moves to the better of its two float16 neighbours, a
            relative change <= 2^-11), ``"bfloat16"`` or ``"float32"``.
    """

    bits: int = 4
    method: RangeSetter = MMSE()
    granularity: Granularity = PerChannel(0)
    grid: str = "full"
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_bits("WeightQuant bits", self.bits, allow_none=False)
        object.__setattr__(self, "method", _method("WeightQuant method", self.method))
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        _check_weight_grid("WeightQuant grid", self.grid)
        _check_scale_dtype("WeightQuant scale_dtype", self.scale_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ActQuant:
    """How every quantized layer's input activation is quantized.

    Args:
        bits: bits of the activation codes (2..8), or ``None`` to leave the inputs in float.
        method: range setting of the activation steps, as :attr:`WeightQuant.method`.
        grid: the grid of activations that take negative values (non-negative ones always get
            the unsigned grid): ``"auto"`` (default: ``"full"``, except a skewed tensor, whose
            negative side is at most a quarter of its positive side, such as a SiLU's output
            ``[-0.28, x]``, which gets ``"affine"``: :data:`omse.transforms.calibration.SKEW`),
            ``"full"`` (signed, zero point 0), ``"narrow"`` or ``"affine"`` (unsigned codes with
            a zero point, fitted with the step by least squared error:
            :func:`omse.core.ranges.fit_affine`; for skewed inputs such as a hardswish's
            ``[-0.375, 6]``, where a signed grid spends half its codes on the small negative
            side).
        bins: histogram bins of the streaming activation statistics (a power of two >= 256).
        fallback_db: float fallback, chosen by measurement: after calibration, each layer's
            activation quantizers (its input's, and its output's where the integer kernel
            requantizes it) are scored by their estimated effect on the model's output alone
            (:func:`omse.transforms.precision.activation_errors`, one forward and backward pass);
            the layers that alone bring the output SQNR below ``fallback_db`` dB get float
            activations (largest effect first, within ``fallback_macs``): their weights stay
            quantized, at 8 bits (:meth:`QuantConfig.with_float_activations`; fixed at 8 bits
            for per-layer precision), the model is calibrated again, and one warning names them.
            In an int8 ONNX export such a layer is ``DequantizeLinear`` (INT8 weights) -> float
            op. A detector whose stem mixes channels of very different ranges in one 8-bit
            tensor is the case it is for. ``None``: never. Only layers with 8-bit activations
            are scored (fewer bits are the configuration's own choice); not for
            ``target="tflite"`` (an integer-only file has no float activations).
        fallback_macs: the largest share (0..1) of the model's MACs the fallback may give float
            activations.
        choose_range: opt-in: after calibration each 8-bit activation quantizer a layer owns
            (its input's, its output's where the integer kernel requantizes it) keeps
            ``method``'s step or takes the min-max step (no clipping), whichever has the smaller
            estimated effect on the model's output (:func:`omse.transforms.precision.range_errors`,
            the float fallback's forward and backward pass over the first calibration samples,
            which it then shares). An MMSE step minimises the tensor's own squared error and
            clips its tail; where the tail carries the output the min-max step costs the output
            less (YOLOX-nano: mAP@0.5 0.476 -> 0.499 at 1.6 points less precision against FP32,
            docs/benchmarks/detection.md). Not the default: it left NanoDet-m and
            EfficientNet-Lite0 level, and with the steps it chooses on the Fashion-MNIST
            MobileNetV2 OpenVINO's CPU plugin fails the parity test against omse's simulation
            (onnxruntime runs the same file exactly; docs/concepts/precision.md).
    """

    bits: int | None = 8
    method: RangeSetter = MMSE()
    grid: str = "auto"
    bins: int = 4096
    fallback_db: float | None = 20.0
    fallback_macs: float = 0.25
    choose_range: bool = False

    def __post_init__(self) -> None:
        _check_bits("ActQuant bits", self.bits, allow_none=True)
        object.__setattr__(self, "method", _method("ActQuant method", self.method))
        _check_act_grid("ActQuant grid", self.grid)
        b = self.bins
        if isinstance(b, bool) or not isinstance(b, int) or b < 256 or b & (b - 1):
            raise ConfigError(f"ActQuant bins={b!r}: use a power of two >= 256")
        f = self.fallback_db
        if f is not None and (isinstance(f, bool) or not isinstance(f, int | float) or f < 0):
            raise ConfigError(f"ActQuant fallback_db={f!r}: use a number of dB >= 0, or None")
        m = self.fallback_macs
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0 <= m <= 1:
            raise ConfigError(f"ActQuant fallback_macs={m!r}: use a share of the MACs in [0, 1]")
        if not isinstance(self.choose_range, bool):
            raise ConfigError(f"ActQuant choose_range={self.choose_range!r}: use True or False")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


class Rounding:
    """Base class: how the first weight term of every layer rounds (:class:`Nearest`,
    :class:`GPTQ` or :class:`LearnedRounding`)."""

    name: ClassVar[str]

    def to_dict(self) -> str | dict[str, Any]:
        """Its name when every parameter has its default, else ``{"name": ..., **fields}``."""
        if self == type(self)():
            return self.name
        params = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore
        return {"name": self.name, **params}


@dataclass(frozen=True)
class Nearest(Rounding):
    """Round to nearest, from the MMSE steps (the default)."""

    name: ClassVar[str] = "nearest"


@dataclass(frozen=True)
class GPTQ(Rounding):
    """GPTQ-style error feedback: each weight column's rounding error is compensated by the
    columns not yet rounded, weighed by the layer's input second moments
    (:mod:`omse.transforms.output_aware`)."""

    name: ClassVar[str] = "gptq"


@dataclass(frozen=True)
class LearnedRounding(Rounding):
    """AdaRound-style rounding, learned against the FP32 output on calibration data, from the
    MMSE steps.

    Args:
        iters: Adam iterations per layer or block.
        lr: Adam's learning rate.
        reg: weight of the regulariser that drives each rounding variable to 0 or 1.
        scope: what is reconstructed: ``"layer"`` (default, the best measured on
            EfficientNet-Lite0 at the CPU budget: each layer against its output from its patch
            moments, no activations stored: :mod:`omse.transforms.learned`) or ``"block"`` (the
            model's own blocks, one after the other, with activations in the loop,
            BRECQ/QDrop-style: :mod:`omse.transforms.reconstruct`). The fields below apply to
            ``"block"``.
        blocks: module-name patterns (``fnmatch``) of the blocks; default: found from the module
            hierarchy (:func:`omse.transforms.reconstruct.find_blocks`).
        batch: calibration rows per iteration.
        act_loop: quantize the activations inside a block while its rounding is learned.
        drop: with ``act_loop``, the probability that an element is left float (QDrop; 0 =
            always quantized).
        learn_act: learn the activation steps with the rounding, from their MMSE values (needs
            ``act_loop``).
        learn_scales: learn the weight steps (one factor per kernel) with the rounding.
        terms: ``"first"`` (the first weight term's rounding is learned; residual kernels are
            then chosen from the errors that remain) or ``"all"`` (residuals chosen first, then
            every term's rounding learned).
        seed: seed of the minibatch and drop draws (the result is deterministic).
    """

    name: ClassVar[str] = "learned"
    iters: int = 500
    lr: float = 1e-2
    reg: float = 0.01
    scope: str = "layer"
    blocks: tuple[str, ...] = ()
    batch: int = 8
    act_loop: bool = True
    drop: float = 0.5
    learn_act: bool = False
    learn_scales: bool = False
    terms: str = "first"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("LearnedRounding iters", self.iters, 1)
        for k in ("lr", "reg"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e3:
                raise ConfigError(f"LearnedRounding {k}={v!r}: use a number in [0, 1000)")
        if self.scope not in SCOPES:
            raise ConfigError(f"LearnedRounding scope={self.scope!r}: use one of {list(SCOPES)}")
        if self.terms not in ROUNDING_TERMS:
            raise ConfigError(
                f"LearnedRounding terms={self.terms!r}: use one of {list(ROUNDING_TERMS)}"
            )
        blocks = _patterns("LearnedRounding blocks", self.blocks, nonempty=True)
        object.__setattr__(self, "blocks", blocks)
        _check_int("LearnedRounding batch", self.batch, 1)
        _check_int("LearnedRounding seed", self.seed, 0)
        for k in ("act_loop", "learn_act", "learn_scales"):
            _check_bool(f"LearnedRounding {k}", getattr(self, k))
        d = self.drop
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1:
            raise ConfigError(f"LearnedRounding drop={d!r}: use a probability in [0, 1)")
        if self.learn_act and not self.act_loop:
            raise ConfigError(
                "LearnedRounding learn_act=True needs the activations in the loop: set "
                "act_loop=True"
            )


_ROUNDINGS: Mapping[str, type[Rounding]] = MappingProxyType(
    {"nearest": Nearest, "gptq": GPTQ, "learned": LearnedRounding}
)


def parse_rounding(value: Any) -> Rounding:
    """A :class:`Rounding` from its name (``"nearest"``, ``"gptq"``, ``"learned"``), a dict
    ``{"name": ..., **fields}`` (as :meth:`Rounding.to_dict` writes it), or itself."""
    if isinstance(value, Rounding):
        return value
    if isinstance(value, str) and value in _ROUNDINGS:
        return _ROUNDINGS[value]()
    if isinstance(value, Mapping) and value.get("name") in _ROUNDINGS:
        params = {k: v for k, v in value.items() if k != "name"}
        return _build(_ROUNDINGS[value["name"]], params, f"rounding {value['name']!r}")
    raise ConfigError(
        f"rounding={value!r}: use one of {list(ROUNDINGS)}, or Nearest(), GPTQ(), "
        "LearnedRounding(...)"
    )


@dataclass(frozen=True)
class Residuals:
    """Residual tensors: extra integer weight terms for the kernels that gain the most, within
    a budget of extra MACs (:mod:`omse.transforms.residuals`). ``QuantConfig(residuals=None)``:
    none.

    Args:
        extra_mac_budget: extra integer MACs allowed, as a fraction of the quantized model's
            MACs, in (0, 2] (default 0.10; 1.0 = every kernel gets one extra term); under a
            weight :class:`Budget`, of the MACs of the layers below 8 bits, which alone get
            residual tensors. With ``target="int8"`` the terms merge into one 8-bit kernel: no
            extra MACs at run time.
        criterion: how kernels are ranked for the budget: ``"output"`` (layer-output error on
            calibration data, default), ``"weight"`` (weight MSE) or ``"network"`` (layer-output
            error weighed by the layer's measured effect on the model's output: one extra pass
            over the calibration batches per layer, :mod:`omse.transforms.sensitivity`).
        max_terms: the most tensors one kernel may get (1 + residual terms), 1..4; 2 with the
            integer targets (two terms merge into one 8-bit kernel, three do not).
    """

    extra_mac_budget: float = 0.10
    criterion: str = "output"
    max_terms: int = 2

    def __post_init__(self) -> None:
        b = self.extra_mac_budget
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 < float(b) <= 2.0:
            raise ConfigError(
                f"Residuals extra_mac_budget={b!r} is outside (0, 2] (a fraction of the model's "
                "MACs; residuals=None for none)"
            )
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"Residuals criterion={self.criterion!r}: use 'output', 'weight' or 'network'"
            )
        t = self.max_terms
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 4:
            raise ConfigError(f"Residuals max_terms={t!r}: use 1..4")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2}


@dataclass(frozen=True)
class Budget:
    """How many bytes the quantized weights may take: per-layer precision selection.

    Each layer's weights are written at ``WeightQuant.bits`` or at 8 bits, whichever the
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
    ``weights.bits``), a fraction (``0.6``, ``"0.6"``, ``"0.6x"``, ``"60%"``), bytes (``120000``,
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
    """What one layer gets: :class:`QuantConfig`'s parts, flat, with the layer's override
    applied (the fields an ``overrides`` entry may set, except ``target``).

    Args:
        weight_bits: :attr:`WeightQuant.bits`.
        act_bits: :attr:`ActQuant.bits` (``None``: the layer's input stays float).
        weight_method: :attr:`WeightQuant.method`.
        act_method: :attr:`ActQuant.method`.
        granularity: :attr:`WeightQuant.granularity`.
        weight_grid: :attr:`WeightQuant.grid`.
        act_grid: :attr:`ActQuant.grid`.
        scale_dtype: :attr:`WeightQuant.scale_dtype`.
        target: :attr:`QuantConfig.target` (model-wide).
    """

    weight_bits: int = 4
    act_bits: int | None = 8
    weight_method: RangeSetter = MMSE()
    act_method: RangeSetter = MMSE()
    granularity: Granularity = PerChannel(0)
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
        _check_weight_grid("weight_grid", self.weight_grid)
        _check_act_grid("act_grid", self.act_grid)
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        _check_scale_dtype("scale_dtype", self.scale_dtype)


FLAT_FIELDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "weight_bits": ("weights", "bits"),
        "weight_method": ("weights", "method"),
        "granularity": ("weights", "granularity"),
        "weight_grid": ("weights", "grid"),
        "scale_dtype": ("weights", "scale_dtype"),
        "act_bits": ("activations", "bits"),
        "act_method": ("activations", "method"),
        "act_grid": ("activations", "grid"),
        "act_bins": ("activations", "bins"),
        "extra_mac_budget": ("residuals", "extra_mac_budget"),
        "residual_criterion": ("residuals", "criterion"),
        "max_terms": ("residuals", "max_terms"),
        **{
            f"rounding_{f.name}": ("rounding", f.name)
            for f in fields(LearnedRounding)
            if f.name != "name"
        },
    }
)
"""The flat keyword arguments of config versions 1-4, which :class:`QuantConfig` still accepts:
each name -> (the part, its field). ``output_aware=True`` is ``rounding=GPTQ()``."""


_POSITIONAL = (
    "weight_bits",
    "act_bits",
    "weight_method",
    "act_method",
    "granularity",
    "weight_grid",
    "act_grid",
)
"""The fields of versions 1-4 that :class:`QuantConfig` still takes positionally, in order."""


def _no_residuals(value: Any) -> bool:
    """Whether a flat ``extra_mac_budget`` means no residual tensors (0)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and value == 0


def _apply_flat(parts: dict[str, Any], flat: dict[str, Any]) -> None:
    """Set the fields the flat keyword arguments ``flat`` name in ``parts`` (the parsed parts).

    A setting of a part that is off (``rounding_*`` without learned rounding, residual settings
    with ``extra_mac_budget=0``) is validated, then has no effect, as in versions 1-4."""
    if "output_aware" in flat:
        on = flat.pop("output_aware")
        _check_bool("output_aware", on)
        if on:
            if isinstance(parts["rounding"], LearnedRounding):
                raise ConfigError(
                    "output_aware=True is rounding='gptq'; it contradicts rounding='learned'"
                )
            parts["rounding"] = GPTQ()
    unknown = sorted(set(flat) - set(FLAT_FIELDS))
    if unknown:
        raise TypeError(f"QuantConfig got unexpected keyword arguments {unknown}")
    by_part: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        part, name = FLAT_FIELDS[k]
        by_part.setdefault(part, {})[name] = v
    for part, settings in by_part.items():
        given = ", ".join(f"{k}={v!r}" for k, v in flat.items() if FLAT_FIELDS[k][0] == part)
        current = parts[part]
        b = settings.get("extra_mac_budget", 0.1) if part == "residuals" else 0.1
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b <= 2:
            raise ConfigError(
                f"extra_mac_budget={b!r} is outside [0, 2] (a fraction of the model's MACs; "
                "0: no residual tensors)"
            )
        try:
            if part == "residuals":
                if _no_residuals(settings.get("extra_mac_budget")):
                    Residuals(**{**settings, "extra_mac_budget": 0.1})  # validated, unused
                    parts[part] = None
                    continue
                if current is None:
                    if "extra_mac_budget" not in settings:
                        Residuals(**settings)  # validated, unused
                        continue
                    current = Residuals()
            elif part == "rounding" and not isinstance(current, LearnedRounding):
                LearnedRounding(**settings)  # validated, unused
                continue
            parts[part] = replace(current, **settings)
        except ConfigError as e:
            raise ConfigError(f"{given}: {e}") from None


@dataclass(frozen=True, init=False)
class QuantConfig:
    """Model-wide quantization settings: the recipe.

    Each part is a frozen type; what users write (a name, a dict of fields) is parsed into it on
    construction and validated there. For example, 3-bit weights in groups of 32, learned
    rounding and no residual tensors:

        QuantConfig(
            weights=WeightQuant(bits=3, granularity="per_group32"),
            rounding=LearnedRounding(iters=200),
            residuals=None,
        )

    The keyword arguments of config versions 1-4 are still accepted (:data:`FLAT_FIELDS`), each
    setting one field of a part, on top of the part given (``replace(config, weight_bits=3)``
    works too):

    - ``weight_bits``, ``weight_method``, ``granularity``, ``weight_grid``, ``scale_dtype``:
      ``weights.bits``, ``.method``, ``.granularity``, ``.grid``, ``.scale_dtype``;
    - ``act_bits``, ``act_method``, ``act_grid``, ``act_bins``: ``activations.bits``,
      ``.method``, ``.grid``, ``.bins``;
    - ``extra_mac_budget``, ``residual_criterion``, ``max_terms``: ``residuals.extra_mac_budget``,
      ``.criterion``, ``.max_terms`` (``extra_mac_budget=0`` is ``residuals=None``);
    - ``rounding_<field>`` (``rounding_iters``, ``rounding_scope``, ...): that field of
      :class:`LearnedRounding`;
    - ``output_aware=True``: ``rounding=GPTQ()``.

    A flat setting of a part that is off (``rounding_iters`` without learned rounding,
    ``residual_criterion`` without residual tensors) is validated and has no effect, as before.

    Args:
        weights: how the weights are quantized (a :class:`WeightQuant`, or a dict of its fields).
        activations: how each quantized layer's input is quantized (an :class:`ActQuant`, or a
            dict of its fields).
        rounding: how the first weight term rounds: :class:`Nearest` (default), :class:`GPTQ`
            or :class:`LearnedRounding`, or their names ``"nearest"``, ``"gptq"``,
            ``"learned"``.
        residuals: residual tensors within an extra-MAC budget (a :class:`Residuals`, default
            ``Residuals()``: 10% extra MACs), or ``None`` for none.
        budget: per-layer weight precision (a :class:`Budget`, or what :func:`parse_budget`
            reads): each layer at ``weights.bits`` or at 8 bits, chosen by its estimated effect
            on the model's output, the weights within the budget, with a guard against a plan
            far worse than 8 bits (default ``Budget(0.6)``: 60% of the 8-bit weight bytes, 3 dB).
            ``None``: every layer at ``weights.bits``. Layers whose ``weight_bits`` an override
            sets keep it. With ``target="int8"`` every width is written in 8 bits, so the
            cheapest error is every layer at 8 bits.
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
        overrides: per-layer changes by module name (``fnmatch`` patterns allowed), each a dict
            of :class:`LayerConfig` fields, e.g. ``{"_conv_stem": {"weight_bits": 8,
            "act_bits": 8}}``; the first matching pattern wins.
        skip: module names (patterns allowed) left entirely in float.
        bias_correction: correct each layer's output mean on the calibration data (default on).
        equalize: cross-layer equalization before quantizing (default off).
        strict: raise on layers omse cannot quantize instead of warning.
        *positional: the leading flat fields of config versions 1-4, in their order
            (``weight_bits``, ``act_bits``, ``weight_method``, ``act_method``, ``granularity``,
            ``weight_grid``, ``act_grid``): ``QuantConfig(4, 8)`` is ``QuantConfig(weight_bits=4,
            act_bits=8)``.
        **flat: the flat keyword arguments of config versions 1-4 (above).
    """

    weights: WeightQuant
    activations: ActQuant
    rounding: Rounding
    residuals: Residuals | None
    budget: Budget | None
    target: str
    overrides: dict[str, dict[str, Any]]
    skip: tuple[str, ...]
    bias_correction: bool
    equalize: bool
    strict: bool

    def __init__(
        self,
        *positional: Any,
        weights: WeightQuant | Mapping[str, Any] = WeightQuant(),
        activations: ActQuant | Mapping[str, Any] = ActQuant(),
        rounding: Rounding | str | Mapping[str, Any] = Nearest(),
        residuals: Residuals | Mapping[str, Any] | None = Residuals(),
        budget: Budget | float | int | str | Mapping[str, Any] | None = Budget(),
        target: str = "int4",
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        skip: str | tuple[str, ...] = (),
        bias_correction: bool = True,
        equalize: bool = False,
        strict: bool = False,
        **flat: Any,
    ) -> None:
        if positional:  # QuantConfig(4, 8): the leading fields of versions 1-4
            given = dict(zip(_POSITIONAL, positional, strict=False))
            if len(positional) > len(_POSITIONAL) or set(given) & set(flat):
                raise TypeError(
                    "QuantConfig takes keyword arguments (positionally only "
                    f"{', '.join(_POSITIONAL)}, as versions 1-4 took them)"
                )
            flat = {**given, **flat}
        _check_target(target)
        parts: dict[str, Any] = {
            "weights": _build(WeightQuant, weights, "weights"),
            "activations": _build(ActQuant, activations, "activations"),
            "rounding": parse_rounding(rounding),
            "residuals": None if residuals is None else _build(Residuals, residuals, "residuals"),
        }
        _apply_flat(parts, flat)
        for k, v in parts.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "budget", parse_budget(budget))
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "skip", _patterns("skip", skip))
        for k, v in (
            ("bias_correction", bias_correction),
            ("equalize", equalize),
            ("strict", strict),
        ):
            _check_bool(k, v)
            object.__setattr__(self, k, v)
        if (
            self.residuals is not None
            and target in INTEGER_TARGETS
            and self.residuals.max_terms > 2
        ):
            raise ConfigError(
                f"max_terms={self.residuals.max_terms} with target={target!r}: two terms merge "
                "into one 8-bit kernel, three do not; use max_terms=2 or target='int4'"
            )
        self.base_layer()  # validates the widths against the target
        object.__setattr__(
            self, "overrides", self._overrides({} if overrides is None else overrides)
        )

    def _overrides(self, overrides: Any) -> dict[str, dict[str, Any]]:
        """``overrides`` as a dict of dicts, each validated against the base layer."""
        if not isinstance(overrides, Mapping):
            raise ConfigError("overrides must be a dict {module name pattern: {field: value}}")
        allowed = {f.name for f in fields(LayerConfig)}
        out = {}
        for pattern, ov in overrides.items():
            if not isinstance(pattern, str):
                raise ConfigError(
                    f"override key {pattern!r} must be a module name (pattern) string"
                )
            if not isinstance(ov, Mapping):
                raise ConfigError(f"override for {pattern!r} must be a dict of LayerConfig fields")
            if "target" in ov:
                raise ConfigError(
                    f"override for {pattern!r} sets 'target': the target is model-wide; set "
                    "QuantConfig(target=...)"
                )
            bad = set(ov) - allowed
            if bad:
                raise ConfigError(
                    f"override for {pattern!r} has unknown fields {sorted(bad)}; allowed: "
                    f"{sorted(allowed)}"
                )
            try:
                replace(self.base_layer(), **ov)  # validate now, not mid-run
            except ConfigError as e:
                raise ConfigError(f"override for {pattern!r}: {e}") from None
            out[pattern] = dict(ov)
        return out

    @classmethod
    def preset(cls, name: str, **changes: Any) -> QuantConfig:
        """A named recipe, with any field (or flat keyword argument) changed by ``changes``.

        - ``"fast"``: plain kernel-wise MMSE, no residual tensors, no bias correction, every
          layer at one width (one calibration pass; at 4 bits, 9.4% top-1 on EfficientNet-Lite0's
          held-out ImageNet images, FP32 83.5%: use it at 8 bits, or for its speed);
        - ``"default"``: ``QuantConfig()``: each layer at 4 or 8 bits within 0.6x of the 8-bit
          weight bytes (with the guard), residual tensors within 10% extra MACs, bias correction,
          the float fallback (83.5% on Lite0, the guard having grown the budget);
        - ``"best"``: the default + ``rounding=LearnedRounding()`` (minutes of calibration on
          Lite0).

        Example: ``QuantConfig.preset("fast", act_bits=4)``.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: use one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    def base_layer(self) -> LayerConfig:
        """The :class:`LayerConfig` of a layer no override matches."""
        w, a = self.weights, self.activations
        return LayerConfig(
            weight_bits=w.bits,
            act_bits=a.bits,
            weight_method=w.method,
            act_method=a.method,
            granularity=w.granularity,
            weight_grid=w.grid,
            act_grid=a.grid,
            scale_dtype=w.scale_dtype,
            target=self.target,
        )

    def is_skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.skip)

    def _override(self, name: str) -> dict[str, Any]:
        """The first override whose pattern matches ``name`` (``{}`` when none does)."""
        for pattern, ov in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return ov
        return {}

    def for_layer(self, name: str) -> LayerConfig:
        """The layer's settings: the base config with the first matching override applied."""
        return replace(self.base_layer(), **self._override(name))

    def sets_weight_bits(self, name: str) -> bool:
        """Whether the first override matching ``name`` sets ``weight_bits`` (the layer then
        keeps them: per-layer precision selection leaves it alone)."""
        return "weight_bits" in self._override(name)

    def with_float_activations(self, names: Iterable[str]) -> QuantConfig:
        """A copy in which each layer of ``names`` (exact module names) is quantized weight-only:
        its activations stay float (``act_bits=None``: no input quantizer, no output quantizer
        of its own) and its weights are at 8 bits, or at the ``weight_bits`` of the override
        that matched it, which otherwise applies as before. Each layer gets its own override
        (its name glob-escaped) ahead of the others, so it wins; setting ``weight_bits`` fixes
        the layer's width for per-layer precision (:meth:`sets_weight_bits`). Raises
        :class:`ConfigError` for ``target="tflite"``, whose runtimes have int8 activations
        only."""
        names = list(names)
        if not names:
            return self
        if self.target == "tflite":
            raise ConfigError(
                "float activations with target='tflite': LiteRT and TensorFlow Lite Micro run "
                "int8 activations only"
            )
        ahead: dict[str, dict[str, Any]] = {}
        for n in names:
            ov = self._override(n)
            ahead[glob.escape(n)] = {
                **ov,
                "act_bits": None,
                "weight_bits": ov.get("weight_bits", 8),
            }
        rest = {p: ov for p, ov in self.overrides.items() if p not in ahead}
        return replace(self, overrides={**ahead, **rest})

    def unmatched_patterns(self, names: list[str]) -> list[str]:
        """Override and skip patterns that match no module name (likely typos)."""
        pats = list(self.overrides) + list(self.skip)
        return [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def to_dict(self) -> dict[str, Any]:
        """A plain, versioned dict (JSON-ready): the parts as dicts, range setters and
        granularities by name."""
        b = self.budget
        return {
            "version": CONFIG_VERSION,
            "weights": self.weights.to_dict(),
            "activations": self.activations.to_dict(),
            "rounding": self.rounding.to_dict(),
            "residuals": None if self.residuals is None else self.residuals.to_dict(),
            "budget": None
            if b is None
            else {"weight_bytes": b.weight_bytes, "guard_db": b.guard_db},
            "target": self.target,
            "overrides": {
                k: {kk: _plain(vv) for kk, vv in v.items()} for k, v in self.overrides.items()
            },
            "skip": list(self.skip),
            "bias_correction": self.bias_correction,
            "equalize": self.equalize,
            "strict": self.strict,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        """The config :meth:`to_dict` wrote, this version or an older one: versions 1-4 wrote
        the flat fields, read as the keyword arguments of the same names; a field an older dict
        lacks takes that version's default."""
        d = dict(d)
        version = d.pop("version", 1)
        if version not in range(1, CONFIG_VERSION + 1):
            raise ConfigError(
                f"QuantConfig version {version!r} is not one omse reads (1..{CONFIG_VERSION})"
            )
        for k in _RETIRED:
            d.pop(k, None)
        if version < 3:
            d = {**_OLD_DEFAULTS, **d}
        if version < 4:
            d = {**_V3_DEFAULTS, **d}
        known = {f.name for f in fields(cls)} | set(FLAT_FIELDS) | {"output_aware"}
        bad = set(d) - known
        if bad:
            raise ConfigError(f"unknown QuantConfig fields {sorted(bad)}")
        return cls(**d)


PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "fast": MappingProxyType({"residuals": None, "bias_correction": False, "budget": None}),
        "default": MappingProxyType({}),
        "best": MappingProxyType({"rounding": LearnedRounding()}),
    }
)
"""Named recipes, as changes to the defaults (see :meth:`QuantConfig.preset`)."""


def layer_config_to_dict(cfg: LayerConfig) -> dict[str, Any]:
    """A :class:`LayerConfig` as a plain dict (checkpoint headers)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in fields(cfg)}


def layer_config_from_dict(d: dict[str, Any]) -> LayerConfig:
    """The :class:`LayerConfig` :func:`layer_config_to_dict` wrote (retired fields ignored)."""
    return LayerConfig(**{k: v for k, v in d.items() if k not in _RETIRED})
