//! The compose topology (docker-compose.yml): every port it publishes is one its
//! service listens on and every file it mounts exists, the tracer's service has
//! only what README "What it needs" lists, Prometheus and Grafana point at real
//! ports; and it is run for real: the daemon with compose's arguments, a real
//! collector (rotel) configured from agent.yaml's pipelines, and a receiver
//! standing in for each backend; and the tracer's service as Docker runs it,
//! with span links, without CAP_NET_ADMIN and with `--no-links`.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use support::{
    deploy::{
        Endpoint, Protocol, Serves,
        compose::{
            CAPS, Compose, Listeners, NO_LINKS_CAPS, TRACER, compose_problems, listening, reaches,
            tracer_problems, tracer_target,
        },
        fail_on,
        image::Dockerfile,
        read_yaml, root,
        run::{LINKS_CAP, Run, in_container},
        strings,
    },
    otlp::{KIND_CLIENT, KIND_SERVER, ROOT, ReceivedSpan, Receiver, Value as Attr, WAIT, trace_of},
    rotel::{Export, Rotel, Signal as RotelSignal},
    *,
};

/// Prometheus scrapes what serves metrics; Grafana's data sources are the
/// services' query APIs; anonymous visitors may look.
fn viewer_problems(compose: &Compose, listeners: &Listeners) -> Vec<String> {
    let mut problems = Vec::new();
    let prometheus = read_yaml(&compose.config_file("prometheus", "--config.file"));
    for job in prometheus["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for config in job["static_configs"].as_array().into_iter().flatten() {
            for target in strings(&config["targets"]) {
                let what = format!("prometheus job {}", job["job_name"]);
                match Endpoint::parse(&target) {
                    Ok(endpoint) => {
                        if let Err(e) = reaches(listeners, &what, &endpoint, Serves::Scrape) {
                            problems.push(e);
                        }
                    }
                    Err(e) => problems.push(format!("{what}: {e}")),
                }
            }
        }
    }

    let dir = compose
        .mounted_file("grafana", "/etc/grafana/provisioning/datasources")
        .expect("grafana: mount deploy/grafana/provisioning at /etc/grafana/provisioning");
    let mut types = BTreeSet::new();
    for entry in std::fs::read_dir(root().join(&dir)).expect("the datasources directory") {
        let file = entry.expect("entry").path();
        let rel = file
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for source in read_yaml(&rel)["datasources"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let kind = source["type"].as_str().unwrap_or("?").to_owned();
            let what = format!("{rel}: data source {kind}");
            match source["url"].as_str().map(Endpoint::parse) {
                Some(Ok(endpoint)) => {
                    if endpoint.host != kind {
                        problems.push(format!("{what} points at {}", endpoint.host));
                    }
                    if let Err(e) = reaches(listeners, &what, &endpoint, Serves::Http) {
                        problems.push(e);
                    }
                }
                Some(Err(e)) => problems.push(format!("{what}: {e}")),
                None => problems.push(format!("{what}: no url")),
            }
            types.insert(kind);
        }
    }
    for kind in ["tempo", "prometheus"] {
        if !types.contains(kind) {
            problems.push(format!("grafana: no {kind} data source"));
        }
    }
    let env = compose.environment("grafana");
    for (key, want) in [
        ("GF_AUTH_ANONYMOUS_ENABLED", "true"),
        ("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer"),
        // Explore, where the README sends people, is closed to viewers otherwise.
        ("GF_USERS_VIEWERS_CAN_EDIT", "true"),
    ] {
        if env.get(key).map(String::as_str) != Some(want) {
            problems.push(format!("grafana: {key} must be {want}"));
        }
    }
    problems
}

#[test]
fn the_tracer_runs_with_only_what_the_readme_says_it_needs() {
    let compose = Compose::load();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let needs = readme
        .split("\n## What it needs\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a \"What it needs\" section");
    for (caps, when) in [(&CAPS[..], "--links"), (&NO_LINKS_CAPS, "without --links")] {
        let listed = caps
            .iter()
            .map(|c| format!("`CAP_{c}`"))
            .collect::<Vec<_>>()
            .join(" + ");
        assert!(
            needs.contains(&format!("| {listed} |")),
            "README's \"What it needs\" does not give {listed} ({when})"
        );
    }
    assert!(needs.contains("`--links`"));
    fail_on(tracer_problems(&compose, &compose.collector()));
    assert_eq!(
        tracer_target(&compose, &compose.collector()),
        Ok((4317, Protocol::Grpc))
    );
}

#[test]
fn compose_publishes_and_mounts_only_what_exists() {
    let compose = Compose::load();
    fail_on(compose_problems(&compose, &listening(&compose)));
}

#[test]
fn prometheus_and_grafana_point_at_real_ports() {
    let compose = Compose::load();
    fail_on(viewer_problems(&compose, &listening(&compose)));
}

/// README's table of the tracer's own metrics: name → "counter" or "gauge"
/// ("`a.b.c` / `.d`" names a.b.c and a.b.d).
fn documented_metrics() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut out = BTreeMap::new();
    for row in readme
        .lines()
        .filter(|l| l.starts_with("| `otel_tcpstates."))
    {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (names, kind) = (cells[1], cells[2]);
        let mut first = String::new();
        for name in names.split('/').map(|n| n.trim().trim_matches('`')) {
            if first.is_empty() {
                first = name.to_owned();
                out.insert(name.to_owned(), kind.to_owned());
            } else {
                let stem = first.rsplit_once('.').expect("a dotted name").0;
                out.insert(format!("{stem}{name}"), kind.to_owned());
            }
        }
    }
    assert!(out.len() >= 10, "README's metrics table: {out:?}");
    out
}

/// `args` with `flag`'s value (`--flag V` or `--flag=V`) replaced.
fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            out.push(arg.clone());
            out.push(value.to_owned());
            args.next();
        } else if arg.starts_with(&format!("{flag}=")) {
            out.push(format!("{flag}={value}"));
        } else {
            out.push(arg.clone());
        }
    }
    out
}

/// The name rotel knows an exporter by: "otlp_grpc/jaeger" → "jaeger".
fn rotel_name(id: &str) -> String {
    id.rsplit('/')
        .next()
        .unwrap_or(id)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}

/// Where a receiver standing in for `endpoint` takes `protocol`: its own
/// address, with the endpoint's base path kept.
fn stand_in(receiver: &Receiver, endpoint: &Endpoint, protocol: Protocol) -> String {
    match protocol {
        Protocol::Grpc => receiver.grpc_endpoint(),
        Protocol::Http => format!("{}{}", receiver.http_endpoint(), endpoint.path),
    }
}

fn attr(value: &Attr) -> String {
    match value {
        Attr::Str(s) => s.clone(),
        Attr::Int(i) => i.to_string(),
        Attr::Double(d) => d.to_string(),
        Attr::Bool(b) => b.to_string(),
        Attr::Other(o) => o.clone(),
    }
}

fn attrs(map: &BTreeMap<String, Attr>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", attr(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A trace as a person reads it: the root, then its states, each with its
/// kernel-measured duration.
fn render(root: &ReceivedSpan, children: &[ReceivedSpan]) -> String {
    let ms = |s: &ReceivedSpan| s.duration_ns() as f64 / 1e6;
    let kind = match root.kind {
        KIND_CLIENT => "CLIENT",
        KIND_SERVER => "SERVER",
        _ => "INTERNAL",
    };
    let status = match root.status_code {
        2 => format!("ERROR: {}", root.status_message),
        _ => "ok".to_owned(),
    };
    let mut out = format!(
        "{} ({kind}, {status})  trace {}  {:.3} ms\n    resource: {}\n    attributes: {}\n",
        root.name,
        root.trace_id,
        ms(root),
        attrs(&root.resource),
        attrs(&root.attributes),
    );
    for (i, child) in children.iter().enumerate() {
        let branch = if i + 1 == children.len() {
            "└──"
        } else {
            "├──"
        };
        let next = child.str_attr("tcpstates.next_state").unwrap_or("-");
        let _ = writeln!(
            out,
            "{branch} {:<12} {:>10.3} ms  -> {next}",
            child.name,
            ms(child)
        );
    }
    out
}

/// What two backends must agree on for one socket: everything but the ids and
/// the times, which each path's own eBPF program took (see `durations`).
fn shape(root: &ReceivedSpan, children: &[ReceivedSpan]) -> Vec<String> {
    std::iter::once(root)
        .chain(children)
        .map(|s| {
            format!(
                "{} kind={} status={}:{} {}",
                s.name,
                s.kind,
                s.status_code,
                s.status_message,
                attrs(&s.attributes)
            )
        })
        .collect()
}

/// Each span's duration. The paths' programs run one after the other on each
/// transition, each reading the kernel clock itself: microseconds apart.
fn durations(root: &ReceivedSpan, children: &[ReceivedSpan]) -> Vec<u64> {
    std::iter::once(root)
        .chain(children)
        .map(ReceivedSpan::duration_ns)
        .collect()
}

/// How far apart two paths' durations of one state may be.
const CLOCK_READS_APART_NS: u64 = 1_000_000;

/// The compose topology, run: the daemon with compose's command and environment
/// (its endpoint moved to the collector's free port), rotel configured from
/// agent.yaml's pipelines (the daemon's receiver protocol; one named exporter
/// per backend, with that exporter's protocol and path), and a receiver standing
/// in for each backend. One real connection; every traces backend gets both of
/// its sockets' complete traces, the metrics backend the daemon's counters.
///
/// rotel (0.0.1a15, the newest release) routes a signal to one exporter only,
/// so the collector's fan-out to both traces backends is built as one daemon →
/// rotel path per backend, all running at once and seeing the same connection.
#[test]
fn the_compose_topology_delivers_each_connection_to_every_backend() {
    if !root_or_skip("the_compose_topology_delivers_each_connection_to_every_backend") {
        return;
    }
    let started = Instant::now();
    let compose = Compose::load();
    let agent = compose.collector();
    let (_, protocol) = tracer_target(&compose, &agent).unwrap_or_else(|e| panic!("{e}"));
    let args = compose.command(TRACER);
    let env = compose.environment(TRACER);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let metrics = agent.pipeline("metrics").expect("a metrics pipeline");
    let [metrics_id] = &metrics.exporters[..] else {
        panic!("rotel takes one metrics exporter: {:?}", metrics.exporters);
    };
    let (metrics_at, metrics_protocol) = agent.exporter_target(metrics_id).unwrap();
    let prometheus = Receiver::start();
    let metrics_export = Export {
        name: rotel_name(metrics_id),
        signal: RotelSignal::Metrics,
        endpoint: stand_in(&prometheus, &metrics_at, metrics_protocol),
        protocol: metrics_protocol.rotel(),
    };

    struct Backend {
        exporter: String,
        protocol: Protocol,
        receiver: Receiver,
        _collector: Rotel,
    }
    let mut backends = Vec::new();
    let mut tracers = Vec::new();
    for id in agent
        .pipeline("traces")
        .expect("a traces pipeline")
        .exporters
    {
        let (endpoint, backend_protocol) = agent.exporter_target(&id).unwrap();
        let receiver = Receiver::start();
        let collector = Rotel::start_exporting(&[
            Export {
                name: rotel_name(&id),
                signal: RotelSignal::Traces,
                endpoint: stand_in(&receiver, &endpoint, backend_protocol),
                protocol: backend_protocol.rotel(),
            },
            metrics_export.clone(),
        ]);
        let collector_endpoint = match protocol {
            Protocol::Grpc => collector.grpc_endpoint(),
            Protocol::Http => collector.http_endpoint(),
        };
        let args = with_flag(&args, "--otlp-endpoint", &collector_endpoint);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tracers.push(Tracer::start_with_env(&args, &env));
        backends.push(Backend {
            exporter: id,
            protocol: backend_protocol,
            receiver,
            _collector: collector,
        });
    }
    assert!(backends.len() >= 2, "traces go to Jaeger and Tempo");

    let (listener, server) = listen("127.0.0.1");
    let (client, _) = connect_hold_close(&listener, Duration::from_millis(20));
    let (cp, sp) = (client.port(), server.port());
    let complete = |spans: &[ReceivedSpan]| {
        [(cp, sp, 4), (sp, cp, 4)]
            .iter()
            .all(|&(local, peer, states)| {
                trace_of(spans, local, peer).is_some_and(|(_, children)| children.len() == states)
            })
    };
    let received: Vec<Vec<ReceivedSpan>> = backends
        .iter()
        .map(|b| b.receiver.wait_for(WAIT, complete))
        .collect();
    for tracer in tracers {
        let done = tracer.stop_with(Signal::SIGTERM);
        assert!(done.status.success(), "{:?}", done.stderr);
    }

    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    type Seen = (String, Vec<String>, Vec<u64>);
    let mut shapes: BTreeMap<(u16, u16), Vec<Seen>> = BTreeMap::new();
    for (backend, spans) in backends.iter().zip(&received) {
        let who = format!("{} ({:?})", backend.exporter, backend.protocol);
        for (local, peer, kind, states) in [
            (
                cp,
                sp,
                KIND_CLIENT,
                ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"],
            ),
            (
                sp,
                cp,
                KIND_SERVER,
                ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"],
            ),
        ] {
            let (root, children) = trace_of(spans, local, peer)
                .unwrap_or_else(|| panic!("{who}: no trace for {local}->{peer} in {spans:#?}"));
            eprintln!(
                "{who} received, for 127.0.0.1:{local} -> 127.0.0.1:{peer}:\n{}",
                render(&root, &children)
            );
            assert_eq!(root.name, ROOT);
            assert_eq!(root.kind, kind, "{who}");
            let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
            assert_eq!(names, states, "{who}");
            assert!(
                children
                    .iter()
                    .all(|c| c.parent_span_id == root.span_id && c.trace_id == root.trace_id)
            );
            assert_eq!(
                (root.start_ns, root.end_ns),
                (children[0].start_ns, children[3].end_ns),
                "{who}: the root spans its states"
            );
            assert_eq!(
                root.resource.get("service.name"),
                Some(&Attr::Str("otel-tcpstates".into()))
            );
            assert_eq!(
                root.resource.get("host.name"),
                Some(&Attr::Str(hostname.trim().into()))
            );
            let transport = match backend.protocol {
                Protocol::Grpc => "grpc",
                Protocol::Http => "http",
            };
            assert_eq!(root.transport, transport, "{who}");
            shapes.entry((local, peer)).or_default().push((
                who.clone(),
                shape(&root, &children),
                durations(&root, &children),
            ));
        }
    }
    for ((local, peer), seen) in &shapes {
        let (first, first_shape, first_durations) = &seen[0];
        for (other, other_shape, other_durations) in &seen[1..] {
            assert_eq!(
                first_shape, other_shape,
                "{local}->{peer}: {first} and {other} got different traces"
            );
            let apart = first_durations
                .iter()
                .zip(other_durations)
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert!(
                apart.is_some_and(|ns| ns < CLOCK_READS_APART_NS),
                "{local}->{peer}: {first} {first_durations:?} ns, {other} {other_durations:?} ns"
            );
        }
    }

    // The daemons send their counters once more at exit.
    let documented = documented_metrics();
    let deadline = Instant::now() + WAIT;
    while !documented
        .keys()
        .all(|name| prometheus.metrics().contains_key(name))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = prometheus.metrics();
    eprintln!(
        "{metrics_id} ({metrics_protocol:?}) received at {:?}: {}",
        prometheus.http_paths(),
        got.iter()
            .map(|(name, m)| format!("{name}={} ({})", m.value, m.kind))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, kind) in &documented {
        let metric = got
            .get(name)
            .unwrap_or_else(|| panic!("{metrics_id}: no {name} in {got:#?}"));
        let want = if kind == "gauge" { "gauge" } else { "sum" };
        assert_eq!(metric.kind, want, "{name}");
        assert_eq!(metric.service_name.as_deref(), Some("otel-tcpstates"));
        let transport = match metrics_protocol {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        };
        assert_eq!(metric.transport, transport, "{name}");
    }
    assert!(got["otel_tcpstates.events.seen"].value > 0);
    assert!(got["otel_tcpstates.spans.exported"].value > 0);
    let signal_path = format!("{}/v1/metrics", metrics_at.path);
    assert_eq!(
        prometheus.http_paths(),
        BTreeSet::from([signal_path]),
        "{metrics_id}: metrics at the path the agent configures"
    );
    eprintln!("compose topology run in {:?}", started.elapsed());
}

/// The PATH the image's entrypoint does not need, but the wrappers here do.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The tracer's compose service, run here as Docker would run it, less the
/// capabilities in `without` (compose's spelling) and with `extra` arguments: as
/// the image's user (root: its runtime stage sets no other), every capability
/// dropped but those cap_add adds, a mount and cgroup namespace of its own with
/// its volumes bound where compose binds them, its command (its endpoint a test
/// receiver, same protocol) and environment, tracing the test's port only.
fn run_compose_tracer(tag: &str, without: &[&str], extra: &[&str]) -> Run {
    let compose = Compose::load();
    let runtime = Dockerfile::load().stages().pop().expect("a runtime stage");
    assert!(
        runtime
            .instructions
            .iter()
            .all(|(k, a)| k != "USER" || ["root", "0", "0:0"].contains(&a.as_str())),
        "this run is for an image that runs as root"
    );
    let service = compose.service(TRACER);
    assert_eq!(strings(&service["cap_drop"]), ["ALL"]);
    let added: Vec<String> = strings(&service["cap_add"])
        .into_iter()
        .filter(|c| !without.contains(&c.as_str()))
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let (_, protocol) =
        tracer_target(&compose, &compose.collector()).unwrap_or_else(|e| panic!("{e}"));
    let receiver = Receiver::start();
    let endpoint = match protocol {
        Protocol::Grpc => receiver.grpc_endpoint(),
        Protocol::Http => receiver.http_endpoint(),
    };
    let (listener, server) = listen("127.0.0.1");
    let mut args = with_flag(&compose.command(TRACER), "--otlp-endpoint", &endpoint);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.extend(["-D".into(), server.port().to_string()]);

    let (mut command, _stage) = in_container(&compose.binds(TRACER), tag);
    command
        .arg("setpriv")
        .arg(format!("--bounding-set=-all,{}", added.join(",")))
        .arg("--inh-caps=-all")
        .arg(BIN)
        .args(&args)
        .env_clear()
        .env("PATH", PATH)
        .envs(compose.environment(TRACER));
    Run::go(command, false, &receiver, &listener)
}

/// The tracer as compose runs it traces a connection, and the packet programs
/// behind span links are attached to the host's cgroup v2 root (the one the
/// daemon finds in the container's /proc/self/mountinfo: the /sys/fs/cgroup
/// volume), with no warning.
#[test]
fn the_compose_tracer_attaches_span_links() {
    if !root_or_skip("the_compose_tracer_attaches_span_links") {
        return;
    }
    let run = run_compose_tracer("compose", &[], &[]);
    let (root, _) = run.traced();
    assert_eq!(root.kind, KIND_CLIENT);
    run.assert_links_attached();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// Without NET_ADMIN it runs and exports as before, and says once that span
/// links are off, and why.
#[test]
fn the_compose_tracer_without_net_admin_exports_without_span_links() {
    if !root_or_skip("the_compose_tracer_without_net_admin_exports_without_span_links") {
        return;
    }
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let run = run_compose_tracer("compose-no-net-admin", &[net_admin], &[]);
    run.traced();
    run.assert_links_off_for_want_of_net_admin();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// With `--no-links`, BPF and PERFMON alone: nothing said of span links, nothing
/// of them loaded.
#[test]
fn the_compose_tracer_with_no_links_needs_only_bpf_and_perfmon() {
    if !root_or_skip("the_compose_tracer_with_no_links_needs_only_bpf_and_perfmon") {
        return;
    }
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let left: BTreeSet<&str> = CAPS.into_iter().filter(|c| *c != net_admin).collect();
    assert_eq!(left, BTreeSet::from(NO_LINKS_CAPS));
    let run = run_compose_tracer("compose-no-links", &[net_admin], &["--no-links"]);
    run.traced();
    run.assert_no_links_loaded();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}
