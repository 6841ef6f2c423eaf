//! Flow events: drained from the datapath's ring buffer into a bounded in-memory log.
//!
//! The datapath never waits for a reader: a full ring buffer drops the event and counts it
//! (`events_lost`). The log here is bounded too, so a slow API client never holds memory.

use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use jiff::Timestamp;
use tapestry_api::types::{FlowKind, FlowRecord, Protocol, Verdict};
use tapestry_common::{DropReason, FlowEvent, event_kind};

/// Events kept for readers.
pub const FLOW_LOG_CAPACITY: usize = 8192;

fn addr(ip: u32, port: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(ip.to_ne_bytes()),
        u16::from_be(port)
    )
}

/// Decodes a datapath event; identities are filled in by the API from the node's knowledge.
pub fn decode(e: &FlowEvent, seq: u64, now: SystemTime) -> FlowRecord {
    let kind = match e.kind {
        event_kind::NEW_FLOW => FlowKind::New,
        event_kind::RESELECTED => FlowKind::Reselected,
        event_kind::DROP => FlowKind::Drop,
        _ => FlowKind::Unknown,
    };
    let unix_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    FlowRecord {
        seq,
        time: humantime_rfc3339(now),
        unix_ms,
        kind,
        verdict: if e.kind == event_kind::DROP {
            Verdict::Dropped
        } else {
            Verdict::Forwarded
        },
        protocol: Protocol::from_ip_proto(e.proto),
        src: addr(e.saddr, e.sport),
        dst: addr(e.daddr, e.dport),
        backend: (e.nat_addr != 0).then(|| addr(e.nat_addr, e.nat_port)),
        service: None,
        src_identity: None,
        dst_identity: None,
        backend_identity: None,
        src_node: None,
        backend_node: None,
        src_moved: None,
        backend_moved: None,
        drop_reason: (e.kind == event_kind::DROP)
            .then(|| DropReason::from_u32(e.reason).map(|r| r.name().to_owned()))
            .flatten(),
        ifindex: e.ifindex,
        service_id: e.service_id,
    }
}

/// RFC 3339 in UTC with milliseconds: `2025-11-25T19:30:00.123Z`.
fn humantime_rfc3339(t: SystemTime) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let t = Timestamp::from_millisecond(ms).unwrap_or(Timestamp::MAX);
    format!("{t:.3}")
}

/// The last `FLOW_LOG_CAPACITY` events, with a sequence number so readers can follow.
#[derive(Debug, Default)]
pub struct FlowLog {
    inner: Mutex<FlowLogInner>,
}

#[derive(Debug, Default)]
struct FlowLogInner {
    events: VecDeque<FlowRecord>,
    next_seq: u64,
    /// Events pushed out of the log before anyone read them.
    overflowed: u64,
    /// Every event below this sequence was handed to a reader.
    read_to: u64,
}

impl FlowLog {
    pub fn push(&self, e: &FlowEvent) {
        let now = SystemTime::now();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let seq = g.next_seq;
        g.next_seq += 1;
        if g.events.len() == FLOW_LOG_CAPACITY
            && let Some(old) = g.events.pop_front()
            && old.seq >= g.read_to
        {
            g.overflowed += 1;
        }
        g.events.push_back(decode(e, seq, now));
    }

    /// Events with sequence >= `from`, the sequence to ask for next, and how many events were
    /// pushed out of the log before any reader had them (a reader that keeps up loses none,
    /// however many the log has held since).
    pub fn since(&self, from: u64) -> (Vec<FlowRecord>, u64, u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let flows: Vec<FlowRecord> = g.events.iter().filter(|f| f.seq >= from).cloned().collect();
        // The reader has everything up to the newest now: what it skipped (below `from`) it
        // read before, what was pushed out before it came is counted already.
        if from <= g.next_seq {
            g.read_to = g.next_seq;
        }
        (flows, g.next_seq, g.overflowed)
    }
}

/// How often the ring buffer is drained. The datapath writes events without waking a reader
/// (`BPF_RB_NO_WAKEUP`), so reading costs one pass per tick, however many flows start.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Drains the ring buffer into `log` until the task is aborted.
pub async fn drain(mut ring: RingBuf<MapData>, log: std::sync::Arc<FlowLog>) -> Result<()> {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the datapath writes whole FlowEvents; the length was checked.
                let e: FlowEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) };
                log.push(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_764_099_000_123);
        assert_eq!(humantime_rfc3339(t), "2025-11-25T19:30:00.123Z");
        assert_eq!(humantime_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn the_log_is_bounded_and_counts_overflow() {
        let log = FlowLog::default();
        let e = FlowEvent {
            kind: event_kind::DROP,
            reason: DropReason::SpoofedIp as u32,
            ..Default::default()
        };
        for _ in 0..FLOW_LOG_CAPACITY + 5 {
            log.push(&e);
        }
        let (all, next, lost) = log.since(0);
        assert_eq!(all.len(), FLOW_LOG_CAPACITY);
        assert_eq!((next, lost), (FLOW_LOG_CAPACITY as u64 + 5, 5));
        assert_eq!(all[0].drop_reason.as_deref(), Some("spoofed_ip"));
        assert_eq!(all[0].verdict, Verdict::Dropped);
        let (newer, _, _) = log.since(next - 2);
        assert_eq!(newer.len(), 2);
    }

    #[test]
    fn a_reader_that_keeps_up_loses_nothing() {
        let log = FlowLog::default();
        let e = FlowEvent::default();
        let mut next = 0;
        let mut got = 0;
        // Ten times the log's size, read every half log: all of it reaches the reader.
        for _ in 0..20 {
            for _ in 0..FLOW_LOG_CAPACITY / 2 {
                log.push(&e);
            }
            let (flows, n, lost) = log.since(next);
            assert_eq!(lost, 0);
            assert_eq!(flows.first().map(|f| f.seq), Some(next));
            got += flows.len();
            next = n;
        }
        assert_eq!(got, 10 * FLOW_LOG_CAPACITY);
        // Then the reader falls behind by 5 events more than the log holds: those 5 are lost.
        for _ in 0..FLOW_LOG_CAPACITY + 5 {
            log.push(&e);
        }
        let (flows, _, lost) = log.since(next);
        assert_eq!((flows.len(), lost), (FLOW_LOG_CAPACITY, 5));
        // A reader that asks for an old sequence afterwards does not make them read.
        for _ in 0..3 {
            log.push(&e);
        }
        assert_eq!(log.since(0).2, 5);
    }
}
