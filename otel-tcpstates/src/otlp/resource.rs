//! The resource the spans go under: `service.name`, `host.name`, the SDK's own
//! attributes and those of `OTEL_RESOURCE_ATTRIBUTES`, read once at start-up.
use opentelemetry::KeyValue;
use opentelemetry_sdk::{
    Resource,
    resource::{EnvResourceDetector, ResourceDetector, TelemetryResourceDetector},
};

use crate::otlp::{encode::BaseResource, settings::env_nonempty};

const DEFAULT_SERVICE_NAME: &str = "otel-tcpstates";

/// The resource every span carries: `service.name` (default `otel-tcpstates`,
/// overridden by `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`), `host.name`, and
/// the SDK's own attributes.
pub fn resource() -> Resource {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default();
    let mut builder = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", DEFAULT_SERVICE_NAME),
            KeyValue::new("host.name", host),
        ])
        .with_attributes(TelemetryResourceDetector.detect().iter().map(kv))
        .with_attributes(EnvResourceDetector::new().detect().iter().map(kv));
    if let Some(name) = env_nonempty("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

/// The resource's attributes as OTLP key-values, for the span encoder (converted
/// as opentelemetry-proto converts them for the SDK's exporters).
pub fn base_resource(resource: &Resource) -> BaseResource {
    opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema::from(resource)
        .attributes
        .0
}

fn kv((key, value): (&opentelemetry::Key, &opentelemetry::Value)) -> KeyValue {
    KeyValue::new(key.clone(), value.clone())
}
