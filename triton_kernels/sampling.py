"""Token sampling from logits: greedy argmax, or temperature + top-p (nucleus) with a seed.

One program per row, streaming the row in blocks (the vocab does not need to fit in registers).
Sampled mode: max, then softmax normaliser, then the top-p threshold by bisection on the probability
value (keep every token with p >= t, the largest t whose kept mass is still >= top_p; this is the HF
"smallest set with cumulative mass >= top_p" up to ties), then Gumbel-max over the kept tokens with
counter-based (Philox) noise from `tl.rand(seed', index)`, seed' mixing `seed` and `step`.
Sampled ids are reproducible for a given (seed, step, logits, device) but do not match `sample_ref`'s
torch RNG draw for draw; they match it in distribution. Greedy ids match exactly (ties -> lowest id).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BISECT_ITERS = 28


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, V, stride, inv_temp, top_p, seed,
                   GREEDY: tl.constexpr, TOP_P: tl.constexpr, BISECT_ITERS: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: per-lane running max and the index where it was first seen.
    best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    best_i = tl.zeros((BLOCK_V,), dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        upd = x > best
        best = tl.where(upd, x, best)
        best_i = tl.where(upd, idx, best_i)
    m = tl.max(best, axis=0)

    if GREEDY:
        tl.store(out_ptr + row, tl.min(tl.where(best == m, best_i, 2147483647), axis=0).to(tl.int64))
    else:
        z_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            z_vec += tl.exp((x - m) * inv_temp)
        inv_z = 1.0 / tl.sum(z_vec, axis=0)
        lo = 0.0
        if TOP_P:
            # Invariant: mass(p >= lo) >= top_p > mass(p >= hi). inv_z is the largest probability.
            hi = inv_z * 1.0001
            for _ in range(BISECT_ITERS):
                mid = 0.5 * (lo + hi)
                mass_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)
                for start in range(0, V, BLOCK_V):
                    idx = start + offs
                    x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                    p = tl.exp((x - m) * inv_temp) * inv_z
                    mass_vec += tl.where(p >= mid, p, 0.0)
                ok = tl.sum(mass_vec, axis=0) >= top_p
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid)
        g_best = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        g_idx = tl.zeros((BLOCK_V,), dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            idx = start + offs
            x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
            s = (x - m) * inv_temp
            u = tl.rand(seed, row * V + idx)
            g = s - tl.log(-tl.log(tl.maximum(u, 1e-30)))
            keep = (idx < V) & (tl.exp(s) * inv_z >= lo)
            g = tl.where(keep, g, float("-inf"))
            upd = g > g_best
            g_best = tl.where(upd, g, g_best)
            g_idx = tl.where(upd, idx, g_idx)
        gm = tl.max(g_best, axis=0)
        tl.store(out_ptr + row, tl.min(tl.where(g_best == gm, g_idx, 2147483647), axis=0).to(tl.int64))


def _mix_seed(seed: int, step: int) -> int:
    # splitmix-style mixing so (seed, step) pairs land far apart; Triton's seed argument is 31-bit safe.
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z ^= z >> 31
    return z & 0x7FFFFFFF


def sample(logits: torch.Tensor, temperature: float, top_p: float, seed: int | None, step: int = 0) -> torch.Tensor:
    """Next-token ids [B] int64 from logits [B, V]: greedy if temperature == 0, else temperature + top-p.

    `seed=None` draws a seed from torch's default CPU generator. Use a different `step` per decode step.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError("sample: logits must be a tensor")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"sample: logits must be [B, V] with unit stride along V, got {tuple(logits.shape)}")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"sample: logits dtype must be fp16/bf16/fp32, got {logits.dtype}")
    if not (temperature >= 0.0):
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    B, V = logits.shape
    if V == 0 or V >= 2**31:
        raise ValueError(f"sample: vocab size {V} out of range")
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    greedy = temperature == 0.0
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    block = min(triton.next_power_of_2(V), 4096)
    _sample_kernel[(B,)](logits, out, V, logits.stride(0), 1.0 / temperature if not greedy else 1.0,
                         float(top_p), _mix_seed(int(seed), int(step)),
                         GREEDY=greedy, TOP_P=(top_p < 1.0), BISECT_ITERS=_BISECT_ITERS, BLOCK_V=block,
                         num_warps=8 if block >= 2048 else 4)
    return out


def top_p_mask_ref(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Bool [B, V]: tokens the top-p filter keeps (smallest prefix of the sorted probs with mass >= top_p)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sp, si = probs.sort(dim=-1, descending=True)
    keep_sorted = (sp.cumsum(-1) - sp) < top_p
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, si, keep_sorted)
    return keep


def sample_ref(logits: torch.Tensor, temperature: float, top_p: float, seed: int | None, step: int = 0) -> torch.Tensor:
    """Plain-torch reference of `sample` (same distribution; torch's RNG, so not the same draws)."""
    if temperature == 0.0:
        return logits.float().argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    probs = probs * top_p_mask_ref(logits, temperature, top_p)
    gen = torch.Generator(device=logits.device)
    gen.manual_seed(_mix_seed(seed if seed is not None else 0, step))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
