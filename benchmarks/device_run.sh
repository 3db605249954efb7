#!/usr/bin/env bash
# One device call: build with CUDA, run the tests (CUDA cases included), compute-sanitizer over
# the CUDA kernel tests, then the benchmarks. Logs and JSON land in $OUT (or ./device_out).
#   bash benchmarks/device_run.sh [pytest -k expression for the benchmarks]
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
BENCH_FILTER=${1:-}
TESTS=${TESTS:-tests}
BENCHES=${BENCHES:-benchmarks}
SANITIZE=${SANITIZE:-tests/test_interpolate_tokens.py}

step() { echo; echo "=== $* ($(date +%T))"; }

step build
if ! python3 -m pip install -e . --no-build-isolation --no-deps -v > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
grep -E "\[vpit_fast build\]" "$OUT/build.log"
python3 -m vpit_fast info | tee "$OUT/info.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
step tests
python3 -X faulthandler -m pytest $TESTS -v -rf -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "pytest exit: $?"
grep -E "FAILED|Fatal|Segmentation|passed|failed" "$OUT/tests.log" | tail -25
grep -B3 "Fatal Python error" "$OUT/tests.log" | head -20

# racecheck is slow on the big cross-entropy rows: it runs over a smaller selection.
MEMCHECK_K=${MEMCHECK_K:-"cuda and not compile and not opcheck and not large"}
RACECHECK_K=${RACECHECK_K:-"cuda and not compile and not opcheck and not large"}
for tool in memcheck racecheck; do
  step "compute-sanitizer $tool"
  k=$MEMCHECK_K; [ $tool = racecheck ] && k=$RACECHECK_K
  compute-sanitizer --tool $tool --error-exitcode 1 --print-limit 20 \
    python3 -m pytest $SANITIZE -q -p no:cacheprovider -k "$k" 2>&1 \
    | tail -6 | tee "$OUT/sanitizer_$tool.log"
  echo "compute-sanitizer $tool exit: ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer_$tool.log"
done

fi
[ -n "${SKIP_BENCH:-}" ] && exit 0
step benchmarks
python3 -m pytest $BENCHES -q -p no:cacheprovider ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
  --benchmark-json "$OUT/bench.json" --benchmark-columns=median,rounds 2>&1 | grep -vE "^(-|=|Name|\s*$)" | tail -8
python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/bench.md"
