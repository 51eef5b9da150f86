//! `-Y`: journal records over journald's native protocol, received on a socket of
//! our own, decoded here independently of the daemon, and checked against the text
//! rows the same daemon printed for the same transitions.
mod support;

use std::{
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use support::*;

const SOCKET_ENV: &str = "OTEL_TCPSTATES_JOURNAL_SOCKET";

/// One journal record: its fields in the order sent.
#[derive(Debug)]
struct Record(Vec<(String, Vec<u8>)>);

impl Record {
    /// The one value of `name`, if present.
    fn get(&self, name: &str) -> Option<&str> {
        let mut values = self.0.iter().filter(|(n, _)| n == name);
        let value = values.next()?;
        assert!(values.next().is_none(), "{name} twice in {self:#?}");
        Some(std::str::from_utf8(&value.1).unwrap())
    }

    fn field(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no {name} in {self:#?}"))
    }

    fn transition(&self) -> (&str, &str) {
        (
            self.field("OBJECT_TCP_OLD_STATE"),
            self.field("OBJECT_TCP_NEW_STATE"),
        )
    }
}

/// Decodes one datagram of the native protocol: `NAME=value\n` fields and binary-safe
/// `NAME\n<u64 LE length><value>\n` ones.
fn decode(datagram: &[u8]) -> Record {
    let mut fields = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or_else(|| panic!("unterminated field in {datagram:?}"));
        let line = &rest[..end];
        let (name, value, next) = match line.iter().position(|&b| b == b'=') {
            Some(eq) => (&line[..eq], line[eq + 1..].to_vec(), end + 1),
            None => {
                let len = u64::from_le_bytes(rest[end + 1..end + 9].try_into().unwrap()) as usize;
                let value = rest[end + 9..end + 9 + len].to_vec();
                assert_eq!(rest[end + 9 + len], b'\n', "in {datagram:?}");
                (line, value, end + 9 + len + 1)
            }
        };
        let name = String::from_utf8(name.to_vec()).unwrap();
        assert!(
            !name.is_empty()
                && !name.starts_with('_')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "invalid field name {name:?}"
        );
        fields.push((name, value));
        rest = &rest[next..];
    }
    Record(fields)
}

/// A stand-in for journald: a datagram socket at a temporary path.
struct Journal {
    path: PathBuf,
    socket: UnixDatagram,
}

impl Journal {
    fn bind(tag: &str) -> Journal {
        let path = std::env::temp_dir().join(format!(
            "otel-tcpstates-journal-{}-{tag}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        Journal { path, socket }
    }

    fn env(&self) -> (&'static str, &str) {
        (SOCKET_ENV, self.path.to_str().unwrap())
    }

    /// Receives every datagram on a thread of its own, as journald would, so the
    /// socket's short queue never fills.
    fn receive(&self) -> mpsc::Receiver<Vec<u8>> {
        let socket = self.socket.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = vec![0; 64 << 10];
            while let Ok(len) = socket.recv(&mut buf) {
                if tx.send(buf[..len].to_vec()).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// What is queued now, without waiting.
    fn queued(&self) -> Vec<Record> {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = vec![0; 64 << 10];
        let mut records = Vec::new();
        while let Ok(len) = self.socket.recv(&mut buf) {
            records.push(decode(&buf[..len]));
        }
        records
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Adds what arrives to `records` until `done` holds.
fn receive_until(
    rx: &mpsc::Receiver<Vec<u8>>,
    records: &mut Vec<Record>,
    what: &str,
    done: impl Fn(&[Record]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done(records) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(datagram) => records.push(decode(&datagram)),
            Err(_) => panic!("timed out waiting for {what}; records so far: {records:#?}"),
        }
    }
}

const CLIENT: [(&str, &str); 5] = [
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
];

fn to_server(records: &[Record], server: SocketAddr) -> Vec<&Record> {
    let port = server.port().to_string();
    records
        .iter()
        .filter(|r| r.get("OBJECT_TCP_DESTINATION_PORT") == Some(port.as_str()))
        .collect()
}

/// The client socket's records, each against the row printed for it.
fn check_client(
    records: &[Record],
    rows: &[Row],
    client: SocketAddr,
    server: SocketAddr,
    comm: &str,
) {
    let sock = socket_rows(rows, |r| {
        r.lport == client.port() && r.rport == server.port()
    });
    assert_eq!(transitions(&sock), CLIENT, "{sock:#?}");
    let records = to_server(records, server);
    let got: Vec<(&str, &str)> = records.iter().map(|r| r.transition()).collect();
    assert_eq!(got, CLIENT, "{records:#?}");

    let (family, other) = if server.is_ipv4() {
        ("IPV4", "IPV6")
    } else {
        ("IPV6", "IPV4")
    };
    let pid = std::process::id().to_string();
    for (record, row) in records.iter().zip(&sock) {
        let f = |name: &str| record.field(name);
        assert_eq!(f("SYSLOG_IDENTIFIER"), "otel-tcpstates");
        assert_eq!(f("PRIORITY"), "5");
        assert_eq!(f("TCP_SKADDR"), row.skaddr);
        assert_eq!(f("TCP_IP_VERSION"), row.ip.to_string());
        assert_eq!(f("OBJECT_PID"), row.pid.to_string());
        assert_eq!(f("OBJECT_COMM"), row.comm);
        // The client socket is owned by the process that connected it: this one.
        assert_eq!(f("TCP_OWNER_PID"), pid);

        let source = f(&format!("OBJECT_{family}_SOURCE_ADDRESS"));
        let destination = f(&format!("OBJECT_{family}_DESTINATION_ADDRESS"));
        assert_eq!(source, client.ip().to_string());
        assert_eq!(destination, server.ip().to_string());
        assert!(
            !record.0.iter().any(|(n, _)| n.contains(other)),
            "{record:#?}"
        );
        assert_eq!((source, destination), (&*row.laddr, &*row.raddr));
        let (sport, dport) = (
            f("OBJECT_TCP_SOURCE_PORT"),
            f("OBJECT_TCP_DESTINATION_PORT"),
        );
        assert_eq!(sport, row.lport.to_string());
        assert_eq!(dport, server.port().to_string());
        assert_eq!(record.transition(), row.transition());

        // The time in the old state, said three ways: the MS column exactly, and
        // bcc's whole microseconds.
        assert_eq!(f("TCP_SPAN_MS"), format!("{:.3}", row.ms), "{record:#?}");
        let span_us: u64 = f("OBJECT_TCP_SPAN_TIME").parse().unwrap();
        assert!(
            (span_us as f64 / 1e3 - row.ms).abs() <= 0.0015,
            "{span_us} µs vs {} ms",
            row.ms
        );

        assert_eq!(
            f("MESSAGE"),
            format!(
                "{} {source} {sport} → {destination} {dport} {} → {}",
                row.comm, row.old, row.new
            )
        );
    }
    // connect() and close() run in this thread.
    for (record, by_us) in records.iter().zip([true, false, true, false, false]) {
        if by_us {
            assert_eq!(record.field("OBJECT_PID"), pid, "{record:#?}");
            assert_eq!(record.field("OBJECT_COMM"), comm, "{record:#?}");
        }
    }
    assert_eq!(records[0].field("OBJECT_TCP_SOURCE_PORT"), "0");
    assert_eq!(records[0].field("OBJECT_TCP_SPAN_TIME"), "0");
    // A connection held 5 ms spent at least that in ESTABLISHED.
    let established: u64 = records[2].field("OBJECT_TCP_SPAN_TIME").parse().unwrap();
    assert!(established >= 5_000, "{records:#?}");
}

#[test]
fn records_carry_the_fields_of_the_printed_rows() {
    if !root_or_skip("records_carry_the_fields_of_the_printed_rows") {
        return;
    }
    let journal = Journal::bind("fields");
    let rx = journal.receive();
    let (l4, s4) = listen("127.0.0.1");
    let (l6, s6) = listen("::1");
    let ports = format!("{},{}", s4.port(), s6.port());
    let tracer = Tracer::start_with_env(&["-Y", "-s", "-D", &ports], &[journal.env()]);

    let mut records = Vec::new();
    let (c4, _) = connect_hold_close(&l4, Duration::from_millis(5));
    receive_until(&rx, &mut records, "the IPv4 client's records", |r| {
        to_server(r, s4).len() >= CLIENT.len()
    });
    let (c6, _) = connect_hold_close(&l6, Duration::from_millis(5));
    receive_until(&rx, &mut records, "the IPv6 client's records", |r| {
        to_server(r, s6).len() >= CLIENT.len()
    });
    tracer.wait_for("both clients' rows", |lines| {
        rows(lines, false)
            .iter()
            .filter(|r| r.new == "CLOSE")
            .count()
            >= 2
    });
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        !done.stderr.iter().any(|l| l.contains("journal")),
        "{:?}",
        done.stderr
    );

    // Only the two clients' sockets passed the -D filter: one record per row.
    let rows = rows(&done.lines, false);
    while let Ok(datagram) = rx.recv_timeout(Duration::from_millis(100)) {
        records.push(decode(&datagram));
    }
    assert_eq!(records.len(), rows.len(), "{records:#?}\n{rows:#?}");
    let comm = thread_comm();
    check_client(&records, &rows, c4, s4, &comm);
    check_client(&records, &rows, c6, s6, &comm);
}

#[test]
fn records_journald_cannot_take_are_counted_and_never_waited_for() {
    if !root_or_skip("records_journald_cannot_take_are_counted_and_never_waited_for") {
        return;
    }
    // More than any datagram socket queues by default (net.unix.max_dgram_qlen,
    // 10 to 512, and the sender's 208 KiB buffer).
    const CONNECTIONS: usize = 400;
    let events = CONNECTIONS * CLIENT.len();
    // Nobody reads it until the daemon has finished.
    let journal = Journal::bind("full");
    let (listener, server) = listen("127.0.0.1");
    let port = server.port().to_string();
    let tracer = Tracer::start_with_env(&["-Y", "-s", "-D", &port], &[journal.env()]);
    for _ in 0..CONNECTIONS {
        connect_hold_close(&listener, Duration::ZERO);
    }
    // A daemon waiting for the journal would stop printing here.
    tracer.wait_for("every transition printed", |lines| {
        rows(lines, false).len() >= events
    });
    // The warning comes on the next one-second tick.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tracer.stderr().iter().any(|l| l.contains("not logged")) {
        assert!(
            Instant::now() < deadline,
            "no warning: {:?}",
            tracer.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    assert_eq!(rows(&done.lines, false).len(), events);

    let count = |line: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap()
    };
    let (totals, running): (Vec<&String>, Vec<&String>) = done
        .stderr
        .iter()
        .filter(|l| l.contains("not logged to the journal"))
        .partition(|l| l.contains("in total"));
    assert_eq!(totals.len(), 1, "{:?}", done.stderr);
    let unsent = count(totals[0]);
    assert!(totals[0].contains("queue was full"), "{}", totals[0]);
    assert_eq!(running.iter().map(|l| count(l)).sum::<usize>(), unsent);

    let received = journal.queued();
    assert!(
        unsent > 0 && !received.is_empty(),
        "{unsent} unsent, {} received",
        received.len()
    );
    assert_eq!(received.len() + unsent, events);
    // What was queued came first, in order, before the queue filled.
    assert_eq!(received[0].transition(), CLIENT[0]);
}

#[test]
fn a_journal_that_is_not_there_is_one_line_and_exit_1() {
    let dir = std::env::temp_dir();
    let missing = dir.join(format!(
        "otel-tcpstates-journal-{}-missing.sock",
        std::process::id()
    ));
    let not_a_socket = dir.join(format!(
        "otel-tcpstates-journal-{}-file",
        std::process::id()
    ));
    std::fs::write(&not_a_socket, "").unwrap();
    for path in [&missing, &not_a_socket] {
        let out = Command::new(BIN)
            .arg("-Y")
            .env(SOCKET_ENV, path)
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("otel-tcpstates: error: cannot log to the journal (-Y): "),
            "{stderr}"
        );
        assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
        assert!(stderr.contains("start systemd-journald"), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_file(&not_a_socket).unwrap();
}
