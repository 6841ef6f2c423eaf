//! `make demo`: a single-host lab in standalone mode. Two pods and a real VM (a QEMU guest in a
//! VM pod made by the CNI chain `ptp` + `tapestry-cni`) sit behind one Service VIP; tapestryd
//! balances a client's requests across them per packet, in eBPF; the demo prints which backend
//! (VM or pod) answered each request, changes the state file live, and kills the daemon
//! mid-stream to show the datapath does not need it.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use tapestry_tests::{
    Lab,
    cni::{NetworkConfigList, Runtime, RuntimeConf},
    daemon::{Daemon, bin_dir},
    guest::{Guest, GuestConfig, require_qemu},
    require_root_and_bpffs,
};

const RECORD: &str = "/run/tapestry-demo.json";

#[derive(Debug, Parser)]
#[command(
    about = "Tapestry's single-host lab: pods and a VM behind a Service VIP, balanced in eBPF"
)]
struct Args {
    /// Requests to send through the VIP in the first round.
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// Pods only: no VM guest (no QEMU needed).
    #[arg(long)]
    no_vm: bool,
    /// Leave the lab, the guest and the daemon running (remove them later with --cleanup).
    #[arg(long)]
    keep: bool,
    /// Remove a lab left by --keep, and exit.
    #[arg(long)]
    cleanup: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

/// A backend of the demo's Service.
struct Backend {
    name: String,
    ip: Ipv4Addr,
    kind: &'static str,
}

fn run(args: Args) -> Result<()> {
    if let Err(why) = require_root_and_bpffs() {
        bail!("{why} (run `make demo` as root; it mounts bpffs through scripts/setup.sh)");
    }
    if args.cleanup {
        return cleanup();
    }
    if Path::new(RECORD).exists() {
        println!("removing the lab kept by an earlier `make demo --keep`");
        cleanup()?;
    }
    let with_vm = !args.no_vm;
    if with_vm && let Err(why) = require_qemu() {
        bail!("{why} (or run the demo with --no-vm)");
    }

    heading("1. The lab");
    let mut lab = Lab::new("demo")?;
    let client = lab.add_pod("client")?;
    let mut servers = Vec::new();
    let mut backends = Vec::new();
    let mut ifaces = vec![client.host_ifname.clone()];
    for name in ["web-1", "web-2"] {
        let pod = lab.add_pod(name)?;
        servers.push(pod.serve_tcp_name(8080)?);
        ifaces.push(pod.host_ifname.clone());
        backends.push(Backend {
            name: pod.name.clone(),
            ip: pod.ip,
            kind: "pod",
        });
    }
    let vip = lab.service_ip(0);
    println!(
        "  {:<8} {:<5} {:<15} {:<16}",
        "name", "kind", "IP", "host interface"
    );
    for p in lab.pods() {
        println!(
            "  {:<8} {:<5} {:<15} {:<16}",
            p.name,
            "pod",
            p.ip.to_string(),
            p.host_ifname
        );
    }

    heading("2. tapestryd in standalone mode");
    let refs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start("demo", "services: []\n", &refs)?;
    println!("  state file:  {}", daemon.state_file.display());
    println!("  pinned at:   {}", daemon.bpffs_dir.display());
    println!("  API socket:  {}", daemon.socket.display());

    let mut vm = None;
    if with_vm {
        heading("3. A VM pod: CNI chain ptp -> tapestry-cni, then a QEMU guest on its tap");
        let (guest, backend, netns) = start_vm(&lab, &daemon)?;
        println!(
            "  vm-1: tap0 in {} owned by uid 107; the guest took the pod IP {} by DHCP",
            netns.display(),
            backend.ip
        );
        println!(
            "  guest booted in {:.1} s (software emulation); phase {}",
            guest.boot_time().unwrap_or_default().as_secs_f64(),
            daemon
                .client()
                .guests()?
                .first()
                .map(|g| g.phase)
                .unwrap_or_default()
        );
        backends.push(backend);
        vm = Some((guest, netns));
    }

    let state = |bs: &[&Backend]| {
        let list: String = bs
            .iter()
            .map(|b| {
                format!(
                    "      - {{ ip: {}, port: 8080, name: {}, kind: {} }}\n",
                    b.ip, b.name, b.kind
                )
            })
            .collect();
        format!(
            "services:\n  - name: web\n    vip: {vip}\n    port: 80\n    algorithm: random\n    backends:\n{list}"
        )
    };
    let all: Vec<&Backend> = backends.iter().collect();
    daemon.write_state(&state(&all))?;
    daemon.wait_generation(2, Duration::from_secs(5))?;
    println!(
        "  Service web: {vip}:80/TCP -> {}",
        backends
            .iter()
            .map(|b| format!("{} ({})", b.name, b.kind))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  datapath attached to {} interfaces (TCX ingress: balancing; egress: reverse NAT)",
        daemon.status()?.attachments.len()
    );

    heading(&format!(
        "4. {} requests from the client to {vip}:80",
        args.requests
    ));
    let addr = SocketAddrV4::new(vip, 80);
    let mut tally = BTreeMap::new();
    for i in 1..=args.requests {
        let started = Instant::now();
        let who = client
            .tcp_request(addr, b"hello\n", Duration::from_secs(3))
            .with_context(|| format!("request {i}"))?;
        let b = backends.iter().find(|b| b.name == who);
        println!(
            "  request {i:>2} -> answered by {who:<6} ({}, {}) in {:.2} ms",
            b.map(|b| b.kind.to_uppercase()).unwrap_or_default(),
            b.map(|b| b.ip.to_string()).unwrap_or_default(),
            started.elapsed().as_secs_f64() * 1e3
        );
        *tally.entry(who).or_insert(0) += 1;
    }
    print_tally(&tally);
    show_service(&daemon)?;

    heading("5. Live update: web-2 removed from the state file");
    let fewer: Vec<&Backend> = backends.iter().filter(|b| b.name != "web-2").collect();
    daemon.write_state(&state(&fewer))?;
    daemon.wait_generation(3, Duration::from_secs(5))?;
    let mut tally = BTreeMap::new();
    for _ in 0..args.requests {
        let who = client.tcp_request(addr, b"hello\n", Duration::from_secs(3))?;
        *tally.entry(who).or_insert(0) += 1;
    }
    print_tally(&tally);

    heading("6. kill -9 tapestryd during an open connection");
    let mut conn = client.tcp_connect(addr, Duration::from_secs(3))?;
    let before = tapestry_tests::stream_request(&mut conn, b"ping\n")?;
    daemon.kill9()?;
    let during = tapestry_tests::stream_request(&mut conn, b"ping\n")?;
    let fresh = client.tcp_request(addr, b"hello\n", Duration::from_secs(3))?;
    println!("  open connection before the kill: {before}; with no daemon running: {during}");
    println!("  a new connection with no daemon running: answered by {fresh}");
    let st = daemon.restart()?;
    let after = tapestry_tests::stream_request(&mut conn, b"ping\n")?;
    println!(
        "  restarted: {} services and {} guests adopted from the pins; the connection still answers: {after}",
        st.services,
        daemon.client().guests()?.len()
    );

    if args.keep {
        lab.keep();
        let record = json!({
            "pid": daemon.pid(),
            "demoPid": std::process::id(),
            "bpffsDir": daemon.bpffs_dir,
            "dir": daemon.dir,
            "lab": lab.prefix(),
            "vmNetns": vm.as_ref().map(|(_, n)| n.clone()),
        });
        fs::write(RECORD, serde_json::to_vec_pretty(&record)?)?;
        heading("Left running");
        println!(
            "  client pod:   nsenter --net={} sh",
            client.netns_path.display()
        );
        println!(
            "  the service:  curl --unix-socket {} http://x/v1/services",
            daemon.socket.display()
        );
        println!("  remove it:    make demo DEMO_ARGS=--cleanup");
        if let Some((guest, _)) = vm.take() {
            let _ = guest.keep();
        }
        std::mem::forget(daemon);
        std::mem::forget(servers);
        println!("  (the pods' servers run in this process; Ctrl-C stops them)");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if let Some((guest, netns)) = vm {
        drop(guest);
        remove_netns(&netns);
    }
    heading("Done: lab torn down");
    Ok(())
}

/// The VM pod: a sandbox netns, the CNI chain (the plugin creates tap0 and registers the guest),
/// and a stock guest booting on the tap.
fn start_vm(lab: &Lab, daemon: &Daemon) -> Result<(Guest, Backend, PathBuf)> {
    let name = format!("{}-vm", lab.prefix());
    let netns = PathBuf::from("/run/netns").join(&name);
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()?
        .success();
    if !ok {
        bail!("ip netns add {name} failed");
    }
    let (net, _) = lab.pod_cidr();
    let o = net.octets();
    let list = NetworkConfigList::from_value(&json!({
        "cniVersion": "1.0.0",
        "name": "demo-vms",
        "plugins": [
            {"type": "ptp", "ipMasq": false, "mtu": 1500, "ipam": {
                "type": "host-local", "dataDir": daemon.dir.join("ipam"),
                "ranges": [[{"subnet": format!("{net}/25"),
                             "rangeStart": format!("{}.{}.{}.100", o[0], o[1], o[2]),
                             "rangeEnd": format!("{}.{}.{}.120", o[0], o[1], o[2]),
                             "gateway": format!("{}.{}.{}.1", o[0], o[1], o[2])}]],
                "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "tapestry-cni", "socket": daemon.socket, "vm": {"enabled": true}},
        ],
    }))?;
    let rt = Runtime::new(
        [PathBuf::from("/usr/lib/cni"), bin_dir()],
        daemon.dir.join("cni"),
    );
    let conf = RuntimeConf::new("demo-vm-1", &netns, "eth0")
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAMESPACE", "default")
        .arg("K8S_POD_NAME", "vm-1");
    let result: Value = rt.add(&list, &conf).context("CNI ADD of the VM pod")?;
    let mac = result["interfaces"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|i| i["name"] == "eth0" && i["sandbox"].is_string())
        })
        .and_then(|i| i["mac"].as_str())
        .context("eth0's MAC in the CNI result")?;
    let mac: Vec<u8> = mac
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = mac.try_into().map_err(|_| anyhow::anyhow!("bad MAC"))?;
    let mut guest = Guest::boot_in(&netns, GuestConfig::new("vm-1", mac))?;
    guest.wait_ready(Duration::from_secs(90))?;
    let ip = guest.dhcp_lease().context("the guest's DHCP lease")?.ip;
    Ok((
        guest,
        Backend {
            name: "vm-1".into(),
            ip,
            kind: "vm",
        },
        netns,
    ))
}

fn remove_netns(netns: &Path) {
    if let Some(name) = netns.file_name() {
        let _ = Command::new("ip")
            .arg("netns")
            .arg("del")
            .arg(name)
            .status();
    }
}

fn heading(s: &str) {
    println!("\n\x1b[1m{s}\x1b[0m");
}

fn print_tally(tally: &BTreeMap<String, usize>) {
    let total: usize = tally.values().sum();
    for (who, n) in tally {
        let bar = "#".repeat(*n * 40 / total.max(1));
        println!("  {who:<6} {n:>3}  {bar}");
    }
}

fn show_service(daemon: &Daemon) -> Result<()> {
    for s in daemon.client().services()? {
        println!(
            "  tapestryd: service {} ({}:{}/{}, {}): {} flows",
            s.name, s.vip, s.port, s.protocol, s.algorithm, s.traffic.flows
        );
        for b in s.backends {
            println!(
                "    {:<3} {:<6} {}:{}  {} packets, {} flows",
                b.kind,
                b.name.unwrap_or_default(),
                b.ip,
                b.port,
                b.traffic.packets,
                b.traffic.flows,
            );
        }
    }
    for g in daemon.client().guests()? {
        println!(
            "  guest {} {} ({}): {}, {} packets from the guest, {} to it",
            g.name, g.ip, g.mac, g.phase, g.rx_packets, g.tx_packets
        );
    }
    Ok(())
}

fn cleanup() -> Result<()> {
    if let Ok(text) = fs::read_to_string(RECORD) {
        let v: Value = serde_json::from_str(&text)?;
        for key in ["pid", "demoPid"] {
            if let Some(pid) = v[key].as_i64() {
                // SAFETY: signalling a pid we recorded; harmless if it is gone.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if let Some(n) = v["vmNetns"].as_str() {
            let _ = tapestry_tests::kill_netns_processes(Path::new(n), Duration::from_secs(1));
            remove_netns(Path::new(n));
        }
        for key in ["bpffsDir", "dir"] {
            if let Some(d) = v[key].as_str() {
                let _ = fs::remove_dir_all(d);
            }
        }
        fs::remove_file(RECORD)?;
    }
    let removed = tapestry_tests::cleanup_labs(true)?;
    println!(
        "removed: {}",
        if removed.is_empty() {
            "nothing".into()
        } else {
            removed.join(", ")
        }
    );
    Ok(())
}
