//! Tapestry on a real Kubernetes node on this machine (tests/src/node.rs): kubelet + containerd,
//! the real apiserver, etcd, kube-controller-manager and kube-scheduler, no registry, no
//! kube-proxy; the primary CNI is the reference bridge + host-local and Tapestry is installed
//! with its own Helm chart. One node serves the whole file, in one test with numbered steps
//! (starting a node takes seconds, and only one can run on a machine at a time).
//!
//! Needs root, `scripts/setup.sh` (containerd, the Kubernetes binaries, the guest) and `make
//! images` for the Tapestry steps; under `CI=...` a missing prerequisite fails the test.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tapestry_tests::k8s;
use tapestry_tests::node::{self, Node, TAPESTRY_NAMESPACE};
use tapestry_tests::poll;

const POD_TIMEOUT: Duration = Duration::from_secs(90);
/// The VM pod is Ready when its guest (software emulation) serves TCP: boot and DHCP.
const VM_TIMEOUT: Duration = Duration::from_secs(180);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn real_node() -> Result<()> {
    tapestry_tests::require_node!(Ok(()));
    let t0 = Instant::now();
    let mut node = Node::start()?;
    eprintln!("node Ready in {:?}", t0.elapsed());
    let result = steps(&node);
    if result.is_err() {
        // Dropping the node still cleans up everything; the logs stay for the failure.
        node.keep_logs();
    }
    eprintln!("steps done in {:?}", t0.elapsed());
    result
}

fn steps(node: &Node) -> Result<()> {
    primary_alone(node)?;

    if !tapestry_tests::prereq::available("node (Tapestry)", node::require_tapestry()) {
        return Ok(());
    }
    let primary = std::fs::read(node.primary_conflist_path())?;
    tapestry_chained_in(node, &primary)?;
    apiserver_through_cluster_ip(node)?;
    cluster_dns_through_tapestry(node)?;
    service_with_pods_and_vm(node)?;
    uninstall_restores_primary(node, &primary)
}

/// Step 1: the node without Tapestry. A pod runs with an address of the primary's bridge and
/// is reachable from the node and from another pod; its ClusterIP is not (no kube-proxy).
fn primary_alone(node: &Node) -> Result<()> {
    node.apply(&node.server_pod("plain", &[("app", "plain")]))?;
    node.apply(&node.client_pod("plain-client"))?;
    // A pod from before Tapestry: it stays, and must reach ClusterIPs once Tapestry is in.
    node.apply(&node.client_pod("early"))?;
    node.wait_pod_running("default", "early", POD_TIMEOUT)?;
    let ip = node.wait_pod_ready("default", "plain", POD_TIMEOUT)?;
    node.wait_pod_running("default", "plain-client", POD_TIMEOUT)?;
    assert!(
        node::in_pod_subnet(ip),
        "pod IP {ip} is outside {}",
        node::POD_SUBNET
    );
    let reply = tapestry_tests::tcp_request(SocketAddrV4::new(ip, 8080), b"hi\n", REQUEST_TIMEOUT)
        .context("the node reaching a pod through the bridge")?;
    assert_eq!(reply, "plain");
    let reply = node.request_from(
        "default",
        "plain-client",
        SocketAddrV4::new(ip, 8080),
        REQUEST_TIMEOUT,
    )?;
    assert_eq!(reply, "plain");

    node.kubectl_ok([
        "expose",
        "pod",
        "plain",
        "--name=plain",
        "--port=80",
        "--target-port=8080",
    ])?;
    let vip = node.cluster_ip("plain")?;
    node.wait_endpoints("plain", &[ip], Duration::from_secs(30))?;
    let r = node.request_from(
        "default",
        "plain-client",
        SocketAddrV4::new(vip, 80),
        Duration::from_secs(2),
    );
    assert!(
        r.is_err(),
        "ClusterIP {vip} answered ({r:?}) on a node without kube-proxy and without Tapestry"
    );
    node.kubectl_ok(["delete", "service", "plain"])?;
    node.kubectl_ok(["delete", "pod", "plain", "plain-client", "--grace-period=1"])?;
    Ok(())
}

/// Step 2: `helm install` of Tapestry's chart. The DaemonSet's install container chains
/// tapestry-cni into the primary conflist (declaring the pod-annotations capability) and
/// copies the plugin into the CNI bin dir; the daemon and the controller become ready.
fn tapestry_chained_in(node: &Node, primary: &[u8]) -> Result<()> {
    node.import_tapestry_images()?;
    let t = Instant::now();
    node.install_tapestry(&[])?;
    eprintln!("Tapestry installed and ready in {:?}", t.elapsed());

    let primary: Value = serde_json::from_slice(primary)?;
    let chained: Value = serde_json::from_slice(&std::fs::read(node.primary_conflist_path())?)?;
    let plugins = chained["plugins"].as_array().context("conflist plugins")?;
    assert_eq!(
        plugins.len(),
        2,
        "the chained conflist has the primary's plugin and tapestry-cni: {chained}"
    );
    assert_eq!(
        plugins[0], primary["plugins"][0],
        "the primary's entry changed"
    );
    assert_eq!(plugins[1]["type"], "tapestry-cni");
    assert_eq!(
        plugins[1]["capabilities"]["io.kubernetes.cri.pod-annotations"], true,
        "containerd hands pod annotations only to a plugin that declares the capability"
    );
    assert_eq!(
        plugins[1]["socket"],
        node.tapestry_dir()
            .join("tapestryd.sock")
            .display()
            .to_string()
    );
    assert!(
        node.cni_bin_dir().join("tapestry-cni").is_file(),
        "the installer copied no tapestry-cni into {}",
        node.cni_bin_dir().display()
    );
    Ok(())
}

/// Step 3: the `kubernetes` Service through Tapestry's datapath, with no sidestep. Its endpoint
/// is the apiserver on the node's own address (a host-network endpoint: no pod veth behind it),
/// so only reverse NAT on the client's node can answer. A plain pod, with only what the kubelet
/// gives every container (`KUBERNETES_SERVICE_HOST`/`_PORT`: the ClusterIP), connects and gets
/// the apiserver's `/version` over HTTPS; the controller, to which the chart gives no override
/// (`k8sServiceHost` is the host-network daemon's alone), holds and renews its leader Lease
/// through the same ClusterIP.
/// The cluster DNS (CoreDNS from scripts/build-e2e.sh behind `kube-system/kube-dns`), reached
/// through Tapestry's ClusterIP: a pod's resolv.conf names it (the kubelet's clusterDNS), and
/// from the pod it resolves Services and answers NXDOMAIN for what does not exist.
fn cluster_dns_through_tapestry(node: &Node) -> Result<()> {
    let e2e = tapestry_tests::conformance::E2e::build()?;
    let coredns = e2e.coredns()?.to_string();
    for (name, archive) in &e2e.images {
        if *name == coredns {
            node.import_image(archive)?;
        }
    }
    // From the node itself first (deploy_cluster_dns waits for that), then from a pod.
    node.deploy_cluster_dns(&coredns, Duration::from_secs(120))?;
    node.apply(&node.client_pod("dns-client"))?;
    node.wait_pod_running("default", "dns-client", POD_TIMEOUT)?;
    let resolv = node.exec("default", "dns-client", &["cat", "/etc/resolv.conf"])?;
    assert!(
        resolv.contains(&format!("nameserver {}", node::CLUSTER_DNS_IP))
            && resolv.contains("search default.svc.cluster.local svc.cluster.local"),
        "the pod's resolv.conf:\n{resolv}"
    );
    let server = SocketAddrV4::new(node::CLUSTER_DNS_IP, 53);
    let answers = node.in_pod("default", "dns-client", || {
        let t = Duration::from_secs(3);
        (
            tapestry_tests::net::dns_query_a(server, "kubernetes.default.svc.cluster.local", t),
            tapestry_tests::net::dns_query_a(server, "kube-dns.kube-system.svc.cluster.local", t),
            tapestry_tests::net::dns_query_a(
                server,
                "no-such-service.default.svc.cluster.local",
                t,
            ),
        )
    })?;
    assert_eq!(answers.0?, vec![k8s::APISERVER_CLUSTER_IP]);
    assert_eq!(answers.1?, vec![node::CLUSTER_DNS_IP]);
    assert_eq!(
        answers.2?,
        Vec::<Ipv4Addr>::new(),
        "a Service that does not exist"
    );
    node.kubectl_ok([
        "delete",
        "pod",
        "dns-client",
        "--grace-period=1",
        "--wait=false",
    ])?;
    Ok(())
}

fn apiserver_through_cluster_ip(node: &Node) -> Result<()> {
    let vip = node.cluster_ip("kubernetes")?;
    let port: u16 = node
        .kubectl_ok([
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.ports[0].port}",
        ])?
        .trim()
        .parse()?;

    node.apply(&node.client_pod("api-client"))?;
    node.wait_pod_running("default", "api-client", POD_TIMEOUT)?;
    // What an in-cluster client (kube-rs, client-go) reads.
    let env = node.exec(
        "default",
        "api-client",
        &[
            "/bin/sh",
            "-c",
            "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT",
        ],
    )?;
    assert_eq!(env.trim(), format!("{vip}:{port}"), "the pod's environment");
    let addr = SocketAddrV4::new(vip, port);
    // TCP from the pod's own process (busybox nc connects, runs `true`, exits 0).
    node.exec(
        "default",
        "api-client",
        &[
            "nc",
            "-w",
            "3",
            &vip.to_string(),
            &port.to_string(),
            "-e",
            "/bin/true",
        ],
    )
    .with_context(|| format!("TCP to the kubernetes ClusterIP {addr} from the pod"))?;
    // HTTPS from the pod's network namespace, as an in-cluster client does it: the apiserver's
    // certificate checked against the cluster CA and the ClusterIP (which it names). openssl
    // (the host's), because busybox's wget cannot: its TLS client sends no
    // signature_algorithms, and Go's TLS refuses such a TLS 1.2 hello (alert 40). /version is
    // open to anonymous clients.
    let response = https_get(node, "api-client", addr, "/version")?;
    let version: Value = serde_json::from_str(&response)
        .with_context(|| format!("GET https://{addr}/version from the pod: {response:?}"))?;
    assert_eq!(
        version["gitVersion"],
        k8s::kubernetes_version()?,
        "GET https://{addr}/version: {version}"
    );
    eprintln!(
        "a pod reached the apiserver through ClusterIP {addr}: {}",
        version["gitVersion"]
    );
    node.kubectl_ok(["delete", "pod", "api-client", "--grace-period=1"])?;

    // The controller: an ordinary pod without an apiserver override, leading.
    let pods: Value = serde_json::from_str(&node.kubectl_ok([
        "get",
        "pods",
        "-n",
        TAPESTRY_NAMESPACE,
        "-l",
        "app.kubernetes.io/component=controller",
        "-o",
        "json",
    ])?)?;
    let pods = pods["items"].as_array().context("controller pods")?;
    assert_eq!(
        pods.len(),
        1,
        "one controller replica (controller.replicas=1)"
    );
    let pod = &pods[0];
    let name = pod["metadata"]["name"]
        .as_str()
        .context("controller pod name")?;
    assert_ne!(
        pod["spec"]["hostNetwork"], true,
        "the controller is an ordinary pod"
    );
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let env = c["env"].as_array().cloned().unwrap_or_default();
        assert!(
            !env.iter().any(|e| e["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("KUBERNETES_SERVICE_"))),
            "the controller's container {} overrides the apiserver's address: {env:?}",
            c["name"]
        );
    }
    let logs = || {
        node.kubectl_ok(["logs", "-n", TAPESTRY_NAMESPACE, name, "--tail=30"])
            .unwrap_or_else(|e| format!("(no logs: {e:#})"))
    };
    let lease = || node.get_json(TAPESTRY_NAMESPACE, "lease", "tapestry-controller");
    let ours = format!("{name}_");
    let held = poll(
        Duration::from_secs(60),
        "the controller to hold its leader Lease",
        || {
            let l = lease()?;
            let holder = l["spec"]["holderIdentity"].as_str().unwrap_or("");
            Ok(holder.starts_with(&ours).then_some(l))
        },
    )
    .with_context(|| format!("controller {name}'s log:\n{}", logs()))?;
    // Renewed every retry period (2 s): the controller keeps talking to the apiserver.
    let first = held["spec"]["renewTime"].clone();
    poll(
        Duration::from_secs(15),
        "the controller to renew its leader Lease",
        || {
            let l = lease()?;
            let holder = l["spec"]["holderIdentity"].as_str().unwrap_or("");
            Ok((holder.starts_with(&ours) && l["spec"]["renewTime"] != first).then_some(()))
        },
    )
    .with_context(|| format!("controller {name}'s log:\n{}", logs()))?;
    eprintln!(
        "the controller {name} leads through the kubernetes ClusterIP (Lease held by {})",
        held["spec"]["holderIdentity"]
    );
    Ok(())
}

/// Step 4: two pods and a VM pod behind one Service made with `kubectl expose`; a client pod
/// reaches all three through the ClusterIP (only Tapestry's datapath handles it); deleting the
/// VM pod removes its endpoint and its traffic.
fn service_with_pods_and_vm(node: &Node) -> Result<()> {
    let web = [("app", "web")];
    node.apply(&node.server_pod("web-a", &web))?;
    node.apply(&node.server_pod("web-b", &web))?;
    node.apply(&node.vm_pod("vm-a", &web))?;
    node.apply(&node.client_pod("client"))?;
    let a = node.wait_pod_ready("default", "web-a", POD_TIMEOUT)?;
    let b = node.wait_pod_ready("default", "web-b", POD_TIMEOUT)?;
    node.wait_pod_running("default", "client", POD_TIMEOUT)?;
    let t = Instant::now();
    let vm = node
        .wait_pod_ready("default", "vm-a", VM_TIMEOUT)
        .with_context(|| {
            format!(
                "the VM pod's guest never served TCP 8080; vm-a's log:\n{}",
                node.kubectl_ok(["logs", "vm-a", "--tail=40"])
                    .unwrap_or_default()
            )
        })?;
    eprintln!(
        "VM pod Ready (guest serving) {:?} after the pods",
        t.elapsed()
    );
    assert!(node::in_pod_subnet(vm));

    node.kubectl_ok([
        "expose",
        "pod",
        "web-a",
        "--name=web",
        "--port=80",
        "--target-port=8080",
        "--selector=app=web",
    ])?;
    let vip = node.cluster_ip("web")?;
    node.wait_endpoints("web", &[a, b, vm], Duration::from_secs(60))?;

    let client = node.pod_netns("default", "client")?;
    let seen = names_through(
        &client,
        vip,
        &["web-a", "web-b", "vm-a"],
        Duration::from_secs(60),
    )?;
    eprintln!("through ClusterIP {vip}:80 the client reached {seen:?}");
    // The node itself (its host network: the kubelet, host-network pods; this test runs there)
    // reaches the ClusterIP too, through the chart's host services (cgroup programs on the
    // host's cgroup root, mounted into the daemon).
    let mut from_node = BTreeSet::new();
    for _ in 0..12 {
        let name =
            tapestry_tests::tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", REQUEST_TIMEOUT)
                .with_context(|| format!("TCP {vip}:80 from the node itself"))?;
        assert!(
            ["web-a", "web-b", "vm-a"].contains(&name.as_str()),
            "ClusterIP {vip} answered the node {name:?}"
        );
        from_node.insert(name);
    }
    eprintln!("from the node itself, ClusterIP {vip}:80 reached {from_node:?}");
    // The pod that was there before `helm install`: its veth got the datapath by discovery
    // (behind the primary's bridge: neighbour entry + forwarding database).
    let early = node.pod_netns("default", "early")?;
    let seen = names_through(
        &early,
        vip,
        &["web-a", "web-b", "vm-a"],
        Duration::from_secs(60),
    )
    .context("the pod from before helm install through the ClusterIP")?;
    eprintln!("the pod from before helm install reached {seen:?}");

    node.kubectl_ok(["delete", "pod", "vm-a", "--grace-period=1", "--wait=true"])?;
    node.wait_endpoints("web", &[a, b], Duration::from_secs(60))?;
    // Give the datapath a moment to drop the backend, then every request lands on a pod.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let replies: Vec<String> = (0..12)
            .map(|_| request(&client, vip))
            .collect::<Result<_>>()?;
        if replies.iter().all(|r| r == "web-a" || r == "web-b") {
            break;
        }
        if Instant::now() > deadline {
            bail!("30 s after the VM pod went, requests still reach {replies:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    rollout_while_pods_start(node, vip)?;
    node.kubectl_ok(["delete", "service", "web"])?;
    node.kubectl_ok([
        "delete",
        "pod",
        "web-a",
        "web-b",
        "client",
        "early",
        "--grace-period=1",
    ])?;
    Ok(())
}

/// A DaemonSet rollout (`kubectl rollout restart`) while pods are being created: the CNI step
/// stays through it (the old pod's installer sees its DaemonSet still there), a pod whose ADD
/// meets no daemon fails with code 11 and is retried by the kubelet, and every pod ends up
/// reaching the ClusterIP.
fn rollout_while_pods_start(node: &Node, vip: Ipv4Addr) -> Result<()> {
    let names: Vec<String> = (0..4).map(|i| format!("roll-{i}")).collect();
    node.kubectl_ok([
        "rollout",
        "restart",
        "daemonset/tapestry-node",
        "-n",
        TAPESTRY_NAMESPACE,
    ])?;
    for name in &names {
        node.apply(&node.client_pod(name))?;
        std::thread::sleep(Duration::from_millis(300));
    }
    node.kubectl_ok([
        "rollout",
        "status",
        "daemonset/tapestry-node",
        "-n",
        TAPESTRY_NAMESPACE,
        "--timeout=180s",
    ])?;
    let chained = std::fs::read_to_string(node.primary_conflist_path())?;
    assert!(
        chained.contains("tapestry-cni"),
        "the rollout took the step out: {chained}"
    );
    for name in &names {
        node.wait_pod_running("default", name, POD_TIMEOUT)?;
        let netns = node.pod_netns("default", name)?;
        let seen = names_through(&netns, vip, &["web-a", "web-b"], Duration::from_secs(60))
            .with_context(|| format!("{name}, created during the rollout, through {vip}"))?;
        eprintln!("{name} (created during the rollout) reached {seen:?}");
    }
    let mut delete = vec!["delete", "pod", "--grace-period=1"];
    delete.extend(names.iter().map(String::as_str));
    node.kubectl_ok(delete)?;
    Ok(())
}

/// Step 5: `helm uninstall` takes tapestry-cni out again: the conflist is the primary's (the
/// same JSON; the installer rewrites a conflist, so the bytes may be formatted differently), and
/// the plugin binary and the pinned datapath are gone.
fn uninstall_restores_primary(node: &Node, primary: &[u8]) -> Result<()> {
    node.uninstall_tapestry()?;
    let want: Value = serde_json::from_slice(primary)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = std::fs::read(node.primary_conflist_path())?;
        if serde_json::from_slice::<Value>(&now).ok().as_ref() == Some(&want) {
            eprintln!(
                "conflist restored: the same JSON{}",
                if now == primary {
                    ", byte for byte"
                } else {
                    " (formatted differently)"
                }
            );
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after helm uninstall the conflist is\n{}\nnot the primary's\n{}",
                String::from_utf8_lossy(&now),
                String::from_utf8_lossy(primary)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !node.cni_bin_dir().join("tapestry-cni").exists(),
        "tapestry-cni is still in the CNI bin dir after helm uninstall"
    );
    let pins: Vec<_> = std::fs::read_dir(node.bpffs_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        pins.is_empty(),
        "pins left in {} after helm uninstall (daemon.uninstallOnStop): {pins:?}",
        node.bpffs_dir().display()
    );
    Ok(())
}

/// `GET <path>` over HTTPS to `addr` from the network namespace of pod `default/<pod>` with the
/// host's `openssl s_client`, verifying the server's certificate against the control plane's CA
/// and `addr`'s IP; the response body.
fn https_get(node: &Node, pod: &str, addr: SocketAddrV4, path: &str) -> Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let ca = node.control_plane().ca_path();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        addr.ip()
    );
    let out = node.in_pod("default", pod, || -> Result<std::process::Output> {
        // In this thread's namespace: the child inherits it.
        let mut child = Command::new("timeout")
            .arg("20")
            .arg("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
            .arg(addr.to_string())
            .arg("-CAfile")
            .arg(&ca)
            .arg("-verify_ip")
            .arg(addr.ip().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running openssl s_client")?;
        child
            .stdin
            .take()
            .context("openssl stdin")?
            .write_all(request.as_bytes())?;
        Ok(child.wait_with_output()?)
    })??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (head, body) = stdout.split_once("\r\n\r\n").with_context(|| {
        format!(
            "GET https://{addr}{path} from pod {pod} ({}): no HTTP response\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET https://{addr}{path} from pod {pod}: {head}\n{body}");
    }
    Ok(body.to_string())
}

/// One request from the client pod's network namespace to `vip:80`.
fn request(client: &Path, vip: Ipv4Addr) -> Result<String> {
    let addr = SocketAddrV4::new(vip, 80);
    let reply = tapestry_netns::run_in(client, || {
        tapestry_tests::tcp_request(addr, b"hi\n", REQUEST_TIMEOUT)
    })?;
    reply.with_context(|| format!("TCP {addr} from the client pod"))
}

/// Requests through the ClusterIP until every name in `want` answered.
fn names_through(
    client: &Path,
    vip: Ipv4Addr,
    want: &[&str],
    timeout: Duration,
) -> Result<BTreeSet<String>> {
    let deadline = Instant::now() + timeout;
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    while Instant::now() < deadline {
        match request(client, vip) {
            Ok(name) => {
                assert!(
                    want.contains(&name.as_str()),
                    "ClusterIP {vip} answered {name:?}, not a backend of the Service"
                );
                seen.insert(name);
            }
            Err(e) => {
                errors.push(format!("{e:#}"));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if want.iter().all(|w| seen.contains(*w)) {
            return Ok(seen);
        }
    }
    bail!(
        "through ClusterIP {vip}:80 only {seen:?} answered within {timeout:?} (want {want:?}); \
         last errors: {:?}",
        &errors[errors.len().saturating_sub(3)..]
    )
}
