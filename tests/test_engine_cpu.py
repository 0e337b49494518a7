"""Engine on CPU: the generate API, sampling, errors, the embedded tiny model and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedlis
from fusedlis.cli import main
from fusedlis.sampling import sample
from fusedlis.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import os

    os.environ["FUSEDLIS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return fusedlis.Engine.from_pretrained("tiny", device="cpu", max_batch_size=4, max_seq_len=128,
                                           progress=False)


def test_tiny_written_as_hf_checkpoint(engine):
    from fusedlis.model import ensure_tiny_checkpoint

    p = ensure_tiny_checkpoint()
    assert (p / "config.json").exists() and (p / "model.safetensors").exists()
    assert engine.config.rope_scaling["rope_type"] == "llama3"
    assert engine.config.num_key_value_heads < engine.config.num_attention_heads


def test_generate_strings_and_ids(engine):
    res = engine.generate(["Hello", "a longer prompt here"], max_new_tokens=6, stop_at_eos=False)
    assert [len(r.token_ids) for r in res] == [6, 6]
    assert all(isinstance(r.text, str) for r in res)
    assert res[0].prompt_tokens == 1 + len("Hello")  # BOS + bytes
    ids = engine.generate([[1, 2, 3]], max_new_tokens=4, stop_at_eos=False)[0]
    assert len(ids.latencies_s) == 4


def test_batched_equals_single(engine):
    """A prompt's greedy continuation does not depend on what else is in the batch."""
    a = engine.generate([[5, 6, 7]], max_new_tokens=8, stop_at_eos=False)[0].token_ids
    b = engine.generate([[9] * 11, [5, 6, 7]], max_new_tokens=8, stop_at_eos=False)[1].token_ids
    assert a == b


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_batched_prefill_equals_one_prompt_at_a_time(engine, lengths, seed):
    """Right-padded batched prefill: every prompt's last-token logits and its KV-cache rows at its own positions
    are those of prefilling it alone (fp32)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, engine.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    alone = []
    for b, ids in enumerate(seqs):
        alone.append((engine._prefill(b, [ids])[0].clone(),
                      [(k[b, :, :len(ids)].clone(), v[b, :, :len(ids)].clone())
                       for k, v in zip(engine.cache.k, engine.cache.v)]))
    for k, v in zip(engine.cache.k, engine.cache.v):  # poison: the batched run must rewrite every real position
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    together = engine._prefill(0, seqs)

    def rel(a, b):  # fp32 GEMMs of a different row count round differently: a relative bound, not equality
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for b, (ids, (logits, kv)) in enumerate(zip(seqs, alone)):
        assert rel(together[b], logits) <= 1e-5, b
        for (k, v), (k1, v1) in zip(zip(engine.cache.k, engine.cache.v), kv):
            assert rel(k[b, :, :len(ids)], k1) <= 1e-5 and rel(v[b, :, :len(ids)], v1) <= 1e-5, b


def test_prefill_groups():
    from fusedlis.engine import _prefill_groups

    assert _prefill_groups([3, 5, 100, 2], 12) == [(0, 2), (2, 3), (3, 4)]
    assert _prefill_groups([4] * 6, 12) == [(0, 3), (3, 6)]
    assert _prefill_groups([], 12) == []
    for lengths in ([1], [7, 7, 7], [20, 1, 1, 1], [1, 1, 1, 20]):
        groups = _prefill_groups(lengths, 8)
        assert [lo for lo, _ in groups] == [0] + [hi for _, hi in groups[:-1]] and groups[-1][1] == len(lengths)
        assert all(hi - lo == 1 or max(lengths[lo:hi]) * (hi - lo) <= 8 for lo, hi in groups)


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, stop_at_eos=False)
    r1 = engine.generate([[1, 2]], seed=123, **kw)[0].token_ids
    r2 = engine.generate([[1, 2]], seed=123, **kw)[0].token_ids
    assert r1 == r2


@pytest.mark.parametrize("kw,msg", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 9999]]), "outside"),
    (dict(prompts="Hello"), "list of strings"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1]], top_p=0.0), "top_p"),
    (dict(prompts=[[1]] * 5), "max_batch_size"),
    (dict(prompts=[[1] * 120], max_new_tokens=20), "max_seq_len"),
])
def test_generate_errors(engine, kw, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        engine.generate(**kw)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 4), V=st.integers(2, 300), top_p=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_sample_respects_top_p(B, V, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    ids = sample(logits, 1.0, top_p, g)
    probs = torch.softmax(logits, -1)
    for b in range(B):
        p = probs[b, ids[b]]
        mass_before = probs[b][probs[b] > p].sum()  # probability of strictly more likely tokens
        assert mass_before < top_p + 1e-6
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer(512, bos_token_id=256, eos_token_ids=(257,))
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids[0] == 256 and tok.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        ByteTokenizer(100)


def test_cli_generate(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path))
    assert main(["generate", "--model", "tiny", "--prompt", "Hello", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "time to first token" in out and "ms/token" in out and "tiny" in out


def test_time_decode(engine):
    ms = engine.time_decode(2, 10, steps=4, warmup=1)
    assert len(ms) == 4 and all(t > 0 for t in ms)
    for kw, msg in (({"batch": 5, "context": 10}, "max_batch_size"), ({"batch": 1, "context": 126}, "max_seq_len"),
                    ({"batch": 1, "context": 0}, "max_seq_len")):
        with pytest.raises(ValueError, match=msg):
            engine.time_decode(kw["batch"], kw["context"], steps=3, warmup=0)


def test_cli_bench(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path))
    out_csv = tmp_path / "b.csv"
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--batch", "1,3", "--context", "5,20", "--steps", "2",
                 "--csv", str(out_csv)]) == 0
    assert "ms_per_token" in capsys.readouterr().out
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("model,tp,allreduce,batch,context") and len(rows) == 1 + 4
    assert all(float(r.split(",")[6]) > 0 for r in rows[1:])
    with pytest.raises(SystemExit):
        main(["bench", "--batch", "0"])
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--allreduce", "bogus", "--steps", "1"]) == 1
    assert "allreduce must be one of" in capsys.readouterr().err


def test_cli_errors_are_clean(capsys):
    assert main(["generate", "--model", "/nonexistent/dir", "--device", "cpu"]) == 1
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "NVSHMEM" in out and "topology" in out


@pytest.mark.parametrize("cmd", [[], ["generate"], ["bench"], ["info"], ["tune"], ["predict"], ["calibrate"]])
def test_help_everywhere(cmd):
    r = subprocess.run([sys.executable, "-m", "fusedlis", *cmd, "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "unavailable" not in r.stdout


def test_fused_mode_across_hosts(monkeypatch):
    """allreduce='fused' on ranks of several hosts: without NVSHMEM no fused hook and a warning (the row-parallel
    layers keep the communicator); with NVSHMEM an NVSHMEM workspace whose inter-node rounds are puts. On one host
    the hook uses torch symmetric memory unless FUSEDLIS_FUSED_TRANSPORT=put."""
    import importlib

    import fusedlis.comm.symmetric as symmetric
    import fusedlis.engine as eng

    class Model:
        class config:
            hidden_size = 64

    built = []

    class FakeWS:
        @staticmethod
        def from_torch_symm(max_m, hidden):
            built.append(("torch", max_m, hidden))
            return "ws-torch"

        @staticmethod
        def from_symmetric(sw, max_m, hidden, transport):
            built.append(("nvshmem", max_m, hidden, transport, sw.provider))
            return "ws-nvshmem"

    class FakeSymmetric:
        def __init__(self, nbytes, flag_words, topology, provider):
            assert nbytes > 0 and topology.world_size == 4
            self.provider = provider

    la = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")
    comm = importlib.import_module("fusedlis.comm")
    # the real sizing and carving, on the fake symmetric workspace and the fake from_symmetric
    FakeWS.from_nvshmem = classmethod(la.FusedAllReduceWorkspace.from_nvshmem.__func__)
    monkeypatch.setattr(la, "FusedAllReduceWorkspace", FakeWS)
    monkeypatch.setattr(comm, "SymmetricWorkspace", FakeSymmetric)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda *a: 4)
    monkeypatch.delenv("FUSEDLIS_FUSED_TRANSPORT", raising=False)
    monkeypatch.setenv("FUSEDLIS_GPUS_PER_NODE", "2")

    monkeypatch.setattr(eng, "_hosts", lambda: ["node-a", "node-a", "node-b", "node-b"])
    monkeypatch.setattr(symmetric, "nvshmem_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="across 2 hosts needs NVSHMEM"):
        assert eng._fused_row_linear(Model(), 8) is None
    assert built == []
    monkeypatch.setattr(symmetric, "nvshmem_available", lambda: True)
    hook = eng._fused_row_linear(Model(), 8)
    assert hook.workspace == "ws-nvshmem" and built == [("nvshmem", 8, 64, "auto", "nvshmem")]

    built.clear()
    monkeypatch.setattr(eng, "_hosts", lambda: ["node-a"] * 4)
    assert eng._fused_row_linear(Model(), 8).workspace == "ws-torch" and built == [("torch", 8, 64)]
    monkeypatch.setenv("FUSEDLIS_FUSED_TRANSPORT", "put")
    assert eng._fused_row_linear(Model(), 8).workspace == "ws-nvshmem" and built[-1][3] == "put"
    monkeypatch.setattr(symmetric, "nvshmem_available", lambda: False)
    with pytest.raises(RuntimeError, match="FUSEDLIS_FUSED_TRANSPORT=put needs NVSHMEM"):
        eng._fused_row_linear(Model(), 8)


def test_fused_hook_declines_where_unfused_measured_faster(monkeypatch):
    """The fused-mode hook runs the kernel, except for shapes the measured table marks as faster unfused: then it
    returns None and the layer runs the plain GEMM + the communicator's all-reduce (as allreduce='auto')."""
    import importlib

    import fusedlis.engine as eng

    la = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")

    class WS:
        local_size = 2

        @staticmethod
        def from_torch_symm(max_m, hidden):
            return WS()

    calls = []
    monkeypatch.setattr(la, "FusedAllReduceWorkspace", WS)
    monkeypatch.setattr(la, "linear_allreduce", lambda x, w, ws, **kw: calls.append(x.shape[0]) or "fused")
    monkeypatch.setattr(la, "unfused_measured_faster", lambda M, N, K, local, dt, dev, norm=False: M > 32 and norm)
    monkeypatch.setattr(eng, "_hosts", lambda: ["node-a"] * 2)

    class Model:
        class config:
            hidden_size = 16

    hook = eng._fused_row_linear(Model(), 64)
    w, res, nw = torch.randn(16, 8), torch.randn(40, 16), torch.randn(16)
    assert hook(torch.randn(8, 8), w, res[:8], nw) == "fused"
    assert hook(torch.randn(40, 8), w, res, nw) is None  # measured faster unfused
    assert hook(torch.randn(40, 8), w) == "fused"  # no norm: not marked
    assert hook(torch.randn(65, 8), w) is None  # beyond the workspace
    assert calls == [8, 40]
