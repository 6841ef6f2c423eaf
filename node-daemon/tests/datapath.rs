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
use tapestry_common::{Counter, DropReason};
use tapestry_node_daemon::{datapath::Datapath, services::reconcile::Reconciler};

mod common;
use common::prerequisites;

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
        let datapath = Datapath::load(&dir).expect("datapath loads and verifies");
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
        let keys: Vec<_> = self
            .datapath
            .maps
            .conntrack
            .keys()
            .filter_map(|k| k.ok())
            .collect();
        for k in keys {
            let _ = self.datapath.maps.conntrack.remove(&k);
        }
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
    assert_eq!((first.src, first.sport), (hairpin, 45000), "the first keeps its port");
    let (v, out) = lb.run(&tcp_packet(me, 45000, vip2, 81, true));
    assert_eq!(v, REDIRECT);
    let second = inspect(&out);
    assert_eq!((second.dst, second.dport), (ip(me), 8080));
    assert_eq!(second.src, hairpin);
    assert_ne!(second.sport, 45000, "the second is moved off the taken port");
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
