#!/usr/bin/env bash
# One 2-GPU device call: LL all-reduce correctness + latency, linear with/without PDL, decode A/B of PDL.
# Usage from the repo root on 2xH200:  OUT=dir bash bench/gpu_pdl_ll.sh   (results and logs under $OUT)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}; mkdir -p "$OUT"; W=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
log=$OUT/gpu_pdl_ll_log.txt
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date; } > "$log"
echo "== linear (GPU0) + kernel GPU tests (GPU1)" | tee -a "$log"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/kernels.py --out "$W" --parts linear --models 8b,70b --tps 2 \
  --ms 1,8,32 --quick --reps 8 > "$W/kernels_linear.log" 2>&1 &
kp=$!
CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_linear.py \
  tests/test_kernels_norm_rope_embedding.py tests/test_kernels_attention.py tests/test_kernels_sampling.py 2>&1 \
  | tail -5 | tee -a "$log"
wait $kp; tail -20 "$W/kernels_linear.log" | tee -a "$log"
echo "== comm GPU tests (LL included), 2000 graph replays" | tee -a "$log"
timeout 200 torchrun --nproc-per-node 2 tests/test_comm_gpu.py --replays 2000 2>&1 | grep -v Warning | tail -25 | tee -a "$log"
echo "== all-reduce bench" | tee -a "$log"
timeout 150 torchrun --nproc-per-node 2 bench/allreduce.py --out "$W" 2>&1 | grep -v Warning | tail -14 | tee -a "$log"
echo "== decode 8B TP2 b1 ctx512, PDL on / off" | tee -a "$log"
for pdl in 1 0; do
  FUSEDLIS_PDL=$pdl timeout 150 torchrun --nproc-per-node 2 bench/decode.py --models llama-3.1-8b --batch 1 \
    --context 512 --modes nccl,auto,fused --steps 40 --tag pdl$pdl --out "$W" 2>&1 | grep -v Warning | tail -8 | tee -a "$log"
done
tar czf "$OUT/gpu_pdl_ll_results.tgz" -C "$W" .
ls -la "$W" | tee -a "$log"
