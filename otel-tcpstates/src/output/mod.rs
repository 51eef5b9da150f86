//! In: decoded records (tcpstates lines, journal records) and session updates
//! (tcplife lines). Out: text on stdout, datagrams to journald. It never touches
//! OTLP, and never changes what it is handed.
use std::io::{self, Write};

use chrono::{DateTime, Local};

use crate::kernel::clock::WallClock;

pub mod journal;
pub mod life;
pub mod text;

/// Which of tcpstates' layout flags are on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// `-T`: HH:MM:SS column.
    pub time: bool,
    /// `-t`: seconds since the first event.
    pub timestamp: bool,
    /// `-w`: IP column, wider addresses and command.
    pub wide: bool,
    /// `-s`: comma-separated values.
    pub csv: bool,
}

/// The optional leading `TIME` (`-T`) and `TIME(s)` (`-t`) columns both bcc tools print.
pub struct TimeColumns {
    layout: Layout,
    clock: WallClock,
    first_ts_ns: Option<u64>,
}

impl TimeColumns {
    pub fn new(layout: Layout, clock: WallClock) -> Self {
        Self {
            layout,
            clock,
            first_ts_ns: None,
        }
    }

    /// The wall clock was stepped: rows from now on use `clock`.
    pub fn set_clock(&mut self, clock: WallClock) {
        self.clock = clock;
    }

    pub fn header(&self, out: &mut impl Write) -> io::Result<()> {
        let csv = self.layout.csv;
        if self.layout.time {
            if csv {
                write!(out, "TIME,")?
            } else {
                write!(out, "{:<8} ", "TIME")?
            }
        }
        if self.layout.timestamp {
            if csv {
                write!(out, "TIME(s),")?
            } else {
                write!(out, "{:<9} ", "TIME(s)")?
            }
        }
        Ok(())
    }

    /// The columns for a row about kernel time `ts_ns`; `-t` counts from the first row.
    pub fn write(&mut self, out: &mut impl Write, ts_ns: u64) -> io::Result<()> {
        let csv = self.layout.csv;
        if self.layout.time {
            let at: DateTime<Local> = self.clock.system_time(ts_ns).into();
            let at = at.format("%H:%M:%S");
            if csv {
                write!(out, "{at},")?
            } else {
                write!(out, "{at:<8} ")?
            }
        }
        if self.layout.timestamp {
            let first = *self.first_ts_ns.get_or_insert(ts_ns);
            let secs = ts_ns.saturating_sub(first) as f64 / 1e9;
            if csv {
                write!(out, "{secs:.6},")?
            } else {
                write!(out, "{secs:<9.6} ")?
            }
        }
        Ok(())
    }
}

/// Quotes a field only when it needs it (RFC 4180), so ordinary output matches bcc's.
pub fn write_csv_field(out: &mut impl Write, field: &str) -> io::Result<()> {
    if field.contains([',', '"', '\n', '\r']) {
        write!(out, "\"{}\"", field.replace('"', "\"\""))
    } else {
        out.write_all(field.as_bytes())
    }
}
