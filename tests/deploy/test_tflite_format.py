"""omse.tflite_format: TFLiteBuilder writes what read_model reads back (tensors, INT4 codes,
quantization, operators and options), unknown names are refused, and a missing, foreign,
truncated or corrupted file gives a CheckpointError -- never a crash."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

schema = pytest.importorskip("ai_edge_litert.schema_py_generated", exc_type=ImportError)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from omse.deploy.tflite_sim import simulate  # noqa: E402
from omse.errors import CheckpointError, ConfigError, OmseError  # noqa: E402
from omse.tflite_format import (  # noqa: E402
    TFLiteBuilder,
    op_name,
    pack_int4,
    read_model,
    tensor_array,
    tensor_dtype,
    unpack_int4,
)


def _model(rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    """A small two-conv model with INT4 and INT8 filters; returns the bytes and the constants."""
    b = TFLiteBuilder(description="round trip")
    x = b.tensor("x", [1, 6, 6, 3], "int8", scale=0.05, zero_point=-4)
    w4 = rng.integers(-8, 8, (5, 3, 3, 3)).astype(np.int8)  # 135 codes: odd count
    s4 = rng.uniform(0.01, 0.02, 5).astype(np.float32)
    w = b.tensor("w4", w4.shape, "int4", data=w4, scale=s4, zero_point=np.zeros(5, np.int64))
    bias = rng.integers(-1000, 1000, 5).astype(np.int32)
    bt = b.tensor("b", [5], "int32", data=bias, scale=np.float32(0.05) * s4, zero_point=[0] * 5)
    h = b.tensor("h", [1, 6, 6, 5], "int8", scale=0.1, zero_point=3)
    b.op("CONV_2D", [x, w, bt], [h], padding="SAME", stride_w=1, stride_h=1,
         fused_activation_function="RELU6")  # fmt: skip
    w8 = rng.integers(-127, 128, (1, 3, 3, 5)).astype(np.int8)
    dw = b.tensor("w8", w8.shape, "int8", data=w8, scale=0.02, zero_point=0, axis=3)
    y = b.tensor("y", [1, 3, 3, 5], "int8", scale=0.2, zero_point=-1)
    b.op("DEPTHWISE_CONV_2D", [h, dw], [y], padding="VALID", stride_w=2, stride_h=2,
         depth_multiplier=1)  # fmt: skip
    y2 = b.tensor("y2", [1, 3, 3, 5], "int8", scale=0.2, zero_point=-1)
    b.op("DEPTHWISE_CONV_2D", [y, dw], [y2], padding="SAME", stride_w=1, stride_h=1)
    return b.finish([x], [y2]), {"w4": w4, "w8": w8, "b": bias}


def test_round_trip():
    raw, consts = _model(np.random.default_rng(0))
    m = read_model(raw)
    assert raw[4:8] == b"TFL3" and m.version == 3 and m.description == b"round trip"
    assert m.buffers[0].data is None or len(m.buffers[0].data) == 0
    sg = m.subgraphs[0]
    names = [t.name.decode() for t in sg.tensors]
    assert names == ["x", "w4", "b", "h", "w8", "y", "y2"]
    assert [tensor_dtype(t) for t in sg.tensors] == ["int8", "int4", "int32", "int8", "int8",
                                                     "int8", "int8"]  # fmt: skip
    assert np.array_equal(tensor_array(m, 1), consts["w4"])  # INT4 unpacked to codes
    assert np.array_equal(tensor_array(m, 4), consts["w8"])
    assert np.array_equal(tensor_array(m, 2), consts["b"])
    assert len(m.buffers[sg.tensors[1].buffer].data) == (135 + 1) // 2
    q = sg.tensors[4].quantization
    assert q.quantizedDimension == 3 and np.isclose(q.scale[0], 0.02)
    assert list(sg.tensors[0].quantization.zeroPoint) == [-4]
    assert [op_name(m, op) for op in sg.operators] == ["CONV_2D", "DEPTHWISE_CONV_2D"] * 1 + [
        "DEPTHWISE_CONV_2D"
    ]
    # opcodes deduplicated: two depthwise ops at the same version share one code
    assert len(m.operatorCodes) == 2
    versions = {op_name(m, op): m.operatorCodes[op.opcodeIndex].version for op in sg.operators}
    assert versions == {"CONV_2D": 7, "DEPTHWISE_CONV_2D": 3}  # INT4 filter: version 7
    conv = sg.operators[0].builtinOptions
    assert conv.padding == schema.Padding.SAME
    assert conv.fusedActivationFunction == schema.ActivationFunctionType.RELU6
    assert list(sg.operators[1].inputs) == [3, 4]  # no bias: two inputs
    assert list(sg.inputs) == [0] and list(sg.outputs) == [6]


def test_buffers_are_16_byte_aligned():
    raw, _ = _model(np.random.default_rng(1))
    m = read_model(raw)
    for buf in m.buffers[1:]:
        data = bytes(np.asarray(buf.data, np.uint8))
        assert raw.index(data) % 16 == 0


def test_read_model_from_path(tmp_path):
    raw, _ = _model(np.random.default_rng(2))
    p = tmp_path / "m.tflite"
    p.write_bytes(raw)
    assert len(read_model(p).subgraphs[0].tensors) == 7
    assert len(read_model(str(p)).subgraphs[0].operators) == 3


def test_int4_nibble_order():
    # element 2i in the low nibble of byte i, element 2i + 1 in its high nibble (TFLM's
    # UnpackDenseInt4IntoInt8; the INT4 convolutions of test_tflite_sim match TFLM bit for bit)
    assert pack_int4(np.array([1, -2, 3])).tolist() == [0xE1, 0x03]
    assert unpack_int4(np.array([0xE1, 0x03], np.uint8), 3).tolist() == [1, -2, 3]
    codes = np.arange(-8, 8, dtype=np.int8)
    assert np.array_equal(unpack_int4(pack_int4(codes), 16), codes)
    with pytest.raises(ConfigError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8]))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b, x: b.op("CONV_3X3", [x], [x]), "CONV_3X3"),
        (lambda b, x: b.op("CONV_2D", [x], [x], padding="SAME", strides=2), "strides"),
        (lambda b, x: b.op("CONV_2D", [x], [x], padding="DIAGONAL"), "DIAGONAL"),
        (lambda b, x: b.op("CONV_2D", [x], [x], fused_activation_function="GELU"), "GELU"),
        (lambda b, x: b.op("LOGISTIC", [x], [x], beta=1.0), "LOGISTIC takes no options"),
        (lambda b, x: b.op("RELU", [x], [7]), "out of range"),
        (lambda b, x: b.tensor("t", [2], "bfloat16"), "bfloat16"),
        (lambda b, x: b.tensor("t", [2], "int8", data=np.array([1, 2, 3])), "3 values"),
        (lambda b, x: b.tensor("t", [2], "int8", data=np.array([1, 300])), "range"),
        (lambda b, x: b.tensor("t", [2, 3], "int8", scale=[0.1, 0.2], axis=1), "per-channel"),
        (lambda b, x: b.tensor("t", [2], "int8", scale=0.0), "> 0"),
        (
            lambda b, x: b.tensor("t", [2], "int8", scale=[0.1, 0.2], zero_point=[1, 2, 3]),
            "zero points",
        ),  # fmt: skip
        (lambda b, x: b.finish([x], [9]), "out of range"),
    ],
)
def test_refusals_name_the_problem(call, match):
    b = TFLiteBuilder()
    x = b.tensor("x", [1, 2], "int8", scale=0.1, zero_point=0)
    with pytest.raises(ConfigError, match=match):
        call(b, x)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such TFLite file"):
        read_model(tmp_path / "missing.tflite")
    onnx_like = tmp_path / "model.onnx"
    onnx_like.write_bytes(b"\x08\x07\x12\x04omse" + bytes(64))
    with pytest.raises(CheckpointError, match=r"model\.onnx.*not a TFLite model"):
        read_model(onnx_like)
    with pytest.raises(CheckpointError, match="truncated"):
        read_model(b"\x10\x00")
    with pytest.raises(CheckpointError, match="root offset"):
        read_model(b"\xff\xff\x00\x00TFL3" + bytes(8))


RAW, _ = _model(np.random.default_rng(3))
ROBUST = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _read_or_refuse(data: bytes) -> None:
    """A clean CheckpointError, or a model whose constants can be read and which simulates or
    fails with an omse error."""
    try:
        m = read_model(data)
    except CheckpointError:
        return
    for k, t in enumerate(m.subgraphs[0].tensors):
        buf = m.buffers[t.buffer]
        if buf.data is not None and len(buf.data) and tensor_dtype(t) is not None:
            with contextlib.suppress(CheckpointError):
                tensor_array(m, k)
    with contextlib.suppress(OmseError):
        sg = m.subgraphs[0]
        xs = [np.zeros([max(int(d), 0) for d in sg.tensors[i].shape], np.int8) for i in sg.inputs]
        simulate(m, xs)


@ROBUST
@given(cut=st.integers(0, len(RAW) - 1))
def test_truncation_never_crashes(cut):
    _read_or_refuse(RAW[:cut])


def test_every_truncation_is_refused():
    # a flatbuffer is read back to front from the root table: every proper prefix must fail
    for cut in range(0, len(RAW), 7):
        with pytest.raises(CheckpointError):
            read_model(RAW[:cut])


@ROBUST
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(RAW) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),  # fmt: skip
)
def test_byte_flips_never_crash(flips):
    data = bytearray(RAW)
    for pos, val in flips:
        data[pos] = val
    _read_or_refuse(bytes(data))


def test_vector_bounds_apply_on_the_reading_thread_only():
    """The length check wraps flatbuffers' ``Table.VectorLen`` once; it counts and checks only
    on a thread inside ``read_model``, so another thread's flatbuffers read as before (and
    outside a read nothing is counted)."""
    import threading

    from flatbuffers.table import Table

    import omse.tflite_format as ft

    data, _ = _model(np.random.default_rng(0))
    ft.read_model(data)
    assert getattr(Table.VectorLen, "omse_bounded", False)
    assert getattr(ft._VECTOR_BUDGET, "state", None) is None
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def reader():
        with ft._bounded_vectors(len(data)):
            inside.set()
            done.wait(5)
            seen["reader"] = list(ft._VECTOR_BUDGET.state)

    t = threading.Thread(target=reader)
    t.start()
    inside.wait(5)
    for _ in range(3):  # this thread reads while the other is inside: nothing counted there
        ft.read_model(data)
    seen["main"] = getattr(ft._VECTOR_BUDGET, "state", None)
    done.set()
    t.join()
    assert seen["reader"][0] == 0 and seen["main"] is None
