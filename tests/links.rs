//! Span links from W3C `traceparent`, with a real instrumented application: an
//! HTTP/1.1 server and client made with the OpenTelemetry Python SDK
//! (`tests/apps/traced_http.py`, its packages installed by
//! `scripts/setup.sh --test`) talk over one keep-alive connection while the daemon
//! exports over OTLP/gRPC to a receiver in the test. The app exports its own spans
//! to the same receiver over OTLP/HTTP, so the test checks each socket's
//! `tcp.session` root against the CLIENT spans the app really made: one link per
//! distinct span its requests carried, in order, and nothing else.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use support::{
    apps,
    otlp::{KIND_CLIENT, KIND_SERVER, ROOT, ReceivedLink, ReceivedSpan, Receiver, Value},
    *,
};

/// The app's `service.name`, which tells its spans from the daemon's.
const APP_SERVICE: &str = "traced-http";
const DAEMON_SERVICE: &str = "otel-tcpstates";
/// Where `scripts/setup.sh --test` installs the OpenTelemetry Python SDK and its
/// OTLP/HTTP exporter (`pip install --target`); keep in sync.
const PYTHON_DIR: &str = "otel-tcpstates-python";
/// How long the app may run, and how long spans may take to arrive: far beyond
/// what either takes, so that only a hang fails, never a slow machine.
const LONG: Duration = Duration::from_secs(240);
/// OTLP `Link.flags` bits 8 and 9: the linked context is known to be remote.
const REMOTE: u32 = 0x100 | 0x200;
/// Links the daemon keeps per socket.
const MAX_LINKS: usize = 64;

/// One request the app made on its keep-alive connection, as it reports it.
#[derive(Clone, Debug)]
struct Request {
    /// "traced" (its own sampled CLIENT span), "retry" (a second attempt from the
    /// same span), "unsampled" (a CLIENT span not sampled: flag bit 0 clear),
    /// "none" (no trace header) or "invalid" (a traceparent value W3C rejects).
    kind: String,
    method: String,
    traceparent: Option<String>,
}

/// The connection that is not HTTP, though its first bytes carry a traceparent.
#[derive(Debug)]
struct NotHttp {
    client_port: u16,
    server_port: u16,
    /// The span ids it sent (each with a trace id of its own).
    span_ids: Vec<String>,
}

/// What one run of the app did, from its stdout.
#[derive(Debug)]
struct App {
    pid: u32,
    /// "127.0.0.1" or "::1".
    address: &'static str,
    server_port: u16,
    client_port: u16,
    requests: Vec<Request>,
    not_http: Option<NotHttp>,
}

/// A link the test expects: a valid traceparent the app sent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expected {
    trace_id: String,
    span_id: String,
    /// The W3C trace flags the header carried.
    trace_flags: u32,
    method: String,
}

fn python_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let dir = cargo_home.join(PYTHON_DIR);
    assert!(
        dir.join("opentelemetry").join("sdk").is_dir(),
        "the OpenTelemetry Python SDK is not installed in {}; run scripts/setup.sh --test",
        dir.display()
    );
    dir
}

/// Runs the app to its end: `--traced N` requests in CLIENT spans over one
/// keep-alive connection to its server on `family`'s loopback address, with
/// `--mix` the other kinds of request and the connection that is not HTTP too.
fn run_app(rx: &Receiver, family: u8, traced: usize, mix: bool) -> App {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps/traced_http.py");
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .args([
            "--family",
            &family.to_string(),
            "--traced",
            &traced.to_string(),
        ])
        .args(mix.then_some("--mix"))
        .env("PYTHONPATH", python_dir());
    let (pid, out) = apps::run_to_end(command, &rx.http_endpoint(), &script.display().to_string());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} --family {family} --traced {traced} (mix: {mix}) failed with {}:\n{stderr}",
        script.display(),
        out.status
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the app's report is not JSON ({e}): {:?}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let port = |v: &serde_json::Value| -> u16 {
        let n = v.as_u64().unwrap_or_else(|| panic!("not a port: {v}"));
        u16::try_from(n).unwrap()
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
    let requests = report["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| Request {
            kind: text(&r["kind"]),
            method: text(&r["method"]),
            traceparent: r["traceparent"].as_str().map(str::to_owned),
        })
        .collect();
    let not_http = (!report["not_http"].is_null()).then(|| NotHttp {
        client_port: port(&report["not_http"]["client_port"]),
        server_port: port(&report["not_http"]["server_port"]),
        span_ids: report["not_http"]["ids"]
            .as_array()
            .expect("not_http ids")
            .iter()
            .map(|id| text(&id["span_id"]))
            .collect(),
    });
    App {
        pid,
        address: if family == 6 { "::1" } else { "127.0.0.1" },
        server_port: port(&report["server_port"]),
        client_port: port(&report["client_port"]),
        requests,
        not_http,
    }
}

/// A valid version-00 traceparent's trace id, parent id and flags.
fn parse_traceparent(value: &str) -> (String, String, u32) {
    let fields: Vec<&str> = value.split('-').collect();
    assert!(
        fields.len() == 4 && fields[0] == "00",
        "not a traceparent the SDK makes: {value:?}"
    );
    let flags = u32::from_str_radix(fields[3], 16).unwrap();
    (fields[1].to_owned(), fields[2].to_owned(), flags)
}

/// The links the contract asks for: every valid traceparent the app sent (its
/// CLIENT spans, sampled or not, and their retries), each distinct (trace id,
/// span id) once, in the order first sent.
fn expected_links(app: &App) -> Vec<Expected> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for request in &app.requests {
        if !matches!(request.kind.as_str(), "traced" | "retry" | "unsampled") {
            continue;
        }
        let value = request
            .traceparent
            .as_deref()
            .expect("a traced request's header");
        let (trace_id, span_id, trace_flags) = parse_traceparent(value);
        if seen.insert((trace_id.clone(), span_id.clone())) {
            out.push(Expected {
                trace_id,
                span_id,
                trace_flags,
                method: request.method.clone(),
            });
        }
    }
    out
}

/// The links as the daemon must export them, on the root of a socket that
/// `direction` ("sent" or "received") the requests.
fn as_links(expected: &[Expected], direction: &str) -> Vec<ReceivedLink> {
    expected
        .iter()
        .map(|e| ReceivedLink {
            trace_id: e.trace_id.clone(),
            span_id: e.span_id.clone(),
            flags: e.trace_flags | REMOTE,
            attributes: BTreeMap::from([
                (
                    "tcpstates.link.direction".to_owned(),
                    Value::Str(direction.to_owned()),
                ),
                (
                    "http.request.method".to_owned(),
                    Value::Str(e.method.clone()),
                ),
            ]),
        })
        .collect()
}

/// Links one per line, to compare with a readable difference.
fn brief(links: &[ReceivedLink]) -> Vec<String> {
    links
        .iter()
        .map(|l| {
            let attributes: Vec<String> = l
                .attributes
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            format!(
                "{}-{} {:#x} {}",
                l.trace_id,
                l.span_id,
                l.flags,
                attributes.join(" ")
            )
        })
        .collect()
}

/// The daemon's roots of the sockets with these local and peer ports on `address`.
fn roots<'a>(
    spans: &'a [ReceivedSpan],
    address: &str,
    local: u16,
    peer: u16,
) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.name == ROOT
                && s.service_name() == Some(DAEMON_SERVICE)
                && s.str_attr("network.local.address") == Some(address)
                && s.int_attr("network.local.port") == Some(i64::from(local))
                && s.int_attr("network.peer.port") == Some(i64::from(peer))
        })
        .collect()
}

/// The sockets whose roots the test looks at: the keep-alive connection's two
/// ends, then the connection that is not HTTP's, as (local, peer, role).
fn sockets(app: &App) -> Vec<(u16, u16, &'static str)> {
    let mut out = vec![
        (app.client_port, app.server_port, "client"),
        (app.server_port, app.client_port, "server"),
    ];
    if let Some(raw) = &app.not_http {
        out.push((raw.client_port, raw.server_port, "client"));
        out.push((raw.server_port, raw.client_port, "server"));
    }
    out
}

/// Waits until the daemon has exported the roots of all the app's sockets (the
/// app closed them all before it exited), then stops it; returns all that the
/// receiver got.
fn collect(rx: &Receiver, tracer: Tracer, app: &App) -> Vec<ReceivedSpan> {
    let all_there = |spans: &[ReceivedSpan]| {
        sockets(app)
            .iter()
            .all(|&(local, peer, _)| !roots(spans, app.address, local, peer).is_empty())
    };
    rx.wait_for(LONG, all_there);
    let done = tracer.stop();
    assert!(done.status.success(), "daemon: {:?}", done.stderr);
    // Whatever the shutdown sent too, so that a failure shows it.
    let spans = rx.spans();
    assert!(
        all_there(&spans),
        "not every socket of {app:#?} was exported within {LONG:?}; daemon stderr: {:?}",
        done.stderr
    );
    spans
}

/// The root of one of the app's sockets: exactly one, with the role and owner the
/// app gives it.
fn root_of<'a>(
    spans: &'a [ReceivedSpan],
    app: &App,
    (local, peer, role): (u16, u16, &str),
) -> &'a ReceivedSpan {
    let found = roots(spans, app.address, local, peer);
    assert_eq!(found.len(), 1, "{role} {local}->{peer}: {found:#?}");
    let root = found[0];
    assert_eq!(root.str_attr("tcpstates.role"), Some(role), "{root:#?}");
    assert_eq!(
        root.int_attr("process.pid"),
        Some(i64::from(app.pid)),
        "{root:#?}"
    );
    let client_port = if role == "client" { local } else { peer };
    assert_eq!(
        root.int_attr("client.port"),
        Some(i64::from(client_port)),
        "{root:#?}"
    );
    root
}

/// The app's own spans back what it reported: its exported CLIENT spans are
/// exactly the traced requests' (so the expected links are the app's CLIENT
/// spans, found at the receiver), the unsampled one was not exported, and its
/// server continued each traced request's trace from the header (the SDK's
/// propagation worked end to end).
fn check_app_spans(spans: &[ReceivedSpan], app: &App) {
    let mine: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service_name() == Some(APP_SERVICE))
        .collect();
    let client_spans: BTreeSet<(String, String)> = mine
        .iter()
        .filter(|s| s.kind == KIND_CLIENT)
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    let of_kind = |kinds: &[&str]| -> BTreeSet<(String, String)> {
        app.requests
            .iter()
            .filter(|r| kinds.contains(&r.kind.as_str()))
            .map(|r| {
                let (trace_id, span_id, _) = parse_traceparent(r.traceparent.as_deref().unwrap());
                (trace_id, span_id)
            })
            .collect()
    };
    let traced = of_kind(&["traced", "retry"]);
    assert_eq!(
        client_spans, traced,
        "the app's exported CLIENT spans are the traced requests' contexts"
    );
    assert!(
        of_kind(&["unsampled"]).is_disjoint(&client_spans),
        "an unsampled span was exported"
    );
    for (trace_id, span_id) in &traced {
        assert!(
            mine.iter().any(|s| s.kind == KIND_SERVER
                && &s.trace_id == trace_id
                && &s.parent_span_id == span_id),
            "no SERVER span of the app continues {trace_id}-{span_id}"
        );
    }
}

/// No span the daemon exported links to an id the app sent only where the
/// contract says nothing is linked (invalid values, the connection that is not
/// HTTP), and only roots have links to the app's spans (a request span's one
/// link is to its connection's root).
fn check_nothing_else_linked(spans: &[ReceivedSpan], app: &App) {
    let mut forbidden: BTreeSet<String> = app
        .requests
        .iter()
        .filter(|r| r.kind == "invalid")
        .filter_map(|r| r.traceparent.as_deref()?.split('-').nth(2))
        .map(str::to_ascii_lowercase)
        .filter(|id| id.len() == 16 && !id.trim_start_matches('0').is_empty())
        .collect();
    if let Some(raw) = &app.not_http {
        forbidden.extend(raw.span_ids.iter().cloned());
    }
    for span in spans
        .iter()
        .filter(|s| s.service_name() == Some(DAEMON_SERVICE))
    {
        if span.name == "tcp.request" {
            // A sampled request's span, in the app's trace: its one link is to
            // its connection's root.
            assert_eq!(span.links.len(), 1, "{span:#?}");
            assert!(
                spans
                    .iter()
                    .any(|r| r.name == ROOT && r.span_id == span.links[0].span_id),
                "{span:#?}"
            );
            continue;
        }
        if span.name != ROOT {
            assert!(span.links.is_empty(), "a {} span has links", span.name);
        }
        for link in &span.links {
            assert!(
                !forbidden.contains(&link.span_id),
                "{} links to {} though the app only sent it invalid or outside HTTP: {span:#?}",
                span.name,
                link.span_id
            );
        }
    }
}

/// The whole contract on one keep-alive connection and one connection that is
/// not HTTP, over `family`.
fn links_follow_the_apps_client_spans(test: &str, family: u8) {
    if !root_or_skip(test) {
        return;
    }
    let rx = Receiver::start();
    let tracer = Tracer::exporting_to(&rx, &["--links"]);
    let app = run_app(&rx, family, 6, true);
    let spans = collect(&rx, tracer, &app);
    check_app_spans(&spans, &app);

    let expected = expected_links(&app);
    // What the mix is made of: the flaky request (sent twice), six traced ones
    // (two in one trace, two with the header's name capitalised), one unsampled.
    let kinds = |kind: &str| app.requests.iter().filter(|r| r.kind == kind).count();
    assert_eq!(
        (
            kinds("traced"),
            kinds("retry"),
            kinds("unsampled"),
            kinds("none"),
            kinds("invalid")
        ),
        (7, 1, 1, 1, 6),
        "{app:#?}"
    );
    assert_eq!(expected.len(), 8, "{expected:#?}");
    let methods: BTreeSet<&str> = expected.iter().map(|e| e.method.as_str()).collect();
    assert_eq!(methods, BTreeSet::from(["DELETE", "GET", "POST", "PUT"]));
    assert!(expected.iter().any(|e| e.trace_flags & 1 == 0), "unsampled");
    let traces: BTreeSet<&str> = expected.iter().map(|e| e.trace_id.as_str()).collect();
    assert_eq!(traces.len(), expected.len() - 1, "two spans share a trace");

    let [client, server] = [0, 1].map(|i| root_of(&spans, &app, sockets(&app)[i]));
    assert_eq!(
        brief(&client.links),
        brief(&as_links(&expected, "sent")),
        "client's root"
    );
    assert_eq!(client.dropped_links_count, 0);
    assert_eq!(
        brief(&server.links),
        brief(&as_links(&expected, "received")),
        "server's root"
    );
    assert_eq!(server.dropped_links_count, 0);

    for socket in &sockets(&app)[2..] {
        let root = root_of(&spans, &app, *socket);
        assert_eq!(
            (root.links.as_slice(), root.dropped_links_count),
            (&[][..], 0),
            "the connection that is not HTTP ({}): {root:#?}",
            socket.2
        );
    }
    check_nothing_else_linked(&spans, &app);
}

#[test]
fn ipv4_roots_link_to_the_apps_client_spans() {
    links_follow_the_apps_client_spans("ipv4_roots_link_to_the_apps_client_spans", 4);
}

#[test]
fn ipv6_roots_link_to_the_apps_client_spans() {
    links_follow_the_apps_client_spans("ipv6_roots_link_to_the_apps_client_spans", 6);
}

/// 70 traced requests on one connection: the first 64 distinct spans are linked,
/// the other 6 counted.
#[test]
fn links_beyond_64_are_counted_as_dropped() {
    if !root_or_skip("links_beyond_64_are_counted_as_dropped") {
        return;
    }
    const REQUESTS: usize = 70;
    let rx = Receiver::start();
    let tracer = Tracer::exporting_to(&rx, &["--links"]);
    let app = run_app(&rx, 4, REQUESTS, false);
    let spans = collect(&rx, tracer, &app);
    check_app_spans(&spans, &app);

    let expected = expected_links(&app);
    assert_eq!(expected.len(), REQUESTS);
    let dropped = u32::try_from(REQUESTS - MAX_LINKS).unwrap();
    for (socket, direction) in sockets(&app).into_iter().zip(["sent", "received"]) {
        let root = root_of(&spans, &app, socket);
        assert_eq!(
            brief(&root.links),
            brief(&as_links(&expected[..MAX_LINKS], direction)),
            "{} root",
            socket.2
        );
        assert_eq!(root.dropped_links_count, dropped, "{} root", socket.2);
    }
    check_nothing_else_linked(&spans, &app);
}

/// Without `--links` (the default), and with `--links` taken back by a later
/// `--no-links`: the same traffic, and no root has a link.
#[test]
fn without_links_roots_have_no_links() {
    if !root_or_skip("without_links_roots_have_no_links") {
        return;
    }
    for extra in [&[][..], &["--links", "--no-links"][..]] {
        let rx = Receiver::start();
        let tracer = Tracer::exporting_to(&rx, extra);
        let app = run_app(&rx, 4, 6, true);
        let spans = collect(&rx, tracer, &app);
        check_app_spans(&spans, &app);
        for socket in sockets(&app) {
            root_of(&spans, &app, socket);
        }
        for span in spans
            .iter()
            .filter(|s| s.service_name() == Some(DAEMON_SERVICE))
        {
            assert_eq!(
                (span.links.as_slice(), span.dropped_links_count),
                (&[][..], 0),
                "{extra:?}: {span:#?}"
            );
        }
    }
}
