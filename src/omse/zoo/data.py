"""Image data that ships in installed packages, loaded by real loading code.

- Evaluation: the 20 labelled ImageNet images of ``foolbox`` (``foolbox/data/imagenet_<i>_<label>.jpg``)
  and a deterministic bank of views of them (crops at three scales, positions and flips).
- Calibration (never evaluation images): the natural photographs bundled with ``scikit-image``
  (``skimage/data``: astronaut, chelsea, coffee, rocket, ...) and matplotlib's ``grace_hopper.jpg``,
  each as a centre crop, its mirror and corner crops.
- Any folder of images (``load_image_folder``) for a user's own calibration or evaluation set:
  shorter side resized to ``resize``, then centre-cropped to ``size`` (square or ``(H, W)``).

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
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
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


def load_image(path: str | Path, size: int = 256) -> torch.Tensor:
    """One image as float32 ``[3, H, W]`` in [0, 1], shorter side resized to ``size`` (bicubic)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            r = size / min(w, h)
            im = im.resize((max(size, round(w * r)), max(size, round(h * r))), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise OmseError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


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
) -> torch.Tensor:
    """Every image in ``folder`` (sorted by name) as ``[N, 3, H, W]`` in [0, 1].

    Each image's shorter side is resized to ``resize`` pixels (bicubic; default ``8/7`` of the
    larger side of ``size``, 256 for 224), then the centre ``size`` (an int for a square, or
    ``(H, W)``) is cropped. ``limit``: the first ``limit`` images by name. ``role`` names the
    folder in error messages (``"calibration"``, ``"evaluation"``).
    """
    h, w = _hw(size)
    if h < 1 or w < 1:
        raise OmseError(f"input size {h}x{w} must be positive")
    resize = round(max(h, w) * 8 / 7) if resize is None else resize
    if resize < 1:
        raise OmseError(f"resize {resize} must be a positive number of pixels (the shorter side)")
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
        img = load_image(f, resize)
        if img.shape[1] < h or img.shape[2] < w:
            raise OmseError(
                f"image {f} resized to shorter side {resize} is {img.shape[1]}x{img.shape[2]}, "
                f"smaller than the input size {h}x{w}: use a resize of at least {max(h, w)}"
            )
        out.append(_center(img, (h, w)))
    return torch.stack(out)
