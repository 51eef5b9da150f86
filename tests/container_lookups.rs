//! Container attribution never holds up the ring's reader. A real cgroup v2 tree
//! of tens of thousands of directories makes a walk of it take far longer than a
//! drain slice; a process in a Docker-style cgroup the daemon has not seen
//! connects and is gone before the daemon reads its events (the daemon is
//! stopped meanwhile), so only a walk can find its container. Other sockets churn
//! throughout: no line of theirs may wait for the walk, and the container's id
//! must still reach the connection's root (held for the answer).
mod support;

use std::{
    fs,
    hash::{BuildHasher as _, RandomState},
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use support::{
    otlp::{FAST, Receiver, Value, WAIT, trace_of},
    *,
};

/// Directories in the test's tree: 300 × 100.
const TREE: (usize, usize) = (300, 100);
/// The daemon's drain slice (kernel/reader.rs): a walk inline would stall the
/// reader for many of them.
const DRAIN_SLICE: Duration = Duration::from_millis(20);
/// How often the churn connects.
const CHURN_EVERY: Duration = Duration::from_millis(5);

/// The test's cgroup tree, removed (leaves first) when dropped.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn create(mount: &str) -> Tree {
        let tree = Tree {
            root: PathBuf::from(format!(
                "{mount}/otel-tcpstates-clock-lookups-{}",
                std::process::id()
            )),
        };
        fs::create_dir(&tree.root)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", tree.root.display()));
        for a in 0..TREE.0 {
            let dir = tree.root.join(format!("a{a}"));
            fs::create_dir(&dir).unwrap();
            for b in 0..TREE.1 {
                fs::create_dir(dir.join(format!("b{b}"))).unwrap();
            }
        }
        tree
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for a in 0..TREE.0 {
            let dir = self.root.join(format!("a{a}"));
            for b in 0..TREE.1 {
                let _ = fs::remove_dir(dir.join(format!("b{b}")));
            }
            let _ = fs::remove_dir(&dir);
        }
        if let Err(e) = fs::remove_dir(&self.root) {
            eprintln!("could not remove cgroup {}: {e}", self.root.display());
        }
    }
}

/// A cgroup the test made, removed when dropped (once its processes are gone).
struct Cgroup(PathBuf);

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

/// Walks the cgroup tree as the daemon does (stat each directory, list it):
/// how long a walk takes here, now.
fn walk_time(root: &Path) -> (Duration, usize) {
    let started = Instant::now();
    let (mut dirs, mut pending) = (0, vec![root.to_path_buf()]);
    while let Some(dir) = pending.pop() {
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        std::hint::black_box(meta.ino());
        dirs += 1;
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    (started.elapsed(), dirs)
}

/// 64 lowercase hex digits, different per run.
fn container_hex() -> String {
    let seed = (std::process::id(), Instant::now());
    let state = RandomState::new();
    (0..4u8)
        .map(|i| format!("{:016x}", state.hash_one((i, seed))))
        .collect()
}

/// Connects to `to` every [`CHURN_EVERY`] until stopped; each connection's
/// client port and when its connect began.
struct Churn {
    stop: Arc<AtomicBool>,
    made: Arc<Mutex<Vec<(u16, Instant)>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Churn {
    fn start(listener: TcpListener) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let made: Arc<Mutex<Vec<(u16, Instant)>>> = Arc::default();
        let to = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepting = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => drop(stream),
                        Err(_) => thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        let connecting = {
            let (stop, made) = (Arc::clone(&stop), Arc::clone(&made));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    if let Ok(stream) = TcpStream::connect(to) {
                        let port = stream.local_addr().unwrap().port();
                        made.lock().unwrap().push((port, at));
                    }
                    thread::sleep(CHURN_EVERY);
                }
            })
        };
        Churn {
            stop,
            made,
            threads: vec![accepting, connecting],
        }
    }

    fn made(&self) -> Vec<(u16, Instant)> {
        self.made.lock().unwrap().clone()
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// For each connection made in `[from, to)`: how long after its connect began its
/// first line (`-s`: LPORT is the 6th column) was read; `None` if none was.
fn latencies(
    made: &[(u16, Instant)],
    lines: &[(Instant, String)],
    from: Instant,
    to: Instant,
) -> Vec<(u16, Option<Duration>)> {
    made.iter()
        .filter(|(_, at)| (from..to).contains(at))
        .map(|&(port, at)| {
            let port_text = port.to_string();
            let read = lines
                .iter()
                .find(|(_, line)| line.split(',').nth(5) == Some(&port_text))
                .map(|(read, _)| read.saturating_duration_since(at));
            (port, read)
        })
        .collect()
}

fn worst(latencies: &[(u16, Option<Duration>)]) -> Duration {
    latencies
        .iter()
        .filter_map(|(_, l)| *l)
        .max()
        .unwrap_or_default()
}

#[test]
fn container_lookups_do_not_hold_up_the_reader() {
    if !root_or_skip("container_lookups_do_not_hold_up_the_reader") {
        return;
    }
    let mount = cgroup2_mount();
    let tree = Tree::create(&mount);
    let (walk, dirs) = walk_time(Path::new(&mount));
    eprintln!("a walk of {dirs} cgroup directories takes {walk:?} here");
    assert!(
        walk > 5 * DRAIN_SLICE,
        "a walk of {dirs} directories took {walk:?}: too fast to tell a stalled reader, \
         make TREE bigger"
    );

    let rx = Receiver::start();
    let endpoint = rx.http_endpoint();
    let env = [
        FAST,
        &[("OTEL_TCPSTATES_LOG", "info,otel_tcpstates::sessions=debug")],
    ]
    .concat();
    let tracer = Tracer::start_with_env(&["--otlp-endpoint", &endpoint, "--print", "-s"], &env);
    let churn = Churn::start(listen("127.0.0.1").0);
    // Whatever first lookups the start brings (before the fix: a walk on the
    // loop), then a baseline of the churn's latency.
    thread::sleep(walk + Duration::from_millis(1500));
    let baseline_from = Instant::now();
    thread::sleep(Duration::from_millis(500));

    // A container the daemon has not seen, whose process is gone before the
    // daemon reads its connect: only a walk finds its cgroup.
    let id = container_hex();
    let cgroup = Cgroup(PathBuf::from(format!("{mount}/docker-{id}.scope")));
    fs::create_dir(&cgroup.0).unwrap();
    let (server, server_addr) = listen("127.0.0.1");
    let daemon = Pid::from_raw(tracer.pid() as i32);
    let stopped_at = Instant::now();
    kill(daemon, Signal::SIGSTOP).unwrap();
    let child = Command::new("bash")
        .args([
            "-c",
            "echo $$ > \"$1\" && exec 3<>\"/dev/tcp/127.0.0.1/$2\" && echo hi >&3",
            "bash",
            &cgroup.0.join("cgroup.procs").display().to_string(),
            &server_addr.port().to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let (accepted, child) = match child {
        Ok(mut child) => {
            let accepted = server.accept().map(|(s, _)| s);
            let status = child.wait().unwrap();
            (accepted, status)
        }
        Err(e) => {
            kill(daemon, Signal::SIGCONT).unwrap();
            panic!("spawn bash: {e}");
        }
    };
    let resumed_at = Instant::now();
    kill(daemon, Signal::SIGCONT).unwrap();
    assert!(child.success(), "the container's process failed: {child}");
    let accepted = accepted.unwrap();
    let child_port = accepted.peer_addr().unwrap().port();

    // The churn goes on while the daemon walks the tree for the container (its
    // connection has ended: its root waits for the answer).
    thread::sleep((3 * walk).max(Duration::from_secs(2)));
    let measured_to = Instant::now();
    let (mut accepted, made) = (accepted, churn.made());
    let _ = accepted.write_all(b"bye");
    drop(accepted);
    let lines = tracer.wait_for("the churn's lines", |lines| {
        let last = made.iter().rev().find(|(_, at)| *at < measured_to);
        last.is_some_and(|(port, _)| {
            let port = port.to_string();
            lines
                .iter()
                .any(|l| l.split(',').nth(5) == Some(port.as_str()))
        })
    });
    drop(churn);
    let read = tracer.lines_read_at();
    assert!(!lines.is_empty());

    let baseline = latencies(&made, &read, baseline_from, stopped_at);
    let during = latencies(&made, &read, resumed_at, measured_to);
    let (base_worst, during_worst) = (worst(&baseline), worst(&during));
    let missing: Vec<u16> = during
        .iter()
        .filter(|(_, l)| l.is_none())
        .map(|(p, _)| *p)
        .collect();
    eprintln!(
        "churn: {} connections before (worst line {base_worst:?}), {} while the container \
         was looked up (worst line {during_worst:?}, {} unseen); walk {walk:?}",
        baseline.len(),
        during.len(),
        missing.len()
    );
    assert!(baseline.len() > 10 && during.len() > 10, "too little churn");
    assert!(missing.is_empty(), "no line for churn ports {missing:?}");
    // A walk on the loop holds every line back for as long as it takes.
    let bound = walk / 2;
    assert!(
        during_worst < bound,
        "a churn connection's line came {during_worst:?} after its connect while the \
         container was looked up: the walk ({walk:?}) held up the reader (bound: half a walk)"
    );

    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, child_port, server_addr.port()).is_some()
    });
    let (root, _) = trace_of(&spans, child_port, server_addr.port())
        .unwrap_or_else(|| panic!("no trace of the container's connection {child_port}"));
    let walks: Vec<String> = tracer
        .stderr()
        .into_iter()
        .filter(|l| l.contains("walked"))
        .collect();
    eprintln!("the daemon's walks: {walks:#?}");
    eprintln!("the container's root: resource {:?}", root.resource);
    assert_eq!(
        root.resource.get("container.id"),
        Some(&Value::Str(id.clone())),
        "the container's connection: {:?}",
        root.resource
    );
    drop(cgroup);
    drop(tree);
}
