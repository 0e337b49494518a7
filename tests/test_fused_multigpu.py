"""Fused row-parallel GEMM + all-reduce on 2 GPUs against torch (x @ w.T, dist.all_reduce, residual, RMSNorm).

pytest runs the worker below under `torchrun --nproc-per-node 2`, once as one node of 2 GPUs and once as
2 logical nodes of 1 GPU (the inter-node recursive-doubling path over NVLink). Run the worker directly:
    torchrun --nproc-per-node 2 tests/test_fused_multigpu.py --gpus-per-node 2 [--replays 10000]
`--gpus-per-node 1 --transport put` runs the inter-node rounds as NVSHMEM puts with signal (the transport between
hosts) over NVLink.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest
import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("gpus_per_node,transport", [(2, "ptr"), (1, "ptr"), (1, "put")])
def test_fused_linear_allreduce_2gpu(gpus_per_node, transport):
    if transport == "put":
        from fusedlis.comm.symmetric import nvshmem_available

        if not nvshmem_available():
            pytest.skip("needs nvshmem4py and libnvshmem_device.bc")
    env = {**os.environ, **ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", __file__,
           "--gpus-per-node", str(gpus_per_node), "--transport", transport, "--replays", "10000"]
    if transport == "put":  # each config compiles with NVSHMEM linked in (~5 s): M = 1, 5, 37 only
        cmd += ["--ms", "1,5,37"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).norm() / b.float().norm()


def _torch_ref(x, w, residual, norm_weight, eps):
    import torch.distributed as dist

    y = x.float() @ w.float().T
    dist.all_reduce(y)
    if residual is not None:
        y = y + residual.float()
    if norm_weight is None:
        return y
    return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float(), y


def main() -> int:  # noqa: C901 - one linear script of checks
    import torch.distributed as dist

    from fusedlis.triton_kernels.linear_allreduce import FusedAllReduceWorkspace, linear_allreduce

    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus-per-node", type=int, default=2)
    ap.add_argument("--replays", type=int, default=10000)
    ap.add_argument("--transport", choices=("ptr", "put"), default="ptr",
                    help="inter-node rounds: peer stores (torch symmetric memory) or NVSHMEM put-with-signal "
                         "(an NVSHMEM workspace, what a cluster of several hosts uses)")
    ap.add_argument("--ms", default="1,5,37,64,128", help="row counts of the eager checks (each compiles new "
                    "kernels: about 5 s a config with NVSHMEM linked in)")
    args = ap.parse_args()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    dev = torch.device("cuda", torch.cuda.current_device())
    if args.transport == "put":
        from fusedlis.comm import Topology

        ws = FusedAllReduceWorkspace.from_nvshmem(128, 8192, topology=Topology(dist.get_world_size(),
                                                                               args.gpus_per_node), transport="put")
    else:
        ws = FusedAllReduceWorkspace.from_torch_symm(128, 8192, gpus_per_node=args.gpus_per_node)
    tag = f"[rank {rank} {ws.num_nodes}x{ws.local_size} {ws.transport}]"
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)  # per-rank x / w shards
    shared = torch.Generator(device=dev).manual_seed(99)  # residual / norm weight, same on every rank
    dt = torch.bfloat16
    eps = 1e-5
    failures = 0
    worst = 0.0
    # (K per rank, N): Llama-3.1-8B o_proj / down_proj at TP=2, and a small odd one.
    t0 = time.time()
    for K, N in ((2048, 4096), (7168, 4096), (320, 512)):
        w = (torch.randn(N, K, device=dev, dtype=dt, generator=gen) / K ** 0.5).contiguous()
        for M in (int(m) for m in args.ms.split(",")):
            if rank == 0:  # progress: a new config compiles first (seconds with NVSHMEM linked in)
                print(f"{tag} K={K} N={N} M={M} ({time.time() - t0:.0f} s)", flush=True)
            for one_shot in (True, False):
                for mode in ("plain", "res", "norm"):
                    x = torch.randn(M, K, device=dev, dtype=dt, generator=gen)
                    res = torch.randn(M, N, device=dev, dtype=dt, generator=shared) if mode != "plain" else None
                    nw = (1 + 0.1 * torch.randn(N, device=dev, dtype=dt, generator=shared)) if mode == "norm" else None
                    if mode == "norm":
                        out = (torch.full((M, N), float("nan"), device=dev, dtype=dt),
                               torch.full((M, N), float("nan"), device=dev, dtype=dt))
                    else:
                        out = torch.full((M, N), float("nan"), device=dev, dtype=dt)
                    got = linear_allreduce(x, w, ws, res, nw, eps, one_shot=one_shot, out=out)
                    ref = _torch_ref(x, w, res, nw, eps)
                    ws.check()
                    pairs = list(zip(got, ref)) if mode == "norm" else [(got, ref)]
                    errs = [float(_rel(a, b)) for a, b in pairs]
                    nan = any(bool(torch.isnan(a).any()) for a, _ in pairs)
                    # every rank must hold the bitwise same result
                    g0 = pairs[0][0].clone()
                    dist.broadcast(g0, 0)
                    same = bool(torch.equal(g0, pairs[0][0]))
                    worst = max(worst, *errs)
                    if nan or max(errs) > 1e-2 or not same:
                        failures += 1
                        print(f"{tag} FAIL K={K} N={N} M={M} one_shot={one_shot} {mode}: errs={errs} nan={nan} "
                              f"same={same}", flush=True)
    print(f"{tag} eager checks done: failures={failures} worst rel err={worst:.2e}", flush=True)

    # CUDA graph: one call captured, replayed with fresh inputs every time, compared every time.
    K, N, M = 2048, 4096, 5
    w = (torch.randn(N, K, device=dev, dtype=dt, generator=gen) / K ** 0.5).contiguous()
    x = torch.randn(M, K, device=dev, dtype=dt, generator=gen)
    res = torch.randn(M, N, device=dev, dtype=dt, generator=shared)
    nw = 1 + 0.1 * torch.randn(N, device=dev, dtype=dt, generator=shared)
    out = (torch.empty(M, N, device=dev, dtype=dt), torch.empty(M, N, device=dev, dtype=dt))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            linear_allreduce(x, w, ws, res, nw, eps, out=out)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        linear_allreduce(x, w, ws, res, nw, eps, out=out)
    errs = torch.zeros(args.replays, device=dev)
    step0 = ws.step()
    for i in range(args.replays):
        x.normal_(generator=gen)
        res.normal_(generator=shared)
        out[0].fill_(float("nan"))
        g.replay()
        ref_n, ref_h = _torch_ref(x, w, res, nw, eps)
        errs[i] = torch.maximum(_rel(out[0], ref_n), _rel(out[1], ref_h))
    torch.cuda.synchronize()
    ws.check()
    steps = ws.step() - step0
    e = errs.nan_to_num(nan=1.0)
    bad = int((e > 1e-2).sum())
    print(f"{tag} graph replays={args.replays} steps advanced={steps} max err={float(e.max()):.2e} bad={bad}", flush=True)
    if bad or steps != args.replays:
        failures += 1
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
