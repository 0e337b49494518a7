"""Alpha-beta-gamma cost models of all-reduce (and point-to-point) over a two-level cluster.

`N` nodes of `g` GPUs; ranks are node-major (rank = node * g + local). Each algorithm returns a `Cost` whose
`latency` holds the alpha terms, `bandwidth` the beta terms, `reduction` the gamma terms, and `inter` the part of
latency + bandwidth spent on the inter-node link (0 on one node).

Flat algorithms (ring, tree, rd, rabenseifner, oneshot, twoshot) treat the GPUs as one group: a step whose
partners are all inside one node uses NVLink, any other step is charged at the network link. `nvrar` is the
hierarchical scheme (reduce-scatter in the node, recursive doubling between same-local-rank GPUs of different
nodes on 1/g of the data, all-gather in the node). `nccl` is min(ring, tree) with NCCL's link parameters.
`oneshot_ll`, `twoshot_ll`, `nvrar_ll` are fusedlis.comm's LL (flag-in-data) kernels: the same data movement
as their flag variants, their own link terms (a profile without them falls back to the flag variant's).
The tree is NCCL-style pipelined (bandwidth term 2*m*beta, not 2*m*beta*log p).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from fusedlis.perfmodel.hardware import Hardware


@dataclass(frozen=True)
class Cost:
    """Seconds, split by term. `total` is their sum; `inter` is a subset of latency + bandwidth and
    `inter_latency` the part of `latency` on the network."""

    latency: float = 0.0
    bandwidth: float = 0.0
    reduction: float = 0.0
    inter: float = 0.0
    inter_latency: float = 0.0

    @property
    def total(self) -> float:
        return self.latency + self.bandwidth + self.reduction

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.latency + o.latency, self.bandwidth + o.bandwidth, self.reduction + o.reduction,
                    self.inter + o.inter, self.inter_latency + o.inter_latency)

    def scale(self, k: float) -> "Cost":
        return Cost(self.latency * k, self.bandwidth * k, self.reduction * k, self.inter * k,
                    self.inter_latency * k)

    def hiding_latency(self, fraction: float) -> "Cost":
        """This cost with `fraction` of its NVLink latency hidden (behind the kernel before it)."""
        return dataclasses.replace(self, latency=self.latency - fraction * (self.latency - self.inter_latency))


ZERO = Cost()


def _check(nodes: int, gpn: int, nbytes: float) -> None:
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be an integer >= 1, got {nodes!r}")
    if not isinstance(gpn, int) or gpn < 1:
        raise ValueError(f"gpus_per_node must be an integer >= 1, got {gpn!r}")
    if not (nbytes >= 0 and math.isfinite(nbytes)):
        raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")


def _pow2_floor(p: int) -> int:
    return 1 << (p.bit_length() - 1)


def _step(hw: Hardware, impl: str, intra: bool, n_alpha: float, beta_bytes: float, gamma_bytes: float,
          m: float | None = None) -> Cost:
    # `m` is the whole all-reduce message: it selects the size regime (protocol) of `impl`'s link terms
    a, b = (hw.intra if intra else hw.inter).params(impl, m)
    lat, bw = n_alpha * a, beta_bytes * b
    return Cost(lat, bw, gamma_bytes * hw.gamma, 0.0 if intra else lat + bw, 0.0 if intra else lat)


def _intra_distance(d: int, gpn: int) -> bool:
    # Partner r ^ d stays in r's node for every r iff the aligned block of 2d ranks fits in a node.
    return gpn % (2 * d) == 0


def _nonpow2_fold(hw: Hardware, impl: str, nodes: int, gpn: int, m: float) -> Cost:
    """Extra steps of recursive doubling / halving when p is not a power of two: fold in, then send back."""
    p = nodes * gpn
    if p == _pow2_floor(p):
        return ZERO
    intra = nodes == 1
    return _step(hw, impl, intra, 1, m, m, m) + _step(hw, impl, intra, 1, m, 0, m)


def ring(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """Ring reduce-scatter + all-gather: 2(p-1) steps of m/p bytes."""
    _check(nodes, gpn, m)
    p = nodes * gpn
    if p == 1:
        return ZERO
    return _step(hw, impl, nodes == 1, 2 * (p - 1), 2 * (p - 1) / p * m, (p - 1) / p * m, m)


def tree(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """Pipelined binary-tree reduce + broadcast: 2 alphas per level, 2m bytes over the slowest link used."""
    _check(nodes, gpn, m)
    if nodes * gpn == 1:
        return ZERO
    li, le = math.ceil(math.log2(gpn)), math.ceil(math.log2(nodes))
    c = _step(hw, impl, True, 2 * li, 0, 0, m) + _step(hw, impl, False, 2 * le, 0, 0, m)
    return c + _step(hw, impl, nodes == 1, 0, 2 * m, m, m)


def recursive_doubling(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """Recursive doubling: log2(p) exchange-and-add steps of the full message."""
    _check(nodes, gpn, m)
    p2 = _pow2_floor(nodes * gpn)
    c = _nonpow2_fold(hw, impl, nodes, gpn, m)
    d = 1
    while d < p2:
        c = c + _step(hw, impl, nodes == 1 or _intra_distance(d, gpn), 1, m, m, m)
        d *= 2
    return c


def rabenseifner(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """Recursive-halving reduce-scatter + recursive-doubling all-gather: 2 log2(p) steps, 2(p-1)/p m bytes."""
    _check(nodes, gpn, m)
    p2 = _pow2_floor(nodes * gpn)
    c = _nonpow2_fold(hw, impl, nodes, gpn, m)
    d = 1
    while d < p2:
        part = m * d / p2
        intra = nodes == 1 or _intra_distance(d, gpn)
        c = c + _step(hw, impl, intra, 1, part, part, m) + _step(hw, impl, intra, 1, part, 0, m)
        d *= 2
    return c


def _direct(hw: Hardware, impl: str, nodes: int, gpn: int, n_alpha: int, intra_bytes: float,
            inter_bytes: float, m: float) -> tuple[float, float, float]:
    """One all-to-all style phase: NVLink and network traffic flow at once; returns (latency, bw, inter)."""
    ai, bi = hw.intra.params(impl, m)
    ae, be = hw.inter.params(impl, m)
    if nodes == 1:
        return n_alpha * ai, intra_bytes * bi, 0.0
    t_i, t_e = intra_bytes * bi, inter_bytes * be
    return n_alpha * ae, max(t_i, t_e), n_alpha * ae + (t_e if t_e >= t_i else 0.0)


def oneshot(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """One-shot: every rank reads the whole message from every peer and reduces locally (1 step)."""
    _check(nodes, gpn, m)
    p = nodes * gpn
    if p == 1:
        return ZERO
    lat, bw, inter = _direct(hw, impl, nodes, gpn, 1, (gpn - 1) * m, (p - gpn) * m, m)
    return Cost(lat, bw, (p - 1) * m * hw.gamma, inter, lat if nodes > 1 else 0.0)


def twoshot(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """Two-shot: direct reduce-scatter (each rank reduces m/p) then direct all-gather (2 steps)."""
    _check(nodes, gpn, m)
    p = nodes * gpn
    if p == 1:
        return ZERO
    lat, bw, inter = _direct(hw, impl, nodes, gpn, 2, 2 * (gpn - 1) * m / p, 2 * (p - gpn) * m / p, m)
    return Cost(lat, bw, (p - 1) / p * m * hw.gamma, inter, lat if nodes > 1 else 0.0)


def nvrar(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "custom") -> Cost:
    """Hierarchical NVRAR: intra-node reduce-scatter, inter-node recursive doubling on m/g, intra all-gather."""
    _check(nodes, gpn, m)
    c = ZERO
    if gpn > 1:
        f = (gpn - 1) / gpn * m
        c = _step(hw, impl, True, 1, f, f, m) + _step(hw, impl, True, 1, f, 0, m)
    if nodes > 1:
        rd = recursive_doubling(hw, nodes, 1, m / gpn, impl)
        # recursive_doubling(nodes, 1) charges every step at the network link already.
        c = c + rd
    return c


def nccl(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "nccl") -> Cost:
    """NCCL stand-in: the cheaper of ring and tree with NCCL's link parameters."""
    return min(ring(hw, nodes, gpn, m, "nccl"), tree(hw, nodes, gpn, m, "nccl"), key=lambda c: c.total)


def oneshot_ll(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "oneshot_ll") -> Cost:
    """One-shot in the LL (flag-in-data) protocol: one-shot's data movement, its own (alpha, beta)."""
    return oneshot(hw, nodes, gpn, m, impl)


def twoshot_ll(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "twoshot_ll") -> Cost:
    """Two-shot in the LL protocol: two-shot's data movement, its own (alpha, beta)."""
    return twoshot(hw, nodes, gpn, m, impl)


def nvrar_ll(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "nvrar_ll") -> Cost:
    """NVRAR in the LL protocol (rail partners load/store reachable): NVRAR's data movement, its own terms."""
    return nvrar(hw, nodes, gpn, m, impl)


# fusedlis.comm.AllReduce("auto") on one node of g GPUs: one-shot up to this many bytes, two-shot above
# (fusedlis.comm.allreduce.ONE_SHOT_MAX_BYTES / _DEFAULT; a test keeps them equal).
AUTO_ONE_SHOT_MAX_BYTES = {2: 2 << 20}
AUTO_ONE_SHOT_MAX_BYTES_DEFAULT = 256 << 10
# ... and in the LL protocol up to this many bytes where peers are load/store reachable (one node, or logical
# nodes / an NVLink domain across nodes: `Hardware.inter_load_store`); fusedlis.comm.allreduce.LL_MAX_BYTES.
AUTO_LL_MAX_BYTES = 4 << 20
LL_CAPABLE = ("oneshot", "twoshot", "nvrar")


def auto_one_shot_max(gpn: int) -> int:
    """Largest message fusedlis' auto all-reduce sends one-shot on a node of `gpn` GPUs."""
    return AUTO_ONE_SHOT_MAX_BYTES.get(gpn, AUTO_ONE_SHOT_MAX_BYTES_DEFAULT)


def auto_algorithm(nodes: int, gpn: int, m: float, inter_load_store: bool = False) -> str:
    """The algorithm fusedlis.comm.allreduce.choose_algorithm picks for backend "auto" (protocol "auto"):
    NVRAR across nodes, else one-shot up to `auto_one_shot_max(gpn)` and two-shot above; in the LL protocol up
    to AUTO_LL_MAX_BYTES where peers are load/store reachable (always inside a node; across nodes only with
    `inter_load_store`)."""
    if nodes > 1:
        base, ll = "nvrar", inter_load_store
    else:
        base, ll = ("oneshot" if m <= auto_one_shot_max(gpn) else "twoshot"), True
    return base + "_ll" if ll and m <= AUTO_LL_MAX_BYTES else base


def engine_algorithm(mode: str, nodes: int, gpn: int, m: float, ll: bool = True) -> str:
    """The all-reduce algorithm the fusedlis engine runs for a message of `m` bytes in all-reduce `mode`
    (`fusedlis.Engine(allreduce=...)`), following fusedlis.comm.allreduce.choose_algorithm.

    `ll`: the LL protocol is available (fusedlis.comm since the LL kernels; peers load/store reachable: one
    node, or logical nodes of one host). "nccl" -> nccl; "auto" -> `auto_algorithm`; "one_shot" / "two_shot" /
    "nvrar" -> that algorithm, in LL up to AUTO_LL_MAX_BYTES; "fused" (GEMM + all-reduce in one kernel, its
    own flag-style tile pushes) -> auto's algorithm in the flag protocol.
    """
    key = mode.strip().lower().replace("-", "_")
    if key == "nccl":
        return "nccl"
    if key == "fused":
        return "nvrar" if nodes > 1 else ("oneshot" if m <= auto_one_shot_max(gpn) else "twoshot")
    if key == "auto":
        a = auto_algorithm(nodes, gpn, m, inter_load_store=ll)
        return a if ll else flag_variant(a)
    base = resolve(key)
    if base not in LL_CAPABLE:
        raise ValueError(f"unknown engine all-reduce mode {mode!r}: use nccl, auto, one_shot, two_shot, nvrar, fused")
    return base + "_ll" if ll and m <= AUTO_LL_MAX_BYTES else base


def auto(hw: Hardware, nodes: int, gpn: int, m: float, impl: str = "auto") -> Cost:
    """What fusedlis' AllReduce("auto") runs (`auto_algorithm`), with that algorithm's link terms."""
    a = auto_algorithm(nodes, gpn, m, hw.inter_load_store)
    return ALGORITHMS[a](hw, nodes, gpn, m, a)


ALGORITHMS: dict[str, Callable[..., Cost]] = {
    "ring": ring, "tree": tree, "rd": recursive_doubling, "rabenseifner": rabenseifner,
    "oneshot": oneshot, "twoshot": twoshot, "nvrar": nvrar, "nccl": nccl, "auto": auto,
    "oneshot_ll": oneshot_ll, "twoshot_ll": twoshot_ll, "nvrar_ll": nvrar_ll,
}
ALIASES = {"recursive_doubling": "rd", "recursive-doubling": "rd", "one-shot": "oneshot", "one_shot": "oneshot",
           "two-shot": "twoshot", "two_shot": "twoshot", "rab": "rabenseifner", "fusedlis": "auto"}


def resolve(name: str) -> str:
    """Canonical algorithm name; ValueError listing the known ones. LL variants: `<flag name>_ll` (or `-ll`),
    e.g. fusedlis.comm's "one_shot_ll" -> "oneshot_ll"."""
    key = name.strip().lower()
    if key.endswith(("_ll", "-ll")) and len(key) > 3:
        base = ALIASES.get(key[:-3], key[:-3])
        key = base + "_ll" if base in LL_CAPABLE else key
    key = ALIASES.get(key, key)
    if key not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {name!r}: use one of {', '.join(ALGORITHMS)}")
    return key


def flag_variant(algo: str) -> str:
    """The flag-protocol algorithm with the same data movement ("oneshot_ll" -> "oneshot"; others unchanged)."""
    a = resolve(algo)
    return a[:-3] if a.endswith("_ll") else a


def allreduce(algo: str, hw: Hardware, nodes: int, gpus_per_node: int, nbytes: float) -> Cost:
    """Cost of one all-reduce of `nbytes` over `nodes` x `gpus_per_node` GPUs with algorithm `algo`.

    `nccl` uses the profile's NCCL link parameters; every other algorithm uses its own per-algorithm link
    parameters where the profile has them (`Link.per_algo`), else the custom (NVSHMEM-kernel) ones.
    """
    a = resolve(algo)
    return ALGORITHMS[a](hw, nodes, gpus_per_node, nbytes, a)


def allgather(algo: str, hw: Hardware, nodes: int, gpus_per_node: int, nbytes: float) -> Cost:
    """Cost of an all-gather whose gathered output is `nbytes`: the all-gather half of the matching scheme.

    Ring-like schemes move (p-1)/p of the output; modelled as the all-reduce's cost minus its
    reduce-scatter half, i.e. half the latency and bandwidth terms and no reduction.
    """
    c = allreduce(algo, hw, nodes, gpus_per_node, nbytes)
    return Cost(c.latency / 2, c.bandwidth / 2, 0.0, c.inter / 2, c.inter_latency / 2)


def p2p(hw: Hardware, nbytes: float, *, inter: bool, impl: str = "nccl") -> Cost:
    """One point-to-point send of `nbytes` (pipeline stage boundary)."""
    if not (nbytes >= 0 and math.isfinite(nbytes)):
        raise ValueError(f"nbytes must be a finite number >= 0, got {nbytes!r}")
    return _step(hw, impl, not inter, 1, nbytes, 0, nbytes)


def bytes_sent(algo: str, nodes: int, gpus_per_node: int, nbytes: float) -> float:
    """Bytes one GPU puts on its links for one all-reduce of `nbytes` (wire volume, not time)."""
    algo = flag_variant(algo)
    p, g = nodes * gpus_per_node, gpus_per_node
    if p == 1:
        return 0.0
    lg = math.ceil(math.log2(p))
    if algo in ("ring", "rabenseifner", "twoshot"):
        return 2 * (p - 1) / p * nbytes
    if algo == "rd":
        return lg * nbytes
    if algo in ("tree", "nccl"):
        return 2 * nbytes
    if algo == "auto":
        return bytes_sent(auto_algorithm(nodes, gpus_per_node, nbytes), nodes, gpus_per_node, nbytes)
    if algo == "oneshot":
        return (p - 1) * nbytes
    return 2 * (g - 1) / g * nbytes + math.ceil(math.log2(nodes)) * nbytes / g  # nvrar


def network_bytes(algo: str, nodes: int, gpus_per_node: int, nbytes: float, hw: Hardware | None = None) -> float:
    """Bytes that cross node boundaries in one all-reduce of `nbytes`, summed over all GPUs (0 on one node).

    `nccl` counts as ring or tree, whichever its cost model picks (needs `hw`; ring without it).
    """
    algo = flag_variant(algo)
    _check(nodes, gpus_per_node, nbytes)
    n, g = nodes, gpus_per_node
    p, m = n * g, nbytes
    if n == 1:
        return 0.0
    if algo == "nccl":
        use_tree = hw is not None and tree(hw, n, g, m, "nccl").total < ring(hw, n, g, m, "nccl").total
        algo = "tree" if use_tree else "ring"
    if algo == "auto":
        algo = "nvrar"
    p2 = _pow2_floor(p)
    fold = 0.0 if p == p2 else 2 * (p - p2) * m  # non-power-of-two ranks fold in and get the result back
    if algo == "ring":
        return n * 2 * (p - 1) / p * m  # n ring edges join nodes
    if algo == "tree":
        return 2 * (n - 1) * m  # n-1 tree edges join nodes, m up and m down
    if algo == "rd":
        inter_steps = sum(1 for k in range(p2.bit_length() - 1) if not _intra_distance(1 << k, g))
        return inter_steps * p2 * m + fold
    if algo == "rabenseifner":
        return sum(2 * m * (1 << k) for k in range(p2.bit_length() - 1) if not _intra_distance(1 << k, g)) + fold
    if algo == "oneshot":
        return p * (p - g) * m
    if algo == "twoshot":
        return 2 * (p - g) * m
    # nvrar: recursive doubling among the n same-local-rank GPUs on m/g, for each of the g rails
    n2 = _pow2_floor(n)
    steps = n2.bit_length() - 1
    return g * (steps * n2 * m / g + (0.0 if n == n2 else 2 * (n - n2) * m / g))
