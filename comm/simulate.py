"""CPU executor of an all-reduce plan: every rank's steps run in one process, messages in mailboxes."""

from __future__ import annotations

import torch

from fusedlis.comm.plan import (
    ALL_GATHER,
    EXCHANGE,
    ONE_SHOT,
    RECV_ADD,
    RECV_COPY,
    SCATTER_REDUCE,
    SEND,
    Plan,
    build_plan,
)
from fusedlis.comm.topology import Topology

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a reduction (fp32, or fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ordered_sum(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum in list order in the accumulation dtype, rounded once to `dtype`."""
    acc = parts[0].to(acc_dtype(dtype))
    for p in parts[1:]:
        acc = acc + p.to(acc.dtype)
    return acc.to(dtype)


def pair_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b in the accumulation dtype, rounded to a's dtype (commutative, so both partners agree bitwise)."""
    return (a.to(acc_dtype(a.dtype)) + b.to(acc_dtype(a.dtype))).to(a.dtype)


def simulate_plan(plan: Plan, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Execute `plan` on one 1-D CPU tensor per rank; returns one output per rank."""
    w = plan.topology.world_size
    mail: dict[tuple, torch.Tensor] = {}
    pc = [0] * w  # program counter per rank
    posted = [False] * w  # sends of the current step done
    acc: list[torch.Tensor | None] = [None] * w
    out: list[torch.Tensor | None] = [None] * w
    ch = plan.chunking

    def chunk(x: torch.Tensor, j: int) -> torch.Tensor:
        lo, hi = ch.bounds(j)
        return x[lo:hi]

    def try_step(r: int) -> bool:
        step = plan.ranks[r].steps[pc[r]]
        op, peers = step.op, step.peers
        if not posted[r]:
            if op == SCATTER_REDUCE:
                for j, p in enumerate(peers):
                    mail[(p, "rs", r)] = chunk(inputs[r], j)
            elif op in (SEND, EXCHANGE):
                mail[(peers[0], step.slot, r)] = acc[r]
            elif op == ALL_GATHER:
                for p in peers:
                    mail[(p, "ag", r)] = acc[r]
            elif op == ONE_SHOT:
                for p in peers:
                    mail[(p, "os", r)] = inputs[r]
            posted[r] = True
        if op == SCATTER_REDUCE:
            keys = [(r, "rs", p) for p in peers]
        elif op in (RECV_ADD, EXCHANGE, RECV_COPY):
            keys = [(r, step.slot, peers[0])]
        elif op == ALL_GATHER:
            keys = [(r, "ag", p) for p in peers]
        elif op == ONE_SHOT:
            keys = [(r, "os", p) for p in peers]
        else:  # SEND has nothing to receive
            keys = []
        if any(k not in mail for k in keys):
            return False
        got = [mail.pop(k) for k in keys]
        dtype = inputs[r].dtype
        if op == SCATTER_REDUCE:
            acc[r] = ordered_sum(got, dtype)
        elif op in (RECV_ADD, EXCHANGE):
            acc[r] = pair_sum(acc[r], got[0])
        elif op == RECV_COPY:
            acc[r] = got[0]
        elif op == ALL_GATHER:
            out[r] = torch.cat(got) if got else inputs[r].new_empty(0)
        elif op == ONE_SHOT:
            out[r] = ordered_sum(got, dtype)
        pc[r] += 1
        posted[r] = False
        return True

    while True:
        progressed = False
        pending = False
        for r in range(w):
            while pc[r] < len(plan.ranks[r].steps) and try_step(r):
                progressed = True
            pending |= pc[r] < len(plan.ranks[r].steps)
        if not pending:
            break
        if not progressed:
            stuck = {r: plan.ranks[r].steps[pc[r]] for r in range(w) if pc[r] < len(plan.ranks[r].steps)}
            raise RuntimeError(f"plan deadlocked; stuck ranks and steps: {stuck}")
    if mail:
        raise RuntimeError(f"plan left {len(mail)} undelivered messages")
    return [o for o in out]  # type: ignore[misc]


def simulate_all_reduce(
    inputs: list[torch.Tensor], gpus_per_node: int, algorithm: str = "nvrar"
) -> list[torch.Tensor]:
    """Sum-all-reduce `inputs` (one tensor per rank, same shape and dtype) on CPU by running the plan.

    Use to check plans and as a reference of what the GPU kernels compute. Any shape (flattened), any length.
    All outputs are bitwise identical.
    """
    if not inputs:
        raise ValueError("inputs must hold one tensor per rank")
    shape, dtype = inputs[0].shape, inputs[0].dtype
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs[{i}] is not a tensor")
        if x.shape != shape or x.dtype != dtype:
            raise ValueError(f"inputs[{i}] has shape/dtype {tuple(x.shape)}/{x.dtype}, expected {tuple(shape)}/{dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype {dtype} not supported (float32/float16/bfloat16/float64)")
    topo = Topology(len(inputs), gpus_per_node)
    flat = [x.detach().reshape(-1).cpu() for x in inputs]
    plan = build_plan(topo, flat[0].numel(), algorithm)
    return [o.reshape(shape) for o in simulate_plan(plan, flat)]
