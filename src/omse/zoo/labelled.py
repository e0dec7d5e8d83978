"""Labelled held-out data read from a data folder, and the pretrained CIFAR-10 ResNets.

Nothing here ships with omse: the caller passes the folder (the benchmarks' ``--data``). Layout,
as in the project's ``shared/data`` (see ``benchmarks/imagenet.py`` and
``benchmarks/cifar_resnets.py`` for where a user gets the same files):

- ``imagenet-val-1300/``: ``images/<FILE>`` and ``labels.txt`` (``FILE, LABEL`` per line, the
  standard 0..999 class index): :func:`imagenet_val_labels`, :func:`load_imagenet_val`;
- ``cifar10/test-png/<class>/<image>.png``: the class index is the sorted folder name
  (airplane 0 ... truck 9): :func:`cifar10_test_files`, :func:`load_cifar10_test`;
- ``cifar10/resnets/resnet{20,32,44,56}-*.th``: He et al.'s CIFAR-10 ResNets with option-A
  (zero-padding) shortcuts, as ``{"state_dict", "best_prec1"}``: :func:`cifar_resnet`.

:func:`calibration_split` draws the calibration images from a seed; the evaluation images are
all the others, so the two never overlap. Images are float32 ``[N, 3, H, W]`` in ``[0, 1]``;
models apply their own normalisation (:func:`cifar_normalize` for the ResNets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import OmseError
from .data import load_image

__all__ = [
    "CIFAR_DEPTHS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CifarResNet",
    "calibration_split",
    "cifar10_test_files",
    "cifar_normalize",
    "cifar_resnet",
    "cifar_resnet_path",
    "imagenet_val_labels",
    "load_cifar10_test",
    "load_imagenet_val",
]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
"""The normalisation the pretrained CIFAR-10 ResNets were trained with (ImageNet's)."""
CIFAR_DEPTHS = (20, 32, 44, 56)


def calibration_split(n: int, n_calib: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration indices, evaluation indices)`` of ``range(n)``: ``n_calib`` indices drawn
    by a seeded permutation (sorted), the evaluation indices all the others (sorted); disjoint."""
    if not 0 < n_calib < n:
        raise OmseError(f"calibration images: {n_calib} must be in 1..{n - 1} (of {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_calib].sort().values, perm[n_calib:].sort().values


# --------------------------------------------------------------------------------------------
# ImageNet validation subset
# --------------------------------------------------------------------------------------------


def imagenet_val_labels(root: str | Path) -> tuple[list[Path], torch.Tensor]:
    """``(image paths, labels [N] int64)`` from ``root/labels.txt`` (``FILE, LABEL`` lines, in
    the file's order; images under ``root/images``)."""
    root = Path(root)
    path = root / "labels.txt"
    if not path.is_file():
        raise OmseError(f"ImageNet labels {path} not found")
    files, labels = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, sep, label = line.rpartition(",")
        if not sep or not name.strip() or not label.strip().isdigit():
            raise OmseError(f"{path}:{i}: expected 'FILE, LABEL', got {line!r}")
        y = int(label)
        if not 0 <= y < 1000:
            raise OmseError(f"{path}:{i}: label {y} is not an ImageNet class index 0..999")
        files.append(root / "images" / name.strip())
        labels.append(y)
    return files, torch.tensor(labels, dtype=torch.int64)


def load_imagenet_val(
    root: str | Path, size: int = 224, indices: torch.Tensor | list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 3, size, size] in [0, 1], labels [N])``: each image's shorter side resized to
    ``size * 8/7`` (bicubic), the centre ``size`` cropped (the usual 87.5% centre crop; the
    images of ``imagenet-val-1300`` were squashed to 227x227 by their publisher). ``indices``
    select rows of ``labels.txt`` (default all)."""
    files, labels = imagenet_val_labels(root)
    idx = range(len(files)) if indices is None else [int(i) for i in indices]
    xs = []
    for i in idx:
        img = load_image(files[i], round(size * 8 / 7))
        top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
        xs.append(img[:, top : top + size, left : left + size])
    return torch.stack(xs), labels[list(idx)]


# --------------------------------------------------------------------------------------------
# CIFAR-10 test images and the pretrained ResNets
# --------------------------------------------------------------------------------------------


def cifar10_test_files(root: str | Path) -> tuple[list[Path], torch.Tensor]:
    """``(PNG paths, labels [N])`` of ``root`` (``cifar10/test-png``): one folder per class, the
    class index is the folder's position in sorted order; files sorted by name within a class."""
    root = Path(root)
    if not root.is_dir():
        raise OmseError(f"CIFAR-10 folder {root} does not exist")
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if len(classes) != 10:
        raise OmseError(f"CIFAR-10 folder {root} holds {len(classes)} class folders, not 10")
    files, labels = [], []
    for c, d in enumerate(classes):
        pngs = sorted(d.glob("*.png"))
        files += pngs
        labels += [c] * len(pngs)
    return files, torch.tensor(labels, dtype=torch.int64)


def load_cifar10_test(
    root: str | Path, indices: torch.Tensor | list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 3, 32, 32] in [0, 1], labels [N])`` of :func:`cifar10_test_files`, the rows
    ``indices`` (default all)."""
    files, labels = cifar10_test_files(root)
    idx = range(len(files)) if indices is None else [int(i) for i in indices]
    out = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        with Image.open(files[i]) as im:
            a = np.asarray(im.convert("RGB"))
        if a.shape != (32, 32, 3):
            raise OmseError(f"{files[i]} is {a.shape[1]}x{a.shape[0]}, not a 32x32 CIFAR image")
        out[j] = a
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(), labels[list(idx)]


def cifar_normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the ResNets' input (``(x - CIFAR_MEAN) / CIFAR_STD`` per channel)."""
    mean = torch.tensor(CIFAR_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class _PadShortcut(nn.Module):
    """Option A: stride-2 subsampling and zero channels padded on both sides (no weights)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = _PadShortcut(cout // 4) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-``depth`` (6n+2 layers: 16/32/64 channels, option-A shortcuts),
    module names as in akamaster/pytorch_resnet_cifar10 (``conv1``, ``bn1``,
    ``layer{1,2,3}.{i}.{conv,bn}{1,2}``, ``linear``)."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise OmseError(f"CIFAR ResNet depth {depth} is not 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        cin, stages = 16, []
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_Basic(cin, cout, stride if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def cifar_resnet_path(folder: str | Path, depth: int) -> Path:
    """The weights file ``resnet<depth>-*.th`` in ``folder`` (``cifar10/resnets``)."""
    found = sorted(Path(folder).glob(f"resnet{depth}-*.th"))
    if not found:
        raise OmseError(f"no resnet{depth}-*.th in {folder}")
    return found[0]


def cifar_resnet(depth: int, folder: str | Path) -> tuple[nn.Module, float]:
    """``(model, stated top-1 %)``: :class:`CifarResNet` with the pretrained weights of
    ``folder`` (loaded with ``torch.load(weights_only=True)``, the ``module.`` prefix of the
    DataParallel checkpoint dropped; strict)."""
    ckpt = torch.load(cifar_resnet_path(folder, depth), map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = CifarResNet(depth)
    model.load_state_dict(sd, strict=True)
    return model.eval(), float(ckpt.get("best_prec1", float("nan")))
