//! End to end, Kubernetes mode: a real QEMU guest in a VM pod made by a real conflist (ptp +
//! host-local, then tapestry-cni), published as a Guest by tapestryd, turned into an
//! EndpointSlice by tapestry-controller for a Service that the real `kubectl expose pod` made,
//! and reached by a pod through that Service's ClusterIP, programmed by the same tapestryd from
//! the slice. Everything against a real kube-apiserver. Needs root, QEMU and the Kubernetes
//! binaries (skipped outside CI without them, failed under `CI=...`).

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tapestry_api::types::BackendKind;
use tapestry_tests::{
    Lab,
    cmd::UnreachableRoute,
    cni::{NetworkConfigList, Runtime, RuntimeConf},
    daemon::{Daemon, bin_dir, binary},
    guest::{Guest, GuestConfig, qemu_available},
    k8s::ControlPlane,
    lab::{parse_mac, vm_conflist},
    require_k8s, require_lab,
};

const T: Duration = Duration::from_secs(5);

fn wait<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the child on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_qemu_guest_is_reached_through_a_service_made_by_kubectl_expose() {
    require_lab!();
    require_k8s!();
    if !qemu_available() {
        return;
    }
    let cp = ControlPlane::start().unwrap();
    let crd = Command::new(binary("tapestry-controller").unwrap())
        .arg("crd")
        .output()
        .unwrap();
    cp.apply(&String::from_utf8(crd.stdout).unwrap()).unwrap();
    cp.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/guests.tapestry.dev",
    ])
    .unwrap();
    let admin = cp.kubeconfig_path("admin").unwrap();

    let mut lab = Lab::new("k8s-e2e").unwrap();
    let client = lab.add_pod("client").unwrap();
    let mut d = Daemon::start_with(
        "k8s-e2e",
        "services: []\n",
        &[&client.host_ifname],
        &[
            "--source",
            "kubernetes",
            "--node-name",
            "node-a",
            "--kubeconfig",
            admin.to_str().unwrap(),
        ],
    )
    .unwrap();
    let controller_log = d.dir.join("controller.log");
    let _controller = Process(
        Command::new(binary("tapestry-controller").unwrap())
            .arg(format!("--kubeconfig={}", admin.display()))
            .args(["--leader-elect=false", "--metrics-addr=127.0.0.1:0"])
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stderr(File::create(&controller_log).unwrap())
            .spawn()
            .unwrap(),
    );

    // The VM pod: the API object first (its labels are what `kubectl expose` selects), then
    // the sandbox by a real conflist, as a runtime would.
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "vm-1", "namespace": "default", "labels": {"kubevirt.io/vm": "vm-1", "app": "vm-web"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "compute", "image": "virt-launcher",
                     "ports": [{"name": "http", "containerPort": 8080}]}]}})
        .to_string(),
    )
    .unwrap();
    let netns_name = format!("{}-vm", lab.prefix());
    let netns = PathBuf::from("/run/netns").join(&netns_name);
    assert!(
        Command::new("ip")
            .args(["netns", "add", &netns_name])
            .status()
            .unwrap()
            .success()
    );
    let list =
        NetworkConfigList::from_value(&vm_conflist(&lab, &d.socket, &d.dir.join("ipam"))).unwrap();
    let rt = Runtime::new(["/usr/lib/cni".into(), bin_dir()], d.dir.join("cni-cache"));
    let conf = RuntimeConf::new("vm-ctr", &netns, "eth0")
        .arg("IgnoreUnknown", "1")
        .arg("K8S_POD_NAMESPACE", "default")
        .arg("K8S_POD_NAME", "vm-1");
    let result: Value = rt.add(&list, &conf).expect("CNI ADD of the VM pod");
    let eth0 = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0" && i["sandbox"].is_string())
        .unwrap()
        .clone();
    let vm_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // What the kubelet writes once the sandbox has its address (this test plays the kubelet
    // here, and only here): the pod IP the CNI result gave. tapestry-controller publishes a
    // Guest only when its IPs are its pod's.
    cp.kubectl_ok([
        "patch",
        "pod",
        "vm-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"phase": "Running", "podIP": vm_ip.to_string(),
                           "podIPs": [{"ip": vm_ip.to_string()}]}})
        .to_string(),
    ])
    .unwrap();

    // The Guest appears Attached, and Ready once the stock guest has booted and DHCP'd.
    let guest_ready = || -> Option<Value> {
        let out = cp.kubectl(["get", "guest", "vm-1", "-o", "json"]).ok()?;
        let g: Value = serde_json::from_slice(&out.stdout).ok()?;
        let ready = g["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(g)
    };
    let mut guest = Guest::boot_in(
        &netns,
        GuestConfig::new("vm-1", parse_mac(eth0["mac"].as_str().unwrap()).unwrap()),
    )
    .unwrap();
    guest
        .wait_ready(Duration::from_secs(90))
        .expect("the guest boots");
    let g = wait(Duration::from_secs(15), "Guest vm-1 Ready", guest_ready);
    assert_eq!(g["spec"]["ips"], json!([vm_ip.to_string()]));
    assert_eq!(g["metadata"]["labels"]["app"], "vm-web");

    // `kubectl expose pod` of the VM pod: its selector is the pod's labels, which the Guest has.
    cp.kubectl_ok([
        "expose",
        "pod",
        "vm-1",
        "--name=vm-web",
        "--port=80",
        "--target-port=http",
    ])
    .unwrap();
    let vip: Ipv4Addr = cp
        .kubectl_ok([
            "get",
            "service",
            "vm-web",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _route = UnreachableRoute::new(&format!("{vip}/32")).unwrap();

    // tapestry-controller's slice: the guest, ready at guest level, named port resolved.
    let slice = wait(
        Duration::from_secs(20),
        "the tapestry EndpointSlice",
        || {
            let out = cp
            .kubectl([
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=vm-web,endpointslice.kubernetes.io/managed-by=tapestry-controller.tapestry.dev",
                "-o",
                "json",
            ])
            .ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            v["items"].as_array()?.first().cloned()
        },
    );
    assert_eq!(
        slice["endpoints"][0]["addresses"],
        json!([vm_ip.to_string()])
    );
    assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);
    assert_eq!(slice["endpoints"][0]["targetRef"]["kind"], "Guest");
    assert_eq!(slice["ports"][0]["port"], 8080);

    // tapestryd programmed the ClusterIP from it; a pod reaches the VM through it.
    wait(
        Duration::from_secs(10),
        "the ClusterIP in the datapath",
        || {
            let services = d.client().services().ok()?;
            let s = services.into_iter().find(|s| s.name == "default/vm-web")?;
            (s.vip == vip
                && s.backends
                    .iter()
                    .any(|b| b.ip == vm_ip && b.kind == BackendKind::Vm))
            .then_some(())
        },
    );
    for _ in 0..3 {
        assert_eq!(
            client
                .tcp_request(SocketAddrV4::new(vip, 80), b"hi\n", T)
                .expect("request to the ClusterIP"),
            "vm-1"
        );
    }

    // The VM pod goes (CNI DEL): its Guest, endpoint and backend go with it.
    rt.del(&list, &conf).expect("CNI DEL");
    wait(Duration::from_secs(20), "the backend removed", || {
        let services = d.client().services().ok()?;
        let s = services.into_iter().find(|s| s.name == "default/vm-web")?;
        s.backends.is_empty().then_some(())
    });
    drop(guest);
    d.kill9().unwrap();
    let _ = Command::new("ip")
        .args(["netns", "del", &netns_name])
        .status();
    lab.destroy().unwrap();
}
