//! Keeps the datapath maps equal to the desired state, with the fewest map writes and no window
//! in which a live service has no backends.
//!
//! Order of writes, so the datapath never reads a dangling reference:
//! 1. new and changed backends (a table may only name backends that exist);
//! 2. each service's selection table, then its service entry (a new service appears only once
//!    its table is complete; a changed table is replaced whole, atomically);
//! 3. removed services (entry first, then table);
//! 4. backends no service references any more. Flows still pinned to them are moved by the
//!    datapath on their next packet (see `lb4_forward`).
//!
//! Ids are restored from the pinned maps at start, so a restarted daemon given the same desired
//! state writes nothing at all.
//!
//! `externalTrafficPolicy: Local` (node ports and external addresses): one frontend entry, one
//! id, two selection tables. The entry's `service_flags::EXTERNAL_LOCAL` and
//! `local_backend_count` tell the external interfaces' program to choose from the second table,
//! keyed `id | LOCAL_SCOPE` in the same map (and to key outside clients' affinity the same
//! way), which holds only this node's backends: those whose `node` is this node's name, ready
//! ones, else the terminating ones (kube-proxy's serving-and-terminating fallback, applied to
//! the local ones alone). What pods and the node send uses the first table, every backend. So
//! a packet costs one frontend lookup and one table lookup whatever the policy, and no
//! backend is stored twice. The local table is written before the entry that points at it
//! and removed after the entry stops pointing at it, like the first.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapError, PerCpuValues};
use tapestry_api::state::{
    Algorithm, BackendSpec, DesiredState, ServiceSpec, SessionAffinity, TrafficPolicy,
};
use tapestry_common::{
    AffinityKey, Backend, DEFAULT_NODEPORT_RANGE, LB_TABLE_SIZE, LOCAL_SCOPE, LbTable,
    MAX_BACKENDS, MAX_SERVICES, Service, ServiceKey, TrafficStats, algorithm, backend_state,
    config_flags, service_flags,
};
use tracing::{debug, info};

use super::maglev::{TableBackend, maglev_table, random_table};
use crate::datapath::Maps;

/// A backend's identity: one id per address, shared by every service that lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl BackendAddr {
    fn entry(&self, state: u8) -> Backend {
        Backend {
            ip: u32::from_ne_bytes(self.ip.octets()),
            port: self.port.to_be(),
            proto: self.proto,
            state,
        }
    }

    fn from_entry(b: &Backend) -> Self {
        Self {
            ip: Ipv4Addr::from(b.ip.to_ne_bytes()),
            port: u16::from_be(b.port),
            proto: b.proto,
        }
    }

    pub fn key(&self) -> String {
        format!("{}:{}/{}", self.ip, self.port, self.proto)
    }
}

pub fn service_key(vip: Ipv4Addr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        vip: u32::from_ne_bytes(vip.octets()),
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// Frontend of a service key, host order, for display.
pub fn frontend_of(key: &ServiceKey) -> (Ipv4Addr, u16, u8) {
    (
        Ipv4Addr::from(key.vip.to_ne_bytes()),
        u16::from_be(key.port),
        key.proto,
    )
}

/// Ids from 1 (0 means "none" in the datapath), handed out round-robin so a freed id is reused
/// as late as possible: stale references to it (conntrack, affinity) age out first.
#[derive(Debug)]
struct IdPool {
    max: u32,
    next: u32,
    used: HashSet<u32>,
}

impl IdPool {
    fn new(max: u32) -> Self {
        Self {
            max,
            next: 1,
            used: HashSet::new(),
        }
    }

    fn claim(&mut self, id: u32) {
        self.used.insert(id);
        if id >= self.next {
            self.next = id + 1;
        }
    }

    fn alloc(&mut self, what: &str) -> Result<u32> {
        if self.used.len() as u32 >= self.max - 1 {
            bail!("out of {what} ids: at most {} are supported", self.max - 1);
        }
        loop {
            if self.next >= self.max {
                self.next = 1;
            }
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Ok(id);
            }
        }
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

#[derive(Debug, Clone)]
pub struct ProgrammedService {
    pub id: u32,
    pub entry: Service,
    table_digest: u64,
    /// Of the local-only table (`id | LOCAL_SCOPE`), when one is programmed.
    local_digest: Option<u64>,
    /// Index of its spec in the desired state last applied (None for a service restored from
    /// the maps and not yet matched by a desired state).
    spec_index: Option<usize>,
    /// Backend ids in the order of `spec.backends`.
    pub backend_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
pub struct ProgrammedBackend {
    pub id: u32,
    pub entry: Backend,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub services_added: usize,
    pub services_updated: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_updated: usize,
    pub backends_removed: usize,
    pub tables_written: usize,
    pub map_writes: usize,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.map_writes > 0
    }
}

pub struct Reconciler {
    /// The desired state last applied, shared with the source (never copied).
    desired: Arc<DesiredState>,
    services: HashMap<ServiceKey, ProgrammedService>,
    service_ids: IdPool,
    backends: HashMap<BackendAddr, ProgrammedBackend>,
    backend_ids: IdPool,
    /// Ports a node port may have (the datapath looks up no other as one).
    nodeport_range: (u16, u16),
    /// `tapestryd --nodeport-interface` was given (see `with_external_interfaces`).
    external_interfaces: bool,
    /// This node's name: backends whose `node` it is are local (`externalTrafficPolicy`).
    node_name: Option<String>,
}

fn digest(table: &LbTable) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for id in table.backends {
        h ^= id as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn zero_stats(n: usize) -> PerCpuValues<TrafficStats> {
    PerCpuValues::try_from(vec![TrafficStats::default(); n]).expect("one value per possible CPU")
}

impl Reconciler {
    /// Rebuilds the id allocation from what the pinned maps hold.
    pub fn restore(maps: &Maps) -> Result<Self> {
        let mut r = Self {
            desired: Arc::new(DesiredState::default()),
            services: HashMap::new(),
            service_ids: IdPool::new(MAX_SERVICES),
            backends: HashMap::new(),
            backend_ids: IdPool::new(MAX_BACKENDS),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            external_interfaces: false,
            node_name: None,
        };
        for item in maps.backends.iter() {
            let (id, b) = item.context("reading the backends map")?;
            r.backend_ids.claim(id);
            r.backends.insert(
                BackendAddr::from_entry(&b),
                ProgrammedBackend { id, entry: b },
            );
        }
        for item in maps.services.iter() {
            let (key, svc) = item.context("reading the services map")?;
            r.service_ids.claim(svc.id);
            let table_digest = table_digest_of(maps, svc.id)?.unwrap_or(0);
            let local_digest = table_digest_of(maps, svc.id | LOCAL_SCOPE)?;
            r.services.insert(
                key,
                ProgrammedService {
                    id: svc.id,
                    entry: svc,
                    table_digest,
                    local_digest,
                    spec_index: None,
                    backend_ids: Vec::new(),
                },
            );
        }
        if !r.services.is_empty() || !r.backends.is_empty() {
            info!(
                services = r.services.len(),
                backends = r.backends.len(),
                "restored the programmed state from the pinned maps"
            );
        }
        Ok(r)
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &ProgrammedService)> {
        self.services.iter()
    }

    pub fn backends(&self) -> impl Iterator<Item = (&BackendAddr, &ProgrammedBackend)> {
        self.backends.iter()
    }

    /// The spec `ps` was programmed from.
    pub fn spec(&self, ps: &ProgrammedService) -> Option<&ServiceSpec> {
        ps.spec_index.and_then(|i| self.desired.services.get(i))
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The node port range the datapath was loaded with (`tapestryd --nodeport-range`): a
    /// desired state with a node port outside it is refused, as the datapath would never
    /// answer it.
    pub fn with_nodeport_range(mut self, range: (u16, u16)) -> Self {
        self.nodeport_range = range;
        self
    }

    /// External interfaces are configured (`tapestryd --nodeport-interface`): the node's
    /// addresses matter to the datapath whether or not a node port exists (the replies of the
    /// flows from outside are addressed to them).
    pub fn with_external_interfaces(mut self, configured: bool) -> Self {
        self.external_interfaces = configured;
        self
    }

    /// This node's name (`--node-name`, else the hostname): which backends are local.
    pub fn with_node_name(mut self, name: Option<String>) -> Self {
        self.node_name = name;
        self
    }

    /// Whether the datapath must look at the node's addresses (`config_flags::NODE_ADDRS`): a
    /// node port is programmed, or external interfaces are configured.
    pub fn wants_node_addrs(&self) -> bool {
        self.external_interfaces || self.services.keys().any(|k| k.vip == 0)
    }

    /// Whether endpoints' packets to addresses outside must be looked up as replies of flows
    /// from outside (`config_flags::LOCAL_REPLIES`): a Local frontend is programmed.
    pub fn wants_local_replies(&self) -> bool {
        self.services
            .values()
            .any(|ps| ps.entry.flags & service_flags::EXTERNAL_LOCAL != 0)
    }

    /// Makes the maps equal to `desired`, in the four steps of the module's doc.
    pub fn apply(&mut self, maps: &mut Maps, desired: &Arc<DesiredState>) -> Result<ApplyStats> {
        let started = Instant::now();
        let mut stats = ApplyStats::default();
        let ncpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        check_capacity(desired)?;
        check_node_ports(desired, self.nodeport_range)?;

        // The flags go on before what needs them appears and off after the last of it went.
        if self.external_interfaces || desired.services.iter().any(|s| s.is_node_port()) {
            set_config_flag(maps, config_flags::NODE_ADDRS, true, &mut stats)?;
        }
        if desired.services.iter().any(is_local) {
            set_config_flag(maps, config_flags::LOCAL_REPLIES, true, &mut stats)?;
        }
        let wanted = self.write_backends(maps, desired, &mut stats)?;
        let desired_keys = self.write_services(maps, desired, &mut stats)?;
        self.remove_services(maps, &desired_keys, ncpus, &mut stats)?;
        self.remove_unused_backends(maps, &wanted, ncpus, &mut stats)?;
        if !self.wants_node_addrs() {
            set_config_flag(maps, config_flags::NODE_ADDRS, false, &mut stats)?;
        }
        if !self.wants_local_replies() {
            set_config_flag(maps, config_flags::LOCAL_REPLIES, false, &mut stats)?;
        }

        self.desired = desired.clone();
        let elapsed = started.elapsed();
        if stats.changed() {
            info!(
                services = self.services.len(),
                backends = self.backends.len(),
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                ?stats,
                "programmed {} services, {} backends in {:.1} ms",
                self.services.len(),
                self.backends.len(),
                elapsed.as_secs_f64() * 1e3
            );
        } else {
            debug!(elapsed = ?elapsed, "desired state already programmed");
        }
        Ok(stats)
    }

    /// Step 1: new and changed backends, the union over services (active wins over
    /// terminating). Returns every backend the state references, with its state.
    fn write_backends(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
        stats: &mut ApplyStats,
    ) -> Result<HashMap<BackendAddr, u8>> {
        let mut wanted: HashMap<BackendAddr, u8> = HashMap::new();
        for svc in &desired.services {
            let proto = svc.protocol.ip_proto();
            for b in &svc.backends {
                let addr = BackendAddr {
                    ip: b.ip,
                    port: b.target_port(svc),
                    proto,
                };
                let state = if b.terminating {
                    backend_state::TERMINATING
                } else {
                    backend_state::ACTIVE
                };
                let e = wanted.entry(addr).or_insert(state);
                *e = (*e).min(state);
            }
        }
        let mut wanted_sorted: Vec<_> = wanted.iter().collect();
        wanted_sorted.sort();
        for (addr, state) in wanted_sorted {
            match self.backends.get_mut(addr) {
                Some(pb) if pb.entry.state == *state => {}
                Some(pb) => {
                    pb.entry.state = *state;
                    maps.backends.insert(pb.id, pb.entry, 0)?;
                    stats.backends_updated += 1;
                    stats.map_writes += 1;
                }
                None => {
                    let id = self.backend_ids.alloc("backend")?;
                    let entry = addr.entry(*state);
                    maps.backends.insert(id, entry, 0)?;
                    self.backends.insert(*addr, ProgrammedBackend { id, entry });
                    stats.backends_added += 1;
                    stats.map_writes += 1;
                }
            }
        }
        Ok(wanted)
    }

    /// Step 2: each service's selection table, then its entry. Returns the frontends the state
    /// has.
    fn write_services(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
        stats: &mut ApplyStats,
    ) -> Result<HashSet<ServiceKey>> {
        let mut desired_keys = HashSet::with_capacity(desired.services.len());
        for (index, svc) in desired.services.iter().enumerate() {
            let proto = svc.protocol.ip_proto();
            let key = service_key(svc.vip, svc.port, proto);
            desired_keys.insert(key);
            let backend_ids: Vec<u32> = svc
                .backends
                .iter()
                .map(|b| self.backends[&backend_addr(svc, b)].id)
                .collect();
            let active: Vec<&BackendSpec> =
                svc.backends.iter().filter(|b| !b.terminating).collect();
            let (algo, table) = self.table(svc, &active);
            let table_digest = digest(&table);
            let local = is_local(svc).then(|| {
                let backends = local_backends(svc, self.node_name.as_deref());
                let count = backends.len() as u16;
                let table = self.table(svc, &backends).1;
                (count, digest(&table), table)
            });
            let affinity = matches!(svc.session_affinity, SessionAffinity::ClientIP);
            let mut entry = Service {
                id: 0,
                backend_count: active.len() as u32,
                affinity_timeout_s: if affinity {
                    svc.session_affinity_timeout_seconds
                } else {
                    0
                },
                algorithm: algo,
                flags: if affinity {
                    service_flags::AFFINITY_CLIENT_IP
                } else {
                    0
                },
                local_backend_count: 0,
            };
            if let Some((count, _, _)) = &local {
                entry.flags |= service_flags::EXTERNAL_LOCAL;
                entry.local_backend_count = *count;
            }
            match self.services.get_mut(&key) {
                Some(ps) => {
                    entry.id = ps.id;
                    let mut changed = false;
                    if let Some((_, local_digest, local_table)) = &local
                        && ps.local_digest != Some(*local_digest)
                    {
                        maps.lb_tables.insert(ps.id | LOCAL_SCOPE, local_table, 0)?;
                        ps.local_digest = Some(*local_digest);
                        stats.tables_written += 1;
                        stats.map_writes += 1;
                        changed = true;
                    }
                    if ps.table_digest != table_digest {
                        maps.lb_tables.insert(ps.id, table, 0)?;
                        ps.table_digest = table_digest;
                        stats.tables_written += 1;
                        stats.map_writes += 1;
                        changed = true;
                    }
                    if ps.entry != entry {
                        maps.services.insert(key, entry, 0)?;
                        ps.entry = entry;
                        stats.map_writes += 1;
                        changed = true;
                    }
                    if local.is_none() && ps.local_digest.take().is_some() {
                        // Local no more: the entry no longer points at the table.
                        ignore_missing(maps.lb_tables.remove(&(ps.id | LOCAL_SCOPE)))?;
                        purge_affinity(maps, ps.id | LOCAL_SCOPE)?;
                        stats.map_writes += 1;
                        changed = true;
                    }
                    if changed {
                        stats.services_updated += 1;
                    }
                    ps.spec_index = Some(index);
                    ps.backend_ids = backend_ids;
                }
                None => {
                    let id = self.service_ids.alloc("service")?;
                    entry.id = id;
                    maps.lb_tables.insert(id, table, 0)?;
                    if let Some((_, _, local_table)) = &local {
                        maps.lb_tables.insert(id | LOCAL_SCOPE, local_table, 0)?;
                        stats.tables_written += 1;
                        stats.map_writes += 1;
                    }
                    maps.services.insert(key, entry, 0)?;
                    self.services.insert(
                        key,
                        ProgrammedService {
                            id,
                            entry,
                            table_digest,
                            local_digest: local.as_ref().map(|(_, d, _)| *d),
                            spec_index: Some(index),
                            backend_ids,
                        },
                    );
                    stats.services_added += 1;
                    stats.tables_written += 1;
                    stats.map_writes += 2;
                }
            }
        }
        Ok(desired_keys)
    }

    /// A selection table over `backends` with the service's algorithm.
    fn table(&self, svc: &ServiceSpec, backends: &[&BackendSpec]) -> (u8, LbTable) {
        let table_backends: Vec<TableBackend> = backends
            .iter()
            .map(|b| {
                let addr = backend_addr(svc, b);
                TableBackend {
                    id: self.backends[&addr].id,
                    weight: b.weight as u32,
                    key: addr.key(),
                }
            })
            .collect();
        match svc.algorithm {
            Algorithm::Random => (algorithm::RANDOM, random_table(&table_backends)),
            Algorithm::Maglev => (algorithm::MAGLEV, maglev_table(&table_backends)),
        }
    }

    /// Step 3: services the state no longer has (entry first, then table).
    fn remove_services(
        &mut self,
        maps: &mut Maps,
        desired_keys: &HashSet<ServiceKey>,
        ncpus: usize,
        stats: &mut ApplyStats,
    ) -> Result<()> {
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !desired_keys.contains(k))
            .copied()
            .collect();
        for key in gone {
            let ps = self.services.remove(&key).expect("listed above");
            ignore_missing(maps.services.remove(&key))?;
            ignore_missing(maps.lb_tables.remove(&ps.id))?;
            if ps.local_digest.is_some() {
                ignore_missing(maps.lb_tables.remove(&(ps.id | LOCAL_SCOPE)))?;
                stats.map_writes += 1;
            }
            if ps.entry.flags & service_flags::AFFINITY_CLIENT_IP != 0 {
                purge_affinity(maps, ps.id)?;
                purge_affinity(maps, ps.id | LOCAL_SCOPE)?;
            }
            // Counters are zeroed when an id is freed, not when it is handed out: a fresh id's
            // slot is already zero, so programming many new services costs no extra writes.
            maps.service_stats.set(ps.id, zero_stats(ncpus), 0)?;
            self.service_ids.free(ps.id);
            stats.services_removed += 1;
            stats.map_writes += 3;
        }
        Ok(())
    }

    /// Step 4: backends no service references any more.
    fn remove_unused_backends(
        &mut self,
        maps: &mut Maps,
        wanted: &HashMap<BackendAddr, u8>,
        ncpus: usize,
        stats: &mut ApplyStats,
    ) -> Result<()> {
        let unused: Vec<BackendAddr> = self
            .backends
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in unused {
            let pb = self.backends.remove(&addr).expect("listed above");
            ignore_missing(maps.backends.remove(&pb.id))?;
            maps.backend_stats.set(pb.id, zero_stats(ncpus), 0)?;
            self.backend_ids.free(pb.id);
            stats.backends_removed += 1;
            stats.map_writes += 2;
        }
        Ok(())
    }

    /// What is programmed now, for the read views: cheap to share, never waits on an apply.
    pub fn snapshot(&self) -> Programmed {
        let mut services: Vec<(ServiceKey, ProgrammedService)> = self
            .services
            .iter()
            .map(|(k, ps)| (*k, ps.clone()))
            .collect();
        services.sort_by_key(|(_, ps)| ps.id);
        Programmed {
            desired: self.desired.clone(),
            services,
            backends: self
                .backends
                .iter()
                .map(|(addr, pb)| (pb.id, *addr))
                .collect(),
        }
    }
}

/// A snapshot of what the reconciler has programmed (see [`Reconciler::snapshot`]).
#[derive(Debug, Clone, Default)]
pub struct Programmed {
    desired: Arc<DesiredState>,
    /// By service id.
    pub services: Vec<(ServiceKey, ProgrammedService)>,
    /// Backend addresses by id.
    pub backends: HashMap<u32, BackendAddr>,
}

impl Programmed {
    /// The spec `ps` was programmed from (None: restored from the pins, not yet reprogrammed).
    pub fn spec(&self, ps: &ProgrammedService) -> Option<&ServiceSpec> {
        ps.spec_index.and_then(|i| self.desired.services.get(i))
    }

    /// Service names by datapath id.
    pub fn names(&self) -> HashMap<u32, String> {
        self.services
            .iter()
            .filter_map(|(_, ps)| self.spec(ps).map(|s| (ps.id, s.name.clone())))
            .collect()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }
}

fn backend_addr(svc: &ServiceSpec, b: &BackendSpec) -> BackendAddr {
    BackendAddr {
        ip: b.ip,
        port: b.target_port(svc),
        proto: svc.protocol.ip_proto(),
    }
}

fn is_local(svc: &ServiceSpec) -> bool {
    svc.external_traffic_policy == TrafficPolicy::Local
}

/// The backends a Local frontend's outside clients may start flows to: this node's (`node` is
/// `node_name`) that are active, else, when none is, this node's terminating ones, as
/// kube-proxy falls back to serving-and-terminating endpoints for the local set on its own.
pub fn local_backends<'a>(svc: &'a ServiceSpec, node_name: Option<&str>) -> Vec<&'a BackendSpec> {
    let ours: Vec<&BackendSpec> = svc
        .backends
        .iter()
        .filter(|b| node_name.is_some() && b.node.as_deref() == node_name)
        .collect();
    if ours.iter().any(|b| !b.terminating) {
        ours.into_iter().filter(|b| !b.terminating).collect()
    } else {
        ours
    }
}

fn table_digest_of(maps: &Maps, table_id: u32) -> Result<Option<u64>> {
    match maps.lb_tables.get(&table_id, 0) {
        Ok(t) => Ok(Some(digest(&t))),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(e).context("reading a selection table"),
    }
}

/// Sets or clears one of `config_flags` in the datapath's config, writing only a change.
fn set_config_flag(maps: &mut Maps, flag: u32, on: bool, stats: &mut ApplyStats) -> Result<()> {
    let mut cfg = maps
        .config
        .get(&0, 0)
        .context("reading the datapath config")?;
    if (cfg.flags & flag != 0) == on {
        return Ok(());
    }
    cfg.flags ^= flag;
    maps.config
        .set(0, cfg, 0)
        .context("writing the datapath config")?;
    stats.map_writes += 1;
    Ok(())
}

fn check_node_ports(desired: &DesiredState, (min, max): (u16, u16)) -> Result<()> {
    for (i, svc) in desired.services.iter().enumerate() {
        if svc.is_node_port() && !(min..=max).contains(&svc.port) {
            bail!(
                "services[{i}] ({}): node port {} is outside --nodeport-range {min}-{max}",
                svc.name,
                svc.port
            );
        }
    }
    Ok(())
}

/// A selection table has `LB_TABLE_SIZE` slots: every active backend needs at least one; and
/// the tables map holds `MAX_SERVICES` tables, a Local frontend's two included. Checked before
/// any write, so a state that cannot be programmed changes nothing.
fn check_capacity(desired: &DesiredState) -> Result<()> {
    let tables = desired.services.len() + desired.services.iter().filter(|s| is_local(s)).count();
    if tables > MAX_SERVICES as usize - 1 {
        bail!(
            "{} services ({tables} selection tables with those of externalTrafficPolicy: Local) \
             are more than the {} tables the datapath holds",
            desired.services.len(),
            MAX_SERVICES - 1
        );
    }
    for (i, svc) in desired.services.iter().enumerate() {
        let active = svc.backends.iter().filter(|b| !b.terminating);
        let (count, weight) = active.fold((0usize, 0u64), |(c, w), b| (c + 1, w + b.weight as u64));
        if count > LB_TABLE_SIZE {
            bail!(
                "services[{i}] ({}): {count} active backends, at most {LB_TABLE_SIZE} are supported",
                svc.name
            );
        }
        let min = svc
            .backends
            .iter()
            .filter(|b| !b.terminating)
            .map(|b| b.weight as u64)
            .min();
        if let Some(min) = min
            && min * LB_TABLE_SIZE as u64 / weight.max(1) == 0
        {
            bail!(
                "services[{i}] ({}): weights add up to {weight}; a backend of weight {min} would get \
                 no slot in the {LB_TABLE_SIZE}-slot table (use smaller weight ratios)",
                svc.name
            );
        }
    }
    Ok(())
}

fn ignore_missing(r: Result<(), MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Affinity entries name a service id; a removed service's entries must not steer whoever gets
/// the id next.
fn purge_affinity(maps: &mut Maps, service_id: u32) -> Result<()> {
    let stale: Vec<AffinityKey> = maps
        .affinity
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.service_id == service_id)
        .collect();
    for k in stale {
        ignore_missing(maps.affinity.remove(&k))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tapestry_api::state::{BackendSpec, ServiceSpec, TrafficPolicy};

    use super::local_backends;

    fn backend(last: u8, node: Option<&str>, terminating: bool) -> BackendSpec {
        BackendSpec {
            node: node.map(str::to_owned),
            terminating,
            ..BackendSpec::new(Ipv4Addr::new(10, 0, 0, last))
        }
    }

    fn local_of(backends: Vec<BackendSpec>, node: Option<&str>) -> Vec<u8> {
        let svc = ServiceSpec {
            external_traffic_policy: TrafficPolicy::Local,
            backends,
            ..ServiceSpec::new("web", Ipv4Addr::UNSPECIFIED, 30080)
        };
        local_backends(&svc, node)
            .iter()
            .map(|b| b.ip.octets()[3])
            .collect()
    }

    #[test]
    fn the_local_set_is_this_nodes_ready_backends_else_its_terminating_ones() {
        let me = Some("node-a");
        // Ready ones of this node only; another node's and unnamed ones are never local.
        let mixed = vec![
            backend(1, me, false),
            backend(2, me, true),
            backend(3, Some("node-b"), false),
            backend(4, None, false),
        ];
        assert_eq!(local_of(mixed, me), [1]);
        // None of this node's ready: its terminating ones (kube-proxy's fallback for the local
        // set alone, though node-b has a ready one).
        let draining = vec![backend(2, me, true), backend(3, Some("node-b"), false)];
        assert_eq!(local_of(draining, me), [2]);
        // Nothing here: empty, so outside clients are dropped.
        let elsewhere = vec![backend(3, Some("node-b"), false)];
        assert!(local_of(elsewhere, me).is_empty());
        // A daemon that knows no node name has no local backend.
        assert!(local_of(vec![backend(1, me, false)], None).is_empty());
    }
}
