"""Packed quantized checkpoints: one safetensors file, 4-bit codes two per byte, never pickled.

File layout (safetensors; every tensor little-endian, no Python objects):

- ``q.<module>.w<t>.codes``: the integer codes of weight term ``t`` of the quantized layer at
  module path ``<module>``, output channel first (a ConvTranspose's weight in the canonical
  layout ``[out, in/groups, k...]``, :func:`omse.nn.layers.canonical_weight`); grids of <= 4 bits are packed two per byte (``uint8``, low nibble
  first, :func:`omse.core.primitives.pack_int4`), 5..8-bit codes are ``int8``;
- ``q.<module>.w<t>.scale``: its scales (kernel-wise ``[out, 1, ...]`` or 0-d), float16 (the
  default ``scale_dtype``; float32 where a scale needs it);
- ``q.<module>.w<t>.mask``: for residual terms ``t >= 1``, which kernels carry the term (bool);
  a residual term's ``codes`` hold only those kernels;
- ``q.<module>.act_scale``: the float32 input-activation scale (when the input is quantized);
- ``f.<key>``: every other entry of the model's ``state_dict`` as is (biases, un-folded
  BatchNorms, layers left in float), so nothing of the FP32 weights is needed to rebuild it.

The safetensors metadata holds one JSON header under ``"omse"`` (see :func:`read_header`): format
and version, the architecture (a :data:`omse.zoo.models.REGISTRY` name, or ``None`` for a user model),
the :class:`~omse.config.QuantConfig`, every quantized layer's grid/config/term shapes, the module
types of the whole quantized model (folded BatchNorms are the ``Identity`` modules), byte counts
and a SHA-256 over the tensor table, this header and the tensor data (so a corrupted byte is
detected, not silently loaded).

:func:`load` rebuilds the architecture (registry: built without FP32 weights where the builder
allows; a user model: ``model=``), replaces the folded BatchNorms by ``Identity``, wraps the layers
in :class:`~omse.nn.layers.QuantizedLayer` and installs codes, scales and float state: its outputs
are bit-identical to the saved model's. The loaded layers' ``float_weight`` is the dequantized
weight (the FP32 weight is not in the file).
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantConfig, layer_config_from_dict, layer_config_to_dict
from ..core.grids import Grid
from ..core.primitives import pack_int4, unpack_int4
from ..errors import CheckpointError, OmseError
from ..io import atomic_path, check_output_path
from ..nn.layers import QuantizedLayer, canonical_weight, layer_weight, share_input_quantizer
from ..nn.ops import op_quantizers
from ..transforms.fold import _set_module

__all__ = ["save", "load", "read_header", "FORMAT", "VERSION"]

FORMAT = "omse-checkpoint"
VERSION = 1
_META_KEY = "omse"
_MAX_HEADER = 100_000_000


# -- saving -------------------------------------------------------------------------------------
def _quantized_modules(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _quantized_keys(path: str, ql: QuantizedLayer) -> set[str]:
    """state_dict keys of a quantized layer that the packed entries replace."""
    keys = {f"{path}.layer.weight", f"{path}.act_scale", f"{path}.out_scale"}
    for t in range(ql.n_terms):
        keys |= {f"{path}.w_codes{t}", f"{path}.w_scale{t}", f"{path}.w_mask{t}"}
    return keys


def _pack(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    if grid.bits <= 4:
        return pack_int4(codes)
    return codes.reshape(-1).to(torch.int8).contiguous()


def _compact_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` in the narrowest float format that holds every value exactly (float16,
    bfloat16 or float32): the scales omse fits are float16 values by default."""
    s = scale.to(torch.float32).contiguous()
    for dtype in (torch.float16, torch.bfloat16):
        c = s.to(dtype)
        if torch.equal(c.to(torch.float32), s):
            return c.contiguous()
    return s


def save(
    qmodel: nn.Module,
    path: str | Path,
    force: bool = False,
    model_name: str | None = None,
) -> Path:
    """Write ``qmodel`` (from :func:`omse.quantize`) as a packed checkpoint at ``path``.

    ``model_name``: the :data:`omse.zoo.models.REGISTRY` name of the architecture, so that
    ``load(path)`` can rebuild it without ``model=`` (default: ``qmodel.omse_model_name`` if set).
    Written atomically; an existing file needs ``force=True``.

    Examples:
        >>> import torch, omse
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 10)
        ... ).eval()
        >>> calib = [torch.rand(4, 3, 9, 9) for _ in range(4)]  # 16 calibration inputs
        >>> qmodel = omse.quantize(model, calib)
        >>> omse.save(qmodel, "model.omse.safetensors").name  # 4-bit codes two per byte
        'model.omse.safetensors'
        >>> back = omse.load("model.omse.safetensors", model=model)
        >>> torch.equal(back(calib[0]), qmodel(calib[0]))
        True
    """
    p = check_output_path(path, force)
    qls = _quantized_modules(qmodel)
    if not qls:
        raise OmseError("the model has no quantized layer; quantize it with omse.quantize first")
    name = model_name if model_name is not None else getattr(qmodel, "omse_model_name", None)
    if name is not None and not isinstance(name, str):
        raise OmseError(f"model_name must be a string, got {type(name).__name__}")
    cfg = getattr(qmodel, "omse_config", None)

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    replaced: set[str] = set()
    packed_bytes = fp32_weight_bytes = 0
    for path_, ql in qls.items():
        replaced |= _quantized_keys(path_, ql)
        terms = []
        for t, (codes, scale, mask) in enumerate(ql.terms()):
            if int(codes.min()) < ql.w_grid.qmin or int(codes.max()) > ql.w_grid.qmax:
                raise OmseError(f"layer {ql.name!r} term {t} has codes outside {ql.w_grid}")
            # a residual term stores only the kernels its mask selects (the others are zero)
            rows = codes if t == 0 else codes[mask.to(torch.bool)]
            data = _pack(rows, ql.w_grid)
            tensors[f"q.{path_}.w{t}.codes"] = data
            sc = _compact_scale(scale.detach())
            tensors[f"q.{path_}.w{t}.scale"] = sc
            packed_bytes += data.numel() + sc.numel() * sc.element_size()
            if t >= 1:
                tensors[f"q.{path_}.w{t}.mask"] = mask.to(torch.bool).contiguous()
                packed_bytes += mask.numel()
            terms.append(
                {
                    "shape": list(codes.shape),
                    "rows": int(rows.shape[0]),
                    "packed": ql.w_grid.bits <= 4,
                }
            )
        fp32_weight_bytes += ql.layer.weight.numel() * 4
        if ql.act_scale is not None:
            tensors[f"q.{path_}.act_scale"] = ql.act_scale.detach().to(torch.float32).reshape(())
        if ql.out_scale is not None:
            tensors[f"q.{path_}.out_scale"] = ql.out_scale.detach().to(torch.float32).reshape(())
        layers[path_] = {
            "name": ql.name,
            "type": type(ql.layer).__name__,
            "cfg": layer_config_to_dict(ql.cfg),
            "w_grid": ql.w_grid.to_list(),
            "a_grid": None if ql.a_grid is None else ql.a_grid.to_list(),
            "out_grid": None if ql.out_grid is None else ql.out_grid.to_list(),
            "input_from": ql.input_from,
            "terms": terms,
            "bias": ql.layer.bias is not None,
            "macs": int(ql.macs),
        }
    float_bytes = 0
    for k, v in qmodel.state_dict().items():
        if k in replaced:
            continue
        if not isinstance(v, torch.Tensor):
            raise OmseError(f"state entry {k!r} is not a tensor; it cannot be saved")
        tensors[f"f.{k}"] = v.detach().contiguous()
        float_bytes += v.numel() * v.element_size()

    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": name,
        "config": None if cfg is None else cfg.to_dict(),
        "model_class": type(qmodel).__name__,
        "modules": {n: type(m).__name__ for n, m in qmodel.named_modules() if n},
        "layers": layers,
        "op_quantizers": None if op_quantizers(qmodel) is None else op_quantizers(qmodel).to_dict(),
        "bytes": {
            "packed_weights": packed_bytes,
            "fp32_weights": fp32_weight_bytes,
            "float_state": float_bytes,
        },
        "torch": torch.__version__,
    }
    data = _serialize(tensors, header)
    with atomic_path(p, force) as tmp:
        tmp.write_bytes(data)
    return p


def _digest(table: dict, header: dict, data: memoryview | bytes) -> str:
    """SHA-256 over the tensor table (names, dtypes, shapes, offsets), the omse header (less
    this digest) and the tensor data: any changed byte that changes a value is detected."""
    h = hashlib.sha256()
    t = {k: v for k, v in table.items() if k != "__metadata__"}
    h.update(json.dumps(t, sort_keys=True).encode())
    h.update(
        json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode()
    )
    h.update(data)
    return h.hexdigest()


def _serialize(tensors: dict[str, torch.Tensor], header: dict) -> bytes:
    from safetensors.torch import save as st_save

    # the tensor table and data do not depend on the metadata: hash them, then write the hash in
    first = st_save(tensors, metadata={_META_KEY: json.dumps(header)})
    n = struct.unpack("<Q", first[:8])[0]
    table = json.loads(first[8 : 8 + n])
    header = {**header, "sha256": _digest(table, header, memoryview(first)[8 + n :])}
    data = st_save(tensors, metadata={_META_KEY: json.dumps(header)})
    n2 = struct.unpack("<Q", data[:8])[0]
    table2 = json.loads(data[8 : 8 + n2])
    if (
        data[8 + n2 :] != first[8 + n :]
        or _digest(table2, header, data[8 + n2 :]) != header["sha256"]
    ):  # pragma: no cover - safetensors changed the layout between two writes
        raise OmseError("safetensors changed the tensor layout between two writes")
    return data


# -- reading ------------------------------------------------------------------------------------
def _read(path: str | Path) -> tuple[dict, dict, bytes]:
    """(omse header, safetensors tensor table, raw file bytes), fully validated."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    raw = p.read_bytes()
    if raw[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or raw[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{p} is a pickle / torch.save file, not an omse checkpoint; omse never unpickles "
            "(save quantized models with omse.deploy.checkpoint.save / `omse save`)"
        )
    if len(raw) < 10:
        raise CheckpointError(f"{p} is truncated ({len(raw)} bytes): not an omse checkpoint")
    n = struct.unpack("<Q", raw[:8])[0]
    if n > _MAX_HEADER or 8 + n > len(raw):
        if raw[8:9] == b"{" and n <= _MAX_HEADER:
            raise CheckpointError(
                f"{p} is truncated: its header needs {8 + n} bytes, the file has {len(raw)}"
            )
        raise CheckpointError(f"{p} is not a safetensors file (bad header length)")
    try:
        table = json.loads(raw[8 : 8 + n].decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p} has a corrupted header ({e})") from None
    meta = table.get("__metadata__") or {}
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise CheckpointError(
            f"{p} is a safetensors file without an omse header: not an omse checkpoint "
            "(plain weights go to `--weights`)"
        )
    try:
        header = json.loads(meta[_META_KEY])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p} has a corrupted omse header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p} has a corrupted omse header (not a JSON object)")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not an omse checkpoint (format {header.get('format')!r})")
    if header.get("version") != VERSION:
        raise CheckpointError(
            f"{p} has omse checkpoint version {header.get('version')!r}; this omse reads "
            f"version {VERSION}"
        )
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in table.items() if k != "__metadata__"), default=0
        )
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{p} has a corrupted tensor table") from None
    if 8 + n + end > len(raw):
        raise CheckpointError(
            f"{p} is truncated: its tensors need {8 + n + end} bytes, the file has {len(raw)}"
        )
    if 8 + n + end < len(raw):
        raise CheckpointError(f"{p} has {len(raw) - 8 - n - end} unexpected trailing bytes")
    if _digest(table, header, memoryview(raw)[8 + n :]) != header.get("sha256"):
        raise CheckpointError(
            f"{p} is corrupted: its tensors or header do not match the recorded SHA-256"
        )
    return header, table, raw


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of an omse checkpoint (validated, checksum included), plus ``file_bytes``.

    Keys: ``format``, ``version``, ``model`` (registry name or None), ``config``
    (:meth:`QuantConfig.to_dict`), ``layers`` (per quantized layer: name, type, cfg, grids, term
    shapes), ``modules``, ``bytes`` and ``sha256``.
    """
    header, _, raw = _read(path)
    return {**header, "file_bytes": len(raw)}


# -- loading ------------------------------------------------------------------------------------
def _tensors(raw: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        return st_load(raw)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def _mismatch(msg: str, header: dict) -> CheckpointError:
    arch = header.get("model") or header.get("model_class") or "?"
    return CheckpointError(f"the model does not match the checkpoint (saved from {arch}): {msg}")


def _unpack_terms(
    tensors: dict[str, torch.Tensor], path_: str, info: dict, grid: Grid
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    terms, masks = [], []
    for t, term in enumerate(info["terms"]):
        shape = [int(s) for s in term["shape"]]
        rows = int(term["rows"])
        per_row = 1
        for s in shape[1:]:
            per_row *= s
        mask = None
        if t >= 1:
            mask = tensors[f"q.{path_}.w{t}.mask"]
            if mask.dtype != torch.bool or tuple(mask.shape) != (shape[0],):
                raise CheckpointError(f"layer {path_!r} term {t}: mask of the wrong shape/type")
            if int(mask.sum()) != rows:
                raise CheckpointError(f"layer {path_!r} term {t}: mask and codes disagree")
        elif rows != shape[0]:
            raise CheckpointError(f"layer {path_!r}: the main term must hold every kernel")
        data = tensors[f"q.{path_}.w{t}.codes"]
        if term["packed"]:
            flat = unpack_int4(data, rows * per_row, signed=grid.signed)
        else:
            if data.dtype != torch.int8 or data.numel() != rows * per_row:
                raise CheckpointError(f"layer {path_!r} term {t}: codes of the wrong size/type")
            flat = data
        if flat.numel() and (int(flat.min()) < grid.qmin or int(flat.max()) > grid.qmax):
            raise CheckpointError(f"layer {path_!r} term {t}: codes outside the grid {grid}")
        if mask is None:
            codes = flat.reshape(shape)
        else:
            codes = torch.zeros(shape, dtype=torch.int8)
            codes[mask] = flat.reshape(rows, *shape[1:])
            masks.append(mask)
        scale = tensors[f"q.{path_}.w{t}.scale"].to(torch.float32)
        terms.append((codes, scale))
    return terms, masks


@torch.no_grad()
def load(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    build: Callable[[str], nn.Module] | None = None,
) -> nn.Module:
    """Rebuild the quantized model saved at ``path``.

    ``model``: the architecture (a fresh instance of the FP32 model; its weight values are not
    used and it is not modified). Without it, ``build(name)`` makes the architecture the header
    names (``omse.load`` passes the model zoo's builder). The result computes bit-identical
    outputs to the model that was saved.

    Raises:
        CheckpointError: a missing, truncated, corrupted or pickle file, or a ``model`` whose
            structure does not match the checkpoint.
    """
    p = Path(path)
    header, _, raw = _read(p)
    tensors = _tensors(raw, p)
    if model is None:
        if not header.get("model"):
            raise CheckpointError(
                f"{p} was saved from a user model (no built-in architecture recorded); "
                "pass model= (a fresh instance of the architecture)"
            )
        if build is None:
            raise CheckpointError(
                f"{p} names the architecture {header['model']!r}; pass model= (a fresh "
                "instance of it) or load it with omse.load, which builds built-in models"
            )
        model = build(header["model"])
    elif not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    else:
        model = copy.deepcopy(model)
    model.eval()
    try:
        return _restore(model, header, tensors)
    except OmseError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{p} lacks the entry {e}; the file is incomplete") from None
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(
            f"{p} cannot be restored into this model: {type(e).__name__}: {str(e)[:300]}"
        ) from None


def _restore(model: nn.Module, header: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    modules_rec: dict[str, str] = header.get("modules", {})
    layers: dict[str, dict] = header.get("layers", {})
    current = dict(model.named_modules())
    # 1. folded BatchNorms: Identity in the checkpoint, BatchNorm in the fresh architecture
    for name, kind in modules_rec.items():
        m = current.get(name)
        if kind == "Identity" and isinstance(m, nn.modules.batchnorm._BatchNorm):
            _set_module(model, name, nn.Identity())
    # 2. wrap the quantized layers, installing their integer terms and activation scales
    wrapped: dict[str, QuantizedLayer] = {}
    for path_, info in layers.items():
        layer = dict(model.named_modules()).get(path_)
        if layer is None:
            raise _mismatch(f"it has no module {path_!r} (a quantized layer)", header)
        if type(layer).__name__ != info["type"]:
            raise _mismatch(
                f"module {path_!r} is a {type(layer).__name__}, the checkpoint has a "
                f"{info['type']}",
                header,
            )
        try:
            cfg = layer_config_from_dict(info["cfg"])
            w_grid = Grid(*info["w_grid"])
            a_grid = None if info["a_grid"] is None else Grid(*info["a_grid"])
        except (TypeError, OmseError) as e:
            raise CheckpointError(f"layer {path_!r} has an invalid configuration: {e}") from None
        terms, masks = _unpack_terms(tensors, path_, info, w_grid)
        shape = tuple(terms[0][0].shape)  # canonical [out, in/groups, k...]
        have = tuple(canonical_weight(layer).shape)
        if have != shape:
            raise _mismatch(
                f"layer {path_!r} has weight {tuple(layer.weight.shape)} (output channel first: "
                f"{have}), the checkpoint {shape}",
                header,
            )
        w = torch.zeros(shape, dtype=torch.float32)
        for q, s in terms:
            w = w + q.to(torch.float32) * s
        layer.weight.data = layer_weight(layer, w).to(layer.weight.dtype)  # no FP32 value survives
        if info["bias"] and layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(shape[0], dtype=layer.weight.dtype))
        # min-max ranges make construction cheap (no MMSE solve); the terms are replaced next
        ql = QuantizedLayer(layer, info["name"], replace(cfg, weight_method="minmax"))
        ql.cfg = cfg
        ql.w_grid = w_grid
        ql.set_weight_terms(terms, masks)
        act = tensors.get(f"q.{path_}.act_scale")
        ql.set_act(act, a_grid if act is not None else None)
        out = tensors.get(f"q.{path_}.out_scale")
        if out is not None and info.get("out_grid") is not None:
            ql.set_output(out, Grid(*info["out_grid"]))
        ql.macs = int(info.get("macs", 0))
        _set_module(model, path_, ql)
        wrapped[path_] = ql
    for path_, info in layers.items():  # module outputs that carry a layer's input quantizer
        if info.get("input_from"):
            try:
                share_input_quantizer(model, wrapped[path_], info["input_from"])
            except (AttributeError, OmseError) as e:
                raise _mismatch(f"cannot attach {path_!r}'s input quantizer: {e}", header) from None
    if header.get("op_quantizers"):  # quantizers between the layers (omse.nn.ops)
        op_quantizers(model, create=True).load_dict(header["op_quantizers"])
    # 3. the module structure must now be the saved one
    got = {n: type(m).__name__ for n, m in model.named_modules() if n}
    if got != modules_rec:
        diff = sorted(set(got.items()) ^ set(modules_rec.items()))[:3]
        raise _mismatch(f"module structure differs, e.g. {diff}", header)
    # 4. float state (biases, un-folded BatchNorms, float layers), strictly
    sd = model.state_dict()
    qkeys: set[str] = set()
    for path_, ql in _quantized_modules(model).items():
        qkeys |= _quantized_keys(path_, ql)
    want = {k for k in sd if k not in qkeys}
    have = {k[2:] for k in tensors if k.startswith("f.")}
    if want != have:
        extra, missing = sorted(have - want)[:3], sorted(want - have)[:3]
        raise _mismatch(
            f"state entries differ (checkpoint only {extra}, model only {missing})", header
        )
    for k in want:
        v = tensors[f"f.{k}"]
        if tuple(sd[k].shape) != tuple(v.shape):
            raise _mismatch(
                f"{k!r} has shape {tuple(sd[k].shape)}, the checkpoint {tuple(v.shape)}", header
            )
    model.load_state_dict({k: tensors[f"f.{k}"] for k in want}, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg_d = header.get("config")
    if cfg_d is not None:
        try:
            model.omse_config = QuantConfig.from_dict(cfg_d)  # type: ignore[attr-defined]
        except (TypeError, OmseError) as e:
            raise CheckpointError(f"the checkpoint's QuantConfig is invalid: {e}") from None
    if header.get("model"):
        model.omse_model_name = header["model"]  # type: ignore[attr-defined]
    return model.eval()
