//! Pods that were there first: pods plumbed before Tapestry was installed, or while its daemon
//! was away (a DaemonSet rolling), have no endpoint, so nothing attached the Service datapath to
//! their host-side interface and they would lose every ClusterIP. In Kubernetes mode the daemon
//! watches this node's pods (`spec.nodeName`, not hostNetwork) and registers each pod IP that no
//! endpoint holds, as CNI ADD would, on the interface that pod IP is reached through:
//! - routed primaries (ptp, Calico, Cilium's routing): the `/32` route to the pod IP leaves
//!   through the pod's host-side veth;
//! - bridge primaries (bridge, Flannel): the neighbour entry of the pod IP gives its MAC, and the
//!   bridge's forwarding database the port (the pod's veth) that MAC is behind. A pod that has
//!   not talked yet has no neighbour entry: a datagram to its discard port makes the kernel ARP
//!   for it, and the next pass finds it.
//!
//! A discovered endpoint belongs to the network [`NETWORK`]; a later CNI ADD for the same host
//! interface replaces it, and it goes when its pod goes. VM pods are not discovered (their tap
//! and guest programs need the plugin); standalone mode names existing interfaces with
//! `--attach`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        link::{InfoKind, LinkAttribute, LinkInfo},
        neighbour::{NeighbourAddress, NeighbourAttribute},
        route::{RouteAddress, RouteAttribute},
    },
};
use tapestry_api::types::{EndpointRequest, PodRef};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use super::Endpoints;

/// The network of discovered endpoints (CNI GC of any other network leaves them alone).
pub const NETWORK: &str = "tapestry-discovered";
/// Pod IPs still without an interface are looked for again this often.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// The pod interface name discovered endpoints carry (the pod side is not looked at).
const POD_IFNAME: &str = "eth0";

/// A pod of this node as discovery needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ip: Ipv4Addr,
}

impl PodFacts {
    /// A running or starting pod on the pod network with an IPv4 address.
    pub fn of(pod: &Pod) -> Option<PodFacts> {
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) || pod.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let ip = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .chain(status.pod_ip.as_deref())
            .find_map(|ip| ip.parse::<Ipv4Addr>().ok())?;
        Some(PodFacts {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            uid: pod.metadata.uid.clone()?,
            ip,
        })
    }

    fn container_id(&self) -> String {
        format!("discovered-{}", self.uid)
    }
}

/// Kubernetes mode: follows this node's pods and keeps one discovered endpoint per pod that
/// has no other.
pub async fn discover_pods(
    client: Client,
    node_name: String,
    endpoints: Arc<Endpoints>,
) -> Result<()> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("netlink for pod discovery")?;
    tokio::spawn(connection);
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut pods: BTreeMap<String, PodFacts> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, PodFacts>> = None;
    let mut synced = false;
    // Pod IPs left without an interface by the last pass: only they need the retry tick.
    let mut pending = false;
    let mut tick = tokio::time::interval(RETRY_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let mut dirty = false;
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { anyhow::bail!("the pod watch ended") };
                match event {
                    Ok(watcher::Event::Init) => listing = Some(BTreeMap::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(l), Some(uid), Some(f)) =
                            (listing.as_mut(), pod.metadata.uid.clone(), PodFacts::of(&pod))
                        {
                            l.insert(uid, f);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        pods = listing.take().unwrap_or_default();
                        synced = true;
                        dirty = true;
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        if let Some(uid) = pod.metadata.uid.clone() {
                            match PodFacts::of(&pod) {
                                Some(f) => { pods.insert(uid, f); }
                                None => { pods.remove(&uid); }
                            }
                            dirty = true;
                        }
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(uid) = &pod.metadata.uid {
                            pods.remove(uid);
                            dirty = true;
                        }
                    }
                    Err(e) => warn!(error = %e, "pod watch (retrying)"),
                }
            }
            _ = tick.tick() => dirty = synced && pending,
        }
        if !dirty || !synced {
            continue;
        }
        let wanted: Vec<PodFacts> = pods.values().cloned().collect();
        let interfaces = match host_interfaces(&handle).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = format!("{e:#}"), "reading routes and neighbours");
                continue;
            }
        };
        let endpoints = endpoints.clone();
        let unresolved =
            tokio::task::spawn_blocking(move || sync(&endpoints, &wanted, &interfaces)).await?;
        pending = !unresolved.is_empty();
        // Bridge primaries: make the kernel resolve pods it has no neighbour entry for.
        for ip in unresolved {
            if let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
                let _ = s.send_to(b"", (ip, 9));
            }
        }
    }
}

/// One pass: registers pods without an endpoint, removes discovered endpoints whose pod is gone
/// (or moved to another address). Returns the pod IPs whose interface is not known yet.
pub fn sync(
    endpoints: &Endpoints,
    pods: &[PodFacts],
    interfaces: &HashMap<Ipv4Addr, String>,
) -> Vec<Ipv4Addr> {
    let registered = endpoints.list();
    let wanted: BTreeSet<String> = pods.iter().map(PodFacts::container_id).collect();
    for ep in &registered {
        let r = &ep.request;
        if r.network.as_deref() == Some(NETWORK) && !wanted.contains(&r.container_id) {
            match endpoints.remove(&r.container_id, &r.ifname) {
                Ok(_) => info!(
                    host_ifname = r.host_ifname,
                    container = r.container_id,
                    "discovered endpoint removed: its pod is gone"
                ),
                Err(e) => {
                    warn!(container = r.container_id, error = %e, "removing a discovered endpoint")
                }
            }
        }
    }
    let covered: BTreeSet<Ipv4Addr> = registered
        .iter()
        .filter(|ep| {
            ep.request.network.as_deref() != Some(NETWORK)
                || wanted.contains(&ep.request.container_id)
        })
        .flat_map(|ep| ep.request.ips.iter())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect();
    let mut unresolved = Vec::new();
    for pod in pods.iter().filter(|p| !covered.contains(&p.ip)) {
        let Some(host_ifname) = interfaces.get(&pod.ip) else {
            debug!(pod = pod.name, ip = %pod.ip, "no host interface for the pod IP yet");
            unresolved.push(pod.ip);
            continue;
        };
        let request = EndpointRequest {
            container_id: pod.container_id(),
            ifname: POD_IFNAME.into(),
            netns: String::new(),
            host_ifname: host_ifname.clone(),
            ips: vec![format!("{}/32", pod.ip)],
            gateway: None,
            mac: None,
            pod: Some(PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: Some(pod.uid.clone()),
            }),
            vm: None,
            network: Some(NETWORK.into()),
        };
        match endpoints.add(request) {
            Ok(_) => info!(
                pod = format!("{}/{}", pod.namespace, pod.name),
                ip = %pod.ip,
                host_ifname,
                "discovered a pod without an endpoint; attached"
            ),
            Err(e) => warn!(pod = pod.name, error = %e, "registering a discovered pod"),
        }
    }
    unresolved
}

/// Pod IP -> the host-side interface (a veth) it is reached through, in the daemon's network
/// namespace: `/32` routes out of a veth, then bridge ports by neighbour MAC and FDB.
pub async fn host_interfaces(handle: &Handle) -> Result<HashMap<Ipv4Addr, String>> {
    let mut links: HashMap<u32, (String, bool)> = HashMap::new();
    let mut stream = handle.link().get().execute();
    while let Some(link) = stream.try_next().await.context("listing links")? {
        let mut name = None;
        let mut veth = false;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    veth |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        if let Some(name) = name {
            links.insert(link.header.index, (name, veth));
        }
    }
    let veth_name = |index: u32| {
        links
            .get(&index)
            .and_then(|(name, veth)| veth.then(|| name.clone()))
    };

    let mut found = HashMap::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes.try_next().await.context("listing routes")? {
        if route.header.destination_prefix_length != 32 {
            continue;
        }
        let mut dst = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if let (Some(dst), Some(name)) = (dst, oif.and_then(veth_name)) {
            found.insert(dst, name);
        }
    }

    // Bridge ports: MAC -> port from the forwarding database, IP -> MAC from the neighbours.
    let mut ports: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut fdb = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    while let Some(entry) = fdb.try_next().await.context("listing the bridge FDB")? {
        for attr in &entry.attributes {
            if let NeighbourAttribute::LinkLayerAddress(mac) = attr {
                ports.insert(mac.clone(), entry.header.ifindex);
            }
        }
    }
    let mut neighbours = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(n) = neighbours.try_next().await.context("listing neighbours")? {
        let mut ip = None;
        let mut mac = None;
        for attr in &n.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                NeighbourAttribute::LinkLayerAddress(m) => mac = Some(m.clone()),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac)
            && let Some(name) = ports.get(&mac).copied().and_then(veth_name)
        {
            found.entry(ip).or_insert(name);
        }
    }
    Ok(found)
}
