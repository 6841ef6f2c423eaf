//! The Service datapath, two programs on every endpoint's host-side interface (pods' veths, and
//! the VM pods' veths, whose frames come from the guest):
//! - `tapestry_from_endpoint` (ingress: what the endpoint sends): packets to a frontend are
//!   load-balanced (conntrack, backend selection, DNAT);
//! - `tapestry_to_endpoint` (egress: what is delivered to the endpoint): replies of flows this
//!   node DNATed get the frontend back as their source.
//!
//! Reverse NAT happens where the conntrack entry is, on the client's node, as the reply reaches
//! the client, whatever path it took: from a backend on this node or another, from a
//! host-network endpoint (the apiserver behind `kubernetes`), from an address outside the
//! cluster. A node that only hosts the backend has no entry for the flow and translates nothing.
//! Hairpin replies (a backend reaching its own frontend) are the exception: they are addressed to
//! the hairpin SNAT address, which no route delivers, so the ingress program turns them around.
//!
//! Both programs continue the TCX chain (`TCX_NEXT`) after a rewrite, so a primary CNI's own tc
//! program after ours sees the packet, now addressed to the backend (or from the frontend). The
//! chain ends only where the packet does not go on: a drop, an ICMP reject sent back, a hairpin
//! packet redirected back out of the interface it came in on.
//!
//! The fast path (`config_flags::FAST_PATH`, off by default) ends the chain too: a Service flow's
//! packets, once rewritten, are delivered by the program itself (`deliver`), into a local
//! endpoint's namespace with `bpf_redirect_peer` or out along the node's route, past the node's
//! stack and its netfilter; the external interfaces' program delivers what arrives for a local
//! endpoint the same way (`to_local_endpoint`).
//!
//! The node's own sockets (host-network pods, node processes) reach frontends through the
//! cgroup programs of `host.rs`, which translate at connect time instead of per packet.
//!
//! The steps that use the load balancer's maps live here, with the maps (`maps!` below), so that
//! only this object carries them; the map-free steps are tapestry-ebpf's library.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod conntrack;
mod events;
mod host;
mod service;

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use tapestry_common::{
    Backend, Config, Counter, CtEntry, CtKey, DEFAULT_HAIRPIN_SNAT_IP, DropReason, FragmentKey,
    FragmentPorts, IPPROTO_TCP, LOCAL_SCOPE, Service, config_flags, ct_direction, ct_flags,
    event_kind, service_flags,
};
use tapestry_ebpf::{
    fib,
    nat::{Side, rewrite_addr, rewrite_port, swap_macs},
    packet::{self, Ipv4Packet, Parsed, TCP_ACK, TCP_SYN, ifindex},
    reject::lb4_reject,
    verdict,
};

use crate::{
    events::{Decision, account, count, count_drop, emit},
    maps::{CONFIG, ENDPOINT_IFS, FRAGMENTS},
    service::{
        is_node_addr, lb4_lookup_backend, lb4_lookup_node_port, lb4_lookup_service,
        lb4_select_backend, packet_slot_hash,
    },
};

// Exactly `tapestry_common::map_names::ALL` (node-daemon/tests/map_names.rs checks).
tapestry_ebpf::maps!(
    SERVICES,
    BACKENDS,
    LB_TABLES,
    CONNTRACK,
    CONNTRACK_ANY,
    CT_CLIENTS,
    AFFINITY,
    FRAGMENTS,
    CONFIG,
    SERVICE_STATS,
    BACKEND_STATS,
    DROPS,
    COUNTERS,
    EVENTS,
    HOST_REVERSE,
    NODE_ADDRS,
    ENDPOINT_IFS,
);

/// The daemon's runtime configuration; all defaults until it writes one.
#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// Bytes of header we need in the linear area: Ethernet, the longest IPv4 header, TCP.
const HEADERS_MAX: u32 = 14 + 60 + 20;

#[classifier]
pub fn tapestry_from_endpoint(ctx: TcContext) -> i32 {
    count(Counter::Packets);
    from_endpoint(&ctx)
}

#[classifier]
pub fn tapestry_to_endpoint(ctx: TcContext) -> i32 {
    to_endpoint(&ctx)
}

#[classifier]
pub fn tapestry_from_network(ctx: TcContext) -> i32 {
    from_network(&ctx)
}

/// Headers in a paged fragment are pulled into the linear area once; failure only means the
/// parser sees less and passes the packet. Only when the linear area lacks what the parser
/// reads: a pull is never free, since `bpf_skb_pull_data` first makes the skb writable, and
/// for a clone (every TCP segment a local socket sends is one: TCP keeps the original for
/// retransmission) that copies the whole head, for packets this program then leaves untouched
/// as much as for those it rewrites.
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear >= len {
        return;
    }
    let need = packet::headers_needed(ctx).unwrap_or(HEADERS_MAX);
    if linear < need {
        let _ = ctx.pull_data(len.min(need));
    }
}

/// A later fragment has no L4 header: its ports are the ones its first fragment had.
#[inline(always)]
fn fragment_ports(pkt: &mut Ipv4Packet) -> bool {
    if !pkt.later_fragment {
        return true;
    }
    // SAFETY: `get` returns a reference into the map that a concurrent update could change
    // under it; it is copied out at once, and the value (RCU-protected) stays valid meanwhile.
    match unsafe { FRAGMENTS.get(fragment_key(pkt)) }.copied() {
        Some(ports) => {
            pkt.sport = ports.sport;
            pkt.dport = ports.dport;
            true
        }
        None => false,
    }
}

/// A whole IPv4 TCP/UDP packet with its ports (a later fragment's from its first), or None for
/// anything else: what the programs without a frontend check pass on untouched.
#[inline(always)]
fn whole_packet(ctx: &TcContext) -> Option<Ipv4Packet> {
    pull_headers(ctx);
    let mut pkt = match packet::parse(ctx) {
        Parsed::Packet(p) => p,
        Parsed::NotOurs | Parsed::Truncated { .. } => return None,
    };
    fragment_ports(&mut pkt).then_some(pkt)
}

/// What is delivered to the endpoint: replies of the flows this node balanced.
#[inline(always)]
fn to_endpoint(ctx: &TcContext) -> i32 {
    let Some(pkt) = whole_packet(ctx) else {
        return verdict::NEXT;
    };
    match lb4_reply(ctx, &pkt, 0, false) {
        Ok(Some(v)) => v,
        Ok(None) => verdict::NEXT,
        Err(reason) => drop(ctx, &pkt, reason, 0),
    }
}

#[inline(always)]
fn from_endpoint(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    let mut pkt = match packet::parse(ctx) {
        Parsed::NotOurs => return pass(),
        Parsed::Truncated {
            daddr,
            proto,
            ports: Some((_, dport)),
            ..
        } if lb4_lookup_service(daddr, dport, proto).is_some() => {
            // Addressed to a frontend but cut short: never rewrite half a header.
            count_drop(DropReason::Malformed);
            return verdict::DROP;
        }
        Parsed::Truncated { .. } => return pass(),
        Parsed::Packet(p) => p,
    };
    if !fragment_ports(&mut pkt) {
        return pass();
    }
    if let Some(svc) = lb4_lookup_service(pkt.daddr, pkt.dport, pkt.proto) {
        return forward(ctx, &pkt, &svc, false);
    }
    let cfg = config();
    let fast = cfg.flags & config_flags::FAST_PATH != 0;
    let to_node = cfg.flags & config_flags::NODE_ADDRS != 0 && is_node_addr(pkt.daddr);
    // A backend answering a flow it started itself through the frontend (hairpin), or a
    // client outside the node that reached a node port (source translated to the node); with
    // the fast path, any reply (translated here and delivered straight to its client, instead
    // of on the client's interface); else, while a Local frontend exists, a client outside that
    // reached it with its own source.
    let reply_of = if to_node || fast || pkt.daddr == hairpin_snat_ip_of(&cfg) {
        Some(0)
    } else if cfg.flags & config_flags::LOCAL_REPLIES != 0 {
        Some(ct_flags::LOCAL)
    } else {
        None
    };
    if let Some(required) = reply_of {
        match lb4_reply(ctx, &pkt, required, fast) {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(reason) => return drop(ctx, &pkt, reason, 0),
        }
    }
    if to_node && let Some(svc) = lb4_lookup_node_port(pkt.dport, pkt.proto) {
        return forward(ctx, &pkt, &svc, false);
    }
    if is_syn(&pkt) {
        forget_reply_entry(&pkt);
    }
    pass()
}

/// What the node's external interfaces receive: clients outside the node reaching a node port
/// (or an external IP, or a ClusterIP routed to the node), and the replies of those flows from
/// backends on other nodes. Everything else goes on untouched.
#[inline(always)]
fn from_network(ctx: &TcContext) -> i32 {
    let Some(pkt) = whole_packet(ctx) else {
        return verdict::NEXT;
    };
    let to_node = is_node_addr(pkt.daddr);
    if to_node {
        match lb4_reply(ctx, &pkt, 0, false) {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(reason) => return drop(ctx, &pkt, reason, 0),
        }
    }
    let svc = if to_node {
        lb4_lookup_node_port(pkt.dport, pkt.proto)
    } else {
        lb4_lookup_service(pkt.daddr, pkt.dport, pkt.proto)
    };
    match svc {
        Some(svc) => forward(ctx, &pkt, &svc, true),
        None if !to_node && config().flags & config_flags::FAST_PATH != 0 => {
            to_local_endpoint(ctx, &pkt)
        }
        None => verdict::NEXT,
    }
}

/// Fast path, from the network: a packet for a local endpoint goes straight into the endpoint's
/// namespace, a reply of a flow this node balanced (from a backend on another node) translated
/// first. A packet of a flow that another node balanced to a backend here carries nothing that
/// tells it from any other pod-to-pod packet, so every packet for a local endpoint goes this way.
#[inline(always)]
fn to_local_endpoint(ctx: &TcContext, pkt: &Ipv4Packet) -> i32 {
    let Some(route) = fib::next_hop(ctx, pkt.proto, pkt.daddr) else {
        return verdict::NEXT;
    };
    if !is_endpoint_if(route.ifindex) {
        return verdict::NEXT;
    }
    match lb4_reply(ctx, pkt, 0, false) {
        Ok(None) | Ok(Some(verdict::NEXT)) => {}
        Ok(Some(v)) => return v,
        Err(reason) => return drop(ctx, pkt, reason, 0),
    }
    delivered(ctx, &route)
}

/// The fast path (`config_flags::FAST_PATH`): delivers a rewritten packet of a Service flow to
/// `dst` itself. What the FIB cannot answer (no route, over the MTU, forwarding off) goes on
/// through the stack, as without the fast path.
#[inline(always)]
fn deliver(ctx: &TcContext, proto: u8, dst: u32) -> i32 {
    match fib::next_hop(ctx, proto, dst) {
        Some(route) => delivered(ctx, &route),
        None => verdict::NEXT,
    }
}

/// Sends the packet along `route`, counted: into a local endpoint's namespace
/// (`bpf_redirect_peer`, when its route leaves through an endpoint interface and its MAC is
/// known), else out of the route's interface (`bpf_redirect`, or `bpf_redirect_neigh` while the
/// neighbour is unresolved: the kernel resolves it, and the next packets go into the namespace
/// directly). Either way past the node's stack.
#[inline(always)]
fn delivered(ctx: &TcContext, route: &fib::Route) -> i32 {
    let redirect = if route.has_neighbour() && is_endpoint_if(route.ifindex) {
        route.redirect_peer(ctx)
    } else {
        fib::redirect(ctx, route).ok()
    };
    match redirect {
        Some(v) => {
            count(Counter::FastPath);
            v
        }
        None => verdict::NEXT,
    }
}

/// Whether `ifindex` is an endpoint's host-side interface (a veth whose peer is in the
/// endpoint's namespace).
#[inline(always)]
fn is_endpoint_if(ifindex: u32) -> bool {
    // SAFETY: only tested for presence.
    unsafe { ENDPOINT_IFS.get(ifindex) }.is_some()
}

#[inline(always)]
fn forward(ctx: &TcContext, pkt: &Ipv4Packet, svc: &Service, from_network: bool) -> i32 {
    match lb4_forward(ctx, pkt, svc, from_network) {
        Ok(v) => v,
        Err(reason) => drop(ctx, pkt, reason, svc.id),
    }
}

/// A new connection straight to an address and port (not through a frontend): a reply entry
/// of an earlier balanced flow with the same tuple at the backend (the client reusing a source
/// port that once went to a frontend balanced to this very backend) would rewrite this
/// connection's replies to the frontend. The client's kernel only reuses the port once its own
/// connection to the frontend is gone, so the entry is stale: it goes. (UDP has no connection
/// start to tell; its reply entries expire after 60 s.)
#[inline(always)]
fn forget_reply_entry(pkt: &Ipv4Packet) {
    let key = CtKey {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    };
    conntrack::remove(&key);
}

#[inline(always)]
fn pass() -> i32 {
    count(Counter::Passed);
    verdict::NEXT
}

#[inline(always)]
fn drop(ctx: &TcContext, pkt: &Ipv4Packet, reason: DropReason, service_id: u32) -> i32 {
    count_drop(reason);
    emit(ctx, pkt, &Decision::drop(reason, service_id));
    verdict::DROP
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn fragment_key(pkt: &Ipv4Packet) -> FragmentKey {
    FragmentKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: pkt.ip_id,
        proto: pkt.proto,
        _pad: 0,
    }
}

/// The first fragment of a datagram we rewrite tells the later ones their ports.
#[inline(always)]
fn remember_fragment(pkt: &Ipv4Packet) {
    if pkt.first_fragment {
        let ports = FragmentPorts {
            sport: pkt.sport,
            dport: pkt.dport,
        };
        let _ = FRAGMENTS.insert(fragment_key(pkt), ports, 0);
    }
}

#[inline(always)]
fn hairpin_snat_ip() -> u32 {
    hairpin_snat_ip_of(&config())
}

#[inline(always)]
fn hairpin_snat_ip_of(cfg: &Config) -> u32 {
    match cfg.hairpin_snat_ip {
        0 => u32::from_ne_bytes(DEFAULT_HAIRPIN_SNAT_IP),
        ip => ip,
    }
}

/// A TCP SYN (without ACK): the start of a connection.
#[inline(always)]
fn is_syn(pkt: &Ipv4Packet) -> bool {
    pkt.proto == IPPROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// How a flow's source is translated: `HAIRPIN` or `SNAT` (of `ct_flags`), or 0.
const SOURCE_XLATE: u8 = ct_flags::HAIRPIN | ct_flags::SNAT;

/// How a flow is sent on: its source translation, and `LOCAL` (routed by this node, source
/// kept).
const FLOW_PATH: u8 = SOURCE_XLATE | ct_flags::LOCAL;

/// A flow's backend and path: (backend id, backend, `FLOW_PATH` flags, source address written,
/// source port written or 0 for the client's own).
type Chosen = (u32, Backend, u8, u32, u16);

/// Client -> frontend. `from_network`: the client is outside the node (the external
/// interfaces' program): its source is translated to the node and the node routes the packet;
/// for a frontend with `externalTrafficPolicy: Local` (that has backends at all), the backend is
/// one of this node's and the source is kept.
#[inline(always)]
fn lb4_forward(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    svc: &Service,
    from_network: bool,
) -> Result<i32, DropReason> {
    count(Counter::ServicePackets);
    let local =
        from_network && svc.flags & service_flags::EXTERNAL_LOCAL != 0 && svc.backend_count != 0;
    let now = now();
    let fkey = conntrack::forward_key(pkt);
    let mut new_flow = true;
    let mut reselect = false;
    let mut chosen: Option<Chosen> = None;
    let mut fkey_held = false;

    if let Some(entry) = conntrack::lookup(&fkey) {
        fkey_held = true;
        // SAFETY: `entry` comes from a successful lookup: a valid, aligned entry for the rest of
        // the run; copied out at once.
        let e = unsafe { *entry };
        // A SYN on a closing entry is a new connection reusing the client's port.
        let stale = conntrack::is_expired(&e, pkt.proto, now)
            || (is_syn(pkt) && e.flags & ct_flags::CLOSING != 0);
        if !stale {
            match lb4_lookup_backend(e.backend_id) {
                // Same id and same address: the flow's backend still exists (active or draining).
                Some(b) if b.ip == e.nat_addr && b.port == e.nat_port => {
                    let add = conntrack::flags_from_tcp(pkt);
                    if add & ct_flags::CLOSING != 0 && e.flags & ct_flags::CLOSING == 0 {
                        conntrack::share_sub(pkt.saddr);
                    }
                    // SAFETY: `entry` comes from the lookup above, in this run (touch's contract).
                    unsafe { conntrack::touch(entry, add, now) };
                    new_flow = false;
                    chosen = Some((
                        e.backend_id,
                        b,
                        e.flags & FLOW_PATH,
                        e.nat_peer_addr,
                        u16::from_ne_bytes(e.nat_peer_port),
                    ));
                }
                // The backend was removed under a live flow. Choosing again beats black-holing:
                // a UDP flow simply continues; a TCP peer that does not know the connection
                // answers RST, and the client learns at once instead of timing out.
                _ => reselect = true,
            }
        }
    }

    let (backend_id, backend, xlate, snat, snat_port) = match chosen {
        Some(c) => c,
        None => {
            // From outside, only a connection's first packet starts a flow: a TCP segment
            // without an entry is someone else's (the node's own connection whose local port
            // happens to be a node port's), and goes on untouched.
            if from_network && pkt.proto == IPPROTO_TCP && !is_syn(pkt) {
                return Ok(verdict::NEXT);
            }
            if local && svc.local_backend_count == 0 {
                // Backends elsewhere only: kube-proxy drops (a client retries another node),
                // it does not refuse.
                return Err(DropReason::NoLocalBackend);
            }
            if svc.backend_count == 0 {
                return lb4_no_backend(ctx, pkt, svc, reselect);
            }
            lb4_new_flow(
                ctx,
                pkt,
                svc,
                now,
                &fkey,
                fkey_held,
                reselect,
                from_network,
                local,
            )?
        }
    };

    remember_fragment(pkt);
    if xlate & SOURCE_XLATE != 0 {
        rewrite_addr(ctx, pkt, Side::Source, pkt.saddr, snat)?;
        if snat_port != 0 {
            rewrite_port(ctx, pkt, Side::Source, pkt.sport, snat_port)?;
        }
    }
    rewrite_addr(ctx, pkt, Side::Destination, pkt.daddr, backend.ip)?;
    rewrite_port(ctx, pkt, Side::Destination, pkt.dport, backend.port)?;
    account(svc.id, backend_id, pkt.len, new_flow);
    if xlate & ct_flags::HAIRPIN != 0 {
        // Client and backend are the same endpoint: send the packet straight back out of the
        // interface it came from, as the gateway would.
        swap_macs(ctx)?;
        // SAFETY: bpf_redirect takes plain integers and only records the target.
        return Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32);
    }
    if xlate & (ct_flags::SNAT | ct_flags::LOCAL) != 0 {
        // SNAT: from the node's own address now, the stack would take it for a martian. LOCAL:
        // routed the same way, so both directions of a flow from outside bypass the stack.
        return fib::redirect(ctx, &fib::route(ctx, pkt.proto, backend.ip)?);
    }
    if config().flags & config_flags::FAST_PATH != 0 {
        return Ok(deliver(ctx, pkt.proto, backend.ip));
    }
    // On along the chain: a primary's program after ours sees the packet to the backend.
    Ok(verdict::NEXT)
}

/// A service with no backend: new connections are refused with ICMP port unreachable, as
/// kube-proxy does. A live flow whose last backend vanished is dropped instead (an ICMP error is
/// only a soft error to an established TCP socket).
#[inline(always)]
fn lb4_no_backend(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    svc: &Service,
    live_flow: bool,
) -> Result<i32, DropReason> {
    if live_flow || (pkt.proto == IPPROTO_TCP && !is_syn(pkt)) {
        return Err(DropReason::NoBackend);
    }
    count_drop(DropReason::NoBackend);
    emit(ctx, pkt, &Decision::drop(DropReason::NoBackend, svc.id));
    lb4_reject(ctx, pkt)
}

/// Source ports a new hairpin flow tries at its backend before it gives up.
const HAIRPIN_PORT_TRIES: u32 = 8;

/// The source port a new source-translated flow (hairpin, or node port SNAT) gets at its
/// backend, network byte order, 0 for the client's own. Every such flow has the same source
/// address there (the hairpin address, the node's), so two of them from one client port (or two
/// clients' same port) to frontends with the same backend port would share a reply entry, and
/// one would take the other's replies. The client's port is kept unless a live flow of another
/// client or frontend holds it; then random ports of the ephemeral range are tried.
#[inline(always)]
fn source_port(
    pkt: &Ipv4Packet,
    backend: &Backend,
    snat: u32,
    now: u64,
) -> Result<u16, DropReason> {
    let mut key = CtKey {
        saddr: backend.ip,
        daddr: snat,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    };
    for _ in 0..HAIRPIN_PORT_TRIES {
        let free = match conntrack::lookup(&key) {
            None => true,
            Some(entry) => {
                // SAFETY: a successful lookup: a valid, aligned entry, copied out at once.
                let e = unsafe { *entry };
                let client_port = match u16::from_ne_bytes(e.nat_peer_port) {
                    0 => key.dport,
                    p => p,
                };
                // Expired, or this very flow's (a SYN again after its entry closed).
                conntrack::is_expired(&e, pkt.proto, now)
                    || (e.nat_peer_addr == pkt.saddr
                        && e.nat_addr == pkt.daddr
                        && e.nat_port == pkt.dport
                        && client_port == pkt.sport)
            }
        };
        if free {
            return Ok(if key.dport == pkt.sport { 0 } else { key.dport });
        }
        // SAFETY: bpf_get_prandom_u32 takes no arguments and cannot fail.
        let r = unsafe { bpf_get_prandom_u32() };
        // Linux's default ephemeral range, 32768..=60999.
        key.dport = ((32768 + r % 28232) as u16).to_be();
    }
    Err(DropReason::HairpinPortClash)
}

/// Chooses a backend and stores both conntrack entries. The reply entry goes in first, so a reply
/// never arrives before it; if the forward entry then fails, the reply entry is taken back out.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn lb4_new_flow(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    svc: &Service,
    now: u64,
    fkey: &CtKey,
    fkey_held: bool,
    reselect: bool,
    from_network: bool,
    local: bool,
) -> Result<Chosen, DropReason> {
    if !conntrack::share_admits(pkt.saddr) {
        return Err(DropReason::ConntrackShare);
    }
    let scope = if local { svc.id | LOCAL_SCOPE } else { svc.id };
    let (backend_id, backend) =
        lb4_select_backend(svc, scope, pkt.saddr, || packet_slot_hash(svc, pkt), now)?;
    let (xlate, snat) = if local {
        // The client's own address reaches this node's backend; its replies are caught as
        // they leave the backend (`from_endpoint`, `LOCAL_REPLIES`).
        (0, 0)
    } else if from_network {
        // The node's address towards the backend: replies come back through this node.
        (ct_flags::SNAT, fib::route(ctx, pkt.proto, backend.ip)?.src)
    } else if backend.ip == pkt.saddr {
        (ct_flags::HAIRPIN, hairpin_snat_ip())
    } else {
        (0, 0)
    };
    let snat_port = if xlate != 0 {
        source_port(pkt, &backend, snat, now)?
    } else {
        0
    };
    let path = if local { ct_flags::LOCAL } else { xlate };
    let flags = path | conntrack::flags_from_tcp(pkt);
    let rkey = CtKey {
        saddr: backend.ip,
        daddr: if xlate != 0 { snat } else { pkt.saddr },
        sport: backend.port,
        dport: if snat_port != 0 { snat_port } else { pkt.sport },
        proto: pkt.proto,
        direction: ct_direction::REPLY,
        _pad: [0; 2],
    };
    let reply = CtEntry {
        nat_addr: pkt.daddr,
        nat_peer_addr: if xlate != 0 { pkt.saddr } else { 0 },
        backend_id,
        service_id: svc.id,
        created_ns: now,
        last_seen_ns: now,
        nat_port: pkt.dport,
        flags: path,
        nat_peer_port: if snat_port != 0 {
            pkt.sport.to_ne_bytes()
        } else {
            [0; 2]
        },
        _pad: [0; 3],
    };
    let forward = CtEntry {
        nat_addr: backend.ip,
        nat_peer_addr: snat,
        nat_port: backend.port,
        flags,
        nat_peer_port: snat_port.to_ne_bytes(),
        ..reply
    };
    // A reply entry under this tuple is rare: a stale one (its flow is gone, the client's port
    // came back to the same backend port), replaced on the insert's second try; not looked up
    // first, which every new flow would pay for.
    conntrack::insert(&rkey, &reply, false).map_err(|_| DropReason::ConntrackFull)?;
    if conntrack::insert(fkey, &forward, fkey_held).is_err() {
        conntrack::remove(&rkey);
        return Err(DropReason::ConntrackFull);
    }
    if forward.flags & ct_flags::CLOSING == 0 {
        conntrack::share_add(pkt.saddr);
    }
    count(Counter::NewFlows);
    if xlate & ct_flags::HAIRPIN != 0 {
        count(Counter::Hairpin);
    }
    let kind = if reselect {
        count(Counter::Reselected);
        event_kind::RESELECTED
    } else {
        event_kind::NEW_FLOW
    };
    emit(
        ctx,
        pkt,
        &Decision {
            kind,
            reason: 0,
            service_id: svc.id,
            backend_id,
            nat_addr: backend.ip,
            nat_port: backend.port,
        },
    );
    Ok((backend_id, backend, path, snat, snat_port))
}

/// Backend -> client: restore the frontend as the source (and, for a source-translated flow, the
/// client's own address as the destination). Only an entry with every flag of `required` is
/// taken (the other entries are left alone, untouched). `fast`: a reply of a plain flow is
/// delivered to its client by the fast path (only from an ingress program).
#[inline(always)]
fn lb4_reply(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    required: u8,
    fast: bool,
) -> Result<Option<i32>, DropReason> {
    let rkey = conntrack::reply_key(pkt);
    let Some(entry) = conntrack::lookup(&rkey) else {
        return Ok(None);
    };
    // SAFETY: `entry` comes from a successful lookup: a valid, aligned entry for the rest of the
    // run; copied out at once.
    let e = unsafe { *entry };
    if e.flags & required != required {
        return Ok(None);
    }
    let now = now();
    if conntrack::is_expired(&e, pkt.proto, now) {
        return Ok(None);
    }
    // SAFETY: `entry` comes from the lookup above, in this run (touch's contract).
    unsafe {
        conntrack::touch(
            entry,
            conntrack::flags_from_tcp(pkt) | ct_flags::SEEN_REPLY,
            now,
        )
    };
    let xlate = e.flags & SOURCE_XLATE;
    // The client's own port, where a source-translated flow's was.
    let client_port = match u16::from_ne_bytes(e.nat_peer_port) {
        0 => pkt.dport,
        p => p,
    };
    if e.flags & ct_flags::SEEN_REPLY == 0 {
        // First reply: the forward entry moves from the SYN lifetime to the established one.
        let fkey = CtKey {
            saddr: if xlate != 0 {
                e.nat_peer_addr
            } else {
                pkt.daddr
            },
            daddr: e.nat_addr,
            sport: client_port,
            dport: e.nat_port,
            proto: pkt.proto,
            direction: ct_direction::FORWARD,
            _pad: [0; 2],
        };
        if let Some(f) = conntrack::lookup(&fkey) {
            // SAFETY: `f` comes from the lookup just above, in this run (touch's contract).
            unsafe { conntrack::touch(f, ct_flags::SEEN_REPLY, now) };
        }
    }
    remember_fragment(pkt);
    rewrite_addr(ctx, pkt, Side::Source, pkt.saddr, e.nat_addr)?;
    rewrite_port(ctx, pkt, Side::Source, pkt.sport, e.nat_port)?;
    count(Counter::ReverseNat);
    if e.flags & ct_flags::LOCAL != 0 {
        // From the frontend (a node address: a martian to the stack) to the client outside.
        return Ok(Some(fib::redirect(
            ctx,
            &fib::route(ctx, pkt.proto, pkt.daddr)?,
        )?));
    }
    if xlate == 0 {
        if fast {
            return Ok(Some(deliver(ctx, pkt.proto, pkt.daddr)));
        }
        return Ok(Some(verdict::NEXT));
    }
    rewrite_addr(ctx, pkt, Side::Destination, pkt.daddr, e.nat_peer_addr)?;
    rewrite_port(ctx, pkt, Side::Destination, pkt.dport, client_port)?;
    if xlate & ct_flags::HAIRPIN != 0 {
        swap_macs(ctx)?;
        // SAFETY: bpf_redirect takes plain integers and only records the target.
        return Ok(Some(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32));
    }
    // From the node port (the node's address) to the client outside: routed here.
    Ok(Some(fib::redirect(
        ctx,
        &fib::route(ctx, pkt.proto, e.nat_peer_addr)?,
    )?))
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
