#!/usr/bin/env bash
# Idempotent machine setup for building and testing otel-tcpstates.
# Installs only what is missing, so a second run takes seconds.
#   scripts/setup.sh          toolchains + bpf-linker (enough to build and run)
#   scripts/setup.sh --test   also the packages the test suite uses
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
channel_of() { sed -n 's/^channel *= *"\(.*\)"/\1/p' "$1"; }
STABLE=$(channel_of "$root/rust-toolchain.toml")
NIGHTLY=$(channel_of "$root/otel-tcpstates-ebpf/rust-toolchain.toml")
BPF_LINKER_VERSION=0.13.0

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (use --test)" >&2; exit 2 ;;
  esac
done

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v rustup >/dev/null; then
  echo "setup.sh: rustup is required (https://rustup.rs)" >&2
  exit 1
fi

have_toolchain() { rustup toolchain list | grep -q "^$1"; }

if ! have_toolchain "$STABLE"; then
  log "installing Rust $STABLE"
  rustup toolchain install "$STABLE" --profile minimal --component clippy,rustfmt
else
  # A toolchain installed elsewhere with --profile minimal may lack these.
  rustup component add --toolchain "$STABLE" clippy rustfmt >/dev/null 2>&1 || true
fi

if ! have_toolchain "$NIGHTLY" || ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
  log "installing $NIGHTLY with rust-src (builds the eBPF program)"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
fi

# bpf-linker must link against the same LLVM as the nightly that emits the bitcode.
nightly_sysroot=$(rustup run "$NIGHTLY" rustc --print sysroot)
libllvm=$(find "$nightly_sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*' | head -n1)
if [[ -z "$libllvm" ]]; then
  echo "setup.sh: no libLLVM.so.* in $nightly_sysroot/lib; is $NIGHTLY installed with the full rustc component?" >&2
  exit 1
fi
llvm_prefix="${CARGO_HOME:-$HOME/.cargo}/otel-tcpstates-llvm"
stamp="$llvm_prefix/bpf-linker.stamp"
want_stamp="$BPF_LINKER_VERSION $(basename "$libllvm")"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]] || ! command -v bpf-linker >/dev/null; then
  log "building bpf-linker $BPF_LINKER_VERSION against $(basename "$libllvm")"
  mkdir -p "$llvm_prefix/lib"
  ln -sf "$libllvm" "$llvm_prefix/lib/libLLVM.so"
  LLVM_PREFIX="$llvm_prefix" cargo +"$STABLE" install bpf-linker --version "$BPF_LINKER_VERSION" --locked --force
  echo "$want_stamp" >"$stamp"
fi

if [[ $want_test -eq 1 ]]; then
  # Every program a test runs, with the Debian package that brings it. A new
  # machine of this kind lacks some (bpftool, iptables): they are installed here,
  # and whatever is still missing afterwards is named in one line before any test
  # runs. setpriv and unshare let the tests drop privileges and unmount tracefs in
  # a private namespace; systemd-analyze and strace check the systemd unit and the
  # daemon's system calls; iptables drops and rejects loopback packets; bpftool
  # reads the programs' recursion_misses (tests/losses.rs); ip makes the network
  # namespaces and tc reads their links; curl, python3 and timeout are clients and
  # servers in the tests, node the instrumented app in tests/apps/node (npm installs
  # its packages below).
  tools=(
    setpriv:util-linux unshare:util-linux mount:mount timeout:coreutils
    bash:bash sh:dash systemd-analyze:systemd strace:strace iptables:iptables
    bpftool:bpftool ip:iproute2 tc:iproute2 curl:curl python3:python3
    node:nodejs npm:npm
  )
  missing_tools() {
    local entry
    for entry in "${tools[@]}"; do
      command -v "${entry%%:*}" >/dev/null || echo "${entry%%:*}:${entry#*:}"
    done
  }
  mapfile -t missing < <(missing_tools)
  if ((${#missing[@]})); then
    packages=$(printf '%s\n' "${missing[@]#*:}" | sort -u | tr '\n' ' ')
    log "installing $packages"
    # shellcheck disable=SC2086 # one word per package
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages; } ||
      log "could not install $packages"
    mapfile -t missing < <(missing_tools)
    if ((${#missing[@]})); then
      echo "setup.sh: the tests need ${missing[*]%%:*}, not installed (Debian packages: $(printf '%s\n' "${missing[@]#*:}" | sort -u | tr '\n' ' ' | sed 's/ $//')); install them and run again" >&2
      exit 1
    fi
  fi

  # Python packages go into fixed directories of their own with `pip --target`
  # (which also sidesteps PEP 668, an externally managed system Python); the tests
  # find them there. pip_into DIR WHAT [pip arguments...] installs into a fresh DIR.
  pip_into() {
    local dir=$1 what=$2
    shift 2
    if ! python3 -m pip --version >/dev/null 2>&1; then
      log "installing python3-pip"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
    fi
    log "installing $what into $dir"
    rm -rf "$dir"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
      --target "$dir" "$@"
  }

  # rotel, a third-party OTLP collector, for the interoperability tests. The PyPI
  # wheel only carries its binary; tests/support/rotel.rs runs
  # $rotel_dir/rotel/rotel-agent.
  ROTEL_VERSION=0.0.1a15
  rotel_dir="${CARGO_HOME:-$HOME/.cargo}/otel-tcpstates-rotel"
  if [[ ! -x "$rotel_dir/rotel/rotel-agent" || ! -d "$rotel_dir/rotel-$ROTEL_VERSION.dist-info" ]]; then
    pip_into "$rotel_dir" "rotel $ROTEL_VERSION" --no-deps "rotel==$ROTEL_VERSION"
  fi

  # kubernetes-validate checks deploy/kubernetes against the Kubernetes API schemas,
  # which its wheel carries (no cluster, no download at test time);
  # tests/kubernetes.rs runs it with PYTHONPATH=$kv_dir.
  KUBERNETES_VALIDATE_VERSION=1.37.0
  kv_dir="${CARGO_HOME:-$HOME/.cargo}/otel-tcpstates-kubernetes-validate"
  if [[ ! -d "$kv_dir/kubernetes_validate-$KUBERNETES_VALIDATE_VERSION.dist-info" ]]; then
    pip_into "$kv_dir" "kubernetes-validate $KUBERNETES_VALIDATE_VERSION" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi

  # The OpenTelemetry Python SDK and its OTLP/HTTP exporter, for the instrumented
  # applications in tests/apps/ whose W3C traceparent headers the tests follow
  # into span links, with the instrumentations of the requests library and of
  # aiohttp's client (their 0.xxbN release goes with the SDK's 1.xx.N; 1.45.2's
  # 0.66b2 has no aiohttp-client release, so both stay at 1.45.1/0.66b1) and
  # requests and aiohttp themselves for tests/apps/traced_requests.py and
  # tests/apps/traced_aiohttp.py; the tests run them with PYTHONPATH=$otel_py_dir.
  OTEL_PYTHON_VERSION=1.45.1
  OTEL_PYTHON_CONTRIB_VERSION=0.66b1
  REQUESTS_VERSION=2.34.2
  AIOHTTP_VERSION=3.14.5
  otel_py_dir="${CARGO_HOME:-$HOME/.cargo}/otel-tcpstates-python"
  if [[ ! -d "$otel_py_dir/opentelemetry_sdk-$OTEL_PYTHON_VERSION.dist-info" ||
        ! -d "$otel_py_dir/opentelemetry_exporter_otlp_proto_http-$OTEL_PYTHON_VERSION.dist-info" ||
        ! -d "$otel_py_dir/opentelemetry_instrumentation_requests-$OTEL_PYTHON_CONTRIB_VERSION.dist-info" ||
        ! -d "$otel_py_dir/opentelemetry_instrumentation_aiohttp_client-$OTEL_PYTHON_CONTRIB_VERSION.dist-info" ||
        ! -d "$otel_py_dir/requests-$REQUESTS_VERSION.dist-info" ||
        ! -d "$otel_py_dir/aiohttp-$AIOHTTP_VERSION.dist-info" ]]; then
    pip_into "$otel_py_dir" \
      "opentelemetry-sdk $OTEL_PYTHON_VERSION, opentelemetry-instrumentation-requests and -aiohttp-client $OTEL_PYTHON_CONTRIB_VERSION" \
      "opentelemetry-sdk==$OTEL_PYTHON_VERSION" \
      "opentelemetry-exporter-otlp-proto-http==$OTEL_PYTHON_VERSION" \
      "opentelemetry-instrumentation-requests==$OTEL_PYTHON_CONTRIB_VERSION" \
      "opentelemetry-instrumentation-aiohttp-client==$OTEL_PYTHON_CONTRIB_VERSION" \
      "requests==$REQUESTS_VERSION" \
      "aiohttp==$AIOHTTP_VERSION"
  fi

  # The OpenTelemetry JS SDK and its http instrumentation, for
  # tests/apps/node/traced_node.js: `npm ci` of the lock file there, into a
  # directory of its own outside the repository (a clean clone has no
  # node_modules); the tests run the app with NODE_PATH=$otel_node_dir/node_modules.
  # A copy of the lock file it was installed from says whether it is current.
  otel_node_dir="${CARGO_HOME:-$HOME/.cargo}/otel-tcpstates-node"
  node_app="$root/tests/apps/node"
  if ! cmp -s "$node_app/package-lock.json" "$otel_node_dir/installed-package-lock.json" ||
     [[ ! -d "$otel_node_dir/node_modules" ]]; then
    log "installing the OpenTelemetry JS SDK into $otel_node_dir"
    rm -rf "$otel_node_dir"
    mkdir -p "$otel_node_dir"
    cp "$node_app/package.json" "$node_app/package-lock.json" "$otel_node_dir/"
    (cd "$otel_node_dir" && npm ci --no-audit --no-fund --loglevel=error) >&2
    cp "$node_app/package-lock.json" "$otel_node_dir/installed-package-lock.json"
  fi
fi

# The tracer mounts tracefs itself; doing it here too keeps bpftool and friends usable.
if [[ $EUID -eq 0 ]] && ! mountpoint -q /sys/kernel/tracing 2>/dev/null; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "could not mount tracefs (the tracer will try again)"
fi

log "ready"
