"""Image data: the ImageNet view bank at any input size, image folders with resizing and
rectangular centre crops."""

import numpy as np
import pytest
import torch
from PIL import Image

from omse.errors import OmseError
from omse.zoo.data import imagenet_views, load_image_folder


@pytest.mark.parametrize("size", [224, 260, 300])
def test_imagenet_views_at_any_size(size):
    pytest.importorskip("foolbox")
    x, y = imagenet_views(200, size=size)
    assert x.shape == (200, 3, size, size) and y.shape == (200,)
    assert x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0
    # round-robin over the 20 images: each label 10 times, and the views are all different
    assert torch.equal(y[:20], y[20:40])
    assert len({hash(v.numpy().tobytes()) for v in x}) == 200


def test_imagenet_views_at_224_are_the_recorded_scales():
    """At 224 the scales stay 256, 288, 320: the first view is the centre crop of the image
    resized to shorter side 256 (the demo's published numbers keep their meaning)."""
    pytest.importorskip("foolbox")
    from omse.zoo.data import _center, _package_dir, load_image

    first = sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg"))[0]
    x, _ = imagenet_views(1, size=224)
    assert torch.equal(x[0], _center(load_image(first, 256), 224))


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        a = np.zeros((40, 60, 3), np.uint8)
        a[:, : 30 + i] = 255  # a white band on the left of known width
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_resize_then_centre_crop(folder):
    x = load_image_folder(folder, (20, 24), resize=20)  # 40x60 -> 20x30, crop 20x24 at (0, 3)
    assert x.shape == (3, 3, 20, 24)
    # image 0: white columns 0..29 of 60 -> 0..14 of 30 -> 0..11 of the crop (offset 3)
    col = x[0, 0, 10]
    assert col[:10].min() > 0.9 and col[14:].max() < 0.1
    assert load_image_folder(folder, 16, limit=2).shape == (2, 3, 16, 16)  # default resize 18


def test_folder_errors_name_the_problem(folder, tmp_path):
    with pytest.raises(OmseError, match="use a resize of at least 32"):
        load_image_folder(folder, (32, 32), resize=20)
    with pytest.raises(OmseError, match="evaluation folder .* does not exist"):
        load_image_folder(tmp_path / "nothere", role="evaluation")
    with pytest.raises(OmseError, match="input size 0x4"):
        load_image_folder(folder, (0, 4))
