//! `tapestry-bench-migration`: what a live migration costs the guest's clients, and how fast a
//! hung guest leaves every node's maps, on the three-node lab of tapestry_tests::cluster (real
//! apiserver, a tapestryd per node, a real QEMU guest under TCG).
//!
//! - A client on node 0 streams requests (one every `--interval-ms`) over one TCP connection
//!   through the guest's ClusterIP while the guest moves between nodes 1 and 2 `--migrations`
//!   times ([`Cluster::migrate`]: QEMU's own migration). Per move, the blackout is the longest
//!   gap between two replies around it minus the request interval; the extra is that minus
//!   QEMU's reported downtime (what the network adds to QEMU's own stop-and-copy):
//!   `migration_blackout_extra_ms_p50` / `_p99`, with QEMU's `migration_qemu_downtime_ms_p50`.
//!   Apart from TCP's retransmission timer (200 ms at least on Linux), the network's share is
//!   how soon the client's node routes the guest's address to its new node: from the
//!   switch-over the target's datapath recorded (the Guest's `switchoverTime`) to node 0's
//!   route going via the target, polled every 2 ms (`migration_route_convergence_ms_p50` /
//!   `_p99`).
//! - The guest paused with QEMU's `stop` (hung), `--pauses` times: from the pause to no node's
//!   maps holding its backend (`guest_unready_to_unpublished_p50_ms` / `_p99_ms`; the probe's
//!   period and failure threshold are most of it), resumed in between.
//!
//! Outputs in bench/results/: migration.json (every sample), migration.md, and the keys above
//! merged into summary.json. Benchmarks only report: no threshold, no assertion. Needs root.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{Map, Value, json};
use tapestry_bench::{
    cni::percentile,
    quick,
    report::{merge_summary, write_atomic},
};
use tapestry_tests::{
    cluster::{Cluster, Plumbing, active_backends},
    guest::{Guest, GuestConfig},
    migration::{StreamClient, Vm},
    poll,
};

#[derive(Debug, Parser)]
#[command(about = "Live migration's blackout and a hung guest's time to leave the maps")]
struct Cli {
    #[arg(long, default_value_t = 10)]
    migrations: usize,
    #[arg(long, default_value_t = 10)]
    pauses: usize,
    /// Time between two requests on the streaming connection.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): 2 migrations (there and back), 2 pauses.
const QUICK: &[(&str, &str)] = &[
    ("migrations", "2"),
    ("pauses", "2"),
    ("out", quick::QUICK_RESULTS),
];

fn main() {
    let cli: Cli = quick::parse(QUICK);
    if let Err(e) = run(cli) {
        eprintln!("tapestry-bench-migration: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut c = Cluster::start("bench-migrate", 3)?;
    c.install_readiness_gate()?;
    let _kubelet = c.kubelet_readiness()?;
    let client = c.add_pod(0, "client0", json!({"app": "client"}))?;
    let labels = json!({"app": "vm"});
    let pod = c.add_pod_with(1, "vm-0", labels.clone(), Plumbing::AnnotatedVm)?;
    let mut guest = Guest::boot_in(&pod.netns_path, GuestConfig::new("vm", pod.mac))?;
    guest.wait_ready(Duration::from_secs(180))?;
    let vip = c.add_service("vm", labels.clone())?;
    c.wait_backends("vm", &[pod.addr(8080)], Duration::from_secs(60))?;
    let interval = Duration::from_millis(cli.interval_ms);
    let stream = StreamClient::start(
        &client,
        SocketAddrV4::new(vip, 80),
        interval,
        Duration::from_secs(20),
    )?;
    let mut vm = Vm::new(pod, guest, 1, labels, "vm");
    let mut moves = Vec::new();
    let mut convergence = Vec::new();
    let mut datapath = Vec::new();
    let node0 = c.nodes[0]
        .netns_path
        .file_name()
        .context("node 0's netns")?
        .to_string_lossy()
        .into_owned();
    for i in 1..=cli.migrations {
        let to = if vm.node == 1 { 2 } else { 1 };
        let name = format!("vm-{i}");
        let watch = route_watch(&node0, vm.ip, c.nodes[to].underlay_ip);
        let (v, m) = c.migrate(vm, to, &name)?;
        vm = v;
        let routed_at = watch.join().ok().flatten();
        let switchover = switchover_time(&c, &name)?;
        let datapath_ms = datapath_blackout_ms(&c, &name);
        let conv_ms = routed_at.and_then(|r| {
            r.duration_since(switchover)
                .ok()
                .map(|d| d.as_secs_f64() * 1e3)
        });
        eprintln!(
            "  migration {i}: node-{} -> node-{}, QEMU downtime {:?} ms, node-0 routed {:?} ms \
             after the switch-over",
            m.from, m.to, m.qemu.downtime_ms, conv_ms
        );
        convergence.push(conv_ms);
        datapath.push(datapath_ms);
        moves.push(m);
        // Let the stream settle between moves.
        std::thread::sleep(Duration::from_millis(500));
    }
    let report = stream.stop();
    if let Some(e) = &report.error {
        eprintln!("  the streaming connection broke: {e}");
    }
    let mut samples = Vec::new();
    let mut extra = Vec::new();
    let mut downtime = Vec::new();
    for (i, m) in moves.iter().enumerate() {
        let gap = report
            .longest_gap(m.started, m.routed)
            .context("no replies around a migration")?;
        let blackout_ms = gap.saturating_sub(interval).as_secs_f64() * 1e3;
        let qemu_ms = m.qemu.downtime_ms.map(|d| d as f64);
        let extra_ms = qemu_ms.map(|q| blackout_ms - q);
        if let Some(x) = extra_ms {
            extra.push(x);
        }
        if let Some(q) = qemu_ms {
            downtime.push(q);
        }
        samples.push(json!({
            "migration": i + 1, "from": m.from, "to": m.to,
            "blackout_ms": blackout_ms, "qemu_downtime_ms": qemu_ms,
            "qemu_total_ms": m.qemu.total_time_ms, "extra_ms": extra_ms,
            "live_after_completed_ms": (m.live - m.completed).as_secs_f64() * 1e3,
            "routed_after_completed_ms": (m.routed - m.completed).as_secs_f64() * 1e3,
            "node0_route_after_switchover_ms": convergence[i],
            "datapath_blackout_ms": datapath[i],
        }));
    }

    let mut unpublished = Vec::new();
    for i in 0..cli.pauses {
        vm.guest.monitor("stop", Duration::from_secs(5))?;
        let paused = Instant::now();
        for node in &c.nodes {
            poll(
                Duration::from_secs(30),
                &format!("{} drops the paused guest", node.name),
                || {
                    Ok(active_backends(&node.daemon, "vm")
                        .is_some_and(|b| b.is_empty())
                        .then_some(()))
                },
            )?;
        }
        let ms = paused.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "  pause {}: out of every node's maps after {ms:.0} ms",
            i + 1
        );
        unpublished.push(ms);
        vm.guest.monitor("cont", Duration::from_secs(5))?;
        c.wait_backends(
            "vm",
            &[SocketAddrV4::new(vm.ip, 8080)],
            Duration::from_secs(30),
        )?;
    }

    let convergence: Vec<f64> = convergence.into_iter().flatten().collect();
    let datapath: Vec<f64> = datapath.into_iter().flatten().collect();
    let p = |v: &[f64], q: f64| percentile(v, q).map(|x| (x * 10.0).round() / 10.0);
    let mut summary = Map::new();
    summary.insert(
        "migration_blackout_extra_ms_p50".into(),
        json!(p(&extra, 50.0)),
    );
    summary.insert(
        "migration_blackout_extra_ms_p99".into(),
        json!(p(&extra, 99.0)),
    );
    summary.insert(
        "migration_qemu_downtime_ms_p50".into(),
        json!(p(&downtime, 50.0)),
    );
    summary.insert(
        "migration_route_convergence_ms_p50".into(),
        json!(p(&convergence, 50.0)),
    );
    summary.insert(
        "migration_route_convergence_ms_p99".into(),
        json!(p(&convergence, 99.0)),
    );
    summary.insert(
        "migration_datapath_blackout_ms_p50".into(),
        json!(p(&datapath, 50.0)),
    );
    summary.insert(
        "migration_datapath_blackout_ms_p99".into(),
        json!(p(&datapath, 99.0)),
    );
    summary.insert(
        "guest_unready_to_unpublished_p50_ms".into(),
        json!(p(&unpublished, 50.0)),
    );
    summary.insert(
        "guest_unready_to_unpublished_p99_ms".into(),
        json!(p(&unpublished, 99.0)),
    );
    let doc = json!({
        "migrations": samples,
        "stream_error": report.error,
        "stream_replies": report.replies.len(),
        "interval_ms": cli.interval_ms,
        "unready_to_unpublished_ms": unpublished,
        "summary": Value::Object(summary.clone()),
    });
    std::fs::create_dir_all(&cli.out)?;
    write_atomic(
        &cli.out.join("migration.json"),
        &serde_json::to_string_pretty(&doc)?,
    )?;
    let mut md = String::from(
        "# Live migration (tapestry-bench-migration)\n\n\
         Three-node lab, a real QEMU guest (TCG) moving between nodes 1 and 2; a client on \
         node 0 streams over one connection through the ClusterIP.\n\n\
         `datapath ms`: the target's own record (Guest `status.migration.blackoutMs`), from \
         the switch-over to the network's first frame to the guest there.\n\n\
         | move | from | to | blackout ms | QEMU downtime ms | extra ms | datapath ms |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for s in &samples {
        let _ = writeln!(
            md,
            "| {} | node-{} | node-{} | {:.1} | {} | {} | {} |",
            s["migration"],
            s["from"],
            s["to"],
            s["blackout_ms"].as_f64().unwrap_or(f64::NAN),
            s["qemu_downtime_ms"],
            s["extra_ms"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            s["datapath_blackout_ms"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0}"))
        );
    }
    let _ = writeln!(md, "\n| key | value |\n|---|---|");
    for (k, v) in &summary {
        let _ = writeln!(md, "| `{k}` | {v} |");
    }
    write_atomic(&cli.out.join("migration.md"), &md)?;
    merge_summary(&cli.out.join("summary.json"), &summary)?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Polls node 0's route for `ip` (every 2 ms, for at most 60 s) until it goes via `to`: when it
/// first did, in wall-clock time.
fn route_watch(
    netns: &str,
    ip: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
) -> std::thread::JoinHandle<Option<SystemTime>> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let want = format!("via {to} ");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let out = std::process::Command::new("ip")
                .args(["-n", &netns, "-4", "route", "show", &format!("{ip}/32")])
                .args(["proto", tapestry_tests::migration::RTPROT_TAPESTRY])
                .output()
                .ok()?;
            if String::from_utf8_lossy(&out.stdout).contains(&want) {
                return Some(SystemTime::now());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    })
}

/// The switch-over the target's daemon recorded in Guest `name`.
fn switchover_time(c: &Cluster, name: &str) -> Result<SystemTime> {
    let t = c.cp.kubectl_ok([
        "get",
        "guest",
        name,
        "-o",
        "jsonpath={.status.migration.switchoverTime}",
    ])?;
    let ts: jiff::Timestamp = t
        .trim()
        .parse()
        .with_context(|| format!("Guest {name}'s switchoverTime {t:?}"))?;
    Ok(SystemTime::from(ts))
}

/// The blackout the target's datapath recorded for Guest `name` (written once the network's
/// first frame reached the guest there: waited for up to 5 s).
fn datapath_blackout_ms(c: &Cluster, name: &str) -> Option<f64> {
    let read = || {
        c.cp.kubectl_ok([
            "get",
            "guest",
            name,
            "-o",
            "jsonpath={.status.migration.blackoutMs}",
        ])
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
    };
    let since = Instant::now();
    loop {
        if let Some(ms) = read() {
            return Some(ms);
        }
        if since.elapsed() > Duration::from_secs(5) {
            eprintln!("  Guest {name} recorded no datapath blackout within 5 s");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let c: Cli = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!((c.migrations, c.pauses, c.interval_ms), (2, 2, 5));
        assert_eq!(c.out, PathBuf::from(quick::QUICK_RESULTS));
        let c: Cli = quick::parse_from(["b"], QUICK);
        assert_eq!((c.migrations, c.pauses), (10, 10));
        assert_eq!(c.out, PathBuf::from(quick::RESULTS));
    }
}
