"""The pipeline makes one calibration pass per stage that needs one (see
omse.transforms.pipeline): the W4A8 recipe (residuals + bias correction) three, GPTQ before
residuals one more, plain W4A8 one."""

from __future__ import annotations

import warnings

import pytest
import torch
from nets import tiny_batches, tiny_net

import omse
from omse.transforms import statistics
from omse.transforms.pipeline import FALLBACK_SAMPLES


def _count(config: omse.QuantConfig) -> tuple[int, int]:
    """(calibration passes, model forwards on calibration batches)."""
    batches = tiny_batches(n=3)
    model = tiny_net()
    forwards = [0]

    def hook(_mod, inp):
        if inp and isinstance(inp[0], torch.Tensor) and inp[0].shape[0] == batches[0].shape[0]:
            forwards[0] += 1

    model.register_forward_pre_hook(hook)  # deepcopy carries it into the quantized copy
    before = statistics.PASSES[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        omse.quantize(model, batches, config)
    return statistics.PASSES[0] - before, forwards[0]


@pytest.mark.parametrize(
    "extra,passes",
    [
        ({}, 1),
        ({"bias_correction": True}, 2),
        ({"extra_mac_budget": 0.1, "bias_correction": True}, 3),
        ({"extra_mac_budget": 0.1, "bias_correction": True, "target": "int8"}, 3),
        ({"output_aware": True, "extra_mac_budget": 0.1, "bias_correction": True}, 4),
    ],
)
def test_passes_per_recipe(extra, passes):
    n_passes, forwards = _count(omse.QuantConfig.preset("fast", weight_bits=4, act_bits=8, **extra))
    assert n_passes == passes
    # each pass is one forward per calibration batch; BN folding (and the int8 plan) trace one
    # sample, not a batch; the float fallback's estimate (which finds nothing here: no pass
    # again) runs the batches that cover its first FALLBACK_SAMPLES samples
    rows = tiny_batches(n=3)[0].shape[0]
    estimate = min(3, -(-FALLBACK_SAMPLES // rows))
    assert forwards == 3 * passes + estimate
