"""Parity of the exported ONNX graphs with omse on EfficientNet-Lite0, several configurations.

For each configuration (W4A8 kernel-wise MMSE; the same + residual tensors at 10% extra MACs +
bias correction; W4A4 with residuals + bias correction; for ``target="int4"``), quantized on 16
calibration photos and evaluated on 200 views of the foolbox ImageNet images, this exports

- the plain QDQ graph (``export_onnx``) and compares onnxruntime's logits with omse's
  fake-quantized simulation;
- the integer form (``export_onnx(..., integer=True)``) and compares onnxruntime's logits with
  omse's integer mode (``omse.set_integer``), bit for bit;

and for the default recipe of ``target="int8"`` (``QuantConfig(target="int8")``: onnxruntime's
integer kernels, which requantize every layer's output in their own arithmetic) the default
export (``int8_weights="auto"``), compared with the fake-quantized simulation, with the integer
mode, and with the same model written with UINT8 weights everywhere (``"u8"``: u8u8 kernels,
exact on every x86 CPU; bit-equal there means no INT8 layer of the default file saturated).

It records top-1 agreement, the largest logit difference, one output quantization step of the
last layer (``act_scale * max|W|``, or its output step where the logits are requantized) and
the largest accumulator bound of any layer.

Writes ``results/parity.json`` and prints a markdown table.
Run: ``.venv/bin/python benchmarks/parity.py [--views 200]`` (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from omse.config import QuantConfig  # noqa: E402
from omse.deploy.export import export_onnx  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.layers import quantized_layers, set_integer  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402
from omse.zoo.tasks import get_task  # noqa: E402

CONFIGS = {
    "W4A8": QuantConfig.preset("fast", weight_bits=4, act_bits=8),
    "W4A8 + res10 + bc": QuantConfig(
        weight_bits=4, act_bits=8, extra_mac_budget=0.1, bias_correction=True
    ),
    "W4A4 + res10 + bc": QuantConfig(
        weight_bits=4, act_bits=4, extra_mac_budget=0.1, bias_correction=True
    ),
    # the default recipe for onnxruntime's integer kernels (QLinearConv, QLinearAdd, ...): its
    # requantization rounds in onnxruntime's arithmetic, not the simulation's
    "default, target int8": QuantConfig(target="int8"),
}


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in x.split(25)])


def _sim(q: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([q(b) for b in x.split(25)]).numpy()


def _compare(out: np.ndarray, sim: np.ndarray, step: float) -> dict:
    d = np.abs(out - sim).max(1)
    return {
        "top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean()),
        "max_abs_diff": float(d.max()),
        "inputs_within_one_step": float((d <= step).mean()),
        "bit_equal": bool(np.array_equal(out, sim)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=200)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "results" / "parity.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    task = get_task("efficientnet-lite0")
    model = task.build().eval()
    calib = task.calibration(args.calib)
    views = task.evaluation(args.views)[0]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CONFIGS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantize(model, calib.split(8), cfg)
            last = list(quantized_layers(q).values())[-1]
            step = float(last.act_scale) * float(last.dequantized_weight().abs().max())
            if last.out_scale is not None:  # requantized logits: their own step
                step = float(last.out_scale)
            qi = set_integer(copy.deepcopy(q), True)
            if cfg.target == "int8":
                auto = _ort(export_onnx(q, views[:1], Path(tmp) / "auto.onnx", force=True), views)
                u8 = export_onnx(q, views[:1], Path(tmp) / "u8.onnx", force=True, int8_weights="u8")
                row = {
                    "one_output_step": step,
                    "int8": _compare(auto, _sim(q, views), step),
                    "int8 vs integer mode": _compare(auto, _sim(qi, views), step),
                    "int8 vs UINT8 form": _compare(auto, _ort(u8, views), step),
                }
            else:
                qdq = export_onnx(q, views[:1], Path(tmp) / "qdq.onnx", force=True)
                row = {
                    "one_output_step": step,
                    "qdq": _compare(_ort(qdq, views), _sim(q, views), step),
                }
                exact = export_onnx(qi, views[:1], Path(tmp) / "int.onnx", force=True, integer=True)
                row["integer"] = _compare(_ort(exact, views), _sim(qi, views), step)
            row["max_accumulator_bound"] = max(
                ql.accumulator_bound() for ql in quantized_layers(qi).values()
            )
            rows[name] = row
            print(f"{name}: {json.dumps(row)}", flush=True)
    out = {
        "model": "efficientnet-lite0",
        "views": args.views,
        "calibration_images": args.calib,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}",
        "seconds": round(time.perf_counter() - t0, 1),
        "configs": rows,
    }
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n", force=True)
    print(
        "\n| config | graph | compared with | top-1 agreement | max abs logit diff "
        "| inputs within one output step | bit-equal |\n|---|---|---|---|---|---|---|"
    )
    graphs = {
        "qdq": ("qdq", "fake quantization"),
        "integer": ("integer", "integer mode"),
        "int8": ("int8 (default export)", "fake quantization"),
        "int8 vs integer mode": ("int8 (default export)", "integer mode"),
        "int8 vs UINT8 form": ("int8 (default export)", "its all-UINT8 export in onnxruntime"),
    }
    for name, r in rows.items():
        for key, (graph, ref) in graphs.items():
            if key not in r:
                continue
            c = r[key]
            print(
                f"| {name} | {graph} | {ref} | {c['top1_agreement']:.1%} | "
                f"{c['max_abs_diff']:.3g} | {c['inputs_within_one_step']:.1%} | {c['bit_equal']} |"
            )
    print(f"\nwrote {args.out} in {out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
