//! The deployment: docker-compose.yml, collector-config/, deploy/ and the
//! Dockerfile are read and checked against each other (every address lands on a
//! service that listens there, for that protocol; every pipeline component is
//! defined and used), and the compose topology is run for real: the daemon with
//! compose's arguments, a real collector (rotel) configured from agent.yaml's
//! pipelines, and a receiver standing in for each backend.
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use support::{
    deploy::{
        COLLECTOR, Collector, Compose, Dockerfile, Endpoint, LINKS_CAP, Listener, Protocol, Run,
        Serves, TRACER, copy_from, exec_form, in_container, listeners, reaches, read_yaml,
        read_yaml_documents, root, strings, tracer_target, yaml_files,
    },
    otlp::{KIND_CLIENT, KIND_SERVER, ROOT, ReceivedSpan, Receiver, Value as Attr, WAIT, trace_of},
    rotel::{Export, Rotel, Signal as RotelSignal},
    *,
};

type Listeners = BTreeMap<String, Vec<Listener>>;

/// What the tracer's container needs as root (README, "What it needs"):
/// CAP_BPF and CAP_PERFMON load the programs, CAP_NET_ADMIN attaches the packet
/// programs behind span links to the cgroup v2 root.
const CAPS: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];
/// With `--no-links`.
const NO_LINKS_CAPS: [&str; 2] = ["BPF", "PERFMON"];

/// The collector configurations besides the agent (which compose names).
const GATEWAY: &str = "collector-config/gateway.yaml";
const GATEWAY_BACKEND: &str = "collector-config/gateway-backend.yaml";

fn fail_on(problems: Vec<String>) {
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

fn listening(compose: &Compose) -> Listeners {
    listeners(compose).unwrap_or_else(|e| panic!("{e}"))
}

/// The agent: complete pipelines, the processors the deployment relies on, and
/// every exporter aimed at a compose service that takes that protocol there.
fn agent_problems(agent: &Collector, listeners: &Listeners) -> Vec<String> {
    let mut problems = agent.pipeline_problems();
    let file = &agent.file;
    for name in ["traces", "metrics"] {
        match agent.pipeline(name) {
            Some(p) if !p.processors.iter().any(|x| x == "batch") => {
                problems.push(format!("{file}: pipeline {name} does not batch"));
            }
            Some(_) => {}
            None => problems.push(format!("{file}: no {name} pipeline")),
        }
    }
    let detectors = strings(&agent.component("processors", "resourcedetection")["detectors"]);
    if detectors != ["env", "system"] {
        problems.push(format!(
            "{file}: resourcedetection detectors {detectors:?}, want [env, system]"
        ));
    }
    for pipeline in agent.pipelines() {
        for id in &pipeline.exporters {
            let what = format!("{file} exporter {id}");
            match agent.exporter_target(id) {
                Ok((endpoint, protocol)) => {
                    if let Err(e) = reaches(listeners, &what, &endpoint, Serves::Otlp(protocol)) {
                        problems.push(e);
                    }
                }
                Err(e) => problems.push(e),
            }
        }
    }
    let traced_to: BTreeSet<String> = agent
        .pipeline("traces")
        .map(|p| p.exporters)
        .unwrap_or_default()
        .iter()
        .filter_map(|id| agent.exporter_target(id).ok())
        .map(|(endpoint, _)| endpoint.host)
        .collect();
    for backend in ["jaeger", "tempo"] {
        if !traced_to.contains(backend) {
            problems.push(format!("{file}: traces do not go to {backend}"));
        }
    }
    problems
}

/// The daemon's service: where it sends, and only the privileges and mounts
/// README "What it needs" lists.
fn tracer_problems(compose: &Compose, agent: &Collector) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = tracer_target(compose, agent) {
        problems.push(e);
    }
    let service = compose.service(TRACER);
    let set = |key: &str| -> BTreeSet<String> { strings(&service[key]).into_iter().collect() };
    let want = |caps: &[&str]| {
        caps.iter()
            .map(|c| (*c).to_owned())
            .collect::<BTreeSet<_>>()
    };
    if set("cap_drop") != want(&["ALL"]) {
        problems.push(format!(
            "{TRACER}: cap_drop {:?}, want [ALL]",
            set("cap_drop")
        ));
    }
    // Span links (on unless --no-links) take NET_ADMIN; without them it is spared.
    let caps: &[&str] = if compose.command(TRACER).iter().any(|a| a == "--no-links") {
        &NO_LINKS_CAPS
    } else {
        &CAPS
    };
    if set("cap_add") != want(caps) {
        problems.push(format!(
            "{TRACER}: cap_add {:?}, want exactly [{}]",
            set("cap_add"),
            caps.join(", ")
        ));
    }
    for key in [
        "privileged",
        "security_opt",
        "user",
        "cgroup_parent",
        "devices",
    ] {
        if !service[key].is_null() {
            problems.push(format!("{TRACER}: {key} is set; it needs none"));
        }
    }
    for (key, want) in [("pid", "host"), ("network_mode", "host")] {
        if service[key].as_str() != Some(want) {
            problems.push(format!("{TRACER}: {key} must be {want}"));
        }
    }
    if service.pointer("/ulimits/memlock") != Some(&Value::from(-1)) {
        problems.push(format!(
            "{TRACER}: ulimits.memlock must be -1 (BPF maps on kernels before 5.11)"
        ));
    }
    for path in [
        "/sys/kernel/btf/vmlinux",
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
    ] {
        let mounted = compose
            .binds(TRACER)
            .into_iter()
            .any(|b| b.source == path && b.target == path && b.read_only);
        if !mounted {
            problems.push(format!("{TRACER}: mount {path} read-only at the same path"));
        }
    }
    let context = match &service["build"] {
        Value::String(context) => Some(context.as_str()),
        build => build["context"].as_str(),
    };
    if context != Some(".") {
        problems.push(format!(
            "{TRACER}: build the repository's Dockerfile (build: .)"
        ));
    }
    problems
}

/// Published ports are ports the services listen on, bound to 127.0.0.1 only;
/// the configuration files mounted from the repository exist, read-only.
fn compose_problems(compose: &Compose, listeners: &Listeners) -> Vec<String> {
    let mut problems = Vec::new();
    for name in compose.service_names() {
        for published in compose.published(&name) {
            let listens = listeners[&name]
                .iter()
                .any(|l| l.port == published.container_port);
            if !listens {
                problems.push(format!(
                    "{name}: publishes port {}, where it does not listen",
                    published.container_port
                ));
            }
            if published.host_ip.as_deref() != Some("127.0.0.1") {
                problems.push(format!(
                    "{name}: publishes {} beyond this machine; bind it to 127.0.0.1",
                    published.host_port
                ));
            }
        }
        for bind in compose.binds(&name) {
            if let Some(rel) = bind.source.strip_prefix("./") {
                if !root().join(rel).exists() {
                    problems.push(format!("{name}: mounts {rel}, which does not exist"));
                }
                if !bind.read_only {
                    problems.push(format!("{name}: mount {rel} read-only"));
                }
            }
        }
        let image = compose.service(&name)["image"].as_str().unwrap_or("");
        let built = !compose.service(&name)["build"].is_null();
        if !built && (image.is_empty() || image.ends_with(":latest") || !image.contains(':')) {
            problems.push(format!("{name}: pin its image's version, not {image:?}"));
        }
    }
    problems
}

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

/// The fleet tiers: the load balancer routes by trace ID to the port the
/// backends take OTLP/gRPC on; the backends sample on errors, slow handshakes
/// and a share of the rest, then export to the same backends as the agent.
fn gateway_problems(
    gateway: &Collector,
    backend: &Collector,
    listeners: &Listeners,
) -> Vec<String> {
    let mut problems = gateway.pipeline_problems();
    problems.extend(backend.pipeline_problems());
    let (g, b) = (&gateway.file, &backend.file);

    let traces = gateway.pipeline("traces");
    if traces.as_ref().map(|p| p.exporters.clone()) != Some(vec!["loadbalancing".to_owned()]) {
        problems.push(format!(
            "{g}: traces must go to the loadbalancing exporter only"
        ));
    }
    if traces.is_some_and(|p| p.processors.iter().any(|x| x == "tail_sampling")) {
        problems.push(format!(
            "{g}: sampling belongs in the backends, which see whole traces"
        ));
    }
    let lb = gateway.component("exporters", "loadbalancing");
    if lb["routing_key"].as_str() != Some("traceID") {
        problems.push(format!("{g}: loadbalancing routing_key must be traceID"));
    }
    if !lb.pointer("/protocol/otlp").is_some_and(Value::is_object) {
        problems.push(format!(
            "{g}: loadbalancing must speak OTLP (protocol.otlp)"
        ));
    }
    let ports: Vec<u64> = match (lb.pointer("/resolver/dns"), lb.pointer("/resolver/k8s")) {
        (Some(dns), _) => dns["port"].as_u64().into_iter().collect(),
        (None, Some(k8s)) => k8s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect(),
        (None, None) => Vec::new(),
    };
    let takes_grpc: Vec<u16> = backend
        .listeners()
        .iter()
        .filter(|l| l.serves == Serves::Otlp(Protocol::Grpc))
        .map(|l| l.port)
        .collect();
    if ports.is_empty() || ports.iter().any(|p| !takes_grpc.contains(&(*p as u16))) {
        problems.push(format!(
            "{g}: the resolver's ports {ports:?} must be where {b} takes OTLP/gRPC ({takes_grpc:?})"
        ));
    }

    match backend.pipeline("traces") {
        Some(p) => {
            let at = |name: &str| p.processors.iter().position(|x| x == name);
            match (at("tail_sampling"), at("batch")) {
                (Some(sampling), Some(batch)) if sampling < batch => {}
                _ => problems.push(format!(
                    "{b}: traces need tail_sampling, then batch: {:?}",
                    p.processors
                )),
            }
            for id in &p.exporters {
                let what = format!("{b} exporter {id}");
                match backend.exporter_target(id) {
                    Ok((endpoint, protocol)) => {
                        if let Err(e) = reaches(listeners, &what, &endpoint, Serves::Otlp(protocol))
                        {
                            problems.push(e);
                        }
                    }
                    Err(e) => problems.push(e),
                }
            }
        }
        None => problems.push(format!("{b}: no traces pipeline")),
    }
    let policies = backend.component("processors", "tail_sampling")["policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let has = |kind: &str, check: &dyn Fn(&Value) -> bool| {
        policies
            .iter()
            .any(|p| p["type"].as_str() == Some(kind) && check(&p[kind]))
    };
    if !has("status_code", &|s| strings(&s["status_codes"]) == ["ERROR"]) {
        problems.push(format!("{b}: no policy keeping every ERROR trace"));
    }
    let handshake = |s: &Value| {
        let conditions = strings(&s["span"]).join(" ");
        conditions.contains("\"SYN_SENT\"") && conditions.contains("\"SYN_RECV\"")
    };
    if !has("ottl_condition", &handshake) {
        problems.push(format!(
            "{b}: no policy on SYN_SENT and SYN_RECV spans (slow handshakes)"
        ));
    }
    let a_share = |s: &Value| {
        s["sampling_percentage"]
            .as_f64()
            .is_some_and(|p| p > 0.0 && p < 100.0)
    };
    if !has("probabilistic", &a_share) {
        problems.push(format!(
            "{b}: no probabilistic policy keeping a share of the rest"
        ));
    }
    problems
}

/// The image: named stages, a build stage running the project's own setup and a
/// locked release build, a runtime stage without a Rust toolchain whose
/// entrypoint is the binary it copied from the build stage.
fn dockerfile_problems(dockerfile: &Dockerfile, dockerignore: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let stages = dockerfile.stages();
    let mut named = Vec::new();
    for stage in &stages {
        let Some(name) = &stage.name else {
            problems.push(format!(
                "Dockerfile: stage FROM {} has no name",
                stage.image
            ));
            continue;
        };
        for (keyword, args) in &stage.instructions {
            if keyword != "COPY" {
                continue;
            }
            if let Some(from) = copy_from(args)
                && !named.contains(&from.to_owned())
            {
                problems.push(format!(
                    "Dockerfile: {name}: COPY --from={from}, no such earlier stage"
                ));
            }
        }
        named.push(name.clone());
    }
    let Some(runtime) = stages.last() else {
        return vec!["Dockerfile: no stages".to_owned()];
    };
    let image = runtime.image.to_lowercase();
    if image.starts_with("rust") || image.contains("/rust") || image.contains("cargo") {
        problems.push(format!(
            "Dockerfile: the runtime stage runs on {image}, a Rust toolchain image"
        ));
    }
    let copied: Vec<(String, String, String)> = runtime
        .instructions
        .iter()
        .filter(|(k, _)| k == "COPY")
        .filter_map(|(_, args)| {
            let from = copy_from(args)?.to_owned();
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            match words[..] {
                [source, dest] => Some((from, source.to_owned(), dest.to_owned())),
                _ => None,
            }
        })
        .collect();
    let binary = copied
        .iter()
        .find(|(_, source, _)| source.ends_with("/otel-tcpstates"));
    let entrypoint = runtime
        .instructions
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .and_then(|(_, args)| exec_form(args));
    match (binary, entrypoint) {
        (Some((from, _, dest)), Some(entrypoint)) => {
            if entrypoint != [dest.clone()] {
                problems.push(format!(
                    "Dockerfile: ENTRYPOINT {entrypoint:?} is not the copied binary {dest}"
                ));
            }
            let build = stages.iter().find(|s| s.name.as_ref() == Some(from));
            let runs: Vec<&str> = build
                .into_iter()
                .flat_map(|s| &s.instructions)
                .filter(|(k, _)| k == "RUN")
                .map(|(_, a)| a.as_str())
                .collect();
            if !runs.iter().any(|r| r.contains("scripts/setup.sh")) {
                problems.push(format!(
                    "Dockerfile: stage {from} does not run scripts/setup.sh"
                ));
            }
            let release = |r: &&str| {
                r.contains("cargo build") && r.contains("--release") && r.contains("--locked")
            };
            if !runs.iter().any(release) {
                problems.push(format!(
                    "Dockerfile: stage {from} has no `cargo build --release --locked`"
                ));
            }
        }
        (None, _) => problems.push(
            "Dockerfile: the runtime stage copies no otel-tcpstates binary from a stage".to_owned(),
        ),
        (_, None) => {
            problems.push("Dockerfile: the runtime stage needs an exec-form ENTRYPOINT".to_owned())
        }
    }
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for must in ["target", ".git"] {
        if !ignored.contains(&must) {
            problems.push(format!(
                ".dockerignore: add {must}/ (large, and not needed)"
            ));
        }
    }
    for needed in [
        "Cargo.lock",
        "Cargo.toml",
        "scripts",
        "rust-toolchain.toml",
        "common",
    ] {
        if ignored.contains(&needed) {
            problems.push(format!(".dockerignore: the build needs {needed}"));
        }
    }
    problems
}

fn dockerignore() -> String {
    std::fs::read_to_string(root().join(".dockerignore")).expect("read .dockerignore")
}

#[test]
fn every_deployment_yaml_file_parses() {
    let files = yaml_files();
    for file in &files {
        let documents = read_yaml_documents(file);
        assert!(!documents.is_empty(), "{file} is empty");
        for document in documents {
            assert!(
                document.is_object(),
                "{file}: each document a mapping, got {document}"
            );
        }
    }
    for expected in [
        "docker-compose.yml",
        "collector-config/agent.yaml",
        GATEWAY,
        GATEWAY_BACKEND,
        "deploy/tempo.yaml",
        "deploy/prometheus.yml",
        "deploy/grafana/provisioning/datasources/datasources.yaml",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} missing from {files:?}"
        );
    }
}

#[test]
fn the_agent_sends_each_signal_where_a_service_takes_it() {
    let compose = Compose::load();
    assert_eq!(
        compose.config_file(COLLECTOR, "--config"),
        "collector-config/agent.yaml"
    );
    fail_on(agent_problems(&compose.collector(), &listening(&compose)));
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
    for (caps, when) in [(&CAPS[..], "span links on"), (&NO_LINKS_CAPS, "--no-links")] {
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
    assert!(needs.contains("`--no-links`"));
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

#[test]
fn the_gateway_balances_by_trace_to_the_sampling_backends() {
    let compose = Compose::load();
    fail_on(gateway_problems(
        &Collector::load(GATEWAY),
        &Collector::load(GATEWAY_BACKEND),
        &listening(&compose),
    ));
}

/// The Kubernetes DaemonSet's agent collector forwards to the gateway tier: to
/// the port gateway.yaml takes that protocol on, and each signal it forwards has
/// a pipeline there.
#[test]
fn the_kubernetes_agent_forwards_to_the_gateways_receiver() {
    const MANIFEST: &str = "deploy/kubernetes/otel-tcpstates.yaml";
    let agents: Vec<Collector> = read_yaml_documents(MANIFEST)
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .flat_map(|d| d["data"].as_object().cloned().unwrap_or_default())
        .map(|(key, text)| {
            let text = text.as_str().expect("ConfigMap data is text");
            Collector::parse(&format!("{MANIFEST} ConfigMap {key}"), text)
        })
        .collect();
    assert!(!agents.is_empty(), "{MANIFEST}: no collector configuration");
    let gateway = Collector::load(GATEWAY);
    let receivers = gateway.listeners();
    let signal = |pipeline: &str| pipeline.split('/').next().unwrap_or(pipeline).to_owned();
    let gateway_signals: BTreeSet<String> = gateway
        .pipelines()
        .iter()
        .map(|p| signal(&p.name))
        .collect();
    let mut forwarded = BTreeSet::new();
    for agent in &agents {
        for pipeline in agent.pipelines() {
            for id in &pipeline.exporters {
                let (endpoint, protocol) =
                    agent.exporter_target(id).unwrap_or_else(|e| panic!("{e}"));
                if !endpoint.host.starts_with("otel-gateway.") {
                    continue;
                }
                assert!(
                    receivers
                        .iter()
                        .any(|l| l.port == endpoint.port && l.serves == Serves::Otlp(protocol)),
                    "{}: {id} sends {protocol:?} to port {}; {GATEWAY} listens for {receivers:?}",
                    agent.file,
                    endpoint.port
                );
                forwarded.insert(signal(&pipeline.name));
            }
        }
    }
    assert!(
        !forwarded.is_empty(),
        "{MANIFEST}: nothing goes to otel-gateway.*"
    );
    assert!(
        forwarded.is_subset(&gateway_signals),
        "{MANIFEST} forwards {forwarded:?}; {GATEWAY} has pipelines for {gateway_signals:?}"
    );
}

#[test]
fn the_image_builds_with_the_projects_setup_and_ships_only_the_binary() {
    fail_on(dockerfile_problems(&Dockerfile::load(), &dockerignore()));
}

/// Each check above finds the mistake it guards against, so their passing means
/// something.
#[test]
fn each_check_catches_a_broken_reference() {
    let compose = Compose::load();
    let agent = compose.collector();
    let listeners = listening(&compose);
    let gateway = Collector::load(GATEWAY);
    let backend = Collector::load(GATEWAY_BACKEND);

    let set = |value: &mut Value, pointer: &str, new: Value| {
        *value
            .pointer_mut(pointer)
            .unwrap_or_else(|| panic!("no {pointer}")) = new;
    };
    let agent_with = |pointer: &str, new: Value| {
        let mut changed = agent.clone();
        set(&mut changed.config, pointer, new);
        agent_problems(&changed, &listeners)
    };
    let compose_with = |pointer: &str, new: Value| {
        let mut changed = compose.clone();
        set(&mut changed.config, pointer, new);
        changed
    };
    let expect = |what: &str, problems: Vec<String>, mentions: &str| {
        assert!(
            problems.iter().any(|p| p.contains(mentions)),
            "{what}: no problem mentioning {mentions:?} in {problems:#?}"
        );
    };

    expect(
        "Tempo's OTLP port mistyped",
        agent_with("/exporters/otlp~1tempo/endpoint", "tempo:4316".into()),
        "tempo:4316 does not serve",
    );
    expect(
        "OTLP/HTTP aimed at a gRPC port",
        agent_with(
            "/exporters/otlphttp~1prometheus/endpoint",
            "http://tempo:4317".into(),
        ),
        "does not serve Otlp(Http)",
    );
    expect(
        "Prometheus' OTLP path wrong",
        agent_with(
            "/exporters/otlphttp~1prometheus/endpoint",
            "http://prometheus:9090/otlp".into(),
        ),
        "under \"/api/v1/otlp\"",
    );
    expect(
        "memory_limiter moved after batch",
        agent_with(
            "/service/pipelines/traces/processors",
            serde_json::json!(["resourcedetection", "batch", "memory_limiter"]),
        ),
        "must start with memory_limiter",
    );
    expect(
        "an exporter used but not defined",
        agent_with(
            "/service/pipelines/traces/exporters",
            serde_json::json!(["otlp/jaeger", "otlp/tempo", "otlp/zipkin"]),
        ),
        "otlp/zipkin, which is not defined",
    );
    expect(
        "an exporter defined but unused",
        agent_with(
            "/service/pipelines/traces/exporters",
            serde_json::json!(["otlp/jaeger"]),
        ),
        "otlp/tempo is defined but no pipeline uses it",
    );
    expect(
        "the tracer speaking gRPC to the HTTP port",
        tracer_problems(
            &compose_with(
                "/services/otel-tcpstates/command/1",
                "http://127.0.0.1:4318".into(),
            ),
            &agent,
        ),
        "speaks Grpc to port 4318",
    );
    expect(
        "the tracer sending to an unpublished port",
        tracer_problems(
            &compose_with(
                "/services/otel-tcpstates/command/1",
                "http://127.0.0.1:14317".into(),
            ),
            &agent,
        ),
        "does not publish",
    );
    expect(
        "one capability too many",
        tracer_problems(
            &compose_with(
                "/services/otel-tcpstates/cap_add",
                serde_json::json!(["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"]),
            ),
            &agent,
        ),
        "want exactly [BPF, PERFMON, NET_ADMIN]",
    );
    expect(
        "span links' capability missing",
        tracer_problems(
            &compose_with(
                "/services/otel-tcpstates/cap_add",
                serde_json::json!(["BPF", "PERFMON"]),
            ),
            &agent,
        ),
        "want exactly [BPF, PERFMON, NET_ADMIN]",
    );
    let mut no_links = compose.clone();
    no_links.config["services"][TRACER]["command"]
        .as_array_mut()
        .unwrap()
        .push("--no-links".into());
    expect(
        "NET_ADMIN kept with --no-links",
        tracer_problems(&no_links, &agent),
        "want exactly [BPF, PERFMON]",
    );
    expect(
        "a mount made writable",
        tracer_problems(
            &compose_with(
                "/services/otel-tcpstates/volumes/1",
                "/sys/kernel/tracing:/sys/kernel/tracing".into(),
            ),
            &agent,
        ),
        "mount /sys/kernel/tracing read-only",
    );
    expect(
        "Jaeger left listening on localhost",
        listeners_of(compose_with(
            "/services/jaeger/environment/JAEGER_LISTEN_HOST",
            "localhost".into(),
        )),
        "listens on localhost only",
    );
    expect(
        "a port published where nothing listens",
        compose_problems(
            &compose_with("/services/jaeger/ports/0", "127.0.0.1:16686:16868".into()),
            &listeners,
        ),
        "publishes port 16868",
    );
    expect(
        "an unpinned image",
        compose_problems(
            &compose_with("/services/tempo/image", "grafana/tempo:latest".into()),
            &listeners,
        ),
        "pin its image",
    );
    let mut no_otlp = compose.clone();
    no_otlp.config["services"]["prometheus"]["command"]
        .as_array_mut()
        .unwrap()
        .retain(|a| a != "--web.enable-otlp-receiver");
    expect(
        "Prometheus without its OTLP receiver",
        agent_problems(&agent, &listening(&no_otlp)),
        "prometheus:9090 does not serve Otlp(Http)",
    );
    let mut gateway_wrong = gateway.clone();
    set(
        &mut gateway_wrong.config,
        "/exporters/loadbalancing/resolver/dns/port",
        4318.into(),
    );
    set(
        &mut gateway_wrong.config,
        "/exporters/loadbalancing/routing_key",
        "service".into(),
    );
    let problems = gateway_problems(&gateway_wrong, &backend, &listeners);
    expect(
        "routing by service",
        problems.clone(),
        "routing_key must be traceID",
    );
    expect(
        "the resolver's port",
        problems,
        "the resolver's ports [4318]",
    );
    let mut no_errors = backend.clone();
    no_errors.config["processors"]["tail_sampling"]["policies"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "status_code");
    expect(
        "sampling without the error policy",
        gateway_problems(&gateway, &no_errors, &listeners),
        "no policy keeping every ERROR trace",
    );

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let broken = [
        (
            "COPY --from=build",
            "COPY --from=builder",
            "no such earlier stage",
        ),
        (
            "distroless/cc-debian12",
            "rust:1.91-slim",
            "a Rust toolchain image",
        ),
        (
            "ENTRYPOINT [\"/usr/local/bin/otel-tcpstates\"]",
            "ENTRYPOINT [\"/bin/otel-tcpstates\"]",
            "is not the copied binary",
        ),
        (
            "RUN bash scripts/setup.sh",
            "RUN true",
            "does not run scripts/setup.sh",
        ),
        (
            "--release --locked",
            "--release",
            "no `cargo build --release --locked`",
        ),
    ];
    for (from, to, mentions) in broken {
        assert!(
            dockerfile.contains(from),
            "the Dockerfile no longer has {from:?}"
        );
        let changed = Dockerfile::parse(&dockerfile.replace(from, to));
        expect(to, dockerfile_problems(&changed, &dockerignore()), mentions);
    }
    expect(
        ".dockerignore without target/",
        dockerfile_problems(&Dockerfile::load(), ".git/\n"),
        "add target/",
    );
}

fn listeners_of(compose: Compose) -> Vec<String> {
    listeners(&compose).err().into_iter().collect()
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

/// The name rotel knows an exporter by: "otlp/jaeger" → "jaeger".
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
