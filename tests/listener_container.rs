//! `container.id` on the connections a container's server accepted, as long as
//! its listener lives. The daemon runs as in a pod: in a cgroup namespace of its
//! own with its own cgroup v2 mount, so the owners' cgroups are outside what it
//! can walk, and each answer holds for one process (kept in a cache of 4096).
//! Thousands of short-lived processes then make connections, so the cache
//! forgets the server's process; connections the server accepted and their
//! clients reset end in softirq, where only the listener's owner names the
//! container.
mod support;

use std::{
    fs,
    hash::{BuildHasher as _, RandomState},
    io::{BufRead as _, BufReader},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use support::{
    load::abort_on_close,
    otlp::{FAST, KIND_SERVER, ROOT, ReceivedSpan, Receiver, Value, WAIT, server_roots},
    *,
};

/// Owners the daemon's per-process cache keeps (`sessions::container_lookups`).
const CACHED: usize = 4096;
/// Processes that connect in between: more than the cache holds, with a margin.
const CHURN: usize = CACHED + 1024;

/// Accepts and keeps each connection, reporting its peer port.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(128)
print("listening", flush=True)
kept = []
while True:
    c, peer = s.accept()
    kept.append(c)
    print(peer[1], flush=True)
"#;

/// Forks processes that each connect (refused) and exit, a few dozen alive at
/// once.
const CHURNER: &str = r#"
import os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
alive = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            pass
        os._exit(0)
    alive.append(pid)
    if len(alive) >= 32:
        os.waitpid(alive.pop(0), 0)
for pid in alive:
    os.waitpid(pid, 0)
"#;

/// The daemon's cgroup and the container's, removed when dropped.
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(path: PathBuf) -> Cgroup {
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove cgroup {}", self.0.display());
    }
}

struct Server {
    child: Child,
    accepted: Arc<Mutex<Vec<u16>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 64 lowercase hex digits, different per run.
fn container_hex() -> String {
    let seed = (std::process::id(), Instant::now());
    let state = RandomState::new();
    (0..4u8)
        .map(|i| format!("{:016x}", state.hash_one((i, seed))))
        .collect()
}

/// Connects to the server, waits until it accepted, resets. The client's port.
fn connect_and_reset(server: &Server, port: u16) -> u16 {
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let local = client.local_addr().unwrap().port();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.accepted.lock().unwrap().contains(&local) {
        assert!(
            Instant::now() < deadline,
            "the server never accepted :{local}"
        );
        thread::sleep(Duration::from_millis(2));
    }
    abort_on_close(&client);
    drop(client);
    local
}

/// How many of the server roots of `peers` carry container `id`.
fn with_container(spans: &[ReceivedSpan], port: u16, peers: &[u16], id: &str) -> usize {
    peers
        .iter()
        .filter(|&&peer| {
            spans.iter().any(|s| {
                s.name == ROOT
                    && s.kind == KIND_SERVER
                    && s.int_attr("network.local.port") == Some(i64::from(port))
                    && s.int_attr("network.peer.port") == Some(i64::from(peer))
                    && s.resource.get("container.id") == Some(&Value::Str(id.to_owned()))
            })
        })
        .count()
}

#[test]
fn a_live_listeners_container_names_its_failed_connections() {
    if !root_or_skip("a_live_listeners_container_names_its_failed_connections") {
        return;
    }
    const EACH: usize = 5;
    let mount = cgroup2_mount();
    let daemon_cgroup = Cgroup::create(PathBuf::from(format!(
        "{mount}/otel-tcpstates-listener-container-{}",
        std::process::id()
    )));
    let id = container_hex();
    let container = Cgroup::create(PathBuf::from(format!("{mount}/docker-{id}.scope")));
    let port = 24_000 + (std::process::id() % 1000) as u16;
    let refused = closed_port();

    // As in a pod: the daemon's cgroup is its cgroup namespace's root, and the
    // cgroup v2 tree it mounts (and walks) is that namespace's.
    let rx = Receiver::start();
    let enter = r#"cg=$1; mnt=$2; shift 2
echo $$ > "$cg/cgroup.procs" || exit 1
exec unshare --cgroup --mount --propagation private sh -c 'umount "$0"; mount -t cgroup2 none "$0" && exec "$@"' "$mnt" "$@""#;
    let daemon_dir = daemon_cgroup.0.display().to_string();
    let tracer = Tracer::start_in(
        &["sh", "-c", enter, "sh", &daemon_dir, &mount],
        &[
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
            "--print",
            "-s",
        ],
        FAST,
    );

    let mut child = Command::new("sh")
        .args([
            "-c",
            r#"echo $$ > "$1/cgroup.procs" && exec python3 -c "$2" "$3""#,
            "sh",
            &container.0.display().to_string(),
            SERVER,
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh --test installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    let accepted: Arc<Mutex<Vec<u16>>> = Arc::default();
    let sink = Arc::clone(&accepted);
    thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line.parse().unwrap());
        }
    });
    let server = Server { child, accepted };

    // While the server's process is fresh in the cache.
    let before: Vec<u16> = (0..EACH)
        .map(|_| connect_and_reset(&server, port))
        .collect();
    let spans = rx.wait_for(WAIT, |s| server_roots(s, port).len() >= EACH);
    let named_before = with_container(&spans, port, &before, &id);

    let churn = Command::new("python3")
        .args(["-c", CHURNER, &refused.to_string(), &CHURN.to_string()])
        .status()
        .expect("python3");
    assert!(churn.success(), "the churn failed: {churn}");
    // The daemon has read (and looked up the owner of) every one: their
    // refused connects' last lines. Spans of so many at once may overflow the
    // export queue; lines do not.
    let refused_text = refused.to_string();
    let closed = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| {
                let f: Vec<&str> = l.split(',').collect();
                f.len() == 11 && f[7] == refused_text && f[9] == "CLOSE"
            })
            .count()
    };
    // A liveness bound: 5,000 processes on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(300);
    while closed(&tracer.lines()) < CHURN && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let churned = closed(&tracer.lines());
    assert!(
        churned >= CHURN,
        "the daemon read only {churned} of {CHURN} refused connects"
    );

    let after: Vec<u16> = (0..EACH)
        .map(|_| connect_and_reset(&server, port))
        .collect();
    let spans = rx.wait_for(WAIT, |s| server_roots(s, port).len() >= 2 * EACH);
    let named_after = with_container(&spans, port, &after, &id);
    eprintln!(
        "server roots with the container's id: {named_before} of {EACH} before {CHURN} other \
         processes connected, {named_after} of {EACH} after"
    );
    assert_eq!(named_before, EACH, "the setup: a fresh owner's container");
    assert_eq!(
        named_after, EACH,
        "the listener lives: its container is known"
    );

    drop(server);
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    drop(container);
    drop(daemon_cgroup);
}
