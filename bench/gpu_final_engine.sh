#!/usr/bin/env bash
# One 2-GPU device call: decode benchmark parts B (8B TP=2), D (engine multi-GPU tests), E (70B TP=2) of
# bench/gpu_engine.sh, then the comm GPU correctness test (LL protocols included, 10,000 graph replays).
set -uo pipefail
FINAL=${OUT:-bench/results}; mkdir -p "$FINAL"
ONLY=${ONLY:-B,D,E} BUDGET_S=${BUDGET_S:-390} REF_STEPS=${REF_STEPS:-30} NVRAR_NODES=2 bash bench/gpu_engine.sh \
  2>&1 | tail -70
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
echo "== comm GPU tests, 10000 graph replays"
timeout ${COMM_S:-170} torchrun --nproc-per-node 2 tests/test_comm_gpu.py --replays 10000 > "$FINAL/comm_gpu_test_log.txt" 2>&1
echo "exit $?"
grep -v -i "warn\|^W1" "$FINAL/comm_gpu_test_log.txt" | tail -14
