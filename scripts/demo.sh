#!/usr/bin/env bash
# The compose demo without Docker: Jaeger v2 and the OpenTelemetry Collector
# running collector-config/agent.yaml, both built from Go modules by
# scripts/backends.sh, and the tracer, all native on this host and on loopback.
# Extra arguments go to the tracer, e.g. `scripts/demo.sh --links -P 443`.
# Ctrl-C stops all three; their logs stay in the directory it prints.
#
# Jaeger built from its Go module serves a placeholder page instead of its UI
# (the UI is a separate JavaScript build): look at the traces through its query
# API, e.g.
#   curl -s 'http://127.0.0.1:16686/api/traces?service=otel-tcpstates&limit=5'
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $EUID -ne 0 ]]; then
  echo "demo.sh: the tracer loads eBPF programs and needs root: sudo scripts/demo.sh" >&2
  exit 1
fi
scripts/setup.sh >&2
cargo build --release --locked --quiet -p otel-tcpstates --bin otel-tcpstates \
  2> >(grep -v '^warning: otel-tcpstates@' >&2)
mapfile -t backends < <(scripts/backends.sh | tail -n 2)
collector=${backends[0]}
jaeger=${backends[1]}

logs=$(mktemp -d /tmp/otel-tcpstates-demo.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait; echo "logs: $logs" >&2' EXIT

# Jaeger takes OTLP on 14317 (the collector has 4317), answers queries on 16686.
JAEGER_OTLP_GRPC=127.0.0.1:14317 JAEGER_OTLP_HTTP=127.0.0.1:14318 \
  "$jaeger" --config deploy/jaeger/config.yaml >"$logs/jaeger.log" 2>&1 &
# agent.yaml, with its endpoints on loopback and traces to this Jaeger only
# (there is no Tempo here, and the tracer's counters stay home: no Prometheus).
"$collector" --config collector-config/agent.yaml \
  --set=receivers.otlp.protocols.grpc.endpoint=127.0.0.1:4317 \
  --set=receivers.otlp.protocols.http.endpoint=127.0.0.1:4318 \
  --set=extensions.health_check.endpoint=127.0.0.1:13133 \
  --set='service.telemetry.metrics.readers=[{pull: {exporter: {prometheus: {host: 127.0.0.1, port: 8888}}}}]' \
  --set=exporters.otlp_grpc/jaeger.endpoint=127.0.0.1:14317 \
  --set='service.pipelines.traces.exporters=[otlp_grpc/jaeger]' \
  >"$logs/collector.log" 2>&1 &

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 14317 16686 4317; do
  for _ in $(seq 100); do
    listening "$port" && break
    sleep 0.1
  done
  listening "$port" || { echo "demo.sh: nothing listens on 127.0.0.1:$port; see $logs" >&2; exit 1; }
done

cat >&2 <<EOF
demo: collector (agent.yaml) on 127.0.0.1:4317, Jaeger's query API on 127.0.0.1:16686
  services:        curl -s http://127.0.0.1:16686/api/services
  recent traces:   curl -s 'http://127.0.0.1:16686/api/traces?service=otel-tcpstates&limit=5'
  one trace:       curl -s http://127.0.0.1:16686/api/traces/<trace id>
  (Jaeger built from its module shows a placeholder page instead of its UI)
  collector health: curl -s http://127.0.0.1:13133/   logs: $logs
EOF
OTEL_METRICS_EXPORTER=none target/release/otel-tcpstates \
  --otlp-endpoint http://127.0.0.1:4317 --otlp-protocol grpc "$@"
