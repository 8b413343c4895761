#!/usr/bin/env bash
# Quick start, second command: the whole test suite. Installs what is missing, checks
# formatting and lints, then runs every unit and whole-system test (the latter boot real
# guests on /dev/kvm; set KEEL_REQUIRE_KVM=1 to make a missing /dev/kvm a failure, as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "keel: cargo fmt --check"
cargo fmt --all -- --check
echo "keel: cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "keel: building the probe guest"
make -s -C guest/probe OUT="$PWD/target/probe"
fuzz/run.sh "${KEEL_FUZZ_SECONDS:-20}" # every fuzz target, bounded (docs/fuzzing.md)
echo "keel: the web console (npm ci, tsc, esbuild), then its API document and types against the daemon's"
scripts/build-console.sh
cargo build --locked -p keel
node web/scripts/check-api.mjs target/debug/keel
echo "keel: cargo test"
cargo test --workspace --locked
