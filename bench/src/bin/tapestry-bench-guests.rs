//! `tapestry-bench-guests`: how long from a Guest becoming Ready to the datapath map holding it,
//! through the whole Kubernetes-mode chain on a real kube-apiserver: Guest status (written
//! here as the node daemon would) -> tapestry-controller's EndpointSlice -> tapestryd's watch ->
//! the backends map.
//!
//! 1,000 Guests behind 10 Services (100 each) are created not ready; then each is flipped to
//! Ready=True at a steady pace (50/s), and the daemon's API is polled every 20 ms for the
//! backend. Latency = first poll that shows the backend active - the moment before the status
//! write was sent (so it includes the write, and up to one poll period).
//!
//! The Guests are pod-less (VMs outside Kubernetes) and carry `tapestry.dev/registered-by` as an
//! operator would set it: the controller publishes no other pod-less Guest (controller/src/trust.rs).
//!
//! Outputs in bench/results/: guests.json (every sample), guests.md, and
//! `guest_ready_to_map_p50_ms` / `guest_ready_to_map_p99_ms` merged into summary.json.
//! Benchmarks only report: no threshold, no assertion; but a run where no Guest reached the map
//! measured nothing, and fails (after writing its nulls, so no older figure stays). Needs root
//! (tapestryd loads eBPF).

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Map, json};
use tapestry_bench::{
    cni::Latency,
    quick,
    report::{merge_summary, write_atomic},
};
use tapestry_k8s::names::annotations;
use tapestry_tests::{daemon::Daemon, k8s::ControlPlane};

#[derive(Debug, Parser)]
#[command(about = "Guest Ready -> datapath map latency through the Kubernetes-mode chain")]
struct Cli {
    /// Guests (spread evenly over --services).
    #[arg(long, default_value_t = 1000)]
    guests: usize,
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Ready flips per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Where guests.json, guests.md and summary.json go.
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): 100 Guests (2 s of flips).
const QUICK: &[(&str, &str)] = &[("guests", "100"), ("out", quick::QUICK_RESULTS)];

fn main() {
    let cli: Cli = quick::parse(QUICK);
    if let Err(e) = run(cli) {
        eprintln!("tapestry-bench-guests: {e:#}");
        std::process::exit(1);
    }
}

fn guest_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn run(cli: Cli) -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: tapestryd loads eBPF programs");
    }
    let cp = ControlPlane::start().context("starting the control plane")?;
    let admin = cp.kubeconfig_path("admin")?;
    let bin = tapestry_tests::daemon::bin_dir();
    cp.install_guest_crd()?;
    let daemon = Daemon::start_with(
        "bench-guests",
        "services: []\n",
        &[],
        &[
            "--source",
            "kubernetes",
            "--node-name",
            "bench-node",
            "--kubeconfig",
            admin.to_str().context("kubeconfig path")?,
        ],
    )?;
    let controller_log = daemon.dir.join("controller.log");
    let mut controller = Command::new(bin.join("tapestry-controller"))
        .arg(format!("--kubeconfig={}", admin.display()))
        .args(["--leader-elect=false", "--metrics-addr=127.0.0.1:0"])
        .env_remove("KUBECONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&controller_log)?)
        .spawn()
        .context("starting tapestry-controller")?;

    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(measure(&cli, &admin, &daemon));
    let _ = controller.kill();
    let _ = controller.wait();
    let samples = result?;

    let ms: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    let lat = Latency::of(&ms);
    let missed = cli.guests - samples.len();
    std::fs::create_dir_all(&cli.out)?;
    let raw = json!({
        "guests": cli.guests, "services": cli.services, "rate_per_s": cli.rate,
        "poll_ms": POLL.as_millis() as u64,
        "p50_ms": lat.p50_ms, "p90_ms": lat.p90_ms, "p99_ms": lat.p99_ms, "max_ms": lat.max_ms,
        "missed": missed,
        "samples_ms": samples.iter().map(|(i, ms)| json!({"guest": i, "ms": ms})).collect::<Vec<_>>(),
    });
    write_atomic(
        &cli.out.join("guests.json"),
        &serde_json::to_string_pretty(&raw)?,
    )?;
    let mut md = String::new();
    writeln!(
        md,
        "# Guest Ready -> datapath map (real apiserver, tapestry-controller, tapestryd)\n"
    )?;
    writeln!(
        md,
        "{} guests behind {} Services, flipped Ready at {}/s; daemon API polled every {} ms.\n",
        cli.guests,
        cli.services,
        cli.rate,
        POLL.as_millis()
    )?;
    writeln!(
        md,
        "| p50 ms | p90 ms | p99 ms | max ms | missed | target p99 |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.0}"));
    writeln!(
        md,
        "| {} | {} | {} | {} | {missed} | < 1000 |",
        f(lat.p50_ms),
        f(lat.p90_ms),
        f(lat.p99_ms),
        f(lat.max_ms),
    )?;
    write_atomic(&cli.out.join("guests.md"), &md)?;
    let mut updates = Map::new();
    let round = |v: Option<f64>| json!(v.map(f64::round));
    updates.insert("guest_ready_to_map_p50_ms".into(), round(lat.p50_ms));
    updates.insert("guest_ready_to_map_p99_ms".into(), round(lat.p99_ms));
    merge_summary(&cli.out.join("summary.json"), &updates)?;
    print!("{md}");
    if samples.is_empty() {
        let log = std::fs::read_to_string(&controller_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "no Guest reached the daemon's map within 30 s of its Ready write: the chain is \
             broken; the controller's log ends with:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

const POLL: Duration = Duration::from_millis(20);

async fn measure(cli: &Cli, admin: &std::path::Path, daemon: &Daemon) -> Result<Vec<(usize, f64)>> {
    let client = tapestry_k8s::client(Some(admin)).await?;
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), "default");
    let guests: Api<tapestry_k8s::Guest> = Api::namespaced(client.clone(), "default");
    for s in 0..cli.services {
        let svc = serde_json::from_value(json!({
            "metadata": {"name": format!("g-{s}")},
            "spec": {"selector": {"app": format!("g-{s}")},
                     "ports": [{"port": 80, "targetPort": 8080}]}
        }))?;
        services.create(&PostParams::default(), &svc).await?;
    }
    let pp = PatchParams::apply("tapestryd").force();
    let status = |ready: bool| {
        json!({"apiVersion": "tapestry.dev/v1alpha1", "kind": "Guest", "status": {"conditions": [
            {"type": "Attached", "status": "True", "reason": "TapAttached"},
            {"type": "Ready", "status": if ready {"True"} else {"False"}, "reason": "Bench",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    };
    let t = Instant::now();
    for i in 0..cli.guests {
        let name = format!("vm-{i}");
        let g = json!({"apiVersion": "tapestry.dev/v1alpha1", "kind": "Guest",
            "metadata": {"name": name, "labels": {"app": format!("g-{}", i % cli.services)},
                         // No pod backs it: published only as registered by an operator.
                         "annotations": {annotations::REGISTERED_BY: "admin"}},
            // On another node: the daemon's own sweep deletes its node's Guests that no CNI
            // attachment backs, and the path measured does not depend on the node.
            "spec": {"nodeName": "bench-guests-node", "ips": [guest_ip(i).to_string()],
                     "mac": "52:54:00:00:00:01", "tap": "tap0"}});
        guests.patch(&name, &pp, &Patch::Apply(&g)).await?;
        guests
            .patch_status(&name, &pp, &Patch::Apply(&status(false)))
            .await?;
    }
    eprintln!(
        "tapestry-bench-guests: {} guests created in {:.1} s",
        cli.guests,
        t.elapsed().as_secs_f64()
    );
    // Let the controller write every (not ready) slice first.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let seen: Arc<Mutex<HashMap<Ipv4Addr, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let seen = seen.clone();
        let stop = stop.clone();
        let socket = daemon.socket.clone();
        std::thread::spawn(move || {
            let c = tapestry_api::client::blocking::Client::new(&socket);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(services) = c.services() {
                    let now = Instant::now();
                    let mut seen = seen.lock().unwrap();
                    for s in services {
                        for b in s.backends {
                            if b.state == tapestry_api::types::BackendState::Active {
                                seen.entry(b.ip).or_insert(now);
                            }
                        }
                    }
                }
                std::thread::sleep(POLL);
            }
        })
    };
    let mut sent: Vec<(usize, Instant)> = Vec::with_capacity(cli.guests);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / cli.rate.max(1));
    for i in 0..cli.guests {
        tick.tick().await;
        let t0 = Instant::now();
        guests
            .patch_status(&format!("vm-{i}"), &pp, &Patch::Apply(&status(true)))
            .await?;
        sent.push((i, t0));
    }
    // Wait for the tail (or give up after 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && seen.lock().unwrap().len() < cli.guests {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = poller.join();
    let seen = seen.lock().unwrap();
    let samples = sent
        .into_iter()
        .filter_map(|(i, t0)| {
            let t1 = seen.get(&guest_ip(i))?;
            Some((i, t1.saturating_duration_since(t0).as_secs_f64() * 1000.0))
        })
        .collect();
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let c: Cli = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!((c.guests, c.services, c.rate), (100, 10, 50));
        assert_eq!(c.out, PathBuf::from(quick::QUICK_RESULTS));
        let c: Cli = quick::parse_from(["b"], QUICK);
        assert_eq!((c.guests, c.out), (1000, PathBuf::from(quick::RESULTS)));
    }
}
