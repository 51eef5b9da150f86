//! TLS to the collector: a CA from OTEL_EXPORTER_OTLP_CERTIFICATE, the system's
//! roots, a client certificate for mutual TLS, and bad certificate files. Against
//! a receiver whose certificate a throwaway CA signed.
mod support;

use std::{
    net::TcpListener,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use support::{
    otlp::{FAST, Receiver, WAIT, trace_of},
    tls::{Files, Pki},
    *,
};

const PROTOCOLS: [&str; 2] = ["grpc", "http/protobuf"];
const CA: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
const TRACES_CA: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";

fn endpoint(rx: &Receiver, protocol: &str) -> String {
    match protocol {
        "grpc" => rx.grpc_endpoint(),
        _ => rx.http_endpoint(),
    }
}

/// Starts the daemon exporting to `rx` over `protocol` with `env`, tracing only
/// connections to `listener`: other tests' daemons, failing exports among them,
/// make enough connections to crowd its queue.
fn start(rx: &Receiver, protocol: &str, env: &[(&str, &str)], listener: &TcpListener) -> Tracer {
    let endpoint = endpoint(rx, protocol);
    let port = listener.local_addr().unwrap().port().to_string();
    assert!(endpoint.starts_with("https://localhost:"), "{endpoint}");
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([("OTEL_EXPORTER_OTLP_TIMEOUT", "3000")])
        .chain(env.iter().copied())
        .collect();
    Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
            "-D",
            &port,
        ],
        &env,
    )
}

/// Makes one connection and waits for its client socket's root span
/// (`tcp.session`) to arrive.
fn root_arrives(rx: &Receiver, listener: &TcpListener) -> bool {
    let server = listener.local_addr().unwrap();
    let (client, _) = connect_hold_close(listener, Duration::ZERO);
    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, client.port(), server.port()).is_some()
    });
    trace_of(&spans, client.port(), server.port()).is_some()
}

/// Makes one connection and waits for the daemon to say its export failed;
/// returns what it said.
fn export_fails(tracer: &Tracer, listener: &TcpListener) -> String {
    connect_hold_close(listener, Duration::ZERO);
    let deadline = Instant::now() + WAIT;
    loop {
        let said = tracer.stderr().join("\n");
        if said.contains("failed") {
            return said;
        }
        assert!(Instant::now() < deadline, "export never failed: {said}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// With the CA in OTEL_EXPORTER_OTLP_CERTIFICATE, spans reach a collector whose
/// certificate it signed, over both transports.
#[test]
fn a_ca_file_makes_the_collector_trusted() {
    if !root_or_skip("a_ca_file_makes_the_collector_trusted") {
        return;
    }
    let pki = Pki::new();
    let files = Files::new();
    let ca = files.write("ca.pem", &pki.ca);
    let rx = Receiver::start_tls(pki.server(false));
    for protocol in PROTOCOLS {
        let (listener, _) = listen("127.0.0.1");
        let tracer = start(&rx, protocol, &[(CA, &ca)], &listener);
        assert!(
            root_arrives(&rx, &listener),
            "{protocol}: {:?}",
            tracer.stderr()
        );
        let done = tracer.stop();
        assert!(done.status.success(), "{protocol}: {:?}", done.stderr);
        let said = done.stderr.join("\n");
        assert!(!said.contains("failed ("), "{protocol}: {said}");
        // The tracer's own metrics take the same trusted path (the last export
        // happens at exit).
        let seen = rx.metrics().get("otel_tcpstates.events.seen").cloned();
        let transport = if protocol == "grpc" { "grpc" } else { "http" };
        assert_eq!(
            seen.map(|m| m.transport),
            Some(transport),
            "{protocol}: {said}"
        );
    }
}

/// Without it the collector's certificate is not trusted: the export fails and
/// nothing arrives.
#[test]
fn without_the_ca_the_collector_is_refused() {
    if !root_or_skip("without_the_ca_the_collector_is_refused") {
        return;
    }
    let pki = Pki::new();
    let server = pki.server(false);
    let rx = Receiver::start_tls(server.clone());
    for protocol in PROTOCOLS {
        let (listener, _) = listen("127.0.0.1");
        let tracer = start(&rx, protocol, &[], &listener);
        let said = export_fails(&tracer, &listener);
        drop(tracer);
        assert_eq!(rx.requests(), 0, "{protocol}: {said}");
        assert_eq!(rx.metric_requests(), 0, "{protocol}: {said}");
        // Refused for the certificate: tonic says so; reqwest's reason is lost on
        // the way ("network error"), but the receiver hears it.
        if protocol == "grpc" {
            assert!(said.contains("UnknownIssuer"), "{said}");
        } else {
            let refused = server.refused();
            assert!(
                refused.iter().any(|r| r.contains("UnknownCA")),
                "{refused:?}"
            );
        }
    }
}

/// The system's roots are trusted too: here a CA the system store holds
/// (SSL_CERT_FILE) and no OTEL_EXPORTER_OTLP_CERTIFICATE. For gRPC this is more
/// than opentelemetry-otlp does by itself.
#[test]
fn the_system_roots_are_trusted() {
    if !root_or_skip("the_system_roots_are_trusted") {
        return;
    }
    let pki = Pki::new();
    let files = Files::new();
    let system = files.write("system-roots.pem", &pki.ca);
    let rx = Receiver::start_tls(pki.server(false));
    for protocol in PROTOCOLS {
        let (listener, _) = listen("127.0.0.1");
        let tracer = start(&rx, protocol, &[("SSL_CERT_FILE", &system)], &listener);
        assert!(
            root_arrives(&rx, &listener),
            "{protocol}: {:?}",
            tracer.stderr()
        );
    }
}

/// A collector that requires a client certificate takes the one in
/// OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE/_KEY, and refuses the daemon without it.
#[test]
fn a_client_certificate_is_presented() {
    if !root_or_skip("a_client_certificate_is_presented") {
        return;
    }
    let pki = Pki::new();
    let files = Files::new();
    let ca = files.write("ca.pem", &pki.ca);
    let cert = files.write("client.pem", &pki.client_cert);
    let key = files.write("client.key", &pki.client_key);
    let server = pki.server(true);
    let rx = Receiver::start_tls(server.clone());
    for protocol in PROTOCOLS {
        let (listener, _) = listen("127.0.0.1");
        let before = rx.requests();
        let tracer = start(&rx, protocol, &[(CA, &ca)], &listener);
        let said = export_fails(&tracer, &listener);
        drop(tracer);
        assert_eq!(rx.requests(), before, "{protocol}: {said}");
        if protocol != "grpc" {
            let refused = server.refused();
            assert!(
                refused.iter().any(|r| r.contains("no certificates")),
                "{refused:?}"
            );
        }

        let tracer = start(
            &rx,
            protocol,
            &[
                (TRACES_CA, &ca),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", &key),
            ],
            &listener,
        );
        assert!(
            root_arrives(&rx, &listener),
            "{protocol}: {:?}",
            tracer.stderr()
        );
    }
}

/// A CA file that is missing or not PEM stops the daemon at start-up with one
/// line naming the variable and the path, exit status 2; nothing is exported.
#[test]
fn bad_certificate_files_are_usage_errors() {
    let pki = Pki::new();
    let files = Files::new();
    let garbage = files.write("garbage.pem", "this is not a certificate\n");
    let missing = files.missing("missing.pem");
    let key = files.write("client.key", &pki.client_key);
    let rx = Receiver::start_tls(pki.server(false));
    // (variable set, its value, the variable the error names, what else it names)
    let cases = [
        (CA, garbage.as_str(), CA, garbage.as_str()),
        (CA, &missing, CA, &missing),
        (TRACES_CA, &garbage, TRACES_CA, &garbage),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            &key,
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ),
    ];
    for protocol in PROTOCOLS {
        for (set, value, var, named) in cases {
            let out = Command::new(BIN)
                .args(["--otlp-endpoint", &endpoint(&rx, protocol)])
                .args(["--otlp-protocol", protocol])
                .env(set, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{protocol} {set}: {stderr}");
            let first = stderr.lines().next().unwrap_or_default();
            assert!(
                first.starts_with(&format!("error: {var}")) && first.contains(named),
                "{protocol} {set}: {stderr}"
            );
            // The rest is clap's usual pointer to --help, as for a bad flag.
            assert_eq!(
                stderr.lines().filter(|l| !l.is_empty()).count(),
                2,
                "{stderr}"
            );
        }
    }
    assert_eq!(rx.requests(), 0);
}
