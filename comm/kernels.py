"""Triton all-reduce kernels on a `SymmetricWorkspace`: one-shot, two-shot and NVRAR (hierarchical).

Protocol (same for every kernel):
- Each launch reads its sequence number `seq = counters[ch] + 1` on the device; the last program to finish
  (atomic ticket) stores it back. So calls need no host synchronisation and replay inside CUDA graphs.
- Data goes to the receiver's symmetric buffer at parity `seq % 2` (double buffering); then the sender
  raises the receiver's flag to `seq` (release, system scope; one flag per (program, sender)). The receiver
  waits until its flag >= seq (acquire). A sender can be at most one call ahead of a receiver (every call
  needs every rank's data), so two parities suffice and a flag that already shows seq+1 is fine.
- Intra-node: peer stores through `nvshmem_ptr` / peer pointers. Inter-node (NVRAR rail steps): NVSHMEM
  `putmem_signal_block` (signal SET to seq) when USE_PUT, else peer stores (logical nodes on one host).
- Every wait is bounded by `budget`: nanoseconds of `%globaltimer` on the GPU (`GPU` constexpr; a peer that is
  still JIT-compiling a kernel can be seconds late, so a poll count is no measure there), polls in the interpreter
  (no inline asm); `wait_budget` computes it. A timeout writes (1<<62 | step<<32 | peer) into `err` with
  compare-and-swap (first one wins) and the program carries on, so the launcher can raise a Python error naming rank and step.
  Step numbers: 0 = one-shot exchange or reduce-scatter, 1.. = NVRAR rail steps, 99 = all-gather.
- Every floating-point sum happens in a rank-independent order (local-rank order, or a + b for a pair),
  in fp32, so all ranks return bitwise-identical results, as `simulate_all_reduce` does.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl
from triton.language import core

STEP_AG = 99
OP_SEND, OP_RECV_ADD, OP_EXCHANGE, OP_RECV_COPY = 1, 2, 3, 4  # = plan.INTER_OPS
NVSHMEM_SIGNAL_SET = 9  # NVSHMEM 3.4.5 (torch's docstring saying 0 is wrong)
TIMEOUT_ENV = "FUSEDLIS_COMM_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 20.0


def comm_timeout_s(timeout_s: float | None = None) -> float:
    """Seconds a device-side wait may take before it reports a timeout: `timeout_s`, else the environment
    variable FUSEDLIS_COMM_TIMEOUT_S, else 20."""
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout_s = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    timeout_s = float(timeout_s)
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"communication timeout must be a positive number of seconds, got {timeout_s}")
    return timeout_s


def uses_gpu_clock(device) -> bool:
    """True where the kernels are compiled for a GPU and bound their waits by `%globaltimer` (the `GPU`
    constexpr); False in the interpreter (TRITON_INTERPRET=1, CPU tensors), where they count polls."""
    return getattr(device, "type", device) == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def wait_budget(gpu: bool, max_spins: int, timeout_s: float | None = None) -> int:
    """The `budget` argument of every wait: the timeout (`comm_timeout_s`) in nanoseconds when `gpu`
    (`uses_gpu_clock`), else `max_spins` polls."""
    if gpu:
        return int(comm_timeout_s(timeout_s) * 1e9)
    if max_spins < 1:
        raise ValueError(f"max_spins must be >= 1, got {max_spins}")
    return int(max_spins)


@core.extern
def putmem_signal_block(dst, src, nbytes, sig_addr, sig_val, sig_op, pe, _semantic=None):
    """nvshmemx_putmem_signal_block(dst, src, nbytes, sig_addr, sig_val, sig_op, pe): int64 addresses (dst and
    sig_addr are *local* symmetric addresses), uint64 signal, int32 op (9 = SET, 10 = ADD in NVSHMEM 3.4.5), int32
    PE. Block-scoped: every thread of the program must reach it (Triton runs an extern call in every thread)."""
    return core.extern_elementwise(
        "", "", [dst, src, nbytes, sig_addr, sig_val, sig_op, pe],
        {(core.dtype("int64"), core.dtype("int64"), core.dtype("int64"), core.dtype("int64"),
          core.dtype("uint64"), core.dtype("int32"), core.dtype("int32")):
         ("nvshmemx_putmem_signal_block", core.dtype("int32"))},
        is_pure=False, _semantic=_semantic)


@triton.jit
def _ptr(table, idx, byte_off, dty: tl.constexpr):
    """Element pointer `table[idx] + byte_off` (peer base addresses are int64)."""
    return (tl.load(table + idx) + byte_off).to(tl.pointer_type(dty))


@triton.jit
def _signal(flag_table, peer, word, seq):
    fp = (tl.load(flag_table + peer)).to(tl.pointer_type(tl.int64))
    tl.atomic_xchg(fp + word, seq, sem="release", scope="sys")


@triton.jit
def _wait(flag_addr, seq, budget, err_ptr, step, peer, GPU: tl.constexpr):
    """Poll `flag_addr` (acquire, system scope) until it is >= seq, at most `budget` (see `_spent`)."""
    v = tl.atomic_add(flag_addr, 0, sem="acquire", scope="sys")
    t0 = _clock(seq, GPU)
    n = 0
    while (v < seq) & (_spent(t0, n, seq, GPU) < budget):
        v = tl.atomic_add(flag_addr, 0, sem="acquire", scope="sys")
        n += 1
    if v < seq:
        code = peer.to(tl.int64) | ((1 << 62) | (step << 32))
        tl.atomic_cas(err_ptr, code * 0, code)  # the first timeout wins


@triton.jit
def _signal_node(peer_flag_ptrs, node_base, lr, word0, seq, G: tl.constexpr):
    """Release word `word0 + lr` of every other GPU of this node (after the data they will read)."""
    for j in tl.static_range(G):
        if j != lr:
            _signal(peer_flag_ptrs, node_base + j, word0 + lr, seq)


@triton.jit
def _wait_node(flag_ptr, node_base, lr, word0, seq, budget, err_ptr, step, G: tl.constexpr, GPU: tl.constexpr):
    """Wait (bounded) until every other GPU of this node released word `word0 + its local rank` here."""
    for j in tl.static_range(G):
        if j != lr:
            _wait(flag_ptr + word0 + j, seq, budget, err_ptr, step, node_base + j, GPU)


@triton.jit
def _finish(ctr_ptr, seq):
    t = tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if t == tl.num_programs(0) - 1:
        tl.store(ctr_ptr + 1, 0)
        tl.store(ctr_ptr, seq)


@triton.jit
def _one_shot_kernel(
    x_ptr, out_ptr, N, buf_ptr, flag_ptr, peer_ptrs, peer_flag_ptrs, ctr_ptr, err_ptr,
    data_off, cap, flag_off, rank, node_base, per_block, budget,
    G: tl.constexpr, BLOCK: tl.constexpr, GPU: tl.constexpr, USE_PUT: tl.constexpr = False,
):
    """Every rank writes its slice into slot [parity][local rank] of every other node peer (peer stores, or
    NVSHMEM put-with-signal straight from x when USE_PUT), then sums the slots and its own x in local-rank order."""
    pid = tl.program_id(0)
    dty: tl.constexpr = x_ptr.dtype.element_ty
    seq = tl.load(ctr_ptr) + 1
    par = seq % 2
    lr = rank - node_base
    lo = pid * per_block
    hi = tl.minimum(lo + per_block, N)
    if USE_PUT:
        nbytes = (tl.maximum(hi - lo, 0) * (dty.primitive_bitwidth // 8)).to(tl.int64)
        dst_sym = (buf_ptr + data_off).to(tl.pointer_type(dty), bitcast=True) + (par * G + lr) * cap + lo
        for j in tl.static_range(G):
            if j != lr:
                putmem_signal_block(dst_sym.to(tl.int64), (x_ptr + lo).to(tl.int64), nbytes,
                                     (flag_ptr + flag_off + pid * G + lr).to(tl.int64), seq.to(tl.uint64), 9,
                                     (node_base + j).to(tl.int32))
    else:
        for off in range(lo, hi, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            m = idx < hi
            v = tl.load(x_ptr + idx, mask=m)
            for j in tl.static_range(G):
                if j != lr:
                    dst = _ptr(peer_ptrs, node_base + j, data_off, dty)
                    tl.store(dst + (par * G + lr) * cap + idx, v, mask=m)
        tl.debug_barrier()
        _signal_node(peer_flag_ptrs, node_base, lr, flag_off + pid * G, seq, G)
    _wait_node(flag_ptr, node_base, lr, flag_off + pid * G, seq, budget, err_ptr, 0, G, GPU)
    tl.debug_barrier()
    buf = (buf_ptr + data_off).to(tl.pointer_type(dty), bitcast=True)
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < hi
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(G):
            if j == lr:
                v = tl.load(x_ptr + idx, mask=m).to(tl.float32)
            else:
                v = tl.load(buf + (par * G + j) * cap + idx, mask=m, cache_modifier=".cg").to(tl.float32)
            acc += v
        tl.store(out_ptr + idx, acc.to(dty), mask=m)
    _finish(ctr_ptr, seq)


@triton.jit
def _hier_kernel(
    x_ptr, out_ptr, N, buf_ptr, flag_ptr, peer_ptrs, peer_flag_ptrs, ctr_ptr, err_ptr, steps_ptr,
    rs_off, work_off, recv_off, ag_off, cap, cs,
    rsf_off, inf_off, agf_off, rank, node_base, per_block, budget,
    G: tl.constexpr, NSTEPS: tl.constexpr, NSLOT: tl.constexpr, BLOCK: tl.constexpr, USE_PUT: tl.constexpr,
    GPU: tl.constexpr,
):
    """Two-shot (NSTEPS == 0) and NVRAR: reduce-scatter in the node, rail steps, all-gather in the node.

    Program p handles chunk-relative elements [p*per_block, (p+1)*per_block) of every chunk.
    Chunk j = [min(j*cs, N), min((j+1)*cs, N)) as in `plan.Chunking`. A rank keeps its own contribution
    local (reads x, writes out directly); only peers' data goes through the symmetric buffer.
    In place (out is x) is safe: a program reads every x element it will overwrite before writing it.
    """
    pid = tl.program_id(0)
    dty: tl.constexpr = x_ptr.dtype.element_ty
    seq = tl.load(ctr_ptr) + 1
    par = seq % 2
    lr = rank - node_base
    my_lo = tl.minimum(lr * cs, N)
    my_len = tl.minimum(my_lo + cs, N) - my_lo
    blo = pid * per_block
    bhi = tl.minimum(blo + per_block, my_len)
    local = buf_ptr.to(tl.pointer_type(dty), bitcast=True)
    work = local + work_off  # element offsets from here on
    # -- phase 1: reduce-scatter inside the node: send chunk j to local rank j
    if G > 1:
        for j in tl.static_range(G):
            if j != lr:
                c_lo = tl.minimum(j * cs, N)
                c_hi = tl.minimum(c_lo + cs, N)
                dst = _ptr(peer_ptrs, node_base + j, 0, dty) + rs_off + (par * G + lr) * cap
                for off in range(blo, tl.minimum(blo + per_block, c_hi - c_lo), BLOCK):
                    idx = off + tl.arange(0, BLOCK)
                    m = idx < c_hi - c_lo
                    tl.store(dst + idx, tl.load(x_ptr + c_lo + idx, mask=m), mask=m)
        tl.debug_barrier()
        _signal_node(peer_flag_ptrs, node_base, lr, rsf_off + pid * G, seq, G)
        _wait_node(flag_ptr, node_base, lr, rsf_off + pid * G, seq, budget, err_ptr, 0, G, GPU)
        tl.debug_barrier()
    # reduce my chunk (sum in local-rank order); two-shot sends the result straight to the all-gather
    for off in range(blo, bhi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < bhi
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(G):
            if j == lr:
                v = tl.load(x_ptr + my_lo + idx, mask=m).to(tl.float32)
            else:
                v = tl.load(local + rs_off + (par * G + j) * cap + idx, mask=m, cache_modifier=".cg").to(tl.float32)
            acc += v
        red = acc.to(dty)
        if NSTEPS == 0:
            for j in tl.static_range(G):
                if j == lr:
                    tl.store(out_ptr + my_lo + idx, red, mask=m)
                else:
                    dst = _ptr(peer_ptrs, node_base + j, 0, dty) + ag_off + (par * G + lr) * cap
                    tl.store(dst + idx, red, mask=m)
        else:
            tl.store(work + (par * (NSLOT + 1)) * cap + idx, red, mask=m)
    # -- phase 2: rail steps (recursive doubling with fold-in / fold-out), table from the plan;
    # with one GPU per node the last step writes the output directly
    for k in tl.static_range(NSTEPS):
        op = tl.load(steps_ptr + 3 * k)
        partner = tl.load(steps_ptr + 3 * k + 1)
        slot = tl.load(steps_ptr + 3 * k + 2)
        src = work + (par * (NSLOT + 1) + k) * cap
        if (G == 1) and (k == NSTEPS - 1):
            nxt = out_ptr + my_lo
        else:
            nxt = work + (par * (NSLOT + 1) + k + 1) * cap
        if (op == 1) | (op == 3):  # SEND or EXCHANGE
            if USE_PUT:
                tl.debug_barrier()
                nbytes = (tl.maximum(bhi - blo, 0) * (dty.primitive_bitwidth // 8)).to(tl.int64)
                dst_sym = local + recv_off + (par * NSLOT + slot) * cap + blo
                sig = flag_ptr + inf_off + pid * NSLOT + slot
                putmem_signal_block(dst_sym.to(tl.int64), (src + blo).to(tl.int64), nbytes,
                                     sig.to(tl.int64), seq.to(tl.uint64), 9, partner.to(tl.int32))
            else:
                rdst = _ptr(peer_ptrs, partner, 0, dty) + recv_off + (par * NSLOT + slot) * cap
                for off in range(blo, bhi, BLOCK):
                    idx = off + tl.arange(0, BLOCK)
                    m = idx < bhi
                    tl.store(rdst + idx, tl.load(src + idx, mask=m), mask=m)
                tl.debug_barrier()
                _signal(peer_flag_ptrs, partner, inf_off + pid * NSLOT + slot, seq)
        if op == 1:
            for off in range(blo, bhi, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                m = idx < bhi
                tl.store(nxt + idx, tl.load(src + idx, mask=m), mask=m)
        else:
            _wait(flag_ptr + inf_off + pid * NSLOT + slot, seq, budget, err_ptr, 1 + k, partner, GPU)
            tl.debug_barrier()
            rcv = local + recv_off + (par * NSLOT + slot) * cap
            for off in range(blo, bhi, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                m = idx < bhi
                r = tl.load(rcv + idx, mask=m, cache_modifier=".cg")
                if op == 4:
                    res = r
                else:
                    res = (tl.load(src + idx, mask=m).to(tl.float32) + r.to(tl.float32)).to(dty)
                tl.store(nxt + idx, res, mask=m)
    # -- phase 3: all-gather inside the node
    if G > 1:
        if NSTEPS > 0:
            fin = work + (par * (NSLOT + 1) + NSTEPS) * cap
            for off in range(blo, bhi, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                m = idx < bhi
                v = tl.load(fin + idx, mask=m)
                for j in tl.static_range(G):
                    if j == lr:
                        tl.store(out_ptr + my_lo + idx, v, mask=m)
                    else:
                        dst = _ptr(peer_ptrs, node_base + j, 0, dty) + ag_off + (par * G + lr) * cap
                        tl.store(dst + idx, v, mask=m)
        tl.debug_barrier()
        _signal_node(peer_flag_ptrs, node_base, lr, agf_off + pid * G, seq, G)
        _wait_node(flag_ptr, node_base, lr, agf_off + pid * G, seq, budget, err_ptr, 99, G, GPU)
        tl.debug_barrier()
        for j in tl.static_range(G):
            if j != lr:
                c_lo = tl.minimum(j * cs, N)
                c_hi = tl.minimum(c_lo + cs, N)
                srcj = local + ag_off + (par * G + j) * cap
                for off in range(blo, tl.minimum(blo + per_block, c_hi - c_lo), BLOCK):
                    idx = off + tl.arange(0, BLOCK)
                    m = idx < c_hi - c_lo
                    tl.store(out_ptr + c_lo + idx, tl.load(srcj + idx, mask=m, cache_modifier=".cg"), mask=m)
    _finish(ctr_ptr, seq)


# ------------------------------------------------------------------------------------------------------
# LL ("Lamport") protocol: flag-in-data, for small and medium messages inside a node.
#
# A receive slot holds encoded words; the all-zero word means "empty". The sender encodes a value by flipping its
# sign bit after turning -0.0 into +0.0, so no encoded word is ever zero, and stores it straight into the peer's
# slot: no separate flag, no system-scope fence, one one-way NVLink trip. The receiver polls its slot (volatile
# loads) until no word is zero, decodes, and zeroes the slot again. Slots start zeroed (`SymmetricWorkspace`
# zeroes its buffer) and alternate by call parity: a sender is at most one call ahead (every call needs every
# rank's data), and a receiver empties parity p's slots before it finishes the call, hence before any peer can
# reach the next call of parity p.
# -0.0 -> +0.0 changes no sum; every rank applies it to its own contribution too, so results stay bitwise equal.


@triton.jit
def _ll_encode(v, UT: tl.constexpr, SIGN: tl.constexpr):
    b = v.to(UT, bitcast=True)
    b = tl.where(b == SIGN, 0, b)
    return b ^ SIGN


# Wait bounds. `budget` comes from `wait_budget`: nanoseconds of %globaltimer on the GPU (a peer that is still
# JIT-compiling a kernel can be seconds late, so a poll count is no measure there), polls in the interpreter (no
# inline asm). Shared with the fused GEMM + all-reduce (triton_kernels/linear_allreduce.py). A scalar inline-asm
# call runs in every thread; each reads the timer itself, which is fine for a timeout.


@triton.jit
def _clock(seq, GPU: tl.constexpr):
    """Now, in ns of %globaltimer on the GPU; 0 in the interpreter. `seq` (any scalar or tensor int) only gives
    the inline asm the tensor operand it needs."""
    if GPU:
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [seq.to(tl.int32)], dtype=tl.int64,
                                         is_pure=False, pack=1)
    else:
        return (seq * 0).to(tl.int64)


@triton.jit
def _spent(t0, spins, seq, GPU: tl.constexpr):
    """What a wait that started at `t0` (`_clock`) and polled `spins` times has used of its budget:
    nanoseconds on the GPU, polls in the interpreter."""
    if GPU:
        return _clock(seq, GPU) - t0
    else:
        return (spins + seq * 0).to(tl.int64)


@triton.jit
def _ll_sanitize(v, UT: tl.constexpr, SIGN: tl.constexpr):
    b = v.to(UT, bitcast=True)
    return tl.where(b == SIGN, 0, b).to(v.dtype, bitcast=True)


@triton.jit
def _ll_take(p, m, seq, budget, err_ptr, step, peer, dty: tl.constexpr, SIGN: tl.constexpr, GPU: tl.constexpr):
    """Wait (at most `budget`, see `_spent`) until every masked word at `p` is non-zero, return the decoded
    values, zero the words."""
    e = tl.load(p, mask=m, other=1, volatile=True)
    t0 = _clock(seq, GPU)
    n = 0
    while (tl.min(e, axis=0) == 0) & (_spent(t0, n, seq, GPU) < budget):
        e = tl.load(p, mask=m, other=1, volatile=True)
        n += 1
    if tl.min(e, axis=0) == 0:
        code = tl.cast(peer, tl.int64) | ((1 << 62) | (step << 32))
        tl.atomic_cas(err_ptr, code * 0, code)
    tl.store(p, tl.zeros_like(e), mask=m)
    return (e ^ SIGN).to(dty, bitcast=True)


@triton.jit
def _ll_send(e, idx, m, peer_ptrs, node_base, data_off, slot_off, lr, G: tl.constexpr, UT: tl.constexpr):
    """Store the encoded tile `e` at `slot_off + idx` of every other node peer's LL buffer (`data_off` bytes)."""
    for j in tl.static_range(G):
        if j != lr:
            dst = _ptr(peer_ptrs, node_base + j, data_off, UT)
            tl.store(dst + slot_off + idx, e, mask=m)


@triton.jit
def _ll_sum(own, slots, cap, m, lr, node_base, seq, budget, err_ptr, G: tl.constexpr, BLOCK: tl.constexpr,
            dty: tl.constexpr, UT: tl.constexpr, SIGN: tl.constexpr, GPU: tl.constexpr):
    """fp32 sum of one tile over the node's G local ranks, in local-rank order (so every rank rounds alike):
    this rank's own values at `own`, local rank j's taken from its LL slot `slots + j * cap`."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(G):
        if j == lr:
            v = _ll_sanitize(tl.load(own, mask=m), UT, SIGN)
        else:
            v = _ll_take(slots + j * cap, m, seq, budget, err_ptr, 0, node_base + j, dty, SIGN, GPU)
        acc += v.to(tl.float32)
    return acc


# rank / node_base equal to 1 must not become constants (peer ids are converted with .to())
@triton.jit(do_not_specialize=["rank", "node_base"])
def _ll_one_shot_kernel(
    x_ptr, out_ptr, N, buf_ptr, peer_ptrs, ctr_ptr, err_ptr,
    data_off, cap, rank, node_base, per_block, budget,
    G: tl.constexpr, BLOCK: tl.constexpr, GPU: tl.constexpr,
):
    """One-shot in the LL protocol: store my encoded input into slot [parity][local rank] of every node peer,
    then take the peers' slots and sum in local-rank order. Slots are `cap` words; `data_off` is in bytes."""
    pid = tl.program_id(0)
    dty: tl.constexpr = x_ptr.dtype.element_ty
    BITS: tl.constexpr = dty.primitive_bitwidth
    UT: tl.constexpr = tl.uint16 if BITS == 16 else tl.uint32
    SIGN: tl.constexpr = (1 << 15) if BITS == 16 else (1 << 31)
    seq = tl.load(ctr_ptr) + 1
    par = seq % 2
    lr = rank - node_base
    lo = pid * per_block
    hi = tl.minimum(lo + per_block, N)
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < hi
        e = _ll_encode(tl.load(x_ptr + idx, mask=m), UT, SIGN)
        _ll_send(e, idx, m, peer_ptrs, node_base, data_off, (par * G + lr) * cap, lr, G, UT)
    mine = _ptr(peer_ptrs, rank, data_off, UT) + par * G * cap
    for off in range(lo, hi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < hi
        acc = _ll_sum(x_ptr + idx, mine + idx, cap, m, lr, node_base, seq, budget, err_ptr, G, BLOCK, dty, UT, SIGN,
                      GPU)
        tl.store(out_ptr + idx, acc.to(dty), mask=m)
    _finish(ctr_ptr, seq)


# rank / node_base equal to 1 must not become constants (peer ids are converted with .to())
@triton.jit(do_not_specialize=["rank", "node_base"])
def _ll_hier_kernel(
    x_ptr, out_ptr, N, buf_ptr, peer_ptrs, ctr_ptr, err_ptr, steps_ptr,
    rs_off, ag_off, rail_off, cap, cs, rank, node_base, per_block, budget,
    G: tl.constexpr, NSTEPS: tl.constexpr, NSLOT: tl.constexpr, BLOCK: tl.constexpr, GPU: tl.constexpr,
):
    """Two-shot (NSTEPS == 0) and NVRAR in the LL protocol, tile by tile: reduce-scatter inside the node (chunk j
    to local rank j), the rail steps of the plan on each reduced tile (recursive doubling with fold-in / fold-out
    between same-local-rank GPUs; every rail partner must be load/store reachable), all-gather inside the node.
    Chunk j = [min(j*cs, N), min((j+1)*cs, N)); program p handles chunk-relative [p*per_block, (p+1)*per_block).
    Offsets are in bytes. In place (out is x) is safe: a program reads every x element it overwrites first."""
    pid = tl.program_id(0)
    dty: tl.constexpr = x_ptr.dtype.element_ty
    BITS: tl.constexpr = dty.primitive_bitwidth
    UT: tl.constexpr = tl.uint16 if BITS == 16 else tl.uint32
    SIGN: tl.constexpr = (1 << 15) if BITS == 16 else (1 << 31)
    seq = tl.load(ctr_ptr) + 1
    par = seq % 2
    lr = rank - node_base
    my_lo = tl.minimum(lr * cs, N)
    my_len = tl.minimum(my_lo + cs, N) - my_lo
    blo = pid * per_block
    bhi = tl.minimum(blo + per_block, my_len)
    for j in tl.static_range(G):
        if j != lr:
            c_lo = tl.minimum(j * cs, N)
            c_hi = tl.minimum(c_lo + cs, N)
            dst = _ptr(peer_ptrs, node_base + j, rs_off, UT) + (par * G + lr) * cap
            for off in range(blo, tl.minimum(blo + per_block, c_hi - c_lo), BLOCK):
                idx = off + tl.arange(0, BLOCK)
                m = idx < c_hi - c_lo
                tl.store(dst + idx, _ll_encode(tl.load(x_ptr + c_lo + idx, mask=m), UT, SIGN), mask=m)
    rs = _ptr(peer_ptrs, rank, rs_off, UT)
    rail = _ptr(peer_ptrs, rank, rail_off, UT)
    for off in range(blo, bhi, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < bhi
        acc = _ll_sum(x_ptr + my_lo + idx, rs + par * G * cap + idx, cap, m, lr, node_base, seq, budget, err_ptr,
                      G, BLOCK, dty, UT, SIGN, GPU)
        red = _ll_sanitize(acc.to(dty), UT, SIGN)
        for k in tl.static_range(NSTEPS):
            op = tl.load(steps_ptr + 3 * k)
            partner = tl.load(steps_ptr + 3 * k + 1)
            slot = tl.load(steps_ptr + 3 * k + 2)
            if (op == 1) | (op == 3):  # SEND or EXCHANGE
                dst = _ptr(peer_ptrs, partner, rail_off, UT) + (par * NSLOT + slot) * cap
                tl.store(dst + idx, _ll_encode(red, UT, SIGN), mask=m)
            if op != 1:  # RECV_ADD, EXCHANGE, RECV_COPY
                r = _ll_take(rail + (par * NSLOT + slot) * cap + idx, m, seq, budget, err_ptr, 1 + k, partner,
                             dty, SIGN, GPU)
                if op == 4:
                    red = r
                else:
                    red = _ll_sanitize((red.to(tl.float32) + r.to(tl.float32)).to(dty), UT, SIGN)
        e = _ll_encode(red, UT, SIGN)
        for j in tl.static_range(G):
            if j == lr:
                tl.store(out_ptr + my_lo + idx, red, mask=m)
            else:
                dst = _ptr(peer_ptrs, node_base + j, ag_off, UT) + (par * G + lr) * cap
                tl.store(dst + idx, e, mask=m)
    ag = _ptr(peer_ptrs, rank, ag_off, UT)
    for j in tl.static_range(G):
        if j != lr:
            c_lo = tl.minimum(j * cs, N)
            c_hi = tl.minimum(c_lo + cs, N)
            for off in range(blo, tl.minimum(blo + per_block, c_hi - c_lo), BLOCK):
                idx = off + tl.arange(0, BLOCK)
                m = idx < c_hi - c_lo
                v = _ll_take(ag + (par * G + j) * cap + idx, m, seq, budget, err_ptr, 99, node_base + j, dty, SIGN,
                             GPU)
                tl.store(out_ptr + c_lo + idx, v, mask=m)
    _finish(ctr_ptr, seq)


@triton.jit(do_not_specialize=["rank", "node_base"])
def _ll_one_shot_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, M, H, eps, buf_ptr, peer_ptrs, ctr_ptr, err_ptr, part_ptr,
    data_off, cap, rank, node_base, rows_per_prog, T, budget,
    G: tl.constexpr, TILE: tl.constexpr, TP2: tl.constexpr, GPU: tl.constexpr,
):
    """One-shot all-reduce in the LL protocol fused with the residual add and RMSNorm that follow a row-parallel
    layer: h = allreduce(x) + residual, y = h * rsqrt(mean(h^2) + eps) * w, for rows of x [M, H].

    Each row is cut into T tiles of TILE columns; program p owns tile p % T of rows [(p // T) * rows_per_prog, ...)
    (rows_per_prog is 1 when T > 1). It stores its encoded tile into slot [parity][local rank] of every node peer,
    takes the peers' tiles, sums them in local-rank order (rounded to x's dtype, as the unfused all-reduce returns
    it) and adds the residual in fp32. With T > 1 the row's sum of squares is shared between its T programs
    through `part_ptr` (int64 words: call sequence number << 32 | fp32 partial; a word tagged with an older call
    reads as not yet written, so the buffer never needs clearing). Same slots and sequence channel as
    `_ll_one_shot_kernel`; `data_off` in bytes."""
    pid = tl.program_id(0)
    dty: tl.constexpr = x_ptr.dtype.element_ty
    BITS: tl.constexpr = dty.primitive_bitwidth
    UT: tl.constexpr = tl.uint16 if BITS == 16 else tl.uint32
    SIGN: tl.constexpr = (1 << 15) if BITS == 16 else (1 << 31)
    seq = tl.load(ctr_ptr) + 1
    par = seq % 2
    lr = rank - node_base
    tile = pid % T
    cols = tile * TILE + tl.arange(0, TILE)
    cm = cols < H
    r_lo = (pid // T) * rows_per_prog
    r_hi = tl.minimum(r_lo + rows_per_prog, M)
    for row in range(r_lo, r_hi):
        idx = row * H + cols  # M * H <= ll_max_elems: int32 is enough
        e = _ll_encode(tl.load(x_ptr + idx, mask=cm), UT, SIGN)
        _ll_send(e, idx, cm, peer_ptrs, node_base, data_off, (par * G + lr) * cap, lr, G, UT)
    mine = _ptr(peer_ptrs, rank, data_off, UT) + par * G * cap
    # issued before the peers' data is awaited, so their latency hides behind the polling
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    for row in range(r_lo, r_hi):
        idx = row * H + cols  # M * H <= ll_max_elems: int32 is enough
        r = tl.load(res_ptr + idx, mask=cm, other=0.0).to(tl.float32)
        acc = _ll_sum(x_ptr + idx, mine + idx, cap, cm, lr, node_base, seq, budget, err_ptr, G, TILE, dty, UT, SIGN,
                      GPU)
        h = acc.to(dty).to(tl.float32) + r
        h = tl.where(cm, h, 0.0)
        tl.store(h_ptr + idx, h.to(h_ptr.dtype.element_ty), mask=cm)
        ss = tl.sum(h * h, axis=0)
        if TP2 > 1:
            tag = seq.to(tl.int64) << 32
            tl.store(part_ptr + row * T + tile, tag | (ss.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF))
            offs = tl.arange(0, TP2)
            pm = offs < T
            wv = tl.load(part_ptr + row * T + offs, mask=pm, other=tag, volatile=True)
            t0 = _clock(seq, GPU)
            n = 0
            while (tl.min(((wv >> 32) == seq).to(tl.int32), axis=0) == 0) & (_spent(t0, n, seq, GPU) < budget):
                wv = tl.load(part_ptr + row * T + offs, mask=pm, other=tag, volatile=True)
                n += 1
            if tl.min(((wv >> 32) == seq).to(tl.int32), axis=0) == 0:
                # a sibling program of this row never published its partial: reported as step 1, this rank
                code = tl.cast(rank, tl.int64) | ((1 << 62) | (1 << 32))
                tl.atomic_cas(err_ptr, code * 0, code)
            ss = tl.sum(tl.where(pm, (wv & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), 0.0), axis=0)
        rstd = 1.0 / tl.sqrt(ss / H + eps)
        tl.store(y_ptr + idx, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=cm)
    _finish(ctr_ptr, seq)
