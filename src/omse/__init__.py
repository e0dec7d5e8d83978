"""omse: post-training low-bit quantization by exact Minimum Mean Squared Error.

The public surface: ``quantize`` (a torch module, or an ONNX file via ``load_onnx``), ``QuantConfig``, ``export_onnx``, ``save``/``load``, ``report``,
``set_integer``, ``quantized_layers`` and the core tensor functions. The package is layered, each
layer importing only those below it (``tests/test_layering.py`` checks it):
``core`` (pure tensor functions) -> ``config`` -> ``nn`` (quantized modules) -> ``transforms``
(tracing, folding, statistics, corrections, the pipeline) -> ``deploy`` (ONNX, checkpoints,
runtimes) / ``analysis`` (reports, metrics) -> ``zoo`` (models, data, the demo) -> ``cli``.
"""

from .analysis.report import report
from .config import LayerConfig, QuantConfig
from .core.granularity import PerChannel, PerGroup, PerTensor
from .core.grids import Grid, make_grid
from .core.mmse import mmse_scale, mmse_solve
from .core.primitives import dequantize, fake_quantize, pack_int4, unpack_int4
from .core.primitives import quantize as quantize_tensor
from .deploy.checkpoint import save
from .deploy.export import export_onnx
from .errors import CalibrationError, CheckpointError, ConfigError, OmseError, UnsupportedLayerError
from .nn.layers import quantized_layers, set_integer
from .transforms.onnx_import import load_onnx
from .transforms.pipeline import Calibration, quantize
from .zoo.models import load_checkpoint as load

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "CalibrationError",
    "LayerConfig",
    "QuantConfig",
    "CheckpointError",
    "ConfigError",
    "Grid",
    "OmseError",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "UnsupportedLayerError",
    "dequantize",
    "export_onnx",
    "load",
    "load_onnx",
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
