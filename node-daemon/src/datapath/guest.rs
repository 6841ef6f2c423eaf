//! A VM pod's cross-connect: the guest programs on the pod interface and the tap, inside the pod's
//! namespace, with the guest's constants baked in at load time.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    EbpfLoader,
    programs::{SchedClassifier, TcAttachType},
};
use tapestry_common::{DhcpLimit, guest_globals, mac_u64, program_names};

use super::{iface, kernel_btf, link};

/// The compiled guest programs (built by build.rs from `ebpf/`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapestry-guest"));

/// What the programs are specialised with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWiring {
    pub slot: u32,
    pub netns: PathBuf,
    pub pod_ifname: String,
    pub tap: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// The guest's MTU: a frame from it longer than this (and its Ethernet header) that is not
    /// a GSO super-frame is dropped as oversized. 0: no check.
    pub mtu: u32,
    pub dhcp_limit: DhcpLimit,
    /// Migration target mode: this node's gateway MAC, answered to the guest's ARP requests and
    /// written into the destination of its unicast frames (see ebpf/src/bin/guest.rs). None:
    /// off, the frames pass as the guest addressed them.
    pub gateway_mac: Option<[u8; 6]>,
}

/// What attaching found in the pod's namespace.
#[derive(Debug)]
pub struct Attached {
    pub pod_ifindex: u32,
    pub tap_ifindex: u32,
    /// The tap's own MAC: the source of the daemon's DHCP answers and readiness probes.
    pub tap_mac: [u8; 6],
    /// Send-only packet socket on the tap, for DHCP answers and the readiness probe's ARP
    /// requests (the guest's replies to those are counted by the tap's program).
    pub socket: OwnedFd,
}

fn link_pins(pin_dir: &Path, slot: u32) -> [PathBuf; 2] {
    let links = pin_dir.join("links");
    [
        links.join(format!("guest-{slot}-pod")),
        links.join(format!("guest-{slot}-tap")),
    ]
}

/// Loads the guest programs for `w` and attaches them in the pod's namespace; an existing pinned
/// link (a restarted daemon) is switched to the new programs atomically.
pub fn attach(pin_dir: &Path, w: &GuestWiring) -> Result<Attached> {
    if OBJECT.is_empty() {
        anyhow::bail!("this tapestryd carries no eBPF object (built with AYA_BUILD_SKIP=1)");
    }
    tapestry_netns::run_in(&w.netns, || -> Result<Attached> {
        let pod_ifindex = iface::ifindex_of(&w.pod_ifname)
            .with_context(|| format!("pod interface {} in {}", w.pod_ifname, w.netns.display()))?;
        let tap_ifindex = iface::ifindex_of(&w.tap)
            .with_context(|| format!("tap {} in {}", w.tap, w.netns.display()))?;
        let tap_mac = iface::mac_of(&w.tap)?;
        let ip = u32::from_ne_bytes(w.ip.octets());
        let mac = mac_u64(&w.mac);
        let (dhcp_interval, dhcp_tolerance) = w.dhcp_limit.program_constants();
        let gateway_mac = w.gateway_mac.as_ref().map_or(0, mac_u64);
        let tap_mac_u64 = mac_u64(&tap_mac);
        let mut ebpf = EbpfLoader::new()
            .btf(kernel_btf())
            .default_map_pin_directory(pin_dir)
            .override_global(guest_globals::SLOT, &w.slot, true)
            .override_global(guest_globals::TAP_IFINDEX, &tap_ifindex, true)
            .override_global(guest_globals::POD_IFINDEX, &pod_ifindex, true)
            .override_global(guest_globals::MAC, &mac, true)
            .override_global(guest_globals::IP, &ip, true)
            .override_global(guest_globals::MTU, &w.mtu, true)
            .override_global(guest_globals::TAP_MAC, &tap_mac_u64, true)
            .override_global(guest_globals::DHCP_INTERVAL_NS, &dhcp_interval, true)
            .override_global(guest_globals::DHCP_TOLERANCE_NS, &dhcp_tolerance, true)
            .override_global(guest_globals::GATEWAY_MAC, &gateway_mac, true)
            .load(OBJECT)
            .context("loading the guest programs")?;
        let [pod_pin, tap_pin] = link_pins(pin_dir, w.slot);
        for (prog_name, ifname, pin) in [
            (program_names::POD_TO_GUEST, &w.pod_ifname, &pod_pin),
            (program_names::GUEST_TO_POD, &w.tap, &tap_pin),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(prog_name)
                .context("guest program missing")?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected {prog_name}"))?;
            link::attach(prog, ifname, TcAttachType::Ingress, pin)?;
        }
        let socket = iface::packet_socket(tap_ifindex)?;
        Ok(Attached {
            pod_ifindex,
            tap_ifindex,
            tap_mac,
            socket,
        })
    })
    .with_context(|| format!("entering the pod's namespace {}", w.netns.display()))?
}

/// Detaches the guest programs of `slot` (idempotent: links of interfaces already gone were
/// released by the kernel; only their pins remain, and go).
pub fn detach(pin_dir: &Path, slot: u32) -> Result<()> {
    for pin in link_pins(pin_dir, slot) {
        link::remove(&pin).context("removing a guest link")?;
    }
    Ok(())
}

/// Guest link pins present under `pin_dir`, by slot.
pub fn pinned_slots(pin_dir: &Path) -> Vec<u32> {
    let mut slots: Vec<u32> = fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("guest-")?.split('-').next()?.parse().ok()
        })
        .collect();
    slots.sort_unstable();
    slots.dedup();
    slots
}
