//! `make demo`: a single-host lab in standalone mode. Pods (network namespaces) sit behind one
//! Service VIP; tapestryd balances a client's requests across them per packet, in eBPF; the
//! demo prints which backend answered each request, changes the state file live, and kills the
//! daemon mid-stream to show the datapath does not need it.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddrV4,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tapestry_tests::{Lab, Pod, daemon::Daemon, require_root_and_bpffs};

const RECORD: &str = "/run/tapestry-demo.json";

#[derive(Debug, Parser)]
#[command(about = "Tapestry's single-host lab: pods behind a Service VIP, balanced in eBPF")]
struct Args {
    /// Requests to send through the VIP in the first round.
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// Leave the lab and the daemon running (remove them later with --cleanup).
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

    heading("1. The lab");
    let mut lab = Lab::new("demo")?;
    let client = lab.add_pod("client")?;
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let pod = lab.add_pod(name)?;
        servers.push(pod.serve_tcp_name(8080)?);
        backends.push(pod);
    }
    let vip = lab.service_ip(0);
    println!("  {:<8} {:<15} {:<16}", "pod", "IP", "host interface");
    for p in lab.pods() {
        println!(
            "  {:<8} {:<15} {:<16}",
            p.name,
            p.ip.to_string(),
            p.host_ifname
        );
    }
    println!("  Service web: {vip}:80/TCP -> the three web pods on port 8080");

    heading("2. tapestryd in standalone mode");
    let ifaces: Vec<&str> = lab.pods().iter().map(|p| p.host_ifname.as_str()).collect();
    let state = |pods: &[&Pod]| {
        let list: String = pods
            .iter()
            .map(|p| format!("      - {{ ip: {}, port: 8080, name: {} }}\n", p.ip, p.name))
            .collect();
        format!(
            "services:\n  - name: web\n    vip: {vip}\n    port: 80\n    algorithm: random\n    backends:\n{list}"
        )
    };
    let all: Vec<&Pod> = backends.iter().collect();
    let mut daemon = Daemon::start("demo", &state(&all), &ifaces)?;
    println!("  state file:  {}", daemon.state_file.display());
    println!("  pinned at:   {}", daemon.bpffs_dir.display());
    println!("  API socket:  {}", daemon.socket.display());
    println!(
        "  attached to: {} interfaces (tc ingress, TCX)",
        daemon.status()?.attachments.len()
    );

    heading(&format!(
        "3. {} requests from the client to {vip}:80",
        args.requests
    ));
    let addr = SocketAddrV4::new(vip, 80);
    let mut tally = BTreeMap::new();
    for i in 1..=args.requests {
        let started = Instant::now();
        let who = client
            .tcp_request(addr, b"hello\n", Duration::from_secs(3))
            .with_context(|| format!("request {i}"))?;
        let ip = backends
            .iter()
            .find(|b| b.name == who)
            .map(|b| b.ip.to_string())
            .unwrap_or_default();
        println!(
            "  request {i:>2} -> answered by {who:<6} ({ip}) in {:.2} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        *tally.entry(who).or_insert(0) += 1;
    }
    print_tally(&tally);
    show_service(&daemon)?;

    heading("4. Live update: web-3 removed from the state file");
    daemon.write_state(&state(&all[..2]))?;
    daemon.wait_generation(2, Duration::from_secs(5))?;
    let mut tally = BTreeMap::new();
    for _ in 0..args.requests {
        let who = client.tcp_request(addr, b"hello\n", Duration::from_secs(3))?;
        *tally.entry(who).or_insert(0) += 1;
    }
    print_tally(&tally);

    heading("5. kill -9 tapestryd during an open connection");
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
        "  restarted: {} services adopted from the pinned maps; the connection still answers: {after}",
        st.services
    );

    if args.keep {
        lab.keep();
        let record = serde_json::json!({
            "pid": daemon.pid(),
            "demoPid": std::process::id(),
            "bpffsDir": daemon.bpffs_dir,
            "dir": daemon.dir,
            "lab": lab.prefix(),
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
        std::mem::forget(daemon);
        std::mem::forget(servers);
        // Servers are threads of this process: keep serving until interrupted.
        println!("  (backends serve while this process runs; Ctrl-C to stop them)");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    heading("Done: lab torn down");
    Ok(())
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
                "    backend {:<6} {}:{}  {} packets, {} flows, {} live",
                b.name.unwrap_or_default(),
                b.ip,
                b.port,
                b.traffic.packets,
                b.traffic.flows,
                b.active_flows
            );
        }
    }
    Ok(())
}

fn cleanup() -> Result<()> {
    if let Ok(text) = fs::read_to_string(RECORD) {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        for key in ["pid", "demoPid"] {
            if let Some(pid) = v[key].as_i64() {
                // SAFETY: signalling a pid we recorded; harmless if it is gone.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
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
