"""Detectors quantized, judged as detectors: YOLOX-nano and NanoDet-m from their ONNX files,
FP32 against onnxruntime's ``quantize_static`` and omse recipes, by COCO-style mAP against labels
and by the recall/precision of the quantized model's detections against FP32's.

Data (``--data DIR``, the project's ``../shared/data``; see its README): ``detection/yolox_nano/
yolox_nano.onnx`` (YOLOX-nano 416, from github.com/Bigisland1729/object-detection-models at
7f3f2fa), ``detection/nanodet_m/nanodet_m_320.onnx`` (NanoDet-m 320, ``nanodet.onnx`` of
github.com/hpc203/nanodet-opncv-dnn-cpp-python at 15dd99c), ``detection/coco_mini/`` (COCO 2017:
79 annotated val2017 images and 80 unannotated val2017 images for calibration, github.com/
Obmutescence/COCO-MINI at 644f29e; the same images and ``instances_val2017.json`` annotations come
from cocodataset.org's val2017). A user gets the same data from those repositories.

Preprocessing as the shared README says: YOLOX, resize keeping the aspect ratio into 416 x 416,
pad bottom/right with 114, BGR, raw 0..255; NanoDet, stretch-resize to 320 x 320, BGR, mean
(103.53, 116.28, 123.675), std (57.375, 57.12, 58.395). Images are resized with PIL (bilinear)
where the models' demos use OpenCV.

Decoding and scoring in :mod:`omse.analysis.detection`: mAP from detections at score >= 0.01
(NMS IoU 0.65, 100 per image: the YOLOX evaluator's settings); recall/precision against FP32's
detections at score >= 0.25 (NMS IoU 0.45, match IoU 0.5).

Rows: FP32 (onnxruntime CPU); onnxruntime ``quantize_static`` QDQ int8 with per-channel weights,
MinMax and Percentile calibration; and each omse recipe of ``--recipes NAME:field=value,...``
(``omse.quantize(onnx_path, calib, QuantConfig(**fields))``, ``omse.export_onnx``, run in
onnxruntime). Weight bytes: the initializers of the ONNX file each row runs (int8 bytes for int8
weights, float for the rest). Each omse row also gets a paired bootstrap against ``quantize_static``
MinMax (:func:`paired_bootstrap`, 300 draws of the images with replacement, the same draws for
both): 95% intervals of the differences in mAP@0.5 and in recall / precision against FP32. On
79 images a difference whose interval holds 0 is one these images do not show.

    python benchmarks/detection.py --data ../shared/data [--models yolox,nanodet]
        [--recipes "int8:target=int8" "w8a8:target=int8,weight_bits=8"] [--calib-size 32]

Prints a markdown table and writes ``results/detection.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import torch
from heldout import split_top
from onnx import numpy_helper
from PIL import Image

from omse.analysis import detection as det
from omse.config import QuantConfig
from omse.io import atomic_write_text
from omse.runtime import cpu_name

MAP_SCORE, MAP_NMS = 0.01, 0.65


class Model:
    """One detector: its ONNX file, input size, preprocessing and decoder."""

    def __init__(self, name: str, path: Path, size: int, decoder: str) -> None:
        self.name, self.path, self.size, self.decoder = name, path, size, decoder

    def preprocess(self, img: Image.Image) -> tuple[np.ndarray, tuple[float, float]]:
        """An RGB image -> (the input ``[1, 3, S, S]`` float32, input pixels per image pixel
        (x, y))."""
        s, (w, h) = self.size, img.size
        if self.name == "yolox":
            r = min(s / w, s / h)
            nw, nh = round(w * r), round(h * r)
            canvas = np.full((s, s, 3), 114, np.float32)
            canvas[:nh, :nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR), np.float32)
            x = canvas[..., ::-1]  # BGR, raw 0..255
            scale = (r, r)
        else:
            x = np.asarray(img.resize((s, s), Image.BILINEAR), np.float32)[..., ::-1]
            x = (x - np.array([103.53, 116.28, 123.675], np.float32)) / np.array(
                [57.375, 57.12, 58.395], np.float32
            )
            scale = (s / w, s / h)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), scale


def models(data: Path) -> dict[str, Model]:
    d = data / "detection"
    return {
        "yolox": Model("yolox", d / "yolox_nano" / "yolox_nano.onnx", 416, "yolox"),
        "nanodet": Model("nanodet", d / "nanodet_m" / "nanodet_m_320.onnx", 320, "nanodet"),
    }


CALIB_DIR = Path("detection", "coco_mini", "calib_unannotated")
"""Under the data folder: the unannotated COCO val2017 images that calibrate."""
EVAL_DIR = Path("detection", "coco_mini", "val2017")
"""Under the data folder: the annotated images that evaluate (never calibration)."""


def load_images(folder: Path, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [(p.name, Image.open(p).convert("RGB")) for p in files[:limit]]


def calibration_inputs(m: Model, data: Path, limit: int | None = None) -> list[np.ndarray]:
    """``m``'s preprocessed inputs (``[1, 3, S, S]`` float32) of the first ``limit`` images of
    ``data / CALIB_DIR``, in name order."""
    return [m.preprocess(im)[0] for _, im in load_images(data / CALIB_DIR, limit)]


def run_onnx(path: str | Path, inputs: list[np.ndarray], threads: int) -> list[list[np.ndarray]]:
    """Every input through onnxruntime CPU -> per input, the outputs in the graph's order."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return [s.run(None, {name: x}) for x in inputs]


def detections(
    m: Model, outs: list[list[np.ndarray]], scales, sizes, score: float, nms: float
) -> list[det.Detections]:
    """Per image, the detections in original image pixels."""
    res = []
    for o, sc, wh in zip(outs, scales, sizes, strict=True):
        (d,) = det.detect(m.decoder, o, (m.size, m.size), score, nms)
        res.append(det.scale_boxes(d, sc, wh))
    return res


def weight_bytes(path: str | Path) -> int:
    """Bytes of the ONNX file's initializers with more than one element (weights, not shapes)."""
    g = onnx.load(str(path)).graph
    return sum(
        numpy_helper.to_array(t).nbytes for t in g.initializer if np.prod(t.dims, dtype=int) > 16
    )


def ort_static(
    src: Path, dst: Path, calib: list[np.ndarray], method: str, activations: str = "QInt8"
) -> None:
    """onnxruntime's quantize_static: QDQ, int8 weights per channel, ``activations`` (its
    ``QuantType`` name: ``"QInt8"``, or ``"QUInt8"``, onnxruntime's own default)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {name: x}

    # per-channel QDQ needs DequantizeLinear's axis (opset 13); both models are opset 11/12
    up = dst.with_suffix(".op13.onnx")
    onnx.save(onnx.version_converter.convert_version(onnx.load(str(src)), 13), str(up))
    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(up), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=getattr(QuantType, activations),
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )


def omse_recipe(src: Path, dst: Path, calib: list[np.ndarray], fields: dict) -> None:
    """omse.quantize on the ONNX file, exported with omse.export_onnx."""
    import omse

    batches = [torch.from_numpy(x) for x in calib]
    q = omse.quantize(str(src), batches, omse.QuantConfig(**fields))
    omse.export_onnx(q, batches[0], str(dst))


def parse_recipes(items: list[str]) -> dict[str, dict]:
    """``NAME:field=value,field=value`` -> ``{NAME: QuantConfig kwargs}`` (values as Python
    literals, else strings), each checked by building the QuantConfig."""
    out = {}
    for it in items:
        name, _, body = it.partition(":")
        fields = {}
        for kv in split_top(body):  # commas inside {...} / [...] belong to the value
            k, _, v = kv.partition("=")
            try:
                fields[k.strip()] = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError):
                fields[k.strip()] = v.strip()
        QuantConfig(**fields)
        out[name.strip()] = fields
    return out


def bench_model(m: Model, args, recipes: dict[str, dict], tmp: Path) -> list[dict]:
    data = Path(args.data) / "detection" / "coco_mini"
    gts_by_name, _ = det.load_coco(data / "annotations" / "instances_val2017.json")
    val = load_images(Path(args.data) / EVAL_DIR, args.eval_size)
    val = [(n, im) for n, im in val if n in gts_by_name]
    gts = [gts_by_name[n] for n, _ in val]
    prepped = [m.preprocess(im) for _, im in val]
    xs, scales = [p[0] for p in prepped], [p[1] for p in prepped]
    sizes = [im.size for _, im in val]
    calib = calibration_inputs(m, Path(args.data), args.calib_size)

    def score(path: Path) -> dict:
        outs = run_onnx(path, xs, args.threads)
        map_dets = detections(m, outs, scales, sizes, MAP_SCORE, MAP_NMS)
        return {
            "map": det.coco_map(map_dets, gts),
            "map_dets": map_dets,
            "dets": detections(m, outs, scales, sizes, det.SCORE_THRESHOLD, det.NMS_IOU),
        }

    rows, ref = [], score(m.path)
    rows.append(row(m, "FP32", ref, ref, 0.0, weight_bytes(m.path)))
    print(f"{m.name} FP32: mAP@0.5 {ref['map']['map50']:.3f}", file=sys.stderr)
    makers = {
        "ort quantize_static MinMax": lambda d: ort_static(m.path, d, calib, "MinMax"),
        "ort quantize_static Percentile": lambda d: ort_static(m.path, d, calib, "Percentile"),
    }
    makers |= {
        f"omse {k}": (lambda d, f=f: omse_recipe(m.path, d, calib, f)) for k, f in recipes.items()
    }
    scored = {}
    for label, make in makers.items():
        if args.rows and not any(r in label for r in args.rows):
            continue
        dst = tmp / f"{m.name}.{len(rows)}.onnx"
        try:
            t = time.perf_counter()
            make(dst)
            secs = time.perf_counter() - t
            scored[label] = score(dst)
            rows.append(row(m, label, scored[label], ref, secs, weight_bytes(dst)))
            peer = scored.get("ort quantize_static MinMax")
            if label.startswith("omse") and peer is not None:
                rows[-1]["vs_ort_minmax_95"] = paired_bootstrap(gts, ref, scored[label], peer)
        except Exception as e:  # a failed row is recorded, the others still run
            traceback.print_exc()
            rows.append({"model": m.name, "row": label, "error": f"{type(e).__name__}: {e}"})
        print(f"{m.name} {label}: {rows[-1]}", file=sys.stderr)
    return rows


BOOTSTRAP = 300
"""Resamples of the paired bootstrap (:func:`paired_bootstrap`)."""


def paired_bootstrap(
    gts: list, ref: dict, a: dict, b: dict, resamples: int = BOOTSTRAP, seed: int = 0
) -> dict:
    """95% percentile intervals of ``a`` minus ``b`` (two quantized models' :func:`score`
    results on the same images, ``ref`` FP32's) over images drawn with replacement, the same
    draws for both: mAP@0.5, and recall / precision against FP32's detections. What the 79
    images can tell apart: an interval that holds 0 is a difference the data does not show."""
    n = len(gts)
    counts = {
        k: np.array([[det.match(r, o), len(r), len(o)] for r, o in zip(ref["dets"], x["dets"])])
        for k, x in (("a", a), ("b", b))
    }
    # each image matched once at IoU 0.5; a draw pools its images' matches (coco_map's mAP@0.5
    # of the drawn images, bit for bit: tests/analysis/test_detection.py)
    matched = [
        [det.image_matches(d, g, [0.5]) for d, g in zip(x["map_dets"], gts, strict=True)]
        for x in (a, b)
    ]
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {"map50": [], "recall": [], "precision": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        maps = [float(det.map_of_matches([m[i] for i in idx], 1)[0]) for m in matched]
        diffs["map50"].append(maps[0] - maps[1])
        ca, cb = counts["a"][idx].sum(0), counts["b"][idx].sum(0)
        diffs["recall"].append(ca[0] / max(ca[1], 1) - cb[0] / max(cb[1], 1))
        diffs["precision"].append(ca[0] / max(ca[2], 1) - cb[0] / max(cb[2], 1))
    return {
        k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
        for k, v in diffs.items()
    }


def row(m: Model, label: str, res: dict, ref: dict, secs: float, wbytes: int) -> dict:
    a = det.agreement(ref["dets"], res["dets"])
    return {
        "model": m.name,
        "row": label,
        "map50": round(res["map"]["map50"], 4),
        "map50_95": round(res["map"]["map50_95"], 4),
        "recall_vs_fp32": a.recall,
        "precision_vs_fp32": a.precision,
        "detections": a.n_out,
        "fp32_detections": a.n_ref,
        "calib_seconds": round(secs, 2),
        "weight_bytes": wbytes,
    }


def table(rows: list[dict]) -> str:
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    def ci(r, k):
        lo, hi = r.get("vs_ort_minmax_95", {}).get(k, (None, None))
        return "" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"

    lines = [
        "| model | row | mAP@0.5 | mAP@0.5:0.95 | recall vs FP32 | precision vs FP32 | "
        "calib. s | weight bytes | minus MinMax, 95%: mAP@0.5 / recall / precision |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | failed: {r['error'][:80]} ||||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['row']} | {f(r['map50'])} | {f(r['map50_95'])} | "
            f"{f(r['recall_vs_fp32'])} | {f(r['precision_vs_fp32'])} | "
            f"{r['calib_seconds']:.1f} | {r['weight_bytes']:,} | "
            + " / ".join(x for x in (ci(r, "map50"), ci(r, "recall"), ci(r, "precision")) if x)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the shared data folder (holds detection/)")
    ap.add_argument("--models", default="yolox,nanodet")
    ap.add_argument(
        "--recipes",
        nargs="*",
        default=["int8:target=int8", "w8a8:target=int8,weight_bits=8"],
        metavar="NAME:FIELD=VALUE,...",
        help="omse rows: QuantConfig fields per row",
    )
    ap.add_argument("--rows", nargs="*", help="run only rows whose label contains one of these")
    ap.add_argument("--calib-size", type=int, default=32, help="calibration images (of 80)")
    ap.add_argument("--eval-size", type=int, default=None, help="first N val images (of 79)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/detection.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (Path(args.data) / "detection").is_dir():
        ap.error(f"{args.data}/detection does not exist (see the module docstring for the data)")
    recipes = parse_recipes(args.recipes)
    all_models = models(Path(args.data))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(all_models[name], args, recipes, Path(tmp))
    print(table(rows))
    meta = {
        "machine": f"{cpu_name()}, {args.threads} threads ({os.cpu_count()} CPUs), "
        f"{platform.system()}",
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "calib_images": args.calib_size,
        "eval_images": "79 coco_mini val2017" if args.eval_size is None else args.eval_size,
        "map_settings": {"score": MAP_SCORE, "nms_iou": MAP_NMS, "max_det": det.MAX_DETECTIONS},
        "vs_fp32_settings": {
            "score": det.SCORE_THRESHOLD,
            "nms_iou": det.NMS_IOU,
            "match_iou": det.MATCH_IOU,
        },
        "recipes": recipes,
        "command": " ".join(sys.argv),
    }
    atomic_write_text(
        args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n", force=True
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
