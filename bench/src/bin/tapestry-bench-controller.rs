//! `tapestry-bench-controller`: `tapestry-controller` at scale against a real kube-apiserver and
//! etcd (`tapestry_tests::k8s`). It loads 10,000 Services (selector `app=svc-N`) and 50,000
//! ready Guests (5 per Service, on 100 Nodes in 3 zones) in one namespace, then measures the
//! release controller, run as its own service account under the chart's RBAC:
//!
//! - cold resync: from starting the process until every Service has tapestry's EndpointSlice
//!   with its 5 ready endpoints (watched by this program, not taken from the controller);
//! - warm resync: a restart with every slice in place, until the controller reports its first
//!   pass over every Service done (`tapestry_controller_initial_sync_seconds`), with the writes it
//!   made (none expected);
//! - peak RSS (`VmHWM`) and CPU time of the controller process in each run.
//!
//! Writes bench/results/controller.{json,md} and, at the default scale, merges
//! `controller_resync_10000x50000_seconds` (cold), `controller_warm_resync_10000x50000_seconds`
//! and `controller_peak_rss_mb` into summary.json. `--quick` runs 1,000 x 5,000 into
//! bench/results/quick and merges the same key names there (the scale is in controller.json and
//! .md). Reports only: no threshold, no assertion.
//! Needs the Kubernetes binaries of scripts/build-k8s.sh; no root.

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Map, Value, json};
use tapestry_bench::{
    quick,
    report::{merge_summary, write_atomic},
};
use tapestry_k8s::Guest;
use tapestry_tests::k8s::{ADMIN, ControlPlane, Identity};

const NAMESPACE: &str = "bench";
const MANAGED_BY: &str = "tapestry-controller.tapestry.dev";
const CONTROLLER_NS: &str = "tapestry-system";
const CONTROLLER_ID: &str = "tapestry-controller";

/// The controller's RBAC as the chart grants it (controller/README.md).
const RBAC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tapestry-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: tapestry-controller}
rules:
- apiGroups: [""]
  resources: [services, nodes, pods]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [tapestry.dev]
  resources: [guests]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch, create, update, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: tapestry-controller}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tapestry-controller}
subjects:
- {kind: ServiceAccount, name: tapestry-controller, namespace: tapestry-system}
"#;

#[derive(Parser)]
#[command(
    about = "tapestry-controller's full resync and memory at 10,000 Services x 50,000 Guests"
)]
struct Args {
    #[arg(long, default_value_t = SERVICES)]
    services: usize,
    #[arg(long, default_value_t = GUESTS_PER_SERVICE)]
    guests_per_service: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// API requests in flight while loading the objects.
    #[arg(long, default_value_t = 32)]
    load_concurrency: usize,
    /// The controller binary (default: the tapestry-controller beside this program, else the
    /// target directory's).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Another controller binary measured after, on the same objects (the slices deleted first),
    /// e.g. the previous commit's, for a before/after; a timeout there is recorded, not fatal.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Extra controller flags, e.g. `--controller-arg=--concurrency=16`.
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    controller_args: Vec<String>,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    /// For profiling: after the runs, keep the control plane and its objects until the file
    /// `hold` in its directory (printed) is removed.
    #[arg(long)]
    hold: bool,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// The default scale: the one summary.json's keys are named after.
const SERVICES: usize = 10_000;
const GUESTS_PER_SERVICE: usize = 5;

/// `--quick` (bench/README.md): 1,000 Services x 5,000 Guests.
const QUICK: &[(&str, &str)] = &[("services", "1000"), ("out", quick::QUICK_RESULTS)];

impl Args {
    fn guests(&self) -> usize {
        self.services * self.guests_per_service
    }

    fn default_scale(&self) -> bool {
        self.services == SERVICES && self.guests() == SERVICES * GUESTS_PER_SERVICE
    }

    /// The scale in summary.json's key names: the default's, also for a quick run, whose
    /// summary.json (in bench/results/quick) has the full run's key names.
    fn summary_scale(&self) -> Option<String> {
        (self.default_scale() || self.quick)
            .then(|| format!("{SERVICES}x{}", SERVICES * GUESTS_PER_SERVICE))
    }
}

// ---------------------------------------------------------------------------------------------
// The objects

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "labels": {"bench": "controller"}},
        "spec": {
            "selector": {"app": format!("svc-{i}")},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        }
    }))
    .expect("a valid Service")
}

/// Guest `k` (0-based over all guests): Service `k / per`, address 10.64.0.0 + k.
fn guest(k: usize, per: usize, nodes: usize) -> Guest {
    let ip = 0x0a40_0000u32 + k as u32;
    let o = ip.to_be_bytes();
    serde_json::from_value(json!({
        "apiVersion": "tapestry.dev/v1alpha1",
        "kind": "Guest",
        "metadata": {
            "name": format!("svc-{}-vm-{}", k / per, k % per),
            "labels": {"app": format!("svc-{}", k / per), "kubevirt.io": "virt-launcher"},
            // Registered by an operator, no pod behind it: published without a pod lookup.
            "annotations": {"tapestry.dev/registered-by": "admin"},
        },
        "spec": {
            "nodeName": format!("node-{}", k % nodes),
            "ips": [format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])],
            "mac": format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3]),
            "tap": "tap0",
            "ports": [{"name": "http", "port": 8080}],
        }
    }))
    .expect("a valid Guest")
}

fn ready_status() -> Value {
    json!({"status": {"conditions": [
        {"type": "Attached", "status": "True", "reason": "TapCreated"},
        {"type": "Ready", "status": "True", "reason": "DhcpBound"},
    ]}})
}

/// Runs `f` over `0..n` with `concurrency` in flight; returns the seconds it took.
async fn load<F, Fut>(what: &str, n: usize, concurrency: usize, f: F) -> Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let started = Instant::now();
    let done = AtomicUsize::new(0);
    stream::iter(0..n)
        .map(|i| {
            let done = &done;
            let fut = f(i);
            async move {
                fut.await?;
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                if d.is_multiple_of(10_000) {
                    eprintln!(
                        "  {what}: {d}/{n} ({:.0} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await
        .with_context(|| format!("loading {what}"))?;
    let s = started.elapsed().as_secs_f64();
    eprintln!("  {what}: {n} in {s:.1} s ({:.0}/s)", n as f64 / s);
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Watching tapestry's slices

/// Services whose tapestry slices hold exactly `want` ready endpoints, kept by a watch.
#[derive(Clone, Default)]
struct SliceWatch {
    /// service -> slice name -> ready endpoints
    slices: Arc<Mutex<HashMap<String, HashMap<String, usize>>>>,
    complete: Arc<AtomicUsize>,
}

impl SliceWatch {
    fn apply(&self, slice: &EndpointSlice, deleted: bool, want: usize) {
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            return;
        };
        let name = slice.metadata.name.clone().unwrap_or_default();
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        let mut all = self.slices.lock().unwrap();
        let entry = all.entry(svc.clone()).or_default();
        let before = entry.values().sum::<usize>() == want;
        if deleted {
            entry.remove(&name);
        } else {
            entry.insert(name, ready);
        }
        let after = entry.values().sum::<usize>() == want;
        match (before, after) {
            (false, true) => {
                self.complete.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.complete.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    fn start(client: Client, want: usize) -> SliceWatch {
        let sw = SliceWatch::default();
        let w = sw.clone();
        let api = Api::<EndpointSlice>::namespaced(client, NAMESPACE);
        let cfg = watcher::Config::default().labels(&format!(
            "endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
        ));
        tokio::spawn(async move {
            let mut events = watcher(api, cfg).default_backoff().boxed();
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                        w.apply(&s, false, want)
                    }
                    Ok(watcher::Event::Delete(s)) => w.apply(&s, true, want),
                    Ok(_) => {}
                    Err(e) => eprintln!("  slice watch: {e}"),
                }
            }
        });
        sw
    }
}

// ---------------------------------------------------------------------------------------------
// The controller process

struct Controller {
    child: Child,
    metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(cp: &ControlPlane, bin: &Path, extra: &[String], log: &Path) -> Result<Controller> {
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let out = File::create(log)?;
        let child = Command::new(bin)
            .arg(format!(
                "--kubeconfig={}",
                cp.kubeconfig_path(CONTROLLER_ID)?.display()
            ))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg("--leader-elect=false")
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Controller {
            child,
            metrics_port,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "tapestry-controller exited ({status}):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    fn get_metrics(&self) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// One sample of /metrics (0 when absent or unreachable).
    fn metric(&self, sample: &str) -> f64 {
        let get = || -> Result<f64> {
            Ok(self
                .get_metrics()?
                .lines()
                .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
                .map(|v| v.trim().parse())
                .transpose()?
                .unwrap_or(0.0))
        };
        get().unwrap_or(0.0)
    }

    /// Whether /metrics has a sample named `name` (however it is labelled).
    fn has_metric(&self, name: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = self.get_metrics() {
                return text.lines().any(|l| l.starts_with(name));
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn writes(&self) -> f64 {
        self.metric("tapestry_controller_endpointslice_writes_total{op=\"apply\"}")
            + self.metric("tapestry_controller_endpointslice_writes_total{op=\"delete\"}")
    }

    fn stop(mut self) -> Result<()> {
        // SAFETY: plain syscall on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` (peak RSS) of a process, MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("bad stat")? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is field 3; utime 14 and stime 15.
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: plain libc query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What one controller run measured.
#[derive(Debug, Default, serde::Serialize)]
struct RunReport {
    /// Process start to every Service's slice complete (cold) or to the first pass done (warm).
    seconds: f64,
    /// Process start to every Service's slice complete, as this program's watch saw it.
    slices_complete_s: Option<f64>,
    /// The controller's own figure: its start to every Service reconciled once.
    initial_sync_s: f64,
    writes: f64,
    reconciliations: f64,
    peak_rss_mib: f64,
    cpu_s: f64,
    loadavg_after: String,
}

/// Runs the controller until `done` says so (or the timeout), sampling its metrics.
fn run_controller(
    cp: &ControlPlane,
    bin: &Path,
    args: &Args,
    label: &str,
    slices: &SliceWatch,
    wait_for_slices: bool,
) -> Result<RunReport> {
    let log = cp.dir().join(format!("controller-{label}.log"));
    let started = Instant::now();
    let mut c = Controller::start(cp, bin, &args.controller_args, &log)?;
    let deadline = started + Duration::from_secs(args.timeout);
    let mut report = RunReport::default();
    let mut last_print = Instant::now();
    // A controller without `tapestry_controller_initial_sync_seconds` (an older build given as
    // --baseline): its first pass is over once it has reconciled as many times as there are
    // Services with no write pending.
    let has_sync_metric = c.has_metric("tapestry_controller_initial_sync_seconds");
    loop {
        c.check_running()?;
        if wait_for_slices
            && report.slices_complete_s.is_none()
            && slices.complete.load(Ordering::Relaxed) >= args.services
        {
            report.slices_complete_s = Some(started.elapsed().as_secs_f64());
        }
        let sync = if has_sync_metric {
            c.metric("tapestry_controller_initial_sync_seconds")
        } else if c.metric("tapestry_controller_reconciliations_total") > args.services as f64 {
            started.elapsed().as_secs_f64()
        } else {
            0.0
        };
        if sync > 0.0 && report.initial_sync_s == 0.0 {
            report.initial_sync_s = sync;
            report.seconds = started.elapsed().as_secs_f64();
        }
        let done = if wait_for_slices {
            report.slices_complete_s.is_some()
        } else {
            report.initial_sync_s > 0.0
        };
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{label}: not done after {} s: {} of {} Services complete, first pass {}",
                args.timeout,
                slices.complete.load(Ordering::Relaxed),
                args.services,
                if sync > 0.0 { "done" } else { "not done" },
            );
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {label}: {:.0} s, {} Services complete, {} writes",
                started.elapsed().as_secs_f64(),
                slices.complete.load(Ordering::Relaxed),
                c.writes()
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(s) = report.slices_complete_s {
        report.seconds = s;
    }
    // The triggers our own writes cause (slice events) settle; then the counters and the peak.
    std::thread::sleep(Duration::from_secs(3));
    c.check_running()?;
    report.writes = c.writes();
    report.reconciliations = c.metric("tapestry_controller_reconciliations_total");
    report.peak_rss_mib = peak_rss_mib(c.pid())?;
    report.cpu_s = cpu_seconds(c.pid())?;
    report.loadavg_after = loadavg();
    c.stop()?;
    let _ = std::fs::copy(&log, args.out.join(format!("controller-{label}.log")));
    eprintln!("  {label}: {report:?}");
    Ok(report)
}

fn main() -> Result<()> {
    let args: Args = quick::parse(QUICK);
    if let Err(why) = tapestry_tests::k8s::require_k8s() {
        bail!("{why}");
    }
    let beside = std::env::current_exe()?.with_file_name("tapestry-controller");
    let bin = match &args.controller {
        Some(p) => p.clone(),
        None if beside.is_file() => beside,
        None => tapestry_tests::daemon::binary("tapestry-controller")?,
    };
    std::fs::create_dir_all(&args.out)?;
    let started = Instant::now();
    let load_before = loadavg();

    eprintln!("tapestry-bench-controller: starting etcd and kube-apiserver");
    let cp = ControlPlane::start_with(&[Identity::service_account(
        CONTROLLER_ID,
        CONTROLLER_NS,
        "tapestry-controller",
    )])?;
    cp.apply(RBAC)?;
    cp.install_guest_crd()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = rt.block_on(tapestry_k8s::client(Some(&cp.kubeconfig_path(ADMIN)?)))?;

    // Load.
    let (services, guests, per, nodes) = (
        args.services,
        args.guests(),
        args.guests_per_service,
        args.nodes,
    );
    eprintln!(
        "loading {services} Services, {guests} Guests, {nodes} Nodes ({} in flight)",
        args.load_concurrency
    );
    let (load_services_s, load_guests_s, load_status_s) = rt.block_on(async {
        let pp = PostParams::default();
        Api::<Namespace>::all(client.clone())
            .create(
                &pp,
                &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?,
            )
            .await?;
        let node_api = Api::<Node>::all(client.clone());
        load("nodes", nodes, args.load_concurrency, |i| {
            let (api, pp) = (node_api.clone(), pp.clone());
            async move {
                let node: Node = serde_json::from_value(json!({"metadata": {
                    "name": format!("node-{i}"),
                    "labels": {"topology.kubernetes.io/zone": format!("zone-{}", i % 3)},
                }}))?;
                api.create(&pp, &node).await?;
                Ok(())
            }
        })
        .await?;
        let svc_api = Api::<Service>::namespaced(client.clone(), NAMESPACE);
        let s = load("services", services, args.load_concurrency, |i| {
            let (api, pp) = (svc_api.clone(), pp.clone());
            async move {
                api.create(&pp, &service(i)).await?;
                Ok(())
            }
        })
        .await?;
        let guest_api = Api::<Guest>::namespaced(client.clone(), NAMESPACE);
        let g = load("guests", guests, args.load_concurrency, |k| {
            let (api, pp) = (guest_api.clone(), pp.clone());
            async move {
                api.create(&pp, &guest(k, per, nodes)).await?;
                Ok(())
            }
        })
        .await?;
        let status = ready_status();
        let st = load("guest status", guests, args.load_concurrency, |k| {
            let api = guest_api.clone();
            let status = status.clone();
            async move {
                let name = format!("svc-{}-vm-{}", k / per, k % per);
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                Ok(())
            }
        })
        .await?;
        Ok::<_, anyhow::Error>((s, g, st))
    })?;

    // Cold: nothing of ours exists yet.
    let slices = {
        let _guard = rt.enter();
        SliceWatch::start(client.clone(), per)
    };
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("cold resync (no slices)");
    let cold = run_controller(&cp, &bin, &args, "cold", &slices, true)?;
    eprintln!("warm resync (every slice in place)");
    let warm = run_controller(&cp, &bin, &args, "warm", &slices, false)?;
    let complete_after = slices.complete.load(Ordering::Relaxed);
    let baseline = match &args.baseline {
        None => Value::Null,
        Some(b) => {
            eprintln!("removing the slices, for the baseline");
            remove_slices(&rt, &client, &slices)?;
            eprintln!("baseline {}: cold resync (no slices)", b.display());
            let cold = run_controller(&cp, b, &args, "baseline-cold", &slices, true);
            let warm = match &cold {
                Ok(_) => {
                    eprintln!("baseline: warm resync");
                    run_controller(&cp, b, &args, "baseline-warm", &slices, false)
                }
                Err(_) => Err(anyhow::anyhow!("no cold run to follow")),
            };
            let as_json = |r: Result<RunReport>| match r {
                Ok(r) => serde_json::to_value(r).unwrap_or(Value::Null),
                Err(e) => json!({"error": format!("{e:#}")}),
            };
            json!({"controller": b.display().to_string(),
                   "cold": as_json(cold), "warm": as_json(warm)})
        }
    };

    let scale = args
        .summary_scale()
        .unwrap_or_else(|| format!("{services}x{guests}"));
    let mut summary = Map::new();
    summary.insert(
        format!("controller_resync_{scale}_seconds"),
        json!(round(cold.seconds, 2)),
    );
    summary.insert(
        format!("controller_warm_resync_{scale}_seconds"),
        json!(round(warm.seconds, 2)),
    );
    summary.insert(
        "controller_peak_rss_mb".into(),
        json!(round(cold.peak_rss_mib.max(warm.peak_rss_mib), 1)),
    );
    let report = json!({
        "services": services,
        "guests": guests,
        "guests_per_service": per,
        "nodes": nodes,
        "namespace": "one (all objects)",
        "controller": bin.display().to_string(),
        "controller_args": args.controller_args,
        "load_concurrency": args.load_concurrency,
        "load_services_s": round(load_services_s, 1),
        "load_guests_s": round(load_guests_s, 1),
        "load_guest_status_s": round(load_status_s, 1),
        "cold": cold,
        "warm": warm,
        "baseline": baseline,
        "services_complete_after_warm": complete_after,
        "loadavg_before": load_before,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "total_s": round(started.elapsed().as_secs_f64(), 0),
        "summary": summary,
    });
    write_atomic(
        &args.out.join("controller.json"),
        &(serde_json::to_string_pretty(&report)? + "\n"),
    )?;
    write_atomic(&args.out.join("controller.md"), &markdown(&args, &report))?;
    if args.summary_scale().is_some() {
        merge_summary(&args.out.join("summary.json"), &summary)?;
    } else {
        eprintln!("not the default scale: summary.json left alone");
    }
    eprintln!(
        "tapestry-bench-controller: cold {:.1} s, warm {:.1} s ({} writes), peak RSS {:.0} MiB; \
         wrote {}/controller.{{json,md}} in {:.0} s",
        cold.seconds,
        warm.seconds,
        warm.writes,
        cold.peak_rss_mib.max(warm.peak_rss_mib),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    if args.hold {
        let hold = cp.dir().join("hold");
        std::fs::write(&hold, "")?;
        eprintln!(
            "holding: admin kubeconfig {}, controller kubeconfig {}; rm {} to stop",
            cp.kubeconfig_path(ADMIN)?.display(),
            cp.kubeconfig_path(CONTROLLER_ID)?.display(),
            hold.display()
        );
        while hold.exists() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Deletes every tapestry slice of the namespace (one deletecollection) and waits until the
/// watch saw them go.
fn remove_slices(rt: &tokio::runtime::Runtime, client: &Client, slices: &SliceWatch) -> Result<()> {
    rt.block_on(
        Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE).delete_collection(
            &Default::default(),
            &kube::api::ListParams::default().labels(&format!(
                "endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
            )),
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while slices.complete.load(Ordering::Relaxed) > 0 {
        ensure!(Instant::now() < deadline, "the slices did not go");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn markdown(args: &Args, r: &Value) -> String {
    let row = |name: &str, v: &Value| {
        if let Some(e) = v["error"].as_str() {
            return format!(
                "| {name} | {} | | | | | |\n",
                e.lines().next().unwrap_or("")
            );
        }
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        format!(
            "| {name} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} |\n",
            f("seconds"),
            f("initial_sync_s"),
            f("writes"),
            f("reconciliations"),
            f("peak_rss_mib"),
            f("cpu_s"),
        )
    };
    let mut md = format!(
        "# tapestry-controller at {} Services x {} Guests\n\n\
         One namespace; {} Guests per Service, all Ready, on {} Nodes in 3 zones; the release \
         controller as its own service account (the chart's RBAC), `--leader-elect=false`{}; \
         etcd and kube-apiserver on the same {}-CPU machine.\n\n\
         | run | seconds | controller's own first pass, s | slice writes | reconciles | peak RSS, MiB | CPU, s |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        r["services"],
        r["guests"],
        r["guests_per_service"],
        r["nodes"],
        if args.controller_args.is_empty() {
            String::new()
        } else {
            format!(", `{}`", args.controller_args.join(" "))
        },
        r["cpus"],
    );
    md += &row(
        "cold: no slices -> every Service's slice complete",
        &r["cold"],
    );
    md += &row("warm: restart with every slice in place", &r["warm"]);
    if !r["baseline"].is_null() {
        md += &row("baseline, cold", &r["baseline"]["cold"]);
        md += &row("baseline, warm", &r["baseline"]["warm"]);
    }
    md += &format!(
        "\n- cold = process start until this program's watch saw every Service's tapestry \
         EndpointSlice with its {} ready endpoints; warm = process start until the controller \
         reported its first pass over every Service (`tapestry_controller_initial_sync_seconds`).\n\
         - Loading ({} in flight): Services {} s, Guests {} s, their status {} s.\n\
         - Load average before: {}; after the cold run: {}.\n{}",
        r["guests_per_service"],
        r["load_concurrency"],
        r["load_services_s"],
        r["load_guests_s"],
        r["load_guest_status_s"],
        r["loadavg_before"].as_str().unwrap_or(""),
        r["cold"]["loadavg_after"].as_str().unwrap_or(""),
        match r["baseline"]["controller"].as_str() {
            Some(b) => format!(
                "- baseline: `{b}`, measured after on the same objects (the slices deleted \
                 first); it has no first-pass metric: its pass counts as done once it has \
                 reconciled more times than there are Services.\n"
            ),
            None => String::new(),
        },
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let a: Args = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!((a.services, a.guests()), (1000, 5000));
        assert_eq!(a.out, PathBuf::from(quick::QUICK_RESULTS));
        assert_eq!(a.summary_scale().as_deref(), Some("10000x50000"));
        let a: Args = quick::parse_from(["b"], QUICK);
        assert_eq!((a.services, a.guests()), (10_000, 50_000));
        assert_eq!(a.out, PathBuf::from(quick::RESULTS));
        assert_eq!(a.summary_scale().as_deref(), Some("10000x50000"));
        let a: Args = quick::parse_from(["b", "--services", "100"], QUICK);
        assert_eq!(a.summary_scale(), None);
    }
}
