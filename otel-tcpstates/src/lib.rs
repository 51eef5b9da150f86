//! otel-tcpstates: every TCP socket's state changes, from the kernel, as tcpstates
//! and tcplife text or OpenTelemetry traces. The binary is `main.rs`; the library
//! exists so the benchmarks can reach the encoder. The folders are the stages
//! events pass through, in order (see ARCHITECTURE.md): `kernel` → `sessions` →
//! `output`, `metrics`, and `sampling` → `otlp`; `telemetry` reads their counters;
//! `app` wires them, `cli` reads the flags.
pub mod app;
pub mod cli;
pub mod kernel;
pub mod metrics;
pub mod otlp;
pub mod output;
pub mod periodic;
pub mod sampling;
pub mod sessions;
pub mod shutdown;
pub mod telemetry;
pub mod usage;
