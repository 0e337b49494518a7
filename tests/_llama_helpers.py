"""Shared helpers for model tests: small random HF checkpoints written with transformers."""

from __future__ import annotations

import torch


def make_hf_checkpoint(path, *, vocab=96, hidden=32, inter=48, layers=2, heads=4, kv_heads=2, head_dim=None,
                       rope_scaling=True, tie=False, shard_bytes=None, seed=0, std=0.3):
    """Write a random transformers LlamaForCausalLM (fp32) to `path`; returns the HF model (eval mode)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFModel

    torch.manual_seed(seed)
    scaling = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16} if rope_scaling else None)
    cfg = HFConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=head_dim or hidden // heads, rope_scaling=scaling, max_position_embeddings=256,
                   tie_word_embeddings=tie, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = HFModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(str(path), **kwargs)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
