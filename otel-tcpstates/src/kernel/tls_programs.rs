//! Attaching the TLS programs: uprobes on OpenSSL's `SSL_write`, `SSL_write_ex`,
//! `SSL_read` and `SSL_read_ex` in every file that exports them, and the two
//! tracepoints that tell which TCP socket a thread sent on or received from.
//!
//! A uprobe is set on a file, not on a process: every process that maps the
//! file runs it, those that start later too. The files are the system's
//! `libssl.so.3` (and any other `libssl` a running process maps), the
//! executables of running processes that carry OpenSSL and export its
//! functions (Node.js), `node` on `PATH`, and those `--tls-library` names.
use std::{
    collections::HashSet,
    env, fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};
use otel_tcpstates_common::names;

use crate::kernel::attach::{self, Link};

/// Where distributions put the system's OpenSSL 3 library.
const SYSTEM_LIBSSL: [&str; 6] = [
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/usr/lib/libssl.so.3",
    "/lib64/libssl.so.3",
];

/// Executables known to carry OpenSSL and export its functions, looked for on
/// `PATH` so that they are covered before any of them runs.
const EXECUTABLES: [&str; 2] = ["node", "nodejs"];

/// The fields the two tracepoints' programs read (see `tls.rs`).
const SOCK_LAYOUT: &[(&str, usize, usize)] = &[("sk", 8, 8), ("protocol", 18, 2), ("ret", 20, 4)];

/// What got attached: the files the uprobes are on.
pub struct Attached {
    pub files: Vec<PathBuf>,
}

/// Loads the TLS programs and attaches them to every file found, plus `extra`.
/// An error when nothing could be attached: the caller warns, once.
pub fn attach(ebpf: &mut Ebpf, extra: &[PathBuf], links: &mut Vec<Link>) -> Result<Attached> {
    for (program, category, name) in names::TLS_TRACEPOINTS {
        attach::tracepoint(ebpf, program, category, name, SOCK_LAYOUT, links).context(program)?;
    }
    for (program, _, _) in names::TLS_UPROBES {
        let uprobe: &mut UProbe = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
            .try_into()?;
        uprobe
            .load()
            .with_context(|| format!("the kernel verifier rejected {program}"))?;
    }
    let mut files = Vec::new();
    let mut last_err = None;
    for file in candidates(extra) {
        match attach_file(ebpf, &file, links) {
            Ok(()) => files.push(file),
            Err(err) => {
                tracing::debug!("no TLS uprobes on {}: {err:#}", file.display());
                last_err = Some(err);
            }
        }
    }
    if files.is_empty() {
        match last_err {
            Some(err) => bail!("no OpenSSL library could be probed ({err:#})"),
            None => bail!("no OpenSSL library (libssl.so.3) was found"),
        }
    }
    Ok(Attached { files })
}

/// The uprobes on one file, or none: a file that lacks one of the
/// functions (`SSL_read_ex` came with OpenSSL 1.1.1) gets those it has.
fn attach_file(ebpf: &mut Ebpf, file: &Path, links: &mut Vec<Link>) -> Result<()> {
    let mut attached = 0;
    let mut first_err = None;
    for (program, function, _) in names::TLS_UPROBES {
        let uprobe: &mut UProbe = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("eBPF object has no program {program}"))?
            .try_into()?;
        match uprobe.attach([function], file, UProbeScope::AllProcesses) {
            Ok(id) => {
                links.push(Box::new(uprobe.take_link(id)?));
                attached += 1;
            }
            Err(err) => {
                first_err.get_or_insert(anyhow!(err).context(function));
            }
        }
    }
    match first_err {
        Some(err) if attached == 0 => Err(err),
        _ => Ok(()),
    }
}

/// The files to probe, each once (by device and inode).
fn candidates(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = extra.to_vec();
    found.extend(SYSTEM_LIBSSL.iter().map(PathBuf::from));
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            found.extend(EXECUTABLES.iter().map(|name| dir.join(name)));
        }
    }
    found.extend(running());
    let mut seen = HashSet::new();
    found
        .into_iter()
        .filter(|path| {
            fs::metadata(path).is_ok_and(|m| m.is_file() && seen.insert((m.dev(), m.ino())))
        })
        .collect()
}

/// The `libssl` libraries running processes map, and their executables that
/// may carry OpenSSL themselves, by a path the daemon can open (through the
/// process's root: a container's files too).
fn running() -> Vec<PathBuf> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for path in maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
        {
            let base = path.rsplit('/').next().unwrap_or_default();
            let exe = EXECUTABLES.contains(&base);
            if (base.starts_with("libssl.so") || exe) && path.starts_with('/') {
                found.push(root.join(path.trim_start_matches('/')));
            }
        }
    }
    found
}
