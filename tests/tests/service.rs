//! Service load balancing through real network namespaces: real TCP and UDP clients reach
//! backends in other pods through a VIP programmed by a real tapestryd from a state file.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
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
    let s = setup("lb-tcp-udp", 3);
    let all: Vec<&Pod> = s.backends.iter().collect();
    let d = Daemon::start("lb-tcp-udp", &s.state(&all, ""), &s.interfaces()).unwrap();

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
    let s = setup("lb-hairpin", 1);
    let be = &s.backends[0];
    let _d = Daemon::start("lb-hairpin", &s.state(&[be], ""), &s.interfaces()).unwrap();
    let r = be
        .tcp_request(SocketAddrV4::new(s.vip, 80), b"me\n", T)
        .expect("hairpin through the VIP");
    assert_eq!(r, "be0");
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
