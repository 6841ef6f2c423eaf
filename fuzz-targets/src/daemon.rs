//! tapestryd's inputs: guests' DHCP frames, the standalone state file, the endpoint registry
//! file and the local API's request bodies.

use std::net::Ipv4Addr;

use dhcproto::{
    Decodable, Decoder,
    v4::{Message, MessageType, Opcode},
};
use etherparse::{LinkSlice, NetSlice, SlicedPacket, TransportSlice};
use serde::{Serialize, de::DeserializeOwned};
use tapestry_api::{
    state::{self, Format},
    types::{AttachRequest, EndpointGcRequest, EndpointRequest},
};

use crate::dhcp::{self, LeaseConfig, Outcome};

/// The guest's MAC in every seed frame (`corpus/dhcp_answer/`), and the tap's.
pub const GUEST_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x16, 0x00, 0x05];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The leases frames are answered with: a bridge primary's /16 (as dhcp.rs's tests), a routed
/// primary's /32 with an off-link gateway and extra routes, and no gateway at all.
fn leases() -> [LeaseConfig; 3] {
    let bridge = LeaseConfig {
        ip: Ipv4Addr::new(10, 22, 0, 5),
        prefix: 16,
        gateway: Some(Ipv4Addr::new(10, 22, 0, 1)),
        server_ip: Ipv4Addr::new(10, 22, 0, 1),
        mtu: 1450,
        dns_servers: vec![Ipv4Addr::new(10, 96, 0, 10)],
        search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
        domain: None,
        hostname: Some("vm-1".into()),
        routes: vec![],
        lease_seconds: dhcp::DEFAULT_LEASE_SECONDS,
    };
    let routed = LeaseConfig {
        ip: Ipv4Addr::new(192, 168, 77, 10),
        prefix: 32,
        gateway: Some(dhcp::FALLBACK_SERVER_IP),
        server_ip: dhcp::FALLBACK_SERVER_IP,
        mtu: 9000,
        routes: vec![(
            "10.96.0.0/12".parse().expect("a CIDR"),
            dhcp::FALLBACK_SERVER_IP,
        )],
        domain: Some("cluster.local".into()),
        ..bridge.clone()
    };
    let no_gateway = LeaseConfig {
        ip: Ipv4Addr::new(10, 1, 1, 2),
        prefix: 24,
        gateway: None,
        server_ip: dhcp::FALLBACK_SERVER_IP,
        mtu: 576,
        dns_servers: vec![],
        search: vec!["not a domain..".into(), String::new()],
        hostname: None,
        lease_seconds: 1,
        ..bridge.clone()
    };
    [bridge, routed, no_gateway]
}

/// One frame from a guest (Ethernet, IPv4, UDP, BOOTP, as the guest program queues it) through
/// tapestryd's answerer, `guests::dhcp::handle`, under each lease of [`leases`].
///
/// Asserts of every answer: it is an Ethernet/IPv4/UDP frame from the tap's MAC and the
/// server's address, port 67 to 68, to the guest's MAC, broadcast or to the client's own
/// address; a BOOTREPLY with the request's xid and the guest's hardware address; the kind the
/// request calls for (OFFER for DISCOVER, ACK or NAK for REQUEST, ACK for INFORM) and the pod's
/// address in an OFFER or ACK of a lease. `Released` only for RELEASE or DECLINE.
pub fn dhcp_answer(data: &[u8]) {
    for lease in leases() {
        let outcome = dhcp::handle(data, GUEST_MAC, SERVER_MAC, &lease);
        // Decoded here only once handle() answered, i.e. took the message as safe to decode
        // (dhcproto panics on some, which handle() must refuse first).
        let request = match outcome {
            Outcome::Ignored(_) => None,
            _ => decode_dhcp(data).map(|(_, _, m)| m),
        };
        match outcome {
            Outcome::Ignored(_) => {}
            Outcome::Released => {
                let kind = request.as_ref().and_then(|m| m.opts().msg_type());
                assert!(
                    matches!(kind, Some(MessageType::Release | MessageType::Decline)),
                    "Released for a {kind:?}"
                );
            }
            Outcome::Reply { frame, kind } => {
                let req = request
                    .as_ref()
                    .expect("an answer to a frame that is no DHCP message");
                check_reply(req, &frame, kind, &lease);
            }
        }
    }
}

/// The Ethernet destination and source, the IPv4 destination and the DHCP message of a frame.
fn decode_dhcp(frame: &[u8]) -> Option<([u8; 6], Ipv4Addr, Message)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return None;
    };
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        return None;
    };
    let msg = Message::decode(&mut Decoder::new(udp.payload())).ok()?;
    Some((eth.destination(), ip.header().destination_addr(), msg))
}

fn check_reply(req: &Message, frame: &[u8], kind: MessageType, lease: &LeaseConfig) {
    let p = SlicedPacket::from_ethernet(frame).expect("the answer is an Ethernet frame");
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        panic!("the answer is not Ethernet II")
    };
    assert_eq!(
        eth.destination(),
        GUEST_MAC,
        "the answer goes to another MAC"
    );
    assert_eq!(eth.source(), SERVER_MAC);
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("the answer is not IPv4")
    };
    assert_eq!(ip.header().source_addr(), lease.server_ip);
    let dst = ip.header().destination_addr();
    assert!(
        dst == Ipv4Addr::BROADCAST || (dst == req.ciaddr() && kind != MessageType::Nak),
        "the answer goes to {dst}"
    );
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        panic!("the answer is not UDP")
    };
    assert_eq!((udp.source_port(), udp.destination_port()), (67, 68));
    let m = Message::decode(&mut Decoder::new(udp.payload())).expect("the answer decodes");
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), req.xid());
    assert_eq!(m.chaddr().get(..6), Some(&GUEST_MAC[..]));
    assert_eq!(m.opts().msg_type(), Some(kind));
    let asked = req.opts().msg_type();
    let expected: &[MessageType] = match asked {
        Some(MessageType::Discover) => &[MessageType::Offer],
        Some(MessageType::Request) => &[MessageType::Ack, MessageType::Nak],
        Some(MessageType::Inform) => &[MessageType::Ack],
        _ => &[],
    };
    assert!(expected.contains(&kind), "{kind:?} answers {asked:?}");
    match (asked, kind) {
        (_, MessageType::Nak) => assert_eq!(m.yiaddr(), Ipv4Addr::UNSPECIFIED),
        (Some(MessageType::Inform), _) => {}
        _ => assert_eq!(m.yiaddr(), lease.ip, "the offered address is not the pod's"),
    }
}

/// The standalone state file (`tapestry_api::state::parse`, what tapestryd's file source runs on
/// every change) as YAML, as JSON and with the format sniffed.
///
/// Asserts of every accepted state: it is valid, and its YAML and JSON forms read back equal.
pub fn state_file(data: &[u8]) {
    // The source reads the file with read_to_string: not UTF-8 is an I/O error before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for hint in [None, Some(Format::Yaml), Some(Format::Json)] {
        let Ok(s) = state::parse(text, hint) else {
            continue;
        };
        s.validate().expect("a parsed state is valid");
        let yaml = s.to_yaml();
        assert_eq!(
            state::parse(&yaml, Some(Format::Yaml)).ok().as_ref(),
            Some(&s),
            "the state's YAML does not read back equal:\n{yaml}"
        );
        let json = s.to_json();
        assert_eq!(
            state::parse(&json, Some(Format::Json)).ok().as_ref(),
            Some(&s),
            "the state's JSON does not read back equal:\n{json}"
        );
    }
}

/// The endpoint registry file (`<state dir>/endpoints.json`:
/// `{"endpoints": [{"request": EndpointRequest, "slot", "bound"}]}`).
///
/// tapestryd's own reader of the file is private to node-daemon/src/guests/endpoints.rs (and
/// needs the eBPF build); until it has a public entry point this reads the file's documented
/// shape through the public `EndpointRequest` it is made of: the whole file, and entry by entry
/// as the daemon salvages a damaged one. Asserts every entry read writes back equal.
pub fn endpoint_registry(data: &[u8]) {
    #[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
    struct Entry {
        request: EndpointRequest,
        slot: Option<u32>,
        #[serde(default)]
        bound: bool,
    }
    #[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
    struct File {
        endpoints: Vec<Entry>,
    }
    if let Ok(file) = serde_json::from_slice::<File>(data) {
        round_trip(&file);
    }
    if let Ok(serde_json::Value::Object(mut o)) = serde_json::from_slice(data)
        && let Some(serde_json::Value::Array(items)) = o.remove("endpoints")
    {
        for item in items {
            if let Ok(e) = serde_json::from_value::<Entry>(item) {
                round_trip(&e);
            }
        }
    }
}

/// A request body of the local API, decoded as axum's `Json` extractor does (serde_json from
/// the body's bytes) into each type tapestryd takes: `EndpointRequest` (POST /v1/endpoints, CNI
/// ADD), `EndpointGcRequest` (POST /v1/endpoints-gc) and `AttachRequest` (POST
/// /v1/attachments). Asserts every body accepted writes back to an equal value.
///
/// The daemon's checks of an accepted `EndpointRequest` (its guest's lease and MAC) are private
/// to node-daemon/src/guests/endpoints.rs and not reached here.
pub fn api_request(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<EndpointRequest>(data) {
        round_trip(&r);
        if let Some(vm) = &r.vm {
            assert_eq!(vm.guest_mac.to_string().parse().ok(), Some(vm.guest_mac));
        }
    }
    if let Ok(r) = serde_json::from_slice::<EndpointGcRequest>(data) {
        round_trip(&r);
    }
    if let Ok(r) = serde_json::from_slice::<AttachRequest>(data) {
        round_trip(&r);
    }
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let bytes = serde_json::to_vec(value).expect("an accepted value serializes");
    let again: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{value:?} written as {} does not read back: {e}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(&again, value, "written and read back, the value changed");
}
