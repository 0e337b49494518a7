"""Flag/sequence protocol of the Triton all-reduce kernels, in the interpreter: ranks are forked processes
sharing one memory region (peer pointers are valid in every process), spin-waits bounded."""

import multiprocessing as mp
import os
import time

import pytest
import torch

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


def _lonely_rank(shared, q):
    ws = SymmetricWorkspace.from_shared(shared, 0, 2, 2, NBYTES, FLAGS)
    ar = DeviceAllReduce(ws, 1024, torch.float32, block=64, max_spins=300)
    ar(torch.randn(100), algorithm="two_shot")
    try:
        ws.check()
        q.put("no error")
    except CommTimeoutError as e:
        q.put(str(e))


def test_timeout_names_rank_and_step():
    ctx = mp.get_context("fork")
    shared = torch.zeros(SymmetricWorkspace.shared_size(2, NBYTES, FLAGS), dtype=torch.uint8).share_memory_()
    q = ctx.Queue()
    p = ctx.Process(target=_lonely_rank, args=(shared, q))
    t0 = time.time()
    p.start()
    msg = q.get(timeout=120)
    p.join(timeout=30)
    assert "rank 0" in msg and "step 0" in msg and "rank 1" in msg, msg
    assert time.time() - t0 < 120


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
