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

/// One benchmark (or reliability run) at a time on the machine: every one of them holds an
/// exclusive flock on this file while it runs.
pub const LOCK_PATH: &str = "/run/tapestry-bench.lock";

/// Takes the lock of [`LOCK_PATH`], waiting up to `wait` for the run that holds it (and saying
/// so once, as `who`), or until `cancelled()`; held until the returned file closes.
pub fn lock_single_run(
    who: &str,
    wait: std::time::Duration,
    cancelled: &dyn Fn() -> bool,
) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .with_context(|| format!("opening {LOCK_PATH}"))?;
    let deadline = std::time::Instant::now() + wait;
    let mut said = false;
    loop {
        // SAFETY: flock on our own descriptor; released when the file closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        if std::time::Instant::now() >= deadline || cancelled() {
            anyhow::bail!("another benchmark holds {LOCK_PATH}; not running two at once");
        }
        if !said {
            eprintln!("{who}: waiting for another benchmark ({LOCK_PATH})");
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
