//! In: the kernel — the tracepoint program's state changes, the incident programs'
//! retransmissions, resets, errors and congestion states, and the packet programs'
//! `traceparent` headers, and the TLS programs' ones read from OpenSSL's
//! plaintext, and HTTP/2 header streams (decoded by `http2`), on one ring
//! buffer. Out: decoded [`event::Record`]s.
//! It knows nothing of sessions, text output or OTLP.
pub mod attach;
pub mod btf;
pub mod cgroup;
pub mod clock;
pub mod event;
pub mod http2;
pub mod incident_programs;
pub mod loader;
pub mod preflight;
pub mod program_stats;
pub mod reader;
pub mod tls_programs;
pub mod traceparent;
