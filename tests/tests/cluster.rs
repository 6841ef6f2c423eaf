//! Many nodes: three lab nodes (network namespaces on one fabric, each with its own tapestryd in
//! Kubernetes mode, one real apiserver and controller-manager; see tapestry_tests::cluster, which
//! also says where the test plays the kubelet). Services whose backends are on other nodes, on
//! a node's own address, and the apiserver behind `kubernetes`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use serde_json::json;
use tapestry_tests::{
    Pod,
    cluster::{Cluster, Plumbing},
    guest::{Guest, GuestConfig},
    poll,
};

const T: Duration = Duration::from_secs(5);

/// Names answering `n` new TCP connections from `client` to `vip:80`, counted.
fn tcp_answers(client: &Pod, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let name = client
            .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
            .unwrap_or_else(|e| panic!("{} -> {vip}:80 (request {i}): {e}", client.name));
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

/// `who` reaches node n's backend (`web<n>`) through `per_node[n]`:80, by TCP and by UDP.
fn each_nodes_backend(
    who: &str,
    per_node: &[Ipv4Addr],
    tcp: impl Fn(SocketAddrV4) -> std::io::Result<String>,
    udp: impl Fn(SocketAddrV4) -> std::io::Result<String>,
) {
    for (n, vip) in per_node.iter().enumerate() {
        let want = format!("web{n}");
        let at = SocketAddrV4::new(*vip, 80);
        let got = tcp(at).unwrap_or_else(|e| panic!("TCP {who} -> web-n{n} ({vip}): {e}"));
        assert_eq!(got, want, "TCP {who} -> web-n{n}");
        let got = udp(at).unwrap_or_else(|e| panic!("UDP {who} -> web-n{n} ({vip}): {e}"));
        assert_eq!(got, want, "UDP {who} -> web-n{n}");
    }
}

/// On every node of `c`: a backend `web<n>` (labels app=web, node=n<n>) serving TCP and UDP on
/// 8080, and a client `client<n>`. Returns (backends, their servers, clients), by node.
fn web_and_clients(c: &mut Cluster) -> (Vec<Pod>, Vec<tapestry_tests::ServerHandle>, Vec<Pod>) {
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    let mut clients = Vec::new();
    for n in 0..c.nodes.len() {
        let be = c
            .add_pod(
                n,
                &format!("web{n}"),
                json!({"app": "web", "node": format!("n{n}")}),
            )
            .unwrap();
        servers.push(be.serve_tcp_name(8080).unwrap());
        servers.push(be.serve_udp_name(8080).unwrap());
        backends.push(be);
        clients.push(
            c.add_pod(n, &format!("client{n}"), json!({"app": "client"}))
                .unwrap(),
        );
    }
    (backends, servers, clients)
}

#[test]
fn services_reach_backends_on_every_node_and_off_the_pod_network() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    let mut c = Cluster::start("cluster-traffic", 3).unwrap();
    let (backends, _servers, clients) = web_and_clients(&mut c);
    let web = c.add_service("web", json!({"app": "web"})).unwrap();
    let per_node: Vec<Ipv4Addr> = (0..3)
        .map(|n| {
            c.add_service(
                &format!("web-n{n}"),
                json!({"app": "web", "node": format!("n{n}")}),
            )
            .unwrap()
        })
        .collect();
    let all: Vec<SocketAddrV4> = backends.iter().map(|b| b.addr(8080)).collect();
    c.wait_backends("web", &all, Duration::from_secs(20))
        .unwrap();
    for (n, be) in backends.iter().enumerate() {
        c.wait_backends(
            &format!("web-n{n}"),
            &[be.addr(8080)],
            Duration::from_secs(20),
        )
        .unwrap();
    }

    // Every ordered pair of nodes (and each node to itself), TCP and UDP, through one VIP.
    for client in &clients {
        each_nodes_backend(
            &client.name,
            &per_node,
            |a| client.tcp_request(a, b"hi\n", T),
            |a| client.udp_request(a, b"hi\n", T),
        );
    }

    // The nodes themselves (host network: node processes, host-network pods) reach every
    // node's backend through the ClusterIP, TCP and UDP, with the frontend as the UDP answer's
    // source (udp_request only accepts that), and new connections spread over all three.
    for node in &c.nodes {
        each_nodes_backend(
            &node.name,
            &per_node,
            |a| node.tcp_request(a, b"hi\n", T),
            |a| node.udp_request(a, b"hi\n", T),
        );
        let mut seen = BTreeMap::new();
        for i in 0..60 {
            let name = node
                .tcp_request(SocketAddrV4::new(web, 80), b"hi\n", T)
                .unwrap_or_else(|e| panic!("{} -> web (request {i}): {e}", node.name));
            *seen.entry(name).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{} reached {seen:?}", node.name);
    }

    // Even spread over backends on three nodes, from every node.
    for client in &clients {
        let seen = tcp_answers(client, web, 150);
        assert_eq!(seen.len(), 3, "{} reached {seen:?}", client.name);
        for (name, count) in &seen {
            assert!(
                (25..=75).contains(count),
                "{} -> web: {name} got {count} of 150 ({seen:?})",
                client.name
            );
        }
    }

    // `web` as a NodePort: from every node's pods to their node's address, and from every
    // node itself (its address and loopback), TCP spread over all three nodes' backends, UDP
    // answered from the node's own address and port.
    c.cp.kubectl_ok([
        "patch",
        "svc",
        "web",
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ])
    .unwrap();
    let node_port = |proto: &str| -> u16 {
        c.cp.kubectl_ok([
            "get",
            "svc",
            "web",
            "-o",
            &format!("jsonpath={{.spec.ports[?(@.name==\"{proto}\")].nodePort}}"),
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    };
    let (np_tcp, np_udp) = (node_port("tcp"), node_port("udp"));
    for (client, node) in clients.iter().zip(&c.nodes) {
        let at = SocketAddrV4::new(node.underlay_ip, np_tcp);
        poll(T * 4, &format!("{} -> {at}", client.name), || {
            Ok(client.tcp_request(at, b"hi\n", T).ok())
        })
        .unwrap();
        let mut seen = BTreeMap::new();
        for i in 0..60 {
            let name = client
                .tcp_request(at, b"hi\n", T)
                .unwrap_or_else(|e| panic!("{} -> {at} (request {i}): {e}", client.name));
            *seen.entry(name).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{} -> {at}: {seen:?}", client.name);
        let udp_at = SocketAddrV4::new(node.underlay_ip, np_udp);
        let got = client
            .udp_request(udp_at, b"hi\n", T)
            .unwrap_or_else(|e| panic!("UDP {} -> {udp_at}: {e}", client.name));
        assert!(
            got.starts_with("web"),
            "UDP {} -> {udp_at}: {got}",
            client.name
        );
        for addr in [at, SocketAddrV4::new(Ipv4Addr::LOCALHOST, np_tcp)] {
            let got = node
                .tcp_request(addr, b"hi\n", T)
                .unwrap_or_else(|e| panic!("{} -> {addr}: {e}", node.name));
            assert!(got.starts_with("web"), "{} -> {addr}: {got}", node.name);
        }
    }

    // A client outside the cluster (a machine on the nodes' network) reaches the node port on
    // every node: its source translated to the node, so the replies of backends on other nodes
    // come back through the node it asked, which restores the node port as their source (UDP
    // only accepts that). And a pod reaches another node's node port the same way.
    let (outside, outside_ip) = c.add_outside_client(0).unwrap();
    for node in &c.nodes {
        let at = SocketAddrV4::new(node.underlay_ip, np_tcp);
        let mut seen = BTreeMap::new();
        for i in 0..60 {
            let name = tapestry_tests::net::tcp_request_in(&outside, at, b"hi\n", T)
                .unwrap_or_else(|e| panic!("outside ({outside_ip}) -> {at} (request {i}): {e}"));
            *seen.entry(name).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "outside -> {at}: {seen:?}");
        let udp_at = SocketAddrV4::new(node.underlay_ip, np_udp);
        let got = tapestry_tests::net::udp_request_in(&outside, udp_at, b"hi\n", T)
            .unwrap_or_else(|e| panic!("UDP outside -> {udp_at}: {e}"));
        assert!(got.starts_with("web"), "UDP outside -> {udp_at}: {got}");
    }
    let across = SocketAddrV4::new(c.nodes[1].underlay_ip, np_tcp);
    let got = clients[0]
        .tcp_request(across, b"hi\n", T)
        .unwrap_or_else(|e| panic!("client0 -> node-1's node port {across}: {e}"));
    assert!(got.starts_with("web"), "client0 -> {across}: {got}");

    // A host-network endpoint: a server on node 1's own address, in a hand-written slice.
    let node1 = &c.nodes[1];
    let _host_server = c
        .lab
        .serve_tcp_name_in(&node1.netns_path, "node-1-host", 9090)
        .unwrap();
    c.cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "hostsvc", "namespace": "default"},
            "spec": {"ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": 9090}]}})
        .to_string(),
    )
    .unwrap();
    c.cp.apply(
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "hostsvc-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "hostsvc",
                           "endpointslice.kubernetes.io/managed-by": "hand-written.example.com"}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 9090}],
            "endpoints": [{"addresses": [node1.underlay_ip.to_string()], "nodeName": "node-1",
                           "conditions": {"ready": true}}]})
        .to_string(),
    )
    .unwrap();
    let host_vip: Ipv4Addr =
        c.cp.kubectl_ok(["get", "svc", "hostsvc", "-o", "jsonpath={.spec.clusterIP}"])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    c.wait_backends(
        "hostsvc",
        &[SocketAddrV4::new(node1.underlay_ip, 9090)],
        Duration::from_secs(20),
    )
    .unwrap();
    for client in &clients {
        let got = client
            .tcp_request(SocketAddrV4::new(host_vip, 80), b"hi\n", T)
            .unwrap_or_else(|e| panic!("{} -> hostsvc: {e}", client.name));
        assert_eq!(got, "node-1-host", "{} -> hostsvc", client.name);
    }

    // The apiserver behind `kubernetes` (on the fabric, outside every node): /readyz over TLS.
    for client in &clients {
        let out = poll(T * 4, &format!("{} -> kubernetes", client.name), || {
            let out = client
                .run(std::process::Command::new("curl").args([
                    "-sk",
                    "--max-time",
                    "5",
                    "https://10.96.0.1/readyz",
                ]))
                .unwrap();
            Ok(out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        })
        .unwrap();
        assert_eq!(out.trim(), "ok", "{} -> kubernetes /readyz", client.name);
    }
    // And from every node itself, as a host-network controller's in-cluster config would.
    for node in &c.nodes {
        let out = node
            .run(std::process::Command::new("curl").args([
                "-sk",
                "--max-time",
                "5",
                "https://10.96.0.1/readyz",
            ]))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "{} -> kubernetes /readyz: {out:?}",
            node.name
        );
    }

    // A backend node's pods deleted: their endpoints leave every node's maps within 1 s.
    let started = Instant::now();
    c.delete_pod("web2").unwrap();
    let rest: Vec<SocketAddrV4> = all[..2].to_vec();
    c.wait_backends("web", &rest, Duration::from_secs(5))
        .unwrap();
    let took = started.elapsed();
    eprintln!("web2's endpoint left every node's maps in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    for client in &clients {
        let seen = tcp_answers(client, web, 20);
        assert!(!seen.contains_key("web2"), "{seen:?}");
    }
}

/// Pods that were there first get the datapath, and a daemon killed with `kill -9` disturbs
/// nothing: its datapath stays pinned and keeps serving while it is away.
#[test]
fn pods_from_before_the_daemon_and_a_daemon_killed_midflight() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    let mut c = Cluster::start("cluster-restart", 3).unwrap();
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    let mut clients = Vec::new();
    for n in 0..3 {
        let be = c
            .add_pod(n, &format!("web{n}"), json!({"app": "web"}))
            .unwrap();
        servers.push(be.serve_tcp_name(8080).unwrap());
        backends.push(be.addr(8080));
        clients.push(
            c.add_pod(n, &format!("client{n}"), json!({"app": "client"}))
                .unwrap(),
        );
    }
    let web = c.add_service("web", json!({"app": "web"})).unwrap();
    c.wait_backends("web", &backends, Duration::from_secs(20))
        .unwrap();
    let vip = SocketAddrV4::new(web, 80);

    // A pod plumbed by the primary alone while node 2's daemon is down (before the install,
    // or while the DaemonSet rolled): no datapath on its veth, so no ClusterIP.
    c.nodes[2].daemon.stop().unwrap();
    let early = c
        .add_pod_with(2, "early", json!({"app": "client"}), Plumbing::PrimaryOnly)
        .unwrap();
    assert!(
        early
            .tcp_request(vip, b"hi\n", Duration::from_secs(1))
            .is_err(),
        "without the datapath the ClusterIP must not answer (the test would prove nothing)"
    );
    c.nodes[2].daemon.restart().unwrap();
    poll(
        Duration::from_secs(20),
        "the early pod reaches the ClusterIP",
        || Ok(early.tcp_request(vip, b"hi\n", T).ok()),
    )
    .unwrap();
    // One whose CNI ADD never reached a running daemon (the primary alone) is found too.
    let late = c
        .add_pod_with(1, "late", json!({"app": "client"}), Plumbing::PrimaryOnly)
        .unwrap();
    poll(
        Duration::from_secs(20),
        "the late pod reaches the ClusterIP",
        || Ok(late.tcp_request(vip, b"hi\n", T).ok()),
    )
    .unwrap();
    // The datapath is attached before the registry commits the endpoint: wait for the commit.
    let discovered = |c: &Cluster| -> Vec<String> {
        c.nodes[1]
            .daemon
            .client()
            .endpoints()
            .unwrap()
            .into_iter()
            .filter(|e| e.request.network.as_deref() == Some("tapestry-discovered"))
            .map(|e| e.request.host_ifname)
            .collect()
    };
    let want = vec![late.host_ifname.clone()];
    poll(
        Duration::from_secs(5),
        "the discovered endpoint listed",
        || Ok((discovered(&c) == want).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", discovered(&c), c.nodes[1].daemon.log()));

    // kill -9 on node 1 while every node's clients open connections, and node 1's client keeps
    // an established one.
    let mut established = clients[1].tcp_connect(vip, T).unwrap();
    assert!(tapestry_tests::stream_request(&mut established, b"hi").is_ok());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = clients
        .iter()
        .cloned()
        .map(|client| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match client.tcp_request(vip, b"hi\n", T) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (client.name.clone(), ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    c.nodes[1].daemon.kill9().unwrap();
    let mut answered = 0;
    let away = Instant::now();
    while away.elapsed() < Duration::from_secs(2) {
        tapestry_tests::stream_request(&mut established, b"hi")
            .expect("node 1's established flow answers while its daemon is gone");
        answered += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    c.nodes[1].daemon.restart().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        let (name, ok, failed) = l.join().unwrap();
        eprintln!("{name}: {ok} connections, {} failed", failed.len());
        assert!(ok > 0, "{name} made no connection");
        if name != "client1" {
            assert!(failed.is_empty(), "{name}: {failed:?}");
        }
    }
    assert!(answered > 10);
    tapestry_tests::stream_request(&mut established, b"hi").expect("and after the daemon is back");
}

/// QEMU guests in VM pods on two nodes: pods reach a VM on another node through a VIP, and a VM
/// reaches a pod and a VM on other nodes through VIPs.
#[test]
fn vms_reach_and_are_reached_across_nodes() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    tapestry_tests::require_qemu!();
    let mut c = Cluster::start("cluster-vms", 3).unwrap();
    let (_, vm0) = c
        .add_vm_pod(0, "vm0", json!({"app": "vm", "node": "n0"}))
        .unwrap();
    let (vm1_pod, _vm1) = c
        .add_vm_pod(1, "vm1", json!({"app": "vm", "node": "n1"}))
        .unwrap();
    let web2 = c.add_pod(2, "web2", json!({"app": "web"})).unwrap();
    let _s = web2.serve_tcp_name(8080).unwrap();
    let client0 = c.add_pod(0, "client0", json!({"app": "client"})).unwrap();
    let client2 = c.add_pod(2, "client2", json!({"app": "client"})).unwrap();
    let vm_n1 = c
        .add_service("vm-n1", json!({"app": "vm", "node": "n1"}))
        .unwrap();
    let web = c.add_service("web", json!({"app": "web"})).unwrap();
    c.wait_backends("vm-n1", &[vm1_pod.addr(8080)], Duration::from_secs(30))
        .unwrap();
    c.wait_backends("web", &[web2.addr(8080)], Duration::from_secs(30))
        .unwrap();

    // Pod -> remote VM (node 2 -> node 1, node 0 -> node 1).
    for client in [&client2, &client0] {
        let got = client
            .tcp_request(SocketAddrV4::new(vm_n1, 80), b"hi\n", T)
            .unwrap_or_else(|e| panic!("{} -> vm-n1: {e}", client.name));
        assert_eq!(got, "vm1", "{} -> vm-n1", client.name);
    }
    // VM -> remote pod (node 0 -> node 2) and VM -> remote VM (node 0 -> node 1), from inside
    // the guest (busybox nc), through the VIPs.
    for (vip, want) in [(web, "web2"), (vm_n1, "vm1")] {
        let out = vm0
            .console(&format!("echo hi | nc -w 3 {vip} 80"), T * 2)
            .unwrap_or_else(|e| panic!("vm0 -> {vip}: {e}"));
        assert_eq!(out.trim(), want, "vm0 -> {vip}");
    }
}

/// `externalTrafficPolicy: Local` on a LoadBalancer Service whose endpoints are on nodes 0 and
/// 1: a client outside the cluster reaching the node port of node 0 or 1 gets that node's own
/// endpoint, which sees the client's address; node 2, with none, drops it (while a pod of node
/// 2 still reaches the Service through its node's node port). The `healthCheckNodePort` the
/// apiserver allocated answers 200 with `localEndpoints: 1` on nodes 0 and 1, 503 with 0 on
/// node 2, as kube-proxy's does.
#[test]
fn external_traffic_policy_local_and_health_check_node_port() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    let mut c = Cluster::start("cluster-etp", 3).unwrap();
    let mut servers = Vec::new();
    for n in 0..2 {
        let be = c
            .add_pod(n, &format!("lb{n}"), json!({"app": "lb"}))
            .unwrap();
        servers.push((be.ip, be.serve_tcp_name(8080).unwrap()));
    }
    let client2 = c.add_pod(2, "client2", json!({"app": "client"})).unwrap();
    c.cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "lb", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "selector": {"app": "lb"},
                     "ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": 8080}]}})
        .to_string(),
    )
    .unwrap();
    let field = |path: &str| -> u16 {
        c.cp.kubectl_ok(["get", "svc", "lb", "-o", &format!("jsonpath={{{path}}}")])
            .unwrap()
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let (np, hc) = (
        field(".spec.ports[0].nodePort"),
        field(".spec.healthCheckNodePort"),
    );
    let want: Vec<SocketAddrV4> = servers
        .iter()
        .map(|(ip, _)| SocketAddrV4::new(*ip, 8080))
        .collect();
    c.wait_backends("lb", &want, Duration::from_secs(20))
        .unwrap();

    let (outside, outside_ip) = c.add_outside_client(0).unwrap();
    for (n, node) in c.nodes.iter().enumerate().take(2) {
        let at = SocketAddrV4::new(node.underlay_ip, np);
        for i in 0..20 {
            let got = tapestry_tests::net::tcp_request_in(&outside, at, b"hi\n", T)
                .unwrap_or_else(|e| panic!("outside -> {} {at} (request {i}): {e}", node.name));
            assert_eq!(
                got,
                format!("lb{n}"),
                "outside -> {} stays on it",
                node.name
            );
        }
        let seen: Vec<Ipv4Addr> = servers[n]
            .1
            .client_ips()
            .keys()
            .map(|ip| match ip {
                std::net::IpAddr::V4(v4) => *v4,
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            seen,
            vec![outside_ip],
            "lb{n} sees the client's own address"
        );
    }
    let node2 = &c.nodes[2];
    let at2 = SocketAddrV4::new(node2.underlay_ip, np);
    let err = tapestry_tests::net::tcp_request_in(&outside, at2, b"hi\n", Duration::from_secs(1))
        .expect_err("node-2 has no endpoint of lb: outside traffic is dropped");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        "dropped, not refused: {err}"
    );
    let got = client2
        .tcp_request(at2, b"hi\n", T)
        .unwrap_or_else(|e| panic!("client2 -> its node's node port {at2}: {e}"));
    assert!(got == "lb0" || got == "lb1", "{got}");

    for (n, node) in c.nodes.iter().enumerate() {
        let at = SocketAddrV4::new(node.underlay_ip, hc);
        let (want_status, want_count) = if n < 2 { (200, 1) } else { (503, 0) };
        let (status, head, body) = poll(T * 4, &format!("{} health check {at}", node.name), || {
            Ok(tapestry_tests::net::http_get_in(&outside, at, "/healthz", T).ok())
        })
        .unwrap();
        assert_eq!(status, want_status, "{}: {head}\n{body}", node.name);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"service": {"namespace": "default", "name": "lb"},
                   "localEndpoints": want_count, "serviceProxyHealthy": true}),
            "{}",
            node.name
        );
    }
}

/// `ready` of `ip`'s endpoint in the built-in controller's slices of Service `service`, or None
/// while no such endpoint is published.
fn builtin_slice_ready(c: &Cluster, service: &str, ip: Ipv4Addr) -> Option<bool> {
    let out =
        c.cp.kubectl_ok([
            "get",
            "endpointslices",
            "-n",
            tapestry_tests::cluster::NAMESPACE,
            "-l",
            &format!(
                "kubernetes.io/service-name={service},\
                 endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io"
            ),
            "-o",
            "json",
        ])
        .ok()?;
    let list: serde_json::Value = serde_json::from_str(&out).ok()?;
    list["items"]
        .as_array()?
        .iter()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["addresses"][0] == ip.to_string())
        .map(|e| e["conditions"]["ready"] == true)
}

/// Guest readiness reaches the built-in EndpointSlice through the readiness gate: a VM pod
/// (annotated, so the chart's MutatingAdmissionPolicy gives it the gate) whose guest has not
/// booted is published not ready, though its containers are ready; it becomes ready when the
/// real QEMU guest answers the daemon's probe; paused with QEMU's monitor `stop` it leaves the
/// slice (and the daemons' backends) within 5 s, and comes back on `cont`. The lab plays the
/// kubelet's part: Ready computed from containers and gates (`cluster::kubelet_ready`).
#[test]
fn a_vm_pods_readiness_is_its_guests() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    tapestry_tests::require_qemu!();
    let mut c = Cluster::start("cluster-ready", 2).unwrap();
    c.install_readiness_gate().unwrap();
    let _kubelet = c.kubelet_readiness().unwrap();
    let pod = c
        .add_pod_with(0, "vmr", json!({"app": "vmr"}), Plumbing::AnnotatedVm)
        .unwrap();
    let gates =
        c.cp.kubectl_ok([
            "get",
            "pod",
            "vmr",
            "-o",
            "jsonpath={.spec.readinessGates[*].conditionType}",
        ])
        .unwrap();
    assert_eq!(gates.trim(), tapestry_tests::cluster::GUEST_READY_GATE);
    let client = c.add_pod(1, "client1", json!({"app": "client"})).unwrap();
    let vip = c.add_service("vmr", json!({"app": "vmr"})).unwrap();

    // Not booted: published, not ready, and it stays so.
    let ready = poll(Duration::from_secs(30), "vmr in the built-in slice", || {
        Ok(builtin_slice_ready(&c, "vmr", pod.ip))
    })
    .unwrap();
    assert!(!ready, "a VM pod without a running guest is ready");
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(3) {
        assert_eq!(builtin_slice_ready(&c, "vmr", pod.ip), Some(false));
        std::thread::sleep(Duration::from_millis(300));
    }
    let reason =
        c.cp.kubectl_ok([
            "get",
            "pod",
            "vmr",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].reason}",
        ])
        .unwrap();
    assert_eq!(reason.trim(), "ReadinessGatesNotReady");

    // The guest boots and answers: ready, and reached through the Service.
    let mut guest = Guest::boot_in(&pod.netns_path, GuestConfig::new("vmr", pod.mac)).unwrap();
    guest.wait_ready(Duration::from_secs(180)).unwrap();
    poll(Duration::from_secs(30), "vmr ready in the slice", || {
        Ok(builtin_slice_ready(&c, "vmr", pod.ip)
            .filter(|r| *r)
            .map(|_| ()))
    })
    .unwrap();
    c.wait_backends("vmr", &[pod.addr(8080)], Duration::from_secs(30))
        .unwrap();
    let got = client
        .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
        .unwrap();
    assert_eq!(got, "vmr");

    // Paused (hung): out of the slice, and of every daemon's backends, within 5 s.
    guest.monitor("stop", T).unwrap();
    let paused = Instant::now();
    poll(
        Duration::from_secs(15),
        "vmr not ready in the slice",
        || {
            Ok(builtin_slice_ready(&c, "vmr", pod.ip)
                .filter(|r| !*r)
                .map(|_| ()))
        },
    )
    .unwrap();
    let out = paused.elapsed();
    c.wait_backends("vmr", &[], Duration::from_secs(5)).unwrap();
    let gone = paused.elapsed();
    eprintln!(
        "paused guest: not ready in the slice after {out:?}, out of the backends after {gone:?}"
    );
    assert!(out < Duration::from_secs(5), "not ready only after {out:?}");
    assert!(
        gone < Duration::from_secs(5),
        "out of the backends only after {gone:?}"
    );
    let guest_ready =
        c.cp.kubectl_ok([
            "get",
            "guest",
            "vmr",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .unwrap();
    assert_eq!(
        guest_ready.trim(),
        "False",
        "the Guest's Ready was not cleared"
    );

    // Resumed: back.
    guest.monitor("cont", T).unwrap();
    let resumed = Instant::now();
    poll(Duration::from_secs(15), "vmr ready again", || {
        Ok(builtin_slice_ready(&c, "vmr", pod.ip)
            .filter(|r| *r)
            .map(|_| ()))
    })
    .unwrap();
    c.wait_backends("vmr", &[pod.addr(8080)], Duration::from_secs(10))
        .unwrap();
    eprintln!("resumed guest: ready again after {:?}", resumed.elapsed());
    let got = client
        .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
        .unwrap();
    assert_eq!(got, "vmr");
}

/// `iptables -I FORWARD -i <ifname> -j DROP` in a node's namespace (a primary CNI's policy, say):
/// what that interface brings in is not forwarded by the node's stack.
fn forward_drop(node: &tapestry_tests::cluster::Node, ifname: &str) {
    let out = node
        .run(
            std::process::Command::new("iptables")
                .args(["-w", "5", "-I", "FORWARD", "-i", ifname, "-j", "DROP"]),
        )
        .expect("running iptables");
    assert!(out.status.success(), "iptables on {}: {out:?}", node.name);
}

/// `--fast-path` across nodes: TCP and UDP, same node and across nodes both ways, replies and
/// hairpin, delivered by the programs past the nodes' stacks. FORWARD rules on node 0 drop
/// what its client pod and the fabric bring in, on node 1 what the fabric brings in: without
/// the fast path the VIP fails wherever a rule is on its way, with it every pair answers (on the
/// client's node both directions skip the stack; on the backend's node the flow's packets from
/// the fabric go straight into the pod, while its replies, to a pod elsewhere, are ordinary pod
/// packets to the stack, which is why node 1 has no rule on its pods' interfaces). The pod IP
/// from node 0's client stays blocked: traffic that no Service carries stays with the stack.
#[test]
fn the_fast_path_across_nodes_skips_the_nodes_forward_rules() {
    tapestry_tests::require_lab!();
    tapestry_tests::require_k8s!();
    let mut c = Cluster::start("cluster-fast", 2).unwrap();
    let (backends, _servers, clients) = web_and_clients(&mut c);
    let per_node: Vec<Ipv4Addr> = (0..2)
        .map(|n| {
            c.add_service(
                &format!("web-n{n}"),
                json!({"app": "web", "node": format!("n{n}")}),
            )
            .unwrap()
        })
        .collect();
    for (n, be) in backends.iter().enumerate() {
        c.wait_backends(
            &format!("web-n{n}"),
            &[be.addr(8080)],
            Duration::from_secs(20),
        )
        .unwrap();
    }
    forward_drop(&c.nodes[0], &clients[0].host_ifname);
    forward_drop(&c.nodes[0], "eth0");
    forward_drop(&c.nodes[1], "eth0");
    let short = Duration::from_millis(1500);
    let at = |n: usize| SocketAddrV4::new(per_node[n], 80);

    // Without the fast path: blocked wherever a rule is on the way.
    for (client, backend) in [(0, 0), (0, 1), (1, 0)] {
        assert!(
            clients[client]
                .tcp_request(at(backend), b"hi\n", short)
                .is_err(),
            "client{client} -> web-n{backend}: the FORWARD rules apply without the fast path"
        );
    }
    assert_eq!(
        clients[1].tcp_request(at(1), b"hi\n", T).unwrap(),
        "web1",
        "no rule on that way"
    );

    for node in &mut c.nodes {
        node.daemon.add_extra_args(&["--fast-path"]);
        node.daemon.restart().unwrap();
    }
    for client in &clients {
        for _ in 0..5 {
            each_nodes_backend(
                &client.name,
                &per_node,
                |a| client.tcp_request(a, b"hi\n", T),
                |a| client.udp_request(a, b"hi\n", T),
            );
        }
    }
    // Hairpin: a backend through its own Service.
    for (n, be) in backends.iter().enumerate() {
        assert_eq!(
            be.tcp_request(at(n), b"me\n", T).unwrap(),
            format!("web{n}")
        );
        assert_eq!(
            be.udp_request(at(n), b"me\n", T).unwrap(),
            format!("web{n}")
        );
    }
    for node in &c.nodes {
        let metrics = node.daemon.client().metrics().unwrap();
        let fast: u64 = metrics
            .lines()
            .find(|l| l.starts_with("tapestry_datapath_events") && l.contains("\"fast_path\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no fast_path counter on {}", node.name));
        assert!(fast >= 40, "{}: fast_path counted {fast}", node.name);
    }
    assert!(
        clients[0]
            .tcp_request(backends[1].addr(8080), b"hi\n", short)
            .is_err(),
        "the pod IP, no Service: still the stack's, and its rules'"
    );
}
