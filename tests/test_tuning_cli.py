"""Tuning pipeline on CPU: model shapes, key agreement with the launchers, benches, the `tune` CLI."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fusedlis.tuning import cache, fingerprint, search
from fusedlis.tuning.bench import FakeBench, GpuBench, SkipOp
from fusedlis.tuning.cli import main as tune_main
from fusedlis.tuning.keys import normalize_key
from fusedlis.tuning.shapes import Problem, kernel_module, load_config, model_problems
from fusedlis.tuning.tuner import tune, verify
from tests._tuning_helpers import TINY, iso  # noqa: F401  (iso: fixture)

# Kernels run on the GPU when there is one, else in the Triton interpreter (conftest sets it up).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_llama_8b_tp2_shapes_per_rank():
    probs = model_problems(load_config("llama-3.1-8b"), 2, [1, 8, 32, 64])
    lin = {(p.layer, p.key["M"]): p.key for p in probs if p.op == "linear"}
    assert len(lin) == 5 * 4
    assert (lin[("qkv", 8)]["K"], lin[("qkv", 8)]["N"]) == (4096, (32 + 2 * 8) * 128 // 2)
    assert (lin[("o", 8)]["K"], lin[("o", 8)]["N"]) == (32 * 128 // 2, 4096)
    assert (lin[("gate_up", 8)]["K"], lin[("gate_up", 8)]["N"], lin[("gate_up", 8)]["activation"]) == \
        (4096, 2 * 14336 // 2, "swiglu")
    assert (lin[("down", 8)]["K"], lin[("down", 8)]["N"]) == (14336 // 2, 4096)
    assert lin[("lm_head", 1)]["N"] == -(-128256 // 2)
    att = [p.key for p in probs if p.op == "decode_attention"]
    assert [(k["B"], k["Hq"], k["Hkv"], k["D"], k["S"]) for k in att] == \
        [(b, 16, 4, 128, 4096) for b in (1, 8, 32, 64)]


@pytest.mark.parametrize("tp,batches,layers", [(3, [1], ["qkv"]), (2, [0], ["qkv"]), (2, [1], ["mlp"])])
def test_bad_shape_requests_raise(tp, batches, layers):
    with pytest.raises(ValueError):
        model_problems(load_config("llama-3.1-8b"), tp, batches, layers=layers)


def _captured_key(monkeypatch, op, call):
    seen = []
    monkeypatch.setattr("fusedlis.tuning.lookup", lambda o, k: (seen.append((o, dict(k))), None)[1])
    call()
    assert seen and seen[0][0] == op
    return seen[0][1]


@pytest.mark.parametrize("layer", ["qkv", "gate_up", "lm_head"])
def test_tuner_keys_equal_what_the_linear_launcher_asks_for(monkeypatch, layer):
    (p,) = model_problems(TINY, 2, [3], ["linear"], dtype=torch.float32, layers=[layer])
    mod = kernel_module("linear")
    x = torch.randn(3, p.key["K"], device=DEV)
    w = torch.randn(p.key["N"], p.key["K"], device=DEV)
    act = None if p.key["activation"] == "none" else p.key["activation"]
    asked = _captured_key(monkeypatch, "linear", lambda: mod.linear(x, w, activation=act))
    assert normalize_key(asked) == normalize_key(p.key)


def test_tuner_keys_equal_what_the_attention_launcher_asks_for(monkeypatch):
    (p,) = model_problems(TINY, 2, [2], ["attention"], dtype=torch.float32, seq_lens=[32])
    k = p.key
    mod = kernel_module("attention")
    q = torch.randn(2, k["Hq"], k["D"], device=DEV)
    kc = torch.randn(2, k["Hkv"], k["S"], k["D"], device=DEV)
    lens = torch.tensor([5, 32], dtype=torch.int32, device=DEV)
    asked = _captured_key(monkeypatch, "decode_attention",
                          lambda: mod.decode_attention(q, kc, kc.clone(), lens, 0.25))
    assert normalize_key(asked) == normalize_key(p.key)


def test_fake_bench_pipeline_finds_surface_optimum():
    (p,) = model_problems(load_config("llama-3.1-8b"), 2, [8], ["linear"], layers=["down"])
    b = FakeBench(p)
    kept, _ = search.prune(b.configs(), b.estimate)
    (out,) = tune([p], FakeBench, progress=False)
    want = min(kept + [b.default()], key=b.time)
    assert out.status == "tuned" and out.best_us == pytest.approx(b.time(want))
    assert out.best_us <= out.default_us


def test_missing_op_is_skipped_with_a_message():
    msgs = []
    p = Problem("no_such_op", "x", {"M": 1})
    (out,) = tune([p], FakeBench, progress=False, log=msgs.append)
    assert out.status == "skipped" and "no_such_op" in out.message and len(msgs) == 1


def test_gpu_bench_code_path(iso):
    """The GPU bench's launcher calls, result check, baseline and lookup path (interpreter without CUDA)."""
    probs = (model_problems(TINY, 2, [2], ["linear"], dtype=torch.float32, layers=["gate_up"])
             + model_problems(TINY, 2, [2], ["attention"], dtype=torch.float32, seq_lens=[32]))
    make = lambda p: GpuBench(p, device=DEV, rep_ms=2)  # noqa: E731
    outs = tune(probs, make, progress=False)
    assert [o.status for o in outs] == ["tuned", "tuned"], [o.message for o in outs]
    for o in outs:
        assert o.best in make(o.problem).configs() or o.best == o.default
        assert o.baseline in ("cublas", "sdpa") and o.baseline_us > 0
    fp = fingerprint.current()
    cache.merge_entries([o.entry("interp") for o in outs], fp=fp)
    verify(outs, make, progress=False)
    assert [o.lookup_hit for o in outs] == [True, True]
    assert all(o.lookup_us > 0 for o in outs)


def test_gpu_bench_rejects_wrong_results(monkeypatch):
    (p,) = model_problems(TINY, 2, [2], ["linear"], dtype=torch.float32, layers=["qkv"])
    b = GpuBench(p, device=DEV)
    monkeypatch.setattr(b.mod, "linear_ref",
                        lambda x, w, activation=None: torch.ones(x.shape[0], w.shape[0], device=x.device))
    with pytest.raises(ValueError, match="wrong result"):
        b.time(b.default())


def test_gpu_bench_without_cuda_skips():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    (p,) = model_problems(TINY, 1, [1], ["linear"], layers=["qkv"])
    with pytest.raises(SkipOp, match="no CUDA"):
        GpuBench(p)


def test_cli_fake_run_writes_cache_csv_png_and_show(iso, capsys):
    out, csvp, png = iso / "t.json", iso / "r.csv", iso / "r.png"
    rc = tune_main(["--model", "llama-3.1-8b", "--tp", "2", "--batch", "1,8", "--fake-timer", "--out", str(out),
                    "--csv", str(csvp), "--plot", str(png), "--no-progress", "--layers", "qkv,down",
                    "--strategy", "halving"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "qkv M=8 K=4096 N=3072" in text and "vs default" in text
    rows = list(csv.DictReader(open(csvp)))
    skipped = [r for r in rows if r["op"] == "allreduce"]
    assert len(skipped) == 2 and all(r["status"] == "skipped" and "synthetic" in r["message"] for r in skipped)
    rows = [r for r in rows if r["op"] != "allreduce"]
    # linear qkv, down x 2 batches; attention x 2; fused (row-parallel down only) x 2
    assert len(rows) == 2 * 2 + 2 + 2
    assert sorted(r["label"] for r in rows if r["op"] == "linear_allreduce") == \
        ["fused down M=1 K=7168 N=4096 local=2", "fused down M=8 K=7168 N=4096 local=2"]
    for r in rows:
        assert r["status"] == "tuned" and r["timer"] == "fake" and r["lookup_hit"] == "True"
        assert float(r["tuned_us"]) <= float(r["default_us"])
        assert float(r["lookup_us"]) == pytest.approx(float(r["tuned_us"]))
    assert png.stat().st_size > 1000
    data = cache.read(out)
    assert len(list(cache.iter_entries(data))) == 8
    assert not (iso / "cache" / "tuning.json").exists()  # --out, not the user cache
    assert tune_main(["--show", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "<- this device" in shown and shown.count("linear") >= 4 and "decode_attention" in shown
    assert tune_main(["--show", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "fusedlis-tuning"


def test_cli_usage_errors(iso, capsys):
    assert tune_main(["--model", "llama-3.1-8b", "--fake-timer"]) == 2  # fake results need --out
    assert tune_main([]) == 2
    (iso / "bad.json").write_text("{")
    assert tune_main(["--show", "--out", str(iso / "bad.json")]) == 1
    with pytest.raises(SystemExit):
        tune_main(["--model", "x", "--batch", "0"])
    with pytest.raises(SystemExit):
        tune_main(["--model", "x", "--ops", "gemm"])


def test_registered_in_fusedlis_cli(capsys):
    from fusedlis.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tune", "--help"])
    assert e.value.code == 0
    assert "--fake-timer" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_two_ranks_split_shapes_and_write_once(iso):
    out = iso / "ranks.json"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fusedlis.tuning.cli", "--model", "llama-3.1-8b", "--tp", "2", "--batch",
             "1,8,32", "--fake-timer", "--out", str(out), "--no-progress", "--ops", "linear", "--layers", "o"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    res = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], res
    assert res[0][0].count("o M=") == 3 and res[1][0] == ""  # rank 0 prints the whole gathered table
    entries = list(cache.iter_entries(cache.read(out)))
    assert sorted(e["key"]["M"] for *_, e in entries) == [1, 8, 32]


def test_bench_script_fake_run(tmp_path):
    """bench/tune_gpu.sh end to end on CPU with the synthetic timer (the GPU run differs only in the timer)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "FUSEDLIS_CACHE_DIR": str(tmp_path / "cache"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", os.path.join(root, "bench", "tune_gpu.sh"), "--fake", "--out-dir", str(tmp_path),
                        "--ops", "attention", "--", "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    base = tmp_path / "tune_fake_llama-3.1-8b_tp2_attention"
    rows = list(csv.DictReader(open(f"{base}.csv")))
    assert [int(row["label"].split("B=")[1].split()[0]) for row in rows] == [1, 8, 32, 64]
    assert all(float(row["tuned_us"]) <= float(row["default_us"]) for row in rows)
    assert os.path.getsize(f"{base}.png") > 1000 and "vs default" in open(f"{base}.txt").read()
    assert len(list(cache.iter_entries(cache.read(tmp_path / "tuning_fake.json")))) == 4


def test_cli_allreduce_two_gloo_ranks_in_lockstep(iso):
    """The collective path: both ranks time the same algorithms in lockstep (gloo on CPU, where only the
    torch.distributed algorithm exists), agree on the result, and rank 0 writes world size + topology keys."""
    out = iso / "ar.json"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fusedlis.tuning.cli", "--model", "llama-3.1-8b", "--tp", "2", "--batch", "1,8",
             "--ops", "allreduce,fused", "--dtype", "float32", "--out", str(out), "--no-progress"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    res = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], res
    assert res[0][0].count("allreduce M=") == 2
    # the fused kernel stores into peer GPUs' memory: skipped on gloo ranks, on both alike, with the reason
    assert res[0][0].count("skipped: op 'fused' needs CUDA") == 4
    entries = sorted((e for *_, e in cache.iter_entries(cache.read(out))), key=lambda e: e["key"]["nbytes"])
    assert [e["key"]["nbytes"] for e in entries] == [1 * 4096 * 4, 8 * 4096 * 4]
    assert all(e["key"]["world_size"] == 2 and e["key"]["topology"] == "1x2" for e in entries)
    assert all(e["config"] == {"algorithm": "nccl"} and e["timer"].startswith("events") for e in entries)


def test_broken_config_space_fails_one_problem_not_the_pass():
    probs = model_problems(load_config("llama-3.1-8b"), 2, [1, 8], ["linear"], layers=["o"])

    class Broken(FakeBench):
        def configs(self):
            if self.key["M"] == 1:
                raise KeyError("BLOCK_Q")
            return super().configs()

    outs = tune(probs, Broken, progress=False)
    assert [o.status for o in outs] == ["failed", "tuned"] and "BLOCK_Q" in outs[0].message
