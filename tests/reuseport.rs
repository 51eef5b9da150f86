//! Several processes listening on one port with `SO_REUSEPORT` (nginx
//! `reuseport`, Envoy's workers, an HAProxy reload): each accepted connection
//! names the process whose listener accepted it, in spans and for `-p`, as long
//! as any listener of the port lives, also when the connection ends in softirq
//! (the peer resets it) without its owner ever acting on it.
mod support;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use support::{
    load::abort_on_close,
    otlp::{self, ReceivedSpan, Receiver, WAIT},
    *,
};

/// A server that binds with `SO_REUSEPORT`, listens when told, accepts (keeping
/// each connection open, never touching it) and reports each peer port it
/// accepted, and closes its listener when told.
const SERVER: &str = r#"
import os, socket, sys, threading
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", port))
print(os.getpid(), flush=True)
sys.stdin.readline()
s.listen(128)
print("listening", flush=True)
def serve():
    kept = []
    while True:
        try:
            c, peer = s.accept()
        except OSError:
            return
        kept.append(c)
        print("accepted", peer[1], flush=True)
threading.Thread(target=serve, daemon=True).start()
sys.stdin.readline()
# shutdown() wakes the accepting thread; close() alone would leave it listening.
s.shutdown(socket.SHUT_RDWR)
s.close()
print("closed", flush=True)
sys.stdin.readline()
"#;

/// A python3 server, driven line by line over its stdin; the peer ports it
/// accepted, as it reported them.
struct Server {
    child: Child,
    stdin: ChildStdin,
    pid: u32,
    /// Lines other than "accepted PORT", in order.
    said: Arc<Mutex<Vec<String>>>,
    accepted: Arc<Mutex<Vec<u16>>>,
}

impl Server {
    fn start(port: u16) -> Server {
        let mut child = Command::new("python3")
            .args(["-c", SERVER, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 (scripts/setup.sh --test installs it)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let said: Arc<Mutex<Vec<String>>> = Arc::default();
        let accepted: Arc<Mutex<Vec<u16>>> = Arc::default();
        let (s, a) = (Arc::clone(&said), Arc::clone(&accepted));
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix("accepted ") {
                    Some(port) => a.lock().unwrap().push(port.parse().unwrap()),
                    None => s.lock().unwrap().push(line),
                }
            }
        });
        let mut server = Server {
            child,
            stdin,
            pid: 0,
            said,
            accepted,
        };
        server.pid = server.wait_said(0).parse().unwrap();
        server
    }

    /// The `n`th line the server said (0-based), once said.
    fn wait_said(&self, n: usize) -> String {
        // Python starting on a busy machine: a liveness bound, not a measurement.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.said.lock().unwrap().get(n) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "server {} said no line {n}",
                self.pid
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tells the server to take its next step (its `n`th line) and waits until
    /// it has.
    fn step(&mut self, n: usize, done: &str) {
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        assert_eq!(self.wait_said(n), done);
    }

    fn accepted(&self, port: u16) -> bool {
        self.accepted.lock().unwrap().contains(&port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to `port`, waits until one of `servers` accepted the connection,
/// then resets it (SO_LINGER 0 close): the server's socket goes ESTABLISHED ->
/// CLOSE in softirq, its owner never having acted on it. Returns the client's
/// port and the pid of the server that accepted it.
fn connect_and_reset(port: u16, servers: &[&Server]) -> (u16, u32) {
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let local = client.local_addr().unwrap().port();
    let deadline = Instant::now() + Duration::from_secs(30);
    let by = loop {
        if let Some(server) = servers.iter().find(|s| s.accepted(local)) {
            break server.pid;
        }
        assert!(Instant::now() < deadline, "no server accepted :{local}");
        thread::sleep(Duration::from_millis(2));
    };
    abort_on_close(&client);
    drop(client);
    (local, by)
}

/// The server ends on `port` in `spans`, by peer port.
fn server_roots(spans: &[ReceivedSpan], port: u16) -> BTreeMap<u16, &ReceivedSpan> {
    otlp::server_roots(spans, port)
        .into_iter()
        .filter_map(|s| Some((s.int_attr("network.peer.port")? as u16, s)))
        .collect()
}

/// Of `clients` (peer port, the pid that accepted it): those whose server root
/// does not name that pid, as lines saying what it named.
fn misnamed(spans: &[ReceivedSpan], port: u16, clients: &[(u16, u32)]) -> Vec<String> {
    let roots = server_roots(spans, port);
    clients
        .iter()
        .filter_map(|&(peer, pid)| {
            let got = roots.get(&peer).map(|r| r.int_attr("process.pid"));
            (got != Some(Some(i64::from(pid)))).then(|| {
                format!("127.0.0.1:{port} <- :{peer}: accepted by {pid}, root names {got:?}")
            })
        })
        .collect()
}

fn port_for(test: u16) -> u16 {
    20_000 + test * 1000 + (std::process::id() % 1000) as u16
}

/// Two processes listen on one port; the first to listen closes its listener;
/// the survivor accepts connections whose clients reset them. Every server
/// root names the survivor, and `-p SURVIVOR` shows every one of them.
#[test]
fn the_surviving_listener_owns_the_connections_it_accepts() {
    if !root_or_skip("the_surviving_listener_owns_the_connections_it_accepts") {
        return;
    }
    const CLIENTS: usize = 10;
    let port = port_for(1);
    let (mut first, mut survivor) = (Server::start(port), Server::start(port));
    let rx = Receiver::start();
    let tracer = Tracer::exporting_to(&rx, &[]);
    let only = Tracer::start(&["-s", "-p", &survivor.pid.to_string()]);

    first.step(1, "listening");
    survivor.step(1, "listening");
    first.step(2, "closed");
    let clients: Vec<(u16, u32)> = (0..CLIENTS)
        .map(|_| connect_and_reset(port, &[&survivor]))
        .collect();

    let spans = rx.wait_for(WAIT, |s| server_roots(s, port).len() >= CLIENTS);
    let wrong = misnamed(&spans, port, &clients);
    eprintln!(
        "{} of {CLIENTS} server roots named the surviving listener's process {} (the first was {})",
        CLIENTS - wrong.len(),
        survivor.pid,
        first.pid
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    let done = only.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    let rows = rows(&done.lines, false);
    let shown = clients
        .iter()
        .filter(|(peer, _)| {
            rows.iter().any(|r| {
                r.lport == port && r.rport == *peer && r.transition() == ("ESTABLISHED", "CLOSE")
            })
        })
        .count();
    eprintln!("-p {}: {shown} of {CLIENTS} resets shown", survivor.pid);
    assert_eq!(shown, CLIENTS, "-p {}: {rows:#?}", survivor.pid);
    let foreign: Vec<&Row> = rows.iter().filter(|r| r.lport != port).collect();
    assert!(
        foreign.is_empty(),
        "-p {} showed {foreign:#?}",
        survivor.pid
    );
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
}

/// Both processes listen and the kernel spreads connections over them; with
/// `--links` the packet program tells which listener took each one, so each
/// server root names the process that accepted it (each server reports the
/// peer ports it accepted: the truth).
#[test]
fn each_listener_of_a_port_owns_what_it_accepted() {
    if !root_or_skip("each_listener_of_a_port_owns_what_it_accepted") {
        return;
    }
    const CLIENTS: usize = 24;
    let port = port_for(2);
    let (mut a, mut b) = (Server::start(port), Server::start(port));
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &[]);
    a.step(1, "listening");
    b.step(1, "listening");
    let clients: Vec<(u16, u32)> = (0..CLIENTS)
        .map(|_| connect_and_reset(port, &[&a, &b]))
        .collect();
    let by_a = clients.iter().filter(|(_, pid)| *pid == a.pid).count();
    // The kernel hashes each connection's ends to pick the listener: both get
    // some of 24 but with a chance of 2^-23.
    assert!(
        by_a > 0 && by_a < CLIENTS,
        "one listener took every connection ({by_a} of {CLIENTS} by {})",
        a.pid
    );

    let spans = rx.wait_for(WAIT, |s| server_roots(s, port).len() >= CLIENTS);
    let wrong = misnamed(&spans, port, &clients);
    eprintln!(
        "{} of {CLIENTS} server roots named the process that accepted them ({by_a} by {}, {} by {})",
        CLIENTS - wrong.len(),
        a.pid,
        CLIENTS - by_a,
        b.pid
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
}
