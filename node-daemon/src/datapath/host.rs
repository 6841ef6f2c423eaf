//! Frontends for the node's own sockets: the load balancer's cgroup programs (ebpf/src/bin/lb/
//! host.rs) on the root of the cgroup v2 hierarchy, so host-network pods and the node's
//! processes reach every ClusterIP with the same backend choice, affinity and reject rules as
//! pods, translated once per connection instead of per packet.
//!
//! Each program's link is pinned (`links/host-<hook>`), like the interfaces' links: it outlives
//! the daemon, and a restarted daemon attaches its freshly loaded program and renames the new
//! link's pin over the old one, which detaches the old link. Between the two steps both run;
//! the first translates and the second sees a backend address, which is no frontend, so a
//! connection is never translated twice.

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use tapestry_common::program_names;
use tracing::{debug, info};

use super::{Datapath, LINKS_DIR};

/// The host programs: (name in the object, link pin in `links/`).
pub(super) const HOST_PROGRAMS: [(&str, &str); 4] = [
    (program_names::HOST_CONNECT4, "host-connect4"),
    (program_names::HOST_SENDMSG4, "host-sendmsg4"),
    (program_names::HOST_RECVMSG4, "host-recvmsg4"),
    (program_names::HOST_GETPEERNAME4, "host-getpeername4"),
];

/// statfs(2) magic of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`): what the host
/// programs compare a socket's namespace with.
pub fn netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .context("a socket to read this network namespace's cookie")?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which we own, and the fd is
    // open for the call (the socket lives until the end of the function).
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (Linux 5.14 or later)");
    }
    Ok(cookie)
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value for statfs(2) to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a statfs we own.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

/// The root of the cgroup v2 hierarchy under `base` (`--cgroup-root`, default /sys/fs/cgroup):
/// `base` itself when it is cgroup v2 (the unified layout), else `base`/unified (systemd's
/// hybrid layout, as on this project's test machine).
pub fn cgroup2_root(base: Option<&Path>) -> Result<PathBuf> {
    let base = base.unwrap_or(Path::new("/sys/fs/cgroup"));
    for p in [base.to_owned(), base.join("unified")] {
        if is_cgroup2(&p) {
            return Ok(p);
        }
    }
    bail!(
        "no cgroup v2 hierarchy at {0} or {0}/unified: the node's own sockets cannot reach \
         frontends without one (pass --cgroup-root, or --host-services=false)",
        base.display()
    )
}

impl Datapath {
    /// Puts the host programs on `cgroup_root` (the root of the cgroup v2 hierarchy), replacing
    /// the previous run's links.
    pub fn attach_host(&mut self, cgroup_root: &Path) -> Result<()> {
        let cgroup = fs::File::open(cgroup_root)
            .with_context(|| format!("opening the cgroup {}", cgroup_root.display()))?;
        let links = self.pins.dir.join(LINKS_DIR);
        for (name, pin) in HOST_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            // A cgroup bpf_link takes no flags (the kernel refuses any) and always runs beside
            // the cgroup's other programs, as with BPF_F_ALLOW_MULTI; aya's `Single` is 0.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup_root.display()))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            // bpffs refuses names with a dot.
            let fresh = links.join(format!("{pin}-new"));
            let _ = fs::remove_file(&fresh);
            // The pin keeps the link; our fd on it goes when the returned handle drops.
            drop(
                link.pin(&fresh)
                    .with_context(|| format!("pinning the link at {}", fresh.display()))?,
            );
            fs::rename(&fresh, links.join(pin))
                .with_context(|| format!("replacing the link pinned at links/{pin}"))?;
            debug!(name, cgroup = %cgroup_root.display(), "host program attached");
        }
        info!(
            cgroup = %cgroup_root.display(),
            "the node's own sockets reach frontends"
        );
        Ok(())
    }

    /// Takes the host programs off (`--host-services=false` after a run with them): their
    /// links' pins go, which detaches them. Returns whether any was attached.
    pub fn detach_host(&self) -> Result<bool> {
        let links = self.pins.dir.join(LINKS_DIR);
        let mut any = false;
        for (_, pin) in HOST_PROGRAMS {
            any |= super::link::remove(&links.join(pin))?;
        }
        Ok(any)
    }
}
