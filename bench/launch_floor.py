"""How much of a Llama-3.1-8B TP=2 batch-1 decode step's time above the HBM floor is launching one kernel per GEMM?

All 129 per-GPU weights of one step (32 layers of qkv [3072, 4096], o_proj [4096, 2048], gate_up [14336, 4096],
down [4096, 7168], then lm_head [64128, 4096]; bf16, 7.50 GB) live back to back in ONE buffer, each weight a view
of it, so every variant reads exactly the same bytes. Each variant is one CUDA graph of a whole step:

- `read_all_1`: one Triton read kernel over the whole buffer: the floor (bytes / this time = read bandwidth);
- `read_layer_33`: one read kernel per layer (its 4 weights are contiguous) + one for lm_head;
- `read_gemm_129`: one read kernel per weight;
- `cublas_129`: `torch.mm(x, W.t(), out=y)` per weight, x [1, K] bf16;
- `linear_129`: fusedlis `linear(x, W, out=y)` per weight as it dispatches: on GPUs at M = 1 its flat-row GEMV
  (since commit f7fe3e3; the committed `launch_floor_NVIDIA-H200_…` run predates it); with FUSEDLIS_LINEAR_ROWS=0
  its config lookup (cuBLAS where the measured table says so, e.g. o_proj on H200, else the tiled kernel);
- `gemv_rows_129`: that flat-row GEMV with R, BLOCK_K and warps swept per shape here;
- `linear_triton_129`: the same with the Triton kernel forced where that lookup says cuBLAS (only when it does).

Timing: 3 warm-up replays, then 15 replays queued back to back, each between two CUDA events (the GPU time of a
step, not the CPU's graph submission); the variants alternate over 3 rounds; reported: the median of the
per-round medians, and min/max over all timed replays. `read_gemm_129 - read_all_1` is the pure cost of 128 kernel
boundaries in a pure weight stream; the read kernel's (BLOCK, ITERS, num_warps) are tuned per weight size first
(triton.testing.do_bench medians, L2 flushed between calls; --tune-s caps the wall time).

    python3 bench/launch_floor.py --out $OUT          # one GPU, ~8 GB of its memory, about a minute

Writes launch_floor[_<tag>]_<device>_<date>.csv (one row per variant), .png (ms per step, floor line) and
_summary.txt (table, floor, bandwidth, the chosen configs). On CPU, `--smoke` checks the read kernel (interpreter)
and runs every variant's step once on a 128x shrunk 2-layer model, without graphs or timing.

gate_up is the merged gate + up weight of one GPU at TP=2: [2 x 7168, 4096].
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

# The interpreter must be chosen before any @triton.jit function is created (as tests/conftest.py does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, N, K) per GPU at TP=2, in the order a layer reads them
LAYER_SHAPES = (("qkv", 3072, 4096), ("o_proj", 4096, 2048), ("gate_up", 14336, 4096), ("down", 4096, 7168))
LM_HEAD = ("lm_head", 64128, 4096)
ELEM_BYTES = 2  # bf16
SMOKE_SHRINK = 128  # divides every N and K above


# ----------------------------------------------------------------------------------------------------
# Weight layout


@dataclass(frozen=True)
class View:
    """One weight: `numel` elements of the buffer from element `offset`, seen as [n, k] row-major."""

    name: str
    layer: int  # -1 for lm_head
    offset: int
    n: int
    k: int

    @property
    def numel(self) -> int:
        return self.n * self.k


def weight_layout(layers: int = 32, shrink: int = 1) -> list[View]:
    """The 4 * `layers` + 1 weight views of one step, in read order, back to back from offset 0.

    `shrink` divides every N and K (tiny models for CPU checks; it must divide them all).
    """
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    shapes = [(f"L{i}.{name}", i, n, k) for i in range(layers) for name, n, k in LAYER_SHAPES]
    shapes.append((LM_HEAD[0], -1, LM_HEAD[1], LM_HEAD[2]))
    views, off = [], 0
    for name, layer, n, k in shapes:
        if n % shrink or k % shrink:
            raise ValueError(f"shrink {shrink} does not divide {name} [{n}, {k}]")
        views.append(View(name, layer, off, n // shrink, k // shrink))
        off += views[-1].numel
    return views


def total_numel(layout: list[View]) -> int:
    return layout[-1].offset + layout[-1].numel


def read_spans(layout: list[View], per: str) -> list[tuple[int, int]]:
    """(offset, numel) of each read launch of a step: per "all" (one), "layer" (a layer's 4 weights, then
    lm_head) or "weight" (one per view)."""
    if per == "all":
        return [(0, total_numel(layout))]
    if per == "weight":
        return [(v.offset, v.numel) for v in layout]
    if per == "layer":
        spans: dict[int, list[int]] = {}
        for v in layout:
            lo_hi = spans.setdefault(v.layer, [v.offset, v.offset])
            if v.offset != lo_hi[1]:
                raise ValueError(f"{v.name} does not follow the previous weight of its layer")
            lo_hi[1] = v.offset + v.numel
        return [(lo, hi - lo) for lo, hi in spans.values()]
    raise ValueError(f"per must be 'all', 'layer' or 'weight', got {per!r}")


# ----------------------------------------------------------------------------------------------------
# Read kernel


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Program p sums (fp32) elements [p * ITERS * BLOCK, (p + 1) * ITERS * BLOCK) of src (masked at n) into
    out[p]: storing the sum keeps the loads."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (ITERS * BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):  # unrolled: ITERS independent wide loads in flight per thread
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


class ReadConfig(NamedTuple):
    block: int
    iters: int
    num_warps: int

    def __str__(self) -> str:
        return f"B{self.block}xI{self.iters}w{self.num_warps}"


# most likely winners first, so a cut by the time budget keeps them
CANDIDATES = sorted((ReadConfig(b, i, w) for b in (2048, 4096, 8192) for i in (1, 2, 4, 8) for w in (4, 8)),
                    key=lambda c: (abs(math.log2(c.block * c.iters / 16384)), -c.num_warps))
DEFAULT_READ = ReadConfig(4096, 4, 8)


def read_programs(n: int, cfg: ReadConfig) -> int:
    """Programs (and fp32 outputs) of one `read` over `n` elements."""
    return triton.cdiv(n, cfg.block * cfg.iters)


def read(src: torch.Tensor, out: torch.Tensor, cfg: ReadConfig = DEFAULT_READ) -> torch.Tensor:
    """Launch `_read_kernel` over contiguous `src` (any dtype; flattened), one fp32 sum per program into the first
    `read_programs(src.numel(), cfg)` elements of fp32 `out`; returns that slice."""
    if not src.is_contiguous():
        raise ValueError("read: src must be contiguous")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("read: out must be contiguous fp32")
    n = src.numel()
    grid = read_programs(n, cfg)
    if out.numel() < grid:
        raise ValueError(f"read: out holds {out.numel()} sums, {grid} programs need one each")
    if grid:
        _read_kernel[(grid,)](src, out, n, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps)
    return out[:grid]


def read_ref(src: torch.Tensor, block: int, iters: int) -> torch.Tensor:
    """float64 per-program sums `read` should produce."""
    x = src.reshape(-1).to(torch.float64)
    chunk = block * iters
    pad = (-x.numel()) % chunk
    return torch.nn.functional.pad(x, (0, pad)).view(-1, chunk).sum(dim=1)


# ----------------------------------------------------------------------------------------------------
# Tuning the read kernel


def tune_read(buf: torch.Tensor, layout: list[View], out: torch.Tensor, budget_s: float) -> tuple[dict, list[str]]:
    """Best ReadConfig per distinct read size of the variants ({numel: cfg}) and a log of what was timed.

    Every candidate is timed on o_proj and on the whole buffer until 80% of `budget_s` has passed; then the 3 best
    of each are timed on every other size (qkv, gate_up, down, lm_head, a layer). Sizes left untimed take the
    best of the nearer tuned size.
    """
    from triton.testing import do_bench

    t0 = time.perf_counter()
    sizes = sorted({n for per in ("all", "layer", "weight") for _, n in read_spans(layout, per)})
    o_proj = next(v for v in layout if v.name.endswith("o_proj"))
    tuned = {o_proj.numel: buf[o_proj.offset:o_proj.offset + o_proj.numel], buf.numel(): buf}
    ms: dict[int, dict[ReadConfig, float]] = {n: {} for n in sizes}

    def bench(n: int, cfg: ReadConfig) -> None:
        src = tuned.get(n)
        if src is None:
            src = buf[:n]
        ms[n][cfg] = do_bench(lambda: read(src, out, cfg), warmup=5, rep=25, return_mode="median")

    for cfg in CANDIDATES:
        if time.perf_counter() - t0 > 0.8 * budget_s:
            break
        for n in tuned:
            bench(n, cfg)
    short = list(dict.fromkeys(c for n in tuned for c in sorted(ms[n], key=ms[n].get)[:3]))
    for n in sizes:
        if n in tuned:
            continue
        for cfg in short:
            if time.perf_counter() - t0 > budget_s:
                break
            bench(n, cfg)
    best, log = {}, []
    for n in sizes:
        src = n if ms[n] else min(tuned, key=lambda t: abs(math.log(t / n)))
        best[n] = min(ms[src], key=ms[src].get) if ms[src] else DEFAULT_READ
        timed = ", ".join(f"{c}={t * 1e3:.1f}us" for c, t in sorted(ms[n].items(), key=lambda ct: ct[1])[:4])
        log.append(f"read {n * ELEM_BYTES / 1e6:9.1f} MB: {best[n]}" + (f"  (best timed: {timed})" if timed else
                                                                          f"  (untimed: best of {src} el)"))
    log.append(f"tuning took {time.perf_counter() - t0:.1f} s, {sum(len(m) for m in ms.values())} timings")
    return best, log


# ----------------------------------------------------------------------------------------------------
# Flat-row GEMV (`linear`'s "rows" backend): M = 1, each program owns R whole rows of W and streams them like
# the read kernel; swept here over R, BLOCK_K and warps


class RowsConfig(NamedTuple):
    rows: int
    block_k: int
    num_warps: int

    def __str__(self) -> str:
        return f"R{self.rows}xK{self.block_k}w{self.num_warps}"


ROWS_CANDIDATES = [RowsConfig(r, k, w) for r, k in ((1, 4096), (2, 2048), (2, 4096), (4, 1024), (4, 2048),
                                                     (8, 512), (8, 1024), (16, 512)) for w in (4, 8)]


def gemv_rows(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cfg: RowsConfig) -> torch.Tensor:
    """y[1, N] = x[1, K] @ w[N, K].T through `linear`'s flat-row GEMV (its "rows" backend) with this R, BLOCK_K
    and warp count."""
    from fusedlis.triton_kernels.linear import linear

    return linear(x, w, out=y, config={"backend": "rows", "ROWS": cfg.rows, "BLOCK_K": cfg.block_k,
                                       "num_warps": cfg.num_warps})


def tune_gemv_rows(buf: torch.Tensor, layout: list[View], budget_s: float) -> tuple[dict, list[str]]:
    """Best RowsConfig per distinct (N, K) of the layout, by do_bench medians within `budget_s`."""
    from triton.testing import do_bench

    t0 = time.perf_counter()
    best, log = {}, []
    for v in {(v.n, v.k): v for v in layout}.values():
        w = buf[v.offset:v.offset + v.numel].view(v.n, v.k)
        x = torch.randn(1, v.k, dtype=buf.dtype, device=buf.device)
        y = torch.empty(1, v.n, dtype=buf.dtype, device=buf.device)
        ms = {}
        for cfg in ROWS_CANDIDATES:
            if time.perf_counter() - t0 > budget_s:
                break
            ms[cfg] = do_bench(lambda cfg=cfg: gemv_rows(x, w, y, cfg), warmup=5, rep=20, return_mode="median")
        best[(v.n, v.k)] = min(ms, key=ms.get) if ms else RowsConfig(4, 1024, 4)
        timed = ", ".join(f"{c}={t * 1e3:.1f}us" for c, t in sorted(ms.items(), key=lambda ct: ct[1])[:3])
        log.append(f"gemv_rows [{v.n},{v.k}]: {best[(v.n, v.k)]}  (best timed: {timed})")
    log.append(f"gemv_rows tuning took {time.perf_counter() - t0:.1f} s")
    return best, log


# ----------------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    name: str
    launches: int  # kernel launches asked for per step (GEMM calls for cuBLAS / linear)
    step: Callable[[], None]
    outs: list  # per launch (read: its sums) or per view (GEMM: its y), for checks
    config: str = ""


def _linear_configs(layout: list[View], x_dtype: torch.dtype, device: torch.device) -> dict:
    """{(N, K): (source, config)} as `linear` resolves it (tuning cache, measured table, default)."""
    from fusedlis import tuning
    from fusedlis.triton_kernels.linear import (_num_sms, _rows_enabled, linear_default_config, linear_key,
                                                measured_config, rows_config)

    res = {}
    rows = _rows_enabled(torch.empty(1, 0, device=device))
    for v in layout:
        if (v.n, v.k) in res:
            continue
        if rows:  # what `linear` runs at M = 1 before any lookup
            res[(v.n, v.k)] = ("rows", rows_config(v.k))
            continue
        key = linear_key(1, v.n, v.k, x_dtype, None, False)
        cfg, src = tuning.lookup("linear", key), "tuned"
        if cfg is None:
            cfg, src = measured_config(1, v.n, v.k, x_dtype, None, device), "measured"
        if cfg is None:
            key["sms"] = _num_sms(device)
            cfg, src = linear_default_config(key), "default"
        res[(v.n, v.k)] = (src, cfg)
    return res


def build_variants(buf: torch.Tensor, layout: list[View], read_cfg: Callable[[int], ReadConfig],
                   want: list[str], rows_cfg: dict | None = None) -> tuple[list[Variant], list[str]]:
    """The variants named in `want` (those that can be built here) over `buf`, and notes on what was skipped
    or how `linear` resolved its configs."""
    dev = buf.device
    views = [buf[v.offset:v.offset + v.numel].view(v.n, v.k) for v in layout]
    xs = {k: torch.randn(1, k, dtype=buf.dtype, device=dev) for k in {v.k for v in layout}}
    out, notes = [], []

    def read_variant(name: str, per: str) -> Variant:
        spans = read_spans(layout, per)
        cfgs = [read_cfg(n) for _, n in spans]
        sums = torch.empty(sum(read_programs(n, c) for (_, n), c in zip(spans, cfgs)), dtype=torch.float32,
                           device=dev)
        srcs, dsts, at = [], [], 0
        for (off, n), c in zip(spans, cfgs):
            srcs.append(buf[off:off + n])
            dsts.append(sums[at:at + read_programs(n, c)])
            at += read_programs(n, c)

        def step() -> None:
            for s, d, c in zip(srcs, dsts, cfgs):
                read(s, d, c)

        used = ", ".join(f"{n * ELEM_BYTES / 1e6:.1f}MB:{c}" for n, c in sorted({(n, c) for (_, n), c in
                                                                                 zip(spans, cfgs)}))
        return Variant(name, len(spans), step, dsts, used)

    def gemm_variant(name: str, call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
                     config: str = "") -> Variant:
        ys = [torch.empty(1, v.n, dtype=buf.dtype, device=dev) for v in layout]

        def step() -> None:
            for v, w, y in zip(layout, views, ys):
                call(xs[v.k], w, y)

        return Variant(name, len(layout), step, ys, config)

    if "read_all_1" in want:
        out.append(read_variant("read_all_1", "all"))
    if "read_layer_33" in want:
        out.append(read_variant(f"read_layer_{len(read_spans(layout, 'layer'))}", "layer"))
    if "read_gemm_129" in want:
        out.append(read_variant(f"read_gemm_{len(layout)}", "weight"))
    if "cublas_129" in want:
        out.append(gemm_variant(f"cublas_{len(layout)}", lambda x, w, y: torch.mm(x, w.t(), out=y)))
    if "gemv_rows_129" in want:
        rc = rows_cfg or {}
        desc = "; ".join(f"[{n},{k}] {c}" for (n, k), c in rc.items())
        out.append(gemm_variant(f"gemv_rows_{len(layout)}", lambda x, w, y: gemv_rows(
            x, w, y, rc.get((w.shape[0], w.shape[1]), RowsConfig(4, 1024, 4))), desc))
    if "linear_129" in want or "linear_triton_129" in want:
        try:
            from fusedlis.triton_kernels.linear import linear, linear_default_config, linear_key, _num_sms
            cfgs = _linear_configs(layout, buf.dtype, dev)
        except Exception as e:  # the package is edited concurrently: lose these variants, not the run
            notes.append(f"linear variants skipped: fusedlis linear did not import ({type(e).__name__}: {e})")
        else:
            desc = "; ".join(f"[{n},{k}] {src}: {_fmt_cfg(c)}" for (n, k), (src, c) in cfgs.items())
            notes.append(f"linear configs: {desc}")
            if "linear_129" in want:
                out.append(gemm_variant(f"linear_{len(layout)}", lambda x, w, y: linear(x, w, out=y), desc))
            forced = {}
            for (n, k), (src, c) in cfgs.items():
                if c.get("backend") == "torch":
                    key = linear_key(1, n, k, buf.dtype, None, False)
                    key["sms"] = _num_sms(dev)
                    forced[(n, k)] = linear_default_config(key)
            if "linear_triton_129" in want and forced:
                fdesc = "; ".join(f"[{n},{k}] forced default: {_fmt_cfg(c)}" for (n, k), c in forced.items())
                notes.append(f"linear_triton: {fdesc}")
                out.append(gemm_variant(
                    f"linear_triton_{len(layout)}",
                    lambda x, w, y: linear(x, w, out=y, config=forced.get((w.shape[0], w.shape[1]))), fdesc))
            elif "linear_triton_129" in want:
                notes.append("linear_triton skipped: linear already runs its Triton kernel on every shape here")
    return out, notes


def _fmt_cfg(c: dict) -> str:
    if c.get("backend") == "torch":
        return "cuBLAS"
    if c.get("backend") == "rows":
        return f"rows R{c['ROWS']} K{c['BLOCK_K']} w{c['num_warps']}"
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "SPLIT_K": "S", "num_warps": "w", "num_stages": "s"}
    head = "dot" if c.get("USE_DOT", True) else "gemv"
    return " ".join([head] + [f"{short.get(k, k)}{v}" for k, v in c.items() if k != "USE_DOT"])


def check_variants(variants: list[Variant], buf: torch.Tensor, exact_total: float | None = None) -> list[str]:
    """After one eager step of each: read variants' totals agree (with `exact_total` if given); the GEMM
    variants agree with each other per weight. Returns problems (empty: all good)."""
    bad = []
    totals = {v.name: sum(float(d.double().sum()) for d in v.outs) for v in variants if v.name.startswith("read")}
    ref = exact_total if exact_total is not None else next(iter(totals.values()), None)
    for name, t in totals.items():
        # per-program fp32 sums of N(0, 1) values: their rounding adds up to ~1e-2 over the 3.75e9 elements
        if not abs(t - ref) < 1.0:
            bad.append(f"{name}: total {t:.4f} vs {ref:.4f}")
    gemms = [v for v in variants if not v.name.startswith("read")]
    for v in gemms[1:]:
        for i, (a, b) in enumerate(zip(gemms[0].outs, v.outs)):
            a, b = a.float(), b.float()
            err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))
            if not err < 2e-2:
                bad.append(f"{v.name} vs {gemms[0].name}, weight {i}: max rel err {err:.2e}")
                break
    return bad


# ----------------------------------------------------------------------------------------------------
# GPU timing


def capture(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """One CUDA graph of `step` (already run eagerly, so nothing compiles or allocates during capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            step()
    torch.cuda.synchronize()
    return g


def time_replays(g: torch.cuda.CUDAGraph, warmup: int, reps: int) -> list[float]:
    """ms of each of `reps` replays, queued back to back after `warmup` untimed ones (so the CPU's submission of
    the graph is hidden behind the previous replay, as in a decode loop)."""
    for _ in range(warmup):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:  # no synchronize after the warm-up: the first timed replay too starts on a busy GPU
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def count_kernels(g: torch.cuda.CUDAGraph) -> int:
    """Kernels one replay of `g` runs, as the profiler sees them (-1 where it cannot tell)."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        n = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA
                and not e.name.lower().startswith(("memcpy", "memset")))
        return n if n > 0 else -1  # none seen: the profiler missed the graph's kernels
    except Exception:
        return -1


def fill_random(buf: torch.Tensor, chunk: int = 1 << 28) -> None:
    """N(0, 1) in chunks (a single normal_ over 3.75e9 elements is needlessly risky)."""
    for lo in range(0, buf.numel(), chunk):
        buf[lo:lo + chunk].normal_()


def run(args) -> tuple[list[dict], list[str]]:
    dev = torch.device("cuda")
    layout = weight_layout(args.layers)
    n = total_numel(layout)
    free, _ = torch.cuda.mem_get_info(dev)
    need = n * ELEM_BYTES + (1 << 30)
    if free < need:
        raise SystemExit(f"needs ~{need / 1e9:.1f} GB of GPU memory, {free / 1e9:.1f} GB free")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    buf = torch.empty(n, dtype=torch.bfloat16, device=dev)
    fill_random(buf)
    log = [f"{len(layout)} weights, {n * ELEM_BYTES / 1e9:.3f} GB in one buffer"]
    print(log[0], flush=True)

    tune_out = torch.empty(read_programs(n, min(CANDIDATES, key=lambda c: c.block * c.iters)),
                           dtype=torch.float32, device=dev)
    if args.tune_s > 0:
        best, tlog = tune_read(buf, layout, tune_out, args.tune_s)
    else:
        best, tlog = {}, [f"no tuning: {DEFAULT_READ} everywhere"]
    del tune_out
    log += tlog
    print("\n".join(tlog), flush=True)

    rows_best = {}
    if "gemv_rows_129" in args.variants:
        rows_best, rlog = tune_gemv_rows(buf, layout, max(args.tune_s, 5.0))
        log += rlog
        print("\n".join(rlog), flush=True)
    variants, notes = build_variants(buf, layout, lambda k: best.get(k, DEFAULT_READ), args.variants, rows_best)
    log += notes
    print("\n".join(notes), flush=True)
    graphs = {}
    for v in variants:
        try:
            v.step()  # compiles; the checks below read these outputs
            torch.cuda.synchronize()
            graphs[v.name] = capture(v.step)
        except Exception as e:
            msg = f"{v.name} dropped: {type(e).__name__}: {e}"
            log.append(msg)
            print(msg, flush=True)
    variants = [v for v in variants if v.name in graphs]
    if not variants or variants[0].name != "read_all_1":
        raise SystemExit("read_all_1 (the floor) did not run")
    problems = check_variants(variants, buf)
    log.append("checks: " + ("; ".join(problems) if problems else "read totals and GEMM outputs agree"))
    print(log[-1], flush=True)
    print(f"setup (fill, tune, compile, capture) took {time.perf_counter() - t0:.1f} s", flush=True)

    per_round = {v.name: [] for v in variants}
    every = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            ms = time_replays(graphs[v.name], args.warmup, args.reps)
            per_round[v.name].append(statistics.median(ms))
            every[v.name] += ms
        print(f"round {r}: " + ", ".join(f"{k} {t[-1]:.3f}" for k, t in per_round.items()), flush=True)
    kernels = {v.name: count_kernels(graphs[v.name]) if args.count_kernels else -1 for v in variants}

    name = torch.cuda.get_device_name(0)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    floor = statistics.median(per_round["read_all_1"])
    nbytes = n * ELEM_BYTES
    rows = []
    for v in variants:
        med = statistics.median(per_round[v.name])
        rows.append(dict(
            variant=v.name, launches=v.launches, ms_median=round(med, 4), ms_min=round(min(every[v.name]), 4),
            ms_max=round(max(every[v.name]), 4), x_floor=round(med / floor, 4),
            us_per_extra_launch=round((med - floor) * 1e3 / (v.launches - 1), 3) if v.launches > 1 else "",
            device=name, torch=torch.__version__, triton=triton.__version__, date=date,
            kernels_seen=kernels[v.name], gbytes=round(nbytes / 1e9, 4), tb_per_s=round(nbytes / med / 1e9, 3),
            round_medians_ms=" ".join(f"{t:.4f}" for t in per_round[v.name]), config=v.config))
    log += summarize(rows, nbytes)
    return rows, log


def summarize(rows: list[dict], nbytes: int) -> list[str]:
    """The human-readable table and the key statements (also printed)."""
    floor = next(r["ms_median"] for r in rows if r["variant"] == "read_all_1")
    lines = [f"floor: {nbytes / 1e9:.3f} GB / {nbytes / floor / 1e9:.3f} TB/s (read_all_1) = {floor:.4f} ms per step",
             "",
             f"{'variant':<20}{'launches':>9}{'kernels':>9}{'ms/step':>10}{'min':>9}{'max':>9}{'x floor':>9}"
             f"{'above ms':>10}{'us/extra launch':>17}"]
    for r in rows:
        lines.append(f"{r['variant']:<20}{r['launches']:>9}{r['kernels_seen']:>9}{r['ms_median']:>10.4f}"
                     f"{r['ms_min']:>9.4f}{r['ms_max']:>9.4f}{r['x_floor']:>9.3f}"
                     f"{r['ms_median'] - floor:>10.4f}{str(r['us_per_extra_launch']):>17}")
    lines.append("")
    gemm_read = next((r for r in rows if r["variant"].startswith("read_gemm")), None)
    if gemm_read:
        b = gemm_read["ms_median"] - floor
        lines.append(f"kernel boundaries alone: {gemm_read['variant']} - read_all_1 = {b * 1e3:.1f} us per step "
                     f"({b / floor * 100:.1f}% of the floor, {gemm_read['us_per_extra_launch']} us per boundary)")
    for r in rows:
        if r["variant"].startswith(("cublas", "linear", "gemv")):
            above = r["ms_median"] - floor
            share = f"; boundaries explain {b / above * 100:.0f}% of it" if gemm_read and above > 0 else ""
            lines.append(f"{r['variant']}: {above * 1e3:.1f} us above the floor "
                         f"({r['us_per_extra_launch']} us per extra launch){share}")
    print("\n".join(lines), flush=True)
    return lines


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    med = [r["ms_median"] for r in rows]
    err = [[m - r["ms_min"] for m, r in zip(med, rows)], [r["ms_max"] - m for m, r in zip(med, rows)]]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    ax.bar(names, med, yerr=err, capsize=3,
           color=["tab:green" if n.startswith("read") else "tab:blue" for n in names])
    floor = med[names.index("read_all_1")]
    ax.axhline(floor, color="k", ls="--", lw=1, label=f"floor (read_all_1) {floor:.3f} ms")
    for i, r in enumerate(rows):
        ax.text(i, r["ms_max"], f"{r['ms_median']:.3f}\n×{r['x_floor']:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(r["ms_max"] for r in rows) * 1.18)
    ax.set_ylabel("ms per step (CUDA graph; bars: min..max)")
    ax.legend(fontsize=8, loc="lower right")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# CPU smoke


def smoke() -> None:
    """Interpreter checks: per-program sums of `read` against float64 on odd sizes, then one eager step of every
    variant on a 2-layer model shrunk 128x (read totals exact, GEMM variants agree)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, cfg in ((1, ReadConfig(16, 1, 1)), (1000, ReadConfig(64, 3, 2)), (4099, ReadConfig(128, 4, 4))):
            src = torch.randn(n, generator=g).to(dtype)
            out = torch.full((read_programs(n, cfg) + 3,), float("nan"))
            got = read(src, out, cfg).double()
            ref = read_ref(src, cfg.block, cfg.iters)
            scale = read_ref(src.abs(), cfg.block, cfg.iters).clamp_min(1e-30)
            err = float(((got - ref).abs() / scale).max())
            assert err <= 1e-5, (dtype, n, cfg, err)
            assert out[read_programs(n, cfg):].isnan().all(), "wrote past its programs"
    print("read kernel: per-program sums match float64 (fp32/fp16/bf16, odd sizes)")

    layout = weight_layout(2, shrink=SMOKE_SHRINK)
    # fp16, not bf16: the interpreter's tl.dot gets bf16 wrong (linear's CPU tests use fp32/fp16 too)
    buf = torch.randn(total_numel(layout), generator=g).to(torch.float16)
    want = ["read_all_1", "read_layer_33", "read_gemm_129", "cublas_129", "linear_129", "linear_triton_129"]
    try:  # o_proj "measured" as cuBLAS, as on H200, so that linear_129 dispatches and linear_triton_129 forces
        lin = importlib.import_module("fusedlis.triton_kernels.linear")
    except Exception as e:
        lin = None
        print(f"fusedlis linear did not import ({type(e).__name__}: {e}): its variants are skipped")
    o = next(v for v in layout if v.name.endswith("o_proj"))
    if lin is not None:
        real = lin.measured_config
        lin.measured_config = lambda M, N, K, *a: {"backend": "torch"} if (N, K) == (o.n, o.k) else real(M, N, K, *a)
    try:
        variants, notes = build_variants(buf, layout, lambda k: ReadConfig(256, 2, 4), want)
        for v in variants:
            t = time.perf_counter()
            v.step()
            print(f"{v.name}: {v.launches} launches, eager step ok ({time.perf_counter() - t:.1f} s)")
    finally:
        if lin is not None:
            lin.measured_config = real
    print("\n".join(notes))
    problems = check_variants(variants, buf, exact_total=float(buf.double().sum()))
    if problems:
        raise SystemExit("smoke FAILED: " + "; ".join(problems))
    print("smoke ok")


def main(argv=None) -> None:
    all_variants = ["read_all_1", "read_layer_33", "read_gemm_129", "cublas_129", "linear_129", "linear_triton_129",
                    "gemv_rows_129"]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results", help="folder of the CSV, PNG and summary")
    p.add_argument("--layers", type=int, default=32, help="layers of the model (fewer for quick checks)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=15, help="timed replays per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed replays before them")
    p.add_argument("--tune-s", type=float, default=30.0, help="wall-time cap of the read-kernel tuning (0: none)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=all_variants,
                   help="comma-separated subset of " + ",".join(all_variants) + " (read_all_1 is always run)")
    p.add_argument("--no-count-kernels", dest="count_kernels", action="store_false",
                   help="skip counting each graph's kernels with the profiler")
    p.add_argument("--tag", default="", help="file name tag (default: l<N> when --layers is not 32)")
    p.add_argument("--smoke", action="store_true", help="CPU/interpreter correctness check; no timing")
    args = p.parse_args(argv)
    if args.smoke:
        smoke()
        return
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --smoke on CPU)")
    unknown = set(args.variants) - set(all_variants)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    args.variants = ["read_all_1"] + [v for v in args.variants if v != "read_all_1"]
    tag = args.tag or ("" if args.layers == 32 else f"l{args.layers}")
    t0 = time.perf_counter()
    rows, log = run(args)
    sys.path.insert(0, HERE)
    from _results import write_result_csv

    stem, meta = write_result_csv(args.out, "launch_floor", rows, tag)
    with open(stem + "_summary.txt", "w") as f:
        f.write(f"# {meta}\n" + "\n".join(log) + "\n")
    try:
        plot(rows, stem + ".png", meta)
    except Exception as e:  # the numbers are written; a missing plot must not lose them
        print(f"plot failed: {type(e).__name__}: {e}")
    print(f"wrote {stem}.csv / .png / _summary.txt in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
