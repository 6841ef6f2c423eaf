//! The VM pod cross-connect, inside the pod's network namespace: no bridge, no NAT.
//!
//! - `tapestry_pod_to_guest` on the pod interface's ingress (eth0: what the pod network sends to
//!   the pod) redirects every frame into the tap, to the guest, who owns the pod's IP and MAC.
//! - `tapestry_guest_to_pod` on the tap's ingress (what the guest sends) checks the source MAC,
//!   IPv4 source and ARP sender against the guest's, drops VLAN-tagged frames and DHCP replies
//!   (a guest is never a DHCP server), hands DHCP to the daemon through a ring buffer at a
//!   per-guest rate, and redirects the rest out of the pod interface (a plain egress redirect, so the
//!   frame really leaves eth0 and the host sees ordinary pod egress on the pod's veth). Besides
//!   IPv4 and ARP it passes the guest's RARP self-announcements (QEMU's after a live migration),
//!   counted as such.
//! - The guest's ARP replies to the daemon's readiness probe (node-daemon/src/guests/probe.rs)
//!   are counted for the daemon and consumed here, so the daemon needs no socket that would see
//!   every frame on the tap.
//! - Migration target mode (`GUEST_GATEWAY_MAC` set): a guest that migrated in still holds the
//!   previous node's gateway MAC in its neighbour cache. The tap's program answers the guest's
//!   ARP requests for other addresses itself, with this node's gateway MAC (as Cilium's
//!   `bpf_lxc` ARP responder answers its endpoints), and writes that MAC into the destination of
//!   every other unicast frame it passes.
//!
//! One copy is loaded per guest: the interfaces and the guest's addresses are `.rodata`
//! constants set at load time, so the fast path compares immediates and needs no lookup.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_skb_load_bytes},
    macros::classifier,
    programs::TcContext,
};
use tapestry_common::{
    DHCP_FRAME_MAX, DhcpFrame, DhcpLimit, DropReason, GuestStats, IPPROTO_UDP, mac_from_u64,
    mac_u64,
};
use tapestry_ebpf::{
    constant,
    maps::increment,
    nat::store_macs,
    packet::{ETH_HLEN, ETH_P_IP, EthHdr, Ipv4Hdr, read},
    verdict,
};

use crate::maps::{DHCP, DHCP_RATE, DROPS, GUEST_STATS};

// Exactly `tapestry_common::map_names::GUEST` (node-daemon/tests/map_names.rs checks).
tapestry_ebpf::maps!(GUEST_STATS, DHCP, DHCP_RATE, DROPS);

// The loader finds these constants by their symbol names (`tapestry_common::guest_globals`) and
// rewrites them per guest.
// SAFETY: no other symbol in the object is named GUEST_SLOT.
#[unsafe(no_mangle)]
static GUEST_SLOT: u32 = 0;
// SAFETY: no other symbol in the object is named GUEST_TAP_IFINDEX.
#[unsafe(no_mangle)]
static GUEST_TAP_IFINDEX: u32 = 0;
// SAFETY: no other symbol in the object is named GUEST_POD_IFINDEX.
#[unsafe(no_mangle)]
static GUEST_POD_IFINDEX: u32 = 0;
// SAFETY: no other symbol in the object is named GUEST_MAC.
#[unsafe(no_mangle)]
static GUEST_MAC: u64 = 0;
// SAFETY: no other symbol in the object is named GUEST_IP.
#[unsafe(no_mangle)]
static GUEST_IP: u32 = 0;
// SAFETY: no other symbol in the object is named GUEST_MTU.
#[unsafe(no_mangle)]
static GUEST_MTU: u32 = 0;
// The tap's own MAC (`mac_u64`): where the readiness probe's ARP requests come from.
// SAFETY: no other symbol in the object is named GUEST_TAP_MAC.
#[unsafe(no_mangle)]
static GUEST_TAP_MAC: u64 = 0;
// The DHCP rate limit (`tapestry_common::DhcpLimit::program_constants`); the initial values are
// DhcpLimit::DEFAULT's, for a loader that does not set them.
// SAFETY: no other symbol in the object is named GUEST_DHCP_INTERVAL_NS.
#[unsafe(no_mangle)]
static GUEST_DHCP_INTERVAL_NS: u64 = DhcpLimit::DEFAULT.program_constants().0;
// SAFETY: no other symbol in the object is named GUEST_DHCP_TOLERANCE_NS.
#[unsafe(no_mangle)]
static GUEST_DHCP_TOLERANCE_NS: u64 = DhcpLimit::DEFAULT.program_constants().1;
// Migration target mode: this node's gateway MAC (`mac_u64`), 0: off. A read-only constant, so
// with 0 the verifier knows the mode's branches are never taken and removes them: the program
// costs what it did without the mode (one load of the constant).
// SAFETY: no other symbol in the object is named GUEST_GATEWAY_MAC.
#[unsafe(no_mangle)]
static GUEST_GATEWAY_MAC: u64 = 0;

const ETH_P_ARP: u16 = 0x0806;
const ARP_HRD_ETHER: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
const ARP_OP_REPLY: u16 = 2;
/// RARP: what QEMU's `qemu_announce_self` broadcasts from the guest's MAC after a live
/// migration's switch-over, so that switches learn where the guest went.
const ETH_P_RARP: u16 = 0x8035;
/// 802.1Q, 802.1ad and the pre-standard QinQ tag types.
const VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
/// Smallest frame that can hold a DHCP message's headers (Ethernet, IPv4, UDP).
const DHCP_FRAME_MIN: u32 = (ETH_HLEN + 20 + 8) as u32;

/// Updates this guest's counters (this CPU's copy; userspace sums the CPUs).
#[inline(always)]
fn update_stats(f: impl FnOnce(&mut GuestStats)) {
    if let Some(s) = GUEST_STATS.get_ptr_mut(constant(&GUEST_SLOT)) {
        // SAFETY: a successful lookup gives a valid, aligned pointer to this CPU's copy of the
        // slot, alive while the program runs; tc programs run with bottom halves disabled, so no
        // other program run on this CPU holds a reference to this copy meanwhile.
        f(unsafe { &mut *s });
    }
}

#[classifier]
pub fn tapestry_pod_to_guest(ctx: TcContext) -> i32 {
    update_stats(|s| {
        s.tx_packets += 1;
        s.tx_bytes += ctx.len() as u64;
    });
    // Without a reader on the tap (the VM process not started yet) the tap drops the frame and
    // counts it in its own tx_dropped; this program cannot tell, and counts it above.
    // SAFETY: bpf_redirect takes plain integers and only records the target.
    unsafe { bpf_redirect(constant(&GUEST_TAP_IFINDEX), 0) as i32 }
}

#[classifier]
pub fn tapestry_guest_to_pod(ctx: TcContext) -> i32 {
    match guest_to_pod(&ctx) {
        Ok(v) => v,
        Err(reason) => {
            increment(&DROPS, reason as u32);
            update_stats(|s| {
                if let Some(d) = s.drops.get_mut(reason as usize) {
                    *d += 1;
                }
            });
            verdict::DROP
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ArpIpv4 {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// What an accepted frame from the guest says about it, for its counters.
#[derive(Clone, Copy)]
struct Accepted {
    /// The guest used its own address (IPv4 source or ARP sender): readiness.
    own_address: bool,
    /// A RARP self-announcement.
    announce: bool,
}

/// Records, in the guest's counters already looked up, that an accepted frame came from the
/// guest: the first such frame on this CPU sets `live_ns`, the first that used the guest's
/// address `seen_ns` (each written once per CPU).
#[inline(always)]
fn mark_accepted(s: &mut GuestStats, a: Accepted) {
    if s.live_ns == 0 {
        // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
        s.live_ns = unsafe { bpf_ktime_get_ns() };
    }
    if a.own_address && s.seen_ns == 0 {
        // SAFETY: as above.
        s.seen_ns = unsafe { bpf_ktime_get_ns() };
    }
    if a.announce {
        s.announces += 1;
    }
}

#[inline(always)]
fn guest_to_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    // SAFETY: the context pointer is the program's __sk_buff, valid for the whole run; reading
    // a field the verifier allows tc programs to read.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        // A tag the kernel moved into the metadata before tc (the tap's receive path does).
        return Err(DropReason::VlanTagged);
    }
    let mtu = constant(&GUEST_MTU);
    // SAFETY: as above.
    if mtu != 0 && ctx.len() > mtu + ETH_HLEN as u32 && unsafe { (*ctx.skb.skb).gso_size } == 0 {
        return Err(DropReason::Oversized);
    }
    let eth = read::<EthHdr>(ctx, 0).ok_or(DropReason::UnsupportedProtocol)?;
    if mac_u64(&eth.src) != constant(&GUEST_MAC) {
        return Err(DropReason::SpoofedMac);
    }
    if VLAN_TAGS.iter().any(|t| eth.proto == t.to_be()) {
        return Err(DropReason::VlanTagged);
    }
    let guest_ip = constant(&GUEST_IP);
    let accepted = if eth.proto == ETH_P_ARP.to_be() {
        let arp = read::<ArpIpv4>(ctx, ETH_HLEN).ok_or(DropReason::SpoofedArp)?;
        if mac_u64(&arp.sha) != constant(&GUEST_MAC) {
            return Err(DropReason::SpoofedArp);
        }
        let spa = u32::from_ne_bytes(arp.spa);
        // 0.0.0.0 is an address probe (RFC 5227) before the guest configures its address.
        if spa != guest_ip && spa != 0 {
            return Err(DropReason::SpoofedArp);
        }
        let tap_mac = constant(&GUEST_TAP_MAC);
        if arp.op == ARP_OP_REPLY.to_be()
            && spa == guest_ip
            && tap_mac != 0
            && mac_u64(&arp.tha) == tap_mac
        {
            // The guest answers the daemon's probe (sent from the tap's MAC): the daemon's, not
            // the network's, and no drop.
            update_stats(|s| {
                s.probe_replies += 1;
                mark_accepted(
                    s,
                    Accepted {
                        own_address: true,
                        announce: false,
                    },
                );
            });
            return Ok(verdict::DROP);
        }
        let gateway = constant(&GUEST_GATEWAY_MAC);
        if gateway != 0 {
            core::hint::cold_path();
            if let Some(answered) = answer_arp(ctx, guest_ip, gateway)? {
                return Ok(answered);
            }
        }
        Accepted {
            own_address: spa == guest_ip,
            announce: false,
        }
    } else if eth.proto == ETH_P_IP.to_be() {
        let ip = read::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(DropReason::SpoofedIp)?;
        if ip.proto == IPPROTO_UDP {
            match dhcp_direction(ctx, &ip) {
                Dhcp::Request => {
                    dhcp_to_daemon(ctx)?;
                    return Ok(verdict::DROP);
                }
                Dhcp::Reply => return Err(DropReason::RogueDhcpServer),
                Dhcp::No => {}
            }
        }
        if ip.saddr != guest_ip {
            return Err(DropReason::SpoofedIp);
        }
        Accepted {
            own_address: true,
            announce: false,
        }
    } else if eth.proto == ETH_P_RARP.to_be() {
        // The announcement carries no IPv4 address; its Ethernet source (checked above) is what
        // the network learns from.
        Accepted {
            own_address: false,
            announce: true,
        }
    } else {
        return Err(DropReason::UnsupportedProtocol);
    };
    let gateway = constant(&GUEST_GATEWAY_MAC);
    if gateway != 0 {
        core::hint::cold_path();
        to_the_gateway(ctx, gateway)?;
    }
    update_stats(|s| {
        s.rx_packets += 1;
        s.rx_bytes += ctx.len() as u64;
        mark_accepted(s, accepted);
    });
    // SAFETY: bpf_redirect takes plain integers and only records the target.
    Ok(unsafe { bpf_redirect(constant(&GUEST_POD_IFINDEX), 0) } as i32)
}

// The two steps of migration target mode read what they need of the frame again, with the
// helper: a copy read with the headers above would be kept alive (spilled to the stack) on the
// paths without the mode too. And their branches are marked cold, so the compiler lays the mode
// out of line: without it the branch is one never taken, which the verifier removes, rather than
// a jump over the mode's code, which it would have to keep.

/// Migration target mode: a unicast frame for another MAC than this node's gateway's
/// (`gateway`, as `mac_u64` holds it) is sent to the gateway. Group addresses (broadcast,
/// multicast) reach the gateway as they are.
#[inline(always)]
fn to_the_gateway(ctx: &TcContext, gateway: u64) -> Result<(), DropReason> {
    let dst: [u8; 6] = ctx.load(0).map_err(|_| DropReason::RewriteFailed)?;
    if dst[0] & 1 == 0 && mac_u64(&dst) != gateway {
        ctx.store(0, &mac_from_u64(gateway), 0)
            .map_err(|_| DropReason::RewriteFailed)?;
    }
    Ok(())
}

/// An ARP request (Ethernet, IPv4) from the guest's own address for another one: what the
/// migration target mode answers. An address probe (sender 0.0.0.0, RFC 5227) and a request
/// for the guest's own address (a gratuitous ARP, or a conflict check) are not questions for the
/// gateway, and pass as they would without the mode.
#[inline(always)]
fn asks_the_gateway(arp: &ArpIpv4, guest_ip: u32) -> bool {
    let spa = u32::from_ne_bytes(arp.spa);
    arp.op == ARP_OP_REQUEST.to_be()
        && arp.htype == ARP_HRD_ETHER.to_be()
        && arp.ptype == ETH_P_IP.to_be()
        && arp.hlen == 6
        && arp.plen == 4
        && spa != 0
        && spa == guest_ip
        && u32::from_ne_bytes(arp.tpa) != guest_ip
}

/// Answers the guest's ARP request (whose sender the caller checked: the guest's MAC, and its
/// address or 0.0.0.0), if it [`asks_the_gateway`], with the gateway's MAC (`gateway`, as
/// `mac_u64` holds it): the frame is rewritten in place into the reply and sent back out of the
/// tap, to the guest; the verdict. On a routed pod network every address the guest asks for is
/// reached through the gateway, so every such request gets the gateway's MAC, as Cilium's ARP
/// responder does. The reply counts as a frame sent to the guest; the request was not passed
/// on.
#[inline(always)]
fn answer_arp(ctx: &TcContext, guest_ip: u32, gateway: u64) -> Result<Option<i32>, DropReason> {
    let arp: ArpIpv4 = ctx.load(ETH_HLEN).map_err(|_| DropReason::RewriteFailed)?;
    if !asks_the_gateway(&arp, guest_ip) {
        return Ok(None);
    }
    let gateway = mac_from_u64(gateway);
    // The sender's MAC and address are the guest's (checked by the caller).
    let reply = ArpIpv4 {
        op: ARP_OP_REPLY.to_be(),
        sha: gateway,
        spa: arp.tpa,
        tha: arp.sha,
        tpa: arp.spa,
        ..arp
    };
    store_macs(ctx, &gateway, &arp.sha)?;
    ctx.store(ETH_HLEN, &reply, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    update_stats(|s| {
        s.tx_packets += 1;
        s.tx_bytes += ctx.len() as u64;
        mark_accepted(
            s,
            Accepted {
                own_address: true,
                announce: false,
            },
        );
    });
    // SAFETY: bpf_redirect takes plain integers and only records the target; flags 0 is the
    // tap's egress, towards the guest.
    Ok(Some(
        unsafe { bpf_redirect(constant(&GUEST_TAP_IFINDEX), 0) } as i32,
    ))
}

enum Dhcp {
    /// Client to server (68 -> 67): the daemon's to answer.
    Request,
    /// From a server port or to a client port: what only a DHCP server or relay sends.
    Reply,
    No,
}

#[inline(always)]
fn dhcp_direction(ctx: &TcContext, ip: &Ipv4Hdr) -> Dhcp {
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    match read::<[u16; 2]>(ctx, ETH_HLEN + ihl) {
        Some([sport, dport]) => {
            if sport == DHCP_CLIENT_PORT.to_be() && dport == DHCP_SERVER_PORT.to_be() {
                Dhcp::Request
            } else if sport == DHCP_SERVER_PORT.to_be() || dport == DHCP_CLIENT_PORT.to_be() {
                Dhcp::Reply
            } else {
                Dhcp::No
            }
        }
        None => Dhcp::No,
    }
}

/// This guest may queue one more DHCP message: GCRA on its slot's theoretical arrival time.
#[inline(always)]
fn dhcp_admitted() -> bool {
    let interval = constant(&GUEST_DHCP_INTERVAL_NS);
    if interval == 0 {
        return true;
    }
    let Some(tat) = DHCP_RATE.get_ptr_mut(constant(&GUEST_SLOT)) else {
        return true;
    };
    // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a successful lookup gives a valid, aligned pointer into the array's value, alive
    // while the program runs; a concurrent writer on another CPU can only make the limit admit
    // a little more (both read the same arrival time), never corrupt it (an aligned u64).
    let next = unsafe { *tat }.max(now);
    if next - now > constant(&GUEST_DHCP_TOLERANCE_NS) {
        return false;
    }
    // SAFETY: as above.
    unsafe { *tat = next + interval };
    true
}

/// Queues the whole frame for the daemon's DHCP server, which answers on the tap.
#[inline(always)]
fn dhcp_to_daemon(ctx: &TcContext) -> Result<(), DropReason> {
    let len = ctx.len().min(DHCP_FRAME_MAX as u32);
    if len < DHCP_FRAME_MIN {
        return Err(DropReason::UnsupportedProtocol);
    }
    if !dhcp_admitted() {
        return Err(DropReason::DhcpRateLimited);
    }
    let mut entry = DHCP
        .reserve::<DhcpFrame>(0)
        .ok_or(DropReason::DhcpQueueFull)?;
    let frame = entry.as_mut_ptr();
    // SAFETY: `frame` points at a reserved, aligned record of size_of::<DhcpFrame>() that only
    // this program run writes until it is submitted or discarded; `len` is between
    // DHCP_FRAME_MIN and DHCP_FRAME_MAX, so the helper writes within `data`.
    let ret = unsafe {
        (*frame).slot = constant(&GUEST_SLOT);
        (*frame).len = len;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            (*frame).data.as_mut_ptr() as *mut _,
            len,
        )
    };
    if ret != 0 {
        entry.discard(0);
        return Err(DropReason::DhcpQueueFull);
    }
    entry.submit(0);
    update_stats(|s| {
        s.dhcp += 1;
        mark_accepted(
            s,
            Accepted {
                own_address: false,
                announce: false,
            },
        );
    });
    Ok(())
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
