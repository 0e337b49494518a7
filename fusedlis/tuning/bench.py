"""Per-problem benches: the config space of an op and a timer for it, on the GPU or a synthetic model.

A bench answers: which configs to try (`configs`, `default` from ``fusedlis.triton_kernels``), how much
shared memory / registers a config needs (`estimate`), how long it takes (`time(config, effort)` in µs),
what the vendor library takes (`baseline`), and how long the launcher takes when it picks its config
itself through `fusedlis.tuning.lookup` (`time_lookup`).

`GpuBench` measures with ``triton.testing.do_bench`` medians, rotating through enough weight / KV-cache
copies (>= 1 GiB) that L2 never holds the operands, and rejects configs whose result is wrong.
`FakeBench` is an analytic cost model for CPU runs of the whole pipeline (tests, dry runs of
bench/tune_gpu.sh): its numbers are not measurements. `AllReduceBench` times the all-reduce algorithms
collectively under torchrun; the fused GEMM + all-reduce bench is `fusedlis.tuning.fused.FusedBench`.

On CUDA, timings are taken on CUDA graphs by default (`graph_time_us`): the engine replays decode steps
as graphs, and eager timing of a ~10 µs kernel measures the Python launch path instead of the kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fusedlis.tuning import search as _search
from fusedlis.tuning.shapes import Problem, kernel_module

ROTATE_BYTES = 1 << 30
ROTATE_BYTES_CPU = 1 << 16  # interpreter runs: keep it tiny, 2 buffers
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # docs/design.md tolerances


class SkipOp(RuntimeError):
    """This op cannot be tuned here (kernel missing, no GPU, no process group); the message says why."""


def torch_dtype(name: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def graph_time_us(fn: Callable[[int], Any], nbuf: int, calls: int = 16, replays: int = 15,
                  collective: bool = False) -> float:
    """Median µs per call of `fn(j)` (j cycles over `nbuf` input copies) captured in one CUDA graph.

    `max(calls, nbuf)` (at most 64) calls are captured, timed by `fusedlis.perfmodel.timing.time_graph` (the
    package's one CUDA-graph timing method). `collective=True` (every rank calls this in lockstep): a barrier
    before each replay, so one rank's launch skew is not timed, and the MAX of the ranks' medians is returned,
    so every rank takes the same decision.
    """
    import itertools

    import torch.distributed as dist

    from fusedlis.perfmodel import timing

    calls = max(calls, min(nbuf, 64))
    j = itertools.count()
    t = timing.time_graph(lambda: fn(next(j) % nbuf), calls, max(1, replays),
                          barrier=dist.barrier if collective else None,
                          reduce_max=timing.max_over_ranks if collective else None)
    return t * 1e6


def _space(mod: Any, op: str) -> tuple[Callable | None, Callable | None]:
    """(configs, default_config) functions of `op`: the kernel module's own, else the tuner's (fused op)."""
    cfgs = getattr(mod, f"{op}_configs", None) if mod is not None else None
    dflt = getattr(mod, f"{op}_default_config", None) if mod is not None else None
    if (cfgs is None or dflt is None) and mod is not None and op == "linear_allreduce":
        from fusedlis.tuning import fused

        cfgs, dflt = fused.linear_allreduce_configs, fused.linear_allreduce_default_config
    return cfgs, dflt


class _Base:
    def __init__(self, problem: Problem, sms: int) -> None:
        self.problem = problem
        self.key = dict(problem.key)
        self.sms = sms
        self.mod = kernel_module(problem.op)
        op = problem.op
        self._configs_fn, self._default_fn = _space(self.mod, op)
        if self._configs_fn is None or self._default_fn is None:
            raise SkipOp(f"op {op!r}: fusedlis.triton_kernels has no {op}_configs/{op}_default_config yet")
        self.launcher = getattr(self.mod, op, None)
        self._est = _search.ESTIMATORS.get(op, _search.estimate_none)

    def _cfg_key(self) -> dict[str, Any]:
        # The fused op's space is derived from its launcher, which takes the key without `sms`.
        return dict(self.key) if self.problem.op == "linear_allreduce" else {**self.key, "sms": self.sms}

    def configs(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self._configs_fn(self._cfg_key())]

    def default(self) -> dict[str, Any]:
        return dict(self._default_fn(self._cfg_key()))

    def estimate(self, config: dict[str, Any]) -> _search.Resources:
        own = getattr(self.mod, f"{self.problem.op}_resources", None)
        if own is not None:
            smem, regs = own(self.key, config)
            return _search.Resources(int(smem), int(regs), int(config.get("num_warps", 4)) * 32)
        return self._est(self.key, config)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------------
# GPU

class GpuBench(_Base):
    """Real timings on the current CUDA device: CUDA-graph medians (`graph_time_us`, `replays` x effort)
    by default, or ``triton.testing.do_bench`` medians with `graphs=False` (`rep_ms` budget at effort 1).

    `default()` is what the launcher runs with no tuning cache: for `linear` on a GPU listed in
    `linear_measured.json` that is the measured table's config, not the heuristic.
    """

    def __init__(self, problem: Problem, rep_ms: float = 25.0, check: bool = True,
                 device: str | torch.device | None = None, graphs: bool = True, replays: int = 20) -> None:
        # device="cpu" runs the kernels in the Triton interpreter with wall-clock timing: only for tests
        # of this code path, the numbers mean nothing.
        if device is None:
            if not torch.cuda.is_available():
                raise SkipOp("no CUDA device: GPU timing needs one (use --fake-timer for a CPU dry run)")
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = torch.device(device)
        sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
               if self.device.type == "cuda" else 132)
        super().__init__(problem, sms)
        if self.launcher is None:
            raise SkipOp(f"op {problem.op!r}: no launcher fusedlis.triton_kernels.{problem.op}()")
        if problem.op not in ("linear", "decode_attention"):
            raise SkipOp(f"op {problem.op!r}: no GPU bench written for it yet")
        self.rep_ms = rep_ms
        self.check = check
        self.graphs = graphs and self.device.type == "cuda"
        self.replays = replays
        self.timer_name = "cuda-graph-median" if self.graphs else (
            "do_bench-median" if self.device.type == "cuda" else "cpu-wallclock")
        self.dtype = torch_dtype(self.key["dtype"])
        self.i = 0
        self._checked: set = set()
        self._ready = False

    def _setup(self) -> None:
        # Buffers are allocated on first timing (not when the config space is listed) and freed by close().
        if self._ready:
            return
        problem = self.problem
        dev = self.device
        self._rotate = ROTATE_BYTES if dev.type == "cuda" else ROTATE_BYTES_CPU
        g = torch.Generator(device=dev).manual_seed(0)
        if problem.op == "linear":
            M, N, K = int(self.key["M"]), int(self.key["N"]), int(self.key["K"])
            self.act = None if self.key.get("activation") in (None, "none") else self.key["activation"]
            nbuf = max(2, min(64, math.ceil(self._rotate / (N * K * self.dtype.itemsize))))
            self.w = torch.randn((nbuf, N, K), device=dev, dtype=self.dtype, generator=g).mul_(K ** -0.5)
            self.x = torch.randn((M, K), device=dev, dtype=self.dtype, generator=g)
            self.nbuf = nbuf
        else:
            B, Hq, Hkv, D, S = (int(self.key[k]) for k in ("B", "Hq", "Hkv", "D", "S"))
            per = 2 * B * Hkv * S * D * self.dtype.itemsize
            nbuf = max(1, min(16, math.ceil(self._rotate / per)))
            self.k = torch.randn((nbuf, B, Hkv, S, D), device=dev, dtype=self.dtype, generator=g)
            self.v = torch.randn((nbuf, B, Hkv, S, D), device=dev, dtype=self.dtype, generator=g)
            self.q = torch.randn((B, Hq, D), device=dev, dtype=self.dtype, generator=g)
            self.lens = torch.full((B,), S, device=dev, dtype=torch.int32)
            self.scale = D ** -0.5
            self.nbuf = nbuf
        self._ready = True

    def default(self) -> dict[str, Any]:
        if self.problem.op == "linear" and self.device.type == "cuda" and hasattr(self.mod, "measured_config"):
            k = self.key
            act = None if k.get("activation") in (None, "none") else k["activation"]
            measured = self.mod.measured_config(int(k["M"]), int(k["N"]), int(k["K"]), self.dtype, act, self.device)
            if measured is not None:
                return dict(measured)
        return super().default()

    def _run(self, config: dict[str, Any] | None, j: int) -> torch.Tensor:
        if self.problem.op == "linear":
            return self.launcher(self.x, self.w[j], activation=self.act, config=config)
        return self.launcher(self.q, self.k[j], self.v[j], self.lens, self.scale, config=config)

    def _ref(self) -> torch.Tensor:
        if self.problem.op == "linear":
            return self.mod.linear_ref(self.x, self.w[0], activation=self.act)
        return self.mod.decode_attention_ref(self.q, self.k[0], self.v[0], self.lens, self.scale)

    def _verify(self, config: dict[str, Any] | None) -> None:
        cid = None if config is None else _search.config_id(config)
        if not self.check or cid in self._checked:
            return
        self._setup()
        got = self._run(config, 0).float()
        want = self._ref().float()
        err = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()
        if not err <= _TOL.get(self.dtype, 1e-2):
            raise ValueError(f"wrong result: relative error {err:.2e}")
        self._checked.add(cid)

    def _bench(self, fn, effort: int) -> float:
        import triton.testing

        self._setup()
        if self.graphs:
            return graph_time_us(fn, self.nbuf, replays=self.replays * max(1, effort))

        def step():
            self.i = (self.i + 1) % self.nbuf
            fn(self.i)

        if self.device.type != "cuda":
            import statistics
            import time

            ts = []
            for _ in range(2 * effort):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e6
        ms = triton.testing.do_bench(step, warmup=max(5, self.rep_ms / 4), rep=self.rep_ms * effort,
                                     return_mode="median")
        return float(ms) * 1000.0

    def time(self, config: dict[str, Any], effort: int = 1) -> float:
        self._verify(config)
        return self._bench(lambda j: self._run(config, j), effort)

    def time_lookup(self, effort: int = 1) -> float:
        self._verify(None)
        return self._bench(lambda j: self._run(None, j), effort)

    def baseline(self, effort: int = 1) -> tuple[str, float] | None:
        if self.problem.op == "linear":
            return "cublas", self._bench(lambda j: self._run({"backend": "torch"}, j), effort)
        import torch.nn.functional as F

        q4 = self.q[:, :, None, :]

        def sdpa(j):
            return F.scaled_dot_product_attention(q4, self.k[j], self.v[j], scale=self.scale, enable_gqa=True)

        return "sdpa", self._bench(sdpa, effort)

    def close(self) -> None:
        for name in ("w", "x", "k", "v", "q", "lens"):
            if hasattr(self, name):
                delattr(self, name)
        self._ready = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# Synthetic

class FakeBench(_Base):
    """Analytic roofline-style cost of a config (Hopper-like numbers), for CPU dry runs and tests.

    Deterministic; `effort` is ignored. Models HBM traffic (weights or KV once, activations once per
    N-tile, split-K / split-KV partials), latency hiding from the number of programs in flight, a
    register-spill penalty, and launch overhead. Not a measurement: results are tagged ``fake``.
    """

    HBM = 4.0e12
    LAUNCH_US = 3.0

    def __init__(self, problem: Problem, sms: int = 132) -> None:
        super().__init__(problem, sms)
        self.dtype_bytes = _search.dtype_bytes(self.key)

    def _efficiency(self, programs: int, res: _search.Resources) -> float:
        per_sm = max(1, min(4, _search.Limits().smem_bytes // max(1, res.smem_bytes),
                            65536 // max(1, res.regs_per_thread * res.threads)))
        slots = self.sms * per_sm
        waves = programs / slots
        fill = waves / math.ceil(waves)  # a partial last wave leaves SMs idle
        hide = min(1.0, programs / (2 * self.sms)) ** 0.5  # too few programs cannot hide HBM latency
        spill = 0.6 if res.regs_per_thread > 255 else 1.0
        return max(0.02, 0.92 * fill * hide * spill)

    def time(self, config: dict[str, Any], effort: int = 1) -> float:
        k, eb = self.key, self.dtype_bytes
        res = self.estimate(config)
        if self.problem.op == "linear":
            M, N, K = int(k["M"]), int(k["N"]), int(k["K"])
            n_cols = N // 2 if k.get("activation") == "swiglu" else N
            bm, bn, bk = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
            split = int(config.get("SPLIT_K", 1))
            tiles_n = math.ceil(n_cols / bn)
            programs = math.ceil(M / bm) * tiles_n * split
            traffic = N * K * eb + M * K * eb * tiles_n + (8 * split * M * N if split > 1 else 0)
            flops = 2 * M * N * K
            peak = 600e12 if config.get("USE_DOT", bm >= 16) else 40e12 * min(1.0, 4 / bm)
            t = max(traffic / (self.HBM * self._efficiency(programs, res)), flops / peak)
        elif self.problem.op == "linear_allreduce":
            M, N, K, local = int(k["M"]), int(k["N"]), int(k["K"]), int(k.get("local", 2))
            c = {**self.default(), **config}
            bm, bn = int(c["BM"]), int(c["BN"])
            tiles_n = math.ceil(N / bn)
            programs = math.ceil(M / bm) * tiles_n
            traffic = N * K * eb + M * K * eb * tiles_n
            peak = 600e12 if c.get("USE_DOT", True) else 40e12 * min(1.0, 4 / bm)
            t = max(traffic / (self.HBM * self._efficiency(programs, res)), 2 * M * N * K / peak)
            t += M * N * 4 * (local - 1) / 300e9 + 2e-6  # partials over NVLink + flag round trip
        else:
            B, Hq, Hkv, D, S = (int(k[x]) for x in ("B", "Hq", "Hkv", "D", "S"))
            bn, splits = int(config["BLOCK_N"]), int(config["NUM_SPLITS"])
            splits = max(1, min(splits, math.ceil(S / bn)))
            programs = B * Hkv * splits
            traffic = 2 * B * Hkv * S * D * eb + 8 * B * Hq * splits * D
            t = traffic / (self.HBM * self._efficiency(programs, res)) + 2e-6 * (splits > 1)
        return t * 1e6 + self.LAUNCH_US

    def time_lookup(self, effort: int = 1) -> float:
        from fusedlis import tuning

        cfg = tuning.lookup(self.problem.op, self.key)
        return self.time(cfg if cfg is not None else self.default(), effort)

    def baseline(self, effort: int = 1) -> tuple[str, float] | None:
        k, eb = self.key, self.dtype_bytes
        if self.problem.op == "linear":
            return "cublas", int(k["N"]) * int(k["K"]) * eb / (0.6 * self.HBM) * 1e6 + 5.0
        if self.problem.op == "linear_allreduce":
            M, N, K = int(k["M"]), int(k["N"]), int(k["K"])
            return "cublas+nccl", (N * K * eb / (0.6 * self.HBM) + M * N * eb / 100e9) * 1e6 + 20.0
        B, Hkv, D, S = (int(k[x]) for x in ("B", "Hkv", "D", "S"))
        return "sdpa", 2 * B * Hkv * S * D * eb / (0.5 * self.HBM) * 1e6 + 8.0


# ----------------------------------------------------------------------------------------------------
# Collectives (under torchrun)

_AR: dict[tuple, Any] = {}


def _shared_allreduce(max_bytes: int, dtype: torch.dtype):
    # Symmetric allocation is collective: build one AllReduce per process, the same on every rank.
    key = (max_bytes, dtype)
    if key not in _AR:
        from fusedlis.comm.allreduce import AllReduce

        _AR[key] = AllReduce(backend="auto", max_bytes=max_bytes, dtype=dtype)
    return _AR[key]


def allreduce_algorithms() -> tuple[str, ...]:
    """The device algorithms `fusedlis.comm` offers now (read at run time: the list grows), plus "nccl"."""
    try:
        from fusedlis.comm.device import DEVICE_ALGORITHMS
    except ImportError:
        DEVICE_ALGORITHMS = ()
    return tuple(dict.fromkeys([*DEVICE_ALGORITHMS, "nccl"]))


def _honoured_algorithm(ar: Any, alg: str, nbytes: int) -> bool:
    """Would `AllReduce` use a cache entry naming `alg`? Probed through its own `_tuned` with a fake lookup."""
    tuned = getattr(ar, "_tuned", None)
    if tuned is None:
        return True
    from fusedlis.tuning.fused import _lookup_answer

    with _lookup_answer({"algorithm": alg}):
        try:
            return tuned(nbytes) == alg
        except Exception:
            return False


class AllReduceBench:
    """Which all-reduce algorithm is fastest for one message size.

    Candidates: every name in `fusedlis.comm.device.DEVICE_ALGORITHMS` (read at run time) and "nccl"
    (torch.distributed), minus those `AllReduce` would not take from the cache on this topology (probed
    through `AllReduce._tuned`; `notes()` names them). Collective: every rank must build the same benches
    and call `time` with the same configs in the same order (the tuner does: identical problem lists).
    Each algorithm's sum is checked first and the verdict agreed on by all ranks. On CUDA, each is timed
    with `graph_time_us` (CUDA graph, barrier before each replay, MAX over ranks); on CPU (gloo) with a
    fixed number of wall-clock calls (an adaptive repeat count could differ between ranks and deadlock).
    Key: ``{"nbytes", "dtype", "world_size", "topology": "<nodes>x<gpus per node>"}``.
    """

    def __init__(self, problem: Problem, iters: int = 50, warmup: int = 10, graphs: bool = True,
                 calls: int = 20, replays: int = 15) -> None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise SkipOp("op 'allreduce' needs >= 2 ranks: run under torchrun --nproc-per-node N")
        if int(problem.key["world_size"]) != dist.get_world_size():
            raise SkipOp(f"op 'allreduce': --tp {problem.key['world_size']} != torchrun world size "
                         f"{dist.get_world_size()}")
        self.problem, self.key = problem, dict(problem.key)
        self.iters, self.warmup = iters, warmup
        self.calls, self.replays = calls, replays
        self.dtype = torch_dtype(self.key["dtype"])
        self.numel = int(self.key["nbytes"]) // self.dtype.itemsize
        self.ar = _shared_allreduce(int(problem.meta.get("max_bytes", self.key["nbytes"])), self.dtype)
        self.dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.graphs = graphs and self.dev.type == "cuda"
        self.timer_name = "cuda-graph-median-max-over-ranks" if self.graphs else "events-median-max-over-ranks"
        self.world = dist.get_world_size()
        self._buf = None
        self._checked: dict[str, str] = {}

    def _candidates(self) -> tuple[list[str], list[str]]:
        nbytes = int(self.key["nbytes"])
        if self.ar.device_ar is None:
            return ["nccl"], []
        algs = allreduce_algorithms()
        ok = [a for a in algs if _honoured_algorithm(self.ar, a, nbytes)]
        return ok, [a for a in algs if a not in ok]

    def configs(self) -> list[dict[str, Any]]:
        return [{"algorithm": a} for a in self._candidates()[0]]

    def notes(self) -> str:
        dropped = self._candidates()[1]
        return f"not searched (AllReduce would not use them from the cache here): {','.join(dropped)}" if dropped else ""

    def default(self) -> dict[str, Any]:
        # What AllReduce picks with no cache entry (its built-in crossovers), not a previous tuning result.
        from fusedlis.tuning.fused import _lookup_answer

        with _lookup_answer(None):
            return {"algorithm": self.ar.algorithm_for(int(self.key["nbytes"]))}

    def estimate(self, config: dict[str, Any]) -> _search.Resources:
        return _search.Resources(0, 0, 0)

    def _call(self, alg: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if alg == "nccl":
            out.copy_(x)
            dist.all_reduce(out)
            return out
        return self.ar.device_ar(x, out=out, algorithm=alg)

    def _median_us(self, fn, effort: int = 1) -> float:
        import statistics
        import time

        import torch.distributed as dist

        if self.graphs:
            return graph_time_us(lambda j: fn(), 1, self.calls, self.replays * max(1, effort), collective=True)
        dist.barrier()
        for _ in range(self.warmup):
            fn()
        ts = []
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.iters * effort)]
            for s, e in ev:
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            ts = [s.elapsed_time(e) * 1000.0 for s, e in ev]
        else:
            for _ in range(self.iters * effort):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e6)
        t = torch.tensor([statistics.median(ts)], dtype=torch.float64,
                         device=self.dev if self.dev.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _verify(self, alg: str) -> None:
        import torch.distributed as dist

        if alg in self._checked:
            if self._checked[alg]:
                raise ValueError(self._checked[alg])
            return
        base, x, out = self._buf
        # Rank r sends (r+1)*base, the sum is W(W+1)/2 * base.
        why = ""
        try:
            got = self._call(alg, x, out).float()
            want = base.float() * (self.world * (self.world + 1) / 2)
            err = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()
            if not err <= _TOL.get(self.dtype, 1e-2):
                why = f"all-reduce {alg!r} gave a wrong sum (relative error {err:.2e})"
            if alg != "nccl" and self.ar.ws is not None and hasattr(self.ar.ws, "check"):
                self.ar.ws.check()
        except Exception as e:  # an algorithm this topology cannot run: fail it on every rank alike
            why = f"all-reduce {alg!r}: {type(e).__name__}: {e}"
        bad = torch.tensor([1.0 if why else 0.0], device=self.dev)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self._checked[alg] = why or ("wrong sum or error on another rank" if bad.item() else "")
        if self._checked[alg]:
            raise ValueError(self._checked[alg])

    def time(self, config: dict[str, Any], effort: int = 1) -> float:
        import torch.distributed as dist

        alg = config["algorithm"]
        if self._buf is None:
            g = torch.Generator(device=self.dev).manual_seed(1234)  # same base on every rank
            base = torch.randn(self.numel, device=self.dev, dtype=self.dtype, generator=g)
            self._buf = (base, base * (dist.get_rank() + 1), torch.empty_like(base))
        self._verify(alg)
        _, x, out = self._buf
        return self._median_us(lambda: self._call(alg, x, out), max(1, effort))

    def baseline(self, effort: int = 1) -> tuple[str, float] | None:
        return "nccl", self.time({"algorithm": "nccl"}, effort)

    def time_lookup(self, effort: int = 1) -> float:
        alg = self.ar.algorithm_for(int(self.key["nbytes"]))  # through AllReduce's own cache lookup
        return self.time({"algorithm": alg}, effort)

    def close(self) -> None:
        self._buf = None
