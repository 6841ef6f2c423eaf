//! STATUS (1.1.0): can the plugin serve ADD now? Only if tapestryd answers its health check.

use tapestry_api::client::ClientError;

use super::Network;
use crate::error::{CniError, Result};

pub fn status(net: &Network) -> Result<()> {
    net.client().healthz().map_err(|e| {
        CniError::NotAvailable(match e {
            ClientError::Unreachable { socket, source } => format!(
                "tapestryd is not reachable at {} ({source}); tapestry-cni cannot add pods until \
                 tapestryd runs on this node",
                socket.display()
            ),
            e => format!(
                "tapestryd at {} is not ready ({e}); tapestry-cni cannot add pods until it is",
                net.socket.display()
            ),
        })
    })
}
