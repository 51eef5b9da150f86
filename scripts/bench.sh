#!/usr/bin/env bash
# Loopback connection-churn benchmark (see BENCHMARKS.md): untraced, otel-tcpstates
# printing text and exporting OTLP/gRPC, libbpf-tools tcpstates, then a memory run.
# Needs root. Arguments go to the benchmark, e.g.
#   scripts/bench.sh --seconds 20 --runs baseline,otlp,baseline
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $EUID -ne 0 ]]; then
  echo "bench.sh: needs root (loads eBPF, reads bpftool statistics, sets sysctls)" >&2
  exit 1
fi

scripts/setup.sh --test

# The peer tracer and the statistics reader.
missing=()
[[ -x /usr/sbin/tcpstates ]] || missing+=(libbpf-tools)
command -v bpftool >/dev/null || missing+=(bpftool)
if ((${#missing[@]})); then
  echo "[bench] installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# The benchmark sets these for its runs and restores them itself; this covers it
# being interrupted or killed.
stats_enabled=$(sysctl -n kernel.bpf_stats_enabled)
tw_buckets=$(sysctl -n net.ipv4.tcp_max_tw_buckets)
trap 'sysctl -qw kernel.bpf_stats_enabled="$stats_enabled" net.ipv4.tcp_max_tw_buckets="$tw_buckets"' EXIT

# `cargo bench` builds the daemon with the bench profile (release).
cargo bench -p otel-tcpstates --bench churn -- "$@"
