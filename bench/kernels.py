"""Benchmark the decode kernels against torch on one GPU: linear vs cuBLAS, decode_attention vs SDPA,
rmsnorm vs torch, with the device's copy bandwidth measured in the same run as the ceiling.

    python bench/kernels.py --out bench/results            # everything
    python bench/kernels.py --out /tmp/r --parts linear --models 8b --tps 2 --ms 1,32

Method: every timed variant is captured into one CUDA graph of `n` launches that rotate through `n`
copies of the weights (or KV caches) totalling >= 512 MB, so L2 (50-60 MB) cannot hold them; the graph
is replayed `--reps` times and the median replay time / n is reported. All kernel variants are first
compiled and checked against a float64 reference in a pool of worker processes (compile is CPU-bound).
Writes kernels_{linear,attention,rmsnorm}_<device>_<date>.csv, a best-config JSON (tuning-key strings
-> config; {"backend": "torch"} where cuBLAS measured faster), a PNG and a log under --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import sys
import time

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import torch  # noqa: E402

ROTATE_BYTES = 512 << 20
MODELS = {  # hidden, intermediate, q heads, kv heads, head_dim
    "8b": (4096, 14336, 32, 8, 128),
    "70b": (8192, 28672, 64, 8, 128),
    "tiny": (64, 96, 4, 2, 16),  # --dry (CPU interpreter) smoke runs only
}
DEV = "cuda"
DTYPE = torch.bfloat16


def empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def num_sms():
    return torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132


def log(*a):
    print(*a, flush=True)


def linear_shapes(models, tps):
    out = []
    for name in models:
        h, inter, hq, hkv, d = MODELS[name]
        for tp in tps:
            hq_l, hkv_l = hq // tp, max(1, hkv // tp)
            out += [
                (name, tp, "qkv", (hq_l + 2 * hkv_l) * d, h),
                (name, tp, "o", h, hq_l * d),
                (name, tp, "gate_up", 2 * inter // tp, h),
                (name, tp, "down", h, inter // tp),
            ]
    return out


# ---------------------------------------------------------------------------------------------- timing

def time_graph(launches, reps: int) -> float:
    """Median µs per launch of `launches` (zero-arg callables), each captured once into one CUDA graph
    (`fusedlis.perfmodel.timing.time_graph`, the package's one timing method)."""
    if DEV != "cuda":  # --dry: wall clock, no graphs
        t0 = time.perf_counter()
        for f in launches[:2]:
            f()
        return (time.perf_counter() - t0) * 1e6 / 2
    import itertools

    from fusedlis.perfmodel.timing import time_graph as shared_time_graph

    cycle = itertools.cycle(launches)
    return shared_time_graph(lambda: next(cycle)(), len(launches), reps) * 1e6


def copy_bandwidth(reps: int) -> dict:
    n = 2 << 30 if DEV == "cuda" else 1 << 20
    # bf16 elements: a uint8 copy_ ran at only 2.77 TB/s (read + write) on H200 on 2026-11-22.
    a = torch.randn(n // 2, dtype=DTYPE, device=DEV)
    b = torch.empty_like(a)
    t_copy = time_graph([lambda: b.copy_(a)] * 4, reps)
    x = a
    t_sum = time_graph([lambda: x.sum(dtype=torch.float32)] * 4, reps)
    del a, b
    empty_cache()
    return {"copy_TBps": 2 * n / t_copy / 1e6, "sum_read_TBps": n / t_sum / 1e6}


# ---------------------------------------------------------------------------------------------- linear

def _compile_check(task):
    """Worker: run each config once on the real shape (compiles it), return max rel error per config."""
    M, N, K, cfgs, activation, dev, dtype = task
    global DEV, DTYPE
    DEV, DTYPE = dev, dtype
    torch.manual_seed(M * 7 + N + K)
    from fusedlis.triton_kernels import linear, linear_ref
    x = torch.randn(M, K, device=DEV, dtype=DTYPE)
    w = torch.randn(N, K, device=DEV, dtype=DTYPE) / math.sqrt(K)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = linear_ref(x.float(), w.float(), activation=activation).double()  # fp32 ref: error << 1e-2
    out = []
    for cfg in cfgs:
        try:
            y = torch.full((M, ref.shape[1]), float("nan"), device=DEV, dtype=DTYPE)
            linear(x, w, activation=activation, config=cfg, out=y)
            y2 = linear(x, w, activation=activation, config=cfg)  # twice: split-K counters must reset
            err = max(((y.double() - ref).norm() / ref.norm()).item(),
                      ((y2.double() - ref).norm() / ref.norm()).item())
            out.append(err if math.isfinite(err) else float("inf"))
        except Exception as e:  # noqa: BLE001 - report, don't die
            out.append(f"{type(e).__name__}: {e}"[:200])
    return out


def bench_linear(args, shapes, ms, ceiling, pool):
    from fusedlis.triton_kernels import linear, linear_configs, linear_default_config, linear_key
    sms = num_sms()
    cases = []
    for (model, tp, layer, N, K) in shapes:
        for M in ms:
            key = linear_key(M, N, K, DTYPE, None, False)
            key["sms"] = sms
            cfgs = linear_configs(key) if not args.quick else [linear_default_config(key)]
            if args.dry:
                cfgs = cfgs[:2]
            cases.append((model, tp, layer, N, K, M, cfgs, linear_default_config(key)))
    t0 = time.time()
    checks = pool.map(_compile_check, [(M, N, K, cfgs, None, DEV, DTYPE) for (_, _, _, N, K, M, cfgs, _) in cases],
                      chunksize=1)
    log(f"linear: compiled+checked {sum(len(c[6]) for c in cases)} variants in {time.time() - t0:.0f}s")
    rows, best_json = [], {}
    for case, errs in zip(cases, checks):
        model, tp, layer, N, K, M, cfgs, default = case
        wbytes = N * K * 2
        n = max(2, min(256, math.ceil(ROTATE_BYTES / wbytes)))
        ws = [torch.randn(N, K, device=DEV, dtype=DTYPE) / math.sqrt(K) for _ in range(n)]
        xs = [torch.randn(M, K, device=DEV, dtype=DTYPE) for _ in range(n)]
        ys = [torch.empty(M, N, device=DEV, dtype=DTYPE) for _ in range(n)]
        t_torch = time_graph([lambda i=i: torch.mm(xs[i], ws[i].t(), out=ys[i]) for i in range(n)], args.reps)
        # What callers get with no config: tuner cache, else the measured table, else the heuristic.
        t_auto = time_graph([lambda i=i: linear(xs[i], ws[i], out=ys[i]) for i in range(n)], args.reps)
        res = []
        for cfg, err in zip(cfgs, errs):
            if not isinstance(err, float) or err > 1e-2:
                log(f"  FAIL {model} tp{tp} {layer} M={M} {cfg}: {err}")
                continue
            t = time_graph([lambda i=i, c=cfg: linear(xs[i], ws[i], config=c, out=ys[i]) for i in range(n)],
                           args.reps)
            res.append((t, cfg, err))
        del ws, xs, ys
        empty_cache()
        if not res:
            continue
        t_best, best_cfg, best_err = min(res, key=lambda r: r[0])
        t_def = next((t for t, c, _ in res if c == default), float("nan"))
        # programmatic dependent launch (triton_kernels/_pdl.py): the same configs with it off, and with the
        # L2 weight prefetch off or doubled
        pdl_cols = {}
        if DEV == "cuda":
            from fusedlis.triton_kernels._pdl import pdl_enabled
            if pdl_enabled(torch.device("cuda")):
                ws = [torch.randn(N, K, device=DEV, dtype=DTYPE) / math.sqrt(K) for _ in range(n)]
                xs = [torch.randn(M, K, device=DEV, dtype=DTYPE) for _ in range(n)]
                ys = [torch.empty(M, N, device=DEV, dtype=DTYPE) for _ in range(n)]
                pf = min(math.ceil(K / best_cfg.get("SPLIT_K", 1) / best_cfg["BLOCK_K"]), 2) * best_cfg["BLOCK_K"] // 64
                for name, c in (("best_pdl_us", {**best_cfg, "PDL": True}),
                                ("best_pf0_us", {**best_cfg, "PDL": True, "PF_LINES": 0}),
                                ("best_pf2x_us", {**best_cfg, "PDL": True, "PF_LINES": 2 * pf})):
                    pdl_cols[name] = time_graph([lambda i=i, c=c: linear(xs[i], ws[i], config=c, out=ys[i])
                                                 for i in range(n)], args.reps)
                os.environ["FUSEDLIS_PDL"] = "0"
                try:
                    pdl_cols["best_nopdl_us"] = time_graph(
                        [lambda i=i: linear(xs[i], ws[i], config=best_cfg, out=ys[i]) for i in range(n)], args.reps)
                    pdl_cols["auto_nopdl_us"] = time_graph(
                        [lambda i=i: linear(xs[i], ws[i], out=ys[i]) for i in range(n)], args.reps)
                finally:
                    os.environ.pop("FUSEDLIS_PDL")
                del ws, xs, ys
                empty_cache()
        by = wbytes + M * K * 2 + M * N * 2
        dispatch = "triton" if t_best <= t_torch else "torch"
        rows.append({
            "model": model, "tp": tp, "layer": layer, "M": M, "N": N, "K": K, "weight_MB": wbytes / 1e6,
            "rotate_copies": n, "torch_us": t_torch, "triton_default_us": t_def, "triton_best_us": t_best,
            "auto_us": t_auto, "torch_TBps": by / t_torch / 1e6, "triton_default_TBps": by / t_def / 1e6,
            "triton_best_TBps": by / t_best / 1e6, "best_frac_of_read_bw": by / t_best / 1e6 / ceiling,
            "auto_frac_of_read_bw": by / t_auto / 1e6 / ceiling,
            "best_vs_torch": t_torch / t_best, "default_vs_torch": t_torch / t_def, "auto_vs_torch": t_torch / t_auto,
            "dispatch": dispatch, "n_configs": len(res), "best_err": best_err, "best_config": json.dumps(best_cfg),
            **{k: pdl_cols.get(k, float("nan")) for k in ("best_pdl_us", "best_nopdl_us", "auto_nopdl_us",
                                                          "best_pf0_us", "best_pf2x_us")},
        })
        from fusedlis.tuning.keys import key_string
        kstr = key_string(linear_key(M, N, K, DTYPE, None, False))
        best_json[kstr] = best_cfg if dispatch == "triton" else {"backend": "torch"}
        r = rows[-1]
        log(f"{model:>4} tp{tp} {layer:>7} M={M:<3} N={N:<6} K={K:<6} torch {t_torch:7.2f}us "
            f"{r['torch_TBps']:.2f}TB/s | default {t_def:7.2f}us | best {t_best:7.2f}us "
            f"{r['triton_best_TBps']:.2f}TB/s ({r['best_frac_of_read_bw'] * 100:.0f}% of read BW) "
            f"x{r['best_vs_torch']:.2f} -> {dispatch} {best_cfg} | auto {t_auto:7.2f}us | "
            + " ".join(f"{k[:-3]} {v:.2f}" for k, v in pdl_cols.items()))
    return rows, best_json


def bench_swiglu(args, models, ms):
    """Fused gate_up + SwiGLU (default config) vs cuBLAS matmul + silu*mul, TP=2."""
    import torch.nn.functional as F
    from fusedlis.triton_kernels import linear, linear_ref
    rows = []
    for model in models:
        h, inter, *_ = MODELS[model]
        N, K = 2 * inter // 2, h
        for M in ms:
            n = max(2, min(256, math.ceil(ROTATE_BYTES / (N * K * 2))))
            ws = [torch.randn(N, K, device=DEV, dtype=DTYPE) / math.sqrt(K) for _ in range(n)]
            xs = [torch.randn(M, K, device=DEV, dtype=DTYPE) for _ in range(n)]
            y = linear(xs[0], ws[0], activation="swiglu")
            ref = linear_ref(xs[0].double(), ws[0].double(), activation="swiglu")
            err = ((y.double() - ref).norm() / ref.norm()).item()

            def torch_swiglu(i):
                g, u = torch.mm(xs[i], ws[i].t()).chunk(2, dim=-1)
                return F.silu(g) * u
            t_torch = time_graph([lambda i=i: torch_swiglu(i) for i in range(n)], args.reps)
            t_tri = time_graph([lambda i=i: linear(xs[i], ws[i], activation="swiglu") for i in range(n)],
                               args.reps)
            best_us, best_cfg = float("inf"), None
            if not args.quick:  # the fused kernel's own search space, for where the dispatched config is slow
                from fusedlis.triton_kernels.linear import linear_configs, linear_key
                for cfg in linear_configs(linear_key(M, N, K, DTYPE, "swiglu", False))[:16]:
                    try:
                        t = time_graph([lambda i=i, c=cfg: linear(xs[i], ws[i], activation="swiglu", config=c)
                                        for i in range(n)], args.reps)
                    except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
                        log(f"swiglu {model} M={M} {cfg}: {type(e).__name__}")
                        continue
                    if t < best_us:
                        best_us, best_cfg = t, cfg
            rows.append({"model": model, "tp": 2, "layer": "gate_up+swiglu", "M": M, "N": N, "K": K,
                         "torch_us": t_torch, "triton_default_us": t_tri, "triton_best_us": best_us,
                         "triton_best_config": json.dumps(best_cfg, sort_keys=True) if best_cfg else "", "err": err})
            log(f"swiglu {model} M={M}: torch mm+silu*mul {t_torch:.2f}us, triton fused {t_tri:.2f}us, "
                f"best swept {best_us:.2f}us {best_cfg}, err {err:.1e}")
            del ws, xs
            empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- attention

def bench_attention(args, ceiling):
    import torch.nn.functional as F
    from fusedlis.triton_kernels import (decode_attention, decode_attention_configs,
                                         decode_attention_default_config, decode_attention_key,
                                         decode_attention_ref)
    sms = num_sms()
    setups = [("8b", 1, 32, 8), ("8b", 2, 16, 4), ("70b", 8, 8, 1)]
    rows = []
    for model, tp, hq, hkv in setups:
        D = 128
        for B in args.batches:
            for ctx in args.contexts:
                kvbytes = 2 * B * hkv * ctx * D * 2
                n = max(2, min(128, math.ceil(ROTATE_BYTES / kvbytes)))
                kcs = [torch.randn(B, hkv, ctx, D, device=DEV, dtype=DTYPE) for _ in range(n)]
                vcs = [torch.randn(B, hkv, ctx, D, device=DEV, dtype=DTYPE) for _ in range(n)]
                qs = [torch.randn(B, hq, D, device=DEV, dtype=DTYPE) for _ in range(n)]
                lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
                scale = D ** -0.5
                key = decode_attention_key(B, hq, hkv, D, ctx, DTYPE)
                key["sms"] = sms
                default = decode_attention_default_config(key)
                ref = decode_attention_ref(qs[0].double(), kcs[0].double(), vcs[0].double(), lens, scale)
                res = []
                for cfg in decode_attention_configs(key)[:2 if args.dry else None]:
                    o = decode_attention(qs[0], kcs[0], vcs[0], lens, scale, config=cfg)
                    err = ((o.double() - ref).norm() / ref.norm()).item()
                    if not err <= 1e-2:
                        log(f"  FAIL attention {model} B={B} ctx={ctx} {cfg}: err {err}")
                        continue
                    t = time_graph([lambda i=i, c=cfg: decode_attention(qs[i], kcs[i], vcs[i], lens, scale, config=c)
                                    for i in range(n)], args.reps)
                    res.append((t, cfg, err))
                t_sdpa = time_graph([lambda i=i: F.scaled_dot_product_attention(
                    qs[i].view(B, hq, 1, D), kcs[i], vcs[i], scale=scale, enable_gqa=True) for i in range(n)],
                    args.reps)
                if not res:
                    continue
                t_best, best_cfg, err = min(res, key=lambda r: r[0])
                t_def = next((t for t, c, _ in res if c == default), float("nan"))
                by = kvbytes + 2 * B * hq * D * 2
                rows.append({"model": model, "tp": tp, "Hq": hq, "Hkv": hkv, "B": B, "ctx": ctx,
                             "kv_MB": kvbytes / 1e6, "sdpa_us": t_sdpa, "triton_default_us": t_def,
                             "triton_best_us": t_best, "sdpa_TBps": by / t_sdpa / 1e6,
                             "triton_default_TBps": by / t_def / 1e6, "triton_best_TBps": by / t_best / 1e6,
                             "best_frac_of_read_bw": by / t_best / 1e6 / ceiling,
                             "default_frac_of_read_bw": by / t_def / 1e6 / ceiling,
                             "best_err": err, "best_config": json.dumps(best_cfg)})
                r = rows[-1]
                log(f"attn {model} tp{tp} B={B:<3} ctx={ctx:<5} sdpa {t_sdpa:7.2f}us {r['sdpa_TBps']:.2f}TB/s | "
                    f"default {t_def:7.2f}us {r['triton_default_TBps']:.2f}TB/s | best {t_best:7.2f}us "
                    f"{r['triton_best_TBps']:.2f}TB/s ({r['best_frac_of_read_bw'] * 100:.0f}% of read BW) {best_cfg}")
                del kcs, vcs, qs
                empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- rmsnorm

def bench_rmsnorm(args):
    from fusedlis.triton_kernels import rmsnorm, rmsnorm_ref
    rows = []
    for N in ((4096, 8192) if not args.dry else (100,)):
        for M in (1, 32, 128):
            n = 64
            xs = [torch.randn(M, N, device=DEV, dtype=DTYPE) for _ in range(n)]
            rs = [torch.randn(M, N, device=DEV, dtype=DTYPE) for _ in range(n)]
            w = torch.randn(N, device=DEV, dtype=DTYPE)
            y, h = rmsnorm(xs[0], w, 1e-5, residual=rs[0])
            yr, hr = rmsnorm_ref(xs[0].double(), w.double(), 1e-5, residual=rs[0].double())
            err = ((y.double() - yr).norm() / yr.norm()).item()

            def torch_rms(i):
                h = xs[i] + rs[i]
                hf = h.float()
                return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).to(h.dtype), h
            t_torch = time_graph([lambda i=i: torch_rms(i) for i in range(n)], args.reps)
            t_tri = time_graph([lambda i=i: rmsnorm(xs[i], w, 1e-5, residual=rs[i]) for i in range(n)], args.reps)
            rows.append({"M": M, "N": N, "torch_us": t_torch, "triton_us": t_tri, "speedup": t_torch / t_tri,
                         "err": err})
            log(f"rmsnorm+residual M={M} N={N}: torch {t_torch:.2f}us triton {t_tri:.2f}us err {err:.1e}")
    return rows


# ---------------------------------------------------------------------------------------------- output

def write_csv(path, rows, meta):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in meta.items()))
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path, lin_rows, att_rows, meta):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no PNG")
        return
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    ax = axes[0]
    tp2 = [r for r in lin_rows if r["tp"] == 2 and r["M"] in (1, 32)]
    labels = [f"{r['model']} {r['layer']}\nM={r['M']}" for r in tp2]
    xs = range(len(tp2))
    ax.bar([x - 0.2 for x in xs], [r["torch_TBps"] for r in tp2], 0.4, label="torch.matmul (cuBLAS)")
    ax.bar([x + 0.2 for x in xs], [r["triton_best_TBps"] for r in tp2], 0.4, label="fusedlis linear (best cfg)")
    ax.axhline(meta["ceiling_TBps"], color="k", ls="--", label=f"read BW {meta['ceiling_TBps']:.2f} TB/s")
    ax.axhline(0.8 * meta["ceiling_TBps"], color="r", ls=":", label="80% target")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("achieved HBM TB/s")
    ax.set_title("linear, TP=2 per-GPU shapes, bf16")
    ax.legend(fontsize=8)
    ax = axes[1]
    for model, tp in sorted({(r["model"], r["tp"]) for r in att_rows}):
        for B in sorted({r["B"] for r in att_rows}):
            sel = [r for r in att_rows if r["model"] == model and r["tp"] == tp and r["B"] == B]
            ax.plot([r["ctx"] for r in sel], [r["triton_best_TBps"] for r in sel], "o-", label=f"triton {model} tp{tp} B={B}")
            ax.plot([r["ctx"] for r in sel], [r["sdpa_TBps"] for r in sel], "x--", label=f"SDPA {model} tp{tp} B={B}")
    ax.axhline(meta["ceiling_TBps"], color="k", ls="--")
    ax.axhline(0.7 * meta["ceiling_TBps"], color="r", ls=":", label="70% target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context")
    ax.set_ylabel("achieved HBM TB/s")
    ax.set_title("decode_attention vs SDPA, bf16")
    ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--parts", default="linear,attention,swiglu,rmsnorm")
    p.add_argument("--models", default="8b,70b")
    p.add_argument("--tps", default="1,2,8")
    p.add_argument("--ms", default="1,8,32,64,128")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="default configs only (no sweep)")
    p.add_argument("--dry", action="store_true", help="CPU interpreter smoke run on tiny shapes (no timing value)")
    args = p.parse_args(argv)
    args.batches = [int(v) for v in args.batches.split(",")]
    args.contexts = [int(v) for v in args.contexts.split(",")]
    import triton
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    global DEV, ROTATE_BYTES, DTYPE
    if args.dry:
        DEV, ROTATE_BYTES, DTYPE = "cpu", 1 << 16, torch.float16  # interpreter: no bf16 tl.dot
        args.models, args.tps, args.ms, args.batches, args.contexts = "tiny", "1,2", "1,5", [1, 2], [40]
        args.workers = 2
    parts = args.parts.split(",")
    models = args.models.split(",")
    dev = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu-interpreter"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    tag = f"{dev.replace(' ', '-')}_{date}"
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "date": date,
            "cuda": torch.version.cuda, "sms": num_sms()}
    meta.update(copy_bandwidth(args.reps))
    log(json.dumps(meta))
    # The targets are fractions of the HBM *read* bandwidth (decode kernels mostly read).
    ceiling = max(meta["sum_read_TBps"], meta["copy_TBps"])
    meta["ceiling_TBps"] = ceiling
    lin_rows, att_rows, rms_rows, sw_rows, best = [], [], [], [], {}
    t_start = time.time()
    if "linear" in parts:
        shapes = linear_shapes(models, [int(t) for t in args.tps.split(",")])
        ms = [int(m) for m in args.ms.split(",")]
        with mp.get_context("spawn").Pool(args.workers) as pool:
            lin_rows, best = bench_linear(args, shapes, ms, ceiling, pool)
        write_csv(os.path.join(args.out, f"kernels_linear_{tag}.csv"), lin_rows, meta)
        with open(os.path.join(args.out, f"kernels_linear_best_{tag}.json"), "w") as f:
            json.dump({"meta": meta, "linear": best}, f, indent=1, sort_keys=True)
    if "attention" in parts:
        att_rows = bench_attention(args, ceiling)
        write_csv(os.path.join(args.out, f"kernels_attention_{tag}.csv"), att_rows, meta)
    if "swiglu" in parts:
        sw_rows = bench_swiglu(args, models, [m for m in (int(m) for m in args.ms.split(",")) if m <= 64])
        write_csv(os.path.join(args.out, f"kernels_swiglu_{tag}.csv"), sw_rows, meta)
    if "rmsnorm" in parts:
        rms_rows = bench_rmsnorm(args)
        write_csv(os.path.join(args.out, f"kernels_rmsnorm_{tag}.csv"), rms_rows, meta)
    log(f"bench wall time {time.time() - t_start:.0f}s for parts {parts}")
    if lin_rows or att_rows:
        plot(os.path.join(args.out, f"kernels_{tag}.png"), lin_rows, att_rows, meta)
    # Summary against the targets (last lines: the device tool returns the tail of the output).
    log("\n==== summary ====")
    log(json.dumps(meta))
    if lin_rows:
        tgt = [r for r in lin_rows if r["tp"] == 2 and r["M"] <= 32]
        for col in ("best", "auto"):
            miss = [r for r in tgt if r[f"{col}_frac_of_read_bw"] < 0.8]
            log(f"linear {col}: {len(tgt) - len(miss)}/{len(tgt)} TP=2 M<=32 cases >= 80% of read BW; misses: "
                + ", ".join(f"{r['model']}-{r['layer']}-M{r['M']}:{r[f'{col}_frac_of_read_bw'] * 100:.0f}%"
                            for r in miss))
        slow = [r for r in lin_rows if r["best_vs_torch"] < 1 / 1.05]
        log(f"linear: best triton > 5% slower than cuBLAS on {len(slow)}/{len(lin_rows)} cases: "
            + ", ".join(f"{r['model']}-tp{r['tp']}-{r['layer']}-M{r['M']}:x{r['best_vs_torch']:.2f}" for r in slow))
        dslow = [r for r in lin_rows if r["default_vs_torch"] < 1 / 1.05]
        log(f"linear: default config > 5% slower than cuBLAS on {len(dslow)}/{len(lin_rows)} cases")
        aslow = [r for r in lin_rows if r["auto_vs_torch"] < 1 / 1.05]
        log(f"linear: auto (no config) > 5% slower than cuBLAS on {len(aslow)}/{len(lin_rows)} cases: "
            + ", ".join(f"{r['model']}-tp{r['tp']}-{r['layer']}-M{r['M']}:x{r['auto_vs_torch']:.2f}" for r in aslow))
    if att_rows:
        big = [r for r in att_rows if r["ctx"] >= 2048]
        log("attention ctx>=2048 best frac of copy BW: " + ", ".join(
            f"{r['model']}tp{r['tp']}-B{r['B']}-{r['ctx']}:{r['best_frac_of_read_bw'] * 100:.0f}%" for r in big))
    return 0


if __name__ == "__main__":
    sys.exit(main())
