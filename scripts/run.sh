#!/usr/bin/env bash
# Sets up the toolchains (once), builds the release binary and starts the tracer
# with the given flags, e.g. `scripts/run.sh -w` or `scripts/run.sh -L 443 -T`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh >&2
cargo build --release --locked --quiet 2> >(grep -v '^warning: otel-tcpstates@' >&2)
if [[ $EUID -ne 0 ]]; then
  exec sudo target/release/otel-tcpstates "$@"
fi
exec target/release/otel-tcpstates "$@"
