# Sourced by the one-call device scripts (gpu_norm_engine.sh, gpu_put.sh) after they set START, BUDGET_S,
# PARTS and R: `want X` (is part X in PARTS) and `step NAME CAP CMD...` (run CMD with timeout min(CAP, time
# left), log to $R/NAME.log, print its last ${TAIL:-$STEP_TAIL} filtered lines).
want() { [[ ",$PARTS," == *",$1,"* ]]; }
step() {
  local name=$1 cap=$2 t; shift 2
  t=$(( BUDGET_S - 15 - ($(date +%s) - START) )); (( t > cap )) && t=$cap
  if (( t < 25 )); then echo "== $name: skipped (${t}s left)"; return 125; fi
  echo "== $name (timeout ${t}s): $*"; local t0=$(date +%s)
  timeout -k 10 "$t" "$@" >"$R/$name.log" 2>&1; local rc=$?
  grep -v -E "Warning|warn\(|_warn_once|^W[0-9]{4} |\*{20}|OMP_NUM_THREADS|it/s\]|s/it\]" "$R/$name.log" \
    | tail -n "${TAIL:-${STEP_TAIL:-30}}" | cut -c1-240
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"; return $rc
}
