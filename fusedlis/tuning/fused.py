"""Tuning the fused row-parallel GEMM + all-reduce (`fusedlis.triton_kernels.linear_allreduce`).

The launcher asks ``lookup("linear_allreduce", {"M", "N", "K", "dtype", "local"})`` inside
`linear_allreduce_config` and applies the keys of the answer it knows (the GEMM tile and split-K,
``ONE_SHOT``, ``BLOCK_C``). The search space and the default are the kernel module's own
(``linear_allreduce_configs``, ``linear_allreduce_default_config``). The tuner must not store choices the
launcher would silently drop, so `honoured_keys` finds the applied keys by probing the launcher with a fake
lookup answer, and candidates keep only those.

`FusedBench` times candidates collectively under torchrun (>= 2 CUDA ranks), each captured in a CUDA
graph, after checking the result against torch (``x @ w.T`` then ``dist.all_reduce``), with cuBLAS +
NCCL as the baseline.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from fusedlis.tuning import search as _search

OP = "linear_allreduce"
# Keys a tuned entry may set, in launcher spelling. Which of them the launcher applies is probed.
TUNABLE = ("USE_DOT", "BM", "BN", "BK", "SPLIT_K", "num_warps", "num_stages", "ONE_SHOT", "BLOCK_C")

def _module():
    import importlib

    return importlib.import_module(f"fusedlis.triton_kernels.{OP}")


@contextlib.contextmanager
def _lookup_answer(answer: dict[str, Any] | None) -> Iterator[None]:
    """Make `fusedlis.tuning.lookup` return `answer` for the duration (the launcher imports it per call)."""
    import fusedlis.tuning as tuning

    saved = tuning.lookup
    tuning.lookup = lambda op, key: None if answer is None else dict(answer)
    try:
        yield
    finally:
        tuning.lookup = saved


def fused_key(M: int, N: int, K: int, dtype: torch.dtype, local: int) -> dict[str, Any]:
    """The key `linear_allreduce_config` passes to `lookup` (N = output columns, K = this rank's K-slice,
    local = GPUs per node of the workspace)."""
    return {"M": int(M), "N": int(N), "K": int(K), "dtype": dtype, "local": int(local)}


def _dtype(key: dict[str, Any]) -> torch.dtype:
    from fusedlis.tuning.bench import torch_dtype

    return torch_dtype(key["dtype"])


def _launcher_config(key: dict[str, Any], answer: dict[str, Any] | None) -> dict[str, Any]:
    mod = _module()
    with _lookup_answer(answer):
        return dict(mod.linear_allreduce_config(int(key["M"]), int(key["N"]), int(key["K"]), int(key["local"]),
                                                _dtype(key)))


def honoured_keys(key: dict[str, Any]) -> tuple[str, ...]:
    """Which keys of a tuned entry `linear_allreduce_config` applies, found by probing it: per key, a
    lookup answer equal to the default except that key, and whether the changed value comes through.

    One key at a time, because a changed tile can change a derived key (a wider BN can force one-shot).
    """
    base = _launcher_config(key, None)
    same = {k: base[k] for k in TUNABLE if k in base}
    out = []
    for k, v in same.items():
        alt = (not v) if isinstance(v, bool) else (v * 2 if isinstance(v, int) else None)
        if alt is not None and _launcher_config(key, {**same, k: alt}).get(k) == alt:
            out.append(k)
    return tuple(out)


def linear_allreduce_default_config(key: dict[str, Any]) -> dict[str, Any]:
    """What the launcher runs for `key` with no tuning cache (the tuner's "before"): the kernel module's
    own `linear_allreduce_default_config`, restricted to the keys the launcher honours for `key`."""
    keys = set(honoured_keys(key))
    return {k: v for k, v in _module().linear_allreduce_default_config(key).items() if k in keys}


def linear_allreduce_configs(key: dict[str, Any]) -> list[dict[str, Any]]:
    """Candidate configs for `key`, default first: the kernel module's own `linear_allreduce_configs`,
    restricted to the keys the launcher honours (probed, so a stale cache entry can never carry a key the
    launcher would drop)."""
    keys = set(honoured_keys(key))
    out: list[dict[str, Any]] = []
    for c in _module().linear_allreduce_configs(key):
        c = {k: v for k, v in c.items() if k in keys}
        if c not in out:
            out.append(c)
    return out


estimate_fused = _search.estimate_fused


# ----------------------------------------------------------------------------------------------------
# GPU bench (collective)

_WS: dict[tuple, Any] = {}


def _workspace(max_m: int, max_n: int):
    # Symmetric allocation is collective: one workspace per process, the same on every rank.
    k = (max_m, max_n)
    if k not in _WS:
        _WS[k] = _module().FusedAllReduceWorkspace.from_torch_symm(max_m, max_n)
    return _WS[k]


class FusedBench:
    """Collective bench of `linear_allreduce` for one (M, N, K) under torchrun (every rank holds a K-slice).

    Every rank must build the same benches and call `time` with the same configs in the same order (the
    tuner does). Each candidate is first checked against torch (fp32 ``x @ w.T`` summed with
    ``dist.all_reduce``); the verdict is agreed on by all ranks, so a config that fails on one rank fails
    on all. Timing: `calls` launches rotating through > 256 MiB of weight copies captured in one CUDA graph,
    `replays` x effort replays each after a barrier, median per call, MAX over the ranks.
    """

    timer_name = "cuda-graph-median-max-over-ranks"

    def __init__(self, problem, calls: int = 16, replays: int = 15) -> None:
        import torch.distributed as dist

        from fusedlis.tuning.bench import SkipOp

        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise SkipOp("op 'fused' needs >= 2 ranks: run under torchrun --nproc-per-node N")
        if not torch.cuda.is_available():
            raise SkipOp("op 'fused' needs CUDA GPUs (its all-reduce stores to peer GPUs' memory)")
        if int(problem.meta.get("tp", dist.get_world_size())) != dist.get_world_size():
            raise SkipOp(f"op 'fused': --tp {problem.meta.get('tp')} != torchrun world size {dist.get_world_size()}")
        self.problem, self.key = problem, dict(problem.key)
        self.calls, self.replays = calls, replays
        self.dtype = _dtype(self.key)
        self.mod = _module()
        self.dev = torch.device("cuda", torch.cuda.current_device())
        self.ws = _workspace(int(problem.meta.get("max_m", self.key["M"])),
                             int(problem.meta.get("max_n", self.key["N"])))
        if self.ws.local_size != int(self.key["local"]):
            raise SkipOp(f"op 'fused': key local={self.key['local']} but the workspace has "
                         f"{self.ws.local_size} GPUs per node")
        self._ready = False

    def configs(self) -> list[dict[str, Any]]:
        return linear_allreduce_configs(self.key)

    def default(self) -> dict[str, Any]:
        return linear_allreduce_default_config(self.key)

    def estimate(self, config: dict[str, Any]) -> _search.Resources:
        return estimate_fused(self.key, config)

    def notes(self) -> str:
        keys = honoured_keys(self.key)
        missing = [k for k in ("ONE_SHOT", "BLOCK_C") if k not in keys]
        return f"launcher ignores tuned {'/'.join(missing)}: not searched" if missing else ""

    def _setup(self) -> None:
        if self._ready:
            return
        import torch.distributed as dist

        M, N, K = int(self.key["M"]), int(self.key["N"]), int(self.key["K"])
        rank = dist.get_rank()
        g = torch.Generator(device=self.dev).manual_seed(1000 + rank)
        self.nbuf = max(2, min(64, math.ceil((256 << 20) / (N * K * self.dtype.itemsize))))
        self.w = torch.randn((self.nbuf, N, K), device=self.dev, dtype=self.dtype, generator=g).mul_(K ** -0.5)
        self.x = torch.randn((self.nbuf, M, K), device=self.dev, dtype=self.dtype, generator=g)
        self.out = torch.empty((M, N), device=self.dev, dtype=self.dtype)
        ref = self.x[0].float() @ self.w[0].float().T
        dist.all_reduce(ref)
        self.ref = ref
        self._checked: dict = {}
        self._ready = True

    def _run(self, config: dict[str, Any] | None, j: int) -> torch.Tensor:
        return self.mod.linear_allreduce(self.x[j], self.w[j], self.ws, out=self.out, config=config)

    def _agree(self, ok: bool) -> bool:
        import torch.distributed as dist

        t = torch.tensor([0.0 if ok else 1.0], device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() == 0.0

    def _verify(self, config: dict[str, Any] | None) -> None:
        from fusedlis.tuning.bench import _TOL

        self._setup()
        cid = None if config is None else _search.config_id(config)
        if cid in self._checked:
            if self._checked[cid]:
                raise ValueError(self._checked[cid])
            return
        why = ""
        try:
            self.out.fill_(float("nan"))
            got = self._run(config, 0).float()
            err = (torch.linalg.vector_norm(got - self.ref) / torch.linalg.vector_norm(self.ref).clamp_min(1e-30)).item()
            if not err <= _TOL.get(self.dtype, 1e-2):
                why = f"wrong result: relative error {err:.2e}"
            self.ws.check()
        except Exception as e:  # compile error, launcher rejection or device timeout: fail on every rank
            why = f"{type(e).__name__}: {e}"
            self.ws.err.zero_()
        if not self._agree(not why):
            self._checked[cid] = why or "wrong result or error on another rank"
            raise ValueError(self._checked[cid])
        self._checked[cid] = ""

    def _time(self, fn, effort: int) -> float:
        from fusedlis.tuning.bench import graph_time_us

        self._setup()
        return graph_time_us(fn, self.nbuf, self.calls, self.replays * max(1, effort), collective=True)

    def time(self, config: dict[str, Any], effort: int = 1) -> float:
        self._verify(config)
        return self._time(lambda j: self._run(config, j), effort)

    def time_lookup(self, effort: int = 1) -> float:
        self._verify(None)
        return self._time(lambda j: self._run(None, j), effort)

    def baseline(self, effort: int = 1) -> tuple[str, float] | None:
        import torch.distributed as dist

        self._setup()

        def cublas_nccl(j):
            torch.mm(self.x[j], self.w[j].T, out=self.out)
            dist.all_reduce(self.out)

        return "cublas+nccl", self._time(cublas_nccl, effort)

    def close(self) -> None:
        for name in ("w", "x", "out", "ref"):
            if hasattr(self, name):
                delattr(self, name)
        self._ready = False
        torch.cuda.empty_cache()
