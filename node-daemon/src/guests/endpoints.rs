//! Endpoints registered by the CNI plugin: every pod's host-side veth gets the Service datapath;
//! a VM pod also gets its guest cross-connect and a DHCP server. The registry is persisted in the
//! daemon's state directory, so a restarted daemon finds its guests again.
//!
//! The registry's lock is held only to look up, reserve and commit: an ADD reserves its key and
//! guest slot, enters the pod's namespace and loads programs with no lock held, then commits. A
//! concurrent ADD or DEL of the same endpoint is refused as a conflict (the runtime retries), and
//! ADDs of different endpoints run in parallel. The registry file is written outside the lock,
//! newest version last.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tapestry_api::types::{
    AttachmentKey, EndpointInfo, EndpointRequest, GuestInfo, GuestPhase, MacAddr,
};
use tapestry_common::{DhcpFrame, DropReason, GuestStats, MAX_GUESTS};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::dhcp::{self, LeaseConfig, Outcome};
use crate::datapath::{
    Maps, Pins, guest as guest_programs,
    guest::GuestWiring,
    iface::{self, ifindex_of},
};

/// Why an endpoint request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The request is wrong: the caller must fix it.
    #[error("{0}")]
    Invalid(String),
    /// Something named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Another request for the same endpoint is in progress, or the node is out of a resource:
    /// worth retrying.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// What answering a guest's DHCP needs, shared with the DHCP server outside the lock.
#[derive(Debug)]
pub struct GuestLink {
    pub mac: [u8; 6],
    pub lease: LeaseConfig,
    pub tap_mac: [u8; 6],
    socket: OwnedFd,
}

struct Guest {
    slot: u32,
    link: Arc<GuestLink>,
    bound: bool,
}

struct Endpoint {
    request: EndpointRequest,
    host_ifindex: u32,
    guest: Option<Guest>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Persisted {
    endpoints: Vec<PersistedEndpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersistedEndpoint {
    request: EndpointRequest,
    slot: Option<u32>,
    #[serde(default)]
    bound: bool,
}

type Key = (String, String);

fn key_of(request: &EndpointRequest) -> Key {
    (request.container_id.clone(), request.ifname.clone())
}

#[derive(Default)]
struct Registry {
    entries: BTreeMap<Key, Endpoint>,
    /// Guest slots in use or reserved by an ADD in progress.
    slots: BTreeSet<u32>,
    /// Endpoints with an ADD or DEL in progress.
    busy: HashSet<Key>,
    /// Bumped on every change that the registry file records.
    version: u64,
}

impl Registry {
    fn reserve_slot(&mut self) -> Result<u32, EndpointError> {
        let slot = (1..MAX_GUESTS)
            .find(|s| !self.slots.contains(s))
            .ok_or_else(|| {
                EndpointError::Conflict(format!(
                    "this node has {} guests, the most it supports",
                    MAX_GUESTS - 1
                ))
            })?;
        self.slots.insert(slot);
        Ok(slot)
    }

    /// The registry file's next contents.
    fn snapshot(&mut self) -> (u64, Persisted) {
        self.version += 1;
        let p = Persisted {
            endpoints: self
                .entries
                .values()
                .map(|e| PersistedEndpoint {
                    request: e.request.clone(),
                    slot: e.guest.as_ref().map(|g| g.slot),
                    bound: e.guest.as_ref().is_some_and(|g| g.bound),
                })
                .collect(),
        };
        (self.version, p)
    }
}

/// What a request needs, checked before anything is touched.
struct Plan {
    guest: Option<(LeaseConfig, [u8; 6])>,
}

impl Plan {
    fn for_request(request: &EndpointRequest) -> Result<Plan, EndpointError> {
        if request.container_id.is_empty() || request.ifname.is_empty() {
            return Err(EndpointError::Invalid(
                "containerId and ifname are required".into(),
            ));
        }
        let guest = match &request.vm {
            Some(vm) => Some((lease_for(request)?, guest_mac(vm.guest_mac)?)),
            None => None,
        };
        Ok(Plan { guest })
    }
}

/// A registered endpoint as the views need it, copied out of the registry.
struct EndpointView {
    request: EndpointRequest,
    host_ifindex: u32,
    guest: Option<(u32, [u8; 6], bool)>,
}

/// The endpoint registry.
pub struct Endpoints {
    pins: Pins,
    state_file: PathBuf,
    registry: Mutex<Registry>,
    /// Read handle on the guests' counters (readiness and views).
    stats: PerCpuArray<MapData, GuestStats>,
    /// Write handle, for zeroing a slot; held for one map write.
    stats_writer: Mutex<PerCpuArray<MapData, GuestStats>>,
    /// The last registry version written to the file.
    written: Mutex<u64>,
    changes: watch::Sender<u64>,
}

/// A guest's MAC must be a station's (unicast) address: the anti-spoofing check compares every
/// frame's source with it.
fn guest_mac(mac: MacAddr) -> Result<[u8; 6], EndpointError> {
    if mac.is_multicast() {
        return Err(EndpointError::Invalid(format!(
            "vm.guestMac {mac} is a group address; a guest needs a unicast MAC"
        )));
    }
    Ok(mac.octets())
}

fn parse_cidr(s: &str, what: &str) -> Result<Ipv4Net, EndpointError> {
    s.parse::<Ipv4Net>()
        .map_err(|_| EndpointError::Invalid(format!("{what}: {s:?} is not an IPv4 CIDR")))
}

/// The DHCP lease a guest is offered, from what the plugin sent.
fn lease_for(req: &EndpointRequest) -> Result<LeaseConfig, EndpointError> {
    let vm = req.vm.as_ref().expect("a VM endpoint");
    let net = parse_cidr(&vm.guest_ip, "vm.guestIp")?;
    let mut routes = Vec::new();
    for r in &vm.routes {
        let dst = parse_cidr(&r.dst, "vm.routes[].dst")?;
        if dst.prefix_len() == 0 {
            continue;
        }
        if let Some(gw) = r.gw.or(req.gateway) {
            routes.push((dst, gw));
        }
    }
    let dns_servers = vm
        .dns
        .nameservers
        .iter()
        .filter_map(|s| s.parse::<Ipv4Addr>().ok())
        .collect();
    let mtu = u16::try_from(vm.mtu)
        .ok()
        .filter(|m| *m >= 576)
        .ok_or_else(|| EndpointError::Invalid(format!("vm.mtu {} is out of range", vm.mtu)))?;
    Ok(LeaseConfig {
        ip: net.addr(),
        prefix: net.prefix_len(),
        gateway: req.gateway,
        server_ip: req.gateway.unwrap_or(dhcp::FALLBACK_SERVER_IP),
        mtu,
        dns_servers,
        search: vm.dns.search.clone(),
        domain: vm.dns.domain.clone(),
        hostname: vm.hostname.clone(),
        routes,
        lease_seconds: dhcp::DEFAULT_LEASE_SECONDS,
    })
}

fn readiness(bound: bool, stats: &GuestStats) -> (GuestPhase, String) {
    if bound {
        (
            GuestPhase::Ready,
            "the guest bound its address by DHCP".into(),
        )
    } else if stats.seen_ns != 0 {
        (
            GuestPhase::Ready,
            "the guest sent traffic from its address".into(),
        )
    } else if stats.dhcp > 0 {
        (GuestPhase::Attached, "DHCP in progress".into())
    } else {
        (
            GuestPhase::Attached,
            "no traffic from the guest yet (is the VM running?)".into(),
        )
    }
}

impl Endpoints {
    /// An empty registry persisted under `state_dir`, attaching through `pins`.
    pub fn new(state_dir: &Path, pins: Pins) -> Result<Self> {
        let maps = Maps::open(pins.dir())?;
        let writer = Maps::open(pins.dir())?;
        Ok(Self {
            pins,
            state_file: state_dir.join("endpoints.json"),
            registry: Mutex::new(Registry::default()),
            stats: maps.guest_stats,
            stats_writer: Mutex::new(writer.guest_stats),
            written: Mutex::new(0),
            changes: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves entries as consistent as each commit made them.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Told of every change of an endpoint or of a guest's readiness.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Writes the registry file unless a newer version was written already.
    fn persist(&self, (version, p): (u64, Persisted)) -> Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        if *written >= version {
            return Ok(());
        }
        if let Some(dir) = self.state_file.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self.state_file.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&p)?)?;
        fs::rename(&tmp, &self.state_file)
            .with_context(|| format!("writing {}", self.state_file.display()))?;
        *written = version;
        Ok(())
    }

    fn guest_stats(&self, slot: u32) -> GuestStats {
        let mut total = GuestStats::default();
        if let Ok(per_cpu) = self.stats.get(&slot, 0) {
            for s in per_cpu.iter() {
                total.rx_packets += s.rx_packets;
                total.rx_bytes += s.rx_bytes;
                total.tx_packets += s.tx_packets;
                total.tx_bytes += s.tx_bytes;
                total.dhcp += s.dhcp;
                for (t, d) in total.drops.iter_mut().zip(s.drops.iter()) {
                    *t += d;
                }
                total.seen_ns = total.seen_ns.max(s.seen_ns);
            }
        }
        total
    }

    fn zero_guest_stats(&self, slot: u32) -> Result<()> {
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![GuestStats::default(); n])?;
        self.stats_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(slot, zeros, 0)?;
        Ok(())
    }

    /// Re-establishes the endpoints of an earlier run whose pods still exist; forgets the rest
    /// and removes their guest links. Runs at start, before anything else uses the registry.
    pub fn restore(&self) -> Result<()> {
        let text = match fs::read_to_string(&self.state_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("reading the endpoint registry"),
        };
        let persisted: Persisted = if text.is_empty() {
            Persisted::default()
        } else {
            serde_json::from_str(&text).context("parsing the endpoint registry")?
        };
        let mut kept_slots = BTreeSet::new();
        for p in persisted.endpoints {
            let key = key_of(&p.request);
            let name = format!("{}/{}", key.0, key.1);
            if !Path::new(&p.request.netns).exists() {
                info!(
                    endpoint = name,
                    "pod gone while the daemon was down; forgetting it"
                );
                continue;
            }
            let established = Plan::for_request(&p.request).and_then(|plan| {
                // A guest keeps its slot (its counters and pinned links are under it).
                let slot = match (p.slot, &plan.guest) {
                    (Some(s), Some(_)) => Some(s),
                    (None, Some(_)) => Some(self.lock().reserve_slot()?),
                    (_, None) => None,
                };
                self.establish(p.request, &plan, slot, p.slot.is_none())
            });
            match established {
                Ok(mut ep) => {
                    if let Some(g) = &mut ep.guest {
                        g.bound = p.bound;
                        kept_slots.insert(g.slot);
                    }
                    let mut r = self.lock();
                    if let Some(g) = &ep.guest {
                        r.slots.insert(g.slot);
                    }
                    r.entries.insert(key, ep);
                }
                Err(e) => warn!(endpoint = name, error = %e, "could not restore endpoint"),
            }
        }
        for slot in guest_programs::pinned_slots(self.pins.dir()) {
            if !kept_slots.contains(&slot) {
                let _ = guest_programs::detach(self.pins.dir(), slot);
            }
        }
        let snapshot = {
            let mut r = self.lock();
            if !r.entries.is_empty() {
                info!(endpoints = r.entries.len(), "restored endpoints");
            }
            r.snapshot()
        };
        self.persist(snapshot)
    }

    /// CNI ADD. Idempotent: the same request again returns the same endpoint; a changed request
    /// replaces the endpoint.
    pub fn add(&self, request: EndpointRequest) -> Result<EndpointInfo, EndpointError> {
        let plan = Plan::for_request(&request)?;
        let key = key_of(&request);
        let (replaced, slot) = {
            let mut r = self.lock();
            if r.busy.contains(&key) {
                return Err(in_progress(&key));
            }
            if let Some(existing) = r.entries.get(&key)
                && existing.request == request
            {
                let view = view_of(existing);
                drop(r);
                return Ok(self.info(&view));
            }
            let slot = match plan.guest {
                Some(_) => Some(r.reserve_slot()?),
                None => None,
            };
            r.busy.insert(key.clone());
            (r.entries.remove(&key), slot)
        };
        let result = match &replaced {
            Some(old) => self.teardown(old),
            None => Ok(()),
        }
        .and_then(|()| self.establish(request, &plan, slot, true));
        let mut r = self.lock();
        r.busy.remove(&key);
        if let Some(g) = replaced.as_ref().and_then(|o| o.guest.as_ref()) {
            r.slots.remove(&g.slot);
        }
        let endpoint = match result {
            Ok(endpoint) => endpoint,
            Err(e) => {
                if let Some(s) = slot {
                    r.slots.remove(&s);
                }
                if replaced.is_some() {
                    let snapshot = r.snapshot();
                    drop(r);
                    self.changed();
                    let _ = self.persist(snapshot);
                }
                return Err(e);
            }
        };
        info!(
            container = endpoint.request.container_id,
            host_ifname = endpoint.request.host_ifname,
            vm = endpoint.guest.is_some(),
            "endpoint added"
        );
        let view = view_of(&endpoint);
        // A pod discovered on this interface (it was there before its CNI ADD reached us) is
        // now this endpoint; its attachment is the same one, so nothing is torn down.
        let host_ifname = endpoint.request.host_ifname.clone();
        r.entries.retain(|k, e| {
            *k == key
                || e.request.network.as_deref() != Some(super::discover::NETWORK)
                || e.request.host_ifname != host_ifname
        });
        r.entries.insert(key, endpoint);
        let snapshot = r.snapshot();
        drop(r);
        self.changed();
        self.persist(snapshot)?;
        Ok(self.info(&view))
    }

    /// Attaches what `request` needs; undoes its own work when a step fails. No lock held.
    fn establish(
        &self,
        request: EndpointRequest,
        plan: &Plan,
        slot: Option<u32>,
        fresh: bool,
    ) -> Result<Endpoint, EndpointError> {
        let host_ifindex = ifindex_of(&request.host_ifname).map_err(|_| {
            EndpointError::NotFound(format!(
                "host interface {:?} does not exist in the daemon's network namespace",
                request.host_ifname
            ))
        })?;
        let guest = match (&request.vm, &plan.guest, slot) {
            (Some(vm), Some((lease, mac)), Some(slot)) => {
                if !Path::new(&request.netns).exists() {
                    return Err(EndpointError::NotFound(format!(
                        "network namespace {} does not exist",
                        request.netns
                    )));
                }
                let wiring = GuestWiring {
                    slot,
                    netns: PathBuf::from(&request.netns),
                    pod_ifname: request.ifname.clone(),
                    tap: vm.tap.clone(),
                    mac: *mac,
                    ip: lease.ip,
                };
                if fresh {
                    // A restored guest keeps its counters; a new one starts from zero.
                    self.zero_guest_stats(slot)?;
                }
                let attached = guest_programs::attach(self.pins.dir(), &wiring).map_err(|e| {
                    let _ = guest_programs::detach(self.pins.dir(), slot);
                    EndpointError::Internal(e)
                })?;
                debug!(slot, tap_ifindex = attached.tap_ifindex, "guest attached");
                Some(Guest {
                    slot,
                    link: Arc::new(GuestLink {
                        mac: *mac,
                        lease: lease.clone(),
                        tap_mac: attached.tap_mac,
                        socket: attached.socket,
                    }),
                    bound: false,
                })
            }
            _ => None,
        };
        if let Err(e) = self.pins.attach(&request.host_ifname) {
            if let Some(g) = &guest {
                let _ = guest_programs::detach(self.pins.dir(), g.slot);
            }
            return Err(e.into());
        }
        Ok(Endpoint {
            request,
            host_ifindex,
            guest,
        })
    }

    /// Detaches what an endpoint had. No lock held.
    fn teardown(&self, ep: &Endpoint) -> Result<(), EndpointError> {
        if let Some(g) = &ep.guest {
            guest_programs::detach(self.pins.dir(), g.slot)?;
            let _ = self.zero_guest_stats(g.slot);
        }
        self.pins.detach(ep.host_ifindex)?;
        Ok(())
    }

    /// CNI DEL. Idempotent: an unknown endpoint is already removed.
    pub fn remove(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<EndpointInfo>, EndpointError> {
        let key = (container_id.to_owned(), ifname.to_owned());
        let ep = {
            let mut r = self.lock();
            if r.busy.contains(&key) {
                return Err(in_progress(&key));
            }
            let Some(ep) = r.entries.remove(&key) else {
                return Ok(None);
            };
            r.busy.insert(key.clone());
            ep
        };
        let info = self.info(&view_of(&ep));
        let result = self.teardown(&ep);
        let mut r = self.lock();
        r.busy.remove(&key);
        if let Err(e) = result {
            // Kept, so that the runtime's retried DEL tries again.
            r.entries.insert(key, ep);
            return Err(e);
        }
        if let Some(g) = &ep.guest {
            r.slots.remove(&g.slot);
        }
        let snapshot = r.snapshot();
        drop(r);
        self.changed();
        self.persist(snapshot)?;
        info!(container = container_id, ifname, "endpoint removed");
        Ok(Some(info))
    }

    /// CNI GC: removes every endpoint of `network` (every network: None) not in `valid`.
    pub fn gc(
        &self,
        network: Option<&str>,
        valid: &[AttachmentKey],
    ) -> Result<Vec<EndpointInfo>, EndpointError> {
        let stale: Vec<Key> = self
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| network.is_none() || e.request.network.as_deref() == network)
            .map(|(k, _)| k)
            .filter(|(c, i)| !valid.iter().any(|v| &v.container_id == c && &v.ifname == i))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for (c, i) in stale {
            if let Some(info) = self.remove(&c, &i)? {
                removed.push(info);
            }
        }
        Ok(removed)
    }

    fn views(&self) -> Vec<EndpointView> {
        self.lock().entries.values().map(view_of).collect()
    }

    pub fn get(&self, container_id: &str, ifname: &str) -> Option<EndpointInfo> {
        let view = self
            .lock()
            .entries
            .get(&(container_id.to_owned(), ifname.to_owned()))
            .map(view_of)?;
        Some(self.info(&view))
    }

    pub fn list(&self) -> Vec<EndpointInfo> {
        self.views().iter().map(|v| self.info(v)).collect()
    }

    fn info(&self, e: &EndpointView) -> EndpointInfo {
        let (phase, reason) = match e.guest {
            Some((slot, _, bound)) => {
                let (p, r) = readiness(bound, &self.guest_stats(slot));
                (Some(p), Some(r))
            }
            None => (None, None),
        };
        EndpointInfo {
            request: e.request.clone(),
            host_ifindex: e.host_ifindex,
            guest_phase: phase,
            guest_ready_reason: reason,
        }
    }

    /// Each guest's slot and whether it is Ready, for the readiness watch.
    pub fn readiness(&self) -> Vec<(u32, bool)> {
        self.views()
            .iter()
            .filter_map(|v| {
                let (slot, _, bound) = v.guest?;
                Some((
                    slot,
                    readiness(bound, &self.guest_stats(slot)).0 == GuestPhase::Ready,
                ))
            })
            .collect()
    }

    /// Tells subscribers that a guest's readiness changed without a registry change (the
    /// datapath saw its first packet).
    pub fn readiness_changed(&self) {
        self.changed();
    }

    pub fn guests(&self) -> Vec<GuestInfo> {
        self.views()
            .into_iter()
            .filter_map(|e| {
                let (slot, mac, bound) = e.guest?;
                let vm = e.request.vm.as_ref()?;
                let s = self.guest_stats(slot);
                let (phase, reason) = readiness(bound, &s);
                let drops = DropReason::ALL
                    .iter()
                    .filter(|r| s.drops[**r as usize] > 0)
                    .map(|r| (r.name().to_owned(), s.drops[*r as usize]))
                    .collect();
                Some(GuestInfo {
                    name: e
                        .request
                        .pod
                        .as_ref()
                        .map(|p| p.name.clone())
                        .unwrap_or_else(|| e.request.container_id.clone()),
                    namespace: e.request.pod.as_ref().map(|p| p.namespace.clone()),
                    container_id: e.request.container_id.clone(),
                    netns: e.request.netns.clone(),
                    tap: vm.tap.clone(),
                    mac: mac.into(),
                    ip: vm.guest_ip.clone(),
                    mtu: vm.mtu,
                    queues: vm.queues,
                    phase,
                    reason,
                    dhcp_bound: bound,
                    rx_packets: s.rx_packets,
                    rx_bytes: s.rx_bytes,
                    tx_packets: s.tx_packets,
                    tx_bytes: s.tx_bytes,
                    dhcp_messages: s.dhcp,
                    drops,
                })
            })
            .collect()
    }

    /// Answers one DHCP frame queued by a guest program. The registry is locked to find the
    /// guest and to record a change of its binding, not while answering.
    pub fn handle_dhcp(&self, frame: &DhcpFrame) {
        let len = (frame.len as usize).min(frame.data.len());
        let found = self.lock().entries.values().find_map(|e| {
            let g = e.guest.as_ref().filter(|g| g.slot == frame.slot)?;
            Some((e.request.container_id.clone(), g.link.clone()))
        });
        let Some((container, link)) = found else {
            debug!(slot = frame.slot, "DHCP from an unknown guest slot");
            return;
        };
        let bound = match dhcp::handle(&frame.data[..len], link.mac, link.tap_mac, &link.lease) {
            Outcome::Reply { frame, kind } => {
                if let Err(e) = iface::send_frame(&link.socket, &frame) {
                    warn!(container, error = %e, "DHCP answer not sent");
                    return;
                }
                debug!(container, ?kind, "DHCP answered");
                matches!(kind, dhcproto::v4::MessageType::Ack)
            }
            Outcome::Released => {
                info!(container, "guest released its address");
                false
            }
            Outcome::Ignored(why) => {
                debug!(container, why, "DHCP message ignored");
                return;
            }
        };
        let snapshot = {
            let mut r = self.lock();
            let Some(g) = r
                .entries
                .values_mut()
                .find_map(|e| e.guest.as_mut().filter(|g| g.slot == frame.slot))
            else {
                return;
            };
            if g.bound == bound {
                return;
            }
            g.bound = bound;
            if bound {
                info!(container, ip = %link.lease.ip, "guest bound its address by DHCP");
            }
            r.snapshot()
        };
        self.changed();
        if let Err(e) = self.persist(snapshot) {
            warn!(error = %format!("{e:#}"), "writing the endpoint registry");
        }
    }
}

fn view_of(e: &Endpoint) -> EndpointView {
    EndpointView {
        request: e.request.clone(),
        host_ifindex: e.host_ifindex,
        guest: e.guest.as_ref().map(|g| (g.slot, g.link.mac, g.bound)),
    }
}

fn in_progress(key: &Key) -> EndpointError {
    EndpointError::Conflict(format!(
        "another ADD or DEL of endpoint {}/{} is in progress; retry",
        key.0, key.1
    ))
}
