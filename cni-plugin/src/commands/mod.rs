//! One module per CNI command. The dispatcher in `main` has checked the environment, the config
//! and the version before any of these runs.

use std::{path::PathBuf, time::Duration};

use tapestry_api::client::blocking::Client;

use crate::{args::CniArgs, config::NetConf, version::CniVersion};

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;

/// How long the plugin waits for tapestryd's socket to accept a connection.
pub const DAEMON_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one call to tapestryd may take in all. The runtime's budget is the kubelet's
/// `--runtime-request-timeout` (2 minutes by default) for the whole sandbox, every plugin of
/// the chain included, and DEL makes two calls: 30 s each leaves the primary plugin its share,
/// while a daemon that normally answers in milliseconds has ample time under load. A timeout is
/// "try again later" (code 11).
pub const DAEMON_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read from tapestryd: one endpoint, or the endpoints one GC removed
/// (thousands fit).
pub const DAEMON_MAX_RESPONSE_BYTES: usize = 4 << 20;

/// The plugin's client of tapestryd at `socket`, with the bounds above.
pub fn client(socket: &std::path::Path) -> Client {
    Client::new(socket)
        .with_connect_timeout(DAEMON_CONNECT_TIMEOUT)
        .with_request_timeout(DAEMON_REQUEST_TIMEOUT)
        .with_max_response_bytes(DAEMON_MAX_RESPONSE_BYTES)
}

/// ADD, DEL and CHECK: one attachment (CNI_CONTAINERID, CNI_IFNAME) of a container.
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    /// CNI_NETNS; only DEL may come without it.
    pub netns: Option<PathBuf>,
    pub args: CniArgs,
    pub conf: NetConf,
    pub version: CniVersion,
    pub socket: PathBuf,
}

impl Attachment {
    pub fn client(&self) -> Client {
        client(&self.socket)
    }

    pub fn describe(&self) -> String {
        format!("container {} interface {}", self.container_id, self.ifname)
    }
}

/// STATUS and GC: the network as a whole.
pub struct Network {
    pub conf: NetConf,
    pub socket: PathBuf,
}

impl Network {
    pub fn client(&self) -> Client {
        client(&self.socket)
    }
}
