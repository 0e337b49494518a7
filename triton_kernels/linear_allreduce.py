"""Row-parallel decode GEMM fused with the all-reduce of its output, optionally + residual + RMSNorm.

`y = sum over ranks of x_r @ w_r.T` where every rank holds a K-shard of the weight (`w_r[N, K_r]`) and its
slice of the activations (`x_r[M, K_r]`). Two launches per call, no host synchronisation:

1. `_linear_allreduce_push_kernel`: a decode GEMM (GEMV-style FMA for M <= 4, `tl.dot` above). The epilogue
   of every finished [BM, BN] output tile stores the tile's partial sum straight into the receive slot of
   the GPU that owns those columns (a store through a peer pointer over NVLink) and releases a per-tile
   flag at system scope. Two-shot: the tile goes to the owner of its column chunk (reduce-scatter);
   one-shot: the tile goes to every GPU of the node. The kernel never waits, so the partials stream to
   the peers while the rest of the matmul runs.
2. `_linear_allreduce_finish_kernel` (one program per row): acquires the tile flags of its row, sums the
   partials of its chunk, runs the inter-node recursive-doubling rounds of the NVRAR plan on it (one
   exchange per round with the GPU of the same local rank on node `node ^ 2**k`), adds the residual and,
   two-shot, all-gathers the chunk (+ its sum of squares for RMSNorm) to the node's GPUs. Finally it
   writes `y` (or `normed`, `new_residual`).

Buffers are double-buffered by the parity of a device-side sequence number and flags carry that number,
so consecutive calls (any layer, any shape within the workspace's capacity) reuse them without a host
sync; the whole call is CUDA-graph capturable. Every spin is bounded; a timeout sets an error word that
`FusedAllReduceWorkspace.check()` turns into `CommTimeoutError` naming rank, step and stage.

Caveats: the number of logical nodes must be a power of two; peers must be reachable by pointer (NVLink
inside a host, which includes "logical nodes" carved out of one host). A real cross-host transport
(NVSHMEM put-with-signal over IB/Slingshot) is not wired in yet. Do not run two calls on one workspace
concurrently on different streams.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Table rows of peer / local addresses (int64), see FusedAllReduceWorkspace._build_table.
(_ROW_RS, _ROW_RS_FLAG, _ROW_AG, _ROW_AG_SQ, _ROW_AG_FLAG, _ROW_X, _ROW_X_FLAG,
 _ROW_LOCAL) = (tl.constexpr(i) for i in range(8))
_N_ROWS = 8
# Columns of the local row.
_L_RS, _L_RS_FLAG, _L_AG, _L_AG_SQ, _L_AG_FLAG, _L_X, _L_X_FLAG, _L_ACC = (tl.constexpr(i) for i in range(8))


class CommTimeoutError(RuntimeError):
    """A bounded GPU spin-wait of the fused all-reduce ran out: a peer never signalled."""


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _linear_allreduce_push_kernel(
    x_ptr, w_ptr, table_ptr, seq_ptr,
    M, N, K, stride_xm, stride_wn, LOCAL_RANK, shard_n, MN_CAP, TF_CAP,
    MAXP: tl.constexpr, LOCAL: tl.constexpr, ONE_SHOT: tl.constexpr, PART: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    MB = tl.cdiv(M, BM)
    NT = tl.cdiv(N, BN)
    # m-blocks vary fastest: programs sharing a weight tile run together (weight read once via L2).
    nt = pid // MB
    mb = pid % MB
    seq = tl.load(seq_ptr)
    if pid == 0:
        tl.store(seq_ptr + 1, seq)  # the finish kernel reads the step here; it bumps seq_ptr[0]
    parity = seq & 1

    offs_m = mb * BM + tl.arange(0, BM)
    offs_n = nt * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if USE_DOT:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BM, BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mk = (k0 + offs_k) < K
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=mask_n[:, None] & mk[None, :], other=0.0)
        if USE_DOT:
            if IEEE:
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(wt), acc)
        else:
            acc3 += xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :]
        x_ptrs += BK
        w_ptrs += BK
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)

    part = acc.to(PART)
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    slot = (parity * LOCAL + LOCAL_RANK).to(tl.int64) * MN_CAP
    fslot = (parity * LOCAL + LOCAL_RANK) * TF_CAP + mb * NT + nt
    if ONE_SHOT:
        for d in tl.static_range(LOCAL):
            dst = tl.load(table_ptr + _ROW_RS * MAXP + d).to(tl.pointer_type(PART))
            tl.store(dst + slot + offs, part, mask=mask)
        # Every thread's peer stores are issued before the single-thread system-scope release.
        tl.debug_barrier()
        for d in tl.static_range(LOCAL):
            flag = tl.load(table_ptr + _ROW_RS_FLAG * MAXP + d).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(flag + fslot, seq, sem="release", scope="sys")
    else:
        d = (nt * BN) // shard_n
        dst = tl.load(table_ptr + _ROW_RS * MAXP + d).to(tl.pointer_type(PART))
        tl.store(dst + slot + offs, part, mask=mask)
        tl.debug_barrier()
        flag = tl.load(table_ptr + _ROW_RS_FLAG * MAXP + d).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flag + fslot, seq, sem="release", scope="sys")


@triton.jit
def _wait_flags(flag_ptrs, mask, seq, max_spins, err_ptr, stage, FENCE: tl.constexpr):
    """Spin (bounded) until every flag under `mask` equals `seq`, then acquire at system scope."""
    f = tl.load(flag_ptrs, mask=mask, other=0, volatile=True)
    pending = tl.sum(tl.where(mask & (f != seq), 1, 0))
    spins = 0
    while (pending > 0) & (spins < max_spins):
        f = tl.load(flag_ptrs, mask=mask, other=0, volatile=True)
        pending = tl.sum(tl.where(mask & (f != seq), 1, 0))
        spins += 1
    if pending > 0:
        tl.store(err_ptr + 1, stage)
        tl.store(err_ptr + 2, seq)
        tl.atomic_xchg(err_ptr, 1)
    if FENCE:
        # Relaxed (volatile) reads that saw the releases, then an acquire fence in every thread.
        tl.inline_asm_elementwise("fence.acq_rel.sys;\n mov.u32 $0, $1;", "=r,r", [seq], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        # Interpreter path (no inline asm): one acquire RMW per flag after the cheap polling.
        tl.atomic_add(flag_ptrs, 0, mask=mask, sem="acquire", scope="sys")
    # Threads that read the data after this did not all take part in the acquire.
    tl.debug_barrier()


@triton.jit
def _finish_block(s, m, cols, cmask, N, parity, out_ptr, res_out_ptr, res_ptr, table_ptr, MN_CAP,
                  MAXP: tl.constexpr, LOCAL: tl.constexpr, ONE_SHOT: tl.constexpr,
                  HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr):
    """Reduced fp32 block `s` of row m: add residual, deliver it; returns its sum of squares."""
    if HAS_RES:
        s += tl.load(res_ptr + m.to(tl.int64) * N + cols, mask=cmask, other=0.0).to(tl.float32)
    h = s.to(out_ptr.dtype.element_ty)
    hf = h.to(tl.float32)
    sq = tl.sum(tl.where(cmask, hf * hf, 0.0), axis=0)
    row = m.to(tl.int64) * N + cols
    if ONE_SHOT:
        if HAS_NORM:
            tl.store(res_out_ptr + row, h, mask=cmask)  # new residual; normalised in a second pass
        else:
            tl.store(out_ptr + row, h, mask=cmask)
    else:
        for d in tl.static_range(LOCAL):
            ag = tl.load(table_ptr + _ROW_AG * MAXP + d).to(tl.pointer_type(out_ptr.dtype.element_ty))
            tl.store(ag + parity.to(tl.int64) * MN_CAP + row, h, mask=cmask)
    return sq


@triton.jit
def _finish_tail(sumsq, m, N, eps, seq, parity, out_ptr, res_out_ptr, nw_ptr, table_ptr, LOCAL_RANK,
                 M_CAP, MAXP: tl.constexpr, LOCAL: tl.constexpr, ONE_SHOT: tl.constexpr,
                 HAS_NORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """After the last reduced block of row m: one-shot normalises; two-shot signals the all-gather."""
    if ONE_SHOT:
        if HAS_NORM:
            rstd = 1.0 / tl.sqrt(sumsq / N + eps)
            tl.debug_barrier()
            for c0 in range(0, N, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                cm = cols < N
                row = m.to(tl.int64) * N + cols
                h = tl.load(res_out_ptr + row, mask=cm, other=0.0).to(tl.float32)
                wn = tl.load(nw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(out_ptr + row, (h * rstd * wn).to(out_ptr.dtype.element_ty), mask=cm)
    else:
        sq_slot = (parity * LOCAL + LOCAL_RANK) * M_CAP + m
        for d in tl.static_range(LOCAL):
            sqp = tl.load(table_ptr + _ROW_AG_SQ * MAXP + d).to(tl.pointer_type(tl.float32))
            tl.store(sqp + sq_slot, sumsq)
        tl.debug_barrier()
        for d in tl.static_range(LOCAL):
            fl = tl.load(table_ptr + _ROW_AG_FLAG * MAXP + d).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(fl + sq_slot, seq, sem="release", scope="sys")


@triton.jit
def _linear_allreduce_finish_kernel(
    out_ptr, res_out_ptr, res_ptr, nw_ptr, table_ptr, seq_ptr, err_ptr,
    M, N, LOCAL_RANK, shard_n, MN_CAP, TF_CAP, M_CAP, eps, max_spins,
    MAXP: tl.constexpr, LOCAL: tl.constexpr, LOCAL_P2: tl.constexpr, ROUNDS: tl.constexpr,
    ONE_SHOT: tl.constexpr, PART: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
    TILE_M: tl.constexpr, TILE_N: tl.constexpr, NT_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
    W_BEGIN: tl.constexpr, W_END: tl.constexpr, FENCE: tl.constexpr,
):
    # Waits are numbered 0 (tile partials), 1..ROUNDS (inter-node rounds), ROUNDS+1 (all-gather, two-shot).
    # A launch runs the segments [W_BEGIN, W_END): the GPU runs all of them in one launch; the CPU
    # simulation of several ranks in one process runs one segment for every rank at a time.
    m = tl.program_id(0)
    seq = tl.load(seq_ptr + 1)
    parity = seq & 1
    if ONE_SHOT:
        c0 = LOCAL_RANK * 0
        cw = N
    else:
        c0 = LOCAL_RANK * shard_n
        cw = shard_n
    local_acc = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_ACC).to(tl.pointer_type(tl.float32))
    local_x = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_X).to(tl.pointer_type(tl.float32))
    row0 = m.to(tl.int64) * N
    LAST: tl.constexpr = ROUNDS + 1 if ONE_SHOT else ROUNDS + 2

    if W_BEGIN <= 0 and W_END > 0:
        rs = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_RS).to(tl.pointer_type(PART))
        rs_flag = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_RS_FLAG).to(tl.pointer_type(tl.int32))
        NT = tl.cdiv(N, TILE_N)
        nt0 = c0 // TILE_N
        n_tiles = tl.cdiv(cw, TILE_N)
        tix = tl.arange(0, NT_BLOCK)
        src = tl.arange(0, LOCAL_P2)
        fptrs = rs_flag + (parity * LOCAL + src[:, None]) * TF_CAP + (m // TILE_M) * NT + nt0 + tix[None, :]
        fmask = (tix[None, :] < n_tiles) & (src[:, None] < LOCAL)
        _wait_flags(fptrs, fmask, seq, max_spins, err_ptr, 0, FENCE)
        sumsq = tl.zeros((), dtype=tl.float32)
        for cb in range(0, cw, BLOCK_C):
            cols = c0 + cb + tl.arange(0, BLOCK_C)
            cm = (cb + tl.arange(0, BLOCK_C)) < cw
            s = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for r in tl.static_range(LOCAL):
                p = rs + (parity * LOCAL + r).to(tl.int64) * MN_CAP + row0 + cols
                s += tl.load(p, mask=cm, other=0.0, cache_modifier=".cg").to(tl.float32)
            if ROUNDS > 0:
                tl.store(local_acc + row0 + cols, s, mask=cm)
                xp = tl.load(table_ptr + _ROW_X * MAXP + 0).to(tl.pointer_type(tl.float32))
                tl.store(xp + (parity * ROUNDS + 0).to(tl.int64) * MN_CAP + row0 + cols, s, mask=cm)
            else:
                sumsq += _finish_block(s, m, cols, cm, N, parity, out_ptr, res_out_ptr, res_ptr, table_ptr,
                                       MN_CAP, MAXP, LOCAL, ONE_SHOT, HAS_RES, HAS_NORM)
        if ROUNDS > 0:
            tl.debug_barrier()
            xf = tl.load(table_ptr + _ROW_X_FLAG * MAXP + 0).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(xf + (parity * ROUNDS + 0) * M_CAP + m, seq, sem="release", scope="sys")
        else:
            _finish_tail(sumsq, m, N, eps, seq, parity, out_ptr, res_out_ptr, nw_ptr, table_ptr, LOCAL_RANK,
                         M_CAP, MAXP, LOCAL, ONE_SHOT, HAS_NORM, BLOCK_C)

    for k in tl.static_range(1, ROUNDS + 1):
        if W_BEGIN <= k and W_END > k:
            x_flag = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_X_FLAG).to(tl.pointer_type(tl.int32))
            one = tl.arange(0, 2)
            fptrs = x_flag + (parity * ROUNDS + (k - 1)) * M_CAP + m + one * 0
            _wait_flags(fptrs, one < 1, seq, max_spins, err_ptr, k, FENCE)
            sumsq = tl.zeros((), dtype=tl.float32)
            for cb in range(0, cw, BLOCK_C):
                cols = c0 + cb + tl.arange(0, BLOCK_C)
                cm = (cb + tl.arange(0, BLOCK_C)) < cw
                s = tl.load(local_acc + row0 + cols, mask=cm, other=0.0)
                s += tl.load(local_x + (parity * ROUNDS + (k - 1)).to(tl.int64) * MN_CAP + row0 + cols,
                             mask=cm, other=0.0, cache_modifier=".cg")
                if k < ROUNDS:
                    tl.store(local_acc + row0 + cols, s, mask=cm)
                    xp = tl.load(table_ptr + _ROW_X * MAXP + k).to(tl.pointer_type(tl.float32))
                    tl.store(xp + (parity * ROUNDS + k).to(tl.int64) * MN_CAP + row0 + cols, s, mask=cm)
                else:
                    sumsq += _finish_block(s, m, cols, cm, N, parity, out_ptr, res_out_ptr, res_ptr,
                                           table_ptr, MN_CAP, MAXP, LOCAL, ONE_SHOT, HAS_RES, HAS_NORM)
            if k < ROUNDS:
                tl.debug_barrier()
                xf = tl.load(table_ptr + _ROW_X_FLAG * MAXP + k).to(tl.pointer_type(tl.int32))
                tl.atomic_xchg(xf + (parity * ROUNDS + k) * M_CAP + m, seq, sem="release", scope="sys")
            else:
                _finish_tail(sumsq, m, N, eps, seq, parity, out_ptr, res_out_ptr, nw_ptr, table_ptr,
                             LOCAL_RANK, M_CAP, MAXP, LOCAL, ONE_SHOT, HAS_NORM, BLOCK_C)

    if not ONE_SHOT:
        if W_BEGIN <= ROUNDS + 1 and W_END > ROUNDS + 1:
            ag = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_AG).to(tl.pointer_type(out_ptr.dtype.element_ty))
            ag_sq = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_AG_SQ).to(tl.pointer_type(tl.float32))
            ag_flag = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_AG_FLAG).to(tl.pointer_type(tl.int32))
            src = tl.arange(0, LOCAL_P2)
            slots = (parity * LOCAL + src) * M_CAP + m
            _wait_flags(ag_flag + slots, src < LOCAL, seq, max_spins, err_ptr, ROUNDS + 1, FENCE)
            total = tl.sum(tl.load(ag_sq + slots, mask=src < LOCAL, other=0.0, cache_modifier=".cg"), axis=0)
            rstd = 1.0 / tl.sqrt(total / N + eps)
            for cb in range(0, N, BLOCK_C):
                cols = cb + tl.arange(0, BLOCK_C)
                cm = cols < N
                h = tl.load(ag + parity.to(tl.int64) * MN_CAP + row0 + cols, mask=cm, other=0.0,
                            cache_modifier=".cg")
                if HAS_NORM:
                    wn = tl.load(nw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                    tl.store(out_ptr + row0 + cols, (h.to(tl.float32) * rstd * wn).to(out_ptr.dtype.element_ty),
                             mask=cm)
                    tl.store(res_out_ptr + row0 + cols, h, mask=cm)
                else:
                    tl.store(out_ptr + row0 + cols, h, mask=cm)

    if W_END >= LAST:
        if m == 0:
            tl.store(seq_ptr, seq + 1)


# ----------------------------------------------------------------------------------------------------
# Workspace (symmetric buffers, peer address table, device sequence number)


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class _Layout:
    max_m: int
    max_n: int
    local: int
    rounds: int

    @property
    def mn_cap(self) -> int:
        return self.max_m * self.max_n

    @property
    def tf_cap(self) -> int:  # tile flags per (parity, src): tiles are >= 16 wide and, for M > 4, >= 16 tall
        return triton.cdiv(self.max_m, 16) * triton.cdiv(self.max_n, 16) + triton.cdiv(self.max_n, 16)

    def offsets(self) -> dict[str, int]:
        L, R, mn = self.local, max(self.rounds, 1), self.mn_cap
        sizes = {
            "rs": 2 * L * mn * 4,
            "ag": 2 * mn * 4,
            "x": 2 * R * mn * 4,
            "acc": mn * 4,
            "rs_flag": 2 * L * self.tf_cap * 4,
            "ag_sq": 2 * L * self.max_m * 4,
            "ag_flag": 2 * L * self.max_m * 4,
            "x_flag": 2 * R * self.max_m * 4,
        }
        off, pos = {}, 0
        for k, v in sizes.items():
            off[k] = pos
            pos += _align(v)
        off["total"] = pos
        return off


class FusedAllReduceWorkspace:
    """Per-rank state of the fused GEMM + all-reduce: symmetric buffers, peer table, step counter.

    Create once per process at start-up (symmetric allocation is collective), with the largest M and N
    you will call with: `FusedAllReduceWorkspace.from_torch_symm(max_m, max_n)` on GPUs (torch symmetric
    memory; `gpus_per_node` follows `fusedlis.comm.Topology`), or `simulate(...)` for CPU tests.
    Ranks are node-major: rank = node * gpus_per_node + local_rank.
    """

    def __init__(self, *, rank: int, world_size: int, gpus_per_node: int, max_m: int, max_n: int,
                 buffer: torch.Tensor, base_ptrs: list[int], max_spins: int | None = None) -> None:
        if world_size % gpus_per_node:
            raise ValueError(f"world_size={world_size} is not a multiple of gpus_per_node={gpus_per_node}")
        nodes = world_size // gpus_per_node
        if nodes & (nodes - 1):
            raise ValueError(f"number of nodes ({nodes}) must be a power of two for recursive doubling")
        if len(base_ptrs) != world_size:
            raise ValueError(f"base_ptrs has {len(base_ptrs)} entries, expected world_size={world_size}")
        self.rank, self.world_size, self.local_size = rank, world_size, gpus_per_node
        self.local_rank, self.node, self.num_nodes = rank % gpus_per_node, rank // gpus_per_node, nodes
        self.rounds = int(math.log2(nodes))
        self.layout = _Layout(max_m, max_n, gpus_per_node, self.rounds)
        off = self.layout.offsets()
        if buffer.numel() * buffer.element_size() < off["total"]:
            raise ValueError(f"buffer holds {buffer.numel()} bytes, layout needs {off['total']}")
        self.buffer, self.base_ptrs, self.device = buffer, list(base_ptrs), buffer.device
        if max_spins is None:
            max_spins = 1 << 26 if buffer.is_cuda else 2000
        self.max_spins = int(max_spins)
        self.maxp = max(8, gpus_per_node, self.rounds)
        self.table = self._build_table().to(self.device)
        # [0]: step of the next call (starts at 1: flags start at 0); [1]: step of the call in flight.
        self.seq = torch.tensor([1, 0], dtype=torch.int32, device=self.device)
        # [0]: 1 after a timeout, [1]: stage, [2]: step.
        self.err = torch.zeros(4, dtype=torch.int32, device=self.device)

    def _build_table(self) -> torch.Tensor:
        off, L = self.layout.offsets(), self.local_size
        t = torch.zeros(_N_ROWS, self.maxp, dtype=torch.int64)
        for d in range(L):
            base = self.base_ptrs[self.node * L + d]
            for row, key in ((_ROW_RS, "rs"), (_ROW_RS_FLAG, "rs_flag"), (_ROW_AG, "ag"), (_ROW_AG_SQ, "ag_sq"),
                             (_ROW_AG_FLAG, "ag_flag")):
                t[row.value, d] = base + off[key]
        for k in range(self.rounds):
            partner = (self.node ^ (1 << k)) * L + self.local_rank
            t[_ROW_X.value, k] = self.base_ptrs[partner] + off["x"]
            t[_ROW_X_FLAG.value, k] = self.base_ptrs[partner] + off["x_flag"]
        me = self.base_ptrs[self.rank]
        for col, key in ((_L_RS, "rs"), (_L_RS_FLAG, "rs_flag"), (_L_AG, "ag"), (_L_AG_SQ, "ag_sq"),
                         (_L_AG_FLAG, "ag_flag"), (_L_X, "x"), (_L_X_FLAG, "x_flag"), (_L_ACC, "acc")):
            t[_ROW_LOCAL.value, col.value] = me + off[key]
        return t

    @classmethod
    def from_torch_symm(cls, max_m: int, max_n: int, *, group=None, gpus_per_node: int | None = None,
                        device: torch.device | None = None) -> "FusedAllReduceWorkspace":
        """Collective: allocate the buffers in torch symmetric memory of `group` (default: world)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from fusedlis.comm import Topology

        group = group or dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        topo = Topology(world, gpus_per_node)
        device = device or torch.device("cuda", torch.cuda.current_device())
        nbytes = _Layout(max_m, max_n, topo.gpus_per_node, int(math.log2(max(topo.num_nodes, 1)))).offsets()["total"]
        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        hdl = symm_mem.rendezvous(buf, group)
        buf.zero_()
        torch.cuda.synchronize(device)
        dist.barrier(group)
        ws = cls(rank=rank, world_size=world, gpus_per_node=topo.gpus_per_node, max_m=max_m, max_n=max_n,
                 buffer=buf, base_ptrs=[int(p) for p in hdl.buffer_ptrs])
        ws._symm_handle = hdl  # keeps the mapping alive
        return ws

    @classmethod
    def simulate(cls, world_size: int, gpus_per_node: int, max_m: int, max_n: int,
                 max_spins: int = 2000) -> list["FusedAllReduceWorkspace"]:
        """One workspace per rank over CPU buffers of one process (for `simulate_linear_allreduce`)."""
        nodes = world_size // max(gpus_per_node, 1)
        lay = _Layout(max_m, max_n, gpus_per_node, int(math.log2(max(nodes, 1))))
        bufs = [torch.zeros(lay.offsets()["total"], dtype=torch.uint8) for _ in range(world_size)]
        ptrs = [b.data_ptr() for b in bufs]
        return [cls(rank=r, world_size=world_size, gpus_per_node=gpus_per_node, max_m=max_m, max_n=max_n,
                    buffer=bufs[r], base_ptrs=ptrs, max_spins=max_spins) for r in range(world_size)]

    def check(self) -> None:
        """Raise CommTimeoutError if a spin-wait of an earlier call timed out (synchronises)."""
        e = self.err.tolist()
        if e[0]:
            stage = e[1]
            if stage == 0:
                what = "tile partials (reduce-scatter)"
            elif stage <= self.rounds:
                what = f"inter-node round {stage - 1}"
            else:
                what = "all-gather"
            raise CommTimeoutError(f"rank {self.rank}: fused all-reduce timed out at step {e[2]} "
                                   f"waiting for {what} (stage {stage})")

    def step(self) -> int:
        """Step number the next call will use (synchronises)."""
        return int(self.seq[0].item())


def _as_workspace(comm) -> FusedAllReduceWorkspace | None:
    """The one-line adapter: accept our workspace or any comm object carrying one as `.fused_workspace`."""
    if isinstance(comm, FusedAllReduceWorkspace):
        return comm
    ws = getattr(comm, "fused_workspace", None)
    return ws if isinstance(ws, FusedAllReduceWorkspace) else None


# ----------------------------------------------------------------------------------------------------
# Launchers


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def linear_allreduce_config(M: int, N: int, K: int, local: int, dtype: torch.dtype,
                            one_shot: bool | None = None) -> dict:
    """Default launch config (block sizes, one-shot vs two-shot) for one rank's GEMM shape."""
    if M <= 4:
        bm = _pow2(M)
        cfg = {"USE_DOT": False, "BM": bm, "BN": 32, "BK": max(32, 256 // bm), "num_warps": 4, "num_stages": 3}
    else:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        cfg = {"USE_DOT": True, "BM": bm, "BN": 32, "BK": 128 if bm <= 32 else 64, "num_warps": 4, "num_stages": 4}
    if dtype == torch.float32 and cfg["USE_DOT"]:
        cfg["BK"] = 32
    if one_shot is None:
        # With 2 GPUs per node both schemes move the same bytes over NVLink and one-shot saves a round
        # trip; two-shot pays off when the node is larger and M is large (see docs/fused.md).
        one_shot = local <= 2 or M <= 16
    if not one_shot and N % (local * cfg["BN"]) != 0:
        one_shot = True  # chunks must be whole tiles
    cfg["ONE_SHOT"] = bool(one_shot)
    return cfg


def _check(x, w, ws, residual, norm_weight):
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("x and w_shard must be tensors")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: dtype {x.dtype} not supported (float16, bfloat16, float32)")
    if w.dtype != x.dtype:
        raise TypeError(f"w_shard: dtype {w.dtype} differs from x's {x.dtype}")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x must be [M, K] and w_shard [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but w_shard has K={w.shape[1]}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w_shard must be contiguous along K")
    M, N = x.shape[0], w.shape[0]
    if M < 1:
        raise ValueError("x must have at least one row")
    if x.device != ws.device or w.device != ws.device:
        raise ValueError(f"x ({x.device}) and w_shard ({w.device}) must be on the workspace's device {ws.device}")
    if M > ws.layout.max_m or N > ws.layout.max_n:
        raise ValueError(f"M={M}, N={N} exceed the workspace capacity max_m={ws.layout.max_m}, "
                         f"max_n={ws.layout.max_n}")
    if residual is not None:
        if residual.shape != (M, N) or residual.dtype != x.dtype or not residual.is_contiguous():
            raise ValueError(f"residual must be contiguous {x.dtype} [{M}, {N}], got {residual.dtype} "
                             f"{tuple(residual.shape)}")
        if residual.device != ws.device:
            raise ValueError(f"residual is on {residual.device}, expected {ws.device}")
    if norm_weight is not None:
        if norm_weight.shape != (N,) or not norm_weight.is_contiguous():
            raise ValueError(f"norm_weight must be contiguous [{N}], got {tuple(norm_weight.shape)}")
        if norm_weight.device != ws.device:
            raise ValueError(f"norm_weight is on {norm_weight.device}, expected {ws.device}")


def _launch_push(x, w, ws, cfg, part_dtype):
    M, K = x.shape
    N = w.shape[0]
    L = ws.local_size
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _linear_allreduce_push_kernel[grid](
        x, w, ws.table, ws.seq, M, N, K, x.stride(0), w.stride(0), ws.local_rank, N // L,
        ws.layout.mn_cap, ws.layout.tf_cap,
        MAXP=ws.maxp, LOCAL=L, ONE_SHOT=cfg["ONE_SHOT"], PART=_TL[part_dtype],
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], USE_DOT=cfg["USE_DOT"], EVEN_K=K % cfg["BK"] == 0,
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _launch_finish(out, res_out, residual, norm_weight, ws, cfg, part_dtype, eps, w_begin, w_end):
    M, N = out.shape
    L = ws.local_size
    cw = N if cfg["ONE_SHOT"] else N // L
    _linear_allreduce_finish_kernel[(M,)](
        out, res_out if res_out is not None else out, residual if residual is not None else out,
        norm_weight if norm_weight is not None else out, ws.table, ws.seq, ws.err,
        M, N, ws.local_rank, N // L, ws.layout.mn_cap, ws.layout.tf_cap, ws.layout.max_m, float(eps),
        ws.max_spins,
        MAXP=ws.maxp, LOCAL=L, LOCAL_P2=_pow2(L), ROUNDS=ws.rounds, ONE_SHOT=cfg["ONE_SHOT"], PART=_TL[part_dtype],
        HAS_RES=residual is not None, HAS_NORM=norm_weight is not None,
        TILE_M=cfg["BM"], TILE_N=cfg["BN"], NT_BLOCK=_pow2(triton.cdiv(cw, cfg["BN"])),
        BLOCK_C=min(1024, _pow2(cw)), W_BEGIN=w_begin, W_END=w_end,
        FENCE=out.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1", num_warps=4,
    )


def _pick_config(M, N, K, ws, dtype, one_shot, config):
    cfg = linear_allreduce_config(M, N, K, ws.local_size, dtype, one_shot)
    if config:
        cfg.update(config)
    if one_shot is False and cfg["ONE_SHOT"]:
        raise ValueError(f"two-shot needs N % (gpus_per_node * BN) == 0, got N={N}, BN={cfg['BN']}")
    if not cfg["ONE_SHOT"] and N % (ws.local_size * cfg["BN"]) != 0:
        raise ValueError(f"two-shot needs N % (gpus_per_node * BN) == 0, got N={N}, BN={cfg['BN']}")
    return cfg


def _n_waits(ws: FusedAllReduceWorkspace, one_shot: bool) -> int:
    return ws.rounds + (1 if one_shot else 2)


def _alloc_out(x, N, norm_weight, out=None, poison=False):
    if out is not None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != (2 if norm_weight is not None else 1):
            raise ValueError("out must be one tensor, or (normed, new_residual) with norm_weight")
        for o in outs:
            if o.shape != (x.shape[0], N) or o.dtype != x.dtype or not o.is_contiguous() or o.device != x.device:
                raise ValueError(f"out must be contiguous {x.dtype} [{x.shape[0]}, {N}] on {x.device}")
        return outs[0], (outs[1] if len(outs) == 2 else None)
    new = torch.full if poison else (lambda shape, _v, **kw: torch.empty(shape, **kw))
    o = new((x.shape[0], N), float("nan"), dtype=x.dtype, device=x.device)
    r = new((x.shape[0], N), float("nan"), dtype=x.dtype, device=x.device) if norm_weight is not None else None
    return o, r


def _result(out, res_out, norm_weight):
    return (out, res_out) if norm_weight is not None else out


def linear_allreduce(x: torch.Tensor, w_shard: torch.Tensor, comm, residual: torch.Tensor | None = None,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-5, *,
                     one_shot: bool | None = None, partial_dtype: torch.dtype | None = None,
                     config: dict | None = None, out=None):
    """Row-parallel linear `sum_ranks(x @ w_shard.T)` fused with its all-reduce (+ residual, RMSNorm).

    `x[M, K_local]`, `w_shard[N, K_local]` (this rank's K-slice), `residual[M, N]` (same on every rank),
    `norm_weight[N]`. Returns `y`; with `residual` and no norm `y + residual`; with `norm_weight`
    `(rmsnorm(y + residual) * norm_weight, y + residual)`. Collective: every rank of `comm` must call it
    with the same shapes in the same order. `comm` is a `FusedAllReduceWorkspace` (or carries one as
    `.fused_workspace`); any other object with `all_reduce(tensor)` runs the unfused torch path.
    `one_shot=None` picks one-shot or two-shot by size; `partial_dtype` (default x.dtype) is what the
    tile partials travel in (default fp32 for M <= 8, else x.dtype). `out` (optional, preallocated
    `y` or `(normed, new_residual)`) is written in place, e.g. for CUDA graphs.
    """
    ws = _as_workspace(comm)
    if ws is None:
        if not hasattr(comm, "all_reduce"):
            raise TypeError("comm must be a FusedAllReduceWorkspace or have all_reduce(tensor)")
        y = (x @ w_shard.T).contiguous()
        y = comm.all_reduce(y)
        return _torch_finish(y, residual, norm_weight, eps)
    _check(x, w_shard, ws, residual, norm_weight)
    M, K = x.shape
    N = w_shard.shape[0]
    cfg = _pick_config(M, N, K, ws, x.dtype, one_shot, config)
    part = partial_dtype or (torch.float32 if M <= 8 else x.dtype)
    if part not in _DTYPES:
        raise TypeError(f"partial_dtype {part} not supported")
    out, res_out = _alloc_out(x, N, norm_weight, out)
    _launch_push(x, w_shard, ws, cfg, part)
    _launch_finish(out, res_out, residual, norm_weight, ws, cfg, part, eps, 0, 1 << 20)
    if os.environ.get("FUSEDLIS_CHECK_COMM") == "1":
        ws.check()
    return _result(out, res_out, norm_weight)


def simulate_linear_allreduce(xs: list[torch.Tensor], ws_shards: list[torch.Tensor],
                              workspaces: list[FusedAllReduceWorkspace], residual: torch.Tensor | None = None,
                              norm_weight: torch.Tensor | None = None, eps: float = 1e-5, *,
                              one_shot: bool | None = None, partial_dtype: torch.dtype | None = None,
                              config: dict | None = None):
    """Run the two kernels for every rank in one process (CPU / interpreter); one result per rank.

    The kernels are the GPU ones; only the launch is split at every wait so that ranks run in lock-step.
    """
    W = len(workspaces)
    if len(xs) != W or len(ws_shards) != W:
        raise ValueError(f"need one x and one w_shard per rank ({W})")
    for x, w, ws in zip(xs, ws_shards, workspaces):
        _check(x, w, ws, residual, norm_weight)
    M, K = xs[0].shape
    N = ws_shards[0].shape[0]
    ws0 = workspaces[0]
    cfg = _pick_config(M, N, K, ws0, xs[0].dtype, one_shot, config)
    part = partial_dtype or (torch.float32 if M <= 8 else xs[0].dtype)
    outs = [_alloc_out(x, N, norm_weight, poison=True) for x in xs]
    for x, w, ws in zip(xs, ws_shards, workspaces):
        _launch_push(x, w, ws, cfg, part)
    nw = _n_waits(ws0, cfg["ONE_SHOT"])
    for seg in range(nw):
        for (out, res_out), ws in zip(outs, workspaces):
            _launch_finish(out, res_out, residual, norm_weight, ws, cfg, part, eps, seg, seg + 1)
    return [_result(o, r, norm_weight) for o, r in outs]


def _torch_finish(y, residual, norm_weight, eps):
    if residual is not None:
        y = (y.float() + residual.float()).to(y.dtype)
    if norm_weight is None:
        return y
    hf = y.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    return normed.to(y.dtype), y


def linear_allreduce_ref(xs: list[torch.Tensor], ws_shards: list[torch.Tensor],
                         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                         eps: float = 1e-5):
    """Plain-torch reference on every rank's inputs: sum_r xs[r] @ ws_shards[r].T (+ residual, RMSNorm).

    Computes in fp32 (fp64 for fp64 inputs) and returns the inputs' dtype, like the launcher.
    """
    dt = xs[0].dtype
    acc_t = torch.float64 if dt == torch.float64 else torch.float32
    y = sum(x.to(acc_t) @ w.to(acc_t).T for x, w in zip(xs, ws_shards))
    if residual is not None:
        y = y + residual.to(acc_t)
    if norm_weight is None:
        return y.to(dt)
    normed = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(acc_t)
    return normed.to(dt), y.to(dt)
