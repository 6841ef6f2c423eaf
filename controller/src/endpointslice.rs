//! The EndpointSlices a Service should have for the guests it selects: a pure function of the
//! Service, the Guests, the addresses already in the Service's pod slices, and node zones.
//!
//! It follows the built-in EndpointSlice controller (pkg/controller/endpointslice) wherever a
//! guest can stand in for a pod: same labels, owner reference, port resolution, conditions and
//! at most [`MAX_ENDPOINTS_PER_SLICE`] endpoints per slice. Where it differs: slice names are
//! deterministic (server-side apply needs a name up front, and a stable one means no churn), and
//! an address the built-in controller already publishes for the Service is left to it.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Write,
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use tapestry_k8s::{
    Guest,
    names::{self, labels},
};

use crate::error::Error;

/// The API's limit, and the built-in controller's default `--max-endpoints-per-slice`.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// An EndpointSlice's `addressType` (FQDN slices are never written here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressType {
    IPv4,
    IPv6,
}

impl AddressType {
    pub fn of(ip: &IpAddr) -> AddressType {
        match ip {
            IpAddr::V4(_) => AddressType::IPv4,
            IpAddr::V6(_) => AddressType::IPv6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
        }
    }

    fn parse(s: &str) -> Option<AddressType> {
        match s {
            "IPv4" => Some(AddressType::IPv4),
            "IPv6" => Some(AddressType::IPv6),
            _ => None,
        }
    }
}

/// The Service's label selector, or `None` when the Service has no endpoints of ours: no (or an
/// empty) selector — its endpoints are someone else's — or type ExternalName.
pub fn service_selector(service: &Service) -> Option<&BTreeMap<String, String>> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

/// Equality-based selection, as a Service's selector works: every pair must be among `labels`.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `slice` belongs to Service `namespace/name` (its service-name label).
pub fn is_slice_of(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.metadata.namespace.as_deref() == Some(namespace)
        && slice.labels().get(labels::SERVICE_NAME).map(String::as_str) == Some(name)
}

/// Who manages `slice`, from its managed-by label.
pub fn managed_by(slice: &EndpointSlice) -> Option<&str> {
    slice.labels().get(labels::MANAGED_BY).map(String::as_str)
}

/// Every address in the built-in controller's (pod) slices among `slices`: a guest with one of
/// these addresses already has an endpoint in the Service.
pub fn pod_addresses<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> HashSet<IpAddr> {
    slices
        .into_iter()
        .filter(|s| managed_by(s) == Some(names::BUILTIN_MANAGED_BY))
        .flat_map(|s| s.endpoints.iter())
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse().ok())
        .collect()
}

/// A Service port as an endpoint carries it; ordered so a port set has one spelling.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct PortKey {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
}

impl PortKey {
    fn to_endpoint_port(&self) -> EndpointPort {
        EndpointPort {
            name: Some(self.name.clone()),
            port: Some(self.port),
            protocol: Some(self.protocol.clone()),
            app_protocol: self.app_protocol.clone(),
        }
    }
}

/// The guest's port for each Service port it can serve, in the Service's order. A numeric
/// targetPort is taken as is; a named one resolves to the guest's declared port of that name and
/// protocol, and a guest that declares none gets no such port (podutil.FindPort).
fn guest_ports(service_ports: &[ServicePort], guest: &Guest) -> Vec<PortKey> {
    service_ports
        .iter()
        .filter_map(|sp| {
            let protocol = sp.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port = match &sp.target_port {
                None | Some(IntOrString::Int(0)) => sp.port,
                Some(IntOrString::Int(p)) => *p,
                Some(IntOrString::String(name)) => {
                    guest
                        .spec
                        .ports
                        .iter()
                        .find(|p| p.name == *name && p.protocol.as_str() == protocol)?
                        .port
                }
            };
            Some(PortKey {
                name: sp.name.clone().unwrap_or_default(),
                port,
                protocol,
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect()
}

/// The address families the Service has endpoints in: its `ipFamilies`, else those of its
/// cluster IPs, else both.
fn address_types(service: &Service) -> BTreeSet<AddressType> {
    let Some(spec) = service.spec.as_ref() else {
        return BTreeSet::new();
    };
    let from_families: BTreeSet<AddressType> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| AddressType::parse(f))
        .collect();
    if !from_families.is_empty() {
        return from_families;
    }
    let from_ips: BTreeSet<AddressType> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| AddressType::of(&ip))
        .collect();
    if !from_ips.is_empty() {
        return from_ips;
    }
    [AddressType::IPv4, AddressType::IPv6].into()
}

fn is_headless(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// Guest-level conditions, with the built-in controller's rules for pods: serving = the guest is
/// Ready; terminating = the Guest is being deleted; ready = serving and not terminating, or always
/// with `publishNotReadyAddresses`.
pub fn conditions(service: &Service, guest: &Guest) -> EndpointConditions {
    let publish_not_ready = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let serving = guest.is_ready();
    let terminating = guest.is_terminating();
    EndpointConditions {
        ready: Some(publish_not_ready || (serving && !terminating)),
        serving: Some(serving),
        terminating: Some(terminating),
    }
}

/// A guest address: `10.22.0.5`, or CIDR notation with the prefix ignored.
fn parse_guest_ip(s: &str) -> Option<IpAddr> {
    s.split('/').next()?.trim().parse().ok()
}

/// The name of a slice: `<service>-tapestry-<hash>`, the hash over the address type, the port set
/// and the chunk's index. The same grouping always gives the same names, so a reconcile applies
/// over the previous slices instead of replacing them. It cannot collide with the built-in
/// controller's names (`<service>-` and five characters).
pub fn slice_name(
    service: &str,
    address_type: AddressType,
    ports: &[EndpointPort],
    index: usize,
) -> String {
    let mut key = format!("{}|", address_type.as_str());
    for p in ports {
        let _ = write!(
            key,
            "{}/{}/{}/{};",
            p.name.as_deref().unwrap_or(""),
            p.port.unwrap_or(0),
            p.protocol.as_deref().unwrap_or(""),
            p.app_protocol.as_deref().unwrap_or("")
        );
    }
    let _ = write!(key, "|{index}");
    let digest = Sha256::digest(key.as_bytes());
    let mut hash = String::with_capacity(10);
    for b in &digest[..5] {
        let _ = write!(hash, "{b:02x}");
    }
    format!("{service}-tapestry-{hash}")
}

/// The labels of every slice of ours for `service`: the Service's own labels (as the built-in
/// controller copies them, so kube-proxy's label filters see the same), the service name, our
/// managed-by value, and the headless marker.
fn slice_labels(service: &Service, name: &str) -> BTreeMap<String, String> {
    let mut out = service.labels().clone();
    out.remove(labels::HEADLESS);
    out.insert(labels::SERVICE_NAME.into(), name.into());
    out.insert(labels::MANAGED_BY.into(), names::MANAGED_BY.into());
    if is_headless(service) {
        out.insert(labels::HEADLESS.into(), String::new());
    }
    out
}

/// One endpoint before chunking, with what decides between two guests claiming one address.
struct Candidate {
    ip: IpAddr,
    guest: (String, String),
    endpoint: Endpoint,
}

impl Candidate {
    /// Lower is better: ready, then serving, then not terminating, then by guest name.
    fn rank(&self) -> (bool, bool, bool, &(String, String)) {
        let c = self.endpoint.conditions.as_ref();
        let flag = |f: fn(&EndpointConditions) -> Option<bool>| c.and_then(f).unwrap_or(false);
        (
            !flag(|c| c.ready),
            !flag(|c| c.serving),
            flag(|c| c.terminating),
            &self.guest,
        )
    }
}

/// The slices Service `service` should have for `guests` (any namespace: only the Service's own
/// are considered), leaving out every address in `pod_addresses`. `zone_of` gives a node's zone.
/// Slices come in a stable order, each fully formed for server-side apply.
pub fn desired_slices<'a>(
    service: &Service,
    guests: impl IntoIterator<Item = &'a Guest>,
    pod_addresses: &HashSet<IpAddr>,
    zone_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<EndpointSlice>, Error> {
    let Some(selector) = service_selector(service) else {
        return Ok(Vec::new());
    };
    let (namespace, name) = namespace_and_name(&service.metadata)?;
    let uid = service
        .metadata
        .uid
        .as_deref()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let spec = service
        .spec
        .as_ref()
        .ok_or(Error::MissingObjectKey("spec"))?;
    let service_ports = spec.ports.as_deref().unwrap_or_default();
    let families = address_types(service);

    let mut groups: BTreeMap<(AddressType, Vec<PortKey>), BTreeMap<IpAddr, Candidate>> =
        BTreeMap::new();
    for guest in guests {
        if guest.metadata.namespace.as_deref() != Some(namespace)
            || !selects(selector, guest.labels())
        {
            continue;
        }
        let ports = guest_ports(service_ports, guest);
        // A Service with ports needs at least one the guest serves; a headless Service without
        // ports takes every guest, with no ports.
        if ports.is_empty() && !service_ports.is_empty() {
            continue;
        }
        let guest_name = guest.name_any();
        let node = Some(guest.spec.node_name.clone()).filter(|n| !n.is_empty());
        let zone = node.as_deref().and_then(zone_of);
        let conditions = conditions(service, guest);
        for ip in guest.spec.ips.iter().filter_map(|s| parse_guest_ip(s)) {
            let address_type = AddressType::of(&ip);
            if !families.contains(&address_type) || pod_addresses.contains(&ip) {
                continue;
            }
            let candidate = Candidate {
                ip,
                guest: (namespace.to_string(), guest_name.clone()),
                endpoint: Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(conditions.clone()),
                    node_name: node.clone(),
                    zone: zone.clone(),
                    target_ref: Some(ObjectReference {
                        api_version: Some(names::GROUP_VERSION.into()),
                        kind: Some(names::GUEST_KIND.into()),
                        namespace: Some(namespace.into()),
                        name: Some(guest_name.clone()),
                        uid: guest.metadata.uid.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            };
            // Two guests with one address (a migration caught half-way): one endpoint, the
            // best-conditioned guest's.
            let group = groups.entry((address_type, ports.clone())).or_default();
            match group.get(&candidate.ip) {
                Some(have) if have.rank() <= candidate.rank() => {}
                _ => {
                    group.insert(candidate.ip, candidate);
                }
            }
        }
    }

    let labels = slice_labels(service, name);
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut slices = Vec::new();
    for ((address_type, ports), endpoints) in groups {
        let ports: Vec<EndpointPort> = ports.iter().map(PortKey::to_endpoint_port).collect();
        let endpoints: Vec<Endpoint> = endpoints.into_values().map(|c| c.endpoint).collect();
        for (index, chunk) in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(slice_name(name, address_type, &ports, index)),
                    namespace: Some(namespace.into()),
                    labels: Some(labels.clone()),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                address_type: address_type.as_str().into(),
                endpoints: chunk.to_vec(),
                ports: Some(ports.clone()),
            });
        }
    }
    Ok(slices)
}

/// Whether `existing` already says what `desired` says (the fields we apply), so that applying
/// would change nothing.
pub fn same_content(desired: &EndpointSlice, existing: &EndpointSlice) -> bool {
    let ports = |s: &EndpointSlice| s.ports.clone().unwrap_or_default();
    desired.address_type == existing.address_type
        && desired.endpoints == existing.endpoints
        && ports(desired) == ports(existing)
        && desired.metadata.labels.as_ref() == Some(existing.labels())
        && desired
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default()
            == existing.owner_references()
}

/// `metadata.namespace` and `metadata.name` of a namespaced object, which the API server always
/// sets.
pub fn namespace_and_name(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(&str, &str), Error> {
    let namespace = meta
        .namespace
        .as_deref()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = meta
        .name
        .as_deref()
        .ok_or(Error::MissingObjectKey("metadata.name"))?;
    Ok((namespace, name))
}

#[cfg(test)]
mod tests;
