//! Loading, pinning and attaching the eBPF datapath.
//!
//! Everything the kernel holds lives under one bpffs directory: the maps (pinned by name), the
//! program, and one TCX link per attached interface. A restarted daemon (also after `kill -9`)
//! loads the program again with the same pinned maps and swaps it into the existing links with
//! `bpf_link_update`, so no packet ever meets a detached interface or an empty conntrack table.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
};
use tapestry_common::{
    AffinityEntry, AffinityKey, Backend, Config, CtEntry, CtKey, GuestStats, LbTable, Service,
    ServiceKey, TrafficStats, map_names, program_names,
};
use tracing::{debug, info, warn};

/// The compiled programs (built by build.rs from `ebpf/`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapestry-lb"));

const PROGRAM_PIN: &str = "prog_from_endpoint";
const LINKS_DIR: &str = "links";

/// Typed handles on every map of the datapath.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub lb_tables: HashMap<MapData, u32, LbTable>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub config: Array<MapData, Config>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub drops: PerCpuArray<MapData, u64>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Taken by the flow-event reader.
    pub events: Option<RingBuf<MapData>>,
    pub guest_stats: PerCpuArray<MapData, GuestStats>,
    /// Taken by the DHCP server.
    pub dhcp: Option<RingBuf<MapData>>,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pub maps: Maps,
}

/// An interface the datapath is attached to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub ifindex: u32,
    pub ifname: String,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn is_not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(SyscallError { io_error, .. }) if io_error.kind() == io::ErrorKind::NotFound)
}

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

impl Datapath {
    /// Loads the programs, reusing the maps pinned under `pin_dir` (creating and pinning them the
    /// first time), and pins the program.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this tapestryd was built with AYA_BUILD_SKIP=1 and carries no eBPF object; \
                 rebuild without it"
            );
        }
        fs::create_dir_all(pin_dir.join(LINKS_DIR)).with_context(|| {
            format!(
                "creating {} (is bpffs mounted on /sys/fs/bpf?)",
                pin_dir.display()
            )
        })?;
        let reused = map_names::ALL
            .iter()
            .filter(|n| pin_dir.join(n).exists())
            .count();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program_names::FROM_ENDPOINT)
            .context("program missing from the eBPF object")?
            .try_into()?;
        prog.load()
            .context("the kernel rejected the datapath program")?;
        let prog_pin = pin_dir.join(PROGRAM_PIN);
        let _ = fs::remove_file(&prog_pin);
        prog.pin(&prog_pin)
            .with_context(|| format!("pinning the program at {}", prog_pin.display()))?;
        info!(
            pin_dir = %pin_dir.display(),
            maps_reused = reused,
            maps = map_names::ALL.len(),
            "datapath loaded"
        );
        // The guest programs are loaded per guest; this copy only creates (or finds) their
        // shared, pinned maps, so counters and the DHCP queue exist before any guest does.
        let mut guest_maps = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(crate::guest::OBJECT)
            .context("loading the guest programs' maps")?;
        let maps = Maps {
            services: take(&mut ebpf, map_names::SERVICES)?,
            backends: take(&mut ebpf, map_names::BACKENDS)?,
            lb_tables: take(&mut ebpf, map_names::LB_TABLES)?,
            conntrack: take(&mut ebpf, map_names::CONNTRACK)?,
            affinity: take(&mut ebpf, map_names::AFFINITY)?,
            config: take(&mut ebpf, map_names::CONFIG)?,
            service_stats: take(&mut ebpf, map_names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, map_names::BACKEND_STATS)?,
            drops: take(&mut ebpf, map_names::DROPS)?,
            counters: take(&mut ebpf, map_names::COUNTERS)?,
            events: Some(take(&mut ebpf, map_names::EVENTS)?),
            guest_stats: take(&mut guest_maps, map_names::GUEST_STATS)?,
            dhcp: Some(take(&mut guest_maps, map_names::DHCP)?),
        };
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            maps,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn program(&mut self) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(program_names::FROM_ENDPOINT)
            .context("program missing")?
            .try_into()?)
    }

    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.maps
            .config
            .set(0, config, 0)
            .context("writing the datapath config")
    }

    fn link_pin(&self, ifindex: u32) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("ingress-{ifindex}"))
    }

    /// Attaches to the ingress of `ifname` (an endpoint's host-side interface). Idempotent: an
    /// existing pinned link is switched to this daemon's program atomically.
    pub fn attach(&mut self, ifname: &str) -> Result<Attachment> {
        let ifindex = ifindex_of(ifname)?;
        let pin = self.link_pin(ifindex);
        let prog = self.program()?;
        let (id, had_pin) = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                (prog.attach_to_link(link)?, true)
            }
            Err(e) if is_not_found(&e) => (
                prog.attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    // First, so a primary CNI's or kube-proxy's own hook sees the packet after
                    // the rewrite (ours returns "next" for everything it does not own).
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| format!("attaching to {ifname}"))?,
                false,
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", pin.display())),
        };
        let link: FdLink = prog.take_link(id)?.try_into()?;
        if had_pin {
            // The old pin still names the same link; re-pin under our fd.
            let _ = fs::remove_file(&pin);
        }
        link.pin(&pin)
            .with_context(|| format!("pinning the link at {}", pin.display()))?;
        debug!(ifname, ifindex, "attached");
        Ok(Attachment {
            ifindex,
            ifname: ifname.to_owned(),
        })
    }

    /// Detaches from `ifindex`. Detaching what is not attached (or an interface that is gone)
    /// succeeds.
    pub fn detach(&mut self, ifindex: u32) -> Result<bool> {
        let pin = self.link_pin(ifindex);
        match PinnedLink::from_pin(&pin) {
            Ok(link) => {
                let fd = link.unpin().context("unpinning the link")?;
                // Dropping the last reference releases the link, which detaches the program.
                drop(fd);
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("reading {}", pin.display())),
        }
    }

    /// Pinned links from an earlier run: adopts those whose interface still exists (switching
    /// them to this program) and removes the pins of interfaces that are gone.
    pub fn adopt_links(&mut self) -> Result<Vec<Attachment>> {
        let mut adopted = Vec::new();
        let dir = self.pin_dir.join(LINKS_DIR);
        let mut found = BTreeMap::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(idx) = name
                .strip_prefix("ingress-")
                .and_then(|s| s.parse::<u32>().ok())
            {
                found.insert(idx, entry.path());
            }
        }
        for (ifindex, path) in found {
            match ifname_of(ifindex) {
                Some(ifname) => match self.attach(&ifname) {
                    Ok(a) => adopted.push(a),
                    Err(e) => warn!(ifname, error = %format!("{e:#}"), "could not adopt link"),
                },
                None => {
                    debug!(ifindex, "interface gone; removing its link pin");
                    let _ = fs::remove_file(path);
                }
            }
        }
        Ok(adopted)
    }

    /// Interfaces with a pinned link.
    pub fn attachments(&self) -> Vec<Attachment> {
        let dir = self.pin_dir.join(LINKS_DIR);
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(dir) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(idx) = name.strip_prefix("ingress-").and_then(|s| s.parse().ok()) {
                    out.push(Attachment {
                        ifindex: idx,
                        ifname: ifname_of(idx).unwrap_or_default(),
                    });
                }
            }
        }
        out.sort_by_key(|a| a.ifindex);
        out
    }

    /// Removes every pin (maps, program, links): the datapath is gone once the last user drops.
    pub fn unpin_all(pin_dir: &Path) -> Result<()> {
        if pin_dir.exists() {
            fs::remove_dir_all(pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
        }
        Ok(())
    }
}
