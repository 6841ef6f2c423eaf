//! `make demo-node`: Tapestry on a real Kubernetes node on this machine. A kubelet drives
//! containerd (no registry: images imported with `ctr`), the primary CNI is the reference bridge
//! with host-local, and there is no kube-proxy. Tapestry is installed with its Helm chart; two
//! pods and a VM pod (QEMU on the pod's `tap0`, as KubeVirt runs it) sit behind one Service made
//! with `kubectl expose`; a client pod reaches all three through the ClusterIP; the VM pod is
//! deleted and its endpoint goes; `helm uninstall` gives the primary its conflist back.
//! Everything is stopped and undone at the end (tests/src/node.rs).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tapestry_tests::node::{self, Node};

#[derive(Debug, Parser)]
#[command(about = "Tapestry on a real Kubernetes node: pods and a VM pod behind one ClusterIP")]
struct Args {
    /// Requests through the ClusterIP in each round.
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// After the demo, keep the node (with Tapestry installed) running until Ctrl-C, and print
    /// how to reach it with kubectl.
    #[arg(long)]
    hold: bool,
    /// Clean up a node left by a killed run (its record in /run/tapestry-node), and exit.
    #[arg(long)]
    cleanup: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() {
    let args = Args::parse();
    // Ctrl-C ends the demo through the normal path, so the node is cleaned up.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Err(e) = run(args) {
        eprintln!("demo-node failed: {e:#}");
        std::process::exit(1);
    }
}

fn heading(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if args.cleanup {
        for line in node::cleanup_stale()? {
            println!("{line}");
        }
        println!("nothing left of a test node on this machine");
        return Ok(());
    }
    if let Err(why) = node::require_tapestry() {
        bail!("{why} (`make demo-node` runs scripts/setup.sh and `make images` first)");
    }

    heading(
        "1. A real node: etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet",
    );
    let t = Instant::now();
    let node = Node::start()?;
    println!(
        "node {} Ready in {:.1} s; InternalIP {}, pods on {} (bridge {}), no kube-proxy",
        node::NAME,
        t.elapsed().as_secs_f64(),
        node::NODE_IP,
        node::POD_SUBNET,
        node::BRIDGE
    );
    println!(
        "primary conflist {}:\n{}",
        node.primary_conflist_path().display(),
        node.primary_conflist().trim()
    );
    check_interrupt()?;

    heading("2. helm install tapestry (images from `make images`, imported with ctr)");
    node.import_tapestry_images()?;
    let t = Instant::now();
    node.install_tapestry(&[])?;
    println!("installed and ready in {:.1} s", t.elapsed().as_secs_f64());
    println!(
        "{}",
        node.kubectl_ok(["get", "pods", "-n", node::TAPESTRY_NAMESPACE, "-o", "wide"])?
    );
    println!(
        "the install container chained tapestry-cni in:\n{}",
        std::fs::read_to_string(node.primary_conflist_path())?.trim()
    );
    check_interrupt()?;

    heading(&format!(
        "2b. The cluster DNS: CoreDNS behind kube-system/kube-dns ({}), through Tapestry",
        node::CLUSTER_DNS_IP
    ));
    let e2e = tapestry_tests::conformance::E2e::build()?;
    let coredns = e2e.coredns()?.to_string();
    if let Some((_, archive)) = e2e.images.iter().find(|(n, _)| *n == coredns) {
        node.import_image(archive)?;
    }
    let t = Instant::now();
    node.deploy_cluster_dns(&coredns, Duration::from_secs(120))?;
    println!(
        "CoreDNS ({coredns}) answers through the ClusterIP in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    check_interrupt()?;

    heading("3. Two pods and a VM pod behind `kubectl expose`");
    let web = [("app", "web")];
    node.apply(&node.server_pod("web-a", &web))?;
    node.apply(&node.server_pod("web-b", &web))?;
    node.apply(&node.vm_pod("vm-a", &web))?;
    node.apply(&node.client_pod("client"))?;
    for p in ["web-a", "web-b", "client"] {
        node.wait_pod_running("default", p, Duration::from_secs(90))?;
    }
    println!("pods running; waiting for the VM pod's guest to boot (software emulation)");
    let t = Instant::now();
    let vm = node
        .wait_pod_ready("default", "vm-a", Duration::from_secs(180))
        .context("the VM pod's guest never served TCP 8080")?;
    println!(
        "VM pod vm-a Ready in {:.1} s: its guest holds the pod IP {vm}",
        t.elapsed().as_secs_f64()
    );
    node.kubectl_ok([
        "expose",
        "pod",
        "web-a",
        "--name=web",
        "--port=80",
        "--target-port=8080",
        "--selector=app=web",
    ])?;
    let vip = node.cluster_ip("web")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.ready_endpoints("web")?.len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("{}", node.kubectl_ok(["get", "pods", "-o", "wide"])?);
    println!("{}", node.kubectl_ok(["get", "endpointslices"])?);
    if let Ok(guests) = node.kubectl_ok(["get", "guests", "-A"]) {
        println!("{guests}");
    }
    check_interrupt()?;

    heading(&format!("4. The client pod -> ClusterIP {vip}:80"));
    let client = node.pod_netns("default", "client")?;
    let name = "web.default.svc.cluster.local";
    let resolved = tapestry_netns::run_in(&client, || {
        tapestry_tests::net::dns_query_a(
            SocketAddrV4::new(node::CLUSTER_DNS_IP, 53),
            name,
            Duration::from_secs(3),
        )
    })??;
    println!("the client resolves {name} to {resolved:?}");
    rounds(&client, vip, args.requests)?;
    check_interrupt()?;

    heading("5. kubectl delete pod vm-a: its endpoint goes");
    node.kubectl_ok(["delete", "pod", "vm-a", "--grace-period=1", "--wait=true"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.ready_endpoints("web")?.contains(&vm) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("ready endpoints now: {:?}", node.ready_endpoints("web")?);
    std::thread::sleep(Duration::from_secs(1));
    rounds(&client, vip, args.requests)?;
    check_interrupt()?;

    if args.hold {
        heading("Holding the node (Ctrl-C to stop and clean up)");
        println!(
            "kubectl --kubeconfig {} get pods -A",
            node.kubeconfig().display()
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
        INTERRUPTED.store(false, Ordering::SeqCst);
    }

    heading("6. helm uninstall tapestry: the primary's conflist comes back");
    let before: serde_json::Value = serde_json::from_str(&node.primary_conflist())?;
    node.uninstall_tapestry()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = String::new();
    let mut same = false;
    while !same && Instant::now() < deadline {
        now = std::fs::read_to_string(node.primary_conflist_path())?;
        same = serde_json::from_str::<serde_json::Value>(&now)
            .ok()
            .as_ref()
            == Some(&before);
        if !same {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if same {
        println!(
            "the conflist is the primary's again (the same JSON):\n{}",
            now.trim()
        );
    } else {
        bail!("the conflist after helm uninstall differs from the primary's:\n{now}");
    }

    heading("7. Stopping the node and undoing its host changes");
    let mut node = node;
    node.stop()?;
    println!("done");
    Ok(())
}

/// `n` requests through the ClusterIP from the client pod; prints who answered.
fn rounds(client: &Path, vip: Ipv4Addr, n: usize) -> Result<()> {
    let addr = SocketAddrV4::new(vip, 80);
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..n {
        let t = Instant::now();
        let reply = tapestry_netns::run_in(client, || {
            tapestry_tests::tcp_request(addr, b"hi\n", Duration::from_secs(3))
        })?;
        let who = match reply {
            Ok(name) => name,
            Err(e) => format!("error: {e}"),
        };
        let kind = if who.starts_with("vm-") {
            " (VM guest)"
        } else {
            ""
        };
        println!(
            "  request {:>2}: {who}{kind}  {:.1} ms",
            i + 1,
            t.elapsed().as_secs_f64() * 1e3
        );
        *counts.entry(who).or_default() += 1;
    }
    println!("  answered: {counts:?}");
    Ok(())
}
