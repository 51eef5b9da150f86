//! bcc tcpstates' text output: the same columns, widths, header and CSV layout.
use std::io::{self, Write};

use super::{Layout, TimeColumns, write_csv_field};
use crate::{kernel::clock::WallClock, kernel::event::TcpEvent};

pub struct TextWriter<W: Write> {
    layout: Layout,
    times: TimeColumns,
    out: W,
}

impl<W: Write> TextWriter<W> {
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
        let Layout { wide, csv, .. } = self.layout;
        let out = &mut self.out;
        self.times.header(out)?;
        if csv {
            writeln!(
                out,
                "SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,OLDSTATE,NEWSTATE,MS"
            )
        } else if wide {
            writeln!(
                out,
                "{:<16} {:<5} {:<16} {:<2} {:<26} {:<5} {:<26} {:<5} {:<11} -> {:<11} MS",
                "SKADDR",
                "C-PID",
                "C-COMM",
                "IP",
                "LADDR",
                "LPORT",
                "RADDR",
                "RPORT",
                "OLDSTATE",
                "NEWSTATE"
            )
        } else {
            writeln!(
                out,
                "{:<16} {:<5} {:<10} {:<15} {:<5} {:<15} {:<5} {:<11} -> {:<11} MS",
                "SKADDR",
                "C-PID",
                "C-COMM",
                "LADDR",
                "LPORT",
                "RADDR",
                "RPORT",
                "OLDSTATE",
                "NEWSTATE"
            )
        }
    }

    pub fn event(&mut self, event: &TcpEvent) -> io::Result<()> {
        let Layout { wide, csv, .. } = self.layout;
        self.times.write(&mut self.out, event.ts_ns)?;
        // bcc's columns: the socket's family, the addresses as the kernel gave them
        // (a dual-stack server's IPv4 client as `::ffff:a.b.c.d`).
        let ip = event.family.version();
        let (laddr, raddr) = event.kernel_addrs();
        let ms = event.delta_ns as f64 / 1e6;
        let e = event;
        if csv {
            write!(self.out, "{:x},{},", e.skaddr, e.pid)?;
            write_csv_field(&mut self.out, &e.comm.to_string())?;
            writeln!(
                self.out,
                ",{ip},{},{},{},{},{},{},{ms:.3}",
                laddr, e.local_port, raddr, e.remote_port, e.oldstate, e.newstate
            )
        } else if wide {
            writeln!(
                self.out,
                "{:<16x} {:<5} {:<16.16} {:<2} {:<26} {:<5} {:<26} {:<5} {:<11} -> {:<11} {ms:.3}",
                e.skaddr,
                e.pid,
                e.comm,
                ip,
                laddr,
                e.local_port,
                raddr,
                e.remote_port,
                e.oldstate,
                e.newstate
            )
        } else {
            writeln!(
                self.out,
                "{:<16x} {:<5} {:<10.10} {:<15} {:<5} {:<15} {:<5} {:<11} -> {:<11} {ms:.3}",
                e.skaddr,
                e.pid,
                e.comm,
                laddr,
                e.local_port,
                raddr,
                e.remote_port,
                e.oldstate,
                e.newstate
            )
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use chrono::{Local, TimeZone as _};
    use otel_tcpstates_common::{AF_INET6, tcp_state};

    use super::*;
    use crate::kernel::event::{
        decode,
        tests::{raw_v4, record},
    };

    fn render(layout: Layout, events: &[TcpEvent]) -> (WallClock, Vec<String>) {
        let clock = WallClock::measure();
        let mut writer = TextWriter::new(layout, clock, Vec::new());
        writer.header().unwrap();
        for event in events {
            writer.event(event).unwrap();
        }
        let text = String::from_utf8(writer.out).unwrap();
        (clock, text.lines().map(str::to_owned).collect())
    }

    fn v4() -> TcpEvent {
        decode(&record(&raw_v4())).unwrap()
    }

    fn v6_close() -> TcpEvent {
        let mut raw = raw_v4();
        raw.family = AF_INET6;
        raw.saddr = "2001:db8:1::10".parse::<Ipv6Addr>().unwrap().octets();
        raw.daddr = "2001:db8:2::20".parse::<Ipv6Addr>().unwrap().octets();
        raw.comm = *b"a-very-long-name";
        raw.oldstate = tcp_state::LAST_ACK;
        raw.newstate = tcp_state::CLOSE;
        raw.ts_ns += 2_500_000_000;
        raw.delta_ns = 17;
        raw.skaddr = 0xffff_8880_0123_4567;
        decode(&record(&raw)).unwrap()
    }

    #[test]
    fn plain() {
        let (_, lines) = render(Layout::default(), &[v4(), v6_close()]);
        assert_eq!(
            lines,
            [
                "SKADDR           C-PID C-COMM     LADDR           LPORT RADDR           RPORT OLDSTATE    -> NEWSTATE    MS",
                "ffff9fd7e8192000 22384 curl       10.0.0.1        52000 93.184.216.34   80    SYN_SENT    -> ESTABLISHED 1.235",
                "ffff888001234567 22384 a-very-lon 2001:db8:1::10  52000 2001:db8:2::20  80    LAST_ACK    -> CLOSE       0.000",
            ]
        );
    }

    #[test]
    fn wide() {
        let layout = Layout {
            wide: true,
            ..Layout::default()
        };
        let (_, lines) = render(layout, &[v4(), v6_close()]);
        assert_eq!(
            lines,
            [
                "SKADDR           C-PID C-COMM           IP LADDR                      LPORT RADDR                      RPORT OLDSTATE    -> NEWSTATE    MS",
                "ffff9fd7e8192000 22384 curl             4  10.0.0.1                   52000 93.184.216.34              80    SYN_SENT    -> ESTABLISHED 1.235",
                "ffff888001234567 22384 a-very-long-name 6  2001:db8:1::10             52000 2001:db8:2::20             80    LAST_ACK    -> CLOSE       0.000",
            ]
        );
    }

    #[test]
    fn csv() {
        let layout = Layout {
            csv: true,
            ..Layout::default()
        };
        let (_, lines) = render(layout, &[v4(), v6_close()]);
        assert_eq!(
            lines,
            [
                "SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,OLDSTATE,NEWSTATE,MS",
                "ffff9fd7e8192000,22384,curl,4,10.0.0.1,52000,93.184.216.34,80,SYN_SENT,ESTABLISHED,1.235",
                "ffff888001234567,22384,a-very-long-name,6,2001:db8:1::10,52000,2001:db8:2::20,80,LAST_ACK,CLOSE,0.000",
            ]
        );
    }

    #[test]
    fn csv_quotes_a_comm_with_a_comma() {
        let mut raw = raw_v4();
        raw.comm[..6].copy_from_slice(b"a,\"b\"\0");
        let layout = Layout {
            csv: true,
            ..Layout::default()
        };
        let (_, lines) = render(layout, &[decode(&record(&raw)).unwrap()]);
        assert!(
            lines[1].starts_with("ffff9fd7e8192000,22384,\"a,\"\"b\"\"\",4,"),
            "{}",
            lines[1]
        );
    }

    fn hms(clock: &WallClock, event: &TcpEvent) -> String {
        let ns = clock.unix_ns(event.ts_ns);
        let secs = i64::try_from(ns.div_euclid(1_000_000_000)).unwrap();
        Local
            .timestamp_opt(secs, 0)
            .unwrap()
            .format("%H:%M:%S")
            .to_string()
    }

    #[test]
    fn time_and_timestamp_columns() {
        let layout = Layout {
            time: true,
            timestamp: true,
            ..Layout::default()
        };
        let (clock, lines) = render(layout, &[v4(), v6_close()]);
        let (a, b) = (hms(&clock, &v4()), hms(&clock, &v6_close()));
        assert_eq!(
            lines,
            [
                "TIME     TIME(s)   SKADDR           C-PID C-COMM     LADDR           LPORT RADDR           RPORT OLDSTATE    -> NEWSTATE    MS".to_owned(),
                format!("{a} 0.000000  ffff9fd7e8192000 22384 curl       10.0.0.1        52000 93.184.216.34   80    SYN_SENT    -> ESTABLISHED 1.235"),
                format!("{b} 2.500000  ffff888001234567 22384 a-very-lon 2001:db8:1::10  52000 2001:db8:2::20  80    LAST_ACK    -> CLOSE       0.000"),
            ]
        );
    }

    #[test]
    fn csv_with_time_and_timestamp() {
        let layout = Layout {
            time: true,
            timestamp: true,
            csv: true,
            ..Layout::default()
        };
        let (clock, lines) = render(layout, &[v4(), v6_close()]);
        let b = hms(&clock, &v6_close());
        assert_eq!(
            lines[0],
            "TIME,TIME(s),SKADDR,C-PID,C-COMM,IP,LADDR,LPORT,RADDR,RPORT,OLDSTATE,NEWSTATE,MS"
        );
        assert_eq!(
            lines[2],
            format!(
                "{b},2.500000,ffff888001234567,22384,a-very-long-name,6,2001:db8:1::10,52000,2001:db8:2::20,80,LAST_ACK,CLOSE,0.000"
            )
        );
    }
}
