"""OCR workloads: rapidocr's ONNX models, their preprocessing, synthetic text images, metrics.

Models
    :func:`rapidocr_models` finds the three ONNX files that the PyPI package
    ``rapidocr-onnxruntime`` 1.4.4 ships (without importing it: its ``__init__`` needs OpenCV):
    the PP-OCRv4 text detector (DB, ``x [N,3,H,W] -> probability map [N,1,H,W]``), the mobile
    v2.0 direction classifier (``[N,3,48,192] -> softmax [N,2]`` over ``('0', '180')``) and the
    PP-OCRv4 CTC recognizer (``[N,3,48,W] -> softmax [N, W/8, 6625]``).
    :func:`rapidocr_charset` reads the recognizer's dictionary from its ONNX metadata
    ``character`` and adds CTC's blank at 0 and ``' '`` at the end, as rapidocr's
    ``CTCLabelDecode`` does.

Preprocessing (transcribed from rapidocr 1.4.4's ``ch_ppocr_det/utils.py``,
``ch_ppocr_rec/text_recognize.py`` and ``ch_ppocr_cls/text_cls.py``; images are uint8
``[H, W, 3]`` in **BGR** order, as rapidocr's ``LoadImage`` hands them over)
    - detector: scale so the shorter side is ``limit_side_len`` (736; ``limit_type="min"``), round
      each side to a multiple of 32, bilinear resize, ``(x/255 - 0.5)/0.5``;
    - recognizer: height 48, width ``ceil(48 * w/h)`` capped at ``int(48 * max_wh_ratio)``,
      ``(x/255 - 0.5)/0.5``, zero-padded on the right to ``int(48 * max_wh_ratio)``;
    - classifier: the same into a fixed ``48 x 192``.
    Resizing is ``cv2.resize``'s default bilinear (half-pixel centres, no antialiasing, rounded
    back to uint8), done with ``torch.nn.functional.interpolate``.

Data
    :func:`text_lines` and :func:`text_pages` render deterministic synthetic text with PIL in the
    DejaVu/STIX fonts that matplotlib bundles: tokens are words of the Python reference
    documentation (:func:`omse.zoo.text.sentence_corpus`), numbers, dates and words with
    punctuation, in lower, title or upper case; light backgrounds, dark ink, optional small
    rotation, blur and noise. Every token belongs to exactly one split, ``"calib"`` or ``"eval"``,
    by the SHA-256 of its lower-case core (:func:`token_split`), and each split draws from its own
    random stream, so calibration and evaluation text never share a token
    (:func:`assert_disjoint` checks two sets of images).

Calibration loaders
    :func:`rec_calibration`, :func:`cls_calibration` and :func:`det_calibration` return
    preprocessed calibration batches of the ``"calib"`` split, as ``omse quantize <model>.onnx
    --calib-loader omse.zoo.ocr:rec_calibration`` takes them.

Metrics
    :func:`ctc_greedy_decode` (argmax, merge repeats, drop blanks: rapidocr's decode),
    :func:`edit_distance`, :func:`char_error_rate`, :func:`mask_iou`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..errors import ConfigError, OmseError
from .text import sentence_corpus

__all__ = [
    "CLS_LABELS",
    "FONT_FILES",
    "Page",
    "RAPIDOCR_MODELS",
    "SPLITS",
    "TextLine",
    "assert_disjoint",
    "char_error_rate",
    "cls_calibration",
    "cls_preprocess",
    "ctc_greedy_decode",
    "det_calibration",
    "det_preprocess",
    "edit_distance",
    "mask_iou",
    "rapidocr_charset",
    "rapidocr_models",
    "rec_calibration",
    "rec_preprocess",
    "resize_bilinear",
    "text_lines",
    "text_pages",
    "token_split",
    "turned",
    "vocabulary",
]

RAPIDOCR_MODELS = {
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}
CLS_LABELS = ("0", "180")
SPLITS = {"calib": 0, "eval": 1}
# matplotlib's bundled fonts (a dependency of omse), so every machine renders the same pixels.
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
)
_CALIB_MODULUS = 4  # one token in four (by hash) is a calibration token


# -- models ---------------------------------------------------------------------------------------


def rapidocr_models() -> dict[str, Path]:
    """``{"det", "cls", "rec"}`` -> the ONNX files of the installed ``rapidocr-onnxruntime``."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise OmseError(
            "the OCR benchmark needs the PyPI package rapidocr-onnxruntime==1.4.4 (its ONNX "
            "models): pip install --no-deps rapidocr-onnxruntime==1.4.4"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "models"
    out = {k: root / v for k, v in RAPIDOCR_MODELS.items()}
    missing = [str(p) for p in out.values() if not p.is_file()]
    if missing:
        raise OmseError(f"rapidocr-onnxruntime is installed but lacks {', '.join(missing)}")
    return out


def rapidocr_charset(rec_path: str | Path) -> list[str]:
    """The recognizer's CTC classes: ``['blank', *metadata['character'], ' ']``."""
    import onnx

    model = onnx.load(str(rec_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise OmseError(f"{rec_path} has no 'character' metadata: not a rapidocr recognizer")
    return ["blank", *meta["character"].splitlines(), " "]


# -- preprocessing -------------------------------------------------------------------------------


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> uint8 ``[height, width, C]``, as ``cv2.resize(img, (width, height))``
    (bilinear, half-pixel centres, no antialiasing), rounded half up."""
    if img.ndim != 3 or img.dtype != np.uint8:
        raise ConfigError(f"expected a uint8 [H, W, C] image, got {img.dtype} {img.shape}")
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    r = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    return (r[0].permute(1, 2, 0) + 0.5).floor().clamp(0, 255).to(torch.uint8).numpy()


def _normalize(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> float32 ``[C, H, W]``, ``(x/255 - 0.5)/0.5``."""
    return ((img.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def det_preprocess(img: np.ndarray, limit_side_len: int = 736) -> np.ndarray:
    """One BGR uint8 page ``[H, W, 3]`` -> float32 ``[1, 3, H', W']``, ``H', W'`` multiples of 32
    (rapidocr's ``DetPreProcess`` with ``limit_type="min"``, mean = std = 0.5)."""
    h, w = img.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh = int(round(int(h * ratio) / 32) * 32)
    rw = int(round(int(w * ratio) / 32) * 32)
    if rh <= 0 or rw <= 0:
        raise ConfigError(f"page of {h}x{w} pixels is too small for the detector")
    return _normalize(resize_bilinear(img, rh, rw))[None]


def _resize_pad(img: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    rw = min(width, int(math.ceil(height * w / h)))
    out = np.zeros((img.shape[2], height, width), np.float32)
    out[:, :, :rw] = _normalize(resize_bilinear(img, height, rw))
    return out


def rec_preprocess(
    imgs: Sequence[np.ndarray], height: int = 48, max_wh_ratio: float | None = None
) -> np.ndarray:
    """BGR uint8 lines -> float32 ``[N, 3, height, int(height * max_wh_ratio)]``.

    ``max_wh_ratio`` defaults to rapidocr's choice for one batch: the widest line's ``w/h``, at
    least ``320/48``. Pass a fixed value to give every batch the same width.
    """
    if max_wh_ratio is None:
        max_wh_ratio = max([320 / 48] + [im.shape[1] / im.shape[0] for im in imgs])
    width = int(height * max_wh_ratio)
    return np.stack([_resize_pad(im, height, width) for im in imgs])


def cls_preprocess(imgs: Sequence[np.ndarray], height: int = 48, width: int = 192) -> np.ndarray:
    """BGR uint8 lines -> float32 ``[N, 3, 48, 192]`` (rapidocr's ``TextClassifier``)."""
    return np.stack([_resize_pad(im, height, width) for im in imgs])


# -- metrics -------------------------------------------------------------------------------------


def ctc_greedy_decode(probs: np.ndarray | torch.Tensor, charset: Sequence[str]) -> list[str]:
    """``[N, T, C]`` class scores -> N strings: argmax per step, repeats merged, class 0 (blank)
    dropped (rapidocr's ``CTCLabelDecode`` with ``is_remove_duplicate=True``)."""
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[2] != len(charset):
        raise ConfigError(
            f"CTC scores of shape {probs.shape} do not match a charset of {len(charset)} classes"
        )
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(charset[i] for i in idx[keep]))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    prev = np.arange(len(b) + 1)
    bb = np.frombuffer(b.encode("utf-32-le"), np.uint32)
    for i, ca in enumerate(a, 1):
        sub = prev[:-1] + (bb != ord(ca))
        cur = np.empty_like(prev)
        cur[0] = i
        # cur[j] = min(prev[j] + 1, sub[j-1], cur[j-1] + 1): the last term is a running minimum
        base = np.minimum(prev[1:] + 1, sub)
        cur[1:] = np.minimum.accumulate(np.concatenate(([i], base)) - np.arange(len(b) + 1))[
            1:
        ] + np.arange(1, len(b) + 1)
        prev = cur
    return int(prev[-1])


def char_error_rate(hyp: str, ref: str) -> float:
    """``edit_distance(hyp, ref) / len(ref)``; 0 when both are empty, 1 when only ``ref`` is."""
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(hyp, ref) / len(ref)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape; 1 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ConfigError(f"masks of shapes {a.shape} and {b.shape} cannot be compared")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# -- synthetic text --------------------------------------------------------------------------------


def token_split(token: str) -> str:
    """``"calib"`` or ``"eval"``: the split a token belongs to, by the SHA-256 of its lower-case
    letters and digits (punctuation and case do not move a token across splits)."""
    core = re.sub(r"[^0-9a-z]", "", token.lower())
    h = int(hashlib.sha256(core.encode()).hexdigest()[:8], 16)
    return "calib" if h % _CALIB_MODULUS == 0 else "eval"


@functools.lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    seen: set[str] = set()
    for s in sentence_corpus():
        for w in re.findall(r"[A-Za-z]{2,12}", s):
            seen.add(w.lower())
    return tuple(sorted(seen))


def vocabulary(split: str) -> list[str]:
    """The lower-case documentation words (2..12 letters) of one split, sorted."""
    _check_split(split)
    return [w for w in _words() if token_split(w) == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid: use 'calib' or 'eval'")


def _token(rng: np.random.Generator, words: list[str], split: str) -> str:
    """One token of ``split``: a word (cased, maybe punctuated) or a number/date."""
    while True:
        kind = rng.random()
        if kind < 0.8:
            w = words[rng.integers(len(words))]
            case = rng.random()
            w = w.title() if case < 0.3 else w.upper() if case < 0.4 else w
            p = rng.random()
            if p < 0.12:
                w += str(rng.choice([",", ".", ":", ";", "!", "?"]))
            elif p < 0.16:
                w = f"({w})"
            elif p < 0.19:
                w = f'"{w}"'
            return w
        form = rng.integers(5)
        if form == 0:
            t = str(rng.integers(0, 100000))
        elif form == 1:
            t = f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
        elif form == 2:
            t = f"{rng.integers(1990, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        elif form == 3:
            t = f"{rng.integers(1, 100)}%"
        else:
            t = f"#{rng.integers(1, 10000)}"
        if token_split(t) == split:
            return t


@functools.lru_cache(maxsize=32)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    try:
        return ImageFont.truetype(str(path), size)
    except OSError as e:
        raise OmseError(f"cannot load font {path}: {e}") from None


@dataclass(frozen=True)
class TextLine:
    """A rendered line: ``image`` uint8 ``[H, W, 3]`` RGB, ``text`` its ground truth."""

    image: np.ndarray
    text: str
    tokens: tuple[str, ...]
    font: str

    def bgr(self) -> np.ndarray:
        """The image in rapidocr's BGR channel order."""
        return np.ascontiguousarray(self.image[:, :, ::-1])


@dataclass(frozen=True)
class Page:
    """A rendered page: ``image`` uint8 ``[H, W, 3]`` RGB, one ``(x0, y0, x1, y1)`` pixel box and
    one string per line, ``mask`` bool ``[H, W]`` true inside the boxes."""

    image: np.ndarray
    boxes: tuple[tuple[int, int, int, int], ...]
    texts: tuple[str, ...]
    tokens: tuple[str, ...] = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        m = np.zeros(self.image.shape[:2], bool)
        for x0, y0, x1, y1 in self.boxes:
            m[y0:y1, x0:x1] = True
        return m

    def bgr(self) -> np.ndarray:
        return np.ascontiguousarray(self.image[:, :, ::-1])


def _rng(seed: int, split: str, kind: int) -> np.random.Generator:
    _check_split(split)
    return np.random.default_rng([seed, SPLITS[split], kind])


def _colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    bg = tuple(int(v) for v in rng.integers(190, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    return bg, ink


def _finish(im: Image.Image, rng: np.random.Generator, blur: bool = True) -> np.ndarray:
    if blur and rng.random() < 0.4:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    a = np.asarray(im, np.float32)
    sigma = float(rng.uniform(0.0, 8.0))
    a = a + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)


def _line_text(
    rng: np.random.Generator,
    words: list[str],
    split: str,
    font: ImageFont.FreeTypeFont,
    max_width: float,
    max_words: int,
) -> tuple[str, list[str]]:
    n = int(rng.integers(1, max_words + 1))
    tokens: list[str] = []
    for _ in range(n):
        t = _token(rng, words, split)
        if tokens and font.getlength(" ".join([*tokens, t])) > max_width:
            break
        tokens.append(t)
    return " ".join(tokens), tokens


def text_lines(
    n: int, split: str, seed: int = 0, max_wh_ratio: float = 10.0, max_words: int = 4
) -> list[TextLine]:
    """``n`` single-line crops of ``split`` text, each at most ``max_wh_ratio`` times as wide as
    high (the recognizer's fixed input width then holds the whole line).

    Font size 24..40 px, 3..10 px margins, rotation within +-2 degrees on 40% of lines, blur on
    40%, Gaussian noise of sigma 0..8 grey levels. Deterministic in ``(n, split, seed)``; a longer
    list extends a shorter one.
    """
    if n < 0:
        raise ConfigError(f"n={n} is invalid: use a count >= 0")
    rng = _rng(seed, split, 0)
    words = vocabulary(split)
    out = []
    for _ in range(n):
        name = FONT_FILES[rng.integers(len(FONT_FILES))]
        size = int(rng.integers(24, 41))
        font = _font(name, size)
        mx, my = int(rng.integers(3, 11)), int(rng.integers(3, 9))
        height = size + 2 * my + size // 4
        text, tokens = _line_text(
            rng, words, split, font, max_wh_ratio * height - 2 * mx, max_words
        )
        width = int(math.ceil(font.getlength(text))) + 2 * mx
        bg, ink = _colors(rng)
        im = Image.new("RGB", (width, height), bg)
        ImageDraw.Draw(im).text((mx, my), text, font=font, fill=ink)
        if rng.random() < 0.4:
            im = im.rotate(float(rng.uniform(-2, 2)), Image.BILINEAR, expand=False, fillcolor=bg)
        out.append(TextLine(_finish(im, rng), text, tuple(tokens), name))
    return out


def text_pages(
    n: int, split: str, seed: int = 0, height: int = 736, width: int = 736
) -> list[Page]:
    """``n`` pages of ``split`` text: 6..14 lines of 1..6 tokens at random indents, font sizes
    16..36 px, in several fonts and inks on a light background, with blur and noise.

    Boxes are the lines' ink bounding boxes from PIL (before blur and noise). Deterministic in
    ``(n, split, seed, height, width)``.
    """
    if n < 0:
        raise ConfigError(f"n={n} is invalid: use a count >= 0")
    rng = _rng(seed, split, 1)
    words = vocabulary(split)
    out = []
    for _ in range(n):
        bg, _ = _colors(rng)
        im = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(im)
        boxes, texts, tokens = [], [], []
        y = int(rng.integers(8, 40))
        for _ in range(int(rng.integers(6, 15))):
            size = int(rng.integers(16, 37))
            font = _font(FONT_FILES[rng.integers(len(FONT_FILES))], size)
            if y + size * 1.4 > height - 8:
                break
            x = int(rng.integers(8, width // 3))
            text, toks = _line_text(rng, words, split, font, width - x - 8, 6)
            ink = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((x, y), text, font=font, fill=ink)
            x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
            boxes.append((int(x0), int(y0), int(x1), int(y1)))
            texts.append(text)
            tokens.extend(toks)
            y = int(y1 + rng.integers(size // 2, 2 * size))
        out.append(Page(_finish(im, rng), tuple(boxes), tuple(texts), tuple(tokens)))
    return out


def assert_disjoint(
    calib: Sequence[TextLine | Page], evaluation: Sequence[TextLine | Page]
) -> None:
    """Raise ``OmseError`` if a calibration and an evaluation image share a token (compared by
    :func:`token_split`'s lower-case core) or an identical image."""

    def cores(items):
        return {re.sub(r"[^0-9a-z]", "", t.lower()) for it in items for t in it.tokens} - {""}

    shared = cores(calib) & cores(evaluation)
    if shared:
        raise OmseError(f"calibration and evaluation text share tokens: {sorted(shared)[:10]}")
    digests = {hashlib.sha256(it.image.tobytes()).hexdigest() for it in calib}
    if any(hashlib.sha256(it.image.tobytes()).hexdigest() in digests for it in evaluation):
        raise OmseError("an evaluation image is identical to a calibration image")


# -- calibration loaders (``omse quantize <model>.onnx --calib-loader omse.zoo.ocr:...``) --------


def rec_calibration(
    n: int = 16, batch: int = 8, seed: int = 0, max_wh_ratio: float = 10.0
) -> list[torch.Tensor]:
    """``n`` calibration lines (split ``"calib"``) for the recognizer, rapidocr-preprocessed in
    batches of ``batch``: float32 ``[batch, 3, 48, 48 * max_wh_ratio]`` each (one width, as the
    benchmark pads every batch)."""
    lines = [x.bgr() for x in text_lines(n, "calib", seed, max_wh_ratio)]
    return [
        torch.from_numpy(rec_preprocess(lines[i : i + batch], max_wh_ratio=max_wh_ratio))
        for i in range(0, n, batch)
    ]


def turned(lines: Sequence[TextLine]) -> tuple[list[np.ndarray], np.ndarray]:
    """The lines' BGR images with every other one turned by 180 degrees, and the direction
    classifier's labels: ``0`` (``'0'``) and ``1`` (``'180'``), ``[n]`` int64."""
    imgs = [
        x.bgr() if i % 2 == 0 else np.ascontiguousarray(x.bgr()[::-1, ::-1])
        for i, x in enumerate(lines)
    ]
    return imgs, np.arange(len(lines)) % 2


def cls_calibration(n: int = 16, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """``n`` calibration lines for the direction classifier, every other one turned
    (:func:`turned`), rapidocr-preprocessed: float32 ``[batch, 3, 48, 192]`` each."""
    imgs, _ = turned(text_lines(n, "calib", seed))
    return [torch.from_numpy(cls_preprocess(imgs[i : i + batch])) for i in range(0, n, batch)]


def det_calibration(
    n: int = 4, batch: int = 2, seed: int = 0, side: int = 480
) -> list[torch.Tensor]:
    """``n`` calibration pages of ``side`` x ``side`` pixels for the detector, rapidocr-
    preprocessed (``limit_side_len=side``): float32 ``[batch, 3, side, side]`` each."""
    pages = [p.bgr() for p in text_pages(n, "calib", seed, side, side)]
    return [
        torch.from_numpy(
            np.concatenate([det_preprocess(p, limit_side_len=side) for p in pages[i : i + batch]])
        )
        for i in range(0, n, batch)
    ]
