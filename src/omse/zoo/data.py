"""Image data that ships in installed packages, loaded by real loading code.

- Evaluation: the 20 labelled ImageNet images of ``foolbox`` (``foolbox/data/imagenet_<i>_<label>.jpg``)
  and a deterministic bank of views of them (crops at three scales, positions and flips).
- Calibration (never evaluation images): the natural photographs bundled with ``scikit-image``
  (``skimage/data``: astronaut, chelsea, coffee, rocket, ...) and matplotlib's ``grace_hopper.jpg``,
  each as a centre crop, its mirror and corner crops.
- Any folder of images (``load_image_folder``) for a user's own calibration or evaluation set,
  fitted to ``size`` (square or ``(H, W)``) by :func:`fit_image`: ``"crop"`` (shorter side
  resized, centre crop: classifiers), ``"letterbox"`` (aspect ratio kept, padded: detectors) or
  ``"stretch"`` (both sides resized).

Images are float32 ``[N, 3, H, W]`` in ``[0, 1]``; models apply their own normalisation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import OmseError

__all__ = [
    "foolbox_imagenet",
    "imagenet_views",
    "calibration_images",
    "calibration_sources",
    "load_image_folder",
    "load_image",
    "fit_image",
    "IMAGE_SUFFIXES",
    "RESIZE_MODES",
    "LETTERBOX_PADS",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
RESIZE_MODES = ("crop", "letterbox", "stretch")
"""How :func:`fit_image` brings an image to the input size."""
LETTERBOX_PADS = ("center", "bottom-right")
"""Where a letterboxed image sits: centred (Ultralytics) or at the top left, padded bottom and
right (YOLOX)."""
# Natural photographs in scikit-image's bundled data (textures and binary images left out).
_SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "clock_motion.png",
    "cell.png",
)


def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise OmseError(f"package {pkg!r} is not installed; run `make demo` or `pip install {pkg}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _read_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (decoded); an unreadable file is an
    :class:`OmseError` naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise OmseError(f"cannot read image {path}: {e}") from None


def _to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image ``(W, H)`` -> float32 ``[3, H, W]`` in [0, 1]."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def _shorter_side(im: Image.Image, size: int) -> Image.Image:
    """``im`` with its shorter side resized to ``size`` pixels (bicubic, aspect ratio kept)."""
    w, h = im.size
    r = size / min(w, h)
    return im.resize((max(size, round(w * r)), max(size, round(h * r))), Image.BICUBIC)


def load_image(path: str | Path, size: int = 256) -> torch.Tensor:
    """One image as float32 ``[3, H, W]`` in [0, 1], shorter side resized to ``size`` (bicubic)."""
    return _to_tensor(_shorter_side(_read_rgb(path), size))


def _letterbox(im: Image.Image, hw: tuple[int, int], pad_value: int, pad: str) -> Image.Image:
    """``im`` resized (bilinear) by ``min(H / h, W / w)`` so that it fits ``hw = (H, W)`` with its
    aspect ratio kept (the new sides rounded to the nearest pixel), on a canvas of ``pad_value``
    placed centred (``pad="center"``: offsets ``(H - h') // 2``, ``(W - w') // 2``, as
    Ultralytics' ``LetterBox``) or at the top left (``"bottom-right"`` padding, as YOLOX)."""
    (h, w), (w0, h0) = hw, im.size
    r = min(h / h0, w / w0)
    nw, nh = min(w, max(1, round(w0 * r))), min(h, max(1, round(h0 * r)))
    if (nw, nh) != (w0, h0):
        im = im.resize((nw, nh), Image.BILINEAR)
    canvas = Image.new("RGB", (w, h), (pad_value,) * 3)
    top, left = ((h - nh) // 2, (w - nw) // 2) if pad == "center" else (0, 0)
    canvas.paste(im, (left, top))
    return canvas


def _check_fit(mode: str, resize: int | None, pad_value: int, pad: str) -> None:
    """Refuse a bad :func:`fit_image` setting (an :class:`OmseError` naming it)."""
    if mode not in RESIZE_MODES:
        raise OmseError(f"resize mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")
    if resize is not None and mode != "crop":
        raise OmseError(f"a shorter-side resize ({resize}) goes with mode 'crop', not {mode!r}")
    if resize is not None and resize < 1:
        raise OmseError(f"resize {resize} must be a positive number of pixels (the shorter side)")
    if isinstance(pad_value, bool) or not isinstance(pad_value, int) or not 0 <= pad_value <= 255:
        raise OmseError(f"pad value {pad_value!r}: use an integer 0..255 (114: grey)")
    if pad not in LETTERBOX_PADS:
        raise OmseError(f"letterbox pad {pad!r}: use one of {', '.join(LETTERBOX_PADS)}")


def fit_image(
    im: Image.Image,
    size: int | tuple[int, int],
    mode: str = "crop",
    resize: int | None = None,
    pad_value: int = 114,
    pad: str = "center",
) -> torch.Tensor:
    """An RGB image brought to ``size`` (an int for a square, or ``(H, W)``): float32
    ``[3, H, W]`` in [0, 1].

    - ``"crop"``: shorter side resized to ``resize`` pixels (bicubic; default ``8/7`` of the
      larger side of ``size``, 256 for 224), then the centre ``size`` cropped (classifiers);
    - ``"letterbox"``: resized (bilinear) to fit ``size`` with the aspect ratio kept, the rest
      filled with ``pad_value`` (0..255, default 114: Ultralytics' and YOLOX's grey), the image
      centred (``pad="center"``) or at the top left (``"bottom-right"``); see
      :data:`LETTERBOX_PADS` (detectors);
    - ``"stretch"``: both sides resized to ``size`` (bilinear), the aspect ratio not kept.

    Bilinear for letterbox and stretch: the detectors trained on letterboxed images resize with
    OpenCV's linear interpolation. Raises :class:`OmseError` for a crop larger than the resized
    image, a ``resize`` with another mode, or a bad mode, pad value or pad.
    """
    h, w = _hw(size)
    _check_fit(mode, resize, pad_value, pad)
    if mode == "stretch":
        return _to_tensor(im.resize((w, h), Image.BILINEAR))
    if mode == "letterbox":
        return _to_tensor(_letterbox(im, (h, w), pad_value, pad))
    resize = round(max(h, w) * 8 / 7) if resize is None else resize
    img = _to_tensor(_shorter_side(im, resize))
    if img.shape[1] < h or img.shape[2] < w:
        raise OmseError(
            f"an image resized to shorter side {resize} is {img.shape[1]}x{img.shape[2]}, "
            f"smaller than the input size {h}x{w}: use a resize of at least {max(h, w)}"
        )
    return _center(img, (h, w))


def _crop(img: torch.Tensor, size: int, top: int, left: int) -> torch.Tensor:
    return img[:, top : top + size, left : left + size]


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _center(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    (ch, cw), (_, h, w) = _hw(size), img.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[:, top : top + ch, left : left + cw]


def foolbox_imagenet(size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """The 20 labelled ImageNet images of foolbox: ``([20, 3, size, size], labels [20])``.

    Each image is resized (shorter side ``size * 8/7``) and centre-cropped, the usual protocol.
    """
    files = sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
    if len(files) != 20:
        raise OmseError(f"expected 20 foolbox ImageNet images, found {len(files)}")
    xs, ys = [], []
    for f in files:
        xs.append(_center(load_image(f, round(size * 8 / 7)), size))
        ys.append(int(f.stem.split("_")[-1]))
    return torch.stack(xs), torch.tensor(ys)


def imagenet_views(n_views: int = 200, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic bank of ``n_views`` views of the 20 foolbox images (round-robin over
    images): crops of side ``size`` from the image resized to shorter side ``8/7``, ``9/7`` and
    ``10/7`` of ``size`` (256, 288 and 320 at 224), at the centre and four corners, each also
    mirrored. Returns ``([n, 3, size, size], labels [n])``.
    """
    files = sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg"))
    recipes = []
    for scale in (round(size * k / 7) for k in (8, 9, 10)):
        for pos in ("c", "tl", "br", "tr", "bl"):
            for flip in (False, True):
                recipes.append((scale, pos, flip))
    per_image = -(-n_views // len(files))
    if per_image > len(recipes):
        raise OmseError(f"at most {len(recipes) * len(files)} views are available")
    # spread the chosen recipes over scales and positions
    idx = np.linspace(0, len(recipes) - 1, per_image).round().astype(int)
    cache: dict[tuple[Path, int], torch.Tensor] = {}
    xs, ys = [], []
    for r in idx:
        scale, pos, flip = recipes[r]
        for f in files:
            key = (f, scale)
            if key not in cache:
                cache[key] = load_image(f, scale)
            img = cache[key]
            _, h, w = img.shape
            top = {"c": (h - size) // 2, "tl": 0, "tr": 0, "bl": h - size, "br": h - size}[pos]
            left = {"c": (w - size) // 2, "tl": 0, "bl": 0, "tr": w - size, "br": w - size}[pos]
            v = _crop(img, size, top, left)
            xs.append(v.flip(-1) if flip else v)
            ys.append(int(f.stem.split("_")[-1]))
            if len(xs) == n_views:
                return torch.stack(xs), torch.tensor(ys)
    return torch.stack(xs), torch.tensor(ys)


def calibration_sources() -> list[Path]:
    """The calibration photographs: scikit-image's bundled photos, then matplotlib's sample."""
    out = []
    try:
        sk = _package_dir("skimage") / "data"
        out += [sk / n for n in _SKIMAGE_PHOTOS if (sk / n).exists()]
    except OmseError:
        pass
    try:
        mpl = _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if mpl.exists():
            out.append(mpl)
    except OmseError:
        pass
    if not out:
        raise OmseError("no calibration images found: install scikit-image (`make demo` does)")
    return out


def calibration_images(n: int = 32, size: int = 224) -> torch.Tensor:
    """``n`` calibration images ``[n, 3, size, size]``, disjoint from every evaluation image:
    centre crops of the photos of :func:`calibration_sources`, then their mirrors, then corners."""
    files = calibration_sources()
    imgs = [load_image(f, round(size * 8 / 7)) for f in files]
    views = []
    for variant in ("c", "cf", "tl", "br", "tr", "bl"):
        for img in imgs:
            _, h, w = img.shape
            if variant in ("c", "cf"):
                v = _center(img, size)
                v = v.flip(-1) if variant == "cf" else v
            else:
                top = 0 if variant[0] == "t" else h - size
                left = 0 if variant[1] == "l" else w - size
                v = _crop(img, size, top, left)
            views.append(v)
            if len(views) == n:
                return torch.stack(views)
    raise OmseError(f"at most {len(views)} calibration images are available, asked for {n}")


def load_image_folder(
    folder: str | Path,
    size: int | tuple[int, int] = 224,
    limit: int | None = None,
    resize: int | None = None,
    role: str = "calibration",
    *,
    mode: str = "crop",
    pad_value: int = 114,
    pad: str = "center",
) -> torch.Tensor:
    """Every image in ``folder`` (sorted by name) as ``[N, 3, H, W]`` in [0, 1].

    Each image is brought to ``size`` (an int for a square, or ``(H, W)``) by :func:`fit_image`
    with ``mode``, ``resize``, ``pad_value`` and ``pad``; by default (``mode="crop"``) its
    shorter side is resized to ``resize`` pixels (default ``8/7`` of the larger side of
    ``size``, 256 for 224) and the centre ``size`` cropped. ``limit``: the first ``limit``
    images by name. ``role`` names the folder in error messages (``"calibration"``,
    ``"evaluation"``).
    """
    h, w = _hw(size)
    if h < 1 or w < 1:
        raise OmseError(f"input size {h}x{w} must be positive")
    _check_fit(mode, resize, pad_value, pad)
    p = Path(folder)
    if not p.is_dir():
        raise OmseError(f"{role} folder {p} does not exist or is not a directory")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise OmseError(f"{role} folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            out.append(fit_image(_read_rgb(f), (h, w), mode, resize, pad_value, pad))
        except OmseError as e:
            raise OmseError(f"image {f}: {e}") from None
    return torch.stack(out)
