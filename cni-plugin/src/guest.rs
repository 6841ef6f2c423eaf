//! VM pods: which pods are, and what their guest is handed.
//!
//! A guest owns the pod's IP and MAC. The plugin gives it a tap and tells the daemon the
//! guest's address, gateway, routes, DNS and hostname, which the daemon serves over DHCP.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tapestry_api::types::{DnsConfig, IncomingMigration, MacAddr, RouteSpec, VmAttachment};

use crate::{
    args::CniArgs,
    config::NetConf,
    error::{CniError, Result},
    interface::PodRoute,
    names::{
        KUBEVIRT_BINDING_NAD, KUBEVIRT_DOMAIN_ANNOTATION, KUBEVIRT_NETWORK_NAME_ARG,
        MULTUS_NETWORKS_ANNOTATION, VM_ANNOTATION, VM_ARG,
    },
    version::{CniResult, IpConfig},
};

/// Why a pod is a VM pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmSource {
    /// `vm.enabled` in the network config: a network for VMs only.
    Network,
    /// `TAPESTRY_VM=true` in CNI_ARGS.
    CniArgs,
    /// The pod annotation `tapestry.dev/vm: "true"`.
    Annotation,
    /// A KubeVirt VMI whose pod-network interface uses the Tapestry network binding plugin.
    KubeVirtBinding,
}

impl VmSource {
    pub fn describe(self) -> String {
        match self {
            VmSource::Network => "vm.enabled in the network config".into(),
            VmSource::CniArgs => format!("{VM_ARG}=true in CNI_ARGS"),
            VmSource::Annotation => format!("pod annotation {VM_ANNOTATION}"),
            VmSource::KubeVirtBinding => format!(
                "KubeVirt network binding {KUBEVIRT_BINDING_NAD} on the pod network \
                 (pod annotation {MULTUS_NETWORKS_ANNOTATION})"
            ),
        }
    }
}

/// Decides whether this pod is a VM pod: only when something asked for it. A virt-launcher pod
/// as such is not one (`kubevirt.io/domain` is on every one, also under masquerade or bridge
/// binding, which need `eth0` as it is). An explicit `tapestry.dev/vm: "false"` keeps a pod out,
/// but not on a VM-only network.
pub fn select(conf: &NetConf, args: &CniArgs) -> Option<VmSource> {
    if conf.vm.enabled {
        return Some(VmSource::Network);
    }
    if args.vm {
        return Some(VmSource::CniArgs);
    }
    let annotations = &conf.runtime_config.pod_annotations;
    match annotations
        .get(VM_ANNOTATION)
        .map(|v| v.trim().to_ascii_lowercase())
    {
        Some(v) if v == "true" => return Some(VmSource::Annotation),
        Some(v) if v == "false" => return None,
        _ => {}
    }
    annotations
        .get(MULTUS_NETWORKS_ANNOTATION)
        .is_some_and(|v| binds_pod_network(v))
        .then_some(VmSource::KubeVirtBinding)
}

/// One element of Multus's network selection annotation, as KubeVirt's virt-controller writes
/// it (pkg/network/multus/annotation.go): a secondary network has `interface`, a binding
/// plugin's NetworkAttachmentDefinition has `cni-args.logicNetworkName` instead.
#[derive(Deserialize)]
struct NetworkSelection {
    name: String,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default, rename = "cni-args")]
    cni_args: serde_json::Map<String, serde_json::Value>,
}

/// Whether the annotation holds the Tapestry binding's element for the pod network. The element
/// names the VMI network, not whether it is the pod network; a secondary network is listed in
/// the same annotation with the pod interface KubeVirt names after its hash, so an element for
/// a network listed that way is for a secondary interface, which this step does not serve.
/// A value that is not KubeVirt's JSON list (Multus also takes `a,b` by hand) selects nothing.
fn binds_pod_network(annotation: &str) -> bool {
    let Ok(selections) = serde_json::from_str::<Vec<NetworkSelection>>(annotation) else {
        return false;
    };
    let secondary: Vec<&str> = selections
        .iter()
        .filter_map(|s| s.interface.as_deref())
        .collect();
    selections.iter().any(|s| {
        let network = s
            .cni_args
            .get(KUBEVIRT_NETWORK_NAME_ARG)
            .and_then(|v| v.as_str());
        s.name == KUBEVIRT_BINDING_NAD
            && network.is_some_and(|n| !secondary.contains(&kubevirt_pod_interface(n).as_str()))
    })
}

/// The pod interface KubeVirt gives a secondary network: `pod` and the first 11 hex digits of
/// the SHA-256 of the VMI network's name (pkg/network/namescheme, GenerateHashedInterfaceName).
fn kubevirt_pod_interface(network: &str) -> String {
    let digest = Sha256::digest(network.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("pod{}", &hex[..11])
}

/// The guest's hostname: KubeVirt names the guest after the VMI (`kubevirt.io/domain`'s value),
/// not after the virt-launcher pod; other VM pods use the pod name.
pub fn hostname(conf: &NetConf, args: &CniArgs) -> Option<String> {
    conf.runtime_config
        .pod_annotations
        .get(KUBEVIRT_DOMAIN_ANNOTATION)
        .filter(|v| !v.is_empty())
        .cloned()
        .or_else(|| args.pod_name.clone())
}

/// The facts about the pod that the guest takes over.
pub struct GuestInputs<'a> {
    pub tap: &'a str,
    pub mac: MacAddr,
    pub mtu: u32,
    pub queues: u32,
    pub hostname: Option<String>,
    pub pod_ips: &'a [&'a IpConfig],
    pub prev: &'a CniResult,
    pub conf: &'a NetConf,
    /// The routes the primary set up in the pod (read before the pod interface gave up its
    /// address): they tell whether the pod's subnet is on-link (a bridge) or routed through
    /// the gateway (ptp, Calico), and the guest must see the same.
    pub pod_routes: &'a [PodRoute],
    /// A migration target's source ([`migration_source`]).
    pub migration_source: Option<IncomingMigration>,
}

/// Where a live migration's target pod's guest comes from: the source VM pod its
/// `tapestry.dev/migration-source` annotation names or, on a KubeVirt target pod (annotated
/// `kubevirt.io/migrationJobName`, which names no source), the job, from which the daemon finds
/// the source.
pub fn migration_source(conf: &NetConf) -> Option<IncomingMigration> {
    let annotation = |key: &str| {
        conf.runtime_config
            .pod_annotations
            .get(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(source_pod) = annotation(tapestry_k8s::names::annotations::MIGRATION_SOURCE) {
        return Some(IncomingMigration {
            source_pod,
            kubevirt_job: None,
            source_node: None,
        });
    }
    annotation(tapestry_k8s::names::kubevirt::MIGRATION_JOB_NAME).map(|job| IncomingMigration {
        source_pod: String::new(),
        kubevirt_job: Some(job),
        source_node: None,
    })
}

/// Puts the guest's address (`guest_ip`, from the daemon) in place of the primary's IPv4
/// address of `ifname` in the result, with the primary's prefix and gateway.
pub fn take_guest_address(result: &mut CniResult, ifname: &str, guest_ip: &str) -> Result<()> {
    let guest: Ipv4Addr = guest_ip
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            CniError::network(format!("the daemon gave the guest address {guest_ip:?}"))
        })?;
    let current: Vec<String> = result
        .pod_ips(ifname)
        .iter()
        .filter(|ip| matches!(ip.network(), IpNet::V4(_)))
        .map(|ip| ip.address.clone())
        .collect();
    let Some(primary) = current.first() else {
        return Err(CniError::network(format!(
            "the result has no IPv4 address of {ifname} to give the guest's"
        )));
    };
    let prefix = primary.split('/').nth(1).unwrap_or("32").to_owned();
    if let Some(ip) = result.ips.iter_mut().find(|ip| &ip.address == primary) {
        ip.address = format!("{guest}/{prefix}");
    }
    Ok(())
}

/// The guest's IPv4 address and gateway: the first IPv4 address the primary gave the pod.
pub fn guest_ipv4(pod_ips: &[&IpConfig]) -> Option<(IpNet, Option<Ipv4Addr>)> {
    pod_ips.iter().find_map(|ip| {
        let net = ip.network();
        matches!(net, IpNet::V4(_)).then(|| {
            let gw = match ip.gateway {
                Some(IpAddr::V4(gw)) => Some(gw),
                _ => None,
            };
            (net, gw)
        })
    })
}

pub fn attachment(inputs: GuestInputs<'_>) -> Result<VmAttachment> {
    let Some((mut guest_ip, _)) = guest_ipv4(inputs.pod_ips) else {
        return Err(CniError::InvalidConfig(
            "prevResult gives the pod interface no IPv4 address; a VM guest takes the pod's \
             IPv4 address over DHCP, so the primary plugin must assign one"
                .into(),
        ));
    };
    let mut routes = routes(inputs.prev);
    // A subnet the primary routes through the gateway (ptp, Calico) is not on-link for the
    // guest either: it gets a /32 and the routes, so it sends everything to the gateway as the
    // pod did. On a bridge the subnet stays on-link.
    if let IpNet::V4(net) = guest_ip {
        let routed_subnet = inputs.pod_routes.iter().find(|r| {
            r.gw.is_some()
                && r.prefix == net.prefix_len()
                && r.dst == net.network()
                && r.prefix < 32
        });
        if let Some(r) = routed_subnet {
            guest_ip = IpNet::V4(Ipv4Net::new(net.addr(), 32).expect("a /32 is valid"));
            let dst = format!("{}/{}", r.dst, r.prefix);
            if !routes.iter().any(|x| x.dst == dst) {
                routes.push(RouteSpec { dst, gw: r.gw });
            }
        }
    }
    Ok(VmAttachment {
        tap: inputs.tap.to_owned(),
        guest_mac: inputs.mac,
        guest_ip: guest_ip.to_string(),
        mtu: inputs.mtu,
        routes,
        dns: dns(inputs.conf, inputs.prev),
        hostname: inputs.hostname,
        queues: inputs.queues,
        migration: inputs.migration_source,
    })
}

/// prevResult's IPv4 routes other than the default one (the guest gets that from `gateway`).
fn routes(prev: &CniResult) -> Vec<RouteSpec> {
    prev.routes
        .iter()
        .filter(|r| !r.is_default())
        .filter_map(|r| {
            let dst: IpNet = r.dst.parse().ok()?;
            if !matches!(dst, IpNet::V4(_)) {
                return None;
            }
            let gw = match r.gw {
                Some(IpAddr::V4(gw)) => Some(gw),
                Some(IpAddr::V6(_)) => return None,
                None => None,
            };
            Some(RouteSpec {
                dst: dst.to_string(),
                gw,
            })
        })
        .collect()
}

/// DNS for the guest, most specific first: the pod's own (the runtime's `dns` capability, which
/// the kubelet fills from the pod's dnsPolicy), then the network config's `dns`, then
/// prevResult's. Lists are merged without duplicates; the first domain wins.
fn dns(conf: &NetConf, prev: &CniResult) -> DnsConfig {
    let mut out = DnsConfig::default();
    let mut add = |nameservers: &[String], search: &[String], domain: Option<&String>| {
        for ns in nameservers {
            if !out.nameservers.contains(ns) {
                out.nameservers.push(ns.clone());
            }
        }
        for s in search {
            if !out.search.contains(s) {
                out.search.push(s.clone());
            }
        }
        if out.domain.is_none() {
            out.domain = domain.filter(|d| !d.is_empty()).cloned();
        }
    };
    if let Some(rt) = &conf.runtime_config.dns {
        add(&rt.servers, &rt.searches, None);
    }
    if let Some(c) = &conf.dns {
        add(&c.nameservers, &c.search, c.domain.as_ref());
    }
    if let Some(p) = &prev.dns {
        add(&p.nameservers, &p.search, p.domain.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::version::{CniVersion, parse_result, tests as fixtures};

    fn conf(v: serde_json::Value) -> NetConf {
        NetConf::parse(&serde_json::to_vec(&v).unwrap()).unwrap()
    }

    fn annotated(annotations: serde_json::Value) -> NetConf {
        conf(json!({
            "cniVersion": "1.0.0", "name": "k8s",
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}
        }))
    }

    /// The annotations KubeVirt's virt-controller puts on a virt-launcher pod: the VMI's name and,
    /// when the VMI has interfaces that need it, Multus's network selection (`networks`).
    fn virt_launcher(networks: Option<serde_json::Value>, extra: serde_json::Value) -> NetConf {
        let mut annotations = json!({
            "kubevirt.io/domain": "vm1",
            "kubectl.kubernetes.io/default-container": "compute",
            "kubevirt.io/migrationTransportUnix": "true",
        });
        if let Some(n) = networks {
            annotations["k8s.v1.cni.cncf.io/networks"] = json!(n.to_string());
        }
        for (k, v) in extra.as_object().unwrap() {
            annotations[k] = v.clone();
        }
        annotated(annotations)
    }

    /// The element KubeVirt adds for an interface on VMI network `network` whose binding is
    /// registered with `networkAttachmentDefinition: <nad>`.
    fn binding(nad: &str, network: &str) -> serde_json::Value {
        json!({"name": nad, "namespace": "vms", "cni-args": {"logicNetworkName": network}})
    }

    #[test]
    fn plain_pods_are_not_vm_pods() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "k8s"}));
        assert_eq!(select(&c, &CniArgs::default()), None);
        let c = annotated(json!({"app": "web"}));
        assert_eq!(select(&c, &CniArgs::default()), None);
    }

    #[test]
    fn a_virt_launcher_pod_that_did_not_opt_in_is_not_a_vm_pod() {
        // Masquerade or bridge binding: only the VMI's name.
        let c = virt_launcher(None, json!({}));
        assert_eq!(select(&c, &CniArgs::default()), None);
        // Another binding plugin (passt's) on the pod network, and a secondary network.
        let c = virt_launcher(
            Some(json!([
                binding("netbindingpasst", "default"),
                {"name": "blue-nad", "namespace": "vms", "interface": "pod16477688c0e"}
            ])),
            json!({}),
        );
        assert_eq!(select(&c, &CniArgs::default()), None);
        // A plain secondary network whose NetworkAttachmentDefinition happens to be `tapestry`.
        let c = virt_launcher(
            Some(json!([{"name": "tapestry", "namespace": "vms", "interface": "pod16477688c0e"}])),
            json!({}),
        );
        assert_eq!(select(&c, &CniArgs::default()), None);
        // Multus's comma form, which KubeVirt never writes.
        let c = annotated(
            json!({"kubevirt.io/domain": "vm1", "k8s.v1.cni.cncf.io/networks": "tapestry"}),
        );
        assert_eq!(select(&c, &CniArgs::default()), None);
    }

    #[test]
    fn each_source_selects_a_vm_pod() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "vms", "vm": {"enabled": true}}));
        assert_eq!(select(&c, &CniArgs::default()), Some(VmSource::Network));

        let c = conf(json!({"cniVersion": "1.0.0", "name": "k8s"}));
        let args = CniArgs::parse("IgnoreUnknown=1;TAPESTRY_VM=true").unwrap();
        assert_eq!(select(&c, &args), Some(VmSource::CniArgs));

        let c = annotated(json!({"tapestry.dev/vm": "true"}));
        assert_eq!(select(&c, &CniArgs::default()), Some(VmSource::Annotation));
        let c = annotated(json!({"tapestry.dev/vm": "True"}));
        assert_eq!(select(&c, &CniArgs::default()), Some(VmSource::Annotation));
        // On a VMI's template annotations, which KubeVirt copies to the pod.
        let c = virt_launcher(None, json!({"tapestry.dev/vm": "true"}));
        assert_eq!(select(&c, &CniArgs::default()), Some(VmSource::Annotation));

        // The Tapestry binding on the pod network, whatever the VMI calls that network, next
        // to a secondary network with another binding.
        for pod_network in ["default", "pod-net"] {
            let c = virt_launcher(
                Some(json!([
                    binding("tapestry", pod_network),
                    {"name": "blue-nad", "namespace": "vms", "interface": "pod16477688c0e"},
                    binding("netbindingpasst", "blue")
                ])),
                json!({}),
            );
            assert_eq!(
                select(&c, &CniArgs::default()),
                Some(VmSource::KubeVirtBinding),
                "{pod_network}"
            );
        }
    }

    #[test]
    fn the_binding_on_a_secondary_network_only_is_not_the_pod_network() {
        // VMI network `blue` is a secondary network (KubeVirt's pod interface pod16477688c0e).
        let c = virt_launcher(
            Some(json!([
                {"name": "blue-nad", "namespace": "vms", "interface": "pod16477688c0e"},
                binding("tapestry", "blue")
            ])),
            json!({}),
        );
        assert_eq!(select(&c, &CniArgs::default()), None);
    }

    #[test]
    fn secondary_pod_interfaces_are_named_as_kubevirt_names_them() {
        // From KubeVirt's pkg/network/multus/annotation_test.go.
        assert_eq!(kubevirt_pod_interface("blue"), "pod16477688c0e");
        assert_eq!(kubevirt_pod_interface("red"), "podb1f51a511f1");
    }

    #[test]
    fn explicit_opt_out_beats_the_binding_but_not_a_vm_network() {
        let c = virt_launcher(
            Some(json!([binding("tapestry", "default")])),
            json!({"tapestry.dev/vm": "false"}),
        );
        assert_eq!(select(&c, &CniArgs::default()), None);
        let c = conf(json!({
            "cniVersion": "1.0.0", "name": "vms", "vm": {"enabled": true},
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"tapestry.dev/vm": "false"}}
        }));
        assert_eq!(select(&c, &CniArgs::default()), Some(VmSource::Network));
    }

    #[test]
    fn hostname_is_the_vmi_name_for_kubevirt_else_the_pod_name() {
        let args =
            CniArgs::parse("K8S_POD_NAME=virt-launcher-vm1-abcde;K8S_POD_NAMESPACE=ns").unwrap();
        assert_eq!(
            hostname(&annotated(json!({"kubevirt.io/domain": "vm1"})), &args).as_deref(),
            Some("vm1")
        );
        assert_eq!(
            hostname(&annotated(json!({})), &args).as_deref(),
            Some("virt-launcher-vm1-abcde")
        );
    }

    #[test]
    fn a_migration_target_is_tapestrys_annotation_or_a_kubevirt_job() {
        assert_eq!(migration_source(&annotated(json!({}))), None);
        // KubeVirt's target pod names its job, not its source: the daemon finds the source.
        let kubevirt = migration_source(&annotated(json!({
            "kubevirt.io/migrationJobName": "kubevirt-evacuation-x7k2p",
            "kubevirt.io/domain": "vm1"})))
        .unwrap();
        assert_eq!(kubevirt.source_pod, "");
        assert_eq!(
            kubevirt.kubevirt_job.as_deref(),
            Some("kubevirt-evacuation-x7k2p")
        );
        // Tapestry's own annotation names the source and wins.
        let both = migration_source(&annotated(json!({
            "kubevirt.io/migrationJobName": "job",
            "tapestry.dev/migration-source": " virt-launcher-vm1-abcde "})))
        .unwrap();
        assert_eq!(both.source_pod, "virt-launcher-vm1-abcde");
        assert_eq!(both.kubevirt_job, None);
        assert_eq!(
            migration_source(&annotated(
                json!({"tapestry.dev/migration-source": "  ", "kubevirt.io/migrationJobName": ""})
            )),
            None
        );
    }

    #[test]
    fn a_subnet_routed_through_the_gateway_gives_the_guest_a_slash_32() {
        // What ptp leaves in the pod: the subnet via the gateway, not on-link.
        let c = conf(json!({"cniVersion": "0.4.0", "name": "k8s"}));
        let prev = parse_result(&fixtures::bridge_0_4_0(), CniVersion::V0_4_0).unwrap();
        let ips: Vec<&IpConfig> = prev.ips.iter().collect();
        let gw = Ipv4Addr::new(10, 22, 0, 1);
        let pod_routes = [PodRoute {
            dst: Ipv4Addr::new(10, 22, 0, 0),
            prefix: 16,
            gw: Some(gw),
        }];
        let vm = attachment(GuestInputs {
            tap: "tap0",
            mac: "8a:7a:4c:0e:21:95".parse().unwrap(),
            mtu: 1450,
            queues: 1,
            hostname: None,
            pod_ips: &ips,
            prev: &prev,
            conf: &c,
            pod_routes: &pod_routes,
            migration_source: None,
        })
        .unwrap();
        assert_eq!(vm.guest_ip, "10.22.0.5/32");
        assert!(vm.routes.contains(&RouteSpec {
            dst: "10.22.0.0/16".into(),
            gw: Some(gw)
        }));
        // On a bridge (the subnet on-link: no such route) the prefix stays.
        let on_link = [PodRoute {
            dst: Ipv4Addr::new(10, 96, 0, 0),
            prefix: 12,
            gw: Some(gw),
        }];
        let vm = attachment(GuestInputs {
            tap: "tap0",
            mac: "8a:7a:4c:0e:21:95".parse().unwrap(),
            mtu: 1450,
            queues: 1,
            hostname: None,
            pod_ips: &ips,
            prev: &prev,
            conf: &c,
            pod_routes: &on_link,
            migration_source: None,
        })
        .unwrap();
        assert_eq!(vm.guest_ip, "10.22.0.5/16");
    }

    #[test]
    fn attachment_from_a_bridge_result_with_every_dns_source() {
        let c = conf(json!({
            "cniVersion": "0.4.0", "name": "k8s",
            "dns": {"nameservers": ["10.0.0.53", "10.96.0.10"], "search": ["corp.example"], "domain": "cluster.local"},
            "runtimeConfig": {"dns": {"servers": ["10.96.0.10"], "searches": ["ns.svc.cluster.local", "svc.cluster.local"], "options": ["ndots:5"]}}
        }));
        let prev = parse_result(&fixtures::bridge_0_4_0(), CniVersion::V0_4_0).unwrap();
        let ips: Vec<&IpConfig> = prev.ips.iter().collect();
        let vm = attachment(GuestInputs {
            tap: "tap0",
            mac: "8a:7a:4c:0e:21:95".parse().unwrap(),
            mtu: 1450,
            queues: 2,
            hostname: Some("vm1".into()),
            pod_ips: &ips,
            prev: &prev,
            conf: &c,
            pod_routes: &[],
            migration_source: None,
        })
        .unwrap();
        assert_eq!(vm.guest_ip, "10.22.0.5/16");
        assert_eq!(vm.guest_mac.to_string(), "8a:7a:4c:0e:21:95");
        assert_eq!((vm.mtu, vm.queues), (1450, 2));
        assert_eq!(
            vm.routes,
            vec![RouteSpec {
                dst: "10.96.0.0/12".into(),
                gw: None
            }]
        );
        assert_eq!(vm.dns.nameservers, vec!["10.96.0.10", "10.0.0.53"]);
        assert_eq!(
            vm.dns.search,
            vec![
                "ns.svc.cluster.local",
                "svc.cluster.local",
                "corp.example",
                "default.svc.cluster.local"
            ]
        );
        assert_eq!(vm.dns.domain.as_deref(), Some("cluster.local"));
        assert_eq!(vm.hostname.as_deref(), Some("vm1"));
    }

    #[test]
    fn dual_stack_guest_gets_the_ipv4_address_and_ipv4_routes() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "k8s"}));
        let prev = parse_result(&fixtures::ptp_1_0_0(), CniVersion::V1_0_0).unwrap();
        let ips: Vec<&IpConfig> = prev.ips.iter().rev().collect();
        let (ip, gw) = guest_ipv4(&ips).unwrap();
        assert_eq!(ip.to_string(), "10.1.1.2/24");
        assert_eq!(gw, Some("10.1.1.1".parse().unwrap()));
        let vm = attachment(GuestInputs {
            tap: "tap0",
            mac: "4a:22:6e:91:0c:3d".parse().unwrap(),
            mtu: 1500,
            queues: 1,
            hostname: None,
            pod_ips: &ips,
            prev: &prev,
            conf: &c,
            pod_routes: &[],
            migration_source: None,
        })
        .unwrap();
        assert_eq!(
            vm.routes,
            vec![RouteSpec {
                dst: "10.244.0.0/16".into(),
                gw: Some("10.1.1.1".parse().unwrap())
            }]
        );
        assert_eq!(vm.dns, DnsConfig::default());
    }

    #[test]
    fn a_guest_needs_an_ipv4_address() {
        let c = conf(json!({"cniVersion": "1.0.0", "name": "k8s"}));
        let prev = parse_result(&fixtures::ptp_1_0_0(), CniVersion::V1_0_0).unwrap();
        let v6_only: Vec<&IpConfig> = vec![&prev.ips[1]];
        let err = attachment(GuestInputs {
            tap: "tap0",
            mac: "4a:22:6e:91:0c:3d".parse().unwrap(),
            mtu: 1500,
            queues: 1,
            hostname: None,
            pod_ips: &v6_only,
            prev: &prev,
            conf: &c,
            pod_routes: &[],
            migration_source: None,
        })
        .unwrap_err();
        assert_eq!(err.code(), 7);
    }
}
