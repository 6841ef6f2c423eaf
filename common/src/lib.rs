//! Map keys, values and constants shared by Tapestry's eBPF programs and userspace.
//!
//! Every type is `#[repr(C)]` with fixed-width fields and explicit padding, so the kernel and
//! userspace agree on the layout byte for byte (`tests` in this crate pin sizes and offsets).
//! Addresses and ports are stored in network byte order, exactly as they appear in packets, so
//! the datapath can compare them without swapping; userspace converts at the edge.
#![no_std]

/// The name of each pinned map, written once: the eBPF object declares its maps with these
/// (ebpf/src/maps.rs) and userspace finds them by [`map_names`], which is made from this table.
/// A macro, not only constants, because a symbol name in an attribute must be a literal.
#[macro_export]
macro_rules! map_name {
    (SERVICES) => {
        "TAPESTRY_SERVICES"
    };
    (BACKENDS) => {
        "TAPESTRY_BACKENDS"
    };
    (LB_TABLES) => {
        "TAPESTRY_LB_TABLES"
    };
    (CONNTRACK) => {
        "TAPESTRY_CT"
    };
    (CONNTRACK_ANY) => {
        "TAPESTRY_CT_ANY"
    };
    (CT_CLIENTS) => {
        "TAPESTRY_CT_CLIENTS"
    };
    (AFFINITY) => {
        "TAPESTRY_AFFINITY"
    };
    (FRAGMENTS) => {
        "TAPESTRY_FRAGS"
    };
    (CONFIG) => {
        "TAPESTRY_CONFIG"
    };
    (SERVICE_STATS) => {
        "TAPESTRY_SVC_STATS"
    };
    (BACKEND_STATS) => {
        "TAPESTRY_BE_STATS"
    };
    (DROPS) => {
        "TAPESTRY_DROPS"
    };
    (COUNTERS) => {
        "TAPESTRY_COUNTERS"
    };
    (EVENTS) => {
        "TAPESTRY_EVENTS"
    };
    (GUEST_STATS) => {
        "TAPESTRY_GUEST_STATS"
    };
    (DHCP) => {
        "TAPESTRY_DHCP"
    };
    (DHCP_RATE) => {
        "TAPESTRY_DHCP_RATE"
    };
    (HOST_REVERSE) => {
        "TAPESTRY_HOST_REV"
    };
    (NODE_ADDRS) => {
        "TAPESTRY_NODE_ADDRS"
    };
    (ENDPOINT_IFS) => {
        "TAPESTRY_ENDPOINT_IFS"
    };
}

/// Names of the pinned maps, as declared in the eBPF objects (also their file names in bpffs).
pub mod map_names {
    pub const SERVICES: &str = map_name!(SERVICES);
    pub const BACKENDS: &str = map_name!(BACKENDS);
    pub const LB_TABLES: &str = map_name!(LB_TABLES);
    /// TCP flows.
    pub const CONNTRACK: &str = map_name!(CONNTRACK);
    /// Every other protocol's flows (UDP): a table of its own, so a flood of datagrams with
    /// random ports evicts datagram flows, never a TCP connection.
    pub const CONNTRACK_ANY: &str = map_name!(CONNTRACK_ANY);
    /// Live flows per client address (the conntrack share, `--conntrack-share-per-endpoint`).
    pub const CT_CLIENTS: &str = map_name!(CT_CLIENTS);
    pub const AFFINITY: &str = map_name!(AFFINITY);
    pub const FRAGMENTS: &str = map_name!(FRAGMENTS);
    pub const CONFIG: &str = map_name!(CONFIG);
    pub const SERVICE_STATS: &str = map_name!(SERVICE_STATS);
    pub const BACKEND_STATS: &str = map_name!(BACKEND_STATS);
    /// Drops by `DropReason`, node-wide: the load balancer's and the guests' anti-spoofing drops.
    pub const DROPS: &str = map_name!(DROPS);
    pub const COUNTERS: &str = map_name!(COUNTERS);
    pub const EVENTS: &str = map_name!(EVENTS);
    /// Per-guest counters (guest programs).
    pub const GUEST_STATS: &str = map_name!(GUEST_STATS);
    /// DHCP requests from guests, for the daemon's DHCP server (guest programs).
    pub const DHCP: &str = map_name!(DHCP);
    /// Each guest's DHCP rate limiter state (guest programs).
    pub const DHCP_RATE: &str = map_name!(DHCP_RATE);
    /// The node's own sockets (host-network pods, node processes) that a frontend was
    /// translated for: (socket, backend) -> frontend, so what they receive and their peer's
    /// name show the frontend again.
    pub const HOST_REVERSE: &str = map_name!(HOST_REVERSE);
    /// The node's own IPv4 addresses (kept by the daemon): where node ports answer.
    pub const NODE_ADDRS: &str = map_name!(NODE_ADDRS);
    /// The host-side interfaces (veths) of this node's endpoints, by ifindex (kept by the
    /// daemon as it attaches): where the fast path delivers into a pod's namespace with
    /// `bpf_redirect_peer`.
    pub const ENDPOINT_IFS: &str = map_name!(ENDPOINT_IFS);
    /// Every map of the load balancer's object (`tapestry-lb`).
    pub const ALL: [&str; 17] = [
        SERVICES,
        BACKENDS,
        LB_TABLES,
        CONNTRACK,
        CONNTRACK_ANY,
        CT_CLIENTS,
        AFFINITY,
        FRAGMENTS,
        CONFIG,
        SERVICE_STATS,
        BACKEND_STATS,
        DROPS,
        COUNTERS,
        EVENTS,
        HOST_REVERSE,
        NODE_ADDRS,
        ENDPOINT_IFS,
    ];
    /// Every map of the guest programs' object (`tapestry-guest`). `DROPS` is the load
    /// balancer's, shared through its pin, so one map counts every drop on the node.
    pub const GUEST: [&str; 4] = [GUEST_STATS, DHCP, DHCP_RATE, DROPS];
}

/// Names of the tc programs in the eBPF object.
pub mod program_names {
    /// Attached to the ingress of every endpoint's host-side interface (the endpoint's egress).
    pub const FROM_ENDPOINT: &str = "tapestry_from_endpoint";
    /// Attached to the egress of every endpoint's host-side interface (what reaches the
    /// endpoint): reverse NAT of the flows this node balanced.
    pub const TO_ENDPOINT: &str = "tapestry_to_endpoint";
    /// VM pods, in the pod's netns: the pod interface's ingress, towards the guest's tap.
    pub const POD_TO_GUEST: &str = "tapestry_pod_to_guest";
    /// VM pods, in the pod's netns: the tap's ingress (what the guest sends), checked for
    /// spoofing, then out of the pod interface.
    pub const GUEST_TO_POD: &str = "tapestry_guest_to_pod";
    /// On the ingress of the node's external interfaces (`tapestryd --nodeport-interface`):
    /// clients outside the node reaching node ports and external IPs, and their replies.
    pub const FROM_NETWORK: &str = "tapestry_from_network";
    /// The node's own sockets (cgroup `connect4`): a connection to a frontend goes to a
    /// backend chosen at connect time; nothing is done per packet.
    pub const HOST_CONNECT4: &str = "tapestry_host_connect4";
    /// The node's own datagrams sent to a frontend without `connect` (cgroup `sendmsg4`).
    pub const HOST_SENDMSG4: &str = "tapestry_host_sendmsg4";
    /// What the node's own sockets receive from a backend shows the frontend (cgroup
    /// `recvmsg4`).
    pub const HOST_RECVMSG4: &str = "tapestry_host_recvmsg4";
    /// A connected socket's peer shows the frontend (cgroup `getpeername4`).
    pub const HOST_GETPEERNAME4: &str = "tapestry_host_getpeername4";
}

/// Per-attachment constants of the guest programs, set at load time (`.rodata`), so the fast
/// path compares against immediates and needs no map lookup.
pub mod guest_globals {
    pub const SLOT: &str = "GUEST_SLOT";
    pub const TAP_IFINDEX: &str = "GUEST_TAP_IFINDEX";
    pub const POD_IFINDEX: &str = "GUEST_POD_IFINDEX";
    /// The guest's MAC as a u64 (the 6 bytes in packet order in the low bytes, little endian).
    pub const MAC: &str = "GUEST_MAC";
    /// The guest's IPv4 address, network byte order.
    pub const IP: &str = "GUEST_IP";
    /// The guest's MTU (u32; 0: frames are not checked for size).
    pub const MTU: &str = "GUEST_MTU";
    /// The DHCP rate limit (a u64 [`DhcpLimit`](crate::DhcpLimit) field each): nanoseconds
    /// between two messages at the sustained rate (0: unlimited), and how far ahead of that
    /// rate a burst may run.
    pub const DHCP_INTERVAL_NS: &str = "GUEST_DHCP_INTERVAL_NS";
    pub const DHCP_TOLERANCE_NS: &str = "GUEST_DHCP_TOLERANCE_NS";
    /// Migration target mode (a u64 MAC as [`MAC`] holds it; 0, the default: off): the MAC of
    /// the gateway the guest reaches on this node. The tap's program then answers the guest's
    /// ARP requests for other addresses with it and sends the guest's unicast frames to it, so a
    /// guest that migrated in, its neighbour cache still holding the previous node's gateway,
    /// reaches this one's.
    pub const GATEWAY_MAC: &str = "GUEST_GATEWAY_MAC";
    /// The tap's own MAC (a u64 as [`MAC`] holds it): the readiness probe's ARP requests come
    /// from it, so the guest's replies to them are those for it, which the tap's program counts
    /// and consumes (`GuestStats::probe_replies`). 0: none is recognised.
    pub const TAP_MAC: &str = "GUEST_TAP_MAC";
}

/// How many DHCP messages one guest may hand to the daemon: `rate_per_sec` sustained, `burst`
/// back to back, enforced in the guest program before the shared queue (GCRA, one timestamp
/// per guest), so one guest's flood cannot crowd out another guest's DISCOVER.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DhcpLimit {
    pub rate_per_sec: u32,
    pub burst: u32,
}

impl DhcpLimit {
    /// The default: a guest's whole lease cycle is 2 to 4 messages; 10/s with bursts of 20
    /// covers a guest retrying a lost exchange many times over.
    pub const DEFAULT: DhcpLimit = DhcpLimit {
        rate_per_sec: 10,
        burst: 20,
    };

    /// The two constants the guest program reads: (interval, tolerance) in nanoseconds. A rate
    /// of 0 means unlimited (interval 0).
    pub const fn program_constants(self) -> (u64, u64) {
        if self.rate_per_sec == 0 {
            return (0, 0);
        }
        let interval = 1_000_000_000 / self.rate_per_sec as u64;
        let burst = if self.burst == 0 {
            1
        } else {
            self.burst as u64
        };
        (interval, interval * (burst - 1))
    }
}

/// A MAC as [`guest_globals::MAC`] holds it: the 6 bytes in packet order in the low bytes of a
/// little-endian u64. A contract between the daemon, which writes it, and the guest program,
/// which compares frames against it.
#[inline(always)]
pub const fn mac_u64(mac: &[u8; 6]) -> u64 {
    u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

/// The MAC a [`mac_u64`] value holds, in packet order.
#[inline(always)]
pub const fn mac_from_u64(v: u64) -> [u8; 6] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

/// Guests per node (slots of the per-guest counters).
pub const MAX_GUESTS: u32 = 4096;
/// DHCP frames larger than this are cut (DHCP messages from clients are ~300-600 bytes).
pub const DHCP_FRAME_MAX: usize = 1024;
pub const DHCP_RING_BYTES: u32 = 1 << 18;

/// Capacity of the services map (frontends).
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the backends map; also the bound on backend ids.
pub const MAX_BACKENDS: u32 = 131_072;
/// Conntrack entries (LRU): forward and reply entries count separately.
pub const MAX_CONNTRACK: u32 = 262_144;
/// Capacity of the non-TCP conntrack table (entries, two per flow).
pub const MAX_CONNTRACK_ANY: u32 = 131_072;
/// Clients tracked for the conntrack share (LRU: the least recent client's count goes first).
pub const MAX_CT_CLIENTS: u32 = 65_536;
/// The default conntrack share: live flows one client address may hold, half the TCP table.
pub const DEFAULT_CT_SHARE: u32 = MAX_CONNTRACK / 4;
/// The load balancer's `.rodata` constant holding the share (0: no limit).
pub const CT_SHARE_GLOBAL: &str = "CT_SHARE_MAX";
/// The load balancer's global (`.rodata`, set at load) holding the cookie of the network
/// namespace whose sockets are the node's own: only they are translated by the host programs
/// (pods' sockets go through the per-packet path on their interfaces). 0: none.
pub const HOST_NETNS_COOKIE_GLOBAL: &str = "HOST_NETNS_COOKIE";
/// The load balancer's globals (`.rodata`, set at load) bounding the node port range (host
/// byte order, inclusive; `tapestryd --nodeport-range`): only a destination port in it is
/// looked up as a node port, so other traffic to the node pays two compares.
pub const NODEPORT_MIN_GLOBAL: &str = "NODEPORT_MIN";
pub const NODEPORT_MAX_GLOBAL: &str = "NODEPORT_MAX";
/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODEPORT_RANGE: (u16, u16) = (30000, 32767);
/// Addresses the node may have in `map_names::NODE_ADDRS`.
pub const MAX_NODE_ADDRS: u32 = 256;
/// Endpoint interfaces one node can hold (`map_names::ENDPOINT_IFS`).
pub const MAX_ENDPOINT_IFS: u32 = 16384;
/// Entries of the host sockets' reverse map (LRU).
pub const MAX_HOST_REVERSE: u32 = 65_536;
pub const MAX_AFFINITY: u32 = 65_536;
pub const MAX_FRAGMENTS: u32 = 8_192;
/// Ring buffer for flow events, bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 22;

/// Entries in each service's backend selection table. Prime, as Maglev requires; with up to a
/// few dozen backends per service it keeps the load imbalance near 1/LB_TABLE_SIZE per slot.
pub const LB_TABLE_SIZE: usize = 1021;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Frontend: VIP, port and L4 protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub vip: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Backend selection algorithms (`Service::algorithm`).
pub mod algorithm {
    /// Uniform random over the weighted table, per new flow.
    pub const RANDOM: u8 = 0;
    /// Maglev consistent hashing of the 5-tuple over the service's table.
    pub const MAGLEV: u8 = 1;
    /// Always the table's first slot: deterministic, for tests only.
    pub const FIRST: u8 = 2;
}

/// `Service::flags`.
pub mod service_flags {
    /// ClientIP session affinity: a client keeps its backend for `affinity_timeout_s`.
    pub const AFFINITY_CLIENT_IP: u8 = 1 << 0;
    /// `externalTrafficPolicy: Local`: a client outside the node (the external interfaces'
    /// program) gets only this node's backends, its source kept: a new flow chooses among
    /// `Service::local_backend_count` in the selection table (and affinity) of
    /// `id | LOCAL_SCOPE`, and is dropped (`no_local_backend`) when there are none while the
    /// service has backends elsewhere. Pods and the node itself still use the whole table.
    pub const EXTERNAL_LOCAL: u8 = 1 << 1;
}

/// Or'ed into a service id: the key of its local-only selection table in
/// `map_names::LB_TABLES` and of its outside clients' entries in `map_names::AFFINITY`
/// (`service_flags::EXTERNAL_LOCAL`). Service ids stay below `MAX_SERVICES`.
pub const LOCAL_SCOPE: u32 = 1 << 31;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Stable id chosen by the daemon; indexes the stats and selection tables.
    pub id: u32,
    /// Backends that new flows may choose. Zero means "reject" (ICMP port unreachable).
    pub backend_count: u32,
    pub affinity_timeout_s: u32,
    pub algorithm: u8,
    pub flags: u8,
    /// With `service_flags::EXTERNAL_LOCAL`: the backends of this node that new flows from
    /// outside may choose (the slots of the `id | LOCAL_SCOPE` table). Where an older daemon
    /// had padding (zero), so pinned entries keep their meaning.
    pub local_backend_count: u16,
}

/// `Backend::state`.
pub mod backend_state {
    /// Chosen for new flows.
    pub const ACTIVE: u8 = 0;
    /// Not chosen for new flows; existing flows keep it (graceful drain).
    pub const TERMINATING: u8 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub ip: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}

/// A service's backend selection table: backend ids, each repeated in proportion to its weight
/// (random) or placed by Maglev's permutation (maglev). Replaced whole, in one map update, so a
/// reader never sees a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbTable {
    pub backends: [u32; LB_TABLE_SIZE],
    pub _pad: u32,
}

impl Default for LbTable {
    fn default() -> Self {
        Self {
            backends: [0; LB_TABLE_SIZE],
            _pad: 0,
        }
    }
}

/// How long a conntrack entry lives after its last packet (Cilium's defaults). Checked by the
/// datapath on lookup and by the daemon's garbage collector.
pub mod ct_lifetime {
    const S: u64 = 1_000_000_000;
    /// TCP before the first reply (SYN sent).
    pub const TCP_SYN_NS: u64 = 60 * S;
    pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * S;
    /// After a FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * S;
    pub const NON_TCP_NS: u64 = 60 * S;
    /// Entries are refreshed at most this often, to keep per-packet writes off shared cache lines.
    pub const REFRESH_NS: u64 = S;

    /// Lifetime of an entry with `flags` (see `ct_flags`) for protocol `proto`.
    pub const fn for_entry(proto: u8, flags: u8) -> u64 {
        if proto != super::IPPROTO_TCP {
            NON_TCP_NS
        } else if flags & super::ct_flags::CLOSING != 0 {
            TCP_CLOSING_NS
        } else if flags & super::ct_flags::SEEN_REPLY != 0 {
            TCP_ESTABLISHED_NS
        } else {
            TCP_SYN_NS
        }
    }
}

/// `CtKey::direction`.
pub mod ct_direction {
    /// Client -> frontend, keyed by the original tuple.
    pub const FORWARD: u8 = 0;
    /// Backend -> client, keyed by the tuple after NAT, as the reply arrives.
    pub const REPLY: u8 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

/// `CtEntry::flags`.
pub mod ct_flags {
    /// A FIN or RST was seen: the entry expires after the short closing lifetime.
    pub const CLOSING: u8 = 1 << 0;
    /// The client reached itself through the VIP; its source was rewritten to the hairpin address.
    pub const HAIRPIN: u8 = 1 << 1;
    /// A reply was seen (the flow is established in both directions).
    pub const SEEN_REPLY: u8 = 1 << 2;
    /// A client outside the node reached a node port (or an external IP): its source was
    /// rewritten to the node's address towards the backend, so replies come back through this
    /// node, which routes both directions itself.
    pub const SNAT: u8 = 1 << 3;
    /// A client outside the node reached a frontend with `externalTrafficPolicy: Local`: a
    /// backend of this node, the client's source kept. The backend replies to the client's own
    /// address, so its reply is translated as it leaves the backend's interface (see
    /// `config_flags::LOCAL_REPLIES`) and routed by this node.
    pub const LOCAL: u8 = 1 << 4;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// Forward: the address written as destination (backend). Reply: the address written as
    /// source (the VIP).
    pub nat_addr: u32,
    /// Forward: the source address written for a hairpin flow (else 0). Reply: the client's own
    /// address, restored as destination for a hairpin flow (else 0).
    pub nat_peer_addr: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// Monotonic nanoseconds (bpf_ktime_get_ns).
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub nat_port: u16,
    pub flags: u8,
    /// Hairpin flows only, network byte order, 0 when the client's port was kept. Forward: the
    /// source port written (the client's port clashed with another hairpin flow's at the same
    /// backend port). Reply: the client's own port, restored as destination. Bytes, not a u16,
    /// so the entry keeps its layout (flags stays at offset 34) for entries pinned by an older
    /// daemon, whose zeroes here mean "kept".
    pub nat_peer_port: [u8; 2],
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub client_ip: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// A node's own socket and the backend it was sent to (`map_names::HOST_REVERSE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HostReverseKey {
    /// `bpf_get_socket_cookie`: unique per socket for the kernel's lifetime.
    pub cookie: u64,
    /// The backend, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// The frontend a node's socket asked for (`map_names::HOST_REVERSE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostReverse {
    /// The frontend, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Non-first IPv4 fragments carry no ports: the first fragment records them here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
}

/// `Config::flags`.
pub mod config_flags {
    /// Emit flow events (new flow, NAT decision, drop) to the ring buffer.
    pub const FLOW_EVENTS: u32 = 1 << 0;
    /// The node's own addresses matter to what pods send: a node port exists, or external
    /// interfaces are configured (their flows' replies are addressed to the node). Without it
    /// a pod's packet to no frontend costs no `NODE_ADDRS` lookup. Kept by the reconciler.
    pub const NODE_ADDRS: u32 = 1 << 1;
    /// A frontend with `externalTrafficPolicy: Local` is programmed: what an endpoint sends to
    /// an address that is no frontend and not the node's is looked up as the reply of a flow
    /// from outside (`ct_flags::LOCAL`). Without it that costs nothing. Kept by the reconciler.
    pub const LOCAL_REPLIES: u32 = 1 << 2;
    /// The fast path (`tapestryd --fast-path`, off by default): a Service flow's packets go
    /// straight to their destination after the rewrite, into a local endpoint's namespace
    /// (`bpf_redirect_peer`) or out along the node's route (`bpf_fib_lookup` + redirect), and
    /// what the external interfaces receive for a local endpoint goes straight into its
    /// namespace; the node's stack (and its netfilter) is skipped.
    pub const FAST_PATH: u32 = 1 << 3;
}

/// Runtime configuration, one entry in an array map, written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    pub flags: u32,
    /// Source address written on hairpin flows (network byte order); link-local, never routed.
    pub hairpin_snat_ip: u32,
}

/// Default hairpin source address: 169.254.42.1, as Cilium's service loopback address.
pub const DEFAULT_HAIRPIN_SNAT_IP: [u8; 4] = [169, 254, 42, 1];

/// Per-service and per-backend traffic counters (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    /// New flows (conntrack entries created) for this service or backend.
    pub flows: u64,
}

macro_rules! named_u32_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr => $text:expr,)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant = $value,)* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// Stable snake_case name, used in metrics labels and CLI output.
            pub const fn name(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
            pub const fn from_u32(v: u32) -> Option<Self> {
                match v { $($value => Some($name::$variant),)* _ => None }
            }
        }
    };
}

named_u32_enum! {
    /// Why the datapath dropped or rejected a packet; index into the drops map.
    DropReason {
        /// The service has no backend: the client gets ICMP port unreachable.
        NoBackend = 0 => "no_backend",
        /// An IPv4 packet for a frontend whose L4 header is cut short.
        Malformed = 1 => "malformed",
        /// The selection table pointed at a backend id that is not in the backends map.
        BackendMissing = 2 => "backend_missing",
        /// Conntrack could not store the flow (map update failed).
        ConntrackFull = 3 => "conntrack_full",
        /// A rewrite helper failed; the packet is dropped rather than sent half-rewritten.
        RewriteFailed = 4 => "rewrite_failed",
        /// The reject reply (ICMP) could not be built; the packet is dropped instead.
        RejectFailed = 5 => "reject_failed",
        /// A frame from a guest with a source MAC that is not the guest's.
        SpoofedMac = 6 => "spoofed_mac",
        /// An IPv4 packet from a guest with a source address that is not the guest's.
        SpoofedIp = 7 => "spoofed_ip",
        /// An ARP from a guest claiming another address or hardware address.
        SpoofedArp = 8 => "spoofed_arp",
        /// A frame from a guest that is neither IPv4, ARP nor a RARP announcement (the pod
        /// network is IPv4).
        UnsupportedProtocol = 9 => "unsupported_protocol",
        /// DHCP from a guest could not be handed to the daemon (its queue was full).
        DhcpQueueFull = 10 => "dhcp_queue_full",
        /// A frame from a guest carrying an 802.1Q/802.1ad tag (in the frame or, stripped by
        /// the kernel before tc, in the packet's metadata): the pod network is untagged.
        VlanTagged = 11 => "vlan_tagged",
        /// A DHCP reply (UDP source port 67 or destination port 68) from a guest: only the
        /// daemon answers guests' DHCP.
        RogueDhcpServer = 12 => "rogue_dhcp_server",
        /// DHCP from a guest over its rate limit (`tapestryd --dhcp-rate-per-guest`).
        DhcpRateLimited = 13 => "dhcp_rate_limited",
        /// A new hairpin flow found no free source port at its backend port (every port tried
        /// is another live hairpin flow's).
        HairpinPortClash = 14 => "hairpin_port_clash",
        /// A frame from a guest longer than its MTU allows (and not a GSO super-frame).
        Oversized = 15 => "oversized",
        /// A new flow from a client that already holds its share of conntrack
        /// (`tapestryd --conntrack-share-per-endpoint`).
        ConntrackShare = 16 => "conntrack_share",
        /// A packet the node had to route itself (a node port flow from outside) had no route.
        NoRoute = 17 => "no_route",
        /// A new flow from outside the node to a frontend with `externalTrafficPolicy: Local`
        /// while this node has none of its backends (the service has some elsewhere): dropped,
        /// as kube-proxy drops it.
        NoLocalBackend = 18 => "no_local_backend",
    }
}

/// Every reason a guest program drops a guest's frame for (each has a slot in `GuestStats`).
pub const GUEST_DROP_REASONS: [DropReason; 10] = [
    DropReason::RewriteFailed,
    DropReason::SpoofedMac,
    DropReason::SpoofedIp,
    DropReason::SpoofedArp,
    DropReason::UnsupportedProtocol,
    DropReason::DhcpQueueFull,
    DropReason::VlanTagged,
    DropReason::RogueDhcpServer,
    DropReason::DhcpRateLimited,
    DropReason::Oversized,
];

/// Number of slots in the drops map.
pub const DROP_REASONS: u32 = 32;

named_u32_enum! {
    /// Datapath event counters; index into the counters map.
    Counter {
        /// Packets that entered a Tapestry program.
        Packets = 0 => "packets",
        /// Packets addressed to a frontend (service hits).
        ServicePackets = 1 => "service_packets",
        /// Conntrack entries created for new flows.
        NewFlows = 2 => "new_flows",
        /// Packets rewritten back to the frontend address (replies).
        ReverseNat = 3 => "reverse_nat",
        /// New flows whose client is also the chosen backend.
        Hairpin = 4 => "hairpin",
        /// Flows whose backend was removed and were moved to another backend.
        Reselected = 5 => "reselected",
        /// Flow events that could not be written (ring buffer full).
        EventsLost = 6 => "events_lost",
        /// Packets passed through untouched (not IPv4, not for a frontend, unparsable).
        Passed = 7 => "passed",
        /// Connections and datagrams of the node's own sockets translated to a backend
        /// (host-network pods and node processes reaching a frontend).
        HostTranslated = 8 => "host_translated",
        /// Packets the fast path delivered itself (`config_flags::FAST_PATH`): redirected into
        /// a local endpoint's namespace or out along the node's route, past the node's stack.
        FastPath = 9 => "fast_path",
        /// Entries the datapath stored under a key the TCP conntrack table (`TAPESTRY_CT`) did
        /// not hold (a new flow's forward and reply entries; not a replaced stale one).
        ConntrackCreated = 10 => "conntrack_created",
        /// The same for the other protocols' table (`TAPESTRY_CT_ANY`).
        ConntrackAnyCreated = 11 => "conntrack_any_created",
        /// Entries the datapath took out of the TCP table itself.
        ConntrackRemoved = 12 => "conntrack_removed",
        ConntrackAnyRemoved = 13 => "conntrack_any_removed",
        /// Entries the daemon took out of the TCP table (expired ones its GC collected, a
        /// flush): written by the daemon alone, never by a program.
        ConntrackCollected = 14 => "conntrack_collected",
        ConntrackAnyCollected = 15 => "conntrack_any_collected",
    }
}

pub const COUNTERS: u32 = 16;

/// `FlowEvent::kind`.
pub mod event_kind {
    /// A new flow to a frontend and the backend chosen for it (the NAT decision).
    pub const NEW_FLOW: u8 = 1;
    /// A packet dropped or rejected; `reason` says why.
    pub const DROP: u8 = 2;
    /// A flow moved to another backend because its backend was removed.
    pub const RESELECTED: u8 = 3;
}

/// One record in the flow events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub timestamp_ns: u64,
    pub ifindex: u32,
    pub saddr: u32,
    pub daddr: u32,
    /// Backend address chosen (new flow), else 0.
    pub nat_addr: u32,
    pub service_id: u32,
    pub backend_id: u32,
    pub sport: u16,
    pub dport: u16,
    pub nat_port: u16,
    pub kind: u8,
    pub proto: u8,
    /// `DropReason` for drops.
    pub reason: u32,
    pub _pad: u32,
}

/// Per-guest counters (per CPU; userspace sums them with [`GuestStats::add`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GuestStats {
    /// Guest -> network (frames from the tap, passed on).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Network -> guest: frames redirected into the tap, including those the tap drops while no
    /// VM has it open (no carrier; the tap's own tx_dropped counts those).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// DHCP messages handed to the daemon.
    pub dhcp: u64,
    /// Drops by `DropReason` (indexes 4, 6..=13 and 15 are the guest's; a guest program never
    /// drops for a reason past 15).
    pub drops: [u64; 16],
    /// First time the guest used its own address (IPv4 source or ARP sender) on this CPU:
    /// readiness.
    pub seen_ns: u64,
    /// Self-announcements from the guest's MAC (RARP, as QEMU sends them after a live
    /// migration's switch-over): forwarded like the guest's other frames.
    pub announces: u64,
    /// First time any frame the program accepted (ARP, IPv4, RARP) came from the guest on this
    /// tap, on this CPU: a migrated-in guest has gone live here. Unlike `seen_ns`, a frame that
    /// carries no IPv4 address (a RARP announcement) counts.
    pub live_ns: u64,
    /// The guest's ARP replies to the daemon's readiness probe (for the tap's MAC, from the
    /// guest's address): counted for the probe, which reads this, and consumed, not passed on.
    pub probe_replies: u64,
}

impl GuestStats {
    /// Adds one CPU's copy of a guest's counters (`other`) into `self`.
    pub fn add(&mut self, other: &GuestStats) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.dhcp += other.dhcp;
        for (t, d) in self.drops.iter_mut().zip(other.drops.iter()) {
            *t += d;
        }
        self.seen_ns = self.seen_ns.max(other.seen_ns);
        self.announces += other.announces;
        // The first time over all CPUs: the earliest CPU that saw one.
        self.live_ns = match (self.live_ns, other.live_ns) {
            (0, t) | (t, 0) => t,
            (a, b) => a.min(b),
        };
        self.probe_replies += other.probe_replies;
    }
}

/// One DHCP frame from a guest, as queued for the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DhcpFrame {
    pub slot: u32,
    /// Bytes of `data` used.
    pub len: u32,
    pub data: [u8; DHCP_FRAME_MAX],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {
            $(
                // SAFETY: aya::Pod lets aya copy the type to and from a map's bytes. Every type
                // listed is #[repr(C)], Copy, made only of integers and integer arrays, with
                // every gap filled by an explicit `_pad` field (`sizes_have_no_implicit_padding`
                // below checks it): no padding bytes, no pointers, no invalid bit patterns.
                unsafe impl aya::Pod for $t {}
            )*
        };
    }

    pod!(
        ServiceKey,
        Service,
        Backend,
        LbTable,
        CtKey,
        CtEntry,
        AffinityKey,
        AffinityEntry,
        FragmentKey,
        FragmentPorts,
        HostReverseKey,
        HostReverse,
        Config,
        TrafficStats,
        FlowEvent,
        GuestStats,
        DhcpFrame,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<LbTable>(), 4 * (LB_TABLE_SIZE + 1));
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 40);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<FragmentKey>(), 12);
        assert_eq!(size_of::<FragmentPorts>(), 4);
        assert_eq!(size_of::<HostReverseKey>(), 16);
        assert_eq!(size_of::<HostReverse>(), 8);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<TrafficStats>(), 24);
        assert_eq!(size_of::<FlowEvent>(), 48);
        assert_eq!(size_of::<GuestStats>(), 8 * (5 + 16 + 4));
        assert_eq!(size_of::<DhcpFrame>(), 8 + DHCP_FRAME_MAX);
    }

    #[test]
    fn field_offsets_match_the_datapath() {
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(offset_of!(Service, backend_count), 4);
        assert_eq!(offset_of!(Service, algorithm), 12);
        assert_eq!(offset_of!(Service, local_backend_count), 14);
        assert_eq!(offset_of!(CtKey, sport), 8);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, direction), 13);
        assert_eq!(offset_of!(CtEntry, created_ns), 16);
        assert_eq!(offset_of!(CtEntry, nat_port), 32);
        assert_eq!(offset_of!(CtEntry, flags), 34);
        assert_eq!(offset_of!(CtEntry, nat_peer_port), 35);
        assert_eq!(offset_of!(FlowEvent, sport), 32);
        assert_eq!(offset_of!(FlowEvent, kind), 38);
        assert_eq!(offset_of!(FlowEvent, reason), 40);
        assert_eq!(align_of::<CtEntry>(), 8);
        // New guest counters go after the old ones.
        assert_eq!(offset_of!(GuestStats, seen_ns), 8 * (5 + 16));
        assert_eq!(offset_of!(GuestStats, live_ns), 8 * (5 + 16 + 2));
        assert_eq!(offset_of!(GuestStats, probe_replies), 8 * (5 + 16 + 3));
    }

    #[test]
    fn guest_stats_add_sums_counters_and_keeps_timestamps() {
        let cpu = |rx: u64, seen: u64, live: u64| GuestStats {
            rx_packets: rx,
            announces: rx * 2,
            probe_replies: rx * 3,
            seen_ns: seen,
            live_ns: live,
            drops: [rx; 16],
            ..GuestStats::default()
        };
        let mut total = GuestStats::default();
        for s in [cpu(1, 50, 0), cpu(2, 0, 70), cpu(3, 40, 30), cpu(4, 0, 0)] {
            total.add(&s);
        }
        assert_eq!(total.rx_packets, 10);
        assert_eq!(total.announces, 20);
        assert_eq!(total.probe_replies, 30);
        assert_eq!(total.drops, [10; 16]);
        assert_eq!(total.seen_ns, 50, "seen_ns: the latest CPU's");
        assert_eq!(
            total.live_ns, 30,
            "live_ns: the earliest CPU's, a CPU without one skipped"
        );
    }

    #[test]
    fn drop_reasons_fit_the_map_and_round_trip() {
        for r in DropReason::ALL {
            assert!((*r as u32) < DROP_REASONS);
            assert_eq!(DropReason::from_u32(*r as u32), Some(*r));
        }
        for c in Counter::ALL {
            assert!((*c as u32) < COUNTERS);
            assert_eq!(Counter::from_u32(*c as u32), Some(*c));
        }
        assert_eq!(DropReason::from_u32(DROP_REASONS), None);
        assert_eq!(DropReason::NoBackend.name(), "no_backend");
        // Every reason a guest program drops for has a slot in a guest's own counters.
        let guest_slots = GuestStats::default().drops.len() as u32;
        for r in GUEST_DROP_REASONS {
            assert!((r as u32) < guest_slots, "{r:?}");
        }
    }

    #[test]
    fn mac_from_u64_reverses_mac_u64() {
        let mac = [0x02, 0x54, 0xab, 0xcd, 0xef, 0x2a];
        assert_eq!(mac_from_u64(mac_u64(&mac)), mac);
        assert_eq!(mac_u64(&mac) >> 48, 0, "the two high bytes stay 0");
        assert_eq!(mac_from_u64(0), [0; 6]);
    }

    #[test]
    fn lb_table_size_is_prime() {
        let n = LB_TABLE_SIZE;
        assert!(
            (2..n)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
        );
    }
}
