//! OTLP export settings: where to send and how (flags and the standard `OTEL_*`
//! variables), checked once at start-up.
use std::{env, fmt, time::Duration};

use anyhow::{Context as _, Result};
use http::{HeaderName, HeaderValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use tonic::transport::Endpoint;
use url::Url;

use crate::otlp::{
    config::{Batching, Target, Trust},
    liveness::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, tcp_connector},
};
pub use crate::{otlp::config::Protocol, usage::UsageError};

/// Where and how to export, once resolved from flags and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// For messages: the endpoint in effect, whichever source it came from.
    pub endpoint: String,
    /// Where the spans are sent: for HTTP the full URL (`/v1/traces` added to a
    /// base endpoint), for gRPC the collector's address.
    pub traces_url: String,
    pub protocol: Protocol,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`.
    pub headers: Headers,
    /// `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION=gzip`.
    pub gzip: bool,
    /// Whether the tracer's own counters are exported as metrics too (unless
    /// `OTEL_METRICS_EXPORTER=none`).
    pub metrics: bool,
    /// Where those go, when it differs from what the metrics exporter would read
    /// from `OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT` itself: next to the traces.
    pub metrics_endpoint: Option<String>,
    /// CA certificates and client certificate from `OTEL_EXPORTER_OTLP_[TRACES_]*`;
    /// `None`: the system's roots alone.
    pub trust: Option<Trust>,
    /// The same from `OTEL_EXPORTER_OTLP_[METRICS_]*`.
    pub metrics_trust: Option<Trust>,
    /// The metrics endpoint in effect, whichever source it came from.
    pub metrics_url: String,
    /// Whether the metrics endpoint in effect is https://.
    pub metrics_https: bool,
    /// `OTEL_BSP_*` and the traces' timeout.
    pub batching: Batching,
}

/// Request headers; their values may be secrets, so they never print.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(HeaderName, HeaderValue)>);

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl Settings {
    /// How the self-metrics exporter connects: next to the traces unless its own
    /// variables say otherwise.
    pub fn metrics_transport(&self) -> MetricsTransport<'_> {
        MetricsTransport {
            endpoint: self.metrics_endpoint.as_deref(),
            url: &self.metrics_url,
            https: self.metrics_https,
            trust: self.metrics_trust.as_ref(),
            timeout_var: opentelemetry_otlp::OTEL_EXPORTER_OTLP_METRICS_TIMEOUT,
        }
    }
}

/// One signal's connection: the endpoint to set (`None`: the exporter reads its
/// variables), and the TLS trust to give it.
pub struct MetricsTransport<'a> {
    endpoint: Option<&'a str>,
    /// The endpoint in effect, whichever source it came from.
    url: &'a str,
    https: bool,
    trust: Option<&'a Trust>,
    /// The signal's own timeout variable, e.g. OTEL_EXPORTER_OTLP_TRACES_TIMEOUT.
    timeout_var: &'static str,
}

impl MetricsTransport<'_> {
    /// Configures the metrics exporter's gRPC builder with a channel of our own:
    /// left to itself, opentelemetry-otlp's has no keepalive, no connect timeout
    /// and no user timeout, so a connection that died silently took every export
    /// until TCP gave up on it (see `otlp::liveness`). Must run inside the tokio
    /// runtime.
    pub fn grpc<B: WithExportConfig + WithTonicConfig>(&self, builder: B) -> Result<B> {
        let url = self.url.trim();
        let timeout = export_timeout(self.timeout_var, env_nonempty);
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("'{url}' is not a usable URL"))?
            .timeout(timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(false);
        // Always for https://: tonic given no roots verifies nothing (as
        // opentelemetry-otlp left it, its issue #2008).
        if self.https {
            let trust = self.trust.cloned().unwrap_or_default();
            endpoint = endpoint
                .tls_config(trust.tonic_config().context("setting up TLS")?)
                .context("setting up TLS")?;
        }
        let channel = endpoint.connect_with_connector_lazy(tcp_connector());
        // The exporter bounds its retries by the same timeout as each call.
        Ok(builder.with_timeout(timeout).with_channel(channel))
    }

    /// Configures the metrics exporter's HTTP builder.
    pub fn http<B: WithExportConfig + WithHttpConfig>(&self, mut builder: B) -> Result<B> {
        if let Some(url) = self.endpoint {
            builder = builder.with_endpoint(url);
        }
        // Our own client replaces the exporter's (for our trust and to find out a
        // dead connection), timeout included; the same value goes to both, as the
        // exporter would resolve it.
        let timeout = export_timeout(self.timeout_var, env_nonempty);
        let trust = self.trust.cloned().unwrap_or_default();
        let client = trust.http_client(timeout).context("setting up TLS")?;
        Ok(builder.with_timeout(timeout).with_http_client(client))
    }
}

fn is_https(url: &str) -> bool {
    Url::parse(url.trim()).is_ok_and(|url| url.scheme() == "https")
}

pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// [`settings_from`] with the process environment.
pub fn settings(
    flag_endpoint: Option<&str>,
    flag_protocol: Option<Protocol>,
) -> Result<Option<Settings>, UsageError> {
    settings_from(flag_endpoint, flag_protocol, env_nonempty)
}

fn check_url(text: &str, source: &str) -> Result<Url, UsageError> {
    let url = Url::parse(text.trim()).map_err(|err| {
        UsageError(format!(
            "{source} '{text}' is not a URL ({err}); expected e.g. http://localhost:4318"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(UsageError(format!(
            "{source} '{text}' must be an http:// or https:// URL with a host"
        )));
    }
    Ok(url)
}

/// Checks a `key=value,key=value` list (OTEL_RESOURCE_ATTRIBUTES, the headers). A
/// header's value is never echoed: it may be a secret.
fn check_pairs(name: &str, text: &str, echo: bool) -> Result<(), UsageError> {
    for (at, item) in text.split(',').enumerate() {
        if item.trim().is_empty() {
            continue;
        }
        let ok = item
            .split_once('=')
            .is_some_and(|(key, _)| !key.trim().is_empty());
        if !ok {
            let shown = if echo {
                format!(" '{item}'")
            } else {
                String::new()
            };
            return Err(UsageError(format!(
                "{name}: item {}{shown} is not key=value",
                at + 1
            )));
        }
    }
    Ok(())
}

/// Resolves the export settings from flags and `env` (non-empty variables); `None`
/// when no endpoint is configured at all (the tracer then prints text only).
pub fn settings_from(
    flag_endpoint: Option<&str>,
    flag_protocol: Option<Protocol>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, UsageError> {
    let mut settings = resolve(flag_endpoint, flag_protocol, &env)?;
    if let Some(settings) = &mut settings {
        settings.metrics = match env("OTEL_METRICS_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => true,
            Some("none") => false,
            Some(other) => {
                return Err(UsageError(format!(
                    "OTEL_METRICS_EXPORTER='{other}' is not supported; use otlp or none"
                )));
            }
        };
        if let Some(value) = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
            check_url(&value, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")?;
        }
        settings.trust = Trust::from_vars("TRACES", &env)?;
        // The metrics go next to the traces: the same trust, unless told otherwise.
        let metrics_own = ["CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"]
            .iter()
            .any(|var| env(&format!("OTEL_EXPORTER_OTLP_METRICS_{var}")).is_some());
        settings.metrics_trust = if metrics_own {
            Trust::from_vars("METRICS", &env)?
        } else {
            settings.trust.clone()
        };
        let metrics_url = settings
            .metrics_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|| settings.endpoint.clone());
        settings.metrics_https = is_https(&metrics_url);
        settings.metrics_url = metrics_url;
        if let Some(value) = env("OTEL_RESOURCE_ATTRIBUTES") {
            check_pairs("OTEL_RESOURCE_ATTRIBUTES", &value, true)?;
        }
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        ] {
            if let Some(value) = env(name) {
                check_pairs(name, &value, false)?;
            }
        }
        settings.headers = headers(&env)?;
        settings.gzip = gzip(&env)?;
    }
    Ok(settings)
}

fn resolve(
    flag_endpoint: Option<&str>,
    flag_protocol: Option<Protocol>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, UsageError> {
    let protocol = match flag_protocol {
        Some(protocol) => protocol,
        None => {
            let from_env = [
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ]
            .into_iter()
            .find_map(|name| env(name).map(|value| (name, value)));
            match from_env {
                None => Protocol::HttpProtobuf,
                Some((name, value)) => Protocol::parse(&value).ok_or_else(|| {
                    UsageError(format!(
                        "{name}='{value}' is not supported; use grpc or http/protobuf"
                    ))
                })?,
            }
        }
    };
    if let Some(flag) = flag_endpoint {
        let mut url = check_url(flag, "--otlp-endpoint")?;
        // Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, to which HTTP adds the path.
        if protocol == Protocol::HttpProtobuf && !url.path().ends_with("/v1/traces") {
            let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        return Ok(Some(Settings {
            endpoint: url.to_string(),
            traces_url: url.to_string(),
            protocol,
            headers: Headers::default(),
            gzip: false,
            metrics: true,
            metrics_endpoint: env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
                .is_none()
                .then(|| metrics_next_to(url.as_str(), protocol)),
            trust: None,
            metrics_trust: None,
            metrics_url: String::new(),
            metrics_https: false,
            batching: batching(env),
        }));
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Some(value) = env(name) {
            check_url(&value, name)?;
            // Only a traces-specific endpoint leaves the metrics exporter without
            // one of its own to read.
            let metrics_endpoint = (name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                && env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_none()
                && env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none())
            .then(|| metrics_next_to(&value, protocol));
            // As opentelemetry-otlp does: the general variable is a base URL, to
            // which HTTP adds the signal's path; the traces variable is used as is.
            let traces_url =
                if name == "OTEL_EXPORTER_OTLP_ENDPOINT" && protocol == Protocol::HttpProtobuf {
                    format!("{}/v1/traces", value.trim().trim_end_matches('/'))
                } else {
                    value.trim().to_owned()
                };
            return Ok(Some(Settings {
                endpoint: value,
                traces_url,
                protocol,
                headers: Headers::default(),
                gzip: false,
                metrics: true,
                metrics_endpoint,
                trust: None,
                metrics_trust: None,
                metrics_url: String::new(),
                metrics_https: false,
                batching: batching(env),
            }));
        }
    }
    Ok(None)
}

/// The spans' request headers: `OTEL_EXPORTER_OTLP_HEADERS`, then those of
/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, which win. Values are percent-decoded (the
/// spec's W3C Baggage format) and never echoed.
fn headers(env: &impl Fn(&str) -> Option<String>) -> Result<Headers, UsageError> {
    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for name in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        let Some(list) = env(name) else { continue };
        for (at, item) in list.split(',').enumerate() {
            let Some((key, value)) = item.split_once('=') else {
                continue;
            };
            let bad = |what: &str| {
                UsageError(format!(
                    "{name}: item {} has {what}; expected key=value with a header name and a percent-encoded value",
                    at + 1
                ))
            };
            let key = HeaderName::from_bytes(key.trim().to_ascii_lowercase().as_bytes())
                .map_err(|_| bad("a name that is not a valid HTTP header name"))?;
            let decoded = percent_encoding::percent_decode_str(value.trim()).decode_utf8_lossy();
            let mut value = HeaderValue::from_str(&decoded)
                .map_err(|_| bad("a value that is not a valid HTTP header value"))?;
            value.set_sensitive(true);
            out.retain(|(k, _)| *k != key);
            out.push((key, value));
        }
    }
    Ok(Headers(out))
}

/// `OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION`: `gzip` or `none`.
fn gzip(env: &impl Fn(&str) -> Option<String>) -> Result<bool, UsageError> {
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ] {
        if let Some(value) = env(name) {
            return match value.trim() {
                "gzip" => Ok(true),
                "none" => Ok(false),
                other => Err(UsageError(format!(
                    "{name}='{other}' is not supported; use gzip or none"
                ))),
            };
        }
    }
    Ok(false)
}

/// The metrics endpoint on the collector that takes the traces at `traces`.
fn metrics_next_to(traces: &str, protocol: Protocol) -> String {
    match protocol {
        Protocol::Grpc => traces.to_owned(),
        Protocol::HttpProtobuf => match traces.trim_end_matches('/').strip_suffix("/v1/traces") {
            Some(base) => format!("{base}/v1/metrics"),
            None => traces.to_owned(),
        },
    }
}

/// The export timeout as opentelemetry-otlp resolves it: the signal's variable
/// (e.g. `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`), the general one, its default
/// (milliseconds; an unparsable value counts as unset).
fn export_timeout(signal_var: &str, env: impl Fn(&str) -> Option<String>) -> Duration {
    [signal_var, opentelemetry_otlp::OTEL_EXPORTER_OTLP_TIMEOUT]
        .into_iter()
        .find_map(|name| env(name)?.parse().ok())
        .map_or(
            opentelemetry_otlp::OTEL_EXPORTER_OTLP_TIMEOUT_DEFAULT,
            Duration::from_millis,
        )
}

/// Where and how the spans go, from the settings and `OTEL_EXPORTER_OTLP_*`.
pub fn target(settings: &Settings) -> Target {
    Target {
        url: settings.traces_url.clone(),
        protocol: settings.protocol,
        headers: settings.headers.0.clone(),
        gzip: settings.gzip,
        trust: settings.trust.clone(),
    }
}

/// Batching from `OTEL_BSP_*` where set. Where unset: a deeper queue than the
/// SDK's (bursts of connection churn; a queued record is 280 bytes, and the queue
/// is bounded in bytes too, by `delivery::QUEUE_BYTES_PER_SPAN`: 20 MiB for
/// 65,536) and a shorter delay.
fn batching(env: &impl Fn(&str) -> Option<String>) -> Batching {
    let size = |name: &str, default: usize| {
        env(name)
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(default)
    };
    let max_queue = size("OTEL_BSP_MAX_QUEUE_SIZE", 65_536);
    Batching {
        max_queue,
        max_batch: size("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2048).min(max_queue),
        delay: Duration::from_millis(size("OTEL_BSP_SCHEDULE_DELAY", 1000) as u64),
        timeout: export_timeout(opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, env),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        endpoint: Option<&str>,
        protocol: Option<Protocol>,
        vars: &[(&str, &str)],
    ) -> Result<Option<Settings>, UsageError> {
        settings_from(endpoint, protocol, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert_eq!(resolve(None, None, &[]), Ok(None));
        assert_eq!(
            resolve(None, None, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Ok(None)
        );
    }

    #[test]
    fn flag_endpoint_is_a_base_url_for_http() {
        let s = resolve(Some("http://collector:4318"), None, &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.traces_url, "http://collector:4318/v1/traces");
        let s = resolve(Some("https://c.example/otlp/"), None, &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.endpoint, "https://c.example/otlp/v1/traces");
        let s = resolve(Some("http://c:4317"), Some(Protocol::Grpc), &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.traces_url, "http://c:4317/");
    }

    #[test]
    fn environment_is_honoured_and_flags_win() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        let s = resolve(None, None, &vars).unwrap().unwrap();
        assert_eq!(
            (s.protocol, s.endpoint.as_str()),
            (Protocol::Grpc, "http://a:4317")
        );
        let s = resolve(None, Some(Protocol::HttpProtobuf), &vars)
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        let traces = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://t:4318/v1/traces",
        )];
        let s = resolve(None, None, &[vars[0], traces[0]]).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://t:4318/v1/traces");
    }

    #[test]
    fn malformed_lists_are_usage_errors_without_secrets() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318");
        let err = resolve(
            None,
            None,
            &[
                endpoint,
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=ok,Bearer s3cr3t",
                ),
            ],
        )
        .unwrap_err();
        assert_eq!(err.0, "OTEL_EXPORTER_OTLP_HEADERS: item 2 is not key=value");
        let err = resolve(
            None,
            None,
            &[endpoint, ("OTEL_RESOURCE_ATTRIBUTES", "a=1,=2")],
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            "OTEL_RESOURCE_ATTRIBUTES: item 2 '=2' is not key=value"
        );
        let fine = [
            endpoint,
            ("OTEL_RESOURCE_ATTRIBUTES", "a=1, b = 2,"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x=y=z"),
        ];
        assert!(resolve(None, None, &fine).unwrap().is_some());
        // Without export they do not matter.
        assert_eq!(
            resolve(None, None, &[("OTEL_RESOURCE_ATTRIBUTES", "junk")]),
            Ok(None)
        );
    }

    #[test]
    fn metrics_go_next_to_the_traces_unless_told_otherwise() {
        let s = resolve(Some("http://c:4318"), None, &[]).unwrap().unwrap();
        assert!(s.metrics);
        assert_eq!(
            s.metrics_endpoint.as_deref(),
            Some("http://c:4318/v1/metrics")
        );
        let s = resolve(Some("http://c:4317"), Some(Protocol::Grpc), &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.metrics_endpoint.as_deref(), Some("http://c:4317/"));
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://t:4318/v1/traces",
        );
        let s = resolve(None, None, &[traces]).unwrap().unwrap();
        assert_eq!(
            s.metrics_endpoint.as_deref(),
            Some("http://t:4318/v1/metrics")
        );
        // Endpoints the metrics exporter reads itself win.
        for own in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://m:4318/v1/metrics",
            ),
        ] {
            let s = resolve(None, None, &[traces, own]).unwrap().unwrap();
            assert_eq!(s.metrics_endpoint, None, "{own:?}");
        }
        let s = resolve(
            Some("http://c:4318"),
            None,
            &[("OTEL_METRICS_EXPORTER", "none")],
        )
        .unwrap()
        .unwrap();
        assert!(!s.metrics);
        let err = resolve(
            Some("http://c:4318"),
            None,
            &[("OTEL_METRICS_EXPORTER", "prometheus")],
        )
        .unwrap_err();
        assert!(err.0.contains("use otlp or none"), "{err}");
        let err = resolve(
            Some("http://c:4318"),
            None,
            &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "m:4318")],
        )
        .unwrap_err();
        assert!(
            err.0.starts_with("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_usage_errors_naming_their_source() {
        let err = resolve(Some("localhost:4317"), None, &[]).unwrap_err();
        assert!(err.0.contains("--otlp-endpoint"), "{err}");
        let err = resolve(None, None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")]).unwrap_err();
        assert!(
            err.0
                .starts_with("OTEL_EXPORTER_OTLP_ENDPOINT 'not a url' is not a URL"),
            "{err}"
        );
        let err = resolve(None, None, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap_err();
        assert!(err.0.contains("use grpc or http/protobuf"), "{err}");
        let err = resolve(Some("ftp://x"), None, &[]).unwrap_err();
        assert!(err.0.contains("http:// or https://"), "{err}");
    }
}
