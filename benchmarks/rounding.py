"""Learned rounding: agreement with FP32 with and without extra MACs, on EfficientNet-Lite0 and
(``--zoo``) the Fashion-MNIST zoo.

Same protocol as ``benchmarks/accuracy.py`` (32 calibration photographs, 200 views of the 20
foolbox ImageNet images, never overlapping): the 4-bit recipe with ``rounding="learned"``
(AdaRound-style, layer by layer, :mod:`omse.transforms.learned`) and bias correction, at 0% and
10% extra MACs, W4A8 and W4A4. Calibration seconds are the wall time of ``omse.quantize``.

The zoo rows use the peers benchmark's data (the first 256 training images for calibration, the
10,000 test images for evaluation) and no extra MACs, W4A32 / W4A8 / W4A4.

    python benchmarks/rounding.py [--zoo]

Prints the rows and writes ``results/rounding.json`` (``--zoo``: ``results/rounding_zoo.json``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import omse
from omse.analysis.metrics import compare_logits, predict
from omse.io import atomic_write_text
from omse.zoo.tasks import get_task

CONFIGS = {
    "bc+learned W4A8": dict(act_bits=8, bias_correction=True, rounding="learned"),
    "bc+learned W4A4": dict(act_bits=4, bias_correction=True, rounding="learned"),
    "res10+bc+learned W4A8": dict(
        act_bits=8, bias_correction=True, rounding="learned", extra_mac_budget=0.1
    ),
    "res10+bc+learned W4A4": dict(
        act_bits=4, bias_correction=True, rounding="learned", extra_mac_budget=0.1
    ),
}


ZOO = ("fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")


def zoo() -> int:
    """The zoo at no extra MACs: bias correction + learned rounding, W4A32 / W4A8 / W4A4."""
    warnings.simplefilter("ignore")
    rows = []
    for name in ZOO:
        task = get_task(name)
        model = task.build()
        x, y = task.evaluation(None)
        batches = list(task.calibration(256).split(32))
        ref = predict(model, x, None, batch_size=1000)
        for ab in (None, 8, 4):
            cfg = omse.QuantConfig.preset(
                "fast", weight_bits=4, act_bits=ab, bias_correction=True, rounding="learned"
            )
            t = time.perf_counter()
            q = omse.quantize(model, batches, cfg)
            secs = time.perf_counter() - t
            a = compare_logits(ref, predict(q, x, None, batch_size=1000), y)
            rows.append(
                {
                    "model": name,
                    "setting": f"W4A{ab or 32}",
                    "agreement": a.agreement,
                    "top1": a.top1,
                    "seconds": round(secs, 1),
                }
            )
            print(rows[-1], flush=True)
    out = {
        "recipe": "MMSE + bias correction + learned rounding, no extra MACs",
        "calibration": "first 256 Fashion-MNIST training images",
        "eval": "10,000 Fashion-MNIST test images",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "rows": rows,
    }
    path = Path("results/rounding_zoo.json")
    atomic_write_text(path, json.dumps(out, indent=2) + "\n", force=True)
    return 0


def main() -> int:
    if "--zoo" in sys.argv[1:]:
        return zoo()
    warnings.simplefilter("ignore")
    task = get_task("efficientnet-lite0")
    model = task.build()
    views, labels = task.evaluation(200)
    batches = list(task.calibration(32).split(8))
    ref = predict(model, views, None)
    rows = []
    for name, kw in CONFIGS.items():
        t = time.perf_counter()
        q = omse.quantize(model, batches, omse.QuantConfig.preset("fast", weight_bits=4, **kw))
        secs = time.perf_counter() - t
        a = compare_logits(ref, predict(q, views, None), labels)
        rows.append({"name": name, "agreement": a.agreement, "kl": a.kl, "seconds": round(secs, 1)})
        print(rows[-1], flush=True)
    out = {
        "model": "efficientnet-lite0",
        "views": 200,
        "calibration_images": 32,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "rows": rows,
    }
    atomic_write_text(Path("results/rounding.json"), json.dumps(out, indent=2) + "\n", force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
