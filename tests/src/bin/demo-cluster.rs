//! `make demo-cluster`: three Kubernetes nodes on this host (tapestry_tests::cluster: network
//! namespaces on one fabric, one real apiserver and controller-manager, a tapestryd per node in
//! Kubernetes mode, pods plumbed by the real CNI chain), one Service spread over pods on all
//! three nodes and QEMU guests in VM pods on two of them. Every node's client sends requests
//! through the ClusterIP; the demo prints which node and which VM or pod answered, then each
//! node's `tapestry service list`. Then a VM live-migrates from node 1 to node 2 and back while
//! a client on node 0 keeps one connection to it through its ClusterIP.

use std::{collections::BTreeMap, net::SocketAddrV4, process::Command, time::Duration};

use anyhow::{Result, bail};
use clap::Parser;
use serde_json::json;
use tapestry_tests::{
    Pod,
    cluster::Cluster,
    daemon::binary,
    guest::require_qemu,
    migration::{StreamClient, Vm},
    require_root_and_bpffs,
};

#[derive(Debug, Parser)]
#[command(about = "Three nodes, one Service over VMs and pods on all of them")]
struct Args {
    /// Requests per client.
    #[arg(long, default_value_t = 9)]
    requests: usize,
    /// Pods only: no VM guests (no QEMU needed).
    #[arg(long)]
    no_vm: bool,
    /// Keep everything up until Ctrl-C.
    #[arg(long)]
    hold: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("demo-cluster failed: {e:#}");
        std::process::exit(1);
    }
}

fn heading(s: &str) {
    println!("\n== {s}");
}

fn run(args: Args) -> Result<()> {
    if let Err(why) = require_root_and_bpffs() {
        bail!("{why} (run `make demo-cluster` as root)");
    }
    if !args.no_vm
        && let Err(why) = require_qemu()
    {
        bail!("{why} (or run with DEMO_ARGS=--no-vm)");
    }
    heading("1. Three nodes: a control plane on the fabric, a tapestryd per node");
    let mut c = Cluster::start("demo-cluster", 3)?;
    for n in &c.nodes {
        println!(
            "  {}: underlay {}, pods {}/{}, tapestryd pid {}",
            n.name,
            n.underlay_ip,
            n.pod_cidr.0,
            n.pod_cidr.1,
            n.daemon.pid().unwrap_or(0)
        );
    }

    heading("2. Backends: a pod on every node, a VM on nodes 0 and 1");
    let mut servers = Vec::new();
    let mut names = BTreeMap::new();
    let mut guests = Vec::new();
    for n in 0..3 {
        let name = format!("web-pod-{n}");
        let pod = c.add_pod(n, &name, json!({"app": "web"}))?;
        servers.push(pod.serve_tcp_name(8080)?);
        println!("  pod {name} on node-{n}: {}", pod.ip);
        names.insert(name, (format!("node-{n}"), "pod"));
    }
    if !args.no_vm {
        for n in 0..2 {
            let name = format!("web-vm-{n}");
            println!("  booting VM {name} on node-{n} (QEMU, TCG: about a minute)...");
            let (pod, guest) = c.add_vm_pod(n, &name, json!({"app": "web"}))?;
            println!(
                "  VM {name} on node-{n}: {} (its pod's IP, by DHCP)",
                pod.ip
            );
            names.insert(name, (format!("node-{n}"), "vm"));
            guests.push(guest);
        }
    }
    let mut clients = Vec::new();
    for n in 0..3 {
        clients.push(c.add_pod(n, &format!("client-{n}"), json!({"app": "client"}))?);
    }
    let vip = c.add_service("web", json!({"app": "web"}))?;
    let mut want: Vec<SocketAddrV4> = c
        .lab
        .pods()
        .iter()
        .filter(|p| p.name.starts_with("web-"))
        .map(|p| p.addr(8080))
        .collect();
    want.sort();
    c.wait_backends("web", &want, Duration::from_secs(60))?;
    println!(
        "  Service default/web: ClusterIP {vip}, {} backends on every node's maps",
        want.len()
    );

    heading("3. Requests through the ClusterIP, from every node");
    for client in &clients {
        let node = c.node_of(&client.name).unwrap_or(0);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..args.requests {
            let who =
                client.tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", Duration::from_secs(5))?;
            let (at, kind) = names.get(&who).cloned().unwrap_or(("?".into(), "?"));
            println!(
                "  {} (node-{node}) -> {vip}:80 -> {kind} {who} on {at}",
                client.name
            );
            *counts.entry(who).or_default() += 1;
        }
        println!("  {}: {counts:?}", client.name);
    }

    heading("4. Each node's `tapestry service list`");
    let cli = binary("tapestry")?;
    for n in &c.nodes {
        println!("-- {}", n.name);
        let out = Command::new(&cli)
            .arg("--socket")
            .arg(&n.daemon.socket)
            .args(["service", "list"])
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    if !args.no_vm {
        migrate_demo(&mut c, &clients[0])?;
    }
    if args.hold {
        println!(
            "\nholding (Ctrl-C to tear down); kubectl: --kubeconfig {}",
            c.cp.kubeconfig_path("admin")?.display()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("\ndone; tearing down");
    drop(guests);
    Ok(())
}

/// Step 5: a VM of its own Service moves node-1 -> node-2 -> node-1 by QEMU's live migration
/// while `client` streams requests over one connection through the ClusterIP.
fn migrate_demo(c: &mut Cluster, client: &Pod) -> Result<()> {
    heading("5. Live migration: a VM moves node-1 -> node-2 -> node-1, one connection kept");
    println!("  booting VM mover on node-1...");
    let labels = json!({"app": "mover"});
    let (pod, guest) = c.add_vm_pod(1, "mover", labels.clone())?;
    let vip = c.add_service("mover", labels.clone())?;
    c.wait_backends("mover", &[pod.addr(8080)], Duration::from_secs(60))?;
    let stream = StreamClient::start(
        client,
        SocketAddrV4::new(vip, 80),
        Duration::from_millis(10),
        Duration::from_secs(20),
    )?;
    let ip = pod.ip;
    let mut vm = Vm::new(pod, guest, 1, labels, "mover");
    println!(
        "  {} streams to {vip}:80 (guest {ip} in pod mover on node-1), a request every 10 ms",
        client.name
    );
    for (i, to) in [2usize, 1].into_iter().enumerate() {
        let (v, m) = c.migrate(vm, to, &format!("mover-{}", i + 1))?;
        vm = v;
        let r = stream.report();
        let gap = r.longest_gap(m.started, m.routed).unwrap_or_default();
        println!(
            "  moved to node-{to} (pod {}): QEMU total {:?} ms, downtime {:?} ms; \
             the connection's longest wait {:.0} ms; {} replies so far, all from {:?}",
            vm.pod.name,
            m.qemu.total_time_ms,
            m.qemu.downtime_ms,
            gap.as_secs_f64() * 1e3,
            r.replies.len(),
            r.answers.iter().collect::<std::collections::BTreeSet<_>>()
        );
        for n in 0..c.nodes.len() {
            println!(
                "    {} routes {ip}: {}",
                c.nodes[n].name,
                c.migration_route(n, ip)?
                    .unwrap_or_else(|| "(its pod CIDR route)".into())
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = stream.stop();
    match &r.error {
        None => println!(
            "  the connection is still the first one: {} replies, none lost",
            r.replies.len()
        ),
        Some(e) => println!("  the connection broke: {e}"),
    }
    Ok(())
}
