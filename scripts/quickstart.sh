#!/usr/bin/env bash
# Quick start, first command: installs what is missing, builds Keel and the probe guest, and
# boots the probe with its serial console in this terminal. Ctrl-A x quits.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "keel: building the web console (web/, npm)"
scripts/build-console.sh
echo "keel: building (cargo build --release)"
cargo build --release -p keel
make -s -C guest/probe OUT="$PWD/target/probe"
# Two vCPUs unless the arguments say otherwise.
defaults=(--cpus 2)
for arg in "$@"; do
  case "$arg" in --cpus|--cpus=*) defaults=() ;; esac
done
echo "keel: booting the probe guest: it reports what it was given, then idles (Ctrl-A x quits)."
echo "keel: try also: scripts/quickstart.sh --cpus 4 --cmdline probe.poweroff"
exec target/release/keel run --kernel target/probe/probe.elf "${defaults[@]}" "$@"
