#!/usr/bin/env bash
# Loopback connection-churn benchmark (see BENCHMARKS.md): untraced, otel-tcpstates
# printing text and exporting OTLP/gRPC, libbpf-tools tcpstates, then a memory run;
# and span links off vs on (churn, bulk transfer, wrk against nginx); sampling's
# savings; the incident programs' cost and what they handle over a lossy link.
# Needs root. Arguments go to the benchmark, e.g.
#   scripts/bench.sh --seconds 20 --runs baseline,otlp,baseline
#   scripts/bench.sh --runs links
#   scripts/bench.sh --runs incidents --link-rounds 4
#   scripts/bench.sh --runs h2c --link-rounds 5 --link-seconds 4
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $EUID -ne 0 ]]; then
  echo "bench.sh: needs root (loads eBPF, reads bpftool statistics, sets sysctls)" >&2
  exit 1
fi

scripts/setup.sh --test

# The peer tracer, the statistics reader, and the links runs' HTTP server and load
# generators, wrk and h2load (the bench starts nginx itself, from its own configuration).
missing=()
[[ -x /usr/sbin/tcpstates ]] || missing+=(libbpf-tools)
command -v bpftool >/dev/null || missing+=(bpftool)
[[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
if ((${#missing[@]})); then
  echo "[bench] installing ${missing[*]}" >&2
  # No service may start from the install (nginx's would take port 80 and stay):
  # the standard policy-rc.d hook, only for the install's duration.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  status=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } || status=$?
  if ((own_policy)); then rm -f "$policy"; fi
  ((status == 0)) || exit "$status"
fi

# The benchmark sets these for its runs and restores them itself; this covers it
# being interrupted or killed.
stats_enabled=$(sysctl -n kernel.bpf_stats_enabled)
tw_buckets=$(sysctl -n net.ipv4.tcp_max_tw_buckets)
trap 'sysctl -qw kernel.bpf_stats_enabled="$stats_enabled" net.ipv4.tcp_max_tw_buckets="$tw_buckets"' EXIT

# `cargo bench` builds the daemon with the bench profile (release).
cargo bench -p otel-tcpstates --bench churn -- "$@"
