//! Tests of the netns lab itself: connectivity, in-pod execution, teardown, isolation between
//! labs. Need root, bpffs and `ip`; skipped otherwise (failed under `CI=...`).

use std::collections::HashSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tapestry_tests::{
    Lab, destroy_lab, lab_resources, pids_in_netns, registered_labs, require_lab, stream_request,
    tcp_request, udp_request,
};

const T: Duration = Duration::from_secs(3);

fn ip_netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_link() -> String {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_gone(prefix: &str, netns: &[String], links: &[String]) {
    let list = ip_netns_list();
    let ls = ip_link();
    for ns in netns {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "netns {ns} survived teardown:\n{list}"
        );
    }
    for l in links {
        assert!(
            !ls.contains(&format!(" {l}:")) && !ls.contains(&format!(" {l}@")),
            "link {l} survived teardown:\n{ls}"
        );
    }
    assert_eq!(
        lab_resources(prefix),
        (vec![], vec![]),
        "resources of {prefix} left"
    );
    assert!(
        !registered_labs().unwrap().iter().any(|p| p == prefix),
        "reservation of {prefix} left"
    );
}

#[test]
fn pods_reach_each_other_over_tcp_and_udp() {
    require_lab!();
    let mut lab = Lab::new("pods_reach_each_other").unwrap();
    let a = lab.add_pod("pod-a").unwrap();
    let b = lab.add_pod("pod-b").unwrap();
    assert_ne!(a.ip, b.ip);
    assert_ne!(a.host_ifindex, b.host_ifindex);
    assert!(a.host_ifname.len() <= 15 && a.host_ifname.starts_with(lab.prefix()));

    let a_tcp = a.serve_tcp_name(8080).unwrap();
    let a_udp = a.serve_udp_name(5353).unwrap();
    let b_tcp = b.serve_tcp_name(8080).unwrap();
    let b_udp = b.serve_udp_name(5353).unwrap();

    // Sequential requests, both directions.
    for _ in 0..20 {
        assert_eq!(a.tcp_request(b.addr(8080), b"who", T).unwrap(), "pod-b");
        assert_eq!(b.tcp_request(a.addr(8080), b"who\n", T).unwrap(), "pod-a");
        assert_eq!(a.udp_request(b.addr(5353), b"who", T).unwrap(), "pod-b");
        assert_eq!(b.udp_request(a.addr(5353), b"who", T).unwrap(), "pod-a");
    }
    // The servers saw the client pods' own addresses (plain routing, no NAT).
    assert_eq!(b_tcp.client_ips().get(&IpAddr::V4(a.ip)), Some(&20));
    assert_eq!(a_udp.client_ips().get(&IpAddr::V4(b.ip)), Some(&20));
    assert_eq!(b_tcp.connections(), 20);
    assert_eq!(b_udp.requests(), 20);

    // Concurrent clients.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..10 {
                    assert_eq!(a.tcp_request(b.addr(8080), b"x", T).unwrap(), "pod-b");
                    assert_eq!(a.udp_request(b.addr(5353), b"x", T).unwrap(), "pod-b");
                }
            });
        }
    });
    assert_eq!(b_tcp.connections(), 100);

    // A long-lived stream carries many requests, from another thread than the one that made it.
    let mut stream = a.tcp_connect(b.addr(8080), T).unwrap();
    std::thread::spawn(move || {
        for _ in 0..50 {
            assert_eq!(stream_request(&mut stream, b"again").unwrap(), "pod-b");
        }
    })
    .join()
    .unwrap();
    assert_eq!(b_tcp.connections(), 101);

    // Nothing listens on this port: refused quickly, not a timeout.
    let start = Instant::now();
    let err = a.tcp_request(b.addr(9), b"x", T).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(start.elapsed() < T);

    drop(a_tcp);
    let err = b.tcp_request(a.addr(8080), b"x", T).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "server stopped on drop"
    );
}

#[test]
fn host_reaches_pods() {
    require_lab!();
    let mut lab = Lab::new("host_reaches_pods").unwrap();
    let p = lab.add_pod("web").unwrap();
    let tcp = p.serve_tcp_name(0).unwrap();
    let udp = p.serve_udp_name(0).unwrap();
    assert_ne!(tcp.port(), 0);
    // Free functions run in the calling thread's namespace: the host.
    for _ in 0..5 {
        assert_eq!(tcp_request(p.addr(tcp.port()), b"hi", T).unwrap(), "web");
        assert_eq!(udp_request(p.addr(udp.port()), b"hi", T).unwrap(), "web");
    }
    // The host's source address is not a lab address.
    let seen = tcp.last_peer().unwrap();
    assert_ne!(seen.ip(), IpAddr::V4(p.ip));
    // A pod reaches a socket on the host too (via its default route).
    let host_sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let port = host_sock.local_addr().unwrap().port();
    let IpAddr::V4(host_ip) = seen.ip() else {
        panic!("v6 peer")
    };
    let h = std::thread::spawn(move || {
        host_sock.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = host_sock.recv_from(&mut buf).unwrap();
        host_sock.send_to(b"host\n", from).unwrap();
        (buf[..n].to_vec(), from)
    });
    let reply = p
        .udp_request(SocketAddrV4::new(host_ip, port), b"ping", T)
        .unwrap();
    let (got, from) = h.join().unwrap();
    assert_eq!(reply, "host");
    assert_eq!(got, b"ping");
    assert_eq!(from.ip(), IpAddr::V4(p.ip));
}

#[test]
fn topology_and_sysctls() {
    require_lab!();
    let mut lab = Lab::new("topology").unwrap();
    let p = lab.add_pod("p0").unwrap();
    let (net, len) = lab.pod_cidr();
    assert_eq!(len, 25);
    let o = net.octets();
    assert_eq!(o[0], 10);
    assert!((240..=255).contains(&o[1]));
    assert_eq!(p.ip, Ipv4Addr::new(o[0], o[1], o[2], 2));
    assert_eq!(lab.service_ip(0), Ipv4Addr::new(o[0], o[1], o[2], 128));
    assert_eq!(lab.service_cidr(), (lab.service_ip(0), 25));

    let host = |k: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{k}"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(host("ip_forward"), "1");
    assert_eq!(host(&format!("conf/{}/proxy_arp", p.host_ifname)), "1");
    assert_eq!(host(&format!("conf/{}/rp_filter", p.host_ifname)), "0");

    let routes = p.ip(&["-4", "route"]).unwrap();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0 onlink"),
        "{routes}"
    );
    let addrs = p.ip(&["-4", "-o", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(addrs.contains(&format!("{}/32", p.ip)), "{addrs}");
    let host_route =
        tapestry_tests::cmd::ip(&["-4", "route", "show", &format!("{}/32", p.ip)]).unwrap();
    assert!(host_route.contains(&p.host_ifname), "{host_route}");

    // Pod sysctls are the pod's own.
    let root_tw = host("tcp_max_tw_buckets");
    p.set_sysctl("net.ipv4.tcp_max_tw_buckets", "0").unwrap();
    assert_eq!(p.sysctl("net.ipv4.tcp_max_tw_buckets").unwrap(), "0");
    assert_eq!(host("tcp_max_tw_buckets"), root_tw);

    // MACs and ifindexes match what the kernel reports.
    let link = p.ip(&["-o", "link", "show", "dev", "eth0"]).unwrap();
    let mac = p.mac.map(|b| format!("{b:02x}")).join(":");
    assert!(link.contains(&mac), "{link} vs {mac}");
    assert!(link.starts_with(&format!("{}: eth0@", p.ifindex)), "{link}");
    let host_ifindex: u32 =
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", p.host_ifname))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert_eq!(host_ifindex, p.host_ifindex);
}

#[test]
fn processes_and_threads_run_inside_the_pod() {
    require_lab!();
    let mut lab = Lab::new("exec").unwrap();
    let p = lab.add_pod("box").unwrap();

    // A child process sees the pod's interfaces and, unlike `ip netns exec`, /sys/fs/bpf.
    let out = p
        .run(Command::new("ip").args(["-4", "-o", "addr"]))
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&p.ip.to_string()));
    let fs = p
        .run_ok(Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]))
        .unwrap();
    assert_eq!(fs.trim(), "bpf_fs");

    // A thread inside the pod: the socket it creates stays in the pod.
    let sock = p
        .in_netns(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap())
        .unwrap();
    let port = sock.local_addr().unwrap().port();
    let reply_thread = std::thread::spawn(move || {
        sock.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 16];
        let (_, from) = sock.recv_from(&mut buf).unwrap();
        sock.send_to(b"in-pod\n", from).unwrap();
    });
    assert_eq!(udp_request(p.addr(port), b"?", T).unwrap(), "in-pod");
    reply_thread.join().unwrap();

    // Panics inside in_netns reach the caller.
    let r = std::panic::catch_unwind(|| p.in_netns(|| panic!("boom")));
    assert!(r.is_err());

    // A spawned child is found in the pod and killed at teardown.
    let mut child = p
        .spawn(
            Command::new("sleep")
                .arg("60")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + T;
    while !pids_in_netns(&p.netns_path).unwrap().contains(&pid) {
        assert!(
            Instant::now() < deadline,
            "child never showed up in the pod"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.destroy().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep was killed, not finished");
}

#[test]
fn teardown_removes_namespaces_links_and_reservation() {
    require_lab!();
    let mut lab = Lab::new("teardown").unwrap();
    let prefix = lab.prefix().to_string();
    for name in ["one", "two", "a-very-long-pod-name-indeed"] {
        lab.add_pod(name).unwrap();
    }
    let netns: Vec<String> = lab.pods().iter().map(|p| p.netns.clone()).collect();
    let links: Vec<String> = lab.pods().iter().map(|p| p.host_ifname.clone()).collect();
    assert_eq!(links.iter().collect::<HashSet<_>>().len(), 3);
    let list = ip_netns_list();
    for ns in &netns {
        assert!(list.contains(ns.as_str()), "{ns} missing:\n{list}");
    }
    assert!(registered_labs().unwrap().contains(&prefix));
    let _srv = lab.pods()[0].serve_tcp_name(80).unwrap();
    let _udp = lab.pods()[1].serve_udp_name(53).unwrap();
    drop(lab); // Drop, not destroy(): the path every test takes
    assert_gone(&prefix, &netns, &links);

    // Bad names and duplicates are refused.
    let mut lab = Lab::new("names").unwrap();
    lab.add_pod("x").unwrap();
    assert!(lab.add_pod("x").is_err());
    assert!(lab.add_pod("bad name").is_err());
    assert!(lab.add_pod("").is_err());
    assert!(lab.add_pod("sl/ash").is_err());
}

#[test]
fn kept_and_abandoned_labs_are_cleaned_up_later() {
    require_lab!();
    // Kept: survives drop, removed by destroy_lab.
    let mut lab = Lab::new("kept").unwrap();
    let p = lab.add_pod("stay").unwrap();
    let prefix = lab.prefix().to_string();
    lab.keep();
    drop(lab);
    assert_eq!(lab_resources(&prefix).0, vec![p.netns.clone()]);
    assert!(registered_labs().unwrap().contains(&prefix));
    assert!(ip_netns_list().contains(&p.netns));
    destroy_lab(&prefix).unwrap();
    assert_gone(
        &prefix,
        std::slice::from_ref(&p.netns),
        std::slice::from_ref(&p.host_ifname),
    );

    // Abandoned (owner "crashed"): the next Lab::new (here, or in a parallel test) sweeps it,
    // processes included.
    let mut lab = Lab::new("abandoned").unwrap();
    let p = lab.add_pod("orphan").unwrap();
    let mut child = p
        .spawn(Command::new("sleep").arg("60").stdout(Stdio::null()))
        .unwrap();
    let prefix = lab.prefix().to_string();
    lab.abandon();
    let _other = Lab::new("sweeper").unwrap();
    assert_gone(
        &prefix,
        std::slice::from_ref(&p.netns),
        std::slice::from_ref(&p.host_ifname),
    );
    assert!(!child.wait().unwrap().success());
    assert!(destroy_lab(&prefix).is_err(), "nothing left to destroy");
}

/// A barrier that gives up (panics) after a deadline, and lets everyone through once a
/// participant has panicked, so one failing thread cannot hang the others.
struct Rendezvous {
    n: usize,
    arrived: AtomicUsize,
    failed: AtomicUsize,
}

impl Rendezvous {
    fn new(n: usize) -> Self {
        Rendezvous {
            n,
            arrived: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        }
    }

    /// Waits for round `round` (1, 2, ...).
    fn wait(&self, round: usize) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.arrived.load(Ordering::SeqCst) < self.n * round {
            assert_eq!(
                self.failed.load(Ordering::SeqCst),
                0,
                "another thread failed"
            );
            assert!(Instant::now() < deadline, "rendezvous timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Marks the rendezvous failed if the thread unwinds.
struct FailOnPanic<'a>(&'a Rendezvous);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[test]
fn concurrent_labs_do_not_collide() {
    require_lab!();
    const N: usize = 4;
    let barrier = Arc::new(Rendezvous::new(N));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let _guard = FailOnPanic(&barrier);
                barrier.wait(1);
                let mut lab = Lab::new(&format!("concurrent-{i}")).unwrap();
                // Same pod names in every lab.
                let a = lab.add_pod("a").unwrap();
                let b = lab.add_pod("b").unwrap();
                let _srv = b.serve_tcp_name(7000).unwrap();
                barrier.wait(2); // all labs exist at once
                for _ in 0..5 {
                    assert_eq!(a.tcp_request(b.addr(7000), b"x", T).unwrap(), "b");
                }
                barrier.wait(3);
                (
                    lab.prefix().to_string(),
                    lab.pod_cidr().0,
                    a.host_ifname.clone(),
                    b.ip,
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let prefixes: HashSet<_> = results.iter().map(|r| r.0.clone()).collect();
    let subnets: HashSet<_> = results.iter().map(|r| r.1).collect();
    let ifnames: HashSet<_> = results.iter().map(|r| r.2.clone()).collect();
    let ips: HashSet<_> = results.iter().map(|r| r.3).collect();
    assert_eq!(prefixes.len(), N);
    assert_eq!(subnets.len(), N);
    assert_eq!(ifnames.len(), N);
    assert_eq!(ips.len(), N);
    for (prefix, ..) in &results {
        assert_eq!(lab_resources(prefix), (vec![], vec![]));
    }
}

#[test]
fn prerequisites_are_reported() {
    // Runs everywhere: as root with bpffs this is Ok, otherwise the message names the gap.
    match tapestry_tests::require_root_and_bpffs() {
        Ok(()) => assert!(tapestry_tests::lab_available()),
        Err(why) => assert!(why.starts_with("missing prerequisite"), "{why}"),
    }
    let _ = std::io::stderr().flush();
}
