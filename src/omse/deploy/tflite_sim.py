"""omse's integer simulation of a TFLite int8 model, bit-exact with TFLite Micro.

:func:`simulate` runs a ``.tflite`` model in numpy with the arithmetic of TFLM's reference kernels
(``tensorflow/lite/kernels/internal/reference/integer_ops/*.h`` and ``micro/kernels/*.cc``):

* real multipliers (``s_in * s_w / s_out``, ...) computed in double from the float32 scales and
  quantized to a 31-bit significand and a shift (``QuantizeMultiplier``). The installed TFLM
  (tflite-micro 0.dev20261023) does so in double everywhere, also where older sources multiply the
  float32 scales first (RELU, LEAKY_RELU, SUB, HARD_SWISH, per-tensor FULLY_CONNECTED): found by
  scales on which the two differ, checked against TFLM. Activation clamps (``round(6 / s)``) and
  RELU6's bound stay in float32, as TFLM has them.
* requantization by ``MultiplyByQuantizedMultiplier``, the double-rounding variant
  (``SaturatingRoundingDoublingHighMul``, which rounds negative ties toward zero, then
  ``RoundingDivideByPOT``, ties away from zero): TFLM is not built with ``TFLITE_SINGLE_ROUNDING``.
* ADD / SUB through a 20-bit left shift and three multipliers; MUL, MEAN (1/count folded into the
  multiplier), AVERAGE_POOL_2D (rounded division of the raw codes), gemmlowp's fixed-point
  ``exp_on_negative_values``, ``logistic``, ``tanh`` and Newton reciprocal for SOFTMAX, LOGISTIC
  and TANH, HARD_SWISH's int16 arithmetic.

Accumulations are exact (float64 BLAS products of integers below 2^53, int64 elsewhere). Outputs
come back in their stored dtype (int8, or float32 after a DEQUANTIZE). Supported operators
(int8 activations quantized per tensor; CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED filters
INT8 or INT4 with zero point 0, per channel or per tensor; int32 bias): :data:`OPS`. Anything else
raises :class:`~omse.errors.UnsupportedLayerError` naming the operator and its index; a model whose
shapes, indices or options do not fit together raises :class:`~omse.errors.CheckpointError`.

:func:`tflm_run` and :func:`litert_run` run the same bytes in TFLM's Python interpreter and in
LiteRT, :func:`arena_bytes` reports the TFLM arena a model needs.

:data:`REQUIREMENTS` says, per operator, what TFLM demands of an int8 model (each claim checked by
running such a model in TFLM: ``tests/deploy/test_tflite_sim.py::test_requirement_*``);
"refused" means TFLM's Prepare fails, "ignored" that TFLM runs but does not use that
quantization. :data:`LITERT_REQUIREMENTS` adds what LiteRT needs beyond that.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError, OmseError, UnsupportedLayerError
from ..tflite_format import DTYPES, op_name, read_model, schema_module, tensor_array, tensor_dtype

__all__ = [
    "simulate",
    "tflm_run",
    "litert_run",
    "arena_bytes",
    "quantize_multiplier",
    "multiply_by_quantized_multiplier",
    "OPS",
    "REQUIREMENTS",
]

LITERT_REQUIREMENTS: dict[str, str] = {
    "CONV_2D": "int8 CONV_2D needs a bias input: LiteRT refuses a convolution without one "
    "('has_bias was not true'); INT4 filters (version 7) run in both resolvers.",
    "DEPTHWISE_CONV_2D": "give it a bias (zeros if need be): LiteRT's default kernels crash the "
    "process (segfault) on an int8 depthwise convolution without bias; the reference resolver "
    "(BUILTIN_REF) has no INT4 depthwise kernel (version 7 not registered), the default one has.",
    "FULLY_CONNECTED": "INT4 filters, per-tensor and per-channel, run in both resolvers. LiteRT "
    "requantizes FULLY_CONNECTED with one rounding ((acc * m + 2^(30 - shift)) >> (31 - shift), "
    "as TFLITE_SINGLE_ROUNDING) where TFLM rounds twice: 1 step apart on ties, compounding over "
    "layers (2 steps on 37% of the MLPerf anomaly detector's outputs). Its other reference "
    "kernels round as TFLM does.",
    "LOGISTIC": "LiteRT's reference int8 LOGISTIC differs from TFLM's by 1 step for rare input "
    "scales (1 of 150 random scales).",
    "default kernels": "LiteRT's default (optimized / XNNPACK) kernels round differently from the "
    "reference kernels: 1 step per layer, compounding (up to 44 steps after ResNet-8's softmax).",
}
"""What LiteRT (ai-edge-litert 2.3.0) requires beyond TFLM, and where it differs (measured)."""

REQUIREMENTS: dict[str, str] = {
    "SOFTMAX": "int8 output must have zero point -128 and scale exactly 1/256 (refused otherwise); "
    "int8 input any quantization; beta from the options is folded into the input multiplier.",
    "LOGISTIC": "int8 output zero point must be -128 (refused otherwise); the output scale is "
    "ignored -- the kernel always produces steps of 1/256, so write scale 1/256.",
    "TANH": "int8 output quantization is ignored: the kernel always produces scale 1/128, zero "
    "point 0 -- write exactly that.",
    "CONCATENATION": "every int8 input must have exactly the output's scale and zero point "
    "(refused otherwise; no requantization inside); fused activation must be NONE.",
    "AVERAGE_POOL_2D": "input and output scale within 1e-6 and equal zero points (refused "
    "otherwise); no rescaling inside.",
    "MAX_POOL_2D": "input and output scale within 1e-6 and equal zero points (refused otherwise).",
    "PAD": "pads with the output zero point; the input quantization is not checked and not "
    "applied -- input and output must share scale and zero point.",
    "PADV2": "the constant_values tensor must be an int8 scalar with the output's scale and zero "
    "point (refused otherwise); as PAD, no rescaling of the input.",
    "RELU6": "int8 output quantization is ignored: output = clamp(x, zp_in, round(6/s_in)+zp_in) "
    "in the input's quantization -- output must share the input's scale and zero point.",
    "RELU": "rescales input -> output (any output scale / zero point).",
    "LEAKY_RELU": "rescales input -> output (any output scale / zero point).",
    "HARD_SWISH": "any input / output quantization (output multiplier exponent must be <= 0, "
    "i.e. s_in / 128 / s_out < 1).",
    "ADD": "any input / output scales and zero points, broadcasting; 2 * max(s1, s2) / (2^20 s_out)"
    " must be < 1 -- otherwise TFLM aborts the whole process (TFLITE_CHECK), not a clean error.",
    "SUB": "as ADD.",
    "MUL": "any input / output scales and zero points, broadcasting.",
    "MEAN": "any input / output scale and zero point (int8).",
    "RESHAPE": "no requantization: output must share the input's quantization.",
    "SQUEEZE": "no requantization: output must share the input's quantization.",
    "TRANSPOSE": "no requantization: output must share the input's quantization.",
    "RESIZE_NEAREST_NEIGHBOR": "no requantization: output must share the input's quantization.",
    "STRIDED_SLICE": "no requantization: output must share the input's quantization; at most 4 "
    "input dimensions (refused otherwise); no ellipsis / new-axis masks (not simulated).",
    "QUANTIZE": "float32 -> int8 and int8 -> int8 (requantization) accepted; the output must be "
    "quantized per tensor (a per-channel output is refused).",
    "activations": "every int8 activation is quantized per tensor; fused activations NONE, RELU, "
    "RELU6, RELU_N1_TO_1 clamp at round(v / s_out) + zp computed in float32.",
    "bias": "omit an absent bias (2 inputs) rather than writing -1: TFLM's DEPTHWISE_CONV_2D "
    "crashes on a -1 bias (TFLiteBuilder.op drops trailing -1 inputs).",
    "DEQUANTIZE": "int8 -> float32.",
    "FULLY_CONNECTED": "per-tensor INT8 and INT4 filters and per-channel INT8 filters (scales along "
    "the output dimension) accepted; per-channel INT4 refused. With a per-tensor filter and a "
    "bias, |s_bias - s_in * s_w| must be <= 0.02 * s_out (refused otherwise).",
    "CONV_2D": "INT8 and INT4 filters, per-channel (axis 0) or per-tensor, zero point 0.",
    "DEPTHWISE_CONV_2D": "INT8 and INT4 filters, per-channel (axis 3) or per-tensor, zero point 0.",
}
"""Per operator: what TFLM requires of an int8 model (see the module docstring)."""

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_SINGLE_ROUNDING = False  # TFLM's kernels use the double-rounding MultiplyByQuantizedMultiplier


# -- fixed-point arithmetic ------------------------------------------------------------------------


def _round_away(x: np.ndarray | float) -> np.ndarray:
    """``std::round``: to nearest, halves away from zero (``TfLiteRound``)."""
    x = np.asarray(x)
    return np.sign(x) * np.floor(np.abs(x) + np.asarray(0.5, dtype=x.dtype))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: a double -> (31-bit significand, shift) with
    ``real ~= significand * 2^(shift - 31)``."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    q_fixed = int(_round_away(np.float64(q) * float(1 << 31)))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    if _SINGLE_ROUNDING and shift > 30:
        shift, q_fixed = 30, (1 << 31) - 1
    return q_fixed, shift


def _wrap32(x: np.ndarray) -> np.ndarray:
    """Two's-complement int32 wrap-around of int64 values."""
    return ((np.asarray(x, np.int64) + 2**31) & 0xFFFFFFFF) - 2**31


def _trunc_div_pow2(x: np.ndarray, bits: int) -> np.ndarray:
    """C's ``x / 2^bits`` (truncation toward zero) on int64."""
    return np.where(x >= 0, x >> bits, -((-x) >> bits))


def _srdhm(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values held as int64."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    r = _trunc_div_pow2(ab + nudge, 31)
    return np.where((a == b) & (a == _I32_MIN), _I32_MAX, r)


def _rdbpot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, halves away
    from zero."""
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + (remainder > threshold)


def _sat_lshift(x: np.ndarray, e: int) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingMultiplyByPOT<e>`` for ``e > 0`` (int32)."""
    threshold = (1 << (31 - e)) - 1
    return np.where(x > threshold, _I32_MAX, np.where(x < -threshold, _I32_MIN, x << e))


def multiply_by_quantized_multiplier(
    x: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int
) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier(int32 x, multiplier, shift)``, elementwise
    (``multiplier`` / ``shift`` broadcast: per-channel along the last axis)."""
    x = np.asarray(x, np.int64)
    m = np.asarray(multiplier, np.int64)
    s = np.asarray(shift, np.int64)
    if _SINGLE_ROUNDING:
        total = 31 - s
        return (x * m + (np.int64(1) << (total - 1))) >> total
    left = np.maximum(s, 0)
    right = np.maximum(-s, 0)
    return _rdbpot(_srdhm(_wrap32(x << left), m), right)


def _mbqm_smaller_than_one(x: np.ndarray, multiplier: int, shift: int) -> np.ndarray:
    """``MultiplyByQuantizedMultiplierSmallerThanOneExp`` (ADD / SUB)."""
    if _SINGLE_ROUNDING:
        return multiply_by_quantized_multiplier(x, multiplier, shift)
    return _rdbpot(_srdhm(x, multiplier), -shift)


def _mbqm_greater_than_one(x: np.ndarray, multiplier: int, left_shift: int) -> np.ndarray:
    """``MultiplyByQuantizedMultiplierGreaterThanOne`` (SOFTMAX)."""
    if _SINGLE_ROUNDING:
        return multiply_by_quantized_multiplier(x, multiplier, left_shift)
    return _srdhm(_wrap32(np.asarray(x, np.int64) << left_shift), multiplier)


# gemmlowp fixed point (raw int32 values held as int64; `+`/`-` wrap like int32).


def _exp_interval(a: np.ndarray) -> np.ndarray:
    """``exp_on_interval_between_negative_one_quarter_and_0_excl`` on Q0.31."""
    constant_term, one_third = 1895147668, 715827883
    x = _wrap32(a + (1 << 28))
    x2 = _srdhm(x, x)
    x3 = _srdhm(x2, x)
    x4 = _srdhm(x2, x2)
    x4_over_4 = _rdbpot(x4, 2)
    poly = _rdbpot(_wrap32(_srdhm(_wrap32(x4_over_4 + x3), one_third) + x2), 1)
    return _wrap32(constant_term + _srdhm(constant_term, _wrap32(x + poly)))


_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308))
_EXP_BARREL += ((2, 39332535), (3, 720401), (4, 242))


def _exp_on_negative_values(a: np.ndarray, integer_bits: int) -> np.ndarray:
    """gemmlowp ``exp_on_negative_values`` of a Q(integer_bits) value -> Q0.31."""
    frac = 31 - integer_bits
    one_quarter = 1 << (frac - 2)
    a_mod = _wrap32((a & (one_quarter - 1)) - one_quarter)
    result = _exp_interval(_sat_lshift(a_mod, integer_bits) if integer_bits else a_mod)
    remainder = _wrap32(a_mod - a)
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = 1 << (frac + exponent)
            result = np.where((remainder & bit) != 0, _srdhm(result, multiplier), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        result = np.where(a < clamp, 0, result)
    return np.where(a == 0, _I32_MAX, result)


def _newton_reciprocal(a: np.ndarray) -> np.ndarray:
    """The Q2.29 Newton iterate of ``1 / (1 + a)`` shared by gemmlowp's two reciprocals."""
    s = a + _I32_MAX
    half_denominator = np.where(s >= 0, (s + 1) // 2, -((-s + 1) // 2))  # RoundingHalfSum
    x = _wrap32(1515870810 + _srdhm(half_denominator, -1010580540))
    for _ in range(3):
        one_minus = _wrap32((1 << 29) - _srdhm(half_denominator, x))
        x = _wrap32(x + _sat_lshift(_srdhm(x, one_minus), 2))
    return x


def _one_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """gemmlowp ``one_over_one_plus_x_for_x_in_0_1`` (Q0.31 -> Q0.31)."""
    return _sat_lshift(_newton_reciprocal(a), 1)


def _one_minus_x_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """gemmlowp ``one_minus_x_over_one_plus_x_for_x_in_0_1`` (Q0.31 -> Q0.31)."""
    return _sat_lshift(_wrap32(_newton_reciprocal(a) - (1 << 29)), 2)


def _logistic_q4(a: np.ndarray) -> np.ndarray:
    """gemmlowp ``logistic`` of a Q4.27 value -> Q0.31."""
    positive = a > 0
    abs_a = np.where(positive, a, _wrap32(-a))
    if_positive = _one_over_one_plus_x(_exp_on_negative_values(_wrap32(-abs_a), 4))
    if_negative = _wrap32(_I32_MAX - if_positive)
    return np.where(a == 0, 1 << 30, np.where(positive, if_positive, if_negative))


def _tanh_q4(a: np.ndarray) -> np.ndarray:
    """gemmlowp ``tanh`` of a Q4.27 value -> Q0.31."""
    negative = a < 0
    n = np.where(negative, a, _wrap32(-a))
    t = _one_minus_x_over_one_plus_x(_exp_on_negative_values(n, 5))
    return np.where(a == 0, 0, np.where(negative, _wrap32(-t), t))


def _clz32(x: np.ndarray) -> np.ndarray:
    """Leading zeros of positive int32 values."""
    return 32 - np.frexp(np.asarray(x, np.float64))[1].astype(np.int64)


def _input_radius(integer_bits: int, left_shift: int, total_bits: int = 31) -> int:
    """TFLite's ``CalculateInputRadius``."""
    rescaled = (
        1.0 * ((1 << integer_bits) - 1) * (1 << (total_bits - integer_bits)) / (1 << left_shift)
    )
    return int(math.floor(rescaled))


def _quantize_float(f: float, scale: np.float32, zero_point: int) -> int:
    """TFLite's ``Quantize`` of a float at a float32 scale (activation ranges)."""
    return int(zero_point) + int(_round_away(np.float32(np.float32(f) / np.float32(scale))))


def _activation_range(act: int, scale: np.float32, zp: int) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized`` for int8 outputs."""
    schema = schema_module()
    a = schema.ActivationFunctionType
    lo, hi = -128, 127
    if act == a.RELU:
        return max(lo, _quantize_float(0.0, scale, zp)), hi
    if act == a.RELU6:
        return max(lo, _quantize_float(0.0, scale, zp)), min(hi, _quantize_float(6.0, scale, zp))
    if act == a.RELU_N1_TO_1:
        return max(lo, _quantize_float(-1.0, scale, zp)), min(hi, _quantize_float(1.0, scale, zp))
    if act != a.NONE:
        raise UnsupportedLayerError(f"fused activation {act} is not supported for int8")
    return lo, hi


# -- the interpreter -----------------------------------------------------------------------------


class _Graph:
    """Tensors of subgraph 0: constants from the buffers, activations as they are computed."""

    def __init__(self, model: Any):
        self.model = model
        self.sg = model.subgraphs[0]
        self.values: dict[int, np.ndarray] = {}

    def tensor(self, i: int) -> Any:
        return self.sg.tensors[i]

    def name(self, i: int) -> str:
        n = self.tensor(i).name
        return n.decode() if isinstance(n, bytes) else str(n)

    def shape(self, i: int) -> tuple[int, ...]:
        s = self.tensor(i).shape
        return tuple(int(d) for d in (s if s is not None else []))

    def dtype(self, i: int) -> str | None:
        return tensor_dtype(self.tensor(i))

    def get(self, i: int) -> np.ndarray:
        if i not in self.values:
            buf = self.model.buffers[self.tensor(i).buffer]
            if getattr(buf, "data", None) is None or len(buf.data) == 0:
                raise CheckpointError(f"tensor {i} ({self.name(i)}) is read before it is computed")
            self.values[i] = tensor_array(self.model, i)
        return self.values[i]

    def qparams(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(scales float32 [C], zero points int64 [C]); ConfigError if not quantized."""
        q = self.tensor(i).quantization
        if q is None or q.scale is None or len(q.scale) == 0:
            raise ConfigError(f"tensor {i} ({self.name(i)}) has no quantization parameters")
        s = np.asarray(q.scale, np.float32)
        z = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros(len(s)), np.int64)
        if z.size == 0:
            z = np.zeros(s.size, np.int64)
        return s, z

    def q1(self, i: int) -> tuple[np.float32, int]:
        """Per-tensor (scale, zero point); UnsupportedLayerError for a per-channel activation."""
        s, z = self.qparams(i)
        if s.size != 1:
            raise UnsupportedLayerError(
                f"tensor {i} ({self.name(i)}) is quantized per channel; activations must be "
                "per-tensor"
            )
        return np.float32(s[0]), int(z[0])


def _require(ok: bool, what: str) -> None:
    """Refuse, as TFLM's Prepare does, a model that breaks one of :data:`REQUIREMENTS`."""
    if not ok:
        raise ConfigError(f"TFLM refuses this: {what}")


def _opts(op: Any) -> Any:
    return op.builtinOptions


def _int8(x: np.ndarray, lo: int = -128, hi: int = 127) -> np.ndarray:
    return np.clip(x, lo, hi).astype(np.int8)


# -- convolutions ------------------------------------------------------------------------------


def _padding(padding: int, in_size: int, filt: int, stride: int, dilation: int) -> int:
    """TFLite's ``ComputePaddingHeightWidth``: the leading padding of one spatial dimension."""
    schema = schema_module()
    eff = (filt - 1) * dilation + 1
    if padding == schema.Padding.SAME:
        out = (in_size + stride - 1) // stride
    else:
        out = (in_size - eff + stride) // stride
    total = max((out - 1) * stride + eff - in_size, 0)
    return total // 2


def _taps(
    x: np.ndarray,
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pad: tuple[int, int],
    fill: float = 0,
) -> list[np.ndarray]:
    """x ``[N, H, W, C]`` -> for each kernel tap (row-major over KH, KW) the strided view
    ``[N, OH, OW, C]`` of the inputs it reads; taps outside x read ``fill`` (TFLM skips them:
    0 after the zero-point offset, or an identity for the max)."""
    n, h, w, c = x.shape
    (oh, ow), (kh, kw), (sh, sw), (dh, dw), (ph, pw) = out_hw, kernel, stride, dilation, pad
    need_h = (oh - 1) * sh + (kh - 1) * dh + 1
    need_w = (ow - 1) * sw + (kw - 1) * dw + 1
    big = np.full((n, max(need_h, ph + h), max(need_w, pw + w), c), fill, dtype=x.dtype)
    big[:, ph : ph + h, pw : pw + w] = x
    return [
        big[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


def _conv_multipliers(
    g: _Graph, x: int, w: int, y: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (multiplier, shift) as ``PopulateConvolutionQuantizationParams`` computes them
    (a per-tensor filter scale is used for every channel)."""
    s_in, _ = g.q1(x)
    s_out, _ = g.q1(y)
    s_w, _ = g.qparams(w)
    if s_w.size not in (1, channels):
        raise ConfigError(f"tensor {w}: {s_w.size} scales for {channels} output channels")
    scales = np.broadcast_to(s_w, (channels,))
    pairs = [quantize_multiplier(float(s_in) * float(sw) / float(s_out)) for sw in scales]
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def _requantize_acc(
    acc: np.ndarray, mult: np.ndarray, shift: np.ndarray, zp: int, lo: int, hi: int
) -> np.ndarray:
    out = multiply_by_quantized_multiplier(acc, mult, shift) + zp
    return _int8(out, lo, hi)


def _bias(g: _Graph, op: Any, channels: int) -> np.ndarray:
    if len(op.inputs) > 2 and op.inputs[2] != -1:
        b = g.get(int(op.inputs[2])).astype(np.int64).ravel()
        if b.size != channels:
            raise ConfigError(f"bias of {b.size} values for {channels} output channels")
        return b
    return np.zeros(channels, np.int64)


def _window_taps(g: _Graph, op: Any, xa: np.ndarray, kh: int, kw: int) -> list[np.ndarray]:
    """The ``kh * kw`` taps of a CONV_2D / DEPTHWISE_CONV_2D window over the int8 input ``xa
    [N, H, W, C]`` less its zero point, each ``[N, OH, OW, C]`` float64 (exact integers), with
    the op's padding, strides and dilations."""
    o = _opts(op)
    x, y = int(op.inputs[0]), int(op.outputs[0])
    _, zp_in = g.q1(x)
    _, h, wd, _ = xa.shape
    pad = (
        _padding(o.padding, h, kh, o.strideH, o.dilationHFactor),
        _padding(o.padding, wd, kw, o.strideW, o.dilationWFactor),
    )
    return _taps(
        (xa - zp_in).astype(np.float64),
        tuple(g.shape(y)[1:3]),
        (kh, kw),
        (o.strideH, o.strideW),
        (o.dilationHFactor, o.dilationWFactor),
        pad,
    )


def _conv_output(g: _Graph, op: Any, acc: np.ndarray) -> None:
    """A convolution's exact sums ``acc [N, OH, OW, Cout]`` (float64 integers) as TFLM ends it:
    int32 accumulation, the int32 bias, per-channel requantization, the fused activation's
    clamp; stored as the op's output."""
    x, w, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    cout = acc.shape[-1]
    acc = _wrap32(acc.astype(np.int64))  # TFLM accumulates in int32
    acc = _wrap32(acc + _bias(g, op, cout))
    mult, shift = _conv_multipliers(g, x, w, y, cout)
    s_out, zp_out = g.q1(y)
    lo, hi = _activation_range(_opts(op).fusedActivationFunction, s_out, zp_out)
    g.values[y] = _requantize_acc(acc, mult, shift, zp_out, lo, hi)


def _conv2d(g: _Graph, op: Any) -> None:
    x, w, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    xa = g.get(x).astype(np.int64)
    wa = g.get(w).astype(np.int64)  # [Cout, KH, KW, Cin]
    cout, kh, kw, cin = wa.shape
    n, _, _, c = xa.shape
    if c % cin:
        raise UnsupportedLayerError(f"CONV_2D with {c} input channels and filters of depth {cin}")
    if c != cin:
        raise UnsupportedLayerError("grouped CONV_2D is not supported")
    oh, ow = g.shape(y)[1:3]
    taps = _window_taps(g, op, xa, kh, kw)
    wt = wa.transpose(1, 2, 3, 0).reshape(kh * kw, cin, cout).astype(np.float64)
    acc = np.zeros((n * oh * ow, cout), np.float64)  # exact: |sums| < 2^53
    for tap, wk in zip(taps, wt):
        acc += tap.reshape(n * oh * ow, cin) @ wk
    _conv_output(g, op, acc.reshape(n, oh, ow, cout))


def _depthwise(g: _Graph, op: Any) -> None:
    x, w, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    xa = g.get(x).astype(np.int64)
    wa = g.get(w).astype(np.int64)  # [1, KH, KW, Cout]
    _, kh, kw, cout = wa.shape
    n, _, _, cin = xa.shape
    mult_d = cout // cin
    if mult_d * cin != cout:
        raise ConfigError(f"DEPTHWISE_CONV_2D: {cout} output channels for {cin} input channels")
    oh, ow = g.shape(y)[1:3]
    taps = _window_taps(g, op, xa, kh, kw)
    wt = wa[0].reshape(kh * kw, cout).astype(np.float64)
    acc = np.zeros((n, oh, ow, cout), np.float64)
    for tap, wk in zip(taps, wt):
        # output channel oc reads input channel oc // depth_multiplier
        acc += (np.repeat(tap, mult_d, axis=-1) if mult_d > 1 else tap) * wk
    _conv_output(g, op, acc)


def _fully_connected(g: _Graph, op: Any) -> None:
    x, w, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    o = _opts(op)
    xa = g.get(x).astype(np.int64)
    wa = g.get(w).astype(np.int64)  # [Cout, depth]
    cout, depth = wa.shape
    s_in, zp_in = g.q1(x)
    s_out, zp_out = g.q1(y)
    s_w, zp_w = g.qparams(w)
    _require(s_w.size == 1 or g.dtype(w) != "int4", "per-channel INT4 FULLY_CONNECTED filters")
    if s_w.size == 1 and len(op.inputs) > 2 and op.inputs[2] != -1:
        s_b = float(g.qparams(int(op.inputs[2]))[0][0])
        _require(
            abs(float(s_in) * float(s_w[0]) - s_b) / float(s_out) <= 0.02,
            "FULLY_CONNECTED bias scale differs from s_in * s_w by more than 2% of s_out",
        )
    rows = xa.reshape(-1, depth) - zp_in
    acc = (rows.astype(np.float64) @ (wa - zp_w[0]).T.astype(np.float64)).astype(np.int64)
    acc = _wrap32(acc + _bias(g, op, cout))
    if s_w.size > 1:
        pairs = [quantize_multiplier(float(s_in) * float(s) / float(s_out)) for s in s_w]
        mult = np.array([p[0] for p in pairs], np.int64)
        shift = np.array([p[1] for p in pairs], np.int64)
    else:  # GetQuantizedConvolutionMultipler, in double (TFLM; LiteRT takes s_in * s_w in float)
        m, s = quantize_multiplier(float(s_in) * float(s_w[0]) / float(s_out))
        mult, shift = np.int64(m), np.int64(s)
    act = o.fusedActivationFunction if o is not None else 0
    lo, hi = _activation_range(act, s_out, zp_out)
    out = _requantize_acc(acc, mult, shift, zp_out, lo, hi)
    g.values[y] = out.reshape(_out_shape(g, y, out.shape))


def _out_shape(g: _Graph, y: int, computed: tuple[int, ...]) -> tuple[int, ...]:
    """The model's shape for output ``y``, which must hold the computed values."""
    shape = g.shape(y)
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(computed, dtype=np.int64)):
        raise CheckpointError(f"output {g.name(y)!r} has shape {shape}, the values {computed}")
    return shape


# -- elementwise binary --------------------------------------------------------------------------


def _add_sub(g: _Graph, op: Any, sub: bool) -> None:
    a, b, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    s1, z1 = g.q1(a)
    s2, z2 = g.q1(b)
    so, zo = g.q1(y)
    left_shift = 20
    twice_max = 2.0 * float(max(s1, s2))
    r1 = float(s1) / twice_max
    r2 = float(s2) / twice_max
    ro = twice_max / ((1 << left_shift) * float(so))
    if ro >= 1.0:  # QuantizeMultiplierSmallerThanOneExp's TFLITE_CHECK: TFLM aborts
        raise ConfigError(
            f"2 * max(input scales) / (2^20 * output scale) = {ro:.3g} must be < 1 "
            "(TFLM aborts the process otherwise)"
        )
    m1, sh1 = quantize_multiplier(r1)
    m2, sh2 = quantize_multiplier(r2)
    mo, sho = quantize_multiplier(ro)
    xa = (g.get(a).astype(np.int64) - z1) << left_shift
    xb = (g.get(b).astype(np.int64) - z2) << left_shift
    va = _mbqm_smaller_than_one(_wrap32(xa), m1, sh1)
    vb = _mbqm_smaller_than_one(_wrap32(xb), m2, sh2)
    raw = _wrap32(va - vb if sub else va + vb)
    out = _mbqm_smaller_than_one(raw, mo, sho) + zo
    lo, hi = _activation_range(_opts(op).fusedActivationFunction, so, zo)
    g.values[y] = _int8(out, lo, hi)


def _mul(g: _Graph, op: Any) -> None:
    a, b, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    s1, z1 = g.q1(a)
    s2, z2 = g.q1(b)
    so, zo = g.q1(y)
    m, sh = quantize_multiplier(float(s1) * float(s2) / float(so))
    prod = (g.get(a).astype(np.int64) - z1) * (g.get(b).astype(np.int64) - z2)
    out = multiply_by_quantized_multiplier(prod, m, sh) + zo
    lo, hi = _activation_range(_opts(op).fusedActivationFunction, so, zo)
    g.values[y] = _int8(out, lo, hi)


# -- pooling and reductions ----------------------------------------------------------------------


def _pool(g: _Graph, op: Any, average: bool) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    o = _opts(op)
    xa = g.get(x).astype(np.int64)
    so, zo = g.q1(y)
    si, zi = g.q1(x)
    _require(
        abs(float(si) - float(so)) <= 1e-6 and zi == zo,
        "pooling input and output quantization must match",
    )
    n, h, w, c = xa.shape
    kh, kw = o.filterHeight, o.filterWidth
    oh, ow = g.shape(y)[1:3]
    pad = (_padding(o.padding, h, kh, o.strideH, 1), _padding(o.padding, w, kw, o.strideW, 1))
    geom = ((oh, ow), (kh, kw), (o.strideH, o.strideW), (1, 1), pad)
    lo, hi = _activation_range(o.fusedActivationFunction, so, zo)
    if average:
        total = sum(_taps(xa, *geom))  # raw codes: TFLM averages without rescaling
        count = sum(_taps(np.ones((1, h, w, 1), np.int64), *geom))  # taps inside the input
        half = count // 2
        num = np.where(total > 0, total + half, total - half)
        avg = np.where(num >= 0, num // count, -((-num) // count))  # C division
        g.values[y] = _int8(avg, lo, hi)
    else:
        g.values[y] = _int8(np.maximum.reduce(_taps(xa, *geom, fill=-(1 << 20))), lo, hi)


def _mean(g: _Graph, op: Any) -> None:
    x, ax, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    xa = g.get(x).astype(np.int64)
    axes = tuple(sorted({int(a) % xa.ndim for a in np.atleast_1d(g.get(ax))}))
    si, zi = g.q1(x)
    so, zo = g.q1(y)
    mult, shift = quantize_multiplier(float(si) / float(so))
    count = int(np.prod([xa.shape[a] for a in axes], dtype=np.int64))
    total = xa.sum(axis=axes)
    if count > 0:  # QuantizedMeanOrSum folds 1/count into the multiplier
        s = min(count.bit_length() - 1, 32, 31 + shift)
        mult = (mult << s) // count
        shift = shift - s
    out = multiply_by_quantized_multiplier(_wrap32(total - zi * count), mult, shift) + zo
    out = _int8(out)
    g.values[y] = out.reshape(_out_shape(g, y, out.shape))


# -- activations ---------------------------------------------------------------------------------


def _lut(g: _Graph, op: Any, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Apply an int8 -> int8 function computed once over all 256 codes."""
    x, y = int(op.inputs[0]), int(op.outputs[0])
    table = _int8(fn(np.arange(-128, 128, dtype=np.int64)))
    g.values[y] = table[g.get(x).astype(np.int64) + 128]


def _softmax(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    si, _ = g.q1(x)
    so, zo = g.q1(y)
    _require(so == np.float32(1 / 256) and zo == -128, "int8 SOFTMAX output must be 1/256, -128")
    beta = float(np.float32(_opts(op).beta))
    max_real = float((1 << 30) - 1) if _SINGLE_ROUNDING else float((1 << 31) - 1)
    real = min(beta * float(si) * float(1 << (31 - 5)), max_real)
    mult, left_shift = quantize_multiplier(real)
    diff_min = -_input_radius(5, left_shift)
    xa = g.get(x).astype(np.int64)
    diff = xa - xa.max(axis=-1, keepdims=True)
    # exp of every possible difference (-255..0) once, then gather
    table_diff = np.arange(-255, 1, dtype=np.int64)
    exp_table = _exp_on_negative_values(_mbqm_greater_than_one(table_diff, mult, left_shift), 5)
    valid = diff >= diff_min
    exps = np.where(valid, exp_table[diff + 255], 0)
    total = _wrap32(np.where(valid, _rdbpot(exps, 12), 0).sum(axis=-1, keepdims=True))
    hp1 = _clz32(total)
    bits_over_unit = 12 - hp1
    shifted_minus_one = _wrap32(((total << hp1) & 0xFFFFFFFF) - (1 << 31))
    scale = _one_over_one_plus_x(shifted_minus_one)
    exponent = bits_over_unit + 31 - 8
    out = _rdbpot(_srdhm(scale, exps), exponent) - 128
    g.values[y] = np.where(valid, _int8(out), np.int8(-128)).astype(np.int8)


def _sigmoid_like(g: _Graph, op: Any, tanh: bool) -> None:
    x = int(op.inputs[0])
    si, zi = g.q1(x)
    if not tanh:
        _require(
            g.q1(int(op.outputs[0]))[1] == -128, "int8 LOGISTIC output zero point must be -128"
        )
    q, left_shift = math.frexp(float(si) * float(1 << (31 - 4)))
    mult = int(_round_away(np.float64(q) * float(1 << 31)))
    mult = int(_wrap32(np.int64(mult)))  # static_cast<int32_t> of 2^31 wraps
    radius = _input_radius(4, left_shift)

    def fn(codes: np.ndarray) -> np.ndarray:
        v = codes - zi
        q4 = multiply_by_quantized_multiplier(v, mult, left_shift)
        # TANH: Q0.31 -> steps of 1/128 (zero point 0); LOGISTIC: steps of 1/256, zero point -128
        out = _rdbpot(_tanh_q4(q4), 24) if tanh else _rdbpot(_logistic_q4(q4), 23) - 128
        out = np.clip(out, -128, 127)
        return np.where(v <= -radius, -128, np.where(v >= radius, 127, out))

    _lut(g, op, fn)


def _wrap16(x: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, np.int64) + 2**15) & 0xFFFF) - 2**15


def _rdbpot16(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT`` on int16: its mask ``(1 << e) - 1`` is truncated to 16
    bits, so for ``e >= 16`` it returns 1 for ``x >= 0`` and -1 for ``x < 0``."""
    x = np.asarray(x, np.int64)
    mask = int(_wrap16(np.int64((1 << exponent) - 1)))
    remainder = _wrap16(x & mask)
    threshold = _wrap16((mask >> 1) + (x < 0))
    return _wrap16((x >> exponent) + (remainder > threshold))


def _srdhm16(a: np.ndarray, b: int) -> np.ndarray:
    ab = np.asarray(a, np.int64) * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    r = _wrap16(_trunc_div_pow2(ab + nudge, 15))
    return np.where((a == b) & (a == -(2**15)), 2**15 - 1, r)


def _sat_lshift16(x: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(np.asarray(x, np.int64) * (1 << amount), -(2**15), 2**15 - 1)


def _int16_multiplier(real: float) -> tuple[int, int]:
    """``QuantizeMultiplier`` then ``DownScaleInt32ToInt16Multiplier``."""
    m, e = quantize_multiplier(real)
    if m >= _I32_MAX - (1 << 15):
        return 2**15 - 1, e
    return (m + (1 << 15)) >> 16, e


def _hard_swish(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    si, zi = g.q1(x)
    so, zo = g.q1(y)
    hires = (1.0 / 128.0) * float(si)
    out_m, out_e = _int16_multiplier(hires / float(so))
    rel_m, rel_e = _int16_multiplier(hires / (3.0 / 32768.0))
    if out_e > 0:
        raise ConfigError("HARD_SWISH: input scale / 128 / output scale must be < 1 in TFLM")

    def fn(codes: np.ndarray) -> np.ndarray:
        v = _wrap16(codes - zi)
        v_hires = _wrap16(v * 128)
        preshift = _srdhm16(v_hires, out_m)
        r = v_hires
        if rel_e > 0:
            r = _sat_lshift16(r, rel_e - 1)
        r = _srdhm16(r, rel_m)
        if rel_e > 0:
            r = _sat_lshift16(r, 1)
        if rel_e < 0:
            r = _rdbpot16(r, -rel_e)
        r = _wrap16((r + (1 << 15)) >> 1)
        ab = r * preshift  # SaturatingDoublingHighMul: truncating, no rounding nudge
        pre = _wrap16(_trunc_div_pow2(ab, 15))
        pre = np.where((r == preshift) & (r == -(2**15)), 2**15 - 1, pre)
        out = _wrap16(_rdbpot16(pre, -out_e) + zo)
        return np.clip(out, -128, 127)

    _lut(g, op, fn)


def _relu(g: _Graph, op: Any) -> None:
    x = int(op.inputs[0])
    si, zi = g.q1(x)
    so, zo = g.q1(int(op.outputs[0]))
    m, s = quantize_multiplier(float(si) / float(so))
    lo = max(-128, zo)

    def fn(codes: np.ndarray) -> np.ndarray:
        return np.clip(zo + multiply_by_quantized_multiplier(codes - zi, m, s), lo, 127)

    _lut(g, op, fn)


def _relu6(g: _Graph, op: Any) -> None:
    si, zi = g.q1(int(op.inputs[0]))
    six = int(np.clip(int(_round_away(np.float32(np.float32(6.0) / si))) + zi, -128, 127))
    lo = int(np.clip(zi, -128, 127))
    _lut(g, op, lambda codes: np.clip(codes, lo, six))


def _leaky_relu(g: _Graph, op: Any) -> None:
    si, zi = g.q1(int(op.inputs[0]))
    so, zo = g.q1(int(op.outputs[0]))
    alpha = np.float32(_opts(op).alpha)
    ma, sa = quantize_multiplier(float(si) * float(alpha) / float(so))
    mi, shi = quantize_multiplier(float(si) / float(so))
    negative_alpha = ma < 0

    def fn(codes: np.ndarray) -> np.ndarray:
        v = codes - zi
        pos = multiply_by_quantized_multiplier(v, mi, shi)
        neg = multiply_by_quantized_multiplier(v, abs(ma), sa)
        neg = -neg if negative_alpha else neg
        return np.clip(zo + np.where(v >= 0, pos, neg), -128, 127)

    _lut(g, op, fn)


# -- conversions and data movement ---------------------------------------------------------------


def _quantize(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    so, zo = g.q1(y)
    if g.dtype(y) != "int8":
        raise UnsupportedLayerError(f"QUANTIZE to {g.dtype(y)} is not supported")
    if g.dtype(x) == "float32":
        v = g.get(x).astype(np.float32)
        q = _round_away(np.float32(v / np.float32(so)))
        q = np.clip(np.nan_to_num(q, nan=0.0, posinf=2**31 - 1, neginf=-(2**31)), -(2**31), 2**31)
        g.values[y] = _int8(q.astype(np.int64) + zo)
    elif g.dtype(x) == "int8":
        si, zi = g.q1(x)
        m, s = quantize_multiplier(float(si) / float(so))
        v = g.get(x).astype(np.int64) - zi
        g.values[y] = _int8(multiply_by_quantized_multiplier(v, m, s) + zo)
    else:
        raise UnsupportedLayerError(f"QUANTIZE from {g.dtype(x)} is not supported")


def _dequantize(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    si, zi = g.q1(x)
    v = g.get(x).astype(np.int64) - zi
    g.values[y] = (float(si) * v.astype(np.float64)).astype(np.float32)


def _reshape(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    g.values[y] = g.get(x).reshape(g.shape(y))


def _concatenation(g: _Graph, op: Any) -> None:
    y = int(op.outputs[0])
    q_out = g.q1(y)
    for i in op.inputs:
        _require(g.q1(int(i)) == q_out, "CONCATENATION inputs must share the output quantization")
    _require(_opts(op).fusedActivationFunction == 0, "CONCATENATION with a fused activation")
    parts = [g.get(int(i)) for i in op.inputs]
    g.values[y] = np.concatenate(parts, axis=_opts(op).axis % parts[0].ndim)


def _pad(g: _Graph, op: Any) -> None:
    x, p, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    xa = g.get(x)
    pads = g.get(p).astype(np.int64).reshape(-1, 2)
    if len(op.inputs) > 2 and op.inputs[2] != -1:
        c = int(op.inputs[2])
        _require(g.q1(c) == g.q1(y), "PADV2's constant must have the output's quantization")
        value = int(g.get(c).ravel()[0])
    else:
        value = g.q1(y)[1]
    g.values[y] = np.pad(xa, [tuple(r) for r in pads], constant_values=value).astype(xa.dtype)


def _transpose(g: _Graph, op: Any) -> None:
    x, p, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    g.values[y] = np.ascontiguousarray(np.transpose(g.get(x), g.get(p).astype(np.int64)))


def _nearest_index(out_size: int, in_size: int, align: bool, half: bool) -> np.ndarray:
    """``GetNearestNeighbor`` in float32, as the reference kernel computes it."""
    if align and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    offset = np.float32(0.5 if half else 0.0)
    pos = (np.arange(out_size, dtype=np.float32) + offset) * np.float32(scale)
    idx = _round_away(pos) if align else np.floor(pos)
    idx = np.minimum(idx.astype(np.int64), in_size - 1)
    return np.maximum(idx, 0) if half else idx


def _resize_nearest(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    o = _opts(op)
    xa = g.get(x)
    oh, ow = (int(v) for v in g.get(int(op.inputs[1])))
    align, half = bool(o.alignCorners), bool(o.halfPixelCenters)
    iy = _nearest_index(oh, xa.shape[1], align, half)
    ix = _nearest_index(ow, xa.shape[2], align, half)
    g.values[y] = xa[:, iy][:, :, ix]


def _slice_axis(size: int, begin: int, end: int, stride: int, masks: tuple[int, ...]) -> list[int]:
    """The indices one axis of STRIDED_SLICE reads (TFLite's ``StridedSliceStartForAxis`` /
    ``StridedSliceEndForAxis``); ``masks`` = (begin, end, shrink, offset) bits for this axis."""
    begin_mask, end_mask, shrink, offset = masks
    if stride == 0:
        raise ConfigError("STRIDED_SLICE with a zero stride")
    start = begin + size if begin < 0 else begin
    start = min(max(start, 0), size) if stride > 0 else min(max(start, -1), size - 1)
    if begin_mask:
        start = 0 if stride > 0 else size - 1
    if shrink:
        stop = start if start >= size else start + 1
    else:
        stop = end + start if offset else end
        stop = stop + size if stop < 0 else stop
        stop = min(max(stop, 0), size) if stride > 0 else min(max(stop, -1), size - 1)
        if end_mask:
            stop = size if stride > 0 else -1
    return list(range(start, stop, stride))


def _strided_slice(g: _Graph, op: Any) -> None:
    x, y = int(op.inputs[0]), int(op.outputs[0])
    o = _opts(op)
    if o.ellipsisMask or o.newAxisMask:
        raise UnsupportedLayerError("STRIDED_SLICE with ellipsis or new-axis masks")
    xa = g.get(x)
    _require(xa.ndim <= 4, "STRIDED_SLICE of more than 4 dimensions")
    begin, end, strides = (g.get(int(i)).astype(np.int64).ravel() for i in op.inputs[1:4])
    index = []
    for d in range(xa.ndim):
        if d >= len(begin):
            index.append(list(range(xa.shape[d])))
            continue
        bits = tuple(int(m >> d & 1) for m in (o.beginMask, o.endMask, o.shrinkAxisMask))
        masks = (*bits, int(bool(o.offset)))
        index.append(_slice_axis(xa.shape[d], int(begin[d]), int(end[d]), int(strides[d]), masks))
    out = xa[np.ix_(*index)] if xa.ndim else xa
    kept = tuple(n for d, n in enumerate(out.shape) if not (o.shrinkAxisMask >> d & 1))
    _require(g.shape(y) == kept, f"STRIDED_SLICE output shape {g.shape(y)}, computed {kept}")
    g.values[y] = out.reshape(kept)


OPS: dict[str, Callable[[_Graph, Any], None]] = {
    "CONV_2D": _conv2d,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "ADD": lambda g, op: _add_sub(g, op, sub=False),
    "SUB": lambda g, op: _add_sub(g, op, sub=True),
    "MUL": _mul,
    "AVERAGE_POOL_2D": lambda g, op: _pool(g, op, average=True),
    "MAX_POOL_2D": lambda g, op: _pool(g, op, average=False),
    "MEAN": _mean,
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "CONCATENATION": _concatenation,
    "PAD": _pad,
    "PADV2": _pad,
    "SOFTMAX": _softmax,
    "LOGISTIC": lambda g, op: _sigmoid_like(g, op, tanh=False),
    "TANH": lambda g, op: _sigmoid_like(g, op, tanh=True),
    "HARD_SWISH": _hard_swish,
    "RELU": _relu,
    "RELU6": _relu6,
    "LEAKY_RELU": _leaky_relu,
    "QUANTIZE": _quantize,
    "DEQUANTIZE": _dequantize,
    "TRANSPOSE": _transpose,
    "RESIZE_NEAREST_NEIGHBOR": _resize_nearest,
    "STRIDED_SLICE": _strided_slice,
}
"""Operator name -> its simulation (reads its inputs from the graph, stores its outputs)."""

_MALFORMED = (
    ValueError, IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError,
    MemoryError,
)  # fmt: skip

_FLOAT_OK = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE"}


# -- entry points --------------------------------------------------------------------------------


def _as_model(model: Any) -> Any:
    if isinstance(model, (bytes, bytearray, memoryview, str, Path)):
        return read_model(model)
    return model


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """BLAS limited to one thread while simulating (``threadpoolctl`` if installed): the
    matrices are small, and a multi-threaded BLAS on a busy machine is several times slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _check_ops(m: Any) -> None:
    for k, op in enumerate(m.subgraphs[0].operators or []):
        name = op_name(m, op)
        if name not in OPS:
            raise UnsupportedLayerError(f"operator {k} ({name}) is not supported by the simulator")


MAX_ELEMENTS = 1 << 24
"""The largest tensor :func:`simulate` runs (16M elements: EfficientNet-Lite0's largest
activation has 1.2M); a larger one is refused, not allocated."""


def simulate(model: bytes | str | Path | Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` (bytes, a path or a parsed ``ModelT``) on ``inputs`` with TFLM's integer
    arithmetic; the outputs in their stored dtype.

    Each input is the model input's shape, or (model batch 1) a batch ``[N, ...]`` run one sample
    at a time and stacked.
    """
    m = _as_model(model)
    if len(m.subgraphs) != 1:
        raise UnsupportedLayerError(f"models with {len(m.subgraphs)} subgraphs are not supported")
    _check_ops(m)
    sg = m.subgraphs[0]
    if sg.inputs is None or sg.outputs is None:
        raise CheckpointError("the model's subgraph names no inputs or no outputs")
    for i, t in enumerate(sg.tensors or []):
        n = int(np.prod(np.abs(np.asarray(t.shape if t.shape is not None else [], np.int64))))
        if n > MAX_ELEMENTS:
            raise ConfigError(
                f"tensor {i} has {n:,} elements: omse's simulation runs tensors of up to "
                f"{MAX_ELEMENTS:,} (a corrupt shape, or a model too large to simulate here)"
            )
    batches = _split_batch(m, inputs)
    with _one_blas_thread():
        runs = [_run(m, xs) for xs in batches]
    return _stack(runs)


def _split_batch(m: Any, inputs: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """The model's inputs, checked against its input tensors (count, dtype, shape), as one run,
    or -- inputs ``[N, ...]`` for a model whose batch dimension is 1 -- as N runs of one sample."""
    g = _Graph(m)
    in_idx = [int(i) for i in m.subgraphs[0].inputs]
    if len(inputs) != len(in_idx):
        raise ConfigError(f"the model takes {len(in_idx)} inputs, {len(inputs)} given")
    arrays = [np.asarray(a) for a in inputs]
    sizes = set()
    for i, a in zip(in_idx, arrays):
        shape, want = g.shape(i), g.dtype(i)
        if want is None or a.dtype != np.dtype(DTYPES[want]):
            raise ConfigError(f"input {g.name(i)!r}: dtype {a.dtype}, the model wants {want}")
        if a.shape == shape:
            sizes.add(None)
        elif len(shape) > 0 and shape[0] == 1 and a.ndim == len(shape) and a.shape[1:] == shape[1:]:
            sizes.add(a.shape[0])
        else:
            raise ConfigError(f"input {g.name(i)!r}: shape {a.shape}, the model wants {shape}")
    if len(sizes) > 1:
        raise ConfigError("batched inputs must all carry the same batch size")
    n = sizes.pop() if sizes else None
    if n is None:
        return [arrays]
    if n == 0:
        raise ConfigError("an empty batch (0 samples)")
    return [[a[k : k + 1] for a in arrays] for k in range(n)]


def _stack(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
    if len(runs) == 1:
        return runs[0]
    return [np.concatenate(outs, axis=0) for outs in zip(*runs)]


def _run(m: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    g = _Graph(m)
    sg = m.subgraphs[0]
    for i, a in zip(sg.inputs, arrays):
        g.values[int(i)] = a
    for k, op in enumerate(sg.operators or []):
        name = op_name(m, op)
        if op.outputs is None or len(op.outputs) == 0 or op.inputs is None:
            raise CheckpointError(f"operator {k} ({name}) has no inputs or outputs")
        for j in op.outputs:
            if g.dtype(int(j)) not in ("int8", "float32") or (
                g.dtype(int(j)) == "float32" and name not in _FLOAT_OK
            ):
                raise UnsupportedLayerError(
                    f"operator {k} ({name}): output type {g.dtype(int(j))} is not supported"
                )
        try:
            OPS[name](g, op)
        except OmseError as e:
            raise type(e)(f"operator {k} ({name}): {e}") from e
        except _MALFORMED as e:  # shapes, indices or options that do not fit together
            raise CheckpointError(
                f"operator {k} ({name}): inconsistent model ({type(e).__name__}: {e})"
            ) from e
    missing = [int(i) for i in sg.outputs if int(i) not in g.values]
    if missing:
        raise CheckpointError(f"graph outputs {missing} are never computed")
    return [g.values[int(i)] for i in sg.outputs]


# -- the runtimes ---------------------------------------------------------------------------------


def _default_arena(model: bytes) -> int:
    m = read_model(model)
    total = 0
    for t in m.subgraphs[0].tensors:
        shape = t.shape if t.shape is not None else []
        total += 4 * int(np.prod(np.abs(np.asarray(shape, np.int64)))) + 256
    return max(10 * len(model), 4 * total + (1 << 20))


def _tflm() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"TFLM runs need the tflite-micro package: pip install tflite-micro ({e})"
        ) from e
    return runtime


def _to_bytes(model: bytes | str | Path) -> bytes:
    if isinstance(model, (str, Path)):
        return Path(model).read_bytes()
    return bytes(model)


def tflm_run(
    model: bytes | str | Path, inputs: Sequence[np.ndarray], *, isolated: bool = False
) -> list[np.ndarray]:
    """Run ``model`` in TFLite Micro's Python interpreter (reference kernels); batches as in
    :func:`simulate`. The model is parsed by :func:`read_model` first (TFLM itself does not
    validate the flatbuffer), and the arena is generous. A model TFLM refuses raises
    ``RuntimeError``; some it crashes on instead (see :data:`REQUIREMENTS`): ``isolated=True``
    runs it in a child process and turns a crash into an :class:`~omse.errors.OmseError`."""
    data = _to_bytes(model)
    if isolated:
        return _tflm_isolated(data, inputs)
    m = read_model(data)
    runtime = _tflm()
    interp = runtime.Interpreter.from_bytes(data, arena_size=_default_arena(data))
    n_out = len(m.subgraphs[0].outputs)
    return _stack([_tflm_invoke(interp, xs, n_out) for xs in _split_batch(m, inputs)])


_CHILD = """
import sys, numpy as np
from omse.deploy.tflite_sim import tflm_run
d = np.load(sys.argv[2])
try:
    outs = tflm_run(open(sys.argv[1], "rb").read(), [d[f"x{k}"] for k in range(len(d.files))])
except RuntimeError as e:
    print("REFUSED", e, file=sys.stderr)
    sys.exit(3)
np.savez(sys.argv[3], *outs)
"""


def _tflm_isolated(data: bytes, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="omse_tflm_") as tmp:
        mpath, xpath, ypath = (Path(tmp) / n for n in ("m.tflite", "x.npz", "y.npz"))
        mpath.write_bytes(data)
        np.savez(xpath, **{f"x{k}": np.asarray(a) for k, a in enumerate(inputs)})
        src = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run(
            [sys.executable, "-c", _CHILD, str(mpath), str(xpath), str(ypath)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode == 3:
            raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
        if r.returncode != 0:
            how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            raise OmseError(f"TFLM crashed on this model ({how}): {' | '.join(tail)}")
        with np.load(ypath) as y:
            return [y[f"arr_{k}"] for k in range(len(y.files))]


def _tflm_invoke(interp: Any, xs: list[np.ndarray], n_out: int) -> list[np.ndarray]:
    for k, x in enumerate(xs):
        interp.set_input(x, k)
    interp.invoke()
    return [np.array(interp.get_output(k)) for k in range(n_out)]


def litert_run(
    model: bytes | str | Path, inputs: Sequence[np.ndarray], reference_kernels: bool = False
) -> list[np.ndarray]:
    """Run ``model`` in LiteRT (``ai_edge_litert.interpreter``); ``reference_kernels`` selects
    the ``BUILTIN_REF`` op resolver (the reference kernels TFLM also builds on) instead of the
    optimized builtin kernels. Batches as in :func:`simulate`."""
    data = _to_bytes(model)
    m = read_model(data)
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"LiteRT runs need ai-edge-litert: pip install ai-edge-litert ({e})"
        ) from e
    kind = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
    interp = Interpreter(model_content=data, experimental_op_resolver_type=kind, num_threads=1)
    interp.allocate_tensors()

    def run(xs: list[np.ndarray]) -> list[np.ndarray]:
        for d, x in zip(interp.get_input_details(), xs):
            interp.set_tensor(d["index"], x)
        interp.invoke()
        return [np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()]

    return _stack([run(xs) for xs in _split_batch(m, inputs)])


@contextlib.contextmanager
def _capture_fds() -> Any:
    """Collect what C code writes to file descriptors 1 and 2."""
    with tempfile.TemporaryFile(mode="w+b") as f:
        saved = [os.dup(1), os.dup(2)]
        try:
            for fd in (1, 2):
                os.dup2(f.fileno(), fd)
            box: list[str] = []
            yield box
        finally:
            for fd, s in zip((1, 2), saved):
                os.dup2(s, fd)
                os.close(s)
        f.seek(0)
        box.append(f.read().decode(errors="replace"))


def arena_bytes(model: bytes | str | Path) -> int:
    """The TFLM tensor arena ``model`` needs, in bytes: the ``Arena allocation total`` (head:
    the planned activation buffers, plus tail: persistent data) that TFLM's
    ``RecordingMicroAllocator`` reports (``print_allocations``) after one invoke, plus 16 bytes for
    the alignment of the arena's start. Measured against the smallest ``arena_size`` that still
    runs (bisection in child processes, since TFLM crashes on too small an arena): 3968 vs 3944
    bytes on a small test network, 56000 vs 55984 on MLPerf Tiny's ResNet-8, 24288 vs 24272 on
    its keyword-spotting model -- at most 24 bytes of slack."""
    data = _to_bytes(model)
    m = read_model(data)
    runtime = _tflm()
    interp = runtime.Interpreter.from_bytes(data, arena_size=_default_arena(data))
    sg = m.subgraphs[0]
    for k, i in enumerate(sg.inputs):
        t = sg.tensors[int(i)]
        dt = tensor_dtype(t) or "int8"
        interp.set_input(np.zeros(tuple(int(d) for d in t.shape), np.dtype(dt)), k)
    interp.invoke()
    sys.stdout.flush()
    sys.stderr.flush()
    with _capture_fds() as box:
        interp.print_allocations()
    found = re.search(r"Arena allocation total (\d+) bytes", box[0])
    if not found:
        raise OmseError("TFLM did not report its arena allocation")
    return int(found.group(1)) + 16
