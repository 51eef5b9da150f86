//! Load for the fault and soak tests: connection churn whose kernel transitions are
//! known exactly, the daemon's memory, and its own counters as it logs them.

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::sys::socket::{setsockopt, sockopt};

/// Transitions of one churned client socket, which closes with a reset before the
/// server closes: CLOSE -> SYN_SENT, SYN_SENT -> ESTABLISHED, ESTABLISHED -> CLOSE.
pub const CLIENT_TRANSITIONS: u64 = 3;
/// A connect() that fails: CLOSE -> SYN_SENT, SYN_SENT -> CLOSE.
pub const FAILED_TRANSITIONS: u64 = 2;
/// Spans of one churned client socket: SYN_SENT, ESTABLISHED and the root.
pub const CLIENT_SPANS: u64 = 3;

/// Held by tests that load the machine (2 cores): run alongside each other, they
/// would measure each other's load, and the other tests of the binary would see it.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    // A test that failed while holding it says nothing about the next one.
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `done` until it holds; fails the test with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Makes close() send a reset: the socket goes ESTABLISHED -> CLOSE at once and
/// leaves no TIME_WAIT behind, so thousands of connections do not run out of ports.
pub fn abort_on_close(stream: &TcpStream) {
    let abort = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(stream, sockopt::Linger, &abort).unwrap();
}

/// A loopback port that is free and below the ephemeral range, so no connect() can
/// take it as its local port while a receiver that was stopped there is down.
pub fn quiet_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    // Spread over a few thousand ports from one run to the next.
    let base = low.saturating_sub(5000).max(1024);
    let offset = (std::process::id() % 2000) as u16;
    loop {
        let port = base + (offset + NEXT.fetch_add(1, Relaxed)) % 4000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback server for churn: accepts everything and closes each accepted socket
/// only after its client closed (end of stream or reset), so a server never closes
/// first and the clients' transitions stay exactly [`CLIENT_TRANSITIONS`]. Clients
/// may also hold their connections open as long as they like.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // std listens with a backlog of 128; bursts from several clients need more.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXALLOWABLE).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = thread::Builder::new()
            .name("churn-server".into())
            .spawn(move || serve(&listener, &s, &a))
            .unwrap();
        Server {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool, accepted: &AtomicU64) {
    let mut open: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 256];
    while !stop.load(Relaxed) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(open.iter().map(|s| s.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 20) };
        // Closed by their clients: read to the end (or the reset), then close.
        let mut i = 0;
        open.retain(|stream| {
            i += 1;
            if fds[i].revents == 0 {
                return true;
            }
            loop {
                match (&*stream).read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return false,
                }
            }
        });
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true).unwrap();
                    accepted.fetch_add(1, Relaxed);
                    open.push(stream);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of descriptors, say: serve the open ones, then retry.
                Err(_) => break,
            }
        }
    }
}

/// What a churn did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Made {
    /// Connected, then closed with a reset: [`CLIENT_TRANSITIONS`] each.
    pub connections: u64,
    /// connect() failed: [`FAILED_TRANSITIONS`] each.
    pub failed: u64,
    pub took: Duration,
}

impl Made {
    /// The transitions these connections made, exactly, on the clients' side.
    pub fn client_transitions(&self) -> u64 {
        self.connections * CLIENT_TRANSITIONS + self.failed * FAILED_TRANSITIONS
    }

    pub fn per_second(&self) -> f64 {
        self.connections as f64 / self.took.as_secs_f64()
    }
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    failed: AtomicU64,
}

/// Client threads connecting to one server and closing at once with a reset, until
/// stopped or a limit is reached, at full speed or a fixed rate.
pub struct Churn {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Churn {
    /// `threads` clients; `per_second`: the total rate (None: as fast as they can);
    /// `limit`: total connections (None: until stopped).
    pub fn start(
        to: SocketAddr,
        threads: u64,
        per_second: Option<f64>,
        limit: Option<u64>,
    ) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let threads = (0..threads)
            .map(|i| {
                let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
                // Split the limit and the rate among the threads.
                let share = limit.map(|n| n / threads + u64::from(i < n % threads));
                let gap = per_second.map(|r| Duration::from_secs_f64(threads as f64 / r));
                thread::Builder::new()
                    .name(format!("churn-{i}"))
                    .spawn(move || client(to, share, gap, &stop, &counts))
                    .unwrap()
            })
            .collect();
        Churn {
            stop,
            counts,
            threads,
            started,
        }
    }

    /// Makes `n` connections from `threads` clients as fast as they go; returns when
    /// all are closed (within a minute: loopback connections never wait long).
    pub fn run(to: SocketAddr, threads: u64, n: u64) -> Made {
        Churn::start(to, threads, None, Some(n)).finish_within(Duration::from_secs(60))
    }

    /// Connections made so far.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Relaxed)
    }

    /// Stops the clients where they are and says what they did.
    pub fn stop(mut self) -> Made {
        self.join()
    }

    /// Waits for a limited churn to finish, for at most `timeout`.
    pub fn finish_within(mut self, timeout: Duration) -> Made {
        let deadline = Instant::now() + timeout;
        while self.threads.iter().any(|t| !t.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "the churn did not finish within {timeout:?}: {} connections made",
                self.connections()
            );
            thread::sleep(Duration::from_millis(10));
        }
        self.join()
    }

    fn join(&mut self) -> Made {
        self.stop.store(true, Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("a churn client panicked");
        }
        Made {
            connections: self.counts.connections.load(Relaxed),
            failed: self.counts.failed.load(Relaxed),
            took: self.started.elapsed(),
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn client(
    to: SocketAddr,
    limit: Option<u64>,
    gap: Option<Duration>,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Relaxed) && limit.is_none_or(|l| n < l) {
        if let Some(gap) = gap {
            // A fixed schedule, not a fixed pause: a slow connection is made up for.
            let due = started + gap * n as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(stream) => {
                abort_on_close(&stream);
                drop(stream);
                counts.connections.fetch_add(1, Relaxed);
            }
            Err(_) => {
                counts.failed.fetch_add(1, Relaxed);
            }
        }
        n += 1;
    }
}

/// The daemon's resident memory, KiB; None once it has exited (a zombie has none).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `Vm*` line of /proc/PID/status (`key` with its colon), KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's resident memory in the background.
pub struct RssSampler {
    samples: Arc<Mutex<Vec<(Duration, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&samples), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let started = Instant::now();
            while !st.load(Relaxed) {
                let Some(kib) = rss_kib(pid) else { break };
                s.lock().unwrap().push((started.elapsed(), kib));
                thread::sleep(every);
            }
        });
        RssSampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// (time since start, KiB), in order.
    pub fn samples(&self) -> Vec<(Duration, u64)> {
        self.samples.lock().unwrap().clone()
    }

    pub fn peak_kib(&self) -> u64 {
        self.samples()
            .iter()
            .map(|&(_, kib)| kib)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The number just before `label` in `line`: the daemon writes its counters as
/// "N label" (e.g. "12 events seen").
pub fn number_before(line: &str, label: &str) -> u64 {
    let at = line
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"));
    let word = line[..at].split_whitespace().last().unwrap_or("");
    word.trim_start_matches('(')
        .parse()
        .unwrap_or_else(|_| panic!("no number before {label:?} in {line:?}"))
}

/// The exit summary: "N sockets traced (E evicted, R replaced, K open at exit),
/// S spans: X exported, F failed, D dropped (export queue full), C cut off by the
/// shutdown deadline[; U incident records matched no traced socket]".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub sessions: u64,
    pub evicted: u64,
    /// Ended by a new socket at their address before their CLOSE was seen.
    pub replaced: u64,
    pub open_at_exit: u64,
    pub spans: u64,
    pub exported: u64,
    pub failed: u64,
    /// Dropped with the export queue full.
    pub dropped: u64,
    /// Cut off by the shutdown deadline: not made, queued or in flight.
    pub cut_off: u64,
    /// With the incident programs: their records of sockets not traced.
    pub incidents_unmatched: Option<u64>,
}

impl Summary {
    /// Every span handed to the exporter is exported, failed, dropped or cut
    /// off: nothing is lost silently.
    pub fn assert_every_span_accounted(&self) {
        assert_eq!(
            self.exported + self.failed + self.not_sent(),
            self.spans,
            "{self:?}"
        );
    }

    /// Spans never sent, whichever way: dropped or cut off.
    pub fn not_sent(&self) -> u64 {
        self.dropped + self.cut_off
    }

    pub fn parse(stderr: &[String]) -> Summary {
        let line = stderr
            .iter()
            .find(|l| l.contains("sockets traced"))
            .unwrap_or_else(|| panic!("no exit summary in {stderr:#?}"));
        Summary {
            sessions: number_before(line, " sockets traced"),
            evicted: number_before(line, " evicted"),
            replaced: number_before(line, " replaced"),
            open_at_exit: number_before(line, " open at exit"),
            spans: number_before(line, " spans:"),
            exported: number_before(line, " exported"),
            failed: number_before(line, " failed"),
            dropped: number_before(line, " dropped"),
            cut_off: number_before(line, " cut off"),
            incidents_unmatched: line
                .contains(" incident records matched no traced socket")
                .then(|| number_before(line, " incident records matched")),
        }
    }
}

/// One "stats:" line: "stats: N events seen, L lost, K skipped; [links: …;
/// incidents: L lost, K skipped, U unmatched, T resets late;] [listeners: N lost;]
/// sessions: I in flight, S started,
/// E evicted, R replaced; spans: P produced, X exported, F failed, D dropped[, C
/// cut off by the shutdown deadline]; R export errors".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub seen: u64,
    pub lost: u64,
    pub in_flight: u64,
    pub started: u64,
    pub evicted: u64,
    pub replaced: u64,
    /// With the incident programs: their records of sockets not traced.
    pub incidents_unmatched: Option<u64>,
    pub produced: u64,
    pub exported: u64,
    pub failed: u64,
    pub dropped_at_least: u64,
    pub export_errors: u64,
}

impl Stats {
    pub fn parse(line: &str) -> Stats {
        Stats {
            seen: number_before(line, " events seen"),
            lost: number_before(line, " lost"),
            in_flight: number_before(line, " in flight"),
            started: number_before(line, " started"),
            evicted: number_before(line, " evicted"),
            replaced: number_before(line, " replaced"),
            incidents_unmatched: line
                .contains("; incidents: ")
                .then(|| number_before(line, " unmatched")),
            produced: number_before(line, " produced"),
            exported: number_before(line, " exported"),
            failed: number_before(line, " failed"),
            dropped_at_least: number_before(line, " dropped"),
            export_errors: number_before(line, " export errors"),
        }
    }

    /// Every stats line in `stderr`, in order.
    pub fn all(stderr: &[String]) -> Vec<Stats> {
        stderr
            .iter()
            .filter(|l| l.contains("stats:"))
            .map(|l| Stats::parse(l))
            .collect()
    }

    /// The last stats line in `stderr`, if any.
    pub fn last(stderr: &[String]) -> Option<Stats> {
        Stats::all(stderr).pop()
    }

    /// The cumulative counters, named, for comparing one line with the next.
    pub fn cumulative(&self) -> [(&'static str, u64); 11] {
        [
            ("events seen", self.seen),
            ("lost", self.lost),
            ("started", self.started),
            ("evicted", self.evicted),
            ("replaced", self.replaced),
            ("incidents unmatched", self.incidents_unmatched.unwrap_or(0)),
            ("produced", self.produced),
            ("exported", self.exported),
            ("failed", self.failed),
            ("dropped", self.dropped_at_least),
            ("export errors", self.export_errors),
        ]
    }
}

/// The events the daemon reported lost: its running reports ("N events lost (ring
/// buffer full)") add up; the one at exit says "N events lost in total".
pub fn lost_reported(stderr: &[String]) -> u64 {
    stderr
        .iter()
        .filter(|l| l.contains("events lost (ring buffer full)"))
        .map(|l| number_before(l, " events lost"))
        .sum()
}

/// The exit's lost-event line ("N events lost in total (...)") and its N; fails
/// the test if there is none.
pub fn lost_in_total(stderr: &[String]) -> (&str, u64) {
    let line = stderr
        .iter()
        .find(|l| l.contains("events lost in total"))
        .unwrap_or_else(|| panic!("no lost-event report at exit in {stderr:?}"));
    (line, number_before(line, " events lost in total"))
}

/// A collector that accepts connections and never answers: exports to it time out.
/// Its connections are held until the test process exits.
pub fn hanging_collector() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    addr
}

/// A CPU quota on a process, as a container limit would set it: a cgroup of its
/// own with `percent` of one core (cgroup v2 `cpu.max` where the v2 hierarchy has
/// the cpu controller, else the v1 cpu controller's CFS quota). Overload made this
/// way does not depend on the machine's speed: the daemon and the load it traces
/// both slow down with a slower machine, its share of the CPU stays the same.
/// Dropping it moves the process back and removes the cgroup.
pub struct CpuLimit {
    dir: std::path::PathBuf,
    parent_procs: std::path::PathBuf,
    pid: u32,
}

impl CpuLimit {
    pub fn apply(pid: u32, percent: u64) -> CpuLimit {
        // A short period: throttled, the process waits at most this long to run.
        const PERIOD_US: u64 = 100_000;
        // The kernel's smallest quota is 1 ms: 1% of this period.
        let quota = (PERIOD_US * percent / 100).max(1_000);
        let name = format!("otel-tcpstates-test-{pid}");
        let v2 = std::path::Path::new("/sys/fs/cgroup/unified");
        let v2 = if v2.join("cgroup.controllers").exists() {
            v2
        } else {
            std::path::Path::new("/sys/fs/cgroup")
        };
        let v2_cpu = std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        let (root, settings): (&std::path::Path, Vec<(&str, String)>) = if v2_cpu {
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+cpu");
            (v2, vec![("cpu.max", format!("{quota} {PERIOD_US}"))])
        } else {
            (
                std::path::Path::new("/sys/fs/cgroup/cpu"),
                vec![
                    ("cpu.cfs_period_us", PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            )
        };
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "creating {}: {e} (needs a cgroup cpu controller)",
                dir.display()
            )
        });
        for (file, value) in settings {
            std::fs::write(dir.join(file), value)
                .unwrap_or_else(|e| panic!("writing {}/{file}: {e}", dir.display()));
        }
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", dir.display()));
        CpuLimit {
            dir,
            parent_procs: root.join("cgroup.procs"),
            pid,
        }
    }
}

impl CpuLimit {
    /// The CPU time each of the process's threads has had so far, by name: what a
    /// report on an overloaded daemon needs to say whether it ran at all.
    pub fn thread_times(&self) -> Vec<(String, Duration)> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return Vec::new();
        };
        let mut times: Vec<(String, Duration)> = tasks
            .flatten()
            .filter_map(|task| {
                let dir = task.path();
                let name = std::fs::read_to_string(dir.join("comm")).ok()?;
                // schedstat: nanoseconds on a CPU, waiting for one, timeslices.
                let on_cpu = std::fs::read_to_string(dir.join("schedstat")).ok()?;
                let ns = on_cpu.split_whitespace().next()?.parse().ok()?;
                Some((name.trim_end().to_owned(), Duration::from_nanos(ns)))
            })
            .collect();
        times.sort();
        times
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // The process may be gone already; an empty cgroup is what rmdir needs.
        let _ = std::fs::write(&self.parent_procs, self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}
