//! Live migration between nodes (Kubernetes mode): a guest that QEMU moves from a VM pod on one
//! node to a VM pod on another keeps its address, its MAC and its connections.
//!
//! 1. **The target pod.** A VM pod annotated `tapestry.dev/migration-source: <source pod>` is a
//!    migration target. Its CNI ADD reaches [`prepare_target`], which reads the source's Guest
//!    (same namespace, pod-owned) and gives the target's guest the source's address and MAC:
//!    the endpoint's IP is the guest's although it belongs to the source node's pod CIDR, and
//!    the CNI result says so, so the kubelet reports it as the target pod's IP.
//! 2. **Dark until live.** Nothing routes the address to the target yet: QEMU's `-incoming`
//!    side sends nothing while the source runs. The target's guest program records the first
//!    frame the guest sends from the target's tap (QEMU's announce right after the switch-over);
//!    [`follow_migrations`] sees it within [`LIVE_POLL`], routes the address to the target pod's
//!    veth on this node at once, and records the switch-over in the target's Guest
//!    (`status.migration`, phase `Live`).
//! 3. **Every node follows.** Each daemon watches the Guests; for each address, the Guest with
//!    the newest switch-over says where it lives, and every other node routes that /32 to that
//!    node's InternalIP (nodes share one L2 segment or a routed underlay that carries /32s; a
//!    tunnel is not built). These routes carry the protocol [`RTPROT_TAPESTRY`], so the daemon
//!    finds and removes its own, and only its own.
//! 4. **The source's DEL removes nothing the target owns.** The source pod's CNI DEL detaches
//!    its endpoint; the address's /32 goes via the target node, not the source's veth, so it
//!    stays; no conntrack entry is flushed on DEL (a client's entry lives on the client's node,
//!    and names the backend by address); the target's Guest is its own object.
//!
//! A cancelled or failed migration never sends a frame from the target's tap: nothing moves,
//! and the target pod's deletion takes only its own endpoint.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::core::v1::{Node as K8sNode, Pod},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    },
};
use serde_json::json;
use tapestry_api::types::{EndpointRequest, MacAddr};
use tapestry_k8s::{Guest, GuestMigration, MigrationPhase, names};
use tracing::{info, warn};

use super::{EndpointError, Endpoints};
use crate::datapath::monotonic_ns;

/// The `rtm_protocol` of the routes this module installs (unassigned in iproute2's
/// rt_protos; `ip route show proto 116` lists them).
pub const RTPROT_TAPESTRY: u8 = 116;
/// How often a dark target's counters are read while a migration is incoming.
pub const LIVE_POLL: Duration = Duration::from_millis(2);
/// How soon a failed step (apiserver away, the Guest not written yet) is tried again.
const RETRY: Duration = Duration::from_millis(200);

/// Fills in a migration target's guest from its source's Guest: the address (with the prefix
/// the target's primary gave, one primary for all nodes) and the MAC, and the source's node.
/// `client` is None in standalone mode, which cannot migrate.
pub async fn prepare_target(
    client: Option<&Client>,
    request: &mut EndpointRequest,
) -> Result<(), EndpointError> {
    let Some(mut migration) = request.vm.as_ref().and_then(|v| v.migration.clone()) else {
        return Ok(());
    };
    let Some(client) = client else {
        return Err(EndpointError::Invalid(format!(
            "vm.migration (source pod {:?}, KubeVirt job {:?}): live migration needs the daemon \
             in Kubernetes mode, where the source's Guest says what the guest's address and MAC \
             are",
            migration.source_pod, migration.kubevirt_job
        )));
    };
    let Some(pod) = request.pod.clone() else {
        return Err(EndpointError::Invalid(
            "vm.migration needs the pod's identity (K8S_POD_NAMESPACE and K8S_POD_NAME)".into(),
        ));
    };
    if migration.source_pod.is_empty() {
        let Some(job) = migration.kubevirt_job.clone() else {
            return Err(EndpointError::Invalid(
                "vm.migration names neither a source pod nor a KubeVirt migration job".into(),
            ));
        };
        migration.source_pod = kubevirt_source(client, &pod.namespace, &pod.name, &job).await?;
        if let Some(m) = request.vm.as_mut().and_then(|v| v.migration.as_mut()) {
            m.source_pod = migration.source_pod.clone();
        }
    }
    if migration.source_pod == pod.name {
        return Err(EndpointError::Invalid(format!(
            "pod {}/{} names itself as its migration source",
            pod.namespace, pod.name
        )));
    }
    let source = Api::<Guest>::namespaced(client.clone(), &pod.namespace)
        .get_opt(&migration.source_pod)
        .await
        .map_err(|e| {
            EndpointError::Internal(anyhow::anyhow!(
                "reading the migration source's Guest {}/{}: {e}",
                pod.namespace,
                migration.source_pod
            ))
        })?
        .ok_or_else(|| {
            EndpointError::NotFound(format!(
                "migration source {}/{} has no Guest: the source must be a running VM pod in \
                 the target's namespace",
                pod.namespace, migration.source_pod
            ))
        })?;
    let (ip, mac) = source_identity(&source)?;
    retarget(request, ip, mac, &source.spec.node_name)?;
    info!(
        pod = %format!("{}/{}", pod.namespace, pod.name),
        source = %migration.source_pod,
        source_node = %source.spec.node_name,
        %ip,
        "migration target: the guest arrives with the source's address"
    );
    Ok(())
}

/// The source pod of a KubeVirt migration's target pod `namespace/target`: KubeVirt marks the
/// target (`kubevirt.io/migrationJobName`, `kubevirt.io/migrationJobUID`) but does not name the
/// source, which is the other running virt-launcher pod of the same VMI (the same
/// `kubevirt.io/created-by`).
async fn kubevirt_source(
    client: &Client,
    namespace: &str,
    target: &str,
    job: &str,
) -> Result<String, EndpointError> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let read = |e: kube::Error, what: &str| {
        EndpointError::Internal(anyhow::anyhow!(
            "KubeVirt migration {job}: reading {what}: {e}"
        ))
    };
    let target_pod = api
        .get_opt(target)
        .await
        .map_err(|e| read(e, &format!("the target pod {namespace}/{target}")))?
        .ok_or_else(|| {
            EndpointError::NotFound(format!(
                "KubeVirt migration {job}: the target pod {namespace}/{target} does not exist"
            ))
        })?;
    let vmi = target_pod
        .labels()
        .get(names::kubevirt::CREATED_BY)
        .cloned()
        .ok_or_else(|| {
            EndpointError::Invalid(format!(
                "pod {namespace}/{target} is a KubeVirt migration target ({}: {job}) without \
                 the {} label that names its VMI",
                names::kubevirt::MIGRATION_JOB_NAME,
                names::kubevirt::CREATED_BY
            ))
        })?;
    let selector = format!("{}={vmi}", names::kubevirt::CREATED_BY);
    let pods = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| read(e, &format!("the pods {selector}")))?;
    pick_kubevirt_source(&target_pod, &pods.items).map_err(|e| match e {
        EndpointError::NotFound(m) | EndpointError::Invalid(m) => {
            let m = format!("KubeVirt migration {job}: {m}");
            if pods.items.len() <= 1 {
                EndpointError::NotFound(m)
            } else {
                EndpointError::Invalid(m)
            }
        }
        other => other,
    })
}

/// Of the pods of the target's VMI, the one the guest runs in: not the target, not another
/// target of the same job, not being deleted, Running.
fn pick_kubevirt_source(target: &Pod, pods: &[Pod]) -> Result<String, EndpointError> {
    let job_uid = |p: &Pod| p.labels().get(names::kubevirt::MIGRATION_JOB_UID).cloned();
    let target_name = target.name_any();
    let candidates: Vec<String> = pods
        .iter()
        .filter(|p| p.name_any() != target_name)
        .filter(|p| job_uid(p).is_none() || job_uid(p) != job_uid(target))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| p.name_any())
        .collect();
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(EndpointError::NotFound(format!(
            "no running pod of the same VMI besides the target {target_name} (of {} with its \
             {} label)",
            pods.len(),
            names::kubevirt::CREATED_BY
        ))),
        many => Err(EndpointError::Invalid(format!(
            "several running pods of the same VMI could be the source ({}); set \
             {} on the target to say which",
            many.join(", "),
            names::annotations::MIGRATION_SOURCE
        ))),
    }
}

/// The address and MAC a pod-owned source Guest gives its guest.
fn source_identity(source: &Guest) -> Result<(Ipv4Addr, MacAddr), EndpointError> {
    let name = format!(
        "{}/{}",
        source.namespace().unwrap_or_default(),
        source.name_any()
    );
    if source.spec.pod_ref.is_none() {
        return Err(EndpointError::Invalid(format!(
            "migration source Guest {name} is not a VM pod's (no spec.podRef); only a pod's \
             guest migrates between pods"
        )));
    }
    let ip = source
        .spec
        .ips
        .iter()
        .find_map(|s| s.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            EndpointError::Invalid(format!("migration source Guest {name} has no IPv4 address"))
        })?;
    let mac: MacAddr = source.spec.mac.parse().map_err(|_| {
        EndpointError::Invalid(format!(
            "migration source Guest {name} has MAC {:?}, not a MAC address",
            source.spec.mac
        ))
    })?;
    Ok((ip, mac))
}

/// Gives a target's request the guest's address (in place of its primary's IPv4 address, with
/// the same prefix) and MAC.
fn retarget(
    request: &mut EndpointRequest,
    ip: Ipv4Addr,
    mac: MacAddr,
    source_node: &str,
) -> Result<(), EndpointError> {
    let vm = request.vm.as_mut().expect("checked by the caller");
    let prefix = |s: &str| s.parse::<Ipv4Net>().map(|n| n.prefix_len()).unwrap_or(32);
    let guest_prefix = prefix(&vm.guest_ip);
    let old_guest = vm.guest_ip.parse::<Ipv4Net>().ok().map(|n| n.addr());
    vm.guest_ip = format!("{ip}/{guest_prefix}");
    vm.guest_mac = mac;
    if let Some(m) = vm.migration.as_mut() {
        m.source_node = Some(source_node.to_owned());
    }
    let mut replaced = false;
    for a in request.ips.iter_mut() {
        if let Ok(net) = a.parse::<Ipv4Net>()
            && Some(net.addr()) == old_guest
        {
            *a = format!("{ip}/{}", net.prefix_len());
            replaced = true;
        }
    }
    if !replaced {
        return Err(EndpointError::Invalid(format!(
            "the target's guest address {:?} is not one of its ips {:?}",
            old_guest, request.ips
        )));
    }
    Ok(())
}

/// Where one migrated address lives: the Guest with the newest switch-over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub guest: String,
    pub node: String,
    /// The node it moved from (its migration record's source node).
    pub source_node: String,
    pub switchover: Timestamp,
}

impl Owner {
    /// The move as the API reports it (`tapestry flows`).
    pub fn as_move(&self) -> tapestry_api::types::GuestMove {
        tapestry_api::types::GuestMove {
            from_node: self.source_node.clone(),
            to_node: self.node.clone(),
            switchover: self.switchover.to_string(),
            switchover_unix_ms: u64::try_from(self.switchover.as_millisecond()).unwrap_or(0),
        }
    }
}

/// For each address some Guest went live with by migration, the newest such Guest.
pub fn owners<'a>(guests: impl IntoIterator<Item = &'a Guest>) -> BTreeMap<Ipv4Addr, Owner> {
    let mut out: BTreeMap<Ipv4Addr, Owner> = BTreeMap::new();
    for g in guests {
        let Some(m) = g.status.as_ref().and_then(|s| s.migration.as_ref()) else {
            continue;
        };
        let (MigrationPhase::Live, Some(t)) = (m.phase, m.switchover_time.as_ref()) else {
            continue;
        };
        let Some(ip) = g.spec.ips.iter().find_map(|s| s.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        let candidate = Owner {
            namespace: g.namespace().unwrap_or_default(),
            guest: g.name_any(),
            node: g.spec.node_name.clone(),
            source_node: m.source_node.clone(),
            switchover: t.0,
        };
        match out.get(&ip) {
            Some(o) if o.switchover >= candidate.switchover => {}
            _ => {
                out.insert(ip, candidate);
            }
        }
    }
    out
}

/// Where this node sends a migrated address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The guest is here: the target pod's host veth.
    Link(u32),
    /// The guest is on another node: that node's InternalIP.
    Gateway(Ipv4Addr),
}

/// Follows this node's incoming migrations and every node's switch-overs, until aborted.
pub async fn follow_migrations(
    client: Client,
    node_name: String,
    endpoints: Arc<Endpoints>,
) -> Result<()> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("netlink for migration routes")?;
    tokio::spawn(connection);
    let (store, writer) = reflector::store::<Guest>();
    let guests = watcher(
        Api::<Guest>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .touched_objects();
    let mut guests = std::pin::pin!(guests);
    let mut changes = endpoints.subscribe();
    let mut follower = Follower {
        client,
        node_name,
        endpoints,
        handle,
        node_ips: HashMap::new(),
        live: HashMap::new(),
        reported: HashMap::new(),
        report_failed: HashMap::new(),
        went_live: false,
    };
    info!(node = %follower.node_name, "following live migrations");
    let mut dirty = true;
    loop {
        let incoming = follower.check_incoming().await;
        if dirty || follower.went_live {
            follower.went_live = false;
            let all: Vec<Arc<Guest>> = store.state();
            if let Err(e) = follower.reconcile_routes(&all).await {
                warn!("migration routes: {e:#}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            dirty = false;
        }
        let poll = if incoming { LIVE_POLL } else { RETRY * 10 };
        tokio::select! {
            ev = guests.next() => match ev {
                Some(Ok(_)) => dirty = true,
                Some(Err(e)) => warn!("watching Guests: {e}"),
                None => anyhow::bail!("the Guest watch ended"),
            },
            _ = changes.changed() => dirty = true,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// One of this node's targets that went live, and what its datapath saw since.
struct Live {
    switchover: Timestamp,
    switchover_wall: SystemTime,
    /// From the target's attachment to the switch-over.
    dark_for: Duration,
    /// The target pod's host veth's `tx_packets` when the switch-over was seen, once read.
    veth_tx: Option<u64>,
    /// From the switch-over to the first frame the network sent the guest here, once seen.
    blackout: Option<Duration>,
}

impl Live {
    fn blackout_ms(&self) -> Option<i64> {
        self.blackout.map(|d| d.as_millis() as i64)
    }

    /// Still waiting for the network's first frame (a live guest that nobody sends to stops
    /// being watched after [`BLACKOUT_WATCH`]).
    fn awaits_network(&self) -> bool {
        self.blackout.is_none()
            && self
                .switchover_wall
                .elapsed()
                .is_ok_and(|e| e < BLACKOUT_WATCH)
    }
}

/// How long after its switch-over a target's host veth is watched for the network's first
/// frame to the guest.
const BLACKOUT_WATCH: Duration = Duration::from_secs(30);

struct Follower {
    client: Client,
    node_name: String,
    endpoints: Arc<Endpoints>,
    handle: Handle,
    /// Nodes' InternalIPs, read once each.
    node_ips: HashMap<String, Ipv4Addr>,
    /// This node's targets that went live, by container id.
    live: HashMap<String, Live>,
    /// What was last written to each target's Guest (container id -> phase, blackout ms).
    reported: HashMap<String, (MigrationPhase, Option<i64>)>,
    /// When writing a target's record last failed (container id -> time).
    report_failed: HashMap<String, std::time::Instant>,
    went_live: bool,
}

impl Follower {
    /// Looks at this node's migration targets: records the ones that went live, reports each
    /// phase once in its Guest. True while some target is still dark.
    async fn check_incoming(&mut self) -> bool {
        let mut dark = false;
        let targets = self.endpoints.migration_targets();
        let endpoints = &self.endpoints;
        self.live.retain(|c, _| {
            let kept = targets.iter().any(|t| &t.request.container_id == c);
            if !kept {
                endpoints.set_blackout(c, None);
            }
            kept
        });
        self.reported
            .retain(|c, _| targets.iter().any(|t| &t.request.container_id == c));
        self.report_failed
            .retain(|c, _| targets.iter().any(|t| &t.request.container_id == c));
        for t in &targets {
            let id = t.request.container_id.clone();
            if !self.live.contains_key(&id) {
                match t.first_frame {
                    Some(at) => {
                        let dark_for = at.duration_since(t.attached).unwrap_or_default();
                        let switchover =
                            Timestamp::try_from(at).unwrap_or_else(|_| Timestamp::now());
                        info!(
                            container = %id,
                            ip = %t.guest_ip,
                            dark_ms = dark_for.as_millis() as u64,
                            "migration target went live: the guest sent its first frame here"
                        );
                        if let Err(e) = self.route(t.guest_ip, Via::Link(t.host_ifindex)).await {
                            warn!("routing {} to this node's target: {e:#}", t.guest_ip);
                        }
                        // Ready at once, not at the probe's next period: the guest just sent
                        // from this tap. The source's probe keeps it ready there until the
                        // source's failure threshold, so the address always has a ready pod.
                        self.endpoints.set_probe(
                            t.slot,
                            &id,
                            true,
                            "the guest went live here by live migration",
                        );
                        self.endpoints.set_blackout(&id, None);
                        self.live.insert(
                            id.clone(),
                            Live {
                                switchover,
                                switchover_wall: at,
                                dark_for,
                                veth_tx: self.veth_tx_packets(t.host_ifindex).await,
                                blackout: None,
                            },
                        );
                        self.went_live = true;
                    }
                    None => dark = true,
                }
            }
            // The network follows: the first frame out of the target pod's host veth (towards
            // the pod, so the guest) after the switch-over ends the blackout.
            if let Some(live) = self.live.get(&id)
                && live.awaits_network()
            {
                let tx = self.veth_tx_packets(t.host_ifindex).await;
                let live = self.live.get_mut(&id).expect("looked up above");
                match (live.veth_tx, tx) {
                    (None, tx) => live.veth_tx = tx,
                    (Some(before), Some(now)) if now > before => {
                        let blackout = live.switchover_wall.elapsed().unwrap_or_default();
                        live.blackout = Some(blackout);
                        self.endpoints
                            .set_blackout(&id, Some(blackout.as_millis() as u64));
                        info!(
                            container = %id,
                            ip = %t.guest_ip,
                            blackout_ms = blackout.as_millis() as u64,
                            "migration target: the network reached the guest here"
                        );
                    }
                    _ => {}
                }
                if live.awaits_network() {
                    dark = true;
                }
            }
            let phase = if self.live.contains_key(&id) {
                MigrationPhase::Live
            } else {
                MigrationPhase::Incoming
            };
            let state = (phase, self.live.get(&id).and_then(Live::blackout_ms));
            let retry_due = self
                .report_failed
                .get(&id)
                .is_none_or(|at| at.elapsed() >= RETRY);
            if self.reported.get(&id) != Some(&state) && retry_due {
                match self.report(t, phase).await {
                    Ok(()) => {
                        self.reported.insert(id.clone(), state);
                        self.report_failed.remove(&id);
                    }
                    // The publisher may not have created the Guest yet: tried again after
                    // RETRY, not at every poll.
                    Err(e) => {
                        self.report_failed
                            .insert(id.clone(), std::time::Instant::now());
                        tracing::debug!("recording the migration of {id}: {e:#}");
                    }
                }
            }
            if self.reported.get(&id) != Some(&state) {
                dark = true;
            }
        }
        dark
    }

    /// Writes the target's `status.migration` (its own field manager: the publisher's status
    /// apply leaves it alone).
    async fn report(&self, t: &MigrationTarget, phase: MigrationPhase) -> Result<()> {
        let Some(pod) = &t.request.pod else {
            return Ok(());
        };
        let live = self.live.get(&t.request.container_id);
        let record = GuestMigration {
            source_pod: t.source_pod.clone(),
            source_node: t.source_node.clone(),
            target_node: self.node_name.clone(),
            phase,
            switchover_time: live.map(|l| MicroTime(l.switchover)),
            dark_ms: live.map(|l| l.dark_for.as_millis() as i64),
            blackout_ms: live.and_then(Live::blackout_ms),
        };
        let patch = json!({
            "apiVersion": names::GROUP_VERSION,
            "kind": names::GUEST_KIND,
            "status": {"migration": record},
        });
        Api::<Guest>::namespaced(self.client.clone(), &pod.namespace)
            .patch_status(
                &pod.name,
                &PatchParams::apply(names::MIGRATION_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .with_context(|| format!("Guest {}/{}", pod.namespace, pod.name))?;
        Ok(())
    }

    /// Makes this node's migration routes what the Guests say.
    async fn reconcile_routes(&mut self, guests: &[Arc<Guest>]) -> Result<()> {
        let owners = owners(guests.iter().map(|g| g.as_ref()));
        self.endpoints.set_moves(owners.clone());
        let mut wanted: BTreeMap<Ipv4Addr, Via> = BTreeMap::new();
        for (ip, owner) in &owners {
            let via = if owner.node == self.node_name {
                match self
                    .endpoints
                    .host_ifindex_of_pod(&owner.namespace, &owner.guest)
                {
                    Some(index) => Via::Link(index),
                    // Not attached here (yet, or any more): nothing to route to.
                    None => continue,
                }
            } else {
                match self.node_ip(&owner.node).await {
                    Ok(gw) => Via::Gateway(gw),
                    Err(e) => {
                        warn!("node {} of migrated guest {ip}: {e:#}", owner.node);
                        continue;
                    }
                }
            };
            wanted.insert(*ip, via);
        }
        // This node's own live targets count even before their Guest says so.
        for t in self.endpoints.migration_targets() {
            if self.live.contains_key(&t.request.container_id) {
                let newer_elsewhere = owners.get(&t.guest_ip).is_some_and(|o| {
                    o.node != self.node_name
                        && self
                            .live
                            .get(&t.request.container_id)
                            .is_some_and(|l| o.switchover > l.switchover)
                });
                if !newer_elsewhere {
                    wanted.insert(t.guest_ip, Via::Link(t.host_ifindex));
                }
            }
        }
        let existing = self.own_routes().await?;
        for (ip, via) in &existing {
            if wanted.get(ip) != Some(via) && !wanted.contains_key(ip) {
                self.delete(*ip).await?;
                info!(%ip, "migration route removed");
            }
        }
        for (ip, via) in &wanted {
            if existing.get(ip) != Some(via) {
                self.route(*ip, *via).await?;
                info!(%ip, ?via, "migration route set");
            }
        }
        Ok(())
    }

    /// Frames sent out of host interface `ifindex` (a target pod's veth, towards the pod).
    async fn veth_tx_packets(&self, ifindex: u32) -> Option<u64> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links.try_next().await.ok()??;
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Stats64(s) => Some(s.tx_packets),
            _ => None,
        })
    }

    async fn node_ip(&mut self, node: &str) -> Result<Ipv4Addr> {
        if let Some(ip) = self.node_ips.get(node) {
            return Ok(*ip);
        }
        let n = Api::<K8sNode>::all(self.client.clone()).get(node).await?;
        let ip = n
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .with_context(|| format!("node {node} has no IPv4 InternalIP"))?;
        self.node_ips.insert(node.to_owned(), ip);
        Ok(ip)
    }

    /// This daemon's migration routes in the main table.
    async fn own_routes(&self) -> Result<BTreeMap<Ipv4Addr, Via>> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_filter(|r| {
                futures::future::ready(
                    r.header.protocol == RouteProtocol::Other(RTPROT_TAPESTRY)
                        && r.header.destination_prefix_length == 32,
                )
            })
            .try_collect()
            .await
            .context("listing routes")?;
        let mut out = BTreeMap::new();
        for r in routes {
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let via = match (gw, oif) {
                (Some(g), _) => Via::Gateway(g),
                (None, Some(i)) => Via::Link(i),
                (None, None) => continue,
            };
            if let Some(d) = dst {
                out.insert(d, via);
            }
        }
        Ok(out)
    }

    /// Adds or replaces the /32 of `ip` (also a primary's route for it, such as ptp's on the
    /// source node, which the source's DEL would otherwise take along).
    async fn route(&self, ip: Ipv4Addr, via: Via) -> Result<()> {
        let builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .protocol(RouteProtocol::Other(RTPROT_TAPESTRY));
        let msg = match via {
            Via::Link(index) => builder
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
            Via::Gateway(gw) => {
                let oif = self.oif_towards(gw).await?;
                builder.gateway(gw).output_interface(oif).build()
            }
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("route {ip}/32 via {via:?}"))?;
        Ok(())
    }

    /// The interface this node reaches `gw` on (its underlay), from the kernel's own lookup.
    async fn oif_towards(&self, gw: Ipv4Addr) -> Result<u32> {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(gw, 32)
            .build();
        msg.header.table = 0;
        let mut routes = self.handle.route().get(msg).execute();
        while let Some(r) = routes.try_next().await? {
            if let Some(i) = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }) {
                return Ok(i);
            }
        }
        anyhow::bail!("no route to node address {gw}")
    }

    async fn delete(&self, ip: Ipv4Addr) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .protocol(RouteProtocol::Other(RTPROT_TAPESTRY))
            .build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting route {ip}/32")),
        }
    }
}

/// One of this node's migration targets, as the registry has it.
#[derive(Debug, Clone)]
pub struct MigrationTarget {
    pub request: EndpointRequest,
    /// The guest's slot (its counters, its probe).
    pub slot: u32,
    pub guest_ip: Ipv4Addr,
    pub host_ifindex: u32,
    pub source_pod: String,
    pub source_node: String,
    /// When the endpoint was added (the target's QEMU waits from about then).
    pub attached: SystemTime,
    /// When the datapath saw the guest's first frame on the target's tap.
    pub first_frame: Option<SystemTime>,
}

impl MigrationTarget {
    /// A `CLOCK_MONOTONIC` time from the datapath as wall-clock time.
    pub fn wall_time(ns: u64) -> SystemTime {
        let ago = Duration::from_nanos(monotonic_ns().saturating_sub(ns));
        SystemTime::now() - ago
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;
    use tapestry_api::types::{IncomingMigration, VmAttachment};
    use tapestry_k8s::{GuestPodRef, GuestSpec, GuestStatus};

    use super::*;

    fn guest(name: &str, node: &str, ip: &str, live_at: Option<&str>) -> Guest {
        let mut g = Guest::new(
            name,
            GuestSpec {
                node_name: node.into(),
                pod_ref: Some(GuestPodRef {
                    name: name.into(),
                    uid: None,
                }),
                ips: vec![ip.into()],
                mac: "0a:58:0a:f4:00:05".into(),
                tap: "tap0".into(),
                ports: vec![],
                readiness_probe: None,
            },
        );
        g.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("vms".into()),
            ..Default::default()
        };
        g.status = live_at.map(|t| GuestStatus {
            migration: Some(GuestMigration {
                source_pod: "src".into(),
                source_node: "node-a".into(),
                target_node: node.into(),
                phase: MigrationPhase::Live,
                switchover_time: Some(MicroTime(t.parse().unwrap())),
                dark_ms: Some(500),
                blackout_ms: None,
            }),
            ..Default::default()
        });
        g
    }

    #[test]
    fn the_newest_switchover_owns_the_address() {
        let gs = [
            guest("vm-0", "node-a", "10.0.0.5", None),
            guest("vm-2", "node-a", "10.0.0.5", Some("2026-12-03T10:00:02.5Z")),
            guest("vm-1", "node-b", "10.0.0.5", Some("2026-12-03T10:00:01Z")),
            guest("other", "node-c", "10.0.0.9", None),
        ];
        let owners = owners(gs.iter());
        assert_eq!(owners.len(), 1, "{owners:?}");
        let o = &owners[&"10.0.0.5".parse().unwrap()];
        assert_eq!((o.guest.as_str(), o.node.as_str()), ("vm-2", "node-a"));
        // Order does not matter.
        let reversed: Vec<_> = gs.iter().rev().cloned().collect();
        assert_eq!(super::owners(reversed.iter()), owners);
    }

    #[test]
    fn an_incoming_target_owns_nothing() {
        let mut g = guest("vm-1", "node-b", "10.0.0.5", Some("2026-12-03T10:00:01Z"));
        if let Some(m) = g.status.as_mut().and_then(|s| s.migration.as_mut()) {
            m.phase = MigrationPhase::Incoming;
        }
        assert!(owners([&g]).is_empty());
    }

    fn target_request() -> EndpointRequest {
        EndpointRequest {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/t".into(),
            host_ifname: "veth1".into(),
            ips: vec!["10.0.1.7/28".into(), "fd00::7/64".into()],
            gateway: None,
            mac: None,
            pod: None,
            vm: Some(VmAttachment {
                tap: "tap0".into(),
                guest_mac: "0a:58:0a:f4:01:07".parse().unwrap(),
                guest_ip: "10.0.1.7/32".into(),
                mtu: 1500,
                routes: vec![],
                dns: Default::default(),
                hostname: None,
                queues: 1,
                migration: Some(IncomingMigration {
                    source_pod: "vm-0".into(),
                    kubevirt_job: None,
                    source_node: None,
                }),
            }),
            network: None,
        }
    }

    /// A virt-launcher pod as KubeVirt labels it: `vmi` is its VMI's uid, `job` the migration
    /// uid of a target pod.
    fn launcher(name: &str, vmi: &str, job: Option<&str>, phase: &str, deleting: bool) -> Pod {
        let mut labels = BTreeMap::from([(names::kubevirt::CREATED_BY.to_owned(), vmi.into())]);
        if let Some(job) = job {
            labels.insert(names::kubevirt::MIGRATION_JOB_UID.into(), job.into());
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("vms".into()),
                labels: Some(labels),
                deletion_timestamp: deleting.then(|| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now())
                }),
                ..Default::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_kubevirt_targets_source_is_the_other_running_pod_of_its_vmi() {
        let target = launcher("virt-launcher-vm1-tgt", "u1", Some("m2"), "Pending", false);
        // The source was itself the target of an earlier migration: it keeps that job's label.
        let source = launcher("virt-launcher-vm1-src", "u1", Some("m1"), "Running", false);
        let done = launcher("virt-launcher-vm1-old", "u1", None, "Succeeded", false);
        let going = launcher("virt-launcher-vm1-del", "u1", None, "Running", true);
        let pods = [target.clone(), source, done, going];
        assert_eq!(
            pick_kubevirt_source(&target, &pods).unwrap(),
            "virt-launcher-vm1-src"
        );
        // Only the target: nothing to migrate from.
        assert!(matches!(
            pick_kubevirt_source(&target, &pods[..1]),
            Err(EndpointError::NotFound(_))
        ));
        // Two running candidates: refused, not guessed.
        let other = launcher("virt-launcher-vm1-two", "u1", None, "Running", false);
        let both = [pods[1].clone(), other, target.clone()];
        match pick_kubevirt_source(&target, &both) {
            Err(EndpointError::Invalid(m)) => {
                assert!(m.contains("virt-launcher-vm1-two"), "{m}");
                assert!(m.contains(names::annotations::MIGRATION_SOURCE), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // Another target pod of the same job is never the source.
        let twin = launcher("virt-launcher-vm1-twin", "u1", Some("m2"), "Running", false);
        assert_eq!(
            pick_kubevirt_source(&target, &[twin, pods[1].clone()]).unwrap(),
            "virt-launcher-vm1-src"
        );
    }

    #[test]
    fn a_target_takes_the_guests_address_and_mac_with_its_own_prefixes() {
        let mut r = target_request();
        let mac: MacAddr = "0a:58:0a:f4:00:05".parse().unwrap();
        retarget(&mut r, "10.0.0.5".parse().unwrap(), mac, "node-a").unwrap();
        let vm = r.vm.unwrap();
        assert_eq!(vm.guest_ip, "10.0.0.5/32");
        assert_eq!(vm.guest_mac, mac);
        assert_eq!(r.ips, ["10.0.0.5/28", "fd00::7/64"]);
        assert_eq!(vm.migration.unwrap().source_node.as_deref(), Some("node-a"));
    }

    #[test]
    fn a_source_guest_without_a_pod_or_an_ipv4_address_is_refused() {
        let mut g = guest("vm-0", "node-a", "10.0.0.5", None);
        assert!(source_identity(&g).is_ok());
        g.spec.ips = vec!["fd00::5".into()];
        let err = source_identity(&g).unwrap_err().to_string();
        assert!(err.contains("no IPv4 address"), "{err}");
        g.spec.ips = vec!["10.0.0.5".into()];
        g.spec.pod_ref = None;
        let err = source_identity(&g).unwrap_err().to_string();
        assert!(err.contains("not a VM pod's"), "{err}");
    }
}
