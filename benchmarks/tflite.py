"""4-bit ``.tflite`` for microcontrollers: the MLPerf Tiny models (float ``.tflite`` in) and
EfficientNet-Lite0 (torch in), each quantized by omse and by the peers, run in TensorFlow Lite
Micro and LiteRT.

Data (``--data``, default ``../shared/data``; see its README):

- ``mlperf-tiny/*``: the reference float and int8 ``.tflite`` of github.com/mlcommons/tiny
  (``benchmark/training/*/trained_models/``, Apache-2.0);
- ``cifar10/test-png``: the 10,000 CIFAR-10 test images (image classification: ``--calib`` of
  them, drawn by ``calibration_split(10000, n, seed)``, calibrate every quantizer, the others are
  evaluated, labelled top-1; the pixels 0..255 as the MLPerf scripts feed them);
- ``imagenet-val-1300``: ILSVRC2012 validation images (visual wake words: agreement of the
  person / no-person decision with the float model on all 1300 at 96x96, as nothing here labels
  people; EfficientNet-Lite0: labelled top-1 on the 1236 not drawn for calibration);
- ``detection/coco_mini/calib_unannotated``: 80 COCO val2017 images, the visual wake words
  calibration set (the task is built from COCO; none of them is evaluated);
- keyword spotting and anomaly detection: no speech or machine-sound recording is in the data
  folder, so their inputs are synthetic: i.i.d. uniform over the input range the reference int8
  model was calibrated to (its input scale and zero point: where MLPerf's real MFCC / log-mel
  features lay), calibration and evaluation drawn with different seeds. What is reported there
  is the fidelity to the float model (argmax agreement, output SQNR), not task accuracy.

Rows per model: the float ``.tflite``; the reference int8 ``.tflite`` (TFLite converter PTQ);
``ai-edge-quantizer`` 0.10 ``static_wi8_ai8`` and the same recipe with 4-bit weights (the float
file given a ``serving_default`` signature, which the tool requires; same calibration inputs);
omse: min-max INT4 weights, plain MMSE INT4 (``fast``), the default recipe, ``best`` (learned
rounding), ``best`` within 0.5 / 0.6 / 0.75x the reference int8 file's bytes (and the default
recipe within 0.6x: ``--rows omse-default-0.5x`` etc. for the others), and a random INT4/INT8
plan of the same bytes as the best 0.6x one (what the sensitivity-chosen plan beats).

omse's MLPerf files have int8 input and output, as the references do (Lite0's: float32).

Columns: file bytes (and x the reference int8 file), TFLM arena bytes, the metric with its 95%
interval, TFLM parity (``--parity`` inputs: TFLM's output bit-identical to omse's integer
simulation, ``omse.deploy.tflite_sim.simulate``), LiteRT latency relative to the reference int8
file (interleaved, median of ``--rounds``; same run). Accuracy runs in LiteRT's reference kernels
(``BUILTIN_REF``, those TFLM builds on; the parity column says how often they agree with TFLM) for
the MLPerf models and its default kernels for Lite0; TFLM itself takes ~16 ms an image here, too
slow for every row on all 9,800 images.

    python benchmarks/tflite.py [--data DIR] [--models ic,vww,kws,ad,lite0] [--calib 200]
        [--rows ...] [--parity 1000] [--threads 2] [--out results/tflite.json]

Prints markdown tables, writes ``--out`` and ``results/tflite.png`` (metric against bytes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import DEFAULT_DATA, ROOT, counts, machine, merge_rows  # noqa: E402

from omse.analysis.metrics import wilson_interval  # noqa: E402
from omse.config import QuantConfig  # noqa: E402
from omse.deploy.tflite import quantize_tflite  # noqa: E402
from omse.deploy.tflite_sim import arena_bytes, litert_run, simulate, tflm_run  # noqa: E402
from omse.nn.layers import quantized_layers  # noqa: E402
from omse.tflite_format import read_model  # noqa: E402
from omse.transforms.precision import weight_bytes  # noqa: E402
from omse.zoo.data import load_image  # noqa: E402
from omse.zoo.labelled import calibration_split, load_cifar10_test, load_imagenet_val  # noqa: E402

MLPERF = {
    "ic": ("image_classification", "pretrainedResnet.tflite", "pretrainedResnet_quant.tflite"),
    "vww": ("visual_wake_words", "vww_96_float.tflite", "vww_96_int8.tflite"),
    "kws": ("keyword_spotting", "kws_ref_model_float32.tflite", "kws_ref_model.tflite"),
    "ad": ("anomaly_detection", "ad01_fp32.tflite", "ad01_int8.tflite"),
}
NAMES = {
    "ic": "MLPerf Tiny image classification (ResNet-8)",
    "vww": "MLPerf Tiny visual wake words (MobileNetV1 0.25, 96x96)",
    "kws": "MLPerf Tiny keyword spotting (DS-CNN)",
    "ad": "MLPerf Tiny anomaly detection (dense autoencoder)",
    "lite0": "EfficientNet-Lite0 (torch in, 224x224)",
}
BUDGETS = (0.5, 0.6, 0.75)
ROWS = (
    "float", "ref-int8", "aeq-int8", "aeq-int4w", "omse-minmax", "omse-plain", "omse-default",
    "omse-best", "omse-best-0.5x", "omse-best-0.6x", "omse-best-0.75x", "random-0.6x",
    "omse-default-0.6x",
)  # fmt: skip


# ---- data ---------------------------------------------------------------------------------
def _int8_input(data: bytes) -> tuple[float, int]:
    m = read_model(data)
    t = m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]]
    return float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0])


def load_task(key: str, root: Path, n_calib: int, seed: int):
    """``(calibration [N, ...] float32, evaluation inputs, labels or None)``, NHWC images."""
    if key == "ic":
        c_idx, e_idx = calibration_split(10000, n_calib, seed)
        xc, _ = load_cifar10_test(root / "cifar10/test-png", c_idx)
        xe, ye = load_cifar10_test(root / "cifar10/test-png", e_idx)
        nhwc = lambda x: (x * 255.0).permute(0, 2, 3, 1).contiguous()  # noqa: E731
        return nhwc(xc), nhwc(xe), ye
    if key == "vww":
        files = sorted((root / "detection/coco_mini/calib_unannotated").glob("*.jpg"))[:n_calib]
        xc = []
        for f in files:
            img = load_image(f, 96)
            top, left = (img.shape[1] - 96) // 2, (img.shape[2] - 96) // 2
            xc.append(img[:, top : top + 96, left : left + 96])
        xe, _ = load_imagenet_val(root / "imagenet-val-1300", 96)
        nhwc = lambda x: x.permute(0, 2, 3, 1).contiguous()  # noqa: E731
        return nhwc(torch.stack(xc)), nhwc(xe), None
    if key in ("kws", "ad"):
        folder, _, ref = MLPERF[key]
        s, z = _int8_input((root / "mlperf-tiny" / folder / ref).read_bytes())
        lo, hi = s * (-128 - z), s * (127 - z)
        shape = (1, 49, 10, 1) if key == "kws" else (1, 640)

        def draw(n: int, g: np.random.Generator) -> torch.Tensor:
            return torch.from_numpy(g.uniform(lo, hi, (n, *shape[1:])).astype(np.float32))

        return (
            draw(n_calib, np.random.default_rng(seed)),
            draw(1000, np.random.default_rng(seed + 1)),
            None,
        )
    if key == "lite0":  # the protocol of benchmarks/imagenet.py: 64 calibrate, 1236 evaluated
        c_idx, e_idx = calibration_split(1300, min(n_calib, 64), seed)
        xc, _ = load_imagenet_val(root / "imagenet-val-1300", 224, c_idx)
        xe, ye = load_imagenet_val(root / "imagenet-val-1300", 224, e_idx)
        return xc, xe, ye
    raise ValueError(key)


# ---- running files ------------------------------------------------------------------------
def _feed(data: bytes, x: np.ndarray) -> np.ndarray:
    """``x`` as the file's input takes it (int8 inputs quantized with its scale and zero point)."""
    m = read_model(data)
    t = m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]]
    if (
        t.quantization is not None
        and t.quantization.scale is not None
        and len(t.quantization.scale)
    ):
        import ai_edge_litert.schema_py_generated as schema

        if t.type == schema.TensorType.INT8:
            s, z = float(t.quantization.scale[0]), int(t.quantization.zeroPoint[0])
            return np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
    return x.astype(np.float32)


def _as_float(data: bytes, y: np.ndarray) -> np.ndarray:
    m = read_model(data)
    t = m.subgraphs[0].tensors[m.subgraphs[0].outputs[0]]
    if y.dtype == np.int8:
        return (y.astype(np.float32) - int(t.quantization.zeroPoint[0])) * float(
            t.quantization.scale[0]
        )
    return y.astype(np.float32)


def run_file(data: bytes, xs: np.ndarray, runtime: str) -> tuple[np.ndarray, str]:
    """Float outputs of the file on every row of ``xs`` (one interpreter, one invoke a row) and
    the runtime that ran them: ``runtime``, or TFLM where LiteRT's reference kernels have no
    kernel for an op of the file (INT4 depthwise)."""
    v = _feed(data, xs)
    if runtime != "tflm":
        try:
            y = litert_run(data, [v], reference_kernels=runtime == "litert-ref")[0]
            return _as_float(data, y), runtime
        except ValueError:
            runtime = "tflm"
    return _as_float(data, tflm_run(data, [v])[0]), runtime


def parity(data: bytes, xs: np.ndarray) -> dict:
    """TFLM's outputs against omse's integer simulation, and LiteRT's reference kernels against
    TFLM, row by row."""
    v = _feed(data, xs)
    tflm = tflm_run(data, [v])[0]
    same = [np.array_equal(a, b) for a, b in zip(simulate(data, [v])[0], tflm, strict=True)]
    out = {"n": len(xs), "identical": int(sum(same))}
    for kind, ref_kernels in (("litert_ref", True), ("litert", False)):
        try:
            lite = litert_run(data, [v], reference_kernels=ref_kernels)[0]
        except ValueError:  # no reference kernel for INT4 depthwise
            continue
        steps = np.abs(lite.astype(np.int64) - tflm.astype(np.int64))
        out[f"{kind}_argmax_agreement"] = float((lite.argmax(1) == tflm.argmax(1)).mean())
        out[f"{kind}_max_steps"] = int(steps.max())
    return out


def latencies(files: dict[str, bytes], x: np.ndarray, rounds: int, n: int) -> dict[str, float]:
    """Median seconds per invoke of each file in LiteRT (default kernels), interleaved."""
    from ai_edge_litert.interpreter import Interpreter

    its = {}
    for k, d in files.items():
        try:
            it = Interpreter(model_content=d, num_threads=1)
            it.allocate_tensors()
        except (RuntimeError, ValueError):  # LiteRT refusing a file: no latency for it
            continue
        it.set_tensor(it.get_input_details()[0]["index"], _feed(d, x[None]))
        its[k] = it
    times: dict[str, list[float]] = {k: [] for k in its}
    for _ in range(rounds):
        for k, it in its.items():
            t0 = time.perf_counter()
            for _ in range(n):
                it.invoke()
            times[k].append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- quantizers ---------------------------------------------------------------------------
def with_signature(data: bytes) -> bytes:
    """The float file with a ``serving_default`` signature (ai-edge-quantizer requires one)."""
    import ai_edge_litert.schema_py_generated as schema
    import flatbuffers

    m = schema.ModelT.InitFromPackedBuf(data, 0)
    sg = m.subgraphs[0]

    def tmap(i):
        t = schema.TensorMapT()
        t.name, t.tensorIndex = sg.tensors[i].name, int(i)
        return t

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs, sig.outputs = [tmap(i) for i in sg.inputs], [tmap(i) for i in sg.outputs]
    m.signatureDefs = [sig]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def aeq(data: bytes, calib: np.ndarray, bits: int) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    r = recipe.static_wi8_ai8()
    r[0]["op_config"]["weight_tensor_config"]["num_bits"] = bits
    signed = with_signature(data)
    qt = quantizer.Quantizer(signed)
    qt.load_quantization_recipe(r)
    m = read_model(signed)
    name = m.subgraphs[0].tensors[m.subgraphs[0].inputs[0]].name
    name = name.decode() if isinstance(name, bytes) else name
    res = qt.quantize(qt.calibrate({"serving_default": [{name: x[None]} for x in calib]}))
    return bytes(res.quantized_model)


def random_plan(model, calib, target_bytes: int, seed: int):
    """A random INT4/INT8 plan of ``target_bytes`` weight bytes: layers (in random order) move to
    8 bits until the next would pass the budget; ``best`` recipe otherwise."""
    probe = quantize_tflite(model, calib, QuantConfig.preset("fast", target="tflite"))[0]
    layers = quantized_layers(probe)
    total = sum(weight_bytes(q, q.cfg.weight_bits, "tflite") for q in layers.values())
    order = [n for n, q in layers.items() if q.cfg.weight_bits < 8]
    random.Random(seed).shuffle(order)
    eight = []
    for n in order:
        extra = weight_bytes(layers[n], 8, "tflite") - weight_bytes(layers[n], 4, "tflite")
        if total + extra <= target_bytes:
            total += extra
            eight.append(n)
    cfg = QuantConfig.preset(
        "best", target="tflite", budget=None, extra_mac_budget=0.0,
        overrides={n: {"weight_bits": 8} for n in eight},
    )  # fmt: skip
    return cfg


def omse_rows(wanted, model, calib, ref_bytes: int, io: str):
    """``{row: (file bytes, seconds, filters, plan)}`` of omse's recipes."""
    batches = list(torch.as_tensor(calib).split(50))
    recipes = {
        "omse-minmax": (QuantConfig.preset("fast", target="tflite", weight_method="minmax"), None),
        "omse-plain": (QuantConfig.preset("fast", target="tflite"), None),
        "omse-default": (QuantConfig(target="tflite"), None),
        "omse-best": (  # every convolution INT4 (a residual would make it an INT8 filter)
            QuantConfig.preset("best", target="tflite", budget=None, extra_mac_budget=0.0),
            None,
        ),
    }
    for b in BUDGETS:
        budget = int(b * ref_bytes)
        recipes[f"omse-best-{b}x"] = (QuantConfig.preset("best", target="tflite"), budget)
        recipes[f"omse-default-{b}x"] = (QuantConfig(target="tflite"), budget)
    out = {}
    budget_weights = None
    for row, (cfg, max_bytes) in recipes.items():
        if row not in wanted:
            continue
        t0 = time.perf_counter()
        q, exp, fb = quantize_tflite(model, batches, cfg, max_bytes=max_bytes, io=io)
        secs = time.perf_counter() - t0
        plan = getattr(q, "omse_precision", None)
        if row == "omse-best-0.6x" and fb is not None:
            budget_weights = fb.weight_bytes
        out[row] = (exp.data, secs, exp.filter_types(), None if plan is None else plan.summary())
    if "random-0.6x" in wanted and budget_weights is not None:
        t0 = time.perf_counter()
        cfg = random_plan(model, batches, budget_weights, 0)
        q, exp, _ = quantize_tflite(model, batches, cfg, io=io)
        out["random-0.6x"] = (exp.data, time.perf_counter() - t0, exp.filter_types(), "random")
    return out


# ---- one model ----------------------------------------------------------------------------
def metric(key: str, y: np.ndarray, ref: np.ndarray, labels) -> dict:
    """Top-1 (labelled) or agreement with the float model, with 95% intervals, and SQNR."""
    agree = int((y.argmax(1) == ref.argmax(1)).sum())
    lo, hi = wilson_interval(agree, len(y))
    row = {"agreement": agree / len(y), "agreement_ci95": [lo, hi]}
    noise = float(((y - ref) ** 2).sum())
    row["sqnr_db"] = float(10 * np.log10(float((ref**2).sum()) / max(noise, 1e-30)))
    if labels is not None:
        row["top1"] = counts(int((y.argmax(1) == labels.numpy()).sum()), len(y))
    return row


def bench_model(key: str, args, root: Path) -> list[dict]:
    print(f"\n## {NAMES[key]}", flush=True)
    xc, xe, ye = load_task(
        key, root, args.calib if key != "vww" else min(args.calib, 80), args.seed
    )
    xc_np, xe_np = xc.numpy(), xe.numpy()
    files: dict[str, bytes] = {}
    info: dict[str, dict] = {}
    runtime = "litert" if key == "lite0" else "litert-ref"
    io = "float32" if key == "lite0" else "int8"  # the MLPerf references take and give int8
    if key == "lite0":
        from omse.zoo.models import efficientnet_lite

        model = efficientnet_lite(0).eval()
        pre = lambda x: x * 2.0 - 1.0  # noqa: E731
        xc_np, xe_np = pre(xc).numpy(), pre(xe).numpy()
        with torch.no_grad():
            ref = torch.cat([model(b) for b in torch.from_numpy(xe_np).split(50)]).numpy()
        q8, e8, _ = quantize_tflite(
            model, list(torch.from_numpy(xc_np).split(8)),
            QuantConfig.preset("fast", target="tflite", weight_bits=8),
        )  # fmt: skip
        files["ref-int8"], info["ref-int8"] = e8.data, {"what": "omse W8A8 .tflite (no reference)"}
        src = model
    else:
        folder, fname, rname = MLPERF[key]
        fdata = (root / "mlperf-tiny" / folder / fname).read_bytes()
        files["float"], info["float"] = fdata, {"what": "float .tflite"}
        files["ref-int8"] = (root / "mlperf-tiny" / folder / rname).read_bytes()
        info["ref-int8"] = {"what": "reference int8 (TFLite converter PTQ)"}
        ref = run_file(fdata, xe_np, "litert")[0]
        src = str(root / "mlperf-tiny" / folder / fname)
        for row, bits in (("aeq-int8", 8), ("aeq-int4w", 4)):
            if row in args.rows:
                t0 = time.perf_counter()
                try:
                    files[row] = aeq(fdata, xc_np, bits)
                    info[row] = {"calib_seconds": round(time.perf_counter() - t0, 1)}
                except Exception as e:  # a peer refusing the model is a result
                    info[row] = {"refused": f"{type(e).__name__}: {str(e)[:200]}"}
    ref_bytes = len(files["ref-int8"])
    calib_for_omse = torch.from_numpy(xc_np)
    for row, (data, secs, kinds, plan) in omse_rows(
        args.rows, src, calib_for_omse, ref_bytes, io
    ).items():
        files[row] = data
        info[row] = {"calib_seconds": round(secs, 1), "filters": kinds, "plan": plan}
    lat = latencies(files, xe_np[0], args.rounds, 20 if key != "lite0" else 3)
    rows = []
    for row, data in files.items():
        t0 = time.perf_counter()
        try:
            y, used = run_file(data, xe_np, runtime)
        except (RuntimeError, ValueError) as e:  # no runtime here takes the file
            rows.append({"model": key, "row": row, "refused": f"{type(e).__name__}: {e}"[:200]})
            print(f"| {row} | refused: {rows[-1]['refused']} |")
            continue
        r = {
            "model": key, "row": row, "bytes": len(data), "x_ref_int8": len(data) / ref_bytes,
            "runtime": used, **info.get(row, {}), **metric(key, y, ref, ye),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "litert_latency_x_ref": lat[row] / lat["ref-int8"] if row in lat else None,
        }  # fmt: skip
        if row != "float":
            try:
                r["tflm_arena_bytes"] = arena_bytes(data)
            except Exception as e:
                r["tflm_arena_bytes"] = f"{type(e).__name__}: {str(e)[:100]}"
        if row != "float":
            n = min(args.parity if key == "ic" else args.parity // 5, len(xe_np))
            if key == "lite0":
                n = min(n, 5)
            try:
                r["tflm_parity"] = parity(data, xe_np[:n])
            except Exception as e:  # TFLM refusing a peer's file is a result
                r["tflm_refused"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(r)
        print(_line(r), flush=True)
    for row, i in info.items():
        if "refused" in i:
            rows.append({"model": key, "row": row, **i})
            print(f"| {row} | refused: {i['refused']} |")
    return rows


def _ratio(v) -> str:
    return "LiteRT refuses" if v is None else f"{v:.2f}"


def _filters(kinds) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) if kinds else ""


def _line(r: dict) -> str:
    m = r.get("top1")
    acc = (
        f"{100 * m['top1']:.2f} [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]" if m else "-"
    )
    par = r.get("tflm_parity")
    par = (
        f"{par['identical']}/{par['n']}"
        if par
        else ("TFLM refuses" if "tflm_refused" in r else "-")
    )
    arena = r.get("tflm_arena_bytes", "-")
    return (
        f"| {r['row']} | {r['bytes']:,} | {r['x_ref_int8']:.3f} | {arena} | {acc} | "
        f"{100 * r['agreement']:.2f} | {r['sqnr_db']:.1f} | {par} | "
        f"{_ratio(r.get('litert_latency_x_ref'))} | {_filters(r.get('filters'))} |"
    )


def tables(result: dict) -> str:
    """The JSON of this benchmark as markdown: one table per model, in ``ROWS`` order."""
    out = []
    rows = result.get("rows", [])
    for key in [k for k in NAMES if any(r["model"] == k for r in rows)]:
        mine = [r for r in rows if r["model"] == key]
        mine.sort(key=lambda r: ROWS.index(r["row"]) if r["row"] in ROWS else len(ROWS))
        lines = [f"**{NAMES[key]}**", "", HEADER]
        for r in mine:
            lines.append(_line(r) if "bytes" in r else f"| {r['row']} | refused: {r['refused']} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


HEADER = (
    "| row | bytes | x ref int8 | TFLM arena | top-1 % [95% CI] | agreement % | SQNR dB | "
    "TFLM = omse | LiteRT latency x ref | filters |\n|---|---|---|---|---|---|---|---|---|---|"
)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({r["model"] for r in rows if "bytes" in r})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        rs = [r for r in rows if r["model"] == k and "bytes" in r and r["row"] != "float"]
        for r in rs:
            y = 100 * (r["top1"]["top1"] if r.get("top1") else r["agreement"])
            c = "C0" if r["row"].startswith("omse") else ("C3" if "random" in r["row"] else "C1")
            ax.scatter(r["bytes"] / 1000, y, color=c)
            ax.annotate(r["row"].replace("omse-", ""), (r["bytes"] / 1000, y), fontsize=6)
        ax.set_title(NAMES[k].split(" (")[0], fontsize=8)
        ax.set_xlabel("file kB")
        ax.set_ylabel("top-1 %" if any(r.get("top1") for r in rs) else "agreement with float %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", default="ic,vww,kws,ad,lite0")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--calib", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parity", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "tflite.json")
    args = ap.parse_args(argv)
    args.rows = args.rows.split(",")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if not (args.data / "mlperf-tiny").is_dir():
        print(f"no MLPerf Tiny models under {args.data}: see benchmarks/tflite.py's docstring")
        return 1
    head = {
        "benchmark": "tflite",
        "protocol": f"calib {args.calib} seed {args.seed} parity {args.parity}",
        "machine": machine(),
    }
    for key in args.models.split(","):  # written after each model: a long run keeps its rows
        print(HEADER)
        result = merge_rows(args.out, head, bench_model(key, args, args.data), ("model", "row"))
    plot(result["rows"], args.out.with_suffix(".png"))
    print("\n" + tables(result))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
