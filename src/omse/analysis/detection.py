"""Object detectors judged as detectors: decoded boxes, class-wise NMS, the detections of a
quantized model matched against FP32's (recall, precision), and COCO-style mAP against labels.

Pipeline, per image: a decoder turns the model's raw outputs into dense predictions, one box
per anchor (``boxes [A, 4]`` xyxy in the model's input pixels) with per-class scores
(``scores [A, C]`` in [0, 1]); :func:`select` keeps each anchor's best class above a score
threshold, runs class-wise NMS and keeps the ``max_detections`` best as :class:`Detections`.
:func:`detect` does both for a batch given a decoder's name (:data:`DECODERS`), and
:func:`recognise` picks that name from the shapes of the model's outputs.

Defaults (documented once, here): score threshold 0.25 (:data:`SCORE_THRESHOLD`), NMS IoU 0.45
(:data:`NMS_IOU`), a detection matches another at IoU >= 0.5 (:data:`MATCH_IOU`), at most 100
detections per image (:data:`MAX_DETECTIONS`), anchors on strides 8/16/32 (:data:`STRIDES`).

Everything here is numpy (torch tensors are accepted as inputs and converted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OmseError

__all__ = [
    "DECODERS",
    "MATCH_IOU",
    "MAX_DETECTIONS",
    "NMS_IOU",
    "SCORE_THRESHOLD",
    "STRIDES",
    "DetectionAgreement",
    "Detections",
    "GroundTruth",
    "NotADetector",
    "agreement",
    "anchor_count",
    "box_iou",
    "coco_map",
    "ImageMatches",
    "image_matches",
    "map_of_matches",
    "decode",
    "decode_nanodet",
    "decode_ssd",
    "decode_yolov8",
    "decode_yolox",
    "detect",
    "load_coco",
    "match",
    "nms",
    "recognise",
    "scale_boxes",
    "select",
]

SCORE_THRESHOLD = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
MAX_DETECTIONS = 100
STRIDES = (8, 16, 32)
COCO_IOUS = np.round(np.arange(0.5, 0.951, 0.05), 2)  # 0.50, 0.55, ..., 0.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation


class NotADetector(OmseError):
    """The outputs are not a detector head omse can decode (the message says why)."""


@dataclass(frozen=True)
class Detections:
    """One image's detections: ``boxes [K, 4]`` xyxy (float32, pixels), ``scores [K]``
    (float32), ``classes [K]`` (int64), sorted by descending score."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class GroundTruth:
    """One image's labels: ``boxes [G, 4]`` xyxy (pixels of the original image), ``classes
    [G]`` contiguous class indices (int64), ``crowd [G]`` COCO ``iscrowd`` flags (bool)."""

    boxes: np.ndarray
    classes: np.ndarray
    crowd: np.ndarray


@dataclass(frozen=True)
class DetectionAgreement:
    """Quantized detections against FP32's: ``recall`` = matched / FP32 detections,
    ``precision`` = matched / quantized detections (None when the denominator is 0), summed
    over ``images``."""

    recall: float | None
    precision: float | None
    matched: int
    n_ref: int
    n_out: int
    images: int


def _np(x) -> np.ndarray:
    """A numpy float32 view of an array or torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


# --- geometry -------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a [K, 4]`` with every box in ``b [M, 4]`` (xyxy) -> ``[K, M]``;
    0 where the union is empty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` (x1, y1, x2, y2)."""
    half = b[..., 2:4] / 2
    return np.concatenate([b[..., :2] - half, b[..., :2] + half], -1)


def anchor_count(input_hw: tuple[int, int], strides: Sequence[int] = STRIDES) -> int:
    """Grid cells over ``strides`` for an input of ``(H, W)`` pixels: sum of ceil(H/s)*ceil(W/s)."""
    h, w = input_hw
    return sum(-(-h // s) * -(-w // s) for s in strides)


def _grid(input_hw: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each anchor's cell ``(x, y)`` index ``[A, 2]`` and stride ``[A]``, strides in order, x
    varying fastest within a level (YOLOX's and NanoDet's layout)."""
    h, w = input_hw
    cells, stride = [], []
    for s in strides:
        hs, ws = -(-h // s), -(-w // s)
        ys, xs = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], 1))
        stride.append(np.full(hs * ws, s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(stride).astype(np.float32)


def scale_boxes(
    dets: Detections, scale_xy: tuple[float, float], image_wh: tuple[int, int]
) -> Detections:
    """Boxes from model-input pixels to the original image's: divided by ``scale_xy`` (input
    pixels per image pixel, x and y) and clipped to ``image_wh``."""
    boxes = dets.boxes / np.array([*scale_xy, *scale_xy], np.float32)
    w, h = image_wh
    boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
    return Detections(boxes.astype(np.float32), dets.scores, dets.classes)


# --- decoders: raw outputs -> per image (boxes [A, 4] xyxy, scores [A, C]) ---------------------


def decode_yolov8(out, channels_first: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """YOLOv8-style head ``[N, 4+C, A]`` (``channels_first``) or ``[N, A, 4+C]``: (cx, cy, w, h)
    in input pixels, then C class scores already sigmoided, no objectness -> per image
    ``(boxes [A, 4] xyxy, scores [A, C])``."""
    y = _np(out)
    if y.ndim != 3 or y.shape[1 if channels_first else 2] < 5:
        raise NotADetector(
            f"a YOLOv8-style head is [N, 4+C, A] or [N, A, 4+C], got {list(y.shape)}"
        )
    if channels_first:
        y = y.transpose(0, 2, 1)
    return [(_cxcywh_to_xyxy(i[:, :4]), i[:, 4:]) for i in y]


def decode_yolox(
    out, input_hw: tuple[int, int], strides: Sequence[int] = STRIDES
) -> list[tuple[np.ndarray, np.ndarray]]:
    """YOLOX head ``[N, A, 5+C]``: raw (dx, dy, log w, log h) per grid cell, objectness, C class
    scores, objectness and scores already sigmoided (the exported YOLOX-nano's) -> per image
    ``(boxes [A, 4] xyxy, scores [A, C] = objectness x class score)``. The grid: strides in
    order over ``input_hw``, ``cx = (dx + x) * s``, ``w = exp(log w) * s``."""
    y = _np(out)
    cells, stride = _grid(input_hw, strides)
    if y.ndim != 3 or y.shape[2] < 6 or y.shape[1] != len(stride):
        raise NotADetector(
            f"a YOLOX head for a {input_hw[0]}x{input_hw[1]} input over strides {tuple(strides)} "
            f"is [N, {len(stride)}, 5+C], got {list(y.shape)}"
        )
    xy = (y[..., :2] + cells) * stride[:, None]
    wh = np.exp(np.minimum(y[..., 2:4], 20.0)) * stride[:, None]
    boxes = _cxcywh_to_xyxy(np.concatenate([xy, wh], -1))
    scores = y[..., 4:5] * y[..., 5:]
    return list(zip(boxes, scores, strict=True))


def decode_ssd(
    boxes, scores, input_hw: tuple[int, int] | None = None, background: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """SSD-style separate outputs, box decode already done by the exported graph: ``boxes [N, A,
    4]`` xyxy (in input pixels; normalised to [0, 1] when ``input_hw`` is given, then scaled by
    it) and ``scores [N, A, C]`` probabilities; ``background``: a column of ``scores`` to drop
    (None: there is none) -> per image ``(boxes [A, 4], scores [A, C'])``."""
    b, s = _np(boxes), _np(scores)
    if b.ndim != 3 or b.shape[2] != 4 or s.ndim != 3 or s.shape[:2] != b.shape[:2]:
        raise NotADetector(
            f"SSD-style outputs are boxes [N, A, 4] and scores [N, A, C], got {list(b.shape)} "
            f"and {list(s.shape)}"
        )
    if input_hw is not None:
        h, w = input_hw
        b = b * np.array([w, h, w, h], np.float32)
    if background is not None:
        s = np.delete(s, background, axis=2)
    return list(zip(b, s, strict=True))


def _nanodet_levels(
    outs: Sequence, input_hw: tuple[int, int], strides: Sequence[int], bins: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """NanoDet's six outputs (any order, with or without a batch axis) -> class maps and box
    maps ``[N, hw, .]``, each ordered by stride: box maps are the ones whose last axis is
    ``4 * bins``, each level found by its number of cells."""
    arrs = [_np(o) for o in outs]
    arrs = [a[None] if a.ndim == 2 else a for a in arrs]
    hws = [-(-input_hw[0] // s) * -(-input_hw[1] // s) for s in strides]
    box = {a.shape[1]: a for a in arrs if a.shape[-1] == 4 * bins}
    cls = {a.shape[1]: a for a in arrs if a.shape[-1] != 4 * bins}
    if len(arrs) != 2 * len(strides) or sorted(box) != sorted(hws) or sorted(cls) != sorted(hws):
        raise NotADetector(
            f"a NanoDet head for a {input_hw[0]}x{input_hw[1]} input is {len(strides)} class "
            f"maps [N, hw, C] and {len(strides)} box maps [N, hw, {4 * bins}] with hw in {hws}, "
            f"got {[list(a.shape) for a in arrs]}"
        )
    return [cls[n] for n in hws], [box[n] for n in hws]


def decode_nanodet(
    outs: Sequence, input_hw: tuple[int, int], strides: Sequence[int] = STRIDES, bins: int = 8
) -> list[tuple[np.ndarray, np.ndarray]]:
    """NanoDet-m (GFL head): per stride a class map ``[N, hw, C]`` (sigmoided) and a box map
    ``[N, hw, 4 * bins]`` (left, top, right, bottom distances as ``bins`` logits each, the
    softmax-weighted bin index times the stride) -> per image ``(boxes [A, 4] xyxy, scores
    [A, C])``. Cell centres at ``x * s + (s - 1) / 2`` (the exported model's own demo)."""
    cls, box = _nanodet_levels(outs, input_hw, strides, bins)
    cells, stride = _grid(input_hw, strides)
    centre = cells * stride[:, None] + (stride[:, None] - 1) / 2
    scores = np.concatenate(cls, 1)
    logits = np.concatenate(box, 1).reshape(scores.shape[0], -1, 4, bins)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    dist = (p / p.sum(-1, keepdims=True)) @ np.arange(bins, dtype=np.float32)
    dist = dist * stride[None, :, None]
    boxes = np.concatenate([centre - dist[..., :2], centre + dist[..., 2:]], -1)
    return list(zip(boxes, scores, strict=True))


DECODERS = ("yolov8", "yolov8-t", "yolox", "ssd", "nanodet")
"""Decoder names: ``yolov8`` [N, 4+C, A]; ``yolov8-t`` [N, A, 4+C]; ``yolox`` [N, A, 5+C];
``ssd`` boxes [N, A, 4] + scores [N, A, C]; ``nanodet`` three class and three box maps."""


def decode(
    name: str, outputs: Sequence, input_hw: tuple[int, int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The decoder ``name`` (:data:`DECODERS`) on a model's ``outputs`` (a list, in the model's
    order) -> per image ``(boxes [A, 4], scores [A, C])``. ``input_hw`` is needed by
    ``yolox`` and ``nanodet``."""
    if name not in DECODERS:
        raise NotADetector(f"unknown detector decoder {name!r}; choose from {', '.join(DECODERS)}")
    if name in ("yolox", "nanodet") and input_hw is None:
        raise NotADetector(f"the {name} decoder needs the input size (H, W)")
    want = {"ssd": 2, "nanodet": 2 * len(STRIDES)}.get(name, 1)
    if len(outputs) != want:
        raise NotADetector(f"the {name} decoder reads {want} output(s), got {len(outputs)}")
    if name == "yolov8":
        return decode_yolov8(outputs[0], channels_first=True)
    if name == "yolov8-t":
        return decode_yolov8(outputs[0], channels_first=False)
    if name == "yolox":
        return decode_yolox(outputs[0], input_hw)
    if name == "ssd":
        return decode_ssd(outputs[0], outputs[1])
    return decode_nanodet(outputs, input_hw)


def recognise(
    shapes: Sequence[Sequence[int]],
    input_hw: tuple[int, int] | None = None,
    num_classes: int | None = None,
) -> str:
    """The decoder (:data:`DECODERS`) for outputs of these ``shapes``, or :class:`NotADetector`
    saying why none fits.

    One ``[N, X, Y]`` output (``input_hw`` needed) whose anchor axis has :func:`anchor_count`
    rows for ``input_hw`` (strides 8/16/32):
    ``yolov8`` when X = 4+C < Y; when Y < X, ``yolov8-t`` if Y = 4+C and ``yolox`` if Y = 5+C
    (with ``num_classes`` unknown only Y = 84 / 85, COCO's 80 classes, are told apart). Two
    outputs ``[N, A, 4]`` and ``[N, A, C]``: ``ssd``. Six 2-D/3-D outputs that pair up as
    NanoDet's class and box maps for ``input_hw``: ``nanodet``."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if len(shapes) == 6 and input_hw is not None:
        try:
            _nanodet_levels([np.empty(s, np.float32) for s in shapes], input_hw, STRIDES, 8)
            return "nanodet"
        except NotADetector:
            pass
    if len(shapes) == 2 and all(len(s) == 3 for s in shapes):
        (a, b) = sorted(shapes, key=lambda s: s[2] != 4)
        if a[2] == 4 and a[:2] == b[:2] and b[2] >= 1:
            return "ssd"
    if len(shapes) != 1 or len(shapes[0]) != 3:
        raise NotADetector(
            f"outputs {[list(s) for s in shapes]} are not a detector head omse knows (one "
            "[N, 4+C, A] / [N, A, 4+C] / [N, A, 5+C] output, SSD's boxes + scores, NanoDet's "
            "six maps)"
        )
    if input_hw is None:
        raise NotADetector(
            f"output {list(shapes[0])}: telling a one-output detector head from sequence or map "
            "outputs needs the input size (H, W)"
        )
    _, x, y = shapes[0]
    anchors = anchor_count(input_hw)
    if x == anchors and y < x:
        width = y
        if num_classes is not None:
            if width == 4 + num_classes:
                return "yolov8-t"
            if width == 5 + num_classes:
                return "yolox"
        elif width in (84, 85):
            return "yolov8-t" if width == 84 else "yolox"
        raise NotADetector(
            f"output [N, {x}, {y}]: {x} anchors of {y} values could be YOLOv8 ([N, A, 4+C]) or "
            "YOLOX ([N, A, 5+C]); name the decoder (yolov8-t or yolox) or give the class count"
        )
    if y == anchors and 5 <= x < y and (num_classes is None or x == 4 + num_classes):
        return "yolov8"
    where = f"for a {input_hw[0]}x{input_hw[1]} input " if input_hw is not None else ""
    raise NotADetector(
        f"output {list(shapes[0])} is not a YOLO-style head: none of its axes has the "
        f"{anchors} anchors {where}over strides {STRIDES} with 4+C or 5+C values per anchor"
    )


# --- selection: score threshold, class-wise NMS ------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Greedy NMS: indices into ``boxes [K, 4]`` (xyxy) of the kept boxes, by descending score;
    a box is dropped when its IoU with a kept box of higher score is > ``iou_threshold`` (ties
    in score: the lower index first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    iou = box_iou(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[np.array(keep, dtype=np.int64)]


def select(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = NMS_IOU,
    max_detections: int = MAX_DETECTIONS,
) -> Detections:
    """One image's dense predictions ``boxes [A, 4]``, ``scores [A, C]`` -> :class:`Detections`:
    each anchor's best class, scores >= ``score_threshold``, NMS within each class, the
    ``max_detections`` highest scores."""
    boxes, scores = _np(boxes), _np(scores)
    cls = scores.argmax(1)
    best = scores[np.arange(len(cls)), cls]
    idx = np.flatnonzero(best >= score_threshold)
    keep = [
        idx[c_idx][nms(boxes[idx[c_idx]], best[idx[c_idx]], iou_threshold)]
        for c in np.unique(cls[idx])
        for c_idx in [cls[idx] == c]
    ]
    kept = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    kept = kept[np.argsort(-best[kept], kind="stable")][:max_detections]
    return Detections(boxes[kept], best[kept], cls[kept].astype(np.int64))


def detect(
    name: str,
    outputs: Sequence,
    input_hw: tuple[int, int] | None = None,
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = NMS_IOU,
    max_detections: int = MAX_DETECTIONS,
) -> list[Detections]:
    """:func:`decode` then :func:`select`, per image: a batch of raw outputs -> one
    :class:`Detections` per image (boxes in input pixels)."""
    return [
        select(b, s, score_threshold, iou_threshold, max_detections)
        for b, s in decode(name, outputs, input_hw)
    ]


# --- quantized vs FP32 ---------------------------------------------------------------------


def match(ref: Detections, out: Detections, iou_threshold: float = MATCH_IOU) -> int:
    """How many of ``out``'s detections match one of ``ref``'s: greedily by ``out``'s descending
    score, each to the unmatched ``ref`` detection of the same class with the highest IoU, if
    that IoU >= ``iou_threshold``."""
    if not len(ref) or not len(out):
        return 0
    iou = box_iou(out.boxes, ref.boxes)
    iou[out.classes[:, None] != ref.classes[None, :]] = -1.0
    taken = np.zeros(len(ref), bool)
    n = 0
    for i in np.argsort(-out.scores, kind="stable"):
        row = np.where(taken, -1.0, iou[i])
        j = int(row.argmax())
        if row[j] >= iou_threshold:
            taken[j] = True
            n += 1
    return n


def agreement(
    ref: Sequence[Detections], out: Sequence[Detections], iou_threshold: float = MATCH_IOU
) -> DetectionAgreement:
    """Quantized detections ``out`` against FP32's ``ref`` (one per image, same order):
    :func:`match` counts summed over the images -> :class:`DetectionAgreement`."""
    if len(ref) != len(out):
        raise ValueError(f"{len(ref)} FP32 images against {len(out)} quantized")
    m = sum(match(r, o, iou_threshold) for r, o in zip(ref, out, strict=True))
    nr, no = sum(len(r) for r in ref), sum(len(o) for o in out)
    return DetectionAgreement(m / nr if nr else None, m / no if no else None, m, nr, no, len(ref))


# --- labels: COCO json, mAP ----------------------------------------------------------------


def load_coco(path: str | Path) -> tuple[dict[str, GroundTruth], list[str]]:
    """A COCO instances json -> (``{file_name: GroundTruth}`` for every image, the class names):
    ``bbox`` (x, y, w, h) to xyxy; category ids mapped to 0..K-1 in ascending id order (COCO's
    80 ids 1..90 to the usual contiguous indices)."""
    d = json.loads(Path(path).read_text())
    cats = sorted(d["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    per: dict[int, list] = {im["id"]: [] for im in d["images"]}
    for a in d["annotations"]:
        per[a["image_id"]].append(a)
    out = {}
    for im in d["images"]:
        anns = per[im["id"]]
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        out[im["file_name"]] = GroundTruth(
            np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            np.array([index[a["category_id"]] for a in anns], np.int64),
            np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
        )
    return out, [c["name"] for c in cats]


def _crowd_iou(dets: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """COCO's overlap with a crowd region ``[K, M]``: intersection over the detection's area."""
    d, c = np.asarray(dets, np.float64), np.asarray(crowd, np.float64)
    lt = np.maximum(d[:, None, :2], c[None, :, :2])
    rb = np.minimum(d[:, None, 2:], c[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = np.clip(d[:, 2:] - d[:, :2], 0, None).prod(-1)[:, None]
    return np.where(area > 0, inter / np.where(area > 0, area, 1), 0.0)


def _match_image(
    boxes: np.ndarray, gt: np.ndarray, crowd: np.ndarray, ious: np.ndarray
) -> np.ndarray:
    """COCO's per-image matching of one class: ``boxes [K, 4]`` by descending score against
    ``gt [G, 4]`` (``crowd [G]``) -> ``[T, K]`` codes per IoU threshold: 1 true positive,
    0 false positive, -1 ignored (matched a crowd region)."""
    order = np.argsort(crowd, kind="stable")  # regular boxes first, as COCO sorts them
    gt, crowd = gt[order], crowd[order]
    ov = np.where(crowd[None, :], _crowd_iou(boxes, gt), box_iou(boxes, gt))
    codes = np.zeros((len(ious), len(boxes)), np.int8)
    for t, thr in enumerate(ious):
        taken = np.zeros(len(gt), bool)
        for d in range(len(boxes)):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(len(gt)):
                if taken[g] and not crowd[g]:
                    continue
                if m > -1 and not crowd[m] and crowd[g]:
                    break
                if ov[d, g] < best:
                    continue
                best, m = ov[d, g], g
            if m > -1:
                taken[m] = True
                codes[t, d] = -1 if crowd[m] else 1
    return codes


def _average_precision(scores: np.ndarray, tp: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections (``scores [K]``, ``tp [K]`` bool, crowd
    matches already removed) against ``n_gt`` labelled boxes."""
    if n_gt == 0 or len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(tp[order])
    fps = np.cumsum(~tp[order])
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(
        np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0).mean()
    )


ImageMatches = dict[int, tuple[np.ndarray, np.ndarray, int]]
"""One image's detections matched per class (:func:`image_matches`): ``{class: (scores [K],
codes [T, K] per IoU threshold as :func:`coco_map` matches them, labelled boxes)}``."""


def image_matches(
    d: Detections,
    g: GroundTruth,
    thresholds: Sequence[float],
    max_detections: int = MAX_DETECTIONS,
) -> ImageMatches:
    """The per-image half of :func:`coco_map` (matching is per image, per class and per IoU
    threshold): every class the image has a label or a detection of, its detections by
    descending score (at most ``max_detections``), their codes (1 true positive, 0 false
    positive, -1 absorbed by a crowd label) and its number of non-crowd labels. Images drawn
    again (a bootstrap) reuse these instead of matching again (:func:`map_of_matches`)."""
    thresholds = np.asarray(thresholds, np.float64)
    out: ImageMatches = {}
    for c in sorted({int(c) for c in g.classes} | {int(c) for c in d.classes}):
        gm, dm = g.classes == c, np.flatnonzero(d.classes == c)
        dm = dm[np.argsort(-d.scores[dm], kind="mergesort")][:max_detections]
        codes = _match_image(d.boxes[dm], g.boxes[gm], g.crowd[gm], thresholds)
        out[c] = (d.scores[dm], codes, int((gm & ~g.crowd).sum()))
    return out


def _labelled_classes(parts: Sequence[ImageMatches]) -> list[int]:
    """The classes some image labels with a non-crowd box, sorted."""
    return sorted({c for p in parts for c, (_, _, n) in p.items() if n > 0})


def map_of_matches(parts: Sequence[ImageMatches], n_thresholds: int) -> np.ndarray:
    """``[n_thresholds]`` mAP of images matched by :func:`image_matches` (with that many
    thresholds): per threshold, the 101-point AP of every class some image labels (a crowd
    label alone does not count), averaged over those classes (0 where there are none)."""
    classes = _labelled_classes(parts)
    ap = np.zeros((n_thresholds, len(classes)))
    for k, c in enumerate(classes):
        hit = [p[c] for p in parts if c in p]
        s = np.concatenate([h[0] for h in hit])
        code = np.concatenate([h[1] for h in hit], 1)
        n_gt = sum(h[2] for h in hit)
        for t in range(n_thresholds):
            keep = code[t] >= 0
            ap[t, k] = _average_precision(s[keep], code[t][keep] == 1, n_gt)
    return np.array([ap[t].mean() if classes else 0.0 for t in range(n_thresholds)])


def coco_map(
    dets: Sequence[Detections],
    gts: Sequence[GroundTruth],
    ious: Sequence[float] = COCO_IOUS,
    max_detections: int = MAX_DETECTIONS,
) -> dict[str, float]:
    """COCO-style mAP of ``dets`` against ``gts`` (one per image, same order, boxes in the same
    pixels): per class and IoU threshold, detections matched greedily by score to the unmatched
    label of highest IoU (crowd labels absorb detections, which then count for nothing), the
    101-point interpolated AP; averaged over the classes that have labels, then over ``ious``.
    At most ``max_detections`` per image and class. -> ``{"map50", "map50_95", "classes"}``
    (``map50`` is the AP at IoU 0.5, whether or not 0.5 is in ``ious``). The images are
    matched one by one (:func:`image_matches`), then pooled (:func:`map_of_matches`)."""
    ious = np.asarray(ious, np.float64)
    thresholds = np.unique(np.concatenate([ious, [0.5]]))
    parts = [
        image_matches(d, g, thresholds, max_detections) for d, g in zip(dets, gts, strict=True)
    ]
    per = map_of_matches(parts, len(thresholds))
    at = {round(float(t), 2): per[i] for i, t in enumerate(thresholds)}
    classes = _labelled_classes(parts)
    return {
        "map50": float(at[0.5]),
        "map50_95": float(np.mean([at[round(float(t), 2)] for t in ious])),
        "classes": len(classes),
    }
