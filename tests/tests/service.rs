//! Service load balancing through real network namespaces: real TCP and UDP clients reach
//! backends in other pods through a VIP programmed by a real tapestryd from a state file.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tapestry_tests::{Lab, Pod, daemon::Daemon, require_lab};

const T: Duration = Duration::from_secs(3);

struct Setup {
    lab: Lab,
    client: Pod,
    backends: Vec<Pod>,
    vip: Ipv4Addr,
    _servers: Vec<tapestry_tests::ServerHandle>,
}

/// A client pod and `n` backend pods, each backend serving its name on TCP 8080 and UDP 5353.
fn setup(name: &str, n: usize) -> Setup {
    let mut lab = Lab::new(name).unwrap();
    let client = lab.add_pod("client").unwrap();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for i in 0..n {
        let b = lab.add_pod(&format!("be{i}")).unwrap();
        servers.push(b.serve_tcp_name(8080).unwrap());
        servers.push(b.serve_udp_name(5353).unwrap());
        backends.push(b);
    }
    let vip = lab.service_ip(0);
    Setup {
        lab,
        client,
        backends,
        vip,
        _servers: servers,
    }
}

impl Setup {
    fn interfaces(&self) -> Vec<&str> {
        self.lab
            .pods()
            .iter()
            .map(|p| p.host_ifname.as_str())
            .collect()
    }

    fn state(&self, backends: &[&Pod], extra: &str) -> String {
        let list = |port: u16| -> String {
            backends
                .iter()
                .map(|b| {
                    format!(
                        "      - {{ ip: {}, port: {port}, name: {} }}\n",
                        b.ip, b.name
                    )
                })
                .collect()
        };
        format!(
            "services:\n  - name: web\n    vip: {vip}\n    port: 80\n{extra}    backends:\n{tcp}\
             \n  - name: dns\n    vip: {vip}\n    port: 53\n    protocol: UDP\n    backends:\n{udp}",
            vip = self.vip,
            tcp = list(8080),
            udp = list(5353),
        )
        .replace("\n\n", "\n")
    }

    fn tcp(&self) -> std::io::Result<String> {
        self.client
            .tcp_request(SocketAddrV4::new(self.vip, 80), b"hello\n", T)
    }

    fn tally(&self, n: usize) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for _ in 0..n {
            *m.entry(self.tcp().expect("request through the VIP"))
                .or_default() += 1;
        }
        m
    }
}

#[test]
fn tcp_and_udp_clients_reach_every_backend_through_the_vip() {
    require_lab!();
    let d = reach_every_backend("lb-tcp-udp", &[]);
    assert_eq!(
        datapath_event(&d, "fast_path"),
        0,
        "the fast path is off by default"
    );
}

/// The same with `--fast-path`: every packet of the flows, both ways, is delivered by the
/// programs themselves (into the backend's and the client's namespace), counted as fast_path.
#[test]
fn tcp_and_udp_clients_reach_every_backend_through_the_vip_on_the_fast_path() {
    require_lab!();
    let d = reach_every_backend("lb-fast-tcp-udp", &["--fast-path"]);
    // 300 TCP connections and 60 datagram exchanges, each way: far more than a few packets
    // left to the stack while a neighbour was resolved.
    let fast = datapath_event(&d, "fast_path");
    assert!(fast >= 2 * (300 * 3 + 60), "fast_path counted {fast}");
}

/// TCP and UDP from a client pod through the VIP to 3 backend pods on this node, spread evenly,
/// counted per service and backend; returns the daemon (started with `args`).
fn reach_every_backend(name: &str, args: &[&str]) -> Daemon {
    let s = setup(name, 3);
    let all: Vec<&Pod> = s.backends.iter().collect();
    let d = Daemon::start_with(name, &s.state(&all, ""), &s.interfaces(), args).unwrap();
    let tally = s.tally(300);
    assert_eq!(tally.len(), 3, "every backend answers: {tally:?}");
    for (name, n) in &tally {
        // 100 expected each; random selection stays far inside this band.
        assert!((50..=150).contains(n), "{name} got {n} of 300: {tally:?}");
    }
    let mut udp = BTreeMap::new();
    for _ in 0..60 {
        let r = s
            .client
            .udp_request(SocketAddrV4::new(s.vip, 53), b"q\n", T)
            .expect("UDP through the VIP");
        *udp.entry(r).or_insert(0) += 1;
    }
    assert_eq!(udp.len(), 3, "every backend answers UDP: {udp:?}");

    // The API sees the traffic.
    let services = d.client().services().unwrap();
    let web = services.iter().find(|x| x.name == "web").unwrap();
    assert!(web.traffic.flows >= 300, "{:?}", web.traffic);
    assert_eq!(web.backends.len(), 3);
    assert!(web.backends.iter().all(|b| b.traffic.packets > 0));
    let metrics = d.client().metrics().unwrap();
    assert!(
        metrics.contains("tapestry_service_flows_total{service=\"web\""),
        "{metrics}"
    );
    d
}

#[test]
fn state_file_updates_add_and_remove_backends_live() {
    require_lab!();
    let s = setup("lb-live-update", 2);
    let (a, b) = (&s.backends[0], &s.backends[1]);
    let mut d = Daemon::start("lb-live-update", &s.state(&[a], ""), &s.interfaces()).unwrap();
    assert_eq!(s.tally(20).keys().collect::<Vec<_>>(), vec!["be0"]);

    d.write_state(&s.state(&[a, b], "")).unwrap();
    d.wait_generation(2, T).unwrap();
    assert_eq!(s.tally(60).len(), 2, "the new backend takes traffic");

    d.write_state(&s.state(&[b], "")).unwrap();
    d.wait_generation(3, T).unwrap();
    assert_eq!(s.tally(30).keys().collect::<Vec<_>>(), vec!["be1"]);

    // A broken file names the field, and the last good state stays in force.
    d.write_state(&s.state(&[b], "").replace("port: 80", "port: 0"))
        .unwrap();
    let st = d.wait_status(T, |st| st.last_error.is_some()).unwrap();
    let err = st.last_error.unwrap();
    assert!(err.contains("services[0].port"), "{err}");
    assert_eq!(s.tally(10).keys().collect::<Vec<_>>(), vec!["be1"]);
}

#[test]
fn a_service_without_backends_refuses_connections_at_once() {
    require_lab!();
    let s = setup("lb-no-backend", 1);
    let _d = Daemon::start("lb-no-backend", &s.state(&[], ""), &s.interfaces()).unwrap();
    let started = Instant::now();
    let err = s.tcp().expect_err("no backend");
    assert_eq!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "{err}: {:?}",
        _d.status().unwrap()
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused, not timed out"
    );
}

#[test]
fn a_backend_reaches_its_own_service_hairpin() {
    require_lab!();
    hairpin("lb-hairpin", &[]);
}

#[test]
fn a_backend_reaches_its_own_service_hairpin_on_the_fast_path() {
    require_lab!();
    hairpin("lb-fast-hairpin", &["--fast-path"]);
}

fn hairpin(name: &str, args: &[&str]) {
    let s = setup(name, 1);
    let be = &s.backends[0];
    let _d = Daemon::start_with(name, &s.state(&[be], ""), &s.interfaces(), args).unwrap();
    for _ in 0..3 {
        let r = be
            .tcp_request(SocketAddrV4::new(s.vip, 80), b"me\n", T)
            .expect("hairpin through the VIP");
        assert_eq!(r, "be0");
        let r = be
            .udp_request(SocketAddrV4::new(s.vip, 53), b"me\n", T)
            .expect("UDP hairpin through the VIP");
        assert_eq!(r, "be0");
    }
}

/// A rule in the node's FORWARD chain dropping what an interface brings in (a primary CNI's
/// network policy, say), taken out again on drop. Interface-specific, so nothing else on the
/// machine is affected.
struct ForwardDrop(String);

impl ForwardDrop {
    fn insert(ifname: &str) -> ForwardDrop {
        iptables(&["-I", "FORWARD", "-i", ifname, "-j", "DROP"]);
        ForwardDrop(ifname.to_owned())
    }
}

impl Drop for ForwardDrop {
    fn drop(&mut self) {
        iptables(&["-D", "FORWARD", "-i", &self.0, "-j", "DROP"]);
    }
}

fn iptables(args: &[&str]) {
    let out = std::process::Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .expect("running iptables");
    assert!(out.status.success(), "iptables {args:?}: {out:?}");
}

/// The trade-off of `--fast-path`: the node's stack, and so its netfilter, no longer sees
/// Service traffic. With FORWARD rules dropping everything the client and the backend send,
/// the VIP fails without the fast path (the rules apply, as they do to the pod IP) and works
/// with it, TCP and UDP, both directions delivered by the programs; the pod IP stays blocked.
#[test]
fn on_the_fast_path_the_nodes_forward_rules_no_longer_see_service_traffic() {
    require_lab!();
    let s = setup("lb-fast-bypass", 1);
    let be = &s.backends[0];
    let state = s.state(&[be], "");
    let _rules = [
        ForwardDrop::insert(&s.client.host_ifname),
        ForwardDrop::insert(&be.host_ifname),
    ];
    let short = Duration::from_millis(1500);
    let vip = SocketAddrV4::new(s.vip, 80);
    assert!(
        s.client.tcp_request(be.addr(8080), b"x\n", short).is_err(),
        "the rules block the pod IP"
    );
    {
        let _d = Daemon::start("lb-fast-bypass-off", &state, &s.interfaces()).unwrap();
        assert!(
            s.client.tcp_request(vip, b"x\n", short).is_err(),
            "without the fast path the FORWARD rules apply to VIP traffic"
        );
        assert!(
            s.client
                .udp_request(SocketAddrV4::new(s.vip, 53), b"q\n", short)
                .is_err(),
            "and to UDP"
        );
    }
    let d = Daemon::start_with(
        "lb-fast-bypass-on",
        &state,
        &s.interfaces(),
        &["--fast-path"],
    )
    .unwrap();
    for _ in 0..20 {
        assert_eq!(s.tcp().expect("TCP through the VIP past the rules"), "be0");
        let r = s
            .client
            .udp_request(SocketAddrV4::new(s.vip, 53), b"q\n", T)
            .expect("UDP through the VIP past the rules");
        assert_eq!(r, "be0");
    }
    assert!(datapath_event(&d, "fast_path") >= 20 * 2 * 2);
    assert!(
        s.client.tcp_request(be.addr(8080), b"x\n", short).is_err(),
        "the pod IP (no Service) stays with the stack and its rules"
    );
}

/// Runs sequential connections from the client for as long as `running`, counting successes
/// and failures.
fn connection_stream(
    s: &Setup,
    running: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let client = s.client.clone();
    let vip = s.vip;
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let h = std::thread::spawn(move || {
        while running.load(Ordering::Relaxed) {
            match client.tcp_request(SocketAddrV4::new(vip, 80), b"x\n", T) {
                Ok(_) => ok2.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("connection failed: {e}");
                    failed2.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    });
    (h, ok, failed)
}

#[test]
fn restart_and_kill9_drop_no_flow_and_fail_no_connection() {
    require_lab!();
    let s = setup("lb-restart", 3);
    let all: Vec<&Pod> = s.backends.iter().collect();
    let mut d = Daemon::start("lb-restart", &s.state(&all, ""), &s.interfaces()).unwrap();

    // An established connection that must survive, answered by the same backend each time.
    let mut long = s
        .client
        .tcp_connect(SocketAddrV4::new(s.vip, 80), T)
        .unwrap();
    let first = tapestry_tests::stream_request(&mut long, b"1\n").unwrap();

    let running = Arc::new(AtomicBool::new(true));
    let (h, ok, failed) = connection_stream(&s, running.clone());
    std::thread::sleep(Duration::from_millis(300));
    d.restart().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tapestry_tests::stream_request(&mut long, b"2\n").unwrap(),
        first
    );
    d.kill9().unwrap();
    // No daemon at all: the pinned datapath keeps working on its own.
    std::thread::sleep(Duration::from_millis(500));
    let during = ok.load(Ordering::Relaxed);
    assert_eq!(
        tapestry_tests::stream_request(&mut long, b"3\n").unwrap(),
        first
    );
    d.restart().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    running.store(false, Ordering::Relaxed);
    h.join().unwrap();
    assert_eq!(
        tapestry_tests::stream_request(&mut long, b"4\n").unwrap(),
        first
    );

    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    assert!(ok > 20 && during > 0, "the stream ran: {ok} connections");
    // The restarted daemon adopted the maps: nothing to program, same services.
    let st = d.status().unwrap();
    assert_eq!(st.services, 2);
    assert_eq!(st.attachments.len(), s.interfaces().len());
    assert!(
        d.log().contains("restored the programmed state"),
        "{}",
        d.log()
    );
}

/// `tapestry_datapath_events{event="host_translated"}`: connections and datagrams of the node's
/// own sockets sent to a backend.
fn host_translated(d: &Daemon) -> u64 {
    datapath_event(d, "host_translated")
}

/// `tapestry_datapath_events{event="<event>"}`.
fn datapath_event(d: &Daemon, event: &str) -> u64 {
    let metrics = d.client().metrics().unwrap();
    let label = format!("\"{event}\"");
    metrics
        .lines()
        .find(|l| l.starts_with("tapestry_datapath_events") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {event} counter in\n{metrics}"))
}

/// The node itself reaches frontends (here the node is this test process, in the namespace the
/// daemon runs in, as a host-network pod or a node process would be): TCP connections spread
/// over the backends, UDP sent with and without `connect`, each answer and each peer's name
/// showing the frontend; a frontend without backends refuses at once. Pods' sockets stay with
/// their interface's program, and `--host-services=false` takes the host programs off.
#[test]
fn the_node_itself_reaches_frontends_and_sees_them_as_its_peers() {
    require_lab!();
    let s = setup("lb-host", 2);
    let all: Vec<&Pod> = s.backends.iter().collect();
    let empty = s.lab.service_ip(1);
    let state = format!(
        "{}\n  - name: empty\n    vip: {empty}\n    port: 80\n    backends: []\n",
        s.state(&all, "").trim_end()
    );
    let mut d = Daemon::start("lb-host", &state, &s.interfaces()).unwrap();
    let names: Vec<String> = s.backends.iter().map(|b| b.name.clone()).collect();
    let web = SocketAddrV4::new(s.vip, 80);
    let dns = SocketAddrV4::new(s.vip, 53);

    let mut seen = BTreeMap::new();
    for i in 0..40 {
        let mut stream = tapestry_tests::tcp_connect(web, T)
            .unwrap_or_else(|e| panic!("the node -> {web} (connection {i}): {e}"));
        assert_eq!(
            stream.peer_addr().unwrap(),
            SocketAddr::V4(web),
            "peer name"
        );
        let name = tapestry_tests::stream_request(&mut stream, b"hello\n").unwrap();
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        names,
        "new connections spread over both backends: {seen:?}"
    );

    // Without connect: every datagram's source is the frontend, and one socket is one flow.
    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let mut answered = BTreeMap::new();
    for _ in 0..5 {
        sock.send_to(b"q\n", dns).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("an answer through the frontend");
        assert_eq!(from, SocketAddr::V4(dns), "the answer's source");
        let name = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
        *answered.entry(name).or_insert(0) += 1;
    }
    assert_eq!(answered.len(), 1, "one socket, one backend: {answered:?}");
    assert!(names.contains(answered.keys().next().unwrap()));
    // Connected: only answers from the frontend are accepted (tapestry_tests::udp_request).
    let name = tapestry_tests::udp_request(dns, b"q\n", T).expect("connected UDP");
    assert!(names.contains(&name), "{name}");

    let started = Instant::now();
    let err = tapestry_tests::tcp_request(SocketAddrV4::new(empty, 80), b"x\n", T)
        .expect_err("a frontend without backends");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused, not timed out"
    );

    // 40 connections, 5 datagrams, 1 connected socket: counted as the node's.
    let before = host_translated(&d);
    assert!(before >= 46, "host_translated {before}");
    // A pod's connection goes through its interface's program, not the host programs.
    assert!(names.contains(&s.tcp().unwrap()));
    assert_eq!(
        host_translated(&d),
        before,
        "a pod's socket is not the node's"
    );

    d.set_extra_args(&["--host-services=false"]);
    d.restart().unwrap();
    let links: Vec<String> = std::fs::read_dir(d.bpffs_dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !links.iter().any(|l| l.starts_with("host-")),
        "host links left: {links:?}"
    );
    if let Ok(reply) = tapestry_tests::tcp_request(web, b"hello\n", Duration::from_secs(1)) {
        assert!(!names.contains(&reply), "still reached {reply}");
    }
    // Pods are served as before.
    assert!(names.contains(&s.tcp().unwrap()));
}

/// A node port (`vip: 0.0.0.0`) answers on every address of the node, TCP and UDP: for a pod
/// sending to the node's address (reverse NAT restores the node's address and port), and for the
/// node itself on its address and on loopback. Another port of the node is no frontend, and a
/// node port outside `--nodeport-range` is refused with its state, the last good one serving on.
#[test]
fn a_node_port_answers_on_the_nodes_addresses_for_pods_and_the_node() {
    require_lab!();
    let s = setup("lb-nodeport", 2);
    // One port per lab (its slot), so concurrent labs' daemons never share one.
    let o = s.vip.octets();
    let np = 30000 + (u16::from(o[1] - 240) << 8) + u16::from(o[2]);
    let all: Vec<&Pod> = s.backends.iter().collect();
    let nodeport = |port: u16| {
        let list: String = all
            .iter()
            .map(|b| format!("      - {{ ip: {}, name: {} }}\n", b.ip, b.name))
            .collect();
        format!(
            "  - name: web-np\n    vip: 0.0.0.0\n    port: {port}\n    backends:\n{}\
             \n  - name: dns-np\n    vip: 0.0.0.0\n    port: {port}\n    protocol: UDP\n    backends:\n{}",
            list.replace("}\n", ", port: 8080 }\n"),
            list.replace("}\n", ", port: 5353 }\n"),
        )
        .replace("\n\n", "\n")
    };
    let state = |port: u16| format!("{}\n{}", s.state(&all, "").trim_end(), nodeport(port));
    let d = Daemon::start("lb-nodeport", &state(np), &s.interfaces()).unwrap();
    let names: Vec<String> = s.backends.iter().map(|b| b.name.clone()).collect();
    // Not a lab's (10.240.0.0/13): another test's fabric may go away meanwhile.
    let node_ip = tapestry_node_daemon::datapath::node_addrs::local_ipv4()
        .unwrap()
        .into_iter()
        .find(|ip| !(ip.octets()[0] == 10 && (240..248).contains(&ip.octets()[1])))
        .expect("the node has an address of its own");
    let at_node = SocketAddrV4::new(node_ip, np);

    let mut seen = BTreeMap::new();
    for i in 0..30 {
        let name = s
            .client
            .tcp_request(at_node, b"hi\n", T)
            .unwrap_or_else(|e| panic!("pod -> {at_node} (request {i}): {e}"));
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), names, "{seen:?}");
    // Connected UDP: only an answer from the node's address and port is accepted.
    let name = s
        .client
        .udp_request(at_node, b"q\n", T)
        .expect("UDP node port");
    assert!(names.contains(&name), "{name}");
    for addr in [at_node, SocketAddrV4::new(Ipv4Addr::LOCALHOST, np)] {
        let name = tapestry_tests::tcp_request(addr, b"hi\n", T)
            .unwrap_or_else(|e| panic!("the node -> {addr}: {e}"));
        assert!(names.contains(&name), "the node -> {addr}: {name}");
    }
    if let Ok(reply) = s
        .client
        .tcp_request(SocketAddrV4::new(node_ip, np + 1), b"hi\n", T)
    {
        assert!(!names.contains(&reply), "port {} answered {reply}", np + 1);
    }

    d.write_state(&state(8080)).unwrap();
    let st = d.wait_status(T, |st| st.last_error.is_some()).unwrap();
    let err = st.last_error.unwrap();
    assert!(
        err.contains("node port 8080 is outside --nodeport-range 30000-32767"),
        "{err}"
    );
    let name = s.client.tcp_request(at_node, b"hi\n", T).unwrap();
    assert!(
        names.contains(&name),
        "the last good state serves on: {name}"
    );
}

/// `externalTrafficPolicy: Local` on a node port: a client outside the node (on an interface
/// given as `--nodeport-interface`) reaches only the backend on this node (`node` is this
/// node's name: the hostname in standalone mode), which sees the client's own address, and the
/// replies come back from the node's address and port (the TCP handshake and the connected UDP
/// socket accept nothing else). With no backend on this node the outside client gets no answer
/// (dropped, counted as `no_local_backend`) while a pod's request to the same node port still
/// reaches every backend; back to `Cluster`, the outside client's source is translated again.
#[test]
fn external_traffic_policy_local_keeps_outside_clients_on_this_nodes_backends() {
    require_lab!();
    let mut s = setup("lb-etp-local", 2);
    let outside = s.lab.add_pod("outside").unwrap();
    let o = s.vip.octets();
    let np = 30000 + (u16::from(o[1] - 240) << 8) + u16::from(o[2]);
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    // be0 is this node's, be1 another's (both are pods of this lab: only `node` tells them
    // apart, so every difference below is the policy's).
    let state = |policy: &str, nodes: [&str; 2]| {
        let list = |port: u16| -> String {
            s.backends
                .iter()
                .zip(nodes)
                .map(|(b, node)| {
                    format!(
                        "      - {{ ip: {}, port: {port}, name: {}, node: {node} }}\n",
                        b.ip, b.name
                    )
                })
                .collect()
        };
        format!(
            "services:\n  - name: web-np\n    vip: 0.0.0.0\n    port: {np}\n    \
             externalTrafficPolicy: {policy}\n    backends:\n{}  - name: dns-np\n    \
             vip: 0.0.0.0\n    port: {np}\n    protocol: UDP\n    externalTrafficPolicy: \
             {policy}\n    backends:\n{}",
            list(8080),
            list(5353)
        )
    };
    let attach: Vec<&str> = s
        .backends
        .iter()
        .chain([&s.client])
        .map(|p| p.host_ifname.as_str())
        .collect();
    let mut d = Daemon::start_with(
        "lb-etp-local",
        &state("Local", [&me, "node-elsewhere"]),
        &attach,
        &["--nodeport-interface", &outside.host_ifname],
    )
    .unwrap();
    let node_ip = tapestry_node_daemon::datapath::node_addrs::local_ipv4()
        .unwrap()
        .into_iter()
        .find(|ip| !(ip.octets()[0] == 10 && (240..248).contains(&ip.octets()[1])))
        .expect("the node has an address of its own");
    let at_node = SocketAddrV4::new(node_ip, np);
    let (be0_tcp, be0_udp) = (&s._servers[0], &s._servers[1]);
    let outside_ip = IpAddr::V4(outside.ip);

    for i in 0..20 {
        let name = outside
            .tcp_request(at_node, b"hi\n", T)
            .unwrap_or_else(|e| panic!("outside -> {at_node} (request {i}): {e}"));
        assert_eq!(name, "be0", "outside request {i} left this node");
    }
    let peer = be0_tcp.last_peer().expect("be0 saw the outside client");
    assert_eq!(peer.ip(), outside_ip, "the client's source is kept");
    assert_eq!(
        be0_tcp.client_ips().keys().copied().collect::<Vec<_>>(),
        vec![outside_ip],
        "every outside connection came with the client's own address"
    );
    let name = outside
        .udp_request(SocketAddrV4::new(node_ip, np), b"q\n", T)
        .expect("UDP from outside, answered from the node port");
    assert_eq!(name, "be0");
    assert_eq!(be0_udp.last_peer().map(|p| p.ip()), Some(outside_ip));
    // Pods still reach every backend through the same node port.
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        *seen
            .entry(s.client.tcp_request(at_node, b"hi\n", T).unwrap())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "pod -> {at_node}: {seen:?}");

    // No backend on this node: outside clients are dropped, pods still served.
    d.write_state(&state("Local", ["node-elsewhere", "node-other"]))
        .unwrap();
    d.wait_generation(2, T).unwrap();
    let dropped = |d: &Daemon| {
        d.status()
            .unwrap()
            .drops
            .get("no_local_backend")
            .copied()
            .unwrap_or(0)
    };
    let before = dropped(&d);
    let err = outside
        .tcp_request(at_node, b"hi\n", Duration::from_secs(1))
        .expect_err("no backend on this node: no answer from outside");
    assert!(
        matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "dropped, not refused: {err}"
    );
    assert!(dropped(&d) > before, "counted as no_local_backend");
    let name = s.client.tcp_request(at_node, b"hi\n", T).unwrap();
    assert!(["be0", "be1"].contains(&name.as_str()), "{name}");

    // Cluster: every backend again, the outside client's source translated to the node.
    d.write_state(&state("Cluster", ["node-elsewhere", "node-other"]))
        .unwrap();
    d.wait_generation(3, T).unwrap();
    let mut seen = BTreeMap::new();
    for i in 0..30 {
        let name = outside
            .tcp_request(at_node, b"hi\n", T)
            .unwrap_or_else(|e| panic!("outside -> {at_node} under Cluster (request {i}): {e}"));
        *seen.entry(name).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "outside -> {at_node}: {seen:?}");
    let peer = s._servers[2]
        .last_peer()
        .expect("be1 saw the outside client");
    assert_ne!(peer.ip(), outside_ip, "Cluster translates the source");
}
