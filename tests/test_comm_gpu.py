"""GPU correctness of the fusedlis all-reduce kernels on 2 GPUs, as 1 node x 2 and as 2 logical nodes x 1; on 4
GPUs also as 1 x 4, 4 x 1 and 2 logical nodes x 2 (NVRAR with all three stages).

pytest launches this file under torchrun (2 processes, and 4 where 4 GPUs exist); it can also be run directly:
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  python -m torch.distributed.run --nproc-per-node 2 tests/test_comm_gpu.py [--replays 10000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import time

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SIZES_BYTES = [2, 6, 8, 1000, 4094, 65538, 262144, (1 << 20) + 6, 3_000_002, 8 << 20]


def _run_ranks(world: int, timeout: int, **env_extra: str) -> None:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               **env_extra)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), __file__,
                        "--replays", "2000"], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert "ALL GPU CHECKS PASSED" in r.stdout


@pytest.mark.gpu
@pytest.mark.multigpu
def test_gpu_allreduce_two_gpus():
    _run_ranks(2, 900)


@pytest.mark.gpu
@pytest.mark.multigpu
def test_gpu_allreduce_four_gpus():
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    _run_ranks(4, 1200, NVSHMEM_SYMMETRIC_SIZE=os.environ.get("NVSHMEM_SYMMETRIC_SIZE", "5G"))


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    import torch.distributed as dist

    from fusedlis.comm import AllReduce, CommTimeoutError, SymmetricWorkspace, Topology
    from fusedlis.comm.device import DeviceAllReduce

    ap = argparse.ArgumentParser()
    ap.add_argument("--replays", type=int, default=10_000)
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--only", default="all", choices=("all", "norm"),
                    help="norm: only the fused all-reduce + residual + RMSNorm checks and the front end")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    failures: list[str] = []

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    # The 16 communicators below need about 1.2 GiB per 2 ranks of the node (2.36 GiB at 4 ranks: a 2 GiB
    # workspace ran out on 4xH200, 07:59); NVSHMEM_SYMMETRIC_SIZE must cover this.
    # 2 logical nodes of world/2 GPUs (world >= 4) add 4 more communicators: 7 GiB per 8 ranks then.
    hier = world >= 4 and world % 2 == 0
    ws = SymmetricWorkspace(max(2 << 30, ((7 if hier else 5) << 30) * world // 8), flag_words=1 << 15,
                            provider=args.provider)
    log(f"workspace provider={ws.provider} reachable={ws.reachable}")
    variants = {}
    for dtype in (torch.bfloat16, torch.float32):
        me = (8 << 20) // torch.empty((), dtype=dtype).element_size()
        variants[dtype] = [
            ("1x2 one_shot", DeviceAllReduce(ws, me, dtype, Topology(world, world), ll_max_elems=0), "one_shot"),
            ("1x2 one_shot ptr", DeviceAllReduce(ws, me, dtype, Topology(world, world), one_shot_transport="ptr",
                                                 ll_max_elems=0), "one_shot"),
            ("1x2 two_shot", DeviceAllReduce(ws, me, dtype, Topology(world, world), ll_max_elems=0), "two_shot"),
            ("1x2 one_shot_ll", DeviceAllReduce(ws, me, dtype, Topology(world, world)), "one_shot_ll"),
            ("1x2 two_shot_ll", DeviceAllReduce(ws, me, dtype, Topology(world, world)), "two_shot_ll"),
            ("2x1 nvrar", DeviceAllReduce(ws, me, dtype, Topology(world, 1), ll_max_elems=0), "nvrar"),
            ("2x1 nvrar ptr", DeviceAllReduce(ws, me, dtype, Topology(world, 1), transport="ptr", ll_max_elems=0),
             "nvrar"),
            ("2x1 nvrar_ll", DeviceAllReduce(ws, me, dtype, Topology(world, 1)), "nvrar_ll"),
        ]
        if hier:  # NVRAR's full shape: intra-node reduce-scatter, recursive doubling across 2 nodes, all-gather
            variants[dtype] += [
                (f"2x{world // 2} nvrar", DeviceAllReduce(ws, me, dtype, Topology(world, world // 2), ll_max_elems=0),
                 "nvrar"),
                (f"2x{world // 2} nvrar_ll", DeviceAllReduce(ws, me, dtype, Topology(world, world // 2)), "nvrar_ll"),
            ]
    # the names say 1 node x all GPUs ("1x2") and 1 GPU per node ("2x1") whatever the world size
    log(f"world {world}: '1x2' = 1 node x {world} GPUs, '2x1' = {world} nodes x 1 GPU")
    log("transports (rail, one-shot): " + ", ".join(f"{n}={a.transport},{a.one_shot_transport}"
                                                  for n, a, _ in variants[torch.bfloat16]))
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)
    t_start = time.time()
    sweep = args.only == "all"
    for dtype, vs in (variants.items() if sweep else []):
        isz = torch.empty((), dtype=dtype).element_size()
        for nbytes in SIZES_BYTES:
            log(f"sweep {dtype} {nbytes} B ({time.time() - t_start:.0f} s)")
            n = max(1, nbytes // isz)
            for name, ar, alg in vs:
                for inplace in (False, True):
                    x = torch.randn(n, generator=g, device="cuda").to(dtype)
                    ref = x.double()
                    dist.all_reduce(ref)
                    xin = x.clone()
                    out = xin if inplace else torch.full_like(x, float("nan"))
                    y = ar(xin, out=out, algorithm=alg)
                    ws.check()
                    err = _rel_err(y, ref)
                    nccl = x.clone()
                    dist.all_reduce(nccl)
                    other = y.clone()
                    dist.broadcast(other, src=0)  # NCCL has no int16: compare the bits after the broadcast
                    bits = y.view(torch.int16 if isz == 2 else torch.int32)
                    other = other.view(torch.int16 if isz == 2 else torch.int32)
                    ok = err <= TOL[dtype] and torch.equal(bits, other) and not torch.isnan(y).any()
                    if not ok:
                        failures.append(f"{name} {dtype} n={n} inplace={inplace} err={err:.2e} "
                                        f"same_bits={torch.equal(bits, other)} nccl_err={_rel_err(nccl, ref):.2e}")
    log(f"size sweep done: {len(failures)} failures")
    # CUDA graph replays, fresh random inputs generated inside the graph on each replay
    def graph_worst(warm, body) -> float:
        """Capture `body()` (fresh inputs, the op, its rel. error against torch) in one CUDA graph after two
        eager `warm()` calls (compilation stays outside), replay it args.replays times; the worst error."""
        worst = torch.zeros((), dtype=torch.float64, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                warm()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=s):
                worst.copy_(torch.maximum(worst, body().double()))
        torch.cuda.synchronize()
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
        ws.check()
        del graph
        return worst.item()

    graph_idx = (0, 1, 2, 3, 4, 5, 7) + ((8, 9) if hier else ())
    for name, ar, alg in [variants[torch.bfloat16][i] for i in (graph_idx if sweep else ())]:
        n = (1 << 20) // 2 + 3
        x = torch.empty(n, dtype=torch.bfloat16, device="cuda")

        def warm(ar=ar, alg=alg, x=x):
            x.normal_()
            ar(x, algorithm=alg)

        def body(ar=ar, alg=alg, x=x):
            x.normal_()
            x.mul_(rank + 1)
            ref = x.float()
            dist.all_reduce(ref)
            y = ar(x, algorithm=alg)
            return (y.float() - ref).norm() / ref.norm()

        w = graph_worst(warm, body)
        log(f"graph {name}: {args.replays} replays, worst rel err {w:.2e}")
        if not (w <= TOL[torch.bfloat16]) or w == 0.0:
            failures.append(f"graph {name}: worst err {w}")
    # fused all-reduce + residual + RMSNorm (LL one-shot), rows [M, H]; residual and weight shared by all ranks
    nar = variants[torch.bfloat16][3][1]
    gs = torch.Generator(device="cuda").manual_seed(4321)
    for M, H in ((1, 4096), (3, 4096), (17, 8192), (64, 4096), (5, 5000), (255, 8192)):
        if not nar.supports_norm(M, H):
            continue
        x = torch.randn(M, H, generator=g, device="cuda").to(torch.bfloat16)
        res = torch.randn(M, H, generator=gs, device="cuda").to(torch.bfloat16)
        w = (torch.rand(H, generator=gs, device="cuda") + 0.5).to(torch.bfloat16)
        hsum = x.double()
        dist.all_reduce(hsum)
        h_ref = hsum + res.double()
        y_ref = h_ref * torch.rsqrt(h_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
        out = torch.full_like(x, float("nan"))
        res_out = torch.full_like(x, float("nan"))
        y, h = nar.all_reduce_norm(x, res, w, 1e-5, out=out, res_out=res_out)
        ws.check()
        ey, eh = _rel_err(y, y_ref), _rel_err(h, h_ref)
        other = torch.cat([y, h]).clone()
        dist.broadcast(other, src=0)
        same = torch.equal(torch.cat([y, h]).view(torch.int16), other.view(torch.int16))
        log(f"all_reduce_norm [{M}, {H}]: err normed {ey:.2e} residual {eh:.2e} same_bits {same}")
        if not (ey <= TOL[torch.bfloat16] and eh <= TOL[torch.bfloat16] and same):
            failures.append(f"all_reduce_norm [{M}, {H}] err {ey:.2e}/{eh:.2e} same_bits={same}")
    M, H = 8, 4096
    x = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    res = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    w = (torch.rand(H, generator=gs, device="cuda") + 0.5).to(torch.bfloat16)

    def warm_norm():
        x.normal_()
        res.normal_()
        dist.broadcast(res, src=0)
        nar.all_reduce_norm(x, res, w, 1e-5)

    def body_norm():
        x.normal_()
        x.mul_(rank + 1)
        res.normal_()
        dist.broadcast(res, src=0)  # the residual stream is replicated on every rank
        hr = x.float()
        dist.all_reduce(hr)
        hr = hr + res.float()
        yr = hr * torch.rsqrt(hr.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
        y, h = nar.all_reduce_norm(x, res, w, 1e-5)
        return torch.maximum((y.float() - yr).norm() / yr.norm(), (h.float() - hr).norm() / hr.norm())

    wv = graph_worst(warm_norm, body_norm)
    log(f"graph all_reduce_norm [{M}, {H}]: {args.replays} replays, worst rel err {wv:.2e}")
    if not (wv <= TOL[torch.bfloat16]) or wv == 0.0:
        failures.append(f"graph all_reduce_norm: worst err {wv}")
    # AllReduce front end, in place, auto
    ar = AllReduce(dtype=torch.bfloat16, max_bytes=4 << 20, workspace=ws, topology=Topology(world, world))
    for nbytes in (8192, 1 << 20, 8 << 20):
        x = torch.randn(nbytes // 2, generator=g, device="cuda").to(torch.bfloat16)
        ref = x.double()
        dist.all_reduce(ref)
        y = ar.all_reduce(x)
        if y is not x or _rel_err(x, ref) > TOL[torch.bfloat16]:
            failures.append(f"AllReduce auto {nbytes} B ({ar.algorithm_for(nbytes)}) wrong")
    z = torch.randn(4096, generator=g, device="cuda").to(torch.bfloat16)
    for _ in range(3 * ar.check_every + 1):  # exercises the asynchronous error-word check
        ar(z)
    ar21 = AllReduce(dtype=torch.bfloat16, max_bytes=1 << 20, workspace=ws, topology=Topology(world, 1))
    for nbytes in (2, 65538, 1 << 20):
        x = torch.randn(nbytes // 2, generator=g, device="cuda").to(torch.bfloat16)
        ref = x.double()
        dist.all_reduce(ref)
        y = ar21(x)
        err = _rel_err(y, ref)
        if not ar21.algorithm_for(nbytes).startswith("nvrar") or err > TOL[torch.bfloat16]:
            failures.append(f"AllReduce 2x1 auto {nbytes} B ({ar21.algorithm_for(nbytes)}) wrong: err {err:.2e}")
        log(f"AllReduce 2x1 auto {nbytes} B: {ar21.algorithm_for(nbytes)} err {err:.2e}")
    # a rank that never arrives: the other one gets a CommTimeoutError naming rank and step
    lonely = DeviceAllReduce(ws, 1024, torch.float32, Topology(world, world), timeout_s=0.5)
    dist.barrier()
    if rank == 0:
        lonely(torch.randn(1000, device="cuda"), algorithm="two_shot")
        try:
            ws.check()
            failures.append("timeout not reported")
        except CommTimeoutError as e:
            log(f"timeout reported: {e}")
            if "rank 0" not in str(e) or "step 0" not in str(e):
                failures.append(f"timeout message unclear: {e}")
    dist.barrier()
    allf = [None] * world
    dist.all_gather_object(allf, failures)
    if rank == 0:
        for r, f in enumerate(allf):
            for line in f:
                print(f"FAIL rank {r}: {line}")
        if not any(allf):
            print("ALL GPU CHECKS PASSED", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0 if not any(allf) else 1)


if __name__ == "__main__":
    main()
