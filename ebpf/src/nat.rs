//! Address and port rewrites with incremental checksum fix-up.
//!
//! The L4 checksum covers the pseudo header, so an address change is folded into it with
//! `BPF_F_PSEUDO_HDR`; this is correct for CHECKSUM_PARTIAL packets from veths too. A UDP
//! checksum of zero means "none" and stays zero (`BPF_F_MARK_MANGLED_0`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use tapestry_common::{DropReason, IPPROTO_UDP};

use crate::packet::{
    EthHdr, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, Ipv4Packet, TCP_CSUM_OFF, UDP_CSUM_OFF, read,
};

/// Which side of the tuple a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

#[inline(always)]
fn l4_csum_off(pkt: &Ipv4Packet) -> usize {
    if pkt.proto == IPPROTO_UDP {
        pkt.l4_off + UDP_CSUM_OFF
    } else {
        pkt.l4_off + TCP_CSUM_OFF
    }
}

#[inline(always)]
fn l4_flags(pkt: &Ipv4Packet) -> u64 {
    if pkt.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Rewrites the source or destination address; fixes the IP checksum and, when the packet carries
/// the L4 header, the L4 checksum.
#[inline(always)]
pub fn rewrite_addr(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    side: Side,
    old: u32,
    new: u32,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    if pkt.has_l4 {
        ctx.l4_csum_replace(
            l4_csum_off(pkt),
            old as u64,
            new as u64,
            BPF_F_PSEUDO_HDR as u64 | 4 | l4_flags(pkt),
        )
        .map_err(|_| DropReason::RewriteFailed)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| DropReason::RewriteFailed)?;
    let off = match side {
        Side::Source => IP_SADDR_OFF,
        Side::Destination => IP_DADDR_OFF,
    };
    ctx.store(off, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// Rewrites the source or destination port (only for packets that carry the L4 header).
#[inline(always)]
pub fn rewrite_port(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    side: Side,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    if old == new || !pkt.has_l4 {
        return Ok(());
    }
    ctx.l4_csum_replace(l4_csum_off(pkt), old as u64, new as u64, 2 | l4_flags(pkt))
        .map_err(|_| DropReason::RewriteFailed)?;
    let off = match side {
        Side::Source => pkt.l4_off,
        Side::Destination => pkt.l4_off + 2,
    };
    ctx.store(off, &new, 0)
        .map_err(|_| DropReason::RewriteFailed)
}

/// Swaps the Ethernet addresses, to send a frame back out of the interface it came in on.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), DropReason> {
    let eth = read::<EthHdr>(ctx, 0).ok_or(DropReason::RewriteFailed)?;
    store_macs(ctx, &eth.dst, &eth.src)
}

/// Writes the Ethernet header's destination and source MAC.
#[inline(always)]
pub fn store_macs(ctx: &TcContext, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<(), DropReason> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(dmac);
    macs[6..].copy_from_slice(smac);
    ctx.store(0, &macs, 0)
        .map_err(|_| DropReason::RewriteFailed)
}
