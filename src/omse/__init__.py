"""omse: post-training low-bit quantization by exact Minimum Mean Squared Error."""

from .api import Calibration, quantize, quantized_layers, set_integer
from .checkpoint import load, save
from .config import LayerConfig, QuantConfig
from .errors import CalibrationError, CheckpointError, ConfigError, OmseError, UnsupportedLayerError
from .export import export_onnx
from .granularity import PerChannel, PerGroup, PerTensor
from .grids import Grid, make_grid
from .mmse import mmse_scale, mmse_solve
from .primitives import dequantize, fake_quantize, pack_int4, unpack_int4
from .primitives import quantize as quantize_tensor
from .report import report

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
