"""The float fallback (``ActQuant.fallback_db``): the linearised activation error against the
measured one, the fallback firing on a model whose 8-bit activations collapse (and the fallback
measurably restoring it), its layers weight-only (8-bit weights, float activations: in the
simulation, the budget and an int8 ONNX export onnxruntime runs), staying quiet on a
well-conditioned model, and its configuration."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from omse.config import ActQuant, QuantConfig, WeightQuant
from omse.errors import ConfigError
from omse.nn.layers import layer_weight, quantized_layers
from omse.transforms.pipeline import Calibration, quantize
from omse.transforms.precision import activation_errors, relative_errors


def _w8a8(**kw) -> QuantConfig:
    kw.setdefault("weights", WeightQuant(bits=8))
    return QuantConfig(
        target="int8",
        budget=None,
        residuals=None,
        bias_correction=False,
        **kw,
    )


def _measured_activation_errors(model, layers, batches) -> dict[str, float]:
    """Per layer, the measured relative output error with only that layer's activation
    quantizers on (its weights float, every other layer float)."""
    flags = {n: q.quant_enabled for n, q in layers.items()}
    out = {}
    try:
        for q in layers.values():
            q.set_quant_enabled(False)
        for n, q in layers.items():

            def only(batch, q=q):
                q.set_quant_enabled(True)
                q.layer.weight.data = layer_weight(q.layer, q.float_weight)
                try:
                    return model(batch)
                finally:
                    q.set_quant_enabled(False)

            (out[n],) = relative_errors(batches, model, only)
    finally:
        for n, q in layers.items():
            q.set_quant_enabled(flags[n])
    return out


def test_activation_errors_equal_the_measured_ones_on_a_linear_network():
    """Nothing nonlinear after the quantizers: the probe estimate is the measured error within
    its sampling error, for 4-bit activations (large enough to measure)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 6)).eval()
    batches = [torch.randn(32, 16) * torch.linspace(0.1, 3, 16) for _ in range(4)]
    q = quantize(net, batches, QuantConfig(weights=WeightQuant(bits=8), budget=None,
                                           residuals=None, bias_correction=False,
                                           activations=ActQuant(bits=4, fallback_db=None)))  # fmt: skip
    layers = dict(quantized_layers(q))
    est = activation_errors(q, layers, batches, probes=64)
    measured = _measured_activation_errors(q, layers, batches)
    for n in layers:
        assert measured[n] > 1e-4, n  # 4-bit activations: a measurable error
        assert est[n] == pytest.approx(measured[n], rel=0.15), n
    assert all(q.quant_enabled for q in layers.values())  # flags restored


class _Stem(nn.Module):
    """A stem whose output channels span very different ranges, through a SiLU (which no
    equalization crosses), read with equal weight by the next layer: one per-tensor 8-bit step
    sized for the large channel rounds the small channels away (a YOLOX-style stem)."""

    def __init__(self, spread: float):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 64, 3, padding=1)  # most of the MACs
        self.head = nn.Conv2d(64, 4, 3, padding=1)
        with torch.no_grad():
            gain = torch.ones(8)
            gain[0] = spread  # channel 0 huge, the others small
            self.stem.weight.mul_(gain[:, None, None, None])
            self.stem.bias.mul_(gain)
            self.body.weight[:, 0].div_(spread)  # channel 0 weighs no more than the others

    def forward(self, x):
        x = torch.relu(self.body(nn.functional.silu(self.stem(x))))
        return self.head(torch.relu(self.tail(x)))


def _quantize(model, batches, config):
    cal = Calibration()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(model, batches, config, calibration=cal)
    said = [str(w.message) for w in caught if "float fallback" in str(w.message)]
    return q, cal, said


def test_fallback_fires_on_a_collapsing_stem_and_restores_the_output():
    model = _Stem(spread=2000.0).eval()
    torch.manual_seed(1)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    held = [torch.randn(8, 3, 16, 16) for _ in range(2)]  # held out
    q, cal, said = _quantize(model, calib, _w8a8())
    q_off, cal_off, said_off = _quantize(
        model, calib, _w8a8(activations=ActQuant(fallback_db=None))
    )
    assert cal_off.fallback == {} and said_off == []
    # the layers that read or write the mixed tensor get float activations, and say so in one line
    assert set(cal.fallback) & {"stem", "body"}
    assert len(said) == 1 and all(n in said[0] for n in cal.fallback)
    assert "activations stay float, weights at 8 bits" in said[0]
    assert all(db < 20 for db in cal.fallback.values())
    assert not {"tail", "head"} & set(cal.fallback)
    names = dict(quantized_layers(q))
    assert set(names) == {"stem", "body", "tail", "head"}  # weights quantized, every layer
    assert cal.float_weights == []  # nothing float: the fallback's weights are at 8 bits
    (e_on,) = relative_errors(held, model, q)
    (e_off,) = relative_errors(held, model, q_off)
    # measured on held-out inputs: at least 7 dB better (9.7 dB here; with the layers' weights
    # float too it was over 10: body's per-channel 8-bit weights round its channel-0 column,
    # 1/2000 of the others by construction, towards zero)
    assert e_on < e_off / 5


def _stem_fallback(config: QuantConfig):
    """The collapsing stem quantized with ``config``: (model, quantized model, calibration)."""
    model = _Stem(spread=2000.0).eval()
    torch.manual_seed(1)
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    q, cal, _ = _quantize(model, calib, config)
    assert cal.fallback, "the stem's activations collapse: the fallback fires"
    return model, q, cal


def test_fallback_layers_have_8bit_weights_and_float_activations():
    _, q, cal = _stem_fallback(_w8a8())
    layers = dict(quantized_layers(q))
    for n in cal.fallback:
        ql = layers[n]
        x = torch.randn(2, ql.layer.in_channels, 16, 16) * 3  # off any activation grid
        assert ql.cfg.weight_bits == 8 and ql.cfg.act_bits is None, n
        assert ql.act_scale is None and ql.out_scale is None, n  # no quantizer of its own
        w = ql.dequantized_weight()
        assert not torch.equal(w, ql.float_weight), n  # the weights are quantized ...
        codes, step, _ = ql.terms()[0]
        assert int(codes.abs().max()) <= 128 and ql.w_grid.bits >= 7, n  # ... on 8-bit codes
        with torch.no_grad():  # a float input passes through as it is: x * w_q + b
            ref = nn.functional.conv2d(x, w, ql.layer.bias, padding=ql.layer.padding)
            assert torch.allclose(ql(x), ref, atol=1e-5), n
    for n in set(layers) - set(cal.fallback):
        assert layers[n].cfg.act_bits == 8 and layers[n].act_scale is not None, n


def test_fallback_layers_are_fixed_at_8bit_weights_in_the_budget():
    """Per-layer precision (W4A8 under a byte budget): the fallback's layers are no candidates
    for 4 bits and their bytes count at 8 bits."""
    from omse.transforms.precision import weight_bytes

    cfg = QuantConfig(residuals=None, bias_correction=False)  # the default budget, target int4
    _, q, cal = _stem_fallback(cfg)
    plan, layers = cal.precision, dict(quantized_layers(q))
    for n in cal.fallback:
        assert n in plan.fixed and n not in plan.choices, n
        assert plan.bits[n] == 8 and layers[n].cfg.weight_bits == 8, n
    assert plan.bytes == sum(weight_bytes(layers[n], b, "int4") for n, b in plan.bits.items())


def _weight_initializers(path) -> dict[str, int]:
    """Bytes of each initializer of more than 16 values (weights, biases, per-channel scales),
    as ``benchmarks/detection.py`` counts a file's weight bytes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    return {
        t.name: numpy_helper.to_array(t).nbytes
        for t in g.initializer
        if np.prod(t.dims, dtype=int) > 16
    }


def test_fallback_int8_onnx_runs_in_onnxruntime_as_simulated(tmp_path):
    """The int8 export writes each fallback layer as DequantizeLinear(int8 weights) -> float
    Conv (the others stay integer kernels), onnxruntime runs it and agrees with the simulation
    within one output step (the tolerance of ``tests/deploy/test_export_int8.py``), and its
    weights take the bytes of the all-8-bit (fallback off) version's."""
    import collections

    import numpy as np
    import onnx

    ort = pytest.importorskip("onnxruntime")
    from omse.deploy.export import export_onnx

    model, q, cal = _stem_fallback(_w8a8())
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    q_off, cal_off, _ = _quantize(model, calib, _w8a8(activations=ActQuant(fallback_db=None)))
    assert cal_off.fallback == {}
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    path = export_onnx(q, x[:1], tmp_path / "fallback.onnx")
    path_off = export_onnx(q_off, x[:1], tmp_path / "w8a8.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 4 - len(cal.fallback), ops  # the others: integer kernels
    assert ops["Conv"] + ops["FusedConv"] == len(cal.fallback), ops  # float, on int8 weights
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        sim = q(x).numpy()
    step = float(dict(quantized_layers(q))["head"].out_scale)
    assert np.median(np.abs(out - sim).reshape(len(x), -1).max(1)) <= step + 1e-6
    sizes, sizes_off = _weight_initializers(path), _weight_initializers(path_off)
    for n in cal.fallback:
        assert sizes[f"{n}.w0.w_codes"] == sizes_off[f"{n}.w0.w_codes"] > 0, n
    assert sum(sizes.values()) == sum(sizes_off.values())


def test_fallback_stays_quiet_on_a_well_conditioned_model():
    model = _Stem(spread=1.0).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    q, cal, said = _quantize(model, calib, _w8a8())
    assert cal.fallback == {} and said == []
    assert set(dict(quantized_layers(q))) == {"stem", "body", "tail", "head"}


def test_fallback_keeps_within_its_share_of_the_macs():
    model = _Stem(spread=2000.0).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    _, cal, said = _quantize(model, calib, _w8a8(activations=ActQuant(fallback_macs=0.0)))
    assert cal.fallback == {}
    assert len(said) == 1 and "over fallback_macs" in said[0]


def test_no_fallback_for_tflite():
    model = _Stem(spread=2000.0).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    _, cal, said = _quantize(model, calib, QuantConfig(target="tflite", budget=None))
    assert cal.fallback == {} and said == []


@pytest.mark.parametrize(
    "kw",
    [{"fallback_db": -1}, {"fallback_db": True}, {"fallback_macs": 1.5}, {"fallback_macs": -0.1}],
)
def test_fallback_config_is_checked(kw):
    with pytest.raises(ConfigError, match="fallback"):
        ActQuant(**kw)


def test_fallback_config_round_trips():
    cfg = QuantConfig(activations=ActQuant(fallback_db=15.0, fallback_macs=0.1))
    back = QuantConfig.from_dict(cfg.to_dict())
    assert back.activations.fallback_db == 15.0 and back.activations.fallback_macs == 0.1


def test_fallback_model_round_trips_through_a_checkpoint(tmp_path):
    from omse.deploy.checkpoint import load, save

    model, q, cal = _stem_fallback(_w8a8())
    path = save(q, tmp_path / "q.omse.safetensors", model_name=None)
    r = load(path, model=_Stem(spread=2000.0).eval())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), r(x))
    layers = dict(quantized_layers(r))
    assert all(layers[n].cfg.act_bits is None and layers[n].act_scale is None for n in cal.fallback)


class _StemSiLU(_Stem):
    """The collapsing stem with a SiLU after ``tail`` too: its op quantizers stay when the
    fallback takes the stem's."""

    def forward(self, x):
        x = torch.relu(self.body(nn.functional.silu(self.stem(x))))
        return self.head(nn.functional.silu(self.tail(x)))


def test_second_round_reuses_the_first_rounds_activation_statistics(monkeypatch):
    """On 8-bit weights the fallback's layers keep the weights they had, so the second round's
    activation pass would see the same model: it reuses the first's statistics and fits (one
    pass fewer) and gives the model a second pass gives, bit for bit. With 4-bit weights the
    fallback's layers change (to 8 bits), and on the plain stem the op quantizers go with the
    fallback (the pass would compute the SiLU another way): the pass runs again."""
    from omse.nn.ops import op_quantizers
    from omse.transforms import pipeline, statistics

    def run(config, net=_StemSiLU):
        model = net(spread=2000.0).eval()
        torch.manual_seed(1)
        calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
        before = statistics.PASSES[0]
        q, cal, _ = _quantize(model, calib, config)
        assert cal.fallback, "the stem's activations collapse: the fallback fires"
        return q, cal, statistics.PASSES[0] - before

    q, cal, passes = run(_w8a8())
    assert passes == 1  # the first round's; the fallback's estimate is no statistics pass
    with monkeypatch.context() as m:
        m.setattr(pipeline._StatsMemo, "reuse", lambda self, *a: None)
        q2, cal2, passes2 = run(_w8a8())
    assert passes2 == 2 and cal2.fallback == cal.fallback
    s, s2 = q.state_dict(), q2.state_dict()
    assert s.keys() == s2.keys()
    for k, v in s.items():
        assert not torch.is_tensor(v) or torch.equal(v, s2[k]), k
    for n, st in cal.stats.items():  # the statistics themselves, as Calibration reports them
        assert torch.equal(st.counts, cal2.stats[n].counts) and st.sums.equal(cal2.stats[n].sums)
    o, o2 = op_quantizers(q), op_quantizers(q2)
    assert o is not None and o.kinds == o2.kinds and o.scales.keys() == o2.scales.keys()
    assert all(torch.equal(o.scales[k], o2.scales[k]) for k in o.scales)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))
    assert run(_w8a8(weights=WeightQuant(bits=4)))[2] == 2
    assert run(_w8a8(), net=_Stem)[2] == 2


class _Branches(nn.Module):
    """Two branches of very different ranges concatenated and read by one layer: its 8-bit
    input rounds the small branch away, so the fallback takes that layer alone, and in the
    second round the Concat, no longer read by a quantized layer, needs its own quantizer."""

    def __init__(self, spread: float = 300.0):
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Conv2d(3, 8, 3, padding=1)
        self.large = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.large.weight.mul_(spread)
            self.large.bias.mul_(spread)
            self.body.weight[:, 8:].div_(spread)

    def forward(self, x):
        c = torch.cat([nn.functional.silu(self.small(x)), nn.functional.silu(self.large(x))], 1)
        return self.head(nn.functional.silu(self.body(c)))


def test_second_round_bins_only_the_histograms_the_first_did_not_make(monkeypatch):
    """The fallback's second round plans a quantizer the first did not have (the Concat's):
    it reuses the first round's statistics and runs a pass that bins that site alone, and the
    model equals the one two full passes give, bit for bit."""
    from omse.core import stats as core_stats
    from omse.nn.ops import op_quantizers
    from omse.transforms import pipeline, statistics

    updates = []
    update = core_stats.HistogramStats.update

    def counted(self, x, clamp=None):
        updates.append(statistics.PASSES[0])
        return update(self, x, clamp)

    monkeypatch.setattr(core_stats.HistogramStats, "update", counted)

    def run():
        torch.manual_seed(1)
        calib = [torch.randn(4, 3, 16, 16) for _ in range(4)]
        before = statistics.PASSES[0]
        updates.clear()
        q, cal, _ = _quantize(_Branches().eval(), calib, _w8a8())
        assert list(cal.fallback) == ["body"]
        per_pass = [updates.count(p) for p in range(before + 1, statistics.PASSES[0] + 1)]
        return q, cal, per_pass

    q, cal, per_pass = run()
    assert len(per_pass) == 2 and per_pass[1] == 4  # the top-up: one site, four batches
    assert cal.timings["statistics pass"] > 0
    # every round's steps, each ended by the measurement that decided the next
    assert len(cal.rounds) == 2 and cal.rounds[-1] is cal.timings
    assert cal.rounds[0]["fallback"] > 0 and "guard" in cal.rounds[1]
    assert cal.rounds[0]["activations"] > 0 and cal.rounds[1]["activations"] > 0
    with monkeypatch.context() as m:
        m.setattr(pipeline._StatsMemo, "reuse", lambda self, *a: None)
        q2, cal2, per_pass2 = run()
    assert len(per_pass2) == 2 and per_pass2[1] > 4 * 4
    o, o2 = op_quantizers(q), op_quantizers(q2)
    assert o is not None and o.kinds == o2.kinds and o.scales.keys() == o2.scales.keys()
    assert all(torch.equal(o.scales[k], o2.scales[k]) for k in o.scales)
    s, s2 = q.state_dict(), q2.state_dict()
    assert s.keys() == s2.keys()
    for k, v in s.items():
        assert not torch.is_tensor(v) or torch.equal(v, s2[k]), k
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_state_fingerprint_sees_every_parameter_and_buffer():
    import copy

    from omse.transforms.statistics import state_fingerprint

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    fp = state_fingerprint(model)
    assert state_fingerprint(copy.deepcopy(model)) == fp
    other = copy.deepcopy(model)
    with torch.no_grad():  # one ulp of one weight
        w = other[0].weight.view(-1)
        w[5] = torch.nextafter(w[5], torch.tensor(float("inf")))
    assert state_fingerprint(other) != fp
    other = copy.deepcopy(model)
    other[1].running_mean[2] += 1.0  # a buffer
    assert state_fingerprint(other) != fp
    other = copy.deepcopy(model)
    other[0].weight.data = other[0].weight.data.double()  # the same values in another dtype
    assert state_fingerprint(other) != fp
