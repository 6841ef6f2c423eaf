//! tapestryd: see the crate docs and README.md.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use tapestry_api::{state::DesiredState, types};
use tapestry_common::{Config, DEFAULT_HAIRPIN_SNAT_IP, DhcpFrame, config_flags};
use tapestry_node_daemon::{
    api,
    datapath::Datapath,
    endpoints::Endpoints,
    flows::{self, FlowLog},
    kubernetes::{self, KubernetesSource},
    node::{Node, SharedNode},
    reconcile::Reconciler,
    source::{SourceStatus, StandaloneFile, StateSource},
};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{error, info, warn};

/// Where the desired state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    /// A local state file (--state-file): standalone mode, a single host.
    File,
    /// The Kubernetes API: Services and EndpointSlices in, this node's Guests out.
    Kubernetes,
}

/// Tapestry's node daemon: eBPF Service load balancing for pods and VM guests.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Where the desired state comes from.
    #[arg(long, value_enum, env = "TAPESTRY_SOURCE", default_value = "file")]
    source: SourceKind,
    /// This node's name (Kubernetes mode): Guests are published under it, and
    /// `internalTrafficPolicy: Local` keeps its endpoints.
    #[arg(long, env = "NODE_NAME", required_if_eq("source", "kubernetes"))]
    node_name: Option<String>,
    /// Kubeconfig for Kubernetes mode (default: in-cluster, then $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: program every Service from Services and EndpointSlices (a kube-proxy
    /// replacement). With false the daemon only plumbs VM guests and publishes Guests.
    #[arg(long, env = "TAPESTRY_KUBE_PROXY_REPLACEMENT", default_value_t = true, action = clap::ArgAction::Set)]
    kube_proxy_replacement: bool,
    /// Standalone mode: the desired state (services and backends), YAML or JSON, watched for
    /// changes.
    #[arg(
        long,
        env = "TAPESTRY_STATE_FILE",
        default_value = "/etc/tapestry/state.yaml"
    )]
    state_file: PathBuf,
    /// bpffs directory for the pinned maps, program and links.
    #[arg(long, env = "TAPESTRY_BPFFS_DIR", default_value = types::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Unix socket of the local API.
    #[arg(long, env = "TAPESTRY_SOCKET", default_value = types::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Address for Prometheus' /metrics (empty to disable).
    #[arg(long, env = "TAPESTRY_METRICS_ADDR", default_value = types::DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// Attach the datapath to these host-side interfaces at start (also possible through the API).
    #[arg(long = "attach", value_name = "IFNAME")]
    attach: Vec<String>,
    /// Emit flow events (new flow, NAT decision, drop) for `tapestry flows`.
    #[arg(long, env = "TAPESTRY_FLOW_EVENTS")]
    flow_events: bool,
    /// Source address for hairpin flows (a backend reaching its own service).
    #[arg(long, default_value_t = Ipv4Addr::from(DEFAULT_HAIRPIN_SNAT_IP))]
    hairpin_snat_ip: Ipv4Addr,
    /// Seconds between conntrack garbage collections.
    #[arg(long, default_value_t = 10)]
    conntrack_gc_interval: u64,
    /// The daemon's own state (the endpoint registry), kept across restarts.
    #[arg(long, env = "TAPESTRY_STATE_DIR", default_value = "/run/tapestry")]
    state_dir: PathBuf,
    /// Remove every pin (datapath detached from every interface, maps gone) and exit.
    #[arg(long)]
    uninstall: bool,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()).await {
        error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.uninstall {
        Datapath::unpin_all(&args.bpffs_dir)?;
        info!(bpffs_dir = %args.bpffs_dir.display(), "datapath removed");
        return Ok(());
    }
    let mut datapath = Datapath::load(&args.bpffs_dir)?;
    datapath.set_config(Config {
        flags: if args.flow_events {
            config_flags::FLOW_EVENTS
        } else {
            0
        },
        hairpin_snat_ip: u32::from_ne_bytes(args.hairpin_snat_ip.octets()),
    })?;
    let reconciler = Reconciler::restore(&datapath.maps)?;
    let adopted = datapath.adopt_links()?;
    if !adopted.is_empty() {
        info!(
            count = adopted.len(),
            "re-attached to the interfaces of the previous run"
        );
    }
    for ifname in &args.attach {
        datapath
            .attach(ifname)
            .with_context(|| format!("--attach {ifname}"))?;
        info!(ifname, "attached");
    }
    let mut endpoints = Endpoints::new(&args.state_dir);
    endpoints.restore(&mut datapath)?;
    let events = datapath.maps.events.take();
    let dhcp_ring = datapath.maps.dhcp.take();
    let flows = Arc::new(FlowLog::default());
    let kube = match args.source {
        SourceKind::File => None,
        SourceKind::Kubernetes => {
            let node_name = args
                .node_name
                .clone()
                .context("--node-name (or $NODE_NAME) is required with --source kubernetes")?;
            Some((
                kubernetes::client(args.kubeconfig.as_deref()).await?,
                node_name,
            ))
        }
    };
    let source = match &kube {
        None => Source::File(StandaloneFile::new(&args.state_file)),
        Some(_) if !args.kube_proxy_replacement => Source::None,
        Some((client, node_name)) => {
            Source::Kubernetes(KubernetesSource::new(client.clone(), node_name.clone()))
        }
    };
    let node: SharedNode = Arc::new(Mutex::new(Node {
        datapath,
        reconciler,
        generation: 0,
        source: SourceStatus {
            source: source.describe(),
            ..Default::default()
        },
        apply_error: None,
        mode: if kube.is_some() {
            "kubernetes"
        } else {
            "standalone"
        },
        flow_events: args.flow_events,
        flows: flows.clone(),
        endpoints,
    }));

    let (updates_tx, updates_rx) = watch::channel(Arc::new(DesiredState::default()));
    let (status_tx, status_rx) = watch::channel(SourceStatus::default());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        match source {
            Source::File(s) => s.run(updates_tx, status_tx).await,
            Source::Kubernetes(s) => s.run(updates_tx, status_tx).await,
            Source::None => {
                // Keep the channels open: the reconciler waits, the datapath's services stay.
                let _keep = (updates_tx, status_tx);
                std::future::pending().await
            }
        }
        .context("state source")
    });
    if let Some((client, node_name)) = kube {
        let node = node.clone();
        tasks.spawn(kubernetes::publish_guests(client, node_name, node));
    }
    tasks.spawn(reconcile_loop(node.clone(), updates_rx, status_rx));
    {
        let node = node.clone();
        let socket = args.socket.clone();
        tasks.spawn(async move { api::serve_unix(&socket, node).await });
    }
    if !args.metrics_addr.is_empty() {
        let node = node.clone();
        let addr = args.metrics_addr.clone();
        tasks.spawn(async move { api::serve_tcp(&addr, node).await });
    }
    if let Some(ring) = events {
        tasks.spawn(flows::drain(ring, flows));
    }
    if let Some(ring) = dhcp_ring {
        tasks.spawn(serve_dhcp(ring, node.clone()));
    }
    {
        let node = node.clone();
        let every = Duration::from_secs(args.conntrack_gc_interval.max(1));
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let n = node
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .collect_conntrack_garbage();
                if n > 0 {
                    tracing::debug!(removed = n, "conntrack garbage collected");
                }
            }
        });
    }

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow::anyhow!("a daemon task ended unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        },
    };
    // The datapath stays attached and pinned: flows keep flowing while no daemon runs, and the
    // next start adopts everything. `--uninstall` removes it.
    let _ = std::fs::remove_file(&args.socket);
    info!("stopped; the datapath stays in place");
    result
}

/// The configured desired-state source.
enum Source {
    File(StandaloneFile),
    Kubernetes(KubernetesSource),
    /// Kubernetes mode without kube-proxy replacement: no Services are programmed.
    None,
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File(s) => s.describe(),
            Source::Kubernetes(s) => s.describe(),
            Source::None => "none (kube-proxy replacement off)".into(),
        }
    }
}

/// Answers the guests' DHCP, queued by the guest programs.
async fn serve_dhcp(ring: aya::maps::RingBuf<aya::maps::MapData>, node: SharedNode) -> Result<()> {
    // SAFETY: the RingBuf owns its fd and moves into the AsyncFd.
    let mut fd =
        unsafe { tokio::io::unix::AsyncFd::register(ring) }.context("polling the DHCP queue")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<DhcpFrame>() {
                // SAFETY: the guest program writes whole DhcpFrames; the length was checked.
                let frame: DhcpFrame =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DhcpFrame) };
                node.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .endpoints
                    .handle_dhcp(&frame);
            }
        }
        guard.clear_ready();
    }
}

/// Programs every new desired state; records failures without touching the last good state.
async fn reconcile_loop(
    node: SharedNode,
    mut updates: watch::Receiver<Arc<DesiredState>>,
    mut status: watch::Receiver<SourceStatus>,
) -> Result<()> {
    let mut status_open = true;
    loop {
        tokio::select! {
            changed = updates.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let desired = updates.borrow_and_update().clone();
                let mut guard = node.lock().unwrap_or_else(|p| p.into_inner());
                let n = &mut *guard;
                match n.reconciler.apply(&mut n.datapath.maps, &desired) {
                    Ok(_) => {
                        n.generation += 1;
                        n.apply_error = None;
                        if n.generation == 1 {
                            info!(services = desired.services.len(), "ready");
                        }
                    }
                    Err(e) => {
                        let msg = format!("programming the desired state: {e:#}");
                        warn!("{msg}");
                        n.apply_error = Some(msg);
                    }
                }
            }
            changed = status.changed(), if status_open => {
                if changed.is_err() {
                    status_open = false;
                    continue;
                }
                let s = status.borrow_and_update().clone();
                node.lock().unwrap_or_else(|p| p.into_inner()).source = s;
            }
        }
    }
}
