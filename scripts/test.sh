#!/usr/bin/env bash
# The test command from README.md: every test of every crate, in release mode (the stress and
# migration tests move real memory; debug builds make them slow, not different).
set -euo pipefail
cd "$(dirname "$0")/.."
# Print the kernel's capabilities first: tests that need a feature skip loudly, and this says why.
cargo run --release -q -p precopy-cli -- probe || echo "precopy probe: engine not usable here; dependent tests will report SKIP"
exec cargo test --workspace --release "$@"
