"""ONNX export: onnxruntime executes the QDQ graph and reproduces omse's simulation.

Parity tolerance, defined once (``_one_step``): the largest change of one output that one step of
one input code of the *last* quantized layer causes, ``act_scale_last * max|W_last|`` (W the
dequantized weight). Why this and not float epsilon: onnxruntime and torch sum a convolution in
different orders, so a pre-activation that lies within float rounding of a rounding boundary
``(k + 1/2) * s`` may be quantized to ``k`` by one and ``k + 1`` by the other; each such flip moves
downstream values by whole quantization steps, not by ulps. In a shallow net a flip is rare (the
pre-activation must fall within ~1e-6 relative of a boundary), so ORT may differ from the simulation
by at most about one such step at the output (plus float rounding, ``1e-5`` of the logit range).
In a deep 4-bit net (EfficientNet-Lite0) flips cascade (by the last layer ~20% of its input codes
differ by a step or more, exactly as between the simulation in float32 and in float64); there the
tolerance is the simulation's *own* sensitivity to summation order - see the Lite0 test.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from omse.config import QuantConfig
from omse.deploy.export import export_onnx, to_onnx_model
from omse.errors import OmseError, UnsupportedLayerError
from omse.nn.layers import quantize_weight_terms, quantized_layers, set_integer
from omse.transforms.pipeline import quantize

ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SmallNet(nn.Module):
    """Conv-BN-ReLU, depthwise conv + ReLU6, pointwise conv with a residual add, pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        y = torch.nn.functional.relu6(self.dw(x))
        x = x + self.pw(y)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


def _quantized(cfg: QuantConfig, residual: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet().eval()
    calib = _data(32, seed=1).split(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(net, calib, cfg)
    if residual:  # a second integer tensor on half of pw's kernels: W ~ s1*Q1 + s2*Q2
        pw = quantized_layers(q)["pw"]
        terms = quantize_weight_terms(pw.float_weight, pw.w_grid, pw.cfg.granularity, terms=2)
        mask = torch.arange(pw.float_weight.shape[0]) % 2 == 0
        pw.set_weight_terms(terms, [mask])
    return q


def _session(path, **kw):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for k, v in kw.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _one_step(q: nn.Module) -> float:
    last = list(quantized_layers(q).values())[-1]
    return float(last.act_scale) * float(last.dequantized_weight().abs().max())


def _run(q, path, x, **kw):
    out = _session(path, **kw).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        sim = q(x).numpy()
    return out, sim


@pytest.mark.parametrize("act_bits", [8, 4])
def test_small_net_parity(tmp_path, act_bits):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=act_bits))
    assert quantized_layers(q)["pw"].n_terms == 2
    path = export_onnx(q, _data(1), tmp_path / "m.onnx")
    x = _data(64, seed=2)
    out, sim = _run(q, path, x)
    tol = _one_step(q) + 1e-5 * np.abs(sim).max()
    assert np.abs(out - sim).max() <= tol
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.995
    # the same graph without any onnxruntime graph optimisation agrees too
    out0, _ = _run(q, path, x, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert np.abs(out0 - sim).max() <= tol


@pytest.mark.parametrize(
    "cfg, container",
    [
        (dict(weight_bits=4, act_bits=4), "int8"),  # 4-bit activations in UINT8 + exact Clip
        (dict(weight_bits=6, act_bits=6, weight_grid="narrow", act_grid="narrow"), "int4"),
        (dict(weight_bits=3, act_bits=3, granularity="per_tensor"), "int4"),
        (dict(weight_bits=4, act_bits=8, act_grid="affine"), "int4"),  # zero points
        (dict(weight_bits=4, act_bits=4, act_grid="affine"), "int4"),  # UINT4 zero points
        (dict(weight_bits=4, act_bits=4, act_grid="affine"), "int8"),
    ],
)
def test_other_grids_parity(tmp_path, cfg, container):
    q = _quantized(QuantConfig.preset("fast", **cfg))
    path = export_onnx(q, _data(1), tmp_path / "m.onnx", container=container)
    out, sim = _run(q, path, _data(64, seed=3))
    tol = (2 if container == "int8" else 1) * _one_step(q) + 1e-5 * np.abs(sim).max()
    assert np.abs(out - sim).max() <= tol


def test_graph_is_4bit_qdq(tmp_path):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=4))
    m = to_onnx_model(q, _data(1))
    ops = [n.op_type for n in m.graph.node]
    assert m.opset_import[0].version == 21
    assert "Marker" not in ops
    layers = quantized_layers(q)
    n_terms = sum(ql.n_terms for ql in layers.values())
    inits = {i.name: i for i in m.graph.initializer}
    w = [i for i in m.graph.initializer if i.name.endswith("w_codes")]
    assert len(w) == n_terms == 5  # stem, dw, pw (2 terms), fc
    assert all(i.data_type == TensorProto.INT4 for i in w)
    for name, ql in layers.items():
        for t, (codes, _, _) in enumerate(ql.terms()):
            arr = onnx.numpy_helper.to_array(inits[f"{name}.w{t}.w_codes"]).astype(np.int64)
            assert arr.min() >= -8 and arr.max() <= 7
            kernels = ql.term_kernels(t) if t else None  # a residual: its own kernels only
            np.testing.assert_array_equal(arr, codes[kernels if t else slice(None)].numpy())
    assert layers["pw"].term_kernels(1).tolist() == list(range(0, 16, 2))
    # no float weight is left for the quantized layers
    floats = [i for i in m.graph.initializer if i.data_type == TensorProto.FLOAT and i.dims]
    assert all(int(np.prod(i.dims)) <= 16 for i in floats)  # scales and biases only
    # 4-bit activations: INT4 (the stem's input is signed) / UINT4 (post-ReLU inputs)
    qtype = {
        n.name: onnx.helper.get_attribute_value(n.attribute[0])
        for n in m.graph.node
        if n.op_type == "QuantizeLinear"
    }
    assert qtype["stem.act.quant"] == TensorProto.INT4
    assert qtype["dw.act.quant"] == qtype["pw.act.quant"] == TensorProto.UINT4
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4 + n_terms


def test_int8_container_fuses_integer_kernels(tmp_path):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=8), residual=False)
    path = export_onnx(q, _data(1), tmp_path / "m8.onnx", container="int8")
    m = onnx.load(path)
    w = [i for i in m.graph.initializer if i.name.endswith("w_codes")]
    assert all(i.data_type == TensorProto.INT8 for i in w)
    for i in w:  # 4-bit values in 8-bit containers
        a = onnx.numpy_helper.to_array(i)
        assert a.min() >= -8 and a.max() <= 7
    opt = tmp_path / "opt.onnx"
    x = _data(64, seed=2)
    out, sim = _run(q, path, x, optimized_model_filepath=str(opt))
    ops = [n.op_type for n in onnx.load(opt).graph.node]
    assert "QLinearConv" in ops  # stem -> ReLU -> dw input Q: an integer convolution
    # the int32 bias moves each output by < s_x*s_w/2; allow one more step for that
    tol = 2 * _one_step(q) + 1e-5 * np.abs(sim).max()
    assert np.abs(out - sim).max() <= tol


# -- integer form: the exact arithmetic of an integer runtime ------------------------------------
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("container", ["int4", "int8"])
def test_integer_form_is_bit_exact(tmp_path, act_bits, container):
    """``integer=True``: the layers run on integer codes (exact accumulators) and rescale by
    ``s_x * s_w`` after; onnxruntime then reproduces omse's integer mode bit for bit, residual
    branches included, with and without its graph optimisations."""
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=act_bits))
    x = _data(64, seed=2)
    with torch.no_grad():
        fake = q(x).numpy()
    set_integer(q, True)
    assert all(ql.accumulator_bound() < 2**24 for ql in quantized_layers(q).values())
    path = export_onnx(q, _data(1), tmp_path / "m.onnx", integer=True, container=container)
    out, sim = _run(q, path, x)
    np.testing.assert_array_equal(out, sim)
    out0, _ = _run(q, path, x, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(out0, sim)
    # the same values as fake quantization, up to float rounding
    assert np.abs(sim - fake).max() <= 1e-5 * np.abs(fake).max()


class BranchNet(nn.Module):
    """One layer of each kind a residual branch is cut to its kernels for, and a grouped
    convolution it is not (a kernel there needs its group's input channels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.up(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("integer", [False, True])
def test_residual_branches_hold_their_kernels_only(tmp_path, integer):
    """A residual term on some kernels is written as those kernels alone (codes, scales, MACs),
    its output scattered back to the layer's channels: onnxruntime still computes the
    simulation (bit for bit in the integer form), and the file holds the bytes
    :func:`~omse.transforms.precision.residual_bytes` counts; a grouped convolution keeps its
    whole term."""
    from onnx import numpy_helper

    from omse.core.primitives import SCALE_DTYPES
    from omse.transforms.precision import INDEX_BYTES, residual_bytes

    torch.manual_seed(0)
    net = BranchNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(net, _data(32, seed=1).split(8), QuantConfig.preset("fast", weight_bits=4))
    layers = quantized_layers(q)
    for ql in layers.values():  # a residual term on every third kernel of every layer
        terms = quantize_weight_terms(ql.float_weight, ql.w_grid, ql.cfg.granularity, terms=2)
        ql.set_weight_terms(terms, [torch.arange(ql.float_weight.shape[0]) % 3 == 0])
    assert layers["grouped"].term_kernels(1) is None
    for name in ("conv", "dw", "up", "fc"):
        assert layers[name].term_kernels(1).tolist() == list(
            range(0, layers[name].float_weight.shape[0], 3)
        )
    x = _data(16, seed=2)
    with torch.no_grad():
        fake = q(x).numpy()
    if integer:
        set_integer(q, True)
    path = export_onnx(q, _data(1), tmp_path / "m.onnx", integer=integer, target="int4")
    out, sim = _run(q, path, x)
    if integer:
        np.testing.assert_array_equal(out, sim)
        assert np.abs(sim - fake).max() <= 1e-5 * np.abs(fake).max()
    else:
        assert np.abs(out - sim).max() <= _one_step(q) + 1e-5 * np.abs(sim).max()
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    per_scale = SCALE_DTYPES[QuantConfig().weights.scale_dtype].itemsize
    for name, ql in layers.items():
        codes = inits[f"{name}.w1.w_codes"]
        kernels = ql.term_kernels(1)
        assert codes.shape[0] == (ql.float_weight.shape[0] if kernels is None else len(kernels))
        written = (codes.size + 1) // 2 + (
            0 if integer else inits[f"{name}.w1.scale"].size * per_scale
        )
        if kernels is not None:  # the scatter's indices, and the depthwise input's
            out = ql.float_weight.shape[0]
            written += INDEX_BYTES * (out + (len(kernels) if name == "dw" else 0))
        if not integer:
            assert residual_bytes(ql, "int4") == written, name
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    gathers = [n for n in m.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 5  # four scatters and the depthwise input's channels
    index = [
        inits[g.input[1]]
        if g.input[1] in inits
        else numpy_helper.to_array(consts[g.input[1]].attribute[0].t)
        for g in gathers
    ]
    assert all(i.dtype == np.int64 for i in index)
    assert sorted(i.size for i in index) == [3, 5, 6, 8, 8]  # dw's 3 inputs, fc 5, up 6, conv/dw 8
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Conv") == 2 * 3 and ops.count("ConvTranspose") == 2  # a branch per term


def test_integer_form_graph(tmp_path):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=4))
    m = to_onnx_model(q, _data(1), integer=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    ops = [n.op_type for n in m.graph.node]
    layers = quantized_layers(q)
    n_terms = sum(ql.n_terms for ql in layers.values())
    assert ops.count("Mul") == n_terms and ops.count("QuantizeLinear") == len(layers)
    for name, ql in layers.items():
        assert float(inits[f"{name}.act.unit_scale"]) == 1.0  # DQ to the codes themselves
        for t, (codes, _, _) in enumerate(ql.terms()):
            kept = ql.term_kernels(t) if t else slice(None)  # a residual: its own kernels only
            assert float(inits[f"{name}.w{t}.scale"]) == 1.0
            np.testing.assert_array_equal(inits[f"{name}.w{t}.w_codes"], codes[kept].numpy())
            m_t = inits[f"{name}.w{t}.multiplier"]
            np.testing.assert_array_equal(m_t, ql.multiplier(t)[kept].numpy())
    w = [i for i in m.graph.initializer if i.name.endswith("w_codes")]
    assert all(i.data_type == TensorProto.INT4 for i in w)
    with pytest.raises(OmseError, match="integer"):
        to_onnx_model(q, _data(1), integer="yes")


def test_refuses_overwrite_and_bad_args(tmp_path):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=8), residual=False)
    p = tmp_path / "m.onnx"
    p.write_bytes(b"keep")
    with pytest.raises(OmseError, match="already exists"):
        export_onnx(q, _data(1), p)
    assert p.read_bytes() == b"keep"
    export_onnx(q, _data(1), p, force=True)
    assert onnx.load(p).graph.node
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []
    with pytest.raises(OmseError, match="opset"):
        export_onnx(q, _data(1), tmp_path / "o.onnx", opset=19)


def test_per_group_weights_refused_by_name(tmp_path):
    cfg = QuantConfig.preset(
        "fast", weight_bits=4, act_bits=8, overrides={"pw": {"granularity": "per_group4"}}
    )
    q = _quantized(cfg, residual=False)
    with pytest.raises(UnsupportedLayerError, match=r"layer 'pw'.*per_group4"):
        export_onnx(q, _data(1), tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()


class _Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x, dim=-1).abs()


def test_unexportable_module_named(tmp_path):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=8), residual=False)
    q2 = nn.Sequential(copy.deepcopy(q), nn.Sequential(_Spectral()))
    with pytest.raises(UnsupportedLayerError, match=r"module '1\.0' \(_Spectral\).*fft"):
        export_onnx(q2, _data(1), tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


# -- EfficientNet-Lite0 --------------------------------------------------------------------------
@pytest.mark.models
def test_lite0_parity(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("foolbox")
    from omse.zoo.data import calibration_images, imagenet_views
    from omse.zoo.models import get_model

    spec = get_model("efficientnet-lite0")
    model = spec.build()
    calib = spec.preprocess(calibration_images(8))
    # W4A8 with a residual 4-bit tensor on every layer (min-max ranges, for speed): a 4-bit model
    # that still agrees with FP32 on ~97% of views, exported with two 4-bit branches per layer
    q = quantize(
        model,
        [calib],
        QuantConfig.preset("fast", weight_bits=4, act_bits=8, weight_method="minmax"),
    )
    for ql in quantized_layers(q).values():
        ql.set_weight_terms(
            quantize_weight_terms(ql.float_weight, ql.w_grid, ql.cfg.granularity, "minmax", 2)
        )
    x = spec.preprocess(imagenet_views(16)[0])
    path = export_onnx(q, x[:1], tmp_path / "lite0.onnx")
    out, sim = _run(q, path, x)
    with torch.no_grad():
        q64 = copy.deepcopy(q).double()
        for ql in quantized_layers(q64).values():
            ql.act_scale = ql.act_scale.double()
        sim64 = q64(x.double()).numpy()
        fp32 = model(x).numpy()

    def rms(a):
        return float(np.sqrt(np.mean(a**2)))

    # ORT differs from the float32 simulation no more than the simulation differs from itself
    # computed in float64 (same codes and scales, another summation order), with 2x margin
    assert rms(out - sim) <= 2 * rms(sim64 - sim) + 1e-6
    assert np.abs(out - sim).max() <= 2 * np.abs(sim64 - sim).max() + 1e-6
    # and below the quantization error itself (measured: ~1/5 of it for this near-8-bit model)
    assert rms(out - sim) <= 0.5 * rms(sim - fp32)
    # top-1: a 4-bit Lite0 has views whose two best logits are closer than that float-order noise
    # (the float64 simulation itself disagrees with float32 on ~2% of 200 views); every view whose
    # simulated top-1 margin exceeds twice the noise must agree
    top2 = np.sort(sim, 1)[:, -2:]
    decidable = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(sim64 - sim).max()
    assert decidable.sum() >= len(x) // 2
    assert (out.argmax(1) == sim.argmax(1))[decidable].mean() >= 0.995

    # the integer form has no such noise: ORT reproduces omse's integer mode on every view
    # (issue bar: logits within one output step, top-1 agreement >= 99.5%; measured: bit-equal)
    set_integer(q, True)
    assert max(ql.accumulator_bound() for ql in quantized_layers(q).values()) < 2**24
    path = export_onnx(q, x[:1], tmp_path / "lite0_int.onnx", integer=True)
    out, sim = _run(q, path, x)
    assert np.abs(out - sim).max() <= _one_step(q)
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.995


# -- the Fashion-MNIST zoo -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist_data(fmnist_split):
    calib, test = fmnist_split
    return calib[:64], test


@pytest.mark.parametrize("name", ["fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg"])
def test_zoo_parity(tmp_path, fmnist_data, name):
    """The issue's bar on every zoo net, W4A8 kernel-wise MMSE with residual tensors at 10% extra
    MACs and bias correction, on 1000 test images: the integer-form graph reproduces omse's integer
    mode (logits within one output step; measured: equal) and the QDQ graph agrees on top-1 >= 99.5%
    with the fake-quantized simulation."""
    from omse.zoo.fmnist import weights_path
    from omse.zoo.models import get_model

    if not weights_path(name).is_file():
        pytest.skip(f"{name} weights are not in this checkout")
    calib, x = fmnist_data
    model = get_model(name).build()
    cfg = QuantConfig(weight_bits=4, act_bits=8, extra_mac_budget=0.1, bias_correction=True)
    q = quantize(model, calib.split(32), cfg)
    qdq = export_onnx(q, x[:1], tmp_path / "qdq.onnx")
    out_qdq, sim_fake = _run(q, qdq, x)
    set_integer(q, True)
    exact = export_onnx(q, x[:1], tmp_path / "int.onnx", integer=True)
    out, sim = _run(q, exact, x)
    step = _one_step(q)
    assert np.abs(out - sim).max() <= step
    assert (out.argmax(1) == sim.argmax(1)).mean() >= 0.995
    assert (out_qdq.argmax(1) == sim_fake.argmax(1)).mean() >= 0.995
    # QDQ form: ORT convolves dequantized floats in its own order; a pre-activation within float
    # rounding of a rounding boundary flips one code and the flip travels (measured: 81-96% of
    # inputs within one step, the worst ~25 steps); most inputs are untouched
    per_input = np.abs(out_qdq - sim_fake).max(1)
    assert np.median(per_input) <= step and (per_input <= step).mean() >= 0.75


def test_affine_activations_export_zero_points(tmp_path):
    q = _quantized(QuantConfig.preset("fast", weight_bits=4, act_bits=8, act_grid="affine"))
    stem = quantized_layers(q)["stem"]
    assert stem.a_grid.kind == "unsigned" and stem.a_grid.zero_point > 0  # a signed input
    m = to_onnx_model(q, _data(1))
    zp = {i.name: i for i in m.graph.initializer}
    node = next(n for n in m.graph.node if n.name == "stem.act.quant")
    z = zp[node.input[2]]
    assert z.data_type == TensorProto.UINT8
    assert int(onnx.numpy_helper.to_array(z)) == stem.a_grid.zero_point
    for target in ("int4", "int8"):
        qt = _quantized(
            QuantConfig.preset("fast", weight_bits=4, act_bits=8, act_grid="affine", target=target),
            residual=False,
        )
        path = export_onnx(qt, _data(1), tmp_path / f"{target}.onnx")
        out, sim = _run(qt, path, _data(64, seed=4))
        tol = (2 if target == "int8" else 1) * _one_step(qt) + 1e-5 * np.abs(sim).max()
        assert np.abs(out - sim).max() <= tol
