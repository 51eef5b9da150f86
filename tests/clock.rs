//! Times across a real wall-clock step: `clock_settime(CLOCK_REALTIME)` moves the
//! clock forward while two daemons run (tcpstates `-T` lines with spans exported,
//! and tcplife `-T` lines). What happens after the step is printed and exported in
//! the new wall clock; a connection open across the step keeps every child span
//! inside its root. The only test in its binary: nothing else of ours runs while
//! the clock is off, and the step lasts a few seconds.
mod support;

use std::{
    io::Read as _,
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chrono::{DateTime, Local, Timelike as _};
use support::{
    otlp::{FAST, ROOT, ReceivedSpan, Receiver, WAIT, trace_of},
    *,
};

/// How far the test steps the wall clock.
const STEP: Duration = Duration::from_secs(600);
/// The daemon measures the offset again before every drain of the ring, and drains
/// at least every `--poll-ms` (10 in tests) for at most its 20 ms slice; the rest
/// is margin for a loaded machine.
const RESYNC_BOUND: Duration = Duration::from_secs(1);
/// `-T` prints whole seconds.
const COLUMN_RESOLUTION: Duration = Duration::from_secs(1);

fn timespec(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a live timespec.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    ts
}

fn ns(ts: libc::timespec) -> i128 {
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn set_realtime(unix_ns: i128) -> std::io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a pointer to a live timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The wall clock stepped forward; put back when dropped (a failing assertion
/// included) to where it would be had it not been stepped.
struct Stepped {
    real_ns: i128,
    mono_ns: i128,
}

impl Stepped {
    fn forward(by: Duration) -> Stepped {
        let mono_ns = ns(timespec(libc::CLOCK_MONOTONIC));
        let real_ns = ns(timespec(libc::CLOCK_REALTIME));
        set_realtime(real_ns + by.as_nanos() as i128)
            .unwrap_or_else(|e| panic!("clock_settime(CLOCK_REALTIME): {e} (needs CAP_SYS_TIME)"));
        Stepped { real_ns, mono_ns }
    }
}

impl Drop for Stepped {
    fn drop(&mut self) {
        let elapsed = ns(timespec(libc::CLOCK_MONOTONIC)) - self.mono_ns;
        if let Err(e) = set_realtime(self.real_ns + elapsed) {
            eprintln!("COULD NOT PUT THE WALL CLOCK BACK ({e}): it is {STEP:?} ahead");
        }
    }
}

fn unix_ns(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Seconds of the local day, as `-T` prints them.
fn seconds_of_day(at: SystemTime) -> i64 {
    i64::from(DateTime::<Local>::from(at).num_seconds_from_midnight())
}

fn parse_hms(hms: &str) -> i64 {
    let parts: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 3, "{hms:?} is not HH:MM:SS");
    parts[0] * 3600 + parts[1] * 60 + parts[2]
}

/// Whether an `HH:MM:SS` column falls in `[from, to]`, give or take `slack`
/// (across midnight too).
fn column_within(hms: &str, from: SystemTime, to: SystemTime, slack: Duration) -> bool {
    let (at, from, to) = (parse_hms(hms), seconds_of_day(from), seconds_of_day(to));
    let slack = slack.as_secs() as i64;
    let span = (to - from).rem_euclid(86_400);
    let offset = (at - from + slack).rem_euclid(86_400);
    offset <= span + 2 * slack
}

/// Whether a span's times fall in `[from, to]`, give or take `slack`.
fn span_within(span: &ReceivedSpan, from: SystemTime, to: SystemTime, slack: Duration) -> bool {
    let (from, to) = (unix_ns(from - slack), unix_ns(to + slack));
    from <= span.start_ns && span.end_ns <= to
}

/// The CSV rows (`-T -s`) that mention this client port, first column the time.
fn rows_with_port(lines: &[String], port: u16) -> Vec<Vec<String>> {
    let port = port.to_string();
    lines
        .iter()
        .map(|l| l.split(',').map(str::to_owned).collect::<Vec<_>>())
        .filter(|cols| cols.contains(&port))
        .collect()
}

/// Connects, accepts and returns both ends open.
fn open(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// The client closes first, the server once it has read the FIN.
fn close(client: TcpStream, server: TcpStream) {
    drop(client);
    assert_eq!((&server).read(&mut [0u8; 1]).unwrap(), 0);
    drop(server);
}

#[test]
fn times_follow_a_wall_clock_step() {
    if !root_or_skip("times_follow_a_wall_clock_step") {
        return;
    }
    let rx = Receiver::start();
    let endpoint = rx.http_endpoint();
    let traced =
        Tracer::start_with_env(&["--otlp-endpoint", &endpoint, "--print", "-T", "-s"], FAST);
    let life = Tracer::start(&["--life", "-T", "-s"]);
    let (listener, server_addr) = listen("127.0.0.1");
    let sp = server_addr.port();

    // Open across the step.
    let across_born = SystemTime::now();
    let across_mono = Instant::now();
    let (across_client, across_server) = open(&listener);
    let ap = across_client.local_addr().unwrap().port();
    traced.wait_for("the long connection's ESTABLISHED", |lines| {
        rows_with_port(lines, ap).len() >= 2
    });

    let step = Stepped::forward(STEP);
    let stepped_at = SystemTime::now();
    // Give the daemons the time their resync takes (a drain), then connect.
    thread::sleep(RESYNC_BOUND);
    let after_from = SystemTime::now();
    let (client, server) = open(&listener);
    let cp = client.local_addr().unwrap().port();
    close(client, server);
    close(across_client, across_server);
    let across_took = across_mono.elapsed();
    let closed = |port: u16| {
        move |lines: &[String]| {
            rows_with_port(lines, port)
                .iter()
                .filter(|r| r.contains(&"CLOSE".to_owned()))
                .count()
                >= 2
        }
    };
    let text = traced.wait_for("both connections' CLOSE lines", |lines| {
        closed(cp)(lines) && closed(ap)(lines)
    });
    let lived = life.wait_for("both connections' tcplife lines", |lines| {
        rows_with_port(lines, cp).len() >= 2 && rows_with_port(lines, ap).len() >= 2
    });
    let after_to = SystemTime::now();
    // The spans were made as the lines were: the clock can go back now.
    drop(step);
    eprintln!(
        "stepped {STEP:?} at {:?}; rows after it from {:?} to {:?}",
        DateTime::<Local>::from(stepped_at).time(),
        DateTime::<Local>::from(after_from).time(),
        DateTime::<Local>::from(after_to).time()
    );

    // tcpstates -T: every row of the new connection, and the long one's close,
    // in the new wall clock.
    let slack = RESYNC_BOUND + COLUMN_RESOLUTION;
    let mut checked = 0;
    let mut in_new_clock = |tool: &str, row: &[String]| {
        assert!(
            column_within(&row[0], after_from, after_to, slack),
            "{tool} -T row {row:?} is not in the stepped wall clock ({:?} to {:?})",
            DateTime::<Local>::from(after_from).time(),
            DateTime::<Local>::from(after_to).time()
        );
        checked += 1;
    };
    for row in rows_with_port(&text, cp).into_iter().chain(
        rows_with_port(&text, ap)
            .into_iter()
            .filter(|r| r.contains(&"CLOSE".into())),
    ) {
        in_new_clock("tcpstates", &row);
    }
    // tcplife -T: the time a connection closed, both after the step.
    for row in rows_with_port(&lived, cp)
        .into_iter()
        .chain(rows_with_port(&lived, ap))
    {
        in_new_clock("tcplife", &row);
    }
    eprintln!("{checked} -T rows in the stepped wall clock");

    let spans = rx.wait_for(WAIT, |s| {
        [(cp, sp), (sp, cp), (ap, sp), (sp, ap)]
            .iter()
            .all(|&(l, p)| trace_of(s, l, p).is_some())
    });
    let trace = |l: u16, p: u16| {
        trace_of(&spans, l, p).unwrap_or_else(|| panic!("no trace of {l}->{p} in {spans:#?}"))
    };
    // Born after the step: its spans are in the new wall clock.
    for (l, p) in [(cp, sp), (sp, cp)] {
        let (root, children) = trace(l, p);
        for span in std::iter::once(&root).chain(&children) {
            assert!(
                span_within(span, after_from, after_to, RESYNC_BOUND),
                "{} of {l}->{p} at {}..{} ns is not in the stepped wall clock ({}..{})",
                span.name,
                span.start_ns,
                span.end_ns,
                unix_ns(after_from),
                unix_ns(after_to)
            );
        }
    }
    // Open across the step: one offset for the whole session, the one at its
    // birth, so it starts when it did and lasts as long as it did.
    for (l, p) in [(ap, sp), (sp, ap)] {
        let (root, children) = trace(l, p);
        assert_eq!(root.name, ROOT);
        let born = unix_ns(across_born) as i128;
        assert!(
            (i128::from(root.start_ns) - born).abs() < RESYNC_BOUND.as_nanos() as i128,
            "the root of {l}->{p} starts at {} ns, the connection was made at {born} ns",
            root.start_ns
        );
        assert!(
            root.duration_ns() <= across_took.as_nanos() as u64,
            "the root of {l}->{p} lasts {} ns, the connection {across_took:?}",
            root.duration_ns()
        );
        assert!(children.len() >= 2, "{l}->{p}: {children:#?}");
        for child in &children {
            assert!(
                root.start_ns <= child.start_ns && child.end_ns <= root.end_ns,
                "{} of {l}->{p} ({}..{}) is outside its root ({}..{})",
                child.name,
                child.start_ns,
                child.end_ns,
                root.start_ns,
                root.end_ns
            );
        }
    }
    let finished = traced.stop();
    assert!(
        finished
            .stderr
            .iter()
            .any(|l| l.contains("the wall clock was stepped by +600")),
        "no step logged: {:#?}",
        finished.stderr
    );
    drop(life);
}
