//! Real QEMU guests (software emulation) attached to a pod's `tap0`, for tests and the demo.
//!
//! The guest is a stock Debian cloud kernel with a busybox initramfs built by
//! `scripts/build-guest.sh` into `~/.cache/tapestry/guest/<kernel-version>/` (`$TAPESTRY_CACHE`
//! replaces `~/.cache/tapestry`; `current` points at the version to boot). Its `/init`
//! (`tests/guest/init`) loads the virtio modules, configures `eth0` by DHCP (busybox `udhcpc`)
//! or statically from the kernel command line, serves the lab's name protocol ([`crate::net`])
//! on TCP 8080 (busybox `nc -ll -e`) and UDP 5353 (a small static C program), prints
//! `TAPESTRY-READY` and keeps a root shell on the serial console.
//!
//! ```no_run
//! use std::time::Duration;
//! use tapestry_tests::guest::{Guest, GuestConfig};
//! # fn f(pod: &tapestry_tests::Pod) -> anyhow::Result<()> {
//! // The tap must exist in the pod (the CNI plugin creates it).
//! let mut vm = Guest::boot(pod, GuestConfig::new("vm-a", pod.mac))?;
//! vm.wait_ready(Duration::from_secs(30))?; // retries once if the kernel never came up
//! let lease = vm.dhcp_lease().expect("a lease");
//! let addrs = vm.console("ip -o addr show eth0", Duration::from_secs(5))?;
//! # let _ = (lease, addrs);
//! # Ok(()) }
//! ```
//!
//! QEMU runs inside the pod's network namespace (`setns` before exec, like [`Pod::spawn`]),
//! with its files in a work directory under [`RUN_DIR`]: `console.sock` (the serial console,
//! a socket QEMU waits on before starting the guest so no output is lost), `console.log`
//! (everything the guest printed, every boot attempt), `monitor.sock` (HMP, [`Guest::monitor`]),
//! `qemu.pid`, `qemu.log` (QEMU's own stdout/stderr). Dropping a [`Guest`] kills QEMU and removes
//! the directory; [`Guest::keep`] leaves both (the demo), and [`kill_pidfile`] or the next
//! [`Guest::boot`] after the owning process died (a stale-directory sweep) removes them.
//!
//! # Live migration
//!
//! QEMU's own live migration moves a running guest to another pod (another netns and `tap0`):
//!
//! ```no_run
//! # use std::time::Duration;
//! # use tapestry_tests::guest::{Guest, GuestConfig};
//! # fn f(a: &tapestry_tests::Pod, b: &tapestry_tests::Pod, vm: Guest) -> anyhow::Result<()> {
//! // The same config (MAC above all) on the target; it listens, nothing boots.
//! let target = Guest::boot_incoming(b, vm.config().clone())?;
//! let info = vm.migrate_to(&target, Duration::from_secs(120))?; // start + wait + target runs
//! # let _ = (a, info.downtime_ms);
//! drop(vm); // the source's QEMU is paused (postmigrate) for good; this frees a's tap
//! target.console("cat /proc/uptime", Duration::from_secs(5))?; // the same guest, in b
//! # Ok(()) }
//! ```
//!
//! - [`Guest::boot_incoming`] / [`Guest::boot_incoming_in`]: the command line of
//!   [`Guest::boot`] plus `-incoming defer`, then `migrate_incoming unix:<dir>/migrate.sock`
//!   ([`Guest::migration_socket`]). Its console socket and `console.log` are its own and carry
//!   the guest's serial output from the switch-over on; [`Guest::console`] first waits for the
//!   switch-over ([`Guest::wait_incoming`]); [`Guest::wait_ready`] refuses (it never boots).
//! - On the source: [`Guest::start_migration`] (`migrate -d unix:..`),
//!   [`Guest::migration_status`] (`info migrate` parsed into a [`MigrationInfo`]),
//!   [`Guest::wait_migration`] (until `completed`; `failed` / `cancelled` are errors),
//!   [`Guest::migrate_to`] (all three), [`Guest::cancel_migration`] (`migrate_cancel`),
//!   [`Guest::set_migration_speed`] (`max-bandwidth` in bytes/s: a slow migration to cancel),
//!   [`Guest::vm_status`] (`info status`).
//! - After a completed migration the source's console refuses; drop it (its QEMU holds its
//!   pod's tap until then). A cancelled or failed migration leaves the source running and makes
//!   the target's QEMU exit; the target is dropped like any guest.
//! - The target's console log starts at the switch-over, so a DHCP guest's target has no
//!   [`Guest::dhcp_lease`] (the source's console has it); a static address carries over in
//!   the config.
//! - The target announces the guest on its tap right as it starts running (measured: the first
//!   frame 0-45 ms before [`Guest::migrate_to`] returns): QEMU's RARP frames from the NIC's MAC
//!   (`announce-rounds`, 5 by default, at +0, 50, 200, 450, 800 ms) and as many gratuitous ARPs
//!   from the guest kernel (virtio-net's guest announce).

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::Pod;

/// Parent of the guests' work directories (short: unix socket paths are limited to 108 bytes).
pub const RUN_DIR: &str = "/run/tapestry-guest";
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// TCP port of the guest's name server.
pub const GUEST_TCP_PORT: u16 = 8080;
/// UDP port of the guest's name server.
pub const GUEST_UDP_PORT: u16 = 5353;
/// Longest command [`Guest::console`] types (busybox ash's line editor keeps 1024 bytes).
pub const MAX_CONSOLE_CMD: usize = 900;

const READY: &str = "TAPESTRY-READY";
const BOOTED: &str = "TAPESTRY-BOOT";
const DHCP: &str = "TAPESTRY-DHCP ";
const PROMPT: &str = "guest# ";
/// Per monitor command of the migration calls.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two `info migrate` / `info status` polls.
const MIGRATION_POLL: Duration = Duration::from_millis(50);

static GUEST_COUNTER: AtomicU32 = AtomicU32::new(0);
static MARKER_COUNTER: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Artifacts and prerequisites

/// `$TAPESTRY_CACHE`, or `~/.cache/tapestry` (the cache `scripts/setup.sh` uses).
pub fn cache_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("TAPESTRY_CACHE") {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/tapestry")
}

/// The kernel and initramfs built by `scripts/build-guest.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestArtifacts {
    /// Kernel version, the cache key (`6.1.0-56-cloud-amd64`).
    pub version: String,
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl GuestArtifacts {
    /// `$TAPESTRY_GUEST_DIR` if set (a directory with `vmlinuz` and [`INITRAMFS`]), else
    /// `<cache>/guest/current`. The error says to run `scripts/build-guest.sh`.
    pub fn locate() -> Result<GuestArtifacts> {
        let dir = match std::env::var_os("TAPESTRY_GUEST_DIR") {
            Some(d) => PathBuf::from(d),
            None => cache_dir().join("guest/current"),
        };
        let real = fs::canonicalize(&dir).map_err(|e| {
            anyhow!(
                "guest artifacts not found at {} ({e}): run scripts/build-guest.sh",
                dir.display()
            )
        })?;
        let kernel = real.join("vmlinuz");
        let initrd = real.join(INITRAMFS);
        for f in [&kernel, &initrd] {
            if !f.is_file() {
                bail!("{} is missing: run scripts/build-guest.sh", f.display());
            }
        }
        let version = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(GuestArtifacts {
            version,
            dir: real,
            kernel,
            initrd,
        })
    }

    /// Sources in this checkout's `tests/guest/` that differ from the copy the initramfs was
    /// built from (`<dir>/src-<rev>/`): non-empty means `scripts/build-guest.sh` must run again.
    pub fn stale_sources(&self) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
        if !src.is_dir() {
            return Vec::new();
        }
        GUEST_SOURCES
            .iter()
            .filter(|f| {
                let want = fs::read(src.join(f)).ok();
                let built = self.dir.join(format!("src-{INITRAMFS_REV}")).join(f);
                want.is_none() || want != fs::read(built).ok()
            })
            .map(|f| format!("tests/guest/{f}"))
            .collect()
    }
}

/// The initramfs revision `scripts/build-guest.sh` builds (its `REV`): bumped when the guest
/// gains or loses a program, so that checkouts of two revisions sharing the cache do not
/// rebuild each other's.
pub const INITRAMFS_REV: u32 = 2;
/// The initramfs file in the guest directory.
pub const INITRAMFS: &str = "initramfs-2.cpio.gz";

/// Files of `tests/guest/` packed into the initramfs.
const GUEST_SOURCES: [&str; 5] = [
    "init",
    "udhcpc.script",
    "tcp-name",
    "udp-name.c",
    "raw-send.c",
];

/// Checks what a guest needs besides root: `qemu-system-x86_64` runnable, `/dev/net/tun`, and
/// the artifacts of `scripts/build-guest.sh`. The error names everything missing.
pub fn require_qemu() -> Result<GuestArtifacts, String> {
    let mut missing = Vec::new();
    let qemu_ok = Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !qemu_ok {
        missing.push(format!(
            "{QEMU} (apt-get install --no-install-recommends qemu-system-x86; scripts/setup.sh)"
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_string());
    }
    let artifacts = match GuestArtifacts::locate() {
        Ok(a) => {
            let stale = a.stale_sources();
            if !stale.is_empty() {
                missing.push(format!(
                    "an initramfs built from the current {} (it is stale): run \
                     scripts/build-guest.sh",
                    stale.join(", ")
                ));
            }
            Some(a)
        }
        Err(e) => {
            missing.push(format!("{e:#}"));
            None
        }
    };
    match artifacts {
        Some(a) if missing.is_empty() => Ok(a),
        _ => Err(format!(
            "missing guest prerequisite: {}",
            missing.join("; ")
        )),
    }
}

/// The policy behind [`require_qemu!`](crate::require_qemu): `true` when [`require_qemu`]
/// passes; otherwise panics under `CI=...`, or prints `skipped: <why>` and returns `false`.
pub fn qemu_available() -> bool {
    crate::prereq::available("guest", require_qemu())
}

/// After [`require_lab!`](crate::require_lab) in a test that boots guests: returns early
/// (skip) or panics under `CI=...` when QEMU, `/dev/net/tun` or the guest artifacts
/// (`scripts/build-guest.sh`) are missing.
#[macro_export]
macro_rules! require_qemu {
    () => {
        if !$crate::guest::qemu_available() {
            return;
        }
    };
    ($ret:expr) => {
        if !$crate::guest::qemu_available() {
            return $ret;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Configuration and lease

/// How the guest configures `eth0` (kernel command line `tapestry.net=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestNet {
    /// busybox `udhcpc` until a lease comes (the daemon's DHCP server, or a test's `udhcpd`).
    Dhcp,
    /// `addr/prefix` on eth0 and, with a gateway, `default via gateway onlink`.
    Static {
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
    },
    /// eth0 up without an address.
    None,
}

impl GuestNet {
    fn append(&self) -> String {
        match self {
            GuestNet::Dhcp => "tapestry.net=dhcp".into(),
            GuestNet::Static {
                addr,
                prefix,
                gateway: Some(gw),
            } => format!("tapestry.net=static:{addr}/{prefix}:{gw}"),
            GuestNet::Static {
                addr,
                prefix,
                gateway: None,
            } => format!("tapestry.net=static:{addr}/{prefix}"),
            GuestNet::None => "tapestry.net=none".into(),
        }
    }
}

/// What to boot. [`GuestConfig::new`] fills the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// The guest's name: what its TCP/UDP servers answer (`tapestry.name=`), `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The tap in the pod's namespace (created by the CNI plugin, or by the test).
    pub tap: String,
    /// The guest NIC's MAC: the pod's `eth0` MAC in the real datapath.
    pub mac: [u8; 6],
    pub mem_mb: u32,
    pub net: GuestNet,
    /// Appended to the kernel command line, e.g. `tapestry.mtu=1400` (static mode).
    pub extra_append: String,
}

impl GuestConfig {
    /// `tap0`, 128 MB, DHCP, nothing extra.
    pub fn new(name: &str, mac: [u8; 6]) -> GuestConfig {
        GuestConfig {
            name: name.to_string(),
            tap: "tap0".into(),
            mac,
            mem_mb: 128,
            net: GuestNet::Dhcp,
            extra_append: String::new(),
        }
    }

    /// Same, with a static address.
    pub fn with_static(mut self, addr: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>) -> Self {
        self.net = GuestNet::Static {
            addr,
            prefix,
            gateway,
        };
        self
    }

    /// The kernel command line QEMU gets. `no_timer_check`: under TCG on a loaded host the
    /// kernel's check that the IO-APIC delivers timer interrupts can time out, and it panics
    /// ("IO-APIC + timer doesn't work!") before /init.
    pub fn append(&self) -> String {
        let mut s = format!(
            "console=ttyS0 quiet panic=-1 no_timer_check tapestry.name={} {}",
            self.name,
            self.net.append()
        );
        if !self.extra_append.trim().is_empty() {
            s.push(' ');
            s.push_str(self.extra_append.trim());
        }
        s
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("guest name {:?}: use 1-63 of [A-Za-z0-9_.-]", self.name);
        }
        if self.tap.is_empty() || self.tap.len() > 15 || self.tap.contains([',', '/', ' ']) {
            bail!("tap name {:?} is not an interface name", self.tap);
        }
        if self.mac[0] & 1 != 0 {
            bail!("guest MAC {} is multicast", fmt_mac(&self.mac));
        }
        if self.mem_mb < 64 {
            bail!("the guest needs at least 64 MB ({} asked)", self.mem_mb);
        }
        if self.extra_append.contains('"') {
            bail!("extra_append must not contain quotes");
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    let p: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    p.join(":")
}

/// The lease the guest applied, parsed from its `TAPESTRY-DHCP` console line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// Prefix length from the subnet option (32 without one).
    pub prefix: u8,
    /// First router (option 3).
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 26 as offered.
    pub mtu: Option<u32>,
    /// eth0's MTU after the lease was applied.
    pub link_mtu: Option<u32>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Option 15.
    pub domain: Option<String>,
    /// Server identifier (option 54).
    pub server: Option<Ipv4Addr>,
    /// Lease time in seconds (option 51).
    pub lease_secs: Option<u32>,
    /// Classless static routes (option 121): (destination, prefix, gateway).
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
}

impl Lease {
    /// Parses `TAPESTRY-DHCP ip=.. mask=.. ...` (the prefix may be absent). `None` without a
    /// valid `ip=`.
    pub fn parse(line: &str) -> Option<Lease> {
        let line = line.trim();
        let line = line.strip_prefix(DHCP.trim_end()).unwrap_or(line);
        let mut l = Lease {
            ip: Ipv4Addr::UNSPECIFIED,
            prefix: 32,
            router: None,
            dns: Vec::new(),
            mtu: None,
            link_mtu: None,
            hostname: None,
            domain: None,
            server: None,
            lease_secs: None,
            routes: Vec::new(),
        };
        let mut have_ip = false;
        for tok in line.split_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            let nonempty = (!v.is_empty()).then(|| v.to_string());
            match k {
                "ip" => {
                    l.ip = v.parse().ok()?;
                    have_ip = true;
                }
                "mask" => l.prefix = v.parse().ok().filter(|p| *p <= 32).unwrap_or(32),
                "router" => l.router = v.parse().ok(),
                "dns" => l.dns = v.split(',').filter_map(|d| d.parse().ok()).collect(),
                "mtu" => l.mtu = v.parse().ok(),
                "link_mtu" => l.link_mtu = v.parse().ok(),
                "hostname" => l.hostname = nonempty,
                "domain" => l.domain = nonempty,
                "server" => l.server = v.parse().ok(),
                "lease" => l.lease_secs = v.parse().ok(),
                "routes" => {
                    let parts: Vec<&str> = v.split(',').filter(|s| !s.is_empty()).collect();
                    for pair in parts.chunks(2) {
                        let [dst, gw] = pair else { continue };
                        let (d, p) = dst.split_once('/').unwrap_or((dst, "32"));
                        if let (Ok(d), Ok(p), Ok(gw)) = (d.parse(), p.parse(), gw.parse()) {
                            l.routes.push((d, p, gw));
                        }
                    }
                }
                _ => {}
            }
        }
        have_ip.then_some(l)
    }
}

// ---------------------------------------------------------------------------------------------
// The console buffer

/// Everything the guest wrote to its serial console, filled by a reader thread.
#[derive(Debug, Default)]
struct ConsoleBuf {
    state: Mutex<ConsoleState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct ConsoleState {
    /// Console output with `\r` removed.
    data: Vec<u8>,
    /// The connection ended (QEMU exited).
    eof: bool,
}

enum Wait {
    /// Found; byte offset just after the match.
    Found(usize),
    Eof,
    Timeout,
}

impl ConsoleBuf {
    fn push(&self, bytes: &[u8]) {
        let mut st = lock(&self.state);
        st.data
            .extend(bytes.iter().copied().filter(|&b| b != b'\r'));
        self.cond.notify_all();
    }

    fn close(&self) {
        lock(&self.state).eof = true;
        self.cond.notify_all();
    }

    fn len(&self) -> usize {
        lock(&self.state).data.len()
    }

    fn is_closed(&self) -> bool {
        lock(&self.state).eof
    }

    fn bytes_from(&self, from: usize) -> Vec<u8> {
        let st = lock(&self.state);
        st.data[from.min(st.data.len())..].to_vec()
    }

    fn text_from(&self, from: usize) -> String {
        String::from_utf8_lossy(&self.bytes_from(from)).into_owned()
    }

    /// Waits until `pred(data[from..])` returns `Some(end)` (an offset relative to `from`).
    fn wait_until(
        &self,
        from: usize,
        deadline: Instant,
        mut pred: impl FnMut(&[u8]) -> Option<usize>,
    ) -> Wait {
        let mut st = lock(&self.state);
        loop {
            let start = from.min(st.data.len());
            if let Some(end) = pred(&st.data[start..]) {
                return Wait::Found(start + end);
            }
            if st.eof {
                return Wait::Eof;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wait::Timeout;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn wait_for(&self, from: usize, needle: &str, deadline: Instant) -> Wait {
        let n = needle.as_bytes();
        self.wait_until(from, deadline, |d| find(d, n).map(|i| i + n.len()))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Live migration reports

/// A migration's state, as `info migrate` names it (`Migration status: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration yet: `info migrate` has no status line.
    None,
    Setup,
    Active,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    /// Any other state QEMU names (`pre-switchover`, `device`, `postcopy-active`, ...).
    Other(String),
}

impl MigrationStatus {
    fn parse(s: &str) -> MigrationStatus {
        match s {
            "none" => MigrationStatus::None,
            "setup" => MigrationStatus::Setup,
            "active" => MigrationStatus::Active,
            "completed" => MigrationStatus::Completed,
            "failed" => MigrationStatus::Failed,
            "cancelling" => MigrationStatus::Cancelling,
            "cancelled" => MigrationStatus::Cancelled,
            other => MigrationStatus::Other(other.to_string()),
        }
    }

    /// QEMU's name for it.
    pub fn as_str(&self) -> &str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Other(s) => s,
        }
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `info migrate` report of the source, as QEMU 7.2 prints it (`Migration status:
/// completed`, `total time: 606 ms`, `downtime: 50 ms`, `setup: 1 ms`, `transferred ram: 90679
/// kbytes`, ...). A field QEMU did not print is `None`: `downtime` comes only once completed,
/// `expected downtime` only while active; failed and cancelled reports have `total time: 0 ms`
/// and no more.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// Why it failed: what QEMU puts in parentheses after `failed`.
    pub error: Option<String>,
    pub total_time_ms: Option<u64>,
    /// How long the guest was stopped for the switch-over (completed).
    pub downtime_ms: Option<u64>,
    /// QEMU's estimate of it (active).
    pub expected_downtime_ms: Option<u64>,
    pub setup_ms: Option<u64>,
    /// `transferred ram`, KiB.
    pub transferred_kib: Option<u64>,
    /// `remaining ram`, KiB.
    pub remaining_kib: Option<u64>,
    /// `total ram`, KiB.
    pub total_kib: Option<u64>,
    /// `throughput`, Mbit/s.
    pub throughput_mbps: Option<f64>,
    /// The whole report.
    pub raw: String,
}

impl MigrationInfo {
    /// Parses the text of HMP `info migrate` (lines of `key: value`).
    pub fn parse(text: &str) -> MigrationInfo {
        let mut info = MigrationInfo {
            status: MigrationStatus::None,
            error: None,
            total_time_ms: None,
            downtime_ms: None,
            expected_downtime_ms: None,
            setup_ms: None,
            transferred_kib: None,
            remaining_kib: None,
            total_kib: None,
            throughput_mbps: None,
            raw: text.to_string(),
        };
        // `606 ms`, `90679 kbytes`: the number, if the unit is the expected one.
        let num = |v: &str, unit: &str| -> Option<u64> {
            let (n, u) = v.split_once(' ')?;
            (u.trim() == unit).then(|| n.parse().ok()).flatten()
        };
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once(": ") else {
                continue;
            };
            let v = v.trim();
            match k {
                "Migration status" => {
                    let (st, why) = match v.split_once(" (") {
                        Some((st, why)) => (st, Some(why.strip_suffix(')').unwrap_or(why))),
                        None => (v, None),
                    };
                    info.status = MigrationStatus::parse(st);
                    info.error = why.map(str::to_string);
                }
                "total time" => info.total_time_ms = num(v, "ms"),
                "downtime" => info.downtime_ms = num(v, "ms"),
                "expected downtime" => info.expected_downtime_ms = num(v, "ms"),
                "setup" => info.setup_ms = num(v, "ms"),
                "transferred ram" => info.transferred_kib = num(v, "kbytes"),
                "remaining ram" => info.remaining_kib = num(v, "kbytes"),
                "total ram" => info.total_kib = num(v, "kbytes"),
                "throughput" => {
                    info.throughput_mbps = v.strip_suffix(" mbps").and_then(|n| n.parse().ok())
                }
                _ => {}
            }
        }
        info
    }

    /// `completed in 606 ms (downtime 50 ms)`, `failed (Unable to write to socket: Broken
    /// pipe)`, `active, 2503 of 131592 KiB sent`: for messages.
    pub fn describe(&self) -> String {
        let mut s = self.status.to_string();
        if let Some(e) = &self.error {
            s.push_str(&format!(" ({e})"));
        }
        match self.status {
            MigrationStatus::Completed => {
                if let Some(t) = self.total_time_ms {
                    s.push_str(&format!(" in {t} ms"));
                }
                if let Some(d) = self.downtime_ms {
                    s.push_str(&format!(" (downtime {d} ms)"));
                }
            }
            MigrationStatus::Failed | MigrationStatus::Cancelled | MigrationStatus::None => {}
            _ => {
                if let (Some(t), Some(a)) = (self.transferred_kib, self.total_kib) {
                    s.push_str(&format!(", {t} of {a} KiB sent"));
                }
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The guest

/// One QEMU process for a [`Guest`] (a retry replaces it).
struct Instance {
    child: Child,
    writer: Mutex<UnixStream>,
    reader: Option<JoinHandle<()>>,
    started: Instant,
    /// Console offset where this instance's output starts.
    console_start: usize,
}

/// A QEMU guest on a tap in a network namespace. Killed on drop.
pub struct Guest {
    cfg: GuestConfig,
    netns_path: PathBuf,
    artifacts: GuestArtifacts,
    dir: PathBuf,
    console: Arc<ConsoleBuf>,
    inst: Option<Instance>,
    attempts: u32,
    boot_time: Option<Duration>,
    /// Console offset just after `TAPESTRY-READY` of the current instance.
    ready_offset: Option<usize>,
    prompt_seen: AtomicBool,
    console_lock: Mutex<()>,
    kept: bool,
    /// Started by [`Guest::boot_incoming`]: QEMU waits for a migration instead of booting.
    incoming: bool,
    /// An incoming guest's migration has landed (its VM ran).
    landed: AtomicBool,
    /// A migration from this guest completed: its VM is paused for good (postmigrate).
    migrated_away: AtomicBool,
}

impl fmt::Debug for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guest")
            .field("name", &self.cfg.name)
            .field("netns", &self.netns_path)
            .field("dir", &self.dir)
            .field("pid", &self.pid())
            .field("attempts", &self.attempts)
            .field("boot_time", &self.boot_time)
            .field("incoming", &self.incoming)
            .finish()
    }
}

impl Guest {
    /// Starts QEMU inside `pod`'s namespace on `cfg.tap` (which must exist) and returns at once;
    /// call [`Guest::wait_ready`]. Needs root.
    pub fn boot(pod: &Pod, cfg: GuestConfig) -> Result<Guest> {
        Guest::boot_in(&pod.netns_path, cfg)
    }

    /// [`Guest::boot`] in the namespace at `netns_path` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn boot_in(netns_path: &Path, cfg: GuestConfig) -> Result<Guest> {
        Guest::spawn(netns_path, cfg, false)
    }

    /// Starts the QEMU that receives a live migration, inside `pod`'s namespace on `cfg.tap`:
    /// the command line of [`Guest::boot`] for the same `cfg` (pass the source's, its MAC
    /// above all) with `-incoming defer`, then `migrate_incoming unix:<dir>/migrate.sock` on the
    /// monitor, so [`Guest::migration_socket`] listens when this returns. Nothing boots: the
    /// source's [`Guest::migrate_to`] brings the running guest here, and from then on
    /// [`Guest::console`] types into it (it waits for the switch-over first). The tap must be
    /// free: a source in the same pod holds it until dropped.
    pub fn boot_incoming(pod: &Pod, cfg: GuestConfig) -> Result<Guest> {
        Guest::boot_incoming_in(&pod.netns_path, cfg)
    }

    /// [`Guest::boot_incoming`] in the namespace at `netns_path`.
    pub fn boot_incoming_in(netns_path: &Path, cfg: GuestConfig) -> Result<Guest> {
        let g = Guest::spawn(netns_path, cfg, true)?;
        let sock = g.migration_socket();
        g.hmp(&format!("migrate_incoming unix:{}", sock.display()))
            .context("listening for the incoming migration")?;
        if !sock.exists() {
            bail!("migrate_incoming left no socket at {}", sock.display());
        }
        Ok(g)
    }

    /// A work directory and a QEMU instance, booting or (`incoming`) waiting for a migration.
    fn spawn(netns_path: &Path, cfg: GuestConfig, incoming: bool) -> Result<Guest> {
        cfg.validate()?;
        let artifacts = GuestArtifacts::locate()?;
        sweep_stale();
        fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        let n = GUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut short: String = cfg.name.chars().take(24).collect();
        short.retain(|c| c != '/');
        let dir = Path::new(RUN_DIR).join(format!("{}-{n}-{short}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut g = Guest {
            cfg,
            netns_path: netns_path.to_path_buf(),
            artifacts,
            dir,
            console: Arc::default(),
            inst: None,
            attempts: 0,
            boot_time: None,
            ready_offset: None,
            prompt_seen: AtomicBool::new(false),
            console_lock: Mutex::new(()),
            kept: false,
            incoming,
            landed: AtomicBool::new(false),
            migrated_away: AtomicBool::new(false),
        };
        g.start()?;
        Ok(g)
    }

    /// [`Guest::boot`] + [`Guest::wait_ready`].
    pub fn boot_ready(pod: &Pod, cfg: GuestConfig, timeout: Duration) -> Result<Guest> {
        let mut g = Guest::boot(pod, cfg)?;
        g.wait_ready(timeout)?;
        Ok(g)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// The QEMU command line (without the namespace hook), the same for a guest that boots and
    /// one that receives it (`-incoming defer` added).
    fn qemu_command(&self) -> Command {
        let c = &self.cfg;
        let mut cmd = Command::new(QEMU);
        cmd.args(["-name", &c.name])
            .args(["-accel", "tcg,tb-size=32"])
            .args(["-M", "pc"])
            .args(["-m", &c.mem_mb.to_string()])
            .args(["-nodefaults", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.artifacts.kernel)
            .arg("-initrd")
            .arg(&self.artifacts.initrd)
            .args(["-append", &c.append()])
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                c.tap
            ))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={},romfile=",
                fmt_mac(&c.mac)
            ))
            // wait=on: QEMU starts the guest only once we are connected, so nothing is lost.
            .arg("-chardev")
            .arg(format!(
                "socket,id=con0,path={},server=on,wait=on,logfile={},logappend=on",
                self.path("console.sock").display(),
                self.path("console.log").display()
            ))
            .args(["-serial", "chardev:con0"])
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.path("monitor.sock").display()
            ))
            .arg("-pidfile")
            .arg(self.path("qemu.pid"));
        if self.incoming {
            // The listening address comes from the monitor (`migrate_incoming`), which answers
            // only once QEMU listens.
            cmd.args(["-incoming", "defer"]);
        }
        cmd
    }

    /// Spawns a QEMU instance and connects to its console.
    fn start(&mut self) -> Result<()> {
        for f in ["console.sock", "monitor.sock", "migrate.sock", "qemu.pid"] {
            let _ = fs::remove_file(self.path(f));
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.path("qemu.log"))
            .context("creating qemu.log")?;
        let mut cmd = self.qemu_command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        tapestry_netns::command_in(&mut cmd, &self.netns_path)?;
        self.attempts += 1;
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {QEMU} in {}", self.netns_path.display()))?;

        // QEMU creates the console socket and then waits for us.
        let sock = self.path("console.sock");
        let deadline = started + Duration::from_secs(20);
        let stream = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{QEMU} exited at start ({status}): {}",
                    self.qemu_log_tail()
                );
            }
            if sock.exists()
                && let Ok(s) = UnixStream::connect(&sock)
            {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{QEMU} did not open its console socket in 20 s: {}",
                    self.qemu_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let rd = stream.try_clone();
        let console = self.console.clone();
        let console_start = console.len();
        // A retry starts a fresh console stream (the previous reader, joined, marked EOF).
        lock(&console.state).eof = false;
        // From here on, an error leaves the instance to kill_instance (Drop).
        self.inst = Some(Instance {
            child,
            writer: Mutex::new(stream),
            reader: None,
            started,
            console_start,
        });
        self.ready_offset = None;
        self.prompt_seen.store(false, Ordering::Relaxed);
        self.boot_time = None;
        let mut rd = rd.context("cloning the console socket")?;
        let reader = std::thread::Builder::new()
            .name(format!("guest-{}", self.cfg.name))
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match rd.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => console.push(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
                console.close();
            })
            .context("spawning the console reader")?;
        if let Some(inst) = self.inst.as_mut() {
            inst.reader = Some(reader);
        }
        Ok(())
    }

    /// Waits up to `timeout` for `TAPESTRY-READY` (network configured, servers listening) and
    /// returns the boot time (QEMU spawn to ready). A boot whose kernel never reached `/init`
    /// (no `TAPESTRY-BOOT`, seen now and then under TCG) is killed and retried once, with a
    /// fresh `timeout`. A guest whose `/init` ran but did not get ready (no DHCP answer, say) or
    /// a QEMU that exited fails with the console's tail.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        if let Some(t) = self.boot_time {
            return Ok(t);
        }
        if self.incoming {
            bail!(
                "guest {} waits for an incoming migration and does not boot (see wait_incoming)",
                self.cfg.name
            );
        }
        loop {
            let inst = self.inst.as_ref().context("the guest was killed")?;
            let from = inst.console_start;
            let started = inst.started;
            let deadline = Instant::now() + timeout;
            match self.console.wait_for(from, READY, deadline) {
                Wait::Found(end) => {
                    // The whole line: "TAPESTRY-READY name=..\n".
                    let end = match self.console.wait_for(end, "\n", Instant::now() + timeout) {
                        Wait::Found(e) => e,
                        _ => end,
                    };
                    let t = started.elapsed();
                    self.ready_offset = Some(end);
                    self.boot_time = Some(t);
                    return Ok(t);
                }
                Wait::Eof => {
                    let status = self.reap();
                    bail!(
                        "guest {}: {QEMU} exited before ready ({status}); qemu: {}; console:\n{}",
                        self.cfg.name,
                        self.qemu_log_tail(),
                        self.console_tail_from(from, 30)
                    );
                }
                Wait::Timeout => {
                    let booted = self.console.text_from(from).contains(BOOTED);
                    if booted || self.attempts >= 2 {
                        bail!(
                            "guest {} not ready after {:?} (attempt {}, /init {}); console:\n{}",
                            self.cfg.name,
                            timeout,
                            self.attempts,
                            if booted { "ran" } else { "never ran" },
                            self.console_tail_from(from, 30)
                        );
                    }
                    eprintln!(
                        "guest {}: the kernel did not reach /init in {:?}; killing and retrying once",
                        self.cfg.name, timeout
                    );
                    self.kill_instance();
                    self.start()?;
                }
            }
        }
    }

    /// Boot time of the current instance (QEMU spawn to `TAPESTRY-READY`), once ready.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// QEMU processes started so far (2 after a retried boot).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn config(&self) -> &GuestConfig {
        &self.cfg
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The work directory (sockets, logs, pid file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the serial console socket (already connected by this `Guest`: QEMU takes one
    /// client at a time).
    pub fn console_socket(&self) -> PathBuf {
        self.path("console.sock")
    }

    /// Path of the HMP monitor socket (`-monitor unix:...,server,nowait`).
    pub fn monitor_socket(&self) -> PathBuf {
        self.path("monitor.sock")
    }

    /// QEMU's pid (from its pid file, else the child's).
    pub fn pid(&self) -> Option<i32> {
        let inst = self.inst.as_ref()?;
        read_pidfile(&self.path("qemu.pid")).or(Some(inst.child.id() as i32))
    }

    /// The lease from the last `TAPESTRY-DHCP` line on the console (DHCP mode, after ready).
    pub fn dhcp_lease(&self) -> Option<Lease> {
        let from = self.inst.as_ref().map_or(0, |i| i.console_start);
        let text = self.console.text_from(from);
        text.lines()
            .filter_map(|l| l.find(DHCP).map(|i| &l[i..]))
            .filter_map(Lease::parse)
            .next_back()
    }

    /// The guest's IPv4 address: the static one, or the DHCP lease's.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        match &self.cfg.net {
            GuestNet::Static { addr, .. } => Some(*addr),
            GuestNet::Dhcp => self.dhcp_lease().map(|l| l.ip),
            GuestNet::None => None,
        }
    }

    /// `ip:port` of the guest.
    pub fn addr(&self, port: u16) -> Option<SocketAddrV4> {
        self.ip().map(|ip| SocketAddrV4::new(ip, port))
    }

    /// Everything the guest printed since the current instance started (`\r` removed).
    pub fn console_log(&self) -> String {
        let from = self.inst.as_ref().map_or(0, |i| i.console_start);
        self.console.text_from(from)
    }

    /// Everything printed by every boot attempt.
    pub fn console_log_all(&self) -> String {
        self.console.text_from(0)
    }

    fn console_tail_from(&self, from: usize, lines: usize) -> String {
        let text = strip_ansi(&self.console.text_from(from));
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn qemu_log_tail(&self) -> String {
        let text = fs::read_to_string(self.path("qemu.log")).unwrap_or_default();
        let all: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("QEMU waiting for connection"))
            .collect();
        all[all.len().saturating_sub(10)..].join(" | ")
    }

    /// Runs `cmd` in the guest's root shell (stdin `/dev/null`, stderr merged) and returns its
    /// output; a non-zero exit status is an error carrying the output. Needs a ready guest.
    pub fn console(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let (rc, out) = self.console_status(cmd, timeout)?;
        if rc != 0 {
            bail!("guest {}: `{cmd}` exited with {rc}: {out}", self.cfg.name);
        }
        Ok(out)
    }

    /// [`Guest::console`] returning `(exit status, output)` whatever the status.
    ///
    /// The command is typed on the serial console between two echo markers whose typed form
    /// (`TPST-B''7`) differs from their output (`TPST-B7`), so the shell's echo of the input
    /// never matches. At most [`MAX_CONSOLE_CMD`] bytes. On timeout, Ctrl-C is sent.
    pub fn console_status(&self, cmd: &str, timeout: Duration) -> Result<(i32, String)> {
        if cmd.len() > MAX_CONSOLE_CMD {
            bail!("console command longer than {MAX_CONSOLE_CMD} bytes");
        }
        if cmd.contains(['\r', '\u{3}', '\u{4}']) {
            bail!("console command contains control characters");
        }
        let deadline = Instant::now() + timeout;
        if self.migrated_away.load(Ordering::Relaxed) {
            bail!(
                "guest {} migrated away: this QEMU is paused for good (drop it)",
                self.cfg.name
            );
        }
        let ready = if self.incoming {
            // The shell printed its prompt on the source; its state came with the migration.
            self.wait_incoming(timeout)?;
            self.prompt_seen.store(true, Ordering::Relaxed);
            self.inst
                .as_ref()
                .context("the guest was killed")?
                .console_start
        } else {
            match self.ready_offset {
                Some(r) => r,
                None => bail!("guest {} is not ready (call wait_ready)", self.cfg.name),
            }
        };
        let _serial = lock(&self.console_lock);
        if !self.prompt_seen.load(Ordering::Relaxed) {
            match self.console.wait_for(ready, PROMPT, deadline) {
                Wait::Found(_) => self.prompt_seen.store(true, Ordering::Relaxed),
                Wait::Eof => bail!("guest {}: QEMU exited", self.cfg.name),
                Wait::Timeout => bail!(
                    "guest {}: no shell prompt in {timeout:?}; console:\n{}",
                    self.cfg.name,
                    self.console_tail_from(ready, 20)
                ),
            }
        }
        let n = MARKER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let begin = format!("TPST-B{n}\n");
        let end = format!("TPST-E{n} rc=");
        let typed =
            format!("echo TPST-B''{n}; {{ {cmd}\n}} </dev/null 2>&1; echo TPST-E''{n} rc=$?\n");
        let from = self.console.len();
        self.write_console(typed.as_bytes())?;
        let (b, e) = (begin.as_bytes(), end.as_bytes());
        let mut out_start = 0;
        let found = self.console.wait_until(from, deadline, |d| {
            let bs = find(d, b)? + b.len();
            let es = bs + find(&d[bs..], e)?;
            let nl = es + e.len() + d[es + e.len()..].iter().position(|&c| c == b'\n')?;
            out_start = bs;
            Some(nl)
        });
        match found {
            Wait::Found(line_end) => {
                let bytes = self.console.bytes_from(from);
                let chunk = &bytes[..(line_end - from).min(bytes.len())];
                let es = out_start + find(&chunk[out_start..], e).unwrap_or(0);
                let out = String::from_utf8_lossy(&chunk[out_start..es]).into_owned();
                let rc = String::from_utf8_lossy(&chunk[es + e.len()..])
                    .trim()
                    .parse::<i32>()
                    .unwrap_or(-1);
                Ok((rc, out))
            }
            Wait::Eof => bail!("guest {}: QEMU exited while running `{cmd}`", self.cfg.name),
            Wait::Timeout => {
                let _ = self.write_console(b"\x03");
                bail!(
                    "guest {}: `{cmd}` did not finish in {timeout:?}; console:\n{}",
                    self.cfg.name,
                    self.console_tail_from(from, 20)
                )
            }
        }
    }

    /// Writes raw bytes to the serial console (what a human would type).
    pub fn write_console(&self, bytes: &[u8]) -> Result<()> {
        let inst = self.inst.as_ref().context("the guest was killed")?;
        let mut w = lock(&inst.writer);
        w.write_all(bytes).context("writing to the guest console")?;
        w.flush()?;
        Ok(())
    }

    /// Waits for `needle` on the console (searching this instance's whole output).
    pub fn wait_console(&self, needle: &str, timeout: Duration) -> Result<()> {
        let from = self.inst.as_ref().map_or(0, |i| i.console_start);
        match self
            .console
            .wait_for(from, needle, Instant::now() + timeout)
        {
            Wait::Found(_) => Ok(()),
            Wait::Eof => bail!("guest {}: QEMU exited", self.cfg.name),
            Wait::Timeout => bail!(
                "guest {}: {needle:?} not on the console after {timeout:?}",
                self.cfg.name
            ),
        }
    }

    /// Runs one HMP command on QEMU's monitor (`info status`, `migrate -d unix:..`) and
    /// returns its output (the echo and prompt removed).
    pub fn monitor(&self, cmd: &str, timeout: Duration) -> Result<String> {
        if self.inst.is_none() {
            bail!("the guest was killed");
        }
        // Right after a start QEMU may not have created the socket yet.
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(self.monitor_socket()) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && !self.console.is_closed()
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).context("connecting to the monitor"),
            }
        };
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let read_to_prompt = |r: &mut BufReader<UnixStream>| -> Result<String> {
            let mut out = Vec::new();
            loop {
                let mut chunk = Vec::new();
                let n = r.read_until(b' ', &mut chunk)?;
                if n == 0 {
                    bail!("monitor closed");
                }
                out.extend_from_slice(&chunk);
                if out.ends_with(b"(qemu) ") {
                    out.truncate(out.len() - 7);
                    return Ok(strip_ansi(&String::from_utf8_lossy(&out)));
                }
            }
        };
        read_to_prompt(&mut r)?; // the banner
        w.write_all(format!("{cmd}\n").as_bytes())?;
        let out = read_to_prompt(&mut r)?;
        let _ = w.shutdown(Shutdown::Both);
        // The first line is the echo of the command.
        let out = out.replace('\r', "");
        Ok(match out.split_once('\n') {
            Some((_, rest)) => rest.to_string(),
            None => String::new(),
        })
    }

    /// [`Guest::monitor`] for commands that print nothing on success: a line starting with
    /// `Error` is an error.
    fn hmp(&self, cmd: &str) -> Result<String> {
        let out = self
            .monitor(cmd, MONITOR_TIMEOUT)
            .with_context(|| format!("guest {}: monitor `{cmd}`", self.cfg.name))?;
        if let Some(e) = out.lines().find(|l| l.trim_start().starts_with("Error")) {
            bail!("guest {}: monitor `{cmd}`: {}", self.cfg.name, e.trim());
        }
        Ok(out)
    }

    /// The VM's run state from `info status`: `running`, `paused (inmigrate)` (an incoming
    /// guest before the switch-over), `paused (postmigrate)` (a source after it).
    pub fn vm_status(&self) -> Result<String> {
        let out = self.hmp("info status")?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("VM status: "))
            .map(str::to_string)
            .with_context(|| format!("guest {}: no VM status in {out:?}", self.cfg.name))
    }

    /// Where an incoming guest listens for the migration stream (`<dir>/migrate.sock`).
    pub fn migration_socket(&self) -> PathBuf {
        self.path("migrate.sock")
    }

    /// Whether this guest was started by [`Guest::boot_incoming`].
    pub fn is_incoming(&self) -> bool {
        self.incoming
    }

    /// Starts a live migration of this running guest to `target` (from [`Guest::boot_incoming`]
    /// with the same [`GuestConfig`]) and returns at once: `migrate -d unix:<target's socket>`.
    /// Follow it with [`Guest::migration_status`] or [`Guest::wait_migration`].
    pub fn start_migration(&self, target: &Guest) -> Result<()> {
        if !target.incoming {
            bail!(
                "guest {} was not started by boot_incoming: it cannot receive a migration",
                target.cfg.name
            );
        }
        if target.inst.is_none() {
            bail!("the migration target {} was killed", target.cfg.name);
        }
        let state = self.vm_status()?;
        if state != "running" {
            bail!(
                "guest {} cannot migrate: its VM is {state:?}",
                self.cfg.name
            );
        }
        self.hmp(&format!(
            "migrate -d unix:{}",
            target.migration_socket().display()
        ))?;
        Ok(())
    }

    /// The migration's progress from this guest (the source), parsed from `info migrate`.
    pub fn migration_status(&self) -> Result<MigrationInfo> {
        Ok(MigrationInfo::parse(&self.hmp("info migrate")?))
    }

    /// Polls [`Guest::migration_status`] until the migration completed and returns that last
    /// report. A failed or cancelled migration, none at all, or still none finished after
    /// `timeout` is an error naming the status (and QEMU's reason). After it completed this
    /// QEMU's VM is paused for good: [`Guest::console`] refuses, drop it.
    pub fn wait_migration(&self, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.migration_status()?;
            match info.status {
                MigrationStatus::Completed => {
                    self.migrated_away.store(true, Ordering::Relaxed);
                    return Ok(info);
                }
                MigrationStatus::None => {
                    bail!("guest {}: no migration was started", self.cfg.name)
                }
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    bail!("guest {}: migration {}", self.cfg.name, info.describe())
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                bail!(
                    "guest {}: migration not completed after {timeout:?}: {}",
                    self.cfg.name,
                    info.describe()
                );
            }
            std::thread::sleep(MIGRATION_POLL);
        }
    }

    /// [`Guest::start_migration`] + [`Guest::wait_migration`] + [`Guest::wait_incoming`] on the
    /// target, within `timeout`: when this returns the guest runs in `target` (which answers
    /// [`Guest::console`]) and this QEMU can be dropped.
    pub fn migrate_to(&self, target: &Guest, timeout: Duration) -> Result<MigrationInfo> {
        let deadline = Instant::now() + timeout;
        self.start_migration(target)?;
        let info = self.wait_migration(timeout)?;
        target.wait_incoming(deadline.saturating_duration_since(Instant::now()))?;
        Ok(info)
    }

    /// Cancels the migration in progress (`migrate_cancel`) and waits (up to 30 s) for it to
    /// settle; returns the final report: `cancelled`, or `completed` / `failed` if it ended
    /// first (`none` when there was none). The guest keeps running here unless it completed;
    /// the target's QEMU exits on its own (drop it).
    pub fn cancel_migration(&self) -> Result<MigrationInfo> {
        self.hmp("migrate_cancel")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.migration_status()?;
            match info.status {
                MigrationStatus::Completed => {
                    self.migrated_away.store(true, Ordering::Relaxed);
                    return Ok(info);
                }
                MigrationStatus::None | MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    return Ok(info);
                }
                _ if Instant::now() >= deadline => bail!(
                    "guest {}: migration still {} 30 s after migrate_cancel",
                    self.cfg.name,
                    info.describe()
                ),
                _ => std::thread::sleep(MIGRATION_POLL),
            }
        }
    }

    /// Caps this guest's outgoing migration bandwidth (`migrate_set_parameter max-bandwidth
    /// <n>B`; without the `B` QEMU reads MiB/s), also for a migration in progress, and checks
    /// it took (`info migrate_parameters`). QEMU's default is 128 MiB/s; 1 MB/s makes a 128 MB
    /// guest take about two minutes.
    pub fn set_migration_speed(&self, bytes_per_sec: u64) -> Result<()> {
        if bytes_per_sec == 0 {
            bail!("a migration speed of 0 bytes/s");
        }
        self.hmp(&format!(
            "migrate_set_parameter max-bandwidth {bytes_per_sec}B"
        ))?;
        let params = self.hmp("info migrate_parameters")?;
        let want = format!("max-bandwidth: {bytes_per_sec} bytes/second");
        if !params.lines().any(|l| l.trim() == want) {
            bail!(
                "guest {}: max-bandwidth did not become {bytes_per_sec}: {params}",
                self.cfg.name
            );
        }
        Ok(())
    }

    /// On a guest from [`Guest::boot_incoming`]: waits until the migration landed and its VM
    /// runs. An error if QEMU exited first (what a cancelled or failed migration does to the
    /// target), or after `timeout`.
    pub fn wait_incoming(&self, timeout: Duration) -> Result<()> {
        if !self.incoming {
            bail!("guest {} was not started by boot_incoming", self.cfg.name);
        }
        if self.landed.load(Ordering::Relaxed) {
            return Ok(());
        }
        if self.inst.is_none() {
            bail!("the guest was killed");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.vm_status();
            if let Ok(s) = &state
                && s == "running"
            {
                self.landed.store(true, Ordering::Relaxed);
                return Ok(());
            }
            if self.console.is_closed() {
                bail!(
                    "guest {}: the incoming QEMU exited before a migration landed: {}",
                    self.cfg.name,
                    self.qemu_log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "guest {}: no migration landed in {timeout:?} (VM status: {})",
                    self.cfg.name,
                    match state {
                        Ok(s) => s,
                        Err(e) => format!("{e:#}"),
                    }
                );
            }
            std::thread::sleep(MIGRATION_POLL);
        }
    }

    /// Exit status of a QEMU whose console closed (it exits right after).
    fn reap(&mut self) -> String {
        let Some(i) = self.inst.as_mut() else {
            return "killed".into();
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match i.child.try_wait() {
                Ok(Some(s)) => return s.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => return "console closed, still running".into(),
                Err(e) => return e.to_string(),
            }
        }
    }

    fn kill_instance(&mut self) {
        let Some(mut inst) = self.inst.take() else {
            return;
        };
        let pidfile = self.path("qemu.pid");
        if kill_pidfile(&pidfile).is_err() || matches!(inst.child.try_wait(), Ok(None)) {
            let _ = inst.child.kill();
        }
        let _ = inst.child.wait();
        if let Ok(w) = inst.writer.get_mut() {
            let _ = w.shutdown(Shutdown::Both);
        }
        if let Some(h) = inst.reader.take() {
            let _ = h.join();
        }
        for f in ["console.sock", "monitor.sock", "migrate.sock", "qemu.pid"] {
            let _ = fs::remove_file(self.path(f));
        }
        self.ready_offset = None;
        self.boot_time = None;
    }

    /// Kills QEMU (SIGKILL to the pid in its pid file) and waits for it: the tap is free again
    /// when this returns. The console log stays readable.
    pub fn kill(&mut self) -> Result<()> {
        self.kill_instance();
        Ok(())
    }

    /// Leaves QEMU running and its directory in place (for `make demo --keep`); returns the
    /// directory. [`kill_pidfile`]`(dir/qemu.pid)` stops it later.
    pub fn keep(mut self) -> PathBuf {
        self.kept = true;
        let _ = fs::write(self.path("kept"), b"");
        if let Some(mut inst) = self.inst.take() {
            // Let the console reader go; QEMU keeps running with no client.
            if let Ok(w) = inst.writer.get_mut() {
                let _ = w.shutdown(Shutdown::Both);
            }
            if let Some(h) = inst.reader.take() {
                let _ = h.join();
            }
            std::mem::forget(inst.child);
        }
        self.dir.clone()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.kill_instance();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences (ESC [ ... letter) and two-character ones (ESC c).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn read_pidfile(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kills the QEMU whose pid file is `path` (SIGKILL) and waits up to 5 s for it to go. The pid
/// is only trusted if that process's command line names the same pid file (pids get reused).
/// `Ok(false)` when no such process runs.
pub fn kill_pidfile(path: &Path) -> Result<bool> {
    let Some(pid) = read_pidfile(path) else {
        return Ok(false);
    };
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return Ok(false);
    };
    let want = path.as_os_str().as_encoded_bytes();
    if !cmdline.split(|&b| b == 0).any(|a| a == want) {
        return Ok(false);
    }
    // SAFETY: plain syscall.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("kill {pid}"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    // Gone, or a zombie its parent has not reaped yet (the tap is released either way).
    while Instant::now() < deadline {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(true),
            Ok(s) if s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')) => {
                return Ok(true);
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    bail!("QEMU {pid} did not die within 5 s of SIGKILL")
}

/// Removes work directories under [`RUN_DIR`] whose owning process is gone (and kills their
/// QEMU), except those of kept guests.
pub fn sweep_stale() {
    let Ok(entries) = fs::read_dir(RUN_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(owner) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() || path.join("kept").exists() {
            continue;
        }
        let _ = kill_pidfile(&path.join("qemu.pid"));
        let _ = fs::remove_dir_all(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_line_parses() {
        let l = Lease::parse(
            "TAPESTRY-DHCP ip=192.168.78.42 mask=24 router=192.168.78.1 dns=1.1.1.1,8.8.8.8 \
             mtu=1400 link_mtu=1400 hostname=h domain=lab.test server=192.168.78.1 lease=600 \
             routes=169.254.1.1/32,0.0.0.0,0.0.0.0/0,169.254.1.1",
        )
        .unwrap();
        assert_eq!(l.ip, Ipv4Addr::new(192, 168, 78, 42));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(192, 168, 78, 1)));
        assert_eq!(l.dns.len(), 2);
        assert_eq!((l.mtu, l.link_mtu), (Some(1400), Some(1400)));
        assert_eq!(l.hostname.as_deref(), Some("h"));
        assert_eq!(l.lease_secs, Some(600));
        assert_eq!(
            l.routes,
            vec![
                (Ipv4Addr::new(169, 254, 1, 1), 32, Ipv4Addr::UNSPECIFIED),
                (Ipv4Addr::UNSPECIFIED, 0, Ipv4Addr::new(169, 254, 1, 1)),
            ]
        );
        let bare = Lease::parse(
            "TAPESTRY-DHCP ip=10.0.0.5 mask=32 router= dns= mtu= link_mtu=1500 hostname= \
             domain= server= lease= routes=",
        )
        .unwrap();
        assert_eq!(bare.router, None);
        assert_eq!(bare.mtu, None);
        assert_eq!(bare.hostname, None);
        assert!(bare.routes.is_empty());
        assert!(Lease::parse("TAPESTRY-DHCP mask=24").is_none());
    }

    #[test]
    fn append_line() {
        let c = GuestConfig::new("vm-1", [0x52, 0x54, 0, 1, 2, 3]).with_static(
            Ipv4Addr::new(192, 168, 77, 2),
            24,
            Some(Ipv4Addr::new(192, 168, 77, 1)),
        );
        assert_eq!(
            c.append(),
            "console=ttyS0 quiet panic=-1 no_timer_check tapestry.name=vm-1 \
             tapestry.net=static:192.168.77.2/24:192.168.77.1"
        );
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.name = "a b".into();
        assert!(bad.validate().is_err());
        assert_eq!(fmt_mac(&c.mac), "52:54:00:01:02:03");
    }

    /// `info migrate` of QEMU 7.2 (Debian 12), taken from real migrations under TCG.
    const GLOBALS: &str = "globals:\nstore-global-state: on\nonly-migratable: off\n\
        send-configuration: on\nsend-section-footer: on\ndecompress-error-check: on\n\
        clear-bitmap-shift: 18\n";

    #[test]
    fn info_migrate_parses() {
        let none = MigrationInfo::parse(GLOBALS);
        assert_eq!(none.status, MigrationStatus::None);
        assert_eq!((none.total_time_ms, none.error), (None, None));

        let done = MigrationInfo::parse(&format!(
            "{GLOBALS}Migration status: completed\ntotal time: 606 ms\ndowntime: 50 ms\n\
             setup: 1 ms\ntransferred ram: 90679 kbytes\nthroughput: 1229.96 mbps\n\
             remaining ram: 0 kbytes\ntotal ram: 131592 kbytes\nduplicate: 10327 pages\n\
             skipped: 0 pages\nnormal: 22603 pages\nnormal bytes: 90412 kbytes\n\
             dirty sync count: 3\npage size: 4 kbytes\nmultifd bytes: 0 kbytes\n\
             pages-per-second: 32730\nprecopy ram: 76567 kbytes\ndowntime ram: 14112 kbytes\n"
        ));
        assert_eq!(done.status, MigrationStatus::Completed);
        assert_eq!(done.total_time_ms, Some(606));
        assert_eq!(done.downtime_ms, Some(50));
        assert_eq!(done.expected_downtime_ms, None);
        assert_eq!(done.setup_ms, Some(1));
        assert_eq!(done.transferred_kib, Some(90679));
        assert_eq!(done.remaining_kib, Some(0));
        assert_eq!(done.total_kib, Some(131592));
        assert_eq!(done.throughput_mbps, Some(1229.96));
        assert_eq!(done.describe(), "completed in 606 ms (downtime 50 ms)");

        let active = MigrationInfo::parse(&format!(
            "{GLOBALS}Migration status: active\ntotal time: 2457 ms\n\
             expected downtime: 300 ms\nsetup: 0 ms\ntransferred ram: 2503 kbytes\n\
             throughput: 8.21 mbps\nremaining ram: 128132 kbytes\ntotal ram: 131592 kbytes\n"
        ));
        assert_eq!(active.status, MigrationStatus::Active);
        assert_eq!(
            (active.downtime_ms, active.expected_downtime_ms),
            (None, Some(300))
        );
        assert_eq!(active.describe(), "active, 2503 of 131592 KiB sent");

        let failed = MigrationInfo::parse(&format!(
            "{GLOBALS}Migration status: failed (Unable to write to socket: Broken pipe)\n\
             total time: 0 ms\n"
        ));
        assert_eq!(failed.status, MigrationStatus::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("Unable to write to socket: Broken pipe")
        );
        assert_eq!(
            failed.describe(),
            "failed (Unable to write to socket: Broken pipe)"
        );

        let cancelled = MigrationInfo::parse(&format!(
            "{GLOBALS}Migration status: cancelled\ntotal time: 0 ms\n"
        ));
        assert_eq!(cancelled.status, MigrationStatus::Cancelled);
        assert_eq!(cancelled.total_time_ms, Some(0));
        assert_eq!(
            MigrationInfo::parse("Migration status: pre-switchover\n").status,
            MigrationStatus::Other("pre-switchover".into())
        );
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}c\u{1b}[?7l\u{1b}[6nVM status: running\u{1b}[K"),
            "VM status: running"
        );
    }
}
