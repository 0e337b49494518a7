"""bench/launch_floor.py in the interpreter: the read kernel's per-program sums match float64 on odd sizes, and the
129 weight views of a step tile the one buffer exactly (so every variant reads the same bytes)."""

import os
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import launch_floor as lf  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5000), dtype=st.sampled_from([torch.float32, torch.float16]),
       block=st.sampled_from([16, 64, 256]), iters=st.sampled_from([1, 3, 4]), seed=st.integers(0, 2**31 - 1))
def test_read_sums_match_float64(n, dtype, block, iters, seed):
    cfg = lf.ReadConfig(block, iters, 4)
    src = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    progs = -(-n // (block * iters))
    assert lf.read_programs(n, cfg) == progs
    out = torch.full((progs + 5,), float("nan"))
    got = lf.read(src, out, cfg)
    assert got.shape == (progs,)
    x = torch.nn.functional.pad(src.double(), (0, progs * block * iters - n)).view(progs, -1)
    ref, scale = x.sum(dim=1), x.abs().sum(dim=1)
    # error relative to the sum of magnitudes: a program's sum may cancel to ~0, its fp32 rounding does not
    assert torch.all((out[:progs].double() - ref).abs() <= 1e-5 * scale), (n, dtype, cfg)
    assert out[progs:].isnan().all()  # no program past the last


def test_read_refuses_short_out():
    with pytest.raises(ValueError, match="programs need one each"):
        lf.read(torch.zeros(100), torch.empty(1), lf.ReadConfig(16, 1, 4))


def _check_tiles(layout):
    off = 0
    for v in layout:
        assert v.offset == off and v.n > 0 and v.k > 0, v
        off += v.numel
    assert lf.total_numel(layout) == off


def test_full_layout_is_the_8b_tp2_step():
    layout = lf.weight_layout(32)
    _check_tiles(layout)
    assert len(layout) == 129 and layout[-1].name == "lm_head" and (layout[-1].n, layout[-1].k) == (64128, 4096)
    per_layer = 3072 * 4096 + 4096 * 2048 + 14336 * 4096 + 4096 * 7168
    assert lf.total_numel(layout) * lf.ELEM_BYTES == 2 * (32 * per_layer + 64128 * 4096) == 7_504_658_432
    assert len(lf.read_spans(layout, "layer")) == 33
    assert lf.read_spans(layout, "all") == [(0, lf.total_numel(layout))]


@pytest.mark.parametrize("shrink", [1, lf.SMOKE_SHRINK])
def test_two_layers_spans_cover_the_buffer(shrink):
    layout = lf.weight_layout(2, shrink=shrink)
    _check_tiles(layout)
    names = [v.name.split(".")[-1] for v in layout]
    assert len(layout) == 9 and names == ["qkv", "o_proj", "gate_up", "down"] * 2 + ["lm_head"]
    assert [v.layer for v in layout] == [0] * 4 + [1] * 4 + [-1]
    total = lf.total_numel(layout)
    for per, count in (("all", 1), ("layer", 3), ("weight", 9)):
        spans = lf.read_spans(layout, per)
        assert len(spans) == count
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == total
    if shrink > 1:  # small enough to materialise: the views, flattened in order, are the buffer itself
        buf = torch.arange(total, dtype=torch.float32)
        views = [buf[v.offset:v.offset + v.numel].view(v.n, v.k) for v in layout]
        assert all(w.is_contiguous() and w.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                   for w in views)
        assert torch.equal(torch.cat([w.reshape(-1) for w in views]), buf)


def test_layout_refuses_bad_arguments():
    with pytest.raises(ValueError):
        lf.weight_layout(0)
    with pytest.raises(ValueError, match="does not divide"):
        lf.weight_layout(1, shrink=3)
    with pytest.raises(ValueError):
        lf.read_spans(lf.weight_layout(1), "row")


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 70), k=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.float16]),
       cfg=st.sampled_from([lf.RowsConfig(1, 64, 1), lf.RowsConfig(4, 32, 2), lf.RowsConfig(8, 128, 4)]),
       seed=st.integers(0, 2**31 - 1))
def test_gemv_rows_matches_float64(n, k, dtype, cfg, seed):
    """The flat-row GEMV experiment: odd N and K (ragged row blocks and K tiles), NaN-poisoned output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    y = torch.full((1, n), float("nan"), dtype=dtype)
    lf.gemv_rows(x, w, y, cfg)
    ref = x.double() @ w.double().T
    err = float((y.double() - ref).norm() / ref.norm())
    assert not y.isnan().any() and err <= {torch.float32: 1e-5, torch.float16: 2e-3}[dtype], (n, k, cfg, err)
