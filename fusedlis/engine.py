"""`fusedlis.Engine`: load a model (one GPU, several under torchrun, or the CPU reference) and generate."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fusedlis._env import env_flag
from fusedlis.model import KVCache, LlamaForCausalLM, load_model, resolve_checkpoint
from fusedlis.sampling import sample
from fusedlis.tokenizer import Tokenizer, load_tokenizer


@dataclass
class GenerationResult:
    """One prompt's output: generated ids, text (when a tokenizer exists) and per-token latencies (s).

    `latencies_s[0]` is the time to first token (the prompt's prefill); later entries are decode steps.
    """

    token_ids: list[int]
    text: str | None
    latencies_s: list[float]
    prompt_tokens: int
    finish_reason: str = "length"
    extra: dict = field(default_factory=dict)


GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Prompts are prefilled together, right-padded, in groups of at most this many (padded) tokens; a longer prompt
# goes alone.
PREFILL_TOKENS = 8192


def timed_ms(fn, device: torch.device) -> float:
    """Milliseconds `fn()` takes: CUDA events on a GPU, wall clock on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e)


def _prefill_groups(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) groups of prompts whose padded size (count x longest) stays within `budget` tokens."""
    groups, lo, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > lo and max(longest, n) * (i - lo + 1) > budget:
            groups.append((lo, i))
            lo, longest = i, 0
        longest = max(longest, n)
    if lengths:
        groups.append((lo, len(lengths)))
    return groups


def _dist_env() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed or torchrun/srun variables; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    ws = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    return rank, ws


ALLREDUCE_MODES = ("auto", "nccl", "nvrar", "one_shot", "two_shot", "fused")


class _Collectives:
    """The TP communicator of the engine: all-reduce through `ar`, all-gather through torch.distributed."""

    def __init__(self, ar, gather) -> None:
        self.ar, self.gather = ar, gather

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.ar.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.gather.all_gather(x, dim)

    def all_reduce_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """One fused all-reduce + residual + RMSNorm kernel where the all-reduce backend has one, else None."""
        if self.ar.fuses_norm(x):  # checked once here; AllReduce.all_reduce_norm would check again
            return self.ar.device_ar.all_reduce_norm(x, residual.contiguous(), weight.contiguous(), eps)
        return None


def build_comm(allreduce: str, dtype: torch.dtype, max_bytes: int):
    """The communicator for `allreduce` mode over the default process group (world size > 1)."""
    from fusedlis.comm import AllReduce, TorchDistBackend

    base = TorchDistBackend()
    if allreduce == "nccl":
        return base
    backend = "auto" if allreduce == "fused" else allreduce
    # FUSEDLIS_FUSE_NORM=0 keeps the RMSNorm after each all-reduce a separate kernel (for A/B timing).
    fuse_norm = env_flag("FUSEDLIS_FUSE_NORM", True)
    return _Collectives(AllReduce(backend=backend, max_bytes=max_bytes, dtype=dtype, fuse_norm=fuse_norm), base)


def _hosts() -> list[str]:
    """Every rank's host name (collective over the default group)."""
    import socket

    import torch.distributed as dist

    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return names


FUSED_TRANSPORT_ENV = "FUSEDLIS_FUSED_TRANSPORT"


def fused_transport() -> str:
    """`FUSEDLIS_FUSED_TRANSPORT`: how the fused kernel's inter-node rounds reach the rail partner. "auto"
    (default: peer stores inside one host, NVSHMEM put-with-signal across hosts), "ptr" or "put" (NVSHMEM even
    inside one host: runs the cross-host code path over NVLink)."""
    val = os.environ.get(FUSED_TRANSPORT_ENV, "auto").strip().lower() or "auto"
    if val not in ("auto", "ptr", "put"):
        raise ValueError(f"{FUSED_TRANSPORT_ENV}={val!r}: expected auto, ptr or put")
    return val


def _fused_workspace(max_m: int, max_n: int, hosts: int):
    """The fused kernel's workspace: torch symmetric memory inside one host; across hosts (or with
    FUSEDLIS_FUSED_TRANSPORT=put) an NVSHMEM workspace whose inter-node rounds are puts with signal.
    None (with a warning) where neither can work."""
    from fusedlis.comm.symmetric import nvshmem_available, warn_once
    from fusedlis.triton_kernels.linear_allreduce import FusedAllReduceWorkspace

    transport = fused_transport()
    if hosts == 1 and transport != "put":
        return FusedAllReduceWorkspace.from_torch_symm(max_m, max_n)
    if not nvshmem_available():
        if transport == "put":
            raise RuntimeError(f"{FUSED_TRANSPORT_ENV}=put needs NVSHMEM (nvshmem4py and libnvshmem_device.bc)")
        warn_once(f"allreduce='fused' across {hosts} hosts needs NVSHMEM for the inter-node rounds, which is not "
                  "installed; the row-parallel layers use fusedlis' all-reduce (auto) instead")
        return None
    try:
        ws = FusedAllReduceWorkspace.from_nvshmem(max_m, max_n, transport=transport)
    except NotImplementedError as e:  # e.g. a "node" of FUSEDLIS_GPUS_PER_NODE GPUs that spans two hosts
        warn_once(f"allreduce='fused': {e}; the row-parallel layers use fusedlis' all-reduce (auto) instead")
        return None
    return ws  # ws.symmetric keeps the NVSHMEM allocation alive


def _fused_row_linear(model: LlamaForCausalLM, max_m: int):
    """row_linear hook running fusedlis.triton_kernels.linear_allreduce for decode-sized M (else declines).

    It also declines shapes where the plain GEMM + fusedlis' all-reduce measured faster on this GPU model
    (`unfused_measured_faster`: 8B TP=2 at 33-64 rows on H200); those run exactly as in `allreduce="auto"`.

    Inside one host the kernel stores into peer memory (torch symmetric memory). Across hosts the GPUs of a node
    still exchange tiles by peer stores, and the inter-node rounds are NVSHMEM puts with signal; without NVSHMEM
    this returns None (with a warning) and the row-parallel layers use the engine's communicator."""
    from fusedlis.triton_kernels.linear_allreduce import linear_allreduce, unfused_measured_faster

    ws = _fused_workspace(max_m, model.config.hidden_size, len(set(_hosts())))
    if ws is None:
        return None

    def row_linear(x: torch.Tensor, w: torch.Tensor, residual=None, norm_weight=None, eps: float = 1e-5):
        if x.shape[0] > max_m or x.dtype != w.dtype:
            return None
        if unfused_measured_faster(x.shape[0], w.shape[0], w.shape[1], ws.local_size, x.dtype, x.device,
                                   norm=norm_weight is not None):
            return None
        if residual is None:
            return linear_allreduce(x.contiguous(), w, ws)
        return linear_allreduce(x.contiguous(), w, ws, residual=residual.contiguous(), norm_weight=norm_weight,
                                eps=eps)

    row_linear.workspace = ws
    return row_linear


class Engine:
    """Latency-oriented decode engine.

    Use `Engine.from_pretrained(path_or_preset, device=...)`, then `generate(prompts, ...)`. On CPU it runs the
    torch reference path with a KV cache. Under torchrun/srun (WORLD_SIZE > 1) each rank loads its tensor-parallel
    shard; every rank must call `generate` with the same arguments and gets the same result.
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer | None, *, max_batch_size: int,
                 max_seq_len: int, cuda_graphs: bool = True, progress: bool = True) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.cache = KVCache.allocate(self.config, model.tp.size, max_batch_size, max_seq_len, model.dtype,
                                      self.device)
        model.rope(max_seq_len, self.device)
        eos = set(self.config.eos_token_id)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_token_ids)
        self.eos_ids = eos
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0
        if cuda_graphs and self.device.type == "cuda":
            self._capture_all(progress)

    # ---- CUDA graphs: one captured decode step per batch-size bucket, over the static KV cache ----------
    def buckets(self) -> list[int]:
        """Batch sizes that get a captured decode graph (powers of two up to max_batch_size, and it)."""
        b = [x for x in GRAPH_BUCKETS if x < self.max_batch_size]
        return b + [self.max_batch_size]

    @torch.inference_mode()
    def _capture_all(self, progress: bool) -> None:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        self._tokens = torch.zeros(self.max_batch_size, 1, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(self.max_batch_size, 1, dtype=torch.long, device=self.device)
        show = progress and _dist_env()[0] == 0
        pool = None
        for bsz in tqdm(sorted(self.buckets(), reverse=True), desc="capturing decode graphs", disable=not show,
                        leave=False):
            step = lambda: self.model(self._tokens[:bsz], self._positions[:bsz],  # noqa: E731
                                      kv_cache=self.cache, last_only=True, check=False)[:, -1]
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(2):  # compile Triton kernels and settle allocations outside the capture
                    step()
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = step()
            pool = g.pool()  # buckets share one memory pool; they never run at once
            self.graphs[bsz] = (g, out)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0

    @classmethod
    def from_pretrained(cls, path_or_preset: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, kernels: str | None = None, max_batch_size: int = 64,
                        max_seq_len: int = 8192, random_weights: bool = False, seed: int = 0,
                        cuda_graphs: bool = True, allreduce: str = "auto", progress: bool = True) -> "Engine":
        """Build an engine from a checkpoint directory or preset (`"tiny"` is embedded).

        Defaults: device "cuda" when available else "cpu"; dtype bfloat16 on GPU, float32 on CPU; kernels
        "triton" on GPU, "torch" on CPU. With WORLD_SIZE > 1 (torchrun/srun) the process group is initialised
        (NCCL on GPU, gloo on CPU) and the model is split across all ranks. `allreduce` picks the row-parallel
        all-reduce: "nccl" (torch.distributed), "auto" / "nvrar" / "one_shot" / "two_shot" (fusedlis.comm, NCCL
        fallback with a warning where NVSHMEM is missing) or "fused" (GEMM epilogue pushes tiles to peers).
        """
        if allreduce not in ALLREDUCE_MODES:
            raise ValueError(f"allreduce must be one of {ALLREDUCE_MODES}, got {allreduce!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        on_gpu = device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
        kernels = kernels or ("triton" if on_gpu else "torch")
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError("max_batch_size must be >= 1 and max_seq_len >= 2")
        rank, world = _dist_env()
        if world > 1:
            import torch.distributed as dist

            if on_gpu:
                local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
                torch.cuda.set_device(local)
                device = torch.device("cuda", local)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if on_gpu else "gloo")
        config, ckpt = resolve_checkpoint(path_or_preset)
        max_seq_len = min(max_seq_len, config.max_position_embeddings)
        comm = None
        if world > 1 and on_gpu:
            ar_bytes = max(max_batch_size, 1) * config.hidden_size * torch.empty((), dtype=dtype).element_size()
            comm = build_comm(allreduce, dtype, max(ar_bytes, 1 << 20))
        model = load_model(path_or_preset, dtype=dtype, device=device, tp_rank=rank, tp_size=world,
                           kernels=kernels, random_weights=random_weights, seed=seed, comm=comm,
                           progress=progress and rank == 0)
        if allreduce == "fused" and world > 1 and on_gpu:
            model.tp.row_linear = _fused_row_linear(model, max_batch_size)
        tok = load_tokenizer(ckpt, config.vocab_size, config.bos_token_id, config.eos_token_id)
        return cls(model, tok, max_batch_size=max_batch_size, max_seq_len=max_seq_len, cuda_graphs=cuda_graphs,
                   progress=progress)

    # ------------------------------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need a tokenizer; this model has none: pass token ids")
                ids = self.tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.config.vocab_size}): {bad[:5]}")
            out.append(ids)
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True) -> list[GenerationResult]:
        """Generate up to `max_new_tokens` per prompt (greedy when temperature == 0).

        Prompts are strings (needs a tokenizer) or token-id lists. Each prompt is prefilled on its own, then all
        are decoded together, one token per step, until EOS or `max_new_tokens`.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        seqs = self._encode(prompts)
        if len(seqs) > self.max_batch_size:
            raise ValueError(f"{len(seqs)} prompts exceed max_batch_size={self.max_batch_size}")
        longest = max(len(s) for s in seqs)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"({self.max_seq_len})")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        B = len(seqs)
        out: list[list[int]] = [[] for _ in range(B)]
        lat: list[list[float]] = [[] for _ in range(B)]
        done = [False] * B
        reason = ["length"] * B
        next_tok = torch.empty(B, dtype=torch.long, device=self.device)
        for lo, hi in _prefill_groups([len(s) for s in seqs], PREFILL_TOKENS):
            t0 = time.perf_counter()
            logits = self._prefill(lo, seqs[lo:hi])
            next_tok[lo:hi] = sample(logits, temperature, top_p, gen)
            self._sync()
            dt = time.perf_counter() - t0
            for b in range(lo, hi):
                lat[b].append(dt)
        lens = torch.tensor([len(s) for s in seqs], device=self.device)
        for step in range(max_new_tokens):
            toks = next_tok.tolist()
            for b in range(B):
                if done[b]:
                    continue
                out[b].append(toks[b])
                if stop_at_eos and toks[b] in self.eos_ids:
                    done[b], reason[b] = True, "eos"
                elif len(out[b]) >= max_new_tokens:
                    done[b] = True
            if all(done):
                break
            t0 = time.perf_counter()
            logits = self._decode(next_tok, lens)
            next_tok = sample(logits, temperature, top_p, gen)
            self._sync()
            dt = time.perf_counter() - t0
            lens += 1
            for b in range(B):
                if not done[b]:
                    lat[b].append(dt)
        results = []
        for b in range(B):
            text = self.tokenizer.decode(out[b]) if self.tokenizer is not None else None
            results.append(GenerationResult(out[b], text, lat[b], len(seqs[b]), reason[b]))
        return results

    def _prefill(self, row0: int, seqs: list[list[int]]) -> torch.Tensor:
        """Run prompts into cache rows row0, row0 + 1, ... in one forward; returns their last-token logits [n, vocab].

        Prompts of different lengths are right-padded: a pad position's keys and values land past its row's
        length, where decode overwrites them before any attention reads them, and causal attention keeps the
        real tokens from seeing them."""
        n, T = len(seqs), max(len(s) for s in seqs)
        x = torch.zeros((n, T), dtype=torch.long)
        for i, ids in enumerate(seqs):
            x[i, :len(ids)] = torch.tensor(ids)
        last = torch.tensor([len(ids) - 1 for ids in seqs], device=self.device)
        if row0 > 0:  # the model writes cache rows 0..n-1, so hand it the rows from row0 on
            cache = KVCache([k[row0:row0 + n] for k in self.cache.k], [v[row0:row0 + n] for v in self.cache.v])
        else:
            cache = self.cache
        return self.model(x.to(self.device), kv_cache=cache, last_index=last)[:, 0]

    @torch.inference_mode()
    def time_decode(self, batch: int, context: int, steps: int = 100, warmup: int = 3, seed: int = 0) -> list[float]:
        """Milliseconds of each of `steps` decode steps for `batch` sequences at `context` cached tokens.

        For benchmarks: random token ids, a KV cache holding whatever is in it (the cost of a step does not depend
        on the values), one CUDA-graph replay per step timed by CUDA events (wall clock on CPU). Collective under
        torchrun: every rank must call it with the same arguments. Needs context + warmup + steps <= max_seq_len
        and batch <= max_batch_size.
        """
        if not 1 <= batch <= self.max_batch_size:
            raise ValueError(f"batch must be in [1, {self.max_batch_size}] (max_batch_size), got {batch}")
        if context < 1 or steps < 1 or warmup < 0 or context + warmup + steps > self.max_seq_len:
            raise ValueError(f"context ({context}) + warmup ({warmup}) + steps ({steps}) must fit max_seq_len "
                             f"({self.max_seq_len}), with context and steps >= 1")
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, self.config.vocab_size, (batch,), generator=g).to(self.device)
        lens = torch.full((batch,), context, dtype=torch.long, device=self.device)
        for i in range(warmup):
            self._decode(tokens, lens + i)
        self._sync()
        return [timed_ms(lambda pos=lens + warmup + i: self._decode(tokens, pos), self.device) for i in range(steps)]

    @torch.inference_mode()
    def _decode(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """One decode step for every row: token b at position lens[b]; returns logits [B, vocab]."""
        B = tokens.shape[0]
        if self.graphs:
            bsz = min(b for b in self.graphs if b >= B)
            self._tokens[:B, 0].copy_(tokens)
            self._positions[:B, 0].copy_(lens)
            if bsz > B:  # padding rows use free cache rows B..bsz-1 at position 0
                self._tokens[B:bsz].zero_()
                self._positions[B:bsz].zero_()
            g, out = self.graphs[bsz]
            g.replay()
            return out[:B]
        return self.model(tokens.view(B, 1), lens.view(B, 1), kv_cache=self.cache, last_only=True)[:, -1]
