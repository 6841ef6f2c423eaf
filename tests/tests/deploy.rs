//! The Helm chart (`deploy/helm/tapestry`) and its rendering (`deploy/manifests/tapestry.yaml`):
//! `helm lint` with several values, what the values change in the rendered objects, the
//! committed files against a fresh rendering (`make manifests`), and the manifests applied to a
//! real kube-apiserver: in one `kubectl apply -f` to a bare apiserver (no namespace, no CRD),
//! twice, as the README offers it; and a server-side dry run of everything, then for real, with
//! the ValidatingAdmissionPolicy confining the daemon's identity to its own node's Guests.
//!
//! helm and kubectl are the binaries `scripts/build-k8s.sh kubelet helm` builds; skipped (or
//! failed under `CI=...`) when they are missing. Needs no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tapestry_tests::{daemon, k8s, k8s::ControlPlane, poll, prereq};

const NAMESPACE: &str = "tapestry";
const RELEASE: &str = "tapestry";
const NODE_SA: &str = "system:serviceaccount:tapestry:tapestry-node";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// What `make manifests` adds to [`render`]'s arguments: the CRD, and the release namespace as an
/// object (so that `kubectl apply -f` of the file needs nothing beforehand).
const MANIFESTS_ARGS: &[&str] = &["--include-crds", "--set", "namespace.create=true"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart() -> PathBuf {
    root().join("deploy/helm/tapestry")
}

fn crd_file() -> PathBuf {
    chart().join("crds/guests.tapestry.dev.yaml")
}

fn manifests_file() -> PathBuf {
    root().join("deploy/manifests/tapestry.yaml")
}

/// The workspace version (`[workspace.package] version`): the chart's appVersion and image tag.
fn workspace_version() -> Result<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let mut in_package = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_package = l == "[workspace.package]";
        } else if in_package && let Some(v) = l.strip_prefix("version") {
            return Ok(v
                .trim_start_matches([' ', '='])
                .trim()
                .trim_matches('"')
                .into());
        }
    }
    bail!("no [workspace.package] version in Cargo.toml")
}

/// A directory under $TMPDIR, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tapestry-deploy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The helm binary of `scripts/build-k8s.sh helm`, under the skip-or-fail policy.
fn helm_available() -> bool {
    prereq::available(
        "Kubernetes",
        k8s::binary("helm").map_err(|e| format!("missing helm: {e:#}")),
    )
}

/// helm with its cache, config and data in a directory of its own (nothing read from or
/// written to the user's helm set-up).
fn helm(home: &TempDir, args: &[&str]) -> Result<String> {
    let out = Command::new(k8s::binary("helm")?)
        .args(args)
        .env("HELM_CACHE_HOME", home.0.join("cache"))
        .env("HELM_CONFIG_HOME", home.0.join("config"))
        .env("HELM_DATA_HOME", home.0.join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .context("running helm")?;
    ensure!(
        out.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template` of the chart as `make manifests` runs it, plus `extra` arguments.
fn render(home: &TempDir, extra: &[&str]) -> Result<String> {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().context("chart path")?,
        "--namespace",
        NAMESPACE,
    ];
    args.extend_from_slice(extra);
    helm(home, &args)
}

/// The rendered objects, as JSON values (empty documents dropped).
fn objects(yaml: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).context("parsing rendered YAML")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in the rendering"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> Result<&'a Value> {
    pod[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no {list} {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The JSON after `--plugin-config=` in a container's args.
fn plugin_config(c: &Value) -> Result<Value> {
    let arg = strings(&c["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix("--plugin-config=").map(String::from))
        .context("no --plugin-config argument")?;
    serde_json::from_str(&arg).with_context(|| format!("--plugin-config is not JSON: {arg}"))
}

/// The first line where two texts differ, for a drift message.
fn first_difference(committed: &str, fresh: &str) -> String {
    for (i, (a, b)) in committed.lines().zip(fresh.lines()).enumerate() {
        if a != b {
            return format!("line {}:\n  committed: {a}\n  generated: {b}", i + 1);
        }
    }
    format!(
        "the committed file has {} lines, a fresh one {}",
        committed.lines().count(),
        fresh.lines().count()
    )
}

#[test]
fn chart_lints_with_its_values() -> Result<()> {
    if !helm_available() {
        return Ok(());
    }
    let home = TempDir::new("lint")?;
    let chart = chart();
    let chart = chart.to_str().context("chart path")?;
    for values in [
        &[][..],
        &[
            "--set",
            "daemon.kubeProxyReplacement=false",
            "--set",
            "daemon.flowEvents=true",
        ][..],
        &[
            "--set",
            "cni.uninstallOnStop=false",
            "--set",
            "daemon.uninstallOnStop=true",
            "--set",
            "k8sServiceHost=10.0.0.1",
            "--set",
            "daemon.socket=/run/tapestry-sock/api.sock",
            "--set",
            "namespace.create=true",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", chart, "--namespace", NAMESPACE];
        args.extend_from_slice(values);
        let out = helm(&home, &args)?;
        ensure!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm lint {values:?}:\n{out}"
        );
    }
    Ok(())
}

/// The default rendering holds what the nodes and the other parts rely on.
#[test]
fn chart_renders_the_agreed_objects() -> Result<()> {
    if !helm_available() {
        return Ok(());
    }
    let home = TempDir::new("render")?;
    let version = workspace_version()?;
    let objs = objects(&render(&home, &[])?)?;

    let kinds: BTreeSet<String> = objs
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let want: BTreeSet<String> = [
        "ServiceAccount/tapestry-node",
        "ServiceAccount/tapestry-controller",
        "ClusterRole/tapestry-node",
        "ClusterRoleBinding/tapestry-node",
        "Role/tapestry-node",
        "RoleBinding/tapestry-node",
        "ClusterRole/tapestry-controller",
        "ClusterRoleBinding/tapestry-controller",
        "Role/tapestry-controller",
        "RoleBinding/tapestry-controller",
        "DaemonSet/tapestry-node",
        "Deployment/tapestry-controller",
        "PodDisruptionBudget/tapestry-controller",
        "ValidatingAdmissionPolicy/tapestry-node-guests",
        "ValidatingAdmissionPolicyBinding/tapestry-node-guests",
        "ValidatingAdmissionPolicy/tapestry-guest-registrar",
        "ValidatingAdmissionPolicyBinding/tapestry-guest-registrar",
        "ValidatingAdmissionPolicy/tapestry-node-pod-status",
        "ValidatingAdmissionPolicyBinding/tapestry-node-pod-status",
        "MutatingAdmissionPolicy/tapestry-vm-readiness-gate",
        "MutatingAdmissionPolicyBinding/tapestry-vm-readiness-gate",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds, want, "objects of the chart");
    for o in &objs {
        let cluster_scoped = ["ClusterRole", "ClusterRoleBinding"]
            .contains(&o["kind"].as_str().unwrap_or(""))
            || o["kind"].as_str().is_some_and(|k| {
                k.ends_with("AdmissionPolicy") || k.ends_with("AdmissionPolicyBinding")
            });
        if !cluster_scoped {
            assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{o}");
        }
    }

    // The DaemonSet.
    let ds = find(&objs, "DaemonSet", "tapestry-node")?;
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "tapestry-node");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );

    let d = container(pod, "containers", "tapestryd")?;
    assert_eq!(
        d["image"],
        format!("localhost/tapestry/tapestryd:{version}")
    );
    assert_eq!(d["imagePullPolicy"], "IfNotPresent");
    let args = strings(&d["args"]);
    for a in [
        "--source=kubernetes",
        "--node-name=$(NODE_NAME)",
        "--metrics-addr=127.0.0.1:9964",
        "--bpffs-dir=/sys/fs/bpf/tapestry",
        "--socket=/run/tapestry/tapestryd.sock",
        "--state-dir=/run/tapestry",
        "--kube-proxy-replacement=true",
    ] {
        assert!(args.iter().any(|x| x == a), "{a} missing from {args:?}");
    }
    assert!(!args.iter().any(|x| x == "--flow-events"), "{args:?}");
    assert_eq!(d["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        d["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(d[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(d[probe]["httpGet"]["port"], "metrics", "{probe}");
        assert_eq!(d[probe]["httpGet"]["host"], "127.0.0.1", "{probe}");
    }
    assert_eq!(d["ports"][0]["name"], "metrics");
    assert_eq!(d["ports"][0]["containerPort"], 9964);
    // Not privileged: exactly the capabilities the datapath needs.
    let sc = &d["securityContext"];
    assert!(
        sc["privileged"].is_null() || sc["privileged"] == false,
        "{sc}"
    );
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let caps: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let want_caps: BTreeSet<String> = ["BPF", "PERFMON", "NET_ADMIN", "NET_RAW", "SYS_ADMIN"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(caps, want_caps);
    assert!(
        d["lifecycle"].is_null(),
        "no preStop on the daemon by default: {d}"
    );
    // Host paths: bpffs, state, netns directories (host-to-container propagation).
    let mounts = d["volumeMounts"].as_array().context("daemon mounts")?;
    let mount = |path: &str| mounts.iter().find(|m| m["mountPath"] == path);
    for (path, propagation) in [
        ("/sys/fs/bpf", Some("HostToContainer")),
        ("/run/tapestry", None),
        ("/run/netns", Some("HostToContainer")),
        ("/var/run/netns", Some("HostToContainer")),
    ] {
        let m = mount(path).with_context(|| format!("no mount at {path}"))?;
        assert_eq!(m["mountPropagation"].as_str(), propagation, "{m}");
        let vol = pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == m["name"]))
            .with_context(|| format!("no volume for {path}"))?;
        assert_eq!(vol["hostPath"]["path"], path, "{vol}");
    }

    // The installer: init container (--once) and sidecar, same image and plugin config.
    let init = container(pod, "initContainers", "install-cni")?;
    let side = container(pod, "containers", "install-cni-watch")?;
    for c in [init, side] {
        assert_eq!(
            c["image"],
            format!("localhost/tapestry/install-cni:{version}")
        );
        assert_eq!(c["command"][0], "/opt/tapestry/bin/tapestry-install-cni");
        let a = strings(&c["args"]);
        assert!(
            a.contains(&"--cni-conf-dir=/host/etc/cni/net.d".into()),
            "{a:?}"
        );
        assert!(
            a.contains(&"--cni-bin-dir=/host/opt/cni/bin".into()),
            "{a:?}"
        );
        assert_eq!(
            plugin_config(c)?,
            serde_json::json!({"socket": "/run/tapestry/tapestryd.sock",
                               "vm": {"uid": 107, "gid": 107, "queues": 1}})
        );
        assert_eq!(
            strings(&c["securityContext"]["capabilities"]["drop"]),
            ["ALL"]
        );
        assert!(c["securityContext"]["capabilities"]["add"].is_null());
    }
    assert!(strings(&init["args"]).contains(&"--once".into()));
    assert!(!strings(&side["args"]).contains(&"--once".into()));
    assert!(
        strings(&side["args"]).contains(&"--uninstall-on-exit".into()),
        "{side}"
    );
    // Only `helm uninstall` (the DaemonSet gone) takes the step out, not a rolling update.
    assert!(
        strings(&side["args"])
            .contains(&"--unless-daemonset-remains=tapestry/tapestry-node".into()),
        "{side}"
    );
    let role = find(&objs, "Role", "tapestry-node")?;
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": ["apps"], "resources": ["daemonsets"],
                            "resourceNames": ["tapestry-node"], "verbs": ["get"]}])
    );
    assert!(
        side["lifecycle"].is_null(),
        "no preStop racing the watch: {side}"
    );
    for (vol, path) in [
        ("/host/etc/cni/net.d", "/etc/cni/net.d"),
        ("/host/opt/cni/bin", "/opt/cni/bin"),
    ] {
        let m = init["volumeMounts"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["mountPath"] == vol))
            .with_context(|| format!("no installer mount {vol}"))?;
        let v = pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == m["name"]))
            .context("installer volume")?;
        assert_eq!(v["hostPath"]["path"], path);
    }

    // The controller: two replicas, leader election, PDB.
    let dep = find(&objs, "Deployment", "tapestry-controller")?;
    assert_eq!(dep["spec"]["replicas"], 2);
    let c = container(&dep["spec"]["template"]["spec"], "containers", "controller")?;
    assert_eq!(
        c["image"],
        format!("localhost/tapestry/controller:{version}")
    );
    assert!(strings(&c["args"]).contains(&"--leader-elect=true".into()));
    assert_eq!(c["env"][0]["name"], "POD_NAMESPACE");
    assert_no_apiserver_override(c)?;
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let pdb = find(&objs, "PodDisruptionBudget", "tapestry-controller")?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );

    // The policy names the daemon's service account in the release namespace.
    let vap = find(&objs, "ValidatingAdmissionPolicy", "tapestry-node-guests")?;
    assert_eq!(
        vap["spec"]["matchConditions"][0]["expression"],
        format!("request.userInfo.username == \"{NODE_SA}\"")
    );
    Ok(())
}

/// The controller's container sets neither KUBERNETES_SERVICE_HOST nor _PORT: it reaches the
/// apiserver through the `kubernetes` ClusterIP, whatever k8sServiceHost says.
fn assert_no_apiserver_override(c: &Value) -> Result<()> {
    let env = c["env"].as_array().context("controller env")?;
    assert!(
        !env.iter().any(|e| e["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("KUBERNETES_SERVICE_"))),
        "the controller overrides the apiserver's address: {env:?}"
    );
    Ok(())
}

/// What the values change.
#[test]
fn values_change_the_rendering() -> Result<()> {
    if !helm_available() {
        return Ok(());
    }
    let home = TempDir::new("values")?;
    let objs = objects(&render(
        &home,
        &[
            "--set",
            "daemon.kubeProxyReplacement=false",
            "--set",
            "daemon.flowEvents=true",
            "--set",
            "vm.tapOwner.uid=1000",
            "--set",
            "vm.tapOwner.gid=1001",
            "--set",
            "vm.queues=4",
            "--set",
            "image.tag=dev",
            "--set",
            "daemon.metricsPort=19964",
            "--set",
            "daemon.metricsAddress=192.0.2.7",
            "--set",
            "cni.confDir=/var/lib/cni/conf",
            "--set",
            "cni.uninstallOnStop=false",
            "--set",
            "daemon.uninstallOnStop=true",
            "--set",
            "daemon.socket=/run/tapestry-api/api.sock",
            "--set",
            "k8sServiceHost=192.0.2.1",
            "--set",
            "controller.replicas=3",
            "--set",
            "namespace.create=true",
        ],
    )?)?;
    let ds = find(&objs, "DaemonSet", "tapestry-node")?;
    let pod = &ds["spec"]["template"]["spec"];
    let d = container(pod, "containers", "tapestryd")?;
    let args = strings(&d["args"]);
    assert!(
        args.contains(&"--kube-proxy-replacement=false".into()),
        "{args:?}"
    );
    assert!(args.contains(&"--flow-events".into()), "{args:?}");
    assert!(
        args.contains(&"--metrics-addr=192.0.2.7:19964".into()),
        "{args:?}"
    );
    // The probes follow the address the daemon listens on.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(d[probe]["httpGet"]["host"], "192.0.2.7", "{probe}");
    }
    assert!(
        args.contains(&"--socket=/run/tapestry-api/api.sock".into()),
        "{args:?}"
    );
    assert_eq!(d["image"], "localhost/tapestry/tapestryd:dev");
    assert_eq!(d["ports"][0]["containerPort"], 19964);
    let env = d["env"].as_array().context("env")?;
    assert!(
        env.iter()
            .any(|e| e["name"] == "KUBERNETES_SERVICE_HOST" && e["value"] == "192.0.2.1"),
        "{env:?}"
    );
    // The daemon removes its pins when stopped; the installer does not.
    let pre_stop = strings(&d["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(
        pre_stop,
        [
            "/usr/bin/tapestryd",
            "--uninstall",
            "--bpffs-dir=/sys/fs/bpf/tapestry"
        ]
    );
    let side = container(pod, "containers", "install-cni-watch")?;
    assert!(side["lifecycle"].is_null(), "{side}");
    // The socket's own directory is mounted from the host.
    assert!(
        d["volumeMounts"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["mountPath"] == "/run/tapestry-api")),
        "{d}"
    );
    let conf = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "cni-conf"))
        .context("cni-conf volume")?;
    assert_eq!(conf["hostPath"]["path"], "/var/lib/cni/conf");
    assert_eq!(
        plugin_config(side)?,
        serde_json::json!({"socket": "/run/tapestry-api/api.sock",
                           "vm": {"uid": 1000, "gid": 1001, "queues": 4}})
    );
    let dep = find(&objs, "Deployment", "tapestry-controller")?;
    assert_eq!(dep["spec"]["replicas"], 3);
    // k8sServiceHost is the host-network daemon's alone.
    assert_no_apiserver_override(container(
        &dep["spec"]["template"]["spec"],
        "containers",
        "controller",
    )?)?;
    // namespace.create: the release namespace, admitting privileged pods.
    let ns = find(&objs, "Namespace", NAMESPACE)?;
    assert!(ns["metadata"]["namespace"].is_null(), "{ns}");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    assert_eq!(
        ns["metadata"]["labels"]["app.kubernetes.io/instance"],
        RELEASE
    );
    Ok(())
}

/// The committed CRD is what `tapestry-controller crd` prints, and the committed manifests are
/// the chart rendered now; the rendering is deterministic.
#[test]
fn manifests_are_up_to_date() -> Result<()> {
    if !helm_available() {
        return Ok(());
    }
    let out = Command::new(daemon::binary("tapestry-controller")?)
        .arg("crd")
        .stdin(Stdio::null())
        .output()
        .context("running tapestry-controller crd")?;
    ensure!(out.status.success(), "tapestry-controller crd failed");
    let crd = String::from_utf8(out.stdout)?;
    let committed = std::fs::read_to_string(crd_file())
        .with_context(|| format!("reading {} (run make manifests)", crd_file().display()))?;
    assert!(
        committed == crd,
        "{} differs from `tapestry-controller crd`: run make manifests\n{}",
        crd_file().display(),
        first_difference(&committed, &crd)
    );

    let home = TempDir::new("drift")?;
    let fresh = render(&home, MANIFESTS_ARGS)?;
    let again = render(&home, MANIFESTS_ARGS)?;
    assert_eq!(
        fresh, again,
        "two renderings differ: the chart is not deterministic"
    );
    let committed = std::fs::read_to_string(manifests_file()).with_context(|| {
        format!(
            "reading {} (run make manifests)",
            manifests_file().display()
        )
    })?;
    assert!(
        committed == fresh,
        "{} differs from `helm template {RELEASE} deploy/helm/tapestry --namespace {NAMESPACE} \
         {}`: run make manifests\n{}",
        manifests_file().display(),
        MANIFESTS_ARGS.join(" "),
        first_difference(&committed, &fresh)
    );
    // The rendering carries the CRD first (it must exist before Guests are validated), then the
    // namespace (before the objects in it: kubectl applies in file order).
    let objs = objects(&fresh)?;
    assert_eq!(objs[0]["kind"], "CustomResourceDefinition");
    assert_eq!(objs[0]["metadata"]["name"], "guests.tapestry.dev");
    assert_eq!(objs[1]["kind"], "Namespace");
    assert_eq!(objs[1]["metadata"]["name"], NAMESPACE);
    assert_eq!(
        objs.iter().filter(|o| o["kind"] == "Namespace").count(),
        1,
        "one Namespace"
    );
    Ok(())
}

/// The `(kind, name)` of each line of `kubectl apply` output that ends with `suffix`:
/// `<kind>[.<group>]/<name> <suffix>`, the kind lowercased as kubectl prints it.
fn applied(out: &str, suffix: &str) -> BTreeSet<(String, String)> {
    out.lines()
        .filter(|l| l.ends_with(suffix))
        .filter_map(|l| {
            let (kind, name) = l.split_whitespace().next()?.split_once('/')?;
            let kind = kind.split('.').next()?;
            Some((kind.to_string(), name.to_string()))
        })
        .collect()
}

/// The `(kind, name)` of every object in the committed manifests, as [`applied`] gives them.
fn manifest_objects() -> Result<BTreeSet<(String, String)>> {
    Ok(objects(&std::fs::read_to_string(manifests_file())?)?
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or("?").to_lowercase(),
                o["metadata"]["name"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect())
}

/// `metadata.generation` (a change of what an object asks for) of every object in `file`, live.
fn generations(cp: &ControlPlane, file: &str) -> Result<BTreeMap<(String, String), Value>> {
    let list: Value = serde_json::from_str(&cp.kubectl_ok(["get", "-f", file, "-o", "json"])?)?;
    Ok(list["items"]
        .as_array()
        .context("kubectl get -f: no items")?
        .iter()
        .map(|o| {
            (
                (
                    o["kind"].as_str().unwrap_or("?").to_lowercase(),
                    o["metadata"]["name"].as_str().unwrap_or("?").to_string(),
                ),
                o["metadata"]["generation"].clone(),
            )
        })
        .collect())
}

/// `kubectl apply -f deploy/manifests/tapestry.yaml` exactly as the README offers it, on a bare
/// kube-apiserver (no `tapestry` namespace, no CRD, nothing applied before): the one command
/// succeeds and creates every object, the namespace (labelled for privileged pods), the CRD, the
/// DaemonSet and the controller's Deployment among them; the same command again succeeds and
/// changes nothing.
#[test]
fn manifests_apply_in_one_command_to_a_bare_apiserver() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = ControlPlane::start()?;
    let manifests = manifests_file();
    let manifests = manifests.to_str().context("manifests path")?;
    let want = manifest_objects()?;
    let before = cp.kubectl(["get", "namespace", NAMESPACE])?;
    ensure!(
        !before.status.success(),
        "a bare apiserver already has namespace {NAMESPACE}"
    );

    let out = cp
        .kubectl_ok(["apply", "-f", manifests])
        .context("kubectl apply -f deploy/manifests/tapestry.yaml on a bare apiserver")?;
    assert_eq!(applied(&out, " created"), want, "first apply:\n{out}");

    let ns = cp.kubectl_ok(["get", "namespace", NAMESPACE, "-o", "json"])?;
    let ns: Value = serde_json::from_str(&ns)?;
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "{ns}"
    );
    cp.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/guests.tapestry.dev",
    ])?;
    let ds: Value = serde_json::from_str(&cp.kubectl_ok([
        "get",
        "daemonset/tapestry-node",
        "-n",
        NAMESPACE,
        "-o",
        "json",
    ])?)?;
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true, "{ds}");
    let dep: Value = serde_json::from_str(&cp.kubectl_ok([
        "get",
        "deployment/tapestry-controller",
        "-n",
        NAMESPACE,
        "-o",
        "json",
    ])?)?;
    assert_eq!(dep["spec"]["replicas"], 2, "{dep}");
    // Every object is there (also those the lines above do not look into).
    for (kind, name) in &want {
        let out = cp.kubectl([
            "get",
            kind.as_str(),
            name.as_str(),
            "-n",
            NAMESPACE,
            "-o",
            "name",
        ])?;
        assert!(
            out.status.success(),
            "{kind}/{name} missing after the apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Idempotent: the same command again succeeds and changes nothing. kubectl still prints
    // `configured` for two objects whose three-way patch always carries a whole field: the
    // PodDisruptionBudget's selector (patch strategy `replace`) and the policy's resourceRules
    // (an atomic list, whose rules the server defaults with `scope: '*'`). Those patches change
    // nothing: the generations stay and a server-side diff is empty.
    let before = generations(&cp, manifests)?;
    let again = cp
        .kubectl_ok(["apply", "-f", manifests])
        .context("the second kubectl apply -f deploy/manifests/tapestry.yaml")?;
    let mut seen = applied(&again, " unchanged");
    seen.extend(applied(&again, " configured"));
    assert_eq!(seen, want, "second apply:\n{again}");
    assert_eq!(
        generations(&cp, manifests)?,
        before,
        "the second apply changed objects:\n{again}"
    );
    let diff = cp.kubectl(["diff", "-f", manifests])?;
    assert!(
        diff.status.success() && diff.stdout.is_empty(),
        "kubectl diff after the second apply ({}):\n{}{}",
        diff.status,
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    Ok(())
}

/// A pod's Guest of `node`, as the daemon writes it: named after its pod and owned by it (YAML
/// for `kubectl apply -f -`; the pod need not exist for admission).
fn guest(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: tapestry.dev/v1alpha1\nkind: Guest\nmetadata: {{name: {name}, namespace: default, \
         ownerReferences: [{{apiVersion: v1, kind: Pod, name: {name}, uid: 00000000-0000-0000-0000-000000000001}}]}}\n\
         spec: {{nodeName: {node}, ips: [{ip}], mac: '02:00:00:00:00:01', tap: tap0}}\n"
    )
}

/// kubectl as the daemon's service account on `node` (impersonated by the admin, with the
/// node-name extra a pod-bound token carries), or without the extra when `node` is None.
fn as_daemon(node: Option<&str>) -> Vec<String> {
    let mut a = vec![
        format!("--as={NODE_SA}"),
        "--as-group=system:serviceaccounts".into(),
        format!("--as-group=system:serviceaccounts:{NAMESPACE}"),
        "--as-group=system:authenticated".into(),
    ];
    if let Some(n) = node {
        a.push(format!("--as-user-extra={NODE_NAME_EXTRA}={n}"));
    }
    a
}

/// Runs kubectl with `args`, `stdin` on its stdin; returns (success, stdout + stderr).
fn kubectl_stdin(cp: &ControlPlane, args: &[String], stdin: &str) -> Result<(bool, String)> {
    use std::io::Write;
    let mut cmd = cp.kubectl_command(k8s::ADMIN)?;
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running kubectl")?;
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

fn daemon_kubectl(
    cp: &ControlPlane,
    node: Option<&str>,
    args: &[&str],
    stdin: &str,
) -> Result<(bool, String)> {
    let mut all = as_daemon(node);
    all.extend(args.iter().map(|s| s.to_string()));
    kubectl_stdin(cp, &all, stdin)
}

/// The committed manifests against a real kube-apiserver: the CRD for real, everything else as a
/// server-side dry run, then for real; the daemon's identity can then write the Guests of its own
/// node only, and the controller's RBAC is bound in the release namespace.
#[test]
fn manifests_apply_to_a_real_apiserver() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = ControlPlane::start()?;
    let manifests = manifests_file();
    let manifests = manifests.to_str().context("manifests path")?;
    // A dry run creates nothing, not even the namespace the manifests hold: the namespaced
    // objects' dry run needs it to exist (the apply below then takes it over).
    cp.kubectl_ok(["create", "namespace", NAMESPACE])?;
    // Guest-dependent objects need the CRD established first.
    cp.kubectl_ok(["apply", "-f", crd_file().to_str().context("crd path")?])?;
    cp.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/guests.tapestry.dev",
    ])?;

    let dry = cp.kubectl_ok(["apply", "--dry-run=server", "-f", manifests])?;
    // One line per object: `<kind>[.<group>]/<name> created (server dry run)` (`configured`
    // for the CRD and the namespace, which exist).
    let accepted = applied(&dry, "(server dry run)");
    assert_eq!(accepted, manifest_objects()?, "{dry}");
    // A dry run created nothing.
    let none = cp.kubectl_ok([
        "get",
        "daemonsets,deployments",
        "-n",
        NAMESPACE,
        "-o",
        "name",
    ])?;
    assert_eq!(none.trim(), "", "the dry run created objects");

    cp.kubectl_ok(["apply", "-f", manifests])?;
    let got = cp.kubectl_ok([
        "get",
        "daemonset/tapestry-node",
        "-n",
        NAMESPACE,
        "-o",
        "json",
    ])?;
    let ds: Value = serde_json::from_str(&got)?;
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);

    // RBAC: the bindings reach the service accounts of the release namespace.
    let can = |who: &str, args: &[&str]| -> Result<bool> {
        let mut a = vec!["auth", "can-i", "--as", who];
        a.extend_from_slice(args);
        let out = cp.kubectl(&a)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
    };
    let controller = "system:serviceaccount:tapestry:tapestry-controller";
    assert!(can(controller, &["create", "leases", "-n", NAMESPACE])?);
    assert!(!can(controller, &["create", "leases", "-n", "default"])?);
    assert!(can(
        controller,
        &["create", "endpointslices", "-n", "default"]
    )?);
    assert!(!can(controller, &["create", "guests", "-n", "default"])?);
    assert!(can(NODE_SA, &["watch", "endpointslices", "-A"])?);
    assert!(can(NODE_SA, &["patch", "guests/status", "-n", "default"])?);
    assert!(!can(
        NODE_SA,
        &["create", "endpointslices", "-n", "default"]
    )?);
    assert!(!can(NODE_SA, &["create", "leases", "-n", NAMESPACE])?);

    // The admission policy, once the apiserver's informers have it: a daemon without the
    // node-name claim writes nothing.
    let msg = poll(
        Duration::from_secs(30),
        "the policy to deny a token without node name",
        || {
            let (ok, out) = daemon_kubectl(
                &cp,
                None,
                &["apply", "-f", "-"],
                &guest("probe", "node-a", "10.1.0.9"),
            )?;
            if ok {
                cp.kubectl_ok(["delete", "guest", "probe", "-n", "default"])?;
                return Ok(None);
            }
            Ok(out.contains("ValidatingAdmissionPolicy").then_some(out))
        },
    )?;
    assert!(
        msg.contains("must use a pod-bound token (node-name claim)"),
        "{msg}"
    );

    // Its own node's Guest: create, status, update, delete.
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-a"),
        &["apply", "-f", "-"],
        &guest("vm-a", "node-a", "10.1.0.1"),
    )?;
    assert!(ok, "the daemon of node-a could not create its guest: {out}");
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-a"),
        &[
            "patch",
            "guest",
            "vm-a",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
        ],
        "",
    )?;
    assert!(ok, "status of its own guest: {out}");
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-a"),
        &["label", "guest", "vm-a", "-n", "default", "app=web"],
        "",
    )?;
    assert!(ok, "labelling its own guest: {out}");

    // Another node's Guest: not created, not moved to, not changed, not deleted.
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-a"),
        &["apply", "-f", "-"],
        &guest("vm-b", "node-b", "10.1.0.2"),
    )?;
    assert!(!ok, "node-a created a guest of node-b");
    assert!(
        out.contains("may only write Guests with spec.nodeName node-a, not node-b"),
        "{out}"
    );
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-a"),
        &[
            "patch",
            "guest",
            "vm-a",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"spec":{"nodeName":"node-b"}}"#,
        ],
        "",
    )?;
    assert!(!ok, "node-a moved its guest to node-b");
    assert!(out.contains("not node-b"), "{out}");
    cp.apply(&guest("vm-b", "node-b", "10.1.0.2"))?; // the admin is not confined
    for args in [
        &["label", "guest", "vm-b", "-n", "default", "app=web"][..],
        &[
            "patch",
            "guest",
            "vm-b",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
        ][..],
        &["delete", "guest", "vm-b", "-n", "default"][..],
    ] {
        let (ok, out) = daemon_kubectl(&cp, Some("node-a"), args, "")?;
        assert!(!ok, "node-a could {args:?}");
        // The first failed rule speaks: a write names node-b as the
        // Guest's node, a delete as its old node.
        assert!(
            out.contains("'tapestry-node-guests'")
                && out.contains("node node-a may only")
                && out.contains("node-b"),
            "{args:?}: {out}"
        );
    }
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-b"),
        &["delete", "guest", "vm-b", "-n", "default"],
        "",
    )?;
    assert!(ok, "node-b could not delete its own guest: {out}");
    let (ok, out) = daemon_kubectl(
        &cp,
        Some("node-a"),
        &["delete", "guest", "vm-a", "-n", "default"],
        "",
    )?;
    assert!(ok, "node-a could not delete its own guest: {out}");
    Ok(())
}

/// A Pod of `node` with `annotations` (JSON for `kubectl apply -f -`).
fn pod(name: &str, node: &str, annotations: Value) -> String {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "lab/app"}]}})
    .to_string()
}

fn readiness_gates(cp: &ControlPlane, name: &str) -> Result<Vec<String>> {
    let out = cp.kubectl_ok([
        "get",
        "pod",
        "-n",
        "default",
        name,
        "-o",
        "jsonpath={.spec.readinessGates[*].conditionType}",
    ])?;
    Ok(out.split_whitespace().map(String::from).collect())
}

/// The chart's admission policies on a real kube-apiserver (v1.37: MutatingAdmissionPolicy is
/// GA and on by default, no flag): a VM pod, by either of the annotations the CNI plugin reads,
/// gets the readiness gate tapestry.dev/guest-ready once (kept beside its own gates); a plain
/// pod and an opted-out pod get none. The daemon's identity writes that condition on its own
/// node's pods only, and nothing else of their status.
#[test]
fn vm_pods_get_the_readiness_gate_and_daemons_write_only_their_condition() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = ControlPlane::start()?;
    cp.kubectl_ok(["apply", "-f", crd_file().to_str().context("crd path")?])?;
    cp.kubectl_ok([
        "apply",
        "-f",
        manifests_file().to_str().context("manifests")?,
    ])?;
    const GATE: &str = "tapestry.dev/guest-ready";
    let vm = serde_json::json!({"tapestry.dev/vm": "true"});
    // The policy takes effect once the apiserver's informers have it.
    poll(
        Duration::from_secs(30),
        "the readiness gate on a VM pod",
        || {
            // No kubelet: a pod goes at once only when forced.
            let _ = cp.kubectl([
                "delete",
                "pod",
                "-n",
                "default",
                "vm-probe",
                "--grace-period=0",
                "--force",
            ]);
            poll(Duration::from_secs(10), "vm-probe deleted", || {
                let out = cp.kubectl(["get", "pod", "-n", "default", "vm-probe"])?;
                Ok((!out.status.success()).then_some(()))
            })?;
            cp.apply(&pod("vm-probe", "node-a", vm.clone()))?;
            Ok((readiness_gates(&cp, "vm-probe")? == [GATE]).then_some(()))
        },
    )?;
    let kubevirt = serde_json::json!({"k8s.v1.cni.cncf.io/networks":
        r#"[{"name":"tapestry","namespace":"vms","cni-args":{"logicNetworkName":"default"}}]"#});
    cp.apply(&pod("vm-kubevirt", "node-a", kubevirt))?;
    assert_eq!(readiness_gates(&cp, "vm-kubevirt")?, [GATE]);
    // A pod that names the gate itself keeps one; other gates stay.
    let mut own = serde_json::from_str::<Value>(&pod("vm-own", "node-a", vm.clone()))?;
    own["spec"]["readinessGates"] =
        serde_json::json!([{"conditionType": "example.com/other"}, {"conditionType": GATE}]);
    cp.apply(&own.to_string())?;
    assert_eq!(readiness_gates(&cp, "vm-own")?, ["example.com/other", GATE]);
    let mut other = serde_json::from_str::<Value>(&pod("vm-other", "node-a", vm.clone()))?;
    other["spec"]["readinessGates"] = serde_json::json!([{"conditionType": "example.com/other"}]);
    cp.apply(&other.to_string())?;
    assert_eq!(
        readiness_gates(&cp, "vm-other")?,
        ["example.com/other", GATE]
    );
    for (name, annotations) in [
        ("plain", serde_json::json!({})),
        ("not-vm", serde_json::json!({"tapestry.dev/vm": "false"})),
        (
            "opted-out-kubevirt",
            serde_json::json!({"tapestry.dev/vm": "false", "k8s.v1.cni.cncf.io/networks":
                r#"[{"name":"tapestry","cni-args":{"logicNetworkName":"default"}}]"#}),
        ),
        (
            "secondary-net",
            serde_json::json!({"k8s.v1.cni.cncf.io/networks": r#"[{"name":"other","interface":"pod1"}]"#}),
        ),
    ] {
        cp.apply(&pod(name, "node-a", annotations))?;
        assert!(readiness_gates(&cp, name)?.is_empty(), "{name} got a gate");
    }

    // The daemon of node-a writes the condition on its node's pod.
    let condition = |status: &str| {
        format!(
            r#"{{"status":{{"conditions":[{{"type":"{GATE}","status":"{status}","reason":"GuestReady"}}]}}}}"#
        )
    };
    let patch = |node: &str, pod: &str, body: &str| {
        daemon_kubectl(
            &cp,
            Some(node),
            &[
                "patch",
                "pod",
                pod,
                "-n",
                "default",
                "--subresource=status",
                "--type=strategic",
                "-p",
                body,
            ],
            "",
        )
    };
    let (ok, out) = patch("node-a", "vm-probe", &condition("True"))?;
    assert!(ok, "node-a could not write its pod's condition: {out}");
    let got = cp.kubectl_ok([
        "get",
        "pod",
        "-n",
        "default",
        "vm-probe",
        "-o",
        &format!("jsonpath={{.status.conditions[?(@.type==\"{GATE}\")].status}}"),
    ])?;
    assert_eq!(got, "True");
    // Not another node's pod, not another condition, not the phase.
    let (ok, out) = patch("node-b", "vm-probe", &condition("False"))?;
    assert!(!ok, "node-b wrote a pod of node-a");
    assert!(
        out.contains("may only write the status of pods on its own node"),
        "{out}"
    );
    let (ok, out) = patch(
        "node-a",
        "vm-probe",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    )?;
    assert!(!ok, "node-a wrote the pod's Ready");
    assert!(
        out.contains("may only change a pod's tapestry.dev/guest-ready condition"),
        "{out}"
    );
    let (ok, out) = patch("node-a", "vm-probe", r#"{"status":{"phase":"Failed"}}"#)?;
    assert!(!ok, "node-a wrote the pod's phase: {out}");
    Ok(())
}
