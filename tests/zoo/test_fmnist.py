"""Fashion-MNIST loader and model zoo (:mod:`omse.zoo.fmnist`)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from omse.errors import CheckpointError, OmseError
from omse.zoo import fmnist
from omse.zoo.fmnist import (
    ARCHS,
    DEFAULT_ROOT,
    FMNIST_MEAN,
    FMNIST_STD,
    build,
    load_fmnist,
    normalize,
    recorded_accuracy,
    weights_path,
    zoo_record,
)

HAVE_DATA = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file() or (
    DEFAULT_ROOT / "t10k-images-idx3-ubyte"
).is_file()
needs_data = pytest.mark.skipif(
    not HAVE_DATA, reason=f"{DEFAULT_ROOT} missing: apt-get install dataset-fashion-mnist"
)

ALLOWED_LEAVES = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Linear,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_split(root: Path, split: str, n: int, gz: bool, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


# ------------------------------------------------------------------------------ loader


@needs_data
@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_load_real_files(split: str, n: int) -> None:
    images, labels = load_fmnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    # Fashion-MNIST is balanced: n / 10 images per class
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), n // 10))


@pytest.mark.parametrize("gz", [True, False])
def test_load_user_dir(tmp_path: Path, gz: bool) -> None:
    tr_img, tr_lbl = write_split(tmp_path, "train", 7, gz, seed=1)
    te_img, te_lbl = write_split(tmp_path, "test", 3, gz, seed=2)
    images, labels = load_fmnist("train", root=tmp_path)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert np.array_equal(images.numpy(), tr_img)
    assert np.array_equal(labels.numpy(), tr_lbl.astype(np.int64))
    images, labels = load_fmnist("test", root=str(tmp_path))
    assert images.shape == (3, 28, 28) and labels.shape == (3,)
    assert np.array_equal(images.numpy(), te_img)
    assert np.array_equal(labels.numpy(), te_lbl.astype(np.int64))


def test_load_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lbl = write_split(tmp_path, "test", 4, gz=True)
    monkeypatch.setenv("OMSE_FMNIST_DIR", str(tmp_path))
    _, labels = load_fmnist("test")
    assert np.array_equal(labels.numpy(), lbl.astype(np.int64))


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(OmseError, match=r"nope.*apt-get install dataset-fashion-mnist"):
        load_fmnist("test", root=missing)


def test_missing_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(OmseError, match=r"t10k-labels-idx1-ubyte.*dataset-fashion-mnist"):
        load_fmnist("test", root=tmp_path)


def test_corrupted_magic(tmp_path: Path) -> None:
    write_split(tmp_path, "test", 2, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8), 0xDEAD)
    with pytest.raises(OmseError, match=r"t10k-images-idx3-ubyte\.gz.*magic"):
        load_fmnist("test", root=tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    write_split(tmp_path, "test", 2, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(OmseError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_fmnist("test", root=tmp_path)


def test_not_gzip(tmp_path: Path) -> None:
    write_split(tmp_path, "test", 2, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(OmseError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_fmnist("test", root=tmp_path)


def test_count_mismatch_and_bad_split(tmp_path: Path) -> None:
    write_split(tmp_path, "test", 3, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(OmseError, match="3 images but"):
        load_fmnist("test", root=tmp_path)
    with pytest.raises(OmseError, match="split"):
        load_fmnist("val", root=tmp_path)


def test_normalize() -> None:
    images = torch.tensor([[[0, 255] * 14] * 28, [[51] * 28] * 28], dtype=torch.uint8)
    x = normalize(images)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == pytest.approx((0.0 - FMNIST_MEAN) / FMNIST_STD)
    assert x[0, 0, 0, 1].item() == pytest.approx((1.0 - FMNIST_MEAN) / FMNIST_STD)
    assert x[1].unique().item() == pytest.approx((0.2 - FMNIST_MEAN) / FMNIST_STD)
    with pytest.raises(OmseError):
        normalize(images.float())


def test_augment_is_crop_and_flip() -> None:
    path = Path(__file__).resolve().parents[2] / "scripts" / "train_fmnist.py"
    spec = importlib.util.spec_from_file_location("train_fmnist", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = normalize(torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8))
    gen = torch.Generator().manual_seed(0)
    same = mod.augment(x, gen, pad=0)
    for a, b in zip(same, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    out = mod.augment(x, gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    out2 = mod.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(mod.augment(x, torch.Generator().manual_seed(0)), out2)


# ------------------------------------------------------------------------------ zoo


def test_registry() -> None:
    assert set(ARCHS) == {"fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg"}
    with pytest.raises(OmseError, match="unknown"):
        build("fmnist-nope")


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_structure(name: str) -> None:
    model = build(name, pretrained=False)
    assert not model.training
    leaves = [m for m in model.modules() if not list(m.children())]
    for m in leaves:
        assert type(m) in ALLOWED_LEAVES, f"{name}: unexpected module {type(m).__name__}"
    acts = [m for m in leaves if isinstance(m, nn.ReLU | nn.ReLU6)]
    assert len({id(m) for m in acts}) == len(acts)
    assert isinstance(list(model.modules())[-1], nn.Linear)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    if name == "fmnist-mobilenetv2":
        assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in leaves)
        assert any(isinstance(m, nn.ReLU6) for m in leaves)
    if name == "fmnist-resnet20":
        convs = [m for m in leaves if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == 19


@pytest.mark.parametrize("name", list(ARCHS))
def test_weights_small_and_recorded(name: str) -> None:
    path = weights_path(name)
    assert path.is_file(), f"{path} missing: run scripts/train_fmnist.py --arch {name}"
    assert path.stat().st_size < 5 * 1024 * 1024
    rec = zoo_record(name)
    for key in ("test_top1", "epochs", "seed", "params", "torch", "train_seconds"):
        assert key in rec
    assert rec["params"] == sum(p.numel() for p in build(name, pretrained=False).parameters())
    assert recorded_accuracy(name) >= 0.91


@pytest.fixture(scope="module")
def first_1k() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fmnist("test")
    return normalize(images[:1000]), labels[:1000]


@needs_data
@pytest.mark.parametrize("name", list(ARCHS))
def test_pretrained_accuracy(name: str, first_1k: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = first_1k
    model = build(name)
    assert not model.training
    with torch.no_grad():
        acc = sum(
            int((model(x[i : i + 250]).argmax(1) == y[i : i + 250]).sum())
            for i in range(0, 1000, 250)
        ) / len(y)
    assert abs(acc - recorded_accuracy(name)) <= 0.02, (name, acc, recorded_accuracy(name))


def test_build_mismatch_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setattr(fmnist, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        build("fmnist-vgg")
    with pytest.raises(CheckpointError, match="fmnist_zoo.json not found"):
        recorded_accuracy("fmnist-vgg")
    (tmp_path / "fmnist_zoo.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no entry"):
        recorded_accuracy("fmnist-vgg")
    state = build("fmnist-resnet20", pretrained=False).state_dict()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(tmp_path / "fmnist-vgg.safetensors")
    )
    with pytest.raises(CheckpointError, match="does not match"):
        build("fmnist-vgg")
    (tmp_path / "fmnist-vgg.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read"):
        build("fmnist-vgg")
