//! Flow events: drained from the datapath's ring buffer into a bounded in-memory log.
//!
//! The datapath never waits for a reader: a full ring buffer drops the event and counts it
//! (`events_lost`). The log here is bounded too, so a slow API client never holds memory.

use std::{collections::VecDeque, net::Ipv4Addr, sync::Mutex};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tapestry_common::{DropReason, FlowEvent, event_kind};
use tokio::io::unix::AsyncFd;

/// Events kept for readers.
pub const FLOW_LOG_CAPACITY: usize = 8192;

/// A flow event, decoded.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// Monotonic nanoseconds (as the datapath saw it).
    pub timestamp_ns: u64,
    /// "new", "reselected" or "drop".
    pub kind: String,
    pub protocol: String,
    pub src: String,
    pub dst: String,
    /// The backend chosen, for new flows.
    pub backend: Option<String>,
    pub service_id: u32,
    pub backend_id: u32,
    pub ifindex: u32,
    pub drop_reason: Option<String>,
}

impl Flow {
    pub fn decode(e: &FlowEvent) -> Self {
        let a = |ip: u32, port: u16| {
            format!(
                "{}:{}",
                Ipv4Addr::from(ip.to_ne_bytes()),
                u16::from_be(port)
            )
        };
        let kind = match e.kind {
            event_kind::NEW_FLOW => "new",
            event_kind::RESELECTED => "reselected",
            event_kind::DROP => "drop",
            _ => "unknown",
        };
        Flow {
            timestamp_ns: e.timestamp_ns,
            kind: kind.into(),
            protocol: match e.proto {
                6 => "TCP".into(),
                17 => "UDP".into(),
                p => p.to_string(),
            },
            src: a(e.saddr, e.sport),
            dst: a(e.daddr, e.dport),
            backend: (e.nat_addr != 0).then(|| a(e.nat_addr, e.nat_port)),
            service_id: e.service_id,
            backend_id: e.backend_id,
            ifindex: e.ifindex,
            drop_reason: (e.kind == event_kind::DROP)
                .then(|| DropReason::from_u32(e.reason).map(|r| r.name().to_owned()))
                .flatten(),
        }
    }
}

/// The last `FLOW_LOG_CAPACITY` events, with a sequence number so readers can follow.
#[derive(Debug, Default)]
pub struct FlowLog {
    inner: Mutex<FlowLogInner>,
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct FlowLogInner {
    events: VecDeque<(u64, Flow)>,
    next_seq: u64,
}

impl FlowLog {
    pub fn push(&self, flow: Flow) {
        let mut g = self.inner.lock().expect("flow log lock");
        let seq = g.next_seq;
        g.next_seq += 1;
        if g.events.len() == FLOW_LOG_CAPACITY {
            g.events.pop_front();
        }
        g.events.push_back((seq, flow));
        drop(g);
        self.notify.notify_waiters();
    }

    /// Events with sequence >= `from`, and the sequence to ask for next.
    pub fn since(&self, from: u64) -> (Vec<Flow>, u64) {
        let g = self.inner.lock().expect("flow log lock");
        let flows = g
            .events
            .iter()
            .filter(|(s, _)| *s >= from)
            .map(|(_, f)| f.clone())
            .collect();
        (flows, g.next_seq)
    }

    pub async fn wait(&self) {
        self.notify.notified().await
    }
}

/// Drains the ring buffer into `log` until the task is aborted.
pub async fn drain(ring: RingBuf<MapData>, log: std::sync::Arc<FlowLog>) -> Result<()> {
    // SAFETY: the RingBuf owns its fd and moves into the AsyncFd, which deregisters it before
    // dropping it.
    let mut fd =
        unsafe { AsyncFd::register(ring) }.context("polling the flow events ring buffer")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<FlowEvent>() {
                // SAFETY: the datapath writes whole FlowEvents; the length was checked.
                let e: FlowEvent =
                    unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) };
                log.push(Flow::decode(&e));
            }
        }
        guard.clear_ready();
    }
}
