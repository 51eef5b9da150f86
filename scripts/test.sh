#!/usr/bin/env bash
# Sets up everything the tests need, then runs formatting and lint checks and the
# whole test suite. The eBPF tests need root; CI runs this as root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
# The real Collector and Jaeger for tests/pipelines.rs, built from Go modules
# (cached: seconds once built; the first time, several minutes).
scripts/backends.sh >/dev/null
cargo fmt --all --check
# Lint checks need no eBPF object: skipping its build here saves one of the three.
AYA_BUILD_SKIP=1 cargo clippy --all-targets --locked -- -D warnings
# The load, overload and shutdown tests run the daemon as users build it, release
# (tests/support's release_bin finds it up to date).
cargo build --release --locked -p otel-tcpstates --bin otel-tcpstates
cargo test --locked
