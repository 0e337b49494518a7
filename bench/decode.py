"""End-to-end decode latency: fusedlis (nccl / nvrar / fused all-reduce) vs the torch reference path
(and Hugging Face transformers at TP=1), random weights at Llama-3.1 shapes.

Run (TP=2 on one host):
    torchrun --nproc-per-node 2 bench/decode.py --models llama-3.1-8b,llama-3.1-70b --out bench/results
TP=1:
    torchrun --nproc-per-node 1 bench/decode.py --models llama-3.1-8b --hf

Per configuration: median per-token latency of one decode step (a CUDA-graph replay for fusedlis) over
--steps steps, the KV cache filled with random values up to the context length, and next to it the floor:
weight bytes per GPU / HBM bandwidth measured in the same run. Writes CSV + PNG named with device and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fusedlis  # noqa: E402
from fusedlis.model import LlamaConfig  # noqa: E402


def hbm_bandwidth(device) -> float:
    """Device-to-device copy bandwidth (bytes/s, read + write) over 4 GiB."""
    a = torch.empty(1 << 30, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 4 * (1 << 30) / statistics.median(ts)


def weight_bytes_per_gpu(cfg: LlamaConfig, tp: int) -> int:
    """bf16 weight bytes one GPU reads per decode step (the embedding table is only gathered, not read)."""
    read = cfg.num_parameters() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return read * 2 // tp


def time_engine(eng, batch: int, context: int, steps: int) -> float:
    """Median ms of one decode step for `batch` sequences at `context` tokens."""
    dev = eng.device
    tokens = torch.randint(0, eng.config.vocab_size, (batch,), device=dev)
    lens = torch.full((batch,), context, dtype=torch.long, device=dev)
    for _ in range(3):
        eng._decode(tokens, lens)
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        eng._decode(tokens, lens + i)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


CATEGORIES = (
    # the fused linear_allreduce kernel counts as all-reduce although it also does its GEMM
    ("all-reduce", ("allreduce", "all_reduce", "nccl", "push_kernel", "finish_kernel", "one_shot", "two_shot", "hier",
                    "nvrar", "symm")),
    ("attention", ("attention", "flash", "sdpa", "softmax", "rope")),
    ("GEMM", ("linear", "gemm", "matmul", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
)


def categorize(name: str) -> str:
    n = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def breakdown(eng, batch: int, context: int, steps: int = 20) -> dict[str, float]:
    """Per-token device time (ms) by kernel category, from the torch profiler over `steps` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    dev = eng.device
    tokens = torch.randint(0, eng.config.vocab_size, (batch,), device=dev)
    lens = torch.full((batch,), context, dtype=torch.long, device=dev)
    eng._decode(tokens, lens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            eng._decode(tokens, lens + i)
        torch.cuda.synchronize()
    out = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.key and not ev.key.startswith("ProfilerStep"):
            out[categorize(ev.key)] += t / 1e3 / steps
    return out


def time_hf(cfg: LlamaConfig, batches, contexts, steps) -> dict:
    """Hugging Face transformers eager decode (bf16, DynamicCache prefilled with random values), TP=1."""
    from transformers import DynamicCache
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFModel

    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "_name_or_path")})
    with torch.device("cuda"):
        model = HFModel(hf_cfg).to(torch.bfloat16).eval()
    out = {}
    kvh, hd = cfg.num_key_value_heads, cfg.head_dim
    for B in batches:
        for ctx in contexts:
            cache = DynamicCache()
            for layer in range(cfg.num_hidden_layers):
                k = torch.randn(B, kvh, ctx, hd, dtype=torch.bfloat16, device="cuda")
                cache.update(k, torch.randn_like(k), layer)
            ids = torch.randint(0, cfg.vocab_size, (B, 1), device="cuda")
            times = []
            with torch.no_grad():
                for i in range(steps):
                    pos = torch.full((B, 1), ctx + i, device="cuda")
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e))
            out[(B, ctx)] = statistics.median(times[3:])
            del cache
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.1-8b")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--context", default="512,4096")
    ap.add_argument("--modes", default="torch,nccl,nvrar,fused",
                    help="torch = eager torch reference + NCCL; nccl/nvrar/fused = fusedlis engine all-reduce")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face transformers (TP=1 only)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile each configuration at batch 1 and the first context (stacked-bar PNG)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    rank = dist.get_rank() if dist.is_initialized() else 0
    tp = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device("cuda", torch.cuda.current_device())
    bw = hbm_bandwidth(dev)
    rows, bdrows = [], []
    for model_name in args.models.split(","):
        cfg = LlamaConfig.preset(model_name)
        floor_ms = weight_bytes_per_gpu(cfg, tp) / bw * 1e3
        for mode in args.modes.split(","):
            if tp == 1 and mode in ("nvrar", "fused"):
                continue
            for gpn in (["2", "1"] if mode == "nvrar" and tp == 2 else [None]):
                if gpn:
                    os.environ["FUSEDLIS_GPUS_PER_NODE"] = gpn
                else:
                    os.environ.pop("FUSEDLIS_GPUS_PER_NODE", None)
                label = mode if gpn is None else f"{mode}-{tp // int(gpn)}node"
                kw = dict(kernels="torch", cuda_graphs=False, allreduce="nccl") if mode == "torch" else dict(
                    allreduce=mode)
                eng = fusedlis.Engine.from_pretrained(
                    model_name, device=dev, random_weights=True, max_batch_size=max(batches),
                    max_seq_len=max(contexts) + args.steps + 8, progress=rank == 0, **kw)
                for k, v in zip(eng.cache.k, eng.cache.v):
                    k.normal_()
                    v.normal_()
                if args.breakdown:
                    bd = breakdown(eng, batches[0], contexts[0])
                    name = f"fusedlis-{label}" if mode != "torch" else "torch-eager-nccl"
                    bdrows.append(dict(model=model_name, tp=tp, system=name, batch=batches[0], context=contexts[0],
                                       **{k: round(v, 4) for k, v in bd.items()}))
                    if rank == 0:
                        print(bdrows[-1], flush=True)
                for B in batches:
                    for ctx in contexts:
                        ms = time_engine(eng, B, ctx, args.steps if mode != "torch" else max(10, args.steps // 5))
                        rows.append(dict(model=model_name, tp=tp, system=f"fusedlis-{label}" if mode != "torch"
                                         else "torch-eager-nccl", batch=B, context=ctx, ms_per_token=round(ms, 4),
                                         floor_ms=round(floor_ms, 4), ratio_to_floor=round(ms / floor_ms, 3)))
                        if rank == 0:
                            print(rows[-1], flush=True)
                del eng
                torch.cuda.empty_cache()
                if dist.is_initialized():
                    dist.barrier()
        if args.hf and tp == 1:
            try:
                hf = time_hf(cfg, batches, contexts, args.steps // 2)
            except Exception as e:  # the baseline failing must not lose the fusedlis numbers
                print(f"transformers baseline failed: {e!r}", flush=True)
                hf = {}
            for (B, ctx), ms in hf.items():
                rows.append(dict(model=model_name, tp=tp, system="hf-transformers-eager", batch=B, context=ctx,
                                 ms_per_token=round(ms, 4), floor_ms=round(floor_ms, 4),
                                 ratio_to_floor=round(ms / floor_ms, 3)))
                if rank == 0:
                    print(rows[-1], flush=True)
    if rank == 0:
        write(rows, args.out, tp, bw)
        if bdrows:
            write_breakdown(bdrows, args.out, tp)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _save_csv(stem: str, rows: list[dict], meta: str | None = None) -> None:
    with open(stem + ".csv", "w", newline="") as f:
        if meta:
            f.write(meta + "\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (CSV only then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write(rows, out_dir, tp, bw) -> None:
    import triton

    os.makedirs(out_dir, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    date = dt.date.today().isoformat()
    stem = os.path.join(out_dir, f"decode_tp{tp}_{gpu}_{date}")
    meta = (f"# device={torch.cuda.get_device_name()} x{tp} torch={torch.__version__} triton={triton.__version__} "
            f"python={platform.python_version()} date={date} hbm_copy_bw_TBps={bw / 1e12:.2f}")
    _save_csv(stem, rows, meta)
    plt = _pyplot()
    if plt is None:
        return
    keys = sorted({(r["model"], r["context"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (m, c) in zip(axes[0], keys):
        for s in sorted({r["system"] for r in rows}):
            pts = [(r["batch"], r["ms_per_token"]) for r in rows if (r["model"], r["context"], r["system"]) == (m, c, s)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        fl = [r["floor_ms"] for r in rows if r["model"] == m][0]
        ax.axhline(fl, color="k", ls="--", lw=1, label="HBM floor")
        ax.set(title=f"{m} TP={tp} ctx={c}", xlabel="batch", ylabel="ms / decode step", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(meta.lstrip("# "), fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


def write_breakdown(rows, out_dir, tp) -> None:
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    stem = os.path.join(out_dir, f"decode_breakdown_tp{tp}_{gpu}_{dt.date.today().isoformat()}")
    _save_csv(stem, rows)
    plt = _pyplot()
    if plt is None:
        return
    cats = [c for c, _ in CATEGORIES] + ["other"]
    labels = [f"{r['model'].replace('llama-3.1-', '')}\n{r['system'].replace('fusedlis-', 'fl-')}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for c in cats:
        vals = [r[c] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set(ylabel="device ms per decode step", title=f"per-token time breakdown, TP={tp}, batch {rows[0]['batch']}, "
           f"context {rows[0]['context']} ({torch.cuda.get_device_name()})")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
