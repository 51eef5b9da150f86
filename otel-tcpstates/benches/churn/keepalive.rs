//! The keep-alive memory run (issue 28): the daemon run as the DaemonSet runs it
//! (its flags and environment, read from deploy/kubernetes), many keep-alive
//! connections open at once, each carrying many HTTP/1.1 requests with distinct
//! `traceparent`s and ending in a reset, while the collector accepts and never
//! answers (the export queue fills). Its peak RSS against the DaemonSet's memory
//! limit.
use super::*;

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/otel-tcpstates.yaml"
);
pub(crate) const KEEPALIVE_CHILD_ARG: &str = "--keepalive-child";
/// Connections per listener port: ephemeral ports are unique per destination.
const PER_PORT: usize = 16_384;
/// A child that is never told to go on exits by itself after this.
const CHILD_LIFETIME: Duration = Duration::from_secs(1800);
/// Each phase of the children (connect, requests, close) must end in this.
const PHASE_TIMEOUT: Duration = Duration::from_secs(900);
/// Time for the daemon to take in what the kernel has queued, and for the stalled
/// export requests to time out and retry, before the last sample.
const SETTLE_AFTER_CLOSE: Duration = Duration::from_secs(12);
const RESPONSE: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";

/// The daemon's flags, environment and memory limit, as the DaemonSet gives them.
struct Deployed {
    args: Vec<String>,
    env: Vec<(String, String)>,
    limit_mib: f64,
}

fn deployed() -> Result<Deployed> {
    let text = fs::read_to_string(MANIFEST).with_context(|| format!("reading {MANIFEST}"))?;
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {MANIFEST}"))?;
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet in the manifest")?;
    let container = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "otel-tcpstates"))
        .context("no otel-tcpstates container in the DaemonSet")?;
    let args = container["args"]
        .as_array()
        .context("the container has no args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    // Literal values only: those from the downward API name the node, which the
    // bench has no use for.
    let env = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_owned(),
                v["value"].as_str()?.to_owned(),
            ))
        })
        .filter(|(_, value)| !value.contains("$("))
        .collect();
    let limit = container["resources"]["limits"]["memory"]
        .as_str()
        .context("the container has no memory limit")?;
    let limit_mib = match limit.strip_suffix("Mi") {
        Some(n) => n.parse::<f64>()?,
        None => match limit.strip_suffix("Gi") {
            Some(n) => n.parse::<f64>()? * 1024.0,
            None => bail!("memory limit {limit:?}: only Mi and Gi are read"),
        },
    };
    Ok(Deployed {
        args,
        env,
        limit_mib,
    })
}

/// A collector that accepts connections and never reads or answers them: every
/// export request waits for its timeout, and the export queue fills.
struct StalledCollector {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl StalledCollector {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop2, accepted2) = (Arc::clone(&stop), Arc::clone(&accepted));
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            while !stop2.load(Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted2.fetch_add(1, Relaxed);
                        held.push(stream);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            addr,
            stop,
            accepted,
            thread: Some(thread),
        })
    }
}

impl Drop for StalledCollector {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The request of connection `conn`, round `round`: a fixed length, and a
/// `traceparent` no other request carries.
fn request(child: u64, conn: u64, round: u64) -> Vec<u8> {
    format!(
        "GET /r HTTP/1.1\r\nHost: bench\r\ntraceparent: 00-{child:08x}{conn:012x}{round:012x}-{:016x}-01\r\n\r\n",
        (child << 48 | conn << 16 | round) + 1
    )
    .into_bytes()
}

/// Child side: `n` keep-alive connections (both ends), then, on each line its
/// parent writes, the next phase: `requests` (each connection carries `rounds`
/// requests, each answered), `close` (each client closes with the answers unread:
/// a reset). Says `ready` after each phase.
pub(crate) fn keepalive_child(id: u64, n: usize, rounds: u64) -> Result<()> {
    thread::spawn(|| {
        thread::sleep(CHILD_LIFETIME);
        std::process::exit(3);
    });
    raise_nofile()?;
    let ports = n.div_ceil(PER_PORT).max(1);
    let listeners = (0..ports)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let listener = &listeners[i % ports];
        let client = TcpStream::connect(listener.local_addr()?)?;
        client.set_nodelay(true)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        conns.push((client, server));
    }
    let say = |what: &str| -> Result<()> {
        println!("{what}");
        io::stdout().flush()?;
        Ok(())
    };
    say("ready")?;
    let mut stdin = BufReader::new(io::stdin());
    let mut line = String::new();
    let mut next = || -> Result<String> {
        line.clear();
        stdin.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    };
    ensure!(next()? == "requests", "expected `requests`");
    let mut buf = Vec::new();
    for round in 0..rounds {
        for (conn, (client, server)) in conns.iter_mut().enumerate() {
            let req = request(id, conn as u64, round);
            client.write_all(&req)?;
            buf.resize(req.len(), 0);
            server.read_exact(&mut buf)?;
            server.write_all(RESPONSE)?;
        }
    }
    say("ready")?;
    ensure!(next()? == "close", "expected `close`");
    for (client, server) in conns {
        drop(client);
        drop(server);
    }
    say("ready")?;
    Ok(())
}

/// The children, each holding a share of the connections (RLIMIT_NOFILE may be
/// capped below what one process needs).
struct Children {
    children: Vec<(Child, Option<ChildStdin>)>,
    ready: mpsc::Receiver<String>,
}

impl Children {
    fn start(connections: u64, rounds: u64) -> Result<Children> {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        let per_child = (hard.saturating_sub(64) / 2).clamp(1, 16_384);
        let (ready_tx, ready) = mpsc::channel();
        let mut children = Vec::new();
        let mut left = connections;
        let mut id = 0u64;
        while left > 0 {
            let n = left.min(per_child);
            let mut child = Command::new(std::env::current_exe()?)
                .args([KEEPALIVE_CHILD_ARG, &id.to_string(), &n.to_string()])
                .arg(rounds.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .die_with_parent()
                .spawn()
                .context("spawning a keep-alive child")?;
            let stdout = child.stdout.take().context("child stdout")?;
            let ready = ready_tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = ready.send(line);
                }
            });
            let stdin = child.stdin.take();
            children.push((child, stdin));
            left -= n;
            id += 1;
        }
        let mut children = Children { children, ready };
        children.wait_ready(|| Ok(()))?;
        Ok(children)
    }

    /// Waits until every child said `ready`, calling `meanwhile` every 100 ms.
    fn wait_ready(&mut self, mut meanwhile: impl FnMut() -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + PHASE_TIMEOUT;
        let mut left = self.children.len();
        while left > 0 {
            ensure!(
                Instant::now() < deadline,
                "a keep-alive child did not finish in time"
            );
            match self.ready.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line == "ready" => left -= 1,
                Ok(line) => bail!("a keep-alive child said {line:?}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("a keep-alive child failed"),
            }
            meanwhile()?;
        }
        Ok(())
    }

    fn tell(&mut self, what: &str) -> Result<()> {
        for (_, stdin) in &mut self.children {
            let stdin = stdin.as_mut().context("child stdin closed")?;
            writeln!(stdin, "{what}")?;
            stdin.flush()?;
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, stdin) in &mut self.children {
            stdin.take();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (child, _) in &mut self.children {
            wait_or_kill(child, deadline);
        }
    }
}

/// The last line on stderr that contains `what`.
fn last_line<'a>(stderr: &'a [String], what: &str) -> Option<&'a str> {
    stderr
        .iter()
        .rev()
        .find(|l| l.contains(what))
        .map(String::as_str)
}

pub(crate) fn run(opts: &Options) -> Result<()> {
    let deployed = deployed()?;
    let collector = StalledCollector::start()?;
    let endpoint = format!("http://{}", collector.addr);
    let env: Vec<(String, String)> = deployed
        .env
        .iter()
        .cloned()
        .map(|(k, v)| match k.as_str() {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => (k, endpoint.clone()),
            _ => (k, v),
        })
        .collect();
    // The stats line every 5 s, for the links seen and lost.
    let args = [
        &deployed.args[..],
        &["--stats-interval".to_owned(), "5".to_owned()],
    ]
    .concat();
    let daemon = opts.daemon.as_deref().unwrap_or(DAEMON);
    eprintln!("[churn] keep-alive memory: {daemon} {}", args.join(" "));
    let tracer = Tracer::start_env(
        daemon,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &env,
        DAEMON_PROG,
    )?;
    let pid = tracer.pid();
    let mut samples = Samples::new(&tracer);
    samples.take("started", 0)?;
    let conns = opts.keepalive_connections;
    let rounds = opts.keepalive_requests;
    let sockets = 2 * conns;
    let started = Instant::now();
    let mut children = Children::start(conns, rounds)?;
    let connect_s = started.elapsed().as_secs_f64();
    thread::sleep(SETTLE);
    samples.take(&format!("{conns} connections open"), sockets)?;

    let started = Instant::now();
    children.tell("requests")?;
    let mut highest = 0.0f64;
    children.wait_ready(|| {
        highest = highest.max(vm_mib(pid, "VmRSS:")?);
        Ok(())
    })?;
    let requests_s = started.elapsed().as_secs_f64();
    thread::sleep(SETTLE);
    samples.take(&format!("{rounds} requests on each"), sockets)?;

    children.tell("close")?;
    children.wait_ready(|| Ok(()))?;
    drop(children);
    thread::sleep(SETTLE_AFTER_CLOSE);
    samples.take("all closed (reset), collector stalled", sockets)?;
    let running_peak = vm_mib(pid, "VmHWM:")?;
    let stats = last_line(&tracer.stderr_so_far(), "stats:").map(str::to_owned);
    let samples = samples.done();

    // The shutdown makes the open sessions' spans too: its peak counts as well.
    let mut peak = running_peak;
    let stopping = thread::spawn(move || tracer.stop());
    while !stopping.is_finished() {
        if let Ok(hwm) = vm_mib(pid, "VmHWM:") {
            peak = peak.max(hwm);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let exited = stopping
        .join()
        .map_err(|_| anyhow::anyhow!("stopping panicked"))??;

    println!(
        "\nKeep-alive memory run: the DaemonSet's flags and environment ({}), the collector \
         accepting and never answering ({} connections from the daemon)",
        args.join(" "),
        collector.accepted.load(Relaxed)
    );
    println!(
        "{conns} keep-alive connections ({sockets} sockets) opened in {connect_s:.1} s, \
         {rounds} requests each with distinct traceparents in {requests_s:.1} s \
         ({:.0} requests/s), then closed with a reset",
        (conns * rounds) as f64 / requests_s
    );
    println!("daemon: {daemon}");
    print_samples(&samples);
    println!("highest RSS sampled while the requests ran: {highest:.1} MiB");
    println!(
        "peak RSS (VmHWM) {running_peak:.1} MiB running, {peak:.1} MiB with the shutdown; \
         {:.2} of the DaemonSet's {:.0} MiB limit (the BPF maps, ~13 MiB, are charged on top)",
        peak / deployed.limit_mib,
        deployed.limit_mib
    );
    if let Some(stats) = stats {
        println!("last {}", stats.trim());
    }
    for line in exited
        .stderr
        .iter()
        .filter(|l| {
            l.contains("sockets traced") || l.contains("lost in total") || l.contains("links")
        })
        .filter(|l| !l.contains("stats:"))
    {
        println!("exit: {}", line.trim());
    }
    for note in exited.problems() {
        println!("daemon: {note}");
    }
    Ok(())
}
