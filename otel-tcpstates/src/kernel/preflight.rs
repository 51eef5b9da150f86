//! Checks that this host can run the tracer, each failure as one line that says what
//! to do: privileges, tracefs, the tracepoint and its record layout.
use std::{fs, io, path::Path};

use anyhow::{Context as _, Result, bail};
use caps::{CapSet, Capability};

pub const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEPOINT_FORMAT: &str = "events/sock/inet_sock_set_state/format";

/// Field offsets the eBPF program reads the tracepoint record at (Linux ≥ 4.16).
const EXPECTED_FIELDS: &[(&str, usize, usize)] = &[
    ("skaddr", 8, 8),
    ("oldstate", 16, 4),
    ("newstate", 20, 4),
    ("sport", 24, 2),
    ("dport", 26, 2),
    ("family", 28, 2),
    ("protocol", 30, 2),
    ("saddr", 32, 4),
    ("daddr", 36, 4),
    ("saddr_v6", 40, 16),
    ("daddr_v6", 56, 16),
];

pub fn run() -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    check_kernel(&release)?;
    if let Some(note) = skips_not_counted(&release) {
        tracing::info!("{note}");
    }
    check_privileges()?;
    raise_memlock_limit();
    ensure_tracefs()?;
    check_tracepoint(Path::new(TRACEFS))
}

/// The oldest kernel the tracer runs on: the BPF ring buffer arrived in Linux 5.8
/// (the tracepoint in 4.16). `--help` states it from here.
pub const MIN_LINUX: (u32, u32) = (5, 8);

/// The first Linux that counts the runs of a tracepoint program it skips (in
/// `recursion_misses`): commit dd8657894c11 ("bpf: Count missed stats in
/// trace_call_bpf"). Trampoline programs count theirs from 5.12, raw
/// tracepoints from 6.1 (05b24ff9b2cf), but the state-change program and most
/// incident programs are tracepoints.
pub const SKIPS_COUNTED_LINUX: (u32, u32) = (6, 7);

/// (major, minor) of a kernel release string, if it starts with them.
fn version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.trim().split(['.', '-']).map(|n| n.parse::<u32>());
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    }
}

/// On a kernel that does not count the tracepoint runs it skips, the one line
/// that says so: its skipped counts stay 0 whatever it skipped.
fn skips_not_counted(release: &str) -> Option<String> {
    let (major, minor) = SKIPS_COUNTED_LINUX;
    (version(release)? < SKIPS_COUNTED_LINUX).then(|| {
        format!(
            "this kernel ({}) does not count the tracepoint runs it skips (Linux \
             {major}.{minor} and later do): state changes and incident records skipped by \
             the kernel are not counted here",
            release.trim()
        )
    })
}

fn check_kernel(release: &str) -> Result<()> {
    if version(release).is_some_and(|v| v < MIN_LINUX) {
        let (need_major, need_minor) = MIN_LINUX;
        bail!(
            "this kernel ({}) is too old: otel-tcpstates needs Linux {need_major}.{need_minor} or newer (BPF ring buffer)",
            release.trim()
        );
    }
    Ok(())
}

fn has(cap: Capability) -> bool {
    caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false)
}

fn check_privileges() -> Result<()> {
    if has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
    {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (Capability::CAP_BPF, "CAP_BPF"),
        (Capability::CAP_PERFMON, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|(cap, _)| !has(*cap))
    .map(|(_, name)| name)
    .collect();
    bail!(
        "missing privileges: loading the eBPF program needs root or CAP_BPF and CAP_PERFMON \
         (missing: {}); run as root, e.g. `sudo otel-tcpstates`",
        missing.join(", ")
    )
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it where allowed.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(err) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {err}");
    }
}

/// Whether something is mounted at `path` (tracefs mounts are root-only, so the
/// directory may exist but be unreadable).
fn mounted(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|line| line.split_whitespace().nth(4) == Some(path))
    })
}

fn ensure_tracefs() -> Result<()> {
    let root = Path::new(TRACEFS);
    if root.join("events").is_dir() {
        return Ok(());
    }
    if mounted(TRACEFS) {
        bail!(
            "{TRACEFS} is mounted but not readable by this user; run as root, or add \
             CAP_DAC_READ_SEARCH to CAP_BPF and CAP_PERFMON"
        );
    }
    use nix::mount::{MsFlags, mount};
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mount(Some("tracefs"), root, Some("tracefs"), flags, None::<&str>) {
        Ok(()) => {
            tracing::info!("mounted tracefs at {TRACEFS}");
            Ok(())
        }
        Err(err) => bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({err}); \
             mount it as root with `mount -t tracefs tracefs {TRACEFS}`"
        ),
    }
}

fn check_tracepoint(tracefs: &Path) -> Result<()> {
    let path = tracefs.join(TRACEPOINT_FORMAT);
    let format = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            bail!(
                "this kernel ({}) has no tracepoint sock:inet_sock_set_state; it needs Linux 4.16 or newer",
                release.trim()
            )
        }
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    check_layout(&format)
}

/// Compares the tracepoint's format file with the offsets the eBPF program uses.
pub fn check_layout(format: &str) -> Result<()> {
    check_fields("sock:inet_sock_set_state", format, EXPECTED_FIELDS)
}

/// Checks that tracepoint `name`'s record (its `format` file) has each field at
/// the offset and size a program reads it from.
pub fn check_fields(name: &str, format: &str, fields: &[(&str, usize, usize)]) -> Result<()> {
    for &(field_name, offset, size) in fields {
        match field(format, field_name) {
            Some((o, s)) if (o, s) == (offset, size) => {}
            Some((o, s)) => bail!(
                "{name} has field {field_name} at offset {o} size {s}, \
                 expected offset {offset} size {size}; this kernel's layout is not supported yet, please report it"
            ),
            None => bail!(
                "{name} has no field {field_name}; this kernel's layout is not supported yet, please report it"
            ),
        }
    }
    Ok(())
}

fn field(format: &str, name: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        let declared = decl.rsplit(' ').next()?;
        let declared = declared.split('[').next()?.trim_start_matches('*');
        if declared != name {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        Some((offset?, size?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 2287
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:const void * skaddr;	offset:8;	size:8;	signed:0;
	field:int oldstate;	offset:16;	size:4;	signed:1;
	field:int newstate;	offset:20;	size:4;	signed:1;
	field:__u16 sport;	offset:24;	size:2;	signed:0;
	field:__u16 dport;	offset:26;	size:2;	signed:0;
	field:__u16 family;	offset:28;	size:2;	signed:0;
	field:__u16 protocol;	offset:30;	size:2;	signed:0;
	field:__u8 saddr[4];	offset:32;	size:4;	signed:0;
	field:__u8 daddr[4];	offset:36;	size:4;	signed:0;
	field:__u8 saddr_v6[16];	offset:40;	size:16;	signed:0;
	field:__u8 daddr_v6[16];	offset:56;	size:16;	signed:0;
";

    #[test]
    fn kernel_version_gate() {
        for ok in [
            "6.18.44-fc-v595",
            "5.8.0",
            "5.15.0-91-generic",
            "7.0",
            "garbage",
            "",
        ] {
            check_kernel(ok).unwrap();
        }
        let err = check_kernel("5.4.0-150-generic\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "this kernel (5.4.0-150-generic) is too old: otel-tcpstates needs Linux 5.8 or newer (BPF ring buffer)"
        );
        assert!(check_kernel("4.19.0").is_err());
    }

    #[test]
    fn kernels_before_6_7_say_their_skips_are_not_counted() {
        for counted in ["6.7.0", "6.18.44-fc-v595", "7.0", "garbage", ""] {
            assert_eq!(skips_not_counted(counted), None, "{counted}");
        }
        assert_eq!(
            skips_not_counted("6.6.30-generic\n").as_deref(),
            Some(
                "this kernel (6.6.30-generic) does not count the tracepoint runs it skips \
                 (Linux 6.7 and later do): state changes and incident records skipped by the \
                 kernel are not counted here"
            )
        );
        assert!(skips_not_counted("5.15.0-91-generic").is_some());
    }

    #[test]
    fn accepts_the_known_layout() {
        check_layout(FORMAT_6_18).unwrap();
    }

    #[test]
    fn rejects_a_moved_or_missing_field() {
        let moved = FORMAT_6_18.replace("sport;\toffset:24", "sport;\toffset:26");
        let err = check_layout(&moved).unwrap_err().to_string();
        assert!(err.contains("field sport at offset 26"), "{err}");
        let missing = FORMAT_6_18.replace("protocol;", "proto;");
        let err = check_layout(&missing).unwrap_err().to_string();
        assert!(err.contains("no field protocol"), "{err}");
    }
}
