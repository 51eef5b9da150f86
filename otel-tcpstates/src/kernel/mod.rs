//! In: the kernel — the tracepoint program's state changes and the packet programs'
//! `traceparent` headers, on one ring buffer. Out: decoded [`event::Record`]s.
//! It knows nothing of sessions, text output or OTLP.
pub mod btf;
pub mod cgroup;
pub mod clock;
pub mod event;
pub mod loader;
pub mod preflight;
pub mod reader;
pub mod traceparent;
