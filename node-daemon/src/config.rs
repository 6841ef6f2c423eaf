//! What a daemon runs with: `tapestryd`'s flags, parsed (see main.rs), or built by a test.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use tapestry_api::types;

pub use crate::guests::probe::ProbeConfig;
use tapestry_common::{
    DEFAULT_CT_SHARE, DEFAULT_HAIRPIN_SNAT_IP, DEFAULT_NODEPORT_RANGE, DhcpLimit,
};

/// Where the desired state comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local state file: standalone mode, a single host.
    File(PathBuf),
    /// The Kubernetes API: Services and EndpointSlices in (when `kube_proxy_replacement`), this
    /// node's Guests out.
    Kubernetes {
        node_name: String,
        /// Default: in-cluster, then `$KUBECONFIG`.
        kubeconfig: Option<PathBuf>,
        kube_proxy_replacement: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub source: Source,
    /// bpffs directory for the pinned maps, program and links.
    pub bpffs_dir: PathBuf,
    /// Unix socket of the local API.
    pub socket: PathBuf,
    /// Address for Prometheus' /metrics and the probes' /healthz (None: not served).
    pub metrics_addr: Option<String>,
    /// Host-side interfaces to put the datapath on at start.
    pub attach: Vec<String>,
    /// Flow events for `tapestry flows`.
    pub flow_events: bool,
    /// The fast path (`config_flags::FAST_PATH`): Service traffic skips the node's stack.
    pub fast_path: bool,
    /// Source address for hairpin flows (a backend reaching its own service).
    pub hairpin_snat_ip: Ipv4Addr,
    pub conntrack_gc_interval: Duration,
    /// Live flows one client address may hold in conntrack (0: no limit).
    pub conntrack_share: u32,
    /// The daemon's own state (the endpoint registry), kept across restarts.
    pub state_dir: PathBuf,
    /// A group (gid) whose members may use the API socket besides root: the socket is then
    /// 0660 and that group's. None: root only, 0600.
    pub api_socket_group: Option<u32>,
    /// How much DHCP each guest may send to the daemon (enforced in the guest program).
    pub dhcp_limit: DhcpLimit,
    /// Frontends for the node's own sockets (None: only pods and guests reach them).
    pub host_services: Option<HostServices>,
    /// Ports that may be node ports (inclusive; the apiserver's --service-node-port-range).
    pub nodeport_range: (u16, u16),
    /// The node's external interfaces: clients outside the node reach node ports and external
    /// IPs through them.
    pub nodeport_interfaces: Vec<String>,
    /// How guests are probed for readiness in Kubernetes mode (standalone mode does not probe:
    /// a guest is Ready once it bound its address or sent traffic).
    pub guest_probe: ProbeConfig,
}

/// `tapestryd --host-services`: the cgroup programs that let the node's own sockets reach
/// frontends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostServices {
    /// The cgroup v2 root to attach to (None: found at start).
    pub cgroup_root: Option<PathBuf>,
}

impl Config {
    /// Standalone mode on `state_file` with every other setting at its default.
    pub fn standalone(state_file: impl Into<PathBuf>) -> Self {
        Config {
            source: Source::File(state_file.into()),
            bpffs_dir: types::DEFAULT_BPFFS_DIR.into(),
            socket: types::DEFAULT_SOCKET.into(),
            metrics_addr: Some(types::DEFAULT_METRICS_ADDR.into()),
            attach: Vec::new(),
            flow_events: false,
            fast_path: false,
            hairpin_snat_ip: Ipv4Addr::from(DEFAULT_HAIRPIN_SNAT_IP),
            conntrack_gc_interval: Duration::from_secs(10),
            conntrack_share: DEFAULT_CT_SHARE,
            state_dir: "/run/tapestry".into(),
            api_socket_group: None,
            dhcp_limit: DhcpLimit::DEFAULT,
            host_services: Some(HostServices::default()),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            nodeport_interfaces: Vec::new(),
            guest_probe: ProbeConfig::DEFAULT,
        }
    }
}
