//! Every map of the datapath, defined here once. Pinned by name under the daemon's bpffs
//! directory, so a restarted (or replaced) program finds the same services, backends and
//! conntrack entries, and every guest's programs count into the node's one drops map.
//!
//! The maps are not statics of this library: a map static in a library is exported into every
//! object that links the library (rustc hands bpf-linker the exported symbols of every crate),
//! so the guest programs' object used to carry all twelve load-balancing maps. Each program
//! binary defines the maps its code uses with [`maps!`](crate::maps!) instead, and its object
//! carries exactly those: `tapestry_common::map_names::ALL` (the load balancer) and
//! `map_names::GUEST` (the guest programs), as node-daemon/tests/map_names.rs checks.

use aya_ebpf::maps::PerCpuArray;

/// Defines, in a program binary, the maps its code uses, as `crate::maps::<NAME>`:
/// `tapestry_ebpf::maps!(GUEST_STATS, DHCP, DROPS);`. Each map's name, type and size are in
/// `__map!` below; its name in the object comes from `tapestry_common::map_name!`.
#[macro_export]
macro_rules! maps {
    ($($name:ident),+ $(,)?) => {
        /// The maps of this program's object (defined in tapestry-ebpf's src/maps.rs).
        pub mod maps {
            #[allow(unused_imports)]
            use $crate::maps::definitions::*;
            $($crate::__map!($name);)+
        }
    };
}

/// What the map definitions below name, in scope where [`maps!`](crate::maps!) expands.
#[doc(hidden)]
pub mod definitions {
    pub use aya_ebpf::{
        bindings::BPF_F_NO_PREALLOC,
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    };
    pub use tapestry_common::{
        AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, DHCP_RING_BYTES, DROP_REASONS,
        EVENTS_RING_BYTES, FragmentKey, FragmentPorts, GuestStats, HostReverse, HostReverseKey,
        LbTable, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK, MAX_CONNTRACK_ANY, MAX_CT_CLIENTS,
        MAX_ENDPOINT_IFS, MAX_FRAGMENTS, MAX_GUESTS, MAX_HOST_REVERSE, MAX_NODE_ADDRS,
        MAX_SERVICES, Service, ServiceKey, TrafficStats,
    };
}

/// One map definition: `#[aya_ebpf::macros::map]` with the name taken from
/// `tapestry_common::map_name!`, by the static's own name. aya's attribute accepts the name only
/// as a string literal written in place, so this writes out what it expands to
/// (aya-ebpf-macros 0.2.0, src/map.rs): the static in the `maps` section, under the map's name.
#[doc(hidden)]
#[macro_export]
macro_rules! __pinned_map {
    ($(#[$meta:meta])* $name:ident: $ty:ty = $init:expr) => {
        $(#[$meta])*
        // SAFETY: both attributes name what the loader reads: the section holds only map
        // definitions, and the symbol is the map's name, unique in the object because every name
        // comes from the one table in tapestry_common (`map_name!`) and each map is defined once.
        #[unsafe(link_section = "maps")]
        #[unsafe(export_name = ::tapestry_common::map_name!($name))]
        pub static $name: $ty = $init;
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __map {
    (SERVICES) => {
        $crate::__pinned_map! {
            SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0)
        }
    };
    (BACKENDS) => {
        $crate::__pinned_map! {
            BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0)
        }
    };
    (LB_TABLES) => {
        $crate::__pinned_map! {
            // Not preallocated: a table is 4 KiB, and most of the 65,536 possible services do
            // not exist. Hash map updates replace the element whole (RCU), so a reader sees the
            // old or the new table.
            LB_TABLES: HashMap<u32, LbTable> = HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC)
        }
    };
    (CONNTRACK) => {
        $crate::__pinned_map! {
            CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CONNTRACK, 0)
        }
    };
    (CONNTRACK_ANY) => {
        $crate::__pinned_map! {
            /// Flows of every protocol but TCP: an LRU of their own (see map_names).
            CONNTRACK_ANY: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CONNTRACK_ANY, 0)
        }
    };
    (CT_CLIENTS) => {
        $crate::__pinned_map! {
            /// Live flows per client IPv4 address: +1 per new flow, -1 when the flow closes
            /// (FIN/RST), recounted exactly by the daemon's conntrack GC.
            CT_CLIENTS: LruHashMap<u32, u32> = LruHashMap::pinned(MAX_CT_CLIENTS, 0)
        }
    };
    (AFFINITY) => {
        $crate::__pinned_map! {
            AFFINITY: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(MAX_AFFINITY, 0)
        }
    };
    (FRAGMENTS) => {
        $crate::__pinned_map! {
            FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
                LruHashMap::pinned(MAX_FRAGMENTS, 0)
        }
    };
    (HOST_REVERSE) => {
        $crate::__pinned_map! {
            /// (node socket, backend) -> the frontend it asked for.
            HOST_REVERSE: LruHashMap<HostReverseKey, HostReverse> =
                LruHashMap::pinned(MAX_HOST_REVERSE, 0)
        }
    };
    (NODE_ADDRS) => {
        $crate::__pinned_map! {
            /// The node's own IPv4 addresses (network byte order) -> 1.
            NODE_ADDRS: HashMap<u32, u8> = HashMap::pinned(MAX_NODE_ADDRS, 0)
        }
    };
    (ENDPOINT_IFS) => {
        $crate::__pinned_map! {
            /// The host-side interfaces (veths) of this node's endpoints, by ifindex -> 1.
            ENDPOINT_IFS: HashMap<u32, u8> = HashMap::pinned(MAX_ENDPOINT_IFS, 0)
        }
    };
    (CONFIG) => {
        $crate::__pinned_map! {
            CONFIG: Array<Config> = Array::pinned(1, 0)
        }
    };
    (SERVICE_STATS) => {
        $crate::__pinned_map! {
            SERVICE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0)
        }
    };
    (BACKEND_STATS) => {
        $crate::__pinned_map! {
            BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0)
        }
    };
    (DROPS) => {
        $crate::__pinned_map! {
            /// Drops by `DropReason`, node-wide: the load balancer's and every guest's.
            DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0)
        }
    };
    (COUNTERS) => {
        $crate::__pinned_map! {
            COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(::tapestry_common::COUNTERS, 0)
        }
    };
    (EVENTS) => {
        $crate::__pinned_map! {
            EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0)
        }
    };
    (GUEST_STATS) => {
        $crate::__pinned_map! {
            /// Per-guest counters, indexed by the guest's slot.
            GUEST_STATS: PerCpuArray<GuestStats> = PerCpuArray::pinned(MAX_GUESTS, 0)
        }
    };
    (DHCP) => {
        $crate::__pinned_map! {
            /// DHCP frames from guests, for the daemon's DHCP server.
            DHCP: RingBuf = RingBuf::pinned(DHCP_RING_BYTES, 0)
        }
    };
    (DHCP_RATE) => {
        $crate::__pinned_map! {
            /// Per guest slot: the theoretical arrival time (ns, bpf_ktime_get_ns) of its next
            /// DHCP message at the sustained rate (GCRA). One copy for all CPUs: a race between
            /// two CPUs can admit a message or two more, never fewer.
            DHCP_RATE: Array<u64> = Array::pinned(MAX_GUESTS, 0)
        }
    };
}

/// Adds one to slot `index` of a per-CPU counter array; an index out of range counts nothing.
#[inline(always)]
pub fn increment(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(v) = counters.get_ptr_mut(index) {
        // SAFETY: a successful lookup gives a valid, aligned pointer to this CPU's copy of the
        // slot, alive while the program runs; tc programs run with bottom halves disabled, so no
        // other program run on this CPU writes this copy meanwhile.
        unsafe { *v += 1 };
    }
}
