//! Holding many connections open at once. RLIMIT_NOFILE may be capped below what
//! 65536 sockets need (and not raisable without CAP_SYS_RESOURCE), so child
//! processes (this binary again, with `--hold-child N`) each hold a share.
use super::*;

pub(crate) const FLOOR_CHILD_ARG: &str = "--floor-child";

/// Child side of [`Tracer::floor`]: loads and attaches the floor program, then holds
/// it until SIGINT or SIGTERM.
pub(crate) fn floor_child() -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, sigprocmask};
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)?;
    ensure!(
        !FLOOR_OBJECT.is_empty(),
        "built with AYA_BUILD_SKIP: no floor program"
    );
    let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT).context("loading the floor program")?;
    let program: &mut aya::programs::TracePoint = ebpf
        .program_mut(FLOOR_PROG)
        .context("no floor program in the object")?
        .try_into()?;
    program.load()?;
    program.attach("sock", "inet_sock_set_state")?;
    signals.wait()?;
    Ok(())
}

/// User + system CPU seconds of this process's threads named `name`.
pub(crate) fn thread_cpu_seconds(name: &str) -> Result<f64> {
    let mut total = 0.0;
    for task in fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        if fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim() == name) {
            let tid = task
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let (user, system) = cpu_seconds(&format!("self/task/{tid}"))?;
            total += user + system;
        }
    }
    Ok(total)
}

pub(crate) const HOLD_CHILD_ARG: &str = "--hold-child";
/// A holder that is never released exits by itself after this.
pub(crate) const HOLD_CHILD_LIFETIME: Duration = Duration::from_secs(300);
pub(crate) const HOLD_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Child side: `n` connections to its own listener, both ends held until stdin closes.
pub(crate) fn hold_child(n: usize) -> Result<()> {
    thread::spawn(|| {
        thread::sleep(HOLD_CHILD_LIFETIME);
        std::process::exit(3);
    });
    raise_nofile()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let mut held = Vec::with_capacity(2 * n);
    for _ in 0..n {
        held.push(TcpStream::connect(addr)?);
        held.push(listener.accept()?.0);
    }
    println!("ready");
    io::stdout().flush()?;
    // Hold until the parent closes our stdin (or dies).
    let _ = io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

pub(crate) struct Holders(Vec<(Child, Option<ChildStdin>)>);

impl Holders {
    /// Spawns enough holders for `connections`, waiting until all are held.
    pub(crate) fn start(connections: u64) -> Result<Holders> {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        // Two fds per connection, and a few for the holder itself.
        let per_child = (hard.saturating_sub(64) / 2).clamp(1, 8192);
        let mut holders = Holders(Vec::new());
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut left = connections;
        while left > 0 {
            let n = left.min(per_child);
            let mut child = Command::new(std::env::current_exe()?)
                .args([HOLD_CHILD_ARG, &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .die_with_parent()
                .spawn()
                .context("spawning a connection holder")?;
            let stdout = child.stdout.take().context("holder stdout")?;
            let stdin = child.stdin.take();
            holders.0.push((child, stdin));
            let ready = ready_tx.clone();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = ready.send(line);
            });
            left -= n;
        }
        let deadline = Instant::now() + HOLD_READY_TIMEOUT;
        for _ in 0..holders.0.len() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = ready_rx
                .recv_timeout(wait)
                .context("a connection holder did not get ready in time")?;
            ensure!(line.trim() == "ready", "a connection holder failed");
        }
        Ok(holders)
    }

    /// Closes every held connection: holders exit when their stdin closes.
    pub(crate) fn release(mut self) {
        self.stop();
    }

    pub(crate) fn stop(&mut self) {
        for (_, stdin) in &mut self.0 {
            stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (child, _) in &mut self.0 {
            wait_or_kill(child, deadline);
        }
        self.0.clear();
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn wait_or_kill(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn raise_nofile() -> Result<()> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

pub(crate) trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    /// SIGTERM to the child should this process die: no tracer or holder outlives
    /// a killed benchmark.
    fn die_with_parent(&mut self) -> &mut Self {
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}
