"""Print the benchmark tables (markdown) from ``results/*.json``: the documentation's benchmark
pages insert these sections (scripts/docs_hooks.py), and this prints them all.

    python benchmarks/render_readme.py [--results results] > /tmp/tables.md

Sections, each only when its file exists: a summary over models, one table per
``bench_<model>.json`` (written by ``benchmarks/bench.py``), the transformer table
(``transformer.json``), the peers table (``peers.json``) and latency (``latency.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

SUMMARY_METHODS = ("minmax", "mmse", "mmse+res10")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|")


def generic_table(data: Any, title: str) -> str:
    """A table of ``data["rows"]`` (or a list of dicts, or a dict of dicts) with every scalar
    column, under a caption of the top-level scalar fields."""
    caption = []
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        rows = data["rows"]
        caption = [f"{k}: {_fmt(v)}" for k, v in data.items() if k != "rows" and _scalar(v)]
    elif isinstance(data, list):
        rows = data
    elif isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        rows = [{"name": k, **v} for k, v in data.items()]
    else:
        return f"**{title}**\n\n```\n{json.dumps(data, indent=2)[:4000]}\n```"
    rows = [r for r in rows if isinstance(r, dict)]
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and _scalar(v)]
    lines = [f"**{title}**" + (" — " + "; ".join(caption) if caption else ""), ""]
    if not rows:
        return "\n".join(lines + ["(no rows)"])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _scalar(v: Any) -> bool:
    return (
        v is None
        or isinstance(v, str | int | float | bool)
        or (
            isinstance(v, list) and all(isinstance(x, str | int | float) for x in v) and len(v) <= 8
        )
    )


def summary_table(results: list[dict[str, Any]]) -> str:
    """One line per model and method: kernel-wise weights at every setting."""
    lines = [
        "**Summary** — kernel-wise (per-channel) weights; zoo: top-1 on the Fashion-MNIST test set, "
        "EfficientNet-Lite0: agreement with FP32",
        "",
        "| model | method | FP32 | " + " | ".join(bench.SETTINGS) + " |",
        "|---|---|---|" + "---|" * len(bench.SETTINGS),
    ]
    for res in results:
        rows = {r["key"]: r for r in res["rows"]}
        use_top1 = res.get("primary", "top1") == "top1"

        def val(r: dict[str, Any] | None, use_top1: bool = use_top1) -> str:
            if r is None:
                return ""
            if r.get("status") != "ok":
                return "n/a"
            return bench._pct(r["top1"] if use_top1 else r["agreement"], 2 if use_top1 else 1)

        fp = val(rows.get("FP32"))
        for m in SUMMARY_METHODS:
            cells = [val(rows.get(f"{s}/{m}/per_channel")) for s in bench.SETTINGS]
            if any(cells):
                lines.append(f"| {res['model']} | {m} | {fp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_tables(data: dict[str, Any], sizes: dict[str, Any] | None = None) -> str:
    """``latency.json`` (benchmarks/latency.py), rendered by the benchmark's own tables."""
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        return generic_table(data, "Latency")
    import latency

    return latency._tables(models, (sizes or {}).get("models", {}))


def _models_section(results_dir: Path) -> list[str]:
    models = list(bench.MODELS) + sorted(
        p.stem.removeprefix("bench_")
        for p in results_dir.glob("bench_*.json")
        if p.stem.removeprefix("bench_") not in bench.MODELS
    )
    results = bench.load_results(results_dir, models)
    if not results:
        return []
    return [summary_table(results)] + [bench.markdown_table(r) for r in results]


def _transformer_section(results_dir: Path) -> list[str]:
    tf = results_dir / "transformer.json"
    if not tf.is_file():
        return []
    import transformer

    return [transformer.markdown_table(json.loads(tf.read_text()))]


def _peers_section(results_dir: Path) -> list[str]:
    peers = results_dir / "peers.json"
    if not peers.is_file():
        return []
    return [generic_table(json.loads(peers.read_text()), "Comparison with other PTQ libraries")]


def _latency_section(results_dir: Path) -> list[str]:
    latency = results_dir / "latency.json"
    if not latency.is_file():
        return []
    data = json.loads(latency.read_text())
    sizes = results_dir / "sizes.json"
    sizes_data = json.loads(sizes.read_text()) if sizes.is_file() else None
    if isinstance(data, dict):
        return [latency_tables(data, sizes_data)]
    return [generic_table(data, "Latency")]


def _tflite_section(results_dir: Path) -> list[str]:
    path = results_dir / "tflite.json"
    if not path.is_file():
        return []
    import tflite

    return [tflite.tables(json.loads(path.read_text()))]


SECTIONS = {
    "models": _models_section,
    "tflite": _tflite_section,
    "transformer": _transformer_section,
    "peers": _peers_section,
    "latency": _latency_section,
}
"""The sections, in order: each a function of the results folder returning markdown blocks
(none when its file is missing). The documentation's benchmark pages insert them by name
(``<!-- omse:results NAME -->``, scripts/docs_hooks.py)."""


def render_section(results_dir: Path, name: str) -> str:
    """One section of :data:`SECTIONS` as markdown ("" when its results are missing)."""
    return "\n\n".join(SECTIONS[name](Path(results_dir)))


def render(results_dir: Path) -> str:
    parts = [render_section(results_dir, name) for name in SECTIONS]
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=HERE.parent / "results")
    args = ap.parse_args(argv)
    out = render(args.results)
    if not out.strip():
        print(f"no results in {args.results}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
