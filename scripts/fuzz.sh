#!/usr/bin/env bash
# `make fuzz`: every cargo fuzz target (fuzz/fuzz_targets/) for FUZZ_SECONDS each (default 30),
# from its committed seed corpus (fuzz-targets/corpus/<target>/, read only: what libFuzzer adds
# goes to a scratch directory outside the checkout). Prints executions and crashes per target,
# writes bench/results/fuzz.json (FUZZ_RESULTS=<file>: there instead; `make test` writes
# target/fuzz.json), and exits non-zero if any target crashed. FUZZ_TARGETS="a b" runs only those. A crash's input is kept in fuzz/artifacts/<target>/ (README.md, "Fuzzing":
# how it becomes a regression test).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${TAPESTRY_CACHE:-$HOME/.cache/tapestry}"
SECONDS_EACH="${FUZZ_SECONDS:-30}"
RESULTS="${FUZZ_RESULTS:-bench/results/fuzz.json}"
cd "$ROOT"
command -v cargo-fuzz >/dev/null || export PATH="$PATH:$(ls -d "$CACHE"/cargo-fuzz-*/bin 2>/dev/null | tail -n1)"
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing (make setup installs it)" >&2; exit 1; }

if [ -n "${FUZZ_TARGETS:-}" ]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/tapestry-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

# One build of every target (release, debug assertions, AddressSanitizer: cargo fuzz's defaults);
# the first one takes minutes (fuzz/target, its own target directory).
echo "building the fuzz targets (cargo +nightly fuzz build)" >&2
cargo +nightly fuzz build

results=()
failed=()
printf '%-20s %8s %14s %8s\n' target seconds executions crashes
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  start=$(date +%s)
  rc=0
  cargo +nightly fuzz run "$t" "$scratch/$t" "fuzz-targets/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -print_final_stats=1 -timeout=10 >"$log" 2>&1 || rc=$?
  took=$(( $(date +%s) - start ))
  # Fuzzing time as libFuzzer counts it (cargo fuzz run rebuilds first when a source changed).
  fuzzed=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n1)
  [ -n "$fuzzed" ] && took=$fuzzed
  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n1)
  [ -n "$execs" ] || execs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n1)
  [ -n "$execs" ] || execs=0
  crashes=0
  artifact=""
  if [ "$rc" != 0 ] && ! grep -q '^INFO: Seed:' "$log"; then
    # Not a crash: the target did not start (a build error, most likely).
    tail -n 20 "$log" >&2
    echo "fuzz: $t did not run (above: the end of its log)" >&2
    failed+=("$t (did not run)")
    continue
  fi
  if [ "$rc" != 0 ]; then
    crashes=1
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
    failed+=("$t")
    mkdir -p fuzz/artifacts && cp "$log" "fuzz/artifacts/$t.log"
  fi
  printf '%-20s %8s %14s %8s %s\n' "$t" "$took" "$execs" "$crashes" "${artifact:+ input: $artifact}"
  if [ "$rc" != 0 ]; then
    grep -m1 -E "panicked at|ERROR: |deadly signal|timeout" "$log" | sed 's/^/    /' >&2 || true
    sed -n '/panicked at/{n;p}' "$log" | head -n 3 | sed 's/^/    /' >&2 || true
  fi
  results+=("$(printf '"%s": {"seconds": %s, "executions": %s, "crashes": %s, "input": "%s"}' \
    "$t" "$took" "$execs" "$crashes" "$artifact")")
done

mkdir -p "$(dirname "$RESULTS")"
{
  printf '{\n  "fuzz_seconds_per_target": %s,\n  "targets": {\n' "$SECONDS_EACH"
  for i in "${!results[@]}"; do
    sep=","
    [ "$i" = $(( ${#results[@]} - 1 )) ] && sep=""
    printf '    %s%s\n' "${results[$i]}" "$sep"
  done
  printf '  }\n}\n'
} >"$RESULTS"
echo "wrote $RESULTS" >&2

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashed: ${failed[*]} (inputs and logs in fuzz/artifacts/; reproduce with" \
    "cargo +nightly fuzz run <target> <input>)" >&2
  exit 1
fi
