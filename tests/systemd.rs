//! The deployment files in deploy/: the systemd unit and its environment file, and
//! the Kubernetes manifest. Each is read by the tools that will read it
//! (systemd-analyze, the Kubernetes API schemas) and run for real: the daemon with
//! the unit's user, capabilities and system call filter, and with the DaemonSet
//! container's privileges, flags and environment, must trace a real connection,
//! with span links attached; without CAP_NET_ADMIN as before, one warning saying
//! links are off; with `--no-links`, with CAP_BPF and CAP_PERFMON alone (and
//! CAP_DAC_READ_SEARCH as another user than root).
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use serde_json::Value;
use support::{
    BIN,
    deploy::{Bind, LINKS_CAP, Run, in_container},
    listen,
    otlp::{self, Receiver},
    root_or_skip,
};

const UNIT: &str = "deploy/systemd/otel-tcpstates.service";
const ENV_FILE: &str = "deploy/systemd/otel-tcpstates.env";
const MANIFEST: &str = "deploy/kubernetes/otel-tcpstates.yaml";

/// What the daemon needs as a user other than root, exporting with span links
/// (README, "What it needs"): loading the programs takes CAP_BPF and CAP_PERFMON,
/// reading tracefs (root's only) CAP_DAC_READ_SEARCH, attaching the packet
/// programs to the cgroup v2 root CAP_NET_ADMIN.
const UNIT_CAPS: [&str; 4] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_DAC_READ_SEARCH",
    "CAP_NET_ADMIN",
];
/// As root, in Kubernetes' spelling: root owns tracefs.
const ROOT_CAPS: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];
/// As root with `--no-links`: loading the tracepoint's program, nothing more.
const NO_LINKS_ROOT_CAPS: [&str; 2] = ["BPF", "PERFMON"];

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
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_TCPSTATES_LOG",
    "OTEL_TCPSTATES_ARGS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The PATH systemd gives a service.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where `scripts/setup.sh --test` installs kubernetes-validate; keep in sync.
const KUBERNETES_VALIDATE_DIR: &str = "otel-tcpstates-kubernetes-validate";

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    fs::read_to_string(&full).unwrap_or_else(|err| panic!("reading {}: {err}", full.display()))
}

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

// ---------------------------------------------------------------------------------
// systemd

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

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
    // The README lists them, and what --no-links spares.
    let needs = readme_what_it_needs();
    for cap in UNIT_CAPS {
        assert!(needs.contains(&format!("`{cap}`")), "README omits {cap}");
    }
    assert!(needs.contains("`--no-links`"), "{needs}");
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

/// An environment variable: name, value.
type Var = (String, String);

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
    let remount = tree.map_or(String::new(), |tree| {
        format!(
            "findmnt -Rrno TARGET {tree} | while read -r m; do mount -o remount,bind,ro \"$m\"; done\n"
        )
    });
    let script = format!("set -e\n{remount}exec \"$@\"\n");
    let mut command = Command::new("unshare");
    command.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    command
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

// ---------------------------------------------------------------------------------
// Kubernetes

fn manifest() -> Vec<Value> {
    serde_saphyr::from_multiple(&repo_file(MANIFEST))
        .unwrap_or_else(|err| panic!("{MANIFEST}: {err}"))
}

fn object<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    match docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .collect::<Vec<_>>()[..]
    {
        [one] => one,
        ref found => panic!("{MANIFEST}: expected one {kind}, found {}", found.len()),
    }
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

fn pod_spec(docs: &[Value]) -> &Value {
    &object(docs, "DaemonSet")["spec"]["template"]["spec"]
}

/// Every container of the pod, sidecars (restartable init containers) included.
fn containers(spec: &Value) -> Vec<&Value> {
    list(&spec["initContainers"])
        .iter()
        .chain(list(&spec["containers"]))
        .collect()
}

fn daemon_container(spec: &Value) -> &Value {
    let found: Vec<&Value> = list(&spec["containers"])
        .iter()
        .filter(|c| str_of(&c["image"], "image").starts_with("otel-tcpstates:"))
        .collect();
    assert_eq!(found.len(), 1, "one otel-tcpstates container");
    found[0]
}

fn collector_container(spec: &Value) -> &Value {
    let found: Vec<&Value> = containers(spec)
        .into_iter()
        .filter(|c| str_of(&c["image"], "image").contains("opentelemetry-collector"))
        .collect();
    assert_eq!(found.len(), 1, "one collector container");
    found[0]
}

/// Values the downward API fills in, for a made-up pod.
fn downward(field: &str, namespace: &str) -> String {
    match field {
        "spec.nodeName" => "node-a".into(),
        "metadata.name" => "otel-tcpstates-x7k2p".into(),
        "metadata.namespace" => namespace.into(),
        "metadata.uid" => "6f1b2c3d-0000-4000-8000-00000000000a".into(),
        // Only ever a label here: nothing connects to it.
        "status.hostIP" => "192.0.2.10".into(),
        other => panic!("no sample value for the downward API's {other}"),
    }
}

/// The fields the downward API offers as environment variables.
const DOWNWARD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];

/// A container's environment as the kubelet makes it: field references filled in
/// and `$(NAME)` expanded from the variables defined before it (a later or unknown
/// one stays as written).
fn container_env(container: &Value, namespace: &str) -> Vec<Var> {
    let mut env: Vec<Var> = Vec::new();
    for var in list(&container["env"]) {
        let name = str_of(&var["name"], "env name").to_owned();
        let value = if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert!(
                DOWNWARD_FIELDS.contains(&field),
                "{name}: no such field {field}"
            );
            downward(field, namespace)
        } else {
            let mut value = str_of(&var["value"], &name).to_owned();
            for (known, known_value) in &env {
                value = value.replace(&format!("$({known})"), known_value);
            }
            value
        };
        env.push((name, value));
    }
    env
}

fn env_value<'a>(env: &'a [Var], name: &str) -> Option<&'a str> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Kubernetes quantities (`128Mi`, `1`, `100m`) in bytes or millicores.
fn quantity(value: &Value) -> f64 {
    let text = match value {
        Value::Number(n) => return n.as_f64().unwrap(),
        other => str_of(other, "quantity"),
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("quantity {text}"));
    number
        * match unit {
            "" => 1.0,
            "m" => 0.001,
            "Ki" => 1024.0,
            "Mi" => 1024.0 * 1024.0,
            "Gi" => 1024.0 * 1024.0 * 1024.0,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            other => panic!("quantity unit {other} in {text}"),
        }
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn manifest_passes_the_kubernetes_schemas() {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let dir = cargo_home.join(KUBERNETES_VALIDATE_DIR);
    assert!(
        dir.join("kubernetes_validate").is_dir(),
        "kubernetes-validate is not installed in {}; run scripts/setup.sh --test",
        dir.display()
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(MANIFEST);
    // The newest Kubernetes it knows, and 1.29, the first with native sidecars.
    // --strict: a misspelt or misplaced field is an error, not ignored.
    for version in [None, Some("1.29.0")] {
        let mut command = Command::new("python3");
        command
            .env("PYTHONPATH", &dir)
            .args(["-m", "kubernetes_validate", "--strict"]);
        if let Some(version) = version {
            command.args(["-k", version]);
        }
        let out = command.arg(&path).output().expect("python3");
        let report = text(&out);
        assert!(out.status.success(), "{MANIFEST} ({version:?}):\n{report}");
        assert_eq!(
            report.matches(" passed for resource ").count(),
            manifest().len(),
            "{report}"
        );
    }
}

#[test]
fn daemonset_runs_the_daemon_on_every_node_with_least_privilege() {
    let docs = manifest();
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "namespace");
    // hostPID, hostNetwork and hostPath volumes need the privileged policy.
    assert_eq!(
        object(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    // Everything namespaced is in ours (cluster-scoped: the namespace and the
    // collector's read-only role and its binding).
    let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
    for doc in docs
        .iter()
        .filter(|d| !cluster_scoped.iter().any(|k| d["kind"] == *k))
    {
        assert_eq!(doc["metadata"]["namespace"], namespace, "{}", doc["kind"]);
    }
    let ds = object(&docs, "DaemonSet");
    let template_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in ds["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &template_labels[key], value,
            "the selector matches the pods"
        );
    }
    let spec = pod_spec(&docs);
    assert_eq!(
        spec["serviceAccountName"],
        object(&docs, "ServiceAccount")["metadata"]["name"]
    );
    assert_eq!(spec["hostPID"], true, "pids and /proc are the node's");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert!(
        list(&spec["tolerations"])
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "tolerates every taint: {}",
        spec["tolerations"]
    );

    let daemon = daemon_container(spec);
    let security = &daemon["securityContext"];
    let capabilities = &security["capabilities"];
    assert_eq!(capabilities["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<&str> = list(&capabilities["add"])
        .iter()
        .map(|c| str_of(c, "capability"))
        .collect();
    let as_root = security["runAsUser"] == 0 && security["runAsNonRoot"] != true;
    // Span links (on unless --no-links) take NET_ADMIN; without them it is spared.
    let no_links = list(&daemon["args"]).iter().any(|a| a == "--no-links");
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let shipped: Vec<&str> = if as_root {
        ROOT_CAPS.to_vec()
    } else {
        UNIT_CAPS
            .iter()
            .map(|c| c.trim_start_matches("CAP_"))
            .collect()
    };
    let expected: BTreeSet<&str> = shipped
        .into_iter()
        .filter(|c| !(no_links && *c == net_admin))
        .collect();
    assert_eq!(
        added, expected,
        "as root: {as_root}, --no-links: {no_links}"
    );
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_ne!(security["privileged"], true);

    // The host's kernel files, each read-only at the same path.
    let volumes = list(&spec["volumes"]);
    for path in ["/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup"] {
        let mount = list(&daemon["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        assert_eq!(volume["hostPath"]["path"], path);
    }
    // Nothing in the pod writes: every mount is read-only.
    for container in containers(spec) {
        for mount in list(&container["volumeMounts"]) {
            assert_eq!(
                mount["readOnly"], true,
                "{} {}",
                container["name"], mount["mountPath"]
            );
        }
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    }
}

#[test]
fn resource_attributes_come_from_the_downward_api() {
    let docs = manifest();
    let spec = pod_spec(&docs);
    let daemon = daemon_container(spec);
    let declared: Vec<&str> = list(&daemon["env"])
        .iter()
        .map(|v| str_of(&v["name"], "env name"))
        .collect();
    let raw = list(&daemon["env"])
        .iter()
        .find(|v| v["name"] == "OTEL_RESOURCE_ATTRIBUTES")
        .map(|v| str_of(&v["value"], "OTEL_RESOURCE_ATTRIBUTES"))
        .expect("OTEL_RESOURCE_ATTRIBUTES is set");
    let position = |name: &str| declared.iter().position(|d| *d == name);
    let mut keys = BTreeSet::new();
    for item in raw.split(',') {
        let (key, value) = item.split_once('=').unwrap_or_else(|| panic!("{item}"));
        keys.insert(key);
        let var = value
            .strip_prefix("$(")
            .and_then(|v| v.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{key} is not from a variable: {value}"));
        // Kubernetes expands $(VAR) only from variables defined before.
        assert!(
            position(var) < position("OTEL_RESOURCE_ATTRIBUTES") && position(var).is_some(),
            "{var} is not defined before OTEL_RESOURCE_ATTRIBUTES"
        );
        let source = list(&daemon["env"])
            .iter()
            .find(|v| v["name"] == var)
            .unwrap();
        assert!(
            source["valueFrom"]["fieldRef"]["fieldPath"].is_string(),
            "{var} is not from the downward API"
        );
    }
    for key in ["k8s.node.name", "host.ip"] {
        assert!(keys.contains(key), "{key} missing from {raw}");
    }
    // The pod and namespace of a span's resource are the traced container's, added
    // by the collector's k8sattributes, which keeps values already set: the
    // tracer's own would hide them.
    for key in ["k8s.pod.name", "k8s.namespace.name", "k8s.pod.uid"] {
        assert!(!keys.contains(key), "{key} in {raw}");
    }
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "ns");
    let env = container_env(daemon, namespace);
    assert!(!env.iter().any(|(_, v)| v.contains("$(")), "{env:?}");
}

/// The agent collector names the workload behind each span from its resource's
/// container.id (k8sattributes, watching only its node's pods), with the read-only
/// API access that takes, bound to the pod's service account, whose token is mounted.
#[test]
fn the_agent_names_each_spans_workload_from_its_container() {
    let docs = manifest();
    let config = collector_config(&docs);
    let k8s = &config["processors"]["k8sattributes"];
    assert_eq!(k8s["filter"]["node_from_env_var"], "K8S_NODE_NAME");
    let sources = list(&list(&k8s["pod_association"])[0]["sources"]);
    assert_eq!(sources[0]["from"], "resource_attribute");
    assert_eq!(sources[0]["name"], "container.id");
    let traces: Vec<&str> = list(&config["service"]["pipelines"]["traces"]["processors"])
        .iter()
        .map(|p| str_of(p, "processor"))
        .collect();
    assert!(traces.contains(&"k8sattributes"), "{traces:?}");
    let spec = pod_spec(&docs);
    let collector = collector_container(spec);
    let node = list(&collector["env"])
        .iter()
        .find(|v| v["name"] == "K8S_NODE_NAME")
        .expect("the collector knows its node");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    // The API token in the collector alone.
    assert_eq!(spec["automountServiceAccountToken"], false);
    let token_volume = list(&spec["volumes"])
        .iter()
        .find(|v| {
            list(&v["projected"]["sources"])
                .iter()
                .any(|s| s["serviceAccountToken"]["path"] == "token")
        })
        .expect("a projected service account token");
    let mounts = |container: &Value| {
        list(&container["volumeMounts"])
            .iter()
            .filter(|m| m["name"] == token_volume["name"])
            .map(|m| str_of(&m["mountPath"], "mountPath").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        mounts(collector),
        ["/var/run/secrets/kubernetes.io/serviceaccount"]
    );
    assert!(mounts(daemon_container(spec)).is_empty());

    let role = object(&docs, "ClusterRole");
    let rules = list(&role["rules"]);
    let allows = |group: &str, resource: &str| {
        rules.iter().any(|r| {
            list(&r["apiGroups"]).iter().any(|g| g == group)
                && list(&r["resources"]).iter().any(|x| x == resource)
                && ["get", "watch", "list"]
                    .iter()
                    .all(|v| list(&r["verbs"]).iter().any(|x| x == v))
        })
    };
    for (group, resource) in [("", "pods"), ("", "namespaces"), ("apps", "replicasets")] {
        assert!(allows(group, resource), "{group}/{resource} not readable");
    }
    // Read-only.
    for rule in rules {
        for verb in list(&rule["verbs"]) {
            assert!(
                ["get", "watch", "list"].contains(&str_of(verb, "verb")),
                "{rule:?}"
            );
        }
    }
    let binding = object(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = &list(&binding["subjects"])[0];
    assert_eq!(subject["name"], spec["serviceAccountName"]);
    assert_eq!(
        subject["namespace"],
        object(&docs, "Namespace")["metadata"]["name"]
    );
}

/// The collector configuration the sidecar reads: the ConfigMap key mounted where
/// its `--config` points.
fn collector_config(docs: &[Value]) -> Value {
    let spec = pod_spec(docs);
    let collector = collector_container(spec);
    let args: Vec<&str> = list(&collector["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let config = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--config") {
            Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
            Some("") => args.get(i + 1).copied(),
            _ => None,
        })
        .expect("the collector is given --config");
    let config = Path::new(config);
    let (dir, file) = (config.parent().unwrap(), config.file_name().unwrap());
    let mount = list(&collector["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir.to_str().unwrap())
        .unwrap_or_else(|| panic!("nothing is mounted at {}", dir.display()));
    let volume = list(&spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map = object(docs, "ConfigMap");
    assert_eq!(volume["configMap"]["name"], map["metadata"]["name"]);
    let key = file.to_str().unwrap();
    let text = str_of(&map["data"][key], "the collector's config");
    serde_saphyr::from_str(text).unwrap_or_else(|err| panic!("collector config: {err}"))
}

fn host_port(endpoint: &str) -> (&str, u16) {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    (host, port.parse().unwrap())
}

/// Ports an OpenTelemetry Collector takes by default: a collector of the node's own
/// may hold them, and this pod shares the node's network.
const COLLECTOR_DEFAULT_PORTS: &[u16] = &[4317, 4318, 13133, 8888, 8889, 55679, 1777];

#[test]
fn collector_pipelines_are_complete_and_fed_by_the_daemon() {
    let docs = manifest();
    let config = collector_config(&docs);
    let pipelines = config["service"]["pipelines"]
        .as_object()
        .expect("service.pipelines");
    // Every component defined is used, and every one used is defined.
    for kind in ["receivers", "processors", "exporters", "extensions"] {
        let defined: BTreeSet<&str> = config[kind]
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let used: BTreeSet<&str> = match kind {
            "extensions" => list(&config["service"]["extensions"])
                .iter()
                .map(|e| str_of(e, "extension"))
                .collect(),
            _ => pipelines
                .values()
                .flat_map(|p| list(&p[kind]))
                .map(|c| str_of(c, kind))
                .collect(),
        };
        assert_eq!(defined, used, "{kind}: defined vs used");
    }
    for (name, pipeline) in pipelines {
        let processors: Vec<&str> = list(&pipeline["processors"])
            .iter()
            .map(|p| str_of(p, "processor"))
            .collect();
        assert_eq!(
            processors.first().map(|p| p.split('/').next().unwrap()),
            Some("memory_limiter"),
            "{name}: memory_limiter must come first"
        );
        assert!(processors.iter().any(|p| p.starts_with("batch")), "{name}");
        assert!(!list(&pipeline["receivers"]).is_empty(), "{name}");
        assert!(!list(&pipeline["exporters"]).is_empty(), "{name}");
    }

    // The daemon sends to the otlp receiver, same port, same protocol, and both
    // what it sends (traces, and its own metrics) have a pipeline from there.
    let spec = pod_spec(&docs);
    let env = container_env(daemon_container(spec), "ns");
    let endpoint = env_value(&env, "OTEL_EXPORTER_OTLP_ENDPOINT").expect("endpoint");
    let protocol = env_value(&env, "OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or("http/protobuf");
    let url = endpoint
        .strip_prefix("http://")
        .expect("plain http on loopback");
    let wire = if protocol == "grpc" { "grpc" } else { "http" };
    let receiver = config["receivers"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(name, r)| {
            name.split('/').next() == Some("otlp")
                && r["protocols"][wire]["endpoint"].as_str() == Some(url.trim_end_matches('/'))
        })
        .map(|(name, _)| name.as_str())
        .unwrap_or_else(|| panic!("no otlp receiver takes {protocol} at {url}"));
    for signal in ["traces", "metrics"] {
        assert!(
            pipelines.iter().any(|(name, p)| {
                name.split('/').next() == Some(signal)
                    && list(&p["receivers"]).iter().any(|r| r == receiver)
            }),
            "no {signal} pipeline from {receiver}"
        );
    }

    // Everything the collector listens on: loopback only, away from the defaults.
    let mut listens: Vec<(String, u16)> = Vec::new();
    for section in ["receivers", "extensions"] {
        let mut stack = vec![&config[section]];
        while let Some(value) = stack.pop() {
            match value {
                Value::Object(map) => {
                    if let Some(endpoint) = map.get("endpoint").and_then(Value::as_str) {
                        let (host, port) = host_port(endpoint);
                        listens.push((host.to_owned(), port));
                    }
                    stack.extend(map.values());
                }
                Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
    }
    for reader in list(&config["service"]["telemetry"]["metrics"]["readers"]) {
        let prometheus = &reader["pull"]["exporter"]["prometheus"];
        listens.push((
            str_of(&prometheus["host"], "host").to_owned(),
            prometheus["port"].as_u64().unwrap() as u16,
        ));
    }
    assert!(
        !config["service"]["telemetry"]["metrics"]["readers"].is_null(),
        "the collector's own metrics would take its default port 8888"
    );
    for (host, port) in &listens {
        assert_eq!(host, "127.0.0.1", "listens on {host}:{port}");
        assert!(
            !COLLECTOR_DEFAULT_PORTS.contains(port),
            "port {port} is a default one"
        );
    }
    println!("collector listens on {listens:?}");

    // Liveness (and start-up) from the health_check extension.
    let health = host_port(str_of(
        &config["extensions"]["health_check"]["endpoint"],
        "health_check endpoint",
    ));
    let collector = collector_container(spec);
    for probe in ["livenessProbe", "startupProbe"] {
        let get = &collector[probe]["httpGet"];
        assert_eq!(get["host"], health.0, "{probe}");
        assert_eq!(get["port"], health.1, "{probe}");
    }
    for (name, exporter) in config["exporters"].as_object().unwrap() {
        println!("exports to {name}: {}", exporter["endpoint"]);
    }
}

#[test]
fn collector_outlives_the_daemon_and_fits_its_memory() {
    let docs = manifest();
    let spec = pod_spec(&docs);
    let collector = collector_container(spec);
    // A native sidecar: started before the daemon and stopped after it, so the
    // spans flushed at SIGTERM still have somewhere to go.
    assert!(
        list(&spec["initContainers"]).iter().any(|c| c == collector),
        "the collector is an init container"
    );
    assert_eq!(collector["restartPolicy"], "Always");
    assert!(!collector["startupProbe"].is_null());

    let args: Vec<&str> = list(&daemon_container(spec)["args"])
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let shutdown: u64 = args
        .iter()
        .position(|a| *a == "--shutdown-timeout")
        .map_or(5, |i| args[i + 1].parse().unwrap());
    // The flush, plus up to 2 s of draining queued events before it.
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(grace > shutdown + 2, "grace {grace} s, flush {shutdown} s");

    let config = collector_config(&docs);
    let limiter = &config["processors"]["memory_limiter"];
    let limit = quantity(&collector["resources"]["limits"]["memory"]);
    let limiter_bytes = limiter["limit_mib"].as_f64().expect("limit_mib") * MIB;
    assert!(
        limiter_bytes < limit,
        "memory_limiter ({limiter_bytes} B) below the container's limit ({limit} B)"
    );
    let collector_env = container_env(collector, "ns");
    if let Some(go) = env_value(&collector_env, "GOMEMLIMIT") {
        let go = quantity(&Value::String(go.trim_end_matches('B').into()));
        assert!(go <= limiter_bytes, "GOMEMLIMIT above memory_limiter");
    }
}

#[test]
fn images_are_pinned_and_resources_bounded() {
    let docs = manifest();
    let spec = pod_spec(&docs);
    for container in containers(spec) {
        let name = &container["name"];
        let image = str_of(&container["image"], "image");
        let tag = image
            .rsplit('/')
            .next()
            .unwrap()
            .split_once(':')
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("{name}: {image} has no tag"));
        assert!(!tag.is_empty() && tag != "latest", "{name}: {image}");
        let resources = &container["resources"];
        for what in ["cpu", "memory"] {
            let request = quantity(&resources["requests"][what]);
            let limit = quantity(&resources["limits"][what]);
            assert!(0.0 < request && request <= limit, "{name} {what}");
        }
    }
    let daemon = daemon_container(spec);
    assert_eq!(
        str_of(&daemon["image"], "image"),
        format!("otel-tcpstates:{}", env!("CARGO_PKG_VERSION")),
        "the image is this release"
    );
    // README's measured peak RSS at the default --max-sockets, with room for the
    // BPF maps charged to the container and for bursts.
    let readme = repo_file("README.md");
    let rss: f64 = readme
        .split(" MiB with 65536 sockets in flight")
        .next()
        .and_then(|before| before.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("README gives the peak RSS with 65536 sockets in flight");
    let limit = quantity(&daemon["resources"]["limits"]["memory"]);
    assert!(
        limit >= 2.0 * rss * MIB,
        "memory limit {} MiB for a {rss} MiB peak",
        limit / MIB
    );
}

/// The DaemonSet's otel-tcpstates container's host paths: each volume mount of a
/// hostPath volume, as (node path, container path, read-only).
fn daemonset_binds(spec: &Value, daemon: &Value) -> Vec<Bind> {
    let volumes = list(&spec["volumes"]);
    list(&daemon["volumeMounts"])
        .iter()
        .filter_map(|mount| {
            let volume = volumes.iter().find(|v| v["name"] == mount["name"])?;
            Some(Bind {
                source: volume["hostPath"]["path"].as_str()?.to_owned(),
                target: str_of(&mount["mountPath"], "mountPath").to_owned(),
                read_only: mount["readOnly"] == true,
            })
        })
        .collect()
}

/// The DaemonSet's otel-tcpstates container, run here as the kubelet would, less
/// the capabilities in `without` (Kubernetes' spelling) and with `extra`
/// arguments: root with every capability dropped but those it adds, no_new_privs
/// (allowPrivilegeEscalation: false), a mount and cgroup namespace of its own with
/// the hostPath volumes bound read-only where the container mounts them, its args
/// and its environment with the downward API filled in, exporting to a test
/// receiver over the same protocol, tracing the test's port only.
fn run_daemonset_container(tag: &str, without: &[&str], extra: &[&str]) -> Run {
    let docs = manifest();
    let spec = pod_spec(&docs);
    let daemon = daemon_container(spec);
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "ns");
    let receiver = Receiver::start();
    let mut env = container_env(daemon, namespace);
    let protocol = env_value(&env, "OTEL_EXPORTER_OTLP_PROTOCOL")
        .unwrap_or("http/protobuf")
        .to_owned();
    for (name, value) in &mut env {
        if name == "OTEL_EXPORTER_OTLP_ENDPOINT" {
            *value = match protocol.as_str() {
                "grpc" => receiver.grpc_endpoint(),
                _ => receiver.http_endpoint(),
            };
        }
    }
    let security = &daemon["securityContext"];
    let added: Vec<String> = list(&security["capabilities"]["add"])
        .iter()
        .map(|c| str_of(c, "capability"))
        .filter(|c| !without.contains(c))
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    assert_eq!(security["runAsUser"], 0, "this run is for a root container");
    let mut setpriv = vec![
        format!("--bounding-set=-all,{}", added.join(",")),
        "--inh-caps=-all".to_owned(),
    ];
    if security["allowPrivilegeEscalation"] == false {
        setpriv.push("--no-new-privs".into());
    }
    let (listener, server) = listen("127.0.0.1");
    let mut args: Vec<String> = list(&daemon["args"])
        .iter()
        .map(|a| str_of(a, "arg").to_owned())
        .collect();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args.extend(["-D".into(), server.port().to_string()]);

    let (mut command, _stage) = in_container(&daemonset_binds(spec, daemon), tag);
    command
        .arg("setpriv")
        .args(&setpriv)
        .arg(BIN)
        .args(&args)
        .env_clear()
        .env("PATH", PATH)
        .envs(env.iter().map(|(n, v)| (n, v)));
    Run::go(command, false, &receiver, &listener)
}

/// The DaemonSet's container as shipped traces a real connection, the spans carry
/// the Kubernetes resource attributes, and the packet programs behind span links
/// are attached to the node's cgroup v2 root (the one the daemon finds in the
/// container's /proc/self/mountinfo: the cgroup volume), with no warning.
#[test]
fn daemonset_container_traces_a_connection() {
    if !root_or_skip("daemonset_container_traces_a_connection") {
        return;
    }
    let run = run_daemonset_container("daemonset", &[], &[]);
    let (root, _) = run.traced();
    let docs = manifest();
    let namespace = str_of(&object(&docs, "Namespace")["metadata"]["name"], "ns");
    for (key, field) in [
        ("k8s.node.name", "spec.nodeName"),
        ("host.ip", "status.hostIP"),
    ] {
        assert_eq!(
            root.resource.get(key),
            Some(&otlp::Value::Str(downward(field, namespace))),
            "{key} in {:?}",
            root.resource
        );
    }
    run.assert_links_attached();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// The DaemonSet's container without NET_ADMIN: it runs and exports as before,
/// and says once that span links are off, and why.
#[test]
fn daemonset_container_without_net_admin_exports_without_span_links() {
    if !root_or_skip("daemonset_container_without_net_admin_exports_without_span_links") {
        return;
    }
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let run = run_daemonset_container("daemonset-no-net-admin", &[net_admin], &[]);
    run.traced();
    run.assert_links_off_for_want_of_net_admin();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}

/// With `--no-links`, root needs CAP_BPF and CAP_PERFMON alone: nothing is said of
/// span links, and nothing of them is loaded.
#[test]
fn daemonset_container_with_no_links_needs_only_bpf_and_perfmon() {
    if !root_or_skip("daemonset_container_with_no_links_needs_only_bpf_and_perfmon") {
        return;
    }
    let net_admin = LINKS_CAP.trim_start_matches("CAP_");
    let left: BTreeSet<&str> = ROOT_CAPS.into_iter().filter(|c| *c != net_admin).collect();
    assert_eq!(left, BTreeSet::from(NO_LINKS_ROOT_CAPS));
    let run = run_daemonset_container("daemonset-no-links", &[net_admin], &["--no-links"]);
    run.traced();
    run.assert_no_links_loaded();
    assert!(run.complaints().is_empty(), "{:?}", run.stderr);
}
