//! What reading HTTP/2 costs (issue 30): h2load over plaintext HTTP/2 (`h2c`,
//! 32 connections, 10 streams in flight on each) against nginx, one fixed
//! sampled `traceparent` on every request, under the daemon with `--no-links`
//! and with `--links` (its packet programs walking every HEADERS frame, its
//! HPACK decoders reading each request), in alternating rounds ([`paired`]);
//! then the median of the rounds' on ÷ off against the links runs' goal (≥
//! 0.95) and the daemon's CPU a request.
use super::{
    Options,
    nginx::Nginx,
    paired::{self, Paired},
};

/// The packet programs, by the names the kernel keeps.
const PACKET_PROGS: [&str; 2] = ["http_egress", "http_ingress"];
/// On every request. HPACK puts it in the dynamic table with the first
/// request of a connection and sends an index after: the daemon still decodes
/// every block, and links the context once per connection end.
const TRACEPARENT: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// The least on ÷ off the links runs aim at.
const GOAL: f64 = 0.95;

pub(super) fn run(opts: &Options) {
    let (nginx_cpu, load_cpu) = match opts.pin {
        true => (Some(0), Some(1)),
        false => (None, None),
    };
    let nginx = match Nginx::start_h2c(nginx_cpu) {
        Ok(nginx) => nginx,
        Err(err) => {
            println!("\nHTTP/2: failed to start nginx: {err:#}");
            return;
        }
    };
    let load = |seconds| nginx.h2load(seconds, Some(TRACEPARENT), load_cpu);
    let paired = Paired {
        what: "HTTP/2 links",
        states: ["off", "on"],
        args: [&["--no-links"], &["--links"]],
        programs: &PACKET_PROGS,
        load: &load,
    };
    let runs = paired::rounds(opts, &paired);
    println!(
        "\nHTTP/2 (issue 30): h2load over h2c → nginx, 32 connections × 10 streams, one fixed \
         sampled traceparent on every request, {} s windows, {} alternating rounds; daemon \
         exporting OTLP/gRPC, --no-links vs --links",
        opts.link_seconds, opts.link_rounds
    );
    paired::print_table(&runs, opts, &paired);
    let Some((mid, min, max)) = paired::ratios(&runs, opts) else {
        println!("no round completed both runs");
        return;
    };
    let cpu_per_request = paired::median_on(&runs, |run| {
        1e9 * run.daemon_cpu_s / run.requests.max(1) as f64
    });
    println!(
        "\nHTTP/2 links on ÷ off, requests/s: median {mid:.3} (min {min:.3}, max {max:.3}); \
         goal ≥ {GOAL}: {}; the daemon's CPU per request with links (HPACK decoding, both \
         ends): median {cpu_per_request:.0} ns",
        if mid >= GOAL { "pass" } else { "FAIL" },
    );
}
