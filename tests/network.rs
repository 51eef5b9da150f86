//! Traces of connections that cross something real: a delayed link into a network
//! namespace (RTT and handshake times), and a process in a Docker-style cgroup
//! (container id, per-process service name). The real daemon exports over OTLP to a
//! receiver in the test.
mod support;

use std::{
    collections::VecDeque,
    fs,
    hash::{BuildHasher as _, RandomState},
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use support::{
    otlp::{FAST, KIND_CLIENT, KIND_SERVER, ReceivedSpan, Receiver, Value, WAIT, names, trace_of},
    *,
};

fn int_attr(span: &ReceivedSpan, key: &str) -> i64 {
    span.int_attr(key)
        .unwrap_or_else(|| panic!("{} has no int {key}: {:?}", span.name, span.attributes))
}

fn child_named<'a>(children: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    children
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} span among {:?}", names(children)))
}

/// Runs a command to completion; its stdout, or what went wrong.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out: Output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// A child process that is killed and reaped if the test ends before it does.
struct Reaped(Option<Child>);

impl Reaped {
    /// Waits at most `timeout` for the child to exit; its stdout and stderr.
    fn finish(&mut self, timeout: Duration) -> (String, String) {
        let mut child = self.0.take().expect("finished twice");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "child did not exit within {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (text(&out.stdout), text(&out.stderr))
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Accepts one connection within `timeout` (the peer is another process that may
/// have failed: never block forever).
fn accept_within(listener: &TcpListener, timeout: Duration, client: &mut Reaped) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                return stream;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(child) = client.0.as_mut()
            && let Some(status) = child.try_wait().unwrap()
        {
            let out = client.0.take().unwrap().wait_with_output().unwrap();
            panic!(
                "the client exited ({status}) without connecting: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no connection within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Reads the client's line, replies with one after `think`, and closes first.
fn serve_one_line(stream: TcpStream, think: Duration) {
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    assert_eq!(line, "hi\n");
    thread::sleep(think);
    (&stream).write_all(b"hello\n").unwrap();
    drop(stream);
}

// ---------------------------------------------------------------------------
// A delayed link into a network namespace.

/// One-way delay added to every packet the namespace sends.
const DELAY: Duration = Duration::from_millis(20);

/// A network namespace of the test, linked to the root namespace over a /30;
/// dropping it removes the namespace and the links (and stops the delay line).
struct Namespace {
    name: String,
    root_link: String,
    /// Root side, namespace side.
    root_addr: String,
    ns_addr: String,
    /// How the delay is made, for messages.
    delay_by: &'static str,
    delay_line: Option<DelayLine>,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Closing the TUN devices' descriptors removes them.
        drop(self.delay_line.take());
        let _ = run("ip", &["link", "del", &self.root_link]);
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A 10.203.X.0/30 no address on this host is in yet.
fn free_subnet() -> u8 {
    let used = must("ip", &["-4", "-o", "addr", "show"]);
    let pid = std::process::id();
    (0..64u32)
        .map(|i| ((pid + i) % 250) as u8 + 1)
        .find(|x| !used.contains(&format!(" 10.203.{x}.")))
        .expect("no free 10.203.X.0/30 among 64 tried")
}

impl Namespace {
    /// A namespace whose outgoing packets are delayed by `DELAY`: with netem on a
    /// veth pair where the kernel has it, else (no sch_netem) with a delay line in
    /// this process between two TUN devices.
    fn with_delay(tag: &str) -> Namespace {
        run("tc", &["-V"]).unwrap_or_else(|e| panic!("tc (iproute2) is needed: {e}"));
        let pid = std::process::id();
        let x = free_subnet();
        let name = format!("otcs-{tag}-{pid}");
        let mut ns = Namespace {
            name: name.clone(),
            root_link: format!("otcs{pid}r"),
            root_addr: format!("10.203.{x}.1"),
            ns_addr: format!("10.203.{x}.2"),
            delay_by: "netem",
            delay_line: None,
        };
        let ns_link = format!("otcs{pid}n");
        must("ip", &["netns", "add", &name]);
        must("ip", &["-n", &name, "link", "set", "lo", "up"]);

        // veth + netem, as on any kernel with sch_netem.
        must(
            "ip",
            &[
                "link",
                "add",
                &ns.root_link,
                "type",
                "veth",
                "peer",
                "name",
                &ns_link,
                "netns",
                &name,
            ],
        );
        let delay = format!("{}ms", DELAY.as_millis());
        let netem = run(
            "ip",
            &[
                "netns", "exec", &name, "tc", "qdisc", "add", "dev", &ns_link, "root", "netem",
                "delay", &delay,
            ],
        );
        match netem {
            Ok(_) => ns.configure(&ns_link, true),
            Err(e) if e.contains("qdisc kind is unknown") => {
                // CONFIG_NET_SCH_NETEM is not set on this kernel (no module either).
                eprintln!(
                    "sch_netem is unavailable ({e}); delaying the namespace's packets with a \
                     userspace delay line between TUN devices instead"
                );
                must("ip", &["link", "del", &ns.root_link]);
                let line = DelayLine::start(&ns.root_link, &ns_link, DELAY);
                must("ip", &["link", "set", &ns_link, "netns", &name]);
                ns.delay_line = Some(line);
                ns.delay_by = "a TUN delay line (no sch_netem in this kernel)";
                ns.configure(&ns_link, false);
            }
            Err(e) => panic!("cannot add `netem delay {delay}` (sch_netem): {e}"),
        }
        ns
    }

    /// Addresses, links up, and (veth) permanent neighbours, so no ARP exchange
    /// delays the first SYN and inflates the first RTT sample.
    fn configure(&self, ns_link: &str, ethernet: bool) {
        let ns = self.name.as_str();
        let root_cidr = format!("{}/30", self.root_addr);
        let ns_cidr = format!("{}/30", self.ns_addr);
        must("ip", &["addr", "add", &root_cidr, "dev", &self.root_link]);
        must("ip", &["link", "set", &self.root_link, "up"]);
        must("ip", &["-n", ns, "addr", "add", &ns_cidr, "dev", ns_link]);
        must("ip", &["-n", ns, "link", "set", ns_link, "up"]);
        if ethernet {
            let root_mac = fs::read_to_string(format!("/sys/class/net/{}/address", self.root_link))
                .unwrap()
                .trim()
                .to_owned();
            let ns_mac = must(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "cat",
                    &format!("/sys/class/net/{ns_link}/address"),
                ],
            )
            .trim()
            .to_owned();
            must(
                "ip",
                &[
                    "neigh",
                    "replace",
                    &self.ns_addr,
                    "lladdr",
                    &ns_mac,
                    "dev",
                    &self.root_link,
                    "nud",
                    "permanent",
                ],
            );
            must(
                "ip",
                &[
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &self.root_addr,
                    "lladdr",
                    &root_mac,
                    "dev",
                    ns_link,
                    "nud",
                    "permanent",
                ],
            );
        }
    }

    /// `bash -c script` inside the namespace.
    fn bash(&self, script: &str) -> Reaped {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        Reaped(Some(child))
    }
}

/// Two TUN devices (IP packets, no link layer) joined by this process: packets from
/// `root` go to `ns` at once, packets from `ns` are held for `delay` first, as netem
/// on the namespace side's egress would.
struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates TUN device `name` (removed when the returned descriptor closes).
fn tun(name: &str) -> Arc<OwnedFd> {
    // SAFETY: a plain open(2); the descriptor is owned from here on.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name, then the flags (a union padded to 24 bytes).
    let mut ifreq = [0u8; 40];
    assert!(name.len() < 16, "{name} is too long for an interface name");
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which ifreq is sized for.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, ifreq.as_mut_ptr()) };
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    Arc::new(fd)
}

impl DelayLine {
    fn start(root: &str, ns: &str, delay: Duration) -> DelayLine {
        let (root_fd, ns_fd) = (tun(root), tun(ns));
        let stop = Arc::new(AtomicBool::new(false));
        let pump = |from: &Arc<OwnedFd>, to: &Arc<OwnedFd>, delay| {
            let (from, to, stop) = (Arc::clone(from), Arc::clone(to), Arc::clone(&stop));
            thread::spawn(move || pump(from.as_raw_fd(), to.as_raw_fd(), delay, &stop))
        };
        let threads = vec![
            pump(&root_fd, &ns_fd, Duration::ZERO),
            pump(&ns_fd, &root_fd, delay),
        ];
        // The threads hold the descriptors; they close when both threads end.
        DelayLine { stop, threads }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Moves packets from `from` to `to`, each `delay` after it arrived, until `stop`.
fn pump(from: RawFd, to: RawFd, delay: Duration, stop: &AtomicBool) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, packet) = queue.pop_front().unwrap();
            // SAFETY: writes `packet` to a descriptor kept open by the caller.
            // A failed write is a lost packet, which TCP recovers from.
            unsafe { libc::write(to, packet.as_ptr().cast(), packet.len()) };
        }
        let wait = queue
            .front()
            .map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        let mut poll = libc::pollfd {
            fd: from,
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up, so a packet is never sent early.
        let timeout_ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, timeout_ms) } > 0 && poll.revents & libc::POLLIN != 0 {
            // SAFETY: reads at most buf.len() bytes into buf.
            let len = unsafe { libc::read(from, buf.as_mut_ptr().cast(), buf.len()) };
            if len > 0 {
                queue.push_back((Instant::now() + delay, buf[..len as usize].to_vec()));
            }
        }
    }
}

/// A client in a namespace whose packets are delayed 20 ms connects to a server in
/// the root namespace: both sockets' smoothed RTT and handshake states show it.
#[test]
fn rtt_and_handshake_follow_the_network_delay() {
    if !root_or_skip("rtt_and_handshake_follow_the_network_delay") {
        return;
    }
    let started = Instant::now();
    let ns = Namespace::with_delay("rtt");
    let rx = Receiver::start();
    let endpoint = rx.http_endpoint();
    let tracer = Tracer::start_with_env(&["--otlp-endpoint", &endpoint], FAST);

    let listener = TcpListener::bind((ns.root_addr.as_str(), 0)).unwrap();
    let sp = listener.local_addr().unwrap().port();
    let mut client = ns.bash(&format!(
        "exec 3<>/dev/tcp/{}/{sp} && echo hi >&3 && read -t 5 -u 3 line && echo \"$line\"",
        ns.root_addr
    ));
    let server = accept_within(&listener, Duration::from_secs(10), &mut client);
    let cp = server.peer_addr().unwrap().port();
    assert_eq!(server.peer_addr().unwrap().ip().to_string(), ns.ns_addr);
    serve_one_line(server, Duration::ZERO);
    assert_eq!(client.finish(Duration::from_secs(10)).0, "hello\n");

    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, cp, sp).is_some() && trace_of(s, sp, cp).is_some()
    });
    drop(tracer);
    let (client_root, client_children) = trace_of(&spans, cp, sp)
        .unwrap_or_else(|| panic!("no trace of the client {cp}->{sp} in {spans:#?}"));
    let (server_root, server_children) = trace_of(&spans, sp, cp)
        .unwrap_or_else(|| panic!("no trace of the accepted socket {sp}->{cp} in {spans:#?}"));
    assert_eq!(client_root.kind, KIND_CLIENT);
    assert_eq!(server_root.kind, KIND_SERVER);
    assert_eq!(
        client_root.str_attr("network.local.address"),
        Some(ns.ns_addr.as_str())
    );
    assert_eq!(
        server_root.str_attr("network.peer.address"),
        Some(ns.ns_addr.as_str())
    );

    let ms = |span: &ReceivedSpan| span.duration_ns() as f64 / 1e6;
    let client_srtt = int_attr(&client_root, "tcpstates.srtt_us");
    let server_srtt = int_attr(&server_root, "tcpstates.srtt_us");
    let syn_sent = child_named(&client_children, "SYN_SENT");
    let syn_recv = child_named(&server_children, "SYN_RECV");
    eprintln!(
        "delay {DELAY:?} by {}: client srtt {client_srtt} us, SYN_SENT {:.3} ms; \
         server srtt {server_srtt} us, SYN_RECV {:.3} ms; client states {:?}, server states {:?}; \
         test took {:?}",
        ns.delay_by,
        ms(syn_sent),
        ms(syn_recv),
        names(&client_children),
        names(&server_children),
        started.elapsed()
    );

    let delay_ns = DELAY.as_nanos() as u64;
    for (side, srtt) in [("client", client_srtt), ("server", server_srtt)] {
        assert!(
            (18_000..=40_000).contains(&srtt),
            "{side} srtt {srtt} us is not near the {DELAY:?} delay ({})",
            ns.delay_by
        );
    }
    assert!(
        (delay_ns..100_000_000).contains(&syn_sent.duration_ns()),
        "the client's SYN_SENT lasted {:.3} ms, not one {DELAY:?} RTT ({})",
        ms(syn_sent),
        ns.delay_by
    );
    // The accepted socket does not wait for the final ACK in SYN_RECV: until then
    // the connection is a request sock (TCP_NEW_SYN_RECV, which the tracepoint does
    // not report), and the kernel creates the socket, already in SYN_RECV, when that
    // ACK arrives, then makes it ESTABLISHED at once. So the server's handshake RTT
    // shows in its srtt (measured SYN-ACK to ACK), not in SYN_RECV's duration.
    assert!(
        syn_recv.duration_ns() < delay_ns,
        "the accepted socket's SYN_RECV lasted {:.3} ms: does the kernel now create it \
         at the SYN? ({})",
        ms(syn_recv),
        ns.delay_by
    );
    assert_eq!(names(&server_children)[..2], ["SYN_RECV", "ESTABLISHED"]);
    assert_eq!(names(&client_children)[..2], ["SYN_SENT", "ESTABLISHED"]);
}

// ---------------------------------------------------------------------------
// A process in a Docker-style cgroup.

/// A cgroup the test made; removed when dropped (once its processes are gone).
struct Cgroup {
    path: String,
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A process that just exited may still be counted for a moment.
        for _ in 0..50 {
            match fs::remove_dir(&self.path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    thread::sleep(Duration::from_millis(20))
                }
                _ => return,
            }
        }
        eprintln!("could not remove cgroup {}", self.path);
    }
}

/// 64 lowercase hex digits, different per run.
fn container_hex() -> String {
    let seed = (
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    let state = RandomState::new();
    (0..4u8)
        .map(|i| format!("{:016x}", state.hash_one((i, seed))))
        .collect()
}

/// A process that moves itself into `docker-<id>.scope` and connects is exported
/// with that container id and under its own service name; the test's own accepted
/// socket is not in a container and belongs to the test.
#[test]
fn owner_container_is_the_cgroups_container_id() {
    if !root_or_skip("owner_container_is_the_cgroups_container_id") {
        return;
    }
    let started = Instant::now();
    let id = container_hex();
    let cgroup = Cgroup {
        path: format!("{}/docker-{id}.scope", cgroup2_mount()),
    };
    fs::create_dir(&cgroup.path)
        .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", cgroup.path));

    let rx = Receiver::start();
    let endpoint = rx.http_endpoint();
    let tracer = Tracer::start_with_env(
        &["--otlp-endpoint", &endpoint, "--service-per-process"],
        FAST,
    );
    // Made after the tracer started, so it knows the listener's (and the accepted
    // socket's) owner: this thread, which also accepts and closes.
    let (listener, server) = listen("127.0.0.1");
    let comm = thread_comm();
    let sp = server.port();
    let procs = format!("{}/cgroup.procs", cgroup.path);
    let mut client = Reaped(Some(
        Command::new("bash")
            .args([
                "-c",
                "echo $$ > \"$1\" && exec 3<>\"/dev/tcp/127.0.0.1/$2\" && echo hi >&3 \
                 && read -t 5 -u 3 line && echo \"$line\" && cat /proc/self/cgroup >&2",
                "bash",
                &procs,
                &sp.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bash"),
    ));
    let child_pid = client.0.as_ref().unwrap().id();
    let accepted = accept_within(&listener, Duration::from_secs(10), &mut client);
    let cp = accepted.peer_addr().unwrap().port();
    // Answer at once: the child exits right away, most likely before the daemon
    // handles its connect. Its container is found by the cgroup id the kernel
    // reported, whose directory outlives the process.
    serve_one_line(accepted, Duration::ZERO);
    let (reply, child_cgroups) = client.finish(Duration::from_secs(10));
    assert_eq!(reply, "hello\n");

    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, cp, sp).is_some() && trace_of(s, sp, cp).is_some()
    });
    drop(tracer);
    drop(listener);
    let service = |s: &ReceivedSpan| s.resource.get("service.name").cloned();

    let (root, children) = trace_of(&spans, cp, sp)
        .unwrap_or_else(|| panic!("no trace of the child's socket {cp}->{sp} in {spans:#?}"));
    eprintln!(
        "child {child_pid} in docker-{id}.scope: root {:?}, resource {:?}; took {:?}",
        root.attributes,
        root.resource,
        started.elapsed()
    );
    assert_eq!(root.kind, KIND_CLIENT);
    // The container is the resource's, so the Collector's k8s_attributes can find
    // the pod by it; the span itself does not repeat it.
    assert_eq!(
        root.resource.get("container.id"),
        Some(&Value::Str(id.clone())),
        "the child's /proc/self/cgroup:\n{child_cgroups}resource: {:?}",
        root.resource
    );
    assert_eq!(root.attr("container.id"), None, "{:?}", root.attributes);
    assert_eq!(root.str_attr("process.executable.name"), Some("bash"));
    assert_eq!(root.int_attr("process.pid"), Some(i64::from(child_pid)));
    for span in std::iter::once(&root).chain(&children) {
        assert_eq!(
            service(span),
            Some(Value::Str("bash".into())),
            "{}",
            span.name
        );
        assert!(
            !span
                .attributes
                .keys()
                .any(|k| k.starts_with("otel_tcpstates.")),
            "internal attribute exported: {:?}",
            span.attributes
        );
    }

    let (root, children) = trace_of(&spans, sp, cp)
        .unwrap_or_else(|| panic!("no trace of the accepted socket {sp}->{cp} in {spans:#?}"));
    assert_eq!(root.kind, KIND_SERVER);
    assert_eq!(
        root.resource.get("container.id"),
        None,
        "{:?}",
        root.resource
    );
    assert_eq!(
        root.int_attr("process.pid"),
        Some(i64::from(std::process::id()))
    );
    assert_eq!(
        root.str_attr("process.executable.name"),
        Some(comm.as_str())
    );
    for span in std::iter::once(&root).chain(&children) {
        assert_eq!(
            service(span),
            Some(Value::Str(comm.clone())),
            "{}",
            span.name
        );
    }
}
