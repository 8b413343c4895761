#!/usr/bin/env bash
# Builds the web console (web/) into web/dist, which the next cargo build embeds in keel:
# installs the locked npm packages, type-checks, bundles.
set -euo pipefail
cd "$(dirname "$0")/../web"
npm ci --no-audit --no-fund --loglevel=error
npx tsc --noEmit
node scripts/build.mjs
