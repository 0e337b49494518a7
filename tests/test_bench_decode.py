"""bench/decode.py on CPU: arguments, result files from synthetic rows, the sparse transformers checkpoint, and
the whole run (fusedlis torch path + transformers, TP=2 over gloo) at tiny size."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import decode  # noqa: E402

from fusedlis.model import LlamaConfig  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(system: str, batch: int, ctx: int, ms: float, tp: int = 2, model: str = "llama-3.1-8b",
         floor: float = 1.75) -> dict:
    return decode.make_row(model, tp, system, batch, ctx, 100, ms, floor)


def test_help_runs():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--hf" in r.stdout and "--summarize" in r.stdout


def test_parse_args():
    a = decode.parse_args(["--models", "llama-3.1-8b,llama-3.1-70b", "--modes", "none", "--hf", "--steps", "7"])
    assert a.mode_list == [] and a.ref_steps == 7 and a.hf_compile == "reduce-overhead"
    assert a.tag == "8b+70b-hf"
    a = decode.parse_args(["--hf-compile", "none", "--ref-steps", "3"])
    assert a.hf_compile is None and a.ref_steps == 3 and a.batches == [1, 8, 32, 64] and a.contexts == [512, 4096]
    with pytest.raises(SystemExit):
        decode.parse_args(["--modes", "bogus"])


def test_variants():
    v = decode.fusedlis_variants(["torch", "nccl", "nvrar", "fused"], 1, [1, 2])
    assert [x[1] for x in v] == ["torch-eager-nccl", "fusedlis-nccl"]
    v = decode.fusedlis_variants(["nccl", "nvrar", "fused"], 2, [1, 2])
    assert v == [("nccl", "fusedlis-nccl", None), ("nvrar", "fusedlis-nvrar-1node", "2"),
                 ("nvrar", "fusedlis-nvrar-2node", "1"), ("fused", "fusedlis-fused", None)]
    # "-rope": the same engine with rope fused into decode attention
    assert decode.fusedlis_variants(["fused-rope", "nvrar-rope"], 2, [2]) == [
        ("fused-rope", "fusedlis-fused-rope", None), ("nvrar-rope", "fusedlis-nvrar-2node-rope", "1")]
    assert decode.fusedlis_variants(["fused-rope"], 1, [1]) == []
    with pytest.raises(SystemExit):
        decode.parse_args(["--modes", "torch-rope"])
    # suffixes combine; each engine is built with every switch set, on or off
    assert decode.split_variant("fused-rope-lpdl") == ("fused", "-rope-lpdl")
    assert decode.parse_args(["--modes", "nccl-lpdl,auto-unfusednorm-rope"]).mode_list == [
        "nccl-lpdl", "auto-unfusednorm-rope"]
    assert decode.experiment_env("nccl") == {"FUSEDLIS_FUSE_ROPE": "1", "FUSEDLIS_LINEAR_PDL": "",
                                             "FUSEDLIS_FUSED_PDL": "0", "FUSEDLIS_ATTN_ONE_LAUNCH": "0",
                                             "FUSEDLIS_ATTN_MAX_SPLITS": "", "FUSEDLIS_FUSED_TRANSPORT": "auto",
                                             "FUSEDLIS_LINEAR_ROWS": "1"}
    # "-ln": one GPU per logical node; absent, the mode's own split is left alone (no FUSEDLIS_GPUS_PER_NODE)
    assert decode.split_variant("fused-ln-put") == ("fused", "-ln-put")
    assert decode.experiment_env("fused-ln-put")["FUSEDLIS_GPUS_PER_NODE"] == "1"
    assert decode.experiment_env("fused-ln-put")["FUSEDLIS_FUSED_TRANSPORT"] == "put"
    assert "FUSEDLIS_GPUS_PER_NODE" not in decode.experiment_env("fused-put")
    # rope inside attention is the default; "-norope" is the A/B against the rope kernel
    assert decode.split_variant("fused-norope-lpdl") == ("fused", "-norope-lpdl")
    assert decode.experiment_env("fused-norope-lpdl")["FUSEDLIS_FUSE_ROPE"] == "0"
    assert decode.experiment_env("fused-ared")["FUSEDLIS_ATTN_ONE_LAUNCH"] == "1"
    assert decode.experiment_env("fused-avec")["FUSEDLIS_ATTN_ONE_LAUNCH"] == "vec"
    assert decode.split_variant("fused-fpdl-rope") == ("fused", "-fpdl-rope")
    assert decode.experiment_env("fused-fpdl")["FUSEDLIS_FUSED_PDL"] == "1,pf=4"
    assert decode.experiment_env("nccl-lpdl-rope")["FUSEDLIS_FUSE_ROPE"] == "1"
    assert decode.experiment_env("nccl-lpdl")["FUSEDLIS_LINEAR_PDL"]


def test_memory_plan_70b_fits_h200():
    cfg = LlamaConfig.preset("llama-3.1-70b")
    w = decode.weight_bytes_per_gpu(cfg, 2)
    kv = decode.kv_bytes_per_gpu(cfg, 2, 64, 4096 + decode.WARMUP + 30 + 8)
    assert 69e9 < w < 71e9  # bf16, embedding table excluded
    assert w + kv < 125e9  # leaves > 15 GB of a 141 GB H200 for graphs, activations and NVSHMEM
    assert abs(decode.weight_bytes_per_gpu(LlamaConfig.preset("llama-3.1-8b"), 2) / 4.3e12 - 1.75e-3) < 0.05e-3


def test_summary_and_files_from_synthetic_rows(tmp_path):
    meta = "# device=NVIDIA-H200 gpus=2 torch=x triton=y transformers=z date=2026-11-22T10:00 hbm_read_TBps=4.300"
    a = [_row("torch-eager-nccl", 1, 512, 60.0), _row("fusedlis-nccl", 1, 512, 4.6), _row("fusedlis-fused", 1, 512, 4.0),
         _row("fusedlis-nccl", 8, 512, 5.0), _row("fusedlis-fused", 8, 512, 5.5)]
    b = [_row("hf-tp2-compiled", 1, 512, 12.0), _row("hf-tp2-compiled", 8, 512, 20.0)]
    decode.save_csv(tmp_path / "decode_tp2_8b_x.csv", a, meta)
    decode.save_csv(tmp_path / "decode_tp2_8b-hf_x.csv", b, meta)
    bd = [dict(model="llama-3.1-8b", tp=2, system="fusedlis-nccl", batch=1, context=512, **{"all-reduce": 0.4,
               "attention": 0.3, "GEMM": 2.9, "other": 0.2})]
    decode.save_csv(tmp_path / "decode_breakdown_tp2_8b_x.csv", bd)
    rows, m = decode.read_csv(tmp_path / "decode_tp2_8b_x.csv")
    assert m == [meta] and rows[0]["batch"] == 1 and rows[0]["ms_per_token"] == 60.0 and rows[0]["steps"] == 100
    out = tmp_path / "out"
    assert decode.main(["--summarize", str(tmp_path / "*.csv"), "--out", str(out)]) == 0
    stem = out / "decode_all_NVIDIA-H200_2026-11-22"
    text = Path(str(stem) + "_summary.txt").read_text()
    assert "hbm_read_TBps=4.300" in text
    line = next(ln for ln in text.splitlines() if ln.split()[:4] == ["8b", "2", "1", "512"])
    # best fusedlis = fused 4.0 ms: 2.29x floor, fused/nccl 4.6/4.0 = 1.15, HF 12.0/4.0 = 3.0
    assert line.split()[-5:] == ["1.750", "fused", "2.29", "1.15", "3.0"]
    line8 = next(ln for ln in text.splitlines() if ln.split()[:4] == ["8b", "2", "8", "512"])
    assert line8.split()[-5:] == ["1.750", "nccl", "2.86", "0.91", "4.0"]
    assert "worst 3.0x" in text and "fused/nccl 1.15" in text
    merged, _ = decode.read_csv(str(stem) + ".csv")
    assert len(merged) == len(a) + len(b)
    if importlib.util.find_spec("matplotlib"):
        assert Path(str(stem) + ".png").stat().st_size > 1000
        assert (out / "decode_breakdown_all_NVIDIA-H200_2026-11-22.png").exists()
    assert (out / "decode_breakdown_all_NVIDIA-H200_2026-11-22.csv").exists()


def test_sparse_checkpoint_is_sparse_and_zero(tmp_path):
    from safetensors import safe_open

    cfg = LlamaConfig.preset("llama-3.1-8b").replace(num_hidden_layers=2)  # 2.9 GB apparent size
    p = decode.write_sparse_hf_checkpoint(cfg, tmp_path / "ck")
    st = p / "model.safetensors"
    with open(st, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    assert st.stat().st_size == 8 + header_len + 2 * cfg.num_parameters()
    assert st.stat().st_blocks * 512 < 1 << 20
    with safe_open(str(st), "pt") as f:
        assert len(list(f.keys())) == 2 + 9 * cfg.num_hidden_layers + 1
        s = f.get_slice("model.layers.1.mlp.down_proj.weight")
        assert s.get_shape() == [4096, 14336]
        assert not s[-2:, -8:].any()
    assert decode.write_sparse_hf_checkpoint(cfg, tmp_path / "ck") == p  # reused


def test_hf_tp1_cpu(tmp_path):
    pytest.importorskip("transformers")
    cfg = LlamaConfig.preset("tiny")
    model = decode.load_hf_model(decode.write_sparse_hf_checkpoint(cfg, tmp_path / "ck"), 1, torch.device("cpu"))
    decode.randomize_hf_(model)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and w.float().std() > 0.01
    seen = []
    res = decode.time_hf(model, decode.hf_forward(model, None), [1, 2], [8, 16], 2, torch.device("cpu"),
                         on_result=lambda b, c, ms: seen.append((b, c)))
    assert sorted(res) == [(1, 8), (1, 16), (2, 8), (2, 16)] == sorted(seen)
    assert all(v > 0 for v in res.values())


def test_end_to_end_tp2_gloo(tmp_path):
    """Two CPU ranks over gloo: fusedlis torch path, and transformers with tp_plan='auto' where accelerate is
    installed (transformers needs it for a tp_plan)."""
    hf = importlib.util.find_spec("transformers") and importlib.util.find_spec("accelerate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "bench" / "decode.py"), "--device", "cpu", "--models", "tiny", "--modes", "torch",
           "--batch", "1,2", "--context", "8,16", "--steps", "2", "--out", str(tmp_path / "res"),
           "--hf-ckpt-dir", str(tmp_path / "ck"), "--hf-compile", "none"] + (["--hf"] if hf else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    csvs = list((tmp_path / "res").glob("decode_tp2_tiny_*.csv"))
    assert len(csvs) == 1
    rows, meta = decode.read_csv(csvs[0])
    systems = {x["system"] for x in rows}
    assert "torch-eager-nccl" in systems and ("hf-tp2-eager" in systems) == bool(hf)
    assert len(rows) == 4 * len(systems) and "gpus=2" in meta[0]


def test_breakdown_counts_only_the_profiled_steps():
    """The profiler's events reach the breakdown (they once came back all zeros) and the two warm-up steps
    under the schedule are not counted: one matmul per step shows up as 1 call per step."""
    from types import SimpleNamespace

    class FakeEngine:
        device = torch.device("cpu")
        config = SimpleNamespace(vocab_size=100)

        def __init__(self):
            self.a, self.b, self.calls = torch.randn(64, 64), torch.randn(64, 64), 0

        def _decode(self, tokens, lens):
            self.calls += 1
            return torch.mm(self.a, self.b)

    eng, top = FakeEngine(), []
    out = decode.breakdown(eng, batch=2, context=8, steps=5, top=top)
    assert eng.calls == 1 + 2 + 5  # one before profiling, two warm-up steps, five counted
    assert sum(out.values()) > 0
    mm = [r for r in top if r[0] == "aten::mm"]
    assert mm and mm[0][2] == pytest.approx(1.0)


def test_rounds_alternate_modes(tmp_path):
    """--rounds 3: every mode's engine stays built, each (batch, context) is timed 3 times per mode, and the row
    holds the median of its round times."""
    import statistics

    cmd = [sys.executable, str(ROOT / "bench" / "decode.py"), "--device", "cpu", "--models", "tiny", "--modes",
           "torch,nccl", "--batch", "1,2", "--context", "8", "--steps", "2", "--rounds", "3", "--out",
           str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows, _ = decode.read_csv(next(tmp_path.glob("decode_tp1_tiny_*.csv")))
    assert sorted((x["system"], x["batch"]) for x in rows) == [
        ("fusedlis-nccl", 1), ("fusedlis-nccl", 2), ("torch-eager-nccl", 1), ("torch-eager-nccl", 2)]
    for x in rows:
        rounds = [float(t) for t in x["round_ms"].split(";")]
        assert len(rounds) == 3 and x["ms_per_token"] == pytest.approx(statistics.median(rounds), abs=1e-4)
    with pytest.raises(SystemExit):
        decode.parse_args(["--rounds", "0"])
