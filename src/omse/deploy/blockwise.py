"""Models larger than memory: quantized block by block from safetensors weights.

:func:`quantize_blockwise` takes a model *skeleton* (a module whose parameters may sit on the
``meta`` device, or a zero-argument builder, called with parameters created on ``meta``: no
weight memory) and its weights in safetensors: one file, or Hugging Face-style shards with a
``*.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``). The model is split
into **units**: the *blocks* (its largest ``nn.ModuleList``/``nn.Sequential`` run of modules of
one type, e.g. ``model.layers``, or the modules ``blocks=`` names), the *stem* (what runs before
the first block: embeddings, a conv stem) and the *head* (what runs after the last: norm,
classifier). Then, with every calibration activation kept in memory:

1. the stem's tensors are read (the stem is found by running the model up to the first block
   on ``meta`` tensors), the stem is quantized with :func:`omse.quantize` on the calibration
   batches, and run to capture the first block's inputs (its first positional argument, plus
   whatever else the model passes it, an attention mask, ...);
2. for each block ``i``: its tensors alone are read (``safetensors.safe_open``, tensor by
   tensor, the shard closed after), it is quantized with :func:`omse.quantize` on the inputs the
   already-quantized units before it produce, run on them to give block ``i + 1``'s inputs, its
   packed checkpoint is written (:func:`omse.save`'s format), and it is freed;
3. the head's tensors are read and the head is quantized on the last block's outputs.

**Memory bound**: peak RSS ~ baseline + the stem (and at the end the head) + the largest block's
quantization working set (its FP32 weights, :func:`omse.quantize`'s copy, the quantized terms and,
for recipes with residual tensors or GPTQ, each layer's patch moments, ``8 * in^2`` bytes per
Linear) + two streams of calibration activations (block inputs and outputs, ``batches x
[batch, ..., hidden]`` each, a third with ``compare=True``). It does not grow with the number of
blocks (``tests/deploy/test_blockwise.py`` runs a model whose FP32 weights are 4x the peak RSS
the process adds above a warmed-up baseline; ``benchmarks/blockwise.py`` measures peak RSS
against model size). The heap is trimmed after each block (:func:`omse.runtime.trim_heap`).

**What "per block" means.** Each unit is one :func:`omse.quantize` call, so every step that works
within a unit works as in memory: BatchNorm folding (a BatchNorm after a conv of the same block),
the weight solve, GPTQ and learned rounding (layer after layer within the block, on the inputs the
quantized blocks before it produce), activation scales, bias correction. Two things differ from
``omse.quantize(whole_model)`` by design:

- calibration: block ``i`` is calibrated on the outputs of the quantized blocks before it, weights
  *and* activations quantized (the sequential scheme of GPTQ-style tools), while the whole-model
  pipeline computes every layer's activation scale in one pass with the upstream activations in
  float (and bias correction sees upstream biases uncorrected). Both are valid; only recipes
  that do not use calibration data across units (``act_bits=None``, ``rounding="nearest"``,
  ``extra_mac_budget=0``, ``bias_correction=False``) give the same model both ways (a test
  checks it);
- ``extra_mac_budget`` applies per unit: each unit's residual tensors cost at most ``budget`` x
  its own MACs (the model's total stays within ``budget`` x its MACs, spread evenly over units
  rather than chosen by one model-wide ranking).

Refused with a :class:`~omse.errors.ConfigError` naming the option, because they trace the whole
model: ``equalize=True`` (cross-layer equalization pairs layers across block boundaries) and
``target="int8"`` (the output-quantizer plan decides from where each layer's output goes, across
blocks). The in-memory counterpart with the same semantics is this function without ``weights=``
on a model held in memory: the block-by-block run from files gives it bit for bit.

**Assumptions, checked on the first batch**: the blocks are called in order, each once, block
``i + 1`` on block ``i``'s output (its first element if a tuple) with the same other arguments as
block 0 (a :class:`~omse.errors.ConfigError` names the block and argument otherwise); nothing is
computed between two blocks.

**Output** (written atomically: a temporary folder renamed onto ``out`` at the end): ``out/``
holds ``omse-blockwise.json`` (format, version, the :class:`~omse.config.QuantConfig`, the
units and their files with each file's SHA-256 from its header), ``rest.omse.safetensors`` (the
stem and head: the model without its blocks) and ``block-00000.omse.safetensors``, ... (one
packed checkpoint per block, each readable by :func:`omse.deploy.checkpoint.load` with the block
module as ``model=``). :func:`load_blockwise` rebuilds the whole quantized model;
:func:`run_blockwise` runs it on batches one block at a time (the same memory bound).

Why safetensors: a tensor is read by name without reading the rest of the file (the header gives
its offset), and loading never unpickles (a pickle file is refused).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import gc
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import INTEGER_TARGETS, QuantConfig
from ..errors import CheckpointError, ConfigError, OmseError
from ..io import atomic_dir, atomic_write_text
from ..nn.layers import WRAPPABLE, QuantizedLayer
from ..runtime import progress as progress_bar
from ..runtime import trim_heap
from ..transforms.fold import _set_module
from ..transforms.pipeline import Calibration, prepare_batches, quantize
from . import checkpoint

__all__ = [
    "quantize_blockwise",
    "load_blockwise",
    "run_blockwise",
    "find_blocks",
    "empty_model",
    "WeightSource",
    "BlockwiseResult",
    "FORMAT",
    "VERSION",
    "INDEX",
]

FORMAT = "omse-blockwise"
VERSION = 1
INDEX = "omse-blockwise.json"
"""The index file's name inside the output folder."""
_REST = "rest.omse.safetensors"
_FLOAT_KEY = "omse-blockwise-float"


# -- weights ------------------------------------------------------------------------------------
def _safetensors_error(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"weights file {path} is not a readable safetensors file: {e}")


def _refuse_pickle(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head == b"PK\x03\x04":
        raise CheckpointError(
            f"weights file {path} is a pickle / torch.save file; block-by-block quantization "
            "reads safetensors only (omse never unpickles): convert it with "
            "safetensors.torch.save_file"
        )


class WeightSource:
    """Tensors by name from one safetensors file or Hugging Face-style shards, read lazily.

    ``path``: a ``.safetensors`` file, a ``*.safetensors.index.json`` (its ``weight_map`` maps
    each tensor name to a shard file next to it) or a folder holding exactly one of either.
    Only the headers are read here (names, shapes, dtypes); :meth:`read` reads the tensors it is
    asked for, opening each shard once per call and closing it after (so a block's pages do not
    stay mapped).

    Raises:
        CheckpointError: a missing file or shard, a pickle file, an unreadable header, or an index
            that maps a tensor to a shard that lacks it (each message names the file).
    """

    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"weights {p} does not exist")
        if p.is_dir():
            found = sorted(p.glob("*.safetensors.index.json")) or sorted(p.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(
                    f"weights folder {p} holds {len(found)} *.safetensors.index.json / "
                    "*.safetensors files; name the file (or the index) itself"
                )
            p = found[0]
        self.path = p
        self.files: dict[str, Path] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        if p.name.endswith(".json"):
            self._read_index(p)
        else:
            for name, shape in self._header(p).items():
                self.files[name] = p
                self.shapes[name] = shape

    def _header(self, file: Path) -> dict[str, tuple[int, ...]]:
        from safetensors import SafetensorError, safe_open

        _refuse_pickle(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _safetensors_error(file, e) from None

    def _read_index(self, index: Path) -> None:
        try:
            doc = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"weights index {index} is not valid JSON: {e}") from None
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
        ):
            raise CheckpointError(
                f"weights index {index} has no weight_map {{tensor name: shard file}} (the "
                "Hugging Face *.safetensors.index.json layout)"
            )
        shards: dict[str, list[str]] = {}
        for name, shard in wm.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            file = index.parent / shard
            if not file.is_file():
                raise CheckpointError(
                    f"shard {file} (named by {index} for {len(names)} tensors, e.g. "
                    f"{names[0]!r}) does not exist"
                )
            header = self._header(file)
            for name in names:
                if name not in header:
                    raise CheckpointError(
                        f"tensor {name!r}: {index} maps it to {file}, which does not hold it"
                    )
                self.files[name] = file
                self.shapes[name] = header[name]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors (each a fresh CPU tensor of the file's dtype)."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise CheckpointError(f"tensor {n!r} is in none of the weights files ({self.path})")
            by_file.setdefault(self.files[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, ns in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for n in ns:
                        out[n] = f.get_tensor(n)
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise _safetensors_error(file, e) from None
        return out


# -- the skeleton -------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to the ``meta`` device (buffers stay real: a
    non-persistent buffer, e.g. rotary frequencies, is not in the weights files)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(builder: Callable[[], nn.Module]) -> nn.Module:
    """``builder()`` with its parameters on the ``meta`` device: the skeleton, no weight memory.

    Examples:
        >>> import torch
        >>> from omse.deploy.blockwise import empty_model
        >>> m = empty_model(lambda: torch.nn.Linear(50_000, 50_000))  # 10 GB in FP32
        >>> m.weight.device, tuple(m.weight.shape)
        (device(type='meta'), (50000, 50000))
    """
    with _parameters_on_meta():
        model = builder()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"the model builder returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values())


def find_blocks(model: nn.Module, blocks: str | Iterable[str] | None = None) -> list[str]:
    """The module names of ``model``'s blocks, in order.

    ``blocks=None``: the longest-by-parameters run of two or more consecutive modules of one type
    in any ``nn.ModuleList``/``nn.Sequential`` (``layers.0 .. layers.N``). A string naming a
    ``ModuleList``/``Sequential``: its children. Otherwise ``fnmatch`` patterns of module names
    (``["layer*.*"]``): the outermost matching modules, in the model's order.

    Examples:
        >>> import torch
        >>> from omse.deploy.blockwise import find_blocks
        >>> mlp = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), mlp(), mlp(), mlp(), torch.nn.Linear(8, 2))
        >>> find_blocks(net)
        ['1', '2', '3']
    """
    mods = dict(model.named_modules())
    if blocks is None:
        best: tuple[int, list[str]] | None = None
        for cname, c in mods.items():
            if not isinstance(c, nn.ModuleList | nn.Sequential):
                continue
            kids = list(c.named_children())
            i = 0
            while i < len(kids):
                j = i
                while j + 1 < len(kids) and type(kids[j + 1][1]) is type(kids[i][1]):
                    j += 1
                run = kids[i : j + 1]
                size = sum(p.numel() for _, m in run for p in m.parameters())
                if len(run) >= 2 and size > 0 and (best is None or size > best[0]):
                    best = (size, [f"{cname}.{n}" if cname else n for n, _ in run])
                i = j + 1
        if best is None:
            raise ConfigError(
                "found no blocks: the model has no nn.ModuleList/nn.Sequential holding two or "
                "more modules of one type with parameters; name them with blocks= (e.g. "
                "blocks='layers' or blocks=['encoder.layer.*'])"
            )
        return best[1]
    if isinstance(blocks, str) and isinstance(mods.get(blocks), nn.ModuleList | nn.Sequential):
        return [f"{blocks}.{n}" for n, _ in mods[blocks].named_children()]
    patterns = [blocks] if isinstance(blocks, str) else list(blocks)
    out: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str):
            raise ConfigError(f"blocks={blocks!r}: every pattern must be a string")
        hits = [n for n in mods if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            lists = [
                n for n, m in mods.items() if n and isinstance(m, nn.ModuleList | nn.Sequential)
            ]
            raise ConfigError(
                f"blocks pattern {pat!r} matches no module of {type(model).__name__}; its "
                f"ModuleLists/Sequentials: {lists[:8]}"
            )
        out += [n for n in hits if n not in out]
    top = [n for n in out if not any(n.startswith(o + ".") for o in out)]
    return [n for n in mods if n in top]  # the model's order


# -- units: the model without its blocks, and its block slots ----------------------------------
class _Stop(Exception):
    """Raised by a slot to end a forward pass once what was wanted is captured."""


class _Control:
    """What the block slots of one rest model do when called (shared by its slots)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.mode = "capture"
        self.captured: tuple[tuple, dict] | None = None
        self.value: Any = None
        self.check: tuple[tuple, dict] | None = None  # block 0's (other args, kwargs)
        self.calls: list[int] = []

    def __call__(self, index: int, args: tuple, kwargs: dict):
        if self.mode == "capture":
            if index != 0:
                raise ConfigError(
                    f"the model called block {self.names[index]!r} before "
                    f"{self.names[0]!r}: the blocks must run in order"
                )
            self.captured = (args, kwargs)
            raise _Stop
        expect = len(self.calls)
        if index != expect:
            raise ConfigError(
                f"the model called block {self.names[index]!r} where block "
                f"{self.names[expect] if expect < len(self.names) else '(none)'!r} was due: "
                "the blocks must each run once, in order"
            )
        if self.check is not None and index > 0:
            _check_chain(self.names[index], self.names[index - 1], args, kwargs, self)
        self.calls.append(index)
        if self.mode == "stop-last" and index == len(self.names) - 1:
            raise _Stop
        return self.value


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(
        f"a block returned {type(out).__name__}; block-by-block quantization needs a tensor or a "
        "tuple whose first item is the next block's input"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _check_chain(name: str, prev: str, args: tuple, kwargs: dict, ctl: _Control) -> None:
    """Block ``name`` must get block ``prev``'s output (its first item) and block 0's other
    arguments."""
    if not args or args[0] is not _first(ctl.value):
        raise ConfigError(
            f"block {name!r} is not called on the output of block {prev!r} (the model computes "
            "something between them); block-by-block quantization needs blocks that feed each "
            "other directly: name other blocks with blocks= or quantize in memory"
        )
    rest0, kw0 = ctl.check  # type: ignore[misc]
    if len(args) != len(rest0) + 1 or set(kwargs) != set(kw0):
        raise ConfigError(f"block {name!r} is called with other arguments than block 0")
    for i, (a, b) in enumerate(zip(args[1:], rest0, strict=True), start=1):
        if not _same(a, b):
            raise ConfigError(f"block {name!r} gets another positional argument {i} than block 0")
    for k in kwargs:
        if not _same(kwargs[k], kw0[k]):
            raise ConfigError(f"block {name!r} gets another argument {k!r} than block 0")


class _Slot(nn.Module):
    """Stands in for a block in the rest model: no state; does what its control says."""

    def __init__(self, index: int, control: _Control):
        super().__init__()
        self.index = index
        self.control = control

    def forward(self, *args, **kwargs):
        return self.control(self.index, args, kwargs)


def _rest_model(model: nn.Module, blocks: list[str]) -> tuple[nn.Module, _Control]:
    """A copy of ``model`` with every block replaced by a :class:`_Slot` (blocks not copied)."""
    ctl = _Control(blocks)
    memo: dict[int, Any] = {id(ctl): ctl}
    for i, n in enumerate(blocks):
        memo[id(model.get_submodule(n))] = _Slot(i, ctl)
    rest = copy.deepcopy(model, memo)
    return rest.eval(), ctl


def _control(rest: nn.Module) -> _Control:
    for m in rest.modules():
        if isinstance(m, _Slot):
            return m.control
    raise OmseError("internal: the rest model has no block slot")  # pragma: no cover


def _call(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


class _UpTo(nn.Module):
    """The stem as a model: runs ``rest`` up to the first block and returns that block's first
    positional argument."""

    def __init__(self, rest: nn.Module):
        super().__init__()
        self.m = rest
        self.eval()

    def forward(self, *args, **kwargs):
        ctl = _control(self.m)
        ctl.mode = "capture"
        try:
            self.m(*args, **kwargs)
        except _Stop:
            return _first(ctl.captured[0]) if ctl.captured[0] else None  # type: ignore[index]
        raise ConfigError(f"the model returned without calling its first block {ctl.names[0]!r}")


class _After(nn.Module):
    """The head as a model: runs ``rest`` with every block slot returning ``value`` (the last
    block's output for this batch); takes ``{"batch": model inputs, "value": ...}``."""

    def __init__(self, rest: nn.Module):
        super().__init__()
        self.m = rest
        self.eval()

    def forward(self, batch, value):
        ctl = _control(self.m)
        ctl.mode, ctl.value, ctl.calls, ctl.check = "replay", value, [], None
        return _call(self.m, batch)


class _Bound(nn.Module):
    """A block called with more than one argument, as a model of dict batches
    ``{"x": input, "args": (...), **kwargs}``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.eval()

    def forward(self, x, args=(), **kwargs):
        return self.block(x, *args, **kwargs)


# -- loading a unit's tensors ------------------------------------------------------------------
def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every state entry's name -> all names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(n)
    return {n: names for names in by_id.values() for n in names}


def _state_slots(unit: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """state-dict key -> (owning module, attribute, is parameter) for ``unit``."""
    out = {}
    for mname, m in unit.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for k, p in m._parameters.items():
            if p is not None:
                out[pre + k] = (m, k, True)
        for k, b in m._buffers.items():
            if b is not None and k not in m._non_persistent_buffers_set:
                out[pre + k] = (m, k, False)
    return out


def _resolve(source: WeightSource, full: str, aliases: dict[str, list[str]]) -> str:
    for n in aliases.get(full, [full]):
        if n in source:
            return n
    others = [a for a in aliases.get(full, []) if a != full]
    tied = f" (nor its tied names {others})" if others else ""
    raise CheckpointError(f"tensor {full!r}{tied} is in none of the weights files ({source.path})")


def _check_source(model: nn.Module, source: WeightSource) -> None:
    """Before any work: every tensor the model needs is in the files, with its shape."""
    aliases = _aliases(model)
    needed = set()
    for full, t in model.state_dict(keep_vars=True).items():
        name = _resolve(source, full, aliases)
        needed.add(name)
        if tuple(t.shape) != source.shapes[name]:
            raise CheckpointError(
                f"tensor {name!r} in {source.files[name]} has shape {list(source.shapes[name])}, "
                f"the model's {full!r} is {list(t.shape)}"
            )
    extra = sorted(set(source.files) - needed)
    if extra:
        warnings.warn(
            f"{len(extra)} tensors of the weights files are not used by the model, e.g. "
            f"{extra[:3]}",
            stacklevel=3,
        )


@torch.no_grad()
def _materialize(
    unit: nn.Module,
    prefix: str,
    source: WeightSource | None,
    aliases: dict[str, list[str]],
    only: Callable[[str], bool] | None = None,
) -> int:
    """Replace ``unit``'s meta tensors (state entries ``prefix + key`` passing ``only``) by the
    files' tensors (``source``) or by uninitialised CPU tensors (``source=None``, for loading a
    checkpoint into). Returns the bytes materialized."""
    todo = {
        k: v
        for k, v in _state_slots(unit).items()
        if getattr(v[0], "_parameters" if v[2] else "_buffers")[v[1]].device.type == "meta"
        and (only is None or only(prefix + k))
    }
    if not todo:
        return 0
    names = {k: _resolve(source, prefix + k, aliases) for k in todo} if source else {}
    data = source.read(sorted(set(names.values()))) if source else {}
    new: dict[int, torch.Tensor] = {}  # old tensor id -> its replacement (ties within the unit)
    total = 0
    for k, (m, attr, is_param) in todo.items():
        old = (m._parameters if is_param else m._buffers)[attr]
        t = new.get(id(old))
        if t is None:
            if source is None:
                v = torch.empty(old.shape, dtype=old.dtype)
            else:
                v = data[names[k]]
                if tuple(v.shape) != tuple(old.shape):
                    raise CheckpointError(
                        f"tensor {names[k]!r} in {source.files[names[k]]} has shape "
                        f"{list(v.shape)}, the model's {prefix + k!r} is {list(old.shape)}"
                    )
                v = v.to(old.dtype)
            t = nn.Parameter(v, requires_grad=False) if is_param else v
            new[id(old)] = t
            total += v.numel() * v.element_size()
        (m._parameters if is_param else m._buffers)[attr] = t
    return total


def _hide_meta(unit: nn.Module) -> dict[str, torch.Tensor]:
    """Swap ``unit``'s meta tensors (entries not read yet) for empty CPU tensors, so that
    :func:`omse.quantize` can check and copy the unit; returns them for :func:`_restore_meta`."""
    hidden = {}
    for k, (m, attr, is_param) in _state_slots(unit).items():
        store = m._parameters if is_param else m._buffers
        if store[attr].device.type == "meta":
            hidden[k] = store[attr]
            empty = torch.empty(0, dtype=store[attr].dtype)
            store[attr] = nn.Parameter(empty, requires_grad=False) if is_param else empty
    return hidden


def _restore_meta(unit: nn.Module, hidden: dict[str, torch.Tensor]) -> None:
    slots = _state_slots(unit)
    for k, t in hidden.items():
        m, attr, is_param = slots[k]
        (m._parameters if is_param else m._buffers)[attr] = t


# -- per-unit configuration --------------------------------------------------------------------
def _exact(name: str) -> str:
    """An fnmatch pattern that matches ``name`` only."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _unit_config(config: QuantConfig, names: dict[str, str], skip: set[str]) -> QuantConfig:
    """``config`` for a unit whose modules are ``names`` (unit-local name -> model name): skip
    and overrides resolved on the model names, written as exact local names; ``skip`` too."""
    local_skip = set(skip)
    overrides: dict[str, dict] = {}
    for local, full in names.items():
        if config.is_skipped(full):
            local_skip.add(local)
        for pattern, ov in config.overrides.items():
            if fnmatch.fnmatchcase(full, pattern):
                overrides[_exact(local)] = dict(ov)
                break
    return replace(config, skip=tuple(_exact(n) for n in sorted(local_skip)), overrides=overrides)


def _check_config(config: QuantConfig) -> None:
    if config.equalize:
        raise ConfigError(
            "equalize=True cannot run block by block: cross-layer equalization pairs layers "
            "across block boundaries; use equalize=False or quantize in memory (omse.quantize)"
        )
    if config.target in INTEGER_TARGETS:
        raise ConfigError(
            f"target={config.target!r} cannot run block by block: its output-quantizer plan traces the whole "
            "model (where each layer's output goes, across blocks); use target='int4' or quantize "
            "in memory (omse.quantize)"
        )


def _has_layers(unit: nn.Module, config: QuantConfig) -> bool:
    """Whether ``unit`` has a layer :func:`omse.quantize` would wrap under ``config``."""
    return any(
        isinstance(m, WRAPPABLE) and n and not config.is_skipped(n) for n, m in unit.named_modules()
    )


# -- the result ---------------------------------------------------------------------------------
@dataclass
class BlockwiseResult:
    """What :func:`quantize_blockwise` did.

    ``out``: the output folder (None without ``out=``); ``model``: the whole quantized model
    (only without ``out=``); ``blocks``, ``stem``, ``head``: module names; ``seconds``: wall
    time; ``weight_bytes``: the model's FP32 (file dtype) weight bytes read; ``largest_unit_bytes``:
    the largest unit's; ``activation_bytes``: one stream of calibration activations (block
    inputs, all batches); ``sqnr_db``: with ``compare=True``, each block's output SQNR (dB) of the
    quantized model against FP32 on the calibration batches (the error accumulated so far);
    ``calibrations``: one :class:`~omse.transforms.pipeline.Calibration` per unit (notes only:
    statistics dropped)."""

    out: Path | None
    model: nn.Module | None
    blocks: list[str]
    stem: list[str]
    head: list[str]
    seconds: float = 0.0
    weight_bytes: int = 0
    largest_unit_bytes: int = 0
    activation_bytes: int = 0
    sqnr_db: list[float] = field(default_factory=list)
    calibrations: dict[str, Calibration] = field(default_factory=dict)


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, tuple | list):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def _sqnr(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    s = sum(float(r.double().pow(2).sum()) for r in ref)
    n = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out, strict=True))
    return float("inf") if n == 0 else 10.0 * float(torch.log10(torch.tensor(s / n)))


def _skeleton(model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if callable(model):
        return empty_model(model)
    raise ConfigError(
        f"model must be a torch.nn.Module (on the meta device is fine) or a zero-argument "
        f"builder, got {type(model).__name__}"
    )


def _quantize_unit(
    unit: nn.Module, batches: list, config: QuantConfig, fold_bn: bool, cal: Calibration
) -> nn.Module:
    q = quantize(unit, batches, config, fold_bn=fold_bn, calibration=cal)
    if isinstance(q, torch.fx.GraphModule):
        raise ConfigError(
            f"{cal.rewritten}: omse rewrote functional matmul/linear calls on this unit's weights "
            "into nn.Linear (torch.fx), which a block-by-block checkpoint cannot rebuild into the "
            "original modules; use nn.Linear modules, or quantize in memory"
        )
    cal.stats, cal.output_stats = {}, {}
    return q


def _rename(q: nn.Module, prefix: str, strip: str = "") -> None:
    for m in q.modules():
        if isinstance(m, QuantizedLayer):
            local = m.name[len(strip) :] if strip and m.name.startswith(strip) else m.name
            m.name = prefix + local


def _save_unit(q: nn.Module, path: Path, config: QuantConfig) -> dict:
    q.omse_config = config  # type: ignore[attr-defined]  # the user's, not the unit-local one
    if any(isinstance(m, QuantizedLayer) for m in q.modules()):
        checkpoint.save(q, path)
        h = checkpoint.read_header(path)
        return {"file": path.name, "kind": "quantized", "sha256": h["sha256"]}
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in q.state_dict().items()}
    save_file(sd, str(path), metadata={_FLOAT_KEY: "1"})
    return {"file": path.name, "kind": "float", "sha256": None}


@torch.no_grad()
def quantize_blockwise(
    model: nn.Module | Callable[[], nn.Module],
    calib_batches: Iterable,
    config: QuantConfig | None = None,
    *,
    weights: str | Path | None = None,
    out: str | Path | None = None,
    blocks: str | Iterable[str] | None = None,
    force: bool = False,
    fold_bn: bool = True,
    compare: bool = False,
    progress: bool = False,
) -> BlockwiseResult:
    """Quantize ``model`` one block at a time (module docstring: flow, memory bound, semantics).

    Args:
        model: the architecture: a module (parameters on ``meta`` are fine with ``weights=``) or
            a zero-argument builder (called with its parameters on ``meta``: :func:`empty_model`).
        calib_batches: the model's calibration inputs (tensors, ``(inputs, labels)`` tuples or
            dicts of keyword tensors), as for :func:`omse.quantize`.
        config: :class:`~omse.config.QuantConfig` (default ``QuantConfig()``); ``equalize=True``
            and ``target="int8"`` are refused; module-name patterns (``skip``, ``overrides``)
            match the model's full names (``layers.3.mlp.fc1``).
        weights: a ``.safetensors`` file, a ``*.safetensors.index.json`` or a folder with one;
            None: the model's own (in-memory) weights.
        out: the output folder (written atomically; an existing one needs ``force=True``);
            None: the quantized model is returned in ``result.model`` instead.
        blocks: which modules are blocks (:func:`find_blocks`); default: found automatically.
        fold_bn: fold BatchNorms (within a unit) as :func:`omse.quantize` does.
        compare: also run the FP32 blocks on the FP32 stream and record each block's output SQNR
            (one more activation stream in memory).
        progress: a progress bar over the units.

    Returns:
        a :class:`BlockwiseResult`.

    Examples:
        >>> import torch, omse
        >>> from safetensors.torch import save_file
        >>> from omse.deploy.blockwise import quantize_blockwise, load_blockwise
        >>> def build():
        ...     return torch.nn.Sequential(torch.nn.Linear(16, 32),
        ...         *[torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()) for _ in range(4)],
        ...         torch.nn.Linear(32, 10)).eval()
        >>> save_file(build().state_dict(), "model.safetensors")  # the FP32 weights
        >>> calib = [torch.randn(8, 16) for _ in range(4)]
        >>> res = quantize_blockwise(build, calib, omse.QuantConfig.preset("fast"),
        ...                          weights="model.safetensors", out="model-q4")
        >>> res.blocks, res.stem, res.head
        (['1', '2', '3', '4'], ['0'], ['5'])
        >>> qmodel = load_blockwise("model-q4", build)
        >>> qmodel(calib[0]).shape
        torch.Size([8, 10])
    """
    t0 = time.perf_counter()
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be an omse.QuantConfig, got {type(config).__name__}")
    _check_config(config)
    source = WeightSource(weights) if weights is not None else None
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        if out_path.exists() and not force:
            raise OmseError(f"output {out_path} already exists; pass --force (force=True)")
        if source is not None:
            inputs = {source.path.resolve(), *(f.resolve() for f in source.files.values())}
            o = out_path.resolve()
            if any(o == i or o in i.parents for i in inputs):
                raise OmseError(f"output {out_path} holds the weights files; choose another folder")
    skel = _skeleton(model)
    names = find_blocks(skel, blocks)
    if source is not None:
        _check_source(skel, source)
    elif _on_meta(skel):
        raise ConfigError(
            "the model's parameters are on the meta device (no values); pass weights= (the "
            "safetensors file or index with its weights)"
        )
    unmatched = config.unmatched_patterns([n for n, _ in skel.named_modules() if n])
    if unmatched:
        warnings.warn(f"override/skip patterns match no module: {unmatched}", stacklevel=2)
    batches = prepare_batches(calib_batches)
    aliases = _aliases(skel)
    res = BlockwiseResult(out_path, None, names, [], [])
    res.weight_bytes = sum(_nbytes(t) for t in skel.state_dict(keep_vars=True).values())
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(out_path, force)) if out_path is not None else None
        bar = stack.enter_context(
            progress_bar(total=len(names) + 2, desc="blocks", disable=not progress)
        )
        run = _Run(skel, names, batches, config, source, aliases, fold_bn, res)
        bar.set_postfix_str("stem")
        xs, extra = run.stem()
        bar.update()
        fp = list(xs) if compare else None
        files: dict[str, dict] = {}
        raw, fp_raw = [], []
        for i, name in enumerate(names):
            bar.set_postfix_str(name)
            blk, qblk = run.block(name, xs, extra)
            raw = [qblk(x, *a, **kw) for x, (a, kw) in zip(xs, extra, strict=True)]
            if i == 0:
                _verify_chain(run.rest, batches[0], raw[0], extra[0])
            if fp is not None:
                fp_raw = [blk(x, *a, **kw) for x, (a, kw) in zip(fp, extra, strict=True)]
                fp = [_first(o) for o in fp_raw]
                res.sqnr_db.append(_sqnr(fp, [_first(o) for o in raw]))
            xs = [_first(o) for o in raw]
            if tmp is not None:
                files[name] = _save_unit(qblk, tmp / f"block-{i:05d}.omse.safetensors", config)
            else:
                files[name] = {"module": qblk}
            del blk, qblk
            if i < len(names) - 1:
                raw = []
            gc.collect()
            trim_heap()
            bar.update()
        del xs
        bar.set_postfix_str("head")
        float_rest = copy.deepcopy(run.rest) if compare else None
        run.head(raw)
        if float_rest is not None:
            if source is not None:
                _materialize(float_rest, "", source, aliases)
            ref = [
                _first_out(_After(float_rest)(b, v)) for b, v in zip(batches, fp_raw, strict=True)
            ]
            got = [_first_out(_After(run.rest)(b, v)) for b, v in zip(batches, raw, strict=True)]
            res.sqnr_db.append(_sqnr(ref, got))
            del float_rest, ref, got
        del raw, fp_raw
        bar.update()
        rest = run.rest
        _control(rest).mode = "capture"
        if tmp is not None:
            rec = _save_unit(rest, tmp / _REST, config)
            index = {
                "format": FORMAT,
                "version": VERSION,
                "model_class": type(skel).__name__,
                "config": config.to_dict(),
                "blocks": [{"name": n, **files[n]} for n in names],
                "rest": rec,
                "stem": res.stem,
                "head": res.head,
                "weights": None if source is None else str(source.path),
                "weight_bytes": res.weight_bytes,
                "torch": torch.__version__,
            }
            atomic_write_text(tmp / INDEX, json.dumps(index, indent=1) + "\n")
        else:
            for n in names:
                _set_module(rest, n, files[n]["module"])
            rest.omse_config = config  # type: ignore[attr-defined]
            res.model = rest.eval()
    res.seconds = time.perf_counter() - t0
    return res


class _Run:
    """The state of one :func:`quantize_blockwise` call between its units."""

    def __init__(self, skel, names, batches, config, source, aliases, fold_bn, res):
        self.skel, self.names, self.batches, self.config = skel, names, batches, config
        self.source, self.aliases, self.fold_bn, self.res = source, aliases, fold_bn, res
        self.rest, _ = _rest_model(skel, names)
        self.rest_bytes = 0

    def _load_rest(self, only: Callable[[str], bool] | None = None) -> None:
        if self.source is not None:
            self.rest_bytes += _materialize(self.rest, "", self.source, self.aliases, only)
            self.res.largest_unit_bytes = max(self.res.largest_unit_bytes, self.rest_bytes)

    def _load_module(self, name: str, module: nn.Module) -> None:
        if self.source is not None:
            self.rest_bytes += _materialize(module, name + ".", self.source, self.aliases)
            self.res.largest_unit_bytes = max(self.res.largest_unit_bytes, self.rest_bytes)

    def _quantize_rest(self, adapter: nn.Module, batches: list, called: set[str], unit: str):
        """Quantize the rest model's modules in ``called`` (not inside a quantized layer)."""
        inside = [n for n, m in self.rest.named_modules() if isinstance(m, QuantizedLayer)]
        names = {f"m.{n}": n for n, _ in self.rest.named_modules() if n}
        skip = {"m"} | {  # the model's root: its own tensors are not a layer
            f"m.{n}"
            for n in names.values()
            if n not in called or any(n == q or n.startswith(q + ".") for q in inside)
        }
        cfg = _unit_config(self.config, names, skip)
        unit_model = adapter(self.rest)
        if not _has_layers(unit_model, cfg):
            return
        cal = Calibration()
        hidden = _hide_meta(self.rest)  # the head's tensors are not read yet
        try:
            q = _quantize_unit(unit_model, batches, cfg, self.fold_bn, cal).m
        finally:
            _restore_meta(self.rest, hidden)
        _restore_meta(q, hidden)
        self.rest = q
        _rename(self.rest, "", "m.")
        self.res.calibrations[unit] = cal

    def stem(self) -> tuple[list[torch.Tensor], list[tuple[tuple, dict]]]:
        """Read and quantize the stem; the first block's inputs: first arguments ``[batch, ...]``
        and (other positional arguments, keyword arguments) per batch."""
        b0 = self.batches[0]
        stem = None
        if self.source is not None:
            self._load_rest(lambda k: "." not in k)  # the root's own tensors
            stem = _stem_modules(self.rest, b0, self._load_module)
        if stem is None:  # in memory, or the lazy run failed: the whole rest is read
            self._load_rest()
            stem = _stem_modules(self.rest, b0, None)
        self.res.stem = sorted(stem)
        self._quantize_rest(_UpTo, self.batches, stem, "stem")
        ctl = _control(self.rest)
        xs, extra = [], []
        for b in self.batches:
            ctl.mode = "capture"
            try:
                _call(self.rest, b)
            except _Stop:
                pass
            else:
                raise ConfigError(
                    f"the model returned without calling its first block {self.names[0]!r}"
                )
            args, kw = ctl.captured  # type: ignore[misc]
            if not args or not isinstance(args[0], torch.Tensor):
                raise ConfigError(
                    f"block {self.names[0]!r} is called without a tensor as its first argument"
                )
            xs.append(args[0])
            extra.append((args[1:], kw))
        ctl.captured = None
        self.res.activation_bytes = sum(_nbytes(x) for x in xs)
        return xs, extra

    def block(self, name: str, xs: list, extra: list) -> tuple[nn.Module, nn.Module]:
        """Read block ``name`` and quantize it on ``xs``: (float block, quantized block)."""
        if self.source is not None:
            blk = copy.deepcopy(self.skel.get_submodule(name))
            nbytes = _materialize(blk, name + ".", self.source, self.aliases)
        else:
            blk = self.skel.get_submodule(name)
            nbytes = sum(_nbytes(t) for t in blk.state_dict().values())
        blk.eval()
        self.res.largest_unit_bytes = max(self.res.largest_unit_bytes, nbytes)
        bound = any(a or kw for a, kw in extra)
        ubatches = (
            [{"x": x, "args": a, **kw} for x, (a, kw) in zip(xs, extra, strict=True)]
            if bound
            else xs
        )
        local = {
            f"block.{n}" if n else "block": f"{name}.{n}" if n else name
            for n, _ in blk.named_modules()
        }
        cfg = _unit_config(self.config, local, set())
        unit = _Bound(blk)
        if not _has_layers(unit, cfg):
            return blk, blk
        cal = Calibration()
        qblk = _quantize_unit(unit, ubatches, cfg, self.fold_bn, cal).block
        _rename(qblk, name + ".", "block.")
        self.res.calibrations[name] = cal
        return blk, qblk

    def head(self, raw: list) -> None:
        """Read the remaining tensors and quantize the head on the last block's outputs."""
        self._load_rest()
        head = _head_modules(self.rest, self.batches[0], raw[0])
        self.res.head = sorted(head)
        hb = [{"batch": b, "value": v} for b, v in zip(self.batches, raw, strict=True)]
        self._quantize_rest(_After, hb, head, "head")


def _first_out(y: Any) -> torch.Tensor:
    return _first(getattr(y, "logits", y))


def _owned_by(modules: set[str]) -> Callable[[str], bool]:
    """Whether a state key (``embed.weight``) belongs to one of ``modules`` (or a module inside
    one); the root module's own entries (``pos_embedding``) belong to every unit."""
    pre = tuple(m + "." for m in modules)
    return lambda k: "." not in k or k.startswith(pre)


def _called(rest: nn.Module) -> tuple[list[str], list]:
    """Hooks that record, in call order, the name of every module of ``rest`` (slots aside)."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n))
        for n, m in rest.named_modules()
        if n and not isinstance(m, _Slot)
    ]
    return order, handles


def _stem_modules(
    rest: nn.Module, batch: Any, load: Callable[[str, nn.Module], None] | None
) -> set[str] | None:
    """The modules the model runs before its first block. With ``load``, each module's tensors
    are read just before it first runs (``load(name, module)``), so only the stem's are read;
    None where that run fails (a module using another's weights: then read the whole rest)."""
    ctl = _control(rest)
    order: list[str] = []

    def pre(m: nn.Module, _args, n: str) -> None:
        order.append(n)
        if load is not None:
            load(n, m)

    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: pre(mod, a, n))
        for n, m in rest.named_modules()
        if n and not isinstance(m, _Slot)
    ]
    ctl.mode = "capture"
    try:
        _call(rest, batch)
    except _Stop:
        return set(order)
    except OmseError:
        raise
    except Exception:
        if load is None:
            raise
        return None
    finally:
        for h in handles:
            h.remove()
        ctl.captured = None
    raise ConfigError(f"the model returned without calling its first block {ctl.names[0]!r}")


def _verify_chain(rest: nn.Module, batch: Any, out0: Any, extra0: tuple) -> None:
    """On one batch: every block gets the previous block's output and block 0's other
    arguments (the slots all return ``out0``, block 0's output; the run stops at the last)."""
    ctl = _control(rest)
    ctl.mode, ctl.value, ctl.calls, ctl.check = "stop-last", out0, [], extra0
    try:
        _call(rest, batch)
    except _Stop:
        pass
    finally:
        ctl.check, ctl.value = None, None
    if len(ctl.calls) != len(ctl.names):
        missing = ctl.names[len(ctl.calls)]
        raise ConfigError(f"the model did not call block {missing!r}: every block must run once")


def _head_modules(rest: nn.Module, batch: Any, value: Any) -> set[str]:
    """The modules the model runs after its last block (the slots all return ``value``)."""
    ctl = _control(rest)
    order, handles = _called(rest)
    marks: list[int] = []
    for m in rest.modules():
        if isinstance(m, _Slot):
            handles.append(m.register_forward_hook(lambda *_: marks.append(len(order))))
    ctl.mode, ctl.value, ctl.calls = "replay", value, []
    try:
        _call(rest, batch)
    finally:
        for h in handles:
            h.remove()
        ctl.value = None
    return set(order[marks[-1] if marks else 0 :])


# -- loading ------------------------------------------------------------------------------------
def _read_index(path: Path) -> dict:
    p = path / INDEX if path.is_dir() else path
    if not p.is_file():
        raise CheckpointError(f"{path} is not a block-by-block output (no {INDEX})")
    try:
        index = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an omse block-by-block index")
    if index.get("version") != VERSION:
        raise CheckpointError(
            f"{p} has version {index.get('version')!r}; this omse reads version {VERSION}"
        )
    return index


def _load_unit(folder: Path, rec: dict, module: nn.Module) -> nn.Module:
    file = folder / rec["file"]
    if rec.get("kind") == "float":
        from safetensors.torch import load_file

        if not file.is_file():
            raise CheckpointError(f"{file} (named by {folder / INDEX}) does not exist")
        _refuse_pickle(file)
        module.load_state_dict(load_file(str(file)), strict=True)
        return module
    h = checkpoint.read_header(file)
    if h["sha256"] != rec.get("sha256"):
        raise CheckpointError(
            f"{file} is not the file {folder / INDEX} recorded (its SHA-256 differs)"
        )
    return checkpoint.load(file, model=module)


class _Loaded:
    """A block-by-block output opened for loading: the rest model and each block on demand."""

    def __init__(self, path: str | Path, model: nn.Module | Callable[[], nn.Module]):
        self.folder = Path(path)
        self.index = _read_index(self.folder)
        if self.folder.is_file():
            self.folder = self.folder.parent
        self.skel = _skeleton(model)
        self.names = [b["name"] for b in self.index["blocks"]]
        mods = dict(self.skel.named_modules())
        for n in self.names:
            if n not in mods:
                raise CheckpointError(
                    f"the model has no module {n!r}, a block of {self.folder} (saved from "
                    f"{self.index.get('model_class')})"
                )
        rest, _ = _rest_model(self.skel, self.names)
        _materialize(rest, "", None, {})
        self.rest = _load_unit(self.folder, self.index["rest"], rest).eval()
        cfg = self.index.get("config")
        if cfg is not None:
            self.rest.omse_config = QuantConfig.from_dict(cfg)  # type: ignore[attr-defined]

    def block(self, i: int) -> nn.Module:
        blk = copy.deepcopy(self.skel.get_submodule(self.names[i]))
        _materialize(blk, "", None, {})
        return _load_unit(self.folder, self.index["blocks"][i], blk).eval()


@torch.no_grad()
def load_blockwise(path: str | Path, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The whole quantized model :func:`quantize_blockwise` wrote to the folder ``path``.

    ``model``: the architecture (a module, on ``meta`` or not, not modified; or a builder,
    called with its parameters on ``meta``). Its outputs are bit-identical to the quantized model
    :func:`quantize_blockwise` computed. Memory: the whole quantized model (with dequantized
    FP32 weights); :func:`run_blockwise` runs it one block at a time instead.

    Raises:
        CheckpointError: a missing or corrupted file, or a model that does not match.
    """
    ld = _Loaded(path, model)
    for i, n in enumerate(ld.names):
        _set_module(ld.rest, n, ld.block(i))
    return ld.rest


@torch.no_grad()
def run_blockwise(
    path: str | Path,
    model: nn.Module | Callable[[], nn.Module],
    batches: Iterable,
    progress: bool = False,
) -> list:
    """The quantized model's outputs on ``batches`` (model inputs, as for calibration), with one
    block in memory at a time: the stem runs on every batch, then each block is loaded, run on
    all the batches' activations and freed, then the head runs. Returns one output per batch,
    equal to ``load_blockwise(path, model)(batch)``.
    """
    ld = _Loaded(path, model)
    bs = prepare_batches(batches)
    ctl = _control(ld.rest)
    xs, extra = [], []
    for b in bs:
        ctl.mode = "capture"
        try:
            _call(ld.rest, b)
        except _Stop:
            args, kw = ctl.captured  # type: ignore[misc]
            xs.append(args[0])
            extra.append((args, kw))
    raw: list = []
    for i in progress_bar(range(len(ld.names)), desc="blocks", disable=not progress):
        blk = ld.block(i)
        raw = [blk(x, *a[1:], **kw) for x, (a, kw) in zip(xs, extra, strict=True)]
        xs = [_first(o) for o in raw]
        del blk
        gc.collect()
        trim_heap()
    return [_After(ld.rest)(b, v) for b, v in zip(bs, raw, strict=True)]
