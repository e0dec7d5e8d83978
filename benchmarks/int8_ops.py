"""Integer ops between the layers (``omse.nn.ops``) on a YOLOv8n-shaped detector, in onnxruntime.

The detector has YOLOv8n's backbone and neck widths (16..256 channels, C2f blocks with ``chunk``,
residual adds and concats, SPPF with max pools, nearest upsampling, SiLU after every conv) and a
1x1 head per scale, at 320x320; random weights with non-trivial BatchNorm statistics, calibrated
on 32 random images (latency does not depend on the weights; agreement is measured against
omse's own simulation and against FP32 on 32 other random images). Candidates, timed interleaved
(``latency._interleaved``), batch 1 and 8, ``--threads`` intra-op threads:

- ``fp32``: the float model exported with ``torch.onnx.export``;
- ``ortq_w8a8``: onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, MinMax) of the FP32 graph after ``quant_pre_process``;
- ``omse_int8``: ``QuantConfig.preset("fast", weight_bits=8, act_bits=8, target="int8")``
  exported by default: quantizers between the layers, integer kernels end to end;
- ``omse_int8_s8``: the same graph with ``int8_weights="s8"`` (the first layer's 8-bit weights
  as INT8 too, not UINT8);
- ``omse_int8_float_ops``: the same model with its op quantizers removed before export (the graph
  before ``omse.nn.ops``: every SiLU, add, concat in float between Q/DQ).

Per graph: onnxruntime's optimized graph (integer kernels, float compute left between them, by
``latency._graph_kernels``). Writes ``results/int8_ops.json``.

    python benchmarks/int8_ops.py [--threads 2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import (  # noqa: E402
    _cpu,
    _export_fp32,
    _graph_kernels,
    _interleaved,
    _load,
    _ort_quantize,
    _ort_session,
)

from omse.config import QuantConfig  # noqa: E402
from omse.deploy.export import export_onnx  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.ops import detach_op_quantizers, op_quantizers  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402


class Conv(nn.Module):
    def __init__(self, a: int, b: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(a, b, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(b)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, a: int, b: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = b // 2
        self.cv1 = Conv(a, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, b)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.cv1, self.cv2, self.m = Conv(a, a // 2), Conv(a * 2, b), nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class YoloV8nLike(nn.Module):
    """YOLOv8n's backbone and neck (widths 16..256, C2f depths 1/2/2/1) with 1x1 heads."""

    def __init__(self, classes: int = 80):
        super().__init__()
        self.b0, self.b1, self.b2 = Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1)
        self.b3, self.b4 = Conv(32, 64, 3, 2), C2f(64, 64, 2)
        self.b5, self.b6 = Conv(64, 128, 3, 2), C2f(128, 128, 2)
        self.b7, self.b8, self.b9 = Conv(128, 256, 3, 2), C2f(256, 256, 1), SPPF(256, 256)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n12, self.n15 = C2f(384, 128, 1, False), C2f(192, 64, 1, False)
        self.n16, self.n18 = Conv(64, 64, 3, 2), C2f(192, 128, 1, False)
        self.n19, self.n21 = Conv(128, 128, 3, 2), C2f(384, 256, 1, False)
        self.heads = nn.ModuleList(nn.Conv2d(c, 64 + classes, 1) for c in (64, 128, 256))

    def forward(self, x):
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        n12 = self.n12(torch.cat([self.up(p5), p4], 1))
        n15 = self.n15(torch.cat([self.up(n12), p3], 1))
        n18 = self.n18(torch.cat([self.n16(n15), n12], 1))
        n21 = self.n21(torch.cat([self.n19(n18), p5], 1))
        outs = [h(t).flatten(2) for h, t in zip(self.heads, (n15, n18, n21), strict=True)]
        return torch.cat(outs, 2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = YoloV8nLike().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.3, 0.3)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--out", default=str(ROOT / "results" / "int8_ops.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="omse_ops_"))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    calib = torch.rand(32, 3, args.size, args.size, generator=g)
    ev = torch.rand(32, 3, args.size, args.size, generator=g)
    model = _model()
    graphs = {"fp32": work / "fp32.onnx"}
    _export_fp32(model, ev[:1], graphs["fp32"])
    graphs["ortq_w8a8"], _ = _ort_quantize(graphs["fp32"], calib, work, "yolo")
    cfg = QuantConfig.preset("fast", weight_bits=8, act_bits=8, target="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, list(calib.split(8)), cfg)
    ops = op_quantizers(q)
    plan = {k: f"{ops.ops[k]}:{v}" for k, v in ops.kinds.items()} if ops else {}
    with torch.no_grad():
        sim = torch.cat([q(b) for b in ev.split(8)]).numpy()
        ref = torch.cat([model(b) for b in ev.split(8)]).numpy()
    graphs["omse_int8"] = export_onnx(q, ev[:1], work / "omse_int8.onnx")
    graphs["omse_int8_s8"] = export_onnx(
        q, ev[:1], work / "omse_int8_s8.onnx", int8_weights="s8"
    )  # the first layer's 8-bit weights as INT8 too (u8s8; exact on VNNI CPUs)
    detach_op_quantizers(q)
    graphs["omse_int8_float_ops"] = export_onnx(q, ev[:1], work / "omse_int8_float_ops.onnx")
    res: dict = {"plan": plan, "graphs": {}}
    for key, p in graphs.items():
        opt = p.with_suffix(".opt.onnx")
        sess = _ort_session(p, args.threads, opt)
        out = np.concatenate([sess.run(None, {"input": b.numpy()})[0] for b in ev.split(8)])
        err = float(((out - ref) ** 2).sum())
        row = {
            "kernels": _graph_kernels(opt),
            "sqnr_db_vs_fp32": round(10 * np.log10(float((ref**2).sum()) / max(err, 1e-30)), 2),
        }
        if key == "omse_int8":
            row["max_abs_diff_vs_sim"] = float(np.abs(out - sim).max())
            row["mean_abs_diff_vs_sim"] = float(np.abs(out - sim).mean())
        res["graphs"][key] = row
    res["latency"] = {}
    for bs in (1, 8):
        feed = {"input": ev[:bs].numpy()}
        sessions = {k: _ort_session(p, args.threads) for k, p in graphs.items()}
        fns = {k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}
        t = _interleaved(fns, args.rounds, 3, args.seconds, seed=bs)
        for k in t:
            t[k]["speedup_vs_ort_fp32"] = round(t["fp32"]["median_ms"] / t[k]["median_ms"], 3)
            t[k]["vs_ortq"] = round(t["ortq_w8a8"]["median_ms"] / t[k]["median_ms"], 3)
        res["latency"][str(bs)] = t
    for key, row in res["graphs"].items():
        k = row["kernels"]
        lat = " / ".join(
            f"{res['latency'][b][key]['median_ms']:.3g} ms "
            f"({res['latency'][b][key]['speedup_vs_ort_fp32']:.2f}x FP32, "
            f"{res['latency'][b][key]['vs_ortq']:.2f}x ortq)"
            for b in res["latency"]
        )
        between = sorted({f["op"] for f in k["float_between_integer_kernels"]})
        print(
            f"| {key} | {k['integer_kernels']} integer kernels | float between: "
            f"{len(k['float_between_integer_kernels'])} {between} | SQNR "
            f"{row['sqnr_db_vs_fp32']} dB | {lat} |",
            flush=True,
        )
    cpu, flags = _cpu()
    out = {
        "env": {
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "threads": args.threads,
            "size": args.size,
            "cpu": cpu,
            "cpu_flags": flags,
            "load": _load(),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "results": res,
    }
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
