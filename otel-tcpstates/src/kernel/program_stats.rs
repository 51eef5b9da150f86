//! What the kernel counts about a loaded program: how often it skipped it.
//!
//! A tracepoint program (and a raw tracepoint one) does not run when it fires
//! while another tracing BPF program runs on the same CPU, as when a timer's
//! softirq interrupts one: the event it would have queued is gone. The kernel
//! counts the skip in the program's `recursion_misses` for tracepoint programs
//! from Linux 6.7 on, raw tracepoint ones from 6.1 (0 before: see
//! `preflight::SKIPS_COUNTED_LINUX`).
use std::{io, mem, os::fd::AsRawFd as _, os::fd::BorrowedFd};

use aya_obj::generated::bpf_prog_info;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// How many times the kernel skipped the program `fd` because another BPF
/// program was running on the CPU.
pub fn recursion_misses(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: bpf_prog_info is plain integers and arrays: all zeroes is valid.
    let mut info: bpf_prog_info = unsafe { mem::zeroed() };
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: mem::size_of::<bpf_prog_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: attr is a valid bpf_attr for this command; `info` outlives the
    // call and is as large as info_len says. A kernel with a smaller struct fills
    // what it knows and leaves the rest (recursion_misses before 5.12) zero.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &raw mut attr,
            mem::size_of::<InfoByFd>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}
