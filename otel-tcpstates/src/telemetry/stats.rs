//! The tracer's own counters at one moment: what the periodic log line, the exit
//! summary and the self-telemetry metrics all report.
use std::fmt;

use crate::{otlp::delivery::SpanStats, sampling::decision::SamplingStats};

/// The counters of one moment. Sessions and spans exist only when sessions are kept
/// (traces, `--life`) and when exporting, respectively.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Events decoded from the ring buffer.
    pub events_seen: u64,
    /// Events the kernel could not hand over (ring buffer full).
    pub events_lost: u64,
    /// State changes the kernel skipped: its program does not run while another
    /// BPF program runs on the CPU (`recursion_misses`).
    pub events_skipped: u64,
    /// With the packet programs (`--links`): their records.
    pub links: Option<LinkStats>,
    /// With the incident programs: their records lost.
    pub incidents: Option<IncidentStats>,
    /// Listeners the kernel could not remember: connections accepted from them
    /// may name no owner, or another listener's of the same port.
    pub listeners_lost: u64,
    pub sessions: Option<SessionStats>,
    pub spans: Option<SpanStats>,
    /// When exporting: what sampling kept and left out.
    pub sampling: Option<SamplingStats>,
    /// With `-Y`: records journald did not take.
    pub journal_unsent: Option<u64>,
    /// With connection metrics: measurements recorded into an overflow series.
    pub metrics_overflow: Option<u64>,
}

/// The packet programs' link records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Read from the ring buffer.
    pub seen: u64,
    /// The ring buffer had no room for them, or a program nested on the CPU took
    /// their scratch space.
    pub lost: u64,
    /// Read, but their `traceparent` value was not valid: no link.
    pub invalid: u64,
    /// Read, but not kept on their socket's root: past its 64, or past the
    /// session table's bound on all sockets' links (memory).
    pub not_kept: u64,
    /// Requests whose traceparent said the application sampled them.
    pub requests_sampled: u64,
    /// `tcp.request` spans made of them (each ended: answered, or its
    /// connection ended).
    pub request_spans: u64,
    /// Sampled requests that made no span: past a socket's in flight or
    /// repeats, or the session table's bound (memory).
    pub requests_not_kept: u64,
    /// With the TLS programs: requests read from TLS plaintext whose TCP
    /// socket was not found (or not followed), or that the kernel's per-thread
    /// maps had no room for.
    pub tls_unmatched: Option<u64>,
    /// HTTP/2 connections' request headers given up: by the kernel (no room
    /// on the ring or in its flow map, a gap in the stream), or by their
    /// decoder (a header block that did not decode), and records of TLS
    /// connections whose socket was never named.
    pub http2_lost: u64,
}

/// The incident programs' records that never arrived, or arrived with no
/// session to go on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IncidentStats {
    /// The ring buffer had no room for them.
    pub lost: u64,
    /// The kernel skipped the program, as for [`Stats::events_skipped`].
    pub skipped: u64,
    /// RSTs that came after their connection's trace had ended.
    pub resets_late: u64,
    /// Read, but of a socket the session table does not follow (it began
    /// before the tracer, or its session had ended): on no span.
    pub unmatched: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub in_flight: u64,
    pub started: u64,
    pub evicted: u64,
    /// Ended because a new socket took their kernel address before their CLOSE
    /// was seen (it was lost or skipped).
    pub replaced: u64,
    /// Span events (incidents) not kept: past a span's 64, or past the session
    /// table's bound on all sockets' events (memory).
    pub events_not_kept: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stats: {} events seen, {} lost, {} skipped",
            self.events_seen, self.events_lost, self.events_skipped
        )?;
        if let Some(s) = &self.links {
            write!(
                f,
                "; links: {} seen, {} lost, {} invalid, {} not kept; \
                 requests: {} sampled, {} spans, {} not kept",
                s.seen,
                s.lost,
                s.invalid,
                s.not_kept,
                s.requests_sampled,
                s.request_spans,
                s.requests_not_kept
            )?;
            if let Some(unmatched) = s.tls_unmatched {
                write!(f, ", {unmatched} TLS unmatched")?;
            }
            // Only once one was: nothing to say before.
            if s.http2_lost > 0 {
                write!(f, ", {} HTTP/2 lost", s.http2_lost)?;
            }
        }
        if let Some(s) = &self.incidents {
            write!(
                f,
                "; incidents: {} lost, {} skipped, {} unmatched, {} resets late",
                s.lost, s.skipped, s.unmatched, s.resets_late
            )?;
        }
        // Only once a map was full: nothing to say before.
        if self.listeners_lost > 0 {
            write!(f, "; listeners: {} lost", self.listeners_lost)?;
        }
        if let Some(s) = &self.sessions {
            write!(
                f,
                "; sessions: {} in flight, {} started, {} evicted, {} replaced, {} span events not kept",
                s.in_flight, s.started, s.evicted, s.replaced, s.events_not_kept
            )?;
        }
        if let Some(s) = &self.spans {
            write!(
                f,
                "; spans: {} produced, {} exported, {} failed, {} dropped",
                s.produced, s.exported, s.failed, s.dropped
            )?;
            // Only once the shutdown deadline has cut some off.
            if s.cut_off > 0 {
                write!(f, ", {} cut off by the shutdown deadline", s.cut_off)?;
            }
            write!(f, "; {} export errors", s.export_errors)?;
        }
        // Silent while every trace is kept: nothing to say.
        if let Some(s) = self.sampling.filter(|s| s.kept_by_rule + s.sampled_out > 0) {
            write!(
                f,
                "; sampling: {} traces kept by probability, {} by a rule, {} left out \
                 ({} spans), {} spans waiting",
                s.kept_by_probability,
                s.kept_by_rule,
                s.sampled_out,
                s.spans_sampled_out,
                s.spans_waiting
            )?;
        }
        if let Some(unsent) = self.journal_unsent {
            write!(f, "; journal: {unsent} not logged")?;
        }
        // Only when it says something: a cap reached.
        if let Some(overflow) = self.metrics_overflow.filter(|&n| n > 0) {
            write!(f, "; metrics: {overflow} measurements overflowed")?;
        }
        Ok(())
    }
}

/// The exit's account, when exporting: what was traced and where every span
/// went (produced = exported + failed + dropped + cut off), and the records that
/// matched no traced socket.
pub struct ExitSummary<'a> {
    stats: &'a Stats,
    sessions: SessionStats,
    spans: SpanStats,
    open_at_exit: u64,
}

impl<'a> ExitSummary<'a> {
    /// `None` unless `stats` has sessions and spans; `open_at_exit`: the
    /// sessions the shutdown ended.
    pub fn of(stats: &'a Stats, open_at_exit: u64) -> Option<Self> {
        Some(Self {
            stats,
            sessions: stats.sessions?,
            spans: stats.spans?,
            open_at_exit,
        })
    }
}

impl fmt::Display for ExitSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, p) = (&self.sessions, &self.spans);
        write!(
            f,
            "{} sockets traced ({} evicted, {} replaced, {} open at exit), {} spans: \
             {} exported, {} failed, {} dropped (export queue full), {} cut off by the \
             shutdown deadline",
            s.started,
            s.evicted,
            s.replaced,
            self.open_at_exit,
            p.produced,
            p.exported,
            p.failed,
            p.dropped,
            p.cut_off
        )?;
        if let Some(incidents) = &self.stats.incidents {
            write!(
                f,
                "; {} incident records matched no traced socket",
                incidents.unmatched
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_what_is_known() {
        let mut stats = Stats {
            events_seen: 12,
            events_lost: 3,
            ..Stats::default()
        };
        assert_eq!(
            stats.to_string(),
            "stats: 12 events seen, 3 lost, 0 skipped"
        );
        stats.sessions = Some(SessionStats {
            in_flight: 1,
            started: 4,
            evicted: 2,
            replaced: 3,
            events_not_kept: 13,
        });
        stats.spans = Some(SpanStats {
            produced: 9,
            exported: 5,
            failed: 2,
            dropped: 1,
            cut_off: 0,
            export_errors: 1,
        });
        assert_eq!(
            stats.to_string(),
            "stats: 12 events seen, 3 lost, 0 skipped; sessions: 1 in flight, 4 started, 2 evicted, \
             3 replaced, 13 span events not kept; \
             spans: 9 produced, 5 exported, 2 failed, 1 dropped; 1 export errors"
        );
        if let Some(spans) = &mut stats.spans {
            spans.cut_off = 4;
        }
        assert!(
            stats
                .to_string()
                .ends_with("1 dropped, 4 cut off by the shutdown deadline; 1 export errors")
        );
        stats.events_skipped = 4;
        stats.links = Some(LinkStats {
            seen: 8,
            lost: 2,
            invalid: 1,
            not_kept: 9,
            requests_sampled: 6,
            request_spans: 4,
            requests_not_kept: 1,
            tls_unmatched: None,
            http2_lost: 0,
        });
        stats.incidents = Some(IncidentStats {
            lost: 5,
            skipped: 6,
            resets_late: 1,
            unmatched: 7,
        });
        assert!(
            stats.to_string().starts_with(
                "stats: 12 events seen, 3 lost, 4 skipped; links: 8 seen, 2 lost, 1 invalid, \
                 9 not kept; requests: 6 sampled, 4 spans, 1 not kept; \
                 incidents: 5 lost, 6 skipped, 7 unmatched, 1 resets late; sessions:"
            ),
            "{stats}"
        );
        stats.listeners_lost = 3;
        assert!(
            stats
                .to_string()
                .contains("1 resets late; listeners: 3 lost; sessions:"),
            "{stats}"
        );
        stats.journal_unsent = Some(7);
        assert!(stats.to_string().ends_with("; journal: 7 not logged"));
        stats.metrics_overflow = Some(0);
        assert!(stats.to_string().ends_with("; journal: 7 not logged"));
        stats.metrics_overflow = Some(5);
        assert!(
            stats
                .to_string()
                .ends_with("; journal: 7 not logged; metrics: 5 measurements overflowed")
        );
    }

    #[test]
    fn the_exit_summary_accounts_for_every_span_and_loss() {
        let mut stats = Stats {
            sessions: Some(SessionStats {
                in_flight: 0,
                started: 21,
                evicted: 11,
                replaced: 2,
                events_not_kept: 0,
            }),
            spans: Some(SpanStats {
                produced: 74,
                exported: 60,
                failed: 4,
                dropped: 3,
                cut_off: 7,
                export_errors: 1,
            }),
            ..Stats::default()
        };
        assert_eq!(
            ExitSummary::of(&stats, 4).unwrap().to_string(),
            "21 sockets traced (11 evicted, 2 replaced, 4 open at exit), 74 spans: 60 exported, \
             4 failed, 3 dropped (export queue full), 7 cut off by the shutdown deadline"
        );
        stats.incidents = Some(IncidentStats {
            unmatched: 5,
            ..IncidentStats::default()
        });
        assert!(
            ExitSummary::of(&stats, 4)
                .unwrap()
                .to_string()
                .ends_with("deadline; 5 incident records matched no traced socket")
        );
        stats.spans = None;
        assert!(ExitSummary::of(&stats, 4).is_none());
    }
}
