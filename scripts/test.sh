#!/usr/bin/env bash
# Sets up everything the tests need, then runs formatting and lint checks and the
# whole test suite. The eBPF tests need root; CI runs this as root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --test
cargo fmt --all --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
