//! Draining the kernel's ring buffer: waits for a wakeup or the poll timer, then
//! hands every queued record, decoded, to the caller.
use std::{io, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{Interval, MissedTickBehavior, interval},
};

use crate::event::{self, TcpEvent};

/// Records handed on per drain at most (tens of ms of work): under sustained
/// overload the buffer never empties, and the caller's timers and signals must
/// still get their turn.
const DRAIN_BUDGET: usize = 16 * 1024;

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    poll: Interval,
    /// The last drain stopped at its budget with records left.
    more: bool,
    /// Records that did not decode (never expected; counted, not fatal).
    pub malformed: u64,
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
            malformed: 0,
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

    /// Whether the last drain stopped at its budget, records left.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Decodes and passes on the queued records, up to a budget; stops at the first
    /// error `sink` returns.
    pub fn drain<E>(
        &mut self,
        mut sink: impl FnMut(&TcpEvent) -> Result<(), E>,
    ) -> Result<usize, E> {
        let ring = self.ring.get_mut();
        let mut count = 0;
        let mut taken = 0;
        self.more = false;
        while let Some(record) = ring.next() {
            taken += 1;
            match event::decode(&record) {
                Ok(event) => {
                    count += 1;
                    sink(&event)?;
                }
                Err(err) => {
                    if self.malformed == 0 {
                        tracing::warn!("skipping malformed event record: {err}");
                    }
                    self.malformed += 1;
                }
            }
            if taken == DRAIN_BUDGET {
                self.more = true;
                break;
            }
        }
        Ok(count)
    }
}
