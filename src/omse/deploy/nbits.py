"""4-bit Linear weights as onnxruntime's ``com.microsoft.MatMulNBits`` (weight-only quantization).

Contract
--------
omse's 4-bit weights are signed integer codes ``q`` in ``[-8, 7]`` (``[-7, 7]`` on a narrow grid)
with one float scale per output row ``n`` and block of ``block_size`` consecutive input indices:
``W[n, k] = s[n, k // block_size] * q[n, k]`` (``W`` of shape ``[N, K]``, torch's ``nn.Linear``
layout). ``MatMulNBits`` (contrib opset ``com.microsoft`` version 1, onnxruntime) computes
``Y = A @ W.T (+ bias)`` for ``A`` of shape ``[..., K]`` (rank 1, 2, 3 or more) with ``W``
dequantized as ``(u - zero_point) * scale`` from

- ``B``: ``uint8 [N, n_blocks, block_size // 2]``, ``n_blocks = ceil(K / block_size)``: row ``n``'s
  codes along ``K``, two per byte, the **low nibble first** (element ``2j`` of a block in bits 0..3
  of byte ``j``, element ``2j + 1`` in bits 4..7);
- ``scales``: ``[N, n_blocks]``, the dtype of ``A``;
- no ``zero_points`` input: the default zero point is ``2**(bits - 1) = 8``, so the stored unsigned
  nibble is ``u = q + 8`` in ``[0, 15]``.

When ``K`` is not a multiple of ``block_size`` the last block of each row is padded with ``u = 8``
(code 0); onnxruntime reads only the first ``K`` entries of a row (verified: any padding value
gives the same result). ``accuracy_level=0`` (the default: attribute omitted) makes onnxruntime
compute in the float type of ``A``, so the result equals the ``DequantizeLinear -> MatMul`` graph
up to float rounding; ``accuracy_level=4`` lets it quantize ``A`` to int8 per block (faster, not
exact).

:func:`matmul_nbits` builds one such node from codes and scales; :func:`apply_matmul_nbits` rewrites
an exported model in place, turning each weight-only quantized Linear of the forms

- ``DequantizeLinear(codes, scale) -> Gemm(x, W, [c], transB=1, alpha=1, beta=1)`` (torch's
  ``nn.Linear`` on a 2-D input),
- ``DequantizeLinear(codes, scale) -> Transpose(perm=[1, 0]) -> MatMul(x, W^T)`` (on an input of
  another rank),

each optionally followed by ``Add(., b)`` with a constant ``b`` of shape ``[N]`` (folded into the
bias), into one ``MatMulNBits``. ``codes`` must be an ``INT4`` initializer ``[N, K]`` and
``scale`` a float initializer: blocked (``[N, ceil(K/b)]``, ``axis=1``, ``block_size=b``),
per-channel (``[N]``, ``axis=0``: one block per row) or per-tensor (a scalar); a zero-point input,
if any, must be all zeros. The ``MatMulNBits`` block size is ``b`` itself when ``b`` is a power of
two in 16..256, else the largest such power of two dividing ``b`` (scales repeated); a whole-row
scale uses the largest power of two in 16..128 dividing ``K`` (16 with padding if none does).
Layers whose input ``x`` is itself the output of a ``DequantizeLinear`` (quantized activations:
a QDQ graph onnxruntime runs with its own integer fusions) are left alone, as is everything that
does not match exactly (only the main graph is searched, not subgraphs of ``If``/``Loop``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError, UnsupportedLayerError

__all__ = [
    "MS_DOMAIN",
    "MIN_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "pack_nbits",
    "matmul_nbits",
    "apply_matmul_nbits",
]

MS_DOMAIN = "com.microsoft"
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 256
_ROW_BLOCK = 128  # MatMulNBits block size preferred for a whole-row (per-channel) scale
_BITS = 4
_ZERO_POINT = 1 << (_BITS - 1)  # MatMulNBits' default zero point when zero_points is omitted
_QMIN, _QMAX = -_ZERO_POINT, _ZERO_POINT - 1
_FLOATS = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def _check_block_size(block_size: object) -> int:
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, int | np.integer)
        or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ConfigError(
            f"block_size={block_size!r}: MatMulNBits needs a power of two in "
            f"{MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}"
        )
    return int(block_size)


def pack_nbits(codes: np.ndarray, block_size: int, name: str = "layer") -> np.ndarray:
    """Pack signed 4-bit codes for ``MatMulNBits``' input ``B``.

    Args:
        codes: ``[N, K]`` integer codes in ``[-8, 7]`` (row ``n`` = output feature ``n``).
        block_size: power of two in 16..256.
        name: the layer's name, for error messages.

    Returns:
        ``uint8 [N, ceil(K / block_size), block_size // 2]``: ``u = q + 8``, two per byte, the low
        nibble first; the tail of the last block (``K`` not a multiple) is padded with ``u = 8``.
    """
    bs = _check_block_size(block_size)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.size == 0:
        raise ConfigError(
            f"layer {name!r}: codes must be a non-empty [N, K] array, got {codes.shape}"
        )
    if not np.issubdtype(codes.dtype, np.integer):
        raise UnsupportedLayerError(
            f"layer {name!r}: weight codes have dtype {codes.dtype}; MatMulNBits holds integer codes"
        )
    lo, hi = int(codes.min()), int(codes.max())
    if lo < _QMIN or hi > _QMAX:
        raise UnsupportedLayerError(
            f"layer {name!r} has weight codes in [{lo}, {hi}]: MatMulNBits (bits=4) holds signed "
            f"4-bit codes in [{_QMIN}, {_QMAX}]"
        )
    n, k = codes.shape
    n_blocks = -(-k // bs)
    u = np.full((n, n_blocks * bs), _ZERO_POINT, dtype=np.uint8)
    u[:, :k] = (codes.astype(np.int16) + _ZERO_POINT).astype(np.uint8)
    u = u.reshape(n, n_blocks, bs // 2, 2)
    return (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)


def _float_array(arr: np.ndarray, what: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype not in _FLOATS:
        raise ConfigError(f"layer {name!r}: {what} must be float32 or float16, got {arr.dtype}")
    if arr.shape != shape:
        raise ConfigError(f"layer {name!r}: {what} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"layer {name!r}: {what} has non-finite values")
    return arr


def _nbits_node(
    name: str, a: str, y: str, b: str, s: str, bias: str | None, n: int, k: int, bs: int, acc: int
) -> onnx.NodeProto:
    attrs = {"K": k, "N": n, "bits": _BITS, "block_size": bs}
    if acc:
        attrs["accuracy_level"] = acc
    inputs = [a, b, s] + (["", "", bias] if bias else [])  # zero_points, g_idx omitted
    return helper.make_node("MatMulNBits", inputs, [y], name=name, domain=MS_DOMAIN, **attrs)


def matmul_nbits(
    name: str,
    a: str,
    y: str,
    codes: np.ndarray,
    scales: np.ndarray,
    block_size: int,
    bias: np.ndarray | None = None,
    *,
    accuracy_level: int = 0,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """One ``MatMulNBits`` node computing ``y = a @ W.T (+ bias)``, ``W = s[:, k // bs] * q``.

    Args:
        name: node name, also the prefix of the initializers (``{name}.B``, ``{name}.scales``,
            ``{name}.bias``) and the layer named in errors.
        a: input tensor name, float ``[..., K]`` (the dtype of ``scales``).
        y: output tensor name, ``[..., N]``.
        codes: ``[N, K]`` integer codes in ``[-8, 7]``.
        scales: ``[N, ceil(K / block_size)]`` float32 (or float16) scales.
        block_size: power of two in 16..256; ``K`` need not be a multiple (the last block is
            padded).
        bias: optional ``[N]`` bias, same dtype as ``scales``.
        accuracy_level: ``MatMulNBits``' compute type hint: 0 (omitted: compute in the type of
            ``a``, exact up to float rounding) .. 4 (int8 ``a``, approximate).

    Returns:
        ``([node], [B, scales(, bias)])``: the node (domain ``com.microsoft``; the caller adds the
        ``com.microsoft`` opset import, version 1) and its initializers.

    Raises:
        UnsupportedLayerError: codes outside ``[-8, 7]`` or not integers.
        ConfigError: a bad ``block_size``, shape, dtype or ``accuracy_level``.
    """
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level={accuracy_level!r}: use 0..4")
    packed = pack_nbits(codes, block_size, name)
    n, n_blocks, _ = packed.shape
    k = np.asarray(codes).shape[1]
    scales = _float_array(scales, "scales", name, (n, n_blocks))
    inits = [
        numpy_helper.from_array(packed, f"{name}.B"),
        numpy_helper.from_array(scales, f"{name}.scales"),
    ]
    bias_name = None
    if bias is not None:
        bias = _float_array(bias, "bias", name, (n,))
        if bias.dtype != scales.dtype:
            raise ConfigError(f"layer {name!r}: bias is {bias.dtype} but scales are {scales.dtype}")
        bias_name = f"{name}.bias"
        inits.append(numpy_helper.from_array(bias, bias_name))
    node = _nbits_node(
        name, a, y, inits[0].name, inits[1].name, bias_name, n, k, int(block_size), accuracy_level
    )
    return [node], inits


# -- rewriting an exported model ------------------------------------------------------------------
def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pow2_divisor(b: int, hi: int) -> int:
    """The largest power of two ``<= hi`` dividing ``b`` (1 when ``b`` is odd)."""
    p = 1
    while p * 2 <= hi and b % (p * 2) == 0:
        p *= 2
    return p


class _Weight:
    """A convertible weight ``DequantizeLinear``: codes ``[N, K]`` and MatMulNBits-ready scales."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, block_size: int):
        self.codes, self.scales, self.block_size = codes, scales, block_size
        self.packed_names: tuple[str, str] | None = None  # (B, scales) once written


def _weight(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> _Weight | None:
    """Codes and scales of a weight-only ``DequantizeLinear``, or None if it is not one."""
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.input) < 2:
        return None
    q_init, s_init = inits.get(dq.input[0]), inits.get(dq.input[1])
    if q_init is None or s_init is None or q_init.data_type != TensorProto.INT4:
        return None
    if len(q_init.dims) != 2 or s_init.data_type not in _FLOATS.values():
        return None
    if len(dq.input) > 2 and dq.input[2]:
        zp = inits.get(dq.input[2])
        if zp is None or zp.data_type != TensorProto.INT4 or numpy_helper.to_array(zp).any():
            return None
    n, k = (int(d) for d in q_init.dims)
    s = numpy_helper.to_array(s_init)
    at = _attrs(dq)
    axis, b = int(at.get("axis", 1)), int(at.get("block_size", 0))
    if s.ndim == 0 or (s.shape == (1,) and b == 0):  # per tensor
        row = np.full((n, 1), s.reshape(()), dtype=s.dtype)
        b = k
    elif s.ndim == 1 and b == 0 and axis in (0, -2) and s.shape[0] == n:  # per output channel
        row = s.reshape(n, 1)
        b = k
    elif s.ndim == 2 and b > 0 and axis in (1, -1) and s.shape == (n, -(-k // b)):  # blocked
        row = s
        b = min(b, k)
    else:
        return None
    if not np.all(np.isfinite(row)):
        return None
    if b == k:  # one scale per row: any block size, padded if it does not divide K
        bs = _pow2_divisor(k, _ROW_BLOCK)
        bs = bs if bs >= MIN_BLOCK_SIZE else MIN_BLOCK_SIZE
    else:
        bs = _pow2_divisor(b, MAX_BLOCK_SIZE)
        if bs < MIN_BLOCK_SIZE:
            return None
    # MatMulNBits block j covers [j*bs, (j+1)*bs), inside DQ block (j*bs)//b as bs divides b
    starts = np.arange(-(-k // bs)) * bs
    scales = np.ascontiguousarray(row[:, starts // b]) if b < k else np.repeat(row, len(starts), 1)
    codes = numpy_helper.to_array(q_init).astype(np.int8)
    return _Weight(codes, scales, bs)


def _const(name: str, inits, producers) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        at = node.attribute[0] if len(node.attribute) == 1 else None
        if at is not None and at.name == "value":
            return numpy_helper.to_array(at.t)
    return None


def apply_matmul_nbits(model: onnx.ModelProto, *, accuracy_level: int = 0) -> list[str]:
    """Rewrite every weight-only 4-bit Linear of ``model`` (in place) as one ``MatMulNBits``.

    See the module docstring for the matched patterns. The bias (Gemm's ``C`` or a following
    ``Add`` with a constant ``[N]``) becomes the node's bias input; a Gemm ``C`` of another shape
    stays an ``Add`` after it. Nodes and initializers the rewrite leaves unused are removed, the
    ``com.microsoft`` opset import (version 1) is added, and the result is checked with
    ``onnx.checker``.

    Args:
        model: an ONNX model (opset >= 21 for INT4 initializers).
        accuracy_level: passed to every ``MatMulNBits`` (0: exact up to float rounding).

    Returns:
        The names of the rewritten layers: each replaced ``Gemm``/``MatMul`` node's name (its output
        name if it has none), in graph order. Empty if nothing matched (the model is then untouched).
    """
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise ConfigError(f"accuracy_level={accuracy_level!r}: use 0..4")
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: nd for nd in g.node for o in nd.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for nd in g.node:
        for i in set(nd.input):
            if i:
                consumers[i].append(nd)
    graph_out = {o.name for o in g.output}
    names = set(inits) | set(producers) | {i.name for i in g.input}
    names |= {nd.name for nd in g.node if nd.name}

    def fresh(base: str) -> str:
        cand, j = base, 1
        while {cand, f"{cand}.B", f"{cand}.scales", f"{cand}.bias"} & names:
            j += 1
            cand = f"{base}_{j}"
        names.update({cand, f"{cand}.B", f"{cand}.scales", f"{cand}.bias"})
        return cand

    def is_dq(name: str) -> bool:
        p = producers.get(name)
        return p is not None and p.op_type == "DequantizeLinear"

    def sole_consumer(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in graph_out else None

    weights: dict[str, _Weight | None] = {}

    def weight_of(w: str) -> _Weight | None:
        if w not in weights:
            p = producers.get(w)
            weights[w] = _weight(p, inits) if p is not None else None
        return weights[w]

    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(anchor node) -> its replacement
    removed: set[int] = set()  # id() of nodes to drop
    rewritten: list[str] = []
    new_inits: list[onnx.TensorProto] = []
    for nd in g.node:
        if nd.domain not in ("", "ai.onnx") or len(nd.input) < 2:
            continue
        x = nd.input[0]
        c = None
        if nd.op_type == "Gemm":
            at = _attrs(nd)
            if at.get("transA", 0) != 0 or at.get("transB", 0) != 1 or at.get("alpha", 1.0) != 1.0:
                continue
            if len(nd.input) > 2 and nd.input[2]:
                if at.get("beta", 1.0) != 1.0:
                    continue
                c = nd.input[2]
            w_dq = nd.input[1]
        elif nd.op_type == "MatMul":
            tr = producers.get(nd.input[1])
            if (
                tr is None
                or tr.op_type != "Transpose"
                or list(_attrs(tr).get("perm", [])) != [1, 0]
            ):
                continue
            w_dq = tr.input[0]
        else:
            continue
        if not x or is_dq(x) or x == w_dq:
            continue
        w = weight_of(w_dq)
        if w is None:
            continue
        n, k = w.codes.shape
        layer = nd.name or nd.output[0]
        y = nd.output[0]
        bias = None
        tail: list[onnx.NodeProto] = []  # Add(., C) for a Gemm C that is not a [N] constant
        dtype = w.scales.dtype

        def ok(arr, shapes, dtype=dtype):  # a constant bias MatMulNBits can take
            return (
                arr is not None
                and arr.dtype == dtype
                and arr.shape in shapes
                and bool(np.isfinite(arr).all())
            )

        if c is not None:
            arr = _const(c, inits, producers)
            if ok(arr, ((n,), (1, n))):
                bias = arr.reshape(n)
            else:
                pre = fresh(f"{layer}.matmul")
                tail = [helper.make_node("Add", [pre, c], [y], name=f"{pre}.bias_add")]
                y = pre
        else:
            add = sole_consumer(y)
            if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
                other = add.input[1] if add.input[0] == y else add.input[0]
                arr = _const(other, inits, producers) if other != y else None
                if ok(arr, ((n,),)):
                    bias = arr
                    removed.add(id(add))
                    y = add.output[0]
        base = fresh(f"{layer}.nbits")
        if w.packed_names is None:  # first user of this weight writes B and scales
            node_list, node_inits = matmul_nbits(
                base, x, y, w.codes, w.scales, w.block_size, bias, accuracy_level=accuracy_level
            )
            w.packed_names = (node_inits[0].name, node_inits[1].name)
            new_inits += node_inits
            node = node_list[0]
        else:
            b_name = None
            if bias is not None:
                b_name = f"{base}.bias"
                new_inits.append(numpy_helper.from_array(bias, b_name))
            node = _nbits_node(
                base, x, y, *w.packed_names, b_name, n, k, w.block_size, accuracy_level
            )
        replaced[id(nd)] = [node, *tail]
        rewritten.append(layer)
    if not rewritten:
        return []

    out_nodes: list[onnx.NodeProto] = []
    for nd in g.node:
        if id(nd) in replaced:
            out_nodes += replaced[id(nd)]
        elif id(nd) not in removed:
            out_nodes.append(nd)
    # drop what the rewrite left unread (weight DequantizeLinear, Transpose, their constants):
    # nodes and initializers that had readers before and have none now; nothing else is touched
    while True:
        used = {i for nd in out_nodes for i in nd.input if i} | graph_out
        keep = [
            nd
            for nd in out_nodes
            if any(o in used for o in nd.output) or not any(consumers.get(o) for o in nd.output)
        ]
        if len(keep) == len(out_nodes):
            break
        out_nodes = keep
    dropped = {i.name for i in g.initializer if i.name not in used and consumers.get(i.name)}
    del g.node[:]
    g.node.extend(out_nodes)
    kept_inits = [i for i in g.initializer if i.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    graph_inputs = [i for i in g.input if i.name not in dropped]
    del g.input[:]
    g.input.extend(graph_inputs)
    live = used | {o for nd in out_nodes for o in nd.output}
    value_info = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(value_info)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.checker.check_model(model)
    return rewritten
