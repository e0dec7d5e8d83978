"""``target="int8"``: the ops between quantized layers (SiLU = ``x * sigmoid(x)``, residual
``Add``, ``Concat``, ``MaxPool``, nearest ``Resize``, ``chunk``, ``LeakyReLU``, average pooling,
a squeeze-excitation ``Mul``) get per-tensor quantizers (:mod:`omse.nn.ops`), so that
onnxruntime runs the graph as integer kernels end to end: its optimized graph has
``QLinearSigmoid`` / ``QLinearMul`` / ``QLinearAdd`` / ``QLinearConcat`` /
``QLinearGlobalAveragePool`` / ... and no ``QuantizeLinear`` / ``DequantizeLinear`` but at the
graph's input and output (a float node between two integer kernels needs both). onnxruntime's
outputs equal omse's simulation: its ``QLinearSigmoid`` / ``QLinearLeakyRelu`` are lookup tables
of the dequantized op, requantized, which is the simulation's arithmetic; ``QLinearAdd`` /
``QLinearMul`` / the poolings compute in float and round once, as the simulation does. Asserted
to one output step (measured: equal on every output here)."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from omse.config import QuantConfig
from omse.deploy.checkpoint import load, save
from omse.deploy.export import export_onnx
from omse.nn.layers import quantized_layers
from omse.nn.ops import op_quantizers
from omse.transforms.pipeline import quantize

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Conv(nn.Module):
    """conv - BN - SiLU, as YOLOv8 builds every layer."""

    def __init__(self, a: int, b: int, k: int = 3, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(a, b, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(b)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c), Conv(c, c)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.c = b // 2
        self.cv1, self.m, self.cv2 = Conv(a, b, 1), Bottleneck(self.c), Conv(3 * self.c, b, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.cv1, self.cv2 = Conv(a, a // 2, 1), Conv(a * 2, b, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class TinyYolo(nn.Module):
    """A YOLOv8-shaped detector body: SiLU everywhere, C2f (chunk, residual add, concat), SPPF
    (max pools, concat), nearest upsampling and a concat across scales, a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.stem, self.c2f = Conv(3, 16, 3, 2), C2f(16, 16)
        self.down, self.sppf = Conv(16, 32, 3, 2), SPPF(32, 32)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse, self.head = C2f(48, 16), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        p3 = self.c2f(self.stem(x))
        p4 = self.sppf(self.down(p3))
        return self.head(self.fuse(torch.cat([self.up(p4), p3], 1)))


class SEClassifier(nn.Module):
    """conv - LeakyReLU - average pool - conv - SiLU - squeeze-excitation (global pool, two
    1x1 convs, sigmoid gate) - global pool - fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 1, 1)
        self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.avg_pool2d(F.leaky_relu(self.conv1(x), 0.1), 2)
        x = F.silu(self.conv2(x))
        s = torch.sigmoid(self.se2(torch.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ShuffleFpn(nn.Module):
    """A NanoDet-shaped body: conv - LeakyReLU - max pool read by two branches, ShuffleNetV2
    units (concat, channel shuffle as view - transpose - view, chunk: one half passes, the other
    is convolved), and a PAN neck that upsamples bilinearly and adds."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.a, self.b = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 3, 1, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.unit1, self.unit2 = nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
        self.down = nn.Conv2d(16, 16, 3, 2, 1)
        self.lat1, self.lat2 = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 6, 1)

    @staticmethod
    def _shuffle(x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    def _unit(self, x, conv):
        keep, work = self._shuffle(x).chunk(2, 1)
        return torch.cat([keep, F.leaky_relu(conv(work), 0.1)], 1)

    def forward(self, x):
        x = self.pool(F.leaky_relu(self.stem(x), 0.1))
        x = torch.cat([F.leaky_relu(self.a(x), 0.1), F.leaky_relu(self.b(x), 0.1)], 1)
        p3 = self._unit(self._unit(x, self.unit1), self.unit2)
        p4 = F.leaky_relu(self.down(p3), 0.1)
        up = F.interpolate(self.lat2(p4), scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(self.lat1(p3) + up)


def _model(cls):
    torch.manual_seed(0)
    m = cls().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    return m


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _quantize(cls, **kw):
    cfg = QuantConfig.preset("fast", weight_bits=8, act_bits=8, target="int8", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(_model(cls), list(_data(64, 0).split(16)), cfg)


@pytest.fixture(scope="module")
def yolo():
    return _quantize(TinyYolo)


@pytest.fixture(scope="module")
def se():
    return _quantize(SEClassifier)


def _optimized(path, tmp_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    return sess, collections.Counter(n.op_type for n in graph.node)


def _agrees(q, sess, step: float, n: int = 32) -> None:
    x = _data(n, 5)
    with torch.no_grad():
        sim = q(x).numpy()
    out = sess.run(None, {"input": x.numpy()})[0]
    diff = np.abs(out - sim) / step
    assert diff.max() <= 1.0 + 1e-3, diff.max()
    assert (diff > 0.5).mean() <= 1e-3  # measured: 0 (every output equal)


def test_yolo_like_net_runs_as_integer_kernels_end_to_end(yolo, tmp_path):
    ops = op_quantizers(yolo)
    kinds = collections.Counter((ops.ops[k], v) for k, v in ops.kinds.items())
    assert kinds[("Sigmoid", "own")] == 12  # every SiLU's sigmoid
    assert kinds[("MaxPool", "same")] == 3 and kinds[("Resize", "same")] == 1
    assert kinds[("Slice", "same")] == 4  # chunk(2) twice
    path = export_onnx(yolo, _data(1, 0), tmp_path / "yolo.onnx")
    sess, got = _optimized(path, tmp_path)
    convs = sum(isinstance(ql.layer, nn.Conv2d) for ql in quantized_layers(yolo).values())
    assert got["QLinearConv"] == convs == 13
    assert got["QLinearSigmoid"] == 12 and got["QLinearMul"] == 12
    assert got["QLinearAdd"] == 2 and got["QLinearConcat"] == 4
    # no float compute between integer kernels: dequantized only at the graph's output
    assert got["QuantizeLinear"] == 1 and got["DequantizeLinear"] == 1, got
    assert not {"Sigmoid", "Conv", "FusedConv", "Concat"} & set(got), got
    # SPPF's concat of a tensor and its three max pools: one quantizer, its codes copied
    graph = onnx.load(str(tmp_path / "yolo.opt.onnx")).graph
    consts = {t.name: float(onnx.numpy_helper.to_array(t)) for t in graph.initializer if not t.dims}
    spp = [n for n in graph.node if n.op_type == "QLinearConcat" and len(n.input) == 14]
    assert len(spp) == 1 and len({consts[n] for n in spp[0].input[0::3]}) == 1
    _agrees(yolo, sess, float(quantized_layers(yolo)["head"].out_scale))


def test_pooling_leaky_relu_and_squeeze_excitation_run_on_integers(se, tmp_path):
    path = export_onnx(se, _data(1, 0), tmp_path / "se.onnx")
    sess, got = _optimized(path, tmp_path)
    for op in ("QLinearLeakyRelu", "QLinearAveragePool", "QLinearSigmoid", "QLinearMul"):
        assert got[op] >= 1, (op, got)
    assert got["QLinearGlobalAveragePool"] == 2 and got["QGemm"] == 1, got
    assert got["QuantizeLinear"] == 1 and got["DequantizeLinear"] <= 1, got
    _agrees(se, sess, float(quantized_layers(se)["fc"].out_scale))


def test_channel_shuffles_shared_pools_and_bilinear_necks_run_on_integers(tmp_path):
    """Sites reached through reshapes keep their quantizer (the split after a channel shuffle
    passes codes through, the convolution reading it shares them), the activation before a max
    pool read by two convolutions takes their shared quantizer (the pool runs on its codes), and
    a bilinear upsampling's output gets a quantizer so that the add after it is integer: only
    that ``Resize`` stays float, between a ``DequantizeLinear`` and a ``QuantizeLinear``, as
    onnxruntime's own ``quantize_static`` leaves it (NanoDet-m's graph)."""
    q = _quantize(ShuffleFpn)
    ops = op_quantizers(q)
    kinds = collections.Counter((ops.ops[k], v) for k, v in ops.kinds.items())
    assert kinds[("Resize", "own")] == 1 and kinds[("Add", "none")] == 1, kinds  # add -> head
    path = export_onnx(q, _data(1, 0), tmp_path / "shuffle.onnx")
    sess, got = _optimized(path, tmp_path)
    assert got["QLinearConv"] == 9 and got["QLinearConcat"] == 3 and got["QLinearAdd"] == 1, got
    assert got["QLinearLeakyRelu"] == 6 and got["NhwcMaxPool"] == 1, got
    assert not {"LeakyRelu", "MaxPool", "Conv", "FusedConv", "Split"} & set(got), got
    # float values only at the input, around the Resize and at the output (the Adds and
    # Concats left are the reshapes' int64 shape arithmetic, on dequantized values' Shape)
    graph = onnx.load(str(tmp_path / "shuffle.opt.onnx")).graph
    readers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n.op_type)
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    computed = [n for n in dq if set(readers[n.output[0]]) - {"Shape"} or not readers[n.output[0]]]
    assert got["Resize"] == 1 and got["QuantizeLinear"] == 2 and len(computed) == 2, got
    _agrees(q, sess, float(quantized_layers(q)["head"].out_scale))


def test_op_quantizers_survive_a_checkpoint(yolo, tmp_path):
    path = save(yolo, tmp_path / "y.omse.safetensors", model_name=None)
    back = load(path, model=_model(TinyYolo))
    x = _data(8, 3)
    with torch.no_grad():
        assert torch.equal(yolo(x), back(x))
    a, b = op_quantizers(yolo), op_quantizers(back)
    assert a.kinds == b.kinds and a.grids == b.grids
    assert all(torch.equal(a.scales[k], b.scales[k]) for k in a.scales)


def test_models_without_integer_ops_get_no_op_quantizers():
    """conv-ReLU chains, ReLU6 and a mean head: every op already feeds a quantizer (or stays
    float), so nothing is attached and the graph is the one before op quantizers."""
    from nets import tiny_batches, tiny_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(tiny_net(), tiny_batches(), QuantConfig(target="int8"))
    assert op_quantizers(q) is None
