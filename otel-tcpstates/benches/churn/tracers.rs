//! Starting and stopping each tracer (ours, libbpf-tools', the floor program) and
//! reading what it reports.
use super::*;

pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// Our daemon may spend --shutdown-timeout (30 s) flushing; then some slack.
pub(crate) const EXIT_TIMEOUT: Duration = Duration::from_secs(45);

pub(crate) struct Tracer {
    pub(crate) child: Child,
    pub(crate) stderr: Arc<Mutex<Vec<String>>>,
    pub(crate) stderr_reader: Option<JoinHandle<()>>,
    pub(crate) prog_id: u64,
}

pub(crate) struct Exited {
    /// None: it had to be killed.
    pub(crate) status: Option<ExitStatus>,
    pub(crate) took: Duration,
    pub(crate) stderr: Vec<String>,
}

impl Tracer {
    pub(crate) fn daemon(args: &[String]) -> Result<Tracer> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Tracer::start(DAEMON, &args, DAEMON_PROG)
    }

    pub(crate) fn libbpf() -> Result<Tracer> {
        Tracer::start(LIBBPF_TCPSTATES, &[], LIBBPF_PROG)
    }

    /// This benchmark itself, loading the floor program (see [`floor_child`]).
    pub(crate) fn floor() -> Result<Tracer> {
        let me = std::env::current_exe().context("finding the benchmark's own binary")?;
        let me = me.to_str().context("non-UTF-8 benchmark path")?;
        Tracer::start(me, &[FLOOR_CHILD_ARG], FLOOR_PROG)
    }

    /// Starts `program` with stdout to /dev/null; returns once its BPF program runs.
    pub(crate) fn start(program: &str, args: &[&str], prog_name: &str) -> Result<Tracer> {
        Tracer::start_env(program, args, &[], prog_name)
    }

    /// [`Tracer::start`] with `env` set (after every `OTEL_*` of ours is removed).
    pub(crate) fn start_env(
        program: &str,
        args: &[&str],
        env: &[(String, String)],
        prog_name: &str,
    ) -> Result<Tracer> {
        let before: HashSet<u64> = tracepoint_progs()?.iter().map(|p| p.id).collect();
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create("/dev/null")?)
            .stderr(Stdio::piped())
            .die_with_parent();
        // Only the flags given here decide where spans go.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().context("tracer stderr")?;
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut tracer = Tracer {
            child,
            stderr,
            stderr_reader: Some(stderr_reader),
            prog_id: 0,
        };
        tracer.prog_id = tracer.wait_attached(prog_name, &before)?;
        Ok(tracer)
    }

    /// The tracer's program once it runs: one of that name that was not there
    /// before, whose run count moves when we connect (statistics are on).
    pub(crate) fn wait_attached(&mut self, name: &str, before: &HashSet<u64>) -> Result<u64> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "tracer exited with {status} before attaching: {:?}",
                    self.stderr.lock().unwrap()
                );
            }
            let progs = tracepoint_progs()?;
            let ours = progs
                .iter()
                .find(|p| p.name == name && !before.contains(&p.id));
            if let Some(prog) = ours
                && prog.stats.run_cnt > 0
            {
                return Ok(prog.id);
            }
            probe_connection()?;
            thread::sleep(Duration::from_millis(50));
        }
        bail!("tracer's program {name} did not run within {ATTACH_TIMEOUT:?}")
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error, with what it said, if the tracer has exited.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "tracer exited with {status} during the run: {:?}",
                self.stderr_so_far()
            );
        }
        Ok(())
    }

    pub(crate) fn stderr_so_far(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGINT, then waits for the exit, killing it after [`EXIT_TIMEOUT`].
    pub(crate) fn stop(mut self) -> Result<Exited> {
        let started = Instant::now();
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGINT)?;
        let status = wait_or_kill(&mut self.child, started + EXIT_TIMEOUT);
        let took = started.elapsed();
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join(); // the pipe is closed: it has exited
        }
        let stderr = std::mem::take(&mut *self.stderr.lock().unwrap());
        Ok(Exited {
            status,
            took,
            stderr,
        })
    }
}

impl Exited {
    /// What went wrong, if anything: warnings, a bad exit, no summary.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut notes = warnings(&self.stderr);
        match self.status {
            Some(status) if status.success() => {}
            Some(status) => notes.push(format!("tracer exited with {status}")),
            None => notes.push(format!("tracer killed after {EXIT_TIMEOUT:?}")),
        }
        let ours = self.stderr.iter().any(|l| l.contains("exporting traces"));
        if ours && summary(&self.stderr).is_none() {
            notes.push("no exit summary on stderr".into());
        }
        notes
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The unsigned integers in a line, in order.
pub(crate) fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Events the tracer reported lost on stderr.
pub(crate) fn lost_events(stderr: &[String]) -> u64 {
    // Ours: "N events lost in total (...)" at exit (also "N events lost (...)"
    // while running, which the total includes). libbpf-tools: "lost N events on CPU #C".
    if let Some(total) = stderr.iter().find(|l| l.contains("events lost in total")) {
        return numbers(total).first().copied().unwrap_or(0);
    }
    stderr
        .iter()
        .filter(|l| l.contains("events lost") || l.starts_with("lost "))
        .filter_map(|l| numbers(l).first().copied())
        .sum()
}

/// The tracer's warnings and errors, only the first of each kind and at most a
/// few (a tracer losing events may say so every second).
pub(crate) fn warnings(stderr: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    stderr
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("warn") || l.contains("error") || l.starts_with("lost ")
        })
        .map(|l| l.trim().to_owned())
        // Kinds differ in their words, not their numbers.
        .filter(|l| seen.insert(l.replace(|c: char| c.is_ascii_digit(), "")))
        .take(3)
        .collect()
}

/// Our daemon's exit summary: "S sockets traced (E evicted, R replaced, O open
/// at exit), N spans: X exported, F failed, D dropped (export queue full), C cut
/// off by the shutdown deadline[; U incident records …]"; `not_sent` is D + C.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Summary {
    pub(crate) sockets: u64,
    pub(crate) evicted: u64,
    pub(crate) produced: u64,
    pub(crate) exported: u64,
    pub(crate) failed: u64,
    pub(crate) not_sent: u64,
}

pub(crate) fn summary(stderr: &[String]) -> Option<Summary> {
    let line = stderr.iter().find(|l| l.contains("sockets traced"))?;
    let n = numbers(line);
    (n.len() >= 9).then(|| Summary {
        sockets: n[0],
        evicted: n[1],
        produced: n[4],
        exported: n[5],
        failed: n[6],
        not_sent: n[7] + n[8],
    })
}
