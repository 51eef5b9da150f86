//! Every way the daemon can lose a record is counted and named: state changes
//! the kernel skipped (a tracepoint program does not run inside another BPF
//! program on its CPU), link records apart from state changes, invalid
//! `traceparent` headers; and the packet programs that nest on a CPU keep their
//! counts exact.
mod support;

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    sys::{
        signal::Signal,
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, connect, getsockopt, setsockopt, socket,
            sockopt,
        },
    },
    unistd::Pid,
};
use support::{load, netfault::Fault, otlp::Receiver, spinner::Spinner, *};

/// The foreign program's clock reads per system call: a few milliseconds, so the CPU is inside it nearly all the time the spinning
/// thread runs, and other system calls of this process are not slowed much.
const SPIN: u32 = 100_000;

/// Connections whose SYNs are dropped: each ends from the retransmission timer.
const CONNECTIONS: usize = 200;
/// Made in this many rounds, 100 ms apart.
const ROUNDS: usize = 10;

/// The last CPU this thread may run on.
fn some_cpu() -> usize {
    let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
    (0..CpuSet::count())
        .rev()
        .find(|&c| set.is_set(c).unwrap())
        .unwrap()
}

fn pin_to(cpu: usize) -> CpuSet {
    let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let mut set = CpuSet::new();
    set.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &set).unwrap();
    before
}

/// A non-blocking connect to 127.0.0.1:`port` that gives up after one SYN
/// retransmission (TCP_SYNCNT 1): it ends 1 + 2 s later, from the timer.
fn doomed_connect(port: u16) -> OwnedFd {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .unwrap();
    set_syn_retries(&fd, 1);
    let _ = connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port));
    fd
}

/// The ids of the BPF programs process `pid` holds, from its fds' fdinfo.
fn program_ids(pid: u32) -> Vec<u64> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap();
    fds.filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with("prog_id:"))?;
            line["prog_id:".len()..].trim().parse().ok()
        })
        .collect()
}

/// The sum of `recursion_misses` of the programs `ids`, as `bpftool prog show`
/// lists them.
fn bpftool_recursion_misses(ids: &[u64]) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .map(|p| p["recursion_misses"].as_u64().unwrap_or(0))
        .sum()
}

/// Keeps `cpu` inside the foreign program: a thread there making cheap system
/// calls, each of which runs it. Stops when dropped.
struct Spinning {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
    _spinner: Spinner,
}

impl Spinning {
    fn start(cpu: usize) -> Spinning {
        let spinner = Spinner::attach(SPIN).expect("loading the foreign BPF program");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            pin_to(cpu);
            let mut calls = 0;
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: getppid has no arguments and cannot fail.
                unsafe { libc::syscall(libc::SYS_getppid) };
                calls += 1;
            }
            calls
        });
        Spinning {
            stop,
            thread: Some(thread),
            _spinner: spinner,
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Spinning {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Another tool's BPF program keeps a CPU busy while TCP timers fire there: the
/// kernel skips the daemon's program for the connections those timers close.
/// The daemon counts the skips as their own loss (the programs'
/// `recursion_misses`, exactly as bpftool shows them), and every state change
/// caused is printed, lost or skipped.
#[test]
fn state_changes_the_kernel_skipped_are_counted() {
    if !root_or_skip("state_changes_the_kernel_skipped_are_counted") {
        return;
    }
    let _serial = load::serial();
    let port = closed_port();
    let tracer = Tracer::start(&["-s", "-D", &port.to_string()]);
    let _dropped = Fault::drop_syns(port);
    let cpu = some_cpu();
    // On one CPU: each connect arms its retransmission timer where it runs.
    let before = pin_to(cpu);
    let spinning = Spinning::start(cpu);
    let started = Instant::now();
    // In rounds: the connects of one round time out together, in one run of the
    // timer softirq, which either interrupts the foreign program or not.
    let mut sockets: Vec<OwnedFd> = Vec::new();
    for _ in 0..ROUNDS {
        sockets.extend((0..CONNECTIONS / ROUNDS).map(|_| doomed_connect(port)));
        thread::sleep(Duration::from_millis(100));
    }
    // TCP gives up after 1 + 2 s; each check is a system call that spins too.
    // Reading SO_ERROR clears it: each socket's failure is remembered.
    let mut failed = vec![false; sockets.len()];
    load::wait_until(
        "every doomed connect to time out",
        Duration::from_secs(60),
        || {
            for (fd, failed) in sockets.iter().zip(&mut failed) {
                *failed = *failed || getsockopt(fd, sockopt::SocketError).is_ok_and(|e| e != 0);
            }
            failed.iter().all(|&f| f)
        },
    );
    let calls = spinning.stop();
    sched_setaffinity(Pid::from_raw(0), &before).unwrap();
    let programs = program_ids(tracer.pid());
    assert!(!programs.is_empty(), "the daemon holds no BPF program");
    let misses = bpftool_recursion_misses(&programs);
    drop(sockets);
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let rows = rows(&done.lines, false);
    let count = |t: (&str, &str)| rows.iter().filter(|r| r.transition() == t).count();
    let (opened, closed) = (count(("CLOSE", "SYN_SENT")), count(("SYN_SENT", "CLOSE")));
    let mut kinds = std::collections::BTreeMap::new();
    for r in &rows {
        *kinds.entry(r.transition()).or_insert(0) += 1;
    }
    eprintln!("transitions: {kinds:?}");
    eprintln!(
        "{CONNECTIONS} connects on CPU {cpu}, timed out after {:.2?}; {calls} spinning system \
         calls; printed {opened} SYN_SENT, {closed} CLOSE; bpftool: {misses} recursion misses; {:?}",
        started.elapsed(),
        done.stderr
    );
    assert!(
        misses > 0,
        "the kernel skipped nothing: the test did not test"
    );
    let summary = done
        .stderr
        .iter()
        .find(|l| l.contains("state changes skipped by the kernel in total"))
        .unwrap_or_else(|| panic!("no skipped count at exit: {:?}", done.stderr));
    let skipped = load::number_before(summary, " state changes skipped by the kernel");
    assert_eq!(skipped, misses, "{summary}");
    // Every state change caused is printed, lost or skipped (others' skipped
    // sockets on this CPU count too, so at least) -- but not exactly: under a
    // second busy process on this CPU, 2 of 400 were seen missing in about one
    // run of ten, neither printed nor in any program's recursion_misses (not
    // explained yet: perhaps perf's own recursion guard in
    // perf_trace_buf_alloc, which drops an event before any BPF program runs
    // and counts it nowhere). Reported, not asserted.
    let lost = done
        .stderr
        .iter()
        .find(|l| l.contains("events lost in total"))
        .map_or(0, |l| load::number_before(l, " events lost in total"));
    let accounted = (opened + closed) as u64 + lost + skipped;
    eprintln!(
        "{opened} + {closed} printed, {lost} lost, {skipped} skipped of {} caused: {} unaccounted",
        2 * CONNECTIONS,
        (2 * CONNECTIONS as u64).saturating_sub(accounted)
    );
    assert_eq!(
        opened, CONNECTIONS,
        "a connect's SYN_SENT is made in process context"
    );
    assert!(closed < CONNECTIONS, "no CLOSE was skipped");
}

/// Sockets in /proc/net/tcp with remote port `port` in state `state` (hex, as
/// the file has it: "04" is FIN_WAIT1).
fn sockets_in_state(port: u16, state: &str) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&remote) && f[3] == state
        })
        .count()
}

/// Of the CSV `lines`: how many sockets to `port` were not seen closing, and
/// the connects to `refusing` that began at one of their addresses.
fn reborn_rows(lines: &[String], port: u16, refusing: u16) -> (usize, Vec<Row>) {
    let rows = rows(lines, false);
    let closed: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|r| r.rport == port && r.new == "CLOSE")
        .map(|r| r.skaddr.as_str())
        .collect();
    let unclosed: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|r| r.rport == port && !closed.contains(r.skaddr.as_str()))
        .map(|r| r.skaddr.as_str())
        .collect();
    let reborn = rows
        .iter()
        .filter(|r| r.rport == refusing && r.transition() == ("CLOSE", "SYN_SENT"))
        .filter(|r| unclosed.contains(r.skaddr.as_str()))
        .cloned()
        .collect();
    (unclosed.len(), reborn)
}

/// A socket whose CLOSE the kernel skipped leaves its entry in the kernel's
/// socket map; a new socket at its address starts afresh (no time in CLOSE, the
/// owner and packet verdicts its own), as any new socket does. The old ones
/// here are closed connections whose unacknowledged data (dropped) makes TCP
/// give up from the retransmission timer (TCP_USER_TIMEOUT) after their owner
/// let them go: their memory is then free for the next sockets on that CPU.
#[test]
fn a_socket_at_a_skipped_sockets_address_starts_afresh() {
    if !root_or_skip("a_socket_at_a_skipped_sockets_address_starts_afresh") {
        return;
    }
    use std::io::Write as _;
    let _serial = load::serial();
    let (listener, server) = listen("127.0.0.1");
    let (port, refusing) = (server.port(), closed_port());
    let tracer = Tracer::start(&["-s", "-D", &format!("{port},{refusing}")]);
    let _dropped = Fault::drop_data(port);
    let cpu = some_cpu();
    let before = pin_to(cpu);
    let spinning = Spinning::start(cpu);
    let mut held = Vec::new();
    for _ in 0..ROUNDS {
        for _ in 0..CONNECTIONS / ROUNDS {
            let mut client = std::net::TcpStream::connect(server).unwrap();
            held.push(listener.accept().unwrap().0);
            setsockopt(&client, sockopt::TcpUserTimeout, &500).unwrap();
            client.write_all(&[b'x'; 200]).unwrap();
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Orphans in FIN_WAIT1 until TCP gives up, each from its timer.
    load::wait_until("the orphans to time out", Duration::from_secs(60), || {
        sockets_in_state(port, "04") == 0
    });
    let calls = spinning.stop();
    let programs = program_ids(tracer.pid());
    let misses = bpftool_recursion_misses(&programs);
    // Kept open, so that each takes the memory of another freed socket; in
    // batches until some got the memory of a socket whose CLOSE was skipped.
    let mut refused: Vec<OwnedFd> = Vec::new();
    let (mut unclosed, mut reborn) = (0, Vec::new());
    for _ in 0..5 {
        refused.extend((0..CONNECTIONS).map(|_| {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )
            .unwrap();
            let to = SockaddrIn::new(127, 0, 0, 1, refusing);
            assert!(connect(fd.as_raw_fd(), &to).is_err());
            fd
        }));
        let lines = tracer.wait_for("the refused connects", |lines| {
            let refused_row = format!(",{refusing},SYN_SENT,CLOSE,");
            lines.iter().filter(|l| l.contains(&refused_row)).count() >= refused.len()
        });
        (unclosed, reborn) = reborn_rows(&lines, port, refusing);
        if !reborn.is_empty() {
            break;
        }
    }
    sched_setaffinity(Pid::from_raw(0), &before).unwrap();
    drop((held, refused));
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let stale: Vec<f64> = reborn
        .iter()
        .map(|r| r.ms)
        .filter(|&ms| ms != 0.0)
        .collect();
    eprintln!(
        "{CONNECTIONS} orphans on CPU {cpu} ({calls} spinning system calls), {misses} \
         recursion misses, {} closes not seen; {} new sockets at their addresses, {} with a \
         time in CLOSE from the old socket: {stale:?}",
        unclosed,
        reborn.len(),
        stale.len()
    );
    assert!(
        !reborn.is_empty(),
        "no new socket at a skipped one's address: nothing tested"
    );
    assert_eq!(
        stale,
        Vec::<f64>::new(),
        "new sockets inherited the old ones' state"
    );
}

/// A valid traceparent (the W3C spec's example).
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An HTTP/1.1 server on loopback that answers every request on a keep-alive
/// connection with an empty 200, until the test process exits.
fn http_server() -> u16 {
    use std::io::{BufRead as _, BufReader, Write as _};
    let (listener, addr) = listen("127.0.0.1");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if writer.write_all(reply).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    addr.port()
}

/// Sends `n` requests, each with `traceparent`, one after another on one
/// keep-alive connection to `port`, each answered before the next; returns the
/// connection, still open.
fn requests(port: u16, n: usize, traceparent: &str) -> std::net::TcpStream {
    use std::io::{BufRead as _, BufReader, Write as _};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let request = format!("GET / HTTP/1.1\r\nhost: x\r\ntraceparent: {traceparent}\r\n\r\n");
    let mut line = String::new();
    for _ in 0..n {
        writer.write_all(request.as_bytes()).unwrap();
        // The reply: its status line, one header, the blank line.
        for _ in 0..3 {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
    }
    writer
}

/// The daemon's final self-metrics: `name` (without the prefix) -> value.
fn final_metric(rx: &Receiver, name: &str) -> i64 {
    rx.metrics()
        .get(&format!("otel_tcpstates.{name}"))
        .unwrap_or_else(|| panic!("no {name} in {:#?}", rx.metrics()))
        .value
}

/// The daemon with `--links`, exporting to `rx`, following only the sockets of
/// local port `port` (the server's end: one link record per request, as it
/// receives it).
fn links_daemon(rx: &Receiver, port: u16, extra: &[&str]) -> Tracer {
    let endpoint = rx.grpc_endpoint();
    let port = port.to_string();
    let mut args = vec![
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "grpc",
        "--links",
        "-L",
        &port,
    ];
    args.extend_from_slice(extra);
    Tracer::start_with_env(
        &args,
        &[
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
}

/// Link records that find the ring buffer full are counted as link records
/// lost, not as state changes: while the daemon is stopped, a 1 MiB ring
/// (about 13,000 link records) meets 20,000 requests. Every request's record is
/// read or counted lost, exactly.
#[test]
fn link_records_lost_are_not_state_changes_lost() {
    if !root_or_skip("link_records_lost_are_not_state_changes_lost") {
        return;
    }
    const REQUESTS: usize = 20_000;
    let _serial = load::serial();
    let rx = Receiver::start();
    let port = http_server();
    let tracer = links_daemon(&rx, port, &["--ring-buffer-mib", "1", "--no-incidents"]);
    let daemon = Pid::from_raw(tracer.pid() as i32);
    nix::sys::signal::kill(daemon, Signal::SIGSTOP).unwrap();
    let connection = requests(port, REQUESTS, TRACEPARENT);
    nix::sys::signal::kill(daemon, Signal::SIGCONT).unwrap();
    // Its closing state changes come once the daemon has read the ring (every
    // record read or counted): none are lost.
    let metric = |name: &str| {
        rx.metrics()
            .get(&format!("otel_tcpstates.{name}"))
            .map_or(0, |m| m.value)
    };
    load::wait_until(
        "the daemon to read the ring",
        Duration::from_secs(60),
        || metric("links.seen") + metric("links.lost") >= REQUESTS as i64,
    );
    drop(connection);
    rx.wait_for(Duration::from_secs(30), |spans| {
        spans.iter().any(|s| s.name == "tcp.session")
    });
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    eprintln!("{REQUESTS} requests; {:?}", done.stderr);
    let (seen, lost) = (
        final_metric(&rx, "links.seen"),
        final_metric(&rx, "links.lost"),
    );
    let events_lost = final_metric(&rx, "events.lost");
    eprintln!("{seen} link records seen, {lost} lost; {events_lost} state changes lost");
    assert!(lost > 0, "the ring never filled: nothing tested");
    assert_eq!(events_lost, 0, "link records counted as state changes");
    assert_eq!(seen + lost, REQUESTS as i64);
    let line = done
        .stderr
        .iter()
        .find(|l| l.contains("link records lost in total"))
        .unwrap_or_else(|| panic!("no link records lost at exit: {:?}", done.stderr));
    assert_eq!(
        load::number_before(line, " link records lost in total"),
        lost as u64,
        "{line}"
    );
    assert!(
        !done.stderr.iter().any(|l| l.contains("events lost")),
        "{:?}",
        done.stderr
    );
}

/// A traceparent value W3C Trace Context rejects (uppercase hex), sent by curl,
/// makes no link and is counted as invalid, one per request, beside the valid
/// ones.
#[test]
fn invalid_traceparents_are_counted() {
    if !root_or_skip("invalid_traceparents_are_counted") {
        return;
    }
    const INVALID: usize = 3;
    let rx = Receiver::start();
    let port = http_server();
    let tracer = links_daemon(&rx, port, &[]);
    // Uppercase hex: W3C allows only lowercase.
    let invalid = TRACEPARENT.to_uppercase();
    let url = format!("http://127.0.0.1:{port}/");
    for _ in 0..INVALID {
        let status = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-H"])
            .arg(format!("traceparent: {invalid}"))
            .arg(&url)
            .status()
            .expect("curl");
        assert!(status.success(), "curl {url}: {status}");
    }
    let status = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-H"])
        .arg(format!("traceparent: {TRACEPARENT}"))
        .arg(&url)
        .status()
        .expect("curl");
    assert!(status.success(), "curl {url}: {status}");
    // Read once the server's sockets close: wait for their roots.
    rx.wait_for(Duration::from_secs(30), |spans| {
        spans.iter().filter(|s| s.name == "tcp.session").count() > INVALID
    });
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    eprintln!("{:?}", done.stderr);
    let (seen, invalid) = (
        final_metric(&rx, "links.seen"),
        final_metric(&rx, "links.invalid"),
    );
    eprintln!("{seen} link records seen, {invalid} invalid");
    assert_eq!((seen, invalid), (INVALID as i64 + 1, INVALID as i64));
    let line = done
        .stderr
        .iter()
        .find(|l| l.contains("traceparent headers were not valid"))
        .unwrap_or_else(|| panic!("no invalid count at exit: {:?}", done.stderr));
    assert_eq!(
        load::number_before(line, " traceparent headers"),
        INVALID as u64
    );
}

/// Both packet programs busy on both CPUs at once: clients send requests (each
/// with a traceparent of its own) while the server's replies and the receive
/// softirqs interleave, so `http_ingress` runs in the middle of `http_egress`
/// on one CPU as often as the kernel makes it. Every request's two link records
/// (the client's sent, the server's received) are read or counted lost,
/// exactly; none is invalid; and every socket's root links to exactly the
/// requests made on that connection: a record scanned in scratch space another
/// program overwrote would carry another connection's value.
#[test]
fn link_records_stay_exact_when_the_packet_programs_nest() {
    if !root_or_skip("link_records_stay_exact_when_the_packet_programs_nest") {
        return;
    }
    use std::collections::{BTreeMap, BTreeSet};
    const THREADS: u64 = 4;
    const CONNECTIONS: u64 = 100;
    // Under the daemon's 64 links per socket: each root holds them all.
    const REQUESTS: u64 = 60;
    let _serial = load::serial();
    let rx = Receiver::start();
    let endpoint = rx.grpc_endpoint();
    let me = std::process::id().to_string();
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--links",
            "--no-incidents",
            "-p",
            &me,
        ],
        &[
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    // Listening once the daemon is attached: the server's sockets are then known
    // as this process's, for -p.
    let port = http_server();
    let started = Instant::now();
    // Each connection's client port -> the span ids its requests carried.
    let sent: BTreeMap<u16, BTreeSet<String>> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                use std::io::{BufRead as _, BufReader, Write as _};
                let mut sent = BTreeMap::new();
                for c in 0..CONNECTIONS {
                    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                    stream.set_nodelay(true).unwrap();
                    let local = stream.local_addr().unwrap().port();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut ids = BTreeSet::new();
                    let mut line = String::new();
                    for r in 0..REQUESTS {
                        let span = format!("{:016x}", (t << 40) | (c << 20) | (r + 1));
                        let request = format!(
                            "GET / HTTP/1.1\r\nhost: x\r\ntraceparent: \
                             00-{:032x}-{span}-01\r\n\r\n",
                            (t << 20) | (c + 1)
                        );
                        writer.write_all(request.as_bytes()).unwrap();
                        for _ in 0..3 {
                            line.clear();
                            reader.read_line(&mut line).unwrap();
                        }
                        ids.insert(span);
                    }
                    sent.insert(local, ids);
                }
                sent
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let made = started.elapsed();
    let total = (THREADS * CONNECTIONS * REQUESTS) as i64;
    let expected_roots = 2 * sent.len();
    let spans = rx.wait_for(Duration::from_secs(120), |spans| {
        spans
            .iter()
            .filter(|s| s.name == "tcp.session" && !s.links.is_empty())
            .count()
            >= expected_roots
    });
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let (seen, lost, invalid) = (
        final_metric(&rx, "links.seen"),
        final_metric(&rx, "links.lost"),
        final_metric(&rx, "links.invalid"),
    );
    eprintln!(
        "{total} requests on {} connections in {made:.2?}: {seen} link records seen, {lost} \
         lost, {invalid} invalid; {:?}",
        sent.len(),
        done.stderr
    );
    assert_eq!(seen + lost, 2 * total, "every request's two records");
    assert_eq!(invalid, 0);
    let mut wrong = Vec::new();
    for (client, ids) in &sent {
        for (local, peer) in [(*client, port), (port, *client)] {
            let (root, _) = support::otlp::trace_of(&spans, local, peer)
                .unwrap_or_else(|| panic!("no root for {local} -> {peer}"));
            let linked: BTreeSet<String> = root.links.iter().map(|l| l.span_id.clone()).collect();
            if &linked != ids && lost == 0 {
                wrong.push((
                    local,
                    peer,
                    linked.difference(ids).count(),
                    ids.difference(&linked).count(),
                ));
            } else if !linked.is_subset(ids) {
                wrong.push((local, peer, linked.difference(ids).count(), 0));
            }
        }
    }
    assert_eq!(
        wrong,
        Vec::new(),
        "(local, peer, links not sent there, sent and not linked)"
    );
}
