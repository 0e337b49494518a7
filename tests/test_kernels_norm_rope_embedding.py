"""rmsnorm (+ fused residual), rope (+ KV-cache write) and embedding vs float64 references."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlis.triton_kernels import embedding, embedding_ref, rmsnorm, rmsnorm_ref, rope, rope_ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = st.sampled_from([torch.float32, torch.float16])


def rel(a, b):
    assert not torch.isnan(a).any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rand(*shape, dtype, device=DEV, g=None):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


@given(st.integers(1, 5), st.integers(1, 300), DTYPES, st.booleans(), st.integers(0, 2**16))
def test_rmsnorm(M, N, dtype, with_res, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, r = rand(M, N, dtype=dtype, g=g), rand(N, dtype=dtype, g=g), rand(M, N, dtype=dtype, g=g)
    if with_res:
        y, h = rmsnorm(x, w, 1e-5, residual=r)
        yr, hr = rmsnorm_ref(x.double(), w.double(), 1e-5, residual=r.double())
        assert rel(h, hr) < TOL[dtype]
    else:
        y = rmsnorm(x, w, 1e-5)
        yr = rmsnorm_ref(x.double(), w.double(), 1e-5)
    assert y.dtype == dtype and rel(y, yr) < TOL[dtype]


def test_rmsnorm_bad_inputs():
    with pytest.raises(ValueError, match="w"):
        rmsnorm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(torch.randn(2, 8), torch.randn(8), 1e-5, residual=torch.randn(2, 9))
    with pytest.raises(TypeError, match="dtype"):
        rmsnorm(torch.randn(2, 8).long(), torch.randn(8), 1e-5)


def llama3_tables(D, P, theta=500000.0, factor=8.0, low=1.0, high=4.0, orig=8192):
    """Llama 3 scaled rope tables (independent re-derivation for the test)."""
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    wavelen = 2 * math.pi / inv
    lo_wl, hi_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
    mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
    scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * scaled[None, :]
    return ang.cos().float(), ang.sin().float()


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 2, 3]),
       st.sampled_from([8, 12, 32]), DTYPES, st.integers(0, 2**16))
def test_rope_and_cache_write(B, T, Hkv, group, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    P = 40
    Hq = Hkv * group
    q, k, v = rand(B, T, Hq, D, dtype=dtype, g=g), rand(B, T, Hkv, D, dtype=dtype, g=g), rand(B, T, Hkv, D, dtype=dtype, g=g)
    pos = torch.stack([torch.randperm(P, generator=g)[:T] * 97 % P for _ in range(B)]).to(DEV)
    pos = (pos * 200) % 8000  # exercise long-wavelength (scaled) frequencies too
    cos, sin = llama3_tables(D, 8000)
    cos, sin = cos.to(DEV), sin.to(DEV)
    kc = torch.full((B + 1, Hkv, 8000, D), float("nan"), dtype=dtype, device=DEV)
    vc = kc.clone()
    kc_ref, vc_ref = kc.double(), vc.double()
    qo = rope(q, k, v, pos, cos, sin, kc, vc)
    qr = rope_ref(q.double(), k.double(), v.double(), pos, cos.double(), sin.double(), kc_ref, vc_ref)
    assert rel(qo, qr) < TOL[dtype]
    written = ~torch.isnan(kc_ref)
    assert torch.equal(written, ~torch.isnan(kc)) and torch.equal(written, ~torch.isnan(vc))
    assert rel(kc[written], kc_ref[written]) < TOL[dtype]
    assert torch.equal(vc[written], vc_ref[written].to(dtype))


def test_rope_bad_inputs():
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 1, 8)
    cos = torch.randn(4, 4)
    kc = torch.zeros(1, 1, 4, 8)
    pos = torch.zeros(1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, k, pos.int(), cos, cos, kc, kc)
    with pytest.raises(ValueError, match="cos"):
        rope(q, k, k, pos, cos[:, :3].contiguous(), cos, kc, kc)
    with pytest.raises(ValueError, match="cache"):
        rope(q, k, k, pos, cos, cos, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))


@given(st.integers(1, 8), st.integers(1, 20), st.integers(1, 70), st.integers(0, 30), DTYPES, st.integers(0, 2**16))
def test_embedding(M, Vl, D, start, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = rand(Vl, D, dtype=dtype, g=g)
    ids = torch.randint(0, start + Vl + 10, (M,), generator=g).to(DEV)
    out = embedding(ids, w, start)
    assert torch.equal(out, embedding_ref(ids, w, start))


def test_embedding_bad_inputs():
    with pytest.raises(TypeError, match="int64"):
        embedding(torch.zeros(3, dtype=torch.int32), torch.randn(4, 2))


@pytest.mark.gpu
def test_gpu_bf16_norm_rope_embedding():
    g = torch.Generator().manual_seed(1)
    x, w, r = (rand(7, 4096, dtype=torch.bfloat16, device="cuda", g=g) for _ in range(3))
    w = w[0]
    y, h = rmsnorm(x, w, 1e-5, residual=r)
    yr, hr = rmsnorm_ref(x.double(), w.double(), 1e-5, residual=r.double())
    assert rel(y, yr) < 1e-2 and rel(h, hr) < 1e-2
    B, T, Hq, Hkv, D = 4, 1, 16, 4, 128
    q, k, v = (rand(B, T, H, D, dtype=torch.bfloat16, device="cuda", g=g) for H in (Hq, Hkv, Hkv))
    cos, sin = (t.cuda() for t in llama3_tables(D, 4096))
    pos = torch.tensor([[5], [4000], [77], [1234]], device="cuda")
    kc = torch.full((B, Hkv, 4096, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    vc = kc.clone()
    kr, vr = kc.double(), vc.double()
    qo = rope(q, k, v, pos, cos, sin, kc, vc)
    qr = rope_ref(q.double(), k.double(), v.double(), pos, cos.double(), sin.double(), kr, vr)
    m = ~torch.isnan(kr)
    assert rel(qo, qr) < 1e-2 and rel(kc[m], kr[m]) < 1e-2 and torch.equal(m, ~torch.isnan(kc))
    wt = rand(1000, 4096, dtype=torch.bfloat16, device="cuda", g=g)
    ids = torch.randint(0, 3000, (9,), device="cuda")
    assert torch.equal(embedding(ids, wt, 1000), embedding_ref(ids, wt, 1000))
