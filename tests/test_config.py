"""Typed configuration: validation errors name the field; per-layer overrides by name and pattern;
the parts of config version 5, the flat keywords and the dicts of versions 1-4."""

import dataclasses
import json
from pathlib import Path

import pytest

from omse.config import (
    FLAT_FIELDS,
    GPTQ,
    ActQuant,
    Budget,
    LayerConfig,
    LearnedRounding,
    Nearest,
    QuantConfig,
    Residuals,
    WeightQuant,
)
from omse.core.granularity import PerChannel, PerGroup, PerTensor
from omse.core.ranges import ACIQ, MMSE, MinMax, Percentile
from omse.errors import ConfigError

DATA = Path(__file__).parent / "data"


def test_at_most_15_top_level_fields_each_documented_once():
    names = [f.name for f in dataclasses.fields(QuantConfig)]
    assert len(names) <= 15
    doc = QuantConfig.__doc__
    for name in names:
        assert doc.count(f"\n        {name}:") == 1, name


def test_defaults_are_w4a8_kernelwise_mmse():
    c = QuantConfig()
    assert c.weights == WeightQuant(4, MMSE(), PerChannel(0), "full", "float16")
    assert c.activations == ActQuant(8, MMSE(), "auto", 4096)
    lc = c.for_layer("anything")
    assert lc == LayerConfig()


def test_defaults_are_the_recipe_residuals_at_10pc_and_bias_correction():
    c = QuantConfig()
    assert (c.residuals, c.bias_correction, c.rounding) == (Residuals(0.10), True, Nearest())
    assert c.residuals == Residuals(extra_mac_budget=0.10, criterion="output", max_terms=2)
    assert (c.equalize, c.target, c.budget, c.strict) == (False, "int4", Budget(0.6), False)


def test_presets():
    fast = QuantConfig.preset("fast")
    assert (fast.residuals, fast.bias_correction, fast.rounding) == (None, False, Nearest())
    assert QuantConfig.preset("default") == QuantConfig()
    assert QuantConfig.preset("best") == QuantConfig(rounding="learned")
    assert QuantConfig.preset("best").rounding == LearnedRounding()
    # every other field is the default
    assert QuantConfig.preset("fast") == QuantConfig(
        extra_mac_budget=0.0, bias_correction=False, budget=None
    )
    assert QuantConfig.preset("fast") == QuantConfig(
        residuals=None, bias_correction=False, budget=None
    )
    # overrides win over the preset, and are validated like any field
    c = QuantConfig.preset("fast", act_bits=4, bias_correction=True)
    assert (c.activations.bits, c.bias_correction, c.residuals) == (4, True, None)
    assert QuantConfig.preset("best", rounding="gptq").rounding == GPTQ()
    # flat names of the README/docs set the parts of the preset
    assert QuantConfig.preset("best", rounding_iters=50).rounding == LearnedRounding(iters=50)
    assert QuantConfig.preset("fast", extra_mac_budget=0.2).residuals == Residuals(0.2)
    assert QuantConfig.preset("best", rounding=LearnedRounding(scope="block")).rounding.scope == (
        "block"
    )
    with pytest.raises(ConfigError, match=r"unknown preset 'quick'.*'fast', 'default', 'best'"):
        QuantConfig.preset("quick")
    with pytest.raises(ConfigError, match="weight_bits=9"):
        QuantConfig.preset("fast", weight_bits=9)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": None}, "weight_bits"),
        ({"weight_bits": 4.0}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"act_bits": 0}, "act_bits"),
        ({"act_bits": 16}, "act_bits"),
        ({"act_bits": "8"}, "act_bits"),
        ({"weight_method": "l2"}, "weight_method"),
        ({"act_method": "kl"}, "act_method"),
        ({"granularity": "per_row"}, "granularity"),
        ({"granularity": "per_group0"}, "granularity"),
        ({"weight_grid": "unsigned"}, "weight_grid"),
        ({"act_grid": "asym"}, "act_grid"),
        ({"extra_mac_budget": -0.01}, "extra_mac_budget"),
        ({"extra_mac_budget": 2.5}, "extra_mac_budget"),
        ({"extra_mac_budget": float("nan")}, "extra_mac_budget"),
        ({"extra_mac_budget": "1"}, "extra_mac_budget"),
        ({"extra_mac_budget": True}, "extra_mac_budget"),
        ({"residual_criterion": "hessian"}, "residual_criterion"),
        ({"max_terms": 0}, "max_terms"),
        ({"max_terms": 5}, "max_terms"),
        ({"act_bins": 100}, "act_bins"),
        ({"act_bins": 4098}, "act_bins"),
        ({"act_bins": 3072}, "act_bins"),
        ({"act_bins": 1024.0}, "act_bins"),
        ({"strict": "yes"}, "strict"),
        ({"bias_correction": 1}, "bias_correction"),
        ({"weight_method": {"name": "percentile", "percentile": 120}}, "weight_method"),
        ({"skip": [3]}, "skip"),
        ({"overrides": ["conv"]}, "overrides"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**kwargs)


@pytest.mark.parametrize("budget", [0.01, 0.25, 1, 2.0])
def test_budget_inside_range(budget):
    assert QuantConfig(extra_mac_budget=budget).residuals.extra_mac_budget == budget
    assert Residuals(budget).extra_mac_budget == budget


@pytest.mark.parametrize("budget", [0, 0.0])
def test_a_zero_budget_is_no_residuals(budget):
    assert QuantConfig(extra_mac_budget=budget).residuals is None
    with pytest.raises(ConfigError, match="residuals=None for none"):
        Residuals(budget)


@pytest.mark.parametrize("bits", range(2, 9))
def test_all_supported_bits(bits):
    c = QuantConfig(weight_bits=bits, act_bits=bits)
    assert c.for_layer("x").weight_bits == bits
    assert c == QuantConfig(weights=WeightQuant(bits), activations=ActQuant(bits))
    assert QuantConfig(act_bits=None).for_layer("x").act_bits is None


def test_granularity_accepts_objects_and_strings():
    assert QuantConfig(granularity="per_tensor").weights.granularity == PerTensor()
    assert QuantConfig(granularity=PerGroup(8)).weights.granularity == PerGroup(8)
    assert WeightQuant(granularity="per_group8").granularity == PerGroup(8)


def test_override_by_exact_name():
    c = QuantConfig(overrides={"features.0": {"weight_bits": 8, "act_bits": None}})
    assert c.for_layer("features.0").weight_bits == 8
    assert c.for_layer("features.0").act_bits is None
    assert c.for_layer("features.01").weight_bits == 4
    assert c.for_layer("features.0.conv").weight_bits == 4


def test_override_by_pattern_first_match_wins():
    c = QuantConfig(
        overrides={
            "blocks.*.dw": {"granularity": "per_tensor"},
            "blocks.1*": {"weight_bits": 8},
            "blocks.*": {"weight_bits": 3, "weight_method": "minmax"},
        }
    )
    assert c.for_layer("blocks.3.dw").granularity == PerTensor()
    assert c.for_layer("blocks.3.dw").weight_bits == 4  # first match only, no merging
    assert c.for_layer("blocks.12.pw").weight_bits == 8
    assert c.for_layer("blocks.2.pw").weight_bits == 3
    assert c.for_layer("blocks.2.pw").weight_method == MinMax()
    assert c.for_layer("head").weight_bits == 4


def test_override_values_validated_and_name_the_pattern():
    with pytest.raises(ConfigError, match=r"override for 'conv\*'.*weight_bits=12"):
        QuantConfig(overrides={"conv*": {"weight_bits": 12}})
    with pytest.raises(ConfigError, match="residual_terms"):  # a retired field: unknown now
        QuantConfig(overrides={"conv": {"residual_terms": 1}})


def test_unknown_override_fields_rejected():
    with pytest.raises(ConfigError, match=r"unknown fields \['wbits'\]"):
        QuantConfig(overrides={"conv": {"wbits": 8}})
    with pytest.raises(ConfigError, match="must be a dict"):
        QuantConfig(overrides={"conv": 8})
    with pytest.raises(ConfigError, match="override key"):
        QuantConfig(overrides={3: {"weight_bits": 8}})


def test_skip_patterns_and_single_string():
    c = QuantConfig(skip=["head", "blocks.*.se*"])
    assert c.skip == ("head", "blocks.*.se*")
    assert c.is_skipped("head") and c.is_skipped("blocks.2.se_reduce")
    assert not c.is_skipped("blocks.2.conv")
    assert QuantConfig(skip="head").skip == ("head",)  # one pattern, not its characters


def test_unmatched_patterns():
    c = QuantConfig(overrides={"conv1": {"weight_bits": 8}, "fc*": {}}, skip=("nothere",))
    assert c.unmatched_patterns(["conv1", "fc2"]) == ["nothere"]


def test_dict_round_trip():
    c = QuantConfig(
        weight_bits=3,
        act_bits=None,
        granularity="per_group4",
        overrides={"a*": {"granularity": "per_tensor", "weight_bits": 8}},
        skip=("b",),
        extra_mac_budget=0.5,
    )
    d = c.to_dict()
    assert d["weights"]["granularity"] == "per_group4" and d["skip"] == ["b"]
    c2 = QuantConfig.from_dict(d)
    assert c2 == c
    assert c2.for_layer("ab") == c.for_layer("ab")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown QuantConfig fields \['bits'\]"):
        QuantConfig.from_dict({"bits": 4})
    with pytest.raises(ConfigError, match=r"weights: unknown fields \['wbits'\]"):
        QuantConfig.from_dict({"version": 5, "weights": {"wbits": 4}})


def test_layer_config_validates_itself():
    with pytest.raises(ConfigError, match="weight_bits"):
        LayerConfig(weight_bits=10)
    with pytest.raises(ConfigError, match="act_grid"):
        LayerConfig(act_grid="unsigned")
    assert LayerConfig(granularity="per_tensor").granularity == PerTensor()


def test_range_methods_are_objects_parsed_at_the_edge():
    c = QuantConfig(weight_method=Percentile(99.9), act_method="aciq")
    assert c.weights.method == Percentile(99.9) and c.activations.method == ACIQ()
    assert c.base_layer().weight_method == Percentile(99.9)
    d = c.to_dict()
    assert d["version"] == 5
    assert d["weights"]["method"] == {"name": "percentile", "percentile": 99.9}
    assert d["activations"]["method"] == "aciq"
    assert QuantConfig.from_dict(d) == c
    lap = QuantConfig(act_method=ACIQ("laplace"))
    assert QuantConfig.from_dict(lap.to_dict()).activations.method == ACIQ("laplace")


def _v4(name: str) -> dict:
    """A version-4 dict as QuantConfig.to_dict wrote it (tests/data/config_v4.json)."""
    return json.loads((DATA / "config_v4.json").read_text())[name]


def test_version_1_dicts_still_load():
    """Before version 2 configs had a ``seed`` field nothing read, and no version key."""
    old = _v4("default")
    old.pop("version")
    old.update(extra_mac_budget=0.0, bias_correction=False, budget=None)  # the fast recipe
    old["seed"] = 0
    assert QuantConfig.from_dict(old) == QuantConfig.preset("fast")
    for k in ("extra_mac_budget", "bias_correction"):
        old.pop(k)
    assert QuantConfig.from_dict(old) == QuantConfig.preset("fast")  # version 1's defaults
    with pytest.raises(ConfigError, match="version 99 is not one omse reads"):
        QuantConfig.from_dict({**QuantConfig().to_dict(), "version": 99})


def test_version_2_dicts_keep_their_old_meaning():
    """Version 3 changed the defaults (residuals at 10% + bias correction): a version-2 dict
    without those fields means version 2's defaults, plain MMSE; with them, what it says."""
    assert QuantConfig.from_dict({"version": 2}) == QuantConfig.preset("fast")
    assert QuantConfig.from_dict({"version": 2, "act_bits": 4}) == QuantConfig.preset(
        "fast", act_bits=4
    )
    full = {**_v4("default"), "extra_mac_budget": 0.25, "version": 2}
    assert QuantConfig.from_dict(full) == QuantConfig(extra_mac_budget=0.25)
    # version 3: a missing field is that version's default (one weight width, no budget)
    assert QuantConfig.from_dict({"version": 3}) == QuantConfig(budget=None)
    assert QuantConfig.from_dict({"version": 3, "rounding": "learned"}) == QuantConfig.preset(
        "best", budget=None
    )
    # version 4: the default recipe with per-layer precision
    assert QuantConfig.from_dict({"version": 4}) == QuantConfig()


def test_affine_act_grid_is_accepted_and_round_trips():
    cfg = QuantConfig(act_grid="affine", overrides={"fc": {"act_grid": "full"}})
    assert cfg.for_layer("conv").act_grid == "affine" and cfg.for_layer("fc").act_grid == "full"
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_version_4_dicts_load_unchanged():
    """Dicts QuantConfig.to_dict wrote at version 4 (flat fields), saved before version 5."""
    assert QuantConfig.from_dict(_v4("default")) == QuantConfig()
    c = QuantConfig.from_dict(_v4("learned_block_int8"))
    assert c.weights == WeightQuant(4, Percentile(), PerGroup(32), "full", "float32")
    assert c.activations == ActQuant(8, MinMax(), "auto", 2048)
    assert c.rounding == LearnedRounding(iters=200, scope="block", blocks=("a.*",), learn_act=True)
    assert c.residuals == Residuals(0.2, "network", 2)
    assert (c.budget, c.target, c.skip, c.equalize) == (Budget(1_000_000), "int8", ("head",), True)
    assert c.for_layer("x") == LayerConfig(
        8, None, Percentile(), MinMax(), PerGroup(32), scale_dtype="float32", target="int8"
    )
    g = QuantConfig.from_dict(_v4("gptq_fast"))  # output_aware=True: GPTQ rounding
    assert g == QuantConfig(
        weights=WeightQuant(3),
        activations=ActQuant(None),
        rounding=GPTQ(),
        residuals=None,
        budget=None,
        bias_correction=False,
    )
    for name in ("default", "learned_block_int8", "gptq_fast"):  # and back, at version 5
        c = QuantConfig.from_dict(_v4(name))
        assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_version_4_checkpoint_loads_and_computes_what_it_did():
    """A checkpoint saved at config version 4 (tests/data) loads; its config, read back,
    quantizes the same model to the same outputs."""
    import warnings

    import torch
    from nets import tiny_batches, tiny_net
    from safetensors.torch import load_file

    from omse.deploy import checkpoint
    from omse.transforms.pipeline import quantize

    path = DATA / "tinynet_config_v4.omse.safetensors"
    io = load_file(DATA / "tinynet_config_v4.io.safetensors")
    assert checkpoint.read_header(path)["config"]["version"] == 4
    q = checkpoint.load(path, model=tiny_net(0))
    assert q.omse_config == QuantConfig(overrides={"dw": {"weight_bits": 8}})
    with torch.no_grad():
        torch.testing.assert_close(q(io["x"]), io["y"], rtol=1e-5, atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again = quantize(tiny_net(0), tiny_batches(), q.omse_config)
        torch.testing.assert_close(again(io["x"]), io["y"], rtol=1e-4, atol=1e-5)


def test_version_5_dict_round_trip():
    c = QuantConfig(
        weights=WeightQuant(3, Percentile(99.9), "per_group16", "narrow", "bfloat16"),
        activations=ActQuant(None, ACIQ("laplace"), "affine", 1024),
        rounding=LearnedRounding(iters=7, scope="block", blocks=("b.*",), terms="all"),
        residuals=Residuals(0.3, "weight", 3),
        budget=Budget(0.5, guard_db=None),
        overrides={"a*": {"granularity": "per_tensor", "act_method": "minmax"}},
        skip=("head",),
        bias_correction=False,
        equalize=True,
        strict=True,
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert d["version"] == 5
    assert set(d) == {"version"} | {f.name for f in dataclasses.fields(QuantConfig)}
    assert d["weights"] == {
        "bits": 3,
        "method": {"name": "percentile", "percentile": 99.9},
        "granularity": "per_group16",
        "grid": "narrow",
        "scale_dtype": "bfloat16",
    }
    assert d["rounding"]["name"] == "learned" and d["rounding"]["blocks"] == ["b.*"]
    assert d["residuals"] == {"extra_mac_budget": 0.3, "criterion": "weight", "max_terms": 3}
    assert QuantConfig.from_dict(d) == c
    plain = QuantConfig.preset("fast", rounding="gptq").to_dict()
    assert (plain["rounding"], plain["residuals"], plain["budget"]) == ("gptq", None, None)
    assert QuantConfig.from_dict(plain) == QuantConfig.preset("fast", rounding="gptq")
    assert QuantConfig.preset("best").to_dict()["rounding"] == "learned"  # defaults: the name
    assert QuantConfig.from_dict({"version": 5}) == QuantConfig()


def test_parts_parse_names_and_dicts_at_the_edge():
    c = QuantConfig(
        weights={"bits": 3, "method": "minmax"},
        activations={"grid": "full"},
        rounding={"name": "learned", "iters": 9},
        residuals={"criterion": "weight"},
        budget="50%",
    )
    assert c.weights == WeightQuant(3, MinMax()) and c.activations == ActQuant(grid="full")
    assert c.rounding == LearnedRounding(iters=9) and c.residuals == Residuals(criterion="weight")
    assert c.budget == Budget(0.5)
    for kw, msg in [
        ({"rounding": "adaround"}, "rounding='adaround'"),
        ({"rounding": {"name": "learned", "iterations": 9}}, "unknown fields"),
        ({"weights": 4}, "weights=4: use a WeightQuant"),
        ({"residuals": 0.1}, "residuals=0.1: use a Residuals"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            QuantConfig(**kw)


FLAT = {
    "weight_bits": 3,
    "weight_method": MinMax(),
    "granularity": PerTensor(),
    "weight_grid": "narrow",
    "scale_dtype": "float32",
    "act_bits": 6,
    "act_method": ACIQ(),
    "act_grid": "affine",
    "act_bins": 1024,
    "extra_mac_budget": 0.3,
    "residual_criterion": "network",
    "max_terms": 3,
    "rounding_iters": 11,
    "rounding_lr": 0.5,
    "rounding_reg": 0.2,
    "rounding_scope": "block",
    "rounding_blocks": ("x.*",),
    "rounding_batch": 4,
    "rounding_act_loop": False,
    "rounding_drop": 0.25,
    "rounding_learn_act": False,
    "rounding_learn_scales": True,
    "rounding_terms": "all",
    "rounding_seed": 3,
}


@pytest.mark.parametrize("flat", sorted(FLAT))
def test_every_flat_keyword_sets_its_part(flat):
    assert set(FLAT) == set(FLAT_FIELDS)
    part, name = FLAT_FIELDS[flat]
    c = QuantConfig(rounding="learned", **{flat: FLAT[flat]})
    assert getattr(getattr(c, part), name) == FLAT[flat]
    base = QuantConfig(rounding="learned")
    assert c == dataclasses.replace(
        base, **{part: dataclasses.replace(getattr(base, part), **{name: FLAT[flat]})}
    )
    assert dataclasses.replace(base, **{flat: FLAT[flat]}) == c  # replace() takes them too


def test_flat_keywords_all_at_once_and_over_the_parts():
    c = QuantConfig(rounding="learned", **FLAT)
    assert c.weights == WeightQuant(3, MinMax(), PerTensor(), "narrow", "float32")
    assert c.activations == ActQuant(6, ACIQ(), "affine", 1024)
    assert c.residuals == Residuals(0.3, "network", 3)
    assert c.rounding == LearnedRounding(11, 0.5, 0.2, "block", ("x.*",), 4, False, 0.25, False,
                                         True, "all", 3)  # fmt: skip
    # a flat keyword applies on top of the part given
    c = QuantConfig(weights=WeightQuant(bits=3, grid="narrow"), weight_bits=5)
    assert c.weights == WeightQuant(bits=5, grid="narrow")
    c = QuantConfig(rounding=LearnedRounding(iters=3, scope="block"), rounding_iters=4)
    assert c.rounding == LearnedRounding(iters=4, scope="block")
    # output_aware=True is GPTQ rounding; it contradicts learned rounding
    assert QuantConfig(output_aware=True).rounding == GPTQ()
    assert QuantConfig(output_aware=False) == QuantConfig()
    with pytest.raises(ConfigError, match="output_aware=True is rounding='gptq'"):
        QuantConfig(output_aware=True, rounding="learned")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['wbits'\\]"):
        QuantConfig(wbits=4)


def test_flat_settings_of_a_part_that_is_off_are_checked_then_unused():
    """As in versions 1-4: rounding_* without learned rounding and residual settings without
    residuals are accepted (every field written out, as tests and scripts do) and do nothing."""
    assert QuantConfig(rounding_iters=200, rounding_scope="block") == QuantConfig()
    assert QuantConfig(extra_mac_budget=0, residual_criterion="network", max_terms=3) == (
        QuantConfig(residuals=None)
    )
    assert QuantConfig.preset("fast", max_terms=1) == QuantConfig.preset("fast")
    with pytest.raises(ConfigError, match="rounding_iters=0"):
        QuantConfig(rounding_iters=0)
    with pytest.raises(ConfigError, match="residual_criterion='hessian'"):
        QuantConfig.preset("fast", residual_criterion="hessian")


def test_parts_are_frozen_and_validate_themselves():
    c = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weights.bits = 3  # type: ignore[misc]
    for make, msg in [
        (lambda: WeightQuant(bits=9), "WeightQuant bits=9"),
        (lambda: WeightQuant(grid="unsigned"), "WeightQuant grid='unsigned'"),
        (lambda: WeightQuant(scale_dtype="float64"), "scale_dtype='float64'"),
        (lambda: ActQuant(bins=1000), "ActQuant bins=1000"),
        (lambda: ActQuant(grid="asym"), "ActQuant grid='asym'"),
        (lambda: Residuals(criterion="hessian"), "criterion='hessian'"),
        (lambda: Residuals(max_terms=5), "max_terms=5"),
        (lambda: LearnedRounding(iters=0), "iters=0"),
        (lambda: LearnedRounding(drop=1.0), "drop=1.0"),
        (lambda: LearnedRounding(learn_act=True, act_loop=False), "act_loop=True"),
        (lambda: LearnedRounding(blocks=("",)), "non-empty"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            make()
    assert LearnedRounding(blocks="a.*").blocks == ("a.*",)


def test_weight_and_act_bits_positionally_as_before():
    assert QuantConfig(4, None, granularity="per_group32") == QuantConfig(
        weights=WeightQuant(4, granularity=PerGroup(32)), activations=ActQuant(None)
    )
    assert QuantConfig(3) == QuantConfig(weight_bits=3)
    assert QuantConfig(4, None, "minmax", "mmse", "per_tensor", "narrow", "full") == QuantConfig(
        weights=WeightQuant(4, MinMax(), PerTensor(), "narrow"),
        activations=ActQuant(None, grid="full"),
    )
    with pytest.raises(TypeError, match="keyword arguments"):
        QuantConfig(4, 8, "mmse", "mmse", "per_channel", "full", "auto", {})
    with pytest.raises(TypeError, match="keyword arguments"):
        QuantConfig(4, weight_bits=3)


def test_with_float_activations_makes_layers_weight_only_at_8_bits():
    """The float fallback's overrides: activations float, weights at 8 bits (or the width the
    layer's own override set, which otherwise still applies), names matched exactly and ahead
    of the other patterns, the width fixed for per-layer precision."""
    cfg = QuantConfig(
        target="int8", overrides={"a*": {"weight_method": "minmax"}, "b": {"weight_bits": 4}}
    )
    fb = cfg.with_float_activations(["a[1]", "b", "c"])
    a, b, c = fb.for_layer("a[1]"), fb.for_layer("b"), fb.for_layer("c")
    assert (a.act_bits, a.weight_bits, a.weight_method.name) == (None, 8, "minmax")
    assert (b.act_bits, b.weight_bits) == (None, 4)
    assert (c.act_bits, c.weight_bits) == (None, 8)
    assert all(fb.sets_weight_bits(n) for n in ("a[1]", "b", "c"))
    assert fb.for_layer("a1").act_bits == 8 and fb.for_layer("a1").weight_method.name == "minmax"
    assert fb.for_layer("x") == cfg.for_layer("x")
    assert cfg.with_float_activations([]) is cfg
    assert QuantConfig.from_dict(fb.to_dict()).for_layer("a[1]") == a
    with pytest.raises(ConfigError, match="target='tflite'"):
        QuantConfig(target="tflite").with_float_activations(["a"])
