//! Tapestry plays well with a primary CNI's tc programs: after a rewrite the load balancer
//! continues the TCX chain, so a program attached after ours on the same hook (here a probe
//! standing in for Cilium's or Calico's) runs and sees the packet as we left it: on the endpoint's
//! ingress addressed to the backend, on its egress (the reply) from the frontend.
//!
//! Real packets: a "pod" namespace whose eth0 is a veth to a "node" namespace; the node holds the
//! backend (a TCP server on the veth's node-side address: a host-network endpoint) and runs the
//! datapath, attached the way the daemon attaches it; the pod connects to the Service VIP.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use tapestry_api::state::{self, DesiredState};
use tapestry_node_daemon::{datapath::Datapath, services::reconcile::Reconciler};

mod common;
use common::{PinDir, prerequisites};

static PROBE: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapestry-chain-probe"));

/// The probe's record (ebpf/src/bin/chain_probe.rs `Seen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    packets: u64,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u32,
}
// SAFETY: plain old data, `repr(C)`, every bit pattern valid.
unsafe impl aya::Pod for Seen {}

impl Seen {
    fn src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(self.saddr)),
            u16::from_be(self.sport),
        )
    }
    fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(self.daddr)),
            u16::from_be(self.dport),
        )
    }
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 10);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);

/// Two namespaces joined by a veth; deleted when dropped.
struct Topology {
    node: String,
    pod: String,
    veth: String,
}

impl Topology {
    fn new() -> Topology {
        let id = std::process::id() % 100_000;
        let t = Topology {
            node: format!("tpchain-n{id}"),
            pod: format!("tpchain-p{id}"),
            veth: format!("tpc{id}"),
        };
        let _ = ip(&["netns", "del", &t.node]);
        let _ = ip(&["netns", "del", &t.pod]);
        ip(&["netns", "add", &t.node]).unwrap();
        ip(&["netns", "add", &t.pod]).unwrap();
        let (n, p, v) = (&t.node, &t.pod, &t.veth);
        for args in [
            vec![
                "-n", n, "link", "add", v, "type", "veth", "peer", "eth0", "netns", p,
            ],
            vec!["-n", n, "addr", "add", "10.250.0.1/24", "dev", v],
            vec!["-n", n, "link", "set", v, "up"],
            vec!["-n", n, "link", "set", "lo", "up"],
            vec!["-n", p, "addr", "add", "10.250.0.2/24", "dev", "eth0"],
            vec!["-n", p, "link", "set", "eth0", "up"],
            vec!["-n", p, "link", "set", "lo", "up"],
            vec!["-n", p, "route", "add", "default", "via", "10.250.0.1"],
        ] {
            ip(&args).unwrap();
        }
        t
    }

    fn path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.pod]);
        let _ = ip(&["netns", "del", &self.node]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn a_program_after_ours_runs_and_sees_the_rewritten_packets() {
    if !prerequisites() {
        return;
    }
    let topo = Topology::new();
    let pins = PinDir::new("chain");
    let node_ns = Topology::path(&topo.node);

    // The node: the datapath with one Service (VIP:80 -> the node's own address :8080), attached
    // to the pod's veth as the daemon attaches it; then the probe, last on both hooks.
    let yaml = format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    backends:\n      - {{ip: {NODE}, port: 8080}}\n"
    );
    let veth = topo.veth.clone();
    let pin_dir = pins.path().to_owned();
    let (datapath, mut probe, listener) = tapestry_netns::run_in(&node_ns, move || {
        let mut datapath = Datapath::load(&pin_dir).expect("datapath loads and verifies");
        let desired: Arc<DesiredState> =
            Arc::new(state::parse(&yaml, Some(state::Format::Yaml)).unwrap());
        Reconciler::restore(&datapath.maps)
            .unwrap()
            .apply(&mut datapath.maps, &desired)
            .unwrap();
        datapath.pins().attach(&veth).expect("attach the datapath");

        let mut probe = Ebpf::load(PROBE).expect("the probe loads");
        for (name, hook) in [
            ("chain_probe_ingress", TcAttachType::Ingress),
            ("chain_probe_egress", TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = probe.program_mut(name).unwrap().try_into().unwrap();
            prog.load().unwrap();
            prog.attach_with_options(&veth, hook, TcAttachOptions::TcxOrder(LinkOrder::last()))
                .unwrap_or_else(|e| panic!("attaching {name} after ours: {e}"));
        }
        let listener = TcpListener::bind(SocketAddrV4::new(NODE, 8080)).unwrap();
        (datapath, probe, listener)
    })
    .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(b"pong").unwrap();
        peer
    });

    let reply = tapestry_netns::run_in(Topology::path(&topo.pod), || {
        let mut conn =
            TcpStream::connect_timeout(&SocketAddrV4::new(VIP, 80).into(), Duration::from_secs(5))
                .expect("the pod reaches the Service through the chain");
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let local = conn.local_addr().unwrap();
        conn.write_all(b"ping\n").unwrap();
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).unwrap();
        (local, conn.peer_addr().unwrap(), buf)
    })
    .unwrap();
    let (local, peer, body) = reply;
    assert_eq!(body, b"pong");
    assert_eq!(peer.to_string(), format!("{VIP}:80"), "the pod saw the VIP");
    let seen_by_server = server.join().unwrap();
    assert_eq!(seen_by_server.ip(), std::net::IpAddr::V4(POD));

    let seen: Array<_, Seen> = Array::try_from(probe.map_mut("CHAIN_PROBE_SEEN").unwrap()).unwrap();
    let ingress = seen.get(&0, 0).unwrap();
    let egress = seen.get(&1, 0).unwrap();
    // Ingress (what the pod sends): after ours, addressed to the backend.
    assert!(
        ingress.packets >= 3,
        "the probe ran after ours on ingress: {ingress:?}"
    );
    assert_eq!(ingress.dst(), SocketAddrV4::new(NODE, 8080), "{ingress:?}");
    assert_eq!(ingress.src().to_string(), local.to_string());
    // Egress (what is delivered to the pod): after ours, from the frontend again.
    assert!(
        egress.packets >= 3,
        "the probe ran after ours on egress: {egress:?}"
    );
    assert_eq!(egress.src(), SocketAddrV4::new(VIP, 80), "{egress:?}");
    assert_eq!(egress.dst().to_string(), local.to_string());
    drop(datapath);
}
