//! The benchmark's floor: the least a program on `sock:inet_sock_set_state` can do,
//! count, so the bench can state our program's kernel cost as a multiple of it on
//! whatever machine it runs (the cost of running any program there).
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};

#[map]
static COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn count_set_state(_ctx: TracePointContext) -> u32 {
    if let Some(count) = COUNT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, touched only by this CPU while the program runs.
        unsafe { *count += 1 };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
