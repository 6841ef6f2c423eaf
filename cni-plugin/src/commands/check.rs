//! CHECK (0.4.0+): the attachment is still as ADD left it. tapestryd has the endpoint, the pod
//! interface exists, and a VM pod's tap exists with the right owner, group and queue mode.

use tapestry_api::client::ClientError;

use super::Attachment;
use crate::{
    error::{CniError, Result},
    guest, interface, netns,
    tap::{self, Found, TapSpec},
    version,
};

pub fn check(att: &Attachment) -> Result<()> {
    let Some(raw_prev) = att.conf.prev_result.as_ref() else {
        return Err(CniError::InvalidConfig(
            "CHECK came without prevResult; the runtime must pass the result of ADD".into(),
        ));
    };
    version::parse_result(raw_prev, att.version)?;

    let endpoint = att
        .client()
        .endpoint(&att.container_id, &att.ifname)
        .map_err(|e| match e {
            ClientError::Api { status: 404, .. } => CniError::network(format!(
                "tapestryd has no endpoint for {}: Services do not reach this pod; delete and \
                 re-create the pod to register it again",
                att.describe()
            )),
            e => CniError::from_client(format!("could not report endpoint {}", att.describe()), e),
        })?;

    let vm_selected = guest::select(&att.conf, &att.args).is_some();
    if vm_selected && endpoint.request.vm.is_none() {
        return Err(CniError::network(format!(
            "{} is a VM pod but tapestryd registered it without its guest",
            att.describe()
        )));
    }
    let spec = endpoint.request.vm.as_ref().map(|vm| TapSpec {
        name: vm.tap.clone(),
        uid: att.conf.vm.uid,
        gid: att.conf.vm.gid,
        queues: vm.queues,
    });

    let netns_path = att
        .netns
        .as_deref()
        .expect("the dispatcher requires CNI_NETNS for CHECK");
    netns::run_in(netns_path, || {
        netns::with_netlink(async |handle| {
            if interface::link_by_name(&handle, &att.ifname)
                .await?
                .is_none()
            {
                return Err(CniError::network(format!(
                    "{} no longer exists in the pod's network namespace",
                    att.ifname
                )));
            }
            let Some(spec) = &spec else { return Ok(()) };
            match tap::inspect(&handle, &spec.name).await? {
                Found::Absent => Err(CniError::network(format!(
                    "the guest's tap {} is missing from the pod's network namespace",
                    spec.name
                ))),
                Found::NotATap(link) => Err(CniError::network(format!(
                    "{} in the pod's network namespace is a {}, not the guest's tap",
                    link.name,
                    link.kind.as_deref().unwrap_or("device")
                ))),
                Found::Tap(info) => match info.mismatch(spec) {
                    None => Ok(()),
                    Some(why) => Err(CniError::network(format!(
                        "the guest's tap {} is not as ADD made it: {why}",
                        spec.name
                    ))),
                },
            }
        })
    })
}
