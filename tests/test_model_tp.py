"""Tensor-parallel (gloo processes) logits equal the single-rank model's."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedlis
from fusedlis.model import LlamaConfig, random_hf_tensors, save_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, ckpt, ids, positions_split, out_q):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = fusedlis.load_model(ckpt, tp_rank=rank, tp_size=world)
        full = model(ids)
        # incremental decode through the KV cache, too
        cache = fusedlis.model.KVCache.allocate(model.config, world, ids.shape[0], 64, torch.float32, "cpu")
        P = positions_split
        outs = [model(ids[:, :P], kv_cache=cache)]
        for t in range(P, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], torch.full((ids.shape[0], 1), t), kv_cache=cache))
        out_q.put((rank, full.numpy(), torch.cat(outs, 1).numpy(), None))  # by value: no shared fds
        dist.destroy_process_group()
    except Exception:  # report instead of hanging the parent
        out_q.put((rank, None, None, traceback.format_exc()))


def _run_tp(ckpt, world, ids, split):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(ckpt), ids, split, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, full, inc, err = q.get(timeout=180)
            assert err is None, f"rank {rank} failed:\n{err}"
            results[rank] = (torch.from_numpy(full), torch.from_numpy(inc))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results


CONFIGS = [
    # vocab not divisible by tp (padding rows), GQA 2:1, llama3 rope, untied
    LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, head_dim=12, rope_theta=10000.0, max_position_embeddings=256,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # tied embeddings, MHA, no rope scaling
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, head_dim=8, rope_theta=10000.0, max_position_embeddings=256,
                tie_word_embeddings=True),
]


@pytest.mark.parametrize("cfg_i,world", [(0, 2), (0, 4), (1, 2)])
def test_tp_equals_single_rank(tmp_path, world, cfg_i):
    cfg = CONFIGS[cfg_i]
    seed = int(torch.randint(0, 2**16, (1,)))
    save_checkpoint(tmp_path, cfg, random_hf_tensors(cfg, seed=seed), max_shard_bytes=20_000)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    ref = fusedlis.load_model(tmp_path)(ids)
    results = _run_tp(tmp_path, world, ids, split=4)
    for rank, (full, inc) in results.items():
        for out in (full, inc):
            err = float((out - ref).double().norm() / ref.double().norm())
            assert err <= 1e-5, (rank, err)


class _TwinComm:
    """A 2-rank communicator whose peer holds the same partial sums: all_reduce doubles in place."""

    def __init__(self, fused: bool | None) -> None:
        self.fused, self.norm_calls = fused, 0

    def all_reduce(self, x):
        return x.mul_(2)

    def __getattr__(self, name):
        if name == "all_reduce_norm" and self.fused is not None:
            return self._all_reduce_norm
        raise AttributeError(name)

    def _all_reduce_norm(self, y, residual, weight, eps):
        if not self.fused:
            return None  # declines: the layer runs the unfused path
        self.norm_calls += 1
        h = 2 * y.double() + residual.double()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
        return normed.to(y.dtype), h.to(y.dtype)


@pytest.mark.parametrize("fused", [None, False, True])
def test_row_parallel_forward_norm_uses_comm_all_reduce_norm(fused):
    """forward_norm hands the residual add + RMSNorm to the communicator when it offers a fused kernel, and
    both paths give norm(all_reduce(x W^T) + residual), new residual."""
    from fusedlis.model.llama import RMSNorm
    from fusedlis.model.ops import TorchOps
    from fusedlis.model.parallel import RowParallelLinear, TPContext

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    comm = _TwinComm(fused)
    tp = TPContext(rank=0, size=2, comm=comm)
    lin = RowParallelLinear("w", 2 * 24, 40, tp, torch.float32, "cpu")
    norm = RMSNorm("n", 40, 1e-5, torch.float32, "cpu")
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 24, generator=g))
        norm.weight.copy_(torch.rand(40, generator=g) + 0.5)
    x = torch.randn(3, 1, 24, generator=g)
    res = torch.randn(3, 1, 40, generator=g)
    normed, new_res = lin.forward_norm(x, TorchOps(), res.clone(), norm)
    h = 2 * (x.double() @ lin.weight.double().T) + res.double()
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert normed.shape == (3, 1, 40) and new_res.shape == (3, 1, 40)
    assert ((normed.double() - ref).norm() / ref.norm()) < 1e-5
    assert ((new_res.double() - h).norm() / h.norm()) < 1e-5
    assert comm.norm_calls == (1 if fused else 0)
