"""matmul/linear on constant weights -> nn.Linear (omse.transforms.functional), and the listing of
every weight left in float with its share and reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from omse import QuantConfig, quantize
from omse.nn.layers import quantized_layers
from omse.transforms.functional import apply, float_weights
from omse.transforms.pipeline import Calibration


class OnnxMatMul(nn.Module):
    """onnx2torch's MatMul module (onnx2torch imports torchvision, which this project must not
    install, so its class is mirrored: same name, module and forward)."""

    def forward(self, x, y):
        return torch.matmul(x, y)


OnnxMatMul.__module__ = "onnx2torch.node_converters.matmul"


def _onnx2torch_like() -> fx.GraphModule:
    """What onnx2torch builds for ``y = MatMul(x, W) + B``: initializers as buffers of an
    ``initializers`` submodule, read by ``get_attr`` nodes, and an ``OnnxMatMul`` call_module."""
    torch.manual_seed(0)
    root = nn.Module()
    root.initializers = nn.Module()
    root.initializers.register_buffer("onnx_initializer_0", torch.randn(16, 8))
    root.initializers.register_buffer("onnx_initializer_1", torch.randn(8))
    root.MatMul = OnnxMatMul()
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("initializers.onnx_initializer_0")
    b = g.get_attr("initializers.onnx_initializer_1")
    h = g.call_module("MatMul", (x, w))
    g.output(g.call_function(torch.add, (h, b)))
    return fx.GraphModule(root, g)


class Functional(nn.Module):
    """Every rewritable form, one that is not (the constant on the left), and a tied use."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 10) * 0.3)  # x @ w1
        self.w2 = nn.Parameter(torch.randn(10, 9) * 0.3)  # torch.matmul(x, w2)
        self.w3 = nn.Parameter(torch.randn(7, 9) * 0.3)  # F.linear(x, w3, b3)
        self.b3 = nn.Parameter(torch.randn(7) * 0.1)
        self.left = nn.Parameter(torch.randn(5, 7) * 0.3)  # left @ x^T: not rewritten
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        x = torch.relu(x @ self.w1)
        x = torch.matmul(x, self.w2).matmul(torch.eye(9))  # eye: a constant to torch.fx
        x = F.linear(x, self.w3, self.b3)
        return self.norm((self.left @ x.t()).t())


def test_onnx2torch_matmul_becomes_a_linear_with_the_same_output():
    gm = _onnx2torch_like()
    x = torch.randn(6, 16)
    ref = gm(x)
    w = gm.initializers.onnx_initializer_0.clone()
    gm2, notes = apply(gm, x)
    assert len(notes) == 1 and "onnx_initializer_0" in notes[0]
    lin = gm2.omse_linear0
    assert isinstance(lin, nn.Linear) and lin.bias is None
    assert torch.equal(lin.weight, w.t())
    torch.testing.assert_close(gm2(x), ref, rtol=1e-6, atol=1e-6)
    # the weight lives only in the Linear now (nothing counts it twice)
    assert not hasattr(gm2.initializers, "onnx_initializer_0")
    ops = [n.op for n in gm2.graph.nodes]
    assert ops.count("call_module") == 1 and "MatMul" not in dict(gm2.named_modules())


def test_eager_functional_uses_are_rewritten_exactly_and_the_rest_listed():
    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(4, 12)
    ref = model(x)
    gm, notes = apply(model, x)
    assert isinstance(gm, fx.GraphModule)
    # x @ w1, matmul(x, w2), .matmul(eye) (a traced constant) and F.linear(x, w3, b3)
    assert [n.split()[0] for n in notes] == ["matmul", "matmul", "matmul", "linear"]
    lins = {n: m for n, m in gm.named_modules() if isinstance(m, nn.Linear)}
    assert len(lins) == 4
    # the exact weights: W^T for matmul, W and b for linear
    assert torch.equal(lins["omse_linear0"].weight, model.w1.t())
    assert torch.equal(lins["omse_linear1"].weight, model.w2.t())
    assert torch.equal(lins["omse_linear2"].weight, torch.eye(9))
    assert torch.equal(lins["omse_linear3"].weight, model.w3)
    assert torch.equal(lins["omse_linear3"].bias, model.b3)
    torch.testing.assert_close(gm(x), ref, rtol=1e-6, atol=1e-6)
    assert model.w1.shape == (12, 10) and hasattr(model, "w1")  # the input is not modified
    rows = {r.name: r for r in float_weights(gm) if not r.name.startswith("omse_linear")}
    assert set(rows) == {"left", "norm.weight", "norm.bias"}  # w1..b3 moved into the Linears
    assert "graph operation" in rows["left"].reason
    assert "normalization" in rows["norm.weight"].reason


def test_untraceable_or_plain_models_are_left_as_they_are():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return x @ self.w
            return x

    m = Branchy()
    out, notes = apply(m, torch.randn(2, 4))
    assert out is m and len(notes) == 1 and "not traced" in notes[0]
    plain = nn.Sequential(nn.Linear(4, 3))
    out, notes = apply(plain, torch.randn(2, 4))
    assert out is plain and notes == []


def test_quantize_quantizes_the_rewritten_matmuls_and_lists_float_weights():
    torch.manual_seed(0)
    model = Functional().eval()
    batches = [torch.randn(8, 12) for _ in range(2)]
    cal = Calibration()
    cfg = QuantConfig(weight_bits=4, act_bits=8, bias_correction=False, extra_mac_budget=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, batches, cfg, calibration=cal)
    assert sorted(quantized_layers(q)) == [f"omse_linear{i}" for i in range(4)]
    assert len(cal.rewritten) == 4
    total = 12 * 10 + 10 * 9 + 9 * 9 + 7 * 9 + 7 + 5 * 7 + 5 + 5  # every weight value
    rows = {r.name: r for r in cal.float_weights}
    assert set(rows) == {"left", "norm.weight", "norm.bias"}
    assert rows["left"].values == 35 and rows["left"].share == pytest.approx(35 / total)
    assert cal.float_share == pytest.approx(45 / total)
    ref = model(batches[0])
    err = (q(batches[0]) - ref).norm() / ref.norm()
    assert 0 < float(err) < 0.2  # quantized (not float), and close


def test_eager_custom_module_weights_are_listed_with_reason_and_share():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            if x.numel() > 0:  # untraceable: stays eager
                return x @ self.weight.t()
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.custom = Custom()
            self.emb = nn.Embedding(10, 6)
            self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x):
            h = self.custom(self.fc(x)) + self.emb.weight[:1]
            return self.mha(h[:, None], h[:, None], h[:, None])[0][:, 0]

    torch.manual_seed(0)
    cal = Calibration()
    cfg = QuantConfig(weight_bits=4, act_bits=8, bias_correction=False, extra_mac_budget=0.0)
    with pytest.warns(UserWarning, match=r"custom \(Custom\).*% of the model's weight values"):
        quantize(Net().eval(), [torch.randn(4, 6)], cfg, calibration=cal)
    rows = {r.name: r for r in cal.float_weights}
    assert "functional use" in rows["custom.weight"].reason
    assert "embedding" in rows["emb.weight"].reason
    assert "MultiheadAttention" in rows["mha.in_proj_weight"].reason
    # the MHA's out_proj is read by the MHA's own forward: left float with it, not wrapped
    assert "mha.out_proj.weight" in rows
    total = sum(r.values for r in rows.values()) + 36 + 6  # + the quantized fc
    assert rows["custom.weight"].share == pytest.approx(36 / total)
