"""The OCR zoo: synthetic text (determinism, split disjointness, shapes), rapidocr's
preprocessing transcribed (known values), CTC decoding and the metrics (brute force)."""

import importlib.util
import itertools

import numpy as np
import pytest

from omse.errors import ConfigError, OmseError
from omse.zoo import ocr

has_rapidocr = importlib.util.find_spec("rapidocr_onnxruntime") is not None


def _dp_distance(a: str, b: str) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i, j in itertools.product(range(1, len(a) + 1), range(1, len(b) + 1)):
        d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[len(a)][len(b)]


def test_lines_are_deterministic_and_extend():
    a, b = ocr.text_lines(6, "eval", seed=3), ocr.text_lines(9, "eval", seed=3)
    for x, y in zip(a, b[:6]):
        assert x.text == y.text and np.array_equal(x.image, y.image)
    assert [x.text for x in ocr.text_lines(6, "eval", seed=4)] != [x.text for x in a]


def test_line_shapes_and_ratio():
    for line in ocr.text_lines(12, "calib", seed=0, max_wh_ratio=8.0):
        h, w, c = line.image.shape
        assert c == 3 and line.image.dtype == np.uint8
        assert 24 <= h <= 70 and w / h <= 8.0 + 1e-9
        assert line.text == " ".join(line.tokens) and line.text.strip() == line.text
        assert np.array_equal(line.bgr(), line.image[:, :, ::-1])


def test_splits_never_share_a_token_or_a_word():
    cal, ev = ocr.vocabulary("calib"), ocr.vocabulary("eval")
    assert len(cal) > 200 and len(ev) > 600 and not set(cal) & set(ev)
    lines_c, lines_e = ocr.text_lines(40, "calib", 0), ocr.text_lines(40, "eval", 1)
    ocr.assert_disjoint(lines_c, lines_e)
    assert all(ocr.token_split(t) == "calib" for x in lines_c for t in x.tokens)
    assert all(ocr.token_split(t) == "eval" for x in lines_e for t in x.tokens)
    pages_c, pages_e = (
        ocr.text_pages(1, "calib", 0, 256, 256),
        ocr.text_pages(1, "eval", 1, 256, 256),
    )
    ocr.assert_disjoint(pages_c, pages_e)
    with pytest.raises(OmseError, match="share tokens"):
        ocr.assert_disjoint(lines_c, lines_c[:1])
    with pytest.raises(ConfigError, match="split='test'"):
        ocr.text_lines(1, "test")


def test_token_split_ignores_case_and_punctuation():
    for w in ("Python", "assert", "2024-05-17", "42%"):
        assert ocr.token_split(w) == ocr.token_split(w.upper() + ",") == ocr.token_split(f"({w})")


def test_pages_boxes_inside_and_mask():
    (page,) = ocr.text_pages(1, "eval", seed=2, height=320, width=480)
    assert page.image.shape == (320, 480, 3) and len(page.boxes) == len(page.texts) >= 1
    for x0, y0, x1, y1 in page.boxes:
        assert 0 <= x0 < x1 <= 480 and 0 <= y0 < y1 <= 320
    m = page.mask
    assert m.dtype == bool and 0 < m.mean() < 0.8
    # ink is dark, background light: the masked pixels are darker on average
    grey = page.image.mean(2)
    assert grey[m].mean() < grey[~m].mean()


def test_resize_matches_cv2_half_pixel_bilinear():
    img = np.array([[[0], [255]]], np.uint8)  # 1 x 2, one channel
    out = ocr.resize_bilinear(img, 1, 4)
    assert out[0, :, 0].tolist() == [0, 64, 191, 255]  # cv2.resize(img, (4, 1)) gives these
    const = np.full((7, 5, 3), 93, np.uint8)
    assert (ocr.resize_bilinear(const, 13, 3) == 93).all()


def test_det_preprocess_rounds_to_32_and_normalises():
    page = np.full((480, 640, 3), 255, np.uint8)
    x = ocr.det_preprocess(page)
    # shorter side to 736: 640 * 736/480 = 981 -> 992 (31 * 32)
    assert x.shape == (1, 3, 736, 992) and x.dtype == np.float32
    assert np.allclose(x, 1.0)
    assert ocr.det_preprocess(np.zeros((800, 900, 3), np.uint8)).shape == (1, 3, 800, 896)


def test_rec_and_cls_preprocess_pad_right_with_zeros():
    line = np.zeros((30, 90, 3), np.uint8)  # ratio 3
    x = ocr.rec_preprocess([line], max_wh_ratio=10.0)
    assert x.shape == (1, 3, 48, 480)
    assert np.allclose(x[..., :144], -1.0) and np.allclose(x[..., 144:], 0.0)
    assert ocr.rec_preprocess([line]).shape == (1, 3, 48, 320)  # rapidocr's minimum ratio
    wide = np.full((10, 400, 3), 255, np.uint8)  # ratio 40 > 192/48: squeezed to full width
    c = ocr.cls_preprocess([line, wide])
    assert c.shape == (2, 3, 48, 192) and np.allclose(c[1], 1.0)


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    charset = ["blank", "a", "b", " "]
    steps = [[1, 1, 0, 1, 2, 2, 3, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
    probs = np.eye(4)[np.array(steps)]
    assert ocr.ctc_greedy_decode(probs, charset) == ["aab ", ""]
    with pytest.raises(ConfigError, match="charset of 3"):
        ocr.ctc_greedy_decode(probs, charset[:3])


def test_edit_distance_against_dynamic_programming():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = "".join(rng.choice(list("abc "), rng.integers(0, 9)))
        b = "".join(rng.choice(list("abc "), rng.integers(0, 9)))
        assert ocr.edit_distance(a, b) == _dp_distance(a, b)
    assert ocr.edit_distance("kitten", "sitting") == 3
    assert ocr.char_error_rate("", "") == 0.0 and ocr.char_error_rate("x", "") == 1.0
    assert ocr.char_error_rate("abcd", "abce") == 0.25


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert ocr.mask_iou(a, b) == pytest.approx(4 / 12)
    assert ocr.mask_iou(b, b) == 1.0 and ocr.mask_iou(a & False, b & False) == 1.0
    with pytest.raises(ConfigError, match="shapes"):
        ocr.mask_iou(a, a[:2])


@pytest.mark.skipif(not has_rapidocr, reason="rapidocr-onnxruntime not installed")
def test_fp32_recognizer_reads_a_rendered_line_in_onnxruntime():
    import onnxruntime as ort

    paths = ocr.rapidocr_models()
    charset = ocr.rapidocr_charset(paths["rec"])
    assert len(charset) == 6625 and charset[0] == "blank" and charset[-1] == " "
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(paths["rec"]), so, providers=["CPUExecutionProvider"])
    lines = ocr.text_lines(3, "eval", seed=1)
    probs = sess.run(None, {"x": ocr.rec_preprocess([x.bgr() for x in lines], max_wh_ratio=10)})[0]
    assert probs.shape == (3, 60, 6625)
    read = [t.strip() for t in ocr.ctc_greedy_decode(probs, charset)]
    assert sum(r == x.text for r, x in zip(read, lines)) >= 2


def test_calibration_loaders_give_preprocessed_batches_of_the_calib_split():
    rec = ocr.rec_calibration(6, batch=4)
    assert [tuple(b.shape) for b in rec] == [(4, 3, 48, 480), (2, 3, 48, 480)]
    lines = ocr.text_lines(6, "calib", 0, 10.0)
    want = ocr.rec_preprocess([x.bgr() for x in lines[4:]], max_wh_ratio=10.0)
    assert np.array_equal(rec[1].numpy(), want)
    imgs, labels = ocr.turned(lines[:4])
    assert labels.tolist() == [0, 1, 0, 1]
    assert np.array_equal(imgs[1], lines[1].bgr()[::-1, ::-1]) and imgs[1].flags.c_contiguous
    cls = ocr.cls_calibration(4, batch=4)
    assert len(cls) == 1 and np.array_equal(cls[0].numpy(), ocr.cls_preprocess(imgs))
    det = ocr.det_calibration(2, batch=2, side=256)
    assert [tuple(b.shape) for b in det] == [(2, 3, 256, 256)]
    assert float(det[0].min()) >= -1 and float(det[0].max()) <= 1
