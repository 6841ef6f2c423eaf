//! The `tapestry` CLI against a real tapestryd in a netns lab: what it prints is the lab's real
//! state (services with their VM and pod backends, guests, spoof drops, conntrack, flows as they
//! happen), and its errors have the documented exit codes.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use serde::de::DeserializeOwned;
use tapestry_api::types::{
    ConntrackEntry, EndpointKind, FlowDirection, FlowRecord, GuestInfo, GuestPhase, ServiceInfo,
    Status, Verdict,
};
use tapestry_tests::{
    Lab, Pod,
    daemon::Daemon,
    guest::fmt_mac,
    require_lab,
    tapfd::{TapGuest, register_vm_pod},
};

const T: Duration = Duration::from_secs(3);

fn cli() -> Command {
    let mut c = Command::new(tapestry_tests::daemon::binary("tapestry").unwrap());
    c.env_remove("TAPESTRY_SOCKET")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    c
}

fn run(socket: &Path, args: &[&str]) -> Output {
    cli()
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// Runs a command that must succeed; returns its standard output.
fn ok(socket: &Path, args: &[&str]) -> String {
    let o = run(socket, args);
    assert!(
        o.status.success(),
        "tapestry {args:?} failed ({}):\n{}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn json<T: DeserializeOwned>(socket: &Path, args: &[&str]) -> T {
    let out = ok(socket, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tapestry {args:?}: {e}:\n{out}"))
}

/// The guest answers one UDP request to `port` with `reply`, as a server in the VM would.
fn guest_answers_udp(guest: &mut TapGuest, vm: &Pod, port: u16, reply: &[u8]) -> bool {
    let Some(frame) = guest.recv_matching(T, |f| {
        SlicedPacket::from_ethernet(f).is_ok_and(
            |p| matches!(p.transport, Some(TransportSlice::Udp(u)) if u.destination_port() == port),
        )
    }) else {
        return false;
    };
    let p = SlicedPacket::from_ethernet(&frame).unwrap();
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) = (&p.net, &p.transport) else {
        return false;
    };
    let (client, sport) = (ip.header().source_addr(), u.source_port());
    let mut f = Vec::new();
    PacketBuilder::ethernet2(vm.mac, vm.host_mac)
        .ipv4(vm.ip.octets(), client.octets(), 64)
        .udp(port, sport)
        .write(&mut f, reply)
        .unwrap();
    guest.send(&f).is_ok()
}

fn backend<'a>(
    services: &'a [ServiceInfo],
    svc: &str,
    ip: Ipv4Addr,
) -> &'a tapestry_api::types::BackendInfo {
    services
        .iter()
        .find(|s| s.name == svc)
        .unwrap_or_else(|| panic!("service {svc} listed: {services:?}"))
        .backends
        .iter()
        .find(|b| b.ip == ip)
        .unwrap_or_else(|| panic!("backend {ip} of {svc} listed: {services:?}"))
}

/// Lines of a child's standard output, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Kills the follower on every exit path (our own child, by its handle).
struct Follower(Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_cli_shows_the_labs_real_state() {
    require_lab!();
    let mut lab = Lab::new("cli").unwrap();
    let client = lab.add_pod("client").unwrap();
    let be = lab.add_pod("be0").unwrap();
    let vm = lab.add_pod("vm").unwrap();
    let _tcp = be.serve_tcp_name(8080).unwrap();
    let vip = lab.service_ip(0);
    let state = format!(
        "services:
  - name: web
    vip: {vip}
    port: 80
    backends:
      - {{ ip: {be}, port: 8080, name: be0 }}
  - name: vmdns
    vip: {vip}
    port: 53
    protocol: UDP
    backends:
      - {{ ip: {vmip}, port: 5353, kind: vm, name: vm }}
  - name: empty
    vip: {vip}
    port: 81
    backends: []
",
        be = be.ip,
        vmip = vm.ip,
    );
    let d = Daemon::start_with(
        "cli",
        &state,
        &[&client.host_ifname, &be.host_ifname],
        &["--flow-events"],
    )
    .unwrap();
    let sock = d.socket.as_path();
    register_vm_pod(&d.client(), &vm).expect("endpoint registered");
    let mut guest = TapGuest::open(&vm.netns_path, "tap0").unwrap();
    guest.answer_arp(vm.mac, vm.ip);

    // service list: the desired state, VM and pod backends named, on this node.
    let before: Vec<ServiceInfo> = json(sock, &["service", "list", "-o", "json"]);
    assert_eq!(
        before.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["empty", "vmdns", "web"]
    );
    let b = backend(&before, "web", be.ip);
    assert_eq!(
        (b.kind.as_str(), b.name.as_deref(), b.port),
        ("pod", Some("be0"), 8080)
    );
    let v = backend(&before, "vmdns", vm.ip);
    assert_eq!(
        (v.kind.as_str(), v.name.as_deref(), v.port),
        ("vm", Some("vm"), 5353)
    );
    // Nodes: the state file names none; the VM pod is registered here (the CNI plugin's ADD),
    // so it is on this node; be0's interface is only attached, so its node is not known.
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let node = node.trim();
    assert_eq!(v.node.as_deref(), Some(node), "{v:?}");
    assert_eq!(b.node, None, "{b:?}");

    // Traffic: TCP from the client pod to a pod backend, UDP to the VM guest's server.
    for _ in 0..5 {
        let r = client
            .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
            .unwrap();
        assert_eq!(r, "be0");
    }
    let c = client.clone();
    let asking = std::thread::spawn(move || c.udp_request(SocketAddrV4::new(vip, 53), b"q\n", T));
    assert!(
        guest_answers_udp(&mut guest, &vm, 5353, b"vm\n"),
        "the guest got the request"
    );
    assert_eq!(
        asking.join().unwrap().unwrap(),
        "vm",
        "the guest's answer, from the VIP"
    );

    let after: Vec<ServiceInfo> = json(sock, &["service", "list", "-o", "json"]);
    let (b0, b1) = (
        backend(&before, "web", be.ip),
        backend(&after, "web", be.ip),
    );
    assert!(b1.traffic.packets > b0.traffic.packets, "{b0:?} -> {b1:?}");
    assert!(b1.traffic.flows >= b0.traffic.flows + 5, "{b0:?} -> {b1:?}");
    let (v0, v1) = (
        backend(&before, "vmdns", vm.ip),
        backend(&after, "vmdns", vm.ip),
    );
    assert!(v1.traffic.packets > v0.traffic.packets, "{v0:?} -> {v1:?}");
    assert_eq!(v1.traffic.flows, v0.traffic.flows + 1);
    assert!(v1.active_flows >= 1, "the UDP flow is live: {v1:?}");

    // The table says the same for a person: VM vs pod, the VM on this node, be0's node unknown.
    let table = ok(sock, &["service", "list"]);
    for want in ["pod/be0", "vm/vm", "no backends"] {
        assert!(table.contains(want), "{want:?} in:\n{table}");
    }
    let row = |ip: Ipv4Addr| -> Vec<&str> {
        table
            .lines()
            .find(|l| l.trim_start().starts_with(&ip.to_string()))
            .unwrap_or_else(|| panic!("{ip} in:\n{table}"))
            .split_whitespace()
            .collect()
    };
    assert_eq!(row(vm.ip)[1..3], ["vm/vm", node], "{table}");
    assert_eq!(row(be.ip)[1..3], ["pod/be0", "-"], "{table}");
    let one: Vec<ServiceInfo> = json(sock, &["service", "list", "--service", "web", "-o", "json"]);
    assert_eq!(one.len(), 1);
    let y = ok(sock, &["service", "list", "-o", "yaml"]);
    assert_eq!(
        serde_yaml::from_str::<Vec<ServiceInfo>>(&y).unwrap().len(),
        3
    );

    // Guests: the VM pod, Ready after sending from its own address.
    let guests: Vec<GuestInfo> = json(sock, &["guest", "list", "-o", "json"]);
    assert_eq!(guests.len(), 1, "{guests:?}");
    let g = &guests[0];
    assert_eq!((g.name.as_str(), g.tap.as_str()), ("vm", "tap0"));
    assert_eq!(g.ip, format!("{}/32", vm.ip));
    assert_eq!(g.mac.to_string(), fmt_mac(&vm.mac));
    assert_eq!(g.phase, GuestPhase::Ready, "{g:?}");
    assert!(g.rx_packets >= 1 && g.tx_packets >= 1, "{g:?}");

    // A spoofed frame from the guest: counted by reason in `guest show` and in `status` (drops
    // in the guest programs emit no flow event).
    let spoofed = Ipv4Addr::new(vm.ip.octets()[0], vm.ip.octets()[1], vm.ip.octets()[2], 250);
    let mut f = Vec::new();
    PacketBuilder::ethernet2(vm.mac, vm.host_mac)
        .ipv4(spoofed.octets(), be.ip.octets(), 64)
        .udp(40000, 8080)
        .write(&mut f, b"spoof\n")
        .unwrap();
    guest.send(&f).unwrap();
    let deadline = Instant::now() + T;
    let shown = loop {
        let g: GuestInfo = json(sock, &["guest", "show", "vm", "-o", "json"]);
        if g.drops.get("spoofed_ip") == Some(&1) || Instant::now() > deadline {
            break g;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(shown.drops.get("spoofed_ip"), Some(&1), "{shown:?}");
    let show = ok(sock, &["guest", "show", "default/vm"]);
    assert!(
        show.contains("spoofed_ip") && show.contains("Ready"),
        "{show}"
    );
    let st: Status = json(sock, &["status", "-o", "json"]);
    assert!(st.drops["spoofed_ip"] >= 1, "{:?}", st.drops);
    assert!(st.flow_events);
    let status_table = ok(sock, &["status"]);
    for want in [
        "healthy",
        "spoofed_ip",
        client.host_ifname.as_str(),
        "TAPESTRY_CT",
    ] {
        assert!(status_table.contains(want), "{want:?} in:\n{status_table}");
    }

    // A service datapath drop is a flow event: no backend, refused.
    let err = client
        .tcp_request(SocketAddrV4::new(vip, 81), b"x\n", T)
        .expect_err("no backend");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The daemon drains flow events every 50 ms: poll for up to a second.
    let is_refusal = |f: &FlowRecord| {
        f.service.as_deref() == Some("empty") && f.drop_reason.as_deref() == Some("no_backend")
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    let dropped: Vec<FlowRecord> = loop {
        let d: Vec<FlowRecord> = ok(sock, &["flows", "--verdict", "dropped", "-o", "json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if d.iter().any(is_refusal) || Instant::now() > deadline {
            break d;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(dropped.iter().any(is_refusal), "{dropped:?}");
    assert!(
        dropped.iter().all(|f| f.verdict == Verdict::Dropped),
        "{dropped:?}"
    );
    // The VM's flows carry its identity.
    let vm_flows: Vec<FlowRecord> = ok(sock, &["flows", "--guest", "vm", "-o", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        vm_flows
            .iter()
            .any(|f| f.service.as_deref() == Some("vmdns")
                && f.backend_identity
                    .as_ref()
                    .is_some_and(|i| i.kind == EndpointKind::Vm && i.name == "vm")
                && f.backend_node.as_deref() == Some(node)),
        "{vm_flows:?}"
    );
    let lines = ok(sock, &["flows", "--service", "web"]);
    assert!(
        lines.contains("FORWARDED") && lines.contains("(pod be0)"),
        "{lines}"
    );

    // Conntrack: the live flows, filtered; flush asks, or refuses without a terminal.
    let ct: Vec<ConntrackEntry> = json(
        sock,
        &[
            "conntrack",
            "list",
            "--service",
            "web",
            "-p",
            "tcp",
            "-o",
            "json",
        ],
    );
    assert!(!ct.is_empty() && ct.iter().all(|e| e.service.as_deref() == Some("web")));
    let to_be: Vec<ConntrackEntry> = json(
        sock,
        &[
            "conntrack",
            "list",
            "--dst",
            &format!("{}:8080", be.ip),
            "-o",
            "json",
        ],
    );
    assert!(
        to_be.iter().any(|e| e.direction == FlowDirection::Forward),
        "{to_be:?}"
    );
    let refused = run(sock, &["conntrack", "flush"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("--yes"),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        !d.client().conntrack().unwrap().is_empty(),
        "nothing flushed"
    );
    let flushed = ok(sock, &["conntrack", "flush", "--yes"]);
    assert!(flushed.starts_with("Flushed "), "{flushed}");

    // flows --follow: a connection made now shows within a second.
    let mut child = cli()
        .arg("--socket")
        .arg(sock)
        .args(["flows", "--follow", "--last", "1", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let _follower = Follower(child);
    // --last 1 prints one held event first: the follower is polling from then on.
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the last held event");
    let conn = client.tcp_connect(SocketAddrV4::new(vip, 80), T).unwrap();
    let started = Instant::now();
    let src = conn.local_addr().unwrap().to_string();
    let event = loop {
        let left = Duration::from_secs(1).saturating_sub(started.elapsed());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no event for {src} within 1 s"));
        let f: FlowRecord = serde_json::from_str(&line).unwrap();
        if f.src == src {
            break f;
        }
    };
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(event.service.as_deref(), Some("web"));
    assert_eq!(event.verdict, Verdict::Forwarded);
    assert_eq!(event.backend.as_deref(), Some(&*format!("{}:8080", be.ip)));
    assert_eq!(
        event
            .backend_identity
            .as_ref()
            .map(|i| (i.kind.as_str(), i.name.as_str())),
        Some(("pod", "be0"))
    );
    // The client is on the node that balanced the flow; be0's node is not known.
    assert_eq!(
        (event.src_node.as_deref(), event.backend_node.as_deref()),
        (Some(node), None)
    );
    drop(conn);

    // Errors of a running daemon: unknown names exit 1 and say what exists.
    let o = run(sock, &["service", "list", "--service", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no service named \"nope\""),
        "{}",
        text(&o.stderr)
    );
    assert!(text(&o.stderr).contains("web"), "{}", text(&o.stderr));
    let o = run(sock, &["guest", "show", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("no guest named \"nope\""),
        "{}",
        text(&o.stderr)
    );
    let o = run(sock, &["conntrack", "list", "--service", "nope"]);
    assert_eq!(o.status.code(), Some(1));

    let metrics = ok(sock, &["metrics"]);
    assert!(
        metrics.contains("tapestry_service_flows_total{service=\"web\""),
        "{metrics}"
    );
}

#[test]
fn errors_have_their_exit_codes() {
    let binary = tapestry_tests::daemon::binary("tapestry").unwrap();
    // No daemon: exit 1, the socket named, how to start one.
    let missing =
        std::env::temp_dir().join(format!("tapestry-cli-missing-{}.sock", std::process::id()));
    let o = cli()
        .arg("--socket")
        .arg(&missing)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("tapestryd --state-file"), "{err}");
    // The environment names the socket too.
    let o = cli()
        .env("TAPESTRY_SOCKET", &missing)
        .args(["service", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains(&missing.display().to_string()));

    // Bad flags and values: exit 2 (clap), nothing contacted.
    for args in [
        &["status", "--bogus"][..],
        &["service", "list", "-o", "xml"],
        &["flows", "--verdict", "maybe"],
        &["flows", "--since", "5x"],
        &["conntrack", "list", "--protocol", "icmp"],
        &["guest", "show"],
        &["completion", "tcsh"],
    ] {
        let o = cli().args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o.stderr));
    }

    // Help with examples, named after the program: `kubectl tapestry` as a kubectl plugin.
    let o = cli().args(["flows", "--help"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(
        text(&o.stdout).contains("tapestry flows --follow"),
        "{}",
        text(&o.stdout)
    );
    let plugin = binary.with_file_name("kubectl-tapestry");
    let o = Command::new(&plugin)
        .args(["service", "list", "--help"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let help = text(&o.stdout);
    assert!(
        help.contains("Usage: kubectl tapestry service list"),
        "{help}"
    );
    assert!(
        help.contains("kubectl tapestry service list --service web"),
        "{help}"
    );

    for shell in ["bash", "zsh", "fish"] {
        let o = cli().args(["completion", shell]).output().unwrap();
        assert!(o.status.success() && o.stdout.len() > 500, "{shell}");
        assert!(text(&o.stdout).contains("conntrack"), "{shell}");
    }
}
