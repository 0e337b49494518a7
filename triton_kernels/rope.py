"""Rotary embedding (HF rotate_half convention) fused with the KV-cache write.

One program per token: rotates its q heads (returned), rotates its k heads and stores them with the
un-rotated v heads into the cache at `[b, :, positions[b, t], :]`. Frequency scaling (Llama 3) lives in
the cos/sin tables (`fusedlis.model.rope.rope_tables`), so the kernel is the same for every scaling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlis.triton_kernels._pdl import pdl_launch, pdl_wait

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate(src_ptr, dst_ptr, src_stride_h, dst_stride_h, H, cos, sin,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < H)[:, None] & (offs_d < HALF)[None, :]
    src = src_ptr + offs_h[:, None] * src_stride_h + offs_d[None, :]
    dst = dst_ptr + offs_h[:, None] * dst_stride_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, qo_ptr,
                 T, Hq, Hkv, stride_cos, stride_cb, stride_ch, stride_cs,
                 D: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    pos = tl.load(pos_ptr + tok)
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr + tok * Hq * D, qo_ptr + tok * Hq * D, D, D, Hq, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    cache_off = b * stride_cb + pos * stride_cs
    _rotate(k_ptr + tok * Hkv * D, kc_ptr + cache_off, D, stride_ch, Hkv, cos, sin, HALF, BLOCK_HKV,
            BLOCK_HALF)
    # v is copied unrotated: two half-width copies keep one layout for both.
    offs_h = tl.arange(0, BLOCK_HKV)
    mask = (offs_h < Hkv)[:, None] & dmask[None, :]
    src = v_ptr + tok * Hkv * D + offs_h[:, None] * D + offs_d[None, :]
    dst = vc_ptr + cache_off + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(dst, tl.load(src, mask=mask).to(vc_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, tl.load(src + HALF, mask=mask).to(vc_ptr.dtype.element_ty), mask=mask)


def _check_rope(q, k, v, positions, cos, sin, k_cache, v_cache):
    for name, t in (("q", q), ("k", k), ("v", v), ("positions", positions), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a tensor")
        if not t.is_contiguous():
            raise ValueError(f"rope: {name} must be contiguous")
        if t.device != q.device:
            raise ValueError(f"rope: {name} is on {t.device}, q on {q.device}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"rope: q must be [B,T,Hq,D], k and v [B,T,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D or D % 2:
        raise ValueError(f"rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} (D must be even)")
    Hkv = k.shape[2]
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"rope: q/k/v must share one of fp16/bf16/fp32, got {q.dtype}/{k.dtype}/{v.dtype}")
    if positions.shape != (B, T) or positions.dtype != torch.int64:
        raise ValueError(f"rope: positions must be [B, T] int64, got {tuple(positions.shape)} {positions.dtype}")
    if cos.dim() != 2 or cos.shape[1] != D // 2 or sin.shape != cos.shape:
        raise ValueError(f"rope: cos/sin must be [P, {D // 2}], got {tuple(cos.shape)}/{tuple(sin.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("rope: k_cache and v_cache must be [max_batch, Hkv, max_seq_len, D] of one shape")
    if k_cache.shape[0] < B or k_cache.shape[1] != Hkv or k_cache.shape[3] != D:
        raise ValueError(f"rope: cache {tuple(k_cache.shape)} does not fit B={B}, Hkv={Hkv}, D={D}")


def rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Rotate q and k by `positions`; write rotated k and raw v into the caches; return rotated q.

    Positions are not bounds-checked on the device (that would need a sync): they must lie in
    `[0, min(P, max_seq_len))`.
    """
    _check_rope(q, k, v, positions, cos, sin, k_cache, v_cache)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    q_rot = torch.empty_like(q)
    if B * T == 0:
        return q_rot
    half = D // 2
    _rope_kernel[(B * T,)](q, k, v, positions, cos, sin, k_cache, v_cache, q_rot,
                           T, Hq, Hkv, cos.stride(0), k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), D=D, HALF=half,
                           BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HKV=triton.next_power_of_2(Hkv),
                           BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **pdl_launch(q.device))
    return q_rot


def _rotate_ref(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of `rope` (same cache side effects)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    c = cos.to(ct)[positions][:, :, None, :]  # [B, T, 1, D/2]
    s = sin.to(ct)[positions][:, :, None, :]
    q_rot = _rotate_ref(q.to(ct), c, s).to(q.dtype)
    k_rot = _rotate_ref(k.to(ct), c, s).to(k_cache.dtype)
    B, T = positions.shape
    b_idx = torch.arange(B, device=q.device)[:, None].expand(B, T)
    k_cache[b_idx, :, positions] = k_rot
    v_cache[b_idx, :, positions] = v.to(v_cache.dtype)
    return q_rot
