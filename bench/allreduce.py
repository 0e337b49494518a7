"""All-reduce latency, bf16, 8 KB - 4 MB, CUDA-graph captured, median over replays; baselines in the same run.

Each point is timed in --passes separate captures (interleaved over sizes and variants) and reported as their
trimmed mean (`us`; every capture's median in `us_captures`): one capture of a small NCCL all-reduce is a
sample of one of its latency modes (bench/allreduce_stability.py).

Variants: NCCL, torch symmetric memory one_shot / two_shot, fusedlis one_shot / two_shot (1 node x 2),
fusedlis nvrar as 2 logical nodes x 1 (NVSHMEM put-with-signal rail; peer-store rail; LL peer-store rail),
fusedlis auto (1x2 and 2x1). "_ll": the flag-in-data protocol; "_t1k": 1024-element tiles.
Writes bench/results/allreduce_<device>_<date>.csv and .png (or under --out).

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  python -m torch.distributed.run --nproc-per-node 2 bench/allreduce.py --out bench/results
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os

import torch
import torch.distributed as dist
import triton

from fusedlis.perfmodel.timing import PASSES, capture_center
from fusedlis.perfmodel.timing import time_graph as _shared_time_graph

SIZES = [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]


def time_graph(fn, calls: int, replays: int) -> float:
    """Median µs per call: `calls` calls captured in one graph, each replay timed with events after a barrier.

    The method `fusedlis calibrate` uses too (`fusedlis.perfmodel.timing.time_graph`), so a calibrated profile
    and this bench measure the same thing; the max over ranks is taken by the caller."""
    return _shared_time_graph(fn, calls, replays, barrier=dist.barrier) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    # many calls per graph: the ranks' start skew of each replay is spread over them
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--passes", type=int, default=PASSES,
                    help="separate graph captures per point, interleaved over sizes and variants; the point is their "
                         "trimmed mean (fusedlis.perfmodel.timing.capture_center: one capture of a small NCCL "
                         "all-reduce is a sample of one latency mode)")
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--variants", default="",
                    help="comma-separated fusedlis_* device variants to time (default: all); nccl, torch symmetric "
                         "memory and the fusedlis_auto* front ends always run")
    ap.add_argument("--provider", default="auto", help="symmetric memory: auto | nvshmem | torch")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    import torch.distributed._symmetric_memory as symm_mem

    from fusedlis.comm import AllReduce, SymmetricWorkspace, Topology
    from fusedlis.comm.device import DeviceAllReduce

    sizes = [int(s) for s in args.sizes.split(",")]
    dtype = torch.bfloat16
    maxn = max(sizes) // 2
    ws = SymmetricWorkspace((1 << 30) * max(1, world // 2), flag_words=1 << 15, provider=args.provider)
    t12, t21 = Topology(world, world), Topology(world, 1)
    def dar(topo, **kw):  # built after the --variants filter (each takes workspace)
        kw.setdefault("ll_max_elems", 0)  # LL slots only where an LL variant uses them (workspace size)
        return lambda: DeviceAllReduce(ws, maxn, dtype, topo, **kw)

    ours = {
        "fusedlis_one_shot": (dar(t12), "one_shot"),
        "fusedlis_one_shot_ptr": (dar(t12, one_shot_transport="ptr"), "one_shot"),
        "fusedlis_one_shot_t1k": (dar(t12, block=1024, num_warps=4), "one_shot"),
        "fusedlis_two_shot": (dar(t12), "two_shot"),
        "fusedlis_one_shot_ll": (dar(t12, ll_max_elems=maxn), "one_shot_ll"),
        "fusedlis_one_shot_ll_t1k": (dar(t12, ll_max_elems=maxn, block=1024, num_warps=4), "one_shot_ll"),
        "fusedlis_one_shot_ll_t2k": (dar(t12, ll_max_elems=maxn, block=2048, num_warps=8), "one_shot_ll"),
        "fusedlis_two_shot_ll": (dar(t12, ll_max_elems=maxn), "two_shot_ll"),
        "fusedlis_two_shot_ll_t1k": (dar(t12, ll_max_elems=maxn, block=1024, num_warps=4), "two_shot_ll"),
        f"fusedlis_nvrar_2x1_{'put' if ws.uses_nvshmem else 'ptr'}": (dar(t21), "nvrar"),
    }
    if ws.uses_nvshmem:
        ours["fusedlis_nvrar_2x1_ptr"] = (dar(t21, transport="ptr"), "nvrar")
    ours["fusedlis_nvrar_2x1_ll"] = (dar(t21, ll_max_elems=maxn), "nvrar_ll")
    ours["fusedlis_nvrar_2x1_ll_t1k"] = (dar(t21, ll_max_elems=maxn, block=1024, num_warps=4), "nvrar_ll")
    # 2 logical nodes of world/2 GPUs (world >= 4): NVRAR's three stages (reduce-scatter, recursive doubling
    # between the nodes, all-gather)
    t22 = Topology(world, world // 2) if world >= 4 and world % 2 == 0 else None
    if t22 is not None:
        ours["fusedlis_nvrar_2x2"] = (dar(t22), "nvrar")
        ours["fusedlis_nvrar_2x2_ll"] = (dar(t22, ll_max_elems=maxn), "nvrar_ll")
        auto22 = AllReduce(dtype=dtype, max_bytes=max(sizes), workspace=ws, topology=t22)
    keep = set(args.variants.split(",")) if args.variants else set(ours)
    ours = {k: (make(), alg) for k, (make, alg) in ours.items() if k in keep}
    auto21 = AllReduce(dtype=dtype, max_bytes=max(sizes), workspace=ws, topology=t21)
    auto = AllReduce(dtype=dtype, max_bytes=max(sizes), workspace=ws, topology=t12)
    if hasattr(symm_mem, "set_backend"):
        try:
            symm_mem.set_backend("CUDA")
        except Exception:
            pass
    gname = dist.group.WORLD.group_name
    sbuf = symm_mem.empty(maxn, dtype=dtype, device="cuda")
    symm_mem.rendezvous(sbuf, gname)

    # bring the clocks up before timing (idle GPUs sit at low clocks; the first sizes would pay for it)
    a = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    t_end = torch.cuda.Event(enable_timing=True)
    for _ in range(200):
        a @ a
    torch.cuda.synchronize()
    del a, t_end
    rows = []
    g = torch.Generator(device="cuda").manual_seed(7 + rank)
    points = []  # (nbytes, name, fn, err): every variant checked once, then timed in args.passes captures
    for nbytes in sizes:
        n = nbytes // 2
        x = torch.randn(n, generator=g, device="cuda").to(dtype)
        ref = x.double()
        dist.all_reduce(ref)
        out = torch.empty_like(x)
        nbuf = x.clone()
        sv = sbuf[:n]
        variants = {
            "nccl": lambda nbuf=nbuf: dist.all_reduce(nbuf),
            "torch_symm_one_shot": lambda sv=sv: torch.ops.symm_mem.one_shot_all_reduce(sv, "sum", gname),
            "torch_symm_two_shot": lambda sv=sv: torch.ops.symm_mem.two_shot_all_reduce_(sv, "sum", gname),
            "fusedlis_auto": lambda x=x, out=out: auto(x, out=out),
            "fusedlis_auto_2x1": lambda x=x, out=out: auto21(x, out=out),
        }
        if t22 is not None:
            variants["fusedlis_auto_2x2"] = lambda x=x, out=out: auto22(x, out=out)
        for name, (ar, alg) in ours.items():
            variants[name] = (lambda ar=ar, alg=alg, x=x, out=out: ar(x, out=out, algorithm=alg))
        for name, fn in variants.items():
            # correctness of this variant at this size (fresh input, poisoned output)
            if name.startswith("fusedlis"):
                out.fill_(float("nan"))
                fn()
                ws.check()
                err = ((out.double() - ref).norm() / ref.norm()).item()
            elif name == "nccl":
                nbuf.copy_(x)
                fn()
                err = ((nbuf.double() - ref).norm() / ref.norm()).item()
            else:
                sv.copy_(x)
                r = fn()
                err = (((r if r is not None else sv).double() - ref).norm() / ref.norm()).item()
            points.append((nbytes, name, fn, err))
    samples: dict[tuple[int, str], list[float]] = {}
    for p in range(args.passes):
        for nbytes, name, fn, err in points:
            t = torch.tensor([time_graph(fn, args.calls, args.replays)], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            samples.setdefault((nbytes, name), []).append(t.item())
        if rank == 0:
            print(f"pass {p + 1}/{args.passes} done", flush=True)
    for nbytes, name, fn, err in points:
        ts = samples[(nbytes, name)]
        us = capture_center(ts)
        rows.append({"bytes": nbytes, "variant": name, "us": round(us, 3),
                     "us_captures": ";".join(f"{t:.3f}" for t in ts), "rel_err": f"{err:.2e}",
                     "algorithm": auto.algorithm_for(nbytes) if name == "fusedlis_auto" else
                     auto21.algorithm_for(nbytes) if name == "fusedlis_auto_2x1" else
                     auto22.algorithm_for(nbytes) if name == "fusedlis_auto_2x2" else ""})
        if rank == 0:
            print(f"{nbytes:>8} {name:<28} {us:8.2f} us  err {err:.1e}  captures {rows[-1]['us_captures']}",
                  flush=True)
    ws.check()
    if rank == 0:
        write(rows, args.out)
    dist.barrier()
    torch.cuda.synchronize()
    os._exit(0)  # skip interpreter teardown: NVSHMEM buffers must not be freed after the runtime exits


def write(rows: list[dict], out_dir: str) -> None:
    dev = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "")
    ngpu = int(os.environ["WORLD_SIZE"])
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    meta = dict(device=f"{ngpu}x{dev}", torch=torch.__version__, triton=triton.__version__, nccl=nccl, date=date)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"allreduce_{ngpu}x{dev}_{date}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    # summary of the targets
    by = {(r["variant"], r["bytes"]): r["us"] for r in rows}
    lines = []
    for b in sorted({r["bytes"] for r in rows}):
        a = by.get(("fusedlis_auto", b))
        intra = min(v for (k, bb), v in by.items() if bb == b and k.startswith(("fusedlis_one_shot",
                                                                                 "fusedlis_two_shot")))
        nv = min((v for (k, bb), v in by.items() if bb == b and k.startswith("fusedlis_nvrar_2x1")),
                 default=float("nan"))
        a21 = by.get(("fusedlis_auto_2x1", b), float("nan"))
        line = (f"{b:>8} B auto {a:7.2f} us | /nccl {a / by[('nccl', b)]:.2f} | /symm2shot "
                f"{a / by[('torch_symm_two_shot', b)]:.2f} | nvrar2x1/best-intra {nv / intra:.2f} | "
                f"auto2x1 {a21:.2f} us /best-intra {a21 / intra:.2f}")
        a22 = by.get(("fusedlis_auto_2x2", b))
        if a22 is not None:
            line += f" | auto2x2 {a22:.2f} us /nccl {a22 / by[('nccl', b)]:.2f}"
        lines.append(line)
    print("\n".join(lines))
    with open(stem + "_summary.txt", "w") as f:
        f.write(" ".join(f"{k}={v}" for k, v in meta.items()) + "\n" + "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        names = list(dict.fromkeys(r["variant"] for r in rows))
        cmap = plt.get_cmap("tab20")
        for i, v in enumerate(names):
            pts = sorted((r["bytes"], r["us"]) for r in rows if r["variant"] == v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD"[i % 5], label=v, color=cmap(i % 20),
                    linestyle="-" if v.startswith("fusedlis") else "--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message bytes (bf16)")
        ax.set_ylabel("µs per all-reduce (CUDA graph; trimmed mean of captures)")
        ax.set_title(f"all-reduce {meta['device']} torch {meta['torch']} triton {meta['triton']} "
                     f"nccl {nccl} {date}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
    except Exception as e:  # plotting is optional
        print(f"no PNG: {e}")


if __name__ == "__main__":
    main()
