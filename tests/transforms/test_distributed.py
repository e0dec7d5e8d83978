"""Calibration sharded over torch.distributed: 2 local gloo processes (torch.multiprocessing
spawn, a FileStore in tmp_path) return the same scales, codes and biases, bit for bit, as one
process given all batches; so do the per-layer report and the evaluation metrics."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nets import tiny_batches, tiny_net

import omse
from omse.analysis.metrics import compare_logits, predict
from omse.analysis.report import layer_reports
from omse.distributed import gather_rows, shard, unshard
from omse.errors import CalibrationError, ConfigError

WORLD = 2
N_BATCHES = 5  # uneven: rank 0 gets 3 batches, rank 1 gets 2


def _config(**kw) -> omse.QuantConfig:
    """Every field written out: the defaults are being changed elsewhere."""
    base = dict(
        weight_bits=4,
        act_bits=8,
        weight_method="mmse",
        act_method="mmse",
        granularity="per_channel",
        weight_grid="full",
        act_grid="full",
        overrides={},
        skip=(),
        extra_mac_budget=0.0,
        residual_criterion="output",
        max_terms=2,
        bias_correction=False,
        equalize=False,
        output_aware=False,
        rounding="nearest",
        rounding_iters=500,
        rounding_lr=1e-2,
        rounding_reg=0.01,
        strict=False,
        act_bins=4096,
        scale_dtype="float16",
        target="int4",
        budget=None,
    )
    base.update(kw)
    return omse.QuantConfig(**base)


CONFIGS = {
    "plain": _config(),
    # bias correction + residual tensors, int8 target (output quantizers: the plan step)
    "bc+residuals": _config(extra_mac_budget=0.1, bias_correction=True, target="int8"),
    # the network criterion: per-layer model-output errors summed over both ranks' batches
    "network": _config(extra_mac_budget=0.2, residual_criterion="network"),
    "learned": _config(rounding="learned", rounding_iters=20, bias_correction=True),
    # per-layer precision under a byte budget, its guard: probes and errors summed in global
    # batch order
    "precision": _config(budget=0.6, extra_mac_budget=0.1, bias_correction=True),
    "reconstructed": _config(
        rounding="learned", rounding_scope="block", rounding_iters=10, bias_correction=True
    ),
    # the activation range choice: its estimate over the first global batches, both ranks
    "ranges": _config(
        target="int8", activations=omse.ActQuant(choose_range=True), extra_mac_budget=0.0
    ),
}


def _state(q) -> dict[str, torch.Tensor]:
    """Every scale, code, mask and bias of a quantized model."""
    out = {}
    for name, ql in omse.quantized_layers(q).items():
        for t, (codes, scale, mask) in enumerate(ql.terms()):
            out[f"{name}.codes{t}"], out[f"{name}.scale{t}"] = codes, scale
            out[f"{name}.mask{t}"] = mask
        for k in ("act_scale", "out_scale"):
            v = getattr(ql, k)
            out[f"{name}.{k}"] = torch.empty(0) if v is None else v
        if ql.layer.bias is not None:
            out[f"{name}.bias"] = ql.layer.bias.detach()
    return out


def _run(batches: list) -> dict:
    """What each rank (or the single process) computes: models, report rows, metrics."""
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, cfg in CONFIGS.items():
            cal = omse.Calibration()
            q = omse.quantize(tiny_net(), batches, cfg, calibration=cal)
            res[key] = _state(q)
            res[key + "/batches"] = cal.batches
    q = omse.quantize(tiny_net(), batches, CONFIGS["plain"])
    res["report"] = [(r.input_sqnr_db, r.output_sqnr_db) for r in layer_reports(q, batches)]
    ev = torch.cat(tiny_batches(3, 8, seed=7))
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = ev[rank::size]
    ref, out = gather_rows(predict(tiny_net(), mine)), gather_rows(predict(q, mine))
    res["metrics"] = compare_logits(ref, out, torch.arange(ev.shape[0]) % 10)
    return res


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        res = _run(shard(tiny_batches(N_BATCHES, 4), rank, WORLD))
        for case, value in (("shape", None), ("overflow", 3e38)):
            # rank 1's second batch fails (a wrong shape when the inputs are checked; values that
            # overflow to Inf inside the net during a pass): every rank must stop, none hang
            bad = shard(tiny_batches(N_BATCHES, 4), rank, WORLD)
            if rank == 1:
                bad[1] = bad[1][:2, :, :6] if value is None else bad[1].sign() * value
            try:
                omse.quantize(tiny_net(), bad, CONFIGS["plain"])
                res[case] = None
            except CalibrationError as e:
                res[case] = str(e)
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(f"file://{tmp}/store", str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count
    try:
        single = _run(tiny_batches(N_BATCHES, 4))
    finally:
        torch.set_num_threads(n)
    return single, ranks


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_two_ranks_equal_one_process_bit_for_bit(results, key):
    single, ranks = results
    want = single[key]
    assert want and any(k.endswith(".bias") for k in want)
    for r, res in enumerate(ranks):
        got = res[key]
        assert got.keys() == want.keys()
        moved = [k for k in want if not torch.equal(got[k], want[k])]
        assert not moved, f"rank {r}, {key}: {moved[:5]}"
        assert res[key + "/batches"] == single[key + "/batches"] == N_BATCHES


def test_residuals_and_bias_correction_were_exercised(results):
    single, _ = results
    st = single["bc+residuals"]
    assert any(k.endswith(".codes1") for k in st)  # a residual term somewhere
    assert any(k.endswith(".codes1") for k in single["network"])
    assert any(k.endswith(".out_scale") and v.numel() for k, v in st.items())


def test_report_and_metrics_equal_one_process(results):
    single, ranks = results
    for res in ranks:
        assert res["report"] == single["report"]
        assert res["metrics"] == single["metrics"]  # agreement, KL, top-1, n: exact


@pytest.mark.parametrize("case", ["shape", "overflow"])
def test_a_failing_batch_stops_every_rank(results, case):
    _, ranks = results
    # its own error, naming its batch: local batch 1 when checked, global batch 3 in a pass
    assert ("batch 1" if case == "shape" else "batch 3") in ranks[1][case]
    assert ranks[0][case].startswith("rank 1 failed")


def test_shard_is_rank_strided_and_unshard_inverts_it():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert unshard(parts) == items
    assert shard(items) == items  # no process group: everything
    with pytest.raises(ConfigError, match="each rank"):
        shard([1], 0, 2)
    with pytest.raises(ConfigError, match="rank 2"):
        shard(items, 2, 2)


def test_no_process_group_is_the_plain_path():
    assert not dist.is_initialized()
    with pytest.raises(CalibrationError):
        omse.quantize(tiny_net(), [torch.randn(2, 2, 12, 12)], CONFIGS["plain"])
