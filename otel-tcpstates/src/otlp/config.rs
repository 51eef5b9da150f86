//! What the OTLP export is configured with: the setting types `settings`
//! resolves and `delivery`, `transport`, `tls` and `metrics` read, kept below
//! them all so none of them imports another for a type. It depends on no other
//! OTLP module: the behaviour stays with its users (`tls` reads the trust from
//! its files and turns it into each client's TLS configuration).
use std::{fmt, time::Duration};

use http::{HeaderName, HeaderValue};
use rustls::pki_types::CertificateDer;

/// How spans (and metrics) travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Batching, from `OTEL_BSP_*` where set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    pub max_queue: usize,
    pub max_batch: usize,
    pub delay: Duration,
    /// A request's whole budget, retries included (`OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`).
    pub timeout: Duration,
}

/// Where the spans go and how.
#[derive(Clone, Debug)]
pub struct Target {
    /// The full URL: for HTTP with `/v1/traces`, for gRPC the collector's base.
    pub url: String,
    pub protocol: Protocol,
    /// From `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`, already checked.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub gzip: bool,
    /// `None`: the system's roots alone.
    pub trust: Option<Trust>,
}

/// What to trust, and what to present, beyond the system's roots.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// CA certificates to trust as well as the system's.
    pub(super) roots: Vec<CertificateDer<'static>>,
    /// For mutual TLS.
    pub(super) client: Option<ClientCert>,
}

#[derive(Clone, PartialEq, Eq)]
pub(super) struct ClientCert {
    pub(super) chain: Vec<CertificateDer<'static>>,
    /// The private key, PKCS#8, PKCS#1 or SEC1 DER, tagged by [`KeyKind`].
    pub(super) key: (KeyKind, Vec<u8>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum KeyKind {
    Pkcs8,
    Pkcs1,
    Sec1,
}

impl KeyKind {
    pub(super) fn pem_label(self) -> &'static str {
        match self {
            Self::Pkcs8 => "PRIVATE KEY",
            Self::Pkcs1 => "RSA PRIVATE KEY",
            Self::Sec1 => "EC PRIVATE KEY",
        }
    }
}

// By hand, so the private key can never end up in a log line.
impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("extra_roots", &self.roots.len())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}
