//! The anchors Tapestry is compared with: kube-proxy-style rule sets for N services of B
//! backends, in iptables (`iptables-restore`) and in nftables with a verdict map (`nft -f`).
//!
//! Everything we create is named so that it can be found and removed without remembering what
//! was installed: iptables chains start with [`IPT_PREFIX`] (the only rule added to a built-in
//! chain is the `PREROUTING` jump to [`IPT_SERVICES`]), nftables objects live in the table
//! `ip` [`NFT_TABLE`]. Both only ever match destinations inside [`VIP_NET`], so nothing else that
//! crosses the node is changed; the masquerade mark they set (as kube-proxy does, to keep the
//! rule count faithful) is consumed by nothing.
//!
//! Service `i` of `n` gets the VIP `198.18.0.0 + 1 + i` (RFC 2544's benchmarking range, not
//! Kubernetes' default 10.96.0.0/12: a kubelet or kube-proxy on this machine keeps its ClusterIPs
//! untouched) and port [`SERVICE_PORT`]. Its backends are distinct addresses in 100.64.0.0/10,
//! which never receive a packet, except for the tested service, the LAST one (the worst place in
//! iptables' linear `KUBE-SERVICES` walk), whose backends are the real server's ports.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Every VIP the benchmark uses is in 198.18.0.0/16.
pub const VIP_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 16);
/// Backends of the services that are not tested: 100.64.0.0/10 (no packet ever goes there).
pub const FAKE_BACKEND_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);
pub const FAKE_BACKEND_PORT: u16 = 8080;
pub const SERVICE_PORT: u16 = 80;
/// kube-proxy's masquerade mark.
const MASQ_MARK: &str = "0x4000/0x4000";

pub const IPT_PREFIX: &str = "TAPBENCH-";
pub const IPT_SERVICES: &str = "TAPBENCH-SERVICES";
const IPT_MARK_MASQ: &str = "TAPBENCH-MARK-MASQ";
pub const NFT_TABLE: &str = "tapestry_bench";

/// One synthetic Service.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// `count` services with `per_service` backends each; the last one is the tested service and
/// balances over `server_ip` at `server_ports` (which must hold `per_service` ports).
pub fn services(
    count: usize,
    per_service: usize,
    server_ip: Ipv4Addr,
    server_ports: &[u16],
) -> Result<Vec<Service>> {
    let vip_room = 1usize << (32 - VIP_NET.1);
    if count == 0 || count + 2 > vip_room {
        bail!(
            "between 1 and {} services fit in the VIP range",
            vip_room - 2
        );
    }
    if count * per_service + 2 > 1 << (32 - FAKE_BACKEND_NET.1) {
        bail!("too many backends for the fake backend range");
    }
    if server_ports.len() != per_service {
        bail!(
            "the tested service needs {per_service} server ports, got {}",
            server_ports.len()
        );
    }
    let vip0 = u32::from(VIP_NET.0);
    let be0 = u32::from(FAKE_BACKEND_NET.0);
    Ok((0..count)
        .map(|i| {
            let tested = i == count - 1;
            let backends = (0..per_service)
                .map(|j| {
                    if tested {
                        (server_ip, server_ports[j])
                    } else {
                        let k = (i * per_service + j) as u32;
                        (Ipv4Addr::from(be0 + 1 + k), FAKE_BACKEND_PORT)
                    }
                })
                .collect();
            Service {
                name: format!("bench-svc-{i}"),
                vip: Ipv4Addr::from(vip0 + 1 + i as u32),
                port: SERVICE_PORT,
                backends,
            }
        })
        .collect())
}

/// The tested service is always the last one.
pub fn tested(services: &[Service]) -> &Service {
    services
        .last()
        .expect("services() never returns an empty list")
}

/// Which anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Iptables,
    Nftables,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Iptables => "iptables",
            Kind::Nftables => "nftables",
        }
    }
}

fn ipt_svc_chain(i: usize) -> String {
    format!("{IPT_PREFIX}SVC-{i:05}")
}

fn ipt_sep_chain(i: usize, j: usize) -> String {
    format!("{IPT_PREFIX}SEP-{i:05}-{j:02}")
}

/// kube-proxy's iptables mode (the `nat` table part of `iptables-save`): `KUBE-SERVICES` ->
/// one rule per service -> `KUBE-SVC-*` picking an endpoint with `statistic --mode random
/// --probability 1/n, 1/(n-1), ...` -> `KUBE-SEP-*` doing the DNAT. `pod_cidr` is the cluster
/// CIDR (kube-proxy marks traffic from outside it for masquerade).
///
/// Returns one `iptables-restore --noflush` script per transaction, `per_transaction` services
/// each (all in one when `None`). Services keep their order across transactions, so the tested
/// one stays last in the services chain; the `PREROUTING` jump comes with the last transaction.
pub fn iptables_scripts(
    services: &[Service],
    pod_cidr: (Ipv4Addr, u8),
    per_transaction: Option<usize>,
) -> Vec<String> {
    let (cidr, len) = pod_cidr;
    let per = per_transaction.unwrap_or(services.len()).max(1);
    let chunks: Vec<_> = services.chunks(per).collect();
    let mut out = Vec::with_capacity(chunks.len());
    for (k, chunk) in chunks.iter().enumerate() {
        let base = k * per;
        let mut s = String::with_capacity(chunk.len() * 4800);
        s.push_str("*nat\n");
        if k == 0 {
            // Declaring a chain in --noflush mode creates or flushes it: only in the first one.
            let _ = writeln!(s, ":{IPT_SERVICES} - [0:0]");
            let _ = writeln!(s, ":{IPT_MARK_MASQ} - [0:0]");
        }
        for (n, svc) in chunk.iter().enumerate() {
            let i = base + n;
            let _ = writeln!(s, ":{} - [0:0]", ipt_svc_chain(i));
            for j in 0..svc.backends.len() {
                let _ = writeln!(s, ":{} - [0:0]", ipt_sep_chain(i, j));
            }
        }
        if k == 0 {
            let _ = writeln!(s, "-A {IPT_MARK_MASQ} -j MARK --set-xmark {MASQ_MARK}");
        }
        for (n, svc) in chunk.iter().enumerate() {
            let _ = writeln!(
                s,
                "-A {IPT_SERVICES} -d {}/32 -p tcp -m comment --comment \"bench/{}:http cluster IP\" -m tcp --dport {} -j {}",
                svc.vip,
                svc.name,
                svc.port,
                ipt_svc_chain(base + n)
            );
        }
        for (n, svc) in chunk.iter().enumerate() {
            let i = base + n;
            let chain = ipt_svc_chain(i);
            let _ = writeln!(
                s,
                "-A {chain} ! -s {cidr}/{len} -d {}/32 -p tcp -m comment --comment \"bench/{}:http cluster IP\" -m tcp --dport {} -j {IPT_MARK_MASQ}",
                svc.vip, svc.name, svc.port
            );
            let nb = svc.backends.len();
            for (j, (ip, port)) in svc.backends.iter().enumerate() {
                let left = nb - j;
                let pick = if left > 1 {
                    format!(
                        "-m statistic --mode random --probability {:.11} ",
                        1.0 / left as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"bench/{}:http -> {ip}:{port}\" {pick}-j {}",
                    svc.name,
                    ipt_sep_chain(i, j)
                );
            }
            for (j, (ip, port)) in svc.backends.iter().enumerate() {
                let sep = ipt_sep_chain(i, j);
                let _ = writeln!(
                    s,
                    "-A {sep} -s {ip}/32 -m comment --comment \"bench/{}:http\" -j {IPT_MARK_MASQ}",
                    svc.name
                );
                let _ = writeln!(
                    s,
                    "-A {sep} -p tcp -m comment --comment \"bench/{}:http\" -m tcp -j DNAT --to-destination {ip}:{port}",
                    svc.name
                );
            }
        }
        if k + 1 == chunks.len() {
            // kube-proxy jumps from PREROUTING unconditionally; the destination match keeps
            // every packet that is not ours out of the walk (ours pay what kube-proxy's would).
            let _ = writeln!(
                s,
                "-I PREROUTING 1 -d {}/{} -m comment --comment \"tapestry-bench service portals\" -j {IPT_SERVICES}",
                VIP_NET.0, VIP_NET.1
            );
        }
        s.push_str("COMMIT\n");
        out.push(s);
    }
    out
}

/// kube-proxy's NodePort path for the tested (last) service on top of [`iptables_scripts`]:
/// the services chain ends with the `addrtype LOCAL` jump to the node ports chain (so a node
/// port packet first walks every ClusterIP rule, as in kube-proxy), the node port's `EXT` chain
/// marks for masquerade and goes to the service's chain, and `POSTROUTING` masquerades what is
/// marked. `PREROUTING` jumps only for `node_ip:node_port`, so no other traffic crossing the
/// node pays for it. One `iptables-restore --noflush` transaction, after the services'.
pub fn iptables_nodeport_script(services: &[Service], node_ip: Ipv4Addr, node_port: u16) -> String {
    let tested = services.len() - 1;
    let name = &services[tested].name;
    let nodeports = format!("{IPT_PREFIX}NODEPORTS");
    let ext = format!("{IPT_PREFIX}EXT-{tested:05}");
    let post = format!("{IPT_PREFIX}POSTROUTING");
    let mut s = String::from("*nat\n");
    for c in [&nodeports, &ext, &post] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    let _ = writeln!(
        s,
        "-A {IPT_SERVICES} -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j {nodeports}"
    );
    let _ = writeln!(
        s,
        "-A {nodeports} -p tcp -m comment --comment \"bench/{name}:http\" -m tcp --dport {node_port} -j {ext}"
    );
    let _ = writeln!(
        s,
        "-A {ext} -m comment --comment \"masquerade traffic for bench/{name}:http external destinations\" -j {IPT_MARK_MASQ}"
    );
    let _ = writeln!(s, "-A {ext} -j {}", ipt_svc_chain(tested));
    let _ = writeln!(s, "-A {post} -m mark ! --mark {MASQ_MARK} -j RETURN");
    let _ = writeln!(s, "-A {post} -j MARK --set-xmark 0x4000/0x0");
    let _ = writeln!(
        s,
        "-A {post} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(
        s,
        "-I PREROUTING 1 -d {node_ip}/32 -p tcp -m tcp --dport {node_port} -m comment --comment \"tapestry-bench node port\" -j {IPT_SERVICES}"
    );
    let _ = writeln!(s, "-I POSTROUTING 1 -j {post}");
    s.push_str("COMMIT\n");
    s
}

fn nft_service_chain(i: usize) -> String {
    format!("service-{i:05}-bench-svc-{i}-http")
}

/// kube-proxy's nftables mode: one verdict map from (VIP, protocol, port) to a per-service chain
/// that picks an endpoint with `numgen random mod n vmap { ... }`, one chain per endpoint doing
/// the DNAT. One `nft -f` script per transaction, `per_transaction` services each (all in one
/// when `None`); the hooked base chain comes with the last one.
pub fn nft_scripts(
    services: &[Service],
    pod_cidr: (Ipv4Addr, u8),
    per_transaction: Option<usize>,
) -> Vec<String> {
    let (cidr, len) = pod_cidr;
    let t = NFT_TABLE;
    let per = per_transaction.unwrap_or(services.len()).max(1);
    let chunks: Vec<_> = services.chunks(per).collect();
    let mut out = Vec::with_capacity(chunks.len());
    for (k, chunk) in chunks.iter().enumerate() {
        let base = k * per;
        let mut s = String::with_capacity(chunk.len() * 3700);
        if k == 0 {
            let _ = writeln!(s, "add table ip {t}");
            let _ = writeln!(s, "add chain ip {t} mark-for-masquerade");
            let _ = writeln!(
                s,
                "add rule ip {t} mark-for-masquerade mark set mark or 0x4000"
            );
            let _ = writeln!(
                s,
                "add map ip {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}"
            );
            let _ = writeln!(s, "add chain ip {t} services");
            let _ = writeln!(
                s,
                "add rule ip {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
            );
        }
        for (n, svc) in chunk.iter().enumerate() {
            let i = base + n;
            let chain = nft_service_chain(i);
            let _ = writeln!(s, "add chain ip {t} {chain}");
            let _ = writeln!(
                s,
                "add rule ip {t} {chain} ip daddr {} tcp dport {} ip saddr != {cidr}/{len} jump mark-for-masquerade",
                svc.vip, svc.port
            );
            let mut vmap = String::new();
            for (j, (ip, port)) in svc.backends.iter().enumerate() {
                let ep = format!("endpoint-{i:05}-{j:02}-{ip}-{port}");
                let _ = writeln!(s, "add chain ip {t} {ep}");
                let _ = writeln!(
                    s,
                    "add rule ip {t} {ep} ip saddr {ip} jump mark-for-masquerade"
                );
                let _ = writeln!(
                    s,
                    "add rule ip {t} {ep} meta l4proto tcp dnat to {ip}:{port}"
                );
                if j > 0 {
                    vmap.push_str(", ");
                }
                let _ = write!(vmap, "{j} : goto {ep}");
            }
            let _ = writeln!(
                s,
                "add rule ip {t} {chain} numgen random mod {} vmap {{ {vmap} }}",
                svc.backends.len()
            );
        }
        // Map elements in batches of 500 keep single lines short.
        for (m, batch) in chunk.chunks(500).enumerate() {
            let mut elems = String::new();
            for (n, svc) in batch.iter().enumerate() {
                if n > 0 {
                    elems.push_str(", ");
                }
                let _ = write!(
                    elems,
                    "{} . tcp . {} : goto {}",
                    svc.vip,
                    svc.port,
                    nft_service_chain(base + m * 500 + n)
                );
            }
            let _ = writeln!(s, "add element ip {t} service-ips {{ {elems} }}");
        }
        if k + 1 == chunks.len() {
            // Hooked last, so the table only sees packets once it is complete.
            let _ = writeln!(
                s,
                "add chain ip {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; policy accept ; }}"
            );
            let _ = writeln!(
                s,
                "add rule ip {t} nat-prerouting ip daddr {}/{} jump services",
                VIP_NET.0, VIP_NET.1
            );
        }
        out.push(s);
    }
    out
}

/// Which `iptables` the iptables anchor is loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-nft`: iptables rules stored as nftables rules in `table ip nat`.
    Nft,
    /// `iptables-legacy`: the x_tables kernel interface.
    Legacy,
}

impl IptablesBackend {
    /// What `iptables-restore` on this machine is (Debian 12's default is nf_tables).
    pub fn detect() -> Result<IptablesBackend> {
        let out = Command::new("iptables-restore")
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .context("running iptables-restore --version (is iptables installed?)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(if text.contains("legacy") {
            IptablesBackend::Legacy
        } else {
            IptablesBackend::Nft
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "nf_tables",
            IptablesBackend::Legacy => "legacy",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft-restore",
            IptablesBackend::Legacy => "iptables-legacy-restore",
        }
    }
}

/// Installs and removes the anchors in one network namespace (`/run/netns/NAME`), or in this
/// process's own when `netns` is `None`.
#[derive(Debug, Clone)]
pub struct Anchors {
    pub netns: Option<PathBuf>,
    pub iptables: IptablesBackend,
    /// Services per `iptables-restore` transaction (`None`: all in one). Both tools are
    /// quadratic in the size of one transaction on this kernel and userspace (10,000 x 10 in one
    /// transaction: ~480 s for iptables-nft-restore, ~170 s for `nft -f`), so `make bench` loads
    /// in chunks and says so. iptables-nft is fastest in small chunks (250: ~14 s).
    pub iptables_per_transaction: Option<usize>,
    /// Services per `nft -f` transaction (`None`: all in one). nft re-reads the table before
    /// every transaction, so chunks much smaller than 1,000 (~20 s in all) get slower again.
    pub nft_per_transaction: Option<usize>,
    pub pod_cidr: (Ipv4Addr, u8),
}

/// Wall time of one install or removal.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub seconds: f64,
    pub transactions: usize,
}

impl Anchors {
    fn command(&self, program: &str) -> Result<Command> {
        let mut cmd = Command::new(program);
        if let Some(ns) = &self.netns {
            tapestry_netns::command_in(&mut cmd, ns)?;
        }
        Ok(cmd)
    }

    fn run_with_stdin(&self, program: &str, args: &[&str], stdin: &str) -> Result<()> {
        let mut cmd = self.command(program)?;
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {program}"))?;
        let mut pipe = child.stdin.take().context("stdin")?;
        // Written from a thread: the tool may answer (errors) before it has read everything.
        let input = stdin.to_owned();
        let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let out = child.wait_with_output()?;
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                err.chars().take(2000).collect::<String>().trim()
            );
        }
        written.with_context(|| format!("writing to {program}"))?;
        Ok(())
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<(bool, String)> {
        let out = self
            .command(program)?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// The scripts [`Anchors::install`] would load, one per transaction.
    pub fn scripts(&self, kind: Kind, services: &[Service]) -> Vec<String> {
        match kind {
            Kind::Iptables => {
                iptables_scripts(services, self.pod_cidr, self.iptables_per_transaction)
            }
            Kind::Nftables => nft_scripts(services, self.pod_cidr, self.nft_per_transaction),
        }
    }

    /// Loads pre-generated `scripts` of `kind` (after removing what may be left); returns the
    /// wall time of the `iptables-restore` / `nft -f` calls alone.
    pub fn install(&self, kind: Kind, scripts: &[String]) -> Result<Timing> {
        self.remove(kind)?;
        let t0 = Instant::now();
        for script in scripts {
            match kind {
                Kind::Iptables => {
                    self.run_with_stdin(self.iptables.restore(), &["--noflush"], script)?
                }
                Kind::Nftables => self.run_with_stdin("nft", &["-f", "-"], script)?,
            }
        }
        Ok(Timing {
            seconds: t0.elapsed().as_secs_f64(),
            transactions: scripts.len(),
        })
    }

    /// Removes everything of `kind` the benchmark may have installed, including leftovers of a
    /// run that was killed. A no-op when nothing is there.
    pub fn remove(&self, kind: Kind) -> Result<Timing> {
        let t0 = Instant::now();
        let transactions = match kind {
            Kind::Iptables => match self.iptables {
                IptablesBackend::Legacy => self.remove_iptables_legacy()?,
                IptablesBackend::Nft => self.remove_iptables_nft()?,
            },
            Kind::Nftables => {
                // Just try: `nft list tables` alone takes ~25 s while 10,000 services' anonymous
                // sets exist, longer than the deletion itself.
                let out = self
                    .command("nft")?
                    .args(["delete", "table", "ip", NFT_TABLE])
                    .stdin(Stdio::null())
                    .output()
                    .context("running nft")?;
                let err = String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    1
                } else if err.contains("No such file or directory") {
                    0
                } else {
                    bail!("nft delete table ip {NFT_TABLE} failed: {}", err.trim());
                }
            }
        };
        Ok(Timing {
            seconds: t0.elapsed().as_secs_f64(),
            transactions,
        })
    }

    fn remove_iptables_legacy(&self) -> Result<usize> {
        let (ok, saved) = self.output("iptables-legacy-save", &["-t", "nat"])?;
        if !ok {
            return Ok(0);
        }
        match iptables_removal_script(&saved) {
            Some(script) => {
                self.run_with_stdin("iptables-legacy-restore", &["--noflush"], &script)?;
                Ok(1)
            }
            None => Ok(0),
        }
    }

    /// iptables-nft-save takes minutes and crashes on a 400,000-rule nat table, so the chains
    /// are found and removed with `nft` (they are ordinary chains of `table ip nat`).
    fn remove_iptables_nft(&self) -> Result<usize> {
        let (ok, chains) = self.output("nft", &["-j", "list", "chains"])?;
        if !ok {
            return Ok(0);
        }
        let ours = nat_chains_with_prefix(&chains)?;
        if ours.is_empty() {
            return Ok(0);
        }
        let mut script = String::new();
        for builtin in ["PREROUTING", "OUTPUT", "INPUT", "POSTROUTING"] {
            let (ok, rules) =
                self.output("nft", &["-j", "-a", "list", "chain", "ip", "nat", builtin])?;
            if ok {
                for handle in rule_handles_jumping_to_prefix(&rules)? {
                    let _ = writeln!(script, "delete rule ip nat {builtin} handle {handle}");
                }
            }
        }
        for c in &ours {
            let _ = writeln!(script, "flush chain ip nat {c}");
        }
        for c in &ours {
            let _ = writeln!(script, "delete chain ip nat {c}");
        }
        self.run_with_stdin("nft", &["-f", "-"], &script)?;
        Ok(1)
    }

    /// Removes both kinds; reports the first failure after trying both.
    pub fn remove_all(&self) -> Result<()> {
        let a = self.remove(Kind::Iptables);
        let b = self.remove(Kind::Nftables);
        a.and(b).map(|_| ())
    }

    /// `table ip nat` exists (iptables-nft creates it, with conntrack-engaging NAT hooks).
    pub fn nat_table_exists(&self) -> Result<bool> {
        let (_, tables) = self.output("nft", &["list", "tables"])?;
        Ok(tables.lines().any(|l| l.trim() == "table ip nat"))
    }

    /// Deletes `table ip nat` if it holds no rule at all (only what iptables-nft created for
    /// us); used when the table did not exist before the benchmark.
    pub fn delete_nat_table_if_empty(&self) -> Result<bool> {
        let (ok, json) = self.output("nft", &["-j", "list", "table", "ip", "nat"])?;
        if !ok {
            return Ok(false);
        }
        let v: serde_json::Value = serde_json::from_str(&json).context("parsing nft -j")?;
        let items = v["nftables"].as_array().cloned().unwrap_or_default();
        let has_rules = items.iter().any(|i| i.get("rule").is_some());
        let has_user_chains = items
            .iter()
            .any(|i| i.get("chain").is_some_and(|c| c.get("hook").is_none()));
        if has_rules || has_user_chains {
            return Ok(false);
        }
        self.run_with_stdin("nft", &["-f", "-"], "delete table ip nat\n")?;
        Ok(true)
    }
}

/// Names of the chains of `table ip nat` that start with [`IPT_PREFIX`], from `nft -j list
/// chains`.
fn nat_chains_with_prefix(json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing nft -j list chains")?;
    Ok(v["nftables"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.get("chain"))
        .filter(|c| c["family"] == "ip" && c["table"] == "nat")
        .filter_map(|c| c["name"].as_str())
        .filter(|n| n.starts_with(IPT_PREFIX))
        .map(str::to_string)
        .collect())
}

/// Handles of the rules (from `nft -j -a list chain ...`) that jump or go to one of our chains.
fn rule_handles_jumping_to_prefix(json: &str) -> Result<Vec<u64>> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing nft -j list chain")?;
    let mut handles = Vec::new();
    for item in v["nftables"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
    {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let ours = rule["expr"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .any(|e| {
                ["jump", "goto"].iter().any(|k| {
                    e.get(*k)
                        .and_then(|j| j["target"].as_str())
                        .is_some_and(|t| t.starts_with(IPT_PREFIX))
                })
            });
        if ours && let Some(h) = rule["handle"].as_u64() {
            handles.push(h);
        }
    }
    Ok(handles)
}

/// From `iptables-save -t nat`: a `--noflush` script that deletes every rule jumping to one of
/// our chains from a chain that is not ours, then flushes and deletes our chains.
fn iptables_removal_script(saved: &str) -> Option<String> {
    let mut ours = Vec::new();
    let mut foreign_jumps = Vec::new();
    for line in saved.lines() {
        if let Some(rest) = line.strip_prefix(':') {
            let name = rest.split_whitespace().next().unwrap_or("");
            if name.starts_with(IPT_PREFIX) {
                ours.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let words: Vec<&str> = rule.split_whitespace().collect();
            let jumps_to_ours = words
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(IPT_PREFIX));
            if !chain.starts_with(IPT_PREFIX) && jumps_to_ours {
                foreign_jumps.push(rule.to_string());
            }
        }
    }
    if ours.is_empty() && foreign_jumps.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for c in &ours {
        let _ = writeln!(s, ":{c} - [0:0]"); // declaring a chain in --noflush mode flushes it
    }
    for r in &foreign_jumps {
        let _ = writeln!(s, "-D {r}");
    }
    for c in &ours {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Service> {
        services(3, 2, Ipv4Addr::new(10, 240, 0, 3), &[8080, 8081]).unwrap()
    }

    #[test]
    fn the_node_port_path_walks_every_service_then_reaches_the_tested_one() {
        let svcs = sample();
        let s = iptables_nodeport_script(&svcs, Ipv4Addr::new(192, 0, 2, 2), 30080);
        let lines: Vec<&str> = s.lines().collect();
        // Appended to the services chain: after every ClusterIP rule of the earlier scripts.
        assert!(lines.iter().any(|l| l.starts_with("-A TAPBENCH-SERVICES ")
            && l.ends_with("--dst-type LOCAL -j TAPBENCH-NODEPORTS")));
        assert!(lines.contains(&"-A TAPBENCH-EXT-00002 -j TAPBENCH-SVC-00002"));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("-A TAPBENCH-NODEPORTS -p tcp")
                    && l.contains("--dport 30080 -j TAPBENCH-EXT-00002"))
        );
        // Built-in chains only ever jump to our chains (what `remove` finds and deletes).
        for l in lines
            .iter()
            .filter(|l| l.contains("PREROUTING 1") || l.contains("POSTROUTING 1"))
        {
            assert!(l.contains("-j TAPBENCH-"), "{l}");
        }
        assert!(s.contains("-d 192.0.2.2/32 -p tcp -m tcp --dport 30080"));
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn tested_service_is_last_and_real() {
        let s = sample();
        assert_eq!(s.len(), 3);
        assert_eq!(tested(&s).vip, Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(
            tested(&s).backends,
            vec![
                (Ipv4Addr::new(10, 240, 0, 3), 8080),
                (Ipv4Addr::new(10, 240, 0, 3), 8081)
            ]
        );
        assert_eq!(s[0].backends[0], (Ipv4Addr::new(100, 64, 0, 1), 8080));
    }

    #[test]
    fn iptables_probabilities_and_last_rule() {
        let s = iptables_scripts(&sample(), (Ipv4Addr::new(10, 240, 0, 0), 16), None).join("");
        assert!(s.contains("--probability 0.50000000000 -j TAPBENCH-SEP-00002-00"));
        assert!(s.contains("-A TAPBENCH-SVC-00002 -m comment --comment \"bench/bench-svc-2:http -> 10.240.0.3:8081\" -j TAPBENCH-SEP-00002-01"));
        let services_rules: Vec<_> = s
            .lines()
            .filter(|l| l.starts_with("-A TAPBENCH-SERVICES"))
            .collect();
        assert!(services_rules.last().unwrap().contains("198.18.0.3/32"));
    }

    #[test]
    fn removal_script_finds_our_chains_and_jump() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:OTHER - [0:0]\n:TAPBENCH-SERVICES - [0:0]\n\
                     -A PREROUTING -d 198.18.0.0/16 -m comment --comment \"x\" -j TAPBENCH-SERVICES\n\
                     -A PREROUTING -j OTHER\nCOMMIT\n";
        let s = iptables_removal_script(saved).unwrap();
        assert!(s.contains("-D PREROUTING -d 198.18.0.0/16"));
        assert!(!s.contains("OTHER"));
        assert!(s.contains("-X TAPBENCH-SERVICES"));
        assert!(iptables_removal_script("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").is_none());
    }

    #[test]
    fn nft_json_parsing() {
        let chains = r#"{"nftables": [{"metainfo": {}}, {"chain": {"family": "ip", "table": "nat", "name": "TAPBENCH-SVC-00001", "handle": 5}}, {"chain": {"family": "ip", "table": "nat", "name": "PREROUTING", "handle": 1}}, {"chain": {"family": "ip", "table": "other", "name": "TAPBENCH-X", "handle": 2}}]}"#;
        assert_eq!(
            nat_chains_with_prefix(chains).unwrap(),
            vec!["TAPBENCH-SVC-00001"]
        );
        let rules = r#"{"nftables": [{"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "handle": 7, "expr": [{"counter": null}, {"jump": {"target": "TAPBENCH-SERVICES"}}]}}, {"rule": {"handle": 8, "expr": [{"jump": {"target": "KUBE-SERVICES"}}]}}]}"#;
        assert_eq!(rule_handles_jumping_to_prefix(rules).unwrap(), vec![7]);
    }

    #[test]
    fn nft_chunks_hook_last() {
        let s = services(5, 2, Ipv4Addr::new(10, 240, 0, 3), &[8080, 8081]).unwrap();
        let scripts = nft_scripts(&s, (Ipv4Addr::new(10, 240, 0, 0), 16), Some(2));
        assert_eq!(scripts.len(), 3);
        assert!(scripts[0].starts_with("add table"));
        assert!(!scripts[1].contains("add table"));
        assert!(scripts[2].contains("hook prerouting"));
        assert!(!scripts[0].contains("hook prerouting"));
        assert!(scripts[2].contains("service-00004-bench-svc-4-http"));
        let ipt = iptables_scripts(&s, (Ipv4Addr::new(10, 240, 0, 0), 16), Some(2));
        assert_eq!(ipt.len(), 3);
        assert!(ipt[0].contains(":TAPBENCH-SERVICES"));
        assert!(!ipt[1].contains(":TAPBENCH-SERVICES"));
        assert!(ipt[2].contains("-I PREROUTING"));
        assert!(ipt[1].contains("-A TAPBENCH-SERVICES -d"));
    }
}
