//! The real backends: the OpenTelemetry Collector distribution and Jaeger v2 that
//! `scripts/backends.sh` builds from Go modules, as child processes on loopback.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long a backend may take to listen once started (the collector's start is
/// well under a second here; a slow machine with a busy core, a few).
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The programs `scripts/backends.sh` builds.
pub struct Binaries {
    pub collector: PathBuf,
    pub jaeger: PathBuf,
    pub prometheus: PathBuf,
}

/// The backends' binaries: built (or found in the cache) by `scripts/backends.sh`,
/// once per test binary; `scripts/test.sh` runs it first.
pub fn binaries() -> &'static Binaries {
    static BUILT: OnceLock<Binaries> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace().join("scripts/backends.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/backends.sh");
        assert!(
            out.status.success(),
            "scripts/backends.sh failed (it needs Go and the Go module proxy)"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let [.., prometheus, collector, jaeger] = lines.as_slice() else {
            panic!("scripts/backends.sh printed no three paths: {text}");
        };
        Binaries {
            collector: PathBuf::from(collector),
            jaeger: PathBuf::from(jaeger),
            prometheus: PathBuf::from(prometheus),
        }
    })
}

/// A free 127.0.0.1 port (another process may take it before it is used: the
/// backends then fail to start, and the caller tries again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process whose output (stdout and stderr) is kept; killed when dropped.
pub struct Backend {
    name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Backend {
    fn spawn(name: &str, mut command: Command) -> Backend {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {name}: {err}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&output);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        Backend {
            name: name.to_owned(),
            child,
            output,
        }
    }

    pub fn output(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until every address accepts connections; the output if it exits first
    /// or does not get there in [`START_TIMEOUT`].
    fn wait_listening(&mut self, addrs: &[SocketAddr]) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if addrs
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            {
                return Ok(());
            }
            if self.child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                thread::sleep(Duration::from_millis(100)); // the last lines
                return Err(self.output());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lines of its output with a level of warning or worse, as zap writes them.
    pub fn complaints(&self) -> Vec<String> {
        self.output()
            .into_iter()
            .filter(|l| l.contains("\twarn\t") || l.contains("\terror\t") || l.contains("panic"))
            .collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a backend up to five times, on fresh ports each time (a port taken in
/// between makes it exit at once): `attempt` builds the command and names the
/// addresses it must listen on.
fn start_with_retries<T>(
    name: &str,
    mut attempt: impl FnMut() -> (Command, Vec<SocketAddr>, T),
) -> (Backend, T) {
    let mut last = Vec::new();
    for _ in 0..5 {
        let (command, addrs, extra) = attempt();
        let mut backend = Backend::spawn(name, command);
        match backend.wait_listening(&addrs) {
            Ok(()) => return (backend, extra),
            Err(output) => last = output,
        }
    }
    panic!(
        "{name} did not start; its last output:\n{}",
        last.join("\n")
    );
}

/// The collector, running a shipped configuration.
pub struct Collector {
    pub process: Backend,
    /// Its OTLP receiver (gRPC, HTTP).
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Collector {
    /// `validate` on a configuration file, with the environment its deployment
    /// gives it: its output, if it fails.
    pub fn validate(config: &Path, env: &[(&str, &str)]) -> Result<(), String> {
        let collector = &binaries().collector;
        let out = Command::new(collector)
            .arg("validate")
            .arg(format!("--config={}", config.display()))
            .envs(env.iter().copied())
            .output()
            .expect("running the collector's validate");
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    /// Runs `config` (relative to the workspace) with only its endpoints changed:
    /// the OTLP receiver on free loopback ports, the health check on another, and
    /// `sets` (`key=value`, the keys as `--set` takes them, e.g.
    /// `exporters.otlp_grpc/jaeger.endpoint=127.0.0.1:4317`).
    pub fn start(config: &str, sets: &[String]) -> Collector {
        let collector = &binaries().collector;
        let config = workspace().join(config);
        let (process, (grpc, http)) = start_with_retries("collector", || {
            let (grpc, http) = (loopback(free_port()), loopback(free_port()));
            let mut command = Command::new(collector);
            command
                .arg(format!("--config={}", config.display()))
                .arg(format!(
                    "--set=receivers.otlp.protocols.grpc.endpoint={grpc}"
                ))
                .arg(format!(
                    "--set=receivers.otlp.protocols.http.endpoint={http}"
                ))
                .arg(format!(
                    "--set=extensions.health_check.endpoint=127.0.0.1:{}",
                    free_port()
                ))
                // Its own metrics on a port of its own, not 8888 (several run at once).
                .arg(format!(
                    "--set=service.telemetry.metrics.readers=[{{pull: {{exporter: \
                     {{prometheus: {{host: 127.0.0.1, port: {}}}}}}}}}]",
                    free_port()
                ))
                .args(sets.iter().map(|s| format!("--set={s}")));
            (command, vec![grpc, http], (grpc, http))
        });
        // The collector warns of a component named by an old alias as it builds the
        // pipelines, before it says it is ready (`validate` does not): its output
        // up to that line.
        let deadline = Instant::now() + START_TIMEOUT;
        let mut output = process.output();
        while !output.iter().any(|l| l.contains("Everything is ready")) && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
            output = process.output();
        }
        let deprecated: Vec<String> = output
            .into_iter()
            .filter(|line| line.contains("is deprecated"))
            .collect();
        assert!(
            deprecated.is_empty(),
            "{} names components by deprecated aliases:\n{}",
            config.display(),
            deprecated.join("\n")
        );
        Collector {
            process,
            grpc,
            http,
        }
    }

    /// The component names of each kind (`receivers`, `processors`, `exporters`,
    /// `extensions`, `connectors`) this collector lists: their current names,
    /// not the deprecated aliases it still takes.
    pub fn components() -> Value {
        let out = Command::new(&binaries().collector)
            .arg("components")
            .output()
            .expect("running the collector's components");
        assert!(out.status.success(), "{out:?}");
        serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout))
            .expect("the collector's components as YAML")
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// Jaeger v2 with in-memory storage (deploy/jaeger/config.yaml), on free ports.
pub struct Jaeger {
    pub process: Backend,
    pub otlp_grpc: SocketAddr,
    pub query: SocketAddr,
}

impl Jaeger {
    pub fn start() -> Jaeger {
        let jaeger = &binaries().jaeger;
        let config = workspace().join("deploy/jaeger/config.yaml");
        let (process, (otlp_grpc, query)) = start_with_retries("jaeger", || {
            let [grpc, http, query, query_grpc, health] = [(); 5].map(|_| loopback(free_port()));
            let mut command = Command::new(jaeger);
            command
                .arg(format!("--config={}", config.display()))
                .env("JAEGER_OTLP_GRPC", grpc.to_string())
                .env("JAEGER_OTLP_HTTP", http.to_string())
                .env("JAEGER_QUERY_HTTP", query.to_string())
                .env("JAEGER_QUERY_GRPC", query_grpc.to_string())
                .env("JAEGER_HEALTH", health.to_string());
            (command, vec![grpc, query], (grpc, query))
        });
        Jaeger {
            process,
            otlp_grpc,
            query,
        }
    }

    /// GET on the query API; the JSON it answers.
    pub fn get(&self, path_and_query: &str) -> Value {
        let url = format!("http://{}{path_and_query}", self.query);
        let mut response = ureq::get(&url)
            .call()
            .unwrap_or_else(|err| panic!("GET {url}: {err}"));
        response
            .body_mut()
            .read_json()
            .unwrap_or_else(|err| panic!("GET {url}: not JSON: {err}"))
    }

    /// One trace by id (32 hex digits), from the v1 query API (what the UI reads):
    /// `None` while Jaeger has none of its spans.
    pub fn trace(&self, trace_id_hex: &str) -> Option<Value> {
        let url = format!("http://{}/api/traces/{trace_id_hex}", self.query);
        match ureq::get(&url).call() {
            Ok(mut response) => {
                let body: Value = response.body_mut().read_json().expect("a JSON trace");
                body["data"].as_array()?.first().cloned()
            }
            Err(ureq::Error::StatusCode(404)) => None,
            Err(err) => panic!("GET {url}: {err}"),
        }
    }

    /// Waits until `trace_id_hex` has `spans` spans in Jaeger, or `timeout`.
    pub fn wait_for_trace(&self, trace_id_hex: &str, spans: usize, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let trace = self.trace(trace_id_hex);
            let have = trace
                .as_ref()
                .and_then(|t| t["spans"].as_array())
                .map_or(0, Vec::len);
            if have >= spans {
                return trace.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "Jaeger has {have} of the {spans} spans of trace {trace_id_hex} after {timeout:?}: {trace:#?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until Jaeger's trace `trace_id_hex` has the spans `done` looks for
    /// (`what` they are, for the failure), or `timeout`: the trace as it is then.
    pub fn wait_for_trace_where(
        &self,
        trace_id_hex: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let trace = self.trace(trace_id_hex);
            if let Some(trace) = &trace
                && done(trace["spans"].as_array().map_or(&[][..], Vec::as_slice))
            {
                return trace.clone();
            }
            assert!(
                Instant::now() < deadline,
                "Jaeger's trace {trace_id_hex} has no {what} after {timeout:?}: {trace:#?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Hex of an id's bytes, as Jaeger's API writes trace and span ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prometheus v3 with its OTLP receiver on, storing in a directory of its own,
/// running deploy/prometheus.yml (compose's).
pub struct Prometheus {
    pub process: Backend,
    pub addr: SocketAddr,
    storage: PathBuf,
}

impl Prometheus {
    pub fn start() -> Prometheus {
        let prometheus = &binaries().prometheus;
        let config = workspace().join("deploy/prometheus.yml");
        let (process, (addr, storage)) = start_with_retries("prometheus", || {
            let addr = loopback(free_port());
            let storage = std::env::temp_dir().join(format!(
                "otcs-prometheus-{}-{}",
                std::process::id(),
                addr.port()
            ));
            let mut command = Command::new(prometheus);
            command
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--web.enable-otlp-receiver")
                .arg(format!("--storage.tsdb.path={}", storage.display()));
            (command, vec![addr], (addr, storage))
        });
        Prometheus {
            process,
            addr,
            storage,
        }
    }

    /// Where an OTLP/HTTP exporter sends metrics (it appends /v1/metrics).
    pub fn otlp_endpoint(&self) -> String {
        format!("http://{}/api/v1/otlp", self.addr)
    }

    /// An instant PromQL query through the HTTP API: the result's vector.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let mut response = ureq::get(&url)
            .query("query", promql)
            .call()
            .unwrap_or_else(|err| panic!("GET {url}?query={promql}: {err}"));
        let body: Value = response.body_mut().read_json().expect("a JSON answer");
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The metric names it holds.
    pub fn names(&self) -> Vec<String> {
        let url = format!("http://{}/api/v1/label/__name__/values", self.addr);
        let mut response = ureq::get(&url).call().expect("label values");
        let body: Value = response.body_mut().read_json().expect("a JSON answer");
        body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}
