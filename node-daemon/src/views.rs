//! What the local API, the CLI and Prometheus read: status, services with their backends,
//! conntrack, flows with identities, guests.
//!
//! Views are built from snapshots (what the reconciler programmed, a copy of the registry's
//! entries) and the views' own map handles, so walking a full conntrack table blocks neither the
//! reconciler nor CNI ADD. They make one bpf syscall per entry: callers run them on a blocking
//! thread, never on an async worker.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use anyhow::{Context, Result};
use aya::maps::MapError;
use tapestry_api::types::{
    Algorithm, AttachmentInfo, BackendInfo, BackendKind, BackendState, ConntrackEntry,
    EndpointKind, FlowDirection, FlowKind, FlowRecord, FlowsResponse, GuestInfo, GuestMove,
    Identity, MapFill, Mode, Protocol, ServiceInfo, SessionAffinity, Status, Traffic,
};
use tapestry_common::{
    COUNTERS, Counter, CtEntry, CtKey, DROP_REASONS, DropReason, MAX_AFFINITY, MAX_BACKENDS,
    MAX_CONNTRACK, MAX_CONNTRACK_ANY, MAX_SERVICES, TrafficStats, ct_direction, ct_flags,
    map_names,
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
    /// /metrics' last text, shared by concurrent scrapers (`metrics::scrape`).
    pub scrapes: crate::metrics::Scrapes,
}

/// The conntrack tables' accounting, which the status shows as their evictions.
fn is_accounting(c: Counter) -> bool {
    matches!(
        c,
        Counter::ConntrackCreated
            | Counter::ConntrackAnyCreated
            | Counter::ConntrackRemoved
            | Counter::ConntrackAnyRemoved
            | Counter::ConntrackCollected
            | Counter::ConntrackAnyCollected
    )
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

/// Where backends are: the nodes the desired state names, and this node for the endpoints
/// registered here.
#[derive(Debug, Clone, Default)]
struct Whereabouts {
    /// This node's name.
    local: Option<String>,
    /// Addresses of the endpoints registered on this node (by the CNI plugin).
    local_ips: HashSet<Ipv4Addr>,
    /// Nodes by backend address, as the desired state names them.
    named: HashMap<Ipv4Addr, String>,
    /// Guests that moved by live migration: where each address lives now.
    moved: BTreeMap<Ipv4Addr, GuestMove>,
}

impl Whereabouts {
    /// The node of the backend at `ip` that the desired state places on `named`.
    fn node(&self, ip: Ipv4Addr, named: Option<&str>) -> Option<String> {
        named
            .map(str::to_owned)
            .or_else(|| self.local_ips.contains(&ip).then(|| self.local.clone())?)
    }

    /// The node of any address: where it moved last, else named by the desired state, or
    /// local.
    fn node_of(&self, ip: Ipv4Addr) -> Option<String> {
        if let Some(m) = self.moved.get(&ip) {
            return Some(m.to_node.clone());
        }
        self.node(ip, self.named.get(&ip).map(String::as_str))
    }

    /// Names the nodes of a flow: the client's is this node for every flow it balanced (it saw
    /// the flow leave the client); for other events (a reply's drop) it is the source's, when
    /// known.
    fn name_flow(&self, f: &mut FlowRecord) {
        let ip_of = |a: &str| {
            a.rsplit_once(':')
                .and_then(|(ip, _)| ip.parse::<Ipv4Addr>().ok())
        };
        let balanced_here =
            matches!(f.kind, FlowKind::New | FlowKind::Reselected) || f.service_id != 0;
        f.src_node = if balanced_here {
            self.local.clone()
        } else {
            ip_of(&f.src).and_then(|ip| self.node_of(ip))
        };
        let backend = f.backend.as_deref().and_then(ip_of);
        f.backend_node = backend.and_then(|ip| self.node_of(ip));
        f.backend_moved = backend.and_then(|ip| self.moved.get(&ip).cloned());
        f.src_moved = ip_of(&f.src).and_then(|ip| self.moved.get(&ip).cloned());
    }
}

/// This machine's hostname (the node's name when the source names none).
pub(crate) fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
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
            scrapes: Default::default(),
        })
    }

    pub fn counters(&self) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
        let maps = &self.maps;
        let mut counters = BTreeMap::new();
        for i in 0..COUNTERS {
            // The conntrack tables' accounting shows as their evictions (`MapFill::evicted`).
            if let Some(c) = Counter::from_u32(i).filter(|c| !is_accounting(*c)) {
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
        let (ct_tcp, ct_any) = self.maps.conntrack.counts();
        let affinity = count(self.maps.affinity.keys().count());
        let fill = |name: &str, entries: u64, max: u32| MapFill {
            name: name.to_owned(),
            entries,
            max_entries: max as u64,
            pinned: dir.join(name).exists(),
            evicted: None,
        };
        // After the walk: what was created meanwhile is mostly in it.
        let (evicted_tcp, evicted_any) = self.maps.conntrack.evicted((ct_tcp, ct_any))?;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.mode,
            source: st.source.source.clone(),
            generation: st.generation,
            last_error: st
                .apply_error
                .clone()
                .or_else(|| st.source.last_error.clone())
                .or_else(|| st.health_check_error.clone()),
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
                MapFill {
                    evicted: Some(evicted_tcp),
                    ..fill(map_names::CONNTRACK, count(ct_tcp), MAX_CONNTRACK)
                },
                MapFill {
                    evicted: Some(evicted_any),
                    ..fill(map_names::CONNTRACK_ANY, count(ct_any), MAX_CONNTRACK_ANY)
                },
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
        let place = self.whereabouts();
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
                        node: place.node(b.ip, b.node.as_deref()),
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
                        node: place.node(addr.ip, None),
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

    /// This node's name: the source's (Kubernetes mode's `--node-name`), else the hostname.
    pub fn node_name(&self) -> Option<String> {
        self.services.status().source.node.or_else(hostname)
    }

    fn local_ips(&self) -> HashSet<Ipv4Addr> {
        self.endpoints
            .list()
            .iter()
            .flat_map(|ep| &ep.request.ips)
            .filter_map(|ip| ip.split('/').next()?.parse().ok())
            .collect()
    }

    fn whereabouts(&self) -> Whereabouts {
        let programmed = self.services.programmed();
        let mut named = HashMap::new();
        for (_, ps) in &programmed.services {
            for b in programmed.spec(ps).into_iter().flat_map(|s| &s.backends) {
                if let Some(node) = &b.node {
                    named.entry(b.ip).or_insert_with(|| node.clone());
                }
            }
        }
        Whereabouts {
            local: self.node_name(),
            local_ips: self.local_ips(),
            named,
            moved: self
                .endpoints
                .moves()
                .iter()
                .map(|(ip, o)| (*ip, o.as_move()))
                .collect(),
        }
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
        let place = self.whereabouts();
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
            place.name_flow(f);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn place() -> Whereabouts {
        Whereabouts {
            local: Some("node-a".into()),
            local_ips: HashSet::from([Ipv4Addr::new(10, 1, 0, 5)]),
            named: HashMap::from([(Ipv4Addr::new(10, 2, 0, 7), "node-b".to_owned())]),
            moved: BTreeMap::new(),
        }
    }

    fn flow(kind: FlowKind, service_id: u32, src: &str, backend: Option<&str>) -> FlowRecord {
        FlowRecord {
            seq: 0,
            time: String::new(),
            unix_ms: 0,
            kind,
            verdict: if kind == FlowKind::Drop {
                tapestry_api::types::Verdict::Dropped
            } else {
                tapestry_api::types::Verdict::Forwarded
            },
            protocol: Some(Protocol::Tcp),
            src: src.into(),
            dst: "10.96.0.10:80".into(),
            backend: backend.map(Into::into),
            service: None,
            src_identity: None,
            dst_identity: None,
            backend_identity: None,
            src_node: None,
            backend_node: None,
            src_moved: None,
            backend_moved: None,
            drop_reason: None,
            ifindex: 4,
            service_id,
        }
    }

    #[test]
    fn a_backend_is_where_the_state_says_else_here_if_registered_here() {
        let p = place();
        let (local, remote) = (Ipv4Addr::new(10, 1, 0, 5), Ipv4Addr::new(10, 2, 0, 9));
        assert_eq!(p.node(local, None).as_deref(), Some("node-a"));
        assert_eq!(p.node(remote, None), None, "unknown, not this node");
        assert_eq!(p.node(remote, Some("node-c")).as_deref(), Some("node-c"));
        let nameless = Whereabouts {
            local: None,
            ..place()
        };
        assert_eq!(nameless.node(local, None), None);
    }

    #[test]
    fn flows_name_the_clients_and_the_backends_nodes() {
        let p = place();
        // Balanced here: the client is on this node, wherever its address is from.
        let mut f = flow(FlowKind::New, 1, "10.9.0.3:40000", Some("10.2.0.7:8080"));
        p.name_flow(&mut f);
        assert_eq!(
            (f.src_node.as_deref(), f.backend_node.as_deref()),
            (Some("node-a"), Some("node-b"))
        );
        let mut f = flow(
            FlowKind::Reselected,
            1,
            "10.9.0.3:40000",
            Some("10.1.0.5:8080"),
        );
        p.name_flow(&mut f);
        assert_eq!(
            (f.src_node.as_deref(), f.backend_node.as_deref()),
            (Some("node-a"), Some("node-a"))
        );
        // A new connection refused by a service without backends: still this node's client.
        let mut f = flow(FlowKind::Drop, 3, "10.9.0.3:40000", None);
        p.name_flow(&mut f);
        assert_eq!(
            (f.src_node.as_deref(), f.backend_node),
            (Some("node-a"), None)
        );
        // A reply dropped on its way to the client: the source is the backend.
        let mut f = flow(FlowKind::Drop, 0, "10.2.0.7:8080", None);
        p.name_flow(&mut f);
        assert_eq!(f.src_node.as_deref(), Some("node-b"));
        let mut f = flow(FlowKind::Drop, 0, "198.51.100.1:443", None);
        p.name_flow(&mut f);
        assert_eq!(f.src_node, None);
    }

    #[test]
    fn a_guest_that_moved_is_where_it_moved_to_whatever_the_state_says() {
        let mut p = place();
        let guest = Ipv4Addr::new(10, 2, 0, 7);
        let moved = GuestMove {
            from_node: "node-b".into(),
            to_node: "node-c".into(),
            switchover: "2026-12-04T04:00:00.5Z".into(),
            switchover_unix_ms: 1_796_356_800_500,
        };
        p.moved.insert(guest, moved.clone());
        // The slice may still name the source's node: the move is what routes it.
        let mut f = flow(FlowKind::New, 1, "10.9.0.3:40000", Some("10.2.0.7:8080"));
        p.name_flow(&mut f);
        assert_eq!(f.backend_node.as_deref(), Some("node-c"));
        assert_eq!(f.backend_moved.as_ref(), Some(&moved));
        assert_eq!(f.src_moved, None);
        // The guest as the client of a reply that was dropped.
        let mut f = flow(FlowKind::Drop, 0, "10.2.0.7:8080", None);
        p.name_flow(&mut f);
        assert_eq!(
            (f.src_node.as_deref(), f.src_moved.as_ref()),
            (Some("node-c"), Some(&moved))
        );
        // Another backend is not touched.
        let mut f = flow(FlowKind::New, 1, "10.9.0.3:40000", Some("10.1.0.5:8080"));
        p.name_flow(&mut f);
        assert_eq!(
            (f.backend_node.as_deref(), f.backend_moved),
            (Some("node-a"), None)
        );
    }
}
