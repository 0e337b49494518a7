"""The kernel problems a model produces per tensor-parallel rank during decode.

Shapes follow the model's layers (fusedlis.model): column-parallel qkv and gate_up (SwiGLU, merged
``[gate; up]``), row-parallel o and down, the vocabulary-parallel LM head, and decode attention over a
cache of ``max_seq_len`` rows. Keys are built exactly as the launchers build them, so what the tuner
writes is what `lookup` is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

LINEAR_LAYERS = ("qkv", "o", "gate_up", "down", "lm_head")
# CLI op name -> kernel op name used by lookup and by fusedlis.triton_kernels.<module>.
OP_MODULES = {"linear": "linear", "attention": "decode_attention", "allreduce": "allreduce",
              "fused": "linear_allreduce"}


@dataclass
class Problem:
    """One tuning problem: a kernel op at one shape key, with where it comes from."""

    op: str  # kernel op name: "linear", "decode_attention", ...
    layer: str  # qkv / o / gate_up / down / lm_head / attention / ...
    key: dict[str, Any]  # the launcher's lookup key
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        k = self.key
        if self.op == "linear":
            return f"{self.layer} M={k['M']} K={k['K']} N={k['N']}"
        if self.op == "decode_attention":
            return f"attn B={k['B']} Hq={k['Hq']} Hkv={k['Hkv']} S={k['S']}"
        if self.op == "allreduce":
            return f"allreduce M={self.meta.get('batch', '?')} {k['nbytes']} B w={k['world_size']} {k['topology']}"
        if self.op == "linear_allreduce":
            return f"fused {self.layer} M={k['M']} K={k['K']} N={k['N']} local={k['local']}"
        return f"{self.layer} " + " ".join(f"{a}={b}" for a, b in k.items() if a != "dtype")


def load_config(model: str):
    """A `LlamaConfig` from a preset name (``llama-3.1-8b``) or a Hugging Face config.json / model folder."""
    from pathlib import Path

    from fusedlis.model.config import LlamaConfig

    p = Path(model).expanduser()
    if p.exists():
        return LlamaConfig.from_hf(p / "config.json" if p.is_dir() else p)
    return LlamaConfig.preset(model)


def kernel_module(op: str):
    """``fusedlis.triton_kernels.<op module>`` or None if that kernel does not exist (yet)."""
    name = OP_MODULES.get(op, op)
    try:
        return importlib.import_module(f"fusedlis.triton_kernels.{name}")
    except ImportError:
        return None


def _lm_head_rows(cfg, tp: int) -> int:
    # Same padding as fusedlis.model.parallel's vocabulary split: ceil(vocab / tp) rows on every rank.
    return -(-cfg.vocab_size // tp)


def _linear_key(M: int, N: int, K: int, dtype: torch.dtype, activation: str | None) -> dict[str, Any]:
    mod = kernel_module("linear")
    if mod is not None and hasattr(mod, "linear_key"):
        return mod.linear_key(M, N, K, dtype, activation, False)
    return {"M": M, "N": N, "K": K, "dtype": dtype, "activation": activation or "none", "residual": False}


def _attention_key(B: int, Hq: int, Hkv: int, D: int, S: int, dtype: torch.dtype) -> dict[str, Any]:
    mod = kernel_module("attention")
    if mod is not None and hasattr(mod, "decode_attention_key"):
        return mod.decode_attention_key(B, Hq, Hkv, D, S, dtype)
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "S": S, "dtype": dtype}


def model_problems(
    cfg: Any,
    tp: int,
    batches: Sequence[int],
    ops: Sequence[str] = ("linear", "attention"),
    *,
    dtype: torch.dtype = torch.bfloat16,
    seq_lens: Sequence[int] = (4096,),
    layers: Sequence[str] = LINEAR_LAYERS,
    model_name: str | None = None,
    gpus_per_node: int | None = None,
) -> list[Problem]:
    """Every (op, shape) one TP rank of `cfg` runs at the given decode batch sizes.

    `cfg` needs hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim and
    vocab_size. ``allreduce`` gives one message per batch size (``M x hidden`` activations, what the
    row-parallel o / down projections reduce), keyed with the world size (= `tp`) and the topology
    ``<nodes>x<gpus_per_node>`` (`gpus_per_node` default: as `fusedlis.comm.Topology` reads it).
    ``fused`` gives the row-parallel layers among `layers` (o, down) as fused GEMM + all-reduce problems,
    keyed as `linear_allreduce_config` asks (``local`` = GPUs per node); only for ``tp > 1``.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    if not batches or any(int(b) < 1 for b in batches):
        raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
    bad = [x for x in layers if x not in LINEAR_LAYERS]
    if bad:
        raise ValueError(f"unknown layers {bad}; choose from {list(LINEAR_LAYERS)}")
    if hasattr(cfg, "validate_tp"):
        cfg.validate_tp(tp)
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    for what, n in (("num_attention_heads", H), ("num_key_value_heads", Hkv), ("intermediate_size", inter)):
        if n % tp:
            raise ValueError(f"tp={tp} does not divide {what} ({n})")
    shapes = {
        "qkv": ((H + 2 * Hkv) * D // tp, hidden, None),
        "o": (hidden, H * D // tp, None),
        "gate_up": (2 * inter // tp, hidden, "swiglu"),
        "down": (hidden, inter // tp, None),
        "lm_head": (_lm_head_rows(cfg, tp), hidden, None),
    }
    name = model_name or getattr(cfg, "name", "custom")
    out: list[Problem] = []
    for op in ops:
        if op == "linear":
            for layer in layers:
                N, K, act = shapes[layer]
                for M in batches:
                    out.append(Problem("linear", layer, _linear_key(int(M), N, K, dtype, act),
                                       {"model": name, "tp": tp, "batch": int(M), "layer": layer}))
        elif op == "allreduce" and tp > 1:
            from fusedlis.comm.topology import Topology

            topo = Topology(tp, gpus_per_node)
            sizes = [int(M) * hidden * dtype.itemsize for M in batches]
            for M, nbytes in zip(batches, sizes):
                out.append(Problem("allreduce", "allreduce",
                                   {"nbytes": nbytes, "dtype": dtype, "world_size": tp,
                                    "topology": f"{topo.num_nodes}x{topo.gpus_per_node}"},
                                   {"model": name, "tp": tp, "batch": int(M), "layer": "allreduce",
                                    "max_bytes": max(sizes)}))
        elif op == "fused" and tp > 1:
            from fusedlis.comm.topology import Topology
            from fusedlis.tuning.fused import fused_key

            local = Topology(tp, gpus_per_node).gpus_per_node
            rows = [x for x in ("o", "down") if x in layers]
            max_n = max((shapes[x][0] for x in rows), default=0)
            for layer in rows:
                N, K, _ = shapes[layer]
                for M in batches:
                    out.append(Problem("linear_allreduce", layer, fused_key(int(M), N, K, dtype, local),
                                       {"model": name, "tp": tp, "batch": int(M), "layer": layer,
                                        "max_m": max(int(b) for b in batches), "max_n": max_n}))
        elif op == "attention":
            for S in seq_lens:
                for B in batches:
                    out.append(Problem("decode_attention", "attention",
                                       _attention_key(int(B), H // tp, Hkv // tp, D, int(S), dtype),
                                       {"model": name, "tp": tp, "batch": int(B), "layer": "attention"}))
    return out
