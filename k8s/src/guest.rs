//! The Guest custom resource: a KVM guest on a node, as its node daemon sees it.
//!
//! The node daemon writes one Guest per guest (named after its pod, in the pod's namespace) and
//! keeps its conditions current; the controller turns Guests into EndpointSlices for the Services
//! that select them.
//!
//! **Labels live in `metadata.labels`.** The daemon copies the pod's labels there, so a Service
//! selects a guest exactly as it selects the pod (`kubectl expose pod <vm-pod>`), and label
//! selectors work natively everywhere: `kubectl get guests -l app=web`, watches, the controller's
//! matching. A copy under `spec` would need a matcher of its own and could drift.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::{CustomResource, CustomResourceExt, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A KVM guest on a node: where it runs, its addresses and the ports it declares.
// clippy takes each printcolumn's repeated `type_ = "string"` for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tapestry.dev",
    version = "v1alpha1",
    kind = "Guest",
    namespaced,
    status = "GuestStatus",
    derive = "PartialEq",
    shortname = "gst",
    category = "tapestry",
    doc = "A KVM guest on a node (a VM in a pod, or outside pods), written by the node's tapestryd. Its metadata.labels are its pod's labels, so Services select guests as they select pods.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "IP", type_ = "string", json_path = ".spec.ips[0]"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase")]
pub struct GuestSpec {
    /// The node the guest runs on now (it changes when the guest migrates).
    pub node_name: String,
    /// The pod the guest runs in (in the Guest's namespace); absent for a guest outside pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ref: Option<GuestPodRef>,
    /// The guest's addresses, one per IP family ("10.22.0.5", "fd00::5").
    #[schemars(length(min = 1, max = 2))]
    pub ips: Vec<String>,
    /// The guest's MAC (the pod interface's MAC for a VM in a pod).
    pub mac: String,
    /// The tap the guest owns, in its pod's network namespace.
    pub tap: String,
    /// Ports the guest serves; a Service's named targetPort resolves against these names, as
    /// against a container's ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<GuestPort>,
    /// How the node daemon decides that the guest is ready, besides its answering ARP for its
    /// address (always probed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<GuestReadinessProbe>,
}

/// What the node daemon probes, besides ARP, for the guest to be ready.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestReadinessProbe {
    /// TCP ports the guest must accept a connection on (from its pod's
    /// `tapestry.dev/readiness-tcp-ports` annotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub tcp_ports: Vec<i32>,
}

/// The pod a guest runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestPodRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A port the guest serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestPort {
    /// What a Service's targetPort names ("http").
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocol of a port: the one vocabulary of api, daemon, CLI and CRD.
pub use tapestry_api::state::Protocol;

/// What the node daemon observed of the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestStatus {
    /// `Attached` and `Ready`, one of each at most.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<GuestCondition>,
    /// The spec generation these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Set on a live migration's target: where the guest came from and when it went live
    /// here. The newest switch-over among the Guests of one address says where that address
    /// lives; every node routes it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<GuestMigration>,
}

/// A guest's arrival by live migration, as the target node's daemon saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestMigration {
    /// The source VM pod (same namespace).
    pub source_pod: String,
    pub source_node: String,
    /// This Guest's node.
    pub target_node: String,
    /// `Incoming` (the target is dark: the guest still runs at the source) or `Live` (the
    /// guest sent its first frame from this pod's tap, QEMU's announce after the switch-over).
    pub phase: MigrationPhase,
    /// When the target's datapath saw the guest's first frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_time: Option<MicroTime>,
    /// From the target pod's attachment to the switch-over, in milliseconds: how long the
    /// target stayed dark (the migration's copy phase, as the datapath saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dark_ms: Option<i64>,
    /// From the switch-over to the first frame the network sent the guest here (through the
    /// target pod's host veth), in milliseconds: how long the live guest waited for the
    /// network to follow it, as the target's datapath saw it. Unset until that frame came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blackout_ms: Option<i64>,
}

/// The phases of [`GuestMigration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum MigrationPhase {
    Incoming,
    Live,
}

/// One condition of a guest, shaped like metav1.Condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestCondition {
    #[serde(rename = "type")]
    pub type_: GuestConditionType,
    pub status: ConditionStatus,
    /// CamelCase reason for the last transition ("DhcpBound", "TapCreated").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// The condition types of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum GuestConditionType {
    /// The tap exists and the guest's programs are attached.
    Attached,
    /// The guest uses its address: its endpoints are ready.
    Ready,
}

/// `True`, `False` or `Unknown`, as in every Kubernetes condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl Guest {
    /// The condition of type `type_`, if the daemon reported one.
    pub fn condition(&self, type_: GuestConditionType) -> Option<&GuestCondition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }

    /// Ready=True: the guest answers its readiness probe.
    pub fn is_ready(&self) -> bool {
        self.condition(GuestConditionType::Ready)
            .is_some_and(|c| c.status == ConditionStatus::True)
    }

    /// Being deleted (a finalizer holds it): its endpoints are terminating.
    pub fn is_terminating(&self) -> bool {
        self.meta().deletion_timestamp.is_some()
    }
}

/// The generated Guest CustomResourceDefinition.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    Guest::crd()
}

/// [`crd`] as YAML, ready for `kubectl apply -f -`.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd()).expect("a CRD always serializes")
}

#[cfg(test)]
mod tests {
    use kube::ResourceExt;
    use serde_json::json;

    use super::*;
    use crate::names;

    #[test]
    fn names_match_the_generated_crd() {
        let crd = crd();
        assert_eq!(crd.metadata.name.as_deref(), Some(names::GUEST_CRD));
        assert_eq!(crd.spec.group, names::API_GROUP);
        assert_eq!(crd.spec.names.kind, names::GUEST_KIND);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.versions.len(), 1);
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, names::API_VERSION);
        assert!(v.served && v.storage);
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        assert_eq!(Guest::api_version(&()), names::GROUP_VERSION);
        let columns: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Node", "IP", "Ready", "Age"]);
        let selectable = v.selectable_fields.as_ref().unwrap();
        assert_eq!(selectable[0].json_path, ".spec.nodeName");
    }

    #[test]
    fn schema_has_the_fields_and_validation() {
        let crd = serde_json::to_value(crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let spec = &schema["spec"];
        let mut required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(required, ["ips", "mac", "nodeName", "tap"]);
        assert_eq!(spec["properties"]["ips"]["maxItems"], 2);
        let port = &spec["properties"]["ports"]["items"]["properties"];
        assert_eq!(port["port"]["maximum"], 65535.0);
        assert_eq!(port["protocol"]["enum"], json!(["TCP", "UDP", "SCTP"]));
        let conditions = &schema["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
        let condition = &conditions["items"]["properties"];
        assert_eq!(condition["type"]["enum"], json!(["Attached", "Ready"]));
        assert_eq!(
            condition["status"]["enum"],
            json!(["True", "False", "Unknown"])
        );
        assert_eq!(condition["lastTransitionTime"]["format"], "date-time");
    }

    #[test]
    fn guest_round_trips_as_the_daemon_writes_it() {
        let g: Guest = serde_json::from_value(json!({
            "apiVersion": "tapestry.dev/v1alpha1",
            "kind": "Guest",
            "metadata": {"name": "vm-1", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "node-a",
                "podRef": {"name": "vm-1", "uid": "1234"},
                "ips": ["10.22.0.5"],
                "mac": "52:54:00:12:34:56",
                "tap": "tap0",
                "ports": [{"name": "http", "port": 8080}]
            },
            "status": {"conditions": [
                {"type": "Attached", "status": "True", "reason": "TapCreated"},
                {"type": "Ready", "status": "True", "reason": "DhcpBound",
                 "lastTransitionTime": "2025-01-01T00:00:00Z"}
            ]}
        }))
        .unwrap();
        assert_eq!(g.spec.ports[0].protocol, Protocol::Tcp);
        assert!(g.is_ready());
        assert!(!g.is_terminating());
        assert_eq!(g.labels()["app"], "web");
        let back = serde_json::to_value(&g).unwrap();
        assert_eq!(back["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(back["spec"]["podRef"]["uid"], "1234");
        let again: Guest = serde_json::from_value(back).unwrap();
        assert_eq!(again, g);
    }

    #[test]
    fn readiness_needs_ready_true() {
        let mut g = Guest::new(
            "vm",
            GuestSpec {
                node_name: "n".into(),
                pod_ref: None,
                ips: vec!["10.0.0.1".into()],
                mac: "52:54:00:00:00:01".into(),
                tap: "tap0".into(),
                ports: vec![],
                readiness_probe: None,
            },
        );
        assert!(!g.is_ready());
        g.status = Some(GuestStatus {
            conditions: vec![GuestCondition {
                type_: GuestConditionType::Ready,
                status: ConditionStatus::False,
                reason: Some("WaitingForDhcp".into()),
                message: None,
                last_transition_time: None,
            }],
            observed_generation: None,
            migration: None,
        });
        assert!(!g.is_ready());
        g.status.as_mut().unwrap().conditions[0].status = ConditionStatus::True;
        assert!(g.is_ready());
    }

    #[test]
    fn crd_yaml_parses_back() {
        let yaml = crd_yaml();
        let parsed: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed["kind"], "CustomResourceDefinition");
        assert_eq!(parsed["metadata"]["name"], names::GUEST_CRD);
    }
}
