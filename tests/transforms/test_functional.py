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
    assert gm2 is not gm and hasattr(gm.initializers, "onnx_initializer_0")  # input untouched


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
        q = quantize(Net().eval(), [torch.randn(4, 6)], cfg, calibration=cal)
    rows = {r.name: r for r in cal.float_weights}
    assert "functional use" in rows["custom.weight"].reason
    assert "embedding" in rows["emb.weight"].reason
    # the MHA became omse's Attention (a module swap: the untraceable Custom does not matter)
    assert not any(n.startswith("mha.") for n in rows)
    assert {"mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj"} <= set(quantized_layers(q))
    total = sum(r.values for r in rows.values()) + 36 + 6 + 4 * (36 + 6)  # + fc, q/k/v/out
    assert rows["custom.weight"].share == pytest.approx(36 / total)


def test_rewritten_model_exports_and_round_trips(tmp_path):
    import numpy as np

    import omse

    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Functional().eval()
    batches = [torch.randn(8, 12) for _ in range(2)]
    cfg = QuantConfig(weight_bits=4, act_bits=8, bias_correction=False, extra_mac_budget=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, batches, cfg)
    # a checkpoint of a rewritten model loads into the rewritten architecture
    path = omse.save(q, tmp_path / "m.omse.safetensors")
    r = omse.load(path, model=apply(Functional().eval())[0])
    with torch.no_grad():
        assert torch.equal(q(batches[1]), r(batches[1]))
    onnx_path = omse.export_onnx(q, batches[0][:1], tmp_path / "m.onnx")
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: batches[1].numpy()})[0]
    with torch.no_grad():
        sim = q(batches[1]).numpy()
    assert np.abs(out - sim).max() <= 1e-4 * np.abs(sim).max()


# -- nn.MultiheadAttention -> Attention -----------------------------------------------------------
def _mha(batch_first=False, kdim=None, vdim=None, bias=True, seed=0, **kw) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias, **kw)
    with torch.no_grad():
        for p in m.parameters():  # random biases too (torch initialises them to zero)
            p.copy_(torch.randn_like(p) * 0.4)
    return m.eval()


def _assert_same(ref, got):
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    if ref[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kv", [(None, None), (5, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_equals_multihead_attention(batch_first, kv, bias):
    from omse.transforms.functional import Attention

    m = _mha(batch_first, *kv, bias=bias)
    a = Attention.from_mha(m)
    g = torch.Generator().manual_seed(1)
    n, tgt, src = 3, 4, 6
    kdim, vdim = kv[0] or 8, kv[1] or 8

    def lay(t, *rest):  # [T, N, C] or [N, T, C]
        return torch.randn(*((n, t) if batch_first else (t, n)), *rest, generator=g)

    q, k, v = lay(tgt, 8), lay(src, kdim), lay(src, vdim)
    kpm = torch.zeros(n, src, dtype=torch.bool)
    kpm[0, -2:] = True
    kpm[2, 0] = True
    bool_mask = torch.rand(tgt, src, generator=g) > 0.7
    bool_mask[:, 0] = False  # no fully masked row (NaN in both)
    float_mask = torch.randn(n * 2, tgt, src, generator=g)
    cases = [
        {},
        {"key_padding_mask": kpm},
        {"key_padding_mask": kpm.float() * -3.0},
        {"attn_mask": bool_mask},
        {"attn_mask": float_mask},
        {"attn_mask": bool_mask, "key_padding_mask": kpm},
    ]
    with torch.no_grad():
        for case in cases:
            for need, avg in ((True, True), (True, False), (False, True)):
                kw = {**case, "need_weights": need, "average_attn_weights": avg}
                _assert_same(m(q, k, v, **kw), a(q, k, v, **kw))
        # self-attention: torch's fused fast path (batch_first, even heads, eval, no grad)
        x = lay(tgt, 8)
        if kv == (None, None):
            _assert_same(m(x, x, x), a(x, x, x))
        # a causal mask with the is_causal hint, with and without weights / padding mask
        causal = torch.ones(tgt, tgt, dtype=torch.bool).triu(1)
        x = lay(tgt, 8)
        kx, vx = lay(tgt, kdim), lay(tgt, vdim)
        for need in (True, False):
            for pad in (None, kpm[:, :tgt]):
                kw = {"attn_mask": causal, "is_causal": True, "need_weights": need}
                _assert_same(
                    m(x, kx, vx, key_padding_mask=pad, **kw),
                    a(x, kx, vx, key_padding_mask=pad, **kw),
                )
        # unbatched inputs ([L, E]), with a [S] padding mask
        q1, k1, v1 = (t[0] if batch_first else t[:, 0] for t in (q, k, v))
        for kw in (
            {},
            {"key_padding_mask": kpm[0]},
            {"attn_mask": bool_mask, "average_attn_weights": False},
        ):
            _assert_same(m(q1, k1, v1, **kw), a(q1, k1, v1, **kw))
    # the weights are the module's, sliced
    if kv == (None, None):
        assert torch.equal(a.k_proj.weight, m.in_proj_weight[8:16])
    else:
        assert torch.equal(a.v_proj.weight, m.v_proj_weight)
    if bias:
        assert torch.equal(a.v_proj.bias, m.in_proj_bias[16:])


def test_attention_refuses_what_torch_refuses():
    from omse.errors import ConfigError, UnsupportedLayerError
    from omse.transforms.functional import Attention

    a = Attention.from_mha(_mha())
    x = torch.randn(4, 2, 8)
    with pytest.raises(ConfigError, match="is_causal=True needs attn_mask"):
        a(x, x, x, is_causal=True)
    with pytest.raises(UnsupportedLayerError, match="bias_k/bias_v or add_zero_attn"):
        Attention.from_mha(_mha(add_bias_kv=True))


class AttnNet(nn.Module):
    """Linear -> MultiheadAttention(batch_first) self-attention -> Linear on ``[N, T, 8]``."""

    def __init__(self, seed: int = 0, **kw):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(8, 8)
        self.attn = _mha(batch_first=True, seed=seed, **kw)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def test_apply_replaces_multihead_attention_on_a_copy():
    model = AttnNet().eval()
    x = torch.randn(3, 5, 8)
    ref = model(x)
    new, notes = apply(model, x)
    assert type(new) is AttnNet and type(model.attn) is nn.MultiheadAttention  # input untouched
    assert type(new.attn).__name__ == "Attention"
    assert notes == [
        "attn (nn.MultiheadAttention) -> omse Attention with nn.Linear q_proj, k_proj, v_proj, "
        "out_proj (same outputs on the example batch)"
    ]
    torch.testing.assert_close(new(x), ref, rtol=1e-5, atol=1e-6)
    kept, notes = apply(AttnNet(add_bias_kv=True).eval(), x)
    assert type(kept.attn) is nn.MultiheadAttention
    assert notes == ["attn (nn.MultiheadAttention): kept float: bias_k/bias_v or add_zero_attn"]


def test_quantize_wraps_attention_projections():
    cfg = QuantConfig(weight_bits=4, act_bits=8, bias_correction=False, extra_mac_budget=0.0)
    batches = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cal = Calibration()
    q = quantize(AttnNet().eval(), batches, cfg, calibration=cal)
    names = sorted(quantized_layers(q))
    assert names == sorted(
        ["inp", "out", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    )
    assert cal.float_weights == [] and cal.left_float == []
    assert len(cal.rewritten) == 1 and "omse Attention" in cal.rewritten[0]
    # the add_bias_kv case stays float, listed with the reason
    cal = Calibration()
    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention\)"):
        q = quantize(AttnNet(add_bias_kv=True).eval(), batches, cfg, calibration=cal)
    assert sorted(quantized_layers(q)) == ["inp", "out"]
    rows = {r.name: r for r in cal.float_weights}
    assert "bias_k/bias_v or add_zero_attn" in rows["attn.in_proj_weight"].reason
    assert "bias_k/bias_v or add_zero_attn" in rows["attn.out_proj.weight"].reason


def test_transformer_encoder_attention_is_replaced_and_a_mismatch_kept(monkeypatch):
    from omse.transforms import functional

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 8)
    new, notes = apply(model, x)
    assert [type(m.self_attn).__name__ for m in new.layers] == ["Attention", "Attention"]
    assert sum("-> omse Attention" in n for n in notes) == 2
    with torch.no_grad():  # torch's layer calls Attention's forward, not its fused fast path
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    # a replacement whose outputs differ on the example batch is not kept
    real = functional.Attention.from_mha

    def off(mha):
        att = real(mha)
        att.out_proj.bias.data += 1.0
        return att

    monkeypatch.setattr(functional.Attention, "from_mha", off)
    new, notes = apply(model, x)
    assert [type(m.self_attn) for m in new.layers] == [nn.MultiheadAttention] * 2
    assert all("changed its outputs on the example batch: kept float" in n for n in notes[:2])
