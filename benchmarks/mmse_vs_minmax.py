"""MMSE against min-max weights on EfficientNet-Lite0 at 4 bits, with and without bias correction.

Kernel-wise weights, per-tensor activations (W4A32 and W4A8), 16 calibration images, 200 views.
Reports agreement with FP32, KL and the network's total weight SQNR; writes
results/mmse_vs_minmax.json.
"""

from __future__ import annotations

import json
import math
import platform

import torch

from omse.analysis.metrics import compare_logits, predict
from omse.config import QuantConfig
from omse.io import atomic_write_text
from omse.nn.layers import quantized_layers
from omse.runtime import tune_allocator
from omse.transforms.pipeline import quantize
from omse.zoo.tasks import get_task


def main() -> None:
    tune_allocator()
    task = get_task("efficientnet-lite0")
    model, pre = task.build(), None
    views, labels = task.evaluation(200)  # preprocessed
    batches = list(task.calibration(16).split(8))
    ref = predict(model, views, pre)
    out = {}
    for ab in (None, 8):
        for meth in ("minmax", "mmse"):
            for bc in (False, True):
                q = quantize(
                    model,
                    batches,
                    QuantConfig.preset(
                        "fast",
                        weight_bits=4,
                        act_bits=ab,
                        weight_method=meth,
                        act_method=meth,
                        bias_correction=bc,
                    ),
                )
                a = compare_logits(ref, predict(q, views, pre), labels)
                layers = quantized_layers(q).values()
                err = sum(
                    float(((q_.float_weight - q_.dequantized_weight()) ** 2).sum()) for q_ in layers
                )
                sig = sum(float((q_.float_weight**2).sum()) for q_ in layers)
                key = f"W4A{ab or 32} {meth} bc={bc}"
                out[key] = {
                    "agreement": a.agreement,
                    "kl": a.kl,
                    "weight_sqnr_db": 10 * math.log10(sig / err),
                }
                print(key, out[key], flush=True)
    res = {
        "model": "efficientnet-lite0",
        "views": 200,
        "calibration_images": 16,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "rows": out,
    }
    atomic_write_text("results/mmse_vs_minmax.json", json.dumps(res, indent=2) + "\n", force=True)


if __name__ == "__main__":
    main()
