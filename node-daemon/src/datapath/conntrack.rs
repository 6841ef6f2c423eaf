//! The conntrack map from userspace: walking it, collecting expired entries (the LRU evicts only
//! when full) and flushing it. Each caller brings its own map handle, so a walk of a full table
//! (262,144 entries, one syscall each) holds no lock anyone else waits on.

use aya::maps::{HashMap, MapData};
use tapestry_common::{CtEntry, CtKey, ct_lifetime};

use super::monotonic_ns;

pub type ConntrackMap = HashMap<MapData, CtKey, CtEntry>;

/// Every entry the map holds right now (expired ones included).
pub fn entries(map: &ConntrackMap) -> Vec<(CtKey, CtEntry)> {
    map.iter().filter_map(|r| r.ok()).collect()
}

/// Whether `e` still pins its flow at `now` (CLOCK_MONOTONIC ns).
pub fn is_live(k: &CtKey, e: &CtEntry, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) <= ct_lifetime::for_entry(k.proto, e.flags)
}

/// Deletes expired entries; returns how many.
pub fn collect_garbage(map: &mut ConntrackMap) -> usize {
    let now = monotonic_ns();
    let expired: Vec<CtKey> = entries(map)
        .into_iter()
        .filter(|(k, e)| !is_live(k, e, now))
        .map(|(k, _)| k)
        .collect();
    let n = expired.len();
    for k in expired {
        let _ = map.remove(&k);
    }
    n
}

/// Removes every entry: live flows are balanced anew on their next packet.
pub fn flush(map: &mut ConntrackMap) -> u64 {
    let keys: Vec<CtKey> = map.keys().filter_map(|k| k.ok()).collect();
    let mut removed = 0;
    for k in keys {
        if map.remove(&k).is_ok() {
            removed += 1;
        }
    }
    removed
}
