//! The guest path: the endpoint registry the CNI plugin fills (every pod's veth, and for a VM pod
//! its tap and guest programs), DHCP for guests, their readiness, and (Kubernetes mode) the Guest
//! objects published for them.
//!
//! ```text
//! CNI ADD/DEL --> Endpoints (registry) --changes--> publish (Guest objects, pods' guest-ready)
//! discover ------------^  ^            ^   (Kubernetes mode: this node's pods without one)
//!   serve_dhcp ------+            +------ watch_readiness (first traffic seen by the datapath)
//!                                 +------ probe::run_probes (Kubernetes mode: ARP, TCP)
//! ```

pub mod dhcp;
pub mod discover;
pub mod endpoints;
pub mod migration;
pub mod probe;
pub mod publish;

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tapestry_common::DhcpFrame;

pub use endpoints::{EndpointError, Endpoints};

/// How often guests that are not Ready yet are looked at for their first packet.
pub const READINESS_INTERVAL: Duration = Duration::from_millis(250);

/// Answers the guests' DHCP, queued by the guest programs.
pub async fn serve_dhcp(ring: RingBuf<MapData>, endpoints: Arc<Endpoints>) -> Result<()> {
    // SAFETY: the RingBuf owns its fd and moves into the AsyncFd, which polls that fd only.
    let mut fd =
        unsafe { tokio::io::unix::AsyncFd::register(ring) }.context("polling the DHCP queue")?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut frames = Vec::new();
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<DhcpFrame>() {
                // SAFETY: the guest program writes whole DhcpFrames; the length was checked, and
                // read_unaligned copies without assuming the ring's alignment.
                frames.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DhcpFrame) });
            }
        }
        guard.clear_ready();
        if !frames.is_empty() {
            let endpoints = endpoints.clone();
            tokio::task::spawn_blocking(move || {
                for frame in &frames {
                    endpoints.handle_dhcp(frame);
                }
            })
            .await
            .context("the DHCP thread")?;
        }
    }
}

/// Tells the registry's subscribers when a guest becomes Ready or stops being so through what
/// the datapath saw (its first packet), which no registry call announces.
pub async fn watch_readiness(endpoints: Arc<Endpoints>) -> Result<()> {
    let mut last: HashMap<u32, bool> = HashMap::new();
    let mut tick = tokio::time::interval(READINESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now: HashMap<u32, bool> = endpoints.readiness().into_iter().collect();
        let flipped = now
            .iter()
            .any(|(slot, ready)| last.get(slot).is_some_and(|was| was != ready));
        if flipped {
            endpoints.readiness_changed();
        }
        last = now;
    }
}
