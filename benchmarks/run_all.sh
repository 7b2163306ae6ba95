#!/usr/bin/env bash
# Run every CPU benchmark of issue 6 one after the other and print a summary of their results.
#
#   bash benchmarks/run_all.sh            # about 15-20 minutes on 2 CPU cores
#   bash benchmarks/run_all.sh --quick    # fewer rounds (about 8 minutes), for a smoke run
#
# Each benchmark's full output goes to $OUT (default: a new folder under /tmp); the summary lists every
# RESULT line (measured value, target, PASS/FAIL). Exits 1 when any target is missed or a script fails.
# The GPU check is separate: bash benchmarks/gpu_check.sh on a CUDA machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT="${OUT:-$(mktemp -d /tmp/mft-benchmarks-XXXXXX)}"
mkdir -p "$OUT"

if [ $QUICK = 1 ]; then
  STEP="--repeats 3"; OVERHEAD="--repeats 4"; MEMORY="--repeats 1"; APPLY="--repeats 1"; EVAL="--rounds 1"
  GEN="--rounds 1 --max-gen-toks 64 --gsm8k 16"; SELECTION="--repeats 3"
else
  STEP="--repeats 5"; OVERHEAD="--repeats 8"; MEMORY="--repeats 2"; APPLY="--repeats 3"; EVAL=""; GEN=""
  SELECTION="--repeats 5"
fi

declare -a NAMES=() CODES=()
run() {  # run NAME SCRIPT ARGS...
  local name=$1; shift
  echo "== $name: $PY $*" >&2
  local start=$SECONDS
  "$PY" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s; output in $OUT/$name.txt" >&2
  NAMES+=("$name"); CODES+=("$rc")
}

run step_time benchmarks/step_time.py $STEP
run mask_overhead benchmarks/mask_overhead.py $OVERHEAD
run memory benchmarks/memory.py $MEMORY
run mask_storage benchmarks/mask_storage.py
run apply benchmarks/apply.py $APPLY
run selection benchmarks/selection.py $SELECTION
[ -f benchmarks/eval_batching.py ] && run eval_batching benchmarks/eval_batching.py $EVAL
run generation_speed benchmarks/generation_speed.py $GEN

echo
head -n 1 "$OUT/step_time.txt"
echo
echo "| benchmark | result | value | target | verdict |"
echo "| --- | --- | --- | --- | --- |"
failed=0
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}; rc=${CODES[$i]}
  if grep -q '^RESULT ' "$OUT/$name.txt"; then
    grep '^RESULT ' "$OUT/$name.txt" | sed -E 's/^RESULT (.*) = ([^ ]+) \(target (.*)\) (PASS|FAIL)$/| '"$name"' | \1 | \2 | \3 | \4 |/'
  else  # scripts without RESULT lines (eval_batching): their speed-up line (or last line) and exit status
    line=$(grep -m1 'speed-up' "$OUT/$name.txt" || tail -n 1 "$OUT/$name.txt")
    echo "| $name | ${line//|//} | - | - | $([ "$rc" = 0 ] && echo PASS || echo FAIL) |"
  fi
  [ "$rc" != 0 ] && failed=1
  if [ "$rc" != 0 ] && [ "$rc" != 1 ]; then
    echo "   ($name crashed with exit $rc; see $OUT/$name.err)" >&2
  fi
done
echo
echo "full outputs: $OUT"
exit $failed
