//! Draining the kernel's ring buffer: waits for a wakeup or the poll timer, then
//! hands every queued record, decoded, to the caller.
use std::{
    io,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{Interval, MissedTickBehavior, interval},
};

use otel_tcpstates_common::tcp_state;

use crate::kernel::{
    clock,
    event::{self, Record},
    http2::Http2,
};

/// How long one drain may run at most: under sustained overload the buffer
/// never empties, and the caller's timers and signals must still get their turn.
/// Wall time, not a record count: a daemon held to a small CPU quota takes many
/// times longer for the same records.
const DRAIN_SLICE: Duration = Duration::from_millis(20);

/// How many records a drain takes between two looks at the clock or at a pending
/// signal (well under a millisecond of work).
const CHECK_EVERY: usize = 256;

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    poll: Interval,
    /// The last drain stopped short (its slice, a signal, a deadline), records
    /// perhaps left.
    more: bool,
    /// Kernel time up to which every record has been read: see
    /// [`EventReader::read_through_ns`].
    read_through_ns: u64,
    /// Records that did not decode (never expected; counted, not fatal).
    pub malformed: u64,
    /// Link records read, with a valid `traceparent` value or not.
    pub links_seen: u64,
    /// Of those, the ones whose value was not a valid `traceparent`: no link.
    pub invalid_traceparents: u64,
    /// HTTP/2 header streams, decoded into link and answer records.
    pub http2: Http2,
}

impl EventReader {
    /// `poll_every` bounds the latency of an event on a quiet host: the kernel only
    /// wakes us once a quarter of the buffer is full.
    pub fn new(ring: RingBuf<MapData>, poll_every: Duration) -> io::Result<Self> {
        let mut poll = interval(poll_every);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // SAFETY: the RingBuf owns its map fd and keeps it open, unreplaced, for as
        // long as the AsyncFd (which owns the RingBuf) lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
        Ok(Self {
            ring,
            poll,
            more: false,
            read_through_ns: 0,
            malformed: 0,
            links_seen: 0,
            invalid_traceparents: 0,
            http2: Http2::default(),
        })
    }

    /// Waits until there may be records to drain.
    pub async fn ready(&mut self) -> io::Result<()> {
        if self.more {
            // Records are waiting: let the other tasks run, then drain again.
            tokio::task::yield_now().await;
            return Ok(());
        }
        tokio::select! {
            guard = self.ring.readable_mut() => {
                // Cleared before draining, so a wakeup that races the drain is kept.
                guard?.clear_ready();
            }
            _ = self.poll.tick() => {}
        }
        Ok(())
    }

    /// Decodes and passes on the queued records, for at most [`DRAIN_SLICE`] or
    /// until `interrupted` (asked every few hundred records) says to stop; stops
    /// at the first error `sink` returns.
    pub fn drain<E>(
        &mut self,
        interrupted: impl Fn() -> bool,
        sink: impl FnMut(&Record) -> Result<(), E>,
    ) -> Result<usize, E> {
        let until = Instant::now() + DRAIN_SLICE;
        self.take(
            |taken| taken.is_multiple_of(CHECK_EVERY) && (interrupted() || Instant::now() >= until),
            sink,
        )
    }

    /// Like [`EventReader::drain`], without the slice: until the buffer is empty or
    /// `until` has passed. For shutdown, once the program is detached and nothing
    /// else competes for the time.
    pub fn drain_until<E>(
        &mut self,
        until: Instant,
        sink: impl FnMut(&Record) -> Result<(), E>,
    ) -> Result<usize, E> {
        if Instant::now() >= until {
            self.more = true;
            return Ok(0);
        }
        self.take(
            |taken| taken.is_multiple_of(CHECK_EVERY) && Instant::now() >= until,
            sink,
        )
    }

    /// Kernel time (CLOCK_MONOTONIC ns) up to which every record the programs
    /// queued has been read: the last one read, or, once a drain found the
    /// buffer empty, when that drain began. The ring is one buffer for all CPUs,
    /// read in the order its records were reserved; a record reserved but not yet
    /// submitted holds the reader back for the few hundred nanoseconds its
    /// program runs, well within what a caller allows for.
    pub fn read_through_ns(&self) -> u64 {
        self.read_through_ns
    }

    /// Counts a link record in `links_seen`, and an invalid one in `invalid`.
    fn count(links_seen: &mut u64, invalid: &mut u64, record: &Record) {
        match record {
            Record::Link { .. } => *links_seen += 1,
            Record::InvalidTraceparent => {
                *links_seen += 1;
                *invalid += 1;
            }
            _ => {}
        }
    }

    /// Takes what is still queued, only telling its kinds apart, and says how many
    /// records that was: what the shutdown deadline left no time for, counted as lost.
    pub fn discard(&mut self) -> Discarded {
        let ring = self.ring.get_mut();
        let mut discarded = Discarded::default();
        while let Some(record) = ring.next() {
            match event::decode_record(&record) {
                Ok(event::Record::Transition(_)) => discarded.transitions += 1,
                _ => discarded.other += 1,
            }
        }
        self.more = false;
        discarded
    }

    /// Passes on decoded records until the buffer is empty or `stop`, asked after
    /// each record with the number taken, says so.
    fn take<E>(
        &mut self,
        mut stop: impl FnMut(usize) -> bool,
        mut sink: impl FnMut(&Record) -> Result<(), E>,
    ) -> Result<usize, E> {
        let ring = self.ring.get_mut();
        let began_ns = clock::monotonic_now_ns();
        let mut count = 0;
        let mut taken = 0;
        self.more = false;
        while let Some(record) = ring.next() {
            taken += 1;
            match event::decode_record(&record) {
                Ok(event) => {
                    count += 1;
                    if let Some(ts_ns) = event.ts_ns() {
                        self.read_through_ns = self.read_through_ns.max(ts_ns);
                    }
                    if let Record::H2(h2) = &event {
                        // Its links and answers, made by the connection's decoder.
                        let mut made = Vec::new();
                        self.http2.record(h2, |record| made.push(record));
                        for record in &made {
                            Self::count(
                                &mut self.links_seen,
                                &mut self.invalid_traceparents,
                                record,
                            );
                            sink(record)?;
                        }
                    } else {
                        if let Record::Transition(t) = &event
                            && t.newstate.0 == tcp_state::CLOSE
                        {
                            self.http2.closed(t.skaddr);
                        }
                        Self::count(&mut self.links_seen, &mut self.invalid_traceparents, &event);
                        sink(&event)?;
                    }
                }
                Err(err) => {
                    if self.malformed == 0 {
                        tracing::warn!("skipping malformed event record: {err}");
                    }
                    self.malformed += 1;
                }
            }
            if stop(taken) {
                self.more = true;
                return Ok(count);
            }
        }
        // Empty: whatever was queued before the drain began has been read.
        self.read_through_ns = self.read_through_ns.max(began_ns);
        Ok(count)
    }
}

/// What [`EventReader::discard`] threw away: state changes apart from the rest
/// (link and incident records), so each is counted as what it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct Discarded {
    pub transitions: u64,
    pub other: u64,
}
