//! `make bench`: Tapestry's datapath side by side with the direct pod path and kube-proxy-style
//! iptables and nftables rule sets, on the same netns topology, in one run.
//!
//! - [`load`]: the TCP_RR / TCP_CRR load tool (`tapestry-load`).
//! - [`anchors`]: the iptables and nftables rule sets Tapestry is compared with.
//! - [`lb`]: the same services as a `tapestryd` state file.
//! - [`report`]: medians, paired ratios, summary.json, the table and the plot.
//! - [`progcost`]: what Tapestry's own programs cost per transaction (BPF run-time statistics).
//! - [`quick`]: `--quick`, every binary's smoke-run defaults, and where results go.

pub mod anchors;
pub mod cni;
pub mod lb;
pub mod load;
pub mod progcost;
pub mod quick;
pub mod report;
pub mod tap;
