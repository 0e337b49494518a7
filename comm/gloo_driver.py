"""torch.distributed driver of an all-reduce plan (point-to-point sends/receives; runs on gloo and NCCL)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fusedlis.comm.plan import (
    ALL_GATHER,
    EXCHANGE,
    ONE_SHOT,
    RECV_ADD,
    RECV_COPY,
    SCATTER_REDUCE,
    SEND,
    build_plan,
)
from fusedlis.comm.simulate import ordered_sum, pair_sum
from fusedlis.comm.topology import Topology

_TAG_RS, _TAG_AG, _TAG_OS, _TAG_INTER = 1, 2, 3, 16


def gloo_all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None = None, gpus_per_node: int | None = None,
                    algorithm: str = "nvrar") -> torch.Tensor:
    """Sum `x` over `group` by running the plan with isend/irecv; returns a new tensor (x is untouched).

    Use to check the plan across real processes (tests run it on gloo); it is not a fast path.
    Arithmetic matches `simulate_all_reduce` bit for bit.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    topo = Topology(world, gpus_per_node)
    flat = x.detach().reshape(-1).contiguous()
    plan = build_plan(topo, flat.numel(), algorithm)
    ch = plan.chunking

    def g(r: int) -> int:
        return dist.get_global_rank(group, r) if group is not None else r

    def chunk(t: torch.Tensor, j: int) -> torch.Tensor:
        lo, hi = ch.bounds(j)
        return t[lo:hi]

    def exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], tag: int) -> None:
        reqs = [dist.isend(t.contiguous(), g(p), group=group, tag=tag) for p, t in sends if p != rank]
        reqs += [dist.irecv(t, g(p), group=group, tag=tag) for p, t in recvs if p != rank]
        for r in reqs:
            r.wait()

    acc: torch.Tensor | None = None
    out = None
    for step in plan.ranks[rank].steps:
        op, peers = step.op, step.peers
        if op == SCATTER_REDUCE:
            got = [chunk(flat, step.chunk) if p == rank else torch.empty_like(chunk(flat, step.chunk)) for p in peers]
            exchange([(p, chunk(flat, j)) for j, p in enumerate(peers)], list(zip(peers, got)), _TAG_RS)
            acc = ordered_sum(got, flat.dtype)
        elif op in (SEND, EXCHANGE, RECV_ADD, RECV_COPY):
            tag = _TAG_INTER + step.slot
            buf = torch.empty_like(acc)
            sends = [(peers[0], acc)] if op in (SEND, EXCHANGE) else []
            recvs = [(peers[0], buf)] if op != SEND else []
            exchange(sends, recvs, tag)
            if op in (RECV_ADD, EXCHANGE):
                acc = pair_sum(acc, buf)
            elif op == RECV_COPY:
                acc = buf
        elif op == ALL_GATHER:
            parts = [acc if p == rank else torch.empty_like(chunk(flat, j)) for j, p in enumerate(peers)]
            exchange([(p, acc) for p in peers], list(zip(peers, parts)), _TAG_AG)
            out = torch.cat(parts)
        elif op == ONE_SHOT:
            parts = [flat if p == rank else torch.empty_like(flat) for p in peers]
            exchange([(p, flat) for p in peers], list(zip(peers, parts)), _TAG_OS)
            out = ordered_sum(parts, flat.dtype)
    return out.reshape(x.shape)
