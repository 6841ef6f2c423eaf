//! tapestryd in Kubernetes mode against a real kube-apiserver (`tapestry_tests::k8s`): its maps
//! follow Services and EndpointSlices written by any manager, real TCP reaches pods through
//! the ClusterIP, an apiserver outage (and a daemon restart during it) leaves the datapath as it
//! was, and the daemon publishes and garbage-collects its node's Guests from the CNI
//! attachments. Needs root (netns, bpffs) and the Kubernetes binaries; skipped outside CI
//! without them, failed under `CI=...`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::{Value, json};
use tapestry_tests::{
    Lab, Pod,
    daemon::Daemon,
    k8s::{ControlPlane, k8s_available},
    poll, require_k8s, require_lab,
    tapfd::{TapGuest, register_vm_pod},
};

const T: Duration = Duration::from_secs(3);
const NODE: &str = "node-a";

/// ClusterIPs the tests set explicitly, inside the control plane's service range; an
/// unreachable route keeps a packet the datapath did not translate on this host.
const VIP_NET: &str = "10.96.77.0/24";

struct VipGuard;

impl VipGuard {
    fn new() -> VipGuard {
        let _ = Command::new("ip")
            .args(["route", "replace", "unreachable", VIP_NET])
            .status();
        VipGuard
    }
}

impl Drop for VipGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", "unreachable", VIP_NET])
            .status();
    }
}

fn daemon(name: &str, cp: &ControlPlane, attach: &[&str]) -> Daemon {
    daemon_as(name, &cp.kubeconfig_path("admin").unwrap(), attach)
}

fn daemon_as(name: &str, kubeconfig: &std::path::Path, attach: &[&str]) -> Daemon {
    Daemon::start_with(
        name,
        "services: []\n",
        attach,
        &[
            "--source",
            "kubernetes",
            "--node-name",
            NODE,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
    .unwrap()
}

/// A slice written by a controller that is neither Kubernetes' nor Tapestry's.
fn slice(name: &str, service: &str, endpoints: Value) -> String {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "hand-written.example.com"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
    .to_string()
}

fn endpoint(pod: &Pod, ready: bool) -> Value {
    json!({"addresses": [pod.ip.to_string()], "conditions": {"ready": ready},
           "targetRef": {"kind": "Pod", "name": pod.name, "namespace": "default"}})
}

/// Backend ips of the service named `name` in the daemon, or None while it has no such service.
fn backends(d: &Daemon, name: &str) -> Option<Vec<String>> {
    let services = d.client().services().ok()?;
    let s = services.iter().find(|s| s.name == name)?;
    let mut ips: Vec<String> = s
        .backends
        .iter()
        .filter(|b| b.state == tapestry_api::types::BackendState::Active)
        .map(|b| format!("{}:{}", b.ip, b.port))
        .collect();
    ips.sort();
    Some(ips)
}

fn wait_backends(d: &Daemon, name: &str, want: &[&Pod]) -> Result<()> {
    let mut want: Vec<String> = want.iter().map(|p| format!("{}:8080", p.ip)).collect();
    want.sort();
    poll(
        Duration::from_secs(10),
        &format!("{name} -> {want:?}"),
        || Ok((backends(d, name).as_ref() == Some(&want)).then_some(())),
    )
}

fn answers(client: &Pod, vip: Ipv4Addr, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|_| {
            client
                .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
                .expect("request through the ClusterIP")
        })
        .collect()
}

#[test]
fn maps_follow_endpointslices_of_any_manager_and_survive_an_apiserver_outage() {
    require_lab!();
    if !k8s_available() {
        return;
    }
    let _guard = VipGuard::new();
    let mut cp = ControlPlane::start().unwrap();
    let mut lab = Lab::new("k8s-mode").unwrap();
    let client = lab.add_pod("client").unwrap();
    let a = lab.add_pod("a").unwrap();
    let b = lab.add_pod("b").unwrap();
    let _sa = a.serve_tcp_name(8080).unwrap();
    let _sb = b.serve_tcp_name(8080).unwrap();
    let mut d = daemon(
        "k8s-mode",
        &cp,
        &[&client.host_ifname, &a.host_ifname, &b.host_ifname],
    );
    let st = d.status().unwrap();
    assert_eq!(st.mode, tapestry_api::types::Mode::Kubernetes);
    assert!(st.source.contains(NODE), "{}", st.source);

    // A Service without a selector and a slice from a third-party controller.
    let vip = Ipv4Addr::new(10, 96, 77, 10);
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"clusterIP": vip.to_string(),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        .to_string(),
    )
    .unwrap();
    cp.apply(&slice("web-1", "web", json!([endpoint(&a, true)])))
        .unwrap();
    wait_backends(&d, "default/web", &[&a]).unwrap();
    assert_eq!(answers(&client, vip, 5), ["a".to_string()].into());

    // A second endpoint, then the first one not ready.
    cp.apply(&slice(
        "web-1",
        "web",
        json!([endpoint(&a, true), endpoint(&b, true)]),
    ))
    .unwrap();
    wait_backends(&d, "default/web", &[&a, &b]).unwrap();
    assert_eq!(answers(&client, vip, 40).len(), 2, "both pods answer");
    cp.apply(&slice(
        "web-1",
        "web",
        json!([endpoint(&a, false), endpoint(&b, true)]),
    ))
    .unwrap();
    wait_backends(&d, "default/web", &[&b]).unwrap();
    assert_eq!(answers(&client, vip, 10), ["b".to_string()].into());

    // The apiserver goes away: the datapath keeps serving, and says why nothing changes.
    let generation = d.status().unwrap().generation;
    cp.stop_apiserver();
    d.wait_status(Duration::from_secs(30), |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("unreachable"))
    })
    .expect("the status reports the outage");
    assert_eq!(answers(&client, vip, 10), ["b".to_string()].into());
    // A daemon restarted during the outage adopts the datapath and programs nothing.
    let st = d.restart_unsynced().unwrap();
    assert_eq!(st.generation, 0);
    assert_eq!(answers(&client, vip, 10), ["b".to_string()].into());
    // The restored maps know addresses, not names: look the service up by its frontend.
    let restored = d.client().services().unwrap();
    let web = restored
        .iter()
        .find(|s| s.vip == vip && s.port == 80)
        .expect("the ClusterIP is still programmed");
    assert_eq!(web.backends.len(), 1, "{web:?}");
    assert_eq!(web.backends[0].ip, b.ip);

    // Back: the watches re-list and the next change lands.
    cp.restart_apiserver().unwrap();
    d.wait_generation(1, Duration::from_secs(30)).unwrap();
    cp.apply(&slice("web-1", "web", json!([endpoint(&a, true)])))
        .unwrap();
    wait_backends(&d, "default/web", &[&a]).unwrap();
    d.wait_status(Duration::from_secs(10), |s| s.last_error.is_none())
        .unwrap();
    assert_eq!(answers(&client, vip, 5), ["a".to_string()].into());
    assert!(d.status().unwrap().generation >= 1);
    let _ = generation;

    // A UDP port and a second slice of the same Service; then the Service goes.
    cp.kubectl_ok(["delete", "service", "web"]).unwrap();
    poll(Duration::from_secs(10), "web removed", || {
        Ok(backends(&d, "default/web").is_none().then_some(()))
    })
    .unwrap();
    assert!(
        client
            .tcp_request(
                SocketAddrV4::new(vip, 80),
                b"hi\n",
                Duration::from_millis(500)
            )
            .is_err(),
        "nothing answers on a removed ClusterIP"
    );

    // Where each backend is, as `tapestry service list` shows it: a pod on its endpoint's
    // nodeName, a server on a Node's own address (a Node registered as a kubelet does, with
    // its addresses in status), an address off the cluster, and the apiserver behind
    // `kubernetes` (this control plane writes no endpoint for it: written here as the
    // apiserver's reconciler would, an address of no node).
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"}}).to_string(),
    )
    .unwrap();
    cp.kubectl_ok([
        "patch",
        "node",
        "node-b",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"},
                                     {"type": "Hostname", "address": "node-b"}]}}"#,
    ])
    .unwrap();
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "where", "namespace": "default"},
            "spec": {"clusterIP": "10.96.77.11",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
        .to_string(),
    )
    .unwrap();
    let mut on_a = endpoint(&a, true);
    on_a["nodeName"] = json!(NODE);
    cp.apply(&slice(
        "where-1",
        "where",
        json!([on_a, {"addresses": ["192.0.2.11"]}, {"addresses": ["198.51.100.7"]}]),
    ))
    .unwrap();
    cp.apply(
        &json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["192.0.2.1"], "conditions": {"ready": true}}]})
        .to_string(),
    )
    .unwrap();
    let placed = |name: &str| -> Option<Vec<(String, String, Option<String>)>> {
        let services = d.client().services().ok()?;
        let s = services.iter().find(|s| s.name == name)?;
        let mut v: Vec<_> = s
            .backends
            .iter()
            .map(|b| (b.ip.to_string(), b.kind.to_string(), b.node.clone()))
            .collect();
        v.sort();
        Some(v)
    };
    let mut want = vec![
        (a.ip.to_string(), "pod".to_string(), Some(NODE.to_string())),
        ("192.0.2.11".into(), "host".into(), Some("node-b".into())),
        ("198.51.100.7".into(), "external".into(), None),
    ];
    want.sort();
    poll(Duration::from_secs(10), "where each backend is", || {
        Ok((placed("default/where").as_ref() == Some(&want)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", placed("default/where")));
    poll(Duration::from_secs(10), "the apiserver is a host", || {
        Ok(
            (placed("default/kubernetes") == Some(vec![("192.0.2.1".into(), "host".into(), None)]))
                .then_some(()),
        )
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", placed("default/kubernetes")));
    // The table says it too: the node, or `-` where none is known.
    let out = Command::new(tapestry_tests::daemon::binary("tapestry").unwrap())
        .arg("--socket")
        .arg(&d.socket)
        .args(["service", "list", "--service", "default/where"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    for (ip, endpoint, node) in [
        (a.ip.to_string(), "pod/a", NODE),
        ("192.0.2.11".into(), "host", "node-b"),
        ("198.51.100.7".into(), "external", "-"),
    ] {
        let row: Vec<&str> = table
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{ip}:")))
            .unwrap_or_else(|| panic!("{ip} in:\n{table}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[1..3], [endpoint, node], "{table}");
    }
    lab.destroy().unwrap();
}

#[test]
fn the_daemon_publishes_and_collects_its_nodes_guests() {
    require_lab!();
    if !k8s_available() {
        return;
    }
    let cp = ControlPlane::start().unwrap();
    cp.install_guest_crd().unwrap();
    cp.install_node_identity().unwrap();
    let mut lab = Lab::new("k8s-guests").unwrap();
    let vm = lab.add_pod("vm1").unwrap();
    // A Guest of this node that no attachment backs (left by a previous run): collected.
    let stale = json!({"apiVersion": "tapestry.dev/v1alpha1", "kind": "Guest",
        "metadata": {"name": "stale", "namespace": "default"},
        "spec": {"nodeName": NODE, "ips": ["10.9.9.9"], "mac": "52:54:00:00:00:09", "tap": "tap0"}});
    let other = json!({"apiVersion": "tapestry.dev/v1alpha1", "kind": "Guest",
        "metadata": {"name": "elsewhere", "namespace": "default"},
        "spec": {"nodeName": "node-b", "ips": ["10.9.9.8"], "mac": "52:54:00:00:00:08", "tap": "tap0"}});
    cp.apply(&stale.to_string()).unwrap();
    cp.apply(&other.to_string()).unwrap();
    // The VM pod as the API knows it (no kubelet: it stays Pending, which changes nothing).
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "vm1", "namespace": "default", "labels": {"app": "vm", "tier": "web"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "compute", "image": "virt-launcher",
                "ports": [{"name": "http", "containerPort": 8080}]}]}})
        .to_string(),
    )
    .unwrap();
    let pod_uid = cp
        .kubectl_ok(["get", "pod", "vm1", "-o", "jsonpath={.metadata.uid}"])
        .unwrap();
    // The daemon runs as the chart's node-scoped identity: what it needs is what it may do.
    let d = daemon_as(
        "k8s-guests",
        &cp.node_kubeconfig(NODE).unwrap(),
        &[&vm.host_ifname],
    );
    register_vm_pod(&d.client(), &vm).unwrap();

    let get = |name: &str| -> Result<Option<Value>> {
        let out = cp.kubectl(["get", "guest", name, "-o", "json", "--show-managed-fields"])?;
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&out.stdout)?))
    };
    let condition = |g: &Value, t: &str| -> String {
        g["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == t)
            .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    // Spec and status are two writes: wait for both.
    let g = poll(Duration::from_secs(15), "Guest vm1", || {
        Ok(get("vm1")?.filter(|g| !condition(g, "Ready").is_empty()))
    })
    .unwrap();
    assert_eq!(g["spec"]["nodeName"], NODE);
    assert_eq!(g["spec"]["ips"], json!([vm.ip.to_string()]));
    assert_eq!(g["spec"]["tap"], "tap0");
    assert_eq!(g["spec"]["podRef"]["name"], "vm1");
    assert_eq!(g["spec"]["podRef"]["uid"], pod_uid.as_str());
    assert_eq!(
        g["spec"]["ports"],
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
    );
    assert_eq!(g["metadata"]["labels"], json!({"app": "vm", "tier": "web"}));
    assert_eq!(g["metadata"]["ownerReferences"][0]["uid"], pod_uid.as_str());
    assert_eq!(g["metadata"]["ownerReferences"][0]["kind"], "Pod");
    assert_eq!(condition(&g, "Attached"), "True");
    assert_eq!(
        condition(&g, "Ready"),
        "False",
        "the guest has not spoken yet"
    );
    let managers: Vec<&str> = g["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(managers.iter().all(|m| *m == "tapestryd"), "{managers:?}");

    // Traffic from the guest's address alone is no longer readiness: the daemon's probe (ARP
    // for the guest's IP on its tap) must be answered.
    let mut tap = TapGuest::open(&vm.netns_path, "tap0").unwrap();
    let mut frame = Vec::new();
    etherparse::PacketBuilder::ethernet2(vm.mac, [0xff; 6])
        .ipv4(vm.ip.octets(), [10, 96, 0, 1], 64)
        .udp(40000, 9)
        .write(&mut frame, b"up\n")
        .unwrap();
    tap.send(&frame).unwrap();
    let probes_unanswered = Instant::now();
    while probes_unanswered.elapsed() < Duration::from_secs(3) {
        tap.recv_matching(Duration::from_millis(200), |_| false);
        assert_eq!(
            condition(&get("vm1").unwrap().unwrap(), "Ready"),
            "False",
            "ready without answering its probe"
        );
    }
    // The guest answers ARP: Ready flips in the API.
    tap.answer_arp(vm.mac, vm.ip);
    poll(Duration::from_secs(10), "Guest vm1 Ready", || {
        tap.recv_matching(Duration::from_millis(200), |_| false);
        Ok(get("vm1")?.filter(|g| condition(g, "Ready") == "True"))
    })
    .unwrap();
    // The pod's tapestry.dev/guest-ready condition (its readiness gate) says the same,
    // written by the daemon under its node-scoped identity.
    let pod_condition = || -> Result<String> {
        cp.kubectl_ok([
            "get",
            "pod",
            "vm1",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"tapestry.dev/guest-ready\")].status}",
        ])
    };
    poll(Duration::from_secs(10), "pod vm1 guest-ready True", || {
        tap.recv_matching(Duration::from_millis(200), |_| false);
        Ok((pod_condition()? == "True").then_some(()))
    })
    .unwrap();
    // It stops answering (hung): Ready is cleared within the failure threshold (3 x 1 s).
    let hung = Instant::now();
    poll(Duration::from_secs(10), "Guest vm1 not Ready", || {
        Ok(get("vm1")?.filter(|g| condition(g, "Ready") == "False"))
    })
    .unwrap();
    assert!(
        hung.elapsed() < Duration::from_secs(5),
        "a hung guest stayed Ready for {:?}",
        hung.elapsed()
    );
    assert_eq!(pod_condition().unwrap(), "False");

    // Labels follow the pod's (read when the guest is first published).
    // The stale Guest of this node is collected; another node's is left alone.
    poll(Duration::from_secs(20), "stale Guest collected", || {
        Ok(get("stale")?.is_none().then_some(()))
    })
    .unwrap();
    assert!(get("elsewhere").unwrap().is_some());

    // CNI DEL: the Guest goes at once.
    d.client().delete_endpoint("ctr-vm1", "eth0").unwrap();
    poll(Duration::from_secs(10), "Guest vm1 deleted", || {
        Ok(get("vm1")?.is_none().then_some(()))
    })
    .unwrap();
    drop(tap);
    lab.destroy().unwrap();
}

#[test]
fn the_node_identity_writes_only_its_own_nodes_guests() {
    require_k8s!();
    let cp = ControlPlane::start().unwrap();
    cp.install_guest_crd().unwrap();
    cp.install_node_identity().unwrap();
    let kubeconfig = cp.node_kubeconfig(NODE).unwrap();
    let as_node = |args: &[&str], stdin: Option<&str>| -> std::process::Output {
        let mut cmd = Command::new(tapestry_tests::k8s::binary("kubectl").unwrap());
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    // A pod's Guest, as the daemon writes them (the pod need not exist for admission).
    let guest = |name: &str, node: &str| {
        json!({"apiVersion": "tapestry.dev/v1alpha1", "kind": "Guest",
            "metadata": {"name": name, "namespace": "default", "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": name,
                 "uid": "00000000-0000-0000-0000-000000000001"}]},
            "spec": {"nodeName": node, "ips": ["10.9.9.9"], "mac": "52:54:00:00:00:09", "tap": "tap0"}})
        .to_string()
    };
    let who = as_node(&["auth", "whoami", "-o", "json"], None);
    let who: Value = serde_json::from_slice(&who.stdout).unwrap();
    assert_eq!(
        who["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"],
        json!([NODE]),
        "the token carries the node: {who}"
    );

    // Its own node's Guest: create, update, status, delete.
    let out = as_node(&["create", "-f", "-"], Some(&guest("mine", NODE)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = as_node(&["label", "guest", "mine", "app=web"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another node's: not created, not changed, not deleted, not moved to this node.
    let out = as_node(&["create", "-f", "-"], Some(&guest("theirs", "node-b")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tapestry-node-guests") && err.contains("node-b"),
        "denied by the policy, saying why: {err}"
    );
    cp.apply(&guest("theirs", "node-b")).unwrap();
    let out = as_node(&["label", "guest", "theirs", "app=web"], None);
    assert!(
        !out.status.success(),
        "another node's Guest cannot be changed"
    );
    let out = as_node(
        &[
            "patch",
            "guest",
            "theirs",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"nodeName":"{NODE}"}}}}"#),
        ],
        None,
    );
    assert!(!out.status.success(), "nor taken over");
    let out = as_node(&["delete", "guest", "theirs"], None);
    assert!(!out.status.success(), "nor deleted");
    let out = as_node(&["delete", "guest", "mine"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And RBAC: it reads Services but writes none.
    let out = as_node(&["get", "services", "-A"], None);
    assert!(out.status.success());
    let out = as_node(&["create", "service", "clusterip", "x", "--tcp=80"], None);
    assert!(!out.status.success());
    // A token without the node claim (a plain ServiceAccount token) may write no Guest at all.
    let plain = cp
        .kubectl_ok(["create", "token", "tapestry-node", "-n", "tapestry"])
        .unwrap();
    let out = cp
        .kubectl(["--token", plain.trim(), "create", "-f", &{
            let p = cp.dir().join("guest-plain.json");
            std::fs::write(&p, guest("plain", NODE)).unwrap();
            p.display().to_string()
        }])
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pod-bound token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
