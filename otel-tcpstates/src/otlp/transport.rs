//! One encoded export request, one attempt: OTLP/gRPC (HTTP/2, with gRPC's 5-byte
//! message framing written here) or OTLP/HTTP (protobuf), and what the collector's
//! answer means under OTLP's rules: accepted (perhaps partly), worth retrying, or
//! refused. A reply is read up to [`MAX_REPLY`] bytes and never trusted further.
use std::{
    error::Error as StdError,
    io::{Read as _, Write as _},
    time::Duration,
};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message as _;

use crate::{
    otlp::config::{Protocol, Target},
    otlp::liveness::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, tcp_connector},
    otlp::tls,
};

/// The largest reply read; a bigger one is refused (an OTLP response is a few bytes).
pub const MAX_REPLY: usize = 1 << 20;
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const GRPC_PREFIX: usize = 5;
const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// What an attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Taken; `rejected` of the spans were not (OTLP's partial success), and the
    /// collector may have said why, or warned.
    Accepted { rejected: u64, message: String },
    /// Worth sending again, no sooner than `after` if the collector said so.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Not worth sending again.
    Refused(String),
}

pub struct Transport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: Uri,
    protocol: Protocol,
    headers: HeaderMap,
    gzip: bool,
}

impl Transport {
    /// Must run inside the tokio runtime.
    pub fn new(target: &Target) -> Result<Self> {
        let mut url = target.url.trim().to_owned();
        if target.protocol == Protocol::Grpc {
            url = format!("{}{GRPC_PATH}", url.trim_end_matches('/'));
        }
        let uri: Uri = url
            .parse()
            .with_context(|| format!("'{url}' is not a usable URL"))?;
        let https = uri.scheme_str() == Some("https");
        let tls = if https {
            target.trust.clone().unwrap_or_default().rustls_config()?
        } else {
            tls::unused_config()?
        };
        let tcp = tcp_connector();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let mut client = Client::builder(TokioExecutor::new());
        // The pool's timer is what closes connections idle for a minute.
        client
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new());
        let client = match target.protocol {
            // gRPC is HTTP/2 only: h2 by ALPN over TLS, prior knowledge without.
            Protocol::Grpc => client
                .http2_only(true)
                .timer(TokioTimer::new())
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .http2_keep_alive_while_idle(false)
                .build(builder.enable_http2().wrap_connector(tcp)),
            Protocol::HttpProtobuf => client.build(builder.enable_http1().wrap_connector(tcp)),
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &target.headers {
            headers.append(name.clone(), value.clone());
        }
        let agent = concat!("otel-tcpstates/", env!("CARGO_PKG_VERSION"));
        headers.insert(header::USER_AGENT, HeaderValue::from_static(agent));
        match target.protocol {
            Protocol::Grpc => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
                if target.gzip {
                    headers.insert("grpc-encoding", HeaderValue::from_static("gzip"));
                }
            }
            Protocol::HttpProtobuf => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                if target.gzip {
                    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
            }
        }
        Ok(Self {
            client,
            uri,
            protocol: target.protocol,
            headers,
            gzip: target.gzip,
        })
    }

    /// A buffer to encode a request into, after room for the framing.
    pub fn buffer(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(256 * 1024);
        if self.protocol == Protocol::Grpc && !self.gzip {
            buf.resize(GRPC_PREFIX, 0);
        }
        buf
    }

    /// The bytes to send for a request encoded into [`Transport::buffer`]: framed
    /// and compressed as the transport wants, once, for every attempt.
    pub fn body(&self, mut buf: Vec<u8>) -> Bytes {
        if self.gzip {
            let mut out = Vec::with_capacity(buf.len() / 4 + GRPC_PREFIX);
            if self.protocol == Protocol::Grpc {
                out.resize(GRPC_PREFIX, 0);
            }
            let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
            // Writing to a Vec cannot fail.
            let _ = gz.write_all(&buf);
            buf = gz.finish().unwrap_or_default();
        }
        if self.protocol == Protocol::Grpc {
            let len = u32::try_from(buf.len() - GRPC_PREFIX).unwrap_or(u32::MAX);
            buf[0] = u8::from(self.gzip);
            buf[1..GRPC_PREFIX].copy_from_slice(&len.to_be_bytes());
        }
        Bytes::from(buf)
    }

    /// One attempt, given at most `timeout` from sending to the end of the reply.
    pub async fn send(&self, body: Bytes, timeout: Duration) -> Answer {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .body(Full::new(body))
            .expect("a request from parts already checked");
        *request.headers_mut() = self.headers.clone();
        if self.protocol == Protocol::Grpc {
            // gRPC's own deadline, so the server stops working on it too.
            let ms = timeout.as_millis().clamp(1, 99_999_999);
            if let Ok(value) = HeaderValue::from_str(&format!("{ms}m")) {
                request.headers_mut().insert("grpc-timeout", value);
            }
        }
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|err| error_chain(&err))?;
            let (parts, body) = response.into_parts();
            let collected = Limited::new(body, MAX_REPLY)
                .collect()
                .await
                .map_err(|err| {
                    if err.is::<http_body_util::LengthLimitError>() {
                        Reading::TooLarge
                    } else {
                        Reading::Broken(error_chain(err.as_ref()))
                    }
                });
            Ok::<_, String>((parts, collected))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Answer::Retry {
                reason: format!("no answer within {timeout:?}"),
                after: None,
            },
            Ok(Err(reason)) => Answer::Retry {
                reason,
                after: None,
            },
            Ok(Ok((parts, body))) => match self.protocol {
                Protocol::Grpc => grpc_answer(parts.status, &parts.headers, body),
                Protocol::HttpProtobuf => http_answer(parts.status, &parts.headers, body),
            },
        }
    }
}

/// How reading a reply's body went.
enum Reading {
    TooLarge,
    Broken(String),
}

type Collected = std::result::Result<http_body_util::Collected<Bytes>, Reading>;

fn too_large() -> Answer {
    Answer::Refused(format!("the reply is larger than {MAX_REPLY} bytes"))
}

/// An error and its causes on one line: the cause (a refused connection, an
/// unknown certificate issuer) is usually at the end.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// The OTLP response in a successful reply's body (empty: all taken).
fn accepted(body: &[u8]) -> Answer {
    match ExportTraceServiceResponse::decode(body) {
        Ok(response) => {
            let partial = response.partial_success.unwrap_or_default();
            Answer::Accepted {
                rejected: u64::try_from(partial.rejected_spans).unwrap_or(0),
                message: partial.error_message,
            }
        }
        Err(err) => Answer::Refused(format!("the reply is not an OTLP response ({err})")),
    }
}

/// Inflates a reply, refusing one that grows past [`MAX_REPLY`]: a small compressed
/// reply may expand to a huge one.
fn gunzip(data: &[u8]) -> std::result::Result<Vec<u8>, Answer> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(MAX_REPLY as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|err| Answer::Refused(format!("the reply does not decompress ({err})")))?;
    if out.len() > MAX_REPLY {
        return Err(Answer::Refused(format!(
            "the reply inflates to more than {MAX_REPLY} bytes"
        )));
    }
    Ok(out)
}

/// OTLP/HTTP: 2xx carries the response; 429, 502, 503 and 504 are worth retrying
/// (after Retry-After if given); anything else is refused.
fn http_answer(status: StatusCode, headers: &HeaderMap, body: Collected) -> Answer {
    if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
        return Answer::Retry {
            reason: format!("HTTP {status}"),
            after: retry_after(headers),
        };
    }
    let body = match body {
        Ok(body) => body.to_bytes(),
        Err(Reading::TooLarge) => return too_large(),
        Err(Reading::Broken(reason)) if status.is_success() => {
            return Answer::Retry {
                reason: format!("the reply was cut off ({reason})"),
                after: None,
            };
        }
        Err(Reading::Broken(_)) => Bytes::new(),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let protobuf = content_type.starts_with("application/x-protobuf");
    let body = if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
    {
        match gunzip(&body) {
            Ok(body) => Bytes::from(body),
            Err(answer) => return answer,
        }
    } else {
        body
    };
    if status.is_success() {
        if body.is_empty() {
            return Answer::Accepted {
                rejected: 0,
                message: String::new(),
            };
        }
        if !protobuf {
            return Answer::Refused(format!(
                "the reply is '{content_type}', not application/x-protobuf"
            ));
        }
        return accepted(&body);
    }
    // The collector may say why, as a google.rpc.Status.
    let why = protobuf
        .then(|| tonic_types::Status::decode(body.as_ref()).ok())
        .flatten()
        .map(|s| s.message)
        .filter(|m| !m.is_empty())
        .map(|m| format!(": {}", printable(&m)))
        .unwrap_or_default();
    Answer::Refused(format!("HTTP {status}{why}"))
}

/// Retry-After in seconds (an HTTP date is rare from collectors; backoff covers it).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse().ok().map(Duration::from_secs)
}

/// OTLP/gRPC: the grpc-status of the trailers (or of the headers, for a reply
/// without a body); UNAVAILABLE and the like are worth retrying, RESOURCE_EXHAUSTED
/// only when the server says when.
fn grpc_answer(status: StatusCode, headers: &HeaderMap, body: Collected) -> Answer {
    let collected = match body {
        Ok(body) => body,
        Err(Reading::TooLarge) => return too_large(),
        Err(Reading::Broken(reason)) => {
            return Answer::Retry {
                reason: format!("the reply was cut off ({reason})"),
                after: None,
            };
        }
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let fields = if headers.contains_key("grpc-status") {
        headers
    } else if let Some(trailers) = &trailers {
        trailers
    } else if status != StatusCode::OK {
        // Not a gRPC server's answer: gRPC's HTTP-to-status mapping.
        return match status.as_u16() {
            429 | 502 | 503 | 504 => Answer::Retry {
                reason: format!("HTTP {status}, not a gRPC reply"),
                after: None,
            },
            _ => Answer::Refused(format!("HTTP {status}, not a gRPC reply")),
        };
    } else {
        return Answer::Refused("the reply has no grpc-status".into());
    };
    let code: i32 = match fields
        .get("grpc-status")
        .map(|v| v.to_str().map(str::parse))
    {
        Some(Ok(Ok(code))) => code,
        _ => return Answer::Refused("the reply has no valid grpc-status".into()),
    };
    if code == 0 {
        return grpc_message(&data, headers);
    }
    let message = fields
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let reason = format!(
        "gRPC {}{}",
        code_name(code),
        if message.is_empty() {
            String::new()
        } else {
            format!(": {}", printable(&message))
        }
    );
    let after = retry_delay(fields);
    match code {
        // CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS.
        1 | 4 | 10 | 11 | 14 | 15 => Answer::Retry { reason, after },
        8 if after.is_some() => Answer::Retry { reason, after },
        _ => Answer::Refused(reason),
    }
}

/// The one message of an OK reply.
fn grpc_message(data: &[u8], headers: &HeaderMap) -> Answer {
    if data.is_empty() {
        return Answer::Accepted {
            rejected: 0,
            message: String::new(),
        };
    }
    if data.len() < GRPC_PREFIX {
        return Answer::Refused("the reply's gRPC message is cut short".into());
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    let Some(message) = data.get(GRPC_PREFIX..GRPC_PREFIX + len) else {
        return Answer::Refused("the reply's gRPC message is cut short".into());
    };
    if data[0] == 0 {
        return accepted(message);
    }
    let gzip = headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip");
    if !gzip {
        return Answer::Refused("the reply is compressed in an encoding not asked for".into());
    }
    match gunzip(message) {
        Ok(message) => accepted(&message),
        Err(answer) => answer,
    }
}

/// RetryInfo's delay from `grpc-status-details-bin` (a google.rpc.Status).
fn retry_delay(fields: &HeaderMap) -> Option<Duration> {
    let value = fields.get("grpc-status-details-bin")?;
    // gRPC sends binary headers in base64 with or without padding.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(value.as_bytes()).ok()?;
    let status = tonic_types::Status::decode(bytes.as_slice()).ok()?;
    let info = status
        .details
        .iter()
        .find(|any| any.type_url == RETRY_INFO_TYPE)?;
    let delay = tonic_types::pb::RetryInfo::decode(info.value.as_slice())
        .ok()?
        .retry_delay?;
    let secs = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

fn code_name(code: i32) -> String {
    let name = match code {
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => return format!("status {code}"),
    };
    name.to_owned()
}

/// A collector's text, made safe for one log line and cut to a sane length.
pub fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if text.chars().count() > 300 {
        out.push('…');
    }
    out
}
