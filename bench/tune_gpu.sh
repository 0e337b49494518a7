#!/usr/bin/env bash
# Tune the decode GEMMs and attention of llama-3.1-8b, TP=2 shapes per rank, on ONE GPU, and write the
# before/after table (CSV), chart (PNG), console log and the tuned cache file to bench/results/.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/tune_gpu.sh [--fake] [--out-dir DIR] [--ops linear,attention] [-- EXTRA fusedlis tune ARGS]

Runs `fusedlis tune --model llama-3.1-8b --tp 2 --batch 1,8,32,64` on the current GPU and writes
  DIR/tune_<gpu>_llama-3.1-8b_tp2_<ops>.csv   before (default config) / after (tuned, and tuned through
                                              the launcher's own cache lookup) / cuBLAS or SDPA, per shape
  DIR/tune_<gpu>_llama-3.1-8b_tp2_<ops>.png   the same as a chart (time relative to the default config)
  DIR/tune_<gpu>_llama-3.1-8b_tp2_<ops>.txt   the console table
  DIR/tuning_<gpu>.json                       the tuning cache (entries merge across runs)
Use the cache with:  FUSEDLIS_TUNING_FILE=DIR/tuning_<gpu>.json  (or rerun `fusedlis tune` without --out).

  --fake       CPU dry run with the synthetic cost model (no GPU; numbers are NOT measurements);
               DIR defaults to a fresh temporary folder so bench/results/ never receives fake data
  --out-dir    where to write (default bench/results)
  --ops        subset of linear,attention (default both); run them as two calls if one exceeds a time limit
  -h, --help   this text
EOF
}

cd "$(dirname "$0")/.."
FAKE=0
OUT_DIR=""
OPS="linear,attention"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fake) FAKE=1; shift ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    --ops) OPS="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tune_gpu.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
if ! "$PY" -c "import fusedlis.tuning.cli, fusedlis.triton_kernels.linear" 2>/dev/null; then
  echo "tune_gpu.sh: installing fusedlis (editable, offline)" >&2
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
fi

ARGS=(--model llama-3.1-8b --tp 2 --batch 1,8,32,64 --ops "$OPS")
if [[ $FAKE == 1 ]]; then
  OUT_DIR="${OUT_DIR:-$(mktemp -d -t fusedlis-tune-fake.XXXXXX)}"
  GPU=fake
  ARGS+=(--fake-timer)
else
  OUT_DIR="${OUT_DIR:-bench/results}"
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else '')")
  if [[ -z $GPU ]]; then
    echo "tune_gpu.sh: no CUDA device; use --fake for a CPU dry run" >&2
    exit 2
  fi
  # One GPU: TP=2 shapes per rank are tuned here; no process group is needed for linear/attention.
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
fi
mkdir -p "$OUT_DIR"
BASE="$OUT_DIR/tune_${GPU}_llama-3.1-8b_tp2_${OPS//,/+}"
"$PY" -m fusedlis.tuning.cli "${ARGS[@]}" --out "$OUT_DIR/tuning_${GPU}.json" \
  --csv "$BASE.csv" --plot "$BASE.png" "${EXTRA[@]}" | tee "$BASE.txt"
rc=${PIPESTATUS[0]}
echo "tune_gpu.sh: wrote $BASE.{csv,png,txt} and $OUT_DIR/tuning_${GPU}.json (exit $rc)" >&2
exit "$rc"
