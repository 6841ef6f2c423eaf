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
