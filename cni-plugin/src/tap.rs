//! The guest's tap in the pod's network namespace.
//!
//! Created the way KubeVirt's tap network binding (`domainAttachmentType: tap`) expects to find
//! it, as virt-launcher's own `create-tap` does: a persistent tap with IFF_NO_PI and
//! IFF_VNET_HDR (virtio-net), multi-queue when the guest has several queues, owned by the user
//! and group that run the VM so the unprivileged VM process can open it. The kernel cannot
//! create taps over rtnetlink, so this is the /dev/net/tun ioctl sequence; everything else
//! about the tap (MTU, up, delete, inspect) is netlink.

use std::{
    ffi::c_ulong,
    fs::OpenOptions,
    io,
    os::fd::{AsRawFd, RawFd},
};

use rtnetlink::Handle;
use rtnetlink::packet_core::Nla;
use rtnetlink::packet_route::link::{InfoData, LinkAttribute, LinkInfo};

use crate::{
    error::{CniError, Result},
    interface::{LinkFacts, link_by_name},
};

const TUN_DEVICE: &str = "/dev/net/tun";

/// The tap to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub queues: u32,
}

impl TapSpec {
    /// TUNSETIFF flags. IFF_TUN_EXCL makes the kernel refuse an existing device of that name
    /// instead of attaching to it, so ADD never adopts a tap it did not create.
    fn flags(&self) -> libc::c_int {
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL;
        if self.queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        flags
    }

    /// The flags the kernel reports for the tap once made (sysfs `tun_flags`): the type and
    /// feature flags plus IFF_PERSIST.
    #[cfg(test)]
    pub fn expected_tun_flags(&self) -> libc::c_int {
        (self.flags() & !libc::IFF_TUN_EXCL) | libc::IFF_PERSIST
    }
}

/// Creates the tap in the calling thread's network namespace (call it inside
/// `netns::run_in`). Until TUNSETPERSIST the device lives only as long as the file handle, so a
/// failure part way leaves nothing behind.
pub fn create(spec: &TapSpec) -> Result<()> {
    let fail = |what: &str, err: io::Error| {
        CniError::network(format!("creating tap {}: {what}: {err}", spec.name))
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|e| {
            fail(
                &format!("opening {TUN_DEVICE} (is the tun module loaded?)"),
                e,
            )
        })?;
    let fd = tun.as_raw_fd();

    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = spec.name.as_bytes();
    if name.len() >= ifr.ifr_name.len() {
        return Err(CniError::InvalidConfig(format!(
            "tap name {:?} is longer than 15 bytes",
            spec.name
        )));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = spec.flags() as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own, for the fd we own.
    if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            return Err(CniError::network(format!(
                "an interface named {} already exists in the pod's network namespace; remove it \
                 or set vm.tapName to another name",
                spec.name
            )));
        }
        return Err(fail("TUNSETIFF", err));
    }
    set(fd, libc::TUNSETOWNER, spec.uid.into()).map_err(|e| fail("TUNSETOWNER", e))?;
    set(fd, libc::TUNSETGROUP, spec.gid.into()).map_err(|e| fail("TUNSETGROUP", e))?;
    set(fd, libc::TUNSETPERSIST, 1).map_err(|e| fail("TUNSETPERSIST", e))?;
    Ok(())
}

/// The tun ioctls that take their argument by value.
fn set(fd: RawFd, request: libc::Ioctl, value: c_ulong) -> io::Result<()> {
    // SAFETY: these requests take an integer argument, not a pointer.
    if unsafe { libc::ioctl(fd, request, value) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A tap as the kernel reports it (IFLA_INFO_DATA of kind "tun").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapInfo {
    pub link: LinkFacts,
    /// None when the device has no owner (anyone with CAP_NET_ADMIN may open it).
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// A tap (ethernet frames), as opposed to a tun (IP packets).
    pub is_tap: bool,
    pub vnet_hdr: bool,
    pub multi_queue: bool,
    pub persist: bool,
}

/// if_link.h IFLA_TUN_* attributes.
mod ifla_tun {
    pub const OWNER: u16 = 1;
    pub const GROUP: u16 = 2;
    pub const TYPE: u16 = 3;
    pub const VNET_HDR: u16 = 5;
    pub const PERSIST: u16 = 6;
    pub const MULTI_QUEUE: u16 = 7;
}

pub enum Found {
    Absent,
    /// A link of that name that is not a tun/tap: not ours to touch.
    NotATap(LinkFacts),
    Tap(TapInfo),
}

/// Looks the tap up in the calling thread's namespace.
pub async fn inspect(handle: &Handle, name: &str) -> Result<Found> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(Found::Absent);
    };
    if link.kind.as_deref() != Some("tun") {
        return Ok(Found::NotATap(link));
    }
    let mut info = TapInfo {
        link,
        owner: None,
        group: None,
        is_tap: false,
        vnet_hdr: false,
        multi_queue: false,
        persist: false,
    };
    let data = info.link.message.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Tun(data)) => Some(data.clone()),
            _ => None,
        }),
        _ => None,
    });
    // Read through the Nla trait: the raw value, whatever typed variants InfoTun grows.
    for nla in data.unwrap_or_default() {
        let mut value = vec![0u8; nla.value_len()];
        nla.emit_value(&mut value);
        let as_u32 = || {
            value
                .get(..4)
                .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        };
        let as_flag = || value.first().is_some_and(|b| *b != 0);
        match nla.kind() {
            ifla_tun::OWNER => info.owner = as_u32(),
            ifla_tun::GROUP => info.group = as_u32(),
            ifla_tun::TYPE => info.is_tap = value.first() == Some(&(libc::IFF_TAP as u8)),
            ifla_tun::VNET_HDR => info.vnet_hdr = as_flag(),
            ifla_tun::PERSIST => info.persist = as_flag(),
            ifla_tun::MULTI_QUEUE => info.multi_queue = as_flag(),
            _ => {}
        }
    }
    Ok(Found::Tap(info))
}

impl TapInfo {
    /// What is wrong with this tap for `spec`, if anything.
    pub fn mismatch(&self, spec: &TapSpec) -> Option<String> {
        let mut wrong = Vec::new();
        if !self.is_tap {
            wrong.push("it is a tun, not a tap".to_owned());
        }
        if self.owner != Some(spec.uid) {
            wrong.push(format!("owner is {:?}, not {}", self.owner, spec.uid));
        }
        if self.group != Some(spec.gid) {
            wrong.push(format!("group is {:?}, not {}", self.group, spec.gid));
        }
        if self.multi_queue != (spec.queues > 1) {
            wrong.push(format!(
                "multi-queue is {}, expected {} for {} queues",
                self.multi_queue,
                spec.queues > 1,
                spec.queues
            ));
        }
        (!wrong.is_empty()).then(|| wrong.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        interface::{delete_link, set_mtu_and_up},
        netns::{run_in, with_netlink},
        testnet::{PodNetns, root_or_skip},
    };

    fn create_in(ns: &PodNetns, spec: &TapSpec, mtu: u32) -> Result<()> {
        run_in(&ns.path, || {
            create(spec)?;
            with_netlink(async |h| {
                let link = link_by_name(&h, &spec.name).await?.expect("the tap exists");
                set_mtu_and_up(&h, &link, mtu).await
            })
        })
    }

    fn inspect_in(ns: &PodNetns, name: &str) -> Found {
        run_in(&ns.path, || with_netlink(async |h| inspect(&h, name).await)).unwrap()
    }

    #[test]
    fn tap_is_created_in_the_pod_netns_with_owner_mtu_and_flags() {
        if !root_or_skip("tap_is_created_in_the_pod_netns_with_owner_mtu_and_flags") {
            return;
        }
        let ns = PodNetns::new("tap");
        for (spec, mtu) in [
            (
                TapSpec {
                    name: format!("tct{}", ns.subnet),
                    uid: 107,
                    gid: 107,
                    queues: 1,
                },
                1450,
            ),
            (
                TapSpec {
                    name: format!("tcq{}", ns.subnet),
                    uid: 1000,
                    gid: 1001,
                    queues: 4,
                },
                9000,
            ),
        ] {
            create_in(&ns, &spec, mtu).unwrap();

            // What the kernel says, read from inside the pod's namespace.
            assert_eq!(ns.sys(&spec.name, "owner").unwrap(), spec.uid.to_string());
            assert_eq!(ns.sys(&spec.name, "group").unwrap(), spec.gid.to_string());
            assert_eq!(ns.sys(&spec.name, "mtu").unwrap(), mtu.to_string());
            assert_eq!(
                ns.sys(&spec.name, "tun_flags").unwrap(),
                format!("{:#x}", spec.expected_tun_flags())
            );
            assert!(
                !std::path::Path::new(&format!("/sys/class/net/{}", spec.name)).exists(),
                "the tap must not be in the host namespace"
            );

            // The same over netlink, as CHECK reads it.
            let Found::Tap(info) = inspect_in(&ns, &spec.name) else {
                panic!("{} is not reported as a tap", spec.name);
            };
            assert_eq!(info.mismatch(&spec), None);
            assert!(info.is_tap && info.persist && info.vnet_hdr && info.link.up);
            assert_eq!(info.multi_queue, spec.queues > 1);
            assert_eq!(info.link.mtu, mtu);
            let other_owner = TapSpec {
                uid: 0,
                ..spec.clone()
            };
            assert!(info.mismatch(&other_owner).unwrap().contains("owner"));

            // A second ADD never adopts the existing tap.
            let err = run_in(&ns.path, || create(&spec)).unwrap_err();
            assert!(err.to_string().contains("already exists"), "{err}");

            run_in(&ns.path, || {
                with_netlink(async |h| delete_link(&h, &info.link).await)
            })
            .unwrap();
            assert_eq!(ns.sys(&spec.name, "owner"), None);
            assert!(matches!(inspect_in(&ns, &spec.name), Found::Absent));
        }
        // The pod interface is reported as what it is.
        assert!(matches!(inspect_in(&ns, "eth0"), Found::NotATap(l) if l.is_veth()));
    }

    #[test]
    fn flags_follow_kubevirt_and_queues() {
        let mut spec = TapSpec {
            name: "tap0".into(),
            uid: 107,
            gid: 107,
            queues: 1,
        };
        assert_eq!(spec.expected_tun_flags(), 0x5802);
        spec.queues = 4;
        assert_eq!(spec.expected_tun_flags(), 0x5902);
    }
}
