"""`AllReduce`: the user-facing sum all-reduce (NVSHMEM Triton kernels, NCCL fallback)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fusedlis.comm.plan import cdiv, inter_slot_count
from fusedlis.comm.symmetric import SymmetricWorkspace, nvshmem_available, warn_once
from fusedlis.comm.topology import Topology

BACKENDS = ("auto", "nvrar", "one_shot", "two_shot", "one_shot_ll", "two_shot_ll", "nvrar_ll", "nccl")

# Crossovers (bench/results/allreduce_2xH200_*.csv, docs/comm.md): on one node of 2 GPUs one-shot in the LL
# protocol was fastest up to 2 MB and two-shot LL at 4 MB (run 20261122-0430). For more GPUs per node one-shot
# moves (G-1)x the data per link: the 256 KB crossover there is a guess, not a measurement.
ONE_SHOT_MAX_BYTES = {2: 2 << 20}
ONE_SHOT_MAX_BYTES_DEFAULT = 256 << 10
LL_MAX_BYTES = 4 << 20  # LL slots are sized for messages up to this (single node)


def workspace_bytes(topology: Topology, max_elems: int, itemsize: int, align: int = 8,
                    ll_max_elems: int | None = None) -> int:
    """Symmetric bytes one `DeviceAllReduce` needs (with allocation padding)."""
    g, m = topology.gpus_per_node, topology.num_nodes
    ns = max(inter_slot_count(m), 1)
    cap = cdiv(cdiv(max_elems, g), align) * align
    one = 2 * g * max_elems if m == 1 else 0
    ll = min(max_elems, max_elems if ll_max_elems is None else ll_max_elems) if g * m > 1 else 0
    ll_cap = cdiv(cdiv(ll, g), align) * align
    ll_words = (2 * g * ll if m == 1 else 0) + 4 * g * ll_cap + (2 * ns * ll_cap if m > 1 else 0)
    return (one + (2 * g + 2 * (ns + 1) + 2 * ns + 2 * g) * cap + ll_words) * itemsize + 12 * 256


def choose_algorithm(nbytes: int, topology: Topology, backend: str, max_bytes: int, one_shot_max_bytes: int,
                     device_ready: bool = True, ll_max_bytes: int = 0) -> str:
    """The algorithm for one message: "nccl" without device kernels or above `max_bytes`; an explicit backend
    as given; "auto": nvrar across nodes; inside one node one_shot up to `one_shot_max_bytes`, else two_shot;
    in the LL protocol ("_ll") up to `ll_max_bytes` (0 where peers are not load/store reachable)."""
    if not device_ready or backend == "nccl" or nbytes > max_bytes:
        return "nccl"
    if backend != "auto":
        if backend in ("one_shot", "two_shot", "nvrar") and nbytes <= ll_max_bytes:
            return backend + "_ll"
        return backend
    if topology.num_nodes > 1:
        return "nvrar_ll" if nbytes <= ll_max_bytes else "nvrar"
    alg = "one_shot" if nbytes <= one_shot_max_bytes else "two_shot"
    return alg + "_ll" if nbytes <= ll_max_bytes else alg


class AllReduce:
    """Sum all-reduce over `group` for tensors of `dtype` up to `max_bytes`.

    backend: "auto" (one_shot / two_shot on one node by message size, nvrar across nodes, in the LL protocol up
    to `ll_max_bytes` where peers are load/store reachable; NCCL above `max_bytes`), "nvrar", "one_shot",
    "two_shot", "one_shot_ll", "two_shot_ll", "nvrar_ll" (fusedlis Triton kernels on NVSHMEM; "_ll" =
    flag-in-data protocol), or "nccl"
    (torch.distributed, whatever its backend is). Without NVSHMEM (or CUDA) it falls back to
    torch.distributed with one warning. Plugs into the model as `ctx.all_reduce(y)` (in place).

    protocol: "auto" runs one_shot / two_shot / nvrar in the LL (flag-in-data) protocol for messages up to
    `ll_max_bytes` where peers are load/store reachable; "flag" never does (its slots are not allocated).

    Construct on every rank at start-up (symmetric allocation is collective). Calls are asynchronous and
    CUDA-graph capturable. A device-side timeout raises `CommTimeoutError` from a later call (checked
    every `check_every` eager calls without a sync) or from `check()`.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, backend: str = "auto", max_bytes: int = 8 << 20,
                 dtype: torch.dtype = torch.bfloat16, *, topology: Topology | None = None, provider: str = "auto",
                 workspace: SymmetricWorkspace | None = None, max_blocks: int = 128,
                 one_shot_max_bytes: int | None = None, ll_max_bytes: int = LL_MAX_BYTES,
                 protocol: str = "auto", check_every: int = 64, fuse_norm: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if protocol not in ("auto", "flag", "ll"):
            raise ValueError(f"protocol must be 'auto', 'flag' or 'll', got {protocol!r}")
        if protocol == "flag":
            ll_max_bytes = 0
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.group, self.dtype, self.max_bytes = group, dtype, max_bytes
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.topology = topology or Topology(self.world_size)
        if one_shot_max_bytes is None:
            one_shot_max_bytes = ONE_SHOT_MAX_BYTES.get(self.topology.gpus_per_node, ONE_SHOT_MAX_BYTES_DEFAULT)
        self.one_shot_max_bytes = one_shot_max_bytes
        self.check_every, self._calls = check_every, 0
        self.fuse_norm = fuse_norm
        self.ll_max_bytes = 0
        self.device_ar = None
        self.ws = workspace
        self.backend = backend
        if backend == "nccl" or self.world_size == 1:
            return
        reason = None
        if not torch.cuda.is_available():
            reason = "CUDA is not available"
        elif workspace is None and provider in ("auto", "nvshmem") and not nvshmem_available():
            reason = "nvshmem4py / libnvshmem_device.bc not found"
        if reason is not None:
            if backend != "auto":
                warn_once(f"fusedlis AllReduce: {reason}; backend {backend!r} falls back to torch.distributed (NCCL)")
            else:
                warn_once(f"fusedlis AllReduce: {reason}; falling back to torch.distributed (NCCL)")
            self.backend = "nccl"
            return
        if self.topology.num_nodes > 1 and backend.startswith(("one_shot", "two_shot")):
            raise ValueError(f"backend {backend!r} is intra-node only; topology has {self.topology.num_nodes} nodes")
        from fusedlis.comm.device import DeviceAllReduce

        itemsize = torch.empty((), dtype=dtype).element_size()
        max_elems = max(1, max_bytes // itemsize)
        ll_elems = max(0, min(max_bytes, ll_max_bytes) // itemsize)
        if self.ws is None:
            self.ws = SymmetricWorkspace(workspace_bytes(self.topology, max_elems, itemsize, ll_max_elems=ll_elems),
                                         flag_words=max_blocks * 64 + 1024, group=group, topology=self.topology,
                                         provider=provider)
        self.device_ar = DeviceAllReduce(self.ws, max_elems, dtype, self.topology, max_blocks=max_blocks,
                                         ll_max_elems=ll_elems)
        self.ll_max_bytes = self.device_ar.ll_max * itemsize

    def algorithm_for(self, nbytes: int) -> str:
        """Algorithm `__call__` uses for a message of `nbytes` ("nccl" means torch.distributed).

        With backend "auto", a choice measured by `fusedlis tune --ops allreduce` for this size, dtype and
        topology wins over the built-in crossovers.
        """
        if self.backend == "auto" and self.device_ar is not None and nbytes <= self.max_bytes:
            tuned = self._tuned(nbytes)
            if tuned is not None:
                return tuned
        alg = choose_algorithm(nbytes, self.topology, self.backend, self.max_bytes, self.one_shot_max_bytes,
                               self.device_ar is not None, self.ll_max_bytes)
        if alg.endswith("_ll") and nbytes > self.ll_max_bytes:
            raise ValueError(f"{alg} handles messages up to {self.ll_max_bytes} bytes (ll_max_bytes), got {nbytes}")
        return alg

    def _tuned(self, nbytes: int) -> str | None:
        from fusedlis.tuning import lookup

        t = self.topology
        cfg = lookup("allreduce", {"nbytes": nbytes, "dtype": self.dtype, "world_size": self.world_size,
                                   "topology": f"{t.num_nodes}x{t.gpus_per_node}"})
        alg = (cfg or {}).get("algorithm")
        intra_ok = alg in ("one_shot", "two_shot") and t.num_nodes == 1
        ll_ok = nbytes <= getattr(self, "ll_max_bytes", 0) and (alg == "nvrar_ll" or (alg in ("one_shot_ll", "two_shot_ll")
                                                                        and t.num_nodes == 1))
        return alg if alg in ("nccl", "nvrar") or intra_ok or ll_ok else None

    def __call__(self, x: torch.Tensor, inplace: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the sum of `x` over the group (written into `x` when `inplace`, or into `out`)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        if self.world_size == 1:
            if inplace:
                return x
            if out is not None:
                return out.copy_(x)
            return x.clone()
        alg = self.algorithm_for(x.numel() * x.element_size())
        if alg != "nccl" and (x.dtype != self.dtype or not x.is_contiguous()):
            warn_once(f"fusedlis AllReduce built for {self.dtype} contiguous tensors got {x.dtype}; "
                      "using torch.distributed for those")
            alg = "nccl"
        if alg == "nccl":
            y = x if inplace else (out.copy_(x) if out is not None else x.clone())
            dist.all_reduce(y, group=self.group)
            return y
        dst = x if inplace else out
        y = self.device_ar(x, out=dst, algorithm=alg)
        if dst is not None:
            y = dst
        self._calls += 1
        if self._calls % self.check_every == 0 and not torch.cuda.is_current_stream_capturing():
            self.ws.check_async()
        return y

    def fuses_norm(self, x: torch.Tensor) -> bool:
        """True if `all_reduce_norm(x, ...)` runs as one fused kernel here: rows [M, H] of this communicator's
        dtype on one node, in the LL one-shot regime (the algorithm `__call__` would pick), `fuse_norm` on."""
        if not (self.fuse_norm and self.device_ar is not None and self.world_size > 1 and x.dim() == 2
                and x.dtype == self.dtype and x.is_contiguous()):
            return False
        nbytes = x.numel() * x.element_size()
        return (nbytes <= min(self.max_bytes, self.ll_max_bytes) and self.device_ar.supports_norm(*x.shape)
                and self.algorithm_for(nbytes) in ("one_shot", "one_shot_ll"))

    def all_reduce_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        res_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rmsnorm(sum(x) + residual), sum(x) + residual)` for rows x [M, H]: the end of a row-parallel layer.

        One fused LL one-shot kernel where `fuses_norm(x)`; else the all-reduce, then the residual add and
        RMSNorm in fp32 torch ops."""
        if self.fuses_norm(x):
            return self.device_ar.all_reduce_norm(x, residual, weight, eps, res_out=res_out)
        y = self(x)
        if y.is_cuda and y.dim() == 2 and y.stride(1) == 1:
            from fusedlis.triton_kernels import rmsnorm

            normed, h = rmsnorm(y, weight, eps, residual=residual)
            return normed, (res_out.copy_(h) if res_out is not None else h)
        h = y.float() + residual.float()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
        if res_out is not None:
            return normed, res_out.copy_(h)
        return normed, h.to(x.dtype)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over the group; returns `x` (the `TPContext.all_reduce` contract)."""
        return self(x, inplace=True)

    def check(self) -> None:
        """Synchronise and raise `CommTimeoutError` if any call so far timed out on the device."""
        if self.ws is not None:
            self.ws.check()
