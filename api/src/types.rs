//! Request and response bodies of the node daemon's local API (JSON over HTTP/1.1 on a unix
//! socket). Field names are camelCase, as in Kubernetes objects.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::keyword::keyword_enum;
pub use crate::state::{Algorithm, EndpointKind, Protocol, SessionAffinity};

keyword_enum! {
    /// Where the daemon's desired state comes from.
    Mode (default Standalone) {
        /// A state file on this host.
        Standalone => "standalone",
        /// Services and EndpointSlices of the Kubernetes API.
        Kubernetes => "kubernetes",
    }
}

keyword_enum! {
    /// What runs behind a backend address, as far as the daemon knows.
    BackendKind (default Pod) {
        Pod => "pod",
        Vm => "vm",
        /// An address of a node: a host-network server, the apiserver behind `kubernetes`.
        Host => "host",
        /// An address outside the cluster (neither a pod's nor a node's).
        External => "external",
        /// Restored from the pinned maps, not yet in a desired state.
        Unknown => "unknown",
    }
}

impl From<EndpointKind> for BackendKind {
    fn from(k: EndpointKind) -> Self {
        match k {
            EndpointKind::Pod => BackendKind::Pod,
            EndpointKind::Vm => BackendKind::Vm,
            EndpointKind::Host => BackendKind::Host,
            EndpointKind::External => BackendKind::External,
        }
    }
}

keyword_enum! {
    /// Whether a backend takes new flows.
    BackendState (default Active) {
        Active => "active",
        /// Keeps its flows, gets no new ones (graceful drain).
        Terminating => "terminating",
    }
}

keyword_enum! {
    /// How far a guest has come.
    GuestPhase (default Attached) {
        /// Its tap and programs are in place.
        Attached => "Attached",
        /// It uses its address (DHCP bound, or traffic from it).
        Ready => "Ready",
    }
}

keyword_enum! {
    /// Which way a conntrack entry matches.
    FlowDirection (default Forward) {
        /// Client to frontend.
        Forward => "forward",
        /// Backend to client.
        Reply => "reply",
    }
}

keyword_enum! {
    /// What a flow event reports.
    FlowKind (default New) {
        New => "new",
        /// A flow whose backend went away moved to another.
        Reselected => "reselected",
        Drop => "drop",
        /// An event kind this daemon does not know (a newer datapath).
        Unknown => "unknown",
    }
}

keyword_enum! {
    /// What the datapath did with a packet.
    Verdict (default Forwarded) {
        Forwarded => "forwarded",
        Dropped => "dropped",
    }
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff` (parsing also takes upper case and `-`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Group (multicast or broadcast) addresses are never a station's own.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(b: [u8; 6]) -> Self {
        MacAddr(b)
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = String;

    fn try_from(b: &[u8]) -> Result<Self, String> {
        <[u8; 6]>::try_from(b)
            .map(MacAddr)
            .map_err(|_| format!("an Ethernet address has 6 bytes, not {}", b.len()))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid MAC address {s:?} (want six hex bytes, aa:bb:cc:dd:ee:ff)");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Default path of the daemon's socket.
pub const DEFAULT_SOCKET: &str = "/run/tapestry/tapestryd.sock";
/// Default bpffs directory of the daemon's pins.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/tapestry";
/// Default Prometheus listen address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9964";

pub mod paths {
    pub const STATUS: &str = "/v1/status";
    pub const SERVICES: &str = "/v1/services";
    pub const CONNTRACK: &str = "/v1/conntrack";
    pub const ATTACHMENTS: &str = "/v1/attachments";
    /// POST an `EndpointRequest` (CNI ADD); GET lists `EndpointInfo`s.
    pub const ENDPOINTS: &str = "/v1/endpoints";
    /// DELETE `/v1/endpoints/{containerId}/{ifname}` (CNI DEL; idempotent);
    /// GET the same path for one endpoint (CNI CHECK).
    pub const ENDPOINT: &str = "/v1/endpoints/{container_id}/{ifname}";
    /// POST an `EndpointGcRequest` (CNI GC).
    pub const ENDPOINTS_GC: &str = "/v1/endpoints-gc";
    /// GET `GuestInfo`s.
    pub const GUESTS: &str = "/v1/guests";
    /// GET `FlowsResponse`; `?since=<seq>` for newer events only.
    pub const FLOWS: &str = "/v1/flows";
    pub const METRICS: &str = "/metrics";
    pub const HEALTHZ: &str = "/healthz";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub version: String,
    pub mode: Mode,
    /// Where the desired state comes from ("file /etc/tapestry/state.yaml").
    pub source: String,
    /// Desired states fully programmed since the daemon started.
    pub generation: u64,
    /// The last desired state that could not be used, and why; the previous one stays in force.
    pub last_error: Option<String>,
    pub bpffs_dir: String,
    pub program_pinned: bool,
    pub attachments: Vec<AttachmentInfo>,
    pub maps: Vec<MapFill>,
    pub counters: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    pub services: usize,
    pub backends: usize,
    pub flow_events: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
    pub pinned: bool,
    /// Live entries the kernel evicted to make room, the table being full (the conntrack
    /// tables' LRU), since the table was created: what the datapath stored and neither it nor
    /// the daemon removed, and that is no longer there. Absent for the other maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentInfo {
    pub ifindex: u32,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachRequest {
    /// Host-side interface of an endpoint (a pod's veth).
    pub ifname: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows created (conntrack entries).
    pub flows: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    /// Empty for a service restored from the pinned maps and not in the desired state yet.
    pub name: String,
    pub id: u32,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub algorithm: Algorithm,
    pub session_affinity: SessionAffinity,
    pub session_affinity_timeout_seconds: u32,
    /// Backends that new flows may choose.
    pub active_backends: u32,
    pub traffic: Traffic,
    pub active_flows: u64,
    pub backends: Vec<BackendInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendInfo {
    pub id: u32,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub weight: u16,
    pub name: Option<String>,
    pub kind: BackendKind,
    /// The node it runs on: the desired state's (an EndpointSlice endpoint's `nodeName`), else
    /// this node for an endpoint registered here; omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub state: BackendState,
    /// Counted over every service that shares this backend address.
    pub traffic: Traffic,
    /// Live flows of this service to this backend.
    pub active_flows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackEntry {
    pub direction: FlowDirection,
    pub protocol: Protocol,
    pub src: String,
    pub dst: String,
    /// Forward: the backend written as destination. Reply: the frontend written as source.
    pub nat: String,
    pub service_id: u32,
    pub service: Option<String>,
    pub backend_id: u32,
    /// Seconds since the last packet.
    pub idle_seconds: f64,
    pub age_seconds: f64,
    pub closing: bool,
    pub hairpin: bool,
    pub seen_reply: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlushResult {
    pub removed: u64,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An endpoint (pod or VM pod) registered by the CNI plugin on ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRequest {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_IFNAME: the pod's interface inside its network namespace (usually `eth0`).
    pub ifname: String,
    /// CNI_NETNS: path of the pod's network namespace.
    pub netns: String,
    /// The pod's host-side interface (a veth in the daemon's namespace) where the Service
    /// datapath attaches.
    pub host_ifname: String,
    /// The pod's addresses from prevResult, CIDR notation ("10.22.0.5/16").
    pub ips: Vec<String>,
    /// Gateway from prevResult, if any.
    pub gateway: Option<Ipv4Addr>,
    /// MAC of the pod interface (`ifname`).
    pub mac: Option<MacAddr>,
    /// Pod identity from CNI_ARGS / runtimeConfig.
    pub pod: Option<PodRef>,
    /// Present for a VM pod: the tap the plugin created, which the guest owns.
    pub vm: Option<VmAttachment>,
    /// The CNI network (conflist `name`) that added it: GC of one network leaves the others'
    /// endpoints alone.
    #[serde(default)]
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// What the daemon needs to cross-connect a guest and answer its DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmAttachment {
    /// The tap in the pod's namespace (`tap0`).
    pub tap: String,
    /// The guest's MAC: the pod interface's MAC, handed to the guest.
    pub guest_mac: MacAddr,
    /// The guest's address and prefix ("10.22.0.5/16").
    pub guest_ip: String,
    pub mtu: u32,
    /// Routes for the guest beyond the default via `gateway` (CIDR -> gateway).
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub dns: DnsConfig,
    /// Hostname offered by DHCP (the pod name).
    pub hostname: Option<String>,
    pub queues: u32,
    /// Set for a live migration's target pod: its guest arrives from another VM pod and keeps
    /// that pod's address and MAC, which the daemon fills in from the source's Guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<IncomingMigration>,
}

/// Where a migration target's guest comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingMigration {
    /// The source VM pod, in the target pod's namespace (its `tapestry.dev/migration-source`
    /// annotation). Empty for a KubeVirt target ([`IncomingMigration::kubevirt_job`]): the
    /// daemon finds the source and fills it in.
    #[serde(default)]
    pub source_pod: String,
    /// A KubeVirt migration target's job (its `kubevirt.io/migrationJobName` annotation):
    /// KubeVirt does not name the source pod, so the daemon looks it up (the other running pod
    /// of the same VMI, by its `kubevirt.io/created-by` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubevirt_job: Option<String>,
    /// The node the source's Guest is on: filled in by the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    pub dst: String,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsConfig {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub search: Vec<String>,
    pub domain: Option<String>,
}

/// A registered endpoint as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    #[serde(flatten)]
    pub request: EndpointRequest,
    pub host_ifindex: u32,
    /// For a VM pod: Attached (tap created, programs attached) or Ready (the guest used its
    /// address: DHCP bound, ARP, or traffic with its own source).
    pub guest_phase: Option<GuestPhase>,
    pub guest_ready_reason: Option<String>,
}

/// CNI GC (1.1.0): endpoints not in this list are removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointGcRequest {
    /// Only endpoints added by this network are considered (all, when absent).
    #[serde(default)]
    pub network: Option<String>,
    pub valid: Vec<AttachmentKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

/// A KVM guest on this node (a VM pod's tap), with its readiness and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestInfo {
    /// The pod's name (or the container id when the runtime gave no pod identity).
    pub name: String,
    pub namespace: Option<String>,
    pub container_id: String,
    pub netns: String,
    pub tap: String,
    pub mac: MacAddr,
    pub ip: String,
    pub mtu: u32,
    pub queues: u32,
    pub phase: GuestPhase,
    /// Why it is (not yet) ready.
    pub reason: String,
    pub dhcp_bound: bool,
    /// Guest -> network.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Network -> guest.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub dhcp_messages: u64,
    /// RARP self-announcements from the guest's MAC (what QEMU sends after a live migration's
    /// switch-over), passed on to the pod network.
    #[serde(default)]
    pub announces: u64,
    /// Frames dropped from this guest, by reason (spoofed_mac, spoofed_ip, ...).
    pub drops: BTreeMap<String, u64>,
    /// Set when the guest arrived (or is arriving) here by live migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<GuestArrival>,
}

/// A guest's last move by live migration, as every node's daemon follows it (the Guest with
/// the newest switch-over for the address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestMove {
    pub from_node: String,
    pub to_node: String,
    /// When the guest went live on `to_node` (RFC 3339), and as Unix milliseconds.
    pub switchover: String,
    pub switchover_unix_ms: u64,
}

/// A guest's arrival by live migration, as its target node's datapath saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestArrival {
    /// The source VM pod (same namespace) and its node.
    pub source_pod: String,
    pub source_node: Option<String>,
    /// False while the target is dark (the guest still runs at the source).
    pub live: bool,
    /// When the guest sent its first frame here (RFC 3339).
    pub switchover: Option<String>,
    /// From the switch-over to the first frame the network sent the guest here, in ms (the
    /// Guest's `status.migration.blackoutMs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackout_ms: Option<u64>,
}

/// Who an address belongs to, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub kind: EndpointKind,
    pub name: String,
    pub namespace: Option<String>,
}

/// One flow event from the datapath, with VM and pod identities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRecord {
    /// Sequence number in the daemon's flow log.
    pub seq: u64,
    /// Wall-clock time the daemon read the event, RFC 3339.
    pub time: String,
    /// Unix time in milliseconds (for --since filters).
    pub unix_ms: u64,
    pub kind: FlowKind,
    pub verdict: Verdict,
    /// None for a protocol this daemon does not name.
    pub protocol: Option<Protocol>,
    pub src: String,
    pub dst: String,
    /// The backend chosen (new flows).
    pub backend: Option<String>,
    pub service: Option<String>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub backend_identity: Option<Identity>,
    /// The client's node, where known: the node that balanced the flow (the one reporting it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_node: Option<String>,
    /// The backend's node, where known (as in [`BackendInfo::node`]; for a guest that moved
    /// by live migration, the node it moved to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_node: Option<String>,
    /// The source's and the backend's last move by live migration, when the address is a
    /// guest's that moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_moved: Option<GuestMove>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_moved: Option<GuestMove>,
    pub drop_reason: Option<String>,
    pub ifindex: u32,
    /// The datapath's service id (0 when none).
    pub service_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowsResponse {
    pub flows: Vec<FlowRecord>,
    /// Ask for `since=next` to get only newer events.
    pub next: u64,
    /// Events lost so far: the datapath's ring buffer was full, or the log overflowed before a
    /// reader came.
    pub lost: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print_in_one_spelling() {
        let m: MacAddr = "0A:58:0a:F4:00:05".parse().unwrap();
        assert_eq!(m.octets(), [0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x05]);
        assert_eq!(m.to_string(), "0a:58:0a:f4:00:05");
        assert_eq!("0a-58-0a-f4-00-05".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "0a:58:0a:f4:00",
            "0a:58:0a:f4:00:05:06",
            "0a:58:0a:f4:00:5",
            "zz:58:0a:f4:00:05",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(serde_json::to_string(&m).unwrap(), r#""0a:58:0a:f4:00:05""#);
        let back: MacAddr = serde_json::from_str(r#""0a:58:0a:f4:00:05""#).unwrap();
        assert_eq!(back, m);
        assert!(MacAddr([0xff; 6]).is_multicast() && !m.is_multicast());
    }

    #[test]
    fn backend_kinds_are_endpoint_kinds_spelled_alike() {
        for k in EndpointKind::ALL {
            assert_eq!(BackendKind::from(*k).as_str(), k.as_str());
        }
    }

    #[test]
    fn a_backends_node_is_omitted_when_unknown() {
        let mut b = BackendInfo {
            id: 1,
            ip: Ipv4Addr::new(10, 1, 0, 5),
            port: 8080,
            weight: 1,
            name: None,
            kind: BackendKind::External,
            node: None,
            state: BackendState::Active,
            traffic: Traffic::default(),
            active_flows: 0,
        };
        let v = serde_json::to_value(&b).unwrap();
        assert!(v.get("node").is_none(), "{v}");
        assert_eq!(v["kind"], "external");
        // A daemon that names no node (an older one) reads back as unknown.
        assert_eq!(serde_json::from_value::<BackendInfo>(v).unwrap(), b);
        b.node = Some("node-2".into());
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["node"], "node-2");
        assert_eq!(serde_json::from_value::<BackendInfo>(v).unwrap(), b);
    }

    #[test]
    fn the_api_keeps_its_json_spelling() {
        let cases = [
            (
                serde_json::to_value(Mode::Kubernetes).unwrap(),
                "kubernetes",
            ),
            (serde_json::to_value(BackendKind::Vm).unwrap(), "vm"),
            (
                serde_json::to_value(BackendKind::Unknown).unwrap(),
                "unknown",
            ),
            (serde_json::to_value(BackendKind::Host).unwrap(), "host"),
            (
                serde_json::to_value(BackendKind::External).unwrap(),
                "external",
            ),
            (serde_json::to_value(EndpointKind::Host).unwrap(), "host"),
            (
                serde_json::to_value(BackendState::Terminating).unwrap(),
                "terminating",
            ),
            (serde_json::to_value(GuestPhase::Ready).unwrap(), "Ready"),
            (serde_json::to_value(FlowDirection::Reply).unwrap(), "reply"),
            (
                serde_json::to_value(FlowKind::Reselected).unwrap(),
                "reselected",
            ),
            (serde_json::to_value(Verdict::Dropped).unwrap(), "dropped"),
            (serde_json::to_value(Protocol::Udp).unwrap(), "UDP"),
            (serde_json::to_value(Algorithm::Maglev).unwrap(), "maglev"),
            (
                serde_json::to_value(SessionAffinity::ClientIP).unwrap(),
                "ClientIP",
            ),
            (serde_json::to_value(EndpointKind::Pod).unwrap(), "pod"),
        ];
        for (v, want) in cases {
            assert_eq!(v, serde_json::Value::String(want.into()));
        }
        assert_eq!("READY".parse::<GuestPhase>().unwrap(), GuestPhase::Ready);
        assert!("booting".parse::<GuestPhase>().is_err());
    }
}
