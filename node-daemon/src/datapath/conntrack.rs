//! The conntrack tables from userspace: walking them, collecting expired entries (the LRU evicts
//! only when full) and flushing them. TCP flows and the rest (UDP) live in two tables, so a
//! flood of datagrams never evicts a TCP connection; [`Tables`] is both. Each caller brings its
//! own handles, so a walk of a full table (262,144 entries, one syscall each) holds no lock
//! anyone else waits on.

use aya::maps::{HashMap, MapData, MapError};
use tapestry_common::{CtEntry, CtKey, IPPROTO_TCP, ct_direction, ct_flags, ct_lifetime};

use super::monotonic_ns;

pub type ConntrackMap = HashMap<MapData, CtKey, CtEntry>;

/// The two conntrack tables: TCP, and every other protocol; and the live flows per client.
pub struct Tables {
    pub tcp: ConntrackMap,
    pub any: ConntrackMap,
    /// The conntrack share's counts, client IPv4 (network order) -> live flows.
    pub clients: HashMap<MapData, u32, u32>,
}

impl Tables {
    /// The table a flow of `key`'s protocol lives in.
    pub fn of(&mut self, key: &CtKey) -> &mut ConntrackMap {
        if key.proto == IPPROTO_TCP {
            &mut self.tcp
        } else {
            &mut self.any
        }
    }

    pub fn insert(&mut self, key: CtKey, entry: CtEntry) -> Result<(), MapError> {
        self.of(&key).insert(key, entry, 0)
    }

    pub fn remove(&mut self, key: &CtKey) -> Result<(), MapError> {
        self.of(key).remove(key)
    }

    /// Entries held now in (TCP, the rest).
    pub fn counts(&self) -> (usize, usize) {
        (self.tcp.keys().count(), self.any.keys().count())
    }
}

/// Every entry the tables hold right now (expired ones included).
pub fn entries(tables: &Tables) -> Vec<(CtKey, CtEntry)> {
    [&tables.tcp, &tables.any]
        .into_iter()
        .flat_map(|m| m.iter().filter_map(|r| r.ok()))
        .collect()
}

/// Whether `e` still pins its flow at `now` (CLOCK_MONOTONIC ns).
pub fn is_live(k: &CtKey, e: &CtEntry, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) <= ct_lifetime::for_entry(k.proto, e.flags)
}

/// Deletes expired entries, then recounts each client's live flows for the conntrack share;
/// returns how many entries went.
pub fn collect_garbage(tables: &mut Tables) -> usize {
    let now = monotonic_ns();
    let (live, expired): (Vec<_>, Vec<_>) = entries(tables)
        .into_iter()
        .partition(|(k, e)| is_live(k, e, now));
    let n = expired.len();
    for (k, _) in expired {
        let _ = tables.remove(&k);
    }
    recount_shares(tables, &live);
    n
}

/// The datapath adds one per new flow and takes one off when a flow closes, but never hears of
/// an entry that expired or was evicted: the counts are made exact again from the entries
/// `live` now (forward entries of open flows, by client).
fn recount_shares(tables: &mut Tables, live: &[(CtKey, CtEntry)]) {
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for (k, e) in live {
        if k.direction == ct_direction::FORWARD && e.flags & ct_flags::CLOSING == 0 {
            *counts.entry(k.saddr).or_default() += 1;
        }
    }
    let known: Vec<u32> = tables.clients.keys().filter_map(|k| k.ok()).collect();
    for client in known {
        if !counts.contains_key(&client) {
            let _ = tables.clients.remove(&client);
        }
    }
    for (client, n) in counts {
        let _ = tables.clients.insert(client, n, 0);
    }
}

/// Removes every entry: live flows are balanced anew on their next packet.
pub fn flush(tables: &mut Tables) -> u64 {
    let mut removed = 0;
    for map in [&mut tables.tcp, &mut tables.any] {
        let keys: Vec<CtKey> = map.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            if map.remove(&k).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}
