//! Running work inside the pod's network namespace, and netlink sessions.
//!
//! A network namespace belongs to an OS thread (setns(2) changes the calling thread only), so
//! pod-side work runs on a thread of its own that enters the namespace and then ends: nothing
//! else ever runs on a thread whose namespace was changed, and no async worker is ever moved.
//! Netlink sockets and /dev/net/tun file handles opened on that thread belong to the pod's
//! namespace.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
};

use rtnetlink::Handle;

use crate::error::{CniError, Result};

/// Runs `work` on a new thread inside the network namespace at `path`
/// ([`tapestry_netns::run_in`]).
///
/// A namespace that does not exist is `CniError::UnknownContainer` (DEL treats it as done);
/// a path that is not a network namespace is an invalid CNI_NETNS.
pub fn run_in<T, F>(path: &Path, work: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    // A panic becomes an error the runtime can read, not a plugin that dies without a result.
    match tapestry_netns::run_in(path, || catch_unwind(AssertUnwindSafe(work))) {
        Ok(Ok(result)) => result,
        Ok(Err(_panic)) => Err(CniError::network(
            "the thread working in the pod's netns panicked",
        )),
        Err(e) => Err(from_netns(path, e)),
    }
}

/// Whether the namespace at `path` is the one this process runs in: a runtime passing its own
/// namespace as CNI_NETNS would otherwise have the plugin rewire the host.
pub fn is_own(path: &Path) -> Result<bool> {
    tapestry_netns::is_own(path).map_err(|e| from_netns(path, e))
}

/// The spec's code for a namespace that could not be entered.
fn from_netns(path: &Path, e: tapestry_netns::Error) -> CniError {
    match e {
        tapestry_netns::Error::NotFound(_) => CniError::UnknownContainer(format!(
            "the container's network namespace {} does not exist (the container is gone?)",
            path.display()
        )),
        tapestry_netns::Error::Spawn { .. } => CniError::network(e.to_string()),
        tapestry_netns::Error::NotANamespace(_) | tapestry_netns::Error::Io { .. } => {
            CniError::InvalidEnv {
                var: "CNI_NETNS",
                msg: e.to_string(),
            }
        }
    }
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
    fn a_fifo_or_a_regular_file_as_cni_netns_fails_at_once() {
        // Opening a FIFO for reading waits for a writer: CNI_NETNS pointing at one must fail
        // fast (code 4), not hang the plugin; so must a regular file.
        let dir = std::env::temp_dir().join(format!("tcni-netns-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a plain syscall with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let file = dir.join("file");
        std::fs::write(&file, "").unwrap();
        for path in [fifo, file] {
            let (tx, rx) = std::sync::mpsc::channel();
            let p = path.clone();
            std::thread::spawn(move || tx.send(run_in(&p, || Ok(())).map_err(|e| e.code())));
            let out = rx
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap_or_else(|_| panic!("entering {} hung", path.display()));
            assert_eq!(out, Err(4), "{}", path.display());
            assert_eq!(is_own(&path).ok(), Some(false), "{}", path.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
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
