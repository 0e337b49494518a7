"""`fusedlis bench`: per-token decode latency of the engine on this machine, per all-reduce mode, batch and context."""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch

from fusedlis.cli_generate import _DTYPES


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="time decode steps per all-reduce mode, batch and context",
                       description="Per-token decode latency (median of CUDA-graph replays timed by CUDA events; wall "
                                   "clock on CPU) of a checkpoint or preset, for each --allreduce mode, batch and "
                                   "context. With --random-weights no download is needed. Under torchrun/srun every "
                                   "rank runs it (tensor parallel over WORLD_SIZE) and rank 0 prints. "
                                   "bench/decode.py is the full side-by-side benchmark (floors, HF, plots).")
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset name (default: tiny)")
    p.add_argument("--allreduce", default="auto",
                   help="comma-separated modes: auto, nccl, nvrar, fused, one_shot, two_shot (default: auto)")
    p.add_argument("--batch", type=_ints, default=[1], help="comma-separated batch sizes (default: 1)")
    p.add_argument("--context", type=_ints, default=[512], help="comma-separated cached lengths (default: 512)")
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per point (default: 50)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--kernels", choices=["torch", "triton"], default=None)
    p.add_argument("--random-weights", action="store_true", help="preset shapes with seeded random weights")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file (rank 0)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fusedlis import Engine
    from fusedlis.engine import _dist_env

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    warmup = 3
    rows = []
    rank0 = _dist_env()[0] == 0
    for mode in [m.strip() for m in args.allreduce.split(",") if m.strip()]:
        eng = Engine.from_pretrained(args.model, device=args.device, dtype=_DTYPES.get(args.dtype),
                                     kernels=args.kernels, random_weights=args.random_weights, allreduce=mode,
                                     max_batch_size=max(args.batch),
                                     max_seq_len=max(args.context) + warmup + args.steps + 1, progress=rank0)
        m = eng.model
        for b in args.batch:
            for ctx in args.context:
                ms = eng.time_decode(b, ctx, args.steps, warmup=warmup)
                med = statistics.median(ms)
                rows.append(dict(model=m.config.name, tp=m.tp.size, allreduce=mode, batch=b, context=ctx,
                                 steps=args.steps, ms_per_token=round(med, 4), ms_min=round(min(ms), 4),
                                 tokens_per_s=round(b * 1e3 / med, 1)))
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not rank0:
        return 0
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0
