//! Counters, drop reasons and flow events.

use aya_ebpf::{bindings::BPF_RB_NO_WAKEUP, helpers::bpf_ktime_get_ns, programs::TcContext};
use tapestry_common::{Counter, DropReason, FlowEvent, TrafficStats, config_flags};

use tapestry_ebpf::{maps::increment, packet::Ipv4Packet};

use crate::{config, maps::*};

#[inline(always)]
pub fn count(counter: Counter) {
    increment(&COUNTERS, counter as u32);
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    increment(&DROPS, reason as u32);
}

#[inline(always)]
fn add(stats: Option<*mut TrafficStats>, bytes: u32, new_flow: bool) {
    if let Some(s) = stats {
        // SAFETY: `s` comes from a successful per-CPU array lookup: valid and aligned for the
        // whole run. tc programs run with bottom halves disabled, so nothing else on this CPU
        // writes its copy meanwhile; a host socket's program (process context, migration
        // disabled) can be interrupted by one, which at worst loses one count.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
            if new_flow {
                (*s).flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn account(service_id: u32, backend_id: u32, bytes: u32, new_flow: bool) {
    add(SERVICE_STATS.get_ptr_mut(service_id), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes, new_flow);
}

/// What the datapath decided about a packet, for its flow event.
pub struct Decision {
    pub kind: u8,
    /// `DropReason` for drops.
    pub reason: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub nat_addr: u32,
    pub nat_port: u16,
}

impl Decision {
    #[inline(always)]
    pub fn drop(reason: DropReason, service_id: u32) -> Self {
        Decision {
            kind: tapestry_common::event_kind::DROP,
            reason: reason as u32,
            service_id,
            backend_id: 0,
            nat_addr: 0,
            nat_port: 0,
        }
    }
}

/// Writes a flow event when flow events are on. A full ring buffer never stalls the datapath:
/// the event is dropped and counted.
#[inline(always)]
pub fn emit(ctx: &TcContext, pkt: &Ipv4Packet, d: &Decision) {
    emit_flow(
        tapestry_ebpf::packet::ifindex(ctx),
        (pkt.saddr, pkt.sport),
        (pkt.daddr, pkt.dport),
        pkt.proto,
        d,
    );
}

/// [`emit`] for a flow that is not a packet: a node socket's connection (interface 0, and the
/// source the socket has so far, often none).
#[inline(always)]
pub fn emit_flow(ifindex: u32, src: (u32, u16), dst: (u32, u16), proto: u8, d: &Decision) {
    if config().flags & config_flags::FLOW_EVENTS == 0 {
        return;
    }
    let event = FlowEvent {
        // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        saddr: src.0,
        daddr: dst.0,
        nat_addr: d.nat_addr,
        service_id: d.service_id,
        backend_id: d.backend_id,
        sport: src.1,
        dport: dst.1,
        nat_port: d.nat_port,
        kind: d.kind,
        proto,
        reason: d.reason,
        _pad: 0,
    };
    // No wakeup per event: the daemon drains the ring on a short timer, so a busy node pays no
    // per-flow context switch for its observability (the ring holds ~75k events of slack).
    if EVENTS
        .output::<FlowEvent>(&event, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count(Counter::EventsLost);
    }
}
