"""Token sampling for the engine: greedy, or temperature + nucleus (top-p) with an optional seeded generator."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax when temperature == 0, else a draw from the softmax of
    logits / temperature restricted to the smallest set of tokens whose probability reaches top_p."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        from fusedlis.triton_kernels.sampling import top_p_mask_ref  # the one definition of the top-p set

        probs = probs * top_p_mask_ref(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
