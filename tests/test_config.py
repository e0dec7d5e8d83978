"""Typed configuration: validation errors name the field; per-layer overrides by name and pattern."""

import pytest

from omse.config import LayerConfig, QuantConfig
from omse.core.granularity import PerChannel, PerGroup, PerTensor
from omse.core.ranges import ACIQ, MMSE, MinMax, Percentile
from omse.errors import ConfigError


def test_defaults_are_w4a8_kernelwise_mmse():
    c = QuantConfig()
    assert (c.weight_bits, c.act_bits, c.weight_method, c.act_method) == (4, 8, MMSE(), MMSE())
    assert c.granularity == PerChannel(0)
    lc = c.for_layer("anything")
    assert lc == LayerConfig()


def test_defaults_are_the_recipe_residuals_at_10pc_and_bias_correction():
    c = QuantConfig()
    assert (c.extra_mac_budget, c.bias_correction, c.rounding) == (0.10, True, "nearest")
    assert (c.equalize, c.target, c.max_terms, c.residual_criterion) == (
        False,
        "int4",
        2,
        "output",
    )


def test_presets():
    fast = QuantConfig.preset("fast")
    assert (fast.extra_mac_budget, fast.bias_correction, fast.rounding) == (0.0, False, "nearest")
    assert QuantConfig.preset("default") == QuantConfig()
    assert QuantConfig.preset("best") == QuantConfig(rounding="learned")
    # every other field is the dataclass default
    assert QuantConfig.preset("fast") == QuantConfig(
        extra_mac_budget=0.0, bias_correction=False, budget=None
    )
    # overrides win over the preset, and are validated like any field
    c = QuantConfig.preset("fast", act_bits=4, bias_correction=True)
    assert (c.act_bits, c.bias_correction, c.extra_mac_budget) == (4, True, 0.0)
    assert QuantConfig.preset("best", rounding="gptq").rounding == "gptq"
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


@pytest.mark.parametrize("budget", [0, 0.0, 0.25, 1, 2.0])
def test_budget_inside_range(budget):
    assert QuantConfig(extra_mac_budget=budget).extra_mac_budget == budget


@pytest.mark.parametrize("bits", range(2, 9))
def test_all_supported_bits(bits):
    c = QuantConfig(weight_bits=bits, act_bits=bits)
    assert c.for_layer("x").weight_bits == bits
    assert QuantConfig(act_bits=None).for_layer("x").act_bits is None


def test_granularity_accepts_objects_and_strings():
    assert QuantConfig(granularity="per_tensor").granularity == PerTensor()
    assert QuantConfig(granularity=PerGroup(8)).granularity == PerGroup(8)


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
    assert d["granularity"] == "per_group4" and d["skip"] == ["b"]
    c2 = QuantConfig.from_dict(d)
    assert c2 == c
    assert c2.for_layer("ab") == c.for_layer("ab")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown QuantConfig fields \['bits'\]"):
        QuantConfig.from_dict({"bits": 4})


def test_layer_config_validates_itself():
    with pytest.raises(ConfigError, match="weight_bits"):
        LayerConfig(weight_bits=10)
    with pytest.raises(ConfigError, match="act_grid"):
        LayerConfig(act_grid="unsigned")
    assert LayerConfig(granularity="per_tensor").granularity == PerTensor()


def test_range_methods_are_objects_parsed_at_the_edge():
    c = QuantConfig(weight_method=Percentile(99.9), act_method="aciq")
    assert c.weight_method == Percentile(99.9) and c.act_method == ACIQ()
    assert c.base_layer().weight_method == Percentile(99.9)
    d = c.to_dict()
    assert d["version"] == 4
    assert d["weight_method"] == {"name": "percentile", "percentile": 99.9}
    assert d["act_method"] == "aciq"
    assert QuantConfig.from_dict(d) == c
    lap = QuantConfig(act_method=ACIQ("laplace"))
    assert QuantConfig.from_dict(lap.to_dict()).act_method == ACIQ("laplace")


def test_version_1_dicts_still_load():
    """Before version 2 configs had a ``seed`` field nothing read, and no version key."""
    old = QuantConfig.preset("fast").to_dict()
    old.pop("version")
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
    full = {**QuantConfig(extra_mac_budget=0.25).to_dict(), "version": 2}
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
