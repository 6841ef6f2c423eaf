//! Kubernetes mode's Guest objects: one per VM pod this node attached (from the endpoint
//! registry that the CNI plugin fills), owned by its Pod (so Kubernetes' garbage collector
//! removes it with the pod, even if this node is gone), with the pod's labels and declared ports,
//! and this node's Guests that no longer have an attachment deleted.
//!
//! The registry tells the publisher of every change (a `watch` channel), so nothing polls it; a
//! sweep every [`GUEST_GC_INTERVAL`] finds this node's Guests that nothing backs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams},
};
use serde_json::json;
use tapestry_api::types::{EndpointInfo, GuestPhase};
use tapestry_k8s::{
    ConditionStatus, Guest, GuestCondition, GuestConditionType, GuestPodRef, GuestPort,
    GuestReadinessProbe, GuestSpec, GuestStatus, names,
};
use tracing::{debug, info, warn};

use super::Endpoints;

/// How soon a failed round (apiserver away, RBAC) is tried again.
pub const GUEST_RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// How soon an attachment whose Pod was not found is looked at again (the runtime may run CNI
/// ADD before the Pod is visible to this client, or the pod is not a Kubernetes pod at all).
pub const POD_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often this node's Guests are listed to find stale ones.
pub const GUEST_GC_INTERVAL: Duration = Duration::from_secs(10);

/// What was last written for one Guest.
#[derive(Debug, Clone, PartialEq)]
struct Published {
    labels: BTreeMap<String, String>,
    spec: GuestSpec,
    owner_uid: Option<String>,
    ready: bool,
    reason: String,
    since: Time,
}

/// Publishes this node's Guests and removes the stale ones, until the task is aborted. Failures
/// (apiserver away, RBAC) are logged and retried; they never touch the datapath.
pub async fn publish_guests(
    client: Client,
    node_name: String,
    endpoints: Arc<Endpoints>,
) -> Result<()> {
    let mut changes = endpoints.subscribe();
    let mut published: HashMap<(String, String), Published> = HashMap::new();
    let mut pods: HashMap<(String, String), Option<Arc<Pod>>> = HashMap::new();
    let mut last_error: Option<String> = None;
    let mut next_gc = tokio::time::Instant::now();
    info!(node = %node_name, "publishing this node's Guests");
    loop {
        changes.mark_unchanged();
        let registry = endpoints.clone();
        let attached: Vec<EndpointInfo> = tokio::task::spawn_blocking(move || registry.list())
            .await
            .context("listing the endpoints")?
            .into_iter()
            .filter(|e| e.request.vm.is_some() && e.request.pod.is_some())
            .collect();
        let collect_garbage = tokio::time::Instant::now() >= next_gc;
        let result = sync_guests(
            &client,
            &endpoints,
            &node_name,
            &attached,
            &mut published,
            &mut pods,
            collect_garbage,
        )
        .await;
        if collect_garbage {
            next_gc = tokio::time::Instant::now() + GUEST_GC_INTERVAL;
        }
        let retry = match result {
            Ok(complete) => {
                if last_error.take().is_some() {
                    info!("Guests in sync again");
                }
                (!complete).then(|| tokio::time::Instant::now() + POD_RETRY_INTERVAL)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(&msg) {
                    warn!(error = %msg, "publishing Guests failed; retrying");
                    last_error = Some(msg);
                }
                Some(tokio::time::Instant::now() + GUEST_RETRY_INTERVAL)
            }
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(next_gc) => {}
            () = tokio::time::sleep_until(retry.unwrap_or(next_gc)), if retry.is_some() => {}
        }
    }
}

async fn sync_guests(
    client: &Client,
    endpoints: &Endpoints,
    node_name: &str,
    attached: &[EndpointInfo],
    published: &mut HashMap<(String, String), Published>,
    pods: &mut HashMap<(String, String), Option<Arc<Pod>>>,
    collect_garbage: bool,
) -> Result<bool> {
    let mut complete = true;
    let mut wanted: HashSet<(String, String)> = HashSet::new();
    for e in attached {
        let (Some(pod_ref), Some(vm)) = (e.request.pod.as_ref(), e.request.vm.as_ref()) else {
            continue;
        };
        let key = (pod_ref.namespace.clone(), pod_ref.name.clone());
        wanted.insert(key.clone());
        let pod = match pods.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Api::<Pod>::namespaced(client.clone(), &pod_ref.namespace)
                    .get_opt(&pod_ref.name)
                    .await
                    .with_context(|| format!("reading pod {}/{}", key.0, key.1))?
                    .map(Arc::new);
                pods.insert(key.clone(), p.clone());
                p
            }
        };
        // The pod must be the one the CNI plugin attached (same uid when the runtime said).
        let pod = pod.filter(|p| match (&pod_ref.uid, &p.metadata.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        });
        let Some(pod) = pod else {
            // Gone already (its Guest goes with it), or not a Kubernetes pod.
            debug!(pod = %format!("{}/{}", key.0, key.1), "no pod for this VM attachment");
            pods.remove(&key);
            complete = false;
            continue;
        };
        let ready = e.guest_phase == Some(GuestPhase::Ready);
        let reason = e.guest_ready_reason.clone().unwrap_or_default();
        let tcp_ports = readiness_tcp_ports(&pod);
        endpoints.set_probe_ports(&e.request.container_id, tcp_ports.clone());
        if !endpoints.probed(&e.request.container_id) {
            // Not looked at yet (a restarted daemon must not report its ready guests not
            // ready): the first probe's verdict comes with a change notification.
            continue;
        }
        let spec = GuestSpec {
            node_name: node_name.to_owned(),
            pod_ref: Some(GuestPodRef {
                name: pod_ref.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ips: vec![vm.guest_ip.split('/').next().unwrap_or_default().to_owned()],
            mac: vm.guest_mac.to_string(),
            tap: vm.tap.clone(),
            ports: declared_ports(&pod),
            readiness_probe: (!tcp_ports.is_empty()).then(|| GuestReadinessProbe {
                tcp_ports: tcp_ports.iter().map(|p| i32::from(*p)).collect(),
            }),
        };
        let labels = pod.labels().clone();
        let owner_uid = pod.metadata.uid.clone();
        let previous = published.get(&key);
        let since = match previous {
            Some(p) if p.ready == ready => p.since.clone(),
            _ => Time(Timestamp::now()),
        };
        let next = Published {
            labels,
            spec,
            owner_uid,
            ready,
            reason,
            since,
        };
        if previous == Some(&next) {
            continue;
        }
        write_guest(client, &key.0, &key.1, &pod, &next).await?;
        if previous.is_none_or(|p| {
            (p.ready, &p.reason, &p.since) != (next.ready, &next.reason, &next.since)
        }) {
            write_pod_condition(client, &key.0, &key.1, &next).await?;
        }
        debug!(guest = %format!("{}/{}", key.0, key.1), ready, "Guest written");
        published.insert(key, next);
    }
    pods.retain(|k, _| wanted.contains(k));
    // Detached since the last round: delete now rather than at the next sweep.
    let gone: Vec<(String, String)> = published
        .keys()
        .filter(|k| !wanted.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        delete_guest(client, &key, None).await?;
        published.remove(&key);
    }
    if collect_garbage {
        let mine = Api::<Guest>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
            .await
            .context("listing this node's Guests")?;
        for g in mine {
            let key = (g.namespace().unwrap_or_default(), g.name_any());
            if !wanted.contains(&key) {
                delete_guest(client, &key, g.metadata.uid.clone()).await?;
            }
        }
    }
    Ok(complete)
}

/// Deletes a Guest of this node (only the one with `uid`, when given); gone already is fine.
async fn delete_guest(client: &Client, key: &(String, String), uid: Option<String>) -> Result<()> {
    let api = Api::<Guest>::namespaced(client.clone(), &key.0);
    let deleted = tapestry_k8s::delete_unless_replaced(&api, &key.1, uid.as_deref())
        .await
        .with_context(|| format!("deleting Guest {}/{}", key.0, key.1))?;
    if deleted {
        info!(guest = %format!("{}/{}", key.0, key.1), "Guest deleted: no attachment on this node");
    }
    Ok(())
}

/// The pod's `tapestry.dev/readiness-tcp-ports` (comma-separated ports; what does not parse as
/// a port is left out).
fn readiness_tcp_ports(pod: &Pod) -> Vec<u16> {
    let mut ports: Vec<u16> = pod
        .annotations()
        .get(names::annotations::READINESS_TCP_PORTS)
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The pod's `tapestry.dev/guest-ready` condition, as the guest's probe says: the readiness
/// gate the admission policy put on a VM pod, so the kubelet's Ready (and the built-in
/// EndpointSlice) follows the guest. Server-side apply on the status subresource owns only this
/// condition (conditions are a map keyed by type); the kubelet keeps conditions it does not own.
async fn write_pod_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    p: &Published,
) -> Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let pp = PatchParams::apply(names::DAEMON_FIELD_MANAGER).force();
    let body = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "status": {"conditions": [{
            "type": names::GUEST_READY_CONDITION,
            "status": if p.ready { "True" } else { "False" },
            "reason": if p.ready { "GuestReady" } else { "GuestNotReady" },
            "message": p.reason,
            "lastTransitionTime": p.since,
        }]},
    });
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .with_context(|| {
            format!(
                "applying condition {} of pod {namespace}/{name}",
                names::GUEST_READY_CONDITION
            )
        })?;
    debug!(pod = %format!("{namespace}/{name}"), ready = p.ready, "guest-ready condition written");
    Ok(())
}

/// The pod's named container ports: what a Service's named targetPort resolves against.
fn declared_ports(pod: &Pod) -> Vec<GuestPort> {
    let mut ports: Vec<GuestPort> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(GuestPort {
                name: p.name.clone()?,
                port: p.container_port,
                protocol: p
                    .protocol
                    .as_deref()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_default(),
            })
        })
        .collect();
    ports.sort_by(|a, b| a.name.cmp(&b.name));
    ports.dedup_by(|a, b| a.name == b.name);
    ports
}

async fn write_guest(
    client: &Client,
    namespace: &str,
    name: &str,
    pod: &Pod,
    p: &Published,
) -> Result<()> {
    let api = Api::<Guest>::namespaced(client.clone(), namespace);
    let pp = PatchParams::apply(names::DAEMON_FIELD_MANAGER).force();
    let owner = p.owner_uid.as_ref().map(|uid| OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.name_any(),
        uid: uid.clone(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    });
    let guest = Guest {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(p.labels.clone()),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: p.spec.clone(),
        status: None,
    };
    let mut body = serde_json::to_value(&guest)?;
    body["apiVersion"] = json!(Guest::api_version(&()));
    body["kind"] = json!(Guest::kind(&()));
    api.patch(name, &pp, &Patch::Apply(&body))
        .await
        .with_context(|| format!("applying Guest {namespace}/{name}"))?;
    let status = GuestStatus {
        conditions: vec![
            GuestCondition {
                type_: GuestConditionType::Attached,
                status: ConditionStatus::True,
                reason: Some("TapAttached".into()),
                message: Some(format!(
                    "{} is cross-connected to the pod interface",
                    p.spec.tap
                )),
                last_transition_time: None,
            },
            GuestCondition {
                type_: GuestConditionType::Ready,
                status: if p.ready {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                reason: Some(
                    if p.ready {
                        "GuestUp"
                    } else {
                        "WaitingForGuest"
                    }
                    .into(),
                ),
                message: (!p.reason.is_empty()).then(|| p.reason.clone()),
                last_transition_time: Some(p.since.clone()),
            },
        ],
        observed_generation: None,
        // status.migration is the migration follower's (its own field manager).
        migration: None,
    };
    let body = json!({
        "apiVersion": Guest::api_version(&()),
        "kind": Guest::kind(&()),
        "status": status,
    });
    api.patch_status(name, &pp, &Patch::Apply(&body))
        .await
        .with_context(|| format!("applying the status of Guest {namespace}/{name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn readiness_ports_come_from_the_annotation() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "vm", "annotations": {
                "tapestry.dev/readiness-tcp-ports": " 8080, 22,x,0,22,70000"}}
        }))
        .unwrap();
        assert_eq!(readiness_tcp_ports(&pod), [22, 8080]);
        let plain: Pod = serde_json::from_value(json!({"metadata": {"name": "vm"}})).unwrap();
        assert!(readiness_tcp_ports(&plain).is_empty());
    }

    #[test]
    fn declared_ports_are_the_named_container_ports() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "vm"},
            "spec": {"containers": [
                {"name": "compute", "ports": [
                    {"name": "http", "containerPort": 80},
                    {"containerPort": 9999},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}
            ]}
        }))
        .unwrap();
        let ports = declared_ports(&pod);
        assert_eq!(ports.len(), 2);
        assert_eq!(
            (ports[0].name.as_str(), ports[0].port, ports[0].protocol),
            ("dns", 53, tapestry_api::types::Protocol::Udp)
        );
        assert_eq!(ports[1].name, "http");
    }
}
