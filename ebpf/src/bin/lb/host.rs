//! Frontends for the node's own sockets: host-network pods and the node's processes (kubelet
//! probes, `curl` on the node, the `kubernetes` Service from a host-network controller). Their
//! packets cross no endpoint interface, so the per-packet path never sees them; instead these
//! cgroup programs (attached once, at the root of the cgroup v2 hierarchy) choose the backend
//! when the socket names its peer, the way Cilium's socket load balancer does:
//! - `connect4` (TCP, connected UDP) and `sendmsg4` (UDP `sendto`) turn a frontend into the
//!   backend chosen with the same table, affinity and reject rules as the per-packet path; a
//!   frontend without backends refuses the connection (`ECONNREFUSED`, as kube-proxy's REJECT);
//! - `recvmsg4` and `getpeername4` show the frontend again in what the socket reads, from
//!   `HOST_REVERSE` (socket cookie, backend) -> frontend.
//!
//! Nothing runs per packet: a connection costs one translation. Only sockets of the node's own
//! network namespace (`HOST_NETNS_COOKIE`, set at load) are translated: a pod's sockets live in
//! the pod's namespace, and its packets are balanced on its interface as before.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use tapestry_common::{
    Counter, DropReason, HostReverse, HostReverseKey, Service, algorithm, event_kind,
};

use crate::{
    events::{Decision, account, count, count_drop, emit_flow},
    maps::HOST_REVERSE,
    service::{lb4_lookup_frontend, lb4_select_backend, mix},
};

// The cookie of the node's network namespace (`tapestry_common::HOST_NETNS_COOKIE_GLOBAL`, set
// at load; 0: translate nothing).
// SAFETY: no other symbol in the object is named HOST_NETNS_COOKIE.
#[unsafe(no_mangle)]
static HOST_NETNS_COOKIE: u64 = 0;

/// Let the call go on (with the address as the program left it).
const PROCEED: i32 = 1;
/// Fail the call with the error set by `bpf_set_retval`.
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn tapestry_host_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tapestry_host_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn tapestry_host_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    // recvmsg4 may only return 1.
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn tapestry_host_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    // getpeername4 may only return 1.
    PROCEED
}

/// A socket of the node's own network namespace.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let node = tapestry_ebpf::constant(&HOST_NETNS_COOKIE);
    // SAFETY: bpf_get_netns_cookie reads the program's own context, which the kernel passed.
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == node
}

/// Where a node socket's new flow lands in the selection table: its cookie's hash, so every
/// datagram of one unconnected UDP socket goes to the same backend while the table stands (the
/// per-packet path keeps that in conntrack; here the socket is the flow).
#[inline(always)]
fn socket_slot_hash(svc: &Service, cookie: u64) -> u32 {
    match svc.algorithm {
        algorithm::FIRST => 0,
        _ => mix(cookie as u32 ^ (cookie >> 32) as u32),
    }
}

#[inline(always)]
fn refuse(errno: i32) -> i32 {
    // SAFETY: bpf_set_retval takes a plain integer: the error the call returns.
    unsafe { bpf_set_retval(-errno) };
    REFUSE
}

#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    if !ours(ctx) {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed, valid for the run; connect4 and sendmsg4
    // may read these fields (user_port holds the port in network byte order in its low 16
    // bits).
    let (vip, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let Some(svc) = lb4_lookup_frontend(vip, port, proto) else {
        return PROCEED;
    };
    if svc.backend_count == 0 {
        // kube-proxy's REJECT: the connection is refused.
        count_drop(DropReason::NoBackend);
        emit_flow(
            0,
            (0, 0),
            (vip, port),
            proto,
            &Decision::drop(DropReason::NoBackend, svc.id),
        );
        return refuse(ECONNREFUSED);
    }
    // SAFETY: bpf_get_socket_cookie reads the program's own context, which the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: bpf_ktime_get_ns takes no arguments and cannot fail.
    let now = unsafe { bpf_ktime_get_ns() };
    // Every socket of the node is one client (kube-proxy sees them all from the node's address).
    let (backend_id, backend) =
        match lb4_select_backend(&svc, svc.id, 0, || socket_slot_hash(&svc, cookie), now) {
            Ok(chosen) => chosen,
            Err(reason) => {
                count_drop(reason);
                emit_flow(
                    0,
                    (0, 0),
                    (vip, port),
                    proto,
                    &Decision::drop(reason, svc.id),
                );
                return refuse(EHOSTUNREACH);
            }
        };
    let rkey = HostReverseKey {
        cookie,
        addr: backend.ip,
        port: backend.port,
        _pad: 0,
    };
    let frontend = HostReverse {
        addr: vip,
        port,
        _pad: 0,
    };
    // A datagram socket sends to the same frontend again and again: its entry is written once.
    // SAFETY: copied out at once from an RCU-protected value.
    let known = matches!(unsafe { HOST_REVERSE.get(rkey) }, Some(f) if *f == frontend);
    if !known {
        // Best effort: without it replies show the backend, the connection still works.
        let _ = HOST_REVERSE.insert(rkey, frontend, 0);
        emit_flow(
            0,
            (0, 0),
            (vip, port),
            proto,
            &Decision {
                kind: event_kind::NEW_FLOW,
                reason: 0,
                service_id: svc.id,
                backend_id,
                nat_addr: backend.ip,
                nat_port: backend.port,
            },
        );
    }
    account(svc.id, backend_id, 0, !known);
    count(Counter::HostTranslated);
    // SAFETY: as above; connect4 and sendmsg4 may write the address they were given.
    unsafe {
        (*sa).user_ip4 = backend.ip;
        (*sa).user_port = backend.port as u32;
    }
    PROCEED
}

/// What a node socket reads from a backend shows the frontend it asked for.
#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    if !ours(ctx) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed; recvmsg4 and getpeername4 may read these.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    // SAFETY: bpf_get_socket_cookie reads the program's own context, which the kernel passed.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = HostReverseKey {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: copied out at once from an RCU-protected value.
    if let Some(f) = unsafe { HOST_REVERSE.get(key) }.copied() {
        // SAFETY: as above; recvmsg4 and getpeername4 may write the address they return.
        unsafe {
            (*sa).user_ip4 = f.addr;
            (*sa).user_port = f.port as u32;
        }
    }
}
