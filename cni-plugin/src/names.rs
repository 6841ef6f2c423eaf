//! Names other components, runtimes and users rely on; change none of them lightly.

/// The CNI `type` of this plugin and the name of its binary.
pub const PLUGIN_TYPE: &str = "tapestry-cni";

/// Environment variable that overrides the daemon's socket (tests, odd installs).
pub const SOCKET_ENV: &str = "TAPESTRY_SOCKET";

/// Pod annotation that marks a VM pod ("true") or keeps a pod out ("false").
pub const VM_ANNOTATION: &str = "tapestry.dev/vm";

/// KubeVirt sets this on every virt-launcher pod, whatever binding its VMI uses; its value is
/// the VMI's name, which an opted-in guest takes as its hostname.
pub const KUBEVIRT_DOMAIN_ANNOTATION: &str = "kubevirt.io/domain";

/// Multus's network selection annotation. KubeVirt lists in it, for each VMI interface whose
/// network binding plugin names a NetworkAttachmentDefinition, an element with that name.
pub const MULTUS_NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";

/// The NetworkAttachmentDefinition the Tapestry binding is registered with in the KubeVirt CR
/// (`spec.configuration.network.binding.tapestry.networkAttachmentDefinition`): how a
/// virt-launcher pod says that its VMI uses the binding.
pub const KUBEVIRT_BINDING_NAD: &str = "tapestry";

/// The `cni-args` key of a binding element: the VMI network the interface is on.
pub const KUBEVIRT_NETWORK_NAME_ARG: &str = "logicNetworkName";

/// CNI_ARGS key that marks a VM pod.
pub const VM_ARG: &str = "TAPESTRY_VM";

/// KubeVirt's tap for the pod's `eth0` under a tap network binding.
pub const DEFAULT_TAP_NAME: &str = "tap0";

/// KubeVirt's `qemu` user and group (uid/gid 107) that open the tap in virt-launcher.
pub const DEFAULT_TAP_OWNER: u32 = 107;
