"""Pure-Python all-reduce plans: per rank, the ordered steps of NVRAR, one-shot and two-shot.

One plan drives every executor: `simulate_all_reduce` (CPU tensors in one process), the gloo driver
(`comm/gloo_driver.py`) and the Triton GPU kernels (`comm/kernels.py`, through `RankPlan.inter_table()`).

NVRAR (hierarchical): (1) intra-node reduce-scatter: local rank l owns chunk l of the message and sums it
over its node in local-rank order; (2) inter-node all-reduce of chunk l among the GPUs with local rank l
(one per node, a "rail") by recursive doubling; a node count M that is not a power of two is folded in and
out the standard way (node P+i sends to node i before the rounds and gets the result back after them,
P = largest power of two <= M); (3) intra-node all-gather of the chunks.
Every float addition happens in a fixed order that does not depend on the rank doing it (a + b is
commutative in IEEE arithmetic), so all ranks end with bitwise-identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusedlis.comm.topology import Topology

ALGORITHMS = ("nvrar", "two_shot", "one_shot")

# Step ops. The inter-node ones are also encoded as ints for the GPU kernels (see RankPlan.inter_table).
SCATTER_REDUCE = "scatter_reduce"  # send chunk j of my input to peers[j]; sum chunk `chunk` over peers, in order
SEND = "send"  # send my accumulator to `peers[0]` (into its mailbox `slot`)
RECV_ADD = "recv_add"  # acc = acc + (accumulator received from peers[0] in `slot`)
EXCHANGE = "exchange"  # SEND then RECV_ADD with the same partner and slot
RECV_COPY = "recv_copy"  # acc = accumulator received from peers[0] in `slot`
ALL_GATHER = "all_gather"  # send acc (my chunk) to every peer; output chunk j comes from peers[j]
ONE_SHOT = "one_shot"  # send my whole input to every peer; output = sum over peers, in order

INTER_OPS = {SEND: 1, RECV_ADD: 2, EXCHANGE: 3, RECV_COPY: 4}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Chunking:
    """`n` elements split into `parts` contiguous chunks whose starts are multiples of `align` elements.

    chunk_size = round_up(ceil(n / parts), align); chunk i = [min(i*cs, n), min((i+1)*cs, n)).
    Trailing chunks may be shorter or empty for small n. The GPU kernels use the same formula.
    """

    n: int
    parts: int
    align: int = 8

    def __post_init__(self) -> None:
        if self.n < 0 or self.parts < 1 or self.align < 1:
            raise ValueError(f"bad chunking n={self.n} parts={self.parts} align={self.align}")

    @property
    def chunk_size(self) -> int:
        return cdiv(cdiv(self.n, self.parts), self.align) * self.align

    def bounds(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.parts:
            raise IndexError(f"chunk {i} out of range [0, {self.parts})")
        cs = self.chunk_size
        return min(i * cs, self.n), min((i + 1) * cs, self.n)


@dataclass(frozen=True)
class Step:
    """One step of one rank. `peers` are global ranks; `chunk` indexes `Plan.chunking` (-1: whole message)."""

    op: str
    peers: tuple[int, ...]
    chunk: int = -1
    slot: int = -1


@dataclass(frozen=True)
class RankPlan:
    rank: int
    node: int
    local_rank: int
    steps: tuple[Step, ...]

    def inter_table(self) -> list[tuple[int, int, int]]:
        """Inter-node steps as (op code, partner global rank, slot) rows, op codes from `INTER_OPS`."""
        return [(INTER_OPS[s.op], s.peers[0], s.slot) for s in self.steps if s.op in INTER_OPS]


@dataclass(frozen=True)
class Plan:
    algorithm: str
    topology: Topology
    n: int
    chunking: Chunking
    ranks: tuple[RankPlan, ...]

    @property
    def num_inter_slots(self) -> int:
        return inter_slot_count(self.topology.num_nodes)


def inter_slot_count(num_nodes: int) -> int:
    """Mailbox slots of the inter-node phase: fold-in, one per recursive-doubling round, fold-out."""
    if num_nodes <= 1:
        return 0
    p = 1 << (num_nodes.bit_length() - 1)
    return p.bit_length() - 1 + 2


def rail_steps(node: int, num_nodes: int, rail: tuple[int, ...]) -> list[Step]:
    """Recursive-doubling steps of `node` among `rail` (global ranks of the rail, in node order).

    Slots: 0 fold-in, 1..R the rounds, R+1 fold-out (R = log2 of the largest power of two <= num_nodes).
    """
    if num_nodes <= 1:
        return []
    p = 1 << (num_nodes.bit_length() - 1)
    rounds = p.bit_length() - 1
    extra = num_nodes - p
    if node >= p:  # folded out: hand my data to node - p, get the result back at the end
        return [Step(SEND, (rail[node - p],), slot=0), Step(RECV_COPY, (rail[node - p],), slot=rounds + 1)]
    steps: list[Step] = []
    if node < extra:
        steps.append(Step(RECV_ADD, (rail[node + p],), slot=0))
    for k in range(rounds):
        steps.append(Step(EXCHANGE, (rail[node ^ (1 << k)],), slot=1 + k))
    if node < extra:
        steps.append(Step(SEND, (rail[node + p],), slot=rounds + 1))
    return steps


def build_plan(topology: Topology, n: int, algorithm: str = "nvrar", align: int = 8) -> Plan:
    """Plan an all-reduce of `n` elements on `topology`.

    "nvrar": hierarchical, any node count. "two_shot": intra-node reduce-scatter + all-gather (single node).
    "one_shot": every rank sends its whole input to every other rank (single node).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    g, m = topology.gpus_per_node, topology.num_nodes
    if algorithm in ("one_shot", "two_shot") and m > 1:
        raise ValueError(f"{algorithm} is intra-node only; topology has {m} nodes (use 'nvrar')")
    chunking = Chunking(n, g, align)
    ranks = []
    for r in range(topology.world_size):
        node, lr = topology.node(r), topology.local_rank(r)
        local = topology.node_ranks(node)
        if algorithm == "one_shot":
            steps = [Step(ONE_SHOT, local)]
        else:
            steps = [Step(SCATTER_REDUCE, local, chunk=lr)]
            steps += rail_steps(node, m, topology.rail(lr))
            steps.append(Step(ALL_GATHER, local))
        ranks.append(RankPlan(r, node, lr, tuple(steps)))
    return Plan(algorithm, topology, n, chunking, tuple(ranks))
