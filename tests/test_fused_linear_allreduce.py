"""Fused row-parallel GEMM + all-reduce (+ residual + RMSNorm) on CPU: the GPU kernel in the Triton
interpreter, every rank of a simulated world in one process (ranks run in lock-step between waits)."""

from __future__ import annotations

import importlib

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedlis.comm import simulate_all_reduce

la = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "output has unwritten (NaN-poisoned) elements"
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(W, M, N, K, dt, res, norm, gen):
    xs = [torch.randn(M, K, generator=gen).to(dt) for _ in range(W)]
    ws = [(torch.randn(N, K, generator=gen) / K ** 0.5).to(dt) for _ in range(W)]
    r = torch.randn(M, N, generator=gen).to(dt) if res else None
    nw = (1 + 0.2 * torch.randn(N, generator=gen)).to(dt) if norm else None
    return xs, ws, r, nw


def _check(outs, xs, ws, r, nw, dt):
    ref = la.linear_allreduce_ref([x.double() for x in xs], [w.double() for w in ws],
                                  None if r is None else r.double(), None if nw is None else nw.double())
    for o in outs:
        if nw is not None:
            assert _rel(o[0], ref[0]) < TOL[dt]
            assert _rel(o[1], ref[1]) < TOL[dt]
        else:
            assert _rel(o, ref) < TOL[dt]
    # every rank ends with the bitwise same result
    first = outs[0][0] if nw is not None else outs[0]
    for o in outs[1:]:
        assert torch.equal(o[0] if nw is not None else o, first)


# (world, gpus per node): one node, logical nodes of one GPU, and 2-level (2 nodes x 2 GPUs, 2 x 4)
TOPOS = [(2, 2), (2, 1), (4, 2), (4, 1), (8, 4)]


@settings(max_examples=8)
@given(topo=st.sampled_from(TOPOS), M=st.integers(1, 24), nblk=st.integers(1, 4), K=st.sampled_from([32, 48, 80]),
       dt=st.sampled_from([torch.float32, torch.float16]), one_shot=st.booleans(),
       mode=st.sampled_from(["plain", "res", "norm", "norm_nores"]), seed=st.integers(0, 2 ** 16))
def test_simulated_matches_reference(topo, M, nblk, K, dt, one_shot, mode, seed):
    W, G = topo
    N = 64 * G * nblk  # a whole number of BN=32 tiles per rank chunk
    gen = torch.Generator().manual_seed(seed)
    xs, ws, r, nw = _inputs(W, M, N, K, dt, mode == "res" or mode == "norm", mode.startswith("norm"), gen)
    wss = la.FusedAllReduceWorkspace.simulate(W, G, 64, 1024)
    outs = la.simulate_linear_allreduce(xs, ws, wss, r, nw, one_shot=one_shot)
    for w_ in wss:
        w_.check()
    _check(outs, xs, ws, r, nw, dt)


@pytest.mark.parametrize("one_shot", [True, False])
def test_bf16_gemv_path(one_shot):
    # bf16 only through the FMA (M <= 4) path: the interpreter's bf16 tl.dot is broken (triton#11584).
    gen = torch.Generator().manual_seed(5)
    xs, ws, r, nw = _inputs(2, 3, 256, 96, torch.bfloat16, True, True, gen)
    wss = la.FusedAllReduceWorkspace.simulate(2, 2, 8, 256)
    _check(la.simulate_linear_allreduce(xs, ws, wss, r, nw, one_shot=one_shot), xs, ws, r, nw, torch.bfloat16)


_GPU_TILES = sorted({(c["BM"], c["BN"], c["BK"], c["SPLIT_K"], c["num_warps"], c["num_stages"])
                     for M in (1, 8, 32, 64) for c in la.linear_allreduce_configs(
                         {"M": M, "N": 4096, "K": 7168, "dtype": torch.bfloat16, "local": 2}) if c["USE_DOT"]})


@pytest.mark.parametrize("tile", _GPU_TILES[:: max(1, len(_GPU_TILES) // 6)])
def test_gpu_tiles_with_split_k(tile):
    """GEMM tiles (and split-K) of the GPU search space compute the same thing (fp16, one- and two-shot)."""
    bm, bn, bk, split, nw, st = tile
    gen = torch.Generator().manual_seed(bm * bn + bk + split)
    M = {16: 3, 32: 20, 64: 40, 128: 70}[bm]
    K = 2 * bk * max(split, 1) + 32  # a ragged last split
    xs, ws, r, nw_ = _inputs(2, M, 256, K, torch.float16, True, True, gen)
    wss = la.FusedAllReduceWorkspace.simulate(2, 2, 128, 256)
    for one_shot in (True, False):
        cfg = {"USE_DOT": True, "BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": nw, "num_stages": st,
               "ONE_SHOT": one_shot}
        if not one_shot and 256 % (2 * bn):
            continue
        _check(la.simulate_linear_allreduce(xs, ws, wss, r, nw_, config=cfg), xs, ws, r, nw_, torch.float16)


@settings(max_examples=6, deadline=None)
@given(topo=st.sampled_from(TOPOS), M=st.integers(1, 9), split=st.sampled_from([2, 3, 4]),
       K=st.sampled_from([64, 96, 200]), one_shot=st.booleans(), norm=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_split_k_partials(topo, M, split, K, one_shot, norm, seed):
    """Split-K: unsummed per-split partials from every rank (ragged last split, splits fitted to K)."""
    W, G = topo
    N = 64 * G
    gen = torch.Generator().manual_seed(seed)
    xs, ws, r, nw = _inputs(W, M, N, K, torch.float32, norm, norm, gen)
    wss = la.FusedAllReduceWorkspace.simulate(W, G, 16, 512)
    cfg = {"USE_DOT": False, "BM": la._pow2(M), "BN": 32, "BK": 32, "SPLIT_K": split, "num_warps": 4,
           "num_stages": 1, "ONE_SHOT": one_shot}
    if not one_shot and N % (G * 32):
        cfg["ONE_SHOT"] = True
    assert la._fit_split(M, N, K, cfg, wss[0].layout) > 1
    _check(la.simulate_linear_allreduce(xs, ws, wss, r, nw, config=cfg), xs, ws, r, nw, torch.float32)


def test_split_fits_workspace():
    lay = la._Layout(8, 256, 2, 0)
    cfg = {"BM": 16, "BN": 32, "BK": 32, "SPLIT_K": 8}
    assert la._fit_split(1, 256, 1024, cfg, lay) == 8
    assert la._fit_split(2, 256, 1024, cfg, lay) == 4
    assert la._fit_split(8, 256, 1024, cfg, lay) == 1  # 8 partial copies of 8 x 256 exceed max_m * max_n
    assert la._fit_split(1, 256, 96, cfg, lay) == 3  # whole BK steps: 3 splits of 32
    # a workspace for batch 1 alone still holds split-K partials (the engine at max_batch_size=1)
    one = la._Layout(1, 4096, 2, 0)
    assert la._fit_split(1, 4096, 7168, dict(cfg, BK=128, SPLIT_K=4), one) == 4
    assert la._fit_split(1, 4096, 7168, dict(cfg, BK=128, SPLIT_K=16), one) == 8


def test_matches_comm_plan_executor():
    """Same sum as the comm package's NVRAR plan executor run on the per-rank GEMM partials."""
    W, G, M, N, K = 4, 2, 6, 256, 64
    gen = torch.Generator().manual_seed(11)
    xs, ws, _, _ = _inputs(W, M, N, K, torch.float32, False, False, gen)
    wss = la.FusedAllReduceWorkspace.simulate(W, G, 8, 256)
    for one_shot in (True, False):
        outs = la.simulate_linear_allreduce(xs, ws, wss, one_shot=one_shot)
        plan_out = simulate_all_reduce([x @ w.T for x, w in zip(xs, ws)], G, "nvrar")
        for o, p in zip(outs, plan_out):
            assert _rel(o, p) < 1e-5


def test_buffer_reuse_across_calls_and_shapes():
    """Consecutive calls of different shapes on one workspace (parity double buffering, step counter)."""
    W, G = 4, 2
    wss = la.FusedAllReduceWorkspace.simulate(W, G, 32, 512)
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 256, 64, True), (17, 256, 32, False), (1, 128, 96, False), (2, 256, 48, True)]
    for i, (M, N, K, one_shot) in enumerate(shapes):
        xs, ws, r, nw = _inputs(W, M, N, K, torch.float32, i % 2 == 0, i % 3 == 0, gen)
        outs = la.simulate_linear_allreduce(xs, ws, wss, r, nw, one_shot=one_shot)
        _check(outs, xs, ws, r, nw, torch.float32)
    assert all(w_.step() == 1 + len(shapes) for w_ in wss)


def test_on_comm_symmetric_workspace():
    """Buffers carved from fusedlis.comm.SymmetricWorkspace (CPU shared provider), reached via .fused_workspace."""
    from fusedlis.comm.symmetric import SymmetricWorkspace

    W, G, nbytes, words = 4, 2, 4 << 20, 256
    shared = torch.zeros(SymmetricWorkspace.shared_size(W, nbytes, words), dtype=torch.uint8)
    sws = [SymmetricWorkspace.from_shared(shared, r, W, G, nbytes, words) for r in range(W)]
    wss = [la.FusedAllReduceWorkspace.from_symmetric(sw, 8, 256) for sw in sws]

    class Comm:
        def __init__(self, ws):
            self.fused_workspace = ws

    assert la._as_workspace(Comm(wss[0])) is wss[0]
    gen = torch.Generator().manual_seed(21)
    xs, ws, r, nw = _inputs(W, 3, 256, 32, torch.float32, True, True, gen)
    _check(la.simulate_linear_allreduce(xs, ws, wss, r, nw, one_shot=False), xs, ws, r, nw, torch.float32)


@settings(max_examples=6, deadline=None)
@given(topo=st.sampled_from([(2, 1), (4, 1), (4, 2), (8, 2)]), M=st.integers(1, 9), nblk=st.integers(1, 3),
       one_shot=st.booleans(), mode=st.sampled_from(["plain", "norm"]), seed=st.integers(0, 2 ** 16))
def test_put_transport_rounds(topo, M, nblk, one_shot, mode, seed):
    """Inter-node rounds through the put-with-signal branch (the interpreter emulates the NVSHMEM put at the
    same symmetric offsets): same results as the reference, bitwise equal on every rank."""
    W, G = topo
    N = 64 * G * nblk
    gen = torch.Generator().manual_seed(seed)
    xs, ws, r, nw = _inputs(W, M, N, 40, torch.float32, mode == "norm", mode == "norm", gen)
    wss = la.FusedAllReduceWorkspace.simulate(W, G, 16, 512, transport="put")
    assert all(w_.transport == "put" for w_ in wss)
    for _ in range(2):  # both parities of the slots and signal words
        outs = la.simulate_linear_allreduce(xs, ws, wss, r, nw, one_shot=one_shot)
        for w_ in wss:
            w_.check()
        _check(outs, xs, ws, r, nw, torch.float32)


def test_transport_choice_and_errors():
    """from_symmetric picks peer stores where rail partners are reachable and refuses what cannot work."""
    from fusedlis.comm.symmetric import SymmetricWorkspace

    W, G, nbytes, words = 4, 2, 4 << 20, 256
    shared = torch.zeros(SymmetricWorkspace.shared_size(W, nbytes, words), dtype=torch.uint8)
    sws = [SymmetricWorkspace.from_shared(shared, r, W, G, nbytes, words) for r in range(W)]
    assert la.FusedAllReduceWorkspace.from_symmetric(sws[0], 8, 256).transport == "ptr"
    with pytest.raises(ValueError, match="NVSHMEM"):  # the shared CPU provider has no NVSHMEM
        la.FusedAllReduceWorkspace.from_symmetric(sws[1], 8, 256, transport="put")
    with pytest.raises(ValueError, match="transport"):
        la.FusedAllReduceWorkspace.from_symmetric(sws[2], 8, 256, transport="ib")
    sws[3].reachable = [True, True, True, False]  # a node whose GPUs do not reach each other
    with pytest.raises(NotImplementedError, match="node"):
        la.FusedAllReduceWorkspace.from_symmetric(sws[3], 8, 256)
    buf = torch.zeros(1 << 22, dtype=torch.uint8)
    with pytest.raises(ValueError, match="rail partner"):  # a partner on another host, no put transport
        la.FusedAllReduceWorkspace(rank=0, world_size=2, gpus_per_node=1, max_m=8, max_n=256, buffer=buf,
                                   base_ptrs=[buf.data_ptr(), 0])
    ws = la.FusedAllReduceWorkspace(rank=0, world_size=2, gpus_per_node=1, max_m=8, max_n=256, buffer=buf,
                                    base_ptrs=[buf.data_ptr(), 0], transport="put")
    table = ws.table.view(-1, ws.maxp)
    assert int(table[la._ROW_PE.value, 0]) == 1 and int(table[la._ROW_X.value, 0]) == 0


def test_single_rank_one_launch():
    """World of one: the real single-launch path (GEMM programs, finish programs, device step bump)."""
    ws = la.FusedAllReduceWorkspace.simulate(1, 1, 16, 512)[0]
    gen = torch.Generator().manual_seed(2)
    # The interpreter runs programs one after the other, so a row norm split over several chunk programs
    # (which wait for each other) cannot run in one launch there: norm with one chunk, plain with several.
    for M, N, K, norm in ((1, 256, 64, True), (9, 512, 40, False)):
        xs, wts, r, nw = _inputs(1, M, N, K, torch.float32, True, norm, gen)
        out = torch.full((M, N), float("nan"))
        out = (out, torch.full((M, N), float("nan"))) if norm else out
        got = la.linear_allreduce(xs[0], wts[0], ws, r, nw, out=out, config={"BLOCK_C": N} if norm else None)
        assert (got[0] if norm else got) is (out[0] if norm else out)
        ws.check()
        _check([got], xs, wts, r, nw, torch.float32)
    assert ws.step() == 3 and int(ws.seq[1]) == 0


def test_missing_peer_times_out_with_rank_and_step():
    wss = la.FusedAllReduceWorkspace.simulate(2, 2, 8, 256, max_spins=20)
    x = torch.randn(2, 32)
    w = torch.randn(256, 32)
    # only rank 1 runs: it waits forever for rank 0's tiles
    out = torch.full((2, 256), float("nan"))
    la._launch(x, w, out, None, None, None, wss[1], la._pick_config(2, 256, 32, wss[1], x.dtype, True, None),
               torch.float32, 1e-5)
    with pytest.raises(la.CommTimeoutError, match=r"rank 1\b.*step 1\b"):
        wss[1].check()


def test_fallback_comm_with_all_reduce():
    class Identity:  # a one-rank "comm" exposing only all_reduce
        def all_reduce(self, t):
            return t

    gen = torch.Generator().manual_seed(8)
    xs, ws, r, nw = _inputs(1, 3, 64, 32, torch.float32, True, True, gen)
    got = la.linear_allreduce(xs[0], ws[0], Identity(), r, nw)
    _check([got], xs, ws, r, nw, torch.float32)


def test_bad_inputs():
    ws = la.FusedAllReduceWorkspace.simulate(1, 1, 8, 128)[0]
    x, w = torch.randn(2, 16), torch.randn(64, 16)
    with pytest.raises(TypeError, match="w_shard"):
        la.linear_allreduce(x, w.half(), ws)
    with pytest.raises(ValueError, match="K="):
        la.linear_allreduce(x, torch.randn(64, 8), ws)
    with pytest.raises(ValueError, match="capacity"):
        la.linear_allreduce(torch.randn(9, 16), w, ws)
    with pytest.raises(ValueError, match="residual"):
        la.linear_allreduce(x, w, ws, residual=torch.randn(2, 32))
    with pytest.raises(ValueError, match="norm_weight"):
        la.linear_allreduce(x, w, ws, norm_weight=torch.randn(32))
    with pytest.raises(TypeError, match="comm"):
        la.linear_allreduce(x, w, object())
    with pytest.raises(ValueError, match="power of two"):
        la.FusedAllReduceWorkspace.simulate(3, 1, 8, 128)
    wss = la.FusedAllReduceWorkspace.simulate(2, 2, 8, 128)
    with pytest.raises(ValueError, match="two-shot"):
        la.simulate_linear_allreduce([x, x], [torch.randn(96, 16)] * 2, wss, one_shot=False)


_COMPILE_SCRIPT = r"""
import importlib, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
la = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")
sig = {n: "*bf16" for n in ("x_ptr", "w_ptr", "out_ptr", "res_out_ptr", "res_ptr", "nw_ptr")}
sig.update({"table_ptr": "*i64", "seq_ptr": "*i32", "err_ptr": "*i32"})
for n in ("M", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "LOCAL_RANK", "shard_n", "MN_CAP", "M_CAP", "NC_CAP", "NC"):
    sig[n] = "i32"
sig.update({"eps": "fp32", "budget": "i64", "n_gemm": "i32", "n_fin": "i32"})
from fusedlis.comm.symmetric import nvshmem_device_library
lib = nvshmem_device_library()
cases = [(True, 0, False, 1, False, False), (False, 1, True, 4, False, False), (True, 0, True, 2, True, False)]
if lib:  # inter-node rounds by NVSHMEM put-with-signal (what a cluster of several hosts runs)
    cases += [(True, 2, False, 1, False, True), (False, 1, True, 2, False, True)]
for one_shot, rounds, use_dot, split, pdl, put in cases:
    c = dict(MAXP=8, LOCAL=2, LOCAL_P2=2, ROUNDS=rounds, ONE_SHOT=one_shot, PART=tl.bfloat16,
             BM=16 if use_dot else 1, BN=32, BK=128 if use_dot else 256, SPLIT=split, LS_P2=2 * split,
             USE_DOT=use_dot, EVEN_K=True, IEEE=False,
             HAS_RES=True, HAS_NORM=True, BLOCK_C=128, NC_P2=16, DO_GEMM=True, DO_FINISH=True,
             W_BEGIN=0, W_END=1 << 20, FENCE=True, BUMP=True, PDL=pdl, PF_LINES=4 if pdl else 0, PUT=put)
    src = ASTSource(fn=la._linear_allreduce_kernel, signature={**sig, **{k: "constexpr" for k in c}}, constexprs=c)
    opts = {"num_warps": 4, "num_stages": 3}
    if put:
        opts["extern_libs"] = {"libnvshmem_device": lib}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = k.asm["ptx"]
    assert ("nvshmemx_putmem_signal_block" in ptx) == put, put
    assert "%globaltimer" in ptx  # every wait bounded by time
    # PDL (opt-in): wait on the previous grid, let the next one launch, L2 prefetch of weights before the wait
    assert (("griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
             and "prefetch.global.L2" in ptx) == pdl), pdl
    assert "ld.volatile" in ptx, "LL partials must be polled with volatile loads"
    if rounds:  # inter-node rounds and two-shot all-gather: flags with system-scope acquire / release
        assert "fence.acq_rel.sys" in ptx and "atom" in ptx and "nanosleep" in ptx, "missing sync instructions"
    else:  # one-shot: LL words only, no system-scope fence anywhere
        assert "fence.acq_rel.sys" not in ptx and ".sys" not in ptx, "one-shot must not fence at system scope"
print("COMPILED_OK", len(cases))
"""


def test_gpu_kernel_compiles_for_hopper():
    """The GPU variant (inline-asm fence, nanosleep, sys-scope atomics) compiles to sm_90 without a GPU."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr.lower() and "not found" in r.stderr.lower():
        pytest.skip("no ptxas in this triton install")
    assert r.returncode == 0 and "COMPILED_OK" in r.stdout, r.stderr[-3000:]


def test_measured_table_lookup(monkeypatch):
    """The shipped table of tuned picks: smallest measured M >= M for (N, K, GPUs per node), on its GPU model."""
    import json
    from pathlib import Path

    from fusedlis.triton_kernels._measured import read_measured

    raw = json.loads((Path(la.__file__).parent / "linear_allreduce_measured.json").read_text())
    dev_name = next(k for k in raw if not k.startswith("_"))
    entries = read_measured("linear_allreduce_measured.json")
    assert entries and all({"N", "K", "M", "local"} <= set(f) <= {"N", "K", "M", "local", "norm"}
                           for _, f, _ in entries)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: dev_name)
    monkeypatch.setattr(la, "_MEASURED", None)
    cuda = torch.device("cuda")
    table = raw[dev_name]
    assert la.measured_fused_config(1, 4096, 7168, 2, torch.bfloat16, cuda) == table["N=4096,K=7168,M=1,local=2"]
    # with the norm: its own pick where the table has one, else the plain one
    assert la.measured_fused_config(1, 4096, 7168, 2, torch.bfloat16, cuda, norm=True) == table.get(
        "N=4096,K=7168,M=1,local=2,norm=1", table["N=4096,K=7168,M=1,local=2"])
    assert la.measured_fused_config(3, 4096, 7168, 2, torch.bfloat16, cuda) == table["N=4096,K=7168,M=8,local=2"]
    assert la.measured_fused_config(1, 4096, 7168, 4, torch.bfloat16, cuda) is None  # other node size
    assert la.measured_fused_config(1, 4096, 7168, 2, torch.float16, cuda) is None
    assert la.measured_fused_config(1, 4096, 7168, 2, torch.bfloat16, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Other GPU")
    assert la.measured_fused_config(1, 4096, 7168, 2, torch.bfloat16, cuda) is None
    assert read_measured("no_such_table.json") == []


def test_prefer_unfused_marks_only_measured_shapes(monkeypatch):
    """The shipped table marks 8B TP=2 norm calls at 33-64 rows as faster unfused (measured in decode); other
    rows, the 70B shapes, plain calls and other GPUs keep the fused kernel."""
    import json
    from pathlib import Path

    raw = json.loads((Path(la.__file__).parent / "linear_allreduce_measured.json").read_text())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(la, "_MEASURED", None)
    cuda, bf = torch.device("cuda"), torch.bfloat16
    marked = [k for k, v in raw["NVIDIA H200"].items() if v.get("prefer_unfused")]
    assert sorted(marked) == ["N=4096,K=2048,M=64,local=2,norm=1", "N=4096,K=7168,M=64,local=2,norm=1"]
    for K in (2048, 7168):
        assert la.unfused_measured_faster(64, 4096, K, 2, bf, cuda, norm=True)
        assert la.unfused_measured_faster(33, 4096, K, 2, bf, cuda, norm=True)
        assert not la.unfused_measured_faster(32, 4096, K, 2, bf, cuda, norm=True)
        assert not la.unfused_measured_faster(64, 4096, K, 2, bf, cuda, norm=False)
        # the marked entry still gives the kernel its tuned config when called directly
        pick = la.measured_fused_config(64, 4096, K, 2, bf, cuda, norm=True)
        cfg = la._resolve_config(64, 4096, K, 2, bf, None, None, pick)
        assert "prefer_unfused" not in cfg and (cfg["BM"], cfg["BN"], cfg["SPLIT_K"]) == (
            pick["BM"], pick["BN"], pick["SPLIT_K"])
    assert not la.unfused_measured_faster(64, 8192, 4096, 2, bf, cuda, norm=True)  # 70B o_proj
    assert not la.unfused_measured_faster(64, 4096, 2048, 2, bf, torch.device("cpu"), norm=True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Other GPU")
    assert not la.unfused_measured_faster(64, 4096, 2048, 2, bf, cuda, norm=True)


def test_norm_picks_and_search_space(monkeypatch):
    """norm=1 picks answer norm calls only (plain calls keep the plain pick); the norm search space varies the
    finish chunk width and split-K around the default and keeps its GEMM tile."""
    import fusedlis.triton_kernels._measured as measured

    plain = {"USE_DOT": True, "BM": 16, "BN": 64, "BK": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 4,
             "ONE_SHOT": True, "BLOCK_C": 128}
    normed = dict(plain, BLOCK_C=1024)
    monkeypatch.setattr(measured, "read_measured", lambda name: [
        ("GPU X", {"N": "4096", "K": "2048", "M": "1", "local": "2"}, plain),
        ("GPU X", {"N": "4096", "K": "2048", "M": "8", "local": "2"}, dict(plain, SPLIT_K=4)),
        ("GPU X", {"N": "4096", "K": "2048", "M": "1", "local": "2", "norm": "1"}, normed)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU X")
    monkeypatch.setattr(la, "_MEASURED", None)
    cuda = torch.device("cuda")
    assert la.measured_fused_config(1, 4096, 2048, 2, torch.bfloat16, cuda) == plain
    assert la.measured_fused_config(1, 4096, 2048, 2, torch.bfloat16, cuda, norm=True) == normed
    # no norm pick at M = 8: the plain one
    assert la.measured_fused_config(8, 4096, 2048, 2, torch.bfloat16, cuda, norm=True) == dict(plain, SPLIT_K=4)
    monkeypatch.setattr(la, "_key_device", lambda: cuda)
    monkeypatch.setattr(la, "_gemm_default", lambda M, N, K, dt, dev: dict(plain))
    key = {"M": 8, "N": 4096, "K": 2048, "dtype": "bfloat16", "local": 2, "norm": 1}
    space = la.linear_allreduce_configs(key)
    assert space[0]["SPLIT_K"] == 4 and len({json.dumps(c, sort_keys=True) for c in space}) == len(space)
    assert {c["BLOCK_C"] for c in space} == {128, 256, 512, 1024, 2048, 4096}
    assert {c["SPLIT_K"] for c in space} == {2, 4, 8}
    assert all({k: v for k, v in c.items() if k not in ("BLOCK_C", "SPLIT_K")}
               == {k: v for k, v in space[0].items() if k not in ("BLOCK_C", "SPLIT_K")} for c in space)


def test_fused_pdl_experiment_knob(monkeypatch):
    """FUSEDLIS_FUSED_PDL parses into the launch config; on a CPU the launch stays plain and exact."""
    monkeypatch.delenv("FUSEDLIS_FUSED_PDL", raising=False)
    assert la._fused_pdl_experiment() == {}
    monkeypatch.setenv("FUSEDLIS_FUSED_PDL", "0")
    assert la._fused_pdl_experiment() == {}
    monkeypatch.setenv("FUSEDLIS_FUSED_PDL", "1,pf=8")
    assert la._fused_pdl_experiment() == {"PDL": True, "PF_LINES": 8}
    for bad in ("2", "1,pf=3", "1,x"):
        monkeypatch.setenv("FUSEDLIS_FUSED_PDL", bad)
        with pytest.raises(ValueError, match="FUSEDLIS_FUSED_PDL"):
            la._fused_pdl_experiment()
    monkeypatch.setenv("FUSEDLIS_FUSED_PDL", "1")
    ws = la.FusedAllReduceWorkspace.simulate(1, 1, 4, 256)[0]
    gen = torch.Generator().manual_seed(8)
    xs, wts, r, nw = _inputs(1, 3, 256, 48, torch.float32, True, False, gen)
    got = la.linear_allreduce(xs[0], wts[0], ws, r, None, out=torch.full((3, 256), float("nan")))
    ws.check()
    _check([got], xs, wts, r, None, torch.float32)
