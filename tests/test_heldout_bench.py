"""benchmarks/heldout.py: recipes from the command line (generic QuantConfig kwargs) and the JSON
merge of the labelled benchmarks (imagenet.py, cifar_resnets.py)."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark

from omse.config import QuantConfig
from omse.errors import ConfigError

heldout = load_benchmark("heldout")


def test_recipes_parse_into_quantconfig_kwargs():
    assert heldout.parse_recipe("fast:preset=fast") == ("fast", {"preset": "fast"})
    assert heldout.parse_recipe("default:") == ("default", {})
    name, kw = heldout.parse_recipe(
        "x:weight_bits=8,act_bits=None,extra_mac_budget=0.25,equalize=true,"
        'overrides={"conv1": {"weight_bits": 8, "act_bits": 8}}'
    )
    assert name == "x" and kw["act_bits"] is None and kw["extra_mac_budget"] == 0.25
    assert kw["equalize"] is True and kw["overrides"]["conv1"]["act_bits"] == 8
    cfg = heldout.make_config(kw)
    assert cfg.weights.bits == 8 and cfg.activations.bits is None
    assert heldout.make_config({"preset": "fast", "act_bits": 4}) == QuantConfig.preset(
        "fast", act_bits=4
    )
    for bad in ("nocolon", "x:weight_bits", "x:no_such_field=1", "x:weight_bits=99"):
        with pytest.raises((ValueError, TypeError, ConfigError)):
            heldout.parse_recipe(bad)


def test_merge_keeps_other_rows_of_the_same_protocol(tmp_path):
    path = tmp_path / "r.json"
    head = {"protocol": {"calib": 64}}
    heldout.merge_rows(path, head, [{"m": 0, "recipe": "a", "v": 1}], ("m", "recipe"))
    heldout.merge_rows(path, head, [{"m": 0, "recipe": "b", "v": 2}], ("m", "recipe"))
    heldout.merge_rows(path, head, [{"m": 0, "recipe": "a", "v": 3}], ("m", "recipe"))
    rows = json.loads(path.read_text())["rows"]
    assert sorted((r["recipe"], r["v"]) for r in rows) == [("a", 3), ("b", 2)]
    other = {"protocol": {"calib": 32}}  # another protocol: earlier rows are not mixed in
    heldout.merge_rows(path, other, [{"m": 0, "recipe": "c", "v": 4}], ("m", "recipe"))
    assert [r["recipe"] for r in json.loads(path.read_text())["rows"]] == ["c"]
    row = heldout.counts(90, 100)
    assert row["top1"] == 0.9 and row["ci95"][0] < 0.9 < row["ci95"][1]


def test_cifar_peer_rows_aimet_missing_is_a_refused_row(tmp_path):
    """``--peers aimet`` without aimet-torch: a refused row per setting, labelled with its
    AdaRound iterations, and no exception (the shortcut registration is skipped)."""
    import importlib.util

    import torch

    cifar = load_benchmark("cifar_resnets")
    peers = load_benchmark("peers")
    if peers._AIMET or importlib.util.find_spec("aimet_torch") is not None:
        pytest.skip("aimet_torch importable here")
    from omse.zoo.labelled import CifarResNet

    model = CifarResNet(8).eval()
    calib = [torch.rand(4, 3, 32, 32)]
    xe, ye = torch.rand(6, 3, 32, 32), torch.zeros(6, dtype=torch.long)
    rows = cifar.peer_rows(["aimet"], 8, model, calib, xe, ye, ["W4A8"], 7, str(tmp_path))
    assert [r["setting"] for r in rows] == ["W4A8", "W4A8"]
    assert all("top1" not in r and "not installed" in r["refused"] for r in rows)
    assert any("7 iterations/layer" in r["preset"] for r in rows)
