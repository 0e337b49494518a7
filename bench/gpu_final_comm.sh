#!/usr/bin/env bash
# One 2-GPU device call: comm GPU correctness (10,000 graph replays), all-reduce benchmark, then
# bench/gpu_tune_multi.sh (attention, allreduce, fused tuning). Everything lands in $OUT/gpu_final_comm.tgz + log.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G
export PYTHONUNBUFFERED=1
FINAL=${OUT:-bench/results}; mkdir -p "$FINAL"; W=$(mktemp -d); log=$FINAL/gpu_final_comm_log.txt
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date -u; git rev-parse --short HEAD; } > "$log"
echo "== comm GPU tests, 10000 graph replays" | tee -a "$log"
timeout 150 torchrun --nproc-per-node 2 tests/test_comm_gpu.py --replays 10000 > "$W/comm_gpu_test.log" 2>&1
grep -v -i warn "$W/comm_gpu_test.log" | grep -E "graph|sweep|PASS|FAIL|timeout|Error" | tail -16 | tee -a "$log"
echo "== all-reduce bench" | tee -a "$log"
timeout 170 torchrun --nproc-per-node 2 bench/allreduce.py --out "$W" > "$W/allreduce_bench.log" 2>&1
grep -v -i warn "$W/allreduce_bench.log" | grep -E " B auto|Error" | tail -12 | tee -a "$log"
if [ "${TUNE_S:-250}" != 0 ]; then
  echo "== tuning (attention, allreduce, fused)" | tee -a "$log"
  mkdir -p "$W/tune"
  OUT="$W/tune" TOTAL_S=${TUNE_S:-250} bash bench/gpu_tune_multi.sh 2>&1 | tail -5 | tee -a "$log"
  tail -60 "$W"/tune/tune_multi_*_summary.txt 2>/dev/null | tee -a "$log" >/dev/null
fi
tar czf "$FINAL/gpu_final_comm.tgz" -C "$W" .
ls -laR "$W" | tail -30 >> "$log"
