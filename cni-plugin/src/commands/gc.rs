//! GC (1.1.0): tapestryd drops the endpoints the runtime no longer has. Taps need nothing: they
//! live in pod namespaces, which are gone with their pods.

use tapestry_api::types::EndpointGcRequest;

use super::Network;
use crate::error::{CniError, Result};

pub fn gc(net: &Network) -> Result<()> {
    let Some(valid) = net.conf.valid_attachments.clone() else {
        // Without the list every endpoint would look stale.
        return Err(CniError::InvalidConfig(
            "GC came without cni.dev/valid-attachments; the runtime must list the attachments \
             still in use"
                .into(),
        ));
    };
    let request = EndpointGcRequest {
        network: net.conf.name.clone(),
        valid: valid.into_iter().map(Into::into).collect(),
    };
    let removed = net
        .client()
        .gc_endpoints(&request)
        .map_err(|e| CniError::from_client("could not garbage-collect endpoints", e))?;
    for endpoint in &removed {
        tracing::info!(
            "GC removed endpoint of container {} interface {}",
            endpoint.request.container_id,
            endpoint.request.ifname
        );
    }
    Ok(())
}
