"""bench/fused.py's result files from synthetic rows (the measurement itself needs 2 GPUs)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import fused  # noqa: E402


def test_write_results_summary_and_picks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: (2, 28, 9))
    ws = types.SimpleNamespace(num_nodes=1, local_size=2, world_size=2)
    rows = [("8B_o", 2048, 4096, 1, "cublas+nccl", 15.0), ("8B_o", 2048, 4096, 1, "fused_auto", 10.0),
            ("8B_o", 2048, 4096, 1, "fusedlis_linear+fusedlis_ar", 12.0),
            ("8B_o", 2048, 4096, 1, "fused_auto+res+norm", 11.5)]
    tune = [("8B_o", 2048, 4096, 1, '{"BLOCK_C": 128}', 9.0, 9.5, 0),
            ("8B_o", 2048, 4096, 1, '{"BLOCK_C": 512}', 10.0, 10.4, 1)]
    fused.write_results(rows, str(tmp_path), ws, "3.x", tune)
    summary = next(tmp_path.glob("*_summary.txt")).read_text().splitlines()
    # which unfused pairs the "best unfused" column chose from, then the speedups
    assert "cublas+nccl, fusedlis_linear+fusedlis_ar" in summary[1]
    assert summary[3].split()[:6] == ["8B_o", "1", "10.00", "15.00", "fusedlis_linear+fusedlis_ar:12.00", "1.50"]
    assert summary[3].split()[7] == "+1.50"  # norm extra
    assert any(line.startswith("8B_o+norm 1 ") for line in summary)
    picks = json.loads(next(tmp_path.glob("*_picks.json")).read_text())["Fake GPU"]
    assert picks == {"N=4096,K=2048,M=1,local=2": {"BLOCK_C": 128}, "N=4096,K=2048,M=1,local=2,norm=1": {"BLOCK_C": 512}}
