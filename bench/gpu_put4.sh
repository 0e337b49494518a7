#!/usr/bin/env bash
# One 4xH200 device call for the fused kernel's NVSHMEM put rounds, two worker tests side by side:
#   GPUs 0-3: 2 logical nodes x 2 GPUs (peer stores inside a node, puts between nodes: a cluster's shape), 2,000 replays
#   then GPUs 0-1: 2 logical nodes x 1, 10,000 replays
# Each with M = 1, 5, 37 (a config compiles in ~5 s with NVSHMEM linked in). From the repo root:
#     OUT=dir bash bench/gpu_put4.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G
export PYTHONUNBUFFERED=1 FUSEDLIS_COMM_TIMEOUT_S=10
OUTD=${OUT:-/tmp/gpu_put4_out}; mkdir -p "$OUTD"; LOG="$OUTD/gpu_put4_log.txt"
{
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  nvidia-smi --query-gpu=name,memory.total --format=csv; nvidia-smi topo -m | head -6; date -u
  echo "commit ${FUSEDLIS_SOURCE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  python3 -c "import torch, triton; from fusedlis.comm.symmetric import nvshmem_available as a; \
print('torch', torch.__version__, 'triton', triton.__version__, 'nvshmem', a())"
  t0=$(date +%s)
  echo "== 2x2 put (4 GPUs), 2000 replays"
  timeout -k 10 ${CAP4:-260} torchrun --nproc-per-node 4 --master-port 29511 tests/test_fused_multigpu.py \
    --gpus-per-node 2 --transport put --replays 2000 --ms 1,5,37 > "$OUTD/fused_put_2x2.log" 2>&1
  echo "exit $? after $(( $(date +%s) - t0 )) s"
  grep -E "^\[rank|FAIL" "$OUTD/fused_put_2x2.log" | tail -12
  t0=$(date +%s)
  echo "== 2x1 put (GPUs 0,1), 10000 replays"
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 ${CAP2:-230} torchrun --nproc-per-node 2 --master-port 29512 \
    tests/test_fused_multigpu.py --gpus-per-node 1 --transport put --replays 10000 --ms 1,5,37 \
    > "$OUTD/fused_put_2x1.log" 2>&1
  echo "exit $? after $(( $(date +%s) - t0 )) s"
  grep -E "^\[rank|FAIL" "$OUTD/fused_put_2x1.log" | tail -10
} 2>&1 | tee "$LOG"
