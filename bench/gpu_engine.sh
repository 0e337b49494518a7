#!/usr/bin/env bash
# One 2-GPU device call (2xH200): engine GPU tests and the end-to-end decode benchmark of issue 6, all under one
# deadline, results packed into $OUT (the device returns at most 8 files). From the repo root:
#     bash bench/gpu_engine.sh
# Order (what the deadline cuts first is last):
#   A  in parallel: GPU0 single-GPU engine/model tests, then TP=1 8B (torch reference, fusedlis nccl, breakdown);
#      GPU1 TP=1 8B Hugging Face transformers (static cache, torch.compile; eager if compile fails)
#   B  TP=2 8B: torch reference, fusedlis nccl / nvrar (1 and 2 logical nodes) / fused, breakdown
#   C  TP=2 8B transformers with tp_plan="auto" (compiled; eager if compile fails)
#   D  2-GPU engine test (every allreduce mode against the fp32 reference)
#   E  TP=2 70B: fusedlis nccl / fused / nvrar (2 logical nodes), torch reference (10 steps)
#   then one merged CSV + PNG + summary and one merged breakdown.
# Each run writes its CSV after every row, so a part cut by its timeout keeps what it measured. Estimated (not yet
# measured here): install 15 s, A 110-150 s (transformers compiles twice), B ~140 s, C 110-130 s, D ~90 s, E ~90 s
# without its torch reference: E is the part most likely cut by the deadline; ONLY=E reruns it alone (~2.5 min).
# Knobs: BUDGET_S (default 530 s for the whole script), ONLY (e.g. ONLY=E,D reruns those parts), STEPS (8B, default
# 100), REF_STEPS (8B torch reference, default 100), STEPS_70B (default 30), HF_EAGER_STEPS (default 30).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
START=$(date +%s)
BUDGET_S=${BUDGET_S:-530}
RESERVE_S=15  # for the summary and packing at the end
ONLY=${ONLY:-A,B,C,D,E}
STEPS=${STEPS:-100}
REF_STEPS=${REF_STEPS:-100}
STEPS_70B=${STEPS_70B:-30}
HF_EAGER_STEPS=${HF_EAGER_STEPS:-30}
FINAL=${OUT:-bench/results}
R=$(mktemp -d)  # everything lands here; $FINAL gets the merged results, the log and one archive
mkdir -p "$FINAL"
LOG="$R/gpu_engine_log.txt"
export START BUDGET_S RESERVE_S R

want() { [[ ",$ONLY," == *",$1,"* ]]; }

# step NAME CAP_S CMD...: run CMD under `timeout` of min(CAP_S, what the deadline leaves), output to $R/NAME.log,
# its tail to stdout; returns CMD's status (124/137 on timeout, 125 when skipped for the deadline).
step() {
  local name=$1 cap=$2 t t0 rc
  shift 2
  t=$(( BUDGET_S - RESERVE_S - ($(date +%s) - START) ))
  (( t > cap )) && t=$cap
  if (( t < 30 )); then
    echo "== $name: skipped, ${t}s left before the deadline"
    return 125
  fi
  echo "== $name (timeout ${t}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" >"$R/$name.log" 2>&1
  rc=$?
  grep -v -E "Warning|warn\(|_warn_once|^W[0-9]{4} |\*{20}|OMP_NUM_THREADS|it/s\]|s/it\]|Loading weights" \
    "$R/$name.log" | tail -n "${TAIL:-40}" | cut -c1-300
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  return $rc
}

DECODE="bench/decode.py --out $R --batch 1,8,32,64 --context 512,4096"
{
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | tail -1
  export FUSEDLIS_ARTIFACT_DIR=$R

  if want A; then
    (
      step tests_1gpu 90 env CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider \
        tests/test_engine_gpu.py tests/test_model_triton.py
      step tp1_fusedlis 200 env CUDA_VISIBLE_DEVICES=0 python3 $DECODE --models llama-3.1-8b --modes torch,nccl \
        --steps "$STEPS" --ref-steps "$REF_STEPS" --breakdown
    ) >"$R/phaseA_gpu0.txt" 2>&1 &
    gpu0=$!
    (
      # half the host's cores for inductor's compile workers, so the GPU0 runs (the eager torch reference is
      # launch-bound) keep theirs
      export TORCHINDUCTOR_COMPILE_THREADS=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))
      step tp1_hf 240 env CUDA_VISIBLE_DEVICES=1 python3 $DECODE --models llama-3.1-8b --modes none --hf \
        --steps "$STEPS" --tag 8b-hf \
        || step tp1_hf_eager 120 env CUDA_VISIBLE_DEVICES=1 python3 $DECODE --models llama-3.1-8b --modes none \
          --hf --hf-compile none --ref-steps "$HF_EAGER_STEPS" --tag 8b-hf-eager
    ) >"$R/phaseA_gpu1.txt" 2>&1
    wait $gpu0
    cat "$R/phaseA_gpu0.txt" "$R/phaseA_gpu1.txt"
  fi
  want B && step tp2_8b 200 torchrun --nproc-per-node 2 $DECODE --models llama-3.1-8b \
    --modes torch,nccl,auto,nvrar,fused --nvrar-nodes ${NVRAR_NODES:-1,2} --steps "$STEPS" --ref-steps "$REF_STEPS" \
    --breakdown
  if want C; then
    step tp2_hf 200 torchrun --nproc-per-node 2 $DECODE --models llama-3.1-8b --modes none --hf --steps "$STEPS" \
      --tag 8b-hf \
      || step tp2_hf_eager 120 torchrun --nproc-per-node 2 $DECODE --models llama-3.1-8b --modes none --hf \
        --hf-compile none --ref-steps "$HF_EAGER_STEPS" --tag 8b-hf-eager
  fi
  want D && TAIL=20 step tests_2gpu 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine_multigpu.py
  # 70B bf16 at TP=2: 70.6 GB of weights + 43 GB of KV cache (64 x 4137 tokens) per GPU; torch reference last
  want E && step tp2_70b 220 torchrun --nproc-per-node 2 $DECODE --models llama-3.1-70b \
    --modes nccl,auto,fused,nvrar,torch --nvrar-nodes 2 --steps "$STEPS_70B" --ref-steps 10 --breakdown

  echo "== summary (all runs)"
  python3 bench/decode.py --summarize "$R"/decode_tp*.csv "$R"/decode_breakdown_tp*.csv --out "$R" 2>&1 | tail -60
  echo "== total $(( $(date +%s) - START )) s"
} 2>&1 | tee "$LOG"

cp "$LOG" "$FINAL/"
cp "$R"/decode_all_* "$R"/decode_breakdown_all_* "$FINAL/" 2>/dev/null
tar czf "$FINAL/gpu_engine_results.tgz" -C "$R" .
ls -la "$FINAL"
