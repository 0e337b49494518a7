"""Topology of a tensor-parallel group: world size split into (logical) nodes of `gpus_per_node` GPUs."""

from __future__ import annotations

import os
from dataclasses import dataclass


def default_gpus_per_node(world_size: int) -> int:
    """`FUSEDLIS_GPUS_PER_NODE` if set, else `LOCAL_WORLD_SIZE` (torchrun), else `world_size` (one node)."""
    for var in ("FUSEDLIS_GPUS_PER_NODE", "LOCAL_WORLD_SIZE"):
        val = os.environ.get(var)
        if val:
            try:
                g = int(val)
            except ValueError as e:
                raise ValueError(f"{var}={val!r} is not an integer") from e
            if g < 1:
                raise ValueError(f"{var}={g} must be >= 1")
            return min(g, world_size)
    return world_size


@dataclass(frozen=True)
class Topology:
    """`world_size` ranks laid out node-major: rank = node * gpus_per_node + local_rank.

    `gpus_per_node=None` reads `FUSEDLIS_GPUS_PER_NODE`, then `LOCAL_WORLD_SIZE`; setting it below the real
    count splits one host into logical nodes (the inter-node code path then runs over NVLink).
    """

    world_size: int
    gpus_per_node: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        g = self.gpus_per_node
        if g is None:
            g = default_gpus_per_node(self.world_size)
            object.__setattr__(self, "gpus_per_node", g)
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"gpus_per_node must be a positive int, got {g!r}")
        if self.world_size % g != 0:
            raise ValueError(f"world_size={self.world_size} is not a multiple of gpus_per_node={g}")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_rank(self, rank: int) -> int:
        return rank % self.gpus_per_node

    def rank_of(self, node: int, local_rank: int) -> int:
        return node * self.gpus_per_node + local_rank

    def node_ranks(self, node: int) -> tuple[int, ...]:
        """Global ranks of one node, in local-rank order."""
        g = self.gpus_per_node
        return tuple(range(node * g, (node + 1) * g))

    def rail(self, local_rank: int) -> tuple[int, ...]:
        """Global ranks with the same local rank on every node, in node order."""
        return tuple(self.rank_of(n, local_rank) for n in range(self.num_nodes))
