"""Shared by the labelled held-out benchmarks (imagenet.py, cifar_resnets.py): recipes from the
command line, quantize + evaluate one recipe, rows with Wilson intervals, JSON merging."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omse.analysis.metrics import predict, wilson_interval
from omse.config import QuantConfig
from omse.io import atomic_write_text
from omse.nn.layers import quantized_layers
from omse.transforms.pipeline import quantize

ROOT = Path(__file__).resolve().parents[1]


def _default_data() -> Path:
    """``$OMSE_DATA``, else ``../shared/data`` beside the repository (for a git worktree: beside
    its main checkout too)."""
    if os.environ.get("OMSE_DATA"):
        return Path(os.environ["OMSE_DATA"])
    found = [ROOT.parent / "shared" / "data"]
    git = ROOT / ".git"
    if git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(git.read_text().partition("gitdir:")[2].strip())
        if gitdir.parent.name == "worktrees":
            found.append(gitdir.parents[2].parent / "shared" / "data")
    return next((p for p in found if p.is_dir()), found[0])


DEFAULT_DATA = _default_data()
"""Where the data folder is looked for when ``--data`` is not given (see :func:`_default_data`)."""


def parse_value(text: str) -> Any:
    """``k=v`` value: None, a bool, an int, a float, JSON (``{...}``, ``[...]``) or a string."""
    t = text.strip()
    if t in ("None", "none", "null"):
        return None
    if t in ("True", "true", "False", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    if t[:1] in "{[":
        return json.loads(t)
    return t


def split_top(text: str) -> list[str]:
    """Split at commas outside brackets and braces."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "{[" and 1 or (ch in "}]" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*out, cur] if p.strip()]


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    """``name:k=v,k=v`` -> ``(name, kwargs)``; ``preset=NAME`` picks ``QuantConfig.preset``.

    Example: ``fast:preset=fast``, ``default:``, ``w8a8:weight_bits=8``, ``int8:target=int8``,
    ``a4:act_bits=4,extra_mac_budget=0.25``.
    """
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"recipe {spec!r}: use NAME:k=v,k=v (NAME: alone for QuantConfig())")
    kwargs = {}
    for item in split_top(rest):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"recipe {spec!r}: {item!r} is not k=v")
        kwargs[k.strip()] = parse_value(v)
    make_config(kwargs)  # fail early on an unknown field or a bad value
    return name, kwargs


def make_config(kwargs: dict[str, Any]) -> QuantConfig:
    kw = dict(kwargs)
    preset = kw.pop("preset", None)
    return QuantConfig.preset(preset, **kw) if preset else QuantConfig(**kw)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Top-1 with its 95% Wilson interval."""
    return counts(int((pred == labels).sum()), int(labels.numel()))


def counts(correct: int, n: int) -> dict[str, Any]:
    """Top-1 ``correct / n`` with its 95% Wilson interval."""
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "top1": correct / n, "ci95": [lo, hi]}


def pct(row: dict) -> str:
    lo, hi = row["ci95"]
    return f"{100 * row['top1']:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def evaluate(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, pre, batch: int, desc: str, ref=None
) -> tuple[dict[str, Any], torch.Tensor]:
    """Row of top-1 (and top-1 agreement with the predictions ``ref``) -> ``(row, predictions)``."""
    t0 = time.perf_counter()
    pred = predict(model, x, pre, batch_size=batch, progress=True, desc=desc).argmax(1)
    row = accuracy(pred, labels)
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if ref is not None:
        row["agreement"] = float((pred == ref).double().mean())
    return row, pred


def quantize_recipe(
    model: nn.Module, calib: list[torch.Tensor], kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """The quantized copy and what to record (config, calibration seconds, extra MACs)."""
    cfg = make_config(kwargs)
    t0 = time.perf_counter()
    q = quantize(model, calib, cfg)
    secs = time.perf_counter() - t0
    layers = quantized_layers(q)
    total = sum(ql.macs for ql in layers.values())
    extra = sum(ql.extra_macs() for ql in layers.values())
    plan = getattr(q, "omse_precision", None)  # per-layer widths under a weight budget
    return q.eval(), {
        "kwargs": kwargs,
        "config": cfg.to_dict(),
        "calib_seconds": round(secs, 1),
        "extra_macs_fraction": extra / max(total, 1),
        "precision": None
        if plan is None
        else {"summary": plan.summary(), "bits": plan.bits, "guard": plan.guard},
    }


def machine() -> str:
    return (
        f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}"
    ).replace("  ", " ")


def merge_rows(path: Path, head: dict[str, Any], rows: list[dict], key: tuple[str, ...]) -> dict:
    """Write ``head`` + rows to ``path``, keeping the rows of an earlier run with the same data
    settings (``head["protocol"]``) whose keys this run did not measure again."""
    old_rows = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("protocol") == head.get("protocol"):
                old_rows = old.get("rows", [])
        except (OSError, ValueError):
            pass
    new_keys = {tuple(r.get(k) for k in key) for r in rows}
    kept = [r for r in old_rows if tuple(r.get(k) for k in key) not in new_keys]
    result = {**head, "rows": kept + rows}
    atomic_write_text(path, json.dumps(result, indent=2) + "\n", force=True)
    return result
