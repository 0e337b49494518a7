"""bench/l2_prefetch.py splits a span of weight lines between programs: every line exactly once, none past it."""

import os
import sys

import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from l2_prefetch import span_lines  # noqa: E402


@triton.jit
def _record_spans_kernel(hits_ptr, n_lines, nparts, BLOCK: tl.constexpr):
    part = tl.program_id(0)
    lo, hi = span_lines(n_lines, part, nparts)
    for i in range(lo, hi, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        tl.atomic_add(hits_ptr + offs, 1, mask=offs < hi)


@settings(max_examples=25, deadline=None)
@given(n_lines=st.integers(1, 3000), nparts=st.integers(1, 70))
def test_programs_cover_every_line_once(n_lines, nparts):
    hits = torch.zeros(n_lines + 64, dtype=torch.int32)
    _record_spans_kernel[(nparts,)](hits, n_lines, nparts, BLOCK=64)
    assert torch.equal(hits[:n_lines], torch.ones(n_lines, dtype=torch.int32))
    assert int(hits[n_lines:].abs().sum()) == 0  # nothing past the span
