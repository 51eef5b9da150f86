//! In: session updates. Out: OTLP trace requests on the wire (span records encoded
//! in place, delivered over gRPC or HTTP with retries), and the counters of that;
//! the meter provider the metrics go out through (`metrics`).
//! It never reaches back into the kernel side or the session table.
pub mod config;
pub mod delivery;
pub mod encode;
pub mod liveness;
pub mod metrics;
pub mod resource;
pub mod settings;
pub mod spans;
pub mod tls;
pub mod traces;
pub mod transport;
