//! Real OpenTelemetry-instrumented applications from the registries, run to
//! their end: the Node.js SDK's http instrumentation
//! (`tests/apps/node/traced_node.js`) and Python `requests` with its
//! instrumentation (`tests/apps/traced_requests.py`), both installed by
//! `scripts/setup.sh --test`. Each makes plaintext HTTP/1.1 requests over
//! loopback to a server of its own, exports its own spans over OTLP/HTTP
//! (protobuf) and reports each request it made.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How long an app may run and spans may take to arrive: far beyond what
/// either takes, so only a hang fails.
pub const LONG: Duration = Duration::from_secs(240);
/// The server's delay before each answer: the least a request span's wait for
/// its answer can be, on either end.
pub const DELAY_MS: u64 = 20;
/// The service name of the Node.js app's spans.
pub const NODE_SERVICE: &str = "traced-node";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Node,
    Python,
    /// Python's asyncio: aiohttp's client (instrumented) and server in one
    /// event loop, whose TLS encrypts into memory and sends from the loop.
    PythonAsyncio,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    New,
}

/// One request the app made, as it reports it.
#[derive(Clone, Debug)]
pub struct AppRequest {
    /// Its CLIENT span's trace and span id (lowercase hex), from its traceparent.
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
    pub client_port: u16,
    pub server_port: u16,
    /// The gRPC app's number of the call (0: the first made).
    pub call: Option<u64>,
}

#[derive(Debug)]
pub struct App {
    pub pid: u32,
    pub requests: Vec<AppRequest>,
}

/// Where `scripts/setup.sh --test` installs a runtime's packages.
pub fn packages(runtime: Runtime) -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let (dir, inside) = match runtime {
        Runtime::Node => (
            "otel-tcpstates-node/node_modules",
            "@opentelemetry/sdk-trace-node",
        ),
        Runtime::Python => (
            "otel-tcpstates-python",
            "opentelemetry/instrumentation/requests",
        ),
        Runtime::PythonAsyncio => (
            "otel-tcpstates-python",
            "opentelemetry/instrumentation/aiohttp_client",
        ),
    };
    let dir = cargo_home.join(dir);
    assert!(
        dir.join(inside).is_dir(),
        "{} is not installed in {}; run scripts/setup.sh --test",
        inside,
        dir.display()
    );
    dir
}

/// Runs an instrumented app to its end, its OpenTelemetry settings only its
/// exporter's endpoint `otlp_http` (whatever this process has), killed past
/// [`LONG`]: its pid and output.
pub fn run_to_end(mut command: Command, otlp_http: &str, what: &str) -> (u32, Output) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OTEL_") {
            command.env_remove(key);
        }
    }
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_http)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let pid = child.id();
    let (done, finished) = mpsc::channel::<std::io::Result<Output>>();
    thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(LONG) {
        Ok(out) => (pid, out.expect("waiting for the app")),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("{what} did not finish within {LONG:?}");
        }
    }
}

/// Runs the app to its end and reads its report. `otlp_http` is the base URL of
/// the OTLP/HTTP receiver it exports its spans to (`OTEL_EXPORTER_OTLP_ENDPOINT`:
/// it appends /v1/traces); `ratio` is the share of its requests it samples, by
/// trace id; `port` its server's (`None`: any free one).
pub fn run_app(
    otlp_http: &str,
    runtime: Runtime,
    family: u8,
    mode: Mode,
    requests: usize,
    ratio: f64,
    port: Option<u16>,
) -> App {
    run_app_over(
        otlp_http, runtime, family, mode, requests, ratio, port, false,
    )
}

/// [`run_app`], over HTTPS when `tls`: the app's server has the test
/// certificate in `tests/apps/certs`, which its client trusts.
#[allow(clippy::too_many_arguments)]
pub fn run_app_over(
    otlp_http: &str,
    runtime: Runtime,
    family: u8,
    mode: Mode,
    requests: usize,
    ratio: f64,
    port: Option<u16>,
    tls: bool,
) -> App {
    let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps");
    let mut command = match runtime {
        Runtime::Node => {
            let mut c = Command::new("node");
            c.arg(apps.join("node/traced_node.js"))
                .env("NODE_PATH", packages(runtime));
            c
        }
        Runtime::Python | Runtime::PythonAsyncio => {
            let mut c = Command::new("python3");
            c.arg(apps.join(if runtime == Runtime::Python {
                "traced_requests.py"
            } else {
                "traced_aiohttp.py"
            }))
            .env("PYTHONPATH", packages(runtime));
            c
        }
    };
    let mut args = vec![
        ("--family", family.to_string()),
        ("--requests", requests.to_string()),
        (
            "--mode",
            match mode {
                Mode::KeepAlive => "keepalive",
                Mode::New => "new",
            }
            .to_owned(),
        ),
        ("--ratio", ratio.to_string()),
        ("--delay-ms", DELAY_MS.to_string()),
        ("--port", port.unwrap_or(0).to_string()),
    ];
    if tls {
        args.push(("--tls", apps.join("certs").display().to_string()));
    }
    for (flag, value) in &args {
        command.args([flag, value.as_str()]);
    }
    let (pid, out) = run_to_end(command, otlp_http, &format!("{runtime:?} app"));
    report(pid, &out, &format!("{runtime:?} app {args:?}"))
}

/// gRPC calls, each over its own HTTP/2 stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Calls {
    Unary,
    /// Bidirectional streaming: three messages each way a call.
    Stream,
    /// Unary, all made at once, so multiplexed on the connection, and answered
    /// in the reverse order: call n after (calls - n) x [`DELAY_MS`].
    Multiplexed,
}

/// Runs the gRPC app (`tests/apps/node/traced_grpc.js`: `@grpc/grpc-js` with
/// the OpenTelemetry gRPC instrumentation) to its end: `calls` calls one after
/// another over one channel, so one TCP connection, plaintext HTTP/2 (`h2c`) or
/// over TLS with the test certificate; its report, one request a call.
pub fn run_grpc(
    otlp_http: &str,
    family: u8,
    kind: Calls,
    calls: usize,
    ratio: f64,
    tls: bool,
) -> App {
    let apps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps");
    let mut command = Command::new("node");
    command
        .arg(apps.join("node/traced_grpc.js"))
        .env("NODE_PATH", packages(Runtime::Node));
    let mut args = vec![
        ("--family", family.to_string()),
        ("--calls", calls.to_string()),
        (
            "--kind",
            match kind {
                Calls::Unary | Calls::Multiplexed => "unary",
                Calls::Stream => "stream",
            }
            .to_owned(),
        ),
        ("--ratio", ratio.to_string()),
        ("--delay-ms", DELAY_MS.to_string()),
    ];
    if kind == Calls::Multiplexed {
        args.push(("--concurrent", String::new()));
    }
    if tls {
        args.push(("--tls", apps.join("certs").display().to_string()));
    }
    for (flag, value) in &args {
        command.arg(flag);
        if !value.is_empty() {
            command.arg(value);
        }
    }
    let (pid, out) = run_to_end(command, otlp_http, "gRPC app");
    report(pid, &out, &format!("gRPC app {args:?}"))
}

/// An app's report, from its output (`what` names it in a failure).
fn report(pid: u32, out: &Output, what: &str) -> App {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed with {}:\n{stderr}",
        out.status
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the app's report is not JSON ({e}); stderr:\n{stderr}"));
    let port = |v: &serde_json::Value| u16::try_from(v.as_u64().expect("a port")).unwrap();
    let text = |v: &serde_json::Value| v.as_str().expect("text").to_owned();
    App {
        pid,
        requests: report["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .map(|r| AppRequest {
                trace_id: text(&r["trace_id"]),
                span_id: text(&r["span_id"]),
                sampled: r["sampled"].as_bool().expect("sampled"),
                client_port: port(&r["client_port"]),
                server_port: port(&r["server_port"]),
                call: r["call"].as_u64(),
            })
            .collect(),
    }
}
