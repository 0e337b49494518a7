"""sample: greedy (exact) and temperature + top-p (kept set, reproducibility, distribution)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlis.triton_kernels import sample, sample_ref, top_p_mask_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@given(st.integers(1, 4), st.integers(1, 5000), st.sampled_from([torch.float32, torch.float16]), st.integers(0, 2**16))
def test_greedy_is_argmax(B, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g).to(device=DEV, dtype=dtype)
    ids = sample(logits, 0.0, 1.0, None)
    assert ids.dtype == torch.int64 and torch.equal(ids, sample_ref(logits, 0.0, 1.0, None))


def test_greedy_ties_pick_lowest():
    logits = torch.zeros(2, 37, device=DEV) - 1.0
    logits[0, [5, 20]] = 3.0
    logits[1, [36, 0]] = 2.0
    assert sample(logits, 0.0, 1.0, 0).tolist() == [5, 0]


@given(st.integers(1, 3), st.integers(2, 600), st.floats(0.3, 1.5), st.floats(0.05, 0.95), st.integers(0, 2**16))
def test_top_p_samples_inside_kept_set(B, V, temp, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 3).to(DEV)
    ids = sample(logits, temp, top_p, seed, step=1)
    keep = top_p_mask_ref(logits, temp, top_p)
    assert keep.gather(1, ids[:, None]).all()
    assert torch.equal(ids, sample(logits, temp, top_p, seed, step=1))  # reproducible


def test_sampling_distribution_and_steps():
    logits = torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, -1.0]], device=DEV)
    n = 300
    rows = logits.expand(n, 6).contiguous()
    ids = sample(rows, 1.2, 1.0, 7, step=0)
    p = torch.softmax(logits[0].double() / 1.2, -1).cpu()
    freq = torch.bincount(ids.cpu(), minlength=6).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-9).all(), (freq, p)
    other = sample(rows, 1.2, 1.0, 7, step=1)
    assert not torch.equal(ids, other)  # a new step draws new noise


def test_sample_bad_inputs():
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.randn(1, 4), 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.randn(1, 4), -1.0, 0.5, 0)
    with pytest.raises(TypeError, match="dtype"):
        sample(torch.randn(1, 4).long(), 1.0, 0.5, 0)


@pytest.mark.gpu
def test_gpu_sampling_llama_vocab():
    logits = torch.randn(8, 128256, device="cuda", dtype=torch.bfloat16) * 4
    assert torch.equal(sample(logits, 0.0, 1.0, None), logits.float().argmax(-1))
    ids = sample(logits, 0.7, 0.9, 123, step=5)
    assert top_p_mask_ref(logits.float(), 0.7, 0.9).gather(1, ids[:, None]).all()
