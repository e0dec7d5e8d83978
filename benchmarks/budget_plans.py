"""Per-layer precision under a byte budget against uniform 4-bit and random plans of the same bytes,
on held-out labelled data: CIFAR-10 ResNet-20 and EfficientNet-Lite0 (ImageNet).

Data and splits are those of ``benchmarks/cifar_resnets.py`` (``calibration_split(10000, 256,
seed=0)``: 256 CIFAR-10 test images calibrate, the other 9744 are evaluated) and
``benchmarks/imagenet.py`` (``calibration_split(1300, 64, seed=0)``: 64 images calibrate, the
other 1236 are evaluated); their loaders and preprocessing are imported, not copied. Calibration
and evaluation images never overlap.

Rows per model, all of them the default recipe (W4A8, MMSE, residual tensors within 10% extra
MACs, bias correction) unless said otherwise:

- ``fp32``;
- ``uniform8``: ``QuantConfig(weight_bits=8, budget=None)``;
- ``uniform4``: ``QuantConfig(budget=None)``, every layer at 4 bits;
- ``chosen@Bx``: ``QuantConfig(budget=Budget(B, guard_db=None))``, the plan omse chooses (each
  layer 4 or 8 bits by its estimated output error, exact knapsack within B of the 8-bit weight
  bytes);
- ``random@Bx#k``: the same config with every layer's ``weight_bits`` set by ``overrides``: a
  random assignment of layers to 4 or 8 bits whose weight bytes, counted as the budget counts
  them (:func:`omse.transforms.precision.weight_bytes`: packed codes, scales, int32 bias), are as
  close as the draw gets to the chosen plan's widths' bytes and never above them. With every
  layer's bits fixed, the budget selects nothing, and the residual tensors are chosen exactly as
  for the chosen plan (among the layers below 8 bits, 10% of their MACs, their bytes within what
  the widths leave of the budget): the two differ in which layers are 4-bit and nothing else.
- ``--lite-extra`` recipes (``NAME:k=v,...`` as in imagenet.py), e.g. the ``best`` preset at 0.6x.

Bytes are the file's: every layer's weight bytes at its width plus its residual terms' bytes as
the target writes them (:func:`omse.transforms.precision.residual_bytes`; on ``target="int4"``
a cut term's kernels, scales and kernel indices), against every layer at 8 bits without
residual tensors (``bytes_fraction``; ``weight_bytes`` and ``residual_bytes`` apart).

Reported: labelled top-1 with its 95% Wilson interval, top-1 agreement with FP32, weight bytes as
a fraction of the 8-bit weight bytes; for random plans the median and range over draws.

    python benchmarks/budget_plans.py [--data ../shared/data] [--models resnet20,lite0]
        [--budgets 0.55,0.6,0.7,0.8] [--draws 10] [--lite-budgets 0.6] [--lite-draws 3]
        [--lite-extra NAME:k=v ...] [--skip-uniform] [--no-plans] [--replay] [--seed 0]
        [--threads 2] [--limit N] [--out results/budget_plans.json]
        [--png results/budget_plans.png] [--plot-only [--merge A.json B.json ...]]

``--lite-extra`` takes two experiment keys besides QuantConfig fields: ``centered=true`` (the
plan from :func:`omse.transforms.precision.output_errors` with ``centered=True``) and
``probe_samples=N`` (the precision estimate's ``PROBE_SAMPLES`` for that row).

Prints markdown and writes ``--out`` (rows of an earlier run with the same protocol are kept, so
the models and extra recipes may be measured in separate runs) and the plot ``--png``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet  # noqa: E402
from heldout import (  # noqa: E402
    DEFAULT_DATA,
    ROOT,
    evaluate,
    machine,
    merge_rows,
    parse_recipe,
    pct,
    quantize_recipe,
    split_top,
)

from omse.nn.layers import quantized_layers  # noqa: E402
from omse.runtime import tune_allocator  # noqa: E402
from omse.transforms import pipeline  # noqa: E402
from omse.transforms.precision import output_errors, residual_bytes, weight_bytes  # noqa: E402
from omse.zoo.labelled import (  # noqa: E402
    calibration_split,
    cifar_normalize,
    cifar_resnet,
    imagenet_val_labels,
    load_cifar10_test,
    load_imagenet_val,
)
from omse.zoo.models import LITE_SIZES, efficientnet_lite  # noqa: E402

MODELS = {"resnet20": "cifar10-resnet20", "lite0": "efficientnet-lite0"}
KEY = ("model", "row")


def layer_bytes(q: torch.nn.Module, target: str) -> dict[str, tuple[int, int]]:
    """``{layer: (bytes at 4 bits, bytes at 8 bits)}`` as the budget counts them."""
    return {
        n: (weight_bytes(ql, 4, target), weight_bytes(ql, 8, target))
        for n, ql in quantized_layers(q).items()
    }


def model_bytes(q: torch.nn.Module, target: str) -> tuple[dict[str, int], int, int, int]:
    """``(bits per layer, weight bytes, residual terms' bytes, weight bytes with every layer at
    8 bits)``, as ``target`` writes them."""
    layers = quantized_layers(q)
    bits = {n: int(ql.cfg.weight_bits) for n, ql in layers.items()}
    used = sum(weight_bytes(ql, bits[n], target) for n, ql in layers.items())
    extra = sum(residual_bytes(ql, target) for ql in layers.values())
    eight = sum(weight_bytes(ql, 8, target) for ql in layers.values())
    return bits, used, extra, eight


def random_plan(
    sizes: dict[str, tuple[int, int]], cap: int, rng: random.Random, passes: int = 4
) -> dict[str, int]:
    """A random assignment of layers to 4 or 8 bits with bytes <= ``cap``, as close to ``cap``
    as a random fill and a few swap passes get: layers taken to 8 bits in a random order while
    they fit (a maximal random subset), then single swaps (one 8-bit layer back to 4, one 4-bit
    layer to 8) that bring the bytes closer to ``cap`` without passing it, tried in random
    order. ``sizes``: ``{layer: (bytes at 4, bytes at 8)}``."""
    names = list(sizes)
    rng.shuffle(names)
    total = sum(b4 for b4, _ in sizes.values())
    eight: set[str] = set()
    for n in names:
        d = sizes[n][1] - sizes[n][0]
        if total + d <= cap:
            eight.add(n)
            total += d
    for _ in range(passes):
        improved = False
        outs, ins = sorted(eight), sorted(set(names) - eight)
        rng.shuffle(outs)
        rng.shuffle(ins)
        for o in outs:
            do = sizes[o][1] - sizes[o][0]
            best = None
            for i in ins:
                di = sizes[i][1] - sizes[i][0]
                t = total - do + di
                if total < t <= cap and (best is None or t > best[1]):
                    best = (i, t)
            if best is not None:
                eight.discard(o)
                eight.add(best[0])
                ins.remove(best[0])
                ins.append(o)
                total = best[1]
                improved = True
        if not improved:
            break
    return {n: 8 if n in eight else 4 for n in sizes}


def load(model_key: str, data: Path, limit: int | None):
    """``(model, calibration batches, eval images, eval labels, pre, batch, protocol)``."""
    if model_key == "resnet20":
        cifar = data / "cifar10"
        x, y = load_cifar10_test(cifar / "test-png")
        calib_idx, eval_idx = calibration_split(len(y), 256, 0)
        if limit:
            eval_idx = eval_idx[:limit]
        model, _ = cifar_resnet(20, cifar / "resnets")
        calib = list(cifar_normalize(x[calib_idx]).split(64))
        return model, calib, x[eval_idx], y[eval_idx], cifar_normalize, 500
    root = data / "imagenet-val-1300"
    files, _ = imagenet_val_labels(root)
    calib_idx, eval_idx = calibration_split(len(files), 64, 0)
    if limit:
        eval_idx = eval_idx[:limit]
    size = LITE_SIZES[0]
    xe, ye = load_imagenet_val(root, size, eval_idx)
    xc, _ = load_imagenet_val(root, size, calib_idx)
    return efficientnet_lite(0), list(imagenet.pre(xc).split(8)), xe, ye, imagenet.pre, 50


def centered_output_errors(model, layers, candidates, batches, probes=1, seed=0):
    """The precision estimate with ``centered=True`` (:func:`omse.transforms.precision.
    output_errors`): each candidate's output change less its mean per output channel, the part
    bias correction leaves. An experiment: the pipeline's default estimate is not centred."""
    return output_errors(model, layers, candidates, batches, probes, seed, centered=True)


def run_recipe(model, calib, xe, ye, pre, batch, ref, desc, kw, probe_samples=None, centered=False):
    """Quantize with ``kw`` (``probe_samples``: the precision estimate's samples per probe
    count, :data:`omse.transforms.pipeline.PROBE_SAMPLES`, for this run; ``centered``: the
    estimate of :func:`centered_output_errors`), evaluate, count bytes."""
    old, old_errors = pipeline.PROBE_SAMPLES, pipeline.output_errors
    if probe_samples is not None:
        pipeline.PROBE_SAMPLES = probe_samples
    if centered:
        pipeline.output_errors = centered_output_errors
    try:
        q, info = quantize_recipe(model, calib, kw)
    finally:
        pipeline.PROBE_SAMPLES, pipeline.output_errors = old, old_errors
    r, _ = evaluate(q, xe, ye, pre, batch, desc, ref)
    target = info["config"]["target"]
    bits, used, extra, eight = model_bytes(q, target)
    sizes = layer_bytes(q, target)
    out = {**info, **r, "bits": bits, "weight_bytes": used, "residual_bytes": extra}
    out["bytes_8bit"] = eight
    out["bytes_fraction"] = (used + extra) / eight  # the file's, residual tensors included
    out["layers_4bit"] = sum(1 for b in bits.values() if b <= 4)
    out["layers"] = len(bits)
    del q
    return out, sizes


def measure(args, model_key, budgets, draws, extras, head, rows) -> None:
    name = MODELS[model_key]
    model, calib, xe, ye, pre, batch = load(model_key, args.data, args.limit)
    r, ref = evaluate(model, xe, ye, pre, batch, f"{name} fp32")
    rows.append({"model": name, "row": "fp32", "kind": "fp32", **r})
    print(f"{name} fp32: {pct(r)}", flush=True)

    def add(row_name, kind, kw, budget=None, draw=None, probe_samples=None, centered=False):
        t0 = time.perf_counter()
        out, sizes = run_recipe(model, calib, xe, ye, pre, batch, ref, f"{name} {row_name}", kw,
                                probe_samples, centered)  # fmt: skip
        row = {"model": name, "row": row_name, "kind": kind, "budget": budget, "draw": draw}
        row |= out | {"torch_threads": args.threads}
        if probe_samples is not None:
            row["probe_samples"] = probe_samples
        if centered:
            row["centered_estimate"] = True
        rows.append(row)
        merge_rows(args.out, head, rows, KEY)
        print(
            f"{name} {row_name}: {pct(out)}, agreement {100 * out['agreement']:.1f}%, "
            f"{out['bytes_fraction']:.3f}x of 8-bit bytes in the file ({out['layers_4bit']}/{out['layers']} "
            f"layers 4-bit), calib {out['calib_seconds']:.0f} s, "
            f"{time.perf_counter() - t0:.0f} s in all",
            flush=True,
        )
        return out, sizes

    if not args.skip_uniform:
        add("uniform8", "uniform8", {"weight_bits": 8, "budget": None})
        add("uniform4", "uniform4", {"budget": None})
    rng = random.Random(args.seed)
    chosen = {}
    for b in budgets:
        kw = {"budget": {"weight_bytes": b, "guard_db": None}}
        chosen[b] = add(f"chosen@{b:g}x", "chosen", kw, budget=b)
        if args.replay and b == budgets[0]:  # the chosen plan given through overrides: the same
            ov = {n: {"weight_bits": bits} for n, bits in chosen[b][0]["bits"].items()}
            add(f"replay@{b:g}x", "replay", {**kw, "overrides": ov}, budget=b)
    for k in range(draws):  # draw k of every budget before draw k + 1 of any
        for b in budgets:
            kw = {"budget": {"weight_bytes": b, "guard_db": None}}
            out, sizes = chosen[b]
            bits = random_plan(sizes, out["weight_bytes"], rng)
            ov = {n: {"weight_bits": v} for n, v in bits.items()}
            add(f"random@{b:g}x#{k}", "random", {**kw, "overrides": ov}, budget=b, draw=k)
    for spec in extras:
        rname, kw = spec
        ps, centered = kw.pop("probe_samples", None), kw.pop("centered", False)
        b = kw.get("budget")
        add(rname, "extra", kw, budget=b.get("weight_bytes") if isinstance(b, dict) else b,
            probe_samples=ps, centered=centered)  # fmt: skip


def summary(result: dict) -> list[dict]:
    """Per model and budget: the chosen plan against the random draws."""
    out = []
    rows = result["rows"]
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        for c in sorted((r for r in rs if r["kind"] == "chosen"), key=lambda r: r["budget"]):
            rand = [r for r in rs if r["kind"] == "random" and r["budget"] == c["budget"]]
            if not rand:
                continue
            t = [r["top1"] for r in rand]
            a = [r["agreement"] for r in rand]
            fr = [r["bytes_fraction"] for r in rand]
            out.append({
                "model": model,
                "budget": c["budget"],
                "chosen_top1": c["top1"],
                "chosen_agreement": c["agreement"],
                "chosen_bytes_fraction": c["bytes_fraction"],
                "random_draws": len(rand),
                "random_top1_median": statistics.median(t),
                "random_top1_range": [min(t), max(t)],
                "random_agreement_median": statistics.median(a),
                "random_agreement_range": [min(a), max(a)],
                "random_bytes_fraction_range": [min(fr), max(fr)],
                "chosen_beats_draws_top1": sum(c["top1"] > v for v in t),
                "chosen_beats_draws_agreement": sum(c["agreement"] > v for v in a),
            })  # fmt: skip
    return out


def tables(result: dict) -> str:
    lines = []
    rows = result["rows"]
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        lines += [f"### {model}", "",
                  "| row | file weight bytes (x 8-bit) | 4-bit layers | top-1 % [95% CI] | agreement "
                  "with FP32 | extra MACs | calib s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        order = {"fp32": 0, "uniform8": 1, "uniform4": 2, "chosen": 3, "replay": 4, "extra": 6}
        for r in sorted(
            rs, key=lambda r: (order.get(r["kind"], 5), r.get("budget") or 0, r["row"])
        ):
            if r["kind"] == "random":
                continue
            if r["kind"] == "fp32":
                lines.append(f"| fp32 | - | - | {pct(r)} | - | - | - |")
                continue
            lines.append(
                f"| {r['row']} | {r['bytes_fraction']:.3f} | {r['layers_4bit']}/{r['layers']} | "
                f"{pct(r)} | {100 * r['agreement']:.1f}% | {100 * r['extra_macs_fraction']:.1f}% "
                f"| {r['calib_seconds']:.0f} |"
            )
        lines.append("")
        summ = [s for s in result.get("summary", []) if s["model"] == model]
        if summ:
            lines += ["| budget | chosen: bytes, top-1, agreement | random (n): bytes range | "
                      "random top-1 median [range] | random agreement median [range] | chosen "
                      "above draws (top-1 / agreement) |", "|---|---|---|---|---|---|"]  # fmt: skip
            for s in summ:
                lo, hi = s["random_top1_range"]
                alo, ahi = s["random_agreement_range"]
                flo, fhi = s["random_bytes_fraction_range"]
                n = s["random_draws"]
                lines.append(
                    f"| {s['budget']:g}x | {s['chosen_bytes_fraction']:.3f}, "
                    f"{100 * s['chosen_top1']:.2f}%, {100 * s['chosen_agreement']:.1f}% | "
                    f"({n}) {flo:.3f}-{fhi:.3f} | {100 * s['random_top1_median']:.2f} "
                    f"[{100 * lo:.2f}, {100 * hi:.2f}] | {100 * s['random_agreement_median']:.1f}% "
                    f"[{100 * alo:.1f}, {100 * ahi:.1f}] | {s['chosen_beats_draws_top1']}/{n} / "
                    f"{s['chosen_beats_draws_agreement']}/{n} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Labelled top-1 (top row) and agreement with FP32 (bottom row) against weight bytes, one
    column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    models = [m for m in MODELS.values() if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        rs = [r for r in rows if r["model"] == model]
        for ax, key, what in ((axes[0][col], "top1", "labelled top-1 %"),
                              (axes[1][col], "agreement", "top-1 agreement with FP32 %")):  # fmt: skip
            fp = [r for r in rs if r["kind"] == "fp32"]
            if fp and key == "top1":
                ax.axhline(100 * fp[0]["top1"], color="k", ls=":", lw=1, label="FP32")
            rand = [r for r in rs if r["kind"] == "random"]
            if rand:
                ax.scatter([r["bytes_fraction"] for r in rand], [100 * r[key] for r in rand],
                           s=14, color="tab:gray", alpha=0.7, label="random plans, same bytes")  # fmt: skip
            ch = sorted((r for r in rs if r["kind"] == "chosen"), key=lambda r: r["bytes_fraction"])
            if ch:
                ax.plot([r["bytes_fraction"] for r in ch], [100 * r[key] for r in ch], "o-",
                        color="tab:blue", label="chosen plan, Budget(b, guard_db=None)")  # fmt: skip
            for kind, style, color, label in (("uniform4", "s", "tab:red", "uniform 4-bit"),
                                              ("uniform8", "D", "tab:green", "uniform 8-bit")):  # fmt: skip
                for r in rs:
                    if r["kind"] == kind:
                        ax.plot(r["bytes_fraction"], 100 * r[key], style, color=color, label=label)
            markers = iter("*^vP")
            for r in rs:
                if r["kind"] == "extra":
                    ax.plot(r["bytes_fraction"], 100 * r[key], next(markers, "x"), ms=9,
                            label=r["row"])  # fmt: skip
            n = rs[0]["n"] if rs else 0
            ax.set_title(f"{model}: {n} held-out labelled images", fontsize=10)
            ax.set_xlabel(
                "weight bytes in the file, residual tensors included / 8-bit weight bytes"
            )
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", default="resnet20,lite0")
    ap.add_argument(
        "--budgets",
        default="0.55,0.6,0.7,0.8",
        help="ResNet-20 budgets (every layer at 4 bits is 0.508x)",
    )
    ap.add_argument("--draws", type=int, default=10, help="random plans per ResNet-20 budget")
    ap.add_argument("--lite-budgets", default="0.6")
    ap.add_argument("--lite-draws", type=int, default=3)
    ap.add_argument("--lite-extra", nargs="*", default=[],
                    help="extra Lite0 recipes NAME:k=v,... (experiments: probe_samples=N sets "
                    "the precision estimate's PROBE_SAMPLES for that row, centered=true its "
                    "bias-corrected estimate)")  # fmt: skip
    ap.add_argument("--skip-uniform", action="store_true", help="no uniform4/uniform8 rows")
    ap.add_argument("--no-plans", action="store_true", help="no chosen/random rows (extras only)")
    ap.add_argument("--replay", action="store_true",
                    help="also the first budget's chosen plan through overrides (a check)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the random plans")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "budget_plans.json")
    ap.add_argument("--png", type=Path, default=ROOT / "results" / "budget_plans.png")
    ap.add_argument("--plot-only", action="store_true", help="tables and plot from --out")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="with --plot-only: first merge the rows of these JSON files (runs of "
                    "the models side by side) into --out")  # fmt: skip
    args = ap.parse_args(argv)
    protocol = {
        "cifar10-resnet20": "cifar10/test-png: calibration_split(10000, 256, seed=0) calibrates, "
        "the other 9744 test images evaluated",
        "efficientnet-lite0": "imagenet-val-1300, 8/7 resize + centre crop 224: "
        "calibration_split(1300, 64, seed=0) calibrates, the other 1236 evaluated",
        "limit": args.limit,
        "random_plans": f"random.Random({args.seed}), one stream per run, drawn in row order",
    }
    head = {"benchmark": "budget_plans", "protocol": protocol, "machine": machine()}
    if args.plot_only:
        import json

        for path in args.merge:
            part = json.loads(path.read_text())
            if part.get("protocol") != protocol:
                ap.error(f"--merge {path}: another protocol")
            head["machine"] = part["machine"]
            merge_rows(args.out, head, part["rows"], KEY)
        result = json.loads(args.out.read_text())
    else:
        try:
            extras = [_parse_extra(s) for s in args.lite_extra]
        except Exception as e:
            ap.error(f"--lite-extra: {e}")
        torch.set_num_threads(args.threads)
        tune_allocator()
        head["machine"] = machine()
        rows: list[dict] = []
        t0 = time.perf_counter()
        for m in [m for m in args.models.split(",") if m]:
            if m not in MODELS:
                ap.error(f"--models: unknown {m!r}; use {list(MODELS)}")
            lite = m == "lite0"
            budgets = [
                float(b) for b in (args.lite_budgets if lite else args.budgets).split(",") if b
            ]
            if args.no_plans:
                budgets = []
            draws = args.lite_draws if lite else args.draws
            measure(args, m, budgets, draws, extras if lite else [], head, rows)
        result = merge_rows(args.out, head, rows, KEY)
        print(f"{time.perf_counter() - t0:.0f} s in all", flush=True)
    result["summary"] = summary(result)
    merge_rows(args.out, {k: v for k, v in result.items() if k != "rows"}, [], KEY)
    plot(result, args.png)
    print(tables(result))
    return 0


def _parse_extra(spec: str) -> tuple[str, dict]:
    """``parse_recipe`` with the experiment keys ``probe_samples=N`` and ``centered=true``
    allowed (not QuantConfig fields)."""
    name, _, rest = spec.partition(":")
    extra, parts = {}, []
    for item in split_top(rest):
        k, _, v = item.partition("=")
        if k.strip() == "probe_samples":
            extra["probe_samples"] = int(v)
        elif k.strip() == "centered":
            extra["centered"] = v.strip().lower() == "true"
        elif item.strip():
            parts.append(item)
    name, kw = parse_recipe(f"{name}:{','.join(parts)}")
    return name, {**kw, **extra}


if __name__ == "__main__":
    sys.exit(main())
