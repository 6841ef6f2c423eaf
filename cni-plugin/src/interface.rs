//! The pod's interface and its host side, read and changed over netlink.
//!
//! The host side of the pod's veth is where the daemon attaches the Service datapath. It is
//! found from the pod side: a veth's IFLA_LINK is its peer's ifindex, which is looked up in the
//! host namespace and accepted when that link is a veth whose own peer is the pod interface.
//! That works whatever the primary lists in its result (Calico lists no host interface); the
//! result's host interfaces are the fallback.

use std::net::IpAddr;
use tapestry_api::types::MacAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteMessage, RouteProtocol},
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::{
    error::{CniError, Result},
    version::CniResult,
};

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;
const ESRCH: i32 = libc::ESRCH;
/// rtnetlink.h RT_TABLE_LOCAL: the kernel's table of local and broadcast addresses.
const RT_TABLE_LOCAL: u8 = 255;

/// What the plugin needs to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    /// IFLA_INFO_KIND ("veth", "tun", "bridge"...); none for a physical device.
    pub kind: Option<String>,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub up: bool,
    pub message: LinkMessage,
}

impl LinkFacts {
    fn from_message(message: LinkMessage) -> Self {
        let mut facts = LinkFacts {
            index: message.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            kind: None,
            peer_index: None,
            up: message.header.flags.contains(LinkFlags::Up),
            message: LinkMessage::default(),
        };
        for attr in &message.attributes {
            match attr {
                LinkAttribute::IfName(n) => facts.name = n.clone(),
                LinkAttribute::Address(a) => facts.mac = MacAddr::try_from(a.as_slice()).ok(),
                LinkAttribute::Mtu(m) => facts.mtu = *m,
                LinkAttribute::Link(l) => facts.peer_index = Some(*l),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            facts.kind = Some(kind_name(kind));
                        }
                    }
                }
                _ => {}
            }
        }
        facts.message = message;
        facts
    }

    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

fn kind_name(kind: &InfoKind) -> String {
    kind.to_string()
}

/// The netlink error's errno, if the error is one.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

fn netlink_error(doing: String, err: rtnetlink::Error) -> CniError {
    CniError::network(format!("{doing}: {err}"))
}

pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkFacts>> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await;
    match found {
        Ok(msg) => Ok(msg.map(LinkFacts::from_message)),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(netlink_error(format!("reading link {name}"), e)),
    }
}

pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<LinkFacts>> {
    let found = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await;
    match found {
        Ok(msg) => Ok(msg.map(LinkFacts::from_message)),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(netlink_error(format!("reading link #{index}"), e)),
    }
}

pub async fn set_mtu_and_up(handle: &Handle, link: &LinkFacts, mtu: u32) -> Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(link.index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(|e| netlink_error(format!("setting MTU {mtu} and up on {}", link.name), e))
}

/// Deletes a link; one already gone is fine.
pub async fn delete_link(handle: &Handle, link: &LinkFacts) -> Result<()> {
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
        Err(e) => Err(netlink_error(format!("deleting {}", link.name), e)),
    }
}

/// Finds the host-side name of the pod's veth. Runs in the host namespace; `pod` was read in
/// the pod's.
pub async fn host_veth(handle: &Handle, pod: &LinkFacts, prev: &CniResult) -> Result<String> {
    if pod.kind.as_deref().is_some_and(|k| k != "veth") {
        return Err(CniError::network(format!(
            "the pod interface {} is a {} device; tapestry-cni needs a primary plugin that gives \
             pods a veth (bridge, ptp, Calico, Cilium, Flannel...): the Service datapath \
             attaches to the veth's host side",
            pod.name,
            pod.kind.as_deref().unwrap_or("?")
        )));
    }
    if let Some(peer) = pod.peer_index
        && let Some(host) = link_by_index(handle, peer).await?
        && host.is_veth()
        && host.peer_index == Some(pod.index)
    {
        return Ok(host.name);
    }
    // The index points elsewhere (the veth's host end lives in a namespace other than ours):
    // trust the primary's result, the host interfaces last first (bridge lists the bridge,
    // then the veth).
    for intf in prev.interfaces.iter().rev().filter(|i| !i.in_sandbox()) {
        if let Some(host) = link_by_name(handle, &intf.name).await?
            && host.is_veth()
        {
            return Ok(host.name);
        }
    }
    Err(CniError::network(format!(
        "cannot find the host side of the pod's veth {}: its peer #{} is not a veth peered with \
         it in this network namespace, and prevResult names no host veth; tapestry-cni must run \
         in the host namespace where the primary plugin put the veth's other end",
        pod.name,
        pod.peer_index
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into())
    )))
}

/// The IPv4 addresses the pod interface gave up to the guest, and the routes that went with
/// them, so a failed ADD can put them back.
#[derive(Debug, Clone, Default)]
pub struct AddressSnapshot {
    pub index: u32,
    pub addresses: Vec<AddressMessage>,
    pub routes: Vec<RouteMessage>,
}

/// Removes every IPv4 address from `link`. The kernel drops the routes through the link with
/// the last address, so those are recorded too.
pub async fn take_ipv4_addresses(handle: &Handle, link: &LinkFacts) -> Result<AddressSnapshot> {
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_filter(|a| {
            futures_util::future::ready(
                a.header.family == AddressFamily::Inet && a.header.index == link.index,
            )
        })
        .try_collect()
        .await
        .map_err(|e| netlink_error(format!("listing the addresses of {}", link.name), e))?;
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_filter(|r| futures_util::future::ready(restorable_route(r, link.index)))
        .try_collect()
        .await
        .map_err(|e| netlink_error(format!("listing the routes via {}", link.name), e))?;
    let snapshot = AddressSnapshot {
        index: link.index,
        addresses,
        routes,
    };
    for addr in &snapshot.addresses {
        match handle.address().del(addr.clone()).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => {}
            Err(e) => {
                let err = netlink_error(
                    format!("removing {} from {}", show_address(addr), link.name),
                    e,
                );
                restore_addresses(handle, &snapshot).await.ok();
                return Err(err);
            }
        }
    }
    Ok(snapshot)
}

/// Routes out of `index` that the kernel will not bring back by itself when the address
/// returns (it re-creates the connected and local ones).
fn restorable_route(route: &RouteMessage, index: u32) -> bool {
    use rtnetlink::packet_route::route::RouteAttribute;
    let via_link = route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
    via_link
        && route.header.protocol != RouteProtocol::Kernel
        && route.header.table != RT_TABLE_LOCAL
}

/// An IPv4 route of the pod interface: destination, prefix length and gateway (`None`: on-link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRoute {
    pub dst: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gw: Option<std::net::Ipv4Addr>,
}

impl AddressSnapshot {
    /// The IPv4 routes the primary set up through the pod interface (beyond the kernel's own).
    pub fn ipv4_routes(&self) -> Vec<PodRoute> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        self.routes
            .iter()
            .filter(|r| r.header.address_family == AddressFamily::Inet)
            .map(|r| {
                let mut dst = std::net::Ipv4Addr::UNSPECIFIED;
                let mut gw = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                        _ => {}
                    }
                }
                PodRoute {
                    dst,
                    prefix: r.header.destination_prefix_length,
                    gw,
                }
            })
            .collect()
    }
}

/// Puts back what `take_ipv4_addresses` removed; what is already there is fine.
pub async fn restore_addresses(handle: &Handle, snapshot: &AddressSnapshot) -> Result<()> {
    let mut failures = Vec::new();
    for addr in &snapshot.addresses {
        let Some(ip) = address_of(addr) else { continue };
        let mut req = handle
            .address()
            .add(snapshot.index, ip, addr.header.prefix_len);
        // The recorded message keeps broadcast, label, flags and lifetimes.
        *req.message_mut() = addr.clone();
        match req.execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => failures.push(format!("{}: {e}", show_address(addr))),
        }
    }
    for route in &snapshot.routes {
        match handle.route().add(route.clone()).execute().await {
            Ok(()) => {}
            Err(e) if matches!(errno(&e), Some(EEXIST) | Some(ESRCH)) => {}
            Err(e) => failures.push(format!("route {:?}: {e}", route.attributes)),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::network(format!(
            "could not restore the pod interface's addresses: {}",
            failures.join("; ")
        )))
    }
}

fn address_of(addr: &AddressMessage) -> Option<IpAddr> {
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a point-to-point
    // link and the same otherwise.
    let local = addr.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

fn show_address(addr: &AddressMessage) -> String {
    match address_of(addr) {
        Some(ip) => format!("{ip}/{}", addr.header.prefix_len),
        None => "an address".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_lowercase_colon_separated() {
        assert_eq!(
            MacAddr::from([0x8a, 0x7a, 0x4c, 0x0e, 0x21, 0x95]).to_string(),
            "8a:7a:4c:0e:21:95"
        );
    }

    #[test]
    fn kind_names_are_the_kernels() {
        assert_eq!(kind_name(&InfoKind::Veth), "veth");
        assert_eq!(kind_name(&InfoKind::Tun), "tun");
    }
}
