//! `tapestry-reliability`: faults under load on the standalone lab (real namespaces, a real
//! tapestryd, the real CNI chain), then `make reliability`'s report.
//!
//! Each fault round runs a client opening new connections through a Service VIP at a fixed
//! rate, and one long-lived connection asking every 100 ms (Cilium's conn-disrupt idea: nothing
//! may break), while the fault happens:
//! - `kill9`: tapestryd killed with `kill -9` and started again every few seconds;
//! - `broken_state_file`: the state file replaced by one that does not parse, then repaired;
//! - `conntrack_pressure`: the TCP conntrack table filled to capacity behind the load's back;
//! - `cni_add_while_down`: CNI ADD of a VM pod with the daemon stopped (code 11 expected, and
//!   nothing left behind once the runtime's DEL ran);
//! - `add_del_cycles`: ADD/DEL of VM pods through the chain (ptp + host-local + tapestry-cni),
//!   the daemon restarted in the middle: no endpoint, Guest, attachment, guest link pin, host
//!   veth or IPAM address may be left;
//! - `apiserver_outage`: tapestryd in Kubernetes mode against a real kube-apiserver and etcd,
//!   the apiserver killed for a minute and started again on the same etcd: the datapath
//!   unchanged and no connection failed meanwhile, the daemon up throughout, and a Service
//!   endpoint change made right after it is back reaches the maps (`--quick`: 10 s).
//!
//! `--report DIR` then folds these rounds, the fuzzing figures (`DIR/fuzz.json`, `make fuzz`) and
//! the in-kernel tests' summary lines (`RELIABILITY {...}` on stderr, `--test-lines FILE`) into
//! `DIR/reliability.json` and `DIR/reliability.md`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use tapestry_tests::{
    Lab, Pod,
    cmd::UnreachableRoute,
    cni::{NetworkConfigList, Runtime, RuntimeConf},
    daemon::{Daemon, bin_dir},
    k8s::ControlPlane,
    lab::vm_conflist,
    poll, stream_request,
};

#[derive(Parser)]
#[command(about = "Faults under load, and the reliability report")]
struct Cli {
    /// Shorter rounds (a smoke run of every scenario).
    #[arg(long)]
    quick: bool,
    /// New connections per second through the VIP during each round.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Where reliability.json and reliability.md go (and fuzz.json is read from).
    #[arg(long, default_value = "bench/results")]
    report: PathBuf,
    /// stderr of the in-kernel tests, whose `RELIABILITY {...}` lines join the report.
    #[arg(long)]
    test_lines: Option<PathBuf>,
    /// Only write reliability.md again from the reliability.json there (and fuzz.json).
    #[arg(long)]
    render_only: bool,
    /// Only these fault rounds (comma-separated), merged into the reliability.json there: its
    /// other rounds and checks stay as they were.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// The fault rounds, in the order they run; the first five share one standalone daemon.
const SCENARIOS: [&str; 6] = [
    "kill9",
    "broken_state_file",
    "conntrack_pressure",
    "cni_add_while_down",
    "add_del_cycles",
    "apiserver_outage",
];

const T: Duration = Duration::from_secs(2);

/// The load of one round: new connections at a fixed rate, and one long-lived connection.
struct Load {
    running: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    long_requests: Arc<AtomicU64>,
    long_failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(client: &Pod, vip: SocketAddrV4, rate: u64) -> Result<Load> {
        let running = Arc::new(AtomicBool::new(true));
        let counters: [Arc<AtomicU64>; 4] = Default::default();
        let mut threads = Vec::new();
        let (c, r) = (client.clone(), running.clone());
        let (attempted, failed) = (counters[0].clone(), counters[1].clone());
        threads.push(std::thread::spawn(move || {
            let every = Duration::from_nanos(1_000_000_000 / rate.max(1));
            let mut next = Instant::now();
            while r.load(Ordering::Relaxed) {
                attempted.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = c.tcp_request(vip, b"x\n", T) {
                    eprintln!("  connection failed: {e}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                next += every;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }));
        let mut long = client.tcp_connect(vip, T)?;
        let first = stream_request(&mut long, b"first\n")?;
        let (r, requests, long_failed) =
            (running.clone(), counters[2].clone(), counters[3].clone());
        threads.push(std::thread::spawn(move || {
            while r.load(Ordering::Relaxed) {
                requests.fetch_add(1, Ordering::Relaxed);
                // The same backend answers each time: the connection's flow never moved.
                match stream_request(&mut long, b"again\n") {
                    Ok(a) if a == first => {}
                    other => {
                        eprintln!("  long-lived connection: {other:?}, first answer {first:?}");
                        long_failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
        let [attempted, failed, long_requests, long_failed] = counters;
        Ok(Load {
            running,
            attempted,
            failed,
            long_requests,
            long_failed,
            threads,
        })
    }

    /// (connections attempted, failed) so far.
    fn counts(&self) -> (u64, u64) {
        (
            self.attempted.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn stop(self) -> Value {
        self.running.store(false, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        json!({
            "connections_attempted": self.attempted.load(Ordering::Relaxed),
            "connections_failed": self.failed.load(Ordering::Relaxed),
            "long_lived_requests": self.long_requests.load(Ordering::Relaxed),
            "long_lived_failed": self.long_failed.load(Ordering::Relaxed),
        })
    }
}

/// The lab of the load rounds: a client and two backends behind one VIP.
struct Setup {
    lab: Lab,
    client: Pod,
    backends: Vec<Pod>,
    vip: SocketAddrV4,
    _servers: Vec<tapestry_tests::ServerHandle>,
}

impl Setup {
    fn new() -> Result<Setup> {
        let mut lab = Lab::new("reliab")?;
        let client = lab.add_pod("client")?;
        let backends = vec![lab.add_pod("be0")?, lab.add_pod("be1")?];
        let servers = backends
            .iter()
            .map(|b| b.serve_tcp_name(8080))
            .collect::<Result<Vec<_>>>()?;
        let vip = SocketAddrV4::new(lab.service_ip(0), 80);
        Ok(Setup {
            lab,
            client,
            backends,
            vip,
            _servers: servers,
        })
    }

    fn state(&self) -> String {
        let mut s = format!(
            "services:\n  - name: web\n    vip: {}\n    port: 80\n    backends:\n",
            self.vip.ip()
        );
        for b in &self.backends {
            s.push_str(&format!("      - {{ ip: {}, port: 8080 }}\n", b.ip));
        }
        s
    }

    fn interfaces(&self) -> Vec<&str> {
        std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|p| p.host_ifname.as_str())
            .collect()
    }
}

fn round(name: &str, started: Instant, load: Value, extra: Value) -> Value {
    let mut r = json!({"scenario": name, "seconds": started.elapsed().as_secs_f64()});
    for v in [load, extra] {
        if let Value::Object(m) = v {
            r.as_object_mut().unwrap().extend(m);
        }
    }
    eprintln!("{r}");
    r
}

fn kill9(s: &Setup, d: &mut Daemon, rate: u64, secs: u64) -> Result<Value> {
    let t = Instant::now();
    let load = Load::start(&s.client, s.vip, rate)?;
    let mut kills = 0;
    while t.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(3));
        d.kill9()?;
        kills += 1;
        // A moment with no daemon at all: the pinned datapath carries on alone.
        std::thread::sleep(Duration::from_millis(300));
        d.restart()?;
    }
    Ok(round("kill9", t, load.stop(), json!({ "kills": kills })))
}

fn broken_state_file(s: &Setup, d: &mut Daemon, rate: u64, secs: u64) -> Result<Value> {
    let t = Instant::now();
    let load = Load::start(&s.client, s.vip, rate)?;
    std::thread::sleep(Duration::from_secs(secs / 3));
    std::fs::write(&d.state_file, "services: [ {{ this is not yaml\n")?;
    let reported = d
        .wait_status(Duration::from_secs(10), |st| st.last_error.is_some())
        .is_ok();
    std::thread::sleep(Duration::from_secs(secs / 3));
    d.write_state(&s.state())?;
    let cleared = d
        .wait_status(Duration::from_secs(10), |st| st.last_error.is_none())
        .is_ok();
    std::thread::sleep(Duration::from_secs(secs / 3));
    Ok(round(
        "broken_state_file",
        t,
        load.stop(),
        json!({"error_reported": reported, "recovered": cleared}),
    ))
}

fn conntrack_pressure(s: &Setup, d: &Daemon, rate: u64, secs: u64) -> Result<Value> {
    use tapestry_common::MAX_CONNTRACK;
    let t = Instant::now();
    let load = Load::start(&s.client, s.vip, rate)?;
    std::thread::sleep(Duration::from_secs(1));
    // Established-looking flows from addresses no pod has: the table full of others' entries.
    let before = ct_table(d)?;
    // New connections from clients no pod is, through the datapath: the table full of others'
    // entries.
    let inserted = d.fill_conntrack(MAX_CONNTRACK, *s.vip.ip())?;
    std::thread::sleep(Duration::from_secs(secs.saturating_sub(1)));
    let load = load.stop();
    let after = ct_table(d)?;
    Ok(round(
        "conntrack_pressure",
        t,
        load,
        json!({
            "table_capacity": MAX_CONNTRACK,
            "entries_inserted": inserted,
            "entries_at_end": after.entries,
            // As the daemon reports them: entries the datapath stored and neither it nor the
            // daemon removed that are gone.
            "evicted": after.evicted.unwrap_or(0).saturating_sub(before.evicted.unwrap_or(0)),
        }),
    ))
}

/// A ClusterIP of the apiserver round, in the control plane's Service range.
const K8S_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 78, 10);
const K8S_NODE: &str = "reliab-node";

/// The round's Service and its slice of `backends` (a controller's, written by hand).
fn k8s_service(cp: &ControlPlane, backends: &[&Pod]) -> Result<()> {
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": K8S_VIP.to_string(),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        .to_string(),
    )?;
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|p| {
            json!({"addresses": [p.ip.to_string()], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": p.name, "namespace": "default"}})
        })
        .collect();
    cp.apply(
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default", "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": "reliability.tapestry.example.com"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints})
        .to_string(),
    )?;
    Ok(())
}

/// The active backends of `default/web` in the daemon's maps, sorted.
fn k8s_backends(d: &Daemon) -> Option<Vec<Ipv4Addr>> {
    let services = d.client().services().ok()?;
    let web = services.iter().find(|s| s.vip == K8S_VIP && s.port == 80)?;
    let mut ips: Vec<Ipv4Addr> = web
        .backends
        .iter()
        .filter(|b| b.state == tapestry_api::types::BackendState::Active)
        .map(|b| b.ip)
        .collect();
    ips.sort();
    Some(ips)
}

fn wait_backends(d: &Daemon, want: &[&Pod], timeout: Duration) -> Result<Duration> {
    let mut want: Vec<Ipv4Addr> = want.iter().map(|p| p.ip).collect();
    want.sort();
    let t = Instant::now();
    poll(timeout, &format!("default/web -> {want:?}"), || {
        Ok((k8s_backends(d).as_ref() == Some(&want)).then_some(()))
    })?;
    Ok(t.elapsed())
}

/// `apiserver_outage`: tapestryd in Kubernetes mode against a real kube-apiserver and etcd
/// (`tapestry_tests::k8s`), its Service's backends two of the lab's pods; while the load runs,
/// kube-apiserver is killed for `outage` and started again on the same etcd. During the outage
/// the datapath must not change and no connection fail; the daemon stays up (the same process)
/// and says the API is unreachable; right after the apiserver is back, a third backend is added
/// to the slice, and must reach the maps (the watches resynced) and take connections.
fn apiserver_outage(s: &mut Setup, rate: u64, outage: Duration) -> Result<Value> {
    let mut cp = ControlPlane::start()?;
    let _route = UnreachableRoute::new(&format!("{K8S_VIP}/32"))?;
    let be2 = s.lab.add_pod("be2")?;
    let _server = be2.serve_tcp_name(8080)?;
    let (be0, be1) = (&s.backends[0], &s.backends[1]);
    k8s_service(&cp, &[be0, be1])?;
    let kubeconfig = cp.kubeconfig_path("admin")?;
    let mut interfaces = s.interfaces();
    interfaces.push(&be2.host_ifname);
    let d = Daemon::start_with(
        "reliab-k8s",
        "services: []\n",
        &interfaces,
        &[
            "--source",
            "kubernetes",
            "--node-name",
            K8S_NODE,
            "--kubeconfig",
            kubeconfig.to_str().context("kubeconfig path")?,
        ],
    )?;
    wait_backends(&d, &[be0, be1], Duration::from_secs(30))?;
    let pid = d.pid().context("the daemon runs")?;
    let before = k8s_backends(&d);

    let t = Instant::now();
    let vip = SocketAddrV4::new(K8S_VIP, 80);
    let load = Load::start(&s.client, vip, rate)?;
    std::thread::sleep(Duration::from_secs(2));
    let at_stop = load.counts();
    cp.stop_apiserver();
    let stopped = Instant::now();
    let reported = poll(Duration::from_secs(30), "the outage in the status", || {
        let st = d.client().status()?;
        Ok(st
            .last_error
            .filter(|e| e.contains("unreachable"))
            .map(|_| stopped.elapsed()))
    })?;
    // Through the outage: the maps as they were, every second.
    let mut unchanged = true;
    while stopped.elapsed() < outage {
        unchanged &= k8s_backends(&d) == before;
        std::thread::sleep(Duration::from_secs(1).min(outage.saturating_sub(stopped.elapsed())));
    }
    unchanged &= k8s_backends(&d) == before;
    let at_restart = load.counts();
    let outage_secs = stopped.elapsed().as_secs_f64();
    cp.restart_apiserver()?;
    let back = Instant::now();
    // Right away: a third backend, which the daemon's watches see once they resume. Meanwhile
    // the status must stop saying the API is unreachable.
    k8s_service(&cp, &[be0, be1, &be2])?;
    let mut want = vec![be0.ip, be1.ip, be2.ip];
    want.sort();
    let (mut changed, mut cleared) = (None, None);
    while back.elapsed() < Duration::from_secs(120) && (changed.is_none() || cleared.is_none()) {
        if changed.is_none() && k8s_backends(&d).as_ref() == Some(&want) {
            changed = Some(back.elapsed());
        }
        if cleared.is_none() && d.client().status().is_ok_and(|st| st.last_error.is_none()) {
            cleared = Some(back.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The new backend takes new connections through the VIP.
    let mut be2_answered = false;
    for _ in 0..60 {
        if s.client.tcp_request(vip, b"x\n", T).ok().as_deref() == Some("be2") {
            be2_answered = true;
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let load = load.stop();
    let alive = d.pid() == Some(pid)
        && Path::new(&format!("/proc/{pid}")).exists()
        && d.client().healthz().is_ok();
    let last_error = d.client().status()?.last_error;
    drop(d);
    drop(cp);
    let ms = |d: Duration| (d.as_secs_f64() * 1000.0).round() as u64;
    let outage_failed = at_restart.1 - at_stop.1;
    let failures: Vec<&str> = [
        (outage_failed > 0, "connections failed during the outage"),
        (!unchanged, "the datapath changed during the outage"),
        (!alive, "the daemon did not stay up"),
        (
            changed.is_none(),
            "the endpoint change never reached the maps",
        ),
        (
            cleared.is_none(),
            "the status still says the API is unreachable",
        ),
        (!be2_answered, "the new backend took no connection"),
    ]
    .into_iter()
    .filter_map(|(failed, what)| failed.then_some(what))
    .collect();
    Ok(round(
        "apiserver_outage",
        t,
        load,
        json!({
            "outage_seconds": outage_secs,
            "outage_connections_attempted": at_restart.0 - at_stop.0,
            "outage_connections_failed": outage_failed,
            "outage_reported_after_ms": ms(reported),
            "datapath_unchanged_during_outage": unchanged,
            "daemon_stayed_up": alive,
            "endpoint_change_to_maps_ms": changed.map(ms),
            "error_cleared_after_ms": cleared.map(ms),
            "new_backend_answered": be2_answered,
            "last_error_at_end": last_error,
            "failures": failures,
        }),
    ))
}

/// The TCP conntrack table as the daemon's status shows it.
fn ct_table(d: &Daemon) -> Result<tapestry_api::types::MapFill> {
    d.client()
        .status()?
        .maps
        .into_iter()
        .find(|m| m.name == tapestry_common::map_names::CONNTRACK)
        .context("no TCP conntrack table in the status")
}

/// What a VM pod's ADD/DEL may leave behind, as seen from the daemon and the host.
fn leftovers(d: &Daemon, before_links: &BTreeSet<String>, ipam: &Path) -> Result<Value> {
    let c = d.client();
    let endpoints = c.endpoints()?.len();
    let guests = c.guests()?.len();
    let links = host_links()?;
    let new_links: Vec<_> = links.difference(before_links).cloned().collect();
    let guest_pins = std::fs::read_dir(d.bpffs_dir.join("links"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("guest-"))
                .count()
        })
        .unwrap_or(0);
    let addresses = std::fs::read_dir(ipam)
        .map(|rd| {
            rd.flatten()
                .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
                .filter(|f| {
                    let n = f.file_name().to_string_lossy().into_owned();
                    n.parse::<std::net::Ipv4Addr>().is_ok()
                })
                .count()
        })
        .unwrap_or(0);
    Ok(json!({
        "endpoints": endpoints,
        "guests": guests,
        "host_links": new_links,
        "guest_link_pins": guest_pins,
        "ipam_addresses": addresses,
    }))
}

fn leaks_in(v: &Value) -> u64 {
    ["endpoints", "guests", "guest_link_pins", "ipam_addresses"]
        .iter()
        .map(|k| v[k].as_u64().unwrap_or(0))
        .sum::<u64>()
        + v["host_links"].as_array().map_or(0, |a| a.len() as u64)
}

fn host_links() -> Result<BTreeSet<String>> {
    Ok(std::fs::read_dir("/sys/class/net")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

struct Chain {
    rt: Runtime,
    list: NetworkConfigList,
    ipam: PathBuf,
}

impl Chain {
    fn new(s: &Setup, d: &Daemon) -> Result<Chain> {
        let ipam = d.dir.join("ipam");
        let list = NetworkConfigList::from_value(&vm_conflist(&s.lab, &d.socket, &ipam))?;
        let rt = Runtime::new(["/usr/lib/cni".into(), bin_dir()], d.dir.join("cni-cache"));
        Ok(Chain { rt, list, ipam })
    }

    fn netns(&self, s: &Setup, i: usize) -> Result<(String, RuntimeConf)> {
        let name = format!("{}-c{i}", s.lab.prefix());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success();
        if !ok {
            bail!("ip netns add {name}");
        }
        let conf = RuntimeConf::new(
            &format!("cycle-{i}"),
            PathBuf::from("/run/netns").join(&name),
            "eth0",
        )
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAMESPACE", "default")
        .arg("K8S_POD_NAME", &format!("vm-{i}"));
        Ok((name, conf))
    }
}

fn netns_del(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

fn cni_add_while_down(s: &Setup, d: &mut Daemon) -> Result<Value> {
    let t = Instant::now();
    let chain = Chain::new(s, d)?;
    let before = host_links()?;
    let (ns, conf) = chain.netns(s, 9999)?;
    d.kill9()?;
    let add = chain.rt.add(&chain.list, &conf);
    let code = match &add {
        Err(e) => e.code(),
        Ok(_) => None,
    };
    // What a runtime does after a failed ADD.
    let del = chain.rt.del(&chain.list, &conf);
    netns_del(&ns);
    d.restart()?;
    let left = leftovers(d, &before, &chain.ipam)?;
    Ok(round(
        "cni_add_while_down",
        t,
        json!({}),
        json!({
            "add_error_code": code,
            "del_ok": del.is_ok(),
            "leftovers": left,
            "leaks": leaks_in(&left),
        }),
    ))
}

fn add_del_cycles(s: &Setup, d: &mut Daemon, cycles: usize) -> Result<Value> {
    let t = Instant::now();
    let chain = Chain::new(s, d)?;
    let before = host_links()?;
    let mut failures = Vec::new();
    for i in 0..cycles {
        if i == cycles / 2 {
            d.restart()?;
        }
        let (ns, conf) = chain.netns(s, i)?;
        if let Err(e) = chain.rt.add(&chain.list, &conf) {
            failures.push(format!("ADD {i}: {e}"));
        }
        if let Err(e) = chain.rt.del(&chain.list, &conf) {
            failures.push(format!("DEL {i}: {e}"));
        }
        netns_del(&ns);
    }
    let left = leftovers(d, &before, &chain.ipam)?;
    Ok(round(
        "add_del_cycles",
        t,
        json!({}),
        json!({
            "cycles": cycles,
            "restarts": 1,
            "failures": failures,
            "leftovers": left,
            "leaks": leaks_in(&left),
        }),
    ))
}

/// The in-kernel tests' `RELIABILITY {...}` lines, merged into one object.
fn test_lines(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        if let Some(j) = line.trim().strip_prefix("RELIABILITY ")
            && let Ok(Value::Object(m)) = serde_json::from_str::<Value>(j)
        {
            out.extend(m);
        }
    }
    Ok(Value::Object(out))
}

fn table(report: &Value) -> String {
    let mut md = String::from("# Reliability (`make reliability`)\n\n");
    md.push_str(
        "## Fuzzing\n\n| target | seconds | executions | crashes |\n|---|---:|---:|---:|\n",
    );
    if let Some(targets) = report["fuzz"]["targets"].as_object() {
        for (name, t) in targets {
            md.push_str(&format!(
                "| {name} | {} | {} | {} |\n",
                t["seconds"], t["executions"], t["crashes"]
            ));
        }
    }
    md.push_str("\n## In-kernel checks\n\n| check | figures |\n|---|---|\n");
    if let Some(m) = report["checks"].as_object() {
        for (k, v) in m {
            md.push_str(&format!("| {k} | `{v}` |\n"));
        }
    }
    md.push_str(
        "\n## Faults under load\n\n| scenario | seconds | connections attempted | failed | long-lived failed | leaks | details |\n|---|---:|---:|---:|---:|---:|---|\n",
    );
    if let Some(rounds) = report["faults"].as_array() {
        for r in rounds {
            let mut details = r.clone();
            for k in [
                "scenario",
                "seconds",
                "connections_attempted",
                "connections_failed",
                "long_lived_failed",
                "leaks",
            ] {
                details.as_object_mut().map(|m| m.remove(k));
            }
            let cell = |k: &str| match &r[k] {
                Value::Null => "-".to_string(),
                v => v.to_string(),
            };
            md.push_str(&format!(
                "| {} | {:.1} | {} | {} | {} | {} | `{}` |\n",
                r["scenario"].as_str().unwrap_or("?"),
                r["seconds"].as_f64().unwrap_or(0.0),
                cell("connections_attempted"),
                cell("connections_failed"),
                cell("long_lived_failed"),
                cell("leaks"),
                details
            ));
        }
    }
    md
}

/// `make fuzz`'s figures (fuzz.json in `dir`), if there are any.
fn read_fuzz(dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join("fuzz.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.render_only {
        let path = cli.report.join("reliability.json");
        let mut report: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        if let Some(f) = read_fuzz(&cli.report) {
            report["fuzz"] = f;
        }
        std::fs::write(cli.report.join("reliability.md"), table(&report))?;
        return Ok(());
    }
    if let Some(bad) = cli.only.iter().find(|o| !SCENARIOS.contains(&o.as_str())) {
        bail!("--only {bad}: the scenarios are {}", SCENARIOS.join(", "));
    }
    let want = |n: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == n);
    let _lock = tapestry_bench::lock_single_run(
        "tapestry-reliability",
        Duration::from_secs(1800),
        &|| false,
    )?;
    let (secs, cycles) = if cli.quick { (9, 20) } else { (60, 200) };
    let mut s = Setup::new()?;
    let mut faults = Vec::new();
    if SCENARIOS[..5].iter().any(|n| want(n)) {
        let mut d = Daemon::start("reliab", &s.state(), &s.interfaces())?;
        if want("kill9") {
            faults.push(kill9(&s, &mut d, cli.rate, secs)?);
        }
        if want("broken_state_file") {
            faults.push(broken_state_file(&s, &mut d, cli.rate, secs.min(15))?);
        }
        if want("conntrack_pressure") {
            faults.push(conntrack_pressure(&s, &d, cli.rate, secs.min(10))?);
        }
        if want("cni_add_while_down") {
            faults.push(cni_add_while_down(&s, &mut d)?);
        }
        if want("add_del_cycles") {
            faults.push(add_del_cycles(&s, &mut d, cycles)?);
        }
        // The Kubernetes-mode daemon takes the same pods' interfaces: this one goes first.
    }
    if want("apiserver_outage") {
        let outage = Duration::from_secs(if cli.quick { 10 } else { 60 });
        faults.push(apiserver_outage(&mut s, cli.rate, outage)?);
    }
    s.lab.destroy()?;
    for r in &mut faults {
        r["quick"] = json!(cli.quick);
    }

    // Only some rounds: the others stay as the last report has them.
    let previous: Option<Value> = (!cli.only.is_empty())
        .then(|| std::fs::read_to_string(cli.report.join("reliability.json")).ok())
        .flatten()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(rounds) = previous.as_ref().and_then(|p| p["faults"].as_array()) {
        let mut merged: Vec<Value> = rounds
            .iter()
            .map(|old| {
                faults
                    .iter()
                    .find(|new| new["scenario"] == old["scenario"])
                    .unwrap_or(old)
                    .clone()
            })
            .collect();
        for new in &faults {
            if !merged.iter().any(|m| m["scenario"] == new["scenario"]) {
                merged.push(new.clone());
            }
        }
        faults = merged;
    }
    let fuzz = read_fuzz(&cli.report).unwrap_or(Value::Null);
    let checks = match (&cli.test_lines, &previous) {
        (Some(p), _) => test_lines(p)?,
        (None, Some(prev)) => prev["checks"].clone(),
        (None, None) => json!({}),
    };
    let failed_connections: u64 = faults
        .iter()
        .map(|r| {
            r["connections_failed"].as_u64().unwrap_or(0)
                + r["long_lived_failed"].as_u64().unwrap_or(0)
        })
        .sum();
    let leaks: u64 = faults
        .iter()
        .map(|r| r["leaks"].as_u64().unwrap_or(0))
        .sum();
    let report = json!({
        "fuzz": fuzz,
        "checks": checks,
        "faults": faults,
        "failed_connections": failed_connections,
        "leaks": leaks,
    });
    std::fs::create_dir_all(&cli.report)?;
    std::fs::write(
        cli.report.join("reliability.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(cli.report.join("reliability.md"), table(&report))?;
    println!(
        "reliability: {failed_connections} failed connections, {leaks} leaks; {}",
        cli.report.join("reliability.md").display()
    );
    // A round that checks its own outcome lists what went wrong (its `failures`).
    let failed: Vec<String> = report["faults"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| {
            let name = r["scenario"].as_str().unwrap_or("?").to_owned();
            r["failures"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |f| format!("{name}: {}", f.as_str().unwrap_or("?")))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}
