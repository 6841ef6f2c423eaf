//! Request and response bodies of the node daemon's local API (JSON over HTTP/1.1 on a unix
//! socket). Field names are camelCase, as in Kubernetes objects.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

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
    /// "standalone" or "kubernetes".
    pub mode: String,
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
    /// "TCP" or "UDP".
    pub protocol: String,
    /// "random" or "maglev".
    pub algorithm: String,
    /// "None" or "ClientIP".
    pub session_affinity: String,
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
    /// "pod" or "vm".
    pub kind: String,
    /// "active" or "terminating".
    pub state: String,
    /// Counted over every service that shares this backend address.
    pub traffic: Traffic,
    /// Live flows of this service to this backend.
    pub active_flows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackEntry {
    /// "forward" (client -> frontend) or "reply" (backend -> client).
    pub direction: String,
    pub protocol: String,
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
    pub mac: Option<String>,
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
    pub guest_mac: String,
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
    /// For a VM pod: "Attached" (tap created, programs attached) or "Ready" (the guest used its
    /// address: DHCP bound, ARP, or traffic with its own source).
    pub guest_phase: Option<String>,
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
    pub mac: String,
    pub ip: String,
    pub mtu: u32,
    pub queues: u32,
    /// "Attached" or "Ready".
    pub phase: String,
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
    /// Frames dropped from this guest, by reason (spoofed_mac, spoofed_ip, ...).
    pub drops: BTreeMap<String, u64>,
}

/// Who an address belongs to, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// "pod" or "vm".
    pub kind: String,
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
    /// "new", "reselected" or "drop".
    pub kind: String,
    /// "forwarded" or "dropped".
    pub verdict: String,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    /// The backend chosen (new flows).
    pub backend: Option<String>,
    pub service: Option<String>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub backend_identity: Option<Identity>,
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
