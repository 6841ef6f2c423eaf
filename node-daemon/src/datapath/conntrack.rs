//! The conntrack tables from userspace: walking them, collecting expired entries (the LRU evicts
//! only when full) and flushing them. TCP flows and the rest (UDP) live in two tables, so a
//! flood of datagrams never evicts a TCP connection; [`Tables`] is both. Each caller brings its
//! own handles, so a walk of a full table (262,144 entries, one syscall each) holds no lock
//! anyone else waits on.
//!
//! # Evictions
//! The tables are LRU hash maps: a full one makes room for a new entry by evicting the least
//! recently used, and the kernel runs no program for it (an fentry/fexit program on its eviction
//! callback, `htab_lru_map_delete_node`, would count them; kernels that refuse those, such as
//! this project's test machines', leave no hook). So every other way out is counted instead, per
//! table, in the counters map: what the datapath stores under a new key
//! (`Counter::ConntrackCreated`) and removes (`ConntrackRemoved`), what the daemon removes
//! (`ConntrackCollected`: GC and flushes, written by the daemon alone). What was created and
//! is neither removed nor in the table any more was evicted ([`Tables::evicted`]).

use std::sync::Mutex;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use tapestry_common::{Counter, CtEntry, CtKey, IPPROTO_TCP, ct_direction, ct_flags, ct_lifetime};
use tracing::info;

use super::monotonic_ns;

pub type ConntrackMap = HashMap<MapData, CtKey, CtEntry>;

/// The two conntrack tables: TCP, and every other protocol; and the live flows per client.
pub struct Tables {
    pub tcp: ConntrackMap,
    pub any: ConntrackMap,
    /// The conntrack share's counts, client IPv4 (network order) -> live flows.
    pub clients: HashMap<MapData, u32, u32>,
    /// The datapath's counters map, for the tables' accounting (see the module docs).
    pub counters: PerCpuArray<MapData, u64>,
}

/// The tables' accounting, per table (TCP, the rest): what went in (created by the datapath),
/// and what came out other than by eviction (removed by the datapath, by the daemon).
const ACCOUNTING: [[Counter; 3]; 2] = [
    [
        Counter::ConntrackCreated,
        Counter::ConntrackRemoved,
        Counter::ConntrackCollected,
    ],
    [
        Counter::ConntrackAnyCreated,
        Counter::ConntrackAnyRemoved,
        Counter::ConntrackAnyCollected,
    ],
];

/// The daemon's writes of `ConntrackCollected` (a read, an add, a write back) one at a time:
/// the GC and an API flush run on threads of their own.
static COLLECTED: Mutex<()> = Mutex::new(());

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

    fn counter(&self, c: Counter) -> Result<u64> {
        let v = self
            .counters
            .get(&(c as u32), 0)
            .with_context(|| format!("reading the {} counter", c.name()))?;
        // Wrapping: `ConntrackCollected` may hold a baseline below zero (`start_accounting`).
        Ok(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
    }

    /// Entries evicted from (TCP, the rest) since the tables were created, given `live`, what
    /// [`Tables::counts`] found in them: created, minus removed by the datapath and the daemon,
    /// minus what is still there. Flows created or removed while the tables were walked make it
    /// off by as many.
    pub fn evicted(&self, live: (usize, usize)) -> Result<(u64, u64)> {
        let mut out = [0u64; 2];
        for (i, (counters, live)) in ACCOUNTING.iter().zip([live.0, live.1]).enumerate() {
            let [created, removed, collected] = counters.map(|c| self.counter(c));
            let left = created?
                .wrapping_sub(removed?)
                .wrapping_sub(collected?)
                .wrapping_sub(live as u64);
            // Negative (as an i64) only by the walk's error: nothing evicted.
            out[i] = if (left as i64) < 0 { 0 } else { left };
        }
        Ok((out[0], out[1]))
    }

    /// Adds `n` = (TCP, the rest) entries the daemon removed to `ConntrackCollected`.
    fn count_collected(&mut self, n: (u64, u64)) {
        let _one = COLLECTED.lock().unwrap_or_else(|p| p.into_inner());
        for (counters, n) in ACCOUNTING.iter().zip([n.0, n.1]) {
            if n != 0 {
                let _ = self.add(counters[2], n);
            }
        }
    }

    /// Adds `n` (wrapping) to counter `c`, which only this process writes: into CPU 0's copy.
    fn add(&mut self, c: Counter, n: u64) -> Result<()> {
        let mut v: Vec<u64> = self.counters.get(&(c as u32), 0)?.iter().copied().collect();
        v[0] = v[0].wrapping_add(n);
        let values = PerCpuValues::try_from(v).context("per-CPU values")?;
        self.counters
            .set(c as u32, values, 0)
            .with_context(|| format!("writing the {} counter", c.name()))
    }

    /// At start: tables that hold entries while nothing was ever counted were filled by a
    /// datapath without this accounting (an upgrade over its pins). Their entries count as
    /// created before counting began (a baseline subtracted from `ConntrackCollected`), so
    /// that only later evictions are counted. Call after the new programs are attached.
    pub fn start_accounting(&mut self) -> Result<()> {
        for (i, counters) in ACCOUNTING.iter().enumerate() {
            let counted = counters
                .iter()
                .map(|c| self.counter(*c))
                .collect::<Result<Vec<_>>>()?;
            if counted.iter().any(|n| *n != 0) {
                continue;
            }
            let live = if i == 0 {
                self.tcp.keys().count()
            } else {
                self.any.keys().count()
            } as u64;
            if live != 0 {
                let _one = COLLECTED.lock().unwrap_or_else(|p| p.into_inner());
                self.add(counters[2], live.wrapping_neg())?;
                info!(
                    entries = live,
                    table = i,
                    "conntrack entries of an earlier datapath: evictions counted from now on"
                );
            }
        }
        Ok(())
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
    let mut removed = (0, 0);
    for (k, _) in &expired {
        if tables.remove(k).is_ok() {
            if k.proto == IPPROTO_TCP {
                removed.0 += 1;
            } else {
                removed.1 += 1;
            }
        }
    }
    tables.count_collected(removed);
    recount_shares(tables, &live);
    expired.len()
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
    let mut removed = [0u64; 2];
    for (map, n) in [&mut tables.tcp, &mut tables.any]
        .into_iter()
        .zip(&mut removed)
    {
        let keys: Vec<CtKey> = map.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            if map.remove(&k).is_ok() {
                *n += 1;
            }
        }
    }
    tables.count_collected((removed[0], removed[1]));
    removed[0] + removed[1]
}
