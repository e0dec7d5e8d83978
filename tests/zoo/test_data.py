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


def _reference_fit(path, h, w, mode, pad_value=114, pad="center"):
    """An independent letterbox / stretch with PIL and numpy: scale ``min(h / H0, w / W0)``,
    sides rounded, bilinear, pasted into a ``pad_value`` canvas centred (Ultralytics:
    ``round(d - 0.1)`` of the half margin) or at the top left (YOLOX). ``[3, h, w]`` in [0, 1]."""
    im = Image.open(path).convert("RGB")
    if mode == "stretch":
        a = np.asarray(im.resize((w, h), Image.BILINEAR))
    else:
        w0, h0 = im.size
        r = min(h / h0, w / w0)
        nw, nh = int(round(w0 * r)), int(round(h0 * r))
        if (nw, nh) != (w0, h0):
            im = im.resize((nw, nh), Image.BILINEAR)
        a = np.full((h, w, 3), pad_value, np.uint8)
        top = int(round((h - nh) / 2 - 0.1)) if pad == "center" else 0
        left = int(round((w - nw) / 2 - 0.1)) if pad == "center" else 0
        a[top : top + nh, left : left + nw] = np.asarray(im)
    return torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three scikit-image photos of different aspect ratios (and a grey one) as files."""
    data = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "rocket", "camera"):  # 512x512 RGB, 427x640 RGB, 512x512 grey
        Image.fromarray(getattr(data, name)()).save(d / f"{name}.png")
    Image.fromarray(data.rocket()[:, :300]).save(d / "tall.png")  # 427x300: taller than wide
    return d


@pytest.mark.parametrize("mode, pad", [("letterbox", "center"), ("letterbox", "bottom-right"),
                                       ("stretch", "center")])  # fmt: skip
@pytest.mark.parametrize("hw", [(320, 320), (256, 320), (320, 192)])
def test_letterbox_and_stretch_equal_a_reference(photos, mode, pad, hw):
    x = load_image_folder(photos, hw, mode=mode, pad=pad, pad_value=114)
    files = sorted(photos.iterdir())
    assert x.shape == (len(files), 3, *hw)
    for got, f in zip(x, files):
        assert torch.equal(got, _reference_fit(f, *hw, mode, 114, pad)), (f.name, mode, pad)


def test_letterbox_pads_where_it_says(photos):
    """The rocket (427x640, landscape) at 320x320 is round(213.5) = 214 rows high: centred, 53
    rows of pad above and 53 below; bottom-right: all 106 below. The pad value is the canvas'
    colour."""
    assert sorted(photos.iterdir())[2].name == "rocket.png"
    c = load_image_folder(photos, 320, mode="letterbox", pad_value=0)[2]
    b = load_image_folder(photos, 320, mode="letterbox", pad="bottom-right", pad_value=255)[2]
    assert c[:, :53].abs().max() == 0 and c[:, 53 + 214 :].abs().max() == 0
    assert c[:, 53].abs().max() > 0 and c[:, 53 + 213].abs().max() > 0
    assert (b[:, 214:] == 1).all() and not (b[:, 213] == 1).all()


def test_fit_errors_name_the_setting(photos):
    with pytest.raises(OmseError, match="resize mode 'pad': use one of crop, letterbox, stretch"):
        load_image_folder(photos, 32, mode="pad")
    with pytest.raises(OmseError, match="pad value 300: use an integer 0..255"):
        load_image_folder(photos, 32, mode="letterbox", pad_value=300)
    with pytest.raises(OmseError, match="letterbox pad 'left'"):
        load_image_folder(photos, 32, mode="letterbox", pad="left")
    with pytest.raises(OmseError, match="goes with mode 'crop'"):
        load_image_folder(photos, 32, resize=40, mode="letterbox")
