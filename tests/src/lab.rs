//! [`Lab`] and [`Pod`]: a Calico-style routed topology of network namespaces on this host.
//!
//! Every lab reserves a slot `0..2048` in a registry under `/run/tapestry-lab` (an `flock`ed
//! directory, so labs in parallel test threads *and* parallel processes never collide). The slot
//! gives the lab:
//! - its prefix `tpXXX` (`XXX` = slot in hex): netns `tpXXX-<pod>`, host veths
//!   `tpXXX-NN<pod>` (NN = pod number in hex, cut to 15 characters);
//! - its /24 `10.(240 + slot / 256).(slot % 256).0/24` out of 10.240.0.0/13: pods get `.2` to
//!   `.127` ([`Lab::pod_cidr`]), and `.128` to `.254` are free addresses for Service VIPs
//!   ([`Lab::service_ip`], [`Lab::service_cidr`]) that no other lab uses. The lab installs no
//!   route for VIPs: unhandled VIP traffic follows the host's default route.
//!
//! A slot whose owning process died without tearing down (SIGKILL, abort) is swept, with its
//! namespaces, links and the processes inside them, by the next [`Lab::new`] or
//! [`cleanup_labs`]. A slot marked by [`Lab::keep`] is only removed by
//! `cleanup_labs(true)`.
//!
//! Host sysctls: `net.ipv4.ip_forward=1` while any lab (live or kept) exists; the value found
//! before the first lab is saved in the registry and written back when the last one goes.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::cmd::{ip, ip_batch, run, sysctl_path, sysctl_path_parts};
use crate::net::{self, ServerHandle, ServerRegistry};
use crate::netns::kill_netns_processes;

/// Directory of the cross-process lab registry.
pub const REGISTRY_DIR: &str = "/run/tapestry-lab";
const LOCK_FILE: &str = "lock";
const SAVED_SYSCTLS: &str = "saved-sysctls";
/// Host sysctls a lab sets to 1 (and restores when the last lab goes).
const HOST_SYSCTLS: &[&str] = &["net.ipv4.ip_forward"];
/// Every lab's pods and VIPs are inside this prefix.
/// 10.240.0.0/13: clear of 10.248.0.0/13, where resolvers of this kind of machine live
/// (10.255.255.53): the lab must never shadow them.
const LAB_SUPERNET: &str = "10.240.0.0/13";
const SLOTS: u16 = 2048;
/// Pods per lab: `.2` to `.127`.
pub const MAX_PODS: usize = 126;
/// Service VIPs per lab: `.128` to `.254`.
pub const MAX_SERVICE_IPS: u8 = 127;
/// Default gateway of every pod (answered by proxy ARP on the host-side veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
const RUN_NETNS: &str = "/run/netns";
const SYS_CLASS_NET: &str = "/sys/class/net";
/// Time given to processes in a pod between SIGTERM and SIGKILL at teardown.
const KILL_GRACE: Duration = Duration::from_millis(500);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A set of pods (network namespaces) wired to the host. Torn down on drop unless
/// [`Lab::keep`] was called.
#[derive(Debug)]
pub struct Lab {
    slot: u16,
    prefix: String,
    hint: String,
    subnet: Ipv4Addr,
    pods: Vec<Pod>,
    kept: bool,
    torn_down: bool,
    servers: Arc<ServerRegistry>,
}

/// One pod: a network namespace whose `eth0` holds `ip/32`, default route via
/// [`POD_GATEWAY`] (onlink); its veth peer `host_ifname` lives in the root namespace with
/// `proxy_arp=1`, `neigh.proxy_delay=0`, `rp_filter=0` and a `/32` route to `ip`.
///
/// Cloning is cheap; all clones refer to the same namespace, which belongs to the [`Lab`].
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// Namespace name (`ip netns list`).
    pub netns: String,
    /// `/run/netns/<netns>`.
    pub netns_path: PathBuf,
    pub ip: Ipv4Addr,
    /// MAC of `eth0` inside the pod.
    pub mac: [u8; 6],
    /// Ifindex of `eth0` inside the pod's namespace.
    pub ifindex: u32,
    /// The host-side veth (root namespace): where tc/XDP programs for this pod attach.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    servers: Arc<ServerRegistry>,
}

impl Lab {
    /// Reserves a slot (prefix and /24), sweeps labs left by dead processes, and turns on
    /// `net.ipv4.ip_forward`. `name_hint` only labels the reservation (see `/run/tapestry-lab`).
    pub fn new(name_hint: &str) -> Result<Lab> {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            bail!("a lab needs root (network namespaces, veths, sysctls)");
        }
        let hint: String = name_hint
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .take(64)
            .collect();
        let reg = Registry::lock()?;
        reg.sweep(false);
        if !Path::new(RUN_NETNS).exists() {
            // Let one `ip netns add` set up the /run/netns mount while we hold the lock, so
            // parallel first-time `ip netns add` calls cannot race on it.
            let probe = format!("tapestry-probe-{}", std::process::id());
            ip(&["netns", "add", &probe])?;
            let _ = ip(&["netns", "del", &probe]);
        }
        let slot = reg.reserve(&hint)?;
        let prefix = prefix_of(slot);
        // Anything carrying this prefix without a reservation is an orphan.
        let orphans = remove_prefix_resources(&prefix);
        if !orphans.is_empty() {
            let _ = fs::remove_file(reg.slot_path(slot));
            bail!(
                "could not clear orphans of {prefix}: {}",
                orphans.join("; ")
            );
        }
        if let Err(e) = reg.apply_host_sysctls() {
            let _ = fs::remove_file(reg.slot_path(slot));
            return Err(e);
        }
        drop(reg);
        Ok(Lab {
            slot,
            prefix,
            hint,
            subnet: subnet_of(slot),
            pods: Vec::new(),
            kept: false,
            torn_down: false,
            servers: Arc::default(),
        })
    }

    /// Creates a pod: netns `<prefix>-<name>`, veth pair, `/32` address, routes, sysctls.
    /// `name` must be 1-32 characters of `[A-Za-z0-9_-]` and unique in the lab.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("pod name {name:?}: use 1-32 characters of [A-Za-z0-9_-]");
        }
        if self.pods.iter().any(|p| p.name == name) {
            bail!("lab {} already has a pod named {name}", self.prefix);
        }
        if self.torn_down {
            bail!("lab {} was torn down", self.prefix);
        }
        let n = self.pods.len();
        if n >= MAX_PODS {
            bail!("a lab holds at most {MAX_PODS} pods");
        }
        let o = self.subnet.octets();
        let ip = Ipv4Addr::new(o[0], o[1], o[2], 2 + n as u8);
        let netns = format!("{}-{name}", self.prefix);
        let mut host_ifname = format!("{}-{n:02x}{name}", self.prefix);
        host_ifname.truncate(15);

        ip_batch(
            None,
            false,
            &format!(
                "netns add {netns}\nlink add {host_ifname} type veth peer name eth0 netns {netns}\n"
            ),
        )
        .with_context(|| format!("creating pod {name}"))?;
        // proxy_delay=0 (as Calico sets it): answer proxy ARP at once instead of queueing the
        // request for up to 0.8 s in a queue that any link deletion in the root namespace
        // (another lab's teardown) purges, which left pods with INCOMPLETE gateway entries.
        for (table, key, value) in [
            ("conf", "proxy_arp", "1"),
            ("conf", "rp_filter", "0"),
            ("neigh", "proxy_delay", "0"),
        ] {
            let path = sysctl_path_parts(&["net", "ipv4", table, &host_ifname, key]);
            fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        }
        ip_batch(
            None,
            false,
            &format!("link set {host_ifname} up\nroute add {ip}/32 dev {host_ifname} scope link\n"),
        )?;
        ip_batch(
            Some(&netns),
            false,
            &format!(
                "link set lo up\nlink set eth0 up\naddr add {ip}/32 dev eth0\n\
                 route add default via {POD_GATEWAY} dev eth0 onlink\n"
            ),
        )?;

        let host_ifindex = read_trimmed(&format!("{SYS_CLASS_NET}/{host_ifname}/ifindex"))?
            .parse()
            .context("host ifindex")?;
        let host_mac = parse_mac(&read_trimmed(&format!(
            "{SYS_CLASS_NET}/{host_ifname}/address"
        ))?)?;
        self.register_pod(name, netns, ip, (host_ifname, host_ifindex, host_mac))
    }

    /// The [`Pod`] of namespace `netns` (its `eth0` read back), remembered by the lab.
    fn register_pod(
        &mut self,
        name: &str,
        netns: String,
        ip: Ipv4Addr,
        (host_ifname, host_ifindex, host_mac): (String, u32, [u8; 6]),
    ) -> Result<Pod> {
        let (ifindex, mac) = link_info(Some(&netns), "eth0")?;
        let pod = Pod {
            name: name.to_string(),
            netns_path: Path::new(RUN_NETNS).join(&netns),
            netns,
            ip,
            mac,
            ifindex,
            host_ifname,
            host_ifindex,
            host_mac,
            servers: self.servers.clone(),
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// A pod whose namespace `<prefix>-<name>` something else plumbed (a CNI chain run by
    /// [`crate::cluster`]): its `eth0` is read back; `host_ifname` / `host_ifindex` /
    /// `host_mac` describe the host-side interface in whatever namespace holds it (a lab
    /// node's). The namespace is removed with the lab.
    pub fn adopt_pod(
        &mut self,
        name: &str,
        ip: Ipv4Addr,
        host: (String, u32, [u8; 6]),
    ) -> Result<Pod> {
        let netns = format!("{}-{name}", self.prefix);
        self.register_pod(name, netns, ip, host)
    }

    /// A TCP server answering `"<name>\n"` on `0.0.0.0:port` inside any namespace (a lab node's:
    /// a host-network endpoint), stopped with the lab.
    pub fn serve_tcp_name_in(
        &self,
        netns_path: &Path,
        name: &str,
        port: u16,
    ) -> Result<ServerHandle> {
        net::serve_tcp_name(netns_path, name, port, &self.servers)
    }

    /// Forgets a pod (its namespace was deleted by whoever made it).
    pub fn forget_pod(&mut self, name: &str) {
        self.pods.retain(|p| p.name != name);
    }

    /// The lab's /24 (`10.(240 + slot / 256).(slot % 256).0`).
    pub fn subnet(&self) -> Ipv4Addr {
        self.subnet
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// `tpXXX`: the start of every netns and host link name of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn name_hint(&self) -> &str {
        &self.hint
    }

    /// Pod addresses: `(network, 25)`.
    pub fn pod_cidr(&self) -> (Ipv4Addr, u8) {
        (self.subnet, 25)
    }

    /// Service VIP addresses reserved for this lab: `(network, 25)`.
    pub fn service_cidr(&self) -> (Ipv4Addr, u8) {
        let o = self.subnet.octets();
        (Ipv4Addr::new(o[0], o[1], o[2], 128), 25)
    }

    /// The `n`th Service VIP of this lab (`.128 + n`). Panics if `n >= 127`.
    pub fn service_ip(&self, n: u8) -> Ipv4Addr {
        assert!(
            n < MAX_SERVICE_IPS,
            "a lab has {MAX_SERVICE_IPS} service IPs"
        );
        let o = self.subnet.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 128 + n)
    }

    /// Leaves the namespaces, links and routes in place when the lab is dropped (servers, being
    /// threads of this process, still stop with their handles or the process). The reservation
    /// is marked kept; remove it with [`cleanup_labs`]`(true)`.
    pub fn keep(&mut self) {
        self.kept = true;
        match Registry::lock() {
            Ok(reg) => {
                if let Err(e) = reg.write_slot(self.slot, &self.hint, true) {
                    eprintln!("tapestry lab {}: marking kept: {e:#}", self.prefix);
                }
            }
            Err(e) => eprintln!("tapestry lab {}: marking kept: {e:#}", self.prefix),
        }
    }

    pub fn is_kept(&self) -> bool {
        self.kept
    }

    /// Tears the lab down now (even if kept) and reports every failure.
    pub fn destroy(mut self) -> Result<()> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("tearing down lab {}: {}", self.prefix, errors.join("; "))
        }
    }

    /// Leaves the lab behind as if this process had crashed: servers stop, but namespaces,
    /// links and processes stay and the reservation is marked as owned by a dead process, so the
    /// next [`Lab::new`] or [`cleanup_labs`] sweeps it. For testing the sweep.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.servers.stop_all(Duration::from_secs(2));
        self.kept = true; // skip Drop's teardown
        self.torn_down = true;
        match Registry::lock() {
            Ok(reg) => {
                let _ = fs::write(
                    reg.slot_path(self.slot),
                    format!("pid=0 start=0 kept=0 hint={}\n", self.hint),
                );
            }
            Err(e) => eprintln!("tapestry lab {}: abandoning: {e:#}", self.prefix),
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        let stuck = self.servers.stop_all(Duration::from_secs(2));
        if stuck > 0 {
            errors.push(format!("{stuck} server(s) did not stop within 2 s"));
        }
        errors.extend(remove_prefix_resources(&self.prefix));
        match Registry::lock() {
            Ok(reg) => {
                if let Err(e) = fs::remove_file(reg.slot_path(self.slot))
                    && e.kind() != io::ErrorKind::NotFound
                {
                    errors.push(format!("removing reservation: {e}"));
                }
                if let Err(e) = reg.restore_host_sysctls_if_last() {
                    errors.push(format!("restoring sysctls: {e:#}"));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        errors
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for e in self.teardown() {
            eprintln!("tapestry lab {}: teardown: {e}", self.prefix);
        }
    }
}

impl Pod {
    /// `ip:port` of this pod.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// Runs `f` on a thread inside this pod's namespace (see [`tapestry_netns::run_in`]).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        Ok(tapestry_netns::run_in(&self.netns_path, f)?)
    }

    /// A `Command` for `program` that will run inside this pod.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // The path comes from a String, so it has no NUL byte.
        let _ = tapestry_netns::command_in(&mut cmd, &self.netns_path);
        cmd
    }

    /// Spawns `cmd` inside this pod (like `nsenter --net=<netns_path>`; `/sys/fs/bpf` stays
    /// visible). `cmd` keeps a hook that enters this pod. Processes still running in the pod at
    /// teardown are killed.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        tapestry_netns::command_in(cmd, &self.netns_path)?.spawn()
    }

    /// Runs `cmd` inside this pod to completion and returns its output.
    pub fn run(&self, cmd: &mut Command) -> io::Result<Output> {
        tapestry_netns::command_in(cmd, &self.netns_path)?.output()
    }

    /// Runs `cmd` inside this pod; non-zero exit is an error with stderr. Returns stdout.
    pub fn run_ok(&self, cmd: &mut Command) -> Result<String> {
        run(tapestry_netns::command_in(cmd, &self.netns_path)?)
    }

    /// `ip -n <netns> ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.netns]).args(args))
    }

    /// Reads a sysctl of this pod's namespace (`net.ipv4.tcp_max_tw_buckets`).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        Ok(self
            .in_netns(|| fs::read_to_string(&path))?
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string())
    }

    /// Writes a sysctl of this pod's namespace.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.in_netns(|| fs::write(&path, value))?
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Kills (TERM, then KILL after `grace`) every process running in this pod.
    pub fn kill_processes(&self, grace: Duration) -> io::Result<Vec<i32>> {
        kill_netns_processes(&self.netns_path, grace)
    }

    /// Starts a TCP server on `0.0.0.0:port` in this pod answering every request line with
    /// `"<name>\n"` (protocol in [`crate::net`]). Port 0 picks a free port
    /// ([`ServerHandle::port`]).
    pub fn serve_tcp_name(&self, port: u16) -> Result<ServerHandle> {
        net::serve_tcp_name(&self.netns_path, &self.name, port, &self.servers)
    }

    /// Starts a UDP server on `0.0.0.0:port` in this pod answering every datagram with
    /// `"<name>\n"`.
    pub fn serve_udp_name(&self, port: u16) -> Result<ServerHandle> {
        net::serve_udp_name(&self.netns_path, &self.name, port, &self.servers)
    }

    /// [`net::tcp_request`] from inside this pod: new connection, one line out, one line back
    /// (without `\n`).
    pub fn tcp_request(
        &self,
        addr: SocketAddrV4,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<String> {
        self.in_netns(|| net::tcp_request(addr, payload, timeout))
            .map_err(io::Error::other)?
    }

    /// [`net::udp_request`] from inside this pod (connected socket: the reply must come from
    /// `addr`).
    pub fn udp_request(
        &self,
        addr: SocketAddrV4,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<String> {
        self.in_netns(|| net::udp_request(addr, payload, timeout))
            .map_err(io::Error::other)?
    }

    /// A TCP connection from this pod, usable from any thread; `timeout` bounds the connect and
    /// becomes the read/write timeout. Use [`net::stream_request`] for lockstep requests.
    pub fn tcp_connect(&self, addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
        self.in_netns(|| net::tcp_connect(addr, timeout))
            .map_err(io::Error::other)?
    }
}

/// Removes labs whose owning process is gone, and with `include_kept` also labs kept by
/// [`Lab::keep`]; restores the host sysctls if no lab is left. Returns the prefixes removed.
pub fn cleanup_labs(include_kept: bool) -> Result<Vec<String>> {
    let reg = Registry::lock()?;
    let removed = reg.sweep(include_kept);
    reg.restore_host_sysctls_if_last()?;
    Ok(removed)
}

/// Removes one lab that is kept or whose owner is gone, by prefix (`tp1a2`); refuses a lab
/// still owned by a live process. Restores the host sysctls if no lab is left.
pub fn destroy_lab(prefix: &str) -> Result<()> {
    let slot = prefix
        .strip_prefix("tp")
        .filter(|s| s.len() == 3)
        .and_then(|s| u16::from_str_radix(s, 16).ok())
        .with_context(|| format!("{prefix:?} is not a lab prefix (tpXXX)"))?;
    let reg = Registry::lock()?;
    if !reg.slot_path(slot).exists() {
        bail!("no lab {prefix} is registered");
    }
    if matches!(reg.slot_state(slot), SlotState::Live) {
        bail!("lab {prefix} belongs to a running process");
    }
    let errors = remove_prefix_resources(prefix);
    if !errors.is_empty() {
        bail!("removing lab {prefix}: {}", errors.join("; "));
    }
    fs::remove_file(reg.slot_path(slot))?;
    reg.restore_host_sysctls_if_last()
}

/// Prefixes of the labs currently registered (live, kept or dead).
pub fn registered_labs() -> Result<Vec<String>> {
    let reg = Registry::lock()?;
    Ok(reg.slots()?.into_iter().map(prefix_of).collect())
}

fn prefix_of(slot: u16) -> String {
    format!("tp{slot:03x}")
}

fn subnet_of(slot: u16) -> Ipv4Addr {
    Ipv4Addr::new(10, 240 + (slot >> 8) as u8, (slot & 0xff) as u8, 0)
}

fn read_trimmed(path: &str) -> Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

/// `52:54:00:12:34:56` -> bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {s:?}");
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s:?}"))?;
    }
    Ok(mac)
}

/// `(ifindex, mac)` of `dev` in `netns` (or the root namespace).
pub fn link_info(netns: Option<&str>, dev: &str) -> Result<(u32, [u8; 6])> {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-j", "link", "show", "dev", dev]);
    let out = ip(&args)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j link")?;
    let link = v.get(0).context("ip -j link: empty")?;
    let ifindex = link["ifindex"].as_u64().context("ip -j link: no ifindex")? as u32;
    let mac = parse_mac(link["address"].as_str().context("ip -j link: no address")?)?;
    Ok((ifindex, mac))
}

fn names_with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Namespaces (`/run/netns`) and root-namespace links whose names start with `<prefix>-`.
pub fn lab_resources(prefix: &str) -> (Vec<String>, Vec<String>) {
    let p = format!("{prefix}-");
    (
        names_with_prefix(RUN_NETNS, &p),
        names_with_prefix(SYS_CLASS_NET, &p),
    )
}

/// Kills the processes in, and deletes, every namespace and root link named `<prefix>-*`.
/// Returns what failed (empty when everything is gone).
fn remove_prefix_resources(prefix: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let (netns, links) = lab_resources(prefix);
    if netns.is_empty() && links.is_empty() {
        return errors;
    }
    for ns in &netns {
        if let Err(e) = kill_netns_processes(&Path::new(RUN_NETNS).join(ns), KILL_GRACE)
            && e.kind() != io::ErrorKind::NotFound
        {
            errors.push(format!("killing processes in {ns}: {e}"));
        }
    }
    let mut script = String::new();
    for l in &links {
        script.push_str(&format!("link del {l}\n"));
    }
    for ns in &netns {
        script.push_str(&format!("netns del {ns}\n"));
    }
    // Failures (e.g. a link that vanished with its namespace) show up in the re-check below.
    let _ = ip_batch(None, true, &script);
    let (netns, links) = lab_resources(prefix);
    if !netns.is_empty() || !links.is_empty() {
        errors.push(format!("left behind: netns {netns:?}, links {links:?}"));
    }
    errors
}

/// The registry directory, locked (exclusive `flock`) for as long as this value lives.
struct Registry {
    dir: PathBuf,
    _lock: File,
}

enum SlotState {
    Live,
    Kept,
    Dead,
}

impl Registry {
    fn lock() -> Result<Registry> {
        let dir = PathBuf::from(REGISTRY_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("creating {REGISTRY_DIR}"))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .context("opening the lab registry lock")?;
        loop {
            // SAFETY: plain syscall on a valid fd; released when the file is closed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).context("locking the lab registry");
            }
        }
        Ok(Registry { dir, _lock: file })
    }

    fn slot_path(&self, slot: u16) -> PathBuf {
        self.dir.join(format!("slot-{slot:03x}"))
    }

    fn slots(&self) -> Result<Vec<u16>> {
        let mut v: Vec<u16> = fs::read_dir(&self.dir)?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                u16::from_str_radix(name.strip_prefix("slot-")?, 16).ok()
            })
            .filter(|&s| s < SLOTS)
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn slot_state(&self, slot: u16) -> SlotState {
        let Ok(text) = fs::read_to_string(self.slot_path(slot)) else {
            return SlotState::Dead;
        };
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        if field("kept").as_deref() == Some("1") {
            return SlotState::Kept;
        }
        let pid: Option<i32> = field("pid").and_then(|p| p.parse().ok());
        let start: Option<u64> = field("start").and_then(|s| s.parse().ok());
        match (pid, start) {
            (Some(pid), Some(start)) if process_start_time(pid) == Some(start) => SlotState::Live,
            _ => SlotState::Dead,
        }
    }

    fn write_slot(&self, slot: u16, hint: &str, kept: bool) -> Result<()> {
        let pid = std::process::id() as i32;
        let start = process_start_time(pid).unwrap_or(0);
        fs::write(
            self.slot_path(slot),
            format!(
                "pid={pid} start={start} kept={} hint={hint}\n",
                u8::from(kept)
            ),
        )
        .context("writing lab reservation")
    }

    /// Picks a free slot, starting at a point derived from pid, a counter and the clock.
    fn reserve(&self, hint: &str) -> Result<u16> {
        let count = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seed = std::process::id()
            .wrapping_mul(0x9e37_79b1)
            .wrapping_add(count.wrapping_mul(0x85eb_ca6b))
            ^ nanos;
        let start = (seed % u32::from(SLOTS)) as u16;
        for i in 0..SLOTS {
            let slot = (start + i) % SLOTS;
            if !self.slot_path(slot).exists() {
                self.write_slot(slot, hint, false)?;
                return Ok(slot);
            }
        }
        bail!("all {SLOTS} lab slots are taken (see {REGISTRY_DIR})")
    }

    /// Removes dead labs (and kept ones if asked); returns their prefixes.
    fn sweep(&self, include_kept: bool) -> Vec<String> {
        let mut removed = Vec::new();
        for slot in self.slots().unwrap_or_default() {
            let remove = match self.slot_state(slot) {
                SlotState::Live => false,
                SlotState::Kept => include_kept,
                SlotState::Dead => true,
            };
            if !remove {
                continue;
            }
            let prefix = prefix_of(slot);
            let errors = remove_prefix_resources(&prefix);
            if errors.is_empty() {
                let _ = fs::remove_file(self.slot_path(slot));
                removed.push(prefix);
            } else {
                eprintln!("tapestry lab {prefix}: sweeping: {}", errors.join("; "));
            }
        }
        removed
    }

    fn apply_host_sysctls(&self) -> Result<()> {
        let saved = self.dir.join(SAVED_SYSCTLS);
        if !saved.exists() {
            let mut text = String::new();
            for key in HOST_SYSCTLS {
                let v = fs::read_to_string(sysctl_path(key))
                    .with_context(|| format!("reading {key}"))?;
                text.push_str(&format!("{key}={}\n", v.trim()));
            }
            fs::write(&saved, text).context("saving host sysctls")?;
        }
        for key in HOST_SYSCTLS {
            fs::write(sysctl_path(key), "1").with_context(|| format!("setting {key}=1"))?;
        }
        // Lab addresses never leave the machine: pods have /32 routes, which win; a VIP the
        // datapath did not rewrite (a bug, or nothing attached) hits this instead of the host's
        // default route.
        ip(&[
            "route",
            "replace",
            "unreachable",
            LAB_SUPERNET,
            "metric",
            "4242",
        ])?;
        Ok(())
    }

    fn restore_host_sysctls_if_last(&self) -> Result<()> {
        let others = self
            .slots()?
            .into_iter()
            .any(|s| matches!(self.slot_state(s), SlotState::Live | SlotState::Kept));
        let saved = self.dir.join(SAVED_SYSCTLS);
        if others || !saved.exists() {
            return Ok(());
        }
        let _ = ip(&[
            "route",
            "del",
            "unreachable",
            LAB_SUPERNET,
            "metric",
            "4242",
        ]);
        let text = fs::read_to_string(&saved)?;
        for line in text.lines() {
            if let Some((key, value)) = line.split_once('=') {
                fs::write(sysctl_path(key), value)
                    .with_context(|| format!("restoring {key}={value}"))?;
            }
        }
        fs::remove_file(&saved)?;
        Ok(())
    }
}

/// Start time (clock ticks since boot) of a process, to tell a live owner from a reused pid.
fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after the command name start at field 3 (state); starttime is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The VM network the end-to-end tests create VM pods with: the reference `ptp` + `host-local`
/// (routed, like the lab's pods; addresses .100-.120 of the lab's pod subnet, IPAM state in
/// `ipam_dir`), then `tapestry-cni` for VMs talking to the daemon at `socket`.
pub fn vm_conflist(lab: &Lab, socket: &Path, ipam_dir: &Path) -> serde_json::Value {
    let (net, _) = lab.pod_cidr();
    let o = net.octets();
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "vms",
        "plugins": [
            {"type": "ptp", "ipMasq": false, "mtu": 1500, "ipam": {
                "type": "host-local", "dataDir": ipam_dir,
                "ranges": [[{"subnet": format!("{net}/25"),
                             "rangeStart": format!("{}.{}.{}.100", o[0], o[1], o[2]),
                             "rangeEnd": format!("{}.{}.{}.120", o[0], o[1], o[2]),
                             "gateway": format!("{}.{}.{}.1", o[0], o[1], o[2])}]],
                "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "tapestry-cni", "socket": socket, "vm": {"enabled": true}},
        ],
    })
}
