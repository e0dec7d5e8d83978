"""``target="int8"`` on a transformer: Linear outputs that only float ops read stay float.

A small post-LayerNorm encoder (BERT's layout, as all-MiniLM-L6-v2 has it) whose residual stream
carries two outlier channels, as trained transformers do (the FFN's second Linear writes them).
An integer runtime runs every Linear as an integer ``MatMul`` with a float output
(onnxruntime's ``MatMulIntegerToFloat``); the residual ``Add`` -> ``LayerNormalization``, the
``Gelu`` and the attention ``MatMul``/``Softmax`` are float ops. So the int8 plan places no output
quantizer on those Linears and no shared quantizer on the LayerNorm outputs (the residual
stream stays float); the projections reading one LayerNorm output share one input quantizer
(the tensor's own, not a producer's output step). The int8 simulation then matches the int4
target's (float between layers) and onnxruntime runs the exported graph with one integer
kernel per Linear, agreeing with the simulation.

The parity checks use 8-bit weights: ``target="int8"`` quantizes them on 7-bit codes (within
+-64) and the export writes them as INT8, which onnxruntime's u8s8 kernels multiply exactly on
every x86 CPU; on CPUs without VNNI (AVX2) those add pairs of u8 x s8 products in saturating
int16 (``vpmaddubsw``), which full-range 8-bit codes against inputs near 255 overflow
(``tests/deploy/test_int8_weights.py``).
"""

from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from omse.config import QuantConfig
from omse.deploy.export import to_onnx_model
from omse.nn.layers import SharedInputQuantizer, quantized_layers
from omse.transforms.pipeline import quantize

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, HEADS, FFN, T = 16, 2, 32, 7


class EncoderLayer(nn.Module):
    """Self-attention (query/key/value/output Linears) + residual + LayerNorm, then
    Linear-GELU-Linear + residual + LayerNorm."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.attn_out = nn.Linear(D, D)
        self.ln1 = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, D)
        self.ln2 = nn.LayerNorm(D)

    def heads(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, HEADS, D // HEADS).transpose(1, 2)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), -1)
        ctx = (att @ v).transpose(1, 2).reshape(b, t, D)
        h = self.ln1(x + self.attn_out(ctx))
        return self.ln2(h + self.fc2(nn.functional.gelu(self.fc1(h))))


class Encoder(nn.Module):
    """Linear embedding + LayerNorm, two encoder layers, mean pooling."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(8, D)
        self.ln = nn.LayerNorm(D)
        self.layers = nn.ModuleList([EncoderLayer(), EncoderLayer()])
        with torch.no_grad():
            for layer in self.layers:  # outlier channels in the residual stream (FFN output)
                layer.fc2.weight[:2] *= 40.0
                layer.fc2.bias[:2] += 20.0
                layer.ln2.weight[:2] *= 8.0

    def forward(self, x):
        h = self.ln(self.embed(x))
        for layer in self.layers:
            h = layer(h)
        return h.mean(1)


def _batches(n=4, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, T, 8, generator=g) for _ in range(n)]


def _quantize(target, weight_bits=8, **kw):
    cfg = QuantConfig.preset(
        "fast", weight_bits=weight_bits, act_bits=8, target=target, bias_correction=False, **kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize(Encoder().eval(), _batches(), cfg)


def _first_8bit(q) -> dict:
    """Overrides giving an int4 model the int8 plan's weight grids: 8 bits for the layers that
    kept them (the first layer), 7 for the others."""
    layers = q if isinstance(q, dict) else quantized_layers(q)
    return {n: {"weight_bits": 8} for n, ql in layers.items() if ql.w_grid.bits == 8}


def _rel_err(q, model, xs):
    with torch.no_grad():
        ref = torch.cat([model(x) for x in xs])
        out = torch.cat([q(x) for x in xs])
    return float((out - ref).norm() / ref.norm())


def test_linear_outputs_read_by_float_ops_stay_float():
    q = _quantize("int8")
    layers = quantized_layers(q)
    assert len(layers) == 13
    assert all(ql.out_scale is None for ql in layers.values()), [
        n for n, ql in layers.items() if ql.out_scale is not None
    ]
    hooks = [
        n
        for n, m in q.named_modules()
        for h in m._forward_hooks.values()
        if isinstance(h, SharedInputQuantizer)
    ]
    assert hooks == []  # the LayerNorm outputs (the residual stream) stay float
    # int8 quantizes 8-bit weights on 7 bits (codes within +-64) but for the first layer: the
    # int4 model with those weight bits has the same weights, so the same tensors
    q4 = quantized_layers(_quantize("int4", weight_bits=7, overrides=_first_8bit(layers)))
    for i in range(2):
        names = [f"layers.{i}.{p}" for p in ("query", "key", "value")]
        # one input quantizer for the tensor the three projections read: its own step (the
        # int4 target's, calibrated on that tensor), not the query's output step
        steps = {float(layers[n].act_scale) for n in names}
        assert steps == {float(q4[names[0]].act_scale)}, (steps, float(q4[names[0]].act_scale))


def test_int8_simulation_is_as_close_to_fp32_as_int4():
    model = Encoder().eval()
    xs = _batches(4, 8, seed=5)
    # int8 quantizes 8-bit weights on 7 bits: against the int4 model with the same weights,
    # the same arithmetic but the int32 biases (and one step shared by the projections)
    q8 = _quantize("int8")
    e8 = _rel_err(q8, model, xs)
    e4 = _rel_err(_quantize("int4", weight_bits=7, overrides=_first_8bit(q8)), model, xs)
    assert e8 <= 1.05 * e4 + 1e-4, (e8, e4)


def _session(proto, opt=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if opt is not None:
        so.optimized_model_filepath = str(opt)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_onnxruntime_runs_integer_matmuls_with_float_outputs(tmp_path):
    q = _quantize("int8")
    proto = to_onnx_model(q, _batches(1, 1)[0], dynamic_axes={"input": {1: "seq"}})
    opt = tmp_path / "opt.onnx"
    sess = _session(proto, opt)
    ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    # every Linear one integer kernel with a float output; the float MatMuls left are the two
    # attention products per layer; no output requantization: one QuantizeLinear per distinct
    # Linear input (the three projections share theirs)
    assert ops["MatMulIntegerToFloat"] == 13, ops
    assert ops["MatMul"] + ops["FusedMatMul"] == 4, ops
    assert ops["QLinearMatMul"] == 0 and ops["Gemm"] == 0, ops
    assert ops["QuantizeLinear"] <= 13 - 2 * 2, ops
    g = torch.Generator().manual_seed(3)
    for shape in ((1, T, 8), (5, 11, 8)):  # another batch and sequence length
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            sim = q(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        # float sums in another order: a code one step apart now and then, moved through
        # LayerNorm; far below one step of any 8-bit output quantizer of this residual stream
        assert np.abs(out - sim).max() <= 1e-3 * np.abs(sim).max(), np.abs(out - sim).max()


class ResidualMLP(nn.Module):
    """Linear -> + skip -> Linear: the Add's result is the next Linear's quantized input, so an
    integer runtime runs the Add on 8-bit values (QLinearAdd): the first Linear keeps its output
    quantizer, shared with the skip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(self.b(h) + h)


def test_a_linear_into_an_integer_add_keeps_its_output_quantizer():
    cfg = QuantConfig.preset("fast", weight_bits=8, act_bits=8, target="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(ResidualMLP().eval(), [torch.randn(16, 8)], cfg)
    layers = quantized_layers(q)
    assert layers["b"].out_scale is not None
    assert layers["c"].out_scale is not None  # the graph output (QGemm, then DequantizeLinear)
