//! Every map of the datapath. Pinned by name under the daemon's bpffs directory, so a restarted
//! (or replaced) program finds the same services, backends and conntrack entries.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tapestry_common::*;

#[map(name = "TAPESTRY_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "TAPESTRY_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

// Not preallocated: a table is 4 KiB, and most of the 65,536 possible services do not exist.
// Hash map updates replace the element whole (RCU), so a reader sees the old or the new table.
#[map(name = "TAPESTRY_LB_TABLES")]
pub static LB_TABLES: HashMap<u32, LbTable> = HashMap::pinned(MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map(name = "TAPESTRY_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CONNTRACK, 0);

#[map(name = "TAPESTRY_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(MAX_AFFINITY, 0);

#[map(name = "TAPESTRY_FRAGS")]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> = LruHashMap::pinned(MAX_FRAGMENTS, 0);

#[map(name = "TAPESTRY_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "TAPESTRY_SVC_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "TAPESTRY_BE_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "TAPESTRY_DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0);

#[map(name = "TAPESTRY_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(tapestry_common::COUNTERS, 0);

#[map(name = "TAPESTRY_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

#[inline(always)]
pub fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}
