//! Attaching the incident programs (retransmissions, resets, errors, congestion
//! states): each one only when its tracepoint exists with the layout it reads,
//! so an older kernel loses that kind of incident, not the tracer.
use anyhow::{Context as _, Result, anyhow};
use aya::{Ebpf, programs::RawTracePoint};
use otel_tcpstates_common::names;

use crate::kernel::attach::{self, Link};

/// The fields each program reads, at the offsets it reads them (Linux 6.10+).
const LAYOUTS: [&[(&str, usize, usize)]; 5] = [
    &[("skaddr", 16, 8), ("state", 24, 4), ("err", 76, 4)],
    &[
        ("skaddr", 8, 8),
        ("sport", 24, 2),
        ("dport", 26, 2),
        ("family", 28, 2),
        ("saddr", 30, 4),
        ("daddr", 34, 4),
        ("saddr_v6", 38, 16),
        ("daddr_v6", 54, 16),
    ],
    &[
        ("skaddr", 16, 8),
        ("state", 24, 4),
        ("reason", 28, 4),
        ("saddr", 32, 28),
        ("daddr", 60, 28),
    ],
    &[("skaddr", 8, 8)],
    &[("skaddr", 8, 8), ("cong_state", 62, 1)],
];

fn attach_error_report(ebpf: &mut Ebpf, links: &mut Vec<Link>) -> Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(names::ERROR_REPORT)
        .ok_or_else(|| anyhow!("eBPF object has no program {}", names::ERROR_REPORT))?
        .try_into()?;
    program.load().context("the kernel verifier rejected it")?;
    let id = program
        .attach(names::ERROR_REPORT)
        .context("attaching the raw tracepoint")?;
    links.push(Box::new(program.take_link(id)?));
    Ok(())
}

/// Attaches every incident program it can; says in one line each which it could
/// not, and what that costs. `errors_readable`: the kernel's BTF gave `sk_err`.
/// Returns whether the congestion states are reported; `links` gets what it attached.
pub fn attach(ebpf: &mut Ebpf, errors_readable: bool, links: &mut Vec<Link>) -> bool {
    let mut congestion = false;
    for ((program, category, name), layout) in names::INCIDENT_PROGRAMS.into_iter().zip(LAYOUTS) {
        match attach::tracepoint(ebpf, program, category, name, layout, links) {
            Ok(()) => congestion |= name == "tcp_cong_state_set",
            Err(err) => warn(&format!("{category}:{name}"), &err),
        }
    }
    if errors_readable && let Err(err) = attach_error_report(ebpf, links) {
        warn("sock:inet_sk_error_report", &err);
    }
    congestion
}

fn warn(what: &str, err: &anyhow::Error) {
    // The cause's first line: a verifier log may follow it.
    let cause = err.root_cause().to_string();
    let cause = cause.lines().next().unwrap_or_default();
    let why = if err.chain().nth(1).is_some() {
        format!("{err}: {cause}")
    } else {
        err.to_string()
    };
    tracing::warn!(
        "spans will not show the incidents {what} reports: {why} (they need Linux 6.10 or later)"
    );
    tracing::debug!("{err:#}");
}
