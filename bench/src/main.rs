//! `tapestry-bench`: every datapath case side by side, in one run, on one netns topology.
//!
//! Cases: the direct pod IP; Tapestry's VIP at 1 and 10,000 services; kube-proxy-style iptables
//! and nftables at 1, 1,000 and 10,000 services (10 backends each). Each round runs every case
//! once (TCP_RR then TCP_CRR), rounds rotate the case order, and the figures are medians over
//! rounds; ratios are paired within a round. Only one case's rules or datapath are in place at a
//! time, so no case pays for another's hooks. See bench/README.md.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};
use tapestry_bench::anchors::{self, Anchors, IptablesBackend, Kind, Service};
use tapestry_bench::lb;
use tapestry_bench::load::{ClientReport, Mode};
use tapestry_bench::progcost::{self, Profiler, ProgramCost};
use tapestry_bench::quick;
use tapestry_bench::report::{self, CaseStats, Metric, Row, Run};
use tapestry_tests::daemon::Daemon;
use tapestry_tests::{Lab, Pod};

/// First of the server's ports; the tested service's backends are SERVER_PORT..+backends.
const SERVER_PORT: u16 = 8080;
/// Marks the safety route for the VIP range, so it can be told from anyone else's.
const ROUTE_PROTO: &str = "199";

static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(
    about = "Tapestry's datapath side by side with the direct path, iptables and nftables",
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
    Run(RunArgs),
    /// Time installing and removing one anchor in a scratch network namespace; prints JSON.
    Anchors(AnchorArgs),
    /// Remove anything a killed benchmark left: anchors, the VIP route, dead labs.
    Cleanup,
    /// Rewrite datapath.md, datapath.png and the summary keys from a datapath.json.
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// The raw results (default: <out>/datapath.json).
    #[arg(long)]
    from: Option<PathBuf>,
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    /// The quick run's results (in bench/results/quick).
    #[arg(long)]
    quick: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IptablesChoice {
    /// What `iptables-restore` is on this machine.
    Auto,
    Nft,
    Legacy,
}

impl IptablesChoice {
    fn resolve(self) -> Result<IptablesBackend> {
        Ok(match self {
            IptablesChoice::Auto => IptablesBackend::detect()?,
            IptablesChoice::Nft => IptablesBackend::Nft,
            IptablesChoice::Legacy => IptablesBackend::Legacy,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Family {
    Direct,
    Tapestry,
    /// Tapestry with `--fast-path`, 1 service.
    FastPath,
    Iptables,
    Nftables,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Rounds; every case runs once per round.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Measured seconds of each run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Unmeasured warm-up before each run, seconds.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// CPU for the client (and the server, unless --server-cpu).
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// CPU for the server (default: the client's; different CPUs change RR by ~3.5x here).
    #[arg(long)]
    server_cpu: Option<usize>,
    /// Service counts for iptables and nftables.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    anchor_sizes: Vec<usize>,
    /// Service counts for Tapestry.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    lb_sizes: Vec<usize>,
    /// Backends per service.
    #[arg(long, default_value_t = 10)]
    backends: usize,
    /// Services per iptables-restore transaction (0: all in one; 10,000 x 10 in one transaction
    /// takes minutes, see bench/README.md).
    #[arg(long, default_value_t = 250)]
    iptables_per_transaction: usize,
    /// Services per nft -f transaction (0: all in one).
    #[arg(long, default_value_t = 1000)]
    nft_per_transaction: usize,
    #[arg(long, value_enum, default_value = "auto")]
    iptables: IptablesChoice,
    /// Only these case families.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Family>,
    /// The tapestryd binary (default: next to this binary, then the workspace's target/release).
    #[arg(long)]
    tapestryd: Option<PathBuf>,
    /// Skip the Tapestry cases.
    #[arg(long)]
    no_tapestry: bool,
    /// Request and response size, bytes.
    #[arg(long, default_value_t = 1)]
    size: usize,
    /// Where datapath.json, summary.json, datapath.md and datapath.png go.
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): one round of 1 s runs, every case and size still.
const QUICK: &[(&str, &str)] = &[
    ("rounds", "1"),
    ("seconds", "1"),
    ("out", quick::QUICK_RESULTS),
];

#[derive(Args)]
struct AnchorArgs {
    #[arg(long, value_enum)]
    kind: KindArg,
    #[arg(long, default_value_t = 10000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    backends: usize,
    /// Services per transaction (0: all in one).
    #[arg(long, default_value_t = 1000)]
    per_transaction: usize,
    #[arg(long, value_enum, default_value = "auto")]
    iptables: IptablesChoice,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Iptables,
    Nftables,
}

fn main() {
    let cli: Cli = quick::parse(QUICK);
    let result = match cli.cmd {
        None => run(cli.run),
        Some(Cmd::Run(args)) => run(args),
        Some(Cmd::Anchors(args)) => time_anchor(args),
        Some(Cmd::Cleanup) => cleanup_leftovers(),
        Some(Cmd::Report(args)) => rewrite_report(args),
    };
    if let Err(e) = result {
        eprintln!("tapestry-bench: {e:#}");
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
            "must run as root: it creates network namespaces and veths, loads iptables/nftables \
             rules and eBPF programs (try `sudo make bench`)"
        );
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag checked between runs, so cleanup runs through the guards' Drop.
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

/// Dies with us even on SIGKILL (set between fork and exec).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn vip_cidr() -> String {
    format!("{}/{}", anchors::VIP_NET.0, anchors::VIP_NET.1)
}

/// VIP traffic that no case translates must not leave the machine by the default route: an
/// `unreachable` route for the VIP range answers it with ICMP instead. DNAT (netfilter or tc)
/// happens before routing, so it never sees this route.
fn add_vip_route() -> Result<()> {
    let _ = del_vip_route();
    tapestry_tests::cmd::ip(&[
        "route",
        "add",
        "unreachable",
        &vip_cidr(),
        "proto",
        ROUTE_PROTO,
    ])
    .map(|_| ())
}

fn del_vip_route() -> Result<()> {
    let out =
        tapestry_tests::cmd::ip(&["route", "show", "type", "unreachable", "proto", ROUTE_PROTO])?;
    if out.contains(&vip_cidr()) {
        tapestry_tests::cmd::ip(&[
            "route",
            "del",
            "unreachable",
            &vip_cidr(),
            "proto",
            ROUTE_PROTO,
        ])?;
    }
    Ok(())
}

/// Everything the run created outside the lab, undone on drop (error, `?`, signal, panic).
/// Field order matters: the server stops before the lab goes.
struct Guard {
    anchors: Anchors,
    nat_table_existed: bool,
    route: bool,
    server: Option<Child>,
}

impl Guard {
    fn restore_nat_table(&self) {
        if !self.nat_table_existed {
            // Without it, conntrack and NAT hooks stay registered in the node namespace and
            // every later case (direct, Tapestry) pays for them.
            if let Err(e) = self.anchors.delete_nat_table_if_empty() {
                eprintln!("tapestry-bench: cleanup: table ip nat: {e:#}");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = self.anchors.remove_all() {
            eprintln!("tapestry-bench: cleanup: anchors: {e:#}");
        }
        self.restore_nat_table();
        if self.route
            && let Err(e) = del_vip_route()
        {
            eprintln!("tapestry-bench: cleanup: route: {e:#}");
        }
    }
}

fn cleanup_leftovers() -> Result<()> {
    require_root()?;
    let _lock = tapestry_bench::lock_single_run("tapestry-bench", Duration::ZERO, &|| false)?;
    let a = Anchors {
        netns: None,
        iptables: IptablesBackend::detect()?,
        iptables_per_transaction: None,
        nft_per_transaction: None,
        pod_cidr: (Ipv4Addr::new(10, 240, 0, 0), 12),
    };
    a.remove_all()?;
    if a.iptables != IptablesBackend::Legacy {
        let legacy = Anchors {
            iptables: IptablesBackend::Legacy,
            ..a.clone()
        };
        let _ = legacy.remove(Kind::Iptables);
    }
    del_vip_route()?;
    let labs = tapestry_tests::cleanup_labs(false)?;
    eprintln!(
        "removed anchors and the VIP route; labs swept: {}",
        if labs.is_empty() {
            "none".to_string()
        } else {
            labs.join(", ")
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `anchors`: install timing in a scratch netns
// ---------------------------------------------------------------------------------------------

fn time_anchor(args: AnchorArgs) -> Result<()> {
    require_root()?;
    let name = format!("tapbench-scratch-{}", std::process::id());
    tapestry_tests::cmd::ip(&["netns", "add", &name])?;
    struct Scratch(String);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = tapestry_tests::cmd::ip(&["netns", "del", &self.0]);
        }
    }
    let _scratch = Scratch(name.clone());
    let a = Anchors {
        netns: Some(Path::new("/run/netns").join(&name)),
        iptables: args.iptables.resolve()?,
        iptables_per_transaction: (args.per_transaction > 0).then_some(args.per_transaction),
        nft_per_transaction: (args.per_transaction > 0).then_some(args.per_transaction),
        pod_cidr: (Ipv4Addr::new(10, 240, 0, 0), 12),
    };
    let kind = match args.kind {
        KindArg::Iptables => Kind::Iptables,
        KindArg::Nftables => Kind::Nftables,
    };
    let ports: Vec<u16> = (0..args.backends as u16).map(|i| SERVER_PORT + i).collect();
    let svcs = anchors::services(
        args.services,
        args.backends,
        Ipv4Addr::new(10, 240, 0, 2),
        &ports,
    )?;
    let t0 = Instant::now();
    let scripts = a.scripts(kind, &svcs);
    let gen_s = t0.elapsed().as_secs_f64();
    let bytes: usize = scripts.iter().map(String::len).sum();
    eprintln!(
        "installing {} x {} with {} in {} transaction(s), {:.1} MB of rules...",
        args.services,
        args.backends,
        kind.as_str(),
        scripts.len(),
        bytes as f64 / 1e6
    );
    let inst = a.install(kind, &scripts)?;
    let rm = a.remove(kind)?;
    println!(
        "{}",
        json!({
            "kind": kind.as_str(),
            "iptables_backend": a.iptables.as_str(),
            "services": args.services,
            "backends_per_service": args.backends,
            "transactions": inst.transactions,
            "generate_s": gen_s,
            "install_s": inst.seconds,
            "remove_s": rm.seconds,
            "script_bytes": bytes,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CaseKind {
    Direct,
    Tapestry,
    /// Tapestry with `--fast-path`.
    TapestryFast,
    Iptables,
    Nftables,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    kind: CaseKind,
    services: usize,
}

impl Case {
    fn name(&self) -> String {
        match self.kind {
            CaseKind::Direct => "direct".into(),
            CaseKind::Tapestry => format!("tapestry-{}", self.services),
            CaseKind::TapestryFast => format!("tapestry-fastpath-{}", self.services),
            CaseKind::Iptables => format!("iptables-{}", self.services),
            CaseKind::Nftables => format!("nftables-{}", self.services),
        }
    }

    fn label(&self) -> String {
        match self.kind {
            CaseKind::Direct => "direct pod IP".into(),
            CaseKind::Tapestry => format!("Tapestry, {} svc", thousands(self.services)),
            CaseKind::TapestryFast => {
                format!("Tapestry fast path, {} svc", thousands(self.services))
            }
            CaseKind::Iptables => format!("iptables, {} svc", thousands(self.services)),
            CaseKind::Nftables => format!("nftables, {} svc", thousands(self.services)),
        }
    }

    /// Inverse of [`Case::name`].
    fn from_name(name: &str) -> Option<Case> {
        if name == "direct" {
            return Some(Case {
                kind: CaseKind::Direct,
                services: 0,
            });
        }
        let (kind, n) = name.rsplit_once('-')?;
        let kind = match kind {
            "tapestry" => CaseKind::Tapestry,
            "tapestry-fastpath" => CaseKind::TapestryFast,
            "iptables" => CaseKind::Iptables,
            "nftables" => CaseKind::Nftables,
            _ => return None,
        };
        Some(Case {
            kind,
            services: n.parse().ok()?,
        })
    }

    /// Key fragment for summary.json (`iptables_10000`).
    fn key(&self) -> String {
        self.name().replace('-', "_")
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A unit of work in a round: cases that share one setup (Tapestry's sizes share one daemon).
#[derive(Debug, Clone)]
enum Block {
    Direct,
    Anchor(Kind, usize),
    Tapestry(Vec<usize>),
    /// A daemon of its own with `--fast-path`, 1 service.
    TapestryFast,
}

/// Setup (install / program) and teardown times of one case in one round.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Setup {
    round: usize,
    case: String,
    /// Anchors: wall time of iptables-restore / nft -f. Tapestry: first size from process start
    /// to the state programmed; later sizes from the state file rewrite to the generation bump.
    setup_s: f64,
    transactions: Option<usize>,
    remove_s: Option<f64>,
    /// Tapestry: the daemon's own "programmed ... in X ms", in seconds.
    daemon_program_s: Option<f64>,
    /// Tapestry: daemon VmHWM after this size was programmed, MiB.
    daemon_peak_rss_mib: Option<f64>,
}

struct Ctx {
    args: RunArgs,
    load_bin: PathBuf,
    client: Pod,
    server: Pod,
    server_cpu: usize,
    server_pid: i32,
    started: Instant,
    runs: Vec<Run>,
    setups: Vec<Setup>,
    /// Profiling runs of the Tapestry cases (BPF run-time statistics on).
    profiles: Vec<Profile>,
    notes: Vec<String>,
}

/// A profiling run: one short run of a case with the kernel's BPF statistics on, after its
/// measured runs, telling how much of a transaction the programs themselves take.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Profile {
    round: usize,
    case: String,
    mode: Mode,
    transactions: u64,
    transactions_per_s: f64,
    programs: Vec<ProgramCost>,
}

/// Measured seconds of a profiling run.
const PROFILE_SECONDS: f64 = 1.0;

fn find_tapestryd(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("tapestryd"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tapestryd"));
    candidates.into_iter().find(|p| p.is_file())
}

fn run(args: RunArgs) -> Result<()> {
    require_root()?;
    if args.rounds == 0 || args.seconds <= 0.0 || args.backends == 0 || args.backends > 1000 {
        bail!("--rounds, --seconds and --backends (1..=1000) must be positive");
    }
    let _lock = tapestry_bench::lock_single_run("tapestry-bench", Duration::ZERO, &|| false)?;
    install_signal_handlers();
    let want = |f: Family| args.only.is_empty() || args.only.contains(&f);

    let load_bin = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .join("tapestry-load");
    if !load_bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p tapestry-bench`",
            load_bin.display()
        );
    }
    let mut notes = Vec::new();
    let tapestryd = if args.no_tapestry || !(want(Family::Tapestry) || want(Family::FastPath)) {
        None
    } else {
        match find_tapestryd(args.tapestryd.as_deref()) {
            Some(p) => Some(p),
            None => {
                let n = "tapestryd not found (build it with `cargo build --release -p \
                         tapestry-node-daemon` or pass --tapestryd): Tapestry cases skipped"
                    .to_string();
                eprintln!("tapestry-bench: {n}");
                notes.push(n);
                None
            }
        }
    };
    if let Some(p) = &tapestryd {
        let dir = p
            .canonicalize()
            .with_context(|| format!("{}", p.display()))?
            .parent()
            .context("tapestryd directory")?
            .to_path_buf();
        // SAFETY: still single-threaded; read by tapestry_tests::daemon when it spawns tapestryd.
        unsafe { std::env::set_var("TAPESTRY_BIN_DIR", dir) };
    }
    let iptables = args.iptables.resolve()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    // Leftovers of a killed run first, then the lab.
    let mut guard = Guard {
        anchors: Anchors {
            netns: None,
            iptables,
            iptables_per_transaction: (args.iptables_per_transaction > 0)
                .then_some(args.iptables_per_transaction),
            nft_per_transaction: (args.nft_per_transaction > 0).then_some(args.nft_per_transaction),
            // kube-proxy's cluster CIDR: every lab's pods (tapestry-tests gives each lab a /24
            // of 10.240.0.0/12).
            pod_cidr: (Ipv4Addr::new(10, 240, 0, 0), 12),
        },
        nat_table_existed: true,
        route: false,
        server: None,
    };
    guard.anchors.remove_all()?;
    guard.nat_table_existed = guard.anchors.nat_table_exists()?;
    let mut lab = Lab::new("tapestry-bench")?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    for pod in [&client, &server] {
        // No TIME_WAIT sockets at all: a new SYN never meets an old incarnation's state.
        pod.set_sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    add_vip_route()?;
    guard.route = true;

    let server_cpu = args.server_cpu.unwrap_or(args.cpu);
    let ports = format!("{}-{}", SERVER_PORT, SERVER_PORT + args.backends as u16 - 1);
    let mut cmd = Command::new(&load_bin);
    cmd.args(["serve", "--port", &ports, "--cpu", &server_cpu.to_string()])
        .args(["--request-size", &args.size.to_string()])
        .args(["--response-size", &args.size.to_string()])
        .args(["--max-seconds", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let mut child = server.spawn(&mut cmd).context("starting the load server")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let server_pid = child.id() as i32;
    guard.server = Some(child);
    wait_listening(stdout)?;

    let mut ctx = Ctx {
        args: args.clone(),
        load_bin,
        client,
        server,
        server_cpu,
        server_pid,
        started: Instant::now(),
        runs: Vec::new(),
        setups: Vec::new(),
        profiles: Vec::new(),
        notes,
    };
    let direct = SocketAddrV4::new(ctx.server.ip, SERVER_PORT);
    if !ctx.probe(direct)? {
        bail!("the direct path {direct} does not work; the lab is broken");
    }

    let mut blocks = Vec::new();
    if want(Family::Direct) {
        blocks.push(Block::Direct);
    }
    if tapestryd.is_some() && want(Family::Tapestry) && !args.lb_sizes.is_empty() {
        blocks.push(Block::Tapestry(args.lb_sizes.clone()));
    }
    if tapestryd.is_some() && want(Family::FastPath) {
        blocks.push(Block::TapestryFast);
    }
    for (fam, kind) in [
        (Family::Iptables, Kind::Iptables),
        (Family::Nftables, Kind::Nftables),
    ] {
        if want(fam) {
            for &n in &args.anchor_sizes {
                blocks.push(Block::Anchor(kind, n));
            }
        }
    }
    if blocks.is_empty() {
        bail!("no case selected");
    }

    // The services of every size, and the anchors' scripts, are generated once.
    let mut sizes: Vec<usize> = args
        .anchor_sizes
        .iter()
        .chain(&args.lb_sizes)
        .chain(&[1])
        .copied()
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let server_ports: Vec<u16> = (0..args.backends as u16).map(|i| SERVER_PORT + i).collect();
    let mut services: BTreeMap<usize, Vec<Service>> = BTreeMap::new();
    for &n in &sizes {
        services.insert(
            n,
            anchors::services(n, args.backends, ctx.server.ip, &server_ports)?,
        );
    }
    let mut scripts: BTreeMap<(u8, usize), Vec<String>> = BTreeMap::new();

    eprintln!(
        "tapestry-bench: {} rounds x {} blocks, {} s per run, client CPU {}, server CPU {}, iptables {}",
        args.rounds,
        blocks.len(),
        args.seconds,
        args.cpu,
        server_cpu,
        iptables.as_str()
    );
    let mut lb_failed = false;
    for round in 0..args.rounds {
        // Rotating the order spreads slow drift of the shared machine over all cases.
        let mut order = blocks.clone();
        order.rotate_left(round % blocks.len());
        for block in order {
            check_stop()?;
            match block {
                Block::Direct => {
                    ctx.run_case(
                        round,
                        Case {
                            kind: CaseKind::Direct,
                            services: 0,
                        },
                        direct,
                    )?;
                }
                Block::Anchor(kind, n) => {
                    let key = (kind as u8, n);
                    let script = scripts
                        .entry(key)
                        .or_insert_with(|| guard.anchors.scripts(kind, &services[&n]));
                    let case = Case {
                        kind: match kind {
                            Kind::Iptables => CaseKind::Iptables,
                            Kind::Nftables => CaseKind::Nftables,
                        },
                        services: n,
                    };
                    let result =
                        anchor_block(&mut ctx, &guard, round, case, kind, script, &services[&n]);
                    // Removed whatever happened, before anything else runs.
                    let rm = guard.anchors.remove(kind);
                    if kind == Kind::Iptables {
                        guard.restore_nat_table();
                    }
                    let rm = rm?;
                    if let Some(s) = ctx.setups.last_mut()
                        && s.case == case.name()
                        && s.round == round
                    {
                        s.remove_s = Some(rm.seconds);
                    }
                    result?;
                }
                Block::Tapestry(_) | Block::TapestryFast => {
                    let (ns, fast) = match &block {
                        Block::Tapestry(ns) => (ns.clone(), false),
                        _ => (vec![1], true),
                    };
                    if lb_failed {
                        continue;
                    }
                    if let Err(e) = tapestry_block(&mut ctx, round, &ns, fast, &services) {
                        check_stop()?;
                        // The other cases still mean something: report and go on without it.
                        let n = format!("round {}: Tapestry cases failed: {e:#}", round + 1);
                        eprintln!("  {n}");
                        ctx.notes.push(n);
                        lb_failed = true;
                    }
                    for pod in [&ctx.client, &ctx.server] {
                        if let Some(left) = attached_programs(&pod.host_ifname) {
                            bail!(
                                "eBPF programs still attached to {} after tapestryd stopped; \
                                 the next cases would pay for them: {left}",
                                pod.host_ifname
                            );
                        }
                    }
                }
            }
        }
    }
    let elapsed = ctx.started.elapsed().as_secs_f64();
    drop(guard);
    let out = args.out.clone();
    let outcome = Outcome {
        args: &ctx.args,
        server_cpu: ctx.server_cpu,
        client_ip: ctx.client.ip.to_string(),
        server_ip: ctx.server.ip.to_string(),
        runs: &ctx.runs,
        setups: &ctx.setups,
        profiles: &ctx.profiles,
        notes: &ctx.notes,
    };
    write_results(
        &outcome,
        blocks_to_cases(&blocks),
        iptables.as_str(),
        elapsed,
        &out,
    )?;
    drop(lab);
    Ok(())
}

fn wait_listening(stdout: std::process::ChildStdout) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(10))
        .context("the load server did not start listening within 10 s")?;
    if !line.contains("listening") {
        bail!("the load server failed to start: {line:?}");
    }
    Ok(())
}

fn anchor_block(
    ctx: &mut Ctx,
    guard: &Guard,
    round: usize,
    case: Case,
    kind: Kind,
    scripts: &[String],
    services: &[Service],
) -> Result<()> {
    let t = guard.anchors.install(kind, scripts)?;
    eprintln!(
        "  [{}] {}: installed in {:.2} s ({} transaction(s))",
        round + 1,
        case.name(),
        t.seconds,
        t.transactions
    );
    ctx.setups.push(Setup {
        round,
        case: case.name(),
        setup_s: t.seconds,
        transactions: Some(t.transactions),
        remove_s: None,
        daemon_program_s: None,
        daemon_peak_rss_mib: None,
    });
    let tested = anchors::tested(services);
    ctx.run_case(round, case, SocketAddrV4::new(tested.vip, tested.port))
}

/// Tapestry's cases: one daemon for `sizes` in turn; `fast`: with `--fast-path`.
fn tapestry_block(
    ctx: &mut Ctx,
    round: usize,
    sizes: &[usize],
    fast: bool,
    services: &BTreeMap<usize, Vec<Service>>,
) -> Result<()> {
    let (kind, args): (CaseKind, &[&str]) = if fast {
        (CaseKind::TapestryFast, &["--fast-path"])
    } else {
        (CaseKind::Tapestry, &[])
    };
    let (client_if, server_if) = (
        ctx.client.host_ifname.clone(),
        ctx.server.host_ifname.clone(),
    );
    let attach = [client_if.as_str(), server_if.as_str()];
    let mut daemon: Option<Daemon> = None;
    let mut logged_before = 0;
    for (i, &n) in sizes.iter().enumerate() {
        check_stop()?;
        let svcs = &services[&n];
        // JSON: a machine-written state of 10,000 services parses in a tenth of the time and
        // memory that YAML takes (serde_yaml holds the whole event stream).
        let yaml = lb::desired_state(svcs).to_json();
        let t0 = Instant::now();
        match daemon.as_mut() {
            None => {
                daemon = Some(
                    Daemon::start_with("bench", &yaml, &attach, args)
                        .context("starting tapestryd")?,
                );
            }
            Some(d) => {
                d.write_state(&yaml)?;
                d.wait_generation(i as u64 + 1, Duration::from_secs(600))
                    .with_context(|| format!("tapestryd programming {n} services"))?;
            }
        }
        let setup_s = t0.elapsed().as_secs_f64();
        let d = daemon.as_ref().expect("set above");
        let log = d.log();
        let lines = lb::programmed_lines(&log);
        let daemon_program_s = lines
            .get(logged_before..)
            .and_then(|new| new.iter().rev().find(|(s, _, _)| *s as usize == n))
            .map(|(_, _, ms)| ms / 1000.0);
        logged_before = lines.len();
        let rss = d.pid().and_then(lb::peak_rss_mib);
        let case = Case { kind, services: n };
        eprintln!(
            "  [{}] {}: programmed in {setup_s:.2} s{} (daemon: {}), peak RSS {}",
            round + 1,
            case.name(),
            if i == 0 {
                " from process start"
            } else {
                " from state rewrite"
            },
            daemon_program_s
                .map(|s| format!("{:.3} s", s))
                .unwrap_or_else(|| "no log line".into()),
            rss.map(|m| format!("{m:.1} MiB"))
                .unwrap_or_else(|| "?".into()),
        );
        ctx.setups.push(Setup {
            round,
            case: case.name(),
            setup_s,
            transactions: None,
            remove_s: None,
            daemon_program_s,
            daemon_peak_rss_mib: rss,
        });
        let tested = anchors::tested(svcs);
        let target = SocketAddrV4::new(tested.vip, tested.port);
        let result = ctx
            .run_case(round, case, target)
            .and_then(|()| ctx.profile_case(round, case, target, &d.bpffs_dir));
        if result.is_err() {
            let _ = std::fs::write(ctx.args.out.join("tapestryd.log"), &log);
        }
        result?;
    }
    if let Some(d) = &daemon {
        let _ = std::fs::write(ctx.args.out.join("tapestryd.log"), d.log());
    }
    // Dropping the daemon kills it and removes its pins: the datapath is detached before the
    // next case.
    drop(daemon);
    Ok(())
}

/// What `bpftool net show dev IFNAME` lists as attached (tc, tcx, XDP), if anything; `None`
/// when nothing is, or when bpftool is not there to tell.
fn attached_programs(ifname: &str) -> Option<String> {
    let out = Command::new("bpftool")
        .args(["-j", "net", "show", "dev", ifname])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut found = Vec::new();
    for section in v.as_array()? {
        for (hook, progs) in section.as_object()? {
            if let Some(list) = progs.as_array()
                && !list.is_empty()
            {
                found.push(format!("{hook}: {}", Value::Array(list.clone())));
            }
        }
    }
    (!found.is_empty()).then(|| found.join("; "))
}

fn node_conntrack_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl Ctx {
    /// Runs the load client in the client pod; `None` plus a note if it produced no report.
    fn client(
        &self,
        mode: Mode,
        target: SocketAddrV4,
        seconds: f64,
        warmup: f64,
        max_errors: u64,
        io_timeout_ms: u64,
    ) -> Result<ClientReport> {
        let mut cmd = Command::new(&self.load_bin);
        cmd.arg(mode.as_str())
            .args(["--target", &target.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--warmup", &warmup.to_string()])
            .args(["--cpu", &self.args.cpu.to_string()])
            .args(["--request-size", &self.args.size.to_string()])
            .args(["--response-size", &self.args.size.to_string()])
            .args(["--max-errors", &max_errors.to_string()])
            .args(["--io-timeout-ms", &io_timeout_ms.to_string()])
            .args(["--peer-pid", &self.server_pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = self
            .client
            .spawn(&mut cmd)
            .context("starting the load client")?;
        let deadline = Instant::now() + Duration::from_secs_f64(seconds + warmup + 15.0);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the load client ({} to {target}) did not stop by itself",
                    mode.as_str()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        child
            .stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut out)?;
        let mut err = String::new();
        child
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut err)?;
        if !status.success() {
            bail!("load client failed ({status}): {}", err.trim());
        }
        let line = out.lines().last().context("load client printed nothing")?;
        serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))
    }

    /// A short CRR burst: does this target answer at all?
    fn probe(&self, target: SocketAddrV4) -> Result<bool> {
        let r = self.client(Mode::Crr, target, 0.2, 0.0, 3, 500)?;
        Ok(r.transactions > 0)
    }

    fn run_case(&mut self, round: usize, case: Case, target: SocketAddrV4) -> Result<()> {
        let name = case.name();
        if !self.probe(target)? {
            let n = format!(
                "round {}: {name}: {target} does not answer; case skipped",
                round + 1
            );
            eprintln!("  {n}");
            self.notes.push(n);
            return Ok(());
        }
        let mut line = Vec::new();
        for mode in [Mode::Rr, Mode::Crr] {
            check_stop()?;
            let at_s = self.started.elapsed().as_secs_f64();
            let report =
                self.client(mode, target, self.args.seconds, self.args.warmup, 200, 1000)?;
            line.push(format!(
                "{} {:.1}k/s p50 {:.0} us{}",
                mode.as_str(),
                report.transactions_per_s / 1000.0,
                report.p50_us,
                if report.errors > 0 {
                    format!(
                        " ({} errors: {})",
                        report.errors,
                        report.first_error.as_deref().unwrap_or("")
                    )
                } else {
                    String::new()
                }
            ));
            self.runs.push(Run {
                round,
                case: name.clone(),
                mode,
                at_s,
                node_conntrack_entries: node_conntrack_count(),
                report,
            });
        }
        eprintln!("  [{}] {name}: {}", round + 1, line.join(", "));
        Ok(())
    }

    /// After a Tapestry case's measured runs: one short RR and one short CRR run with the BPF
    /// run-time statistics on, recording what each of the daemon's programs (pinned under
    /// `pin_dir`) ran and how long.
    fn profile_case(
        &mut self,
        round: usize,
        case: Case,
        target: SocketAddrV4,
        pin_dir: &Path,
    ) -> Result<()> {
        for mode in [Mode::Rr, Mode::Crr] {
            check_stop()?;
            let profiler = Profiler::start(pin_dir)?;
            let report = self.client(mode, target, PROFILE_SECONDS, 0.1, 200, 1000)?;
            let programs = profiler.finish()?;
            self.profiles.push(Profile {
                round,
                case: case.name(),
                mode,
                transactions: report.transactions,
                transactions_per_s: report.transactions_per_s,
                programs,
            });
        }
        Ok(())
    }
}

/// `report`: the same outputs from the raw runs of an earlier run.
fn rewrite_report(a: ReportArgs) -> Result<()> {
    let from = a.from.unwrap_or_else(|| a.out.join("datapath.json"));
    let text =
        std::fs::read_to_string(&from).with_context(|| format!("reading {}", from.display()))?;
    let raw: Value = serde_json::from_str(&text).context("parsing datapath.json")?;
    let meta = &raw["meta"];
    let runs: Vec<Run> = serde_json::from_value(raw["runs"].clone()).context("runs")?;
    let setups: Vec<Setup> = serde_json::from_value(raw["setups"].clone()).context("setups")?;
    let notes: Vec<String> = serde_json::from_value(raw["notes"].clone()).unwrap_or_default();
    // Older runs had no profiling runs.
    let profiles: Vec<Profile> =
        serde_json::from_value(raw["profiles"].clone()).unwrap_or_default();
    let num = |k: &str| meta[k].as_f64();
    let mut args = Cli::parse_from(["tapestry-bench"]).run;
    args.rounds = num("rounds").map_or(args.rounds, |v| v as usize);
    args.seconds = num("seconds_per_run").unwrap_or(args.seconds);
    args.warmup = num("warmup_seconds").unwrap_or(args.warmup);
    args.cpu = num("client_cpu").map_or(args.cpu, |v| v as usize);
    args.size = num("request_response_bytes").map_or(args.size, |v| v as usize);
    args.backends = num("backends_per_service").map_or(args.backends, |v| v as usize);
    args.iptables_per_transaction = num("iptables_services_per_transaction")
        .map_or(args.iptables_per_transaction, |v| v as usize);
    args.nft_per_transaction =
        num("nftables_services_per_transaction").map_or(args.nft_per_transaction, |v| v as usize);
    let cases: Vec<Case> = runs
        .iter()
        .filter_map(|r| Case::from_name(&r.case))
        .collect();
    let outcome = Outcome {
        args: &args,
        server_cpu: num("server_cpu").map_or(args.cpu, |v| v as usize),
        client_ip: meta["client_ip"].as_str().unwrap_or_default().to_string(),
        server_ip: meta["server_ip"].as_str().unwrap_or_default().to_string(),
        runs: &runs,
        setups: &setups,
        profiles: &profiles,
        notes: &notes,
    };
    std::fs::create_dir_all(&a.out)?;
    write_results(
        &outcome,
        cases,
        meta["iptables_backend"].as_str().unwrap_or("?"),
        num("total_seconds").unwrap_or(0.0),
        &a.out,
    )
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

fn blocks_to_cases(blocks: &[Block]) -> Vec<Case> {
    let mut cases = Vec::new();
    for b in blocks {
        match b {
            Block::Direct => cases.push(Case {
                kind: CaseKind::Direct,
                services: 0,
            }),
            Block::Anchor(Kind::Iptables, n) => cases.push(Case {
                kind: CaseKind::Iptables,
                services: *n,
            }),
            Block::Anchor(Kind::Nftables, n) => cases.push(Case {
                kind: CaseKind::Nftables,
                services: *n,
            }),
            Block::Tapestry(ns) => {
                for &n in ns {
                    cases.push(Case {
                        kind: CaseKind::Tapestry,
                        services: n,
                    });
                }
            }
            Block::TapestryFast => cases.push(Case {
                kind: CaseKind::TapestryFast,
                services: 1,
            }),
        }
    }
    cases
}

fn setup_median(setups: &[Setup], case: &str, f: impl Fn(&Setup) -> Option<f64>) -> Option<f64> {
    report::median(
        &setups
            .iter()
            .filter(|s| s.case == case)
            .filter_map(f)
            .collect::<Vec<_>>(),
    )
}

fn per_tx(n: usize) -> String {
    if n == 0 {
        "all".to_string()
    } else {
        n.to_string()
    }
}

fn opt(v: Option<f64>) -> Value {
    v.map(|x| json!((x * 1e4).round() / 1e4))
        .unwrap_or(Value::Null)
}

/// Median over rounds of the programs' nanoseconds per transaction in `case`'s profiling runs.
fn profile_ns(profiles: &[Profile], case: &str, mode: Mode) -> Option<f64> {
    let v: Vec<f64> = profiles
        .iter()
        .filter(|p| p.case == case && p.mode == mode)
        .filter_map(|p| progcost::ns_per_transaction(&p.programs, p.transactions))
        .collect();
    report::median(&v)
}

/// The profiling runs as a table: per Tapestry case and mode, what a transaction costs over the
/// direct path, how much of that the programs take, and each program's runs per transaction
/// and time per run (medians over rounds).
fn profile_markdown(o: &Outcome, cases: &[Case], has_direct: bool) -> String {
    let mut md = String::new();
    for c in cases
        .iter()
        .filter(|c| matches!(c.kind, CaseKind::Tapestry | CaseKind::TapestryFast))
    {
        let name = c.name();
        for mode in [Mode::Rr, Mode::Crr] {
            let sel: Vec<&Profile> = o
                .profiles
                .iter()
                .filter(|p| p.case == name && p.mode == mode && p.transactions > 0)
                .collect();
            if sel.is_empty() {
                continue;
            }
            if md.is_empty() {
                md.push_str(&format!(
                    "\nWhere a Tapestry transaction's time goes: after each case's measured runs, \
                     a {PROFILE_SECONDS} s run with the kernel's BPF run-time statistics on \
                     (they add two clock reads to every program run); medians over rounds. \
                     `extra` is the CPU time a transaction costs over the direct path in the \
                     measured runs (from transactions per CPU-second).\n\n| case | mode | extra \
                     CPU ns/tx | programs ns/tx | program: runs/tx, \
                     ns/run |\n|---|---|---:|---:|---|\n"
                ));
            }
            let mut names: Vec<&str> = sel
                .iter()
                .flat_map(|p| p.programs.iter().map(|x| x.name.as_str()))
                .collect();
            names.sort_unstable();
            names.dedup();
            let per_prog: Vec<String> = names
                .iter()
                .map(|n| {
                    let runs: Vec<f64> = sel
                        .iter()
                        .filter_map(|p| {
                            let x = p.programs.iter().find(|x| x.name == *n)?;
                            Some(x.runs as f64 / p.transactions as f64)
                        })
                        .collect();
                    let ns: Vec<f64> = sel
                        .iter()
                        .filter_map(|p| p.programs.iter().find(|x| x.name == *n)?.ns_per_run())
                        .collect();
                    format!(
                        "{n}: {:.2}, {:.0}",
                        report::median(&runs).unwrap_or(0.0),
                        report::median(&ns).unwrap_or(0.0)
                    )
                })
                .collect();
            let extra = has_direct
                .then(|| report::paired_extra_ns(o.runs, &name, "direct", mode, Metric::PerCpu))
                .flatten();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                c.label(),
                mode.as_str(),
                extra.map_or("-".into(), |x| format!("{x:.0}")),
                profile_ns(o.profiles, &name, mode).map_or("-".into(), |x| format!("{x:.0}")),
                per_prog.join("; ")
            ));
        }
    }
    md
}

/// What [`write_results`] needs: from a live run, or read back from datapath.json.
struct Outcome<'a> {
    args: &'a RunArgs,
    server_cpu: usize,
    client_ip: String,
    server_ip: String,
    runs: &'a [Run],
    setups: &'a [Setup],
    profiles: &'a [Profile],
    notes: &'a [String],
}

fn write_results(
    o: &Outcome,
    mut cases: Vec<Case>,
    iptables: &str,
    elapsed: f64,
    out: &Path,
) -> Result<()> {
    cases.sort();
    cases.dedup();
    let direct = "direct";
    let has_direct = cases.iter().any(|c| c.kind == CaseKind::Direct);
    let rows: Vec<Row> = cases
        .iter()
        .map(|c| {
            let name = c.name();
            Row {
                case: name.clone(),
                label: c.label(),
                rr: report::case_stats(o.runs, &name, Mode::Rr),
                crr: report::case_stats(o.runs, &name, Mode::Crr),
                rr_vs_direct: has_direct
                    .then(|| report::paired_ratio(o.runs, &name, direct, Mode::Rr))
                    .flatten(),
                crr_vs_direct: has_direct
                    .then(|| report::paired_ratio(o.runs, &name, direct, Mode::Crr))
                    .flatten(),
                rr_cpu_vs_direct: has_direct
                    .then(|| {
                        report::paired_ratio_of(o.runs, &name, direct, Mode::Rr, Metric::PerCpu)
                    })
                    .flatten(),
                crr_cpu_vs_direct: has_direct
                    .then(|| {
                        report::paired_ratio_of(o.runs, &name, direct, Mode::Crr, Metric::PerCpu)
                    })
                    .flatten(),
                setup_s: setup_median(o.setups, &name, |s| Some(s.setup_s)),
            }
        })
        .collect();

    // summary.json: flat keys, merged into what other benchmarks wrote.
    let mut s = Map::new();
    let b = o.args.backends;
    let lb_ran = cases
        .iter()
        .any(|c| matches!(c.kind, CaseKind::Tapestry | CaseKind::TapestryFast));
    // The fast path against the direct path without it (issue 15's target: > 1).
    for (mode, m) in [(Mode::Rr, "rr"), (Mode::Crr, "crr")] {
        for (metric, what) in [(Metric::Tps, "ratio"), (Metric::PerCpu, "cpu_ratio")] {
            s.insert(
                format!("lb_{m}_{what}_direct_fastpath_1"),
                opt(report::paired_ratio_of(
                    o.runs,
                    "tapestry-fastpath-1",
                    direct,
                    mode,
                    metric,
                )),
            );
        }
    }
    for n in [1usize, 10000] {
        let lb = format!("tapestry-{n}");
        for (mode, m) in [(Mode::Rr, "rr"), (Mode::Crr, "crr")] {
            for (metric, what) in [(Metric::Tps, "ratio"), (Metric::PerCpu, "cpu_ratio")] {
                s.insert(
                    format!("lb_{m}_{what}_direct_{n}"),
                    opt(report::paired_ratio_of(o.runs, &lb, direct, mode, metric)),
                );
                for anchor in ["iptables", "nftables"] {
                    let other = format!("{anchor}-{n}");
                    s.insert(
                        format!("lb_{m}_{what}_{anchor}_{n}"),
                        opt(report::paired_ratio_of(o.runs, &lb, &other, mode, metric)),
                    );
                }
            }
        }
    }
    for c in &cases {
        let name = c.name();
        for (mode, m) in [(Mode::Rr, "rr"), (Mode::Crr, "crr")] {
            let st: CaseStats = report::case_stats(o.runs, &name, mode);
            s.insert(
                format!("bench_{m}_tps_{}", c.key()),
                opt(st.tps.map(f64::round)),
            );
            s.insert(
                format!("bench_{m}_per_cpu_s_{}", c.key()),
                opt(st.per_cpu_s.map(f64::round)),
            );
            if c.kind != CaseKind::Direct && has_direct {
                for (metric, what) in [(Metric::Tps, "ratio"), (Metric::PerCpu, "cpu_ratio")] {
                    s.insert(
                        format!("bench_{m}_{what}_direct_{}", c.key()),
                        opt(report::paired_ratio_of(o.runs, &name, direct, mode, metric)),
                    );
                }
                s.insert(
                    format!("bench_{m}_extra_cpu_ns_per_transaction_{}", c.key()),
                    opt(
                        report::paired_extra_ns(o.runs, &name, direct, mode, Metric::PerCpu)
                            .map(f64::round),
                    ),
                );
            }
            if matches!(c.kind, CaseKind::Tapestry | CaseKind::TapestryFast) {
                s.insert(
                    format!("bench_{m}_prog_ns_per_transaction_{}", c.key()),
                    opt(profile_ns(o.profiles, &name, mode).map(f64::round)),
                );
            }
        }
        if matches!(c.kind, CaseKind::Iptables | CaseKind::Nftables) {
            let kind = if c.kind == CaseKind::Iptables {
                "iptables"
            } else {
                "nftables"
            };
            s.insert(
                format!("{kind}_install_{}x{b}_seconds", c.services),
                opt(setup_median(o.setups, &name, |x| Some(x.setup_s))),
            );
            s.insert(
                format!("{kind}_remove_{}x{b}_seconds", c.services),
                opt(setup_median(o.setups, &name, |x| x.remove_s)),
            );
        }
    }
    let big = 10000;
    let lb_big = format!("tapestry-{big}");
    s.insert(
        format!("lb_program_{big}x{b}_seconds"),
        opt(setup_median(o.setups, &lb_big, |x| {
            (x.setup_s > 0.0).then_some(x.setup_s)
        })),
    );
    s.insert(
        format!("lb_program_{big}x{b}_daemon_seconds"),
        opt(setup_median(o.setups, &lb_big, |x| x.daemon_program_s)),
    );
    s.insert(
        format!("daemon_rss_mb_{big}x{b}"),
        opt(o
            .setups
            .iter()
            .filter(|x| x.case == lb_big)
            .filter_map(|x| x.daemon_peak_rss_mib)
            .reduce(f64::max)),
    );
    s.insert(
        "lb_start_to_ready_1_seconds".into(),
        opt(setup_median(o.setups, "tapestry-1", |x| Some(x.setup_s))),
    );
    s.insert("bench_rounds".into(), json!(o.args.rounds));
    s.insert("bench_seconds_per_run".into(), json!(o.args.seconds));
    s.insert("bench_iptables_backend".into(), json!(iptables));
    s.insert(
        "bench_iptables_services_per_transaction".into(),
        json!(o.args.iptables_per_transaction),
    );
    s.insert(
        "bench_nftables_services_per_transaction".into(),
        json!(o.args.nft_per_transaction),
    );
    s.insert(
        "bench_datapath_total_seconds".into(),
        json!(elapsed.round()),
    );
    if !lb_ran {
        // Never leave ratios of an older run next to this run's figures.
        for (k, v) in s.iter_mut() {
            if k.starts_with("lb_") || k.starts_with("daemon_") {
                *v = Value::Null;
            }
        }
    }

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let meta = json!({
        "kernel": kernel,
        "cpus_online": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rounds": o.args.rounds,
        "seconds_per_run": o.args.seconds,
        "warmup_seconds": o.args.warmup,
        "client_cpu": o.args.cpu,
        "server_cpu": o.server_cpu,
        "request_response_bytes": o.args.size,
        "backends_per_service": o.args.backends,
        "iptables_backend": iptables,
        "iptables_services_per_transaction": o.args.iptables_per_transaction,
        "nftables_services_per_transaction": o.args.nft_per_transaction,
        "vip_range": vip_cidr(),
        "client_ip": o.client_ip,
        "server_ip": o.server_ip,
        "total_seconds": elapsed,
        "crr_close": "client closes with SO_LINGER 0 (RST): no TIME_WAIT on either side",
    });
    let raw = json!({
        "meta": meta,
        "cases": rows,
        "setups": o.setups,
        "runs": o.runs,
        "profiles": o.profiles,
        "notes": o.notes,
        "summary": s,
    });
    report::write_atomic(
        &out.join("datapath.json"),
        &(serde_json::to_string_pretty(&raw)? + "\n"),
    )?;
    report::merge_summary(&out.join("summary.json"), &s)?;

    let header = format!(
        "Medians of {} rounds, {} s per run, client and server on CPU {}{}; kernel {kernel}; \
         iptables backend {}; {}-byte request/response; {} backends per service. Ratios are \
         paired within a round. Setup = install time (anchors; services per transaction: \
         iptables {}, nftables {}) or \
         time to programmed (Tapestry: first size from process start, then from state rewrite).",
        o.args.rounds,
        o.args.seconds,
        o.args.cpu,
        if o.server_cpu != o.args.cpu {
            format!(" / {}", o.server_cpu)
        } else {
            String::new()
        },
        iptables,
        o.args.size,
        o.args.backends,
        per_tx(o.args.iptables_per_transaction),
        per_tx(o.args.nft_per_transaction),
    );
    let mut md = report::markdown(&rows, &header);
    md.push_str(&profile_markdown(o, &cases, has_direct));
    if !o.notes.is_empty() {
        md.push_str("\nNotes:\n");
        for n in o.notes {
            md.push_str(&format!("- {n}\n"));
        }
    }
    report::write_atomic(&out.join("datapath.md"), &md)?;
    let title = format!(
        "TCP_RR / TCP_CRR per datapath: medians of {} rounds, {}",
        o.args.rounds,
        if o.server_cpu == o.args.cpu {
            "client and server on one vCPU".to_string()
        } else {
            format!(
                "client on CPU {}, server on CPU {}",
                o.args.cpu, o.server_cpu
            )
        }
    );
    if let Err(e) = report::plot(&rows, &title, &out.join("datapath.png")) {
        eprintln!("tapestry-bench: no plot: {e:#}");
    }
    print!("{md}");
    eprintln!(
        "tapestry-bench: wrote {}/datapath.{{json,md,png}} and summary.json in {:.0} s",
        out.display(),
        elapsed
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let cli: Cli = quick::parse_from(["tapestry-bench", "--quick"], QUICK);
        let a = cli.run;
        assert_eq!((a.rounds, a.seconds, a.quick), (1, 1.0, true));
        assert_eq!(
            (a.anchor_sizes, a.lb_sizes),
            (vec![1, 1000, 10000], vec![1, 10000])
        );
        assert_eq!(a.out, PathBuf::from(quick::QUICK_RESULTS));
        let cli: Cli = quick::parse_from(["tapestry-bench", "report", "--quick"], QUICK);
        let Some(Cmd::Report(r)) = cli.cmd else {
            panic!("not the report subcommand")
        };
        assert_eq!(r.out, PathBuf::from(quick::QUICK_RESULTS));
        let cli: Cli = quick::parse_from(["tapestry-bench"], QUICK);
        assert_eq!((cli.run.rounds, cli.run.quick), (4, false));
        assert_eq!(cli.run.out, PathBuf::from(quick::RESULTS));
    }
}
