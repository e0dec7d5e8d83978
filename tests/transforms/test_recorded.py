"""Scales, codes and biases of reference quantizations equal the values recorded before the
package was reorganised (tests/data/recorded_quantizations.json, written by the pre-move code):
refactoring omse must not move a result.

Fingerprint per layer (:func:`fingerprint`): codes and masks compared exactly (a hash), steps,
term scales and biases as floats to 1e-6 relative (a few float32 ulps): torch's CPU reductions
take different SIMD paths on different processors (an AMD EPYC and an Intel Xeon differ in the
last bit of a histogram's bin sums, hence of a bias correction). Same process settings as the
recording (2 torch threads). The file was first written by the pre-move code as one hash over
codes, scales and biases; it was re-recorded in this float-tolerant form by the same code
(``PYTHONPATH=tests python tests/transforms/test_recorded.py --record``) once CI had confirmed that the code still
matched the original hashes. A second recording (``recorded_quantizations_xeon.json``) was written
by that same code on an Intel Xeon, where Lite0's later layers take other codes; a result must
equal one recording entirely. Both recordings were made with the vectorised MMSE solver, the
only one omse had then: these tests run with it (``omse.core.mmse.DEFAULT_METHOD``), since the
compiled sweep finds the same optima but its steps differ in the last bits, which moves Lite0's
later codes as a different processor does.
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
import omse.core.mmse

DATA = Path(__file__).parents[1] / "data"
RECORDINGS = {
    "amd-epyc": json.loads((DATA / "recorded_quantizations.json").read_text()),
    # the same code (caa1cf3, which matched the EPYC recording there) on an Intel Xeon with AMX:
    # Lite0's later layers take other codes from last-bit differences of oneDNN's convolutions
    "intel-xeon": json.loads((DATA / "recorded_quantizations_xeon.json").read_text()),
    # the same code (caa1cf3) on an AMD EPYC Zen 3 with AVX2 only (no AVX-512): Lite0 moves from
    # block 1 on, from last-bit differences of the AVX2 convolution kernels
    "amd-epyc-avx2": json.loads((DATA / "recorded_quantizations_epyc_avx2.json").read_text()),
}


@pytest.fixture(autouse=True)
def _recorded_solver(monkeypatch):
    monkeypatch.setattr(omse.core.mmse, "DEFAULT_METHOD", "vectorised")


STEPS = ("act_scale", "out_scale", "scale_sum", "scale_sq", "bias_sum", "bias_sq")


def fingerprint(q) -> dict:
    """Per layer: the number of weight terms and a SHA-256 over every term's int8 codes and masks
    (exact), and the input/output steps and float64 sums / sums of squares of the term scales and
    the bias (compared to 1e-6 relative)."""
    out = {}
    for name, ql in omse.quantized_layers(q).items():
        h = hashlib.sha256()
        scales = []
        for codes, scale, mask in ql.terms():
            h.update(codes.to(torch.int8).contiguous().numpy().tobytes())
            h.update(mask.to(torch.uint8).contiguous().numpy().tobytes())
            scales.append(scale.double().flatten())
        s = torch.cat(scales)
        b = ql.layer.bias
        b = torch.zeros(1, dtype=torch.float64) if b is None else b.detach().double()
        out[name] = {
            "terms": ql.n_terms,
            "codes_sha256": h.hexdigest(),
            "act_scale": None if ql.act_scale is None else float(ql.act_scale),
            "out_scale": None if ql.out_scale is None else float(ql.out_scale),
            "scale_sum": float(s.sum()),
            "scale_sq": float((s * s).sum()),
            "bias_sum": float(b.sum()),
            "bias_sq": float((b * b).sum()),
        }
    return out


def _same(got: dict | None, want: dict) -> bool:
    """One layer's fingerprint equals the recorded one (floats to 1e-6 relative)."""
    if got is None or got.keys() != want.keys():
        return False
    exact = all(got[k] == want[k] for k in got if k not in STEPS)
    return exact and all(
        (got[k] is None) == (want[k] is None)
        and (got[k] is None or got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-12))
        for k in STEPS
    )


def _moved(got: dict, key: str) -> dict[str, list[str]]:
    """Per recording, the layers of ``got`` that differ from it (a result must equal one
    recording entirely: layers are never matched across processors)."""
    return {
        cpu: [n for n in rec[key] if not _same(got.get(n), rec[key][n])]
        for cpu, rec in RECORDINGS.items()
    }


def _assert_same(got: dict, key: str) -> None:
    moved = _moved(got, key)
    assert any(not m for m in moved.values()), {c: (len(m), m[:3]) for c, m in moved.items()}


def _recipe(target: str) -> omse.QuantConfig:
    """The recipe the values were recorded with: one weight width (no per-layer budget)."""
    return omse.QuantConfig(
        weight_bits=4,
        act_bits=8,
        extra_mac_budget=0.1,
        bias_correction=True,
        target=target,
        budget=None,
    )


@pytest.mark.parametrize("target", ["int4", "int8"])
def test_tiny_recipe_matches_the_recorded_values(target, two_threads):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = omse.quantize(tiny_net(), tiny_batches(), _recipe(target))
    _assert_same(fingerprint(q), f"tiny/{target}")


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
    _assert_same(fingerprint(q), f"lite0/{target}")


def _record() -> None:
    """Write tests/data/recorded_quantizations.json from the current code (2 threads)."""
    omse.core.mmse.DEFAULT_METHOD = "vectorised"
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from omse.zoo.data import calibration_images
    from omse.zoo.models import get_model

    torch.set_num_threads(2)
    out = {}
    for target in ("int4", "int8"):
        torch.manual_seed(0)
        out[f"tiny/{target}"] = fingerprint(
            omse.quantize(tiny_net(), tiny_batches(), _recipe(target))
        )
        spec = get_model("efficientnet-lite0")
        calib = spec.preprocess(calibration_images(16)).split(8)
        out[f"lite0/{target}"] = fingerprint(omse.quantize(spec.build(), calib, _recipe(target)))
    path = Path(__file__).parents[1] / "data" / "recorded_quantizations.json"
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--record"]:
        raise SystemExit(
            "usage: PYTHONPATH=tests python tests/transforms/test_recorded.py --record"
        )
    warnings.simplefilter("ignore")
    _record()
