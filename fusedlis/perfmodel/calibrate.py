"""Measure this machine's GPUs and fit a hardware profile (`fusedlis calibrate`).

What is measured (bf16, medians, CUDA graphs to hide launch gaps; collectives timed with bench/allreduce.py's
method, `fusedlis.perfmodel.timing.time_graph`: 100 calls per graph, median of 30 replays, max over ranks):
- all-reduce latency over the visible GPUs for each size: NCCL, and fusedlis' own all-reduce
  (`fusedlis.comm.AllReduce`: one-shot and two-shot in the flag and the LL protocol, NVRAR LL on logical nodes
  of one GPU) when it imports and runs, else torch symmetric-memory one-/two-shot;
- fusedlis' all-reduce + residual + RMSNorm kernel (`all_reduce_norm`) against the LL one-shot alone (decode rows);
- a bf16 add of two 1 GiB tensors (the reduction rate, gamma);
- GEMM alone and GEMM followed by each all-reduce in one graph (how much all-reduce latency hides);
- decode-shaped GEMMs (M=1, Llama 8B/70B TP=2 weights, rotated through >= 2 GB so L2 does not hold them);
- a large GEMM's rate;
- the fused row-parallel GEMM + all-reduce + residual + RMSNorm kernel (`fusedlis.triton_kernels.linear_allreduce`
  with residual and norm weight, as `Engine(allreduce="fused")` runs o_proj and down_proj) on the engine's
  row-parallel shapes at TP = the number of GPUs (`fused_linear_shapes`; on 2 GPUs Llama 8B 2048->4096,
  7168->4096, 70B 4096->8192, 14336->8192) at M = 1, 8, 32, 64 rows, weights rotated past L2, with the cuBLAS
  GEMM of the same shape alone for comparison (`_measure_fused_linear`). Decode steps in fused mode use this
  table (`Hardware.fused_linear_ar`); a failure is recorded in the profile's sources and skipped.

Fits: `kernel_overhead` and `hbm_bw` from GEMM time = overhead + bytes / bw; NVLink (alpha, beta) for NCCL from
its times with the ring model, and for custom kernels from theirs with the matching model, by least squares on
relative error (each LL variant its own terms; NVRAR LL with the model of its logical-node topology). gamma = add
time / operand bytes. The fused norm's cost per row: `fit_norm_row`.
Inter-node terms and anything not measured come from the base profile. Fitting needs no GPU (`fit_link`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel import timing
from fusedlis.perfmodel.hardware import Hardware, Link, get_hardware

# (K, N) per GPU at TP=2, from Llama-3.1-8B and -70B: qkv, o, gate_up, down
GEMM_SHAPES = [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096),
               (8192, 5120), (4096, 8192), (8192, 28672), (14336, 8192)]


# ---------------------------------------------------------------- fitting (CPU)
def linear_coefficients(algo: str, nodes: int, gpus_per_node: int) -> tuple[float, float, float]:
    """(c_alpha, c_beta, c_gamma) with cost = c_alpha*alpha + m*(c_beta*beta + c_gamma*gamma) on one link class.

    Only valid where the algorithm is linear in its parameters (one node, or one GPU per node, and not the
    min() of `nccl`).
    """
    if nodes > 1 and gpus_per_node > 1:
        raise ValueError("linear coefficients need a single link class: nodes == 1 or gpus_per_node == 1")
    if coll.resolve(algo) in ("nccl", "auto"):
        raise ValueError(f"{algo} chooses between algorithms: fit the one it ran")

    def hw(alpha: float, beta: float, gamma: float) -> Hardware:
        link = Link(alpha, beta, alpha, beta)
        return Hardware("unit", "unit", gpus_per_node, 1.0, 1.0, 1.0, 0.0, gamma, link, link)

    f = coll.ALGORITHMS[coll.resolve(algo)]
    ca = f(hw(1.0, 0.0, 0.0), nodes, gpus_per_node, 1.0).total
    cb = f(hw(0.0, 1.0, 0.0), nodes, gpus_per_node, 1.0).total
    cg = f(hw(0.0, 0.0, 1.0), nodes, gpus_per_node, 1.0).total
    return ca, cb, cg


def fit_link(samples: list[tuple[str, int, float, float]], gamma: float, nodes: int = 1) -> tuple[float, float]:
    """Least-squares (alpha, beta) in seconds, seconds/byte from (algo, gpus, bytes, seconds) samples.

    Each sample's row is divided by its time so that small messages weigh as much as large ones (relative
    error). alpha and beta are clamped to >= 0 and >= 1e-15 s/B.
    """
    import numpy as np

    if len(samples) < 2:
        raise ValueError("need at least 2 samples to fit alpha and beta")
    rows, rhs = [], []
    for algo, p, m, t in samples:
        if t <= 0 or m <= 0:
            raise ValueError(f"bad sample {algo} p={p} bytes={m} time={t}")
        ca, cb, cg = linear_coefficients(algo, nodes, p // nodes)
        rows.append([ca / t, m * cb / t])
        rhs.append((t - m * cg * gamma) / t)
    sol, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return max(float(sol[0]), 0.0), max(float(sol[1]), 1e-15)


def _rel_sse(samples: list[tuple[str, int, float, float]], gamma: float, nodes: int, a: float, b: float) -> float:
    err = 0.0
    for algo, p, m, t in samples:
        ca, cb, cg = linear_coefficients(algo, nodes, p // nodes)
        err += ((ca * a + m * (cb * b + cg * gamma)) / t - 1.0) ** 2
    return err


def fit_regimes(samples: list[tuple[str, int, float, float]], gamma: float, nodes: int = 1, min_points: int = 3,
                gain: float = 0.5) -> list[tuple[float, float, float]]:
    """Size regimes [(max_bytes, alpha, beta), ..., (inf, alpha, beta)] from (algo, gpus, bytes, seconds) samples.

    Use for an implementation that switches protocol or tile size with message size (NCCL LL/LL128 -> Simple,
    fusedlis' 1024 -> 4096-element tiles at 32 KB): one (alpha, beta) per regime. Tries every split between two
    measured sizes that leaves >= `min_points` sizes on each side and keeps the best one only if it cuts the
    summed squared relative error below `gain` times the single-line fit's; else one regime. The bound is the
    geometric mean of the two sizes around the split (sizes in between were not measured).
    """
    one = fit_link(samples, gamma, nodes)
    sizes = sorted({m for _, _, m, _ in samples})
    best_err, best = gain * _rel_sse(samples, gamma, nodes, *one), [(math.inf, *one)]
    for k in range(min_points, len(sizes) - min_points + 1):
        lo_s = [x for x in samples if x[2] <= sizes[k - 1]]
        hi_s = [x for x in samples if x[2] > sizes[k - 1]]
        lo, hi = fit_link(lo_s, gamma, nodes), fit_link(hi_s, gamma, nodes)
        err = _rel_sse(lo_s, gamma, nodes, *lo) + _rel_sse(hi_s, gamma, nodes, *hi)
        if err < best_err:
            best_err, best = err, [(math.sqrt(sizes[k - 1] * sizes[k]), *lo), (math.inf, *hi)]
    return best


def fit_gemm(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(overhead seconds, bytes/s) from (bytes, seconds) GEMM samples, least squares on relative error."""
    import numpy as np

    if len(samples) < 2:
        raise ValueError("need at least 2 GEMM samples")
    a = np.array([[1.0 / t, b / t] for b, t in samples])
    sol, *_ = np.linalg.lstsq(a, np.ones(len(samples)), rcond=None)
    overhead, inv_bw = float(sol[0]), float(sol[1])
    if inv_bw <= 0:
        raise ValueError("GEMM times do not grow with bytes: cannot fit a bandwidth")
    return max(overhead, 0.0), 1.0 / inv_bw


def fit_overlap(samples: list[tuple[float, float, float]]) -> float:
    """Fraction h in [0, 1] of all-reduce latency hidden: samples (measured pair, serial prediction, latency term).

    Least squares on relative error of measured = serial - h * latency.
    """
    import numpy as np

    if not samples:
        raise ValueError("need at least one GEMM + all-reduce sample")
    a = np.array([lat / t for t, _, lat in samples])
    y = np.array([(serial - t) / t for t, serial, _ in samples])
    if not a.any():
        return 0.0
    return float(min(max(a @ y / (a @ a), 0.0), 1.0))


def fit_norm_row(samples: list[tuple[int, float, float]]) -> float:
    """Seconds per row that fusing residual + RMSNorm adds to an all-reduce, from (rows, fused seconds,
    all-reduce alone seconds) samples: least squares through the origin of the difference against rows,
    clamped to >= 0 (a fused kernel faster than the all-reduce alone counts as no extra cost)."""
    if not samples:
        raise ValueError("need at least one all_reduce_norm sample")
    num = sum(m * (t - base) for m, t, base in samples)
    den = sum(m * m for m, _, _ in samples)
    return max(num / den, 0.0) if den > 0 else 0.0


def fused_linear_table(rows: list[dict[str, Any]]) -> tuple[tuple[int, int, int, tuple[tuple[int, float], ...]], ...]:
    """`Hardware.fused_linear_ar` from `fused_linear` rows (gpus, K, N, M, us): ((gpus, K, N, ((M, seconds),
    ...)), ...), the median where one (gpus, K, N, M) was measured more than once."""
    by: dict[tuple[int, int, int], dict[int, list[float]]] = {}
    for r in rows:
        if r.get("kind") != "fused_linear":
            continue
        t = float(r["us"]) * 1e-6
        if not (t > 0 and math.isfinite(t)):
            continue
        key = (int(r["gpus"]), int(r["K"]), int(r["N"]))
        by.setdefault(key, {}).setdefault(int(r["M"]), []).append(t)
    return tuple((*key, tuple((m, statistics.median(ts)) for m, ts in sorted(pts.items())))
                 for key, pts in sorted(by.items()))


def _nodes(r: dict[str, Any]) -> int:
    return int(r.get("nodes") or 1)


# ---------------------------------------------------------------- measurement (GPU)
def _time_graph(fn: Any, calls: int, replays: int = timing.REPLAYS, before_replay: Any = None,
                reduce_max: Any = None) -> float:
    """Median seconds per call of `fn` captured `calls` times in one CUDA graph (`timing.time_graph`, the
    method of bench/allreduce.py). `before_replay` (e.g. a barrier) runs before each timed replay so that ranks
    start together; `reduce_max` (e.g. `timing.max_over_ranks`) makes every rank return the slowest rank's time."""
    return timing.time_graph(fn, calls, replays, barrier=before_replay, reduce_max=reduce_max)


def _time_collective(fn: Any, calls: int, replays: int = timing.REPLAYS) -> float:
    """A collective timed as bench/allreduce.py times it: barrier before each replay, max over ranks."""
    import torch.distributed as dist

    return _time_graph(fn, calls, replays, before_replay=dist.barrier, reduce_max=timing.max_over_ranks)


def _custom_allreduces(max_bytes: int) -> tuple[str, dict[str, tuple[Any, int, int]], Any]:
    """(label, {algo: (fn(x, out), max bytes, nodes)}, AllReduce or None) for fusedlis' own kernels, else torch
    symmetric memory's one-shot and two-shot.

    fusedlis: one-shot and two-shot in the flag protocol (up to `max_bytes`) and in the LL protocol (up to the
    communicator's `ll_max_bytes`) on one node, and NVRAR LL on `world` logical nodes of one GPU (the rail
    exchange that `Engine(allreduce="nvrar")` with FUSEDLIS_GPUS_PER_NODE=1 and auto across logical nodes run).
    A variant that does not build or disagrees with NCCL is left out (and said so in the label).
    """
    import torch
    import torch.distributed as dist

    def check(fn: Any) -> None:
        x = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
        ref = x.double()
        dist.all_reduce(ref)
        out = torch.full_like(x, float("nan"))
        fn(x, out)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            raise RuntimeError(f"disagrees with NCCL (relative error {err:.2e})")

    try:
        from fusedlis.comm import AllReduce, Topology

        world = dist.get_world_size()
        ar = AllReduce(backend="auto", max_bytes=max_bytes, topology=Topology(world, world))
        if ar.device_ar is None:
            raise RuntimeError("fell back to NCCL (no NVSHMEM / CUDA kernels)")
        fns: dict[str, tuple[Any, int, int]] = {
            "oneshot": (lambda x, out: ar.device_ar(x, out=out, algorithm="one_shot"), max_bytes, 1),
            "twoshot": (lambda x, out: ar.device_ar(x, out=out, algorithm="two_shot"), max_bytes, 1)}
        for fn, _, _ in fns.values():
            check(fn)
        skipped = []
        ll_max = int(getattr(ar, "ll_max_bytes", 0) or 0)
        for algo, name in (("oneshot_ll", "one_shot_ll"), ("twoshot_ll", "two_shot_ll")):
            try:
                if ll_max <= 0:
                    raise RuntimeError("no LL slots (ll_max_bytes = 0)")
                fn = (lambda name: lambda x, out: ar.device_ar(x, out=out, algorithm=name))(name)
                check(fn)
                fns[algo] = (fn, ll_max, 1)
            except Exception as e:  # noqa: BLE001 - measure the rest
                skipped.append(f"{name}: {type(e).__name__}: {e}")
        if world >= 2 and world & (world - 1) == 0:
            try:
                ar_rail = AllReduce(backend="nvrar", max_bytes=max_bytes, topology=Topology(world, 1))
                rail_ll = int(getattr(ar_rail, "ll_max_bytes", 0) or 0)
                if ar_rail.device_ar is None or rail_ll <= 0:
                    raise RuntimeError("no device kernels or no LL slots on logical nodes")
                fn = lambda x, out: ar_rail.device_ar(x, out=out, algorithm="nvrar_ll")  # noqa: E731
                check(fn)
                fns["nvrar_ll"] = (fn, rail_ll, world)
            except Exception as e:  # noqa: BLE001
                skipped.append(f"nvrar_ll on {world}x1: {type(e).__name__}: {e}")
        label = "fusedlis" + (f" (not measured: {'; '.join(skipped)})" if skipped else "")
        return label, fns, ar
    except Exception as e:  # noqa: BLE001 - any failure means: fall back, and say so
        err = f"{type(e).__name__}: {e}"
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "set_backend"):
            try:
                symm_mem.set_backend("CUDA")
            except Exception:  # noqa: BLE001 - already set
                pass
        name = dist.group.WORLD.group_name
        buf = symm_mem.empty(max_bytes // 2, dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(buf, name)

        def one(x: Any, out: Any) -> None:
            v = buf[: x.numel()]
            v.copy_(x)
            out.copy_(torch.ops.symm_mem.one_shot_all_reduce(v, "sum", name))

        def two(x: Any, out: Any) -> None:
            v = buf[: x.numel()]
            v.copy_(x)
            out.copy_(torch.ops.symm_mem.two_shot_all_reduce_(v, "sum", name))

        for fn in (one, two):
            check(fn)
        # timed without the copies: the op on the symmetric buffer itself
        fns = {"oneshot": (lambda x, out: torch.ops.symm_mem.one_shot_all_reduce(buf[: x.numel()], "sum", name),
                           max_bytes, 1),
               "twoshot": (lambda x, out: torch.ops.symm_mem.two_shot_all_reduce_(buf[: x.numel()], "sum", name),
                           max_bytes, 1)}
        return f"torch-symm (fusedlis AllReduce unavailable: {err})", fns, None
    except Exception as e2:  # noqa: BLE001
        return f"none (fusedlis: {err}; torch symm: {type(e2).__name__}: {e2})", {}, None


def _nccl_allreduce() -> tuple[str, Any]:
    """(label, fn(x)) for NCCL: through fusedlis' AllReduce(backend="nccl") when it imports, else torch's."""
    import torch.distributed as dist

    try:
        from fusedlis.comm import AllReduce

        ar = AllReduce(backend="nccl")
        return "fusedlis-nccl", lambda x: ar(x, inplace=True)
    except Exception:  # noqa: BLE001 - the same NCCL call without the wrapper
        return "torch-nccl", lambda x: dist.all_reduce(x)


def _allreduce_schedule(sizes: list[int], impls: list[tuple[str, str, int, int]]) -> list[tuple[int, str, str, int]]:
    """The order in which all-reduces are timed: bench/allreduce.py's, every implementation at one size before
    the next size (NCCL first). `impls`: (impl, algo, max bytes, nodes); returns (bytes, impl, algo, nodes)."""
    return [(m, impl, algo, nodes) for m in sizes for impl, algo, max_m, nodes in impls if m <= max_m]


# Full passes over (size, implementation), the median per point kept: single points of one pass moved by 10-16%
# between two runs minutes apart on one machine (NCCL 8 KB: 15.4 vs 14.0 us, 2xH200 07:50), more than the model
# errs. Interleaved passes spread a slow spell of the machine over all points instead of a few.
ALLREDUCE_PASSES = timing.PASSES


def _measure_allreduces(world: int, sizes: list[int], iters: int = timing.CALLS,
                        replays: int = timing.REPLAYS) -> list[dict[str, Any]]:
    """Every all-reduce and GEMM + all-reduce row, on an initialised NCCL process group (all ranks call it).

    Timed like bench/allreduce.py (`timing.time_graph`: `iters` calls per graph, `replays` replays after a
    barrier each, median, maximum over ranks; clocks warmed first; fusedlis' communicators built before NCCL is
    timed; sizes outer, implementations inner), so that the profile and that bench measure the same thing."""
    import torch
    import torch.distributed as dist

    rows: list[dict[str, Any]] = []
    x0 = torch.randn(max(sizes) // 2, dtype=torch.bfloat16, device="cuda")
    dist.all_reduce(x0)
    torch.cuda.synchronize()
    nccl_label, nccl_fn = _nccl_allreduce()
    rows.append({"kind": "note", "impl": nccl_label})
    label, fns, ar = _custom_allreduces(max(sizes))
    rows.append({"kind": "note", "impl": label})
    rows.append({"kind": "note", "impl": f"timing: {iters} calls per CUDA graph, median of {replays} replays "
                                         "(barrier before each), max over ranks (bench/allreduce.py's method); "
                                         f"{ALLREDUCE_PASSES} interleaved passes (separate captures), trimmed mean (timing.capture_center)"})
    impl = label.split(" ", 1)[0]
    timing.warm_clocks()
    impls = [("nccl", "ring", max(sizes), 1)] + [(impl, algo, max_m, nodes) for algo, (_, max_m, nodes) in fns.items()]
    schedule = _allreduce_schedule(sizes, impls)
    times: dict[tuple[int, str, str, int], list[float]] = {}
    for _ in range(ALLREDUCE_PASSES):
        for m, im, algo, nodes in schedule:
            x = torch.randn(m // 2, dtype=torch.bfloat16, device="cuda")
            if im == "nccl":
                t = _time_collective(lambda: nccl_fn(x), iters, replays)
            else:
                out = torch.empty_like(x)
                fn = fns[algo][0]
                t = _time_collective(lambda: fn(x, out), iters, replays)  # noqa: B023 - used before the next loop
            times.setdefault((m, im, algo, nodes), []).append(t)
            dist.barrier()
    for (m, im, algo, nodes), ts in times.items():
        row = {"kind": "allreduce", "impl": im, "algo": algo, "gpus": world, "bytes": m,
               "us": timing.capture_center(ts) * 1e6}
        if im != "nccl":
            row["nodes"] = nodes
        rows.append(row)
    one_node = {algo: fn for algo, (fn, _, nodes) in fns.items() if nodes == 1}
    rows += _measure_layers(world, iters, one_node, impl, nccl_fn, replays)
    if ar is not None:
        rows += _measure_norm(ar, world, iters, impl, replays)
    rows += _measure_fused_linear(world, iters, replays)
    return rows


NORM_SHAPES = [(m, h) for h in (4096, 8192) for m in (1, 8, 32, 64)]  # decode rows x hidden (Llama 8B / 70B)


def _measure_norm(ar: Any, world: int, iters: int, impl: str, replays: int = timing.REPLAYS) -> list[dict[str, Any]]:
    """All-reduce + residual + RMSNorm in one kernel (`all_reduce_norm`) and the one-shot LL all-reduce alone on
    the same rows [M, H]; shapes the kernel does not support are skipped, any failure ends the measurement."""
    import torch
    import torch.distributed as dist

    rows: list[dict[str, Any]] = []
    dev = ar.device_ar
    if dev is None or not hasattr(dev, "all_reduce_norm") or not hasattr(dev, "supports_norm"):
        return [{"kind": "note", "impl": "all_reduce_norm not available: not measured"}]
    try:
        for m, h in NORM_SHAPES:
            if not dev.supports_norm(m, h):
                continue
            x = torch.randn(m, h, dtype=torch.bfloat16, device="cuda")
            res = torch.randn_like(x)
            w = torch.randn(h, dtype=torch.bfloat16, device="cuda")
            out, res_out = torch.empty_like(x), torch.empty_like(x)
            t_norm = _time_collective(lambda: dev.all_reduce_norm(x, res, w, 1e-5, out=out, res_out=res_out),
                                      iters, replays)
            dist.barrier()
            t_ar = _time_collective(lambda: dev(x, out=out, algorithm="one_shot_ll"), iters, replays)
            dist.barrier()
            rows.append({"kind": "allreduce_norm", "impl": impl, "algo": "oneshot_ll", "gpus": world, "M": m, "N": h,
                         "bytes": m * h * 2, "us": t_norm * 1e6, "base_us": t_ar * 1e6})
    except Exception as e:  # noqa: BLE001 - the rest of calibration stands without it
        rows.append({"kind": "note", "impl": f"all_reduce_norm failed: {type(e).__name__}: {e}"})
    return rows


FUSED_LINEAR_MS = (1, 8, 32, 64)  # decode rows
FUSED_LINEAR_MODELS = ("llama-3.1-8b", "llama-3.1-70b")
FUSED_LINEAR_NOTE = "fused linear_allreduce"  # notes with this prefix reach the profile's sources


def fused_linear_shapes(world: int) -> list[tuple[int, int]]:
    """(K per GPU, N) of the row-parallel layers (o_proj, down_proj) of Llama-3.1 8B and 70B at TP = `world`,
    as `fusedlis.perfmodel.step.row_parallel_shapes` costs them: on 2 GPUs 2048->4096, 7168->4096, 4096->8192,
    14336->8192."""
    from fusedlis.perfmodel.step import row_parallel_shapes
    from fusedlis.perfmodel.volume import model_shape

    out: list[tuple[int, int]] = []
    for name in FUSED_LINEAR_MODELS:
        shape = model_shape(name)
        if shape.num_attention_heads % world or shape.intermediate_size % world:
            continue
        out += [s for s in row_parallel_shapes(shape, world) if s not in out]
    return out


def _measure_fused_linear(world: int, iters: int, replays: int = timing.REPLAYS,
                          shapes: list[tuple[int, int]] | None = None,
                          ms: tuple[int, ...] = FUSED_LINEAR_MS, time_collective: Any = None,
                          time_local: Any = None, kernel: Any = None, device: str = "cuda",
                          rotate_bytes: float = 1e9) -> list[dict[str, Any]]:
    """The fused GEMM + all-reduce + residual + RMSNorm kernel, `linear_allreduce(x, w, ws, residual,
    norm_weight, eps)` as the engine's fused mode calls it (`fusedlis.engine._fused_row_linear`: a
    `FusedAllReduceWorkspace.from_torch_symm` workspace, the kernel's own configuration choice), on every rank.

    Per (K, N) of `shapes` (default `fused_linear_shapes(world)`) and M of `ms`: weights [N, K] rotated through
    >= `rotate_bytes` (1 GB) of copies (past L2, as `_measure_layers`), timed with `time_collective` (default
    `_time_collective`: `timing.time_graph`, barrier before each replay, max over ranks), and the cuBLAS GEMM x @ w.T of the same
    shape alone with `time_local` (default `_time_graph`). The kernel's result is first checked against NCCL +
    torch on the first shape. Any failure (no Triton kernel, no symmetric memory, a wrong result, a timeout)
    ends the measurement with a note (`FUSED_LINEAR_NOTE ... not measured`/`failed`) that reaches the
    profile's sources; the rows measured before it are kept. Every rank runs the same sequence; a failure seen
    by one rank is shared with the others (MIN all-reduce of an ok flag) after each point, so that all stop
    together (a rank that fails inside a timed graph while its peer waits in a barrier can still hang: the
    failures expected here, a missing kernel or a wrong result, happen on every rank alike).
    `kernel`: (workspace factory (max_m, max_n), linear_allreduce), default fusedlis' (tests pass fakes)."""
    import torch
    import torch.distributed as dist

    time_collective = time_collective or _time_collective
    time_local = time_local or _time_graph
    shapes = fused_linear_shapes(world) if shapes is None else shapes
    if world < 2 or not shapes:
        return [{"kind": "note", "impl": f"{FUSED_LINEAR_NOTE}: not measured (needs >= 2 GPUs and a Llama shape "
                                         f"divisible by {world})"}]

    def agree(ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    rows: list[dict[str, Any]] = []
    try:
        if kernel is None:
            from fusedlis.triton_kernels.linear_allreduce import FusedAllReduceWorkspace, linear_allreduce

            kernel = (FusedAllReduceWorkspace.from_torch_symm, linear_allreduce)
        make_ws, linear_allreduce = kernel
        fws = make_ws(max(ms), max(n for _, n in shapes))
    except Exception as e:  # noqa: BLE001 - the rest of calibration stands without it
        agree(False)
        return [{"kind": "note", "impl": f"{FUSED_LINEAR_NOTE}: not measured (workspace: {type(e).__name__}: {e})"}]
    if not agree(True):
        return [{"kind": "note", "impl": f"{FUSED_LINEAR_NOTE}: not measured (workspace failed on another rank)"}]
    eps = 1e-5
    gen = torch.Generator(device=device).manual_seed(11 + dist.get_rank())
    failed: str | None = None

    def point(stage_: str, fn: Any) -> bool:
        """Run one step on every rank and keep the row it returns; False (and `failed` set, the row dropped) if
        it raised on any rank."""
        nonlocal failed
        err, row = None, None
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - keep what was measured
            err = f"{stage_}: {type(e).__name__}: {e}"
        if agree(err is None):
            if row is not None:
                rows.append(row)
            return True
        failed = err or f"{stage_}: failed on another rank"
        return False

    for si, (k, n) in enumerate(shapes):
        st: dict[str, Any] = {}
        wbytes = k * n * 2
        copies = max(2, math.ceil(rotate_bytes / wbytes))
        calls = max(copies, iters)

        def weights() -> None:
            st["w"] = [torch.randn(n, k, dtype=torch.bfloat16, device=device, generator=gen) / k ** 0.5
                       for _ in range(copies)]
            st["nw"] = torch.rand(n, dtype=torch.bfloat16, device=device, generator=gen) + 0.5

        ok = point(f"K={k} N={n} weights", weights)
        for m in ms if ok else ():
            def measure_m(m: int = m) -> dict[str, Any]:
                w, nw = st["w"], st["nw"]
                x = torch.randn(m, k, dtype=torch.bfloat16, device=device, generator=gen)
                # the residual stream is the same on every rank
                res = torch.randn(m, n, dtype=torch.bfloat16, device=device,
                                  generator=torch.Generator(device=device).manual_seed(5))
                out = (torch.empty(m, n, dtype=torch.bfloat16, device=device),
                       torch.empty(m, n, dtype=torch.bfloat16, device=device))
                if si == 0 and m == ms[min(1, len(ms) - 1)]:
                    normed, _ = linear_allreduce(x, w[0], fws, res, nw, eps, out=out)
                    y = x.double() @ w[0].double().T
                    dist.all_reduce(y)
                    h = y + res.double()
                    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * nw.double()
                    rel = ((normed.double() - ref).norm() / ref.norm()).item()
                    if not rel < 2e-2:
                        raise RuntimeError(f"disagrees with NCCL + torch (relative error {rel:.2e})")
                it = iter(range(10**9))
                t = time_collective(lambda: linear_allreduce(x, w[next(it) % copies], fws, res, nw, eps, out=out),
                                    calls, replays)
                dist.barrier()
                it2 = iter(range(10**9))
                g = time_local(lambda: torch.matmul(x, w[next(it2) % copies].T, out=out[0]), calls)
                if hasattr(fws, "check"):
                    fws.check()  # raises if a rank timed out waiting for its peer
                return {"kind": "fused_linear", "impl": "fusedlis", "algo": "linear_allreduce+res+norm",
                        "gpus": world, "K": k, "N": n, "M": m, "bytes": wbytes + 2 * m * (k + 3 * n),
                        "us": t * 1e6, "gemm_us": g * 1e6}

            if not point(f"K={k} N={n} M={m}", measure_m):
                break
        st.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        if failed is not None:
            rows.append({"kind": "note", "impl": f"{FUSED_LINEAR_NOTE} failed ({failed}): not measured from "
                                                 "there on"})
            break
    return rows


def _worker(rank: int, world: int, port: int, sizes: list[int], iters: int, outdir: str,
            replays: int = timing.REPLAYS) -> None:
    import json

    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    rows = _measure_allreduces(world, sizes, iters, replays)
    if rank == 0:
        Path(outdir, "rank0.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


LAYER_SHAPES = [(2048, 4096), (7168, 4096)]  # Llama-3.1-8B o_proj and down_proj at TP=2


def _measure_layers(world: int, iters: int, fns: dict[str, Any], impl: str, nccl_fn: Any,
                    replays: int = timing.REPLAYS) -> list[dict[str, Any]]:
    """GEMM alone and GEMM followed by each all-reduce in one graph (M=1, weights rotated past L2)."""
    import torch
    import torch.distributed as dist

    rows = []
    for k, n in LAYER_SHAPES:
        copies = max(2, math.ceil(1e9 / (k * n * 2)))
        ws = [torch.randn(k, n, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        z = torch.empty_like(y)
        calls = max(copies, iters)
        variants: dict[tuple[str, str], Any] = {("gemm", "none"): None, ("nccl", "nccl"): lambda: nccl_fn(y)}
        for algo, fn in fns.items():
            variants[(impl, algo)] = lambda fn=fn: fn(y, z)  # noqa: B023 - bound by the default
        times = {}
        for key, ar in variants.items():
            it = iter(range(10**9))

            def step(ar: Any = ar, it: Any = it) -> None:
                torch.matmul(x, ws[next(it) % copies], out=y)
                if ar is not None:
                    ar()

            times[key] = _time_collective(step, calls, replays)
            dist.barrier()
        for (im, algo), t in times.items():
            if im != "gemm":
                rows.append({"kind": "layer", "impl": im, "algo": algo, "gpus": world, "K": k, "N": n, "M": 1,
                             "bytes": n * 2, "us": t * 1e6, "gemm_us": times[("gemm", "none")] * 1e6})
        del ws
    return rows


def _measure_single_gpu() -> list[dict[str, Any]]:
    import torch

    rows: list[dict[str, Any]] = []
    n = 1 << 29  # 1 GiB of bf16 per operand
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    c = torch.empty_like(a)
    # an elementwise kernel: a copy_ captured in a graph becomes a memcpy node run by a copy engine (slower)
    t = _time_graph(lambda: torch.add(a, b, out=c), 5)
    rows.append({"kind": "reduce", "bytes": 2 * n, "us": t * 1e6, "GBps": 3 * 2 * n / t / 1e9})
    s_out = torch.empty((), dtype=torch.float32, device="cuda")
    t = _time_graph(lambda: torch.sum(a, dim=0, dtype=torch.float32, out=s_out), 5)  # a pure HBM read
    rows.append({"kind": "read", "bytes": 2 * n, "us": t * 1e6, "GBps": 2 * n / t / 1e9})
    del a, b, c
    for k, nn in GEMM_SHAPES:
        wbytes = k * nn * 2
        copies = max(2, math.ceil(2e9 / wbytes))
        ws = [torch.randn(k, nn, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(1, nn, dtype=torch.bfloat16, device="cuda")
        calls = max(copies, 20)
        it = iter(range(10**9))
        t = _time_graph(lambda: torch.matmul(x, ws[next(it) % copies], out=out), calls)
        rows.append({"kind": "gemm", "M": 1, "K": k, "N": nn, "bytes": wbytes + 2 * (k + nn), "us": t * 1e6})
        del ws
    torch.cuda.empty_cache()
    s = 8192
    a = torch.randn(s, s, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(s, s, dtype=torch.bfloat16, device="cuda")
    c = torch.empty(s, s, dtype=torch.bfloat16, device="cuda")
    t = _time_graph(lambda: torch.matmul(a, b, out=c), 10)
    rows.append({"kind": "peak", "M": s, "K": s, "N": s, "us": t * 1e6, "TFLOPs": 2 * s**3 / t / 1e12})
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def measure(sizes: list[int], iters: int = timing.CALLS, gpus: int | None = None,
            replays: int = timing.REPLAYS) -> list[dict[str, Any]] | None:
    """Run every measurement on the visible GPUs; returns raw rows (dicts with 'kind').

    Alone it starts one process per GPU itself; under `torchrun --nproc-per-node N` it uses the N ranks and
    returns the rows on rank 0 and None on the others.
    """
    import json

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("calibrate needs CUDA GPUs; none are visible here")
    if _launched_by_torchrun():
        import torch.distributed as dist

        rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
        if gpus is not None and gpus != n:
            raise ValueError(f"--gpus {gpus} but torchrun started {n} ranks")
        torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        ar_rows = _measure_allreduces(n, sizes, iters, replays)
        dist.barrier()
        if rank != 0:
            return None
    else:
        n = torch.cuda.device_count() if gpus is None else gpus
        if not 1 <= n <= torch.cuda.device_count():
            raise ValueError(f"--gpus {gpus} but {torch.cuda.device_count()} CUDA devices are visible")
        ar_rows = []
        if n >= 2:
            import torch.multiprocessing as mp

            with tempfile.TemporaryDirectory() as d:
                mp.spawn(_worker, args=(n, _free_port(), sizes, iters, d, replays), nprocs=n, join=True)
                ar_rows = json.loads(Path(d, "rank0.json").read_text())
    rows = [{"kind": "device", "name": torch.cuda.get_device_name(), "gpus": n,
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}]
    return rows + ar_rows + _measure_single_gpu()


def _regime_text(regs: list[tuple[float, float, float]]) -> str:
    parts = [f"alpha {a * 1e6:.2f} us, {1e-9 / b:.0f} GB/s" + (f" up to {mx / 1024:.0f} KiB" if mx != math.inf
                                                                else "") for mx, a, b in regs]
    return "; ".join(parts)


def profile_from_measurements(rows: list[dict[str, Any]], base: Hardware, min_regime_points: int = 3) -> Hardware:
    """Fit a profile from raw rows (as `measure` returns or `read_raw_csv` reads); unmeasured fields from `base`.

    Each all-reduce implementation gets size regimes (`fit_regimes`) when its times show a protocol switch and
    each regime has >= `min_regime_points` measured sizes; a large `min_regime_points` forces one regime.
    """
    dev = next((r for r in rows if r.get("kind") == "device"), {})
    copies = [r for r in rows if r.get("kind") == "copy"]
    reduces = [r for r in rows if r.get("kind") == "reduce"]
    gemms = [(float(r["bytes"]), float(r["us"]) * 1e-6) for r in rows if r.get("kind") == "gemm"]
    peaks = [float(r["TFLOPs"]) for r in rows if r.get("kind") == "peak"]
    reads = [float(r["GBps"]) for r in rows if r.get("kind") == "read"]
    hw = base
    if dev:
        notes = [f"calibrated {dev.get('date', '?')} on {dev.get('gpus', '?')} x {dev.get('name', '?')} "
                 f"by fusedlis calibrate; inter-node and unmeasured fields from {base.name}"]
    else:
        notes = [f"fitted from measurement files (bench/validate_perfmodel.py); inter-node and unmeasured "
                 f"fields from {base.name}"]
    notes += [str(r["impl"]) for r in rows if r.get("kind") == "note"
              and str(r.get("impl", "")).startswith(("timing:", FUSED_LINEAR_NOTE))]
    if reduces:
        g = statistics.median(float(r["us"]) * 1e-6 / float(r["bytes"]) for r in reduces)
        hw = hw.with_(gamma=g)
        notes.append(f"bf16 a + b over 1 GiB operands: {3e-12 / g:.2f} TB/s moved; gamma = time / operand bytes")
    elif copies:
        bw = statistics.median(float(r["GBps"]) for r in copies) * 1e9
        hw = hw.with_(gamma=3.0 / bw)
        notes.append(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write); gamma = 3 / copy bandwidth")
    if reads:
        notes.append(f"bf16 sum over 1 GiB: {statistics.median(reads) / 1e3:.2f} TB/s read (streaming HBM rate; "
                     "hbm_bw below is what decode GEMMs reach)")
    if len(gemms) >= 2:
        ov, bw = fit_gemm(gemms)
        hw = hw.with_(kernel_overhead=ov, hbm_bw=bw)
        notes.append(f"decode GEMM fit: {ov * 1e6:.1f} us + bytes / {bw / 1e12:.2f} TB/s")
    if peaks:
        hw = hw.with_(peak_flops=max(peaks) * 1e12)
        notes.append(f"8192^3 bf16 GEMM: {max(peaks):.0f} TFLOP/s")
    ars = [r for r in rows if r.get("kind") == "allreduce" and int(r["gpus"]) >= 2]
    intra = hw.intra
    nccl = [("ring", int(r["gpus"]), float(r["bytes"]), float(r["us"]) * 1e-6) for r in ars if r["impl"] == "nccl"]
    if len(nccl) >= 2:
        regs = fit_regimes(nccl, hw.gamma, min_points=min_regime_points)
        intra = intra.with_regimes("nccl", regs)
        notes.append(f"NCCL NVLink fit (ring model): {_regime_text(regs)}")
    custom = [r for r in ars if r["impl"] != "nccl"]
    # per algorithm, the preferred implementation that measured it: fusedlis (plainest name first, e.g.
    # "fusedlis_one_shot" before "fusedlis_one_shot_t16k"), then torch symmetric memory, then others
    def rank(impl: str) -> tuple[int, int, str]:
        key = "".join(ch for ch in impl.lower() if ch.isalnum())
        return (0 if key.startswith("fusedlis") else 1 if key.startswith("torchsymm") else 2, len(key), impl)

    rank = {i: rank(i) for i in {str(r["impl"]) for r in custom}}  # type: ignore[assignment]
    by_algo: dict[str, list[tuple[str, int, float, float]]] = {}
    src: dict[str, str] = {}
    algo_nodes: dict[str, int] = {}
    for algo in sorted({coll.resolve(str(r["algo"])) for r in custom}):
        mine = [r for r in custom if coll.resolve(str(r["algo"])) == algo]
        impl = min((str(r["impl"]) for r in mine), key=rank.__getitem__)
        # rows on logical nodes (`nodes` > 1, e.g. nvrar_ll on 2 x 1) describe the rail exchange; they win
        nodes = max(_nodes(r) for r in mine if r["impl"] == impl)
        src[algo], algo_nodes[algo] = impl, nodes
        by_algo[algo] = [(algo, int(r["gpus"]), float(r["bytes"]), float(r["us"]) * 1e-6)
                         for r in mine if r["impl"] == impl and _nodes(r) == nodes]
    fits = {algo: fit_regimes(smp, hw.gamma, nodes=algo_nodes[algo], min_points=min_regime_points)
            for algo, smp in by_algo.items() if len(smp) >= 2}
    if fits:
        # the plain custom link is two-shot's largest regime (NVRAR's intra-node phases are a two-shot)
        one_node = [x for algo, smp in by_algo.items() if algo_nodes[algo] == 1 for x in smp]
        _, a, b = (fits.get("twoshot") or [(math.inf, *fit_link(one_node or by_algo[next(iter(fits))], hw.gamma,
                                                                  1 if one_node else algo_nodes[next(iter(fits))]))])[-1]
        intra = dataclasses.replace(intra, alpha=a, beta=b)
        for algo, regs in fits.items():
            intra = intra.with_regimes(algo, regs)
            where = f" on {algo_nodes[algo]} logical nodes of 1 GPU" if algo_nodes[algo] > 1 else ""
            notes.append(f"{src[algo]} {algo}{where} NVLink fit: {_regime_text(regs)}")
    hw = hw.with_(intra=intra)
    layers = [r for r in rows if r.get("kind") == "layer"]
    for nccl_rows in (True, False):
        samples = []
        for r in layers:
            if (r["algo"] == "nccl") != nccl_rows:
                continue
            c = coll.allreduce(str(r["algo"]), hw, 1, int(r["gpus"]), float(r["bytes"]))
            samples.append((float(r["us"]) * 1e-6, float(r["gemm_us"]) * 1e-6 + c.total, c.latency))
        if samples:
            h = fit_overlap(samples)
            field = "nccl_latency_hidden" if nccl_rows else "ar_latency_hidden"
            hw = hw.with_(**{field: h})
            notes.append(f"GEMM + {'NCCL' if nccl_rows else 'custom'} all-reduce in one graph: {h:.0%} of the "
                         "all-reduce latency hidden")
    norms = [r for r in rows if r.get("kind") == "allreduce_norm"]
    if norms:
        per_row = fit_norm_row([(int(r["M"]), float(r["us"]) * 1e-6, float(r["base_us"]) * 1e-6) for r in norms])
        hw = hw.with_(ar_norm_row_latency=per_row)
        notes.append(f"all-reduce + residual + RMSNorm in one kernel vs the one-shot LL all-reduce alone "
                     f"({len(norms)} shapes): {per_row * 1e9:.0f} ns per row added")
    table = fused_linear_table(rows)
    if table:
        hw = hw.with_(fused_linear_ar=table)
        for g, k, n, pts in table:
            gem = {int(r["M"]): float(r["gemm_us"]) for r in rows if r.get("kind") == "fused_linear"
                   and (int(r["gpus"]), int(r["K"]), int(r["N"])) == (g, k, n) and r.get("gemm_us") not in (None, "")}
            notes.append(f"{FUSED_LINEAR_NOTE} + residual + RMSNorm on {g} GPUs, K {k} -> N {n}: "
                         + ", ".join(f"M={m} {t * 1e6:.1f} us" + (f" (cuBLAS GEMM alone {gem[m]:.1f} us)"
                                                                   if m in gem else "") for m, t in pts)
                         + "; decode steps in fused mode cost o_proj/down_proj at these times")
    name = f"calibrated-{str(dev.get('name', 'gpu')).lower().replace(' ', '-')}"
    return hw.with_(intra=intra, name=name, sources=tuple(notes) + base.sources)


def calibrate(base: str = "h200-ndr", sizes: list[int] | None = None, iters: int = timing.CALLS,
              gpus: int | None = None, replays: int = timing.REPLAYS) -> tuple[Hardware, list[dict[str, Any]]] | None:
    """Measure, then fit: returns (profile, raw rows), or None on the non-zero ranks of a torchrun launch.
    `gpus_per_node` stays the base profile's."""
    sizes = sizes or [8192 << i for i in range(10)]
    if any(m % 2 for m in sizes):
        raise ValueError("all-reduce sizes must be even (bf16 elements)")
    rows = measure(sizes, iters, gpus, replays)
    if rows is None:
        return None
    hw = profile_from_measurements(rows, get_hardware(base))
    return hw.with_(gpu=str(rows[0]["name"])), rows


RAW_FIELDS = ["kind", "impl", "algo", "gpus", "nodes", "bytes", "us", "gemm_us", "base_us", "M", "K", "N", "GBps",
              "TFLOPs", "name", "date"]


def write_raw_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Raw calibration rows as CSV (readable by `read_raw_csv`)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RAW_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_raw_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows written by `write_raw_csv` (empty fields dropped)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
