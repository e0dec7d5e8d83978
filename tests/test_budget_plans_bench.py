"""benchmarks/budget_plans.py: the random plans of the same bytes and the summary against them."""

from __future__ import annotations

import random

from benchmark_loader import load_benchmark

bp = load_benchmark("budget_plans")


def test_random_plans_stay_within_and_close_to_the_bytes():
    rng = random.Random(0)
    sizes = {f"l{i}": (40 * i + 7, 72 * i + 11) for i in range(1, 31)}
    low = sum(b4 for b4, _ in sizes.values())
    step = min(b8 - b4 for b4, b8 in sizes.values())
    plans = []
    for cap in (low, low + 500, low + 5000, low + 20000):
        for _ in range(5):
            bits = bp.random_plan(sizes, cap, rng)
            used = sum(sizes[n][bits[n] == 8] for n in sizes)
            assert set(bits.values()) <= {4, 8} and used <= cap
            assert cap - used < step or all(b == 8 for b in bits.values())
            plans.append(tuple(sorted(bits.items())))
    assert len(set(plans)) > 10  # random draws, not one plan


def test_summary_counts_the_draws_the_chosen_plan_beats():
    row = {"model": "m", "budget": 0.6, "bytes_fraction": 0.59}
    rows = [row | {"row": "chosen@0.6x", "kind": "chosen", "top1": 0.9, "agreement": 0.97}]
    for k, (t, a) in enumerate([(0.8, 0.9), (0.95, 0.96), (0.85, 0.99)]):
        rows.append(row | {"row": f"random@0.6x#{k}", "kind": "random", "top1": t, "agreement": a})
    (s,) = bp.summary({"rows": rows})
    assert s["random_draws"] == 3 and s["random_top1_median"] == 0.85
    assert s["chosen_beats_draws_top1"] == 2 and s["chosen_beats_draws_agreement"] == 2
    assert s["random_top1_range"] == [0.8, 0.95]
