"""Flag/sequence protocol of the Triton all-reduce kernels, in the interpreter: ranks are forked processes
sharing one memory region (peer pointers are valid in every process), spin-waits bounded."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from fusedlis.comm import kernels as K
from fusedlis.comm.device import DeviceAllReduce
from fusedlis.comm.symmetric import CommTimeoutError, SymmetricWorkspace
from fusedlis.comm.topology import Topology

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter protocol test (CPU only)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
NBYTES, FLAGS = 1 << 20, 4096


def _inputs(call, rank, n, dtype):
    g = torch.Generator().manual_seed(1000 * call + rank)
    x = torch.randn(n, generator=g).to(dtype)
    x[5::7] = -0.0  # the LL protocol's encoding must not mistake signed zeros for empty slots
    x[3::11] = 0.0
    return x


def _rank_main(rank, world, gpn, cases, shared, results, status, barrier):
    try:
        ws = SymmetricWorkspace.from_shared(shared, rank, world, gpn, NBYTES, FLAGS)
        barrier.wait(timeout=120)  # start together: setup skew on a loaded 2-core machine is not a hang
        ars = {}
        for call, (alg, n, dtype) in enumerate(cases):
            if dtype not in ars:
                ars[dtype] = DeviceAllReduce(ws, 4096, dtype, Topology(world, gpn), block=64, max_blocks=4,
                                             max_spins=5_000_000)
            x = _inputs(call, rank, n, dtype)
            out = torch.full_like(x, float("nan"))
            inplace = call % 3 == 2
            alg_name, _, proto = alg.partition("/")
            res = ars[dtype](x, out=x if inplace else out, algorithm=alg_name, protocol=proto or "flag")
            ws.check()
            results[rank, call, :n] = res.double()
        status[rank] = 1
    except BaseException as e:  # report, never hang the parent
        status[rank] = 2
        print(f"rank {rank} failed: {type(e).__name__}: {e}", flush=True)
        os._exit(1)


def _spawn(world, target, args, result_shape):
    """Run `target(rank, world, *args, shared, results, status, barrier)` in `world` forked ranks sharing one
    workspace region; returns the shared float64 `results` tensor once every rank reported success."""
    ctx = mp.get_context("fork")
    shared = torch.zeros(SymmetricWorkspace.shared_size(world, NBYTES, FLAGS), dtype=torch.uint8).share_memory_()
    results = torch.full((world, *result_shape), float("nan"), dtype=torch.float64).share_memory_()
    status = torch.zeros(world, dtype=torch.int32).share_memory_()
    barrier = ctx.Barrier(world)
    procs = [ctx.Process(target=target, args=(r, world, *args, shared, results, status, barrier))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert status.tolist() == [1] * world, f"rank status {status.tolist()}"
    return results


def _run(world, gpn, cases):
    results = _spawn(world, _rank_main, (gpn, cases), (len(cases), max(n for _, n, _ in cases)))
    for call, (alg, n, dtype) in enumerate(cases):
        ref = sum(_inputs(call, r, n, dtype).double() for r in range(world))
        out = results[:, call, :n]
        err = ((out[0] - ref).norm() / ref.norm()).item()
        assert err <= TOL[dtype], (call, alg, n, dtype, err)
        for r in range(1, world):
            assert torch.equal(out[r], out[0]), f"rank {r} differs from rank 0 (call {call} {alg})"


def test_one_and_two_shot_single_node():
    cases = [("one_shot", 1000, torch.float32), ("two_shot", 777, torch.float32), ("one_shot", 5, torch.float16),
             ("two_shot", 1, torch.float32), ("two_shot", 4096, torch.float16), ("one_shot", 300, torch.float32)]
    _run(2, 2, cases)


def test_nvrar_three_logical_nodes_of_one():
    """Non-power-of-two node count: fold-in / recursive doubling / fold-out through peer stores."""
    cases = [("nvrar", 999, torch.float32), ("nvrar", 3, torch.float16), ("nvrar", 2048, torch.float32)]
    _run(3, 1, cases)


def test_nvrar_two_nodes_of_two():
    cases = [("nvrar", 1001, torch.float32), ("nvrar", 64, torch.float16), ("nvrar", 7, torch.float32)]
    _run(4, 2, cases)


def _prefill_rs(ws, ar, proto):
    """Play the missing peer (local rank 1) of rank 0's first call (seq 1, parity 1) up to the reduce-scatter:
    its reduce-scatter data has arrived, its all-gather never comes."""
    if proto == "ll":  # nonzero words = arrived (0x80000000 encodes +0.0); slot [parity 1][local rank 1]
        words = ws.buffer[ar.ll_rs_off:].view(torch.int32)
        words[(1 * ar.G + 1) * ar.ll_cap:(1 * ar.G + 2) * ar.ll_cap] = -2 ** 31
    else:  # flag word of (program, sender 1) raised to seq 1
        for pid in range(ar.max_blocks):
            ws.flags[ar.rsf_off + pid * ar.G + 1] = 1


def _norm_partial_wait(ws, spins):
    """The norm kernel's wait for the partial sums of squares of its row's other tile programs, on its own: one
    rank (G = 1, no peer data to wait for), one row in T = 2 tiles. The interpreter runs program 0 to its end
    before program 1 starts, so program 0's wait can only time out (reported as step 1, waiting for this rank)."""
    H, tile = 256, 128
    x, res, w = torch.randn(1, H), torch.randn(1, H), torch.ones(H)
    y, h = torch.empty_like(x), torch.empty_like(x)
    parts = torch.zeros(16, dtype=torch.int64)
    ctr = ws.counters[ws.alloc_channel():]
    K._ll_one_shot_norm_kernel[(2,)](
        x, res, w, y, h, 1, H, 1e-5, ws.buffer, ws.peer_ptrs, ctr, ws.err, parts, 0, H, 0, 0, 1, 2,
        K.wait_budget(False, spins), G=1, TILE=tile, TP2=2, GPU=False)


# Every bounded wait of comm/kernels.py, reached by a rank whose peer never arrives:
# (id, world, gpus per node, algorithm/protocol, prefill, expected step, expected peer)
TIMEOUT_CASES = [
    ("one_shot:_wait", 2, 2, "one_shot/flag", None, 0, 1),
    ("two_shot-rs:_wait", 2, 2, "two_shot/flag", None, 0, 1),
    ("nvrar-rail:_wait", 2, 1, "nvrar/flag", None, 1, 1),
    ("two_shot-ag:_wait", 2, 2, "two_shot/flag", "rs", 99, 1),
    ("one_shot_ll:_ll_sum", 2, 2, "one_shot/ll", None, 0, 1),
    ("two_shot_ll-rs:_ll_sum", 2, 2, "two_shot/ll", None, 0, 1),
    ("nvrar_ll-rail:_ll_take", 2, 1, "nvrar/ll", None, 1, 1),
    ("two_shot_ll-ag:_ll_take", 2, 2, "two_shot/ll", "rs", 99, 1),
    ("all_reduce_norm:_ll_sum", 2, 2, "norm", None, 0, 1),
    ("all_reduce_norm:partials", 1, 1, "norm-partials", None, 1, 0),
]
TIMEOUT_SPINS = 300


def _lonely_rank(shared, world, gpn, alg, prefill, q):
    try:
        ws = SymmetricWorkspace.from_shared(shared, 0, world, gpn, NBYTES, FLAGS)
        t0 = time.time()
        if alg == "norm-partials":
            _norm_partial_wait(ws, TIMEOUT_SPINS)
        else:
            ar = DeviceAllReduce(ws, 1024, torch.float32, Topology(world, gpn), block=64, max_blocks=4,
                                 max_spins=TIMEOUT_SPINS)
            assert not ar.gpu_clock and ar.wait_budget == TIMEOUT_SPINS
            if prefill:
                _prefill_rs(ws, ar, alg.partition("/")[2])
            x = torch.randn(100)
            if alg == "norm":
                ar.all_reduce_norm(x.view(4, 25), torch.randn(4, 25), torch.ones(25), 1e-5)
            else:
                name, _, proto = alg.partition("/")
                ar(x, algorithm=name, protocol=proto)
        took = time.time() - t0
        try:
            ws.check()
            q.put(("no error", took))
        except CommTimeoutError as e:
            q.put((str(e), took))
    except BaseException as e:  # report, never hang the parent
        q.put((f"failed: {type(e).__name__}: {e}", 0.0))


@pytest.mark.parametrize("case", TIMEOUT_CASES, ids=[c[0] for c in TIMEOUT_CASES])
def test_timeout_names_rank_and_step(case):
    """A rank whose peer never signals gets CommTimeoutError naming itself, the step and the peer, within the wait
    budget (polls here; %globaltimer nanoseconds on a GPU), at every wait of the kernels. A wait that is not
    bounded hangs the forked rank and fails the test."""
    _, world, gpn, alg, prefill, step, peer = case
    ctx = mp.get_context("fork")
    shared = torch.zeros(SymmetricWorkspace.shared_size(world, NBYTES, FLAGS), dtype=torch.uint8).share_memory_()
    q = ctx.Queue()
    p = ctx.Process(target=_lonely_rank, args=(shared, world, gpn, alg, prefill, q))
    p.start()
    try:
        msg, took = q.get(timeout=120)
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert msg.startswith(f"rank 0: all-reduce timed out at step {step} waiting for rank {peer} "), msg
    assert took < 60, took


def test_ll_protocol_one_and_two_shot():
    """Flag-in-data (LL) protocol: values that encode specially (-0.0, +0.0) and repeated calls of both parities,
    mixed with the flag protocol on the same sequence channel."""
    cases = [("one_shot/ll", 1000, torch.float32), ("two_shot/ll", 777, torch.float16), ("one_shot/ll", 1, torch.float16),
             ("two_shot/ll", 4096, torch.float32), ("one_shot", 300, torch.float32), ("one_shot/ll", 4096, torch.float16),
             ("two_shot/ll", 3, torch.float32)]
    _run(2, 2, cases)


def test_nvrar_ll_logical_nodes():
    """LL rail steps: 3 logical nodes of 1 (fold-in / fold-out) and 2 nodes of 2 (RS, rail, AG per tile)."""
    _run(3, 1, [("nvrar/ll", 999, torch.float32), ("nvrar/ll", 3, torch.float16), ("nvrar", 50, torch.float32),
                ("nvrar/ll", 2048, torch.float16)])
    _run(4, 2, [("nvrar/ll", 1001, torch.float32), ("nvrar/ll", 64, torch.float16), ("nvrar/ll", 7, torch.float32)])


def test_ll_protocol_three_gpus():
    cases = [("two_shot/ll", 1001, torch.float32), ("one_shot/ll", 64, torch.float16), ("two_shot/ll", 5, torch.float16)]
    _run(3, 3, cases)


def _norm_inputs(call, rank, M, H, dtype):
    g = torch.Generator().manual_seed(7000 + 100 * call + rank)
    x = torch.randn(M, H, generator=g).to(dtype)
    x[:, 5::9] = -0.0  # signed zeros must not read as empty LL slots
    gr = torch.Generator().manual_seed(9000 + call)  # residual and weight are replicated: same on every rank
    return x, torch.randn(M, H, generator=gr).to(dtype), (1 + 0.1 * torch.randn(H, generator=gr)).to(dtype)


def _norm_rank_main(rank, world, cases, shared, results, status, barrier):
    try:
        ws = SymmetricWorkspace.from_shared(shared, rank, world, world, NBYTES, FLAGS)
        barrier.wait(timeout=120)
        ars = {}
        for call, (M, H, dtype) in enumerate(cases):
            if dtype not in ars:
                ars[dtype] = DeviceAllReduce(ws, 4096, dtype, Topology(world, world), block=64, max_blocks=2,
                                             max_spins=5_000_000)
            x, res, w = _norm_inputs(call, rank, M, H, dtype)
            y, h = ars[dtype].all_reduce_norm(x, res.clone(), w, 1e-5, out=torch.full_like(x, float("nan")),
                                              res_out=torch.full_like(x, float("nan")))
            ws.check()
            results[rank, call, 0, :M * H] = y.double().flatten()
            results[rank, call, 1, :M * H] = h.double().flatten()
        status[rank] = 1
    except BaseException as e:
        status[rank] = 2
        print(f"rank {rank} failed: {type(e).__name__}: {e}", flush=True)
        os._exit(1)


@pytest.mark.parametrize("world", [2, 3])
def test_ll_all_reduce_fused_residual_rmsnorm(world):
    """One kernel: LL one-shot all-reduce + residual add + RMSNorm, rows not a power of two wide, more rows than
    programs; against float64 (sum rounded to the dtype as the unfused all-reduce returns it)."""
    cases = [(1, 100, torch.float32), (5, 33, torch.float16), (3, 64, torch.float32), (1, 7, torch.float16)]
    results = _spawn(world, _norm_rank_main, (cases,), (len(cases), 2, max(M * H for M, H, _ in cases)))
    for call, (M, H, dtype) in enumerate(cases):
        ins = [_norm_inputs(call, r, M, H, dtype) for r in range(world)]
        s = sum(x.double() for x, _, _ in ins).to(dtype).double()
        _, res, w = ins[0]
        h = s + res.double()
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
        for k, ref in ((0, y), (1, h)):
            got = results[0, call, k, :M * H].view(M, H)
            err = ((got - ref).norm() / ref.norm()).item()
            assert err <= TOL[dtype], (call, k, err)
            for r in range(1, world):
                assert torch.equal(results[r, call, k, :M * H], results[0, call, k, :M * H]), (call, k, r)
