//! OpenTelemetry Collector configurations: the agent (collector-config/agent.yaml,
//! which compose mounts; the Kubernetes manifest's ConfigMap) and the gateway tier
//! (gateway.yaml, gateway-backend.yaml), read as pipelines, and what is wrong with
//! them.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{
    Endpoint, Listener, Protocol, Serves,
    compose::{Listeners, reaches},
    host_port, keys, read_yaml, strings,
};

/// The collector configurations besides the agent (which compose names).
pub const GATEWAY: &str = "collector-config/gateway.yaml";
pub const GATEWAY_BACKEND: &str = "collector-config/gateway-backend.yaml";

/// An OpenTelemetry Collector configuration.
#[derive(Clone, Debug)]
pub struct Collector {
    /// Its file, for messages.
    pub file: String,
    pub config: Value,
}

/// One pipeline of `service.pipelines`, e.g. "traces" or "metrics/2".
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    pub receivers: Vec<String>,
    pub processors: Vec<String>,
    pub exporters: Vec<String>,
}

impl Collector {
    pub fn load(rel: &str) -> Collector {
        Collector {
            file: rel.to_owned(),
            config: read_yaml(rel),
        }
    }

    /// A configuration held elsewhere, e.g. in a Kubernetes ConfigMap; `file`
    /// says where, for messages.
    pub fn parse(file: &str, text: &str) -> Collector {
        Collector {
            file: file.to_owned(),
            config: serde_saphyr::from_str(text)
                .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}")),
        }
    }

    pub fn pipelines(&self) -> Vec<Pipeline> {
        let pipelines = self.config.pointer("/service/pipelines");
        let Some(Value::Object(pipelines)) = pipelines else {
            return Vec::new();
        };
        pipelines
            .iter()
            .map(|(name, p)| Pipeline {
                name: name.clone(),
                receivers: strings(&p["receivers"]),
                processors: strings(&p["processors"]),
                exporters: strings(&p["exporters"]),
            })
            .collect()
    }

    pub fn pipeline(&self, name: &str) -> Option<Pipeline> {
        self.pipelines().into_iter().find(|p| p.name == name)
    }

    /// A component's settings, e.g. `component("exporters", "otlp_grpc/tempo")`.
    pub fn component(&self, kind: &str, id: &str) -> &Value {
        &self.config[kind][id]
    }

    /// What is wrong with how the pipelines use the components: one used but not
    /// defined, one defined but never used, a pipeline without receivers or
    /// exporters, memory_limiter anywhere but first.
    pub fn pipeline_problems(&self) -> Vec<String> {
        let file = &self.file;
        let mut problems = Vec::new();
        let pipelines = self.pipelines();
        if pipelines.is_empty() {
            problems.push(format!("{file}: no service.pipelines"));
        }
        for kind in ["receivers", "processors", "exporters"] {
            let defined = keys(&self.config[kind]);
            let mut used = BTreeSet::new();
            for p in &pipelines {
                let ids = match kind {
                    "receivers" => &p.receivers,
                    "processors" => &p.processors,
                    _ => &p.exporters,
                };
                for id in ids {
                    if !defined.contains(id) {
                        problems.push(format!(
                            "{file}: pipeline {} uses {kind} {id}, which is not defined",
                            p.name
                        ));
                    }
                    used.insert(id.clone());
                }
            }
            for id in defined.difference(&used) {
                problems.push(format!(
                    "{file}: {kind} {id} is defined but no pipeline uses it"
                ));
            }
        }
        let defined = keys(&self.config["extensions"]);
        let used: BTreeSet<String> = strings(&self.config["service"]["extensions"])
            .into_iter()
            .collect();
        for id in used.difference(&defined) {
            problems.push(format!(
                "{file}: service uses extension {id}, which is not defined"
            ));
        }
        for id in defined.difference(&used) {
            problems.push(format!(
                "{file}: extension {id} is defined but the service does not use it"
            ));
        }
        for p in &pipelines {
            if p.receivers.is_empty() || p.exporters.is_empty() {
                problems.push(format!(
                    "{file}: pipeline {} needs receivers and exporters",
                    p.name
                ));
            }
            // The limiter only protects what comes after it.
            if p.processors.first().map(String::as_str) != Some("memory_limiter") {
                problems.push(format!(
                    "{file}: pipeline {} must start with memory_limiter, has {:?}",
                    p.name, p.processors
                ));
            }
        }
        problems
    }

    /// Where an OTLP exporter sends, and how: `otlp_grpc` is gRPC to "host:port",
    /// `otlp_http` is HTTP to a base URL (the signal's path is appended).
    pub fn exporter_target(&self, id: &str) -> Result<(Endpoint, Protocol), String> {
        let file = &self.file;
        let settings = self.component("exporters", id);
        let endpoint = settings["endpoint"]
            .as_str()
            .ok_or_else(|| format!("{file}: exporter {id} has no endpoint"))?;
        let endpoint =
            Endpoint::parse(endpoint).map_err(|e| format!("{file}: exporter {id}: {e}"))?;
        match id.split('/').next().unwrap_or(id) {
            "otlp_grpc" => {
                let plain = settings.pointer("/tls/insecure") == Some(&Value::Bool(true));
                match endpoint.scheme.as_deref() {
                    None if plain => Ok((endpoint, Protocol::Grpc)),
                    Some("http") => Ok((endpoint, Protocol::Grpc)),
                    _ => Err(format!(
                        "{file}: exporter {id} would use TLS, which the backends here do not speak: \
                         give it tls.insecure: true or an http:// endpoint"
                    )),
                }
            }
            "otlp_http" => match endpoint.scheme.as_deref() {
                Some("http") => Ok((endpoint, Protocol::Http)),
                _ => Err(format!("{file}: exporter {id}: want an http:// URL")),
            },
            other => Err(format!(
                "{file}: exporter {id}: no OTLP target for type {other}"
            )),
        }
    }

    /// The ports the collector listens on: its OTLP receivers, the health check,
    /// and its own metrics for scraping.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        let receivers = self.config["receivers"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (id, settings) in receivers {
            if id.split('/').next() != Some("otlp") {
                continue;
            }
            for (name, protocol) in [("grpc", Protocol::Grpc), ("http", Protocol::Http)] {
                let Some(protocol_settings) = settings.pointer(&format!("/protocols/{name}"))
                else {
                    continue;
                };
                let endpoint = protocol_settings["endpoint"].as_str().unwrap_or_else(|| {
                    panic!(
                        "{}: receiver {id} {name}: give it an endpoint; the default binds localhost only",
                        self.file
                    )
                });
                out.push(Listener {
                    port: host_port(endpoint),
                    serves: Serves::Otlp(protocol),
                    path: String::new(),
                });
            }
        }
        if let Some(endpoint) = self.config.pointer("/extensions/health_check/endpoint") {
            out.push(Listener {
                port: host_port(endpoint.as_str().expect("health_check endpoint")),
                serves: Serves::Http,
                path: String::new(),
            });
        }
        for reader in self
            .config
            .pointer("/service/telemetry/metrics/readers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(port) = reader
                .pointer("/pull/exporter/prometheus/port")
                .and_then(Value::as_u64)
            {
                out.push(Listener {
                    port: port as u16,
                    serves: Serves::Scrape,
                    path: String::new(),
                });
            }
        }
        out
    }
}

/// The agent: complete pipelines, the processors the deployment relies on, and
/// every exporter aimed at a compose service that takes that protocol there.
pub fn agent_problems(agent: &Collector, listeners: &Listeners) -> Vec<String> {
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
    let detectors = strings(&agent.component("processors", "resource_detection")["detectors"]);
    if detectors != ["env", "system"] {
        problems.push(format!(
            "{file}: resource_detection detectors {detectors:?}, want [env, system]"
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

/// The fleet tiers: the load balancer routes by trace ID to the port the
/// backends take OTLP/gRPC on; the backends sample on errors, slow handshakes
/// and a share of the rest, then export to the same backends as the agent.
pub fn gateway_problems(
    gateway: &Collector,
    backend: &Collector,
    listeners: &Listeners,
) -> Vec<String> {
    let mut problems = gateway.pipeline_problems();
    problems.extend(backend.pipeline_problems());
    let (g, b) = (&gateway.file, &backend.file);

    let traces = gateway.pipeline("traces");
    if traces.as_ref().map(|p| p.exporters.clone()) != Some(vec!["load_balancing".to_owned()]) {
        problems.push(format!(
            "{g}: traces must go to the load_balancing exporter only"
        ));
    }
    if traces.is_some_and(|p| p.processors.iter().any(|x| x == "tail_sampling")) {
        problems.push(format!(
            "{g}: sampling belongs in the backends, which see whole traces"
        ));
    }
    let lb = gateway.component("exporters", "load_balancing");
    if lb["routing_key"].as_str() != Some("traceID") {
        problems.push(format!("{g}: load_balancing routing_key must be traceID"));
    }
    if !lb.pointer("/protocol/otlp").is_some_and(Value::is_object) {
        problems.push(format!(
            "{g}: load_balancing must speak OTLP (protocol.otlp)"
        ));
    }
    let ports: Vec<u64> = match (lb.pointer("/resolver/dns"), lb.pointer("/resolver/k8s")) {
        // The collector takes the DNS resolver's port as a string only.
        (Some(dns), _) => dns["port"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .into_iter()
            .collect(),
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
