//! A hostile guest on a node, with a real tapestryd: from the guest stand-in on its tap (the
//! tap's file descriptor, as QEMU holds it, for volume), every kind of frame a guest must not
//! send, thousands of each: spoofed IP and MAC, ARP for another address, DHCP starvation (DISCOVERs
//! for other hardware addresses) and RELEASE floods, a rogue DHCP server, VLAN-tagged frames,
//! IPv6, frames cut short or over the MTU. Each is dropped and counted by reason, the daemon stays within bounds
//! (its CPU time and memory), and a second guest on the node keeps its DHCP answers and loses
//! none of its datagrams meanwhile.
//!
//! Then the same from a real QEMU guest (its kernel, its virtio NIC, QEMU's tap): 802.1Q and
//! 802.1ad tagged frames and a DHCP RELEASE flood, written by a raw-frame sender inside the
//! guest (`tests/guest/raw-send.c`), each counted by reason, while the neighbour's DHCP is
//! answered.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use dhcproto::v4::MessageType;
use etherparse::PacketBuilder;
use tapestry_tests::{
    Lab,
    daemon::Daemon,
    guest::{Guest, GuestConfig},
    require_lab, require_qemu,
    tapfd::{TapGuest, dhcp_frame, dhcp_reply, guest_udp, register_vm_pod},
};

const T: Duration = Duration::from_secs(3);

/// This file's tests one at a time: each measures what a neighbour loses during a flood, which
/// the other's flood (or QEMU's emulation) would take a share of on two CPUs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Frames of each hostile kind.
const EACH: u64 = 2_000;
/// DHCP messages of each flood (DISCOVER starvation, RELEASE).
const DHCP_FLOOD: u64 = 20_000;

/// (user + system CPU time, resident memory) of process `pid`.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (Duration::from_millis(ticks * 1000 / hz), rss_kib * 1024)
}

/// DHCP DISCOVER -> OFFER, REQUEST -> ACK for `guest`, retrying an unanswered message as a
/// client does; the time the exchange took.
fn dhcp_exchange(guest: &mut TapGuest, mac: [u8; 6], ip: Ipv4Addr) -> Option<Duration> {
    let t = Instant::now();
    for (kind, want, requested) in [
        (MessageType::Discover, MessageType::Offer, None),
        (MessageType::Request, MessageType::Ack, Some(ip)),
    ] {
        (0..3).find_map(|_| {
            guest.send(&dhcp_frame(mac, kind, requested)).ok()?;
            guest
                .recv_matching(T, |f| {
                    dhcp_reply(f).is_some_and(|m| m.opts().msg_type() == Some(want))
                })
                .map(|_| ())
        })?;
    }
    Some(t.elapsed())
}

#[test]
fn a_hostile_guest_is_dropped_and_counted_and_its_neighbour_is_unaffected() {
    require_lab!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::new("hostile").unwrap();
    let peer = lab.add_pod("peer").unwrap();
    let evil = lab.add_pod("evil").unwrap();
    let good = lab.add_pod("good").unwrap();
    let echo = peer.serve_udp_name(5353).unwrap();
    let d = Daemon::start("hostile", "services: []\n", &[&peer.host_ifname]).unwrap();
    register_vm_pod(&d.client(), &evil).expect("the hostile guest's endpoint");
    register_vm_pod(&d.client(), &good).expect("the good guest's endpoint");
    let mut bad = TapGuest::open(&evil.netns_path, "tap0").unwrap();
    bad.answer_arp(evil.mac, evil.ip);
    let mut neighbour = TapGuest::open(&good.netns_path, "tap0").unwrap();
    neighbour.answer_arp(good.mac, good.ip);
    let before_flood = dhcp_exchange(&mut neighbour, good.mac, good.ip)
        .unwrap_or_else(|| panic!("no DHCP answer before the flood; log:\n{}", d.log()));

    // The frames, built once. `hostile` holds each kind with the reason it must be counted as.
    let other_ip = Ipv4Addr::new(evil.ip.octets()[0], evil.ip.octets()[1], 250, 99);
    let udp = |mac, src| guest_udp(mac, evil.host_mac, src, peer.ip, 5353);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&evil.mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    arp.extend_from_slice(&evil.mac);
    arp.extend_from_slice(&peer.ip.octets()); // claims the peer's address
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&peer.ip.octets());
    let mut tagged = Vec::new();
    PacketBuilder::ethernet2(evil.mac, evil.host_mac)
        .single_vlan(etherparse::VlanId::try_new(7).unwrap())
        .ipv4(evil.ip.octets(), peer.ip.octets(), 64)
        .udp(40000, 5353)
        .write(&mut tagged, b"tagged")
        .unwrap();
    let mut offer = Vec::new();
    PacketBuilder::ethernet2(evil.mac, [0xff; 6])
        .ipv4(evil.ip.octets(), [255; 4], 64)
        .udp(67, 68)
        .write(
            &mut offer,
            &dhcp_frame(evil.mac, MessageType::Offer, None)[42..],
        )
        .unwrap();
    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2(evil.mac, evil.host_mac)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .udp(40000, 5353)
        .write(&mut ipv6, b"v6")
        .unwrap();
    // Longer than the guest's MTU (1500; the tap has no offloads, so no GSO super-frame).
    let mut oversized = Vec::new();
    PacketBuilder::ethernet2(evil.mac, evil.host_mac)
        .ipv4(evil.ip.octets(), peer.ip.octets(), 64)
        .udp(40000, 5353)
        .write(&mut oversized, &[0x55; 1600])
        .unwrap();
    let mut cut = udp(evil.mac, evil.ip);
    cut.truncate(14 + 12);
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("spoofed_ip", udp(evil.mac, other_ip)),
        ("spoofed_mac", udp([0x02, 9, 9, 9, 9, 9], evil.ip)),
        ("spoofed_arp", arp),
        ("vlan_tagged", tagged),
        ("rogue_dhcp_server", offer),
        ("unsupported_protocol", ipv6),
        ("spoofed_ip", cut),
        ("oversized", oversized),
    ];
    let release = dhcp_frame(evil.mac, MessageType::Release, None);

    let daemon_pid = d.pid().expect("the daemon runs");
    let (cpu0, rss0) = usage(daemon_pid);
    let requests0 = echo.requests();
    // The neighbour meanwhile: DHCP again, and datagrams to the peer, none may be lost.
    let neighbour_side = std::thread::spawn(move || {
        let mut exchanges = Vec::new();
        let mut sent = 0u64;
        let t = Instant::now();
        let mut last_exchange: Option<Instant> = None;
        while t.elapsed() < Duration::from_secs(3) {
            // A lease renewed twice a second: well within its own DHCP rate.
            if last_exchange.is_none_or(|l| l.elapsed() >= Duration::from_millis(500)) {
                last_exchange = Some(Instant::now());
                exchanges.push(dhcp_exchange(&mut neighbour, good.mac, good.ip));
            }
            for _ in 0..50 {
                neighbour
                    .send(&guest_udp(good.mac, good.host_mac, good.ip, peer.ip, 5353))
                    .unwrap();
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (exchanges, sent)
    });

    let t = Instant::now();
    let mut sent: std::collections::BTreeMap<&str, u64> = Default::default();
    for round in 0..EACH {
        for (reason, frame) in &hostile {
            bad.send(frame).unwrap();
            *sent.entry(reason).or_default() += 1;
        }
        for i in 0..DHCP_FLOOD / EACH {
            // Starvation: DISCOVERs for hardware addresses that are not the guest's.
            let n = round * (DHCP_FLOOD / EACH) + i;
            let chaddr = [0x02, 0xee, (n >> 16) as u8, (n >> 8) as u8, n as u8, 1];
            let mut discover = dhcp_frame(chaddr, MessageType::Discover, None);
            discover[6..12].copy_from_slice(&evil.mac);
            bad.send(&discover).unwrap();
            bad.send(&release).unwrap();
        }
    }
    let flood_time = t.elapsed();
    let (exchanges, neighbour_sent) = neighbour_side.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu1, rss1) = usage(daemon_pid);

    let guests = d.client().guests().unwrap();
    let g = guests.iter().find(|g| g.name == "evil").unwrap();
    for (reason, n) in &sent {
        assert_eq!(g.drops.get(*reason), Some(n), "{reason}: {:?}", g.drops);
    }
    // Every DHCP message of the floods was queued for the daemon within its rate, or dropped
    // over it, and most of them were dropped.
    let limited = g.drops.get("dhcp_rate_limited").copied().unwrap_or(0);
    let flood = 2 * DHCP_FLOOD;
    assert_eq!(g.dhcp_messages + limited, flood, "{g:?}");
    assert!(
        limited > flood * 9 / 10,
        "only {limited} of {flood} limited"
    );
    // Nothing the hostile guest sent reached the peer.
    let good_g = guests.iter().find(|g| g.name == "good").unwrap();
    assert!(good_g.drops.values().all(|n| *n == 0), "{good_g:?}");
    let delivered = echo.requests() - requests0;
    assert_eq!(
        delivered, neighbour_sent,
        "the neighbour's datagrams, all delivered"
    );
    assert!(
        !exchanges.is_empty() && exchanges.iter().all(|e| e.is_some()),
        "the neighbour's DHCP went unanswered during the flood: {exchanges:?}"
    );
    let worst = exchanges.iter().flatten().max().unwrap();
    let cpu = cpu1.saturating_sub(cpu0);
    eprintln!(
        "hostile: {} frames in {flood_time:?}; daemon CPU {cpu:?}, RSS {} -> {} KiB; neighbour DHCP \
         {before_flood:?} before, worst {worst:?} during; {delivered} datagrams delivered",
        sent.values().sum::<u64>() + flood,
        rss0 / 1024,
        rss1 / 1024
    );
    let frames = sent.values().sum::<u64>() + flood;
    let counted = g.drops.values().sum::<u64>() + g.dhcp_messages;
    eprintln!(
        "RELIABILITY {}",
        serde_json::json!({"hostile_guest": {
            "frames_sent": frames, "dropped_or_queued_and_counted": counted,
            "dropped_by_reason": g.drops, "queued_for_the_daemon": g.dhcp_messages,
            "daemon_cpu_ms": cpu.as_millis() as u64,
            "daemon_rss_growth_kib": rss1.saturating_sub(rss0) / 1024,
            "neighbour_dhcp_worst_ms": worst.as_secs_f64() * 1000.0,
            "neighbour_datagrams_sent": neighbour_sent,
            "neighbour_datagrams_delivered": delivered}})
    );
    assert_eq!(counted, frames, "every hostile frame counted");
    // The daemon's share: the rate-limited DHCP it answers, not the flood.
    assert!(
        cpu < Duration::from_secs(2),
        "the daemon used {cpu:?} of CPU during the flood"
    );
    assert!(
        rss1 < rss0 + 32 * 1024 * 1024,
        "the daemon grew from {rss0} to {rss1} bytes"
    );
}

/// Tagged frames the QEMU guest sends.
const FROM_QEMU: u64 = 5_000;
/// DHCP RELEASEs it sends: well over a second's worth at its pace (about 95,000 a second under
/// TCG here), so that several of the neighbour's renewals fall inside the flood.
const RELEASES_FROM_QEMU: u64 = 150_000;

/// What `tapestry-raw-send` reported: (frames, milliseconds).
fn sent(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("TAPESTRY-SENT"))
        .unwrap_or_else(|| panic!("no TAPESTRY-SENT in {out:?}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
    };
    (field("frames="), field("ms="))
}

#[test]
fn a_qemu_guests_vlan_tags_and_release_flood_are_counted_and_its_neighbour_answered() {
    require_lab!();
    require_qemu!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = Lab::new("hostile-vm").unwrap();
    let peer = lab.add_pod("peer").unwrap();
    let evil = lab.add_pod("evilvm").unwrap();
    let good = lab.add_pod("good").unwrap();
    let d = Daemon::start("hostile-vm", "services: []\n", &[&peer.host_ifname]).unwrap();
    register_vm_pod(&d.client(), &evil).expect("the QEMU guest's endpoint");
    register_vm_pod(&d.client(), &good).expect("the neighbour's endpoint");
    let mut vm = Guest::boot(&evil, GuestConfig::new("evilvm", evil.mac)).unwrap();
    vm.wait_ready(Duration::from_secs(120))
        .expect("the guest boots and gets its lease");
    let lease = vm.dhcp_lease().expect("the guest's lease");
    assert_eq!(lease.ip, evil.ip);
    let server = lease.server.expect("the lease's server identifier");
    let mut neighbour = TapGuest::open(&good.netns_path, "tap0").unwrap();
    neighbour.answer_arp(good.mac, good.ip);
    dhcp_exchange(&mut neighbour, good.mac, good.ip)
        .unwrap_or_else(|| panic!("no DHCP answer before the flood; log:\n{}", d.log()));
    let stats = || {
        d.client()
            .guests()
            .unwrap()
            .into_iter()
            .find(|g| g.name == "evilvm")
            .expect("the QEMU guest's Guest")
    };
    let drops = |g: &tapestry_api::types::GuestInfo, r: &str| g.drops.get(r).copied().unwrap_or(0);

    // Tagged frames, half 802.1Q and half 802.1ad, through the guest's kernel and QEMU.
    let before = stats();
    let out = vm
        .console(
            &format!("tapestry-raw-send eth0 vlan {FROM_QEMU}"),
            Duration::from_secs(120),
        )
        .unwrap();
    let (vlan_sent, vlan_ms) = sent(&out);
    assert_eq!(vlan_sent, FROM_QEMU);
    let after_vlan = stats();
    assert_eq!(
        drops(&after_vlan, "vlan_tagged") - drops(&before, "vlan_tagged"),
        FROM_QEMU,
        "every tagged frame counted: {:?}",
        after_vlan.drops
    );

    // RELEASEs of its own address as fast as it can, the neighbour renewing meanwhile.
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = flooding.clone();
    let neighbour_side = std::thread::spawn(move || {
        // (answered in, during the flood)
        let mut exchanges = Vec::new();
        while f.load(std::sync::atomic::Ordering::Relaxed) || exchanges.is_empty() {
            let e = dhcp_exchange(&mut neighbour, good.mac, good.ip);
            exchanges.push((e, f.load(std::sync::atomic::Ordering::Relaxed)));
            // Four renewals a second, within its own DHCP rate.
            std::thread::sleep(Duration::from_millis(250));
        }
        exchanges
    });
    let out = vm
        .console(
            &format!("tapestry-raw-send eth0 release {RELEASES_FROM_QEMU} {server}"),
            Duration::from_secs(120),
        )
        .unwrap();
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let exchanges = neighbour_side.join().unwrap();
    let during = exchanges.iter().filter(|(_, during)| *during).count();
    let exchanges: Vec<Option<Duration>> = exchanges.into_iter().map(|(e, _)| e).collect();
    let (release_sent, release_ms) = sent(&out);
    assert_eq!(release_sent, RELEASES_FROM_QEMU);
    assert!(
        during >= 3,
        "only {during} of the neighbour's exchanges fell inside the {release_ms} ms flood"
    );
    // What reaches the daemon is queued on the tap's program's way out, asynchronously.
    std::thread::sleep(Duration::from_millis(300));
    let after = stats();
    let limited = drops(&after, "dhcp_rate_limited") - drops(&after_vlan, "dhcp_rate_limited");
    let queued = after.dhcp_messages - after_vlan.dhcp_messages;
    assert_eq!(
        queued + limited,
        RELEASES_FROM_QEMU,
        "every RELEASE queued or dropped over the guest's rate: {after:?}"
    );
    assert!(
        limited > RELEASES_FROM_QEMU * 9 / 10,
        "only {limited} of {RELEASES_FROM_QEMU} limited"
    );
    assert!(
        !exchanges.is_empty() && exchanges.iter().all(|e| e.is_some()),
        "the neighbour's DHCP went unanswered during the flood: {exchanges:?}"
    );
    let worst = exchanges.iter().flatten().max().unwrap();
    eprintln!(
        "qemu guest: {vlan_sent} tagged frames in {vlan_ms} ms, {release_sent} RELEASEs in \
         {release_ms} ms ({limited} rate-limited, {queued} queued); neighbour DHCP worst {worst:?} \
         over {} exchanges, {during} during the flood",
        exchanges.len()
    );
    eprintln!(
        "RELIABILITY {}",
        serde_json::json!({"hostile_qemu_guest": {
            "vlan_tagged_sent": vlan_sent, "vlan_tagged_counted":
                drops(&after_vlan, "vlan_tagged") - drops(&before, "vlan_tagged"),
            "vlan_send_ms": vlan_ms,
            "dhcp_release_sent": release_sent, "dhcp_release_rate_limited": limited,
            "dhcp_release_queued": queued, "release_send_ms": release_ms,
            "neighbour_dhcp_exchanges": exchanges.len(),
            "neighbour_dhcp_exchanges_during_flood": during,
            "neighbour_dhcp_worst_ms": worst.as_secs_f64() * 1000.0}})
    );
}
