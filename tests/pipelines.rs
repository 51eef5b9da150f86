//! The shipped pipelines, run by the real programs: the OpenTelemetry Collector
//! distribution and Jaeger v2 that `scripts/backends.sh` builds from Go modules.
//! Every shipped collector configuration passes the collector's own `validate`;
//! the agent configuration carries the daemon's traces whole into Jaeger, and
//! its request spans into an instrumented application's own traces there; the
//! fleet gateway keeps each trace on one sampling backend, whose policies keep and
//! drop what the configuration says.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    os::fd::OwnedFd,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value as Json;
use support::{
    apps::{AppRequest, DELAY_MS, Mode, NODE_SERVICE, Runtime, run_app},
    backends::{Collector, Jaeger, Prometheus},
    deploy::read_yaml_documents,
    otlp::{FAST, ROOT, ReceivedSpan, Receiver, STATUS_ERROR, WAIT, trace_of},
    *,
};

const KUBERNETES: &str = "deploy/kubernetes/otel-tcpstates.yaml";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The variables the DaemonSet gives its agent collector (the downward API's
/// node name, which k8s_attributes filters pods by).
const DAEMONSET_ENV: &[(&str, &str)] = &[("K8S_NODE_NAME", "node-1")];

/// Every collector configuration the project ships, with the environment it runs
/// in: collector-config/ (but its builder manifest), the one docker-compose.yml
/// mounts, and the DaemonSet's agent in its ConfigMap (written out to a file for
/// the collector to read).
fn shipped_configs(
    scratch: &std::path::Path,
) -> Vec<(PathBuf, &'static [(&'static str, &'static str)])> {
    let mut configs: Vec<PathBuf> = fs::read_dir(workspace().join("collector-config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("builder-config.yaml"))
        .collect();
    configs.sort();
    let compose = fs::read_to_string(workspace().join("docker-compose.yml")).unwrap();
    let mounted = compose
        .lines()
        .find_map(|l| {
            let l = l.trim().strip_prefix("- ./")?;
            l.strip_suffix(":/etc/otelcol-contrib/config.yaml:ro")
        })
        .expect("docker-compose.yml mounts a collector configuration");
    let mounted = workspace().join(mounted);
    if !configs.contains(&mounted) {
        configs.push(mounted);
    }
    let mut all: Vec<_> = configs.into_iter().map(|c| (c, &[][..])).collect();
    for doc in read_yaml_documents(KUBERNETES) {
        if doc["kind"] != "ConfigMap" {
            continue;
        }
        for (key, text) in doc["data"].as_object().cloned().unwrap_or_default() {
            let path = scratch.join(format!("kubernetes-{key}"));
            fs::write(&path, text.as_str().unwrap()).unwrap();
            all.push((path, DAEMONSET_ENV));
        }
    }
    all
}

#[test]
fn every_shipped_collector_config_passes_the_collectors_validate() {
    let scratch = std::env::temp_dir().join(format!("otcs-validate-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let configs = shipped_configs(&scratch);
    assert!(
        configs.len() >= 4,
        "agent, gateway, gateway backend, DaemonSet agent: {configs:?}"
    );
    let failures: Vec<String> = configs
        .iter()
        .filter_map(|(config, env)| {
            Collector::validate(config, env)
                .err()
                .map(|out| format!("{}:\n{out}", config.display()))
        })
        .collect();
    let _ = fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every component a shipped configuration names is named as the collector
/// lists it (`components`): no deprecated alias (`otlp` for `otlp_grpc`,
/// `resourcedetection` for `resource_detection`, …), which the collector warns of
/// at every start and a later release will refuse. Also for the DaemonSet's
/// agent, which cannot run here (its `k8s_attributes` wants an API server).
#[test]
fn every_shipped_collector_config_uses_the_collectors_current_names() {
    let scratch = std::env::temp_dir().join(format!("otcs-names-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    let configs = shipped_configs(&scratch);
    let known = Collector::components();
    let mut problems = Vec::new();
    for (config, _) in &configs {
        let text = fs::read_to_string(config).unwrap();
        let doc: Json = serde_saphyr::from_str(&text).unwrap();
        for kind in [
            "receivers",
            "processors",
            "exporters",
            "extensions",
            "connectors",
        ] {
            let names: Vec<&str> = known[kind]
                .as_array()
                .map(|list| list.iter().filter_map(|c| c["name"].as_str()).collect())
                .unwrap_or_default();
            for id in doc[kind].as_object().into_iter().flat_map(|m| m.keys()) {
                let component = id.split('/').next().unwrap_or(id);
                if !names.contains(&component) {
                    problems.push(format!(
                        "{}: {kind} {id}: the collector knows {names:?}",
                        config.display()
                    ));
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    assert!(configs.len() >= 4, "{configs:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn tag<'a>(tags: &'a Json, key: &str) -> Option<&'a Json> {
    tags.as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

/// The W3C context the test's HTTP request carries: a link on both sockets' roots.
const LINKED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const LINKED_SPAN: &str = "00f067aa0ba902b7";

/// Jaeger; a collector running agent.yaml that sends it traces, and what would go
/// to Tempo and Prometheus to the test's own receiver (the same spans: what the
/// daemon sent, to compare Jaeger with; and the metrics); the daemon with links
/// exporting to the collector over gRPC.
fn agent_into_jaeger() -> (Jaeger, Receiver, Collector, Tracer) {
    let jaeger = Jaeger::start();
    let rx = Receiver::start();
    let collector = Collector::start(
        "collector-config/agent.yaml",
        &[
            format!("exporters.otlp_grpc/jaeger.endpoint={}", jaeger.otlp_grpc),
            format!("exporters.otlp_grpc/tempo.endpoint={}", rx.grpc_addr()),
            format!(
                "exporters.otlp_http/prometheus.endpoint={}",
                rx.http_endpoint()
            ),
            // Batches leave the agent at once instead of after a second.
            "processors.batch.timeout=50ms".to_owned(),
        ],
    );
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &collector.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
            "--links",
        ],
        FAST,
    );
    (jaeger, rx, collector, tracer)
}

/// tracer → collector (agent.yaml) → Jaeger. Jaeger's query API gives back each
/// trace whole, as the daemon sent it: every span, the durations the kernel
/// measured, `error=true` on a refused connect, the request's context as a
/// reference, `host.name` and the owner's `container.id` on the process.
#[test]
fn the_agent_config_carries_whole_traces_into_jaeger() {
    if !root_or_skip("the_agent_config_carries_whole_traces_into_jaeger") {
        return;
    }
    let (jaeger, rx, collector, tracer) = agent_into_jaeger();

    // 1. A connection from a process in a container's cgroup, carrying an HTTP
    //    request with a traceparent; the test accepts, answers and closes it.
    let id: String = format!("{:064x}", u128::from(std::process::id()) << 64 | 0x7e57);
    let cgroup = format!("{}/docker-{id}.scope", cgroup2_mount());
    fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("creating {cgroup}: {e}"));
    let (listener, server) = listen("127.0.0.1");
    let sp = server.port();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: x\r\ntraceparent: 00-{LINKED_TRACE}-{LINKED_SPAN}-01\r\n\r\n"
    );
    // Python, not bash: bash's printf writes a line per segment, and the
    // daemon looks for traceparent in the segment that starts the request (as
    // HTTP clients send their headers: in one write).
    const CLIENT: &str = "import os, socket, sys\n\
        open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid()))\n\
        s = socket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=10)\n\
        s.sendall(sys.argv[3].encode())\n\
        while s.recv(4096): pass\n\
        s.close()\n";
    let child = Command::new("python3")
        .args(["-c", CLIENT, &cgroup, &sp.to_string(), &request])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    listener.set_nonblocking(false).unwrap();
    let (mut accepted, peer) = listener.accept().unwrap();
    let cp = peer.port();
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = accepted.read(&mut buf).unwrap();
        assert!(n > 0, "the request ended early: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    accepted
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    // Closing first, after the whole answer: both ends close cleanly (the
    // client reads to the end, so it does not abort with unread data).
    drop(accepted);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the container's client failed");

    // 2. A refused connect.
    let closed = closed_port();
    let (fd, refused_port) = refused_connect(closed);

    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, cp, sp).is_some_and(|(_, c)| c.len() == 4)
            && trace_of(s, sp, cp).is_some_and(|(_, c)| c.len() == 4)
            && trace_of(s, refused_port, closed).is_some()
    });
    drop(fd);
    let _ = fs::remove_dir(&cgroup);

    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for (local, peer, failed) in [
        (cp, sp, false),
        (sp, cp, false),
        (refused_port, closed, true),
    ] {
        let (root, children) = trace_of(&spans, local, peer).unwrap();
        let sent: Vec<&ReceivedSpan> = std::iter::once(&root).chain(&children).collect();
        let trace = jaeger.wait_for_trace(&root.trace_id, sent.len(), WAIT);
        let got = trace["spans"].as_array().unwrap();
        assert_eq!(got.len(), sent.len(), "{local}->{peer}: {trace:#}");
        for span in &sent {
            let j = got
                .iter()
                .find(|j| j["spanID"] == span.span_id.as_str())
                .unwrap_or_else(|| {
                    panic!("{} {} not in Jaeger: {trace:#}", span.name, span.span_id)
                });
            assert_eq!(j["operationName"], span.name.as_str());
            // Jaeger keeps microseconds: the kernel's duration, truncated.
            assert_eq!(
                j["duration"].as_u64(),
                Some((span.end_ns - span.start_ns) / 1000),
                "{} of {local}->{peer}",
                span.name
            );
            assert_eq!(j["startTime"].as_u64(), Some(span.start_ns / 1000));
            let error = tag(&j["tags"], "error")
                .and_then(Json::as_bool)
                .unwrap_or(false);
            assert_eq!(
                error,
                span.status_code == STATUS_ERROR,
                "{}: {j:#}",
                span.name
            );
            let parent = j["references"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["refType"] == "CHILD_OF")
                .map(|r| r["spanID"].as_str().unwrap().to_owned());
            let expected_parent =
                (!span.parent_span_id.is_empty()).then(|| span.parent_span_id.clone());
            assert_eq!(parent, expected_parent, "{}", span.name);
        }
        let root_j = got.iter().find(|j| j["operationName"] == ROOT).unwrap();
        assert_eq!(
            tag(&root_j["tags"], "error")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            failed,
            "{local}->{peer}"
        );
        let process = &trace["processes"][root_j["processID"].as_str().unwrap()];
        assert_eq!(process["serviceName"], "otel-tcpstates");
        assert_eq!(
            tag(&process["tags"], "host.name"),
            Some(&Json::from(host.trim()))
        );
        if !failed {
            // The request's context, as Jaeger shows a link: a FOLLOWS_FROM
            // reference to another trace.
            let links: BTreeSet<(String, String)> = root_j["references"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["refType"] == "FOLLOWS_FROM")
                .map(|r| {
                    (
                        r["traceID"].as_str().unwrap().to_owned(),
                        r["spanID"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            assert_eq!(
                links,
                BTreeSet::from([(LINKED_TRACE.to_owned(), LINKED_SPAN.to_owned())]),
                "{local}->{peer}: {root_j:#}"
            );
        }
        if local == cp {
            assert_eq!(
                tag(&process["tags"], "container.id"),
                Some(&Json::from(id.as_str())),
                "{process:#}"
            );
        }
    }
    drop(tracer);
    let complaints = collector.process.complaints();
    assert!(
        !complaints.iter().any(|l| l.contains("\terror\t")),
        "the collector logged errors:\n{}",
        complaints.join("\n")
    );
}

/// The span of a Jaeger trace with this id.
fn jaeger_span<'a>(trace: &'a Json, span_id: &str) -> Option<&'a Json> {
    trace["spans"]
        .as_array()?
        .iter()
        .find(|s| s["spanID"] == span_id)
}

/// The service name of a span of a Jaeger trace (its process's).
fn jaeger_service<'a>(trace: &'a Json, span: &Json) -> &'a str {
    let process = span["processID"].as_str().expect("a processID");
    trace["processes"][process]["serviceName"]
        .as_str()
        .unwrap_or_else(|| panic!("no process {process}: {trace:#}"))
}

/// A Jaeger span's references of a type (`CHILD_OF`: its parent; `FOLLOWS_FROM`:
/// its OTLP links), as (trace id, span id).
fn jaeger_refs(span: &Json, ref_type: &str) -> Vec<(String, String)> {
    span["references"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["refType"] == ref_type)
        .map(|r| {
            (
                r["traceID"].as_str().unwrap().to_owned(),
                r["spanID"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn int_tag(span: &Json, key: &str) -> Option<i64> {
    tag(&span["tags"], key)?.as_i64()
}

/// Jaeger's query warns of nothing in a trace (e.g. a parent it does not have)
/// but clock skew it does not adjust: the JS SDK starts a span on a whole
/// millisecond (`Date.now()`) and times its duration finely, so the app's own
/// SERVER span, or a span of the tracer's, may seem to end up to a millisecond
/// after the app's CLIENT span; Jaeger v2 only says so (its adjustment is off
/// by default), and the test checks that the tracer's spans keep their times.
fn assert_no_warnings(trace: &Json) {
    let warnings: Vec<&str> = std::iter::once(trace)
        .chain(trace["spans"].as_array().into_iter().flatten())
        .flat_map(|t| t["warnings"].as_array().into_iter().flatten())
        .filter_map(Json::as_str)
        .filter(|w| !w.starts_with("clock skew adjustment disabled; not applying"))
        .collect();
    assert!(warnings.is_empty(), "{warnings:?}: {trace:#}");
}

/// The OTLP flags of each span of a trace, by span id, from Jaeger's v3 query
/// API (OTLP JSON; the v1 API the UI reads has none).
fn otlp_flags(jaeger: &Jaeger, trace_id: &str) -> BTreeMap<String, u64> {
    let got = jaeger.get(&format!("/api/v3/traces/{trace_id}"));
    got["result"]["resourceSpans"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["scopeSpans"].as_array().into_iter().flatten())
        .flat_map(|s| s["spans"].as_array().into_iter().flatten())
        .map(|s| {
            (
                s["spanId"].as_str().unwrap_or_default().to_owned(),
                s["flags"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The daemon's `tcp.request` spans in a Jaeger trace.
fn jaeger_requests(trace: &Json) -> Vec<&Json> {
    trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["operationName"] == "tcp.request" && jaeger_service(trace, s) == "otel-tcpstates"
        })
        .collect()
}

/// A Node.js app instrumented by the OpenTelemetry JS SDK and the tracer
/// (`--links`) export to one collector running agent.yaml (the app over
/// OTLP/HTTP, the tracer over gRPC), which sends both to Jaeger. There each
/// request's trace holds the app's CLIENT span and, under it, the tracer's
/// `tcp.request` span of each end of the keep-alive connection (`sent` and
/// `received`), as the tracer sent them (times unadjusted, flags kept), its
/// link a `FOLLOWS_FROM` reference to that end's `tcp.session` root, in a trace
/// of its own: which Jaeger has, with the end's ports, its handshake and a
/// reference back to every request the connection carried.
#[test]
fn requests_sit_in_the_apps_trace_in_jaeger() {
    if !root_or_skip("requests_sit_in_the_apps_trace_in_jaeger") {
        return;
    }
    let (jaeger, rx, collector, tracer) = agent_into_jaeger();
    // Three requests, all sampled, on one keep-alive connection; the app's
    // spans to the collector's OTLP/HTTP receiver (agent.yaml's :4318).
    let app = run_app(
        &format!("http://{}", collector.http),
        Runtime::Node,
        4,
        Mode::KeepAlive,
        3,
        1.0,
        None,
    );
    assert!(app.requests.iter().all(|r| r.sampled), "{app:#?}");
    let (cp, sp) = (app.requests[0].client_port, app.requests[0].server_port);
    assert!(
        app.requests
            .iter()
            .all(|r| (r.client_port, r.server_port) == (cp, sp)),
        "one keep-alive connection: {app:#?}"
    );

    // What the tracer sent of each request, to compare Jaeger's with.
    let sent = rx.wait_for(WAIT, |spans| {
        app.requests.iter().all(|r| {
            spans
                .iter()
                .filter(|s| s.name == "tcp.request" && s.trace_id == r.trace_id)
                .count()
                == 2
        })
    });

    // Each end's root, by its (local, peer) ports: the link of every request on it.
    let mut links: BTreeMap<(u16, u16), BTreeSet<(String, String)>> = BTreeMap::new();
    for (n, request) in app.requests.iter().enumerate() {
        let AppRequest {
            trace_id, span_id, ..
        } = request;
        // The app's CLIENT span and the tracer's two (the app's SERVER span
        // aside: the tracer's business is the network under the CLIENT span).
        let trace = jaeger.wait_for_trace_where(
            trace_id,
            "CLIENT span and two tcp.request spans",
            WAIT,
            |spans| {
                spans.iter().any(|s| s["spanID"] == span_id.as_str())
                    && spans
                        .iter()
                        .filter(|s| s["operationName"] == "tcp.request")
                        .count()
                        >= 2
            },
        );
        assert_no_warnings(&trace);
        let flags = otlp_flags(&jaeger, trace_id);
        let client = jaeger_span(&trace, span_id).unwrap();
        assert_eq!(jaeger_service(&trace, client), NODE_SERVICE, "{client:#}");
        assert_eq!(
            tag(&client["tags"], "span.kind").and_then(Json::as_str),
            Some("client"),
            "{client:#}"
        );
        assert_eq!(
            jaeger_refs(client, "CHILD_OF"),
            [],
            "the app's root: {client:#}"
        );
        let requests = jaeger_requests(&trace);
        assert_eq!(requests.len(), 2, "{trace:#}");
        let mut directions = BTreeSet::new();
        for span in requests {
            let direction = tag(&span["tags"], "tcpstates.link.direction")
                .and_then(Json::as_str)
                .unwrap_or_else(|| panic!("no direction: {span:#}"));
            directions.insert(direction.to_owned());
            let (local, peer) = match direction {
                "sent" => (cp, sp),
                "received" => (sp, cp),
                other => panic!("direction {other}: {span:#}"),
            };
            // Under the app's CLIENT span. Client and server are one process.
            assert_eq!(
                jaeger_refs(span, "CHILD_OF"),
                [(trace_id.clone(), span_id.clone())],
                "{direction} of request {n}: {span:#}"
            );
            assert_eq!(
                (
                    int_tag(span, "network.local.port"),
                    int_tag(span, "network.peer.port"),
                    int_tag(span, "process.pid"),
                    tag(&span["tags"], "http.request.method").and_then(Json::as_str),
                    tag(&span["tags"], "tcpstates.connection.new").and_then(Json::as_bool),
                    tag(&span["tags"], "tcpstates.request.answered").and_then(Json::as_bool),
                ),
                (
                    Some(i64::from(local)),
                    Some(i64::from(peer)),
                    Some(i64::from(app.pid)),
                    Some("GET"),
                    Some(n == 0),
                    Some(true),
                ),
                "{direction} of request {n}: {span:#}"
            );
            // The application's trace flags (sampled), its parent in another
            // process: kept through the collector and Jaeger (only its v3 API
            // shows flags).
            let id = span["spanID"].as_str().unwrap();
            assert_eq!(
                flags.get(id).map(|f| f & 0x301),
                Some(0x301),
                "{direction} of request {n}: {flags:?}"
            );
            let waited = int_tag(span, "tcpstates.request.answer_us").unwrap_or(0);
            assert!(
                // Less a millisecond: Node's timers may end up to 1 ms early.
                waited >= ((DELAY_MS - 1) * 1000) as i64,
                "{direction} of request {n}: answered after {waited} µs, before the server's {DELAY_MS} ms"
            );
            // As the tracer sent it: Jaeger did not move it to fit in its parent.
            let original = sent
                .iter()
                .find(|s| s.span_id == id)
                .unwrap_or_else(|| panic!("tcp.request {id} is in Jaeger, not in Tempo's place"));
            assert_eq!(
                (span["startTime"].as_u64(), span["duration"].as_u64()),
                (
                    Some(original.start_ns / 1000),
                    Some((original.end_ns - original.start_ns) / 1000)
                ),
                "{direction} of request {n}"
            );
            // Its one link: to its connection's root, in another trace.
            let link = jaeger_refs(span, "FOLLOWS_FROM");
            assert_eq!(link.len(), 1, "{direction} of request {n}: {span:#}");
            assert_ne!(&link[0].0, trace_id, "{span:#}");
            links
                .entry((local, peer))
                .or_default()
                .insert(link[0].clone());
        }
        assert_eq!(
            directions,
            BTreeSet::from(["received".to_owned(), "sent".to_owned()]),
            "request {n}"
        );
    }

    // One root for each end, for all three requests; the two ends' differ.
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links.values().all(|l| l.len() == 1),
        "one root an end: {links:?}"
    );
    let every_request: BTreeSet<(String, String)> = app
        .requests
        .iter()
        .map(|r| (r.trace_id.clone(), r.span_id.clone()))
        .collect();
    let mut roots = BTreeSet::new();
    for ((local, peer), link) in &links {
        let (root_trace, root_id) = link.first().unwrap();
        roots.insert(root_trace.clone());
        let handshake = if *local == cp { "SYN_SENT" } else { "SYN_RECV" };
        let trace = jaeger.wait_for_trace_where(
            root_trace,
            &format!("tcp.session root {root_id} and {handshake} span"),
            WAIT,
            |spans| {
                spans.iter().any(|s| s["spanID"] == root_id.as_str())
                    && spans.iter().any(|s| s["operationName"] == handshake)
            },
        );
        assert_no_warnings(&trace);
        let root = jaeger_span(&trace, root_id).unwrap();
        assert_eq!(root["operationName"], ROOT, "{root:#}");
        assert_eq!(jaeger_service(&trace, root), "otel-tcpstates");
        assert_eq!(jaeger_refs(root, "CHILD_OF"), [], "a root: {root:#}");
        assert_eq!(
            (
                int_tag(root, "network.local.port"),
                int_tag(root, "network.peer.port")
            ),
            (Some(i64::from(*local)), Some(i64::from(*peer))),
            "{root:#}"
        );
        let state = trace["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["operationName"] == handshake)
            .unwrap();
        assert_eq!(
            jaeger_refs(state, "CHILD_OF"),
            [(root_trace.clone(), root_id.clone())],
            "{state:#}"
        );
        // And back: the root links every request the connection carried.
        let back: BTreeSet<(String, String)> =
            jaeger_refs(root, "FOLLOWS_FROM").into_iter().collect();
        assert_eq!(back, every_request, "{local}->{peer}: {root:#}");
    }
    assert_eq!(roots.len(), 2, "each end a trace of its own: {links:?}");

    drop(tracer);
    let complaints = collector.process.complaints();
    assert!(
        !complaints.iter().any(|l| l.contains("\terror\t")),
        "the collector logged errors:\n{}",
        complaints.join("\n")
    );
}

/// The backends' tail_sampling decision_wait in the test (30 s shipped).
const DECISION_WAIT: Duration = Duration::from_secs(2);
/// After decision_wait: the sampler's tick (1 s), the batches (50 ms), the export.
const DECISION_MARGIN: Duration = Duration::from_secs(5);

/// Whether the roots of all these client ports were kept.
fn is_kept(ports: &[u16], spans: &[ReceivedSpan]) -> bool {
    ports.iter().all(|&p| {
        spans
            .iter()
            .any(|s| s.name == ROOT && s.int_attr("network.local.port") == Some(i64::from(p)))
    })
}

/// Which of the two sampling backends received a trace's spans.
fn backend_of(a: &[ReceivedSpan], b: &[ReceivedSpan], trace_id: &str) -> (usize, usize) {
    let count = |spans: &[ReceivedSpan]| spans.iter().filter(|s| s.trace_id == trace_id).count();
    (count(a), count(b))
}

/// tracers → gateway.yaml (`load_balancing` by trace id) → two collectors running
/// gateway-backend.yaml (`tail_sampling`) → Jaeger. Every trace lands whole on one
/// backend; the policies keep every refused connect (status ERROR) and the slow
/// handshake (a SYN dropped once: SYN_SENT over 100 ms), and about 10 % of the
/// clean connections; Jaeger gets exactly what the backends kept.
#[test]
fn the_gateway_keeps_each_trace_on_one_backend_whose_policies_sample_it() {
    if !root_or_skip("the_gateway_keeps_each_trace_on_one_backend_whose_policies_sample_it") {
        return;
    }
    let _serial = load::serial();
    let jaeger = Jaeger::start();
    // Where each backend's Tempo would be: tells which backend kept which trace.
    let (rx_a, rx_b) = (Receiver::start(), Receiver::start());
    // decision_wait is the one setting changed besides endpoints: 30 s would make
    // the test wait 30 s for each decision.
    let backend = |rx: &Receiver| {
        Collector::start(
            "collector-config/gateway-backend.yaml",
            &[
                format!("exporters.otlp_grpc/jaeger.endpoint={}", jaeger.otlp_grpc),
                format!("exporters.otlp_grpc/tempo.endpoint={}", rx.grpc_addr()),
                format!(
                    "processors.tail_sampling.decision_wait={}s",
                    DECISION_WAIT.as_secs()
                ),
                "processors.batch.timeout=50ms".to_owned(),
            ],
        )
    };
    let (backend_a, backend_b) = (backend(&rx_a), backend(&rx_b));
    let metrics = Receiver::start();
    let gateway = Collector::start(
        "collector-config/gateway.yaml",
        &[
            // The backends as the resolver's members, in place of the DNS name.
            "exporters.load_balancing.resolver.dns=null".to_owned(),
            format!(
                "exporters.load_balancing.resolver.static.hostnames=[{}, {}]",
                backend_a.grpc, backend_b.grpc
            ),
            format!(
                "exporters.otlp_http/prometheus.endpoint={}",
                metrics.http_endpoint()
            ),
            "processors.batch.timeout=50ms".to_owned(),
        ],
    );
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &gateway.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
        ],
        FAST,
    );

    // Refused connects: always kept.
    let closed = closed_port();
    let mut refused = Vec::new();
    let mut held = Vec::new();
    for _ in 0..24 {
        let (fd, port) = refused_connect(closed);
        refused.push(port);
        held.push(fd); // no later socket reuses the port
    }
    // One slow handshake: its first SYN dropped, retransmitted a second later.
    let (slow_listener, slow_server) = listen("127.0.0.1");
    let slow = {
        let _fault = netfault::Fault::drop_first_syn(slow_server.port());
        connect_hold_close(&slow_listener, Duration::ZERO).0.port()
    };
    // Clean connections: a share kept.
    let (listener, server) = listen("127.0.0.1");
    let clean: Vec<u16> = (0..120)
        .map(|_| connect_hold_close(&listener, Duration::ZERO).0.port())
        .collect();
    let sp = server.port();

    // Each trace is judged decision_wait after its first span (on the sampler's
    // one-second tick); the kept spans then go on to Jaeger and the receivers in
    // well under the margin. The refused connects tell when that happened.
    let last = Instant::now();
    let started = Instant::now();
    while !is_kept(&refused, &[rx_a.spans(), rx_b.spans()].concat()) {
        assert!(
            started.elapsed() < DECISION_WAIT + WAIT,
            "the refused connects were not all kept"
        );
        thread::sleep(Duration::from_millis(200));
    }
    thread::sleep(
        (last + DECISION_WAIT + DECISION_MARGIN).saturating_duration_since(Instant::now()),
    );
    drop(tracer);
    drop(held);
    let (a, b) = (rx_a.spans(), rx_b.spans());
    let all = [a.clone(), b.clone()].concat();

    // Whole traces, each on one backend; both backends in use.
    let traces: BTreeSet<&str> = all.iter().map(|s| s.trace_id.as_str()).collect();
    let mut on = [0usize; 2];
    for trace in &traces {
        match backend_of(&a, &b, trace) {
            (n, 0) if n > 0 => on[0] += 1,
            (0, n) if n > 0 => on[1] += 1,
            split => panic!("trace {trace} split between the backends: {split:?}"),
        }
    }
    assert!(
        on[0] > 0 && on[1] > 0,
        "one backend got every trace: {on:?}"
    );

    let kept = |local: u16, peer: u16| trace_of(&all, local, peer);
    for &port in &refused {
        let (root, _) = kept(port, closed).expect("a refused connect is kept");
        assert_eq!(root.status_code, STATUS_ERROR);
    }
    let (root, children) = kept(slow, slow_server.port()).expect("the slow handshake is kept");
    assert_eq!(children[0].name, "SYN_SENT");
    assert!(
        children[0].end_ns - children[0].start_ns > 100_000_000,
        "{root:?}"
    );
    let clean_kept = clean.iter().filter(|&&p| kept(p, sp).is_some()).count();
    // 10 % of 120: P(0) < 1e-5, P(> 40) far less.
    assert!(
        (1..=40).contains(&clean_kept),
        "{clean_kept} of {} clean connections kept at 10 %",
        clean.len()
    );
    // Each kept trace is whole: a root and its states (4 for a clean connection).
    for &p in &clean {
        if let Some((_, children)) = kept(p, sp) {
            assert_eq!(children.len(), 4, "client {p}");
        }
    }
    // Jaeger has every kept trace, whole.
    for trace in &traces {
        let spans = all.iter().filter(|s| s.trace_id == *trace).count();
        jaeger.wait_for_trace(trace, spans, WAIT);
    }
    let dropped_clean = clean.len() - clean_kept;
    eprintln!(
        "kept {} traces ({} on A, {} on B); {clean_kept} clean kept, {dropped_clean} dropped",
        traces.len(),
        on[0],
        on[1]
    );
    for c in [&backend_a, &backend_b, &gateway] {
        let errors: Vec<String> = c
            .process
            .complaints()
            .into_iter()
            .filter(|l| l.contains("\terror\t"))
            .collect();
        assert!(
            errors.is_empty(),
            "a collector logged errors:\n{}",
            errors.join("\n")
        );
    }
}

/// The tracer's own counters and its connection metrics, through agent.yaml's
/// metrics pipeline into Prometheus v3 over OTLP (as in compose), answer PromQL:
/// the refused connects the test made are counted by error.type, and the
/// tracer's counters carry the host.
#[test]
fn the_metrics_reach_prometheus_and_answer_promql() {
    if !root_or_skip("the_metrics_reach_prometheus_and_answer_promql") {
        return;
    }
    let prometheus = Prometheus::start();
    let rx = Receiver::start();
    let collector = Collector::start(
        "collector-config/agent.yaml",
        &[
            format!("exporters.otlp_grpc/jaeger.endpoint={}", rx.grpc_addr()),
            format!("exporters.otlp_grpc/tempo.endpoint={}", rx.grpc_addr()),
            format!(
                "exporters.otlp_http/prometheus.endpoint={}",
                prometheus.otlp_endpoint()
            ),
            "processors.batch.timeout=50ms".to_owned(),
        ],
    );
    // A service name of its own: other tests' tracers may export at the same time.
    let service = format!("otcs-promql-{}", std::process::id());
    let mut env = FAST.to_vec();
    env.extend([
        ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ("OTEL_SERVICE_NAME", service.as_str()),
    ]);
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &collector.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
        ],
        &env,
    );
    const REFUSED: usize = 3;
    let closed = closed_port();
    let held: Vec<OwnedFd> = (0..REFUSED)
        .map(|_| {
            let (fd, _) = refused_connect(closed);
            fd
        })
        .collect();

    let refused = format!(
        "sum(tcpstates_connection_duration_seconds_count{{job=\"{service}\", \
         error_type=\"connection_refused\", server_port=\"{closed}\"}})"
    );
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let own = format!("otel_tcpstates_spans_produced_total{{job=\"{service}\"}}");
    let deadline = Instant::now() + WAIT;
    loop {
        let counted = prometheus
            .query(&refused)
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
        let counters = prometheus.query(&own);
        if counted == Some(REFUSED as f64) && !counters.is_empty() {
            assert_eq!(
                counters[0]["metric"]["host_name"].as_str(),
                Some(host.trim()),
                "{counters:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} = {counted:?}, {own} = {counters:?}; Prometheus has {:?}; collector:\n{}",
            prometheus.names(),
            collector.process.complaints().join("\n")
        );
        thread::sleep(Duration::from_millis(250));
    }
    drop(held);
    drop(tracer);
}
