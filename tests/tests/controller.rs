//! `tapestry-controller` against a real kube-apiserver (`tapestry_tests::k8s`): the Guest CRD it
//! prints, the EndpointSlices it writes for Services and Guests, dedupe against pod slices, and
//! two replicas electing one leader. The controller runs as the built binary under its own
//! service-account identity bound to [`RBAC`], so the rules the manifests need are tested too.
//! Skipped (or failed under `CI=...`) when the Kubernetes binaries are missing; needs no root.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tapestry_tests::{
    daemon,
    k8s::{ControlPlane, Identity},
    poll,
};

const MANAGED_BY: &str = "tapestry-controller.tapestry.dev";
const CONTROLLER_NS: &str = "tapestry-system";
const CONTROLLER_ID: &str = "tapestry-controller";

/// What the controller needs, and nothing more: read Services, Guests, Pods and Nodes, write
/// EndpointSlices and Events, hold its Lease.
const RBAC: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tapestry-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: tapestry-controller}
rules:
- apiGroups: [""]
  resources: [services, nodes]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [tapestry.dev]
  resources: [guests]
  verbs: [get, list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch, create, update, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: tapestry-controller}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tapestry-controller}
subjects:
- {kind: ServiceAccount, name: tapestry-controller, namespace: tapestry-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: tapestry-controller, namespace: tapestry-system}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: tapestry-controller, namespace: tapestry-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: tapestry-controller}
subjects:
- {kind: ServiceAccount, name: tapestry-controller, namespace: tapestry-system}
"#;

// ---------------------------------------------------------------------------------------------
// Helpers
//
// Every `poll` here is unwrapped: a timeout panics, so that the control plane and the
// controllers, dropped while unwinding, keep and print their logs.

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("parsing JSON: {text}"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn controller_binary() -> Result<PathBuf> {
    daemon::binary("tapestry-controller")
}

/// A control plane with the Guest CRD (from `tapestry-controller crd`) and the controller's
/// identity and RBAC.
fn control_plane() -> Result<ControlPlane> {
    let cp = ControlPlane::start_with(&[Identity::service_account(
        CONTROLLER_ID,
        CONTROLLER_NS,
        "tapestry-controller",
    )])?;
    cp.apply(RBAC)?;
    cp.install_guest_crd()?;
    Ok(cp)
}

/// A `tapestry-controller` process; killed on drop.
struct Controller {
    child: Option<Child>,
    identity: String,
    metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(cp: &ControlPlane, identity: &str) -> Result<Controller> {
        let metrics_port = free_port()?;
        let log = cp.dir().join(format!("controller-{identity}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let child = Command::new(controller_binary()?)
            .arg(format!(
                "--kubeconfig={}",
                cp.kubeconfig_path(CONTROLLER_ID)?.display()
            ))
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .arg(format!("--lease-namespace={CONTROLLER_NS}"))
            .arg(format!("--identity={identity}"))
            .args([
                "--lease-duration=3s",
                "--renew-deadline=2s",
                "--retry-period=250ms",
            ])
            .arg("--resync=20s")
            .env(
                "RUST_LOG",
                std::env::var("TAPESTRY_CONTROLLER_LOG")
                    .unwrap_or_else(|_| "info,tapestry_controller=debug".into()),
            )
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting tapestry-controller")?;
        let c = Controller {
            child: Some(child),
            identity: identity.into(),
            metrics_port,
            log,
        };
        poll(Duration::from_secs(30), "the controller's /healthz", || {
            c.check_running()?;
            Ok(c.get("/healthz").ok())
        })
        .unwrap();
        Ok(c)
    }

    fn check_running(&self) -> Result<()> {
        // Child::try_wait needs &mut self; waitpid(WNOHANG) asks the same.
        let pid = self.child.as_ref().context("stopped")?.id() as i32;
        let mut status = 0;
        let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        ensure!(reaped == 0, "tapestry-controller exited:\n{}", self.log());
        Ok(())
    }

    fn get(&self, path: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let (head, body) = body.split_once("\r\n\r\n").context("no HTTP body")?;
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        Ok(body.to_string())
    }

    /// The value of one sample, named with its labels (`tapestry_controller_leader`,
    /// `tapestry_controller_endpointslice_writes_total{op="apply"}`); 0 when absent.
    fn metric(&self, sample: &str) -> Result<f64> {
        let text = self.get("/metrics")?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map(|v| v.trim().parse())
            .transpose()?
            .unwrap_or(0.0))
    }

    fn writes(&self) -> Result<f64> {
        Ok(
            self.metric("tapestry_controller_endpointslice_writes_total{op=\"apply\"}")?
                + self.metric("tapestry_controller_endpointslice_writes_total{op=\"delete\"}")?,
        )
    }

    fn reconciliations(&self) -> Result<f64> {
        self.metric("tapestry_controller_reconciliations_total")
    }

    fn is_leader(&self) -> Result<bool> {
        Ok(self.metric("tapestry_controller_leader")? == 1.0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, sig: i32) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tapestry-controller did not stop on signal {sig}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!("--- controller {} log ---\n{}", self.identity, self.log());
        }
    }
}

/// An operator's Guest (no pod backs it, registered by the admin: published without a pod).
fn guest(name: &str, ips: &[&str], labels: Value, ports: Value) -> Value {
    json!({
        "apiVersion": "tapestry.dev/v1alpha1",
        "kind": "Guest",
        "metadata": {"name": name, "namespace": "default", "labels": labels,
                     "annotations": {"tapestry.dev/registered-by": "admin"}},
        "spec": {
            "nodeName": "node-a",
            "ips": ips,
            "mac": "52:54:00:00:00:01",
            "tap": "tap0",
            "ports": ports,
        }
    })
}

fn set_ready(cp: &ControlPlane, name: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {"conditions": [
        {"type": "Attached", "status": "True", "reason": "TapCreated"},
        {"type": "Ready", "status": status, "reason": "Test"},
    ]}});
    cp.kubectl_ok([
        "patch",
        "guest",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        patch.to_string().as_str(),
    ])?;
    Ok(())
}

/// Our slices of Service `default/<service>`, by name.
fn our_slices(cp: &ControlPlane, service: &str) -> Result<BTreeMap<String, Value>> {
    let list = json(&cp.kubectl_ok([
        "get",
        "endpointslices",
        "-n",
        "default",
        "-l",
        format!(
            "kubernetes.io/service-name={service},endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
        )
        .as_str(),
        "--show-managed-fields",
        "-o",
        "json",
    ])?)?;
    Ok(list["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap_or("").to_string(),
                s.clone(),
            )
        })
        .collect())
}

/// Every endpoint in our slices of `service`, by address.
fn endpoints(cp: &ControlPlane, service: &str) -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for slice in our_slices(cp, service)?.values() {
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            out.insert(
                e["addresses"][0].as_str().unwrap_or("").to_string(),
                e.clone(),
            );
        }
    }
    Ok(out)
}

/// Waits until the endpoints of `service` are exactly `want` (address -> ready).
fn wait_endpoints(
    cp: &ControlPlane,
    service: &str,
    want: &[(&str, bool)],
) -> Result<BTreeMap<String, Value>> {
    let want: BTreeMap<String, bool> = want.iter().map(|(a, r)| (a.to_string(), *r)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let eps = endpoints(cp, service)?;
        let have: BTreeMap<String, bool> = eps
            .iter()
            .map(|(a, e)| {
                (
                    a.clone(),
                    e["conditions"]["ready"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        if have == want {
            return Ok(eps);
        }
        if Instant::now() > deadline {
            panic!("endpoints of {service}: want {want:?}, have {have:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn guest_crd_and_a_controller_without_it() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = ControlPlane::start_with(&[Identity::service_account(
        CONTROLLER_ID,
        CONTROLLER_NS,
        "tapestry-controller",
    )])?;
    cp.apply(RBAC)?;

    // Without the CRD the controller stops at once and says how to install it.
    let out = Command::new(controller_binary()?)
        .arg(format!(
            "--kubeconfig={}",
            cp.kubeconfig_path(CONTROLLER_ID)?.display()
        ))
        .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()?))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("guests.tapestry.dev")
            && text.contains("tapestry-controller crd | kubectl apply -f -"),
        "{text}"
    );

    cp.install_guest_crd()?;
    cp.apply(
        &guest(
            "vm-1",
            &["10.22.0.5"],
            json!({"app": "web"}),
            json!([{"name": "http", "port": 8080}]),
        )
        .to_string(),
    )?;
    let mut other = guest("vm-2", &["10.22.0.6"], json!({"app": "db"}), json!([]));
    other["spec"]["nodeName"] = json!("node-b");
    cp.apply(&other.to_string())?;
    set_ready(&cp, "vm-1", true)?;

    // The printer columns, the defaulted protocol, label and field selectors.
    let table = cp.kubectl_ok(["get", "guests", "vm-1"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "NODE", "IP", "READY", "AGE"], "{table}");
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..4],
        ["vm-1", "node-a", "10.22.0.5", "True"],
        "{table}"
    );
    let g = json(&cp.kubectl_ok(["get", "guest", "vm-1", "-o", "json"])?)?;
    assert_eq!(g["spec"]["ports"][0]["protocol"], "TCP", "{g}");
    let by_label = cp.kubectl_ok(["get", "guests", "-l", "app=web", "-o", "name"])?;
    assert_eq!(by_label.trim(), "guest.tapestry.dev/vm-1");
    let by_node = cp.kubectl_ok([
        "get",
        "guests",
        "--field-selector",
        "spec.nodeName=node-b",
        "-o",
        "name",
    ])?;
    assert_eq!(by_node.trim(), "guest.tapestry.dev/vm-2");

    // The schema validates.
    let bad = guest(
        "bad",
        &["10.22.0.7"],
        json!({}),
        json!([{"name": "x", "port": 70000}]),
    );
    let mut cmd = cp.kubectl_command(tapestry_tests::k8s::ADMIN)?;
    let mut child = cmd
        .args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(bad.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("65535"),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn slices_follow_services_and_guests() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    cp.apply(
        r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-a}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {team: blue}}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090, targetPort: 9100}
"#,
    )?;
    let http = json!([{"name": "http", "port": 8080}]);
    cp.apply(&guest("vm-1", &["10.22.0.5"], json!({"app": "web"}), http.clone()).to_string())?;
    cp.apply(&guest("vm-2", &["10.22.0.6"], json!({"app": "web"}), json!([])).to_string())?;
    cp.apply(&guest("vm-3", &["10.22.0.7"], json!({"app": "db"}), http.clone()).to_string())?;
    set_ready(&cp, "vm-1", true)?;

    let ctl = Controller::start(&cp, "only")?;
    let eps = wait_endpoints(&cp, "web", &[("10.22.0.5", true), ("10.22.0.6", false)])?;

    // The fields, as the built-in controller writes them for pods.
    let svc = json(&cp.kubectl_ok(["get", "svc", "web", "-o", "json"])?)?;
    let slices = our_slices(&cp, "web")?;
    assert_eq!(slices.len(), 2, "one slice per port set: {slices:?}");
    for (name, s) in &slices {
        assert!(name.starts_with("web-tapestry-"), "{name}");
        assert_eq!(s["addressType"], "IPv4");
        let l = &s["metadata"]["labels"];
        assert_eq!(l["team"], "blue", "{s}");
        assert_eq!(l["kubernetes.io/service-name"], "web");
        let owner = &s["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Service");
        assert_eq!(owner["uid"], svc["metadata"]["uid"]);
        assert_eq!(owner["controller"], true);
        let managers: Vec<&str> = s["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert_eq!(managers, ["tapestry-controller"], "{s}");
    }
    let e1 = &eps["10.22.0.5"];
    assert_eq!(
        e1["conditions"],
        json!({"ready": true, "serving": true, "terminating": false})
    );
    assert_eq!(e1["nodeName"], "node-a");
    assert_eq!(e1["zone"], "zone-a");
    assert_eq!(e1["targetRef"]["kind"], "Guest");
    assert_eq!(e1["targetRef"]["name"], "vm-1");
    assert_eq!(e1["targetRef"]["apiVersion"], "tapestry.dev/v1alpha1");
    let ports_of = |ip: &str| -> Vec<(String, i64)> {
        let s = slices
            .values()
            .find(|s| {
                s["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["addresses"][0] == ip)
            })
            .unwrap();
        s["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or("").into(),
                    p["port"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(
        ports_of("10.22.0.5"),
        [("http".into(), 8080), ("metrics".into(), 9100)]
    );
    // vm-2 declares no port named http: only the numeric one.
    assert_eq!(ports_of("10.22.0.6"), [("metrics".into(), 9100)]);

    // Steady state writes nothing: a reconcile (the Service changed) finds every slice equal.
    let writes = ctl.writes()?;
    let before = ctl.reconciliations()?;
    cp.kubectl_ok(["annotate", "svc", "web", "touched=1"])?;
    poll(Duration::from_secs(20), "a reconcile", || {
        Ok((ctl.reconciliations()? > before).then_some(()))
    })
    .unwrap();
    assert_eq!(ctl.writes()?, writes, "a reconcile without changes wrote");

    // Readiness follows the Guest's Ready condition.
    set_ready(&cp, "vm-2", true)?;
    wait_endpoints(&cp, "web", &[("10.22.0.5", true), ("10.22.0.6", true)])?;
    set_ready(&cp, "vm-1", false)?;
    wait_endpoints(&cp, "web", &[("10.22.0.5", false), ("10.22.0.6", true)])?;

    // Labels: vm-1 leaves the Service, vm-3 joins it.
    cp.kubectl_ok(["label", "guest", "vm-1", "app=other", "--overwrite"])?;
    cp.kubectl_ok(["label", "guest", "vm-3", "app=web", "--overwrite"])?;
    wait_endpoints(&cp, "web", &[("10.22.0.6", true), ("10.22.0.7", false)])?;

    // A terminating guest (held by a finalizer): terminating, not ready, still serving.
    set_ready(&cp, "vm-3", true)?;
    cp.kubectl_ok([
        "patch",
        "guest",
        "vm-3",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["test.tapestry.dev/hold"]}}"#,
    ])?;
    cp.kubectl_ok(["delete", "guest", "vm-3", "--wait=false"])?;
    let eps = wait_endpoints(&cp, "web", &[("10.22.0.6", true), ("10.22.0.7", false)])?;
    assert_eq!(
        eps["10.22.0.7"]["conditions"],
        json!({"ready": false, "serving": true, "terminating": true})
    );
    cp.kubectl_ok([
        "patch",
        "guest",
        "vm-3",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])?;
    wait_endpoints(&cp, "web", &[("10.22.0.6", true)])?;

    // A Guest deleted: its endpoint goes, and with it the slice it was alone in.
    cp.kubectl_ok(["delete", "guest", "vm-2"])?;
    poll(Duration::from_secs(30), "no slices for web", || {
        Ok(our_slices(&cp, "web")?.is_empty().then_some(()))
    })
    .unwrap();

    // A Service deleted: its slices go (no garbage collector runs here: the controller does it).
    cp.kubectl_ok(["label", "guest", "vm-1", "app=web", "--overwrite"])?;
    wait_endpoints(&cp, "web", &[("10.22.0.5", false)])?;
    cp.kubectl_ok(["delete", "svc", "web"])?;
    poll(
        Duration::from_secs(30),
        "web's slices to go with it",
        || Ok(our_slices(&cp, "web")?.is_empty().then_some(())),
    )
    .unwrap();

    // A selector-less Service gets nothing.
    cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: manual, namespace: default}\nspec:\n  ports: [{port: 80}]\n",
    )?;
    thread::sleep(Duration::from_secs(1));
    assert!(our_slices(&cp, "manual")?.is_empty());
    ctl.check_running()?;
    Ok(())
}

#[test]
fn more_than_100_guests() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: default}\nspec:\n  selector: {app: big}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?;
    let guests: Vec<Value> = (0..230)
        .map(|i| {
            guest(
                &format!("vm-{i}"),
                &[&format!("10.30.{}.{}", i / 200, i % 200 + 1)],
                json!({"app": "big"}),
                json!([]),
            )
        })
        .collect();
    cp.apply(&json!({"apiVersion": "v1", "kind": "List", "items": guests}).to_string())?;

    let _ctl = Controller::start(&cp, "only")?;
    let sizes = |cp: &ControlPlane| -> Result<(Vec<String>, Vec<usize>)> {
        let s = our_slices(cp, "big")?;
        let mut sizes: Vec<usize> = s
            .values()
            .map(|s| s["endpoints"].as_array().map_or(0, |e| e.len()))
            .collect();
        sizes.sort();
        Ok((s.keys().cloned().collect(), sizes))
    };
    let (names, _) = poll(Duration::from_secs(60), "230 endpoints in 3 slices", || {
        let (names, sizes) = sizes(&cp)?;
        Ok((sizes == [30, 100, 100]).then_some((names, sizes)))
    })
    .unwrap();
    assert_eq!(endpoints(&cp, "big")?.len(), 230);

    // 40 fewer: two slices, both names kept from before.
    let names_to_delete: Vec<String> = (0..40).map(|i| format!("vm-{i}")).collect();
    let mut args = vec!["delete".to_string(), "guests".into(), "--wait=false".into()];
    args.extend(names_to_delete);
    cp.kubectl_ok(args)?;
    let (after, _) = poll(Duration::from_secs(60), "190 endpoints in 2 slices", || {
        let (names, sizes) = sizes(&cp)?;
        Ok((sizes == [90, 100]).then_some((names, sizes)))
    })
    .unwrap();
    assert!(
        after.iter().all(|n| names.contains(n)),
        "{after:?} not among {names:?}"
    );
    Ok(())
}

#[test]
fn addresses_in_pod_slices_are_not_duplicated() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?;
    let uid = cp.kubectl_ok(["get", "svc", "web", "-o", "jsonpath={.metadata.uid}"])?;
    // The VM pod's slice, as the built-in controller writes it: its address is the guest's.
    let pod_slice = |ips: &[&str]| {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-x7k2p",
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": uid,
                                     "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": ips.iter().map(|ip| json!({
                "addresses": [ip],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-a",
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("pod-{ip}")},
            })).collect::<Vec<_>>(),
        })
        .to_string()
    };
    cp.apply(&pod_slice(&["10.22.0.5", "10.22.0.9"]))?;
    cp.apply(
        &guest(
            "vm-in-pod",
            &["10.22.0.5"],
            json!({"app": "web"}),
            json!([]),
        )
        .to_string(),
    )?;
    cp.apply(&guest("vm-alone", &["10.22.0.6"], json!({"app": "web"}), json!([])).to_string())?;

    let _ctl = Controller::start(&cp, "only")?;
    wait_endpoints(&cp, "web", &[("10.22.0.6", false)])?;

    // The pod leaves the built-in slice: the guest's own endpoint appears; back again, it goes.
    cp.apply(&pod_slice(&["10.22.0.9"]))?;
    wait_endpoints(&cp, "web", &[("10.22.0.5", false), ("10.22.0.6", false)])?;
    cp.apply(&pod_slice(&["10.22.0.5", "10.22.0.9"]))?;
    wait_endpoints(&cp, "web", &[("10.22.0.6", false)])?;
    Ok(())
}

#[test]
fn two_replicas_one_writer() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    cp.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?;
    cp.apply(&guest("vm-1", &["10.22.0.5"], json!({"app": "web"}), json!([])).to_string())?;

    let a = Controller::start(&cp, "replica-a")?;
    let b = Controller::start(&cp, "replica-b")?;
    let holder = || -> Result<String> {
        cp.kubectl_ok([
            "get",
            "lease",
            "-n",
            CONTROLLER_NS,
            "tapestry-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    let leader = poll(Duration::from_secs(30), "a leader", || {
        let h = holder()?;
        Ok((h == "replica-a" || h == "replica-b").then_some(h))
    })
    .unwrap();
    let (mut leading, mut standing) = if leader == "replica-a" {
        (a, b)
    } else {
        (b, a)
    };
    wait_endpoints(&cp, "web", &[("10.22.0.5", false)])?;
    poll(Duration::from_secs(10), "the leader's gauge", || {
        Ok(leading.is_leader()?.then_some(()))
    })
    .unwrap();

    // Only the leader reconciles and writes.
    cp.apply(&guest("vm-2", &["10.22.0.6"], json!({"app": "web"}), json!([])).to_string())?;
    wait_endpoints(&cp, "web", &[("10.22.0.5", false), ("10.22.0.6", false)])?;
    assert!(leading.writes()? >= 1.0);
    assert!(!standing.is_leader()?);
    assert_eq!(standing.reconciliations()?, 0.0, "the standby reconciled");
    assert_eq!(standing.writes()?, 0.0, "the standby wrote");

    // SIGTERM: the leader releases the Lease and the other takes over at once.
    let released = Instant::now();
    leading.signal(libc::SIGTERM)?;
    poll(Duration::from_secs(10), "the standby to take over", || {
        Ok((holder()? == standing.identity).then_some(()))
    })
    .unwrap();
    let took = released.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "takeover after release took {took:?}"
    );
    cp.apply(&guest("vm-3", &["10.22.0.7"], json!({"app": "web"}), json!([])).to_string())?;
    wait_endpoints(
        &cp,
        "web",
        &[
            ("10.22.0.5", false),
            ("10.22.0.6", false),
            ("10.22.0.7", false),
        ],
    )?;
    assert!(standing.writes()? >= 1.0);

    // kill -9: no release; the restarted replica takes over once the Lease expires (3 s here).
    let identity = leading.identity.clone();
    drop(leading);
    leading = Controller::start(&cp, &identity)?;
    std::mem::swap(&mut leading, &mut standing);
    // `leading` now leads; `standing` is the restarted one.
    thread::sleep(Duration::from_secs(1));
    assert!(!standing.is_leader()?);
    let killed = Instant::now();
    leading.signal(libc::SIGKILL)?;
    poll(
        Duration::from_secs(20),
        "the restarted replica to take over",
        || Ok((holder()? == standing.identity).then_some(())),
    )
    .unwrap();
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "took over a live Lease after {took:?}"
    );
    cp.kubectl_ok(["delete", "guest", "vm-1"])?;
    wait_endpoints(&cp, "web", &[("10.22.0.6", false), ("10.22.0.7", false)])?;
    poll(Duration::from_secs(10), "the new leader's gauge", || {
        Ok(standing.is_leader()?.then_some(()))
    })
    .unwrap();
    Ok(())
}

#[test]
fn beside_the_builtin_endpointslice_controller() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let mut cp = control_plane()?;
    cp.start_controller_manager()?;
    // A VM pod (its guest owns the pod IP) and a guest outside pods, both app=web; no kubelet
    // runs, so the pod's status is written as a kubelet would.
    cp.apply(
        r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: vm-pod, namespace: default, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: compute, image: virt-launcher, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#,
    )?;
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "10.22.0.5",
        "podIPs": [{"ip": "10.22.0.5"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    cp.kubectl_ok([
        "patch",
        "pod",
        "vm-pod",
        "--subresource=status",
        "--type=merge",
        "-p",
        status.to_string().as_str(),
    ])?;
    let http = json!([{"name": "http", "port": 8080}]);
    cp.apply(
        &guest(
            "vm-pod",
            &["10.22.0.5"],
            json!({"app": "web"}),
            http.clone(),
        )
        .to_string(),
    )?;
    cp.apply(&guest("vm-alone", &["10.22.0.6"], json!({"app": "web"}), http).to_string())?;
    set_ready(&cp, "vm-alone", true)?;

    let _ctl = Controller::start(&cp, "only")?;
    // The built-in controller publishes the pod; the guest in that pod is not published twice.
    poll(
        Duration::from_secs(60),
        "the pod in the built-in slice",
        || {
            let list = json(&cp.kubectl_ok([
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web,endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io",
            "-o",
            "json",
        ])?)?;
            Ok(list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
                .any(|e| e["addresses"][0] == "10.22.0.5")
                .then_some(()))
        },
    ).unwrap();
    wait_endpoints(&cp, "web", &[("10.22.0.6", true)])?;
    let ours = our_slices(&cp, "web")?;
    let slice = ours.values().next().context("our slice")?;
    assert_eq!(slice["ports"][0]["port"], 8080, "{slice}");
    assert_eq!(slice["ports"][0]["name"], "http", "{slice}");

    // With a garbage collector running, the owner reference takes our slices with the Service.
    cp.kubectl_ok(["delete", "svc", "web"])?;
    poll(Duration::from_secs(60), "web's slices to go", || {
        Ok(our_slices(&cp, "web")?.is_empty().then_some(()))
    })
    .unwrap();
    Ok(())
}

/// kubectl as the daemon of `node-a`, with the pod-bound token the chart's ServiceAccount gets
/// (`kubeconfig` from [`ControlPlane::node_kubeconfig`]): (success, stdout + stderr).
fn as_daemon(kubeconfig: &std::path::Path, args: &[&str], stdin: &str) -> Result<(bool, String)> {
    let mut child = Command::new(tapestry_tests::k8s::binary("kubectl")?)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("kubectl stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// A Guest as the daemon writes one for pod `pod` (uid `uid`) in `ns`.
fn pod_guest(ns: &str, pod: &str, uid: &str, ips: &[&str], labels: Value) -> Value {
    json!({
        "apiVersion": "tapestry.dev/v1alpha1",
        "kind": "Guest",
        "metadata": {"name": pod, "namespace": ns, "labels": labels,
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}]},
        "spec": {"nodeName": "node-a", "podRef": {"name": pod, "uid": uid}, "ips": ips,
                 "mac": "52:54:00:00:00:01", "tap": "tap0"}
    })
}

/// A pod of node-a at `ip` (its status as the kubelet would report it); returns its uid.
fn running_pod(cp: &ControlPlane, ns: &str, name: &str, labels: Value, ip: &str) -> Result<String> {
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": "node-a", "containers": [{"name": "vm", "image": "vm"}]}})
        .to_string(),
    )?;
    let status = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}});
    cp.kubectl_ok([
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;
    Ok(cp
        .kubectl_ok([
            "get",
            "pod",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?
        .trim()
        .to_string())
}

/// The notes of the Events with `reason` about Guest `ns/name`.
fn guest_events(cp: &ControlPlane, ns: &str, name: &str, reason: &str) -> Result<Vec<String>> {
    let list = json(&cp.kubectl_ok(["get", "events.events.k8s.io", "-n", ns, "-o", "json"])?)?;
    Ok(list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|e| {
            e["regarding"]["kind"] == "Guest"
                && e["regarding"]["name"] == name
                && e["reason"] == reason
        })
        .filter_map(|e| e["note"].as_str().map(String::from))
        .collect())
}

/// Every EndpointSlice of Service `ns/service`, by name, with its endpoints.
fn all_slices(cp: &ControlPlane, ns: &str, service: &str) -> Result<BTreeMap<String, Value>> {
    let list = json(&cp.kubectl_ok([
        "get",
        "endpointslices",
        "-n",
        ns,
        "-l",
        &format!("kubernetes.io/service-name={service}"),
        "-o",
        "json",
    ])?)?;
    Ok(list["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap_or("").to_string(),
                s["endpoints"].clone(),
            )
        })
        .collect())
}

/// Guests the cluster can trust (issue 12): with the chart's admission policies and the daemon's
/// pod-bound node token, a node can neither register a pod-less Guest nor get a Guest published
/// that its pod does not back (another namespace, another address, a kube-dns look-alike); each
/// refusal by the controller is an Event on the Guest and a counted reason; an operator's
/// pod-less Guest and a pod's own Guest are published, and a refused Guest set right is.
#[test]
fn only_guests_their_backing_agrees_with_are_published() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    cp.install_node_identity()?;
    let daemon = cp.node_kubeconfig("node-a")?;
    cp.apply(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: other}
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  selector: {k8s-app: kube-dns}
  ports: [{name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-abcde
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}]
endpoints: [{addresses: [10.22.0.53], conditions: {ready: true}}]
"#,
    )?;
    let dns_before = all_slices(&cp, "kube-system", "kube-dns")?;
    let vm1 = running_pod(&cp, "default", "vm-1", json!({"app": "web"}), "10.22.0.5")?;
    let vm2 = running_pod(&cp, "default", "vm-2", json!({"app": "web"}), "10.22.0.6")?;
    let ctl = Controller::start(&cp, "only")?;

    let daemon_apply = |g: &Value| as_daemon(&daemon, &["apply", "-f", "-"], &g.to_string());
    // The policy is in force once the apiserver's informers have it.
    let loose = json!({"apiVersion": "tapestry.dev/v1alpha1", "kind": "Guest",
        "metadata": {"name": "loose", "namespace": "default", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "ips": ["10.22.0.77"], "mac": "52:54:00:00:00:07", "tap": "tap0"}});
    let denied = poll(
        Duration::from_secs(30),
        "the policy to deny a pod-less Guest",
        || {
            let (ok, out) = daemon_apply(&loose)?;
            if ok {
                cp.kubectl_ok(["delete", "guest", "loose", "-n", "default"])?;
                return Ok(None);
            }
            Ok(out.contains("ValidatingAdmissionPolicy").then_some(out))
        },
    )
    .unwrap();
    assert!(denied.contains("may only write a pod's Guest"), "{denied}");
    // The kube-dns look-alike, pod-less with its own address: denied too.
    let mut lookalike = loose.clone();
    lookalike["metadata"] = json!({"name": "coredns-x", "namespace": "kube-system",
                                   "labels": {"k8s-app": "kube-dns"}});
    let (ok, out) = daemon_apply(&lookalike)?;
    assert!(!ok && out.contains("may only write a pod's Guest"), "{out}");
    // Nor may the node claim an operator's registration.
    let mut registered = loose.clone();
    registered["metadata"]["annotations"] = json!({"tapestry.dev/registered-by": "admin"});
    let (ok, out) = daemon_apply(&registered)?;
    assert!(!ok, "the node registered a pod-less Guest: {out}");

    // Admitted (the policy cannot look pods up), never published:
    // - a kube-dns look-alike owned by a pod that does not exist there;
    let fake_dns = pod_guest(
        "kube-system",
        "coredns-x",
        &vm1,
        &["10.22.0.66"],
        json!({"k8s-app": "kube-dns"}),
    );
    let (ok, out) = daemon_apply(&fake_dns)?;
    assert!(ok, "{out}");
    // - vm-1's Guest in another namespace than its pod's;
    let (ok, out) = daemon_apply(&pod_guest(
        "other",
        "vm-1",
        &vm1,
        &["10.22.0.5"],
        json!({"app": "web"}),
    ))?;
    assert!(ok, "{out}");
    // - vm-2's Guest with an address that is not the pod's.
    let (ok, out) = daemon_apply(&pod_guest(
        "default",
        "vm-2",
        &vm2,
        &["10.22.0.99"],
        json!({"app": "web"}),
    ))?;
    assert!(ok, "{out}");
    // Published: vm-1's own Guest, and an operator's pod-less one.
    let (ok, out) = daemon_apply(&pod_guest(
        "default",
        "vm-1",
        &vm1,
        &["10.22.0.5"],
        json!({"app": "web"}),
    ))?;
    assert!(ok, "{out}");
    cp.apply(&guest("external", &["10.30.0.1"], json!({"app": "web"}), json!([])).to_string())?;
    wait_endpoints(&cp, "web", &[("10.22.0.5", false), ("10.30.0.1", false)])?;

    // Each refusal is an Event on its Guest, saying why, and counted by reason.
    let event = |ns: &str, name: &str, says: &str| {
        poll(
            Duration::from_secs(30),
            "the GuestNotPublished Event",
            || {
                let notes = guest_events(&cp, ns, name, "GuestNotPublished")?;
                Ok(notes.iter().any(|n| n.contains(says)).then_some(()))
            },
        )
        .unwrap()
    };
    event(
        "kube-system",
        "coredns-x",
        "its pod coredns-x does not exist",
    );
    event("other", "vm-1", "its pod vm-1 does not exist");
    event(
        "default",
        "vm-2",
        "its address 10.22.0.99 is not one of its pod vm-2's (10.22.0.6)",
    );
    let refused = |reason: &str| {
        ctl.metric(&format!(
            "tapestry_controller_guests_not_published_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(refused("pod_missing")?, 2.0);
    assert_eq!(refused("address_not_pods")?, 1.0);
    assert_eq!(ctl.metric("tapestry_controller_guests_refused")?, 3.0);
    assert!(our_slices_in(&cp, "other", "web")?.is_empty());
    assert_eq!(all_slices(&cp, "kube-system", "kube-dns")?, dns_before);

    // An operator cannot register in another's name.
    let mut forged = guest("forged", &["10.30.0.2"], json!({"app": "web"}), json!([]));
    forged["metadata"]["annotations"] = json!({"tapestry.dev/registered-by": "someone-else"});
    let err = cp.apply(&forged.to_string()).unwrap_err();
    assert!(
        format!("{err:#}").contains("must be the name of whoever sets it: admin"),
        "{err:#}"
    );

    // vm-2's Guest set right is published, and its Event says so.
    let (ok, out) = daemon_apply(&pod_guest(
        "default",
        "vm-2",
        &vm2,
        &["10.22.0.6"],
        json!({"app": "web"}),
    ))?;
    assert!(ok, "{out}");
    wait_endpoints(
        &cp,
        "web",
        &[
            ("10.22.0.5", false),
            ("10.22.0.6", false),
            ("10.30.0.1", false),
        ],
    )?;
    assert!(!guest_events(&cp, "default", "vm-2", "GuestPublished")?.is_empty());
    // A label its pod lacks takes it out again.
    let (ok, out) = as_daemon(&daemon, &["label", "guest", "vm-2", "tier=db"], "")?;
    assert!(ok, "{out}");
    wait_endpoints(&cp, "web", &[("10.22.0.5", false), ("10.30.0.1", false)])?;
    event("default", "vm-2", "its label tier=db is not its pod vm-2's");
    assert_eq!(all_slices(&cp, "kube-system", "kube-dns")?, dns_before);
    ctl.check_running()?;
    Ok(())
}

/// Our slices of Service `ns/service`.
fn our_slices_in(cp: &ControlPlane, ns: &str, service: &str) -> Result<BTreeMap<String, Value>> {
    Ok(all_slices(cp, ns, service)?
        .into_iter()
        .filter(|(name, _)| name.starts_with(&format!("{service}-tapestry-")))
        .collect())
}
