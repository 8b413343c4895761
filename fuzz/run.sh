#!/usr/bin/env bash
# Builds Keel's fuzz targets with libFuzzer on stable Rust (the flags `cargo fuzz build -s none`
# uses; cargo-fuzz itself is not needed), checks the seed corpora, and fuzzes each target for a
# bounded time. scripts/test.sh (and so CI) runs it; docs/fuzzing.md has the long-run recipes.
#
#   fuzz/run.sh [SECONDS] [TARGET...]   fuzz each target SECONDS (default 20; 0: replay corpus)
#   fuzz/run.sh --seeds [TARGET...]     (re)write the seed corpora in fuzz/corpus/
#
# KEEL_FUZZ_SANITIZER=address builds with AddressSanitizer (a nightly flag: RUSTC_BOOTSTRAP=1 is
# set for that build). New corpus entries go to fuzz/work/<target>, a crashing input to
# fuzz/artifacts/<target>/ (and as Base64 in the output); a crash fails the run.
set -euo pipefail
cd "$(dirname "$0")"

write_seeds=false
if [ "${1:-}" = --seeds ]; then
  write_seeds=true
  shift
  seconds=0
else
  seconds=${1:-20}
  shift || true
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in src/bin/*.rs; do
    targets+=("$(basename "$f" .rs)")
  done
fi
sanitizer=${KEEL_FUZZ_SANITIZER:-none}
start=$SECONDS

# Not --locked: a dependency added to crates/ lands in fuzz/Cargo.lock without failing CI.
echo "keel: fuzz: cargo fmt --check, cargo clippy"
cargo fmt -- --check
cargo clippy --quiet --all-targets -- -D warnings

triple=$(rustc -vV | sed -n 's/^host: //p')
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  --cfg fuzzing
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Ccodegen-units=1
)
case "$sanitizer" in
  none) ;;
  address)
    flags+=(-Zsanitizer=address)
    export RUSTC_BOOTSTRAP=1 ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"
    ;;
  *) echo "keel: fuzz: KEEL_FUZZ_SANITIZER is none or address" >&2; exit 2 ;;
esac
echo "keel: fuzz: building ${targets[*]} (sanitizer $sanitizer)"
# --target keeps the instrumentation off build scripts; each sanitizer has its own target dir.
RUSTFLAGS="${flags[*]} ${RUSTFLAGS:-}" cargo build --quiet --release --target "$triple" \
  --target-dir "target/$sanitizer" "${targets[@]/#/--bin=}"
echo "keel: fuzz: checked and built in $((SECONDS - start)) s"
bin="target/$sanitizer/$triple/release"

# One target: seeds checked, then fuzzed; prints one summary line, fails on a crash.
fuzz_one() {
  local t=$1
  # The seeds must still give what they claim, and be the ones committed.
  local seeds
  seeds=$(mktemp -d)
  if ! KEEL_FUZZ_WRITE_SEEDS="$seeds" "$bin/$t" >"$seeds/log" 2>&1; then
    grep -v '^WARNING: Failed to find function' "$seeds/log" >&2
    echo "keel: fuzz: $t: a seed no longer gives what it claims (see its seeds())" >&2
    return 1
  fi
  local s
  for s in "$seeds/$t"/*; do
    if ! cmp -s "$s" "corpus/$t/$(basename "$s")"; then
      echo "keel: fuzz: corpus/$t/$(basename "$s") is stale: run fuzz/run.sh --seeds $t" >&2
      return 1
    fi
  done
  rm -rf "$seeds"

  mkdir -p "work/$t" "artifacts/$t"
  local log="work/$t.log" run=(-max_total_time="$seconds")
  if [ "$seconds" -eq 0 ]; then
    run=(-runs=0)
  fi
  if ! "$bin/$t" "${run[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="artifacts/$t/" "work/$t" "corpus/$t" >"$log" 2>&1; then
    grep -v '^ *at \|^WARNING: Failed to find function' "$log" | tail -n 40 >&2
    echo "keel: fuzz: $t FAILED; input in fuzz/artifacts/$t/ (and as Base64 above); log fuzz/$log" >&2
    return 1
  fi
  local runs secs cov corpus
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
  corpus=$(ls "work/$t" "corpus/$t" | wc -l)
  if [ "$seconds" -eq 0 ]; then
    echo "keel: fuzz: $t ok: replayed $runs inputs, ${cov:-cov: ?}"
  else
    echo "keel: fuzz: $t ok: $runs runs in ${secs:-?} s ($((runs / ${secs:-1})) exec/s), ${cov:-cov: ?}, corpus $corpus"
  fi
}

if $write_seeds; then
  for t in "${targets[@]}"; do
    KEEL_FUZZ_WRITE_SEEDS=corpus "$bin/$t" 2>&1 | grep -v '^WARNING: Failed to find function'
  done
  exit 0
fi

# As many targets at once as there are cores (KEEL_FUZZ_JOBS to change it).
jobs=${KEEL_FUZZ_JOBS:-$(nproc)}
echo "keel: fuzz: ${#targets[@]} targets, ${seconds} s each, $jobs at a time"
failed=0
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || failed=1
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
echo "keel: fuzz: done in $((SECONDS - start)) s"
exit "$failed"
