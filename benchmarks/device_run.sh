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
pip install -e . --no-build-isolation --no-deps -v 2>&1 | grep -E "vpit_fast build|error|Error" | tee "$OUT/build.log"
python3 -m vpit_fast info | tee "$OUT/info.txt" || exit 1

step tests
python3 -m pytest $TESTS -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.log"

for tool in memcheck racecheck; do
  step "compute-sanitizer $tool"
  compute-sanitizer --tool $tool --error-exitcode 1 --print-limit 20 \
    python3 -m pytest $SANITIZE -q -x -p no:cacheprovider -k "cuda and not compile and not opcheck" 2>&1 \
    | tail -6 | tee "$OUT/sanitizer_$tool.log"
  echo "compute-sanitizer $tool exit: ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer_$tool.log"
done

step benchmarks
python3 -m pytest $BENCHES -q -p no:cacheprovider ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
  --benchmark-json "$OUT/bench.json" --benchmark-columns=median,rounds 2>&1 | grep -vE "^(-|=|Name|\s*$)" | tail -8
python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/bench.md"
