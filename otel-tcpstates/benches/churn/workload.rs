//! The churn generator: one client thread connecting, writing and closing as fast as
//! it can, one server thread accepting and reading to EOF.
use super::*;

/// Listener ports the client rotates over, each with its own ~28k ephemeral ports
/// for the client: a port is reused seconds later, never while the server's end
/// of its last connection may still be closing.
pub(crate) const DESTINATIONS: usize = 8;
/// Connections made but not yet accepted, at most: well under the listen backlog,
/// so no SYN is ever dropped (a dropped SYN stalls its connect() for a second).
pub(crate) const MAX_PENDING: u64 = 512;
/// Every how many connections one ends with a reset (SO_LINGER 0) instead of a FIN.
pub(crate) const RESET_EVERY: u64 = 4;
pub(crate) const PAYLOAD: &[u8] = b"churn\n";
/// No connect, accept or read waits longer than this.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Accepts from one listener before the server moves to the next.
pub(crate) const ACCEPT_BURST: usize = 64;

#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) connected: AtomicU64,
    pub(crate) accepted: AtomicU64,
    /// Connections the client finished: connected, wrote, closed.
    pub(crate) completed: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) client_done: AtomicBool,
}

pub(crate) struct Churn {
    pub(crate) counts: Arc<Counts>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) threads: Vec<JoinHandle<()>>,
}

impl Churn {
    /// Starts churning; it goes on until [`Churn::stop`] or `limit` connections.
    /// `pin` keeps both threads on CPU 0: the churn gets one core, the tracer the
    /// rest. Spread over two vCPUs, client and server contend for the same socket
    /// locks (paravirtual spinlocks here) and the untraced rate swung between ~45k
    /// and ~95k connections/s from one run to the next; on one core the untraced
    /// runs of one bench agree within a few %.
    pub(crate) fn start(limit: u64, pin: bool) -> Result<Churn> {
        Churn::start_with(limit, pin, Some(RESET_EVERY))
    }

    /// [`Churn::start`] with every connection closing with a FIN: none ends in
    /// error, so no sampling keep rule fires.
    pub(crate) fn start_clean(limit: u64, pin: bool) -> Result<Churn> {
        Churn::start_with(limit, pin, None)
    }

    /// One connection in `reset_every` ends with a reset (none: never).
    fn start_with(limit: u64, pin: bool, reset_every: Option<u64>) -> Result<Churn> {
        let cpu = pin.then_some(0);
        let listeners = (0..DESTINATIONS)
            .map(|_| churn_listener())
            .collect::<Result<Vec<_>>>()?;
        let addrs = listeners
            .iter()
            .map(|l| match l.local_addr()? {
                SocketAddr::V4(addr) => Ok(addr),
                SocketAddr::V6(addr) => bail!("listener on IPv6 {addr}"),
            })
            .collect::<Result<Vec<_>>>()?;
        let counts = Arc::<Counts>::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        let client = thread::Builder::new()
            .name("churn-client".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                client(&addrs, limit, reset_every, &s, &c)
            })?;
        let c = Arc::clone(&counts);
        let server = thread::Builder::new()
            .name("churn-server".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                server(&listeners, &c)
            })?;
        Ok(Churn {
            counts,
            stop,
            threads: vec![client, server],
        })
    }

    pub(crate) fn completed(&self) -> u64 {
        self.counts.completed.load(Relaxed)
    }

    /// The client reached its limit.
    pub(crate) fn finished(&self) -> bool {
        self.counts.client_done.load(Relaxed)
    }

    /// Stops both threads; returns (connections completed, failed).
    pub(crate) fn stop(mut self) -> (u64, u64) {
        self.join();
        (self.completed(), self.counts.errors.load(Relaxed))
    }

    pub(crate) fn join(&mut self) {
        self.stop.store(true, Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.join();
    }
}

pub(crate) fn pin_to_cpu(cpu: Option<usize>) {
    let Some(cpu) = cpu else {
        return;
    };
    // SAFETY: cpu_set_t is plain data, CPU_SET stays inside it, and pid 0 is the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

pub(crate) fn churn_listener() -> Result<TcpListener> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    // std listens with a backlog of 128; ask for the system's maximum.
    listen(&listener, Backlog::MAXALLOWABLE)?;
    // Accepted sockets inherit it, so no read of the server waits long.
    setsockopt(&listener, sockopt::ReceiveTimeout, &timeval(IO_TIMEOUT))?;
    // One server thread serves every listener: poll, then accept what is there.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

pub(crate) fn timeval(d: Duration) -> TimeVal {
    TimeVal::new(d.as_secs() as _, d.subsec_micros() as _)
}

pub(crate) fn client(
    addrs: &[SocketAddrV4],
    limit: u64,
    reset_every: Option<u64>,
    stop: &AtomicBool,
    counts: &Counts,
) {
    let mut n = 0;
    while n < limit && !stop.load(Relaxed) {
        let pending = counts
            .connected
            .load(Relaxed)
            .saturating_sub(counts.accepted.load(Relaxed));
        if pending >= MAX_PENDING {
            thread::yield_now();
            continue;
        }
        let reset = reset_every.is_some_and(|every| n % every == every - 1);
        let counter = match connection(addrs[n as usize % addrs.len()], reset, counts) {
            Ok(()) => &counts.completed,
            Err(_) => &counts.errors,
        };
        counter.fetch_add(1, Relaxed);
        n += 1;
    }
    counts.client_done.store(true, Relaxed);
}

/// One connection: connect, write a few bytes, close with a FIN (or a RST).
pub(crate) fn connection(addr: SocketAddrV4, reset: bool, counts: &Counts) -> io::Result<()> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // A blocking connect() gives up after SO_SNDTIMEO.
    setsockopt(&fd, sockopt::SendTimeout, &timeval(IO_TIMEOUT))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    counts.connected.fetch_add(1, Relaxed);
    let stream = TcpStream::from(fd);
    (&stream).write_all(PAYLOAD)?;
    if reset {
        let abort = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        setsockopt(&stream, sockopt::Linger, &abort)?;
    }
    Ok(()) // dropping the stream closes it
}

pub(crate) fn server(listeners: &[TcpListener], counts: &Counts) {
    let mut client_done_at = None;
    loop {
        let mut accepted = 0;
        for listener in listeners {
            for _ in 0..ACCEPT_BURST {
                let Ok((stream, _)) = listener.accept() else {
                    break;
                };
                counts.accepted.fetch_add(1, Relaxed);
                read_to_end(stream);
                accepted += 1;
            }
        }
        if counts.client_done.load(Relaxed) {
            // Serve what the client connected, but only for so long.
            let since = *client_done_at.get_or_insert_with(Instant::now);
            let all = counts.accepted.load(Relaxed) >= counts.connected.load(Relaxed);
            if all || since.elapsed() > IO_TIMEOUT {
                return;
            }
        }
        if accepted == 0 {
            wait_readable(listeners, Duration::from_millis(10));
        }
    }
}

/// Reads what the client wrote, up to its FIN (or reset), then closes. Bounded by
/// the few bytes sent and the read timeout inherited from the listener.
pub(crate) fn read_to_end(stream: TcpStream) {
    let mut buf = [0; 64];
    for _ in 0..8 {
        match (&stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

pub(crate) fn wait_readable(listeners: &[TcpListener], timeout: Duration) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the whole call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, timeout.as_millis() as _) };
}

/// A connection through a fresh listener, so a tracer has transitions to count.
pub(crate) fn probe_connection() -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    drop(client);
    Ok(())
}
