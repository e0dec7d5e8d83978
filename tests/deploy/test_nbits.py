"""4-bit Linear weights as onnxruntime's MatMulNBits (omse.deploy.nbits).

Reference: ``a @ W.T (+ b)`` in float64 with ``W[n, k] = s[n, k // bs] * q[n, k]``. Tolerance:
float32 rounding of a K-term dot product, ``_tol = 8 * K * eps32 * max(|a| @ |W|.T)`` (an upper
bound on any summation order's error, ~1e-4 relative at K=384; a wrong code, scale, block or nibble
order moves an output by at least ``min(s) * |a|`` ~ 1e-2 relative).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from omse.deploy.nbits import MS_DOMAIN, apply_matmul_nbits, matmul_nbits, pack_nbits
from omse.errors import ConfigError, UnsupportedLayerError

ort = pytest.importorskip("onnxruntime")

EPS32 = float(np.finfo(np.float32).eps)


# -- helpers --------------------------------------------------------------------------------------
def _codes(rng, n, k, narrow=False):
    return rng.integers(-7 if narrow else -8, 8, size=(n, k)).astype(np.int8)


def _scales(rng, n, n_blocks):
    return rng.uniform(0.01, 0.1, size=(n, n_blocks)).astype(np.float32)


def _dense(codes, scales, bs):
    k = codes.shape[1]
    return np.repeat(scales.astype(np.float64), bs, axis=1)[:, :k] * codes


def _tol(a, w):
    return 8 * w.shape[1] * EPS32 * float((np.abs(a) @ np.abs(w).T).max())


def _model(nodes, inits, x_shape, y_shape, opsets=(("", 21),)):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def _session(model, optimized_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
    )


def _run(model, a):
    return _session(model).run(None, {"x": a})[0]


def _run_nbits(k, n, codes, scales, bs, bias, x_shape, accuracy_level=0):
    nodes, inits = matmul_nbits(
        "fc", "x", "y", codes, scales, bs, bias, accuracy_level=accuracy_level
    )
    m = _model(nodes, inits, x_shape, [*x_shape[:-1], n], (("", 21), (MS_DOMAIN, 1)))
    return m, nodes, inits


def _ops(model):
    return sorted(nd.op_type for nd in model.graph.node)


def _int4(name, q):
    return helper.make_tensor(
        name, TensorProto.INT4, list(q.shape), q.astype(np.int64).ravel().tolist()
    )


def _linear_model(
    rng,
    *,
    n,
    k,
    bs,  # DQ block size; None: per-channel scale [N] on axis 0; 0: per tensor
    form="gemm",  # "gemm" (2-D x), "gemm_add" (Gemm without C, then Add: omse's export), "matmul"
    bias=True,
    x_shape=None,
    narrow=False,
    qdq_input=False,
):
    """A weight-only 4-bit Linear as torch + omse export it; returns (model, dense W, bias)."""
    codes = _codes(rng, n, k, narrow)
    if bs is None:
        s = rng.uniform(0.01, 0.1, size=n).astype(np.float32)
        dq_attrs, w = {"axis": 0}, s[:, None].astype(np.float64) * codes
    elif bs == 0:
        s = np.array(0.05, dtype=np.float32)
        dq_attrs, w = {}, np.float64(s) * codes
    else:
        s = _scales(rng, n, -(-k // bs))
        dq_attrs, w = {"axis": 1, "block_size": bs}, _dense(codes, s, bs)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    inits = [_int4("fc.w0.w_codes", codes), numpy_helper.from_array(s, "fc.w0.scale")]
    nodes = [
        helper.make_node(
            "DequantizeLinear",
            ["fc.w0.w_codes", "fc.w0.scale"],
            ["W"],
            name="fc.w0.dequant",
            **dq_attrs,
        )
    ]
    x = "x"
    if qdq_input:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "xs")]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "xs"], ["xq"], output_dtype=TensorProto.INT4),
            helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"]),
        ]
        x = "xd"
    if b is not None:
        inits.append(numpy_helper.from_array(b, "fc.bias"))
    if form == "gemm":
        x_shape = x_shape or [5, k]
        ins = [x, "W", "fc.bias"] if bias else [x, "W"]
        nodes.append(helper.make_node("Gemm", ins, ["y"], name="/fc/Gemm", transB=1))
    elif form == "gemm_add":
        x_shape = x_shape or [5, k]
        out = "pre" if bias else "y"
        nodes.append(helper.make_node("Gemm", [x, "W"], [out], name="/fc/Gemm", transB=1))
        if bias:
            nodes.append(helper.make_node("Add", ["pre", "fc.bias"], ["y"], name="fc.bias.add"))
    else:
        x_shape = x_shape or [2, 7, k]
        nodes.append(
            helper.make_node("Transpose", ["W"], ["Wt"], name="/fc/Transpose", perm=[1, 0])
        )
        out = "mm" if bias else "y"
        nodes.append(helper.make_node("MatMul", [x, "Wt"], [out], name="/fc/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", ["fc.bias", "mm"], ["y"], name="/fc/Add"))
    return _model(nodes, inits, x_shape, [*x_shape[:-1], n]), w, b, x_shape


def _check_rewrite(model, w, b, x_shape, rng, tmp_path=None, expect=("/fc/Gemm",)):
    a = rng.standard_normal(x_shape).astype(np.float32)
    before = _run(model, a)
    names = apply_matmul_nbits(model)
    assert names == list(expect)
    assert _ops(model) == ["MatMulNBits"] * len(expect)
    assert not {"fc.w0.w_codes", "fc.w0.scale", "fc.bias"} & {
        i.name for i in model.graph.initializer
    }
    assert any(op.domain == MS_DOMAIN and op.version == 1 for op in model.opset_import)
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, a)
    ref = a.astype(np.float64) @ w.T + (0 if b is None else b)
    tol = _tol(a.reshape(-1, w.shape[1]), w)
    np.testing.assert_allclose(after, ref, rtol=0, atol=tol)
    np.testing.assert_allclose(after, before, rtol=0, atol=tol)
    if tmp_path is not None:  # what onnxruntime actually runs
        path = tmp_path / "opt.onnx"
        _session(model, path)
        opt = onnx.load(str(path))
        assert [nd.op_type for nd in opt.graph.node] == ["MatMulNBits"] * len(expect)
    return model


# -- packing --------------------------------------------------------------------------------------
def test_pack_low_nibble_first_with_zero_point_8():
    q = np.arange(-8, 8, dtype=np.int8)[None, :].repeat(2, 0)  # one block of 16, twice
    q[1] = q[1][::-1]
    b = pack_nbits(q, 16)
    assert b.shape == (2, 1, 8) and b.dtype == np.uint8
    # u = q + 8: row 0 is 0, 1, ..., 15 -> bytes 0x10, 0x32, ..., 0xfe
    assert b[0, 0].tolist() == [(2 * j) | ((2 * j + 1) << 4) for j in range(8)]
    assert b[1, 0].tolist() == [(15 - 2 * j) | ((14 - 2 * j) << 4) for j in range(8)]


def test_pack_pads_the_last_block_with_code_zero():
    q = np.full((3, 20), -8, dtype=np.int8)
    b = pack_nbits(q, 16)
    assert b.shape == (3, 2, 8)
    assert (b[:, 0] == 0x00).all()
    assert (b[:, 1, :2] == 0x00).all() and (b[:, 1, 2:] == 0x88).all()


def test_default_zero_point_is_8():
    """MatMulNBits without zero_points equals the same node with explicit packed zero points 8."""
    rng = np.random.default_rng(1)
    n, k, bs = 8, 64, 16
    codes, s = _codes(rng, n, k), _scales(rng, n, k // bs)
    m, nodes, inits = _run_nbits(k, n, codes, s, bs, None, [3, k])
    a = rng.standard_normal((3, k)).astype(np.float32)
    y0 = _run(m, a)
    for zp_byte, same in ((0x88, True), (0x00, False)):
        zp = numpy_helper.from_array(np.full((n, (k // bs + 1) // 2), zp_byte, np.uint8), "zp")
        node = onnx.NodeProto()
        node.CopyFrom(nodes[0])
        node.input.append("zp")
        m2 = _model([node], [*inits, zp], [3, k], [3, n], (("", 21), (MS_DOMAIN, 1)))
        assert np.array_equal(_run(m2, a), y0) is same


# -- matmul_nbits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [64, 128, 384])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_nbits_matches_numpy(k, bs, rank):
    rng = np.random.default_rng(k * 1000 + bs * 10 + rank)
    n = 24
    codes, s = _codes(rng, n, k, narrow=bs == 32), _scales(rng, n, -(-k // bs))
    bias = rng.standard_normal(n).astype(np.float32) if bs != 64 else None
    x_shape = [6, k] if rank == 2 else [2, 5, k]
    m, nodes, inits = _run_nbits(k, n, codes, s, bs, bias, x_shape)
    (node,) = nodes
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert at == {"K": k, "N": n, "bits": 4, "block_size": bs}  # accuracy_level 0: omitted
    assert node.domain == MS_DOMAIN and node.op_type == "MatMulNBits"
    assert numpy_helper.to_array(inits[0]).shape == (n, -(-k // bs), bs // 2)
    a = rng.standard_normal(x_shape).astype(np.float32)
    y = _run(m, a)
    w = _dense(codes, s, bs)
    ref = a.astype(np.float64) @ w.T + (0 if bias is None else bias)
    assert y.shape == tuple(x_shape[:-1]) + (n,)
    np.testing.assert_allclose(y, ref, rtol=0, atol=_tol(a.reshape(-1, k), w))


@pytest.mark.parametrize(("k", "bs"), [(40, 16), (100, 32), (200, 128)])
def test_matmul_nbits_pads_k_not_multiple_of_block(k, bs):
    rng = np.random.default_rng(k)
    n = 12
    n_blocks = -(-k // bs)
    codes, s = _codes(rng, n, k), _scales(rng, n, n_blocks)
    m, _, inits = _run_nbits(k, n, codes, s, bs, None, [2, 3, k])
    assert numpy_helper.to_array(inits[0]).shape == (n, n_blocks, bs // 2)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    w = _dense(codes, s, bs)
    np.testing.assert_allclose(_run(m, a), a @ w.T, rtol=0, atol=_tol(a.reshape(-1, k), w))


def test_matmul_nbits_accuracy_level_attribute():
    rng = np.random.default_rng(3)
    codes, s = _codes(rng, 16, 64), _scales(rng, 16, 2)
    m, nodes, _ = _run_nbits(64, 16, codes, s, 32, None, [4, 64], accuracy_level=4)
    assert {a.name: a.i for a in nodes[0].attribute}["accuracy_level"] == 4
    a = rng.standard_normal((4, 64)).astype(np.float32)
    w = _dense(codes, s, 32)
    ref = a @ w.T
    np.testing.assert_allclose(_run(m, a), ref, rtol=0, atol=0.02 * np.abs(ref).max())  # int8 A


def test_matmul_nbits_errors_name_the_layer():
    rng = np.random.default_rng(0)
    s = _scales(rng, 4, 2)
    with pytest.raises(UnsupportedLayerError, match=r"'fc'.*\[-9, -9\]"):
        matmul_nbits("fc", "x", "y", np.full((4, 64), -9), s, 32)
    with pytest.raises(UnsupportedLayerError, match="'fc'.*\\[-8, 8\\]"):
        matmul_nbits("fc", "x", "y", np.array([[-8] * 63 + [8]] * 4), s, 32)
    with pytest.raises(UnsupportedLayerError, match="integer codes"):
        matmul_nbits("fc", "x", "y", np.zeros((4, 64), np.float32), s, 32)
    q = np.zeros((4, 64), np.int8)
    for bad in (8, 24, 512, True, 32.0):
        with pytest.raises(ConfigError, match="block_size"):
            matmul_nbits("fc", "x", "y", q, s, bad)
    with pytest.raises(ConfigError, match=r"scales has shape \(4, 2\), expected \(4, 4\)"):
        matmul_nbits("fc", "x", "y", q, s, 16)
    with pytest.raises(ConfigError, match="bias has shape"):
        matmul_nbits("fc", "x", "y", q, s, 32, np.zeros(5, np.float32))
    with pytest.raises(ConfigError, match="non-finite"):
        matmul_nbits("fc", "x", "y", q, np.full((4, 2), np.nan, np.float32), 32)
    with pytest.raises(ConfigError, match="float32 or float16"):
        matmul_nbits("fc", "x", "y", q, s.astype(np.float64), 32)
    with pytest.raises(ConfigError, match="accuracy_level"):
        matmul_nbits("fc", "x", "y", q, s, 32, accuracy_level=5)


# -- apply_matmul_nbits ---------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_apply_gemm_blocked(bs, bias, tmp_path):
    rng = np.random.default_rng(bs + bias)
    m, w, b, x_shape = _linear_model(rng, n=32, k=128, bs=bs, bias=bias, narrow=bs == 64)
    _check_rewrite(m, w, b, x_shape, rng, tmp_path)
    (node,) = m.graph.node
    assert {a.name: a.i for a in node.attribute}["block_size"] == bs
    assert len(node.input) == (6 if bias else 3)


@pytest.mark.parametrize("k", [64, 128, 384])
@pytest.mark.parametrize("bias", [True, False])
def test_apply_transpose_matmul_add_rank3(k, bias, tmp_path):
    rng = np.random.default_rng(k + bias)
    m, w, b, x_shape = _linear_model(rng, n=48, k=k, bs=32, form="matmul", bias=bias)
    _check_rewrite(m, w, b, x_shape, rng, tmp_path, expect=("/fc/MatMul",))
    assert m.graph.node[0].output[0] == "y"


@pytest.mark.parametrize(
    ("k", "expect_bs"), [(64, 64), (128, 128), (384, 128), (40, 16), (200, 16)]
)
def test_apply_per_channel(k, expect_bs, tmp_path):
    """omse's exports today: a per-channel [N] scale on axis 0, Gemm without C, then Add(bias)."""
    rng = np.random.default_rng(k)
    m, w, b, x_shape = _linear_model(rng, n=20, k=k, bs=None, form="gemm_add", narrow=True)
    _check_rewrite(m, w, b, x_shape, rng, tmp_path if k in (40, 384) else None)
    (node,) = m.graph.node
    assert {a.name: a.i for a in node.attribute}["block_size"] == expect_bs
    assert node.input[-1] and node.output[0] == "y"  # the Add is folded into the bias


def test_apply_per_tensor_and_rank3_per_channel():
    rng = np.random.default_rng(7)
    m, w, b, x_shape = _linear_model(rng, n=16, k=64, bs=0)
    _check_rewrite(m, w, b, x_shape, rng)
    m, w, b, x_shape = _linear_model(rng, n=16, k=96, bs=None, form="matmul")
    _check_rewrite(m, w, b, x_shape, rng, expect=("/fc/MatMul",))
    assert {a.name: a.i for a in m.graph.node[0].attribute}["block_size"] == 32


@pytest.mark.parametrize(
    ("k", "dq_bs", "expect_bs"), [(96, 48, 16), (100, 32, 32), (384, 384, 128)]
)
def test_apply_block_not_power_of_two_or_k_not_divisible(k, dq_bs, expect_bs):
    """A DQ block of 48 runs as MatMulNBits blocks of 16 (scales repeated); K=100 with blocks of
    32 has a partial last block (padded); a block of 384 = K is one scale per row."""
    rng = np.random.default_rng(k + dq_bs)
    m, w, b, x_shape = _linear_model(rng, n=8, k=k, bs=dq_bs, form="matmul")
    _check_rewrite(m, w, b, x_shape, rng, expect=("/fc/MatMul",))
    assert {a.name: a.i for a in m.graph.node[0].attribute}["block_size"] == expect_bs


def test_apply_leaves_qdq_input_activations_alone():
    rng = np.random.default_rng(0)
    for form in ("gemm", "gemm_add", "matmul"):
        m, *_ = _linear_model(rng, n=8, k=64, bs=32, form=form, qdq_input=True)
        before = m.SerializeToString()
        assert apply_matmul_nbits(m) == []
        assert m.SerializeToString() == before


def test_apply_leaves_other_graphs_alone():
    rng = np.random.default_rng(0)
    q, s = _codes(rng, 8, 64), _scales(rng, 8, 2)
    base = [_int4("q", q), numpy_helper.from_array(s, "s")]
    dq = helper.make_node("DequantizeLinear", ["q", "s"], ["W"], axis=1, block_size=32)
    cases = {
        "transB=0": ([dq, helper.make_node("Gemm", ["x", "W"], ["y"], transB=0)], [5, 8], [5, 64]),
        "alpha": (
            [dq, helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, alpha=2.0)],
            [5, 64],
            [5, 8],
        ),
        "no transpose": ([dq, helper.make_node("MatMul", ["x", "W"], ["y"])], [5, 8], [5, 64]),
        "block 8": (
            [
                helper.make_node("DequantizeLinear", ["q", "s8"], ["W"], axis=1, block_size=8),
                helper.make_node("Gemm", ["x", "W"], ["y"], transB=1),
            ],
            [5, 64],
            [5, 8],
        ),
    }
    for name, (nodes, xs, ys) in cases.items():
        inits = list(base)
        if name == "block 8":
            inits.append(numpy_helper.from_array(_scales(rng, 8, 8), "s8"))
        m = _model(nodes, inits, xs, ys)
        before = m.SerializeToString()
        assert apply_matmul_nbits(m) == [], name
        assert m.SerializeToString() == before, name
    # a float weight (no DequantizeLinear)
    w = numpy_helper.from_array(rng.standard_normal((8, 64)).astype(np.float32), "W")
    m = _model([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], [w], [5, 64], [5, 8])
    assert apply_matmul_nbits(m) == []


def test_apply_mixed_graph_rewrites_only_weight_only_layers(tmp_path):
    """fc1 (float input) becomes MatMulNBits; fc2 (QDQ input) and a Relu stay as they are; a
    weight read by two MatMuls through one Transpose is packed once."""
    rng = np.random.default_rng(5)
    k, n = 64, 64
    q1, s1 = _codes(rng, n, k), _scales(rng, n, 2)
    q2, s2 = _codes(rng, n, n), _scales(rng, n, 4)
    inits = [
        _int4("q1", q1),
        numpy_helper.from_array(s1, "s1"),
        _int4("q2", q2),
        numpy_helper.from_array(s2, "s2"),
        numpy_helper.from_array(np.array(0.05, np.float32), "hs"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["q1", "s1"], ["W1"], axis=1, block_size=32),
        helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W1t"], ["h0"], name="fc1a"),
        helper.make_node("MatMul", ["x", "W1t"], ["h1"], name="fc1b"),
        helper.make_node("Add", ["h0", "h1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "hs"], ["hq"], output_dtype=TensorProto.INT4),
        helper.make_node("DequantizeLinear", ["hq", "hs"], ["hd"]),
        helper.make_node("DequantizeLinear", ["q2", "s2"], ["W2"], axis=1, block_size=16),
        helper.make_node("Transpose", ["W2"], ["W2t"], perm=[1, 0]),
        helper.make_node("MatMul", ["hd", "W2t"], ["y"], name="fc2"),
    ]
    m = _model(nodes, inits, [3, 4, k], [3, 4, n])
    a = rng.standard_normal((3, 4, k)).astype(np.float32)
    before = _run(m, a)
    assert apply_matmul_nbits(m) == ["fc1a", "fc1b"]
    ops = [nd.op_type for nd in m.graph.node]
    assert ops == ["MatMulNBits", "MatMulNBits", "Add", "Relu"] + [
        "QuantizeLinear",
        "DequantizeLinear",
        "DequantizeLinear",
        "Transpose",
        "MatMul",
    ]
    assert m.graph.node[0].input[1] == m.graph.node[1].input[1]  # one packed B
    assert {i.name for i in m.graph.initializer} == {
        "q2",
        "s2",
        "hs",
        "fc1a.nbits.B",
        "fc1a.nbits.scales",
    }
    np.testing.assert_allclose(_run(m, a), before, rtol=0, atol=1e-4 * np.abs(before).max())


def test_apply_gemm_with_broadcast_c_keeps_an_add():
    rng = np.random.default_rng(9)
    q, s = _codes(rng, 8, 64), _scales(rng, 8, 4)
    c = rng.standard_normal((5, 8)).astype(np.float32)
    inits = [_int4("q", q), numpy_helper.from_array(s, "s"), numpy_helper.from_array(c, "c")]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s"], ["W"], axis=1, block_size=16),
        helper.make_node("Gemm", ["x", "W", "c"], ["y"], name="g", transB=1),
    ]
    m = _model(nodes, inits, [5, 64], [5, 8])
    a = rng.standard_normal((5, 64)).astype(np.float32)
    before = _run(m, a)
    assert apply_matmul_nbits(m) == ["g"]
    assert _ops(m) == ["Add", "MatMulNBits"]
    np.testing.assert_allclose(_run(m, a), before, rtol=0, atol=1e-4 * np.abs(before).max())


def test_weight_only_linear_with_residual_terms_is_refused_for_int8_with_the_fix(tmp_path):
    import torch

    import omse

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    calib = [torch.randn(8, 64) for _ in range(2)]
    cfg = omse.QuantConfig(
        weight_bits=4, act_bits=None, granularity="per_group32", target="int8",
        extra_mac_budget=1.0, bias_correction=False, budget=None,
    )  # fmt: skip
    q = omse.quantize(model, calib, cfg)
    assert max(ql.n_terms for ql in omse.quantized_layers(q).values()) == 2
    with pytest.raises(UnsupportedLayerError, match=r"2 weight terms.*extra_mac_budget=0"):
        omse.export_onnx(q, calib[0][:1], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
