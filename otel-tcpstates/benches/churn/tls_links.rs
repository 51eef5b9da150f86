//! What the TLS part costs (issue 30): wrk over HTTPS against nginx with TLS
//! (both Debian's, both on the system's `libssl.so.3`), a distinct sampled
//! `traceparent` on every request, under the daemon with `--links`, once with
//! `--links` alone and once with `--tls`: its TLS programs attached (uprobes on
//! `SSL_write`/`SSL_read` and their returns, the two socket tracepoints), in
//! alternating rounds ([`paired`]); then the median of the rounds' on ÷ off
//! against the goal (≥ 0.95) and the programs' time a request.
use std::path::Path;

use super::{
    Options,
    nginx::{Nginx, Requests},
    paired::{self, Paired},
};

/// The TLS programs, by the names the kernel keeps.
const TLS_PROGS: [&str; 10] = [
    "ssl_write",
    "ssl_write_ex",
    "ssl_write_ret",
    "ssl_write_exret",
    "ssl_read",
    "ssl_read_ex",
    "ssl_read_ret",
    "ssl_read_exret",
    "tls_sent",
    "tls_received",
];
/// The least on ÷ off the issue accepts.
const GOAL: f64 = 0.95;

pub(super) fn run(opts: &Options) {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps/certs");
    let (nginx_cpu, wrk_cpu) = match opts.pin {
        true => (Some(0), Some(1)),
        false => (None, None),
    };
    let nginx = match Nginx::start_tls(nginx_cpu, &certs) {
        Ok(nginx) => nginx,
        Err(err) => {
            println!("\nTLS part: failed to start nginx: {err:#}");
            return;
        }
    };
    let load = |seconds| nginx.wrk(seconds, Requests::DistinctTraceparents, wrk_cpu);
    let paired = Paired {
        what: "TLS part",
        states: ["off", "attached"],
        args: [&["--links"], &["--links", "--tls"]],
        programs: &TLS_PROGS,
        load: &load,
    };
    let runs = paired::rounds(opts, &paired);
    println!(
        "\nTLS part (issue 30): wrk over HTTPS → nginx with TLS, a distinct sampled traceparent \
         on every request, {} s windows, {} alternating rounds; daemon with --links, \
         --links alone vs with --tls",
        opts.link_seconds, opts.link_rounds
    );
    paired::print_table(&runs, opts, &paired);
    let Some((mid, min, max)) = paired::ratios(&runs, opts) else {
        println!("no round completed both runs");
        return;
    };
    // The TLS programs' cost per request: their run time over the requests.
    let ns_per_request = paired::median_on(&runs, |run| {
        run.programs
            .iter()
            .map(|(_, n, ns)| *n as f64 * ns)
            .sum::<f64>()
            / run.requests.max(1) as f64
    });
    println!(
        "\nTLS attached ÷ off, requests/s: median {mid:.3} (min {min:.3}, max {max:.3}); \
         goal ≥ {GOAL}: {}; the TLS programs' time per request (both ends): median \
         {ns_per_request:.0} ns",
        if mid >= GOAL { "pass" } else { "FAIL" },
    );
}
