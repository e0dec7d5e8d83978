"""``target="int8"``: the exported graph runs as integer kernels end to end in onnxruntime and
OpenVINO and agrees with omse's int8 simulation.

Counted on onnxruntime's *optimized* graph (``optimized_model_filepath``): every quantized Conv
is one ``QLinearConv``, every quantized Linear one ``QGemm`` (residual terms merged into one 8-bit
kernel), and no float Conv/Gemm/MatMul is left.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from omse.config import QuantConfig
from omse.deploy.checkpoint import load, save
from omse.deploy.export import export_onnx, weight_types
from omse.errors import ConfigError, UnsupportedLayerError
from omse.nn.layers import quantized_layers
from omse.transforms.pipeline import quantize

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


class Block(nn.Module):
    """conv - ReLU6 - conv + skip, ReLU: the block's output feeds the next block's first conv and
    its skip connection."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(nn.functional.relu6(self.conv1(x))) + x)


class ResNetish(nn.Module):
    """stem -> two residual blocks -> depthwise conv + ReLU6 -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        x = nn.functional.relu6(self.dw(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g)


def _session(path, opt=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if opt is not None:
        so.optimized_model_filepath = str(opt)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _quantized(budget=0.1):
    torch.manual_seed(0)
    model = ResNetish().eval()
    cfg = QuantConfig(  # one width: the 4-bit + residual terms merged into 8-bit kernels
        weight_bits=4,
        act_bits=8,
        target="int8",
        extra_mac_budget=budget,
        bias_correction=True,
        budget=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, quantize(model, _data(64).split(16), cfg)


def _optimized_ops(path, tmp_path):
    opt = tmp_path / "opt.onnx"
    sess = _session(path, opt)
    return sess, collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def test_one_integer_kernel_per_quantized_layer(tmp_path):
    _, q = _quantized()
    layers = quantized_layers(q)
    assert any(ql.n_terms == 2 for ql in layers.values()), "the budget bought residual terms"
    path = export_onnx(q, _data(1), tmp_path / "q.onnx")  # the model's own target: int8
    sess, ops = _optimized_ops(path, tmp_path)
    convs = sum(isinstance(ql.layer, nn.Conv2d) for ql in layers.values())
    assert ops["QLinearConv"] == convs
    assert ops["QGemm"] == 1
    assert not FLOAT_COMPUTE & set(ops), ops
    assert ops["QLinearAdd"] == 2  # the residual adds run on integers too
    # agreement with the simulation, two batch sizes through one session
    x = _data(200, seed=7)
    with torch.no_grad():
        sim = q(x).numpy()
    out = np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(40)])
    one = sess.run(None, {"input": x[:1].numpy()})[0]
    np.testing.assert_allclose(one, out[:1], rtol=1e-5, atol=1e-5)
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.99
    step = float(quantized_layers(q)["fc"].out_scale)
    assert np.median(np.abs(out - sim).max(1)) <= step + 1e-6


def test_int8_checkpoint_round_trip_keeps_every_quantizer(tmp_path):
    _, q = _quantized()
    path = save(q, tmp_path / "q.omse.safetensors", model_name=None)
    r = load(path, model=ResNetish())
    x = _data(16, seed=3)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    a, b = quantized_layers(q), quantized_layers(r)
    for n in a:
        assert a[n].input_from == b[n].input_from
        assert (a[n].out_scale is None) == (b[n].out_scale is None)


def test_int8_export_refuses_a_model_quantized_for_int4(tmp_path):
    model = ResNetish().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(
            model, _data(16).split(8), QuantConfig.preset("fast", weight_bits=4, act_bits=8)
        )
    with pytest.raises(ConfigError, match="'stem' was quantized for target='int4'.*target='int8'"):
        export_onnx(q, _data(1), tmp_path / "q.onnx", target="int8")
    assert not (tmp_path / "q.onnx").exists()


def test_int8_export_writes_a_float_input_layer_weight_only(tmp_path):
    """A layer with a float input (``act_bits=None``, as the float fallback sets it) is written
    as ``DequantizeLinear`` (INT8 weights) -> float Conv; the layers around it stay integer
    kernels, and onnxruntime agrees with the simulation within one output step."""
    model = ResNetish().eval()
    cfg = QuantConfig.preset(
        "fast", weight_bits=4, act_bits=8, target="int8", overrides={"dw": {"act_bits": None}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, _data(16).split(8), cfg)
    path = export_onnx(q, _data(1), tmp_path / "q.onnx", target="int8")
    sess, ops = _optimized_ops(path, tmp_path)
    layers = quantized_layers(q)
    convs = sum(isinstance(ql.layer, nn.Conv2d) for ql in layers.values())
    assert ops["QLinearConv"] == convs - 1 and ops["Conv"] + ops["FusedConv"] == 1, ops
    g = onnx.load(str(path)).graph
    codes = {i.name: i.data_type for i in g.initializer}
    assert codes["dw.w0.w_codes"] == onnx.TensorProto.INT8
    x = _data(200, seed=7)
    with torch.no_grad():
        sim = q(x).numpy()
    out = sess.run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.99
    step = float(layers["fc"].out_scale)
    assert np.median(np.abs(out - sim).max(1)) <= step + 1e-6


def test_int8_export_writes_a_float_input_linear_weight_only(tmp_path):
    """A Linear with a float input and 8-bit weights (the float fallback's form) on a token
    input: ``DequantizeLinear`` -> ``MatMul``, which onnxruntime fuses into ``MatMulNBits``.
    At ``session.qdq_matmulnbits_accuracy_level=0`` it computes in float, as simulated; at
    onnxruntime's default (4) it quantizes that float input to int8 by blocks, within one
    step of the next layer's input quantizer here."""
    torch.manual_seed(0)
    model = TokenMLP().eval()
    x = torch.randn(16, 5, 64)
    cfg = QuantConfig(target="int8", budget=None, residuals=None, weight_bits=8)
    q = quantize(model, x.split(4), cfg.with_float_activations(["up"]))
    path = export_onnx(q, x[:1], tmp_path / "q.onnx")
    with torch.no_grad():
        sim = q(x).numpy()
    step = float(quantized_layers(q)["down"].act_scale)
    for level, tol in (("0", 1e-5), (None, step)):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        if level is not None:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x.numpy()})[0]
        assert np.abs(out - sim).max() <= tol, (level, np.abs(out - sim).max())


def test_int8_config_refuses_three_terms():
    with pytest.raises(ConfigError, match="max_terms=3 with target='int8'"):
        QuantConfig(target="int8", max_terms=3)
    with pytest.raises(ConfigError, match="target="):
        QuantConfig.preset("fast", target="int16")


def test_int4_export_of_an_int8_model_keeps_the_simulation(tmp_path):
    """The same int8 model written as INT4 branches (target int4): its graph computes the same
    function (two-term residual branches, float biases rounded as the int8 model rounds them)."""
    _, q = _quantized()
    path = export_onnx(q, _data(1), tmp_path / "q4.onnx", target="int4")
    x = _data(100, seed=9)
    with torch.no_grad():
        sim = q(x).numpy()
    out = _session(path).run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.99


# -- the Fashion-MNIST zoo: onnxruntime and OpenVINO -------------------------------------------
ZOO = ["fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg"]


@pytest.fixture(scope="module")
def fmnist_data(fmnist_split):
    calib, test = fmnist_split
    return calib, test


@pytest.fixture(scope="module", params=ZOO)
def zoo_int8(request, fmnist_data, tmp_path_factory):
    """A zoo net quantized with the W4A8 recipe for target int8, exported, and its simulation."""
    from omse.zoo.fmnist import weights_path
    from omse.zoo.models import get_model

    if not weights_path(request.param).is_file():
        pytest.skip(f"{request.param} weights are not in this checkout")
    calib, x = fmnist_data
    cfg = QuantConfig(
        weight_bits=4,
        act_bits=8,
        target="int8",
        extra_mac_budget=0.1,
        bias_correction=True,
        budget=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(get_model(request.param).build(), calib.split(32), cfg)
    path = export_onnx(q, x[:1], tmp_path_factory.mktemp(request.param) / "q.onnx")
    with torch.no_grad():
        sim = q(x).numpy()
    return request.param, q, path, x, sim


def _agreement(out, sim, q):
    """Top-1 agreement and the median input's largest logit difference in output steps (the
    logits are requantized: differences come in whole steps)."""
    step = float(list(quantized_layers(q).values())[-1].out_scale)
    per_input = np.abs(out - sim).max(1)
    steps = float(np.round(np.median(per_input) / step, 3))
    return float((out.argmax(1) == sim.argmax(1)).mean()), steps


def test_zoo_int8_onnxruntime(zoo_int8, tmp_path):
    name, q, path, x, sim = zoo_int8
    sess, ops = _optimized_ops(path, tmp_path)
    layers = quantized_layers(q)
    convs = sum(isinstance(ql.layer, nn.Conv2d) for ql in layers.values())
    linears = sum(isinstance(ql.layer, nn.Linear) for ql in layers.values())
    assert ops["QLinearConv"] == convs, (name, ops)
    assert ops["QGemm"] == linears, (name, ops)
    assert not FLOAT_COMPUTE & set(ops), (name, ops)
    out = np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(100)])
    agree, median_steps = _agreement(out, sim, q)
    assert agree >= 0.995, (name, agree)
    assert median_steps <= 1.0, (name, median_steps)


def test_zoo_int8_openvino(zoo_int8):
    pytest.importorskip("openvino")
    from omse.deploy.openvino import compile_onnx, precision_counts, run

    name, q, path, x, sim = zoo_int8
    compiled = compile_onnx(path, threads=2, precision_hint="f32")
    counts = precision_counts(compiled)
    assert not counts["float_layers"], (name, counts["float_layers"])
    out = np.concatenate([run(compiled, b.numpy()) for b in x.split(100)])
    agree, median_steps = _agreement(out, sim, q)
    assert agree >= 0.995, (name, agree)
    assert median_steps <= 1.0, (name, median_steps)


class TokenMLP(nn.Module):
    """Linear layers on a [batch, tokens, features] input, as a transformer's projections."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + x


@pytest.mark.parametrize("granularity", ["per_group32", "per_channel"])
def test_weight_only_linear_runs_as_matmul_nbits(tmp_path, granularity):
    torch.manual_seed(0)
    model = TokenMLP().eval()
    x = torch.randn(16, 5, 64)
    cfg = QuantConfig.preset(
        "fast", weight_bits=4, act_bits=None, granularity=granularity, target="int8"
    )
    q = quantize(model, x.split(4), cfg)
    path = export_onnx(q, x[:1], tmp_path / "q.onnx")
    sess, ops = _optimized_ops(path, tmp_path)
    assert ops["MatMulNBits"] == 2 and not FLOAT_COMPUTE & set(ops), ops
    with torch.no_grad():
        sim = q(x).numpy()
    for xb in (x, x[:3]):  # two batch sizes through the same graph
        out = sess.run(None, {"input": xb.numpy()})[0]
        with torch.no_grad():
            ref = q(xb).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(sim).max())


def test_per_group_weights_need_a_float_input(tmp_path):
    model = TokenMLP().eval()
    x = torch.randn(8, 5, 64)
    cfg = QuantConfig.preset(
        "fast", weight_bits=4, act_bits=8, granularity="per_group32", target="int8"
    )
    q = quantize(model, x.split(4), cfg)
    with pytest.raises(UnsupportedLayerError, match="'up' has per_group32 weight scales"):
        export_onnx(q, x[:1], tmp_path / "q.onnx")


@pytest.mark.slow
@pytest.mark.models
def test_lite0_recipe_runs_as_integer_kernels(tmp_path):
    """EfficientNet-Lite0, W4A8 + residuals 10% + bias correction for target int8: 49 QLinearConv
    (residual kernels merged), 9 QLinearAdd and a QGemm in onnxruntime, nothing float between;
    the graph agrees with the simulation on >= 99% of 100 views (never calibration images)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("foolbox")
    from omse.zoo.data import calibration_images, imagenet_views
    from omse.zoo.models import get_model

    spec = get_model("efficientnet-lite0")
    model = spec.build()
    cfg = QuantConfig(
        weight_bits=4,
        act_bits=8,
        target="int8",
        extra_mac_budget=0.1,
        bias_correction=True,
        budget=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, spec.preprocess(calibration_images(16)).split(8), cfg)
    assert sum(ql.n_terms == 2 for ql in quantized_layers(q).values()) > 0
    x = spec.preprocess(imagenet_views(100)[0])
    path = export_onnx(q, x[:1], tmp_path / "lite0.onnx")
    sess, ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 49 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1, ops
    assert not FLOAT_COMPUTE & set(ops), ops
    with torch.no_grad():
        sim = torch.cat([q(b) for b in x.split(25)]).numpy()
    out = np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(25)])
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.99


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("budget", ["default", "none"])
def test_lite0_default_export_is_bit_equal_to_its_uint8_form(tmp_path, budget):
    """EfficientNet-Lite0 quantized by the default recipe for ``target="int8"`` (every layer at 8
    bits there: 4 bits save no byte in an int8 file) and by the same recipe without a budget
    (4-bit layers, merged residual kernels and the 8-bit stem), exported with the default weight
    type (``int8_weights="auto"``): onnxruntime's outputs are
    bit for bit those of the same model written with UINT8 weights everywhere (``"u8"``: u8u8
    kernels, exact on every x86 CPU). On a CPU without VNNI, where u8s8 kernels add product
    pairs in saturating int16, this is the check that no INT8 layer of the default file
    saturates (CI runs it on one); on a VNNI CPU all three weight types agree."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("foolbox")
    from omse.zoo.data import calibration_images, imagenet_views
    from omse.zoo.models import get_model

    spec = get_model("efficientnet-lite0")
    cfg = (
        QuantConfig(target="int8")
        if budget == "default"
        else QuantConfig(target="int8", budget=None)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(spec.build(), spec.preprocess(calibration_images(16)).split(8), cfg)
    x = spec.preprocess(imagenet_views(32)[0])
    outs = {}
    for wt in ("auto", "u8"):
        path = export_onnx(q, x[:1], tmp_path / f"{wt}.onnx", int8_weights=wt)
        sess = _session(path, tmp_path / f"opt_{wt}.onnx")
        outs[wt] = np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(16)])
        if wt == "auto":  # both weight types in the file: INT8 (7-bit codes) and UINT8
            types = weight_types(path)
            assert types["INT8"] and types["UINT8"], types
    np.testing.assert_array_equal(outs["auto"], outs["u8"])
