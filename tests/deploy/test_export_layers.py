"""Conv1d, Conv3d and ConvTranspose1d/2d/3d: ONNX export parity in onnxruntime (QDQ int4,
integer=True, target int8) and checkpoint save/load round trips."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import omse
from omse.config import QuantConfig
from omse.deploy.export import export_onnx, to_onnx_model
from omse.nn.layers import quantized_layers, set_integer
from omse.transforms.pipeline import quantize

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Up2d(nn.Module):
    """conv -> ReLU -> grouped ConvTranspose2d (stride 2, output_padding) -> ReLU -> ConvTranspose2d."""

    shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up2 = nn.ConvTranspose2d(6, 4, 2, stride=2)

    def forward(self, x):
        return self.up2(torch.relu(self.up(torch.relu(self.conv(x)))))


class Seq1d(nn.Module):
    shape = (4, 16)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)))


class Vol3d(nn.Module):
    shape = (2, 4, 6, 6)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 6, 3, padding=1)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2, groups=2)

    def forward(self, x):
        return self.up(torch.relu(self.conv(x)))


NETS = [Up2d, Seq1d, Vol3d]


def _data(net, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *net.shape, generator=g)


def _quantized(net_cls, **cfg):
    torch.manual_seed(0)
    net = net_cls().eval()
    base = dict(weight_bits=4, act_bits=8, extra_mac_budget=0.2, bias_correction=True, budget=None)
    base.update(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(net, _data(net_cls, 16, 1).split(8), QuantConfig(**base))
    return net, q


def _ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


def _step(q) -> float:
    last = list(quantized_layers(q).values())[-1]
    return float(last.act_scale) * float(last.dequantized_weight().abs().max())


@pytest.mark.parametrize("net_cls", NETS, ids=lambda c: c.__name__)
def test_every_layer_is_quantized_with_residuals_and_bias_correction(net_cls):
    net, q = _quantized(net_cls)
    layers = quantized_layers(q)
    assert sorted(layers) == sorted(n for n, _ in net.named_children())
    assert any(ql.n_terms == 2 for ql in layers.values())
    x = _data(net_cls, 8, 2)
    ref = net(x)
    err = float((q(x) - ref).norm() / ref.norm())
    assert 0 < err < 0.1


@pytest.mark.parametrize("net_cls", NETS, ids=lambda c: c.__name__)
def test_qdq_int4_parity(tmp_path, net_cls):
    _, q = _quantized(net_cls)
    path = export_onnx(q, _data(net_cls, 1, 0), tmp_path / "m.onnx")
    x = _data(net_cls, 16, 3)
    out = _ort(path, x)
    with torch.no_grad():
        sim = q(x).numpy()
    assert np.abs(out - sim).max() <= _step(q) + 1e-5 * np.abs(sim).max()
    ops = {n.op_type for n in to_onnx_model(q, _data(net_cls, 1, 0)).graph.node}
    assert "ConvTranspose" in ops and "DequantizeLinear" in ops


@pytest.mark.parametrize("net_cls", NETS, ids=lambda c: c.__name__)
def test_integer_form_is_bit_exact(tmp_path, net_cls):
    _, q = _quantized(net_cls)
    path = export_onnx(q, _data(net_cls, 1, 0), tmp_path / "m.onnx", integer=True)
    x = _data(net_cls, 16, 4)
    out = _ort(path, x)
    set_integer(q, True)
    with torch.no_grad():
        sim = q(x).numpy()
    # integer accumulators are exact; only the float rescale and bias add remain
    assert np.abs(out - sim).max() <= 1e-5 * np.abs(sim).max()


@pytest.mark.parametrize("net_cls", NETS, ids=lambda c: c.__name__)
def test_int8_target_parity(tmp_path, net_cls):
    _, q = _quantized(net_cls, target="int8")
    path = export_onnx(q, _data(net_cls, 1, 0), tmp_path / "m.onnx")
    x = _data(net_cls, 16, 5)
    out = _ort(path, x)
    with torch.no_grad():
        sim = q(x).numpy()
    assert np.abs(out - sim).max() <= 2 * _step(q) + 1e-5 * np.abs(sim).max()


@pytest.mark.parametrize("net_cls", NETS, ids=lambda c: c.__name__)
def test_checkpoint_round_trip_is_bit_identical(tmp_path, net_cls):
    net, q = _quantized(net_cls)
    p = omse.save(q, tmp_path / "m.omse.safetensors")
    r = omse.load(p, model=net_cls().eval())
    for name, ql in quantized_layers(q).items():
        rl = quantized_layers(r)[name]
        for (a, sa, ma), (b, sb, mb) in zip(ql.terms(), rl.terms(), strict=True):
            assert torch.equal(a, b) and torch.equal(sa, sb) and torch.equal(ma, mb)
    x = _data(net_cls, 4, 6)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))


@pytest.mark.parametrize("net_cls", NETS, ids=lambda c: c.__name__)
def test_int8_target_openvino_parity(tmp_path, net_cls):
    pytest.importorskip("openvino")
    from omse.deploy.openvino import compile_onnx, precision_counts, run

    _, q = _quantized(net_cls, target="int8")
    path = export_onnx(q, _data(net_cls, 1, 0), tmp_path / "m.onnx")
    compiled = compile_onnx(path, threads=1)
    x = _data(net_cls, 8, 5)
    out = run(compiled, x.numpy())
    with torch.no_grad():
        sim = q(x).numpy()
    assert np.abs(out - sim).max() <= _step(q) + 1e-5 * np.abs(sim).max()
    # OpenVINO runs the ungrouped transposed convolutions as u8 kernels (Deconvolution)
    counts = precision_counts(compiled)["counts"]
    assert "Deconvolution" in counts
