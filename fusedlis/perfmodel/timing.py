"""One CUDA-graph timing method for every GPU measurement: `fusedlis calibrate`, bench/allreduce.py, bench/fused.py,
bench/kernels.py and the tuner (`fusedlis.tuning.bench.graph_time_us`).

`time_graph` is what `bench/allreduce.py` times with too (100 calls captured in one graph,
3 eager warm-up calls on a side stream, 3 untimed replays, then 30 replays each preceded by a barrier and a
device synchronize and timed with CUDA events; the median per call) and, like that script, takes the maximum of
the ranks' medians (`reduce_max`). Calibration used to time 50 calls, 7 replays, 1 untimed replay and rank 0's
median: its NCCL times came out 17-27% below the bench's (2xH200, runs 0444 / 05:47), so a profile fitted on
them could not predict the bench. The torch calls go through the `torch` argument so that the sequence of calls
can be tested without a GPU (tests/test_perfmodel_timing.py drives it with a fake torch).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

# bench/allreduce.py's defaults (--calls, --replays, --passes) and its 3 untimed replays
CALLS = 100
REPLAYS = 30
# Separate graph captures per point. One capture of a small NCCL all-reduce lands at 13-14 or at 17-18 µs
# (8-32 KB, 2xH200) and keeps that latency for all its replays, so one capture is a sample of one:
# bench/results/allreduce_stability_2xH200_2026-11-22_run0838.csv (spread up to 45% between captures of one call).
PASSES = 5
WARMUP_CALLS = 3
WARMUP_REPLAYS = 3


def time_graph(fn: Callable[[], Any], calls: int = CALLS, replays: int = REPLAYS, *,
               barrier: Callable[[], Any] | None = None, reduce_max: Callable[[float], float] | None = None,
               torch: Any = None) -> float:
    """Median seconds per call of `fn`, `calls` calls captured in one CUDA graph, `replays` timed replays.

    `barrier` (e.g. `torch.distributed.barrier`) runs before each timed replay, followed by a device
    synchronize, so that the ranks start each replay together; `reduce_max(seconds)` returns the maximum over
    the ranks (`max_over_ranks`), as bench/allreduce.py reports. `fn` may read an iterator (e.g. rotating
    weights): it is called WARMUP_CALLS times eagerly, then `calls` times during capture.
    """
    if torch is None:
        import torch
    if calls < 1 or replays < 1:
        raise ValueError(f"calls and replays must be >= 1, got {calls}, {replays}")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(WARMUP_CALLS):
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    for _ in range(WARMUP_REPLAYS):
        g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if barrier is not None:
            barrier()
        torch.cuda.synchronize()
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / calls)  # elapsed_time is in ms
    del g
    t = statistics.median(times)
    return float(reduce_max(t)) if reduce_max is not None else t


def max_over_ranks(seconds: float, torch: Any = None, dist: Any = None) -> float:
    """The maximum of `seconds` over the default process group (every rank calls it), as bench/allreduce.py
    reports each variant's time."""
    if torch is None:
        import torch
    if dist is None:
        import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def warm_clocks(torch: Any = None, n: int = 200, size: int = 4096) -> None:
    """`n` bf16 `size`^2 GEMMs, as bench/allreduce.py runs before timing (idle GPUs sit at low clocks)."""
    if torch is None:
        import torch
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()


def capture_center(samples: list[float]) -> float:
    """The value reported for one measured point from its per-capture times: the mean of the samples without
    their minimum and maximum when there are >= 4, else the median.

    Captures of small NCCL all-reduces are bimodal (see PASSES), so the median of a few flips between the
    modes; a trimmed mean moves with their mix and still drops a lone outlier."""
    if not samples:
        raise ValueError("no samples")
    xs = sorted(samples)
    if len(xs) >= 4:
        xs = xs[1:-1]
        return sum(xs) / len(xs)
    return statistics.median(xs)
