//! `tapestry-bench-cluster`: what crossing nodes costs, on the three-node lab of
//! tapestry_tests::cluster (node namespaces on one fabric, a tapestryd per node in Kubernetes
//! mode, one real apiserver).
//!
//! - TCP_RR and TCP_CRR from a pod on node 0 to a pod on node 1: through the Service VIP vs the
//!   pod IP directly, in the same run, rounds alternating which goes first; the ratios (VIP /
//!   direct, median of the rounds' ratios) are `lb_rr_ratio_direct_crossnode` and
//!   `lb_crr_ratio_direct_crossnode`.
//! - The same through the VIP with every daemon restarted with `--fast-path`, against the pod IP
//!   without it, in the same rounds (each round runs the fast-path-off paths and the fast path
//!   in alternating order; the daemons restart once per round, between the two):
//!   `lb_rr_ratio_direct_fastpath_crossnode`, `lb_crr_ratio_direct_fastpath_crossnode`.
//! - The time from an EndpointSlice change to every node's maps holding it, with 1,000 Services:
//!   each sample adds an address to one Service's slice and polls the three daemons until each
//!   lists it active (`service_change_to_all_nodes_p50_ms` / `_p99_ms`; includes the write and
//!   up to one 5 ms poll).
//!
//! Outputs in bench/results/: cluster.json (every sample), cluster.md, and the keys above merged
//! into summary.json. Benchmarks only report: no threshold, no assertion. Needs root.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Map, Value, json};
use tapestry_bench::{
    load::{self, Mode},
    quick,
    report::{median, merge_summary, write_atomic},
};
use tapestry_tests::{
    cluster::{Cluster, NAMESPACE, active_backends},
    daemon::binary,
};

#[derive(Debug, Parser)]
#[command(about = "Cross-node VIP vs direct, and Service changes reaching every node")]
struct Cli {
    /// Paired rounds (VIP and direct, RR and CRR each).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Services for the change latency.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// The vCPU the load client and server are pinned to (both on one, as `make bench`'s other
    /// datapath cases: the softirq work of both nodes' hops lands there too).
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Slice changes measured.
    #[arg(long, default_value_t = 100)]
    samples: usize,
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): one round of 1 s runs; 20 slice changes with 100 Services.
const QUICK: &[(&str, &str)] = &[
    ("rounds", "1"),
    ("seconds", "1"),
    ("services", "100"),
    ("samples", "20"),
    ("out", quick::QUICK_RESULTS),
];

fn main() {
    let cli: Cli = quick::parse(QUICK);
    if let Err(e) = run(cli) {
        eprintln!("tapestry-bench-cluster: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let load = binary("tapestry-load")?;
    let mut c = Cluster::start("bench-cluster", 3)?;
    let server = c.add_pod(1, "server", json!({"app": "server"}))?;
    let client = c.add_pod(0, "client", json!({"app": "client"}))?;
    let mut srv = server.spawn(
        Command::new(&load)
            .args(["serve", "--port", "8080", "--max-seconds", "3600"])
            .args(["--cpu", &cli.cpu.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let vip = c.add_service("server", json!({"app": "server"}))?;
    c.wait_backends("server", &[server.addr(8080)], Duration::from_secs(30))?;
    let direct = server.addr(8080);
    let through = SocketAddrV4::new(vip, 80);

    eprintln!(
        "cross-node: client {} (node-0) -> server {} (node-1), VIP {vip}",
        client.ip, server.ip
    );
    let mut samples = Vec::new();
    // VIP / direct and fast path / direct, RR and CRR.
    let mut ratios: [Vec<f64>; 4] = Default::default();
    let mut fast_on = false;
    for round in 0..cli.rounds {
        // Even rounds: fast path off first; odd rounds: on first. The daemons restart only
        // when it changes, once per round.
        let phases = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut tps = [[0.0; 3]; 2];
        for fast in phases {
            if fast != fast_on {
                set_fast_path(&mut c, fast)?;
                fast_on = fast;
            }
            for (m, mode) in [Mode::Rr, Mode::Crr].into_iter().enumerate() {
                let order: &[(&str, SocketAddrV4)] = match (fast, round % 2 == 0) {
                    (true, _) => &[("fastpath", through)],
                    (false, true) => &[("direct", direct), ("vip", through)],
                    (false, false) => &[("vip", through), ("direct", direct)],
                };
                for &(path, target) in order {
                    let r = load::client_in(&load, &client, mode, target, cli.seconds, cli.cpu)?;
                    eprintln!(
                        "  [{}] {} {path}: {:.0}/s p50 {:.0} us{}",
                        round + 1,
                        mode.as_str(),
                        r.transactions_per_s,
                        r.p50_us,
                        if r.errors > 0 {
                            format!(" ({} errors)", r.errors)
                        } else {
                            String::new()
                        }
                    );
                    let slot = match path {
                        "direct" => 0,
                        "vip" => 1,
                        _ => 2,
                    };
                    tps[m][slot] = r.transactions_per_s;
                    samples.push(json!({"round": round, "mode": mode.as_str(), "path": path,
                                        "report": r}));
                }
            }
        }
        for m in 0..2 {
            if tps[m][0] > 0.0 {
                ratios[m].push(tps[m][1] / tps[m][0]);
                ratios[2 + m].push(tps[m][2] / tps[m][0]);
            }
        }
    }
    if fast_on {
        set_fast_path(&mut c, false)?;
    }
    let _ = srv.kill();
    let _ = srv.wait();
    let rr = median(&ratios[0]);
    let crr = median(&ratios[1]);
    let fast_rr = median(&ratios[2]);
    let fast_crr = median(&ratios[3]);

    let (latencies, setup_s) = service_changes(&c, cli.services, cli.samples)?;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| {
        if sorted.is_empty() {
            f64::NAN
        } else {
            sorted[((sorted.len() - 1) as f64 * p).round() as usize]
        }
    };

    let mut summary = Map::new();
    summary.insert("lb_rr_ratio_direct_crossnode".into(), json!(rr));
    summary.insert("lb_crr_ratio_direct_crossnode".into(), json!(crr));
    summary.insert(
        "lb_rr_ratio_direct_fastpath_crossnode".into(),
        json!(fast_rr),
    );
    summary.insert(
        "lb_crr_ratio_direct_fastpath_crossnode".into(),
        json!(fast_crr),
    );
    summary.insert("service_change_to_all_nodes_p50_ms".into(), json!(q(0.5)));
    summary.insert("service_change_to_all_nodes_p99_ms".into(), json!(q(0.99)));
    fs_write(
        &cli,
        &samples,
        &latencies,
        setup_s,
        [rr, crr, fast_rr, fast_crr],
        q(0.5),
        q(0.99),
    )?;
    merge_summary(&cli.out.join("summary.json"), &summary)?;
    eprintln!(
        "lb_rr_ratio_direct_crossnode {rr:?}, lb_crr_ratio_direct_crossnode {crr:?}, \
         lb_rr_ratio_direct_fastpath_crossnode {fast_rr:?}, \
         lb_crr_ratio_direct_fastpath_crossnode {fast_crr:?}, \
         service_change_to_all_nodes p50 {:.1} ms p99 {:.1} ms",
        q(0.5),
        q(0.99)
    );
    Ok(())
}

/// Restarts every node's daemon with `--fast-path` (or without it).
fn set_fast_path(c: &mut Cluster, on: bool) -> Result<()> {
    for node in &mut c.nodes {
        if on {
            node.daemon.add_extra_args(&["--fast-path"]);
        } else {
            node.daemon.remove_extra_arg("--fast-path");
        }
        node.daemon
            .restart()
            .with_context(|| format!("restarting {}'s daemon", node.name))?;
    }
    eprintln!("  fast path {}", if on { "on" } else { "off" });
    Ok(())
}

/// `services` selectorless Services, each with a hand-written slice of one address; then
/// `samples` changes (a second address in one slice), each timed until all nodes hold it.
/// Returns the latencies (ms) and how long programming the 1,000 took (s).
fn service_changes(c: &Cluster, services: usize, samples: usize) -> Result<(Vec<f64>, f64)> {
    let addr = |i: usize, k: u8| Ipv4Addr::new(10, 199, (i / 250) as u8, (i % 250) as u8 + k);
    let mut items = Vec::new();
    for i in 0..services {
        let name = format!("svc{i}");
        items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"ports": [{"name": "tcp", "protocol": "TCP", "port": 80}]}}));
        items.push(slice(&name, &[addr(i, 1)]));
    }
    let started = Instant::now();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    let mut cmd = c.cp.kubectl_command("admin")?;
    cmd.args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, list.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "creating {services} Services: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = format!("svc{}", services - 1);
    for node in &c.nodes {
        tapestry_tests::poll(
            Duration::from_secs(300),
            "1,000 Services programmed",
            || Ok(active_backends(&node.daemon, &last).map(|_| ())),
        )?;
    }
    let setup_s = started.elapsed().as_secs_f64();
    eprintln!("{services} Services on every node after {setup_s:.1} s");

    let mut latencies = Vec::new();
    for s in 0..samples {
        let i = (s * 7919) % services;
        let name = format!("svc{i}");
        let want = SocketAddrV4::new(addr(i, 2), 80).to_string();
        let sent = Instant::now();
        c.cp.apply(&slice(&name, &[addr(i, 1), addr(i, 2)]).to_string())?;
        for node in &c.nodes {
            tapestry_tests::poll(Duration::from_secs(30), "the change on every node", || {
                Ok(active_backends(&node.daemon, &name)
                    .filter(|b| b.contains(&want))
                    .map(|_| ()))
            })?;
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        // Back to one address (not timed), so the next sample of this Service changes again.
        c.cp.apply(&slice(&name, &[addr(i, 1)]).to_string())?;
    }
    Ok((latencies, setup_s))
}

fn slice(service: &str, addrs: &[Ipv4Addr]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-bench"), "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service,
                       "endpointslice.kubernetes.io/managed-by": "bench.tapestry.dev"}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": 80}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a.to_string()],
                                                  "conditions": {"ready": true}}))
                          .collect::<Vec<_>>()})
}

#[allow(clippy::too_many_arguments)]
fn fs_write(
    cli: &Cli,
    samples: &[Value],
    latencies: &[f64],
    setup_s: f64,
    [rr, crr, fast_rr, fast_crr]: [Option<f64>; 4],
    p50: f64,
    p99: f64,
) -> Result<()> {
    std::fs::create_dir_all(&cli.out)?;
    write_atomic(
        &cli.out.join("cluster.json"),
        &serde_json::to_string_pretty(&json!({
            "rounds": cli.rounds, "seconds": cli.seconds, "load": samples,
            "services": cli.services, "services_programmed_s": setup_s,
            "change_latencies_ms": latencies}))?,
    )?;
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mut md = String::from("# Three nodes (tapestry-bench-cluster)\n\n");
    let _ = writeln!(md, "| figure | value | target |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| `lb_rr_ratio_direct_crossnode` (VIP / pod IP, node 0 -> node 1) | {} | >= 0.95 |",
        f(rr)
    );
    let _ = writeln!(
        md,
        "| `lb_crr_ratio_direct_crossnode` | {} | >= 0.95 |",
        f(crr)
    );
    let _ = writeln!(
        md,
        "| `lb_rr_ratio_direct_fastpath_crossnode` (VIP with `--fast-path` / pod IP without) | {} | >= 1.05 |",
        f(fast_rr)
    );
    let _ = writeln!(
        md,
        "| `lb_crr_ratio_direct_fastpath_crossnode` | {} | >= 1.05 |",
        f(fast_crr)
    );
    let _ = writeln!(
        md,
        "| `service_change_to_all_nodes_p50_ms` ({} Services, {} changes) | {p50:.1} | |",
        cli.services,
        latencies.len()
    );
    let _ = writeln!(
        md,
        "| `service_change_to_all_nodes_p99_ms` | {p99:.1} | < 1,000 |"
    );
    let _ = writeln!(
        md,
        "\n{} Services reached all three nodes {setup_s:.1} s after one `kubectl create`.",
        cli.services
    );
    write_atomic(&cli.out.join("cluster.md"), &md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let c: Cli = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!(
            (c.rounds, c.seconds, c.services, c.samples),
            (1, 1.0, 100, 20)
        );
        assert_eq!(c.out, PathBuf::from(quick::QUICK_RESULTS));
        let c: Cli = quick::parse_from(["b"], QUICK);
        assert_eq!((c.rounds, c.services, c.samples), (5, 1000, 100));
        assert_eq!(c.out, PathBuf::from(quick::RESULTS));
    }
}
