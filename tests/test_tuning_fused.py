"""Tuning the fused GEMM + all-reduce and the tuner's default-vs-candidate rule, on CPU.

The fused kernel runs here in the Triton interpreter through `simulate_linear_allreduce` (all ranks in one
process), so every candidate config is checked against the launcher itself; GPU timing is not.
"""

from __future__ import annotations

import csv
import importlib
import random
from types import SimpleNamespace

import pytest
import torch

from fusedlis.tuning import _lookup, cache, fingerprint, fused, search
from fusedlis.tuning.bench import FakeBench, SkipOp, allreduce_algorithms, _honoured_algorithm
from fusedlis.tuning.cli import main as tune_main
from fusedlis.tuning.keys import normalize_key
from fusedlis.tuning.shapes import Problem, load_config, model_problems
from fusedlis.tuning.tuner import tune
from tests._tuning_helpers import TINY, iso  # noqa: F401  (iso: fixture)

LA = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")
TILE = ("USE_DOT", "BM", "BN", "BK", "num_warps", "num_stages")


def _simulate(key, config, seed=0):
    """Run the real launcher for every rank in one process; max relative error against torch."""
    M, N, K, local = (int(key[k]) for k in ("M", "N", "K", "local"))
    world = local
    wss = LA.FusedAllReduceWorkspace.simulate(world, local, max(M, 1), N)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(M, K, generator=g) for _ in range(world)]
    ws = [torch.randn(N, K, generator=g) for _ in range(world)]
    ref = LA.linear_allreduce_ref(xs, ws)
    outs = LA.simulate_linear_allreduce(xs, ws, wss, config=config)
    return max(((o - ref).norm() / ref.norm()).item() for o in outs)


def test_fused_problems_are_the_row_parallel_layers_keyed_like_the_launcher(monkeypatch):
    probs = model_problems(load_config("llama-3.1-8b"), 2, [1, 64], ["fused"], gpus_per_node=2)
    assert [(p.layer, p.key["M"], p.key["K"], p.key["N"], p.key["local"]) for p in probs] == \
        [("o", 1, 2048, 4096, 2), ("o", 64, 2048, 4096, 2), ("down", 1, 7168, 4096, 2), ("down", 64, 7168, 4096, 2)]
    assert all(p.op == "linear_allreduce" and p.meta["max_m"] == 64 and p.meta["max_n"] == 4096 for p in probs)
    assert model_problems(load_config("llama-3.1-8b"), 1, [1], ["fused"]) == []
    assert model_problems(load_config("llama-3.1-8b"), 2, [1], ["fused"], layers=["qkv"]) == []
    # What the launcher asks lookup for, captured on a real (simulated) call.
    (p,) = model_problems(TINY, 2, [3], ["fused"], dtype=torch.float32, layers=["o"], gpus_per_node=2)
    seen = []
    monkeypatch.setattr("fusedlis.tuning.lookup", lambda op, k: (seen.append((op, dict(k))), None)[1])
    assert _simulate(p.key, None) < 1e-5
    assert seen and seen[0][0] == "linear_allreduce" == p.op
    assert normalize_key(seen[0][1]) == normalize_key(p.key)


def test_honoured_keys_are_probed_from_the_launcher(monkeypatch):
    key = fused.fused_key(8, 4096, 2048, torch.bfloat16, 2)
    got = fused.honoured_keys(key)
    assert {"BM", "BN", "BK", "SPLIT_K", "ONE_SHOT", "BLOCK_C"} <= set(got)
    real = LA.linear_allreduce_config

    def only_bn(M, N, K, local, dtype, one_shot=None, device=None):  # a launcher that applies nothing but BN
        from fusedlis import tuning

        t = tuning.lookup("linear_allreduce", {"M": M, "N": N, "K": K, "dtype": dtype, "local": local})
        with fused._lookup_answer(None):
            cfg = real(M, N, K, local, dtype, one_shot, device)
        if t and "BN" in t:
            cfg["BN"] = t["BN"]
        return cfg

    monkeypatch.setattr(LA, "linear_allreduce_config", only_bn)
    assert fused.honoured_keys(key) == ("BN",)
    space = fused.linear_allreduce_configs(key)  # candidates keep only what the launcher applies
    assert all(set(c) == {"BN"} for c in space) and len(space) == len({c["BN"] for c in space}) >= 2


@pytest.mark.parametrize("M,N,K,local", [(1, 64, 32, 2), (8, 64, 64, 2), (17, 256, 32, 4)])
def test_fused_space_default_first_valid_and_correct_in_the_launcher(M, N, K, local):
    key = fused.fused_key(M, N, K, torch.float32, local)
    space = fused.linear_allreduce_configs(key)
    default = fused.linear_allreduce_default_config(key)
    assert space[0] == default and len(space) >= 3
    assert len({search.config_id(c) for c in space}) == len(space)
    assert all(set(c) == set(default) for c in space)
    full = LA.linear_allreduce_config(M, N, K, local, torch.float32)
    for c in space:
        if not c.get("ONE_SHOT", full["ONE_SHOT"]):  # two-shot chunks must be whole tiles, or the launcher raises
            assert N % (local * c["BN"]) == 0
        assert _simulate(key, c) < 1e-5, c


def test_two_shot_space_drops_tiles_the_launcher_rejects():
    key = fused.fused_key(32, 384, 64, torch.float32, 4)  # two-shot (M > 16, 4 GPUs/node): 96 columns a GPU
    assert LA.linear_allreduce_config(32, 384, 64, 4, torch.float32)["ONE_SHOT"] is False
    space = fused.linear_allreduce_configs(key)
    assert {c["BN"] for c in space if not c["ONE_SHOT"]} <= {16, 32}  # wider tiles do not divide a 96-column chunk
    assert any(not c["ONE_SHOT"] for c in space) and any(c["ONE_SHOT"] for c in space)


def test_fused_estimate_prunes_oversized_tiles():
    key = fused.fused_key(64, 8192, 14336, torch.bfloat16, 2)
    big = {"USE_DOT": True, "BM": 64, "BN": 256, "BK": 256, "num_warps": 4, "num_stages": 6}
    kept, pruned = search.prune(fused.linear_allreduce_configs(key) + [big], lambda c: fused.estimate_fused(key, c))
    assert [c for c, _ in pruned] == [big] and "shared memory" in pruned[0][1]
    assert big not in kept and len(kept) == len(fused.linear_allreduce_configs(key))


def test_fused_cache_round_trip_reaches_the_launcher(iso):
    """A tuned entry written by the tuner is what `linear_allreduce_config` then launches with."""
    (p,) = model_problems(load_config("llama-3.1-8b"), 2, [8], ["fused"], layers=["o"], gpus_per_node=2)
    default = fused.linear_allreduce_default_config(p.key)
    target = next(c for c in fused.linear_allreduce_configs(p.key) if c["BN"] != default["BN"])

    class Prefers(FakeBench):  # synthetic surface with its optimum at `target`
        def time(self, config, effort=1):
            return 10.0 if config == target else 20.0

    (out,) = tune([p], Prefers, progress=False)
    assert out.best == target and out.kept_default is False and out.default == default
    path = iso / "fused.json"
    cache.merge_entries([out.entry("fake")], path=path, fp=fingerprint.current())
    entry = next(e for *_, e in cache.iter_entries(cache.read(path)))
    assert entry["op"] == "linear_allreduce" and entry["config"] == target and entry["kept_default"] is False
    before = LA.linear_allreduce_config(8, 4096, 2048, 2, torch.bfloat16)
    iso_env = {"FUSEDLIS_TUNING_FILE": str(path)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in iso_env.items():
            mp.setenv(k, v)
        _lookup.invalidate()
        after = LA.linear_allreduce_config(8, 4096, 2048, 2, torch.bfloat16)
        batch5 = LA.linear_allreduce_config(5, 4096, 2048, 2, torch.bfloat16)  # bucketed: M=8's entry
    _lookup.invalidate()
    assert {k: after[k] for k in target} == target != {k: before[k] for k in target}
    assert {k: batch5[k] for k in target} == target


def _noisy(times, noise, seed=0):
    rng = random.Random(seed)

    def timer(cfg, effort=1):
        return times[cfg["id"]] * (1 + rng.uniform(-noise, noise))

    return timer


def test_candidate_within_noise_keeps_the_default():
    configs = [{"id": i} for i in range(6)]
    times = {0: 100.0, 1: 99.5, 2: 120.0, 3: 130.0, 4: 140.0, 5: 150.0}  # 0 is the default
    res = search.search(configs, _noisy(times, 0.03), default=configs[0], confirm_rounds=5, min_gain=0.01)
    assert res.best == configs[0] and res.noise > 0.01 and res.margin == res.noise
    res = search.search(configs, _noisy({**times, 1: 70.0}, 0.03), default=configs[0], confirm_rounds=5,
                        min_gain=0.01)
    assert res.best == configs[1] and res.best_us < res.default_us * (1 - res.margin)
    # exact timer, one round: the old rule (1% gain) still applies
    res = search.search(configs, lambda c, e: times[c["id"]], default=configs[0], min_gain=0.01)
    assert res.best == configs[0] and res.noise == 0.0 and res.challenger == configs[1]


def test_tuner_adds_a_missing_default_and_stores_it_when_nothing_beats_it():
    (p,) = model_problems(load_config("llama-3.1-8b"), 2, [8], ["linear"], layers=["o"])
    timed = []

    class NoDefault(FakeBench):
        def configs(self):
            return [c for c in super().configs() if c != self.default()]

        def time(self, config, effort=1):
            timed.append(config)
            return 5.0 if config == self.default() else 6.0

    (out,) = tune([p], NoDefault, progress=False, confirm_rounds=3, min_gain=0.01)
    b = NoDefault(p)
    assert out.best == b.default() and out.kept_default is True and out.n_configs == len(b.configs()) + 1
    assert out.best_us == out.default_us == 5.0 and b.default() in timed
    assert out.row()["kept_default"] is True


def test_allreduce_candidates_follow_the_comm_modules(monkeypatch):
    monkeypatch.setattr("fusedlis.comm.device.DEVICE_ALGORITHMS", ("one_shot", "one_shot_ll", "nvrar"))
    assert allreduce_algorithms() == ("one_shot", "one_shot_ll", "nvrar", "nccl")

    class FakeAR:  # AllReduce._tuned that knows only some names
        def _tuned(self, nbytes):
            from fusedlis.tuning import lookup

            alg = (lookup("allreduce", {"nbytes": nbytes}) or {}).get("algorithm")
            return alg if alg in ("one_shot", "nccl") else None

    ar = FakeAR()
    assert [a for a in allreduce_algorithms() if _honoured_algorithm(ar, a, 8192)] == ["one_shot", "nccl"]
    from fusedlis.comm.allreduce import AllReduce

    real = AllReduce.__new__(AllReduce)
    real.topology = SimpleNamespace(num_nodes=1, gpus_per_node=2)
    real.dtype, real.world_size = torch.bfloat16, 2
    assert _honoured_algorithm(real, "two_shot", 8192) and not _honoured_algorithm(real, "no_such_alg", 8192)


def test_fused_bench_needs_ranks():
    (p,) = model_problems(load_config("llama-3.1-8b"), 2, [1], ["fused"], layers=["o"])
    with pytest.raises(SkipOp, match="torchrun"):
        fused.FusedBench(p)


def test_cli_fake_dry_run_attention_allreduce_fused(iso, capsys):
    out, csvp = iso / "t.json", iso / "r.csv"
    rc = tune_main(["--model", "llama-3.1-8b", "--tp", "2", "--batch", "1,32", "--fake-timer", "--out", str(out),
                    "--csv", str(csvp), "--no-progress", "--ops", "attention,allreduce,fused"])
    assert rc == 0
    rows = list(csv.DictReader(open(csvp)))
    by_op = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    assert sorted(by_op) == ["allreduce", "decode_attention", "linear_allreduce"]
    assert all(r["status"] == "skipped" and "synthetic" in r["message"] for r in by_op["allreduce"])
    assert len(by_op["linear_allreduce"]) == 4 and len(by_op["decode_attention"]) == 2
    for r in by_op["linear_allreduce"] + by_op["decode_attention"]:
        assert r["status"] == "tuned" and r["lookup_hit"] == "True" and r["timer"] == "fake"
        assert float(r["tuned_us"]) <= float(r["default_us"])
        assert float(r["lookup_us"]) == pytest.approx(float(r["tuned_us"]))
    entries = [e for *_, e in cache.iter_entries(cache.read(out))]
    assert sorted({e["op"] for e in entries}) == ["decode_attention", "linear_allreduce"]
    assert all(set(e["config"]) <= set(fused.TUNABLE) for e in entries if e["op"] == "linear_allreduce")
    assert "fused o M=32 K=2048 N=4096 local=2" in capsys.readouterr().out


def test_problem_label_for_fused():
    p = Problem("linear_allreduce", "down", fused.fused_key(8, 4096, 7168, torch.bfloat16, 2))
    assert p.label == "fused down M=8 K=7168 N=4096 local=2"


def test_multi_gpu_script_fake_run(tmp_path):
    """bench/gpu_tune_multi.sh end to end on CPU (synthetic timer, gloo ranks under torchrun): the files it
    hands back, at most 8, and the before/after check over every CSV."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "FUSEDLIS_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(["bash", os.path.join(root, "bench", "gpu_tune_multi.sh"), "--fake"], env=env,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["tune_fake_llama-3.1-8b_tp2_attention.csv", "tune_fake_llama-3.1-8b_tp2_attention.png",
                            "tune_fake_llama-3.1-8b_tp2_allreduce+fused.csv",
                            "tune_fake_llama-3.1-8b_tp2_allreduce+fused.png", "tune_multi_fake_summary.txt",
                            "tune_multi_fake_extras.tgz", "tuning_fake.json"])
    summary = (out / "tune_multi_fake_summary.txt").read_text()
    assert summary.count(": exit 0 after") == 3 and "TIMED OUT" not in summary
    assert "decode_attention: 4 tuned" in summary and "linear_allreduce: 8 tuned" in summary
    assert "after slower than before on 0 []" in summary
    ops = {e["op"] for *_, e in cache.iter_entries(cache.read(out / "tuning_fake.json"))}
    assert ops == {"decode_attention", "linear_allreduce"}
    import tarfile

    with tarfile.open(out / "tune_multi_fake_extras.tgz") as t:
        assert "./tune_fake_llama-3.1-70b_tp2_fused.csv" in t.getnames() or \
            "tune_fake_llama-3.1-70b_tp2_fused.csv" in t.getnames()
