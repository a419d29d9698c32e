#!/usr/bin/env bash
# The test command from README.md: every test of every crate, in release mode (the stress and
# migration tests move real memory; debug builds make them slow, not different).
set -euo pipefail
cd "$(dirname "$0")/.."
# Print the kernel's capabilities first: tests that need a feature skip loudly, and this says why.
cargo run --release -q -p precopy-cli -- probe || echo "precopy probe: engine not usable here; dependent tests will report SKIP"
# Every crate unless the caller names some (`scripts/test.sh -p precopy-transfer`): cargo's
# `--workspace` would override `-p`.
scope=(--workspace)
for a in "$@"; do
    case "$a" in -p | --package | -p* | --package=*) scope=() ;; esac
done
exec cargo test "${scope[@]}" --release "$@"
