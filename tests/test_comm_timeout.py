"""Time-bounded device waits of the all-reduce kernels (comm/kernels.py).

The budget of every wait comes from one place (`kernels.wait_budget`): FUSEDLIS_COMM_TIMEOUT_S (default 20 s) in
nanoseconds of %globaltimer on a GPU, `max_spins` polls in the interpreter. The interpreter side of every wait is
covered by tests/test_comm_protocol.py::test_timeout_names_rank_and_step; the GPU tests here run two ranks as two
workspaces over one CUDA allocation on one GPU (no process group needed)."""

import time

import pytest
import torch

from fusedlis.comm import kernels as K
from fusedlis.comm.device import DeviceAllReduce
from fusedlis.comm.symmetric import CommTimeoutError, SymmetricWorkspace
from fusedlis.comm.topology import Topology

NBYTES, FLAGS = 1 << 20, 4096


def test_wait_budget_comes_from_the_timeout(monkeypatch):
    monkeypatch.delenv(K.TIMEOUT_ENV, raising=False)
    assert K.comm_timeout_s() == 20.0
    assert K.wait_budget(True, 300) == 20_000_000_000  # ns: more than an int32 holds
    assert K.wait_budget(True, 300, 0.5) == 500_000_000
    assert K.wait_budget(False, 300, 0.5) == 300  # the interpreter counts polls
    monkeypatch.setenv(K.TIMEOUT_ENV, "2.5")
    assert K.wait_budget(True, 300) == 2_500_000_000
    assert K.wait_budget(True, 300, 1) == 1_000_000_000  # an explicit timeout wins
    monkeypatch.setenv(K.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="FUSEDLIS_COMM_TIMEOUT_S"):
        K.comm_timeout_s()
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            K.comm_timeout_s(bad)
    with pytest.raises(ValueError):
        K.wait_budget(False, 0)


def test_gpu_clock_only_outside_the_interpreter(monkeypatch):
    assert not K.uses_gpu_clock(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not K.uses_gpu_clock(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.uses_gpu_clock(torch.device("cuda", 0))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert K.uses_gpu_clock(torch.device("cuda", 0))


def _ranks(world, gpn, **kw):
    """`world` ranks on this GPU: workspaces over one zeroed CUDA allocation (peer pointers valid for all)."""
    shared = torch.zeros(SymmetricWorkspace.shared_size(world, NBYTES, FLAGS), dtype=torch.uint8, device="cuda")
    wss = [SymmetricWorkspace.from_shared(shared, r, world, gpn, NBYTES, FLAGS) for r in range(world)]
    torch.cuda.synchronize()
    return wss, [DeviceAllReduce(ws, 4096, torch.float32, Topology(world, gpn), block=256, max_blocks=2, **kw)
                 for ws in wss]


@pytest.mark.gpu
@pytest.mark.parametrize("alg", ["two_shot", "one_shot", "one_shot_ll", "two_shot_ll"])
def test_gpu_missing_peer_times_out_after_the_timeout(alg):
    """Rank 1 never calls: rank 0 reports CommTimeoutError (rank, step, peer) once its waits ran out of time.
    `max_spins` is tiny: a wait bounded by a poll count would give up within milliseconds."""
    timeout_s = 0.3
    wss, ars = _ranks(2, 2, max_spins=1000, timeout_s=timeout_s)
    assert ars[0].gpu_clock and ars[0].wait_budget == int(timeout_s * 1e9)
    x = torch.randn(1000, device="cuda")
    t0 = time.perf_counter()
    ars[0](x, algorithm=alg)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    with pytest.raises(CommTimeoutError, match="rank 0: all-reduce timed out at step 0 waiting for rank 1 "):
        wss[0].check()
    assert timeout_s <= took < 60, took  # the upper bound leaves room for the kernel's JIT compile


@pytest.mark.gpu
@pytest.mark.parametrize("alg", ["two_shot", "one_shot_ll", "two_shot_ll"])
def test_gpu_late_peer_within_the_timeout_is_no_timeout(alg):
    """Rank 1 arrives a second late: far more polls than `max_spins`, well inside the timeout, so no error."""
    # Both ranks' kernels are compiled and loaded first, each rank alone on a throwaway pair (so it times out):
    # on one GPU a kernel's first launch loads its module, which waits for the running kernel (rank 0's, spinning)
    # to finish. The flag kernels specialise on rank == 1. A 50 ms timeout keeps the budget argument of the same
    # specialisation as the 2 s one below (int32, a multiple of 16 ns).
    wss, ars = _ranks(2, 2, max_spins=1000, timeout_s=0.05)
    for ar in ars:
        ar(torch.randn(1000, device="cuda"), algorithm=alg)
        torch.cuda.synchronize()
    wss, ars = _ranks(2, 2, max_spins=1000, timeout_s=2.0)
    xs = [torch.randn(1000, device="cuda") for _ in range(2)]
    outs = [torch.full_like(x, float("nan")) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(streams[0]):
        ars[0](xs[0], out=outs[0], algorithm=alg)
    time.sleep(1.0)
    with torch.cuda.stream(streams[1]):
        ars[1](xs[1], out=outs[1], algorithm=alg)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    for ws in wss:
        ws.check()
    assert 1.0 <= took < 2.0, took
    ref = xs[0] + xs[1]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
