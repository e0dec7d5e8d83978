"""Labelled CIFAR-10 top-1 of the pretrained ResNet-20/32/44/56 at W4A32 / W4A8 / W4A4, in the
shape of the PTQ literature's tables: first and last layer at 8 bits, or every layer at 4 bits.

Data: ``<data>/cifar10/test-png/<class>/*.png``, the 10,000 CIFAR-10 *test* images as lossless
PNG, class index = sorted folder name (from the GitHub repository cyizhuo/CIFAR-10-dataset, or
written from the official python batches of https://www.cs.toronto.edu/~kriz/cifar.html), and
``<data>/cifar10/resnets/resnet{20,32,44,56}-*.th``, the pretrained models of
akamaster/pytorch_resnet_cifar10 (``pretrained_models/``, BSD-2-Clause; stated top-1 91.78 /
92.78 / 93.14 / 93.62%), loaded with ``torch.load(weights_only=True)`` into
``omse.zoo.labelled.CifarResNet``.

Protocol: no CIFAR-10 training images are in the data folder, so ``--calib 256`` test images
drawn by ``omse.zoo.labelled.calibration_split(10000, 256, seed=--seed)`` calibrate every
recipe and are excluded from evaluation: the other 9744 are evaluated (FP32 also on all 10,000,
to check the stated figures). Reported: labelled top-1 with its 95% Wilson interval, agreement
with FP32 and calibration seconds, quantized models evaluated in torch (simulated quantization).

Settings: ``W4A32`` (float activations), ``W4A8``, ``W4A4``. ``--ends 8bit`` gives ``conv1`` and
``linear`` 8-bit weights (and 8-bit input activations where the others are quantized), as the
literature does; ``--ends 4bit`` leaves every layer at the setting's bits. Recipes are omse's
presets (``QuantConfig.preset(p, weight_bits=.., act_bits=.., overrides=..)``); ``--uniform``
keeps every layer at the setting's bits (``budget=None``, no float fallback), the shape of the
literature's tables and the peers' rows.

    python benchmarks/cifar_resnets.py [--data ../shared/data] [--depths 20] [--settings W4A8]
        [--ends 8bit,4bit] [--presets fast,default] [--budget F [--guard-db D|off] | --uniform]
        [--calib 256] [--seed 0] [--threads 2]
        [--peers brevitas,nncf,aimet] [--adaround-iters 1000] [--aimet-path DIR]
        [--out results/cifar_resnets.json]

Prints markdown tables and writes ``--out`` (rows of an earlier run with the same protocol and
other cells are kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import (  # noqa: E402
    DEFAULT_DATA,
    ROOT,
    accuracy,
    counts,
    evaluate,
    machine,
    merge_rows,
    pct,
    quantize_recipe,
)

from omse.runtime import tune_allocator  # noqa: E402
from omse.zoo.labelled import (  # noqa: E402
    calibration_split,
    cifar_normalize,
    cifar_resnet,
    load_cifar10_test,
)

SETTINGS = {"W4A32": (4, None), "W4A8": (4, 8), "W4A4": (4, 4)}
ENDS = ("conv1", "linear")
PUBLISHED: list[dict] = [
    {
        "method": "PACT (quantization-aware training, not PTQ)",
        "setting": "W4A4, first/last layer 8-bit",
        "top1": 90.8,
        "fp32": None,
        "source": "Choi et al. 2018, PACT, Table 2 (4-bit error 9.2%), as quoted by the "
        "KwangHoonAn/PACT README (GitHub), whose reproduction from akamaster's pretrained "
        "ResNet-20 (this model) reaches 9.11% error (90.89%)",
    },
]
"""Published numbers on CIFAR-10 ResNet-20 to put beside ours. No post-training (PTQ) figure
for this model at W4A8/W4A4 was found in the sources searched; the one found is trained (QAT),
an upper reference rather than a like-for-like comparison."""

ORDER = {"fast": 0, "default": 1, "best": 2}


def _sort_key(r: dict) -> tuple:
    return (
        list(SETTINGS).index(r["setting"]),
        r["ends"] != "8bit",
        ORDER.get(r["preset"], 3),
        r["preset"],
    )


def recipe(preset: str, setting: str, ends: str) -> dict:
    """QuantConfig kwargs of one cell."""
    wb, ab = SETTINGS[setting]
    kw = {"preset": preset, "weight_bits": wb, "act_bits": ab}
    if ends == "8bit":
        kw["overrides"] = {n: {"weight_bits": 8, "act_bits": 8 if ab else None} for n in ENDS}
    return kw


def aimet_register_shortcut(aimet_path) -> None:
    """Give AIMET a quantized definition of the option-A shortcut (``_PadShortcut``: stride-2
    subsampling and zero channel padding, no weights), which its QuantizationSimModel refuses as
    an unknown module otherwise; done once, in AIMET's documented way
    (``QuantizationMixin.implements``). Its quantizer slots are the default (one input, one
    output) and AIMET's config decides which are enabled, as for any other op."""
    import peers

    if "_PadShortcut" in _AIMET_REGISTERED:
        return
    try:
        peers.load_aimet(aimet_path)
    except peers.Refused:
        return  # peers.unavailable / the runner report it
    from aimet_torch.nn import QuantizationMixin

    from omse.zoo.labelled import _PadShortcut

    @QuantizationMixin.implements(_PadShortcut)
    class QuantizedPadShortcut(QuantizationMixin, _PadShortcut):
        def forward(self, x):
            if self.input_quantizers[0] is not None:
                x = self.input_quantizers[0](x)
            out = super().forward(x)
            if self.output_quantizers[0] is not None:
                out = self.output_quantizers[0](out)
            return out

    _AIMET_REGISTERED.add("_PadShortcut")


_AIMET_REGISTERED: set[str] = set()


def peer_rows(
    tools, depth, model, calib, xe, ye, settings, adaround_iters=1000, aimet_path=None
) -> list[dict]:
    """benchmarks/peers.py's recipes of ``tools`` (their own defaults: every layer at the
    setting's bits) on the same calibration and evaluation images. AIMET's AdaRound runs
    ``adaround_iters`` iterations per layer (peers.py's figure for its small networks; AIMET's
    own default, 10000, takes hours on this CPU); ``aimet_path``: where aimet-torch was installed
    with ``--no-deps`` (see ``peers.load_aimet``)."""
    import peers

    wl = peers.Workload(
        f"cifar10-resnet{depth}", model, calib, cifar_normalize(xe), ye, eval_batch=500
    )
    cache: dict = {}
    out = []
    if "aimet" in tools:
        aimet_register_shortcut(aimet_path)
    for m in peers.methods(tools, adaround_iters, aimet_path):
        for s in settings:
            if m.settings is not None and s not in m.settings:
                continue
            wb, ab = SETTINGS[s]
            if why := peers.unavailable(m):
                print(f"ResNet-{depth} {m.label} {s}: unavailable ({why})", flush=True)
                continue
            row = peers.evaluate(wl, m.tool, None, m.config, m.runner, wb, ab, cache)
            name = f"{s}/4bit/{m.tool} {m.config}"
            rec = {"depth": depth, "recipe": name, "setting": s, "ends": "4bit"}
            label = m.label
            if m.tool == "aimet" and "adaround" in m.config:
                label += f", {adaround_iters} iterations/layer"
            rec |= {"preset": f"{label} ({peers.method_version(m)})", "kwargs": row.kwargs}
            if row.notes:
                rec |= {"notes": row.notes}
            rec |= {"calib_seconds": row.calib_seconds, "extra_macs_fraction": 0.0}
            if row.top1 is None:
                rec |= {"refused": row.refused}
            else:
                rec |= counts(round(row.top1 * row.n_eval), row.n_eval)
                rec |= {"agreement": row.agreement, "eval_seconds": row.eval_seconds}
            out.append(rec)
    return out


def tables(result: dict) -> str:
    rows = result["rows"]
    out = []
    for depth in sorted({r["depth"] for r in rows}):
        rs = [r for r in rows if r["depth"] == depth]
        fp = [r for r in rs if r["recipe"] == "fp32"]
        head = f"### ResNet-{depth}"
        if fp:
            f = fp[0]
            head += (
                f": FP32 {pct(f)} on the {f['n']} evaluated; {100 * f['top1_all10k']:.2f}% on "
                f"all 10,000 (stated {f['stated']:.2f}%)"
            )
        out += [
            head,
            "",
            "| setting | first/last layer | recipe | top-1 % [95% CI] | agreement with FP32 "
            "| extra MACs | calib s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in rs if r["recipe"] != "fp32"), key=_sort_key):
            if "top1" not in r:
                out.append(
                    f"| {r['setting']} | 4-bit | {r['preset']} | refused: "
                    f"{r.get('refused', '')[:80]} | - | - | - |"
                )
                continue
            label = r["preset"]
            if r["recipe"].endswith("@uniform"):
                label += " (`--uniform`: every layer at the setting's bits)"
            out.append(
                f"| {r['setting']} | {'8-bit' if r['ends'] == '8bit' else '4-bit'} | "
                f"{label} | {pct(r)} | {100 * r['agreement']:.1f}% | "
                f"{100 * r['extra_macs_fraction']:.1f}% | {r['calib_seconds']:.0f} |"
            )
        out.append("")
    for p in result.get("published", []):
        out.append(f"Published: {p['method']}, {p['setting']}: {p['top1']}% ({p['source']}).")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of cifar10/")
    ap.add_argument("--depths", default="20")
    ap.add_argument("--settings", default="W4A8")
    ap.add_argument("--ends", default="8bit,4bit")
    ap.add_argument("--presets", default="fast,default")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="the weight budget of the presets' per-layer precision (a fraction of the 8-bit "
        "bytes), with --guard-db (a number, or off); rows named PRESET@BUDGETx[-noguard]",
    )
    ap.add_argument("--guard-db", default="3")
    ap.add_argument(
        "--uniform",
        action="store_true",
        help="every layer at the setting's bits, as the literature's tables and the peers: no "
        "per-layer precision (budget=None) and no float fallback (fallback_db=None); rows named "
        "PRESET@uniform",
    )
    ap.add_argument(
        "--peers",
        default="",
        help="brevitas,nncf,aimet: benchmarks/peers.py's recipes, all layers 4-bit (run aimet "
        "without nncf: NNCF's torch patches break AIMET's QuantSim in the same process)",
    )
    ap.add_argument(
        "--adaround-iters", type=int, default=1000, help="AIMET AdaRound iterations per layer"
    )
    ap.add_argument(
        "--aimet-path",
        default=os.environ.get("OMSE_AIMET_PATH"),
        help="directory holding aimet_torch installed with --no-deps (env OMSE_AIMET_PATH)",
    )
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N held-out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cifar_resnets.json")
    args = ap.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    ends = [e for e in args.ends.split(",") if e]
    presets = [p for p in args.presets.split(",") if p]
    if bad := [s for s in settings if s not in SETTINGS]:
        ap.error(f"--settings: unknown {bad}; use {list(SETTINGS)}")
    if args.uniform and args.budget is not None:
        ap.error("--uniform and --budget: choose one")
    if bad := [e for e in ends if e not in ("8bit", "4bit")]:
        ap.error(f"--ends: unknown {bad}; use 8bit, 4bit")
    torch.set_num_threads(args.threads)
    tune_allocator()
    cifar = args.data / "cifar10"
    x, y = load_cifar10_test(cifar / "test-png")
    calib_idx, eval_idx = calibration_split(len(y), args.calib, args.seed)
    if args.limit:
        eval_idx = eval_idx[: args.limit]
    xe, ye = x[eval_idx], y[eval_idx]
    calib = list(cifar_normalize(x[calib_idx]).split(64))
    protocol = {
        "data": "cifar10/test-png (the 10,000 CIFAR-10 test images), [0,1] then ImageNet mean/std",
        "calibration": f"calibration_split({len(y)}, {args.calib}, seed={args.seed}): "
        f"{args.calib} test images, excluded from evaluation",
        "evaluated": (
            f"the first {len(eval_idx)} of the other {len(y) - args.calib} test images"
            if args.limit
            else f"the other {len(eval_idx)} test images"
        ),
    }
    head = {
        "benchmark": "cifar_resnets",
        "protocol": protocol,
        "calibration_indices": calib_idx.tolist(),
        "machine": machine(),
        "published": PUBLISHED,
    }
    rows = []
    key = ("depth", "recipe")
    t_all = time.perf_counter()
    for depth in [int(d) for d in args.depths.split(",") if d]:
        model, stated = cifar_resnet(depth, cifar / "resnets")
        r_all, pred_all = evaluate(model, x, y, cifar_normalize, args.batch, f"resnet{depth} fp32")
        ref = pred_all[eval_idx]  # FP32 on the evaluated images: the same pass, not another
        r = accuracy(ref, ye) | {"eval_seconds": r_all["eval_seconds"]}
        rows.append(
            {"depth": depth, "recipe": "fp32", "stated": stated, "top1_all10k": r_all["top1"], **r}
        )
        print(
            f"ResNet-{depth} FP32: {100 * r_all['top1']:.2f}% on all 10,000 (stated "
            f"{stated:.2f}%); {pct(r)} on the {r['n']} evaluated",
            flush=True,
        )
        for s in settings:
            for e in ends:
                for p in presets:
                    kw = recipe(p, s, e)
                    name = f"{s}/{e}/{p}"
                    if args.budget is not None:
                        guard = None if args.guard_db == "off" else float(args.guard_db)
                        kw["budget"] = {"weight_bytes": args.budget, "guard_db": guard}
                        name += f"@{args.budget:g}x" + ("-noguard" if guard is None else "")
                    elif args.uniform:
                        kw["budget"] = None
                        kw["activations"] = {"bits": kw["act_bits"], "fallback_db": None}
                        name += "@uniform"
                    q, info = quantize_recipe(model, calib, kw)
                    r, _ = evaluate(q, xe, ye, cifar_normalize, args.batch, name, ref)
                    rows.append(
                        {"depth": depth, "recipe": name, "setting": s, "ends": e, "preset": p}
                        | info
                        | r
                    )
                    print(
                        f"ResNet-{depth} {name}: {pct(r)}, agreement {100 * r['agreement']:.1f}%,"
                        f" calib {info['calib_seconds']:.0f} s",
                        flush=True,
                    )
                    merge_rows(args.out, head, rows, key)
        if args.peers:
            rows += peer_rows(
                args.peers.split(","),
                depth,
                model,
                calib,
                xe,
                ye,
                settings,
                args.adaround_iters,
                args.aimet_path,
            )
        merge_rows(args.out, head, rows, key)
    result = merge_rows(args.out, head, rows, key)
    print()
    print(
        f"Labelled CIFAR-10 top-1 on {protocol['evaluated']}; calibration: "
        f"{protocol['calibration']}; {head['machine']}; {time.perf_counter() - t_all:.0f} s\n"
    )
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
