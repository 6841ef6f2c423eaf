//! The VM pod's tap -> pod interface path for `tapestry-bench-vm`: a guest stand-in writing
//! pre-built frames to the tap's file descriptor, and the cross-connects it is compared with.
//!
//! The guest stand-in opens the tap as QEMU does without vhost (`/dev/net/tun`, `TUNSETIFF`
//! with `IFF_TAP | IFF_NO_PI`, from inside the pod's namespace) and writes one frame per
//! `write(2)` from a thread pinned to one CPU. A tap write runs the whole receive path in the
//! writer's context: the tap's ingress hook (where Tapestry's guest program or a tc filter
//! runs) or its bridge port, the pod interface's transmit, the veth hop, and on `local_bh_enable`
//! the host side of the veth up to where the frame is dropped. So one CPU carries the whole path
//! and packets/s is its per-packet cost.
//!
//! Cross-connects (all in the same pod network namespace, one at a time):
//! - **Tapestry**: the VM pod registered with `tapestryd`: `tapestry_guest_to_pod` on the tap's
//!   ingress (TCX) checks the source MAC and IPv4 source and redirects out of `eth0`.
//! - **bridge**: KubeVirt's bridge binding: a Linux bridge `k6t-eth0` enslaving `eth0` and the
//!   tap, `eth0` given a new MAC (the guest keeps the pod's), the gateway's MAC in the bridge's
//!   forwarding table (what the first reply from the gateway teaches it). The pod namespace keeps
//!   the kernel's defaults, so with br_netfilter built in, bridged IPv4 goes through its hooks as
//!   on a stock node; [`Variant::BridgeNoNf`] turns `bridge-nf-call-*` off in the pod namespace.
//! - **mirred**: Kata's tcfilter: clsact on the tap and on `eth0`, each with
//!   `u32 match u32 0 0 action mirred egress redirect` to the other.

use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tapestry_tests::cmd;
use tapestry_tests::tapfd::open_tap;

/// Name of KubeVirt's bridge for `eth0`.
pub const BRIDGE: &str = "k6t-eth0";
/// nftables table holding the drop rule for the test destination (root namespace).
pub const NFT_TABLE: &str = "tapestry_vmbench";

/// The tap's file descriptor, as the VM process holds it.
pub struct TapFd(OwnedFd);

impl TapFd {
    /// Attaches to the existing tap `name` in the namespace at `netns` ([`open_tap`]: one
    /// Ethernet frame per write, blocking).
    pub fn open(netns: &Path, name: &str) -> Result<TapFd> {
        Ok(TapFd(OwnedFd::from(open_tap(netns, name)?)))
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Writes `frame` `n` times (unpinned, unmeasured: probes).
    pub fn send_n(&self, frame: &[u8], n: usize) -> Result<()> {
        for _ in 0..n {
            // SAFETY: writing our buffer to our descriptor.
            let r = unsafe { libc::write(self.raw(), frame.as_ptr().cast(), frame.len()) };
            if r < 0 {
                return Err(io::Error::last_os_error()).context("writing to the tap");
            }
        }
        Ok(())
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum16(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// An Ethernet + IPv4 + UDP frame of exactly `frame_len` bytes (without FCS; at least 42),
/// with valid IPv4 and UDP checksums, as a guest's kernel would send it.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: (u16, u16),
    frame_len: usize,
) -> Result<Vec<u8>> {
    if !(42..=65535).contains(&frame_len) {
        bail!("a UDP frame needs 42 to 65535 bytes, not {frame_len}");
    }
    let ip_len = (frame_len - 14) as u16;
    let udp_len = ip_len - 20;
    let mut f = Vec::with_capacity(frame_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(udp_len as usize);
    udp.extend_from_slice(&ports.0.to_be_bytes());
    udp.extend_from_slice(&ports.1.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend((0..udp_len as usize - 8).map(|i| (i % 251) as u8));
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let mut c = fold(sum16(&pseudo) + sum16(&udp));
    if c == 0 {
        c = 0xffff;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    Ok(f)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `/sys/class/net/<ifname>/statistics/<counter>` of the root namespace.
pub fn counter_path(ifname: &str, counter: &str) -> PathBuf {
    Path::new("/sys/class/net")
        .join(ifname)
        .join("statistics")
        .join(counter)
}

pub fn read_counter(path: &Path) -> Result<u64> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", path.display()))
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// What one generator run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenReport {
    /// Frames written (successful writes) during the measured interval.
    pub sent: u64,
    pub write_errors: u64,
    pub first_error: Option<String>,
    /// Delta of the host-side veth's `rx_packets` over the measured interval.
    pub delivered: u64,
    pub elapsed_s: f64,
    pub cpu: Option<usize>,
    /// The generator thread's time on the CPU over the interval (its `schedstat`): the tap
    /// write and everything it runs inline, softirq included (this kernel charges softirq
    /// time to the interrupted task: no IRQ_TIME_ACCOUNTING). `None` if unreadable.
    pub on_cpu_s: Option<f64>,
    /// Time the thread waited for its CPU (other tasks on it) over the interval.
    pub runqueue_wait_s: Option<f64>,
    /// CPU time of `ksoftirqd/<cpu>` over the interval: softirq work deferred off the
    /// generator (not charged to it; any other softirq work on that CPU counts here too).
    pub ksoftirqd_s: Option<f64>,
}

impl GenReport {
    pub fn pps(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.delivered as f64 / self.elapsed_s
        } else {
            0.0
        }
    }

    /// Delivered packets per second the generator actually had the CPU: the per-packet cost
    /// of the path, without the share of the CPU other tasks took (a shared machine's noise).
    pub fn pps_on_cpu(&self) -> Option<f64> {
        self.on_cpu_s
            .filter(|s| *s > 0.0)
            .map(|s| self.delivered as f64 / s)
    }
}

/// `(on-CPU ns, runqueue wait ns)` from a `schedstat` file.
fn schedstat(path: &Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// `/proc/<pid>/schedstat` of `ksoftirqd/<cpu>`.
pub fn ksoftirqd_schedstat(cpu: usize) -> Option<PathBuf> {
    let want = format!("ksoftirqd/{cpu}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == want).then(|| e.path().join("schedstat"))
    })
}

/// Writes `frame` to the tap as fast as one thread can, pinned to `cpu`: `warmup` unmeasured,
/// then `measure` between two reads of `rx_counter` (the host-side veth's `rx_packets`).
pub fn generate(
    tap: &TapFd,
    frame: &[u8],
    cpu: Option<usize>,
    warmup: Duration,
    measure: Duration,
    rx_counter: &Path,
) -> Result<GenReport> {
    let fd = tap.raw();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<GenReport> {
            if let Some(c) = cpu {
                pin_to_cpu(c)?;
            }
            let write_for = |d: Duration| -> (u64, u64, Option<String>) {
                let (mut sent, mut errors, mut first) = (0u64, 0u64, None);
                let end = Instant::now() + d;
                loop {
                    for _ in 0..64 {
                        // SAFETY: writing our buffer to a descriptor that outlives the scope.
                        let r = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
                        if r < 0 {
                            errors += 1;
                            if first.is_none() {
                                first = Some(io::Error::last_os_error().to_string());
                            }
                        } else {
                            sent += 1;
                        }
                    }
                    if errors > 10_000 || Instant::now() >= end {
                        return (sent, errors, first);
                    }
                }
            };
            let own = Path::new("/proc/thread-self/schedstat");
            let softirqd = cpu.and_then(ksoftirqd_schedstat);
            write_for(warmup);
            let rx0 = read_counter(rx_counter)?;
            let k0 = softirqd.as_deref().and_then(schedstat);
            let s0 = schedstat(own);
            let t0 = Instant::now();
            let (sent, write_errors, first_error) = write_for(measure);
            let elapsed_s = t0.elapsed().as_secs_f64();
            let s1 = schedstat(own);
            let k1 = softirqd.as_deref().and_then(schedstat);
            let rx1 = read_counter(rx_counter)?;
            let delta = s0.zip(s1).map(|(a, b)| {
                (
                    b.0.saturating_sub(a.0) as f64 / 1e9,
                    b.1.saturating_sub(a.1) as f64 / 1e9,
                )
            });
            Ok(GenReport {
                sent,
                write_errors,
                first_error,
                delivered: rx1.saturating_sub(rx0),
                elapsed_s,
                cpu,
                on_cpu_s: delta.map(|d| d.0),
                runqueue_wait_s: delta.map(|d| d.1),
                ksoftirqd_s: k0
                    .zip(k1)
                    .map(|(a, b)| b.0.saturating_sub(a.0) as f64 / 1e9),
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
    })
}

/// How the tap is cross-connected to the pod interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    Tapestry,
    Bridge,
    #[serde(rename = "bridge-nonf")]
    BridgeNoNf,
    Mirred,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Tapestry => "tapestry",
            Variant::Bridge => "bridge",
            Variant::BridgeNoNf => "bridge-nonf",
            Variant::Mirred => "mirred",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Tapestry => "Tapestry (eBPF redirect)",
            Variant::Bridge => "Linux bridge (KubeVirt bridge binding)",
            Variant::BridgeNoNf => "Linux bridge, bridge-nf-call-* off",
            Variant::Mirred => "tc u32 + mirred (Kata tcfilter)",
        }
    }

    pub fn parse(s: &str) -> Result<Variant> {
        Ok(match s {
            "tapestry" => Variant::Tapestry,
            "bridge" => Variant::Bridge,
            "bridge-nonf" => Variant::BridgeNoNf,
            "mirred" => Variant::Mirred,
            _ => bail!("unknown variant {s:?} (tapestry, bridge, bridge-nonf, mirred)"),
        })
    }
}

/// The VM pod as the benchmark sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodTopology {
    /// Namespace name (`ip -n`).
    pub netns: String,
    pub netns_path: PathBuf,
    pub ifname: String,
    pub tap: String,
    /// `eth0`'s own MAC (the guest's, in Tapestry's binding).
    pub ifname_mac: [u8; 6],
    pub host_ifname: String,
    pub host_mac: [u8; 6],
    pub guest_mac: [u8; 6],
    pub guest_ip: Ipv4Addr,
}

/// Runs `<program> -n <netns> -batch -` with `script` (one command per line).
fn batch(program: &str, netns: &str, script: &str) -> Result<()> {
    let mut child = Command::new(program)
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} -n {netns} -batch failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A locally administered MAC derived from `m` (KubeVirt gives `eth0` a new one).
fn other_mac(m: &[u8; 6]) -> [u8; 6] {
    let mut o = *m;
    o[0] = (o[0] | 0x02) & 0xfe;
    o[5] ^= 0x5a;
    o
}

const BRIDGE_NF: [&str; 3] = [
    "bridge-nf-call-iptables",
    "bridge-nf-call-ip6tables",
    "bridge-nf-call-arptables",
];

/// `net.bridge.bridge-nf-call-*` of the pod namespace (absent without br_netfilter).
pub fn bridge_nf(topo: &PodTopology) -> Result<Vec<(String, Option<String>)>> {
    let values = tapestry_netns::run_in(&topo.netns_path, || {
        BRIDGE_NF
            .iter()
            .map(|k| {
                let v = std::fs::read_to_string(format!("/proc/sys/net/bridge/{k}"))
                    .ok()
                    .map(|s| s.trim().to_owned());
                (k.to_string(), v)
            })
            .collect()
    })?;
    Ok(values)
}

fn set_bridge_nf(topo: &PodTopology, values: &[(String, Option<String>)]) -> Result<()> {
    tapestry_netns::run_in(&topo.netns_path, || -> Result<()> {
        for (k, v) in values {
            let p = format!("/proc/sys/net/bridge/{k}");
            if let Some(v) = v
                && Path::new(&p).exists()
            {
                std::fs::write(&p, v).with_context(|| format!("writing {p}"))?;
            }
        }
        Ok(())
    })?
}

pub fn bridge_up(topo: &PodTopology, netfilter: bool) -> Result<()> {
    let (ns, eth, tap) = (&topo.netns, &topo.ifname, &topo.tap);
    if !netfilter {
        let off: Vec<(String, Option<String>)> = BRIDGE_NF
            .iter()
            .map(|k| (k.to_string(), Some("0".to_string())))
            .collect();
        set_bridge_nf(topo, &off)?;
    }
    batch(
        "ip",
        ns,
        &format!(
            "link set {eth} down\n\
             link set {eth} address {new}\n\
             link add {BRIDGE} type bridge\n\
             link set {eth} master {BRIDGE}\n\
             link set {tap} master {BRIDGE}\n\
             link set {BRIDGE} up\n\
             link set {eth} up\n",
            new = fmt_mac(&other_mac(&topo.ifname_mac)),
        ),
    )?;
    cmd::run(Command::new("bridge").args([
        "-n",
        ns,
        "fdb",
        "replace",
        &fmt_mac(&topo.host_mac),
        "dev",
        eth,
        "master",
        "static",
    ]))?;
    Ok(())
}

/// Removes the bridge, gives `eth0` its MAC back and `bridge-nf-call-*` the values `nf_defaults`
/// (from [`bridge_nf`] before the first bridge); best effort, every step tried.
pub fn bridge_down(topo: &PodTopology, nf_defaults: &[(String, Option<String>)]) -> Result<()> {
    let (ns, eth, tap) = (&topo.netns, &topo.ifname, &topo.tap);
    let r1 = batch(
        "ip",
        ns,
        &format!(
            "link del {BRIDGE}\n\
             link set {eth} down\n\
             link set {eth} address {mac}\n\
             link set {eth} up\n\
             link set {tap} up\n",
            mac = fmt_mac(&topo.ifname_mac),
        ),
    );
    let r2 = set_bridge_nf(topo, nf_defaults);
    r1.and(r2)
}

pub fn mirred_up(topo: &PodTopology) -> Result<()> {
    let (eth, tap) = (&topo.ifname, &topo.tap);
    batch(
        "tc",
        &topo.netns,
        &format!(
            "qdisc add dev {tap} clsact\n\
             filter add dev {tap} ingress protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev {eth}\n\
             qdisc add dev {eth} clsact\n\
             filter add dev {eth} ingress protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev {tap}\n"
        ),
    )
}

pub fn mirred_down(topo: &PodTopology) -> Result<()> {
    let (eth, tap) = (&topo.ifname, &topo.tap);
    let r1 = cmd::run(Command::new("tc").args([
        "-n",
        &topo.netns,
        "qdisc",
        "del",
        "dev",
        tap,
        "clsact",
    ]));
    let r2 = cmd::run(Command::new("tc").args([
        "-n",
        &topo.netns,
        "qdisc",
        "del",
        "dev",
        eth,
        "clsact",
    ]));
    r1.and(r2).map(|_| ())
}

/// The host's drop for the test destination: an nftables table of our own, hooked at
/// PREROUTING priority raw (-300, before conntrack), counting and dropping what arrives on the
/// pod's host veth for `dst`. Identical for every variant; removed on drop.
pub struct HostDrop {
    pub dst: Ipv4Addr,
    pub host_ifname: String,
    active: bool,
}

impl HostDrop {
    pub fn install(host_ifname: &str, dst: Ipv4Addr) -> Result<HostDrop> {
        remove_nft_table();
        let script = format!(
            "table ip {NFT_TABLE} {{\n\
               chain prerouting {{\n\
                 type filter hook prerouting priority -300; policy accept;\n\
                 iifname \"{host_ifname}\" ip daddr {dst} counter drop\n\
               }}\n\
             }}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (apt-get install nftables)")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(HostDrop {
            dst,
            host_ifname: host_ifname.into(),
            active: true,
        })
    }

    /// Packets the rule dropped so far.
    pub fn dropped(&self) -> Result<u64> {
        let out = cmd::run(Command::new("nft").args([
            "-j",
            "list",
            "chain",
            "ip",
            NFT_TABLE,
            "prerouting",
        ]))?;
        let v: Value = serde_json::from_str(&out).context("nft -j output")?;
        let rules = v["nftables"].as_array().context("nft -j: no list")?;
        for r in rules {
            if let Some(expr) = r["rule"]["expr"].as_array() {
                for e in expr {
                    if let Some(p) = e["counter"]["packets"].as_u64() {
                        return Ok(p);
                    }
                }
            }
        }
        bail!("no counter in {NFT_TABLE}")
    }

    pub fn remove(&mut self) {
        if self.active {
            remove_nft_table();
            self.active = false;
        }
    }
}

impl Drop for HostDrop {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Deletes our nftables table if it exists (also a killed run's).
pub fn remove_nft_table() -> bool {
    Command::new("nft")
        .args(["delete", "table", "ip", NFT_TABLE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_asked_length_and_valid_checksums() {
        for len in [60, 1400] {
            let f = udp_frame(
                [2, 0, 0, 0, 0, 1],
                [2, 0, 0, 0, 0, 2],
                Ipv4Addr::new(10, 240, 0, 70),
                Ipv4Addr::new(10, 240, 0, 250),
                (40000, 9),
                len,
            )
            .unwrap();
            assert_eq!(f.len(), len);
            assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 1]);
            // A correct header sums to 0xffff (folds to 0).
            assert_eq!(fold(sum16(&f[14..34])), 0);
            let udp = &f[34..];
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&f[26..34]);
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
            assert_eq!(fold(sum16(&pseudo) + sum16(udp)), 0);
            assert_eq!(
                u16::from_be_bytes([f[16], f[17]]) as usize,
                len - 14,
                "IPv4 total length"
            );
        }
        assert!(
            udp_frame(
                [0; 6],
                [0; 6],
                Ipv4Addr::LOCALHOST,
                Ipv4Addr::LOCALHOST,
                (1, 1),
                41
            )
            .is_err()
        );
    }

    #[test]
    fn macs() {
        let m = parse_mac("0a:1b:2c:3d:4e:5f").unwrap();
        assert_eq!(fmt_mac(&m), "0a:1b:2c:3d:4e:5f");
        let o = other_mac(&m);
        assert_ne!(o, m);
        assert_eq!(o[0] & 0x03, 0x02, "locally administered unicast");
        assert!(parse_mac("zz").is_err());
        for v in ["tapestry", "bridge", "bridge-nonf", "mirred"] {
            assert_eq!(Variant::parse(v).unwrap().name(), v);
        }
    }
}
