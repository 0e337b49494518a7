"""L2 prefetch of the next kernel's weights from a kernel that leaves HBM bandwidth idle.

A batch-1 decode step alternates bandwidth-bound GEMMs with latency-bound work: attention over a short cache,
the merge of its splits, the all-reduce wait after a row-parallel GEMM. During those microseconds HBM is idle.
A kernel given a `prefetch` tensor spends that time pulling the first bytes of the next GEMM's weight into L2
(H100/H200: 50 MB), so that GEMM reads part of its weight at L2 speed.

Off unless FUSEDLIS_L2_PREFETCH is set: "1" (up to 24 MB per kernel), "<MB>" (that cap), optionally followed by
",evict" (the `linear` kernel then loads weights evict-first, so its own stream does not push prefetched lines out
of L2). Only CUDA launches prefetch; the interpreter has no L2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusedlis.triton_kernels._pdl import prefetch_l2

_DEFAULT_MB = 24.0
LINE_BYTES = 128


@dataclass(frozen=True)
class L2Prefetch:
    """The FUSEDLIS_L2_PREFETCH setting: at most `max_bytes` per kernel (0: off); `evict`: weights evict-first."""

    max_bytes: int = 0
    evict: bool = False


def l2_prefetch_setting() -> L2Prefetch:
    """Parse FUSEDLIS_L2_PREFETCH ("", "0": off; "1": 24 MB; "<MB>[,evict]"); a bad value raises ValueError."""
    raw = os.environ.get("FUSEDLIS_L2_PREFETCH", "").strip().lower()
    if raw in ("", "0", "off"):
        return L2Prefetch()
    parts = [p.strip() for p in raw.split(",")]
    try:
        mb = _DEFAULT_MB if parts[0] in ("1", "on") else float(parts[0])
        if mb <= 0 or any(p != "evict" for p in parts[1:]):
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"FUSEDLIS_L2_PREFETCH={raw!r}: expected '0', '1' or '<MB>[,evict]' with MB > 0") from None
    return L2Prefetch(int(mb * 2**20), "evict" in parts[1:])


def prefetch_args(t: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """(tensor, elements) of `t`'s leading span to prefetch from a kernel on `device`: whole 128-byte lines, at
    most the configured cap; (None, 0) when prefetch is off, `t` is None, or not a contiguous CUDA tensor."""
    if t is not None and not isinstance(t, torch.Tensor):
        raise TypeError(f"prefetch must be a tensor or None, got {type(t).__name__}")
    cap = l2_prefetch_setting().max_bytes
    if t is None or cap == 0 or device.type != "cuda" or t.device != device or not t.is_contiguous():
        return None, 0
    per_line = LINE_BYTES // t.element_size()
    n = min(t.numel(), cap // t.element_size())
    return t, n // per_line * per_line


@triton.jit
def span_lines(n_lines, part, nparts):
    """The 128-byte lines [lo, hi) of `n_lines` that program `part` of `nparts` prefetches (hi <= lo: none)."""
    per = tl.cdiv(n_lines, nparts)
    lo = part * per
    return lo, tl.minimum(lo + per, n_lines)


@triton.jit
def prefetch_span(ptr, n, part, nparts, BLOCK: tl.constexpr):
    """Program `part` of `nparts` asks L2 for its share of the `n` elements at `ptr` (n: whole 128-byte lines),
    BLOCK line prefetches per step. Non-blocking: the program may exit before the lines arrive."""
    LINE: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    lo, hi = span_lines(n // LINE, part, nparts)
    for i in range(lo, hi, BLOCK):
        offs = tl.minimum(i + tl.arange(0, BLOCK), hi - 1)  # the tail repeats the last line: harmless
        prefetch_l2(ptr + offs.to(tl.int64) * LINE)


@triton.jit
def prefetch_span_bulk(ptr, n, part, nparts, BLOCK: tl.constexpr):
    """`prefetch_span` through the TMA unit (sm_90 `cp.async.bulk.prefetch.L2`): each of BLOCK lanes asks for one
    contiguous piece of this program's share, one instruction per piece."""
    LINE: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    lo, hi = span_lines(n // LINE, part, nparts)
    per = tl.maximum(tl.cdiv(hi - lo, BLOCK), 1)
    first = lo + tl.arange(0, BLOCK) * per
    first = tl.where(first < hi, first, lo)  # idle lanes repeat the first piece: harmless
    nbytes = (tl.minimum(first + per, hi) - first) * 128
    if hi > lo:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                  [ptr + first.to(tl.int64) * LINE, nbytes.to(tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def load_span(ptr, n, part, nparts, BLOCK: tl.constexpr):
    """Read this program's share of the span for real (L2 allocates what it serves), 16 bytes per lane per load;
    returns an fp32 sum the caller must consume so the loads are not removed."""
    lo = part * tl.cdiv(n, nparts)
    hi = tl.minimum(lo + tl.cdiv(n, nparts), n)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(lo, hi, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < hi, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return tl.sum(acc, axis=0)


def prefetch_programs(device: torch.device) -> int:
    """How many extra programs a latency-bound kernel adds to issue a prefetch: half the SMs, so the requests
    leave from many SMs at once."""
    return max(1, torch.cuda.get_device_properties(device).multi_processor_count // 2)

