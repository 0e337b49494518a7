"""How much a decode GEMM gains when a latency-bound kernel before it prefetches its weights into L2.

Each timed pair is a kernel that keeps HBM idle for --idle-us microseconds (standing in for attention or an
all-reduce wait), whose programs first issue L2 prefetches of the leading `cap` bytes of the next weight, then
`fusedlis.triton_kernels.linear` on that weight at M=1. Weights rotate through copies larger than L2, so only the
prefetch can have put them there. cap=0 is the baseline; "gain" is its time minus the pair's, per pair.

    python3 bench/l2_prefetch.py --out bench/results            # one GPU, about a minute

Writes l2_prefetch[_<tag>]_<device>_<date>.csv and .png.

"side" instead reads the span for real, from a grid on another stream running beside the idle kernel (a
branch of the CUDA graph, joined before the GEMM).

Result on H200 (2026-11-22, l2_prefetch_*.csv and l2_prefetch_how_*.csv): no gain anywhere. Line and TMA bulk
prefetches cost about 0.1 µs per MB prefetched and the GEMM after them ran no faster, although the same GEMM on
an L2-warm weight is 1.8-3.3 µs faster (bench/l2_resident_check.py). "loads" as written here is far too slow to
judge (its loads are not vectorised). "side" (l2_prefetch_side_*.csv) gains 0.5-0.8 µs at 8 MB, no more at 16 MB,
and loses from 24 MB on, even when the idle kernel lasts 10 µs: L2 keeps far less of a weight read by other SMs
than the 1.8-3.3 µs an L2-warm weight saves. In the engine (prefetching from the attention merge and after the fused
GEMM's tiles, commit 42e2c59) decode got 3-5% slower, so the engine does not prefetch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fusedlis.comm.kernels import _clock  # noqa: E402
from _results import write_result_csv  # noqa: E402
from fusedlis.perfmodel.timing import time_graph  # noqa: E402
from fusedlis.triton_kernels import linear  # noqa: E402
from fusedlis.triton_kernels._pdl import prefetch_l2  # noqa: E402

# how the idle kernel warms L2: line prefetches (prefetch.global.L2), TMA bulk prefetches, or real loads
HOW = {"lines": 1, "bulk": 2, "loads": 3, "side": 4}
WARM_CHUNK = 4096
# (name, N, K) per GPU at TP=2, bf16
SHAPES = (("8b-qkv", 3072, 4096), ("8b-o", 4096, 2048), ("8b-gate_up", 14336, 4096), ("8b-down", 4096, 7168),
          ("70b-o", 8192, 4096))


@triton.jit
def span_lines(n_lines, part, nparts):
    """The 128-byte lines [lo, hi) of `n_lines` that program `part` of `nparts` prefetches (hi <= lo: none)."""
    per = tl.cdiv(n_lines, nparts)
    lo = part * per
    return lo, tl.minimum(lo + per, n_lines)


@triton.jit
def prefetch_span(ptr, n, part, nparts, BLOCK: tl.constexpr):
    """Program `part` of `nparts` asks L2 for its share of the `n` elements at `ptr` (n: whole 128-byte lines),
    BLOCK line prefetches per step. Non-blocking: the program may exit before the lines arrive."""
    LINE: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    lo, hi = span_lines(n // LINE, part, nparts)
    for i in range(lo, hi, BLOCK):
        offs = tl.minimum(i + tl.arange(0, BLOCK), hi - 1)  # the tail repeats the last line: harmless
        prefetch_l2(ptr + offs.to(tl.int64) * LINE)


@triton.jit
def prefetch_span_bulk(ptr, n, part, nparts, BLOCK: tl.constexpr):
    """`prefetch_span` through the TMA unit (sm_90 `cp.async.bulk.prefetch.L2`): each of BLOCK lanes asks for one
    contiguous piece of this program's share, one instruction per piece."""
    LINE: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    lo, hi = span_lines(n // LINE, part, nparts)
    per = tl.maximum(tl.cdiv(hi - lo, BLOCK), 1)
    first = lo + tl.arange(0, BLOCK) * per
    first = tl.where(first < hi, first, lo)  # idle lanes repeat the first piece: harmless
    nbytes = (tl.minimum(first + per, hi) - first) * 128
    if hi > lo:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                  [ptr + first.to(tl.int64) * LINE, nbytes.to(tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def load_span(ptr, n, part, nparts, BLOCK: tl.constexpr):
    """Read this program's share of the span for real (L2 allocates what it serves), 16 bytes per lane per load;
    returns an fp32 sum the caller must consume so the loads are not removed."""
    lo = part * tl.cdiv(n, nparts)
    hi = tl.minimum(lo + tl.cdiv(n, nparts), n)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(lo, hi, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < hi, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return tl.sum(acc, axis=0)


@triton.jit
def _warm_kernel(ptr, n, sink_ptr, CHUNK: tl.constexpr):
    """Read one CHUNK of the span per program (16-byte loads), so L2 holds what it served; a whole grid of these
    runs beside the idle kernel on another stream ("side")."""
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    s = tl.sum(tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32), axis=0)
    if s == 12345.678:  # never: keeps the loads
        tl.store(sink_ptr, s)


@triton.jit
def _idle_prefetch_kernel(w_ptr, n, ns, nparts, sink_ptr, BLOCK: tl.constexpr, PF: tl.constexpr):
    pid = tl.program_id(0)
    if PF == 1:
        prefetch_span(w_ptr, n, pid, nparts, BLOCK)
    if PF == 2:
        prefetch_span_bulk(w_ptr, n, pid, nparts, 128)
    if PF == 3:
        s = load_span(w_ptr, n, pid, nparts, 2048)
        if s == 12345.678:  # never: keeps the loads
            tl.store(sink_ptr, s)
    t0 = _clock(pid, True)
    while _clock(pid, True) - t0 < ns:
        pass


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    nparts = torch.cuda.get_device_properties(dev).multi_processor_count // 2
    rows = []
    sink = torch.zeros(1, dtype=torch.float32, device=dev)
    side = torch.cuda.Stream()
    for name, N, K in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        nbytes = N * K * 2
        copies = max(4, -(-args.rotate_mb * 2**20 // nbytes))
        ws = [torch.randn(N, K, dtype=torch.bfloat16, device=dev) * K ** -0.5 for _ in range(copies)]
        x = torch.randn(1, K, dtype=torch.bfloat16, device=dev)
        y = torch.empty(1, N, dtype=torch.bfloat16, device=dev)
        caps = [0] + [c for c in args.caps_mb if c * 2**20 < nbytes] + [nbytes / 2**20]
        for idle in args.idle_us:
            base = None
            for how in args.how:
                for cap in caps:
                    if cap == 0 and base is not None:
                        continue
                    n = int(cap * 2**20) // 2 // 64 * 64
                    it = iter(range(1 << 30))

                    def pair():
                        w = ws[next(it) % copies]
                        side_warm = how == "side" and n > 0
                        if side_warm:  # a concurrent branch of the graph, joined before the GEMM
                            main = torch.cuda.current_stream()
                            side.wait_stream(main)
                            with torch.cuda.stream(side):
                                _warm_kernel[(triton.cdiv(n, WARM_CHUNK),)](w, n, sink, CHUNK=WARM_CHUNK)
                        _idle_prefetch_kernel[(nparts,)](w, n, int(idle * 1000), nparts, sink, BLOCK=256,
                                                         PF=HOW[how] if n > 0 and not side_warm else 0)
                        if side_warm:
                            main.wait_stream(side)
                        linear(x, w, out=y)

                    us = time_graph(pair, copies * 4, args.reps) * 1e6
                    base = us if cap == 0 else base
                    rows.append(dict(shape=name, N=N, K=K, weight_mb=round(nbytes / 2**20, 1), idle_us=idle,
                                     how=how if cap else "none", cap_mb=round(cap, 1), us_per_pair=round(us, 2),
                                     gain_us=round(base - us, 2)))
                    print(rows[-1], flush=True)
            alone = time_graph(lambda: linear(x, ws[next(it) % copies], out=y), copies * 4, args.reps) * 1e6
            rows.append(dict(shape=name, N=N, K=K, weight_mb=round(nbytes / 2**20, 1), idle_us=0, how="alone",
                             cap_mb=0, us_per_pair=round(alone, 2), gain_us=0.0))
        del ws
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        for idle in sorted({r["idle_us"] for r in rows if r["shape"] == s and r["idle_us"] > 0}):
            for how in HOW:
                pts = [(r["cap_mb"], r["gain_us"]) for r in rows if r["shape"] == s and r["idle_us"] == idle
                       and r["how"] in (how, "none")]
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker="o", label=f"{how}, idle {idle} µs")
        ax.set_title(s)
        ax.set_xlabel("prefetched MB")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("GEMM time saved per pair (µs)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--idle-us", type=lambda s: [float(v) for v in s.split(",")], default=[4.0, 8.0])
    p.add_argument("--caps-mb", type=lambda s: [float(v) for v in s.split(",")], default=[8, 16, 24, 32, 48])
    p.add_argument("--rotate-mb", type=int, default=512, help="weight copies cycled through (>> L2)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tag", default="", help="file name tag")
    p.add_argument("--how", type=lambda s: s.split(","), default=list(HOW), help=f"of {list(HOW)}")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=None, help="default: all of " +
                   ",".join(s[0] for s in SHAPES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    rows = run(args)
    stem, meta = write_result_csv(args.out, "l2_prefetch", rows, args.tag)
    plot(rows, stem + ".png", meta)
    print("wrote", stem + ".csv")


if __name__ == "__main__":
    main()
