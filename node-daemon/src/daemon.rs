//! A running tapestryd: loads or adopts the datapath, restores its state, and runs its tasks
//! until it is told to stop.
//!
//! | task | room | what |
//! |---|---|---|
//! | state source | `services::source`, `services::endpointslice` | desired states on a `watch` |
//! | reconciler | `services` | keeps the Service maps equal to the desired state |
//! | Guest publisher | `guests::publish` | Kubernetes mode: this node's Guests |
//! | pod discovery | `guests::discover` | Kubernetes mode: this node's pods that have no endpoint |
//! | DHCP | `guests` | answers guests' DHCP from the guest programs' ring |
//! | readiness | `guests` | tells the publisher when the datapath sees a guest's first packet |
//! | conntrack GC | `datapath::conntrack` | removes expired entries |
//! | flow events | `flows` | drains the datapath's ring into the flow log |
//! | API, metrics | `api` | the local API and Prometheus |
//!
//! The datapath stays attached and pinned when the daemon stops: flows keep flowing while no
//! daemon runs, and the next start adopts everything. `tapestryd --uninstall` removes it.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use tapestry_api::{state::DesiredState, types::Mode};
use tapestry_common::{Config as DatapathConfig, config_flags};
use tokio::{signal::unix::SignalKind, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{
    api,
    config::{Config, Source},
    datapath::{Datapath, LoadOptions, Maps, Pins, conntrack, host, node_addrs},
    flows::{self, FlowLog},
    guests::{self, Endpoints, discover, endpoints, publish},
    services::{
        self, Services,
        endpointslice::KubernetesSource,
        reconcile::Reconciler,
        source::{SourceStatus, StandaloneFile, StateSource},
    },
    views::{self, Views},
};

/// What the API's handlers share. Cloning copies `Arc`s; nothing here is behind one lock.
#[derive(Clone)]
pub struct Node {
    pub services: Arc<Services>,
    pub endpoints: Arc<Endpoints>,
    pub views: Arc<Views>,
    pub pins: Pins,
    /// Kubernetes mode's client: a migration target's ADD reads its source's Guest.
    pub kube: Option<kube::Client>,
}

/// The configured desired-state source.
enum StateSourceKind {
    File(StandaloneFile),
    Kubernetes(KubernetesSource),
    /// Kubernetes mode without kube-proxy replacement: no Services are programmed.
    None,
}

impl StateSourceKind {
    fn describe(&self) -> String {
        match self {
            StateSourceKind::File(s) => s.describe(),
            StateSourceKind::Kubernetes(s) => s.describe(),
            StateSourceKind::None => "none (kube-proxy replacement off)".into(),
        }
    }

    async fn run(
        self,
        updates: watch::Sender<Arc<DesiredState>>,
        status: watch::Sender<SourceStatus>,
    ) -> Result<()> {
        match self {
            StateSourceKind::File(s) => s.run(updates, status).await,
            StateSourceKind::Kubernetes(s) => s.run(updates, status).await,
            StateSourceKind::None => {
                // Keep the channels open: the reconciler waits, the datapath's services stay.
                let _keep = (updates, status);
                std::future::pending().await
            }
        }
    }
}

/// Removes every pin (the datapath detaches from every interface, the maps go).
pub fn uninstall(bpffs_dir: &Path) -> Result<()> {
    Datapath::unpin_all(bpffs_dir)?;
    info!(bpffs_dir = %bpffs_dir.display(), "datapath removed");
    Ok(())
}

/// Runs the daemon until SIGINT or SIGTERM, or until a task fails.
pub async fn run(config: Config) -> Result<()> {
    // The node's own sockets reach frontends where this daemon programs Services (not with
    // `--kube-proxy-replacement=false`, where kube-proxy serves them).
    let host_services = config.host_services.as_ref().filter(|_| {
        !matches!(
            config.source,
            Source::Kubernetes {
                kube_proxy_replacement: false,
                ..
            }
        )
    });
    let mut datapath = Datapath::load_with(
        &config.bpffs_dir,
        LoadOptions {
            ct_share: config.conntrack_share,
            host_netns_cookie: match host_services {
                Some(_) => host::netns_cookie()?,
                None => 0,
            },
            nodeport_range: config.nodeport_range,
        },
    )?;

    match host_services {
        Some(h) => datapath.attach_host(&host::cgroup2_root(h.cgroup_root.as_deref())?)?,
        None => {
            if datapath.detach_host()? {
                info!("host services off: the node's sockets no longer reach frontends");
            }
        }
    }
    let pins = datapath.pins().clone();
    let node_name = match &config.source {
        Source::Kubernetes { node_name, .. } => Some(node_name.clone()),
        Source::File(_) => views::hostname(),
    };
    let reconciler = Reconciler::restore(&datapath.maps)?
        .with_nodeport_range(config.nodeport_range)
        .with_external_interfaces(!config.nodeport_interfaces.is_empty())
        .with_node_name(node_name);
    // The adopted datapath keeps serving its node ports until the first desired state.
    let mut flags = 0;
    if config.flow_events {
        flags |= config_flags::FLOW_EVENTS;
    }
    if config.fast_path {
        flags |= config_flags::FAST_PATH;
        info!("fast path on: Service traffic skips the node's stack and its netfilter");
    }
    if reconciler.wants_node_addrs() {
        flags |= config_flags::NODE_ADDRS;
    }
    if reconciler.wants_local_replies() {
        flags |= config_flags::LOCAL_REPLIES;
    }
    datapath.set_config(DatapathConfig {
        flags,
        hairpin_snat_ip: u32::from_ne_bytes(config.hairpin_snat_ip.octets()),
    })?;
    // The node's addresses before any desired state is programmed: a node port must answer as
    // soon as the state that has it is reported programmed.
    let mut node_addrs_map = Maps::open(datapath.pin_dir())?.node_addrs;
    node_addrs::sync(&mut node_addrs_map).context("the node's addresses")?;
    let adopted = pins.adopt_links()?;
    if !adopted.is_empty() {
        info!(
            count = adopted.len(),
            "re-attached to the interfaces of the previous run"
        );
    }
    // Every interface runs this version's programs now, which count what they create.
    datapath
        .maps
        .conntrack
        .start_accounting()
        .context("the conntrack tables' accounting")?;
    let external = pins.attach_network(&config.nodeport_interfaces)?;
    if !external.is_empty() {
        info!(
            interfaces = ?config.nodeport_interfaces,
            "clients outside the node reach node ports through these"
        );
    }
    for ifname in &config.attach {
        pins.attach(ifname)
            .with_context(|| format!("--attach {ifname}"))?;
        info!(ifname, "attached");
    }
    let mut registry =
        Endpoints::new(&config.state_dir, pins.clone())?.with_dhcp_limit(config.dhcp_limit);
    if matches!(config.source, Source::Kubernetes { .. }) {
        registry = registry.with_live_readiness();
    }
    let endpoints = Arc::new(registry);
    endpoints.restore()?;
    let events = datapath.take_events();
    let dhcp_ring = datapath.take_dhcp();
    let flows = Arc::new(FlowLog::default());

    let mut health_checks = None;
    let (kube, source) = match &config.source {
        Source::File(path) => (None, StateSourceKind::File(StandaloneFile::new(path))),
        Source::Kubernetes {
            node_name,
            kubeconfig,
            kube_proxy_replacement,
        } => {
            let client = tapestry_k8s::client(kubeconfig.as_deref()).await?;
            let source = if *kube_proxy_replacement {
                let (tx, rx) = watch::channel(Vec::new());
                health_checks = Some(rx);
                StateSourceKind::Kubernetes(
                    KubernetesSource::new(client.clone(), node_name).with_health_checks(tx),
                )
            } else {
                StateSourceKind::None
            };
            (Some((client, node_name.clone())), source)
        }
    };
    let services = Arc::new(Services::new(reconciler.snapshot(), source.describe()));
    let views = Arc::new(Views::new(
        if kube.is_some() {
            Mode::Kubernetes
        } else {
            Mode::Standalone
        },
        config.flow_events,
        services.clone(),
        endpoints.clone(),
        pins.clone(),
        flows.clone(),
    )?);
    let node = Node {
        services: services.clone(),
        endpoints: endpoints.clone(),
        views,
        pins: pins.clone(),
        kube: kube.as_ref().map(|(c, _)| c.clone()),
    };

    let (updates_tx, updates_rx) = watch::channel(Arc::new(DesiredState::default()));
    let (status_tx, status_rx) = watch::channel(SourceStatus::default());
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        source
            .run(updates_tx, status_tx)
            .await
            .context("state source")
    });
    // The reconciler's own map handles: it is their only writer.
    let reconciler_maps = Maps::open(pins.dir())?;
    if let Some(rx) = health_checks {
        let services = services.clone();
        tasks.spawn(async move {
            services::health::serve(services, rx).await;
            Ok(())
        });
    }
    tasks.spawn(services::run_reconciler(
        services,
        reconciler,
        reconciler_maps,
        updates_rx,
        status_rx,
    ));
    if let Some((client, node_name)) = kube {
        tasks.spawn(discover::discover_pods(
            client.clone(),
            node_name.clone(),
            endpoints.clone(),
        ));
        tasks.spawn(guests::migration::follow_migrations(
            client.clone(),
            node_name.clone(),
            endpoints.clone(),
        ));
        tasks.spawn(publish::publish_guests(
            client,
            node_name,
            endpoints.clone(),
        ));
        tasks.spawn(guests::probe::run_probes(
            endpoints.clone(),
            config.guest_probe,
        ));
    }
    tasks.spawn(guests::watch_readiness(endpoints.clone()));
    tasks.spawn(maintain_endpoints(endpoints.clone()));
    {
        let node = node.clone();
        let socket = config.socket.clone();
        let access = api::SocketAccess {
            group: config.api_socket_group,
        };
        tasks.spawn(async move { api::serve_unix(&socket, access, node).await });
    }
    if let Some(addr) = config.metrics_addr.clone() {
        let node = node.clone();
        tasks.spawn(async move { api::serve_tcp(&addr, node).await });
    }
    if let Some(ring) = events {
        tasks.spawn(flows::drain(ring, flows));
    }
    if let Some(ring) = dhcp_ring {
        tasks.spawn(guests::serve_dhcp(ring, endpoints.clone()));
    }
    tasks.spawn(keep_node_addrs(node_addrs_map));
    tasks.spawn(collect_conntrack_garbage(
        Maps::open(pins.dir())?.conntrack,
        config.conntrack_gc_interval,
    ));

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
    let _ = std::fs::remove_file(&config.socket);
    // Guests' DHCP bindings not written yet (they are written at most once a FLUSH_INTERVAL).
    if let Err(e) = endpoints.flush() {
        warn!(error = %format!("{e:#}"), "writing the endpoint registry at shutdown");
    }
    info!("stopped; the datapath stays in place");
    result
}

/// How often the node's addresses are read again for the node ports.
const NODE_ADDRS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps `TAPESTRY_NODE_ADDRS` equal to the namespace's addresses (node ports answer on them).
async fn keep_node_addrs(mut map: aya::maps::HashMap<aya::maps::MapData, u32, u8>) -> Result<()> {
    let mut tick = tokio::time::interval(NODE_ADDRS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = node_addrs::sync(&mut map) {
            warn!(error = %format!("{e:#}"), "reading the node's addresses");
        }
    }
}

/// Writes the guests' DHCP binding changes to the registry file at most once per
/// [`endpoints::FLUSH_INTERVAL`], and removes the endpoints whose host interface is
/// gone every [`endpoints::STALE_CHECK_INTERVAL`] (a DEL that never reached the daemon).
async fn maintain_endpoints(endpoints: Arc<Endpoints>) -> Result<()> {
    let mut tick = tokio::time::interval(endpoints::FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_stale_check = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let check_stale = last_stale_check.elapsed() >= endpoints::STALE_CHECK_INTERVAL;
        if check_stale {
            last_stale_check = tokio::time::Instant::now();
        }
        let endpoints = endpoints.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = endpoints.flush() {
                warn!(error = %format!("{e:#}"), "writing the endpoint registry");
            }
            if check_stale && let Err(e) = endpoints.remove_stale() {
                warn!(error = %e, "removing endpoints whose interface is gone");
            }
        })
        .await
        .context("the endpoint maintenance thread")?;
    }
}

/// Deletes expired conntrack entries every `every` (the LRU only evicts when full), on a
/// blocking thread with its own map handle.
async fn collect_conntrack_garbage(
    map: conntrack::Tables,
    every: std::time::Duration,
) -> Result<()> {
    let mut map = Some(map);
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut m = map.take().expect("returned after each round");
        let (m, n) = tokio::task::spawn_blocking(move || {
            let n = conntrack::collect_garbage(&mut m);
            (m, n)
        })
        .await
        .context("the conntrack GC thread")?;
        map = Some(m);
        if n > 0 {
            debug!(removed = n, "conntrack garbage collected");
        }
    }
}
