#!/usr/bin/env bash
# One device call: engine GPU tests (1 and 2 GPUs) + decode benchmark. Results under $OUT (or bench/results).
# Usage on a 2-GPU machine, from the repo root:  bash bench/gpu_engine.sh [full]   (default: 8B only, 40 steps)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
FINAL=${OUT:-bench/results}
OUT=$(mktemp -d)  # everything lands here, then one archive + the log go to $FINAL (the device returns <= 8 files)
mkdir -p "$FINAL"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export FUSEDLIS_ARTIFACT_DIR=$OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu_engine_log.txt"
[ "${SKIP_TESTS:-0}" = 1 ] || {
  echo "== single-GPU engine + model tests"
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_engine_gpu.py tests/test_model_triton.py 2>&1 | tail -15
  echo "== 2-GPU engine test (all allreduce modes)"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_engine_multigpu.py 2>&1 | tail -30
} 2>&1 | tee -a "$OUT/gpu_engine_log.txt"
steps=40; models=llama-3.1-8b
[ "${1:-}" = full ] && { steps=100; models=llama-3.1-8b,llama-3.1-70b; }
echo "== decode bench TP=1" | tee -a "$OUT/gpu_engine_log.txt"
CUDA_VISIBLE_DEVICES=0 timeout 300 torchrun --nproc-per-node 1 bench/decode.py --models llama-3.1-8b --steps $steps \
  --modes torch,nccl --hf --breakdown --out "$OUT" 2>&1 | grep -v Warning | tail -40 | tee -a "$OUT/gpu_engine_log.txt"
echo "== decode bench TP=2" | tee -a "$OUT/gpu_engine_log.txt"
timeout 420 torchrun --nproc-per-node 2 bench/decode.py --models $models --steps $steps --breakdown --out "$OUT" \
  2>&1 | grep -v Warning | tail -60 | tee -a "$OUT/gpu_engine_log.txt"
ls -la "$OUT"
cp "$OUT/gpu_engine_log.txt" "$FINAL/"
tar czf "$FINAL/gpu_engine_results.tgz" -C "$OUT" .
