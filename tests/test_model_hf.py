"""fusedlis' Llama matches Hugging Face transformers' LlamaForCausalLM on random checkpoints."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedlis
from tests._llama_helpers import make_hf_checkpoint

transformers = pytest.importorskip("transformers")


@st.composite
def llama_shapes(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))  # GQA 1..heads
    head_dim = draw(st.sampled_from([8, 12, 16]))
    # transformers wants hidden % heads == 0; head_dim is drawn apart, so often != hidden / heads
    hidden = heads * draw(st.sampled_from([4, 8, 12]))
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden,
                inter=draw(st.sampled_from([20, 36, 64])), layers=draw(st.integers(1, 3)),
                vocab=draw(st.sampled_from([67, 128, 301])), rope_scaling=draw(st.booleans()),
                tie=draw(st.booleans()), shard=draw(st.booleans()),
                B=draw(st.integers(1, 3)), T=draw(st.integers(1, 40)))


@settings(max_examples=8, deadline=None)
@given(s=llama_shapes(), seed=st.integers(0, 2**16))
def test_logits_match_transformers(tmp_path_factory, s, seed):
    path = tmp_path_factory.mktemp("ckpt")
    hf = make_hf_checkpoint(path, vocab=s["vocab"], hidden=s["hidden"], inter=s["inter"], layers=s["layers"],
                            heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                            rope_scaling=s["rope_scaling"], tie=s["tie"],
                            shard_bytes="4KB" if s["shard"] else None, seed=seed)
    if s["shard"] and sum(p.numel() * 4 for p in hf.parameters()) > 16_000:
        assert (path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, s["vocab"], (s["B"], s["T"]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits
    model = fusedlis.load_model(path)
    out = model(ids)
    assert out.shape == (s["B"], s["T"], s["vocab"]) and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_rope_scaling_matters(tmp_path):
    """Guard against the llama3 scaling being silently ignored: positions beyond the original context differ."""
    a = make_hf_checkpoint(tmp_path / "a", rope_scaling=True, seed=1)
    ids = torch.randint(0, 96, (1, 60))
    m = fusedlis.load_model(tmp_path / "a")
    from fusedlis.model.config import LlamaConfig

    unscaled = fusedlis.model.LlamaForCausalLM(m.config.replace(rope_scaling=None))
    unscaled.load_state_dict(m.state_dict())
    with torch.no_grad():
        ref = a(ids).logits
    assert (m(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (unscaled(ids) - ref).abs().max() > 1e-3 * ref.abs().max()
    assert isinstance(m.config, LlamaConfig)


def test_kv_cache_decode_matches_full_forward(tmp_path):
    make_hf_checkpoint(tmp_path, vocab=128, hidden=32, heads=4, kv_heads=2, layers=2, seed=3)
    model = fusedlis.load_model(tmp_path)
    B, T = 3, 24
    ids = torch.randint(0, 128, (B, T))
    full = model(ids)
    cache = fusedlis.model.KVCache.allocate(model.config, 1, B, 64, torch.float32, "cpu")
    # prefill a prefix of different length per call, then decode one token at a time
    P = 5
    pos = torch.arange(P).expand(B, P)
    outs = [model(ids[:, :P], pos, kv_cache=cache)]
    for t in range(P, T):
        outs.append(model(ids[:, t:t + 1], torch.full((B, 1), t), kv_cache=cache))
    inc = torch.cat(outs, dim=1)
    err = float((inc - full).double().norm() / full.double().norm())
    assert err <= 1e-5, err
    assert torch.equal(inc.argmax(-1), full.argmax(-1))


def test_engine_greedy_equals_full_forward_argmax(tmp_path):
    """Greedy decoding through the engine's cache gives the tokens a cache-free full forward picks."""
    make_hf_checkpoint(tmp_path, vocab=300, hidden=32, heads=4, kv_heads=1, layers=2, seed=5, std=0.5)
    eng = fusedlis.Engine.from_pretrained(tmp_path, device="cpu", max_batch_size=2, max_seq_len=64,
                                          progress=False)
    prompts = [[3, 17, 42, 9], [250, 1, 2, 3, 4, 5, 6]]
    res = eng.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    for p, r in zip(prompts, res):
        seq = list(p)
        for _ in range(12):
            seq.append(int(eng.model(torch.tensor([seq]))[0, -1].argmax()))
        assert r.token_ids == seq[len(p):]
        assert len(r.latencies_s) == 12 and all(t > 0 for t in r.latencies_s)


@pytest.mark.skipif(os.environ.get("FUSEDLIS_SKIP_SLOW") == "1", reason="slow")
def test_head_dim_not_hidden_over_heads_and_tied(tmp_path):
    hf = make_hf_checkpoint(tmp_path, hidden=24, heads=3, kv_heads=3, head_dim=20, tie=True, seed=7)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
    out = fusedlis.load_model(tmp_path)(ids)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
