"""Rotary position embedding tables, with Llama 3 frequency scaling."""

from __future__ import annotations

import math

import torch

from fusedlis.model.config import LlamaConfig


def inv_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] (fp32), llama3-scaled when the config asks."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_ctx = float(rs["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(config: LlamaConfig, max_positions: int | None = None,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each fp32 [max_positions, head_dim/2] (HF rotate_half convention)."""
    n = max_positions or config.max_position_embeddings
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv_frequencies(config))
    return freqs.cos().to(device), freqs.sin().to(device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] at positions [B, T]; computes in fp32, returns x's dtype."""
    c = cos[positions].unsqueeze(2)  # [B, T, 1, D/2]
    s = sin[positions].unsqueeze(2)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
