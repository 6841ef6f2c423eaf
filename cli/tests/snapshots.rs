//! Layout tests: fixed API values rendered as `table` and `wide` are compared with the expected
//! text under tests/snapshots/ (`table` lines fit in 80 columns), and `json` / `yaml` output reads
//! back into the same API values.
//!
//! After a deliberate layout change: `UPDATE_SNAPSHOTS=1 cargo test -p tapestry-cli --test
//! snapshots`, then read the diff of tests/snapshots/ before committing it.

use std::{collections::BTreeMap, path::PathBuf};

use serde::de::DeserializeOwned;
use tapestry_api::types::{
    AttachmentInfo, BackendInfo, ConntrackEntry, FlowRecord, GuestInfo, Identity, MapFill,
    ServiceInfo, Status, Traffic,
};
use tapestry_cli::{
    Format, Render,
    commands::{conntrack, flows, guest, service, status},
    output::text_width,
};

fn snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{name} differs from {}:\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn assert_fits(name: &str, text: &str, width: usize) {
    for line in text.lines() {
        assert!(
            text_width(line) <= width,
            "{name}: a line of {} columns is wider than {width}:\n{line}",
            text_width(line)
        );
    }
}

/// `table` within 80 columns, then both layouts against their snapshots.
fn check_layouts(name: &str, render: impl Fn(Format, &Render) -> String) {
    let table = render(Format::Table, &Render::plain(80));
    assert_fits(name, &table, 80);
    assert!(!table.contains('\x1b'), "no colour without a terminal");
    snapshot(&format!("{name}-table"), &table);
    let wide = render(
        Format::Wide,
        &Render {
            color: false,
            width: None,
        },
    );
    snapshot(&format!("{name}-wide"), &wide);
}

fn round_trip<T: DeserializeOwned + PartialEq + std::fmt::Debug>(
    value: &T,
    render: impl Fn(Format) -> String,
) {
    let json = render(Format::Json);
    assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), value, "{json}");
    let yaml = render(Format::Yaml);
    assert_eq!(&serde_yaml::from_str::<T>(&yaml).unwrap(), value, "{yaml}");
}

fn traffic(packets: u64, bytes: u64, flows: u64) -> Traffic {
    Traffic {
        packets,
        bytes,
        flows,
    }
}

// A fixture row: one argument per column reads best here.
#[allow(clippy::too_many_arguments)]
fn backend(
    id: u32,
    ip: [u8; 4],
    port: u16,
    kind: &str,
    name: Option<&str>,
    node: Option<&str>,
    weight: u16,
    state: &str,
    t: Traffic,
    live: u64,
) -> BackendInfo {
    BackendInfo {
        id,
        ip: ip.into(),
        port,
        weight,
        name: name.map(Into::into),
        kind: kind.parse().unwrap(),
        node: node.map(Into::into),
        state: state.parse().unwrap(),
        traffic: t,
        active_flows: live,
    }
}

fn services() -> Vec<ServiceInfo> {
    vec![
        ServiceInfo {
            name: "dns".into(),
            id: 2,
            vip: [10, 96, 0, 10].into(),
            port: 53,
            protocol: "UDP".parse().unwrap(),
            algorithm: "random".parse().unwrap(),
            session_affinity: "None".parse().unwrap(),
            session_affinity_timeout_seconds: 0,
            active_backends: 1,
            traffic: traffic(240, 15_360, 120),
            active_flows: 3,
            backends: vec![backend(
                3,
                [10, 240, 0, 7],
                5353,
                "pod",
                Some("coredns-5d78c9869d-x7k2p"),
                Some("node-2"),
                1,
                "active",
                traffic(240, 15_360, 120),
                3,
            )],
        },
        ServiceInfo {
            name: "idle".into(),
            id: 3,
            vip: [10, 96, 0, 12].into(),
            port: 8443,
            protocol: "TCP".parse().unwrap(),
            algorithm: "random".parse().unwrap(),
            session_affinity: "None".parse().unwrap(),
            session_affinity_timeout_seconds: 0,
            active_backends: 0,
            traffic: Traffic::default(),
            active_flows: 0,
            backends: vec![],
        },
        ServiceInfo {
            name: "kubernetes".into(),
            id: 5,
            vip: [10, 96, 0, 1].into(),
            port: 443,
            protocol: "TCP".parse().unwrap(),
            algorithm: "random".parse().unwrap(),
            session_affinity: "None".parse().unwrap(),
            session_affinity_timeout_seconds: 0,
            active_backends: 1,
            traffic: traffic(9_210, 4_406_112, 31),
            active_flows: 2,
            // The apiserver: a host address (off every node here, so no node).
            backends: vec![backend(
                6,
                [192, 168, 1, 2],
                6443,
                "host",
                None,
                None,
                1,
                "active",
                traffic(9_210, 4_406_112, 31),
                2,
            )],
        },
        ServiceInfo {
            name: "payments".into(),
            id: 4,
            vip: [10, 96, 0, 13].into(),
            port: 443,
            protocol: "TCP".parse().unwrap(),
            algorithm: "random".parse().unwrap(),
            session_affinity: "None".parse().unwrap(),
            session_affinity_timeout_seconds: 0,
            active_backends: 2,
            traffic: traffic(310, 40_960, 6),
            active_flows: 1,
            backends: vec![
                // A server on node-1's own address (a host-network endpoint).
                backend(
                    7,
                    [192, 168, 1, 10],
                    8443,
                    "host",
                    None,
                    Some("node-1"),
                    1,
                    "active",
                    traffic(120, 10_240, 2),
                    0,
                ),
                // Off the cluster.
                backend(
                    8,
                    [203, 0, 113, 7],
                    443,
                    "external",
                    None,
                    None,
                    1,
                    "active",
                    traffic(190, 30_720, 4),
                    1,
                ),
            ],
        },
        ServiceInfo {
            name: "web".into(),
            id: 1,
            vip: [10, 96, 0, 11].into(),
            port: 80,
            protocol: "TCP".parse().unwrap(),
            algorithm: "maglev".parse().unwrap(),
            session_affinity: "ClientIP".parse().unwrap(),
            session_affinity_timeout_seconds: 10_800,
            active_backends: 2,
            traffic: traffic(1_534_220, 187_236_001, 40_210),
            active_flows: 14,
            backends: vec![
                backend(
                    1,
                    [10, 240, 0, 5],
                    8080,
                    "pod",
                    Some("web-1"),
                    Some("node-2"),
                    1,
                    "active",
                    traffic(812_004, 98_304_112, 20_001),
                    9,
                ),
                backend(
                    2,
                    [10, 240, 0, 6],
                    8080,
                    "vm",
                    Some("web-vm"),
                    Some("node-1"),
                    2,
                    "active",
                    traffic(722_216, 88_931_889, 20_209),
                    5,
                ),
                backend(
                    4,
                    [10, 240, 0, 9],
                    8080,
                    "pod",
                    None,
                    None,
                    1,
                    "terminating",
                    traffic(0, 0, 0),
                    0,
                ),
            ],
        },
    ]
}

fn status_value() -> Status {
    let counters = [
        ("events_lost", 0),
        ("hairpin", 12),
        ("new_flows", 40_330),
        ("packets", 9_875_431),
        ("passed", 8_341_211),
        ("reselected", 2),
        ("reverse_nat", 767_001),
        ("service_packets", 1_534_460),
    ];
    let drops = [
        ("backend_missing", 0),
        ("conntrack_full", 0),
        ("dhcp_queue_full", 0),
        ("malformed", 0),
        ("no_backend", 17),
        ("reject_failed", 0),
        ("rewrite_failed", 0),
        ("spoofed_arp", 1),
        ("spoofed_ip", 3),
        ("spoofed_mac", 0),
        ("unsupported_protocol", 0),
    ];
    let map = |name: &str, entries: u64, max_entries: u64| MapFill {
        name: name.into(),
        entries,
        max_entries,
        pinned: true,
        evicted: None,
    };
    Status {
        version: "0.1.0".into(),
        mode: "standalone".parse().unwrap(),
        source: "file /etc/tapestry/state.yaml".into(),
        generation: 4,
        last_error: Some(
            "services[1].backends[0].port: must be between 1 and 65535, got 0 (line 10, column \
             11)"
            .into(),
        ),
        bpffs_dir: "/sys/fs/bpf/tapestry".into(),
        program_pinned: true,
        attachments: vec![
            AttachmentInfo {
                ifindex: 14,
                ifname: "cali1a2b3c4d5e6".into(),
            },
            AttachmentInfo {
                ifindex: 17,
                ifname: "cali9f8e7d6c5b4".into(),
            },
        ],
        maps: vec![
            map("TAPESTRY_SERVICES", 3, 65_536),
            map("TAPESTRY_BACKENDS", 4, 131_072),
            MapFill {
                evicted: Some(2_322),
                ..map("TAPESTRY_CT", 250_001, 262_144)
            },
            map("TAPESTRY_AFFINITY", 55_000, 65_536),
        ],
        counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        drops: drops.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        services: 3,
        backends: 4,
        flow_events: true,
    }
}

fn guests() -> Vec<GuestInfo> {
    vec![
        GuestInfo {
            name: "web-vm".into(),
            namespace: Some("default".into()),
            container_id: "5f0c3a9e2b7d4c1e8a6f9b0d3c2e1a4f".into(),
            netns: "/var/run/netns/cni-1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6".into(),
            tap: "tap0".into(),
            mac: "0a:58:0a:f0:00:06".parse().unwrap(),
            ip: "10.240.0.6/32".into(),
            mtu: 1450,
            queues: 2,
            phase: "Ready".parse().unwrap(),
            reason: "the guest bound its address by DHCP".into(),
            dhcp_bound: true,
            rx_packets: 722_216,
            rx_bytes: 88_931_889,
            tx_packets: 801_113,
            tx_bytes: 97_001_245,
            dhcp_messages: 4,
            announces: 5,
            drops: BTreeMap::from([("spoofed_arp".into(), 1), ("spoofed_ip".into(), 3)]),
            migration: Some(tapestry_api::types::GuestArrival {
                source_pod: "web-vm-src".into(),
                source_node: Some("node-b".into()),
                live: true,
                switchover: Some("2026-12-03T17:01:02.345678Z".into()),
                blackout_ms: Some(212),
            }),
        },
        GuestInfo {
            name: "win-desktop".into(),
            namespace: Some("vdi".into()),
            container_id: "9a8b7c6d5e4f".into(),
            netns: "/var/run/netns/cni-0f1e2d3c".into(),
            tap: "tap0".into(),
            mac: "0a:58:0a:f0:00:0b".parse().unwrap(),
            ip: "10.240.0.11/32".into(),
            mtu: 1450,
            queues: 1,
            phase: "Attached".parse().unwrap(),
            reason: "no traffic from the guest yet (is the VM running?)".into(),
            dhcp_bound: false,
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 3,
            tx_bytes: 126,
            dhcp_messages: 0,
            announces: 0,
            drops: BTreeMap::new(),
            migration: None,
        },
    ]
}

fn conntrack_entries() -> Vec<ConntrackEntry> {
    let e = |direction: &str,
             protocol: &str,
             src: &str,
             dst: &str,
             nat: &str,
             service: Option<&str>,
             idle: f64,
             age: f64,
             closing: bool,
             hairpin: bool,
             seen_reply: bool| ConntrackEntry {
        direction: direction.parse().unwrap(),
        protocol: protocol.parse().unwrap(),
        src: src.into(),
        dst: dst.into(),
        nat: nat.into(),
        service_id: if service == Some("dns") { 2 } else { 1 },
        service: service.map(Into::into),
        backend_id: if service == Some("dns") { 3 } else { 2 },
        idle_seconds: idle,
        age_seconds: age,
        closing,
        hairpin,
        seen_reply,
    };
    vec![
        e(
            "forward",
            "TCP",
            "10.240.0.3:43210",
            "10.96.0.11:80",
            "10.240.0.6:8080",
            Some("web"),
            0.4,
            192.5,
            false,
            false,
            true,
        ),
        e(
            "reply",
            "TCP",
            "10.240.0.6:8080",
            "10.240.0.3:43210",
            "10.96.0.11:80",
            Some("web"),
            0.4,
            192.5,
            false,
            false,
            true,
        ),
        e(
            "forward",
            "UDP",
            "10.240.0.6:40000",
            "10.96.0.10:53",
            "10.240.0.7:5353",
            Some("dns"),
            12.0,
            12.0,
            false,
            false,
            false,
        ),
        e(
            "forward",
            "TCP",
            "10.240.0.5:51000",
            "10.96.0.11:80",
            "10.240.0.5:8080",
            Some("web"),
            3.0,
            7300.0,
            true,
            true,
            true,
        ),
    ]
}

fn id(kind: &str, name: &str, ns: Option<&str>) -> Option<Identity> {
    Some(Identity {
        kind: kind.parse().unwrap(),
        name: name.into(),
        namespace: ns.map(Into::into),
    })
}

fn flow_records() -> Vec<FlowRecord> {
    let base = FlowRecord {
        seq: 41,
        time: "2025-11-25T19:30:00.123Z".into(),
        unix_ms: 1_764_099_000_123,
        kind: "new".parse().unwrap(),
        verdict: "forwarded".parse().unwrap(),
        protocol: Some("TCP".parse().unwrap()),
        src: "10.240.0.3:43210".into(),
        dst: "10.96.0.11:80".into(),
        backend: Some("10.240.0.6:8080".into()),
        service: Some("web".into()),
        src_identity: id("pod", "client", Some("default")),
        dst_identity: None,
        backend_identity: id("vm", "web-vm", Some("default")),
        src_node: Some("node-1".into()),
        backend_node: Some("node-1".into()),
        src_moved: None,
        backend_moved: None,
        drop_reason: None,
        ifindex: 14,
        service_id: 1,
    };
    vec![
        base.clone(),
        FlowRecord {
            seq: 42,
            time: "2025-11-25T19:30:01.007Z".into(),
            unix_ms: 1_764_099_001_007,
            protocol: Some("UDP".parse().unwrap()),
            src: "10.240.0.6:40000".into(),
            dst: "10.96.0.10:53".into(),
            backend: Some("10.240.0.7:5353".into()),
            service: Some("dns".into()),
            src_identity: id("vm", "web-vm", Some("default")),
            backend_identity: id("pod", "coredns-5d78c9869d-x7k2p", None),
            backend_node: Some("node-2".into()),
            ifindex: 17,
            service_id: 2,
            ..base.clone()
        },
        FlowRecord {
            seq: 43,
            time: "2025-11-25T19:30:02.500Z".into(),
            unix_ms: 1_764_099_002_500,
            kind: "drop".parse().unwrap(),
            verdict: "dropped".parse().unwrap(),
            dst: "10.96.0.12:8443".into(),
            backend: None,
            service: Some("idle".into()),
            backend_identity: None,
            backend_node: None,
            drop_reason: Some("no_backend".into()),
            service_id: 3,
            ..base.clone()
        },
        FlowRecord {
            seq: 44,
            time: "2025-11-25T19:30:03.000Z".into(),
            unix_ms: 1_764_099_003_000,
            kind: "reselected".parse().unwrap(),
            src: "10.240.0.3:43300".into(),
            backend: Some("10.240.0.5:8080".into()),
            backend_identity: id("pod", "web-1", Some("default")),
            backend_node: Some("node-2".into()),
            ..base.clone()
        },
        // A backend that moved to node-3 by live migration.
        FlowRecord {
            seq: 45,
            time: "2025-11-25T19:30:04.250Z".into(),
            unix_ms: 1_764_099_004_250,
            src: "10.240.0.3:43400".into(),
            backend_node: Some("node-3".into()),
            backend_moved: Some(tapestry_api::types::GuestMove {
                from_node: "node-1".into(),
                to_node: "node-3".into(),
                switchover: "2025-11-25T19:29:58.040Z".into(),
                switchover_unix_ms: 1_764_098_998_040,
            }),
            ..base
        },
    ]
}

#[test]
fn status_layout() {
    let st = status_value();
    check_layouts("status", |f, r| status::render(&st, &None, f, r).unwrap());
    let unhealthy = status::render(
        &st,
        &Some("desired state not programmed yet".into()),
        Format::Table,
        &Render::plain(80),
    )
    .unwrap();
    assert!(unhealthy.starts_with("Daemon:       unhealthy: desired state not programmed yet\n"));
    round_trip(&st, |f| {
        status::render(&st, &None, f, &Render::plain(80)).unwrap()
    });
}

#[test]
fn service_list_layout() {
    let s = services();
    check_layouts("service-list", |f, r| service::render(&s, f, r).unwrap());
    round_trip(&s, |f| service::render(&s, f, &Render::plain(80)).unwrap());
    assert_eq!(
        service::render(&[], Format::Table, &Render::plain(80)).unwrap(),
        "No services.\n"
    );
}

#[test]
fn each_backend_shows_its_own_node_and_kind() {
    let s = services();
    let row = |table: &str, backend: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(backend) || l.contains(&format!(" {backend} ")))
            .unwrap_or_else(|| panic!("{backend} in:\n{table}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    let table = service::render(&s, Format::Table, &Render::plain(120)).unwrap();
    // BACKEND ENDPOINT NODE ...
    for (backend, endpoint, node) in [
        ("10.240.0.5:8080", "pod/web-1", "node-2"),
        ("10.240.0.6:8080", "vm/web-vm", "node-1"),
        ("10.240.0.9:8080", "pod", "-"),
        ("192.168.1.2:6443", "host", "-"),
        ("192.168.1.10:8443", "host", "node-1"),
        ("203.0.113.7:443", "external", "-"),
    ] {
        assert_eq!(
            row(&table, backend)[..3],
            [backend, endpoint, node],
            "{table}"
        );
    }
    // ID BACKEND KIND NAME NODE ...
    let wide = service::render(&s, Format::Wide, &Render::plain(200)).unwrap();
    assert_eq!(
        row(&wide, "192.168.1.10:8443")[1..5],
        ["192.168.1.10:8443", "host", "-", "node-1"],
        "{wide}"
    );
    // JSON names the node only where it is known.
    let json: serde_json::Value =
        serde_json::from_str(&service::render(&s, Format::Json, &Render::plain(80)).unwrap())
            .unwrap();
    let payments = json
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "payments")
        .unwrap();
    assert_eq!(payments["backends"][0]["kind"], "host");
    assert_eq!(payments["backends"][0]["node"], "node-1");
    assert_eq!(payments["backends"][1]["kind"], "external");
    assert!(payments["backends"][1].get("node").is_none(), "{payments}");
}

#[test]
fn service_selection_by_name() {
    let web = service::select(services(), Some("web")).unwrap();
    assert_eq!(web.len(), 1);
    let err = service::select(services(), Some("nope"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "no service named \"nope\" on this node (services: dns, idle, kubernetes, payments, web)"
    );
}

#[test]
fn long_names_are_shortened_to_fit_80_columns() {
    let mut s = services();
    let web = s.iter_mut().find(|s| s.name == "web").unwrap();
    web.name = "a-service-with-a-rather-long-name-in-namespace-payments".into();
    web.backends[0].name = Some("web-7d4b9c6f5-x2x9zq-with-an-even-longer-suffix".into());
    web.backends[0].node = Some("worker-node-0042.example.internal".into());
    let table = service::render(&s, Format::Table, &Render::plain(80)).unwrap();
    assert_fits("long names", &table, 80);
    assert!(table.contains('…'), "{table}");
    // Wide never truncates.
    let wide = service::render(
        &s,
        Format::Wide,
        &Render {
            color: false,
            width: Some(80),
        },
    )
    .unwrap();
    for full in [
        "web-7d4b9c6f5-x2x9zq-with-an-even-longer-suffix",
        "worker-node-0042.example.internal",
    ] {
        assert!(wide.contains(full), "{wide}");
    }
    assert!(!wide.contains('…'), "{wide}");
}

#[test]
fn guest_layouts() {
    let g = guests();
    check_layouts("guest-list", |f, r| guest::render_list(&g, f, r).unwrap());
    round_trip(&g, |f| {
        guest::render_list(&g, f, &Render::plain(80)).unwrap()
    });
    check_layouts("guest-show", |f, r| guest::render_one(&g[0], f, r).unwrap());
    round_trip(&g[0], |f| {
        guest::render_one(&g[0], f, &Render::plain(80)).unwrap()
    });
}

#[test]
fn guests_are_found_by_name_namespace_or_container() {
    let g = guests();
    assert_eq!(guest::find(&g, "web-vm").unwrap().name, "web-vm");
    assert_eq!(
        guest::find(&g, "vdi/win-desktop").unwrap().name,
        "win-desktop"
    );
    assert_eq!(guest::find(&g, "9a8b7c6d5e4f").unwrap().name, "win-desktop");
    let err = guest::find(&g, "nope").unwrap_err().to_string();
    assert_eq!(
        err,
        "no guest named \"nope\" on this node (guests: default/web-vm, vdi/win-desktop)"
    );
    let mut twins = g.clone();
    twins[1].name = "web-vm".into();
    let err = guest::find(&twins, "web-vm").unwrap_err().to_string();
    assert!(err.contains("give namespace/name"), "{err}");
}

#[test]
fn conntrack_layout() {
    let c = conntrack_entries();
    check_layouts("conntrack-list", |f, r| {
        conntrack::render(&c, f, r).unwrap()
    });
    round_trip(&c, |f| {
        conntrack::render(&c, f, &Render::plain(80)).unwrap()
    });
}

#[test]
fn flow_lines() {
    let fl = flow_records();
    let lines = |format: Format| -> String {
        fl.iter()
            .map(|f| flows::render_event(f, format, &Render::plain(80), 0).unwrap())
            .collect()
    };
    snapshot("flows-table", &lines(Format::Table));
    snapshot("flows-wide", &lines(Format::Wide));
    // JSON: one object per line; YAML: one document per event.
    let json = lines(Format::Json);
    let back: Vec<FlowRecord> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, fl);
    let yaml = lines(Format::Yaml);
    let back: Vec<FlowRecord> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(back, fl);
}

#[test]
fn flow_filters() {
    let fl = flow_records();
    let resp = tapestry_api::types::FlowsResponse {
        flows: fl.clone(),
        next: 46,
        lost: 0,
    };
    let seqs = |filter: flows::Filter, cutoff: Option<u64>, last: Option<usize>| -> Vec<u64> {
        flows::history(&resp, &filter, cutoff, last)
            .iter()
            .map(|f| f.seq)
            .collect()
    };
    let all = flows::Filter::default();
    assert_eq!(seqs(all.clone(), None, None), [41, 42, 43, 44, 45]);
    assert_eq!(seqs(all.clone(), None, Some(2)), [44, 45]);
    assert_eq!(seqs(all, Some(1_764_099_002_000), None), [43, 44, 45]);
    let f = |service: Option<&str>, guest: Option<&str>, pod: Option<&str>| flows::Filter {
        service: service.map(Into::into),
        guest: guest.map(Into::into),
        pod: pod.map(Into::into),
        ..Default::default()
    };
    assert_eq!(seqs(f(Some("dns"), None, None), None, None), [42]);
    assert_eq!(
        seqs(f(None, Some("web-vm"), None), None, None),
        [41, 42, 45]
    );
    assert_eq!(
        seqs(f(None, Some("default/web-vm"), None), None, None),
        [41, 42, 45]
    );
    assert_eq!(seqs(f(None, None, Some("web-1")), None, None), [44]);
    assert_eq!(
        seqs(f(None, Some("client"), None), None, None),
        Vec::<u64>::new()
    );
    let dropped = flows::Filter {
        verdict: Some(tapestry_api::types::Verdict::Dropped),
        ..Default::default()
    };
    assert_eq!(seqs(dropped, None, None), [43]);
}

#[test]
fn colour_marks_verdicts_and_states() {
    let r = Render {
        color: true,
        width: Some(80),
    };
    let line = flows::render_event(&flow_records()[2], Format::Table, &r, 0).unwrap();
    assert!(line.contains("\x1b[31mDROPPED  \x1b[0m"), "{line:?}");
    let table = service::render(&services(), Format::Table, &r).unwrap();
    assert!(table.contains("\x1b[33mterminating\x1b[0m"), "{table:?}");
    // Colour does not move columns: without the escapes it is the plain table.
    let stripped = strip_ansi(&table);
    assert_eq!(
        stripped,
        service::render(&services(), Format::Table, &Render::plain(80)).unwrap()
    );
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
