"""Learned rounding on EfficientNet-Lite0: agreement with FP32 with and without extra MACs.

Same protocol as ``benchmarks/accuracy.py`` (32 calibration photographs, 200 views of the 20
foolbox ImageNet images, never overlapping): the 4-bit recipe with ``rounding="learned"``
(AdaRound-style, layer by layer, :mod:`omse.transforms.learned`) and bias correction, at 0% and
10% extra MACs, W4A8 and W4A4. Calibration seconds are the wall time of ``omse.quantize``.

    python benchmarks/rounding.py

Prints the rows and writes ``results/rounding.json``.
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


def main() -> int:
    warnings.simplefilter("ignore")
    task = get_task("efficientnet-lite0")
    model = task.build()
    views, labels = task.evaluation(200)
    batches = list(task.calibration(32).split(8))
    ref = predict(model, views, None)
    rows = []
    for name, kw in CONFIGS.items():
        t = time.perf_counter()
        q = omse.quantize(model, batches, omse.QuantConfig(weight_bits=4, **kw))
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
