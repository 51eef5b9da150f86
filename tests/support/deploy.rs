//! The deployment files (docker-compose.yml, collector-config/, deploy/, the
//! Dockerfile) read as data, so tests can check that they refer to each other
//! consistently, and run what they describe.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use super::{
    connect_hold_close,
    otlp::{self, ReceivedSpan, Receiver},
};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// `rel` (from the repository's root) parsed as YAML.
pub fn read_yaml(rel: &str) -> Value {
    let path = root().join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// Every document of `rel` (a manifest may hold several, separated by `---`).
pub fn read_yaml_documents(rel: &str) -> Vec<Value> {
    let path = root().join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// Every YAML file of the deployment: docker-compose.yml and those under
/// collector-config/ and deploy/, relative to the repository's root.
pub fn yaml_files() -> Vec<String> {
    let root = root();
    let mut found = vec!["docker-compose.yml".to_owned()];
    let mut pending = vec![root.join("collector-config"), root.join("deploy")];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path.strip_prefix(&root).expect("under the root");
                found.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

/// How an OTLP endpoint is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Grpc,
    Http,
}

impl Protocol {
    /// As rotel's `--otlp-exporter-protocol` and `ROTEL_EXPORTER_*_PROTOCOL` say it.
    pub fn rotel(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// What a port of a service serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Serves {
    Otlp(Protocol),
    /// A UI, a query API or a health check.
    Http,
    /// Metrics to scrape, Prometheus' text format.
    Scrape,
}

/// One port a service listens on; `path` is the base path its API sits under.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub port: u16,
    pub serves: Serves,
    pub path: String,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} on {}{}", self.serves, self.port, self.path)
    }
}

/// An address in a configuration: "host:port" or a URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// None for "host:port".
    pub scheme: Option<String>,
    pub host: String,
    pub port: u16,
    /// "" when there is none (or just "/").
    pub path: String,
}

impl Endpoint {
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        if !text.contains("://") {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| format!("{text:?} is neither host:port nor a URL"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{text:?}: {port:?} is not a port"))?;
            return Ok(Endpoint {
                scheme: None,
                host: host.to_owned(),
                port,
                path: String::new(),
            });
        }
        let url = url::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{text:?} has no port"))?;
        Ok(Endpoint {
            scheme: Some(url.scheme().to_owned()),
            host: url
                .host_str()
                .ok_or_else(|| format!("{text:?} has no host"))?
                .to_owned(),
            port,
            path: url.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// The strings of a YAML sequence (absent: none).
pub fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::String(s) => vec![s.clone()],
        other => panic!("expected a list, found {other}"),
    }
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

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

    /// A component's settings, e.g. `component("exporters", "otlp/tempo")`.
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

    /// Where an OTLP exporter sends, and how: `otlp` is gRPC to "host:port",
    /// `otlphttp` is HTTP to a base URL (the signal's path is appended).
    pub fn exporter_target(&self, id: &str) -> Result<(Endpoint, Protocol), String> {
        let file = &self.file;
        let settings = self.component("exporters", id);
        let endpoint = settings["endpoint"]
            .as_str()
            .ok_or_else(|| format!("{file}: exporter {id} has no endpoint"))?;
        let endpoint =
            Endpoint::parse(endpoint).map_err(|e| format!("{file}: exporter {id}: {e}"))?;
        match id.split('/').next().unwrap_or(id) {
            "otlp" => {
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
            "otlphttp" => match endpoint.scheme.as_deref() {
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

/// The port of a listen address such as "0.0.0.0:4317".
fn host_port(endpoint: &str) -> u16 {
    Endpoint::parse(endpoint)
        .unwrap_or_else(|e| panic!("listen address {e}"))
        .port
}

/// docker-compose.yml.
#[derive(Clone, Debug)]
pub struct Compose {
    pub config: Value,
}

/// A published port: `host_ip:host_port:container_port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub host_ip: Option<String>,
    pub host_port: u16,
    pub container_port: u16,
}

/// A bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

impl Compose {
    pub fn load() -> Compose {
        Compose {
            config: read_yaml("docker-compose.yml"),
        }
    }

    pub fn service_names(&self) -> Vec<String> {
        keys(&self.config["services"]).into_iter().collect()
    }

    pub fn service(&self, name: &str) -> &Value {
        let service = &self.config["services"][name];
        assert!(
            service.is_object(),
            "docker-compose.yml has no service {name}"
        );
        service
    }

    /// The command, which must be a list: a string would be split by a shell
    /// rule the tests do not reproduce.
    pub fn command(&self, name: &str) -> Vec<String> {
        match &self.service(name)["command"] {
            Value::Null => Vec::new(),
            Value::Array(_) => strings(&self.service(name)["command"]),
            other => panic!("service {name}: write its command as a list, not {other}"),
        }
    }

    /// The value of `--flag=value` or `--flag value` in the service's command.
    pub fn flag(&self, name: &str, flag: &str) -> Option<String> {
        let command = self.command(name);
        let mut args = command.iter();
        while let Some(arg) = args.next() {
            if arg == flag {
                return args.next().cloned();
            }
            if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                return Some(value.to_owned());
            }
        }
        None
    }

    /// Its environment, in either of compose's two forms.
    pub fn environment(&self, name: &str) -> BTreeMap<String, String> {
        match &self.service(name)["environment"] {
            Value::Null => BTreeMap::new(),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect(),
            Value::Array(_) => strings(&self.service(name)["environment"])
                .into_iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv, String::new()),
                })
                .collect(),
            other => panic!("service {name}: environment {other}"),
        }
    }

    pub fn published(&self, name: &str) -> Vec<Published> {
        strings(&self.service(name)["ports"])
            .iter()
            .map(|spec| {
                let parts: Vec<&str> = spec.split(':').collect();
                let port = |s: &str| {
                    s.parse::<u16>()
                        .unwrap_or_else(|_| panic!("service {name}: port {spec:?}: {s:?}"))
                };
                match parts[..] {
                    [ip, host, container] => Published {
                        host_ip: Some(ip.to_owned()),
                        host_port: port(host),
                        container_port: port(container),
                    },
                    [host, container] => Published {
                        host_ip: None,
                        host_port: port(host),
                        container_port: port(container),
                    },
                    _ => panic!("service {name}: port {spec:?}: want [IP:]HOST:CONTAINER"),
                }
            })
            .collect()
    }

    pub fn binds(&self, name: &str) -> Vec<Bind> {
        strings(&self.service(name)["volumes"])
            .iter()
            .map(|spec| {
                let parts: Vec<&str> = spec.split(':').collect();
                match parts[..] {
                    [source, target] => Bind {
                        source: source.to_owned(),
                        target: target.to_owned(),
                        read_only: false,
                    },
                    [source, target, mode] => Bind {
                        source: source.to_owned(),
                        target: target.to_owned(),
                        read_only: mode.split(',').any(|m| m == "ro"),
                    },
                    _ => panic!("service {name}: volume {spec:?}: want SOURCE:TARGET[:MODE]"),
                }
            })
            .collect()
    }

    /// The repository file mounted at `target` (or at a directory above it) in
    /// the service, relative to the repository's root.
    pub fn mounted_file(&self, name: &str, target: &str) -> Option<String> {
        self.binds(name).into_iter().find_map(|b| {
            let rest = Path::new(target).strip_prefix(&b.target).ok()?;
            let source = b.source.strip_prefix("./")?;
            if rest.as_os_str().is_empty() {
                return Some(source.to_owned());
            }
            Some(Path::new(source).join(rest).to_string_lossy().into_owned())
        })
    }

    /// The repository file a service reads its configuration from: the one
    /// mounted where `flag` in its command points.
    pub fn config_file(&self, name: &str, flag: &str) -> String {
        let target = self
            .flag(name, flag)
            .unwrap_or_else(|| panic!("service {name}: no {flag} in its command"));
        self.mounted_file(name, &target).unwrap_or_else(|| {
            panic!("service {name}: {flag} {target} is not a file mounted from the repository")
        })
    }

    /// The agent collector's configuration, as compose mounts it.
    pub fn collector(&self) -> Collector {
        Collector::load(&self.config_file(COLLECTOR, "--config"))
    }
}

/// The compose services the tests look at by name.
pub const TRACER: &str = "otel-tcpstates";
pub const COLLECTOR: &str = "otel-collector";

/// What the Jaeger image's built-in all-in-one configuration listens on (when
/// JAEGER_LISTEN_HOST lets it listen beyond localhost).
pub const JAEGER_ALL_IN_ONE: [(u16, Serves); 3] = [
    (4317, Serves::Otlp(Protocol::Grpc)),
    (4318, Serves::Otlp(Protocol::Http)),
    (16686, Serves::Http),
];

/// What each compose service listens on, read from its own configuration:
/// the collector's file, tempo.yaml, Prometheus' and Grafana's settings, the
/// Jaeger image's defaults. A service without such a model is an error, so a
/// new one cannot go unchecked.
pub fn listeners(compose: &Compose) -> Result<BTreeMap<String, Vec<Listener>>, String> {
    let mut out = BTreeMap::new();
    for name in compose.service_names() {
        let listening = match name.as_str() {
            TRACER => Vec::new(),
            COLLECTOR => compose.collector().listeners(),
            "tempo" => {
                let file = compose.config_file("tempo", "-config.file");
                let tempo = read_yaml(&file);
                let mut found = Vec::new();
                for (protocol, name) in [(Protocol::Grpc, "grpc"), (Protocol::Http, "http")] {
                    let pointer = format!("/distributor/receivers/otlp/protocols/{name}/endpoint");
                    if let Some(endpoint) = tempo.pointer(&pointer) {
                        let endpoint = endpoint.as_str().ok_or(format!("{file}: {pointer}"))?;
                        found.push(Listener {
                            port: host_port(endpoint),
                            serves: Serves::Otlp(protocol),
                            path: String::new(),
                        });
                    }
                }
                let api = tempo
                    .pointer("/server/http_listen_port")
                    .and_then(Value::as_u64)
                    .ok_or(format!("{file}: set server.http_listen_port"))?;
                found.push(Listener {
                    port: api as u16,
                    serves: Serves::Http,
                    path: String::new(),
                });
                found
            }
            "jaeger" => {
                let host = compose
                    .environment("jaeger")
                    .get("JAEGER_LISTEN_HOST")
                    .cloned();
                if host.as_deref() != Some("0.0.0.0") {
                    return Err(format!(
                        "jaeger: JAEGER_LISTEN_HOST is {host:?}: Jaeger then listens on \
                         localhost only, out of the collector's reach"
                    ));
                }
                JAEGER_ALL_IN_ONE
                    .iter()
                    .map(|&(port, serves)| Listener {
                        port,
                        serves,
                        path: String::new(),
                    })
                    .collect()
            }
            "prometheus" => {
                let address = compose
                    .flag("prometheus", "--web.listen-address")
                    .unwrap_or_else(|| "0.0.0.0:9090".to_owned());
                let port = host_port(&address);
                let mut found = vec![Listener {
                    port,
                    serves: Serves::Http,
                    path: String::new(),
                }];
                // Prometheus takes OTLP/HTTP under /api/v1/otlp, and only when told to.
                if compose
                    .command("prometheus")
                    .iter()
                    .any(|a| a == "--web.enable-otlp-receiver")
                {
                    found.push(Listener {
                        port,
                        serves: Serves::Otlp(Protocol::Http),
                        path: "/api/v1/otlp".to_owned(),
                    });
                }
                found
            }
            "grafana" => {
                let port = compose
                    .environment("grafana")
                    .get("GF_SERVER_HTTP_PORT")
                    .map_or(Ok(3000), |p| p.parse())
                    .map_err(|e| format!("grafana: GF_SERVER_HTTP_PORT: {e}"))?;
                vec![Listener {
                    port,
                    serves: Serves::Http,
                    path: String::new(),
                }]
            }
            other => {
                return Err(format!(
                    "no model of what compose service {other} listens on"
                ));
            }
        };
        out.insert(name, listening);
    }
    Ok(out)
}

/// Checks that `endpoint`, spoken to with `serves`, reaches a compose service
/// listening for exactly that.
pub fn reaches(
    listeners: &BTreeMap<String, Vec<Listener>>,
    what: &str,
    endpoint: &Endpoint,
    serves: Serves,
) -> Result<(), String> {
    let Some(listening) = listeners.get(&endpoint.host) else {
        return Err(format!(
            "{what}: {} is not a compose service ({:?})",
            endpoint.host,
            listeners.keys().collect::<Vec<_>>()
        ));
    };
    let matches = |l: &&Listener| l.port == endpoint.port && l.serves == serves;
    match listening.iter().find(matches) {
        Some(l) if serves == Serves::Otlp(Protocol::Http) && l.path != endpoint.path => {
            Err(format!(
                "{what}: {} takes OTLP/HTTP under {:?}, not {:?}",
                endpoint.host, l.path, endpoint.path
            ))
        }
        Some(_) => Ok(()),
        None => Err(format!(
            "{what}: {}:{} does not serve {serves:?}; {} listens for {}",
            endpoint.host,
            endpoint.port,
            endpoint.host,
            listening
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Where the tracer's compose command sends, resolved through the collector's
/// published ports to the receiver that takes it: that receiver's port in the
/// container and its protocol.
pub fn tracer_target(compose: &Compose, collector: &Collector) -> Result<(u16, Protocol), String> {
    let endpoint = compose
        .flag(TRACER, "--otlp-endpoint")
        .ok_or("otel-tcpstates: no --otlp-endpoint in its command")?;
    let endpoint = Endpoint::parse(&endpoint)?;
    if endpoint.scheme.as_deref() != Some("http") {
        return Err(format!(
            "otel-tcpstates: {endpoint:?}: the collector's receiver is plain: use http://"
        ));
    }
    if !["127.0.0.1", "localhost"].contains(&endpoint.host.as_str()) {
        return Err(format!(
            "otel-tcpstates: sends to {}, but on the host network the collector is at \
             its published port on 127.0.0.1",
            endpoint.host
        ));
    }
    let published = compose
        .published(COLLECTOR)
        .into_iter()
        .find(|p| p.host_port == endpoint.port)
        .ok_or(format!(
            "otel-tcpstates: sends to port {}, which the collector does not publish",
            endpoint.port
        ))?;
    if published
        .host_ip
        .as_deref()
        .is_some_and(|ip| ip != "127.0.0.1" && ip != "0.0.0.0")
    {
        return Err(format!(
            "the collector publishes {} on {:?}, which 127.0.0.1 does not reach",
            published.host_port, published.host_ip
        ));
    }
    let protocol = match compose.flag(TRACER, "--otlp-protocol").as_deref() {
        Some("grpc") => Protocol::Grpc,
        Some("http/protobuf") | None => Protocol::Http,
        Some(other) => return Err(format!("otel-tcpstates: unknown --otlp-protocol {other}")),
    };
    let receiver = collector
        .listeners()
        .into_iter()
        .find(|l| l.port == published.container_port && matches!(l.serves, Serves::Otlp(_)))
        .ok_or(format!(
            "the collector publishes {} to its port {}, where no OTLP receiver listens",
            published.host_port, published.container_port
        ))?;
    if receiver.serves != Serves::Otlp(protocol) {
        return Err(format!(
            "otel-tcpstates speaks {protocol:?} to port {}, where the collector takes {:?}",
            endpoint.port, receiver.serves
        ));
    }
    Ok((published.container_port, protocol))
}

/// A Dockerfile as instructions: continuation lines joined, comments dropped.
#[derive(Clone, Debug)]
pub struct Dockerfile {
    /// (INSTRUCTION in capitals, its arguments).
    pub instructions: Vec<(String, String)>,
}

/// One build stage: `FROM image AS name` and what follows it.
#[derive(Clone, Debug)]
pub struct Stage {
    pub image: String,
    pub name: Option<String>,
    pub instructions: Vec<(String, String)>,
}

impl Dockerfile {
    pub fn load() -> Dockerfile {
        let path = root().join("Dockerfile");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Dockerfile {
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            // Comments and blank lines may also sit between continued lines.
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if let Some(continued) = trimmed.strip_suffix('\\') {
                current.push_str(continued);
                current.push(' ');
                continue;
            }
            current.push_str(trimmed);
            let (keyword, args) = current
                .split_once(char::is_whitespace)
                .unwrap_or((&current, ""));
            instructions.push((keyword.to_uppercase(), args.trim().to_owned()));
            current.clear();
        }
        Dockerfile { instructions }
    }

    pub fn stages(&self) -> Vec<Stage> {
        let mut stages: Vec<Stage> = Vec::new();
        for (keyword, args) in &self.instructions {
            if keyword == "FROM" {
                let words: Vec<&str> = args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let name = match words[..] {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_owned()),
                    _ => None,
                };
                stages.push(Stage {
                    image: words.first().map_or(String::new(), |w| (*w).to_owned()),
                    name,
                    instructions: Vec::new(),
                });
            } else if let Some(stage) = stages.last_mut() {
                stage.instructions.push((keyword.clone(), args.clone()));
            }
        }
        stages
    }
}

/// `--from=X` in a COPY's arguments.
pub fn copy_from(args: &str) -> Option<&str> {
    args.split_whitespace()
        .find_map(|w| w.strip_prefix("--from="))
}

/// The words of a JSON-array (exec form) instruction, None for shell form.
pub fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str(args).ok()
}

// ---------------------------------------------------------------------------------
// Running the daemon as a deployment runs it

/// How the daemon's one warning line starts when the packet programs behind span
/// links cannot be loaded or attached.
pub const LINKS_OFF: &str = "span links from traceparent headers are off";

/// The capability that attaching the packet programs to a cgroup takes, and
/// nothing else the daemon does.
pub const LINKS_CAP: &str = "CAP_NET_ADMIN";

/// The kernel's `enum bpf_attach_type` for the two packet programs.
pub const CGROUP_INET_INGRESS: u32 = 0;
pub const CGROUP_INET_EGRESS: u32 = 1;
/// The kernel's `enum bpf_prog_type` for them: `BPF_PROG_TYPE_CGROUP_SKB`.
const PROG_TYPE_CGROUP_SKB: u32 = 8;

/// A BPF link to a cgroup, as the kernel describes it in /proc/PID/fdinfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CgroupLink {
    pub attach_type: u32,
    pub cgroup_id: u64,
}

/// What a process holds of BPF, read from the kernel's side: its links to
/// cgroups, and how many `cgroup_skb` programs it has loaded.
#[derive(Clone, Debug, Default)]
pub struct BpfHeld {
    pub cgroup_links: Vec<CgroupLink>,
    pub packet_programs: usize,
}

/// The fields of one /proc/PID/fdinfo file.
fn fdinfo(pid: u32, fd: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

pub fn bpf_held(pid: u32) -> BpfHeld {
    let mut held = BpfHeld::default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"));
    for entry in fds.map_while(Result::ok) {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let fd = entry.file_name().to_string_lossy().into_owned();
        let number = |info: &BTreeMap<String, String>, key: &str| -> u64 {
            info.get(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("/proc/{pid}/fdinfo/{fd}: no {key} in {info:?}"))
        };
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf_link" => {
                let info = fdinfo(pid, &fd);
                if info.get("link_type").map(String::as_str) == Some("cgroup") {
                    held.cgroup_links.push(CgroupLink {
                        attach_type: number(&info, "attach_type") as u32,
                        cgroup_id: number(&info, "cgroup_id"),
                    });
                }
            }
            "anon_inode:bpf-prog" => {
                let info = fdinfo(pid, &fd);
                if number(&info, "prog_type") == u64::from(PROG_TYPE_CGROUP_SKB) {
                    held.packet_programs += 1;
                }
            }
            _ => {}
        }
    }
    held.cgroup_links.sort();
    held
}

/// The cgroup v2 root of the host (as this test sees it: field 5 of the
/// `cgroup2` line of /proc/self/mountinfo) and its cgroup id, which for cgroup
/// v2 is the directory's inode number: where the packet programs must attach to
/// see every socket's packets.
pub fn host_cgroup2_root() -> (PathBuf, u64) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next()? == "cgroup2")
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect("cgroup v2 is mounted on this host (span links need it)");
    let id = std::fs::metadata(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .ino();
    (root, id)
}

/// The daemon's stderr lines that say span links are off.
pub fn links_off(stderr: &[String]) -> Vec<&String> {
    stderr.iter().filter(|l| l.contains(LINKS_OFF)).collect()
}

/// A command that runs what is appended to it (`sh -c '…; exec "$@"'`) with the
/// view of the host a container runtime gives a container with these binds: a
/// mount namespace and a cgroup namespace of its own, a fresh read-only sysfs on
/// /sys (as runtimes mount it for a container that is not privileged), and each
/// bind on top, recursive (as Docker's and the CRI runtimes' are) and read-only
/// where asked. What the daemon reads in /proc/self/mountinfo is then what it
/// would read in the container: the cgroup v2 root, above all, is the bind's.
/// The directory returned (`tag` names it) is where each source waits while /sys
/// is replaced: keep it until the command has started.
pub fn in_container(binds: &[Bind], tag: &str) -> (Command, Scratch) {
    let scratch = Scratch::new(tag);
    let stage = scratch.0.as_path();
    let quote = |path: &str| {
        assert!(!path.contains('\''), "{path}");
        format!("'{path}'")
    };
    let mut script = String::from("set -e\n");
    for (i, bind) in binds.iter().enumerate() {
        let staged = stage.join(i.to_string());
        let staged = quote(staged.to_str().unwrap());
        let make = if Path::new(&bind.source).is_dir() {
            "mkdir"
        } else {
            "touch"
        };
        script += &format!(
            "{make} {staged}\nmount --rbind {} {staged}\n",
            quote(&bind.source)
        );
    }
    // The same sysfs cannot be mounted on itself: the host's goes first.
    script += "umount -R -l /sys\nmount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys\n";
    for (i, bind) in binds.iter().enumerate() {
        let staged = stage.join(i.to_string());
        let target = quote(&bind.target);
        script += &format!(
            "mount --move {} {target}\n",
            quote(staged.to_str().unwrap())
        );
        if bind.read_only {
            script += &format!(
                "findmnt -Rrno TARGET {target} | while read -r m; do mount -o remount,bind,ro \"$m\"; done\n"
            );
        }
    }
    script += "exec \"$@\"\n";
    let mut command = Command::new("unshare");
    command.args([
        "--mount",
        "--cgroup",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    (command, scratch)
}

/// A directory of its own under the system's temporary directory, removed when
/// dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("otel-tcpstates-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon started behind wrappers that exec it (unshare, setpriv) or trace it
/// (strace), its stderr collected.
pub struct Daemon {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The daemon itself, when `child` is a tracer that forked it.
    traced: Option<u32>,
}

impl Daemon {
    /// Starts `command` and waits for the daemon to say it is attached and
    /// exporting (by then the packet programs are attached, or it said why not).
    pub fn start(mut command: Command) -> Daemon {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut daemon = Daemon {
            child,
            stderr,
            traced: None,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !daemon
            .stderr()
            .iter()
            .any(|l| l.contains("exporting traces"))
        {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "exited with {status} before attaching: {:?}",
                    daemon.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "never attached: {:?}",
                daemon.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    fn children(&self) -> Vec<u32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    /// The daemon's pid when it runs under strace: the tracer's only child.
    pub fn trace_child(&mut self) {
        let ids = self.children();
        assert_eq!(ids.len(), 1, "strace's children: {ids:?}");
        self.traced = Some(ids[0]);
    }

    /// The daemon's own pid.
    pub fn pid(&self) -> u32 {
        self.traced.unwrap_or(self.child.id())
    }

    /// SIGTERM, as systemd and the container runtimes stop it; waits for the exit.
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "did not exit after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        };
        // The stderr reader's last lines.
        thread::sleep(Duration::from_millis(100));
        (status, self.stderr())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Killing strace would leave the daemon running, detached.
        for pid in self.children() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run of the daemon as deployed, with one real connection traced.
pub struct Run {
    pub status: ExitStatus,
    pub stderr: Vec<String>,
    /// The client socket's trace (root, states), if it arrived.
    pub trace: Option<(ReceivedSpan, Vec<ReceivedSpan>)>,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// What the daemon held of BPF once attached.
    pub held: BpfHeld,
}

impl Run {
    /// Starts the daemon (`strace`: it runs under strace, which forks it), reads
    /// what it holds of BPF, connects to `listener` (the daemon is told to trace
    /// its port only) and waits for the client socket's trace, then stops it.
    pub fn go(command: Command, strace: bool, receiver: &Receiver, listener: &TcpListener) -> Run {
        let mut daemon = Daemon::start(command);
        if strace {
            daemon.trace_child();
        }
        let held = bpf_held(daemon.pid());
        let server = listener.local_addr().unwrap();
        let (client, _) = connect_hold_close(listener, Duration::from_millis(20));
        let spans = receiver.wait_for(otlp::WAIT, |spans| {
            otlp::trace_of(spans, client.port(), server.port()).is_some()
        });
        let trace = otlp::trace_of(&spans, client.port(), server.port());
        let (status, stderr) = daemon.stop();
        Run {
            status,
            stderr,
            trace,
            client,
            server,
            held,
        }
    }

    /// It exported the connection's trace and exited 0 after SIGTERM.
    pub fn traced(&self) -> (&ReceivedSpan, &[ReceivedSpan]) {
        let (root, states) = self.trace.as_ref().unwrap_or_else(|| {
            panic!(
                "no trace of {} -> {}; daemon said {:?}",
                self.client, self.server, self.stderr
            )
        });
        assert!(self.status.success(), "{}: {:?}", self.status, self.stderr);
        (root, states)
    }

    /// Lines that are neither information nor the links-off warning.
    pub fn complaints(&self) -> Vec<&String> {
        self.stderr
            .iter()
            .filter(|l| !l.contains(LINKS_OFF))
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("error"))
            .collect()
    }

    /// Span links on: both packet programs attached, through BPF links, to the
    /// host's cgroup v2 root, and no warning about them.
    pub fn assert_links_attached(&self) {
        let (root, id) = host_cgroup2_root();
        assert!(links_off(&self.stderr).is_empty(), "{:?}", self.stderr);
        assert_eq!(
            self.held.cgroup_links,
            [
                CgroupLink {
                    attach_type: CGROUP_INET_INGRESS,
                    cgroup_id: id
                },
                CgroupLink {
                    attach_type: CGROUP_INET_EGRESS,
                    cgroup_id: id
                }
            ],
            "want ingress and egress attached to {} (cgroup id {id}); stderr {:?}",
            root.display(),
            self.stderr
        );
        assert_eq!(self.held.packet_programs, 2, "{:?}", self.held);
    }

    /// Span links off for want of CAP_NET_ADMIN: exactly one warning line, which
    /// names it, and nothing attached to a cgroup.
    pub fn assert_links_off_for_want_of_net_admin(&self) {
        let off = links_off(&self.stderr);
        assert_eq!(off.len(), 1, "{:?}", self.stderr);
        let (root, _) = host_cgroup2_root();
        assert!(
            off[0].contains(&format!("{LINKS_OFF}: attaching "))
                && off[0].contains(&format!(" to {}: Operation not permitted", root.display()))
                && off[0].contains(LINKS_CAP)
                && off[0].contains("--no-links"),
            "{}",
            off[0]
        );
        assert!(self.held.cgroup_links.is_empty(), "{:?}", self.held);
    }

    /// `--no-links`: no packet program loaded, nothing attached, nothing said.
    pub fn assert_no_links_loaded(&self) {
        assert!(links_off(&self.stderr).is_empty(), "{:?}", self.stderr);
        assert!(self.held.cgroup_links.is_empty(), "{:?}", self.held);
        assert_eq!(self.held.packet_programs, 0, "{:?}", self.held);
    }
}
