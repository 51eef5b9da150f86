//! The deployment's files as a whole (docker-compose.yml, collector-config/,
//! deploy/, the Dockerfile): each YAML file parses, and each static check of them
//! (tests/support/deploy/) catches the mistake it guards against.
mod support;

use serde_json::Value;
use support::deploy::{
    collector::{Collector, GATEWAY, GATEWAY_BACKEND, agent_problems, gateway_problems},
    compose::{Compose, TRACER, compose_problems, listeners, listening, tracer_problems},
    image::{Dockerfile, dockerfile_problems, dockerignore},
    read_yaml_documents, root, yaml_files,
};

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

/// Each check (tests/compose.rs, tests/collector.rs, tests/image.rs) finds the
/// mistake it guards against, so their passing means something.
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
        agent_with("/exporters/otlp_grpc~1tempo/endpoint", "tempo:4316".into()),
        "tempo:4316 does not serve",
    );
    expect(
        "OTLP/HTTP aimed at a gRPC port",
        agent_with(
            "/exporters/otlp_http~1prometheus/endpoint",
            "http://tempo:4317".into(),
        ),
        "does not serve Otlp(Http)",
    );
    expect(
        "Prometheus' OTLP path wrong",
        agent_with(
            "/exporters/otlp_http~1prometheus/endpoint",
            "http://prometheus:9090/otlp".into(),
        ),
        "under \"/api/v1/otlp\"",
    );
    expect(
        "memory_limiter moved after batch",
        agent_with(
            "/service/pipelines/traces/processors",
            serde_json::json!(["resource_detection", "batch", "memory_limiter"]),
        ),
        "must start with memory_limiter",
    );
    expect(
        "an exporter used but not defined",
        agent_with(
            "/service/pipelines/traces/exporters",
            serde_json::json!(["otlp_grpc/jaeger", "otlp_grpc/tempo", "otlp_grpc/zipkin"]),
        ),
        "otlp_grpc/zipkin, which is not defined",
    );
    expect(
        "an exporter defined but unused",
        agent_with(
            "/service/pipelines/traces/exporters",
            serde_json::json!(["otlp_grpc/jaeger"]),
        ),
        "otlp_grpc/tempo is defined but no pipeline uses it",
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
        "/exporters/load_balancing/resolver/dns/port",
        "4318".into(),
    );
    set(
        &mut gateway_wrong.config,
        "/exporters/load_balancing/routing_key",
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
