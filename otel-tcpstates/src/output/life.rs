//! bcc tcplife's output (`--life`): one line per closed connection with its owner,
//! bytes each way and lifespan.
use std::io::{self, Write};

use super::{Layout, TimeColumns, write_csv_field};
use crate::{
    kernel::clock::WallClock,
    sessions::table::{EndReason, Role, Session, Update},
};

pub struct LifeWriter<W: Write> {
    layout: Layout,
    times: TimeColumns,
    out: W,
}

impl<W: Write> LifeWriter<W> {
    pub fn new(layout: Layout, clock: WallClock, out: W) -> Self {
        Self {
            layout,
            times: TimeColumns::new(layout, clock),
            out,
        }
    }

    /// The wall clock was stepped: the time column follows it from now on.
    pub fn set_clock(&mut self, clock: WallClock) {
        self.times.set_clock(clock);
    }

    pub fn header(&mut self) -> io::Result<()> {
        self.times.header(&mut self.out)?;
        let out = &mut self.out;
        let Layout { wide, csv, .. } = self.layout;
        if csv {
            writeln!(out, "PID,COMM,IP,LADDR,LPORT,RADDR,RPORT,TX_KB,RX_KB,MS")
        } else if wide {
            writeln!(
                out,
                "{:<5} {:<16} {:<2} {:<26} {:<5} {:<26} {:<5} {:>6} {:>6} MS",
                "PID", "COMM", "IP", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB", "RX_KB"
            )
        } else {
            writeln!(
                out,
                "{:<5} {:<10} {:<15} {:<5} {:<15} {:<5} {:>5} {:>5} MS",
                "PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB", "RX_KB"
            )
        }
    }

    /// Writes a line for each connection that closed; everything else is ignored.
    pub fn update(&mut self, update: &Update<'_>) -> io::Result<()> {
        match *update {
            Update::SessionEnded(session, end_ns, EndReason::Closed)
                if session.role != Role::Listener =>
            {
                self.closed(session, end_ns)
            }
            _ => Ok(()),
        }
    }

    fn closed(&mut self, s: &Session, end_ns: u64) -> io::Result<()> {
        self.times.write(&mut self.out, end_ns)?;
        // The owner, as tcplife reports it; failing that, whoever closed it.
        let (pid, comm) = s
            .owner
            .map_or((s.last_pid, s.last_comm), |o| (o.pid, o.comm));
        let facts = s.facts.unwrap_or_default();
        let (tx_kb, rx_kb) = (facts.bytes_acked / 1024, facts.bytes_received / 1024);
        let ms = end_ns.saturating_sub(s.birth_ns) as f64 / 1e6;
        // bcc's columns: the socket's family, its addresses as the kernel gave them.
        let ip = s.family.version();
        let (laddr, raddr) = (
            s.family.as_kernel_gave(s.local_addr),
            s.family.as_kernel_gave(s.remote_addr),
        );
        let Layout { wide, csv, .. } = self.layout;
        let out = &mut self.out;
        if csv {
            write!(out, "{pid},")?;
            write_csv_field(out, &comm.to_string())?;
            writeln!(
                out,
                ",{ip},{},{},{},{},{tx_kb},{rx_kb},{ms:.2}",
                laddr, s.local_port, raddr, s.remote_port
            )
        } else if wide {
            writeln!(
                out,
                "{pid:<5} {comm:<16.16} {ip:<2} {:<26} {:<5} {:<26} {:<5} {tx_kb:>6} {rx_kb:>6} {ms:.2}",
                laddr, s.local_port, raddr, s.remote_port
            )
        } else {
            writeln!(
                out,
                "{pid:<5} {comm:<10.10} {:<15} {:<5} {:<15} {:<5} {tx_kb:>5} {rx_kb:>5} {ms:.2}",
                laddr, s.local_port, raddr, s.remote_port
            )
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use otel_tcpstates_common::tcp_state::*;

    use super::*;
    use crate::{
        kernel::event::{TcpEvent, TcpFacts},
        sessions::table::{
            SessionTable,
            tests::{SK, client_events, ev},
        },
    };

    fn render(layout: Layout, events: &[TcpEvent]) -> Vec<String> {
        let mut table = SessionTable::new(NonZeroUsize::new(16).unwrap());
        let mut writer = LifeWriter::new(layout, WallClock::measure(), Vec::new());
        writer.header().unwrap();
        for event in events {
            table.apply_settled(event, &mut |u| writer.update(&u).unwrap());
        }
        let text = String::from_utf8(writer.out).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    /// A client connection that moved 5000 bytes out and 300,000 in, over 12.3456 ms,
    /// plus a listener (not a connection: no line).
    fn traffic() -> Vec<TcpEvent> {
        let mut events = client_events(SK, 1_000_000);
        let close = events.last_mut().unwrap();
        close.facts = TcpFacts {
            bytes_acked: 5000,
            bytes_received: 300_000,
            ..TcpFacts::default()
        };
        close.ts_ns = 1_000_000 + 12_345_600;
        events.push(ev(7, 2_000_000, 0, CLOSE, LISTEN, 8080));
        events.push(ev(7, 3_000_000, 1_000_000, LISTEN, CLOSE, 8080));
        events
    }

    #[test]
    fn plain() {
        assert_eq!(
            render(Layout::default(), &traffic()),
            [
                "PID   COMM       LADDR           LPORT RADDR           RPORT TX_KB RX_KB MS",
                "4242  test       127.0.0.1       40000 127.0.0.2       8080      4   292 12.35",
            ]
        );
    }

    #[test]
    fn wide_and_csv() {
        let wide = Layout {
            wide: true,
            ..Layout::default()
        };
        assert_eq!(
            render(wide, &traffic()),
            [
                "PID   COMM             IP LADDR                      LPORT RADDR                      RPORT  TX_KB  RX_KB MS",
                "4242  test             4  127.0.0.1                  40000 127.0.0.2                  8080       4    292 12.35",
            ]
        );
        let csv = Layout {
            csv: true,
            timestamp: true,
            ..Layout::default()
        };
        assert_eq!(
            render(csv, &traffic()),
            [
                "TIME(s),PID,COMM,IP,LADDR,LPORT,RADDR,RPORT,TX_KB,RX_KB,MS",
                "0.000000,4242,test,4,127.0.0.1,40000,127.0.0.2,8080,4,292,12.35",
            ]
        );
    }
}
