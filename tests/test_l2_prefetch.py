"""L2 prefetch hints (fusedlis.triton_kernels._l2): the setting, the span a kernel is given, and how programs split
it. The prefetch instruction itself needs a GPU (tests/test_kernels_sass.py checks it is emitted for sm_90)."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

from fusedlis.triton_kernels import _l2
from fusedlis.triton_kernels._l2 import l2_prefetch_setting, prefetch_args, span_lines


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


def test_setting_parses_and_rejects(monkeypatch):
    monkeypatch.delenv("FUSEDLIS_L2_PREFETCH", raising=False)
    assert l2_prefetch_setting().max_bytes == 0
    monkeypatch.setenv("FUSEDLIS_L2_PREFETCH", "1")
    assert l2_prefetch_setting() == _l2.L2Prefetch(24 << 20, False)
    monkeypatch.setenv("FUSEDLIS_L2_PREFETCH", "8,evict")
    assert l2_prefetch_setting() == _l2.L2Prefetch(8 << 20, True)
    for bad in ("-3", "x", "8,fast", "0.0"):
        monkeypatch.setenv("FUSEDLIS_L2_PREFETCH", bad)
        with pytest.raises(ValueError, match="FUSEDLIS_L2_PREFETCH"):
            l2_prefetch_setting()


def test_span_is_capped_whole_lines_and_cuda_only(monkeypatch):
    w = torch.randn(1000, 77, dtype=torch.float16)
    monkeypatch.setenv("FUSEDLIS_L2_PREFETCH", "1")
    assert prefetch_args(w, torch.device("cpu")) == (None, 0)  # no L2 to warm in the interpreter
    assert prefetch_args(None, torch.device("cuda")) == (None, 0)
    with pytest.raises(TypeError, match="prefetch"):
        prefetch_args("w", torch.device("cuda"))
    monkeypatch.setattr(type(w), "device", property(lambda self: torch.device("cuda")))
    t, n = prefetch_args(w, torch.device("cuda"))
    assert t is w and n == w.numel() // 64 * 64  # whole 128-byte lines of 2-byte elements
    monkeypatch.setenv("FUSEDLIS_L2_PREFETCH", "0.01")  # 10485 bytes: 81 lines
    assert prefetch_args(w, torch.device("cuda"))[1] == 81 * 64
    assert prefetch_args(w[:, :10], torch.device("cuda")) == (None, 0)  # not contiguous: no single span
