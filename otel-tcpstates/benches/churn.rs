//! Loopback connection churn, untraced and under each tracer (and under a program
//! that only counts: the floor of any tracer's kernel cost), plus a memory run of
//! the daemon over a million sockets; and the cost of span links (the daemon's packet
//! programs), links off vs on under the churn, a bulk transfer and wrk against nginx
//! (`links.rs`). See BENCHMARKS.md; `scripts/bench.sh` runs it.
//!
//! Needs root: it loads eBPF (through the tracers), reads `bpftool` statistics and
//! turns `kernel.bpf_stats_enabled` on for the duration (restoring it after).

#[path = "../../tests/support/otlp.rs"]
#[allow(dead_code)]
mod otlp;
// otlp.rs serves TLS through it (not used here).
#[path = "../../tests/support/tls.rs"]
#[allow(dead_code)]
mod tls;

// The links runs (links.rs) and their workloads.
#[path = "churn/bulk.rs"]
mod bulk;
#[path = "churn/links.rs"]
mod links;
#[path = "churn/nginx.rs"]
mod nginx;

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::{
        resource::{Resource, getrlimit, setrlimit},
        signal::{Signal, kill},
        socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, connect, listen, setsockopt,
            socket, sockopt,
        },
        time::TimeVal,
    },
    unistd::Pid,
};

const DAEMON: &str = env!("CARGO_BIN_EXE_otel-tcpstates");
const LIBBPF_TCPSTATES: &str = "/usr/sbin/tcpstates";
/// bpftool's names for the tracers' programs (both are tracepoint programs).
const DAEMON_PROG: &str = "inet_sock_set_state";
const LIBBPF_PROG: &str = "handle_set_state";
const FLOOR_PROG: &str = "count_set_state";
/// The floor program (otel-tcpstates-ebpf/src/floor.rs), built with the daemon's.
static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstates-floor"));

const USAGE: &str = "usage: cargo bench --bench churn -- [--seconds N] [--warmup N]
    [--runs baseline,floor,text,otlp,otlp-http,libbpf,baseline,links-churn,links-bulk,links-wrk,memory]
    [--link-rounds N] [--link-seconds N] [--memory-sockets N] [--hold-connections N] [--no-pin]
  --runs links = links-churn,links-bulk,links-wrk: each the daemon exporting OTLP/gRPC with
  --no-links and with links, --link-rounds pairs (default 3, the order alternating) of
  --link-seconds measured (default 4) after --warmup";

// ---------------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Baseline,
    Floor,
    Text,
    Otlp,
    OtlpHttp,
    Libbpf,
    Memory,
    /// The churn, links off vs on.
    LinksChurn,
    /// One bulk connection, links off vs on.
    LinksBulk,
    /// wrk against nginx, with and without a traceparent header, links off vs on.
    LinksWrk,
}

impl Mode {
    const ALL: [Mode; 10] = [
        Mode::Baseline,
        Mode::Floor,
        Mode::Text,
        Mode::Otlp,
        Mode::OtlpHttp,
        Mode::Libbpf,
        Mode::Memory,
        Mode::LinksChurn,
        Mode::LinksBulk,
        Mode::LinksWrk,
    ];
    /// `--runs links`.
    const LINKS: [Mode; 3] = [Mode::LinksChurn, Mode::LinksBulk, Mode::LinksWrk];
    /// The untraced run comes again after the traced ones, to show drift. The
    /// links runs come after the throughput table, the memory run last.
    const DEFAULT: [Mode; 11] = [
        Mode::Baseline,
        Mode::Floor,
        Mode::Text,
        Mode::Otlp,
        Mode::OtlpHttp,
        Mode::Libbpf,
        Mode::Baseline,
        Mode::LinksChurn,
        Mode::LinksBulk,
        Mode::LinksWrk,
        Mode::Memory,
    ];

    /// One run's name, or `links` for all three links runs.
    fn parse(s: &str) -> Result<Vec<Mode>> {
        if s == "links" {
            return Ok(Mode::LINKS.to_vec());
        }
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .map(|m| vec![m])
            .with_context(|| format!("unknown run {s:?}\n{USAGE}"))
    }

    /// A churn run of one tracer (or none), a row of the throughput table.
    fn is_throughput(self) -> bool {
        !matches!(self, Mode::Memory) && !self.is_links()
    }

    fn is_links(self) -> bool {
        Mode::LINKS.contains(&self)
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Floor => "floor",
            Mode::Text => "text",
            Mode::Otlp => "otlp",
            Mode::OtlpHttp => "otlp-http",
            Mode::Libbpf => "libbpf",
            Mode::Memory => "memory",
            Mode::LinksChurn => "links-churn",
            Mode::LinksBulk => "links-bulk",
            Mode::LinksWrk => "links-wrk",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Baseline => "untraced",
            Mode::Floor => "floor (a program that only counts)",
            Mode::Text => "otel-tcpstates text",
            Mode::Otlp => "otel-tcpstates OTLP/gRPC",
            Mode::OtlpHttp => "otel-tcpstates OTLP/HTTP",
            Mode::Libbpf => "libbpf-tools tcpstates",
            Mode::Memory => "memory",
            Mode::LinksChurn => "links: churn",
            Mode::LinksBulk => "links: bulk",
            Mode::LinksWrk => "links: wrk against nginx",
        }
    }
}

struct Options {
    /// Measured seconds per throughput run.
    seconds: u64,
    /// Seconds of churn before measuring (the tracer's buffers and caches fill).
    warmup: u64,
    runs: Vec<Mode>,
    /// Distinct sockets the memory run churns through (two per connection).
    memory_sockets: u64,
    /// Connections the memory run holds open at once (two sockets each).
    hold_connections: u64,
    /// Pin the churn's client and server threads to CPU 0 (see [`Churn::start`]);
    /// the bulk transfer's too, and nginx and wrk to a core each (see `links.rs`).
    pin: bool,
    /// Links off/on pairs per links run, alternating which comes first.
    link_rounds: u64,
    /// Measured seconds per links run: many short alternating windows average out
    /// this machine's drift better than a few long ones.
    link_seconds: u64,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        seconds: 10,
        warmup: 2,
        runs: Mode::DEFAULT.to_vec(),
        memory_sockets: 1_000_000,
        hold_connections: 32_768,
        pin: true,
        link_rounds: 3,
        link_seconds: 4,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--bench" => {} // cargo bench passes it to every bench binary
            "--seconds" => o.seconds = value()?.parse()?,
            "--warmup" => o.warmup = value()?.parse()?,
            "--memory-sockets" => o.memory_sockets = value()?.parse()?,
            "--hold-connections" => o.hold_connections = value()?.parse()?,
            "--no-pin" => o.pin = false,
            "--link-rounds" => o.link_rounds = value()?.parse()?,
            "--link-seconds" => o.link_seconds = value()?.parse()?,
            "--runs" => {
                o.runs = value()?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<Vec<_>>>()?
                    .concat()
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(o.seconds > 0, "--seconds must be at least 1");
    ensure!(o.link_rounds > 0, "--link-rounds must be at least 1");
    ensure!(o.link_seconds > 0, "--link-seconds must be at least 1");
    Ok(o)
}

// ---------------------------------------------------------------------------------
// The churn generator: one client thread connecting, writing and closing as fast as
// it can, one server thread accepting and reading to EOF.

/// Listener ports the client rotates over, each with its own ~28k ephemeral ports
/// for the client: a port is reused seconds later, never while the server's end
/// of its last connection may still be closing.
const DESTINATIONS: usize = 8;
/// Connections made but not yet accepted, at most: well under the listen backlog,
/// so no SYN is ever dropped (a dropped SYN stalls its connect() for a second).
const MAX_PENDING: u64 = 512;
/// Every how many connections one ends with a reset (SO_LINGER 0) instead of a FIN.
const RESET_EVERY: u64 = 4;
const PAYLOAD: &[u8] = b"churn\n";
/// No connect, accept or read waits longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Accepts from one listener before the server moves to the next.
const ACCEPT_BURST: usize = 64;

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    accepted: AtomicU64,
    /// Connections the client finished: connected, wrote, closed.
    completed: AtomicU64,
    errors: AtomicU64,
    client_done: AtomicBool,
}

struct Churn {
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Churn {
    /// Starts churning; it goes on until [`Churn::stop`] or `limit` connections.
    /// `pin` keeps both threads on CPU 0: the churn gets one core, the tracer the
    /// rest. Spread over two vCPUs, client and server contend for the same socket
    /// locks (paravirtual spinlocks here) and the untraced rate swung between ~45k
    /// and ~95k connections/s from one run to the next; on one core the untraced
    /// runs of one bench agree within a few %.
    fn start(limit: u64, pin: bool) -> Result<Churn> {
        let cpu = pin.then_some(0);
        let listeners = (0..DESTINATIONS)
            .map(|_| churn_listener())
            .collect::<Result<Vec<_>>>()?;
        let addrs = listeners
            .iter()
            .map(|l| match l.local_addr()? {
                SocketAddr::V4(addr) => Ok(addr),
                SocketAddr::V6(addr) => bail!("listener on IPv6 {addr}"),
            })
            .collect::<Result<Vec<_>>>()?;
        let counts = Arc::<Counts>::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        let client = thread::Builder::new()
            .name("churn-client".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                client(&addrs, limit, &s, &c)
            })?;
        let c = Arc::clone(&counts);
        let server = thread::Builder::new()
            .name("churn-server".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                server(&listeners, &c)
            })?;
        Ok(Churn {
            counts,
            stop,
            threads: vec![client, server],
        })
    }

    fn completed(&self) -> u64 {
        self.counts.completed.load(Relaxed)
    }

    /// The client reached its limit.
    fn finished(&self) -> bool {
        self.counts.client_done.load(Relaxed)
    }

    /// Stops both threads; returns (connections completed, failed).
    fn stop(mut self) -> (u64, u64) {
        self.join();
        (self.completed(), self.counts.errors.load(Relaxed))
    }

    fn join(&mut self) {
        self.stop.store(true, Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.join();
    }
}

fn pin_to_cpu(cpu: Option<usize>) {
    let Some(cpu) = cpu else {
        return;
    };
    // SAFETY: cpu_set_t is plain data, CPU_SET stays inside it, and pid 0 is the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn churn_listener() -> Result<TcpListener> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    // std listens with a backlog of 128; ask for the system's maximum.
    listen(&listener, Backlog::MAXALLOWABLE)?;
    // Accepted sockets inherit it, so no read of the server waits long.
    setsockopt(&listener, sockopt::ReceiveTimeout, &timeval(IO_TIMEOUT))?;
    // One server thread serves every listener: poll, then accept what is there.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn timeval(d: Duration) -> TimeVal {
    TimeVal::new(d.as_secs() as _, d.subsec_micros() as _)
}

fn client(addrs: &[SocketAddrV4], limit: u64, stop: &AtomicBool, counts: &Counts) {
    let mut n = 0;
    while n < limit && !stop.load(Relaxed) {
        let pending = counts
            .connected
            .load(Relaxed)
            .saturating_sub(counts.accepted.load(Relaxed));
        if pending >= MAX_PENDING {
            thread::yield_now();
            continue;
        }
        let reset = n % RESET_EVERY == RESET_EVERY - 1;
        let counter = match connection(addrs[n as usize % addrs.len()], reset, counts) {
            Ok(()) => &counts.completed,
            Err(_) => &counts.errors,
        };
        counter.fetch_add(1, Relaxed);
        n += 1;
    }
    counts.client_done.store(true, Relaxed);
}

/// One connection: connect, write a few bytes, close with a FIN (or a RST).
fn connection(addr: SocketAddrV4, reset: bool, counts: &Counts) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A blocking connect() gives up after SO_SNDTIMEO.
    setsockopt(&fd, sockopt::SendTimeout, &timeval(IO_TIMEOUT))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    counts.connected.fetch_add(1, Relaxed);
    let stream = TcpStream::from(fd);
    (&stream).write_all(PAYLOAD)?;
    if reset {
        let abort = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(&stream, sockopt::Linger, &abort)?;
    }
    Ok(()) // dropping the stream closes it
}

fn server(listeners: &[TcpListener], counts: &Counts) {
    let mut client_done_at = None;
    loop {
        let mut accepted = 0;
        for listener in listeners {
            for _ in 0..ACCEPT_BURST {
                let Ok((stream, _)) = listener.accept() else {
                    break;
                };
                counts.accepted.fetch_add(1, Relaxed);
                read_to_end(stream);
                accepted += 1;
            }
        }
        if counts.client_done.load(Relaxed) {
            // Serve what the client connected, but only for so long.
            let since = *client_done_at.get_or_insert_with(Instant::now);
            let all = counts.accepted.load(Relaxed) >= counts.connected.load(Relaxed);
            if all || since.elapsed() > IO_TIMEOUT {
                return;
            }
        }
        if accepted == 0 {
            wait_readable(listeners, Duration::from_millis(10));
        }
    }
}

/// Reads what the client wrote, up to its FIN (or reset), then closes. Bounded by
/// the few bytes sent and the read timeout inherited from the listener.
fn read_to_end(stream: TcpStream) {
    let mut buf = [0; 64];
    for _ in 0..8 {
        match (&stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

fn wait_readable(listeners: &[TcpListener], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout.as_millis() as _) };
}

/// A connection through a fresh listener, so a tracer has transitions to count.
fn probe_connection() -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    drop(client);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Holding many connections open at once. RLIMIT_NOFILE may be capped below what
// 65536 sockets need (and not raisable without CAP_SYS_RESOURCE), so child
// processes (this binary again, with `--hold-child N`) each hold a share.

const FLOOR_CHILD_ARG: &str = "--floor-child";

/// Child side of [`Tracer::floor`]: loads and attaches the floor program, then holds
/// it until SIGINT or SIGTERM.
fn floor_child() -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)?;
    ensure!(
        !FLOOR_OBJECT.is_empty(),
        "built with AYA_BUILD_SKIP: no floor program"
    );
    let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT).context("loading the floor program")?;
    let program: &mut aya::programs::TracePoint = ebpf
        .program_mut(FLOOR_PROG)
        .context("no floor program in the object")?
        .try_into()?;
    program.load()?;
    program.attach("sock", "inet_sock_set_state")?;
    signals.wait()?;
    Ok(())
}

/// User + system CPU seconds of this process's threads named `name`.
fn thread_cpu_seconds(name: &str) -> Result<f64> {
    let mut total = 0.0;
    for task in fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        if fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == name) {
            let tid = task
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let (user, system) = cpu_seconds(&format!("self/task/{tid}"))?;
            total += user + system;
        }
    }
    Ok(total)
}

const HOLD_CHILD_ARG: &str = "--hold-child";
/// A holder that is never released exits by itself after this.
const HOLD_CHILD_LIFETIME: Duration = Duration::from_secs(300);
const HOLD_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Child side: `n` connections to its own listener, both ends held until stdin closes.
fn hold_child(n: usize) -> Result<()> {
    thread::spawn(|| {
        thread::sleep(HOLD_CHILD_LIFETIME);
        std::process::exit(3);
    });
    raise_nofile()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let mut held = Vec::with_capacity(2 * n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr)?);
        held.push(listener.accept()?.0);
    }
    println!("ready");
    io::stdout().flush()?;
    // Hold until the parent closes our stdin (or dies).
    let _ = io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

struct Holders(Vec<(Child, Option<ChildStdin>)>);

impl Holders {
    /// Spawns enough holders for `connections`, waiting until all are held.
    fn start(connections: u64) -> Result<Holders> {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        // Two fds per connection, and a few for the holder itself.
        let per_child = (hard.saturating_sub(64) / 2).clamp(1, 8192);
        let mut holders = Holders(Vec::new());
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut left = connections;
        while left > 0 {
            let n = left.min(per_child);
            let mut child = Command::new(std::env::current_exe()?)
                .args([HOLD_CHILD_ARG, &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .die_with_parent()
                .spawn()
                .context("spawning a connection holder")?;
            let stdout = child.stdout.take().context("holder stdout")?;
            let stdin = child.stdin.take();
            holders.0.push((child, stdin));
            let ready = ready_tx.clone();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = ready.send(line);
            });
            left -= n;
        }
        let deadline = Instant::now() + HOLD_READY_TIMEOUT;
        for _ in 0..holders.0.len() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = ready_rx
                .recv_timeout(wait)
                .context("a connection holder did not get ready in time")?;
            ensure!(line.trim() == "ready", "a connection holder failed");
        }
        Ok(holders)
    }

    /// Closes every held connection: holders exit when their stdin closes.
    fn release(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for (_, stdin) in &mut self.0 {
            stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (child, _) in &mut self.0 {
            wait_or_kill(child, deadline);
        }
        self.0.clear();
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_or_kill(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn raise_nofile() -> Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    /// SIGTERM to the child should this process die: no tracer or holder outlives
    /// a killed benchmark.
    fn die_with_parent(&mut self) -> &mut Self {
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

// ---------------------------------------------------------------------------------
// The kernel's view: BPF program statistics, process CPU and memory.

#[derive(Clone, Copy, Debug, Default)]
struct ProgStats {
    run_time_ns: u64,
    run_cnt: u64,
}

struct Prog {
    id: u64,
    name: String,
    stats: ProgStats,
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("timeout")
        .args(["10", "bpftool", "-j"])
        .args(args)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn prog(v: &serde_json::Value) -> Prog {
    let num = |key| v[key].as_u64().unwrap_or(0);
    Prog {
        id: num("id"),
        name: v["name"].as_str().unwrap_or("").to_owned(),
        // Both are absent until the program has run with statistics on.
        stats: ProgStats {
            run_time_ns: num("run_time_ns"),
            run_cnt: num("run_cnt"),
        },
    }
}

fn tracepoint_progs() -> Result<Vec<Prog>> {
    let all = bpftool_json(&["prog", "show"])?;
    Ok(all
        .as_array()
        .map(|progs| {
            progs
                .iter()
                .filter(|p| p["type"] == "tracepoint")
                .map(prog)
                .collect()
        })
        .unwrap_or_default())
}

fn prog_stats(id: u64) -> Result<ProgStats> {
    Ok(prog(&bpftool_json(&["prog", "show", "id", &id.to_string()])?).stats)
}

/// A sysctl set for as long as the guard lives, then restored.
struct Sysctl {
    path: String,
    old: String,
}

impl Sysctl {
    fn set(name: &str, value: &str) -> Result<Sysctl> {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let old = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(err) = fs::write(&self.path, self.old.trim()) {
            eprintln!("could not restore {}: {err}", self.path);
        }
    }
}

/// User and system CPU seconds of a process ("self" or a pid), all its threads.
fn cpu_seconds(pid: &str) -> Result<(f64, f64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces;
    // utime and stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok((ticks(fields[11])?, ticks(fields[12])?))
}

/// User CPU seconds of the whole machine (all CPUs, nice included).
fn machine_user_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<&str> = cpu.split_whitespace().collect();
    Ok(ticks(fields[1])? + ticks(fields[2])?)
}

fn ticks(field: &str) -> Result<f64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(field.parse::<u64>()? as f64 / per_second as f64)
}

/// A `Vm*` line of /proc/PID/status, in MiB.
fn vm_mib(pid: u32, key: &str) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kib: f64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

// ---------------------------------------------------------------------------------
// The tracers.

const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Our daemon may spend --shutdown-timeout (30 s) flushing; then some slack.
const EXIT_TIMEOUT: Duration = Duration::from_secs(45);

struct Tracer {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
    prog_id: u64,
}

struct Exited {
    /// None: it had to be killed.
    status: Option<ExitStatus>,
    took: Duration,
    stderr: Vec<String>,
}

impl Tracer {
    fn daemon(args: &[String]) -> Result<Tracer> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Tracer::start(DAEMON, &args, DAEMON_PROG)
    }

    fn libbpf() -> Result<Tracer> {
        Tracer::start(LIBBPF_TCPSTATES, &[], LIBBPF_PROG)
    }

    /// This benchmark itself, loading the floor program (see [`floor_child`]).
    fn floor() -> Result<Tracer> {
        let me = std::env::current_exe().context("finding the benchmark's own binary")?;
        let me = me.to_str().context("non-UTF-8 benchmark path")?;
        Tracer::start(me, &[FLOOR_CHILD_ARG], FLOOR_PROG)
    }

    /// Starts `program` with stdout to /dev/null; returns once its BPF program runs.
    fn start(program: &str, args: &[&str], prog_name: &str) -> Result<Tracer> {
        let before: HashSet<u64> = tracepoint_progs()?.iter().map(|p| p.id).collect();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create("/dev/null")?)
            .stderr(Stdio::piped())
            .die_with_parent();
        // Only the flags given here decide where spans go.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().context("tracer stderr")?;
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut tracer = Tracer {
            child,
            stderr,
            stderr_reader: Some(stderr_reader),
            prog_id: 0,
        };
        tracer.prog_id = tracer.wait_attached(prog_name, &before)?;
        Ok(tracer)
    }

    /// The tracer's program once it runs: one of that name that was not there
    /// before, whose run count moves when we connect (statistics are on).
    fn wait_attached(&mut self, name: &str, before: &HashSet<u64>) -> Result<u64> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "tracer exited with {status} before attaching: {:?}",
                    self.stderr.lock().unwrap()
                );
            }
            let progs = tracepoint_progs()?;
            let ours = progs
                .iter()
                .find(|p| p.name == name && !before.contains(&p.id));
            if let Some(prog) = ours
                && prog.stats.run_cnt > 0
            {
                return Ok(prog.id);
            }
            probe_connection()?;
            thread::sleep(Duration::from_millis(50));
        }
        bail!("tracer's program {name} did not run within {ATTACH_TIMEOUT:?}")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error, with what it said, if the tracer has exited.
    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "tracer exited with {status} during the run: {:?}",
                self.stderr_so_far()
            );
        }
        Ok(())
    }

    fn stderr_so_far(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGINT, then waits for the exit, killing it after [`EXIT_TIMEOUT`].
    fn stop(mut self) -> Result<Exited> {
        let started = Instant::now();
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGINT)?;
        let status = wait_or_kill(&mut self.child, started + EXIT_TIMEOUT);
        let took = started.elapsed();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join(); // the pipe is closed: it has exited
        }
        let stderr = std::mem::take(&mut *self.stderr.lock().unwrap());
        Ok(Exited {
            status,
            took,
            stderr,
        })
    }
}

impl Exited {
    /// What went wrong, if anything: warnings, a bad exit, no summary.
    fn problems(&self) -> Vec<String> {
        let mut notes = warnings(&self.stderr);
        match self.status {
            Some(status) if status.success() => {}
            Some(status) => notes.push(format!("tracer exited with {status}")),
            None => notes.push(format!("tracer killed after {EXIT_TIMEOUT:?}")),
        }
        let ours = self.stderr.iter().any(|l| l.contains("exporting traces"));
        if ours && summary(&self.stderr).is_none() {
            notes.push("no exit summary on stderr".into());
        }
        notes
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unsigned integers in a line, in order.
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Events the tracer reported lost on stderr.
fn lost_events(stderr: &[String]) -> u64 {
    // Ours: "N events lost in total (...)" at exit (also "N events lost (...)"
    // while running, which the total includes). libbpf-tools: "lost N events on CPU #C".
    if let Some(total) = stderr.iter().find(|l| l.contains("events lost in total")) {
        return numbers(total).first().copied().unwrap_or(0);
    }
    stderr
        .iter()
        .filter(|l| l.contains("events lost") || l.starts_with("lost "))
        .filter_map(|l| numbers(l).first().copied())
        .sum()
}

/// The tracer's warnings and errors, only the first of each kind and at most a
/// few (a tracer losing events may say so every second).
fn warnings(stderr: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    stderr
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn") || l.contains("error") || l.starts_with("lost ")
        })
        .map(|l| l.trim().to_owned())
        // Kinds differ in their words, not their numbers.
        .filter(|l| seen.insert(l.replace(|c: char| c.is_ascii_digit(), "")))
        .take(3)
        .collect()
}

/// Our daemon's exit summary: "S sockets traced (E evicted, O open at exit),
/// N spans: X exported, F failed, U not sent".
#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    sockets: u64,
    evicted: u64,
    produced: u64,
    exported: u64,
    failed: u64,
    not_sent: u64,
}

fn summary(stderr: &[String]) -> Option<Summary> {
    let line = stderr.iter().find(|l| l.contains("sockets traced"))?;
    let n = numbers(line);
    (n.len() >= 7).then(|| Summary {
        sockets: n[0],
        evicted: n[1],
        produced: n[3],
        exported: n[4],
        failed: n[5],
        not_sent: n[6],
    })
}

// ---------------------------------------------------------------------------------
// Throughput runs.

#[derive(Default)]
struct Row {
    mode: &'static str,
    conns_per_s: f64,
    ratio: Option<f64>,
    ns_per_event: Option<f64>,
    /// ns/event over the floor program's, measured in the same bench.
    floor_ratio: Option<f64>,
    events_per_s: Option<f64>,
    cpu_s_per_m_events: Option<f64>,
    lost: Option<u64>,
    spans: Option<Spans>,
    peak_rss_mib: Option<f64>,
    exit_s: Option<f64>,
    /// Other processes' user CPU during the window, % of one CPU.
    other_cpu_pct: f64,
    notes: Vec<String>,
}

struct Spans {
    produced: u64,
    exported: u64,
    received: u64,
    /// Produced but not exported (failed or never sent).
    dropped: u64,
    /// Received during the measured window, per second.
    per_s: f64,
    sockets: u64,
    evicted: u64,
    /// The daemon's CPU (all threads) in the window per span received in it.
    cpu_us_per_span: Option<f64>,
    /// The receiver's own CPU in the window, % of one CPU.
    receiver_cpu_pct: f64,
}

impl Spans {
    /// The daemon's account (its exit summary) next to the receiver's.
    fn count(exited: &Exited, receiver: &otlp::Receiver, window: Window) -> Option<Spans> {
        let sum = summary(&exited.stderr)?;
        Some(Spans {
            produced: sum.produced,
            exported: sum.exported,
            received: settled_count(receiver, sum.exported),
            dropped: sum.failed + sum.not_sent,
            per_s: window.spans as f64 / window.secs,
            sockets: sum.sockets,
            evicted: sum.evicted,
            cpu_us_per_span: (window.spans > 0)
                .then(|| window.tracer_cpu_s / window.spans as f64 * 1e6),
            receiver_cpu_pct: 100.0 * window.receiver_cpu_s / window.secs,
        })
    }
}

/// The measured window, as far as spans go.
#[derive(Clone, Copy)]
struct Window {
    secs: f64,
    spans: u64,
    tracer_cpu_s: f64,
    receiver_cpu_s: f64,
}

/// What is read at both ends of the measured window.
struct Mark {
    at: Instant,
    completed: u64,
    prog: ProgStats,
    /// The tracer's user + system CPU.
    cpu_s: f64,
    received: u64,
    /// The in-process receiver's thread: user + system CPU.
    receiver_cpu_s: f64,
    /// User CPU of everything but us and the tracer: other work on the machine
    /// (a build, say) that would skew the run.
    other_user_s: f64,
}

fn mark(churn: &Churn, tracer: Option<&Tracer>, receiver: Option<&otlp::Receiver>) -> Result<Mark> {
    let (tracer_user, tracer_system) = match tracer {
        Some(t) => cpu_seconds(&t.pid().to_string())?,
        None => (0.0, 0.0),
    };
    let (own_user, _) = cpu_seconds("self")?;
    Ok(Mark {
        at: Instant::now(),
        completed: churn.completed(),
        prog: tracer
            .map(|t| prog_stats(t.prog_id))
            .transpose()?
            .unwrap_or_default(),
        cpu_s: tracer_user + tracer_system,
        received: receiver.map_or(0, otlp::Receiver::span_count),
        receiver_cpu_s: match receiver {
            Some(_) => thread_cpu_seconds(otlp::RECEIVER_THREAD)?,
            None => 0.0,
        },
        other_user_s: machine_user_seconds()? - own_user - tracer_user,
    })
}

fn throughput_run(mode: Mode, opts: &Options) -> Result<Row> {
    let receiver = matches!(mode, Mode::Otlp | Mode::OtlpHttp).then(otlp::Receiver::start_counting);
    let mut tracer = match (mode, &receiver) {
        (Mode::Baseline, _) => None,
        (Mode::Floor, _) => Some(Tracer::floor()?),
        (Mode::Text, _) => Some(Tracer::daemon(&[])?),
        (Mode::Otlp, Some(rx)) => Some(Tracer::daemon(&otlp_args("grpc", &rx.grpc_endpoint()))?),
        (Mode::OtlpHttp, Some(rx)) => Some(Tracer::daemon(&otlp_args(
            "http/protobuf",
            &rx.http_endpoint(),
        ))?),
        (Mode::Otlp | Mode::OtlpHttp, None) => unreachable!("a receiver is started for OTLP"),
        (Mode::Libbpf, _) => Some(Tracer::libbpf()?),
        (Mode::Memory | Mode::LinksChurn | Mode::LinksBulk | Mode::LinksWrk, _) => {
            bail!("not a throughput run")
        }
    };

    let churn = Churn::start(u64::MAX, opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let start = mark(&churn, tracer.as_ref(), receiver.as_ref())?;
    thread::sleep(Duration::from_secs(opts.seconds));
    if let Some(tracer) = &mut tracer {
        tracer.ensure_running()?;
    }
    let end = mark(&churn, tracer.as_ref(), receiver.as_ref())?;
    let peak_rss_mib = tracer
        .as_ref()
        .map(|t| vm_mib(t.pid(), "VmHWM:"))
        .transpose()?;
    let (_, errors) = churn.stop();

    let secs = end.at.duration_since(start.at).as_secs_f64();
    let conns_per_s = (end.completed - start.completed) as f64 / secs;
    let mut row = Row {
        mode: mode.label(),
        conns_per_s,
        peak_rss_mib,
        // Tick-granular counters can make it slightly negative.
        other_cpu_pct: (100.0 * (end.other_user_s - start.other_user_s) / secs).max(0.0),
        ..Row::default()
    };
    if errors > 0 {
        row.notes.push(format!("{errors} connections failed"));
    }
    let Some(tracer) = tracer else {
        return Ok(row);
    };

    let events = end.prog.run_cnt - start.prog.run_cnt;
    let kernel_ns = end.prog.run_time_ns - start.prog.run_time_ns;
    row.events_per_s = Some(events as f64 / secs);
    row.ns_per_event = (events > 0).then(|| kernel_ns as f64 / events as f64);
    row.cpu_s_per_m_events = (events > 0).then(|| (end.cpu_s - start.cpu_s) / events as f64 * 1e6);

    let exited = tracer.stop()?;
    row.exit_s = Some(exited.took.as_secs_f64());
    row.lost = Some(lost_events(&exited.stderr));
    row.notes.extend(exited.problems());
    if let Some(receiver) = &receiver {
        row.spans = Spans::count(
            &exited,
            receiver,
            Window {
                secs,
                spans: end.received - start.received,
                tracer_cpu_s: end.cpu_s - start.cpu_s,
                receiver_cpu_s: end.receiver_cpu_s - start.receiver_cpu_s,
            },
        );
    }
    Ok(row)
}

fn otlp_args(protocol: &str, endpoint: &str) -> Vec<String> {
    [
        "--otlp-protocol",
        protocol,
        "--otlp-endpoint",
        endpoint,
        "--shutdown-timeout",
        "30",
    ]
    .map(String::from)
    .to_vec()
}

/// The receiver's count once it reaches `expected` or stops moving (the daemon
/// has exited, so anything still coming is already on the wire).
fn settled_count(receiver: &otlp::Receiver, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = receiver.span_count();
    while last < expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        let now = receiver.span_count();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

// ---------------------------------------------------------------------------------
// The memory run.

/// RSS is sampled every this many sockets churned.
const SAMPLE_EVERY_SOCKETS: u64 = 100_000;
/// The churn part stops here even if it has not reached its count.
const MEMORY_CHURN_LIMIT: Duration = Duration::from_secs(240);
/// Time for the daemon to take in what the kernel has queued before a sample.
const SETTLE: Duration = Duration::from_secs(2);

struct Sample {
    phase: String,
    sockets: u64,
    at_s: f64,
    rss_mib: f64,
    /// Events the daemon has reported lost so far (it reports once a second).
    lost: u64,
}

/// The daemon exporting to a counting receiver, with the table full (65536 sockets
/// held open), then through a million sockets of churn; RSS sampled throughout.
fn memory_run(opts: &Options) -> Result<()> {
    let receiver = otlp::Receiver::start_counting();
    let endpoint = receiver.grpc_endpoint();
    let args = [
        &["--max-sockets".to_owned(), "65536".to_owned()][..],
        &otlp_args("grpc", &endpoint),
    ]
    .concat();
    let tracer = Tracer::daemon(&args)?;
    let mut samples = Samples::new(&tracer);
    samples.take("started", 0)?;

    // First the full table, on a fresh daemon: holders open their connections at a
    // pace the exporter keeps up with, so this is the table's cost, not a backlog's.
    let holders = Holders::start(opts.hold_connections)?;
    thread::sleep(SETTLE);
    let held = 2 * opts.hold_connections;
    samples.take(&format!("{held} sockets held open"), held)?;
    let peak_held = vm_mib(tracer.pid(), "VmHWM:")?;
    holders.release();
    thread::sleep(SETTLE);
    samples.take("released", held)?;

    // Then a million distinct sockets, two per connection, as fast as they come.
    let started = Instant::now();
    let churn = Churn::start(opts.memory_sockets.div_ceil(2), opts.pin)?;
    let mut next = SAMPLE_EVERY_SOCKETS;
    while !churn.finished() && started.elapsed() < MEMORY_CHURN_LIMIT {
        let sockets = 2 * churn.completed();
        if sockets >= next {
            samples.take("churn", held + sockets)?;
            next += SAMPLE_EVERY_SOCKETS;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let churn_secs = started.elapsed().as_secs_f64();
    let (completed, errors) = churn.stop();
    let churned = 2 * completed;
    thread::sleep(SETTLE);
    samples.take("churn done", held + churned)?;
    let samples = samples.done();

    let peak = vm_mib(tracer.pid(), "VmHWM:")?;
    let exited = tracer.stop()?;
    println!("\nMemory run: --max-sockets 65536, OTLP/gRPC to the counting receiver");
    println!(
        "held {held} sockets open at once (peak RSS then {peak_held:.1} MiB), then churned \
         {churned} sockets in {churn_secs:.1} s ({:.0} conns/s, {errors} connections failed)",
        completed as f64 / churn_secs
    );
    print_samples(&samples);
    println!(
        "peak RSS (VmHWM) {peak:.1} MiB; events lost {}; exit took {:.1} s",
        lost_events(&exited.stderr),
        exited.took.as_secs_f64()
    );
    let whole_run = Window {
        secs: churn_secs,
        spans: 0,
        tracer_cpu_s: 0.0,
        receiver_cpu_s: 0.0,
    };
    if let Some(s) = Spans::count(&exited, &receiver, whole_run) {
        println!(
            "{} sockets traced, {} evicted; spans: {} produced, {} exported, {} received, \
             {} dropped",
            s.sockets, s.evicted, s.produced, s.exported, s.received, s.dropped
        );
    }
    for note in exited.problems() {
        println!("daemon: {note}");
    }
    Ok(())
}

/// RSS samples of the daemon, with the events it had reported lost by then.
struct Samples<'a> {
    tracer: &'a Tracer,
    started: Instant,
    taken: Vec<Sample>,
}

impl<'a> Samples<'a> {
    fn new(tracer: &'a Tracer) -> Self {
        Samples {
            tracer,
            started: Instant::now(),
            taken: Vec::new(),
        }
    }

    fn take(&mut self, phase: &str, sockets: u64) -> Result<()> {
        self.taken.push(Sample {
            phase: phase.to_owned(),
            sockets,
            at_s: self.started.elapsed().as_secs_f64(),
            rss_mib: vm_mib(self.tracer.pid(), "VmRSS:")?,
            lost: lost_events(&self.tracer.stderr_so_far()),
        });
        Ok(())
    }

    fn done(self) -> Vec<Sample> {
        self.taken
    }
}

fn print_samples(samples: &[Sample]) {
    println!("| phase | sockets so far | t (s) | RSS MiB | events lost so far |");
    println!("|---|---:|---:|---:|---:|");
    for s in samples {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} |",
            s.phase, s.sockets, s.at_s, s.rss_mib, s.lost
        );
    }
}

// ---------------------------------------------------------------------------------
// Output and main.

/// Each run's rate against the mean of the untraced runs: by default one comes
/// first and one last, so drift over the whole bench shows, and is averaged.
fn set_ratios(rows: &mut [Row]) {
    let untraced: Vec<f64> = rows
        .iter()
        .filter(|r| r.mode == Mode::Baseline.label() && r.conns_per_s > 0.0)
        .map(|r| r.conns_per_s)
        .collect();
    if untraced.is_empty() {
        return;
    }
    let mean = untraced.iter().sum::<f64>() / untraced.len() as f64;
    let floor = rows
        .iter()
        .find(|r| r.mode == Mode::Floor.label())
        .and_then(|r| r.ns_per_event);
    for row in rows {
        row.ratio = Some(row.conns_per_s / mean);
        row.floor_ratio = floor
            .zip(row.ns_per_event)
            .map(|(floor, ours)| ours / floor);
    }
}

fn print_table(rows: &[Row]) {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    let num = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    println!(
        "\n| mode | conns/s | ratio | events/s | ns/event (kernel) | × floor | CPU s/M events | lost | spans produced | exported | received | dropped | spans/s | daemon µs/span | receiver CPU % | peak RSS MiB | exit s | other CPU % |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let s = r.spans.as_ref();
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            r.mode,
            r.conns_per_s,
            opt(r.ratio, 2),
            opt(r.events_per_s, 0),
            opt(r.ns_per_event, 0),
            opt(r.floor_ratio, 2),
            opt(r.cpu_s_per_m_events, 2),
            num(r.lost),
            num(s.map(|s| s.produced)),
            num(s.map(|s| s.exported)),
            num(s.map(|s| s.received)),
            num(s.map(|s| s.dropped)),
            opt(s.map(|s| s.per_s), 0),
            opt(s.and_then(|s| s.cpu_us_per_span), 2),
            opt(s.map(|s| s.receiver_cpu_pct), 0),
            opt(r.peak_rss_mib, 1),
            opt(r.exit_s, 1),
            r.other_cpu_pct,
        );
    }
    for r in rows.iter().filter(|r| !r.notes.is_empty()) {
        println!("note: {}: {}", r.mode, r.notes.join("; "));
    }
}

fn print_machine() {
    let sh = |cmd: &str| {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    println!("date: {}", sh("date -u"));
    println!("machine: {} cores, kernel {}", sh("nproc"), sh("uname -r"));
    println!(
        "{}; TIME_WAIT off during the runs (net.ipv4.tcp_max_tw_buckets=0)",
        sh("sysctl net.ipv4.ip_local_port_range net.core.somaxconn | tr '\\t\\n' ' ;'")
            .trim_end_matches(';')
    );
}

fn run() -> Result<()> {
    // `cargo test --all-targets` runs bench binaries too, but without the `--bench`
    // that `cargo bench` passes: no minutes of root-only load as a "test".
    if !std::env::args().any(|a| a == "--bench") {
        println!("churn: skipped; run it with `cargo bench --bench churn` or scripts/bench.sh");
        return Ok(());
    }
    let opts = parse_options()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (the tracers load eBPF; bpf_stats_enabled)"
    );
    let started = Instant::now();
    print_machine();
    // Per-program run time and count, for ns/event; restored on the way out.
    let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    // No TIME_WAIT, as under any sustained churn once the table is full (then
    // closing sockets skip it). Otherwise the run's speed depends on how full the
    // table happens to be (~43k vs ~52k connections/s untraced here), and the
    // client's connect() searches ports among its TIME_WAIT sockets. The tracers
    // see the same transitions either way (FIN_WAIT2 -> CLOSE).
    let _time_wait = Sysctl::set("net.ipv4.tcp_max_tw_buckets", "0")?;

    let mut rows = Vec::new();
    for &mode in opts.runs.iter().filter(|m| m.is_throughput()) {
        eprintln!("[churn] {} ...", mode.label());
        match throughput_run(mode, &opts) {
            Ok(row) => {
                eprintln!("[churn] {}: {:.0} conns/s", row.mode, row.conns_per_s);
                rows.push(row);
            }
            Err(err) => {
                eprintln!("[churn] {}: failed: {err:#}", mode.label());
                rows.push(Row {
                    mode: mode.label(),
                    notes: vec![format!("failed: {err:#}")],
                    ..Row::default()
                });
            }
        }
    }
    if !rows.is_empty() {
        let pinned = if opts.pin {
            "both on CPU 0"
        } else {
            "not pinned"
        };
        println!(
            "\nThroughput: {} s measured per run after {} s warm-up; churn client and server {pinned}",
            opts.seconds, opts.warmup
        );
        set_ratios(&mut rows);
        print_table(&rows);
    }
    let links_runs: Vec<Mode> = Mode::LINKS
        .into_iter()
        .filter(|m| opts.runs.contains(m))
        .collect();
    if !links_runs.is_empty() {
        links::run(&links_runs, &opts);
    }
    if opts.runs.contains(&Mode::Memory) {
        eprintln!("[churn] memory run ...");
        memory_run(&opts).context("memory run")?;
    }
    println!("\ntotal runtime {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some(FLOOR_CHILD_ARG) => floor_child(),
        Some(HOLD_CHILD_ARG) => args
            .get(2)
            .context("--hold-child needs a count")
            .and_then(|n| Ok(n.parse()?))
            .and_then(hold_child),
        _ => run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("churn: {err:#}");
            ExitCode::FAILURE
        }
    }
}
