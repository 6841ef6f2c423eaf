//! A stand-in for a primary CNI's own tc program (Cilium's, Calico eBPF's), for the TCX chain test
//! (node-daemon/tests/chain.rs) only; the daemon never loads it. Attached after Tapestry's programs
//! on the same hooks, it records the last IPv4 TCP/UDP packet it saw, as it saw it: so the test can
//! show that it runs at all after a rewrite, and that it sees the packet rewritten.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    macros::{classifier, map},
    maps::Array,
    programs::TcContext,
};
use tapestry_ebpf::{
    packet::{self, Parsed},
    verdict,
};

/// Slot 0: ingress, slot 1: egress. Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Seen {
    pub packets: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u32,
}

#[map]
static CHAIN_PROBE_SEEN: Array<Seen> = Array::with_max_entries(2, 0);

#[classifier]
pub fn chain_probe_ingress(ctx: TcContext) -> i32 {
    record(&ctx, 0)
}

#[classifier]
pub fn chain_probe_egress(ctx: TcContext) -> i32 {
    record(&ctx, 1)
}

#[inline(always)]
fn record(ctx: &TcContext, slot: u32) -> i32 {
    if let Parsed::Packet(p) = packet::parse(ctx)
        && let Some(seen) = CHAIN_PROBE_SEEN.get_ptr_mut(slot)
    {
        // SAFETY: the pointer comes from the map for an index inside it; a concurrent writer
        // could only make the record a mix of two packets, which the test never meets (one flow).
        unsafe {
            (*seen).packets += 1;
            (*seen).saddr = p.saddr;
            (*seen).daddr = p.daddr;
            (*seen).sport = p.sport;
            (*seen).dport = p.dport;
            (*seen).proto = p.proto as u32;
        }
    }
    verdict::NEXT
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects a program whose panic path is reachable; this is never called.
    loop {}
}

// SAFETY: the kernel reads the program's license from the `license` section; `LICENSE` is the
// only symbol of that name and of that section in the object.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
