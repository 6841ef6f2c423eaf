//! Exposing VM workloads against a real kube-apiserver (`tapestry_tests::k8s`), with the real
//! kubectl: the `kubectl tapestry expose guest` plugin found on the PATH (its Services, dry runs,
//! output and errors), and `kubectl expose pod <vm-pod>`, whose Service gets the guest's endpoint
//! from `tapestry-controller` with guest-level readiness. Skipped (or failed under `CI=...`) when
//! the Kubernetes binaries are missing; needs no root. The workspace's binaries must be built
//! (`kubectl-tapestry`, `tapestry-controller`).

use std::{
    fs::File,
    io::Write,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tapestry_tests::{
    daemon,
    k8s::{self, ADMIN, ControlPlane},
    poll,
};

const MANAGED_BY: &str = "tapestry-controller.tapestry.dev";

// ---------------------------------------------------------------------------------------------
// Helpers

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("parsing JSON: {text}"))
}

/// A control plane with the Guest CRD, as `tapestry-controller crd` prints it.
fn control_plane() -> Result<ControlPlane> {
    let cp = ControlPlane::start()?;
    cp.install_guest_crd()?;
    Ok(cp)
}

/// A directory holding only `kubectl-tapestry` (a link to the built one), as an installation
/// puts it on the PATH: the build directory also holds `kubectl-tapestry.d`, which
/// `kubectl plugin list` would report as a plugin that is not executable.
struct PluginDir(PathBuf);

impl PluginDir {
    fn new(cp: &ControlPlane) -> Result<PluginDir> {
        let dir = cp.dir().join("plugins");
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::symlink(
            daemon::binary("kubectl-tapestry")?,
            dir.join("kubectl-tapestry"),
        )?;
        Ok(PluginDir(dir))
    }

    /// The real kubectl as [`ADMIN`], through `$KUBECONFIG` (kubectl passes its environment to
    /// plugins, not its flags, and refuses flags before a plugin's name), with this directory
    /// first on the PATH.
    fn kubectl(&self, cp: &ControlPlane, args: &[&str]) -> Result<Output> {
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin", self.0.display());
        Command::new(k8s::binary("kubectl")?)
            .args(args)
            .env("KUBECONFIG", cp.kubeconfig_path(ADMIN)?)
            .env("KUBECACHEDIR", cp.dir().join("kubectl-cache"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    fn kubectl_ok(&self, cp: &ControlPlane, args: &[&str]) -> Result<String> {
        let out = self.kubectl(cp, args)?;
        ensure!(
            out.status.success(),
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `kubectl tapestry expose guest ARGS`.
    fn expose(&self, cp: &ControlPlane, args: &[&str]) -> Result<Output> {
        self.kubectl(cp, &[&["tapestry", "expose", "guest"], args].concat())
    }

    /// `kubectl tapestry expose guest ARGS`, which must succeed: its stdout.
    fn expose_ok(&self, cp: &ControlPlane, args: &[&str]) -> Result<String> {
        self.kubectl_ok(cp, &[&["tapestry", "expose", "guest"], args].concat())
    }
}

/// `kubectl <args>` is expected to fail: its stderr.
fn fails(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

/// A Guest as a node daemon publishes it for a VM pod: the pod's name, namespace and labels,
/// `podRef`, the node, the pod IP, the declared ports.
fn guest(namespace: &str, name: &str, labels: Value, ip: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "tapestry.dev/v1alpha1",
        "kind": "Guest",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": "node-a",
            "podRef": {"name": name},
            "ips": [ip],
            "mac": "52:54:00:00:00:01",
            "tap": "tap0",
            "ports": ports,
        }
    })
}

/// [`guest`] as an operator registers a VM outside Kubernetes: no pod reference, the
/// `tapestry.dev/registered-by` annotation (the controller publishes a pod-less Guest only with
/// it).
fn registered(mut g: Value) -> Value {
    g["spec"].as_object_mut().map(|s| s.remove("podRef"));
    g["metadata"]["annotations"] = json!({"tapestry.dev/registered-by": "admin"});
    g
}

fn set_guest_ready(cp: &ControlPlane, namespace: &str, name: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {"conditions": [
        {"type": "Attached", "status": "True", "reason": "TapCreated"},
        {"type": "Ready", "status": status, "reason": if ready { "DhcpBound" } else { "NoTraffic" }},
    ]}});
    cp.kubectl_ok([
        "patch",
        "guest",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ])?;
    Ok(())
}

/// `tapestry-controller` as a plain process (no leader election, admin identity: its RBAC is
/// tests/tests/controller.rs' business); killed on drop, its log printed if the test panics.
struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn start(cp: &ControlPlane) -> Result<Controller> {
        let log = cp.dir().join("tapestry-controller.log");
        let out = File::create(&log)?;
        let child = Command::new(daemon::binary("tapestry-controller")?)
            .arg(format!(
                "--kubeconfig={}",
                cp.kubeconfig_path(ADMIN)?.display()
            ))
            .args(["--leader-elect=false", "--metrics-addr=127.0.0.1:0"])
            .env("RUST_LOG", "info,tapestry_controller=debug")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting tapestry-controller")?;
        Ok(Controller { child, log })
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- tapestry-controller log ---\n{log}");
        }
    }
}

/// The endpoints in tapestry's slices of Service `namespace/service`: (address, ready, slice).
fn guest_endpoints(
    cp: &ControlPlane,
    namespace: &str,
    service: &str,
) -> Result<Vec<(String, bool, Value)>> {
    let list = json(&cp.kubectl_ok([
        "get",
        "endpointslices",
        "-n",
        namespace,
        "-l",
        &format!(
            "kubernetes.io/service-name={service},endpointslice.kubernetes.io/managed-by={MANAGED_BY}"
        ),
        "-o",
        "json",
    ])?)?;
    let mut out = Vec::new();
    for slice in list["items"].as_array().into_iter().flatten() {
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            out.push((
                e["addresses"][0].as_str().unwrap_or_default().to_string(),
                e["conditions"]["ready"].as_bool().unwrap_or(false),
                slice.clone(),
            ));
        }
    }
    Ok(out)
}

/// Waits until tapestry's slices of the Service hold exactly `want` (address, ready); returns
/// the slice of the first. A timeout panics: the control plane keeps its logs only then.
fn wait_guest_endpoints(
    cp: &ControlPlane,
    namespace: &str,
    service: &str,
    want: &[(&str, bool)],
) -> Result<Option<Value>> {
    let slice = poll(
        Duration::from_secs(30),
        &format!("endpoints {want:?} for {namespace}/{service}"),
        || {
            let have = guest_endpoints(cp, namespace, service)?;
            let pairs: Vec<(&str, bool)> = have.iter().map(|(a, r, _)| (a.as_str(), *r)).collect();
            Ok((pairs == want).then(|| have.first().map(|(_, _, s)| s.clone())))
        },
    )
    .unwrap();
    Ok(slice)
}

fn service(cp: &ControlPlane, namespace: &str, name: &str) -> Result<Value> {
    json(&cp.kubectl_ok(["get", "svc", name, "-n", namespace, "-o", "json"])?)
}

fn service_exists(cp: &ControlPlane, namespace: &str, name: &str) -> Result<bool> {
    let out = cp.kubectl(["get", "svc", name, "-n", namespace, "-o", "name"])?;
    if out.status.success() {
        return Ok(true);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("NotFound"), "kubectl get svc: {stderr}");
    Ok(false)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn kubectl_tapestry_expose_guest() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    let plugins = PluginDir::new(&cp)?;
    cp.kubectl_ok(["create", "namespace", "vms"])?;
    let labels = json!({"app": "web", "vm.kubevirt.io/name": "vm-1"});
    cp.apply(
        &registered(guest(
            "vms",
            "vm-1",
            labels.clone(),
            "10.22.0.5",
            json!([{"name": "http", "port": 8080}]),
        ))
        .to_string(),
    )?;
    set_guest_ready(&cp, "vms", "vm-1", true)?;
    cp.apply(&registered(guest("vms", "bare", json!({}), "10.22.0.6", json!([]))).to_string())?;

    // The real kubectl finds the plugin on the PATH.
    let list = plugins.kubectl_ok(&cp, &["plugin", "list", "--name-only"])?;
    assert!(
        list.lines().any(|l| l.trim() == "kubectl-tapestry"),
        "{list}"
    );
    let help = plugins.kubectl_ok(&cp, &["tapestry", "expose", "guest", "--help"])?;
    assert!(help.contains("kubectl tapestry expose guest"), "{help}");

    // Client dry run: the Service printed, nothing created, only the Guest read.
    let yaml = plugins.expose_ok(
        &cp,
        &[
            "vm-1",
            "-n",
            "vms",
            "--port",
            "80",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    )?;
    let printed: Value = serde_yaml::from_str(&yaml).with_context(|| yaml.clone())?;
    assert_eq!(printed["apiVersion"], "v1", "{yaml}");
    assert_eq!(printed["kind"], "Service", "{yaml}");
    assert_eq!(printed["metadata"]["name"], "vm-1", "{yaml}");
    assert_eq!(printed["metadata"]["namespace"], "vms", "{yaml}");
    assert_eq!(printed["metadata"]["labels"], labels, "{yaml}");
    assert_eq!(printed["spec"]["selector"], labels, "{yaml}");
    assert_eq!(
        printed["spec"]["ports"],
        json!([{"port": 80, "protocol": "TCP", "targetPort": 80}]),
        "{yaml}"
    );
    assert!(!service_exists(&cp, "vms", "vm-1")?);
    // ... and what it printed is a Service the server accepts.
    let mut check = cp.kubectl_command(ADMIN)?;
    let mut child = check
        .args(["create", "--dry-run=server", "-o", "name", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "service/vm-1");

    // Server dry run: validated and defaulted (a cluster IP), not stored.
    let text = plugins.expose_ok(
        &cp,
        &[
            "vm-1",
            "-n",
            "vms",
            "--port",
            "80",
            "--dry-run=server",
            "-o",
            "json",
        ],
    )?;
    let dry = json(&text)?;
    assert_eq!(dry["spec"]["type"], "ClusterIP", "{dry}");
    assert!(
        dry["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.96.")),
        "{dry}"
    );
    assert!(!service_exists(&cp, "vms", "vm-1")?);
    let msg = plugins.expose_ok(&cp, &["vm-1", "-n", "vms", "--port=80", "--dry-run=server"])?;
    assert_eq!(msg.trim(), "service/vm-1 exposed (server dry run)");
    assert!(!service_exists(&cp, "vms", "vm-1")?);

    // The real thing.
    let msg = plugins.expose_ok(
        &cp,
        &["vm-1", "-n", "vms", "--port", "80", "--target-port", "http"],
    )?;
    assert_eq!(msg.trim(), "service/vm-1 exposed");
    let svc = service(&cp, "vms", "vm-1")?;
    assert_eq!(svc["spec"]["selector"], labels, "{svc}");
    assert_eq!(svc["metadata"]["labels"], labels, "{svc}");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    let port = &svc["spec"]["ports"][0];
    assert_eq!(
        (&port["port"], &port["targetPort"], &port["protocol"]),
        (&json!(80), &json!("http"), &json!("TCP")),
        "{svc}"
    );
    let managers = cp.kubectl_ok([
        "get",
        "svc",
        "vm-1",
        "-n",
        "vms",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ])?;
    assert_eq!(managers, "kubectl-tapestry-expose");

    // The port defaults to the one the guest declares; -o name; another name and type.
    let name = plugins.expose_ok(
        &cp,
        &[
            "vm-1",
            "-n",
            "vms",
            "--name",
            "vm-1-np",
            "--type",
            "NodePort",
            "-l",
            "team=blue",
            "-o",
            "name",
        ],
    )?;
    assert_eq!(name.trim(), "service/vm-1-np");
    let np = service(&cp, "vms", "vm-1-np")?;
    assert_eq!(np["spec"]["type"], "NodePort");
    assert_eq!(np["spec"]["ports"][0]["port"], 8080);
    assert_eq!(np["spec"]["ports"][0]["targetPort"], 8080);
    assert!(
        np["spec"]["ports"][0]["nodePort"].as_i64().is_some(),
        "{np}"
    );
    assert_eq!(np["metadata"]["labels"], json!({"team": "blue"}));
    assert_eq!(np["spec"]["selector"], labels);

    // --kubeconfig on the plugin itself (no $KUBECONFIG); the namespace from -n.
    let out = Command::new(daemon::binary("kubectl-tapestry")?)
        .args(["expose", "guest", "vm-1", "-n", "vms", "--name", "vm-1-udp"])
        .args(["--port=53", "--protocol=UDP", "--selector=app=web"])
        .arg(format!(
            "--kubeconfig={}",
            cp.kubeconfig_path(ADMIN)?.display()
        ))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let udp = service(&cp, "vms", "vm-1-udp")?;
    assert_eq!(udp["spec"]["selector"], json!({"app": "web"}));
    assert_eq!(udp["spec"]["ports"][0]["protocol"], "UDP");

    // Errors: exit 1 and kubectl's wording; nothing created.
    /// What the error message must be.
    enum Says {
        Exactly(&'static str),
        StartsWith(&'static str),
        ContainsAll(&'static [&'static str]),
    }
    use Says::*;
    let errors: [(&[&str], Says); 6] = [
        (
            &["nope", "-n", "vms", "--port=80"],
            Exactly(r#"Error from server (NotFound): guests.tapestry.dev "nope" not found"#),
        ),
        (
            &["vm-1", "-n", "vms", "--port=80"],
            Exactly(r#"Error from server (AlreadyExists): services "vm-1" already exists"#),
        ),
        (
            &["vm-1", "-n", "vms", "--port=0", "--name=x"],
            ContainsAll(&["--port", "between 1 and 65535"]),
        ),
        (
            &["bare", "-n", "vms", "--port=80"],
            ContainsAll(&["has no labels", "--selector"]),
        ),
        (
            &["bare", "-n", "vms", "--selector=a=b"],
            ContainsAll(&["couldn't find port", "--port"]),
        ),
        (
            &["vm-1", "-n", "vms", "--port=80", "--name=Bad_Name"],
            StartsWith("Error from server (Invalid)"),
        ),
    ];
    for (args, says) in errors {
        let e = fails(plugins.expose(&cp, args)?);
        match says {
            Exactly(want) => assert_eq!(e.trim(), want, "{args:?}"),
            StartsWith(want) => assert!(e.starts_with(want), "{args:?}: {e}"),
            ContainsAll(parts) => assert!(parts.iter().all(|p| e.contains(p)), "{args:?}: {e}"),
        }
    }
    // clap refuses a bad enum value with exit 2, as for every bad argument of the CLI.
    let out = plugins.expose(&cp, &["vm-1", "--port=80", "--type=Bogus"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    for name in ["x", "bare", "Bad_Name"] {
        assert!(!service_exists(&cp, "vms", name)?);
    }

    // The controller gives the plugin's Service the guest's endpoint, on the named port.
    let _ctl = Controller::start(&cp)?;
    let slice =
        wait_guest_endpoints(&cp, "vms", "vm-1", &[("10.22.0.5", true)])?.context("a slice")?;
    assert_eq!(slice["ports"][0]["port"], 8080, "{slice}");
    Ok(())
}

#[test]
fn kubectl_expose_pod_of_a_vm() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = control_plane()?;
    // A VM pod (no kubelet here: its status is written as one would) and its Guest, as the node
    // daemon publishes it: same name, namespace and labels, podRef, node, the pod's IP.
    let labels = json!({"app": "web", "kubevirt.io/domain": "vm-pod"});
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "vm-pod", "namespace": "default", "labels": labels},
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "compute", "image": "virt-launcher"}],
        }
    });
    cp.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a}}\n---\n{pod}"
    ))?;
    let pod_status = json!({"status": {
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
        &pod_status.to_string(),
    ])?;
    let pod_uid = cp.kubectl_ok(["get", "pod", "vm-pod", "-o", "jsonpath={.metadata.uid}"])?;
    let mut g = guest(
        "default",
        "vm-pod",
        labels.clone(),
        "10.22.0.5",
        json!([{"name": "http", "port": 8080}]),
    );
    g["spec"]["podRef"]["uid"] = json!(pod_uid);
    cp.apply(&g.to_string())?;
    set_guest_ready(&cp, "default", "vm-pod", true)?;
    let _ctl = Controller::start(&cp)?;

    // The real kubectl's own expose.
    let msg = cp.kubectl_ok([
        "expose",
        "pod",
        "vm-pod",
        "--port",
        "80",
        "--target-port",
        "8080",
    ])?;
    assert_eq!(msg.trim(), "service/vm-pod exposed");
    let svc = service(&cp, "default", "vm-pod")?;
    assert_eq!(svc["spec"]["selector"], labels, "{svc}");

    // tapestry's slice has the guest, ready with the guest.
    let slice = wait_guest_endpoints(&cp, "default", "vm-pod", &[("10.22.0.5", true)])?
        .context("a slice")?;
    let e = &slice["endpoints"][0];
    assert_eq!(e["targetRef"]["kind"], "Guest", "{slice}");
    assert_eq!(e["targetRef"]["name"], "vm-pod", "{slice}");
    assert_eq!(e["nodeName"], "node-a", "{slice}");
    assert_eq!(slice["ports"][0]["port"], 8080, "{slice}");
    assert_eq!(
        slice["metadata"]["ownerReferences"][0]["uid"],
        svc["metadata"]["uid"]
    );

    // Guest-level readiness: the guest stops being ready while its pod stays Ready.
    set_guest_ready(&cp, "default", "vm-pod", false)?;
    wait_guest_endpoints(&cp, "default", "vm-pod", &[("10.22.0.5", false)])?;
    let pod_ready = cp.kubectl_ok([
        "get",
        "pod",
        "vm-pod",
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
    ])?;
    assert_eq!(pod_ready, "True");
    set_guest_ready(&cp, "default", "vm-pod", true)?;
    wait_guest_endpoints(&cp, "default", "vm-pod", &[("10.22.0.5", true)])?;

    // The Guest goes: so does its endpoint (and the slice it was alone in).
    cp.kubectl_ok(["delete", "guest", "vm-pod"])?;
    wait_guest_endpoints(&cp, "default", "vm-pod", &[])?;
    assert!(service_exists(&cp, "default", "vm-pod")?);
    Ok(())
}
