"""Vocab-parallel embedding lookup: rows `ids - vocab_start`, zero rows for ids this shard does not hold."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlis.triton_kernels._pdl import pdl_launch, pdl_wait


@triton.jit
def _embedding_kernel(ids_ptr, w_ptr, out_ptr, V_local, D, vocab_start, stride_w, stride_o,
                      BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    # Broadcast the id to the row's lanes: a vector mask (the interpreter rejects scalar-bool masks).
    local = tl.zeros((BLOCK_D,), dtype=tl.int64) + (tl.load(ids_ptr + row) - vocab_start)
    valid = (local >= 0) & (local < V_local)
    local = tl.where(valid, local, 0)
    vals = tl.load(w_ptr + local * stride_w + offs, mask=mask & valid, other=0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, vals, mask=mask)


def embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """`weight[ids - vocab_start]` with zero rows for ids outside `[vocab_start, vocab_start + Vl)`."""
    if not isinstance(ids, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("embedding: ids and weight must be tensors")
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise TypeError(f"embedding: ids must be a 1-D int64 tensor, got {ids.dim()}-D {ids.dtype}")
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"embedding: weight must be [Vl, D] with unit stride along D, got {tuple(weight.shape)}")
    if ids.device != weight.device:
        raise ValueError(f"embedding: ids on {ids.device} but weight on {weight.device}")
    ids = ids.contiguous()
    M, D = ids.shape[0], weight.shape[1]
    out = torch.empty((M, D), dtype=weight.dtype, device=weight.device)
    if M == 0 or D == 0:
        return out
    block = min(triton.next_power_of_2(D), 4096)
    _embedding_kernel[(M, triton.cdiv(D, block))](ids, weight, out, weight.shape[0], D, int(vocab_start),
                                                  weight.stride(0), out.stride(0), BLOCK_D=block,
                                                  num_warps=4, **pdl_launch(weight.device))
    return out


def embedding_ref(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """Plain-torch reference of `embedding`."""
    local = ids - vocab_start
    valid = (local >= 0) & (local < weight.shape[0])
    out = weight[local.clamp(0, max(weight.shape[0] - 1, 0))]
    return torch.where(valid[:, None], out, torch.zeros((), dtype=weight.dtype, device=weight.device))
