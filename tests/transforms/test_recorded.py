"""Scales, codes and biases of reference quantizations equal the values recorded before the
package was reorganised (tests/data/recorded_quantizations.json, written by the pre-move code):
refactoring omse must not move a result.

Fingerprint per layer: the number of weight terms, the input and output steps, and a SHA-256 over
every term's int8 codes, float32 scales and masks and the float32 bias. Same process settings as
the recording (2 torch threads; results are reproducible at a fixed thread count).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from nets import tiny_batches, tiny_net

import omse

RECORDED = json.loads(
    (Path(__file__).parents[1] / "data" / "recorded_quantizations.json").read_text()
)


def fingerprint(q) -> dict:
    out = {}
    for name, ql in omse.quantized_layers(q).items():
        h = hashlib.sha256()
        for codes, scale, mask in ql.terms():
            h.update(codes.to(torch.int8).contiguous().numpy().tobytes())
            h.update(scale.to(torch.float32).contiguous().numpy().tobytes())
            h.update(mask.to(torch.uint8).contiguous().numpy().tobytes())
        b = ql.layer.bias
        if b is not None:
            h.update(b.detach().to(torch.float32).contiguous().numpy().tobytes())
        out[name] = {
            "terms": ql.n_terms,
            "act_scale": None if ql.act_scale is None else float(ql.act_scale),
            "out_scale": None if ql.out_scale is None else float(ql.out_scale),
            "sha256": h.hexdigest(),
        }
    return out


def _recipe(target: str) -> omse.QuantConfig:
    return omse.QuantConfig(
        weight_bits=4, act_bits=8, extra_mac_budget=0.1, bias_correction=True, target=target
    )


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("target", ["int4", "int8"])
def test_tiny_recipe_matches_the_recorded_values(target, two_threads):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = omse.quantize(tiny_net(), tiny_batches(), _recipe(target))
    assert fingerprint(q) == RECORDED[f"tiny/{target}"]


@pytest.mark.slow
@pytest.mark.models
@pytest.mark.parametrize("target", ["int4", "int8"])
def test_lite0_recipe_matches_the_recorded_values(target, two_threads):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("foolbox")
    from omse.zoo.data import calibration_images
    from omse.zoo.models import get_model

    spec = get_model("efficientnet-lite0")
    calib = spec.preprocess(calibration_images(16)).split(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = omse.quantize(spec.build(), calib, _recipe(target))
    got, want = fingerprint(q), RECORDED[f"lite0/{target}"]
    moved = [n for n in want if got.get(n) != want[n]]
    assert not moved, f"{len(moved)} layers moved, first {moved[:3]}"
