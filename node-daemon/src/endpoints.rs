//! Endpoints registered by the CNI plugin: every pod's host-side veth gets the Service datapath;
//! a VM pod also gets its guest cross-connect and a DHCP server. The registry is persisted in the
//! daemon's state directory, so a restarted daemon finds its guests again.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tapestry_api::types::{AttachmentKey, EndpointInfo, EndpointRequest, GuestInfo};
use tapestry_common::{DhcpFrame, DropReason, GuestStats, MAX_GUESTS};
use tracing::{debug, info, warn};

use crate::{
    datapath::{Datapath, Maps, ifindex_of},
    dhcp::{self, LeaseConfig, Outcome},
    guest::{self, GuestWiring},
    netns,
};

/// Why an endpoint request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The request is wrong: the caller must fix it (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Something named in the request does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub struct Guest {
    pub slot: u32,
    pub mac: [u8; 6],
    pub lease: LeaseConfig,
    pub tap_mac: [u8; 6],
    socket: OwnedFd,
    pub bound: bool,
}

pub struct Endpoint {
    pub request: EndpointRequest,
    pub host_ifindex: u32,
    pub guest: Option<Guest>,
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

pub struct Endpoints {
    state_file: PathBuf,
    entries: BTreeMap<(String, String), Endpoint>,
    slots: BTreeSet<u32>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], EndpointError> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| EndpointError::Invalid(format!("invalid MAC address {s:?}")))?;
    parts
        .try_into()
        .map_err(|_| EndpointError::Invalid(format!("invalid MAC address {s:?}")))
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
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

fn sum_guest_stats(maps: &Maps, slot: u32) -> GuestStats {
    let mut total = GuestStats::default();
    if let Ok(per_cpu) = maps.guest_stats.get(&slot, 0) {
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

fn zero_guest_stats(maps: &mut Maps, slot: u32) -> Result<()> {
    let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let zeros = aya::maps::PerCpuValues::try_from(vec![GuestStats::default(); n])?;
    maps.guest_stats.set(slot, zeros, 0)?;
    Ok(())
}

impl Endpoints {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_file: state_dir.join("endpoints.json"),
            entries: BTreeMap::new(),
            slots: BTreeSet::new(),
        }
    }

    fn persist(&self) -> Result<()> {
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
        if let Some(dir) = self.state_file.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self.state_file.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&p)?)?;
        fs::rename(&tmp, &self.state_file)
            .with_context(|| format!("writing {}", self.state_file.display()))
    }

    /// Re-establishes the endpoints of an earlier run whose pods still exist; forgets the rest
    /// and removes their guest links.
    pub fn restore(&mut self, datapath: &mut Datapath) -> Result<()> {
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
            let key = format!("{}/{}", p.request.container_id, p.request.ifname);
            if !Path::new(&p.request.netns).exists() {
                info!(
                    endpoint = key,
                    "pod gone while the daemon was down; forgetting it"
                );
                continue;
            }
            match self.establish(datapath, p.request, p.slot) {
                Ok(()) => {
                    if let Some(slot) = p.slot {
                        kept_slots.insert(slot);
                    }
                    if let Some(g) = self
                        .entries
                        .values_mut()
                        .find_map(|e| e.guest.as_mut().filter(|g| Some(g.slot) == p.slot))
                    {
                        g.bound = p.bound;
                    }
                }
                Err(e) => warn!(endpoint = key, error = %e, "could not restore endpoint"),
            }
        }
        for slot in guest::pinned_slots(datapath.pin_dir()) {
            if !kept_slots.contains(&slot) {
                let _ = guest::detach(datapath.pin_dir(), slot);
            }
        }
        if !self.entries.is_empty() {
            info!(endpoints = self.entries.len(), "restored endpoints");
        }
        self.persist()
    }

    /// CNI ADD. Idempotent: the same request again returns the same endpoint.
    pub fn add(
        &mut self,
        datapath: &mut Datapath,
        request: EndpointRequest,
    ) -> Result<EndpointInfo, EndpointError> {
        let key = (request.container_id.clone(), request.ifname.clone());
        if let Some(existing) = self.entries.get(&key) {
            if existing.request == request {
                return Ok(self.info(existing, &datapath.maps));
            }
            self.remove(datapath, &key.0, &key.1)?;
        }
        self.establish(datapath, request, None)?;
        self.persist()?;
        let ep = &self.entries[&key];
        info!(
            container = ep.request.container_id,
            host_ifname = ep.request.host_ifname,
            vm = ep.guest.is_some(),
            "endpoint added"
        );
        Ok(self.info(ep, &datapath.maps))
    }

    fn establish(
        &mut self,
        datapath: &mut Datapath,
        request: EndpointRequest,
        slot: Option<u32>,
    ) -> Result<(), EndpointError> {
        if request.container_id.is_empty() || request.ifname.is_empty() {
            return Err(EndpointError::Invalid(
                "containerId and ifname are required".into(),
            ));
        }
        let host_ifindex = ifindex_of(&request.host_ifname).map_err(|_| {
            EndpointError::NotFound(format!(
                "host interface {:?} does not exist in the daemon's network namespace",
                request.host_ifname
            ))
        })?;
        let fresh = slot.is_none();
        let guest = match &request.vm {
            Some(vm) => {
                let lease = lease_for(&request)?;
                let mac = parse_mac(&vm.guest_mac)?;
                let slot = match slot {
                    Some(s) => s,
                    None => (1..MAX_GUESTS)
                        .find(|s| !self.slots.contains(s))
                        .ok_or_else(|| {
                            EndpointError::Invalid(format!("more than {} guests", MAX_GUESTS - 1))
                        })?,
                };
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
                    mac,
                    ip: lease.ip,
                };
                if fresh {
                    // A restored guest keeps its counters; a new one starts from zero.
                    zero_guest_stats(&mut datapath.maps, slot)?;
                }
                let attached = guest::attach(datapath.pin_dir(), &wiring).map_err(|e| {
                    let _ = guest::detach(datapath.pin_dir(), slot);
                    EndpointError::Internal(e)
                })?;
                debug!(slot, tap_ifindex = attached.tap_ifindex, "guest attached");
                Some(Guest {
                    slot,
                    mac,
                    lease,
                    tap_mac: attached.tap_mac,
                    socket: attached.socket,
                    bound: false,
                })
            }
            None => None,
        };
        if let Err(e) = datapath.attach(&request.host_ifname) {
            if let Some(g) = &guest {
                let _ = guest::detach(datapath.pin_dir(), g.slot);
            }
            return Err(e.into());
        }
        if let Some(g) = &guest {
            self.slots.insert(g.slot);
        }
        self.entries.insert(
            (request.container_id.clone(), request.ifname.clone()),
            Endpoint {
                request,
                host_ifindex,
                guest,
            },
        );
        Ok(())
    }

    /// CNI DEL. Idempotent: an unknown endpoint is already removed.
    pub fn remove(
        &mut self,
        datapath: &mut Datapath,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<EndpointInfo>, EndpointError> {
        let key = (container_id.to_owned(), ifname.to_owned());
        let Some(ep) = self.entries.remove(&key) else {
            return Ok(None);
        };
        let info = self.info(&ep, &datapath.maps);
        if let Some(g) = &ep.guest {
            guest::detach(datapath.pin_dir(), g.slot)?;
            let _ = zero_guest_stats(&mut datapath.maps, g.slot);
            self.slots.remove(&g.slot);
        }
        datapath.detach(ep.host_ifindex)?;
        self.persist()?;
        info!(container = container_id, ifname, "endpoint removed");
        Ok(Some(info))
    }

    /// CNI GC: removes every endpoint not in `valid`.
    pub fn gc(
        &mut self,
        datapath: &mut Datapath,
        network: Option<&str>,
        valid: &[AttachmentKey],
    ) -> Result<Vec<EndpointInfo>, EndpointError> {
        let stale: Vec<(String, String)> = self
            .entries
            .iter()
            .filter(|(_, e)| network.is_none() || e.request.network.as_deref() == network)
            .map(|(k, _)| k)
            .filter(|(c, i)| !valid.iter().any(|v| &v.container_id == c && &v.ifname == i))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for (c, i) in stale {
            if let Some(info) = self.remove(datapath, &c, &i)? {
                removed.push(info);
            }
        }
        Ok(removed)
    }

    pub fn get(&self, container_id: &str, ifname: &str, maps: &Maps) -> Option<EndpointInfo> {
        self.entries
            .get(&(container_id.to_owned(), ifname.to_owned()))
            .map(|e| self.info(e, maps))
    }

    pub fn list(&self, maps: &Maps) -> Vec<EndpointInfo> {
        self.entries.values().map(|e| self.info(e, maps)).collect()
    }

    fn readiness(g: &Guest, stats: &GuestStats) -> (&'static str, String) {
        if g.bound {
            ("Ready", "the guest bound its address by DHCP".into())
        } else if stats.seen_ns != 0 {
            ("Ready", "the guest sent traffic from its address".into())
        } else if stats.dhcp > 0 {
            ("Attached", "DHCP in progress".into())
        } else {
            (
                "Attached",
                "no traffic from the guest yet (is the VM running?)".into(),
            )
        }
    }

    fn info(&self, e: &Endpoint, maps: &Maps) -> EndpointInfo {
        let (phase, reason) = match &e.guest {
            Some(g) => {
                let (p, r) = Self::readiness(g, &sum_guest_stats(maps, g.slot));
                (Some(p.to_owned()), Some(r))
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

    pub fn guests(&self, maps: &Maps) -> Vec<GuestInfo> {
        self.entries
            .values()
            .filter_map(|e| {
                let g = e.guest.as_ref()?;
                let vm = e.request.vm.as_ref()?;
                let s = sum_guest_stats(maps, g.slot);
                let (phase, reason) = Self::readiness(g, &s);
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
                    mac: fmt_mac(&g.mac),
                    ip: vm.guest_ip.clone(),
                    mtu: vm.mtu,
                    queues: vm.queues,
                    phase: phase.into(),
                    reason,
                    dhcp_bound: g.bound,
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

    /// Answers one DHCP frame queued by a guest program.
    pub fn handle_dhcp(&mut self, frame: &DhcpFrame) {
        let len = (frame.len as usize).min(frame.data.len());
        let Some(ep) = self
            .entries
            .values_mut()
            .find(|e| e.guest.as_ref().is_some_and(|g| g.slot == frame.slot))
        else {
            debug!(slot = frame.slot, "DHCP from an unknown guest slot");
            return;
        };
        let g = ep.guest.as_mut().expect("found by its guest");
        match dhcp::handle(&frame.data[..len], g.mac, g.tap_mac, &g.lease) {
            Outcome::Reply { frame, kind } => {
                if let Err(e) = netns::send_frame(&g.socket, &frame) {
                    warn!(container = ep.request.container_id, error = %e, "DHCP answer not sent");
                    return;
                }
                let was_bound = g.bound;
                g.bound = matches!(kind, dhcproto::v4::MessageType::Ack);
                debug!(container = ep.request.container_id, ?kind, "DHCP answered");
                if g.bound && !was_bound {
                    info!(container = ep.request.container_id, ip = %g.lease.ip, "guest bound its address by DHCP");
                    let _ = self.persist();
                }
            }
            Outcome::Released => {
                g.bound = false;
                info!(
                    container = ep.request.container_id,
                    "guest released its address"
                );
                let _ = self.persist();
            }
            Outcome::Ignored(why) => {
                debug!(
                    container = ep.request.container_id,
                    why, "DHCP message ignored"
                )
            }
        }
    }
}
