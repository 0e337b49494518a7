#!/usr/bin/env bash
# One 2xH200 device call for the fused GEMM + all-reduce's NVSHMEM put-with-signal inter-node rounds (the transport
# between hosts), run over NVLink as 2 logical nodes x 1 GPU, next to the peer-store rounds. From the repo root:
#     OUT=dir bash bench/gpu_put.sh          (PARTS=X,F,E,D,L by default; BUDGET_S=560)
# X: tests/test_fused_multigpu.py 2x1 with --transport put (M 1,5,37: ~5 s a compile with NVSHMEM linked in; 10,000
#    graph replays), then ptr 2x1 and 1x2 (1,000); X1: the put test alone
# F: bench/fused.py --gpus-per-node 1 --put: cuBLAS + NCCL, fused (peer stores), fused (puts), four TP=2 shapes
# E: tests/test_engine_multigpu.py -k tp2 (every allreduce mode, fused with FUSEDLIS_FUSED_TRANSPORT=put included)
# D: decode 8B TP=2: fused (1 node), fused-ln (2 logical nodes, peer stores), fused-ln-put (2 logical nodes, puts)
# L: bench/launch_floor.py on GPU 0 (the cost of one launch per GEMM for a pure weight stream)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G
export PYTHONUNBUFFERED=1
START=$(date +%s); BUDGET_S=${BUDGET_S:-560}; PARTS=${PARTS:-X,F,E,D,L}; DTAG=${DTAG:-8b-put}
OUTD=${OUT:-/tmp/gpu_put_out}; mkdir -p "$OUTD"; R=$(mktemp -d); LOG="$OUTD/gpu_put_log.txt"
. "$(dirname "$0")/_gpu_step.sh"  # want, step
{
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  nvidia-smi --query-gpu=name,clocks.sm,memory.total --format=csv; date -u
  echo "commit ${FUSEDLIS_SOURCE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
  python3 -c "import torch, triton; from fusedlis.comm.symmetric import nvshmem_available as a; \
print('torch', torch.__version__, 'triton', triton.__version__, 'nvshmem', a())"
  if want X || want X1; then
    TAIL=8 FUSEDLIS_COMM_TIMEOUT_S=5 step fused_put_2x1 ${XP_CAP:-300} torchrun --nproc-per-node 2 \
      tests/test_fused_multigpu.py --gpus-per-node 1 --transport put --replays 10000 --ms "${XP_MS:-1,5,37}"
    want X && TAIL=6 step fused_ptr_2x1 80 torchrun --nproc-per-node 2 tests/test_fused_multigpu.py --gpus-per-node 1 \
      --replays 1000
    want X && TAIL=6 step fused_ptr_1x2 80 torchrun --nproc-per-node 2 tests/test_fused_multigpu.py --gpus-per-node 2 \
      --replays 1000
  fi
  want F && TAIL=70 step fused_bench 170 torchrun --nproc-per-node 2 bench/fused.py --out "$R" --gpus-per-node 1 --put \
    --ms "${F_MS:-1,8,32,64}" --shapes 8B_o,8B_down,70B_o,70B_down --iters 8 \
    --variants 'cublas+nccl,fused_auto,fused_auto+res+norm,fused_put_auto,fused_put_auto+res+norm'
  want E && TAIL=14 FUSEDLIS_ARTIFACT_DIR="$R" step engine_2gpu 150 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_engine_multigpu.py -k tp2
  want D && TAIL=40 step decode_8b 150 torchrun --nproc-per-node 2 bench/decode.py --out "$R" \
    --models llama-3.1-8b --modes "${D_MODES:-fused,fused-ln,fused-ln-put}" --batch "${D_BATCH:-1,8}" \
    --context 512 --steps 100 --rounds "${D_ROUNDS:-2}" --tag "$DTAG"
  want L && [ -f bench/launch_floor.py ] && TAIL=30 CUDA_VISIBLE_DEVICES=0 step launch_floor 120 \
    python3 bench/launch_floor.py --out "$R"
  echo "total $(( $(date +%s) - START )) s"
} 2>&1 | tee "$LOG"
cp "$LOG" "$R/"
tar czf "$OUTD/gpu_put_results.tgz" -C "$R" .
ls -la "$R" | tail -30
