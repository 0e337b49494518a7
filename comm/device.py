"""Launchers of the Triton all-reduce kernels (`comm/kernels.py`) on a `SymmetricWorkspace`."""

from __future__ import annotations

import threading

import torch
import triton

from fusedlis.comm import kernels as K
from fusedlis.comm.plan import build_plan, cdiv, inter_slot_count
from fusedlis.comm.symmetric import SymmetricWorkspace, nvshmem_device_library
from fusedlis.comm.topology import Topology

# "<alg>_ll": the same plan in the LL (flag-in-data) protocol (comm/kernels.py); nvrar_ll needs load/store
# reachable rail partners (logical nodes on one host, or a multi-node NVLink domain)
DEVICE_ALGORITHMS = ("one_shot", "two_shot", "nvrar", "one_shot_ll", "two_shot_ll", "nvrar_ll")
PROTOCOLS = ("flag", "ll")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_load_state = threading.local()
_hook_installed = False


def _nvshmem_load_hook(module, function, name, metadata_group, hash, *args, **kwargs) -> None:
    # Kernels that call NVSHMEM device functions must be registered with NVSHMEM before their first launch.
    if getattr(_load_state, "put", False):
        import nvshmem.bindings as nb

        nb.cumodule_init(int(module))


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    rt = triton.knobs.runtime
    hk = getattr(rt, "kernel_load_end_hook", None)
    if hk is not None and hasattr(hk, "add"):
        hk.add(_nvshmem_load_hook)
    else:
        prev = hk

        def chained(*a, **kw):
            if prev is not None:
                prev(*a, **kw)
            _nvshmem_load_hook(*a, **kw)

        rt.kernel_load_end_hook = chained
    _hook_installed = True


def launch_nvshmem_kernel(kernel, grid, *args, **kwargs):
    """Launch a Triton kernel that calls NVSHMEM device functions (e.g. `kernels.putmem_signal_block`):
    links libnvshmem_device.bc and registers each newly loaded module with NVSHMEM (cumodule_init) before
    its first launch. Use for any such kernel, e.g. fused GEMM + all-reduce on a `SymmetricWorkspace`."""
    lib = nvshmem_device_library()
    if lib is None:
        raise RuntimeError("libnvshmem_device.bc not found (pip install nvidia-nvshmem-cu13, or set NVSHMEM_LIB_DIR)")
    _install_hook()
    _load_state.put = True
    try:
        return kernel[grid](*args, extern_libs={"libnvshmem_device": lib}, **kwargs)
    finally:
        _load_state.put = False


class DeviceAllReduce:
    """One-shot / two-shot / NVRAR all-reduce kernels for one dtype and topology on a symmetric workspace.

    Reserves its buffers, flags and a sequence channel in `ws` at construction (collective: build in the
    same order on every rank). `max_elems` bounds the message length. `transport` for the inter-node rail
    steps: "put" (NVSHMEM put-with-signal; needs an NVSHMEM workspace), "ptr" (peer stores; every rail
    partner must be load/store reachable, e.g. logical nodes on one host) or "auto" (put when possible).
    `one_shot_transport`: "ptr" (peer stores) or "put" (NVSHMEM put-with-signal straight from the input);
    "auto" = put on an NVSHMEM workspace. `block` / `num_warps` None pick by message size (small tiles for
    small messages, 4096-element tiles and 8 warps above); `max_blocks` None = min(128, SM count) on GPU.
    Calls are asynchronous; a timed-out wait surfaces through `ws.check()` / `ws.check_async()`. Each wait gives
    up after `timeout_s` seconds on the GPU (None: FUSEDLIS_COMM_TIMEOUT_S, default 20; `%globaltimer`), after
    `max_spins` polls in the interpreter (`kernels.wait_budget`).
    `ll_max_elems` (default `max_elems`; 0 = none) sizes the LL-protocol slots (`protocol="ll"` in calls):
    messages up to that length can use it, inside a node, and across nodes where rail partners are reachable.
    """

    def __init__(self, ws: SymmetricWorkspace, max_elems: int, dtype: torch.dtype = torch.bfloat16,
                 topology: Topology | None = None, transport: str = "auto", max_blocks: int | None = None,
                 block: int | None = None, num_warps: int | None = None, max_spins: int = 1 << 24,
                 align: int = 8, one_shot_transport: str = "auto", ll_max_elems: int | None = None,
                 timeout_s: float | None = None) -> None:
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if max_elems < 1:
            raise ValueError(f"max_elems must be >= 1, got {max_elems}")
        self.ws, self.dtype, self.max_elems = ws, dtype, max_elems
        self.topology = topology or ws.topology
        if self.topology.world_size != ws.world_size:
            raise ValueError(f"topology has {self.topology.world_size} ranks, workspace {ws.world_size}")
        self.rank = ws.rank
        g, m = self.topology.gpus_per_node, self.topology.num_nodes
        self.G, self.M = g, m
        self.node_base = self.topology.node(self.rank) * g
        if max_blocks is None:
            max_blocks = 128 if ws.device.type == "cuda" else 32
        if ws.device.type == "cuda":  # every program spins on peers: all must be resident at once
            max_blocks = min(max_blocks, torch.cuda.get_device_properties(ws.device).multi_processor_count)
        self.block, self.num_warps, self.max_blocks = block, num_warps, max_blocks
        if one_shot_transport == "auto":
            one_shot_transport = "put" if ws.uses_nvshmem else "ptr"
        if one_shot_transport not in ("put", "ptr") or (one_shot_transport == "put" and not ws.uses_nvshmem):
            raise ValueError(f"one_shot_transport={one_shot_transport!r} invalid for provider {ws.provider}")
        self.one_shot_transport = one_shot_transport
        self.max_spins, self.align = max_spins, align
        # what a wait may take before it gives up: nanoseconds of %globaltimer on the GPU, polls in the interpreter
        self.gpu_clock = K.uses_gpu_clock(ws.device)
        self.timeout_s = K.comm_timeout_s(timeout_s) if self.gpu_clock else None
        self.wait_budget = K.wait_budget(self.gpu_clock, max_spins, self.timeout_s)
        isz = torch.empty((), dtype=dtype).element_size()
        self.itemsize = isz
        for r in self.topology.node_ranks(self.topology.node(self.rank)):
            if not ws.reachable[r]:
                raise RuntimeError(f"rank {r} is in rank {self.rank}'s node but not load/store reachable")
        # rail steps from the plan (they do not depend on the message length)
        table = build_plan(self.topology, 0, "nvrar", align).ranks[self.rank].inter_table()
        self.nsteps, self.nslot = len(table), inter_slot_count(m)
        self.steps = torch.tensor([v for row in table for v in row] or [0], dtype=torch.int32, device=ws.device)
        partners = {row[1] for row in table}
        if transport == "auto":
            transport = "put" if ws.uses_nvshmem and any(not ws.reachable[p] for p in partners) else "ptr"
            if ws.uses_nvshmem and m > 1 and transport == "ptr":
                transport = "put"  # exercise the inter-node transport even when peers are on one host
        if transport not in ("put", "ptr"):
            raise ValueError(f"transport must be 'auto', 'put' or 'ptr', got {transport!r}")
        if transport == "put" and not ws.uses_nvshmem:
            raise RuntimeError("transport='put' needs an NVSHMEM workspace")
        if transport == "ptr" and any(not ws.reachable[p] for p in partners):
            raise RuntimeError("transport='ptr' but some rail partners are not load/store reachable")
        self.transport = transport
        if transport == "put" or one_shot_transport == "put":
            self._extern = {"libnvshmem_device": nvshmem_device_library()}
            _install_hook()
        # buffers: one-shot slots [2][G][max_elems]; hierarchical RS/AG [2][G][cap], work [2][NSLOT+1][cap],
        # recv [2][NSLOT][cap]
        self.cap = cdiv(cdiv(max_elems, g), align) * align
        a = 256
        self.os_off = ws.alloc_bytes(2 * g * max_elems * isz, a) if m == 1 else -1
        self.rs_off = ws.alloc_bytes(2 * g * self.cap * isz, a) // isz if g > 1 else 0
        self.work_off = ws.alloc_bytes(2 * (max(self.nslot, 1) + 1) * self.cap * isz, a) // isz
        self.recv_off = ws.alloc_bytes(max(1, 2 * self.nslot * self.cap * isz), a) // isz
        self.ag_off = ws.alloc_bytes(2 * g * self.cap * isz, a) // isz if g > 1 else 0
        # LL slots (byte offsets), zero = empty: one-shot [2][G][ll] (single node), RS and AG [2][G][ll_cap], rail
        # [2][NSLOT][ll_cap]. Across nodes only where every rail partner is load/store reachable (peer stores).
        ll_ok = (m == 1 and g > 1) or (m > 1 and all(ws.reachable[p] for p in partners))
        self.ll_max = min(max_elems, max_elems if ll_max_elems is None else ll_max_elems) if ll_ok else 0
        self.ll_cap = cdiv(cdiv(self.ll_max, g), align) * align
        if self.ll_max:
            self.ll_os_off = ws.alloc_bytes(2 * g * self.ll_max * isz, a) if m == 1 else -1
            self.ll_rs_off = ws.alloc_bytes(2 * g * self.ll_cap * isz, a) if g > 1 else 0
            self.ll_ag_off = ws.alloc_bytes(2 * g * self.ll_cap * isz, a) if g > 1 else 0
            self.ll_rail_off = ws.alloc_bytes(2 * self.nslot * self.ll_cap * isz, a) if m > 1 else 0
        self.osf_off = ws.alloc_flags(max_blocks * g)
        self.rsf_off = ws.alloc_flags(max_blocks * g)
        self.inf_off = ws.alloc_flags(max(1, max_blocks * self.nslot))
        self.agf_off = ws.alloc_flags(max_blocks * g)
        self.ch = ws.alloc_channel()
        self._ctr = ws.counters[self.ch:]
        # all_reduce_norm's per-(row, tile) partial sums of squares (tiles >= 128 columns), local memory
        self._norm_parts = (torch.zeros(cdiv(self.ll_max, 64) + 1024, dtype=torch.int64, device=ws.device)
                            if self.ll_max and m == 1 and g > 1 else None)

    def _config(self, elems: int, ll: bool = False) -> tuple[int, int, int, int]:
        """(programs, elements per program, tile, warps) for `elems` elements per chunk."""
        # LL: 1024-element tiles measured fastest up to 512 KB on 2xH200 (bench/results/allreduce_2xH200_*0430*)
        block = self.block or (1024 if elems <= (262144 if ll else 16384) else 4096)
        warps = self.num_warps or (4 if block <= 1024 else 8)
        nb = max(1, min(self.max_blocks, cdiv(elems, block)))
        per_block = cdiv(cdiv(elems, nb), block) * block
        return cdiv(max(elems, 1), per_block), per_block, block, warps

    def _check(self, x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}, this all-reduce was built for {self.dtype}")
        if x.device.type != self.ws.device.type:
            raise ValueError(f"x is on {x.device}, workspace on {self.ws.device}")
        if not x.is_contiguous():
            raise ValueError("x must be contiguous")
        if x.numel() > self.max_elems:
            raise ValueError(f"x has {x.numel()} elements, more than max_elems={self.max_elems}")
        if out is None:
            out = torch.empty_like(x)
        elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError("out must be a contiguous tensor of x's shape and dtype")
        return x.view(-1), out.view(-1)

    def supports_ll(self, n: int) -> bool:
        """True if a message of `n` elements can use the LL protocol (within `ll_max_elems`, reachable peers)."""
        return 0 < n <= self.ll_max

    def supports_norm(self, M: int, H: int) -> bool:
        """True if `all_reduce_norm` can run rows [M, H] here (single node, LL slots big enough, H <= 16384)."""
        return self.M == 1 and self.G > 1 and 0 < M * H <= self.ll_max and H <= 16384

    def all_reduce_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        out: torch.Tensor | None = None, res_out: torch.Tensor | None = None,
                        tile: int | None = None, num_warps: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rmsnorm(allreduce(x) + residual) * weight, allreduce(x) + residual)` in one LL one-shot kernel.

        For the end of a row-parallel layer in decode: x [M, H] is this rank's partial output, residual [M, H]
        the (replicated) residual stream, weight [H] the next RMSNorm's weight. Single node only, M * H within
        `ll_max_elems` (see `supports_norm`). `res_out=residual` updates the residual in place. `tile`: columns
        per program (a power of two >= 128; None: 1024 below 8 rows, else 512); `num_warps` per program."""
        if x.dim() != 2 or residual.shape != x.shape or weight.shape != (x.shape[1],):
            raise ValueError(f"all_reduce_norm: x and residual must be [M, H] and weight [H], got "
                             f"{tuple(x.shape)}, {tuple(residual.shape)}, {tuple(weight.shape)}")
        if residual.dtype != x.dtype or not residual.is_contiguous() or not weight.is_contiguous():
            raise ValueError("all_reduce_norm: residual must be contiguous with x's dtype; weight contiguous")
        M, H = x.shape
        if not self.supports_norm(M, H):
            raise ValueError(f"all_reduce_norm needs one node of >= 2 GPUs, M*H <= {self.ll_max} and H <= 16384; "
                             f"got [{M}, {H}] on {self.M}x{self.G}")
        xf, y = self._check(x, out)
        if res_out is None:
            res_out = torch.empty_like(x)
        elif res_out.shape != x.shape or res_out.dtype != x.dtype or not res_out.is_contiguous():
            raise ValueError("res_out must be a contiguous tensor of x's shape and dtype")
        if tile is None:
            # Fastest of 256..whole-row tiles on 2xH200 for H 4096/8192 (fused_arnorm_tiles_*_run0547): 1024 columns
            # per program below 8 rows, 512 from 8 rows on.
            tile = 1024 if M < 8 else 512
        if x.device.type != "cuda":
            # The interpreter runs programs one after another: a row's tiles cannot wait for each other there.
            tile = triton.next_power_of_2(H)
        tile = max(128, min(int(tile), triton.next_power_of_2(H)))
        T = cdiv(H, tile)
        rows = 1 if T > 1 else cdiv(M, self.max_blocks)
        K._ll_one_shot_norm_kernel[(cdiv(M, rows) * T,)](
            xf, residual, weight, y, res_out, M, H, float(eps), self.ws.buffer, self.ws.peer_ptrs, self._ctr,
            self.ws.err, self._norm_parts, self.ll_os_off, self.ll_max, self.rank, self.node_base, rows, T,
            self.wait_budget, G=self.G, TILE=tile, TP2=triton.next_power_of_2(T), GPU=self.gpu_clock,
            num_warps=num_warps or min(16, max(4, tile // 1024)))
        return y.view(M, H), res_out

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, algorithm: str = "nvrar",
                 protocol: str = "flag") -> torch.Tensor:
        """Sum `x` over all ranks into `out` (new tensor if None; `out=x` is allowed). Returns out.

        `algorithm` is one of DEVICE_ALGORITHMS ("one_shot_ll" = one_shot with protocol "ll"). protocol "flag":
        data then a release flag per sender (every algorithm); "ll": flag-in-data stores, for messages up to
        `ll_max_elems` (lower latency; see `supports_ll`)."""
        xf, of = self._check(x, out)
        result = of.view(x.shape)
        n = xf.numel()
        if n == 0:
            return result
        ws = self.ws
        if algorithm.endswith("_ll"):
            algorithm, protocol = algorithm[:-3], "ll"
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol == "ll":
            if algorithm not in ("one_shot", "two_shot", "nvrar"):
                raise ValueError(f"protocol 'll' supports one_shot, two_shot and nvrar, not {algorithm!r}")
            if algorithm in ("one_shot", "two_shot") and self.M != 1:
                raise ValueError(f"{algorithm} is intra-node only (topology has several nodes); use 'nvrar'")
            if not self.supports_ll(n):
                raise ValueError(f"protocol 'll' needs load/store-reachable peers and <= {self.ll_max} elements; "
                                 f"got {n} on {self.M}x{self.G}")
            if algorithm == "one_shot":
                nb, per_block, block, warps = self._config(n, ll=True)
                K._ll_one_shot_kernel[(nb,)](
                    xf, of, n, ws.buffer, ws.peer_ptrs, self._ctr, ws.err, self.ll_os_off, self.ll_max,
                    self.rank, self.node_base, per_block, self.wait_budget, G=self.G, BLOCK=block,
                    GPU=self.gpu_clock, num_warps=warps)
            else:
                cs = cdiv(cdiv(n, self.G), self.align) * self.align
                nb, per_block, block, warps = self._config(cs, ll=True)
                K._ll_hier_kernel[(nb,)](
                    xf, of, n, ws.buffer, ws.peer_ptrs, self._ctr, ws.err, self.steps, self.ll_rs_off,
                    self.ll_ag_off, self.ll_rail_off, self.ll_cap, cs, self.rank, self.node_base, per_block,
                    self.wait_budget, G=self.G, NSTEPS=self.nsteps if algorithm == "nvrar" else 0,
                    NSLOT=max(self.nslot, 1), BLOCK=block, GPU=self.gpu_clock, num_warps=warps)
            return result
        if algorithm == "one_shot":
            if self.M != 1:
                raise ValueError("one_shot is intra-node only (topology has several nodes)")
            nb, per_block, block, warps = self._config(n)
            put = self.one_shot_transport == "put"
            kw = dict(G=self.G, BLOCK=block, USE_PUT=put, GPU=self.gpu_clock, num_warps=warps)
            if put:
                kw["extern_libs"] = self._extern
                _load_state.put = True
            try:
                K._one_shot_kernel[(nb,)](
                    xf, of, n, ws.buffer, ws.flags, ws.peer_ptrs, ws.peer_flag_ptrs, self._ctr, ws.err,
                    self.os_off, self.max_elems, self.osf_off, self.rank, self.node_base, per_block,
                    self.wait_budget, **kw)
            finally:
                _load_state.put = False
            return result
        if algorithm not in ("two_shot", "nvrar"):
            raise ValueError(f"algorithm must be one of {DEVICE_ALGORITHMS}, got {algorithm!r}")
        if algorithm == "two_shot" and self.M != 1:
            raise ValueError("two_shot is intra-node only (topology has several nodes); use 'nvrar'")
        cs = cdiv(cdiv(n, self.G), self.align) * self.align
        nb, per_block, block, warps = self._config(cs)
        put = self.transport == "put" and self.nsteps > 0
        kw = dict(G=self.G, NSTEPS=self.nsteps, NSLOT=max(self.nslot, 1), BLOCK=block, USE_PUT=put,
                  GPU=self.gpu_clock, num_warps=warps)
        if put:
            kw["extern_libs"] = self._extern
            _load_state.put = True
        try:
            K._hier_kernel[(nb,)](
                xf, of, n, ws.buffer, ws.flags, ws.peer_ptrs, ws.peer_flag_ptrs, self._ctr, ws.err, self.steps,
                self.rs_off, self.work_off, self.recv_off, self.ag_off, self.cap, cs,
                self.rsf_off, self.inf_off, self.agf_off, self.rank, self.node_base, per_block, self.wait_budget,
                **kw)
        finally:
            _load_state.put = False
        return result
