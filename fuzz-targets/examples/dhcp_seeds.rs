//! Writes the seed frames of `corpus/dhcp_answer/`, built as node-daemon's DHCP tests build a
//! guest's frame (dhcproto message, etherparse Ethernet/IPv4/UDP 68 -> 67):
//! `cargo run -p tapestry-fuzz-targets --example dhcp_seeds -- fuzz-targets/corpus/dhcp_answer`.

use std::{net::Ipv4Addr, path::PathBuf};

use dhcproto::{
    Encodable, Encoder,
    v4::{DhcpOption, Message, MessageType, OptionCode},
};
use etherparse::PacketBuilder;
use tapestry_fuzz_targets::GUEST_MAC;

fn frame(
    kind: MessageType,
    mac: [u8; 6],
    ciaddr: Ipv4Addr,
    extra: &[DhcpOption],
    src_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0x1234,
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in extra {
        m.opts_mut().insert(o.clone());
    }
    let mut bytes = Vec::new();
    m.encode(&mut Encoder::new(&mut bytes))
        .expect("a message encodes");
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac, [0xff; 6])
        .ipv4(src_ip.octets(), [255; 4], 64)
        .udp(68, 67)
        .write(&mut f, &bytes)
        .expect("a frame builds");
    f
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("the corpus directory"));
    std::fs::create_dir_all(&dir).expect("the corpus directory");
    let none = Ipv4Addr::UNSPECIFIED;
    let pod = Ipv4Addr::new(10, 22, 0, 5);
    let params = DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainSearch,
        OptionCode::ClasslessStaticRoute,
        OptionCode::InterfaceMtu,
    ]);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "discover",
            frame(
                MessageType::Discover,
                GUEST_MAC,
                none,
                std::slice::from_ref(&params),
                none,
            ),
        ),
        (
            "request-selecting",
            frame(
                MessageType::Request,
                GUEST_MAC,
                none,
                &[
                    DhcpOption::RequestedIpAddress(pod),
                    DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 22, 0, 1)),
                    params.clone(),
                ],
                none,
            ),
        ),
        (
            "request-other-ip",
            frame(
                MessageType::Request,
                GUEST_MAC,
                none,
                &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 22, 0, 9))],
                none,
            ),
        ),
        (
            "request-other-server",
            frame(
                MessageType::Request,
                GUEST_MAC,
                none,
                &[
                    DhcpOption::RequestedIpAddress(pod),
                    DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 22, 0, 254)),
                ],
                none,
            ),
        ),
        (
            "request-renewing",
            frame(MessageType::Request, GUEST_MAC, pod, &[], pod),
        ),
        (
            "request-routed",
            frame(
                MessageType::Request,
                GUEST_MAC,
                none,
                &[DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                    192, 168, 77, 10,
                ))],
                none,
            ),
        ),
        (
            "inform",
            frame(MessageType::Inform, GUEST_MAC, pod, &[], pod),
        ),
        (
            "release",
            frame(MessageType::Release, GUEST_MAC, pod, &[], pod),
        ),
        (
            "decline",
            frame(
                MessageType::Decline,
                GUEST_MAC,
                none,
                &[DhcpOption::RequestedIpAddress(pod)],
                none,
            ),
        ),
        (
            "edge-foreign-mac",
            frame(
                MessageType::Discover,
                [0x02, 1, 2, 3, 4, 5],
                none,
                &[],
                none,
            ),
        ),
        (
            "edge-offer-from-guest",
            frame(MessageType::Offer, GUEST_MAC, none, &[], none),
        ),
        ("edge-zeros", vec![0u8; 30]),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("writing a seed");
    }
}
