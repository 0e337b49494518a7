#!/usr/bin/env bash
# One 2-GPU call: tune decode attention on GPU 0, then the all-reduce algorithm and the fused GEMM +
# all-reduce on both GPUs (torchrun), for llama-3.1-8b at TP=2, batches 1,8,32,64 (and, if time is left,
# the llama-3.1-70b o/down fused shapes). Writes at most 8 files into $OUT (default bench/results).
set -uo pipefail

usage() {
  cat <<'EOF'
usage: bench/gpu_tune_multi.sh [--fake]      (run from anywhere; needs 2 GPUs unless --fake)

Writes into $OUT (default bench/results):
  tune_<gpu>_llama-3.1-8b_tp2_attention.{csv,png}       per shape: default (before), tuned (after), tuned via
  tune_<gpu>_llama-3.1-8b_tp2_allreduce+fused.{csv,png} the launcher's own cache lookup, and SDPA / NCCL /
                                                        cuBLAS+NCCL, all CUDA-graph timed
  tune_multi_<gpu>_summary.txt    console tables of every part + a before/after check
  tuning_<gpu>.json               the tuning cache (use with FUSEDLIS_TUNING_FILE=...)
  tune_multi_<gpu>_extras.tgz     70B fused results, per-part stderr logs
Each part runs under `timeout`; the whole script stays under TOTAL_S (default 290) seconds.
  --fake   CPU dry run with the synthetic timer (gloo ranks; numbers are NOT measurements), into a temp dir
EOF
}

cd "$(dirname "$0")/.."
FAKE=0
case "${1:-}" in
  --fake) FAKE=1 ;;
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "gpu_tune_multi.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
esac

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
START=$SECONDS
TOTAL_S=${TOTAL_S:-290}
PY="${PYTHON:-python3}"
if [[ $FAKE == 1 ]]; then
  OUT_DIR="${OUT:-$(mktemp -d -t fusedlis-tune-multi.XXXXXX)}"
  GPU=fake
  FAKE_ARG=(--fake-timer)
  export CUDA_VISIBLE_DEVICES=""
else
  OUT_DIR="${OUT:-bench/results}"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed" >&2
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >/dev/null 2>&1 || echo "nvshmem4py wheels did not install: fusedlis AllReduce falls back to NCCL" >&2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [[ $NGPU -lt 2 ]]; then
    echo "gpu_tune_multi.sh: needs 2 CUDA devices, found $NGPU (use --fake for a CPU dry run)" >&2
    exit 2
  fi
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
  FAKE_ARG=()
fi
mkdir -p "$OUT_DIR"
W=$(mktemp -d -t fusedlis-tune-multi-work.XXXXXX)
CACHE="$W/tuning_${GPU}.json"
SUMMARY="$W/tune_multi_${GPU}_summary.txt"
{ echo "# gpu_tune_multi.sh on ${GPU}, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null)$([[ -n $(git status --porcelain 2>/dev/null) ]] && echo +dirty)"
  [[ $FAKE == 1 ]] && echo "# FAKE timer: synthetic numbers, not measurements"
  "$PY" -c "import torch, triton; print('# torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$SUMMARY"

left() { echo $(( TOTAL_S - (SECONDS - START) )); }

# part NAME LIMIT_S CMD... : run under timeout, console to the summary, stderr to its own log
part() {
  local name=$1 limit=$2; shift 2
  local budget; budget=$(left)
  (( limit > budget - 5 )) && limit=$(( budget - 5 ))
  if (( limit < 20 )); then
    echo -e "\n## $name: SKIPPED (only ${budget}s left)" >> "$SUMMARY"
    return 0
  fi
  echo -e "\n## $name (timeout ${limit}s)" >> "$SUMMARY"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$SUMMARY" 2> "$W/${name}.stderr.log"
  local rc=$?
  echo "## $name: exit $rc after $(( SECONDS - t0 ))s$([[ $rc == 124 ]] && echo ' (TIMED OUT)')" >> "$SUMMARY"
  tail -5 "$W/${name}.stderr.log" | sed 's/^/#   stderr: /' >> "$SUMMARY"
}

COMMON=(--tp 2 --batch 1,8,32,64 --out "$CACHE" --no-progress "${FAKE_ARG[@]}")
B8="$W/tune_${GPU}_llama-3.1-8b_tp2"
# Attention is a single-GPU kernel: tuned on GPU 0 alone (TP=2 shapes per rank).
ATTN_DEV=0
[[ $FAKE == 1 ]] && ATTN_DEV=""
CUDA_VISIBLE_DEVICES=$ATTN_DEV part attention "${ATTN_S:-90}" "$PY" -m fusedlis.tuning.cli --model llama-3.1-8b \
  --ops attention "${COMMON[@]}" --csv "${B8}_attention.csv" --plot "${B8}_attention.png"
part allreduce_fused_8b "${MULTI_S:-150}" "$PY" -m torch.distributed.run --nproc-per-node 2 \
  -m fusedlis.tuning.cli --model llama-3.1-8b --ops allreduce,fused "${COMMON[@]}" \
  --csv "${B8}_allreduce+fused.csv" --plot "${B8}_allreduce+fused.png"
B70="$W/tune_${GPU}_llama-3.1-70b_tp2"
part fused_70b "${F70_S:-90}" "$PY" -m torch.distributed.run --nproc-per-node 2 \
  -m fusedlis.tuning.cli --model llama-3.1-70b --ops fused --layers o,down "${COMMON[@]}" \
  --csv "${B70}_fused.csv" --plot "${B70}_fused.png"

# Before/after check over every CSV: stored config never slower than the default (by construction, on
# the head-to-head timings), and the time through the launcher's own lookup against the default's.
"$PY" - "$W" >> "$SUMMARY" 2>&1 <<'EOF'
import csv, glob, os, statistics, sys
print("\n## before/after check (us; after = stored config; lookup = launcher's own cache lookup, re-timed)")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "tune_*.csv"))):
    rows = list(csv.DictReader(open(path)))
    for op in sorted({r["op"] for r in rows}):
        rs = [r for r in rows if r["op"] == op and r["status"] == "tuned"]
        other = [r for r in rows if r["op"] == op and r["status"] != "tuned"]
        if not rs:
            print(f"{os.path.basename(path)} {op}: nothing tuned ({len(other)} {other[0]['status'] if other else ''}"
                  f"{': ' + other[0]['message'][:160] if other else ''})")
            continue
        f = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else float("nan")
        slower = [r["label"] for r in rs if f(r, "tuned_us") > f(r, "default_us")]
        kept = sum(r["kept_default"] == "True" for r in rs)
        lk = [f(r, "lookup_us") / f(r, "default_us") for r in rs if r.get("lookup_us")]
        base = [f(r, "baseline_us") / f(r, "tuned_us") for r in rs if r.get("baseline_us")]
        print(f"{os.path.basename(path)} {op}: {len(rs)} tuned ({kept} kept the default), {len(other)} not; "
              f"after/before median {statistics.median(f(r, 'tuned_us') / f(r, 'default_us') for r in rs):.3f}; "
              f"after slower than before on {len(slower)} {slower}; "
              + (f"lookup/before max {max(lk):.3f} (>1.02 on {sum(x > 1.02 for x in lk)}); " if lk else "")
              + (f"speed-up vs {rs[0]['baseline']} min {min(base):.2f}x max {max(base):.2f}x" if base else ""))
EOF
echo -e "\n# total $(( SECONDS - START ))s" >> "$SUMMARY"

cp "$SUMMARY" "$OUT_DIR/"
[[ -f $CACHE ]] && cp "$CACHE" "$OUT_DIR/"
for f in "${B8}_attention.csv" "${B8}_attention.png" "${B8}_allreduce+fused.csv" "${B8}_allreduce+fused.png"; do
  [[ -f $f ]] && cp "$f" "$OUT_DIR/"
done
tar czf "$OUT_DIR/tune_multi_${GPU}_extras.tgz" -C "$W" $(cd "$W" && ls | grep -E '70b|stderr') 2>/dev/null
cat "$SUMMARY"
echo "gpu_tune_multi.sh: wrote $(ls "$OUT_DIR" | grep -cE "tune|tuning") files to $OUT_DIR" >&2
