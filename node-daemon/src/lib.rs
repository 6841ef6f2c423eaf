//! tapestryd, the node daemon: owns the pinned datapath, keeps its maps equal to the desired
//! state, and serves the local API to the CNI plugin and the CLI.
//!
//! Its rooms, each with one job:
//! - [`services`]: the Service path — desired state from a file or the Kubernetes API
//!   (`source`, `endpointslice`), kept in the maps by the reconciler (`reconcile`, `maglev`);
//! - [`guests`]: the guest path — the endpoint registry the CNI plugin fills (`endpoints`),
//!   DHCP for guests (`dhcp`), Guest objects in Kubernetes mode (`publish`);
//! - [`datapath`]: the kernel side — loading and pinning programs and maps, the one pinned-link
//!   helper (`link`), the guest programs (`guest`), interfaces (`iface`), conntrack (`conntrack`);
//! - [`views`], [`metrics`], [`flows`]: what the API and Prometheus read, without locks that a
//!   writer waits on; [`api`] and [`error`]: the local API and its typed errors;
//! - [`daemon`]: wires the tasks together from a [`config::Config`] (main.rs parses the flags).

pub mod api;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod error;
pub mod flows;
pub mod guests;
pub mod metrics;
pub mod services;
pub mod views;
