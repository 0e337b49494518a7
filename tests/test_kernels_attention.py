"""decode_attention: flash-decoding over the KV cache (GQA, per-sequence lengths) vs float64."""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlis.triton_kernels import (decode_attention, decode_attention_configs, decode_attention_default_config,
                                     decode_attention_key, decode_attention_ref)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(B, Hkv, group, D, S, dtype, cfg, device=DEV, seed=0, full=False, from_positions=False):
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    q = torch.randn(B, Hq, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    kc = torch.randn(B + 1, Hkv, S, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    vc = torch.randn(B + 1, Hkv, S, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    lens = (torch.full((B,), S) if full else torch.randint(1, S + 1, (B,), generator=g)).to(torch.int32)
    lens = lens.to(device)
    # Positions past seq_len hold garbage that must be ignored.
    for b in range(B):
        kc[b, :, int(lens[b]):] = float("nan")
        vc[b, :, int(lens[b]):] = float("nan")
    scale = D ** -0.5
    out = torch.full_like(q, float("nan"))  # an element the kernel does not write stays NaN
    if from_positions:  # the engine's form: a strided int64 column of positions, length = position + 1
        pos = torch.stack([lens.long() - 1, torch.full_like(lens.long(), -7)], dim=1)
        o = decode_attention(q, kc, vc, pos[:, 0], scale, config=cfg, lens_offset=1, out=out)
    else:
        o = decode_attention(q, kc, vc, lens, scale, config=cfg, out=out)
    assert o.data_ptr() == out.data_ptr()
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), lens, scale)
    assert not torch.isnan(o).any()
    return ((o.double() - ref).norm() / ref.norm()).item()


@st.composite
def cases(draw):
    cfg = None
    if draw(st.booleans()):
        cfg = {"NUM_SPLITS": draw(st.integers(1, 5)), "BLOCK_N": draw(st.sampled_from([16, 32])), "num_warps": 4,
               "FUSED_REDUCE": draw(st.booleans()), "VEC_MERGE": draw(st.booleans())}
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4])),
            draw(st.sampled_from([16, 24, 32])), draw(st.integers(1, 90)),
            draw(st.sampled_from([torch.float32, torch.float16])), cfg, draw(st.booleans()))


@given(cases())
def test_decode_attention_matches_reference(case):
    B, Hkv, group, D, S, dtype, cfg, from_positions = case
    assert run_case(B, Hkv, group, D, S, dtype, cfg, from_positions=from_positions) < TOL[dtype]


@pytest.mark.parametrize("fused", [False, True])
def test_decode_attention_more_splits_than_blocks(fused):
    # Many splits are empty for short sequences: their partials must not contribute.
    cfg = {"NUM_SPLITS": 12, "BLOCK_N": 16, "FUSED_REDUCE": fused}
    assert run_case(2, 2, 2, 16, 200, torch.float32, cfg, seed=3) < 1e-5


def test_decode_attention_fused_reduce_counters_reset():
    mod = importlib.import_module("fusedlis.triton_kernels.decode_attention")
    for seed in range(2):
        assert run_case(2, 3, 2, 16, 90, torch.float32, {"NUM_SPLITS": 4, "BLOCK_N": 16, "FUSED_REDUCE": True},
                        seed=seed) < 1e-5
        assert mod._COUNTERS and all(int(c.abs().sum()) == 0 for c in mod._COUNTERS.values())


def _forbid_reduce_launch(monkeypatch):
    """Make a launch of the split-merging second kernel fail the test."""
    class NoReduce:
        def __getitem__(self, grid):
            raise AssertionError("reduce kernel launched")

    mod = importlib.import_module("fusedlis.triton_kernels.decode_attention")
    monkeypatch.setattr(mod, "_decode_attention_reduce_kernel", NoReduce())


def test_decode_attention_one_launch_env(monkeypatch):
    # FUSEDLIS_ATTN_ONE_LAUNCH=1: an untuned call merges in the main kernel, so the reduce kernel must not run.
    _forbid_reduce_launch(monkeypatch)
    monkeypatch.setenv("FUSEDLIS_ATTN_ONE_LAUNCH", "1")
    assert run_case(1, 2, 2, 16, 300, torch.float32, None, seed=5, full=True) < 1e-5
    monkeypatch.setenv("FUSEDLIS_ATTN_ONE_LAUNCH", "0")
    with pytest.raises(AssertionError, match="reduce kernel launched"):
        run_case(1, 2, 2, 16, 300, torch.float32, None, seed=5, full=True)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_attention_one_launch_vec_env(monkeypatch, group):
    # FUSEDLIS_ATTN_ONE_LAUNCH=vec: one launch, the group's heads merged as one tile (odd group sizes padded)
    _forbid_reduce_launch(monkeypatch)
    monkeypatch.setenv("FUSEDLIS_ATTN_ONE_LAUNCH", "vec")
    for seed, (B, Hkv, S) in enumerate(((1, 2, 300), (3, 1, 700), (2, 3, 129))):
        assert run_case(B, Hkv, group, 16, S, torch.float32, None, seed=seed) < 1e-5
        assert run_case(B, Hkv, group, 16, S, torch.float16, None, seed=seed) < 2e-3


def test_decode_attention_max_splits_env_one_split_is_one_launch(monkeypatch):
    # FUSEDLIS_ATTN_MAX_SPLITS=1: the single split writes the output itself; no reduce launch, no partials.
    _forbid_reduce_launch(monkeypatch)
    monkeypatch.setenv("FUSEDLIS_ATTN_MAX_SPLITS", "1")
    for seed, (B, Hkv, group, S) in enumerate(((1, 2, 2, 300), (3, 1, 4, 77), (2, 3, 1, 129))):
        assert run_case(B, Hkv, group, 16, S, torch.float32, None, seed=seed) < 1e-5
        assert run_case(B, Hkv, group, 16, S, torch.float16, None, seed=seed) < 2e-3
    monkeypatch.setenv("FUSEDLIS_ATTN_MAX_SPLITS", "2")
    with pytest.raises(AssertionError, match="reduce kernel launched"):
        run_case(1, 2, 2, 16, 300, torch.float32, None, seed=5, full=True)


def test_decode_attention_configs():
    key = decode_attention_key(8, 16, 4, 128, 4096, torch.bfloat16)
    cfgs = decode_attention_configs(key)
    assert decode_attention_default_config(key) in cfgs
    assert all(c["NUM_SPLITS"] >= 1 and c["BLOCK_N"] >= 16 for c in cfgs)


def test_decode_attention_bad_inputs():
    q = torch.randn(2, 4, 16)
    kc = torch.randn(2, 2, 8, 16)
    lens = torch.full((2,), 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q, kc, kc, lens.float(), 0.25)
    with pytest.raises(ValueError, match="incompatible"):
        decode_attention(torch.randn(2, 3, 16), kc, kc, lens, 0.25)
    with pytest.raises(ValueError, match="incompatible"):
        decode_attention(q, kc[:, :, :0], kc[:, :, :0], lens, 0.25)
    with pytest.raises(TypeError, match="share"):
        decode_attention(q.half(), kc, kc, lens, 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        decode_attention(q, kc.transpose(2, 3).contiguous().transpose(2, 3), kc, lens, 0.25)
    for bad_out in (torch.empty(2, 4, 8), q.half(), q.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :16]):
        with pytest.raises(ValueError, match="out must be"):
            decode_attention(q, kc, kc, lens, 0.25, out=bad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hkv,group,S,rope", [(1, 8, 4, 2048, False), (4, 4, 4, 1000, False), (8, 1, 8, 4096, False),
                                                (3, 2, 5, 333, False), (1, 4, 4, 2048, True), (8, 4, 4, 4096, True),
                                                (3, 2, 5, 333, True), (64, 1, 8, 600, True)])
def test_decode_attention_gpu_bf16(B, Hkv, group, S, rope):
    """bf16 on the GPU, the default and the first configs of the search space; `rope`: with the fused rope."""
    key = decode_attention_key(B, Hkv * group, Hkv, 128, S, torch.bfloat16)
    case = run_rope_case if rope else run_case
    one_split = {"NUM_SPLITS": 1, "BLOCK_N": 64, "num_warps": 4}  # the single-launch direct-write path
    for cfg in [None, one_split] + decode_attention_configs(key)[:5]:
        assert case(B, Hkv, group, 128, S, torch.bfloat16, cfg, device="cuda", seed=S) < 1e-2, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hkv,group,S", [(1, 4, 4, 2048), (8, 1, 8, 8192), (3, 2, 5, 333)])
def test_decode_attention_gpu_bf16_fused_reduce(B, Hkv, group, S):
    key = decode_attention_key(B, Hkv * group, Hkv, 128, S, torch.bfloat16)
    fused = [c for c in decode_attention_configs(key) if c.get("FUSED_REDUCE")]
    assert fused
    for cfg in fused + [dict(c, VEC_MERGE=True) for c in fused[:4]]:  # and the group's heads merged as one tile
        for seed in range(2):  # twice: the arrival counters must reset
            assert run_case(B, Hkv, group, 128, S, torch.bfloat16, cfg, device="cuda", seed=seed) < 1e-2, cfg


def run_rope_case(B, Hkv, group, D, S, dtype, cfg, device=DEV, seed=0, fused_reduce=False):
    """decode_attention with rope=(k_new, v_new, cos, sin) against rope_ref then decode_attention_ref (float64).

    q, k_new, v_new are strided views of one merged qkv row (the engine's layout). The cache row the kernel
    must write (each sequence's last position) is poisoned with NaN first, positions after it too."""
    from fusedlis.triton_kernels.rope import rope_ref

    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * group
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k_new, v_new = (t.view(B, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=1))
    kc = torch.randn(B + 1, Hkv, S, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    vc = torch.randn(B + 1, Hkv, S, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    pos = torch.randint(0, S, (B,), generator=g)
    for b in range(B):
        kc[b, :, int(pos[b]):] = float("nan")
        vc[b, :, int(pos[b]):] = float("nan")
    ang = torch.rand(S + 3, D // 2, generator=g, dtype=torch.float64) * 6.0
    cos, sin = ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)
    kc_ref, vc_ref = kc.double(), vc.double()
    q_rot = rope_ref(q.double()[:, None], k_new.double()[:, None], v_new.double()[:, None], pos[:, None].to(device),
                     cos.double(), sin.double(), kc_ref, vc_ref)[:, 0]
    ref = decode_attention_ref(q_rot, kc_ref, vc_ref, pos.to(device), D ** -0.5, lens_offset=1)
    if fused_reduce:
        cfg = dict(cfg or {"NUM_SPLITS": 3, "BLOCK_N": 16}, FUSED_REDUCE=True)
    column = torch.stack([pos, torch.full_like(pos, -7)], dim=1).to(device)  # a strided positions column
    out = torch.full_like(q, float("nan"))
    o = decode_attention(q, kc, vc, column[:, 0], D ** -0.5, config=cfg, lens_offset=1, rope=(k_new, v_new, cos, sin),
                         out=out)
    assert not torch.isnan(o).any()
    for b in range(B):  # the new token's row was written: rotated k, raw v
        p = int(pos[b])
        for got, want in ((kc[b, :, p], kc_ref[b, :, p]), (vc[b, :, p], vc_ref[b, :, p])):
            assert ((got.double() - want).norm() / want.norm()).item() < TOL[dtype]
    return ((o.double() - ref).norm() / ref.norm()).item()


@st.composite
def rope_cases(draw):
    cfg = None
    if draw(st.booleans()):
        cfg = {"NUM_SPLITS": draw(st.integers(1, 5)), "BLOCK_N": draw(st.sampled_from([16, 32])), "num_warps": 4}
    return (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 4])),
            draw(st.sampled_from([16, 24, 32])), draw(st.integers(1, 90)),
            draw(st.sampled_from([torch.float32, torch.float16])), cfg, draw(st.booleans()), draw(st.integers(0, 99)))


@given(rope_cases())
def test_decode_attention_with_rope_matches_reference(case):
    """The rope kernel's work fused into attention: same result as rope, then attention; cache rows written."""
    B, Hkv, group, D, S, dtype, cfg, fused_reduce, seed = case
    assert run_rope_case(B, Hkv, group, D, S, dtype, cfg, seed=seed, fused_reduce=fused_reduce) < TOL[dtype]


def test_decode_attention_rope_bad_inputs():
    q = torch.randn(2, 4, 16)
    kc = torch.randn(2, 2, 8, 16)
    lens = torch.full((2,), 3, dtype=torch.int64)
    kn, cos = torch.randn(2, 2, 16), torch.randn(8, 8)
    with pytest.raises(TypeError, match="rope"):
        decode_attention(q, kc, kc, lens, 0.25, rope=(kn, kn, cos))
    with pytest.raises(ValueError, match="k_new"):
        decode_attention(q, kc, kc, lens, 0.25, rope=(kn[:, :1], kn, cos, cos))
    with pytest.raises(ValueError, match="cos/sin"):
        decode_attention(q, kc, kc, lens, 0.25, rope=(kn, kn, cos[:, :4], cos[:, :4]))
    with pytest.raises(ValueError, match="v_new"):
        decode_attention(q, kc, kc, lens, 0.25, rope=(kn, kn.half(), cos, cos))
