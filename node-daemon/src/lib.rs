//! tapestryd, the node daemon: owns the pinned datapath, keeps its maps equal to the desired
//! state, and serves the local API to the CNI plugin and the CLI.

pub mod api;
pub mod datapath;
pub mod dhcp;
pub mod endpoints;
pub mod flows;
pub mod guest;
pub mod kubernetes;
pub mod maglev;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod reconcile;
pub mod source;
