//! A real Kubernetes node on this machine, for tests, `make demo-node` and the node benchmark:
//! the control plane of [`crate::k8s`] (etcd, kube-apiserver, kube-controller-manager) plus
//! Debian's containerd and a kubelet, with no registry and no kube-proxy.
//!
//! # What [`Node::start`] sets up
//!
//! - One node at a time on the machine: a kubelet owns host-wide state (the `kubepods` cgroups,
//!   iptables chains, kernel sysctls), so [`Node::start`] takes an exclusive `flock` on
//!   `/run/tapestry-node/lock` (waiting for another node to finish) and writes a record,
//!   `/run/tapestry-node/record.json`, before changing anything. A node whose process died
//!   without cleaning up (SIGKILL, Ctrl-C) is cleaned up from that record by the next start, or by
//!   [`cleanup_stale`] (`tapestry-demo-node cleanup`).
//! - A directory `$TMPDIR/tapestry-node-<pid>/` with everything: containerd's config, root, state,
//!   grpc and ttrpc sockets and runc root; the kubelet's config, root dir, certificates, volume
//!   plugin dir and pod logs; the CNI conf dir ([`Node::conf_dir`]) and bin dir
//!   ([`Node::cni_bin_dir`], symlinks to the reference plugins, where an installer may copy
//!   more); host-local's IPAM data; logs (`containerd.log`, `kubelet.log`).
//! - The node's network: a Linux bridge [`BRIDGE`] holding [`NODE_IP`], the node's InternalIP and
//!   the pods' gateway, created before the kubelet starts. The primary CNI is the reference
//!   `bridge` plugin with `host-local` IPAM on [`POD_SUBNET`] (`tests/node/primary.conflist`),
//!   without masquerading: nothing a pod sends leaves the machine through the node. An
//!   `unreachable` route for [`k8s::SERVICE_CIDR`]: an unserved ClusterIP fails at once, as it
//!   would on a real network, instead of reaching this machine's gateway, which answers every
//!   TCP connection.
//! - The apiserver binds [`NODE_IP`] (so pods reach it through `default/kubernetes`'s ClusterIP,
//!   and the kubelet's InternalIP is a real address) with ServiceAccount admission on; the
//!   controller-manager runs the EndpointSlice, garbage-collector, namespace, service-account,
//!   root-CA publisher, DaemonSet, Deployment and ReplicaSet controllers (what a Helm chart
//!   needs); kube-scheduler places pods. The node-lifecycle controller does not run: the
//!   harness lifts the kubelet's `node.kubernetes.io/not-ready` taint once the node is Ready.
//!   There is no kube-proxy: a ClusterIP works only through a datapath that handles it
//!   (Tapestry's, installed by [`Node::install_tapestry`] from the chart and `make images`).
//! - Images built by `tests/node/build-images.sh` (FROM scratch: a static pause, busybox, and a
//!   VM image running QEMU on `tap0`) imported with `ctr -n k8s.io images import`; pods use
//!   `imagePullPolicy: Never` ([`Node::import_image`] imports more, e.g. `make images`).
//!
//! # Cleanup
//!
//! Dropping a [`Node`] (also while a test panics) or calling [`Node::stop`]: deletes every pod so
//! that CNI DEL runs, stops kube-controller-manager and the kubelet, removes leftover
//! containers with `ctr`, stops containerd, then the apiserver and etcd; then undoes what the
//! kubelet and containerd changed on the host: processes left in the `kubepods` cgroups and the
//! cgroups themselves (every hierarchy), every mount under the node's directory (the kubelet's
//! bind mount of its root dir, pod volumes, sandbox netns and shm, container rootfs), iptables
//! chains `KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-IPTABLES-HINT` (IPv4 and IPv6), the
//! sysctls `kernel.panic`, `kernel.panic_on_oops`, `vm.overcommit_memory` and
//! `net.ipv4.ip_forward` (values saved in the record; forwarding stays on while a lab exists),
//! the propagation of `/sys/fs/bpf` (made shared for the DaemonSet's HostToContainer mount), the route for the Service CIDR, the bridge and any port left on it, the CNI result cache entries of the node's
//! networks in `/var/lib/cni/results`, log links in `/var/log/containers`, `/run/containerd`
//! when it did not exist before, the pins under [`Node::bpffs_dir`] and the directory. Every
//! step is idempotent and runs even when an earlier one failed. After a panic the logs stay in
//! the directory (its path is printed).
//!
//! ```no_run
//! use std::time::Duration;
//! use tapestry_tests::node::Node;
//!
//! #[test]
//! fn a_pod_runs() -> anyhow::Result<()> {
//!     tapestry_tests::require_node!(Ok(()));
//!     let node = Node::start()?;
//!     node.apply(&node.server_pod("web", &[("app", "web")]))?;
//!     let ip = node.wait_pod_running("default", "web", Duration::from_secs(60))?;
//!     assert!(tapestry_tests::node::in_pod_subnet(ip));
//!     Ok(())
//! } // node dropped: pods deleted, processes stopped, host state restored
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cmd::{ip, run};
use crate::k8s::{
    self, ADMIN, ControlPlane, ControlPlaneOptions, DEFAULT_CONTROLLERS, Identity, NODE, NODE_NAME,
    SERVICE_ACCOUNT_CONTROLLERS,
};

/// Registry of the machine's one test node: the lock and the record of the live (or dead) node.
pub const REGISTRY_DIR: &str = "/run/tapestry-node";
/// The node's bridge: the primary CNI's, and the home of [`NODE_IP`].
pub const BRIDGE: &str = "tpnode0";
/// The kubelet's `clusterDNS`: the ClusterIP of `kube-system/kube-dns` (kubeadm's choice, the
/// tenth address of [`k8s::SERVICE_CIDR`]).
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The kubelet's `clusterDomain`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
const CLUSTER_DNS_MANIFEST: &str = include_str!("../node/cluster-dns.yaml");
/// The node's InternalIP, the pods' gateway, and the apiserver's address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// The pods' subnet (host-local range of the primary CNI). Clear of the lab's 10.240.0.0/13,
/// the CNI tests' 10.250.0.0/16, resolvers in 10.248.0.0/13 and the Service range 10.96.0.0/16.
pub const POD_SUBNET: &str = "172.30.0.0/24";
/// Prefix length of [`POD_SUBNET`].
pub const POD_PREFIX: u8 = 24;
/// `name` of the primary network (also the key of host-local's and libcni's caches).
pub const NETWORK: &str = "tapestry-node";
/// File name of the primary conflist in [`Node::conf_dir`].
pub const PRIMARY_CONFLIST: &str = "10-tapestry-node.conflist";
/// The node's name (the [`crate::k8s::NODE`] identity's).
pub const NAME: &str = NODE_NAME;
/// Where [`Node::bpffs_dir`] lives: a test node's datapath pins, never a developer's.
pub const BPFFS_DIR: &str = "/sys/fs/bpf/tapestry-node-test";
/// Binaries from Debian the node runs.
pub const HOST_BINARIES: &[&str] = &["containerd", "ctr", "runc", "podman", "iptables"];
/// Reference plugins the primary network uses.
pub const PRIMARY_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];
/// Controllers a node runs besides [`DEFAULT_CONTROLLERS`] and
/// [`SERVICE_ACCOUNT_CONTROLLERS`]: what a Helm chart's DaemonSet and Deployment need.
pub const WORKLOAD_CONTROLLERS: &[&str] = &[
    "daemonset-controller",
    "deployment-controller",
    "replicaset-controller",
];
/// Identity id of kube-scheduler (user `system:kube-scheduler`).
pub const SCHEDULER: &str = "scheduler";
/// Time a node has to become Ready after the kubelet starts.
const NODE_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long [`Node::start`] waits for another node on this machine to finish.
const LOCK_WAIT: Duration = Duration::from_secs(900);
/// Sysctls the kubelet sets (saved in the record, restored at cleanup).
const KUBELET_SYSCTLS: &[&str] = &[
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
];
/// iptables chains the kubelet creates.
const KUBELET_CHAINS: &[&str] = &["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];
const TABLES: &[&str] = &["filter", "nat", "mangle"];
const PRIMARY_TEMPLATE: &str = include_str!("../node/primary.conflist");
const RECORD: &str = "record.json";
const LOCK: &str = "lock";

// ---------------------------------------------------------------------------------------------
// Prerequisites

/// Checks what a node needs: root, the Kubernetes binaries including `kubelet` and `helm`
/// (`scripts/build-k8s.sh kubelet helm`), containerd, runc, podman and iptables from Debian, the
/// reference plugins, and the guest of `scripts/build-guest.sh` (for the VM image). The error
/// names everything missing.
pub fn require_node() -> Result<(), String> {
    let mut missing = Vec::new();
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (a node changes cgroups, mounts, iptables and sysctls)".to_string());
    }
    if let Err(e) = k8s::require_k8s() {
        missing.push(e);
    }
    for b in ["kubelet", "kube-scheduler", "helm"] {
        if let Err(e) = k8s::binary(b) {
            missing.push(format!("{e:#}"));
        }
    }
    let absent: Vec<&str> = HOST_BINARIES
        .iter()
        .copied()
        .filter(|b| which(b).is_none())
        .collect();
    if !absent.is_empty() {
        missing.push(format!(
            "{} (apt-get install containerd runc podman iptables; scripts/setup.sh)",
            absent.join(", ")
        ));
    }
    match reference_plugin_dir() {
        Ok(_) => {}
        Err(e) => missing.push(format!("{e:#}")),
    }
    if let Err(e) = crate::guest::GuestArtifacts::locate() {
        missing.push(format!("{e:#}"));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing node prerequisite: {}", missing.join("; ")))
    }
}

/// The policy behind [`require_node!`](crate::require_node): `true` when [`require_node`]
/// passes; otherwise panics under `CI=...`, or prints `skipped: <why>` and returns `false`.
pub fn node_available() -> bool {
    crate::prereq::available("node", require_node())
}

/// First line of a test that runs a [`Node`]: returns early (with `()` or the given value) after
/// printing `skipped: <why>` when a prerequisite is missing, or panics if `CI` is set.
#[macro_export]
macro_rules! require_node {
    () => {
        if !$crate::node::node_available() {
            return;
        }
    };
    ($ret:expr) => {
        if !$crate::node::node_available() {
            return $ret;
        }
    };
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The reference plugins: `~/.cache/tapestry/cni-plugins-v1.10.0` (scripts/install-cni-plugins.sh)
/// if it has them, else Debian's `/usr/lib/cni`.
pub fn reference_plugin_dir() -> Result<PathBuf> {
    let cached = crate::guest::cache_dir().join("cni-plugins-v1.10.0");
    for dir in [cached, PathBuf::from("/usr/lib/cni")] {
        if PRIMARY_PLUGINS.iter().all(|p| dir.join(p).is_file()) {
            return Ok(dir);
        }
    }
    bail!(
        "the reference CNI plugins ({}) are in neither ~/.cache/tapestry/cni-plugins-v1.10.0 nor \
         /usr/lib/cni: apt-get install containernetworking-plugins (scripts/setup.sh)",
        PRIMARY_PLUGINS.join(", ")
    )
}

/// `true` for an address of [`POD_SUBNET`] other than the gateway.
pub fn in_pod_subnet(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 172 && o[1] == 30 && o[2] == 0 && ip != NODE_IP && o[3] != 0 && o[3] != 255
}

// ---------------------------------------------------------------------------------------------
// Images

/// The node's own images (`tests/node/build-images.sh`), already imported.
#[derive(Debug, Clone)]
pub struct Images {
    /// The sandbox image (CRI `sandbox_image`).
    pub pause: String,
    /// Busybox with the lab's name server (`/bin/tapestry-tcp-name`).
    pub busybox: String,
    /// QEMU and the test guest, entry point `/bin/vm-launcher`.
    pub vm: String,
}

/// Runs `tests/node/build-images.sh` (cached: fast when nothing changed) and returns
/// `(image name, archive)` for pause, busybox and vm.
pub fn build_images() -> Result<Vec<(String, PathBuf)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("node/build-images.sh");
    let out = run(Command::new("bash").arg(&script))
        .with_context(|| format!("building the node's images ({})", script.display()))?;
    let images: Vec<(String, PathBuf)> = out
        .lines()
        .filter_map(|l| {
            let (name, path) = l.split_once(' ')?;
            Some((name.to_string(), PathBuf::from(path)))
        })
        .collect();
    if images.len() != 3 {
        bail!("{} printed {out:?}, not three images", script.display());
    }
    Ok(images)
}

// ---------------------------------------------------------------------------------------------
// Tapestry's chart and images

/// Helm release name of Tapestry on the node.
pub const TAPESTRY_RELEASE: &str = "tapestry";
/// Namespace of the release.
pub const TAPESTRY_NAMESPACE: &str = "tapestry";
/// The images of `make images`, by archive name stem.
pub const TAPESTRY_IMAGES: &[&str] = &["tapestryd", "controller", "install-cni"];

/// `$TAPESTRY_CHART_DIR`, else `deploy/helm/tapestry` of this checkout.
pub fn chart_dir() -> PathBuf {
    std::env::var_os("TAPESTRY_CHART_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/tapestry"))
}

/// The workspace version (the images' tag).
pub fn workspace_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `$TAPESTRY_IMAGES_DIR`, else `~/.cache/tapestry/images` (where `make images` saves them).
pub fn tapestry_images_dir() -> PathBuf {
    std::env::var_os("TAPESTRY_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::guest::cache_dir().join("images"))
}

/// The archives of `make images`, or an error naming the missing ones.
pub fn tapestry_image_archives() -> Result<Vec<PathBuf>> {
    let dir = tapestry_images_dir();
    let archives: Vec<PathBuf> = TAPESTRY_IMAGES
        .iter()
        .map(|n| dir.join(format!("{n}-{}.oci.tar", workspace_version())))
        .collect();
    let missing: Vec<String> = archives
        .iter()
        .filter(|a| !a.is_file())
        .map(|a| a.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "Tapestry's images are not built: {} missing (run `make images`, or set \
             TAPESTRY_IMAGES_DIR)",
            missing.join(", ")
        );
    }
    Ok(archives)
}

/// What installing Tapestry on a node needs on top of [`require_node`]: the chart and the
/// images of `make images`.
pub fn require_tapestry() -> Result<(), String> {
    let mut missing = Vec::new();
    if let Err(e) = require_node() {
        missing.push(e);
    }
    if !chart_dir().join("Chart.yaml").is_file() {
        missing.push(format!("the Helm chart {}", chart_dir().display()));
    }
    if let Err(e) = tapestry_image_archives() {
        missing.push(format!("{e:#}"));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("; "))
    }
}

// ---------------------------------------------------------------------------------------------
// The record: what a node changed, for a later cleanup

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    dir: PathBuf,
    pid: u32,
    start_time: u64,
    /// Sysctl values before the kubelet started.
    sysctls: BTreeMap<String, String>,
    /// Whether `/run/containerd` existed before containerd started.
    run_containerd_existed: bool,
    /// Whether `/var/log/containers` existed before the kubelet started.
    var_log_containers_existed: bool,
    /// The control plane's directory (its processes are stopped with the node's).
    #[serde(default)]
    control_plane_dir: Option<PathBuf>,
    /// `net.ipv4.ip_forward` before the node turned it on.
    #[serde(default)]
    ip_forward: Option<String>,
    /// `/sys/fs/bpf` was a private mount that the node made shared.
    #[serde(default)]
    bpffs_made_shared: bool,
    /// The node added an `unreachable` route for [`k8s::SERVICE_CIDR`].
    #[serde(default)]
    service_route: bool,
}

fn registry() -> PathBuf {
    PathBuf::from(REGISTRY_DIR)
}

fn read_record() -> Option<Record> {
    let text = fs::read_to_string(registry().join(RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_record(r: &Record) -> Result<()> {
    let path = registry().join(RECORD);
    let tmp = registry().join("record.json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(r)?)?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// The registry lock, held for a node's whole life; released when the file closes (also when
/// the process dies).
struct RegistryLock {
    _file: File,
}

impl RegistryLock {
    fn acquire(wait: Duration) -> Result<RegistryLock> {
        fs::create_dir_all(registry())
            .with_context(|| format!("creating {REGISTRY_DIR} (needs root)"))?;
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(registry().join(LOCK))?;
        let deadline = Instant::now() + wait;
        let mut said = false;
        loop {
            // SAFETY: plain syscall on a valid fd.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(RegistryLock { _file: f });
            }
            if Instant::now() > deadline {
                bail!(
                    "another test node on this machine held {REGISTRY_DIR}/{LOCK} for {wait:?} \
                     (a kubelet owns host-wide state: one node at a time)"
                );
            }
            if !said {
                eprintln!("tapestry node: waiting for another test node on this machine to finish");
                said = true;
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Cleans up a node left by a process that died without cleaning up (its record is still in
/// [`REGISTRY_DIR`]). Waits for a live node to finish first. Returns what it did.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let _lock = RegistryLock::acquire(Duration::from_secs(5))?;
    Ok(cleanup_record_locked())
}

/// With the lock held: cleans up after the recorded node, if any.
fn cleanup_record_locked() -> Vec<String> {
    let Some(record) = read_record() else {
        return Vec::new();
    };
    let mut done = vec![format!(
        "cleaning up the node left by pid {} in {}",
        record.pid,
        record.dir.display()
    )];
    let errors = cleanup_host(&record, true);
    done.extend(errors.into_iter().map(|e| format!("error: {e}")));
    done
}

// ---------------------------------------------------------------------------------------------
// The node

/// A kubelet + containerd node with its control plane; see the [module docs](self).
pub struct Node {
    record: Record,
    cp: Option<ControlPlane>,
    scheduler: Option<Child>,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    images: Images,
    kubelet_port: u16,
    stopped: bool,
    keep_logs: bool,
    _lock: RegistryLock,
}

impl Node {
    /// Starts a node (see the [module docs](self)) and returns once it is Ready and its images are
    /// imported. Takes about 10 s on an idle machine when the images are cached.
    pub fn start() -> Result<Node> {
        require_node().map_err(|e| anyhow!(e))?;
        let lock = RegistryLock::acquire(LOCK_WAIT)?;
        for line in cleanup_record_locked() {
            eprintln!("tapestry node: {line}");
        }
        preflight()?;
        let dir = std::env::temp_dir().join(format!("tapestry-node-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let pid = std::process::id();
        let record = Record {
            dir: dir.clone(),
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            sysctls: KUBELET_SYSCTLS
                .iter()
                .filter_map(|k| Some((k.to_string(), read_sysctl(k)?)))
                .collect(),
            run_containerd_existed: Path::new("/run/containerd").exists(),
            var_log_containers_existed: Path::new("/var/log/containers").exists(),
            control_plane_dir: None,
            ip_forward: read_sysctl("net.ipv4.ip_forward"),
            bpffs_made_shared: false,
            service_route: false,
        };
        write_record(&record)?;
        let mut node = Node {
            record,
            cp: None,
            scheduler: None,
            containerd: None,
            kubelet: None,
            images: Images {
                pause: String::new(),
                busybox: String::new(),
                vm: String::new(),
            },
            kubelet_port: 0,
            stopped: false,
            keep_logs: false,
            _lock: lock,
        };
        // From here on, Drop undoes whatever was done.
        if let Err(e) = node.bring_up() {
            node.keep_logs = true;
            return Err(e.context(format!(
                "starting the test node (logs kept in {})",
                node.dir().display()
            )));
        }
        Ok(node)
    }

    fn bring_up(&mut self) -> Result<()> {
        let dir = self.dir().to_path_buf();
        for d in [
            "cni/net.d",
            "cni/bin",
            "cni/ipam",
            "containerd",
            "kubelet/root",
            "kubelet/pki",
            "kubelet/volume-plugins",
            "pod-logs",
            "tapestry",
        ] {
            fs::create_dir_all(dir.join(d))?;
        }
        // The CNI bin dir: links to the reference plugins (containerd 1.6 takes one directory).
        let plugins = reference_plugin_dir()?;
        for e in fs::read_dir(&plugins)? {
            let e = e?;
            std::os::unix::fs::symlink(e.path(), self.cni_bin_dir().join(e.file_name()))?;
        }
        fs::write(self.primary_conflist_path(), self.primary_conflist())?;

        // A DaemonSet mounts /sys/fs/bpf with HostToContainer propagation, which the runtime
        // refuses on a private mount ("not a shared or slave mount"); systemd makes every mount
        // shared at boot, this machine's init does not. Made shared here, private again at
        // cleanup.
        if mount_propagation("/sys/fs/bpf") == Some(false) {
            self.record.bpffs_made_shared = true;
            write_record(&self.record)?;
            set_propagation("/sys/fs/bpf", libc::MS_SHARED)?;
        }

        // The bridge with the node's address, before anything binds it.
        let _ = ip(&["link", "del", BRIDGE]);
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{NODE_IP}/{POD_PREFIX}"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        // Nothing answers a ClusterIP that no proxy serves: in a real network the packets die
        // at the gateway; this machine's gateway intercepts every outbound TCP connection and
        // answers it (HTTP 404 from any address), which upstream's "service is down" checks
        // from the host network would take for the Service. Translated traffic never meets
        // the route (Tapestry rewrites the destination before routing).
        self.record.service_route = true;
        write_record(&self.record)?;
        ip(&["route", "replace", "unreachable", k8s::SERVICE_CIDR])?;
        // Pods reach the node and each other through the bridge; the bridge plugin turns
        // forwarding on anyway (the value before is in the record).
        let _ = crate::cmd::write_sysctl("net.ipv4.ip_forward", "1");

        let images = build_images()?;
        let cp = ControlPlane::start_with_options(ControlPlaneOptions {
            address: Some(NODE_IP),
            service_accounts: true,
            identities: vec![Identity::new(SCHEDULER, "system:kube-scheduler", &[])],
        })?;
        let controllers: Vec<&str> = DEFAULT_CONTROLLERS
            .iter()
            .chain(SERVICE_ACCOUNT_CONTROLLERS)
            .chain(WORKLOAD_CONTROLLERS)
            .copied()
            .collect();
        self.record.control_plane_dir = Some(cp.dir().to_path_buf());
        write_record(&self.record)?;
        self.cp = Some(cp);
        self.cp
            .as_mut()
            .expect("just set")
            .start_controller_manager_with(&controllers)?;
        self.start_scheduler()?;

        self.images = Images {
            pause: images[0].0.clone(),
            busybox: images[1].0.clone(),
            vm: images[2].0.clone(),
        };
        self.start_containerd()?;
        for (_, archive) in &images {
            self.import_image(archive)?;
        }
        self.start_kubelet()?;
        self.wait_ready()?;
        // The kubelet registers the node tainted not-ready; the node-lifecycle controller, which
        // this node does not run (it would watch for a node that never goes away), lifts it.
        let taints =
            self.kubectl_ok(["get", "node", NAME, "-o", "jsonpath={.spec.taints[*].key}"])?;
        for key in taints.split_whitespace() {
            if key.starts_with("node.kubernetes.io/") {
                self.kubectl_ok(["taint", "node", NAME, &format!("{key}-")])?;
            }
        }
        // Pods are admitted only once their namespace has its default service account.
        self.wait_service_account("default", Duration::from_secs(60))?;
        Ok(())
    }

    // --- paths -------------------------------------------------------------------------------

    /// The node's directory (everything but the control plane's, see [`Node::control_plane`]).
    pub fn dir(&self) -> &Path {
        &self.record.dir
    }

    /// The CNI configuration directory containerd reads (the primary conflist is in it).
    pub fn conf_dir(&self) -> PathBuf {
        self.dir().join("cni/net.d")
    }

    /// The CNI binary directory containerd runs plugins from.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir().join("cni/bin")
    }

    /// `<conf dir>/`[`PRIMARY_CONFLIST`].
    pub fn primary_conflist_path(&self) -> PathBuf {
        self.conf_dir().join(PRIMARY_CONFLIST)
    }

    /// The primary conflist as the node wrote it.
    pub fn primary_conflist(&self) -> String {
        PRIMARY_TEMPLATE
            .replace("@NETWORK@", NETWORK)
            .replace("@BRIDGE@", BRIDGE)
            .replace("@SUBNET@", POD_SUBNET)
            .replace("@GATEWAY@", &NODE_IP.to_string())
            .replace(
                "@IPAM_DIR@",
                &self.dir().join("cni/ipam").display().to_string(),
            )
    }

    /// containerd's grpc socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir().join("containerd/containerd.sock")
    }

    /// containerd's state directory; sandbox network namespaces are mounted under it
    /// (`netns_mounts_under_state_dir`).
    pub fn containerd_state_dir(&self) -> PathBuf {
        self.dir().join("containerd/state")
    }

    /// A directory for Tapestry's state and socket on this node (removed at cleanup).
    pub fn tapestry_dir(&self) -> PathBuf {
        self.dir().join("tapestry")
    }

    /// A bpffs directory for a datapath on this node, [`BPFFS_DIR`] (removed at cleanup).
    pub fn bpffs_dir(&self) -> PathBuf {
        PathBuf::from(BPFFS_DIR)
    }

    /// The images the node built and imported.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// The control plane (kubeconfigs, logs).
    pub fn control_plane(&self) -> &ControlPlane {
        self.cp.as_ref().expect("the node has a control plane")
    }

    /// The admin kubeconfig (for kubectl, helm, kube-rs).
    pub fn kubeconfig(&self) -> PathBuf {
        self.control_plane()
            .kubeconfig_path(ADMIN)
            .expect("the admin identity exists")
    }

    /// Contents of `<component>.log`: `containerd`, `kubelet`, or a control-plane component.
    pub fn log(&self, component: &str) -> String {
        match component {
            "containerd" | "kubelet" | "kube-scheduler" => {
                fs::read_to_string(self.dir().join(format!("{component}.log"))).unwrap_or_default()
            }
            other => self.cp.as_ref().map(|cp| cp.log(other)).unwrap_or_default(),
        }
    }

    // --- containerd --------------------------------------------------------------------------

    fn containerd_config(&self) -> String {
        let d = self.dir().join("containerd");
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    # root here lacks CAP_SYS_RESOURCE: the pause container's oom_score_adj -998 would fail
    # every sandbox (`runc create failed: ... can't get final child's PID from pipe: EOF`).
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{runc}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{cni_bin}"
      conf_dir = "{cni_conf}"
      max_conf_num = 1
"#,
            root = d.join("root").display(),
            state = self.containerd_state_dir().display(),
            sock = self.containerd_socket().display(),
            ttrpc = d.join("containerd-ttrpc.sock").display(),
            opt = d.join("opt").display(),
            pause = self.images.pause,
            runc = d.join("runc").display(),
            cni_bin = self.cni_bin_dir().display(),
            cni_conf = self.conf_dir().display(),
        )
    }

    fn start_containerd(&mut self) -> Result<()> {
        // The netns directory as a shared mount (this machine's / is private): namespaces
        // containerd mounts there later propagate into containers that mount it.
        let netns = self.netns_dir();
        fs::create_dir_all(&netns)?;
        let c = std::ffi::CString::new(netns.as_os_str().as_bytes())?;
        // SAFETY: plain syscalls with NUL-terminated paths.
        unsafe {
            if libc::mount(
                c.as_ptr(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
                || libc::mount(
                    std::ptr::null(),
                    c.as_ptr(),
                    std::ptr::null(),
                    libc::MS_SHARED,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("making {} a shared mount", netns.display()));
            }
        }
        let config = self.dir().join("containerd/config.toml");
        fs::write(&config, self.containerd_config())?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        self.containerd = Some(self.spawn("containerd", cmd)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive()?;
            if self.containerd_socket().exists() {
                let out = self.ctr(["version"])?;
                if out.status.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within 30 s:\n{}",
                    self.containerd_socket().display(),
                    tail(&self.log("containerd"), 20)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `ctr --address <socket> -n k8s.io ARGS`.
    pub fn ctr<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new("ctr")
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }

    /// Imports an OCI archive into the node's runtime (`ctr -n k8s.io images import`); pods
    /// then run it with `imagePullPolicy: Never`.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let out = self.ctr([
            OsStr::new("images"),
            OsStr::new("import"),
            archive.as_os_str(),
        ])?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}",
                archive.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    // --- kube-scheduler ----------------------------------------------------------------------

    fn start_scheduler(&mut self) -> Result<()> {
        let kubeconfig = self.control_plane().kubeconfig_path(SCHEDULER)?;
        let mut cmd = Command::new(k8s::binary("kube-scheduler")?);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg("--secure-port=0")
            .arg("--profiling=false");
        self.scheduler = Some(self.spawn("kube-scheduler", cmd)?);
        Ok(())
    }

    // --- kubelet -----------------------------------------------------------------------------

    fn kubelet_config(&self, healthz_port: u16) -> Result<String> {
        let cp = self.control_plane();
        let d = self.dir().join("kubelet");
        let cfg = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP.to_string(),
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "cgroupDriver": "cgroupfs",
            "failSwapOn": false,
            "failCgroupV1": false,
            "containerRuntimeEndpoint": format!("unix://{}", self.containerd_socket().display()),
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": cp.ca_path().display().to_string()},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "volumePluginDir": d.join("volume-plugins").display().to_string(),
            "podLogsDir": self.dir().join("pod-logs").display().to_string(),
            "serializeImagePulls": false,
            "resolvConf": "/etc/resolv.conf",
            // Pods with dnsPolicy ClusterFirst resolve through the cluster DNS
            // (`Node::deploy_cluster_dns`); until it runs, their names do not resolve.
            "clusterDNS": [CLUSTER_DNS_IP.to_string()],
            "clusterDomain": CLUSTER_DOMAIN,
            "nodeStatusUpdateFrequency": "4s",
            "maxPods": 110,
        });
        Ok(serde_yaml::to_string(&cfg)?)
    }

    fn start_kubelet(&mut self) -> Result<()> {
        self.kubelet_port = free_port(NODE_IP)?;
        let healthz = free_port(Ipv4Addr::LOCALHOST)?;
        let d = self.dir().join("kubelet");
        let config = d.join("config.yaml");
        fs::write(&config, self.kubelet_config(healthz)?)?;
        let kubeconfig = self.control_plane().kubeconfig_path(NODE)?;
        let mut cmd = Command::new(k8s::binary("kubelet")?);
        cmd.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", d.join("root").display()))
            .arg(format!("--cert-dir={}", d.join("pki").display()))
            .arg(format!("--hostname-override={NAME}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("-v=1");
        self.kubelet = Some(self.spawn("kubelet", cmd)?);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + NODE_READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let out = self.kubectl([
                "get",
                "node",
                NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "True" {
                return Ok(());
            }
            let last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if Instant::now() > deadline {
                bail!(
                    "node {NAME} not Ready after {NODE_READY_TIMEOUT:?} (last: {}); kubelet:\n{}",
                    last.trim(),
                    log_errors(&self.log("kubelet"))
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until namespace `ns` has its `default` ServiceAccount (pods are refused before).
    pub fn wait_service_account(&self, ns: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.kubectl(["get", "serviceaccount", "default", "-n", ns, "-o", "name"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("namespace {ns} has no default ServiceAccount after {timeout:?}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&self, name: &str, mut cmd: Command) -> Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir().join(format!("{name}.log")))?;
        cmd.env_remove("KUBECONFIG")
            .env("PATH", host_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn().with_context(|| format!("starting {name}"))
    }

    /// An error if containerd or the kubelet exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, child) in [
            ("containerd", &mut self.containerd),
            ("kubelet", &mut self.kubelet),
            ("kube-scheduler", &mut self.scheduler),
        ] {
            if let Some(c) = child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                *child = None;
                let log = fs::read_to_string(self.record.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                bail!("{name} exited ({status}):\n{}", log_errors(&log));
            }
        }
        Ok(())
    }

    // --- kubectl, helm -----------------------------------------------------------------------

    /// Runs kubectl as the cluster admin.
    pub fn kubectl<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.control_plane().kubectl(args)
    }

    /// kubectl as admin: stdout, or an error with stderr.
    pub fn kubectl_ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.control_plane().kubectl_ok(args)
    }

    /// `kubectl apply -f -` with `manifest`.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        self.control_plane().apply(manifest)
    }

    /// Runs the built helm against the node (admin kubeconfig), stdin closed.
    pub fn helm<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let helm_home = self.dir().join("helm");
        let out = Command::new(k8s::binary("helm")?)
            .args(&args)
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .env_remove("KUBECONFIG")
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"))
            .stdin(Stdio::null())
            .output()
            .context("running helm")?;
        if !out.status.success() {
            let a: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
            bail!(
                "helm {} failed ({}): {}",
                a.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get -o json` of one object.
    pub fn get_json(&self, ns: &str, kind: &str, name: &str) -> Result<Value> {
        let out = self.kubectl_ok(["get", kind, name, "-n", ns, "-o", "json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    // --- pods --------------------------------------------------------------------------------

    /// A pod running the lab's name server on TCP 8080 (answers each line with the pod's name),
    /// labelled `labels`, without a service-account token.
    pub fn server_pod(&self, name: &str, labels: &[(&str, &str)]) -> String {
        pod_manifest(
            name,
            labels,
            &[],
            &self.images.busybox,
            &[
                "/bin/sh",
                "-c",
                "echo \"$POD_NAME\" >/etc/tapestry-name; exec nc -ll -p 8080 -e /bin/tapestry-tcp-name",
            ],
            false,
            Some(8080),
        )
    }

    /// A pod that only sleeps: the client side of tests (run requests from its netns with
    /// [`Node::in_pod`]).
    pub fn client_pod(&self, name: &str) -> String {
        self.sleep_pod(name, &[("app", "client")])
    }

    /// A busybox pod that only sleeps, labelled `labels`.
    pub fn sleep_pod(&self, name: &str, labels: &[(&str, &str)]) -> String {
        pod_manifest(
            name,
            labels,
            &[],
            &self.images.busybox,
            &["/bin/sleep", "3600"],
            false,
            None,
        )
    }

    /// A VM pod: QEMU (software emulation) on the pod's `tap0`, the way KubeVirt's virt-launcher
    /// runs it, the guest answering the lab's name protocol on TCP 8080 with `name`. Annotated
    /// `tapestry.dev/vm: "true"`, which the runtime hands to CNI through the
    /// `io.kubernetes.cri.pod-annotations` capability. Privileged for `/dev/net/tun` (KubeVirt
    /// uses a device plugin, `devices.kubevirt.io/tun`, instead). Ready when the guest accepts
    /// TCP on 8080 (a tcpSocket probe from the node to the pod IP, which the guest owns).
    pub fn vm_pod(&self, name: &str, labels: &[(&str, &str)]) -> String {
        pod_manifest(
            name,
            labels,
            &[("tapestry.dev/vm", "true")],
            &self.images.vm,
            &[],
            true,
            Some(8080),
        )
    }

    /// Waits until pod `ns/name` is Running and returns its IP.
    pub fn wait_pod_running(&self, ns: &str, name: &str, timeout: Duration) -> Result<Ipv4Addr> {
        self.wait_pod(ns, name, timeout, false)
    }

    /// Waits until pod `ns/name` is Ready and returns its IP.
    pub fn wait_pod_ready(&self, ns: &str, name: &str, timeout: Duration) -> Result<Ipv4Addr> {
        self.wait_pod(ns, name, timeout, true)
    }

    fn wait_pod(&self, ns: &str, name: &str, timeout: Duration, ready: bool) -> Result<Ipv4Addr> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            let out = self.kubectl(["get", "pod", name, "-n", ns, "-o", "json"])?;
            if out.status.success() {
                last = serde_json::from_slice(&out.stdout)?;
                let status = &last["status"];
                let running = status["phase"] == "Running";
                let is_ready = status["conditions"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
                    .unwrap_or(false);
                if running
                    && (!ready || is_ready)
                    && let Some(ip) = status["podIP"].as_str().and_then(|s| s.parse().ok())
                {
                    return Ok(ip);
                }
                if status["phase"] == "Failed" || status["phase"] == "Succeeded" {
                    bail!(
                        "pod {ns}/{name} ended ({}): {}\nkubelet:\n{}",
                        status["phase"],
                        status,
                        log_errors(&self.log("kubelet"))
                    );
                }
            }
            if Instant::now() > deadline {
                let events = self
                    .kubectl_ok([
                        "get",
                        "events",
                        "-n",
                        ns,
                        "--field-selector",
                        &format!("involvedObject.name={name}"),
                    ])
                    .unwrap_or_default();
                bail!(
                    "pod {ns}/{name} not {} after {timeout:?}; status: {}\nevents:\n{events}\nkubelet:\n{}",
                    if ready { "Ready" } else { "Running" },
                    last["status"],
                    log_errors(&self.log("kubelet"))
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// The network namespace of pod `ns/name`: `/proc/<pid>/ns/net` of one of its processes
    /// (found by the pod's cgroup, `.../pod<uid>/...`).
    pub fn pod_netns(&self, ns: &str, name: &str) -> Result<PathBuf> {
        let uid = self.kubectl_ok([
            "get",
            "pod",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        let needle = format!("/pod{}/", uid.trim());
        for p in fs::read_dir("/proc")?.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
                continue;
            };
            if cg.contains(&needle) {
                return Ok(PathBuf::from(format!("/proc/{pid}/ns/net")));
            }
        }
        bail!("no process of pod {ns}/{name} (uid {}) found", uid.trim())
    }

    /// Runs `f` in the network namespace of pod `ns/name` (on a fresh thread).
    pub fn in_pod<T: Send>(&self, ns: &str, name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.pod_netns(ns, name)?;
        Ok(tapestry_netns::run_in(path, f)?)
    }

    /// A TCP request in the lab's name protocol from pod `ns/name` to `addr`: the reply line
    /// (the name of the backend that answered).
    pub fn request_from(
        &self,
        ns: &str,
        name: &str,
        addr: SocketAddrV4,
        timeout: Duration,
    ) -> Result<String> {
        let reply = self.in_pod(ns, name, || crate::net::tcp_request(addr, b"hi\n", timeout))?;
        reply.with_context(|| format!("TCP {addr} from pod {ns}/{name}"))
    }

    /// `kubectl exec` of `command` in container `main` of pod `ns/name` (the pods of
    /// [`Node::server_pod`], [`Node::sleep_pod`] and friends): its stdout, or an error with
    /// stderr. The apiserver reaches the kubelet on [`NODE_IP`].
    pub fn exec(&self, ns: &str, name: &str, command: &[&str]) -> Result<String> {
        let mut args = vec!["exec", "-n", ns, name, "-c", "main", "--"];
        args.extend_from_slice(command);
        self.kubectl_ok(args)
    }

    /// Deletes every pod in every namespace and waits for them to go (CNI DEL runs for each).
    pub fn delete_all_pods(&self, timeout: Duration) -> Result<()> {
        self.kubectl_ok([
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=1",
            &format!("--timeout={}s", timeout.as_secs().max(1)),
        ])?;
        Ok(())
    }

    // --- Tapestry on the node ---------------------------------------------------------------

    /// Where containerd mounts sandbox network namespaces (`netns_mounts_under_state_dir`):
    /// a shared mount, so a container that mounts it with HostToContainer propagation (the
    /// daemon's, `daemon.netnsDirs`) sees namespaces created later.
    pub fn netns_dir(&self) -> PathBuf {
        self.containerd_state_dir()
            .join("io.containerd.grpc.v1.cri/netns")
    }

    /// Imports the images of `make images` (`<images dir>/<name>-<version>.oci.tar`).
    pub fn import_tapestry_images(&self) -> Result<()> {
        for archive in tapestry_image_archives()? {
            self.import_image(&archive)?;
        }
        Ok(())
    }

    /// `helm install` of the chart into namespace [`TAPESTRY_NAMESPACE`] with every host path
    /// pointing into this node ([`Node::tapestry_values`]), and waits until the DaemonSet's pod
    /// and the controller are ready (the installer has then chained tapestry-cni in).
    pub fn install_tapestry(&self, extra: &[(&str, String)]) -> Result<String> {
        let chart = chart_dir();
        let mut args: Vec<String> = vec![
            "install".into(),
            TAPESTRY_RELEASE.into(),
            chart.display().to_string(),
            "--namespace".into(),
            TAPESTRY_NAMESPACE.into(),
            "--create-namespace".into(),
            "--wait".into(),
            "--timeout=3m".into(),
        ];
        for (k, v) in self.tapestry_values()?.iter().chain(extra) {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        self.helm(&args).map_err(|e| {
            let pods = self
                .kubectl_ok(["get", "pods", "-A", "-o", "wide"])
                .unwrap_or_default();
            let events = self
                .kubectl_ok(["get", "events", "-n", TAPESTRY_NAMESPACE])
                .unwrap_or_default();
            e.context(format!(
                "pods:\n{pods}\nevents in {TAPESTRY_NAMESPACE}:\n{events}"
            ))
        })
    }

    /// Deploys the cluster DNS (`tests/node/cluster-dns.yaml`: CoreDNS from `image`, already
    /// imported, behind `kube-system/kube-dns` at [`CLUSTER_DNS_IP`]) and waits until it answers
    /// through that ClusterIP: from a pod (`kubernetes.default.svc.cluster.local`) and from the
    /// node itself. So Tapestry must be installed first: there is no kube-proxy.
    pub fn deploy_cluster_dns(&self, image: &str, timeout: Duration) -> Result<()> {
        let manifest = CLUSTER_DNS_MANIFEST
            .replace("@IMAGE@", image)
            .replace("@CLUSTER_DNS_IP@", &CLUSTER_DNS_IP.to_string());
        self.apply(&manifest)?;
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self
                .kubectl_ok([
                    "get",
                    "deployment",
                    "-n",
                    "kube-system",
                    "coredns",
                    "-o",
                    "jsonpath={.status.readyReplicas}",
                ])
                .unwrap_or_default();
            let last = if ready.trim() == "1" {
                match crate::net::dns_query_a(
                    SocketAddrV4::new(CLUSTER_DNS_IP, 53),
                    "kubernetes.default.svc.cluster.local",
                    Duration::from_secs(2),
                ) {
                    Ok(ips) if ips.contains(&k8s::APISERVER_CLUSTER_IP) => return Ok(()),
                    Ok(ips) => format!("kubernetes.default resolved to {ips:?}"),
                    Err(e) => format!("{e:#}"),
                }
            } else {
                format!("coredns has {ready:?} ready replicas")
            };
            if Instant::now() > deadline {
                let pods = self
                    .kubectl_ok(["get", "pods", "-n", "kube-system", "-o", "wide"])
                    .unwrap_or_default();
                bail!("the cluster DNS is not answering after {timeout:?}: {last}\n{pods}");
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// `helm uninstall` (waits for the pods to go: the installer's preStop hook takes tapestry-cni
    /// out of the conflist, the daemon's removes the pinned datapath).
    pub fn uninstall_tapestry(&self) -> Result<String> {
        self.helm([
            "uninstall",
            TAPESTRY_RELEASE,
            "--namespace",
            TAPESTRY_NAMESPACE,
            "--wait",
            "--timeout=2m",
        ])
    }

    /// The `--set` values that keep the chart inside this node: CNI dirs, bpffs dir, socket and
    /// state dir, netns dir, a free metrics port, the apiserver's address for the host-network
    /// daemon (`k8sServiceHost`: with no kube-proxy nothing serves a ClusterIP in the host
    /// network; the chart gives it to the daemon alone, and the controller reaches the apiserver
    /// through the `kubernetes` ClusterIP and Tapestry's datapath), images never pulled, one
    /// controller replica, and the datapath removed when the daemon stops.
    pub fn tapestry_values(&self) -> Result<Vec<(&'static str, String)>> {
        let t = self.tapestry_dir();
        Ok(vec![
            ("image.pullPolicy", "Never".into()),
            ("cni.confDir", self.conf_dir().display().to_string()),
            ("cni.binDir", self.cni_bin_dir().display().to_string()),
            ("daemon.bpffsDir", self.bpffs_dir().display().to_string()),
            (
                "daemon.socket",
                t.join("tapestryd.sock").display().to_string(),
            ),
            ("daemon.stateDir", t.display().to_string()),
            (
                // The whole list: the defaults would create /run/netns on the host.
                "daemon.netnsDirs",
                format!("{{{}}}", self.netns_dir().display()),
            ),
            (
                "daemon.metricsPort",
                free_port(Ipv4Addr::UNSPECIFIED)?.to_string(),
            ),
            ("daemon.uninstallOnStop", "true".into()),
            ("daemon.logLevel", "info".into()),
            // The daemon's only (the chart sets it on no other container).
            ("k8sServiceHost", NODE_IP.to_string()),
            (
                "k8sServicePort",
                self.control_plane().api_port().to_string(),
            ),
            ("controller.replicas", "1".into()),
        ])
    }

    /// The ClusterIP of Service `default/<svc>`.
    pub fn cluster_ip(&self, svc: &str) -> Result<Ipv4Addr> {
        let ip = self.kubectl_ok(["get", "service", svc, "-o", "jsonpath={.spec.clusterIP}"])?;
        ip.trim()
            .parse()
            .with_context(|| format!("ClusterIP of {svc}: {ip:?}"))
    }

    /// The ready addresses in the EndpointSlices of Service `default/<svc>`, whoever manages
    /// them.
    pub fn ready_endpoints(&self, svc: &str) -> Result<BTreeSet<Ipv4Addr>> {
        let out = self.kubectl_ok([
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={svc}"),
            "-o",
            "json",
        ])?;
        let v: Value = serde_json::from_str(&out)?;
        let mut have = BTreeSet::new();
        for slice in v["items"].as_array().into_iter().flatten() {
            for ep in slice["endpoints"].as_array().into_iter().flatten() {
                if ep["conditions"]["ready"] == false {
                    continue;
                }
                for a in ep["addresses"].as_array().into_iter().flatten() {
                    if let Some(ip) = a.as_str().and_then(|s| s.parse().ok()) {
                        have.insert(ip);
                    }
                }
            }
        }
        Ok(have)
    }

    /// Waits until the ready endpoints of Service `default/<svc>` are exactly `want`.
    pub fn wait_endpoints(&self, svc: &str, want: &[Ipv4Addr], timeout: Duration) -> Result<()> {
        let want: BTreeSet<Ipv4Addr> = want.iter().copied().collect();
        let deadline = Instant::now() + timeout;
        loop {
            let have = self.ready_endpoints(svc)?;
            if have == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Service {svc} has ready endpoints {have:?}, not {want:?}, after {timeout:?}"
                );
            }
            thread::sleep(Duration::from_millis(250));
        }
    }

    // --- stopping ----------------------------------------------------------------------------

    /// Stops everything and restores the host (what Drop does), returning the errors.
    pub fn stop(&mut self) -> Result<()> {
        let errors = self.shutdown();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("stopping the test node: {}", errors.join("; "))
        }
    }

    fn shutdown(&mut self) -> Vec<String> {
        if self.stopped {
            return Vec::new();
        }
        self.stopped = true;
        let mut errors = Vec::new();
        // Pods first, while the kubelet runs, so CNI DEL runs for each (a chained plugin's
        // cleanup too). A DaemonSet would recreate its pods: delete those first.
        if self.cp.is_some() && self.kubelet.is_some() && self.check_alive().is_ok() {
            if self.keep_logs || thread::panicking() {
                self.save_pod_logs();
            }
            let _ = self.kubectl([
                "delete",
                "daemonsets,deployments,replicasets",
                "--all",
                "--all-namespaces",
                "--timeout=30s",
            ]);
            if let Err(e) = self.delete_all_pods(Duration::from_secs(60)) {
                errors.push(format!("deleting pods: {e:#}"));
            }
        }
        stop(&mut self.scheduler, Duration::from_secs(2));
        if let Some(cp) = self.cp.as_mut() {
            cp.stop_controller_manager();
        }
        stop(&mut self.kubelet, Duration::from_secs(10));
        if self.containerd.is_some() {
            errors.extend(self.remove_containers());
        }
        stop(&mut self.containerd, Duration::from_secs(10));
        // The apiserver, then etcd (ControlPlane's drop keeps that order).
        if let Some(mut cp) = self.cp.take() {
            if self.keep_logs || thread::panicking() {
                for c in ["etcd", "kube-apiserver", "kube-controller-manager"] {
                    let _ = fs::write(self.record.dir.join(format!("{c}.log")), cp.log(c));
                }
            }
            cp.stop_controller_manager();
            drop(cp);
        }
        let keep = self.keep_logs || thread::panicking();
        errors.extend(cleanup_host(&self.record, !keep));
        if keep {
            eprintln!(
                "tapestry node: logs kept in {} (containerd.log, kubelet.log, control-plane logs)",
                self.record.dir.display()
            );
        }
        errors
    }

    /// Saves every container's log (and its previous instance's) and the pods' state into
    /// `<dir>/pods/`, before the pods are deleted.
    fn save_pod_logs(&self) {
        let out_dir = self.dir().join("pods");
        let _ = fs::create_dir_all(&out_dir);
        if let Ok(all) = self.kubectl_ok(["get", "pods", "-A", "-o", "yaml"]) {
            let _ = fs::write(out_dir.join("pods.yaml"), all);
        }
        if let Ok(events) = self.kubectl_ok(["get", "events", "-A"]) {
            let _ = fs::write(out_dir.join("events.txt"), events);
        }
        let Ok(list) = self.kubectl_ok([
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name} \
             {.spec.initContainers[*].name} {.spec.containers[*].name}{\"\\n\"}{end}",
        ]) else {
            return;
        };
        for line in list.lines() {
            let mut w = line.split_whitespace();
            let (Some(ns), Some(pod)) = (w.next(), w.next()) else {
                continue;
            };
            for c in w {
                for previous in [false, true] {
                    let mut args = vec!["logs", "-n", ns, pod, "-c", c];
                    if previous {
                        args.push("--previous");
                    }
                    if let Ok(out) = self.kubectl(&args)
                        && out.status.success()
                    {
                        let suffix = if previous { ".previous" } else { "" };
                        let _ = fs::write(
                            out_dir.join(format!("{ns}_{pod}_{c}{suffix}.log")),
                            &out.stdout,
                        );
                    }
                }
            }
        }
    }

    /// Kills and removes every container left in containerd's `k8s.io` namespace.
    fn remove_containers(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let ids = match self.ctr(["containers", "ls", "-q"]) {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>(),
            Ok(out) => {
                return vec![format!(
                    "ctr containers ls: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )];
            }
            Err(e) => return vec![format!("{e:#}")],
        };
        for id in &ids {
            let _ = self.ctr(["tasks", "kill", "-s", "SIGKILL", id]);
        }
        for id in &ids {
            let _ = self.ctr(["tasks", "delete", "-f", id]);
            match self.ctr(["containers", "delete", id]) {
                Ok(out) if out.status.success() => {}
                Ok(out) => errors.push(format!(
                    "ctr containers delete {id}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        errors
    }

    /// Leaves logs in the node's directory after a successful stop too.
    pub fn keep_logs(&mut self) {
        self.keep_logs = true;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for e in self.shutdown() {
            eprintln!("tapestry node: cleanup: {e}");
        }
    }
}

/// A pod manifest (JSON) with `imagePullPolicy: Never`, one container `main`, `POD_NAME` in its
/// environment, and a 1 s grace period.
fn pod_manifest(
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    image: &str,
    command: &[&str],
    privileged: bool,
    port: Option<u16>,
) -> String {
    let labels: BTreeMap<_, _> = labels.iter().copied().collect();
    let annotations: BTreeMap<_, _> = annotations.iter().copied().collect();
    let mut container = serde_json::json!({
        "name": "main",
        "image": image,
        "imagePullPolicy": "Never",
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "VM_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
    });
    if !command.is_empty() {
        container["command"] = serde_json::json!(command);
    }
    if privileged {
        container["securityContext"] = serde_json::json!({"privileged": true});
    }
    if let Some(p) = port {
        container["ports"] = serde_json::json!([{"containerPort": p, "protocol": "TCP"}]);
        container["readinessProbe"] = serde_json::json!({
            "tcpSocket": {"port": p},
            "periodSeconds": 1,
            "failureThreshold": 1,
        });
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels, "annotations": annotations},
        "spec": {
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "enableServiceLinks": false,
            "containers": [container],
        },
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// Host checks and cleanup

/// Refuses to start over another kubelet's host state.
fn preflight() -> Result<()> {
    let mut found = Vec::new();
    for h in cgroup_hierarchies() {
        let p = h.join("kubepods");
        if p.is_dir() {
            found.push(p.display().to_string());
        }
    }
    if !found.is_empty() {
        bail!(
            "{} exist but no test node is recorded in {REGISTRY_DIR}: another kubelet seems to run \
             on this machine (one node at a time); stop it, or remove those cgroups",
            found.join(", ")
        );
    }
    Ok(())
}

/// `/sys/fs/cgroup/<hierarchy>` for every mounted hierarchy (v1 controllers, named, unified).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()]; // pure v2
    }
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .collect();
    v.sort();
    v
}

/// Undoes what a node changed on the host (see the module docs). With `remove_dir` false the
/// node's directory stays (logs), though everything mounted under it goes. Returns the errors.
fn cleanup_host(record: &Record, remove_dir: bool) -> Vec<String> {
    let mut errors = Vec::new();
    let dir = &record.dir;
    // Processes of the node (kubelet, containerd, shims run with the node's paths in their
    // command line) and of its pods (in the kubepods cgroups).
    kill_processes_mentioning(dir);
    if let Some(cp) = &record.control_plane_dir {
        // Left by a dead process (a live node stopped its control plane already).
        kill_processes_mentioning(cp);
    }
    kill_kubepods();
    if let Err(e) = remove_kubepods() {
        errors.push(e);
    }
    errors.extend(unmount_under(dir));
    errors.extend(remove_kubelet_chains());
    if record.bpffs_made_shared
        && let Err(e) = set_propagation("/sys/fs/bpf", libc::MS_PRIVATE)
    {
        errors.push(format!("{e:#}"));
    }
    // Forwarding stays on while a lab (tests/src/lab.rs, which manages it too) exists.
    if let Some(v) = &record.ip_forward
        && v != "1"
        && crate::lab::registered_labs()
            .map(|l| l.is_empty())
            .unwrap_or(false)
    {
        let _ = crate::cmd::write_sysctl("net.ipv4.ip_forward", v);
    }
    for (k, v) in &record.sysctls {
        if read_sysctl(k).as_deref() != Some(v.as_str())
            && let Err(e) = crate::cmd::write_sysctl(k, v)
        {
            errors.push(format!("restoring {k}={v}: {e}"));
        }
    }
    // The bridge and whatever is still attached to it.
    if record.service_route
        && let Err(e) = ip(&["route", "del", "unreachable", k8s::SERVICE_CIDR])
        && !format!("{e:#}").contains("No such process")
    {
        errors.push(format!(
            "deleting the route for {}: {e:#}",
            k8s::SERVICE_CIDR
        ));
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        if let Ok(ports) = fs::read_dir(Path::new("/sys/class/net").join(BRIDGE).join("brif")) {
            for p in ports.flatten() {
                let _ = ip(&["link", "del", &p.file_name().to_string_lossy()]);
            }
        }
        if let Err(e) = ip(&["link", "del", BRIDGE]) {
            errors.push(format!("deleting {BRIDGE}: {e:#}"));
        }
    }
    // libcni's result cache of our networks' sandboxes.
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{NETWORK}-"))
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // Container log links the kubelet made (they point into the node's directory).
    if let Ok(entries) = fs::read_dir("/var/log/containers") {
        for e in entries.flatten() {
            if let Ok(target) = fs::read_link(e.path())
                && target.starts_with(dir)
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if !record.var_log_containers_existed {
        let _ = fs::remove_dir("/var/log/containers");
    }
    if !record.run_containerd_existed {
        if containerd_running() {
            remove_empty_tree(Path::new("/run/containerd"));
        } else {
            // Ours alone: the sockets of shims that were killed are left in s/.
            let _ = fs::remove_dir_all("/run/containerd");
        }
    }
    if let Some(cp) = &record.control_plane_dir
        && cp.join("owner").exists()
        && remove_dir
    {
        let _ = fs::remove_dir_all(cp);
    }
    if Path::new(BPFFS_DIR).exists()
        && let Err(e) = fs::remove_dir_all(BPFFS_DIR)
    {
        errors.push(format!("removing {BPFFS_DIR}: {e}"));
    }
    if remove_dir {
        if dir.exists()
            && let Err(e) = fs::remove_dir_all(dir)
        {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    } else {
        // Keep the logs, not the images and snapshots.
        let _ = fs::remove_dir_all(dir.join("containerd/root"));
    }
    let _ = fs::remove_file(registry().join(RECORD));
    errors
}

/// SIGKILLs every process whose command line mentions `dir`.
fn kill_processes_mentioning(dir: &Path) {
    let needle = dir.as_os_str().as_bytes().to_vec();
    let me = std::process::id() as i32;
    for _ in 0..3 {
        let mut killed = false;
        if let Ok(procs) = fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                    continue;
                };
                if cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
                {
                    // SAFETY: plain syscall; the process runs from the node's directory.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed = true;
                }
            }
        }
        if !killed {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn kubepods_dirs() -> Vec<PathBuf> {
    cgroup_hierarchies()
        .into_iter()
        .map(|h| h.join("kubepods"))
        .filter(|p| p.is_dir())
        .collect()
}

/// Every pid in a cgroup subtree.
fn cgroup_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

/// SIGKILLs the processes in the kubepods cgroups until none is left (at most 5 s).
fn kill_kubepods() {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut pids = Vec::new();
        for d in kubepods_dirs() {
            cgroup_pids(&d, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: plain syscall; the process is in a pod of the test node.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Removes the kubepods cgroups, children first, in every hierarchy.
fn remove_kubepods() -> Result<(), String> {
    fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
        for e in fs::read_dir(dir)?.flatten() {
            if e.file_type()?.is_dir() {
                rmdir_tree(&e.path())?;
            }
        }
        fs::remove_dir(dir)
    }
    let mut errors = Vec::new();
    for d in kubepods_dirs() {
        // A cgroup whose last process just died may be busy for a moment.
        let mut result = rmdir_tree(&d);
        for _ in 0..20 {
            if result.is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
            result = rmdir_tree(&d);
        }
        if let Err(e) = result {
            errors.push(format!("removing {}: {e}", d.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Unmounts everything mounted at or under `dir`, deepest first (lazily). Returns the errors.
fn unmount_under(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    for _ in 0..5 {
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return vec!["reading /proc/self/mountinfo".into()];
        };
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
            .filter(|p| p.starts_with(dir))
            .collect();
        if points.is_empty() {
            return Vec::new();
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        points.dedup();
        errors.clear();
        for p in points {
            let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: plain syscall with a NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT)
                {
                    errors.push(format!("umount {}: {e}", p.display()));
                }
            }
        }
    }
    errors
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the kubelet's iptables chains and the rules that jump to them (IPv4 and IPv6).
fn remove_kubelet_chains() -> Vec<String> {
    let mut errors = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        for table in TABLES {
            let Ok(out) = Command::new(tool)
                .args(["-w", "5", "-t", table, "-S"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
            else {
                continue;
            };
            if !out.status.success() {
                continue;
            }
            let rules = String::from_utf8_lossy(&out.stdout).into_owned();
            // Jumps into the chains, from any chain.
            for rule in rules.lines() {
                if !rule.starts_with("-A ") {
                    continue;
                }
                let words: Vec<&str> = rule.split_whitespace().collect();
                let jumps_to_ours = words
                    .windows(2)
                    .any(|w| w[0] == "-j" && KUBELET_CHAINS.contains(&w[1]));
                let in_ours = KUBELET_CHAINS.contains(&words[1]);
                if jumps_to_ours && !in_ours {
                    let mut args = vec!["-w", "5", "-t", table, "-D"];
                    // Rules printed by -S are quoted like a shell would; ours have no spaces.
                    args.extend(words[1..].iter().map(|w| w.trim_matches('"')));
                    if let Err(e) = run(Command::new(tool).args(&args)) {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            for chain in KUBELET_CHAINS {
                if rules.lines().any(|l| l == format!("-N {chain}")) {
                    let _ = run(Command::new(tool).args(["-w", "5", "-t", table, "-F", chain]));
                    if let Err(e) =
                        run(Command::new(tool).args(["-w", "5", "-t", table, "-X", chain]))
                    {
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    errors
}

/// Whether the mount at `path` propagates (`shared:` or `master:` in mountinfo); `None` when
/// nothing is mounted there.
fn mount_propagation(path: &str) -> Option<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount at a path is the one in effect.
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(path))?;
    let mut optional = line.split(" - ").next()?.split(' ').skip(6);
    Some(optional.any(|f| f.starts_with("shared:") || f.starts_with("master:")))
}

/// `mount --make-shared` / `--make-private` of one mount (not recursive).
fn set_propagation(path: &str, flag: libc::c_ulong) -> Result<()> {
    let c = std::ffi::CString::new(path)?;
    // SAFETY: plain syscall with a NUL-terminated path.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            flag,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("changing the propagation of {path}"));
    }
    Ok(())
}

/// Whether a containerd process runs on this machine.
fn containerd_running() -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        fs::read_to_string(p.path().join("comm"))
            .map(|c| c.trim() == "containerd")
            .unwrap_or(false)
    })
}

/// Removes `dir` if it holds only empty directories.
fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn read_sysctl(key: &str) -> Option<String> {
    crate::cmd::read_sysctl(key).ok()
}

fn host_path() -> String {
    let p = std::env::var("PATH").unwrap_or_default();
    format!("{p}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

fn free_port(addr: Ipv4Addr) -> Result<u16> {
    Ok(TcpListener::bind((addr, 0))?.local_addr()?.port())
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The last error lines of a klog/logrus log and its last lines.
pub fn log_errors(text: &str) -> String {
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('E') || l.starts_with('F') || l.contains("level=error"))
        .collect();
    format!(
        "errors:\n{}\nlast lines:\n{}",
        errors[errors.len().saturating_sub(12)..].join("\n"),
        tail(text, 12)
    )
}

/// SIGTERM, then SIGKILL after `grace`.
fn stop(child: &mut Option<Child>, grace: Duration) {
    let Some(mut c) = child.take() else {
        return;
    };
    // SAFETY: plain syscall on our own child, not reaped yet.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }

    #[test]
    fn pod_subnet_excludes_gateway() {
        assert!(in_pod_subnet(Ipv4Addr::new(172, 30, 0, 7)));
        assert!(!in_pod_subnet(NODE_IP));
        assert!(!in_pod_subnet(Ipv4Addr::new(10, 240, 0, 7)));
    }

    #[test]
    fn primary_conflist_is_json() {
        let t = PRIMARY_TEMPLATE
            .replace("@NETWORK@", NETWORK)
            .replace("@BRIDGE@", BRIDGE)
            .replace("@SUBNET@", POD_SUBNET)
            .replace("@GATEWAY@", "172.30.0.1")
            .replace("@IPAM_DIR@", "/tmp/x");
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}
