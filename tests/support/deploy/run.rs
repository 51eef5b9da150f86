//! Running the daemon as a deployment runs it: in a container's view of the host
//! or under a unit's privileges, one real connection traced, and what it then
//! holds of BPF.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::Bind;
use crate::support::{
    connect_hold_close, in_private_mounts,
    otlp::{self, ReceivedSpan, Receiver},
    remount_read_only,
};

/// How the daemon's one warning line starts when the packet programs behind span
/// links cannot be loaded or attached.
pub const LINKS_OFF: &str = "span links from traceparent headers are off";

/// The capability that attaching the packet programs to a cgroup takes, and
/// nothing else the daemon does.
pub const LINKS_CAP: &str = "CAP_NET_ADMIN";

/// What the daemon needs as a user other than root, exporting with span links
/// (README, "What it needs"): loading the programs takes CAP_BPF and CAP_PERFMON,
/// reading tracefs (root's only) CAP_DAC_READ_SEARCH, attaching the packet
/// programs to the cgroup v2 root CAP_NET_ADMIN.
pub const UNIT_CAPS: [&str; 4] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_DAC_READ_SEARCH",
    "CAP_NET_ADMIN",
];

/// The PATH systemd gives a service, and the one the daemon is given here when
/// it runs in a clean environment as a deployment would run it.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An environment variable: name, value.
pub type Var = (String, String);

/// The kernel's `enum bpf_attach_type` for the two packet programs.
pub const CGROUP_INET_INGRESS: u32 = 0;
pub const CGROUP_INET_EGRESS: u32 = 1;
/// The kernel's `enum bpf_prog_type` for them: `BPF_PROG_TYPE_CGROUP_SKB`.
const PROG_TYPE_CGROUP_SKB: u32 = 8;

/// A BPF link to a cgroup, as the kernel describes it in /proc/PID/fdinfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CgroupLink {
    pub attach_type: u32,
    pub cgroup_id: u64,
}

/// What a process holds of BPF, read from the kernel's side: its links to
/// cgroups, and how many `cgroup_skb` programs it has loaded.
#[derive(Clone, Debug, Default)]
pub struct BpfHeld {
    pub cgroup_links: Vec<CgroupLink>,
    pub packet_programs: usize,
}

/// The fields of one /proc/PID/fdinfo file.
fn fdinfo(pid: u32, fd: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

pub fn bpf_held(pid: u32) -> BpfHeld {
    let mut held = BpfHeld::default();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"));
    for entry in fds.map_while(Result::ok) {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let fd = entry.file_name().to_string_lossy().into_owned();
        let number = |info: &BTreeMap<String, String>, key: &str| -> u64 {
            info.get(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("/proc/{pid}/fdinfo/{fd}: no {key} in {info:?}"))
        };
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf_link" => {
                let info = fdinfo(pid, &fd);
                if info.get("link_type").map(String::as_str) == Some("cgroup") {
                    held.cgroup_links.push(CgroupLink {
                        attach_type: number(&info, "attach_type") as u32,
                        cgroup_id: number(&info, "cgroup_id"),
                    });
                }
            }
            "anon_inode:bpf-prog" => {
                let info = fdinfo(pid, &fd);
                if number(&info, "prog_type") == u64::from(PROG_TYPE_CGROUP_SKB) {
                    held.packet_programs += 1;
                }
            }
            _ => {}
        }
    }
    held.cgroup_links.sort();
    held
}

/// The cgroup v2 root of the host (as this test sees it: field 5 of the
/// `cgroup2` line of /proc/self/mountinfo) and its cgroup id, which for cgroup
/// v2 is the directory's inode number: where the packet programs must attach to
/// see every socket's packets.
pub fn host_cgroup2_root() -> (PathBuf, u64) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next()? == "cgroup2")
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect("cgroup v2 is mounted on this host (span links need it)");
    let id = std::fs::metadata(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .ino();
    (root, id)
}

/// Whether these daemon arguments ask for span links: the later of `--links` and
/// `--no-links` wins, and neither means none.
pub fn links_asked(args: &[String]) -> bool {
    args.iter()
        .rev()
        .find(|a| *a == "--links" || *a == "--no-links")
        .is_some_and(|a| a == "--links")
}

/// The daemon's stderr lines that say span links are off.
pub fn links_off(stderr: &[String]) -> Vec<&String> {
    stderr.iter().filter(|l| l.contains(LINKS_OFF)).collect()
}

/// A command that runs what is appended to it (`sh -c '…; exec "$@"'`) with the
/// view of the host a container runtime gives a container with these binds: a
/// mount namespace and a cgroup namespace of its own, a fresh read-only sysfs on
/// /sys (as runtimes mount it for a container that is not privileged), and each
/// bind on top, recursive (as Docker's and the CRI runtimes' are) and read-only
/// where asked. What the daemon reads in /proc/self/mountinfo is then what it
/// would read in the container: the cgroup v2 root, above all, is the bind's.
/// The directory returned (`tag` names it) is where each source waits while /sys
/// is replaced: keep it until the command has started.
pub fn in_container(binds: &[Bind], tag: &str) -> (Command, Scratch) {
    let scratch = Scratch::new(tag);
    let stage = scratch.0.as_path();
    let quote = |path: &str| {
        assert!(!path.contains('\''), "{path}");
        format!("'{path}'")
    };
    let mut script = String::from("set -e\n");
    for (i, bind) in binds.iter().enumerate() {
        let staged = stage.join(i.to_string());
        let staged = quote(staged.to_str().unwrap());
        let make = if Path::new(&bind.source).is_dir() {
            "mkdir"
        } else {
            "touch"
        };
        script += &format!(
            "{make} {staged}\nmount --rbind {} {staged}\n",
            quote(&bind.source)
        );
    }
    // The same sysfs cannot be mounted on itself: the host's goes first.
    script += "umount -R -l /sys\nmount -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys\n";
    for (i, bind) in binds.iter().enumerate() {
        let staged = stage.join(i.to_string());
        let target = quote(&bind.target);
        script += &format!(
            "mount --move {} {target}\n",
            quote(staged.to_str().unwrap())
        );
        if bind.read_only {
            script += &remount_read_only(&target);
        }
    }
    script += "exec \"$@\"\n";
    (in_private_mounts(&script, true), scratch)
}

/// A directory of its own under the system's temporary directory, removed when
/// dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("otel-tcpstates-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon started behind wrappers that exec it (unshare, setpriv) or trace it
/// (strace), its stderr collected.
pub struct Daemon {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The daemon itself, when `child` is a tracer that forked it.
    traced: Option<u32>,
}

impl Daemon {
    /// Starts `command` and waits for the daemon to say it is attached and
    /// exporting (by then the packet programs are attached, or it said why not).
    pub fn start(mut command: Command) -> Daemon {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut daemon = Daemon {
            child,
            stderr,
            traced: None,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !daemon
            .stderr()
            .iter()
            .any(|l| l.contains("exporting traces"))
        {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!(
                    "exited with {status} before attaching: {:?}",
                    daemon.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "never attached: {:?}",
                daemon.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    fn children(&self) -> Vec<u32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    /// The daemon's pid when it runs under strace: the tracer's only child.
    pub fn trace_child(&mut self) {
        let ids = self.children();
        assert_eq!(ids.len(), 1, "strace's children: {ids:?}");
        self.traced = Some(ids[0]);
    }

    /// The daemon's own pid.
    pub fn pid(&self) -> u32 {
        self.traced.unwrap_or(self.child.id())
    }

    /// SIGTERM, as systemd and the container runtimes stop it; waits for the exit.
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "did not exit after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        };
        // The stderr reader's last lines.
        thread::sleep(Duration::from_millis(100));
        (status, self.stderr())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Killing strace would leave the daemon running, detached.
        for pid in self.children() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run of the daemon as deployed, with one real connection traced.
pub struct Run {
    pub status: ExitStatus,
    pub stderr: Vec<String>,
    /// The client socket's trace (root, states), if it arrived.
    pub trace: Option<(ReceivedSpan, Vec<ReceivedSpan>)>,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// What the daemon held of BPF once attached.
    pub held: BpfHeld,
}

impl Run {
    /// Starts the daemon (`strace`: it runs under strace, which forks it), reads
    /// what it holds of BPF, connects to `listener` (the daemon is told to trace
    /// its port only) and waits for the client socket's trace, then stops it.
    pub fn go(command: Command, strace: bool, receiver: &Receiver, listener: &TcpListener) -> Run {
        let mut daemon = Daemon::start(command);
        if strace {
            daemon.trace_child();
        }
        let held = bpf_held(daemon.pid());
        let server = listener.local_addr().unwrap();
        let (client, _) = connect_hold_close(listener, Duration::from_millis(20));
        let spans = receiver.wait_for(otlp::WAIT, |spans| {
            otlp::trace_of(spans, client.port(), server.port()).is_some()
        });
        let trace = otlp::trace_of(&spans, client.port(), server.port());
        let (status, stderr) = daemon.stop();
        Run {
            status,
            stderr,
            trace,
            client,
            server,
            held,
        }
    }

    /// It exported the connection's trace and exited 0 after SIGTERM.
    pub fn traced(&self) -> (&ReceivedSpan, &[ReceivedSpan]) {
        let (root, states) = self.trace.as_ref().unwrap_or_else(|| {
            panic!(
                "no trace of {} -> {}; daemon said {:?}",
                self.client, self.server, self.stderr
            )
        });
        assert!(self.status.success(), "{}: {:?}", self.status, self.stderr);
        (root, states)
    }

    /// Lines that are neither information nor the links-off warning.
    pub fn complaints(&self) -> Vec<&String> {
        self.stderr
            .iter()
            .filter(|l| !l.contains(LINKS_OFF))
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("error"))
            .collect()
    }

    /// Span links on: both packet programs attached, through BPF links, to the
    /// host's cgroup v2 root, and no warning about them.
    pub fn assert_links_attached(&self) {
        let (root, id) = host_cgroup2_root();
        assert!(links_off(&self.stderr).is_empty(), "{:?}", self.stderr);
        assert_eq!(
            self.held.cgroup_links,
            [
                CgroupLink {
                    attach_type: CGROUP_INET_INGRESS,
                    cgroup_id: id
                },
                CgroupLink {
                    attach_type: CGROUP_INET_EGRESS,
                    cgroup_id: id
                }
            ],
            "want ingress and egress attached to {} (cgroup id {id}); stderr {:?}",
            root.display(),
            self.stderr
        );
        assert_eq!(self.held.packet_programs, 2, "{:?}", self.held);
    }

    /// Span links off for want of CAP_NET_ADMIN: exactly one warning line, which
    /// names it, and nothing attached to a cgroup.
    pub fn assert_links_off_for_want_of_net_admin(&self) {
        let off = links_off(&self.stderr);
        assert_eq!(off.len(), 1, "{:?}", self.stderr);
        let (root, _) = host_cgroup2_root();
        assert!(
            off[0].contains(&format!("{LINKS_OFF}: attaching "))
                && off[0].contains(&format!(" to {}: Operation not permitted", root.display()))
                && off[0].contains(LINKS_CAP)
                && off[0].contains("--links needs"),
            "{}",
            off[0]
        );
        assert!(self.held.cgroup_links.is_empty(), "{:?}", self.held);
    }

    /// Without `--links` (or with a later `--no-links`): no packet program
    /// loaded, nothing attached, nothing said.
    pub fn assert_no_links_loaded(&self) {
        assert!(links_off(&self.stderr).is_empty(), "{:?}", self.stderr);
        assert!(self.held.cgroup_links.is_empty(), "{:?}", self.held);
        assert_eq!(self.held.packet_programs, 0, "{:?}", self.held);
    }
}
