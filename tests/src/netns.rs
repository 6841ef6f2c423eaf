//! The processes of a network namespace: listing them, and ending them at teardown. Entering
//! one is `tapestry_netns` (a thread, or a child between fork and exec, never `ip netns exec`,
//! which remounts `/sys` and hides `/sys/fs/bpf`).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Pids of the processes (other than this one) whose network namespace is the one at
/// `netns_path` (what `ip netns pids` prints). Zombies are not listed.
pub fn pids_in_netns(netns_path: &Path) -> io::Result<Vec<i32>> {
    let target = std::fs::metadata(netns_path)?;
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            && m.dev() == target.dev()
            && m.ino() == target.ino()
        {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Sends SIGTERM to every process in the namespace, waits up to `grace`, then SIGKILLs what is
/// left. Returns the pids that were found.
pub fn kill_netns_processes(netns_path: &Path, grace: Duration) -> io::Result<Vec<i32>> {
    let pids = pids_in_netns(netns_path)?;
    if pids.is_empty() {
        return Ok(pids);
    }
    for &pid in &pids {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    loop {
        let left = pids_in_netns(netns_path)?;
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for pid in left {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(pids)
}
