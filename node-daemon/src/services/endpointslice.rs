//! Kubernetes mode's Service source: the desired state from Services and EndpointSlices.
//!
//! [`KubernetesSource`] watches every Service and every EndpointSlice (whoever manages it: the
//! built-in controller's pod slices, tapestry-controller's guest slices, anyone's hand-written
//! ones) and turns them into the same [`DesiredState`] a standalone file gives, so the reconciler
//! programs the datapath the same way: a kube-proxy replacement for pods and VM guests alike.
//!
//! What it takes from a Service, as kube-proxy does: every IPv4 cluster IP, each TCP/UDP port
//! (SCTP and IPv6 are not in the datapath), `sessionAffinity: ClientIP` with its timeout,
//! `internalTrafficPolicy: Local`, `externalTrafficPolicy: Local` on the node port and external
//! frontends (the reconciler keeps their local-only backends, those whose `nodeName` is this
//! node, for clients outside) and, for a LoadBalancer Service with it, the `healthCheckNodePort`
//! (see [`health_checks`], served by `health`); headless and ExternalName Services are left
//! out. The
//! `tapestry.dev/lb-algorithm` annotation (`random`, `maglev`) chooses the selection. Endpoints
//! are ready ones; when a port has none, serving-and-terminating ones take new flows (kube-proxy's
//! fallback); other terminating ones keep their flows and get no new ones. When two slices list
//! the same address and port, the tapestry-managed one wins: its readiness is the guest's own.
//!
//! Each backend says where it is (for display; the datapath treats them all alike): its node, the
//! endpoint's `nodeName`, and its kind. A `Pod` target is a pod (a `Guest` target a VM); an
//! endpoint without one (or with another kind of target) is a host when its address is one of a
//! Node's `status.addresses` (a host-network server; its node is that Node unless `nodeName` says
//! otherwise), or when it is the `kubernetes` Service's in `default` (the apiserver), and
//! external otherwise (an address outside the cluster). Node addresses come from a third watch,
//! of Nodes, reduced to their names and addresses.
//!
//! Nothing is published until the watches of Services and EndpointSlices have listed once (and
//! the one of Nodes, unless it fails: kinds are display only, so a daemon that may not read
//! Nodes still balances, calling host endpoints external), so a daemon that starts while the
//! apiserver is down leaves the datapath it adopted untouched; while the apiserver is away the
//! last state stays in force and `tapestry status` says why; after the watches re-list, the
//! state is published again, and the reconciler writes only the difference. A failed watch
//! retries every 5 s at most (10 with jitter), and resumes from its resource version, so the
//! changes made meanwhile arrive as soon as it is back; the status stops saying the API is
//! unreachable once the watch has stopped failing for longer than a retry takes and a list of
//! its kind answers (an apiserver that hangs instead of refusing stays unreachable).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail};
use futures::{StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Node, NodeStatus, Service},
    discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, reflector, utils::ResetTimerBackoff, watcher},
};
use tapestry_api::state::{
    Algorithm, BackendSpec, DesiredState, EndpointKind, Protocol, ServiceSpec, SessionAffinity,
    TrafficPolicy,
};
use tapestry_k8s::names;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    health::HealthCheck,
    source::{Publisher, SourceStatus, StateSource},
};

/// Service annotation choosing the backend selection (`random` or `maglev`).
pub const LB_ALGORITHM_ANNOTATION: &str = "tapestry.dev/lb-algorithm";

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// How long a burst of watch events is collected before the state is rebuilt once.
const COALESCE: Duration = Duration::from_millis(20);

/// A failing watch retries after 0.8 s, doubling up to [`RETRY_MAX`], each wait with up to as
/// much again of jitter; the backoff starts over once a watch has run for two minutes. kube's
/// default goes up to 30 s (60 with jitter): after a minute's outage, the maps caught up with
/// the API only a minute after it was back (measured by tapestry-reliability's
/// apiserver_outage round).
const RETRY_MIN: Duration = Duration::from_millis(800);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A watch that resumes after a failure says nothing (it starts watching again from its
/// resource version, with no event until an object changes), while every failed retry is an
/// error, at most twice [`RETRY_MAX`] apart when the apiserver refuses. A failing watch quiet
/// for longer has resumed, or hangs on an apiserver that does not answer: a list of its kind,
/// within [`PROBE_TIMEOUT`], tells which.
const RESUMED_AFTER: Duration = Duration::from_secs(11);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The watches' backoff ([`RETRY_MIN`], [`RETRY_MAX`]).
fn retry() -> ResetTimerBackoff<watcher::ExponentialBackoff> {
    let exponential = backon::ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(exponential.into(), Duration::from_secs(120))
}

/// The desired state from the Kubernetes API.
pub struct KubernetesSource {
    client: Client,
    node_name: String,
    health_checks: Option<watch::Sender<Vec<HealthCheck>>>,
}

impl KubernetesSource {
    pub fn new(client: Client, node_name: impl Into<String>) -> Self {
        KubernetesSource {
            client,
            node_name: node_name.into(),
            health_checks: None,
        }
    }

    /// Also publish the Services' health checks (`healthCheckNodePort`) with each state.
    pub fn with_health_checks(mut self, tx: watch::Sender<Vec<HealthCheck>>) -> Self {
        self.health_checks = Some(tx);
        self
    }
}

/// What one watch event means to the source.
enum Seen {
    Changed,
    Listed,
    Failed(String),
}

fn seen<K>(which: u8) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> (u8, Seen) {
    move |ev| {
        let seen = match ev {
            Ok(watcher::Event::InitDone) => Seen::Listed,
            Ok(_) => Seen::Changed,
            Err(e) => Seen::Failed(e.to_string()),
        };
        (which, seen)
    }
}

const SERVICES: u8 = 1;
const SLICES: u8 = 2;
const NODES: u8 = 4;

/// Whether the API lists (one object of) what watch `which` watches.
async fn lists(client: Client, which: u8) -> kube::Result<()> {
    let one = kube::api::ListParams::default().limit(1);
    match which {
        SERVICES => Api::<Service>::all(client)
            .list_metadata(&one)
            .await
            .map(drop),
        SLICES => Api::<EndpointSlice>::all(client)
            .list_metadata(&one.labels(&SLICE_SELECTOR))
            .await
            .map(drop),
        _ => Api::<Node>::all(client).list_metadata(&one).await.map(drop),
    }
}

/// The `kubernetes` Service: its endpoints are the apiserver's own addresses.
const APISERVER_SERVICE: (&str, &str) = ("default", "kubernetes");

/// What the source keeps of a Node: its name and addresses (a Node's images and conditions are
/// most of its size, and a cluster may have thousands).
fn slim_node(node: &mut Node) {
    let addresses = node.status.take().and_then(|s| s.addresses);
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.metadata.labels = None;
    node.spec = None;
    node.status = Some(NodeStatus {
        addresses,
        ..NodeStatus::default()
    });
}

/// Which Node each node address belongs to (every IPv4 address in a Node's `status.addresses`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddresses(HashMap<Ipv4Addr, String>);

impl NodeAddresses {
    pub fn of(nodes: &[Arc<Node>]) -> Self {
        let mut by_ip = HashMap::new();
        for node in nodes {
            let name = node.name_any();
            let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
            for a in addresses.into_iter().flatten() {
                if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
                    by_ip.insert(ip, name.clone());
                }
            }
        }
        NodeAddresses(by_ip)
    }

    /// The Node that has `ip` among its addresses.
    pub fn node_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.0.get(&ip).map(String::as_str)
    }
}

impl StateSource for KubernetesSource {
    fn describe(&self) -> String {
        format!("kubernetes (node {})", self.node_name)
    }

    async fn run(
        self,
        updates: watch::Sender<Arc<DesiredState>>,
        status: watch::Sender<SourceStatus>,
    ) -> Result<()> {
        let describe = self.describe();
        let (services, svc_writer) = reflector::store::<Service>();
        let (slices, slice_writer) = reflector::store::<EndpointSlice>();
        let (nodes, node_writer) = reflector::store::<Node>();
        let svc_events = watcher(
            Api::<Service>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .backoff(retry())
        .reflect(svc_writer)
        .map(seen(SERVICES));
        let slice_events = watcher(
            Api::<EndpointSlice>::all(self.client.clone()),
            watcher::Config::default().labels(&SLICE_SELECTOR),
        )
        .backoff(retry())
        .reflect(slice_writer)
        .map(seen(SLICES));
        let node_events = watcher(
            Api::<Node>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .backoff(retry())
        .modify(slim_node)
        .reflect(node_writer)
        .map(seen(NODES));
        let mut events = std::pin::pin!(stream::select(
            stream::select(svc_events, slice_events),
            node_events
        ));

        let mut publisher = Publisher::new(describe.clone(), updates, status);
        publisher.set_node(&self.node_name);
        let mut listed = 0u8;
        let mut node_addresses = NodeAddresses::default();
        let mut published = false;
        // Each failing watch's last error, and when it came.
        let mut failing: HashMap<u8, (String, tokio::time::Instant)> = HashMap::new();
        let mut problems_logged: HashSet<String> = HashSet::new();
        let mut quiet_tick = tokio::time::interval(Duration::from_secs(1));
        quiet_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Probes of quiet failing watches: (watch, its error's time when asked, answered).
        let (probe_tx, mut probe_rx) =
            tokio::sync::mpsc::unbounded_channel::<(u8, tokio::time::Instant, bool)>();
        let mut probing = 0u8;
        info!(source = %describe, "watching Services, EndpointSlices and Nodes");
        loop {
            let first = tokio::select! {
                ev = events.next() => match ev {
                    Some(ev) => Some(ev),
                    None => bail!("{describe}: the watches ended"),
                },
                Some((which, asked_at, answered)) = probe_rx.recv() => {
                    probing &= !which;
                    // Not failed again meanwhile: its error is the one the probe was about.
                    let quiet = failing.get(&which).is_some_and(|(_, at)| *at == asked_at);
                    if !quiet {
                        continue;
                    }
                    if answered {
                        failing.remove(&which);
                        info!(source = %describe, watch = which, "Kubernetes API answers again: the failed watch is watching");
                        None
                    } else {
                        // Hanging, not refusing: still failing; asked again after another spell.
                        if let Some((_, at)) = failing.get_mut(&which) {
                            *at = tokio::time::Instant::now();
                        }
                        continue;
                    }
                }
                _ = quiet_tick.tick(), if !failing.is_empty() => {
                    for (&which, (_, at)) in &failing {
                        if probing & which == 0 && at.elapsed() >= RESUMED_AFTER {
                            probing |= which;
                            let (client, tx, at) = (self.client.clone(), probe_tx.clone(), *at);
                            tokio::spawn(async move {
                                let answered = tokio::time::timeout(PROBE_TIMEOUT, lists(client, which))
                                    .await
                                    .is_ok_and(|r| r.is_ok());
                                let _ = tx.send((which, at, answered));
                            });
                        }
                    }
                    continue;
                }
            };
            // Which watches saw a change (Nodes count only when their addresses changed).
            let mut touched = 0u8;
            let mut note = |(which, seen): (u8, Seen), listed: &mut u8, touched: &mut u8| match seen
            {
                Seen::Changed => {
                    failing.remove(&which);
                    *touched |= which;
                }
                Seen::Listed => {
                    failing.remove(&which);
                    *listed |= which;
                    *touched |= which;
                }
                Seen::Failed(e) => {
                    let at = tokio::time::Instant::now();
                    if failing.insert(which, (e.clone(), at)).is_none() {
                        warn!(source = %describe, error = %e, "Kubernetes API watch failed; the datapath keeps its state and the watch retries");
                    }
                }
            };
            if let Some(first) = first {
                note(first, &mut listed, &mut touched);
                // A burst (a rollout, a re-list) becomes one rebuild.
                let deadline = tokio::time::Instant::now() + COALESCE;
                while let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await {
                    match next {
                        Some(ev) => note(ev, &mut listed, &mut touched),
                        None => bail!("{describe}: the watches ended"),
                    }
                }
            }
            let unreachable: Vec<&str> = [SERVICES, SLICES]
                .iter()
                .filter_map(|w| failing.get(w).map(|(e, _)| e.as_str()))
                .collect();
            let error = (!unreachable.is_empty()).then(|| {
                format!(
                    "Kubernetes API unreachable ({}); the last state stays in force",
                    unreachable.join("; ")
                )
            });
            let node_error = failing.get(&NODES).map(|(e, _)| {
                format!(
                    "cannot watch Nodes ({e}); backends on node addresses are shown as external"
                )
            });
            let both = |error: Option<String>| match (error, node_error.clone()) {
                (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                (a, b) => a.or(b),
            };
            // Nodes only name backends' kinds: waited for, unless their watch fails.
            let nodes_settled = listed & NODES != 0 || failing.contains_key(&NODES);
            if listed & (SERVICES | SLICES) != SERVICES | SLICES || !nodes_settled {
                publisher.set_status(
                    both(error).or_else(|| Some("waiting for the first list of Services, EndpointSlices and Nodes; the datapath is left as it is".into())),
                    None,
                );
                continue;
            }
            let mut dirty = touched & (SERVICES | SLICES) != 0 || !published;
            if touched & NODES != 0 {
                // Every kubelet heartbeat is a Node event; only new addresses change the state.
                let now = NodeAddresses::of(&nodes.state());
                if now != node_addresses {
                    node_addresses = now;
                    dirty = true;
                }
            }
            if dirty {
                published = true;
                let (state, problems) = desired_state(
                    &services.state(),
                    &slices.state(),
                    &node_addresses,
                    &self.node_name,
                );
                for p in problems {
                    if problems_logged.insert(p.clone()) {
                        warn!(source = %describe, "{p}");
                    }
                }
                publisher.publish(state);
                if let Some(tx) = &self.health_checks {
                    let checks = health_checks(&services.state(), &slices.state(), &self.node_name);
                    tx.send_if_modified(|old| {
                        let changed = *old != checks;
                        *old = checks;
                        changed
                    });
                }
            }
            let loaded = error.is_none().then(SystemTime::now);
            publisher.set_status(both(error), loaded);
        }
    }
}

/// The desired state for the Services and EndpointSlices given; also the problems found (a
/// Service left out, and why), to be logged once each.
pub fn desired_state(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    nodes: &NodeAddresses,
    node_name: &str,
) -> (DesiredState, Vec<String>) {
    let by_service = slices_by_service(slices);
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for svc in services {
        let empty = Vec::new();
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let slices = by_service
            .get(&(ns.as_str(), name.as_str()))
            .unwrap_or(&empty);
        for spec in service_specs(svc, slices, nodes, node_name, &mut problems) {
            match spec.validate(&spec.name) {
                Ok(()) => out.push(spec),
                Err(e) => problems.push(format!("service {ns}/{name} left out: {e}")),
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    // An external IP is anyone's to write: two Services may claim the same address and port.
    // The first by name keeps it; the other is reported (ClusterIPs and node ports are unique
    // by allocation).
    let mut taken = HashMap::new();
    out.retain(|spec| match taken.entry(spec.frontend()) {
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(spec.name.clone());
            true
        }
        std::collections::hash_map::Entry::Occupied(o) => {
            problems.push(format!(
                "service {} left out: {}:{}/{} is already {}'s",
                spec.name,
                spec.vip,
                spec.port,
                spec.protocol,
                o.get()
            ));
            false
        }
    });
    (DesiredState { services: out }, problems)
}

/// The slices the daemon watches, as kube-proxy selects them: those of a Service, except
/// slices labelled headless or for another proxy (upstream's "should implement
/// service.kubernetes.io/headless" labels the slice, not the Service). A slice that gains such a
/// label leaves the watch.
static SLICE_SELECTOR: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{},!{},!{}",
        names::labels::SERVICE_NAME,
        names::labels::HEADLESS,
        names::labels::SERVICE_PROXY_NAME
    )
});

/// The IPv4 slices of each Service, by (namespace, name), without those [`SLICE_SELECTOR`]
/// leaves out.
fn slices_by_service(slices: &[Arc<EndpointSlice>]) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let labels = slice.labels();
        if slice.address_type != "IPv4"
            || labels.contains_key(names::labels::HEADLESS)
            || labels.contains_key(names::labels::SERVICE_PROXY_NAME)
        {
            continue;
        }
        let (Some(ns), Some(svc)) = (
            slice.metadata.namespace.as_deref(),
            slice.labels().get(names::labels::SERVICE_NAME),
        ) else {
            continue;
        };
        by_service
            .entry((ns, svc.as_str()))
            .or_default()
            .push(slice);
    }
    by_service
}

/// The health checks this node serves: one per LoadBalancer Service with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort` (kube-proxy's `NeedsHealthCheck`),
/// counting the Service's ready endpoints on this node, each address once whatever its ports
/// (kube-proxy's `LocalReadyEndpoints`). Services this proxy leaves alone have none.
pub fn health_checks(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    node_name: &str,
) -> Vec<HealthCheck> {
    let by_service = slices_by_service(slices);
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let labels = svc.labels();
        if spec.type_.as_deref() != Some("LoadBalancer")
            || spec.external_traffic_policy.as_deref() != Some("Local")
            || labels.contains_key(names::labels::SERVICE_PROXY_NAME)
            || labels.contains_key(names::labels::HEADLESS)
        {
            continue;
        }
        let Some(port) = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let mut local: HashSet<&str> = HashSet::new();
        for slice in by_service
            .get(&(namespace.as_str(), name.as_str()))
            .into_iter()
            .flatten()
        {
            for ep in &slice.endpoints {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if ready && ep.node_name.as_deref() == Some(node_name) {
                    local.extend(ep.addresses.iter().map(String::as_str));
                }
            }
        }
        out.push(HealthCheck {
            local_endpoints: local.len(),
            namespace,
            name,
            port,
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// One [`ServiceSpec`] per cluster IP and port of `svc`.
fn service_specs(
    svc: &Service,
    slices: &[&EndpointSlice],
    nodes: &NodeAddresses,
    node_name: &str,
    problems: &mut Vec<String>,
) -> Vec<ServiceSpec> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    // As kube-proxy: a Service another proxy serves, or marked headless, is not ours (upstream's
    // "should implement service.kubernetes.io/service-proxy-name" and ".../headless" specs).
    let labels = svc.labels();
    if labels.contains_key(names::labels::SERVICE_PROXY_NAME)
        || labels.contains_key(names::labels::HEADLESS)
    {
        return Vec::new();
    }
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_ref());
    }
    let vips: Vec<Ipv4Addr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    if vips.is_empty() {
        // Headless ("None"), not yet allocated, or IPv6 only.
        return Vec::new();
    }
    let algorithm = match svc.annotations().get(LB_ALGORITHM_ANNOTATION) {
        None => Algorithm::Random,
        Some(v) => v.parse().unwrap_or_else(|why| {
            problems.push(format!(
                "service {ns}/{name}: annotation {LB_ALGORITHM_ANNOTATION} {why}; using random"
            ));
            Algorithm::Random
        }),
    };
    let (session_affinity, timeout) = match spec.session_affinity.as_deref() {
        Some("ClientIP") => (
            SessionAffinity::ClientIP,
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT),
        ),
        _ => (SessionAffinity::None, DEFAULT_AFFINITY_TIMEOUT),
    };
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    // Only what is reached from outside has an external policy: the node port and external
    // frontends below, never the ClusterIPs.
    let external_policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let apiserver = (ns.as_str(), name.as_str()) == APISERVER_SERVICE;
    let place = Placement { nodes, apiserver };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let external = external_ips(svc, &vips);
    let mut out = Vec::new();
    for port in ports {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue, // SCTP: not in the datapath
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        let port_name = port.name.as_deref().unwrap_or_default();
        let backends = backends_for(slices, port_name, protocol, local_only, node_name, &place);
        let mut label = format!("{ns}/{name}");
        if ports.len() > 1 {
            label.push('/');
            if port_name.is_empty() {
                label.push_str(&number.to_string());
            } else {
                label.push_str(port_name);
            }
        }
        let spec_for =
            |name: String, vip: Ipv4Addr, port: u16, backends: Vec<BackendSpec>| ServiceSpec {
                name,
                vip,
                port,
                protocol,
                algorithm,
                session_affinity,
                session_affinity_timeout_seconds: timeout,
                external_traffic_policy: TrafficPolicy::Cluster,
                backends,
            };
        for (i, vip) in vips.iter().enumerate() {
            let name = match i {
                0 => label.clone(),
                _ => format!("{label}/{vip}"),
            };
            out.push(spec_for(name, *vip, number, backends.clone()));
        }
        // The frontends outside the ClusterIP: the node port on every node address, and the
        // external IPs. From pods and from the node itself these go to every endpoint whatever
        // the traffic policies, as kube-proxy short-circuits them to the Service's own chain;
        // with externalTrafficPolicy: Local, clients outside reach only this node's endpoints
        // (the reconciler's local table, from these backends' nodes).
        let node_port = port
            .node_port
            .filter(|_| matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")))
            .and_then(|p| u16::try_from(p).ok());
        if node_port.is_none() && external.is_empty() {
            continue;
        }
        let everywhere = if local_only {
            backends_for(slices, port_name, protocol, false, node_name, &place)
        } else {
            backends.clone()
        };
        let external_spec = |name: String, vip: Ipv4Addr, port: u16| ServiceSpec {
            external_traffic_policy: external_policy,
            ..spec_for(name, vip, port, everywhere.clone())
        };
        if let Some(np) = node_port {
            out.push(external_spec(
                format!("{label}/nodeport"),
                Ipv4Addr::UNSPECIFIED,
                np,
            ));
        }
        for ip in &external {
            out.push(external_spec(format!("{label}/external/{ip}"), *ip, number));
        }
    }
    out
}

/// A Service's addresses besides its ClusterIPs: `spec.externalIPs` and the load balancer's
/// `status.loadBalancer.ingress[].ip` (as MetalLB or a cloud writes it), IPv4, each once, none
/// that is also a ClusterIP.
fn external_ips(svc: &Service, vips: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let spec_ips = svc
        .spec
        .as_ref()
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .cloned();
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone());
    let mut out: Vec<Ipv4Addr> = Vec::new();
    for ip in spec_ips.chain(lb_ips) {
        if let Ok(ip) = ip.parse::<Ipv4Addr>()
            && !ip.is_unspecified()
            && !vips.contains(&ip)
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// The backends that `slices` give one Service port.
fn backends_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    local_only: bool,
    node_name: &str,
    place: &Placement,
) -> Vec<BackendSpec> {
    struct Candidate {
        backend: BackendSpec,
        ready: bool,
        serving: bool,
        usable: bool,
        ours: bool,
    }
    let mut found: BTreeMap<(Ipv4Addr, u16), Candidate> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| slice_port_matches(p, port_name, protocol))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        let ours = slice
            .labels()
            .get(names::labels::MANAGED_BY)
            .map(String::as_str)
            == Some(names::MANAGED_BY);
        for ep in &slice.endpoints {
            if local_only && ep.node_name.as_deref() != Some(node_name) {
                continue;
            }
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            // Not ready and not draining: no traffic at all. Still recorded, so that a guest's
            // own "not ready" hides its pod's "ready" from another slice.
            let usable = ready || terminating;
            let display = ep.target_ref.as_ref().and_then(|r| r.name.clone());
            for address in &ep.addresses {
                let Ok(ip) = address.parse::<Ipv4Addr>() else {
                    continue;
                };
                let (kind, node) = place.of(ep, ip);
                let candidate = Candidate {
                    backend: BackendSpec {
                        ip,
                        port: Some(target),
                        weight: 1,
                        name: display.clone(),
                        kind,
                        node,
                        terminating: !ready,
                    },
                    ready,
                    serving,
                    usable,
                    ours,
                };
                match found.get(&(ip, target)) {
                    Some(old) if (old.ours, old.ready) >= (candidate.ours, candidate.ready) => {}
                    _ => {
                        found.insert((ip, target), candidate);
                    }
                }
            }
        }
    }
    let any_ready = found.values().any(|c| c.ready);
    found
        .into_values()
        .filter(|c| c.usable)
        .map(|mut c| {
            if !any_ready && c.serving {
                c.backend.terminating = false;
            }
            c.backend
        })
        .collect()
}

/// What decides where a Service's endpoints are.
struct Placement<'a> {
    nodes: &'a NodeAddresses,
    /// The slices are the `kubernetes` Service's: its endpoints are the apiserver's addresses.
    apiserver: bool,
}

impl Placement<'_> {
    /// The kind and node of the endpoint `ep` at its address `ip`: a `Guest` target is a VM, a
    /// `Pod` target a pod, on the endpoint's `nodeName`; anything else is a host when `ip` is a
    /// Node's address (on that Node unless `nodeName` names one) or the apiserver's, and external
    /// when it is neither.
    fn of(&self, ep: &Endpoint, ip: Ipv4Addr) -> (EndpointKind, Option<String>) {
        let node = ep.node_name.clone();
        match ep.target_ref.as_ref().and_then(|r| r.kind.as_deref()) {
            Some(names::GUEST_KIND) => (EndpointKind::Vm, node),
            Some("Pod") => (EndpointKind::Pod, node),
            _ => match self.nodes.node_of(ip) {
                Some(owner) => (EndpointKind::Host, node.or_else(|| Some(owner.to_owned()))),
                None if self.apiserver => (EndpointKind::Host, node),
                None => (EndpointKind::External, node),
            },
        }
    }
}

fn slice_port_matches(p: &EndpointPort, port_name: &str, protocol: Protocol) -> bool {
    p.name.as_deref().unwrap_or_default() == port_name
        && p.protocol.as_deref().unwrap_or("TCP") == protocol.as_str()
}

/// A store that is handy in tests: reflect `objects` as a watch would.
#[cfg(test)]
fn store_of<K>(objects: Vec<K>) -> reflector::Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn service(v: serde_json::Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn slice(v: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn no_nodes() -> NodeAddresses {
        NodeAddresses::default()
    }

    fn web() -> Arc<Service> {
        service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))
    }

    fn pod_slice(name: &str, eps: serde_json::Value) -> Arc<EndpointSlice> {
        slice(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
            "endpoints": eps
        }))
    }

    #[test]
    fn node_ports_and_external_ips_are_frontends_of_every_endpoint() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10"], "externalIPs": ["192.0.2.7", "10.96.0.10"],
                     "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP",
                                "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}, {"ip": "192.0.2.7"},
                                                    {"hostname": "lb.example.com"}]}}
        }));
        let slices = vec![pod_slice(
            "web-1",
            json!([
                {"addresses": ["10.244.0.5"], "nodeName": "node-a", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.5"], "nodeName": "node-b", "conditions": {"ready": true}}
            ]),
        )];
        let (state, problems) = desired_state(&[svc], &slices, &no_nodes(), "node-a");
        assert!(problems.is_empty(), "{problems:?}");
        let got: Vec<(String, Ipv4Addr, u16, usize)> = state
            .services
            .iter()
            .map(|s| (s.name.clone(), s.vip, s.port, s.backends.len()))
            .collect();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            got,
            vec![
                // internalTrafficPolicy: Local keeps the ClusterIP to this node's endpoint.
                ("default/web".into(), ip("10.96.0.10"), 80, 1),
                (
                    "default/web/external/192.0.2.7".into(),
                    ip("192.0.2.7"),
                    80,
                    2
                ),
                (
                    "default/web/external/198.51.100.4".into(),
                    ip("198.51.100.4"),
                    80,
                    2
                ),
                (
                    "default/web/nodeport".into(),
                    Ipv4Addr::UNSPECIFIED,
                    30080,
                    2
                ),
            ]
        );
        assert!(state.services[3].is_node_port());
        for s in &state.services {
            s.validate(&s.name).unwrap();
        }
    }

    #[test]
    fn external_traffic_policy_local_is_on_the_node_port_and_external_frontends_only() {
        let svc = |policy: &str| {
            service(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                         "externalIPs": ["192.0.2.7"], "externalTrafficPolicy": policy,
                         "healthCheckNodePort": 32100,
                         "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}}
            }))
        };
        let slices = vec![pod_slice(
            "web-1",
            json!([
                {"addresses": ["10.244.0.5"], "nodeName": "node-a", "conditions": {"ready": true}},
                {"addresses": ["10.244.0.6"], "nodeName": "node-a", "conditions": {"ready": false}},
                {"addresses": ["10.244.1.5"], "nodeName": "node-b", "conditions": {"ready": true}}
            ]),
        )];
        let (state, problems) = desired_state(&[svc("Local")], &slices, &no_nodes(), "node-a");
        assert!(problems.is_empty(), "{problems:?}");
        let policies: Vec<(&str, TrafficPolicy)> = state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.external_traffic_policy))
            .collect();
        assert_eq!(
            policies,
            vec![
                ("default/web", TrafficPolicy::Cluster),
                ("default/web/external/192.0.2.7", TrafficPolicy::Local),
                ("default/web/external/198.51.100.4", TrafficPolicy::Local),
                ("default/web/nodeport", TrafficPolicy::Local),
            ]
        );
        // Every endpoint stays (pods and the node reach them all); each says its node, which
        // is what the reconciler's local set is made of.
        let np = &state.services[3];
        let nodes: Vec<(String, Option<&str>, bool)> = np
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.node.as_deref(), b.terminating))
            .collect();
        assert_eq!(
            nodes,
            vec![
                ("10.244.0.5".into(), Some("node-a"), false),
                ("10.244.1.5".into(), Some("node-b"), false),
            ]
        );
        let local = super::super::reconcile::local_backends(np, Some("node-a"));
        assert_eq!(
            local.iter().map(|b| b.ip.to_string()).collect::<Vec<_>>(),
            ["10.244.0.5"]
        );
        let (cluster, _) = desired_state(&[svc("Cluster")], &slices, &no_nodes(), "node-a");
        assert!(
            cluster
                .services
                .iter()
                .all(|s| s.external_traffic_policy == TrafficPolicy::Cluster)
        );

        // The health check: ready endpoints on this node, per node.
        let checks = |node: &str| health_checks(&[svc("Local")], &slices, node);
        assert_eq!(
            checks("node-a"),
            vec![HealthCheck {
                namespace: "default".into(),
                name: "web".into(),
                port: 32100,
                local_endpoints: 1
            }]
        );
        assert_eq!(checks("node-b")[0].local_endpoints, 1);
        assert_eq!(checks("node-c")[0].local_endpoints, 0);
        // Cluster policy, or not a LoadBalancer: no health check.
        assert!(health_checks(&[svc("Cluster")], &slices, "node-a").is_empty());
        let np_only = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100,
                     "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}
        }));
        assert!(health_checks(&[np_only], &slices, "node-a").is_empty());
    }

    #[test]
    fn a_health_check_counts_each_local_ready_address_once() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 32100,
                     "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                               {"name": "b", "port": 81, "nodePort": 30081}]}
        }));
        // The same address in two slices (two ports): one endpoint, as kube-proxy counts it.
        let slices = vec![
            pod_slice(
                "web-a",
                json!([{"addresses": ["10.244.0.5"], "nodeName": "node-a"},
                       {"addresses": ["10.244.0.7"], "nodeName": "node-a",
                        "conditions": {"ready": false, "serving": true, "terminating": true}}]),
            ),
            pod_slice(
                "web-b",
                json!([{"addresses": ["10.244.0.5"], "nodeName": "node-a",
                        "conditions": {"ready": true}}]),
            ),
        ];
        assert_eq!(
            health_checks(&[svc], &slices, "node-a")[0].local_endpoints,
            1
        );
    }

    #[test]
    fn a_clusterip_service_has_no_node_port_and_a_claimed_external_ip_stays_claimed() {
        let one = |name: &str, kind: &str| {
            service(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"type": kind, "clusterIP": format!("10.96.0.{}", name.len()),
                         "externalIPs": ["192.0.2.7"],
                         "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}
            }))
        };
        // A ClusterIP Service's stale nodePort field is not a node port.
        let (state, problems) = desired_state(
            &[one("a", "ClusterIP"), one("bb", "ClusterIP")],
            &[],
            &no_nodes(),
            "node-a",
        );
        let names: Vec<&str> = state.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["default/a", "default/a/external/192.0.2.7", "default/bb"]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("default/bb/external/192.0.2.7")
                && problems[0].contains("default/a/external/192.0.2.7"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_clusterip_service_with_pod_endpoints() {
        let slices = vec![pod_slice(
            "web-abc",
            json!([
                {"addresses": ["10.1.0.5"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "web-1"}, "nodeName": "a"},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": false, "serving": false}},
                {"addresses": ["10.1.0.7"]}
            ]),
        )];
        let (state, problems) = desired_state(&[web()], &slices, &no_nodes(), "a");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(state.services.len(), 1);
        let s = &state.services[0];
        assert_eq!(s.name, "default/web");
        assert_eq!(s.vip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!((s.port, s.protocol), (80, Protocol::Tcp));
        let ips: Vec<_> = s
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.port))
            .collect();
        assert_eq!(
            ips,
            [
                ("10.1.0.5".to_string(), Some(8080)),
                ("10.1.0.7".to_string(), Some(8080))
            ],
            "the unready endpoint is left out; no conditions means ready"
        );
        assert_eq!(s.backends[0].name.as_deref(), Some("web-1"));
        assert!(state.validate().is_ok());
    }

    fn node(name: &str, addresses: serde_json::Value) -> Arc<Node> {
        Arc::new(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.1.0.0/24"},
            "status": {"addresses": addresses,
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "images": [{"names": ["registry.k8s.io/pause:3.10"], "sizeBytes": 320000}]}
        }))
        .unwrap())
    }

    /// Two Nodes: `node-a` (192.168.1.10, and an external 203.0.113.10) and `node-b`
    /// (192.168.1.11).
    fn two_nodes() -> NodeAddresses {
        NodeAddresses::of(&[
            node(
                "node-a",
                json!([{"type": "InternalIP", "address": "192.168.1.10"},
                       {"type": "ExternalIP", "address": "203.0.113.10"},
                       {"type": "Hostname", "address": "node-a"}]),
            ),
            node(
                "node-b",
                json!([{"type": "InternalIP", "address": "192.168.1.11"}]),
            ),
        ])
    }

    /// (ip, kind, node) of the first service's backends.
    fn placed(state: &DesiredState) -> Vec<(String, EndpointKind, Option<&str>)> {
        state.services[0]
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.kind, b.node.as_deref()))
            .collect()
    }

    #[test]
    fn pods_and_guests_are_on_their_endpoints_node() {
        let slices = vec![pod_slice(
            "web-abc",
            json!([
                {"addresses": ["10.1.0.5"], "targetRef": {"kind": "Pod", "name": "web-1"},
                 "nodeName": "node-b"},
                {"addresses": ["10.1.0.6"], "targetRef": {"kind": "Pod", "name": "web-2"}},
                {"addresses": ["10.1.0.7"], "targetRef": {"kind": "Guest", "name": "vm-1"},
                 "nodeName": "node-a"},
                // A host-network pod: its address is its node's, but it is a pod.
                {"addresses": ["192.168.1.11"], "targetRef": {"kind": "Pod", "name": "hostnet"},
                 "nodeName": "node-b"}
            ]),
        )];
        let (state, problems) = desired_state(&[web()], &slices, &two_nodes(), "node-a");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            placed(&state),
            [
                ("10.1.0.5".into(), EndpointKind::Pod, Some("node-b")),
                ("10.1.0.6".into(), EndpointKind::Pod, None),
                ("10.1.0.7".into(), EndpointKind::Vm, Some("node-a")),
                ("192.168.1.11".into(), EndpointKind::Pod, Some("node-b")),
            ]
        );
        assert!(state.validate().is_ok());
    }

    #[test]
    fn the_kubernetes_services_endpoint_is_a_host() {
        let svc = service(json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.1",
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}
        }));
        // As the apiserver writes it: no target, no node.
        let apiserver = |ip: &str| {
            slice(json!({
                "metadata": {"name": "kubernetes", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "kubernetes"}},
                "addressType": "IPv4",
                "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]
            }))
        };
        // The apiserver outside every node (its own machine, as in the lab's fabric).
        let (state, _) = desired_state(
            std::slice::from_ref(&svc),
            &[apiserver("10.0.0.1")],
            &two_nodes(),
            "node-a",
        );
        assert_eq!(state.services[0].name, "default/kubernetes");
        assert_eq!(
            placed(&state),
            [("10.0.0.1".into(), EndpointKind::Host, None)]
        );
        // On a node (a control-plane node): that node's.
        let (state, _) =
            desired_state(&[svc], &[apiserver("192.168.1.10")], &two_nodes(), "node-a");
        assert_eq!(
            placed(&state),
            [("192.168.1.10".into(), EndpointKind::Host, Some("node-a"))]
        );
        // The same address behind a Service of another name or namespace is external.
        let other = service(json!({
            "metadata": {"name": "kubernetes", "namespace": "prod"},
            "spec": {"clusterIP": "10.96.0.2",
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP"}]}
        }));
        let mut sl = (*apiserver("10.0.0.1")).clone();
        sl.metadata.namespace = Some("prod".into());
        let (state, _) = desired_state(&[other], &[Arc::new(sl)], &two_nodes(), "node-a");
        assert_eq!(
            placed(&state),
            [("10.0.0.1".into(), EndpointKind::External, None)]
        );
    }

    #[test]
    fn an_endpoint_on_a_nodes_address_is_a_host_and_others_are_external() {
        let slices = vec![pod_slice(
            "web-manual",
            json!([
                // Any of a Node's addresses; its node unless nodeName says so.
                {"addresses": ["192.168.1.10"]},
                {"addresses": ["203.0.113.10"]},
                {"addresses": ["192.168.1.11"], "nodeName": "node-b"},
                // A target that is not a Pod (nor a Guest) on a node's address.
                {"addresses": ["192.168.1.11"], "targetRef": {"kind": "Node", "name": "node-b"}},
                // Off the cluster: no target, no node's address.
                {"addresses": ["198.51.100.7"]},
                {"addresses": ["10.1.0.9"], "targetRef": {"kind": "Machine", "name": "m-1"}}
            ]),
        )];
        let (state, problems) = desired_state(&[web()], &slices, &two_nodes(), "node-a");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            placed(&state),
            [
                ("10.1.0.9".into(), EndpointKind::External, None),
                ("192.168.1.10".into(), EndpointKind::Host, Some("node-a")),
                ("192.168.1.11".into(), EndpointKind::Host, Some("node-b")),
                ("198.51.100.7".into(), EndpointKind::External, None),
                ("203.0.113.10".into(), EndpointKind::Host, Some("node-a")),
            ]
        );
        // Without the Nodes' addresses (the watch may fail), they are all external.
        let (state, _) = desired_state(&[web()], &slices, &no_nodes(), "node-a");
        assert!(
            placed(&state)
                .iter()
                .all(|(_, k, _)| *k == EndpointKind::External),
            "{:?}",
            placed(&state)
        );
    }

    #[test]
    fn nodes_are_kept_as_names_and_addresses() {
        let mut n = (*node(
            "node-a",
            json!([{"type": "InternalIP", "address": "192.168.1.10"},
                   {"type": "InternalIP", "address": "fd00::10"}]),
        ))
        .clone();
        slim_node(&mut n);
        assert_eq!(n.spec, None);
        assert_eq!(n.metadata.labels, None);
        let status = n.status.clone().unwrap();
        assert_eq!(status.images, None);
        assert_eq!(status.conditions, None);
        assert_eq!(status.addresses.as_ref().map(Vec::len), Some(2));
        let addresses = NodeAddresses::of(&[Arc::new(n)]);
        assert_eq!(
            addresses.node_of(Ipv4Addr::new(192, 168, 1, 10)),
            Some("node-a")
        );
        assert_eq!(addresses.node_of(Ipv4Addr::new(192, 168, 1, 11)), None);
        assert_eq!(addresses.0.len(), 1, "IPv6 and host names are left out");
    }

    #[test]
    fn headless_externalname_and_ipv6_services_are_left_out() {
        let services = [
            service(json!({"metadata": {"name": "h", "namespace": "d"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})),
            service(json!({"metadata": {"name": "x", "namespace": "d"},
                "spec": {"type": "ExternalName", "externalName": "example.org"}})),
            service(json!({"metadata": {"name": "v6", "namespace": "d"},
                "spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10"], "ports": [{"port": 80}]}})),
            service(json!({"metadata": {"name": "sctp", "namespace": "d"},
                "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80, "protocol": "SCTP"}]}})),
        ];
        let (state, _) = desired_state(&services, &[], &no_nodes(), "a");
        assert!(state.services.is_empty(), "{:?}", state.services);
    }

    /// kube-proxy's two labels: a Service another proxy serves, or labelled headless although
    /// it has a cluster IP, is left alone; the same Service without them is served.
    #[test]
    fn services_labelled_for_another_proxy_or_headless_are_left_alone() {
        let with = |labels: serde_json::Value| {
            service(
                json!({"metadata": {"name": "web", "namespace": "default", "labels": labels},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                         "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
            )
        };
        let slices = [pod_slice(
            "web-1",
            json!([{"addresses": ["10.22.0.5"], "conditions": {"ready": true}}]),
        )];
        for labels in [
            json!({"service.kubernetes.io/service-proxy-name": "foo-bar"}),
            json!({"service.kubernetes.io/headless": ""}),
        ] {
            let (state, _) = desired_state(&[with(labels.clone())], &slices, &no_nodes(), "a");
            assert!(state.services.is_empty(), "{labels}: {:?}", state.services);
        }
        let (state, _) = desired_state(&[with(json!({"app": "web"}))], &slices, &no_nodes(), "a");
        assert_eq!(state.services.len(), 1);
    }

    /// The same labels on a slice (as upstream's headless spec puts them): kube-proxy's informer
    /// never sees that slice, so its endpoints are not the Service's; the other slices still are.
    #[test]
    fn slices_labelled_headless_or_for_another_proxy_are_not_endpoints() {
        let svc = service(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}));
        let labelled = |name: &str, ip: &str, label: &str| {
            let s = pod_slice(
                name,
                json!([{"addresses": [ip], "conditions": {"ready": true}}]),
            );
            let mut s = (*s).clone();
            s.metadata
                .labels
                .get_or_insert_default()
                .insert(label.to_string(), String::new());
            Arc::new(s)
        };
        let plain = pod_slice(
            "web-1",
            json!([{"addresses": ["10.22.0.5"], "conditions": {"ready": true}}]),
        );
        for label in [names::labels::HEADLESS, names::labels::SERVICE_PROXY_NAME] {
            let slices = [plain.clone(), labelled("web-2", "10.22.0.6", label)];
            let (state, _) = desired_state(std::slice::from_ref(&svc), &slices, &no_nodes(), "a");
            let ips: Vec<Ipv4Addr> = state.services[0].backends.iter().map(|b| b.ip).collect();
            assert_eq!(ips, vec![Ipv4Addr::new(10, 22, 0, 5)], "{label}");
        }
        assert_eq!(
            *SLICE_SELECTOR,
            "kubernetes.io/service-name,!service.kubernetes.io/headless,\
             !service.kubernetes.io/service-proxy-name"
        );
    }

    #[test]
    fn multi_port_services_match_slice_ports_by_name_and_protocol() {
        let svc = service(json!({
            "metadata": {"name": "dns", "namespace": "kube-system",
                         "annotations": {"tapestry.dev/lb-algorithm": "maglev"}},
            "spec": {"clusterIP": "10.96.0.53", "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}
        }));
        let sl = slice(json!({
            "metadata": {"name": "dns-1", "namespace": "kube-system",
                         "labels": {"kubernetes.io/service-name": "dns"}},
            "addressType": "IPv4",
            "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.1.0.9"]}]
        }));
        let (state, problems) = desired_state(&[svc], &[sl], &no_nodes(), "a");
        assert!(problems.is_empty());
        let by_name: HashMap<&str, &ServiceSpec> = state
            .services
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let udp = by_name["kube-system/dns/dns"];
        let tcp = by_name["kube-system/dns/dns-tcp"];
        assert_eq!(
            (udp.protocol, udp.backends[0].port),
            (Protocol::Udp, Some(5353))
        );
        assert_eq!(
            (tcp.protocol, tcp.backends[0].port),
            (Protocol::Tcp, Some(5354))
        );
        assert_eq!(udp.algorithm, Algorithm::Maglev);
        assert_eq!(udp.session_affinity, SessionAffinity::ClientIP);
        assert_eq!(udp.session_affinity_timeout_seconds, 60);
        assert!(state.validate().is_ok());
    }

    #[test]
    fn the_tapestry_slice_wins_for_an_address_listed_twice() {
        let ours = slice(json!({
            "metadata": {"name": "web-tapestry", "namespace": "default", "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": names::MANAGED_BY}},
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
            "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": false, "serving": false},
                           "targetRef": {"kind": "Guest", "name": "vm-1"}}]
        }));
        let theirs = pod_slice(
            "web-abc",
            json!([{"addresses": ["10.1.0.5"], "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": "vm-1"}}]),
        );
        // The pod is Ready but its guest is not: the guest's own readiness counts.
        let (state, _) = desired_state(&[web()], &[theirs.clone(), ours.clone()], &no_nodes(), "a");
        assert!(state.services[0].backends.is_empty());
        let (state, _) = desired_state(&[web()], &[ours, theirs], &no_nodes(), "a");
        assert!(state.services[0].backends.is_empty());
    }

    #[test]
    fn terminating_endpoints_drain_and_take_over_when_nothing_is_ready() {
        let sl = pod_slice(
            "web-abc",
            json!([
                {"addresses": ["10.1.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.1.0.6"], "conditions": {"ready": true}}
            ]),
        );
        let (state, _) = desired_state(&[web()], &[sl], &no_nodes(), "a");
        let b = &state.services[0].backends;
        assert_eq!(b.len(), 2);
        assert!(b[0].terminating && !b[1].terminating);
        let sl = pod_slice(
            "web-abc",
            json!([{"addresses": ["10.1.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true}}]),
        );
        let (state, _) = desired_state(&[web()], &[sl], &no_nodes(), "a");
        assert!(!state.services[0].backends[0].terminating);
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.10", "internalTrafficPolicy": "Local",
                     "ports": [{"port": 80, "protocol": "TCP"}]}
        }));
        let sl = pod_slice(
            "web-abc",
            json!([{"addresses": ["10.1.0.5"], "nodeName": "a"},
                   {"addresses": ["10.1.0.6"], "nodeName": "b"}]),
        );
        let (state, _) = desired_state(&[svc], &[sl], &no_nodes(), "a");
        let ips: Vec<_> = state.services[0].backends.iter().map(|b| b.ip).collect();
        assert_eq!(ips, [Ipv4Addr::new(10, 1, 0, 5)]);
    }

    #[test]
    fn a_bad_annotation_is_reported_and_the_service_still_works() {
        let svc = service(json!({
            "metadata": {"name": "web", "namespace": "default",
                         "annotations": {"tapestry.dev/lb-algorithm": "round-robin"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        }));
        let (state, problems) = desired_state(&[svc], &[], &no_nodes(), "a");
        assert_eq!(state.services.len(), 1);
        assert_eq!(state.services[0].algorithm, Algorithm::Random);
        assert!(problems[0].contains("round-robin"), "{problems:?}");
    }

    #[test]
    fn slices_of_other_services_and_families_are_ignored() {
        let other = slice(json!({
            "metadata": {"name": "db-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
            "endpoints": [{"addresses": ["10.1.0.8"]}]
        }));
        let v6 = slice(json!({
            "metadata": {"name": "web-v6", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv6", "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
            "endpoints": [{"addresses": ["fd00::8"]}]
        }));
        let other_ns = slice(json!({
            "metadata": {"name": "web-1", "namespace": "prod",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP", "name": ""}],
            "endpoints": [{"addresses": ["10.1.0.9"]}]
        }));
        let (state, _) = desired_state(&[web()], &[other, v6, other_ns], &no_nodes(), "a");
        assert!(state.services[0].backends.is_empty());
    }

    #[test]
    fn stores_feed_the_builder() {
        let services = store_of(vec![(*web()).clone()]);
        let slices = store_of(vec![
            (*pod_slice("web-abc", json!([{"addresses": ["10.1.0.5"]}]))).clone(),
        ]);
        let nodes = store_of(vec![
            (*node("a", json!([{"type": "InternalIP", "address": "10.1.0.5"}]))).clone(),
        ]);
        let (state, _) = desired_state(
            &services.state(),
            &slices.state(),
            &NodeAddresses::of(&nodes.state()),
            "a",
        );
        assert_eq!(
            placed(&state),
            [("10.1.0.5".into(), EndpointKind::Host, Some("a"))]
        );
    }
}
