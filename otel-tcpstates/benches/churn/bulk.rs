//! A bulk transfer over one loopback TCP connection: a client thread writes as fast
//! as it can, a server thread reads and discards. Almost no socket events, but every
//! segment passes the daemon's packet programs twice (egress and ingress).

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

use super::{IO_TIMEOUT, pin_to_cpu};

/// Bytes per write() and per read().
const CHUNK: usize = 256 * 1024;

pub struct Bulk {
    /// Bytes the server has read so far.
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Bulk {
    /// Starts the transfer; it goes on until [`Bulk::stop`]. `pin` puts both threads
    /// on CPU 0, as the churn's (see `Churn::start`): the daemon has the other core.
    pub fn start(pin: bool) -> Result<Bulk> {
        let cpu = pin.then_some(0);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));

        let count = Arc::clone(&received);
        let server = thread::Builder::new()
            .name("bulk-server".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                let stream = accept(&listener)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                let mut buf = vec![0; CHUNK];
                loop {
                    match (&stream).read(&mut buf)? {
                        0 => return Ok(()),
                        n => count.fetch_add(n as u64, Relaxed),
                    };
                }
            })?;
        let done = Arc::clone(&stop);
        let client = thread::Builder::new()
            .name("bulk-client".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                let stream = TcpStream::connect(addr)?;
                stream.set_write_timeout(Some(IO_TIMEOUT))?;
                let buf = vec![0x5a; CHUNK];
                while !done.load(Relaxed) {
                    (&stream).write_all(&buf)?;
                }
                Ok(()) // dropping the stream closes it: the server reads its EOF
            })?;
        Ok(Bulk {
            received,
            stop,
            threads: vec![client, server],
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Relaxed)
    }

    /// Stops both ends; an error if either failed along the way.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.stop.store(true, Relaxed);
        let mut result = Ok(());
        for thread in self.threads.drain(..) {
            let outcome = thread
                .join()
                .map_err(|_| anyhow!("a bulk thread panicked"))
                .and_then(|r| r.map_err(|err| anyhow!("bulk transfer: {err}")));
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }
}

/// The client's connection, or an error after [`IO_TIMEOUT`] (never a hang should
/// the client fail before connecting).
fn accept(listener: &TcpListener) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(err) => return Err(err),
        }
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        let _ = self.join();
    }
}
