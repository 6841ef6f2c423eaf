//! The envtest-style control plane of `tapestry_tests::k8s`: a real etcd + kube-apiserver (+
//! kube-controller-manager) built by `scripts/build-k8s.sh`. Skipped (or failed under `CI=...`)
//! when the binaries are missing. Needs no root.

use std::{net::Ipv4Addr, thread, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;
use tapestry_tests::{
    k8s::{self, ControlPlane, Identity, NODE, NODE_NAME},
    poll,
};

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("parsing JSON: {text}"))
}

#[test]
fn apiserver_version_services_and_rbac() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let cp = ControlPlane::start_with(&[Identity::new("alice", "alice", &["developers"])])?;
    let want = k8s::kubernetes_version()?;

    // /version reports the stamped release, and so does kubectl.
    let version = json(&cp.kubectl_ok(["get", "--raw", "/version"])?)?;
    assert_eq!(version["gitVersion"], want.as_str(), "{version}");
    assert_eq!(version["major"], "1", "{version}");
    assert!(want.starts_with(&format!("v1.{}.", version["minor"].as_str().unwrap_or("?"))));
    let kubectl = json(&cp.kubectl_ok(["version", "-o", "json"])?)?;
    assert_eq!(
        kubectl["clientVersion"]["gitVersion"],
        want.as_str(),
        "{kubectl}"
    );
    assert_eq!(
        kubectl["serverVersion"]["gitVersion"],
        want.as_str(),
        "{kubectl}"
    );

    // A ClusterIP Service gets an address from --service-cluster-ip-range.
    cp.kubectl_ok(["create", "service", "clusterip", "web", "--tcp=80:8080"])?;
    let svc = json(&cp.kubectl_ok(["get", "svc", "web", "-o", "json"])?)?;
    let ip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .context("no clusterIP")?
        .parse()?;
    assert_eq!(
        &ip.octets()[..2],
        &[10, 96],
        "clusterIP {ip} outside {}",
        k8s::SERVICE_CIDR
    );
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(svc["spec"]["selector"]["app"], "web");

    // Tokens authenticate as the configured users and groups.
    let who = json(&String::from_utf8(
        cp.kubectl_as(NODE, ["auth", "whoami", "-o", "json"])?
            .stdout,
    )?)?;
    assert_eq!(
        who["status"]["userInfo"]["username"],
        format!("system:node:{NODE_NAME}").as_str(),
        "{who}"
    );
    assert!(
        who["status"]["userInfo"]["groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g == "system:nodes")),
        "{who}"
    );
    let alice = json(&String::from_utf8(
        cp.kubectl_as("alice", ["auth", "whoami", "-o", "json"])?
            .stdout,
    )?)?;
    assert_eq!(alice["status"]["userInfo"]["username"], "alice", "{alice}");

    // Authorization is on: a node may not create namespaces, nor may an unbound user list pods;
    // the admin may.
    let denied = cp.kubectl_as(NODE, ["create", "namespace", "from-node"])?;
    assert!(!denied.status.success(), "a node created a namespace");
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("forbidden"), "unexpected error: {stderr}");
    let denied = cp.kubectl_as("alice", ["get", "pods", "-A"])?;
    assert!(!denied.status.success(), "an unbound user listed pods");
    cp.kubectl_ok(["create", "namespace", "from-admin"])?;

    // ValidatingAdmissionPolicy (GA) is enforced.
    cp.apply(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: no-port-81}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE, UPDATE], resources: [services]}
  validations:
  - expression: "!object.spec.ports.exists(p, p.port == 81)"
    message: port 81 is reserved
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: no-port-81}
spec:
  policyName: no-port-81
  validationActions: [Deny]
"#,
    )?;
    // The policy takes effect once the apiserver's informers see it.
    let msg = poll(
        Duration::from_secs(30),
        "the policy to deny port 81",
        || {
            let out = cp.kubectl(["create", "service", "clusterip", "p81", "--tcp=81:81"])?;
            if out.status.success() {
                cp.kubectl_ok(["delete", "service", "p81"])?;
                return Ok(None);
            }
            Ok(Some(String::from_utf8_lossy(&out.stderr).into_owned()))
        },
    )?;
    assert!(msg.contains("port 81 is reserved"), "{msg}");
    Ok(())
}

#[test]
fn controller_manager_creates_and_collects_endpointslices() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let mut cp = ControlPlane::start()?;
    cp.start_controller_manager()?;
    cp.kubectl_ok(["create", "service", "clusterip", "web", "--tcp=80:8080"])?;
    let uid = cp.kubectl_ok(["get", "svc", "web", "-o", "jsonpath={.metadata.uid}"])?;

    // No pod matches app=web (there is no kubelet): the controller still creates an empty slice.
    let slice = poll(Duration::from_secs(60), "an EndpointSlice for web", || {
        let list = json(&cp.kubectl_ok([
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "json",
        ])?)?;
        Ok(list["items"].as_array().and_then(|i| i.first()).cloned())
    })?;
    assert_eq!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io",
        "{slice}"
    );
    assert_eq!(slice["addressType"], "IPv4", "{slice}");
    // No pods: no endpoints, and no ports (they are resolved from the pods' containers).
    for field in ["endpoints", "ports"] {
        assert!(
            slice[field].as_array().is_none_or(|e| e.is_empty()),
            "{field}: {slice}"
        );
    }
    let owner = &slice["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Service", "{slice}");
    assert_eq!(owner["uid"], uid.as_str(), "{slice}");

    // The garbage collector deletes the slice with its Service.
    let name = slice["metadata"]["name"].as_str().context("slice name")?;
    cp.kubectl_ok(["delete", "service", "web", "--wait=false"])?;
    poll(
        Duration::from_secs(60),
        "the garbage collector to delete the slice",
        || {
            let out = cp.kubectl(["get", "endpointslice", name, "-o", "name"])?;
            Ok(
                (!out.status.success()
                    && String::from_utf8_lossy(&out.stderr).contains("NotFound"))
                .then_some(()),
            )
        },
    )?;
    Ok(())
}

#[test]
fn two_control_planes_at_once() -> Result<()> {
    tapestry_tests::require_k8s!(Ok(()));
    let a = thread::spawn(ControlPlane::start);
    let b = thread::spawn(ControlPlane::start);
    let a = a.join().expect("thread a")?;
    let b = b.join().expect("thread b")?;
    assert_ne!(a.server_url(), b.server_url());
    assert_ne!(a.ca_pem()?, b.ca_pem()?);

    a.kubectl_ok(["create", "namespace", "only-in-a"])?;
    b.kubectl_ok(["create", "namespace", "only-in-b"])?;
    let in_a = a.kubectl_ok(["get", "namespaces", "-o", "name"])?;
    let in_b = b.kubectl_ok(["get", "namespaces", "-o", "name"])?;
    assert!(
        in_a.contains("namespace/only-in-a") && !in_a.contains("only-in-b"),
        "{in_a}"
    );
    assert!(
        in_b.contains("namespace/only-in-b") && !in_b.contains("only-in-a"),
        "{in_b}"
    );

    // Separate PKI: a's admin kubeconfig does not trust b's serving certificate.
    let cross = std::process::Command::new(k8s::binary("kubectl")?)
        .arg(format!(
            "--kubeconfig={}",
            a.kubeconfig_path(k8s::ADMIN)?.display()
        ))
        .arg(format!("--server={}", b.server_url()))
        .args(["get", "--raw", "/readyz"])
        .output()?;
    assert!(!cross.status.success(), "a's kubeconfig was accepted by b");

    let dirs = [a.dir().to_path_buf(), b.dir().to_path_buf()];
    drop(a);
    drop(b);
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    Ok(())
}
