"""The Llama 3.x decoder, composed from the parallel layers and the op table; no distribution logic here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fusedlis.model.config import LlamaConfig
from fusedlis.model.ops import TorchOps, get_ops
from fusedlis.model.parallel import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, ShardSpec,
                                     TPContext, VocabParallelEmbedding, _param)
from fusedlis.model.rope import rope_tables


@dataclass
class KVCache:
    """Static per-layer K and V buffers, each [max_batch, kv_heads_local, max_seq_len, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, config: LlamaConfig, tp_size: int, max_batch: int, max_seq_len: int,
                 dtype: torch.dtype, device) -> "KVCache":
        shape = (max_batch, config.num_key_value_heads // tp_size, max_seq_len, config.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)])

    @property
    def max_batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]


class RMSNorm(nn.Module):
    def __init__(self, hf_name: str, dim: int, eps: float, dtype, device) -> None:
        super().__init__()
        self.hf_name, self.eps = hf_name, eps
        self.weight = _param((dim,), dtype, device)

    def shard_specs(self) -> list[ShardSpec]:
        return [ShardSpec(self.hf_name, tuple(self.weight.shape), self.weight)]

    def forward(self, x, ops, residual=None):
        return ops.rmsnorm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, prefix: str, tp: TPContext, dtype, device) -> None:
        super().__init__()
        self.h_local = cfg.num_attention_heads // tp.size
        self.kv_local = cfg.num_key_value_heads // tp.size
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, [(f"{prefix}.q_proj.weight", cfg.q_size), (f"{prefix}.k_proj.weight", cfg.kv_size),
                              (f"{prefix}.v_proj.weight", cfg.kv_size)], tp, dtype, device)
        self.o_proj = RowParallelLinear(f"{prefix}.o_proj.weight", cfg.q_size, cfg.hidden_size, tp, dtype, device)

    def forward(self, x, positions, rope, cache_kv, ops, kv_len, residual, norm):
        """Attention sublayer ending in `norm(o_proj(attn) + residual)`: returns (normed, new residual)."""
        B, T, _ = x.shape
        D = self.head_dim
        qkv = self.qkv_proj(x, ops)
        q, k, v = qkv.split([self.h_local * D, self.kv_local * D, self.kv_local * D], dim=-1)
        o = ops.attention(q.reshape(B, T, self.h_local, D), k.reshape(B, T, self.kv_local, D),
                          v.reshape(B, T, self.kv_local, D), positions, rope[0], rope[1],
                          cache_kv[0], cache_kv[1], self.scale, kv_len)
        return self.o_proj.forward_norm(o.reshape(B, T, self.h_local * D), ops, residual, norm)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, prefix: str, tp: TPContext, dtype, device) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [(f"{prefix}.gate_proj.weight", i), (f"{prefix}.up_proj.weight", i)],
            tp, dtype, device, activation="swiglu")
        self.down_proj = RowParallelLinear(f"{prefix}.down_proj.weight", i, cfg.hidden_size, tp, dtype, device)

    def forward(self, x, ops, residual, norm):
        """MLP sublayer ending in `norm(down_proj(...) + residual)`: returns (normed, new residual)."""
        return self.down_proj.forward_norm(self.gate_up_proj(x, ops), ops, residual, norm)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, i: int, tp: TPContext, dtype, device) -> None:
        super().__init__()
        p = f"model.layers.{i}"
        self.input_layernorm = RMSNorm(f"{p}.input_layernorm.weight", cfg.hidden_size, cfg.rms_norm_eps,
                                       dtype, device)
        self.self_attn = Attention(cfg, f"{p}.self_attn", tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(f"{p}.post_attention_layernorm.weight", cfg.hidden_size,
                                                cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, f"{p}.mlp", tp, dtype, device)

    def forward(self, h, residual, positions, rope, cache_kv, ops, kv_len, next_norm):
        """`h` is this layer's normed input; returns the next norm's output and the new residual.

        Each row-parallel projection ends with the residual add and the following RMSNorm, so a fused
        GEMM + all-reduce + residual + RMSNorm kernel can replace all of it.
        """
        h, residual = self.self_attn(h, positions, rope, cache_kv, ops, kv_len, residual,
                                     self.post_attention_layernorm)
        return self.mlp(h, ops, residual, next_norm)


class LlamaForCausalLM(nn.Module):
    """Llama 3.x causal LM for one tensor-parallel rank.

    `model(input_ids)` runs a full causal forward and returns fp32 logits [B, T, vocab]. With a `KVCache` and
    `positions` it extends cached sequences (prefill or decode). Build with `fusedlis.load_model`.
    """

    def __init__(self, config: LlamaConfig, tp: TPContext | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kernels: str = "torch") -> None:
        super().__init__()
        tp = tp or TPContext()
        config.validate_tp(tp.size)
        self.config, self.tp, self.dtype = config, tp, dtype
        self.ops: TorchOps = get_ops(kernels)
        self.embed_tokens = VocabParallelEmbedding("model.embed_tokens.weight", config.vocab_size,
                                                   config.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp, dtype, device)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm("model.norm.weight", config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead("lm_head.weight", config.vocab_size, config.hidden_size, tp, dtype, device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_len = 0
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def kernels(self) -> str:
        return self.ops.name

    def set_kernels(self, kernels: str) -> None:
        """Switch every layer between "torch" (reference) and "triton" kernels."""
        self.ops = get_ops(kernels)

    def shard_specs(self) -> list[ShardSpec]:
        """Every checkpoint slice this rank needs, in module order."""
        specs: list[ShardSpec] = []
        for m in self.modules():
            if m is self.lm_head and self.config.tie_word_embeddings:
                continue
            if hasattr(m, "shard_specs") and m is not self:
                specs.extend(m.shard_specs())
        return specs

    def rope(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope_len < n or self._rope[0].device != torch.device(device):
            n = max(n, min(self.config.max_position_embeddings, 4096))
            self._rope = rope_tables(self.config, n, device)
            self._rope_len = n
        return self._rope

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float | None = None) -> "LlamaForCausalLM":
        """Fill weights with seeded random values (for benchmarks and tests without a checkpoint).

        Each rank fills its own shard from a rank-specific seed, so shapes are right but a TP>1 model is not the
        same function as the TP=1 one.
        """
        dev = self.embed_tokens.weight.device
        g = torch.Generator(device=dev).manual_seed(seed * 1009 + self.tp.rank)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=dev))
            else:
                s = std if std is not None else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g, device=dev) * s)
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False, check: bool = True,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (fp32) for `input_ids` [B, T] at `positions` [B, T] (default 0..T-1).

        `last_only`: only the last position's logits ([B, 1, vocab]); `last_index` [B]: only position
        last_index[b] of row b ([B, 1, vocab]), for right-padded batches of prompts of different lengths.

        With `kv_cache`, new keys/values are written at their positions and attention reads the cache.
        `check=False` skips input validation and host synchronisation (for CUDA-graph capture): then the
        rope tables must already cover every position (`model.rope(n, device)`) and attention reads the
        whole cache.
        """
        device = input_ids.device
        B, T = input_ids.shape[0], input_ids.shape[-1]
        if positions is None:
            positions = torch.arange(T, device=device).expand(B, T)
        kv_len = None
        if check:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be an integer tensor [B, T], got {tuple(input_ids.shape)} "
                                 f"{input_ids.dtype}")
            if T == 0:
                raise ValueError("input_ids has no tokens (T = 0)")
            if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
            if positions.shape != input_ids.shape:
                raise ValueError(f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}")
            kv_len = int(positions.max()) + 1
            if kv_cache is not None and (B > kv_cache.max_batch or kv_len > kv_cache.max_seq_len):
                raise ValueError(f"batch {B} / position {kv_len - 1} exceed the KV cache "
                                 f"({kv_cache.max_batch} x {kv_cache.max_seq_len})")
            rope = self.rope(kv_len, device)
            if last_index is not None and (last_index.shape != (B,) or int(last_index.min()) < 0
                                           or int(last_index.max()) >= T):
                raise ValueError(f"last_index must be [{B}] with entries in [0, {T})")
        else:
            rope = self._rope
        ops = self.ops
        residual = self.embed_tokens(input_ids, ops)
        x = self.layers[0].input_layernorm(residual, ops)
        for i, layer in enumerate(self.layers):
            cache_kv = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else (None, None)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, residual = layer(x, residual, positions, rope, cache_kv, ops, kv_len, nxt)
        if last_index is not None:
            x = x[torch.arange(B, device=device), last_index].unsqueeze(1)
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(x, ops).float()
