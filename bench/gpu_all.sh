#!/usr/bin/env bash
# One 2-GPU device call: kernel GPU tests + kernel benchmark (GPU 0), then engine tests + decode benchmark.
# Everything is archived into $OUT (the device returns at most 8 files).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
FINAL=${OUT:-bench/results}
K=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
{
  echo "== kernel GPU tests (bf16)"
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_*.py 2>&1 | tail -25
  echo "== kernel bench"
  CUDA_VISIBLE_DEVICES=0 timeout ${KBENCH_S:-200} python3 bench/kernels.py --out "$K" ${KBENCH_ARGS:-} 2>&1 | tail -60
} 2>&1 | tee "$K/kernels_gpu_log.txt"
tar czf "$FINAL/kernels_results.tgz" -C "$K" .
cp "$K/kernels_gpu_log.txt" "$FINAL/"
[ "${SKIP_ENGINE:-0}" = 1 ] || bash bench/gpu_engine.sh
