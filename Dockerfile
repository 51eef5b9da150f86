# syntax=docker/dockerfile:1
# The otel-tcpstates image: `docker build -t otel-tcpstates .`, or let
# `docker compose up --build` do it. It needs the privileges docker-compose.yml
# gives it (CAP_BPF, CAP_PERFMON, the host's pid namespace, tracefs).

# Build with the project's own setup: scripts/setup.sh installs the pinned stable
# and nightly toolchains and builds bpf-linker against that nightly's LLVM,
# exactly as on a developer's machine. The base image only has to bring rustup
# and a C toolchain.
FROM rust:1.91-bookworm AS build
WORKDIR /src
# The toolchains and bpf-linker take most of the build's time: copy only what
# setup.sh reads first, so that layer is reused until the pins change.
COPY scripts/setup.sh scripts/setup.sh
COPY rust-toolchain.toml rust-toolchain.toml
COPY otel-tcpstates-ebpf/rust-toolchain.toml otel-tcpstates-ebpf/rust-toolchain.toml
RUN bash scripts/setup.sh
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies across
# builds; the binary is copied out of the target cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package otel-tcpstates \
    && cp target/release/otel-tcpstates /usr/local/bin/otel-tcpstates

# Run: glibc and libgcc (all the binary links) and CA certificates for https
# collectors, no shell, no package manager. Its user is root, which with the
# two capabilities compose grants can read tracefs.
FROM gcr.io/distroless/cc-debian12 AS runtime
COPY --from=build /usr/local/bin/otel-tcpstates /usr/local/bin/otel-tcpstates
ENTRYPOINT ["/usr/local/bin/otel-tcpstates"]
