//! Loading the embedded eBPF program with the user's filters and attaching it to
//! `sock:inet_sock_set_state` (and, when wanted, the incident and packet programs).
use std::{num::NonZeroUsize, os::fd::AsFd as _};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint},
};
use otel_tcpstates_common::{
    AF_INET, AF_INET6, Config, DEFAULT_SOCKET_MAP_ENTRIES, NetnsOffsets, PORT_BITMAP_WORDS,
    TcpOffsets, lost, names,
};

use std::path::PathBuf;

use crate::kernel::{
    attach::Link,
    btf::{self, Btf},
    cgroup, incident_programs, program_stats, tls_programs,
};

const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The compiled eBPF object, built by build.rs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/otel-tcpstates"));

/// What the kernel program should keep; everything else is dropped in the kernel.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub owner_pid: Option<u32>,
    /// Sockets of this process are left out (the tracer's own).
    pub exclude_owner_pid: Option<u32>,
    pub ipv4_only: bool,
    pub ipv6_only: bool,
    /// Only sockets whose local port is one of these.
    pub local_ports: Option<Vec<u16>>,
    pub remote_ports: Option<Vec<u16>>,
}

/// The attached program. Dropping it, or [`Probe::detach`], detaches from the
/// tracepoint.
pub struct Probe {
    // Owns the programs: kept as long as events are wanted.
    ebpf: Option<Ebpf>,
    // Each attachment; dropping one detaches it.
    links: Vec<Link>,
    lost: PerCpuArray<MapData, u64>,
    congestion_known: bool,
    /// The packet programs are attached: link records can be lost.
    links_attached: bool,
    /// The TLS programs are attached: TLS requests can go unmatched.
    tls_attached: bool,
    /// The incident programs were wanted: incident records can be lost.
    incidents: bool,
    /// The programs' skips when they were detached (they are gone after).
    final_skips: Option<Skips>,
}

/// What the kernel programs could not hand over so far, by kind of record and
/// cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// State changes the ring buffer had no room for.
    pub state_changes: u64,
    /// State changes the kernel skipped: see [`program_stats`].
    pub state_changes_skipped: u64,
    /// Link records the ring buffer had no room for (or whose scratch space a
    /// nested program took); `None` without the packet programs.
    pub links: Option<u64>,
    /// TLS requests whose socket was not found; `None` without the TLS programs.
    pub tls: Option<u64>,
    /// HTTP/2 directions the kernel gave up (a record the ring had no room
    /// for, a gap in the stream, a flow map full); `None` without the packet
    /// programs.
    pub h2: Option<u64>,
    /// Incident records the ring buffer had no room for, and those the kernel
    /// skipped; `None` without the incident programs.
    pub incidents: Option<(u64, u64)>,
    /// Listeners the kernel's listener maps could not store.
    pub listeners: u64,
}

/// The programs' `recursion_misses`, summed by what they queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Skips {
    state_changes: u64,
    incidents: u64,
}

fn bitmap(ports: Option<&[u16]>) -> [u64; PORT_BITMAP_WORDS] {
    let mut words = [0u64; PORT_BITMAP_WORDS];
    for &port in ports.unwrap_or_default() {
        words[usize::from(port >> 6)] |= 1 << (port & 63);
    }
    words
}

/// What the programs read at offsets only the kernel's BTF gives, resolved from one
/// read and parse of it (several megabytes, dropped once resolved).
pub struct KernelOffsets {
    pub tcp: TcpOffsets,
    pub netns: NetnsOffsets,
    /// `tcp_skb_cb.tcp_gso_segs` in `sk_buff`; 0: unknown.
    pub gso_segs: u32,
}

/// `facts`: the `tcp_sock` facts read at CLOSE; `incidents`: the segment count of a
/// retransmitted skb. The namespace offsets are resolved whatever the output: the
/// kernel's listener owners serve `-p` too. Without BTF (or with an unexpected
/// layout) each part says so once and is left out: tracing works without them.
pub fn kernel_offsets(facts: bool, incidents: bool) -> KernelOffsets {
    let btf = Btf::from_file(std::path::Path::new(KERNEL_BTF));
    let tcp = if facts {
        match resolve(&btf, tcp_offsets_from) {
            Ok(offsets) => offsets,
            Err(err) => {
                tracing::warn!(
                    "bytes, RTT and retransmits will be missing: {err} (needs a kernel with CONFIG_DEBUG_INFO_BTF)"
                );
                TcpOffsets::default()
            }
        }
    } else {
        TcpOffsets::default()
    };
    let netns = match resolve(&btf, netns_offsets_from) {
        Ok(offsets) => offsets,
        Err(err) => {
            tracing::warn!(
                "listeners in different network namespaces on one port will share an owner: {err} (needs a kernel with CONFIG_DEBUG_INFO_BTF)"
            );
            NetnsOffsets::default()
        }
    };
    let gso_segs = match &btf {
        Ok(btf) if incidents => skb_gso_segs_offset(btf),
        _ => 0,
    };
    KernelOffsets {
        tcp,
        netns,
        gso_segs,
    }
}

/// One part of the offsets from the one parse; the error says what failed, the
/// read or the part.
fn resolve<T>(
    btf: &Result<Btf, btf::BtfError>,
    part: fn(&Btf) -> Result<T, btf::BtfError>,
) -> Result<T, String> {
    match btf {
        Ok(btf) => part(btf).map_err(|err| err.to_string()),
        Err(err) => Err(err.to_string()),
    }
}

/// Where `struct tcp_sock` keeps the facts read at CLOSE.
fn tcp_offsets_from(btf: &Btf) -> Result<TcpOffsets, btf::BtfError> {
    // Each read in the kernel is exactly this wide; refuse any other layout.
    let field = |name: &str, size: u32| -> Result<u32, btf::BtfError> {
        let field = btf.field("tcp_sock", name)?;
        if field.size == size {
            Ok(field.offset)
        } else {
            Err(btf::BtfError::Malformed(format!(
                "tcp_sock.{name} is {} bytes, expected {size}",
                field.size
            )))
        }
    };
    Ok(TcpOffsets {
        enabled: 1,
        bytes_acked: field("bytes_acked", 8)?,
        bytes_received: field("bytes_received", 8)?,
        srtt_us: field("srtt_us", 4)?,
        total_retrans: field("total_retrans", 4)?,
        segs_in: field("segs_in", 4)?,
        segs_out: field("segs_out", 4)?,
        // The first member of tcp_sock is, nested, its struct sock.
        sk_err: match btf.field("sock", "sk_err")? {
            f if f.size == 4 => f.offset,
            f => {
                return Err(btf::BtfError::Malformed(format!(
                    "sock.sk_err is {} bytes, expected 4",
                    f.size
                )));
            }
        },
    })
}

/// Where a socket's network namespace is, so listeners are told apart by namespace
/// (pods sharing a port); offsets of 0 key listeners by family and port alone.
fn netns_offsets_from(btf: &Btf) -> Result<NetnsOffsets, btf::BtfError> {
    // possible_net_t is one `struct net *` (nothing without CONFIG_NET_NS).
    let common = btf.field("sock", "__sk_common")?;
    let net = btf.field("sock_common", "skc_net")?;
    let ns = btf.field("net", "ns")?;
    let inum = btf.field("ns_common", "inum")?;
    if net.size != 8 || inum.size != 4 {
        return Err(btf::BtfError::Malformed(format!(
            "sock_common.skc_net is {} bytes and ns_common.inum {}, expected 8 and 4",
            net.size, inum.size
        )));
    }
    Ok(NetnsOffsets {
        sk_net: common.offset + net.offset,
        ns_inum: ns.offset + inum.offset,
    })
}

/// Where `struct sk_buff` keeps a TCP segment's count: `tcp_skb_cb.tcp_gso_segs`
/// inside `cb`. 0 when BTF does not say (retransmissions then count one each).
fn skb_gso_segs_offset(btf: &Btf) -> u32 {
    let found = (|| {
        let cb = btf.field("sk_buff", "cb")?;
        let segs = btf.field("tcp_skb_cb", "tcp_gso_segs")?;
        Ok::<_, btf::BtfError>((segs.size == 2).then_some(cb.offset + segs.offset))
    })();
    match found {
        Ok(Some(offset)) => offset,
        _ => 0,
    }
}

/// Loads the packet programs and attaches them to the root of cgroup v2, where
/// they see every socket's packets both ways.
fn attach_packet_programs(ebpf: &mut Ebpf, links: &mut Vec<Link>) -> Result<()> {
    let root = cgroup::cgroup2_root().ok_or_else(|| anyhow!("no cgroup v2 is mounted"))?;
    let cgroup = std::fs::File::open(&root)
        .with_context(|| format!("opening the cgroup v2 root {}", root.display()))?;
    for (name, direction) in [
        (names::HTTP_EGRESS, CgroupSkbAttachType::Egress),
        (names::HTTP_INGRESS, CgroupSkbAttachType::Ingress),
    ] {
        let program: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?
            .try_into()
            .with_context(|| format!("eBPF program {name} is not a cgroup_skb program"))?;
        program
            .load()
            .with_context(|| format!("the kernel refused to load {name}"))?;
        // Attached through a BPF link, which runs beside any other program on the
        // cgroup (the mode only matters to the legacy attach, before Linux 5.7).
        let id = program
            .attach(&cgroup, direction, CgroupAttachMode::default())
            .with_context(|| format!("attaching {name} to {}", root.display()))?;
        links.push(Box::new(program.take_link(id)?));
    }
    Ok(())
}

fn socket_map_entries(max_sockets: NonZeroUsize) -> u32 {
    u32::try_from(max_sockets.get())
        .unwrap_or(u32::MAX)
        .max(DEFAULT_SOCKET_MAP_ENTRIES)
}

impl Probe {
    /// Returns the attached probe and the ring buffer its events arrive on.
    /// The kernel remembers at least `max_sockets` sockets' current state. With
    /// `links`, the packet programs that find `traceparent` headers are attached
    /// too, or a warning says why they could not be, and with them, given `tls`
    /// (files besides those found), the TLS programs; with `incidents`, the
    /// programs that see retransmissions, resets, errors and congestion states.
    pub fn load(
        filters: &Filters,
        offsets: &KernelOffsets,
        ring_buffer_bytes: u32,
        max_sockets: NonZeroUsize,
        links: bool,
        tls: Option<&[PathBuf]>,
        incidents: bool,
    ) -> Result<(Self, RingBuf<MapData>)> {
        let config = Config {
            pid: filters.owner_pid.unwrap_or(0),
            exclude_pid: filters.exclude_owner_pid.unwrap_or(0),
            family: match (filters.ipv4_only, filters.ipv6_only) {
                (true, false) => AF_INET,
                (false, true) => AF_INET6,
                _ => 0,
            },
            filter_local_ports: u8::from(filters.local_ports.is_some()),
            filter_remote_ports: u8::from(filters.remote_ports.is_some()),
        };
        let local = bitmap(filters.local_ports.as_deref());
        let remote = bitmap(filters.remote_ports.as_deref());
        let wakeup_bytes = u64::from(ring_buffer_bytes / 4);

        if PROGRAM.is_empty() {
            bail!(
                "this binary was built without its eBPF program (AYA_BUILD_SKIP, for lint checks); build it again without AYA_BUILD_SKIP"
            );
        }
        let socket_entries = socket_map_entries(max_sockets);
        let loaded = EbpfLoader::new()
            .override_global(names::SKB_GSO_SEGS, &offsets.gso_segs, true)
            .override_global(names::CONFIG, &config, true)
            .override_global(names::LOCAL_PORTS, &local, true)
            .override_global(names::REMOTE_PORTS, &remote, true)
            .override_global(names::WAKEUP_BYTES, &wakeup_bytes, true)
            .override_global(names::TCP_OFFSETS, &offsets.tcp, true)
            .override_global(names::NETNS_OFFSETS, &offsets.netns, true)
            .map_max_entries(names::EVENTS, ring_buffer_bytes)
            .map_max_entries(names::SOCKETS, socket_entries)
            .load(PROGRAM);
        let mut ebpf = match loaded {
            Ok(ebpf) => ebpf,
            // The one map whose size comes straight from a flag: name the flag.
            Err(EbpfError::MapError(MapError::CreateError { name, io_error }))
                if name == names::SOCKETS =>
            {
                bail!(
                    "the kernel cannot make a map for {socket_entries} sockets ({io_error}); \
                     lower --max-sockets (the default is {DEFAULT_SOCKET_MAP_ENTRIES})"
                )
            }
            Err(err) => {
                return Err(err).context("the kernel refused the eBPF program's maps or object");
            }
        };

        let program: &mut TracePoint = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| anyhow!("eBPF object has no program {}", names::PROGRAM))?
            .try_into()
            .context("eBPF program is not a tracepoint program")?;
        program
            .load()
            .context("the kernel verifier rejected the eBPF program")?;
        let id = program
            .attach("sock", "inet_sock_set_state")
            .context("attaching to tracepoint sock:inet_sock_set_state failed")?;
        let mut attached: Vec<Link> = vec![Box::new(program.take_link(id)?)];

        let congestion_known = incidents
            && incident_programs::attach(&mut ebpf, offsets.tcp.enabled != 0, &mut attached);
        let packet_programs = links.then(|| attach_packet_programs(&mut ebpf, &mut attached));
        let links_attached = matches!(packet_programs, Some(Ok(())));
        // TLS plaintext: with the links, when asked for.
        let tls_attached = links_attached
            && tls.is_some_and(|extra| {
                match tls_programs::attach(&mut ebpf, extra, &mut attached) {
                    Ok(done) => {
                        let files: Vec<String> =
                            done.files.iter().map(|f| f.display().to_string()).collect();
                        tracing::info!("TLS requests read in {}", files.join(", "));
                        true
                    }
                    Err(err) => {
                        tracing::warn!(
                            "links from TLS requests are off: {err:#} (uprobes need CAP_SYS_ADMIN, or CAP_PERFMON and CAP_BPF, and the library's file; --tls-library names more)"
                        );
                        false
                    }
                }
            });
        if let Some(Err(err)) = packet_programs {
            // One line: the cause's first (a verifier log follows it).
            let why = if err.chain().nth(1).is_some() {
                let cause = err.root_cause().to_string();
                format!("{err}: {}", cause.lines().next().unwrap_or_default())
            } else {
                err.to_string()
            };
            tracing::warn!(
                "span links from traceparent headers are off: {why} (--links needs cgroup v2, Linux 5.17 or later, and CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"
            );
            tracing::debug!("{err:#}");
        }

        let events = RingBuf::try_from(
            ebpf.take_map(names::EVENTS)
                .ok_or_else(|| anyhow!("eBPF object has no map {}", names::EVENTS))?,
        )
        .context("opening the event ring buffer")?;
        let lost = PerCpuArray::try_from(
            ebpf.take_map(names::LOST)
                .ok_or_else(|| anyhow!("eBPF object has no map {}", names::LOST))?,
        )
        .context("opening the lost-event counter")?;
        Ok((
            Self {
                ebpf: Some(ebpf),
                links: attached,
                lost,
                congestion_known,
                links_attached,
                tls_attached,
                incidents,
                final_skips: None,
            },
            events,
        ))
    }

    /// Whether the kernel reports congestion states (their program is attached).
    pub fn congestion_known(&self) -> bool {
        self.congestion_known
    }

    /// Stops new events: what is queued stays in the ring buffer, and the lost
    /// count stays readable and final.
    pub fn detach(&mut self) {
        // Each detach waits out an RCU grace period (75 ms seen here): one after
        // another, a dozen would outlast a short shutdown deadline; side by side
        // they share one.
        std::thread::scope(|scope| {
            for link in self.links.drain(..) {
                scope.spawn(move || drop(link));
            }
        });
        // Final now that nothing runs; unreadable once the programs are unloaded.
        self.final_skips = Some(self.skips());
        self.ebpf = None;
    }

    /// What the kernel could not queue so far: the ring buffer was full, or the
    /// kernel skipped a program.
    pub fn losses(&self) -> Result<Losses> {
        let lost = |kind: u32| -> Result<u64> {
            let per_cpu = self
                .lost
                .get(&kind, 0)
                .context("reading the lost-event counters")?;
            Ok(per_cpu.iter().sum())
        };
        let skips = self.final_skips.unwrap_or_else(|| self.skips());
        Ok(Losses {
            state_changes: lost(lost::STATE_CHANGES)?,
            state_changes_skipped: skips.state_changes,
            links: self.links_attached.then(|| lost(lost::LINKS)).transpose()?,
            tls: self.tls_attached.then(|| lost(lost::TLS)).transpose()?,
            h2: self.links_attached.then(|| lost(lost::H2)).transpose()?,
            incidents: self
                .incidents
                .then(|| Ok::<_, anyhow::Error>((lost(lost::INCIDENTS)?, skips.incidents)))
                .transpose()?,
            listeners: lost(lost::LISTENERS)?,
        })
    }

    /// The loaded programs' skips, by what they queue. The packet programs are
    /// never skipped (the kernel keeps no such count for them).
    fn skips(&self) -> Skips {
        let mut skips = Skips::default();
        let Some(ebpf) = &self.ebpf else {
            return skips;
        };
        for (name, program) in ebpf.programs() {
            // Not loaded (its tracepoint is missing here): it never ran.
            let Ok(fd) = program.fd() else { continue };
            let misses = match program_stats::recursion_misses(fd.as_fd()) {
                Ok(misses) => misses,
                Err(err) => {
                    tracing::debug!("reading {name}'s recursion_misses: {err}");
                    continue;
                }
            };
            match name {
                names::PROGRAM => skips.state_changes += misses,
                names::HTTP_EGRESS | names::HTTP_INGRESS => {}
                _ => skips.incidents += misses,
            }
        }
        skips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_sock_offsets_resolve_on_this_kernel() {
        let path = std::path::Path::new(KERNEL_BTF);
        if !path.exists() {
            eprintln!("skipping: no {KERNEL_BTF}");
            return;
        }
        let offsets = tcp_offsets_from(&Btf::from_file(path).unwrap()).unwrap();
        assert_eq!(offsets.enabled, 1);
        let err = Btf::from_file(std::path::Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn netns_offsets_resolve_on_this_kernel() {
        let path = std::path::Path::new(KERNEL_BTF);
        if !path.exists() {
            eprintln!("skipping: no {KERNEL_BTF}");
            return;
        }
        let offsets = netns_offsets_from(&Btf::from_file(path).unwrap()).unwrap();
        assert_ne!(offsets.sk_net, 0);
        assert_ne!(offsets.ns_inum, 0);
        // Without BTF, listeners are keyed as before: offsets of 0.
        let err = Btf::from_file(std::path::Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn port_bitmap_sets_exactly_the_given_ports() {
        let words = bitmap(Some(&[1, 63, 64, 65535]));
        let set: Vec<u32> = (0..=65535u32)
            .filter(|&p| words[(p >> 6) as usize] & (1 << (p & 63)) != 0)
            .collect();
        assert_eq!(set, vec![1, 63, 64, 65535]);
        assert!(bitmap(None).iter().all(|&w| w == 0));
    }
}
