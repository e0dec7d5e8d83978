"""Per-layer weight precision under a byte budget (omse.transforms.precision and the pipeline's
``budget``): the knapsack against enumeration of every plan, the linearised output error against
the measured one, the guard on a model made to collapse, and the config's budget type."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import Collapsing
from torch import nn

import omse
from omse.config import Budget, QuantConfig, parse_budget
from omse.errors import ConfigError
from omse.nn.layers import QuantizedLayer, quantized_layers
from omse.transforms.pipeline import Calibration, quantize
from omse.transforms.precision import (
    Choice,
    candidate_cost,
    candidate_weight,
    choose,
    output_errors,
    relative_errors,
    residual_bytes,
    scaled_error,
    weight_bytes,
)
from omse.transforms.sensitivity import network_errors


def _brute(choices: dict[str, list[Choice]], budget: int, share: float = 0.0):
    """The least summed error over every plan within ``budget`` (None if none fits); with
    ``share``, a layer's narrower candidate costs ``1 + share`` times its bytes, rounded up."""
    names = list(choices)
    best = None
    for combo in itertools.product(*(choices[n] for n in names)):
        cost = sum(
            math.ceil(c.bytes * (1 + share)) if c.bits < 8 and share else c.bytes for c in combo
        )
        if cost > budget:
            continue
        err = sum(c.error for c in combo)
        if best is None or err < best[0] - 1e-12:
            best = (err, {n: c.bits for n, c in zip(names, combo, strict=True)})
    return best


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 60), st.integers(0, 60), st.floats(0, 10), st.floats(0, 1)),
        min_size=1,
        max_size=7,
    ),
    st.integers(0, 300),
    st.sampled_from([0.0, 0.1, 0.5]),
)
def test_choose_is_the_exact_optimum_with_one_byte_units(layers, budget, share):
    """Against every plan enumerated; with ``share`` the 4-bit candidates are charged their
    residual kernels' room (``candidate_cost``), the plan's cost within the budget."""
    choices = {
        f"l{i}": [Choice(4, lo, e_hi), Choice(8, lo + extra, e_hi * frac)]
        for i, (lo, extra, e_hi, frac) in enumerate(layers)
    }
    got = choose(choices, budget, resolution=1 << 20, share=share)  # one-byte units: exact
    want = _brute(choices, budget, share)
    if want is None:
        assert got is None
        return
    assert got is not None
    err = sum(c.error for n, cs in choices.items() for c in cs if c.bits == got[n])
    used = sum(
        candidate_cost(c, cs, share) for n, cs in choices.items() for c in cs if c.bits == got[n]
    )
    assert used <= budget
    assert err == pytest.approx(want[0], rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(100, 5000), st.floats(0.01, 5)), min_size=2, max_size=6),
    st.floats(0.3, 1.0),
)
def test_choose_with_coarse_units_never_exceeds_the_budget(layers, frac):
    choices = {
        f"l{i}": [Choice(4, b, e), Choice(8, 2 * b, e / 256)] for i, (b, e) in enumerate(layers)
    }
    total8 = sum(2 * b for b, _ in layers)
    budget = int(frac * total8)
    got = choose(choices, budget, resolution=16)
    if got is None:  # only where rounding each cost up to the unit leaves no room
        unit = math.ceil(budget / 16)
        assert sum(b for b, _ in layers) > budget - unit * (len(layers) + 1)
        return
    used = sum(c.bytes for n, cs in choices.items() for c in cs if c.bits == got[n])
    assert used <= budget


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 3 * 3, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    ).eval()


def _wrapped(model: nn.Module, bits: int = 4) -> tuple[nn.Module, dict[str, QuantizedLayer]]:
    """The model with every Conv/Linear wrapped at ``bits`` bits (activations float)."""
    cfg = QuantConfig(weight_bits=bits, act_bits=None)
    for i, m in enumerate(list(model)):
        if isinstance(m, nn.Conv2d | nn.Linear):
            model[i] = QuantizedLayer(m, str(i), cfg.for_layer(str(i)))
    return model, quantized_layers(model)


def test_knapsack_plan_on_a_small_net_is_the_best_of_every_enumerated_plan():
    """Every plan of a 4-layer net enumerated: the chosen one has the least estimated error of
    those within the budget (one-byte units), and its bytes are the ones the target writes."""
    model, layers = _wrapped(_net())
    choices = {}
    for n, q in layers.items():
        choices[n] = [Choice(b, weight_bytes(q, b, "int4"), float(len(n)) / b) for b in (4, 8)]
    total8 = sum(cs[1].bytes for cs in choices.values())
    for frac in (0.55, 0.6, 0.75, 0.9, 1.0):
        budget = int(frac * total8)
        got = choose(choices, budget, resolution=1 << 22)
        want = _brute(choices, budget)
        assert (got is None) == (want is None)
        if got is not None:
            err = sum(c.error for n, cs in choices.items() for c in cs if c.bits == got[n])
            assert err == pytest.approx(want[0])
    # bytes as written: 4-bit codes packed for int4, one byte for int8; fp16 scales, int32 bias
    q = layers["2"]  # Conv2d(8, 16, 3): 1152 weights, 16 kernels, 16 biases
    assert weight_bytes(q, 4, "int4") == 576 + 32 + 64
    assert weight_bytes(q, 8, "int4") == 1152 + 32 + 64
    assert weight_bytes(q, 4, "int8") == weight_bytes(q, 8, "int8")


def test_linearised_error_equals_the_measured_one_on_a_linear_network():
    """With nothing nonlinear after a layer, ``||J dy||^2`` is exact: the probe estimate agrees
    with the measured output error (network_errors) within its sampling error."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 6)).eval()
    model, layers = _wrapped(
        nn.Sequential(*[m for m in model]),  # same modules
        bits=3,
    )
    batches = [torch.randn(32, 16) for _ in range(4)]
    cands = {n: {3: q.dequantized_weight()} for n, q in layers.items()}
    est, energy = output_errors(model, layers, cands, batches, probes=64)
    measured = network_errors(model, layers, batches)
    assert energy > 0
    for n in layers:
        assert est[n][3] == pytest.approx(measured[n], rel=0.15), n
    # the flags are restored: the layers compute with their quantized weights again
    assert all(q.quant_enabled for q in layers.values())


def test_centered_error_is_what_bias_correction_leaves_on_a_linear_network():
    """``centered=True``: the estimate equals the measured output error of each layer quantized
    with its mean output shift added back to its bias (one batch: its mean is the calibration
    mean), and is below the plain estimate when the inputs have a mean."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 6)).eval()
    x = torch.randn(64, 16) + 1.5  # inputs with a mean: the weight error shifts every output
    with torch.no_grad():
        ref, inputs, h = net(x), [], x
        for m in net:
            inputs.append(h)
            h = m(h)
    model, layers = _wrapped(copy.deepcopy(net), bits=3)
    cands = {n: {3: q.dequantized_weight()} for n, q in layers.items()}
    plain, _ = output_errors(model, layers, cands, [x], probes=256)
    cent, _ = output_errors(model, layers, cands, [x], probes=256, centered=True)
    for i, n in enumerate(layers):
        corrected = copy.deepcopy(net)
        lin = corrected[i]
        with torch.no_grad():
            dw = cands[n][3] - lin.weight
            lin.weight += dw
            lin.bias -= dw @ inputs[i].mean(0)  # bias correction of this batch's mean
            measured = float(((corrected(x) - ref) ** 2).sum() / (ref**2).sum())
        assert cent[n][3] == pytest.approx(measured, rel=0.15), n
        assert cent[n][3] < plain[n][3], n


def test_linearised_error_ranks_layers_as_the_measured_one_with_relus():
    net = _net(3)
    net[5].weight.data *= 3  # one layer clearly more harmful than the others
    model, layers = _wrapped(net)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    cands = {n: {4: q.dequantized_weight(), 8: candidate_weight(q, 8)} for n, q in layers.items()}
    est, _ = output_errors(model, layers, cands, batches, probes=16)
    measured = network_errors(model, layers, batches)
    names = list(layers)
    for a, b in itertools.combinations(names, 2):  # clearly different layers: the same order
        if max(measured[a], measured[b]) > 1.5 * min(measured[a], measured[b]):
            assert (est[a][4] > est[b][4]) == (measured[a] > measured[b]), (a, b)
    for n in names:  # 8 bits: about 256x less error than 4 bits
        assert est[n][8] < est[n][4] / 30
        assert est[n][4] == pytest.approx(measured[n], rel=0.3)
        q = layers[n]  # the 8-bit error scaled from the 4-bit one by the weight errors' ratio
        scaled = scaled_error(est[n][4], q.float_weight, cands[n][4], cands[n][8])
        assert est[n][8] / 3 < scaled < 3 * est[n][8]  # the same order of magnitude
        assert est[n][4] - scaled == pytest.approx(est[n][4] - est[n][8], rel=0.01)


def test_output_errors_are_deterministic_and_batch_split_invariant_in_expectation():
    model, layers = _wrapped(_net(5))
    x = torch.randn(32, 3, 8, 8)
    cands = {n: {4: q.dequantized_weight()} for n, q in layers.items()}
    a, _ = output_errors(model, layers, cands, [x], probes=2, seed=7)
    b, _ = output_errors(model, layers, cands, [x], probes=2, seed=7)
    assert a == b


def test_relative_errors_of_the_reference_itself_is_zero():
    model = _net()
    batches = [torch.randn(4, 3, 8, 8)]
    (e,) = relative_errors(batches, model, model)
    assert e == 0.0


def test_the_guard_grows_the_budget_on_a_model_made_to_collapse():
    model = Collapsing().eval()
    batches = [torch.randn(32, 32) for _ in range(4)]
    cal = Calibration()
    with pytest.warns(UserWarning, match=r"budget grows to .* calibration runs again"):
        q = quantize(model, batches, QuantConfig(budget=Budget(0.6, guard_db=3.0)), calibration=cal)
    plan = cal.precision
    assert plan is not None and plan.guard
    assert not plan.guard[0]["passed"] and plan.guard[0]["gap_db"] > 3.0
    # the last round passed the guard, or every layer reached 8 bits (nothing left to measure)
    assert plan.guard[-1]["passed"] or set(plan.bits.values()) == {8}
    assert plan.bytes > plan.guard[0]["bytes"]
    assert quantized_layers(q)["b"].cfg.weight_bits == 8
    assert plan.bits["b"] == 8
    # without the guard the budget holds and the collapse stays
    cal2 = Calibration()
    quantize(model, batches, QuantConfig(budget=Budget(0.6, guard_db=None)), calibration=cal2)
    assert cal2.precision.bytes <= cal2.precision.budget_bytes
    assert not cal2.precision.guard


def test_default_budget_keeps_the_bytes_and_overrides_fix_a_layer():
    model = _net(2)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    cal = Calibration()
    cfg = QuantConfig(budget=Budget(0.7, guard_db=None), overrides={"7": {"weight_bits": 4}})
    q = quantize(model, batches, cfg, calibration=cal)
    plan = cal.precision
    assert plan.bytes <= plan.budget_bytes == int(0.7 * plan.bytes_8bit)
    assert "7" in plan.fixed and plan.bits["7"] == 4
    widths = {n: ql.cfg.weight_bits for n, ql in quantized_layers(q).items()}
    assert widths == plan.bits
    assert set(widths.values()) <= {4, 8}
    assert "at 8-bit" in plan.summary() or "at 4-bit" in plan.summary()


def test_int8_target_takes_8_bit_weights_everywhere_without_a_warning():
    model = _net(4)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    cal = Calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quantize(model, batches, QuantConfig(target="int8"), calibration=cal)
    assert {ql.cfg.weight_bits for ql in quantized_layers(q).values()} == {8}


def test_int8_target_skips_the_estimate_where_4_bits_save_no_byte(monkeypatch):
    """On int8 a 4-bit code takes a byte as an 8-bit one does: every layer at 8 bits without
    the estimate's forward and backward pass, the plan at the 8-bit bytes (its budget raised to
    them, as the knapsack's smallest plan was)."""
    import omse.transforms.pipeline as pipeline

    def no_pass(*_a, **_k):
        raise AssertionError("the estimate ran")

    monkeypatch.setattr(pipeline, "output_errors", no_pass)
    cal = Calibration()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    q = quantize(_net(4), batches, QuantConfig(target="int8"), calibration=cal)
    plan = cal.precision
    assert set(plan.bits.values()) == {8} and not plan.choices and not plan.guard
    assert plan.bytes == plan.bytes_8bit == plan.budget_bytes
    assert {ql.cfg.weight_bits for ql in quantized_layers(q).values()} == {8}
    # an override below 8 bits stays, and is the one layer the plan does not raise
    cal = Calibration()
    cfg = QuantConfig(target="int8", overrides={"7": {"weight_bits": 4}})
    quantize(_net(4), batches, cfg, calibration=cal)
    assert cal.precision.bits["7"] == 4 and set(cal.precision.bits.values()) == {4, 8}


def test_no_budget_is_the_version_3_recipe():
    model = _net(6)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    cal = Calibration()
    q = quantize(model, batches, QuantConfig(budget=None), calibration=cal)
    assert cal.precision is None
    assert {ql.cfg.weight_bits for ql in quantized_layers(q).values()} == {4}


@pytest.mark.parametrize(
    "value, want",
    [
        (0.6, Budget(0.6)),
        ("0.6x", Budget(0.6)),
        ("60%", Budget(0.6)),
        (1, Budget(1.0)),
        (120000, Budget(120000)),
        ("1.5MB", Budget(1_500_000)),
        ("800KiB", Budget(800 * 1024)),
        ("120,000", Budget(120000)),
        ("none", None),
        (None, None),
        ({"weight_bytes": 0.5, "guard_db": None}, Budget(0.5, None)),
    ],
)
def test_parse_budget(value, want):
    assert parse_budget(value) == want
    assert QuantConfig(budget=value).budget == want


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "lots", True, "0x", {"weight_bytes": 2.5}])
def test_bad_budgets_are_refused_by_name(value):
    with pytest.raises(ConfigError, match="budget"):
        QuantConfig(budget=value)


def test_budget_round_trips_and_old_dicts_keep_one_width():
    cfg = QuantConfig(budget=Budget(250_000, guard_db=1.5))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig.from_dict(QuantConfig(budget=None).to_dict()).budget is None
    v3 = {k: v for k, v in QuantConfig().to_dict().items() if k != "budget"}
    v3["version"] = 3
    assert QuantConfig.from_dict(v3).budget is None
    assert QuantConfig.preset("fast").budget is None
    assert QuantConfig().budget == Budget(0.6, 3.0)
    assert math.isclose(Budget(0.6).bytes_for(1000), 600)


def test_the_cli_level_api_reports_the_plan():
    model = _net(8)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    cal = Calibration()
    omse.quantize(model, batches, QuantConfig(budget=Budget(0.8, None)), calibration=cal)
    line = cal.precision.summary()
    assert "bytes" in line and "the 8-bit model" in line and "budget 0.80x" in line


def test_the_report_writes_the_precision_table_and_front(tmp_path):
    model = _net(9)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    q = quantize(model, batches, QuantConfig(budget=Budget(0.75, None)))
    paths = omse.report(q, batches, tmp_path)
    names = [p.name for p in paths]
    assert {"precision.md", "precision.csv", "precision.png"} <= set(names)
    md = (tmp_path / "precision.md").read_text()
    plan = q.omse_precision
    for n, bits in plan.bits.items():
        assert f"| {n} | {bits} |" in md
    rows = (tmp_path / "precision.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(len(cs) for cs in plan.choices.values())
    from omse.analysis.report import precision_front

    front = precision_front(plan)
    errs = [e for _, e in front]
    assert all(
        a >= b - 1e-12 for a, b in zip(errs, errs[1:], strict=False)
    )  # more bytes, less error
    assert (tmp_path / "precision.png").stat().st_size > 1000


def _residual_net() -> tuple[nn.Module, list[torch.Tensor]]:
    """Two convolutions and a Linear layer, big enough for the recipe to buy residual terms,
    and two calibration batches."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    ).eval()  # fmt: skip
    return net, [torch.randn(8, 3, 8, 8) for _ in range(2)]


def test_a_budget_between_the_smallest_plan_and_its_residual_share_keeps_the_rest():
    """A budget the all-4-bit plan fits, but not once each layer is charged its residual share:
    the plan is the all-4-bit one, without a word, and the residual kernels still take what the
    budget leaves of it (as the same widths given through ``overrides`` do); below the plan's
    own bytes the budget warns and becomes them, leaving no residual room."""
    net, batches = _residual_net()
    probe = Calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(net, batches, QuantConfig(budget=Budget(0.2, None)), calibration=probe)
    least, eight = probe.precision.bytes, probe.precision.bytes_8bit
    assert probe.precision.budget_bytes == least and probe.precision.residual_bytes == 0
    share = QuantConfig().residuals.extra_mac_budget
    between = (least + least * share / 2) / eight  # above the plan, below plan * (1 + share)
    cal = Calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "below the smallest plan" warning
        q = quantize(net, batches, QuantConfig(budget=Budget(between, None)), calibration=cal)
    plan = cal.precision
    assert set(plan.bits.values()) == {4} and plan.bytes == least
    assert plan.budget_bytes == Budget(between, None).bytes_for(eight) > least
    assert 0 < plan.residual_bytes <= plan.budget_bytes - plan.bytes
    assert any(ql.n_terms == 2 for ql in quantized_layers(q).values())


@pytest.mark.parametrize("target", ["int4", "int8"])
def test_residual_bytes_are_what_the_onnx_file_adds(tmp_path, target):
    """The plan's ``residual_bytes``: on int4 each residual term is an INT4 tensor of the kernels
    that carry it (their scales counted as the plan counts scales) plus the indices that
    scatter its output back, and the budget holds them: a 4-bit layer is charged its residual
    kernels' share when the widths are chosen, and the residual
    kernels stay within what the widths leave. On int8 the terms are one merged kernel, nothing
    beyond the plan's bytes. The summary says it."""
    import onnx
    from onnx import numpy_helper

    from omse.core.primitives import SCALE_DTYPES
    from omse.transforms.precision import INDEX_BYTES

    net, batches = _residual_net()
    cal = Calibration()
    # on int8 every layer takes 8 bits under a budget (4 bits save no byte there): no budget
    budget = Budget(0.8, None) if target == "int4" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(net, batches, QuantConfig(budget=budget, target=target), calibration=cal)
    layers = quantized_layers(q)
    two = [ql for ql in layers.values() if ql.n_terms == 2]
    assert two, "the recipe bought a residual term"
    if target == "int8":
        assert all(residual_bytes(ql, "int8") == 0 for ql in two)
        return
    plan = cal.precision
    low = [n for n, b in plan.bits.items() if b < 8]
    assert low and plan.residual_share == QuantConfig().residuals.extra_mac_budget
    charged = sum(
        candidate_cost(c, plan.choices[n], plan.residual_share)
        for n in plan.choices
        for c in plan.choices[n]
        if c.bits == plan.bits[n]
    )
    assert plan.bytes - plan.chosen_bytes() + charged <= plan.budget_bytes
    assert 0 < plan.residual_bytes <= plan.budget_bytes - plan.bytes
    path = omse.export_onnx(q, batches[0][:1], tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    per_scale = SCALE_DTYPES[QuantConfig().weights.scale_dtype].itemsize
    expected = 0
    for ql in two:
        codes = inits[f"{ql.name}.w1.w_codes"]
        expected += (codes.size + 1) // 2 + inits[f"{ql.name}.w1.scale"].size * per_scale
        if codes.shape[0] < ql.float_weight.shape[0]:  # cut to its kernels: + the scatter
            expected += INDEX_BYTES * ql.float_weight.shape[0]
    assert plan.residual_bytes == expected
    total = plan.bytes + plan.residual_bytes
    assert f"with the residual tensors {total:,} bytes = {total / plan.bytes_8bit:.2f}x" in (
        plan.summary()
    )
