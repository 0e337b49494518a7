"""The model with Triton kernels (`kernels="triton"`) stays within tolerance of the torch reference."""

from __future__ import annotations

import pytest
import torch

import fusedlis
from fusedlis.model import KVCache, LlamaConfig, LlamaForCausalLM


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _cached_logits(model, ids, prefix):
    B, T = ids.shape
    cache = KVCache.allocate(model.config, model.tp.size, B, T + 4, model.dtype, ids.device)
    outs = [model(ids[:, :prefix], kv_cache=cache)]
    for t in range(prefix, T):
        outs.append(model(ids[:, t:t + 1], torch.full((B, 1), t, device=ids.device), kv_cache=cache))
    return torch.cat(outs, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter (CPU) test; the GPU test below covers CUDA")
@pytest.mark.parametrize("fuse_rope", ["0", "1"])
def test_tiny_triton_matches_torch_cpu(tmp_path, monkeypatch, fuse_rope):
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FUSEDLIS_FUSE_ROPE", fuse_rope)  # decode steps: rope inside decode_attention, or its own kernel
    model = fusedlis.load_model("tiny")
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    ref = model(ids).double()
    model.set_kernels("triton")
    assert model.kernels == "triton"
    assert _rel(model(ids), ref) <= 1e-5
    assert _rel(_cached_logits(model, ids, 4), ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_rope", ["0", "1"])
def test_8b_shaped_bf16_triton_vs_fp32_reference(monkeypatch, fuse_rope):
    """Llama-3.1-8B layer shapes (2 layers to bound time), random weights, bf16 Triton vs fp32 torch."""
    monkeypatch.setenv("FUSEDLIS_FUSE_ROPE", fuse_rope)
    cfg = LlamaConfig.preset("llama-3.1-8b").replace(num_hidden_layers=2)
    model = LlamaForCausalLM(cfg, dtype=torch.bfloat16, device="cuda", kernels="triton").init_random(0).eval()
    # the reference holds the same (bf16-representable) weights in fp32 and computes in fp32
    ref_model = LlamaForCausalLM(cfg, dtype=torch.float32, device="cuda").eval()
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (4, 12), device="cuda")
    with torch.no_grad():
        ref = ref_model(ids)
        for out in (model(ids), _cached_logits(model, ids, 5)):
            assert torch.isfinite(out).all()
            assert _rel(out, ref) <= 1e-2, _rel(out, ref)
