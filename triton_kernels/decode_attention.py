"""Decode attention (one query token per sequence) over the paged-free KV cache, flash-decoding style.

Pass 1 (`_decode_attention_kernel`): one program per (sequence, kv head, KV split). It loads all the
q heads of its GQA group at once, so each K/V row is read from HBM exactly once, runs an online softmax
over its slice of positions and writes an fp32 partial output and its log-sum-exp.
Pass 2 (`_decode_attention_reduce_kernel`): one program per (sequence, q head) merges the splits.
With ``config["FUSED_REDUCE"]`` the last-arriving split program of each (sequence, kv head) merges
instead (per-tile arrival counter, as in `linear`'s split-K), saving the second launch; opt-in (slower in the
engine on 2xH200 when the merge walks the heads one by one; VEC_MERGE, merging them as one tile, is closer but
still not faster: docs/kernels.md).
Cache layout: `[max_batch, Hkv, max_seq_len, D]`; sequence b uses cache row b and positions
`[0, seq_lens[b])`. Splits are sized from max_seq_len (no host sync on seq_lens), so programs whose slice
lies past a sequence's length exit after writing an empty partial.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fusedlis.triton_kernels._pdl import pdl_launch, pdl_wait

from fusedlis import tuning

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _by_half(p, offs_d, mask, LO: tl.constexpr, HI: tl.constexpr, D: tl.constexpr):
    """fp32 p[d + LO] for d < D/2 and p[d + HI] above, as two affine masked loads (a modulo or a select in the
    address defeats 16-byte vector loads). (D/2, -D/2): x[(d + D/2) % D]; (0, -D/2): a [D/2] table row spread
    over [D], entry d % (D/2)."""
    lo = offs_d < D // 2
    a = tl.load(p + offs_d + LO, mask=mask & lo, other=0.0)
    b = tl.load(p + offs_d + HI, mask=mask & (offs_d >= D // 2), other=0.0)
    return tl.where(lo, a, b).to(tl.float32)


@triton.jit
def _rotate_half_full(x_ptr, offs_d, mask, cos, sin, D: tl.constexpr):
    """RoPE (HF rotate_half) of the rows at `x_ptr` over full-width offsets: x*cos + rotate_half(x)*sin, where
    rotate_half(x)[d] = -x[d + D/2] (d < D/2) or x[d - D/2]; cos / sin are already spread over [D]."""
    HALF: tl.constexpr = D // 2
    x = tl.load(x_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    xs = _by_half(x_ptr, offs_d, mask, HALF, -HALF, D)
    return x * cos + tl.where(offs_d < HALF, -xs, xs) * sin


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, stride_l, lens_off, o_ptr, lse_ptr, scale,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                             GROUP, SPLIT_LEN, NUM_SPLITS, out_ptr, cnt_ptr, stride_ob, stride_oh,
                             kn_ptr, vn_ptr, stride_nb, cos_ptr, sin_ptr, stride_cos,
                             D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, IEEE: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                             BLOCK_S: tl.constexpr, ROPE: tl.constexpr = False, PDL: tl.constexpr = False,
                             DIRECT: tl.constexpr = False, VEC_MERGE: tl.constexpr = False,
                             BLOCK_GM: tl.constexpr = 1):
    pdl_wait(PDL)
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = (tl.load(lens_ptr + b * stride_l) + lens_off).to(tl.int32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = hkv * GROUP + offs_g
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    kv_base = b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    if ROPE:
        # The step's new token sits at position seq_len - 1: rotate q here (every split needs it) and let the
        # split holding that position write the token's rotated k and raw v into the cache before reading it
        # (the rope kernel's work, without its launch).
        tok = seq_len - 1
        cos = _by_half(cos_ptr + tok.to(tl.int64) * stride_cos, offs_d, mask_d, 0, -(D // 2), D)
        sin = _by_half(sin_ptr + tok.to(tl.int64) * stride_cos, offs_d, mask_d, 0, -(D // 2), D)
        qm = mask_g[:, None] & mask_d[None, :]
        q = _rotate_half_full(q_rows, offs_d[None, :], qm, cos[None, :], sin[None, :], D)
        q = q.to(q_ptr.dtype.element_ty)
        if (tok >= start) & (tok < end):
            new = b.to(tl.int64) * stride_nb + hkv.to(tl.int64) * D
            k_rot = _rotate_half_full(kn_ptr + new, offs_d, mask_d, cos, sin, D)
            row = kv_base + tok.to(tl.int64) * stride_ks + offs_d
            tl.store(k_ptr + row, k_rot.to(k_ptr.dtype.element_ty), mask=mask_d)
            tl.store(v_ptr + row, tl.load(vn_ptr + new + offs_d, mask=mask_d).to(v_ptr.dtype.element_ty),
                     mask=mask_d)
        tl.debug_barrier()  # the row just written is read back below by other threads of this program
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    # exp2-based softmax: fold log2(e) into the scale.
    qk_scale = scale * 1.4426950408889634

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for s in range(start, end, BLOCK_N):
        pos = s + offs_n
        mask_n = pos < end
        kv_off = kv_base + pos[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    if DIRECT:
        # one split covers the whole cache: its normalised output is the answer (no partials, no second launch)
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    else:
        out_rows = (b.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(o_ptr + out_rows[:, None] * D + offs_d[None, :], o, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(lse_ptr + out_rows, lse, mask=mask_g)

        if FUSED_REDUCE:
            # Last-arriving split of this (sequence, kv head) merges all splits of its q heads: one launch.
            # Same protocol as linear's split-K fixup: barrier, release/acquire counter, .cg re-reads, reset.
            tl.debug_barrier()
            Hkv = tl.num_programs(1)
            arrived = tl.atomic_add(cnt_ptr + b * Hkv + hkv, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                if VEC_MERGE:  # all the group's heads in one [heads, splits, D] tile: one round of loads
                    _merge_group(o_ptr, lse_ptr, out_ptr, b, hkv, GROUP, Hkv * GROUP, NUM_SPLITS, stride_ob,
                                 stride_oh, D, BLOCK_GM, BLOCK_S, BLOCK_D)
                else:
                    for g in range(GROUP):
                        head = hkv * GROUP + g
                        _merge_splits(o_ptr, lse_ptr, out_ptr, b, head, Hkv * GROUP, NUM_SPLITS, stride_ob,
                                      stride_oh, D, BLOCK_S, BLOCK_D)
                tl.atomic_xchg(cnt_ptr + b * Hkv + hkv, 0)


@triton.jit
def _merge_splits(o_part_ptr, lse_ptr, out_ptr, b, h, H, NUM_SPLITS, stride_ob, stride_oh,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < D
    rows = (b.to(tl.int64) * H + h) * NUM_SPLITS + offs_s
    lse = tl.load(lse_ptr + rows, mask=mask_s, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, axis=0)
    wgt = tl.where(mask_s & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    o = tl.load(o_part_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                other=0.0, cache_modifier=".cg")
    den = tl.sum(wgt, axis=0)
    res = tl.sum(o * wgt[:, None], axis=0) / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             res.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _merge_group(o_part_ptr, lse_ptr, out_ptr, b, hkv, GROUP, H, NUM_SPLITS, stride_ob, stride_oh,
                 D: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_merge_splits` for the GROUP q heads of kv head `hkv` at once."""
    offs_g = tl.arange(0, BLOCK_GM)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    heads = hkv * GROUP + offs_g
    mask_gs = (offs_g < GROUP)[:, None] & (offs_s < NUM_SPLITS)[None, :]
    rows = (b.to(tl.int64) * H + heads)[:, None] * NUM_SPLITS + offs_s[None, :]
    lse = tl.load(lse_ptr + rows, mask=mask_gs, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # padded heads: no -inf - -inf
    wgt = tl.where(mask_gs & (lse > float("-inf")), tl.exp2(lse - m[:, None]), 0.0)
    o = tl.load(o_part_ptr + rows[:, :, None] * D + offs_d[None, None, :],
                mask=mask_gs[:, :, None] & (offs_d < D)[None, None, :], other=0.0, cache_modifier=".cg")
    den = tl.sum(wgt, axis=1)
    res = tl.sum(o * wgt[:, :, None], axis=1) / tl.where(den == 0.0, 1.0, den)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             res.to(out_ptr.dtype.element_ty), mask=(offs_g < GROUP)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _decode_attention_reduce_kernel(o_part_ptr, lse_ptr, out_ptr, NUM_SPLITS, stride_ob, stride_oh, H,
                                    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                                    PDL: tl.constexpr = False):
    pdl_wait(PDL)
    _merge_splits(o_part_ptr, lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), H, NUM_SPLITS,
                  stride_ob, stride_oh, D, BLOCK_S, BLOCK_D)


def decode_attention_key(B: int, Hq: int, Hkv: int, D: int, S: int, dtype: torch.dtype) -> dict:
    """Shape key passed to `fusedlis.tuning.lookup("decode_attention", key)`; S is max_seq_len."""
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "dtype": dtype}


def decode_attention_default_config(key: dict) -> dict:
    """Heuristic: about 4 programs per SM across (batch, kv head, split), splits of >= 2 blocks of 64.

    Few (sequence, kv head) pairs over a short cache (B * Hkv <= 8, S <= 2048): one block of 128 per
    split instead: fastest measured on H200 in all four such cases (11-16% less time in three, equal in one;
    bench/results/kernels_attention_NVIDIA-H200_2026-11-22.csv).
    """
    B, Hkv, S = int(key["B"]), int(key["Hkv"]), int(key["S"])
    sms = int(key.get("sms", 132))
    if int(key.get("D", 128)) <= 128 and B * Hkv <= 8 and S <= 2048:
        return {"NUM_SPLITS": max(1, triton.cdiv(S, 128)), "BLOCK_N": 128, "num_warps": 4, "num_stages": 2}
    block_n = 64 if int(key.get("D", 128)) <= 128 else 32
    max_splits = max(1, triton.cdiv(S, block_n * 2))
    splits = max(1, min(max_splits, triton.cdiv(4 * sms, B * Hkv), 128))
    return {"NUM_SPLITS": splits, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 2}


def decode_attention_configs(key: dict) -> list[dict]:
    """The search space the tuner sweeps for `key` (always contains the default).

    Configs with ``FUSED_REDUCE: True`` merge the splits inside the main kernel (one launch instead of
    two); correct in the interpreter and in bf16 on an H200, slower in the engine (docs/kernels.md), so no default uses
    them.
    """
    S = int(key["S"])
    base = decode_attention_default_config(key)
    out = [base]
    for bn in (32, 64, 128):
        for nw in (4, 8):
            for mult in (0.5, 1, 2):
                splits = max(1, min(int(base["NUM_SPLITS"] * mult), triton.cdiv(S, bn), 256))
                cfg = {"NUM_SPLITS": splits, "BLOCK_N": bn, "num_warps": nw, "num_stages": 2}
                if cfg not in out:
                    out.append(cfg)
    # One-launch variants (merge in the last-arriving split program), small split counts only: the merge
    # holds a [splits, D] fp32 tile per q head in registers.
    for cfg in list(out):
        if cfg["NUM_SPLITS"] <= 32:
            fused = dict(cfg, FUSED_REDUCE=True)
            if fused not in out:
                out.append(fused)
    return out


_VEC_MERGE_MAX = 8192  # fp32 elements of the one-launch merge tile (64 registers a thread at 4 warps)


def _max_splits_requested() -> int:
    """FUSEDLIS_ATTN_MAX_SPLITS=n: untuned calls split the cache at most n ways (1: one launch, no partials)."""
    v = os.environ.get("FUSEDLIS_ATTN_MAX_SPLITS", "").strip()
    return max(0, int(v)) if v.isdigit() else 0


def _one_launch_requested() -> str:
    """FUSEDLIS_ATTN_ONE_LAUNCH=1: untuned calls merge their splits in the main kernel (splits capped at 32), one
    head after another; "vec": all the group's heads at once where the tile is small. "" when off."""
    v = os.environ.get("FUSEDLIS_ATTN_ONE_LAUNCH", "0").strip().lower()
    return "vec" if v == "vec" else ("1" if v in ("1", "on", "true", "yes") else "")


_PARTIALS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _partials(device, n_rows: int, D: int):
    key = (device.type, device.index, D)
    o, lse = _PARTIALS.get(key, (None, None))
    if o is None or lse.numel() < n_rows:
        o = torch.empty((max(n_rows, 4096), D), dtype=torch.float32, device=device)
        lse = torch.empty(max(n_rows, 4096), dtype=torch.float32, device=device)
        _PARTIALS[key] = (o, lse)
    return o, lse


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(device, n: int) -> torch.Tensor:
    key = (device.type, device.index)
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < n:
        cnt = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)  # zero at rest (self-resetting)
        _COUNTERS[key] = cnt
    return cnt


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, *, config: dict | None = None, lens_offset: int = 0,
                     rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q[B, Hq, D] over cache positions `[0, seq_lens[b] + lens_offset)`; returns o[B, Hq, D].

    GQA: q head h reads kv head h // (Hq // Hkv). seq_lens is int32 or int64 [B], any stride (the decode step
    passes its positions column with lens_offset=1, so no length tensor is built per layer). Lengths must be
    >= 1 and <= max_seq_len (not checked on the device). The fp32 partials buffer is shared per device: no
    concurrent launches on two streams.

    `rope=(k_new, v_new, cos, sin)` also does `rope`'s work for one new token per sequence, at position
    length - 1: q is taken un-rotated and rotated in the kernel, and k_new [B, Hkv, D] (rotated) and v_new
    [B, Hkv, D] are written into the caches at that position before they are read (one launch fewer per layer).
    cos / sin are the [P, D/2] tables of `fusedlis.model.rope.rope_tables`. Rows of q, k_new, v_new may be
    strided views (e.g. of a merged qkv output) with unit stride along D.
    `out`: a [B, Hq, D] tensor of q's dtype and device with unit stride along D to write into (default: a new one).
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"decode_attention: {name} must be a tensor")
        if t.device != q.device:
            raise ValueError(f"decode_attention: {name} on {t.device}, q on {q.device}")
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: q must be [B,Hq,D], caches [Bmax,Hkv,S,D] of one shape; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    _, Hkv, S, Dc = k_cache.shape
    if Dc != D or k_cache.shape[0] < B or Hkv == 0 or Hq % Hkv or S == 0 or D == 0:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} incompatible with cache {tuple(k_cache.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention: q/k_cache/v_cache must share fp16/bf16/fp32, got "
                        f"{q.dtype}/{k_cache.dtype}/{v_cache.dtype}")
    if seq_lens.shape != (B,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: seq_lens must be [B] int32/int64, got {tuple(seq_lens.shape)} "
                         f"{seq_lens.dtype}")
    if q.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("decode_attention: q needs unit stride along D; caches must be contiguous")
    if rope is not None:
        k_new, v_new, cos, sin = _check_rope_args(rope, q, k_cache)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
          or out.device != q.device or out.stride(2) != 1):
        raise ValueError(f"decode_attention: out must be a [B, Hq, D] {q.dtype} tensor on {q.device} with unit "
                         f"stride along D")
    if B == 0:
        return out
    if config is None:
        key = decode_attention_key(B, Hq, Hkv, D, S, q.dtype)
        config = tuning.lookup("decode_attention", key)
        if config is None:
            key["sms"] = torch.cuda.get_device_properties(q.device).multi_processor_count \
                if q.device.type == "cuda" else 132
            config = decode_attention_default_config(key)
            one = _one_launch_requested()
            if one:
                config = dict(config, NUM_SPLITS=min(32, int(config["NUM_SPLITS"])), FUSED_REDUCE=True,
                              VEC_MERGE=one == "vec")
            cap = _max_splits_requested()
            if cap:
                config = dict(config, NUM_SPLITS=min(cap, int(config["NUM_SPLITS"])))
    block_n = int(config["BLOCK_N"])
    splits = max(1, min(int(config["NUM_SPLITS"]), triton.cdiv(S, block_n)))
    split_len = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, split_len)
    group = Hq // Hkv
    o_part, lse = _partials(q.device, B * Hq * splits, D)
    block_d = triton.next_power_of_2(D)
    fused = bool(config.get("FUSED_REDUCE", False)) and splits > 1
    cnt = _counters(q.device, B * Hkv) if fused else lse
    block_gm = triton.next_power_of_2(group)
    # the whole group's [heads, splits, D] fp32 tile stays in registers: only where it is small
    vec = fused and bool(config.get("VEC_MERGE", False)) and \
        block_gm * triton.next_power_of_2(splits) * block_d <= _VEC_MERGE_MAX
    if rope is None:
        k_new = v_new = cos = sin = q  # unused (ROPE off)
    _decode_attention_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, seq_lens, seq_lens.stride(0) if B > 1 else 0, int(lens_offset), o_part, lse, float(scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        group, split_len, splits, out, cnt, out.stride(0), out.stride(1),
        k_new, v_new, k_new.stride(0), cos, sin, cos.stride(0),
        D=D, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=max(16, block_d),
        IEEE=q.dtype == torch.float32, FUSED_REDUCE=fused, BLOCK_S=triton.next_power_of_2(splits),
        ROPE=rope is not None, DIRECT=splits == 1, VEC_MERGE=vec, BLOCK_GM=block_gm,
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2), **pdl_launch(q.device))
    if fused or splits == 1:
        return out
    _decode_attention_reduce_kernel[(B, Hq)](
        o_part, lse, out, splits, out.stride(0), out.stride(1), Hq,
        D=D, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4, **pdl_launch(q.device))
    return out


def _check_rope_args(rope, q: torch.Tensor, k_cache: torch.Tensor):
    if not isinstance(rope, (tuple, list)) or len(rope) != 4 or not all(isinstance(t, torch.Tensor) for t in rope):
        raise TypeError("decode_attention: rope must be a tuple (k_new, v_new, cos, sin) of tensors")
    k_new, v_new, cos, sin = rope
    B, _, D = q.shape
    Hkv = k_cache.shape[1]
    if D % 2:
        raise ValueError(f"decode_attention: rope needs an even head dim, got {D}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t.shape != (B, Hkv, D) or t.stride(2) != 1 or t.stride(1) != D:
            raise ValueError(f"decode_attention: rope {name} must be [{B}, {Hkv}, {D}] with contiguous heads, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"decode_attention: rope {name} must be {q.dtype} on {q.device}")
    if k_new.stride(0) != v_new.stride(0):
        raise ValueError("decode_attention: rope k_new and v_new must share their row stride")
    if cos.dim() != 2 or cos.shape[1] != D // 2 or sin.shape != cos.shape or not cos.is_contiguous() \
            or not sin.is_contiguous():
        raise ValueError(f"decode_attention: rope cos/sin must be contiguous [P, {D // 2}], got {tuple(cos.shape)}"
                         f"/{tuple(sin.shape)}")
    if cos.device != q.device or sin.device != q.device:
        raise ValueError("decode_attention: rope cos/sin must be on q's device")
    return k_new, v_new, cos, sin


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, lens_offset: int = 0) -> torch.Tensor:
    """Plain-torch reference of `decode_attention` (fp32 math, float64 for float64 inputs)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        L = int(seq_lens[b]) + lens_offset
        k = k_cache[b, :, :L].to(ct).repeat_interleave(Hq // Hkv, dim=0)  # [Hq, L, D]
        v = v_cache[b, :, :L].to(ct).repeat_interleave(Hq // Hkv, dim=0)
        s = torch.einsum("hd,hld->hl", q[b].to(ct), k) * scale
        out[b] = torch.einsum("hl,hld->hd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return out
