//! One module per CNI command. The dispatcher in `main` has checked the environment, the config
//! and the version before any of these runs.

use std::path::PathBuf;

use tapestry_api::client::blocking::Client;

use crate::{args::CniArgs, config::NetConf, version::CniVersion};

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;

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
        Client::new(&self.socket)
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
        Client::new(&self.socket)
    }
}
