"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block.

One program per row; the whole row sits in registers (N up to ~32K), so x (and residual) are read once
and y (and the new residual) written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlis.triton_kernels._pdl import pdl_launch, pdl_wait

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, res_ptr, new_res_ptr, N, eps,
                    stride_x, stride_y, stride_r, stride_nr,
                    BLOCK_N: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(new_res_ptr + row * stride_nr + offs, x.to(new_res_ptr.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None):
    """`y = h * rsqrt(mean(h^2) + eps) * w` with `h = x (+ residual)`, in fp32, cast to x.dtype.

    Returns y, or `(y, h)` when `residual` is given (h is the new residual stream, in x.dtype).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("rmsnorm: x and w must be tensors")
    if x.dim() != 2 or w.dim() != 1 or w.shape[0] != x.shape[1]:
        raise ValueError(f"rmsnorm: x must be [M, N] and w [N], got x{tuple(x.shape)} w{tuple(w.shape)}")
    if x.dtype not in _DTYPES or w.dtype not in _DTYPES:
        raise TypeError(f"rmsnorm: x/w dtype must be fp16/bf16/fp32, got {x.dtype}/{w.dtype}")
    if x.stride(1) != 1 or not w.is_contiguous() or w.device != x.device:
        raise ValueError("rmsnorm: x needs unit stride along N; w must be contiguous on x's device")
    if residual is not None:
        if residual.shape != x.shape or residual.stride(1) != 1 or residual.device != x.device:
            raise ValueError(f"rmsnorm: residual must be {tuple(x.shape)} with unit stride along N")
        if residual.dtype not in _DTYPES:
            raise TypeError(f"rmsnorm: residual dtype must be fp16/bf16/fp32, got {residual.dtype}")
    M, N = x.shape
    y = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else y
    if M == 0:
        return (y, new_res) if residual is not None else y
    block = triton.next_power_of_2(N)
    if block > 65536:
        raise ValueError(f"rmsnorm: N={N} too large (max 65536)")
    nw = min(16, max(1, block // 512))
    r = residual if residual is not None else x
    _rmsnorm_kernel[(M,)](x, w, y, r, new_res, N, eps,
                          x.stride(0), y.stride(0), r.stride(0), new_res.stride(0),
                          BLOCK_N=block, HAS_RES=residual is not None, num_warps=nw, **pdl_launch(x.device))
    return (y, new_res) if residual is not None else y


def rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None):
    """Plain-torch reference of `rmsnorm` (fp32 math, float64 for float64 inputs)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(ct) + (residual.to(ct) if residual is not None else 0)
    y = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.to(ct)).to(x.dtype)
    return (y, h.to(x.dtype)) if residual is not None else y
