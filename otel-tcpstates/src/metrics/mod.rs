//! In: every update the session table reports (before any sampling of traces), and
//! the table itself for the connections open now. Out: OTLP metrics through the
//! OpenTelemetry SDK (a meter the caller gives): connection durations, handshake
//! times, retransmits, bytes each way, and open connections by state, with a
//! bounded number of attribute sets per metric.
//!
//! Exact by construction: every ended session is one measurement, whatever the
//! traces keep. It reads `sessions` and `kernel` types only.
pub mod connections;
pub mod series;

pub use connections::{ConnectionMetrics, MetricsOptions};
