//! Live migration on the three-node lab (tapestry_tests::cluster; tapestry_tests::migration plays
//! KubeVirt's part and says how): a real QEMU guest in a VM pod moves between nodes 1 and 2 by
//! QEMU's own migration, ten times, while clients on node 0 use it through its Service and it
//! uses a pod-backed Service itself; then a cancelled migration.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use serde_json::json;
use tapestry_tests::{
    cluster::{Cluster, Plumbing, TargetMark},
    guest::{Guest, GuestConfig, MigrationStatus},
    migration::{BackendWatch, ConnectLoop, StreamClient, Vm},
    poll,
};

const T: Duration = Duration::from_secs(5);
const MIGRATIONS: usize = 10;

/// Lines the guest's own stream to the web VIP has answered so far.
fn guest_stream_lines(guest: &Guest) -> usize {
    let out = guest
        .console("wc -l < /tmp/stream", T)
        .expect("the guest's console");
    out.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("wc -l gave {out:?}"))
}

/// The guest moves node 1 -> 2 -> 1 ... ten times. Throughout: one client on node 0 streams
/// requests over one established connection through the VIP to the guest, a second opens new
/// connections in a loop, and the guest streams over one connection to a pod-backed VIP. Both
/// established connections survive every move; new connections fail at most while QEMU
/// switches over, never after; node 0's daemon never has zero ready backends for the guest's
/// Service; each target stays dark until the switch-over, after which every node routes the
/// guest's address to it (and only to it); each source pod's CNI DEL removes nothing the target
/// owns. Then a migration cancelled halfway leaves the guest serving where it was.
#[test]
fn a_guest_live_migrates_between_nodes_and_keeps_its_connections() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    tapestry_tests::require_qemu!();
    let mut c = Cluster::start("cluster-migrate", 3).unwrap();
    // The clients' node records flow events: `tapestry flows` there shows the guest's moves.
    c.nodes[0].daemon.add_extra_args(&["--flow-events"]);
    c.nodes[0].daemon.restart().unwrap();
    c.install_readiness_gate().unwrap();
    let _kubelet = c.kubelet_readiness().unwrap();

    // Two pod backends behind a Maglev Service: a moved guest's established flow meets no
    // conntrack entry on its new node, and Maglev picks the same backend on every node.
    let web: Vec<_> = [0, 2]
        .iter()
        .map(|n| {
            c.add_pod(*n, &format!("web{n}"), json!({"app": "web"}))
                .unwrap()
        })
        .collect();
    let web_servers: Vec<_> = web
        .iter()
        .map(|w| w.serve_tcp_name(8080).unwrap())
        .collect();
    let client = c.add_pod(0, "client0", json!({"app": "client"})).unwrap();
    let web_vip = c.add_service("web", json!({"app": "web"})).unwrap();
    c.cp.kubectl_ok([
        "annotate",
        "service",
        "web",
        "tapestry.dev/lb-algorithm=maglev",
    ])
    .unwrap();

    // Labelled as KubeVirt labels a virt-launcher pod (its VMI's uid), so that every other
    // target can be marked as KubeVirt marks one, naming no source.
    let labels = json!({"app": "vm", tapestry_k8s::names::kubevirt::CREATED_BY: "vmi-uid-1"});
    let pod = c
        .add_pod_with(1, "vm-0", labels.clone(), Plumbing::AnnotatedVm)
        .unwrap();
    let mut guest = Guest::boot_in(&pod.netns_path, GuestConfig::new("vm", pod.mac)).unwrap();
    guest.wait_ready(Duration::from_secs(180)).unwrap();
    let vm_vip = c.add_service("vm", json!({"app": "vm"})).unwrap();
    c.wait_backends("vm", &[pod.addr(8080)], Duration::from_secs(60))
        .unwrap();
    let mut web_addrs: Vec<_> = web.iter().map(|w| w.addr(8080)).collect();
    web_addrs.sort();
    c.wait_backends("web", &web_addrs, Duration::from_secs(30))
        .unwrap();
    let ip = pod.ip;
    for n in 0..3 {
        assert_eq!(
            c.migration_route(n, ip).unwrap(),
            None,
            "a migration route before any migration"
        );
    }

    // The guest as a client: one connection to the pod-backed VIP, a line every 200 ms.
    guest
        .console(
            &format!("(while :; do echo g; sleep 0.2; done) | nc {web_vip} 80 > /tmp/stream &"),
            T,
        )
        .unwrap();
    poll(T, "the guest's stream answered", || {
        Ok((guest_stream_lines(&guest) >= 3).then_some(()))
    })
    .unwrap();

    let vip = SocketAddrV4::new(vm_vip, 80);
    let stream = StreamClient::start(
        &client,
        vip,
        Duration::from_millis(10),
        Duration::from_secs(20),
    )
    .unwrap();
    let connects = ConnectLoop::start(&client, vip, Duration::from_secs(3)).unwrap();
    let backends = BackendWatch::start(&c.nodes[0].daemon, "vm");

    let mut vm = Vm::new(pod, guest, 1, labels, "vm");
    let mut moves = Vec::new();
    for i in 1..=MIGRATIONS {
        let to = if vm.node == 1 { 2 } else { 1 };
        // Odd moves name their source (tapestry.dev/migration-source), even ones are marked as
        // KubeVirt marks its targets, and the daemon finds the source; the last is such a one.
        let mark = if i % 2 == 0 {
            TargetMark::KubeVirt
        } else {
            TargetMark::Tapestry
        };
        let (moved_vm, moved) = c.migrate_marked(vm, to, &format!("vm-{i}"), mark).unwrap();
        vm = moved_vm;
        eprintln!(
            "migration {i}: node-{} -> node-{}: QEMU total {:?} ms, downtime {:?} ms; live \
             seen {:?} after QEMU completed, routed everywhere {:?} after",
            moved.from,
            moved.to,
            moved.qemu.total_time_ms,
            moved.qemu.downtime_ms,
            moved.live - moved.completed,
            moved.routed - moved.completed
        );
        moves.push(moved);
        // The guest is reached through node `to` only: every other node routes it there.
        c.wait_routed(ip, to, T).unwrap();
    }

    // Both established connections are still the same ones, and alive.
    let before = guest_stream_lines(&vm.guest);
    std::thread::sleep(Duration::from_secs(1));
    let after = guest_stream_lines(&vm.guest);
    assert!(
        after > before,
        "the guest's stream to the web VIP stopped ({before} -> {after} lines)"
    );
    let from_guest: u64 = web_servers
        .iter()
        .filter_map(|s| s.client_ips().get(&std::net::IpAddr::V4(ip)).copied())
        .sum();
    assert_eq!(
        from_guest, 1,
        "the guest's stream reconnected: the web servers saw {from_guest} connections from it"
    );
    let report = stream.stop();
    assert_eq!(
        report.error, None,
        "the client's established connection broke"
    );
    let last_move = moves.last().unwrap();
    assert!(
        report.replies.iter().any(|t| *t > last_move.routed),
        "no reply on the established connection after the last migration"
    );
    assert!(
        report.answers.iter().all(|a| a == "vm"),
        "a reply from something else"
    );

    // New connections failed at most during a switch-over (QEMU's stop-and-copy to the routes
    // being everywhere), never after.
    let attempts = connects.stop();
    let failures: Vec<_> = attempts.iter().filter(|a| a.error.is_some()).collect();
    for f in &failures {
        let during = moves
            .iter()
            .any(|m| f.start >= m.started && f.start <= m.routed + Duration::from_millis(50));
        let nearest = moves
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let rel = if f.start >= m.started {
                    format!("+{:?}", f.start - m.started)
                } else {
                    format!("-{:?}", m.started - f.start)
                };
                format!(
                    "move {}: {rel} from its start (completed +{:?}, routed +{:?})",
                    i + 1,
                    m.completed - m.started,
                    m.routed - m.started
                )
            })
            .collect::<Vec<_>>();
        assert!(
            during,
            "a new connection failed outside any switch-over: {:?}; {nearest:#?}",
            f.error
        );
    }
    eprintln!(
        "new connections: {} attempts, {} failed (all during a switch-over)",
        attempts.len(),
        failures.len()
    );
    let (samples, empty) = backends.stop();
    assert!(samples > 100, "the backend watch took {samples} samples");
    assert!(
        empty.is_empty(),
        "node-0 had no ready backend for the guest's Service at {} of {samples} samples",
        empty.len()
    );
    let mut last_gap = Duration::ZERO;
    for m in &moves {
        let gap = report.longest_gap(m.started, m.routed).unwrap();
        eprintln!(
            "blackout on the established connection: {gap:?} (QEMU downtime {:?} ms)",
            m.qemu.downtime_ms
        );
        last_gap = gap;
    }

    // The Guest records the last move.
    let rec =
        c.cp.kubectl_ok([
            "get",
            "guest",
            &vm.pod.name,
            "-o",
            "jsonpath={.status.migration.sourcePod} {.status.migration.sourceNode} \
             {.status.migration.targetNode} {.status.migration.phase}",
        ])
        .unwrap();
    let from = format!("vm-{}", MIGRATIONS - 1);
    assert_eq!(
        rec.split_whitespace().collect::<Vec<_>>(),
        [
            from.as_str(),
            &c.nodes[last_move.from].name,
            &c.nodes[last_move.to].name,
            "Live"
        ]
    );

    // The target's daemon shows the move (`tapestry guest show`'s source).
    let shown = c.nodes[last_move.to]
        .daemon
        .client()
        .guests()
        .unwrap()
        .into_iter()
        .find(|g| g.name == vm.pod.name)
        .expect("the guest on its node's daemon");
    let arrival = shown
        .migration
        .expect("the guest's migration in the daemon's view");
    assert_eq!(arrival.source_pod, from);
    assert_eq!(
        arrival.source_node.as_deref(),
        Some(c.nodes[last_move.from].name.as_str())
    );
    assert!(arrival.live && arrival.switchover.is_some(), "{arrival:?}");
    // The blackout the target's datapath saw (switch-over to the network's first frame to the
    // guest there) is within the client's: that one also holds QEMU's own downtime.
    let blackout = arrival
        .blackout_ms
        .expect("the target's datapath recorded no blackout");
    let recorded: u64 =
        c.cp.kubectl_ok([
            "get",
            "guest",
            &vm.pod.name,
            "-o",
            "jsonpath={.status.migration.blackoutMs}",
        ])
        .unwrap()
        .trim()
        .parse()
        .expect("the Guest's status.migration.blackoutMs");
    assert_eq!(recorded, blackout, "the Guest and the daemon disagree");
    eprintln!(
        "last move: blackout {blackout} ms as the datapath saw it, {last_gap:?} by the client"
    );
    assert!(
        Duration::from_millis(blackout) <= last_gap + Duration::from_millis(50),
        "the datapath's blackout {blackout} ms is longer than the client's {last_gap:?}"
    );
    assert!(
        shown.announces > 0,
        "no announce counted on the target's tap"
    );

    // `tapestry flows` on the clients' node: a flow to the guest names the node it is on now
    // and its last move, whatever node the flow was balanced to.
    let flows = c.nodes[0].daemon.client().flows(0).unwrap().flows;
    let to_guest: Vec<_> = flows
        .iter()
        .filter(|f| {
            f.backend
                .as_deref()
                .is_some_and(|b| b.starts_with(&format!("{ip}:")))
        })
        .collect();
    assert!(
        !to_guest.is_empty(),
        "no flow event to the guest on node-0 ({} events)",
        flows.len()
    );
    for f in &to_guest {
        let moved = f
            .backend_moved
            .as_ref()
            .expect("the guest's move on its flows");
        assert_eq!(
            (moved.from_node.as_str(), moved.to_node.as_str()),
            (
                c.nodes[last_move.from].name.as_str(),
                c.nodes[last_move.to].name.as_str()
            )
        );
        assert_eq!(
            f.backend_node.as_deref(),
            Some(c.nodes[last_move.to].name.as_str())
        );
    }

    // A cancelled migration: the target never goes live, nothing moves, and deleting the
    // target takes only its own endpoint.
    let here = vm.node;
    let there = if here == 1 { 2 } else { 1 };
    let (target_pod, target) = c
        .add_migration_target(
            there,
            "vm-cancelled",
            vm.labels.clone(),
            &vm.pod.name,
            TargetMark::Tapestry,
            GuestConfig::new(&vm.name, vm.mac),
        )
        .unwrap();
    assert_eq!(target_pod.ip, ip);
    vm.guest.set_migration_speed(64 * 1024).unwrap();
    vm.guest.start_migration(&target).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let info = vm.guest.cancel_migration().unwrap();
    assert_eq!(info.status, MigrationStatus::Cancelled, "{}", info.raw);
    // The target's record may lag its Guest's creation (the daemon retries every 200 ms).
    let phase = poll(T, "the cancelled target's migration record", || {
        c.migration_phase("vm-cancelled")
    })
    .unwrap();
    assert_eq!(phase, "Incoming");
    drop(target);
    c.delete_pod("vm-cancelled").unwrap();
    c.wait_routed(ip, here, T).unwrap();
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(2) {
        let got = client.tcp_request(vip, b"hi\n", T).unwrap();
        assert_eq!(got, "vm");
    }
    c.wait_backends("vm", &[SocketAddrV4::new(ip, 8080)], T)
        .unwrap();
}
