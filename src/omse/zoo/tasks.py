"""Tasks: a built-in model with its calibration and its evaluation data, which never overlap.

``get_task(name)`` is what the CLI, the demo and every benchmark load a built-in model through:

- ``efficientnet-lite0``: calibration = the photographs bundled with scikit-image/matplotlib
  (:func:`~omse.zoo.data.calibration_images`), evaluation = deterministic views of the 20
  labelled foolbox ImageNet images (:func:`~omse.zoo.data.imagenet_views`);
- ``fmnist-*``: calibration = the first Fashion-MNIST *training* images, evaluation = the first
  *test* images, with their labels.

Inputs come preprocessed for the model (``[n, C, H, W]`` float32); labels are ``[n]`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import ModelSpec, get_model

__all__ = ["Task", "get_task"]


@dataclass(frozen=True)
class Task:
    """A registry model with its data; see the module docstring."""

    spec: ModelSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def build(self) -> nn.Module:
        """The FP32 model with its weights."""
        return self.spec.build()

    def calibration(self, n: int) -> torch.Tensor:
        """``n`` preprocessed calibration inputs ``[n, C, H, W]`` (never evaluation data)."""
        if self.spec.task == "fmnist":
            from .fmnist import load_fmnist

            return self.spec.preprocess(load_fmnist("train")[0][:n])
        from .data import calibration_images

        return self.spec.preprocess(calibration_images(n))

    def evaluation(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [n, C, H, W], labels [n])``: the first ``n`` evaluation inputs (all test
        images for Fashion-MNIST when ``n`` is None; 200 ImageNet views)."""
        if self.spec.task == "fmnist":
            from .fmnist import load_fmnist

            x, y = load_fmnist("test")
            if n is not None:
                x, y = x[:n], y[:n]
            return self.spec.preprocess(x), y
        from .data import imagenet_views

        views, labels = imagenet_views(200 if n is None else n)
        return self.spec.preprocess(views), labels

    def describe(self, n_calib: int, n_eval: int | None) -> dict[str, str]:
        """Where the calibration and evaluation data come from (for result files)."""
        if self.spec.task == "fmnist":
            ev = "every" if n_eval is None else f"the first {n_eval}"
            return {
                "calibration": f"the first {n_calib} Fashion-MNIST training images",
                "eval": f"{ev} Fashion-MNIST test images",
            }
        return {
            "calibration": f"omse.zoo.data.calibration_images({n_calib}) (scikit-image/matplotlib photos)",
            "eval": f"omse.zoo.data.imagenet_views({200 if n_eval is None else n_eval}): views of "
            "the 20 foolbox ImageNet images",
        }


def get_task(name: str) -> Task:
    """The task of registry model ``name`` (an :class:`~omse.errors.OmseError` listing the known
    names otherwise)."""
    return Task(get_model(name))
