"""omse.zoo.labelled and the held-out benchmarks' data: label parsing, disjoint calibration and
evaluation indices, and FP32 ResNet-20 top-1 checked against an independent plain loop.

Real data tests skip cleanly without the project's data folder (``../shared/data`` beside the
repository, or ``$OMSE_DATA``), as in a user's clone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmark_loader import load_benchmark
from PIL import Image

from omse.errors import OmseError
from omse.zoo.labelled import (
    CifarResNet,
    calibration_split,
    cifar10_test_files,
    cifar_normalize,
    cifar_resnet,
    imagenet_val_labels,
    load_cifar10_test,
    load_imagenet_val,
)

DATA = load_benchmark("heldout").DEFAULT_DATA
needs_data = pytest.mark.skipif(
    not (DATA / "cifar10" / "test-png").is_dir(), reason=f"no data folder at {DATA}"
)


@pytest.mark.parametrize(("n", "k", "seed"), [(1300, 64, 0), (10000, 256, 0), (10, 3, 7)])
def test_calibration_split_is_disjoint_complete_and_seeded(n, k, seed):
    calib, ev = calibration_split(n, k, seed)
    assert len(calib) == k and len(ev) == n - k
    assert not set(calib.tolist()) & set(ev.tolist())
    assert sorted(calib.tolist() + ev.tolist()) == list(range(n))
    again, _ = calibration_split(n, k, seed)
    assert torch.equal(calib, again)
    if n > 100:  # another seed, another draw
        assert not torch.equal(calib, calibration_split(n, k, seed + 1)[0])
    with pytest.raises(OmseError):
        calibration_split(n, n, seed)


def test_imagenet_labels_parse_and_refuse(tmp_path):
    (tmp_path / "labels.txt").write_text("a.JPEG, 472\nb b.JPEG,0\n\nc.JPEG , 999\n")
    files, labels = imagenet_val_labels(tmp_path)
    assert [f.name for f in files] == ["a.JPEG", "b b.JPEG", "c.JPEG"]
    assert files[0].parent == tmp_path / "images" and labels.tolist() == [472, 0, 999]
    for bad in ("a.JPEG 3\n", "a.JPEG, x\n", "a.JPEG, 1000\n", ", 3\n"):
        (tmp_path / "labels.txt").write_text(bad)
        with pytest.raises(OmseError):
            imagenet_val_labels(tmp_path)


def test_cifar_files_take_the_class_from_the_sorted_folder(tmp_path):
    for c, name in enumerate(["b_cls", "a_cls", *[f"z{i}" for i in range(8)]]):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(tmp_path / name / "x.png")
    files, labels = cifar10_test_files(tmp_path)
    assert [f.parent.name for f in files][:2] == ["a_cls", "b_cls"] and labels.tolist()[:2] == [
        0,
        1,
    ]
    x, y = load_cifar10_test(tmp_path, [1, 0])
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 0]
    assert x[0, 0, 0, 0] * 255 == pytest.approx(0.0) and x[1, 0, 0, 0] * 255 == pytest.approx(1.0)


def test_resnet_depths():
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in CifarResNet(20).modules())
    assert n_convs == 19  # + linear = 20 weighted layers
    assert CifarResNet(56)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(OmseError):
        CifarResNet(21)


@needs_data
def test_real_label_files():
    files, labels = imagenet_val_labels(DATA / "imagenet-val-1300")
    assert len(files) == 1300 and labels.min() >= 0 and labels.max() < 1000
    assert len(set(labels.tolist())) == 725  # classes, as the data README states
    first = (DATA / "imagenet-val-1300" / "labels.txt").read_text().splitlines()[0]
    assert files[0].name == first.split(",")[0] and labels[0] == int(first.split(",")[1])
    x, y = load_imagenet_val(DATA / "imagenet-val-1300", 224, [0, 5])
    assert x.shape == (2, 3, 224, 224) and x.min() >= 0 and x.max() <= 1
    assert y.tolist() == [labels[0], labels[5]]
    files, labels = cifar10_test_files(DATA / "cifar10" / "test-png")
    assert len(files) == 10000 and labels.bincount().tolist() == [1000] * 10
    assert files[0].parent.name == "airplane" and files[-1].parent.name == "truck"


@needs_data
def test_resnet20_top1_matches_an_independent_loop(one_torch_thread):
    """The benchmark's batched path (loader, normalisation, heldout.evaluate) against a plain
    per-image loop (PIL, numpy, the class from the folder name) on 200 fixed held-out images."""
    heldout = load_benchmark("heldout")
    root = DATA / "cifar10" / "test-png"
    model, stated = cifar_resnet(20, DATA / "cifar10" / "resnets")
    assert stated == pytest.approx(91.78, abs=0.01)
    _, ev = calibration_split(10000, 256, 0)
    idx = ev[::48][:200]
    x, y = load_cifar10_test(root, idx)
    row, _ = heldout.evaluate(model, x, y, cifar_normalize, 64, "test")

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths = sorted(root.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    correct = 0
    with torch.no_grad():
        for i in idx.tolist():
            a = (np.asarray(Image.open(paths[i]).convert("RGB"), np.float32) / 255 - mean) / std
            logits = model(torch.from_numpy(a.transpose(2, 0, 1).copy())[None])
            correct += int(logits.argmax(1).item() == classes.index(paths[i].parent.name))
    assert row["n"] == 200 and row["correct"] == correct
    assert 0.8 < correct / 200 <= 1.0  # a pretrained ~92% model, not chance
