//! The one meter provider: the OTLP metrics exporter next to the traces (same
//! endpoint, transport and TLS, every `OTEL_METRIC_EXPORT_INTERVAL` ms), shared by
//! the tracer's own counters and the connection metrics.
use anyhow::{Context as _, Result};
use opentelemetry_otlp::{Protocol as OtlpProtocol, WithExportConfig as _};
use opentelemetry_sdk::{
    Resource,
    metrics::{Instrument, PeriodicReader, SdkMeterProvider, Stream},
};

use crate::otlp::settings::{Protocol, Settings};

/// Names of the metrics whose attribute sets their recorder caps itself.
const CAPPED_PREFIX: &str = "tcpstates.connection.";

/// Starts the periodic export (60 s by default). `capped_series` is the cap those
/// recorders keep (`--metrics-max-series`): the SDK's own limit (2000 by default)
/// is set above it, so it never folds series the recorder counted as its own.
/// Must run inside the tokio runtime, like the span exporter.
pub fn meter_provider(
    settings: &Settings,
    resource: &Resource,
    capped_series: usize,
) -> Result<SdkMeterProvider> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let transport = settings.metrics_transport();
    let exporter = match settings.protocol {
        Protocol::Grpc => transport
            .grpc(builder.with_tonic().with_protocol(OtlpProtocol::Grpc))
            .and_then(|builder| Ok(builder.build()?)),
        Protocol::HttpProtobuf => transport
            .http(builder.with_http().with_protocol(OtlpProtocol::HttpBinary))
            .and_then(|builder| Ok(builder.build()?)),
    }
    .with_context(|| {
        format!(
            "setting up OTLP/{} metrics export next to {}",
            settings.protocol.as_str(),
            settings.endpoint
        )
    })?;
    // The recorder's own sets and its overflow set, which the SDK sees as one more.
    let limit = capped_series.saturating_add(1).min(usize::MAX - 1);
    let view = move |instrument: &Instrument| {
        instrument
            .name()
            .starts_with(CAPPED_PREFIX)
            .then(|| Stream::builder().with_cardinality_limit(limit).build().ok())
            .flatten()
    };
    Ok(SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter).build())
        .with_resource(resource.clone())
        .with_view(view)
        .build())
}
