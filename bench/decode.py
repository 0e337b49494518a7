"""End-to-end decode latency at Llama-3.1 shapes with random weights: fusedlis (nccl / nvrar / fused all-reduce),
the torch reference path (eager + NCCL) and Hugging Face transformers (its tensor-parallel plan at TP > 1,
static cache, torch.compile), side by side.

Run (one host; each command writes its own CSV + PNG, --summarize merges them):
    torchrun --nproc-per-node 1 bench/decode.py --models llama-3.1-8b --modes torch,nccl
    torchrun --nproc-per-node 2 bench/decode.py --models llama-3.1-8b --breakdown
    torchrun --nproc-per-node 2 bench/decode.py --models llama-3.1-8b --modes none --hf
    torchrun --nproc-per-node 2 bench/decode.py --models llama-3.1-70b --steps 30 --modes nccl,nvrar,fused
    python3 bench/decode.py --summarize bench/results/decode_tp*.csv --out bench/results

Per configuration: median per-token latency of one decode step (a CUDA-graph replay for fusedlis, one compiled
or eager forward for transformers) over --steps steps with the KV cache filled with random values up to the
context length; next to it the floor: weight bytes per GPU / HBM read bandwidth measured in the same process
(bf16 read-and-sum probe). Transformers' weights come from a sparse all-zero safetensors checkpoint (written in
no time, read as zeros) and are then filled with random values on the GPUs.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import glob
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fusedlis  # noqa: E402
from fusedlis.engine import timed_ms  # noqa: E402
from fusedlis.model import LlamaConfig  # noqa: E402
from fusedlis.model.build import hf_tensor_names  # noqa: E402

FIELDS = ("model", "tp", "system", "batch", "context", "steps", "ms_per_token", "floor_ms", "ratio_to_floor",
          "fuse_norm")
WARMUP = 3


# ---- floor ------------------------------------------------------------------------------------------------
def hbm_read_bandwidth(device: torch.device, nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Memory read bandwidth (bytes/s): the best median time over `nbytes` of bf16 of an fp32-accumulated
    torch sum and, on GPUs, of a few configs of bench/launch_floor.py's flat Triton read kernel.

    A read probe, not a copy: decode streams weights in and writes almost nothing, and a copy's read + write
    traffic (or a copy-engine memcpy inside a graph) measures something else.
    """
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    probes = {"torch.sum": lambda: a.sum(dtype=torch.float32)}
    if device.type == "cuda":
        # torch's reduction read 4.13 TB/s on an H200 where this flat Triton read of the step's weights reached
        # 4.70 (bench/launch_floor.py, 2026-11-22): the floor is the best read measured, not one probe's
        try:
            import launch_floor as lf

            out = torch.empty(lf.read_programs(a.numel(), lf.ReadConfig(2048, 1, 4)), dtype=torch.float32,
                              device=device)
            for cfg in (lf.ReadConfig(4096, 8, 4), lf.ReadConfig(4096, 1, 8), lf.ReadConfig(2048, 8, 8)):
                probes[f"triton read {cfg}"] = lambda cfg=cfg: lf.read(a, out, cfg)
        except Exception as e:  # noqa: BLE001 - the torch probe still gives a floor
            print(f"Triton read probe unavailable ({type(e).__name__}: {e}); floor from torch.sum", file=sys.stderr)
    best = float("inf")
    for fn in probes.values():
        for _ in range(3):
            fn()
        best = min(best, statistics.median(timed_ms(fn, device) for _ in range(reps)))
    del a
    free_memory()
    return nbytes / (best / 1e3)


def weight_bytes_per_gpu(cfg: LlamaConfig, tp: int) -> int:
    """bf16 weight bytes one GPU reads per decode step (the embedding table is only gathered, not read)."""
    read = cfg.num_parameters() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return read * 2 // tp


def kv_bytes_per_gpu(cfg: LlamaConfig, tp: int, batch: int, seq: int) -> int:
    """bf16 bytes of a static K + V cache for `batch` rows of `seq` tokens on one GPU."""
    return 2 * cfg.num_hidden_layers * batch * (cfg.num_key_value_heads // tp) * seq * cfg.head_dim * 2


def make_row(model: str, tp: int, system: str, batch: int, context: int, steps: int, ms: float,
             floor_ms: float, fuse_norm: int = 0, fuse_rope: int = 0) -> dict:
    """One CSV row. fuse_norm: 1 if each all-reduce of a decode step ran fused with the residual add + RMSNorm;
    fuse_rope: 1 if the decode step ran RoPE + the KV-cache write inside decode attention."""
    return dict(model=model, tp=tp, system=system, batch=batch, context=context, steps=steps,
                ms_per_token=round(ms, 4), floor_ms=round(floor_ms, 4), ratio_to_floor=round(ms / floor_ms, 3),
                fuse_norm=fuse_norm, fuse_rope=fuse_rope)


def engine_fuses_norm(eng, batch: int) -> int:
    """1 if `eng`'s decode step at `batch` runs each all-reduce fused with the residual add + RMSNorm."""
    comm = eng.model.tp.comm
    ar = getattr(comm, "ar", None)
    if eng.model.tp.size == 1 or ar is None or not hasattr(ar, "fuses_norm"):
        return 0
    if eng.model.tp.row_linear is not None and batch <= eng.max_batch_size:
        return 0  # the fused GEMM + all-reduce kernels handle the norm themselves
    x = torch.empty(batch, eng.config.hidden_size, dtype=eng.model.dtype, device=eng.device)
    return int(ar.fuses_norm(x))


# ---- fusedlis ---------------------------------------------------------------------------------------------
def time_engine(eng, batch: int, context: int, steps: int) -> float:
    """Median ms of one decode step for `batch` sequences at `context` tokens (`Engine.time_decode`)."""
    return statistics.median(eng.time_decode(batch, context, steps, warmup=WARMUP))


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


def breakdown(eng, batch: int, context: int, steps: int = 20, top: list | None = None) -> dict[str, float]:
    """Per-token device time (ms) by kernel category, from the torch profiler over `steps` decode steps.

    `top`, if given, receives (kernel name, us per step, calls per step) for every kernel, largest first."""
    from torch.profiler import ProfilerActivity, profile, schedule

    dev = eng.device
    tokens = torch.randint(0, eng.config.vocab_size, (batch,), device=dev)
    lens = torch.full((batch,), context, dtype=torch.long, device=dev)
    eng._decode(tokens, lens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # The first collective of the first profiled steps waits for the other rank's profiler start-up (up to
    # ~0.5 s in the 06:12 run, all booked on the embedding all-reduce): the ranks meet at a barrier once their
    # profilers run, and two warm-up steps under the profiler's schedule come before the `steps` that count.
    # The schedule's cycle ends at the last step and the profiler then drops its events, so they are read in
    # on_trace_ready (reading prof.key_averages() afterwards gave all zeros: 2xH200 07:47).
    got: dict = {}

    def ready(p) -> None:
        got["avg"] = p.key_averages()

    acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=acts, schedule=schedule(wait=0, warmup=2, active=steps, repeat=1),
                 on_trace_ready=ready) as prof:
        if dist.is_initialized():
            dist.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for i in range(steps + 2):
            eng._decode(tokens, lens + i)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.step()
    avgs = got.get("avg")
    if avgs is None:
        raise RuntimeError("profiler delivered no trace: the breakdown would be all zeros")
    out = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    for ev in avgs:
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if not torch.cuda.is_available():
            t = getattr(ev, "cpu_time_total", 0)
        if t and ev.key and not ev.key.startswith("ProfilerStep"):
            out[categorize(ev.key)] += t / 1e3 / steps
            if top is not None:
                top.append((ev.key, t / steps, ev.count / steps))
    if top is not None:
        top.sort(key=lambda r: -r[1])
    return out


def free_memory() -> None:
    """Drop unreachable engines/models (graphs and closures form cycles) and return their memory to the GPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# Mode suffixes that build the same engine with an experiment switched on (environment set while it is built and
# its CUDA graphs captured): suffix -> (variable, value on (overridable through <variable>_AB), value off).
# "-norope": RoPE as its own kernel instead of inside decode attention (the default since 2026-11-22 10:15);
# "-rope": rope inside attention (the default now; the suffix of files measured before that);
# "-lpdl": programmatic dependent launch for every `linear`; "-fpdl": the same for the fused GEMM + all-reduce
# kernel; "-ared": decode attention merges its splits in the main kernel (one launch instead of two); "-avec": the
# same, merging all the group's heads as one tile; "-a1": decode attention in one split per (sequence, kv head),
# written directly (one launch, fewer programs; a different value through FUSEDLIS_ATTN_MAX_SPLITS_AB).
EXPERIMENTS = {"-rope": ("FUSEDLIS_FUSE_ROPE", "1", "1"), "-norope": ("FUSEDLIS_FUSE_ROPE", "0", "1"),
               "-lpdl": ("FUSEDLIS_LINEAR_PDL", "0.5,evict", ""), "-fpdl": ("FUSEDLIS_FUSED_PDL", "1,pf=4", "0"),
               "-ared": ("FUSEDLIS_ATTN_ONE_LAUNCH", "1", "0"), "-avec": ("FUSEDLIS_ATTN_ONE_LAUNCH", "vec", "0"),
               "-a1": ("FUSEDLIS_ATTN_MAX_SPLITS", "1", ""),
               # one GPU per logical node (the inter-node path over NVLink); None: leave the mode's own split alone
               "-ln": ("FUSEDLIS_GPUS_PER_NODE", "1", None),
               # the fused kernel's inter-node rounds as NVSHMEM puts with signal (the transport between hosts)
               "-put": ("FUSEDLIS_FUSED_TRANSPORT", "put", "auto"),
               # M = 1 GEMMs through the tiled kernel / lookup instead of the flat-row GEMV
               "-norows": ("FUSEDLIS_LINEAR_ROWS", "0", "1")}


def split_variant(mode: str) -> tuple[str, str]:
    """("fused", "-rope-lpdl") for "fused-rope-lpdl": the engine mode and its experiment suffixes, in order."""
    suffix = ""
    while True:
        for sfx in EXPERIMENTS:
            if mode.endswith(sfx):
                mode, suffix = mode[: -len(sfx)], sfx + suffix
                break
        else:
            return mode, suffix


def experiment_env(mode: str) -> dict[str, str]:
    """The environment an engine of `mode` is built with for the experiment switches (all of them, on or off)."""
    _, suffix = split_variant(mode)
    present = suffix.split("-")[1:]
    # suffixes sharing a variable share its default
    env = {var: off for var, _, off in EXPERIMENTS.values() if off is not None}
    for sfx, (var, on, _) in EXPERIMENTS.items():
        if sfx[1:] in present:
            env[var] = os.environ.get(var + "_AB", on)
    return env


def fusedlis_variants(modes: list[str], tp: int, nvrar_nodes: list[int]) -> list[tuple[str, str, str | None]]:
    """(mode, system label, FUSEDLIS_GPUS_PER_NODE or None) for each engine to build.

    nvrar runs once per logical node count in `nvrar_nodes` (e.g. 2 nodes of 1 GPU at TP=2 takes the inter-node
    path over NVLink); nvrar and fused need TP > 1.
    """
    out = []
    for mode in modes:
        base, suffix = split_variant(mode)
        if suffix:  # the same engine with experiment switches (see EXPERIMENTS)
            out += [(m + suffix, label + suffix, gpn) for m, label, gpn in
                    fusedlis_variants([base], tp, nvrar_nodes) if m != "torch"]
        elif mode == "torch":
            out.append((mode, "torch-eager-nccl", None))
        elif mode in ("nvrar", "fused", "auto-unfusednorm") and tp == 1:
            continue
        elif mode == "nvrar":
            for n in nvrar_nodes:
                if tp % n == 0:
                    out.append((mode, f"fusedlis-nvrar-{n}node", str(tp // n)))
        else:
            out.append((mode, f"fusedlis-{mode}", None))
    return out


# ---- Hugging Face transformers ----------------------------------------------------------------------------
def write_sparse_hf_checkpoint(cfg: LlamaConfig, path: str | os.PathLike) -> Path:
    """A Hugging Face checkpoint of `cfg` (bf16) whose tensors are all zeros, as a sparse safetensors file.

    Only the header is written; the data region is a hole, so an 8B or 70B checkpoint costs no disk and no time
    and reads back as zeros. Reused when it exists.
    """
    root = Path(path)
    st = root / "model.safetensors"
    if st.exists() and (root / "config.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    header, off = {}, 0
    for name, shape in hf_tensor_names(cfg).items():
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = root / f".model.safetensors.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + off)
    hf = cfg.to_hf() | {"torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(hf, indent=2), encoding="utf-8")
    os.replace(tmp, st)
    return root


def load_hf_model(ckpt: str | os.PathLike, tp: int, device: torch.device):
    """transformers' LlamaForCausalLM in bf16: with tp_plan="auto" when tp > 1 (needs `accelerate`), else on
    `device`."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    has_accelerate = importlib.util.find_spec("accelerate") is not None
    if tp > 1 and not has_accelerate:
        raise RuntimeError("transformers' tp_plan needs the `accelerate` package")
    kw = dict(tp_plan="auto") if tp > 1 else dict(device_map=str(device)) if has_accelerate else {}
    with warnings.catch_warnings():
        # newer transformers want distributed_config=DistributedConfig(tp_plan=...) and warn; 5.17 takes tp_plan
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, **kw)
    return model.to(device).eval() if tp == 1 else model.eval()


@torch.no_grad()
def randomize_hf_(model, seed: int = 0) -> None:
    """Fill every parameter (each rank's local shard of a tensor-parallel one) with random values in place."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    for i, (name, p) in enumerate(model.named_parameters()):
        local = p.to_local() if hasattr(p, "to_local") else p
        g = torch.Generator(device=local.device).manual_seed(seed * 100003 + rank * 1009 + i)
        if "norm" in name:
            local.fill_(1.0)
        else:
            local.normal_(0.0, local.shape[-1] ** -0.5 if local.dim() > 1 else 0.02, generator=g)


def cache_tensors(cache) -> list[torch.Tensor]:
    """K and V buffers of a transformers cache (5.x layer objects, or the older key_cache/value_cache lists)."""
    if hasattr(cache, "layers"):
        out = []
        for layer in cache.layers:
            out += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        return out
    return list(cache.key_cache) + list(cache.value_cache)


def hf_forward(model, compile_mode: str | None):
    """The forward to time: `model.forward` compiled like transformers' own static-cache generation
    (inductor, `compile_mode`, shapes dynamic so batch and cache length share one graph) or eager."""
    if compile_mode is None:
        return model.forward
    return torch.compile(model.forward, mode=compile_mode, dynamic=True)


@torch.inference_mode()
def time_hf(model, fwd, batches: list[int], contexts: list[int], steps: int, device: torch.device,
            on_result=None) -> dict[tuple[int, int], float]:
    """Median ms of one decode step of a transformers model per (batch, context).

    Each configuration gets a StaticCache of context + steps tokens (so attention reads what the context needs, not
    a longer buffer), initialised by one eager step at position 0, then filled with random K/V.
    """
    from transformers import StaticCache

    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    vocab = model.config.vocab_size
    out = {}
    for B in batches:
        for ctx in contexts:
            cache = StaticCache(config=model.config, max_cache_len=ctx + WARMUP + steps + 1)
            g = torch.Generator(device=device).manual_seed(B * 7919 + ctx)  # same token ids on every TP rank
            ids = torch.randint(0, vocab, (B, 1), device=device, generator=g)
            zero = torch.zeros(B, 1, dtype=torch.long, device=device)
            model(input_ids=ids, position_ids=zero, cache_position=zero[0], past_key_values=cache, use_cache=True)
            for t in cache_tensors(cache):
                t.normal_()
            for layer in getattr(cache, "layers", []):  # newer transformers write at this counter, not cache_position
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
                    layer.cumulative_length.fill_(ctx)
            times = []
            for i in range(WARMUP + steps):
                p = ctx + i
                pos = torch.full((B, 1), p, dtype=torch.long, device=device)
                cpos = torch.full((1,), p, dtype=torch.long, device=device)
                mark()
                ms = timed_ms(lambda: fwd(input_ids=ids, position_ids=pos, cache_position=cpos,
                                          past_key_values=cache, use_cache=True), device)
                if i >= WARMUP:
                    times.append(ms)
            out[(B, ctx)] = statistics.median(times)
            if on_result is not None:
                on_result(B, ctx, out[(B, ctx)])
            del cache
            free_memory()
    return out


# ---- results ----------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def environment_line(device: torch.device, tp: int, bw: float) -> str:
    """'# key=value ...' naming device, versions, date and the measured bandwidth (first line of each CSV)."""
    import triton

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
        # a copied working tree (e.g. on a lent GPU machine) can carry a stale .git: say so
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), timeout=10).stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    # A lent machine's copy of the tree has a stale .git: the caller can name the source commit literally.
    commit = os.environ.get("FUSEDLIS_SOURCE_COMMIT", "") or commit
    dev = device_name(device).replace(" ", "-")
    return (f"# device={dev} gpus={tp} torch={torch.__version__} triton={triton.__version__} transformers={tf} "
            f"python={platform.python_version()} fusedlis_commit={commit} "
            f"date={dt.datetime.now().isoformat(timespec='minutes')} hbm_read_TBps={bw / 1e12:.3f}")


def save_csv(path: str | os.PathLike, rows: list[dict], meta: list[str] | str | None = None) -> None:
    """Write rows (FIELDS columns; extra keys kept after them) with '#' metadata lines first."""
    fields = list(FIELDS) + [k for k in (rows[0] if rows else {}) if k not in FIELDS]
    with open(path, "w", newline="") as f:
        for m in ([meta] if isinstance(meta, str) else meta or []):
            f.write(m + "\n")
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def read_csv(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """Rows (numbers converted) and '#' metadata lines of a CSV written by save_csv."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    meta = [ln for ln in lines if ln.startswith("#")]
    rows = []
    for r in csv.DictReader([ln for ln in lines if not ln.startswith("#")]):
        for k in ("tp", "batch", "context", "steps"):
            if r.get(k) not in (None, ""):
                r[k] = int(r[k])
        for k in ("ms_per_token", "floor_ms", "ratio_to_floor"):
            if r.get(k) not in (None, ""):
                r[k] = float(r[k])
        rows.append(r)
    return rows, meta


def meta_value(meta: list[str], key: str, default: str = "unknown") -> str:
    """`key=value` from the metadata lines (first match)."""
    for m in meta:
        for tok in m.lstrip("# ").split():
            if tok.startswith(key + "="):
                return tok.split("=", 1)[1]
    return default


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (CSV only then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_latency(rows: list[dict], png: str | os.PathLike, title: str) -> bool:
    """ms per decode step vs batch, one panel per (model, TP, context), one line per system, the floor dashed."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    keys = sorted({(r["model"], r["tp"], r["context"]) for r in rows}, key=lambda k: (_model_size(k[0]), k))
    systems = sorted({r["system"] for r in rows})
    color = {s: plt.cm.tab10(i % 10) for i, s in enumerate(systems)}
    batches = sorted({r["batch"] for r in rows})
    ncol = min(4, len(keys))
    nrow = (len(keys) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (m, tp, c) in zip(axes.flat, keys):
        sel = [r for r in rows if (r["model"], r["tp"], r["context"]) == (m, tp, c)]
        for s in sorted({r["system"] for r in sel}):
            pts = sorted((r["batch"], r["ms_per_token"]) for r in sel if r["system"] == s)
            ax.plot(*zip(*pts), marker="o", label=s, color=color[s],
                    ls="--" if s.startswith(("hf-", "torch-")) else "-")
        fl = min(r["floor_ms"] for r in sel)
        ax.axhline(fl, color="k", ls=":", lw=1, label=f"HBM floor {fl:.2f} ms")
        ax.set(title=f"{m} TP={tp} ctx={c}", xlabel="batch", ylabel="ms / decode step", xscale="log", yscale="log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _model_size(model: str) -> int:
    """Parameter count of a preset (for ordering); unknown names sort last."""
    try:
        return LlamaConfig.preset(model).num_parameters()
    except Exception:
        return 1 << 62


def write_breakdown(rows: list[dict], stem: str, title: str) -> None:
    """Breakdown CSV + stacked bars (device ms per decode step by kernel category), one panel per (model, TP)."""
    save_csv(stem + ".csv", rows)
    plt = _pyplot()
    if plt is None or not rows:
        return
    cats = [c for c, _ in CATEGORIES] + ["other"]
    groups = sorted({(r["model"], r["tp"]) for r in rows}, key=lambda g: (_model_size(g[0]), g))
    widths = [max(2, len([r for r in rows if (r["model"], r["tp"]) == g])) for g in groups]
    fig, axes = plt.subplots(1, len(groups), figsize=(1.3 * sum(widths) + 1.5, 4.2), squeeze=False,
                             gridspec_kw=dict(width_ratios=widths))
    for ax, g in zip(axes[0], groups):
        sel = [r for r in rows if (r["model"], r["tp"]) == g]
        labels = [r["system"].replace("fusedlis-", "fl-").replace("torch-eager-nccl", "torch") for r in sel]
        bottom = [0.0] * len(sel)
        for c in cats:
            vals = [float(r[c]) for r in sel]
            ax.bar(labels, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{g[0]} TP={g[1]}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    axes[0][0].set_ylabel("device ms per decode step")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)
    plt.close(fig)


def summarize(rows: list[dict]) -> str:
    """Per (model, TP, batch, context): every system's ms, the floor, best fusedlis / floor, fused/nccl speed-up
    (nccl ms / fused ms) and fusedlis/HF speed-up (HF ms / best fusedlis ms); then the issue's targets."""
    def short(system: str) -> str:  # one column per system whatever the TP (hf-tp2-compiled -> hf-compiled)
        return re.sub(r"^hf-tp\d+-", "hf-", system.replace("fusedlis-", "").replace("torch-eager-nccl", "torch"))

    order = ("torch", "nccl", "auto", "one_shot", "two_shot", "nvrar", "fused", "hf")
    cols = sorted({short(r["system"]) for r in rows},
                  key=lambda c: (next((i for i, o in enumerate(order) if c.startswith(o)), len(order)), c))
    keys = sorted({(r["model"], r["tp"], r["batch"], r["context"]) for r in rows})
    by = {(r["model"], r["tp"], r["batch"], r["context"], short(r["system"])): r for r in rows}
    head = ["model", "tp", "batch", "ctx"] + cols + ["floor", "best fusedlis", "x floor", "fused/nccl", "fusedlis/HF"]
    table = []
    stats = {}
    for k in keys:
        ms = {s: by[k + (s,)]["ms_per_token"] for s in cols if k + (s,) in by}
        floor = min(by[k + (s,)]["floor_ms"] for s in ms)
        fl = {s: v for s, v in ms.items() if s not in ("torch",) and not s.startswith("hf-")}
        best = min(fl, key=fl.get) if fl else None
        hf = [v for s, v in ms.items() if s.startswith("hf-")]
        fused_nccl = ms["nccl"] / ms["fused"] if "fused" in ms and "nccl" in ms else None
        vs_hf = min(hf) / fl[best] if best and hf else None
        stats[k] = (best and fl[best] / floor, fused_nccl, vs_hf)
        table.append([k[0].replace("llama-3.1-", ""), str(k[1]), str(k[2]), str(k[3])]
                     + [f"{ms[s]:.3f}" if s in ms else "-" for s in cols]
                     + [f"{floor:.3f}", best or "-", f"{fl[best] / floor:.2f}" if best else "-",
                        f"{fused_nccl:.2f}" if fused_nccl else "-", f"{vs_hf:.1f}" if vs_hf else "-"])
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = ["ms per decode step (median); floor = weight bytes per GPU / measured HBM read bandwidth; "
             "fused/nccl = nccl ms / fused ms; fusedlis/HF = HF ms / best fusedlis ms", fmt(head)]
    lines += [fmt(t) for t in table]
    lines.append("targets (issue 6, llama-3.1-8b TP=2):")
    for k, (x_floor, fused_nccl, vs_hf) in stats.items():
        if k[0] == "llama-3.1-8b" and k[1] == 2 and k[2] == 1:
            lines.append(f"  batch 1 ctx {k[3]}: best fusedlis {x_floor or float('nan'):.2f}x floor (target <= 1.25); "
                         f"fused/nccl {fused_nccl or float('nan'):.2f} (target >= 1.15)")
    hf_all = [(k, v[2]) for k, v in stats.items() if v[2] is not None]
    if hf_all:
        k, worst = min(hf_all, key=lambda kv: kv[1])
        lines.append(f"  fusedlis vs HF at the same TP and batch: worst {worst:.1f}x (model {k[0]} TP={k[1]} "
                     f"batch {k[2]} ctx {k[3]}; target >= 2x)")
    else:
        lines.append("  fusedlis vs HF: no HF rows")
    return "\n".join(lines)


def run_summary(paths: list[str], out_dir: str) -> int:
    """Merge the CSVs of several runs into decode_all_<device>_<date>.csv/.png/_summary.txt, and their breakdown
    CSVs (decode_breakdown_*) into decode_breakdown_all_<device>_<date>.csv/.png."""
    rows, metas, bd = [], [], []
    for p in paths:
        r, m = read_csv(p)
        if os.path.basename(p).startswith("decode_breakdown"):
            bd += r
            continue
        rows += r
        metas += [f"{x} file={os.path.basename(p)}" for x in m]
    if not rows:
        print("no decode rows in", paths)
        return 1
    os.makedirs(out_dir, exist_ok=True)
    gpu = meta_value(metas, "device")
    date = meta_value(metas, "date")[:10]
    stem = os.path.join(out_dir, f"decode_all_{gpu}_{date}")
    save_csv(stem + ".csv", rows, metas)
    text = summarize(rows)
    with open(stem + "_summary.txt", "w") as f:
        f.write("\n".join(metas) + "\n" + text + "\n")
    plot_latency(rows, stem + ".png", "\n".join(sorted({m.split(" file=")[0].lstrip("# ") for m in metas})))
    if bd:
        for r in bd:
            for c in [c for c, _ in CATEGORIES] + ["other"]:
                r[c] = float(r[c])
        bd.sort(key=lambda r: (r["model"], r["tp"], r["system"]))
        write_breakdown(bd, os.path.join(out_dir, f"decode_breakdown_all_{gpu}_{date}"),
                        f"per-token device time by kernel category, batch {bd[0]['batch']}, context "
                        f"{bd[0]['context']} ({gpu})")
    print(text)
    print(f"wrote {stem}.csv/.png/_summary.txt" + (" and the breakdown" if bd else ""))
    return 0


# ---- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-3.1-8b", help="comma-separated presets")
    ap.add_argument("--batch", default="1,8,32,64")
    ap.add_argument("--context", default="512,4096")
    ap.add_argument("--modes", default="torch,nccl,nvrar,fused",
                    help="torch = eager torch reference + NCCL; nccl/nvrar/fused/auto = fusedlis engine all-reduce; "
                         "auto-unfusednorm = auto with the RMSNorm after each all-reduce unfused; "
                         "<mode>-norope = that mode with rope as its own kernel, not inside decode attention "
                         "(FUSEDLIS_FUSE_ROPE=0); <mode>-ared = decode attention in one launch "
                         "(FUSEDLIS_ATTN_ONE_LAUNCH=1, -avec: =vec); <mode>-a1 = one attention split "
                         "(FUSEDLIS_ATTN_MAX_SPLITS=1); "
                         "<mode>-lpdl = with PDL for every linear (FUSEDLIS_LINEAR_PDL=$FUSEDLIS_LINEAR_PDL_AB, "
                         "default 0.5,evict); <mode>-fpdl = PDL for the fused GEMM + all-reduce (FUSEDLIS_FUSED_PDL, "
                         "default 1,pf=4); suffixes combine (fused-norope-lpdl-fpdl); "
                         "'none' for transformers only")
    ap.add_argument("--nvrar-nodes", default="1,2",
                    help="logical node counts for nvrar (FUSEDLIS_GPUS_PER_NODE = TP / nodes)")
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per configuration")
    ap.add_argument("--rounds", type=int, default=1,
                    help="> 1: keep every mode's engine built and alternate the modes this many times per batch and "
                         "context; the CSV gets the median and each round's time (round_ms)")
    ap.add_argument("--ref-steps", type=int, default=None,
                    help="timed steps for the eager paths (torch reference, transformers eager); default --steps")
    ap.add_argument("--hf", action="store_true",
                    help="also time Hugging Face transformers (tp_plan='auto' at TP > 1, static cache)")
    ap.add_argument("--hf-compile", default="reduce-overhead",
                    help="torch.compile mode for transformers, or 'none' for eager")
    ap.add_argument("--hf-ckpt-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "fusedlis_hf_ckpt"),
                    help="where the sparse all-zero transformers checkpoints are written")
    ap.add_argument("--breakdown", action="store_true",
                    help="also profile each fusedlis/torch configuration at the first batch and context")
    ap.add_argument("--tag", default=None, help="file-name tag (default: models, '-hf' for a transformers-only run)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a functional smoke run (gloo, wall-clock timing, torch kernels), no numbers to report")
    ap.add_argument("--summarize", nargs="+", metavar="CSV", default=None,
                    help="no benchmark: merge these result CSVs into one CSV + PNG + summary under --out")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",") if b]
    args.contexts = [int(c) for c in args.context.split(",") if c]
    args.mode_list = [m for m in args.modes.split(",") if m and m != "none"]
    args.nvrar_node_list = [int(n) for n in args.nvrar_nodes.split(",") if n]
    args.ref_steps = args.ref_steps or args.steps
    args.hf_compile = None if args.hf_compile in ("none", "eager", "") else args.hf_compile
    modes = ("torch", "nccl", "nvrar", "fused", "auto", "auto-unfusednorm", "one_shot", "two_shot")
    bad = [m for m, (base, sfx) in ((m, split_variant(m)) for m in args.mode_list)
           if base not in modes or (base == "torch" and sfx)]
    if bad:
        ap.error(f"unknown modes {bad}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.breakdown and args.device == "cpu":
        ap.error("--breakdown profiles CUDA kernels")
    if args.tag is None:
        args.tag = "+".join(m.replace("llama-3.1-", "") for m in args.models.split(",")) + (
            "-hf" if args.hf and not args.mode_list else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        paths = sorted({p for pat in args.summarize for p in glob.glob(pat)})  # a pattern matching nothing is skipped
        return run_summary(paths, args.out)
    on_gpu = args.device == "cuda"
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    tp = dist.get_world_size() if dist.is_initialized() else 1
    dev = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    bw = hbm_read_bandwidth(dev, nbytes=(4 << 30) if on_gpu else (256 << 20))
    meta = environment_line(dev, tp, bw)
    gpu = device_name(dev).replace(" ", "-")
    date = dt.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"decode_tp{tp}_{args.tag}_{gpu}_{date}")
    rows, bdrows = [], []
    total_mem = torch.cuda.get_device_properties(dev).total_memory if on_gpu else 0
    allocated = lambda: torch.cuda.memory_allocated(dev) / 1e9 if on_gpu else 0.0  # noqa: E731

    def emit(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            print(row, flush=True)
            save_csv(stem + ".csv", rows, meta)  # after every row, so a timeout keeps what was measured

    if rank == 0:
        print(meta, flush=True)
    for model_name in args.models.split(","):
        cfg = LlamaConfig.preset(model_name)
        floor_ms = weight_bytes_per_gpu(cfg, tp) / bw * 1e3
        max_seq = max(args.contexts) + WARMUP + max(args.steps, args.ref_steps) + 8
        need = weight_bytes_per_gpu(cfg, tp) + kv_bytes_per_gpu(cfg, tp, max(args.batches), max_seq)
        if rank == 0:
            print(f"{model_name} TP={tp}: weights read per step + KV cache {need / 1e9:.1f} GB per GPU of "
                  f"{total_mem / 1e9:.1f} GB; floor {floor_ms:.3f} ms", flush=True)
        def build(mode: str, label: str, gpn: str | None):
            if gpn:
                os.environ["FUSEDLIS_GPUS_PER_NODE"] = gpn
            else:
                os.environ.pop("FUSEDLIS_GPUS_PER_NODE", None)
            # auto-unfusednorm: auto with the RMSNorm after each all-reduce as its own kernel (A/B of the fusion)
            os.environ["FUSEDLIS_FUSE_NORM"] = "0" if mode.startswith("auto-unfusednorm") else "1"
            os.environ.update(experiment_env(mode))
            kw = dict(kernels="torch", cuda_graphs=False, allreduce="nccl") if mode == "torch" else dict(
                allreduce=split_variant(mode)[0].replace("-unfusednorm", ""))
            eng = fusedlis.Engine.from_pretrained(
                model_name, device=dev, random_weights=True, max_batch_size=max(args.batches), max_seq_len=max_seq,
                progress=rank == 0, **kw)
            for k, v in zip(eng.cache.k, eng.cache.v):
                k.normal_()
                v.normal_()
            if rank == 0:
                print(f"{label}: {allocated():.1f} GB allocated after build "
                      f"(graph capture {eng.capture_s:.1f} s)", flush=True)
            if args.breakdown:
                top: list = []
                bd = breakdown(eng, args.batches[0], args.contexts[0], top=top)
                if rank == 0:
                    print(f"{label}: kernels per decode step (us, calls), batch {args.batches[0]} context "
                          f"{args.contexts[0]}:", flush=True)
                    for name, us, calls in top[:30]:
                        print(f"    {us:9.1f} us {calls:6.1f}x  {name[:110]}", flush=True)
                bdrows.append(dict(model=model_name, tp=tp, system=label, batch=args.batches[0],
                                   context=args.contexts[0], **{k: round(v, 4) for k, v in bd.items()}))
                if rank == 0:
                    print(bdrows[-1], flush=True)
                    write_breakdown(bdrows, os.path.join(args.out, f"decode_breakdown_tp{tp}_{args.tag}_{gpu}_{date}"),
                                    f"per-token time breakdown, TP={tp}, batch {args.batches[0]}, "
                                    f"context {args.contexts[0]} ({device_name(dev)})")
            return eng

        def released() -> None:  # after the caller dropped its engine references
            free_memory()
            if dist.is_initialized():
                dist.barrier()

        def steps_of(mode: str) -> int:
            return args.ref_steps if mode == "torch" else args.steps

        def emit_timed(mode: str, label: str, eng, B: int, ctx: int, times: list[float]) -> None:
            row = make_row(model_name, tp, label, B, ctx, steps_of(mode), statistics.median(times), floor_ms,
                           0 if mode == "torch" else engine_fuses_norm(eng, B),
                           int(bool(getattr(eng.model.ops, "fuse_rope", False))))
            if args.rounds > 1:
                row["round_ms"] = ";".join(f"{t:.4f}" for t in times)
            emit(row)

        variants = fusedlis_variants(args.mode_list, tp, args.nvrar_node_list)
        if args.rounds > 1 and total_mem and need * len(variants) > 0.9 * total_mem:
            # every engine stays built in this mode: fail before building any rather than out of memory midway
            raise SystemExit(f"--rounds {args.rounds} keeps {len(variants)} {model_name} engines built, about "
                             f"{need * len(variants) / 1e9:.0f} GB per GPU of {total_mem / 1e9:.0f} GB: time fewer "
                             f"modes, smaller --batch / --context, or --rounds 1")
        if args.rounds > 1:
            # Every engine stays built and the rounds alternate between them, so a slow spell of the machine
            # (clocks, a noisy neighbour) hits every mode alike: the ratios between modes are the robust numbers.
            engines = [(mode, label, build(mode, label, gpn)) for mode, label, gpn in variants]
            for B in args.batches:
                for ctx in args.contexts:
                    per: dict[str, list[float]] = {label: [] for _, label, _ in engines}
                    for _ in range(args.rounds):
                        for mode, label, eng in engines:
                            per[label].append(time_engine(eng, B, ctx, steps_of(mode)))
                    for mode, label, eng in engines:
                        emit_timed(mode, label, eng, B, ctx, per[label])
            eng = None
            engines.clear()
            released()
        else:
            for mode, label, gpn in variants:  # one engine at a time (a 70B engine fills most of a GPU)
                eng = build(mode, label, gpn)
                for B in args.batches:
                    for ctx in args.contexts:
                        emit_timed(mode, label, eng, B, ctx, [time_engine(eng, B, ctx, steps_of(mode))])
                del eng
                released()
        os.environ.pop("FUSEDLIS_GPUS_PER_NODE", None)
        if args.hf:
            ckpt = Path(args.hf_ckpt_dir) / f"{model_name}-zeros"
            if rank == 0:
                write_sparse_hf_checkpoint(cfg, ckpt)
            if dist.is_initialized():
                dist.barrier()
            model = load_hf_model(ckpt, tp, dev)
            randomize_hf_(model)
            compiled = args.hf_compile is not None
            label = f"hf-tp{tp}-{'compiled' if compiled else 'eager'}"
            steps = args.steps if compiled else args.ref_steps
            if rank == 0:
                print(f"{label}: transformers loaded, {allocated():.1f} GB allocated; "
                      f"attn={getattr(model.config, '_attn_implementation', '?')} compile={args.hf_compile}",
                      flush=True)
            fwd = hf_forward(model, args.hf_compile)
            time_hf(model, fwd, args.batches, args.contexts, steps, dev,
                    on_result=lambda B, ctx, ms: emit(make_row(model_name, tp, label, B, ctx, steps, ms, floor_ms)))
            if compiled and rank == 0:
                from torch._dynamo.utils import counters

                # graphs compiled, and whether inductor ran them without CUDA graphs (then reduce-overhead did not apply)
                print(f"{label}: dynamo {dict(counters['stats'])}; inductor cudagraph skips "
                      f"{dict(counters['inductor']).get('cudagraph_skips', 0)}", flush=True)
            del model, fwd
            free_memory()
    if rank == 0 and rows:
        save_csv(stem + ".csv", rows, meta)
        plot_latency(rows, stem + ".png", meta.lstrip("# "))
        print(summarize(rows), flush=True)
        print(f"wrote {stem}.csv", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
