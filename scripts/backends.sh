#!/usr/bin/env bash
# Builds the backends the end-to-end tests and scripts/demo.sh run, from Go modules:
#   - the OpenTelemetry Collector distribution of collector-config/builder-config.yaml,
#     with the OpenTelemetry Collector Builder (ocb) of the manifest's release;
#   - Jaeger v2 (cmd/jaeger of github.com/jaegertracing/jaeger);
#   - Prometheus (cmd/prometheus of github.com/prometheus/prometheus), which takes
#     the tracer's metrics over OTLP as compose's does (Debian's 2.42 cannot).
# Pinned, and cached outside the checkout (every clone on this machine shares it):
# each is rebuilt only when its pin (the manifest's content, a module's version)
# or the Go version changes. Prints the binaries' paths, one per line:
# Prometheus's, then, last, the collector's and Jaeger's.
#
#   scripts/backends.sh            # build what is missing, print the paths
#   OTEL_TCPSTATES_CACHE=/x scripts/backends.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Jaeger v2's module version (v1.75.0 is Jaeger v2.12.0): the newest release the
# Go module proxy here serves as approved. docker-compose.yml runs the same
# (jaegertracing/jaeger:2.12.0).
JAEGER_MODULE=github.com/jaegertracing/jaeger
JAEGER_VERSION=v1.75.0
# Prometheus v3.5.0, compose's prom/prometheus:v3.5.0. Built without its UI's
# assets (the `builtinassets` tag needs a JavaScript build): its HTTP API is whole.
PROMETHEUS_MODULE=github.com/prometheus/prometheus
PROMETHEUS_VERSION=v0.305.0
MANIFEST=collector-config/builder-config.yaml

say() { echo "[backends] $*" >&2; }

if ! command -v go >/dev/null; then
  say "needs Go 1.26 or later on PATH (install it from https://go.dev/dl/, or your distribution's golang package)"
  exit 1
fi
# The machine's own Go, whatever go.mod files ask for; no VCS stamping (the build
# directories may sit inside a git checkout); static binaries.
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0
export GOPROXY=${GOPROXY:-https://proxy.golang.org,direct}

go_version=$(go env GOVERSION)
cache=${OTEL_TCPSTATES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/otel-tcpstates}/backends
mkdir -p "$cache"
# One build at a time per cache (test runs and clones may start it together).
exec 9>"$cache/.lock"
flock 9

# The release every collector module of the manifest is at (dist.version).
ocb_version=$(sed -n 's/^  version: *\([0-9.]*\) *$/\1/p' "$MANIFEST")
[[ -n $ocb_version ]] || { say "no dist.version in $MANIFEST"; exit 1; }

key() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

build_collector() {
  local dir=$cache/otelcol-$(key "$go_version" "$(cat "$MANIFEST")")
  local bin=$dir/otelcol-tcpstates
  if [[ -x $bin ]]; then
    echo "$bin"
    return
  fi
  local started=$SECONDS
  say "building the collector v$ocb_version (ocb; first time: several minutes)"
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  GOBIN=$cache/ocb-$ocb_version go install "go.opentelemetry.io/collector/cmd/builder@v$ocb_version"
  # ocb creates output_path itself, and only under an existing parent.
  sed "s|^dist:|dist:\n  output_path: $dir.tmp/src|" "$MANIFEST" >"$dir.tmp/manifest.yaml"
  "$cache/ocb-$ocb_version/builder" --config "$dir.tmp/manifest.yaml" >"$dir.tmp/build.log" 2>&1 || {
    tail -30 "$dir.tmp/build.log" >&2
    say "building the collector failed; the whole log: $dir.tmp/build.log"
    exit 1
  }
  mv "$dir.tmp/src/otelcol-tcpstates" "$dir.tmp/otelcol-tcpstates"
  mv "$dir.tmp" "$dir"
  say "collector built in $((SECONDS - started)) s"
  echo "$bin"
}

# A program of a module, built inside that module as released: its go.sum and
# its replace directives hold (`go install pkg@version` refuses a module with
# replaces). Arguments: name, module, version, package in the module.
build_module() {
  local name=$1 module=$2 version=$3 package=$4
  local dir=$cache/$name-$(key "$go_version" "$module@$version")
  local bin=$dir/$name
  if [[ -x $bin ]]; then
    echo "$bin"
    return
  fi
  local started=$SECONDS
  say "building $name ($module $version; first time: several minutes)"
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  local src
  src=$(go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [[ -d $src ]] || { say "go mod download $module@$version gave no source directory"; exit 1; }
  cp -r "$src" "$dir.tmp/src"
  chmod -R u+w "$dir.tmp/src"
  (cd "$dir.tmp/src" && go build -trimpath -ldflags="-s -w" -o "$dir.tmp/$name" "./$package") \
    >"$dir.tmp/build.log" 2>&1 || {
    tail -30 "$dir.tmp/build.log" >&2
    say "building $name failed; the whole log: $dir.tmp/build.log"
    exit 1
  }
  rm -rf "$dir.tmp/src"
  mv "$dir.tmp" "$dir"
  say "$name built in $((SECONDS - started)) s"
  echo "$bin"
}

collector=$(build_collector)
jaeger=$(build_module jaeger "$JAEGER_MODULE" "$JAEGER_VERSION" cmd/jaeger)
prometheus=$(build_module prometheus "$PROMETHEUS_MODULE" "$PROMETHEUS_VERSION" cmd/prometheus)
echo "$prometheus"
echo "$collector"
echo "$jaeger"
