//! [`Cluster`]: several Kubernetes nodes on this host, each a network namespace, one real control
//! plane, one `tapestryd` per node in Kubernetes mode. The topology of `make demo-cluster` and of
//! tests/tests/cluster.rs.
//!
//! ```text
//!   root namespace: bridge <prefix>-fab = F.1 (the fabric; kube-apiserver binds F.1)
//!        |                      |                      |
//!   <prefix>-n0 (eth0 F.10)  <prefix>-n1 (F.11)     <prefix>-n2 (F.12)     one netns per node
//!    pods P0/28 via ptp       pods P1/28             pods P2/28            routes to the others'
//!    tapestryd node-0         tapestryd node-1       tapestryd node-2      pod CIDRs via F.1x
//! ```
//!
//! Addresses come from the [`Lab`] slot's /24 `S` (so clusters and labs never collide): the
//! fabric is `S.0/26`, node `i`'s pod CIDR `S.(64 + 16 i)/28` (up to four nodes, 13 pods each).
//! The root namespace routes the pod CIDRs to their nodes too (the apiserver answers pods).
//!
//! What runs: etcd, kube-apiserver and kube-controller-manager ([`ControlPlane`], the built-in
//! EndpointSlice controller makes the pods' slices), `tapestry-controller` (the Guests' slices,
//! from the Guests the daemons publish for VM pods); per node a `tapestryd --source kubernetes
//! --node-name node-<i>` inside the node's namespace (own pins, socket, state dir). Pods are
//! plumbed by the real CNI chain, run inside the node's namespace: the reference `ptp` +
//! `host-local` (the primary), then `tapestry-cni` talking to that node's daemon.
//!
//! **Where the test plays the kubelet**, it writes what a kubelet writes and nothing else: it
//! registers each Node (`status.addresses` InternalIP = the node's fabric address, `Ready`); for
//! a pod, the Pod object exists first (as the scheduler's binding leaves it: `spec.nodeName`
//! set), then the sandbox is made by the CNI chain (`K8S_POD_*` CNI_ARGS, as containerd passes
//! them), then the status subresource gets `phase: Running`, `podIP(s)`, `hostIP(s)` and the
//! `PodScheduled` / `Initialized` / `ContainersReady` / `Ready` conditions, Ready computed as
//! the kubelet computes it (containers ready and every readiness gate's condition True,
//! [`kubelet_ready`]); [`Cluster::kubelet_readiness`] recomputes it when a gate's condition
//! changes, as a kubelet does on the pod's update. Deleting a pod is the reverse: CNI DEL, then
//! the object goes.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tapestry_api::types::{BackendState, ServiceInfo};

use crate::{
    Lab, Pod,
    cmd::ip,
    cni::{NetworkConfigList, Runtime, RuntimeConf},
    daemon::{Daemon, bin_dir, binary},
    guest::{Guest, GuestConfig},
    k8s::{ADMIN, ControlPlane, ControlPlaneOptions},
    node::reference_plugin_dir,
    poll,
};

/// Nodes a cluster can have (pod CIDRs `.64/28` to `.112/28` of the slot's /24).
pub const MAX_NODES: usize = 4;
/// Namespace of the pods the cluster makes.
pub const NAMESPACE: &str = "default";
/// The capability containerd hands a pod's annotations to CNI plugins with.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// One node: a network namespace on the fabric, with its daemon.
pub struct Node {
    pub index: usize,
    /// The Kubernetes Node name (`node-<i>`).
    pub name: String,
    /// `/run/netns/<prefix>-n<i>`.
    pub netns_path: PathBuf,
    /// Its address on the fabric (eth0): the Node's InternalIP.
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: (Ipv4Addr, u8),
    pub daemon: Daemon,
    conflist: NetworkConfigList,
    runtime: Runtime,
}

impl Node {
    /// One request on a fresh TCP connection from the node itself (its own network namespace:
    /// what a host-network pod or a node process does); see [`crate::net::tcp_request`].
    pub fn tcp_request(
        &self,
        addr: SocketAddrV4,
        payload: &[u8],
        timeout: Duration,
    ) -> std::io::Result<String> {
        crate::net::tcp_request_in(&self.netns_path, addr, payload, timeout)
    }

    /// One UDP request (connected socket) from the node itself; see
    /// [`crate::net::udp_request`].
    pub fn udp_request(
        &self,
        addr: SocketAddrV4,
        payload: &[u8],
        timeout: Duration,
    ) -> std::io::Result<String> {
        crate::net::udp_request_in(&self.netns_path, addr, payload, timeout)
    }

    /// Runs `cmd` on the node itself (in its network namespace).
    pub fn run(&self, cmd: &mut std::process::Command) -> std::io::Result<std::process::Output> {
        tapestry_netns::command_in(cmd, &self.netns_path)?.output()
    }
}

/// How a live migration's target pod says where its guest comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetMark {
    /// `tapestry.dev/migration-source: <source pod>`.
    Tapestry,
    /// What KubeVirt writes (`kubevirt.io/migrationJobName`, the `kubevirt.io/migrationJobUID`
    /// label, the VMI's `kubevirt.io/created-by` label shared with the source): the daemon
    /// finds the source.
    KubeVirt,
}

/// How a pod's sandbox is plumbed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plumbing {
    /// The whole chain: the primary, then tapestry-cni.
    Chain,
    /// The primary alone: a pod from before Tapestry was installed.
    PrimaryOnly,
    /// The chain with tapestry-cni's VM mode: the pod's IP and MAC go to a guest on `tap0`.
    Vm,
    /// [`Plumbing::Vm`] for a pod annotated `tapestry.dev/vm: "true"`, so that the chart's
    /// admission policy ([`Cluster::install_readiness_gate`]) gives it the readiness gate.
    AnnotatedVm,
}

pub struct Cluster {
    // Field order is drop order: daemons (in nodes) first, then the control plane, then the
    // lab's namespaces and links.
    pub nodes: Vec<Node>,
    pub cp: ControlPlane,
    pub lab: Lab,
    pods: BTreeMap<String, usize>,
    dir: PathBuf,
    /// tapestry-controller: EndpointSlices for the Guests the daemons publish.
    controller: Option<std::process::Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    /// Fabric, control plane (apiserver on the fabric, controller-manager), `nodes` nodes with
    /// their daemons running and synced. `name_hint` labels the lab reservation.
    pub fn start(name_hint: &str, nodes: usize) -> Result<Cluster> {
        if nodes == 0 || nodes > MAX_NODES {
            bail!("a cluster has 1 to {MAX_NODES} nodes");
        }
        let lab = Lab::new(name_hint)?;
        let prefix = lab.prefix().to_owned();
        let s = lab.subnet().octets();
        let fabric_ip = Ipv4Addr::new(s[0], s[1], s[2], 1);
        let bridge = format!("{prefix}-fab");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{fabric_ip}/26"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;

        let mut cp = ControlPlane::start_with_options(ControlPlaneOptions {
            address: Some(fabric_ip),
            ..ControlPlaneOptions::default()
        })?;
        cp.start_controller_manager()?;
        let dir = cp.dir().join("cluster");
        fs::create_dir_all(&dir)?;

        let controller = start_controller(&cp, &dir)?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            cp,
            lab,
            pods: BTreeMap::new(),
            dir,
            controller: Some(controller),
        };
        let plumbed: Vec<_> = (0..nodes)
            .map(|i| cluster.plumb_node(i, &bridge))
            .collect::<Result<_>>()?;
        // Every node routes every other node's pod CIDR to it; so does the root namespace.
        for (i, (_, ns)) in plumbed.iter().enumerate() {
            for (j, _) in plumbed.iter().enumerate().filter(|(j, _)| *j != i) {
                let (net, len) = pod_cidr(&cluster.lab, j);
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("{net}/{len}"),
                    "via",
                    &underlay_ip(&cluster.lab, j).to_string(),
                ])?;
            }
        }
        for j in 0..nodes {
            let (net, len) = pod_cidr(&cluster.lab, j);
            ip(&[
                "route",
                "add",
                &format!("{net}/{len}"),
                "via",
                &underlay_ip(&cluster.lab, j).to_string(),
            ])?;
        }
        for (i, (path, _)) in plumbed.into_iter().enumerate() {
            let node = cluster.start_node(i, path)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// Node `i`'s namespace, its fabric link and addresses. Returns (path, netns name).
    fn plumb_node(&self, i: usize, bridge: &str) -> Result<(PathBuf, String)> {
        let prefix = self.lab.prefix();
        let ns = format!("{prefix}-n{i}");
        let veth = format!("{prefix}-n{i}");
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &veth, "master", bridge, "up"])?;
        let addr = format!("{}/26", underlay_ip(&self.lab, i));
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &addr, "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            let mut full = vec!["-n", &ns];
            full.extend(args);
            ip(&full)?;
        }
        let path = PathBuf::from("/run/netns").join(&ns);
        tapestry_netns::run_in(&path, || {
            fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .and_then(|_| fs::write("/proc/sys/net/ipv4/conf/all/rp_filter", "0"))
        })?
        .context("node sysctls")?;
        Ok((path, ns))
    }

    /// Registers Node `i` (as its kubelet would) and starts its daemon inside its namespace.
    fn start_node(&self, i: usize, netns_path: PathBuf) -> Result<Node> {
        let name = format!("node-{i}");
        let underlay = underlay_ip(&self.lab, i);
        let (net, len) = pod_cidr(&self.lab, i);
        self.cp.apply(
            &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                "spec": {"podCIDR": format!("{net}/{len}"), "podCIDRs": [format!("{net}/{len}")]}})
            .to_string(),
        )?;
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": underlay.to_string()},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}]}});
        self.cp.kubectl_ok([
            "patch",
            "node",
            &name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])?;
        let kubeconfig = self.cp.kubeconfig_path(ADMIN)?;
        let daemon = Daemon::start_in(
            Some(&netns_path),
            &format!("{}-{name}", self.lab.prefix()),
            "services: []\n",
            &[],
            &[
                "--source",
                "kubernetes",
                "--node-name",
                &name,
                "--kubeconfig",
                kubeconfig.to_str().context("kubeconfig path")?,
                // The fabric: clients outside the cluster reach node ports through it.
                "--nodeport-interface",
                "eth0",
            ],
        )?;
        let plugins = reference_plugin_dir()?;
        let runtime = Runtime::new([plugins, bin_dir()], daemon.dir.join("cni-cache"));
        let conflist = NetworkConfigList::from_value(&json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "plugins": [
                {"type": "ptp", "ipMasq": false, "mtu": 1500, "ipam": {
                    "type": "host-local", "dataDir": daemon.dir.join("ipam"),
                    "ranges": [[{"subnet": format!("{net}/{len}")}]],
                    "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "tapestry-cni", "socket": daemon.socket,
                 "capabilities": {POD_ANNOTATIONS_CAPABILITY: true}},
            ],
        }))?;
        Ok(Node {
            index: i,
            name,
            netns_path,
            underlay_ip: underlay,
            pod_cidr: (net, len),
            daemon,
            conflist,
            runtime,
        })
    }

    /// A pod on node `node` with `labels`: the Pod object, the sandbox through the node's CNI
    /// chain, then the kubelet's status (Running, Ready). `name` is unique in the cluster.
    pub fn add_pod(&mut self, node: usize, name: &str, labels: Value) -> Result<Pod> {
        self.add_pod_with(node, name, labels, Plumbing::Chain)
    }

    /// A VM pod on node `node`: the chain in VM mode, then a real QEMU guest on its tap (its
    /// address by DHCP from the node's daemon; it answers its name on TCP/UDP 8080), then the
    /// kubelet's status.
    pub fn add_vm_pod(&mut self, node: usize, name: &str, labels: Value) -> Result<(Pod, Guest)> {
        let pod = self.add_pod_inner(node, name, labels, Plumbing::Vm, json!({}))?;
        let mut guest = Guest::boot_in(&pod.netns_path, GuestConfig::new(name, pod.mac))?;
        guest.wait_ready(Duration::from_secs(180))?;
        self.set_running(node, name, pod.ip)?;
        Ok((pod, guest))
    }

    /// [`Cluster::add_pod`], plumbed as `plumbing` says.
    pub fn add_pod_with(
        &mut self,
        node: usize,
        name: &str,
        labels: Value,
        plumbing: Plumbing,
    ) -> Result<Pod> {
        let pod = self.add_pod_inner(node, name, labels, plumbing, json!({}))?;
        self.set_running(node, name, pod.ip)?;
        Ok(pod)
    }

    /// A live migration's target VM pod on `node` for the guest of VM pod `source` (marked as
    /// `mark` says, and annotated `tapestry.dev/vm`, so it has the readiness gate when
    /// [`Cluster::install_readiness_gate`] ran), with an incoming QEMU on its tap waiting for
    /// the source's migration ([`Guest::boot_incoming_in`], configured as the source's QEMU:
    /// `guest`); then the kubelet's status (Running; Ready only once the guest is ready here). The returned
    /// pod's `ip` is the one the CNI result gives: the guest's.
    pub fn add_migration_target(
        &mut self,
        node: usize,
        name: &str,
        labels: Value,
        source: &str,
        mark: TargetMark,
        guest: GuestConfig,
    ) -> Result<(Pod, Guest)> {
        let mut labels = labels;
        let annotations = match mark {
            TargetMark::Tapestry => json!({"tapestry.dev/vm": "true",
                                 tapestry_k8s::names::annotations::MIGRATION_SOURCE: source}),
            TargetMark::KubeVirt => {
                use tapestry_k8s::names::kubevirt;
                if labels.get(kubevirt::CREATED_BY).is_none() {
                    bail!(
                        "a KubeVirt-marked target needs the source's labels to carry {}",
                        kubevirt::CREATED_BY
                    );
                }
                // What virt-controller's migration target pod carries: the job's uid as a
                // label and its name as an annotation; the source is not named.
                labels[kubevirt::MIGRATION_JOB_UID] = json!(format!("uid-{name}"));
                json!({"tapestry.dev/vm": "true",
                       kubevirt::MIGRATION_JOB_NAME: format!("migration-{name}")})
            }
        };
        let pod = self.add_pod_inner(node, name, labels, Plumbing::Vm, annotations)?;
        let guest = Guest::boot_incoming_in(&pod.netns_path, guest)?;
        self.set_running(node, name, pod.ip)?;
        Ok((pod, guest))
    }

    fn add_pod_inner(
        &mut self,
        node: usize,
        name: &str,
        labels: Value,
        plumbing: Plumbing,
        mut annotations: Value,
    ) -> Result<Pod> {
        binary("tapestry-cni")?;
        let n = self.nodes.get(node).context("no such node")?;
        let netns = format!("{}-{name}", self.lab.prefix());
        ip(&["netns", "add", &netns])?;
        let netns_path = PathBuf::from("/run/netns").join(&netns);
        if plumbing == Plumbing::AnnotatedVm {
            annotations["tapestry.dev/vm"] = json!("true");
        }
        self.cp.apply(
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels,
                             "annotations": annotations},
                "spec": {"nodeName": n.name,
                         "containers": [{"name": "app", "image": "lab/app",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]}})
            .to_string(),
        )?;
        let uid = self.cp.kubectl_ok([
            "get",
            "pod",
            "-n",
            NAMESPACE,
            name,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        let conf = RuntimeConf::new(name, &netns_path, "eth0")
            .arg("IgnoreUnknown", "1")
            .arg("K8S_POD_NAMESPACE", NAMESPACE)
            .arg("K8S_POD_NAME", name)
            .arg("K8S_POD_UID", uid.trim())
            .capability(POD_ANNOTATIONS_CAPABILITY, annotations);
        let mut list = n.conflist.clone();
        match plumbing {
            Plumbing::Chain => {}
            Plumbing::PrimaryOnly => list.plugins.truncate(1),
            Plumbing::Vm | Plumbing::AnnotatedVm => {
                list.plugins[1].insert("vm".into(), json!({"enabled": true}));
            }
        }
        let result = tapestry_netns::run_in(&n.netns_path, || n.runtime.add(&list, &conf))?
            .with_context(|| format!("CNI ADD of {name} on {}", n.name))?;
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .context("no address in the CNI result")?
            .parse()?;
        let host = result["interfaces"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["sandbox"].is_null()))
            .and_then(|i| i["name"].as_str())
            .context("no host interface in the CNI result")?
            .to_owned();
        let host_info =
            tapestry_netns::run_in(&n.netns_path, || crate::lab::link_info(None, &host))??;
        self.pods.insert(name.to_owned(), node);
        self.lab
            .adopt_pod(name, ip, (host, host_info.0, host_info.1))
    }

    /// The kubelet's status update for a started pod whose containers are ready: Ready as the
    /// kubelet computes it ([`kubelet_ready`]: containers and readiness gates). A strategic
    /// merge (conditions merge by type), so a condition someone else wrote (the daemon's
    /// `tapestry.dev/guest-ready`) stays, as the kubelet keeps conditions it does not own.
    fn set_running(&self, node: usize, name: &str, ip: Ipv4Addr) -> Result<()> {
        let host_ip = self.nodes[node].underlay_ip.to_string();
        let t = now();
        let current: Value = serde_json::from_str(
            &self
                .cp
                .kubectl_ok(["get", "pod", "-n", NAMESPACE, name, "-o", "json"])?,
        )?;
        let (ready, reason, message) = kubelet_ready(&current, true);
        let cond = |ty: &str| json!({"type": ty, "status": "True", "lastTransitionTime": t});
        let mut ready_cond = json!({"type": "Ready", "status": if ready { "True" } else { "False" },
                                    "lastTransitionTime": t});
        if !ready {
            ready_cond["reason"] = json!(reason);
            ready_cond["message"] = json!(message);
        }
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "startTime": t,
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"),
                           cond("ContainersReady"), ready_cond, cond("PodScheduled")],
            "containerStatuses": [{"name": "app", "image": "lab/app", "imageID": "",
                                   "ready": true, "restartCount": 0, "started": true,
                                   "state": {"running": {"startedAt": t}}}]}});
        self.cp.kubectl_ok([
            "patch",
            "pod",
            "-n",
            NAMESPACE,
            name,
            "--subresource=status",
            "--type=strategic",
            "-p",
            &status.to_string(),
        ])?;
        Ok(())
    }

    /// Installs the chart's MutatingAdmissionPolicy (`vm.readinessGate`), which gives VM pods
    /// the readiness gate `tapestry.dev/guest-ready`, and waits until the apiserver applies it.
    pub fn install_readiness_gate(&self) -> Result<()> {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/tapestry");
        let out = std::process::Command::new(crate::k8s::binary("helm")?)
            .args(["template", "tapestry"])
            .arg(&chart)
            .args([
                "--namespace",
                "tapestry",
                "--show-only",
                "templates/mutating-admission-policy.yaml",
            ])
            .output()
            .context("helm template")?;
        if !out.status.success() {
            bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.cp.apply(&String::from_utf8(out.stdout)?)?;
        let probe = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "gate-probe", "namespace": NAMESPACE,
                         "annotations": {"tapestry.dev/vm": "true"}},
            "spec": {"containers": [{"name": "c", "image": "lab/app"}]}})
        .to_string();
        poll(
            Duration::from_secs(30),
            "the readiness-gate policy in effect",
            || {
                self.cp.apply(&probe)?;
                let gates = self.cp.kubectl_ok([
                    "get",
                    "pod",
                    "-n",
                    NAMESPACE,
                    "gate-probe",
                    "-o",
                    "jsonpath={.spec.readinessGates[*].conditionType}",
                ])?;
                // Never scheduled: no kubelet would delay its deletion.
                self.cp.kubectl_ok([
                    "delete",
                    "pod",
                    "-n",
                    NAMESPACE,
                    "gate-probe",
                    "--grace-period=0",
                    "--force",
                    "--wait=true",
                ])?;
                Ok((gates.trim() == GUEST_READY_GATE).then_some(()))
            },
        )
    }

    /// Plays the kubelet's part in readiness gates until dropped: whenever a pod with readiness
    /// gates changes, a kubelet recomputes its Ready from its containers and gates
    /// ([`kubelet_ready`]) and writes it; this does the same every 200 ms for the pods of the
    /// lab's namespace whose containers are ready.
    pub fn kubelet_readiness(&self) -> Result<KubeletReadiness> {
        let kubectl = crate::k8s::binary("kubectl")?;
        let kubeconfig = self.cp.kubeconfig_path(ADMIN)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let run = move |args: &[&str]| -> Result<String> {
            let out = std::process::Command::new(&kubectl)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(args)
                .output()?;
            if !out.status.success() {
                bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8(out.stdout)?)
        };
        let thread = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let Ok(list) = run(&["get", "pods", "-n", NAMESPACE, "-o", "json"]) else {
                    continue;
                };
                let Ok(list) = serde_json::from_str::<Value>(&list) else {
                    continue;
                };
                for pod in list["items"].as_array().into_iter().flatten() {
                    let gated = pod["spec"]["readinessGates"]
                        .as_array()
                        .is_some_and(|g| !g.is_empty());
                    let conditions = pod["status"]["conditions"].as_array();
                    let status_of = |t: &str| {
                        conditions
                            .into_iter()
                            .flatten()
                            .find(|c| c["type"] == t)
                            .and_then(|c| c["status"].as_str())
                            .map(str::to_owned)
                    };
                    let Some(containers) = status_of("ContainersReady") else {
                        continue;
                    };
                    if !gated {
                        continue;
                    }
                    let (ready, reason, message) = kubelet_ready(pod, containers == "True");
                    let want = if ready { "True" } else { "False" };
                    if status_of("Ready").as_deref() == Some(want) {
                        continue;
                    }
                    let mut cond = json!({"type": "Ready", "status": want,
                                          "lastTransitionTime": now()});
                    if !ready {
                        cond["reason"] = json!(reason);
                        cond["message"] = json!(message);
                    } else {
                        cond["reason"] = Value::Null;
                        cond["message"] = Value::Null;
                    }
                    let patch = json!({"status": {"conditions": [cond]}}).to_string();
                    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                    let _ = run(&[
                        "patch",
                        "pod",
                        "-n",
                        NAMESPACE,
                        name,
                        "--subresource=status",
                        "--type=strategic",
                        "-p",
                        &patch,
                    ]);
                }
            }
        });
        Ok(KubeletReadiness {
            stop,
            thread: Some(thread),
        })
    }

    /// Deletes a pod: CNI DEL on its node (the sandbox goes), then the object.
    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        let node = self.pods.remove(name).context("no such pod")?;
        let n = &self.nodes[node];
        let netns_path = PathBuf::from("/run/netns").join(format!("{}-{name}", self.lab.prefix()));
        let conf = RuntimeConf::new(name, &netns_path, "eth0")
            .arg("IgnoreUnknown", "1")
            .arg("K8S_POD_NAMESPACE", NAMESPACE)
            .arg("K8S_POD_NAME", name);
        tapestry_netns::run_in(&n.netns_path, || n.runtime.del(&n.conflist, &conf))?
            .with_context(|| format!("CNI DEL of {name}"))?;
        self.cp.kubectl_ok([
            "delete",
            "pod",
            "-n",
            NAMESPACE,
            name,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])?;
        let _ = ip(&["netns", "del", &format!("{}-{name}", self.lab.prefix())]);
        self.lab.forget_pod(name);
        Ok(())
    }

    /// A ClusterIP Service selecting `selector`, port 80 -> 8080 over TCP and UDP. Returns its
    /// ClusterIP.
    pub fn add_service(&self, name: &str, selector: Value) -> Result<Ipv4Addr> {
        self.cp.apply(
            &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {"selector": selector, "ports": [
                    {"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": 8080},
                    {"name": "udp", "protocol": "UDP", "port": 80, "targetPort": 8080}]}})
            .to_string(),
        )?;
        Ok(self
            .cp
            .kubectl_ok([
                "get",
                "svc",
                "-n",
                NAMESPACE,
                name,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ])?
            .trim()
            .parse()?)
    }

    /// A client outside the cluster: a network namespace of its own on the fabric (like a
    /// machine on the nodes' network), at the fabric's `.60 + n`. Returns its namespace's path
    /// and address; the lab removes it with the rest.
    pub fn add_outside_client(&self, n: u8) -> Result<(PathBuf, Ipv4Addr)> {
        let prefix = self.lab.prefix();
        let ns = format!("{prefix}-out{n}");
        let veth = format!("{prefix}-o{n}");
        let s = self.lab.subnet().octets();
        let addr = Ipv4Addr::new(s[0], s[1], s[2], 60 + n);
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "eth0", "netns", &ns,
        ])?;
        ip(&[
            "link",
            "set",
            &veth,
            "master",
            &format!("{prefix}-fab"),
            "up",
        ])?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{addr}/26"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            let mut full = vec!["-n", &ns];
            full.extend(args);
            ip(&full)?;
        }
        Ok((PathBuf::from("/run/netns").join(&ns), addr))
    }

    /// Node of pod `name`.
    pub fn node_of(&self, pod: &str) -> Option<usize> {
        self.pods.get(pod).copied()
    }

    /// Waits until every node's daemon has Service `name` with exactly `want` (`ip:port`,
    /// active) behind its TCP port.
    pub fn wait_backends(
        &self,
        name: &str,
        want: &[SocketAddrV4],
        timeout: Duration,
    ) -> Result<()> {
        let mut want: Vec<String> = want.iter().map(|a| a.to_string()).collect();
        want.sort();
        for node in &self.nodes {
            poll(
                timeout,
                &format!("{} programs {name} -> {want:?}", node.name),
                || Ok((active_backends(&node.daemon, name).as_ref() == Some(&want)).then_some(())),
            )?;
        }
        Ok(())
    }

    /// Working directory of the cluster (inside the control plane's).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Active TCP backends (`ip:port`, sorted) of Service `default/<name>` in `daemon`, or None
/// while it has no such Service.
pub fn active_backends(daemon: &Daemon, name: &str) -> Option<Vec<String>> {
    let services: Vec<ServiceInfo> = daemon.client().services().ok()?;
    let full = format!("{NAMESPACE}/{name}");
    let s = services.iter().find(|s| {
        (s.name == full || s.name.starts_with(&format!("{full}/")))
            && s.protocol.to_string() == "TCP"
    })?;
    let mut ips: Vec<String> = s
        .backends
        .iter()
        .filter(|b| b.state == BackendState::Active)
        .map(|b| format!("{}:{}", b.ip, b.port))
        .collect();
    ips.sort();
    Some(ips)
}

/// The Guest CRD, then `tapestry-controller` (leader election in `default`), as the chart runs
/// it; its log is `controller.log` in `dir`.
fn start_controller(cp: &ControlPlane, dir: &Path) -> Result<std::process::Child> {
    let bin = binary("tapestry-controller")?;
    cp.install_guest_crd()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = fs::File::create(dir.join("controller.log"))?;
    std::process::Command::new(bin)
        .arg(format!(
            "--kubeconfig={}",
            cp.kubeconfig_path(ADMIN)?.display()
        ))
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .arg(format!("--lease-namespace={NAMESPACE}"))
        .env_remove("KUBECONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting tapestry-controller")
}

fn underlay_ip(lab: &Lab, i: usize) -> Ipv4Addr {
    let s = lab.subnet().octets();
    Ipv4Addr::new(s[0], s[1], s[2], 10 + i as u8)
}

fn pod_cidr(lab: &Lab, i: usize) -> (Ipv4Addr, u8) {
    let s = lab.subnet().octets();
    (Ipv4Addr::new(s[0], s[1], s[2], 64 + 16 * i as u8), 28)
}

/// The readiness gate the chart's admission policy gives VM pods.
pub const GUEST_READY_GATE: &str = "tapestry.dev/guest-ready";

/// [`Cluster::kubelet_readiness`]'s thread; stops when dropped.
pub struct KubeletReadiness {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for KubeletReadiness {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod's Ready as the kubelet computes it (pkg/kubelet/status/generate.go,
/// GeneratePodReadyCondition): not ready while its containers are not (`ContainersNotReady`);
/// else not ready while a readiness gate's condition is missing or not True
/// (`ReadinessGatesNotReady`, with the kubelet's messages); else ready. Returns (ready, reason,
/// message).
pub fn kubelet_ready(pod: &Value, containers_ready: bool) -> (bool, String, String) {
    if !containers_ready {
        return (
            false,
            "ContainersNotReady".into(),
            "containers with unready status".into(),
        );
    }
    let conditions = pod["status"]["conditions"].as_array();
    let mut unready = Vec::new();
    for gate in pod["spec"]["readinessGates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let t = gate["conditionType"].as_str().unwrap_or_default();
        match conditions
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t)
            .and_then(|c| c["status"].as_str())
        {
            None => unready.push(format!(
                "corresponding condition of pod readiness gate \"{t}\" does not exist."
            )),
            Some("True") => {}
            Some(s) => unready.push(format!(
                "the status of pod readiness gate \"{t}\" is not \"True\", but {s}"
            )),
        }
    }
    if unready.is_empty() {
        (true, String::new(), String::new())
    } else {
        (false, "ReadinessGatesNotReady".into(), unready.join(", "))
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
