//! nginx (Debian's package) serving a two-byte response on 127.0.0.1 from a
//! generated configuration in a temporary directory, and wrk (Debian's) against it
//! over keep-alive connections: the workload where a per-request scan costs most.
//! wrk sends no header, one fixed header line, or a distinct sampled W3C
//! `traceparent` on every request (a Lua script, [`TRACEPARENTS_LUA`]).
//! `scripts/bench.sh` installs both.

use std::{
    fs,
    io::Read as _,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::{DieWithParent as _, cpu_seconds, pin_to_cpu, wait_or_kill};

/// wrk's load: one thread (nginx has one worker; two cores in all) over this many
/// keep-alive connections.
const WRK_THREADS: u32 = 1;
const WRK_CONNECTIONS: u32 = 32;
/// Streams h2load keeps in flight on each connection (HTTP/2 multiplexing).
const H2_STREAMS: u32 = 10;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// [`TRACEPARENTS_LUA`]'s file in nginx's temporary directory.
const TRACEPARENTS_SCRIPT: &str = "traceparents.lua";

/// wrk's script for [`Requests::DistinctTraceparents`]: every request carries its
/// own sampled `traceparent`, `00-<trace id>-<span id>-01`. The trace id is a
/// random 32-bit word fixed per wrk thread, a random word per request, the thread's
/// number and a counter; the span id a random word and the counter: never all
/// zero, never the same twice within a run. wrk's Lua is LuaJIT, whose
/// `string.format("%08x", n)` takes numbers below 2^31, hence the 31-bit words.
const TRACEPARENTS_LUA: &str = r#"-- otel-tcpstates bench: a distinct sampled traceparent on every request.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

local run = 1
local counter = 0
local headers = {}

function init(args)
  math.randomseed(os.time() * 64 + (thread_number or 0))
  run = math.random(1, 0x7fffffff)
end

function request()
  counter = counter + 1
  headers["traceparent"] = string.format("00-%08x%08x%08x%08x-%08x%08x-01",
    run, math.random(0, 0x7fffffff), thread_number or 0, counter,
    math.random(0, 0x7fffffff), counter)
  return wrk.format(nil, nil, headers)
end
"#;

/// What wrk puts on each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requests {
    /// Nothing beyond wrk's own headers.
    Plain,
    /// This header line (`name: value`) on every request.
    Header(&'static str),
    /// A distinct sampled `traceparent` on every request ([`TRACEPARENTS_LUA`]).
    DistinctTraceparents,
}

pub struct Nginx {
    master: Child,
    dir: PathBuf,
    port: u16,
    /// "https" when it serves TLS, else "http".
    scheme: &'static str,
}

impl Nginx {
    /// Starts nginx (master and one worker, both on `cpu` if given) and returns once
    /// it accepts connections.
    pub fn start(cpu: Option<usize>) -> Result<Nginx> {
        Self::start_with(cpu, None)
    }

    /// [`Nginx::start`] serving HTTPS with the certificate and key in `certs`
    /// (`cert.pem`, `key.pem`): Debian's nginx does its TLS with the system's
    /// `libssl.so.3`, as wrk does.
    pub fn start_tls(cpu: Option<usize>, certs: &std::path::Path) -> Result<Nginx> {
        Self::start_with(cpu, Some(certs))
    }

    /// [`Nginx::start`] serving plaintext HTTP/2 (`h2c`, the client's preface
    /// first, as gRPC does it) on its port.
    pub fn start_h2c(cpu: Option<usize>) -> Result<Nginx> {
        Self::start_as(cpu, Serve::H2c)
    }

    fn start_with(cpu: Option<usize>, certs: Option<&std::path::Path>) -> Result<Nginx> {
        Self::start_as(cpu, certs.map_or(Serve::Http, Serve::Https))
    }

    fn start_as(cpu: Option<usize>, serve: Serve<'_>) -> Result<Nginx> {
        let dir = std::env::temp_dir().join(format!("churn-nginx-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = free_port()?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config(&dir, port, serve))?;
        fs::write(dir.join(TRACEPARENTS_SCRIPT), TRACEPARENTS_LUA)?;
        let master = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .die_with_parent()
            .on_cpu(cpu)
            .spawn()
            .context("starting nginx (scripts/bench.sh installs it)")?;
        let scheme = if matches!(serve, Serve::Https(_)) {
            "https"
        } else {
            "http"
        };
        let mut nginx = Nginx {
            master,
            dir,
            port,
            scheme,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(status) = nginx.master.try_wait()? {
                bail!("nginx exited with {status}: {}", nginx.error_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx not listening within {READY_TIMEOUT:?}: {}",
                    nginx.error_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// Its master and worker processes.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.master.id();
        let children = fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }

    /// User and system CPU seconds of the master and its workers (live ones).
    pub fn cpu_seconds(&self) -> (f64, f64) {
        self.pids()
            .iter()
            .filter_map(|pid| cpu_seconds(&pid.to_string()).ok())
            .fold((0.0, 0.0), |(u, s), (user, system)| (u + user, s + system))
    }

    fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// One wrk run of `seconds` against this nginx, its requests as `requests` says.
    pub fn wrk(&self, seconds: u64, requests: Requests, cpu: Option<usize>) -> Result<Wrk> {
        let mut command = Command::new("wrk");
        command.args([
            "-t",
            &WRK_THREADS.to_string(),
            "-c",
            &WRK_CONNECTIONS.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--timeout",
            "5s",
        ]);
        match requests {
            Requests::Plain => {}
            Requests::Header(header) => {
                command.args(["-H", header]);
            }
            Requests::DistinctTraceparents => {
                command.arg("-s").arg(self.dir.join(TRACEPARENTS_SCRIPT));
            }
        }
        command.arg(format!("{}://127.0.0.1:{}/", self.scheme, self.port));
        let out = run_load(command, seconds, cpu, "wrk")?;
        Wrk::parse(&out)
    }
}

impl Nginx {
    /// One h2load run of `seconds` against this nginx over h2c: `clients`
    /// connections with `streams` requests in flight on each, every request
    /// with `header` (`name: value`) when given.
    pub fn h2load(&self, seconds: u64, header: Option<&str>, cpu: Option<usize>) -> Result<Wrk> {
        let mut command = Command::new("h2load");
        command.args([
            "-c",
            &WRK_CONNECTIONS.to_string(),
            "-m",
            &H2_STREAMS.to_string(),
            "-D",
            &seconds.to_string(),
        ]);
        if let Some(header) = header {
            command.args(["-H", header]);
        }
        command.arg(format!("http://127.0.0.1:{}/", self.port));
        let out = run_load(command, seconds, cpu, "h2load")?;
        Wrk::parse_h2load(&out)
    }
}

/// Runs a load generator's `command` for its window of `seconds` (on `cpu`
/// if given), killed 30 s past it: its output, or why it failed.
fn run_load(mut command: Command, seconds: u64, cpu: Option<usize>, what: &str) -> Result<String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .die_with_parent()
        .on_cpu(cpu)
        .spawn()
        .with_context(|| format!("starting {what} (scripts/bench.sh installs it)"))?;
    // Its output is a few lines: the pipes do not fill before it exits.
    let deadline = Instant::now() + Duration::from_secs(seconds + 30);
    let status = wait_or_kill(&mut child, deadline)
        .with_context(|| format!("{what} did not finish in time"))?;
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .context("its stdout")?
        .read_to_string(&mut out)?;
    child
        .stderr
        .take()
        .context("its stderr")?
        .read_to_string(&mut err)?;
    if !status.success() {
        bail!("{what} exited with {status}: {err}{out}");
    }
    Ok(out)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: a fast shutdown (the master stops its workers).
        let _ = kill(Pid::from_raw(self.master.id() as i32), Signal::SIGTERM);
        wait_or_kill(&mut self.master, Instant::now() + Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What nginx serves on its port.
#[derive(Clone, Copy)]
enum Serve<'a> {
    Http,
    /// With the certificate and key in this directory.
    Https(&'a std::path::Path),
    /// Plaintext HTTP/2.
    H2c,
}

/// The whole configuration: one worker, keep-alive without a request limit, no
/// access log, every path inside `dir`.
fn config(dir: &std::path::Path, port: u16, serve: Serve<'_>) -> String {
    let listen = match serve {
        Serve::Https(certs) => format!(
            "listen 127.0.0.1:{port} ssl;
        ssl_certificate {0}/cert.pem;
        ssl_certificate_key {0}/key.pem;",
            certs.display()
        ),
        Serve::Http => format!("listen 127.0.0.1:{port};"),
        // Without TLS, `http2` serves HTTP/2 only, by prior knowledge; no limit
        // of requests a connection.
        Serve::H2c => format!(
            "listen 127.0.0.1:{port} http2;
        http2_max_requests 1000000000;"
        ),
    };
    let dir = dir.display();
    format!(
        "user nobody nogroup;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 60s;
    keepalive_requests 1000000000;
    server {{
        {listen}
        location / {{
            default_type text/plain;
            return 200 \"ok\";
        }}
    }}
}}
"
    )
}

/// A port nothing listens on now (the kernel's choice, released at once).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// What a wrk run reports.
pub struct Wrk {
    pub requests_per_s: f64,
    pub requests: u64,
    /// "Socket errors: ..." and "Non-2xx or 3xx responses: N", if any.
    pub errors: Vec<String>,
}

impl Wrk {
    /// h2load's "finished in 4.00s, 123456.78 req/s, ..." and "requests: N
    /// total, N started, N done, N succeeded, F failed, E errored, T timeout".
    fn parse_h2load(out: &str) -> Result<Wrk> {
        let finished = out
            .lines()
            .find(|l| l.starts_with("finished in "))
            .with_context(|| format!("no \"finished in\" in h2load's output: {out}"))?;
        let requests_per_s = finished
            .split(", ")
            .find_map(|f| f.strip_suffix(" req/s"))
            .context("no req/s in h2load's output")?
            .parse()?;
        let counts = out
            .lines()
            .find_map(|l| l.strip_prefix("requests: "))
            .context("no requests line in h2load's output")?;
        let count = |what: &str| {
            counts
                .split(", ")
                .find_map(|f| f.strip_suffix(what))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let requests = count(" succeeded");
        let failed = count(" failed") + count(" errored") + count(" timeout");
        let errors = if failed > 0 {
            vec![format!("h2load: {counts}")]
        } else {
            Vec::new()
        };
        Ok(Wrk {
            requests_per_s,
            requests,
            errors,
        })
    }

    fn parse(out: &str) -> Result<Wrk> {
        let field = |key: &str| {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .map(str::trim)
        };
        let requests_per_s = field("Requests/sec:")
            .with_context(|| format!("no Requests/sec in wrk's output: {out}"))?
            .parse()?;
        // "  123456 requests in 10.00s, 12.34MB read"
        let requests = out
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let errors = out
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("Socket errors:") || l.starts_with("Non-2xx"))
            .map(str::to_owned)
            .collect();
        Ok(Wrk {
            requests_per_s,
            requests,
            errors,
        })
    }
}

trait OnCpu {
    fn on_cpu(&mut self, cpu: Option<usize>) -> &mut Self;
}

impl OnCpu for Command {
    /// The child (and whatever it forks) runs on `cpu` only.
    fn on_cpu(&mut self, cpu: Option<usize>) -> &mut Self {
        if cpu.is_none() {
            return self;
        }
        // SAFETY: sched_setaffinity is async-signal-safe and touches only the stack.
        unsafe {
            self.pre_exec(move || {
                pin_to_cpu(cpu);
                Ok(())
            })
        }
    }
}
