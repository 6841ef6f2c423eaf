//! Sending a rewritten packet on ourselves: `bpf_fib_lookup` finds the next hop (and the source
//! address the node would use towards it), then a redirect. A packet from outside whose source
//! was rewritten to one of the node's own addresses (node port SNAT) cannot go up the stack, which
//! would drop it as a martian, so the program routes it, as Cilium's node port path does.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use tapestry_common::DropReason;

use crate::{nat::store_macs, packet::ifindex};

const AF_INET: u8 = 2;

/// Where the kernel's routing table sends a packet.
pub struct Route {
    pub ifindex: u32,
    /// The source address the node would use on that route (network byte order).
    pub src: u32,
    /// The next hop (the destination itself when it is on link).
    nexthop: u32,
    /// Source and destination MAC, when the neighbour is known.
    macs: Option<([u8; 6], [u8; 6])>,
}

/// The route to `dst` for a packet of `proto` that came in on this packet's interface, with the
/// source address the node would use on it.
#[inline(always)]
pub fn route(ctx: &TcContext, proto: u8, dst: u32) -> Result<Route, DropReason> {
    lookup(ctx, proto, dst, BPF_FIB_LOOKUP_SRC)
}

/// The route to `dst` without a source address (the packet keeps its own): what the fast path
/// needs. No route (or a packet over the route's MTU, or forwarding off) is `None`: such a
/// packet is left to the stack, which answers it as it would without the fast path.
#[inline(always)]
pub fn next_hop(ctx: &TcContext, proto: u8, dst: u32) -> Option<Route> {
    lookup(ctx, proto, dst, 0).ok()
}

impl Route {
    /// Whether the next hop's MAC is known (the neighbour is resolved).
    #[inline(always)]
    pub fn has_neighbour(&self) -> bool {
        self.macs.is_some()
    }

    /// Sends the packet into the namespace of the peer of this route's interface (a veth whose
    /// other end is an endpoint's), as if that end had received it: `bpf_redirect_peer`, which
    /// only a tc ingress program may call. `None` while the neighbour (the endpoint's MAC) is
    /// unknown.
    #[inline(always)]
    pub fn redirect_peer(&self, ctx: &TcContext) -> Option<i32> {
        let (smac, dmac) = self.macs?;
        store_macs(ctx, &smac, &dmac).ok()?;
        // SAFETY: bpf_redirect_peer takes plain integers and only records the target.
        Some(unsafe { bpf_redirect_peer(self.ifindex, 0) } as i32)
    }
}

#[inline(always)]
fn lookup(ctx: &TcContext, proto: u8, dst: u32, flags: u32) -> Result<Route, DropReason> {
    // SAFETY: bpf_fib_lookup is plain data; all zeroes is a valid start.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.ifindex = ifindex(ctx);
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: `p` is a whole bpf_fib_lookup we own, its size is passed, and the context is the
    // program's own.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    // SAFETY: the helper wrote the output members of the unions it was given.
    let (src, nexthop) = unsafe { (p.__bindgen_anon_3.ipv4_src, p.__bindgen_anon_4.ipv4_dst) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Route {
            ifindex: p.ifindex,
            src,
            nexthop,
            macs: Some((p.smac, p.dmac)),
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(Route {
            ifindex: p.ifindex,
            src,
            nexthop,
            macs: None,
        }),
        _ => Err(DropReason::NoRoute),
    }
}

/// Sends the packet out along `route`: with the neighbour's MAC when known, else through the
/// kernel's neighbour resolution (`bpf_redirect_neigh`).
#[inline(always)]
pub fn redirect(ctx: &TcContext, route: &Route) -> Result<i32, DropReason> {
    match route.macs {
        Some((smac, dmac)) => {
            store_macs(ctx, &smac, &dmac)?;
            // SAFETY: bpf_redirect takes plain integers and only records the target.
            Ok(unsafe { bpf_redirect(route.ifindex, 0) } as i32)
        }
        None => {
            // SAFETY: bpf_redir_neigh is plain data; all zeroes is a valid start.
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = AF_INET as u32;
            nh.__bindgen_anon_1.ipv4_nh = route.nexthop;
            // SAFETY: `nh` is a whole bpf_redir_neigh we own and its size is passed.
            Ok(unsafe {
                bpf_redirect_neigh(
                    route.ifindex,
                    &mut nh,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            } as i32)
        }
    }
}
