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
            AddressFamily, SockFlag, SockType, SockaddrIn, connect, getsockopt, socket, sockopt,
        },
    },
    unistd::Pid,
};
use support::{load, netfault::Fault, spinner::Spinner, *};

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
    // SAFETY: setsockopt with an int value on our own socket.
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
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
/// caused is printed, lost or skipped. New sockets at the addresses of those
/// whose CLOSE was skipped start afresh: no time in a previous state (the
/// kernel's entry of the old socket), as for any new socket.
#[test]
fn state_changes_the_kernel_skipped_are_counted() {
    if !root_or_skip("state_changes_the_kernel_skipped_are_counted") {
        return;
    }
    let _serial = load::serial();
    let (port, refusing) = (closed_port(), closed_port());
    let tracer = Tracer::start(&["-s", "-D", &format!("{port},{refusing}")]);
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
    let programs = program_ids(tracer.pid());
    assert!(!programs.is_empty(), "the daemon holds no BPF program");
    let misses = bpftool_recursion_misses(&programs);
    // Freed on this CPU, their memory is what the next sockets made here get.
    drop(sockets);
    for _ in 0..CONNECTIONS {
        let refused = std::net::TcpStream::connect(("127.0.0.1", refusing));
        assert!(refused.is_err(), "{refused:?}");
    }
    sched_setaffinity(Pid::from_raw(0), &before).unwrap();
    // Every transition of the refused connects is seen: CLOSE -> SYN_SENT ->
    // CLOSE each.
    tracer.wait_for("the refused connects", |lines| {
        let refused = format!(",{refusing},SYN_SENT,CLOSE,");
        lines.iter().filter(|l| l.contains(&refused)).count() >= CONNECTIONS
    });
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let rows = rows(&done.lines, false);
    let (doomed, later): (Vec<&Row>, Vec<&Row>) = rows.iter().partition(|r| r.rport == port);
    let opened = doomed
        .iter()
        .filter(|r| r.transition() == ("CLOSE", "SYN_SENT"))
        .count();
    let closed = doomed
        .iter()
        .filter(|r| r.transition() == ("SYN_SENT", "CLOSE"))
        .count();
    let unclosed: std::collections::HashSet<&str> =
        doomed.iter().map(|r| r.skaddr.as_str()).collect();
    let reborn: Vec<&&Row> = later
        .iter()
        .filter(|r| r.transition() == ("CLOSE", "SYN_SENT") && unclosed.contains(r.skaddr.as_str()))
        .collect();
    let stale: Vec<f64> = reborn
        .iter()
        .map(|r| r.ms)
        .filter(|&ms| ms != 0.0)
        .collect();
    eprintln!(
        "{CONNECTIONS} connects on CPU {cpu}, timed out after {:.2?}; {calls} spinning system calls; \
         printed {opened} SYN_SENT, {closed} CLOSE; bpftool: {misses} recursion misses; \
         {} new sockets at their addresses, {} of them with a time in CLOSE from the old one: {stale:?}; {:?}",
        started.elapsed(),
        reborn.len(),
        stale.len(),
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
    // sockets on this CPU count too, so at least).
    let lost = done
        .stderr
        .iter()
        .find(|l| l.contains("events lost in total"))
        .map_or(0, |l| load::number_before(l, " events lost in total"));
    assert!(
        (opened + closed) as u64 + lost + skipped >= 2 * CONNECTIONS as u64,
        "{opened} + {closed} printed, {lost} lost, {skipped} skipped"
    );
    assert!(closed < CONNECTIONS, "no CLOSE was skipped");
    assert!(
        !reborn.is_empty(),
        "no new socket at an old one's address: nothing tested"
    );
    assert_eq!(
        stale,
        Vec::<f64>::new(),
        "new sockets inherited the old ones' state"
    );
}
