//! The `rotel` OTLP collector (PyPI package `rotel`, installed by
//! `scripts/setup.sh --test`) as a child process between the daemon and a
//! [`Receiver`](super::otlp::Receiver), to check interoperability with a collector
//! that is not ours.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Where `scripts/setup.sh --test` puts it (`pip install --target`); keep in sync.
const INSTALL_DIR: &str = "otel-tcpstates-rotel";

/// How long rotel holds spans before forwarding them (its default is 200 ms).
/// Short, so tests wait little, but still batching, as in production.
pub const BATCH_TIMEOUT: &str = "50ms";

fn binary() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    cargo_home
        .join(INSTALL_DIR)
        .join("rotel")
        .join("rotel-agent")
}

/// One of rotel's named exporters (`--exporters NAME:otlp`). rotel takes their
/// settings from `ROTEL_EXPORTER_{NAME}_*` variables only.
#[derive(Clone, Debug)]
pub struct Export {
    /// Letters and digits: it becomes part of the variables' names.
    pub name: String,
    pub signal: Signal,
    /// For "http", the base URL: rotel appends "/v1/traces" or "/v1/metrics".
    pub endpoint: String,
    /// "grpc" or "http".
    pub protocol: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

/// A running rotel receiving OTLP on 127.0.0.1 and forwarding it. Killed when
/// dropped.
pub struct Rotel {
    child: Child,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    output: Arc<Mutex<Vec<String>>>,
}

impl Rotel {
    /// Starts rotel receiving OTLP on free 127.0.0.1 ports and exporting traces to
    /// `export_endpoint` (a Receiver's gRPC endpoint, "http://127.0.0.1:PORT").
    /// Returns once both its ports accept connections.
    pub fn start(export_endpoint: &str) -> Rotel {
        let configure = |command: &mut Command| {
            command
                .args([
                    "--otlp-receiver-metrics-disabled",
                    "--otlp-receiver-logs-disabled",
                ])
                .args(["--exporter", "otlp"])
                .args(["--otlp-exporter-protocol", "grpc"])
                .args(["--otlp-exporter-endpoint", export_endpoint]);
        };
        Self::start_configured(&configure)
    }

    /// Starts rotel with named exporters, each for one signal: traces and metrics
    /// received go to the exporter named for them. This rotel (0.0.1a15) takes
    /// at most one exporter per signal; it refuses more at start-up.
    pub fn start_exporting(exports: &[Export]) -> Rotel {
        for export in exports {
            assert!(
                export.name.bytes().all(|b| b.is_ascii_alphanumeric()),
                "rotel exporter name {:?}: letters and digits only",
                export.name
            );
        }
        let named = |signal| {
            exports
                .iter()
                .filter(|e| e.signal == signal)
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let (traces, metrics) = (named(Signal::Traces), named(Signal::Metrics));
        let configure = |command: &mut Command| {
            let declared: Vec<String> =
                exports.iter().map(|e| format!("{}:otlp", e.name)).collect();
            command.args(["--exporters", &declared.join(",")]);
            if traces.is_empty() {
                command.arg("--otlp-receiver-traces-disabled");
            } else {
                command.args(["--exporters-traces", &traces]);
            }
            if metrics.is_empty() {
                command.arg("--otlp-receiver-metrics-disabled");
            } else {
                command.args(["--exporters-metrics", &metrics]);
            }
            command.arg("--otlp-receiver-logs-disabled");
            for export in exports {
                let var = |setting: &str| {
                    format!("ROTEL_EXPORTER_{}_{setting}", export.name.to_uppercase())
                };
                command
                    .env(var("ENDPOINT"), &export.endpoint)
                    .env(var("PROTOCOL"), export.protocol);
            }
        };
        Self::start_configured(&configure)
    }

    /// `configure` adds the exporter settings to `rotel start`.
    fn start_configured(configure: &dyn Fn(&mut Command)) -> Rotel {
        let bin = binary();
        assert!(
            bin.is_file(),
            "rotel is not installed at {}; run scripts/setup.sh --test",
            bin.display()
        );
        // rotel cannot listen on port 0 (it panics), so pick free ports and pass
        // them. Another process can take one in between; rotel then exits at once
        // ("Address already in use") and we try again with new ports.
        let mut last_output = Vec::new();
        for _ in 0..5 {
            match Self::try_start(&bin, configure) {
                Ok(rotel) => return rotel,
                Err(output) => last_output = output,
            }
        }
        panic!(
            "rotel did not start; its last output:\n{}",
            last_output.join("\n")
        );
    }

    /// Err(output) if rotel exited before listening.
    fn try_start(bin: &Path, configure: &dyn Fn(&mut Command)) -> Result<Rotel, Vec<String>> {
        let (grpc_addr, http_addr) = free_ports();
        let mut command = Command::new(bin);
        command
            .arg("start")
            .args(["--otlp-grpc-endpoint", &grpc_addr.to_string()])
            .args(["--otlp-http-endpoint", &http_addr.to_string()]);
        configure(&mut command);
        let mut child = command
            .args(["--batch-timeout", BATCH_TIMEOUT])
            // Its log is only for our panic messages; keep it free of colour codes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let output = Arc::new(Mutex::new(Vec::new()));
        collect_into(child.stdout.take().expect("piped stdout"), &output);
        collect_into(child.stderr.take().expect("piped stderr"), &output);
        let mut rotel = Rotel {
            child,
            grpc_addr,
            http_addr,
            output,
        };

        let deadline = Instant::now() + Duration::from_secs(10);
        while !(listening(grpc_addr) && listening(http_addr)) {
            let exited = rotel.child.try_wait().expect("poll rotel").is_some();
            if exited {
                // Let the reader threads see the last lines.
                thread::sleep(Duration::from_millis(50));
                return Err(rotel.output());
            }
            assert!(
                Instant::now() < deadline,
                "rotel did not listen on {grpc_addr} and {http_addr} within 10 s; output:\n{}",
                rotel.output().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(rotel)
    }

    /// Where the daemon should send OTLP/gRPC: "http://127.0.0.1:PORT".
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The base URL for OTLP/HTTP (rotel serves traces at "/v1/traces").
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// What rotel has logged so far (stdout and stderr), for assertion messages.
    pub fn output(&self) -> Vec<String> {
        self.output
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct free ports: both listeners are held until both are known.
fn free_ports() -> (SocketAddr, SocketAddr) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("find a free port on 127.0.0.1");
    let (a, b) = (bind(), bind());
    (
        a.local_addr().expect("local address"),
        b.local_addr().expect("local address"),
    )
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
}

fn collect_into(stream: impl std::io::Read + Send + 'static, sink: &Arc<Mutex<Vec<String>>>) {
    let sink = Arc::clone(sink);
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
        }
    });
}
