//! Running work inside the pod's network namespace, and netlink sessions.
//!
//! A network namespace belongs to an OS thread (setns(2) changes the calling thread only), so
//! pod-side work runs on a thread of its own that enters the namespace and then ends: nothing
//! else ever runs on a thread whose namespace was changed, and no async worker is ever moved.
//! Netlink sockets and /dev/net/tun file handles opened on that thread belong to the pod's
//! namespace.

use std::{
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};
use rtnetlink::Handle;

use crate::error::{CniError, Result};

/// Runs `work` on a new thread inside the network namespace at `path`.
///
/// A namespace that does not exist is `CniError::UnknownContainer` (DEL treats it as done);
/// a path that is not a network namespace is an invalid CNI_NETNS.
pub fn run_in<T, F>(path: &Path, work: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("pod-netns".into())
            .spawn_scoped(scope, move || {
                enter(path)?;
                work()
            })
            .map_err(|e| CniError::network(format!("cannot start the pod-netns thread: {e}")))?
            .join()
            .unwrap_or_else(|_| {
                Err(CniError::network(
                    "the thread working in the pod's netns panicked",
                ))
            })
    })
}

/// Moves the calling thread into the namespace at `path`. Only for threads that end afterwards.
fn enter(path: &Path) -> Result<()> {
    let file = open(path)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| CniError::InvalidEnv {
        var: "CNI_NETNS",
        msg: format!(
            "cannot enter {}: {errno} (is it a network namespace?)",
            path.display()
        ),
    })
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => gone(path),
        _ => CniError::InvalidEnv {
            var: "CNI_NETNS",
            msg: format!("cannot open {}: {e}", path.display()),
        },
    })
}

fn gone(path: &Path) -> CniError {
    CniError::UnknownContainer(format!(
        "the container's network namespace {} does not exist (the container is gone?)",
        path.display()
    ))
}

/// Whether the namespace at `path` is the one this process runs in: a runtime passing its own
/// namespace as CNI_NETNS would otherwise have the plugin rewire the host.
pub fn is_own(path: &Path) -> Result<bool> {
    let theirs = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => gone(path),
        _ => CniError::InvalidEnv {
            var: "CNI_NETNS",
            msg: format!("cannot stat {}: {e}", path.display()),
        },
    })?;
    let ours = std::fs::metadata(own_netns_path())
        .map_err(|e| CniError::network(format!("cannot stat this thread's netns: {e}")))?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

fn own_netns_path() -> PathBuf {
    PathBuf::from("/proc/thread-self/ns/net")
}

/// Runs `work` with a netlink session in the calling thread's namespace, on a current-thread
/// runtime that lives as long as the call.
pub fn with_netlink<T>(work: impl AsyncFnOnce(Handle) -> Result<T>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::network(format!("cannot start a netlink runtime: {e}")))?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| CniError::network(format!("cannot open a netlink socket: {e}")))?;
        let connection = tokio::spawn(connection);
        let out = work(handle).await;
        connection.abort();
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_an_unknown_container() {
        let err = run_in(Path::new("/run/netns/tapestry-no-such-ns"), || Ok(())).unwrap_err();
        assert_eq!(err.code(), 3);
        assert!(is_own(Path::new("/run/netns/tapestry-no-such-ns")).is_err());
    }

    #[test]
    fn a_file_that_is_no_namespace_is_invalid_env() {
        let err = run_in(Path::new("/proc/self/status"), || Ok(())).unwrap_err();
        assert_eq!(err.code(), 4, "{err}");
        assert!(err.to_string().contains("CNI_NETNS"));
    }

    #[test]
    fn own_namespace_is_recognised() {
        assert!(is_own(Path::new("/proc/self/ns/net")).unwrap());
    }

    #[test]
    fn work_runs_and_returns_in_the_namespace() {
        // Entering our own namespace needs CAP_SYS_ADMIN; without it this test shows nothing.
        match run_in(Path::new("/proc/self/ns/net"), || Ok(42)) {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => eprintln!("skipped: {e}"),
        }
    }
}
