//! The daemon as a command: bad input, missing privileges, tracefs, signals.
mod support;

use std::{process::Command, time::Duration};

use nix::sys::signal::Signal;
use support::*;

fn run(args: &[&str]) -> (i32, String) {
    run_env(args, &[])
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_a_usage_error() {
    for (args, says) in [
        (&["-L", "abc"][..], "'abc' is not a port number"),
        (&["-D", "70000"], "port '70000' is out of range 1-65535"),
        (&["-4", "-6"], "cannot be used with"),
        (&["--frobnicate"], "unexpected argument '--frobnicate'"),
        (&["-p", "0"], "0 is not in 1.."),
        (
            &["--otlp-endpoint", "not a url"],
            "'not a url' is not a URL",
        ),
        (
            &[
                "--otlp-endpoint",
                "http://c:4318",
                "--otlp-protocol",
                "http/json",
            ],
            "invalid value 'http/json' for '--otlp-protocol",
        ),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The standard OTEL_* variables with bad values: exit 2 with a line naming the
/// variable, before anything is loaded.
#[test]
fn bad_environment_is_a_usage_error() {
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
    for (env, says) in [
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4318")][..],
            "OTEL_EXPORTER_OTLP_ENDPOINT 'c:4318' must be an http:// or https:// URL",
        ),
        (
            &[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported",
        ),
        (
            &[endpoint, ("OTEL_RESOURCE_ATTRIBUTES", "team=net,junk")],
            "OTEL_RESOURCE_ATTRIBUTES: item 2 'junk' is not key=value",
        ),
        (
            &[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-token")],
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS: item 1 is not key=value",
        ),
        (
            &[endpoint, ("OTEL_METRICS_EXPORTER", "prometheus")],
            "OTEL_METRICS_EXPORTER='prometheus' is not supported; use otlp or none",
        ),
    ] {
        let (code, stderr) = run_env(&[], env);
        assert_eq!(code, 2, "{env:?}: {stderr}");
        assert!(stderr.contains(says), "{env:?}: {stderr}");
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error")).count(), 1);
    }
}

#[test]
fn missing_privileges_are_one_clear_line() {
    if !root_or_skip("missing_privileges_are_one_clear_line") {
        return;
    }
    // As nobody, with no capabilities at all.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(BIN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("otel-tcpstates: error: missing privileges")
            && stderr.contains("CAP_BPF")
            && stderr.contains("CAP_PERFMON"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// A `--max-sockets` the kernel cannot make a map for (more than 2^31 entries is
/// E2BIG for any hash map) is one line naming the flag, not aya's error chain.
#[test]
fn a_socket_map_too_big_for_the_kernel_names_the_flag() {
    if !root_or_skip("a_socket_map_too_big_for_the_kernel_names_the_flag") {
        return;
    }
    let (code, stderr) = run(&["--max-sockets", "100000000000", "-L", "1"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("otel-tcpstates: error: the kernel cannot make a map for")
            && stderr.contains("lower --max-sockets"),
        "{stderr}"
    );
}

#[test]
fn sigterm_and_sigint_exit_zero_promptly() {
    if !root_or_skip("sigterm_and_sigint_exit_zero_promptly") {
        return;
    }
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let done = Tracer::start(&["--shutdown-timeout", "1"]).stop_with(signal);
        eprintln!("{signal}: exit after {:.2?}", done.took);
        assert!(done.status.success(), "{signal}: {:?}", done.stderr);
        assert!(
            done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
            "{signal} took {:?}",
            done.took
        );
        assert!(done.stderr.is_empty(), "{:?}", done.stderr);
    }
}

/// `--stats-interval` takes any u64: 0 turns the line off, and a period too long
/// for the clock (it once overflowed the timer: a panic at start) never comes due.
/// Either way the daemon runs past its first one-second report and exits cleanly.
#[test]
fn any_stats_interval_runs_and_exits_cleanly() {
    if !root_or_skip("any_stats_interval_runs_and_exits_cleanly") {
        return;
    }
    for secs in ["0", &u64::MAX.to_string()] {
        let tracer = Tracer::start(&["--stats-interval", secs, "-L", "1"]);
        std::thread::sleep(Duration::from_millis(1500));
        let done = tracer.stop_with(Signal::SIGTERM);
        assert!(done.status.success(), "{secs}: {:?}", done.stderr);
        assert!(done.stderr.is_empty(), "{secs}: {:?}", done.stderr);
    }
}

/// Runs `command` (a tracer, perhaps behind a wrapper that execs it), waits for its
/// first line (printed once attached), interrupts it and collects the rest.
fn header_then_interrupt(command: &mut Command) -> (String, std::process::Output) {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let header = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .next()
        .and_then(Result::ok)
        .unwrap_or_default();
    // Its stdout is closed from here on: give it nothing more to print (-L 1).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    (header, child.wait_with_output().unwrap())
}

#[test]
fn mounts_tracefs_when_it_is_not_mounted() {
    if !root_or_skip("mounts_tracefs_when_it_is_not_mounted") {
        return;
    }
    // In a private mount namespace, so the rest of the host keeps its tracefs.
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; \
         test -d /sys/kernel/tracing/events && exit 3; \
         exec {BIN} -s --poll-ms 10 -L 1"
    );
    let (header, out) = header_then_interrupt(&mut in_private_mounts(&script, false));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(3),
        "could not unmount tracefs to test"
    );
    assert!(
        header.starts_with("SKADDR,"),
        "header {header:?}, stderr {stderr}"
    );
    assert!(
        stderr.contains("mounted tracefs at /sys/kernel/tracing"),
        "{stderr}"
    );
    assert!(out.status.success(), "{stderr}");
}

/// Without CAP_SYS_ADMIN an unmounted tracefs cannot be mounted: one line says
/// how to do it, and nothing is loaded.
#[test]
fn unmountable_tracefs_is_one_clear_line() {
    if !root_or_skip("unmountable_tracefs_is_one_clear_line") {
        return;
    }
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; \
         test -d /sys/kernel/tracing/events && exit 3; \
         exec setpriv --bounding-set=-all,+bpf,+perfmon --inh-caps=-all {BIN} -s"
    );
    let out = in_private_mounts(&script, false).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("tracefs is not mounted at /sys/kernel/tracing")
            && stderr.contains("mount -t tracefs tracefs /sys/kernel/tracing"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// What the tracer needs and no more: as root, CAP_BPF and CAP_PERFMON; as another
/// user, also CAP_DAC_READ_SEARCH (tracefs is readable by root only). Printing,
/// it never loads the packet programs behind span links, so it has no use for
/// CAP_NET_ADMIN and says nothing of them.
#[test]
fn runs_with_least_privilege() {
    if !root_or_skip("runs_with_least_privilege") {
        return;
    }
    let as_root = ["--bounding-set=-all,+bpf,+perfmon", "--inh-caps=-all"];
    let caps = "-all,+bpf,+perfmon,+dac_read_search";
    let (bounding, inheritable, ambient) = (
        format!("--bounding-set={caps}"),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
    );
    let as_nobody = [
        bounding.as_str(),
        &inheritable,
        &ambient,
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    for setpriv in [&as_root[..], &as_nobody[..]] {
        let (header, out) = header_then_interrupt(
            Command::new("setpriv")
                .args(setpriv)
                .args([BIN, "-s", "-L", "1"]),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            header.starts_with("SKADDR,"),
            "{setpriv:?}: no header; {stderr}"
        );
        assert!(out.status.success(), "{setpriv:?}: {stderr}");
        assert!(!stderr.contains("span links"), "{setpriv:?}: {stderr}");
    }
}

/// `--help` states the kernel preflight really requires, and what it needs to run.
#[test]
fn help_says_what_preflight_needs() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let (major, minor) = otel_tcpstates::kernel::preflight::MIN_LINUX;
    assert!(
        help.contains(&format!("Needs Linux >= {major}.{minor} (BPF ring buffer)")),
        "{help}"
    );
    for need in ["CAP_BPF + CAP_PERFMON", "CAP_NET_ADMIN for --links"] {
        assert!(help.contains(need), "{need}: {help}");
    }
}
