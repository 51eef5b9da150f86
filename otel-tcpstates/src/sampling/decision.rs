//! The sampling decision on each session, and the updates it lets through.
//!
//! A trace kept by probability is known to be kept from its first span, so its
//! spans go on at once. Any other waits, with the keep rules on, in the session
//! table (which holds its ended states) until the session ends: then the rules
//! decide, and a kept trace goes on whole, root last.
use crate::{
    sampling::{
        rules::{KeepRules, KeptBy},
        settings::Sampler,
        threshold::Threshold,
    },
    sessions::requests::RequestEnded,
    sessions::table::{EndReason, Session, StateEnded, Update},
};

/// What a kept trace's spans carry of the decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Set when the probability decision kept the trace: its spans carry `th`.
    pub threshold: Option<Threshold>,
    /// The rules that kept it (on the root).
    pub kept_by: KeptBy,
}

/// An update of a kept trace.
pub enum Kept<'a> {
    State(&'a Session, &'a StateEnded, Verdict),
    /// A request the application sampled: its span goes in the application's
    /// trace, whatever the decision on the connection's.
    Request(&'a Session, &'a RequestEnded),
    Root(&'a Session, u64, EndReason, Verdict),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplingStats {
    /// Sessions whose trace the probability decision kept (a rule may have too).
    pub kept_by_probability: u64,
    /// Sessions kept by a rule alone.
    pub kept_by_rule: u64,
    /// Sessions whose trace was not kept.
    pub sampled_out: u64,
    /// Spans not exported, of the sessions not kept.
    pub spans_sampled_out: u64,
    /// Spans waiting in the session table for their session's end.
    pub spans_waiting: u64,
    /// Request spans passed on (in their applications' traces).
    pub request_spans: u64,
}

pub struct Sampling {
    sampler: Sampler,
    rules: KeepRules,
    stats: SamplingStats,
}

impl Sampling {
    pub fn new(sampler: Sampler, rules: KeepRules) -> Self {
        Self {
            sampler,
            rules,
            stats: SamplingStats::default(),
        }
    }

    /// Whether the session table must hold each session's ended states for the
    /// decision at its end: only when a trace can be left out by probability and
    /// then kept by a rule.
    pub fn holds_states(&self) -> bool {
        matches!(self.sampler, Sampler::Ratio(t) if !t.keeps_all()) && self.rules.any()
    }

    /// When the table must hold states: which sessions', by trace id. Those the
    /// probability keeps go on as they end, so holding theirs would only copy.
    pub fn hold_if(&self) -> Option<impl Fn(&[u8; 16]) -> bool + 'static> {
        match self.sampler {
            Sampler::Ratio(threshold) if self.holds_states() => {
                Some(move |trace_id: &[u8; 16]| !threshold.keeps(trace_id))
            }
            _ => None,
        }
    }

    pub fn stats(&self) -> SamplingStats {
        self.stats
    }

    /// Passes on to `out` what `update` makes of kept traces.
    pub fn route(&mut self, update: &Update<'_>, mut out: impl FnMut(Kept<'_>)) {
        if let Update::RequestEnded(session, ended) = *update {
            // Sampled by the application, as a parent-based sampler keeps a
            // child: only a sampler that sends nothing leaves it out.
            if self.sampler == Sampler::AlwaysOff {
                self.stats.spans_sampled_out += 1;
            } else {
                self.stats.request_spans += 1;
                out(Kept::Request(session, ended));
            }
            return;
        }
        let threshold = match self.sampler {
            Sampler::AlwaysOn => {
                if let Update::SessionEnded(..) = update {
                    self.stats.kept_by_probability += 1;
                }
                return out(kept(update, Verdict::default()));
            }
            Sampler::AlwaysOff => {
                self.stats.spans_sampled_out += 1;
                if let Update::SessionEnded(..) = update {
                    self.stats.sampled_out += 1;
                }
                return;
            }
            Sampler::Ratio(threshold) => threshold,
        };
        let session = match update {
            Update::StateEnded(session, _)
            | Update::RequestEnded(session, _)
            | Update::SessionEnded(session, ..) => session,
        };
        let by_probability = threshold.keeps(&session.trace_id);
        match *update {
            Update::StateEnded(..) if by_probability => out(kept(
                update,
                Verdict {
                    threshold: Some(threshold),
                    kept_by: KeptBy::default(),
                },
            )),
            Update::StateEnded(..) if self.holds_states() => self.stats.spans_waiting += 1,
            Update::StateEnded(..) => self.stats.spans_sampled_out += 1,
            // Passed on above.
            Update::RequestEnded(..) => {}
            Update::SessionEnded(session, end_ns, reason) => {
                let kept_by = self.rules.check(session, end_ns);
                let held = session.held.len() as u64;
                if by_probability {
                    // Its states went on as they ended.
                    self.stats.kept_by_probability += 1;
                    let verdict = Verdict {
                        threshold: Some(threshold),
                        kept_by,
                    };
                    out(Kept::Root(session, end_ns, reason, verdict));
                } else if !kept_by.is_empty() {
                    self.stats.kept_by_rule += 1;
                    self.stats.spans_waiting -= held;
                    let verdict = Verdict {
                        threshold: None,
                        kept_by,
                    };
                    for ended in &session.held {
                        out(Kept::State(session, ended, verdict));
                    }
                    out(Kept::Root(session, end_ns, reason, verdict));
                } else {
                    self.stats.sampled_out += 1;
                    self.stats.spans_waiting -= held;
                    self.stats.spans_sampled_out += held + 1;
                }
            }
        }
    }
}

fn kept<'a>(update: &'a Update<'a>, verdict: Verdict) -> Kept<'a> {
    match *update {
        Update::StateEnded(session, ended) => Kept::State(session, ended, verdict),
        Update::RequestEnded(session, ended) => Kept::Request(session, ended),
        Update::SessionEnded(session, end_ns, reason) => {
            Kept::Root(session, end_ns, reason, verdict)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use otel_tcpstates_common::tcp_state::*;

    use super::*;
    use crate::sessions::table::{
        SessionTable,
        tests::{client_events, ev},
    };

    /// What got through, flattened: (socket, span name or "root", th?, kept_by).
    type Through = Vec<(u64, &'static str, bool, String)>;

    fn run(
        sampling: &mut Sampling,
        capacity: usize,
        events: &[crate::kernel::event::TcpEvent],
    ) -> Through {
        let table = SessionTable::new(NonZeroUsize::new(capacity).unwrap());
        let mut table = match sampling.hold_if() {
            Some(hold) => table.holding_states_if(hold),
            None => table,
        };
        let mut through = Vec::new();
        for event in events {
            table.apply_settled(event, &mut |update| {
                sampling.route(&update, |kept| {
                    through.push(match kept {
                        Kept::State(s, e, v) => (
                            s.skaddr,
                            otel_tcpstates_common::tcp_state::name(e.state.0).unwrap(),
                            v.threshold.is_some(),
                            v.kept_by.names(),
                        ),
                        Kept::Root(s, _, _, v) => {
                            (s.skaddr, "root", v.threshold.is_some(), v.kept_by.names())
                        }
                        Kept::Request(s, _) => (s.skaddr, "request", false, String::new()),
                    })
                })
            });
        }
        through
    }

    fn ratio(p: f64) -> Sampling {
        Sampling::new(
            Sampler::Ratio(Threshold::from_probability(p)),
            KeepRules::default(),
        )
    }

    /// Clean connections on sockets 1..=n.
    fn clean(n: u64) -> Vec<crate::kernel::event::TcpEvent> {
        (1..=n)
            .flat_map(|sk| client_events(sk, sk * 10_000))
            .collect()
    }

    #[test]
    fn every_trace_goes_on_as_it_ends_with_always_on() {
        let mut sampling = Sampling::new(Sampler::AlwaysOn, KeepRules::default());
        assert!(!sampling.holds_states());
        let through = run(&mut sampling, 16, &clean(3));
        assert_eq!(through.len(), 3 * 5);
        assert!(through.iter().all(|(_, _, th, by)| !th && by.is_empty()));
        assert_eq!(sampling.stats().kept_by_probability, 3);
    }

    #[test]
    fn nothing_goes_on_with_always_off_but_it_is_counted() {
        let mut sampling = Sampling::new(Sampler::AlwaysOff, KeepRules::default());
        assert!(run(&mut sampling, 16, &clean(3)).is_empty());
        let stats = sampling.stats();
        assert_eq!((stats.sampled_out, stats.spans_sampled_out), (3, 15));
    }

    #[test]
    fn traces_kept_by_probability_go_on_at_once_whole_with_th() {
        let mut sampling = ratio(0.5);
        assert!(sampling.holds_states());
        let n = 2000;
        let through = run(&mut sampling, 4096, &clean(n));
        let roots: Vec<_> = through.iter().filter(|t| t.1 == "root").collect();
        // Binomial(2000, 0.5): σ ≈ 22.
        assert!((900..=1100).contains(&roots.len()), "{}", roots.len());
        assert!(through.iter().all(|(_, _, th, by)| *th && by.is_empty()));
        assert_eq!(through.len(), roots.len() * 5, "whole traces");
        let stats = sampling.stats();
        assert_eq!(stats.kept_by_probability, roots.len() as u64);
        assert_eq!(stats.kept_by_probability + stats.sampled_out, n);
        assert_eq!(stats.spans_sampled_out, stats.sampled_out * 5);
        assert_eq!(stats.spans_waiting, 0);
    }

    #[test]
    fn a_failed_connection_is_kept_whole_by_its_rule_without_th() {
        let mut sampling = ratio(0.0);
        let refused = [
            ev(7, 100, 0, CLOSE, SYN_SENT, 0),
            ev(7, 200, 100, SYN_SENT, CLOSE, 40000),
        ];
        let mut events = clean(5);
        events.extend(refused);
        let through = run(&mut sampling, 16, &events);
        assert_eq!(
            through,
            [
                (7, "SYN_SENT", false, "error".to_string()),
                (7, "root", false, "error".to_string())
            ]
        );
        let stats = sampling.stats();
        assert_eq!((stats.kept_by_rule, stats.sampled_out), (1, 5));
    }

    #[test]
    fn a_slow_handshake_and_a_long_life_keep_a_trace_and_each_rule_turns_off() {
        // SYN_SENT for 150 ms, then a clean close after 10 s.
        let ms = 1_000_000;
        let slow = [
            ev(9, 0, 0, CLOSE, SYN_SENT, 0),
            ev(9, 150 * ms, 150 * ms, SYN_SENT, ESTABLISHED, 40000),
            ev(9, 10_000 * ms, 9850 * ms, ESTABLISHED, FIN_WAIT1, 40000),
            ev(9, 10_001 * ms, ms, FIN_WAIT1, FIN_WAIT2, 40000),
            ev(9, 10_002 * ms, ms, FIN_WAIT2, CLOSE, 40000),
        ];
        let rules = |slow_handshake_ns, longer_than_ns| KeepRules {
            slow_handshake_ns,
            longer_than_ns,
            ..KeepRules::default()
        };
        let sampler = Sampler::Ratio(Threshold::from_probability(0.0));
        let kept_by = |rules| {
            let through = run(&mut Sampling::new(sampler, rules), 16, &slow);
            through.last().map(|t| (through.len(), t.3.clone()))
        };
        assert_eq!(
            kept_by(rules(Some(100 * ms), None)),
            Some((5, "slow_handshake".into()))
        );
        assert_eq!(kept_by(rules(Some(200 * ms), None)), None);
        assert_eq!(kept_by(rules(None, None)), None);
        assert_eq!(
            kept_by(rules(Some(100 * ms), Some(10_000 * ms))),
            Some((5, "slow_handshake,long_lived".into()))
        );
        assert_eq!(
            kept_by(rules(None, Some(10_000 * ms))),
            Some((5, "long_lived".into()))
        );
    }

    #[test]
    fn an_evicted_session_is_decided_when_it_is_evicted() {
        let mut sampling = ratio(0.0);
        // A handshake that has lasted 1 s when a newer socket evicts it.
        let s = 1_000_000_000;
        let through = run(
            &mut sampling,
            1,
            &[
                ev(1, 0, 0, CLOSE, SYN_SENT, 0),
                ev(2, s, 0, CLOSE, SYN_SENT, 0),
            ],
        );
        assert_eq!(
            through,
            [
                (1, "SYN_SENT", false, "slow_handshake".to_string()),
                (1, "root", false, "slow_handshake".to_string())
            ]
        );
        assert_eq!(sampling.stats().spans_waiting, 0);
    }
}
