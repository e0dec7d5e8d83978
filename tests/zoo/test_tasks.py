"""Tasks (omse.zoo.tasks): preprocessed calibration and evaluation data that never overlap."""

from __future__ import annotations

import pytest
import torch

from omse.errors import OmseError
from omse.zoo.tasks import get_task


def _fmnist_or_skip():
    from omse.zoo.fmnist import load_fmnist

    try:
        load_fmnist("test")
    except OmseError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")


def test_fmnist_task_calibrates_on_training_images_and_evaluates_on_test_images():
    _fmnist_or_skip()
    from omse.zoo.fmnist import load_fmnist, normalize

    task = get_task("fmnist-vgg")
    calib = task.calibration(64)
    x, y = task.evaluation(100)
    assert calib.shape == (64, 1, 28, 28) and x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert torch.equal(calib, normalize(load_fmnist("train")[0][:64]))
    assert torch.equal(x, normalize(load_fmnist("test")[0][:100]))
    assert task.describe(64, 100)["calibration"].startswith("the first 64 Fashion-MNIST training")


@pytest.mark.models
def test_lite0_task_inputs_are_preprocessed_and_disjoint():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("foolbox")
    task = get_task("efficientnet-lite0")
    calib = task.calibration(8)
    x, labels = task.evaluation(10)
    assert calib.shape == (8, 3, 224, 224) and x.shape == (10, 3, 224, 224)
    assert float(calib.min()) >= -1.0 and float(calib.max()) <= 1.0  # Lite0's [-1, 1] inputs
    flat_c, flat_x = calib.flatten(1), x.flatten(1)
    assert not any(torch.equal(a, b) for a in flat_c for b in flat_x)


def test_unknown_task_names_the_known_models():
    with pytest.raises(OmseError, match="efficientnet-lite0"):
        get_task("resnet-9000")
