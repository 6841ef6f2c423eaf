//! Service lookup and backend selection.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use tapestry_common::{
    AffinityEntry, AffinityKey, Backend, DropReason, LB_TABLE_SIZE, Service, ServiceKey, algorithm,
    backend_state, service_flags,
};

use tapestry_ebpf::packet::Ipv4Packet;

use crate::maps::*;

#[inline(always)]
pub fn lb4_lookup_service(daddr: u32, dport: u16, proto: u8) -> Option<Service> {
    let key = ServiceKey {
        vip: daddr,
        port: dport,
        proto,
        _pad: 0,
    };
    // SAFETY: `get` returns a reference into the map that a concurrent update could change
    // under it; it is copied out at once, and the value (RCU-protected) stays valid meanwhile.
    unsafe { SERVICES.get(key) }.copied()
}

// The node port range (`tapestry_common::NODEPORT_MIN_GLOBAL`/`NODEPORT_MAX_GLOBAL`, host byte
// order, set at load; 0..0: no node ports).
// SAFETY: no other symbols in the object have these names.
#[unsafe(no_mangle)]
static NODEPORT_MIN: u16 = 0;
#[unsafe(no_mangle)]
static NODEPORT_MAX: u16 = 0;

/// A frontend: a ClusterIP (or external IP), else a node port on one of the node's own
/// addresses (or loopback, for the node's own sockets).
#[inline(always)]
pub fn lb4_lookup_frontend(daddr: u32, dport: u16, proto: u8) -> Option<Service> {
    match lb4_lookup_service(daddr, dport, proto) {
        Some(svc) => Some(svc),
        None if is_node_addr(daddr) => lb4_lookup_node_port(dport, proto),
        None => None,
    }
}

/// One of the node's own addresses (`NODE_ADDRS`, kept by the daemon), or loopback.
#[inline(always)]
pub fn is_node_addr(daddr: u32) -> bool {
    // 127.0.0.0/8: the first octet is the lowest byte of the address as loaded.
    // SAFETY: only tested for presence.
    daddr & 0xff == 127 || unsafe { NODE_ADDRS.get(daddr) }.is_some()
}

/// The node port service on `dport`, for a packet addressed to one of the node's addresses.
#[inline(always)]
pub fn lb4_lookup_node_port(dport: u16, proto: u8) -> Option<Service> {
    let port = u16::from_be(dport);
    if port < tapestry_ebpf::constant(&NODEPORT_MIN)
        || port > tapestry_ebpf::constant(&NODEPORT_MAX)
    {
        return None;
    }
    lb4_lookup_service(0, dport, proto)
}

#[inline(always)]
pub fn lb4_lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: as in `lb4_lookup_service`: copied out at once, from an RCU-protected value.
    unsafe { BACKENDS.get(id) }.copied()
}

/// Hash of the flow's 5-tuple for Maglev: the same flow always lands on the same table slot,
/// on every node, whatever the packet's arrival CPU.
#[inline(always)]
pub fn hash_tuple(pkt: &Ipv4Packet) -> u32 {
    let ports = ((pkt.sport as u32) << 16) | pkt.dport as u32;
    let h = pkt.saddr.wrapping_mul(0x9e37_79b1)
        ^ pkt.daddr.rotate_left(13)
        ^ ports.wrapping_mul(0x85eb_ca77)
        ^ pkt.proto as u32;
    mix(h)
}

/// Where a new flow of the per-packet path lands in the selection table: the 5-tuple's hash
/// for Maglev, a random draw otherwise.
#[inline(always)]
pub fn packet_slot_hash(svc: &Service, pkt: &Ipv4Packet) -> u32 {
    match svc.algorithm {
        algorithm::MAGLEV => hash_tuple(pkt),
        algorithm::FIRST => 0,
        // SAFETY: bpf_get_prandom_u32 takes no arguments and cannot fail.
        _ => unsafe { bpf_get_prandom_u32() },
    }
}

/// murmur3's finaliser: spreads every input bit over the result.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
fn lb4_select_from_table(table_id: u32, hash: u32) -> Result<u32, DropReason> {
    // Lemire's multiply-shift instead of `%`: the verifier cannot bound a modulo, but it can
    // bound (u32 * N) >> 32 below N, so the table index is provably in range.
    let slot = ((hash as u64 * LB_TABLE_SIZE as u64) >> 32) as usize;
    let table = LB_TABLES
        .get_ptr(table_id)
        .ok_or(DropReason::BackendMissing)?;
    // SAFETY: `table` comes from a successful lookup, so it points at a whole, aligned LbTable
    // that stays valid for the run; `get` bounds-checks `slot`, and the id is copied out.
    let id = unsafe { (*table).backends.get(slot).copied() };
    id.ok_or(DropReason::BackendMissing)
}

/// Chooses the backend of a new flow: the client's affine backend while it is fresh and still
/// active, else the table slot `hash` picks (see [`packet_slot_hash`]). `scope` is the
/// service's id, or `id | LOCAL_SCOPE` for its local-only backends (`EXTERNAL_LOCAL`): the key
/// of both the table and the affinity entry, so an outside client's affinity never names a
/// backend of another node.
#[inline(always)]
pub fn lb4_select_backend(
    svc: &Service,
    scope: u32,
    client_ip: u32,
    hash: impl FnOnce() -> u32,
    now: u64,
) -> Result<(u32, Backend), DropReason> {
    let affinity = svc.flags & service_flags::AFFINITY_CLIENT_IP != 0;
    let akey = AffinityKey {
        service_id: scope,
        client_ip,
    };
    if affinity {
        // SAFETY: as in `lb4_lookup_service`: copied out at once, from an RCU-protected value.
        if let Some(a) = unsafe { AFFINITY.get(akey) }.copied()
            && now.saturating_sub(a.last_used_ns) < svc.affinity_timeout_s as u64 * 1_000_000_000
            && let Some(b) = lb4_lookup_backend(a.backend_id)
            && b.state == backend_state::ACTIVE
        {
            let _ = AFFINITY.insert(
                akey,
                AffinityEntry {
                    backend_id: a.backend_id,
                    _pad: 0,
                    last_used_ns: now,
                },
                0,
            );
            return Ok((a.backend_id, b));
        }
    }
    let id = lb4_select_from_table(scope, hash())?;
    let backend = lb4_lookup_backend(id).ok_or(DropReason::BackendMissing)?;
    if affinity {
        // Best effort: a lost affinity entry costs stickiness, never the packet.
        let _ = AFFINITY.insert(
            akey,
            AffinityEntry {
                backend_id: id,
                _pad: 0,
                last_used_ns: now,
            },
            0,
        );
    }
    Ok((id, backend))
}
