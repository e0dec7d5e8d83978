"""Dataflow tracing (omse.transforms.graph): routes of layer outputs, constant folding, Pad folding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from omse.config import QuantConfig
from omse.nn.layers import quantized_layers
from omse.transforms.graph import fold_constants, fold_pads, layer_routes, trace
from omse.transforms.pipeline import quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RouteNet(nn.Module):
    """a -ReLU6-> b (fused); b -ReLU-> maxpool -> y, read by c and by a residual add (b needs an
    output quantizer, which c shares); c -> Add; d -> mean -> fc (graph output)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = nn.functional.relu6(self.a(x))
        y = nn.functional.max_pool2d(torch.relu(self.b(x)), 2)
        z = self.c(y) + y  # c's output goes to an Add: needs its own quantizer
        z = self.d(z)
        return self.fc(z.mean((2, 3)))


def _q(model, target="int8"):
    x = torch.randn(8, 3, 8, 8)
    return quantize(
        model, [x], QuantConfig.preset("fast", weight_bits=4, act_bits=8, target=target)
    ), x


def test_routes_name_each_layer_destination():
    q, x = _q(RouteNet().eval(), target="int4")
    proto, qls = trace(q, x[:1])
    names = [ql.name for ql in qls]
    routes = {names[i]: r for i, r in layer_routes(proto).items()}
    assert routes["a"].kind == "fused" and names[routes["a"].consumer] == "b"
    assert routes["a"].clamp == (0.0, 6.0) and routes["a"].chain == ("Clip",)
    assert routes["b"].kind == "output" and routes["b"].chain == ("Relu", "MaxPool")
    assert routes["b"].clamp == (0.0, float("inf"))
    assert [names[j] for j in routes["b"].shared] == ["c"]
    assert routes["c"].kind == "output" and routes["c"].reader == "Add"
    # d's output goes through a mean (ReduceMean): not transparent
    assert routes["d"].kind == "output"
    assert routes["fc"].kind == "graph_output"


def test_int8_plan_gives_output_quantizers_where_routes_stop():
    q, _ = _q(RouteNet().eval())
    layers = quantized_layers(q)
    with_out = {n for n, ql in layers.items() if ql.out_scale is not None}
    assert with_out == {"b", "c", "d", "fc"}  # fc: the graph output, requantized (QGemm)
    # c reads b's quantized output beside the Add: one quantizer for that tensor, unsigned
    assert (
        layers["c"].act_scale == layers["b"].out_scale and layers["b"].out_grid.kind == "unsigned"
    )
    # b's input comes through a ReLU6: its scale is capped so the grid ends at 6
    b = layers["b"]
    assert float(b.act_scale) * b.a_grid.qmax <= 6.0


def test_int4_target_adds_no_output_quantizer():
    q, _ = _q(RouteNet().eval(), target="int4")
    assert all(ql.out_scale is None for ql in quantized_layers(q).values())


def _const_graph():
    """x -> Pad(pads from ConstantOfShape/Concat arithmetic, zeros) -> Conv."""
    pads_a = helper.make_node(
        "Constant", [], ["pa"], value=numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64))
    )
    pads_b = helper.make_node(
        "Constant", [], ["pb"], value=numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64))
    )
    cat = helper.make_node("Concat", ["pa", "pb"], ["pads"], axis=0)
    pad = helper.make_node("Pad", ["x", "pads"], ["xp"], mode="constant")
    w = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(4, 2, 3, 3)).astype(np.float32), "w"
    )
    conv = helper.make_node("Conv", ["xp", "w"], ["y"])
    g = helper.make_graph(
        [pads_a, pads_b, cat, pad, conv],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def test_constant_shape_arithmetic_and_pad_fold_into_the_conv():
    ort = pytest.importorskip("onnxruntime")
    m = _const_graph()
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 6)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert fold_constants(m) == 3  # two Constants and the Concat
    assert fold_pads(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Conv"]
    conv = m.graph.node[0]
    assert list(helper.get_attribute_value(conv.attribute[0])) == [1, 1, 1, 1]
    onnx.checker.check_model(m)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
