//! Loading, pinning and attaching the eBPF datapath.
//!
//! Everything the kernel holds lives under one bpffs directory: the maps (pinned by name), the
//! program, and one TCX link per attached interface. A restarted daemon (also after `kill -9`)
//! loads the program again with the same pinned maps and swaps it into the existing links with
//! `bpf_link_update`, so no packet ever meets a detached interface or an empty conntrack table.
//!
//! Nothing here is shared behind a lock: each part of the daemon opens its own handles on the
//! pinned maps ([`Maps::open`]) and the pinned program ([`Pins::attach`]), so the reconciler, the
//! endpoint registry, conntrack collection and the read views never wait for each other.

pub mod conntrack;
pub mod guest;
pub mod host;
pub mod iface;
pub mod link;
pub mod node_addrs;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context, Result, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{CgroupSockAddr, SchedClassifier, TcAttachType},
};
use tapestry_common::{
    AffinityEntry, AffinityKey, Backend, CT_SHARE_GLOBAL, Config, DEFAULT_CT_SHARE,
    DEFAULT_NODEPORT_RANGE, GuestStats, HOST_NETNS_COOKIE_GLOBAL, LbTable, NODEPORT_MAX_GLOBAL,
    NODEPORT_MIN_GLOBAL, Service, ServiceKey, TrafficStats, map_names, program_names,
};
use tracing::{debug, info, warn};

pub use iface::{ifindex_of, ifname_of};

/// The compiled programs (built by build.rs from `ebpf/`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapestry-lb"));

/// The Service programs: (name in the object, pin, hook on an endpoint's host interface, link
/// pin prefix). Ingress is what the endpoint sends (load balancing), egress what reaches it
/// (reverse NAT of the flows this node balanced).
const SERVICE_PROGRAMS: [(&str, &str, Hook, &str); 2] = [
    (
        program_names::FROM_ENDPOINT,
        "prog_from_endpoint",
        Hook::Ingress,
        "ingress-",
    ),
    (
        program_names::TO_ENDPOINT,
        "prog_to_endpoint",
        Hook::Egress,
        "egress-",
    ),
];
/// The external interfaces' program (clients outside the node reaching node ports): name, pin,
/// link pin prefix. On ingress only: what it sends back out, it routes itself.
const NETWORK_PROGRAM: (&str, &str, &str) =
    (program_names::FROM_NETWORK, "prog_from_network", "network-");
const LINKS_DIR: &str = "links";
const INGRESS_PREFIX: &str = "ingress-";

/// Where on an interface a program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn tc(self) -> TcAttachType {
        match self {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
}

/// Typed handles on every map of the datapath (not the ring buffers, which have one reader each).
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub lb_tables: HashMap<MapData, u32, LbTable>,
    /// TCP flows and the rest, in two tables.
    pub conntrack: conntrack::Tables,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub config: Array<MapData, Config>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub drops: PerCpuArray<MapData, u64>,
    pub counters: PerCpuArray<MapData, u64>,
    pub guest_stats: PerCpuArray<MapData, GuestStats>,
    /// The node's own addresses, where node ports answer (`node_addrs::sync`).
    pub node_addrs: HashMap<MapData, u32, u8>,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<Map>,
    <T as TryFrom<Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn open<T>(pin_dir: &Path, name: &str) -> Result<T>
where
    T: TryFrom<Map>,
    <T as TryFrom<Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    /// A fresh set of handles on the maps pinned under `pin_dir` by [`Datapath::load`].
    pub fn open(pin_dir: &Path) -> Result<Maps> {
        Ok(Maps {
            services: open(pin_dir, map_names::SERVICES)?,
            backends: open(pin_dir, map_names::BACKENDS)?,
            lb_tables: open(pin_dir, map_names::LB_TABLES)?,
            conntrack: conntrack::Tables {
                tcp: open(pin_dir, map_names::CONNTRACK)?,
                any: open(pin_dir, map_names::CONNTRACK_ANY)?,
                clients: open(pin_dir, map_names::CT_CLIENTS)?,
                counters: open(pin_dir, map_names::COUNTERS)?,
            },
            affinity: open(pin_dir, map_names::AFFINITY)?,
            config: open(pin_dir, map_names::CONFIG)?,
            service_stats: open(pin_dir, map_names::SERVICE_STATS)?,
            backend_stats: open(pin_dir, map_names::BACKEND_STATS)?,
            drops: open(pin_dir, map_names::DROPS)?,
            counters: open(pin_dir, map_names::COUNTERS)?,
            guest_stats: open(pin_dir, map_names::GUEST_STATS)?,
            node_addrs: open(pin_dir, map_names::NODE_ADDRS)?,
        })
    }
}

/// The kernel's BTF, parsed once per process: aya would parse it again for every object loaded,
/// which costs tens of milliseconds per guest.
pub(crate) fn kernel_btf() -> Option<&'static Btf> {
    static BTF: OnceLock<Option<Btf>> = OnceLock::new();
    BTF.get_or_init(|| match Btf::from_sys_fs() {
        Ok(btf) => Some(btf),
        Err(e) => {
            warn!(error = %e, "no kernel BTF; programs load without it");
            None
        }
    })
    .as_ref()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The loaded datapath: the Service program (kept loaded for the process's lifetime and pinned),
/// one set of map handles, and the ring buffers until their readers take them.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Pins,
    pub maps: Maps,
    events: Option<RingBuf<MapData>>,
    dhcp: Option<RingBuf<MapData>>,
}

/// Settings fixed when the programs are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Live flows one client address may hold (0: no limit;
    /// `tapestryd --conntrack-share-per-endpoint`).
    pub ct_share: u32,
    /// The network namespace whose sockets the host programs translate ([`host::netns_cookie`];
    /// 0: none).
    pub host_netns_cookie: u64,
    /// Destination ports looked up as node ports (inclusive; `tapestryd --nodeport-range`).
    pub nodeport_range: (u16, u16),
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ct_share: DEFAULT_CT_SHARE,
            host_netns_cookie: 0,
            nodeport_range: DEFAULT_NODEPORT_RANGE,
        }
    }
}

/// An interface the datapath is attached to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    pub ifindex: u32,
    pub ifname: String,
}

impl Datapath {
    /// Loads the programs, reusing the maps pinned under `pin_dir` (creating and pinning them the
    /// first time), and pins the program.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_with(pin_dir, LoadOptions::default())
    }

    /// [`Datapath::load`] with the settings fixed at load time.
    pub fn load_with(pin_dir: &Path, options: LoadOptions) -> Result<Self> {
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
            .btf(kernel_btf())
            .default_map_pin_directory(pin_dir)
            .override_global(CT_SHARE_GLOBAL, &options.ct_share, true)
            .override_global(HOST_NETNS_COOKIE_GLOBAL, &options.host_netns_cookie, true)
            .override_global(NODEPORT_MIN_GLOBAL, &options.nodeport_range.0, true)
            .override_global(NODEPORT_MAX_GLOBAL, &options.nodeport_range.1, true)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        let network = (
            NETWORK_PROGRAM.0,
            NETWORK_PROGRAM.1,
            Hook::Ingress,
            NETWORK_PROGRAM.2,
        );
        for (name, pin, _, _) in SERVICE_PROGRAMS.into_iter().chain([network]) {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected {name}"))?;
            let prog_pin = pin_dir.join(pin);
            let _ = fs::remove_file(&prog_pin);
            prog.pin(&prog_pin)
                .with_context(|| format!("pinning the program at {}", prog_pin.display()))?;
        }
        // The host programs are attached by the daemon (`attach_host`); loaded here, so every
        // load verifies them.
        for (name, _) in host::HOST_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected {name}"))?;
        }
        info!(
            pin_dir = %pin_dir.display(),
            maps_reused = reused,
            maps = map_names::ALL.len(),
            "datapath loaded"
        );
        // The guest programs are loaded per guest; this copy only creates (or finds) their
        // shared, pinned maps, so counters and the DHCP queue exist before any guest does.
        let mut guest_maps = EbpfLoader::new()
            .btf(kernel_btf())
            .default_map_pin_directory(pin_dir)
            .load(guest::OBJECT)
            .context("loading the guest programs' maps")?;
        let maps = Maps {
            services: take(&mut ebpf, map_names::SERVICES)?,
            backends: take(&mut ebpf, map_names::BACKENDS)?,
            lb_tables: take(&mut ebpf, map_names::LB_TABLES)?,
            conntrack: conntrack::Tables {
                tcp: take(&mut ebpf, map_names::CONNTRACK)?,
                any: take(&mut ebpf, map_names::CONNTRACK_ANY)?,
                clients: take(&mut ebpf, map_names::CT_CLIENTS)?,
                // A second handle on the counters (pinned by now): the tables' accounting.
                counters: open(pin_dir, map_names::COUNTERS)?,
            },
            affinity: take(&mut ebpf, map_names::AFFINITY)?,
            config: take(&mut ebpf, map_names::CONFIG)?,
            service_stats: take(&mut ebpf, map_names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, map_names::BACKEND_STATS)?,
            drops: take(&mut ebpf, map_names::DROPS)?,
            counters: take(&mut ebpf, map_names::COUNTERS)?,
            guest_stats: take(&mut guest_maps, map_names::GUEST_STATS)?,
            node_addrs: take(&mut ebpf, map_names::NODE_ADDRS)?,
        };
        let events = Some(take(&mut ebpf, map_names::EVENTS)?);
        let dhcp = Some(take(&mut guest_maps, map_names::DHCP)?);
        Ok(Self {
            ebpf,
            pins: Pins {
                dir: pin_dir.to_owned(),
            },
            maps,
            events,
            dhcp,
        })
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// The loaded load-balancing program, what endpoints send (for `BPF_PROG_TEST_RUN`).
    pub fn program(&mut self) -> Result<&mut SchedClassifier> {
        self.loaded(program_names::FROM_ENDPOINT)
    }

    /// The loaded reverse-NAT program, what reaches endpoints (for `BPF_PROG_TEST_RUN`).
    pub fn reply_program(&mut self) -> Result<&mut SchedClassifier> {
        self.loaded(program_names::TO_ENDPOINT)
    }

    fn loaded(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()?)
    }

    pub fn set_config(&mut self, config: Config) -> Result<()> {
        self.maps
            .config
            .set(0, config, 0)
            .context("writing the datapath config")
    }

    /// The flow-event ring buffer, for its one reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The guests' DHCP ring buffer, for its one reader.
    pub fn take_dhcp(&mut self) -> Option<RingBuf<MapData>> {
        self.dhcp.take()
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

/// The datapath's bpffs directory: attaches the pinned Service program to interfaces, and knows
/// which interfaces it is on. Cheap to clone; every call opens what it needs from the pins, so
/// attaches to different interfaces run in parallel.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Pins { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join(LINKS_DIR)
    }

    pub fn program_pinned(&self) -> bool {
        SERVICE_PROGRAMS
            .iter()
            .all(|(_, pin, _, _)| self.dir.join(pin).exists())
    }

    fn link_pin(&self, prefix: &str, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("{prefix}{ifindex}"))
    }

    /// Attaches the Service programs to `ifname` (an endpoint's host-side interface): load
    /// balancing on its ingress, reverse NAT on its egress. Idempotent: existing pinned links are
    /// switched to the pinned programs. When the second hook fails, the first is taken off again.
    pub fn attach(&self, ifname: &str) -> Result<Attachment> {
        let ifindex = ifindex_of(ifname)?;
        let mut done = Vec::new();
        for (_, pin, hook, prefix) in SERVICE_PROGRAMS {
            let prog_pin = self.dir.join(pin);
            let link_pin = self.link_pin(prefix, ifindex);
            let attached = SchedClassifier::from_pin(&prog_pin)
                .with_context(|| format!("opening the pinned program {}", prog_pin.display()))
                .and_then(|mut prog| link::attach(&mut prog, ifname, hook.tc(), &link_pin));
            match attached {
                Ok(how) => {
                    debug!(ifname, ifindex, ?hook, ?how, "attached");
                    done.push((how, link_pin));
                }
                Err(e) => {
                    for (how, pin) in done {
                        if how == link::Attached::Created {
                            let _ = link::remove(&pin);
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.mark_endpoint(ifname, ifindex)?;
        Ok(Attachment {
            ifindex,
            ifname: ifname.to_owned(),
        })
    }

    /// Records an attached interface in `ENDPOINT_IFS` when it is a veth: the fast path
    /// delivers into its peer's namespace (`bpf_redirect_peer`, which drops a packet sent to an
    /// interface without a peer, so only veths are listed).
    fn mark_endpoint(&self, ifname: &str, ifindex: u32) -> Result<()> {
        let mut ifs: HashMap<MapData, u32, u8> = open(&self.dir, map_names::ENDPOINT_IFS)?;
        match iface::driver_of(ifname) {
            Ok(driver) if driver == "veth" => ifs
                .insert(ifindex, 1, 0)
                .with_context(|| format!("recording {ifname} as an endpoint interface")),
            other => {
                debug!(
                    ifname,
                    ?other,
                    "not a veth: the fast path leaves its traffic to the stack"
                );
                let _ = ifs.remove(&ifindex);
                Ok(())
            }
        }
    }

    /// Detaches from `ifindex`. Detaching what is not attached (or an interface that is gone)
    /// succeeds; returns whether anything was attached.
    pub fn detach(&self, ifindex: u32) -> Result<bool> {
        let mut any = false;
        for (_, _, _, prefix) in SERVICE_PROGRAMS {
            any |= link::remove(&self.link_pin(prefix, ifindex))?;
        }
        self.forget_endpoint(ifindex);
        Ok(any)
    }

    /// Takes `ifindex` out of `ENDPOINT_IFS` (absent is fine).
    fn forget_endpoint(&self, ifindex: u32) {
        if let Ok(mut ifs) = open::<HashMap<MapData, u32, u8>>(&self.dir, map_names::ENDPOINT_IFS) {
            let _ = ifs.remove(&ifindex);
        }
    }

    /// Pinned links from an earlier run: adopts those whose interface still exists (switching
    /// them to the program just pinned) and removes the pins of interfaces that are gone.
    pub fn adopt_links(&self) -> Result<Vec<Attachment>> {
        let mut adopted = Vec::new();
        let dir = self.links_dir();
        let mut found = BTreeMap::new();
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(idx) = name
                .strip_prefix(INGRESS_PREFIX)
                .and_then(|s| s.parse::<u32>().ok())
            {
                found.insert(idx, entry.path());
            }
        }
        for (ifindex, _) in found {
            match ifname_of(ifindex) {
                // Both hooks: a datapath pinned by a version with ingress only gains egress.
                Some(ifname) => match self.attach(&ifname) {
                    Ok(a) => adopted.push(a),
                    Err(e) => warn!(ifname, error = %format!("{e:#}"), "could not adopt link"),
                },
                None => {
                    debug!(ifindex, "interface gone; removing its link pins");
                    for (_, _, _, prefix) in SERVICE_PROGRAMS {
                        let _ = fs::remove_file(self.link_pin(prefix, ifindex));
                    }
                    self.forget_endpoint(ifindex);
                }
            }
        }
        Ok(adopted)
    }

    /// Puts the external interfaces' program on the ingress of exactly `ifnames` (clients
    /// outside the node reaching node ports): attaches (or switches) each, and takes it off the
    /// interfaces of an earlier run that are no longer listed.
    pub fn attach_network(&self, ifnames: &[String]) -> Result<Vec<Attachment>> {
        let (_, pin, prefix) = NETWORK_PROGRAM;
        let prog_pin = self.dir.join(pin);
        let mut keep = Vec::new();
        for ifname in ifnames {
            let ifindex =
                ifindex_of(ifname).with_context(|| format!("--nodeport-interface {ifname}"))?;
            let mut prog = SchedClassifier::from_pin(&prog_pin)
                .with_context(|| format!("opening the pinned program {}", prog_pin.display()))?;
            let how = link::attach(
                &mut prog,
                ifname,
                TcAttachType::Ingress,
                &self.link_pin(prefix, ifindex),
            )?;
            debug!(ifname, ifindex, ?how, "external interface attached");
            keep.push(Attachment {
                ifindex,
                ifname: ifname.clone(),
            });
        }
        if let Ok(rd) = fs::read_dir(self.links_dir()) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(idx) = name
                    .strip_prefix(prefix)
                    .and_then(|s| s.parse::<u32>().ok())
                    && !keep.iter().any(|a| a.ifindex == idx)
                {
                    link::remove(&entry.path())?;
                    info!(
                        ifindex = idx,
                        "external interface no longer listed: detached"
                    );
                }
            }
        }
        Ok(keep)
    }

    /// Interfaces with a pinned link.
    pub fn attachments(&self) -> Vec<Attachment> {
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(self.links_dir()) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(idx) = name
                    .strip_prefix(INGRESS_PREFIX)
                    .and_then(|s| s.parse().ok())
                {
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
}
