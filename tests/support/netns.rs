//! Two network namespaces of the test's own, joined by a veth pair whose both
//! ends drop a share of the packets they receive at random (iptables'
//! `statistic` match in each namespace's INPUT: this kernel has no sch_netem).
//! The kernel's TCP then sees real loss: fast retransmits, timeouts, congestion
//! states. Dropping the link deletes both namespaces (and so the rules).
#![allow(dead_code)]

use std::{fs::File, process::Command, thread};

use nix::sched::{CloneFlags, setns};

pub struct LossyLink {
    a: String,
    b: String,
    pub a_addr: String,
    pub b_addr: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl LossyLink {
    /// Namespaces `otcs-<tag>-<pid>-a` and `-b` on 10.204.X.1 and .2, each end
    /// losing `loss` (0 to 1) of what it receives.
    pub fn new(tag: &str, loss: f64) -> LossyLink {
        let pid = std::process::id();
        let x = pid % 250 + 1;
        let link = LossyLink {
            a: format!("otcs-{tag}-{pid}-a"),
            b: format!("otcs-{tag}-{pid}-b"),
            a_addr: format!("10.204.{x}.1"),
            b_addr: format!("10.204.{x}.2"),
        };
        for ns in [&link.a, &link.b] {
            // A namespace left by a killed run of the same pid: usually there is none.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("otcs{pid}a"), format!("otcs{pid}b"));
        ip(&[
            "link", "add", &va, "netns", &link.a, "type", "veth", "peer", "name", &vb, "netns",
            &link.b,
        ]);
        let probability = format!("{loss}");
        for (ns, dev, addr) in [(&link.a, &va, &link.a_addr), (&link.b, &vb, &link.b_addr)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            let out = Command::new("ip")
                .args([
                    "netns", "exec", ns, "iptables", "-w", "-A", "INPUT", "-i", dev,
                ])
                .args(["-m", "statistic", "--mode", "random", "--probability"])
                .args([probability.as_str(), "-j", "DROP"])
                .output()
                .expect("run iptables (scripts/setup.sh --test installs it)");
            assert!(
                out.status.success(),
                "iptables in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        link
    }

    /// Runs `f` on a thread inside namespace `a`: the sockets it makes live there.
    pub fn in_a<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.a, f)
    }

    pub fn in_b<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.b, f)
    }
}

fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(format!("/run/netns/{ns}")).expect("namespace file");
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("thread in the namespace")
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A network namespace of the test's own with only its loopback up: a pod's
/// view of the network. Dropping it deletes the namespace.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Namespace `otcs-<tag>-<pid>`.
    pub fn new(tag: &str) -> Netns {
        let name = format!("otcs-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Runs `f` on a thread inside the namespace: the sockets it makes live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.name, f)
    }

    /// `program` to be run inside the namespace (`ip netns exec` execs it: the
    /// child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
