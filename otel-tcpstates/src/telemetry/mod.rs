//! In: every stage's counters. Out: the tracer's own health — the stats log line,
//! the exit summary, OTLP metrics. It only reads counters; it changes nothing.
pub mod self_metrics;
pub mod stats;
