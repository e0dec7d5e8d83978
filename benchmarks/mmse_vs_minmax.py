"""MMSE against min-max weights on EfficientNet-Lite0 at 4 bits, with and without bias correction.

Kernel-wise weights, per-tensor activations (W4A32 and W4A8), 16 calibration images, 200 views.
Reports agreement with FP32, KL and the network's total weight SQNR. Writes
results/mmse_vs_minmax.json.
"""

import json

import torch

torch.set_num_threads(1)
from omse.api import quantize, quantized_layers
from omse.config import QuantConfig
from omse.data import calibration_images, imagenet_views
from omse.metrics import compare_logits, predict
from omse.models import get_model

spec = get_model("efficientnet-lite0")
m = spec.build()
pre = spec.preprocess
V, L = imagenet_views(200)
C = calibration_images(16)
calib = [pre(C[i : i + 8]) for i in range(0, 16, 8)]
ref = predict(m, V, pre)
out = {}
for ab in [None, 8]:
    for meth in ["minmax", "mmse"]:
        for bc in [False, True]:
            q = quantize(m, calib, QuantConfig(4, ab, meth, meth, bias_correction=bc))
            a = compare_logits(ref, predict(q, V, pre), L)
            ls = quantized_layers(q)
            w_err = sum(
                float(((l.float_weight - l.dequantized_weight()) ** 2).sum()) for l in ls.values()
            )
            w_sig = sum(float((l.float_weight**2).sum()) for l in ls.values())
            key = f"W4A{ab or 32} {meth} bc={bc}"
            out[key] = {
                "agreement": a.agreement,
                "kl": a.kl,
                "weight_sqnr_db": 10 * __import__("math").log10(w_sig / w_err),
            }
            print(key, out[key], flush=True)
import platform

from omse.io import atomic_write_text

res = {
    "model": "efficientnet-lite0",
    "views": 200,
    "calibration_images": 16,
    "machine": f"{platform.machine()}, 1 torch thread, torch {torch.__version__}",
    "rows": out,
}
atomic_write_text("results/mmse_vs_minmax.json", json.dumps(res, indent=2) + "\n", force=True)
