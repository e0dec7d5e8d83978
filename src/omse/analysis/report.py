"""Per-layer report of where accuracy is lost: markdown table, CSV and PNG.

For every quantized layer, on calibration data: MACs per sample, weight SQNR (dB), input-activation
SQNR (the layer's input against its quantized version), output SQNR against the FP32 (BN-folded)
network run on the same batch, and the residual tensors chosen (kernels, extra MACs). All columns
are computed here from the model and the data. Below the table, every parameter the model still
holds in float (outside a quantized layer) with its share of the model's weight values and the
reason (:func:`omse.transforms.functional.float_weights`; also ``float_weights.csv``). For a
model calibrated under a weight budget (``qmodel.omse_precision``, a
:class:`~omse.transforms.precision.PrecisionPlan`): each layer's choice with every candidate's
bytes and estimated output error (``precision.csv``), and the estimated error-vs-bytes front of
the plans the knapsack finds at budgets from uniform low bits to uniform 8 bits, with the
uniform plans and the chosen one marked (``precision.png``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..distributed import gather, is_distributed, is_main, unshard
from ..io import atomic_write_bytes, atomic_write_text
from ..nn.layers import QuantizedLayer, quantized_layers
from ..transforms.functional import FloatWeight, float_weights
from ..transforms.precision import PrecisionPlan, cheapest, choose
from ..transforms.statistics import run_model
from .metrics import sqnr_db

__all__ = [
    "LayerReport",
    "layer_reports",
    "report",
    "write_report",
    "markdown",
    "float_mode",
    "float_markdown",
    "model_float_weights",
    "precision_markdown",
    "precision_front",
    "write_precision",
]


@dataclass
class LayerReport:
    name: str
    kind: str
    weight: str
    act: str
    macs: int
    weight_sqnr_db: float
    input_sqnr_db: float
    output_sqnr_db: float
    extra_kernels: int
    extra_macs: int


@contextlib.contextmanager
def float_mode(layers: dict[str, QuantizedLayer]) -> Iterator[None]:
    """Temporarily run every quantized layer as its float (BN-folded) original."""
    for q in layers.values():
        q.set_quant_enabled(False)
    try:
        yield
    finally:
        for q in layers.values():
            q.set_quant_enabled(True)


class _Energy:
    """Signal and noise energy of one layer's tensor against its reference, kept per batch
    (``terms[b]``: ``(signal, noise)`` of each call in batch ``b``) and summed in batch order, so
    that sharded ranks can sum them in global batch order (:meth:`all_ranks`)."""

    def __init__(self) -> None:
        self.terms: list[list[tuple[float, float]]] = []

    def start_batch(self) -> None:
        self.terms.append([])

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        r, a = ref.double(), approx.double()
        self.terms[-1].append((float((r * r).sum()), float(((r - a) ** 2).sum())))

    @property
    def db(self) -> float:
        sig = noise = 0.0
        for batch in self.terms:
            for s, n in batch:
                sig, noise = sig + s, noise + n
        if noise == 0:
            return math.inf
        return 10 * math.log10(max(sig, 1e-300) / noise)


def _all_ranks(energies: dict[str, _Energy]) -> None:
    """Under torch.distributed: every rank's per-batch terms, in global batch order (rank ``r``
    holds global batches ``r, r+N, ...``), on every rank."""
    if not is_distributed():
        return
    parts = gather({n: e.terms for n, e in energies.items()})
    for n, e in energies.items():
        e.terms = unshard([p[n] for p in parts])


@torch.no_grad()
def layer_reports(qmodel: nn.Module, batches: list) -> list[LayerReport]:
    """Compute the per-layer report of ``qmodel`` on calibration ``batches`` (network order).

    Under torch.distributed each rank passes its own share of the batches
    (:func:`omse.distributed.shard`) and every rank gets the rows one process gets from all."""
    layers = quantized_layers(qmodel)
    out_e = {n: _Energy() for n in layers}
    in_e = {n: _Energy() for n in layers}
    ref_out: dict[str, torch.Tensor] = {}

    def keep_ref(mod, _inp, out):
        ref_out[mod.name] = out.detach().clone()  # a later in-place ReLU must not alter it

    def compare(mod, inp, out):
        x = inp[0]
        in_e[mod.name].add(x, mod.quantize_input(x))
        if mod.name in ref_out:
            out_e[mod.name].add(ref_out.pop(mod.name), out)

    for b in batches:
        for e in (*out_e.values(), *in_e.values()):
            e.start_batch()
        hs = [q.register_forward_hook(keep_ref) for q in layers.values()]
        try:
            with float_mode(layers):
                run_model(qmodel, b)
        finally:
            for h in hs:
                h.remove()
        hs = [q.register_forward_hook(compare) for q in layers.values()]
        try:
            run_model(qmodel, b)
        finally:
            for h in hs:
                h.remove()
        ref_out.clear()
    _all_ranks(out_e)
    _all_ranks(in_e)
    rows = []
    for name, q in layers.items():
        kind = type(q.layer).__name__
        if getattr(q.layer, "groups", 1) > 1 and q.layer.groups == q.float_weight.shape[0]:
            kind += " (depthwise)"
        rows.append(
            LayerReport(
                name=name,
                kind=kind,
                weight=f"{q.w_grid.kind}{q.w_grid.bits} x{q.n_terms}",
                act="float" if q.a_grid is None else f"{q.a_grid.kind}{q.a_grid.bits}",
                macs=int(q.macs),
                weight_sqnr_db=sqnr_db(q.float_weight, q.dequantized_weight()),
                input_sqnr_db=in_e[name].db,
                output_sqnr_db=out_e[name].db,
                extra_kernels=q.extra_kernels(),
                extra_macs=q.extra_macs(),
            )
        )
    return rows


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def markdown(rows: list[LayerReport], worst: int | None = None) -> str:
    """Markdown table (all rows, or the ``worst`` by output SQNR)."""
    sel = sorted(rows, key=lambda r: r.output_sqnr_db)[:worst] if worst else rows
    lines = [
        "| layer | type | weight | input | MACs | weight SQNR dB | input SQNR dB | output SQNR dB | extra kernels | extra MACs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sel:
        lines.append(
            f"| {r.name} | {r.kind} | {r.weight} | {r.act} | {r.macs:,} | {_fmt(r.weight_sqnr_db)} | "
            f"{_fmt(r.input_sqnr_db)} | {_fmt(r.output_sqnr_db)} | {r.extra_kernels} | {r.extra_macs:,} |"
        )
    total = sum(r.macs for r in rows)
    extra = sum(r.extra_macs for r in rows)
    lines.append(
        f"\nTotal MACs per sample {total:,}; residual tensors add {extra:,} ({extra / max(total, 1):.1%})."
    )
    return "\n".join(lines)


def model_float_weights(qmodel: nn.Module) -> list[FloatWeight]:
    """:func:`~omse.transforms.functional.float_weights` of ``qmodel``, with the modules its
    :class:`~omse.config.QuantConfig` (``qmodel.omse_config``) skipped marked as such."""
    cfg = getattr(qmodel, "omse_config", None)
    skipped = (
        {n for n, _ in qmodel.named_modules() if n and cfg.is_skipped(n)}
        if cfg is not None
        else set()
    )
    return float_weights(qmodel, skipped)


def float_markdown(rows: list[FloatWeight]) -> str:
    """The weights left in float as a markdown section (``"All weights are quantized."`` when
    there are none)."""
    if not rows:
        return "All weights are quantized."
    share = sum(r.share for r in rows)
    lines = [
        f"{share:.2%} of the model's weight values stay in float:",
        "",
        "| parameter | module type | values | share | reason |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r.values):
        lines.append(f"| {r.name} | {r.kind} | {r.values:,} | {r.share:.2%} | {r.reason} |")
    return "\n".join(lines)


def _plot(rows: list[LayerReport], path: Path, title: str, force: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    out = [r.output_sqnr_db for r in rows]
    wq = [r.weight_sqnr_db for r in rows]
    inp = [r.input_sqnr_db if math.isfinite(r.input_sqnr_db) else float("nan") for r in rows]
    worst = set(sorted(x, key=lambda i: out[i])[:5])
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.22), 4.8))
    colors = [
        "tab:red" if i in worst else ("tab:orange" if "depthwise" in rows[i].kind else "tab:blue")
        for i in x
    ]
    ax.bar(x, out, color=colors, label="output SQNR (red: 5 worst, orange: depthwise)")
    ax.plot(x, wq, "k.", label="weight SQNR")
    ax.plot(x, inp, "g_", markersize=8, label="input SQNR")
    for i in x:
        if rows[i].extra_kernels:
            ax.annotate("+", (i, out[i]), ha="center", va="bottom", fontsize=8, color="purple")
    ax.set_xticks(x)
    ax.set_xticklabels([r.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title(title + "  (+: layer has residual tensors)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, path, force)


def _save_png(fig, path: Path, force: bool) -> None:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), force=force)


def write_report(
    rows: list[LayerReport],
    out_dir: str | Path,
    title: str,
    force: bool = False,
    floats: list[FloatWeight] | None = None,
) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` for ``rows`` into ``out_dir``;
    with ``floats`` (the weights left in float) also their section in ``report.md`` and
    ``float_weights.csv``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n" + markdown(rows) + "\n"
    if floats is not None:
        md += "\n## Weights left in float\n\n" + float_markdown(floats) + "\n"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(asdict(rows[0]).keys()))
    w.writeheader()
    for r in rows:
        w.writerow(asdict(r))
    paths = [d / "report.md", d / "report.csv", d / "report.png"]
    atomic_write_text(paths[0], md, force=force)
    atomic_write_text(paths[1], buf.getvalue(), force=force)
    _plot(rows, paths[2], title, force)
    if floats is not None:
        fbuf = io.StringIO()
        fw = csv.DictWriter(fbuf, fieldnames=[f.name for f in fields(FloatWeight)])
        fw.writeheader()
        for r in floats:
            fw.writerow(asdict(r))
        paths.append(d / "float_weights.csv")
        atomic_write_text(paths[-1], fbuf.getvalue(), force=force)
    return paths


def precision_markdown(plan: PrecisionPlan) -> str:
    """The per-layer precision table: choice, bytes and estimated relative output error of every
    candidate (layers an override fixed marked), then the guard's rounds."""
    widths = sorted({c.bits for cs in plan.choices.values() for c in cs})
    head = "| layer | weight bits | " + " | ".join(
        f"{b}-bit bytes | {b}-bit est. output error" for b in widths
    )
    lines = [head + " |", "|" + "---|" * (2 + 2 * len(widths))]
    for n, bits in plan.bits.items():
        cs = {c.bits: c for c in plan.choices.get(n, [])}
        cells = []
        for b in widths:
            c = cs.get(b)
            cells += ["-", "-"] if c is None else [f"{c.bytes:,}", f"{c.error:.3g}"]
        tag = f"{bits} (fixed)" if n in plan.fixed else str(bits)
        lines.append(f"| {n} | {tag} | " + " | ".join(cells) + " |")
    out = plan.summary() + "\n\n" + "\n".join(lines)
    for i, g in enumerate(plan.guard):
        out += (
            f"\n\nGuard round {i + 1}: {g['bytes']:,} bytes, output error {g['error']:.3g} vs "
            f"{g['error_8bit']:.3g} at 8 bits ({g['gap_db']:.1f} dB; "
            f"{'passed' if g['passed'] else 'failed'})"
        )
    return out


def precision_front(plan: PrecisionPlan, points: int = 21) -> list[tuple[int, float]]:
    """``[(bytes, estimated error)]`` of the knapsack's plans at ``points`` budgets from the
    cheapest plan to every layer at its widest candidate (choosable layers only)."""
    lo = sum(min(c.bytes for c in cs) for cs in plan.choices.values())
    hi = sum(max(c.bytes for c in cs) for cs in plan.choices.values())
    front = []
    for i in range(points):
        b = lo + (hi - lo) * i // max(points - 1, 1)
        chosen = choose(plan.choices, b) or cheapest(plan.choices)
        front.append((plan.chosen_bytes(chosen), plan.estimated_error(chosen)))
    return front


def _plot_precision(plan: PrecisionPlan, path: Path, title: str, force: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = plan.bytes - plan.chosen_bytes()  # layers an override fixed
    front = precision_front(plan)
    scale = max(plan.bytes_8bit, 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([(b + fixed) / scale for b, _ in front], [e for _, e in front], "-o", ms=3,
            label="knapsack plans (estimated)")  # fmt: skip
    for label, pick, marker in (("uniform low bits", min, "s"), ("uniform 8 bits", max, "^")):
        bits = {n: pick(c.bits for c in cs) for n, cs in plan.choices.items()}
        used = plan.chosen_bytes(bits)
        ax.plot([(used + fixed) / scale], [plan.estimated_error(bits)], marker, ms=8, label=label)
    ax.plot([plan.bytes / scale], [plan.estimated_error()], "r*", ms=14, label="chosen plan")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("weight bytes / the 8-bit model's")
    ax.set_ylabel("estimated relative output error (lower is better)")
    ax.set_title(title + ": per-layer precision", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save_png(fig, path, force)


def write_precision(
    plan: PrecisionPlan, out_dir: str | Path, title: str, force: bool
) -> list[Path]:
    """``precision.md``, ``precision.csv`` (one row per layer and candidate) and
    ``precision.png`` (the front) in ``out_dir``."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "chosen_bits", "fixed", "bits", "bytes", "est_output_error"])
    for n, bits in plan.bits.items():
        for c in plan.choices.get(n, []):
            w.writerow([n, bits, n in plan.fixed, c.bits, c.bytes, c.error])
    paths = [d / "precision.md", d / "precision.csv", d / "precision.png"]
    atomic_write_text(
        paths[0],
        f"# {title}: per-layer precision\n\n" + precision_markdown(plan) + "\n",
        force=force,
    )
    atomic_write_text(paths[1], buf.getvalue(), force=force)
    _plot_precision(plan, paths[2], title, force)
    return paths


def report(
    qmodel: nn.Module,
    batches: list,
    out_dir: str | Path,
    title: str = "omse per-layer report",
    force: bool = False,
) -> list[Path]:
    """Compute the per-layer report on ``batches`` and write it to ``out_dir`` (md, csv, png).

    The FP32 reference is the quantized model's own float mode (the same BN folding), run on the
    same batches, so the original model is not needed. Under torch.distributed every rank
    calls it with its share of the batches and rank 0 alone writes (the others return ``[]``).

    Examples:
        >>> import torch, omse
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(392, 10)
        ... ).eval()
        >>> calib = [torch.rand(4, 3, 9, 9) for _ in range(4)]  # 16 calibration inputs
        >>> qmodel = omse.quantize(model, calib)
        >>> [p.name for p in omse.report(qmodel, calib, "report")][:4]
        ['report.md', 'report.csv', 'report.png', 'float_weights.csv']
    """
    rows = layer_reports(qmodel, batches)  # under torch.distributed: every rank's batches
    if not is_main():
        return []
    paths = write_report(rows, out_dir, title, force, model_float_weights(qmodel))
    plan = getattr(qmodel, "omse_precision", None)
    if isinstance(plan, PrecisionPlan) and plan.choices:
        paths += write_precision(plan, out_dir, title, force)
    return paths
