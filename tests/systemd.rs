//! The systemd unit and its environment file in deploy/systemd/. Each is read by
//! the tool that will read it (systemd-analyze) and run for real: the daemon with
//! the unit's user, capabilities and system call filter must trace a real
//! connection, with span links attached; without CAP_NET_ADMIN as before, one
//! warning saying links are off; with `--no-links`, with CAP_BPF, CAP_PERFMON and
//! CAP_DAC_READ_SEARCH (as another user than root).
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use support::{
    BIN,
    deploy::{
        repo_file,
        run::{LINKS_CAP, PATH, Run, UNIT_CAPS, Var},
        text,
    },
    in_private_mounts, listen,
    otlp::{self, Receiver},
    remount_read_only, root_or_skip,
};

const UNIT: &str = "deploy/systemd/otel-tcpstates.service";
const ENV_FILE: &str = "deploy/systemd/otel-tcpstates.env";

/// The variables the daemon reads, itself or through the OpenTelemetry SDK (README,
/// "Sending it somewhere"), and OTEL_TCPSTATES_ARGS, which the unit's ExecStart uses.
const KNOWN_VARIABLES: &[&str] = &[
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_TCPSTATES_LOG",
    "OTEL_TCPSTATES_ARGS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// README's "What it needs" section.
fn readme_what_it_needs() -> String {
    let readme = repo_file("README.md");
    let start = readme
        .find("\n## What it needs\n")
        .expect("README has a \"What it needs\" section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_owned()
}

fn is_yes(value: &str) -> bool {
    matches!(value, "yes" | "true" | "on" | "1")
}

/// A unit file's assignments, in order, as (key, value), whatever the section.
struct Unit(Vec<(String, String)>);

impl Unit {
    fn parse(text: &str) -> Unit {
        let mut entries = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(
                !line.ends_with('\\'),
                "continued lines are not parsed here: {line}"
            );
            if line.starts_with('[') && line.ends_with(']') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            entries.push((key.trim().into(), value.trim().into()));
        }
        Unit(entries)
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key)[..] {
            [value] => value,
            ref values => panic!("{UNIT}: expected one {key}=, found {values:?}"),
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.all(key).last().is_some_and(|v| is_yes(v))
    }

    /// A list setting's words; an empty assignment resets the list, as in systemd.
    fn words(&self, key: &str) -> BTreeSet<String> {
        let mut words = BTreeSet::new();
        for value in self.all(key) {
            if value.is_empty() {
                words.clear();
            }
            words.extend(value.split_whitespace().map(String::from));
        }
        words
    }
}

fn unit() -> Unit {
    Unit::parse(&repo_file(UNIT))
}

/// The unit with ExecStart's binary replaced by the one under test, written as
/// otel-tcpstates.service into `dir`, for systemd-analyze (which checks that the
/// binary exists).
fn unit_for_analysis(dir: &TempDir) -> PathBuf {
    let text = repo_file(UNIT);
    let installed = unit()
        .one("ExecStart")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        installed.starts_with('/') && installed.ends_with("/otel-tcpstates"),
        "ExecStart runs {installed}"
    );
    let path = dir.0.join("otel-tcpstates.service");
    fs::write(
        &path,
        text.replace(
            &format!("ExecStart={installed}"),
            &format!("ExecStart={BIN}"),
        ),
    )
    .unwrap();
    path
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("otel-tcpstates-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (package systemd; scripts/setup.sh --test installs it)")
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = TempDir::new("verify");
    let path = unit_for_analysis(&dir);
    let out = systemd_analyze(&["verify", path.to_str().unwrap()]);
    // An unknown key, system call or capability is only a warning on stderr.
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify {UNIT}: {}",
        text(&out)
    );

    // ... which it does print: the assertion above can fail.
    let misspelt = fs::read_to_string(&path)
        .unwrap()
        .replace("LockPersonality=", "LockPersonalty=");
    fs::write(&path, misspelt).unwrap();
    let out = systemd_analyze(&["verify", path.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unknown key"),
        "{}",
        text(&out)
    );
}

/// systemd's own score of the sandbox: 2.1 ("OK"). It was 2.0 until span links
/// made CAP_NET_ADMIN necessary (systemd counts it 0.2 before weighting); it may
/// only go down: loosening a setting fails here.
#[test]
fn unit_exposure_is_low() {
    let dir = TempDir::new("security");
    let path = unit_for_analysis(&dir);
    let out = systemd_analyze(&[
        "security",
        "--offline=yes",
        "--threshold=21",
        path.to_str().unwrap(),
    ]);
    let report = text(&out);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure level: {report}"));
    println!(
        "{}",
        overall.trim_start_matches(|c: char| !c.is_ascii_alphabetic())
    );
    assert!(out.status.success(), "exposure above 2.1:\n{report}");
}

#[test]
fn unit_grants_exactly_the_documented_capabilities() {
    let unit = unit();
    let documented: BTreeSet<String> = UNIT_CAPS.iter().map(|c| c.to_string()).collect();
    assert_eq!(unit.words("CapabilityBoundingSet"), documented);
    assert_eq!(unit.words("AmbientCapabilities"), documented);
    // The README lists them, and what going without --links spares.
    let needs = readme_what_it_needs();
    for cap in UNIT_CAPS {
        assert!(needs.contains(&format!("`{cap}`")), "README omits {cap}");
    }
    assert!(needs.contains("`--links`"), "{needs}");
    // Attaching the packet programs opens the cgroup v2 root read-only, which
    // ProtectControlGroups=yes (a read-only /sys/fs/cgroup) allows. systemd 257's
    // `private` and `strict` would give the service a cgroup namespace and mount
    // its own cgroup there instead: the programs would attach to that, without a
    // warning, and see only the daemon's own packets (and container.id would be
    // lost).
    assert_eq!(unit.all("ProtectControlGroups"), ["yes"]);
    // Not as root: CAP_DAC_READ_SEARCH is there for a user other than root.
    assert!(unit.flag("DynamicUser"), "the unit runs as a dynamic user");
    assert!(unit.all("User").is_empty());
    assert!(unit.flag("NoNewPrivileges"));
    // Capabilities only count in the host's user namespace.
    assert!(!unit.flag("PrivateUsers"));
    // A bad setting (exit 2) is not retried forever.
    assert_eq!(unit.one("RestartPreventExitStatus"), "2");
}

/// `NAME=value` assignments of an environment file: the active ones, and the
/// commented-out examples (`#NAME=value`).
fn env_file() -> (Vec<Var>, Vec<Var>) {
    let is_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    };
    let (mut active, mut examples) = (Vec::new(), Vec::new());
    for line in repo_file(ENV_FILE).lines().map(str::trim) {
        let (commented, assignment) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        let Some((name, value)) = assignment.split_once('=') else {
            assert!(
                commented || line.is_empty(),
                "{ENV_FILE}: not NAME=value: {line}"
            );
            continue;
        };
        if !is_name(name) {
            assert!(commented, "{ENV_FILE}: bad name in {line}");
            continue;
        }
        // systemd strips one pair of surrounding quotes.
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let pair = (name.to_owned(), value.to_owned());
        if commented {
            examples.push(pair);
        } else {
            active.push(pair);
        }
    }
    (active, examples)
}

/// The command line the unit's ExecStart= makes in this environment: `$NAME`
/// alone becomes the value's words, `${NAME}` the value as one word.
fn exec_start_args(unit: &Unit, env: &[Var]) -> Vec<String> {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut words = unit.one("ExecStart").split_whitespace();
    words.next(); // the binary
    let mut args = Vec::new();
    for word in words {
        if let Some(name) = word.strip_prefix('$').filter(|n| !n.starts_with('{')) {
            args.extend(lookup(name).split_whitespace().map(String::from));
        } else if let Some(inner) = word.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            args.push(lookup(inner));
        } else {
            args.push(word.to_owned());
        }
    }
    args
}

#[test]
fn env_file_sets_only_what_the_daemon_reads() {
    let (active, examples) = env_file();
    for (name, _) in active.iter().chain(&examples) {
        assert!(
            KNOWN_VARIABLES.contains(&name.as_str()),
            "{ENV_FILE} sets {name}, which nothing reads"
        );
    }
    let active_names: BTreeSet<&str> = active.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(active_names.len(), active.len(), "a variable set twice");
    assert!(active_names.contains("OTEL_EXPORTER_OTLP_ENDPOINT"));

    let unit = unit();
    // The unit reads this file from where the README installs it, and nothing else.
    let env_path = unit.one("EnvironmentFile").trim_start_matches('-');
    assert!(env_path.ends_with("/otel-tcpstates.env"), "{env_path}");
    let readme = repo_file("README.md");
    let installed_bin = unit.one("ExecStart").split_whitespace().next().unwrap();
    for path in [env_path, installed_bin] {
        assert!(readme.contains(path), "README does not install {path}");
    }
    // Every variable ExecStart uses is one the file sets.
    let exec_start = unit.one("ExecStart");
    let used: Vec<&str> = exec_start
        .split('$')
        .skip(1)
        .map(|rest| {
            rest.trim_start_matches('{')
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap()
        })
        .collect();
    assert!(used.contains(&"OTEL_TCPSTATES_ARGS"), "{exec_start}");
    for name in used {
        assert!(
            active_names.contains(name),
            "ExecStart uses ${name}, unset in {ENV_FILE}"
        );
    }
}

/// Each commented-out example of the environment file, switched on, is accepted
/// by the daemon: it gets as far as the privilege check (exit 1), past flag and
/// OTEL_* checking (exit 2). Files named there do not exist here, so those are left
/// out.
#[test]
fn env_file_examples_are_accepted() {
    let (active, examples) = env_file();
    let names_a_file = |name: &str| name.ends_with("CERTIFICATE") || name.ends_with("KEY");
    let mut env: Vec<Var> = active;
    env.extend(examples.into_iter().filter(|(n, _)| !names_a_file(n)));
    // Each value of OTEL_TCPSTATES_ARGS, the active one and the examples, in turn.
    let mut tried = 0;
    for (_, value) in env.iter().filter(|(n, _)| n == "OTEL_TCPSTATES_ARGS") {
        let only = [("OTEL_TCPSTATES_ARGS".to_owned(), value.clone())];
        accepted_without_privileges(&exec_start_args(&unit(), &only), &env);
        tried += 1;
    }
    assert!(
        tried >= 2,
        "{ENV_FILE} shows no example of OTEL_TCPSTATES_ARGS"
    );
}

/// Runs the daemon with no privileges at all: it must stop at the privilege check
/// (exit 1), so its flags and environment passed.
fn accepted_without_privileges(args: &[String], env: &[Var]) {
    let mut command = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(BIN);
        c
    } else {
        Command::new(BIN)
    };
    let out = command
        .args(args)
        .env_clear()
        .env("PATH", PATH)
        .envs(env.iter().map(|(n, v)| (n, v)))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("missing privileges"),
        "otel-tcpstates {args:?} with {env:?}: {:?} {stderr}",
        out.status
    );
}

/// The system calls in each of systemd's groups (`@system-service`, ...).
fn syscall_groups() -> BTreeMap<String, Vec<String>> {
    let out = systemd_analyze(&["syscall-filter"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_owned());
            groups.entry(line.trim().to_owned()).or_default();
        } else if let Some(group) = &current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                groups.get_mut(group).unwrap().push(item.to_owned());
            }
        }
    }
    assert!(groups.contains_key("@system-service"), "{groups:?}");
    groups
}

fn expand(item: &str, groups: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
    match groups.get(item) {
        Some(members) => members.iter().for_each(|m| expand(m, groups, out)),
        None => {
            assert!(!item.starts_with('@'), "unknown group {item}");
            out.insert(item.to_owned());
        }
    }
}

/// What the unit's SystemCallFilter= lets through, applied as systemd does: an
/// allow list (which always includes @default), then each later line adds or, with
/// `~`, removes.
fn allowed_syscalls(unit: &Unit) -> BTreeSet<String> {
    let groups = syscall_groups();
    let lines = unit.all("SystemCallFilter");
    assert!(
        lines.first().is_some_and(|l| !l.starts_with('~')),
        "SystemCallFilter= should start with an allow list: {lines:?}"
    );
    let mut allowed = BTreeSet::new();
    expand("@default", &groups, &mut allowed);
    for line in lines {
        let (deny, items) = match line.strip_prefix('~') {
            Some(items) => (true, items),
            None => (false, line),
        };
        for item in items.split_whitespace() {
            let mut set = BTreeSet::new();
            // `name:errno` sets the error for that call; the name is what counts.
            expand(item.split(':').next().unwrap(), &groups, &mut set);
            if deny {
                allowed.retain(|s| !set.contains(s));
            } else {
                allowed.extend(set);
            }
        }
    }
    allowed
}

/// The name of the system call on a line of `strace -f` output
/// (`PID name(args) = ...`, `PID <... name resumed> ...`).
fn syscall_name(line: &str) -> Option<&str> {
    let rest = line.split_once(' ')?.1.trim_start();
    let name = match rest.strip_prefix("<... ") {
        Some(resumed) => resumed.split(' ').next()?,
        None => rest.split('(').next()?,
    };
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then_some(name)
}

/// Whatever in a strace log the unit's sandbox would refuse.
fn sandbox_violations(unit: &Unit, log: &str) -> Vec<String> {
    let allowed = allowed_syscalls(unit);
    let families = unit.words("RestrictAddressFamilies");
    let wx = unit.flag("MemoryDenyWriteExecute");
    let namespaces = unit.flag("RestrictNamespaces");
    let read_only = unit.all("ProtectSystem").last() == Some(&"strict");
    let (devices_only, homes) = (unit.flag("PrivateDevices"), unit.flag("ProtectHome"));
    // Under ProtectSystem=strict, ProtectHome=yes and PrivateDevices=yes.
    let devices = [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
    ];
    let writes = [
        "creat",
        "mkdir",
        "mkdirat",
        "unlink",
        "unlinkat",
        "rename",
        "renameat",
        "renameat2",
        "link",
        "linkat",
        "symlink",
        "symlinkat",
        "truncate",
        "chmod",
        "fchmodat",
        "chown",
        "fchownat",
        "mknod",
        "mknodat",
    ];
    let mut found = Vec::new();
    for line in log.lines() {
        let Some(name) = syscall_name(line) else {
            continue;
        };
        // A call another thread interrupted in the log: its `<unfinished ...>`
        // line named it with its arguments, and was checked.
        if line.contains("<... ") {
            continue;
        }
        let mut refuse = |why: &str| found.push(format!("{why}: {line}"));
        if !allowed.contains(name) {
            refuse("system call outside SystemCallFilter=");
        }
        if matches!(name, "socket" | "socketpair") {
            let family = line.split('(').nth(1).and_then(|a| a.split(',').next());
            if !family.is_some_and(|f| families.contains(f)) {
                refuse("address family outside RestrictAddressFamilies=");
            }
        }
        if wx
            && ((name == "mmap" && line.contains("PROT_WRITE") && line.contains("PROT_EXEC"))
                || (matches!(name, "mprotect" | "pkey_mprotect") && line.contains("PROT_EXEC")))
        {
            refuse("writable and executable memory (MemoryDenyWriteExecute=)");
        }
        if namespaces
            && (name == "setns"
                || ((name.starts_with("clone") || name == "unshare") && line.contains("CLONE_NEW")))
        {
            refuse("a new namespace (RestrictNamespaces=)");
        }
        if read_only && writes.contains(&name) {
            refuse("a change to the file system (ProtectSystem=strict)");
        }
        if matches!(name, "open" | "openat" | "openat2") {
            if read_only
                && ["O_WRONLY", "O_RDWR", "O_CREAT"]
                    .iter()
                    .any(|f| line.contains(f))
            {
                refuse("a file opened for writing (ProtectSystem=strict)");
            }
            let path = line.split('"').nth(1).unwrap_or_default();
            if devices_only && path.starts_with("/dev/") && !devices.contains(&path) {
                refuse("a device (PrivateDevices=)");
            }
            if homes
                && ["/home/", "/root/", "/run/user/"]
                    .iter()
                    .any(|p| path.starts_with(p))
            {
                refuse("a home directory (ProtectHome=)");
            }
        }
    }
    found
}

/// The setpriv arguments that give a process what the unit gives the daemon, less
/// the capabilities in `without`: the unit's user (DynamicUser=yes: a uid and gid
/// no file belongs to, the first systemd picks; no supplementary groups), its
/// capabilities as the inheritable, ambient and bounding sets, and no_new_privs.
fn unit_privileges(unit: &Unit, without: &[&str]) -> Vec<String> {
    let caps = |set: BTreeSet<String>| {
        let named: Vec<String> = set
            .iter()
            .filter(|c| !without.contains(&c.as_str()))
            .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect();
        format!("-all,{}", named.join(","))
    };
    let ambient = caps(unit.words("AmbientCapabilities"));
    assert!(unit.flag("DynamicUser"));
    let mut setpriv = vec![
        "--reuid=61184".to_owned(),
        "--regid=61184".to_owned(),
        "--clear-groups".to_owned(),
        format!("--inh-caps={ambient}"),
        format!("--ambient-caps={ambient}"),
        format!(
            "--bounding-set={}",
            caps(unit.words("CapabilityBoundingSet"))
        ),
    ];
    if unit.flag("NoNewPrivileges") {
        setpriv.push("--no-new-privs".into());
    }
    setpriv
}

/// The unit's protection of /sys, as far as the daemon sees it: under
/// ProtectKernelTunables=yes all of /sys is read-only, under
/// ProtectControlGroups=yes /sys/fs/cgroup, where the cgroup v2 root the packet
/// programs attach to is. `unshare` making that tree read-only in a mount
/// namespace of its own, then exec'ing what is appended to it.
fn unit_mounts(unit: &Unit) -> Command {
    let tree = if unit.flag("ProtectKernelTunables") {
        Some("/sys")
    } else if unit.flag("ProtectControlGroups") {
        Some("/sys/fs/cgroup")
    } else {
        None
    };
    let remount = tree.map_or(String::new(), remount_read_only);
    in_private_mounts(&format!("set -e\n{remount}exec \"$@\"\n"), false)
}

/// The environment file's settings, its endpoint a test receiver (by name, so
/// resolving a host name is under the system call filter too).
fn unit_env(receiver: &Receiver) -> Vec<Var> {
    let (active, _) = env_file();
    let protocol = active
        .iter()
        .find(|(n, _)| n == "OTEL_EXPORTER_OTLP_PROTOCOL")
        .map_or("http/protobuf", |(_, v)| v.as_str());
    let endpoint = match protocol {
        "grpc" => receiver.grpc_endpoint(),
        _ => receiver.http_endpoint(),
    }
    .replace("127.0.0.1", "localhost");
    active
        .into_iter()
        .map(|(name, value)| match name.as_str() {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => (name, endpoint.clone()),
            _ => (name, value),
        })
        .collect()
}

/// The daemon as the unit starts it, less the capabilities in `without` and with
/// `extra` arguments after ExecStart's: the unit's user, capability sets and
/// no_new_privs, /sys read-only, a clean environment with the environment file's
/// settings (endpoint: a test receiver) and ExecStart's arguments, tracing the
/// test's port only. With `strace`, every system call it makes is logged there.
fn run_as_the_unit(without: &[&str], extra: &[&str], strace: Option<&Path>) -> Run {
    let unit = unit();
    let receiver = Receiver::start();
    let env = unit_env(&receiver);
    let (listener, server) = listen("127.0.0.1");
    let mut args = exec_start_args(&unit, &env);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.extend(["-D".into(), server.port().to_string()]);

    let mut command = unit_mounts(&unit);
    command.arg("setpriv").args(unit_privileges(&unit, without));
    if let Some(log) = strace {
        // strace runs as the daemon's user (so it lends it nothing).
        command.args(["strace", "-f", "-qq", "-o"]).arg(log);
    }
    command
        .arg(BIN)
        .args(&args)
        .env_clear()
        .env("PATH", PATH)
        .envs(env.iter().map(|(n, v)| (n, v)));
    Run::go(command, strace.is_some(), &receiver, &listener)
}

/// The bpf(BPF_LINK_CREATE) calls of a strace log that attached a program to a
/// cgroup, by attach type (a call another thread interrupted in the log counts,
/// its result on a later line: that the links hold is checked in the kernel's
/// fdinfo, this only that the filter let the call through).
fn cgroup_links_created(log: &str) -> BTreeSet<&str> {
    log.lines()
        .filter(|l| l.contains("bpf(BPF_LINK_CREATE") && !l.contains("= -1"))
        .filter_map(|l| l.split("attach_type=").nth(1)?.split([',', '}']).next())
        .filter(|t| t.starts_with("BPF_CGROUP_"))
        .collect()
}

/// The daemon as the unit starts it, with everything the unit gives it, under
/// strace: every system call it makes, address family it opens and mapping it
/// asks for must be one the unit's sandbox allows. It traces a connection, and
/// the packet programs behind span links are attached to the host's cgroup v2
/// root, with no warning.
#[test]
fn runs_as_the_unit_would() {
    if !root_or_skip("runs_as_the_unit_would") {
        return;
    }
    let unit = unit();
    let dir = TempDir::new("strace");
    let log = dir.0.join("strace.log");
    // strace runs as the daemon's user and logs here.
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o777)).unwrap();
    let started = Instant::now();
    let run = run_as_the_unit(&[], &[], Some(&log));
    let took = started.elapsed();

    let (root, children) = run.traced();
    assert_eq!(root.kind, otlp::KIND_CLIENT);
    assert_eq!(
        root.int_attr("process.pid"),
        Some(i64::from(std::process::id())),
        "the owner is this test"
    );
    assert!(
        otlp::names(children).starts_with(&["SYN_SENT", "ESTABLISHED"]),
        "{:?}",
        otlp::names(children)
    );
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
    run.assert_links_attached();

    let log = fs::read_to_string(&log).unwrap();
    let violations = sandbox_violations(&unit, &log);
    assert!(
        violations.is_empty(),
        "the unit's sandbox would refuse:\n{}",
        violations.join("\n")
    );
    let calls: BTreeSet<&str> = log.lines().filter_map(syscall_name).collect();
    for needed in ["bpf", "perf_event_open"] {
        assert!(
            calls.contains(needed),
            "strace saw no {needed}(): {calls:?}"
        );
    }
    assert_eq!(
        cgroup_links_created(&log),
        BTreeSet::from(["BPF_CGROUP_INET_EGRESS", "BPF_CGROUP_INET_INGRESS"]),
        "strace saw no bpf(BPF_LINK_CREATE) to the cgroup for both directions"
    );
    eprintln!(
        "ran for {took:?} under strace; {} distinct system calls, all allowed",
        calls.len()
    );
}

/// The unit without CAP_NET_ADMIN: it runs and exports as before, and says once
/// that span links are off, and why.
#[test]
fn unit_without_net_admin_exports_without_span_links() {
    if !root_or_skip("unit_without_net_admin_exports_without_span_links") {
        return;
    }
    let run = run_as_the_unit(&[LINKS_CAP], &[], None);
    let (root, _) = run.traced();
    assert_eq!(root.kind, otlp::KIND_CLIENT);
    run.assert_links_off_for_want_of_net_admin();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// `--no-links` as the unit's user needs the unit's capabilities but
/// CAP_NET_ADMIN, and says nothing of span links.
#[test]
fn unit_with_no_links_needs_no_net_admin() {
    if !root_or_skip("unit_with_no_links_needs_no_net_admin") {
        return;
    }
    let run = run_as_the_unit(&[LINKS_CAP], &["--no-links"], None);
    let (root, _) = run.traced();
    assert_eq!(root.kind, otlp::KIND_CLIENT);
    run.assert_no_links_loaded();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}
