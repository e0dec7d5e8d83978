"""Quantizers on the outputs of the ops between quantized layers (``target="int8"``).

An integer runtime runs more than convolutions on 8-bit tensors: onnxruntime's CPU provider fuses
``DequantizeLinear -> op -> QuantizeLinear`` into ``QLinearSigmoid``, ``QLinearMul``,
``QLinearAdd``, ``QLinearConcat``, ``QLinearAveragePool``, ``QLinearGlobalAveragePool`` and
``QLinearLeakyRelu``, and runs ``MaxPool`` / ``Resize`` on the 8-bit codes when the quantizers on
both sides are the same. For that every such op needs a per-tensor quantizer on its output. Most
ops in a model are plain calls in ``forward`` (``x * torch.sigmoid(x)``, ``torch.cat``, ``a + b``),
not modules, so :class:`OpQuantizers` sees them through a ``TorchFunctionMode`` that is active
while the quantized model runs (outside quantized layers): each call of an op in :data:`SITE_OPS`
is a **site**, numbered in call order (``F.silu`` is two sites: its ``Sigmoid`` and its ``Mul``).

Per site the plan (:func:`omse.transforms.calibration.plan_op_quantizers`, from the traced graph)
says what the output gets:

- ``"own"``: its own 8-bit quantizer, calibrated from the site's output histogram;
- ``"fused"``: the input quantizer of the one quantized layer it reaches through reshapes (the
  same values as that quantizer gives later: quantizing twice with one step is idempotent);
- ``"same"``: the quantizer of its input (``MaxPool``, nearest ``Resize``: the output codes are
  input codes, so the simulation is the identity; the export repeats the input's Q/DQ);
- ``"none"``: nothing (a float op, or the output goes straight to a quantizer).

While :func:`omse.transforms.graph.trace` runs, every site marks its output with an
``omse::Marker`` (``kind="op"``, ``idx`` = site), which the ONNX writer turns into the planned
Q/DQ, so the simulation and the graph place the same quantizers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.grids import Grid
from ..core.primitives import fake_quantize
from .layers import Marker, layer_depth

__all__ = [
    "OpQuantizers",
    "as_site",
    "op_quantizers",
    "detach_op_quantizers",
    "SITE_KINDS",
    "OPS_ATTR",
    "TFLITE_SITE_OPS",
]

OPS_ATTR = "omse_ops"
"""The attribute of a quantized model that holds its :class:`OpQuantizers`."""

SITE_KINDS = ("own", "fused", "same", "none")

_UNARY = {
    "sigmoid": "Sigmoid",
    "relu": "Relu",
    "leaky_relu": "LeakyRelu",
    "max_pool1d": "MaxPool",
    "max_pool2d": "MaxPool",
    "max_pool3d": "MaxPool",
    "_max_pool1d": "MaxPool",
    "_max_pool2d": "MaxPool",
    "_max_pool3d": "MaxPool",
    "avg_pool1d": "AveragePool",
    "avg_pool2d": "AveragePool",
    "avg_pool3d": "AveragePool",
    "adaptive_avg_pool1d": "GlobalAveragePool",
    "adaptive_avg_pool2d": "GlobalAveragePool",
    "adaptive_avg_pool3d": "GlobalAveragePool",
    "interpolate": "Resize",
    "softmax": "Softmax",
}
_RESIZE_MODES = ("nearest", "linear", "bilinear", "trilinear")
"""``interpolate`` modes that are sites: ``"nearest"`` passes codes through, the linear ones
may get a quantizer (:data:`omse.transforms.calibration.REQUANT_SITE_OPS`)."""
_BINARY = {"add": "Add", "__add__": "Add", "__radd__": "Add", "mul": "Mul", "__mul__": "Mul"}
_BINARY.update({"__rmul__": "Mul"})
_SPLIT = {"chunk": "Split", "split": "Split", "tensor_split": "Split"}
SITE_OPS = {
    **_UNARY,
    **_BINARY,
    **_SPLIT,
    "cat": "Concat",
    "concat": "Concat",
    "silu": "Sigmoid+Mul",
}
"""Function names (``torch``, ``torch.nn.functional``, ``Tensor`` methods) whose outputs are
sites, and the ONNX ops they trace to."""
TFLITE_SITE_OPS = {"hardswish": "HardSwish", "tanh": "Tanh", "pad": "Pad"}
"""Further sites of ``target="tflite"`` models (:attr:`OpQuantizers.extra_sites`): a TFLite int8
graph quantizes every tensor, these ops' outputs too (zero padding keeps its input's grid)."""


def _activation(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2


def _site_op(func, args, kwargs, extra: bool = False) -> str | None:
    """The ONNX op a call is a site of, or None (not an activation op: scalars, 0-d scales);
    ``extra``: :data:`TFLITE_SITE_OPS` are sites too."""
    name = getattr(func, "__name__", "")
    op = SITE_OPS.get(name) or (TFLITE_SITE_OPS.get(name) if extra else None)
    if op is None or not args:
        return None
    if op == "Pad":
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None)
        return op if mode == "constant" and not value and _activation(args[0]) else None
    if op in ("Add", "Mul"):
        other = args[1] if len(args) > 1 else kwargs.get("other")
        if not (_activation(args[0]) and _activation(other)) or kwargs.get("alpha", 1) != 1:
            return None
        return op
    if op == "Concat":
        seq = args[0]
        return op if isinstance(seq, list | tuple) and all(_activation(t) for t in seq) else None
    if op == "Resize":
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        return op if mode in _RESIZE_MODES and _activation(args[0]) else None
    if op == "GlobalAveragePool":
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        sizes = size if isinstance(size, list | tuple) else (size,)
        return op if all(s == 1 for s in sizes) and _activation(args[0]) else None
    return op if _activation(args[0]) else None  # in place too: the site returns a new tensor


_ACTIVE = threading.local()  # .modes: the site modes entered on this thread, innermost last


class _SiteMode(TorchFunctionMode):
    """Numbers the site calls of one forward and hands each output to :meth:`OpQuantizers.at`."""

    def __init__(self, ops: OpQuantizers):
        super().__init__()
        self.ops = ops
        self.k = 0

    def __enter__(self):
        _ACTIVE.modes = [*getattr(_ACTIVE, "modes", []), self]
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.modes.pop()
        return super().__exit__(*exc)

    def _next(self) -> int:
        self.k += 1
        return self.k - 1

    def site_op(self, func, args: tuple, kwargs: dict) -> str | None:
        """The op the call is a site of (None: not a site, or inside a quantized layer)."""
        return None if layer_depth() else _site_op(func, args, kwargs, self.ops.extra_sites)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = self.site_op(func, args, kwargs)
        if op is None:
            return func(*args, **kwargs)
        if op == "Sigmoid+Mul":  # silu(x) = x * sigmoid(x), as the exporter writes it
            x = args[0]
            s = self.ops.at(self._next(), torch.sigmoid(x))
            return self.ops.at(self._next(), x * s)
        y = func(*args, **kwargs)
        if op == "Split":  # one site per part (Slice / Split outputs in the graph)
            return type(y)(self.ops.at(self._next(), t) for t in y)
        return self.ops.at(self._next(), y)


def as_site(func, args: tuple, kwargs: dict, y: torch.Tensor) -> torch.Tensor:
    """``y``, the output of ``func(*args, **kwargs)`` computed where the site mode does not
    see it (a module's own ONNX export of the op, run with torch functions disabled), as the
    active site mode would have returned it: the same site number as the call would have taken
    in an eager forward, its quantizer and marker on ``y``. ``y`` itself outside a site mode,
    inside a quantized layer, or for a call that is not a site. A one-output op only."""
    modes = getattr(_ACTIVE, "modes", [])
    if not modes or modes[-1].site_op(func, args, kwargs) is None:
        return y
    return modes[-1].ops.at(modes[-1]._next(), y)


class OpQuantizers:
    """The site quantizers of one quantized model (see the module docstring): a plain attribute
    of the model (:data:`OPS_ATTR`), not a submodule, so that containers such as
    ``nn.Sequential`` do not call it and the module structure stays the model's own.

    ``kinds[k]`` is site ``k``'s plan entry, ``scales[k]`` / ``grids[k]`` its quantizer (for
    ``"own"`` and ``"fused"``); ``ops[k]`` the ONNX op it traced to. ``observer(k, y)`` (set for
    one calibration pass) sees every site output; ``tracing`` marks them for the ONNX writer.
    """

    def __init__(self) -> None:
        self.kinds: dict[int, str] = {}
        self.ops: dict[int, str] = {}
        self.scales: dict[int, torch.Tensor] = {}
        self.grids: dict[int, Grid] = {}
        self.fused: dict[int, str] = {}  # "fused" site -> the layer whose input quantizer it uses
        self.sources: dict[int, tuple] = {}  # "same" site -> ("site", k) / ("out" | "act", layer)
        self.shared: dict[str, int] = {}  # layer -> the site whose quantizer its input takes
        self.observer: Callable[[int, torch.Tensor], None] | None = None
        self.tracing = False
        self.enabled = True
        self.extra_sites = False  # TFLITE_SITE_OPS are sites (target="tflite")
        self._local = threading.local()
        self._handles: list = []

    def __deepcopy__(self, memo):
        new = OpQuantizers()
        memo[id(self)] = new
        new.kinds, new.ops, new.grids = dict(self.kinds), dict(self.ops), dict(self.grids)
        new.fused, new.sources, new.shared = dict(self.fused), dict(self.sources), dict(self.shared)
        new.scales = {k: v.clone() for k, v in self.scales.items()}
        new.tracing, new.enabled = self.tracing, self.enabled
        new.extra_sites = self.extra_sites
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local", None)
        state["_handles"] = []
        state["observer"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self) -> str:
        counts = {k: sum(v == k for v in self.kinds.values()) for k in SITE_KINDS}
        return "OpQuantizers(" + ", ".join(f"{k}={n}" for k, n in counts.items() if n) + ")"

    def to_dict(self) -> dict:
        """The plan and quantizers as JSON-ready values (checkpoint headers)."""
        return {
            "kinds": {str(k): v for k, v in self.kinds.items()},
            "ops": {str(k): v for k, v in self.ops.items()},
            "scales": {str(k): float(v) for k, v in self.scales.items()},
            "grids": {str(k): g.to_list() for k, g in self.grids.items()},
            "fused": {str(k): v for k, v in self.fused.items()},
            "sources": {str(k): list(v) for k, v in self.sources.items()},
            "shared": dict(self.shared),
            "extra_sites": self.extra_sites,
        }

    def load_dict(self, d: dict) -> None:
        """Restore what :meth:`to_dict` wrote."""
        self.kinds = {int(k): v for k, v in d.get("kinds", {}).items()}
        self.ops = {int(k): v for k, v in d.get("ops", {}).items()}
        self.fused = {int(k): v for k, v in d.get("fused", {}).items()}
        self.sources = {int(k): tuple(v) for k, v in d.get("sources", {}).items()}
        self.shared = {k: int(v) for k, v in d.get("shared", {}).items()}
        self.extra_sites = bool(d.get("extra_sites", False))
        self.scales, self.grids = {}, {}
        for k, v in d.get("scales", {}).items():
            self.set_quantizer(int(k), torch.tensor(v), Grid(*d["grids"][k]))

    def set_quantizer(self, site: int, scale: torch.Tensor | None, grid: Grid | None) -> None:
        if scale is None or grid is None:
            self.scales.pop(site, None)
            self.grids.pop(site, None)
            return
        self.scales[site] = scale.detach().to(torch.float32).reshape(()).clone()
        self.grids[site] = grid

    def at(self, site: int, y: torch.Tensor) -> torch.Tensor:
        """Site ``site``'s output ``y`` as the plan has it (quantized, or as it is)."""
        if self.observer is not None:
            self.observer(site, y)
        q = y
        if self.enabled and site in self.scales and self.kinds.get(site) in ("own", "fused"):
            q = fake_quantize(y, self.scales[site], self.grids[site])
        if self.tracing:
            return Marker.apply(y, q, "op", site, 0)
        return q

    @contextlib.contextmanager
    def active(self):
        """The site mode for one forward (nested forwards of the same model share it)."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            if depth:
                yield
            else:
                with _SiteMode(self):
                    yield
        finally:
            self._local.depth = depth

    def _enter(self, _module, _args):
        cm = self.active()
        cm.__enter__()
        stack = getattr(self._local, "stack", [])
        stack.append(cm)
        self._local.stack = stack

    def _exit(self, _module, _args, _out):
        stack = getattr(self._local, "stack", [])
        if stack:
            stack.pop().__exit__(None, None, None)


def op_quantizers(model: nn.Module, create: bool = False) -> OpQuantizers | None:
    """``model``'s :class:`OpQuantizers` (attached with its forward hooks when ``create``)."""
    ops = getattr(model, OPS_ATTR, None)
    if ops is not None:
        if not any(h == ops._enter for h in model._forward_pre_hooks.values()):
            _attach(model, ops)  # a copy that did not keep module hooks (torch.fx.GraphModule)
        return ops
    if not create:
        return None
    ops = OpQuantizers()
    setattr(model, OPS_ATTR, ops)
    _attach(model, ops)
    return ops


def _attach(model: nn.Module, ops: OpQuantizers) -> None:
    ops._handles = [
        model.register_forward_pre_hook(ops._enter),
        model.register_forward_hook(ops._exit, always_call=True),
    ]


def detach_op_quantizers(model: nn.Module) -> None:
    """Remove ``model``'s :class:`OpQuantizers` and its hooks (a plan with no quantizer)."""
    ops = getattr(model, OPS_ATTR, None)
    if ops is None:
        return
    for h in ops._handles:
        h.remove()
    delattr(model, OPS_ATTR)
