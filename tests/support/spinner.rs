//! A foreign BPF program that keeps a CPU inside BPF: a tracepoint program on
//! `raw_syscalls:sys_enter` that, for this process's system calls only, spins in
//! a loop. While it runs, the kernel skips (and counts in the program's
//! `recursion_misses`) every other tracepoint program that fires on that CPU,
//! as from a timer's softirq: the way another tool's programs make the
//! daemon's miss events on a real node.
//!
//! Loaded from raw instructions with the bpf(2) system call, so no compiler is
//! needed; detached and unloaded on drop.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// One BPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_FUNC_GET_CURRENT_PID_TGID: i32 = 14;
const BPF_FUNC_KTIME_GET_NS: i32 = 5;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// The program's name, as `bpftool prog show` lists it.
pub const NAME: &str = "losses_spin";

/// The attached program; dropping it detaches and unloads it.
pub struct Spinner {
    _perf: OwnedFd,
    _prog: OwnedFd,
}

impl Spinner {
    /// Attaches a program that reads the clock `rounds` times at each system
    /// call this process makes, on any CPU. A bounded loop the verifier walks
    /// round by round: at most about 300,000 rounds (its million instructions).
    pub fn attach(rounds: u32) -> io::Result<Spinner> {
        let pid = std::process::id() as i32;
        let program = [
            // r0 = bpf_get_current_pid_tgid() >> 32
            insn(0x85, 0, 0, 0, BPF_FUNC_GET_CURRENT_PID_TGID),
            insn(0x77, 0, 0, 0, 32),
            // if r0 != pid goto out (+4)
            insn(0x55, 0, 0, 4, pid),
            // r6 = rounds; do { bpf_ktime_get_ns(); } while (--r6 != 0)
            insn(0xb7, 6, 0, 0, rounds as i32),
            insn(0x85, 0, 0, 0, BPF_FUNC_KTIME_GET_NS),
            insn(0x07, 6, 0, 0, -1),
            insn(0x55, 6, 0, -3, 0),
            // out: return 0
            insn(0xb7, 0, 0, 0, 0),
            insn(0x95, 0, 0, 0, 0),
        ];
        let license = c"GPL";
        // union bpf_attr for BPF_PROG_LOAD, by field offset.
        let mut attr = [0u8; 128];
        let put = |attr: &mut [u8; 128], at: usize, bytes: &[u8]| {
            attr[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut attr, 0, &BPF_PROG_TYPE_TRACEPOINT.to_ne_bytes());
        put(&mut attr, 4, &(program.len() as u32).to_ne_bytes());
        put(&mut attr, 8, &(program.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        // No verifier log: it would list every round of the loop.
        put(&mut attr, 48, NAME.as_bytes());
        // SAFETY: attr is a valid bpf_attr for BPF_PROG_LOAD; the pointers in it
        // outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                attr.as_ptr(),
                attr.len() as u32,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("loading {NAME}: {err}")));
        }
        // SAFETY: a new fd the kernel just returned.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };

        let id: u64 = tracepoint_id("raw_syscalls/sys_enter")?;
        // struct perf_event_attr (PERF_ATTR_SIZE_VER5), by field offset.
        let mut pattr = [0u8; 112];
        pattr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
        pattr[4..8].copy_from_slice(&112u32.to_ne_bytes());
        pattr[8..16].copy_from_slice(&id.to_ne_bytes());
        pattr[16..24].copy_from_slice(&1u64.to_ne_bytes());
        // One CPU is enough: the program belongs to the tracepoint, and runs on
        // every CPU once one event holds it.
        // SAFETY: pattr is a valid perf_event_attr of the size it says.
        let perf = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                pattr.as_ptr(),
                -1 as libc::pid_t,
                0 as libc::c_int,
                -1 as libc::c_int,
                8 as libc::c_ulong, // PERF_FLAG_FD_CLOEXEC
            )
        };
        if perf < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd the kernel just returned.
        let perf = unsafe { OwnedFd::from_raw_fd(perf as i32) };
        // SAFETY: ioctls on the perf event fd, with a program fd and no argument.
        unsafe {
            if libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) != 0
                || libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Spinner {
            _perf: perf,
            _prog: prog,
        })
    }
}

/// A tracepoint's id from tracefs, mounting tracefs first if it is not.
fn tracepoint_id(name: &str) -> io::Result<u64> {
    let dir = "/sys/kernel/tracing";
    if !std::path::Path::new(dir).join("events").exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "tracefs", "tracefs", dir])
            .status();
    }
    let path = format!("{dir}/events/{name}/id");
    std::fs::read_to_string(&path)
        .map_err(|err| io::Error::new(err.kind(), format!("{path}: {err}")))?
        .trim()
        .parse()
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {err}")))
}
