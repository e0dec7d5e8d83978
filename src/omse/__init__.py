"""omse: post-training low-bit quantization by exact Minimum Mean Squared Error.

The public surface: six functions, each with a runnable example in its docstring
(``tests/test_readme.py`` runs them), and the configuration:

- ``quantize(model, calib_batches, config=None)``: a quantized copy of ``model`` (a torch module,
  or a float ONNX file / ``onnx.ModelProto``, converted by ``load_onnx``, or a float ``.tflite``
  file, converted by ``load_tflite``);
- ``export_onnx(qmodel, example_input, path)``: ONNX for int8 runtimes or int4 accelerators;
- ``export_tflite(qmodel, example_input, path)``: a LiteRT / TensorFlow Lite Micro model with
  packed INT4 filters (``QuantConfig(target="tflite")``; ``quantize_tflite`` fits a file size);
- ``save(qmodel, path)`` / ``load(path, model=None)``: packed 4-bit checkpoints;
- ``report(qmodel, calib_batches, out_dir)``: the per-layer report (md, csv, png);
- ``QuantConfig()``: the default recipe (W4A8, residual tensors within 10% extra MACs, bias
  correction); ``QuantConfig.preset("fast" | "default" | "best", **fields)``; its parts
  ``WeightQuant``, ``ActQuant``, ``Nearest`` / ``GPTQ`` / ``LearnedRounding``, ``Residuals``,
  ``Budget``.

For example::

    import omse
    from omse.zoo.tasks import get_task

    task = get_task("fmnist-resnet20")
    model = task.build()
    qmodel = omse.quantize(model, task.calibration(32).split(8))

Below them: ``set_integer``, ``quantized_layers`` and the core tensor functions. The package is
layered, each layer importing only those below it (``tests/test_layering.py`` checks it):
``core`` (pure tensor functions) -> ``config`` -> ``nn`` (quantized modules) -> ``transforms``
(tracing, folding, statistics, corrections, the pipeline) -> ``deploy`` (ONNX, checkpoints,
runtimes) / ``analysis`` (reports, metrics) -> ``zoo`` (models, data, the demo) -> ``cli``.
"""

from .analysis.report import report
from .config import (
    GPTQ,
    ActQuant,
    Budget,
    LayerConfig,
    LearnedRounding,
    Nearest,
    QuantConfig,
    Residuals,
    WeightQuant,
)
from .core.granularity import PerChannel, PerGroup, PerTensor
from .core.grids import Grid, make_grid
from .core.mmse import mmse_scale, mmse_solve
from .core.primitives import dequantize, fake_quantize, pack_int4, unpack_int4
from .core.primitives import quantize as quantize_tensor
from .deploy.checkpoint import save
from .deploy.export import export_onnx
from .deploy.tflite import export_tflite, quantize_tflite
from .errors import CalibrationError, CheckpointError, ConfigError, OmseError, UnsupportedLayerError
from .nn.layers import quantized_layers, set_integer
from .transforms.onnx_import import load_onnx
from .transforms.pipeline import Calibration, quantize
from .transforms.tflite_import import load_tflite
from .zoo.models import load_checkpoint as load

__version__ = "0.1.0"

__all__ = [
    "ActQuant",
    "Budget",
    "Calibration",
    "CalibrationError",
    "LayerConfig",
    "LearnedRounding",
    "Nearest",
    "QuantConfig",
    "Residuals",
    "CheckpointError",
    "ConfigError",
    "GPTQ",
    "Grid",
    "OmseError",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "UnsupportedLayerError",
    "WeightQuant",
    "dequantize",
    "export_onnx",
    "export_tflite",
    "quantize_tflite",
    "load",
    "load_onnx",
    "load_tflite",
    "save",
    "fake_quantize",
    "make_grid",
    "mmse_scale",
    "mmse_solve",
    "pack_int4",
    "quantize",
    "quantize_tensor",
    "quantized_layers",
    "report",
    "set_integer",
    "unpack_int4",
]
