//! The tapestry-cni binary driven as a runtime drives it (env + stdin), against a stand-in for
//! tapestryd's endpoint API on a unix socket, in real network namespaces.
//!
//! The stand-in records what the plugin sends and answers as the API types say; the real
//! daemon, with the reference plugins in a conflist, is exercised by the workspace's tests/.
//! Tests that create namespaces need root: they skip outside CI and fail under CI without it.

#[path = "../src/testnet.rs"]
#[allow(dead_code)]
mod testnet;

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tapestry_api::types::{
    EndpointGcRequest, EndpointInfo, EndpointRequest, ErrorBody, GuestPhase, PodRef, RouteSpec,
};
use testnet::{PodNetns, ip, root_or_skip};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const CONTAINERD_ARGS: &str = "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=0c1d-uid;\
     IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0";

// ---- a stand-in for tapestryd's endpoint API ----

#[derive(Default)]
struct DaemonState {
    endpoints: BTreeMap<(String, String), EndpointInfo>,
    adds: Vec<EndpointRequest>,
    gcs: Vec<EndpointGcRequest>,
    refuse_adds: Option<String>,
}

type Shared = Arc<Mutex<DaemonState>>;

struct FakeDaemon {
    socket: PathBuf,
    state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcni-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("tapestryd.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Shared::default();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/v1/endpoints", post(add_endpoint))
            .route(
                "/v1/endpoints/{container_id}/{ifname}",
                get(get_endpoint).delete(delete_endpoint),
            )
            .route("/v1/endpoints-gc", post(gc_endpoints))
            .with_state(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        rx.await.ok();
                    })
                    .await
                    .unwrap();
            });
        });
        FakeDaemon {
            socket,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DaemonState> {
        self.state.lock().unwrap()
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn api_error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            error: msg.to_owned(),
        }),
    )
        .into_response()
}

async fn add_endpoint(State(s): State<Shared>, Json(req): Json<EndpointRequest>) -> Response {
    let mut st = s.lock().unwrap();
    st.adds.push(req.clone());
    if let Some(msg) = st.refuse_adds.clone() {
        return api_error(StatusCode::UNPROCESSABLE_ENTITY, &msg);
    }
    let info = EndpointInfo {
        guest_phase: req.vm.as_ref().map(|_| GuestPhase::Attached),
        request: req.clone(),
        host_ifindex: 7,
        guest_ready_reason: None,
    };
    st.endpoints
        .insert((req.container_id, req.ifname), info.clone());
    Json(info).into_response()
}

async fn get_endpoint(
    State(s): State<Shared>,
    UrlPath((cid, ifname)): UrlPath<(String, String)>,
) -> Response {
    match s.lock().unwrap().endpoints.get(&(cid, ifname)) {
        Some(info) => Json(info.clone()).into_response(),
        None => api_error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

async fn delete_endpoint(
    State(s): State<Shared>,
    UrlPath((cid, ifname)): UrlPath<(String, String)>,
) -> Response {
    s.lock().unwrap().endpoints.remove(&(cid, ifname));
    Json(json!({})).into_response()
}

async fn gc_endpoints(State(s): State<Shared>, Json(req): Json<EndpointGcRequest>) -> Response {
    let mut st = s.lock().unwrap();
    let keep: Vec<(String, String)> = req
        .valid
        .iter()
        .map(|k| (k.container_id.clone(), k.ifname.clone()))
        .collect();
    let (kept, removed): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut st.endpoints)
        .into_iter()
        .partition(|(k, _)| keep.contains(k));
    st.endpoints = kept;
    st.gcs.push(req);
    Json(removed.into_values().collect::<Vec<_>>()).into_response()
}

// ---- running the plugin ----

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    fn success(self) -> Self {
        assert!(
            self.ok,
            "plugin failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The spec error object, checked for its shape.
    fn error(&self) -> (u64, String) {
        assert!(!self.ok, "expected a failure, got: {}", self.stdout);
        let e = self.json();
        assert!(e["cniVersion"].is_string(), "{e}");
        (
            e["code"].as_u64().unwrap(),
            e["msg"].as_str().unwrap().to_owned(),
        )
    }
}

struct Call<'a> {
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    args: &'a str,
    socket: &'a Path,
}

fn plugin(call: &Call<'_>, conf: &Value) -> Run {
    plugin_on(call, "eth0", conf)
}

/// [`plugin`] with CNI_IFNAME `ifname`.
fn plugin_on(call: &Call<'_>, ifname: &str, conf: &Value) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapestry-cni"))
        .env_clear()
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", "/usr/lib/cni")
        .env("TAPESTRY_SOCKET", call.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(conf).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn conf(version: &str, mut extra: Value, prev: Option<&Value>) -> Value {
    let c = extra.as_object_mut().unwrap();
    c.insert("cniVersion".into(), json!(version));
    c.insert("name".into(), json!("tcni"));
    c.insert("type".into(), json!("tapestry-cni"));
    if let Some(prev) = prev {
        c.insert("prevResult".into(), prev.clone());
    }
    extra
}

fn legacy(version: &str) -> bool {
    version.starts_with("0.")
}

/// What Debian's bridge plugin v1.1.1 returns for this netns, in `version`'s shape.
fn bridge_result(version: &str, ns: &PodNetns) -> Value {
    let mut ip = json!({
        "interface": 2,
        "address": format!("10.250.{}.2/24", ns.subnet),
        "gateway": format!("10.250.{}.1", ns.subnet),
    });
    if legacy(version) {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": "tcni-br0", "mac": "ea:b1:0d:b9:e7:94"},
            {"name": ns.host_veth, "mac": host_mac(&ns.host_veth)},
            {"name": "eth0", "mac": pod_mac(ns), "sandbox": ns.path},
        ],
        "ips": [ip],
        "routes": [
            {"dst": "0.0.0.0/0"},
            {"dst": "10.96.0.0/12", "gw": format!("10.250.{}.1", ns.subnet)}
        ],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
    })
}

fn pod_mac(ns: &PodNetns) -> String {
    ns.sys("eth0", "address").unwrap()
}

fn host_mac(ifname: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))
        .unwrap()
        .trim()
        .to_owned()
}

fn pod_ipv4(ns: &PodNetns) -> String {
    ip(&["-n", &ns.name, "-4", "addr", "show", "dev", "eth0"])
}

fn path_of(ns: &PodNetns) -> String {
    ns.path.display().to_string()
}

// ---- tests that need no namespaces ----

fn registered(container_id: &str, ifname: &str) -> EndpointInfo {
    EndpointInfo {
        request: EndpointRequest {
            container_id: container_id.into(),
            ifname: ifname.into(),
            netns: String::new(),
            host_ifname: "veth0".into(),
            ips: vec![],
            gateway: None,
            mac: None,
            pod: None,
            vm: None,
            network: None,
        },
        host_ifindex: 3,
        guest_phase: None,
        guest_ready_reason: None,
    }
}

#[test]
fn del_of_a_percent_ifname_leaves_the_other_attachment_alone() {
    // The router decodes path segments: an unencoded `eth%30` would reach it as `eth0` and
    // remove the container's other attachment.
    let daemon = FakeDaemon::start("pct");
    daemon.state().endpoints.insert(
        ("c0ffee".into(), "eth0".into()),
        registered("c0ffee", "eth0"),
    );
    daemon.state().endpoints.insert(
        ("c0ffee".into(), "eth%30".into()),
        registered("c0ffee", "eth%30"),
    );
    let call = Call {
        command: "DEL",
        container_id: "c0ffee",
        netns: "",
        args: "",
        socket: &daemon.socket,
    };
    plugin_on(&call, "eth%30", &conf("1.0.0", json!({}), None)).success();
    let left: Vec<_> = daemon.state().endpoints.keys().cloned().collect();
    assert_eq!(left, [("c0ffee".to_owned(), "eth0".to_owned())]);
}

#[test]
fn the_plugin_reads_no_more_than_4_mib_from_the_daemon() {
    // A daemon whose health answer is 5 MiB: the plugin's client stops at 4 MiB and says so
    // (the general client's default would read it all).
    let dir = std::env::temp_dir().join(format!("tcni-big-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("tapestryd.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match std::io::Read::read(&mut stream, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let len = 5 << 20;
                let _ = write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n");
                let _ = stream.write_all(&vec![b'x'; len]);
            });
        }
    });
    let call = Call {
        command: "STATUS",
        container_id: "",
        netns: "",
        args: "",
        socket: &socket,
    };
    let out = plugin(&call, &conf("1.1.0", json!({}), None));
    let (code, msg) = out.error();
    assert_eq!(code, 50, "{msg}");
    assert!(
        msg.contains("larger than this client's limit of 4194304 bytes"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_config_over_1_mib_is_refused_unread() {
    // Valid JSON, 2 MiB of it: the plugin reads 1 MiB and a byte, then refuses (code 6) instead
    // of going on to ADD.
    let pad = "x".repeat(2 << 20);
    let conf =
        serde_json::to_vec(&json!({"cniVersion": "1.0.0", "name": "n", "pad": pad})).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapestry-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/run/netns/tapestry-no-such-ns")
        .env("CNI_IFNAME", "eth0")
        .env("TAPESTRY_SOCKET", "/nonexistent/tapestryd.sock")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The plugin stops reading: the rest of the write fails with EPIPE, which is expected.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&conf);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let (code, msg) = run.error();
    assert_eq!(code, 6, "{msg}");
    assert!(
        msg.contains("larger than 1048576 bytes"),
        "{msg}\n{}",
        run.stderr
    );
}

#[test]
fn version_answers_and_errors_are_spec_objects() {
    let socket = Path::new("/nonexistent/tapestryd.sock");
    let call = Call {
        command: "VERSION",
        container_id: "",
        netns: "",
        args: "",
        socket,
    };
    let out = plugin(&call, &json!({"cniVersion": "1.0.0"})).success();
    assert_eq!(
        out.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": VERSIONS})
    );

    let out = plugin(
        &Call {
            command: "ADD",
            container_id: "c1",
            netns: "/run/netns/none",
            ..call
        },
        &json!({"cniVersion": "0.4.0", "name": "n", "vm": {"queues": 0}}),
    );
    let (code, msg) = out.error();
    assert_eq!(code, 7);
    assert!(msg.contains("vm.queues"), "{msg}");
    assert_eq!(out.json()["cniVersion"], "0.4.0");

    // Run by hand without CNI_COMMAND: say what this is, succeed.
    let out = Command::new(env!("CARGO_BIN_EXE_tapestry-cni"))
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CNI protocol versions supported"));
}

#[test]
fn status_and_gc_talk_to_the_daemon() {
    let mut daemon = FakeDaemon::start("status");
    let socket = daemon.socket.clone();
    let call = Call {
        command: "STATUS",
        container_id: "",
        netns: "",
        args: "",
        socket: &socket,
    };
    let out = plugin(&call, &conf("1.1.0", json!({}), None)).success();
    assert_eq!(out.stdout, "");

    daemon.state().endpoints.insert(
        ("stale".into(), "eth0".into()),
        EndpointInfo {
            request: EndpointRequest {
                container_id: "stale".into(),
                ifname: "eth0".into(),
                netns: String::new(),
                host_ifname: "veth0".into(),
                ips: vec![],
                gateway: None,
                mac: None,
                pod: None,
                vm: None,
                network: None,
            },
            host_ifindex: 3,
            guest_phase: None,
            guest_ready_reason: None,
        },
    );
    let gc = conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}]}),
        None,
    );
    plugin(
        &Call {
            command: "GC",
            ..call
        },
        &gc,
    )
    .success();
    {
        let st = daemon.state();
        assert_eq!(st.gcs.len(), 1);
        assert_eq!(st.gcs[0].valid[0].container_id, "live");
        assert!(st.endpoints.is_empty());
    }

    daemon.stop();
    let (code, msg) = plugin(&call, &conf("1.1.0", json!({}), None)).error();
    assert_eq!(code, 50);
    assert!(msg.contains(&daemon.socket.display().to_string()), "{msg}");
    let (code, _) = plugin(&call, &conf("1.0.0", json!({}), None)).error();
    assert_eq!(code, 1);
}

// ---- tests in real namespaces ----

#[test]
fn plain_pod_in_every_version_is_passed_through_and_registered() {
    if !root_or_skip("plain_pod_in_every_version_is_passed_through_and_registered") {
        return;
    }
    let ns = PodNetns::new("plain");
    let daemon = FakeDaemon::start("plain");
    let netns = path_of(&ns);
    for (i, version) in VERSIONS.iter().enumerate() {
        let cid = format!("plain{i}");
        let call = Call {
            command: "ADD",
            container_id: &cid,
            netns: &netns,
            args: CONTAINERD_ARGS,
            socket: &daemon.socket,
        };
        let prev = bridge_result(version, &ns);
        let out = plugin(&call, &conf(version, json!({}), Some(&prev))).success();
        assert_eq!(
            out.json(),
            prev,
            "{version}: the result is prevResult unchanged"
        );

        let req = daemon.state().adds.last().cloned().unwrap();
        assert_eq!(req.container_id, cid);
        assert_eq!(req.ifname, "eth0");
        assert_eq!(req.netns, netns);
        assert_eq!(req.host_ifname, ns.host_veth);
        assert_eq!(req.ips, vec![format!("10.250.{}.2/24", ns.subnet)]);
        assert_eq!(
            req.gateway,
            Some(format!("10.250.{}.1", ns.subnet).parse().unwrap())
        );
        assert_eq!(req.mac.map(|m| m.to_string()), Some(pod_mac(&ns)));
        assert_eq!(
            req.pod,
            Some(PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("0c1d-uid".into())
            })
        );
        assert_eq!(req.vm, None);

        let check = plugin(
            &Call {
                command: "CHECK",
                ..call
            },
            &conf(version, json!({}), Some(&out.json())),
        );
        if legacy(version) && *version != "0.4.0" {
            let (code, msg) = check.error();
            assert_eq!(
                (code, msg.as_str()),
                (1, "config version does not allow CHECK")
            );
        } else {
            check.success();
        }

        let del = Call {
            command: "DEL",
            ..call
        };
        plugin(&del, &conf(version, json!({}), Some(&out.json()))).success();
        assert!(
            !daemon
                .state()
                .endpoints
                .contains_key(&(cid.clone(), "eth0".into()))
        );
        // Again, the way containerd retries: no prevResult, no netns.
        plugin(&Call { netns: "", ..del }, &conf(version, json!({}), None)).success();
    }
    assert!(
        pod_ipv4(&ns).contains("inet "),
        "a plain pod keeps its address"
    );
}

#[test]
fn host_veth_is_found_when_the_result_lists_no_host_interface() {
    if !root_or_skip("host_veth_is_found_when_the_result_lists_no_host_interface") {
        return;
    }
    let ns = PodNetns::new("calico");
    let daemon = FakeDaemon::start("calico");
    let netns = path_of(&ns);
    // Calico-like 0.3.1: only the container interface, no interface index on the address.
    let prev = json!({
        "cniVersion": "0.3.1",
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [{"version": "4", "address": format!("10.250.{}.2/32", ns.subnet)}],
        "dns": {}
    });
    let call = Call {
        command: "ADD",
        container_id: "calico1",
        netns: &netns,
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=a;K8S_POD_NAME=b",
        socket: &daemon.socket,
    };
    let out = plugin(&call, &conf("0.3.1", json!({}), Some(&prev))).success();
    assert_eq!(out.json(), prev);
    let req = daemon.state().adds.last().cloned().unwrap();
    assert_eq!(req.host_ifname, ns.host_veth);
    assert_eq!(req.gateway, None);
}

#[test]
fn vm_pod_gets_a_tap_and_gives_its_address_to_the_guest() {
    if !root_or_skip("vm_pod_gets_a_tap_and_gives_its_address_to_the_guest") {
        return;
    }
    // Each way of selecting a VM pod, across result shapes.
    let selections = [
        (
            "1.0.0",
            json!({"vm": {"enabled": true, "queues": 2},
                   "dns": {"nameservers": ["10.0.0.53"], "domain": "cluster.local"}}),
            "IgnoreUnknown=1;K8S_POD_NAME=vm-a",
            "vm-a",
        ),
        (
            "0.3.1",
            json!({}),
            "IgnoreUnknown=1;K8S_POD_NAME=vm-b;TAPESTRY_VM=true",
            "vm-b",
        ),
        (
            "1.1.0",
            // What KubeVirt puts on a virt-launcher pod whose VMI binds the pod network with
            // the Tapestry binding (registered with networkAttachmentDefinition: tapestry).
            json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations":
                   {"kubevirt.io/domain": "fedora", "kubevirt.io/created-by": "x",
                    "k8s.v1.cni.cncf.io/networks":
                      r#"[{"name":"tapestry","namespace":"vms","cni-args":{"logicNetworkName":"default"}}]"#}}}),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=vms;K8S_POD_NAME=virt-launcher-fedora-x7k2p",
            "fedora",
        ),
    ];
    for (version, extra, args, hostname) in selections {
        let ns = PodNetns::new("vm");
        let daemon = FakeDaemon::start("vm");
        let netns = path_of(&ns);
        let mac = pod_mac(&ns);
        let prev = bridge_result(version, &ns);
        let call = Call {
            command: "ADD",
            container_id: "vm1",
            netns: &netns,
            args,
            socket: &daemon.socket,
        };
        let out = plugin(&call, &conf(version, extra.clone(), Some(&prev))).success();
        let result = out.json();
        let queues = if version == "1.0.0" { 2 } else { 1 };

        // The result: prevResult plus the tap, addresses still on the pod interface's entry.
        let mut expected = prev.clone();
        let mut tap = json!({"name": "tap0", "mac": ns.sys("tap0", "address").unwrap(),
                             "sandbox": netns});
        if !legacy(version) {
            tap["mtu"] = json!(1450);
        }
        expected["interfaces"].as_array_mut().unwrap().push(tap);
        assert_eq!(result, expected, "{version}");

        // The tap, as the VM process will find it.
        assert_eq!(ns.sys("tap0", "owner").unwrap(), "107");
        assert_eq!(ns.sys("tap0", "group").unwrap(), "107");
        assert_eq!(ns.sys("tap0", "mtu").unwrap(), "1450");
        let flags = if queues > 1 { "0x5902" } else { "0x5802" };
        assert_eq!(ns.sys("tap0", "tun_flags").unwrap(), flags);
        let tap_flags = u32::from_str_radix(
            ns.sys("tap0", "flags").unwrap().trim_start_matches("0x"),
            16,
        )
        .unwrap();
        assert_eq!(tap_flags & 1, 1, "the tap is up");

        // The pod interface: no IPv4 address, same MAC, still up.
        assert!(!pod_ipv4(&ns).contains("inet "), "{}", pod_ipv4(&ns));
        assert_eq!(pod_mac(&ns), mac);
        assert_eq!(ns.sys("eth0", "operstate").unwrap(), "up");

        // What the daemon was told.
        let req = daemon.state().adds.last().cloned().unwrap();
        assert_eq!(req.host_ifname, ns.host_veth);
        let vm = req.vm.expect("a VM attachment");
        assert_eq!(vm.tap, "tap0");
        assert_eq!(vm.guest_mac.to_string(), mac);
        assert_eq!(vm.guest_ip, format!("10.250.{}.2/24", ns.subnet));
        assert_eq!(vm.mtu, 1450);
        assert_eq!(vm.queues, queues);
        assert_eq!(
            vm.routes,
            vec![RouteSpec {
                dst: "10.96.0.0/12".into(),
                gw: Some(format!("10.250.{}.1", ns.subnet).parse().unwrap())
            }]
        );
        assert_eq!(vm.hostname.as_deref(), Some(hostname));
        if version == "1.0.0" {
            assert_eq!(vm.dns.nameservers, vec!["10.0.0.53", "10.96.0.10"]);
            assert_eq!(vm.dns.domain.as_deref(), Some("cluster.local"));
        } else {
            assert_eq!(vm.dns.nameservers, vec!["10.96.0.10"]);
        }
        assert_eq!(vm.dns.search, vec!["svc.cluster.local"]);

        // CHECK passes, then fails once the tap is gone.
        let check = Call {
            command: "CHECK",
            ..call
        };
        let with_result = conf(version, extra.clone(), Some(&result));
        if version != "0.3.1" {
            plugin(&check, &with_result).success();
        }

        // DEL removes the tap and the endpoint; a second DEL is fine.
        let del = Call {
            command: "DEL",
            ..call
        };
        plugin(&del, &with_result).success();
        assert_eq!(ns.sys("tap0", "owner"), None, "the tap is gone");
        assert!(daemon.state().endpoints.is_empty());
        plugin(&del, &with_result).success();

        if version == "1.0.0" {
            plugin(&call, &conf(version, extra.clone(), Some(&prev))).success();
            ip(&["-n", &ns.name, "link", "del", "tap0"]);
            let (code, msg) = plugin(&check, &with_result).error();
            assert_eq!(code, 999);
            assert!(msg.contains("tap0") && msg.contains("missing"), "{msg}");
        }
    }
}

#[test]
fn a_virt_launcher_pod_that_did_not_opt_in_keeps_its_pod_interface() {
    if !root_or_skip("a_virt_launcher_pod_that_did_not_opt_in_keeps_its_pod_interface") {
        return;
    }
    // A VMI with masquerade binding: KubeVirt's own bridge and DHCP need eth0 as it is.
    let ns = PodNetns::new("masq");
    let daemon = FakeDaemon::start("masq");
    let netns = path_of(&ns);
    let prev = bridge_result("1.0.0", &ns);
    let call = Call {
        command: "ADD",
        container_id: "masq1",
        netns: &netns,
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=vms;K8S_POD_NAME=virt-launcher-fedora-x7k2p",
        socket: &daemon.socket,
    };
    let extra = json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations":
        {"kubevirt.io/domain": "fedora", "kubevirt.io/created-by": "x"}}});
    let out = plugin(&call, &conf("1.0.0", extra, Some(&prev))).success();
    assert_eq!(out.json(), prev, "no tap in the result");
    assert_eq!(ns.sys("tap0", "owner"), None, "no tap in the pod");
    assert!(pod_ipv4(&ns).contains("inet "), "eth0 keeps its address");
    assert_eq!(daemon.state().adds.last().unwrap().vm, None);
}

#[test]
fn failed_vm_add_puts_the_pod_back_as_the_primary_left_it() {
    if !root_or_skip("failed_vm_add_puts_the_pod_back_as_the_primary_left_it") {
        return;
    }
    let ns = PodNetns::new("undo");
    let mut daemon = FakeDaemon::start("undo");
    daemon.state().refuse_adds = Some("guest table is full".into());
    let netns = path_of(&ns);
    let prev = bridge_result("1.0.0", &ns);
    let vm_conf = conf("1.0.0", json!({"vm": {"enabled": true}}), Some(&prev));
    let socket = daemon.socket.clone();
    let call = Call {
        command: "ADD",
        container_id: "undo1",
        netns: &netns,
        args: "",
        socket: &socket,
    };
    let before_routes = ip(&["-n", &ns.name, "-4", "route", "show"]);

    let (code, msg) = plugin(&call, &vm_conf).error();
    assert_eq!(code, 999);
    assert!(msg.contains("guest table is full"), "{msg}");
    assert_eq!(ns.sys("tap0", "owner"), None, "the tap is removed");
    assert!(
        pod_ipv4(&ns).contains(&format!("inet 10.250.{}.2/24", ns.subnet)),
        "{}",
        pod_ipv4(&ns)
    );
    assert_eq!(ip(&["-n", &ns.name, "-4", "route", "show"]), before_routes);

    // Daemon not running: try again later, naming the socket; undone the same way.
    daemon.stop();
    let (code, msg) = plugin(&call, &vm_conf).error();
    assert_eq!(code, 11);
    assert!(
        msg.contains(&socket.display().to_string()) && msg.contains("tapestryd must run"),
        "{msg}"
    );
    assert_eq!(ns.sys("tap0", "owner"), None);
    assert_eq!(ip(&["-n", &ns.name, "-4", "route", "show"]), before_routes);

    // A tap of the same name that ADD did not make is refused, and left alone.
    ip(&[
        "-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
    ]);
    let daemon = FakeDaemon::start("undo2");
    let call = Call {
        socket: &daemon.socket,
        ..call
    };
    let (code, msg) = plugin(&call, &vm_conf).error();
    assert_eq!(code, 999);
    assert!(msg.contains("already exists"), "{msg}");
    assert!(ns.sys("tap0", "owner").is_some());
    assert!(pod_ipv4(&ns).contains("inet "));
}

#[test]
fn del_cleans_up_without_the_daemon_and_after_the_netns_is_gone() {
    if !root_or_skip("del_cleans_up_without_the_daemon_and_after_the_netns_is_gone") {
        return;
    }
    let ns = PodNetns::new("del");
    let mut daemon = FakeDaemon::start("del");
    let netns = path_of(&ns);
    let prev = bridge_result("0.4.0", &ns);
    let vm_conf = conf("0.4.0", json!({"vm": {"enabled": true}}), Some(&prev));
    let socket = daemon.socket.clone();
    let call = Call {
        command: "ADD",
        container_id: "del1",
        netns: &netns,
        args: "",
        socket: &socket,
    };
    let result = plugin(&call, &vm_conf).success().json();
    assert!(ns.sys("tap0", "owner").is_some());

    // The daemon is down: DEL still removes the tap, and succeeds.
    daemon.stop();
    let del = Call {
        command: "DEL",
        ..call
    };
    let out = plugin(
        &del,
        &conf("0.4.0", json!({"vm": {"enabled": true}}), Some(&result)),
    );
    let out = out.success();
    assert!(out.stderr.contains("not reachable"), "{}", out.stderr);
    assert_eq!(ns.sys("tap0", "owner"), None);

    // The tap is found from prevResult alone, when the config does not say VM.
    let daemon = FakeDaemon::start("del2");
    let call = Call {
        socket: &daemon.socket,
        ..call
    };
    let result = plugin(&call, &vm_conf).success().json();
    let del = Call {
        command: "DEL",
        ..call
    };
    plugin(&del, &conf("0.4.0", json!({}), Some(&result))).success();
    assert_eq!(ns.sys("tap0", "owner"), None);

    // The netns is gone.
    let path = ns.path.clone();
    drop(ns);
    assert!(!path.exists());
    plugin(
        &del,
        &conf("0.4.0", json!({"vm": {"enabled": true}}), Some(&result)),
    )
    .success();
}

/// A bare network namespace for a real primary plugin to fill.
struct BareNetns {
    name: String,
    path: PathBuf,
}

impl BareNetns {
    fn new(tag: &str, n: u32) -> Self {
        let name = format!("tcni-{tag}-{}-{n}", std::process::id() % 100_000);
        ip(&["netns", "add", &name]);
        BareNetns {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        }
    }
}

impl Drop for BareNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn results_of_the_real_reference_plugins_chain_through() {
    let test = "results_of_the_real_reference_plugins_chain_through";
    if !root_or_skip(test) {
        return;
    }
    let cni_dir = Path::new("/usr/lib/cni");
    if !cni_dir.join("bridge").exists() || !cni_dir.join("ptp").exists() {
        testnet::skipped(test, "the reference plugins are not in /usr/lib/cni");
        return;
    }
    let daemon = FakeDaemon::start("ref");
    let host = HostLeftovers {
        ipam_dir: std::env::temp_dir().join(format!("tcni-ipam-{}", std::process::id())),
        bridge: format!("tcnb{}", std::process::id() % 100_000),
    };
    let (ipam_dir, bridge) = (&host.ipam_dir, &host.bridge);
    // Debian's v1.1.1 plugins speak up to 1.0.0.
    let mut n = 0;
    for version in ["0.3.1", "0.4.0", "1.0.0"] {
        for primary in ["bridge", "ptp"] {
            for vm in [false, true] {
                n += 1;
                let ns = BareNetns::new("ref", n);
                let netns = ns.path.display().to_string();
                let cid = format!("ref{n}");
                let subnet = "10.250.200.0/24";
                let primary_conf = json!({
                    "cniVersion": version, "name": "tcni", "type": primary,
                    "bridge": bridge, "isGateway": true,
                    "ipam": {"type": "host-local", "dataDir": ipam_dir,
                             "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}
                });
                let run_primary = |command: &str, conf: &Value| {
                    let mut child = Command::new(cni_dir.join(primary))
                        .env_clear()
                        .env("CNI_COMMAND", command)
                        .env("CNI_CONTAINERID", &cid)
                        .env("CNI_NETNS", &netns)
                        .env("CNI_IFNAME", "eth0")
                        .env("CNI_PATH", cni_dir)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .spawn()
                        .unwrap();
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(&serde_json::to_vec(conf).unwrap())
                        .unwrap();
                    let out = child.wait_with_output().unwrap();
                    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                    assert!(out.status.success(), "{primary} {command}: {stdout}");
                    stdout
                };
                let prev: Value = serde_json::from_str(&run_primary("ADD", &primary_conf)).unwrap();
                let host_veth = prev["interfaces"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .rfind(|i| i.get("sandbox").is_none())
                    .unwrap()["name"]
                    .as_str()
                    .unwrap()
                    .to_owned();

                let extra = json!({"vm": {"enabled": vm}});
                let call = Call {
                    command: "ADD",
                    container_id: &cid,
                    netns: &netns,
                    args: "IgnoreUnknown=1;K8S_POD_NAME=p",
                    socket: &daemon.socket,
                };
                let out = plugin(&call, &conf(version, extra.clone(), Some(&prev))).success();
                let result = out.json();
                let what = format!("{primary} {version} vm={vm}");
                let added = result["interfaces"].as_array().unwrap().len()
                    - prev["interfaces"].as_array().unwrap().len();
                assert_eq!(added, usize::from(vm), "{what}");
                assert_eq!(result["ips"], prev["ips"], "{what}");
                let req = daemon.state().adds.last().cloned().unwrap();
                assert_eq!(req.host_ifname, host_veth, "{what}");
                assert_eq!(req.vm.is_some(), vm, "{what}");

                let del = Call {
                    command: "DEL",
                    ..call
                };
                plugin(&del, &conf(version, extra, Some(&result))).success();
                let mut primary_del = primary_conf.clone();
                primary_del["prevResult"] = result;
                run_primary("DEL", &primary_del);
            }
        }
    }
}

/// What the reference plugins leave in the host namespace.
struct HostLeftovers {
    ipam_dir: PathBuf,
    bridge: String,
}

impl Drop for HostLeftovers {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.ipam_dir);
    }
}
