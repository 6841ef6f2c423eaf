//! `tapestry-bench-nodeport`: a client outside the node reaching a NodePort, through Tapestry
//! and through kube-proxy-style iptables rules, each with `--services` ClusterIP Services
//! programmed besides the tested one (10,000 by default: the walk iptables pays), and the
//! direct path (the backend pod's own address) as the anchor, in one run.
//!
//! The node is this host's namespace; the client is a lab pod whose host-side interface plays
//! the node's external interface (`tapestryd --nodeport-interface`); the backend is another lab
//! pod serving `tapestry-load`. The client sends to the node's own address and the node port:
//! Tapestry balances it in `tapestry_from_network` (SNAT to the node, routed by the program),
//! iptables in `PREROUTING` (`KUBE-SERVICES` walk, `addrtype LOCAL` -> `KUBE-NODEPORTS`, DNAT,
//! `MASQUERADE`). Rounds rotate the order of the three; ratios are paired within a round, and the
//! figures are their medians: `nodeport_rr_ratio_iptables_<n>` and `nodeport_crr_ratio_iptables_<n>`
//! (Tapestry / iptables), `nodeport_rr_ratio_direct_<n>` and `nodeport_crr_ratio_direct_<n>`
//! (Tapestry / direct). Outputs in bench/results/: nodeport.json (every run), nodeport.md, and
//! those keys merged into summary.json. Benchmarks only report: no threshold, no assertion.
//! Needs root; run alone (it changes the host's nat table while it runs, as `tapestry-bench`).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Map, Value, json};
use tapestry_api::state::{BackendSpec, ServiceSpec};
use tapestry_bench::{
    anchors::{self, Anchors, IptablesBackend, Kind},
    lb,
    load::{self, Mode},
    quick,
    report::{median, merge_summary, write_atomic},
};
use tapestry_tests::{Lab, daemon::Daemon};

const SERVER_PORT: u16 = 8080;

#[derive(Debug, Parser)]
#[command(about = "NodePort from outside the node: Tapestry vs iptables vs the direct path")]
struct Cli {
    /// Rounds (each runs the three paths, RR and CRR).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// ClusterIP Services programmed besides the tested NodePort.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// The node port.
    #[arg(long, default_value_t = 30080)]
    node_port: u16,
    /// The vCPU the load client and server are pinned to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Services per iptables-restore transaction (see tapestry-bench).
    #[arg(long, default_value_t = 250)]
    iptables_per_transaction: usize,
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): one round of 1 s runs, still 10,000 Services besides.
const QUICK: &[(&str, &str)] = &[
    ("rounds", "1"),
    ("seconds", "1"),
    ("out", quick::QUICK_RESULTS),
];

fn main() {
    let cli: Cli = quick::parse(QUICK);
    if let Err(e) = run(cli) {
        eprintln!("tapestry-bench-nodeport: {e:#}");
        std::process::exit(1);
    }
}

/// Removes the iptables anchor when dropped, whatever happened.
struct AnchorGuard<'a>(&'a Anchors);

impl Drop for AnchorGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.remove(Kind::Iptables);
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.rounds == 0 || cli.services == 0 {
        bail!("--rounds and --services must be positive");
    }
    let load = tapestry_tests::daemon::binary("tapestry-load")?;
    let anchors = Anchors {
        netns: None,
        iptables: IptablesBackend::detect()?,
        iptables_per_transaction: Some(cli.iptables_per_transaction.max(1)),
        nft_per_transaction: None,
        pod_cidr: (Ipv4Addr::new(10, 240, 0, 0), 12),
    };
    anchors.remove(Kind::Iptables)?;
    let mut lab = Lab::new("bench-nodeport")?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    for pod in [&client, &server] {
        pod.set_sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    // The node's own address (not a lab's): what the client sends to.
    let node_ip = tapestry_node_daemon::datapath::node_addrs::local_ipv4()?
        .into_iter()
        .find(|ip| !(ip.octets()[0] == 10 && (240..248).contains(&ip.octets()[1])))
        .context("the node has no address of its own to serve the node port on")?;
    let mut srv = server.spawn(
        Command::new(&load)
            .args(["serve", "--port", &SERVER_PORT.to_string()])
            .args(["--max-seconds", "3600", "--cpu", &cli.cpu.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;

    let services = anchors::services(cli.services, 1, server.ip, &[SERVER_PORT])?;
    let mut state = lb::desired_state(&services);
    let mut np = ServiceSpec::new("bench-nodeport", Ipv4Addr::UNSPECIFIED, cli.node_port);
    let mut backend = BackendSpec::new(server.ip);
    backend.port = Some(SERVER_PORT);
    np.backends = vec![backend];
    state.services.push(np);
    let state_json = serde_json::to_string(&state)?;
    let mut scripts = anchors.scripts(Kind::Iptables, &services);
    scripts.push(anchors::iptables_nodeport_script(
        &services,
        node_ip,
        cli.node_port,
    ));

    let at_node = SocketAddrV4::new(node_ip, cli.node_port);
    let direct = SocketAddrV4::new(server.ip, SERVER_PORT);
    eprintln!(
        "node port {at_node} from client {} (outside), backend {direct}, {} ClusterIP services",
        client.ip, cli.services
    );
    let paths = ["direct", "tapestry", "iptables"];
    let mut runs = Vec::new();
    // tps[mode][path] per round.
    let mut tps: Vec<[[f64; 3]; 2]> = Vec::new();
    for round in 0..cli.rounds {
        let mut this = [[0.0; 3]; 2];
        let mut order = [0usize, 1, 2];
        order.rotate_left(round % 3);
        for p in order {
            // Only this path's datapath is in place while it runs.
            let daemon;
            let guard;
            let target = match paths[p] {
                "direct" => direct,
                "tapestry" => {
                    daemon = Daemon::start_with(
                        "bench-nodeport",
                        &state_json,
                        &[&server.host_ifname],
                        &[
                            "--nodeport-interface",
                            &client.host_ifname,
                            "--host-services=false",
                        ],
                    )?;
                    let _ = &daemon;
                    at_node
                }
                _ => {
                    guard = AnchorGuard(&anchors);
                    anchors.install(Kind::Iptables, &scripts)?;
                    let _ = &guard;
                    at_node
                }
            };
            for (m, mode) in [Mode::Rr, Mode::Crr].into_iter().enumerate() {
                let r = load::client_in(&load, &client, mode, target, cli.seconds, cli.cpu)
                    .with_context(|| format!("{} {}", paths[p], mode.as_str()))?;
                eprintln!(
                    "  [{}] {} {}: {:.0}/s p50 {:.0} us{}",
                    round + 1,
                    mode.as_str(),
                    paths[p],
                    r.transactions_per_s,
                    r.p50_us,
                    if r.errors > 0 {
                        format!(" ({} errors)", r.errors)
                    } else {
                        String::new()
                    }
                );
                this[m][p] = r.transactions_per_s;
                runs.push(
                    json!({"round": round, "mode": mode.as_str(), "path": paths[p],
                                 "report": r}),
                );
            }
        }
        tps.push(this);
    }
    let _ = srv.kill();
    let _ = srv.wait();
    drop(lab);

    let ratio = |m: usize, a: usize, b: usize| {
        median(
            &tps.iter()
                .filter(|t| t[m][b] > 0.0)
                .map(|t| t[m][a] / t[m][b])
                .collect::<Vec<_>>(),
        )
    };
    let n = cli.services;
    let mut summary = Map::new();
    for (m, mode) in ["rr", "crr"].into_iter().enumerate() {
        summary.insert(
            format!("nodeport_{mode}_ratio_iptables_{n}"),
            json!(ratio(m, 1, 2)),
        );
        summary.insert(
            format!("nodeport_{mode}_ratio_direct_{n}"),
            json!(ratio(m, 1, 0)),
        );
        summary.insert(
            format!("nodeport_{mode}_ratio_direct_iptables_{n}"),
            json!(ratio(m, 2, 0)),
        );
        for (p, path) in paths.iter().enumerate() {
            let v: Vec<f64> = tps.iter().map(|t| t[m][p]).collect();
            summary.insert(
                format!("nodeport_{mode}_tps_{path}_{n}"),
                json!(median(&v).map(f64::round)),
            );
        }
    }
    std::fs::create_dir_all(&cli.out)?;
    write_atomic(
        &cli.out.join("nodeport.json"),
        &serde_json::to_string_pretty(&json!({
            "services": n, "rounds": cli.rounds, "seconds": cli.seconds,
            "iptables_backend": anchors.iptables.as_str(), "node_port": cli.node_port,
            "runs": runs, "summary": Value::Object(summary.clone())}))?,
    )?;
    let mut md = format!(
        "# NodePort from outside the node, {} ClusterIP Services besides it\n\n\
         `make bench` (tapestry-bench-nodeport), {} rounds x {} s, medians.\n\n\
         | path | TCP_RR /s | TCP_CRR /s |\n|---|---|---|\n",
        n, cli.rounds, cli.seconds
    );
    for (p, path) in paths.iter().enumerate() {
        let med = |m: usize| median(&tps.iter().map(|t| t[m][p]).collect::<Vec<_>>());
        let _ = writeln!(
            md,
            "| {path} | {:.0} | {:.0} |",
            med(0).unwrap_or(f64::NAN),
            med(1).unwrap_or(f64::NAN)
        );
    }
    let _ = writeln!(
        md,
        "\nTapestry / iptables: RR {:.2}, CRR {:.2}. Tapestry / direct: RR {:.2}, CRR {:.2}.",
        ratio(0, 1, 2).unwrap_or(f64::NAN),
        ratio(1, 1, 2).unwrap_or(f64::NAN),
        ratio(0, 1, 0).unwrap_or(f64::NAN),
        ratio(1, 1, 0).unwrap_or(f64::NAN)
    );
    write_atomic(&cli.out.join("nodeport.md"), &md)?;
    merge_summary(&cli.out.join("summary.json"), &summary)?;
    eprint!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let cli: Cli = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!((cli.rounds, cli.seconds, cli.services), (1, 1.0, 10_000));
        assert_eq!(cli.out, PathBuf::from(quick::QUICK_RESULTS));
        let cli: Cli = quick::parse_from(["b"], QUICK);
        assert_eq!((cli.rounds, cli.out), (3, PathBuf::from(quick::RESULTS)));
    }
}
