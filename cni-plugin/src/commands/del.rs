//! DEL: forget the endpoint in tapestryd and delete the guest's tap. Idempotent and best
//! effort: a missing netns, link or endpoint is success, and so is a daemon that is not running
//! (it removes endpoints whose netns is gone when it starts). A daemon that answers with an
//! error fails the DEL, so the runtime tries again.

use std::collections::BTreeSet;

use tapestry_api::client::ClientError;

use super::Attachment;
use crate::{
    error::{CniError, Result},
    guest, interface, netns,
    tap::{self, Found},
    version::{self, CniResult},
};

pub fn del(att: &Attachment) -> Result<()> {
    // DEL may come without prevResult (containerd retries with none), or with one that no
    // longer parses; neither stops the cleanup.
    let prev = att.conf.prev_result.as_ref().and_then(|raw| {
        match version::parse_result(raw, att.version) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("DEL of {}: ignoring prevResult: {e}", att.describe());
                None
            }
        }
    });

    let client = att.client();
    let mut taps = taps_from_config(att, prev.as_ref());
    // The daemon's record names the tap even when config and prevResult do not say VM.
    if let Ok(info) = client.endpoint(&att.container_id, &att.ifname)
        && let Some(vm) = info.request.vm
    {
        taps.insert(vm.tap);
    }

    let daemon = match client.delete_endpoint(&att.container_id, &att.ifname) {
        Ok(()) => Ok(()),
        Err(ClientError::Unreachable { socket, source }) => {
            tracing::warn!(
                "DEL of {}: tapestryd is not reachable at {} ({source}); cleaning up the pod \
                 side only, the daemon drops the endpoint when it runs again",
                att.describe(),
                socket.display()
            );
            Ok(())
        }
        Err(e) => Err(CniError::from_client(
            format!("could not remove endpoint {}", att.describe()),
            e,
        )),
    };

    if let Some(netns_path) = att.netns.as_deref()
        && !taps.is_empty()
    {
        if matches!(netns::is_own(netns_path), Ok(true)) {
            tracing::warn!(
                "DEL of {}: CNI_NETNS {} is the plugin's own namespace; not deleting {taps:?} \
                 there",
                att.describe(),
                netns_path.display()
            );
            return daemon;
        }
        let removed = netns::run_in(netns_path, || {
            netns::with_netlink(async |handle| {
                for name in &taps {
                    match tap::inspect(&handle, name).await? {
                        Found::Absent => {}
                        Found::NotATap(link) => tracing::warn!(
                            "DEL of {}: leaving {} alone, it is a {} and not a tap",
                            att.describe(),
                            link.name,
                            link.kind.as_deref().unwrap_or("device")
                        ),
                        Found::Tap(info) => interface::delete_link(&handle, &info.link).await?,
                    }
                }
                Ok(())
            })
        });
        match removed {
            Ok(()) => {}
            // The netns is gone, and every link in it.
            Err(CniError::UnknownContainer(why)) => tracing::debug!("DEL: {why}"),
            Err(e) => return Err(e),
        }
    }
    daemon
}

/// The taps this attachment would have: the configured one if this is a VM pod, and any
/// container-side interface of prevResult with the configured tap name (ADD listed it there).
fn taps_from_config(att: &Attachment, prev: Option<&CniResult>) -> BTreeSet<String> {
    let mut taps = BTreeSet::new();
    let tap_name = &att.conf.vm.tap_name;
    if guest::select(&att.conf, &att.args).is_some() {
        taps.insert(tap_name.clone());
    }
    if let Some(prev) = prev
        && prev
            .interfaces
            .iter()
            .any(|i| i.in_sandbox() && &i.name == tap_name)
    {
        taps.insert(tap_name.clone());
    }
    taps
}
