//! In-kernel packet tests of the datapath program with BPF_PROG_TEST_RUN: craft a packet, program
//! the maps through the real reconciler, run the real (verified) program, check the verdict and
//! every byte that comes out, checksums included.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{
    Ethernet2Header, IpNumber, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};
use tapestry_api::state::{self, DesiredState};
use tapestry_common::{
    Counter, DEFAULT_CT_SHARE, DropReason, MAX_CONNTRACK, MAX_CONNTRACK_ANY, config_flags,
};
use tapestry_node_daemon::{
    datapath::{Datapath, LoadOptions, conntrack},
    services::reconcile::Reconciler,
};

mod common;
use common::{Rng, csum_eq, csum_replace2, csum_replace4, prerequisites};

const NEXT: i32 = -1;
/// Rewritten and on along the TCX chain (TCX_NEXT): a program after ours sees the new packet.
const OK: i32 = -1;
const DROP: i32 = 2;
const REDIRECT: i32 = 7;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const CLIENT: [u8; 4] = [10, 0, 0, 1];
const VIP: [u8; 4] = [10, 96, 0, 10];

struct Lb {
    datapath: Datapath,
    reconciler: Reconciler,
    dir: PathBuf,
}

impl Lb {
    fn new(yaml: &str) -> Option<Lb> {
        Self::with_share(yaml, DEFAULT_CT_SHARE)
    }

    /// With a conntrack share of `share` live flows per client (0: none).
    fn with_share(yaml: &str, share: u32) -> Option<Lb> {
        if !prerequisites() {
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/tapestry-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = Datapath::unpin_all(&dir);
        let datapath = Datapath::load_with(
            &dir,
            LoadOptions {
                ct_share: share,
                ..LoadOptions::default()
            },
        )
        .expect("datapath loads and verifies");
        let reconciler = Reconciler::restore(&datapath.maps).unwrap();
        let mut lb = Lb {
            datapath,
            reconciler,
            dir,
        };
        lb.apply(yaml);
        Some(lb)
    }

    fn apply(&mut self, yaml: &str) {
        let desired: Arc<DesiredState> =
            Arc::new(state::parse(yaml, Some(state::Format::Yaml)).unwrap());
        self.reconciler
            .apply(&mut self.datapath.maps, &desired)
            .unwrap();
    }

    /// Through the load balancer: what an endpoint sends (its host veth's ingress).
    fn run(&mut self, packet: &[u8]) -> (i32, Vec<u8>) {
        let prog = self.datapath.program().unwrap();
        Self::test_run(prog, packet)
    }

    /// Through reverse NAT: what reaches an endpoint (its host veth's egress).
    fn run_reply(&mut self, packet: &[u8]) -> (i32, Vec<u8>) {
        let prog = self.datapath.reply_program().unwrap();
        Self::test_run(prog, packet)
    }

    fn test_run(prog: &mut aya::programs::SchedClassifier, packet: &[u8]) -> (i32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value as i32, out)
    }

    fn counter(&self, c: Counter) -> u64 {
        let v = self.datapath.maps.counters.get(&(c as u32), 0).unwrap();
        v.iter().sum()
    }

    fn drops(&self, r: DropReason) -> u64 {
        let v = self.datapath.maps.drops.get(&(r as u32), 0).unwrap();
        v.iter().sum()
    }

    fn flush_conntrack(&mut self) {
        conntrack::flush(&mut self.datapath.maps.conntrack);
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = Datapath::unpin_all(&self.dir);
    }
}

fn tcp_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload: &[u8] = if syn { b"" } else { b"hello" };
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

fn udp_packet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, payload)
        .unwrap();
    v
}

/// What came out, parsed, with every checksum verified.
#[derive(Debug)]
struct Seen {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
}

fn inspect(bytes: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(bytes).expect("valid packet");
    let eth = Ethernet2Header::from_slice(bytes).unwrap().0;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    let hdr = ip.header().to_header();
    assert_eq!(
        hdr.header_checksum,
        hdr.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (sport, dport) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let expected = t.to_header().calc_checksum_ipv4(&hdr, t.payload()).unwrap();
            assert_eq!(t.checksum(), expected, "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let expected = u.to_header().calc_checksum_ipv4(&hdr, u.payload()).unwrap();
                assert_eq!(u.checksum(), expected, "UDP checksum");
            }
            (u.source_port(), u.destination_port())
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Seen {
        src: Ipv4Addr::from(hdr.source),
        dst: Ipv4Addr::from(hdr.destination),
        sport,
        dport,
        eth_src: eth.source,
        eth_dst: eth.destination,
    }
}

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

const ONE_BACKEND: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.0.0.2, port: 8080 }
  - name: dns
    vip: 10.96.0.10
    port: 53
    protocol: UDP
    backends:
      - { ip: 10.0.0.3, port: 5353 }
";

#[test]
fn tcp_to_frontend_is_dnated_and_replies_reverse_nated() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let (v, out) = lb.run(&tcp_packet(CLIENT, 40000, VIP, 80, true));
    assert_eq!(v, OK);
    let s = inspect(&out);
    assert_eq!((s.src, s.sport), (ip(CLIENT), 40000));
    assert_eq!((s.dst, s.dport), (Ipv4Addr::new(10, 0, 0, 2), 8080));

    // A data packet of the same flow (ACK, payload) goes the same way.
    let (v, out) = lb.run(&tcp_packet(CLIENT, 40000, VIP, 80, false));
    assert_eq!(v, OK);
    assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 2));

    // The backend's reply leaves the backend untouched (its node may not be the client's) and is
    // rewritten back to the frontend as it reaches the client.
    let reply = tcp_packet([10, 0, 0, 2], 8080, CLIENT, 40000, false);
    assert_eq!(lb.run(&reply), (NEXT, reply.clone()));
    let (v, out) = lb.run_reply(&reply);
    assert_eq!(v, OK);
    let s = inspect(&out);
    assert_eq!((s.src, s.sport), (ip(VIP), 80));
    assert_eq!((s.dst, s.dport), (ip(CLIENT), 40000));
    assert_eq!(lb.counter(Counter::NewFlows), 1);
    assert_eq!(lb.counter(Counter::ReverseNat), 1);

    // Traffic that is neither for a frontend nor a reply passes untouched, both ways; so does a
    // forward packet reaching the backend (this node did not balance it: no reply entry).
    let other = tcp_packet([10, 0, 0, 2], 8080, CLIENT, 40001, false);
    let (v, out) = lb.run(&other);
    assert_eq!(v, NEXT);
    assert_eq!(out, other);
    assert_eq!(lb.run_reply(&other), (NEXT, other.clone()));
    let to_backend = tcp_packet([10, 0, 9, 9], 40000, [10, 0, 0, 2], 8080, true);
    assert_eq!(lb.run_reply(&to_backend), (NEXT, to_backend.clone()));
    assert_eq!(lb.counter(Counter::ReverseNat), 1);

    // The client, its connection to the frontend gone, reuses the source port for a connection
    // straight to the backend: the same tuple at the backend. Its SYN retires the old reply
    // entry, so the backend's SYN-ACK reaches the client as the backend's, not the frontend's.
    let direct = tcp_packet(CLIENT, 40000, [10, 0, 0, 2], 8080, true);
    assert_eq!(lb.run(&direct), (NEXT, direct.clone()));
    assert_eq!(lb.run_reply(&reply), (NEXT, reply.clone()));
    assert_eq!(lb.counter(Counter::ReverseNat), 1);
}

#[test]
fn udp_to_frontend_is_dnated_and_replies_reverse_nated() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let (v, out) = lb.run(&udp_packet(CLIENT, 5000, VIP, 53, b"query"));
    assert_eq!(v, OK);
    let s = inspect(&out);
    assert_eq!((s.dst, s.dport), (Ipv4Addr::new(10, 0, 0, 3), 5353));
    let (v, out) = lb.run_reply(&udp_packet([10, 0, 0, 3], 5353, CLIENT, 5000, b"answer"));
    assert_eq!(v, OK);
    let s = inspect(&out);
    assert_eq!((s.src, s.sport), (ip(VIP), 53));

    // A UDP checksum of zero means "none" and must stay zero through the rewrite.
    let mut no_csum = udp_packet(CLIENT, 5001, VIP, 53, b"query");
    no_csum[14 + 20 + 6] = 0;
    no_csum[14 + 20 + 7] = 0;
    let (v, out) = lb.run(&no_csum);
    assert_eq!(v, OK);
    assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0]);
    assert_eq!(inspect(&out).dport, 5353);
}

const THREE_BACKENDS: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    algorithm: ALGO
    backends:
      - { ip: 10.0.0.2, port: 8080 }
      - { ip: 10.0.0.3, port: 8080 }
      - { ip: 10.0.0.4, port: 8080 }
";

#[test]
fn conntrack_keeps_every_packet_of_a_flow_on_one_backend() {
    let Some(mut lb) = Lb::new(&THREE_BACKENDS.replace("ALGO", "random")) else {
        return;
    };
    let mut seen = std::collections::HashMap::new();
    for sport in 41000..41060u16 {
        let (_, out) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, true));
        let first = inspect(&out).dst;
        *seen.entry(first).or_insert(0) += 1;
        for _ in 0..5 {
            let (_, out) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, false));
            assert_eq!(inspect(&out).dst, first, "flow {sport} moved");
        }
    }
    // Random selection over 60 flows reaches every backend.
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn maglev_spreads_flows_and_moves_few_when_a_backend_goes() {
    let ten: String = (2..12)
        .map(|i| format!("      - {{ ip: 10.0.1.{i}, port: 8080 }}\n"))
        .collect();
    let yaml = format!(
        "services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    algorithm: maglev\n    backends:\n{ten}"
    );
    let Some(mut lb) = Lb::new(&yaml) else {
        return;
    };
    let flows: Vec<u16> = (20000..22000).collect();
    let mut before = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for &sport in &flows {
        let (_, out) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, true));
        let d = inspect(&out).dst;
        *counts.entry(d).or_insert(0u32) += 1;
        before.push(d);
    }
    assert_eq!(counts.len(), 10);
    for (b, n) in &counts {
        // 200 expected per backend; a fair hash stays well inside this band.
        assert!((130..=270).contains(n), "{b}: {n} of 2000");
    }
    // The same tuple hashes to the same backend with no conntrack at all.
    lb.flush_conntrack();
    let (_, out) = lb.run(&tcp_packet(CLIENT, flows[0], VIP, 80, true));
    assert_eq!(inspect(&out).dst, before[0]);

    // Remove 10.0.1.5; flows of the others must (nearly all) keep their backend.
    let removed = Ipv4Addr::new(10, 0, 1, 5);
    lb.apply(&yaml.replace("      - { ip: 10.0.1.5, port: 8080 }\n", ""));
    lb.flush_conntrack();
    let mut moved = 0;
    let mut kept_candidates = 0;
    for (i, &sport) in flows.iter().enumerate() {
        let (_, out) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, true));
        let d = inspect(&out).dst;
        assert_ne!(d, removed);
        if before[i] != removed {
            kept_candidates += 1;
            if d != before[i] {
                moved += 1;
            }
        }
    }
    assert!(
        moved * 100 < kept_candidates * 5,
        "{moved} of {kept_candidates} unaffected flows moved"
    );
}

#[test]
fn client_ip_affinity_pins_a_client_to_one_backend() {
    let yaml = THREE_BACKENDS.replace("ALGO", "random").replace(
        "    algorithm: random\n",
        "    algorithm: random\n    sessionAffinity: ClientIP\n    sessionAffinityTimeoutSeconds: 60\n",
    );
    let Some(mut lb) = Lb::new(&yaml) else {
        return;
    };
    let mut per_client = Vec::new();
    for client in 1..=6u8 {
        let mut backends = std::collections::HashSet::new();
        for sport in 30000..30020u16 {
            let (_, out) = lb.run(&tcp_packet([10, 0, 2, client], sport, VIP, 80, true));
            backends.insert(inspect(&out).dst);
        }
        assert_eq!(
            backends.len(),
            1,
            "client {client} spread over {backends:?}"
        );
        per_client.push(*backends.iter().next().unwrap());
    }
    // Affinity is per client, not one backend for everyone (6 clients over 3 backends).
    per_client.sort();
    per_client.dedup();
    assert!(per_client.len() > 1);
}

fn icmp_of(out: &[u8]) -> (Ipv4Header, Vec<u8>) {
    let (ip, rest) = Ipv4Header::from_slice(&out[14..]).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    assert_eq!(ip.protocol, IpNumber::ICMP);
    (ip, rest.to_vec())
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn a_service_without_backends_rejects_with_icmp_port_unreachable() {
    let yaml = "
services:
  - name: empty
    vip: 10.96.0.10
    port: 80
  - name: empty-udp
    vip: 10.96.0.10
    port: 53
    protocol: UDP
";
    let Some(mut lb) = Lb::new(yaml) else {
        return;
    };
    // TCP quotes the whole TCP header (a CHECKSUM_PARTIAL skb cannot be cut shorter), UDP the
    // first 8 bytes.
    for (packet, sport, quote) in [
        (tcp_packet(CLIENT, 40000, VIP, 80, true), 40000u16, 40),
        (udp_packet(CLIENT, 5000, VIP, 53, b"query"), 5000, 28),
    ] {
        let (v, out) = lb.run(&packet);
        assert_eq!(v, REDIRECT, "sent back out of the client's interface");
        assert_eq!(&out[0..6], &CLIENT_MAC, "to the client");
        assert_eq!(&out[6..12], &GW_MAC, "from the gateway");
        let (ip4, icmp) = icmp_of(&out);
        assert_eq!(ip4.source, VIP);
        assert_eq!(ip4.destination, CLIENT);
        assert_eq!(icmp.len(), 8 + quote);
        assert_eq!((icmp[0], icmp[1]), (3, 3), "destination/port unreachable");
        assert_eq!(internet_checksum(&icmp), 0, "ICMP checksum");
        // The quote is the original IP header and the start of L4.
        assert_eq!(&icmp[8..8 + quote], &packet[14..14 + quote]);
        assert_eq!(u16::from_be_bytes([icmp[28], icmp[29]]), sport);
    }
    assert_eq!(lb.drops(DropReason::NoBackend), 2);

    // A mid-flow TCP segment (no SYN) is dropped, not answered.
    let (v, _) = lb.run(&tcp_packet(CLIENT, 40001, VIP, 80, false));
    assert_eq!(v, DROP);
    assert_eq!(lb.drops(DropReason::NoBackend), 3);
}

/// IPv4 header bytes with the given options, fragment fields and a correct checksum.
fn ipv4_header(
    total_len: u16,
    id: u16,
    frag: u16,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    options: &[u8],
) -> Vec<u8> {
    let ihl = (20 + options.len()) / 4;
    let mut h = vec![0x40 | ihl as u8, 0];
    h.extend_from_slice(&total_len.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(options);
    let c = internet_checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut e = GW_MAC.to_vec();
    e.extend_from_slice(&CLIENT_MAC);
    e.extend_from_slice(&ethertype.to_be_bytes());
    e[..6].copy_from_slice(&GW_MAC);
    e[6..12].copy_from_slice(&CLIENT_MAC);
    e
}

#[test]
fn malformed_and_foreign_packets_are_never_rewritten_wrongly() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    // Truncated TCP header to a frontend: dropped and counted, never half-rewritten.
    let full = tcp_packet(CLIENT, 40000, VIP, 80, true);
    let (v, _) = lb.run(&full[..14 + 20 + 10]);
    assert_eq!(v, DROP);
    assert_eq!(lb.drops(DropReason::Malformed), 1);
    // A bogus header length (IHL 4), or one claiming more options than the packet holds: not
    // parsable, so not ours. (Packets shorter than an IPv4 header never reach a tc program:
    // BPF_PROG_TEST_RUN refuses them as the stack would.)
    for ihl in [0x44u8, 0x4f] {
        let mut bad = full.clone();
        bad[14] = ihl;
        let (v, out) = lb.run(&bad);
        assert_eq!((v, out), (NEXT, bad));
    }
    // IPv6 and ARP pass untouched.
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(1, 80, 0, 100)
        .write(&mut v6, b"x")
        .unwrap();
    let (v, out) = lb.run(&v6);
    assert_eq!((v, out), (NEXT, v6));
    let mut arp = eth(0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    let (v, out) = lb.run(&arp);
    assert_eq!((v, out), (NEXT, arp));

    // IP options: the L4 header starts after them, and is rewritten there.
    let tcp = &full[34..];
    let mut opts = eth(0x0800);
    opts.extend(ipv4_header(
        (24 + tcp.len()) as u16,
        7,
        0,
        6,
        CLIENT,
        VIP,
        &[1, 1, 1, 0], // NOP, NOP, NOP, EOL
    ));
    opts.extend_from_slice(tcp);
    let (v, out) = lb.run(&opts);
    assert_eq!(v, OK);
    let s = inspect(&out);
    assert_eq!((s.dst, s.dport), (Ipv4Addr::new(10, 0, 0, 2), 8080));
}

#[test]
fn fragments_follow_their_first_fragment() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    // A 40-byte UDP payload split after 16 bytes of it: first fragment carries the UDP header.
    let payload: Vec<u8> = (0..40u8).collect();
    let whole = udp_packet(CLIENT, 5000, VIP, 53, &payload);
    let udp = &whole[34..]; // 8 header + 40 payload
    let (first_part, rest) = udp.split_at(24);
    let mut first = eth(0x0800);
    first.extend(ipv4_header(20 + 24, 99, 0x2000, 17, CLIENT, VIP, &[]));
    first.extend_from_slice(first_part);
    let mut second = eth(0x0800);
    second.extend(ipv4_header(
        (20 + rest.len()) as u16,
        99,
        3,
        17,
        CLIENT,
        VIP,
        &[],
    ));
    second.extend_from_slice(rest);

    let (v, out) = lb.run(&first);
    assert_eq!(v, OK);
    let (h1, l4) = Ipv4Header::from_slice(&out[14..]).unwrap();
    assert_eq!(h1.header_checksum, h1.calc_header_checksum());
    assert_eq!(h1.destination, [10, 0, 0, 3]);
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 5353);

    let (v, out) = lb.run(&second);
    assert_eq!(v, OK);
    let (h2, data) = Ipv4Header::from_slice(&out[14..]).unwrap();
    assert_eq!(h2.header_checksum, h2.calc_header_checksum());
    assert_eq!(h2.destination, [10, 0, 0, 3], "later fragment follows");
    assert_eq!(data, rest, "its payload is untouched");

    // Reassembled, the UDP checksum covers the new destination.
    let mut reassembled = l4[..24].to_vec();
    reassembled.extend_from_slice(data);
    let (hdr, body) = etherparse::UdpHeader::from_slice(&reassembled).unwrap();
    assert_eq!(hdr.destination_port, 5353);
    assert_eq!(
        hdr.checksum,
        hdr.calc_checksum_ipv4_raw(CLIENT, [10, 0, 0, 3], body)
            .unwrap()
    );

    // A later fragment with no first fragment seen is not ours to touch.
    let mut orphan = eth(0x0800);
    orphan.extend(ipv4_header(
        (20 + rest.len()) as u16,
        100,
        3,
        17,
        CLIENT,
        VIP,
        &[],
    ));
    orphan.extend_from_slice(rest);
    let (v, out) = lb.run(&orphan);
    assert_eq!((v, out), (NEXT, orphan));
}

#[test]
fn hairpin_a_backend_reaching_its_own_service() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let me = [10, 0, 0, 2];
    let (v, out) = lb.run(&tcp_packet(me, 45000, VIP, 80, true));
    assert_eq!(v, REDIRECT, "sent straight back to the pod");
    let s = inspect(&out);
    assert_eq!((s.src, s.sport), (Ipv4Addr::new(169, 254, 42, 1), 45000));
    assert_eq!((s.dst, s.dport), (ip(me), 8080));
    assert_eq!((s.eth_src, s.eth_dst), (GW_MAC, CLIENT_MAC));
    // The pod answers the hairpin address; the reply returns as from the frontend.
    let (v, out) = lb.run(&tcp_packet(me, 8080, [169, 254, 42, 1], 45000, false));
    assert_eq!(v, REDIRECT);
    let s = inspect(&out);
    assert_eq!((s.src, s.sport), (ip(VIP), 80));
    assert_eq!((s.dst, s.dport), (ip(me), 45000));
    assert_eq!(lb.counter(Counter::Hairpin), 1);
}

/// Two hairpin flows from one client port to two frontends that share the backend port: the
/// second gets another source port at the backend, so each keeps its own reply entry and its
/// replies come back as from its own frontend, to the client's own port.
#[test]
fn hairpin_flows_from_one_port_to_two_frontends_do_not_share_replies() {
    let two_frontends = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.0.0.2, port: 8080 }
  - name: web-alt
    vip: 10.96.0.11
    port: 81
    backends:
      - { ip: 10.0.0.2, port: 8080 }
";
    let Some(mut lb) = Lb::new(two_frontends) else {
        return;
    };
    let me = [10, 0, 0, 2];
    let hairpin = Ipv4Addr::new(169, 254, 42, 1);
    let vip2 = [10, 96, 0, 11];
    let (v, out) = lb.run(&tcp_packet(me, 45000, VIP, 80, true));
    assert_eq!(v, REDIRECT);
    let first = inspect(&out);
    assert_eq!(
        (first.src, first.sport),
        (hairpin, 45000),
        "the first keeps its port"
    );
    let (v, out) = lb.run(&tcp_packet(me, 45000, vip2, 81, true));
    assert_eq!(v, REDIRECT);
    let second = inspect(&out);
    assert_eq!((second.dst, second.dport), (ip(me), 8080));
    assert_eq!(second.src, hairpin);
    assert_ne!(
        second.sport, 45000,
        "the second is moved off the taken port"
    );
    assert!((32768..=60999).contains(&second.sport), "{second:?}");

    // Later packets of each flow keep their own source port at the backend.
    for (vip, port, expected) in [(VIP, 80, 45000), (vip2, 81, second.sport)] {
        let (_, out) = lb.run(&tcp_packet(me, 45000, vip, port, false));
        assert_eq!(inspect(&out).sport, expected);
    }
    // The pod's replies to each port come back from the right frontend, to its own port.
    for (dport, from) in [(45000, (ip(VIP), 80)), (second.sport, (ip(vip2), 81))] {
        let (v, out) = lb.run(&tcp_packet(me, 8080, hairpin.octets(), dport, false));
        assert_eq!(v, REDIRECT);
        let s = inspect(&out);
        assert_eq!((s.src, s.sport), from, "reply to port {dport}");
        assert_eq!((s.dst, s.dport), (ip(me), 45000), "reply to port {dport}");
    }
    assert_eq!(lb.counter(Counter::Hairpin), 2);
    assert_eq!(lb.drops(DropReason::HairpinPortClash), 0);
}

/// The conntrack share: a client holding its share of live flows has its next new flow dropped
/// and counted, another client is not affected, a flow that closes (RST) gives its place back,
/// and the daemon's recount (conntrack GC) makes the counts exact again.
#[test]
fn a_client_over_its_conntrack_share_opens_no_more_flows() {
    let Some(mut lb) = Lb::with_share(ONE_BACKEND, 3) else {
        return;
    };
    for sport in 40000..40003 {
        let (v, _) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, true));
        assert_eq!(v, OK, "flow {sport} within the share");
    }
    let (v, _) = lb.run(&tcp_packet(CLIENT, 40003, VIP, 80, true));
    assert_eq!(v, DROP, "the fourth flow is over the share");
    assert_eq!(lb.drops(DropReason::ConntrackShare), 1);
    // Established flows of the client go on.
    let (v, _) = lb.run(&tcp_packet(CLIENT, 40000, VIP, 80, false));
    assert_eq!(v, OK);
    // Another client has its own share.
    let (v, _) = lb.run(&tcp_packet([10, 0, 0, 9], 40000, VIP, 80, true));
    assert_eq!(v, OK);
    // One of the client's flows closes (RST): its place is free again.
    let mut rst = tcp_packet(CLIENT, 40001, VIP, 80, false);
    rst[14 + 20 + 13] = 0x14; // RST|ACK
    let (v, _) = lb.run(&rst);
    assert_eq!(v, OK, "the RST itself is delivered");
    let (v, _) = lb.run(&tcp_packet(CLIENT, 40003, VIP, 80, true));
    assert_eq!(v, OK, "a closed flow gave its place back");
    assert_eq!(lb.drops(DropReason::ConntrackShare), 1);
    // The recount: three live flows (40000, 40002, 40003), so still full; once the table is
    // flushed and recounted, the client may open flows again.
    conntrack::collect_garbage(&mut lb.datapath.maps.conntrack);
    let client = u32::from_ne_bytes(CLIENT);
    assert_eq!(
        lb.datapath.maps.conntrack.clients.get(&client, 0).unwrap(),
        3
    );
    let (v, _) = lb.run(&tcp_packet(CLIENT, 40004, VIP, 80, true));
    assert_eq!(v, DROP);
    lb.flush_conntrack();
    conntrack::collect_garbage(&mut lb.datapath.maps.conntrack);
    assert!(lb.datapath.maps.conntrack.clients.get(&client, 0).is_err());
    let (v, _) = lb.run(&tcp_packet(CLIENT, 40004, VIP, 80, true));
    assert_eq!(v, OK);
}

/// A flood of datagrams with random ports, twice the size of every conntrack table, evicts
/// datagram flows only: the TCP connection opened before it keeps its entries (TCP has a table
/// of its own) and stays on its backend. The evictions are counted, per table: the datapath
/// counted every entry it stored (two per flow), so what is not in the table now was evicted;
/// and a flush afterwards is no eviction.
#[test]
fn a_udp_flood_never_evicts_a_tcp_connection() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let (_, out) = lb.run(&tcp_packet(CLIENT, 40000, VIP, 80, true));
    assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 2));
    let tcp_key = |lb: &Lb| {
        lb.datapath
            .maps
            .conntrack
            .tcp
            .iter()
            .filter_map(|r| r.ok())
            .any(|(k, _)| u16::from_be(k.sport) == 40000)
    };
    assert!(tcp_key(&lb));
    let flood = 2 * MAX_CONNTRACK as usize;
    for i in 0..flood {
        let src = [10, 9, (i >> 16) as u8, (i >> 8) as u8];
        let (v, _) = lb.run(&udp_packet(src, 1024 + (i % 60_000) as u16, VIP, 53, b"q"));
        assert_eq!(v, OK);
    }
    let (tcp, any) = lb.datapath.maps.conntrack.counts();
    assert!(
        any > MAX_CONNTRACK_ANY as usize * 9 / 10,
        "the datagram table is full: {any}"
    );
    assert_eq!(tcp, 2, "the connection's two entries, and nothing else");
    assert!(tcp_key(&lb), "the TCP connection's entry survived");
    let udp_flows = lb.counter(Counter::NewFlows) - 1;
    assert_eq!(udp_flows, flood as u64);
    assert_eq!(lb.counter(Counter::ConntrackAnyCreated), 2 * udp_flows);
    assert_eq!(lb.counter(Counter::ConntrackCreated), 2);
    let evicted = lb.datapath.maps.conntrack.evicted((tcp, any)).unwrap();
    assert_eq!(
        evicted,
        (0, 2 * udp_flows - any as u64),
        "{any} entries left"
    );
    assert!(evicted.1 >= 2 * udp_flows - u64::from(MAX_CONNTRACK_ANY));
    lb.flush_conntrack();
    assert_eq!(lb.datapath.maps.conntrack.counts(), (0, 0));
    assert_eq!(
        lb.datapath.maps.conntrack.evicted((0, 0)).unwrap(),
        evicted,
        "flushed entries are not evicted ones"
    );
    // A restarted daemon over these pins keeps counting from there.
    let mut again = Datapath::load(&lb.dir).unwrap();
    again.maps.conntrack.start_accounting().unwrap();
    assert_eq!(again.maps.conntrack.evicted((0, 0)).unwrap(), evicted);
    let (_, out) = lb.run(&tcp_packet(CLIENT, 40000, VIP, 80, false));
    assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(lb.counter(Counter::Reselected), 0);
}

/// A connection closed and opened again from the same client port replaces its two stale
/// entries instead of adding two: nothing counts as created twice, so nothing counts as evicted.
#[test]
fn entries_replaced_in_place_are_neither_created_nor_evicted() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let fin = |lb: &mut Lb| {
        let mut p = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, GW_MAC)
            .ipv4(CLIENT, VIP, 64)
            .tcp(40000, 80, 2000, 64240)
            .fin()
            .ack(1)
            .write(&mut p, &[])
            .unwrap();
        assert_eq!(lb.run(&p).0, OK);
    };
    for _ in 0..3 {
        let (v, _) = lb.run(&tcp_packet(CLIENT, 40000, VIP, 80, true));
        assert_eq!(v, OK);
        fin(&mut lb);
    }
    assert_eq!(lb.counter(Counter::NewFlows), 3, "three connections");
    assert_eq!(
        lb.counter(Counter::ConntrackCreated),
        2,
        "two entries, reused"
    );
    let live = lb.datapath.maps.conntrack.counts();
    assert_eq!(live, (2, 0));
    assert_eq!(lb.datapath.maps.conntrack.evicted(live).unwrap(), (0, 0));
}

/// Tables an earlier datapath filled, with no accounting (entries no counting program stored,
/// all counters zero): the daemon's start counts those entries as there before, so that the
/// evictions of a flood afterwards come out exact, whether they hit the old entries or new ones.
#[test]
fn evictions_over_a_table_filled_before_accounting_are_exact() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let old = 20u64;
    for i in 0..old as u16 {
        let key = tapestry_common::CtKey {
            saddr: u32::from_ne_bytes([10, 8, 0, 1]),
            daddr: u32::from_ne_bytes(VIP),
            sport: (30000 + i).to_be(),
            dport: 53u16.to_be(),
            proto: 17,
            direction: tapestry_common::ct_direction::FORWARD,
            _pad: [0; 2],
        };
        let entry = tapestry_common::CtEntry {
            nat_addr: u32::from_ne_bytes([10, 0, 0, 2]),
            last_seen_ns: tapestry_node_daemon::datapath::monotonic_ns(),
            nat_port: 53u16.to_be(),
            ..Default::default()
        };
        lb.datapath.maps.conntrack.insert(key, entry).unwrap();
    }
    lb.datapath.maps.conntrack.start_accounting().unwrap();
    let flows = u64::from(MAX_CONNTRACK_ANY) / 2 + 5_000;
    for i in 0..flows {
        let src = [10, 7, (i >> 16) as u8, (i >> 8) as u8];
        let (v, _) = lb.run(&udp_packet(src, 1024 + (i % 60_000) as u16, VIP, 53, b"q"));
        assert_eq!(v, OK);
    }
    let live = lb.datapath.maps.conntrack.counts();
    let (_, evicted) = lb.datapath.maps.conntrack.evicted(live).unwrap();
    assert_eq!(evicted, 2 * flows + old - live.1 as u64, "{live:?} live");
    assert!(evicted > 5_000, "{evicted}");
}

#[test]
fn flows_survive_backend_changes_on_purpose() {
    let two = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.0.0.2, port: 8080 }
      - { ip: 10.0.0.3, port: 8080, terminating: TERM }
";
    let Some(mut lb) = Lb::new(&two.replace("TERM", "false")) else {
        return;
    };
    // Find one flow on each backend.
    let mut on = std::collections::HashMap::new();
    for sport in 50000..50100u16 {
        let (_, out) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, true));
        on.entry(inspect(&out).dst).or_insert(sport);
    }
    let a = on[&Ipv4Addr::new(10, 0, 0, 2)];
    let b = on[&Ipv4Addr::new(10, 0, 0, 3)];

    // Terminating: its existing flow stays, no new flow goes there.
    lb.apply(&two.replace("TERM", "true"));
    let (_, out) = lb.run(&tcp_packet(CLIENT, b, VIP, 80, false));
    assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 3));
    for sport in 51000..51050u16 {
        let (_, out) = lb.run(&tcp_packet(CLIENT, sport, VIP, 80, true));
        assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 2));
    }

    // Removed: its live flow is moved to a backend that exists, not black-holed.
    lb.apply(
        "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.0.0.2, port: 8080 }
",
    );
    let (v, out) = lb.run(&tcp_packet(CLIENT, b, VIP, 80, false));
    assert_eq!(v, OK);
    assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(lb.counter(Counter::Reselected), 1);
    // The untouched flow never moved.
    let (_, out) = lb.run(&tcp_packet(CLIENT, a, VIP, 80, false));
    assert_eq!(inspect(&out).dst, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(lb.counter(Counter::Reselected), 1);
}

#[test]
fn per_service_and_backend_counters_count_traffic() {
    let Some(mut lb) = Lb::new(ONE_BACKEND) else {
        return;
    };
    let syn = tcp_packet(CLIENT, 40000, VIP, 80, true);
    let data = tcp_packet(CLIENT, 40000, VIP, 80, false);
    lb.run(&syn);
    lb.run(&data);
    lb.run(&data);
    let (_, svc) = lb
        .reconciler
        .services()
        .find(|(_, s)| lb.reconciler.spec(s).unwrap().name == "web")
        .unwrap();
    let stats = lb.datapath.maps.service_stats.get(&svc.id, 0).unwrap();
    let packets: u64 = stats.iter().map(|s| s.packets).sum();
    let bytes: u64 = stats.iter().map(|s| s.bytes).sum();
    let flows: u64 = stats.iter().map(|s| s.flows).sum();
    assert_eq!(packets, 3);
    assert_eq!(bytes, (syn.len() + 2 * data.len()) as u64);
    assert_eq!(flows, 1);
    let be = lb
        .datapath
        .maps
        .backend_stats
        .get(&svc.backend_ids[0], 0)
        .unwrap();
    assert_eq!(be.iter().map(|s| s.packets).sum::<u64>(), 3);
}

// ---- Differential test: generated packets against a userspace model ----------------------------

const DIFF_SERVICES: &str = "
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { ip: 10.0.0.2, port: 8080 }
      - { ip: 10.0.0.3, port: 8080 }
  - name: dns
    vip: 10.96.0.10
    port: 53
    protocol: UDP
    backends:
      - { ip: 10.0.0.4, port: 5353 }
  - name: empty
    vip: 10.96.0.20
    port: 80
  - name: empty-udp
    vip: 10.96.0.20
    port: 53
    protocol: UDP
";

type Addr = ([u8; 4], u16);
/// (saddr, daddr, sport, dport, proto)
type Tuple = ([u8; 4], [u8; 4], u16, u16, u8);
/// A datagram's fragments: (saddr, daddr, IP id, proto).
type FragmentId = ([u8; 4], [u8; 4], u16, u8);

/// What the model knows: the frontends, and the flows the programs created so far.
#[derive(Default)]
struct Model {
    frontends: std::collections::HashMap<(Addr, u8), Vec<Addr>>,
    /// Forward entries: the client's tuple -> (backend, closing).
    forward: std::collections::HashMap<Tuple, (Addr, bool)>,
    /// Reply entries: the backend's reply tuple -> (frontend, closing).
    reply: std::collections::HashMap<Tuple, (Addr, bool)>,
    /// First fragments rewritten: (saddr, daddr, id, proto) -> their ports.
    fragments: std::collections::HashMap<FragmentId, (u16, u16)>,
}

/// The model's verdict for one packet.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Passed on unchanged.
    Pass,
    Drop,
    /// ICMP port unreachable back to the client.
    Reject,
    /// Destination rewritten to one of these (any, for a new flow).
    Dnat(Vec<Addr>),
    /// Source rewritten to this frontend; `maybe`: the entry may have expired (closing), so
    /// passing unchanged is right too.
    Snat {
        to: Addr,
        maybe: bool,
    },
}

/// A packet as the programs parse it (independently written: offsets by hand).
struct View {
    saddr: [u8; 4],
    daddr: [u8; 4],
    proto: u8,
    ihl: usize,
    id: u16,
    first_fragment: bool,
    later_fragment: bool,
    ports: Option<(u16, u16)>,
    /// The whole L4 header is present.
    has_l4: bool,
    tcp_flags: u8,
}

enum Parse {
    NotOurs,
    Truncated {
        daddr: [u8; 4],
        proto: u8,
        ports: Option<(u16, u16)>,
    },
    Packet(View),
}

fn parse_view(p: &[u8]) -> Parse {
    if p.len() < 14 || p[12..14] != [0x08, 0x00] || p.len() < 34 {
        return Parse::NotOurs;
    }
    let ihl = (p[14] & 0x0f) as usize * 4;
    let proto = p[23];
    if p[14] >> 4 != 4 || ihl < 20 || (proto != 6 && proto != 17) {
        return Parse::NotOurs;
    }
    let frag = u16::from_be_bytes([p[20], p[21]]);
    let a4 = |o: usize| -> [u8; 4] { p[o..o + 4].try_into().unwrap() };
    let mut v = View {
        saddr: a4(26),
        daddr: a4(30),
        proto,
        ihl,
        id: u16::from_be_bytes([p[18], p[19]]),
        first_fragment: frag & 0x1fff == 0 && frag & 0x2000 != 0,
        later_fragment: frag & 0x1fff != 0,
        ports: None,
        has_l4: false,
        tcp_flags: 0,
    };
    if v.later_fragment {
        return Parse::Packet(v);
    }
    let l4 = 14 + ihl;
    if p.len() < l4 + 4 {
        return Parse::Truncated {
            daddr: v.daddr,
            proto,
            ports: None,
        };
    }
    let ports = (
        u16::from_be_bytes([p[l4], p[l4 + 1]]),
        u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]),
    );
    let need = if proto == 6 { 20 } else { 8 };
    if p.len() < l4 + need {
        return Parse::Truncated {
            daddr: v.daddr,
            proto,
            ports: Some(ports),
        };
    }
    v.ports = Some(ports);
    v.has_l4 = true;
    if proto == 6 {
        v.tcp_flags = p[l4 + 13];
    }
    Parse::Packet(v)
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

impl Model {
    fn new(yaml: &str) -> Model {
        let desired = state::parse(yaml, Some(state::Format::Yaml)).unwrap();
        let mut m = Model::default();
        for s in &desired.services {
            let proto = s.protocol.ip_proto();
            let backends = s
                .backends
                .iter()
                .map(|b| (b.ip.octets(), b.target_port(s)))
                .collect();
            m.frontends
                .insert(((s.vip.octets(), s.port), proto), backends);
        }
        m
    }

    /// The ports of `v`, a later fragment's from its first fragment.
    fn ports_of(&self, v: &View) -> Option<(u16, u16)> {
        if v.later_fragment {
            self.fragments
                .get(&(v.saddr, v.daddr, v.id, v.proto))
                .copied()
        } else {
            v.ports
        }
    }

    /// What the endpoint-egress program (tapestry_from_endpoint) must do with `p`.
    fn expect_from_endpoint(&self, p: &[u8]) -> Expect {
        let v = match parse_view(p) {
            Parse::NotOurs => return Expect::Pass,
            Parse::Truncated {
                daddr,
                proto,
                ports: Some((_, dport)),
            } if self.frontends.contains_key(&((daddr, dport), proto)) => {
                return Expect::Drop;
            }
            Parse::Truncated { .. } => return Expect::Pass,
            Parse::Packet(v) => v,
        };
        let Some((sport, dport)) = self.ports_of(&v) else {
            return Expect::Pass;
        };
        let Some(backends) = self.frontends.get(&((v.daddr, dport), v.proto)) else {
            return Expect::Pass;
        };
        let syn = v.proto == 6 && v.tcp_flags & (SYN | ACK) == SYN;
        if backends.is_empty() {
            // The ICMP error is built only for a whole, unfragmented packet without IP options
            // (a quote of fixed size); the rest is dropped.
            let rejectable = v.ihl == 20 && v.has_l4 && !v.first_fragment;
            return if (v.proto == 6 && !syn) || !rejectable {
                Expect::Drop
            } else {
                Expect::Reject
            };
        }
        match self.forward.get(&(v.saddr, v.daddr, sport, dport, v.proto)) {
            Some((b, false)) => Expect::Dnat(vec![*b]),
            _ => Expect::Dnat(backends.clone()),
        }
    }

    /// The model's state after the program handled `p` as `seen` (the backend chosen).
    fn after_from_endpoint(&mut self, p: &[u8], expect: &Expect, chosen: Option<Addr>) {
        let Parse::Packet(v) = parse_view(p) else {
            return;
        };
        let Some((sport, dport)) = self.ports_of(&v) else {
            return;
        };
        let closing = v.tcp_flags & (FIN | RST) != 0;
        let syn = v.proto == 6 && v.tcp_flags & (SYN | ACK) == SYN;
        match (expect, chosen) {
            (Expect::Dnat(_), Some(b)) => {
                let key = (v.saddr, v.daddr, sport, dport, v.proto);
                let old = self.forward.get(&key).copied();
                let rkey = (b.0, v.saddr, b.1, sport, v.proto);
                let frontend = (v.daddr, dport);
                match old {
                    // The flow's entry, touched.
                    Some((o, false)) if o == b => {
                        self.forward.insert(key, (b, closing));
                    }
                    // A closing entry and no SYN, the same backend: touched, or expired and made
                    // anew (by chance on the same backend). The reply entry is as it was, or
                    // fresh: present, or maybe present.
                    Some((o, true)) if o == b && !syn => {
                        self.forward.insert(key, (b, true));
                        self.reply.entry(rkey).or_insert((frontend, true));
                    }
                    // A new flow: both entries fresh.
                    _ => {
                        self.forward.insert(key, (b, closing));
                        self.reply.insert(rkey, (frontend, false));
                    }
                }
                if v.first_fragment {
                    self.fragments
                        .insert((v.saddr, v.daddr, v.id, v.proto), (sport, dport));
                }
            }
            (Expect::Pass, _) if syn => {
                // A new connection straight to an address: a reply entry for that tuple goes.
                self.reply
                    .remove(&(v.daddr, v.saddr, dport, sport, v.proto));
            }
            _ => {}
        }
    }

    /// What the endpoint-ingress program (tapestry_to_endpoint) must do with `p`.
    fn expect_to_endpoint(&self, p: &[u8]) -> Expect {
        let Parse::Packet(v) = parse_view(p) else {
            return Expect::Pass;
        };
        let Some((sport, dport)) = self.ports_of(&v) else {
            return Expect::Pass;
        };
        match self.reply.get(&(v.saddr, v.daddr, sport, dport, v.proto)) {
            Some((to, closing)) => Expect::Snat {
                to: *to,
                maybe: *closing,
            },
            None => Expect::Pass,
        }
    }

    fn after_to_endpoint(&mut self, p: &[u8], rewritten: bool) {
        let Parse::Packet(v) = parse_view(p) else {
            return;
        };
        let Some((sport, dport)) = self.ports_of(&v) else {
            return;
        };
        let key = (v.saddr, v.daddr, sport, dport, v.proto);
        if rewritten {
            if let Some(e) = self.reply.get_mut(&key) {
                e.1 |= v.tcp_flags & (FIN | RST) != 0;
            }
            if v.first_fragment {
                self.fragments
                    .insert((v.saddr, v.daddr, v.id, v.proto), (sport, dport));
            }
        } else {
            // Passed although the model held an entry: it had expired (closing).
            self.reply.remove(&key);
        }
    }
}

/// `p` with its destination (or source) address and port rewritten as the programs do, the
/// checksums updated incrementally: what must come out.
fn rewritten(p: &[u8], dst: bool, to: Addr) -> Vec<u8> {
    let mut out = p.to_vec();
    let Parse::Packet(v) = parse_view(p) else {
        unreachable!("only parsed packets are rewritten")
    };
    let (a_off, port_off) = if dst { (30, 2) } else { (26, 0) };
    let old: [u8; 4] = p[a_off..a_off + 4].try_into().unwrap();
    out[a_off..a_off + 4].copy_from_slice(&to.0);
    let ip_csum = u16::from_be_bytes([p[24], p[25]]);
    out[24..26].copy_from_slice(&csum_replace4(ip_csum, old, to.0).to_be_bytes());
    if v.has_l4 {
        let l4 = 14 + v.ihl;
        let c_off = l4 + if v.proto == 6 { 16 } else { 6 };
        let c = u16::from_be_bytes([p[c_off], p[c_off + 1]]);
        let old_port = u16::from_be_bytes([p[l4 + port_off], p[l4 + port_off + 1]]);
        out[l4 + port_off..l4 + port_off + 2].copy_from_slice(&to.1.to_be_bytes());
        if !(v.proto == 17 && c == 0) {
            let c = csum_replace2(csum_replace4(c, old, to.0), old_port, to.1);
            let c = if v.proto == 17 && c == 0 { 0xffff } else { c };
            out[c_off..c_off + 2].copy_from_slice(&c.to_be_bytes());
        }
    }
    out
}

/// `out` equals `expected`, the checksum fields (IP, L4) compared as one's-complement numbers.
fn same_packet(out: &[u8], expected: &[u8]) -> bool {
    if out.len() != expected.len() {
        return false;
    }
    let mut csums = vec![24];
    if let Parse::Packet(v) = parse_view(expected)
        && v.has_l4
    {
        csums.push(14 + v.ihl + if v.proto == 6 { 16 } else { 6 });
    }
    let mut a = out.to_vec();
    let mut b = expected.to_vec();
    for o in csums {
        let (x, y) = (
            u16::from_be_bytes([a[o], a[o + 1]]),
            u16::from_be_bytes([b[o], b[o + 1]]),
        );
        if !csum_eq(x, y) {
            return false;
        }
        a[o..o + 2].fill(0);
        b[o..o + 2].fill(0);
    }
    a == b
}

/// Internet checksum over `data` (padded to a word), not yet inverted.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 frame by hand: `options` after the 20-byte header (a multiple of 4),
/// `frag` the flags+offset field, `l4` as given (its checksum filled in when `l4_csum` is set
/// and the L4 header is whole).
#[allow(clippy::too_many_arguments)]
fn ipv4_frame(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    options: &[u8],
    id: u16,
    frag: u16,
    mut l4: Vec<u8>,
    l4_csum: bool,
) -> Vec<u8> {
    let ihl = 20 + options.len();
    let total = (ihl + l4.len()) as u16;
    let mut ip = vec![0x40 | (ihl / 4) as u8, 0];
    ip.extend(total.to_be_bytes());
    ip.extend(id.to_be_bytes());
    ip.extend(frag.to_be_bytes());
    ip.extend([64, proto, 0, 0]);
    ip.extend(src);
    ip.extend(dst);
    ip.extend(options);
    let c = fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let c_off = if proto == 6 { 16 } else { 6 };
    if l4_csum && l4.len() >= c_off + 2 && (proto == 6 || proto == 17) {
        l4[c_off..c_off + 2].fill(0);
        let mut pseudo = Vec::new();
        pseudo.extend(src);
        pseudo.extend(dst);
        pseudo.extend([0, proto]);
        pseudo.extend((l4.len() as u16).to_be_bytes());
        let c = fold(sum16(&l4, sum16(&pseudo, 0)));
        let c = if proto == 17 && c == 0 { 0xffff } else { c };
        l4[c_off..c_off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = eth(0x0800);
    f.extend(ip);
    f.extend(l4);
    f
}

fn tcp_l4(rng: &mut Rng, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend((rng.next_u64() as u32).to_be_bytes());
    h.extend((rng.next_u64() as u32).to_be_bytes());
    h.extend([0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    let n = rng.below(120) as usize;
    h.extend(rng.bytes(n));
    h
}

fn udp_l4(rng: &mut Rng, sport: u16, dport: u16) -> Vec<u8> {
    let n = rng.below(120) as usize;
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(((8 + n) as u16).to_be_bytes());
    h.extend([0, 0]);
    h.extend(rng.bytes(n));
    h
}

const CLIENTS: [[u8; 4]; 4] = [[10, 1, 0, 1], [10, 1, 0, 2], [10, 1, 0, 3], [10, 1, 0, 4]];

/// One generated packet from an endpoint, of a kind picked at random.
fn generate_from_endpoint(rng: &mut Rng, m: &Model) -> Vec<u8> {
    let client = *rng.pick(&CLIENTS);
    let sport = 40000 + rng.below(24) as u16;
    let flags = *rng.pick(&[SYN, ACK, ACK | 0x08, FIN | ACK, RST | ACK, SYN | ACK, 0]);
    let frontends: Vec<_> = m.frontends.keys().copied().collect();
    let ((vip, port), proto) = *rng.pick(&frontends);
    let l4 = |rng: &mut Rng, proto: u8, s: u16, d: u16| {
        if proto == 6 {
            tcp_l4(rng, s, d, flags)
        } else {
            udp_l4(rng, s, d)
        }
    };
    match rng.below(100) {
        // Not IPv4: ARP, IPv6 (with a hop-by-hop extension header), LLDP, anything.
        0..=3 => {
            let any = rng.next_u64() as u16 | 0x0600;
            let t = *rng.pick(&[0x0806u16, 0x88cc, 0x9000, any]);
            let mut f = eth(t);
            let n = rng.below(80) as usize;
            f.extend(rng.bytes(n));
            f
        }
        4..=7 => {
            let mut f = eth(0x86dd);
            let mut ext = vec![17, 0, 1, 4, 0, 0, 0, 0];
            ext.extend(udp_l4(rng, sport, 53));
            f.extend([0x60, 0, 0, 0]);
            f.extend((ext.len() as u16).to_be_bytes());
            f.extend([0, 64]);
            f.extend([0xfd; 16]);
            f.extend([0xfe; 16]);
            f.extend(ext);
            f
        }
        // 802.1Q-tagged IPv4 to a frontend (the tag in the frame).
        8..=10 => {
            let inner = ipv4_frame(
                client,
                vip,
                proto,
                &[],
                1,
                0,
                l4(rng, proto, sport, port),
                true,
            );
            let mut f = inner[..12].to_vec();
            f.extend([0x81, 0x00, 0x00, 0x0a]);
            f.extend(&inner[12..]);
            f
        }
        // IPv4, neither TCP nor UDP (ICMP, GRE, SCTP) to a frontend address.
        11..=13 => {
            let p = *rng.pick(&[1u8, 47, 132]);
            let n = 8 + rng.below(60) as usize;
            ipv4_frame(client, vip, p, &[], 1, 0, rng.bytes(n), false)
        }
        // Not IPv4 version 4 or a header length under 20.
        14..=15 => {
            let mut f = ipv4_frame(
                client,
                vip,
                proto,
                &[],
                1,
                0,
                l4(rng, proto, sport, port),
                true,
            );
            f[14] = if rng.chance(50) { 0x65 } else { 0x43 };
            f
        }
        // TCP/UDP to no frontend: straight to a backend, or anywhere.
        16..=30 => {
            let (dst, d) = if rng.chance(50) {
                *rng.pick(&[
                    ([10, 0, 0, 2], 8080u16),
                    ([10, 0, 0, 3], 8080),
                    ([10, 0, 0, 4], 5353),
                ])
            } else {
                (
                    [10, 2, rng.below(255) as u8, 1 + rng.below(250) as u8],
                    rng.next_u64() as u16,
                )
            };
            let p = if d == 5353 { 17 } else { proto };
            ipv4_frame(client, dst, p, &[], 1, 0, l4(rng, p, sport, d), true)
        }
        // Cut short: inside the IPv4 header's options or inside the L4 header.
        31..=37 => {
            let opts = if rng.chance(50) {
                vec![1u8; 4 * (1 + rng.below(10) as usize)]
            } else {
                vec![]
            };
            let mut f = ipv4_frame(
                client,
                vip,
                proto,
                &opts,
                1,
                0,
                l4(rng, proto, sport, port),
                true,
            );
            let l4_off = 14 + 20 + opts.len();
            let hdr = if proto == 6 { 20 } else { 8 };
            let cut = 34 + rng.below((l4_off + hdr - 34) as u64) as usize;
            f.truncate(cut.max(34));
            f
        }
        // Fragments: a first fragment (MF) or a later one, ids from a small pool.
        38..=49 => {
            let id = 100 + rng.below(6) as u16;
            if rng.chance(50) {
                ipv4_frame(
                    client,
                    vip,
                    proto,
                    &[],
                    id,
                    0x2000,
                    l4(rng, proto, sport, port),
                    true,
                )
            } else {
                let off = 1 + rng.below(100) as u16;
                let mf = if rng.chance(50) { 0x2000 } else { 0 };
                let n = 8 + rng.below(100) as usize;
                ipv4_frame(client, vip, proto, &[], id, off | mf, rng.bytes(n), false)
            }
        }
        // To a frontend: IP options, bad checksums, no UDP checksum.
        _ => {
            let opts = if rng.chance(20) {
                let mut o = vec![1u8; 4 * (1 + rng.below(9) as usize)];
                o[0] = 7; // record route: any option kind must be carried, not parsed
                o
            } else {
                vec![]
            };
            let mut f = ipv4_frame(
                client,
                vip,
                proto,
                &opts,
                1,
                0,
                l4(rng, proto, sport, port),
                true,
            );
            let l4_off = 14 + 20 + opts.len();
            if rng.chance(10) {
                f[24] ^= 0x5a; // a wrong IP checksum: the programs neither check nor fix it
            }
            let c_off = l4_off + if proto == 6 { 16 } else { 6 };
            if rng.chance(10) {
                f[c_off + 1] ^= 0xa5;
            } else if proto == 17 && rng.chance(10) {
                f[c_off..c_off + 2].fill(0); // UDP without a checksum
            }
            f
        }
    }
}

/// One generated packet towards an endpoint: mostly replies of the flows the model knows.
fn generate_to_endpoint(rng: &mut Rng, m: &Model) -> Vec<u8> {
    let flags = *rng.pick(&[ACK, ACK | 0x08, SYN | ACK, FIN | ACK, RST]);
    let replies: Vec<_> = m.reply.keys().copied().collect();
    if !replies.is_empty() && rng.chance(75) {
        let (s, d, sp, dp, proto) = *rng.pick(&replies);
        let l4 = if proto == 6 {
            tcp_l4(rng, sp, dp, flags)
        } else {
            udp_l4(rng, sp, dp)
        };
        if rng.chance(10) {
            let mut f = ipv4_frame(s, d, proto, &[], 7, 0, l4, true);
            f.truncate(34 + rng.below(6) as usize);
            return f;
        }
        return ipv4_frame(s, d, proto, &[], 7, 0, l4, true);
    }
    generate_from_endpoint(rng, m)
}

/// Runs `prog` on `packet`; None when the kernel refuses the input (test_run's own checks).
fn try_run(prog: &mut aya::programs::SchedClassifier, packet: &[u8]) -> Option<(i32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .ok()?;
    out.truncate(result.data_size_out as usize);
    Some((result.return_value as i32, out))
}

/// Whether `(verdict, out)` is what `expect` says for `p`; the backend chosen for a DNAT.
fn check(p: &[u8], expect: &Expect, verdict: i32, out: &[u8]) -> Result<Option<Addr>, String> {
    let ok = |c: bool, what: &str| if c { Ok(()) } else { Err(what.to_string()) };
    match expect {
        Expect::Pass => {
            ok(verdict == NEXT, "verdict")?;
            ok(out == p, "changed")?;
            Ok(None)
        }
        Expect::Drop => ok(verdict == DROP, "verdict").map(|_| None),
        Expect::Reject => {
            ok(verdict == REDIRECT, "verdict")?;
            ok(out.len() > 34 && out[23] == 1, "not ICMP")?;
            let ihl = (out[14] & 0x0f) as usize * 4;
            ok(
                out[14 + ihl..14 + ihl + 2] == [3, 3],
                "not port unreachable",
            )?;
            ok(out[30..34] == p[26..30], "not to the client")?;
            Ok(None)
        }
        Expect::Dnat(choices) => {
            ok(verdict == OK, "verdict")?;
            let to = choices
                .iter()
                .find(|b| same_packet(out, &rewritten(p, true, **b)))
                .ok_or("not rewritten to an allowed backend")?;
            Ok(Some(*to))
        }
        Expect::Snat { to, maybe } => {
            ok(verdict == OK, "verdict")?;
            if same_packet(out, &rewritten(p, false, *to)) {
                Ok(Some(*to))
            } else if *maybe && out == p {
                Ok(None)
            } else {
                Err("not reverse-NATed to its frontend".into())
            }
        }
    }
}

/// 75,000 generated packets (valid, truncated, IP options, fragments, bad checksums, VLAN-tagged,
/// IPv6 with an extension header, non-IP, no UDP checksum) through both service programs, each
/// checked, verdict and every byte, against a model of what they must do computed from the same
/// services and the flows seen so far: no mismatch. The guest programs' share is in
/// guest_programs.rs.
#[test]
fn generated_packets_match_the_model_of_both_service_programs() {
    let Some(mut lb) = Lb::new(DIFF_SERVICES) else {
        return;
    };
    let mut model = Model::new(DIFF_SERVICES);
    let mut rng = Rng::new(0x7a9e_57e1);
    let (mut checked, mut refused) = (0u64, 0u64);
    let mut mismatches = Vec::new();
    let mut kinds: std::collections::BTreeMap<&str, u64> = Default::default();
    for i in 0..75_000u32 {
        let reply_side = i % 3 == 2;
        let p = if reply_side {
            generate_to_endpoint(&mut rng, &model)
        } else {
            generate_from_endpoint(&mut rng, &model)
        };
        let expect = if reply_side {
            model.expect_to_endpoint(&p)
        } else {
            model.expect_from_endpoint(&p)
        };
        let prog = if reply_side {
            lb.datapath.reply_program().unwrap()
        } else {
            lb.datapath.program().unwrap()
        };
        let Some((verdict, out)) = try_run(prog, &p) else {
            refused += 1;
            continue;
        };
        checked += 1;
        *kinds
            .entry(match &expect {
                Expect::Pass => "pass",
                Expect::Drop => "drop",
                Expect::Reject => "reject",
                Expect::Dnat(_) => "dnat",
                Expect::Snat { .. } => "reverse_nat",
            })
            .or_default() += 1;
        match check(&p, &expect, verdict, &out) {
            Ok(chosen) => {
                if reply_side {
                    model.after_to_endpoint(&p, chosen.is_some());
                } else {
                    model.after_from_endpoint(&p, &expect, chosen);
                }
            }
            Err(why) => {
                if mismatches.len() < 5 {
                    mismatches.push(format!(
                        "packet {i} ({}): {why}: expected {expect:?}, verdict {verdict}\n in  {p:02x?}\n out {out:02x?}",
                        if reply_side { "to_endpoint" } else { "from_endpoint" }
                    ));
                } else {
                    mismatches.push(String::new());
                }
            }
        }
    }
    eprintln!(
        "differential: {checked} packets checked, {refused} refused by test_run, {} mismatches; {kinds:?}",
        mismatches.len()
    );
    // For `make reliability`'s report.
    eprintln!(
        "RELIABILITY {}",
        serde_json::json!({"differential_service_programs": {
            "packets_checked": checked, "refused_by_test_run": refused,
            "mismatches": mismatches.len(), "verdicts": kinds}})
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // Every kind of verdict was exercised, and enough of each.
    for kind in ["pass", "drop", "reject", "dnat", "reverse_nat"] {
        assert!(
            kinds.get(kind).copied().unwrap_or(0) >= 500,
            "too few {kind}: {kinds:?}"
        );
    }
    assert!(checked >= 74_000, "{checked} checked, {refused} refused");
}

/// A node port answers a pod on one of the node's addresses only while one is programmed: the
/// reconciler turns `config_flags::NODE_ADDRS` on with the first node port and off after the
/// last, so pods' packets to no frontend look at the node's addresses only when that matters.
#[test]
fn a_node_port_answers_pods_on_the_nodes_addresses_while_one_is_programmed() {
    let node_port = "
services:
  - name: web-np
    vip: 0.0.0.0
    port: 30080
    backends:
      - { ip: 10.0.0.9, port: 8080 }
";
    let Some(mut lb) = Lb::new(node_port) else {
        return;
    };
    let node = [192, 0, 2, 77];
    lb.datapath
        .maps
        .node_addrs
        .insert(u32::from_ne_bytes(node), 1, 0)
        .unwrap();
    let flags = |lb: &Lb| lb.datapath.maps.config.get(&0, 0).unwrap().flags;
    assert_ne!(
        flags(&lb) & config_flags::NODE_ADDRS,
        0,
        "on with a node port"
    );
    let (v, out) = lb.run(&tcp_packet(CLIENT, 40000, node, 30080, true));
    assert_eq!(v, OK);
    let s = inspect(&out);
    assert_eq!((s.dst, s.dport), (Ipv4Addr::new(10, 0, 0, 9), 8080));
    // The reply restores the node's address and the node port.
    let (_, out) = lb.run_reply(&tcp_packet([10, 0, 0, 9], 8080, CLIENT, 40000, false));
    let s = inspect(&out);
    assert_eq!((s.src, s.sport), (ip(node), 30080));
    // Another port of the node, and the node port on an address that is not the node's.
    for (dst, port) in [(node, 30081), ([192, 0, 2, 78], 30080)] {
        let (v, out) = lb.run(&tcp_packet(CLIENT, 40001, dst, port, true));
        assert_eq!(v, NEXT);
        assert_eq!(inspect(&out).dst, ip(dst), "untouched");
    }

    lb.apply(ONE_BACKEND);
    assert_eq!(flags(&lb) & config_flags::NODE_ADDRS, 0, "off without one");
    lb.flush_conntrack();
    let (v, out) = lb.run(&tcp_packet(CLIENT, 40002, node, 30080, true));
    assert_eq!(v, NEXT);
    assert_eq!(inspect(&out).dport, 30080, "no node port any more");
}
