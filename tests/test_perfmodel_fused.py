"""Performance model: the measured fused linear_allreduce kernel (engine fused mode), on CPU.

`fusedlis calibrate` times `linear_allreduce(x, w, ws, residual, norm_weight, eps)`; here its measurement loop
runs with a fake kernel, fake timing functions and a fake single-process `torch.distributed`, the profile keeps
the table through JSON, and decode steps in fused mode use it (and fall back to the old model without it)."""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedlis.perfmodel import calibrate as cal
from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.hardware import ProfileError, get_hardware, profile_from_dict, save_profile
from fusedlis.perfmodel.step import (KERNELS_PER_STEP, _gemm, _kernel, kernels_per_step, row_parallel_shapes,
                                     step_time)
from fusedlis.perfmodel.volume import Layout, model_shape

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = model_shape("llama-3.1-8b")
LLAMA_70B = model_shape("llama-3.1-70b")


def _validate_module():
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(gpus: int = 2, scale: float = 1.0) -> tuple:
    """A synthetic (not measured) table for the 8B and 70B shapes at TP=2."""
    out = []
    for k, n in cal.fused_linear_shapes(gpus):
        base = 5e-6 + k * n * 2 / 4e12
        out.append((gpus, k, n, tuple((m, scale * (base + 0.1e-6 * m)) for m in (1, 8, 32, 64))))
    return tuple(out)


# ---------------------------------------------------------------- shapes and the measurement loop
def test_fused_linear_shapes_are_the_engine_row_parallel_shapes():
    """On 2 GPUs: Llama 8B o_proj 2048->4096, down 7168->4096; 70B o_proj 4096->8192, down 14336->8192 (the
    per-GPU K of the engine's row-parallel layers, as the step model looks them up)."""
    assert cal.fused_linear_shapes(2) == [(2048, 4096), (7168, 4096), (4096, 8192), (14336, 8192)]
    assert row_parallel_shapes(LLAMA_8B, 2) == [(2048, 4096), (7168, 4096)]
    assert row_parallel_shapes(LLAMA_70B, 2) == [(4096, 8192), (14336, 8192)]
    assert cal.FUSED_LINEAR_MS == (1, 8, 32, 64)


class _FakeDist:
    """Single-process stand-in for the collectives `_measure_fused_linear` calls: the all-reduce of a tensor is
    the tensor itself (the other rank contributes zeros), except the ok-flag (int32) can be failed on purpose."""

    def __init__(self, monkeypatch, fail_flag_at: int | None = None) -> None:
        self.log: list[str] = []
        self.flags = 0
        self.fail_flag_at = fail_flag_at

        def all_reduce(t, op=None, **kw):
            if t.dtype == torch.int32:
                self.flags += 1
                self.log.append(f"agree{int(t.item())}")
                if self.fail_flag_at is not None and self.flags == self.fail_flag_at:
                    t.zero_()  # "another rank failed"
            else:
                self.log.append("all_reduce")

        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: self.log.append("barrier"))
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)


class _FakeKernel:
    """linear_allreduce with the engine's signature: GEMM, (fake) all-reduce, residual, RMSNorm, into `out`."""

    def __init__(self, fail_at: tuple[int, int] | None = None) -> None:
        self.ws_args: list[tuple[int, int]] = []
        self.weights: list[int] = []
        self.fail_at = fail_at

    def make_ws(self, max_m: int, max_n: int):
        self.ws_args.append((max_m, max_n))
        return object()

    def __call__(self, x, w, ws, residual, norm_weight, eps, *, out):
        m, k = x.shape
        if self.fail_at == (k, m):
            raise RuntimeError("fake kernel failure")
        self.weights.append(id(w))
        y = x.float() @ w.float().T
        dist.all_reduce(y)
        h = y + residual.float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
        out[0].copy_(normed)
        out[1].copy_(h)
        return out


SHAPES = [(64, 32), (128, 32)]
MS = (1, 4, 8)


def _run(monkeypatch, kernel, fail_flag_at=None, iters=5, replays=7):
    fd = _FakeDist(monkeypatch, fail_flag_at)
    timed: list[tuple] = []
    vals = iter(range(1, 1000))

    def t_coll(fn, calls, reps):
        for _ in range(4):  # like warm-up calls: rotates the weights
            fn()
        timed.append(("coll", calls, reps))
        return next(vals) * 1e-6

    def t_local(fn, calls):
        fn()
        timed.append(("local", calls))
        return 0.5e-6

    rows = cal._measure_fused_linear(2, iters, replays, shapes=SHAPES, ms=MS, time_collective=t_coll,
                                     time_local=t_local, kernel=(kernel.make_ws, kernel), device="cpu",
                                     rotate_bytes=3 * 64 * 32 * 2)
    return rows, timed, fd


def test_measure_fused_linear_with_fake_kernel_and_timing(monkeypatch):
    k = _FakeKernel()
    rows, timed, fd = _run(monkeypatch, k)
    meas = [r for r in rows if r["kind"] == "fused_linear"]
    assert [(r["K"], r["N"], r["M"]) for r in meas] == [(kk, n, m) for kk, n in SHAPES for m in MS]
    # one timed value per point in order, in µs; the cuBLAS GEMM alone beside it
    assert [r["us"] for r in meas] == pytest.approx([float(i) for i in range(1, 7)])
    assert all(r["gemm_us"] == pytest.approx(0.5) and r["gpus"] == 2 for r in meas)
    assert not [r for r in rows if r["kind"] == "note"]
    # the workspace sized for the largest M and N; calls = max(copies, iters), replays passed through
    assert k.ws_args == [(8, 32)]
    copies_small = 3  # rotate_bytes / (64 * 32 * 2)
    assert timed[0] == ("coll", max(copies_small, 5), 7) and timed[1] == ("local", max(copies_small, 5))
    # weights rotated: several distinct copies used per point
    assert len(set(k.weights[:5])) > 1
    # the result was checked against the reference once (first shape, second M), and ranks agreed after each point
    assert fd.log.count("agree1") == 1 + len(SHAPES) * (1 + len(MS))
    hw = cal.profile_from_measurements(rows, get_hardware("h200-ndr"))
    assert [(g, kk, n, [m for m, _ in p]) for g, kk, n, p in hw.fused_linear_ar] == \
        [(2, 64, 32, [1, 4, 8]), (2, 128, 32, [1, 4, 8])]
    assert [t for *_, p in hw.fused_linear_ar for _, t in p] == pytest.approx([i * 1e-6 for i in range(1, 7)])
    assert any(s.startswith("fused linear_allreduce + residual + RMSNorm on 2 GPUs, K 64 -> N 32: M=1 1.0 us "
                            "(cuBLAS GEMM alone 0.5 us)") for s in hw.sources)


def test_measure_fused_linear_failure_is_recorded_not_raised(monkeypatch):
    """A kernel failure keeps the rows measured before it and ends the measurement with a note that reaches the
    profile's sources; a workspace failure measures nothing; another rank's failure stops this one too."""
    rows, _, _ = _run(monkeypatch, _FakeKernel(fail_at=(128, 4)))
    assert [(r["K"], r["M"]) for r in rows if r["kind"] == "fused_linear"] == [(64, 1), (64, 4), (64, 8), (128, 1)]
    notes = [r["impl"] for r in rows if r["kind"] == "note"]
    assert len(notes) == 1 and notes[0].startswith("fused linear_allreduce failed (K=128 N=32 M=4: RuntimeError")
    hw = cal.profile_from_measurements(rows, get_hardware("h200-ndr"))
    assert notes[0] in hw.sources
    assert [(k, n) for _, k, n, _ in hw.fused_linear_ar] == [(64, 32), (128, 32)]

    def no_ws(max_m, max_n):
        raise ImportError("no triton")

    k = _FakeKernel()
    k.make_ws = no_ws
    rows, timed, _ = _run(monkeypatch, k)
    assert timed == [] and [r["kind"] for r in rows] == ["note"]
    assert rows[0]["impl"] == "fused linear_allreduce: not measured (workspace: ImportError: no triton)"
    assert rows[0]["impl"] in cal.profile_from_measurements(rows, get_hardware("h200-ndr")).sources
    # the ok-flag of the 4th agreement (workspace, weights, M=1, M=4) comes back failed: M=4 is dropped
    rows, _, _ = _run(monkeypatch, _FakeKernel(), fail_flag_at=4)
    assert [r["M"] for r in rows if r["kind"] == "fused_linear"] == [1]
    assert "on another rank" in [r for r in rows if r["kind"] == "note"][0]["impl"]


def test_measure_allreduces_runs_the_fused_measurement():
    """calibrate's rank-collective measurement includes the fused kernel (source check: needs GPUs to run)."""
    import inspect

    src = inspect.getsource(cal._measure_allreduces)
    assert "_measure_fused_linear(world, iters, replays)" in src


def test_fused_linear_rows_survive_the_raw_csv(tmp_path):
    rows = [{"kind": "fused_linear", "impl": "fusedlis", "algo": "linear_allreduce+res+norm", "gpus": 2, "K": 2048,
             "N": 4096, "M": m, "bytes": 1, "us": 10.0 + m, "gemm_us": 8.0} for m in (1, 8)]
    rows.append(dict(rows[0], us=12.0))  # measured twice: the median
    cal.write_raw_csv(rows, tmp_path / "raw.csv")
    hw = cal.profile_from_measurements(cal.read_raw_csv(tmp_path / "raw.csv"), get_hardware("h200-ndr"))
    ((g, kk, n, pts),) = hw.fused_linear_ar
    assert (g, kk, n, [m for m, _ in pts]) == (2, 2048, 4096, [1, 8])
    assert [t for _, t in pts] == pytest.approx([11.5e-6, 18e-6])


# ---------------------------------------------------------------- profile
def test_profile_round_trip_with_fused_table(tmp_path):
    h = get_hardware("h200-ndr").with_(fused_linear_ar=_table())
    d = h.to_json()
    assert d["fused_linear_allreduce"][0] == {"gpus": 2, "K": 2048, "N": 4096, "M": [1, 8, 32, 64],
                                              "us": pytest.approx([t * 1e6 for _, t in _table()[0][3]])}
    back = profile_from_dict(d)
    assert [(g, k, n, [m for m, _ in p]) for g, k, n, p in back.fused_linear_ar] == \
        [(g, k, n, [m for m, _ in p]) for g, k, n, p in h.fused_linear_ar]
    for (_, _, _, p), (_, _, _, q) in zip(back.fused_linear_ar, h.fused_linear_ar):
        assert [t for _, t in p] == pytest.approx([t for _, t in q], rel=1e-12)
    save_profile(back, tmp_path / "p.json")
    again = get_hardware(str(tmp_path / "p.json"))
    assert [e[:3] for e in again.fused_linear_ar] == [e[:3] for e in back.fused_linear_ar]
    assert [t for *_, p in again.fused_linear_ar for _, t in p] == \
        pytest.approx([t for *_, p in back.fused_linear_ar for _, t in p], rel=1e-12)


def test_old_profiles_load_unchanged():
    """A profile without the table (those calibrated before the fused kernel was timed) loads with none and
    writes no such key; one with it keeps it through a round trip."""
    import json

    old = new = 0
    for p in sorted((ROOT / "bench" / "results").glob("calibrated_*.json")):
        h = get_hardware(str(p))
        if "fused_linear_allreduce" in json.loads(p.read_text()):
            new += 1
            assert h.fused_linear_ar and get_hardware(str(p)).to_json()["fused_linear_allreduce"]
        else:
            old += 1
            assert h.fused_linear_ar == ()
            assert "fused_linear_allreduce" not in h.to_json()
    assert old >= 1
    assert "fused_linear_allreduce" not in get_hardware("h200-ndr").to_json()


@pytest.mark.parametrize("bad, match", [
    ({"gpus": 2, "K": 1, "N": 1, "M": [1, 8], "us": [1.0]}, "same length"),
    ({"gpus": 2, "K": 1, "N": 1, "M": [1, 1], "us": [1.0, 2.0]}, "twice"),
    ({"gpus": 2, "K": 1, "N": 1, "M": [1], "us": [0.0]}, "> 0"),
    ({"gpus": 0, "K": 1, "N": 1, "M": [1], "us": [1.0]}, "gpus"),
    ({"gpus": 2, "K": 1.5, "N": 1, "M": [1], "us": [1.0]}, "'K'"),
    ("x", "object"),
])
def test_profile_rejects_bad_fused_table(bad, match):
    d = get_hardware("h200-ndr").to_json()
    d["fused_linear_allreduce"] = [bad]
    with pytest.raises(ProfileError, match=match):
        profile_from_dict(d, "p.json")
    d["fused_linear_allreduce"] = [{"gpus": 2, "K": 1, "N": 1, "M": [1], "us": [1.0]}] * 2
    with pytest.raises(ProfileError, match="twice"):
        profile_from_dict(d, "p.json")


def test_fused_linear_time_interpolates_in_m():
    h = get_hardware("h200-ndr").with_(fused_linear_ar=((2, 10, 20, ((8, 12e-6), (1, 10e-6), (32, 11e-6),
                                                                     (64, 20e-6))),))
    t = lambda m: h.fused_linear_time(2, 10, 20, m)  # noqa: E731
    assert t(1) == pytest.approx(10e-6) and t(8) == pytest.approx(12e-6)
    assert t(4.5) == pytest.approx(11e-6)  # linear between 1 and 8
    assert t(32) == pytest.approx(12e-6)  # 11 us (below M=8's 12 us: noise) raised to the running maximum
    assert t(48) == pytest.approx(16e-6)
    assert t(128) == pytest.approx(20e-6 + 64 * (8e-6 / 32))  # the last segment's slope continues
    assert h.fused_linear_time(2, 10, 21, 8) is None and h.fused_linear_time(4, 10, 20, 8) is None
    one = h.with_(fused_linear_ar=((2, 10, 20, ((8, 5e-6),)),))
    assert one.fused_linear_time(2, 10, 20, 1) == one.fused_linear_time(2, 10, 20, 64) == pytest.approx(5e-6)


# ---------------------------------------------------------------- decode step
def test_decode_fused_mode_uses_the_table_when_present():
    """With the table, a TP=2 decode step's o_proj + down_proj (GEMMs, 2L all-reduces, norms, launches) cost
    2L measured calls; the embedding all-reduce and the logits all-gather stay."""
    base = get_hardware("h200-ndr").with_(gpus_per_node=2, gemm_row_latency=0.1e-6)
    h = base.with_(fused_linear_ar=_table())
    lay, L = Layout(2, 1), LLAMA_8B.num_hidden_layers
    for b in (1, 8, 32, 64, 20):
        kw = dict(batch=b, context=512, prefill=False, allreduce="oneshot", allgather="nccl")
        plain = step_time(LLAMA_8B, lay, h, **kw)
        fused = step_time(LLAMA_8B, lay, h, fused_linear=True, **kw)
        per_layer = sum(h.fused_linear_time(2, k, n, b) for k, n in row_parallel_shapes(LLAMA_8B, 2))
        assert fused.detail["fused_linear_allreduce"] == pytest.approx(L * per_layer)
        # 8 kernels per layer, less the 2 RMSNorms (fused) and the 2 row-parallel GEMMs (in the fused calls)
        assert fused.overhead == pytest.approx(h.kernel_overhead * (L * 4 + KERNELS_PER_STEP))
        assert kernels_per_step(L, fused_linear=True) == L * 4 + KERNELS_PER_STEP
        hd, hq = LLAMA_8B.hidden_size, LLAMA_8B.num_attention_heads // 2
        gemms = sum(_gemm(h, (k * n + b * (k + n)) * 2, 2.0 * b * k * n, True, b)
                    for k, n in ((hq * LLAMA_8B.head_dim, hd), (LLAMA_8B.intermediate_size // 2, hd)))
        norms = 2 * _kernel(h, 2 * b * hd * 2, 0)
        assert plain.compute - fused.compute == pytest.approx(L * (gemms + norms), rel=1e-9)
        ar = coll.allreduce("oneshot", h, 1, 2, b * hd * 2).hiding_latency(h.latency_hidden("oneshot")).total
        assert fused.comm == pytest.approx(plain.comm - 2 * L * ar + L * per_layer, rel=1e-9)
        assert fused.detail["allreduce"] == pytest.approx(ar)  # the embedding's
    # the table says what the step costs: doubling it adds exactly the table again
    kw = dict(batch=8, context=512, prefill=False, allreduce="oneshot", fused_linear=True)
    a = step_time(LLAMA_8B, lay, h, **kw)
    b2 = step_time(LLAMA_8B, lay, base.with_(fused_linear_ar=_table(scale=2.0)), **kw)
    assert b2.total - a.total == pytest.approx(a.detail["fused_linear_allreduce"])


def test_decode_fused_mode_falls_back_without_the_table():
    """No table, a table without this model's shapes, another TP, prefill, or logical nodes: the old model."""
    base = get_hardware("h200-ndr").with_(gpus_per_node=2)
    kw = dict(batch=8, context=512, prefill=False, allreduce="oneshot")
    lay = Layout(2, 1)
    old = step_time(LLAMA_8B, lay, base, **kw).total
    assert step_time(LLAMA_8B, lay, base, fused_linear=True, **kw).total == old
    only70 = base.with_(fused_linear_ar=tuple(e for e in _table() if e[2] == 8192))
    assert step_time(LLAMA_8B, lay, only70, fused_linear=True, **kw).total == old
    only_o = base.with_(fused_linear_ar=_table()[:1])  # 8B o_proj only: both shapes are needed
    assert step_time(LLAMA_8B, lay, only_o, fused_linear=True, **kw).total == old
    h = base.with_(fused_linear_ar=_table())
    assert "fused_linear_allreduce" in step_time(LLAMA_70B, lay, h, fused_linear=True, **kw).detail
    pre = dict(kw, prefill=True)
    assert step_time(LLAMA_8B, lay, h, fused_linear=True, **pre).total == step_time(LLAMA_8B, lay, h, **pre).total
    h4 = h.with_(gpus_per_node=4)
    assert step_time(LLAMA_8B, Layout(4, 1), h4, fused_linear=True, **kw).total == \
        step_time(LLAMA_8B, Layout(4, 1), h4, **kw).total
    h1 = h.with_(gpus_per_node=1, inter=h.intra, inter_load_store=True)  # 2 logical nodes of 1 GPU
    kwn = dict(kw, allreduce="nvrar")
    assert step_time(LLAMA_8B, lay, h1, fused_linear=True, **kwn).total == step_time(LLAMA_8B, lay, h1, **kwn).total


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1.0, 500.0), min_size=1, max_size=5), st.integers(1, 128), st.integers(1, 128),
       st.floats(1.5, 10.0))
def test_fused_step_monotone_in_batch_and_never_slower_with_more_hbm(us, b1, b2, k):
    """Any measured table (noise included): a fused-mode decode step never gets faster with more rows, and
    more HBM bandwidth never slows it."""
    ms = (1, 8, 32, 64, 128)[:len(us)]
    table = tuple((2, kk, n, tuple((m, u * 1e-6) for m, u in zip(ms, us)))
                  for kk, n in row_parallel_shapes(LLAMA_8B, 2))
    h = get_hardware("h200-ndr").with_(gpus_per_node=2, fused_linear_ar=table, gemm_row_latency=0.1e-6)
    lo, hi = sorted((b1, b2))
    kw = dict(context=512, prefill=False, allreduce="oneshot", fused_linear=True)
    a = step_time(LLAMA_8B, Layout(2, 1), h, batch=lo, **kw).total
    b = step_time(LLAMA_8B, Layout(2, 1), h, batch=hi, **kw).total
    assert a <= b * (1 + 1e-12)
    fast = step_time(LLAMA_8B, Layout(2, 1), h.with_(hbm_bw=h.hbm_bw * k), batch=lo, **kw).total
    assert fast <= a * (1 + 1e-12)


# ---------------------------------------------------------------- validation script and CLI
def test_validate_decode_fused_rows_use_the_table(tmp_path):
    mod = _validate_module()
    f = tmp_path / "decode_tp2.csv"
    f.write_text("# device=fake date=2026-11-23T10:00\nmodel,tp,system,batch,context,ms_per_token,fuse_norm,fuse_rope\n"
                 "llama-3.1-8b,2,fusedlis-fused,8,512,5.0,0,1\nllama-3.1-8b,2,fusedlis-nccl,8,512,5.0,0,1\n")
    hw = get_hardware("h200-ndr")
    old, _ = mod.validate_decode(hw, [str(f)])
    new, _ = mod.validate_decode(hw.with_(fused_linear_ar=_table()), [str(f)])
    by_old, by_new = {r["impl"]: r for r in old}, {r["impl"]: r for r in new}
    assert by_old["fusedlis-fused"]["model"] == "oneshot"
    assert by_new["fusedlis-fused"]["model"] == "fused(measured)+oneshot"
    h2 = hw.with_(gpus_per_node=2, fused_linear_ar=_table())
    want = step_time(LLAMA_8B, Layout(2, 1), h2, batch=8, context=512, prefill=False, allreduce="oneshot",
                     allgather="nccl", fused_linear=True).total
    assert by_new["fusedlis-fused"]["predicted_us"] == pytest.approx(want * 1e6)
    assert by_new["fusedlis-fused"]["predicted_us"] != pytest.approx(by_old["fusedlis-fused"]["predicted_us"])
    assert by_new["fusedlis-nccl"]["predicted_us"] == by_old["fusedlis-nccl"]["predicted_us"]


def test_decode_fit_counts_kernels_as_the_step_model():
    """fit_decode reads each row's kernel count off step_time (fused norm, measured fused kernels included): its
    fit on rows generated with known terms recovers them, fused rows with a table among them."""
    mod = _validate_module()
    truth = get_hardware("h200-ndr").with_(peak_flops=1e30, kernel_overhead=6e-6, hbm_bw=3.9e12, gemm_flop_rate=0.0,
                                           gemm_row_latency=0.15e-6, fused_linear_ar=_table())
    cases = []
    for system, mode in (("fusedlis-nccl", "nccl"), ("fusedlis-fused", "fused")):
        for b in (1, 8, 32, 64):
            algo = "nccl" if mode == "nccl" else "oneshot"
            r = {"batch": str(b), "_ctx": "512", "_fuse": "0", "_seqk": "0", "_mode": mode, "system": system}
            t = step_time(LLAMA_8B, Layout(2, 1), truth.with_(gpus_per_node=2), **mod._decode_kw(r, algo)).total
            cases.append((r, algo, 1, t, LLAMA_8B, Layout(2, 1)))
    fit = mod.fit_decode(truth.with_(kernel_overhead=1e-6, hbm_bw=1e12, gemm_row_latency=0.0), cases)
    assert fit.kernel_overhead == pytest.approx(6e-6, rel=1e-6)
    assert fit.hbm_bw == pytest.approx(3.9e12, rel=1e-6)
    assert fit.gemm_row_latency == pytest.approx(0.15e-6, rel=1e-6)


def test_predict_cli_fused_linear(tmp_path, capsys):
    from fusedlis.perfmodel.cli import add_predict_parser

    prof = tmp_path / "p.json"
    save_profile(get_hardware("h200-ndr").with_(fused_linear_ar=_table()), prof)
    ap = argparse.ArgumentParser()
    add_predict_parser(ap.add_subparsers())
    out = {}
    for flag in ([], ["--fused-linear"]):
        a = ap.parse_args(["predict", "--model", "llama-3.1-8b", "--gpus", "2", "--gpus-per-node", "2",
                           "--hardware", str(prof), "--layouts", "tp", "--allreduce", "oneshot", "--batch", "8",
                           "--json", str(tmp_path / "o.json"), *flag])
        assert a.func(a) == 0
        import json

        out[bool(flag)] = json.loads((tmp_path / "o.json").read_text())["rows"][0]["token_ms"]
    h = get_hardware(str(prof))
    kw = dict(batch=8, context=1024 + 64, prefill=False, allreduce="oneshot")
    want = step_time(LLAMA_8B, Layout(2, 1), h.with_(gpus_per_node=2), fused_linear=True, **kw).total
    assert out[True] == pytest.approx(want * 1e3)
    assert not math.isclose(out[True], out[False])
