//! Names that other components, manifests and clusters depend on: once released, they stay.

/// API group of Tapestry's custom resources.
pub const API_GROUP: &str = "tapestry.dev";
/// The one served and stored version.
pub const API_VERSION: &str = "v1alpha1";
/// `apiVersion` of Tapestry's objects.
pub const GROUP_VERSION: &str = "tapestry.dev/v1alpha1";
/// Kind of the custom resource for a KVM guest.
pub const GUEST_KIND: &str = "Guest";
/// Name of the Guest CustomResourceDefinition (`<plural>.<group>`).
pub const GUEST_CRD: &str = "guests.tapestry.dev";

/// The controller's binary, Deployment and Lease name.
pub const CONTROLLER: &str = "tapestry-controller";
/// Field manager of everything the controller writes (server-side apply).
pub const CONTROLLER_FIELD_MANAGER: &str = "tapestry-controller";
/// Name of the coordination.k8s.io Lease the controller replicas elect a leader with.
pub const CONTROLLER_LEASE: &str = "tapestry-controller";
/// Field manager of the node daemon (`tapestryd`) when it writes Guests.
pub const DAEMON_FIELD_MANAGER: &str = "tapestryd";

/// Value of [`labels::MANAGED_BY`] on the EndpointSlices the controller writes. Shaped like the
/// built-in controllers' values (`<controller>.<domain>`): a label value cannot hold a `/`, so
/// `tapestry.dev/controller` would be refused by the API server.
pub const MANAGED_BY: &str = "tapestry-controller.tapestry.dev";
/// Value of [`labels::MANAGED_BY`] on the built-in EndpointSlice controller's (pod) slices.
pub const BUILTIN_MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// Label keys, Kubernetes' own and Tapestry's.
pub mod labels {
    /// Who manages an EndpointSlice.
    pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
    /// The Service an EndpointSlice belongs to.
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
    /// On the EndpointSlices of a headless Service, or on a Service: kube-proxy (and tapestryd)
    /// leave such a Service alone.
    pub const HEADLESS: &str = "service.kubernetes.io/headless";
    /// On a Service that another proxy serves: kube-proxy (and tapestryd) leave it alone.
    pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
    /// A Node's zone, copied to its endpoints.
    pub const ZONE: &str = "topology.kubernetes.io/zone";
}

/// Condition types of a Guest.
pub mod conditions {
    /// The guest's tap exists and its programs are attached.
    pub const ATTACHED: &str = "Attached";
    /// The datapath has seen the guest use its address (DHCP bound, ARP, or traffic with its own
    /// source): its endpoints are ready.
    pub const READY: &str = "Ready";
}

/// The pod condition (and readiness gate) that carries a VM pod's guest readiness: the node
/// daemon writes it, the admission policy `tapestry-vm-readiness-gate` puts it in VM pods'
/// `spec.readinessGates`, and the kubelet then counts it in the pod's Ready (so the built-in
/// EndpointSlice controller publishes the guest's readiness).
pub const GUEST_READY_CONDITION: &str = "tapestry.dev/guest-ready";

/// Pod annotations that Tapestry reads.
pub mod annotations {
    /// `"true"` on a VM pod (what the CNI plugin and the admission policy look for).
    pub const VM: &str = "tapestry.dev/vm";
    /// TCP ports (comma-separated) the guest must accept a connection on to be ready.
    pub const READINESS_TCP_PORTS: &str = "tapestry.dev/readiness-tcp-ports";
    /// On a Guest no pod backs: who registered it (a user name). The chart's admission policy
    /// `tapestry-guest-registrar` makes it the writer's own name whenever it is set or changed,
    /// and never lets a node identity write it; the controller publishes a pod-less Guest only
    /// with it.
    pub const REGISTERED_BY: &str = "tapestry.dev/registered-by";
    /// On a live migration's target VM pod: the source VM pod's name (same namespace). Its
    /// guest arrives with the source's address and MAC.
    pub const MIGRATION_SOURCE: &str = "tapestry.dev/migration-source";
}

/// What KubeVirt puts on its virt-launcher pods (kubevirt/kubevirt
/// staging/src/kubevirt.io/api/core/v1/types.go).
pub mod kubevirt {
    /// Annotation on a migration's target pod: the VirtualMachineInstanceMigration's name.
    pub const MIGRATION_JOB_NAME: &str = "kubevirt.io/migrationJobName";
    /// Label on a migration's target pod: the VirtualMachineInstanceMigration's uid.
    pub const MIGRATION_JOB_UID: &str = "kubevirt.io/migrationJobUID";
    /// Label on every virt-launcher pod: its VMI's uid (the source and the target share it).
    pub const CREATED_BY: &str = "kubevirt.io/created-by";
}

/// Field manager of the node daemon's migration records (a Guest's `status.migration`).
pub const MIGRATION_FIELD_MANAGER: &str = "tapestryd-migration";

/// The reason of the Events the controller records on a Guest it does not publish.
pub const GUEST_NOT_PUBLISHED: &str = "GuestNotPublished";
/// The reason of the Event on a Guest published again after a refusal.
pub const GUEST_PUBLISHED: &str = "GuestPublished";

#[cfg(test)]
mod tests {
    use super::*;

    /// A Kubernetes label value: at most 63 characters, alphanumerics, `-`, `_` and `.`, starting
    /// and ending with an alphanumeric.
    fn is_label_value(v: &str) -> bool {
        let ends_ok = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
        v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && ends_ok(v.chars().next())
            && ends_ok(v.chars().last())
    }

    #[test]
    fn label_values_are_valid() {
        for v in [MANAGED_BY, BUILTIN_MANAGED_BY, CONTROLLER] {
            assert!(is_label_value(v), "{v:?} is not a valid label value");
        }
        assert!(!is_label_value("tapestry.dev/controller"));
    }

    #[test]
    fn names_agree() {
        assert_eq!(GROUP_VERSION, format!("{API_GROUP}/{API_VERSION}"));
        assert_eq!(GUEST_CRD, format!("guests.{API_GROUP}"));
    }
}
