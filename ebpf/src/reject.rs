//! Rejecting a connection to a service with no backend, as kube-proxy does: the packet is turned
//! into an ICMP port unreachable from the frontend address and sent back to the client, which
//! fails at once (ECONNREFUSED for TCP and connected UDP) instead of timing out.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use tapestry_common::DropReason;

use crate::{
    nat::swap_macs,
    packet::{ETH_HLEN, IPV4_MIN_HLEN, Ipv4Packet, ifindex},
};

const ICMP_HLEN: usize = 8;
/// What the ICMP error quotes: the original IP header and the start of its payload, at least 8
/// bytes (RFC 792). For TCP the whole 20-byte header is kept: a CHECKSUM_PARTIAL skb (every SYN
/// from a local socket on a veth) cannot be cut inside the bytes its pending checksum covers
/// (bpf_skb_change_tail refuses with EINVAL).
const UDP_QUOTE_LEN: usize = IPV4_MIN_HLEN + 8;
const TCP_QUOTE_LEN: usize = IPV4_MIN_HLEN + 20;
const ROOM: usize = IPV4_MIN_HLEN + ICMP_HLEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const IPPROTO_ICMP: u8 = 1;

/// Folds a 32-bit one's complement sum into the 16-bit checksum, as stored.
#[inline(always)]
fn fold(sum: i64) -> u16 {
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn csum(words: &mut [u32]) -> u16 {
    // SAFETY: bpf_csum_diff reads `words.len() * 4` bytes from `words`, a buffer of exactly that
    // size that we own, and nothing from the null `from` side (its size is 0).
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            words.as_mut_ptr(),
            (words.len() * 4) as u32,
            0,
        )
    };
    fold(sum)
}

/// Turns `pkt` (for frontend `pkt.daddr`) into an ICMP port unreachable to its sender and returns
/// the redirect verdict. Only for unfragmented packets without IP options, so the quoted header
/// has a fixed size the verifier can bound; others are dropped by the caller.
#[inline(always)]
pub fn lb4_reject(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<i32, DropReason> {
    if !pkt.ihl_is_min || !pkt.has_l4 || pkt.first_fragment {
        return Err(DropReason::RejectFailed);
    }
    let quote_len = if pkt.proto == tapestry_common::IPPROTO_TCP {
        TCP_QUOTE_LEN
    } else {
        UDP_QUOTE_LEN
    };
    // SAFETY: bpf_skb_change_tail on the program's own skb; the new length keeps the L2 header,
    // the IP header and the quoted L4 bytes, all present (has_l4 checked a full UDP or TCP
    // header).
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + quote_len) as u32, 0) } != 0 {
        return Err(DropReason::RejectFailed);
    }
    ctx.adjust_room(ROOM as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::RejectFailed)?;

    // ICMP header + quote, as words for bpf_csum_diff.
    let mut icmp = [0u32; (ICMP_HLEN + TCP_QUOTE_LEN) / 4];
    {
        // SAFETY: a u32 array viewed as the same number of bytes: same size, u8 needs no
        // alignment, every bit pattern is valid, and `icmp` is not used while `bytes` lives.
        let bytes: &mut [u8; ICMP_HLEN + TCP_QUOTE_LEN] =
            unsafe { &mut *(icmp.as_mut_ptr() as *mut [u8; ICMP_HLEN + TCP_QUOTE_LEN]) };
        // The raw helper with a constant length: the wrapper's computed length may be zero as
        // far as the verifier can tell, which it refuses.
        // SAFETY: the helper writes `quote_len` bytes (one of two constants, at most
        // TCP_QUOTE_LEN) after the ICMP header, within `bytes`, which we own.
        let ret = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                (ETH_HLEN + ROOM) as u32,
                bytes.as_mut_ptr().add(ICMP_HLEN) as *mut _,
                quote_len as u32,
            )
        };
        if ret != 0 {
            return Err(DropReason::RejectFailed);
        }
        bytes[0] = ICMP_DEST_UNREACH;
        bytes[1] = ICMP_PORT_UNREACH;
    }
    let icmp_csum = csum(&mut icmp[..(ICMP_HLEN + quote_len) / 4]);

    let tot_len = ((ROOM + quote_len) as u16).to_be();
    let mut ip = [0u32; IPV4_MIN_HLEN / 4];
    {
        // SAFETY: as for `bytes` above: a u32 array viewed as the same number of bytes.
        let b: &mut [u8; IPV4_MIN_HLEN] =
            unsafe { &mut *(ip.as_mut_ptr() as *mut [u8; IPV4_MIN_HLEN]) };
        b[0] = 0x45;
        b[2..4].copy_from_slice(&tot_len.to_ne_bytes());
        b[8] = 64;
        b[9] = IPPROTO_ICMP;
        b[12..16].copy_from_slice(&pkt.daddr.to_ne_bytes());
        b[16..20].copy_from_slice(&pkt.saddr.to_ne_bytes());
    }
    let ip_csum = csum(&mut ip);

    let mut header = [0u8; ROOM];
    // SAFETY: as for `bytes` above, read-only: a u32 array viewed as the same number of bytes.
    let ip_bytes: &[u8; IPV4_MIN_HLEN] = unsafe { &*(ip.as_ptr() as *const [u8; IPV4_MIN_HLEN]) };
    header[..IPV4_MIN_HLEN].copy_from_slice(ip_bytes);
    header[10..12].copy_from_slice(&ip_csum.to_ne_bytes());
    header[IPV4_MIN_HLEN] = ICMP_DEST_UNREACH;
    header[IPV4_MIN_HLEN + 1] = ICMP_PORT_UNREACH;
    header[IPV4_MIN_HLEN + 2..IPV4_MIN_HLEN + 4].copy_from_slice(&icmp_csum.to_ne_bytes());
    ctx.store(ETH_HLEN, &header, 0)
        .map_err(|_| DropReason::RejectFailed)?;
    swap_macs(ctx)?;
    // SAFETY: bpf_redirect takes plain integers and only records the target. Egress of the
    // interface the packet came in on: the host-side veth, whose peer is the client.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}
