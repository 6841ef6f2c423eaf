//! A guest stand-in: the tap's file descriptor, opened as QEMU opens it. Frames written to it are
//! what a guest sends; frames read from it are what reaches the guest. Deterministic and fast, for
//! datapath tests; `guest` runs a real QEMU guest for end-to-end ones.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use dhcproto::{
    Decodable, Decoder, Encodable, Encoder,
    v4::{DhcpOption, Message, MessageType},
};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens the existing tap `name` in the namespace at `netns` as a VM process holds it (QEMU
/// without vhost): `/dev/net/tun` with `TUNSETIFF`, `IFF_TAP | IFF_NO_PI`, so one read or write
/// is one Ethernet frame, without packet-information or virtio-net header. The tap must have
/// been created single-queue without vnet header, as `ip tuntap add mode tap` does. The file is
/// blocking.
pub fn open_tap(netns: &Path, name: &str) -> Result<File> {
    tapestry_netns::run_in(netns, || -> Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun")?;
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.len() >= req.ifr_name.len() {
            bail!("tap name {name:?} is too long");
        }
        for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } != 0 {
            return Err(io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
        }
        Ok(file)
    })?
}

pub struct TapGuest {
    file: File,
    /// When set, ARP requests for this address are answered with this MAC while receiving, as
    /// the guest's kernel would.
    identity: Option<([u8; 6], [u8; 4])>,
}

impl TapGuest {
    /// Attaches to the existing tap `name` in the namespace at `netns` (the tap must have been
    /// created without multiqueue or vnet header, as `ip tuntap add mode tap` does).
    pub fn open(netns: &Path, name: &str) -> Result<TapGuest> {
        let file = open_tap(netns, name)?;
        // SAFETY: setting O_NONBLOCK on our fd.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Ok(TapGuest {
            file,
            identity: None,
        })
    }

    /// Answer ARP for `ip` with `mac` from now on.
    pub fn answer_arp(&mut self, mac: [u8; 6], ip: std::net::Ipv4Addr) {
        self.identity = Some((mac, ip.octets()));
    }

    fn arp_reply(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let (mac, ip) = self.identity?;
        // Ethernet + ARP request (op 1) whose target protocol address is ours.
        if frame.len() < 42 || frame[12..14] != [0x08, 0x06] || frame[20..22] != [0, 1] {
            return None;
        }
        if frame[38..42] != ip {
            return None;
        }
        let (sha, spa) = (&frame[22..28], &frame[28..32]);
        let mut r = Vec::with_capacity(42);
        r.extend_from_slice(sha);
        r.extend_from_slice(&mac);
        r.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        r.extend_from_slice(&mac);
        r.extend_from_slice(&ip);
        r.extend_from_slice(sha);
        r.extend_from_slice(spa);
        Some(r)
    }

    /// The guest sends one frame.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write_all(frame)
    }

    /// The next frame that reaches the guest and satisfies `pred`, within `timeout`.
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match self.file.read(&mut buf) {
                Ok(n) if pred(&buf[..n]) => return Some(buf[..n].to_vec()),
                Ok(n) => {
                    if let Some(reply) = self.arp_reply(&buf[..n]) {
                        let _ = self.file.write_all(&reply);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(_) => return None,
            }
        }
        None
    }
}

/// Makes `pod` a VM pod as the CNI plugin would, without the plugin: the pod interface gives up
/// its address, `tap0` is created (single queue, no vnet header, so [`TapGuest`] can open it),
/// and the endpoint is registered with the daemon at `client`. Returns the request sent.
pub fn register_vm_pod(
    client: &tapestry_api::client::blocking::Client,
    pod: &crate::Pod,
) -> Result<tapestry_api::types::EndpointRequest> {
    use tapestry_api::types::{DnsConfig, EndpointRequest, MacAddr, PodRef, VmAttachment};
    pod.ip(&["addr", "flush", "dev", "eth0"])?;
    pod.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
    pod.ip(&["link", "set", "tap0", "up"])?;
    let mac = MacAddr::from(pod.mac);
    let req = EndpointRequest {
        container_id: format!("ctr-{}", pod.name),
        ifname: "eth0".into(),
        netns: pod.netns_path.display().to_string(),
        host_ifname: pod.host_ifname.clone(),
        ips: vec![format!("{}/32", pod.ip)],
        gateway: Some(crate::POD_GATEWAY),
        mac: Some(mac),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: pod.name.clone(),
            uid: None,
        }),
        vm: Some(VmAttachment {
            tap: "tap0".into(),
            guest_mac: mac,
            guest_ip: format!("{}/32", pod.ip),
            mtu: 1500,
            routes: vec![],
            dns: DnsConfig {
                nameservers: vec!["10.96.0.10".into()],
                search: vec!["default.svc.cluster.local".into()],
                domain: None,
            },
            hostname: Some(pod.name.clone()),
            queues: 1,
            migration: None,
        }),
        network: None,
    };
    client.add_endpoint(&req)?;
    Ok(req)
}

/// A DHCP message of `kind` from the client `mac`, broadcast from 0.0.0.0:68 as a guest sends it.
pub fn dhcp_frame(mac: [u8; 6], kind: MessageType, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let mut m = Message::new_with_id(
        0xabcd,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    if let Some(ip) = requested {
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
    }
    let mut bytes = Vec::new();
    m.encode(&mut Encoder::new(&mut bytes)).unwrap();
    let mut f = Vec::new();
    PacketBuilder::ethernet2(mac, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67)
        .write(&mut f, &bytes)
        .unwrap();
    f
}

/// The DHCP message in `frame`, if it is one from a server (source port 67).
pub fn dhcp_reply(frame: &[u8]) -> Option<Message> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    match p.transport {
        Some(TransportSlice::Udp(u)) if u.source_port() == 67 => {
            Message::decode(&mut Decoder::new(u.payload())).ok()
        }
        _ => None,
    }
}

/// A UDP frame as the guest sends it: its own MAC to the gateway's (the host veth's).
pub fn guest_udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, dport)
        .write(&mut f, b"hello\n")
        .unwrap();
    f
}
