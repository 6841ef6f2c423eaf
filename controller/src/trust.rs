//! Which Guests the cluster can trust: a Guest is published only when what backs it agrees with
//! it. A node daemon's identity may write Guests (of its own node, as the chart's admission
//! policy `tapestry-node-guests` enforces), so a compromised node could otherwise put any address
//! under any labels, in any namespace: a Guest in kube-system labelled like kube-dns would join
//! the cluster DNS Service's endpoints.
//!
//! - **A pod's Guest** (an owner reference of kind Pod, or `spec.podRef`) is published only if
//!   that pod exists in the Guest's namespace with that uid, runs on the Guest's `spec.nodeName`,
//!   has every address of the Guest among its `status.podIPs`, and has every label of the Guest
//!   with the same value. So a Service that selects the Guest selects its pod too, at the pod's
//!   own address: the Guest can add nothing a node's kubelet could not already report for a pod
//!   of that node. (Labels are a subset, not equal: the daemon copies them, and a label the pod
//!   gained and the Guest not yet only narrows which Services see the Guest.)
//! - **A Guest no pod backs** (a VM outside Kubernetes) is published only if it carries the
//!   annotation `tapestry.dev/registered-by` naming an identity that is not a node's. The chart's
//!   admission policy `tapestry-guest-registrar` makes that annotation the name of whoever set or
//!   changed it, and denies it (and every pod-less Guest) to the node identity, so a node cannot
//!   forge it. `metadata.managedFields` was not used: its manager names are whatever the client
//!   says.
//!
//! The rules are pure functions of the Guest and its pod (from the controller's Pod cache), so
//! a Guest that becomes consistent again is published on the next reconcile its change or its
//! pod's change triggers.

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tapestry_k8s::{Guest, names::annotations};

/// The pod a Guest says it runs in: its name (in the Guest's namespace) and uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodClaim {
    pub name: String,
    pub uid: String,
}

/// Why a Guest is not published. The message is the Event's note; [`Refusal::label`] is the
/// metric's label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its pod references disagree: {0}")]
    AmbiguousPod(String),
    #[error("its pod reference {pod} has no uid")]
    PodUidMissing { pod: String },
    #[error("its pod {pod} does not exist")]
    PodMissing { pod: String },
    #[error("its pod {pod} has uid {found}, not the Guest's {uid}: the pod was replaced")]
    PodReplaced {
        pod: String,
        uid: String,
        found: String,
    },
    #[error("it is on node {guest_node}, its pod {pod} on {pod_node}")]
    WrongNode {
        pod: String,
        guest_node: String,
        pod_node: String,
    },
    #[error("its pod {pod} has no IP yet")]
    PodHasNoIp { pod: String },
    #[error("its address {ip} is not one of its pod {pod}'s ({pod_ips})")]
    AddressNotPods {
        pod: String,
        ip: String,
        pod_ips: String,
    },
    #[error("its label {key}={value} is not its pod {pod}'s")]
    LabelNotPods {
        pod: String,
        key: String,
        value: String,
    },
    #[error(
        "no pod backs it and it has no {annotation} annotation (set by an operator, not a node)",
        annotation = annotations::REGISTERED_BY
    )]
    Unregistered,
    #[error("no pod backs it and it was registered by a node identity ({user})")]
    RegisteredByNode { user: String },
}

impl Refusal {
    /// The check that failed, as the Event's action. kube's event recorder folds an Event into
    /// the previous one of the same action and reason (a series, keeping the first note), so a
    /// Guest refused for another reason gets an Event of its own.
    pub fn action(&self) -> &'static str {
        match self {
            Refusal::AmbiguousPod(_) | Refusal::PodUidMissing { .. } => "CheckPodReference",
            Refusal::PodMissing { .. } | Refusal::PodReplaced { .. } => "CheckPod",
            Refusal::WrongNode { .. } => "CheckNode",
            Refusal::PodHasNoIp { .. } | Refusal::AddressNotPods { .. } => "CheckAddresses",
            Refusal::LabelNotPods { .. } => "CheckLabels",
            Refusal::Unregistered | Refusal::RegisteredByNode { .. } => "CheckRegistrar",
        }
    }

    /// The `reason` label of `tapestry_controller_guests_not_published_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::AmbiguousPod(_) => "ambiguous_pod",
            Refusal::PodUidMissing { .. } => "pod_uid_missing",
            Refusal::PodMissing { .. } => "pod_missing",
            Refusal::PodReplaced { .. } => "pod_replaced",
            Refusal::WrongNode { .. } => "wrong_node",
            Refusal::PodHasNoIp { .. } => "pod_has_no_ip",
            Refusal::AddressNotPods { .. } => "address_not_pods",
            Refusal::LabelNotPods { .. } => "labels_not_pods",
            Refusal::Unregistered => "unregistered",
            Refusal::RegisteredByNode { .. } => "registered_by_node",
        }
    }
}

/// The pod a Guest claims: from its owner reference of kind Pod (what the daemon and the
/// admission policy use) and its `spec.podRef`, which must agree when both are there. `None`:
/// no pod backs it.
pub fn pod_claim(guest: &Guest) -> Result<Option<PodClaim>, Refusal> {
    let owners: Vec<_> = guest
        .owner_references()
        .iter()
        .filter(|o| o.kind == "Pod" && o.api_version == "v1")
        .collect();
    if owners.len() > 1 {
        return Err(Refusal::AmbiguousPod(format!(
            "{} owner references of kind Pod",
            owners.len()
        )));
    }
    let owner = owners.first();
    let pod_ref = guest.spec.pod_ref.as_ref();
    match (owner, pod_ref) {
        (None, None) => Ok(None),
        (Some(o), None) => Ok(Some(PodClaim {
            name: o.name.clone(),
            uid: o.uid.clone(),
        })),
        (None, Some(r)) => match &r.uid {
            Some(uid) => Ok(Some(PodClaim {
                name: r.name.clone(),
                uid: uid.clone(),
            })),
            None => Err(Refusal::PodUidMissing {
                pod: r.name.clone(),
            }),
        },
        (Some(o), Some(r)) => {
            if o.name != r.name || r.uid.as_ref().is_some_and(|u| *u != o.uid) {
                return Err(Refusal::AmbiguousPod(format!(
                    "owner {} ({}), spec.podRef {} ({})",
                    o.name,
                    o.uid,
                    r.name,
                    r.uid.as_deref().unwrap_or("no uid")
                )));
            }
            Ok(Some(PodClaim {
                name: o.name.clone(),
                uid: o.uid.clone(),
            }))
        }
    }
}

/// Whether a user name is a node's: a kubelet's. (The daemon's service account cannot hold
/// the annotation at all: the admission policy denies it.)
fn is_node_identity(user: &str) -> bool {
    user.starts_with("system:node:")
}

fn same_address(a: &str, b: &str) -> bool {
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether `guest` may be published, with `pod_named` looking a pod of the Guest's namespace up
/// by name (in the controller: its Pod cache).
pub fn check(
    guest: &Guest,
    pod_named: impl FnOnce(&str) -> Option<Arc<Pod>>,
) -> Result<(), Refusal> {
    let Some(claim) = pod_claim(guest)? else {
        return match guest.annotations().get(annotations::REGISTERED_BY) {
            None => Err(Refusal::Unregistered),
            Some(user) if user.trim().is_empty() => Err(Refusal::Unregistered),
            Some(user) if is_node_identity(user) => {
                Err(Refusal::RegisteredByNode { user: user.clone() })
            }
            Some(_) => Ok(()),
        };
    };
    let pod_name = claim.name.clone();
    let Some(pod) = pod_named(&claim.name) else {
        return Err(Refusal::PodMissing { pod: pod_name });
    };
    let found = pod.metadata.uid.clone().unwrap_or_default();
    if found != claim.uid {
        return Err(Refusal::PodReplaced {
            pod: pod_name,
            uid: claim.uid,
            found,
        });
    }
    // Hook for live migration: while a guest moves, its Guest names the target node (and may
    // carry the target pod's address) before the pod record says so. A migration record that
    // names the source and target pods is what may excuse the node and address checks below;
    // until one exists, nothing does.
    let pod_node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    if pod_node != guest.spec.node_name {
        return Err(Refusal::WrongNode {
            pod: pod_name,
            guest_node: guest.spec.node_name.clone(),
            pod_node: if pod_node.is_empty() {
                "no node".into()
            } else {
                pod_node
            },
        });
    }
    let status = pod.status.as_ref();
    let mut pod_ips: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    if pod_ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
    {
        pod_ips.push(ip);
    }
    if pod_ips.is_empty() {
        return Err(Refusal::PodHasNoIp { pod: pod_name });
    }
    if let Some(ip) = guest
        .spec
        .ips
        .iter()
        .find(|ip| !pod_ips.iter().any(|p| same_address(ip, p)))
    {
        return Err(Refusal::AddressNotPods {
            pod: pod_name,
            ip: ip.clone(),
            pod_ips: pod_ips.join(", "),
        });
    }
    let pod_labels = pod.labels();
    if let Some((key, value)) = guest
        .labels()
        .iter()
        .find(|(k, v)| pod_labels.get(*k) != Some(*v))
    {
        return Err(Refusal::LabelNotPods {
            pod: pod_name,
            key: key.clone(),
            value: value.clone(),
        });
    }
    Ok(())
}

/// What of a Pod [`check`] reads, all a cached Pod keeps: name, namespace, uid, labels, node and
/// addresses. At a cluster's scale of pods, the rest would be most of the controller's memory.
pub fn slim_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.generation = None;
    meta.generate_name = None;
    pod.spec = Some(PodSpec {
        node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ..PodSpec::default()
    });
    pod.status = Some(PodStatus {
        pod_ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        pod_ips: pod.status.as_ref().and_then(|s| s.pod_ips.clone()),
        ..PodStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::core::v1::{PodIP, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    };
    use tapestry_k8s::{GuestPodRef, GuestSpec};

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A pod `vm-1` (uid `pod-uid`) on node-a at 10.22.0.5, labelled app=web, tier=a.
    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("vm-1".into()),
                namespace: Some("default".into()),
                uid: Some("pod-uid".into()),
                labels: Some(map(&[("app", "web"), ("tier", "a")])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.22.0.5".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "10.22.0.5".into(),
                    },
                    PodIP {
                        ip: "fd00::5".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    /// The daemon's Guest of [`pod`]: owner reference and podRef, the pod's labels and address.
    fn guest() -> Guest {
        let mut g = Guest::new(
            "vm-1",
            GuestSpec {
                node_name: "node-a".into(),
                pod_ref: Some(GuestPodRef {
                    name: "vm-1".into(),
                    uid: Some("pod-uid".into()),
                }),
                ips: vec!["10.22.0.5".into()],
                mac: "52:54:00:00:00:01".into(),
                tap: "tap0".into(),
                ports: vec![],
                readiness_probe: None,
            },
        );
        g.metadata.namespace = Some("default".into());
        g.metadata.labels = Some(map(&[("app", "web"), ("tier", "a")]));
        g.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: "vm-1".into(),
            uid: "pod-uid".into(),
            ..Default::default()
        }]);
        g
    }

    fn with_pod(g: &Guest, p: Pod) -> Result<(), Refusal> {
        check(g, |name| {
            (p.metadata.name.as_deref() == Some(name)).then(|| Arc::new(p.clone()))
        })
    }

    #[test]
    fn a_pods_guest_that_agrees_with_its_pod_is_published() {
        assert_eq!(with_pod(&guest(), pod()), Ok(()));
        // A subset of the labels, the other family's address, an IPv6 address written longer.
        let mut g = guest();
        g.metadata.labels = Some(map(&[("app", "web")]));
        assert_eq!(with_pod(&g, pod()), Ok(()));
        g.spec.ips = vec!["fd00:0:0::5".into()];
        assert_eq!(with_pod(&g, pod()), Ok(()));
        // Only the owner reference, or only a podRef with uid.
        let mut g = guest();
        g.spec.pod_ref = None;
        assert_eq!(with_pod(&g, pod()), Ok(()));
        let mut g = guest();
        g.metadata.owner_references = None;
        assert_eq!(with_pod(&g, pod()), Ok(()));
    }

    #[test]
    fn a_pods_guest_is_refused_when_its_pod_disagrees() {
        let g = guest();
        assert_eq!(
            check(&g, |_| None),
            Err(Refusal::PodMissing { pod: "vm-1".into() })
        );
        let mut p = pod();
        p.metadata.uid = Some("other-uid".into());
        assert!(matches!(with_pod(&g, p), Err(Refusal::PodReplaced { .. })));
        let mut p = pod();
        p.spec.as_mut().unwrap().node_name = Some("node-b".into());
        let r = with_pod(&g, p).unwrap_err();
        assert_eq!(r.label(), "wrong_node");
        assert_eq!(
            r.to_string(),
            "it is on node node-a, its pod vm-1 on node-b"
        );
        let mut p = pod();
        p.status = None;
        assert_eq!(
            with_pod(&g, p),
            Err(Refusal::PodHasNoIp { pod: "vm-1".into() })
        );
        // Its own address (a kube-dns look-alike's), beside the pod's.
        let mut g2 = guest();
        g2.spec.ips = vec!["10.22.0.5".into(), "10.96.0.10".into()];
        let r = with_pod(&g2, pod()).unwrap_err();
        assert_eq!(r.label(), "address_not_pods");
        assert!(r.to_string().contains("10.96.0.10"), "{r}");
        // A label the pod lacks, or has with another value.
        let mut g3 = guest();
        g3.metadata.labels = Some(map(&[("k8s-app", "kube-dns")]));
        assert!(matches!(
            with_pod(&g3, pod()),
            Err(Refusal::LabelNotPods { .. })
        ));
        g3.metadata.labels = Some(map(&[("app", "db")]));
        assert_eq!(with_pod(&g3, pod()).unwrap_err().label(), "labels_not_pods");
    }

    #[test]
    fn pod_references_must_agree() {
        let mut g = guest();
        g.spec.pod_ref.as_mut().unwrap().name = "vm-2".into();
        assert_eq!(pod_claim(&g).unwrap_err().label(), "ambiguous_pod");
        let mut g = guest();
        g.spec.pod_ref.as_mut().unwrap().uid = Some("other".into());
        assert_eq!(pod_claim(&g).unwrap_err().label(), "ambiguous_pod");
        let mut g = guest();
        let second = g.metadata.owner_references.as_ref().unwrap()[0].clone();
        g.metadata.owner_references.as_mut().unwrap().push(second);
        assert_eq!(pod_claim(&g).unwrap_err().label(), "ambiguous_pod");
        // A podRef without uid and no owner: which pod is unknown.
        let mut g = guest();
        g.metadata.owner_references = None;
        g.spec.pod_ref.as_mut().unwrap().uid = None;
        assert_eq!(
            check(&g, |_| Some(Arc::new(pod()))),
            Err(Refusal::PodUidMissing { pod: "vm-1".into() })
        );
        // Owners of other kinds do not make a pod's Guest.
        let mut g = guest();
        g.spec.pod_ref = None;
        g.metadata.owner_references.as_mut().unwrap()[0].kind = "VirtualMachine".into();
        assert_eq!(pod_claim(&g), Ok(None));
    }

    #[test]
    fn a_podless_guest_needs_a_registrar_that_is_not_a_node() {
        let mut g = guest();
        g.metadata.owner_references = None;
        g.spec.pod_ref = None;
        let no_pods = |_: &str| -> Option<Arc<Pod>> { panic!("a pod-less Guest looks no pod up") };
        assert_eq!(check(&g, no_pods), Err(Refusal::Unregistered));
        let mut annotate = |v: &str| {
            g.metadata.annotations = Some(map(&[(annotations::REGISTERED_BY, v)]));
            check(&g, no_pods)
        };
        assert_eq!(annotate(" "), Err(Refusal::Unregistered));
        assert_eq!(
            annotate("system:node:node-a").unwrap_err().label(),
            "registered_by_node"
        );
        assert_eq!(annotate("alice"), Ok(()));
    }

    #[test]
    fn a_slim_pod_keeps_what_the_check_reads() {
        let mut p = pod();
        p.metadata.annotations = Some(map(&[("big", "x")]));
        p.spec.as_mut().unwrap().containers = vec![Default::default()];
        slim_pod(&mut p);
        assert_eq!(p.metadata.annotations, None);
        assert!(p.spec.as_ref().unwrap().containers.is_empty());
        assert_eq!(with_pod(&guest(), p), Ok(()));
    }
}
