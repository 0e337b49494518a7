"""How repeatable is an NCCL all-reduce latency measurement? A diagnostic for the perfmodel validation (issue 8).

`fusedlis calibrate` and bench/allreduce.py time NCCL with the same method (`fusedlis.perfmodel.timing.time_graph`)
yet, in one machine session (2xH200, 07:54), disagreed by 3 µs (20%) at 8-16 KB while agreeing within a few
percent above 32 KB. This script times NCCL at a few sizes several times over, in several ways, and writes every
measurement with its time since start and the SM clock, so the source of the spread can be seen:

- `dist`: `dist.all_reduce` on one buffer per size (bench/allreduce.py's call);
- `dist_fresh`: a newly allocated buffer for every measurement (calibrate's pattern);
- `fusedlis_nccl`: through `fusedlis.comm.AllReduce(backend="nccl")` (calibrate's call);
- each either right after a burst of GEMMs (`warm`) or after 0.3 s of idling (`idle`) or as is (`plain`).

  NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 bench/allreduce_stability.py --out bench/results
  python bench/allreduce_stability.py --plot bench/results/allreduce_stability_<...>.csv   (no GPU: the PNG only)

Writes allreduce_stability_<gpus>x<device>_<date>.csv and .png (every capture's time per size, one marker per
variant and warm-up state) and prints medians and spreads per (size, variant, mode).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import time

import torch
import torch.distributed as dist

from fusedlis.perfmodel import timing

SIZES = [8 << 10, 16 << 10, 32 << 10, 128 << 10, 1 << 20, 2 << 20]


def sm_clock_mhz() -> float:
    """Current SM clock of this GPU (NVML through torch), NaN where NVML is not available."""
    try:
        return float(torch.cuda.clock_rate())
    except Exception:
        return float("nan")


def plot(csv_path: str) -> str | None:
    """PNG next to `csv_path`: each capture's µs against message size, by variant (colour) and mode (marker)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no PNG")
        return None
    with open(csv_path, newline="") as f:
        lines = f.read().splitlines()
    meta = " ".join(ln.lstrip("# ") for ln in lines if ln.startswith("#"))
    rows = list(csv.DictReader([ln for ln in lines if not ln.startswith("#")]))
    fig, ax = plt.subplots(figsize=(8, 5))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for i, v in enumerate(variants):
        for j, m in enumerate(modes):
            pts = [(int(r["bytes"]) * (1 + 0.06 * (3 * i + j - 4)), float(r["us"])) for r in rows
                   if r["variant"] == v and r["mode"] == m]  # spread the markers a little along x
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, marker="o^s"[j % 3], color=f"C{i}",
                       label=f"{v} / {m}", alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message bytes (bf16)")
    ax.set_ylabel("µs per all-reduce, one point per graph capture")
    ax.set_title("NCCL all-reduce: repeated captures of one call\n" + meta, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    png = os.path.splitext(csv_path)[0] + ".png"
    fig.savefig(png, dpi=120)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", metavar="CSV", default=None, help="no measurement: write the PNG of this result file")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--calls", type=int, default=timing.CALLS)
    ap.add_argument("--replays", type=int, default=timing.REPLAYS)
    args = ap.parse_args()
    if args.plot:
        print("wrote", plot(args.plot))
        return
    if "RANK" not in os.environ:
        ap.error("run under torchrun with >= 2 GPUs (or pass --plot CSV)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    from fusedlis.comm import AllReduce

    sizes = [int(s) for s in args.sizes.split(",")]
    far = AllReduce(backend="nccl")
    bufs = {m: torch.randn(m // 2, device="cuda", dtype=torch.bfloat16) for m in sizes}
    dist.all_reduce(bufs[sizes[0]])
    timing.warm_clocks()
    t_start = time.perf_counter()
    rows = []
    for p in range(args.passes):
        for m in sizes:
            for variant in ("dist", "dist_fresh", "fusedlis_nccl"):
                for mode in ("plain", "warm", "idle"):
                    if mode == "warm":
                        timing.warm_clocks(n=50)
                    elif mode == "idle":
                        torch.cuda.synchronize()
                        time.sleep(0.3)
                    dist.barrier()
                    if variant == "dist":
                        x = bufs[m]
                        fn = lambda x=x: dist.all_reduce(x)  # noqa: E731
                    elif variant == "dist_fresh":
                        x = torch.randn(m // 2, device="cuda", dtype=torch.bfloat16)
                        fn = lambda x=x: dist.all_reduce(x)  # noqa: E731
                    else:
                        x = torch.randn(m // 2, device="cuda", dtype=torch.bfloat16)
                        fn = lambda x=x: far(x, inplace=True)  # noqa: E731
                    clk = sm_clock_mhz()
                    t = timing.time_graph(fn, args.calls, args.replays, barrier=dist.barrier,
                                          reduce_max=timing.max_over_ranks)
                    rows.append(dict(pass_=p, bytes=m, variant=variant, mode=mode, us=round(t * 1e6, 3),
                                     sm_clock_MHz=clk, t_s=round(time.perf_counter() - t_start, 2)))
    if rank == 0:
        dev = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "")
        date = dt.date.today().isoformat()
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"allreduce_stability_{world}x{dev}_{date}.csv")
        with open(path, "w", newline="") as f:
            f.write(f"# device={world}x{dev} torch={torch.__version__} nccl={nccl} date={date} "
                    f"calls={args.calls} replays={args.replays}\n")
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"{'bytes':>8} {'variant':>14} {'mode':>6}  median    min    max  spread  per pass (us)")
        for m in sizes:
            for variant in ("dist", "dist_fresh", "fusedlis_nccl"):
                for mode in ("plain", "warm", "idle"):
                    ts = [r["us"] for r in rows if r["bytes"] == m and r["variant"] == variant and r["mode"] == mode]
                    med = statistics.median(ts)
                    print(f"{m:>8} {variant:>14} {mode:>6} {med:7.2f} {min(ts):6.2f} {max(ts):6.2f} "
                          f"{(max(ts) - min(ts)) / med:6.1%}  " + " ".join(f"{t:.1f}" for t in ts))
        clocks = [r["sm_clock_MHz"] for r in rows]
        print(f"SM clock MHz over the run: min {min(clocks)} max {max(clocks)}; wrote {path}, {plot(path)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
