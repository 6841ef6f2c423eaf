//! CNI end to end: network configuration lists executed by a spec-exact runtime
//! (`tapestry_tests::cni`), first with the reference plugins alone, then with `tapestry-cni`
//! chained after them and a real `tapestryd`, and finally under podman as a real runtime.
//!
//! Needs root, bpffs and `ip` (the lab policy: skipped, or failed under `CI=...`), plus:
//! - Debian's reference plugins in /usr/lib/cni (`containernetworking-plugins`, CNI <= 1.0.0);
//! - reference plugins v1.10.0 for CNI 1.1.0 (`scripts/install-cni-plugins.sh`; directory from
//!   `$TAPESTRY_CNI_PLUGINS_DIR`, else `~/.cache/tapestry/cni-plugins-v1.10.0`);
//! - `tapestry-cni` and a `tapestryd` that can load its datapath, in
//!   `tapestry_tests::daemon::bin_dir()` (`$TAPESTRY_BIN_DIR`);
//! - podman, runc and busybox-static for the podman test.
//!
//! Each missing piece skips the tests that need it (or fails them under `CI`).
//!
//! Every test takes a [`Lab`] for its unique prefix and /24: the bridge is `<prefix>-br`, the
//! sandboxes are namespaces `<prefix>-<tag>`, host-local hands out the lab's pod range, so the
//! lab's teardown removes whatever a failed test leaves behind and restores `ip_forward` (which
//! the bridge and ptp plugins turn on). host-local, tuning and the result cache keep their state
//! in per-test temporary directories.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tapestry_api::types::EndpointInfo;
use tapestry_tests::cmd::run;
use tapestry_tests::cni::{
    CniError, NetworkConfigList, Runtime, RuntimeConf, parse_cidr, version_ge,
};
use tapestry_tests::daemon::{Daemon, bin_dir, binary};
use tapestry_tests::{Lab, require_lab};

// ---------------------------------------------------------------------------------------------
// Prerequisites beyond the lab
// ---------------------------------------------------------------------------------------------

/// The lab's policy for a missing prerequisite: fail under `CI`, else print `skipped: <why>`.
fn unavailable(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set and a prerequisite is missing: {why}");
    }
    eprintln!("skipped: {why}");
}

/// `let x = require!(expr_returning_Result<T, String>);` or skip/fail the test.
macro_rules! require {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(why) => {
                unavailable(&why);
                return;
            }
        }
    };
}

const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

fn debian_plugins() -> Result<PathBuf, String> {
    let d = PathBuf::from(DEBIAN_PLUGINS);
    if d.join("bridge").exists() && d.join("host-local").exists() && d.join("ptp").exists() {
        Ok(d)
    } else {
        Err(format!(
            "reference CNI plugins in {DEBIAN_PLUGINS} \
             (apt-get install containernetworking-plugins)"
        ))
    }
}

/// Reference plugins speaking CNI 1.1.0.
fn v110_plugins() -> Result<PathBuf, String> {
    let d = match std::env::var_os("TAPESTRY_CNI_PLUGINS_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = std::env::var_os("TAPESTRY_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                        .join(".cache/tapestry")
                });
            cache.join("cni-plugins-v1.10.0")
        }
    };
    if ["bridge", "ptp", "host-local", "tuning"]
        .iter()
        .all(|p| d.join(p).exists())
    {
        Ok(d)
    } else {
        Err(format!(
            "reference CNI plugins v1.10.0 in {} (run scripts/install-cni-plugins.sh)",
            d.display()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tapestry-cni-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network namespace standing in for a container's sandbox: `<lab prefix>-<tag>`, removed
/// with the lab.
struct Sandbox {
    name: String,
    path: PathBuf,
}

fn sandbox(lab: &Lab, tag: &str) -> Sandbox {
    let name = format!("{}-{tag}", lab.prefix());
    run(Command::new("ip").args(["netns", "add", &name])).unwrap();
    run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"])).unwrap();
    Sandbox {
        path: PathBuf::from("/run/netns").join(&name),
        name,
    }
}

/// `ip -j -d link show dev DEV` in a namespace (`None`: the root namespace); `None` when absent.
fn link(netns: Option<&str>, dev: &str) -> Option<Value> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-j", "-d", "addr", "show", "dev", dev]);
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0).cloned()
}

/// Names of every link in a namespace.
fn links(netns: &str) -> BTreeSet<String> {
    let out = run(Command::new("ip").args(["-n", netns, "-j", "link", "show"])).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// IPv4 addresses (`a.b.c.d/len`) of a link description from [`link`].
fn ipv4s(link: &Value) -> Vec<String> {
    link["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["family"] == "inet")
                .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

fn root_link_exists(dev: &str) -> bool {
    Path::new("/sys/class/net").join(dev).exists()
}

/// The lab's addresses for a CNI network: host-local's range is the lab's pod /25.
struct NetParams {
    subnet: String,
    gateway: Ipv4Addr,
    bridge: String,
    data_dir: PathBuf,
}

impl NetParams {
    fn new(lab: &Lab, state: &TempDir) -> NetParams {
        let (net, len) = lab.pod_cidr();
        let o = net.octets();
        NetParams {
            subnet: format!("{net}/{len}"),
            gateway: Ipv4Addr::new(o[0], o[1], o[2], 1),
            bridge: format!("{}-br", lab.prefix()),
            data_dir: state.join("ipam"),
        }
    }

    fn ipam(&self) -> Value {
        json!({
            "type": "host-local",
            "dataDir": self.data_dir,
            "ranges": [[{"subnet": self.subnet, "gateway": self.gateway.to_string()}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        })
    }

    fn in_subnet(&self, cidr: &str) -> bool {
        let (ip, _) = parse_cidr(cidr).unwrap();
        let (net, len) = parse_cidr(&self.subnet).unwrap();
        match (ip, net) {
            (std::net::IpAddr::V4(ip), std::net::IpAddr::V4(net)) => {
                let mask = u32::MAX << (32 - len);
                u32::from(ip) & mask == u32::from(net) & mask
            }
            _ => false,
        }
    }

    /// host-local's reservation file for an address (`<dataDir>/<network>/<ip>`).
    fn reservation(&self, network: &str, cidr: &str) -> PathBuf {
        let (ip, _) = parse_cidr(cidr).unwrap();
        self.data_dir.join(network).join(ip.to_string())
    }
}

/// The pod MTU the primaries set (not the 1500 default, so that "the tap has eth0's MTU" means
/// something).
const PRIMARY_MTU: u32 = 1450;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Primary {
    Bridge,
    Ptp,
}

impl Primary {
    fn name(self) -> &'static str {
        match self {
            Primary::Bridge => "bridge",
            Primary::Ptp => "ptp",
        }
    }

    fn conf(self, net: &NetParams) -> Value {
        match self {
            Primary::Bridge => json!({
                "type": "bridge", "bridge": net.bridge, "isGateway": true, "ipMasq": false,
                "mtu": PRIMARY_MTU, "ipam": net.ipam(),
            }),
            Primary::Ptp => json!({
                "type": "ptp", "ipMasq": false, "mtu": PRIMARY_MTU, "ipam": net.ipam(),
            }),
        }
    }
}

fn list(name: &str, version: &str, plugins: Vec<Value>) -> NetworkConfigList {
    NetworkConfigList::from_value(&json!({
        "cniVersion": version, "name": name, "plugins": plugins,
    }))
    .unwrap()
}

/// The single address of the sandbox interface in a 0.3.0+ result, checked against the
/// interface list: `(address, the interface entry)`.
fn sandbox_ip(result: &Value, ifname: &str, netns: &Path) -> (String, Value) {
    let interfaces = result["interfaces"].as_array().expect("interfaces");
    let ips = result["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 1, "one address expected: {result}");
    let idx = ips[0]["interface"].as_u64().expect("ips[0].interface") as usize;
    let itf = interfaces[idx].clone();
    assert_eq!(itf["name"], ifname, "ips[0] points at {itf}: {result}");
    assert_eq!(
        itf["sandbox"],
        netns.to_str().unwrap(),
        "the sandbox interface carries CNI_NETNS: {result}"
    );
    (ips[0]["address"].as_str().unwrap().to_string(), itf)
}

/// Host-side interfaces of a result (no sandbox), except the bridge itself.
fn host_veths(result: &Value, bridge: &str) -> Vec<String> {
    result["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["sandbox"].as_str().unwrap_or_default().is_empty())
                .filter_map(|i| i["name"].as_str().map(str::to_string))
                .filter(|n| n != bridge)
                .collect()
        })
        .unwrap_or_default()
}

fn cache_entries(rt: &Runtime) -> usize {
    rt.cached_attachments().unwrap().len()
}

// ---------------------------------------------------------------------------------------------
// Reference plugins alone
// ---------------------------------------------------------------------------------------------

/// ADD, CHECK, DEL, DEL again of `<primary>+host-local` (+ `tuning` from 0.3.0, where chaining
/// exists) at every version the primary reports.
fn reference_lifecycle(dir: PathBuf, primary: Primary, tag: &str) {
    let lab = Lab::new(&format!("cni-ref-{tag}-{}", primary.name())).unwrap();
    let state = TempDir::new(&format!("ref-{tag}"));
    let net = NetParams::new(&lab, &state);
    let rt = Runtime::new([&dir], state.join("cache"));
    let versions = rt.version(primary.name()).unwrap().supported_versions;
    let tuning_versions = rt.version("tuning").unwrap();
    assert!(
        versions.iter().any(|v| v == "1.0.0"),
        "{primary:?} in {} supports {versions:?}",
        dir.display()
    );
    let network = format!("ref-{}", primary.name());
    for (i, version) in versions.iter().enumerate() {
        let chained = version_ge(version, "0.3.0");
        if chained {
            assert!(tuning_versions.supports(version));
        }
        let mut plugins = vec![primary.conf(&net)];
        if chained {
            plugins.push(json!({"type": "tuning", "mtu": 1400, "dataDir": state.join("tuning")}));
        }
        let l = list(&network, version, plugins);
        let sb = sandbox(&lab, &format!("v{i}"));
        let conf = RuntimeConf::new(&format!("ref{i}"), &sb.path, "eth0")
            .arg("IgnoreUnknown", "1")
            .arg("K8S_POD_NAME", "ref");
        let ctx = format!("{primary:?} {} @ {version}", dir.display());

        rt.clear_history();
        let result = rt
            .add(&l, &conf)
            .unwrap_or_else(|e| panic!("{ctx}: ADD: {e}"));
        assert_eq!(result["cniVersion"], version.as_str(), "{ctx}");
        let eth0 = link(Some(&sb.name), "eth0").unwrap_or_else(|| panic!("{ctx}: no eth0"));
        let (addr, hosts) = if chained {
            let (addr, itf) = sandbox_ip(&result, "eth0", &sb.path);
            assert_eq!(itf["mac"], eth0["address"], "{ctx}: result MAC is eth0's");
            // tuning ran after the primary with its result: it found eth0 and set the MTU.
            assert_eq!(eth0["mtu"], 1400, "{ctx}: tuning did not apply");
            let hist = rt.history();
            assert_eq!(hist.len(), 2, "{ctx}");
            assert_eq!(
                hist[1].stdin_json().unwrap()["prevResult"],
                serde_json::from_str::<Value>(&hist[0].stdout).unwrap(),
                "{ctx}: tuning's prevResult is the primary's result"
            );
            assert!(hist[0].stdin_json().unwrap().get("prevResult").is_none());
            (addr, host_veths(&result, &net.bridge))
        } else {
            // 0.1.0 / 0.2.0 results: {"ip4": {"ip", "gateway", "routes"}}.
            let addr = result["ip4"]["ip"].as_str().expect("ip4.ip").to_string();
            (addr, Vec::new())
        };
        assert!(net.in_subnet(&addr), "{ctx}: {addr} outside {}", net.subnet);
        assert_eq!(
            ipv4s(&eth0),
            vec![addr.clone()],
            "{ctx}: eth0 has the address"
        );
        assert!(net.reservation(&network, &addr).exists(), "{ctx}: reserved");
        for h in &hosts {
            assert!(root_link_exists(h), "{ctx}: host veth {h} exists");
        }
        assert_eq!(cache_entries(&rt), 1, "{ctx}: result cached");

        if version_ge(version, "0.4.0") {
            rt.check(&l, &conf)
                .unwrap_or_else(|e| panic!("{ctx}: CHECK: {e}"));
            // CHECK really checks: without its address the attachment is broken.
            run(Command::new("ip").args(["-n", &sb.name, "addr", "flush", "dev", "eth0"])).unwrap();
            let err = rt
                .check(&l, &conf)
                .expect_err("CHECK after losing the address");
            assert!(
                err.plugin() == Some(primary.name()) && err.code().is_some(),
                "{ctx}: {err}"
            );
        } else {
            let err = rt.check(&l, &conf).unwrap_err();
            assert!(matches!(err, CniError::Runtime(_)), "{ctx}: {err}");
        }

        rt.clear_history();
        rt.del(&l, &conf)
            .unwrap_or_else(|e| panic!("{ctx}: DEL: {e}"));
        let hist = rt.history();
        let order: Vec<&str> = hist.iter().map(|h| h.plugin.as_str()).collect();
        let mut expected = vec![primary.name()];
        if chained {
            expected.insert(0, "tuning");
        }
        assert_eq!(order, expected, "{ctx}: DEL runs in reverse order");
        for h in &hist {
            let prev = h.stdin_json().unwrap().get("prevResult").cloned();
            if version_ge(version, "0.4.0") {
                assert_eq!(
                    prev.as_ref(),
                    Some(&result),
                    "{ctx}: DEL carries the ADD result"
                );
            } else {
                assert_eq!(prev, None, "{ctx}: no prevResult on DEL before 0.4.0");
            }
        }
        assert!(link(Some(&sb.name), "eth0").is_none(), "{ctx}: eth0 left");
        assert!(
            !net.reservation(&network, &addr).exists(),
            "{ctx}: address kept"
        );
        for h in &hosts {
            assert!(!root_link_exists(h), "{ctx}: host veth {h} left");
        }
        assert_eq!(cache_entries(&rt), 0, "{ctx}: cache entry left");
        rt.del(&l, &conf)
            .unwrap_or_else(|e| panic!("{ctx}: second DEL: {e}"));
    }
    lab.destroy().unwrap();
}

/// A table of lifecycle tests: one `#[test]` per row, `name => lifecycle(plugins, Primary, tag)`,
/// each skipped (or failed under `CI`) on its own when its plugin set is missing.
macro_rules! lifecycle_tests {
    ($($test:ident => $lifecycle:ident($plugins:ident, $primary:ident, $tag:literal);)+) => {$(
        #[test]
        fn $test() {
            require_lab!();
            let dir = require!($plugins());
            $lifecycle(dir, Primary::$primary, $tag);
        }
    )+};
}

lifecycle_tests! {
    debian_bridge_every_version => reference_lifecycle(debian_plugins, Bridge, "deb");
    debian_ptp_every_version => reference_lifecycle(debian_plugins, Ptp, "deb");
    v110_bridge_every_version => reference_lifecycle(v110_plugins, Bridge, "110");
    v110_ptp_every_version => reference_lifecycle(v110_plugins, Ptp, "110");
}

/// GC (1.1.0): the runtime DELs cached attachments that are no longer valid, and every plugin
/// gets `cni.dev/valid-attachments` (host-local releases addresses of the others).
#[test]
fn v110_gc_and_status() {
    require_lab!();
    let dir = require!(v110_plugins());
    let lab = Lab::new("cni-ref-gc").unwrap();
    let state = TempDir::new("ref-gc");
    let net = NetParams::new(&lab, &state);
    let rt = Runtime::new([&dir], state.join("cache"));
    let l = list("ref-gc", "1.1.0", vec![Primary::Bridge.conf(&net)]);
    rt.status(&l).unwrap();

    let sbs: Vec<Sandbox> = (0..3).map(|i| sandbox(&lab, &format!("gc{i}"))).collect();
    let confs: Vec<RuntimeConf> = sbs
        .iter()
        .enumerate()
        .map(|(i, sb)| RuntimeConf::new(&format!("gc{i}"), &sb.path, "eth0"))
        .collect();
    let addrs: Vec<String> = confs
        .iter()
        .zip(&sbs)
        .map(|(c, sb)| sandbox_ip(&rt.add(&l, c).unwrap(), "eth0", &sb.path).0)
        .collect();

    // 1. Plugin GC alone: a runtime that lost its cache (a restarted runtime) knows only the
    //    valid list, so it only calls GC on the plugins, with exactly the spec's input.
    let forgetful = Runtime::new([&dir], state.join("cache2"));
    let valid = vec![confs[0].attachment(), confs[1].attachment()];
    forgetful.gc(&l, &valid).unwrap();
    let hist = forgetful.history();
    assert_eq!(hist.len(), 1, "one GC call for one plugin: {hist:?}");
    assert_eq!(hist[0].command(), "GC");
    let mut env_keys: Vec<&str> = hist[0].env.iter().map(|(k, _)| k.as_str()).collect();
    env_keys.sort();
    assert_eq!(env_keys, ["CNI_COMMAND", "CNI_PATH"]);
    let gc_conf = hist[0].stdin_json().unwrap();
    assert_eq!(
        gc_conf["cni.dev/valid-attachments"],
        json!([{"containerID": "gc0", "ifname": "eth0"}, {"containerID": "gc1", "ifname": "eth0"}])
    );
    assert!(link(Some(&sbs[2].name), "eth0").is_some(), "GC is not DEL");
    // The bridge plugin v1.10.0 has no GC of its own (`/* FIXME GC */` in bridge.go) and so does
    // not forward GC to its IPAM plugin as the spec requires: the stale reservation stays.
    assert!(net.reservation("ref-gc", &addrs[2]).exists());
    // host-local's own GC, given what the bridge should forward, releases exactly gc2's address.
    let env = vec![
        ("CNI_COMMAND".to_string(), "GC".to_string()),
        ("CNI_PATH".to_string(), forgetful.cni_path()),
    ];
    forgetful
        .invoke("host-local", &env, gc_conf.to_string().as_bytes())
        .unwrap();
    assert!(net.reservation("ref-gc", &addrs[0]).exists());
    assert!(net.reservation("ref-gc", &addrs[1]).exists());
    assert!(
        !net.reservation("ref-gc", &addrs[2]).exists(),
        "host-local GC kept the address of an attachment not in the valid list"
    );

    // 2. Runtime GC with its cache: gc1 and gc2 are stale and get a DEL.
    rt.gc(&l, &[confs[0].attachment()]).unwrap();
    assert!(link(Some(&sbs[0].name), "eth0").is_some());
    assert!(
        link(Some(&sbs[1].name), "eth0").is_none(),
        "stale gc1 not deleted"
    );
    assert!(
        link(Some(&sbs[2].name), "eth0").is_none(),
        "stale gc2 not deleted"
    );
    assert!(net.reservation("ref-gc", &addrs[0]).exists());
    assert!(!net.reservation("ref-gc", &addrs[1]).exists());
    let cached: Vec<String> = rt
        .cached_attachments()
        .unwrap()
        .into_iter()
        .map(|a| a.conf.container_id)
        .collect();
    assert_eq!(cached, ["gc0"]);

    // 3. disableGC: nothing runs.
    let disabled = NetworkConfigList::from_value(&json!({
        "cniVersion": "1.1.0", "name": "ref-gc", "disableGC": true,
        "plugins": [Primary::Bridge.conf(&net)],
    }))
    .unwrap();
    rt.clear_history();
    rt.gc(&disabled, &[]).unwrap();
    assert!(rt.history().is_empty());
    assert!(net.reservation("ref-gc", &addrs[0]).exists());

    rt.del(&l, &confs[0]).unwrap();
    assert!(!net.reservation("ref-gc", &addrs[0]).exists());
    // Below 1.1.0 there is no STATUS to call.
    assert!(matches!(
        rt.status(&l.with_version("1.0.0").unwrap()),
        Err(CniError::Runtime(_))
    ));
    lab.destroy().unwrap();
}

/// The reference plugins' error objects, as the spec assigns codes.
#[test]
fn reference_error_codes() {
    require_lab!();
    let deb = require!(debian_plugins());
    let lab = Lab::new("cni-ref-errors").unwrap();
    let state = TempDir::new("ref-err");
    let net = NetParams::new(&lab, &state);
    let rt = Runtime::new([&deb], state.join("cache"));
    let sb = sandbox(&lab, "err");
    let conf = RuntimeConf::new("err1", &sb.path, "eth0");

    // Debian's plugins stop at 1.0.0: a 1.1.0 list is refused with code 1, nothing created.
    let l110 = list("ref-err", "1.1.0", vec![Primary::Bridge.conf(&net)]);
    let err = rt.add(&l110, &conf).unwrap_err();
    assert_eq!(err.code(), Some(1), "{err}");
    assert!(link(Some(&sb.name), "eth0").is_none());
    assert_eq!(cache_entries(&rt), 0, "a failed ADD is not cached");

    let good = serde_json::to_vec(&json!({
        "cniVersion": "1.0.0", "name": "ref-err", "type": "bridge", "bridge": net.bridge,
        "ipam": net.ipam(),
    }))
    .unwrap();
    // Bad JSON: 6 (decoding failure).
    let env = rt.attachment_env("ADD", &conf);
    let err = rt.invoke("bridge", &env, b"{not json").unwrap_err();
    assert_eq!(err.code(), Some(6), "{err}");
    // A missing required variable: 4, naming it.
    let env: Vec<_> = rt
        .attachment_env("ADD", &conf)
        .into_iter()
        .filter(|(k, _)| k != "CNI_CONTAINERID")
        .collect();
    let err = rt.invoke("bridge", &env, &good).unwrap_err();
    assert_eq!(err.code(), Some(4), "{err}");
    assert!(err.error_object().unwrap().msg.contains("CNI_CONTAINERID"));
    // CHECK on a 0.3.1 configuration: 1.
    let mut v031: Value = serde_json::from_slice(&good).unwrap();
    v031["cniVersion"] = json!("0.3.1");
    let env = rt.attachment_env("CHECK", &conf);
    let err = rt
        .invoke("bridge", &env, v031.to_string().as_bytes())
        .unwrap_err();
    assert_eq!(err.code(), Some(1), "{err}");
    // Nothing of the above created anything.
    assert_eq!(links(&sb.name), BTreeSet::from(["lo".to_string()]));

    // A chain failing at its second plugin: the error is the second plugin's, the ADD is not
    // cached, and the DEL a runtime owes after a failed ADD releases the first plugin's address.
    let failing = list(
        "ref-err",
        "1.0.0",
        vec![
            Primary::Bridge.conf(&net),
            json!({"type": "tuning", "mac": "not-a-mac", "dataDir": state.join("tuning")}),
        ],
    );
    let err = rt.add(&failing, &conf).unwrap_err();
    assert!(
        matches!(&err, CniError::Plugin(f) if f.plugin == "tuning" && f.command == "ADD"),
        "{err}"
    );
    assert_eq!(cache_entries(&rt), 0);
    assert_eq!(
        std::fs::read_dir(net.data_dir.join("ref-err"))
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("10."))
            .count(),
        1,
        "the bridge's address is still reserved before DEL"
    );
    rt.del(&failing, &conf).unwrap();
    assert!(link(Some(&sb.name), "eth0").is_none());
    assert_eq!(
        std::fs::read_dir(net.data_dir.join("ref-err"))
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("10."))
            .count(),
        0
    );

    // Unknown plugin: the runtime's own error.
    let missing = list("ref-err", "1.0.0", vec![json!({"type": "no-such-plugin"})]);
    assert!(matches!(
        rt.add(&missing, &conf),
        Err(CniError::Runtime(m)) if m.contains("no-such-plugin")
    ));
    lab.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------------
// tapestry-cni chained after a primary, with a real tapestryd
// ---------------------------------------------------------------------------------------------

/// The directory holding `tapestry-cni` and `tapestryd`.
fn tapestry_bins() -> Result<PathBuf, String> {
    binary("tapestry-cni").map_err(|e| format!("{e:#}"))?;
    binary("tapestryd").map_err(|e| format!("{e:#}"))?;
    Ok(bin_dir())
}

fn start_daemon(name: &str) -> Daemon {
    Daemon::start(name, "services: []", &[]).unwrap_or_else(|e| {
        panic!(
            "starting tapestryd from {} (built without AYA_BUILD_SKIP?): {e:#}",
            bin_dir().display()
        )
    })
}

fn tapestry_conf(socket: &Path, vm: bool) -> Value {
    json!({"type": "tapestry-cni", "socket": socket, "vm": {"enabled": vm}, "logLevel": "debug"})
}

fn endpoint(d: &Daemon, container_id: &str, ifname: &str) -> Option<EndpointInfo> {
    d.client()
        .endpoints()
        .unwrap()
        .into_iter()
        .find(|e| e.request.container_id == container_id && e.request.ifname == ifname)
}

fn attached(d: &Daemon, ifname: &str) -> Option<u32> {
    d.client()
        .attachments()
        .unwrap()
        .into_iter()
        .find(|a| a.ifname == ifname)
        .map(|a| a.ifindex)
}

/// The pod's host-side veth among a result's host interfaces (the bridge is not a veth).
fn host_veth(result: &Value) -> String {
    let hosts: Vec<String> = host_veths(result, "");
    let veths: Vec<&String> = hosts
        .iter()
        .filter(|n| link(None, n).is_some_and(|l| l["linkinfo"]["info_kind"] == "veth"))
        .collect();
    assert_eq!(veths.len(), 1, "one host veth in {result}");
    veths[0].clone()
}

fn ifindex(netns: Option<&str>, dev: &str) -> u32 {
    link(netns, dev).unwrap()["ifindex"].as_u64().unwrap() as u32
}

/// Sorted JSON values of `result[key]`, treating absent and null as empty.
fn items(result: &Value, key: &str) -> Vec<String> {
    let mut v: Vec<String> = result[key]
        .as_array()
        .map(|a| a.iter().map(|x| x.to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Everything `tapestry-cni` must leave in place for a plain pod: the primary's interfaces, ips,
/// routes and dns.
fn assert_passes_through(ctx: &str, primary: &Value, result: &Value) {
    assert_eq!(
        result["interfaces"], primary["interfaces"],
        "{ctx}: interfaces"
    );
    assert_eq!(result["ips"], primary["ips"], "{ctx}: ips");
    assert_eq!(
        items(result, "routes"),
        items(primary, "routes"),
        "{ctx}: routes"
    );
    let dns = |v: &Value| match &v["dns"] {
        Value::Object(o) if !o.is_empty() => Value::Object(o.clone()),
        _ => Value::Null,
    };
    assert_eq!(dns(result), dns(primary), "{ctx}: dns");
}

/// The versions `tapestry-cni` and the primary in `dir` both speak, from 0.3.0 (chaining).
fn chain_versions(rt: &Runtime, primary: Primary) -> Vec<String> {
    let ours = rt.version("tapestry-cni").unwrap();
    let theirs = rt.version(primary.name()).unwrap();
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        assert!(ours.supports(v), "tapestry-cni lacks {v}: {ours:?}");
    }
    ours.supported_versions
        .iter()
        .filter(|v| version_ge(v, "0.3.0") && theirs.supports(v))
        .cloned()
        .collect()
}

/// ADD, CHECK, CHECK after the daemon lost the endpoint, DEL, DEL again, for a plain pod and a
/// VM pod at every version the chain speaks.
fn tapestry_lifecycle(dir: PathBuf, primary: Primary, tag: &str) {
    let bins = require!(tapestry_bins());
    let lab = Lab::new(&format!("cni-tap-{tag}-{}", primary.name())).unwrap();
    let state = TempDir::new(&format!("tap-{tag}"));
    let net = NetParams::new(&lab, &state);
    let daemon = start_daemon(&format!("cni-{tag}-{}", primary.name()));
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    let versions = chain_versions(&rt, primary);
    let network = format!("tap-{}", primary.name());
    let mut n = 0;
    for version in &versions {
        for vm in [false, true] {
            n += 1;
            let ctx = format!("{primary:?} {} @ {version} vm={vm}", dir.display());
            let l = list(
                &network,
                version,
                vec![primary.conf(&net), tapestry_conf(&daemon.socket, vm)],
            );
            let sb = sandbox(&lab, &format!("p{n}"));
            let cid = format!("tap{n}");
            let conf = RuntimeConf::new(&cid, &sb.path, "eth0")
                .arg("IgnoreUnknown", "1")
                .arg("K8S_POD_NAMESPACE", "default")
                .arg("K8S_POD_NAME", &format!("pod{n}"));

            rt.clear_history();
            let result = rt
                .add(&l, &conf)
                .unwrap_or_else(|e| panic!("{ctx}: ADD: {e}\n{}", daemon.log()));
            let hist = rt.history();
            let primary_result: Value = serde_json::from_str(&hist[0].stdout).unwrap();
            assert_eq!(result["cniVersion"], version.as_str(), "{ctx}");
            let (addr, eth0_itf) = sandbox_ip(&primary_result, "eth0", &sb.path);
            let host = host_veth(&primary_result);
            let eth0 = link(Some(&sb.name), "eth0").unwrap();
            assert_eq!(eth0["address"], eth0_itf["mac"], "{ctx}: eth0 kept its MAC");
            if vm {
                // The primary's interfaces and addresses, plus the tap in the sandbox.
                let mut expected = primary_result["interfaces"].as_array().unwrap().clone();
                let itfs = result["interfaces"].as_array().unwrap();
                assert_eq!(itfs.len(), expected.len() + 1, "{ctx}: {result}");
                assert_eq!(&itfs[..expected.len()], &expected[..], "{ctx}: {result}");
                let tap = &itfs[expected.len()];
                assert_eq!(tap["name"], "tap0", "{ctx}: {result}");
                assert_eq!(tap["sandbox"], sb.path.to_str().unwrap(), "{ctx}: {result}");
                expected.push(tap.clone());
                assert_eq!(result["ips"], primary_result["ips"], "{ctx}: ips");
                let tap0 = link(Some(&sb.name), "tap0").expect("tap0 in the sandbox");
                let info = &tap0["linkinfo"];
                assert_eq!(info["info_kind"], "tun", "{ctx}: {tap0}");
                assert_eq!(info["info_data"]["type"], "tap", "{ctx}: {tap0}");
                assert_eq!(info["info_data"]["user"], 107, "{ctx}: {tap0}");
                assert_eq!(info["info_data"]["group"], 107, "{ctx}: {tap0}");
                assert_eq!(eth0["mtu"], PRIMARY_MTU, "{ctx}");
                assert_eq!(tap0["mtu"], PRIMARY_MTU, "{ctx}: tap MTU is eth0's");
                if let Some(mac) = tap["mac"].as_str() {
                    assert_eq!(tap0["address"], mac, "{ctx}: result MAC of tap0");
                }
                assert_eq!(
                    ipv4s(&eth0),
                    Vec::<String>::new(),
                    "{ctx}: eth0 keeps no IPv4"
                );
            } else {
                assert_passes_through(&ctx, &primary_result, &result);
                assert!(
                    link(Some(&sb.name), "tap0").is_none(),
                    "{ctx}: tap for a pod"
                );
                assert_eq!(ipv4s(&eth0), vec![addr.clone()], "{ctx}");
            }

            // The daemon knows the endpoint and attached the datapath to its host veth.
            let ep = endpoint(&daemon, &cid, "eth0")
                .unwrap_or_else(|| panic!("{ctx}: no endpoint\n{}", daemon.log()));
            let r = &ep.request;
            assert_eq!(r.netns, sb.path.to_str().unwrap(), "{ctx}");
            assert_eq!(r.host_ifname, host, "{ctx}");
            assert_eq!(ep.host_ifindex, ifindex(None, &host), "{ctx}");
            assert_eq!(r.ips, vec![addr.clone()], "{ctx}");
            assert_eq!(r.gateway, Some(net.gateway), "{ctx}");
            assert_eq!(
                r.mac.map(|m| m.to_string()).as_deref(),
                eth0_itf["mac"].as_str(),
                "{ctx}"
            );
            let pod = r.pod.as_ref().expect("pod identity from CNI_ARGS");
            assert_eq!(
                (pod.namespace.as_str(), pod.name.as_str()),
                ("default", &*format!("pod{n}"))
            );
            match (&r.vm, vm) {
                (None, false) => {}
                (Some(v), true) => {
                    assert_eq!(v.tap, "tap0", "{ctx}");
                    assert_eq!(
                        Some(v.guest_mac.to_string().as_str()),
                        eth0_itf["mac"].as_str(),
                        "{ctx}"
                    );
                    // ptp routes the pod's subnet through the gateway, so the guest gets a /32
                    // and the routes; on a bridge the subnet is on-link and the prefix stays.
                    let expected = match primary {
                        Primary::Ptp => format!("{}/32", addr.split('/').next().unwrap()),
                        Primary::Bridge => addr.clone(),
                    };
                    assert_eq!(v.guest_ip, expected, "{ctx}");
                    assert_eq!(u64::from(v.mtu), eth0["mtu"].as_u64().unwrap(), "{ctx}");
                }
                (other, _) => panic!("{ctx}: endpoint vm = {other:?}"),
            }
            assert_eq!(
                attached(&daemon, &host),
                Some(ifindex(None, &host)),
                "{ctx}: datapath not attached to {host}"
            );

            if version_ge(version, "0.4.0") {
                // tapestry-cni's own CHECK: the same cache entry (network name, container,
                // ifname), only its step of the chain.
                let ours = list(&network, version, vec![tapestry_conf(&daemon.socket, vm)]);
                if vm {
                    // The reference primaries CHECK every prevResult address on eth0
                    // (ip.ValidateExpectedInterfaceIPs), and a VM pod's address belongs to the
                    // guest: the chain's CHECK fails in the primary, by design of both.
                    let err = rt.check(&l, &conf).expect_err("primary CHECK of a VM pod");
                    assert_eq!(err.plugin(), Some(primary.name()), "{ctx}: {err}");
                } else {
                    rt.check(&l, &conf)
                        .unwrap_or_else(|e| panic!("{ctx}: CHECK: {e}"));
                }
                rt.check(&ours, &conf)
                    .unwrap_or_else(|e| panic!("{ctx}: tapestry-cni CHECK: {e}"));
                if vm {
                    // The guest's tap gone: the VM is cut off.
                    run(Command::new("ip").args(["-n", &sb.name, "link", "del", "tap0"])).unwrap();
                } else {
                    // CHECK asks the daemon: an endpoint it lost is an error (a missing
                    // external dependency, spec section 2 CHECK).
                    daemon.client().delete_endpoint(&cid, "eth0").unwrap();
                }
                let err = rt
                    .check(&ours, &conf)
                    .expect_err("CHECK of a broken attachment");
                assert!(
                    err.plugin() == Some("tapestry-cni") && err.code().is_some(),
                    "{ctx}: {err}"
                );
            }

            rt.del(&l, &conf)
                .unwrap_or_else(|e| panic!("{ctx}: DEL: {e}\n{}", daemon.log()));
            assert!(
                endpoint(&daemon, &cid, "eth0").is_none(),
                "{ctx}: endpoint left"
            );
            assert_eq!(attached(&daemon, &host), None, "{ctx}: attachment left");
            assert_eq!(
                links(&sb.name),
                BTreeSet::from(["lo".to_string()]),
                "{ctx}: links left in the sandbox"
            );
            assert!(!root_link_exists(&host), "{ctx}: host veth left");
            rt.del(&l, &conf)
                .unwrap_or_else(|e| panic!("{ctx}: second DEL: {e}"));
        }
    }
    assert!(daemon.client().endpoints().unwrap().is_empty());
    lab.destroy().unwrap();
}

lifecycle_tests! {
    tapestry_after_debian_bridge => tapestry_lifecycle(debian_plugins, Bridge, "deb");
    tapestry_after_debian_ptp => tapestry_lifecycle(debian_plugins, Ptp, "deb");
    tapestry_after_v110_bridge => tapestry_lifecycle(v110_plugins, Bridge, "110");
    tapestry_after_v110_ptp => tapestry_lifecycle(v110_plugins, Ptp, "110");
}

/// GC and STATUS (1.1.0) through the chain.
#[test]
fn tapestry_gc_and_status() {
    require_lab!();
    let dir = require!(v110_plugins());
    let bins = require!(tapestry_bins());
    let lab = Lab::new("cni-tap-gc").unwrap();
    let state = TempDir::new("tap-gc");
    let net = NetParams::new(&lab, &state);
    let mut daemon = start_daemon("cni-gc");
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    let l = list(
        "tap-gc",
        "1.1.0",
        vec![
            Primary::Bridge.conf(&net),
            tapestry_conf(&daemon.socket, false),
        ],
    );
    rt.status(&l).unwrap();

    let mut confs = Vec::new();
    let mut hosts = Vec::new();
    for i in 0..3 {
        let sb = sandbox(&lab, &format!("gc{i}"));
        let conf = RuntimeConf::new(&format!("gc{i}"), &sb.path, "eth0");
        let result = rt.add(&l, &conf).unwrap();
        hosts.push(host_veth(&result));
        confs.push(conf);
    }
    let ids = |d: &Daemon| -> BTreeSet<String> {
        d.client()
            .endpoints()
            .unwrap()
            .into_iter()
            .map(|e| e.request.container_id)
            .collect()
    };
    assert_eq!(
        ids(&daemon),
        BTreeSet::from(["gc0".into(), "gc1".into(), "gc2".into()])
    );

    // Plugin GC alone (a runtime without the cache): the daemon drops gc2, keeps gc0 and gc1.
    let forgetful = Runtime::new([&dir, &bins], state.join("cache2"));
    forgetful
        .gc(&l, &[confs[0].attachment(), confs[1].attachment()])
        .unwrap_or_else(|e| panic!("GC: {e}\n{}", daemon.log()));
    assert_eq!(ids(&daemon), BTreeSet::from(["gc0".into(), "gc1".into()]));
    assert_eq!(
        attached(&daemon, &hosts[2]),
        None,
        "gc2's attachment survived GC"
    );
    assert!(attached(&daemon, &hosts[0]).is_some());
    // GC is scoped to its network: another network's GC with an empty list leaves these alone.
    let mut other = l.clone();
    other.name = "another-network".into();
    forgetful.gc(&other, &[]).unwrap();
    assert_eq!(ids(&daemon), BTreeSet::from(["gc0".into(), "gc1".into()]));
    // An empty valid list means every attachment is stale.
    forgetful.gc(&l, &[]).unwrap();
    assert!(
        ids(&daemon).is_empty(),
        "GC with no valid attachments kept some"
    );

    // The runtime's GC DELs its stale cached attachments (already gone from the daemon: DEL
    // must still succeed), and a DEL of the rest works too.
    rt.gc(&l, &[confs[0].attachment()]).unwrap();
    assert_eq!(rt.cached_attachments().unwrap().len(), 1);
    rt.del(&l, &confs[0]).unwrap();

    // STATUS: the daemon down is code 50 ("cannot service ADD").
    daemon.stop().unwrap();
    let err = rt.status(&l).unwrap_err();
    assert_eq!(err.code(), Some(50), "{err}");
    // GC cannot reach the daemon either: try again later (11).
    let err = forgetful.gc(&l, &[]).unwrap_err();
    assert_eq!(err.code(), Some(11), "{err}");
    assert!(
        err.plugin() == Some("tapestry-cni") && err.code().is_some(),
        "{err}"
    );
    daemon.restart().unwrap();
    rt.status(&l).unwrap();
    lab.destroy().unwrap();
}

/// The error codes the spec assigns, from tapestry-cni.
#[test]
fn tapestry_error_codes() {
    require_lab!();
    let dir = require!(v110_plugins());
    let bins = require!(tapestry_bins());
    let lab = Lab::new("cni-tap-errors").unwrap();
    let state = TempDir::new("tap-err");
    let net = NetParams::new(&lab, &state);
    let mut daemon = start_daemon("cni-err");
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    let sb = sandbox(&lab, "err");
    let conf = RuntimeConf::new("err1", &sb.path, "eth0");
    let tap = tapestry_conf(&daemon.socket, false);
    let supported = rt.version("tapestry-cni").unwrap();

    // A real prevResult to feed direct invocations.
    let primary_only = list("tap-err", "1.0.0", vec![Primary::Bridge.conf(&net)]);
    let prev = rt.add(&primary_only, &conf).unwrap();
    let stdin = |version: &str, prev: Option<&Value>| -> Vec<u8> {
        let mut c = tap.clone();
        c["cniVersion"] = json!(version);
        c["name"] = json!("tap-err");
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        serde_json::to_vec(&c).unwrap()
    };
    let code = |r: Result<Option<Value>, CniError>| -> u32 {
        let e = r.expect_err("an error");
        e.code().unwrap_or_else(|| panic!("no error object: {e}"))
    };
    let env = |cmd: &str| rt.attachment_env(cmd, &conf);

    // Chained plugin as the first in a list: no prevResult is an invalid config (7).
    let alone = list("tap-err", "1.0.0", vec![tap.clone()]);
    let err = rt.add(&alone, &conf).unwrap_err();
    assert_eq!(err.code(), Some(7), "{err}");
    let err = rt
        .invoke("tapestry-cni", &env("ADD"), &stdin("0.4.0", None))
        .unwrap_err();
    let obj = err.error_object().unwrap();
    assert_eq!(obj.code, 7, "{err}");
    assert_eq!(
        obj.cni_version.as_deref(),
        Some("0.4.0"),
        "the request's version"
    );
    // Undecodable stdin: 6.
    assert_eq!(
        code(rt.invoke("tapestry-cni", &env("ADD"), b"{\"cniVersion\": ")),
        6
    );
    assert_eq!(code(rt.invoke("tapestry-cni", &env("ADD"), b"[1, 2]")), 7);
    // Versions it does not speak: 1 (0.2.0 has no chaining; 2.0.0 does not exist).
    for v in ["0.2.0", "2.0.0"] {
        assert!(!supported.supports(v));
        let r = rt.invoke("tapestry-cni", &env("ADD"), &stdin(v, Some(&prev)));
        assert_eq!(code(r), 1, "cniVersion {v}");
    }
    // CHECK on 0.3.1: 1.
    let prev031 = tapestry_tests::cni::convert_result(&prev, "0.3.1").unwrap();
    assert_eq!(
        code(rt.invoke(
            "tapestry-cni",
            &env("CHECK"),
            &stdin("0.3.1", Some(&prev031))
        )),
        1
    );
    // The environment: 4, naming the variable.
    for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let e: Vec<_> = env("ADD")
            .into_iter()
            .filter(|(k, _)| k != missing)
            .collect();
        let err = rt
            .invoke("tapestry-cni", &e, &stdin("1.0.0", Some(&prev)))
            .unwrap_err();
        assert_eq!(err.code(), Some(4), "without {missing}: {err}");
        assert!(err.error_object().unwrap().msg.contains(missing), "{err}");
    }
    // Without CNI_COMMAND, like the reference plugins' skel: the "about" text on stderr, no
    // result, exit 0, nothing done.
    let e: Vec<_> = env("ADD")
        .into_iter()
        .filter(|(k, _)| k != "CNI_COMMAND")
        .collect();
    let out = rt
        .exec_raw("tapestry-cni", &e, &stdin("1.0.0", Some(&prev)))
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CNI protocol versions supported"));
    let mut e = env("ADD");
    e[0].1 = "FROB".into();
    assert_eq!(
        code(rt.invoke("tapestry-cni", &e, &stdin("1.0.0", Some(&prev)))),
        4
    );
    // None of that registered anything or made a tap.
    assert!(daemon.client().endpoints().unwrap().is_empty());
    assert!(link(Some(&sb.name), "tap0").is_none());
    rt.del(&primary_only, &conf).unwrap();

    // The daemon unreachable on ADD: 11 (try again later). The DEL the runtime owes after a
    // failed ADD, with the daemon back, leaves nothing: no tap, no link, no endpoint.
    for vm in [false, true] {
        let l = list(
            "tap-err",
            "1.0.0",
            vec![
                Primary::Bridge.conf(&net),
                tapestry_conf(&daemon.socket, vm),
            ],
        );
        daemon.stop().unwrap();
        let err = rt.add(&l, &conf).unwrap_err();
        assert_eq!(err.code(), Some(11), "vm={vm}: {err}");
        // The plugin undid its own part at once: no tap, eth0 as the primary left it.
        assert_eq!(
            links(&sb.name),
            BTreeSet::from(["eth0".to_string(), "lo".to_string()]),
            "vm={vm}"
        );
        let eth0 = link(Some(&sb.name), "eth0").unwrap();
        assert_eq!(
            ipv4s(&eth0).len(),
            1,
            "vm={vm}: eth0 lost its address: {eth0}"
        );
        assert_eq!(cache_entries(&rt), 0);
        daemon.restart().unwrap();
        rt.del(&l, &conf)
            .unwrap_or_else(|e| panic!("vm={vm}: DEL after failed ADD: {e}"));
        assert_eq!(
            links(&sb.name),
            BTreeSet::from(["lo".to_string()]),
            "vm={vm}"
        );
        assert!(daemon.client().endpoints().unwrap().is_empty(), "vm={vm}");
        assert!(daemon.client().attachments().unwrap().is_empty(), "vm={vm}");
    }

    // TAPESTRY_SOCKET in the environment wins over the conf's socket.
    let env_rt = Runtime::new([&dir, &bins], state.join("cache3"))
        .with_env("TAPESTRY_SOCKET", &daemon.socket);
    let l = list(
        "tap-err",
        "1.0.0",
        vec![
            Primary::Bridge.conf(&net),
            tapestry_conf(&state.join("nothing.sock"), false),
        ],
    );
    env_rt.add(&l, &conf).unwrap();
    assert!(endpoint(&daemon, "err1", "eth0").is_some());
    env_rt.del(&l, &conf).unwrap();
    assert!(endpoint(&daemon, "err1", "eth0").is_none());
    lab.destroy().unwrap();
}

/// What selects a VM pod besides `vm.enabled`: `TAPESTRY_VM=true` in CNI_ARGS, the pod
/// annotation `tapestry.dev/vm` and KubeVirt's element for the Tapestry binding in
/// `k8s.v1.cni.cncf.io/networks`, the annotations arriving as containerd's
/// `io.kubernetes.cri.pod-annotations` capability (only when the plugin declares it). A
/// virt-launcher pod that did not opt in (`kubevirt.io/domain` alone) is not one.
#[test]
fn tapestry_vm_selection() {
    require_lab!();
    let dir = require!(v110_plugins());
    let bins = require!(tapestry_bins());
    let lab = Lab::new("cni-tap-vmsel").unwrap();
    let state = TempDir::new("tap-vmsel");
    let net = NetParams::new(&lab, &state);
    let daemon = start_daemon("cni-vmsel");
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    const ANN: &str = "io.kubernetes.cri.pod-annotations";
    // What KubeVirt adds for a pod-network interface with the Tapestry binding.
    const TAPESTRY_BINDING: &str =
        r#"[{"name":"tapestry","namespace":"vms","cni-args":{"logicNetworkName":"default"}}]"#;
    let mut declared = tapestry_conf(&daemon.socket, false);
    declared["capabilities"] = json!({ ANN: true });
    let with_cap = list(
        "tap-vmsel",
        "1.0.0",
        vec![Primary::Bridge.conf(&net), declared],
    );
    let without_cap = list(
        "tap-vmsel",
        "1.0.0",
        vec![
            Primary::Bridge.conf(&net),
            tapestry_conf(&daemon.socket, false),
        ],
    );
    // (case, list, CNI_ARGS extra, annotations, expected: Some(guest hostname) for a VM pod)
    /// One pod: its CNI_ARGS extra, its annotations, and the guest hostname of a VM pod.
    struct Case<'a> {
        name: &'a str,
        list: &'a NetworkConfigList,
        arg: Option<(&'a str, &'a str)>,
        annotations: Value,
        vm_hostname: Option<&'a str>,
    }
    let case = |name, list, arg, annotations, vm_hostname| Case {
        name,
        list,
        arg,
        annotations,
        vm_hostname,
    };
    let cases = [
        case("plain", &with_cap, None, json!({}), None),
        case(
            "cni-args",
            &with_cap,
            Some(("TAPESTRY_VM", "true")),
            json!({}),
            Some("pod-cni-args"),
        ),
        case(
            "annotation",
            &with_cap,
            None,
            json!({"tapestry.dev/vm": "true"}),
            Some("pod-annotation"),
        ),
        case(
            "kubevirt-masquerade",
            &with_cap,
            None,
            json!({"kubevirt.io/domain": "vmi-m"}),
            None,
        ),
        case(
            "kubevirt-binding",
            &with_cap,
            None,
            json!({"kubevirt.io/domain": "vmi-a", "k8s.v1.cni.cncf.io/networks": TAPESTRY_BINDING}),
            Some("vmi-a"),
        ),
        case(
            "kubevirt-opt-out",
            &with_cap,
            None,
            json!({"kubevirt.io/domain": "vmi-b", "k8s.v1.cni.cncf.io/networks": TAPESTRY_BINDING,
                   "tapestry.dev/vm": "false"}),
            None,
        ),
        case(
            "undeclared",
            &without_cap,
            None,
            json!({"tapestry.dev/vm": "true"}),
            None,
        ),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        let Case {
            name: case,
            list: l,
            arg,
            annotations,
            vm_hostname: expect_vm,
        } = c;
        let sb = sandbox(&lab, &format!("s{i}"));
        let mut conf = RuntimeConf::new(&format!("sel{i}"), &sb.path, "eth0")
            .arg("IgnoreUnknown", "1")
            .arg("K8S_POD_NAMESPACE", "vms")
            .arg("K8S_POD_NAME", &format!("pod-{case}"))
            .capability(ANN, annotations);
        if let Some((k, v)) = arg {
            conf = conf.arg(k, v);
        }
        rt.add(l, &conf)
            .unwrap_or_else(|e| panic!("{case}: ADD: {e}\n{}", daemon.log()));
        let runtime_config =
            rt.history().last().unwrap().stdin_json().unwrap()["runtimeConfig"].clone();
        if std::ptr::eq(l, &without_cap) {
            assert_eq!(
                runtime_config,
                Value::Null,
                "{case}: undeclared capability passed"
            );
        }
        let ep = endpoint(&daemon, &format!("sel{i}"), "eth0").unwrap();
        match expect_vm {
            Some(hostname) => {
                let vm = ep
                    .request
                    .vm
                    .as_ref()
                    .unwrap_or_else(|| panic!("{case}: not a VM pod"));
                assert_eq!(vm.hostname.as_deref(), Some(hostname), "{case}");
                assert!(link(Some(&sb.name), "tap0").is_some(), "{case}: no tap0");
            }
            None => {
                assert!(ep.request.vm.is_none(), "{case}: a VM pod");
                assert!(link(Some(&sb.name), "tap0").is_none(), "{case}: tap0");
            }
        }
        rt.del(l, &conf).unwrap();
        assert!(
            link(Some(&sb.name), "tap0").is_none(),
            "{case}: tap0 after DEL"
        );
    }
    assert!(daemon.client().endpoints().unwrap().is_empty());
    lab.destroy().unwrap();
}

/// DEL in the situations runtimes produce: the daemon down (the pod side is cleaned, and the
/// daemon forgets the endpoint when it comes back), the namespace already gone, and
/// containerd's late DEL with an empty CNI_NETNS and no prevResult. A daemon restart keeps
/// live endpoints and their attachments.
#[test]
fn tapestry_del_edge_cases_and_restart() {
    require_lab!();
    let dir = require!(v110_plugins());
    let bins = require!(tapestry_bins());
    let lab = Lab::new("cni-tap-del").unwrap();
    let state = TempDir::new("tap-del");
    let net = NetParams::new(&lab, &state);
    let mut daemon = start_daemon("cni-del");
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    let pods = list(
        "tap-del",
        "1.0.0",
        vec![
            Primary::Bridge.conf(&net),
            tapestry_conf(&daemon.socket, false),
        ],
    );
    let vms = list(
        "tap-del",
        "1.0.0",
        vec![
            Primary::Bridge.conf(&net),
            tapestry_conf(&daemon.socket, true),
        ],
    );
    let add = |l: &NetworkConfigList, i: usize| -> (Sandbox, RuntimeConf, String) {
        let sb = sandbox(&lab, &format!("d{i}"));
        let conf = RuntimeConf::new(&format!("del{i}"), &sb.path, "eth0");
        let result = rt.add(l, &conf).unwrap();
        let host = host_veth(&result);
        (sb, conf, host)
    };

    // A restart keeps what is still there.
    let (_sb0, c0, h0) = add(&pods, 0);
    let (sb1, c1, h1) = add(&vms, 1);
    daemon.restart().unwrap();
    for (c, h) in [(&c0, &h0), (&c1, &h1)] {
        assert!(
            endpoint(&daemon, &c.container_id, "eth0").is_some(),
            "{} lost across a restart\n{}",
            c.container_id,
            daemon.log()
        );
        assert_eq!(
            attached(&daemon, h),
            Some(ifindex(None, h)),
            "{h} detached by a restart"
        );
    }
    rt.check(
        &list(
            "tap-del",
            "1.0.0",
            vec![tapestry_conf(&daemon.socket, true)],
        ),
        &c1,
    )
    .unwrap();

    // The daemon down: DEL still succeeds and cleans the pod side (the VM pod's tap).
    daemon.kill9().unwrap();
    rt.del(&vms, &c1)
        .unwrap_or_else(|e| panic!("DEL with the daemon down: {e}"));
    assert_eq!(links(&sb1.name), BTreeSet::from(["lo".to_string()]));
    daemon.restart().unwrap();
    assert!(
        endpoint(&daemon, "del1", "eth0").is_none(),
        "an endpoint deleted while the daemon was down came back\n{}",
        daemon.log()
    );
    assert_eq!(attached(&daemon, &h1), None);
    assert!(endpoint(&daemon, "del0", "eth0").is_some());
    rt.del(&pods, &c0).unwrap();

    // The namespace gone before DEL.
    let (sb2, c2, h2) = add(&vms, 2);
    run(Command::new("ip").args(["netns", "del", &sb2.name])).unwrap();
    rt.del(&vms, &c2)
        .unwrap_or_else(|e| panic!("DEL without the netns: {e}"));
    assert!(endpoint(&daemon, "del2", "eth0").is_none());
    assert_eq!(attached(&daemon, &h2), None);

    // containerd's late DEL: empty CNI_NETNS, no prevResult.
    let (_sb3, c3, h3) = add(&pods, 3);
    let mut late = c3.clone();
    late.netns = String::new();
    let mut stdin = tapestry_conf(&daemon.socket, false);
    stdin["cniVersion"] = json!("1.0.0");
    stdin["name"] = json!("tap-del");
    rt.invoke(
        "tapestry-cni",
        &rt.attachment_env("DEL", &late),
        stdin.to_string().as_bytes(),
    )
    .unwrap_or_else(|e| panic!("late DEL: {e}"));
    assert!(endpoint(&daemon, "del3", "eth0").is_none());
    assert_eq!(attached(&daemon, &h3), None);
    rt.del(&pods, &c3).unwrap();
    assert!(daemon.client().endpoints().unwrap().is_empty());
    lab.destroy().unwrap();
}

/// Pods set up and torn down in parallel (kubelet does that), 20 at once, half of them VM pods:
/// the daemon enters each pod's namespace and loads each guest's programs with no lock held, so
/// these ADDs really run side by side.
#[test]
fn tapestry_parallel_pods() {
    require_lab!();
    let dir = require!(v110_plugins());
    let bins = require!(tapestry_bins());
    let lab = Lab::new("cni-tap-par").unwrap();
    let state = TempDir::new("tap-par");
    let net = NetParams::new(&lab, &state);
    let daemon = start_daemon("cni-par");
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    let lists: Vec<NetworkConfigList> = [false, true]
        .iter()
        .map(|&vm| {
            list(
                "tap-par",
                "1.1.0",
                vec![
                    Primary::Bridge.conf(&net),
                    tapestry_conf(&daemon.socket, vm),
                ],
            )
        })
        .collect();
    const N: usize = 20;
    let sbs: Vec<Sandbox> = (0..N).map(|i| sandbox(&lab, &format!("q{i}"))).collect();
    let confs: Vec<RuntimeConf> = sbs
        .iter()
        .enumerate()
        .map(|(i, sb)| RuntimeConf::new(&format!("par{i}"), &sb.path, "eth0"))
        .collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = confs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (rt, l) = (&rt, &lists[i % 2]);
                s.spawn(move || rt.add(l, c))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap()
                    .unwrap_or_else(|e| panic!("parallel ADD: {e}"))
            })
            .collect()
    });
    let eps = daemon.client().endpoints().unwrap();
    assert_eq!(eps.len(), N, "{eps:?}");
    let mut ips = BTreeSet::new();
    for (i, r) in results.iter().enumerate() {
        let host = host_veth(r);
        assert_eq!(
            attached(&daemon, &host),
            Some(ifindex(None, &host)),
            "par{i}"
        );
        let ep = endpoint(&daemon, &format!("par{i}"), "eth0").unwrap();
        assert_eq!(ep.request.vm.is_some(), i % 2 == 1, "par{i}");
        assert_eq!(
            link(Some(&sbs[i].name), "tap0").is_some(),
            i % 2 == 1,
            "par{i}"
        );
        ips.insert(ep.request.ips[0].clone());
    }
    assert_eq!(ips.len(), N, "distinct addresses");
    let guests = daemon.client().guests().unwrap();
    assert_eq!(guests.len(), N / 2, "{guests:?}");
    let taps: BTreeSet<&str> = guests.iter().map(|g| g.container_id.as_str()).collect();
    assert_eq!(taps.len(), N / 2, "one guest per VM pod");
    rt.status(&lists[0]).unwrap();
    std::thread::scope(|s| {
        for (i, c) in confs.iter().enumerate() {
            let (rt, l) = (&rt, &lists[i % 2]);
            s.spawn(move || rt.del(l, c).unwrap_or_else(|e| panic!("parallel DEL: {e}")));
        }
    });
    assert!(daemon.client().endpoints().unwrap().is_empty());
    assert!(daemon.client().attachments().unwrap().is_empty());
    for sb in &sbs {
        assert_eq!(
            links(&sb.name),
            BTreeSet::from(["lo".to_string()]),
            "{}",
            sb.name
        );
    }
    lab.destroy().unwrap();
}

/// A dual-stack primary result: the endpoint carries both addresses; a VM guest takes the
/// IPv4 one.
#[test]
fn tapestry_dual_stack() {
    require_lab!();
    let dir = require!(v110_plugins());
    let bins = require!(tapestry_bins());
    let lab = Lab::new("cni-tap-ds").unwrap();
    let state = TempDir::new("tap-ds");
    let net = NetParams::new(&lab, &state);
    let daemon = start_daemon("cni-ds");
    let rt = Runtime::new([&dir, &bins], state.join("cache"));
    let o = lab.pod_cidr().0.octets();
    let v6 = format!("fd74:{:x}:{:x}::/64", o[1], o[2]);
    let mut primary = Primary::Bridge.conf(&net);
    primary["ipam"]["ranges"]
        .as_array_mut()
        .unwrap()
        .push(json!([{ "subnet": v6 }]));
    primary["ipam"]["routes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"dst": "::/0"}));
    for (i, vm) in [false, true].into_iter().enumerate() {
        let l = list(
            "tap-ds",
            "1.0.0",
            vec![primary.clone(), tapestry_conf(&daemon.socket, vm)],
        );
        let sb = sandbox(&lab, &format!("ds{i}"));
        let conf = RuntimeConf::new(&format!("ds{i}"), &sb.path, "eth0");
        let result = rt
            .add(&l, &conf)
            .unwrap_or_else(|e| panic!("vm={vm}: ADD: {e}\n{}", daemon.log()));
        let addrs: Vec<String> = result["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|ip| ip["address"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(addrs.len(), 2, "{result}");
        let ep = endpoint(&daemon, &format!("ds{i}"), "eth0").unwrap();
        let mut got = ep.request.ips.clone();
        got.sort();
        let mut want = addrs.clone();
        want.sort();
        assert_eq!(got, want, "vm={vm}");
        assert_eq!(ep.request.gateway, Some(net.gateway), "vm={vm}");
        if vm {
            let v4 = addrs.iter().find(|a| a.contains('.')).unwrap();
            assert_eq!(&ep.request.vm.as_ref().unwrap().guest_ip, v4);
        }
        rt.del(&l, &conf).unwrap();
        assert!(endpoint(&daemon, &format!("ds{i}"), "eth0").is_none());
    }
    lab.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------------
// podman as the runtime
// ---------------------------------------------------------------------------------------------

fn find_program(name: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{name} (apt-get install podman runc busybox-static)"))
}

/// A rootfs with Debian's static busybox as `/bin/busybox` and every applet as a relative
/// symlink to it (`busybox --install -s` would link to the host path of the binary).
fn busybox_rootfs(dir: &Path) -> Result<(), String> {
    let bb = Path::new("/bin/busybox");
    let file = run(Command::new("file").arg("-L").arg(bb)).unwrap_or_default();
    if !bb.exists() || file.contains("dynamically") {
        return Err("a static /bin/busybox (apt-get install busybox-static)".into());
    }
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(bb, bin.join("busybox")).unwrap();
    let applets = run(Command::new(bb).arg("--list")).unwrap();
    for a in applets.lines().map(str::trim) {
        if !a.is_empty() && a != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(a)).unwrap();
        }
    }
    Ok(())
}

/// Unmounts (lazily) whatever is still mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").args(["-l", m]).status();
    }
}

/// podman with all its state in a temporary directory, and this machine's workarounds
/// (toolchain notes, section 5).
struct Podman {
    dir: PathBuf,
    conf: PathBuf,
}

impl Podman {
    /// State in `/tmp/tpp-<lab prefix>`: podman refuses a runroot path over 50 characters.
    fn new(lab: &Lab, plugin_dirs: &[&Path]) -> Podman {
        let dir = std::env::temp_dir().join(format!("tpp-{}", lab.prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["root", "runroot", "tmp", "net"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let conf = dir.join("containers.conf");
        let dirs: Vec<String> = plugin_dirs
            .iter()
            .map(|d| format!("{:?}", d.to_str().unwrap()))
            .collect();
        std::fs::write(
            &conf,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{}]\n\
                 network_config_dir = {:?}\n[engine]\nevents_logger = \"none\"\n",
                dirs.join(", "),
                dir.join("net").to_str().unwrap()
            ),
        )
        .unwrap();
        Podman { dir, conf }
    }

    fn add_network(&self, list: &Value) {
        let name = list["name"].as_str().unwrap();
        std::fs::write(
            self.dir.join("net").join(format!("{name}.conflist")),
            serde_json::to_vec_pretty(list).unwrap(),
        )
        .unwrap();
    }

    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf)
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
            ]);
        c
    }

    /// `podman run --rm` of `sh -c script` on `network`, with limits no higher than ours.
    fn run(&self, name: &str, network: &str, rootfs: &Path, script: &str) -> Command {
        let limit = |res| {
            // SAFETY: getrlimit fills a plain struct.
            let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
            unsafe { libc::getrlimit(res, &mut r) };
            r.rlim_max.min(4096)
        };
        let (nofile, nproc) = (limit(libc::RLIMIT_NOFILE), limit(libc::RLIMIT_NPROC));
        let mut c = self.command();
        c.args(["run", "--rm", "--name", name, "--network", network])
            .arg(format!("--ulimit=nofile={nofile}:{nofile}"))
            .arg(format!("--ulimit=nproc={nproc}:{nproc}"))
            .arg("--rootfs")
            .arg(rootfs)
            .args(["/bin/sh", "-c", script]);
        c
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["rm", "--all", "--force"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        unmount_under(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// podman drives `bridge` + `tapestry-cni` (CNI 1.0.0, libcni inside podman): the daemon holds
/// the endpoint exactly while the container runs; a VM network gives the container `tap0`; a
/// failed ADD (daemon down) fails the run and podman's DEL leaves nothing.
#[test]
fn podman_drives_the_chain() {
    require_lab!();
    let deb = require!(debian_plugins());
    let bins = require!(tapestry_bins());
    require!(find_program("podman"));
    require!(find_program("runc"));
    let lab = Lab::new("cni-podman").unwrap();
    let state = TempDir::new("podman");
    let rootfs = state.join("rootfs");
    require!(busybox_rootfs(&rootfs));
    let net = NetParams::new(&lab, &state);
    let mut daemon = start_daemon("cni-podman");
    let podman = Podman::new(&lab, &[&deb, &bins]);
    let pod_net = format!("{}-pod", lab.prefix());
    let vm_net = format!("{}-vm", lab.prefix());
    for (name, vm) in [(&pod_net, false), (&vm_net, true)] {
        podman.add_network(&json!({
            "cniVersion": "1.0.0", "name": name,
            "plugins": [Primary::Bridge.conf(&net), tapestry_conf(&daemon.socket, vm)],
        }));
    }

    // 1. A pod: the container sees the address the daemon registered, while it runs.
    let ctr = format!("{}-c1", lab.prefix());
    let mut child = podman
        .run(
            &ctr,
            &pod_net,
            &rootfs,
            "ip -o -4 addr show dev eth0; sleep 2",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen: Vec<EndpointInfo> = Vec::new();
    let mut seen_attached = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "podman run hangs");
        for ep in daemon.client().endpoints().unwrap() {
            if !seen
                .iter()
                .any(|s| s.request.container_id == ep.request.container_id)
            {
                seen.push(ep);
            }
        }
        if let Some(ep) = seen.first() {
            seen_attached |= attached(&daemon, &ep.request.host_ifname).is_some();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "podman run: {stdout}\n{stderr}\n{}",
        daemon.log()
    );
    let addr = stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet in {stdout}"))
        .to_string();
    assert!(net.in_subnet(&addr), "{addr}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let ep = &seen[0].request;
    assert_eq!(ep.ips, vec![addr.clone()]);
    assert_eq!(ep.ifname, "eth0");
    assert_eq!(
        ep.pod.as_ref().map(|p| p.name.as_str()),
        Some(ctr.as_str()),
        "{ep:?}"
    );
    assert!(ep.vm.is_none());
    assert!(
        seen_attached,
        "the datapath was never attached to {}",
        ep.host_ifname
    );
    // After the run: podman's DEL removed the endpoint, the attachment and the address.
    assert!(daemon.client().endpoints().unwrap().is_empty());
    assert!(daemon.client().attachments().unwrap().is_empty());
    assert!(!root_link_exists(&ep.host_ifname));
    assert!(!net.reservation(&pod_net, &addr).exists());
    assert!(
        !Path::new(&ep.netns).exists(),
        "podman's netns {} left",
        ep.netns
    );

    // 2. A VM pod: tap0 in the container, eth0 without its IPv4 address.
    let out = podman
        .run(
            &format!("{}-c2", lab.prefix()),
            &vm_net,
            &rootfs,
            "ip -o link show tap0; ip -o -4 addr show dev eth0; echo done",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("tap0:"), "{stdout}");
    assert!(!stdout.contains("inet "), "eth0 kept its address: {stdout}");
    assert!(stdout.contains("done"));
    assert!(daemon.client().endpoints().unwrap().is_empty());

    // 3. The daemon down: ADD fails, podman reports the plugin's message and runs DEL.
    daemon.stop().unwrap();
    let out = podman
        .run(&format!("{}-c3", lab.prefix()), &pod_net, &rootfs, "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tapestry-cni"), "{stderr}");
    daemon.restart().unwrap();
    assert!(daemon.client().endpoints().unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(net.data_dir.join(&pod_net))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("10."))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "addresses still reserved: {left:?}");
    // podman's libcni caches results under /var/lib/cni/results; nothing of ours is left.
    let cached: Vec<String> = std::fs::read_dir("/var/lib/cni/results")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(lab.prefix()))
                .collect()
        })
        .unwrap_or_default();
    assert!(cached.is_empty(), "{cached:?}");
    drop(podman);
    lab.destroy().unwrap();
}

/// The podman harness itself, with reference plugins only: `bridge` + `tuning` at 1.0.0.
#[test]
fn podman_drives_reference_plugins() {
    require_lab!();
    let deb = require!(debian_plugins());
    require!(find_program("podman"));
    require!(find_program("runc"));
    let lab = Lab::new("cni-podman-ref").unwrap();
    let state = TempDir::new("podman-ref");
    let rootfs = state.join("rootfs");
    require!(busybox_rootfs(&rootfs));
    let net = NetParams::new(&lab, &state);
    let podman = Podman::new(&lab, &[&deb]);
    let name = format!("{}-ref", lab.prefix());
    podman.add_network(&json!({
        "cniVersion": "1.0.0", "name": name,
        "plugins": [
            Primary::Bridge.conf(&net),
            {"type": "tuning", "mtu": 1400, "dataDir": state.join("tuning")},
        ],
    }));
    let out = podman
        .run(
            &format!("{}-c", lab.prefix()),
            &name,
            &rootfs,
            "ip -o -4 addr show dev eth0; cat /sys/class/net/eth0/mtu",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet in {stdout}"));
    assert!(net.in_subnet(addr), "{addr}");
    assert_eq!(stdout.lines().last(), Some("1400"), "tuning ran: {stdout}");
    assert!(
        !net.reservation(&name, addr).exists(),
        "podman's DEL kept {addr}"
    );
    drop(podman);
    lab.destroy().unwrap();
}
