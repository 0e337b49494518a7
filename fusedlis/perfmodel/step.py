"""Step latency of prefill and decode per layout: roofline compute + kernel overhead + communication.

Every kernel costs `hw.kernel_overhead + max(bytes / hbm_bw, flops / peak_flops)` (the intercept-plus-slope
form that fits measured cuBLAS decode GEMMs, see docs/perfmodel.md); decode GEMMs add `flops / gemm_flop_rate`
and `rows * gemm_row_latency` where the profile sets them. Attention reads the KV cache (batch x context x 2 x
local KV heads x head_dim elements) at `hbm_bw`. Communication follows compute, except
that in decode (one CUDA graph) a fraction `hw.latency_hidden(algo)` of each all-reduce's NVLink latency term
is hidden behind the GEMM before it (fitted from GEMM + all-reduce pairs; on 2xH200 NCCL hides some, the custom
kernels none).

Fused mode (`Engine(allreduce="fused")`, `step_time(fused_linear=True)`): o_proj and down_proj each run as one
fused GEMM + all-reduce + residual + RMSNorm kernel (`fusedlis.triton_kernels.linear_allreduce`). Where the
profile holds that kernel's measured time for both shapes (`Hardware.fused_linear_ar`, from `fusedlis
calibrate`), a decode step costs those calls at the measured time, interpolated in the batch, in place of the two
GEMMs, their all-reduces and the two RMSNorm kernels; otherwise (older profiles) fused mode is costed as the
GEMM then the all-reduce, as for the other modes.

In decode, pipeline stages run one after another for the batch (no micro-batching), so PP does not shorten
a token's latency; it only cuts weights per GPU and communication. Prefill with PP sends each sequence of the
batch through the pipe as a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.hardware import Hardware
from fusedlis.perfmodel.volume import Layout, ModelShape, Volume, step_volume

# rmsnorm, qkv GEMM, attention with rope + cache write (split over the context) + its reduce, o GEMM
# (+all-reduce), rmsnorm, gate_up+SwiGLU, down (+AR): what the fusedlis engine launches per layer in a decode
# step (per-kernel profile of bench/decode.py --breakdown, 2xH200 run 05:47: _decode_attention_kernel and
# _decode_attention_reduce_kernel once per layer each). Builds before 2026-11-22T10:15, and FUSEDLIS_FUSE_ROPE=0,
# also launch ROPE_KERNELS_PER_LAYER rope kernel per layer (pass it as extra_layer_kernels).
KERNELS_PER_LAYER = 8
ROPE_KERNELS_PER_LAYER = 1
# engine builds before 2026-11-22T05:38 (f19d74e) also ran 2 torch kernels per layer for the sequence lengths
SEQ_LENS_KERNELS_PER_LAYER = 2
# embedding, final rmsnorm, lm_head GEMM, sampling
KERNELS_PER_STEP = 4
# row-parallel all-reduces per layer (after o_proj and down_proj); each is followed by a residual add + RMSNorm
# that `fuse_norm` folds into the all-reduce kernel (AllReduce.all_reduce_norm): one RMSNorm kernel fewer each
FUSED_NORMS_PER_LAYER = 2
# row-parallel GEMMs per layer (o_proj, down_proj): with a measured fused linear_allreduce table they run inside
# that kernel, whose measured time includes its launches
ROW_PARALLEL_GEMMS_PER_LAYER = 2


def kernels_per_step(num_layers: int, fuse_norm: bool = False, extra_layer_kernels: int = 0,
                     fused_linear: bool = False) -> int:
    """Kernel launches of one forward step outside communication: 9 per layer + 4, minus one RMSNorm per fused
    all-reduce (2 per layer) when `fuse_norm`, plus `extra_layer_kernels` per layer (e.g. an older engine's
    SEQ_LENS_KERNELS_PER_LAYER). `fused_linear` (a measured fused linear_allreduce time is used): the 2
    row-parallel GEMMs and the 2 RMSNorms of each layer are not counted (their launches are in the measured time)."""
    fuse_norm = fuse_norm or fused_linear
    per_layer = (KERNELS_PER_LAYER - (FUSED_NORMS_PER_LAYER if fuse_norm else 0)
                 - (ROW_PARALLEL_GEMMS_PER_LAYER if fused_linear else 0) + extra_layer_kernels)
    return num_layers * per_layer + KERNELS_PER_STEP


@dataclass
class StepTime:
    """Seconds of one step, by part. `comm` holds all-reduce, all-gather and stage-boundary sends."""

    compute: float = 0.0
    overhead: float = 0.0
    comm: float = 0.0
    comm_inter: float = 0.0
    net_bytes: float = 0.0  # bytes crossing node boundaries, summed over GPUs
    volume: Volume | None = None
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.compute + self.overhead + self.comm

    @property
    def comm_share(self) -> float:
        return self.comm / self.total if self.total > 0 else 0.0


def _kernel(hw: Hardware, nbytes: float, flops: float) -> float:
    return max(nbytes / hw.hbm_bw, flops / hw.peak_flops)


def _gemm(hw: Hardware, nbytes: float, flops: float, skinny: bool, rows: int = 1) -> float:
    # Skinny (decode) GEMMs pay for their flops and/or per activation row on top of streaming the weights
    # (whichever terms the profile has); prefill GEMMs are plain roofline.
    if not skinny:
        return _kernel(hw, nbytes, flops)
    extra = flops / hw.gemm_flop_rate if hw.gemm_flop_rate > 0 else 0.0
    return _kernel(hw, nbytes, flops) + extra + rows * hw.gemm_row_latency


def _local_kv_heads(shape: ModelShape, tp: int) -> int:
    # KV heads are replicated when tp exceeds their number.
    return max(1, shape.num_key_value_heads // tp)


def row_parallel_shapes(shape: ModelShape, tp: int) -> list[tuple[int, int]]:
    """(K per GPU, N) of the row-parallel GEMMs of one layer at TP `tp`: o_proj and down_proj."""
    return [((shape.num_attention_heads // tp) * shape.head_dim, shape.hidden_size),
            (shape.intermediate_size // tp, shape.hidden_size)]


def fused_linear_layer_time(shape: ModelShape, hw: Hardware, tp: int, rows: int) -> float | None:
    """Seconds of one layer's two fused linear_allreduce (+ residual + RMSNorm) calls with `rows` rows, from
    the profile's measured table (`Hardware.fused_linear_time`) on `tp` GPUs; None unless both shapes were
    measured."""
    ts = [hw.fused_linear_time(tp, k, n, rows) for k, n in row_parallel_shapes(shape, tp)]
    return None if any(t is None for t in ts) else float(sum(ts))


def layer_compute(shape: ModelShape, hw: Hardware, tp: int, tokens: int, batch: int, context: float,
                  prefill: bool, dtype_bytes: int = 2, fuse_norm: bool = False,
                  row_parallel_gemms: bool = True) -> float:
    """Roofline seconds of one decoder layer's kernels on one GPU (no overhead, no communication).

    `context` is the attended length: the KV length in decode, the prompt length in prefill (causal).
    `fuse_norm`: the two RMSNorms run inside the all-reduces (costed there), not as kernels of their own.
    `row_parallel_gemms=False`: o_proj and down_proj are left out (costed as a measured fused kernel instead).
    """
    b = dtype_bytes
    h, hd = shape.hidden_size, shape.head_dim
    hq, hkv = shape.num_attention_heads // tp, _local_kv_heads(shape, tp)
    inter = shape.intermediate_size // tp
    t = 0.0
    gemms = [(h, (hq + 2 * hkv) * hd), (hq * hd, h), (h, 2 * inter), (inter, h)]
    if not row_parallel_gemms:
        gemms = [gemms[0], gemms[2]]
    for n_in, n_out in gemms:
        t += _gemm(hw, (n_in * n_out + tokens * (n_in + n_out)) * b, 2.0 * tokens * n_in * n_out, not prefill,
                   tokens)
    kv_width = 2 * hkv * hd
    if prefill:
        # causal: each of `context` positions attends to half the prompt on average
        flops = 4.0 * batch * context * (context / 2) * hq * hd
        t += _kernel(hw, tokens * (2 * hq * hd + kv_width) * b + tokens * kv_width * b, flops)
    else:
        flops = 4.0 * batch * context * hq * hd
        t += _kernel(hw, batch * context * kv_width * b + 2 * batch * hq * hd * b, flops)
    if not fuse_norm:
        t += FUSED_NORMS_PER_LAYER * _kernel(hw, 2 * tokens * h * b, 0)  # two rmsnorms
    t += _kernel(hw, tokens * (hq + 2 * hkv) * hd * b * 2, 0)  # rope + cache write (bytes; no launch of its own)
    return t


def step_time(shape: ModelShape, layout: Layout, hw: Hardware, *, batch: int, context: float, prefill: bool,
              allreduce: str = "nccl", dtype_bytes: int = 2, fuse_norm: bool = False,
              allgather: str | None = None, extra_layer_kernels: int = 0, fused_linear: bool = False) -> StepTime:
    """One forward step: decode (1 new token per sequence, `context` cached) or prefill (`context` prompt tokens).

    `allreduce` names the TP all-reduce algorithm (`collectives.ALGORITHMS`); stage boundaries use NCCL
    send/recv when it is "nccl", custom puts otherwise. `allgather` names the logits all-gather's algorithm
    (default: `allreduce`'s; the fusedlis engine gathers through NCCL in every mode).
    `fuse_norm` (TP > 1 only): each row-parallel all-reduce (2 per layer) runs fused with the residual add and
    the following RMSNorm in one kernel (AllReduce.all_reduce_norm): those 2L RMSNorm kernels (launch and bytes)
    disappear and each fused all-reduce costs the all-reduce plus `hw.ar_norm_row_latency` per row.
    `extra_layer_kernels`: launches per layer beyond `KERNELS_PER_LAYER` with no bytes worth counting (an older
    engine's seq_lens updates: SEQ_LENS_KERNELS_PER_LAYER); each costs `hw.kernel_overhead`.
    `fused_linear` (decode, TP > 1, one node; the engine's `allreduce="fused"` mode): if the profile has the
    measured fused linear_allreduce time for both row-parallel shapes at this TP (`fused_linear_layer_time`),
    o_proj and down_proj with their all-reduces, residual adds and RMSNorms cost 2L calls at that time (booked
    under `comm`, `detail["fused_linear_allreduce"]`: a measured term the compute terms do not scale), their
    GEMMs, RMSNorms and launches leave `compute` and `overhead`, and only the embedding's all-reduce remains an
    all-reduce (`allreduce`'s algorithm). Without the table the step is costed as with `fused_linear=False`.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if context < (1 if prefill else 0):
        raise ValueError(f"context must be >= {1 if prefill else 0}, got {context}")
    layout.check(shape, hw.gpus_per_node)
    algo = coll.resolve(allreduce)
    impl = "nccl" if algo == "nccl" else "custom"
    tokens = int(batch * context) if prefill else batch
    tp, pp, L = layout.tp, layout.pp, shape.num_hidden_layers
    nodes, gpn = layout.tp_grid(hw.gpus_per_node)
    vol = step_volume(shape, layout, tokens, batch, dtype_bytes)
    st = StepTime(volume=vol)

    fused_t = (fused_linear_layer_time(shape, hw, tp, batch)
               if fused_linear and tp > 1 and not prefill and nodes == 1 else None)
    fuse = (fuse_norm and tp > 1) or fused_t is not None
    st.compute = L * layer_compute(shape, hw, tp, tokens, batch, context, prefill, dtype_bytes, fuse,
                                   row_parallel_gemms=fused_t is None)
    h, v, b = shape.hidden_size, shape.vocab_size, dtype_bytes
    emb = _kernel(hw, tokens * h * b * 2, 0)
    head = _gemm(hw, (v // tp) * h * b + batch * (h + v // tp) * b, 2.0 * batch * (v // tp) * h, True, batch)
    st.compute += emb + head + _kernel(hw, 2 * batch * h * b, 0) + _kernel(hw, batch * v * 4, 0)
    st.overhead = hw.kernel_overhead * kernels_per_step(L, fuse, extra_layer_kernels, fused_t is not None)

    if tp > 1:
        ag_algo = coll.resolve(allgather) if allgather else algo
        ar = coll.allreduce(algo, hw, nodes, gpn, vol.allreduce_bytes)
        if not prefill:  # decode runs as one CUDA graph: part of the latency may hide behind the GEMM before
            ar = ar.hiding_latency(hw.latency_hidden(algo))
        n_fused = ROW_PARALLEL_GEMMS_PER_LAYER * L if fused_t is not None else 0
        ar = ar.scale(vol.allreduce_count - n_fused)
        if fuse and fused_t is None:  # the residual add + RMSNorm inside the 2L row-parallel all-reduces
            ar = ar + coll.Cost(latency=FUSED_NORMS_PER_LAYER * L * tokens * hw.ar_norm_row_latency)
        ag = coll.allgather(ag_algo, hw, nodes, gpn, vol.allgather_bytes)
        st.comm += ar.total + ag.total
        if fused_t is not None:
            st.comm += L * fused_t
            st.detail["fused_linear_allreduce"] = L * fused_t
        st.comm_inter += ar.inter + ag.inter
        st.net_bytes += (vol.allreduce_count * coll.network_bytes(algo, nodes, gpn, vol.allreduce_bytes, hw)
                         + coll.network_bytes(ag_algo, nodes, gpn, vol.allgather_bytes, hw) / 2)
        st.detail["allreduce"] = ar.total
        st.detail["allgather"] = ag.total
    if pp > 1:
        act = tokens * h * b
        p2p = 0.0
        for s in range(1, pp):
            cross = layout.boundary_crosses_node(s, hw.gpus_per_node)
            c = coll.p2p(hw, 2 * act, inter=cross, impl=impl)
            p2p += c.total
            st.comm_inter += c.inter
            st.net_bytes += tp * 2 * act if cross else 0
        back_cross = layout.gpus > hw.gpus_per_node
        back = coll.p2p(hw, batch * 8, inter=back_cross, impl=impl)
        st.net_bytes += batch * 8 if back_cross else 0
        p2p += back.total
        st.comm_inter += back.inter
        st.comm += p2p
        st.detail["p2p"] = p2p
    return st


def memory_per_gpu(shape: ModelShape, layout: Layout, batch: int, max_len: int, dtype_bytes: int = 2) -> float:
    """Bytes of weights + KV cache on the most loaded GPU (a stage with ceil(L/pp) layers, embedding and head)."""
    layers = -(-shape.num_hidden_layers // layout.pp)
    lin = sum(shape.layer_linear_params().values()) // layout.tp
    emb = shape.vocab_size * shape.hidden_size // layout.tp
    # with pp > 1 the embedding and the head live on different stages
    n_emb = 1 if (layout.pp > 1 or shape.tie_word_embeddings) else 2
    weights = (layers * lin + n_emb * emb) * dtype_bytes
    kv = batch * max_len * layers * 2 * _local_kv_heads(shape, layout.tp) * shape.head_dim * dtype_bytes
    return float(weights + kv)


@dataclass
class Prediction:
    """One (layout, all-reduce, batch) point of `predict`."""

    layout: Layout
    allreduce: str
    batch: int
    decode: StepTime  # at the mean context prompt + gen/2
    prefill: StepTime
    memory_bytes: float
    fits: bool
    ttft: float  # seconds until every sequence of the batch has its first token

    @property
    def token_latency(self) -> float:
        """Seconds between two generated tokens of one sequence."""
        return self.decode.total

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the batch (no pipeline micro-batching)."""
        return self.batch / self.decode.total


def predict(shape: ModelShape, hw: Hardware, layouts: list[Layout], allreduces: list[str], batches: list[int],
            prompt: int, gen: int, dtype_bytes: int = 2, memory_fraction: float = 0.9,
            fuse_norm: bool = False, fused_linear: bool = False) -> list[Prediction]:
    """Every combination of layout x all-reduce x batch. Layouts with tp == 1 get one row (no all-reduce).
    `fuse_norm`: decode steps run each row-parallel all-reduce fused with its RMSNorm (see `step_time`).
    `fused_linear`: decode steps run o_proj and down_proj as the fused linear_allreduce kernel at the profile's
    measured time where it has one (see `step_time`)."""
    if prompt < 1 or gen < 1:
        raise ValueError(f"prompt and gen must be >= 1, got {prompt}, {gen}")
    out = []
    for lay in layouts:
        algos = allreduces if lay.tp > 1 else [allreduces[0]]
        for algo in algos:
            for bsz in batches:
                dec = step_time(shape, lay, hw, batch=bsz, context=prompt + gen / 2, prefill=False,
                                allreduce=algo, dtype_bytes=dtype_bytes, fuse_norm=fuse_norm,
                                fused_linear=fused_linear)
                pre = step_time(shape, lay, hw, batch=bsz, context=prompt, prefill=True, allreduce=algo,
                                dtype_bytes=dtype_bytes)
                mem = memory_per_gpu(shape, lay, bsz, prompt + gen, dtype_bytes)
                ttft = pre.total
                if lay.pp > 1 and bsz > 1:
                    # sequences flow through the stages as micro-batches: fill the pipe once, then one
                    # stage time per further sequence
                    one = step_time(shape, lay, hw, batch=1, context=prompt, prefill=True, allreduce=algo,
                                    dtype_bytes=dtype_bytes).total
                    ttft = min(ttft, one * (1 + (bsz - 1) / lay.pp))
                out.append(Prediction(lay, coll.resolve(algo), bsz, dec, pre, mem,
                                      mem <= memory_fraction * hw.memory_bytes, ttft))
    return out


def _label(p: Prediction) -> str:
    return p.layout.name + (f" with {p.allreduce}" if p.layout.tp > 1 else "")


def recommend(preds: list[Prediction]) -> list[str]:
    """One line per batch size: the fastest fitting layout for decode and why."""
    lines = []
    for bsz in sorted({p.batch for p in preds}):
        rows = [p for p in preds if p.batch == bsz]
        fit = [p for p in rows if p.fits] or rows
        best = min(fit, key=lambda p: p.token_latency)
        why = [f"batch {bsz}: use {_label(best)}: {best.token_latency * 1e3:.2f} ms/token, "
               f"TTFT {best.ttft * 1e3:.1f} ms"]
        if not best.fits:
            why.append("(no layout fits in GPU memory; needs more GPUs)")
        others = {}
        for p in fit:
            if p.layout != best.layout and (p.layout not in others or p.token_latency <
                                             others[p.layout].token_latency):
                others[p.layout] = p
        for p in sorted(others.values(), key=lambda p: p.token_latency)[:2]:
            reason = (f"communication is {p.decode.comm_share:.0%} of its step"
                      if p.decode.comm_share > 0.3 else
                      f"its {p.layout.pp} stages run one after another" if p.layout.pp > best.layout.pp else
                      "each layer's weight reads are split over fewer GPUs")
            why.append(f"{p.token_latency / best.token_latency:.2f}x slower with {p.layout.name}: {reason}")
        why.append(f"{best.layout.name} spends {best.decode.comm_share:.0%} of a decode step communicating")
        first = min(fit, key=lambda p: p.ttft)
        if first.ttft < 0.67 * best.ttft:
            why.append(f"for time to first token prefer {_label(first)} "
                       f"({first.ttft * 1e3:.1f} ms vs {best.ttft * 1e3:.1f} ms)")
        lines.append("; ".join(why))
    return lines
