"""Engine on one GPU: bf16 Triton kernels + CUDA graphs give the fp32 reference's greedy tokens."""

from __future__ import annotations

import pytest
import torch

import fusedlis
from fusedlis.model import LlamaConfig, random_hf_tensors, save_checkpoint
from tests.engine_check import check_against_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("which", ["tiny", "8b-shaped"])
def test_greedy_matches_fp32_reference(tmp_path, monkeypatch, which):
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path / "cache"))
    if which == "tiny":
        path = "tiny"
    else:  # Llama-3.1-8B layer shapes, 2 layers, smaller vocab to bound the checkpoint size
        cfg = LlamaConfig.preset("llama-3.1-8b").replace(num_hidden_layers=2, vocab_size=32000, name="8b-2l")
        path = save_checkpoint(tmp_path / "ckpt", cfg, random_hf_tensors(cfg, seed=1, dtype=torch.bfloat16))
    eng = fusedlis.Engine.from_pretrained(path, device="cuda", max_batch_size=4, max_seq_len=256, progress=False)
    assert eng.model.kernels == "triton" and eng.graphs, "GPU engine must use Triton kernels and CUDA graphs"
    ref = fusedlis.load_model(path, dtype=torch.float32, device="cuda")
    # the reference holds the engine's bf16 weights exactly
    ref.load_state_dict({k: v.float() for k, v in eng.model.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    V = eng.config.vocab_size
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 17, 1)]
    res = eng.generate(prompts, max_new_tokens=32, stop_at_eos=False)
    for p, r in zip(prompts, res):
        assert len(r.token_ids) == 32
        exact = check_against_reference(ref, p, r.token_ids)
        assert exact >= 24, f"only {exact}/32 tokens are the exact reference argmax"
