//! Entering network namespaces without `ip netns exec` (which remounts `/sys` and hides
//! `/sys/fs/bpf`): a dedicated thread that calls `setns(CLONE_NEWNET)`, or a child process that
//! calls it between fork and exec.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Runs `f` on a fresh OS thread that first joined the network namespace at `netns_path`
/// (`/run/netns/NAME`, or `/proc/PID/ns/net`), and returns its result.
///
/// Sockets keep the namespace they were created in, so a socket made inside `f` can be returned
/// and used from any thread afterwards. A panic in `f` is propagated to the caller. The calling
/// thread's own namespace never changes.
pub fn in_netns<T: Send>(netns_path: impl AsRef<Path>, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path.as_ref();
    let ns = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("in-netns".into())
            .spawn_scoped(s, move || -> Result<T> {
                // SAFETY: plain syscall on a valid fd; only this thread changes namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("setns({})", path.display()));
                }
                drop(ns);
                Ok(f())
            })
            .context("spawning netns thread")?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Makes `cmd` run inside the network namespace at `netns_path`: the child calls
/// `setns(CLONE_NEWNET)` right before exec (what `nsenter --net=PATH` does), keeping every other
/// setting of `cmd` (stdio, env, cwd). `/sys` is not remounted, so `/sys/fs/bpf` stays visible.
/// Calling it twice on one `Command` makes the last namespace win.
pub fn command_in_netns<'a>(
    cmd: &'a mut Command,
    netns_path: &Path,
) -> io::Result<&'a mut Command> {
    let path = CString::new(netns_path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "netns path has a NUL byte"))?;
    // SAFETY: the hook only calls async-signal-safe functions (open, setns, close) and builds
    // io::Error from a raw errno (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 { Err(err) } else { Ok(()) }
        });
    }
    Ok(cmd)
}

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
