"""The compute ops the model is written against, with a torch reference and a Triton implementation.

The model calls `ops.linear`, `ops.rmsnorm`, `ops.embedding` and `ops.attention`; `get_ops("torch" | "triton")`
chooses the implementation. Shapes: activations are [..., features]; attention takes [B, T, H, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedlis._env import env_flag
from fusedlis.model.rope import apply_rope


class TorchOps:
    """Plain torch: the numerical reference, and the CPU path."""

    name = "torch"

    def linear(self, x: torch.Tensor, w: torch.Tensor, *, activation: str | None = None) -> torch.Tensor:
        y = F.linear(x, w)
        if activation == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            return F.silu(gate) * up
        return y

    def rmsnorm(self, x: torch.Tensor, w: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
        return (y, x) if residual is not None else y

    def embedding(self, ids: torch.Tensor, w: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
        local = ids - vocab_start
        valid = (local >= 0) & (local < w.shape[0])
        out = F.embedding(local.clamp(0, w.shape[0] - 1), w)
        return out * valid.unsqueeze(-1).to(out.dtype)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None,
                  v_cache: torch.Tensor | None, scale: float, kv_len: int | None = None) -> torch.Tensor:
        """Rotary + (cache write) + causal GQA attention by absolute positions. Returns [B, T, Hq, D].

        q [B,T,Hq,D], k/v [B,T,Hkv,D], positions [B,T]. With a cache ([Bmax, Hkv, S, D]) the new k/v are
        written at their positions and every query attends to cache positions <= its own; `kv_len` bounds the
        cache prefix read (None: the whole cache, which needs no host sync, e.g. inside a CUDA graph).
        """
        q = apply_rope(q, positions, cos, sin)
        k = apply_rope(k, positions, cos, sin)
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        if k_cache is not None:
            b_idx = torch.arange(B, device=q.device).unsqueeze(1).expand(B, T)
            k_cache[b_idx, :, positions] = k
            v_cache[b_idx, :, positions] = v
            L = kv_len or k_cache.shape[2]
            keys, vals = k_cache[:B, :, :L], v_cache[:B, :, :L]  # [B, Hkv, L, D]
            kpos = torch.arange(L, device=q.device).expand(B, L)
        else:
            keys, vals = k.transpose(1, 2), v.transpose(1, 2)
            kpos = positions
        mask = kpos.unsqueeze(1) <= positions.unsqueeze(2)  # [B, T, L]
        g = Hq // Hkv
        qh = q.transpose(1, 2).reshape(B, Hkv, g * T, D)  # head h -> kv head h // g
        scores = torch.matmul(qh.float(), keys.float().transpose(-1, -2)) * scale  # [B, Hkv, g*T, L]
        scores = scores.view(B, Hkv, g, T, -1).masked_fill(~mask[:, None, None], float("-inf"))
        p = torch.softmax(scores, dim=-1).view(B, Hkv, g * T, -1)
        o = torch.matmul(p, vals.float()).view(B, Hq, T, D).transpose(1, 2)
        return o.to(q.dtype)


class TritonOps(TorchOps):
    """fusedlis.triton_kernels; falls back to the torch reference for prefill attention (T > 1)."""

    name = "triton"

    def __init__(self) -> None:
        from fusedlis import triton_kernels as tk

        self.tk = tk
        # Decode steps rotate q / k and write the cache inside decode_attention (one launch fewer per layer;
        # 8B TP=2 fused: -2.3% per token at batch 1, -9.5% at batch 8, 2xH200 run 10:12). FUSEDLIS_FUSE_ROPE=0:
        # the rope kernel instead.
        self.fuse_rope = env_flag("FUSEDLIS_FUSE_ROPE", True)

    def linear(self, x, w, *, activation=None):
        shape = x.shape
        y = self.tk.linear(x.reshape(-1, shape[-1]).contiguous(), w, activation=activation)
        return y.view(*shape[:-1], y.shape[-1])

    def rmsnorm(self, x, w, eps, residual=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if residual is None:
            return self.tk.rmsnorm(x2, w, eps).view(shape)
        y, r = self.tk.rmsnorm(x2, w, eps, residual=residual.reshape(-1, shape[-1]).contiguous())
        return y.view(shape), r.view(shape)

    def embedding(self, ids, w, vocab_start=0):
        shape = ids.shape
        return self.tk.embedding(ids.reshape(-1).contiguous(), w, vocab_start).view(*shape, w.shape[1])

    def attention(self, q, k, v, positions, cos, sin, k_cache, v_cache, scale, kv_len=None):
        if k_cache is None:
            return super().attention(q, k, v, positions, cos, sin, k_cache, v_cache, scale)
        B, T, Hq, D = q.shape
        if T == 1 and self.fuse_rope and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1:
            # q, k, v may be strided views of the merged qkv output; the kernel reads them in place
            return self.tk.decode_attention(q[:, 0], k_cache, v_cache, positions[:, 0], scale, lens_offset=1,
                                            rope=(k[:, 0], v[:, 0], cos, sin)).view(B, 1, Hq, D)
        # The kernel rotates q and k and writes k, v into the cache.
        q_rot = self.tk.rope(q.contiguous(), k.contiguous(), v.contiguous(), positions.contiguous(), cos, sin,
                             k_cache, v_cache)
        if T == 1:
            # length = position + 1, read by the kernel from the positions column itself (no per-layer torch ops)
            return self.tk.decode_attention(q_rot.view(B, Hq, D), k_cache, v_cache, positions[:, 0], scale,
                                            lens_offset=1).view(B, 1, Hq, D)
        # Prefill: attention over the filled cache stays in torch.
        L = kv_len or k_cache.shape[2]
        keys, vals = k_cache[:B, :, :L], v_cache[:B, :, :L]
        g = Hq // keys.shape[1]
        mask = torch.arange(L, device=q.device).view(1, 1, L) <= positions.unsqueeze(2)
        o = F.scaled_dot_product_attention(q_rot.transpose(1, 2), keys.repeat_interleave(g, 1),
                                           vals.repeat_interleave(g, 1), attn_mask=mask.unsqueeze(1), scale=scale)
        return o.transpose(1, 2)


def get_ops(kernels: str) -> TorchOps:
    """The op implementation named `kernels`: "torch" (reference) or "triton"."""
    if kernels == "torch":
        return TorchOps()
    if kernels == "triton":
        return TritonOps()
    raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
