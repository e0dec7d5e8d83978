"""MiniLM W8A8 for the two export targets: fidelity of the simulation and of onnxruntime's graph,
the integer kernels onnxruntime runs, and latency against onnxruntime FP32.

all-MiniLM-L6-v2 (:mod:`omse.zoo.text`), plain kernel-wise MMSE W8A8
(``QuantConfig.preset("fast", weight_bits=8, act_bits=8)``) quantized from dict batches for
``target="int4"`` (QDQ: float between the quantized layers) and ``target="int8"`` (integer
kernels; the int8 plan requantizes a layer's output only where an integer op reads it, so every
Linear of MiniLM runs as an integer ``MatMul`` with a float output, ``MatMulIntegerToFloat``).
64 calibration sentences, 200 other sentences evaluated (:func:`omse.zoo.text.corpus_split`,
disjoint); metrics against FP32 as in ``benchmarks/transformer.py``
(:func:`omse.zoo.text.retrieval_metrics`), for omse's torch simulation (``sim``) and for
onnxruntime running the exported graph (``ort``, dynamic batch and sequence axes).

Per exported graph: op counts of onnxruntime's optimized graph (``ORT_ENABLE_ALL``). Latency:
onnxruntime CPU, ``--threads`` intra-op threads, no spinning; the FP32 graph
(``torch.onnx.export``, opset 20), each target's graph and any ``--baseline-onnx LABEL=PATH``
(an int8 graph exported by another omse version, e.g. the one before issue #13) timed in one
interleaved run (:func:`latency._interleaved`) at batch 1 and 8 (evaluation sentences padded
to the batch's longest); speed-up = FP32 median / median.

    python benchmarks/transformer_targets.py     # writes results/transformer_targets.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import _cpu, _load  # noqa: E402
from latency import _interleaved as interleaved  # noqa: E402
from latency import _ort_session as ort_session  # noqa: E402

from omse.config import QuantConfig  # noqa: E402
from omse.deploy.export import export_onnx  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.layers import quantized_layers  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402
from omse.zoo.text import corpus_split, embed, load_minilm, retrieval_metrics, tokenize_batches  # noqa: E402

KEYS = ("input_ids", "attention_mask")
DYNAMIC = {k: {0: "batch", 1: "seq"} for k in KEYS}
OPS = (
    "MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger",
    "QuantizeLinear", "DequantizeLinear", "MatMul", "FusedMatMul", "Gemm",
)  # fmt: skip


def _optimized_ops(path: Path, work: Path, threads: int) -> dict[str, int]:
    opt = work / f"{path.stem}.opt.onnx"
    ort_session(path, threads, opt)
    c = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    return {k: c.get(k, 0) for k in OPS}


def _ort_embed(sess, batches, order) -> torch.Tensor:
    out = np.concatenate([sess.run(None, {k: b[k].numpy() for k in KEYS})[0] for b in batches])
    res = np.empty_like(out)
    res[np.array(order)] = out
    return torch.from_numpy(res)


def _fp32_onnx(model, example, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (), str(path), kwargs=example, input_names=list(KEYS),
            output_names=["output"], dynamic_axes={**DYNAMIC, "output": {0: "batch"}},
            opset_version=20, dynamo=False,
        )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="threads in torch and onnxruntime")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget per batch size")
    ap.add_argument("--baseline-onnx", nargs="*", default=[], metavar="LABEL=PATH")
    ap.add_argument("--out", default=str(ROOT / "results" / "transformer_targets.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evals, calib = corpus_split(n_eval=args.eval, n_calib=args.calib)
    tok, model = load_minilm()
    cal, _ = tokenize_batches(tok, calib, 16)
    cal = [{k: b[k] for k in KEYS} for b in cal]
    ev, order = tokenize_batches(tok, evals, 32, sort_by_length=True)
    ev = [{k: b[k] for k in KEYS} for b in ev]
    with torch.no_grad():
        ref = embed(model, ev, order)
    work = Path(tempfile.mkdtemp(prefix="omse_tt_"))
    example = {k: v[:1] for k, v in ev[0].items()}
    graphs = {"fp32": work / "fp32.onnx"}
    _fp32_onnx(model, example, graphs["fp32"])
    rows = []
    for target in ("int4", "int8"):
        cfg = QuantConfig.preset("fast", weight_bits=8, act_bits=8, target=target)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize(model, cal, cfg)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            sim = embed(q, ev, order)
        path = work / f"w8a8_{target}.onnx"
        export_onnx(q, example, path, force=True, dynamic_axes=DYNAMIC)
        graphs[f"w8a8_{target}"] = path
        sess = ort_session(path, args.threads)
        ort_out = _ort_embed(sess, ev, order)
        layers = quantized_layers(q).values()
        rows.append({
            "target": target, "quantize_seconds": round(seconds, 1),
            "output_quantized_layers": sum(ql.out_scale is not None for ql in layers),
            "quantized_layers": len(layers),
            **retrieval_metrics(ref, sim),
            "ort": retrieval_metrics(ref, ort_out),
            "ort_vs_sim_max_abs_diff": float((ort_out - sim).abs().max()),
            "optimized_ops": _optimized_ops(path, work, args.threads),
        })  # fmt: skip
    own = set(graphs)
    for spec in args.baseline_onnx:
        label, _, p = spec.partition("=")
        if label in own:
            raise SystemExit(f"--baseline-onnx {label}: the label names one of {sorted(own)}")
        graphs[label] = Path(p)
    baselines = {}
    for label in graphs:
        if label in own:
            continue
        sess = ort_session(graphs[label], args.threads)
        out = _ort_embed(sess, ev, order)
        baselines[label] = {
            "ort": retrieval_metrics(ref, out),
            "optimized_ops": _optimized_ops(graphs[label], work, args.threads),
        }
    latency = {}
    for bs in (1, 8):
        feed = tokenize_batches(tok, evals[:bs], bs)[0][0]
        feed = {k: feed[k].numpy() for k in KEYS}
        sessions = {k: ort_session(p, args.threads) for k, p in graphs.items()}
        fns = {k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}
        t = interleaved(fns, args.rounds, 3, args.seconds, seed=bs)
        for k in t:
            t[k]["speedup_vs_ort_fp32"] = round(t["fp32"]["median_ms"] / t[k]["median_ms"], 3)
        latency[str(bs)] = {"sequence_length": int(feed["input_ids"].shape[1]), "graphs": t}
    print("| W8A8 MMSE, target | Linear outputs requantized | cosine sim (min) | cosine ORT (min) "
          "| NN agreement sim / ORT | ORT integer MatMuls | speed-up b1 / b8 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        k = f"w8a8_{r['target']}"
        ops = r["optimized_ops"]
        ints = ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["QLinearMatMul"]
        print(
            f"| {r['target']} | {r['output_quantized_layers']}/{r['quantized_layers']} | "
            f"{r['cosine']:.3f} ({r['cosine_min']:.3f}) | {r['ort']['cosine']:.3f} "
            f"({r['ort']['cosine_min']:.3f}) | {r['nn_agreement']:.1%} / "
            f"{r['ort']['nn_agreement']:.1%} | {ints} | "
            f"{latency['1']['graphs'][k]['speedup_vs_ort_fp32']:.2f}x / "
            f"{latency['8']['graphs'][k]['speedup_vs_ort_fp32']:.2f}x |"
        )
    for label, b in baselines.items():
        print(
            f"| {label} | | | {b['ort']['cosine']:.3f} ({b['ort']['cosine_min']:.3f}) | "
            f"{b['ort']['nn_agreement']:.1%} | {b['optimized_ops']['MatMulIntegerToFloat']} | "
            f"{latency['1']['graphs'][label]['speedup_vs_ort_fp32']:.2f}x / "
            f"{latency['8']['graphs'][label]['speedup_vs_ort_fp32']:.2f}x |"
        )
    cpu, flags = _cpu()
    out = {
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "onnxruntime": __import__("onnxruntime").__version__, "threads": args.threads,
                "cpu": cpu, "cpu_flags": flags, "load": _load()},
        "calibration_sentences": args.calib,
        "evaluation_sentences": args.eval,
        "config": "QuantConfig.preset('fast', weight_bits=8, act_bits=8, target=T)",
        "rows": rows,
        "baselines": {k: {"path": str(graphs[k]), **v} for k, v in baselines.items()},
        "latency": latency,
    }  # fmt: skip
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
