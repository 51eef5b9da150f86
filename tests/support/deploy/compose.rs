//! docker-compose.yml: its services, what each listens on (read from its own
//! configuration), where the tracer sends, and what is wrong with the services
//! and the tracer's.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use serde_json::Value;

use super::{
    Bind, Endpoint, Listener, Protocol, Serves, collector::Collector, host_port, keys, read_yaml,
    root, run::links_asked, strings,
};

pub type Listeners = BTreeMap<String, Vec<Listener>>;

/// What the tracer's container needs as root with `--links` (README, "What it needs"):
/// CAP_BPF and CAP_PERFMON load the programs, CAP_NET_ADMIN attaches the packet
/// programs behind span links to the cgroup v2 root.
pub const CAPS: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];
/// Without `--links`.
pub const NO_LINKS_CAPS: [&str; 2] = ["BPF", "PERFMON"];

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

pub fn listening(compose: &Compose) -> Listeners {
    listeners(compose).unwrap_or_else(|e| panic!("{e}"))
}

/// The daemon's service: where it sends, and only the privileges and mounts
/// README "What it needs" lists.
pub fn tracer_problems(compose: &Compose, agent: &Collector) -> Vec<String> {
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
    // Span links (asked for with --links) take NET_ADMIN; without them it is spared.
    let caps: &[&str] = if links_asked(&compose.command(TRACER)) {
        &CAPS
    } else {
        &NO_LINKS_CAPS
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
pub fn compose_problems(compose: &Compose, listeners: &Listeners) -> Vec<String> {
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
