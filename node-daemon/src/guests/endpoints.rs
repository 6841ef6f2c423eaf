//! Endpoints registered by the CNI plugin: every pod's host-side veth gets the Service datapath;
//! a VM pod also gets its guest cross-connect and a DHCP server. The registry is persisted in the
//! daemon's state directory, so a restarted daemon finds its guests again.
//!
//! The registry's lock is held only to look up, reserve and commit: an ADD reserves its key and
//! guest slot, enters the pod's namespace and loads programs with no lock held, then commits. A
//! concurrent ADD or DEL of the same endpoint is refused as a conflict (the runtime retries), and
//! ADDs of different endpoints run in parallel. The registry file is written outside the lock,
//! newest version last.
//!
//! The registry file (`endpoints.json`, mode 0600) is written durably (temporary file, fsync,
//! rename, fsync of the directory). A file that cannot be read as a registry does not stop the
//! daemon: it is kept aside as `endpoints.json.corrupt-<unix seconds>`, the entries that still
//! parse are restored, and the status says so ([`Endpoints::recovery`]).
//!
//! What is persisted and when: an ADD, a DEL and a GC write the file before they answer (the
//! runtime must be able to trust a completed ADD across a restart). A guest's DHCP binding is
//! only a readiness hint that the guest renews by itself, and a guest controls how often it
//! changes (a RELEASE flood): a binding change marks the registry dirty and
//! [`Endpoints::flush`] writes it at most once per [`FLUSH_INTERVAL`] (and at shutdown), so a
//! guest can cause at most one write per interval however many messages it sends, and never
//! queues a CNI ADD behind its writes.
//!
//! An endpoint is stale when its host-side interface is gone (a DEL that never reached the
//! daemon). Stale endpoints are dropped at start, on every CNI GC, every
//! [`STALE_CHECK_INTERVAL`], and when an ADD needs the address or the interface they hold.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    os::{
        fd::OwnedFd,
        unix::fs::{DirBuilderExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tapestry_api::types::{
    AttachmentKey, EndpointInfo, EndpointRequest, GuestArrival, GuestInfo, GuestPhase, MacAddr,
};
use tapestry_common::{DhcpFrame, DhcpLimit, DropReason, GuestStats, MAX_GUESTS};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

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
    /// Send-only, on the tap: DHCP answers, and the readiness probe's requests (probe.rs).
    socket: Arc<OwnedFd>,
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
    /// When this run of the daemon established it.
    added: SystemTime,
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

/// The longest a guest's DHCP binding change waits before the registry file records it.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the registry looks for endpoints whose host interface is gone.
pub const STALE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

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

/// The addresses an endpoint claims: its pod IPs and, for a VM, its guest's IP.
fn claimed_ips(request: &EndpointRequest) -> BTreeSet<Ipv4Addr> {
    let mut ips: BTreeSet<Ipv4Addr> = request
        .ips
        .iter()
        .filter_map(|s| s.parse::<Ipv4Net>().ok().map(|n| n.addr()))
        .collect();
    if let Some(net) = guest_ip_of(request) {
        ips.insert(net);
    }
    ips
}

/// A VM endpoint's guest IP (None: not a VM, or not a parseable address).
fn guest_ip_of(request: &EndpointRequest) -> Option<Ipv4Addr> {
    let vm = request.vm.as_ref()?;
    vm.guest_ip.parse::<Ipv4Net>().ok().map(|n| n.addr())
}

/// What an ADD of `request` under `key` collides with among `entries`, other than the endpoint
/// it replaces (its own key) and a discovered pod on its interface (which it becomes):
/// another endpoint on the same host-side interface, or a guest IP that another endpoint also
/// claims (as its guest's or as a pod IP). A colliding endpoint that `is_stale` (its host
/// interface is gone) is returned to be removed; a live one refuses the ADD with a conflict.
fn collisions(
    entries: &BTreeMap<Key, Endpoint>,
    key: &Key,
    request: &EndpointRequest,
    is_stale: impl Fn(&Endpoint) -> bool,
) -> Result<Vec<Key>, EndpointError> {
    let mine = claimed_ips(request);
    let my_guest = guest_ip_of(request);
    let mut stale = Vec::new();
    for (k, e) in entries {
        if k == key {
            continue;
        }
        let discovered = e.request.network.as_deref() == Some(super::discover::NETWORK);
        let same_iface = e.request.host_ifname == request.host_ifname;
        if discovered && same_iface {
            continue;
        }
        let theirs = claimed_ips(&e.request);
        let their_guest = guest_ip_of(&e.request);
        let shared_ip = my_guest
            .filter(|ip| theirs.contains(ip))
            .or(their_guest.filter(|ip| mine.contains(ip)));
        if !same_iface && shared_ip.is_none() {
            continue;
        }
        if is_stale(e) {
            stale.push(k.clone());
            continue;
        }
        let other = format!("{}/{}", k.0, k.1);
        return Err(EndpointError::Conflict(match shared_ip {
            Some(ip) if !same_iface => format!(
                "guest IP {ip} is already used by endpoint {other} on {}; \
                 two guests cannot share an address",
                e.request.host_ifname
            ),
            _ => format!(
                "host interface {} already belongs to endpoint {other}; \
                 one interface cannot carry two endpoints",
                request.host_ifname
            ),
        }));
    }
    Ok(stale)
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
            Some(vm) => {
                let lease = lease_for(request)?;
                let pod_ips: Vec<Ipv4Addr> = request
                    .ips
                    .iter()
                    .filter_map(|s| s.parse::<Ipv4Net>().ok().map(|n| n.addr()))
                    .collect();
                if !pod_ips.contains(&lease.ip) {
                    return Err(EndpointError::Invalid(format!(
                        "vm.guestIp {} is not one of the endpoint's ips {:?}; \
                         a guest takes its pod's address",
                        vm.guest_ip, request.ips
                    )));
                }
                Some((lease, guest_mac(vm.guest_mac)?))
            }
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
    /// Registry file writes since start.
    writes: AtomicU64,
    /// Why the previous run's registry file could not be used in full (for the status).
    recovery: Mutex<Option<String>>,
    changes: watch::Sender<u64>,
    /// Each guest's DHCP allowance, baked into its programs.
    dhcp_limit: DhcpLimit,
    /// Live readiness (Kubernetes mode): a guest is Ready while its probe says so (probe.rs),
    /// not once it was seen. Off (standalone): Ready once DHCP bound or traffic seen.
    live_readiness: bool,
    /// The probes' verdicts by guest slot: (container id, ready, why).
    probes: Mutex<HashMap<u32, (String, bool, String)>>,
    /// TCP ports each guest must accept for its probe to pass, by container id.
    probe_ports: Mutex<HashMap<String, Vec<u16>>>,
    /// Every migrated address's last move, as the migration follower last saw the Guests.
    moves: Mutex<BTreeMap<Ipv4Addr, super::migration::Owner>>,
    /// Migration targets' blackouts as the datapath saw them (container id -> ms).
    blackouts: Mutex<HashMap<String, u64>>,
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
            writes: AtomicU64::new(0),
            recovery: Mutex::new(None),
            changes: watch::channel(0).0,
            dhcp_limit: DhcpLimit::DEFAULT,
            live_readiness: false,
            probes: Mutex::new(HashMap::new()),
            probe_ports: Mutex::new(HashMap::new()),
            moves: Mutex::new(BTreeMap::new()),
            blackouts: Mutex::new(HashMap::new()),
        })
    }

    /// A guest is Ready while its probe passes (see [`super::probe`]), from none at start.
    pub fn with_live_readiness(mut self) -> Self {
        self.live_readiness = true;
        self
    }

    /// The guests to probe, with what their probes need: those whose readiness ports are known
    /// ([`Endpoints::set_probe_ports`], from their pods), so that no verdict is made without them.
    pub fn probe_targets(&self) -> Vec<super::probe::ProbeTarget> {
        let mut ports = self.probe_ports.lock().unwrap_or_else(|p| p.into_inner());
        let registry = self.lock();
        ports.retain(|c, _| {
            registry
                .entries
                .values()
                .any(|e| &e.request.container_id == c)
        });
        registry
            .entries
            .values()
            .filter_map(|e| {
                let g = e.guest.as_ref()?;
                let tcp_ports = ports.get(&e.request.container_id)?.clone();
                Some(super::probe::ProbeTarget {
                    slot: g.slot,
                    container_id: e.request.container_id.clone(),
                    ip: g.link.lease.ip,
                    tap_mac: g.link.tap_mac,
                    socket: g.link.socket.clone(),
                    tcp_ports,
                })
            })
            .collect()
    }

    /// Records a probe's verdict for the guest in `slot`; subscribers hear of a change.
    pub fn set_probe(&self, slot: u32, container_id: &str, ready: bool, why: &str) {
        let live: HashSet<u32> = self
            .lock()
            .entries
            .values()
            .filter_map(|e| Some(e.guest.as_ref()?.slot))
            .collect();
        let changed = {
            let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            let next = (container_id.to_owned(), ready, why.to_owned());
            let changed = probes
                .get(&slot)
                .is_none_or(|p| p.0 != container_id || p.1 != ready);
            probes.insert(slot, next);
            probes.retain(|s, _| live.contains(s));
            changed
        };
        if changed {
            self.changed();
        }
    }

    /// Whether the guest of `container_id` has a verdict to publish: always without live
    /// readiness; with it, once its first probe finished (so a restarted daemon does not report
    /// its ready guests not ready until it has looked).
    pub fn probed(&self, container_id: &str) -> bool {
        !self.live_readiness
            || self
                .probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|p| p.0 == container_id)
    }

    /// The TCP ports the guest of `container_id` must accept to be ready (its pod's
    /// `tapestry.dev/readiness-tcp-ports`).
    pub fn set_probe_ports(&self, container_id: &str, ports: Vec<u16>) {
        self.probe_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(container_id.to_owned(), ports);
    }

    /// A guest's phase and why: from its probe with live readiness, else from what the datapath
    /// saw.
    fn phase(&self, slot: u32, container_id: &str, bound: bool) -> (GuestPhase, String) {
        if !self.live_readiness {
            return readiness(bound, &self.guest_stats(slot));
        }
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        match probes.get(&slot).filter(|p| p.0 == container_id) {
            Some((_, true, why)) => (GuestPhase::Ready, why.clone()),
            Some((_, false, why)) => (GuestPhase::Attached, why.clone()),
            None => (GuestPhase::Attached, "not probed yet".into()),
        }
    }

    /// Guests attached from now on get `limit` (`tapestryd --dhcp-rate-per-guest`).
    pub fn with_dhcp_limit(mut self, limit: DhcpLimit) -> Self {
        self.dhcp_limit = limit;
        self
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
        write_durably(&self.state_file, &serde_json::to_vec_pretty(&p)?)
            .with_context(|| format!("writing {}", self.state_file.display()))?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        *written = version;
        Ok(())
    }

    /// Writes the registry file if a change is not on disk yet (a guest's DHCP binding, which
    /// is recorded at most once per [`FLUSH_INTERVAL`] and at shutdown).
    pub fn flush(&self) -> Result<()> {
        let on_disk = *self.written.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = {
            let mut r = self.lock();
            if r.version <= on_disk {
                return Ok(());
            }
            r.snapshot()
        };
        self.persist(snapshot)
    }

    /// Registry file writes since the daemon started.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Why the previous run's registry file could not be used in full, if it could not.
    pub fn recovery(&self) -> Option<String> {
        self.recovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `e`'s pod is gone: its host-side interface no longer exists (or its name now
    /// belongs to another interface). The veth dies with the pod's namespace, and the daemon
    /// always sees it; the namespace path is not looked at, because a path the runtime gave
    /// (`/proc/<pid>/ns/net`, a directory not mounted into the daemon's container) can be out of
    /// the daemon's sight while the pod lives.
    fn is_stale(e: &Endpoint) -> bool {
        ifindex_of(&e.request.host_ifname).ok() != Some(e.host_ifindex)
    }

    /// Removes the endpoints whose host interface is gone (their DEL never reached the
    /// daemon); returns what was removed.
    pub fn remove_stale(&self) -> Result<Vec<EndpointInfo>, EndpointError> {
        let stale: Vec<Key> = {
            let r = self.lock();
            r.entries
                .iter()
                .filter(|(k, e)| !r.busy.contains(*k) && Self::is_stale(e))
                .map(|(k, _)| k.clone())
                .collect()
        };
        let mut removed = Vec::new();
        for (c, i) in stale {
            info!(
                container = c,
                ifname = i,
                "endpoint's host interface is gone; removing it"
            );
            if let Some(info) = self.remove(&c, &i)? {
                removed.push(info);
            }
        }
        Ok(removed)
    }

    fn guest_stats(&self, slot: u32) -> GuestStats {
        let mut total = GuestStats::default();
        if let Ok(per_cpu) = self.stats.get(&slot, 0) {
            for s in per_cpu.iter() {
                total.add(s);
            }
        }
        total
    }

    /// The guest's replies to its readiness probe that the tap's program counted, summed over
    /// the CPUs (see probe.rs).
    pub fn probe_replies(&self, slot: u32) -> Result<u64> {
        let per_cpu = self.stats.get(&slot, 0)?;
        Ok(per_cpu.iter().map(|s| s.probe_replies).sum())
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
        let loaded = load_registry(&self.state_file)?;
        *self.recovery.lock().unwrap_or_else(|p| p.into_inner()) = loaded.problem;
        let mut kept_slots = BTreeSet::new();
        for p in loaded.endpoints {
            let key = key_of(&p.request);
            let name = format!("{}/{}", key.0, key.1);
            if !Path::new(&p.request.netns).exists() {
                info!(
                    endpoint = name,
                    "pod gone while the daemon was down; forgetting it"
                );
                continue;
            }
            if ifindex_of(&p.request.host_ifname).is_err() {
                info!(
                    endpoint = name,
                    host_ifname = p.request.host_ifname,
                    "host interface gone while the daemon was down; forgetting the endpoint"
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
            let stale = collisions(&r.entries, &key, &request, Self::is_stale)?;
            if !stale.is_empty() {
                drop(r);
                for (c, i) in &stale {
                    info!(
                        container = c,
                        ifname = i,
                        "endpoint holds what an ADD needs and its host interface is gone; \
                         removing it"
                    );
                    self.remove(c, i)?;
                }
                r = self.lock();
                if r.busy.contains(&key) {
                    return Err(in_progress(&key));
                }
                // Checked again: the registry may have changed while it was unlocked.
                if !collisions(&r.entries, &key, &request, Self::is_stale)?.is_empty() {
                    return Err(EndpointError::Conflict(format!(
                        "endpoint {}/{} collides with endpoints being removed; retry",
                        key.0, key.1
                    )));
                }
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
                    mtu: vm.mtu,
                    dhcp_limit: self.dhcp_limit,
                    // Off: no endpoint request asks for migration target mode yet.
                    // A migration target's guest still holds another node's gateway MAC.
                    gateway_mac: if vm.migration.is_some() {
                        Some(iface::mac_of(&request.host_ifname).map_err(EndpointError::Internal)?)
                    } else {
                        None
                    },
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
                        socket: Arc::new(attached.socket),
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
            added: SystemTime::now(),
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
        // Whatever the runtime still counts as valid: an endpoint whose host interface
        // is gone cannot be used again.
        removed.extend(self.remove_stale()?);
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

    /// This node's live-migration targets (VM endpoints with `vm.migration`), with the time
    /// the datapath first saw their guest send from their tap.
    /// Records where every migrated address lives now (the migration follower's view).
    pub fn set_moves(&self, moves: BTreeMap<Ipv4Addr, super::migration::Owner>) {
        *self.moves.lock().unwrap_or_else(|e| e.into_inner()) = moves;
    }

    /// Every migrated address's last move.
    pub fn moves(&self) -> BTreeMap<Ipv4Addr, super::migration::Owner> {
        self.moves.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a migration target's blackout (the migration follower's measure), or forgets
    /// it (`None`, the target gone).
    pub fn set_blackout(&self, container_id: &str, ms: Option<u64>) {
        let mut b = self.blackouts.lock().unwrap_or_else(|e| e.into_inner());
        match ms {
            Some(ms) => b.insert(container_id.to_owned(), ms),
            None => b.remove(container_id),
        };
    }

    pub fn migration_targets(&self) -> Vec<super::migration::MigrationTarget> {
        let found: Vec<_> = self
            .lock()
            .entries
            .values()
            .filter_map(|e| {
                let vm = e.request.vm.as_ref()?;
                let m = vm.migration.as_ref()?;
                let g = e.guest.as_ref()?;
                Some((
                    e.request.clone(),
                    e.host_ifindex,
                    g.slot,
                    m.clone(),
                    e.added,
                ))
            })
            .collect();
        found
            .into_iter()
            .filter_map(|(request, host_ifindex, slot, m, added)| {
                let guest_ip = guest_ip_of(&request)?;
                let first = self.guest_stats(slot).live_ns;
                Some(super::migration::MigrationTarget {
                    slot,
                    guest_ip,
                    host_ifindex,
                    source_pod: m.source_pod,
                    source_node: m.source_node.unwrap_or_default(),
                    attached: added,
                    first_frame: (first != 0)
                        .then(|| super::migration::MigrationTarget::wall_time(first)),
                    request,
                })
            })
            .collect()
    }

    /// The host-side interface of pod `namespace/name`'s endpoint on this node.
    pub fn host_ifindex_of_pod(&self, namespace: &str, name: &str) -> Option<u32> {
        self.lock().entries.values().find_map(|e| {
            let p = e.request.pod.as_ref()?;
            (p.namespace == namespace && p.name == name).then_some(e.host_ifindex)
        })
    }

    pub fn list(&self) -> Vec<EndpointInfo> {
        self.views().iter().map(|v| self.info(v)).collect()
    }

    fn info(&self, e: &EndpointView) -> EndpointInfo {
        let (phase, reason) = match e.guest {
            Some((slot, _, bound)) => {
                let (p, r) = self.phase(slot, &e.request.container_id, bound);
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
                    self.phase(slot, &v.request.container_id, bound).0 == GuestPhase::Ready,
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
                let (phase, reason) = self.phase(slot, &e.request.container_id, bound);
                // A guest's counters hold the first 16 reasons (the guest's are among them).
                let drops = DropReason::ALL
                    .iter()
                    .filter_map(|r| Some((r, *s.drops.get(*r as usize)?)))
                    .filter(|(_, n)| *n > 0)
                    .map(|(r, n)| (r.name().to_owned(), n))
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
                    announces: s.announces,
                    drops,
                    migration: vm.migration.as_ref().map(|m| GuestArrival {
                        source_pod: m.source_pod.clone(),
                        source_node: m.source_node.clone(),
                        live: s.live_ns != 0,
                        switchover: (s.live_ns != 0).then(|| {
                            let at = super::migration::MigrationTarget::wall_time(s.live_ns);
                            jiff::Timestamp::try_from(at)
                                .map(|t| t.to_string())
                                .unwrap_or_default()
                        }),
                        blackout_ms: self
                            .blackouts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&e.request.container_id)
                            .copied(),
                    }),
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
        {
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
            // Not written here: the guest decides how often this changes. Marked dirty, it is
            // written by the next ADD, DEL or flush (see the module docs).
            r.version += 1;
        }
        self.changed();
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

/// The registry file of an earlier run: what could be used, and what was wrong with it.
#[derive(Debug, Default)]
struct Loaded {
    endpoints: Vec<PersistedEndpoint>,
    /// Set when the file could not be used in full: what was wrong and where it was put.
    problem: Option<String>,
}

/// Reads the registry file at `path`. A file that is not a registry (truncated, not JSON,
/// entries that are not endpoints) does not fail: it is renamed to
/// `<name>.corrupt-<unix seconds>` and the entries that still parse one by one are returned.
/// Only an I/O error fails (other than a missing file, which is an empty registry), and so does
/// a bad file that cannot be put aside: the next write would lose it.
fn load_registry(path: &Path) -> Result<Loaded> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the endpoint registry {}", path.display()));
        }
    };
    let whole = match serde_json::from_slice::<Persisted>(&bytes) {
        Ok(p) => {
            return Ok(Loaded {
                endpoints: p.endpoints,
                problem: None,
            });
        }
        Err(e) => e,
    };
    // Salvage the entries that are endpoints, when the file is JSON with an endpoint list.
    let (endpoints, dropped) = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut o)) => match o.remove("endpoints") {
            Some(serde_json::Value::Array(items)) => {
                let n = items.len();
                let ok: Vec<PersistedEndpoint> = items
                    .into_iter()
                    .filter_map(|v| serde_json::from_value(v).ok())
                    .collect();
                let dropped = n - ok.len();
                (ok, Some(dropped))
            }
            _ => (Vec::new(), None),
        },
        _ => (Vec::new(), None),
    };
    let aside = set_aside(path)?;
    let recovered = match dropped {
        Some(d) => format!("{} endpoint(s) recovered, {d} unreadable", endpoints.len()),
        None => "nothing could be recovered".to_owned(),
    };
    let problem = format!(
        "the endpoint registry {} was corrupt ({whole}); kept as {}; {recovered}",
        path.display(),
        aside.display()
    );
    error!(
        file = %path.display(),
        kept_as = %aside.display(),
        error = %whole,
        recovered = endpoints.len(),
        "the endpoint registry is corrupt; starting with what could be recovered"
    );
    Ok(Loaded {
        endpoints,
        problem: Some(problem),
    })
}

/// Renames `path` to `<name>.corrupt-<unix seconds>` (`-2`, `-3`... when taken) beside it.
fn set_aside(path: &Path) -> Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut aside = PathBuf::from(&base);
    let mut n = 1;
    while aside.symlink_metadata().is_ok() {
        n += 1;
        aside = PathBuf::from(format!("{base}-{n}"));
    }
    fs::rename(path, &aside).with_context(|| {
        format!(
            "the endpoint registry {} is corrupt and could not be kept as {}",
            path.display(),
            aside.display()
        )
    })?;
    Ok(aside)
}

/// Replaces `path` with `bytes` so that a crash leaves the old file or the new one, whole, and
/// readable by its owner only: a temporary file beside it, created exclusively (never through
/// a file or symlink that is already there) with mode 0600, synced, renamed over `path`, and
/// the directory synced so that the rename is durable too.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // One left by a crash is removed, not written through.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tapestry_api::types::{DnsConfig, VmAttachment};

    use super::*;

    /// A fresh directory under the system's temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(what: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tapestry-endpoints-{what}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A pod endpoint on `host_ifname` with `ip`; a VM pod's when `vm`, its guest on `ip` too.
    fn request(container: &str, host_ifname: &str, ip: &str, vm: bool) -> EndpointRequest {
        EndpointRequest {
            container_id: container.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{container}"),
            host_ifname: host_ifname.into(),
            ips: vec![format!("{ip}/32")],
            gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
            mac: None,
            pod: None,
            vm: vm.then(|| VmAttachment {
                tap: "tap0".into(),
                guest_mac: MacAddr::from([0x02, 0, 0, 0, 0, 1]),
                guest_ip: format!("{ip}/32"),
                mtu: 1500,
                routes: vec![],
                dns: DnsConfig {
                    nameservers: vec![],
                    search: vec![],
                    domain: None,
                },
                hostname: None,
                queues: 1,
                migration: None,
            }),
            network: None,
        }
    }

    fn entries(requests: &[EndpointRequest]) -> BTreeMap<Key, Endpoint> {
        requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    key_of(r),
                    Endpoint {
                        request: r.clone(),
                        host_ifindex: 100 + i as u32,
                        guest: None,
                        added: SystemTime::now(),
                    },
                )
            })
            .collect()
    }

    const LIVE: fn(&Endpoint) -> bool = |_| false;

    fn persisted(requests: &[EndpointRequest]) -> Vec<u8> {
        let p = Persisted {
            endpoints: requests
                .iter()
                .map(|r| PersistedEndpoint {
                    request: r.clone(),
                    slot: r.vm.as_ref().map(|_| 1),
                    bound: true,
                })
                .collect(),
        };
        serde_json::to_vec_pretty(&p).unwrap()
    }

    #[test]
    fn a_corrupt_registry_is_kept_aside_and_the_daemon_starts_empty() {
        let dir = TempDir::new("corrupt");
        let file = dir.0.join("endpoints.json");
        // A write cut short: the start of a valid file.
        let full = persisted(&[request("a", "veth-a", "10.0.0.5", true)]);
        let cut = &full[..full.len() / 2];
        fs::write(&file, cut).unwrap();

        let loaded = load_registry(&file).expect("a corrupt file does not fail the start");
        assert!(loaded.endpoints.is_empty());
        let problem = loaded.problem.expect("the corruption is reported");
        assert!(problem.contains("corrupt"), "{problem}");
        assert!(!file.exists(), "the bad file was not moved away");
        let kept: Vec<PathBuf> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let name = kept[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("endpoints.json.corrupt-"),
            "kept as {name}"
        );
        assert!(problem.contains(&name), "{problem} does not say where");
        assert_eq!(
            fs::read(&kept[0]).unwrap(),
            cut,
            "the bad file's bytes changed"
        );

        // A second corrupt file in the same second does not overwrite the first one.
        fs::write(&file, b"\0\0\0").unwrap();
        load_registry(&file).unwrap().problem.unwrap();
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 2);
    }

    #[test]
    fn the_endpoints_that_still_parse_are_recovered_from_a_corrupt_registry() {
        let dir = TempDir::new("salvage");
        let file = dir.0.join("endpoints.json");
        let good = request("a", "veth-a", "10.0.0.5", true);
        let mut v: serde_json::Value = serde_json::from_slice(&persisted(&[
            good.clone(),
            request("b", "veth-b", "10.0.0.6", false),
        ]))
        .unwrap();
        v["endpoints"][1]["request"]["ips"] = serde_json::json!("not a list");
        fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();

        let loaded = load_registry(&file).unwrap();
        assert_eq!(loaded.endpoints.len(), 1);
        assert_eq!(loaded.endpoints[0].request, good);
        assert!(loaded.endpoints[0].bound);
        let problem = loaded.problem.unwrap();
        assert!(
            problem.contains("1 endpoint(s) recovered, 1 unreadable"),
            "{problem}"
        );
    }

    #[test]
    fn a_missing_registry_is_empty_and_a_good_one_is_read_whole() {
        let dir = TempDir::new("good");
        let file = dir.0.join("endpoints.json");
        let l = load_registry(&file).unwrap();
        assert!(l.endpoints.is_empty() && l.problem.is_none());
        let reqs = [
            request("a", "veth-a", "10.0.0.5", true),
            request("b", "veth-b", "10.0.0.6", false),
        ];
        write_durably(&file, &persisted(&reqs)).unwrap();
        let l = load_registry(&file).unwrap();
        assert!(l.problem.is_none());
        assert_eq!(l.endpoints.len(), 2);
        assert!(file.exists());
    }

    #[test]
    fn the_registry_is_written_readable_by_root_only_whatever_the_umask() {
        let dir = TempDir::new("mode");
        let file = dir.0.join("state").join("endpoints.json");
        // SAFETY: umask has no preconditions; the old mask is put back below.
        let old = unsafe { libc::umask(0) };
        let result = write_durably(&file, b"{\"endpoints\":[]}");
        unsafe { libc::umask(old) };
        result.unwrap();
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "endpoints.json has mode {mode:o}");
        let dir_mode = fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700, "the state directory has mode {dir_mode:o}");
        assert_eq!(fs::read(&file).unwrap(), b"{\"endpoints\":[]}");
        assert_eq!(
            fs::read_dir(file.parent().unwrap()).unwrap().count(),
            1,
            "a temporary file was left behind"
        );
    }

    #[test]
    fn the_registry_is_never_written_through_a_planted_temporary_file() {
        let dir = TempDir::new("planted");
        let file = dir.0.join("endpoints.json");
        let victim = dir.0.join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.0.join("endpoints.json.tmp")).unwrap();
        write_durably(&file, b"{\"endpoints\":[]}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&file).unwrap(), b"{\"endpoints\":[]}");
        assert!(!file.symlink_metadata().unwrap().file_type().is_symlink());
    }

    #[test]
    fn a_guest_ip_that_is_not_one_of_the_pod_ips_is_refused() {
        let mut r = request("a", "veth-a", "10.0.0.5", true);
        r.vm.as_mut().unwrap().guest_ip = "10.0.0.99/32".into();
        match Plan::for_request(&r) {
            Err(EndpointError::Invalid(m)) => {
                assert!(m.contains("vm.guestIp 10.0.0.99/32"), "{m}")
            }
            other => panic!("accepted or wrong error: {:?}", other.err()),
        }
        // The same address under another prefix length is the pod's address.
        let mut r = request("a", "veth-a", "10.0.0.5", true);
        r.ips = vec!["10.0.0.5/16".into()];
        Plan::for_request(&r).expect("the pod's own address");
        let mut r = request("a", "veth-a", "10.0.0.5", true);
        r.ips.clear();
        assert!(matches!(
            Plan::for_request(&r),
            Err(EndpointError::Invalid(_))
        ));
    }

    #[test]
    fn a_guest_ip_held_by_another_live_endpoint_is_refused() {
        let have = entries(&[request("a", "veth-a", "10.0.0.5", true)]);
        let new = request("b", "veth-b", "10.0.0.5", true);
        match collisions(&have, &key_of(&new), &new, LIVE) {
            Err(EndpointError::Conflict(m)) => {
                assert!(
                    m.contains("guest IP 10.0.0.5") && m.contains("a/eth0"),
                    "{m}"
                )
            }
            other => panic!("not refused: {other:?}"),
        }
        // A pod (not a VM) whose IP is another endpoint's guest IP, and the other way round.
        let pod = request("c", "veth-c", "10.0.0.5", false);
        assert!(collisions(&have, &key_of(&pod), &pod, LIVE).is_err());
        let pods = entries(&[request("c", "veth-c", "10.0.0.5", false)]);
        assert!(collisions(&pods, &key_of(&new), &new, LIVE).is_err());
        // Another address is fine, and so is the endpoint's own re-ADD.
        let other = request("b", "veth-b", "10.0.0.6", true);
        assert!(
            collisions(&have, &key_of(&other), &other, LIVE)
                .unwrap()
                .is_empty()
        );
        let again = request("a", "veth-a", "10.0.0.5", true);
        assert!(
            collisions(&have, &key_of(&again), &again, LIVE)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_host_interface_that_carries_another_live_endpoint_is_refused() {
        let have = entries(&[request("a", "veth-a", "10.0.0.5", false)]);
        let new = request("b", "veth-a", "10.0.0.6", false);
        match collisions(&have, &key_of(&new), &new, LIVE) {
            Err(EndpointError::Conflict(m)) => {
                assert!(
                    m.contains("host interface veth-a") && m.contains("a/eth0"),
                    "{m}"
                )
            }
            other => panic!("not refused: {other:?}"),
        }
        // A pod discovered on that interface is what this ADD becomes, not a collision.
        let mut discovered = request("a", "veth-a", "10.0.0.5", false);
        discovered.network = Some(super::super::discover::NETWORK.into());
        let have = entries(&[discovered]);
        assert!(
            collisions(&have, &key_of(&new), &new, LIVE)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_stale_endpoint_holding_the_address_or_the_interface_is_replaced() {
        let have = entries(&[
            request("a", "veth-a", "10.0.0.5", true),
            request("c", "veth-c", "10.0.0.7", false),
        ]);
        let gone = |e: &Endpoint| e.request.container_id == "a";
        let new = request("b", "veth-a", "10.0.0.5", true);
        let stale = collisions(&have, &key_of(&new), &new, gone).unwrap();
        assert_eq!(stale, vec![("a".to_owned(), "eth0".to_owned())]);
        // A live one among them still refuses the ADD.
        let new = request("b", "veth-c", "10.0.0.5", true);
        assert!(collisions(&have, &key_of(&new), &new, gone).is_err());
    }
}
