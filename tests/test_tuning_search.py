"""Search logic on CPU with injected timers and synthetic cost surfaces."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusedlis.tuning.search import (
    Limits,
    estimate_attention,
    estimate_gemm,
    planned_timings,
    prune,
    search,
)

KEY = {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"}


def gemm_space():
    return [
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
        for bm, bn, bk, w, s in itertools.product([16, 32, 64], [32, 64, 128, 256], [64, 128, 256], [2, 4, 8], [2, 3, 4, 5])
    ]


def surface(opt):
    """Separable convex bowl in log2 space with its unique minimum at `opt` (which may be invalid)."""

    def cost(cfg, effort=1):
        return 10.0 + sum((math.log2(cfg[k]) - math.log2(opt[k])) ** 2 * (1 + i) for i, k in enumerate(sorted(opt)))

    return cost


def brute_force_min(configs, cost):
    return min(configs, key=cost)


def test_exhaustive_finds_optimum_of_surface():
    space = gemm_space()
    opt = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    cost = surface(opt)
    calls = []
    res = search(space, lambda c, e: (calls.append(c), cost(c))[1],
                 estimate=lambda c: estimate_gemm(KEY, c), default=space[0])
    assert res.best == opt
    assert res.best_us == pytest.approx(10.0)
    assert res.speedup > 1
    # every kept config timed once, then the winner and the default re-timed
    assert len(calls) == len(space) - len(res.pruned) + 2


def test_global_optimum_pruned_when_over_shared_memory():
    space = gemm_space()
    # 5 stages x (64x256 + 256x256) x 2 B = 800 KiB: far above Hopper's 227 KiB.
    opt = {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 256, "num_warps": 8, "num_stages": 5}
    cost = surface(opt)
    est = lambda c: estimate_gemm(KEY, c)  # noqa: E731
    timed = []
    res = search(space, lambda c, e: (timed.append(c), cost(c))[1], estimate=est)
    assert opt not in timed
    assert any(p == opt and "shared memory" in why for p, why in res.pruned)
    kept = [c for c in space if not est(c).violations(Limits())]
    assert res.best == brute_force_min(kept, cost)
    assert all(not est(c).violations(Limits()) for c in timed)


def test_register_pruning():
    big = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}
    small = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    kept, pruned = prune([big, small, dict(small)], lambda c: estimate_gemm(KEY, c))
    assert kept == [small]  # duplicate dropped too
    assert pruned[0][0] == big and "registers" in pruned[0][1]


def test_smaller_limits_prune_more():
    space = gemm_space()
    est = lambda c: estimate_gemm(KEY, c)  # noqa: E731
    hopper, _ = prune(space, est, Limits())
    ampere_consumer, _ = prune(space, est, Limits(smem_bytes=101_376))
    assert set(map(str, ampere_consumer)) < set(map(str, hopper))


def test_swiglu_and_attention_estimates_grow_with_tiles():
    c = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    plain = estimate_gemm(KEY, c)
    swiglu = estimate_gemm({**KEY, "activation": "swiglu"}, c)
    assert swiglu.smem_bytes > plain.smem_bytes and swiglu.regs_per_thread > plain.regs_per_thread
    akey = {"B": 8, "Hq": 16, "Hkv": 4, "D": 128, "S": 4096, "dtype": "bfloat16"}
    a1 = estimate_attention(akey, {"BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    a2 = estimate_attention(akey, {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2})
    assert a2.smem_bytes == 4 * a1.smem_bytes


@given(seed=st.integers(0, 2**31 - 1), eta=st.sampled_from([2, 3, 4]))
def test_halving_finds_optimum_under_small_noise(seed, eta):
    rng = random.Random(seed)
    space = gemm_space()
    est = lambda c: estimate_gemm(KEY, c)  # noqa: E731
    kept, _ = prune(space, est)
    opt = rng.choice(kept)
    cost = surface(opt)
    # Noise shrinks with effort and stays below the gap between the optimum and any other config (>= 1).
    timer = lambda c, e: cost(c) + rng.uniform(0, 0.4) / e  # noqa: E731
    calls = []
    res = search(space, lambda c, e: (calls.append(e), timer(c, e))[1], estimate=est,
                 strategy="halving", eta=eta, default=kept[0])
    assert res.best == opt
    assert len(calls) == planned_timings(len(kept), "halving", eta)
    assert calls.count(1) == len(kept)  # every config measured once, cheaply
    # only survivors are measured with more effort: n/eta + n/eta^2 + ... (+ rounding, + final pair)
    rounds = math.ceil(math.log(len(kept), eta))
    assert 0 < sum(e > 1 for e in calls) <= len(kept) / (eta - 1) + rounds + 2


def test_default_wins_ties_and_failures_are_skipped():
    space = [{"BLOCK_N": n, "num_warps": 4} for n in (32, 64, 128, 256)]

    def timer(c, e):
        if c["BLOCK_N"] == 256:
            raise RuntimeError("out of resources")
        return 5.0

    res = search(space, timer, default={"BLOCK_N": 64, "num_warps": 4})
    assert res.best == {"BLOCK_N": 64, "num_warps": 4}
    assert res.speedup == 1.0
    assert [c["BLOCK_N"] for c, _ in res.failed] == [256]


def test_never_slower_than_default_even_if_candidate_measures_worse_later():
    state = {"n": 0}

    def timer(c, e):
        state["n"] += 1
        # the candidate looks fast in the sweep, slow when re-timed against the default
        if c["x"] == 1:
            return 1.0 if state["n"] == 1 else 9.0
        return 5.0

    res = search([{"x": 1}, {"x": 2}], timer, default={"x": 2})
    assert res.best == {"x": 2} and res.best_us <= res.default_us


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="strategy"):
        search([{"a": 1}], lambda c, e: 1.0, strategy="random")
    with pytest.raises(ValueError, match="eta"):
        search([{"a": 1}], lambda c, e: 1.0, eta=1)
    with pytest.raises(ValueError, match="no config could be timed"):
        search([{"a": 1}], lambda c, e: float("nan"))


def test_min_gain_keeps_default_unless_clearly_faster():
    times = {1: 9.95, 2: 10.0, 3: 9.0}
    efforts = []

    def timer(c, e):
        efforts.append(e)
        return times[c["x"]]

    near = search([{"x": 1}, {"x": 2}], timer, default={"x": 2}, min_gain=0.01, confirm_effort=4)
    assert near.best == {"x": 2}  # 0.5% faster is within noise: keep the default
    assert efforts[-2:] == [4, 4]  # final pair measured with more effort
    clear = search([{"x": 1}, {"x": 2}, {"x": 3}], timer, default={"x": 2}, min_gain=0.01)
    assert clear.best == {"x": 3} and clear.speedup == pytest.approx(10 / 9)
    with pytest.raises(ValueError, match="min_gain"):
        search([{"x": 1}], timer, min_gain=1.5)
