//! What the local API, the CLI and Prometheus read: status, services with their backends,
//! conntrack, flows with identities, guests.
//!
//! Views are built from snapshots (what the reconciler programmed, a copy of the registry's
//! entries) and the views' own map handles, so walking a full conntrack table blocks neither the
//! reconciler nor CNI ADD. They make one bpf syscall per entry: callers run them on a blocking
//! thread, never on an async worker.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use anyhow::{Context, Result};
use aya::maps::MapError;
use tapestry_api::types::{
    Algorithm, AttachmentInfo, BackendInfo, BackendKind, BackendState, ConntrackEntry,
    EndpointKind, FlowDirection, FlowsResponse, GuestInfo, Identity, MapFill, Mode, Protocol,
    ServiceInfo, SessionAffinity, Status, Traffic,
};
use tapestry_common::{
    COUNTERS, Counter, CtEntry, CtKey, DROP_REASONS, DropReason, MAX_AFFINITY, MAX_BACKENDS,
    MAX_CONNTRACK, MAX_SERVICES, TrafficStats, ct_direction, ct_flags, map_names,
};

use crate::{
    datapath::{Maps, Pins, conntrack, monotonic_ns},
    flows::FlowLog,
    guests::Endpoints,
    services::{Services, reconcile::frontend_of},
};

/// Where the views read from. Shared by every API request; holds no lock of its own.
pub struct Views {
    pub mode: Mode,
    pub flow_events: bool,
    pub services: Arc<Services>,
    pub endpoints: Arc<Endpoints>,
    pub pins: Pins,
    pub flows: Arc<FlowLog>,
    /// The views' own handles on the maps (reads only).
    maps: Maps,
}

fn sum_stats(v: &aya::maps::PerCpuValues<TrafficStats>) -> Traffic {
    let mut t = Traffic::default();
    for s in v.iter() {
        t.packets += s.packets;
        t.bytes += s.bytes;
        t.flows += s.flows;
    }
    t
}

fn addr(ip: u32, port: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(ip.to_ne_bytes()),
        u16::from_be(port)
    )
}

impl Views {
    pub fn new(
        mode: Mode,
        flow_events: bool,
        services: Arc<Services>,
        endpoints: Arc<Endpoints>,
        pins: Pins,
        flows: Arc<FlowLog>,
    ) -> Result<Self> {
        Ok(Views {
            maps: Maps::open(pins.dir())?,
            mode,
            flow_events,
            services,
            endpoints,
            pins,
            flows,
        })
    }

    pub fn counters(&self) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
        let maps = &self.maps;
        let mut counters = BTreeMap::new();
        for i in 0..COUNTERS {
            if let Some(c) = Counter::from_u32(i) {
                let v = maps.counters.get(&i, 0)?;
                counters.insert(c.name().to_owned(), v.iter().sum());
            }
        }
        let mut drops = BTreeMap::new();
        for i in 0..DROP_REASONS {
            if let Some(r) = DropReason::from_u32(i) {
                let v = maps.drops.get(&i, 0)?;
                drops.insert(r.name().to_owned(), v.iter().sum());
            }
        }
        Ok((counters, drops))
    }

    fn conntrack_entries(&self) -> Vec<(CtKey, CtEntry)> {
        conntrack::entries(&self.maps.conntrack)
    }

    pub fn attachments(&self) -> Vec<AttachmentInfo> {
        self.pins
            .attachments()
            .into_iter()
            .map(|a| AttachmentInfo {
                ifindex: a.ifindex,
                ifname: a.ifname,
            })
            .collect()
    }

    pub fn status(&self) -> Result<Status> {
        let (counters, drops) = self.counters()?;
        let programmed = self.services.programmed();
        let st = self.services.status();
        let dir = self.pins.dir();
        let count = |n: usize| n as u64;
        let ct = count(self.maps.conntrack.keys().count());
        let affinity = count(self.maps.affinity.keys().count());
        let fill = |name: &str, entries: u64, max: u32| MapFill {
            name: name.to_owned(),
            entries,
            max_entries: max as u64,
            pinned: dir.join(name).exists(),
        };
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.mode,
            source: st.source.source.clone(),
            generation: st.generation,
            last_error: st
                .apply_error
                .clone()
                .or_else(|| st.source.last_error.clone()),
            bpffs_dir: dir.display().to_string(),
            program_pinned: self.pins.program_pinned(),
            attachments: self.attachments(),
            maps: vec![
                fill(
                    map_names::SERVICES,
                    count(programmed.services.len()),
                    MAX_SERVICES,
                ),
                fill(
                    map_names::BACKENDS,
                    count(programmed.backend_count()),
                    MAX_BACKENDS,
                ),
                fill(map_names::CONNTRACK, ct, MAX_CONNTRACK),
                fill(map_names::AFFINITY, affinity, MAX_AFFINITY),
            ],
            counters,
            drops,
            services: programmed.services.len(),
            backends: programmed.backend_count(),
            flow_events: self.flow_events,
        })
    }

    pub fn services(&self) -> Result<Vec<ServiceInfo>> {
        let maps = &self.maps;
        let programmed = self.services.programmed();
        let now = monotonic_ns();
        // Live forward flows per (service, backend).
        let mut flows: HashMap<(u32, u32), u64> = HashMap::new();
        for (k, e) in self.conntrack_entries() {
            if k.direction == ct_direction::FORWARD && conntrack::is_live(&k, &e, now) {
                *flows.entry((e.service_id, e.backend_id)).or_default() += 1;
            }
        }
        let mut out = Vec::new();
        for (key, ps) in &programmed.services {
            let (vip, port, proto) = frontend_of(key);
            // The reconciler writes TCP and UDP frontends only.
            let Some(protocol) = Protocol::from_ip_proto(proto) else {
                continue;
            };
            let traffic = match maps.service_stats.get(&ps.id, 0) {
                Ok(v) => sum_stats(&v),
                Err(MapError::KeyNotFound) => Traffic::default(),
                Err(e) => return Err(e).context("reading service stats"),
            };
            let spec = programmed.spec(ps);
            let mut backends = Vec::new();
            if let Some(spec) = spec {
                for (b, id) in spec.backends.iter().zip(&ps.backend_ids) {
                    let traffic = maps
                        .backend_stats
                        .get(id, 0)
                        .map(|v| sum_stats(&v))
                        .unwrap_or_default();
                    let state = if b.terminating {
                        BackendState::Terminating
                    } else {
                        BackendState::Active
                    };
                    backends.push(BackendInfo {
                        id: *id,
                        ip: b.ip,
                        port: b.target_port(spec),
                        weight: b.weight,
                        name: b.name.clone(),
                        kind: b.kind.into(),
                        state,
                        traffic,
                        active_flows: flows.get(&(ps.id, *id)).copied().unwrap_or(0),
                    });
                }
            } else if let Ok(table) = maps.lb_tables.get(&ps.id, 0) {
                // Restored from the pins but not yet reprogrammed (no desired state since the
                // start, e.g. the apiserver is away): the backends come from the selection
                // table, where every slot holds an active backend's id once any is active.
                let mut ids: Vec<u32> = if ps.entry.backend_count > 0 {
                    table.backends.to_vec()
                } else {
                    Vec::new()
                };
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    let Some(addr) = programmed.backends.get(&id) else {
                        continue;
                    };
                    backends.push(BackendInfo {
                        id,
                        ip: addr.ip,
                        port: addr.port,
                        weight: 0,
                        name: None,
                        kind: BackendKind::Unknown,
                        state: BackendState::Active,
                        traffic: maps
                            .backend_stats
                            .get(&id, 0)
                            .map(|v| sum_stats(&v))
                            .unwrap_or_default(),
                        active_flows: flows.get(&(ps.id, id)).copied().unwrap_or(0),
                    });
                }
            }
            let active_flows = flows
                .iter()
                .filter(|((s, _), _)| *s == ps.id)
                .map(|(_, n)| *n)
                .sum();
            out.push(ServiceInfo {
                name: spec.map(|s| s.name.clone()).unwrap_or_default(),
                id: ps.id,
                vip,
                port,
                protocol,
                algorithm: spec.map_or(Algorithm::Random, |s| s.algorithm),
                session_affinity: spec.map_or(SessionAffinity::None, |s| s.session_affinity),
                session_affinity_timeout_seconds: ps.entry.affinity_timeout_s,
                active_backends: ps.entry.backend_count,
                traffic,
                active_flows,
                backends,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub fn conntrack(&self) -> Vec<ConntrackEntry> {
        let now = monotonic_ns();
        let names = self.services.programmed().names();
        let mut out: Vec<ConntrackEntry> = self
            .conntrack_entries()
            .into_iter()
            .filter(|(k, e)| conntrack::is_live(k, e, now))
            .filter_map(|(k, e)| {
                let forward = k.direction == ct_direction::FORWARD;
                // The datapath tracks TCP and UDP flows only.
                let protocol = Protocol::from_ip_proto(k.proto)?;
                Some(ConntrackEntry {
                    direction: if forward {
                        FlowDirection::Forward
                    } else {
                        FlowDirection::Reply
                    },
                    protocol,
                    src: addr(k.saddr, k.sport),
                    dst: addr(k.daddr, k.dport),
                    nat: addr(e.nat_addr, e.nat_port),
                    service_id: e.service_id,
                    service: names.get(&e.service_id).cloned(),
                    backend_id: e.backend_id,
                    idle_seconds: now.saturating_sub(e.last_seen_ns) as f64 / 1e9,
                    age_seconds: now.saturating_sub(e.created_ns) as f64 / 1e9,
                    closing: e.flags & ct_flags::CLOSING != 0,
                    hairpin: e.flags & ct_flags::HAIRPIN != 0,
                    seen_reply: e.flags & ct_flags::SEEN_REPLY != 0,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        out
    }

    /// Who each known address is: endpoints registered on this node, then service backends
    /// named in the desired state.
    pub fn identities(&self) -> HashMap<Ipv4Addr, Identity> {
        let mut ids = HashMap::new();
        let programmed = self.services.programmed();
        for (_, ps) in &programmed.services {
            if let Some(spec) = programmed.spec(ps) {
                for b in &spec.backends {
                    if let Some(name) = &b.name {
                        ids.entry(b.ip).or_insert_with(|| Identity {
                            kind: b.kind,
                            name: name.clone(),
                            namespace: None,
                        });
                    }
                }
            }
        }
        for ep in self.endpoints.list() {
            let r = &ep.request;
            let Some(pod) = &r.pod else { continue };
            for ip in &r.ips {
                if let Some(Ok(addr)) = ip.split('/').next().map(str::parse::<Ipv4Addr>) {
                    ids.insert(
                        addr,
                        Identity {
                            kind: if r.vm.is_some() {
                                EndpointKind::Vm
                            } else {
                                EndpointKind::Pod
                            },
                            name: pod.name.clone(),
                            namespace: Some(pod.namespace.clone()),
                        },
                    );
                }
            }
        }
        ids
    }

    /// Flow events since `since`, with services and endpoints named.
    pub fn flows(&self, since: u64) -> Result<FlowsResponse> {
        let (mut flows, next, overflowed) = self.flows.since(since);
        let names = self.services.programmed().names();
        let ids = self.identities();
        let who = |a: &str| {
            a.rsplit_once(':')
                .and_then(|(ip, _)| ip.parse::<Ipv4Addr>().ok())
                .and_then(|ip| ids.get(&ip).cloned())
        };
        for f in &mut flows {
            f.service = names.get(&f.service_id).cloned();
            f.src_identity = who(&f.src);
            f.dst_identity = who(&f.dst);
            f.backend_identity = f.backend.as_deref().and_then(who);
        }
        let (counters, _) = self.counters()?;
        let lost = counters
            .get(Counter::EventsLost.name())
            .copied()
            .unwrap_or(0)
            + overflowed;
        Ok(FlowsResponse { flows, next, lost })
    }

    pub fn guests(&self) -> Vec<GuestInfo> {
        self.endpoints.guests()
    }
}
