"""Tensor-parallel layers: the only place that knows the model is split across ranks.

Column-parallel layers split output features (no communication); row-parallel layers split input features
and all-reduce their output through the TP context's communicator (a `fusedlis.comm` backend). Each layer
lists the slices of the Hugging Face tensors it needs (`shard_specs`), so the loader reads only this rank's part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TPContext:
    """This rank's place in the tensor-parallel group and the communicator used for its collectives.

    `comm` needs `all_reduce(x) -> x` (sum, in place) and `all_gather(x, dim) -> tensor`; it is unused when
    `size == 1`.
    """

    rank: int = 0
    size: int = 1
    comm: Any = None
    # Optional fused row-parallel GEMM + all-reduce: row_linear(x2d, w_shard[, residual, norm_weight, eps]) ->
    # summed y, or (normed, new_residual) when given a residual and norm weight; None declines (unfused path).
    row_linear: Any = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"invalid tensor-parallel rank {self.rank} of size {self.size}")
        if self.size > 1 and self.comm is None:
            raise ValueError("tp size > 1 needs a communicator (fusedlis.comm backend)")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else self.comm.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x if self.size == 1 else self.comm.all_gather(x, dim)

    def all_reduce_norm(self, y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """`(rmsnorm(sum(y) + residual), sum(y) + residual)` in one fused kernel if the communicator has one
        for these rows [M, H] (`comm.all_reduce_norm` returning non-None); else None (caller runs it unfused)."""
        fn = getattr(self.comm, "all_reduce_norm", None) if self.size > 1 else None
        return None if fn is None else fn(y, residual, weight, eps)


@dataclass(frozen=True)
class ShardSpec:
    """Copy `hf_name[dim-slice start:start+length]` into `param.narrow(0, dst_offset, length)`.

    `full_shape` is the shape the checkpoint tensor must have. `dim` is 0 (rows) or 1 (columns); a
    column slice always fills the whole parameter.
    """

    hf_name: str
    full_shape: tuple[int, ...]
    param: nn.Parameter
    dim: int = 0
    start: int = 0
    length: int | None = None
    dst_offset: int = 0


def _param(shape: tuple[int, ...], dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x @ W.T with W's output rows split across ranks. `parts` lists (hf_name, rows) stacked in order.

    A single part is a plain column-parallel linear; several parts merge projections (q/k/v, gate/up) into
    one GEMM, each part split evenly.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int]], tp: TPContext,
                 dtype: torch.dtype, device, activation: str | None = None) -> None:
        super().__init__()
        for name, rows in parts:
            if rows % tp.size:
                raise ValueError(f"{name}: {rows} output features not divisible by tp size {tp.size}")
        self.in_features, self.parts, self.tp, self.activation = in_features, parts, tp, activation
        self.out_local = sum(rows // tp.size for _, rows in parts)
        self.weight = _param((self.out_local, in_features), dtype, device)

    def shard_specs(self) -> list[ShardSpec]:
        specs, off = [], 0
        for name, rows in self.parts:
            n = rows // self.tp.size
            specs.append(ShardSpec(name, (rows, self.in_features), self.weight, 0, self.tp.rank * n, n, off))
            off += n
        return specs

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        return ops.linear(x, self.weight, activation=self.activation)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local.T) with W's input columns split across ranks."""

    def __init__(self, hf_name: str, in_features: int, out_features: int, tp: TPContext,
                 dtype: torch.dtype, device) -> None:
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"{hf_name}: {in_features} input features not divisible by tp size {tp.size}")
        self.hf_name, self.in_features, self.out_features, self.tp = hf_name, in_features, out_features, tp
        self.in_local = in_features // tp.size
        self.weight = _param((out_features, self.in_local), dtype, device)

    def shard_specs(self) -> list[ShardSpec]:
        return [ShardSpec(self.hf_name, (self.out_features, self.in_features), self.weight, 1,
                          self.tp.rank * self.in_local, self.in_local)]

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        if self.tp.row_linear is not None and self.tp.size > 1:
            y = self.tp.row_linear(x.reshape(-1, x.shape[-1]), self.weight)
            if y is not None:
                return y.view(*x.shape[:-1], self.out_features)
        return self.tp.all_reduce(ops.linear(x, self.weight))

    def forward_norm(self, x: torch.Tensor, ops, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """`(norm(y + residual), y + residual)` for y = this layer's all-reduced output.

        `norm` is a module with `weight` and `eps`; with a fused row_linear the GEMM, all-reduce, residual add
        and RMSNorm run as one fused kernel pair.
        """
        lead = x.shape[:-1]
        res2d = residual.reshape(-1, self.out_features)
        out = None
        if self.tp.row_linear is not None and self.tp.size > 1:
            out = self.tp.row_linear(x.reshape(-1, x.shape[-1]), self.weight, res2d, norm.weight, norm.eps)
        if out is None:
            y = ops.linear(x, self.weight)
            out = self.tp.all_reduce_norm(y.reshape(-1, self.out_features), res2d, norm.weight, norm.eps)
            if out is None:  # no fused kernel for these rows (or one rank): all-reduce, then the norm op
                return norm(self.tp.all_reduce(y), ops, residual)
        return out[0].view(*lead, -1), out[1].view(*lead, -1)


def _vocab_shard(vocab_size: int, tp: TPContext) -> tuple[int, int, int]:
    """(rows per rank padded, first vocab id of this rank, real rows on this rank)."""
    per = -(-vocab_size // tp.size)
    start = tp.rank * per
    return per, start, max(0, min(per, vocab_size - start))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ranks sum their partial lookups."""

    def __init__(self, hf_name: str, vocab_size: int, dim: int, tp: TPContext, dtype, device) -> None:
        super().__init__()
        self.hf_name, self.vocab_size, self.dim, self.tp = hf_name, vocab_size, dim, tp
        self.rows, self.vocab_start, self.real_rows = _vocab_shard(vocab_size, tp)
        self.weight = _param((self.rows, dim), dtype, device)

    def shard_specs(self) -> list[ShardSpec]:
        if self.real_rows < self.rows:
            with torch.no_grad():
                self.weight[self.real_rows:].zero_()  # padding rows of the last rank are never real ids
        if self.real_rows == 0:
            return []
        return [ShardSpec(self.hf_name, (self.vocab_size, self.dim), self.weight, 0, self.vocab_start,
                          self.real_rows)]

    def forward(self, ids: torch.Tensor, ops) -> torch.Tensor:
        out = ops.embedding(ids, self.weight, self.vocab_start if self.tp.size > 1 else 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = x @ E.T with E split by vocabulary rows; the shards are gathered on every rank."""

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:  # type: ignore[override]
        logits = ops.linear(x, self.weight)
        return self.tp.all_gather(logits.contiguous(), -1)[..., : self.vocab_size]
