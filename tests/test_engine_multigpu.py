"""TP=2 engine on two GPUs (1 node x 2 and 2 logical nodes x 1) with every allreduce mode; TP=4 on four GPUs
(also 2 logical nodes x 2) where four exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedlis.model import LlamaConfig, random_hf_tensors, save_checkpoint

pytestmark = pytest.mark.multigpu


def _run_engine_modes(tmp_path, world: int) -> list[dict]:
    cfg = LlamaConfig.preset("llama-3.1-8b").replace(num_hidden_layers=2, vocab_size=32000, name="8b-2l")
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, random_hf_tensors(cfg, seed=2, dtype=torch.bfloat16))
    out = tmp_path / "res.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    worker = os.path.join(os.path.dirname(__file__), "gpu", "engine_tp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), worker,
                        str(ckpt), str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    if os.environ.get("FUSEDLIS_ARTIFACT_DIR"):  # keep the per-mode numbers of a device run
        (Path(os.environ["FUSEDLIS_ARTIFACT_DIR"]) / f"engine_tp{world}_modes.json").write_text(
            json.dumps(res, indent=1))
    return res


def test_tp4_engine_all_allreduce_modes(tmp_path):
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    res = _run_engine_modes(tmp_path, 4)
    assert {(e["allreduce"], e["gpus_per_node"]) for e in res} >= {("nvrar", 2), ("fused", 2), ("auto", 2)}
    for e in res:
        assert e["ok"], e
        assert min(e["exact"]) >= 24, e


def test_tp2_engine_all_allreduce_modes(tmp_path):
    res = _run_engine_modes(tmp_path, 2)
    assert {e["allreduce"] for e in res} >= {"nccl", "auto", "nvrar", "fused"}
    from fusedlis.comm.symmetric import nvshmem_available

    if nvshmem_available():  # the fused kernel's cross-host transport (NVSHMEM puts), over NVLink here
        put = [e for e in res if e["allreduce"] == "fused" and e.get("transport") == "put"]
        assert put and all(e["fused_transport"] == "put" for e in put), put
    for e in res:
        assert e["ok"], e
        assert min(e["exact"]) >= 24, e
