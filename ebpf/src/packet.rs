//! Header layouts and bounds-checked access to packet data.

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_HLEN: usize = 20;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
pub const TCP_FLAGS_OFF: usize = 13;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// Reads a `T` at `offset` from the start of the packet, if the linear data holds it.
///
/// Reads are unaligned: the IPv4 header follows a 14-byte Ethernet header.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: the `size_of::<T>()` bytes at `offset` lie between data and data_end, checked just
    // above (the verifier checks it too); the read is unaligned, and callers read only plain
    // integer types, for which every bit pattern is valid.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// The parsed IPv4 + L4 tuple of a packet, in network byte order.
#[derive(Clone, Copy)]
pub struct Ipv4Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the L4 header (ETH_HLEN + IHL * 4).
    pub l4_off: usize,
    /// The packet carries a complete L4 header we may rewrite (false for non-first fragments).
    pub has_l4: bool,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    pub ip_id: u16,
    /// First fragment of a fragmented datagram (MF set, offset 0).
    pub first_fragment: bool,
    /// Non-first fragment: no L4 header; ports come from the fragments map.
    pub later_fragment: bool,
    pub ihl_is_min: bool,
    pub len: u32,
}

/// What the parser found.
pub enum Parsed {
    /// Not IPv4 TCP/UDP, or too short to tell: never ours, passed untouched.
    NotOurs,
    /// IPv4 TCP/UDP whose L4 header is cut short; `ports` when at least they were readable.
    Truncated {
        saddr: u32,
        daddr: u32,
        proto: u8,
        ports: Option<(u16, u16)>,
    },
    Packet(Ipv4Packet),
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let Some(eth) = read::<EthHdr>(ctx, 0) else {
        return Parsed::NotOurs;
    };
    if eth.proto != ETH_P_IP.to_be() {
        return Parsed::NotOurs;
    }
    let Some(ip) = read::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::NotOurs;
    };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Parsed::NotOurs;
    }
    let proto = ip.proto;
    if proto != tapestry_common::IPPROTO_TCP && proto != tapestry_common::IPPROTO_UDP {
        return Parsed::NotOurs;
    }
    let frag = u16::from_be(ip.frag_off);
    let offset = frag & IP_OFFSET_MASK;
    let l4_off = ETH_HLEN + ihl;
    let mut pkt = Ipv4Packet {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto,
        l4_off,
        has_l4: false,
        tcp_flags: 0,
        ip_id: ip.id,
        first_fragment: offset == 0 && frag & IP_MF != 0,
        later_fragment: offset != 0,
        ihl_is_min: ihl == IPV4_MIN_HLEN,
        len: ctx.len(),
    };
    if pkt.later_fragment {
        return Parsed::Packet(pkt);
    }
    let Some(ports) = read::<[u16; 2]>(ctx, l4_off) else {
        return Parsed::Truncated {
            saddr: ip.saddr,
            daddr: ip.daddr,
            proto,
            ports: None,
        };
    };
    pkt.sport = ports[0];
    pkt.dport = ports[1];
    let truncated = Parsed::Truncated {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto,
        ports: Some((ports[0], ports[1])),
    };
    // The whole L4 header is checked and read in one go: a separate, narrower read would let
    // LLVM drop its bounds check as implied by this one, and the verifier cannot follow that.
    if proto == tapestry_common::IPPROTO_TCP {
        let Some(tcp) = read::<[u8; TCP_MIN_HLEN]>(ctx, l4_off) else {
            return truncated;
        };
        pkt.tcp_flags = tcp[TCP_FLAGS_OFF];
    } else if read::<[u8; UDP_HLEN]>(ctx, l4_off).is_none() {
        return truncated;
    }
    pkt.has_l4 = true;
    Parsed::Packet(pkt)
}

/// How many bytes from the start of the packet [`parse`] reads: Ethernet, this packet's IPv4
/// header (options included) and its TCP or UDP header (none for a later fragment); 0 for what
/// `parse` passes as not ours whatever follows (not IPv4, not TCP/UDP). `None` when the linear
/// data is too short to tell.
#[inline(always)]
pub fn headers_needed(ctx: &TcContext) -> Option<u32> {
    let eth = read::<EthHdr>(ctx, 0)?;
    if eth.proto != ETH_P_IP.to_be() {
        return Some(0);
    }
    let ip = read::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    let ihl = ((ip.version_ihl & 0x0f) as u32) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN as u32 {
        return Some(0);
    }
    let l4 = match ip.proto {
        tapestry_common::IPPROTO_TCP => TCP_MIN_HLEN as u32,
        tapestry_common::IPPROTO_UDP => UDP_HLEN as u32,
        _ => return Some(0),
    };
    if u16::from_be(ip.frag_off) & IP_OFFSET_MASK != 0 {
        return Some(ETH_HLEN as u32 + ihl);
    }
    Some(ETH_HLEN as u32 + ihl + l4)
}

/// The interface the packet arrived on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the kernel passes a valid, aligned `__sk_buff` that lives for the whole program run.
    unsafe { (*ctx.skb.skb).ifindex }
}
