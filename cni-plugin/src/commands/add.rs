//! ADD: register the pod with tapestryd; for a VM pod, first hand the pod's network to a tap.
//!
//! Order, and what each failure undoes:
//! 1. pod netns: read CNI_IFNAME (MAC, MTU, veth peer); VM pod: create the tap, set its MTU and
//!    bring it up, move the IPv4 addresses off the pod interface (the guest owns them now).
//! 2. host netns: find the host side of the pod's veth.
//! 3. tapestryd: add the endpoint (it attaches the datapath, and for a guest its
//!    cross-connect and DHCP).
//!
//! A failure in 2 or 3 deletes the tap and puts the addresses back; a failure inside 1 undoes
//! the part of 1 already done. The result is prevResult passed on, plus the tap.

use rtnetlink::Handle;
use serde_json::Value;
use tapestry_api::types::{EndpointInfo, EndpointRequest};

use super::Attachment;
use crate::{
    error::{CniError, Result},
    guest::{self, GuestInputs},
    interface::{self, AddressSnapshot, LinkFacts},
    netns,
    tap::{self, TapSpec},
    version::{self, CniResult, Interface, IpConfig},
};

pub fn add(att: &Attachment) -> Result<Value> {
    let Some(raw_prev) = att.conf.prev_result.as_ref() else {
        return Err(CniError::InvalidConfig(
            "tapestry-cni must be chained after a primary plugin: ADD came without prevResult. \
             List tapestry-cni after the plugin that creates the pod's interface (bridge, ptp, \
             Calico, ...) in the conflist's `plugins`"
                .into(),
        ));
    };
    let mut result = version::parse_result(raw_prev, att.version)?;
    let netns_path = att
        .netns
        .as_deref()
        .expect("the dispatcher requires CNI_NETNS for ADD");
    if netns::is_own(netns_path)? {
        return Err(CniError::InvalidEnv {
            var: "CNI_NETNS",
            msg: format!(
                "{} is the plugin's own network namespace, not a container's",
                netns_path.display()
            ),
        });
    }

    let pod_ips: Vec<IpConfig> = result.pod_ips(&att.ifname).into_iter().cloned().collect();
    let vm = guest::select(&att.conf, &att.args);
    let tap_spec = vm.map(|source| {
        tracing::info!(
            "{} is a VM pod ({}): creating tap {}",
            att.describe(),
            source.describe(),
            att.conf.vm.tap_name
        );
        TapSpec {
            name: att.conf.vm.tap_name.clone(),
            uid: att.conf.vm.uid,
            gid: att.conf.vm.gid,
            queues: att.conf.vm.queues,
        }
    });
    if tap_spec.is_some() && guest::guest_ipv4(&pod_ips.iter().collect::<Vec<_>>()).is_none() {
        return Err(CniError::InvalidConfig(format!(
            "prevResult gives {} no IPv4 address; a VM guest takes the pod's IPv4 address over \
             DHCP, so the primary plugin must assign one",
            att.ifname
        )));
    }

    let pod = netns::run_in(netns_path, || {
        netns::with_netlink(async |handle| {
            prepare_pod(&handle, &att.ifname, tap_spec.as_ref(), att.conf.vm.mtu).await
        })
    })?;

    let info = match register(att, &result, &pod, &pod_ips) {
        Ok(info) => info,
        Err(err) => {
            undo(att, &pod);
            return Err(err);
        }
    };
    if let Some(vm) = info.request.vm.as_ref().filter(|v| v.migration.is_some()) {
        // A migration target's guest keeps its source's address: that is this pod's IP now,
        // for the runtime and the kubelet (the primary's own address is unused).
        guest::take_guest_address(&mut result, &att.ifname, &vm.guest_ip)?;
    }

    if let Some(guest) = &pod.guest {
        result.interfaces.push(Interface {
            name: guest.tap.name.clone(),
            mac: guest.tap.mac.map(|m| m.to_string()),
            mtu: Some(guest.mtu),
            sandbox: Some(netns_path.display().to_string()),
            socket_path: None,
            pci_id: None,
            extra: Default::default(),
        });
    }
    Ok(version::encode_result(&result, att.version))
}

/// What ADD did in the pod's namespace.
#[derive(Debug)]
struct PodSide {
    link: LinkFacts,
    guest: Option<GuestTap>,
}

#[derive(Debug)]
struct GuestTap {
    tap: LinkFacts,
    mtu: u32,
    /// The pod interface's IPv4 addresses (and routes), now the guest's.
    taken: AddressSnapshot,
}

async fn prepare_pod(
    handle: &Handle,
    ifname: &str,
    tap_spec: Option<&TapSpec>,
    mtu_override: Option<u32>,
) -> Result<PodSide> {
    let Some(link) = interface::link_by_name(handle, ifname).await? else {
        return Err(CniError::network(format!(
            "CNI_IFNAME {ifname} does not exist in the pod's network namespace; the primary \
             plugin before tapestry-cni should have created it"
        )));
    };
    let Some(spec) = tap_spec else {
        return Ok(PodSide { link, guest: None });
    };
    if link.mac.is_none() {
        return Err(CniError::network(format!(
            "{ifname} has no MAC address; a VM guest takes over the pod interface's MAC, so the \
             pod interface must be an Ethernet device (a veth)"
        )));
    }
    let mtu = mtu_override.unwrap_or(link.mtu);

    tap::create(spec)?;
    let finish = async {
        let tap = interface::link_by_name(handle, &spec.name)
            .await?
            .ok_or_else(|| {
                CniError::network(format!(
                    "tap {} vanished right after it was created",
                    spec.name
                ))
            })?;
        interface::set_mtu_and_up(handle, &tap, mtu).await?;
        let taken = interface::take_ipv4_addresses(handle, &link).await?;
        Ok::<_, CniError>(GuestTap { tap, mtu, taken })
    };
    match finish.await {
        Ok(guest) => Ok(PodSide {
            link,
            guest: Some(guest),
        }),
        Err(err) => {
            // The addresses are either untouched or already restored by take_ipv4_addresses.
            if let Ok(Some(tap)) = interface::link_by_name(handle, &spec.name).await
                && let Err(e) = interface::delete_link(handle, &tap).await
            {
                tracing::error!("undoing ADD: {e}");
            }
            Err(err)
        }
    }
}

/// Steps 2 and 3: find the host veth, then tell the daemon.
fn register(
    att: &Attachment,
    prev: &CniResult,
    pod: &PodSide,
    pod_ips: &[IpConfig],
) -> Result<EndpointInfo> {
    let host_ifname =
        netns::with_netlink(async |handle| interface::host_veth(&handle, &pod.link, prev).await)?;
    let pod_ip_refs: Vec<&IpConfig> = pod_ips.iter().collect();
    let gateway = guest::guest_ipv4(&pod_ip_refs).and_then(|(_, gw)| gw);
    let vm = match &pod.guest {
        None => None,
        Some(g) => Some(guest::attachment(GuestInputs {
            tap: &g.tap.name,
            mac: pod.link.mac.unwrap_or_default(),
            mtu: g.mtu,
            queues: att.conf.vm.queues,
            hostname: guest::hostname(&att.conf, &att.args),
            pod_ips: &pod_ip_refs,
            prev,
            conf: &att.conf,
            pod_routes: &g.taken.ipv4_routes(),
            migration_source: guest::migration_source(&att.conf),
        })?),
    };
    let request = EndpointRequest {
        container_id: att.container_id.clone(),
        ifname: att.ifname.clone(),
        netns: att
            .netns
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        host_ifname: host_ifname.clone(),
        ips: pod_ips.iter().map(|ip| ip.address.clone()).collect(),
        gateway,
        mac: pod.link.mac,
        pod: att.args.pod_ref(),
        vm,
        network: att.conf.name.clone(),
    };
    let info = att
        .client()
        .add_endpoint(&request)
        .map_err(|e| CniError::from_client(format!("refused endpoint {}", att.describe()), e))?;
    tracing::info!(
        "registered {} (host veth {host_ifname} #{}, guest {:?})",
        att.describe(),
        info.host_ifindex,
        info.guest_phase
    );
    Ok(info)
}

/// Puts the pod's namespace back as the primary left it.
fn undo(att: &Attachment, pod: &PodSide) {
    let Some(guest) = &pod.guest else { return };
    let Some(netns_path) = att.netns.as_deref() else {
        return;
    };
    let undone = netns::run_in(netns_path, || {
        netns::with_netlink(async |handle| {
            interface::delete_link(&handle, &guest.tap).await?;
            interface::restore_addresses(&handle, &guest.taken).await
        })
    });
    if let Err(e) = undone {
        tracing::error!("undoing ADD of {}: {e}", att.describe());
    }
}
