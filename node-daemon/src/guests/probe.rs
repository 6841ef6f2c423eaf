//! Live guest readiness (Kubernetes mode): each guest is probed as a kubelet probes a container,
//! every period, with a timeout and success/failure thresholds. A probe succeeds when the guest
//! answers an ARP request for its address on its tap and, where it declares readiness ports
//! (`tapestry.dev/readiness-tcp-ports` on the pod, `spec.readinessProbe.tcpPorts` on the Guest),
//! accepts a TCP connection on each of them.
//!
//! Why ARP: the guest's kernel answers it as long as the guest runs and holds its address, so a
//! guest that is still booting (or has not bound its address yet), hung, or paused fails it,
//! whatever it serves. The request is an ARP probe (sender IP 0.0.0.0, RFC 5227), so the guest
//! learns no neighbour entry from it. The TCP connect is made from the node, as the kubelet's
//! tcpSocket probe is: the pod's namespace holds no address for the guest to answer to.
//!
//! The request goes out of the guest's send-only socket on its tap; the guest's reply (to the
//! tap's MAC, from its address) is counted and consumed by the tap's program
//! (`GuestStats::probe_replies`), and the probe reads that counter. A socket that received the
//! reply would have to see every frame on the tap, both ways (bound to every protocol: the tap's
//! program redirects the guest's frames before any per-protocol handler sees them).
//!
//! The outcome goes to the registry ([`Endpoints::set_probe`]), which makes it the guest's phase
//! (so the Guest object's Ready and the pod's `tapestry.dev/guest-ready` condition follow it both
//! ways, see publish.rs).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::task::JoinSet;
use tracing::{debug, info};

use super::Endpoints;
use crate::datapath::iface;

/// The probe's timing, as a kubelet probe's (`periodSeconds`, `timeoutSeconds`,
/// `successThreshold`, `failureThreshold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeConfig {
    /// Period 1 s, timeout 500 ms, ready after 1 success, not ready after 3 failures: a guest
    /// that stops answering is out within about 3.5 s. (A kubelet probe's default timeout is
    /// 1 s; a running guest answers ARP in well under a millisecond, even under TCG.)
    pub const DEFAULT: ProbeConfig = ProbeConfig {
        period: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        success_threshold: 1,
        failure_threshold: 3,
    };
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One guest's probe state, as the kubelet's prober worker keeps it: not ready until
/// `success_threshold` successes in a row, then ready until `failure_threshold` failures in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    ready: bool,
    successes: u32,
    failures: u32,
    message: String,
}

impl Default for ProbeState {
    fn default() -> Self {
        ProbeState {
            ready: false,
            successes: 0,
            failures: 0,
            message: "not probed yet".into(),
        }
    }
}

impl ProbeState {
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// What the last probe found (or what made the guest ready or not).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Records one probe's outcome; true when readiness flipped.
    pub fn observe(&mut self, config: &ProbeConfig, outcome: Result<(), String>) -> bool {
        let was = self.ready;
        match outcome {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if !self.ready && self.successes >= config.success_threshold.max(1) {
                    self.ready = true;
                }
                if self.ready {
                    self.message = "the guest answers its probe".into();
                } else {
                    self.message = format!(
                        "the guest answered {} of {} probes in a row needed",
                        self.successes, config.success_threshold
                    );
                }
            }
            Err(why) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.ready && self.failures >= config.failure_threshold.max(1) {
                    self.ready = false;
                }
                self.message = if self.ready {
                    format!(
                        "{why} ({} of {} failures before not ready)",
                        self.failures, config.failure_threshold
                    )
                } else {
                    why
                };
            }
        }
        was != self.ready
    }
}

/// What a probe needs of one guest, taken from the registry.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub slot: u32,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub tap_mac: [u8; 6],
    /// The guest's send-only packet socket on its tap.
    pub socket: Arc<OwnedFd>,
    pub tcp_ports: Vec<u16>,
}

/// Probes every guest of the registry every period, until the task is aborted.
pub async fn run_probes(endpoints: Arc<Endpoints>, config: ProbeConfig) -> Result<()> {
    info!(
        period = ?config.period,
        timeout = ?config.timeout,
        success_threshold = config.success_threshold,
        failure_threshold = config.failure_threshold,
        "probing guests for readiness"
    );
    let mut states: HashMap<(u32, String), ProbeState> = HashMap::new();
    let mut tick = tokio::time::interval(config.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets = endpoints.probe_targets();
        states.retain(|k, _| {
            targets
                .iter()
                .any(|t| (t.slot, &t.container_id) == (k.0, &k.1))
        });
        let mut round = JoinSet::new();
        for t in targets {
            let endpoints = endpoints.clone();
            round.spawn(async move {
                let outcome = probe(&endpoints, &t, config.timeout).await;
                (t, outcome)
            });
        }
        while let Some(done) = round.join_next().await {
            let Ok((t, outcome)) = done else { continue };
            let state = states.entry((t.slot, t.container_id.clone())).or_default();
            let flipped = state.observe(&config, outcome);
            if flipped {
                info!(
                    container = %t.container_id,
                    ip = %t.ip,
                    ready = state.ready(),
                    why = state.message(),
                    "guest readiness changed"
                );
            }
            endpoints.set_probe(t.slot, &t.container_id, state.ready(), state.message());
        }
    }
}

/// One probe of one guest: ARP, then each readiness port.
async fn probe(endpoints: &Endpoints, t: &ProbeTarget, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    arp_probe(endpoints, t, deadline).await?;
    for &port in &t.tcp_ports {
        let left = deadline.saturating_duration_since(Instant::now());
        let addr = SocketAddrV4::new(t.ip, port);
        match tokio::time::timeout(left, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("TCP {port}: {e}")),
            Err(_) => return Err(format!("TCP {port}: no answer within {timeout:?}")),
        }
    }
    debug!(container = %t.container_id, "guest probe succeeded");
    Ok(())
}

/// How often a probe looks at the guest's counters while it waits for the reply: first after
/// 1 ms (a running guest answers within it), then at twice the last wait, at most this.
const REPLY_POLL_MAX: Duration = Duration::from_millis(16);

/// Sends an ARP probe for the guest's address on its tap and waits until `deadline` for the
/// tap's program to count the guest's reply.
async fn arp_probe(
    endpoints: &Endpoints,
    t: &ProbeTarget,
    deadline: Instant,
) -> Result<(), String> {
    let replies = || {
        endpoints
            .probe_replies(t.slot)
            .map_err(|e| format!("reading the guest's counters: {e:#}"))
    };
    // Replies that came after an earlier probe's deadline must not count for this one.
    let before = replies()?;
    iface::send_frame(&t.socket, &arp_request(t.tap_mac, t.ip))
        .map_err(|e| format!("ARP: {e:#}"))?;
    let mut wait = Duration::from_millis(1);
    loop {
        if replies()? > before {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no ARP reply from {} within the probe's timeout",
                t.ip
            ));
        }
        tokio::time::sleep(wait.min(left)).await;
        wait = (wait * 2).min(REPLY_POLL_MAX);
    }
}

const ETH_P_ARP: u16 = 0x0806;

/// An ARP probe (RFC 5227: sender IP 0.0.0.0) for `target`, broadcast from the tap's MAC.
pub fn arp_request(from: [u8; 6], target: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&from);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&from);
    // sender IP 0.0.0.0 (f[28..32]), target MAC unknown (f[32..38])
    f[38..42].copy_from_slice(&target.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(success: u32, failure: u32) -> ProbeConfig {
        ProbeConfig {
            success_threshold: success,
            failure_threshold: failure,
            ..ProbeConfig::DEFAULT
        }
    }

    #[test]
    fn starts_not_ready_and_becomes_ready_after_the_success_threshold() {
        let c = cfg(2, 3);
        let mut s = ProbeState::default();
        assert!(!s.ready());
        assert!(!s.observe(&c, Ok(())));
        assert!(!s.ready());
        assert!(s.message().contains("1 of 2"), "{}", s.message());
        assert!(s.observe(&c, Ok(())));
        assert!(s.ready());
        assert!(!s.observe(&c, Ok(())));
        assert!(s.ready());
    }

    #[test]
    fn a_failure_resets_the_successes_before_ready() {
        let c = cfg(2, 3);
        let mut s = ProbeState::default();
        s.observe(&c, Ok(()));
        s.observe(&c, Err("no ARP reply".into()));
        assert!(!s.observe(&c, Ok(())));
        assert!(!s.ready());
        assert!(s.observe(&c, Ok(())));
    }

    #[test]
    fn ready_until_the_failure_threshold_in_a_row() {
        let c = cfg(1, 3);
        let mut s = ProbeState::default();
        assert!(s.observe(&c, Ok(())));
        assert!(!s.observe(&c, Err("no ARP reply".into())));
        assert!(!s.observe(&c, Err("no ARP reply".into())));
        assert!(s.ready(), "two failures of three keep it ready");
        assert!(s.message().contains("2 of 3"), "{}", s.message());
        // A success in between starts the count again.
        assert!(!s.observe(&c, Ok(())));
        for _ in 0..2 {
            assert!(!s.observe(&c, Err("x".into())));
        }
        assert!(s.observe(&c, Err("TCP 22: refused".into())));
        assert!(!s.ready());
        assert_eq!(s.message(), "TCP 22: refused");
        // And back with one success.
        assert!(s.observe(&c, Ok(())));
    }

    #[test]
    fn a_never_answering_guest_stays_not_ready() {
        let c = ProbeConfig::DEFAULT;
        let mut s = ProbeState::default();
        for _ in 0..10 {
            assert!(!s.observe(&c, Err("no ARP reply".into())));
        }
        assert!(!s.ready());
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let c = cfg(0, 0);
        let mut s = ProbeState::default();
        assert!(s.observe(&c, Ok(())));
        assert!(s.observe(&c, Err("x".into())));
    }

    /// The probe is an RFC 5227 ARP probe from the tap's MAC: the guest's kernel answers it to
    /// that MAC (target hardware address and Ethernet destination), which is how the tap's
    /// program tells the reply from the guest's other ARP (node-daemon/tests/guest_programs.rs).
    #[test]
    fn the_arp_probe() {
        let tap = [0x02, 0, 0, 0, 0, 1];
        let ip = Ipv4Addr::new(10, 0, 0, 9);
        let req = arp_request(tap, ip);
        let (eth, rest) = etherparse::Ethernet2Header::from_slice(&req).unwrap();
        assert_eq!(eth.destination, [0xff; 6], "broadcast");
        assert_eq!(eth.source, tap);
        assert_eq!(eth.ether_type, etherparse::EtherType::ARP);
        let arp = etherparse::ArpPacket::from_slice(rest)
            .unwrap()
            .try_eth_ipv4()
            .unwrap();
        assert_eq!(arp.operation, etherparse::ArpOperation::REQUEST);
        assert_eq!(arp.sender_mac, tap, "answered to the tap's MAC");
        assert_eq!(arp.sender_ipv4, [0; 4], "an ARP probe: sender IP 0");
        assert_eq!(arp.target_mac, [0; 6]);
        assert_eq!(arp.target_ipv4, ip.octets());
    }
}
