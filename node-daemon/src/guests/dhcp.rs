//! DHCPv4 for guests: a stock guest gets the pod's address with no agent inside.
//!
//! Why in the daemon and not in eBPF: a DHCP answer carries variable-length options (DNS
//! servers, search domains, classless routes, hostname) that are natural to encode with a DHCP
//! library and painful to build under the verifier, and it happens a few times per guest
//! lifetime, far off the fast path. The guest program hands DHCP frames over through a ring
//! buffer (the tap lets nothing else through before the guest has an address), and the daemon
//! answers on the tap through a send-only packet socket in the pod's namespace.

use std::net::Ipv4Addr;

use dhcproto::{
    Decodable, Decoder, Encodable, Encoder, Name,
    v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode},
};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use ipnet::Ipv4Net;

/// What the guest is offered: the pod's IP configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    /// The server identifier and the source of answers: the gateway, else a link-local address.
    pub server_ip: Ipv4Addr,
    pub mtu: u16,
    pub dns_servers: Vec<Ipv4Addr>,
    pub search: Vec<String>,
    pub domain: Option<String>,
    pub hostname: Option<String>,
    /// Routes beyond the default one.
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    pub lease_seconds: u32,
}

/// The server address used when the pod has no gateway (a /32 without one is unusual).
pub const FALLBACK_SERVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const DEFAULT_LEASE_SECONDS: u32 = 86_400;

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A frame to send to the guest.
    Reply { frame: Vec<u8>, kind: MessageType },
    /// The guest gave its address back.
    Released,
    /// Nothing to answer, and why.
    Ignored(String),
}

/// The options whose length dhcproto 0.15 trusts (a `debug_assert!`, or `len - n` that
/// overflows): (code, smallest length, largest length).
const FIXED_OPTIONS: [(u8, u8, u8); 8] = [
    (80, 0, 0),    // Rapid Commit
    (81, 3, 255),  // Client FQDN: flags and two rcodes before the name
    (94, 3, 3),    // Client Network Interface Identifier
    (151, 1, 255), // Bulk Leasequery status code: the code before the message
    (152, 4, 4),   // Bulk Leasequery base time
    (153, 4, 4),   // start time of state
    (154, 4, 4),   // query start time
    (155, 4, 4),   // query end time
];

/// Walks the options of a BOOTP message (after the 236-byte header and the magic cookie) and
/// refuses one of [`FIXED_OPTIONS`] with a length outside its bounds, which dhcproto would panic
/// on (debug builds) or misread: the guest's bytes must never panic the daemon.
fn check_options(payload: &[u8]) -> Result<(), String> {
    let mut i = 240;
    while i < payload.len() {
        let code = payload[i];
        match code {
            0 => i += 1,
            255 => return Ok(()),
            _ => {
                let Some(&len) = payload.get(i + 1) else {
                    return Ok(()); // cut short: dhcproto reports it
                };
                if let Some((_, lo, hi)) = FIXED_OPTIONS.iter().find(|(c, _, _)| *c == code)
                    && !(*lo..=*hi).contains(&len)
                {
                    return Err(format!("option {code} with length {len}"));
                }
                i += 2 + len as usize;
            }
        }
    }
    Ok(())
}

/// Answers one DHCP frame from the guest (Ethernet, IPv4, UDP, BOOTP).
pub fn handle(frame: &[u8], guest_mac: [u8; 6], server_mac: [u8; 6], cfg: &LeaseConfig) -> Outcome {
    let payload = match SlicedPacket::from_ethernet(frame) {
        Ok(p) => match p.transport {
            Some(TransportSlice::Udp(u)) => u.payload().to_vec(),
            _ => return Outcome::Ignored("not UDP".into()),
        },
        Err(e) => return Outcome::Ignored(format!("malformed frame: {e}")),
    };
    if let Err(why) = check_options(&payload) {
        return Outcome::Ignored(format!("malformed DHCP options: {why}"));
    }
    let msg = match Message::decode(&mut Decoder::new(&payload)) {
        Ok(m) => m,
        Err(e) => return Outcome::Ignored(format!("malformed DHCP message: {e}")),
    };
    if msg.opcode() != Opcode::BootRequest {
        return Outcome::Ignored("not a request".into());
    }
    // `chaddr()` slices the 16-byte field by hlen: a larger hlen (a guest's to choose) panics.
    if msg.hlen() > 16 || msg.chaddr().get(..6) != Some(&guest_mac[..]) {
        return Outcome::Ignored("client hardware address is not the guest's".into());
    }
    let Some(kind) = msg.opts().msg_type() else {
        return Outcome::Ignored("no message type".into());
    };
    let reply_kind = match kind {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                _ => msg.ciaddr(),
            };
            // A REQUEST for another server's offer names that server: not ours to answer.
            if let Some(DhcpOption::ServerIdentifier(id)) =
                msg.opts().get(OptionCode::ServerIdentifier)
                && *id != cfg.server_ip
            {
                return Outcome::Ignored(format!("request for server {id}"));
            }
            if requested == cfg.ip {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        MessageType::Inform => MessageType::Ack,
        MessageType::Release | MessageType::Decline => return Outcome::Released,
        other => return Outcome::Ignored(format!("{other:?} is not for a server")),
    };
    let reply = build_reply(&msg, kind, reply_kind, cfg);
    let mut bytes = Vec::with_capacity(400);
    if let Err(e) = reply.encode(&mut Encoder::new(&mut bytes)) {
        return Outcome::Ignored(format!("encoding the answer: {e}"));
    }
    // Unicast to a client that already has its address (renewal), else broadcast; always to
    // the guest's MAC, the only station on the tap.
    let dst_ip = if msg.ciaddr().is_unspecified() || reply_kind == MessageType::Nak {
        Ipv4Addr::BROADCAST
    } else {
        msg.ciaddr()
    };
    let mut frame = Vec::with_capacity(bytes.len() + 42);
    let written = PacketBuilder::ethernet2(server_mac, guest_mac)
        .ipv4(cfg.server_ip.octets(), dst_ip.octets(), 64)
        .udp(67, 68)
        .write(&mut frame, &bytes);
    if let Err(e) = written {
        return Outcome::Ignored(format!("building the answer frame: {e}"));
    }
    Outcome::Reply {
        frame,
        kind: reply_kind,
    }
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32) as u32)
    };
    Ipv4Addr::from(bits)
}

fn build_reply(
    req: &Message,
    kind: MessageType,
    reply_kind: MessageType,
    cfg: &LeaseConfig,
) -> Message {
    let mut m = Message::new_with_id(
        req.xid(),
        req.ciaddr(),
        Ipv4Addr::UNSPECIFIED,
        cfg.server_ip,
        req.giaddr(),
        req.chaddr(),
    );
    m.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_flags(req.flags());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(reply_kind));
    opts.insert(DhcpOption::ServerIdentifier(cfg.server_ip));
    if reply_kind == MessageType::Nak {
        m.set_flags(Flags::default().set_broadcast());
        return m;
    }
    if kind != MessageType::Inform {
        m.set_yiaddr(cfg.ip);
        let opts = m.opts_mut();
        opts.insert(DhcpOption::AddressLeaseTime(cfg.lease_seconds));
        opts.insert(DhcpOption::Renewal(cfg.lease_seconds / 2));
        opts.insert(DhcpOption::Rebinding(cfg.lease_seconds / 8 * 7));
    }
    let opts = m.opts_mut();
    opts.insert(DhcpOption::SubnetMask(prefix_mask(cfg.prefix)));
    if let Some(gw) = cfg.gateway {
        opts.insert(DhcpOption::Router(vec![gw]));
    }
    let mut routes = cfg.routes.clone();
    let subnet = Ipv4Net::new(cfg.ip, cfg.prefix).map(|n| n.trunc()).ok();
    let gateway_off_link = match (cfg.gateway, subnet) {
        (Some(gw), Some(net)) => !net.contains(&gw),
        _ => false,
    };
    if let Some(gw) = cfg.gateway.filter(|_| gateway_off_link) {
        // A routed primary (Calico style) gives the pod a /32 and a gateway outside it: the
        // guest needs an on-link route to the gateway first (RFC 3442, router 0.0.0.0).
        routes.insert(
            0,
            (Ipv4Net::new(gw, 32).expect("/32"), Ipv4Addr::UNSPECIFIED),
        );
    }
    if !routes.is_empty() {
        // RFC 3442: a client that gets option 121 ignores option 3, so the default route
        // goes in here too.
        if let Some(gw) = cfg.gateway {
            routes.push((Ipv4Net::default(), gw));
        }
        opts.insert(DhcpOption::ClasslessStaticRoute(routes));
    }
    if !cfg.dns_servers.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(cfg.dns_servers.clone()));
    }
    if let Some(d) = &cfg.domain {
        opts.insert(DhcpOption::DomainName(d.clone()));
    }
    let search: Vec<Name> = cfg
        .search
        .iter()
        .filter_map(|s| s.parse::<Name>().ok())
        .collect();
    if !search.is_empty() {
        opts.insert(DhcpOption::DomainSearch(search));
    }
    opts.insert(DhcpOption::InterfaceMtu(cfg.mtu));
    if let Some(h) = &cfg.hostname {
        opts.insert(DhcpOption::Hostname(h.clone()));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x0a, 0x58, 0x0a, 0x16, 0x00, 0x05];
    const SERVER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    fn cfg() -> LeaseConfig {
        LeaseConfig {
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
            lease_seconds: DEFAULT_LEASE_SECONDS,
        }
    }

    fn request_frame(
        kind: MessageType,
        mac: [u8; 6],
        requested: Option<Ipv4Addr>,
        ciaddr: Ipv4Addr,
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
        if let Some(ip) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        let mut bytes = Vec::new();
        m.encode(&mut Encoder::new(&mut bytes)).unwrap();
        let mut f = Vec::new();
        PacketBuilder::ethernet2(mac, [0xff; 6])
            .ipv4([0; 4], [255; 4], 64)
            .udp(68, 67)
            .write(&mut f, &bytes)
            .unwrap();
        f
    }

    fn decode_reply(frame: &[u8]) -> (Ipv4Addr, Message) {
        let p = SlicedPacket::from_ethernet(frame).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!()
        };
        let dst = ip.header().destination_addr();
        let Some(TransportSlice::Udp(u)) = p.transport else {
            panic!()
        };
        assert_eq!((u.source_port(), u.destination_port()), (67, 68));
        (
            dst,
            Message::decode(&mut Decoder::new(u.payload())).unwrap(),
        )
    }

    /// `frame`'s BOOTP message changed by `f`, in a new frame.
    fn with_payload(frame: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut payload = frame[42..].to_vec();
        f(&mut payload);
        let mut out = Vec::new();
        PacketBuilder::ethernet2(GUEST, [0xff; 6])
            .ipv4([0; 4], [255; 4], 64)
            .udp(68, 67)
            .write(&mut out, &payload)
            .unwrap();
        out
    }

    /// What the fuzzer found (fuzz-targets/regressions/dhcp_answer): a guest's bytes that made
    /// the DHCP server panic are ignored with a reason, and a well-formed use of the same
    /// option is still answered.
    #[test]
    fn a_guests_malformed_bootp_is_ignored_never_a_panic() {
        let discover = request_frame(MessageType::Discover, GUEST, None, Ipv4Addr::UNSPECIFIED);
        // hlen (offset 2 of BOOTP) over the 16-byte chaddr field.
        for hlen in [17u8, 154, 255] {
            let f = with_payload(&discover, |p| p[2] = hlen);
            assert!(
                matches!(handle(&f, GUEST, SERVER, &cfg()), Outcome::Ignored(_)),
                "{hlen}"
            );
        }
        // Options right after the magic cookie (offset 240) with a length dhcproto trusts.
        let option = |bytes: &'static [u8]| {
            with_payload(&discover, move |p| {
                p.splice(240..240, bytes.iter().copied());
            })
        };
        for bad in [
            &[152u8, 2, 0, 0][..],
            &[155, 0],
            &[80, 1, 0],
            &[94, 2, 1, 0],
            &[81, 1, 0],
            &[151, 0],
        ] {
            let out = handle(&option(bad), GUEST, SERVER, &cfg());
            assert!(
                matches!(&out, Outcome::Ignored(why) if why.contains("malformed DHCP options")),
                "{bad:?}: {out:?}"
            );
        }
        let out = handle(&option(&[152, 4, 0, 0, 0, 1]), GUEST, SERVER, &cfg());
        assert!(
            matches!(
                out,
                Outcome::Reply {
                    kind: MessageType::Offer,
                    ..
                }
            ),
            "{out:?}"
        );
    }

    #[test]
    fn discover_gets_an_offer_with_the_pods_configuration() {
        let out = handle(
            &request_frame(MessageType::Discover, GUEST, None, Ipv4Addr::UNSPECIFIED),
            GUEST,
            SERVER,
            &cfg(),
        );
        let Outcome::Reply { frame, kind } = out else {
            panic!("{out:?}")
        };
        assert_eq!(kind, MessageType::Offer);
        assert_eq!(&frame[..6], &GUEST);
        let (dst, m) = decode_reply(&frame);
        assert_eq!(dst, Ipv4Addr::BROADCAST);
        assert_eq!(m.xid(), 0x1234);
        assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 22, 0, 5));
        let o = m.opts();
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 0, 0)))
        );
        assert_eq!(
            o.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 22, 0, 1)]))
        );
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1450))
        );
        assert_eq!(
            o.get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("vm-1".into()))
        );
        assert_eq!(
            o.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                10, 96, 0, 10
            )]))
        );
        assert!(
            matches!(o.get(OptionCode::DomainSearch), Some(DhcpOption::DomainSearch(v)) if v.len() == 2)
        );
        assert_eq!(
            o.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 22, 0, 1)))
        );
    }

    #[test]
    fn request_for_the_pod_ip_is_acked_and_any_other_is_naked() {
        let ok = handle(
            &request_frame(
                MessageType::Request,
                GUEST,
                Some(Ipv4Addr::new(10, 22, 0, 5)),
                Ipv4Addr::UNSPECIFIED,
            ),
            GUEST,
            SERVER,
            &cfg(),
        );
        assert!(
            matches!(
                ok,
                Outcome::Reply {
                    kind: MessageType::Ack,
                    ..
                }
            ),
            "{ok:?}"
        );
        let bad = handle(
            &request_frame(
                MessageType::Request,
                GUEST,
                Some(Ipv4Addr::new(10, 22, 0, 9)),
                Ipv4Addr::UNSPECIFIED,
            ),
            GUEST,
            SERVER,
            &cfg(),
        );
        let Outcome::Reply {
            frame,
            kind: MessageType::Nak,
        } = bad
        else {
            panic!("{bad:?}")
        };
        assert_eq!(decode_reply(&frame).1.yiaddr(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn renewal_is_unicast_to_the_client() {
        let ip = Ipv4Addr::new(10, 22, 0, 5);
        let out = handle(
            &request_frame(MessageType::Request, GUEST, None, ip),
            GUEST,
            SERVER,
            &cfg(),
        );
        let Outcome::Reply {
            frame,
            kind: MessageType::Ack,
        } = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(decode_reply(&frame).0, ip);
    }

    #[test]
    fn classless_routes_carry_the_default_route_too() {
        let mut c = cfg();
        c.routes = vec![("10.96.0.0/12".parse().unwrap(), Ipv4Addr::new(10, 22, 0, 1))];
        let out = handle(
            &request_frame(MessageType::Discover, GUEST, None, Ipv4Addr::UNSPECIFIED),
            GUEST,
            SERVER,
            &c,
        );
        let Outcome::Reply { frame, .. } = out else {
            panic!()
        };
        let m = decode_reply(&frame).1;
        let Some(DhcpOption::ClasslessStaticRoute(r)) =
            m.opts().get(OptionCode::ClasslessStaticRoute)
        else {
            panic!()
        };
        assert_eq!(r.len(), 2);
        assert!(r.iter().any(|(net, _)| net.prefix_len() == 0));
    }

    #[test]
    fn a_gateway_outside_a_slash_32_gets_an_on_link_route() {
        let mut c = cfg();
        c.prefix = 32;
        c.gateway = Some(Ipv4Addr::new(169, 254, 1, 1));
        let out = handle(
            &request_frame(MessageType::Discover, GUEST, None, Ipv4Addr::UNSPECIFIED),
            GUEST,
            SERVER,
            &c,
        );
        let Outcome::Reply { frame, .. } = out else {
            panic!()
        };
        let m = decode_reply(&frame).1;
        let Some(DhcpOption::ClasslessStaticRoute(r)) =
            m.opts().get(OptionCode::ClasslessStaticRoute)
        else {
            panic!("no routes")
        };
        assert_eq!(
            r[0],
            ("169.254.1.1/32".parse().unwrap(), Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!(r[1], (Ipv4Net::default(), Ipv4Addr::new(169, 254, 1, 1)));
    }

    #[test]
    fn release_foreign_clients_and_garbage() {
        assert_eq!(
            handle(
                &request_frame(
                    MessageType::Release,
                    GUEST,
                    None,
                    Ipv4Addr::new(10, 22, 0, 5)
                ),
                GUEST,
                SERVER,
                &cfg()
            ),
            Outcome::Released
        );
        let other = [0x02, 1, 2, 3, 4, 5];
        assert!(matches!(
            handle(
                &request_frame(MessageType::Discover, other, None, Ipv4Addr::UNSPECIFIED),
                GUEST,
                SERVER,
                &cfg()
            ),
            Outcome::Ignored(_)
        ));
        assert!(matches!(
            handle(&[0u8; 30], GUEST, SERVER, &cfg()),
            Outcome::Ignored(_)
        ));
    }
}
