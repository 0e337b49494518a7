"""Symmetric workspace: one buffer per rank that every peer can address, plus flags and device counters.

`SymmetricWorkspace` is what the Triton communication kernels (all-reduce here, fused GEMM + all-reduce
elsewhere) are built on. It is allocated once, at start-up, collectively (same sizes, same order on every
rank), and then carved up with `alloc_bytes` / `alloc_flags` (plain offset bump allocators, deterministic
so every rank gets the same offsets).

Memory providers:
- "nvshmem": nvshmem4py (unique id broadcast over the torch.distributed group). Peers on the same
  NVLink domain get load/store pointers (`nvshmem_ptr`); others get 0 and are reached by NVSHMEM puts,
  whose destination is the *local* symmetric address (`local_ptr(...)`) and PE = group rank.
- "torch": torch symmetric memory (CUDA backend, no NVSHMEM). Every peer must be load/store reachable.
- "shared": CPU tests only: ranks are forked processes sharing one shared-memory tensor
  (`SymmetricWorkspace.from_shared`), so peer pointers are valid in every process.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from fusedlis.comm.topology import Topology

_FLAG_ALIGN = 128
_NVSHMEM_READY = False

# Error word layout written by the kernels (see comm/kernels.py: _fail): bit 62 set, step << 32, peer.
ERR_FLAG = 1 << 62


class CommTimeoutError(RuntimeError):
    """A device-side wait ran out of time (of polls in the interpreter): a peer never arrived (crashed, hung, or
    mismatched calls)."""


def decode_error(word: int, rank: int, what: str = "all-reduce") -> str:
    step = (word >> 32) & 0xFFFF
    peer = word & 0xFFFFFFFF
    return (f"rank {rank}: {what} timed out at step {step} waiting for rank {peer} "
            f"(peer crashed or hung, or ranks issued different collectives)")


def nvshmem_available() -> bool:
    """True if nvshmem4py and the NVSHMEM device bitcode library can be imported/found."""
    try:
        import nvshmem.core  # noqa: F401
    except Exception:
        return False
    return nvshmem_device_library() is not None


def nvshmem_device_library() -> str | None:
    """Path of libnvshmem_device.bc (env NVSHMEM_LIB_DIR, else the nvidia-nvshmem wheel), or None."""
    cands = []
    if os.environ.get("NVSHMEM_LIB_DIR"):
        cands.append(os.path.join(os.environ["NVSHMEM_LIB_DIR"], "libnvshmem_device.bc"))
    try:
        import nvidia.nvshmem as nv

        for p in nv.__path__:
            cands.append(os.path.join(p, "lib", "libnvshmem_device.bc"))
    except Exception:
        pass
    for c in cands:
        if os.path.exists(c):
            return c
    return None


def _init_nvshmem(group: dist.ProcessGroup | None, device: torch.device) -> None:
    global _NVSHMEM_READY
    if _NVSHMEM_READY:
        return
    import nvshmem.core as nvshmem
    from cuda.core import Device

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = Device(device.index)
    dev.set_current()
    uid = nvshmem.get_unique_id(empty=rank != 0)
    obj = [uid]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    nvshmem.init(device=dev, uid=obj[0], rank=rank, nranks=world, initializer_method="uid")
    _NVSHMEM_READY = True


class SymmetricWorkspace:
    """Symmetric data buffer + int64 flag pad per rank, peer pointer tables, device counters, error word.

    Attributes (all on `device`):
      buffer: uint8 [nbytes], this rank's data buffer (symmetric).
      flags: int64 [flag_words], this rank's flag / NVSHMEM-signal pad (symmetric, zeroed at start).
      peer_ptrs: int64 [world], base address of each rank's `buffer` as seen from here (0: not load/store
        reachable, use NVSHMEM puts); peer_flag_ptrs: same for `flags`.
      counters: int64 [2 * max_channels]: per channel (seq, ticket); `alloc_channel()` hands one out.
        Kernels read seq at start, the last program to finish (ticket) increments it, so calls need no host
        synchronisation and can be captured in a CUDA graph.
      err: int64 [1]: 0, or the first timeout a kernel hit (decode with `check()`).
    `uses_nvshmem`: kernels may call NVSHMEM device functions (puts with signal) on this workspace.
    """

    def __init__(
        self,
        nbytes: int,
        flag_words: int = 1 << 16,
        group: dist.ProcessGroup | None = None,
        topology: Topology | None = None,
        provider: str = "auto",
        device: torch.device | None = None,
        max_channels: int = 32,
    ) -> None:
        if nbytes <= 0 or flag_words <= 0:
            raise ValueError(f"nbytes ({nbytes}) and flag_words ({flag_words}) must be positive")
        if not dist.is_initialized():
            raise RuntimeError("SymmetricWorkspace needs torch.distributed initialised (dist.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.topology = topology or Topology(self.world_size)
        if self.topology.world_size != self.world_size:
            raise ValueError(f"topology has {self.topology.world_size} ranks, group has {self.world_size}")
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        if provider == "auto":
            provider = "nvshmem" if nvshmem_available() else "torch"
        if provider not in ("nvshmem", "torch"):
            raise ValueError(f"provider must be 'auto', 'nvshmem' or 'torch', got {provider!r}")
        self.provider = provider
        self.uses_nvshmem = provider == "nvshmem"
        self.nbytes = _round_up(nbytes, _FLAG_ALIGN)
        self.flag_words = flag_words
        total = self.nbytes + 8 * flag_words
        if provider == "nvshmem":
            import nvshmem.bindings as nb
            import nvshmem.core.interop.torch as nvt

            _init_nvshmem(group, self.device)
            self._raw = nvt.bytetensor((total,), dtype=torch.uint8)
            base = self._raw.data_ptr()
            bases = [nb.ptr(base, pe) if pe != self.rank else base for pe in range(self.world_size)]
        else:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(symm_mem, "set_backend"):
                try:
                    symm_mem.set_backend("CUDA")
                except Exception:
                    pass
            self._raw = symm_mem.empty(total, dtype=torch.uint8, device=self.device)
            gname = (group or dist.group.WORLD).group_name
            self._handle = symm_mem.rendezvous(self._raw, gname)
            bases = list(self._handle.buffer_ptrs)
        self._setup(bases, max_channels)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=group)

    @classmethod
    def from_shared(cls, shared: torch.Tensor, rank: int, world_size: int, gpus_per_node: int,
                    nbytes: int, flag_words: int, max_channels: int = 32) -> "SymmetricWorkspace":
        """CPU protocol tests: `shared` is a zero-filled uint8 shared-memory tensor holding every rank's region,
        created before forking so its address is the same in every process (`shared_size(...)` gives its size).
        It is not zeroed here: a large parallel fill in a forked child can deadlock torch's thread pool."""
        self = cls.__new__(cls)
        self.group, self.rank, self.world_size = None, rank, world_size
        self.topology = Topology(world_size, gpus_per_node)
        self.device = shared.device
        self.provider, self.uses_nvshmem = "shared", False
        self.nbytes, self.flag_words = _round_up(nbytes, _FLAG_ALIGN), flag_words
        per = self.nbytes + 8 * flag_words
        if shared.numel() < per * world_size:
            raise ValueError(f"shared tensor has {shared.numel()} bytes, needs {per * world_size}")
        self._raw = shared[rank * per:(rank + 1) * per]
        bases = [shared.data_ptr() + r * per for r in range(world_size)]
        self._setup(bases, max_channels)
        return self

    @staticmethod
    def shared_size(world_size: int, nbytes: int, flag_words: int) -> int:
        return world_size * (_round_up(nbytes, _FLAG_ALIGN) + 8 * flag_words)

    def _setup(self, bases: list[int], max_channels: int) -> None:
        self.buffer = self._raw[: self.nbytes]
        self.flags = self._raw[self.nbytes:].view(torch.int64)
        if self.provider != "shared":  # a shared region is zeroed by its creator (before forking)
            self._raw.zero_()  # flags start at 0, and LL-protocol slots are empty when zero
        self.peer_ptrs = torch.tensor(bases, dtype=torch.int64, device=self.device)
        self.peer_flag_ptrs = torch.tensor([b + self.nbytes if b else 0 for b in bases],
                                           dtype=torch.int64, device=self.device)
        self.reachable = [b != 0 for b in bases]
        self.counters = torch.zeros(2 * max_channels, dtype=torch.int64, device=self.device)
        self.err = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._next_byte = 0
        self._next_flag = 0
        self._next_channel = 0
        self._max_channels = max_channels
        self._pending_err: tuple[torch.Tensor, object] | None = None

    # -- carving -----------------------------------------------------------------------------------
    def alloc_bytes(self, nbytes: int, align: int = 256) -> int:
        """Reserve `nbytes` of the data buffer; returns the byte offset (same on every rank)."""
        off = _round_up(self._next_byte, align)
        if off + nbytes > self.nbytes:
            raise MemoryError(f"symmetric buffer exhausted: need {off + nbytes} bytes, have {self.nbytes}")
        self._next_byte = off + nbytes
        return off

    def alloc_flags(self, nwords: int) -> int:
        """Reserve `nwords` int64 flag words; returns the word offset (same on every rank)."""
        off = _round_up(self._next_flag, 16)
        if off + nwords > self.flag_words:
            raise MemoryError(f"flag pad exhausted: need {off + nwords} words, have {self.flag_words}")
        self._next_flag = off + nwords
        return off

    def alloc_channel(self) -> int:
        """Reserve a (seq, ticket) pair in `counters`; returns the index of seq (ticket is index + 1)."""
        if self._next_channel >= self._max_channels:
            raise MemoryError("no free sequence channel")
        self._next_channel += 1
        return 2 * (self._next_channel - 1)

    # -- views -------------------------------------------------------------------------------------
    def view(self, dtype: torch.dtype, offset: int, numel: int) -> torch.Tensor:
        """Local buffer bytes [offset, offset + numel*itemsize) as a `dtype` tensor."""
        size = numel * torch.empty((), dtype=dtype).element_size()
        return self.buffer[offset:offset + size].view(dtype)

    def local_ptr(self, offset: int = 0) -> int:
        return self.buffer.data_ptr() + offset

    # -- errors ------------------------------------------------------------------------------------
    def check(self, what: str = "all-reduce") -> None:
        """Synchronise and raise `CommTimeoutError` if any kernel on this workspace timed out."""
        word = int(self.err.item())
        if word:
            self.err.zero_()
            raise CommTimeoutError(decode_error(word, self.rank, what))

    def check_async(self, what: str = "all-reduce") -> None:
        """Raise for a timeout seen by an earlier call, without synchronising now: copies the error word to
        pinned host memory on the current stream and inspects the previous copy once it has landed."""
        if self.device.type != "cuda":
            return self.check(what)
        if self._pending_err is not None:
            host, ev = self._pending_err
            if ev.query() and int(host[0]):
                word = int(host[0])
                self._pending_err = None
                self.err.zero_()
                raise CommTimeoutError(decode_error(word, self.rank, what))
            if not ev.query():
                return
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host.copy_(self.err, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending_err = (host, ev)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def warn_once(msg: str, _seen: set = set()) -> None:  # noqa: B006 - module-level memo on purpose
    if msg not in _seen:
        _seen.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
