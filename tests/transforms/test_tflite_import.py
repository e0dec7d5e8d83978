"""TFLite in: float ``.tflite`` files (built here with the flatbuffers object API, and the MLPerf
Tiny reference models when ``../shared/data`` is there) convert to torch modules that match
LiteRT, trace through ``torch.onnx.export``, quantize from the path and export; bad, truncated,
quantized files and unsupported ops are clear errors."""

import contextlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import omse
from omse.errors import ConfigError, OmseError, UnsupportedLayerError
from omse.transforms.tflite_import import (
    float_reference,
    litert_outputs,
    load_tflite,
    same_pads,
)

schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
pytest.importorskip("ai_edge_litert.interpreter")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(
    os.environ.get("OMSE_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
)
TINY = DATA / "mlperf-tiny"
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"no MLPerf Tiny models at {TINY}")

OP = vars(schema.BuiltinOperator)
OPTIONS = {  # op -> (BuiltinOptions name, options class)
    "CONV_2D": "Conv2DOptions",
    "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
    "FULLY_CONNECTED": "FullyConnectedOptions",
    "ADD": "AddOptions",
    "SUB": "SubOptions",
    "MUL": "MulOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "MEAN": "ReducerOptions",
    "RESHAPE": "ReshapeOptions",
    "SQUEEZE": "SqueezeOptions",
    "SOFTMAX": "SoftmaxOptions",
    "PAD": "PadOptions",
    "CONCATENATION": "ConcatenationOptions",
}
ACT = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
SAME, VALID = 0, 1


class Tfl:
    """A compact ``.tflite`` writer: ``t = Tfl(); x = t.input([1, 8, 8, 3]); y = t.op("RELU",
    [x]); data = t.build([x], [y])``. Tensor shapes are filled in from LiteRT's own shape
    inference (one run of the first packing), so a case names only its inputs and constants."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.tensors: list = []
        self.buffers = [schema.BufferT()]
        self.ops: list = []
        self.codes: list[int] = []

    def _tensor(self, shape, ttype=0, data: np.ndarray | None = None, quant=None) -> int:
        t = schema.TensorT()
        t.shape, t.type, t.name = list(shape), ttype, f"t{len(self.tensors)}".encode()
        t.quantization = quant
        if data is not None:
            b = schema.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def input(self, shape) -> int:
        return self._tensor(shape)

    def const(self, arr) -> int:
        arr = np.asarray(arr)
        ttype = {np.float32: 0, np.float16: 1, np.int32: 2, np.int8: 9}[arr.dtype.type]
        return self._tensor(arr.shape, ttype, arr)

    def weight(self, *shape, scale: float = 0.3) -> int:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def int8_weight(self, *shape) -> int:
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint, q.quantizedDimension = [0.02] * shape[0], [0] * shape[0], 0
        data = self.rng.integers(-127, 128, shape).astype(np.int8)
        return self._tensor(shape, 9, data, q)

    def op(self, name: str, inputs: list[int], n_out: int = 1, **options) -> int:
        code = OP[name]
        if code not in self.codes:
            self.codes.append(code)
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs = self.codes.index(code), list(inputs)
        o.outputs = [self._tensor([1]) for _ in range(n_out)]
        if name in OPTIONS:
            o.builtinOptionsType = getattr(schema.BuiltinOptions, OPTIONS[name])
            o.builtinOptions = getattr(schema, OPTIONS[name] + "T")()
            for k, v in options.items():
                setattr(o.builtinOptions, k, v)
        self.ops.append(o)
        return o.outputs[0]

    def conv(self, x, cin, cout, k=3, stride=1, padding=SAME, act="NONE", dil=1) -> int:
        return self.op("CONV_2D", [x, self.weight(cout, k, k, cin), self.weight(cout)],
                       padding=padding, strideH=stride, strideW=stride,
                       fusedActivationFunction=ACT[act], dilationHFactor=dil,
                       dilationWFactor=dil)  # fmt: skip

    def _pack(self, inputs, outputs) -> bytes:
        import flatbuffers

        m = schema.ModelT()
        m.version, m.description = 3, b"omse test"
        codes = []
        for c in self.codes:
            oc = schema.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode = c, min(c, 127)
            codes.append(oc)
        g = schema.SubGraphT()
        g.tensors, g.operators, g.inputs, g.outputs = self.tensors, self.ops, inputs, outputs
        m.operatorCodes, m.subgraphs, m.buffers = codes, [g], self.buffers
        b = flatbuffers.Builder(1024)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        plain = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interp = Interpreter(
            model_content=self._pack(inputs, outputs), experimental_op_resolver_type=plain
        )
        interp.allocate_tensors()
        for d in interp.get_tensor_details():
            if d["index"] < len(self.tensors) and self.tensors[d["index"]].buffer == 0:
                self.tensors[d["index"]].shape = [int(v) for v in d["shape"]]
        return self._pack(inputs, outputs)


def _parity(data: bytes, shapes=None, batch: int = 2, scale: float = 1.0):
    """(torch output, LiteRT output) on a random batch; checked to 1e-4 of the output's range."""
    model = load_tflite(data)
    m = schema.ModelT.InitFromPackedBuf(data, 0)
    g = m.subgraphs[0]
    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(batch, *[int(d) for d in g.tensors[i].shape[1:]], generator=gen) * scale
        for i in g.inputs
    ]
    ref = litert_outputs(float_reference(data), xs, limit=batch)
    with torch.no_grad():
        out = model(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    for r, o in zip(ref, outs):
        assert o.shape == r.shape
        err = np.abs(o.numpy() - r).max() / max(float(r.max() - r.min()), 1e-6)
        assert err <= 1e-4, err
    return model, xs


# -- every op, against LiteRT ---------------------------------------------------------------------
def _case_convs(t: Tfl):
    x = t.input([1, 8, 8, 3])
    a = t.conv(x, 3, 6, 3, 1, SAME, "RELU")  # symmetric SAME
    b = t.conv(a, 6, 8, 3, 2, SAME, "RELU6")  # SAME, stride 2 on 8: padded (0, 1)
    c = t.conv(b, 8, 4, 2, 1, SAME, "RELU_N1_TO_1")  # even kernel: (0, 1)
    d = t.conv(c, 4, 5, 3, 1, SAME, dil=2)  # dilated SAME
    e = t.conv(d, 5, 6, 3, 2, VALID)
    return [x], [e]


def _case_depthwise(t: Tfl):
    x = t.input([1, 9, 9, 4])
    w1 = t.weight(1, 3, 3, 8)  # multiplier 2
    a = t.op("DEPTHWISE_CONV_2D", [x, w1, t.weight(8)], padding=SAME, strideH=2, strideW=2,
             depthMultiplier=2, fusedActivationFunction=ACT["RELU"])  # fmt: skip
    b = t.op("DEPTHWISE_CONV_2D", [a, t.weight(1, 3, 3, 8), t.weight(8)], padding=VALID,
             strideH=1, strideW=1, depthMultiplier=1)  # fmt: skip
    c = t.op("DEPTHWISE_CONV_2D", [b, t.weight(1, 2, 2, 8), t.weight(8)], padding=SAME, strideH=1,
             strideW=1, depthMultiplier=1, fusedActivationFunction=ACT["RELU6"])  # fmt: skip
    return [x], [c]


def _case_fc_flatten(t: Tfl):
    x = t.input([1, 4, 3, 5])
    a = t.conv(x, 5, 6, 3, 1, SAME, "RELU")
    flat = t.op("RESHAPE", [a, t.const(np.array([1, 72], np.int32))])  # NHWC order
    f = t.op("FULLY_CONNECTED", [flat, t.weight(10, 72), t.weight(10)],
             fusedActivationFunction=ACT["RELU"])  # fmt: skip
    g = t.op("FULLY_CONNECTED", [a, t.weight(7, 72), -1])  # implicit flatten of 4-D
    h = t.op("FULLY_CONNECTED", [f, t.weight(4, 10), t.weight(4)])
    s = t.op("SOFTMAX", [h], beta=1.0)
    return [x], [s, g]


def _case_elementwise(t: Tfl):
    x = t.input([1, 6, 6, 4])
    y = t.input([1, 6, 6, 4])
    a = t.op("ADD", [x, y], fusedActivationFunction=ACT["RELU"])
    b = t.op("SUB", [a, t.weight(4)])  # a [C] constant
    c = t.op("MUL", [b, t.const(np.full((1, 1, 1, 4), 0.5, np.float32))])
    d = t.op("MUL", [c, y], fusedActivationFunction=ACT["RELU6"])
    e = t.op("ADD", [t.weight(1, 6, 6, 4), d])
    return [x, y], [e]


def _case_pools(t: Tfl):
    x = t.input([1, 8, 7, 3])
    a = t.op(
        "AVERAGE_POOL_2D", [x], padding=SAME, strideH=2, strideW=2, filterHeight=3, filterWidth=3
    )  # asymmetric SAME: (0, 1), (1, 1)
    b = t.op(
        "AVERAGE_POOL_2D",
        [x],
        padding=SAME,
        strideH=1,
        strideW=1,
        filterHeight=3,
        filterWidth=3,
        fusedActivationFunction=ACT["RELU"],
    )  # symmetric SAME
    c = t.op("MAX_POOL_2D", [x], padding=SAME, strideH=2, strideW=2, filterHeight=2,
             filterWidth=3)  # fmt: skip
    d = t.op("MAX_POOL_2D", [x], padding=VALID, strideH=2, strideW=1, filterHeight=3,
             filterWidth=2)  # fmt: skip
    e = t.op("AVERAGE_POOL_2D", [x], padding=VALID, strideH=1, strideW=2, filterHeight=2,
             filterWidth=2)  # fmt: skip
    return [x], [a, b, c, d, e]


def _case_shapes(t: Tfl):
    x = t.input([1, 5, 4, 6])
    a = t.op("PAD", [x, t.const(np.array([[0, 0], [1, 2], [0, 1], [0, 0]], np.int32))])
    m1 = t.op("MEAN", [a, t.const(np.array([1, 2], np.int32))], keepDims=False)
    m2 = t.op("MEAN", [a, t.const(np.array([1, 2], np.int32))], keepDims=True)
    m3 = t.op("MEAN", [a, t.const(np.array([2, 3], np.int32))], keepDims=False)  # [N, H]
    sq = t.op("SQUEEZE", [m2], squeezeDims=[1, 2])
    cat = t.op("CONCATENATION", [x, t.conv(x, 6, 2, 1)], axis=3)
    cat2 = t.op("CONCATENATION", [x, t.op("RELU", [x])], axis=1)
    r = t.op("RESHAPE", [cat2, t.const(np.array([1, 10, 24], np.int32))])
    sm = t.op("SOFTMAX", [cat], beta=0.5)  # over channels
    return [x], [m1, m3, sq, r, sm]


def _case_activations(t: Tfl):
    x = t.input([1, 3, 4, 5])
    outs = [t.op(n, [x]) for n in ("LOGISTIC", "HARD_SWISH", "RELU", "RELU6", "TANH")]
    outs.append(t.op("RELU_N1_TO_1", [x]))
    v = t.input([1, 7])
    outs.append(t.op("HARD_SWISH", [t.op("LOGISTIC", [v])]))
    return [x, v], outs


def _case_float16(t: Tfl):
    x = t.input([1, 6, 6, 3])
    w16 = t.const((t.rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float16))
    w = t.op("DEQUANTIZE", [w16])
    a = t.op("CONV_2D", [x, w, t.weight(4)], padding=SAME, strideH=1, strideW=1)
    f = t.op("FULLY_CONNECTED", [a, t.int8_weight(3, 144), t.weight(3)])  # dynamic range
    return [x], [f]


CASES = {
    "convs": _case_convs,
    "depthwise": _case_depthwise,
    "fc_flatten": _case_fc_flatten,
    "elementwise": _case_elementwise,
    "pools": _case_pools,
    "shapes": _case_shapes,
    "activations": _case_activations,
    "float16_int8_weights": _case_float16,
}


def _built(case: str) -> bytes:
    t = Tfl()
    ins, outs = CASES[case](t)
    return t.build(ins, outs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ops_match_litert(case):
    model, xs = _parity(_built(case), scale=2.0)
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(layers) == len(model.omse_tflite.layers)


def test_module_form_names_and_layers():
    data = _built("depthwise")
    model = load_tflite(data)
    assert isinstance(model, torch.fx.GraphModule) and not model.training
    assert sorted(model.omse_tflite.layers) == ["dw0", "dw1", "dw2"]
    dw0 = model.dw0
    assert (dw0.in_channels, dw0.out_channels, dw0.groups) == (4, 8, 4)
    assert dw0.weight.shape == (8, 1, 3, 3) and dw0.padding == (1, 1)  # SAME 9 -> 5: (1, 1)
    assert model.dw1.padding == (0, 0) and model.dw2.padding == (0, 0)  # (0, 1): an F.pad
    code = model.code
    assert "torch.nn.functional.pad" in code and "relu6" in code
    assert model.omse_io["input_names"] == ["t0"]
    assert model.omse_io["dynamic_axes"]["t0"] == {0: "batch"}
    assert model.omse_io["output_shapes"] == [["batch", 3, 3, 8]]
    # any batch size
    assert model(torch.randn(5, 9, 9, 4)).shape == (5, 3, 3, 8)


def test_same_pads_put_the_odd_element_after():
    assert same_pads(8, 3, 2) == (0, 1)
    assert same_pads(7, 3, 2) == (1, 1)
    assert same_pads(8, 2, 1) == (0, 1)
    assert same_pads(8, 3, 1, dilation=2) == (2, 2)
    assert same_pads(8, 8, 8) == (0, 0)


def test_traces_through_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    data = _built("shapes")
    model = load_tflite(data)
    x = torch.randn(2, 5, 4, 6)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=17, input_names=["t0"]
        )
    got = ort.InferenceSession(str(path)).run(None, {"t0": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-5)


def test_quantize_from_tflite_bytes_and_path_then_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "convs.tflite"
    path.write_bytes(_built("fc_flatten"))
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 4, 3, 5, generator=gen) for _ in range(2)]
    cfg = omse.QuantConfig(target="int8")
    q = omse.quantize(str(path), calib, cfg)
    assert {"conv0", "fc0", "fc1", "fc2"} <= set(omse.quantized_layers(q))
    assert q.omse_tflite.max_abs_diff is not None
    out = tmp_path / "q.onnx"
    omse.export_onnx(q, calib[0], str(out))
    sess = ort.InferenceSession(str(out))
    assert [i.name for i in sess.get_inputs()] == ["t0"]
    got = sess.run(None, {"t0": calib[1].numpy()})
    with torch.no_grad():
        ref = load_tflite(path)(calib[1])
    assert got[0].shape == ref[0].shape and np.abs(got[0] - ref[0].numpy()).max() < 0.1
    assert omse.load_tflite is load_tflite


def _rgb_net() -> bytes:
    t = Tfl()
    x = t.input([1, 12, 10, 3])
    a = t.conv(x, 3, 6, 3, 2, SAME, "RELU")
    m = t.op("MEAN", [a, t.const(np.array([1, 2], np.int32))], keepDims=False)
    return t.build([x], [t.op("FULLY_CONNECTED", [m, t.weight(5, 6), t.weight(5)])])


def test_cli_quantizes_a_tflite_into_onnx(tmp_path, monkeypatch, capsys):
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image

    from omse.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        a = (np.random.RandomState(i).rand(30, 26, 3) * 255).astype("uint8")
        Image.fromarray(a).save(imgs / f"{i}.png")
    model = tmp_path / "rgb.tflite"
    model.write_bytes(_rgb_net())
    out = tmp_path / "rgb.q.onnx"
    argv = ["quantize", model, "--calib", imgs, "-w", "8", "-a", "8", "--target", "int8"]
    rc = main([str(a) for a in [*argv, "--out", out]])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert "input size 12x10 from the .tflite's input shape" in stdout
    assert f"wrote {out} (target int8)" in stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [12, 10, 3]  # NHWC, as the .tflite
    y = sess.run(None, {"t0": np.random.rand(2, 12, 10, 3).astype(np.float32)})[0]
    assert y.shape == (2, 5)
    rc = main([str(a) for a in [*argv, "--input-size", "16"]])
    assert rc == 2 and "takes 12x10 images" in capsys.readouterr().err


# -- refusals -------------------------------------------------------------------------------------
def test_unsupported_op_named_with_its_index():
    t = Tfl()
    x = t.input([1, 4])
    y = t.op("EXP", [t.op("RELU", [x])])
    data = t.build([x], [y])
    with pytest.raises(UnsupportedLayerError, match=r"operator 1 is EXP"):
        load_tflite(data)


def test_missing_and_non_tflite_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tflite(tmp_path / "nope.tflite")
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x08\x00\x00\x00ONNXnot a flatbuffer at all")
    with pytest.raises(ConfigError, match=r"model.tflite is not a TFLite model.*TFL3"):
        load_tflite(bad)
    bad.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a TFLite model"):
        omse.quantize(str(bad), [torch.zeros(1, 4)])


def _int8_model() -> bytes:
    t = Tfl()
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [0.5], [-3]
    x = t._tensor([1, 4], 9, quant=q)
    t.codes.append(OP["RELU"])
    o = schema.OperatorT()
    o.opcodeIndex, o.inputs, o.outputs = 0, [x], [t._tensor([1, 4], 9, quant=q)]
    t.ops.append(o)
    return t._pack([x], o.outputs)


def test_nchw_batches_for_an_nhwc_model_are_a_clear_error():
    with pytest.raises(OmseError, match=r"NHWC \[N, H, W, C\]"):
        omse.quantize(_built("convs"), [torch.randn(2, 3, 8, 8)])


def test_int8_model_refused_clearly():
    with pytest.raises(
        ConfigError, match=r"a float \.tflite is needed; this one is int8-quantized"
    ):
        load_tflite(_int8_model())


def test_missing_litert_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    with pytest.raises(ConfigError, match="pip install ai-edge-litert"):
        load_tflite(b"\x00\x00\x00\x00TFL3")


_SMALL = None


def _small() -> bytes:
    global _SMALL
    if _SMALL is None:
        _SMALL = _built("fc_flatten")
    return _SMALL


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.floats(0, 1, exclude_max=True))
def test_truncated_file_is_a_clear_error(frac):
    data = _small()
    cut = data[: int(frac * len(data))]
    with pytest.raises(OmseError):
        load_tflite(cut)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(8, 10**6), st.integers(0, 255))
def test_corrupt_byte_never_crashes(pos, value):
    data = bytearray(_small())
    data[pos % len(data)] = value
    with contextlib.suppress(OmseError):
        load_tflite(bytes(data))


# -- the MLPerf Tiny reference models -------------------------------------------------------------
TINY_MODELS = {
    "image_classification/pretrainedResnet.tflite": 255.0,
    "visual_wake_words/vww_96_float.tflite": 1.0,  # 0..255 saturates its softmax (exact 0/1)
    "keyword_spotting/kws_ref_model_float32.tflite": None,
    "anomaly_detection/ad01_fp32.tflite": None,
}


@needs_tiny
@pytest.mark.parametrize("rel", sorted(TINY_MODELS))
def test_mlperf_tiny_matches_litert(rel):
    path = TINY / rel
    data = path.read_bytes()
    hi = TINY_MODELS[rel]
    model = load_tflite(path)
    m = schema.ModelT.InitFromPackedBuf(data, 0)
    shape = [int(d) for d in m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]].shape[1:]]
    gen = torch.Generator().manual_seed(0)
    if hi is None:
        x = torch.randn(3, *shape, generator=gen)
    else:
        x = torch.rand(3, *shape, generator=gen) * hi
    ref = litert_outputs(float_reference(data), [x], limit=3)[0]
    with torch.no_grad():
        got = model(x).numpy()
    err = np.abs(got - ref).max() / float(ref.max() - ref.min())
    assert err <= 1e-4, err
    if hi == 1.0:  # also at 0..255 (saturated outputs)
        x = torch.rand(2, *shape, generator=gen) * 255
        ref = litert_outputs(data, [x], limit=2)[0]
        with torch.no_grad():
            assert np.abs(model(x).numpy() - ref).max() <= 1e-4


@needs_tiny
@pytest.mark.parametrize("rel", ["image_classification/pretrainedResnet_quant.tflite",
                                 "visual_wake_words/vww_96_int8.tflite"])  # fmt: skip
def test_mlperf_tiny_int8_refused(rel):
    with pytest.raises(ConfigError, match="a float .tflite is needed; this one is int8-quantized"):
        load_tflite(TINY / rel)


@needs_tiny
def test_mlperf_tiny_resnet_quantizes_and_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = TINY / "image_classification" / "pretrainedResnet.tflite"
    gen = torch.Generator().manual_seed(0)
    calib = [torch.rand(8, 32, 32, 3, generator=gen) * 255 for _ in range(2)]
    q = omse.quantize(path, calib, omse.QuantConfig(target="int8"))
    assert len(omse.quantized_layers(q)) == 10
    out = tmp_path / "resnet8.onnx"
    omse.export_onnx(q, calib[0], str(out))
    sess = ort.InferenceSession(str(out))
    x = calib[1][:4]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = litert_outputs(path.read_bytes(), [x])[0]
    assert got.shape == ref.shape == (4, 10)
    assert np.abs(got - ref).max() < 0.2  # probabilities after int8
