"""The dataflow of a quantized model as an ONNX graph: tracing with marked layers, constant folding,
and the route each quantized layer's output takes to the next quantizer.

:func:`trace` swaps every :class:`~omse.nn.layers.QuantizedLayer` for a twin that marks, with custom
``omse::Marker`` nodes, the layer's input (``kind="act"``), the terms of its weight (``"w"``, when
asked) and its output (``"out"``), and traces the model with ``torch.onnx.export`` (TorchScript
exporter, opset 20). Both the exporter (:mod:`omse.deploy.export`, which rewrites the markers into
Q/DQ nodes) and :func:`omse.quantize` (which asks :func:`layer_routes` where output quantizers are
needed for ``target="int8"``) read this one graph, so the plan and the export never disagree.

:func:`layer_routes` answers, for layer ``i``, where its output goes:

- ``"fused"``: through ops that commute with a per-tensor quantizer of zero point 0 (``Relu``,
  ``Clip``, ``MaxPool``, reshapes, ``Pad`` with 0; each intermediate read by one node) into exactly
  one quantized layer ``j``'s input quantizer. Requantizing right after layer ``i`` with ``j``'s
  scale and grid is then exact (``Q(relu(y)) = Q(y)`` on an unsigned grid, ``Q(max(a, b)) =
  max(Q(a), Q(b))``, ``Q(clip(y, lo, hi)) = clip(Q(y), round(lo/s), round(hi/s))``), so an integer
  runtime runs layer ``i`` as one integer kernel with no extra quantizer;
- ``"graph_output"``: the model's output (an integer kernel with float output, as ``QGemm`` has);
- ``"output"``: anything else (a residual ``Add``, a pooling, a non-monotone activation, several
  readers): layer ``i`` needs a quantizer of its own output. ``clamp`` is the range the
  ``Relu``/``Clip`` ops right after it impose, used to calibrate that quantizer.
  ``integer_reader`` says whether an integer runtime would run any reader there on 8-bit values
  (:func:`integer_reader`: an ``Add``/``Concat``/pooling whose result is requantized); where
  none would (a transformer's ``Add`` -> ``LayerNormalization``, ``Gelu``, ``Softmax``, the
  attention ``MatMul``), a Linear keeps a float output (:func:`float_output`: onnxruntime's
  ``MatMulIntegerToFloat`` / ``QGemm`` without an output scale are integer kernels with float
  outputs), while a convolution, whose integer kernels always requantize, keeps the quantizer.

Inputs and dynamic axes: :func:`trace` takes the example as ``torch.onnx.export`` does (a tensor,
a tuple of tensors or a dict of keyword tensors, laid out by :func:`example_args`) and declares
the dynamic axes :func:`io_spec` resolves (axis 0 of every input and output, plus the user's)
to the exporter, so the exporter keeps every shape computation on such an axis as ``Shape``
ops and folds only what is static.

Folding and dynamic shapes: :func:`fold_constants` evaluates a node only when *all* its inputs
are initializers or ``Constant`` outputs, i.e. values that read no graph input. Such a value
cannot depend on any dimension, dynamic or not, so the folded graph runs at every size of the
dynamic axes by construction; anything that reads a ``Shape`` of a tensor stays in the graph.
We chose this over evaluating candidate shape values at two sizes of each dynamic axis and over
ONNX symbolic shape inference because it needs no second evaluation and cannot be fooled by
sizes that happen to agree (two sizes of one parity give the same stride-2 "same" pad). What
makes the int8 graph integer-only is then the exporter's own folding of the *static* axes: with
the batch-only default a static "same" padding reaches :func:`fold_constants` as constants and
:func:`fold_pads` moves it into the Conv; a padding computed from a dynamic size stays a ``Pad``
(correct, and float compute between the integer kernels).
"""

from __future__ import annotations

import copy
import inspect
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..core.primitives import fake_quantize
from ..errors import ConfigError, OmseError, UnsupportedLayerError
from ..nn.layers import DOMAIN, Marker, QuantizedLayer, inside_layer, quantized_layers
from ..nn.ops import OPS_ATTR, op_quantizers

__all__ = [
    "DOMAIN",
    "Marker",
    "TRACE_OPSET",
    "Route",
    "trace",
    "rewrite_markers",
    "example_args",
    "io_spec",
    "IOSpec",
    "marker_attrs",
    "fold_constants",
    "fold_pads",
    "layer_routes",
    "consumers",
    "const_value",
    "shared_input_candidates",
    "integer_reader",
    "input_groups",
    "float_output",
    "is_silu",
    "SILU_FLOOR",
    "INTEGER_OPS",
]

TRACE_OPSET = 20
# ops through which a zero-point-0 per-tensor quantizer moves without changing the result (on a
# tensor only that op reads); Clip and Relu also narrow the range the quantizer must cover
TRANSPARENT = {
    "Relu",
    "Clip",
    "MaxPool",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Identity",
    "Dropout",
    "Pad",
}
_SHAPE_READERS = {"Shape", "Size"}  # read a tensor's shape, not its values
# ops an integer runtime runs on 8-bit inputs when their output is requantized (onnxruntime's QDQ
# fusions: QLinearAdd/Mul/Concat/AveragePool/GlobalAveragePool/Sigmoid/LeakyRelu, QLinearReduceMean)
INTEGER_OPS = {
    "Add",
    "Sum",
    "Mul",
    "Concat",
    "AveragePool",
    "GlobalAveragePool",
    "ReduceMean",
    "Sigmoid",
    "LeakyRelu",
}


class TracedLayer(nn.Module):
    """Stand-in for a :class:`QuantizedLayer` while tracing: marked input and output, and (with
    ``terms``) one branch per weight term, each marked.

    ``terms``: the weight terms to write, ``[(codes, scale, kernels)]`` (``None``: the layer's
    weight as it is, unmarked); ``kernels``: None for a whole term, else the output channels
    the term's codes ``[len(kernels), ...]`` belong to (see
    :meth:`QuantizedLayer.term_kernels`): the branch convolves those kernels alone (a
    depthwise layer on those input channels) and scatters its output back to the layer's
    channels, zeros elsewhere; ``integer``: the branches convolve integer codes and are rescaled
    by the layer's multiplier (the arithmetic of :meth:`QuantizedLayer.integer_forward`).
    """

    def __init__(
        self,
        ql: QuantizedLayer,
        idx: int,
        terms: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        integer: bool = False,
    ):
        super().__init__()
        self.idx = idx
        self.ql = ql
        self.layer = ql.layer
        self.integer = integer and ql.act_scale is not None and ql.a_grid is not None
        self.mark_weights = terms is not None
        self.kernels: list[torch.Tensor | None] = [None]
        if terms is None:
            self.term_weights = [self.layer.weight.detach()]
        elif self.integer:  # integer codes in float containers, rescaled after the layer
            self.term_weights = [q.to(torch.float32) for q, _, _ in terms]
        else:
            self.term_weights = [(q.to(torch.float32) * s).to(torch.float32) for q, s, _ in terms]
        if terms is not None:
            self.kernels = [k for _, _, k in terms]
        # per cut term: the branch's output index of each of the layer's channels, or of the
        # zero padded after its last (computed here: constants of the traced graph)
        self.scatter_index = [None if k is None else _scatter_index(k, ql) for k in self.kernels]
        self.multipliers = (
            [ql.act_scale.to(torch.float32) * s for _, s, _ in terms] if self.integer else []
        )
        # the wrapped module reads self.weight/self.bias in its own forward; they become plain
        # attributes that each branch points at its marked term (the bias as the layer uses it)
        self.bias = ql.effective_bias()
        del self.layer.weight
        self.layer.weight = self.term_weights[0]
        if self.bias is not None:
            del self.layer.bias
            self.layer.bias = self.bias

    def forward(self, x, *args, **kwargs):
        with inside_layer():
            return self._forward(x, *args, **kwargs)

    def _forward(self, x, *args, **kwargs):
        ql = self.ql
        if self.integer:
            xin = ql.input_codes(x)
        elif ql.act_scale is not None and ql.a_grid is not None:
            xin = fake_quantize(x, ql.act_scale, ql.a_grid)
        else:
            xin = x
        x = Marker.apply(x, xin, "act", self.idx, 0)
        had_bias = self.bias is not None
        out = None
        try:
            for t, w in enumerate(self.term_weights):
                self.layer.weight = Marker.apply(w, w, "w", self.idx, t) if self.mark_weights else w
                if had_bias:
                    self.layer.bias = self.bias if t == 0 and not self.integer else None
                kernels = self.kernels[t]
                if kernels is None:
                    y = self.layer(x, *args, **kwargs)
                else:
                    y = self._kernels_forward(x, kernels, args, kwargs)
                if self.integer:
                    m = ql.per_output_channel(self.multipliers[t].reshape(-1))
                    y = Marker.apply(y, y * m, "mul", self.idx, t)
                    if t == 0 and had_bias:
                        y = y + ql.per_output_channel(self.bias)
                if kernels is not None:
                    y = self._scatter(y, self.scatter_index[t])
                out = y if out is None else out + y
        finally:
            if had_bias:
                self.layer.bias = self.bias
        return Marker.apply(out, ql.quantize_output(out), "out", self.idx, 0)

    def _channel_axis(self) -> int:
        return -1 if isinstance(self.layer, nn.Linear) else 1

    def _kernels_forward(self, x, kernels: torch.Tensor, args, kwargs) -> torch.Tensor:
        """The layer's output on ``kernels`` only (its weight is already those kernels'): a
        depthwise layer convolves the same channels of its input in as many groups."""
        groups = getattr(self.layer, "groups", 1)
        if groups == 1:
            return self.layer(x, *args, **kwargs)
        self.layer.groups = kernels.numel()
        try:
            return self.layer(x.index_select(1, kernels), *args, **kwargs)
        finally:
            self.layer.groups = groups

    def _scatter(self, y: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """A branch's output on its kernels -> the layer's channels, zero elsewhere (a zero
        channel padded on, then ``Gather`` at ``where``, see :func:`_scatter_index`)."""
        if self._channel_axis() == -1:
            return nn.functional.pad(y, (0, 1)).index_select(-1, where)
        pad = [0, 0] * (y.dim() - 2) + [0, 1]  # (last dim first) ... the channel axis: +1
        return nn.functional.pad(y, pad).index_select(1, where)


def _scatter_index(kernels: torch.Tensor, ql: QuantizedLayer) -> torch.Tensor:
    """``[out]`` int64: for each of the layer's channels, its position in ``kernels``, or
    ``len(kernels)`` (the zero channel) where it has none."""
    where = torch.full((ql.float_weight.shape[0],), kernels.numel(), dtype=torch.int64)
    where[kernels] = torch.arange(kernels.numel())
    return where


def _find_op_module(model: nn.Module, example: tuple, message: str) -> str | None:
    """The module that calls the operator named in an exporter error (by re-tracing), if any."""
    m = re.search(r"'(aten::[A-Za-z0-9_.]+)'", message)
    if not m:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(model, example, check_trace=False).inlined_graph
    except Exception:
        return None
    for node in graph.nodes():
        if node.kind() == m.group(1):
            scope = node.scopeName().split("/")[-1]
            name = scope.removeprefix("__module.") if scope.startswith("__module.") else None
            try:
                if name:
                    model.get_submodule(name)
                    return name
            except AttributeError:
                return None
    return None


def _flat_tensors(obj) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in the order ``torch.onnx.export`` writes them."""
    return [t for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]


def example_args(model: nn.Module, example_input) -> tuple[tuple, list[str | None]]:
    """``(positional arguments, keyword name of each)`` to call ``model`` with ``example_input``.

    ``example_input``: a tensor (one positional input), a tuple/list of tensors (positional
    inputs) or a dict of keyword tensors. A dict is laid out in the order of ``model.forward``'s
    parameters (the order of the graph's inputs), with a skipped parameter's default between
    two given ones; the names are ``None`` for positional inputs.
    """
    if isinstance(example_input, torch.Tensor):
        return (example_input,), [None]
    if isinstance(example_input, tuple | list):
        if not example_input or not all(isinstance(t, torch.Tensor) for t in example_input):
            raise ConfigError(
                "example_input: a tuple of positional inputs must hold tensors only "
                f"(got {[type(t).__name__ for t in example_input]})"
            )
        return tuple(example_input), [None] * len(example_input)
    if isinstance(example_input, dict):
        if not example_input or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in example_input.items()
        ):
            raise ConfigError(
                "example_input: a dict of keyword inputs must map names (str) to tensors"
            )
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        known = {p.name for p in params}
        unknown = [k for k in example_input if k not in known]
        if unknown:
            raise ConfigError(
                f"example_input: {unknown} are not parameters of {type(model).__name__}.forward "
                f"({[p.name for p in params]})"
            )
        args, names, left = [], [], set(example_input)
        for p in params:
            if not left:
                break
            if p.name in example_input:
                args.append(example_input[p.name])
                names.append(p.name)
                left.discard(p.name)
            elif p.default is not p.empty:
                args.append(p.default)  # a skipped optional parameter between two given ones
                names.append(None)
            else:
                raise ConfigError(
                    f"example_input: {type(model).__name__}.forward needs {p.name!r} before "
                    f"{sorted(left)}; add it to the dict"
                )
        return tuple(args), names
    raise ConfigError(
        "example_input must be a tensor, a tuple of tensors (positional inputs) or a dict of "
        f"keyword tensors, got {type(example_input).__name__}"
    )


@dataclass(frozen=True)
class IOSpec:
    """The names of a traced graph's inputs and outputs and its dynamic axes.

    ``dynamic_axes``: tensor name -> ``{axis: dim name}`` (every axis listed is a free dimension
    of the graph, ``dim_param`` in ONNX); ``sizes``: tensor name -> the example's shape.
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    sizes: dict[str, tuple[int, ...]]


def _names(given, default: list[str], what: str) -> list[str]:
    if given is None:
        return default
    if isinstance(given, str) or not all(isinstance(n, str) and n for n in given):
        raise ConfigError(f"{what}={given!r}: use a list of non-empty strings")
    given = list(given)
    if len(given) != len(default):
        raise ConfigError(
            f"{what}={given!r}: the model has {len(default)} "
            f"{what.split('_')[0]}{'s' if len(default) != 1 else ''} ({default} by default)"
        )
    if len(set(given)) != len(given):
        raise ConfigError(f"{what}={given!r}: the names must be distinct")
    return given


def io_spec(
    model: nn.Module,
    inputs: list[torch.Tensor],
    keywords: list[str | None],
    outputs: list[torch.Tensor],
    input_names=None,
    output_names=None,
    dynamic_axes=None,
) -> IOSpec:
    """Resolve and check the I/O names and dynamic axes of a graph traced on ``inputs``.

    Defaults: ``model.omse_io`` (a dict with ``input_names``, ``output_names``,
    ``dynamic_axes``, set by an importer) for each argument that is ``None``; else inputs are
    named by their keyword, or ``input`` / ``input_<i>``, outputs ``output`` / ``output_<i>``.
    Axis 0 of every input and output (of rank >= 1) is dynamic (``"batch"``) unless the
    dynamic axes come from ``omse_io``; ``dynamic_axes`` (``torch.onnx.export``'s form: name
    -> ``{axis: "dim"}`` or a list of axes) adds axes. Raises :class:`ConfigError` for an
    unknown name, an axis out of range or a malformed entry, naming the argument.
    """
    io = getattr(model, "omse_io", None) or {}
    if not isinstance(io, dict):
        raise ConfigError(f"model.omse_io must be a dict, got {type(io).__name__}")
    input_names = io.get("input_names") if input_names is None else input_names
    output_names = io.get("output_names") if output_names is None else output_names
    from_io = dynamic_axes is None and io.get("dynamic_axes") is not None
    dynamic_axes = io.get("dynamic_axes") if dynamic_axes is None else dynamic_axes
    n_in = len(inputs)
    ins = _names(
        input_names,
        [k or (f"input_{i}" if n_in > 1 else "input") for i, k in enumerate(keywords)],
        "input_names",
    )
    outs = _names(
        output_names,
        ["output" if len(outputs) == 1 else f"output_{i}" for i in range(len(outputs))],
        "output_names",
    )
    if set(ins) & set(outs):
        raise ConfigError(f"input_names and output_names share {sorted(set(ins) & set(outs))}")
    sizes = {n: tuple(t.shape) for n, t in zip(ins + outs, inputs + outputs, strict=True)}
    axes: dict[str, dict[int, str]] = {}
    if not from_io:
        axes = {n: {0: "batch"} for n, s in sizes.items() if len(s) >= 1}
    if dynamic_axes is not None:
        if not isinstance(dynamic_axes, dict):
            raise ConfigError(
                f"dynamic_axes={dynamic_axes!r}: use a dict name -> {{axis: 'dim'}} or list of axes"
            )
        for name, spec in dynamic_axes.items():
            if name not in sizes:
                raise ConfigError(
                    f"dynamic_axes: {name!r} is neither an input ({ins}) nor an output ({outs})"
                )
            rank = len(sizes[name])
            if isinstance(spec, dict):
                items = list(spec.items())
            elif isinstance(spec, list | tuple):
                items = [(a, f"{name}_dim{a}") for a in spec]
            else:
                raise ConfigError(
                    f"dynamic_axes[{name!r}]={spec!r}: use {{axis: 'dim'}} or a list of axes"
                )
            for a, dim in items:
                if isinstance(a, bool) or not isinstance(a, int) or not -rank <= a < rank:
                    raise ConfigError(
                        f"dynamic_axes[{name!r}]: axis {a!r} is out of range for {name!r} of "
                        f"shape {list(sizes[name])} (rank {rank})"
                    )
                if not isinstance(dim, str) or not dim:
                    raise ConfigError(
                        f"dynamic_axes[{name!r}][{a}]={dim!r}: name the dimension with a string"
                    )
                axes.setdefault(name, {})[a % rank] = dim
    return IOSpec(tuple(ins), tuple(outs), axes, sizes)


@torch.no_grad()
def trace(
    qmodel: nn.Module,
    example_input,
    twin=None,
    *,
    input_names=None,
    output_names=None,
    dynamic_axes=None,
    marks=(),
) -> tuple[onnx.ModelProto, list[QuantizedLayer]]:
    """The marked ONNX graph of ``qmodel`` traced on ``example_input`` and its quantized layers
    in marker-index order; ``qmodel`` itself is not changed.

    ``example_input``: a tensor, a tuple of tensors or a dict of keyword tensors (see
    :func:`example_args`); ``input_names``, ``output_names``, ``dynamic_axes``: see
    :func:`io_spec` (default: the batch axis of every input and output is dynamic). The graph's
    inputs carry the dynamic axes as ``dim_param``. ``twin(ql, idx) -> nn.Module``
    makes each layer's stand-in (default: :class:`TracedLayer` with unmarked weights).
    ``marks``: names of modules (not quantized layers) whose floating-point output, at every
    call, gets a marker ``kind="mod"``, ``idx`` = the name's position in ``marks`` (where a
    shared input quantizer would mark it ``"tq"``: see :func:`rewrite_markers`). Raises
    :class:`UnsupportedLayerError` naming the module the exporter failed in, and
    :class:`ConfigError` for bad names or axes.
    """
    model = copy.deepcopy(qmodel).eval()
    if getattr(qmodel, OPS_ATTR, None) is not None and getattr(model, OPS_ATTR, None) is None:
        # a torch.fx.GraphModule's deepcopy drops attributes and hooks: op_quantizers re-hooks
        setattr(model, OPS_ATTR, copy.deepcopy(getattr(qmodel, OPS_ATTR)))
    ops = op_quantizers(model)
    if ops is not None:  # every site marks its output (kind "op")
        ops.tracing = True
    args, keywords = example_args(model, example_input)
    qls = list(quantized_layers(model).values())  # module order: the marker indices
    names = {m: n for n, m in model.named_modules()}
    make = twin or (lambda ql, i: TracedLayer(ql, i))
    for i, ql in enumerate(qls):
        ql.trace_idx = i  # shared input quantizers (module hooks) mark their tensor with it
        parent, _, child = names[ql].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(ql, i))
    for k, name in enumerate(marks):
        model.get_submodule(name).register_forward_hook(_module_mark(k))
    tensors = [(a, k) for a, k in zip(args, keywords, strict=True) if isinstance(a, torch.Tensor)]
    outputs = _flat_tensors(model(*args))
    spec = io_spec(
        qmodel,
        [a for a, _ in tensors],
        [k for _, k in tensors],
        outputs,
        input_names,
        output_names,
        dynamic_axes,
    )

    # which module was being traced when the exporter failed (for the error message)
    stack: list[str] = []
    handles = []
    mod_names = {m: n for n, m in model.named_modules()}

    def enter(mod, _inp):
        stack.append(mod_names[mod])

    def leave(_mod, _inp, _out):
        stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                buf,
                dynamo=False,
                opset_version=TRACE_OPSET,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                custom_opsets={DOMAIN: 1},
                do_constant_folding=True,
            )
    except OmseError:
        raise
    except Exception as e:
        for h in handles:
            h.remove()
        handles = []
        where = stack[-1] if stack and stack[-1] else _find_op_module(model, args, str(e))
        where_s = (
            f" in module {where!r} ({type(model.get_submodule(where)).__name__})" if where else ""
        )
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UnsupportedLayerError(
            f"the model cannot be exported to ONNX{where_s}: {msg}"
        ) from None
    finally:
        for h in handles:
            h.remove()
    proto = onnx.load_from_string(buf.getvalue())
    _declare_io_shapes(proto, spec)
    return proto, qls


def _module_mark(k: int):
    """The forward hook of :func:`trace`'s ``marks``: the module's floating-point output marked
    ``kind="mod"``, ``idx=k`` (as :class:`~omse.nn.layers.SharedInputQuantizer` marks it)."""

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        return Marker.apply(output, output, "mod", k, 0)

    return hook


def rewrite_markers(model: onnx.ModelProto, edit) -> onnx.ModelProto | None:
    """A copy of ``model`` (a graph from :func:`trace`) in which every ``omse::Marker`` node is
    kept, retagged or removed: ``edit(kind, idx)`` returns ``(kind, idx)`` for the node to
    carry, or None to remove it (each reader of its output, and a graph output, then takes its
    input). Returns None where a removed marker reads a value that no graph input reaches (a
    constant: without the marker the exporter would have folded the ops that made it), or the
    graph has subgraphs: the copy could then differ from a trace without those markers."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in g.node for a in n.attribute):  # fmt: skip
        return None
    live = {i.name for i in g.input} - {t.name for t in g.initializer}
    for n in g.node:
        if any(i in live for i in n.input if i):
            live.update(o for o in n.output if o)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    alias: dict[str, str] = {}
    for n in g.node:
        node = out.graph.node.add()
        node.CopyFrom(n)
        for j, i in enumerate(node.input):
            if i in alias:
                node.input[j] = alias[i]
        if n.domain != DOMAIN:
            continue
        kind, idx, term = marker_attrs(n)
        new = edit(kind, idx)
        if new is None:
            if n.input[0] not in live:
                return None
            alias[n.output[0]] = node.input[0]
            del out.graph.node[-1]
        elif new != (kind, idx):
            del node.attribute[:]
            node.attribute.extend(
                [
                    helper.make_attribute("kind", new[0]),
                    helper.make_attribute("idx", new[1]),
                    helper.make_attribute("term", term),
                ]
            )
    for o in out.graph.output:
        o.name = alias.get(o.name, o.name)
    return out


def _declare_io_shapes(model: onnx.ModelProto, spec: IOSpec) -> None:
    """Write the graph's input shapes as ``spec`` has them (a dynamic axis as its ``dim_param``,
    every other axis the example's size) and its outputs' dynamic axes. An output axis the
    exporter could not infer (it names the dims of a custom op's output ``Marker..._dim_k``)
    and that is not declared dynamic is left unnamed: its size may follow an input's.

    The exporter's intermediate ``value_info`` is dropped: it names the dims of every tensor
    behind a custom op after that op's *input* (a stride-2 convolution's output gets its input's
    ``height``), so with dynamic spatial axes two tensors of different sizes share a
    ``dim_param`` and onnxruntime's buffer planner fails ("Shape mismatch attempting to re-use
    buffer"). onnxruntime and OpenVINO infer intermediate shapes themselves."""
    del model.graph.value_info[:]
    inputs = {vi.name for vi in model.graph.input}
    for vi in list(model.graph.input) + list(model.graph.output):
        size = spec.sizes.get(vi.name)
        if size is None or not vi.type.HasField("tensor_type"):
            continue
        dyn = spec.dynamic_axes.get(vi.name, {})
        shape = vi.type.tensor_type.shape
        old = list(shape.dim) if len(shape.dim) == len(size) else [None] * len(size)
        del shape.dim[:]
        for a, n in enumerate(size):
            d = shape.dim.add()
            if a in dyn:
                d.dim_param = dyn[a]
            elif vi.name in inputs:
                d.dim_value = n
            elif old[a] is not None and old[a].HasField("dim_value"):
                d.dim_value = old[a].dim_value


def shared_input_candidates(model: onnx.ModelProto) -> list[int]:
    """Layers whose input quantizer reads a tensor that other nodes read too and that is not a
    quantized layer's output (a residual block's output, read by the next block's first layer
    and by its skip connection): quantizing that tensor once, for every reader, lets an integer
    runtime run the residual ``Add`` as an integer kernel (``QLinearAdd``). Not where the
    other readers are float ops only (:func:`integer_reader`: a transformer's LayerNorm output,
    read by the next attention's projections and by the residual ``Add`` into the next
    LayerNorm): the float readers keep the float tensor."""
    g = model.graph
    readers = consumers(g)
    producers = {o: n for n in g.node for o in n.output}
    inputs = {i.name for i in g.input}
    out = []
    for node in g.node:
        if node.domain != DOMAIN or marker_attrs(node)[0] != "act":
            continue
        t = node.input[0]
        users = [u for u in readers.get(t, []) if u.op_type not in _SHAPE_READERS]
        src = producers.get(t)
        if len(users) < 2 or t in inputs or src is None:
            continue
        if src.domain == DOMAIN:  # a quantized layer's output: its output quantizer is shared
            continue
        others = [u for u in users if not _is_quantizer(u)]
        if others and not integer_reader(g, t, readers):
            continue  # the other readers are float ops (a LayerNorm's residual Add): float there
        out.append(marker_attrs(node)[1])
    return out


def input_groups(model: onnx.ModelProto) -> list[list[int]]:
    """The layers whose input quantizers read one tensor, in graph order (groups of >= 2)."""
    groups: dict[str, list[int]] = {}
    for node in model.graph.node:
        if node.domain == DOMAIN and marker_attrs(node)[0] == "act":
            groups.setdefault(node.input[0], []).append(marker_attrs(node)[1])
    return [g for g in groups.values() if len(g) >= 2]


def _is_quantizer(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and marker_attrs(node)[0] in ("act", "tq")


def _reaches_quantizer(
    g: onnx.GraphProto, t: str, readers: dict[str, list[onnx.NodeProto]], depth: int = 0
) -> bool:
    """Whether some reader of ``t`` is a quantizer marker, directly or through
    :data:`TRANSPARENT` ops (then an integer runtime has the tensor in 8 bits there)."""
    if depth > 64:
        return False
    for u in readers.get(t, []):
        if _is_quantizer(u):
            return True
        transparent = u.domain == "" and u.op_type in TRANSPARENT and u.input[:1] == [t]
        if transparent and _reaches_quantizer(g, u.output[0], readers, depth + 1):
            return True
    return False


def integer_reader(
    g: onnx.GraphProto, t: str, readers: dict[str, list[onnx.NodeProto]] | None = None
) -> bool:
    """Whether an integer runtime would run a reader of tensor ``t`` (other than the quantized
    layers' own input quantizers) on 8-bit values: an op of :data:`INTEGER_OPS` whose output
    reaches a quantizer (a residual ``Add`` into the next block's quantized input runs as
    ``QLinearAdd``). Where every reader is a float op (``LayerNormalization``, ``Softmax``, an
    activation ``MatMul``, ``Gelu``, an ``Add`` into a LayerNorm), quantizing ``t`` itself only
    loses precision: the runtime dequantizes it at once."""
    readers = consumers(g) if readers is None else readers
    for u in readers.get(t, []):
        if u.op_type in _SHAPE_READERS or _is_quantizer(u):
            continue
        integer = u.domain == "" and u.op_type in INTEGER_OPS
        if integer and any(_reaches_quantizer(g, o, readers) for o in u.output):
            return True
    return False


def marker_attrs(node: onnx.NodeProto) -> tuple[str, int, int]:
    """``(kind, layer index, term)`` of an ``omse::Marker`` node."""
    a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    kind = a["kind"].decode() if isinstance(a["kind"], bytes) else a["kind"]
    return kind, int(a["idx"]), int(a["term"])


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (in graph order)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def const_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` if it is an initializer or a ``Constant`` output, else None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t) if n.attribute[0].t else None
    return None


_NOT_FOLDED = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform", "Multinomial"}


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate (with ``onnx.reference``) every standard node whose inputs are all constant and
    replace it by initializers: shape arithmetic that torch traced for a fixed input size (a
    static "same" padding's ``ConstantOfShape -> Concat -> Slice -> Transpose -> Cast``) becomes
    constants. A node that reads a computed tensor (its ``Shape`` included) is kept, so the
    result runs at every size of the graph's dynamic axes (see the module docstring).
    Quantize/Dequantize nodes stay (runtimes fuse them). Returns the nodes removed."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    keep, new_inits, removed = [], [], 0
    for node in g.node:
        if node.op_type == "Constant" and node.domain == "" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            new_inits.append(numpy_helper.from_array(values[node.output[0]], node.output[0]))
            removed += 1
            continue
        ins = [i for i in node.input if i]
        if (
            node.domain == ""
            and node.op_type not in _NOT_FOLDED
            and ins
            and all(i in values for i in ins)
        ):
            try:
                res = ReferenceEvaluator(node).run(None, {i: values[i] for i in ins})
            except Exception:  # an op the reference runtime lacks: keep the node
                keep.append(node)
                continue
            for name, v in zip(node.output, res, strict=True):
                values[name] = np.asarray(v)
                new_inits.append(numpy_helper.from_array(np.asarray(v), name))
            removed += 1
            continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return removed


def fold_pads(model: onnx.ModelProto) -> int:
    """``Pad(x, constant zeros on H/W) -> Conv`` becomes ``Conv(pads=...)`` where the Conv is the
    Pad's only reader (QDQ fusion needs ``DequantizeLinear -> Conv``). Returns the Pads removed."""
    g = model.graph
    readers = consumers(g)
    inits = {i.name: i for i in g.initializer}
    drop = set()
    for node in g.node:
        if node.op_type != "Pad" or len(node.input) < 2:
            continue
        mode = next(
            (helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b""
        )
        if mode not in (b"", b"constant", "constant"):
            continue
        if node.input[1] not in inits:
            continue
        if len(node.input) > 2 and node.input[2]:
            v = const_value(g, node.input[2])
            if v is None or np.any(v != 0):
                continue
        if len(node.input) > 3 and node.input[3]:
            continue  # axes: not written by torch's exporter
        pads = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64).tolist()
        r = len(pads) // 2
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != node.output[0]:
            continue
        if any(p < 0 for p in pads) or pads[0] or pads[1] or pads[r] or pads[r + 1]:
            continue  # only spatial, non-negative padding folds into the Conv
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and helper.get_attribute_value(attrs["auto_pad"]) not in (
            b"NOTSET",
            "NOTSET",
        ):
            continue
        old = (
            list(helper.get_attribute_value(attrs["pads"]))
            if "pads" in attrs
            else [0] * (2 * (r - 2))
        )
        sp = r - 2
        new = [old[k] + pads[2 + k] for k in range(sp)] + [
            old[sp + k] + pads[r + 2 + k] for k in range(sp)
        ]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = node.input[0]
        drop.add(id(node))
    keep = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(keep)
    return len(drop)


@dataclass(frozen=True)
class Route:
    """Where a quantized layer's output goes (see the module docstring).

    ``kind``: ``"fused"``, ``"graph_output"`` or ``"output"``; ``consumer``: the index of the
    layer whose input quantizer it reaches (``"fused"``); ``chain``: the op types in between;
    ``clamp``: ``(lo, hi)`` the ``Relu``/``Clip`` ops right after the layer impose (``-inf``,
    ``inf`` where none); ``reader``: the op that stops the route (for messages); ``shared``
    (``"output"``): the layers whose input quantizer reads the tensor where the route stops,
    beside other readers (they can share the layer's output quantizer: one scale per tensor);
    ``integer_reader`` (``"output"``): whether an op other than those input quantizers would run
    on the 8-bit tensor there (:func:`integer_reader`); where none would, an integer kernel
    with a float output (a Linear's ``MatMulIntegerToFloat`` / ``QGemm``) needs no output
    quantizer. ``silu`` (``"output"``): the tensor is read only by a SiLU, ``x * Sigmoid(x)``
    (:func:`is_silu`): what matters downstream is ``silu(Q(y))``, which the far negative tail
    of ``y`` does not reach (see :data:`SILU_FLOOR`).
    """

    kind: str
    consumer: int | None = None
    chain: tuple[str, ...] = ()
    clamp: tuple[float, float] = (-float("inf"), float("inf"))
    reader: str = ""
    shared: tuple[int, ...] = ()
    consumer_kind: str = "act"
    integer_reader: bool = True
    silu: bool = False


def _clip_range(graph: onnx.GraphProto, node: onnx.NodeProto) -> tuple[float, float]:
    if node.op_type == "Relu":
        return 0.0, float("inf")
    lo, hi = -float("inf"), float("inf")
    if len(node.input) > 1 and node.input[1]:
        v = const_value(graph, node.input[1])
        lo = float(v) if v is not None else lo
    if len(node.input) > 2 and node.input[2]:
        v = const_value(graph, node.input[2])
        hi = float(v) if v is not None else hi
    return lo, hi


SILU_FLOOR = -8.0
"""Where a SiLU's input stops mattering: ``silu(x)`` for every ``x <= -8`` lies within
``|silu(-8)| = 2.7e-3`` of 0 (and of ``silu(-8)``), so clamping a pre-SiLU tensor at ``-8`` before
it is quantized changes the SiLU's output by less than 2.7e-3 (it increases towards 0 below its
minimum at -1.28). A pre-SiLU output quantizer is calibrated on the clamped values: a
convolution's pre-activations reach -80 on channels the SiLU sends to 0, and a range that covers
them coarsens the step of every value the SiLU passes on."""


def is_silu(graph: onnx.GraphProto, t: str, users: list[onnx.NodeProto]) -> bool:
    """Whether the only readers of ``t`` are a ``Sigmoid(t)`` and a ``Mul`` of ``t`` with that
    sigmoid: a SiLU (swish) as torch exports ``x * sigmoid(x)`` (YOLOX, YOLOv5-8,
    EfficientNet)."""
    if len(users) != 2 or {u.op_type for u in users} != {"Sigmoid", "Mul"}:
        return False
    sig = next(u for u in users if u.op_type == "Sigmoid")
    mul = next(u for u in users if u.op_type == "Mul")
    return sig.domain == "" and mul.domain == "" and sorted(mul.input) == sorted([t, sig.output[0]])


def float_output(ql: QuantizedLayer, route: Route) -> bool:
    """Whether ``target="int8"`` leaves layer ``ql``'s output float: a Linear (an integer
    ``MatMul``/``Gemm`` with a float output exists in every int8 runtime; an integer convolution
    always requantizes) whose output no integer op reads (:attr:`Route.integer_reader`).
    ``target="tflite"`` never does: TFLite's int8 FULLY_CONNECTED writes an int8 output."""
    return (
        ql.cfg.target == "int8"
        and isinstance(ql.layer, nn.Linear)
        and route.kind == "output"
        and not route.integer_reader
    )


def layer_routes(model: onnx.ModelProto) -> dict[int, Route]:
    """The :class:`Route` of every marked layer output of a graph from :func:`trace`."""
    g = model.graph
    readers = consumers(g)
    outputs = {o.name for o in g.output}
    routes: dict[int, Route] = {}
    for node in g.node:
        if node.domain != DOMAIN or marker_attrs(node)[0] != "out":
            continue
        idx = marker_attrs(node)[1]
        t = node.output[0]
        chain: list[str] = []
        lo, hi = -float("inf"), float("inf")
        narrowing = True  # Relu/Clip directly after the layer narrow its output range
        while True:
            if t in outputs:
                routes[idx] = Route("graph_output", chain=tuple(chain), clamp=(lo, hi))
                break
            users = [u for u in readers.get(t, []) if u.op_type not in _SHAPE_READERS]
            if len(users) != 1:
                why = f"{len(users)} readers" if users else "no reader"
                shared = tuple(
                    marker_attrs(u)[1]
                    for u in users
                    if u.domain == DOMAIN and marker_attrs(u)[0] in ("act", "tq")
                )
                routes[idx] = Route(
                    "output",
                    chain=tuple(chain),
                    clamp=(lo, hi),
                    reader=why,
                    shared=shared,
                    integer_reader=integer_reader(g, t, readers),
                    silu=is_silu(g, t, users),
                )
                break
            u = users[0]
            if u.domain == DOMAIN and marker_attrs(u)[0] == "op":
                t = u.output[0]  # a site marker (omse.nn.ops): the same tensor
                continue
            if u.domain == DOMAIN and marker_attrs(u)[0] in ("act", "tq"):
                kind, j, _ = marker_attrs(u)
                routes[idx] = Route("fused", j, tuple(chain), (lo, hi), consumer_kind=kind)
                break
            if u.domain != "" or u.op_type not in TRANSPARENT or u.input[0] != t:
                routes[idx] = Route(
                    "output",
                    chain=tuple(chain),
                    clamp=(lo, hi),
                    reader=u.op_type,
                    integer_reader=integer_reader(g, t, readers),
                )
                break
            if u.op_type == "Pad":
                v = const_value(g, u.input[2]) if len(u.input) > 2 and u.input[2] else 0
                if v is None or np.any(np.asarray(v) != 0):
                    routes[idx] = Route("output", chain=tuple(chain), clamp=(lo, hi), reader="Pad")
                    break
            if u.op_type in ("Relu", "Clip") and narrowing:
                a, b = _clip_range(g, u)
                lo, hi = max(lo, a), min(hi, b)
            elif u.op_type not in ("Relu", "Clip"):
                narrowing = False
            chain.append(u.op_type)
            t = u.output[0]
    return routes
