//! Backend selection tables: weighted random, and Maglev consistent hashing.
//!
//! The datapath picks a slot (at random, or by the flow's hash for Maglev) in a table of
//! `LB_TABLE_SIZE` backend ids. Both tables hold each backend in proportion to its weight; the
//! Maglev table additionally moves as few slots as possible when a backend comes or goes
//! (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016).

use tapestry_common::{LB_TABLE_SIZE, LbTable};

/// A backend as the table builders see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableBackend {
    pub id: u32,
    /// At least 1.
    pub weight: u32,
    /// Stable identity used for Maglev's permutation ("ip:port/proto"): the same backend lands on
    /// the same slots on every node and after every restart.
    pub key: String,
}

/// FNV-1a, 64 bit: stable across processes and releases, unlike std's hasher.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby keys spread over the table.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Weighted random table: each backend fills slots in proportion to its weight, interleaved by
/// smooth weighted round robin so no run of slots favours one backend.
pub fn random_table(backends: &[TableBackend]) -> LbTable {
    let mut table = LbTable::default();
    if backends.is_empty() {
        return table;
    }
    if backends.iter().all(|b| b.weight == backends[0].weight) {
        // Equal weights (the common case): plain rotation, O(table) instead of O(table * n).
        for (slot, b) in table.backends.iter_mut().zip(backends.iter().cycle()) {
            *slot = b.id;
        }
        return table;
    }
    let total: i64 = backends.iter().map(|b| b.weight.max(1) as i64).sum();
    let mut current = vec![0i64; backends.len()];
    for slot in table.backends.iter_mut() {
        let mut best = 0;
        for (i, b) in backends.iter().enumerate() {
            current[i] += b.weight.max(1) as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        *slot = backends[best].id;
    }
    table
}

/// Maglev table. Backends are ordered by key first, so the result does not depend on the order
/// the caller lists them in.
pub fn maglev_table(backends: &[TableBackend]) -> LbTable {
    let mut table = LbTable::default();
    if backends.is_empty() {
        return table;
    }
    let m = LB_TABLE_SIZE as u64;
    let mut sorted: Vec<&TableBackend> = backends.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let offset = fnv1a(0x5eed_0001, b.key.as_bytes()) % m;
            let skip = fnv1a(0x5eed_0002, b.key.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut owner = vec![u32::MAX; LB_TABLE_SIZE];
    let mut filled = 0;
    let w_max = sorted
        .iter()
        .map(|b| b.weight.max(1) as u64)
        .max()
        .unwrap_or(1);
    // Weighted turns: in round n a backend of weight w takes a turn when floor(n*w/w_max)
    // grows, so the heaviest take one every round and the others proportionally fewer. Rounds
    // stay short whatever the weights add up to (a plain "w turns per round" would let the first
    // heavy backends fill the table before the others get any slot).
    let mut round = 0u64;
    'rounds: loop {
        round += 1;
        for (i, b) in sorted.iter().enumerate() {
            let w = b.weight.max(1) as u64;
            if round * w / w_max == (round - 1) * w / w_max {
                continue;
            }
            let (offset, skip) = perms[i];
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while owner[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            owner[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == LB_TABLE_SIZE {
                break 'rounds;
            }
        }
    }
    for (slot, i) in table.backends.iter_mut().zip(owner) {
        *slot = sorted[i as usize].id;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn backends(n: u32) -> Vec<TableBackend> {
        (1..=n)
            .map(|i| TableBackend {
                id: i,
                weight: 1,
                key: format!("10.0.0.{i}:8080/6"),
            })
            .collect()
    }

    fn shares(t: &LbTable) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for id in t.backends {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    #[test]
    fn maglev_spreads_evenly() {
        let t = maglev_table(&backends(10));
        let s = shares(&t);
        assert_eq!(s.len(), 10);
        for (_, n) in s {
            // 1021 / 10 = 102.1; Maglev stays within a few slots of that.
            assert!((95..=110).contains(&n), "share {n}");
        }
    }

    #[test]
    fn maglev_moves_few_slots_when_a_backend_goes() {
        let before = maglev_table(&backends(10));
        let mut fewer = backends(10);
        fewer.remove(3); // id 4
        let after = maglev_table(&fewer);
        let moved = before
            .backends
            .iter()
            .zip(after.backends.iter())
            .filter(|(b, a)| b != a && **b != 4)
            .count();
        // Only the removed backend's slots must move; Maglev moves a few others at most.
        assert!(
            moved < LB_TABLE_SIZE / 20,
            "{moved} slots of surviving backends moved"
        );
        assert!(after.backends.iter().all(|id| *id != 4));
    }

    #[test]
    fn maglev_ignores_input_order() {
        let mut b = backends(5);
        let t1 = maglev_table(&b);
        b.reverse();
        assert_eq!(t1, maglev_table(&b));
    }

    #[test]
    fn weights_are_honoured() {
        let mut b = backends(2);
        b[0].weight = 3;
        for t in [random_table(&b), maglev_table(&b)] {
            let s = shares(&t);
            let ratio = s[&1] as f64 / s[&2] as f64;
            assert!((2.7..3.3).contains(&ratio), "ratio {ratio}");
        }
    }

    #[test]
    fn heavy_weights_do_not_starve_later_backends() {
        let mut b = backends(10);
        for x in b.iter_mut() {
            x.weight = 256;
        }
        b[9].weight = 128;
        let s = shares(&maglev_table(&b));
        assert_eq!(s.len(), 10, "{s:?}");
        let ratio = s[&1] as f64 / s[&10] as f64;
        assert!((1.7..2.3).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn random_table_interleaves() {
        let t = random_table(&backends(3));
        assert_eq!(&t.backends[..6], &[1, 2, 3, 1, 2, 3]);
        let mut weighted = backends(2);
        weighted[0].weight = 2;
        let t = random_table(&weighted);
        assert_eq!(&t.backends[..6], &[1, 2, 1, 1, 2, 1]);
    }

    #[test]
    fn empty_tables_are_zero() {
        assert!(random_table(&[]).backends.iter().all(|id| *id == 0));
        assert!(maglev_table(&[]).backends.iter().all(|id| *id == 0));
    }
}
