//! Conntrack: a forward entry keyed by the client's original tuple (which backend, which NAT) and
//! a reply entry keyed by the tuple the backend's replies carry (how to restore the frontend).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    maps::LruHashMap,
};
use tapestry_common::{Counter, CtEntry, CtKey, IPPROTO_TCP, ct_direction, ct_flags, ct_lifetime};

use tapestry_ebpf::packet::{Ipv4Packet, TCP_FIN, TCP_RST};

use crate::{
    events::count,
    maps::{CONNTRACK, CONNTRACK_ANY, CT_CLIENTS},
};

/// `-EEXIST`, what an update with `BPF_NOEXIST` returns for a key the map holds.
const EEXIST: i32 = 17;

// Live flows one client address may hold (`tapestry_common::CT_SHARE_GLOBAL`, set at load;
// 0: no limit).
// SAFETY: no other symbol in the object is named CT_SHARE_MAX.
#[unsafe(no_mangle)]
static CT_SHARE_MAX: u32 = 0;

/// The conntrack share: whether `client` may open one more flow.
#[inline(always)]
pub fn share_admits(client: u32) -> bool {
    let max = tapestry_ebpf::constant(&CT_SHARE_MAX);
    if max == 0 {
        return true;
    }
    // SAFETY: copied out at once from an RCU-protected value.
    match unsafe { CT_CLIENTS.get(client) } {
        Some(n) => *n < max,
        None => true,
    }
}

/// A new flow of `client` (counted only while a share is set).
#[inline(always)]
pub fn share_add(client: u32) {
    if tapestry_ebpf::constant(&CT_SHARE_MAX) == 0 {
        return;
    }
    match CT_CLIENTS.get_ptr_mut(client) {
        // SAFETY: a successful lookup: a valid, aligned value for the rest of the run; a racing
        // CPU can lose an update, which the daemon's recount corrects.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = CT_CLIENTS.insert(client, 1, 0);
        }
    }
}

/// A flow of `client` closing (its forward entry's first FIN or RST).
#[inline(always)]
pub fn share_sub(client: u32) {
    if tapestry_ebpf::constant(&CT_SHARE_MAX) == 0 {
        return;
    }
    if let Some(n) = CT_CLIENTS.get_ptr_mut(client) {
        // SAFETY: as in share_add.
        unsafe {
            if *n > 0 {
                *n -= 1;
            }
        }
    }
}

/// TCP flows in one table, everything else in another: datagrams with random ports, however
/// many, only ever evict datagram flows.
#[inline(always)]
fn table(key: &CtKey) -> &'static LruHashMap<CtKey, CtEntry> {
    if key.proto == IPPROTO_TCP {
        &CONNTRACK
    } else {
        &CONNTRACK_ANY
    }
}

#[inline(always)]
pub fn forward_key(pkt: &Ipv4Packet) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        direction: ct_direction::FORWARD,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn reply_key(pkt: &Ipv4Packet) -> CtKey {
    CtKey {
        direction: ct_direction::REPLY,
        ..forward_key(pkt)
    }
}

#[inline(always)]
pub fn is_expired(entry: &CtEntry, proto: u8, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) > ct_lifetime::for_entry(proto, entry.flags)
}

/// Flags a TCP packet adds to its entry.
#[inline(always)]
pub fn flags_from_tcp(pkt: &Ipv4Packet) -> u8 {
    if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        ct_flags::CLOSING
    } else {
        0
    }
}

/// Refreshes `entry` for a packet seen now: at most once a second unless its flags change, so a
/// busy flow does not write the shared entry on every packet.
///
/// # Safety
/// `entry` must come from a successful conntrack lookup in this program run. Racing writers
/// only ever move last_seen forward or add flags; a lost update costs a refresh, never
/// correctness.
#[inline(always)]
pub unsafe fn touch(entry: *mut CtEntry, add_flags: u8, now: u64) {
    // SAFETY: by the contract above `entry` points at a live, aligned entry (an RCU-protected
    // hash map value stays valid for the rest of the program run); the writes are plain stores
    // of fields, so a racing writer on another CPU can only make an update get lost.
    unsafe {
        let flags = (*entry).flags | add_flags;
        if flags != (*entry).flags
            || now.saturating_sub((*entry).last_seen_ns) > ct_lifetime::REFRESH_NS
        {
            (*entry).flags = flags;
            (*entry).last_seen_ns = now;
        }
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    table(key).get_ptr_mut(key)
}

/// The counter of `key`'s table among (TCP, the rest).
#[inline(always)]
fn counter(key: &CtKey, tcp: Counter, other: Counter) -> Counter {
    if key.proto == IPPROTO_TCP { tcp } else { other }
}

/// Stores `entry` under `key`. `held`: the caller found an entry under `key` (a stale one it
/// replaces); otherwise a first try with `BPF_NOEXIST` tells (an LRU update takes a free
/// element before it looks at the key, so a second try costs one more under pressure: only
/// where an entry turns out to be there). Every entry stored under a key the table did not
/// hold is counted (`Counter::ConntrackCreated`), so that what left the table without being
/// removed by the datapath or the daemon is known: the LRU's evictions, which run no program.
#[inline(always)]
pub fn insert(key: &CtKey, entry: &CtEntry, held: bool) -> Result<(), i32> {
    if held {
        return table(key).insert(key, entry, BPF_ANY as u64);
    }
    match table(key).insert(key, entry, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(counter(
                key,
                Counter::ConntrackCreated,
                Counter::ConntrackAnyCreated,
            ));
            Ok(())
        }
        // Another CPU stored this flow's entry meanwhile (and counted it): replaced.
        Err(e) if e == -EEXIST => table(key).insert(key, entry, BPF_ANY as u64),
        Err(e) => Err(e),
    }
}

/// Takes `key`'s entry out (counted, `Counter::ConntrackRemoved`); absent is fine.
#[inline(always)]
pub fn remove(key: &CtKey) {
    if table(key).remove(key).is_ok() {
        count(counter(
            key,
            Counter::ConntrackRemoved,
            Counter::ConntrackAnyRemoved,
        ));
    }
}
