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
//! Outputs in bench/results/: guests.json (every sample), guests.md, and
//! `guest_ready_to_map_p50_ms` / `guest_ready_to_map_p99_ms` merged into summary.json.
//! Benchmarks only report: no threshold, no assertion. Needs root (tapestryd loads eBPF).

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
use tapestry_bench::report::{merge_summary, write_atomic};
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
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("tapestry-bench-guests: {e:#}");
        std::process::exit(1);
    }
}

fn guest_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
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

    let mut sorted: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    sorted.sort_by(f64::total_cmp);
    let (p50, p90, p99, max) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
    );
    std::fs::create_dir_all(&cli.out)?;
    let raw = json!({
        "guests": cli.guests, "services": cli.services, "rate_per_s": cli.rate,
        "poll_ms": POLL.as_millis() as u64,
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
        "missed": cli.guests - samples.len(),
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
    writeln!(
        md,
        "| {p50:.0} | {p90:.0} | {p99:.0} | {max:.0} | {} | < 1000 |",
        cli.guests - samples.len()
    )?;
    write_atomic(&cli.out.join("guests.md"), &md)?;
    let mut updates = Map::new();
    updates.insert("guest_ready_to_map_p50_ms".into(), json!(p50.round()));
    updates.insert("guest_ready_to_map_p99_ms".into(), json!(p99.round()));
    merge_summary(&cli.out.join("summary.json"), &updates)?;
    print!("{md}");
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
            "metadata": {"name": name, "labels": {"app": format!("g-{}", i % cli.services)}},
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
