#!/usr/bin/env bash
# Calibrate the performance model on this machine's GPUs, then validate it (issue 8). From the repo root on a
# machine with >= 2 GPUs:   OUT=/some/dir bash bench/gpu_perfmodel.sh      (about 1-2 minutes on 2xH200;
# PERFMODEL_GPU_ONLY=1 leaves out `--all` and the CPU tests)
# Calibration times NCCL, fusedlis' one-/two-shot in the flag and LL protocols, NVRAR LL on <N> logical nodes of
# 1 GPU and the all-reduce + RMSNorm kernel; the profile gets per-variant (alpha, beta) incl. the LL ones.
# It also times the fused GEMM + all-reduce + residual + RMSNorm kernel (linear_allreduce, the engine's fused mode)
# on the Llama 8B/70B TP=2 row-parallel shapes at M = 1, 8, 32, 64 (raw rows kind=fused_linear, with the cuBLAS
# GEMM alone beside each); the profile's `fused_linear_allreduce` table then costs fused-mode decode steps.
# Any failure there is a note in the profile's sources, not an error. Not yet run on a GPU (docs/perfmodel.md).
# CPU dry run of everything after calibration: PERFMODEL_RAW=some_calibrate_raw.csv OUT=dir bash bench/gpu_perfmodel.sh
# (no GPU needed: the profile is fitted from that raw file by the current code instead of measured).
# Writes into $OUT (at most 7 files; everything else is in perfmodel_extras.tgz):
#   gpu_perfmodel_log.txt                 every command and its output
#   calibrated_<N>x<gpu>_<date>.json      the fitted profile (fusedlis predict --hardware FILE)
#   calibrate_raw_<N>x<gpu>_<date>.csv    raw measurements (bench/validate_perfmodel.py --raw/--fit-from read it)
#   perfmodel_validation_new.md           new profile vs committed measurements: the newest bench/allreduce.py run
#                                         (NCCL, flag and LL one-/two-shot, NVRAR 2x1 LL, auto and auto 2x1, each
#                                         auto row with the algorithm it ran), bench/fused.py layers, and every
#                                         bench/results/decode_tp*.csv step (compute terms fitted on TP=1, and per
#                                         file on its fusedlis-nccl rows; all-reduce as each engine mode ran it)
#   perfmodel_validation_new_selfcheck.md the new raw all-reduce times, (alpha, beta) fitted on 8K/128K/1M/4M,
#                                         the other sizes held out
#   perfmodel_validation_committed.md     `--all` on the committed files (the numbers in docs/perfmodel.md)
#   perfmodel_extras.tgz                  the .csv/.png/_profile.json of each validation
set -uo pipefail
OUT=${OUT:-/tmp/gpu_perfmodel_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_perfmodel_log.txt"
: >"$LOG"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
run() {  # run TIMEOUT_S CMD...: log the command, its output and exit status; never abort the script
  local t=$1; shift
  echo "\$ $*" | tee -a "$LOG"
  timeout "$t" "$@" 2>&1 | tee -a "$LOG" | tail -40
  local rc=${PIPESTATUS[0]}
  echo "[exit $rc]" | tee -a "$LOG"
  return 0
}
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "pip install -e . failed" | tee -a "$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
else
  echo "no .whl/*.whl: fusedlis' own all-reduce needs nvshmem4py; calibrate falls back to torch symmetric memory" \
    | tee -a "$LOG"
fi
NGPU=$(timeout 60 python3 -c "import torch; print(torch.cuda.device_count())" 2>>"$LOG" || echo 0)
GPU=$(timeout 60 python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1])" 2>>"$LOG" || echo gpu)
echo "GPUs: $NGPU x $GPU" | tee -a "$LOG"
TAG="${NGPU}x${GPU}_$(date -u +%Y-%m-%d)"
PROF="$OUT/calibrated_$TAG.json"
RAW="$OUT/calibrate_raw_$TAG.csv"
if [ -n "${PERFMODEL_RAW:-}" ]; then  # dry run: no measurement, the profile refitted from an existing raw file
  TAG="dryrun_$(date -u +%Y-%m-%d)"; PROF="$OUT/calibrated_$TAG.json"; RAW="$OUT/calibrate_raw_$TAG.csv"
  cp "$PERFMODEL_RAW" "$RAW"
  run 60 python3 -c "import sys; from fusedlis.perfmodel.calibrate import read_raw_csv, profile_from_measurements
from fusedlis.perfmodel.hardware import get_hardware, save_profile
save_profile(profile_from_measurements(read_raw_csv(sys.argv[1]), get_hardware('h200-ndr')), sys.argv[2])" "$RAW" "$PROF"
elif [ "$NGPU" -ge 2 ]; then
  # all-reduces timed with bench/allreduce.py's method (fusedlis.perfmodel.timing: 100 calls per graph, median of
  # 30 replays, max over ranks): --iters 100 --replays 30 are calibrate's defaults
  # (450 s: the fused-kernel timings and their Triton compiles come on top of the 1-2 minutes before them)
  run 450 torchrun --nproc-per-node "$NGPU" -m fusedlis calibrate --out "$PROF" --raw "$RAW"
else
  echo "calibrate needs >= 2 GPUs for the NVLink terms; found $NGPU" | tee -a "$LOG"
fi

R=bench/results
AR=$(ls $R/allreduce_[0-9]*x*.csv 2>/dev/null | sort -t_ -k3 | tail -1)  # not allreduce_stability_*
FUSED=$(grep -l cublas_gemm_only $R/fused_*.csv 2>/dev/null | tr '\n' ' ')
DEC=$(ls $R/decode_tp*.csv 2>/dev/null | tr '\n' ' ')
V="python3 bench/validate_perfmodel.py"
if [ -s "$PROF" ]; then
  # shellcheck disable=SC2086
  ONLY=nccl,fusedlis_one_shot,fusedlis_two_shot,fusedlis_auto,fusedlis_one_shot_ll,fusedlis_two_shot_ll
  ONLY=$ONLY,fusedlis_nvrar_2x1_ll,fusedlis_auto_2x1
  run 90 $V --profile "$PROF" --allreduce $AR --only $ONLY --layer $FUSED --decode $DEC --decode-fit-tp 1 \
    --decode-fit-system fusedlis-nccl --out-prefix "$OUT/perfmodel_validation_new"
fi
if [ -s "$RAW" ]; then
  run 60 $V --fit-from "$RAW" --out-prefix "$OUT/perfmodel_validation_new_selfcheck"
  mv "$OUT/perfmodel_validation_new_selfcheck_profile.json" "$OUT/perfmodel_validation_new_selfcheck_fit.json" 2>/dev/null
fi
# --all rewrites bench/results/perfmodel_validation_*: keep them, copy the summary lines out.
# PERFMODEL_GPU_ONLY=1 skips this and the tests (CPU work on committed files; run them on any machine).
if [ -z "${PERFMODEL_GPU_ONLY:-}" ]; then
  run 120 $V --all
  { for f in $R/perfmodel_validation_*.md; do echo "## $f"; grep -E "^- (held-out|profile|fit):" "$f"; done; } \
    >"$OUT/perfmodel_validation_committed.md"
  run 60 python3 -m pytest -q -p no:cacheprovider tests/test_perfmodel.py tests/test_perfmodel_cli.py \
    tests/test_perfmodel_props.py tests/test_perfmodel_timing.py tests/test_perfmodel_fused.py
fi

cd "$OUT" && tar czf perfmodel_extras.tgz --remove-files $(ls | grep -E '^perfmodel_validation_new.*\.(csv|png|json)$') \
  2>>"$LOG"
echo "done in $(( $(date +%s) - T0 )) s; files in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
