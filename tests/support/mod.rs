//! Helpers for the integration tests: run the real daemon, make real connections,
//! read what it printed.
#![allow(dead_code)]

pub mod app_links;
pub mod apps;
pub mod backends;
pub mod deploy;
pub mod load;
pub mod netfault;
pub mod netns;
pub mod otlp;
pub mod rotel;
pub mod spinner;
pub mod tls;

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill},
        socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket},
    },
    unistd::Pid,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_otel-tcpstates");

/// The daemon in the release build, the one users run: the debug build behind
/// [`BIN`] is several times slower on the hot path, so a test of load, overload or
/// shutdown timing would measure the wrong thing with it. Built (or found up to
/// date) once per test binary by the same cargo that runs the tests;
/// `scripts/test.sh` builds it beforehand, so that is a no-op there.
pub fn release_bin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cargo = Command::new(env!("CARGO"));
        // What cargo set for running this test (its package's name, OUT_DIR, ...):
        // build scripts watch some of these, and a difference from the outer
        // build's environment would rebuild the release binary every time.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key == "OUT_DIR"
                || key == "CARGO_PRIMARY_PACKAGE"
                || key == "CARGO_TARGET_TMPDIR"
                || [
                    "CARGO_PKG_",
                    "CARGO_MANIFEST_",
                    "CARGO_BIN_EXE_",
                    "CARGO_CRATE_",
                ]
                .iter()
                .any(|prefix| key.starts_with(prefix))
            {
                cargo.env_remove(&*key);
            }
        }
        let out = cargo
            .current_dir(&workspace)
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "otel-tcpstates",
                "--bin",
                "otel-tcpstates",
                "--message-format=json",
            ])
            .stderr(Stdio::piped())
            .output()
            .expect("running cargo to build the release daemon");
        assert!(
            out.status.success(),
            "cargo build --release failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["target"]["name"] == "otel-tcpstates")
            .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .expect("cargo build --release named no otel-tcpstates executable")
    })
}

/// How long past its `--shutdown-timeout` the daemon may take to be gone after
/// SIGTERM or SIGINT: its exit watchdog ends it 0.4 s past the deadline whatever
/// it is doing; the rest is the exit itself and [`Tracer::stop_with`]'s 10 ms
/// polling. A bound on an exit is the daemon's own deadline plus this.
pub const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Whether a test that loads eBPF can run. Outside CI a non-root run skips with a
/// note; in CI (which runs as root) not being root is a failure, never a skip.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must run as root so the eBPF tests run"
    );
    eprintln!("skipping {test}: needs root (loads an eBPF program)");
    false
}

/// A command that runs `script` (`sh -c`; what is appended to the command comes
/// in as "$@") in a mount namespace of its own, so what it mounts or unmounts
/// stays there; with `cgroup`, in a cgroup namespace of its own too.
pub fn in_private_mounts(script: &str, cgroup: bool) -> Command {
    let mut command = Command::new("unshare");
    command.arg("--mount");
    if cgroup {
        command.arg("--cgroup");
    }
    command.args(["--propagation", "private", "sh", "-c", script, "sh"]);
    command
}

/// A line of shell that makes every mount at and below `tree` read-only.
pub fn remount_read_only(tree: &str) -> String {
    format!(
        "findmnt -Rrno TARGET {tree} | while read -r m; do mount -o remount,bind,ro \"$m\"; done\n"
    )
}

/// The calling thread's `comm`, as the kernel reports it in events.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim_end()
        .to_owned()
}

/// A running otel-tcpstates whose stdout is collected line by line.
pub struct Tracer {
    child: Child,
    lines: Lines,
    stderr: Lines,
}

pub struct Finished {
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: Vec<String>,
    pub took: Duration,
}

/// A stream's lines so far, each with when it was read.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn collect(stream: impl std::io::Read + Send + 'static) -> Lines {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    lines
}

fn texts(lines: &Lines) -> Vec<String> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|(_, l)| l.clone())
        .collect()
}

impl Tracer {
    /// Starts the daemon and waits until it is attached: it then prints its header
    /// or, exporting without `--print`, logs where it exports to.
    pub fn start(args: &[&str]) -> Tracer {
        Self::start_with_env(args, &[])
    }

    /// The daemon exporting over OTLP/gRPC to `rx` (its batches sent at once),
    /// with `extra` flags.
    pub fn exporting_to(rx: &otlp::Receiver, extra: &[&str]) -> Tracer {
        let endpoint = rx.grpc_endpoint();
        let mut args = vec!["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"];
        args.extend_from_slice(extra);
        Self::start_with_env(&args, otlp::FAST)
    }

    /// [`Tracer::exporting_to`] with `--links`, the packet programs attached: it
    /// says nothing of links being off.
    pub fn linking_to(rx: &otlp::Receiver, extra: &[&str]) -> Tracer {
        let tracer = Self::exporting_to(rx, &[&["--links"], extra].concat());
        assert!(
            !tracer.stderr().iter().any(|l| l.contains("links are off")),
            "{:?}",
            tracer.stderr()
        );
        tracer
    }

    /// [`Tracer::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Tracer {
        Self::spawn(Path::new(BIN), args, env)
    }

    /// [`Tracer::start_with_env`] with the daemon built as users run it, for the
    /// tests whose outcome depends on its speed: see [`release_bin`].
    pub fn start_release(args: &[&str], env: &[(&str, &str)]) -> Tracer {
        Self::spawn(release_bin(), args, env)
    }

    /// [`Tracer::start_with_env`] run by a command that ends by exec'ing its
    /// arguments (`unshare`, a shell's `exec "$@"`): `wrapper` comes first, then
    /// the daemon and its arguments. The daemon keeps the wrapper's pid.
    pub fn start_in(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Tracer {
        let (first, rest) = wrapper.split_first().expect("a wrapper command");
        let mut command = Command::new(first);
        command.args(rest).arg(BIN).args(args);
        Self::spawn_command(command, args, env)
    }

    fn spawn(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Tracer {
        let mut command = Command::new(bin);
        command.args(args);
        Self::spawn_command(command, args, env)
    }

    fn spawn_command(mut command: Command, args: &[&str], env: &[(&str, &str)]) -> Tracer {
        let mut child = command
            .args(["--poll-ms", "10"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn otel-tcpstates");
        let lines = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let mut tracer = Tracer {
            child,
            lines,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let attached = |t: &Tracer| {
            !t.lines().is_empty() || t.stderr().iter().any(|l| l.contains("exporting traces"))
        };
        while !attached(&tracer) {
            if let Some(status) = tracer.child.try_wait().unwrap() {
                panic!(
                    "otel-tcpstates {args:?} exited with {status} before attaching: {:?}",
                    texts(&tracer.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "otel-tcpstates {args:?} never attached"
            );
            thread::sleep(Duration::from_millis(20));
        }
        tracer
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon has exited (it is not waited for).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    pub fn lines(&self) -> Vec<String> {
        texts(&self.lines)
    }

    /// The output lines so far, each with when the test read it.
    pub fn lines_read_at(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        texts(&self.stderr)
    }

    /// Waits until `done` holds for the output so far; returns that output.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let lines = self.lines();
            if done(&lines) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; output so far:\n{}",
                lines.join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits for the daemon to exit.
    pub fn stop_with(mut self, signal: Signal) -> Finished {
        let started = Instant::now();
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
        let deadline = started + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("otel-tcpstates did not exit within 10 s of {signal}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let took = started.elapsed();
        // Let the reader threads see EOF.
        thread::sleep(Duration::from_millis(50));
        Finished {
            status,
            lines: self.lines(),
            stderr: texts(&self.stderr),
            took,
        }
    }

    /// Waits until the daemon (printing, `-s`) printed the CLOSE of every
    /// (local, peer) pair, stops it, and checks that it exited well and logged
    /// no line with any of `losses` ("events lost", …).
    pub fn stop_after_closes(self, pairs: &[(u16, u16)], losses: &[&str]) -> Finished {
        self.wait_for("every end's CLOSE", |lines| {
            let closed: Vec<(u16, u16)> = rows(lines, false)
                .into_iter()
                .filter(|r| r.new == "CLOSE")
                .map(|r| (r.lport, r.rport))
                .collect();
            pairs.iter().all(|p| closed.contains(p))
        });
        let done = self.stop();
        assert!(done.status.success(), "{:?}", done.stderr);
        let lost: Vec<&String> = done
            .stderr
            .iter()
            .filter(|l| losses.iter().any(|what| l.contains(what)))
            .collect();
        assert_eq!(lost, Vec::<&String>::new(), "nothing lost");
        done
    }

    pub fn stop(self) -> Finished {
        self.stop_with(Signal::SIGINT)
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of `-s` (CSV) output, optionally with `-t` first.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub timestamp: Option<f64>,
    pub skaddr: String,
    pub pid: u32,
    pub comm: String,
    pub ip: u8,
    pub laddr: String,
    pub lport: u16,
    pub raddr: String,
    pub rport: u16,
    pub old: String,
    pub new: String,
    pub ms: f64,
}

impl Row {
    pub fn transition(&self) -> (&str, &str) {
        (&self.old, &self.new)
    }
}

/// Parses CSV rows (skipping the header); `with_timestamp` for `-s -t` output.
pub fn rows(lines: &[String], with_timestamp: bool) -> Vec<Row> {
    lines
        .iter()
        .skip(1)
        .map(|line| {
            let mut f: Vec<&str> = line.split(',').collect();
            let timestamp = with_timestamp.then(|| f.remove(0).parse().unwrap());
            assert_eq!(f.len(), 11, "unexpected CSV line {line:?}");
            Row {
                timestamp,
                skaddr: f[0].to_owned(),
                pid: f[1].parse().unwrap(),
                comm: f[2].to_owned(),
                ip: f[3].parse().unwrap(),
                laddr: f[4].to_owned(),
                lport: f[5].parse().unwrap(),
                raddr: f[6].to_owned(),
                rport: f[7].parse().unwrap(),
                old: f[8].to_owned(),
                new: f[9].to_owned(),
                ms: f[10].parse().unwrap(),
            }
        })
        .collect()
}

/// The rows of one socket: the one whose transition `pick` selects, and every row
/// with the same kernel address before it was closed.
pub fn socket_rows(rows: &[Row], pick: impl Fn(&Row) -> bool) -> Vec<Row> {
    let Some(first) = rows.iter().position(&pick) else {
        return Vec::new();
    };
    let skaddr = rows[first].skaddr.clone();
    // Start at this socket's first row: the latest earlier row of the same address
    // that follows a CLOSE of a previous socket at that address.
    let mut start = first;
    while start > 0 {
        let prev = rows[..start].iter().rposition(|r| r.skaddr == skaddr);
        match prev {
            Some(i) if rows[i].new != "CLOSE" => start = i,
            _ => break,
        }
    }
    let mut out = Vec::new();
    for row in &rows[start..] {
        if row.skaddr == skaddr {
            out.push(row.clone());
            if row.new == "CLOSE" {
                break;
            }
        }
    }
    out
}

pub fn transitions(rows: &[Row]) -> Vec<(&str, &str)> {
    rows.iter().map(Row::transition).collect()
}

/// A loopback port nothing listens on (bound, then released: the kernel does not
/// hand it out again at once).
/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hosts), from this process's mountinfo.
pub fn cgroup2_mount() -> String {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next() == Some("cgroup2"))
                .then(|| before.split(' ').nth(4).map(str::to_owned))
                .flatten()
        })
        .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mountinfo:\n{mountinfo}"))
}

/// A TCP socket bound to a free 127.0.0.1 port that it keeps until it is closed,
/// to connect from. Bound by number: a port bound as 0 goes back to the kernel
/// when the socket enters CLOSE (a refused connect), and the next socket may get
/// it, giving two ends the same ports.
pub fn socket_with_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::AsRawFd as _;
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .expect("a TCP socket");
        match bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)) {
            Ok(()) => return (fd, port),
            // Taken in between by someone else: another one.
            Err(Errno::EADDRINUSE) => continue,
            Err(err) => panic!("binding 127.0.0.1:{port}: {err}"),
        }
    }
}

/// A connect() from 127.0.0.1 to `port`, where nothing listens, refused by the
/// kernel: the socket (open, keeping its port) and its local port. Never from
/// `port` itself: a socket connecting to its own address connects to itself.
pub fn refused_connect(port: u16) -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::AsRawFd as _;
    loop {
        let (fd, local) = socket_with_port();
        if local == port {
            continue;
        }
        let to = SockaddrIn::new(127, 0, 0, 1, port);
        assert_eq!(
            nix::sys::socket::connect(fd.as_raw_fd(), &to),
            Err(Errno::ECONNREFUSED),
            "127.0.0.1:{local} -> 127.0.0.1:{port}"
        );
        return (fd, local);
    }
}

/// Sets how often a connect() sends its SYN again before it fails with
/// ETIMEDOUT (TCP_SYNCNT; nix has no option for it).
pub fn set_syn_retries(fd: &impl std::os::fd::AsRawFd, retries: libc::c_int) {
    // SAFETY: a valid socket and an int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const retries).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "TCP_SYNCNT: {}", std::io::Error::last_os_error());
}

/// The kernel's `TCP_INFO` of a socket: its state, retransmissions, … (nix
/// has no option for it).
pub fn tcp_info(fd: &impl std::os::fd::AsRawFd) -> libc::tcp_info {
    // SAFETY: a plain C struct, filled in by the kernel up to `len`.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket, and `info` has room for `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info
}

pub fn closed_port() -> u16 {
    listen("127.0.0.1").1.port()
}

/// A listener on `ip` with an ephemeral port.
pub fn listen(ip: &str) -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Connects to `listener`, accepts, holds the connection for `hold`, then the client
/// closes first and the server after it. Returns (client local addr, server peer addr).
pub fn connect_hold_close(listener: &TcpListener, hold: Duration) -> (SocketAddr, Duration) {
    let started = Instant::now();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let client_addr = client.local_addr().unwrap();
    thread::sleep(hold);
    drop(client);
    // Wait for the FIN to arrive so the server side goes ESTABLISHED → CLOSE_WAIT
    // before it closes.
    let mut buf = [0u8; 1];
    use std::io::Read as _;
    assert_eq!((&server).read(&mut buf).unwrap(), 0);
    drop(server);
    (client_addr, started.elapsed())
}
