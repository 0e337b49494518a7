"""Row-parallel decode GEMM fused with the all-reduce of its output, optionally + residual + RMSNorm.

`y = sum over ranks of x_r @ w_r.T` where every rank holds a K-shard of the weight (`w_r[N, K_r]`) and its
slice of the activations (`x_r[M, K_r]`). One launch per call, no host synchronisation; its programs are:

1. GEMM programs: the decode GEMM of `linear` (same tiles and split-K; `tl.dot`, or GEMV-style FMA). The
   epilogue of every finished [BM, BN] output tile (of one K-split) stores its partial sum straight into
   the receive slot of the GPU that owns those columns (a store through a peer pointer over NVLink) and
   releases a per-(tile, split) flag at system scope. Two-shot: the tile goes to the owner of its column
   chunk (reduce-scatter); one-shot: to every GPU of the node. These programs never wait, so the partials
   stream to the peers while the rest of the matmul runs.
2. Finish programs (row, column chunk): acquire the flags of their chunk, sum the partials of every
   source rank and K-split in a fixed order, run the inter-node recursive-doubling rounds of the NVRAR
   plan on it (one exchange per round with the GPU of the same local rank on node `node ^ 2**k`), add the
   residual and, two-shot, all-gather the chunk (+ its sum of squares for RMSNorm) to the node's GPUs.
   Finally they write `y` (or `normed`, `new_residual`).

Buffers are double-buffered by the parity of a device-side sequence number and flags carry that number,
so consecutive calls (any layer, any shape within the workspace's capacity) reuse them without a host
sync; the whole call is CUDA-graph capturable. Every spin is bounded; a timeout sets an error word that
`FusedAllReduceWorkspace.check()` turns into `CommTimeoutError` naming rank, step and stage.

Caveats: the number of logical nodes must be a power of two; the GPUs of a node must reach each other by
pointer (NVLink). Rail partners on another host are reached by NVSHMEM put-with-signal (workspace
`transport="put"`, from an NVSHMEM `SymmetricWorkspace`); not run on a real multi-host fabric here. Do not run
two calls on one workspace concurrently on different streams.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Table rows of peer / local addresses (int64), see FusedAllReduceWorkspace._build_table.
(_ROW_RS, _ROW_SQW, _ROW_AG, _ROW_SQ, _ROW_AG_FLAG, _ROW_X, _ROW_X_FLAG,
 _ROW_LOCAL, _ROW_PE) = (tl.constexpr(i) for i in range(9))
_N_ROWS = 9
TRANSPORTS = ("ptr", "put")  # inter-node rounds: peer stores, or NVSHMEM put-with-signal
# Columns of the local row.
_L_RS, _L_SQW, _L_AG, _L_SQ, _L_AG_FLAG, _L_X, _L_X_FLAG, _L_ACC = (tl.constexpr(i) for i in range(8))
_MIN_BLOCK_C = 128
_MIN_SPLIT_ROOM = 8  # rows of partials a (parity, source) slot holds at least: split-K 8 at M = 1


from fusedlis._env import env_flag
from fusedlis.comm.kernels import NVSHMEM_SIGNAL_SET, _clock, _ll_encode, _spent, putmem_signal_block
from fusedlis.comm.kernels import uses_gpu_clock, wait_budget
from fusedlis.triton_kernels._pdl import pdl_launch, pdl_launch_dependents, pdl_wait, prefetch_weight_lines

_SIGNAL_SET = tl.constexpr(NVSHMEM_SIGNAL_SET)

try:  # one exception type for every communication timeout of the package
    from fusedlis.comm.symmetric import CommTimeoutError
except ImportError:  # pragma: no cover - comm without the symmetric workspace
    class CommTimeoutError(RuntimeError):
        """A bounded GPU spin-wait of the fused all-reduce ran out: a peer never signalled."""


# ----------------------------------------------------------------------------------------------------
# Kernel: one launch; programs [0, n_gemm) are GEMM tiles, programs [n_gemm, n_gemm + n_fin) finish rows.


@triton.jit
def _gemm_push(pid, seq, parity, x_ptr, w_ptr, table_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, LOCAL_RANK,
               shard_n, MN_CAP, MAXP: tl.constexpr, LOCAL: tl.constexpr, ONE_SHOT: tl.constexpr,
               PART: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
               USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    """One [BM, BN] tile of x @ w.T over one K-split; its partial goes, LL-encoded, to the owner(s)' receive
    slot of that split. No flag and no fence: the owner polls the words themselves. Splits are never summed
    here: the owner sums them with the other ranks' partials, so split-K costs no extra launch or counter."""
    MB = tl.cdiv(M, BM)
    NT = tl.cdiv(N, BN)
    tiles = MB * NT
    ks = pid // tiles
    tile = pid % tiles
    # m-blocks vary fastest: programs sharing a weight tile run together (weight read once via L2).
    nt = tile // MB
    mb = tile % MB
    k_lo = ks * K_PER_SPLIT
    offs_m = mb * BM + tl.arange(0, BM)
    offs_n = nt * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    if USE_DOT:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BM, BN, BK), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BK):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mk = (k_lo + k0 + offs_k) < K
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

    UT: tl.constexpr = tl.uint16 if PART.primitive_bitwidth == 16 else tl.uint32
    SIGN: tl.constexpr = (1 << 15) if PART.primitive_bitwidth == 16 else (1 << 31)
    e = _ll_encode(acc.to(PART), UT, SIGN)
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    slot = (parity * LOCAL + LOCAL_RANK).to(tl.int64) * MN_CAP + ks.to(tl.int64) * M * N
    if ONE_SHOT:
        for d in tl.static_range(LOCAL):
            dst = tl.load(table_ptr + _ROW_RS * MAXP + d).to(tl.pointer_type(UT))
            tl.store(dst + slot + offs, e, mask=mask)
    else:
        d = (nt * BN) // shard_n
        dst = tl.load(table_ptr + _ROW_RS * MAXP + d).to(tl.pointer_type(UT))
        tl.store(dst + slot + offs, e, mask=mask)


# LL ("Lamport") words, as in fusedlis.comm's LL all-reduce (its `_ll_encode`): the all-zero word means "empty". A value is
# encoded by turning -0.0 into +0.0 and flipping its sign bit, so no encoded word is zero; the receiver polls
# until no word of its chunk is zero, decodes, and zeroes the words again. Slots start zeroed and alternate by
# call parity (a sender is at most one call ahead). -0.0 -> +0.0 changes no sum.


# Waits are bounded by `budget`: nanoseconds of %globaltimer on the GPU (a peer still compiling a kernel can be
# seconds late, so a spin count is no measure there), spins in the interpreter (no inline asm).


@triton.jit
def _timed_out(err_ptr, stage, seq):
    tl.store(err_ptr + 1, stage)
    tl.store(err_ptr + 2, seq)
    tl.atomic_xchg(err_ptr, 1)


@triton.jit
def _ll_take2(p, mask, seq, budget, err_ptr, stage, PART: tl.constexpr, GPU: tl.constexpr):
    """Wait (bounded) until every word under the 2-D `mask` at `p` is non-zero; return the decoded fp32
    values (0 outside the mask) and zero the words for the next call of this parity. All words are polled
    at once, so the sources' latencies overlap."""
    UT: tl.constexpr = tl.uint16 if PART.primitive_bitwidth == 16 else tl.uint32
    SIGN: tl.constexpr = (1 << 15) if PART.primitive_bitwidth == 16 else (1 << 31)
    pu = p.to(tl.pointer_type(UT))
    e = tl.load(pu, mask=mask, other=1, volatile=True)
    t0 = _clock(seq, GPU)
    spins = 0
    while (tl.min(tl.min(e, axis=1), axis=0) == 0) & (_spent(t0, spins, seq, GPU) < budget):
        e = tl.load(pu, mask=mask, other=1, volatile=True)
        spins += 1
    if tl.min(tl.min(e, axis=1), axis=0) == 0:
        _timed_out(err_ptr, stage, seq)
    tl.store(pu, tl.zeros_like(e), mask=mask)
    return tl.where(mask, (e ^ SIGN).to(PART, bitcast=True).to(tl.float32), 0.0)


@triton.jit
def _wait_flags(flag_ptrs, mask, seq, budget, err_ptr, stage, FENCE: tl.constexpr):
    """Spin (bounded) until every flag under `mask` equals `seq`, then acquire at system scope."""
    f = tl.load(flag_ptrs, mask=mask, other=0, volatile=True)
    pending = tl.sum(tl.where(mask & (f != seq), 1, 0))
    t0 = _clock(seq, FENCE)
    spins = 0
    while (pending > 0) & (_spent(t0, spins, seq, FENCE) < budget):
        if FENCE:
            tl.inline_asm_elementwise("nanosleep.u32 64;\n mov.u32 $0, $1;", "=r,r", [seq], dtype=tl.int32,
                                      is_pure=False, pack=1)
        f = tl.load(flag_ptrs, mask=mask, other=0, volatile=True)
        pending = tl.sum(tl.where(mask & (f != seq), 1, 0))
        spins += 1
    if pending > 0:
        _timed_out(err_ptr, stage, seq)
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
def _finish_chunk(s, seq, parity, m, c, cols, cm, N, out_ptr, res_out_ptr, res_ptr, table_ptr, LOCAL_RANK,
                  MN_CAP, M_CAP, NC_CAP, MAXP: tl.constexpr, LOCAL: tl.constexpr, ONE_SHOT: tl.constexpr,
                  HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr):
    """Reduced fp32 chunk `s` of row m: add residual, deliver h (all-gather when two-shot), publish sum h^2."""
    if HAS_RES:
        s += tl.load(res_ptr + m.to(tl.int64) * N + cols, mask=cm, other=0.0).to(tl.float32)
    h = s.to(out_ptr.dtype.element_ty)
    row = m.to(tl.int64) * N + cols
    if ONE_SHOT:
        if HAS_NORM:
            tl.store(res_out_ptr + row, h, mask=cm)
            hf = h.to(tl.float32)
            sq = tl.sum(tl.where(cm, hf * hf, 0.0), axis=0)
            # the chunk's sum of squares for the row's other chunk programs: one word tagged with the call's
            # step (seq << 32 | fp32 bits), so no flag, fence or clearing is needed
            sqw = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_SQW).to(tl.pointer_type(tl.int64))
            word = (seq.to(tl.int64) << 32) | (sq.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
            tl.store(sqw + c * M_CAP + m, word)
            tl.debug_barrier()  # h may be re-read by this program's other threads after the wait
        else:
            tl.store(out_ptr + row, h, mask=cm)
    else:
        slot = (parity * (LOCAL * NC_CAP) + LOCAL_RANK * NC_CAP + c) * M_CAP + m
        for d in tl.static_range(LOCAL):
            ag = tl.load(table_ptr + _ROW_AG * MAXP + d).to(tl.pointer_type(out_ptr.dtype.element_ty))
            tl.store(ag + parity.to(tl.int64) * MN_CAP + row, h, mask=cm)
        if HAS_NORM:
            hf = h.to(tl.float32)
            sq = tl.sum(tl.where(cm, hf * hf, 0.0), axis=0)
            for d in tl.static_range(LOCAL):
                sqp = tl.load(table_ptr + _ROW_SQ * MAXP + d).to(tl.pointer_type(tl.float32))
                tl.store(sqp + slot, sq)
        tl.debug_barrier()
        for d in tl.static_range(LOCAL):
            fl = tl.load(table_ptr + _ROW_AG_FLAG * MAXP + d).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(fl + slot, seq, sem="release", scope="sys")
    return h.to(tl.float32)


@triton.jit
def _send_round(r, s, seq, parity, acc, row0, cols, cm, lo, sw, s0, xflag_slot, table_ptr, MN_CAP, M_CAP, NC_CAP,
                MAXP: tl.constexpr, ROUNDS: tl.constexpr, BLOCK_C: tl.constexpr, PUT: tl.constexpr,
                FENCE: tl.constexpr):
    """Inter-node round r: send the running fp32 chunk `s` (already stored at `acc + row0 + cols`) into slot
    (parity, r) of the rail partner's x region and set its flag word there to seq."""
    slot = parity * ROUNDS + r
    if PUT:
        # NVSHMEM addresses are this rank's own symmetric addresses; the put lands at the same offsets on the PE
        # and sets the signal word after the data (a partner on another host has no load/store pointer).
        xloc = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_X).to(tl.pointer_type(tl.float32))
        xfl = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_X_FLAG).to(tl.pointer_type(tl.int64))
        dst = xloc + slot.to(tl.int64) * MN_CAP + row0 + s0 + lo
        src = acc + row0 + s0 + lo
        nval = tl.minimum(sw - lo, BLOCK_C)
        sig = xfl + slot * (NC_CAP * M_CAP) + xflag_slot
        tl.debug_barrier()  # the block put reads acc, which every thread of the program wrote
        if FENCE:
            pe = tl.load(table_ptr + _ROW_PE * MAXP + r)
            putmem_signal_block(dst.to(tl.int64), src.to(tl.int64), (nval * 4).to(tl.int64), sig.to(tl.int64),
                                seq.to(tl.uint64), _SIGNAL_SET, pe.to(tl.int32))
        else:
            # Interpreter: what the put does to a PE whose memory this process can reach (same offsets from
            # that PE's region bases), so CPU simulations check the addresses the GPU put is given.
            xp = tl.load(table_ptr + _ROW_X * MAXP + r)
            xf = tl.load(table_ptr + _ROW_X_FLAG * MAXP + r)
            i = tl.arange(0, BLOCK_C)
            pdst = (dst.to(tl.int64) - xloc.to(tl.int64) + xp).to(tl.pointer_type(tl.float32))
            tl.store(pdst + i, tl.load(src + i, mask=i < nval), mask=i < nval)
            tl.debug_barrier()
            psig = (sig.to(tl.int64) - xfl.to(tl.int64) + xf).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(psig, seq.to(tl.int64), sem="release", scope="sys")
    else:
        xp = tl.load(table_ptr + _ROW_X * MAXP + r).to(tl.pointer_type(tl.float32))
        tl.store(xp + slot.to(tl.int64) * MN_CAP + row0 + cols, s, mask=cm)
        tl.debug_barrier()
        xf = tl.load(table_ptr + _ROW_X_FLAG * MAXP + r).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(xf + slot * (NC_CAP * M_CAP) + xflag_slot, seq.to(tl.int64), sem="release", scope="sys")


@triton.jit
def _finish(fid, seq, parity, out_ptr, res_out_ptr, res_ptr, nw_ptr, table_ptr, err_ptr,
            M, N, LOCAL_RANK, shard_n, MN_CAP, M_CAP, NC_CAP, NC, eps, budget,
            MAXP: tl.constexpr, LOCAL: tl.constexpr, LOCAL_P2: tl.constexpr, ROUNDS: tl.constexpr,
            ONE_SHOT: tl.constexpr, PART: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
            TILE_M: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr, LS_P2: tl.constexpr,
            BLOCK_C: tl.constexpr, NC_P2: tl.constexpr, W_BEGIN: tl.constexpr, W_END: tl.constexpr,
            FENCE: tl.constexpr, PUT: tl.constexpr = False):
    """Finish program (row m, column chunk c of this rank's shard): wait, reduce, rounds, residual, norm."""
    # Waits: 0 tile partials, 1..ROUNDS inter-node rounds, ROUNDS+1 all-gather / row norm (if any).
    # A launch runs segments [W_BEGIN, W_END); the CPU simulation runs one segment for every rank at a time.
    m = fid // NC
    c = fid % NC
    if ONE_SHOT:
        s0 = LOCAL_RANK * 0
        sw = N
    else:
        s0 = LOCAL_RANK * shard_n
        sw = shard_n
    lo = c * BLOCK_C
    cols = s0 + lo + tl.arange(0, BLOCK_C)
    cm = (lo + tl.arange(0, BLOCK_C)) < sw
    row0 = m.to(tl.int64) * N
    acc = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_ACC).to(tl.pointer_type(tl.float32))
    xloc = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_X).to(tl.pointer_type(tl.float32))
    xflag_slot = c * M_CAP + m
    # One-shot row norm in a launch that runs every segment: the chunk stays in registers across the wait
    # instead of a store and reload (the CPU simulation runs segments apart and reloads it).
    KEEP: tl.constexpr = ONE_SHOT and HAS_NORM and W_BEGIN <= 0 and W_END > ROUNDS + 1
    hk = tl.zeros([BLOCK_C], dtype=tl.float32)

    if W_BEGIN <= 0 and W_END > 0:
        rs = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_RS).to(tl.pointer_type(PART))
        MN = M.to(tl.int64) * N
        j = tl.arange(0, LS_P2)  # (source rank, K-split) pairs
        src = j // SPLIT
        ks = j % SPLIT
        p = (rs + ((parity * LOCAL + src) * MN_CAP).to(tl.int64)[:, None] + (ks.to(tl.int64) * MN)[:, None]
             + row0 + cols[None, :])
        v = _ll_take2(p, (j[:, None] < LOCAL * SPLIT) & cm[None, :], seq, budget, err_ptr, 0, PART, FENCE)
        # Same numbers, same reduction tree on every rank: bitwise-equal results.
        s = tl.sum(v, axis=0)
        if ROUNDS > 0:
            tl.store(acc + row0 + cols, s, mask=cm)
            _send_round(0, s, seq, parity, acc, row0, cols, cm, lo, sw, s0, xflag_slot, table_ptr, MN_CAP, M_CAP,
                        NC_CAP, MAXP, ROUNDS, BLOCK_C, PUT, FENCE)
        else:
            hk = _finish_chunk(s, seq, parity, m, c, cols, cm, N, out_ptr, res_out_ptr, res_ptr, table_ptr,
                               LOCAL_RANK, MN_CAP, M_CAP, NC_CAP, MAXP, LOCAL, ONE_SHOT, HAS_RES, HAS_NORM)

    for k in tl.static_range(1, ROUNDS + 1):
        if W_BEGIN <= k and W_END > k:
            xfl = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_X_FLAG).to(tl.pointer_type(tl.int64))
            one = tl.arange(0, 2)
            _wait_flags(xfl + (parity * ROUNDS + (k - 1)) * (NC_CAP * M_CAP) + xflag_slot + one * 0, one < 1,
                        seq, budget, err_ptr, k, FENCE)
            s = tl.load(acc + row0 + cols, mask=cm, other=0.0)
            s += tl.load(xloc + (parity * ROUNDS + (k - 1)).to(tl.int64) * MN_CAP + row0 + cols,
                         mask=cm, other=0.0, cache_modifier=".cg")
            if k < ROUNDS:
                tl.store(acc + row0 + cols, s, mask=cm)
                _send_round(k, s, seq, parity, acc, row0, cols, cm, lo, sw, s0, xflag_slot, table_ptr, MN_CAP,
                            M_CAP, NC_CAP, MAXP, ROUNDS, BLOCK_C, PUT, FENCE)
            else:
                hk = _finish_chunk(s, seq, parity, m, c, cols, cm, N, out_ptr, res_out_ptr, res_ptr, table_ptr,
                                   LOCAL_RANK, MN_CAP, M_CAP, NC_CAP, MAXP, LOCAL, ONE_SHOT, HAS_RES, HAS_NORM)

    if (not ONE_SHOT) or HAS_NORM:
        if W_BEGIN <= ROUNDS + 1 and W_END > ROUNDS + 1:
            if ONE_SHOT:  # row norm: the tagged sum-of-squares words of every chunk of this row
                wn = tl.load(nw_ptr + cols, mask=cm, other=0.0).to(tl.float32)  # in flight during the wait
                sqw = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_SQW).to(tl.pointer_type(tl.int64))
                cc1 = tl.arange(0, NC_P2)
                wm = cc1 < NC
                tag = seq.to(tl.int64) << 32
                wv = tl.load(sqw + cc1 * M_CAP + m, mask=wm, other=tag, volatile=True)
                spins = 0
                t0 = _clock(seq, FENCE)
                while ((tl.min(((wv >> 32) == seq).to(tl.int32), axis=0) == 0)
                       & (_spent(t0, spins, seq, FENCE) < budget)):
                    wv = tl.load(sqw + cc1 * M_CAP + m, mask=wm, other=tag, volatile=True)
                    spins += 1
                if tl.min(((wv >> 32) == seq).to(tl.int32), axis=0) == 0:
                    _timed_out(err_ptr, ROUNDS + 1, seq)
                total = tl.sum(tl.where(wm, (wv & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), 0.0))
                rstd = 1.0 / tl.sqrt(total / N + eps)
            else:
                flg = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_AG_FLAG).to(tl.pointer_type(tl.int32))
                sqp = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_SQ).to(tl.pointer_type(tl.float32))
                src = tl.arange(0, LOCAL_P2)[:, None]
                cc = tl.arange(0, NC_P2)[None, :]
                slots = (parity * (LOCAL * NC_CAP) + src * NC_CAP + cc) * M_CAP + m
                if HAS_NORM:
                    smask = (src < LOCAL) & (cc < NC)  # every chunk of every owner
                else:
                    smask = (src < LOCAL) & (cc == c)  # chunk c of every owner
                _wait_flags(flg + slots, smask, seq, budget, err_ptr, ROUNDS + 1, FENCE)
                if HAS_NORM:
                    total = tl.sum(tl.load(sqp + slots, mask=smask, other=0.0, cache_modifier=".cg"))
                    rstd = 1.0 / tl.sqrt(total / N + eps)
            if ONE_SHOT:
                if KEEP:
                    h = hk
                else:
                    h = tl.load(res_out_ptr + row0 + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(out_ptr + row0 + cols, (h * rstd * wn).to(out_ptr.dtype.element_ty), mask=cm)
            else:
                ag = tl.load(table_ptr + _ROW_LOCAL * MAXP + _L_AG).to(tl.pointer_type(out_ptr.dtype.element_ty))
                for d in tl.static_range(LOCAL):
                    dcols = d * shard_n + lo + tl.arange(0, BLOCK_C)
                    h = tl.load(ag + parity.to(tl.int64) * MN_CAP + row0 + dcols, mask=cm, other=0.0,
                                cache_modifier=".cg")
                    if HAS_NORM:
                        wn = tl.load(nw_ptr + dcols, mask=cm, other=0.0).to(tl.float32)
                        tl.store(out_ptr + row0 + dcols, (h.to(tl.float32) * rstd * wn).to(out_ptr.dtype.element_ty),
                                 mask=cm)
                        tl.store(res_out_ptr + row0 + dcols, h, mask=cm)
                    else:
                        tl.store(out_ptr + row0 + dcols, h, mask=cm)


@triton.jit
def _prefetch_w(pid, w_ptr, M, N, K, K_PER_SPLIT, stride_wn, BM: tl.constexpr, BN: tl.constexpr,
                PF_LINES: tl.constexpr):
    """L2 prefetch of the first PF_LINES 128-byte lines of each weight row of GEMM program `pid`'s tile."""
    MB = tl.cdiv(M, BM)
    tiles = MB * tl.cdiv(N, BN)
    ks = pid // tiles
    nt = (pid % tiles) // MB
    rows = tl.minimum(nt * BN + tl.arange(0, BN), N - 1).to(tl.int64)
    prefetch_weight_lines(w_ptr, rows, ks * K_PER_SPLIT, K, stride_wn, PF_LINES)


# M = 1 must not become a constant (M is converted with .to()); LOCAL_RANK likewise
@triton.jit(do_not_specialize=["M", "LOCAL_RANK"])
def _linear_allreduce_kernel(
    x_ptr, w_ptr, out_ptr, res_out_ptr, res_ptr, nw_ptr, table_ptr, seq_ptr, err_ptr,
    M, N, K, K_PER_SPLIT, stride_xm, stride_wn, LOCAL_RANK, shard_n, MN_CAP, M_CAP, NC_CAP, NC, eps,
    budget, n_gemm, n_fin,
    MAXP: tl.constexpr, LOCAL: tl.constexpr, LOCAL_P2: tl.constexpr, ROUNDS: tl.constexpr,
    ONE_SHOT: tl.constexpr, PART: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, LS_P2: tl.constexpr,
    USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    IEEE: tl.constexpr, HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_C: tl.constexpr,
    NC_P2: tl.constexpr, DO_GEMM: tl.constexpr, DO_FINISH: tl.constexpr, W_BEGIN: tl.constexpr,
    W_END: tl.constexpr, FENCE: tl.constexpr, BUMP: tl.constexpr, PDL: tl.constexpr = False,
    PF_LINES: tl.constexpr = 0, PUT: tl.constexpr = False,
):
    # GEMM programs never wait, and they come first in the grid, so the (spinning) finish programs are
    # dispatched after every GEMM program already holds an SM: no deadlock with in-order block dispatch.
    pid = tl.program_id(0)
    if PF_LINES > 0 and DO_GEMM:
        if pid < n_gemm:  # the weights do not depend on the previous kernel: pull the first lines into L2
            _prefetch_w(pid, w_ptr, M, N, K, K_PER_SPLIT, stride_wn, BM, BN, PF_LINES)
    # PDL: everything below, the step number included, waits for the previous kernel (a previous call of this
    # kernel bumps the step at its very end); a sender is then still at most one call ahead of its peers.
    pdl_wait(PDL, False)
    seq = tl.load(seq_ptr)
    parity = seq & 1
    if DO_GEMM and pid < n_gemm:
        _gemm_push(pid, seq, parity, x_ptr, w_ptr, table_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn,
                   LOCAL_RANK, shard_n, MN_CAP, MAXP, LOCAL, ONE_SHOT, PART, BM, BN, BK, SPLIT, USE_DOT,
                   EVEN_K, IEEE)
        pdl_launch_dependents(PDL)  # after this program's weight stream
    if DO_FINISH:
        fid = pid - n_gemm if DO_GEMM else pid
        if fid >= 0:
            pdl_launch_dependents(PDL)
            _finish(fid, seq, parity, out_ptr, res_out_ptr, res_ptr, nw_ptr, table_ptr, err_ptr,
                    M, N, LOCAL_RANK, shard_n, MN_CAP, M_CAP, NC_CAP, NC, eps, budget,
                    MAXP, LOCAL, LOCAL_P2, ROUNDS, ONE_SHOT, PART, HAS_RES, HAS_NORM, BM, BN, SPLIT, LS_P2,
                    BLOCK_C, NC_P2, W_BEGIN, W_END, FENCE, PUT)
    if BUMP and DO_FINISH:
        # The last finish program to arrive advances the step for the next call. Only finish programs count:
        # each ends after consuming partials that GEMM programs stored at seq's parity, and together they
        # consume every GEMM program's tile, so all programs have read seq by then (and GEMM programs skip
        # the contended atomic).
        fid2 = pid - n_gemm if DO_GEMM else pid
        if fid2 >= 0:
            tl.debug_barrier()
            arrived = tl.atomic_add(seq_ptr + 1, 1, sem="acq_rel", scope="gpu")
            if arrived == n_fin - 1:
                tl.store(seq_ptr + 1, 0)
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
        # Room for split-K's unsummed partials (S * M * N per source) even when max_m is small: a workspace
        # sized for batch 1 alone once forced SPLIT_K = 1 on the tuned split-4 configs (8B TP=2 decode at
        # max_batch_size=1: fused 1.06x NCCL against 1.18x at max_batch_size=8, 2xH200 08:43).
        return max(self.max_m, _MIN_SPLIT_ROOM) * self.max_n

    @property
    def nc_cap(self) -> int:  # column chunks per (parity, src, row)
        return triton.cdiv(self.max_n, _MIN_BLOCK_C)

    def offsets(self) -> dict[str, int]:
        L, R, mn = self.local, max(self.rounds, 1), self.mn_cap
        sizes = {
            "rs": 2 * L * mn * 4,
            "ag": 2 * mn * 4,
            "x": 2 * R * mn * 4,
            "acc": mn * 4,
            "sqw": self.nc_cap * self.max_m * 8,
            "sq": 2 * L * self.nc_cap * self.max_m * 4,
            "ag_flag": 2 * L * self.nc_cap * self.max_m * 4,
            "x_flag": 2 * R * self.nc_cap * self.max_m * 8,  # int64: NVSHMEM signal words
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
                 buffer: torch.Tensor, base_ptrs: list[int], max_spins: int | None = None,
                 transport: str = "ptr") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
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
        # "put": the inter-node rounds use NVSHMEM put-with-signal (GPU; emulated in the interpreter)
        self.transport = transport
        node_peers = [self.node * gpus_per_node + d for d in range(gpus_per_node)]
        if len(base_ptrs) == world_size and not all(base_ptrs[p] for p in node_peers):
            raise ValueError("every GPU of this rank's node needs a load/store address (base_ptrs[p] != 0)")
        if transport == "ptr" and len(base_ptrs) == world_size and not all(base_ptrs[p] for p in self.partners()):
            raise ValueError("transport='ptr' needs a load/store address for every rail partner; use 'put'")
        self.layout = _Layout(max_m, max_n, gpus_per_node, self.rounds)
        off = self.layout.offsets()
        if buffer.numel() * buffer.element_size() < off["total"]:
            raise ValueError(f"buffer holds {buffer.numel()} bytes, layout needs {off['total']}")
        self.buffer, self.base_ptrs, self.device = buffer, list(base_ptrs), buffer.device
        if max_spins is None:
            max_spins = 2000
        self.max_spins = int(max_spins)
        # what a wait may take before it gives up: nanoseconds on the GPU, spins in the interpreter
        self.wait_budget = wait_budget(uses_gpu_clock(buffer.device), self.max_spins)
        self.maxp = max(8, gpus_per_node, self.rounds)
        self.table = self._build_table().to(self.device)
        # [0]: step of the next call (starts at 1: flags start at 0); [1]: programs of this call arrived.
        self.seq = torch.tensor([1, 0], dtype=torch.int32, device=self.device)
        # [0]: 1 after a timeout, [1]: stage, [2]: step.
        self.err = torch.zeros(4, dtype=torch.int32, device=self.device)

    def partners(self) -> list[int]:
        """Rail partner of each inter-node round: the same local rank on node `node ^ 2**k`."""
        return [(self.node ^ (1 << k)) * self.local_size + self.local_rank for k in range(self.rounds)]

    def _build_table(self) -> torch.Tensor:
        off, L = self.layout.offsets(), self.local_size
        t = torch.zeros(_N_ROWS, self.maxp, dtype=torch.int64)
        for d in range(L):
            base = self.base_ptrs[self.node * L + d]
            for row, key in ((_ROW_RS, "rs"), (_ROW_SQW, "sqw"), (_ROW_AG, "ag"), (_ROW_SQ, "sq"),
                             (_ROW_AG_FLAG, "ag_flag")):
                t[row.value, d] = base + off[key]
        for k, partner in enumerate(self.partners()):
            base = self.base_ptrs[partner]  # 0: another host, reached by NVSHMEM puts only
            t[_ROW_X.value, k] = base + off["x"] if base else 0
            t[_ROW_X_FLAG.value, k] = base + off["x_flag"] if base else 0
            t[_ROW_PE.value, k] = partner
        me = self.base_ptrs[self.rank]
        for col, key in ((_L_RS, "rs"), (_L_SQW, "sqw"), (_L_AG, "ag"), (_L_SQ, "sq"),
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
    def from_nvshmem(cls, max_m: int, max_n: int, *, topology=None,
                     transport: str = "auto") -> "FusedAllReduceWorkspace":
        """Collective: an NVSHMEM `fusedlis.comm.SymmetricWorkspace` sized for this layout (topology: default
        `Topology(world size)`), carved by `from_symmetric`. What runs across hosts (inter-node rounds as puts)."""
        import torch.distributed as dist

        from fusedlis.comm import SymmetricWorkspace, Topology

        topo = topology or Topology(dist.get_world_size())
        lay = _Layout(max_m, max_n, topo.gpus_per_node, int(math.log2(topo.num_nodes)))
        sw = SymmetricWorkspace(lay.offsets()["total"] + 4096, 64, topology=topo, provider="nvshmem")
        return cls.from_symmetric(sw, max_m, max_n, transport=transport)

    @classmethod
    def from_symmetric(cls, sw, max_m: int, max_n: int, transport: str = "auto") -> "FusedAllReduceWorkspace":
        """Carve the buffers out of a `fusedlis.comm.SymmetricWorkspace` (collective on GPUs).

        The GPUs of a node must reach each other by load/store (NVLink). `transport` is how the inter-node
        rounds reach the rail partner: "ptr" (peer stores: logical nodes of one host, or one NVLink domain),
        "put" (NVSHMEM put-with-signal: needs an NVSHMEM workspace; what a cluster of several hosts uses), or
        "auto" ("ptr" where every rail partner is reachable, else "put").
        """
        if transport not in TRANSPORTS + ("auto",):
            raise ValueError(f"transport must be 'auto', 'ptr' or 'put', got {transport!r}")
        g = sw.topology.gpus_per_node
        node = sw.rank // g
        if not all(sw.reachable[node * g + d] for d in range(g)):
            raise NotImplementedError(f"fused linear_allreduce needs load/store access to the {g} GPUs of a node "
                                      "(NVLink); this node's GPUs do not all reach each other")
        nodes = sw.world_size // g
        partners = [(node ^ (1 << k)) * g + sw.rank % g for k in range(int(math.log2(max(nodes, 1))))]
        if transport == "auto":
            transport = "ptr" if all(sw.reachable[p] for p in partners) else "put"
        if transport == "put" and not getattr(sw, "uses_nvshmem", False):
            raise ValueError(f"transport='put' needs an NVSHMEM workspace (provider {sw.provider!r})")
        lay = _Layout(max_m, max_n, g, int(math.log2(max(sw.world_size // g, 1))))
        total = lay.offsets()["total"]
        off = sw.alloc_bytes(total)
        region = sw.buffer[off:off + total]
        region.zero_()
        bases = [int(p) + off if int(p) else 0 for p in sw.peer_ptrs.tolist()]
        ws = cls(rank=sw.rank, world_size=sw.world_size, gpus_per_node=g, max_m=max_m, max_n=max_n,
                 buffer=region, base_ptrs=bases, transport=transport)
        if region.is_cuda:
            import torch.distributed as dist

            torch.cuda.synchronize(region.device)
            dist.barrier(group=sw.group)  # every peer zeroed its flags before anyone pushes
        ws.symmetric = sw
        return ws

    @classmethod
    def simulate(cls, world_size: int, gpus_per_node: int, max_m: int, max_n: int,
                 max_spins: int = 2000, transport: str = "ptr") -> list["FusedAllReduceWorkspace"]:
        """One workspace per rank over CPU buffers of one process (for `simulate_linear_allreduce`).

        `transport="put"` runs the inter-node rounds' put-with-signal branch, emulated by the interpreter."""
        nodes = world_size // max(gpus_per_node, 1)
        lay = _Layout(max_m, max_n, gpus_per_node, int(math.log2(max(nodes, 1))))
        bufs = [torch.zeros(lay.offsets()["total"], dtype=torch.uint8) for _ in range(world_size)]
        ptrs = [b.data_ptr() for b in bufs]
        return [cls(rank=r, world_size=world_size, gpus_per_node=gpus_per_node, max_m=max_m, max_n=max_n,
                    buffer=bufs[r], base_ptrs=ptrs, max_spins=max_spins, transport=transport)
                for r in range(world_size)]

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


_GEMM_KEYS = ("USE_DOT", "BM", "BN", "BK", "SPLIT_K", "num_warps", "num_stages")
_FROM_LINEAR = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK"}


def _from_linear(c: dict) -> dict:
    out = {_FROM_LINEAR.get(k, k): v for k, v in c.items() if k in _FROM_LINEAR or k in _GEMM_KEYS}
    out.setdefault("SPLIT_K", 1)
    out.setdefault("USE_DOT", out["BM"] >= 16)
    return out


def _gemm_default(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device | None) -> dict:
    # The GEMM half is the plain decode GEMM: start from `linear`'s config for this shape (the one measured
    # fastest on this GPU model where `linear_measured.json` has one and it is a Triton config, else its
    # heuristic), split-K included.
    from fusedlis.triton_kernels.linear import _num_sms, linear_default_config, linear_key, measured_config

    lc = measured_config(M, N, K, dtype, None, device) if device is not None else None
    if lc is None or lc.get("backend") == "torch":
        key = linear_key(M, N, K, dtype, None, False)
        key["sms"] = _num_sms(device)
        lc = linear_default_config(key)
    return _from_linear(lc)


_MEASURED: dict | None = None


def measured_fused_config(M: int, N: int, K: int, local: int, dtype: torch.dtype,
                          device: torch.device | None, norm: bool = False) -> dict | None:
    """Config `bench/fused.py --tune` measured fastest for (N, K, GPUs per node) at the smallest measured
    M >= `M` on this GPU model (`linear_allreduce_measured.json`); bf16 on CUDA only, else None.

    `norm`: the call ends with residual + RMSNorm; entries measured that way (key `norm=1`) are preferred,
    since the row norm's chunk programs wait for each other and favour other chunk widths."""
    global _MEASURED
    if device is None or device.type != "cuda" or dtype != torch.bfloat16:
        return None
    if _MEASURED is None:
        from fusedlis.triton_kernels._measured import read_measured

        _MEASURED = {}
        for dev, f, cfg in read_measured("linear_allreduce_measured.json"):
            f = {k: int(v) for k, v in f.items()}
            _MEASURED.setdefault((dev, f["N"], f["K"], f["local"], f.get("norm", 0)), []).append((f["M"], cfg))
        for v in _MEASURED.values():
            v.sort(key=lambda mc: mc[0])
    name = torch.cuda.get_device_name(device)
    for nm in ((1, 0) if norm else (0,)):
        for m, cfg in _MEASURED.get((name, N, K, local, nm), ()):
            if m >= M:
                return dict(cfg)
    return None


def unfused_measured_faster(M: int, N: int, K: int, local: int, dtype: torch.dtype,
                            device: torch.device | None, norm: bool = False) -> bool:
    """True where the measured table marks this shape `"prefer_unfused": true`: on this GPU model the plain GEMM
    followed by fusedlis' all-reduce (+ norm) measured faster than this kernel, so callers that can run that
    pair (the engine's `allreduce="fused"` mode) should. The kernel itself still runs if called."""
    cfg = measured_fused_config(M, N, K, local, dtype, device, norm)
    return bool(cfg and cfg.get("prefer_unfused", False))


def linear_allreduce_config(M: int, N: int, K: int, local: int, dtype: torch.dtype,
                            one_shot: bool | None = None, device: torch.device | None = None,
                            norm: bool = False) -> dict:
    """Default launch config (GEMM tile and split-K, one-shot vs two-shot) for one rank's GEMM shape.

    Order: the tuning cache (`fusedlis tune --op linear_allreduce`), the table `bench/fused.py --tune`
    measured on this GPU model, else the plain `linear` config of the same GEMM (its measured table on
    `device`, else its heuristic). Split-K partials are pushed unsummed. `norm`: the call adds the residual
    and applies RMSNorm (the table's `norm=1` picks first).
    """
    tuned = None
    try:
        from fusedlis import tuning

        tuned = tuning.lookup("linear_allreduce", {"M": M, "N": N, "K": K, "dtype": dtype, "local": local})
    except Exception:  # the tuning cache must never break a launch
        tuned = None
    return _resolve_config(M, N, K, local, dtype, one_shot, device,
                           tuned or measured_fused_config(M, N, K, local, dtype, device, norm))


def _resolve_config(M: int, N: int, K: int, local: int, dtype: torch.dtype, one_shot: bool | None,
                    device: torch.device | None, tuned: dict | None) -> dict:
    # `linear`'s GEMM config, overridden by the keys of `tuned` (a cache entry or a measured pick) it knows
    cfg = _gemm_default(M, N, K, dtype, device)
    if tuned:
        cfg.update({k: v for k, v in tuned.items() if k in _GEMM_KEYS})
    if dtype == torch.float32 and cfg["USE_DOT"]:
        cfg["BK"] = 32
    if one_shot is None:
        if tuned and "ONE_SHOT" in tuned:
            one_shot = bool(tuned["ONE_SHOT"])
        else:
            # With 2 GPUs per node both schemes move the same bytes over NVLink and one-shot saves a round
            # trip; two-shot pays off when the node is larger and M is large (see docs/fused.md).
            one_shot = local <= 2 or M <= 16
    if not one_shot and N % (local * cfg["BN"]) != 0:
        one_shot = True  # chunks must be whole tiles
    cfg["ONE_SHOT"] = bool(one_shot)
    cfg["BLOCK_C"] = _block_c(M, N, local, cfg)
    if tuned and "BLOCK_C" in tuned and tuned["BLOCK_C"] % cfg["BN"] == 0 and tuned["BLOCK_C"] >= _MIN_BLOCK_C:
        cfg["BLOCK_C"] = int(tuned["BLOCK_C"])
    return cfg


def linear_allreduce_default_config(key: dict) -> dict:
    """`linear_allreduce_config` for a tuner key {M, N, K, dtype, local} without the tuning cache."""
    M, N, K, local = int(key["M"]), int(key["N"]), int(key["K"]), int(key["local"])
    dt, dev = _key_dtype(key), _key_device()
    return _resolve_config(M, N, K, local, dt, None, dev,
                           measured_fused_config(M, N, K, local, dt, dev, bool(key.get("norm", 0))))


def linear_allreduce_configs(key: dict) -> list[dict]:
    """Search space of the tuner for `key`: every GEMM config `linear_configs` sweeps for the same shape
    (tiles x split-K), x one-/two-shot where the node has more than 2 GPUs, x a few finish chunk widths
    (half, double and a whole row's share around the default's; 256-1024 at M = 1). The default comes first.

    With `key["norm"]` (residual + RMSNorm fused) the GEMM part is taken as tuned (the default: the norm=0
    pick) and the space is the finish chunk width, every power of two from 128 to 4096 columns (a row norm's
    chunk programs wait for each other, so fewer, wider chunks can win), plus half and double the split-K."""
    from fusedlis.triton_kernels.linear import linear_configs, linear_key

    M, N, K, local = int(key["M"]), int(key["N"]), int(key["K"]), int(key["local"])
    dt = _key_dtype(key)
    default = linear_allreduce_default_config(key)
    out = [default]
    if key.get("norm"):
        share = N if default["ONE_SHOT"] else N // local
        bc = _MIN_BLOCK_C
        while bc <= min(4096, max(_pow2(share), _MIN_BLOCK_C)):
            cc = dict(default, BLOCK_C=bc)
            if bc % default["BN"] == 0 and cc not in out:
                out.append(cc)
            bc *= 2
        sk = int(default.get("SPLIT_K", 1))
        for s2 in (sk // 2, sk * 2):
            cc = dict(default, SPLIT_K=s2)
            if 1 <= s2 <= 8 and cc not in out:
                out.append(cc)
        return out
    lk = linear_key(M, N, K, dt, None, False)
    for lc in linear_configs(lk):
        c = _from_linear(lc)
        if dt == torch.float32 and c["USE_DOT"]:
            c["BK"] = 32
        shots = (default["ONE_SHOT"],) if local <= 2 else (True, False)
        for one in shots:
            if not one and N % (local * c["BN"]):
                continue
            cc = dict(c, ONE_SHOT=one)
            cc["BLOCK_C"] = _block_c(M, N, local, cc)
            if cc not in out:
                out.append(cc)
    # finish chunk widths around the default's (fewer, wider chunks per row cost fewer programs and, with the
    # norm, fewer sums of squares to exchange; narrower ones start reducing sooner)
    share = N if default["ONE_SHOT"] else N // local
    bc0 = default["BLOCK_C"]
    bcs = (256, 512, 1024) if M == 1 else (bc0 // 2, bc0 * 2, _pow2(share))
    for bc in bcs:
        cc = dict(default, BLOCK_C=int(bc))
        # at most 4096 columns a program, as `_block_c` (the (rank, split) x chunk words are polled in registers)
        if _MIN_BLOCK_C <= bc <= min(4096, max(_pow2(share), _MIN_BLOCK_C)) and bc % default["BN"] == 0 \
                and cc not in out:
            out.append(cc)
    return out


def _key_dtype(key: dict) -> torch.dtype:
    from fusedlis.tuning.bench import torch_dtype

    return torch_dtype(key["dtype"])


def _key_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _block_c(M: int, N: int, local: int, cfg: dict) -> int:
    # Column chunk of a finish program: about 256 finish programs in all (small M: many short chunks,
    # so the reduction starts as soon as the first tiles land), a multiple of BN, at most 4096.
    sw = N if cfg["ONE_SHOT"] else N // local
    bc = max(_MIN_BLOCK_C, cfg["BN"], _pow2(triton.cdiv(sw * M, 256)))
    return min(bc, max(4096, cfg["BN"]), max(_pow2(sw), _MIN_BLOCK_C))


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


def _launch(x, w, out, res_out, residual, norm_weight, ws, cfg, part_dtype, eps, *, gemm=True, finish=True,
            w_begin=0, w_end=1 << 20, bump=True):
    M, K = x.shape
    N = w.shape[0]
    L = ws.local_size
    sw = N if cfg["ONE_SHOT"] else N // L
    nc = triton.cdiv(sw, cfg["BLOCK_C"])
    split = int(cfg.get("SPLIT_K", 1))
    k_per_split = triton.cdiv(triton.cdiv(K, split), cfg["BK"]) * cfg["BK"]
    n_gemm = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]) * split
    n_fin = M * nc if finish else 0
    n_total = (n_gemm if gemm else 0) + n_fin
    if bump and not finish:
        raise ValueError("the step counter is advanced by finish programs: bump needs finish")
    # PDL (opt-in, no gain in the engine on 2xH200: config "PDL" or FUSEDLIS_FUSED_PDL): launched while the previous kernel drains, the
    # GEMM programs prefetch PF_LINES weight lines, then every program waits for it before anything else
    pdl = pdl_launch(x.device) if cfg.get("PDL", False) and uses_gpu_clock(x.device) else {"PDL": False}
    put = ws.transport == "put" and ws.rounds > 0 and finish
    launch = _linear_allreduce_kernel[(n_total,)]
    if put and uses_gpu_clock(x.device):
        from fusedlis.comm.device import launch_nvshmem_kernel

        launch = functools.partial(launch_nvshmem_kernel, _linear_allreduce_kernel, (n_total,))
    launch(
        x, w, out, res_out if res_out is not None else out, residual if residual is not None else out,
        norm_weight if norm_weight is not None else out, ws.table, ws.seq, ws.err,
        M, N, K, k_per_split, x.stride(0), w.stride(0), ws.local_rank, N // L, ws.layout.mn_cap,
        ws.layout.max_m, ws.layout.nc_cap, nc, float(eps), ws.wait_budget, n_gemm, n_fin,
        MAXP=ws.maxp, LOCAL=L, LOCAL_P2=_pow2(L), ROUNDS=ws.rounds, ONE_SHOT=cfg["ONE_SHOT"],
        PART=_TL[part_dtype], BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], SPLIT=split, LS_P2=_pow2(L * split),
        USE_DOT=cfg["USE_DOT"], EVEN_K=K % k_per_split == 0, IEEE=x.dtype == torch.float32,
        HAS_RES=residual is not None, HAS_NORM=norm_weight is not None, BLOCK_C=cfg["BLOCK_C"],
        NC_P2=_pow2(nc), DO_GEMM=gemm, DO_FINISH=finish, W_BEGIN=w_begin, W_END=w_end,
        FENCE=uses_gpu_clock(x.device), BUMP=bump,
        PF_LINES=int(cfg.get("PF_LINES", 0)) if pdl["PDL"] and gemm else 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], PUT=put, **pdl,
    )


def _pick_config(M, N, K, ws, dtype, one_shot, config, norm=False):
    cfg = linear_allreduce_config(M, N, K, ws.local_size, dtype, one_shot, device=ws.device, norm=norm)
    if not config and ws.device.type != "cuda" and dtype == torch.bfloat16 and M <= 4:
        # the interpreter cannot do a bf16 tl.dot (triton#11584): GEMV variant
        cfg.update(USE_DOT=False, BM=_pow2(M), BK=max(32, 256 // _pow2(M)))
    cfg.update(_fused_pdl_experiment())
    if config:
        cfg.update(config)
        if "BLOCK_C" not in config:
            cfg["BLOCK_C"] = _block_c(M, N, ws.local_size, cfg)
    cfg["SPLIT_K"] = _fit_split(M, N, K, cfg, ws.layout)
    if one_shot is False and cfg["ONE_SHOT"]:
        raise ValueError(f"two-shot needs N % (gpus_per_node * BN) == 0, got N={N}, BN={cfg['BN']}")
    if not cfg["ONE_SHOT"] and N % (ws.local_size * cfg["BN"]) != 0:
        raise ValueError(f"two-shot needs N % (gpus_per_node * BN) == 0, got N={N}, BN={cfg['BN']}")
    if cfg["BLOCK_C"] % cfg["BN"] or cfg["BLOCK_C"] < _MIN_BLOCK_C:
        raise ValueError(f"BLOCK_C={cfg['BLOCK_C']} must be a multiple of BN={cfg['BN']} and >= {_MIN_BLOCK_C}")
    return cfg


def _fused_pdl_experiment() -> dict:
    """FUSEDLIS_FUSED_PDL="1[,pf=<lines>]": programmatic dependent launch for every call, with `pf` weight
    lines prefetched into L2 per row before the wait (default 4); for decode A/B runs. Unset or "0": {}."""
    raw = os.environ.get("FUSEDLIS_FUSED_PDL", "").strip()
    if raw in ("", "0"):
        return {}
    parts = [p.strip() for p in raw.split(",")]
    out = {"PDL": True, "PF_LINES": 4}
    try:
        if parts[0] != "1":
            raise ValueError(parts[0])
        for part in parts[1:]:
            if not part.startswith("pf="):
                raise ValueError(part)
            out["PF_LINES"] = int(part[3:])
    except ValueError:
        raise ValueError(f"FUSEDLIS_FUSED_PDL={raw!r}: expected '1[,pf=<lines>]' or '0'") from None
    if out["PF_LINES"] < 0 or out["PF_LINES"] & (out["PF_LINES"] - 1):
        raise ValueError(f"FUSEDLIS_FUSED_PDL={raw!r}: pf must be 0 or a power of two")
    return out


def _fit_split(M: int, N: int, K: int, cfg: dict, layout: _Layout) -> int:
    """Largest split <= the config's whose unsummed partials fit the workspace (S*M*N values per source),
    with whole BK steps per split and no empty split."""
    split = max(1, int(cfg.get("SPLIT_K", 1)))
    while split > 1 and split * M * N > layout.mn_cap:
        split //= 2
    if split > 1:
        kps = triton.cdiv(triton.cdiv(K, split), cfg["BK"]) * cfg["BK"]
        split = triton.cdiv(K, kps)
    return split


def _part_dtype(M: int, cfg: dict, dtype: torch.dtype, partial_dtype: torch.dtype | None) -> torch.dtype:
    # fp32 partials where they are few (small M) or are split-K pieces (rounding each piece would add error).
    return partial_dtype or (torch.float32 if M <= 8 or cfg.get("SPLIT_K", 1) > 1 else dtype)


def _n_waits(ws: FusedAllReduceWorkspace, one_shot: bool, has_norm: bool) -> int:
    return ws.rounds + 1 + (1 if (not one_shot or has_norm) else 0)


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
    cfg = _pick_config(M, N, K, ws, x.dtype, one_shot, config, norm_weight is not None)
    part = _part_dtype(M, cfg, x.dtype, partial_dtype)
    if part not in _DTYPES:
        raise TypeError(f"partial_dtype {part} not supported")
    out, res_out = _alloc_out(x, N, norm_weight, out)
    _launch(x, w_shard, out, res_out, residual, norm_weight, ws, cfg, part, eps)
    if env_flag("FUSEDLIS_CHECK_COMM", False):
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
    cfg = _pick_config(M, N, K, ws0, xs[0].dtype, one_shot, config, norm_weight is not None)
    part = _part_dtype(M, cfg, xs[0].dtype, partial_dtype)
    outs = [_alloc_out(x, N, norm_weight, poison=True) for x in xs]
    for x, w, ws, (out, res_out) in zip(xs, ws_shards, workspaces, outs):
        _launch(x, w, out, res_out, residual, norm_weight, ws, cfg, part, eps, finish=False, bump=False)
    for seg in range(_n_waits(ws0, cfg["ONE_SHOT"], norm_weight is not None)):
        for x, w, ws, (out, res_out) in zip(xs, ws_shards, workspaces, outs):
            _launch(x, w, out, res_out, residual, norm_weight, ws, cfg, part, eps, gemm=False, w_begin=seg,
                    w_end=seg + 1, bump=False)
    for ws in workspaces:
        ws.seq[0] += 1
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
