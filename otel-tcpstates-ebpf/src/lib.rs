// Empty library target: lets the userspace crate name this package as a
// build-dependency, so cargo rebuilds it when the eBPF program changes.
#![no_std]
