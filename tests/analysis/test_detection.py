"""Detection metrics on hand-computed cases: IoUs, decoders, NMS (against a brute-force
reference), recall/precision of matched detections, COCO-style AP, the head recogniser. The
real detectors (``../shared/data`` or ``$OMSE_DATA``) are only recognised, and skip without it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from omse.analysis import detection as det
from omse.analysis.detection import Detections, GroundTruth, NotADetector

DATA = Path(
    os.environ.get("OMSE_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
)


def dets(boxes, scores, classes) -> Detections:
    return Detections(
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(scores, np.float32),
        np.array(classes, np.int64),
    )


def gt(boxes, classes, crowd=None) -> GroundTruth:
    classes = np.array(classes, np.int64)
    crowd = np.zeros(len(classes), bool) if crowd is None else np.array(crowd, bool)
    return GroundTruth(np.array(boxes, np.float32).reshape(-1, 4), classes, crowd)


# --- geometry --------------------------------------------------------------------------------


def test_box_iou_hand_computed():
    a = np.array([[0, 0, 2, 2]], np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 1], [5, 5, 6, 6], [0, 0, 2, 2], [1, 1, 1, 1]])
    iou = det.box_iou(a, b)
    assert iou.shape == (1, 5)
    np.testing.assert_allclose(iou[0], [1 / 7, 0.5, 0.0, 1.0, 0.0])  # empty box: IoU 0


def test_anchor_count():
    assert det.anchor_count((640, 640)) == 8400
    assert det.anchor_count((416, 416)) == 3549
    assert det.anchor_count((320, 320)) == 2100
    assert det.anchor_count((16, 16)) == 4 + 1 + 1  # ceil: a partial cell is a cell


# --- decoders ----------------------------------------------------------------------------------


def test_yolov8_decode_both_layouts():
    # two anchors, two classes: (cx, cy, w, h, s0, s1)
    rows = torch.tensor([[10.0, 10, 4, 2, 0.9, 0.1], [5, 5, 2, 2, 0.2, 0.3]])
    ((b, s),) = det.decode_yolov8(rows.T[None], channels_first=True)
    np.testing.assert_allclose(b, [[8, 9, 12, 11], [4, 4, 6, 6]])
    np.testing.assert_allclose(s, [[0.9, 0.1], [0.2, 0.3]], rtol=1e-6)
    ((b2, s2),) = det.decode_yolov8(rows[None].numpy(), channels_first=False)
    np.testing.assert_array_equal(b, b2)
    np.testing.assert_array_equal(s, s2)


def test_yolox_grid_decode():
    # a 16x16 input: 2x2 cells at stride 8, 1 at 16, 1 at 32 -> 6 anchors
    y = np.zeros((1, 6, 7), np.float32)
    y[0, 1] = [0.5, 0.5, math.log(2), 0.0, 0.5, 0.8, 0.2]  # stride 8, cell x=1, y=0
    y[0, 4] = [0.0, 0.0, 0.0, 0.0, 1.0, 0.1, 0.6]  # stride 16, cell (0, 0)
    ((b, s),) = det.decode_yolox(y, (16, 16))
    np.testing.assert_allclose(b[1], [4, 0, 20, 8], rtol=1e-6)  # cx 12, cy 4, w 16, h 8
    np.testing.assert_allclose(s[1], [0.4, 0.1], rtol=1e-6)  # objectness x class score
    np.testing.assert_allclose(b[4], [-8, -8, 8, 8], rtol=1e-6)
    np.testing.assert_allclose(s[4], [0.1, 0.6], rtol=1e-6)
    with pytest.raises(NotADetector, match=r"\[N, 21, 5\+C\], got \[1, 6, 7\]"):
        det.decode_yolox(y, (32, 32))


def test_nanodet_decode_softmax_integral():
    # a 32x32 input: 4x4 cells at stride 8, 2x2 at 16, 1 at 32; 2 classes, 8 bins
    hws = [16, 4, 1]
    cls = [np.full((n, 2), 0.1, np.float32) for n in hws]
    box = [np.zeros((n, 32), np.float32) for n in hws]  # uniform bins: distance 3.5 x stride
    box[0][1] = -50.0
    box[0][1].reshape(4, 8)[:, 2] = 50.0  # one-hot at bin 2: distance 2 x stride
    cls[0][1] = [0.7, 0.2]
    outs = [cls[1], box[2], cls[0], box[0], cls[2], box[1]]  # any order (names mislabelled)
    ((b, s),) = det.decode_nanodet(outs, (32, 32))
    assert b.shape == (21, 4) and s.shape == (21, 2)
    np.testing.assert_allclose(b[1], [11.5 - 16, 3.5 - 16, 11.5 + 16, 3.5 + 16], atol=1e-4)
    np.testing.assert_allclose(s[1], [0.7, 0.2])
    c = 7.5  # stride 16, cell (0, 0): centre 0 * 16 + 15 / 2
    np.testing.assert_allclose(b[16], [c - 56, c - 56, c + 56, c + 56], atol=1e-4)
    ((b3, _),) = det.decode_nanodet([o[None] for o in outs], (32, 32))  # with a batch axis
    np.testing.assert_array_equal(b, b3)


def test_ssd_decode_drops_background_and_scales_normalised_boxes():
    boxes = np.array([[[0.0, 0.0, 0.5, 0.25]]], np.float32)
    scores = np.array([[[0.7, 0.2, 0.1]]], np.float32)
    ((b, s),) = det.decode_ssd(boxes, scores, input_hw=(100, 200), background=0)
    np.testing.assert_allclose(b, [[0, 0, 100, 25]])
    np.testing.assert_allclose(s, [[0.2, 0.1]])


def test_decode_by_name_and_unknown_name():
    y = torch.zeros(2, 6, 84)
    assert len(det.decode("yolov8", [y])) == 2
    with pytest.raises(NotADetector, match="choose from yolov8, yolov8-t, yolox, ssd, nanodet"):
        det.decode("retinanet", [y])
    with pytest.raises(NotADetector, match="needs the input size"):
        det.decode("yolox", [y])


# --- NMS, selection ------------------------------------------------------------------------------


def brute_force_nms(boxes, scores, thr):
    """The textbook loop: repeatedly take the best remaining box, drop what overlaps it."""

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    left = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    while left:
        i = left.pop(0)
        keep.append(i)
        left = [j for j in left if iou(boxes[i], boxes[j]) <= thr]
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    xy = rng.uniform(0, 50, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], 1).astype(np.float32)
    scores = rng.choice([0.3, 0.5, 0.9], n) if seed % 2 else rng.uniform(0, 1, n)  # ties too
    thr = float(rng.choice([0.3, 0.45, 0.7]))
    got = det.nms(boxes, scores.astype(np.float32), thr)
    assert got.tolist() == brute_force_nms(boxes.tolist(), scores.astype(np.float32).tolist(), thr)


def test_select_is_class_wise_with_thresholds():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.2, 0.1]], np.float32)
    d = det.select(boxes, scores)  # 1 suppresses into 0 (IoU 0.9); 2 is another class; 3 < 0.25
    assert d.classes.tolist() == [0, 1]
    np.testing.assert_allclose(d.scores, [0.9, 0.7])
    assert len(det.select(boxes, scores, score_threshold=0.1, iou_threshold=0.95)) == 4
    assert len(det.select(boxes, scores, max_detections=1)) == 1
    assert len(det.select(np.zeros((0, 4)), np.zeros((0, 3)))) == 0


# --- quantized vs FP32 -----------------------------------------------------------------------------


def test_recall_and_precision_hand_computed():
    ref = dets([[0, 0, 2, 2], [10, 10, 20, 20], [30, 30, 40, 40]], [0.9, 0.8, 0.7], [0, 1, 2])
    out = dets(
        [[0, 0, 2, 2], [10, 10, 20, 20], [31, 31, 33, 33], [0, 0, 2, 1.2]],  # exact, wrong class,
        [0.9, 0.8, 0.7, 0.6],  # IoU 0.04, IoU 0.6 with a box already taken
        [0, 2, 2, 0],
    )
    assert det.match(ref, out) == 1
    a = det.agreement([ref, ref], [out, ref])
    assert (a.matched, a.n_ref, a.n_out, a.images) == (4, 6, 7, 2)
    assert a.recall == pytest.approx(4 / 6) and a.precision == pytest.approx(4 / 7)
    empty = dets([], [], [])
    assert det.agreement([empty], [empty]).recall is None


def test_match_is_greedy_by_score():
    ref = dets([[0, 0, 10, 10]], [0.9], [0])
    out = dets([[0, 0, 10, 6], [0, 0, 10, 10]], [0.5, 0.95], [0, 0])  # the better-scored takes it
    assert det.match(ref, out) == 1
    assert det.match(ref, dets([[0, 0, 10, 6]], [0.5], [0])) == 1  # IoU 0.6 >= 0.5
    assert det.match(ref, dets([[0, 0, 10, 4]], [0.5], [0])) == 0  # IoU 0.4


# --- mAP against labels -----------------------------------------------------------------------------


def test_ap_hand_worked_101_points():
    # two labels; detections by score: TP, FP, TP -> recall 0.5, 0.5, 1; precision 1, 1/2, 2/3;
    # envelope 1, 2/3, 2/3: recall points 0..0.50 (51) read 1, 0.51..1 (50) read 2/3
    g = gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])
    d = dets([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])
    m = det.coco_map([d], [g])
    expected = (51 * 1 + 50 * 2 / 3) / 101
    assert m["map50"] == pytest.approx(expected) and m["map50_95"] == pytest.approx(expected)
    assert m["classes"] == 1


def test_ap_over_iou_thresholds_and_classes():
    g = gt([[0, 0, 10, 10], [0, 0, 10, 10]], [0, 1])
    d = dets(
        [[0, 0, 10, 6.2]], [0.9], [0]
    )  # IoU 0.62: a hit at 0.50, 0.55, 0.60 only; class 1 missed
    m = det.coco_map([d], [g])
    assert m["map50"] == pytest.approx(0.5)  # class 0: 1, class 1: 0
    assert m["map50_95"] == pytest.approx(0.5 * 3 / 10)


def test_ap_crowd_region_absorbs_detections():
    g = gt([[0, 0, 10, 10], [100, 100, 200, 200]], [0, 0], crowd=[False, True])
    d = dets([[0, 0, 10, 10], [110, 110, 130, 130], [150, 150, 160, 160]], [0.5, 0.9, 0.8], [0] * 3)
    assert det.coco_map([d], [g])["map50"] == pytest.approx(1.0)  # two inside the crowd: ignored
    d2 = dets([[0, 0, 10, 10], [300, 300, 310, 310]], [0.5, 0.9], [0, 0])  # outside: an FP
    # FP then TP: precision 0, 1/2 at recall 0, 1; the envelope reads 1/2 at every recall point
    assert det.coco_map([d2], [g])["map50"] == pytest.approx(0.5)


def test_ap_two_images_pooled_by_score():
    g = [gt([[0, 0, 10, 10]], [0]), gt([[0, 0, 10, 10]], [0])]
    d = [dets([[0, 0, 10, 10]], [0.6], [0]), dets([[50, 50, 60, 60]], [0.9], [0])]
    # pooled: FP (0.9) then TP (0.6): precision 0, 1/2; recall 0, 1/2 -> envelope 1/2 up to 0.5
    assert det.coco_map(d, g)["map50"] == pytest.approx(51 * 0.5 / 101)


def test_load_coco_maps_ids_and_boxes(tmp_path):
    doc = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 90, "iscrowd": 0},
            {"image_id": 7, "bbox": [0, 0, 5, 5], "category_id": 1, "iscrowd": 1},
        ],
        "categories": [
            {"id": 90, "name": "toothbrush"},
            {"id": 1, "name": "person"},
            {"id": 5, "name": "airplane"},
        ],
    }
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(doc))
    gts, names = det.load_coco(p)
    assert names == ["person", "airplane", "toothbrush"]
    np.testing.assert_allclose(gts["a.jpg"].boxes, [[1, 2, 4, 6], [0, 0, 5, 5]])
    assert gts["a.jpg"].classes.tolist() == [2, 0]
    assert gts["a.jpg"].crowd.tolist() == [False, True]
    assert gts["b.jpg"].boxes.shape == (0, 4)


def test_scale_boxes_to_the_image():
    d = det.scale_boxes(dets([[10, 20, 300, 90]], [0.5], [3]), (0.5, 0.5), (400, 100))
    np.testing.assert_allclose(d.boxes, [[20, 40, 400, 100]])  # clipped to 400 x 100


# --- the recogniser ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes, hw, k, name",
    [
        ([(1, 84, 8400)], (640, 640), None, "yolov8"),
        ([(4, 7, 84)], (64, 64), None, "yolov8"),
        ([(1, 8400, 84)], (640, 640), None, "yolov8-t"),
        ([(1, 3549, 85)], (416, 416), None, "yolox"),
        ([(1, 8400, 90)], (640, 640), 85, "yolox"),
        ([(1, 8400, 90)], (640, 640), 86, "yolov8-t"),
        ([(1, 3000, 4), (1, 3000, 21)], None, None, "ssd"),
        ([(1, 3000, 21), (1, 3000, 4)], None, None, "ssd"),
        (
            [(1600, 80), (400, 80), (100, 80), (1600, 32), (400, 32), (100, 32)],
            (320, 320),
            None,
            "nanodet",
        ),
    ],
)
def test_recognise(shapes, hw, k, name):
    assert det.recognise(shapes, hw, k) == name


@pytest.mark.parametrize(
    "shapes, hw, match",
    [
        ([(8, 1000)], (224, 224), "not a detector head"),  # classifier logits
        ([(8, 21, 64, 64)], (512, 512), "not a detector head"),  # segmentation maps
        ([(8, 40, 6625)], (48, 320), "not a YOLO-style head"),  # CTC sequence logits
        ([(1, 84, 8400)], (416, 416), "3549 anchors"),  # wrong input size
        ([(1, 8400, 90)], (640, 640), "name the decoder"),  # YOLOv8 or YOLOX: ambiguous
        ([(1, 3549, 85)], None, "needs the input size"),
    ],
)
def test_recognise_refuses_with_a_reason(shapes, hw, match):
    with pytest.raises(NotADetector, match=match):
        det.recognise(shapes, hw)


@pytest.mark.skipif(
    not (DATA / "detection").is_dir(), reason="needs ../shared/data (or $OMSE_DATA)"
)
def test_real_detectors_are_recognised():
    ort = pytest.importorskip("onnxruntime")
    for rel, hw, name in [
        ("yolox_nano/yolox_nano.onnx", (416, 416), "yolox"),
        ("nanodet_m/nanodet_m_320.onnx", (320, 320), "nanodet"),
    ]:
        s = ort.InferenceSession(str(DATA / "detection" / rel), providers=["CPUExecutionProvider"])
        assert det.recognise([o.shape for o in s.get_outputs()], hw) == name


def _random_scene(rng, n_images: int = 12):
    """Labelled images (some crowd labels) and detections near and far from the labels, with
    repeated scores: (detections, ground truths)."""
    ds, gs = [], []
    for _ in range(n_images):
        k = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, (k, 2))
        wh = rng.uniform(10, 60, (k, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        classes = rng.integers(0, 4, k)
        crowd = rng.random(k) < 0.15
        gs.append(gt(boxes.tolist(), classes.tolist(), crowd=crowd.tolist()))
        m = int(rng.integers(0, 9))
        src = rng.integers(0, max(k, 1), m)
        jit = rng.normal(0, 6, (m, 4))
        db = (boxes[src] if k else rng.uniform(0, 200, (m, 4))) + jit
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dc = np.where(rng.random(m) < 0.8, classes[src] if k else 0, rng.integers(0, 4, m))
        scores = np.round(rng.uniform(0.3, 1.0, m), 1)  # ties
        ds.append(dets(db.tolist(), scores.tolist(), dc.tolist()))
    return ds, gs


def test_map_of_matches_is_coco_map_on_every_resample():
    """Images matched once and pooled again (a bootstrap's draws, with repeats) give coco_map's
    figures on the drawn images, bit for bit, at IoU 0.5 alone and over COCO's thresholds."""
    rng = np.random.default_rng(0)
    ds, gs = _random_scene(rng)
    at50 = [det.image_matches(d, g, [0.5]) for d, g in zip(ds, gs, strict=True)]
    thr = np.unique(np.concatenate([np.asarray(det.COCO_IOUS), [0.5]]))
    every = [det.image_matches(d, g, thr) for d, g in zip(ds, gs, strict=True)]
    for _ in range(20):
        idx = rng.integers(0, len(ds), len(ds))
        ref = det.coco_map([ds[i] for i in idx], [gs[i] for i in idx])
        assert det.map_of_matches([at50[i] for i in idx], 1)[0] == ref["map50"]
        per = det.map_of_matches([every[i] for i in idx], len(thr))
        assert per[list(thr).index(0.5)] == ref["map50"]
        assert float(np.mean(per)) == pytest.approx(ref["map50_95"], abs=0)
    assert 0 < det.coco_map(ds, gs)["map50"] < 1  # the scene is neither trivial nor hopeless
