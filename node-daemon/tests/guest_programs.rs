//! In-kernel tests of the guest programs (ebpf/src/bin/guest.rs) with BPF_PROG_TEST_RUN: the
//! object is loaded as the daemon loads it per guest (node-daemon/src/guest.rs: the guest's slot,
//! interfaces, MAC and IP as load-time constants, maps pinned in a directory of their own), the
//! real (verified) programs run on crafted frames, and the test checks the verdict, the bytes,
//! the guest's counters and the DHCP queue.
//!
//! What BPF_PROG_TEST_RUN cannot show: where a redirect goes. `bpf_redirect` only records its
//! target, and the test run reports the verdict (TC_ACT_REDIRECT) without carrying the redirect
//! out. `redirects_reach_the_tap_and_the_pod_interface` attaches the programs to real interfaces
//! in a throwaway namespace to see that, and what happens to a frame for the guest before the VM
//! opens its tap.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, tc},
};
use dhcproto::{
    Encodable, Encoder,
    v4::{DhcpOption, Message, MessageType},
};
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, PacketBuilder, VlanId,
};
use tapestry_common::{
    DHCP_FRAME_MAX, DHCP_RING_BYTES, DhcpFrame, DhcpLimit, DropReason, GUEST_DROP_REASONS,
    GuestStats, guest_globals, map_names, program_names,
};
use tapestry_node_daemon::datapath::{guest, ifindex_of, monotonic_ns};

/// Runs `f` in the network namespace at `path` (on a thread of its own).
fn in_netns<T: Send>(path: &std::path::Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    tapestry_netns::run_in(path, f)?
}

mod common;
use common::{PinDir, Rng, prerequisites};

/// tc verdicts.
const DROP: i32 = 2;
const REDIRECT: i32 = 7;

const SLOT: u32 = 42;
const GUEST_MAC: [u8; 6] = [0x02, 0x54, 0, 0, 0, 0x2a];
const GUEST_IP: [u8; 4] = [10, 0, 0, 42];
/// The pod network's side: the gateway the guest talks to, and a peer.
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const PEER_IP: [u8; 4] = [10, 0, 0, 1];
const OTHER_MAC: [u8; 6] = [0x02, 0x66, 0, 0, 0, 0x01];
const OTHER_IP: [u8; 4] = [10, 0, 0, 66];
/// This node's gateway for a guest that migrated in (whose neighbour cache still holds GW_MAC,
/// the previous node's).
const NEW_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0xfe];
/// The tap's own MAC, where the daemon's readiness probes come from.
const TAP_MAC: [u8; 6] = [0x02, 0x7a, 0x70, 0, 0, 0x2a];
/// Interface indexes written into the programs where no real interface is needed (the test run
/// does not act on a redirect).
const TAP_IFINDEX: u32 = 1001;
const POD_IFINDEX: u32 = 1002;

struct Identity {
    slot: u32,
    mac: [u8; 6],
    ip: [u8; 4],
    tap_ifindex: u32,
    pod_ifindex: u32,
    dhcp_limit: DhcpLimit,
    /// 0: frames are not checked for size.
    mtu: u32,
    /// Migration target mode (`GuestWiring::gateway_mac`).
    gateway_mac: Option<[u8; 6]>,
    tap_mac: [u8; 6],
}

/// No DHCP rate limit: the tests of other behaviour send more DHCP than a guest may.
const UNLIMITED: DhcpLimit = DhcpLimit {
    rate_per_sec: 0,
    burst: 0,
};

const GUEST: Identity = Identity {
    slot: SLOT,
    mac: GUEST_MAC,
    ip: GUEST_IP,
    tap_ifindex: TAP_IFINDEX,
    pod_ifindex: POD_IFINDEX,
    dhcp_limit: UNLIMITED,
    mtu: 0,
    gateway_mac: None,
    tap_mac: TAP_MAC,
};

/// The same guest after it migrated in: migration target mode with this node's gateway.
const MIGRATED: Identity = Identity {
    gateway_mac: Some(NEW_GW_MAC),
    ..GUEST
};

/// One guest's programs, loaded and verified, with the maps they write.
struct Guest {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, GuestStats>,
    drops: PerCpuArray<MapData, u64>,
    dhcp: RingBuf<MapData>,
}

impl Guest {
    /// Loads the guest object for `id`, pinning its maps under `pins` (shared by every guest
    /// loaded there, as on a node), and loads both programs into the kernel.
    fn load(pins: &Path, id: &Identity) -> Guest {
        assert!(
            !guest::OBJECT.is_empty(),
            "built with AYA_BUILD_SKIP=1: there is no eBPF object to test"
        );
        let mac = tapestry_common::mac_u64(&id.mac);
        let ip = u32::from_ne_bytes(id.ip);
        let (interval, tolerance) = id.dhcp_limit.program_constants();
        let gateway_mac = id.gateway_mac.as_ref().map_or(0, tapestry_common::mac_u64);
        let tap_mac = tapestry_common::mac_u64(&id.tap_mac);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins)
            .override_global(guest_globals::SLOT, &id.slot, true)
            .override_global(guest_globals::TAP_IFINDEX, &id.tap_ifindex, true)
            .override_global(guest_globals::POD_IFINDEX, &id.pod_ifindex, true)
            .override_global(guest_globals::MAC, &mac, true)
            .override_global(guest_globals::IP, &ip, true)
            .override_global(guest_globals::DHCP_INTERVAL_NS, &interval, true)
            .override_global(guest_globals::DHCP_TOLERANCE_NS, &tolerance, true)
            .override_global(guest_globals::MTU, &id.mtu, true)
            .override_global(guest_globals::GATEWAY_MAC, &gateway_mac, true)
            .override_global(guest_globals::TAP_MAC, &tap_mac, true)
            .load(guest::OBJECT)
            .expect("the guest object loads");
        for name in [program_names::POD_TO_GUEST, program_names::GUEST_TO_POD] {
            let prog: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load()
                .unwrap_or_else(|e| panic!("the kernel rejected {name}: {e:?}"));
        }
        let stats = take(&mut ebpf, map_names::GUEST_STATS);
        let drops = take(&mut ebpf, map_names::DROPS);
        let dhcp = take(&mut ebpf, map_names::DHCP);
        Guest {
            ebpf,
            stats,
            drops,
            dhcp,
        }
    }

    fn program(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf.program_mut(name).unwrap().try_into().unwrap()
    }

    /// Runs program `name` on `frame`: its verdict and the frame as it left.
    fn run(&mut self, name: &str, frame: &[u8]) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .program(name)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("test run of {name}: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value as i32, out)
    }

    /// What the pod network sends to the guest.
    fn pod_to_guest(&mut self, frame: &[u8]) -> (i32, Vec<u8>) {
        self.run(program_names::POD_TO_GUEST, frame)
    }

    /// What the guest sends.
    fn guest_to_pod(&mut self, frame: &[u8]) -> (i32, Vec<u8>) {
        self.run(program_names::GUEST_TO_POD, frame)
    }

    /// The counters of `slot`, summed over CPUs as the daemon sums them.
    fn stats(&self, slot: u32) -> GuestStats {
        let mut total = GuestStats::default();
        for s in self.stats.get(&slot, 0).unwrap().iter() {
            total.add(s);
        }
        total
    }

    /// The node-wide drops map, by reason.
    fn node_drops(&self) -> Vec<u64> {
        DropReason::ALL
            .iter()
            .map(|r| self.drops.get(&(*r as u32), 0).unwrap().iter().sum())
            .collect()
    }

    /// Takes every queued DHCP record: (slot, frame bytes).
    fn dhcp_queue(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut records = Vec::new();
        while let Some(item) = self.dhcp.next() {
            assert_eq!(item.len(), size_of::<DhcpFrame>(), "a whole DhcpFrame");
            let slot = u32::from_ne_bytes(item[0..4].try_into().unwrap());
            let len = u32::from_ne_bytes(item[4..8].try_into().unwrap()) as usize;
            assert!(len <= DHCP_FRAME_MAX);
            records.push((slot, item[8..8 + len].to_vec()));
        }
        records
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> T
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::fmt::Debug,
{
    let map = ebpf
        .take_map(name)
        .unwrap_or_else(|| panic!("{name} missing"));
    T::try_from(map).unwrap()
}

fn udp(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac, GW_MAC)
        .ipv4(src, dst, 64)
        .udp(40000, 53)
        .write(&mut v, payload)
        .unwrap();
    v
}

/// An ARP request from `eth_src` whose sender fields are `sha`/`spa`, for the peer.
fn arp(eth_src: [u8; 6], sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
    arp_request(eth_src, [0xff; 6], sha, spa, PEER_IP)
}

/// An ARP request from `eth_src` to `eth_dst` whose sender fields are `sha`/`spa`, for `tpa`.
fn arp_request(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    sha: [u8; 6],
    spa: [u8; 4],
    tpa: [u8; 4],
) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &sha,
        &spa,
        &[0; 6],
        &tpa,
    )
    .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(eth_src, eth_dst)
        .arp(arp)
        .write(&mut v)
        .unwrap();
    v
}

/// The guest's ARP reply (its MAC and address) to `eth_dst`, whose request came from
/// `tha`/`tpa`.
fn arp_reply(eth_dst: [u8; 6], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REPLY,
        &GUEST_MAC,
        &GUEST_IP,
        &tha,
        &tpa,
    )
    .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, eth_dst)
        .arp(arp)
        .write(&mut v)
        .unwrap();
    v
}

/// `frame` with its Ethernet destination replaced by `dst`.
fn to_mac(frame: &[u8], dst: [u8; 6]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&dst);
    f
}

/// The gateway's answer to the guest's ARP request for `asked`, as the guest must receive it
/// (independently built: etherparse, not the program's offsets).
fn gateway_answer(gateway: [u8; 6], asked: [u8; 4]) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REPLY,
        &gateway,
        &asked,
        &GUEST_MAC,
        &GUEST_IP,
    )
    .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(gateway, GUEST_MAC)
        .arp(arp)
        .write(&mut v)
        .unwrap();
    v
}

/// QEMU's self-announcement after a live migration (`announce_self_create`, net/announce.c):
/// RARP "request reverse" (op 3) broadcast from `eth_src`, sender and target hardware address
/// the guest's MAC, no IPv4 addresses, padded to 60 bytes.
fn rarp(eth_src: [u8; 6]) -> Vec<u8> {
    let rarp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation(3),
        &GUEST_MAC,
        &[0; 4],
        &GUEST_MAC,
        &[0; 4],
    )
    .unwrap();
    let eth = Ethernet2Header {
        source: eth_src,
        destination: [0xff; 6],
        ether_type: EtherType(0x8035),
    };
    let mut v = eth.to_bytes().to_vec();
    v.extend_from_slice(&rarp.to_bytes());
    v.resize(60, 0);
    v
}

fn ipv6(src_mac: [u8; 6]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac, GW_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(40000, 53)
        .write(&mut v, b"v6")
        .unwrap();
    v
}

fn dhcp(src_mac: [u8; 6], kind: MessageType, src: [u8; 4], dst: [u8; 4], pad: usize) -> Vec<u8> {
    dhcp_message(src_mac, kind, src, dst, pad, (68, 67))
}

/// A DHCP message between UDP ports `(sport, dport)`.
fn dhcp_ports(
    src_mac: [u8; 6],
    kind: MessageType,
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
) -> Vec<u8> {
    dhcp_message(src_mac, kind, src, dst, 0, ports)
}

fn dhcp_message(
    src_mac: [u8; 6],
    kind: MessageType,
    src: [u8; 4],
    dst: [u8; 4],
    pad: usize,
    (sport, dport): (u16, u16),
) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0x5a5a,
        Ipv4Addr::from(src),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &src_mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    let mut bytes = Vec::new();
    m.encode(&mut Encoder::new(&mut bytes)).unwrap();
    // Padding after the end option, as some clients send (and to make a frame longer than the
    // queue's records).
    bytes.resize(bytes.len() + pad, 0);
    let mut v = Vec::new();
    let dst_mac = if dst == [255; 4] { [0xff; 6] } else { GW_MAC };
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, &bytes)
        .unwrap();
    v
}

fn discover() -> Vec<u8> {
    dhcp(GUEST_MAC, MessageType::Discover, [0; 4], [255; 4], 0)
}

fn loaded() -> Option<(PinDir, Guest)> {
    if !prerequisites() {
        return None;
    }
    let pins = PinDir::new("guest");
    let guest = Guest::load(pins.path(), &GUEST);
    Some((pins, guest))
}

/// The counters after `before` with drop `reason` counted once more.
fn plus_drop(before: &GuestStats, reason: DropReason) -> GuestStats {
    let mut expected = *before;
    expected.drops[reason as usize] += 1;
    expected
}

#[test]
fn pod_to_guest_redirects_every_frame_into_the_tap_and_counts_it() {
    let Some((_pins, mut g)) = loaded() else {
        return;
    };
    // Whatever the pod network sends the pod goes to the guest, who owns the pod's addresses:
    // the program does not look at the frame.
    let frames = [
        udp(GW_MAC, PEER_IP, GUEST_IP, b"to the guest"),
        arp(GW_MAC, GW_MAC, PEER_IP),
        ipv6(GW_MAC),
        udp(
            OTHER_MAC,
            OTHER_IP,
            [10, 0, 0, 99],
            b"not even for the guest",
        ),
    ];
    for frame in &frames {
        let (v, out) = g.pod_to_guest(frame);
        assert_eq!(v, REDIRECT);
        assert_eq!(&out, frame, "redirected unchanged");
    }
    let expected = GuestStats {
        tx_packets: frames.len() as u64,
        tx_bytes: frames.iter().map(|f| f.len() as u64).sum(),
        ..GuestStats::default()
    };
    assert_eq!(g.stats(SLOT), expected);
    // The slot is the loader's constant, not the object's default.
    assert_eq!(g.stats(0), GuestStats::default());
    assert!(g.node_drops().iter().all(|d| *d == 0));
}

#[test]
fn guest_to_pod_redirects_the_guests_own_frames() {
    let Some((_pins, mut g)) = loaded() else {
        return;
    };
    // An ARP probe (RFC 5227: sender IP 0.0.0.0) before the guest has its address passes, but
    // is no sign of readiness.
    let probe = arp(GUEST_MAC, GUEST_MAC, [0; 4]);
    let (v, out) = g.guest_to_pod(&probe);
    assert_eq!((v, &out), (REDIRECT, &probe));
    let after_probe = g.stats(SLOT);
    assert_eq!(after_probe.seen_ns, 0, "a probe is not readiness");
    assert!(after_probe.live_ns > 0, "but the guest is live on this tap");

    let own = [
        udp(GUEST_MAC, GUEST_IP, PEER_IP, b"from the guest"),
        arp(GUEST_MAC, GUEST_MAC, GUEST_IP),
    ];
    for frame in &own {
        let (v, out) = g.guest_to_pod(frame);
        assert_eq!(v, REDIRECT);
        assert_eq!(&out, frame, "redirected unchanged");
    }
    let s = g.stats(SLOT);
    assert!(s.seen_ns > 0, "the guest used its own address");
    assert_eq!(s.live_ns, after_probe.live_ns, "live since the first frame");
    let expected = GuestStats {
        rx_packets: 1 + own.len() as u64,
        rx_bytes: (probe.len() + own.iter().map(Vec::len).sum::<usize>()) as u64,
        seen_ns: s.seen_ns,
        live_ns: s.live_ns,
        ..GuestStats::default()
    };
    assert_eq!(s, expected);
    assert!(g.node_drops().iter().all(|d| *d == 0));
}

/// After a live migration's switch-over QEMU announces the guest from its MAC with RARP: the
/// frame is forwarded unchanged (so the pod network learns where the guest is), counted as an
/// announcement, and marks the guest live on this tap from the first one on, but not ready: a
/// RARP carries no address of the guest's.
#[test]
fn the_guests_rarp_announcement_passes_and_marks_it_live() {
    let Some((_pins, mut g)) = loaded() else {
        return;
    };
    let announce = rarp(GUEST_MAC);
    let before = monotonic_ns();
    let (v, out) = g.guest_to_pod(&announce);
    let after = monotonic_ns();
    assert_eq!((v, &out), (REDIRECT, &announce), "forwarded unchanged");
    let s = g.stats(SLOT);
    assert!(
        (before..=after).contains(&s.live_ns),
        "live_ns {} not within the run ({before}..={after})",
        s.live_ns
    );
    let expected = GuestStats {
        rx_packets: 1,
        rx_bytes: announce.len() as u64,
        announces: 1,
        live_ns: s.live_ns,
        ..GuestStats::default()
    };
    assert_eq!(s, expected, "no seen_ns: a RARP carries no address");

    // QEMU announces several times (5 by default); live_ns stays the first, and the guest's
    // first IPv4 frame makes it ready without moving it.
    for _ in 0..4 {
        assert_eq!(g.guest_to_pod(&announce).0, REDIRECT);
    }
    assert_eq!(
        g.guest_to_pod(&udp(GUEST_MAC, GUEST_IP, PEER_IP, b"here"))
            .0,
        REDIRECT
    );
    let s2 = g.stats(SLOT);
    assert_eq!((s2.announces, s2.rx_packets), (5, 6));
    assert_eq!(s2.live_ns, s.live_ns, "written once");
    assert!(s2.seen_ns >= s.live_ns, "ready from the IPv4 frame");
    assert!(g.node_drops().iter().all(|d| *d == 0));
}

/// The guest's reply to the daemon's readiness probe (an ARP probe from the tap's MAC, answered
/// as Linux answers one: to that MAC, target address 0.0.0.0) is counted for the daemon and
/// consumed: not passed on, not a drop. Its other ARP replies pass as before, a reply to the
/// tap's MAC from another address is still a spoof, and in migration target mode the probe's
/// reply is consumed the same, neither answered nor rewritten.
#[test]
fn the_guests_reply_to_the_readiness_probe_is_counted_and_consumed() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("guest-probe-reply");
    let mut g = Guest::load(pins.path(), &GUEST);
    let mut migrated = Guest::load(
        pins.path(),
        &Identity {
            slot: 7,
            ..MIGRATED
        },
    );
    let reply = arp_reply(TAP_MAC, TAP_MAC, [0; 4]);
    for (g, slot) in [(&mut g, SLOT), (&mut migrated, 7)] {
        for n in 1..=2 {
            assert_eq!(g.guest_to_pod(&reply).0, DROP, "slot {slot}");
            let s = g.stats(slot);
            assert!(
                s.seen_ns > 0 && s.live_ns > 0,
                "the guest answered from its address"
            );
            let expected = GuestStats {
                probe_replies: n,
                seen_ns: s.seen_ns,
                live_ns: s.live_ns,
                ..GuestStats::default()
            };
            assert_eq!(
                s, expected,
                "counted as a probe reply, nothing else (slot {slot})"
            );
        }
    }
    assert!(g.node_drops().iter().all(|d| *d == 0), "no drop counted");

    // Not the probe's: the guest's reply to a neighbour passes unchanged.
    let to_a_neighbour = arp_reply(GW_MAC, GW_MAC, PEER_IP);
    let (v, out) = g.guest_to_pod(&to_a_neighbour);
    assert_eq!((v, &out), (REDIRECT, &to_a_neighbour));
    // A reply to the tap's MAC claiming another address is a spoof, and no probe reply.
    let mut spoofed = reply.clone();
    spoofed[28..32].copy_from_slice(&OTHER_IP);
    assert_eq!(g.guest_to_pod(&spoofed).0, DROP);
    let s = g.stats(SLOT);
    assert_eq!((s.probe_replies, s.rx_packets), (2, 1));
    assert_eq!(s.drops[DropReason::SpoofedArp as usize], 1);
}

/// Each drop verdict of guest_to_pod, with its counter in the guest's slot and in the node-wide
/// drops map. One branch is not here: an IPv4 frame too short for an IPv4 header (SpoofedIp),
/// which BPF_PROG_TEST_RUN refuses (EINVAL) before the program runs;
/// `redirects_reach_the_tap_and_the_pod_interface` sends one through a real tap.
#[test]
fn every_spoofing_attempt_is_dropped_and_counted_by_reason() {
    let Some((_pins, mut g)) = loaded() else {
        return;
    };
    let mut cut_arp = arp(GUEST_MAC, GUEST_MAC, GUEST_IP);
    cut_arp.truncate(14 + 27);
    // DHCP ports, but the frame ends inside the UDP header.
    let mut cut_dhcp = discover();
    cut_dhcp.truncate(14 + 20 + 4);
    let mut vlan = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .single_vlan(VlanId::try_new(10).unwrap())
        .ipv4(GUEST_IP, PEER_IP, 64)
        .udp(40000, 53)
        .write(&mut vlan, b"tagged")
        .unwrap();
    let mut qinq = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .double_vlan(VlanId::try_new(100).unwrap(), VlanId::try_new(10).unwrap())
        .ipv4(GUEST_IP, PEER_IP, 64)
        .udp(40000, 53)
        .write(&mut qinq, b"tagged twice")
        .unwrap();
    let offer = dhcp_ports(GUEST_MAC, MessageType::Offer, GUEST_IP, [255; 4], (67, 68));
    let server_to_relay = dhcp_ports(GUEST_MAC, MessageType::Ack, GUEST_IP, PEER_IP, (67, 67));
    let to_a_client = dhcp_ports(GUEST_MAC, MessageType::Ack, GUEST_IP, PEER_IP, (40000, 68));
    let cases = [
        (
            "IPv4 from another MAC",
            udp(OTHER_MAC, GUEST_IP, PEER_IP, b"x"),
            DropReason::SpoofedMac,
        ),
        (
            "ARP from another MAC",
            arp(OTHER_MAC, GUEST_MAC, GUEST_IP),
            DropReason::SpoofedMac,
        ),
        (
            "DHCP from another MAC",
            dhcp(OTHER_MAC, MessageType::Discover, [0; 4], [255; 4], 0),
            DropReason::SpoofedMac,
        ),
        (
            "IPv6 from another MAC",
            ipv6(OTHER_MAC),
            DropReason::SpoofedMac,
        ),
        (
            "RARP announcement from another MAC",
            rarp(OTHER_MAC),
            DropReason::SpoofedMac,
        ),
        (
            "IPv4 from another address",
            udp(GUEST_MAC, OTHER_IP, PEER_IP, b"x"),
            DropReason::SpoofedIp,
        ),
        (
            "IPv4 from 0.0.0.0 that is not DHCP",
            udp(GUEST_MAC, [0; 4], PEER_IP, b"x"),
            DropReason::SpoofedIp,
        ),
        (
            "ARP claiming another sender MAC",
            arp(GUEST_MAC, OTHER_MAC, GUEST_IP),
            DropReason::SpoofedArp,
        ),
        (
            "ARP claiming another sender IP",
            arp(GUEST_MAC, GUEST_MAC, OTHER_IP),
            DropReason::SpoofedArp,
        ),
        ("ARP cut short", cut_arp, DropReason::SpoofedArp),
        ("IPv6", ipv6(GUEST_MAC), DropReason::UnsupportedProtocol),
        ("VLAN-tagged IPv4", vlan, DropReason::VlanTagged),
        ("802.1ad-tagged IPv4", qinq, DropReason::VlanTagged),
        (
            "a DHCPOFFER from the guest",
            offer,
            DropReason::RogueDhcpServer,
        ),
        (
            "a DHCP reply to a relay",
            server_to_relay,
            DropReason::RogueDhcpServer,
        ),
        (
            "anything to a DHCP client port",
            to_a_client,
            DropReason::RogueDhcpServer,
        ),
        ("DHCP cut short", cut_dhcp, DropReason::UnsupportedProtocol),
    ];
    // Each has its own test below, but RewriteFailed: bpf_skb_store_bytes refusing to write a
    // header the program has just read (migration target mode) is not something a frame can
    // provoke.
    let mut covered = BTreeSet::from([
        DropReason::RewriteFailed as u32,
        DropReason::DhcpQueueFull as u32,
        DropReason::DhcpRateLimited as u32,
        DropReason::Oversized as u32,
    ]);
    for (what, frame, reason) in &cases {
        let before = g.stats(SLOT);
        let node_before = g.node_drops();
        let (v, _) = g.guest_to_pod(frame);
        assert_eq!(v, DROP, "{what}");
        assert_eq!(g.stats(SLOT), plus_drop(&before, *reason), "{what}");
        let mut node_expected = node_before;
        node_expected[*reason as usize] += 1;
        assert_eq!(g.node_drops(), node_expected, "{what}: node-wide drops");
        covered.insert(*reason as u32);
    }
    assert_eq!(
        covered,
        GUEST_DROP_REASONS.iter().map(|r| *r as u32).collect(),
        "a case for every reason"
    );
    // Nothing was forwarded, nothing queued for the daemon, and no drop marked readiness or
    // liveness.
    let s = g.stats(SLOT);
    assert_eq!(
        (s.rx_packets, s.dhcp, s.seen_ns, s.live_ns, s.announces),
        (0, 0, 0, 0, 0)
    );
    assert!(g.dhcp_queue().is_empty());
    assert_eq!(g.stats(0), GuestStats::default());
}

#[test]
fn dhcp_from_the_guest_goes_to_the_daemon_not_the_network() {
    let Some((_pins, mut g)) = loaded() else {
        return;
    };
    // DHCPDISCOVER, 0.0.0.0:68 -> 255.255.255.255:67.
    let d = discover();
    let (v, _) = g.guest_to_pod(&d);
    assert_eq!(v, DROP, "consumed here: the daemon answers on the tap");
    assert_eq!(g.dhcp_queue(), [(SLOT, d.clone())]);
    let s = g.stats(SLOT);
    assert!(s.live_ns > 0, "the guest's DHCP shows it live on this tap");
    let expected = GuestStats {
        dhcp: 1,
        live_ns: s.live_ns,
        ..GuestStats::default()
    };
    assert_eq!(
        s, expected,
        "counted as DHCP, not as a drop, and not as readiness"
    );
    assert!(g.node_drops().iter().all(|d| *d == 0));

    // A renewal is unicast from the guest's address to the server: also the daemon's.
    let renew = dhcp(GUEST_MAC, MessageType::Request, GUEST_IP, PEER_IP, 0);
    let (v, _) = g.guest_to_pod(&renew);
    assert_eq!(v, DROP);
    assert_eq!(g.dhcp_queue(), [(SLOT, renew)]);

    // A frame longer than a record is queued cut to DHCP_FRAME_MAX bytes.
    let long = dhcp(GUEST_MAC, MessageType::Discover, [0; 4], [255; 4], 1200);
    assert!(long.len() > DHCP_FRAME_MAX);
    let (v, _) = g.guest_to_pod(&long);
    assert_eq!(v, DROP);
    assert_eq!(g.dhcp_queue(), [(SLOT, long[..DHCP_FRAME_MAX].to_vec())]);

    let s = g.stats(SLOT);
    assert_eq!((s.dhcp, s.rx_packets, s.drops), (3, 0, [0; 16]));
}

#[test]
fn a_full_dhcp_queue_drops_and_counts_until_the_daemon_reads() {
    let Some((_pins, mut g)) = loaded() else {
        return;
    };
    // Each record is the ring's 8-byte header and a DhcpFrame, rounded up to 8 bytes.
    let record = (8 + size_of::<DhcpFrame>()).next_multiple_of(8);
    let capacity = DHCP_RING_BYTES as usize / record;
    let d = discover();
    for _ in 0..capacity {
        assert_eq!(g.guest_to_pod(&d).0, DROP);
    }
    assert_eq!(g.stats(SLOT).dhcp, capacity as u64, "all queued");
    let before = g.stats(SLOT);
    assert_eq!(g.guest_to_pod(&d).0, DROP);
    assert_eq!(g.stats(SLOT), plus_drop(&before, DropReason::DhcpQueueFull));
    assert_eq!(g.node_drops()[DropReason::DhcpQueueFull as usize], 1);

    // Once the daemon has read the queue, DHCP flows again.
    assert_eq!(g.dhcp_queue().len(), capacity);
    assert_eq!(g.guest_to_pod(&d).0, DROP);
    assert_eq!(g.stats(SLOT).dhcp, capacity as u64 + 1);
    assert_eq!(g.dhcp_queue(), [(SLOT, d)]);
}

/// A frame longer than the guest's MTU allows is dropped as oversized (a GSO super-frame from a
/// tap with offloads would be let through: test_run frames are never GSO); one of exactly the
/// MTU passes.
#[test]
fn frames_over_the_guests_mtu_are_dropped() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("guest-mtu");
    let mut g = Guest::load(pins.path(), &Identity { mtu: 1400, ..GUEST });
    let fits = udp(GUEST_MAC, GUEST_IP, PEER_IP, &[7; 1400 - 28]);
    assert_eq!(fits.len(), 14 + 1400);
    assert_eq!(g.guest_to_pod(&fits).0, REDIRECT);
    let mut long = fits.clone();
    long.push(0);
    let before = g.stats(SLOT);
    assert_eq!(g.guest_to_pod(&long).0, DROP);
    assert_eq!(g.stats(SLOT), plus_drop(&before, DropReason::Oversized));
}

/// One guest's DHCP flood is cut at its own limit in the kernel, before the node's shared
/// queue: its messages over the limit are dropped and counted, another guest's DISCOVER is
/// still queued, and the flooding guest gets its share back as time passes.
#[test]
fn dhcp_over_a_guests_rate_is_dropped_before_the_shared_queue() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("dhcp-rate");
    // 10 per second (one every 100 ms), bursts of 3.
    let limit = DhcpLimit {
        rate_per_sec: 10,
        burst: 3,
    };
    let mut flood = Guest::load(
        pins.path(),
        &Identity {
            dhcp_limit: limit,
            ..GUEST
        },
    );
    let other_id = Identity {
        slot: 7,
        mac: OTHER_MAC,
        ip: OTHER_IP,
        dhcp_limit: limit,
        ..GUEST
    };
    let mut other = Guest::load(pins.path(), &other_id);
    let release = dhcp(GUEST_MAC, MessageType::Release, GUEST_IP, PEER_IP, 0);
    for i in 0..3 {
        assert_eq!(flood.guest_to_pod(&release).0, DROP, "release {i}");
    }
    assert_eq!(flood.stats(SLOT).dhcp, 3, "the burst is queued");
    for _ in 0..50 {
        assert_eq!(flood.guest_to_pod(&release).0, DROP);
    }
    let s = flood.stats(SLOT);
    assert_eq!(s.dhcp, 3, "nothing over the burst is queued");
    assert_eq!(s.drops[DropReason::DhcpRateLimited as usize], 50);
    assert_eq!(
        flood.node_drops()[DropReason::DhcpRateLimited as usize],
        50,
        "node-wide"
    );

    // The other guest's DISCOVER is not affected by the flood.
    let other_discover = dhcp(OTHER_MAC, MessageType::Discover, [0; 4], [255; 4], 0);
    assert_eq!(other.guest_to_pod(&other_discover).0, DROP);
    assert_eq!(other.stats(7).dhcp, 1);
    let queued = flood.dhcp_queue();
    assert_eq!(queued.len(), 4, "the burst and the other guest's DISCOVER");
    assert_eq!(queued[3], (7, other_discover));

    // 150 ms later the flooding guest has earned one more message (one per 100 ms), not two.
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(flood.guest_to_pod(&release).0, DROP);
    assert_eq!(flood.guest_to_pod(&release).0, DROP);
    let s = flood.stats(SLOT);
    assert_eq!(s.dhcp, 4);
    assert_eq!(s.drops[DropReason::DhcpRateLimited as usize], 51);
}

#[test]
fn each_guest_is_checked_against_its_own_addresses_in_the_shared_maps() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("guests");
    let mut a = Guest::load(pins.path(), &GUEST);
    let b_id = Identity {
        slot: 7,
        mac: OTHER_MAC,
        ip: OTHER_IP,
        ..GUEST
    };
    let mut b = Guest::load(pins.path(), &b_id);
    let from_a = udp(GUEST_MAC, GUEST_IP, PEER_IP, b"a");
    // A's frame on B's tap is a spoof, counted in B's slot; on A's own tap it passes.
    assert_eq!(b.guest_to_pod(&from_a).0, DROP);
    assert_eq!(a.guest_to_pod(&from_a).0, REDIRECT);
    // Both guests count into the one pinned map, each in its slot; drops are node-wide.
    for g in [&a, &b] {
        assert_eq!(g.stats(SLOT).rx_packets, 1);
        assert_eq!(g.stats(SLOT).drops, [0; 16]);
        assert_eq!(g.stats(7).rx_packets, 0);
        assert_eq!(g.stats(7).drops[DropReason::SpoofedMac as usize], 1);
        assert_eq!(g.node_drops()[DropReason::SpoofedMac as usize], 1);
    }
}

/// Migration target mode: the guest's ARP request for another address is answered by the
/// program with this node's gateway, every field of the reply as the guest must see it, the
/// request rewritten in place (its length kept) and sent towards the tap (where it goes is
/// `migration_target_mode_on_real_interfaces`'s to show). Broadcast (a new neighbour) and unicast
/// to the previous node's gateway (the guest re-checking a stale entry) alike.
#[test]
fn in_migration_target_mode_the_gateway_answers_the_guests_arp_requests() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("guest-gateway-arp");
    let mut g = Guest::load(pins.path(), &MIGRATED);
    let mut answered = 0u64;
    let mut answered_bytes = 0u64;
    for (dst, asked) in [
        ([0xff; 6], PEER_IP),
        (GW_MAC, PEER_IP),
        ([0xff; 6], OTHER_IP),
    ] {
        let request = arp_request(GUEST_MAC, dst, GUEST_MAC, GUEST_IP, asked);
        let (v, out) = g.guest_to_pod(&request);
        assert_eq!(v, REDIRECT, "to {dst:02x?} for {asked:?}");
        assert_eq!(out.len(), request.len(), "rewritten in place");
        let eth = Ethernet2Header::from_slice(&out).unwrap().0;
        assert_eq!(eth.destination, GUEST_MAC, "to the guest");
        assert_eq!(eth.source, NEW_GW_MAC, "from this node's gateway");
        assert_eq!(eth.ether_type, EtherType::ARP);
        let reply = ArpPacket::from_slice(&out[14..]).unwrap();
        assert_eq!(reply.hw_addr_type, ArpHardwareId::ETHERNET);
        assert_eq!(reply.proto_addr_type, EtherType::IPV4);
        let reply = reply
            .try_eth_ipv4()
            .expect("Ethernet and IPv4 address sizes");
        assert_eq!(reply.operation, ArpOperation::REPLY);
        assert_eq!(reply.sender_mac, NEW_GW_MAC, "sha: the gateway's MAC");
        assert_eq!(reply.sender_ipv4, asked, "spa: the address asked for");
        assert_eq!(reply.target_mac, GUEST_MAC, "tha: the guest's MAC");
        assert_eq!(reply.target_ipv4, GUEST_IP, "tpa: the guest's address");
        assert_eq!(out, gateway_answer(NEW_GW_MAC, asked));
        answered += 1;
        answered_bytes += request.len() as u64;
    }
    let s = g.stats(SLOT);
    assert!(
        s.seen_ns > 0 && s.live_ns > 0,
        "the guest asked from its own address"
    );
    let expected = GuestStats {
        tx_packets: answered,
        tx_bytes: answered_bytes,
        seen_ns: s.seen_ns,
        live_ns: s.live_ns,
        ..GuestStats::default()
    };
    assert_eq!(
        s, expected,
        "answers count as sent to the guest; nothing passed on"
    );

    // Not questions for the gateway: an address probe (RFC 5227, sender 0.0.0.0), a request for
    // the guest's own address (a gratuitous ARP), a request whose hardware type is not
    // Ethernet. They pass to the pod network as without the mode.
    let mut not_ethernet = arp(GUEST_MAC, GUEST_MAC, GUEST_IP);
    not_ethernet[15] = 6; // IEEE 802
    for (what, frame) in [
        ("an address probe", arp(GUEST_MAC, GUEST_MAC, [0; 4])),
        (
            "a request for its own address",
            arp_request(GUEST_MAC, [0xff; 6], GUEST_MAC, GUEST_IP, GUEST_IP),
        ),
        ("a request that is not Ethernet's", not_ethernet),
    ] {
        let (v, out) = g.guest_to_pod(&frame);
        assert_eq!((v, &out), (REDIRECT, &frame), "{what}: passed on unchanged");
    }
    let s = g.stats(SLOT);
    assert_eq!((s.rx_packets, s.tx_packets), (3, answered));
    assert!(g.node_drops().iter().all(|d| *d == 0));
}

/// Migration target mode: every other unicast frame the guest sends leaves with this node's
/// gateway as its destination, whatever the guest addressed; broadcast and multicast frames,
/// and frames already for the gateway, leave as they came. Without the mode the same frames all
/// leave unchanged, and the guest's ARP request goes to the network unanswered.
#[test]
fn in_migration_target_mode_unicast_frames_go_to_this_nodes_gateway() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("guest-gateway-dst");
    let mut migrated = Guest::load(pins.path(), &MIGRATED);
    let mut off = Guest::load(pins.path(), &Identity { slot: 7, ..GUEST });
    let mut multicast = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, [0x01, 0, 0x5e, 0, 0, 0xfb])
        .ipv4(GUEST_IP, [224, 0, 0, 251], 1)
        .udp(5353, 5353)
        .write(&mut multicast, b"mdns")
        .unwrap();
    let to_old_gateway = udp(GUEST_MAC, GUEST_IP, PEER_IP, b"to the old gateway");
    assert_eq!(to_old_gateway[..6], GW_MAC);
    let cases = [
        ("IPv4 to the old gateway", to_old_gateway.clone(), true),
        (
            "IPv4 to another unicast MAC",
            to_mac(&to_old_gateway, OTHER_MAC),
            true,
        ),
        (
            "an ARP reply to the old gateway",
            arp_reply(GW_MAC, GW_MAC, PEER_IP),
            true,
        ),
        (
            "IPv4 already to this node's gateway",
            to_mac(&to_old_gateway, NEW_GW_MAC),
            false,
        ),
        ("IPv4 broadcast", to_mac(&to_old_gateway, [0xff; 6]), false),
        ("IPv4 multicast", multicast, false),
        ("a RARP announcement (broadcast)", rarp(GUEST_MAC), false),
    ];
    for (what, frame, rewritten) in &cases {
        let (v, out) = migrated.guest_to_pod(frame);
        assert_eq!(v, REDIRECT, "{what}");
        let expected = if *rewritten {
            to_mac(frame, NEW_GW_MAC)
        } else {
            frame.clone()
        };
        assert_eq!(out, expected, "{what}, in migration target mode");
        let (v, out) = off.guest_to_pod(frame);
        assert_eq!((v, &out), (REDIRECT, frame), "{what}, without the mode");
    }
    let request = arp(GUEST_MAC, GUEST_MAC, GUEST_IP);
    let (v, out) = off.guest_to_pod(&request);
    assert_eq!(
        (v, &out),
        (REDIRECT, &request),
        "without the mode: not answered"
    );
    assert_eq!(off.stats(7).tx_packets, 0);
    // The checks come first: a spoofed frame is dropped, not rewritten.
    let spoofed = udp(OTHER_MAC, GUEST_IP, PEER_IP, b"x");
    assert_eq!(migrated.guest_to_pod(&spoofed).0, DROP);
    let s = migrated.stats(SLOT);
    assert_eq!(s.rx_packets, cases.len() as u64);
    assert_eq!(s.drops[DropReason::SpoofedMac as usize], 1);
}

/// Without migration target mode its constant is 0, and the verifier, which knows the value of
/// a frozen read-only constant, removes the mode's code: the program the kernel runs is smaller
/// by all of it (the responder, the rewrite) than the same program with the mode on.
#[test]
fn without_migration_target_mode_its_code_is_not_in_the_program() {
    if !prerequisites() {
        return;
    }
    let pins = PinDir::new("guest-gateway-size");
    let size = |id: &Identity| {
        let mut g = Guest::load(pins.path(), id);
        let info = g.program(program_names::GUEST_TO_POD).info().unwrap();
        info.size_translated()
            .expect("the kernel reports the program's size")
    };
    let (off, on) = (size(&GUEST), size(&MIGRATED));
    eprintln!("tapestry_guest_to_pod as the kernel runs it: {off} bytes off, {on} bytes on");
    // The responder alone builds and stores a 28-byte ARP message and a 12-byte header: well
    // over 20 instructions (8 bytes each).
    assert!(off + 20 * 8 < on, "off {off} bytes, on {on} bytes");
}

/// A throwaway network namespace, deleted (with its interfaces) when dropped.
struct Netns(String);

impl Netns {
    fn new(what: &str) -> Netns {
        let name = format!("tapestry-test-{what}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let ns = Netns(name);
        run("ip", &["netns", "add", &ns.0]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

/// The interface's count of frames it could not send (tx_dropped), in namespace `ns`.
fn tx_dropped(ns: &str, ifname: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", ifname])
        .output()
        .unwrap();
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tx dropped counter for {ifname} in {links}"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// The tap's file descriptor, opened as QEMU opens it: frames written are what the guest sends,
/// frames read are what reaches it. Call in the tap's namespace.
fn open_tap(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads the ifreq we own, on our fd.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error()).context("TUNSETIFF");
    }
    set_nonblocking(file.as_raw_fd());
    Ok(file)
}

/// A packet socket on `ifindex` that sends frames and sees every frame the interface receives.
fn capture_socket(ifindex: u32) -> Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: a plain socket call.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            all as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: `fd` is a socket we just opened and own from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: binding our socket to a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("binding the packet socket");
    }
    set_nonblocking(sock.as_raw_fd());
    Ok(sock)
}

fn set_nonblocking(fd: i32) {
    // SAFETY: flag changes on an fd the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn send(sock: &OwnedFd, frame: &[u8]) -> Result<()> {
    // SAFETY: sending from a buffer we own on a bound socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("send");
    }
    Ok(())
}

/// Whether `frame` arrives on the socket (as received, not as sent by us) within a second.
fn received(sock: &OwnedFd, frame: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: receiving into buffers we own, their sizes given.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut from_len,
            )
        };
        if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING && &buf[..n as usize] == frame {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Every frame the socket receives (not those it sent) within `window`.
fn frames_received(sock: &OwnedFd, window: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + window;
    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: receiving into buffers we own, their sizes given.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut from_len,
            )
        };
        if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
            frames.push(buf[..n as usize].to_vec());
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    frames
}

/// Whether `frame` can be read from the tap within a second.
fn read_from_tap(tap: &mut File, frame: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok(n) = tap.read(&mut buf)
            && &buf[..n] == frame
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// What the programs did with real interfaces.
#[derive(Debug)]
struct Seen {
    /// The guest's frame, written to the tap, came out of the pod interface's peer.
    guest_frame_left_the_pod_interface: bool,
    /// The guest's frame also came back into the tap (it must not).
    guest_frame_back_in_the_tap: bool,
    /// A frame sent to the pod interface could be read from the tap.
    frame_reached_the_tap: bool,
    /// The guest's counters around an IPv4 frame too short for its header, from the guest.
    cut_ipv4: (GuestStats, GuestStats),
    /// The guest's counters around a VLAN-tagged frame from the guest.
    vlan: (GuestStats, GuestStats),
    /// The tagged frame came out of the pod interface's peer (it must not).
    tagged_left_the_pod_interface: bool,
    tx_before_carrier: (GuestStats, GuestStats),
    tap_tx_dropped: (u64, u64),
}

/// The cross-connect on real interfaces, in a throwaway namespace named after `what`: pod0 (its
/// veth peer0 stands for the pod network) and tap0, the programs of `id` (with those two as its
/// interfaces) attached as the daemon attaches them (TCX, ingress). `f` runs in the namespace,
/// given the guest's programs, tap0 opened as QEMU opens it, a socket on peer0 and the
/// namespace's name.
fn cross_connect<T: Send>(
    what: &str,
    id: Identity,
    f: impl FnOnce(Guest, File, OwnedFd, String) -> Result<T> + Send,
) -> T {
    let ns = Netns::new(what);
    let pins = PinDir::new(what);
    // No IPv6 in the namespace, so the only frames on these interfaces are the test's.
    let no_ipv6 = in_netns(&ns.path(), || {
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
        }
        Ok(())
    });
    no_ipv6.expect("disabling IPv6 in the test namespace");
    ns.ip(&[
        "link", "add", "pod0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
    for ifname in ["pod0", "peer0", "tap0"] {
        ns.ip(&["link", "set", ifname, "up"]);
    }
    let pin_dir = pins.path().to_owned();
    let ns_name = ns.0.clone();
    in_netns(&ns.path(), move || -> Result<T> {
        let id = Identity {
            tap_ifindex: ifindex_of("tap0")?,
            pod_ifindex: ifindex_of("pod0")?,
            ..id
        };
        let peer = capture_socket(ifindex_of("peer0")?)?;
        let mut g = Guest::load(&pin_dir, &id);
        for (name, ifname) in [
            (program_names::POD_TO_GUEST, "pod0"),
            (program_names::GUEST_TO_POD, "tap0"),
        ] {
            g.program(name)
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    tc::TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| format!("attaching {name} to {ifname}"))?;
        }
        let tap = open_tap("tap0")?;
        f(g, tap, peer, ns_name)
    })
    .unwrap_or_else(|e| panic!("the cross-connect in the test namespace ({what}): {e:#}"))
}

/// The cross-connect on real interfaces: pod0 (its veth peer stands for the pod network) and
/// tap0 in a throwaway namespace, both programs attached as the daemon attaches them (TCX,
/// ingress). With a real redirect the kernel delivers the frame, so the target can be seen:
/// pod_to_guest must hand the pod's traffic to the tap and guest_to_pod the guest's to the pod
/// interface's egress (out to its peer), never the other way round. A real tap also takes an
/// IPv4 frame too short for its header, which the test run refuses.
///
/// Before carrier: pod_to_guest has no notion of the tap's state (nothing in the program reads
/// it); it redirects and counts the frame as sent to the guest. With no reader on the tap (the
/// VM has not opened it yet) the tap has no carrier and drops the frame, counting it in its own
/// tx_dropped: the guest's tx counters include frames the guest never got.
#[test]
fn redirects_reach_the_tap_and_the_pod_interface() {
    if !prerequisites() {
        return;
    }
    let seen = cross_connect("guest-redirect", GUEST, |g, mut tap, peer, ns_name| {
        let from_guest = udp(GUEST_MAC, GUEST_IP, PEER_IP, b"guest to pod");
        tap.write_all(&from_guest)?;
        let guest_frame_left_the_pod_interface = received(&peer, &from_guest);
        let guest_frame_back_in_the_tap = read_from_tap(&mut tap, &from_guest);

        let to_guest = udp(GW_MAC, PEER_IP, GUEST_IP, b"pod to guest");
        send(&peer, &to_guest)?;
        let frame_reached_the_tap = read_from_tap(&mut tap, &to_guest);

        let mut cut = udp(GUEST_MAC, GUEST_IP, PEER_IP, b"");
        cut.truncate(14 + 19);
        let before_cut = g.stats(SLOT);
        tap.write_all(&cut)?;
        // The program runs in the write, on tap0's ingress.
        let cut_ipv4 = (before_cut, g.stats(SLOT));

        // A tagged frame: the tap's receive path moves the tag into the packet's metadata
        // before tc, so the program sees an untagged IPv4 frame with vlan_present set.
        let mut tagged = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
            .single_vlan(VlanId::try_new(10).unwrap())
            .ipv4(GUEST_IP, PEER_IP, 64)
            .udp(40000, 53)
            .write(&mut tagged, b"tagged on the tap")
            .unwrap();
        let before_tagged = g.stats(SLOT);
        tap.write_all(&tagged)?;
        // A packet socket sees a forwarded frame without its tag (the tag stays metadata).
        let untagged = udp(GUEST_MAC, GUEST_IP, PEER_IP, b"tagged on the tap");
        let tagged_left_the_pod_interface = received(&peer, &untagged);
        let vlan = (before_tagged, g.stats(SLOT));

        // The VM goes away (or has not started): no reader, no carrier.
        drop(tap);
        let before = (g.stats(SLOT), tx_dropped(&ns_name, "tap0"));
        send(&peer, &udp(GW_MAC, PEER_IP, GUEST_IP, b"no one there"))?;
        std::thread::sleep(Duration::from_millis(200));
        let after = (g.stats(SLOT), tx_dropped(&ns_name, "tap0"));
        Ok(Seen {
            guest_frame_left_the_pod_interface,
            guest_frame_back_in_the_tap,
            frame_reached_the_tap,
            cut_ipv4,
            vlan,
            tagged_left_the_pod_interface,
            tx_before_carrier: (before.0, after.0),
            tap_tx_dropped: (before.1, after.1),
        })
    });

    assert!(seen.guest_frame_left_the_pod_interface, "{seen:?}");
    assert!(!seen.guest_frame_back_in_the_tap, "{seen:?}");
    assert!(seen.frame_reached_the_tap, "{seen:?}");
    let (before, after) = seen.cut_ipv4;
    assert_eq!(after, plus_drop(&before, DropReason::SpoofedIp), "{seen:?}");
    let (before, after) = seen.vlan;
    assert_eq!(
        after,
        plus_drop(&before, DropReason::VlanTagged),
        "{seen:?}"
    );
    assert!(!seen.tagged_left_the_pod_interface, "{seen:?}");
    let (before, after) = seen.tx_before_carrier;
    assert_eq!(after.tx_packets, before.tx_packets + 1, "{seen:?}");
    assert_eq!(seen.tap_tx_dropped.1, seen.tap_tx_dropped.0 + 1, "{seen:?}");
}

/// Migration target mode on real interfaces, where the redirects are carried out: the gateway's
/// answer to the guest's ARP request reaches the guest through its tap and nothing of it leaves
/// the pod interface; the guest's frame to the previous node's gateway leaves the pod interface
/// addressed to this node's.
#[test]
fn migration_target_mode_on_real_interfaces() {
    if !prerequisites() {
        return;
    }
    let request = arp(GUEST_MAC, GUEST_MAC, GUEST_IP);
    let frame = udp(GUEST_MAC, GUEST_IP, PEER_IP, b"after the migration");
    let (answer_reached_the_guest, left_after_the_request, left_after_the_frame) =
        cross_connect("guest-gateway", MIGRATED, |_g, mut tap, peer, _| {
            tap.write_all(&request)?;
            let answered = read_from_tap(&mut tap, &gateway_answer(NEW_GW_MAC, PEER_IP));
            let left = frames_received(&peer, Duration::from_millis(300));
            tap.write_all(&frame)?;
            let left_after = frames_received(&peer, Duration::from_millis(300));
            Ok((answered, left, left_after))
        });
    assert!(
        answer_reached_the_guest,
        "the answer came back out of the tap"
    );
    assert!(
        left_after_the_request.is_empty(),
        "neither the request nor its answer leaves the pod interface: {left_after_the_request:02x?}"
    );
    assert_eq!(
        left_after_the_frame,
        [to_mac(&frame, NEW_GW_MAC)],
        "the frame left once, to this node's gateway"
    );
}

/// What tapestry_guest_to_pod must do with a frame, as the model says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// Passed to the pod network, as these bytes.
    Forward(Vec<u8>),
    /// Queued for the daemon's DHCP server.
    Dhcp,
    /// Answered by the program itself (migration target mode): these bytes back to the guest.
    Answer(Vec<u8>),
    /// The guest's reply to the readiness probe: counted and consumed.
    ProbeReply,
    Drop(DropReason),
}

/// What tapestry_guest_to_pod must do with `f` from the guest `GUEST`, in migration target mode
/// with `gateway` if given (independently written: offsets by hand).
fn guest_model(f: &[u8], gateway: Option<[u8; 6]>) -> Fate {
    let forward = || {
        let mut out = f.to_vec();
        if let Some(gw) = gateway
            && f[0] & 1 == 0
            && f[..6] != gw
        {
            out[..6].copy_from_slice(&gw);
        }
        Fate::Forward(out)
    };
    if f[6..12] != GUEST_MAC {
        return Fate::Drop(DropReason::SpoofedMac);
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    match ethertype {
        0x8100 | 0x88a8 | 0x9100 => Fate::Drop(DropReason::VlanTagged),
        0x8035 => forward(),
        0x0806 => {
            if f.len() < 14 + 28 || f[22..28] != GUEST_MAC {
                return Fate::Drop(DropReason::SpoofedArp);
            }
            let spa = &f[28..32];
            if spa != GUEST_IP && spa != [0; 4] {
                return Fate::Drop(DropReason::SpoofedArp);
            }
            if f[20..22] == [0, 2] && spa == GUEST_IP && f[32..38] == TAP_MAC {
                return Fate::ProbeReply;
            }
            // Ethernet, IPv4, 6, 4, request; from the guest's address for another.
            let asks =
                f[14..22] == [0, 1, 8, 0, 6, 4, 0, 1] && spa == GUEST_IP && f[38..42] != GUEST_IP;
            if let Some(gw) = gateway
                && asks
            {
                let mut a = Vec::new();
                a.extend(GUEST_MAC);
                a.extend(gw);
                a.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
                a.extend(gw);
                a.extend(&f[38..42]);
                a.extend(GUEST_MAC);
                a.extend(GUEST_IP);
                // Rewritten in place: whatever followed the ARP message stays.
                a.extend(&f[42..]);
                return Fate::Answer(a);
            }
            forward()
        }
        0x0800 => {
            if f.len() < 34 {
                return Fate::Drop(DropReason::SpoofedIp);
            }
            let l4 = 14 + (f[14] & 0x0f) as usize * 4;
            if f[23] == 17 && f.len() >= l4 + 4 {
                let sport = u16::from_be_bytes([f[l4], f[l4 + 1]]);
                let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
                if (sport, dport) == (68, 67) {
                    return if f.len() < 14 + 20 + 8 {
                        Fate::Drop(DropReason::UnsupportedProtocol)
                    } else {
                        Fate::Dhcp
                    };
                }
                if sport == 67 || dport == 68 {
                    return Fate::Drop(DropReason::RogueDhcpServer);
                }
            }
            if f[26..30] != GUEST_IP {
                return Fate::Drop(DropReason::SpoofedIp);
            }
            forward()
        }
        _ => Fate::Drop(DropReason::UnsupportedProtocol),
    }
}

/// One generated frame as a guest (or something posing as one) might send.
fn generate_guest_frame(rng: &mut Rng) -> Vec<u8> {
    let src_mac = if rng.chance(80) { GUEST_MAC } else { OTHER_MAC };
    let mut f = Vec::new();
    // Mostly the gateway the guest knows (the previous node's, in migration target mode).
    f.extend(*rng.pick(&[
        [0xff; 6],
        [0x01, 0, 0x5e, 0, 0, 0xfb],
        GW_MAC,
        GW_MAC,
        GW_MAC,
        GW_MAC,
        GW_MAC,
        NEW_GW_MAC,
    ]));
    f.extend(src_mac);
    let ip = *rng.pick(&[GUEST_IP, GUEST_IP, GUEST_IP, [0; 4], OTHER_IP]);
    match rng.below(100) {
        0..=49 => {
            f.extend([0x08, 0x00]);
            let ihl = if rng.chance(20) {
                rng.below(16) as u8
            } else {
                5
            };
            let proto = *rng.pick(&[17u8, 17, 6, 1]);
            f.extend([0x40 | ihl, 0, 0, 0, 0, 1, 0, 0, 64, proto, 0, 0]);
            f.extend(ip);
            f.extend(PEER_IP);
            for _ in 5..ihl.max(5) {
                f.extend([1, 1, 1, 1]);
            }
            let any = (rng.next_u64() as u16, rng.next_u64() as u16);
            let (sport, dport) = *rng.pick(&[
                (68u16, 67u16),
                (68, 67),
                (67, 68),
                (67, 67),
                (40000, 68),
                (40000, 53),
                any,
            ]);
            f.extend(sport.to_be_bytes());
            f.extend(dport.to_be_bytes());
            let n = rng.below(400) as usize;
            f.extend(rng.bytes(n));
        }
        50..=69 => {
            // Requests, and replies (to a neighbour, or the readiness probe's to the tap).
            let op = *rng.pick(&[1u8, 1, 2]);
            f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, op]);
            f.extend(if rng.chance(80) { GUEST_MAC } else { OTHER_MAC });
            f.extend(ip);
            f.extend(*rng.pick(&[[0; 6], [0; 6], TAP_MAC, GW_MAC]));
            f.extend(*rng.pick(&[PEER_IP, PEER_IP, OTHER_IP, GUEST_IP, [0; 4]]));
        }
        70..=79 => {
            let tag = *rng.pick(&[0x8100u16, 0x88a8, 0x9100]);
            f.extend(tag.to_be_bytes());
            f.extend([0, 10, 0x08, 0x00, 0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0]);
            f.extend(GUEST_IP);
            f.extend(PEER_IP);
            f.extend([0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        }
        _ => {
            let any = rng.next_u64() as u16;
            let t = *rng.pick(&[0x86ddu16, 0x88cc, 0x0842, 0x8035, any]);
            f.extend(t.to_be_bytes());
            let n = rng.below(200) as usize;
            f.extend(rng.bytes(n));
        }
    }
    if rng.chance(10) {
        let cut = 14 + rng.below((f.len() - 13) as u64) as usize;
        f.truncate(cut);
    }
    f
}

/// What one differential run found.
struct Differential {
    checked: u64,
    refused: u64,
    mismatches: Vec<String>,
    /// The counters the model expects, and those the programs wrote (timestamps zeroed).
    expected: GuestStats,
    got: GuestStats,
    answers: u64,
}

/// 25,000 generated frames through both programs of `id`, each checked against the model.
fn differential(what: &str, id: &Identity) -> Differential {
    let pins = PinDir::new(what);
    let mut g = Guest::load(pins.path(), id);
    let mut rng = Rng::new(0x6e57_0042);
    let mut expected = GuestStats::default();
    let mut queue = Vec::new();
    let (mut checked, mut refused, mut answers, mut mismatches) = (0u64, 0u64, 0u64, Vec::new());
    for i in 0..25_000u32 {
        let f = generate_guest_frame(&mut rng);
        let name = if i % 5 == 4 {
            program_names::POD_TO_GUEST
        } else {
            program_names::GUEST_TO_POD
        };
        let mut out = vec![0u8; f.len() + 256];
        let Ok(result) = g.program(name).test_run(TestRunOptions {
            data_in: Some(&f),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        }) else {
            refused += 1;
            continue;
        };
        out.truncate(result.data_size_out as usize);
        let verdict = result.return_value as i32;
        checked += 1;
        let fate = if name == program_names::POD_TO_GUEST {
            expected.tx_packets += 1;
            expected.tx_bytes += f.len() as u64;
            Fate::Forward(f.clone())
        } else {
            let fate = guest_model(&f, id.gateway_mac);
            match &fate {
                Fate::Forward(_) => {
                    expected.rx_packets += 1;
                    expected.rx_bytes += f.len() as u64;
                    if f[12..14] == [0x80, 0x35] {
                        expected.announces += 1;
                    }
                }
                Fate::Answer(_) => {
                    expected.tx_packets += 1;
                    expected.tx_bytes += f.len() as u64;
                    answers += 1;
                }
                Fate::Dhcp => {
                    expected.dhcp += 1;
                    queue.push((SLOT, f[..f.len().min(DHCP_FRAME_MAX)].to_vec()));
                }
                Fate::ProbeReply => expected.probe_replies += 1,
                Fate::Drop(r) => expected.drops[*r as usize] += 1,
            }
            fate
        };
        let ok = match &fate {
            Fate::Forward(bytes) | Fate::Answer(bytes) => verdict == REDIRECT && out == *bytes,
            Fate::Dhcp | Fate::ProbeReply | Fate::Drop(_) => verdict == DROP,
        };
        if !ok {
            mismatches.push(format!(
                "{what}: frame {i} through {name}: verdict {verdict}, out {out:02x?}, expected {fate:02x?}\n in {f:02x?}"
            ));
        }
        if i % 100 == 99 {
            let got = g.dhcp_queue();
            if got != queue {
                mismatches.push(format!(
                    "{what}: DHCP queue after frame {i}: {got:02x?}, expected {queue:02x?}"
                ));
            }
            queue.clear();
        }
    }
    let mut got = g.stats(SLOT);
    // When the guest first used its address or first sent anything is not the model's business.
    got.seen_ns = 0;
    got.live_ns = 0;
    eprintln!(
        "guest differential ({what}): {checked} frames checked, {refused} refused by test_run, {answers} answered, {} mismatches; {expected:?}",
        mismatches.len()
    );
    Differential {
        checked,
        refused,
        mismatches,
        expected,
        got,
        answers,
    }
}

/// 25,000 generated frames (spoofed and true addresses, ARP, DHCP both ways, VLAN-tagged, IP
/// options, IPv6, non-IP, cut short) through both guest programs, each checked against a model
/// of the checks: verdict, bytes (a forwarded frame leaves unchanged), the counters by reason
/// and the DHCP queue: no mismatch. Then the same frames in migration target mode, where the
/// model also says which ARP requests are answered and with what, and which frames leave with
/// this node's gateway as their destination.
#[test]
fn generated_frames_match_the_model_of_both_guest_programs() {
    if !prerequisites() {
        return;
    }
    let runs = [
        differential("guest-differential", &GUEST),
        differential("guest-differential-gateway", &MIGRATED),
    ];
    let total = |f: fn(&Differential) -> u64| runs.iter().map(f).sum::<u64>();
    eprintln!(
        "RELIABILITY {}",
        serde_json::json!({"differential_guest_programs": {
            "frames_checked": total(|d| d.checked),
            "refused_by_test_run": total(|d| d.refused),
            "mismatches": total(|d| d.mismatches.len() as u64)}})
    );
    for d in &runs {
        assert!(
            d.mismatches.is_empty(),
            "{} mismatches:\n{}",
            d.mismatches.len(),
            d.mismatches[..d.mismatches.len().min(5)].join("\n")
        );
        assert_eq!(d.got, d.expected, "the counters");
        for r in [
            DropReason::SpoofedMac,
            DropReason::SpoofedIp,
            DropReason::SpoofedArp,
            DropReason::UnsupportedProtocol,
            DropReason::VlanTagged,
            DropReason::RogueDhcpServer,
        ] {
            assert!(
                d.expected.drops[r as usize] >= 100,
                "too few {r:?}: {:?}",
                d.expected
            );
        }
        assert!(
            d.expected.dhcp >= 1000 && d.expected.rx_packets >= 1000,
            "{:?}",
            d.expected
        );
        assert!(
            d.checked >= 24_000,
            "{} checked, {} refused",
            d.checked,
            d.refused
        );
    }
    assert_eq!(runs[0].answers, 0, "nothing answered without the mode");
    for d in &runs {
        assert!(d.expected.probe_replies >= 100, "{:?}", d.expected);
    }
    assert!(
        runs[1].answers >= 200,
        "too few answered: {}",
        runs[1].answers
    );
}
