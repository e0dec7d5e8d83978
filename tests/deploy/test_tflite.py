"""``.tflite`` export (omse.deploy.tflite): TFLite Micro runs what omse writes, bit for bit as
omse's integer simulation computes it; LiteRT runs it too; the file holds INT4 filters where the
plan says 4 bits; a byte budget is met."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import omse
from omse.config import QuantConfig
from omse.errors import ConfigError, UnsupportedLayerError

pytest.importorskip("ai_edge_litert")
pytest.importorskip("tflite_micro")

from omse.deploy.tflite import export_tflite, quantize_tflite, to_tflite  # noqa: E402
from omse.deploy.tflite_sim import litert_run, simulate, tflm_run  # noqa: E402
from omse.tflite_format import read_model  # noqa: E402


class Block(nn.Module):
    """Every op the writer maps: strided SAME and explicit-pad convolutions, depthwise with a
    multiplier, ReLU6 / ReLU fusion, a residual ADD, SiLU (LOGISTIC + MUL), hard-swish, max and
    average pooling, concatenation, global mean, flatten, fully connected, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(16, 8, 1)
        self.branch = nn.Conv2d(8, 8, 5, padding=1)  # not SAME: a PAD, then VALID
        self.mix = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        y = self.pw(F.relu(self.dw(x)))
        x = x + y
        x = F.silu(x)
        b = F.pad(F.hardswish(self.branch(x)), (1, 1, 1, 1))
        x = torch.cat([F.max_pool2d(x, 2), F.avg_pool2d(b, 2)], dim=1)
        x = F.relu(self.mix(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return torch.softmax(self.fc(x), dim=1)


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = Block().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.mul_(2.0)
    calib = torch.randn(32, 3, 16, 16)
    test = torch.randn(8, 3, 16, 16)
    return model, calib, test


@pytest.fixture(scope="module")
def quantized():
    model, calib, test = _model_and_data()
    cfg = QuantConfig(target="tflite", budget=None, extra_mac_budget=0.0)
    qmodel = omse.quantize(model, calib.split(8), cfg)
    return model, qmodel, calib, test


def _name(t) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else t.name


def _runs(data: bytes, xs: np.ndarray):
    sim = np.concatenate([simulate(data, [x[None]])[0] for x in xs])
    tflm = np.concatenate([tflm_run(data, [x[None]])[0] for x in xs])
    return sim, tflm


def test_tflm_equals_the_simulation_bit_for_bit_int8_io(quantized):
    _, qmodel, calib, test = quantized
    out = to_tflite(qmodel, calib[:1], io="int8")
    m = read_model(out.data)
    sg = m.subgraphs[0]
    t_in = sg.tensors[sg.inputs[0]]
    s, z = float(t_in.quantization.scale[0]), int(t_in.quantization.zeroPoint[0])
    xs = np.clip(np.round(test.numpy() / s) + z, -128, 127).astype(np.int8)
    sim, tflm = _runs(out.data, xs)
    assert sim.dtype == np.int8 and sim.shape == (8, 10)
    assert np.array_equal(sim, tflm)


def test_float_io_the_float_models_input_and_close_to_the_torch_simulation(quantized):
    model, qmodel, calib, test = quantized
    out = to_tflite(qmodel, calib[:1])
    sim, tflm = _runs(out.data, test.numpy())
    assert sim.dtype == np.float32 and np.array_equal(sim, tflm)
    with torch.no_grad():
        ref = qmodel(test).numpy()
        fp = model(test).numpy()
    # softmax outputs on a 1/256 grid: the two simulations differ only where a requantization
    # rounds a tie or a fixed-point multiplier's last bit differently
    assert np.abs(sim - ref).max() <= 4 / 256
    assert (sim.argmax(1) == fp.argmax(1)).mean() >= 0.75


def test_int4_filters_where_the_plan_has_4_bits_per_tensor_for_fully_connected(quantized):
    _, qmodel, calib, _ = quantized
    out = to_tflite(qmodel, calib[:1])
    for name in ("stem", "dw", "pw", "branch", "mix", "fc"):
        assert out.layers[name] == "INT4", name
    m = read_model(out.data)
    import ai_edge_litert.schema_py_generated as schema

    tensors = {_name(t): t for t in m.subgraphs[0].tensors}
    assert tensors["stem.weight"].type == schema.TensorType.INT4
    assert len(tensors["stem.weight"].quantization.scale) == 8  # one per output channel
    assert tensors["fc.weight"].type == schema.TensorType.INT4
    assert len(tensors["fc.weight"].quantization.scale) == 1  # TFLM: per-tensor INT4 FC only


def test_litert_runs_the_file_close_to_tflm(quantized):
    _, qmodel, calib, test = quantized
    out = to_tflite(qmodel, calib[:1], io="int8")
    m = read_model(out.data)
    sg = m.subgraphs[0]
    q = sg.tensors[sg.inputs[0]].quantization
    xs = np.clip(np.round(test.numpy() / q.scale[0]) + q.zeroPoint[0], -128, 127).astype(np.int8)
    _, tflm = _runs(out.data, xs)
    # LiteRT's default kernels round some requantizations once where TFLM rounds twice (a step
    # per layer at most); its reference kernels have no INT4 depthwise kernel
    lite = litert_run(out.data, [xs])[0]
    assert np.abs(lite.astype(int) - tflm).max() <= 8
    assert (lite.argmax(1) == tflm.argmax(1)).mean() >= 0.75


def test_nhwc_input_layout(quantized):
    _, qmodel, calib, test = quantized
    a = to_tflite(qmodel, calib[:1])
    b = to_tflite(qmodel, calib[:1], input_layout="nhwc")
    x = test[:2].numpy()
    ya = np.concatenate([simulate(a.data, [v[None]])[0] for v in x])
    yb = np.concatenate([simulate(b.data, [v[None].transpose(0, 2, 3, 1)])[0] for v in x])
    assert np.array_equal(ya, yb)
    assert b.bytes < a.bytes  # no TRANSPOSE op in front


def test_residual_layers_merge_into_one_int8_filter():
    model, calib, test = _model_and_data(1)
    cfg = QuantConfig(target="tflite", budget=None, extra_mac_budget=0.5)
    qmodel = omse.quantize(model, calib.split(8), cfg)
    merged = [n for n, q in omse.quantized_layers(qmodel).items() if q.n_terms > 1]
    assert merged, "the budget gave no layer a residual term"
    out = to_tflite(qmodel, calib[:1], io="int8")
    for n in merged:
        assert out.layers[n] == "INT8"
    xs = np.random.default_rng(0).integers(-128, 128, (3, 1, 3, 16, 16)).astype(np.int8)
    for x in xs:
        assert np.array_equal(simulate(out.data, [x])[0], tflm_run(out.data, [x])[0])


def test_written_atomically_and_not_over_an_existing_file(quantized, tmp_path):
    _, qmodel, calib, _ = quantized
    p = tmp_path / "m.tflite"
    out = export_tflite(qmodel, calib[:1], p)
    assert p.read_bytes() == out.data
    with pytest.raises(omse.OmseError, match="exists"):
        export_tflite(qmodel, calib[:1], p)


def test_refusals(quantized):
    model, qmodel, calib, _ = quantized
    q4 = omse.quantize(model, calib.split(8), QuantConfig.preset("fast"))
    with pytest.raises(ConfigError, match="target='tflite'"):
        to_tflite(q4, calib[:1])
    with pytest.raises(ConfigError, match="act_bits"):
        QuantConfig(target="tflite", act_bits=4)
    with pytest.raises(ConfigError, match="io="):
        to_tflite(qmodel, calib[:1], io="uint8")

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Conv2d(4, 8, 3, groups=2)

        def forward(self, x):
            return self.g(x)

    g = omse.quantize(
        Grouped().eval(), [torch.randn(4, 4, 8, 8)], QuantConfig(target="tflite", budget=None)
    )
    with pytest.raises(UnsupportedLayerError, match="'g'.*grouped"):
        to_tflite(g, torch.randn(1, 4, 8, 8))


def test_a_file_budget_is_met():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    calib = torch.randn(16, 3, 12, 12)
    cfg = QuantConfig(target="tflite", extra_mac_budget=0.0)
    qmodel, out, fb = quantize_tflite(model, calib.split(8), cfg, max_bytes="0.6x")
    assert fb is not None and fb.max_bytes == int(0.6 * fb.int8_bytes)
    assert out.bytes <= fb.max_bytes * 1.02
    kinds = out.filter_types()
    assert kinds.get("INT4", 0) >= 1 and kinds.get("INT8", 0) >= 1
    with pytest.raises(ConfigError, match="leaves nothing"):
        quantize_tflite(model, calib.split(8), cfg, max_bytes=100)


def test_linear_layers_get_one_scale_at_4_bits_and_a_warning_names_them(quantized):
    model, _, calib, _ = quantized
    cfg = QuantConfig(target="tflite", budget=None)
    with pytest.warns(UserWarning, match=r"1 Linear layer\(s\) get one weight scale per tensor"):
        q = omse.quantize(model, calib.split(8), cfg)
    assert q.fc.cfg.granularity == omse.PerTensor()
    cfg = QuantConfig(target="tflite", budget=None, overrides={"fc": {"weight_bits": 8}})
    q8 = omse.quantize(model, calib.split(8), cfg)  # 8 bits: per channel, an INT8 filter
    assert q8.fc.cfg.granularity == omse.PerChannel(0)
    assert to_tflite(q8, calib[:1]).layers["fc"] == "INT8"


DATA = Path(
    os.environ.get("OMSE_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
)


def test_mlperf_tiny_float_tflite_round_trip():
    path = DATA / "mlperf-tiny" / "image_classification" / "pretrainedResnet.tflite"
    if not path.is_file():
        pytest.skip(f"needs the MLPerf Tiny models in {DATA} (see ../shared/data/README.md)")
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(8, 32, 32, 3, generator=g) * 255 for _ in range(2)]
    q = omse.quantize(str(path), calib, QuantConfig.preset("fast", target="tflite"))
    out = to_tflite(q, calib[0][:1], io="int8")
    assert out.filter_types() == {"INT4": 10}  # nine convolutions, one dense layer (per tensor)
    xs = np.random.default_rng(0).integers(-128, 128, (4, 1, 32, 32, 3)).astype(np.int8)
    for x in xs:
        assert np.array_equal(simulate(out.data, [x])[0], tflm_run(out.data, [x])[0])
