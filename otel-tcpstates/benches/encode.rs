//! The span encoder on one core: spans per second from records to the bytes of
//! export requests, in batches as the exporter makes them. Prints its figures;
//! `cargo bench --bench encode` (or scripts/bench.sh) runs it.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use otel_tcpstates::{
    kernel::event::{Comm, TcpFacts, TcpState},
    otlp::{
        encode::{BaseResource, Encoder},
        resource,
        spans::{Body, ResourceKey, SpanRecord},
    },
    sessions::table::{EndReason, Role},
};
use otel_tcpstates_common::tcp_state::*;

/// The exporter's default batch.
const BATCH: usize = 2048;
const MEASURE: Duration = Duration::from_secs(3);

fn comm(name: &str) -> Comm {
    let mut raw = [0u8; 16];
    raw[..name.len()].copy_from_slice(name.as_bytes());
    Comm::from(raw)
}

/// One loopback client connection's spans as the daemon makes them: four states
/// and the root, with the facts read at CLOSE.
fn connection(n: u64) -> [SpanRecord; 5] {
    let local = (
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        40_000 + (n % 20_000) as u16,
    );
    let peer = (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080);
    let start = 1_764_633_600_000_000_000 + n * 100_000;
    let trace_id = (u128::from(n) << 64 | 0xdead_beef).to_be_bytes();
    let root_id = (n << 8).to_be_bytes();
    let state = |i: u64, state: u8, next: u8| SpanRecord {
        trace_id,
        span_id: (n << 8 | (i + 1)).to_be_bytes(),
        parent_span_id: Some(root_id),
        start_unix_ns: start + i * 10_000,
        end_unix_ns: start + (i + 1) * 10_000,
        resource: ResourceKey::default(),
        local,
        peer,
        error: None,
        threshold: None,
        body: Body::State {
            state: TcpState(state),
            next: Some((TcpState(next), 4242, comm("curl"))),
            cut_short: None,
            events: None,
        },
    };
    [
        state(0, SYN_SENT, ESTABLISHED),
        state(1, ESTABLISHED, FIN_WAIT1),
        state(2, FIN_WAIT1, FIN_WAIT2),
        state(3, FIN_WAIT2, CLOSE),
        SpanRecord {
            trace_id,
            span_id: root_id,
            parent_span_id: None,
            start_unix_ns: start,
            end_unix_ns: start + 40_000,
            resource: ResourceKey::default(),
            local,
            peer,
            error: None,
            threshold: None,
            body: Body::Root {
                role: Role::Client,
                owner: Some((4242, comm("curl"))),
                facts: Some(TcpFacts {
                    bytes_acked: 1234,
                    bytes_received: 56789,
                    srtt_us_x8: 800,
                    total_retrans: 0,
                    segs_in: 12,
                    segs_out: 10,
                    ..Default::default()
                }),
                skaddr: 0xffff_8881_0000_0000 + n * 0x800,
                begin_seen: true,
                end_reason: EndReason::Closed,
                links: None,
                counts: None,
                kept_by: Default::default(),
            },
        },
    ]
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: skip.
    if !std::env::args().any(|a| a == "--bench") {
        println!("encode: skipped; run it with `cargo bench --bench encode`");
        return;
    }
    let records: Vec<SpanRecord> = (0..20_000).flat_map(connection).collect();
    let base: BaseResource = resource::base_resource(&resource::resource());
    let mut encoder = Encoder::new(base);
    let mut out = Vec::with_capacity(1 << 20);
    let (mut spans, mut bytes, mut requests) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < MEASURE {
        for batch in records.chunks(BATCH) {
            for record in batch {
                encoder.add(record);
            }
            out.clear();
            encoder.finish(&mut out);
            black_box(&out);
            spans += batch.len() as u64;
            bytes += out.len() as u64;
            requests += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "encoder, one core: {:.2} million spans/s ({:.0} ns/span); {:.0} bytes/span; \
         {requests} requests of {BATCH} spans in {secs:.1} s",
        spans as f64 / secs / 1e6,
        secs * 1e9 / spans as f64,
        bytes as f64 / spans as f64,
    );
}
