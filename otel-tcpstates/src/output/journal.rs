//! `-Y`: each state change as a systemd journal record, one datagram each in
//! journald's native protocol (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>), with
//! bcc tcpstates' field names so journalctl filters written for it keep working.
use std::{
    fmt,
    io::{self, Write as _},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};

use crate::{
    kernel::event::{Family, TcpEvent},
    sessions::outcome::{CloseFacts, ErrorType},
};

/// Where journald takes native-protocol datagrams.
pub const SOCKET: &str = "/run/systemd/journal/socket";
/// Replaces [`SOCKET`]: for tests, and for a journald listening elsewhere.
pub const SOCKET_ENV: &str = "OTEL_TCPSTATES_JOURNAL_SOCKET";

const IDENTIFIER: &str = "otel-tcpstates";
/// Notice, as bcc logs them.
const PRIORITY: u8 = 5;

/// journald's socket: [`SOCKET`] unless [`SOCKET_ENV`] names another.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(SOCKET), PathBuf::from)
}

/// Sends one journal record per event, never waiting for journald.
pub struct JournalWriter {
    socket: UnixDatagram,
    path: PathBuf,
    /// Reused for every record.
    record: Vec<u8>,
    /// Records that could not be sent, in total and when last reported.
    unsent: u64,
    reported: u64,
    last_error: Option<io::Error>,
}

impl JournalWriter {
    /// Fails, saying what to do, when nothing takes datagrams at `path`: a missing
    /// journal is found at start, not one lost record at a time.
    pub fn open(path: PathBuf) -> Result<Self> {
        let probe = UnixDatagram::unbound().context("creating a socket for the journal")?;
        if let Err(err) = probe.connect(&path) {
            return Err(anyhow!(
                "cannot log to the journal (-Y): {}: {err}; start systemd-journald, or run without -Y",
                path.display()
            ));
        }
        // Unconnected, as sd_journal_send does, so a restarted journald is found
        // again at the same path; non-blocking, so a journald that cannot keep up
        // costs records (counted), never the event loop's time.
        let socket = UnixDatagram::unbound().context("creating a socket for the journal")?;
        socket
            .set_nonblocking(true)
            .context("making the journal socket non-blocking")?;
        Ok(Self {
            socket,
            path,
            record: Vec::with_capacity(1024),
            unsent: 0,
            reported: 0,
            last_error: None,
        })
    }

    pub fn event(&mut self, event: &TcpEvent) {
        self.record.clear();
        encode(event, &mut self.record);
        if let Err(err) = self.socket.send_to(&self.record, &self.path) {
            self.unsent += 1;
            self.last_error = Some(err);
        }
    }

    /// Records not sent since the start.
    pub fn unsent(&self) -> u64 {
        self.unsent
    }

    /// Records not sent since the last call, if any: for a periodic warning.
    pub fn take_unsent(&mut self) -> Option<Unsent<'_>> {
        let count = self.unsent - self.reported;
        self.reported = self.unsent;
        self.unsent_report(count, false)
    }

    /// Records not sent since the start, if any: for the summary at exit.
    pub fn unsent_in_total(&self) -> Option<Unsent<'_>> {
        self.unsent_report(self.unsent, true)
    }

    fn unsent_report(&self, count: u64, in_total: bool) -> Option<Unsent<'_>> {
        let error = self.last_error.as_ref()?;
        (count > 0).then_some(Unsent {
            count,
            in_total,
            path: &self.path,
            error,
        })
    }
}

/// Records journald did not take, and why the last one failed.
pub struct Unsent<'a> {
    count: u64,
    in_total: bool,
    path: &'a Path,
    error: &'a io::Error,
}

impl fmt::Display for Unsent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = if self.in_total { " in total" } else { "" };
        write!(
            f,
            "{} state changes not logged to the journal{total}: ",
            self.count
        )?;
        if self.error.kind() == io::ErrorKind::WouldBlock {
            f.write_str("journald's queue was full; log fewer with -L, -D, -p, -4 or -6")
        } else {
            write!(
                f,
                "sending to {}: {}; is systemd-journald running?",
                self.path.display(),
                self.error
            )
        }
    }
}

/// Appends the journal record for `event`.
pub fn encode(event: &TcpEvent, out: &mut Vec<u8>) {
    let e = event;
    // As text output and bcc print it: not necessarily UTF-8, made so.
    let comm = e.comm.to_string();
    // As text output: the socket's family, the addresses as the kernel gave them.
    let (local, remote) = e.kernel_addrs();
    let (source, destination) = if e.family == Family::V4 {
        (
            "OBJECT_IPV4_SOURCE_ADDRESS",
            "OBJECT_IPV4_DESTINATION_ADDRESS",
        )
    } else {
        (
            "OBJECT_IPV6_SOURCE_ADDRESS",
            "OBJECT_IPV6_DESTINATION_ADDRESS",
        )
    };
    field(
        out,
        "MESSAGE",
        format_args!(
            "{comm} {} {} → {} {} {} → {}",
            local, e.local_port, remote, e.remote_port, e.oldstate, e.newstate
        ),
    );
    field(out, "PRIORITY", PRIORITY);
    field(out, "SYSLOG_IDENTIFIER", IDENTIFIER);
    field(out, "OBJECT_PID", e.pid);
    field(out, "OBJECT_COMM", &comm);
    field(out, source, local);
    field(out, "OBJECT_TCP_SOURCE_PORT", e.local_port);
    field(out, destination, remote);
    field(out, "OBJECT_TCP_DESTINATION_PORT", e.remote_port);
    field(out, "OBJECT_TCP_OLD_STATE", e.oldstate);
    field(out, "OBJECT_TCP_NEW_STATE", e.newstate);
    // bcc's: whole microseconds in the old state.
    field(out, "OBJECT_TCP_SPAN_TIME", e.delta_ns / 1000);
    // Ours: the MS column, exactly as printed.
    field(
        out,
        "TCP_SPAN_MS",
        format_args!("{:.3}", e.delta_ns as f64 / 1e6),
    );
    field(out, "TCP_SKADDR", format_args!("{:x}", e.skaddr));
    field(out, "TCP_IP_VERSION", e.family.version());
    if e.owner_pid != 0 {
        field(out, "TCP_OWNER_PID", e.owner_pid);
    }
    if e.newstate.0 == otel_tcpstates_common::tcp_state::CLOSE {
        // Why it failed, from the CLOSE alone: the error the kernel set and the
        // state it left (an RST sent after this record cannot count).
        let close = CloseFacts {
            from: Some(e.oldstate),
            sk_err: e.facts.sk_err as i32,
            ..CloseFacts::default()
        };
        if let Some(error) = ErrorType::of(close) {
            field(out, "TCP_ERROR_TYPE", error.as_str());
        }
        if e.facts.sk_err != 0 {
            field(out, "TCP_ERRNO", e.facts.sk_err);
        }
    }
}

/// Appends `NAME=value\n`, or the binary-safe `NAME\n<u64 LE length>value\n` when
/// the value holds a newline (a comm may).
fn field(out: &mut Vec<u8>, name: &str, value: impl fmt::Display) {
    out.extend_from_slice(name.as_bytes());
    let separator = out.len();
    out.push(b'=');
    // Writing to a Vec cannot fail, and these values' Display impls do not.
    let _ = write!(out, "{value}");
    let start = separator + 1;
    if out[start..].contains(&b'\n') {
        let len = (out.len() - start) as u64;
        out[separator] = b'\n';
        out.splice(start..start, len.to_le_bytes());
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use otel_tcpstates_common::{AF_INET6, TASK_COMM_LEN};

    use super::*;
    use crate::kernel::event::{
        decode,
        tests::{raw_v4, record},
    };

    fn encoded(name: &str, value: &str) -> Vec<u8> {
        let mut out = Vec::new();
        field(&mut out, name, value);
        out
    }

    /// A record's fields, read back from the native protocol.
    fn fields(mut bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut fields = Vec::new();
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n').unwrap();
            let line = &bytes[..end];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                let name = String::from_utf8(line[..eq].to_vec()).unwrap();
                fields.push((name, line[eq + 1..].to_vec()));
                bytes = &bytes[end + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let rest = &bytes[end + 1..];
                let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
                assert_eq!(rest[8 + len], b'\n');
                fields.push((name, rest[8..8 + len].to_vec()));
                bytes = &rest[8 + len + 1..];
            }
        }
        fields
    }

    fn text_fields(event: &TcpEvent) -> Vec<(String, String)> {
        let mut out = Vec::new();
        encode(event, &mut out);
        fields(&out)
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8(value).unwrap()))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|&(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn plain_values_are_text_fields() {
        assert_eq!(encoded("PRIORITY", "5"), b"PRIORITY=5\n");
        assert_eq!(encoded("OBJECT_COMM", ""), b"OBJECT_COMM=\n");
        // Only a newline needs the binary form; '=' in a value does not.
        assert_eq!(
            encoded("MESSAGE", "a=b → c"),
            "MESSAGE=a=b → c\n".as_bytes()
        );
    }

    #[test]
    fn values_with_newlines_are_binary_safe() {
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&4u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n\n");
        assert_eq!(encoded("MESSAGE", "a\nb\n"), want);
        assert_eq!(fields(&want), [("MESSAGE".to_owned(), b"a\nb\n".to_vec())]);
    }

    #[test]
    fn ipv4_record_has_bcc_fields_and_ours() {
        assert_eq!(
            text_fields(&decode(&record(&raw_v4())).unwrap()),
            pairs(&[
                (
                    "MESSAGE",
                    "curl 10.0.0.1 52000 → 93.184.216.34 80 SYN_SENT → ESTABLISHED"
                ),
                ("PRIORITY", "5"),
                ("SYSLOG_IDENTIFIER", "otel-tcpstates"),
                ("OBJECT_PID", "22384"),
                ("OBJECT_COMM", "curl"),
                ("OBJECT_IPV4_SOURCE_ADDRESS", "10.0.0.1"),
                ("OBJECT_TCP_SOURCE_PORT", "52000"),
                ("OBJECT_IPV4_DESTINATION_ADDRESS", "93.184.216.34"),
                ("OBJECT_TCP_DESTINATION_PORT", "80"),
                ("OBJECT_TCP_OLD_STATE", "SYN_SENT"),
                ("OBJECT_TCP_NEW_STATE", "ESTABLISHED"),
                ("OBJECT_TCP_SPAN_TIME", "1234"),
                ("TCP_SPAN_MS", "1.235"),
                ("TCP_SKADDR", "ffff9fd7e8192000"),
                ("TCP_IP_VERSION", "4"),
                ("TCP_OWNER_PID", "22384"),
            ])
        );
    }

    #[test]
    fn ipv6_record_names_ipv6_addresses_and_omits_an_unknown_owner() {
        let mut raw = raw_v4();
        raw.family = AF_INET6;
        raw.saddr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        raw.daddr = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        raw.owner_pid = 0;
        let fields = text_fields(&decode(&record(&raw)).unwrap());
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"OBJECT_IPV6_SOURCE_ADDRESS"), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("IPV4")), "{names:?}");
        assert!(!names.contains(&"TCP_OWNER_PID"), "{names:?}");
        let get = |name: &str| &fields.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(get("OBJECT_IPV6_DESTINATION_ADDRESS"), "2001:db8::7");
        assert_eq!(get("TCP_IP_VERSION"), "6");
        assert_eq!(
            get("MESSAGE"),
            "curl ::1 52000 → 2001:db8::7 80 SYN_SENT → ESTABLISHED"
        );
    }

    #[test]
    fn a_close_record_says_why_the_connection_failed() {
        let mut raw = raw_v4();
        raw.newstate = otel_tcpstates_common::tcp_state::CLOSE;
        raw.facts.sk_err = 111;
        let fields = text_fields(&decode(&record(&raw)).unwrap());
        let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|f| f.1.clone());
        assert_eq!(get("TCP_ERROR_TYPE").as_deref(), Some("connection_refused"));
        assert_eq!(get("TCP_ERRNO").as_deref(), Some("111"));
        raw.oldstate = otel_tcpstates_common::tcp_state::LAST_ACK;
        raw.facts.sk_err = 0;
        let fields = text_fields(&decode(&record(&raw)).unwrap());
        assert!(!fields.iter().any(|(n, _)| n.starts_with("TCP_ERR")));
    }

    #[test]
    fn a_comm_with_a_newline_makes_binary_fields_and_the_rest_stays_text() {
        let mut raw = raw_v4();
        raw.comm = [0; TASK_COMM_LEN];
        raw.comm[..4].copy_from_slice(b"a\nb\xff");
        let mut out = Vec::new();
        encode(&decode(&record(&raw)).unwrap(), &mut out);
        assert!(out.starts_with(b"MESSAGE\n"));
        assert!(
            out.windows(b"\nPRIORITY=5\n".len())
                .any(|w| w == b"\nPRIORITY=5\n")
        );
        let fields = fields(&out);
        let get = |name: &str| &fields.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(get("OBJECT_COMM"), "a\nb\u{fffd}".as_bytes());
        assert!(get("MESSAGE").starts_with("a\nb\u{fffd} 10.0.0.1 ".as_bytes()));
        assert_eq!(get("OBJECT_TCP_NEW_STATE"), b"ESTABLISHED");
    }

    #[test]
    fn field_names_are_valid_journal_names() {
        let mut out = Vec::new();
        encode(&decode(&record(&raw_v4())).unwrap(), &mut out);
        for (name, _) in fields(&out) {
            assert!(
                !name.starts_with('_')
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
    }

    fn temp_socket(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "otel-tcpstates-unit-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn nothing_listening_is_one_line_saying_what_to_do() {
        let path = temp_socket("missing");
        let err = JournalWriter::open(path.clone()).err().unwrap().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("start systemd-journald"), "{err}");
    }

    #[test]
    fn records_the_journal_cannot_take_are_counted_not_waited_for() {
        const SENT: usize = 2000;
        let path = temp_socket("full");
        let journal = UnixDatagram::bind(&path).unwrap();
        let mut writer = JournalWriter::open(path.clone()).unwrap();
        let event = decode(&record(&raw_v4())).unwrap();
        assert!(writer.take_unsent().is_none());
        // Nobody reads: the socket's queue fills, and the rest are counted.
        for _ in 0..SENT {
            writer.event(&event);
        }
        journal.set_nonblocking(true).unwrap();
        let mut received = 0;
        let mut buf = vec![0; 4096];
        while let Ok(len) = journal.recv(&mut buf) {
            assert_eq!(&buf[..len], &writer.record[..]);
            received += 1;
        }
        let unsent = writer.take_unsent().unwrap();
        assert!(received > 0 && unsent.count > 0, "{received} received");
        assert_eq!(received + unsent.count as usize, SENT);
        assert!(unsent.to_string().contains("queue was full"), "{unsent}");
        assert!(writer.take_unsent().is_none());

        // A journald gone away: still counted, said differently.
        drop(journal);
        std::fs::remove_file(&path).unwrap();
        writer.event(&event);
        let unsent = writer.take_unsent().unwrap().to_string();
        assert!(unsent.starts_with("1 state changes"), "{unsent}");
        assert!(unsent.contains("systemd-journald"), "{unsent}");
        let total = writer.unsent_in_total().unwrap().to_string();
        assert!(
            total.starts_with(&format!(
                "{} state changes not logged to the journal in total",
                SENT - received + 1
            )),
            "{total}"
        );
    }
}
