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


def test_imagenet_merge_keeps_rows_of_another_config_version(tmp_path):
    imagenet = load_benchmark("imagenet")
    head = {"protocol": {"calib": 64}}
    row = {"n": 10, "correct": 8, "top1": 0.8, "ci95": [0.5, 0.9], "eval_seconds": 1.0}
    q = {"agreement": 0.9, "extra_macs_fraction": 0.1, "calib_seconds": 2.0}
    fp32 = {"model": "m", "recipe": "fp32", "torch_threads": 1, **row}
    v3 = {"model": "m", "recipe": "default", "config": {"version": 3, "weight_bits": 4}, **q, **row}
    v4 = {**v3, "config": {"version": 4, "weight_bits": 4, "budget": {"weight_bytes": 0.6}}}
    v4["precision"] = {"summary": "x = 0.60x the 8-bit model", "bits": {"a": 4, "b": 8, "c": 8}}
    v5 = {**v3, "recipe": "w8a8", "config": {"version": 5, "weights": {"bits": 8}}}
    old, out = tmp_path / "old.json", tmp_path / "out.json"
    old.write_text(json.dumps({**head, "rows": [fp32, v3]}))
    out.write_text(json.dumps({**head, "rows": [{**fp32, "eval_seconds": 3.0}, v4, v5]}))
    rows = imagenet.merge_files(out, [old])["rows"]
    assert sorted(r["recipe"] for r in rows) == ["default", "default-v3", "fp32", "w8a8"]
    assert [r["eval_seconds"] for r in rows if r["recipe"] == "fp32"] == [3.0]  # out wins
    assert imagenet.merge_files(out, [old])["rows"] == rows  # merging again changes nothing
    text = imagenet.table(json.loads(out.read_text()))
    assert "| m | default | v4 | 1 at 4, 2 at 8, 0.60x |" in text and "| v3 | 4-bit |" in text
    assert "| m | w8a8 | v5 | 8-bit |" in text
    grid = imagenet.summary(json.loads(out.read_text())).splitlines()
    assert grid[0] == "| recipe | m |" and grid[2].startswith("| fp32 | 80.00 [50.0, 90.0] |")
    assert "90.0% (v3)" in imagenet.summary(json.loads(out.read_text()))  # older version named
    (tmp_path / "other.json").write_text(json.dumps({"protocol": {"calib": 32}, "rows": []}))
    with pytest.raises(SystemExit):
        imagenet.merge_files(out, [tmp_path / "other.json"])
