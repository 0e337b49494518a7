#!/usr/bin/env bash
# One 2xH200 device call for the fused all-reduce + residual + RMSNorm (issue 5 target 2) and its use in the
# engine (issue 6): correctness on 2 GPUs, bench/fused.py all-reduce vs all-reduce+norm, engine multi-GPU tests,
# 8B TP=2 decode with the fusion on and off (+ per-kernel profile). From the repo root:
#     OUT=dir bash bench/gpu_norm_engine.sh            (PARTS=T,F,E,D by default; BUDGET_S=560)
# T: tests/test_comm_gpu.py --only norm (fused kernel vs fp64 reference, bit-identical ranks, graph replays)
# F: bench/fused.py, variants fusedlis_ar_only / fusedlis_ar+res+norm_only / fusedlis_ar+triton_res+norm_only /
#    cublas+nccl+res+norm(torch), the four TP=2 shapes, M in 1,8,32,64,128
# D: decode 8B TP=2, auto / auto-unfusednorm / nccl / fused, batch 1,8,32,64, context 512,4096, breakdown
# L: decode 70B TP=2, auto / auto-unfusednorm / nccl, batch 1,8,32,64, context 512,4096, 30 steps
# K: bench/kernels.py --parts swiglu on GPU 0 (gate_up + SwiGLU: as dispatched, cuBLAS + silu*mul, swept configs)
# A: decode 8B TP=2 auto, then auto with decode_attention merging its splits in the main kernel (FUSED_REDUCE, one launch
#    instead of two; NUM_SPLITS capped at 32) through a tuning cache written here, for an A/B against D
# G: single-GPU bf16 kernel tests (-m gpu) of G_TESTS (default: decode attention incl. the fused rope, the model
#    with Triton kernels with and without it)
# N: bench/allreduce_stability.py (NCCL latency measured repeatedly and in several ways: the spread of the method)
# D_ROUNDS=n: part D keeps every mode's engine built and alternates the modes n times (median + each round)
# R: bench/allreduce.py on this machine (copied into bench/results so part P validates against it)
# B: per-kernel breakdown (torch profiler) of 8B TP=2 batch 1 context 512 in its own process, so that D and L are
#    timed with no profiler attached (a profiled and an unprofiled run on one machine, 06:12 vs 06:16, differed by
#    -3% to +4% at batch 1; the 05:47 vs 06:08 gap of up to 9% was on different machines)
# U: decode 8B TP=2 auto again with the committed H200 tuning caches merged (FUSEDLIS_TUNING_FILE)
# P: bench/gpu_perfmodel.sh (calibrate incl. LL + norm, validate against bench/results + this run's decode CSVs),
#    its files packed into perfmodel_results.tgz
# E: tests/test_engine_multigpu.py (every allreduce mode against the fp32 reference, greedy tokens)
# X: tests/test_fused_multigpu.py, 1 node x 2 (10,000 graph replays) and 2 logical nodes x 1 (2,000)
# S: bench/fused.py --tune (the fused kernel's search space, split-K included, per shape and M in 1,8,32,64), then
#    the side-by-side variants with the picks; the picks become this copy's linear_allreduce_measured.json, so the
#    parts after S (D, L, B) run with them. S_TUNE="--tune --tune-norm" also tunes with residual + RMSNorm (the
#    engine's calls; picks keyed norm=1); S_SHAPES, S_MS, S_VARIANTS narrow the run
# FUSEDLIS_SOURCE_COMMIT=<hash> (written literally in the device command: the device's .git is stale) goes into
#    the decode CSV headers instead of the copy's commit
# DTAG: file tag of the decode CSVs (default 8b-s3, so committed files of the same date are not overwritten)
# C: `fusedlis bench` under torchrun (8B random weights, auto and fused, batch 1 and 8, context 512)
# Q: bench/l2_prefetch.py on GPU 0 (a decode GEMM after an idle kernel that prefetches its weights into L2)
# E_ENV="VAR=value ...": environment for part E (e.g. FUSEDLIS_L2_PREFETCH=1 to test the engine with L2 prefetch)
# Example, the experiments prepared on 2026-11-22 and measured at 10:12 (decode_tp2_8b-s6a_...csv):
#     PARTS=G,D D_MODES=nccl,fused,fused-norope,fused-lpdl,fused-fpdl,fused-ared D_BATCH=1,8 D_CTX=512 \
#       D_ROUNDS=3 DTAG=8b-exp OUT=dir bash bench/gpu_norm_engine.sh
# First check of the changes of 11:10-11:30 on 2026-11-22 that no GPU ran (batched prefill in the engine tests,
# Engine.time_decode under bench/decode.py, the bench CLI):
#     PARTS=G,E,C,D D_MODES=nccl,fused,fused-avec D_BATCH=1,8 D_CTX=512 D_ROUNDS=3 DTAG=8b-check OUT=dir \
#       bash bench/gpu_norm_engine.sh        (G also runs the one-launch attention with VEC_MERGE in bf16)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G
export PYTHONUNBUFFERED=1
START=$(date +%s); BUDGET_S=${BUDGET_S:-560}; PARTS=${PARTS:-T,F,D,E}; DTAG=${DTAG:-8b-s3}; B_BATCH=${B_BATCH:-1}
OUTD=${OUT:-/tmp/gpu_norm_out}; mkdir -p "$OUTD"; R=$(mktemp -d); LOG="$OUTD/gpu_norm_engine_log.txt"
STEP_TAIL=45; . "$(dirname "$0")/_gpu_step.sh"  # want, step
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  want G && TAIL=15 step gpu_kernel_tests 230 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider -m gpu \
    ${G_TESTS:-tests/test_kernels_attention.py tests/test_model_triton.py}
  want Q && TAIL=12 step l2_prefetch 150 env CUDA_VISIBLE_DEVICES=0 python3 bench/l2_prefetch.py --out "$R"
  want Q && cp "$R"/l2_prefetch_*.csv "$R"/l2_prefetch_*.png "$OUTD/" 2>/dev/null
  want K && TAIL=20 step kernels_swiglu 200 env CUDA_VISIBLE_DEVICES=0 python3 bench/kernels.py --out "$R" \
    --parts swiglu --models 8b,70b --ms 1,8,32,64 --reps 10
  want X && TAIL=12 step fused_2gpu 150 torchrun --nproc-per-node 2 tests/test_fused_multigpu.py --gpus-per-node 2 \
    --replays 10000
  want X && TAIL=12 step fused_2gpu_logical 100 torchrun --nproc-per-node 2 tests/test_fused_multigpu.py \
    --gpus-per-node 1 --replays 2000
  if want S; then
    TAIL=60 step fused_tune ${S_CAP:-330} torchrun --nproc-per-node 2 bench/fused.py --out "$R" ${S_TUNE:---tune} \
      --ms "${S_MS:-1,8,32,64}" --shapes "${S_SHAPES:-8B_o,8B_down,70B_o,70B_down}" --iters 8 \
      --variants "${S_VARIANTS:-cublas_gemm_only,cublas+nccl,cublas+symm_*,fusedlis_linear+*,fusedlis_linear_same_config,fused_auto*,fused_gemm_push_only}"
    # the picks are merged into this copy's table (a norm-only run must not drop the plain picks)
    for f in "$R"/fused_*_picks.json; do [ -f "$f" ] && python3 - "$f" triton_kernels/linear_allreduce_measured.json <<'PY' \
      && cp triton_kernels/linear_allreduce_measured.json "$OUTD/linear_allreduce_measured_merged.json" && cp "$f" "$OUTD/"
import json, sys
new, old = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
for dev, picks in new.items():
    old.setdefault(dev, {}).update(picks)
json.dump(old, open(sys.argv[2], "w"), indent=1, sort_keys=True)
print("merged", sys.argv[1], {d: len(p) for d, p in new.items()})
PY
    done
  fi
  want T && step comm_norm 150 torchrun --nproc-per-node 2 tests/test_comm_gpu.py --only norm --replays 10000
  want F && TAIL=30 step fused_norm 150 torchrun --nproc-per-node 2 bench/fused.py --out "$R" \
    --variants 'fusedlis_ar_only,fusedlis_ar+res+norm_only*,fusedlis_ar+triton_res+norm_only,cublas+nccl,cublas+nccl+res+norm(torch)'
  want F && grep -h -E "M=   1 |M=   8 |M=  64 " "$R/fused_norm.log" | grep -E "tile|only" | cut -c1-80
  want D && TAIL=90 step decode_8b ${D_CAP:-230} torchrun --nproc-per-node 2 bench/decode.py --out "$R" \
    --models llama-3.1-8b --modes "${D_MODES:-auto,auto-unfusednorm,nccl,fused}" --batch "${D_BATCH:-1,8,32,64}" \
    --context "${D_CTX:-512,4096}" --steps 100 --rounds "${D_ROUNDS:-1}" --tag "$DTAG"
  want L && TAIL=40 step decode_70b 240 torchrun --nproc-per-node 2 bench/decode.py --out "$R" \
    --models llama-3.1-70b --modes "${L_MODES:-auto,auto-unfusednorm,nccl}" --batch 1,8,32,64 --context 512,4096 --steps 30 \
    --tag "${DTAG/8b/70b}"
  if want A; then
    python3 - "$R/attn_fused_reduce.json" <<'PY'
import sys
import torch
from fusedlis.tuning.cache import make_entry, merge_entries
from fusedlis.triton_kernels.decode_attention import decode_attention_default_config, decode_attention_key
S = 4096 + 3 + 100 + 8  # bench/decode.py's max_seq_len for contexts up to 4096 and 100 steps
entries = []
for B in (1, 2, 4, 8, 16, 32, 64):
    key = decode_attention_key(B, 16, 4, 128, S, torch.bfloat16)
    cfg = decode_attention_default_config(dict(key, sms=132))
    cfg = dict(cfg, NUM_SPLITS=min(32, cfg["NUM_SPLITS"]), FUSED_REDUCE=True)
    entries.append(make_entry("decode_attention", key, cfg, note="A/B: FUSED_REDUCE"))
print("wrote", merge_entries(entries, sys.argv[1]), [e["config"] for e in entries[:2]])
PY
    TAIL=12 step decode_8b_attnbase 120 torchrun --nproc-per-node 2 \
      bench/decode.py --out "$R" --models llama-3.1-8b --modes auto --batch 1,8,32,64 --context 512,4096 --steps 100 \
      --tag "$DTAG-attnbase"
    FUSEDLIS_TUNING_FILE="$R/attn_fused_reduce.json" TAIL=12 step decode_8b_attnfr 120 torchrun --nproc-per-node 2 \
      bench/decode.py --out "$R" --models llama-3.1-8b --modes auto --batch 1,8,32,64 --context 512,4096 --steps 100 \
      --tag "$DTAG-attnfr"
  fi
  if want U; then
    python3 - "$R/tuning_merged.json" <<'PY'
import json, sys, glob
out = None
for f in sorted(glob.glob("bench/results/tuning_NVIDIA-H200_*.json")):
    d = json.load(open(f))
    if out is None:
        out = d
        continue
    for fp, v in d["devices"].items():
        tgt = out["devices"].setdefault(fp, v)
        if tgt is not v:
            for op, e in v["entries"].items():
                tgt["entries"].setdefault(op, {}).update(e)
json.dump(out, open(sys.argv[1], "w"))
print("merged tuning:", {op: len(e) for v in out["devices"].values() for op, e in v["entries"].items()})
PY
    FUSEDLIS_TUNING_FILE="$R/tuning_merged.json" TAIL=12 step decode_8b_tuned 120 torchrun --nproc-per-node 2 \
      bench/decode.py --out "$R" --models llama-3.1-8b --modes auto --batch 1,8,32,64 --context 512,4096 --steps 100 \
      --tag "$DTAG-tuned"
  fi
  want N && TAIL=60 step allreduce_stability 150 torchrun --nproc-per-node 2 bench/allreduce_stability.py --out "$R"
  if want R; then
    TAIL=25 step allreduce_bench ${R_CAP:-240} torchrun --nproc-per-node 2 bench/allreduce.py --out "$R"
    cp "$R"/allreduce_*.csv bench/results/ 2>/dev/null
  fi
  if want P; then
    cp "$R"/decode_tp2_"$DTAG"_*.csv "$R"/decode_tp2_"${DTAG/8b/70b}"_*.csv bench/results/ 2>/dev/null
    mkdir -p "$R/pm"
    TAIL=60 step perfmodel 300 env OUT="$R/pm" PERFMODEL_GPU_ONLY=${PERFMODEL_GPU_ONLY:-0} bash bench/gpu_perfmodel.sh
    tar czf "$OUTD/perfmodel_results.tgz" -C "$R/pm" .
  fi
  want E && TAIL=15 step engine_2gpu 150 env ${E_ENV:-} python3 -m pytest -q -p no:cacheprovider tests/test_engine_multigpu.py
  want C && TAIL=15 step bench_cli 150 torchrun --nproc-per-node 2 -m fusedlis bench --model llama-3.1-8b \
    --random-weights --allreduce auto,fused --batch 1,8 --context 512 --steps 50 --csv "$R/fusedlis_bench_cli.csv"
  if want B; then  # B_BATCH=1,8: one profiled run per batch size (the profile covers the first batch only)
    for bb in ${B_BATCH//,/ }; do
      TAIL=60 step breakdown_8b_b$bb ${B_CAP:-120} torchrun --nproc-per-node 2 bench/decode.py --out "$R" \
        --models llama-3.1-8b --modes "${B_MODES:-auto,nccl,fused}" --batch "$bb" --context 512 --steps 30 --breakdown \
        --tag "$DTAG-profiled-b$bb"
    done
  fi
  echo "== total $(( $(date +%s) - START )) s"
} 2>&1 | tee "$LOG"
cp "$R"/fused_*_summary.txt "$OUTD/" 2>/dev/null
python3 bench/decode.py --summarize "$R"/decode_tp2_*.csv --out "$R" >/dev/null 2>&1 && cp "$R"/decode_all_*summary.txt "$OUTD/"
tar czf "$OUTD/gpu_norm_engine_results.tgz" -C "$R" .
ls -la "$OUTD"
