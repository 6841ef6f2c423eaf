//! The node's own IPv4 addresses in `TAPESTRY_NODE_ADDRS`: where node ports answer (for pods
//! sending to the node's address, and for the node's own sockets). Read with getifaddrs(3) in
//! the daemon's network namespace, at start and then every few seconds, and written as a
//! difference, so an address added to the node (or removed) takes effect within one period.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};

/// The IPv4 addresses of every interface of the calling thread's network namespace, loopback
/// excepted (127.0.0.0/8 always counts as the node's in the datapath).
pub fn local_ipv4() -> Result<BTreeSet<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list and stores its head in `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut out = BTreeSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() {
                out.insert(ip);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Makes the map hold exactly `want`; returns whether it changed.
pub fn write(map: &mut HashMap<MapData, u32, u8>, want: &BTreeSet<Ipv4Addr>) -> Result<bool> {
    let key = |ip: &Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let have: BTreeSet<u32> = map.keys().filter_map(|k| k.ok()).collect();
    let want_keys: BTreeSet<u32> = want.iter().map(key).collect();
    let mut changed = false;
    for k in want_keys.difference(&have) {
        map.insert(k, 1, 0).context("adding a node address")?;
        changed = true;
    }
    for k in have.difference(&want_keys) {
        map.remove(k).context("removing a node address")?;
        changed = true;
    }
    Ok(changed)
}

/// One round: the namespace's addresses into the map.
pub fn sync(map: &mut HashMap<MapData, u32, u8>) -> Result<BTreeSet<Ipv4Addr>> {
    let addrs = local_ipv4()?;
    if write(map, &addrs)? {
        tracing::info!(?addrs, "node addresses (node ports answer on them)");
    }
    Ok(addrs)
}
