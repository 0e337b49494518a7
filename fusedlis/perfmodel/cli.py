"""`fusedlis predict` and `fusedlis calibrate` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# 3M and 6M put >= 3 sizes above NCCL's LL -> Simple switch (about 1.5 MB on 2xH200), so that regime can be fitted
DEFAULT_SIZES = "8K,16K,32K,64K,128K,256K,512K,1M,2M,3M,4M,6M"


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{what} must list integers >= 1, got {text!r}")
    return vals


def parse_size(text: str) -> int:
    """'8K' -> 8192, '4M' -> 4194304, '123' -> 123."""
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        v = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use bytes or a K/M/G suffix (e.g. 8K, 4M)") from None
    if v < 1:
        raise ValueError(f"size must be >= 1 byte, got {text!r}")
    return v


# ---------------------------------------------------------------- predict
def add_predict_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `predict`: analytical latency / volume per layout; returns the parser."""
    p = subparsers.add_parser(
        "predict", help="predict decode/prefill latency and communication per parallel layout",
        description="Analytical model of TP / PP / hybrid serving: per-token decode latency, time to first "
                    "token, communication volume and share, for a model on a cluster profile. Recommends a "
                    "layout. Prediction, not measurement: calibrate the profile (`fusedlis calibrate`) first.")
    p.add_argument("--model", required=True,
                   help="LlamaConfig preset (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b, tiny) or config.json")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: the hardware profile's)")
    p.add_argument("--hardware", default="h100-ndr",
                   help="built-in profile (h100-ndr, h200-ndr, a100-slingshot, gh200-ndr) or a .json/.yaml file")
    p.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes (default 1,16,64)")
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens per sequence (default 128)")
    p.add_argument("--layouts", default="tp,pp,hybrid",
                   help="comma-separated: tp, pp, hybrid (TP in a node, PP across), or tpXppY (default tp,pp,hybrid)")
    p.add_argument("--allreduce", default="nccl,nvrar",
                   help="comma-separated TP all-reduce models: nccl, nvrar, auto (fusedlis' choice), ring, tree, "
                        "rd, rabenseifner, oneshot, twoshot, and the LL (flag-in-data) kernels oneshot_ll, "
                        "twoshot_ll, nvrar_ll (also as fusedlis.comm names one_shot_ll, ...) (default nccl,nvrar)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per weight/activation element (default 2)")
    p.add_argument("--fuse-norm", action="store_true",
                   help="decode: each row-parallel all-reduce runs fused with the residual add + RMSNorm after it "
                        "(fusedlis AllReduce.all_reduce_norm): 2 RMSNorm kernels fewer per layer")
    p.add_argument("--fused-linear", action="store_true",
                   help="decode: o_proj and down_proj run as the fused GEMM + all-reduce + residual + RMSNorm kernel "
                        "(Engine(allreduce='fused')), costed at the time `fusedlis calibrate` measured for it where "
                        "the profile has that table for the layer's shapes and TP (else as GEMM then the all-reduce)")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every prediction as JSON")
    p.set_defaults(func=run_predict)
    return p


def _row(pr: Any) -> dict[str, Any]:
    d = pr.decode
    return {"layout": pr.layout.name, "tp": pr.layout.tp, "pp": pr.layout.pp,
            "allreduce": pr.allreduce if pr.layout.tp > 1 else "-", "batch": pr.batch,
            "token_ms": pr.token_latency * 1e3, "ttft_ms": pr.ttft * 1e3, "tok_per_s": pr.throughput,
            "comm_KB_per_token": d.volume.total / pr.batch / 1e3,
            "net_KB_per_token": d.net_bytes / pr.batch / 1e3, "comm_share": d.comm_share,
            "comm_inter_share": d.comm_inter / d.total if d.total else 0.0,
            "decode_compute_ms": d.compute * 1e3, "decode_overhead_ms": d.overhead * 1e3,
            "decode_comm_ms": d.comm * 1e3, "prefill_comm_share": pr.prefill.comm_share,
            "mem_GB_per_gpu": pr.memory_bytes / 1e9, "fits": pr.fits}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of `_row` dicts."""
    cols = [("layout", "layout", "{}"), ("allreduce", "allreduce", "{}"), ("batch", "batch", "{}"),
            ("token_ms", "ms/token", "{:.2f}"), ("ttft_ms", "TTFT ms", "{:.1f}"), ("tok_per_s", "tok/s", "{:.0f}"),
            ("comm_KB_per_token", "comm KB/tok", "{:.1f}"), ("net_KB_per_token", "net KB/tok", "{:.1f}"),
            ("comm_share", "comm %", "{:.0%}"),
            ("comm_inter_share", "inter %", "{:.0%}"), ("mem_GB_per_gpu", "GB/GPU", "{:.1f}"),
            ("fits", "fits", "{}")]
    cells = [[h for _, h, _ in cols]] + [[f.format(r[k]) for k, _, f in cols] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].rjust(w[i]) for i in range(len(cols))) for c in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def plot_predictions(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Per-token latency and communication share vs batch, one line per layout x all-reduce."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or 'fusedlis[plot]')") from None
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    keys = sorted({(r["layout"], r["allreduce"]) for r in rows})
    for lay, ar in keys:
        rs = sorted((r for r in rows if (r["layout"], r["allreduce"]) == (lay, ar)), key=lambda r: r["batch"])
        lab = lay if ar == "-" else f"{lay} / {ar}"
        xs = [r["batch"] for r in rs]
        a1.plot(xs, [r["token_ms"] for r in rs], marker="o", label=lab)
        a2.plot(xs, [r["ttft_ms"] for r in rs], marker="o", label=lab)
        a3.plot(xs, [100 * r["comm_share"] for r in rs], marker="o", label=lab)
    for a, yl in ((a1, "decode ms / token"), (a2, "time to first token (ms)"), (a3, "communication % of decode step")):
        a.set_xscale("log", base=2)
        a.set_xlabel("batch")
        a.set_ylabel(yl)
        a.grid(True, alpha=0.3)
    a1.set_yscale("log")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_predict(args: argparse.Namespace) -> int:
    """Entry point of `fusedlis predict`; returns the exit code."""
    from fusedlis.perfmodel.collectives import resolve
    from fusedlis.perfmodel.hardware import get_hardware
    from fusedlis.perfmodel.step import predict, recommend
    from fusedlis.perfmodel.volume import model_shape, parse_layout

    hw = get_hardware(args.hardware)
    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    gpn = args.gpus_per_node or hw.gpus_per_node
    if gpn < 1:
        raise ValueError(f"--gpus-per-node must be >= 1, got {gpn}")
    gpn = min(gpn, args.gpus)
    if args.gpus % gpn:
        raise ValueError(f"--gpus {args.gpus} is not a multiple of --gpus-per-node {gpn}")
    hw = hw.with_(gpus_per_node=gpn)
    if args.dtype_bytes not in (1, 2, 4):
        raise ValueError(f"--dtype-bytes must be 1, 2 or 4, got {args.dtype_bytes}")
    shape = model_shape(args.model)
    batches = _int_list(args.batch, "--batch")
    algos = [resolve(a) for a in args.allreduce.split(",") if a.strip()]
    if not algos:
        raise ValueError("--allreduce is empty")
    layouts, skipped = [], []
    for name in dict.fromkeys(x.strip() for x in args.layouts.split(",") if x.strip()):
        lay = parse_layout(name, args.gpus, gpn)
        try:
            lay.check(shape, gpn)
        except ValueError as e:
            skipped.append(str(e))
            continue
        if lay not in layouts:
            layouts.append(lay)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    if not layouts:
        raise ValueError("no requested layout can run this model on these GPUs")
    preds = predict(shape, hw, layouts, algos, batches, args.prompt, args.gen, args.dtype_bytes,
                    fuse_norm=getattr(args, "fuse_norm", False), fused_linear=getattr(args, "fused_linear", False))
    rows = [_row(p) for p in preds]
    nodes = args.gpus // gpn
    print(f"{shape.name} ({shape.num_params() / 1e9:.1f}B params) on {args.gpus} x {hw.gpu} "
          f"({nodes} node{'s' if nodes > 1 else ''} of {gpn}), profile {hw.name}; prompt {args.prompt}, "
          f"gen {args.gen}, decode at mean context {args.prompt + args.gen / 2:g}")
    print(format_table(rows))
    print("comm KB/tok: payload of all collectives per generated token; net KB/tok: bytes crossing node "
          "boundaries per generated token (all GPUs); inter %: share of the decode step on the network")
    print("\nRecommendation:")
    for line in recommend(preds):
        print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw.to_json(), "model": shape.name, "gpus": args.gpus,
                                               "prompt": args.prompt, "gen": args.gen, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot_predictions(rows, args.plot, f"{shape.name} on {args.gpus} GPUs ({hw.name})")
        print(f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------- calibrate
def add_calibrate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `calibrate`: measure this machine's GPUs and write a profile; returns the parser."""
    p = subparsers.add_parser(
        "calibrate", help="measure NVLink all-reduce alpha/beta, HBM bandwidth and GEMM rate; write a profile",
        description="Measure the GPUs of this machine (needs CUDA; NVLink terms need >= 2 GPUs; starts one "
                    "process per GPU itself, or runs under torchrun --nproc-per-node N): all-reduce "
                    "latency over NCCL and, if available, fusedlis' own all-reduce (one-shot, two-shot, their LL "
                    "variants, NVRAR LL on logical nodes of one GPU, all-reduce + RMSNorm), a large bf16 add "
                    "(reduction rate), decode-shaped GEMM times, a large GEMM's rate and the fused GEMM + all-reduce "
                    "+ residual + RMSNorm kernel (linear_allreduce, the engine's fused mode) on the Llama 8B/70B "
                    "row-parallel shapes at M = 1, 8, 32, 64. Fits the alpha/beta/overhead "
                    "terms and writes a JSON profile for `fusedlis predict --hardware FILE`. Inter-node terms "
                    "cannot be measured on one node: they are copied from --base.")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--base", default="h200-ndr", help="profile supplying unmeasured fields (default h200-ndr)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"all-reduce sizes in bytes (default {DEFAULT_SIZES})")
    p.add_argument("--iters", type=int, default=100,
                   help="calls captured per CUDA graph (default 100, as bench/allreduce.py --calls)")
    p.add_argument("--replays", type=int, default=30,
                   help="timed graph replays, median taken (default 30, as bench/allreduce.py --replays)")
    p.add_argument("--raw", default=None, metavar="CSV", help="also write every raw measurement to this CSV")
    p.set_defaults(func=run_calibrate)
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    """Entry point of `fusedlis calibrate`; returns the exit code."""
    from fusedlis.perfmodel.calibrate import calibrate

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise ValueError("--sizes is empty")
    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    replays = getattr(args, "replays", 30)
    if replays < 1:
        raise ValueError(f"--replays must be >= 1, got {replays}")
    result = calibrate(base=args.base, sizes=sizes, iters=args.iters, gpus=args.gpus, replays=replays)
    if result is None:  # a non-zero torchrun rank: rank 0 writes the files
        return 0
    hw, raw = result
    from fusedlis.perfmodel.hardware import save_profile

    save_profile(hw, args.out)
    print(json.dumps(hw.to_json(), indent=2))
    print(f"wrote {args.out}")
    if args.raw:
        from fusedlis.perfmodel.calibrate import write_raw_csv

        write_raw_csv(raw, args.raw)
        print(f"wrote {args.raw}")
    return 0
