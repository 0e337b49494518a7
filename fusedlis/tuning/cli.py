"""`fusedlis tune`: search kernel configs for a model's decode shapes and store them in the tuning cache.

Registered by fusedlis/cli.py through `add_parser`; also runnable as ``python -m fusedlis.tuning.cli``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ALL_OPS = ("linear", "attention", "allreduce", "fused")
# Kernel op names (Problem.op) timed by all ranks together; the others are split between ranks.
COLLECTIVE_OPS = ("allreduce", "linear_allreduce")
COLLECTIVE_TIMER = "events-median-max-over-ranks"

_EPILOG = """\
examples:
  fusedlis tune --model llama-3.1-8b --tp 2 --batch 1,8,32,64
  fusedlis tune --model llama-3.1-8b --tp 2 --ops linear --strategy halving --out tuned.json
  torchrun --nproc-per-node 2 -m fusedlis.tuning.cli --model llama-3.1-70b --tp 2   (ranks split the shapes)
  torchrun --nproc-per-node 2 -m fusedlis.tuning.cli --model llama-3.1-8b --tp 2 --ops allreduce,fused
  fusedlis tune --show

The cache is $FUSEDLIS_CACHE_DIR/tuning.json, else $XDG_CACHE_HOME/fusedlis/tuning.json, else
~/.cache/fusedlis/tuning.json. Kernels read it automatically; point them at another file with
FUSEDLIS_TUNING_FILE=PATH, or switch tuned configs off with FUSEDLIS_TUNING=0. See docs/tuning.md.
"""


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


def _name_list(allowed: tuple[str, ...]):
    def parse(s: str) -> list[str]:
        vals = [x.strip() for x in s.split(",") if x.strip()]
        bad = [v for v in vals if v not in allowed]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {','.join(allowed)}")
        return vals

    return parse


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `tune` subcommand to an argparse subparsers object; sets ``func=run``."""
    from fusedlis.tuning.shapes import LINEAR_LAYERS

    p = subparsers.add_parser(
        "tune", help="autotune kernel configs for a model and store them in the per-GPU cache",
        description="Search the Triton kernel configs (tiles, split-K, warps, stages, KV splits) for every "
                    "decode shape a model produces per TP rank, on the GPU present, and store the winners in "
                    "the persistent tuning cache that the kernels read automatically.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset name (e.g. llama-3.1-8b) or a Hugging Face config.json / model folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree the shapes are split for (default 1)")
    p.add_argument("--batch", type=_int_list, default=[1, 8, 32, 64], metavar="B1,B2,...",
                   help="decode batch sizes (default 1,8,32,64)")
    p.add_argument("--ops", type=_name_list(ALL_OPS), default=list(ALL_OPS), metavar="OP,...",
                   help=f"ops to tune, from {','.join(ALL_OPS)} (default all; missing ones are skipped)")
    p.add_argument("--layers", type=_name_list(LINEAR_LAYERS), default=list(LINEAR_LAYERS), metavar="L,...",
                   help=f"linear layers to tune (default {','.join(LINEAR_LAYERS)})")
    p.add_argument("--max-seq-len", type=_int_list, default=[4096], metavar="S1,...",
                   help="KV-cache lengths for attention (default 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="model dtype (default bfloat16)")
    p.add_argument("--strategy", default="exhaustive", choices=["exhaustive", "halving"],
                   help="exhaustive (every config, full effort) or successive halving (default exhaustive)")
    p.add_argument("--eta", type=int, default=3, help="halving: keep 1/eta per round (default 3)")
    p.add_argument("--rep-ms", type=float, default=25.0, help="do_bench time budget per config, ms (default 25; "
                   "only with --no-graphs)")
    p.add_argument("--no-graphs", action="store_true",
                   help="time linear/attention/allreduce eagerly (do_bench / CUDA events) instead of on CUDA graphs")
    p.add_argument("--confirm-rounds", type=int, default=3,
                   help="head-to-head of the best candidate and the default: alternate timings per config "
                        "(default 3); the candidate must win by more than 1%% and the spread seen")
    p.add_argument("--out", metavar="FILE", help="cache file to write (or to --show); default: the user cache")
    p.add_argument("--csv", metavar="FILE", help="also write the result table as CSV")
    p.add_argument("--plot", metavar="FILE", help="also write a PNG bar chart (needs matplotlib)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip re-timing each shape through the launcher's own cache lookup after writing")
    p.add_argument("--fake-timer", action="store_true",
                   help="synthetic cost model instead of GPU timings (CPU dry run; needs --out; not measurements)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--show", action="store_true", help="list the cache (or --out FILE) and exit")
    p.add_argument("--json", action="store_true", help="with --show: print the raw JSON")
    p.set_defaults(func=run)
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def show(args: argparse.Namespace) -> int:
    from fusedlis.tuning import cache, fingerprint
    from fusedlis.tuning.report import show_table

    path = Path(args.out) if args.out else cache.default_path()
    try:
        data = cache.read(path)
    except cache.CacheFormatError as e:
        _log(f"fusedlis tune: {path} is not a usable tuning cache: {e}")
        return 1
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True))
        return 0
    n = sum(1 for _ in cache.iter_entries(data))
    print(f"tuning cache: {path} ({n} entries{'' if path.exists() else ', file does not exist'})")
    me = fingerprint.current()
    print(f"this device:  {fingerprint.fingerprint_id(me)}")
    print(show_table(data, fingerprint.fingerprint_id(me)))
    return 0


def _dist_setup(fake: bool) -> tuple[int, int, bool]:
    """(rank, world, is_node_writer). Under torchrun, ranks split the shapes of compute ops."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, True
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available() and not fake:
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), local == 0


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def run(args: argparse.Namespace) -> int:
    """Entry point of `fusedlis tune`; returns the exit code (0 ok, 1 failures or nothing tuned, 2 usage)."""
    if args.show:
        return show(args)
    if not args.model:
        _log("fusedlis tune: --model is required (or use --show)")
        return 2
    if args.fake_timer and not args.out:
        _log("fusedlis tune: --fake-timer needs --out FILE (synthetic results must not enter the user cache)")
        return 2
    if args.tp < 1 or args.eta < 2 or args.rep_ms <= 0 or args.confirm_rounds < 1:
        _log("fusedlis tune: --tp must be >= 1, --eta >= 2, --rep-ms > 0 and --confirm-rounds >= 1")
        return 2

    import torch.distributed as dist

    owned = not dist.is_initialized()
    rank, world, writer = _dist_setup(args.fake_timer)
    try:
        return _run(args, rank, world, writer)
    finally:
        if world > 1 and owned and dist.is_initialized():
            # A process group left alive at exit can abort the process (gloo: "terminate called ...").
            dist.barrier()
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world: int, writer: bool) -> int:
    import torch

    from fusedlis.tuning import cache, fingerprint
    from fusedlis.tuning.bench import AllReduceBench, FakeBench, GpuBench, SkipOp
    from fusedlis.tuning.report import outcomes_table, plot, write_csv
    from fusedlis.tuning.shapes import OP_MODULES, kernel_module, load_config, model_problems
    from fusedlis.tuning.tuner import tune, verify

    quiet = rank != 0
    cfg = load_config(args.model)
    dtype = getattr(torch, args.dtype)
    if "fused" in args.ops and not quiet and kernel_module("fused") is None:
        _log(f"fusedlis tune: skipping fused: fusedlis.triton_kernels.{OP_MODULES['fused']} does not exist")
    for op in ("allreduce", "fused"):
        if op in args.ops and args.tp == 1 and not quiet:
            _log(f"fusedlis tune: skipping {op}: nothing to reduce at --tp 1")
    ops = [o for o in args.ops if o != "fused" or kernel_module("fused") is not None]
    problems = model_problems(cfg, args.tp, args.batch, ops,
                              dtype=dtype, seq_lens=args.max_seq_len, layers=args.layers, model_name=args.model)
    if not problems:
        _log("fusedlis tune: nothing to tune")
        return 1
    # Collective problems run on every rank in the same order, first; the others are split between ranks.
    comm = [p for p in problems if p.op in COLLECTIVE_OPS]
    mine = comm + [p for p in problems if p.op not in COLLECTIVE_OPS][rank::world]
    if not torch.cuda.is_available():
        timer = "cpu-wallclock"
    else:
        timer = "do_bench-median" if args.no_graphs else "cuda-graph-median"
    timer = "fake" if args.fake_timer else timer
    graphs = not args.no_graphs

    def make_bench(p):
        if p.op == "allreduce":
            if args.fake_timer:
                raise SkipOp(f"op {p.op!r}: no synthetic model; it is timed on real ranks only")
            return AllReduceBench(p, graphs=graphs)
        if p.op == "linear_allreduce" and not args.fake_timer:
            from fusedlis.tuning.fused import FusedBench

            return FusedBench(p)
        return FakeBench(p) if args.fake_timer else GpuBench(p, rep_ms=args.rep_ms, graphs=graphs)

    # Real timings: the winner must beat the default by more than 1% and the spread of an alternating,
    # 4x longer head-to-head; otherwise the default is stored.
    outcomes = tune(mine, make_bench, strategy=args.strategy, eta=args.eta,
                    confirm_effort=1 if args.fake_timer else 4,
                    confirm_rounds=1 if args.fake_timer else args.confirm_rounds,
                    min_gain=0.0 if args.fake_timer else 0.01,
                    progress=not (args.no_progress or quiet), log=_log if not quiet else (lambda s: None))
    tuned = [o for o in outcomes if o.status == "tuned"]
    entries = [(o.problem.op, o.entry(COLLECTIVE_TIMER if o.problem.op in COLLECTIVE_OPS else timer)) for o in tuned]
    # Collective outcomes are the same on every rank: keep rank 0's.
    all_entries = [e for r, part in enumerate(_gather(entries, world)) for op, e in part
                   if r == 0 or op not in COLLECTIVE_OPS]
    path = Path(args.out) if args.out else cache.default_path()
    if writer and all_entries:
        cache.merge_entries(all_entries, path=path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not args.no_verify and entries:
        os.environ["FUSEDLIS_TUNING_FILE"] = str(path)  # lookup in this process reads what was just written
        verify(outcomes, make_bench, progress=not (args.no_progress or quiet))
    rows = [row for r, part in enumerate(_gather([o.row() for o in outcomes], world)) for row in part
            if r == 0 or row["op"] not in COLLECTIVE_OPS]
    if world > 1:
        order = {pr.label: i for i, pr in enumerate(problems)}
        rows.sort(key=lambda r: order[r["label"]])
    if rank != 0:
        return 0
    gpu = fingerprint.current().get("gpu")
    print(f"\n{args.model} tp={args.tp} {args.dtype} on {gpu} ({timer}{', ' + str(world) + ' ranks' if world > 1 else ''})")
    print(outcomes_table(rows))
    n_tuned = sum(r["status"] == "tuned" for r in rows)
    n_failed = sum(r["status"] == "failed" for r in rows)
    print(f"\n{n_tuned} shapes tuned, {n_failed} failed, {len(rows) - n_tuned - n_failed} skipped; "
          f"{len(all_entries)} entries written to {path}" if all_entries else "\nnothing written")
    misses = [r["label"] for r in rows if r.get("lookup_hit") is False]
    if misses:
        _log(f"fusedlis tune: WARNING: the launcher's lookup did not return the tuned config for {misses}")
    for r in rows:
        r["timer"] = r.get("bench_timer") or timer
    if args.csv:
        print(f"CSV: {write_csv(rows, args.csv, device=gpu)}")
    if args.plot:
        title = f"{args.model} tp={args.tp} {args.dtype}, {gpu}" + (" [FAKE timer: not measurements]"
                                                                     if args.fake_timer else "")
        p = plot(rows, args.plot, title)
        if p:
            print(f"plot: {p}")
    return 1 if n_failed or not n_tuned or misses else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fusedlis.tuning.cli [tune options]`` (the same options as `fusedlis tune`)."""
    parser = argparse.ArgumentParser(prog="fusedlis")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
