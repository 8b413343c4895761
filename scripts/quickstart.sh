#!/usr/bin/env bash
# Quick start, first command: installs what is missing, builds Keel and the probe guest, and
# boots the probe with its serial console in this terminal. Ctrl-A x quits.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "keel: building (cargo build --release)"
cargo build --release -p keel
make -s -C guest/probe OUT="$PWD/target/probe"
echo "keel: booting the probe guest with 2 vCPUs: it reports what it was given, then idles."
echo "keel: Ctrl-A x quits. Try also: --cmdline probe.poweroff"
exec target/release/keel run --kernel target/probe/probe.elf --cpus 2 --memory 256 "$@"
