"""Fashion-MNIST data and a small model zoo standing for the OMSE paper's network families.

Data
    :func:`load_fmnist` parses the four IDX files (gzipped or plain) that the Debian package
    ``dataset-fashion-mnist`` installs under ``/usr/share/datasets/fashion-mnist``; another
    directory can be given with ``root=`` or the ``OMSE_FMNIST_DIR`` environment variable.
    :func:`normalize` turns uint8 images ``[N, 28, 28]`` into float32 ``[N, 1, 28, 28]``.

Models
    Three small CNNs built only from plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` /
    ``nn.ReLU6`` / ``nn.Linear`` / pooling modules, each with a 10-way ``nn.Linear`` classifier:

    - ``"fmnist-resnet20"``    -> :class:`ResNet20`     (residual, 3 stages x 3 basic blocks)
    - ``"fmnist-mobilenetv2"`` -> :class:`MobileNetV2S` (inverted residuals, depthwise 3x3, ReLU6)
    - ``"fmnist-vgg"``         -> :class:`VGGS`         (VGG-style conv/BN/ReLU stacks)

    :func:`build` constructs one and (by default) loads its trained weights from
    ``omse/weights/<name>.safetensors``; :func:`recorded_accuracy` reads the 10k-test top-1
    accuracy recorded in ``omse/weights/fmnist_zoo.json`` by ``scripts/train_fmnist.py``.
    All models take float32 ``[N, 1, 28, 28]`` (from :func:`normalize`) and return logits
    ``[N, 10]``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, OmseError

__all__ = [
    "ARCHS",
    "CLASSES",
    "DEFAULT_ROOT",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "MobileNetV2S",
    "ResNet20",
    "VGGS",
    "WEIGHTS_DIR",
    "ZOO_JSON",
    "build",
    "load_fmnist",
    "normalize",
    "recorded_accuracy",
    "weights_path",
    "zoo_record",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

ENV_VAR = "OMSE_FMNIST_DIR"

FMNIST_MEAN = 0.2860
"""Mean pixel value of the Fashion-MNIST training images, scaled to [0, 1]."""

FMNIST_STD = 0.3530
"""Standard deviation of the Fashion-MNIST training pixels, scaled to [0, 1]."""

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_EXPECTED_N = {"train": 60000, "test": 10000}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass root="

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ZOO_JSON = WEIGHTS_DIR / "fmnist_zoo.json"
"""Training record of the zoo: per name, test accuracy, epochs, seed, params, torch, seconds."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _resolve_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _find_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        path = root / name
        if path.is_file():
            return path
    raise OmseError(
        f"Fashion-MNIST file {root / stem}[.gz] not found; {_INSTALL_HINT} "
        f"(or set {ENV_VAR}) to a directory holding the IDX files"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes -> uint8 array with ``ndim`` dimensions."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise OmseError(f"cannot read Fashion-MNIST file {path}: {exc}; {_INSTALL_HINT}") from exc
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise OmseError(
            f"Fashion-MNIST file {path} is truncated ({len(raw)} bytes, header needs "
            f"{header_len}); {_INSTALL_HINT}"
        )
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise OmseError(
            f"Fashion-MNIST file {path} has bad magic number 0x{got_magic:08x} "
            f"(expected 0x{magic:08x}); the file is corrupted or not an IDX file; {_INSTALL_HINT}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n_bytes = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header_len + n_bytes:
        raise OmseError(
            f"Fashion-MNIST file {path} has {len(raw) - header_len} data bytes but its header "
            f"declares shape {dims} ({n_bytes} bytes); the file is truncated or corrupted; "
            f"{_INSTALL_HINT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def load_fmnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split.

    split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
    root: directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; default
    ``$OMSE_FMNIST_DIR`` if set, else ``/usr/share/datasets/fashion-mnist``.

    Returns images uint8 ``[N, 28, 28]`` and labels int64 ``[N]`` with values in 0..9.
    Raises :class:`~omse.errors.OmseError` naming the file if one is missing or malformed.
    The sample count is checked against the IDX headers, not against 60000/10000, so a
    directory of smaller IDX files (e.g. for tests) loads too.
    """
    if split not in _FILES:
        raise OmseError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    base = _resolve_root(root)
    if not base.is_dir():
        raise OmseError(
            f"Fashion-MNIST directory {base} does not exist; {_INSTALL_HINT} (or set {ENV_VAR})"
        )
    img_stem, lbl_stem = _FILES[split]
    img_path = _find_file(base, img_stem)
    lbl_path = _find_file(base, lbl_stem)
    images = _read_idx(img_path, _IMAGES_MAGIC, 3)
    labels = _read_idx(lbl_path, _LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise OmseError(
            f"Fashion-MNIST file {img_path} holds images of shape {images.shape[1:]}, "
            "expected (28, 28)"
        )
    if images.shape[0] != labels.shape[0]:
        raise OmseError(
            f"Fashion-MNIST files disagree: {img_path} holds {images.shape[0]} images but "
            f"{lbl_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise OmseError(
            f"Fashion-MNIST file {lbl_path} holds label {int(labels.max())}; expected 0..9"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]``.

    Computes ``(x / 255 - FMNIST_MEAN) / FMNIST_STD`` with the fixed training-set constants
    ``FMNIST_MEAN = 0.2860`` and ``FMNIST_STD = 0.3530``.
    """
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise OmseError(
            f"normalize expects uint8 images [N, 28, 28], got {images.dtype} {tuple(images.shape)}"
        )
    x = images.to(torch.float32).div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)
    return x.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU.

    ``[N, c_in, H, W] -> [N, c_out, H/stride, W/stride]``; the shortcut is a 1x1 conv + BN
    when the shape changes, identity otherwise.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR variant) for 1x28x28 inputs.

    3x3 stem conv -> 3 stages x 3 :class:`BasicBlock` (widths ``w, 2w, 4w``; strides 1, 2, 2:
    28x28 -> 14x14 -> 7x7) -> global average pool -> ``nn.Linear(4w, 10)``.
    ``[N, 1, 28, 28] -> [N, 10]``; 19 conv layers + 1 linear (plus 2 shortcut 1x1 convs).
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        c_in = width
        for i, c_out in enumerate(widths):
            for j in range(3):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN.

    ``[N, c_in, H, W] -> [N, c_out, H/stride, W/stride]``; adds the input when
    ``stride == 1 and c_in == c_out``. With ``expand == 1`` the expansion conv is omitted.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2S(nn.Module):
    """A small MobileNetV2 (Sandler et al. 2018) for 1x28x28 inputs.

    3x3 stem conv-BN-ReLU6 -> :class:`InvertedResidual` stages given by ``(expand t,
    channels c, repeats n, stride s)`` rows (28x28 -> 14x14 -> 7x7) -> 1x1 conv-BN-ReLU6 to
    ``last_channels`` -> global average pool -> ``nn.Linear(last_channels, 10)``.
    ``[N, 1, 28, 28] -> [N, 10]``.
    """

    DEFAULT_CFG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 1), (4, 64, 2, 2), (4, 96, 1, 1))

    def __init__(
        self,
        cfg: tuple[tuple[int, int, int, int], ...] = DEFAULT_CFG,
        stem_channels: int = 16,
        last_channels: int = 256,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU6(inplace=True),
        )
        blocks: list[nn.Module] = []
        c_in = stem_channels
        for t, c, n, s in cfg:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(c_in, last_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(last_channels),
            nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.classifier(torch.flatten(x, 1))


class VGGS(nn.Module):
    """A small VGG (Simonyan & Zisserman 2015) with BatchNorm for 1x28x28 inputs.

    ``cfg`` lists 3x3 conv-BN-ReLU widths, ``"M"`` a 2x2 max pool (28 -> 14 -> 7 -> 3); then
    flatten -> ``nn.Linear(c * 3 * 3, hidden)`` -> ReLU -> ``nn.Linear(hidden, 10)``.
    ``[N, 1, 28, 28] -> [N, 10]``.
    """

    DEFAULT_CFG: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M")

    def __init__(
        self, cfg: tuple[int | str, ...] = DEFAULT_CFG, hidden: int = 128, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        size = 28
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                layers += [
                    nn.Conv2d(c_in, int(v), 3, 1, 1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# zoo
# --------------------------------------------------------------------------------------------

ARCHS: dict[str, type[nn.Module]] = {
    "fmnist-resnet20": ResNet20,
    "fmnist-mobilenetv2": MobileNetV2S,
    "fmnist-vgg": VGGS,
}
"""Registry name -> architecture class (constructed with its defaults by :func:`build`)."""


def _check_name(name: str) -> None:
    if name not in ARCHS:
        raise OmseError(f"unknown Fashion-MNIST model {name!r}; known: {', '.join(ARCHS)}")


def weights_path(name: str) -> Path:
    """Path of the packaged weights ``omse/weights/<name>.safetensors`` (may not exist)."""
    _check_name(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def zoo_record(name: str) -> dict:
    """The training record of ``name`` in ``fmnist_zoo.json`` (accuracy, epochs, seed, ...)."""
    _check_name(name)
    path = WEIGHTS_DIR / ZOO_JSON.name
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(
            f"zoo record {path} not found; train with scripts/train_fmnist.py"
        ) from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"zoo record {path} is not valid JSON: {exc}") from exc
    if name not in records:
        raise CheckpointError(
            f"zoo record {path} has no entry for {name!r}; train it with "
            f"`python scripts/train_fmnist.py --arch {name}`"
        )
    return records[name]


def recorded_accuracy(name: str) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``name`` on the 10k test set, as recorded."""
    return float(zoo_record(name)["test_top1"])


def build(name: str, pretrained: bool = True) -> nn.Module:
    """Construct the zoo model ``name`` (a key of :data:`ARCHS`), in ``eval()`` mode.

    With ``pretrained`` the weights are loaded strictly from :func:`weights_path`; a missing,
    unreadable or mismatching file raises :class:`~omse.errors.CheckpointError`.
    The model maps float32 ``[N, 1, 28, 28]`` (see :func:`normalize`) to logits ``[N, 10]``.
    """
    _check_name(name)
    model = ARCHS[name]()
    if pretrained:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = weights_path(name)
        if not path.is_file():
            raise CheckpointError(
                f"weights file {path} not found; train it with "
                f"`python scripts/train_fmnist.py --arch {name}`"
            )
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"weights file {path} does not match architecture {name!r}: {exc}"
            ) from exc
    return model.eval()
