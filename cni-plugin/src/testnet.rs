//! Test-only: a throwaway pod network namespace with a veth, made with `ip` (tests may shell
//! out; product code never does). Needs root; `root_or_skip` says what to do without it.

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// True when the test can run. Outside CI a non-root run skips with a message; under CI a
/// root-only test that cannot run is a failure, not a silent pass.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !ci,
        "{test} needs root (it creates network namespaces) and CI is set"
    );
    skipped(test, "needs root (it creates network namespaces)");
    false
}

/// Says a test was skipped, past the test harness's capture so that it shows in the run's log.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
}

pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A netns holding `eth0` (MTU 1450, 10.250.N.2/24, default via .1) whose veth peer is
/// `host_veth` in this namespace.
pub struct PodNetns {
    pub name: String,
    pub path: PathBuf,
    pub host_veth: String,
    pub subnet: u32,
}

impl PodNetns {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let ns = PodNetns {
            name: format!("tcni-{tag}-{id}"),
            path: PathBuf::from(format!("/run/netns/tcni-{tag}-{id}")),
            host_veth: format!("tcu{id}"),
            subnet: 100 + (std::process::id() % 50) + n,
        };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ]);
        ip(&["link", "set", &ns.host_veth, "up"]);
        ip(&["-n", &ns.name, "link", "set", "eth0", "mtu", "1450", "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("10.250.{}.2/24", ns.subnet),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &format!("10.250.{}.1", ns.subnet),
        ]);
        ns
    }

    /// `/sys/class/net/<ifname>/<attr>` as seen from inside the netns (`ip netns exec` mounts
    /// a sysfs of that namespace), or None if the interface is not there.
    pub fn sys(&self, ifname: &str, attr: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{ifname}/{attr}"))
            .output()
            .expect("running ip netns exec");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
