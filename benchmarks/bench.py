"""The `make bench` suite: every model x setting x range-setting method x weight granularity.

Models
    - ``fmnist-resnet20``, ``fmnist-mobilenetv2``, ``fmnist-vgg`` (the Fashion-MNIST zoo;
      a model whose weights are not trained yet is skipped): calibration on the first 256
      training images, top-1 on the 10k test set and agreement/KL with FP32.
    - ``efficientnet-lite0``: calibration on ``omse.zoo.data.calibration_images(32)``, evaluation on
      ``omse.zoo.data.imagenet_views(200)`` (agreement and KL with FP32, labelled top-1).

Settings FP32, W8A8, W4A32, W4A8, W4A4; methods ``minmax``, ``percentile``, ``aciq``, ``mmse``
(the same method for weights and activations) and ``mmse+res10`` (MMSE with residual tensors
within 10% extra MACs, ``QuantConfig(extra_mac_budget=0.10)``); weights ``per_tensor`` and
``per_channel``. A configuration that cannot be built or run is recorded as not available.

Writes ``results/bench_<model>.json`` (after every row, so an interrupted run keeps what it
measured), prints markdown tables, renders ``results/bench.png`` and then runs
``benchmarks/transformer.py`` and, when present, ``benchmarks/peers.py`` as subprocesses.

    python benchmarks/bench.py                 # everything (long: see docs/benchmarks/)
    python benchmarks/bench.py --quick         # smoke run into out/bench-quick
    python benchmarks/bench.py --models fmnist-resnet20 --methods mmse+res10 --merge
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from omse.analysis.metrics import compare_logits, predict
from omse.config import QuantConfig
from omse.io import atomic_write_text
from omse.nn.layers import quantized_layers
from omse.transforms.pipeline import Calibration, quantize

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

ZOO = ("fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg")
MODELS = (*ZOO, "efficientnet-lite0")
SETTINGS: dict[str, tuple[int, int | None]] = {
    "W8A8": (8, 8),
    "W4A32": (4, None),
    "W4A8": (4, 8),
    "W4A4": (4, 4),
}
METHODS = ("minmax", "percentile", "aciq", "mmse", "mmse+res10")
GRANULARITIES = ("per_tensor", "per_channel")
RESIDUAL_BUDGET = 0.10


@dataclass
class Task:
    """One benchmark model: the float model, calibration batches and evaluation data."""

    name: str
    model: nn.Module
    calib: list
    inputs: torch.Tensor
    labels: torch.Tensor | None
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    batch_size: int = 500
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchConfig:
    setting: str
    method: str
    granularity: str

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.method}/{self.granularity}"

    def build(self) -> QuantConfig:
        wb, ab = SETTINGS[self.setting]
        base = self.method.split("+")[0]
        budget = RESIDUAL_BUDGET if "+res" in self.method else 0.0
        kw: dict[str, Any] = {"extra_mac_budget": budget} if budget else {}
        return QuantConfig.preset(
            "fast",
            weight_bits=wb,
            act_bits=ab,
            weight_method=base,
            act_method=base,
            granularity=self.granularity,
            **kw,
        )


def bench_configs(
    settings=tuple(SETTINGS), methods=METHODS, granularities=GRANULARITIES
) -> list[BenchConfig]:
    """The grid in table order (setting, method, granularity)."""
    return [BenchConfig(s, m, g) for s in settings for m in methods for g in granularities]


def run_order(configs: list[BenchConfig]) -> list[BenchConfig]:
    """Most informative rows first, so a run cut short still fills every setting: kernel-wise
    rows (4-bit settings first), then per-tensor min-max/MMSE, then the other per-tensor rows."""
    s_rank = {"W4A8": 0, "W4A4": 1, "W4A32": 2, "W8A8": 3}

    def rank(c: BenchConfig):
        tier = 0 if c.granularity == "per_channel" else 1 if c.method in ("minmax", "mmse") else 2
        m_rank = METHODS.index(c.method) if c.method in METHODS else len(METHODS)
        return (tier, s_rank.get(c.setting, 9), m_rank)

    return sorted(configs, key=rank)


# -- tasks -----------------------------------------------------------------------------------------


def zoo_task(name: str, n_calib: int = 256, n_eval: int | None = None) -> Task:
    """A Fashion-MNIST zoo model (raises ``CheckpointError`` when its weights are missing)."""
    from omse.zoo.tasks import get_task

    task = get_task(name)
    model = task.build()
    xte, yte = task.evaluation(n_eval)
    calib = task.calibration(n_calib)
    return Task(
        name,
        model,
        list(calib.split(64)),
        xte,
        yte,
        None,
        50,  # small batches run several times faster on CPU than 500 (cache)
        {
            "calibration": f"first {n_calib} Fashion-MNIST training images",
            "eval": f"{len(yte)} Fashion-MNIST test images",
            "primary": "top1",
        },
    )


def lite0_task(n_calib: int = 32, n_views: int = 200) -> Task:
    from omse.zoo.tasks import get_task

    task = get_task("efficientnet-lite0")
    model = task.build()
    views, labels = task.evaluation(n_views)  # preprocessed
    return Task(
        "efficientnet-lite0",
        model,
        list(task.calibration(n_calib).split(8)),
        views,
        labels,
        None,
        4,  # 224x224 activations: batches of 4 are 2-3x faster on CPU than 50
        {
            "calibration": f"omse.zoo.data.calibration_images({n_calib}) (scikit-image/matplotlib photos)",
            "eval": f"omse.zoo.data.imagenet_views({n_views}): views of the 20 foolbox ImageNet images",
            "primary": "agreement",
        },
    )


def make_task(name: str, quick: bool = False) -> Task:
    if name in ZOO:
        return zoo_task(name, 64 if quick else 256, 1000 if quick else None)
    if name == "efficientnet-lite0":
        return lite0_task(8 if quick else 32, 40 if quick else 200)
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


# -- running ---------------------------------------------------------------------------------------


def _extra_mac_fraction(q: nn.Module) -> float | None:
    layers = quantized_layers(q).values()
    try:
        total = sum(int(m.macs) for m in layers)
        extra = sum(int(m.extra_macs()) for m in layers)
    except Exception:
        return None
    return extra / total if total else None


def git_commit() -> str | None:
    """The repository's HEAD commit (the code the numbers were measured with), if known."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def _metrics(ref: torch.Tensor, out: torch.Tensor, labels, fp_top1) -> dict[str, Any]:
    a = compare_logits(ref, out, labels)
    return {
        "top1": a.top1,
        "top1_drop": None if a.top1 is None or fp_top1 is None else fp_top1 - a.top1,
        "agreement": a.agreement,
        "kl": a.kl,
    }


def run_task(
    task: Task,
    configs: list[BenchConfig],
    out_json: Path | None = None,
    merge: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate FP32 and every configuration; returns (and writes after each row) the result."""
    t0 = time.perf_counter()
    ref = predict(task.model, task.inputs, task.preprocess, task.batch_size)
    fp_eval = time.perf_counter() - t0
    fp = compare_logits(ref, ref, task.labels)
    fp_row = {
        "key": "FP32",
        "setting": "FP32",
        "method": "-",
        "granularity": "-",
        "status": "ok",
        "top1": fp.top1,
        "top1_drop": 0.0,
        "agreement": 1.0,
        "kl": 0.0,
        "calib_seconds": 0.0,
        "eval_seconds": round(fp_eval, 2),
    }
    rows: dict[str, dict[str, Any]] = {}
    if (merge or resume) and out_json is not None and out_json.is_file():
        old = json.loads(out_json.read_text())
        rows = {r["key"]: r for r in old.get("rows", []) if r["key"] != "FP32"}
    if resume:  # skip what an earlier (interrupted) run measured
        configs = [c for c in configs if rows.get(c.key, {}).get("status") != "ok"]
    result: dict[str, Any] = {
        "model": task.name,
        **task.info,
        "n_eval": int(task.inputs.shape[0]),
        "n_calib": int(sum(b.shape[0] for b in task.calib)),
        "residual_budget": RESIDUAL_BUDGET,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        "commit": git_commit(),
        "rows": [],
    }

    def write() -> None:
        order = {c.key: i for i, c in enumerate(bench_configs())}
        result["rows"] = [fp_row] + sorted(rows.values(), key=lambda r: order.get(r["key"], 1e9))
        if out_json is not None:
            atomic_write_text(out_json, json.dumps(result, indent=2) + "\n", force=True)

    log(f"{task.name}: FP32 top-1 {_pct(fp.top1)} ({task.info.get('eval', '')}, {fp_eval:.1f}s)")
    for c in run_order(configs):
        row: dict[str, Any] = {
            "key": c.key,
            "setting": c.setting,
            "method": c.method,
            "granularity": c.granularity,
        }
        try:
            cfg = c.build()
            cal = Calibration()
            t1 = time.perf_counter()
            with _quiet():
                q = quantize(task.model, task.calib, cfg, calibration=cal)
            t2 = time.perf_counter()
            out = predict(q, task.inputs, task.preprocess, task.batch_size)
            t3 = time.perf_counter()
            row.update(status="ok", **_metrics(ref, out, task.labels, fp.top1))
            row.update(calib_seconds=round(t2 - t1, 2), eval_seconds=round(t3 - t2, 2))
            if cfg.residuals is not None:
                row["extra_mac_fraction"] = _extra_mac_fraction(q)
            msg = (
                f"top-1 {_pct(row['top1'])} agreement {_pct(row['agreement'])} "
                f"kl {row['kl']:.4f} ({t2 - t1:.1f}s + {t3 - t2:.1f}s)"
            )
        except Exception as e:  # record and go on: one bad config must not stop the suite
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            row.update(status="n/a", error=err)
            msg = f"not available ({err})"
            if os.environ.get("OMSE_BENCH_DEBUG"):
                traceback.print_exc()
        rows[c.key] = row
        write()
        log(f"  {c.setting:5s} {c.method:10s} {c.granularity:11s} {msg}")
    write()
    return result


class _quiet:
    """Silence the expected warnings of quantize (e.g. layers left in float) during the suite."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# -- reporting -------------------------------------------------------------------------------------


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def markdown_table(result: dict[str, Any]) -> str:
    """One table per model: a row per setting x method, per-tensor and per-channel side by side."""
    primary = result.get("primary", "top1")
    rows = {r["key"]: r for r in result["rows"]}
    fp = rows.get("FP32", {})

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        if r.get("status") != "ok":
            return "n/a"
        if primary == "top1":
            return f"{_pct(r['top1'], 2)} ({_pct(r['agreement'])})"
        return f"{_pct(r['agreement'])} / {r['kl']:.3f} / {_pct(r['top1'])}"

    what = (
        "top-1 (agreement with FP32)"
        if primary == "top1"
        else "agreement with FP32 / KL / labelled top-1"
    )
    lines = [
        f"**{result['model']}** — {what}; FP32 {cell(fp)}; "
        f"eval: {result.get('eval', '')}; calibration: {result.get('calibration', '')}",
        "",
        "| setting | method | per-tensor | per-channel |",
        "|---|---|---|---|",
    ]
    seen = []
    for r in result["rows"]:
        if r["key"] == "FP32" or (r["setting"], r["method"]) in seen:
            continue
        seen.append((r["setting"], r["method"]))
    for s, m in seen:
        pt = rows.get(f"{s}/{m}/per_tensor")
        pc = rows.get(f"{s}/{m}/per_channel")
        lines.append(f"| {s} | {m} | {cell(pt)} | {cell(pc)} |")
    na = sorted({r.get("error", "") for r in result["rows"] if r.get("status") == "n/a"})
    if na:
        lines += ["", "n/a: " + "; ".join(na)]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path | None:
    """``bench.png``: accuracy drop vs FP32 per method and setting, one panel per model.

    Bars: kernel-wise (per-channel) weights; black markers: per-tensor weights. Zoo panels show
    the top-1 drop on the 10k test set, EfficientNet-Lite0 the disagreement with FP32 (its top-1
    is over 20 labelled images only).
    """
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    colors = dict(zip(METHODS, ("#9e9e9e", "#64b5f6", "#ffb74d", "#1565c0", "#2e7d32")))
    for ax, res in zip(axes[0], results):
        rows = {r["key"]: r for r in res["rows"]}
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in res["rows"])]
        methods = [m for m in METHODS if any(r["method"] == m for r in res["rows"])]
        width = 0.8 / max(len(methods), 1)
        use_top1 = res.get("primary", "top1") == "top1"

        def drop(r, use_top1=use_top1):
            if r is None or r.get("status") != "ok":
                return np.nan
            return 100 * (r["top1_drop"] if use_top1 else 1.0 - r["agreement"])

        x = np.arange(len(settings))
        lows: list[float] = []
        for j, m in enumerate(methods):
            pc = [drop(rows.get(f"{s}/{m}/per_channel")) for s in settings]
            pt = [drop(rows.get(f"{s}/{m}/per_tensor")) for s in settings]
            xs = x - 0.4 + width * (j + 0.5)
            ax.bar(xs, pc, width, color=colors[m], label=m)
            ax.scatter(xs, pt, marker="_", s=90, linewidths=2, color="black", zorder=3)
            lows.extend(v for v in pc + pt if v == v)
        ax.set_xticks(x, settings)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(min([-1.0, *lows]) * 1.2, 100)
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
        fp = rows.get("FP32", {})
        if use_top1:
            ax.set_ylabel("top-1 drop vs FP32 (pp)")
            ax.set_title(f"{res['model']} (FP32 {_pct(fp.get('top1'), 2)})", fontsize=10)
        else:
            ax.set_ylabel("disagreement with FP32 (%)")
            ax.set_title(f"{res['model']} ({res.get('n_eval')} views)", fontsize=10)
    axes[0][0].legend(fontsize=8, loc="upper left", title="bars: per-channel\n— per-tensor")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_results(out_dir: Path, models=MODELS) -> list[dict[str, Any]]:
    out = []
    for m in models:
        p = out_dir / f"bench_{m}.json"
        if p.is_file():
            out.append(json.loads(p.read_text()))
    return out


def run_script(script: Path, args: list[str], log=print) -> int | None:
    """Run a sibling benchmark as a subprocess (its output streams through); None if absent."""
    if not script.is_file():
        log(f"({script.relative_to(ROOT)} not present; skipped)")
        return None
    log(f"\n$ {Path(sys.executable).name} {script.relative_to(ROOT)} {' '.join(args)}")
    rc = subprocess.call([sys.executable, str(script), *args], cwd=ROOT)
    if rc:
        log(f"warning: {script.name} exited with status {rc}")
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--granularities", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: small data, few configs")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default results/)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP)")
    ap.add_argument("--merge", action="store_true", help="update rows of existing JSON files")
    ap.add_argument("--resume", action="store_true", help="keep measured rows, run the rest")
    ap.add_argument("--plot-only", action="store_true", help="only re-render bench.png")
    ap.add_argument("--no-transformer", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args(argv)

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    out_dir = args.out or (ROOT / ("out/bench-quick" if args.quick else "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sub_args = ["--out", str(out_dir)] + (["--quick"] if args.quick else [])
    if threads:
        sub_args += ["--threads", str(threads)]

    if not args.plot_only:
        if args.quick:
            configs = [
                BenchConfig("W8A8", "mmse", "per_channel"),
                *[BenchConfig("W4A8", m, "per_channel") for m in ("minmax", "mmse", "mmse+res10")],
                BenchConfig("W4A8", "mmse", "per_tensor"),
            ]
        else:
            configs = bench_configs(args.settings, args.methods, args.granularities)
        for name in args.models:
            try:
                task = make_task(name, args.quick)
            except Exception as e:
                print(f"{name}: skipped ({type(e).__name__}: {str(e).splitlines()[0]})")
                continue
            t0 = time.perf_counter()
            res = run_task(
                task, configs, out_dir / f"bench_{name}.json", merge=args.merge, resume=args.resume
            )
            print(f"{name}: {time.perf_counter() - t0:.0f}s\n")
            print(markdown_table(res) + "\n")
    png = plot(load_results(out_dir), out_dir / "bench.png")
    if png:
        print(f"wrote {png}")
    if args.plot_only:
        return 0
    if not args.no_transformer:
        run_script(HERE / "transformer.py", sub_args)
    if not args.no_peers:
        run_script(HERE / "peers.py", ["--quick"] if args.quick else [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
