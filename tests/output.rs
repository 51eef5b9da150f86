//! The text formats, checked line by line on live output, and lost-event accounting.
mod support;

use std::time::Duration;

use chrono::{Local, Timelike as _};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::{load, *};

/// bcc tcpstates' row, rendered from a CSV row (our own rendering of its printf formats).
fn plain(r: &Row) -> String {
    format!(
        "{:<16} {:<5} {:<10.10} {:<15} {:<5} {:<15} {:<5} {:<11} -> {:<11} {:.3}",
        r.skaddr, r.pid, r.comm, r.laddr, r.lport, r.raddr, r.rport, r.old, r.new, r.ms
    )
}

fn wide(r: &Row) -> String {
    format!(
        "{:<16} {:<5} {:<16.16} {:<2} {:<26} {:<5} {:<26} {:<5} {:<11} -> {:<11} {:.3}",
        r.skaddr, r.pid, r.comm, r.ip, r.laddr, r.lport, r.raddr, r.rport, r.old, r.new, r.ms
    )
}

fn csv(r: &Row) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{:.3}",
        r.skaddr, r.pid, r.comm, r.ip, r.laddr, r.lport, r.raddr, r.rport, r.old, r.new, r.ms
    )
}

const PLAIN_HEADER: &str = "SKADDR           C-PID C-COMM     LADDR           LPORT RADDR           RPORT OLDSTATE    -> NEWSTATE    MS";

/// The lines of `lines` that belong to the socket whose first row is `first`:
/// from that line on, those that mention the same kernel address, up to its CLOSE.
fn lines_of_socket(lines: &[String], first: &str, skaddr: &str, count: usize) -> Vec<String> {
    let start = lines
        .iter()
        .position(|l| l.ends_with(first))
        .unwrap_or_else(|| panic!("no line ending with {first:?} in\n{}", lines.join("\n")));
    lines[start..]
        .iter()
        .filter(|l| l.contains(skaddr))
        .take(count)
        .cloned()
        .collect()
}

/// Compares rendered rows with printed ones: text exact, except the MS column: each
/// tracer's program reads the clock itself, one after the other on the same
/// tracepoint, so their readings differ by what the others took (µs, more under
/// load).
fn assert_rows_match(got: &[String], want: &[String]) {
    assert_eq!(got.len(), want.len(), "got {got:#?}\nwant {want:#?}");
    for (g, w) in got.iter().zip(want) {
        let split = |line: &str| {
            let at = line.rfind([' ', ',']).unwrap() + 1;
            (line[..at].to_owned(), line[at..].parse::<f64>().unwrap())
        };
        let ((g_text, g_ms), (w_text, w_ms)) = (split(g), split(w));
        assert_eq!(g_text, w_text);
        assert!((g_ms - w_ms).abs() <= 0.1, "{g} vs {w}");
        assert_eq!(g.rsplit('.').next().map(str::len), Some(3), "{g}");
    }
}

fn seconds_of_day(hms: &str) -> u32 {
    let parts: Vec<u32> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 3, "{hms:?} is not HH:MM:SS");
    parts[0] * 3600 + parts[1] * 60 + parts[2]
}

#[test]
fn every_format_prints_the_same_transitions() {
    if !root_or_skip("every_format_prints_the_same_transitions") {
        return;
    }
    let modes: [&[&str]; 6] = [&["-s", "-t"], &[], &["-w"], &["-s"], &["-T"], &["-t"]];
    let tracers: Vec<Tracer> = modes.iter().map(|args| Tracer::start(args)).collect();
    let day_start = Local::now().num_seconds_from_midnight();
    let (listener, server) = listen("127.0.0.1");
    let (client, _) = connect_hold_close(&listener, Duration::from_millis(5));
    let day_end = Local::now().num_seconds_from_midnight();
    let outputs: Vec<Vec<String>> = tracers.into_iter().map(|t| t.stop().lines).collect();

    let truth = rows(&outputs[0], true);
    let sock = socket_rows(&truth, |r| {
        r.lport == client.port() && r.rport == server.port()
    });
    assert_eq!(sock.len(), 5, "{sock:#?}");
    let skaddr = &sock[0].skaddr;
    let n = sock.len();

    // plain
    assert_eq!(outputs[1][0], PLAIN_HEADER);
    let expected: Vec<String> = sock.iter().map(plain).collect();
    assert_rows_match(
        &lines_of_socket(&outputs[1], &expected[0], skaddr, n),
        &expected,
    );

    // -w
    assert_eq!(
        outputs[2][0],
        "SKADDR           C-PID C-COMM           IP LADDR                      LPORT RADDR                      RPORT OLDSTATE    -> NEWSTATE    MS"
    );
    let expected: Vec<String> = sock.iter().map(wide).collect();
    assert_rows_match(
        &lines_of_socket(&outputs[2], &expected[0], skaddr, n),
        &expected,
    );

    // -s
    assert_eq!(
        outputs[3][0],
        "SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,OLDSTATE,NEWSTATE,MS"
    );
    let expected: Vec<String> = sock.iter().map(csv).collect();
    assert_rows_match(
        &lines_of_socket(&outputs[3], &expected[0], skaddr, n),
        &expected,
    );

    // -T: an HH:MM:SS column taken while the test ran, then the plain row.
    assert_eq!(outputs[4][0], format!("TIME     {PLAIN_HEADER}"));
    let expected: Vec<String> = sock.iter().map(plain).collect();
    let got = lines_of_socket(&outputs[4], &expected[0], skaddr, n);
    let rest: Vec<String> = got.iter().map(|l| l[9..].to_owned()).collect();
    assert_rows_match(&rest, &expected);
    for line in &got {
        let time = &line[..9];
        let secs = seconds_of_day(time.trim_end());
        assert!(
            (day_start..=day_end).contains(&secs) || day_end < day_start,
            "time {time} outside the test's run"
        );
    }
    assert_eq!(got.len(), n);

    // -t: seconds since the tracer's first event, in a 9-wide column; the gaps between
    // this socket's rows match the reference tracer's.
    assert_eq!(outputs[5][0], format!("TIME(s)   {PLAIN_HEADER}"));
    let got = lines_of_socket(&outputs[5], &expected[0], skaddr, n);
    assert_eq!(got.len(), n);
    let rest: Vec<String> = got.iter().map(|l| l[10..].to_owned()).collect();
    assert_rows_match(&rest, &expected);
    let mut stamps = Vec::new();
    for line in &got {
        let stamp = &line[..10];
        assert!(stamp.ends_with(' '));
        let stamp = stamp.trim_end();
        assert_eq!(stamp.split('.').nth(1).map(str::len), Some(6), "{stamp:?}");
        stamps.push(stamp.parse::<f64>().unwrap());
    }
    for i in 1..n {
        let ours = stamps[i] - stamps[0];
        let reference = sock[i].timestamp.unwrap() - sock[0].timestamp.unwrap();
        assert!((ours - reference).abs() < 100e-6, "{ours} vs {reference}");
    }
}

#[test]
fn lost_events_are_counted_exactly_and_reported() {
    if !root_or_skip("lost_events_are_counted_exactly_and_reported") {
        return;
    }
    const CONNECTIONS: usize = 3000;
    let (listener, server) = listen("127.0.0.1");
    let port = server.port().to_string();
    // A 1 MiB ring buffer holds about 10,900 events; the accepted sockets of 3000
    // connections make 15,000 while the tracer is stopped and cannot drain.
    let tracer = Tracer::start(&["-s", "-L", &port, "--ring-buffer-mib", "1"]);
    let pid = Pid::from_raw(tracer.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    for _ in 0..CONNECTIONS {
        connect_hold_close(&listener, Duration::ZERO);
    }
    kill(pid, Signal::SIGCONT).unwrap();
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);

    let printed = rows(&done.lines, false).len();
    let (lost_line, lost) = load::lost_in_total(&done.stderr);
    let lost = lost as usize;
    assert!(lost > 0 && printed > 0, "printed {printed}, lost {lost}");
    assert_eq!(
        printed + lost,
        CONNECTIONS * 5,
        "printed {printed}, lost {lost}"
    );
    assert!(lost_line.contains("--ring-buffer-mib"), "{lost_line}");
}
