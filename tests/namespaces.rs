//! Sockets in network namespaces of their own, as pods on one node have: two
//! servers listen on the same port, each in its namespace, and every connection
//! one accepts must name that server as its owner, in spans and for `-p`.
mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpStream},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use support::{
    load::abort_on_close,
    netns::Netns,
    otlp::{Receiver, WAIT, server_roots},
    *,
};

/// A server that listens when told and never accepts: what it owns is only
/// ever acted on by the kernel (in softirq, on whatever task the CPU was running).
const SERVER: &str = r#"
import os, socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
print(os.getpid(), flush=True)
sys.stdin.readline()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(128)
print("listening", flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
sys.stdin.readline()
"#;

/// A python3 server in a namespace, driven line by line over its stdin.
struct Server {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    pid: u32,
}

impl Server {
    fn start(ns: &Netns, addr: Ipv4Addr, port: u16) -> Server {
        let mut child = ns
            .command("python3")
            .args(["-c", SERVER, &addr.to_string(), &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/setup.sh --test installs it)");
        let stdin = child.stdin.take().unwrap();
        let stdout: ChildStdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            stdin,
            lines,
            pid: 0,
        };
        server.pid = server.next_line("its pid").parse().unwrap();
        server
    }

    fn next_line(&mut self, what: &str) -> String {
        // Python starting on a busy machine: a liveness bound, not a measurement.
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server {} printed no {what}", self.child.id()))
    }

    /// Tells the server to take its next step and waits until it has.
    fn step(&mut self, done: &str) {
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        assert_eq!(self.next_line(done), done);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/proc/net/tcp`'s spelling of an IPv4 address and port.
fn proc_net(addr: Ipv4Addr, port: u16) -> String {
    format!("{:08X}:{port:04X}", u32::from_ne_bytes(addr.octets()))
}

/// From inside `ns`: connects to `addr:port`, waits until the server's end is
/// established (queued, never accepted), then resets it (SO_LINGER 0 close).
/// The server's socket goes ESTABLISHED -> CLOSE in softirq, its owner never
/// having touched it. Returns the client's port.
fn connect_and_reset(ns: &Netns, addr: Ipv4Addr, port: u16) -> u16 {
    ns.run(move || {
        let client = TcpStream::connect((addr, port)).unwrap();
        let local = client.local_addr().unwrap();
        let std::net::IpAddr::V4(local_ip) = local.ip() else {
            unreachable!()
        };
        let server_end = format!(
            "{} {} 01",
            proc_net(addr, port),
            proc_net(local_ip, local.port())
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        // This thread's namespace's sockets.
        while !std::fs::read_to_string("/proc/thread-self/net/tcp")
            .unwrap()
            .contains(&server_end)
        {
            assert!(
                Instant::now() < deadline,
                "the server end never established"
            );
            thread::sleep(Duration::from_millis(2));
        }
        abort_on_close(&client);
        drop(client);
        local.port()
    })
}

/// Two namespaces, a server in each on the same port; clients in each connect
/// and reset; then one server closes its listener and the other's clients go on.
/// Every server-side root names its own namespace's server, and `-p` shows each
/// server its own sockets only.
#[test]
fn listeners_on_one_port_in_two_namespaces_keep_their_own_connections() {
    if !root_or_skip("listeners_on_one_port_in_two_namespaces_keep_their_own_connections") {
        return;
    }
    const EACH: usize = 5;
    let (a, b) = (Netns::new("netns-a"), Netns::new("netns-b"));
    // Different loopback addresses tell the namespaces apart in what the tracer
    // reports; the port, which the listeners' keys are about, is the same.
    let (addr_a, addr_b) = (Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2));
    let port = 12_000 + (std::process::id() % 8000) as u16;
    let mut server_a = Server::start(&a, addr_a, port);
    let mut server_b = Server::start(&b, addr_b, port);

    let rx = Receiver::start();
    let tracer = Tracer::exporting_to(&rx, &[]);
    let only = |pid: u32| Tracer::start(&["-s", "-p", &pid.to_string()]);
    let (only_a, only_b) = (only(server_a.pid), only(server_b.pid));

    // B listens last: before namespaces were told apart, its listen() won.
    server_a.step("listening");
    server_b.step("listening");
    let mut clients = Vec::new();
    for _ in 0..EACH {
        clients.push((
            connect_and_reset(&a, addr_a, port),
            addr_a,
            "both listening",
        ));
        clients.push((
            connect_and_reset(&b, addr_b, port),
            addr_b,
            "both listening",
        ));
    }
    server_b.step("closed");
    for _ in 0..EACH {
        clients.push((connect_and_reset(&a, addr_a, port), addr_a, "B closed"));
    }

    let spans = rx.wait_for(WAIT, |s| server_roots(s, port).len() >= clients.len());
    let roots = server_roots(&spans, port);
    assert_eq!(roots.len(), clients.len(), "server roots: {roots:#?}");
    let mut wrong = Vec::new();
    let mut by_phase: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for &(client_port, addr, phase) in &clients {
        // Each namespace has its ports of its own: clients in both may get one.
        let root = roots
            .iter()
            .find(|r| {
                r.int_attr("network.peer.port") == Some(i64::from(client_port))
                    && r.str_attr("network.local.address") == Some(addr.to_string().as_str())
            })
            .unwrap_or_else(|| panic!("no server root for {addr}:{port} <- :{client_port}"));
        let want = if addr == addr_a {
            server_a.pid
        } else {
            server_b.pid
        };
        let got = root.int_attr("process.pid");
        let tally = by_phase.entry(phase).or_default();
        tally.1 += 1;
        if got != Some(i64::from(want)) {
            tally.0 += 1;
            wrong.push(format!(
                "{addr}:{port} <- :{client_port} ({phase}): process.pid {got:?}, its server is {want}"
            ));
        }
    }
    eprintln!(
        "server roots with the wrong owner: {} of {} (wrong/all by phase: {by_phase:?}); A is {}, B is {}",
        wrong.len(),
        roots.len(),
        server_a.pid,
        server_b.pid
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // `-p`: each server's own sockets, all of them, and nothing of the other's.
    for (daemon, pid, addr, accepted) in [
        (only_a, server_a.pid, addr_a, 2 * EACH),
        (only_b, server_b.pid, addr_b, EACH),
    ] {
        let done = daemon.stop();
        assert!(done.status.success(), "{:?}", done.stderr);
        let rows = rows(&done.lines, false);
        let foreign: Vec<&Row> = rows
            .iter()
            .filter(|r| r.laddr != addr.to_string() || r.lport != port)
            .collect();
        assert!(foreign.is_empty(), "-p {pid} showed {foreign:#?}");
        let resets = rows
            .iter()
            .filter(|r| r.transition() == ("ESTABLISHED", "CLOSE"))
            .count();
        assert_eq!(resets, accepted, "-p {pid}: {rows:#?}");
        assert_eq!(
            rows.iter()
                .filter(|r| r.transition() == ("CLOSE", "LISTEN"))
                .count(),
            1,
            "-p {pid}: {rows:#?}"
        );
    }
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
}
