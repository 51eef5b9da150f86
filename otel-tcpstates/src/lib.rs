//! otel-tcpstates: every TCP socket's state changes, from the kernel, as tcpstates
//! and tcplife text or OpenTelemetry traces. The binary is `main.rs`; the library
//! exists so the benchmarks can reach the encoder.
pub mod app;
pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod container;
pub mod delivery;
pub mod encode;
pub mod event;
pub mod export;
pub mod links;
pub mod loader;
pub mod output;
pub mod preflight;
pub mod reader;
pub mod self_metrics;
pub mod sessions;
pub mod shutdown;
pub mod spans;
pub mod stats;
pub mod tls;
pub mod traces;
pub mod transport;
