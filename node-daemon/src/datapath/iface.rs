//! Interfaces by name and index, their MAC addresses, and the send-only packet socket that
//! answers a guest's DHCP and sends its readiness probes: plain syscalls in the calling thread's
//! network namespace.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result, bail};

/// The index of `ifname` in the calling thread's namespace.
pub fn ifindex_of(ifname: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname).context("interface name has a NUL byte")?;
    // SAFETY: a plain libc call on a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!(
            "no interface named {ifname:?}: {}",
            io::Error::last_os_error()
        );
    }
    Ok(idx)
}

/// The name of `ifindex` in the calling thread's namespace, if it exists.
pub fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The MAC address of `ifname` in the calling thread's namespace.
pub fn mac_of(ifname: &str) -> Result<[u8; 6]> {
    // SAFETY: a plain socket for the ioctl; closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket for SIOCGIFHWADDR");
    }
    // SAFETY: fd is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid start.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {ifname:?} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the ifreq we own. (`as _`: the request is a
    // c_ulong on glibc and a c_int on musl.)
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("MAC of {ifname}"));
    }
    // SAFETY: the union member written by SIOCGIFHWADDR.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The driver of `ifname` in the calling thread's namespace ("veth", "tun", ...), from
/// `ETHTOOL_GDRVINFO`.
pub fn driver_of(ifname: &str) -> Result<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h), which libc does not define.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // SAFETY: a plain socket for the ioctl; closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket for SIOCETHTOOL");
    }
    // SAFETY: fd is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: DrvInfo is plain data; zeroed is a valid start.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: ifreq is plain data; zeroed is a valid start.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.len() >= req.ifr_name.len() {
        bail!("interface name {ifname:?} is too long");
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO fills the DrvInfo that ifru_data points at,
    // which lives until the call returns. (`as _`: the request type differs by libc.)
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("driver of {ifname}"));
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// A send-only packet socket on `ifindex` (protocol 0: it receives nothing, so it costs the
/// interface's traffic nothing).
pub fn packet_socket(ifindex: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    bind_packet(&sock, ifindex, 0).context("binding the packet socket")?;
    Ok(sock)
}

/// A packet socket on `ifindex` that receives every frame the interface sends and receives
/// (`ETH_P_ALL`, ahead of tc), for captures; read it with [`recv_frame`].
pub fn capture_socket(ifindex: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    bind_packet(&sock, ifindex, (libc::ETH_P_ALL as u16).to_be())
        .context("binding the capture socket")?;
    Ok(sock)
}

/// Receives one frame into `buf`, waiting at most `timeout`: its length (truncated to `buf`), or
/// None when nothing came.
pub fn recv_frame(
    sock: &OwnedFd,
    buf: &mut [u8],
    timeout: std::time::Duration,
) -> Result<Option<usize>> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
    // SAFETY: one pollfd that we own.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e).context("polling the tap's packet socket");
    }
    if rc == 0 {
        return Ok(None);
    }
    // SAFETY: receiving into a buffer we own, without blocking.
    let n = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e).context("receiving on the tap's packet socket");
    }
    Ok(Some(n as usize))
}

/// Sends one whole Ethernet frame on a bound packet socket.
pub fn send_frame(sock: &OwnedFd, frame: &[u8]) -> Result<()> {
    // SAFETY: sending from a buffer we own.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("sending on the tap");
    }
    Ok(())
}

/// Binds a packet socket to interface `ifindex` for `protocol` (network order; 0: send only).
fn bind_packet(sock: &impl AsRawFd, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: binding our socket to a sockaddr_ll of the right size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
