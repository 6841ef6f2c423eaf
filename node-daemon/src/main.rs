//! tapestryd: parses its flags into a [`Config`] and runs the daemon (see the crate docs and
//! README.md).

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::Parser;
use tapestry_api::types;
use tapestry_common::{DEFAULT_CT_SHARE, DEFAULT_HAIRPIN_SNAT_IP, DhcpLimit};
use tapestry_k8s::duration;
use tapestry_node_daemon::{
    config::{Config, HostServices, ProbeConfig, Source},
    daemon,
};
use tracing::error;

/// Where the desired state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    /// A local state file (--state-file): standalone mode, a single host.
    File,
    /// The Kubernetes API: Services and EndpointSlices in, this node's Guests out.
    Kubernetes,
}

/// Tapestry's node daemon: eBPF Service load balancing for pods and VM guests.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Where the desired state comes from.
    #[arg(long, value_enum, env = "TAPESTRY_SOURCE", default_value = "file")]
    source: SourceKind,
    /// This node's name (Kubernetes mode): Guests are published under it, and
    /// `internalTrafficPolicy: Local` keeps its endpoints.
    #[arg(long, env = "NODE_NAME", required_if_eq("source", "kubernetes"))]
    node_name: Option<String>,
    /// Kubeconfig for Kubernetes mode (default: in-cluster, then $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: program every Service from Services and EndpointSlices (a kube-proxy
    /// replacement). With false the daemon only plumbs VM guests and publishes Guests.
    #[arg(long, env = "TAPESTRY_KUBE_PROXY_REPLACEMENT", default_value_t = true, action = clap::ArgAction::Set)]
    kube_proxy_replacement: bool,
    /// Standalone mode: the desired state (services and backends), YAML or JSON, watched for
    /// changes.
    #[arg(
        long,
        env = "TAPESTRY_STATE_FILE",
        default_value = "/etc/tapestry/state.yaml"
    )]
    state_file: PathBuf,
    /// bpffs directory for the pinned maps, program and links.
    #[arg(long, env = "TAPESTRY_BPFFS_DIR", default_value = types::DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Unix socket of the local API.
    #[arg(long, env = "TAPESTRY_SOCKET", default_value = types::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Address for Prometheus' /metrics (empty to disable).
    #[arg(long, env = "TAPESTRY_METRICS_ADDR", default_value = types::DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
    /// Attach the datapath to these host-side interfaces at start (also possible through the API).
    #[arg(long = "attach", value_name = "IFNAME")]
    attach: Vec<String>,
    /// Emit flow events (new flow, NAT decision, drop) for `tapestry flows`.
    #[arg(long, env = "TAPESTRY_FLOW_EVENTS")]
    flow_events: bool,
    /// The fast path: a Service flow's packets, once translated, go straight to their
    /// destination (into a local pod's namespace with bpf_redirect_peer, or out along the
    /// node's route), and what the --nodeport-interface interfaces receive for a local pod goes
    /// straight into its namespace. Faster than the pod IP without it, but the node's stack is
    /// skipped: its iptables/nftables rules (a primary CNI's network policy among them) no
    /// longer see that traffic, nor does a tc program attached after Tapestry's.
    #[arg(long, env = "TAPESTRY_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    fast_path: bool,
    /// Source address for hairpin flows (a backend reaching its own service).
    #[arg(long, default_value_t = Ipv4Addr::from(DEFAULT_HAIRPIN_SNAT_IP))]
    hairpin_snat_ip: Ipv4Addr,
    /// Seconds between conntrack garbage collections.
    #[arg(long, default_value_t = 10)]
    conntrack_gc_interval: u64,
    /// Live flows (conntrack) one client address may hold: its new flows past that are dropped
    /// and counted (conntrack_share) until some of its flows close, so one endpoint cannot
    /// evict everyone else's connections. The default is half the TCP table; 0: no limit.
    #[arg(long, env = "TAPESTRY_CONNTRACK_SHARE_PER_ENDPOINT", default_value_t = DEFAULT_CT_SHARE)]
    conntrack_share_per_endpoint: u32,
    /// The daemon's own state (the endpoint registry), kept across restarts.
    #[arg(long, env = "TAPESTRY_STATE_DIR", default_value = "/run/tapestry")]
    state_dir: PathBuf,
    /// Let this group (a name or a numeric gid) use the local API besides root: the socket
    /// becomes 0660 and that group's. Default: root only, 0600. Every connection's peer
    /// credentials are checked either way.
    #[arg(long, env = "TAPESTRY_API_SOCKET_GROUP", value_name = "GID_OR_NAME")]
    api_socket_group: Option<String>,
    /// DHCP messages a second each guest may send to the daemon; more are dropped in the
    /// guest program and counted (dhcp_rate_limited), before the node's shared queue. 0: no
    /// limit.
    #[arg(long, env = "TAPESTRY_DHCP_RATE_PER_GUEST", default_value_t = DhcpLimit::DEFAULT.rate_per_sec)]
    dhcp_rate_per_guest: u32,
    /// DHCP messages a guest may send back to back before its rate applies.
    #[arg(long, env = "TAPESTRY_DHCP_BURST_PER_GUEST", default_value_t = DhcpLimit::DEFAULT.burst, value_parser = clap::value_parser!(u32).range(1..))]
    dhcp_burst_per_guest: u32,
    /// Let the node's own sockets (host-network pods, the node's processes) reach every
    /// frontend, as kube-proxy's OUTPUT rules do: cgroup programs on the cgroup v2 root choose
    /// the backend at connect/sendmsg time. Only this network namespace's sockets are
    /// translated.
    #[arg(long, env = "TAPESTRY_HOST_SERVICES", default_value_t = true, action = clap::ArgAction::Set)]
    host_services: bool,
    /// Where the cgroup v2 hierarchy is for `--host-services`: this directory when it is cgroup
    /// v2, else its `unified` subdirectory (systemd's hybrid layout). Default /sys/fs/cgroup;
    /// in a container, the host's /sys/fs/cgroup mounted in.
    #[arg(long, env = "TAPESTRY_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Destination ports that may be node ports (`vip: 0.0.0.0` frontends, NodePort Services),
    /// `MIN-MAX`: the apiserver's `--service-node-port-range`. A node port outside it is
    /// refused with the desired state that has it.
    #[arg(long, env = "TAPESTRY_NODEPORT_RANGE", default_value = "30000-32767", value_parser = parse_port_range)]
    nodeport_range: (u16, u16),
    /// The node's external interfaces (repeat, or comma-separate): clients outside the node
    /// reach node ports and external IPs through them (their source translated to the node, so
    /// replies return through it). None: only pods and the node itself reach them.
    #[arg(
        long = "nodeport-interface",
        env = "TAPESTRY_NODEPORT_INTERFACES",
        value_name = "IFNAME",
        value_delimiter = ','
    )]
    nodeport_interfaces: Vec<String>,
    /// Kubernetes mode: how often each guest is probed for readiness (ARP on its tap, TCP on
    /// its pod's `tapestry.dev/readiness-tcp-ports`), as a kubelet probe's periodSeconds.
    #[arg(long, env = "TAPESTRY_GUEST_PROBE_PERIOD", default_value = "1s", value_parser = duration::parse)]
    guest_probe_period: Duration,
    /// How long one probe waits for the guest's answer.
    #[arg(long, env = "TAPESTRY_GUEST_PROBE_TIMEOUT", default_value = "500ms", value_parser = duration::parse)]
    guest_probe_timeout: Duration,
    /// Probes that must pass in a row before a guest is ready.
    #[arg(long, env = "TAPESTRY_GUEST_PROBE_SUCCESS_THRESHOLD", default_value_t = ProbeConfig::DEFAULT.success_threshold, value_parser = clap::value_parser!(u32).range(1..))]
    guest_probe_success_threshold: u32,
    /// Probes that must fail in a row before a ready guest is not ready (with the default
    /// period and timeout, a guest that stops answering is out within about 3.5 s).
    #[arg(long, env = "TAPESTRY_GUEST_PROBE_FAILURE_THRESHOLD", default_value_t = ProbeConfig::DEFAULT.failure_threshold, value_parser = clap::value_parser!(u32).range(1..))]
    guest_probe_failure_threshold: u32,
    /// Remove every pin (datapath detached from every interface, maps gone) and exit.
    #[arg(long)]
    uninstall: bool,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = if args.uninstall {
        daemon::uninstall(&args.bpffs_dir)
    } else {
        match args.into_config() {
            Ok(config) => daemon::run(config).await,
            Err(e) => Err(e),
        }
    };
    if let Err(e) = result {
        error!("{e:#}");
        std::process::exit(1);
    }
}

/// `MIN-MAX`, both ports, MIN <= MAX.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected MIN-MAX, e.g. 30000-32767"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (min, max) = (port(a)?, port(b)?);
    if min > max {
        return Err(format!("{s:?}: {min} is above {max}"));
    }
    Ok((min, max))
}

/// The gid of `group`: a number as it is, else a name looked up in the group database.
fn resolve_group(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| anyhow::anyhow!("--api-socket-group {group:?}: a NUL byte in the name"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: zeroed `group` is a valid out-parameter; buf outlives the call and its length is
    // passed; the result pointer is only compared, its strings are not kept.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "--api-socket-group {group:?}: looking up the group: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    if found.is_null() {
        anyhow::bail!("--api-socket-group {group:?}: no such group (give a name or a numeric gid)");
    }
    Ok(grp.gr_gid)
}

impl Args {
    fn into_config(self) -> anyhow::Result<Config> {
        let api_socket_group = self
            .api_socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?;
        let source = match self.source {
            SourceKind::File => Source::File(self.state_file),
            SourceKind::Kubernetes => Source::Kubernetes {
                node_name: self
                    .node_name
                    .expect("clap requires --node-name with --source kubernetes"),
                kubeconfig: self.kubeconfig,
                kube_proxy_replacement: self.kube_proxy_replacement,
            },
        };
        Ok(Config {
            source,
            bpffs_dir: self.bpffs_dir,
            socket: self.socket,
            metrics_addr: (!self.metrics_addr.is_empty()).then_some(self.metrics_addr),
            attach: self.attach,
            flow_events: self.flow_events,
            fast_path: self.fast_path,
            hairpin_snat_ip: self.hairpin_snat_ip,
            conntrack_gc_interval: Duration::from_secs(self.conntrack_gc_interval),
            conntrack_share: self.conntrack_share_per_endpoint,
            state_dir: self.state_dir,
            api_socket_group,
            nodeport_range: self.nodeport_range,
            nodeport_interfaces: self.nodeport_interfaces,
            host_services: self.host_services.then_some(HostServices {
                cgroup_root: self.cgroup_root,
            }),
            dhcp_limit: DhcpLimit {
                rate_per_sec: self.dhcp_rate_per_guest,
                burst: self.dhcp_burst_per_guest,
            },
            guest_probe: ProbeConfig {
                period: self.guest_probe_period,
                timeout: self.guest_probe_timeout,
                success_threshold: self.guest_probe_success_threshold,
                failure_threshold: self.guest_probe_failure_threshold,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodeport_range_is_two_ports_in_order() {
        assert_eq!(parse_port_range("30000-32767"), Ok((30000, 32767)));
        assert_eq!(parse_port_range("80-80"), Ok((80, 80)));
        for bad in ["30000", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
        let args = Args::parse_from(["tapestryd"]);
        assert_eq!(args.into_config().unwrap().nodeport_range, (30000, 32767));
    }

    #[test]
    fn the_api_socket_group_is_a_gid_or_a_group_name() {
        assert_eq!(resolve_group("1234").unwrap(), 1234);
        // Every system has group 0, named root.
        assert_eq!(resolve_group("root").unwrap(), 0);
        let e = resolve_group("no-such-group-tapestry")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such group"), "{e}");
        let args = Args::parse_from(["tapestryd", "--api-socket-group", "root"]);
        assert_eq!(args.into_config().unwrap().api_socket_group, Some(0));
        let args = Args::parse_from(["tapestryd"]);
        assert_eq!(args.into_config().unwrap().api_socket_group, None);
    }

    #[test]
    fn the_guest_probe_is_the_default_or_what_the_flags_say() {
        let config = Args::parse_from(["tapestryd"]).into_config().unwrap();
        assert_eq!(config.guest_probe, ProbeConfig::DEFAULT);
        let args = Args::parse_from([
            "tapestryd",
            "--guest-probe-period=500ms",
            "--guest-probe-timeout=200ms",
            "--guest-probe-failure-threshold=5",
        ]);
        let probe = args.into_config().unwrap().guest_probe;
        assert_eq!(probe.period, Duration::from_millis(500));
        assert_eq!(probe.timeout, Duration::from_millis(200));
        assert_eq!((probe.success_threshold, probe.failure_threshold), (1, 5));
        assert!(Args::try_parse_from(["tapestryd", "--guest-probe-failure-threshold=0"]).is_err());
    }

    #[test]
    fn the_dhcp_limit_is_the_default_or_what_the_flags_say() {
        let config = Args::parse_from(["tapestryd"]).into_config().unwrap();
        assert_eq!(config.dhcp_limit, DhcpLimit::DEFAULT);
        let args = Args::parse_from([
            "tapestryd",
            "--dhcp-rate-per-guest=0",
            "--dhcp-burst-per-guest=5",
        ]);
        let limit = args.into_config().unwrap().dhcp_limit;
        assert_eq!((limit.rate_per_sec, limit.burst), (0, 5));
        assert_eq!(limit.program_constants(), (0, 0), "0: no limit");
        assert!(Args::try_parse_from(["tapestryd", "--dhcp-burst-per-guest=0"]).is_err());
    }
}
