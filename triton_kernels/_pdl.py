"""Programmatic dependent launch (PDL, Hopper and newer): let a kernel start while the previous one finishes.

A decode step is a chain of short kernels, each paying launch latency and a ramp-up before it streams memory.
With PDL a kernel launched with `launch_pdl=True` may become resident as soon as the previous kernel's programs
have all called `gdc_launch_dependents`; it must call `gdc_wait` before it reads anything the previous kernel
wrote or writes anything it reads. Work that depends on neither (e.g. prefetching this kernel's weights into
L2) goes before the wait. Kernels take a `PDL` constexpr; launchers pass `**pdl_launch(device)`.

Set FUSEDLIS_PDL=0 to turn it off (every kernel then launches normally and the waits are no-ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlis._env import env_flag

_CACHE: dict[int, bool] = {}


def pdl_enabled(device: torch.device) -> bool:
    """True if kernels on `device` should use PDL: CUDA, compute capability >= 9, Triton with GDC, not disabled."""
    if device.type != "cuda" or not env_flag("FUSEDLIS_PDL", True):
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CACHE:
        try:
            from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
            ok = torch.cuda.get_device_capability(idx)[0] >= 9
        except Exception:
            ok = False
        _CACHE[idx] = ok
    return _CACHE[idx]


def pdl_launch(device: torch.device) -> dict:
    """Extra launch keyword arguments: `{"PDL": True, "launch_pdl": True}` where PDL is on, else `{"PDL": False}`."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr, LAUNCH=True):
    """Wait for the previous kernel in the stream (all its memory operations visible); then, with `LAUNCH`, let
    the next kernel launch. Call before the first dependent read or any write. A kernel that passes
    LAUNCH=False calls `pdl_launch_dependents` itself later (its successor's programs then stay off the SMs
    for longer; CUTLASS's weight-prefetch GEMM signals after about half its K tiles)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        if LAUNCH:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream launch (it still waits for this whole kernel before its dependent
    reads); a program that exits without calling it counts as having called it."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 to fetch the lines holding `ptrs` (a tensor of valid addresses, ideally one per 128-byte line)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_weight_lines(w_ptr, rows, k_lo, K, stride_w, PF_LINES: tl.constexpr):
    """L2 prefetch of the first PF_LINES 128-byte lines from column `k_lo` of each weight row in `rows` (int64,
    already clamped to the matrix): what a GEMM program can fetch before its `pdl_wait`."""
    LINE: tl.constexpr = 128 // (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    cols = tl.minimum(k_lo + tl.arange(0, PF_LINES) * LINE, K - 1)
    prefetch_l2(w_ptr + rows[:, None] * stride_w + cols[None, :])
