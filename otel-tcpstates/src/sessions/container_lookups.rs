//! Container attribution off the event loop: the loop asks (never blocking: a
//! bounded queue) and later reads answers from caches; one worker thread does the
//! blocking reads of [`ContainerResolver`], walks of the cgroup tree included.
//!
//! When a span gets its `container.id`: a root always, once the answer is in (the
//! trace pipeline holds a root whose owner's lookup is out, for a while: see
//! `otlp::traces`); a state span when the answer is in by the time it is made. A
//! span whose owner's lookup is out waits for it, for at most [`WAIT_BUDGET`] per
//! second in all: the answers that come fast (a live process: one read of /proc
//! and one stat, microseconds) are on every span, even of connections that end at
//! once, and a slow one (a walk of a large cgroup tree, for a process already
//! gone) never holds up the loop.
//!
//! The caches forget the least recently used answers; a listener's owner is
//! pinned while it listens (its accepted connections may end long after its
//! last system call, by a reset or a timeout in softirq), so their roots still
//! name its container.
use std::{
    cell::RefCell,
    collections::{HashMap, HashSet, VecDeque},
    num::NonZeroUsize,
    sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    thread,
    time::{Duration, Instant},
};

use lru::LruCache;

use super::container::{Answer, ContainerId, ContainerResolver};

/// Questions the loop may have out at once; when the queue is full, as many again
/// wait on the loop's side to be sent (more are asked again at the owner's next
/// event).
const QUEUE: usize = 256;
/// Questions waiting for a walk of the tree (rate-limited); more are answered
/// "no container".
const WAITING_FOR_WALK: usize = 1024;
/// Answers remembered, per cgroup and per (pid, cgroup).
const CACHED: usize = 4096;
/// Owners pinned at once (listeners' owners): more are cached as any other.
const PINNED: usize = 8192;
/// How long spans may wait for answers, in all, per second.
const WAIT_BUDGET: Duration = Duration::from_millis(10);

type Key = (u32, u64);

/// The loop's side: caches, the questions out, the queue to the worker.
pub struct ContainerLookups {
    state: RefCell<State>,
}

struct State {
    /// `None` when the worker could not be started: no attribution.
    requests: Option<SyncSender<Key>>,
    answers: Receiver<(Key, Answer)>,
    /// Answers that hold for every process in a cgroup, containers and not.
    per_cgroup: LruCache<u64, Option<ContainerId>>,
    per_process: LruCache<Key, Option<ContainerId>>,
    /// Owners kept whatever the caches forget: how many pins each has, and its
    /// answer once in.
    pinned: HashMap<Key, (u32, Option<Option<ContainerId>>)>,
    /// Asked and not answered: sent, or in `unsent`.
    out: HashSet<Key>,
    /// Asked while the queue was full.
    unsent: VecDeque<Key>,
    /// What is left of this second's [`WAIT_BUDGET`].
    wait_left: Duration,
    budget_from: Instant,
}

impl Default for ContainerLookups {
    fn default() -> Self {
        Self::new()
    }
}

impl ContainerLookups {
    pub fn new() -> Self {
        Self::with_resolver(ContainerResolver::new())
    }

    fn with_resolver(resolver: ContainerResolver) -> Self {
        let (requests, questions) = mpsc::sync_channel(QUEUE);
        let (reply, answers) = mpsc::channel();
        let started = thread::Builder::new()
            .name("containers".into())
            .spawn(move || serve(resolver, &questions, &reply));
        if let Err(err) = &started {
            tracing::warn!("container.id is off: cannot start its lookup thread: {err}");
        }
        let cached = NonZeroUsize::new(CACHED).expect("non-zero");
        Self {
            state: RefCell::new(State {
                requests: started.is_ok().then_some(requests),
                answers,
                per_cgroup: LruCache::new(cached),
                per_process: LruCache::new(cached),
                pinned: HashMap::new(),
                out: HashSet::new(),
                unsent: VecDeque::new(),
                wait_left: WAIT_BUDGET,
                budget_from: Instant::now(),
            }),
        }
    }

    /// Asks for the container of `pid` in `cgroup_id` unless it is known or asked
    /// already; never blocks. Ask while the process lives: that answer is fast.
    pub fn request(&mut self, pid: u32, cgroup_id: u64) {
        let state = self.state.get_mut();
        state.take_answers();
        let key = (pid, cgroup_id);
        if pid == 0 || state.known(key).is_some() || state.out.contains(&key) {
            return;
        }
        if state.requests.is_some() && state.unsent.len() < QUEUE {
            state.out.insert(key);
            state.unsent.push_back(key);
            state.send();
        }
    }

    /// Asks for the container of `pid` in `cgroup_id`, and keeps the answer
    /// until as many [`ContainerLookups::unpin`]s: for a listener's owner, while
    /// it listens.
    pub fn pin(&mut self, pid: u32, cgroup_id: u64) {
        let key = (pid, cgroup_id);
        let state = self.state.get_mut();
        if pid == 0 || (state.pinned.len() >= PINNED && !state.pinned.contains_key(&key)) {
            self.request(pid, cgroup_id);
            return;
        }
        let answer = state.known(key);
        let pin = state.pinned.entry(key).or_insert((0, None));
        pin.0 += 1;
        pin.1 = pin.1.or(answer);
        self.request(pid, cgroup_id);
    }

    /// Takes back one [`ContainerLookups::pin`].
    pub fn unpin(&mut self, pid: u32, cgroup_id: u64) {
        let state = self.state.get_mut();
        let key = (pid, cgroup_id);
        if let Some(pin) = state.pinned.get_mut(&key) {
            pin.0 -= 1;
            if pin.0 == 0 {
                state.pinned.remove(&key);
            }
        }
    }

    /// Whether the lookup for `pid` in `cgroup_id` is asked and not answered yet.
    pub fn is_out(&self, pid: u32, cgroup_id: u64) -> bool {
        let mut state = self.state.borrow_mut();
        state.take_answers();
        state.out.contains(&(pid, cgroup_id))
    }

    /// The container of `pid` in `cgroup_id`, if known; a lookup still out is
    /// waited for within the budget (see the module's comment).
    pub fn cached(&self, pid: u32, cgroup_id: u64) -> Option<ContainerId> {
        let mut state = self.state.borrow_mut();
        state.take_answers();
        let key = (pid, cgroup_id);
        if state.out.contains(&key) {
            state.wait_for(key);
        }
        state.known(key).flatten()
    }
}

impl State {
    /// `Some(answer)` once answered.
    fn known(&mut self, (pid, cgroup_id): Key) -> Option<Option<ContainerId>> {
        if let Some(found) = self.per_cgroup.get(&cgroup_id) {
            return Some(*found);
        }
        if let Some(found) = self.per_process.get(&(pid, cgroup_id)) {
            return Some(*found);
        }
        self.pinned.get(&(pid, cgroup_id)).and_then(|pin| pin.1)
    }

    fn learn(&mut self, key: Key, answer: Answer) {
        self.out.remove(&key);
        if let Some(pin) = self.pinned.get_mut(&key) {
            pin.1 = Some(answer.container);
        }
        if answer.per_cgroup {
            self.per_cgroup.put(key.1, answer.container);
        } else {
            self.per_process.put(key, answer.container);
        }
    }

    /// Sends what the queue has room for.
    fn send(&mut self) {
        let Some(requests) = &self.requests else {
            return;
        };
        while let Some(&key) = self.unsent.front() {
            match requests.try_send(key) {
                Ok(()) => {
                    self.unsent.pop_front();
                }
                Err(TrySendError::Full(_)) => return,
                Err(TrySendError::Disconnected(_)) => {
                    self.requests = None;
                    self.unsent.clear();
                    return;
                }
            }
        }
    }

    fn take_answers(&mut self) {
        while let Ok((key, answer)) = self.answers.try_recv() {
            self.learn(key, answer);
        }
        self.send();
    }

    fn wait_for(&mut self, key: Key) {
        if self.budget_from.elapsed() >= Duration::from_secs(1) {
            self.budget_from = Instant::now();
            self.wait_left = WAIT_BUDGET;
        }
        let until = Instant::now() + self.wait_left;
        while self.out.contains(&key) {
            let left = until.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok((answered, answer)) => self.learn(answered, answer),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        self.wait_left = until.saturating_duration_since(Instant::now());
    }
}

/// The worker: answers each question, at once when it can, else after the next
/// walk of the tree (at most one per second).
fn serve(
    mut resolver: ContainerResolver,
    questions: &Receiver<Key>,
    reply: &mpsc::Sender<(Key, Answer)>,
) {
    let mut waiting: Vec<Key> = Vec::new();
    loop {
        let question = if waiting.is_empty() {
            questions.recv().ok()
        } else {
            match questions.recv_timeout(resolver.scan_wait()) {
                Ok(key) => Some(key),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        match question {
            Some(key) => match resolver.quick(key.0, key.1) {
                Some(answer) => {
                    if reply.send((key, answer)).is_err() {
                        return;
                    }
                }
                None if waiting.len() < WAITING_FOR_WALK => waiting.push(key),
                None => {
                    let none = Answer {
                        container: None,
                        per_cgroup: false,
                    };
                    if reply.send((key, none)).is_err() {
                        return;
                    }
                }
            },
            // The loop went away.
            None if waiting.is_empty() => return,
            None => {}
        }
        if !waiting.is_empty() && resolver.scan_wait().is_zero() {
            resolver.rescan();
            for key in waiting.drain(..) {
                if reply.send((key, resolver.after_scan(key.1))).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::sessions::container::tests::{ID, fake_host};

    fn answered(lookups: &ContainerLookups, pid: u32, cgroup_id: u64) -> Option<ContainerId> {
        let until = Instant::now() + Duration::from_secs(10);
        while lookups.is_out(pid, cgroup_id) && Instant::now() < until {
            thread::sleep(Duration::from_millis(5));
        }
        lookups.cached(pid, cgroup_id)
    }

    #[test]
    fn answers_come_from_the_worker_and_are_kept_per_cgroup() {
        let (root, resolver, ino) =
            fake_host("lookups", &format!("/system.slice/docker-{ID}.scope"), true);
        let mut lookups = ContainerLookups::with_resolver(resolver);
        assert_eq!(lookups.cached(42, ino), None, "not asked: not known");
        lookups.request(42, ino);
        let found = answered(&lookups, 42, ino);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, ContainerId::parse(ID));
        // Another process of the same cgroup: known without asking.
        lookups.request(43, ino);
        assert!(!lookups.is_out(43, ino));
        assert_eq!(lookups.cached(43, ino), ContainerId::parse(ID));
        lookups.request(0, ino);
        assert!(!lookups.is_out(0, ino));
    }

    #[test]
    fn a_pinned_owner_outlives_the_caches() {
        let (root, resolver, ino) = fake_host(
            "lookups-pinned",
            &format!("/system.slice/docker-{ID}.scope"),
            true,
        );
        let mut lookups = ContainerLookups::with_resolver(resolver);
        lookups.pin(42, ino);
        let found = answered(&lookups, 42, ino);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, ContainerId::parse(ID));
        let none = Answer {
            container: None,
            per_cgroup: false,
        };
        let flood = |lookups: &mut ContainerLookups| {
            let state = lookups.state.get_mut();
            for pid in 0..=CACHED as u32 {
                state.learn((1000 + pid, ino + 1), none);
                state.per_cgroup.put(u64::from(pid) + ino + 2, None);
            }
        };
        flood(&mut lookups);
        assert_eq!(lookups.cached(42, ino), ContainerId::parse(ID), "pinned");
        lookups.unpin(42, ino);
        flood(&mut lookups);
        assert_eq!(lookups.cached(42, ino), None, "forgotten once unpinned");
    }

    #[test]
    fn a_gone_process_is_answered_after_a_walk() {
        let (root, resolver, ino) = fake_host(
            "lookups-gone",
            &format!("/system.slice/docker-{ID}.scope"),
            false,
        );
        fs::remove_dir_all(root.join("proc/42")).unwrap();
        let mut lookups = ContainerLookups::with_resolver(resolver);
        lookups.request(42, ino);
        let found = answered(&lookups, 42, ino);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, ContainerId::parse(ID));
    }
}
