"""MiniLM W8A8 for the two export targets: what an int8 runtime's requantized outputs cost.

all-MiniLM-L6-v2 (:mod:`omse.zoo.text`), plain kernel-wise MMSE W8A8
(``QuantConfig.preset("fast", weight_bits=8, act_bits=8)``) quantized from dict batches for
``target="int4"`` (QDQ: float between the quantized layers) and ``target="int8"`` (every Linear's
output requantized to 8 bits per tensor, as an integer runtime runs it). 64 calibration
sentences, 200 other sentences evaluated (:func:`omse.zoo.text.corpus_split`, disjoint); metrics
against FP32 as in ``benchmarks/transformer.py`` (:func:`omse.zoo.text.retrieval_metrics`).

    python benchmarks/transformer_targets.py     # writes results/transformer_targets.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from omse.config import QuantConfig  # noqa: E402
from omse.io import atomic_write_text  # noqa: E402
from omse.transforms.pipeline import quantize  # noqa: E402
from omse.zoo.text import corpus_split, embed, load_minilm, retrieval_metrics, tokenize_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "transformer_targets.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evals, calib = corpus_split(n_eval=args.eval, n_calib=args.calib)
    tok, model = load_minilm()
    keys = ("input_ids", "attention_mask")
    cal, _ = tokenize_batches(tok, calib, 16)
    cal = [{k: b[k] for k in keys} for b in cal]
    ev, order = tokenize_batches(tok, evals, 32, sort_by_length=True)
    ev = [{k: b[k] for k in keys} for b in ev]
    with torch.no_grad():
        ref = embed(model, ev, order)
    rows = []
    for target in ("int4", "int8"):
        cfg = QuantConfig.preset("fast", weight_bits=8, act_bits=8, target=target)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize(model, cal, cfg)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            m = retrieval_metrics(ref, embed(q, ev, order))
        rows.append({"target": target, "quantize_seconds": round(seconds, 1), **m})
    print("| W8A8 MMSE, target | cosine (min) | nearest-neighbour agreement | quantize s |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['target']} | {r['cosine']:.3f} ({r['cosine_min']:.3f}) | "
            f"{r['nn_agreement']:.1%} | {r['quantize_seconds']} |"
        )
    out = {
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "threads": args.threads, "cpu": platform.processor() or platform.machine()},
        "calibration_sentences": args.calib,
        "evaluation_sentences": args.eval,
        "config": "QuantConfig.preset('fast', weight_bits=8, act_bits=8, target=T)",
        "rows": rows,
    }  # fmt: skip
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n", force=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
