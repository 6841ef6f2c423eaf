//! `tapestry-bench-vm`: what a VM pod costs with Tapestry, side by side with the alternatives, in
//! one run (bench/VM.md).
//!
//! 1. **CNI ADD latency**: ADD/DEL cycles in fresh network namespaces against a real `tapestryd`,
//!    interleaved: the primary alone (Debian's `ptp` + `host-local`), the chain `ptp` +
//!    `tapestry-cni` for a plain pod, and the same chain for a VM pod (tap creation and guest
//!    attach); the `tapestry-cni` exec is timed on its own within each chain.
//! 2. **The tap -> pod interface path**, host side: a guest stand-in pinned to one CPU writes
//!    pre-built UDP frames to the VM pod's tap; packets/s delivered to the pod's host-side veth
//!    with Tapestry's eBPF cross-connect, a Linux bridge (KubeVirt) and tc mirred (Kata), in the
//!    same pod namespace, interleaved rounds, medians and paired ratios.
//!
//! Outputs in bench/results/: vm.json (every run), vm.md, vm.png, and keys merged into
//! summary.json. Benchmarks only report: no threshold, no assertion.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tapestry_api::client::blocking::Client;
use tapestry_api::types::EndpointRequest;
use tapestry_bench::cni::{Chain, ChainRun, Latency, ms};
use tapestry_bench::quick;
use tapestry_bench::report::{median, merge_summary, write_atomic};
use tapestry_bench::tap::{self, GenReport, HostDrop, PodTopology, TapFd, Variant};
use tapestry_tests::Lab;
use tapestry_tests::cni::RuntimeConf;
use tapestry_tests::daemon::Daemon;

/// `proto` of the blackhole route for the test destination (the datapath bench uses 199).
const ROUTE_PROTO: &str = "197";
/// Name given to the daemon harness: its files are `<tmp>/tapestry-vmbench-<pid>-<n>`.
const DAEMON_NAME: &str = "vmbench";
/// Host-local range of each network inside the lab's pod /25 (.1 is the gateway).
const RANGES: [(&str, u8, u8); 4] = [
    ("primary-only", 10, 39),
    ("chain", 40, 69),
    ("chain-vm", 70, 99),
    ("tap", 100, 109),
];
/// The test destination: `.250` of the lab's /24 (its Service range, which nothing else uses).
const DST_SERVICE_INDEX: u8 = 122;

static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(
    about = "VM pods: CNI ADD latency and the tap <-> pod interface path, side by side",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark (the default).
    Run(Box<RunArgs>),
    /// Remove what a killed run left: the nftables table, the route, its daemon, dead labs.
    Cleanup,
    /// Redraw vm.png from vm.json (no root needed).
    Plot {
        /// The directory holding vm.json; vm.png is written there.
        #[arg(long, default_value = quick::RESULTS)]
        out: PathBuf,
        /// The quick run's vm.json (in bench/results/quick).
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Cni,
    Tap,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// ADD/DEL cycles of each CNI case.
    #[arg(long, default_value_t = 200)]
    cycles: usize,
    /// Untimed cycles of each CNI case first (after one through the spec-exact runtime).
    #[arg(long, default_value_t = 2)]
    cni_warmup: usize,
    /// Rounds of concurrent ADDs: each runs `--concurrency` ADDs at once (half plain pods, half
    /// VM pods) while a scraper reads /metrics in a loop.
    #[arg(long, default_value_t = 10)]
    concurrent_rounds: usize,
    /// ADDs started at once in each concurrent round.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Rounds of the tap path; every variant runs once per round, order rotating.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Measured seconds of each tap run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Unmeasured warm-up before each tap run, seconds.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// CPU the guest stand-in is pinned to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Ethernet frame sizes (bytes, without FCS); the first is the packets/s headline.
    #[arg(long, value_delimiter = ',', default_value = "60,1400")]
    sizes: Vec<usize>,
    /// Cross-connects: tapestry, bridge, mirred, bridge-nonf (bridge with bridge-nf-call-* off).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tapestry,bridge,mirred,bridge-nonf"
    )]
    variants: Vec<String>,
    /// Only these parts.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Where tapestryd and tapestry-cni are (default: next to this binary, else
    /// $TAPESTRY_BIN_DIR).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The reference plugins (ptp, host-local).
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_dir: PathBuf,
    /// Longest a plugin may run before the cycle fails, seconds.
    #[arg(long, default_value_t = 30.0)]
    plugin_timeout: f64,
    /// How long to wait for another benchmark holding the lock, seconds.
    #[arg(long, default_value_t = 900)]
    lock_wait: u64,
    /// Where vm.json, vm.md, vm.png and summary.json go.
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): 20 ADD/DEL cycles per CNI case, 2 concurrent rounds (still 20
/// ADDs each), one round of 1 s tap runs (every variant and size).
const QUICK: &[(&str, &str)] = &[
    ("cycles", "20"),
    ("cni_warmup", "1"),
    ("concurrent_rounds", "2"),
    ("rounds", "1"),
    ("seconds", "1"),
    ("out", quick::QUICK_RESULTS),
];

fn main() {
    let cli: Cli = quick::parse(QUICK);
    let result = match cli.cmd {
        None => run(cli.run),
        Some(Cmd::Run(args)) => run(*args),
        Some(Cmd::Cleanup) => cleanup_command(),
        Some(Cmd::Plot { out, .. }) => replot(&out),
    };
    if let Err(e) = result {
        eprintln!("tapestry-bench-vm: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Safety: root, one at a time, signals, cleanup
// ---------------------------------------------------------------------------------------------

fn require_root() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "must run as root: it creates network namespaces, veths, taps, bridges, tc filters \
             and an nftables table, and runs tapestryd (try `sudo make bench`)"
        );
    }
    tapestry_tests::require_root_and_bpffs().map_err(anyhow::Error::msg)
}

fn lock_single_run(wait: Duration) -> Result<std::fs::File> {
    tapestry_bench::lock_single_run("tapestry-bench-vm", wait, &|| STOP.load(Ordering::SeqCst))
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP set a flag checked between cycles and runs; cleanup then runs through
/// the guards' Drop.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<String> {
    tapestry_tests::cmd::run(Command::new("ip").args(args))
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in `tapestry-vmbench-<pid>-<n>` (the daemon harness's and our own file names).
fn run_pid(name: &str) -> Option<i32> {
    name.strip_prefix(&format!("tapestry-{DAEMON_NAME}-"))?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes what runs killed with SIGKILL left: their tapestryd (found by its socket path,
/// killed by pid), its pins, temporary files; our nftables table and route if no live run owns
/// them; dead labs. Returns what it did.
fn cleanup_dead() -> Vec<String> {
    let mut done = Vec::new();
    let me = std::process::id() as i32;
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !args.first().is_some_and(|a| a.ends_with("/tapestryd")) {
                continue;
            }
            let owner = args.iter().find_map(|a| {
                Path::new(a)
                    .components()
                    .find_map(|c| run_pid(&c.as_os_str().to_string_lossy()))
            });
            if let Some(owner) = owner
                && owner != me
                && !pid_alive(owner)
            {
                // SAFETY: plain syscall; a tapestryd started by a dead run of this benchmark.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                done.push(format!("killed tapestryd {pid} of dead run {owner}"));
            }
        }
    }
    for base in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(owner) = run_pid(&name)
                    && owner != me
                    && !pid_alive(owner)
                {
                    let _ = std::fs::remove_dir_all(e.path());
                    done.push(format!("removed {}", e.path().display()));
                }
            }
        }
    }
    if tap::remove_nft_table() {
        done.push(format!("deleted nftables table ip {}", tap::NFT_TABLE));
    }
    if let Ok(out) = ip(&["-4", "route", "show", "proto", ROUTE_PROTO])
        && !out.trim().is_empty()
    {
        let _ = ip(&["-4", "route", "flush", "proto", ROUTE_PROTO]);
        done.push(format!("removed routes: {}", out.trim()));
    }
    match tapestry_tests::cleanup_labs(false) {
        Ok(labs) if !labs.is_empty() => done.push(format!("removed dead labs {labs:?}")),
        Ok(_) => {}
        Err(e) => done.push(format!("sweeping labs: {e:#}")),
    }
    done
}

fn cleanup_command() -> Result<()> {
    require_root()?;
    let _lock = lock_single_run(Duration::ZERO)?;
    let done = cleanup_dead();
    if done.is_empty() {
        eprintln!("tapestry-bench-vm cleanup: nothing to remove");
    }
    for d in done {
        eprintln!("tapestry-bench-vm cleanup: {d}");
    }
    Ok(())
}

/// The test destination's blackhole route (a second safety net behind the nftables drop: no
/// test frame can leave the machine); removed on drop.
struct Blackhole(String);

impl Blackhole {
    fn add(dst: Ipv4Addr) -> Result<Blackhole> {
        let d = format!("{dst}/32");
        ip(&["route", "replace", "blackhole", &d, "proto", ROUTE_PROTO])?;
        Ok(Blackhole(d))
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = ip(&["route", "del", "blackhole", &self.0, "proto", ROUTE_PROTO]);
    }
}

/// A network namespace of the lab, deleted on drop (the lab also sweeps its prefix).
struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    fn add(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        Ok(Netns {
            path: PathBuf::from("/run/netns").join(&name),
            name,
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Our temporary directory (IPAM state, result caches), removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let has_both = |d: &Path| d.join("tapestryd").is_file() && d.join("tapestry-cni").is_file();
    let mut tried = Vec::new();
    if let Some(d) = explicit {
        tried.push(d.to_path_buf());
    } else {
        if let Ok(exe) = std::env::current_exe()
            && let Some(d) = exe.parent()
        {
            tried.push(d.to_path_buf());
        }
        if let Some(d) = std::env::var_os("TAPESTRY_BIN_DIR") {
            tried.push(PathBuf::from(d));
        }
    }
    tried
        .iter()
        .find(|d| has_both(d))
        .cloned()
        .with_context(|| {
            format!(
                "tapestryd and tapestry-cni not found in {tried:?}: build them \
                 (`cargo build --release --workspace --bins`, needs the eBPF toolchain of \
                 scripts/setup.sh) or pass --bin-dir"
            )
        })
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

struct Ctx {
    args: RunArgs,
    started: Instant,
    lab: Lab,
    daemon: Daemon,
    bin_dir: PathBuf,
    tmp: PathBuf,
    notes: Vec<String>,
}

impl Ctx {
    fn at_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn client(&self) -> Client {
        self.daemon.client()
    }

    fn plugin_dirs(&self) -> Vec<PathBuf> {
        vec![self.args.cni_dir.clone(), self.bin_dir.clone()]
    }

    /// A conflist: `ptp` + `host-local` on the lab's /25 with the named range, then optionally
    /// `tapestry-cni` (for VMs with `vm`).
    fn conflist(&self, name: &str, tapestry: Option<bool>) -> Value {
        let (net, _) = self.lab.pod_cidr();
        let o = net.octets();
        let (_, lo, hi) = RANGES
            .iter()
            .find(|(n, _, _)| *n == name)
            .copied()
            .expect("a known network");
        let a = |last: u8| Ipv4Addr::new(o[0], o[1], o[2], last).to_string();
        let mut plugins = vec![json!({
            "type": "ptp", "ipMasq": false, "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "dataDir": self.tmp.join("ipam"),
                "ranges": [[{"subnet": format!("{net}/25"), "rangeStart": a(lo),
                             "rangeEnd": a(hi), "gateway": a(1)}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        })];
        if let Some(vm) = tapestry {
            let mut t = json!({"type": "tapestry-cni", "socket": self.daemon.socket});
            if vm {
                t["vm"] = json!({"enabled": true});
            }
            plugins.push(t);
        }
        json!({"cniVersion": "1.0.0", "name": format!("vmbench-{name}"), "plugins": plugins})
    }

    fn chain(&self, name: &str, tapestry: Option<bool>) -> Result<Chain> {
        Chain::new(
            &self.conflist(name, tapestry),
            &self.plugin_dirs(),
            &self.tmp.join("cni-cache"),
            Duration::from_secs_f64(self.args.plugin_timeout),
        )
    }
}

fn run(args: RunArgs) -> Result<()> {
    require_root()?;
    if args.cycles == 0
        || args.rounds == 0
        || args.seconds <= 0.0
        || args.warmup < 0.0
        || args.sizes.is_empty()
    {
        bail!("--cycles, --rounds, --seconds and --sizes must be positive");
    }
    if let Some(s) = args.sizes.iter().find(|s| !(60..=1514).contains(*s)) {
        bail!("--sizes: {s} is not an Ethernet frame size (60..=1514)");
    }
    let variants: Vec<Variant> = args
        .variants
        .iter()
        .map(|v| Variant::parse(v))
        .collect::<Result<_>>()?;
    if !variants.contains(&Variant::Tapestry) {
        bail!("--variants must include tapestry (the ratios are Tapestry / other)");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.cpu >= cpus {
        bail!("--cpu {}: this machine has CPUs 0..{}", args.cpu, cpus - 1);
    }
    let bin_dir = find_bin_dir(args.bin_dir.as_deref())?;
    for p in ["ptp", "host-local"] {
        if !args.cni_dir.join(p).is_file() {
            bail!(
                "{} not found (apt-get install containernetworking-plugins)",
                args.cni_dir.join(p).display()
            );
        }
    }
    for tool in ["nft", "tc", "bridge"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("`{tool}` is needed (apt-get install nftables iproute2)");
        }
    }
    install_signal_handlers();
    let _lock = lock_single_run(Duration::from_secs(args.lock_wait))?;
    for d in cleanup_dead() {
        eprintln!("tapestry-bench-vm: leftover of an earlier run: {d}");
    }
    // SAFETY: single-threaded here; the daemon harness reads it to find tapestryd.
    unsafe { std::env::set_var("TAPESTRY_BIN_DIR", &bin_dir) };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let started = Instant::now();
    let tmp =
        std::env::temp_dir().join(format!("tapestry-{DAEMON_NAME}-{}-run", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let _tmp_guard = TempDir(tmp.clone());
    let lab = Lab::new("vm-bench")?;
    let daemon = Daemon::start(DAEMON_NAME, "services: []\n", &[]).context("starting tapestryd")?;
    let mut ctx = Ctx {
        args: args.clone(),
        started,
        lab,
        daemon,
        bin_dir,
        tmp,
        notes: Vec::new(),
    };
    eprintln!(
        "tapestry-bench-vm: lab {}, tapestryd from {}, guest stand-in on CPU {}",
        ctx.lab.prefix(),
        ctx.bin_dir.display(),
        args.cpu
    );
    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);

    let cni = if want(Part::Cni) {
        Some(cni_part(&mut ctx)?)
    } else {
        None
    };
    check_stop()?;
    let tap_report = if want(Part::Tap) {
        Some(tap_part(&mut ctx, &variants)?)
    } else {
        None
    };
    let _ = std::fs::write(ctx.args.out.join("tapestryd-vm.log"), ctx.daemon.log());
    write_results(&ctx, cni.as_ref(), tap_report.as_ref())?;
    eprintln!(
        "tapestry-bench-vm: done in {:.0} s; results in {}",
        ctx.at_s(),
        ctx.args.out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Part 1: CNI ADD latency
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum CniCase {
    PrimaryOnly,
    Chain,
    ChainVm,
}

impl CniCase {
    const ALL: [CniCase; 3] = [CniCase::PrimaryOnly, CniCase::Chain, CniCase::ChainVm];

    fn name(self) -> &'static str {
        match self {
            CniCase::PrimaryOnly => "primary-only",
            CniCase::Chain => "chain",
            CniCase::ChainVm => "chain-vm",
        }
    }

    fn short(self) -> &'static str {
        match self {
            CniCase::PrimaryOnly => "p",
            CniCase::Chain => "c",
            CniCase::ChainVm => "v",
        }
    }

    fn tapestry(self) -> Option<bool> {
        match self {
            CniCase::PrimaryOnly => None,
            CniCase::Chain => Some(false),
            CniCase::ChainVm => Some(true),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CniCycle {
    cycle: usize,
    case: CniCase,
    at_s: f64,
    add: ChainRun,
    del: ChainRun,
}

/// One pod through the spec-exact runtime, before timing: proves the chain works as a runtime
/// drives it. Its per-plugin times (polled every 2 ms by that runtime) are kept for reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reference {
    case: CniCase,
    add_steps_ms: Vec<(String, f64)>,
    interfaces: Vec<String>,
    endpoints_registered: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CniStats {
    label: String,
    add_total: Latency,
    add_steps: BTreeMap<String, Latency>,
    del_total: Latency,
    del_steps: BTreeMap<String, Latency>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CniReport {
    /// ADDs run `concurrency` at once with a /metrics scraper running.
    #[serde(default)]
    concurrent: Option<ConcurrentReport>,
    cycles: usize,
    warmup_cycles: usize,
    plugin_dirs: Vec<PathBuf>,
    reference: Vec<Reference>,
    stats: BTreeMap<String, CniStats>,
    runs: Vec<CniCycle>,
    elapsed_s: f64,
}

fn runtime_conf(container: &str, netns: &Path, pod: &str) -> RuntimeConf {
    RuntimeConf::new(container, netns, "eth0")
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAMESPACE", "vmbench")
        .arg("K8S_POD_NAME", pod)
}

fn interfaces_of(result: &Value) -> Vec<String> {
    result["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn cni_part(ctx: &mut Ctx) -> Result<CniReport> {
    let t0 = Instant::now();
    let chains: Vec<(CniCase, Chain)> = CniCase::ALL
        .iter()
        .map(|c| Ok((*c, ctx.chain(c.name(), c.tapestry())?)))
        .collect::<Result<_>>()?;
    let prefix = ctx.lab.prefix().to_owned();
    let client = ctx.client();

    // The reference: one pod per case through the spec-exact runtime.
    let mut reference = Vec::new();
    for (case, chain) in &chains {
        let ns = Netns::add(format!("{prefix}-r{}", case.short()))?;
        let rt = chain.runtime();
        let conf = runtime_conf(&format!("vmbench-ref-{}", case.name()), &ns.path, "ref");
        rt.clear_history();
        let result = rt
            .add(&chain.list, &conf)
            .map_err(|e| anyhow::anyhow!("{} ADD through the CNI runtime: {e}", case.name()))?;
        let endpoints = client.endpoints().map(|e| e.len()).unwrap_or(0);
        let interfaces = interfaces_of(&result);
        let want_tap = *case == CniCase::ChainVm;
        if want_tap != interfaces.iter().any(|i| i == "tap0") {
            bail!("{} ADD: unexpected interfaces {interfaces:?}", case.name());
        }
        if endpoints != usize::from(case.tapestry().is_some()) {
            bail!(
                "{} ADD: tapestryd lists {endpoints} endpoints, expected {}",
                case.name(),
                usize::from(case.tapestry().is_some())
            );
        }
        let add_steps_ms = rt
            .history()
            .iter()
            .map(|i| (i.plugin.clone(), ms(i.duration)))
            .collect();
        rt.del(&chain.list, &conf)
            .map_err(|e| anyhow::anyhow!("{} DEL through the CNI runtime: {e}", case.name()))?;
        let left = client.endpoints().map(|e| e.len()).unwrap_or(0);
        if left != 0 {
            bail!("{} DEL left {left} endpoints in tapestryd", case.name());
        }
        reference.push(Reference {
            case: *case,
            add_steps_ms,
            interfaces,
            endpoints_registered: endpoints,
        });
    }

    let total = ctx.args.cni_warmup + ctx.args.cycles;
    eprintln!(
        "tapestry-bench-vm: CNI: {} ADD/DEL cycles of {} cases (+{} warm-up), interleaved",
        ctx.args.cycles,
        chains.len(),
        ctx.args.cni_warmup
    );
    let mut runs = Vec::new();
    for i in 0..total {
        check_stop()?;
        let mut order: Vec<usize> = (0..chains.len()).collect();
        order.rotate_left(i % chains.len());
        for k in order {
            let (case, chain) = &chains[k];
            let ns = Netns::add(format!("{prefix}-{}{i}", case.short()))?;
            let conf = runtime_conf(&format!("vmbench-{}-{i}", case.name()), &ns.path, "pod");
            let at_s = ctx.at_s();
            let (result, add) = chain
                .add(&conf)
                .with_context(|| format!("{} ADD, cycle {i}", case.name()))?;
            let del = chain
                .del(&conf, Some(&result))
                .with_context(|| format!("{} DEL, cycle {i}", case.name()))?;
            drop(ns);
            if i >= ctx.args.cni_warmup {
                runs.push(CniCycle {
                    cycle: i - ctx.args.cni_warmup,
                    case: *case,
                    at_s,
                    add,
                    del,
                });
            }
        }
        let done = i + 1;
        if done % 50 == 0 || done == total {
            eprintln!(
                "  CNI: {done}/{total} cycles, {:.0} s",
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let left = client.endpoints().map(|e| e.len()).unwrap_or(0);
    if left != 0 {
        ctx.notes.push(format!(
            "CNI: tapestryd still lists {left} endpoints after every DEL"
        ));
    }

    let mut stats = BTreeMap::new();
    for (case, chain) in &chains {
        let sel: Vec<&CniCycle> = runs.iter().filter(|r| r.case == *case).collect();
        let per_step = |f: &dyn Fn(&CniCycle) -> &ChainRun| {
            let mut m = BTreeMap::new();
            for ty in chain.plugin_types() {
                let v: Vec<f64> = sel.iter().filter_map(|r| f(r).step_ms(ty)).collect();
                m.insert(ty.to_owned(), Latency::of(&v));
            }
            m
        };
        stats.insert(
            case.name().to_owned(),
            CniStats {
                label: chain.plugin_types().join(" + "),
                add_total: Latency::of(&sel.iter().map(|r| r.add.total_ms).collect::<Vec<_>>()),
                add_steps: per_step(&|r| &r.add),
                del_total: Latency::of(&sel.iter().map(|r| r.del.total_ms).collect::<Vec<_>>()),
                del_steps: per_step(&|r| &r.del),
            },
        );
    }
    let concurrent = if ctx.args.concurrent_rounds > 0 {
        let mut c = concurrent_adds(ctx, &chains)?;
        let sequential: Vec<f64> = runs
            .iter()
            .filter(|r| r.case.tapestry().is_some())
            .filter_map(|r| r.add.step_ms("tapestry-cni"))
            .collect();
        c.sequential_tapestry_step = Latency::of(&sequential);
        Some(c)
    } else {
        None
    };
    Ok(CniReport {
        concurrent,
        cycles: ctx.args.cycles,
        warmup_cycles: ctx.args.cni_warmup,
        plugin_dirs: ctx.plugin_dirs(),
        reference,
        stats,
        runs,
        elapsed_s: t0.elapsed().as_secs_f64(),
    })
}

/// ADDs started together, as a runtime does when a node starts many pods at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConcurrentReport {
    rounds: usize,
    concurrency: usize,
    /// /metrics scrapes answered while the rounds ran.
    scrapes: usize,
    /// The tapestry-cni step of every concurrent ADD, plain pods and VM pods together.
    tapestry_step: Latency,
    /// The same step of the sequential cycles, plain pods and VM pods together.
    sequential_tapestry_step: Latency,
}

/// `--concurrent-rounds` rounds of `--concurrency` ADDs at once (alternately plain pods and VM
/// pods), a scraper reading /metrics (a full walk of the maps) ten times a second all the while;
/// then DEL of all. On a machine with fewer CPUs than ADDs the plugins queue for CPU: the ratio
/// to the sequential p99 then measures the CPUs as much as the daemon.
fn concurrent_adds(ctx: &mut Ctx, chains: &[(CniCase, Chain)]) -> Result<ConcurrentReport> {
    let prefix = ctx.lab.prefix().to_owned();
    let pod_chains: Vec<&Chain> = chains
        .iter()
        .filter(|(c, _)| c.tapestry().is_some())
        .map(|(_, ch)| ch)
        .collect();
    let n = ctx.args.concurrency;
    eprintln!(
        "tapestry-bench-vm: CNI: {} rounds of {n} concurrent ADDs with a /metrics scraper",
        ctx.args.concurrent_rounds
    );
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let scraper = {
        let (stop, scrapes, client) = (stop.clone(), scrapes.clone(), ctx.client());
        std::thread::spawn(move || {
            // Ten scrapes a second: far more than Prometheus makes, without spending a CPU of
            // this 2-CPU machine on the scraper itself.
            while !stop.load(Ordering::Relaxed) {
                if client.metrics().is_ok() {
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut steps = Vec::new();
    let result = (|| -> Result<()> {
        for round in 0..ctx.args.concurrent_rounds {
            check_stop()?;
            let pods: Vec<(Netns, RuntimeConf, &Chain)> = (0..n)
                .map(|i| {
                    let ns = Netns::add(format!("{prefix}-k{round}x{i}"))?;
                    let conf = runtime_conf(&format!("vmbench-k{round}x{i}"), &ns.path, "pod");
                    Ok((ns, conf, pod_chains[i % pod_chains.len()]))
                })
                .collect::<Result<_>>()?;
            let barrier = std::sync::Barrier::new(n);
            let added: Vec<Result<(Value, ChainRun)>> = std::thread::scope(|sc| {
                let handles: Vec<_> = pods
                    .iter()
                    .map(|(_, conf, chain)| {
                        let barrier = &barrier;
                        sc.spawn(move || {
                            barrier.wait();
                            chain.add(conf)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for ((_, conf, chain), r) in pods.iter().zip(added) {
                let (result, run) = r.with_context(|| format!("concurrent ADD, round {round}"))?;
                steps.extend(run.step_ms("tapestry-cni"));
                chain
                    .del(conf, Some(&result))
                    .with_context(|| format!("DEL after concurrent ADD, round {round}"))?;
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    result?;
    Ok(ConcurrentReport {
        rounds: ctx.args.concurrent_rounds,
        concurrency: n,
        scrapes: scrapes.load(Ordering::Relaxed),
        tapestry_step: Latency::of(&steps),
        sequential_tapestry_step: Latency::default(),
    })
}

// ---------------------------------------------------------------------------------------------
// Part 2: the tap <-> pod interface path
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TapRun {
    round: usize,
    variant: Variant,
    frame_bytes: usize,
    at_s: f64,
    #[serde(flatten)]
    report: GenReport,
    pps: f64,
    gbps: f64,
    /// Delivered per second of the generator's own CPU time (see `GenReport::pps_on_cpu`).
    pps_on_cpu: Option<f64>,
    /// Packets the host's drop rule counted over the whole run (warm-up included).
    host_dropped: Option<u64>,
    /// Tapestry only: the guest's counters after the run (frames it sent that passed the
    /// anti-spoofing checks, and drops by reason: empty means nothing was dropped).
    guest_rx_packets: Option<u64>,
    guest_drops: Option<BTreeMap<String, u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TapMedian {
    variant: Variant,
    label: String,
    frame_bytes: usize,
    runs: usize,
    pps: Option<f64>,
    gbps: Option<f64>,
    /// Median over rounds of Tapestry / this variant, paired within a round.
    tapestry_ratio: Option<f64>,
    /// The same two with packets per second of the generator's CPU time.
    pps_on_cpu: Option<f64>,
    tapestry_ratio_on_cpu: Option<f64>,
    /// Median share of the measured interval the generator had its CPU.
    on_cpu_share: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TapReport {
    topology: PodTopology,
    destination: Ipv4Addr,
    bridge_nf_defaults: Vec<(String, Option<String>)>,
    variants: Vec<Variant>,
    sizes: Vec<usize>,
    rounds: usize,
    seconds: f64,
    warmup_s: f64,
    cpu: usize,
    runs: Vec<TapRun>,
    medians: Vec<TapMedian>,
    /// `POST /v1/endpoints` of the VM pod as the Tapestry variant is set up each round: the
    /// daemon's share of the VM pod's CNI step (guest programs loaded, verified, attached).
    register_vm_pod_ms: Latency,
    elapsed_s: f64,
}

/// The tap pod's cross-connect, switched between variants. The neutral state: the endpoint
/// not registered with tapestryd (no guest programs), the host veth still carrying the
/// Service datapath (`POST /v1/attachments`, as every pod's veth on a Tapestry node does), no
/// bridge, no tc filter.
struct Switch<'a> {
    client: Client,
    request: &'a EndpointRequest,
    topo: &'a PodTopology,
    nf_defaults: &'a [(String, Option<String>)],
}

impl Switch<'_> {
    /// Sets `v` up from the neutral state; for Tapestry returns how long the daemon took to
    /// register the VM pod (`POST /v1/endpoints`: guest programs loaded and attached).
    fn up(&self, v: Variant) -> Result<Option<f64>> {
        if v == Variant::Tapestry {
            let t0 = Instant::now();
            self.client
                .add_endpoint(self.request)
                .context("registering the VM pod")?;
            let register_ms = ms(t0.elapsed());
            let guests = self.client.guests()?;
            if !guests.iter().any(|g| g.tap == self.topo.tap) {
                bail!("tapestryd lists no guest on {} after ADD", self.topo.tap);
            }
            return Ok(Some(register_ms));
        }
        // Tapestry's guest programs must be gone, or they would take the frames first.
        let guests = self.client.guests()?;
        if !guests.is_empty() {
            bail!("tapestryd still lists {} guest(s)", guests.len());
        }
        match v {
            Variant::Bridge => tap::bridge_up(self.topo, true)?,
            Variant::BridgeNoNf => tap::bridge_up(self.topo, false)?,
            Variant::Mirred => tap::mirred_up(self.topo)?,
            Variant::Tapestry => unreachable!("handled above"),
        }
        Ok(None)
    }

    fn down(&self, v: Variant) -> Result<()> {
        match v {
            Variant::Tapestry => {
                self.client
                    .delete_endpoint(&self.request.container_id, &self.request.ifname)
                    .context("unregistering the VM pod")?;
                self.client
                    .attach(&self.topo.host_ifname)
                    .context("re-attaching the host veth")?;
                Ok(())
            }
            Variant::Bridge | Variant::BridgeNoNf => tap::bridge_down(self.topo, self.nf_defaults),
            Variant::Mirred => tap::mirred_down(self.topo),
        }
    }
}

fn disable_ipv6(netns: &Path) -> Result<()> {
    tapestry_netns::run_in(netns, || -> Result<()> {
        for k in ["all", "default"] {
            let p = format!("/proc/sys/net/ipv6/conf/{k}/disable_ipv6");
            if Path::new(&p).exists() {
                std::fs::write(&p, "1").with_context(|| format!("writing {p}"))?;
            }
        }
        Ok(())
    })?
}

fn tap_part(ctx: &mut Ctx, variants: &[Variant]) -> Result<TapReport> {
    let t0 = Instant::now();
    let args = ctx.args.clone();
    // The VM pod, made by the product's own chain through the spec-exact runtime.
    let chain = ctx.chain("tap", Some(true))?;
    let ns = Netns::add(format!("{}-tapbench", ctx.lab.prefix()))?;
    let conf = runtime_conf("vmbench-tap", &ns.path, "vm-bench");
    let rt = chain.runtime();
    rt.add(&chain.list, &conf)
        .map_err(|e| anyhow::anyhow!("ADD of the VM pod: {e}"))?;
    let result = tap_part_inner(ctx, variants, &args, &ns).map(|mut r| {
        r.elapsed_s = t0.elapsed().as_secs_f64();
        r
    });
    // DEL through the runtime (with the pod registered again: the product's own teardown).
    if let Err(e) = rt.del(&chain.list, &conf) {
        ctx.notes.push(format!("DEL of the VM pod: {e}"));
    }
    result
}

fn tap_part_inner(
    ctx: &mut Ctx,
    variants: &[Variant],
    args: &RunArgs,
    ns: &Netns,
) -> Result<TapReport> {
    let client = ctx.client();
    let info = client
        .endpoint("vmbench-tap", "eth0")
        .context("the VM pod's endpoint")?;
    let request = info.request.clone();
    let vm = request.vm.clone().context("the endpoint is not a VM pod")?;
    let guest_ip: Ipv4Addr = vm
        .guest_ip
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .context("guest IP")?;
    let host_mac = tap::parse_mac(
        &std::fs::read_to_string(format!("/sys/class/net/{}/address", request.host_ifname))
            .context("the host veth's MAC")?,
    )?;
    let topo = PodTopology {
        netns: ns.name.clone(),
        netns_path: ns.path.clone(),
        ifname: request.ifname.clone(),
        tap: vm.tap.clone(),
        ifname_mac: request
            .mac
            .context("the daemon reported no MAC for the pod interface")?
            .octets(),
        host_ifname: request.host_ifname.clone(),
        host_mac,
        guest_mac: vm.guest_mac.octets(),
        guest_ip,
    };
    disable_ipv6(&ns.path)?;
    let nf_defaults = tap::bridge_nf(&topo)?;
    let dst = ctx.lab.service_ip(DST_SERVICE_INDEX);
    let _route = Blackhole::add(dst)?;
    let mut drop_rule = HostDrop::install(&topo.host_ifname, dst)?;
    let guest = TapFd::open(&ns.path, &topo.tap)?;
    let frames: Vec<(usize, Vec<u8>)> = args
        .sizes
        .iter()
        .map(|&n| {
            Ok((
                n,
                tap::udp_frame(
                    topo.guest_mac,
                    topo.host_mac,
                    topo.guest_ip,
                    dst,
                    (40000, 9),
                    n,
                )?,
            ))
        })
        .collect::<Result<_>>()?;
    let rx_counter = tap::counter_path(&topo.host_ifname, "rx_packets");
    let sw = Switch {
        client: client.clone(),
        request: &request,
        topo: &topo,
        nf_defaults: &nf_defaults,
    };
    // From the CNI's state (registered) to neutral.
    sw.down(Variant::Tapestry)?;
    eprintln!(
        "tapestry-bench-vm: tap path: {} rounds x {} variants x {:?} bytes, {} s per run, \
         guest {} ({}) -> {dst} via {} / {}",
        args.rounds,
        variants.len(),
        args.sizes,
        args.seconds,
        topo.guest_ip,
        tap::fmt_mac(&topo.guest_mac),
        topo.tap,
        topo.host_ifname,
    );
    let mut runs = Vec::new();
    let mut registrations_ms = Vec::new();
    let outcome = (|| -> Result<()> {
        for round in 0..args.rounds {
            let mut order = variants.to_vec();
            order.rotate_left(round % variants.len());
            for v in order {
                check_stop()?;
                let register_ms = sw
                    .up(v)
                    .with_context(|| format!("setting up {}", v.name()))?;
                if let Some(m) = register_ms {
                    registrations_ms.push(m);
                }
                let r =
                    measure_variant(ctx, &sw, &guest, &drop_rule, &frames, &rx_counter, round, v);
                let down = sw.down(v).with_context(|| format!("removing {}", v.name()));
                match r {
                    Ok(mut rs) => runs.append(&mut rs),
                    Err(e) => ctx
                        .notes
                        .push(format!("round {}: {}: {e:#}", round + 1, v.name())),
                }
                down?;
            }
        }
        Ok(())
    })();
    // Back to the CNI's state, so the pod's DEL is the product's own teardown.
    let restore = sw.up(Variant::Tapestry);
    drop(guest);
    drop_rule.remove();
    outcome?;
    restore?;
    for r in &runs {
        if r.report.delivered + r.report.delivered / 100 < r.report.sent {
            ctx.notes.push(format!(
                "round {} {} {} B: only {} of {} written frames reached the host veth",
                r.round + 1,
                r.variant.name(),
                r.frame_bytes,
                r.report.delivered,
                r.report.sent
            ));
        }
    }

    let mut medians = Vec::new();
    for &size in &args.sizes {
        for &v in variants {
            let of = |w: Variant| -> Vec<&TapRun> {
                runs.iter()
                    .filter(|r| r.variant == w && r.frame_bytes == size && r.report.delivered > 0)
                    .collect()
            };
            let sel = of(v);
            // Median over rounds of Tapestry / v, each ratio within one round.
            let paired = |f: &dyn Fn(&TapRun) -> Option<f64>| -> Option<f64> {
                let by_round = |w: Variant| -> BTreeMap<usize, f64> {
                    of(w)
                        .into_iter()
                        .filter_map(|r| f(r).map(|x| (r.round, x)))
                        .collect()
                };
                let (ours, theirs) = (by_round(Variant::Tapestry), by_round(v));
                let ratios: Vec<f64> = ours
                    .iter()
                    .filter_map(|(round, a)| theirs.get(round).map(|b| a / b))
                    .collect();
                median(&ratios)
            };
            let pps = median(&sel.iter().map(|r| r.pps).collect::<Vec<_>>());
            medians.push(TapMedian {
                variant: v,
                label: v.label().to_owned(),
                frame_bytes: size,
                runs: sel.len(),
                pps,
                gbps: pps.map(|p| p * size as f64 * 8.0 / 1e9),
                tapestry_ratio: paired(&|r| Some(r.pps)),
                pps_on_cpu: median(&sel.iter().filter_map(|r| r.pps_on_cpu).collect::<Vec<_>>()),
                tapestry_ratio_on_cpu: paired(&|r| r.pps_on_cpu),
                on_cpu_share: median(
                    &sel.iter()
                        .filter_map(|r| r.report.on_cpu_s.map(|c| c / r.report.elapsed_s))
                        .collect::<Vec<_>>(),
                ),
            });
        }
    }
    Ok(TapReport {
        topology: topo.clone(),
        destination: dst,
        bridge_nf_defaults: nf_defaults.clone(),
        variants: variants.to_vec(),
        sizes: args.sizes.clone(),
        rounds: args.rounds,
        seconds: args.seconds,
        warmup_s: args.warmup,
        cpu: args.cpu,
        runs,
        medians,
        register_vm_pod_ms: Latency::of(&registrations_ms),
        elapsed_s: 0.0,
    })
}

#[allow(clippy::too_many_arguments)]
fn measure_variant(
    ctx: &Ctx,
    sw: &Switch<'_>,
    guest: &TapFd,
    drop_rule: &HostDrop,
    frames: &[(usize, Vec<u8>)],
    rx_counter: &Path,
    round: usize,
    v: Variant,
) -> Result<Vec<TapRun>> {
    let args = &ctx.args;
    // Probe: the path delivers at all (and only then is a figure worth taking).
    let before = drop_rule.dropped()?;
    guest.send_n(&frames[0].1, 256)?;
    let after = drop_rule.dropped()?;
    if after.saturating_sub(before) < 256 {
        bail!(
            "probe: {} of 256 frames reached the host's drop rule",
            after.saturating_sub(before)
        );
    }
    let mut out = Vec::new();
    for (size, frame) in frames {
        check_stop()?;
        let at_s = ctx.at_s();
        let d0 = drop_rule.dropped().ok();
        let report = tap::generate(
            guest,
            frame,
            Some(args.cpu),
            Duration::from_secs_f64(args.warmup),
            Duration::from_secs_f64(args.seconds),
            rx_counter,
        )?;
        let d1 = drop_rule.dropped().ok();
        let (guest_rx_packets, guest_drops) = if v == Variant::Tapestry {
            let g = sw
                .client
                .guests()?
                .into_iter()
                .find(|g| g.tap == sw.topo.tap);
            (g.as_ref().map(|g| g.rx_packets), g.map(|g| g.drops))
        } else {
            (None, None)
        };
        let pps = report.pps();
        eprintln!(
            "  [{}] {:<12} {:>5} B: {:>9.0} pps {:>6.2} Gbit/s, on CPU {:>3.0}% \
             ({:.0} pps per CPU-s) (sent {}, delivered {}{})",
            round + 1,
            v.name(),
            size,
            pps,
            pps * *size as f64 * 8.0 / 1e9,
            report.on_cpu_s.unwrap_or(0.0) / report.elapsed_s.max(1e-9) * 100.0,
            report.pps_on_cpu().unwrap_or(0.0),
            report.sent,
            report.delivered,
            if report.write_errors > 0 {
                format!(", {} write errors", report.write_errors)
            } else {
                String::new()
            }
        );
        out.push(TapRun {
            round,
            variant: v,
            frame_bytes: *size,
            at_s,
            pps,
            gbps: pps * *size as f64 * 8.0 / 1e9,
            pps_on_cpu: report.pps_on_cpu(),
            report,
            host_dropped: d0.zip(d1).map(|(a, b)| b.saturating_sub(a)),
            guest_rx_packets,
            guest_drops,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

fn opt(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |x| json!((x * 1000.0).round() / 1000.0))
}

fn summary_keys(cni: Option<&CniReport>, tapr: Option<&TapReport>) -> Map<String, Value> {
    let mut m = Map::new();
    let cni_stat = |case: &str, f: &dyn Fn(&CniStats) -> Option<f64>| -> Value {
        opt(cni.and_then(|c| c.stats.get(case)).and_then(f))
    };
    let step = |s: &CniStats, p50: bool| {
        s.add_steps
            .get("tapestry-cni")
            .and_then(|l| if p50 { l.p50_ms } else { l.p99_ms })
    };
    for (key, case) in [
        ("primary_only", "primary-only"),
        ("chain", "chain"),
        ("chain_vm", "chain-vm"),
    ] {
        m.insert(
            format!("cni_add_p50_ms_{key}"),
            cni_stat(case, &|s| s.add_total.p50_ms),
        );
        m.insert(
            format!("cni_add_p99_ms_{key}"),
            cni_stat(case, &|s| s.add_total.p99_ms),
        );
    }
    for (key, case) in [("tapestry_step", "chain"), ("tapestry_step_vm", "chain-vm")] {
        m.insert(
            format!("cni_add_p50_ms_{key}"),
            cni_stat(case, &|s| step(s, true)),
        );
        m.insert(
            format!("cni_add_p99_ms_{key}"),
            cni_stat(case, &|s| step(s, false)),
        );
    }
    m.insert(
        "cni_add_cycles".into(),
        cni.map_or(Value::Null, |c| json!(c.cycles)),
    );
    let concurrent = cni.and_then(|c| c.concurrent.as_ref());
    m.insert(
        "cni_add_p99_ms_concurrent20".into(),
        opt(concurrent.and_then(|c| c.tapestry_step.p99_ms)),
    );
    m.insert(
        "cni_add_p99_ms_sequential_mixed".into(),
        opt(concurrent.and_then(|c| c.sequential_tapestry_step.p99_ms)),
    );
    m.insert(
        "cni_add_concurrent20_ratio_sequential".into(),
        opt(concurrent
            .and_then(|c| Some(c.tapestry_step.p99_ms? / c.sequential_tapestry_step.p99_ms?))),
    );

    let med = |v: Variant, size: usize| {
        tapr.and_then(|t| {
            t.medians
                .iter()
                .find(|x| x.variant == v && x.frame_bytes == size)
        })
    };
    let key_name = |v: Variant| v.name().replace('-', "_");
    let sizes: Vec<usize> = tapr
        .map(|t| t.sizes.clone())
        .unwrap_or_else(|| vec![60, 1400]);
    let variants = [
        Variant::Tapestry,
        Variant::Bridge,
        Variant::Mirred,
        Variant::BridgeNoNf,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let suffixes: Vec<String> = if i == 0 {
            vec![String::new(), format!("_{size}")]
        } else {
            vec![format!("_{size}")]
        };
        for sfx in &suffixes {
            for v in variants {
                let md = med(v, size);
                m.insert(
                    format!("tap_pps_{}{sfx}", key_name(v)),
                    opt(md.and_then(|x| x.pps).map(f64::round)),
                );
                m.insert(
                    format!("tap_gbps_{}{sfx}", key_name(v)),
                    opt(md.and_then(|x| x.gbps)),
                );
                m.insert(
                    format!("tap_pps_per_cpu_s_{}{sfx}", key_name(v)),
                    opt(md.and_then(|x| x.pps_on_cpu).map(f64::round)),
                );
                if v != Variant::Tapestry {
                    m.insert(
                        format!("tap_pps_ratio_{}{sfx}", key_name(v)),
                        opt(md.and_then(|x| x.tapestry_ratio)),
                    );
                    m.insert(
                        format!("tap_pps_cpu_ratio_{}{sfx}", key_name(v)),
                        opt(md.and_then(|x| x.tapestry_ratio_on_cpu)),
                    );
                }
            }
        }
    }
    m.insert(
        "vm_register_p50_ms_daemon".into(),
        opt(tapr.and_then(|t| t.register_vm_pod_ms.p50_ms)),
    );
    m.insert(
        "tap_frame_bytes".into(),
        tapr.map_or(Value::Null, |t| json!(t.sizes)),
    );
    m
}

fn f2(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.2}"))
}

fn kpps(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{:.0}k", x / 1000.0))
}

fn markdown(ctx: &Ctx, cni: Option<&CniReport>, tapr: Option<&TapReport>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# VM pods: CNI ADD latency and the tap path\n\n`tapestry-bench-vm`, {}; kernel {}, {} \
         CPUs, load average {} at the end. See bench/VM.md for how and what the figures mean.\n",
        utc_now(),
        kernel(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(c) = cni {
        let _ = writeln!(
            s,
            "## CNI ADD latency ({} ADD/DEL cycles per case, fresh netns each, real tapestryd)\n",
            c.cycles
        );
        let _ = writeln!(s, "| what is timed | p50 ms | p90 ms | p99 ms | max ms |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        let mut row = |label: &str, l: Option<&Latency>| {
            if let Some(l) = l {
                let _ = writeln!(
                    s,
                    "| {label} | {} | {} | {} | {} |",
                    f2(l.p50_ms),
                    f2(l.p90_ms),
                    f2(l.p99_ms),
                    f2(l.max_ms)
                );
            }
        };
        let st = |k: &str| c.stats.get(k);
        row(
            "(a) primary alone: ptp + host-local",
            st("primary-only").map(|x| &x.add_total),
        );
        row(
            "(b) chain, plain pod: ptp + tapestry-cni",
            st("chain").map(|x| &x.add_total),
        );
        row(
            "(c) tapestry-cni step alone, plain pod",
            st("chain").and_then(|x| x.add_steps.get("tapestry-cni")),
        );
        row(
            "chain, VM pod: ptp + tapestry-cni (tap)",
            st("chain-vm").map(|x| &x.add_total),
        );
        row(
            "(d) tapestry-cni step alone, VM pod (tap + guest attach)",
            st("chain-vm").and_then(|x| x.add_steps.get("tapestry-cni")),
        );
        row(
            "ptp step within the VM chain",
            st("chain-vm").and_then(|x| x.add_steps.get("ptp")),
        );
        row(
            "DEL, tapestry-cni step, VM pod",
            st("chain-vm").and_then(|x| x.del_steps.get("tapestry-cni")),
        );
        if let Some(k) = &c.concurrent {
            row(
                "tapestry-cni step, plain and VM pods, one at a time",
                Some(&k.sequential_tapestry_step),
            );
            row(
                &format!(
                    "(e) tapestry-cni step, {} ADDs at once ({} rounds, {} /metrics scrapes meanwhile)",
                    k.concurrency, k.rounds, k.scrapes
                ),
                Some(&k.tapestry_step),
            );
        }
        let _ = writeln!(s);
    }
    if let Some(t) = tapr {
        let _ = writeln!(
            s,
            "## Tap -> pod interface, host side ({} rounds x {} s, guest stand-in pinned to CPU {}, medians)\n",
            t.rounds, t.seconds, t.cpu
        );
        let mut header = String::from("| cross-connect |");
        let mut rule = String::from("|---|");
        for size in &t.sizes {
            let _ = write!(
                header,
                " {size} B pps | {size} B Gbit/s | Tapestry / this ({size} B) |"
            );
            rule.push_str("---:|---:|---:|");
        }
        let _ = writeln!(s, "{header}\n{rule}");
        for v in &t.variants {
            let mut line = format!("| {} |", v.label());
            for size in &t.sizes {
                let m = t
                    .medians
                    .iter()
                    .find(|m| m.variant == *v && m.frame_bytes == *size);
                let _ = write!(
                    line,
                    " {} | {} | {} |",
                    kpps(m.and_then(|m| m.pps)),
                    f2(m.and_then(|m| m.gbps)),
                    if *v == Variant::Tapestry {
                        "1.00".into()
                    } else {
                        f2(m.and_then(|m| m.tapestry_ratio))
                    }
                );
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(
            s,
            "\nThe same runs per second of the generator's own CPU time (tap write, cross-connect, \
             veth and the host side up to the drop, all charged to it), which takes out the \
             share of the CPU other tasks on the shared machine took:\n"
        );
        let mut header = String::from("| cross-connect |");
        let mut rule = String::from("|---|");
        for size in &t.sizes {
            let _ = write!(
                header,
                " {size} B pps per CPU-s | Tapestry / this | on CPU |"
            );
            rule.push_str("---:|---:|---:|");
        }
        let _ = writeln!(s, "{header}\n{rule}");
        for v in &t.variants {
            let mut line = format!("| {} |", v.label());
            for size in &t.sizes {
                let m = t
                    .medians
                    .iter()
                    .find(|m| m.variant == *v && m.frame_bytes == *size);
                let _ = write!(
                    line,
                    " {} | {} | {} |",
                    kpps(m.and_then(|m| m.pps_on_cpu)),
                    if *v == Variant::Tapestry {
                        "1.00".into()
                    } else {
                        f2(m.and_then(|m| m.tapestry_ratio_on_cpu))
                    },
                    m.and_then(|m| m.on_cpu_share)
                        .map_or_else(|| "-".into(), |x| format!("{:.0}%", x * 100.0))
                );
            }
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(
            s,
            "\nDelivered = the host-side veth's rx_packets delta; ratios are medians of per-round \
             ratios. Pod netns bridge-nf-call-* defaults: {}. tapestryd's own share of a VM \
             pod's ADD (`POST /v1/endpoints`: guest programs loaded, verified, attached), \
             timed as the Tapestry variant is set up each round: p50 {} ms, max {} ms. \
             ksoftirqd/{} ran {} of the measured time at most (softirq work not charged to \
             the generator).",
            t.bridge_nf_defaults
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("absent")))
                .collect::<Vec<_>>()
                .join(", "),
            f2(t.register_vm_pod_ms.p50_ms),
            f2(t.register_vm_pod_ms.max_ms),
            t.cpu,
            t.runs
                .iter()
                .filter_map(|r| r.report.ksoftirqd_s.map(|k| k / r.report.elapsed_s))
                .reduce(f64::max)
                .map_or_else(|| "?".into(), |x| format!("{:.1}%", x * 100.0))
        );
    }
    if !ctx.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in &ctx.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Three panels: CNI ADD p50/p99; packets/s at the first size; Gbit/s at the last size.
fn plot(cni: Option<&CniReport>, tapr: Option<&TapReport>, date: &str, png: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "tapestry-{DAEMON_NAME}-{}-plot",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let _guard = TempDir(dir.clone());
    let mut panels = Vec::new();
    if let Some(c) = cni {
        let mut data = String::new();
        let st = |k: &str| c.stats.get(k);
        for (label, l) in [
            ("(a) ptp\\nalone", st("primary-only").map(|x| &x.add_total)),
            ("(b) ptp +\\ntapestry", st("chain").map(|x| &x.add_total)),
            (
                "(c) tapestry\\nstep",
                st("chain").and_then(|x| x.add_steps.get("tapestry-cni")),
            ),
            (
                "VM pod:\\nptp +\\ntapestry",
                st("chain-vm").map(|x| &x.add_total),
            ),
            (
                "(d) VM pod:\\ntapestry\\nstep",
                st("chain-vm").and_then(|x| x.add_steps.get("tapestry-cni")),
            ),
        ] {
            if let Some(l) = l {
                let _ = writeln!(
                    data,
                    "\"{label}\" {} {}",
                    l.p50_ms.unwrap_or(0.0),
                    l.p99_ms.unwrap_or(0.0)
                );
            }
        }
        let dat = dir.join("cni.dat");
        std::fs::write(&dat, data)?;
        panels.push(format!(
            r##"set title "CNI ADD latency ({n} cycles each)"
set xtics font "Sans,9"
set ylabel "ms"
set format y "%g"
plot "{dat}" using 2:xtic(1) title "p50" lc rgb "#4477aa", \
     "" using 3 title "p99" lc rgb "#ee6677", \
     "" using ($0-1.0/6):2:(sprintf("%.1f",$2)) with labels offset 0,0.7 font "Sans,9" notitle, \
     "" using ($0+1.0/6):3:(sprintf("%.1f",$3)) with labels offset 0,0.7 font "Sans,9" notitle
"##,
            n = c.cycles,
            dat = dat.display()
        ));
    }
    if let Some(t) = tapr {
        let sizes: Vec<usize> = if t.sizes.len() > 1 {
            vec![t.sizes[0], *t.sizes.last().expect("non-empty")]
        } else {
            vec![t.sizes[0]]
        };
        for (i, size) in sizes.iter().enumerate() {
            // The first size in kpps, the last in Gbit/s; each as measured (wall clock) and per
            // second of the generator's CPU time.
            let gbps = i > 0;
            let scale = |pps: Option<f64>| {
                pps.map(|p| {
                    if gbps {
                        p * *size as f64 * 8.0 / 1e9
                    } else {
                        p / 1000.0
                    }
                })
            };
            let mut data = String::new();
            for v in &t.variants {
                let m = t
                    .medians
                    .iter()
                    .find(|m| m.variant == *v && m.frame_bytes == *size);
                let label = match v {
                    Variant::Tapestry => "Tapestry\\n(eBPF redirect)",
                    Variant::Bridge => "bridge\\n(KubeVirt)",
                    Variant::BridgeNoNf => "bridge,\\nnf-call off",
                    Variant::Mirred => "tc mirred\\n(Kata)",
                };
                let _ = writeln!(
                    data,
                    "\"{label}\" {} {}",
                    scale(m.and_then(|m| m.pps)).unwrap_or(0.0),
                    scale(m.and_then(|m| m.pps_on_cpu)).unwrap_or(0.0)
                );
            }
            let dat = dir.join(format!("tap{size}.dat"));
            std::fs::write(&dat, data)?;
            let (ylabel, fmt) = if gbps {
                ("Gbit/s (median)", "%.2f")
            } else {
                ("kpps (median)", "%.0fk")
            };
            panels.push(format!(
                r##"set title "guest tap -> pod veth, {size} B frames, 1 CPU"
set xtics font "Sans,10"
set offsets 0, 0, graph 0.22, 0
set ylabel "{ylabel}"
set format y "%g"
plot "{dat}" using 2:xtic(1) title "per second" lc rgb "#228833", \
     "" using 3 title "per CPU-second" lc rgb "#99cc99", \
     "" using ($0-1.0/6):2:(sprintf("{fmt}",$2)) with labels offset 0,0.7 font "Sans,8" notitle, \
     "" using ($0+1.0/6):3:(sprintf("{fmt}",$3)) with labels offset 0,0.7 font "Sans,8" notitle
"##,
                dat = dat.display()
            ));
        }
    }
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    let width = 560 * panels.len();
    let mut script = format!(
        r##"set terminal pngcairo size {width},560 font "Sans,11" noenhanced
set output "{png}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key top left
set bmargin 6
set offsets 0, 0, graph 0.1, 0
set multiplot layout 1,{n} title "tapestry-bench-vm ({date})"
"##,
        png = png.display(),
        n = panels.len(),
        date = date
    );
    for p in panels {
        script.push_str(&p);
    }
    script.push_str("unset multiplot\n");
    let mut child = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    child
        .stdin
        .take()
        .context("gnuplot stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn replot(out: &Path) -> Result<()> {
    let path = out.join("vm.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text)?;
    let cni: Option<CniReport> = serde_json::from_value(doc["cni"].clone())
        .with_context(|| format!("{}: cni", path.display()))?;
    let tapr: Option<TapReport> = serde_json::from_value(doc["tap"].clone())
        .with_context(|| format!("{}: tap", path.display()))?;
    let date = doc["meta"]["date"].as_str().unwrap_or_default();
    plot(cni.as_ref(), tapr.as_ref(), date, &out.join("vm.png"))?;
    eprintln!("tapestry-bench-vm: wrote {}", out.join("vm.png").display());
    Ok(())
}

fn write_results(ctx: &Ctx, cni: Option<&CniReport>, tapr: Option<&TapReport>) -> Result<()> {
    let out = &ctx.args.out;
    let summary = summary_keys(cni, tapr);
    let doc = json!({
        "meta": {
            "benchmark": "tapestry-bench-vm",
            "date": utc_now(),
            "kernel": kernel(),
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "elapsed_s": ctx.at_s(),
            "bin_dir": ctx.bin_dir,
            "lab": ctx.lab.prefix(),
            "args": {
                "cycles": ctx.args.cycles, "cni_warmup": ctx.args.cni_warmup,
                "rounds": ctx.args.rounds, "seconds": ctx.args.seconds,
                "warmup": ctx.args.warmup, "cpu": ctx.args.cpu, "sizes": ctx.args.sizes,
                "variants": ctx.args.variants,
            },
        },
        "cni": cni,
        "tap": tapr,
        "notes": ctx.notes,
        "summary": summary,
    });
    write_atomic(
        &out.join("vm.json"),
        &(serde_json::to_string_pretty(&doc)? + "\n"),
    )?;
    let md = markdown(ctx, cni, tapr);
    write_atomic(&out.join("vm.md"), &md)?;
    merge_summary(&out.join("summary.json"), &summary)?;
    let date = doc["meta"]["date"].as_str().unwrap_or_default();
    if let Err(e) = plot(cni, tapr, date, &out.join("vm.png")) {
        eprintln!("tapestry-bench-vm: no plot: {e:#}");
    }
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let cli: Cli = quick::parse_from(["b", "--quick"], QUICK);
        let a = cli.run;
        assert_eq!((a.cycles, a.concurrent_rounds, a.concurrency), (20, 2, 20));
        assert_eq!((a.rounds, a.seconds, a.sizes), (1, 1.0, vec![60, 1400]));
        assert_eq!(a.out, PathBuf::from(quick::QUICK_RESULTS));
        let cli: Cli = quick::parse_from(["b", "plot", "--quick"], QUICK);
        let Some(Cmd::Plot { out, .. }) = cli.cmd else {
            panic!("not the plot subcommand")
        };
        assert_eq!(out, PathBuf::from(quick::QUICK_RESULTS));
        let cli: Cli = quick::parse_from(["b"], QUICK);
        assert_eq!(
            (cli.run.cycles, cli.run.out),
            (200, PathBuf::from(quick::RESULTS))
        );
    }
}
