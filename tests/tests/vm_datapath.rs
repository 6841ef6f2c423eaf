//! The VM pod cross-connect with a guest stand-in on the tap's file descriptor: DHCP from the
//! daemon, guest <-> pod traffic by eBPF redirect (no bridge, no NAT), Service balancing of
//! guest traffic, and anti-spoofing, all in real namespaces with a real tapestryd.

use std::{net::Ipv4Addr, time::Duration};

use dhcproto::v4::{DhcpOption, MessageType, OptionCode};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use tapestry_api::types::GuestPhase;
use tapestry_tests::{
    Lab,
    daemon::Daemon,
    require_lab,
    tapfd::{TapGuest, dhcp_frame, dhcp_reply, guest_udp, register_vm_pod},
};

const T: Duration = Duration::from_secs(3);

fn udp_payload_from(frame: &[u8], sport: u16) -> Option<(Ipv4Addr, String)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let src = ip.header().source_addr();
    match &p.transport {
        Some(TransportSlice::Udp(u)) if u.source_port() == sport => {
            Some((src, String::from_utf8_lossy(u.payload()).trim().to_owned()))
        }
        _ => None,
    }
}

#[test]
fn guest_gets_its_address_by_dhcp_talks_to_pods_and_services_and_cannot_spoof() {
    require_lab!();
    let mut lab = Lab::new("vm-datapath").unwrap();
    let client = lab.add_pod("client").unwrap();
    let be = lab.add_pod("be0").unwrap();
    let vm = lab.add_pod("vm").unwrap();
    let _udp = be.serve_udp_name(5353).unwrap();
    let vip = lab.service_ip(0);
    let state = format!(
        "services:\n  - name: dns\n    vip: {vip}\n    port: 53\n    protocol: UDP\n    backends:\n      - {{ ip: {}, port: 5353 }}\n",
        be.ip
    );
    let d = Daemon::start(
        "vm-datapath",
        &state,
        &[&client.host_ifname, &be.host_ifname],
    )
    .unwrap();
    register_vm_pod(&d.client(), &vm).expect("endpoint registered");
    let mut guest = TapGuest::open(&vm.netns_path, "tap0").unwrap();
    guest.answer_arp(vm.mac, vm.ip);
    let g = &d.client().guests().unwrap()[0];
    assert_eq!(
        (g.phase.as_str(), g.ip.as_str()),
        ("Attached", &*format!("{}/32", vm.ip))
    );

    // DHCP: DISCOVER -> OFFER of the pod IP, REQUEST -> ACK; the guest is then Ready. A client
    // retransmits an unanswered DISCOVER (RFC 2131 4.1), and so does this one.
    let offer = (0..3)
        .find_map(|_| {
            guest
                .send(&dhcp_frame(vm.mac, MessageType::Discover, None))
                .unwrap();
            guest
                .recv_matching(T, |f| dhcp_reply(f).is_some())
                .map(|f| dhcp_reply(&f).unwrap())
        })
        .unwrap_or_else(|| panic!("no OFFER; daemon log:\n{}", d.log()));
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), vm.ip);
    assert_eq!(
        offer.opts().get(OptionCode::Hostname),
        Some(&DhcpOption::Hostname("vm".into()))
    );
    assert!(offer.opts().get(OptionCode::ClasslessStaticRoute).is_some());
    guest
        .send(&dhcp_frame(vm.mac, MessageType::Request, Some(vm.ip)))
        .unwrap();
    let ack = guest
        .recv_matching(T, |f| dhcp_reply(f).is_some())
        .map(|f| dhcp_reply(&f).unwrap())
        .expect("an ACK");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    let g = &d.client().guests().unwrap()[0];
    assert_eq!(g.phase, GuestPhase::Ready, "{g:?}");
    assert!(g.dhcp_bound);

    // Guest -> pod by pod IP, and the pod's answer back into the tap.
    guest
        .send(&guest_udp(vm.mac, vm.host_mac, vm.ip, be.ip, 5353))
        .unwrap();
    let (from, name) = guest
        .recv_matching(T, |f| udp_payload_from(f, 5353).is_some())
        .and_then(|f| udp_payload_from(&f, 5353))
        .expect("the pod's answer reaches the guest");
    assert_eq!((from, name.as_str()), (be.ip, "be0"));

    // Guest -> Service VIP: balanced by the datapath on the VM pod's veth, like a pod.
    guest
        .send(&guest_udp(vm.mac, vm.host_mac, vm.ip, vip, 53))
        .unwrap();
    let (from, name) = guest
        .recv_matching(T, |f| udp_payload_from(f, 53).is_some())
        .and_then(|f| udp_payload_from(&f, 53))
        .expect("the service answers the guest");
    assert_eq!((from, name.as_str()), (vip, "be0"));

    // Pod -> guest: the client's datagram comes out of the tap.
    client
        .in_netns(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(b"to-guest", (vm.ip, 7)).unwrap();
        })
        .unwrap();
    let to_guest = guest.recv_matching(T, |f| {
        SlicedPacket::from_ethernet(f).is_ok_and(|p| {
            matches!(p.transport, Some(TransportSlice::Udp(u)) if u.destination_port() == 7 && u.payload() == b"to-guest")
        })
    });
    assert!(to_guest.is_some(), "the pod's datagram reaches the guest");

    // Spoofing: another source IP, another MAC, an ARP claiming another address. None of
    // them leaves the pod; each is counted by reason.
    let spoofed_ip = Ipv4Addr::new(vm.ip.octets()[0], vm.ip.octets()[1], vm.ip.octets()[2], 99);
    let before = _udp.requests();
    guest
        .send(&guest_udp(vm.mac, vm.host_mac, spoofed_ip, be.ip, 5353))
        .unwrap();
    guest
        .send(&guest_udp(
            [0x02, 9, 9, 9, 9, 9],
            vm.host_mac,
            vm.ip,
            be.ip,
            5353,
        ))
        .unwrap();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&vm.mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    arp.extend_from_slice(&vm.mac);
    arp.extend_from_slice(&be.ip.octets()); // claims the backend's address
    arp.extend_from_slice(&[0xff; 6]);
    arp.extend_from_slice(&be.ip.octets());
    guest.send(&arp).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        _udp.requests(),
        before,
        "no spoofed datagram reached the pod"
    );
    let g = &d.client().guests().unwrap()[0];
    for reason in ["spoofed_ip", "spoofed_mac", "spoofed_arp"] {
        assert_eq!(g.drops.get(reason), Some(&1), "{reason}: {:?}", g.drops);
    }
    let status = d.status().unwrap();
    assert!(status.drops["spoofed_ip"] >= 1);
    // Prometheus has them per guest, with the guest's identity.
    let metrics = d.client().metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tapestry_guest_drops_total{")
                && l.contains("guest=\"vm\"")
                && l.contains("reason=\"spoofed_arp\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("tapestry_guest_ready{guest=\"vm\""),
        "{metrics}"
    );

    // Pod deletion (CNI DEL): the guest and its links go; DEL again is fine.
    let c = d.client();
    c.delete_endpoint("ctr-vm", "eth0").unwrap();
    c.delete_endpoint("ctr-vm", "eth0").unwrap();
    assert!(c.guests().unwrap().is_empty());
    assert!(
        !c.attachments()
            .unwrap()
            .iter()
            .any(|a| a.ifname == vm.host_ifname)
    );
    let leftovers: Vec<_> = std::fs::read_dir(d.bpffs_dir.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("guest-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_restarted_daemon_keeps_its_guests() {
    require_lab!();
    let mut lab = Lab::new("vm-restart").unwrap();
    let be = lab.add_pod("be0").unwrap();
    let vm = lab.add_pod("vm").unwrap();
    let _udp = be.serve_udp_name(5353).unwrap();
    let mut d = Daemon::start("vm-restart", "services: []\n", &[&be.host_ifname]).unwrap();
    register_vm_pod(&d.client(), &vm).expect("endpoint registered");
    let mut guest = TapGuest::open(&vm.netns_path, "tap0").unwrap();
    guest.answer_arp(vm.mac, vm.ip);
    d.kill9().unwrap();
    // No daemon: the cross-connect keeps working.
    guest
        .send(&guest_udp(vm.mac, vm.host_mac, vm.ip, be.ip, 5353))
        .unwrap();
    assert!(
        guest
            .recv_matching(T, |f| udp_payload_from(f, 5353).is_some())
            .is_some()
    );
    d.restart().unwrap();
    let guests = d.client().guests().unwrap();
    assert_eq!(guests.len(), 1, "the guest is restored");
    assert_eq!(guests[0].name, "vm");
    // And the restarted daemon answers its DHCP.
    guest
        .send(&dhcp_frame(vm.mac, MessageType::Discover, None))
        .unwrap();
    assert!(
        guest
            .recv_matching(T, |f| dhcp_reply(f).is_some())
            .is_some()
    );
}
