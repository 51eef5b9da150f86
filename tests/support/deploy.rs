//! The deployment files (docker-compose.yml, collector-config/, deploy/, the
//! Dockerfile) read as data, so tests can check that they refer to each other
//! consistently, and run what they describe. Here what they share: reading them,
//! and the addresses, ports and mounts they name; each subject's model and checks
//! in a module of its own.

pub mod collector;
pub mod compose;
pub mod image;
pub mod run;

use std::{
    collections::BTreeSet,
    fmt, fs,
    path::{Path, PathBuf},
    process::Output,
};

use serde_json::Value;

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

/// A file of the repository (`path` from its root), as text.
pub fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    fs::read_to_string(&full).unwrap_or_else(|err| panic!("reading {}: {err}", full.display()))
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

/// The port of a listen address such as "0.0.0.0:4317".
fn host_port(endpoint: &str) -> u16 {
    Endpoint::parse(endpoint)
        .unwrap_or_else(|e| panic!("listen address {e}"))
        .port
}

/// A bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// A command's stdout, then its stderr.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails with every problem a check found, one a line.
pub fn fail_on(problems: Vec<String>) {
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
