//! The Kubernetes manifest in deploy/kubernetes/: read by the tool that will read
//! it (the Kubernetes API schemas) and checked as the cluster would take it (the
//! DaemonSet, its least privilege, the downward API, the agent collector beside
//! the daemon with its k8s_attributes and pipelines, images and resources), and
//! the DaemonSet's container run for real: with its privileges, flags and
//! environment the daemon must trace a real connection, with span links attached;
//! without CAP_NET_ADMIN as before, one warning saying links are off; with
//! `--no-links`, with CAP_BPF and CAP_PERFMON alone.
mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use support::{
    BIN,
    deploy::{
        Bind, repo_file,
        run::{LINKS_CAP, PATH, Run, UNIT_CAPS, Var, in_container, links_asked},
        text,
    },
    listen,
    otlp::{self, Receiver},
    root_or_skip,
};

const MANIFEST: &str = "deploy/kubernetes/otel-tcpstates.yaml";

/// As root, in Kubernetes' spelling: root owns tracefs.
const ROOT_CAPS: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];
/// As root with `--no-links`: loading the tracepoint's program, nothing more.
const NO_LINKS_ROOT_CAPS: [&str; 2] = ["BPF", "PERFMON"];

/// Where `scripts/setup.sh --test` installs kubernetes-validate; keep in sync.
const KUBERNETES_VALIDATE_DIR: &str = "otel-tcpstates-kubernetes-validate";

fn manifest() -> Vec<Value> {
    serde_saphyr::from_multiple(&repo_file(MANIFEST))
        .unwrap_or_else(|err| panic!("{MANIFEST}: {err}"))
}

fn object<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    match docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .collect::<Vec<_>>()[..]
    {
        [one] => one,
        ref found => panic!("{MANIFEST}: expected one {kind}, found {}", found.len()),
    }
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

fn pod_spec(docs: &[Value]) -> &Value {
    &object(docs, "DaemonSet")["spec"]["template"]["spec"]
}

/// Every container of the pod, sidecars (restartable init containers) included.
fn containers(spec: &Value) -> Vec<&Value> {
    list(&spec["initContainers"])
        .iter()
        .chain(list(&spec["containers"]))
        .collect()
}

fn daemon_container(spec: &Value) -> &Value {
    let found: Vec<&Value> = list(&spec["containers"])
        .iter()
        .filter(|c| str_of(&c["image"], "image").starts_with("otel-tcpstates:"))
        .collect();
    assert_eq!(found.len(), 1, "one otel-tcpstates container");
    found[0]
}

fn collector_container(spec: &Value) -> &Value {
    let found: Vec<&Value> = containers(spec)
        .into_iter()
        .filter(|c| str_of(&c["image"], "image").contains("opentelemetry-collector"))
        .collect();
    assert_eq!(found.len(), 1, "one collector container");
    found[0]
}

/// Values the downward API fills in, for a made-up pod.
fn downward(field: &str, namespace: &str) -> String {
    match field {
        "spec.nodeName" => "node-a".into(),
        "metadata.name" => "otel-tcpstates-x7k2p".into(),
        "metadata.namespace" => namespace.into(),
        "metadata.uid" => "6f1b2c3d-0000-4000-8000-00000000000a".into(),
        // Only ever a label here: nothing connects to it.
        "status.hostIP" => "192.0.2.10".into(),
        other => panic!("no sample value for the downward API's {other}"),
    }
}

/// The fields the downward API offers as environment variables.
const DOWNWARD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];

/// A container's environment as the kubelet makes it: field references filled in
/// and `$(NAME)` expanded from the variables defined before it (a later or unknown
/// one stays as written).
fn container_env(container: &Value, namespace: &str) -> Vec<Var> {
    let mut env: Vec<Var> = Vec::new();
    for var in list(&container["env"]) {
        let name = str_of(&var["name"], "env name").to_owned();
        let value = if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert!(
                DOWNWARD_FIELDS.contains(&field),
                "{name}: no such field {field}"
            );
            downward(field, namespace)
        } else {
            let mut value = str_of(&var["value"], &name).to_owned();
            for (known, known_value) in &env {
                value = value.replace(&format!("$({known})"), known_value);
            }
            value
        };
        env.push((name, value));
    }
    env
}

fn env_value<'a>(env: &'a [Var], name: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Kubernetes quantities (`128Mi`, `1`, `100m`) in bytes or millicores.
fn quantity(value: &Value) -> f64 {
    let text = match value {
        Value::Number(n) => return n.as_f64().unwrap(),
        other => str_of(other, "quantity"),
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("quantity {text}"));
    number
        * match unit {
            "" => 1.0,
            "m" => 0.001,
            "Ki" => 1024.0,
            "Mi" => 1024.0 * 1024.0,
            "Gi" => 1024.0 * 1024.0 * 1024.0,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            other => panic!("quantity unit {other} in {text}"),
        }
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn manifest_passes_the_kubernetes_schemas() {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let dir = cargo_home.join(KUBERNETES_VALIDATE_DIR);
    assert!(
        dir.join("kubernetes_validate").is_dir(),
        "kubernetes-validate is not installed in {}; run scripts/setup.sh --test",
        dir.display()
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(MANIFEST);
    // The newest Kubernetes it knows, and 1.29, the first with native sidecars.
    // --strict: a misspelt or misplaced field is an error, not ignored.
    for version in [None, Some("1.29.0")] {
        let mut command = Command::new("python3");
        command
            .env("PYTHONPATH", &dir)
            .args(["-m", "kubernetes_validate", "--strict"]);
        if let Some(version) = version {
            command.args(["-k", version]);
        }
        let out = command.arg(&path).output().expect("python3");
        let report = text(&out);
        assert!(out.status.success(), "{MANIFEST} ({version:?}):\n{report}");
        assert_eq!(
            report.matches(" passed for resource ").count(),
            manifest().len(),
            "{report}"
        );
    }
}

#[test]
fn daemonset_runs_the_daemon_on_every_node_with_least_privilege() {
    let docs = manifest();
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "namespace");
    // hostPID, hostNetwork and hostPath volumes need the privileged policy.
    assert_eq!(
        object(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    // Everything namespaced is in ours (cluster-scoped: the namespace and the
    // collector's read-only role and its binding).
    let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
    for doc in docs
        .iter()
        .filter(|d| !cluster_scoped.iter().any(|k| d["kind"] == *k))
    {
        assert_eq!(doc["metadata"]["namespace"], namespace, "{}", doc["kind"]);
    }
    let ds = object(&docs, "DaemonSet");
    let template_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in ds["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &template_labels[key], value,
            "the selector matches the pods"
        );
    }
    let spec = pod_spec(&docs);
    assert_eq!(
        spec["serviceAccountName"],
        object(&docs, "ServiceAccount")["metadata"]["name"]
    );
    assert_eq!(spec["hostPID"], true, "pids and /proc are the node's");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert!(
        list(&spec["tolerations"])
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "tolerates every taint: {}",
        spec["tolerations"]
    );

    let daemon = daemon_container(spec);
    let security = &daemon["securityContext"];
    let capabilities = &security["capabilities"];
    assert_eq!(capabilities["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<&str> = list(&capabilities["add"])
        .iter()
        .map(|c| str_of(c, "capability"))
        .collect();
    let as_root = security["runAsUser"] == 0 && security["runAsNonRoot"] != true;
    // Span links (asked for with --links) take NET_ADMIN; without them it is spared.
    let args: Vec<String> = list(&daemon["args"])
        .iter()
        .map(|a| str_of(a, "argument").to_owned())
        .collect();
    let no_links = !links_asked(&args);
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let shipped: Vec<&str> = if as_root {
        ROOT_CAPS.to_vec()
    } else {
        UNIT_CAPS
            .iter()
            .map(|c| c.trim_start_matches("CAP_"))
            .collect()
    };
    let expected: BTreeSet<&str> = shipped
        .into_iter()
        .filter(|c| !(no_links && *c == net_admin))
        .collect();
    assert_eq!(
        added, expected,
        "as root: {as_root}, without --links: {no_links}"
    );
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_ne!(security["privileged"], true);

    // The host's kernel files, each read-only at the same path.
    let volumes = list(&spec["volumes"]);
    for path in ["/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup"] {
        let mount = list(&daemon["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        assert_eq!(volume["hostPath"]["path"], path);
    }
    // Nothing in the pod writes: every mount is read-only.
    for container in containers(spec) {
        for mount in list(&container["volumeMounts"]) {
            assert_eq!(
                mount["readOnly"], true,
                "{} {}",
                container["name"], mount["mountPath"]
            );
        }
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    }
}

#[test]
fn resource_attributes_come_from_the_downward_api() {
    let docs = manifest();
    let spec = pod_spec(&docs);
    let daemon = daemon_container(spec);
    let declared: Vec<&str> = list(&daemon["env"])
        .iter()
        .map(|v| str_of(&v["name"], "env name"))
        .collect();
    let raw = list(&daemon["env"])
        .iter()
        .find(|v| v["name"] == "OTEL_RESOURCE_ATTRIBUTES")
        .map(|v| str_of(&v["value"], "OTEL_RESOURCE_ATTRIBUTES"))
        .expect("OTEL_RESOURCE_ATTRIBUTES is set");
    let position = |name: &str| declared.iter().position(|d| *d == name);
    let mut keys = BTreeSet::new();
    for item in raw.split(',') {
        let (key, value) = item.split_once('=').unwrap_or_else(|| panic!("{item}"));
        keys.insert(key);
        let var = value
            .strip_prefix("$(")
            .and_then(|v| v.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{key} is not from a variable: {value}"));
        // Kubernetes expands $(VAR) only from variables defined before.
        assert!(
            position(var) < position("OTEL_RESOURCE_ATTRIBUTES") && position(var).is_some(),
            "{var} is not defined before OTEL_RESOURCE_ATTRIBUTES"
        );
        let source = list(&daemon["env"])
            .iter()
            .find(|v| v["name"] == var)
            .unwrap();
        assert!(
            source["valueFrom"]["fieldRef"]["fieldPath"].is_string(),
            "{var} is not from the downward API"
        );
    }
    for key in ["k8s.node.name", "host.ip"] {
        assert!(keys.contains(key), "{key} missing from {raw}");
    }
    // The pod and namespace of a span's resource are the traced container's, added
    // by the collector's k8s_attributes, which keeps values already set: the
    // tracer's own would hide them.
    for key in ["k8s.pod.name", "k8s.namespace.name", "k8s.pod.uid"] {
        assert!(!keys.contains(key), "{key} in {raw}");
    }
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "ns");
    let env = container_env(daemon, namespace);
    assert!(!env.iter().any(|(_, v)| v.contains("$(")), "{env:?}");
}

/// The agent collector names the workload behind each span from its resource's
/// container.id (k8s_attributes, watching only its node's pods), with the read-only
/// API access that takes, bound to the pod's service account, whose token is mounted.
#[test]
fn the_agent_names_each_spans_workload_from_its_container() {
    let docs = manifest();
    let config = collector_config(&docs);
    let k8s = &config["processors"]["k8s_attributes"];
    assert_eq!(k8s["filter"]["node_from_env_var"], "K8S_NODE_NAME");
    let sources = list(&list(&k8s["pod_association"])[0]["sources"]);
    assert_eq!(sources[0]["from"], "resource_attribute");
    assert_eq!(sources[0]["name"], "container.id");
    let traces: Vec<&str> = list(&config["service"]["pipelines"]["traces"]["processors"])
        .iter()
        .map(|p| str_of(p, "processor"))
        .collect();
    assert!(traces.contains(&"k8s_attributes"), "{traces:?}");
    let spec = pod_spec(&docs);
    let collector = collector_container(spec);
    let node = list(&collector["env"])
        .iter()
        .find(|v| v["name"] == "K8S_NODE_NAME")
        .expect("the collector knows its node");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // The API token in the collector alone.
    assert_eq!(spec["automountServiceAccountToken"], false);
    let token_volume = list(&spec["volumes"])
        .iter()
        .find(|v| {
            list(&v["projected"]["sources"])
                .iter()
                .any(|s| s["serviceAccountToken"]["path"] == "token")
        })
        .expect("a projected service account token");
    let mounts = |container: &Value| {
        list(&container["volumeMounts"])
            .iter()
            .filter(|m| m["name"] == token_volume["name"])
            .map(|m| str_of(&m["mountPath"], "mountPath").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        mounts(collector),
        ["/var/run/secrets/kubernetes.io/serviceaccount"]
    );
    assert!(mounts(daemon_container(spec)).is_empty());

    let role = object(&docs, "ClusterRole");
    let rules = list(&role["rules"]);
    let allows = |group: &str, resource: &str| {
        rules.iter().any(|r| {
            list(&r["apiGroups"]).iter().any(|g| g == group)
                && list(&r["resources"]).iter().any(|x| x == resource)
                && ["get", "watch", "list"]
                    .iter()
                    .all(|v| list(&r["verbs"]).iter().any(|x| x == v))
        })
    };
    for (group, resource) in [("", "pods"), ("", "namespaces"), ("apps", "replicasets")] {
        assert!(allows(group, resource), "{group}/{resource} not readable");
    }
    // Read-only.
    for rule in rules {
        for verb in list(&rule["verbs"]) {
            assert!(
                ["get", "watch", "list"].contains(&str_of(verb, "verb")),
                "{rule:?}"
            );
        }
    }
    let binding = object(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = &list(&binding["subjects"])[0];
    assert_eq!(subject["name"], spec["serviceAccountName"]);
    assert_eq!(
        subject["namespace"],
        object(&docs, "Namespace")["metadata"]["name"]
    );
}

/// The collector configuration the sidecar reads: the ConfigMap key mounted where
/// its `--config` points.
fn collector_config(docs: &[Value]) -> Value {
    let spec = pod_spec(docs);
    let collector = collector_container(spec);
    let args: Vec<&str> = list(&collector["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let config = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--config") {
            Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
            Some("") => args.get(i + 1).copied(),
            _ => None,
        })
        .expect("the collector is given --config");
    let config = Path::new(config);
    let (dir, file) = (config.parent().unwrap(), config.file_name().unwrap());
    let mount = list(&collector["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir.to_str().unwrap())
        .unwrap_or_else(|| panic!("nothing is mounted at {}", dir.display()));
    let volume = list(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map = object(docs, "ConfigMap");
    assert_eq!(volume["configMap"]["name"], map["metadata"]["name"]);
    let key = file.to_str().unwrap();
    let text = str_of(&map["data"][key], "the collector's config");
    serde_saphyr::from_str(text).unwrap_or_else(|err| panic!("collector config: {err}"))
}

fn host_port(endpoint: &str) -> (&str, u16) {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    (host, port.parse().unwrap())
}

/// Ports an OpenTelemetry Collector takes by default: a collector of the node's own
/// may hold them, and this pod shares the node's network.
const COLLECTOR_DEFAULT_PORTS: &[u16] = &[4317, 4318, 13133, 8888, 8889, 55679, 1777];

#[test]
fn collector_pipelines_are_complete_and_fed_by_the_daemon() {
    let docs = manifest();
    let config = collector_config(&docs);
    let pipelines = config["service"]["pipelines"]
        .as_object()
        .expect("service.pipelines");
    // Every component defined is used, and every one used is defined.
    for kind in ["receivers", "processors", "exporters", "extensions"] {
        let defined: BTreeSet<&str> = config[kind]
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let used: BTreeSet<&str> = match kind {
            "extensions" => list(&config["service"]["extensions"])
                .iter()
                .map(|e| str_of(e, "extension"))
                .collect(),
            _ => pipelines
                .values()
                .flat_map(|p| list(&p[kind]))
                .map(|c| str_of(c, kind))
                .collect(),
        };
        assert_eq!(defined, used, "{kind}: defined vs used");
    }
    for (name, pipeline) in pipelines {
        let processors: Vec<&str> = list(&pipeline["processors"])
            .iter()
            .map(|p| str_of(p, "processor"))
            .collect();
        assert_eq!(
            processors.first().map(|p| p.split('/').next().unwrap()),
            Some("memory_limiter"),
            "{name}: memory_limiter must come first"
        );
        assert!(processors.iter().any(|p| p.starts_with("batch")), "{name}");
        assert!(!list(&pipeline["receivers"]).is_empty(), "{name}");
        assert!(!list(&pipeline["exporters"]).is_empty(), "{name}");
    }

    // The daemon sends to the otlp receiver, same port, same protocol, and both
    // what it sends (traces, and its own metrics) have a pipeline from there.
    let spec = pod_spec(&docs);
    let env = container_env(daemon_container(spec), "ns");
    let endpoint = env_value(&env, "OTEL_EXPORTER_OTLP_ENDPOINT").expect("endpoint");
    let protocol = env_value(&env, "OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or("http/protobuf");
    let url = endpoint
        .strip_prefix("http://")
        .expect("plain http on loopback");
    let wire = if protocol == "grpc" { "grpc" } else { "http" };
    let receiver = config["receivers"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(name, r)| {
            name.split('/').next() == Some("otlp")
                && r["protocols"][wire]["endpoint"].as_str() == Some(url.trim_end_matches('/'))
        })
        .map(|(name, _)| name.as_str())
        .unwrap_or_else(|| panic!("no otlp receiver takes {protocol} at {url}"));
    for signal in ["traces", "metrics"] {
        assert!(
            pipelines.iter().any(|(name, p)| {
                name.split('/').next() == Some(signal)
                    && list(&p["receivers"]).iter().any(|r| r == receiver)
            }),
            "no {signal} pipeline from {receiver}"
        );
    }

    // Everything the collector listens on: loopback only, away from the defaults.
    let mut listens: Vec<(String, u16)> = Vec::new();
    for section in ["receivers", "extensions"] {
        let mut stack = vec![&config[section]];
        while let Some(value) = stack.pop() {
            match value {
                Value::Object(map) => {
                    if let Some(endpoint) = map.get("endpoint").and_then(Value::as_str) {
                        let (host, port) = host_port(endpoint);
                        listens.push((host.to_owned(), port));
                    }
                    stack.extend(map.values());
                }
                Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
    }
    for reader in list(&config["service"]["telemetry"]["metrics"]["readers"]) {
        let prometheus = &reader["pull"]["exporter"]["prometheus"];
        listens.push((
            str_of(&prometheus["host"], "host").to_owned(),
            prometheus["port"].as_u64().unwrap() as u16,
        ));
    }
    assert!(
        !config["service"]["telemetry"]["metrics"]["readers"].is_null(),
        "the collector's own metrics would take its default port 8888"
    );
    for (host, port) in &listens {
        assert_eq!(host, "127.0.0.1", "listens on {host}:{port}");
        assert!(
            !COLLECTOR_DEFAULT_PORTS.contains(port),
            "port {port} is a default one"
        );
    }
    println!("collector listens on {listens:?}");

    // Liveness (and start-up) from the health_check extension.
    let health = host_port(str_of(
        &config["extensions"]["health_check"]["endpoint"],
        "health_check endpoint",
    ));
    let collector = collector_container(spec);
    for probe in ["livenessProbe", "startupProbe"] {
        let get = &collector[probe]["httpGet"];
        assert_eq!(get["host"], health.0, "{probe}");
        assert_eq!(get["port"], health.1, "{probe}");
    }
    for (name, exporter) in config["exporters"].as_object().unwrap() {
        println!("exports to {name}: {}", exporter["endpoint"]);
    }
}

#[test]
fn collector_outlives_the_daemon_and_fits_its_memory() {
    let docs = manifest();
    let spec = pod_spec(&docs);
    let collector = collector_container(spec);
    // A native sidecar: started before the daemon and stopped after it, so the
    // spans flushed at SIGTERM still have somewhere to go.
    assert!(
        list(&spec["initContainers"]).iter().any(|c| c == collector),
        "the collector is an init container"
    );
    assert_eq!(collector["restartPolicy"], "Always");
    assert!(!collector["startupProbe"].is_null());

    let args: Vec<&str> = list(&daemon_container(spec)["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let shutdown: u64 = args
        .iter()
        .position(|a| *a == "--shutdown-timeout")
        .map_or(5, |i| args[i + 1].parse().unwrap());
    // The flush, plus up to 2 s of draining queued events before it.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(grace > shutdown + 2, "grace {grace} s, flush {shutdown} s");

    let config = collector_config(&docs);
    let limiter = &config["processors"]["memory_limiter"];
    let limit = quantity(&collector["resources"]["limits"]["memory"]);
    let limiter_bytes = limiter["limit_mib"].as_f64().expect("limit_mib") * MIB;
    assert!(
        limiter_bytes < limit,
        "memory_limiter ({limiter_bytes} B) below the container's limit ({limit} B)"
    );
    let collector_env = container_env(collector, "ns");
    if let Some(go) = env_value(&collector_env, "GOMEMLIMIT") {
        let go = quantity(&Value::String(go.trim_end_matches('B').into()));
        assert!(go <= limiter_bytes, "GOMEMLIMIT above memory_limiter");
    }
}

#[test]
fn images_are_pinned_and_resources_bounded() {
    let docs = manifest();
    let spec = pod_spec(&docs);
    for container in containers(spec) {
        let name = &container["name"];
        let image = str_of(&container["image"], "image");
        let tag = image
            .rsplit('/')
            .next()
            .unwrap()
            .split_once(':')
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("{name}: {image} has no tag"));
        assert!(!tag.is_empty() && tag != "latest", "{name}: {image}");
        let resources = &container["resources"];
        for what in ["cpu", "memory"] {
            let request = quantity(&resources["requests"][what]);
            let limit = quantity(&resources["limits"][what]);
            assert!(0.0 < request && request <= limit, "{name} {what}");
        }
    }
    let daemon = daemon_container(spec);
    assert_eq!(
        str_of(&daemon["image"], "image"),
        format!("otel-tcpstates:{}", env!("CARGO_PKG_VERSION")),
        "the image is this release"
    );
    // README's measured peak RSS at the default --max-sockets, with room for the
    // BPF maps charged to the container and for bursts.
    let readme = repo_file("README.md");
    let rss: f64 = readme
        .split(" MiB with 65536 sockets in flight")
        .next()
        .and_then(|before| before.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("README gives the peak RSS with 65536 sockets in flight");
    let limit = quantity(&daemon["resources"]["limits"]["memory"]);
    assert!(
        limit >= 2.0 * rss * MIB,
        "memory limit {} MiB for a {rss} MiB peak",
        limit / MIB
    );
    // And the worst the bench makes (scripts/bench.sh --runs memory-keepalive:
    // links, events and a stalled collector), with a quarter to spare.
    let worst: f64 = readme
        .split(" MiB in the keep-alive memory run")
        .next()
        .and_then(|before| {
            before
                .rsplit(|c: char| !c.is_ascii_digit() && c != '.')
                .next()
        })
        .and_then(|n| n.parse().ok())
        .expect("README gives the peak RSS in the keep-alive memory run");
    assert!(
        worst * MIB <= 0.75 * limit,
        "memory limit {} MiB for a {worst} MiB peak in the keep-alive memory run",
        limit / MIB
    );
}

/// The DaemonSet's otel-tcpstates container's host paths: each volume mount of a
/// hostPath volume, as (node path, container path, read-only).
fn daemonset_binds(spec: &Value, daemon: &Value) -> Vec<Bind> {
    let volumes = list(&spec["volumes"]);
    list(&daemon["volumeMounts"])
        .iter()
        .filter_map(|mount| {
            let volume = volumes.iter().find(|v| v["name"] == mount["name"])?;
            Some(Bind {
                source: volume["hostPath"]["path"].as_str()?.to_owned(),
                target: str_of(&mount["mountPath"], "mountPath").to_owned(),
                read_only: mount["readOnly"] == true,
            })
        })
        .collect()
}

/// The DaemonSet's otel-tcpstates container, run here as the kubelet would, less
/// the capabilities in `without` (Kubernetes' spelling) and with `extra`
/// arguments: root with every capability dropped but those it adds, no_new_privs
/// (allowPrivilegeEscalation: false), a mount and cgroup namespace of its own with
/// the hostPath volumes bound read-only where the container mounts them, its args
/// and its environment with the downward API filled in, exporting to a test
/// receiver over the same protocol, tracing the test's port only.
fn run_daemonset_container(tag: &str, without: &[&str], extra: &[&str]) -> Run {
    let docs = manifest();
    let spec = pod_spec(&docs);
    let daemon = daemon_container(spec);
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "ns");
    let receiver = Receiver::start();
    let mut env = container_env(daemon, namespace);
    let protocol = env_value(&env, "OTEL_EXPORTER_OTLP_PROTOCOL")
        .unwrap_or("http/protobuf")
        .to_owned();
    for (name, value) in &mut env {
        if name == "OTEL_EXPORTER_OTLP_ENDPOINT" {
            *value = match protocol.as_str() {
                "grpc" => receiver.grpc_endpoint(),
                _ => receiver.http_endpoint(),
            };
        }
    }
    let security = &daemon["securityContext"];
    let added: Vec<String> = list(&security["capabilities"]["add"])
        .iter()
        .map(|c| str_of(c, "capability"))
        .filter(|c| !without.contains(c))
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    assert_eq!(security["runAsUser"], 0, "this run is for a root container");
    let mut setpriv = vec![
        format!("--bounding-set=-all,{}", added.join(",")),
        "--inh-caps=-all".to_owned(),
    ];
    if security["allowPrivilegeEscalation"] == false {
        setpriv.push("--no-new-privs".into());
    }
    let (listener, server) = listen("127.0.0.1");
    let mut args: Vec<String> = list(&daemon["args"])
        .iter()
        .map(|a| str_of(a, "arg").to_owned())
        .collect();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.extend(["-D".into(), server.port().to_string()]);

    let (mut command, _stage) = in_container(&daemonset_binds(spec, daemon), tag);
    command
        .arg("setpriv")
        .args(&setpriv)
        .arg(BIN)
        .args(&args)
        .env_clear()
        .env("PATH", PATH)
        .envs(env.iter().map(|(n, v)| (n, v)));
    Run::go(command, false, &receiver, &listener)
}

/// The DaemonSet's container as shipped traces a real connection, the spans carry
/// the Kubernetes resource attributes, and the packet programs behind span links
/// are attached to the node's cgroup v2 root (the one the daemon finds in the
/// container's /proc/self/mountinfo: the cgroup volume), with no warning.
#[test]
fn daemonset_container_traces_a_connection() {
    if !root_or_skip("daemonset_container_traces_a_connection") {
        return;
    }
    let run = run_daemonset_container("daemonset", &[], &[]);
    let (root, _) = run.traced();
    let docs = manifest();
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "ns");
    for (key, field) in [
        ("k8s.node.name", "spec.nodeName"),
        ("host.ip", "status.hostIP"),
    ] {
        assert_eq!(
            root.resource.get(key),
            Some(&otlp::Value::Str(downward(field, namespace))),
            "{key} in {:?}",
            root.resource
        );
    }
    run.assert_links_attached();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// The DaemonSet's container without NET_ADMIN: it runs and exports as before,
/// and says once that span links are off, and why.
#[test]
fn daemonset_container_without_net_admin_exports_without_span_links() {
    if !root_or_skip("daemonset_container_without_net_admin_exports_without_span_links") {
        return;
    }
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let run = run_daemonset_container("daemonset-no-net-admin", &[net_admin], &[]);
    run.traced();
    run.assert_links_off_for_want_of_net_admin();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// With `--no-links`, root needs CAP_BPF and CAP_PERFMON alone: nothing is said of
/// span links, and nothing of them is loaded.
#[test]
fn daemonset_container_with_no_links_needs_only_bpf_and_perfmon() {
    if !root_or_skip("daemonset_container_with_no_links_needs_only_bpf_and_perfmon") {
        return;
    }
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let left: BTreeSet<&str> = ROOT_CAPS.into_iter().filter(|c| *c != net_admin).collect();
    assert_eq!(left, BTreeSet::from(NO_LINKS_ROOT_CAPS));
    let run = run_daemonset_container("daemonset-no-links", &[net_admin], &["--no-links"]);
    run.traced();
    run.assert_no_links_loaded();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}
