"""Fused row-parallel GEMM + all-reduce vs unfused baselines, TP=2, CUDA-graph timed, side by side.

    torchrun --nproc-per-node 2 bench/fused.py [--out bench/results] [--ms 1,8,32,64,128] [--quick]

Shapes (K per GPU -> N), Llama-3.1 TP=2 row-parallel layers: 8B o_proj 2048->4096, 8B down 7168->4096,
70B o_proj 4096->8192, 70B down 14336->8192. Per (shape, M), each variant is captured `--reps` times in
one CUDA graph (weights and inputs rotated through > L2-sized copies) and the graph is replayed; the
time is the median replay / reps. Writes fused_<device>_<date>.csv and .png (rank 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import torch.distributed as dist

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)

# (K per GPU, N) at TP=2. Result files before 2026-11-22 06:45 used K=7168 for 70B_down (wrong: the 70B
# intermediate size is 28672, so its down_proj has K=14336 per GPU); their all-reduce-only rows do not depend on K.
SHAPES = {"8B_o": (2048, 4096), "8B_down": (7168, 4096), "70B_o": (4096, 8192), "70B_down": (14336, 8192)}


def _rmsnorm_torch(h, w, eps):
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(h.dtype)


def build_variants(ws, K, N, M, dev, dt, group_name, symm_buf, cfg=None, ws_scratch=None, norm_cfg=None,
                   ws_put=None):
    """name -> (setup() -> state, step(state, i)) ; every step is one layer call on copy i."""
    import triton

    from fusedlis.triton_kernels.linear_allreduce import linear_allreduce

    wbytes = N * K * 2
    ncopy = max(2, triton.cdiv(256 << 20, wbytes))
    g = torch.Generator(device=dev).manual_seed(7 + dist.get_rank())
    ws_ = [torch.randn(N, K, device=dev, dtype=dt, generator=g) / K ** 0.5 for _ in range(ncopy)]
    xs = [torch.randn(M, K, device=dev, dtype=dt, generator=g) for _ in range(ncopy)]
    res = torch.randn(M, N, device=dev, dtype=dt, generator=torch.Generator(device=dev).manual_seed(3))
    nw = torch.ones(N, device=dev, dtype=dt)
    eps = 1e-5
    outs = [torch.empty(M, N, device=dev, dtype=dt) for _ in range(2)]
    v = {}

    def cublas_only(i):
        torch.mm(xs[i], ws_[i].t(), out=outs[0])

    v["cublas_gemm_only"] = cublas_only

    def cublas_nccl(i):
        y = torch.mm(xs[i], ws_[i].t(), out=outs[0])
        dist.all_reduce(y)

    v["cublas+nccl"] = cublas_nccl

    def cublas_nccl_norm(i):
        y = torch.mm(xs[i], ws_[i].t(), out=outs[0])
        dist.all_reduce(y)
        h = y + res
        _rmsnorm_torch(h, nw, eps)

    v["cublas+nccl+res+norm(torch)"] = cublas_nccl_norm

    if symm_buf is not None:
        sy = symm_buf[: M * N].view(M, N)

        def cublas_symm2(i):
            torch.mm(xs[i], ws_[i].t(), out=sy)
            torch.ops.symm_mem.two_shot_all_reduce_(sy, "sum", group_name)

        def cublas_symm1(i):
            torch.mm(xs[i], ws_[i].t(), out=sy)
            torch.ops.symm_mem.one_shot_all_reduce(sy, "sum", group_name)

        v["cublas+symm_two_shot"] = cublas_symm2
        v["cublas+symm_one_shot"] = cublas_symm1

    try:
        from fusedlis.triton_kernels import linear as fl_linear

        if symm_buf is not None:
            sy2 = symm_buf[: M * N].view(M, N)

            def fl_linear_symm(i):
                fl_linear(xs[i], ws_[i], out=sy2)
                torch.ops.symm_mem.two_shot_all_reduce_(sy2, "sum", group_name)

            v["fusedlis_linear+symm_two_shot"] = fl_linear_symm
        try:
            from fusedlis.comm import AllReduce  # noqa: F401  (fusedlis all-reduce, when it exists)

            ar = _make_fusedlis_allreduce(N, M, dt, dev)
            if ar is not None:
                def fl_unfused(i):
                    ar.all_reduce(fl_linear(xs[i], ws_[i]))

                v["fusedlis_linear+fusedlis_ar"] = fl_unfused
                if hasattr(ar, "all_reduce_norm"):
                    yb = outs[1]
                    # the all-reduce of an M x N output alone, and fused with residual + RMSNorm (LL one-shot)
                    v["fusedlis_ar_only"] = lambda i: ar.all_reduce(yb)
                    v["fusedlis_ar+res+norm_only"] = lambda i: ar.all_reduce_norm(yb, res, nw, eps, res_out=outs[0])
                    dar = getattr(ar, "device_ar", None)
                    if dar is not None and dar.supports_norm(M, N):
                        for t in (256, 512, 1024, 2048, 16384):  # columns per program (16384: whole rows)
                            v[f"fusedlis_ar+res+norm_only_tile{t}"] = (
                                lambda t_: lambda i: dar.all_reduce_norm(yb, res, nw, eps, res_out=outs[0], tile=t_))(t)
                        for t in (512, 1024):
                            for w_ in (1, 2, 8):  # the default is 4 warps
                                v[f"fusedlis_ar+res+norm_only_tile{t}_w{w_}"] = (
                                    lambda t_, w2: lambda i: dar.all_reduce_norm(yb, res, nw, eps, res_out=outs[0],
                                                                                 tile=t_, num_warps=w2))(t, w_)
                    from fusedlis.triton_kernels import rmsnorm as fl_rmsnorm

                    def fl_ar_then_norm(i):  # what the engine ran before the fusion: all-reduce, then a norm kernel
                        fl_rmsnorm(ar.all_reduce(yb), nw, eps, residual=res)

                    v["fusedlis_ar+triton_res+norm_only"] = fl_ar_then_norm

                    def fl_unfused_norm(i):
                        ar.all_reduce_norm(fl_linear(xs[i], ws_[i]), res, nw, eps, res_out=outs[0])

                    v["fusedlis_linear+fusedlis_ar+res+norm"] = fl_unfused_norm
        except Exception as e:  # noqa: BLE001
            print(f"fusedlis AllReduce unavailable: {e}", file=sys.stderr)
    except ImportError as e:
        print(f"fusedlis linear unavailable: {e}", file=sys.stderr)

    import importlib

    la = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")
    for one in (True, False):
        name = "fused_one_shot" if one else "fused_two_shot"
        c = dict(cfg or {}, ONE_SHOT=one)
        v[name] = (lambda c_: lambda i: linear_allreduce(xs[i], ws_[i], ws, out=outs[1], config=c_))(c)
    v["fused_auto"] = lambda i: linear_allreduce(xs[i], ws_[i], ws, out=outs[1], config=cfg)
    v["fused_auto+res+norm"] = lambda i: linear_allreduce(xs[i], ws_[i], ws, res, nw, eps, out=(outs[1], outs[0]),
                                                          config=norm_cfg or cfg)
    if ws_put is not None:  # inter-node rounds as NVSHMEM puts with signal (the transport between hosts)
        v["fused_put_auto"] = lambda i: linear_allreduce(xs[i], ws_[i], ws_put, out=outs[1], config=cfg)
        v["fused_put_auto+res+norm"] = lambda i: linear_allreduce(xs[i], ws_[i], ws_put, res, nw, eps,
                                                                  out=(outs[1], outs[0]), config=norm_cfg or cfg)
    gcfg = la._pick_config(M, N, K, ws, dt, None, cfg)
    part = la._part_dtype(M, gcfg, dt, None)
    # GEMM + tile pushes only (no reduction, no step bump): what the epilogue costs over a plain GEMM. On a
    # scratch workspace: pushed LL words that nobody consumes would corrupt the real workspace's next calls.
    if ws_scratch is not None:
        v["fused_gemm_push_only"] = lambda i: la._launch(xs[i], ws_[i], outs[1], None, None, None, ws_scratch, gcfg,
                                                         part, eps, finish=False, bump=False)
    # the plain GEMM of the same config through `linear` (split-K partials summed locally): what the push costs
    lcfg = {"USE_DOT": gcfg["USE_DOT"], "BLOCK_M": gcfg["BM"], "BLOCK_N": gcfg["BN"], "BLOCK_K": gcfg["BK"],
            "SPLIT_K": gcfg["SPLIT_K"], "num_warps": gcfg["num_warps"], "num_stages": gcfg["num_stages"]}
    v["fusedlis_linear_same_config"] = lambda i: fl_linear(xs[i], ws_[i], config=lcfg, out=outs[0])

    def fused_with(c, norm=False):
        if norm:
            return lambda i: linear_allreduce(xs[i], ws_[i], ws, res, nw, eps, out=(outs[1], outs[0]), config=c)
        return lambda i: linear_allreduce(xs[i], ws_[i], ws, out=outs[1], config=c)

    return v, ncopy, fused_with


_AR_CACHE = {}


def _make_fusedlis_allreduce(N, M, dt, dev):
    from fusedlis.comm import AllReduce

    if "ar" not in _AR_CACHE:
        try:
            _AR_CACHE["ar"] = AllReduce(max_bytes=128 * 8192 * 2)
        except TypeError:
            _AR_CACHE["ar"] = AllReduce()
    return _AR_CACHE["ar"]


def time_variant(fn, ncopy, reps, iters):
    """Median µs per call of `fn(i)` (i cycling over the `ncopy` weight copies), `reps` calls in one CUDA graph,
    `iters` replays each after a barrier: `fusedlis.perfmodel.timing.time_graph`, the package's one method."""
    import itertools

    from fusedlis.perfmodel.timing import time_graph

    i = itertools.count()
    us = time_graph(lambda: fn(next(i) % ncopy), reps, iters, barrier=dist.barrier) * 1e6
    dist.barrier()
    return us


def tune_one(sname, K, N, M, norm, ws, dev, dt, group_name, symm_buf, args, rank, tune_rows):
    """Sweep the kernel module's search space for one shape and M (with residual + RMSNorm if `norm`); the
    pick both ranks agree on (max over ranks of each time; the default unless a candidate is > 2% faster)."""
    import importlib

    la = importlib.import_module("fusedlis.triton_kernels.linear_allreduce")
    key = {"M": M, "N": N, "K": K, "dtype": dt, "local": ws.local_size, "norm": norm}
    cands = la.linear_allreduce_configs(key)  # the default first
    _, nc_, fused_with = build_variants(ws, K, N, M, dev, dt, group_name, symm_buf)
    tried = []
    for cand in cands:
        try:
            us = time_variant(fused_with(cand, norm=bool(norm)), nc_, args.reps, args.iters)
        except Exception as e:  # noqa: BLE001
            print(f"tune {sname} M={M} norm={norm} {cand} failed: {e}", file=sys.stderr)
            us = float("inf")
        tried.append((us, cand))
    del fused_with
    t = torch.tensor([u for u, _ in tried], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # both ranks must pick the same config
    i_best = int(torch.argmin(t))
    if float(t[i_best]) > 0.98 * float(t[0]):  # timing noise
        i_best = 0
    best = tried[i_best][1]
    if rank == 0:
        print(f"{sname:9s} M={M:4d} {'+norm ' if norm else ''}tuned ({len(tried)} configs): default={float(t[0]):.2f} "
              f"best={float(t[i_best]):.2f} {best}", flush=True)
    tune_rows.append((sname, K, N, M, json.dumps(best, sort_keys=True), float(t[i_best]), float(t[0]), norm))
    return best


def main() -> None:
    import triton

    from fusedlis.triton_kernels.linear_allreduce import FusedAllReduceWorkspace

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--ms", default="1,8,32,64,128")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument("--variants", default="",
                    help="comma-separated variant names or shell patterns to time (default: all); e.g. "
                         "'fusedlis_ar_only,fusedlis_ar+res+norm_only*' for the all-reduce + norm comparison alone")
    ap.add_argument("--tune", action="store_true", help="sweep GEMM tile configs of the fused kernel first")
    ap.add_argument("--put", action="store_true",
                    help="also time the fused kernel with NVSHMEM put-with-signal inter-node rounds (fused_put_*; "
                         "needs NVSHMEM and more than one (logical) node)")
    ap.add_argument("--tune-norm", action="store_true",
                    help="also sweep the configs with residual + RMSNorm fused (how the engine calls the kernel); "
                         "the picks get norm=1 keys")
    ap.add_argument("--tune-shapes", default=",".join(SHAPES),
                    help="shapes swept by --tune; the others reuse the pick of a swept shape with the same N")
    args = ap.parse_args()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    dt = torch.bfloat16
    ws = FusedAllReduceWorkspace.from_torch_symm(128, 8192, gpus_per_node=args.gpus_per_node)
    ws_scratch = FusedAllReduceWorkspace.from_torch_symm(128, 8192, gpus_per_node=args.gpus_per_node)
    ws_put = None
    if args.put:
        from fusedlis.comm import Topology

        topo = Topology(dist.get_world_size(), ws.local_size)
        if topo.num_nodes > 1:
            ws_put = FusedAllReduceWorkspace.from_nvshmem(128, 8192, topology=topo, transport="put")
        elif rank == 0:
            print("--put: one node, no inter-node rounds to put; skipped", file=sys.stderr)
    symm_buf, group_name = None, dist.group.WORLD.group_name
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm_buf = symm_mem.empty(128 * 8192, dtype=dt, device=dev)
        symm_mem.rendezvous(symm_buf, dist.group.WORLD)
    except Exception as e:  # noqa: BLE001
        print(f"torch symmetric memory unavailable: {e}", file=sys.stderr)
    Ms = [int(m) for m in args.ms.split(",")]
    rows, tune_rows, tuned = [], [], {}
    for sname in args.shapes.split(","):
        K, N = SHAPES[sname]
        for M in Ms:
            best = tuned.get((N, K, M, 0))
            best_norm = tuned.get((N, K, M, 1))
            if sname in args.tune_shapes.split(","):
                for norm in [nm for nm, on in ((0, args.tune), (1, args.tune_norm)) if on]:
                    best_ = tune_one(sname, K, N, M, norm, ws, dev, dt, group_name, symm_buf, args, rank, tune_rows)
                    tuned[(N, K, M, norm)] = best_
                    if norm:
                        best_norm = best_
                    else:
                        best = best_
            variants, ncopy, _ = build_variants(ws, K, N, M, dev, dt, group_name, symm_buf, best, ws_scratch,
                                                norm_cfg=best_norm, ws_put=ws_put)
            if args.variants:
                import fnmatch

                keep = args.variants.split(",")
                variants = {k: f for k, f in variants.items() if any(fnmatch.fnmatchcase(k, p) for p in keep)}
            for vname, fn in variants.items():
                try:
                    us = time_variant(fn, ncopy, args.reps, args.iters)
                except Exception as e:  # noqa: BLE001
                    print(f"{sname} M={M} {vname} failed: {type(e).__name__}: {e}", file=sys.stderr)
                    us = float("nan")
                rows.append((sname, K, N, M, vname, us))
                if rank == 0:
                    print(f"{sname:9s} M={M:4d} {vname:32s} {us:8.2f} us", flush=True)
            ws.check()
            if ws_put is not None:
                ws_put.check()
            del variants
            torch.cuda.empty_cache()
        if rank == 0:  # partial results survive a time limit
            write_results(rows, args.out, ws, triton.__version__, tune_rows)
    if rank == 0:
        write_results(rows, args.out, ws, triton.__version__, tune_rows)
    dist.barrier()
    dist.destroy_process_group()


def write_results(rows, out_dir, ws, triton_version, tune_rows=()):
    import csv

    os.makedirs(out_dir, exist_ok=True)
    devname = torch.cuda.get_device_name().replace(" ", "_")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    topo = f"{ws.num_nodes}x{ws.local_size}"
    stem = os.path.join(out_dir, f"fused_{devname}x{ws.world_size}_{topo}_{date}")
    meta = (f"# device={torch.cuda.get_device_name()} x{ws.world_size} topology={topo} torch={torch.__version__} "
            f"triton={triton_version} cuda={torch.version.cuda} nccl={'.'.join(map(str, torch.cuda.nccl.version()))} "
            f"python={platform.python_version()} date={date} timing=cuda-graph median per call (us)")
    with open(stem + ".csv", "w", newline="") as f:
        f.write(meta + "\n")
        wr = csv.writer(f)
        wr.writerow(["shape", "K", "N", "M", "variant", "us"])
        wr.writerows(rows)
    # summary: speedups of fused_auto over cublas+nccl and over the best unfused pair
    table = {}
    for s, K, N, M, vname, us in rows:
        table.setdefault((s, M), {})[vname] = us
    def unfused_pair(name: str) -> bool:  # GEMM + all-reduce as two kernels (not fused, no norm, not a part alone)
        return not name.startswith("fused_") and "norm" not in name and "only" not in name and "same_config" not in name

    timed_unfused = sorted({v for (_, _, _, _, v, _) in rows if unfused_pair(v)})
    lines = [meta, f"# best_unfused is the fastest of the unfused pairs timed in this run: {', '.join(timed_unfused)}",
             "shape M fused_us cublas+nccl_us best_unfused(name)_us speedup_vs_nccl speedup_vs_best "
             "norm_extra_us ll_ar_norm_extra_us ar_then_triton_norm_extra_us"
             + (" put_us put_norm_us (fused, inter-node rounds as NVSHMEM puts)"
                if any(r[4].startswith("fused_put") for r in rows) else "")]
    for (s, M), d in table.items():
        fused = min(d.get(k, float("inf")) for k in ("fused_one_shot", "fused_two_shot", "fused_auto"))
        unf = {k: v for k, v in d.items() if unfused_pair(k) and v == v}
        best = min(unf, key=unf.get) if unf else None
        nccl = d.get("cublas+nccl", float("nan"))
        extra = d.get("fused_auto+res+norm", float("nan")) - d.get("fused_auto", float("nan"))
        ll_extra = d.get("fusedlis_ar+res+norm_only", float("nan")) - d.get("fusedlis_ar_only", float("nan"))
        sep_extra = d.get("fusedlis_ar+triton_res+norm_only", float("nan")) - d.get("fusedlis_ar_only", float("nan"))
        lines.append(f"{s} {M} {fused:.2f} {nccl:.2f} {best}:{unf.get(best, float('nan')):.2f} "
                     f"{nccl / fused:.2f} {unf.get(best, float('nan')) / fused:.2f} {extra:+.2f} {ll_extra:+.2f} "
                     f"{sep_extra:+.2f}"
                     + (" {:.2f} {:.2f}".format(d.get("fused_put_auto", float("nan")),
                                                  d.get("fused_put_auto+res+norm", float("nan")))
                        if any(k.startswith("fused_put") for k in d) else ""))
    if tune_rows:
        lines.append("tuned config of the fused kernel (shape M config tuned_us default_us; '+norm': tuned with "
                     "residual + RMSNorm):")
        lines += [f"{s}{'+norm' if nm else ''} {M} {c} {us:.2f} {d:.2f}" for s, _, _, M, c, us, d, nm in tune_rows]
        # the picks, in the form `linear_allreduce_measured.json` takes (per device model; keys as the launcher's)
        picks = {f"N={N},K={K},M={M},local={ws.local_size}" + (",norm=1" if nm else ""): json.loads(c)
                 for _, K, N, M, c, _, _, nm in tune_rows}
        with open(stem + "_picks.json", "w") as f:
            json.dump({torch.cuda.get_device_name(): picks}, f, indent=1, sort_keys=True)
    with open(stem + "_summary.txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shapes = list(dict.fromkeys(r[0] for r in rows))
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, s in zip(axes[0], shapes):
            names = list(dict.fromkeys(r[4] for r in rows if r[0] == s))
            for nme in names:
                pts = [(r[3], r[5]) for r in rows if r[0] == s and r[4] == nme]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=nme,
                        linewidth=2.5 if nme.startswith("fused") else 1)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{s} (K={SHAPES[s][0]}, N={SHAPES[s][1]})")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("us per layer")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(meta[2:], fontsize=7)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
