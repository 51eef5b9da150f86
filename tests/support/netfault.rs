//! Packet faults on loopback: iptables rules, each matching only TCP from
//! 127.0.0.1 to 127.0.0.1 on a port the test owns, inserted by a guard and
//! deleted when it drops (a panicking test unwinds through it too).
//!
//! The rules sit in INPUT, not OUTPUT: a packet dropped there left its sender as
//! far as TCP knows, so it is lost as on a wire and retransmitted by the kernel's
//! timers; one dropped in OUTPUT is an error the sending TCP sees at once.
//!
//! iptables rules are global: a test that makes faults holds
//! [`super::load::serial`] so its timings are its own, and each rule names a
//! port only that test uses.

use std::{
    process::Command,
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

/// A data segment is a packet to the port at least this long: the tests write
/// more than this at once, while a pure ACK on loopback (IP, TCP and the
/// timestamp option) is 52 bytes.
const MIN_DATA_PACKET: u32 = 100;

/// `--mode nth --every` this: a rule that matches the Nth packet matches it once
/// in a test (the next match would be a million packets later).
const ONCE: &str = "1000000";

const COMMENT_PREFIX: &str = "otel-tcpstates-test:pid=";

/// One iptables rule in the INPUT chain, deleted on drop.
pub struct Fault {
    spec: Vec<String>,
    comment: String,
}

impl Fault {
    /// Drops the first SYN to `port`: the client sends it again when its initial
    /// retransmission timeout (1 s) expires, so its SYN_SENT lasts that long.
    pub fn drop_first_syn(port: u16) -> Fault {
        Self::insert(
            port,
            &["--syn", "-m", "statistic", "--mode", "nth"],
            0,
            "DROP",
        )
    }

    /// Drops every SYN to `port`: a blackholed listener. The client retransmits
    /// until its `TCP_SYNCNT` retries run out and connect() fails with ETIMEDOUT.
    pub fn drop_syns(port: u16) -> Fault {
        let fault = Self::build(port, &["--syn"], "DROP");
        fault.add();
        fault
    }

    /// Drops the first pure ACK to `port`: the client's last packet of the
    /// handshake when it sends nothing after connecting. The server stays in
    /// SYN_RECV until it retransmits its SYN-ACK (after 1 s) and the client
    /// acknowledges that.
    pub fn drop_handshake_ack(port: u16) -> Fault {
        Self::insert(
            port,
            &[
                "--tcp-flags",
                "SYN,ACK,FIN,RST,PSH",
                "ACK",
                "-m",
                "statistic",
                "--mode",
                "nth",
            ],
            0,
            "DROP",
        )
    }

    /// Drops the `nth` (from 1) data segment to `port`; the sender retransmits it.
    pub fn drop_data_segment(port: u16, nth: u32) -> Fault {
        assert!(nth >= 1, "segments count from 1");
        let length = format!("{MIN_DATA_PACKET}:65535");
        Self::insert(
            port,
            &[
                "-m",
                "length",
                "--length",
                &length,
                "-m",
                "statistic",
                "--mode",
                "nth",
            ],
            nth - 1,
            "DROP",
        )
    }

    /// Drops every data segment to `port`: the sender retransmits until its
    /// retries (or TCP_USER_TIMEOUT) run out.
    pub fn drop_data(port: u16) -> Fault {
        let length = format!("{MIN_DATA_PACKET}:65535");
        let fault = Self::build(port, &["-m", "length", "--length", &length], "DROP");
        fault.add();
        fault
    }

    /// Answers every data segment to `port` with a reset (REJECT with
    /// tcp-reset): the sender's connection is reset, the receiver's is not told.
    pub fn reset_data(port: u16) -> Fault {
        let length = format!("{MIN_DATA_PACKET}:65535");
        let mut fault = Self::build(port, &["-m", "length", "--length", &length], "REJECT");
        fault
            .spec
            .extend(["--reject-with", "tcp-reset"].map(String::from));
        fault.add();
        fault
    }

    /// Drops every packet from port `from` to port `to`: with its mirror, one
    /// connection silenced both ways (no FIN, no RST: a peer that vanished), while
    /// new connections to the same port go through.
    pub fn drop_flow(from: u16, to: u16) -> Fault {
        let from = from.to_string();
        let fault = Self::build_on(&["--sport", &from], to, &[], "DROP");
        fault.add();
        fault
    }

    /// A rule whose `statistic` match (the last of `matches`) fires on the packet
    /// `packet` (from 0) only.
    fn insert(port: u16, matches: &[&str], packet: u32, target: &str) -> Fault {
        let packet = packet.to_string();
        let mut matches = matches.to_vec();
        matches.extend(["--every", ONCE, "--packet", &packet]);
        let fault = Self::build(port, &matches, target);
        fault.add();
        fault
    }

    fn build(port: u16, matches: &[&str], target: &str) -> Fault {
        Self::build_on(&[], port, matches, target)
    }

    /// [`Fault::build`] with `ports` (e.g. a source port) matched too.
    fn build_on(ports: &[&str], port: u16, matches: &[&str], target: &str) -> Fault {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_rules_of_gone_processes);
        let comment = format!(
            "{COMMENT_PREFIX}{}:n={}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let port = port.to_string();
        let spec: Vec<String> = [
            "-i",
            "lo",
            "-s",
            "127.0.0.1",
            "-d",
            "127.0.0.1",
            "-p",
            "tcp",
        ]
        .iter()
        .chain(ports)
        .chain(&["--dport", &port])
        .chain(matches)
        .chain(&["-m", "comment", "--comment", &comment, "-j", target])
        .map(|s| s.to_string())
        .collect();
        Fault { spec, comment }
    }

    fn add(&self) {
        iptables(&["-I", "INPUT", "1"], &self.spec);
    }

    /// Packets the rule has matched so far.
    pub fn matched(&self) -> u64 {
        let out = iptables(&["-L", "INPUT", "-v", "-x", "-n"], &[]);
        let marker = format!("/* {} */", self.comment);
        let line = out
            .lines()
            .find(|l| l.contains(&marker))
            .unwrap_or_else(|| panic!("rule {} is gone from INPUT:\n{out}", self.comment));
        line.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {line:?}"))
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        // Not iptables(): a failure to delete must not panic while unwinding.
        let deleted = Command::new("iptables")
            .args(["-w", "-D", "INPUT"])
            .args(&self.spec)
            .status();
        if !deleted.as_ref().is_ok_and(|s| s.success()) {
            eprintln!(
                "could not delete iptables rule {}: {deleted:?}",
                self.comment
            );
        }
    }
}

/// Runs `iptables -w ARGS SPEC`; returns its stdout, panics on failure.
fn iptables(args: &[&str], spec: &[String]) -> String {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .args(spec)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run iptables ({e}): scripts/setup.sh --test installs it")
        });
    assert!(
        out.status.success(),
        "iptables {args:?} {spec:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes the rules a test process left behind when it was killed (no unwinding,
/// no drop): those whose comment names a process that is gone.
fn sweep_rules_of_gone_processes() {
    for rule in iptables(&["-S", "INPUT"], &[]).lines() {
        let Some(pid) = rule
            .split_once(COMMENT_PREFIX)
            .and_then(|(_, rest)| rest.split(':').next())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Some(spec) = rule.strip_prefix("-A INPUT ") else {
            continue;
        };
        let spec: Vec<String> = spec.split_whitespace().map(String::from).collect();
        iptables(&["-D", "INPUT"], &spec);
    }
}

/// The local ports of the established TCP connections that process `pid` holds
/// to port `remote` (IPv4, this network namespace): its sockets' inodes matched
/// against /proc/net/tcp.
pub fn established_to(pid: u32, remote: u16) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|target| {
                    let target = target.to_string_lossy().into_owned();
                    Some(
                        target
                            .strip_prefix("socket:[")?
                            .strip_suffix(']')?
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 01 is ESTABLISHED.
            (f.len() > 9 && f[3] == "01" && port(f[2]) == Some(remote) && inodes.contains(f[9]))
                .then(|| port(f[1]))
                .flatten()
        })
        .collect()
}
