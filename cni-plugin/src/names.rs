//! Names other components, runtimes and users rely on; change none of them lightly.

/// The CNI `type` of this plugin and the name of its binary.
pub const PLUGIN_TYPE: &str = "tapestry-cni";

/// Environment variable that overrides the daemon's socket (tests, odd installs).
pub const SOCKET_ENV: &str = "TAPESTRY_SOCKET";

/// Pod annotation that marks a VM pod ("true") or opts a KubeVirt pod out ("false").
pub const VM_ANNOTATION: &str = "tapestry.dev/vm";

/// KubeVirt sets this on every virt-launcher pod; its value is the VMI's name.
pub const KUBEVIRT_DOMAIN_ANNOTATION: &str = "kubevirt.io/domain";

/// CNI_ARGS key that marks a VM pod.
pub const VM_ARG: &str = "TAPESTRY_VM";

/// KubeVirt's tap for the pod's `eth0` under a tap network binding.
pub const DEFAULT_TAP_NAME: &str = "tap0";

/// KubeVirt's `qemu` user and group (uid/gid 107) that open the tap in virt-launcher.
pub const DEFAULT_TAP_OWNER: u32 = 107;
