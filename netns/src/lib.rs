//! Entering a network namespace, given its path (`/run/netns/NAME`, `/proc/PID/ns/net`).
//!
//! A network namespace belongs to an OS thread (setns(2) changes the calling thread only), so
//! work in another namespace runs on a thread of its own that enters it and then ends
//! ([`run_in`]): nothing else ever runs on a thread whose namespace changed, and no async worker
//! is ever moved. Sockets and file handles opened on that thread stay in the namespace and can
//! be used from any thread afterwards. A child process enters between fork and exec
//! ([`command_in`], what `nsenter --net=PATH` does; unlike `ip netns exec`, `/sys` is not
//! remounted, so `/sys/fs/bpf` stays visible).
//!
//! Opening the path never blocks, and what is not a network namespace is refused before setns:
//! a FIFO at the path would otherwise hang the open forever.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::{
            ffi::OsStrExt,
            fs::{MetadataExt, OpenOptionsExt},
            process::CommandExt,
        },
    },
    path::{Path, PathBuf},
    process::Command,
};

/// The calling thread's own network namespace.
const OWN: &str = "/proc/thread-self/ns/net";

/// Why a namespace could not be entered or compared.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing at the path: the namespace (the container) is gone.
    #[error("network namespace {} does not exist", .0.display())]
    NotFound(PathBuf),
    /// Something is at the path, but not a network namespace.
    #[error("{} is not a network namespace", .0.display())]
    NotANamespace(PathBuf),
    /// Opening, inspecting or entering the namespace failed otherwise (permissions, ...).
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No thread could be started to enter the namespace (a resource limit: try again later).
    #[error("cannot start a thread for network namespace {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Runs `f` on a fresh OS thread that first entered the network namespace at `path`, and
/// returns what it returned. The thread ends afterwards; the calling thread's namespace never
/// changes. `f` may borrow from the caller (a scoped thread), and a panic in `f` is propagated to
/// the caller.
pub fn run_in<T: Send>(path: impl AsRef<Path>, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let path = path.as_ref();
    let ns = open(path)?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, move || {
                enter(&ns, path)?;
                drop(ns);
                Ok(f())
            })
            .map_err(|source| Error::Spawn {
                path: path.into(),
                source,
            })?;
        match thread.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Whether the namespace at `path` is the calling thread's own (the same device and inode as
/// `/proc/thread-self/ns/net`): a runtime passing its own namespace would otherwise have the
/// caller rewire the host.
pub fn is_own(path: impl AsRef<Path>) -> Result<bool, Error> {
    let path = path.as_ref();
    let theirs = std::fs::metadata(path).map_err(|e| io_error("cannot stat", path, e))?;
    let ours = std::fs::metadata(OWN).map_err(|e| io_error("cannot stat", Path::new(OWN), e))?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// Makes `cmd` run inside the network namespace at `path`: the child enters it right before
/// exec, keeping every other setting of `cmd` (stdio, env, cwd). Calling it twice on one
/// `Command` makes the last namespace win.
///
/// The child's failure surfaces as the error of `spawn` (or `output`, `status`): `NotFound` for a
/// missing path, `InvalidInput` (EINVAL) for one that is not a network namespace. The only error
/// here is a path with a NUL byte.
pub fn command_in<'a>(cmd: &'a mut Command, path: &Path) -> io::Result<&'a mut Command> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "netns path has a NUL byte"))?;
    // SAFETY: the hook only makes async-signal-safe calls (open, fstatfs, setns, close) and
    // builds io::Error from a raw errno (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = if !is_nsfs(fd)? {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            };
            libc::close(fd);
            rc
        });
    }
    Ok(cmd)
}

/// Opens `path` without blocking (O_NONBLOCK: a FIFO would wait for a writer) and checks that
/// it is a namespace file.
fn open(path: &Path) -> Result<File, Error> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io_error("cannot open", path, e))?;
    match is_nsfs(file.as_raw_fd()) {
        Ok(true) => Ok(file),
        Ok(false) => Err(Error::NotANamespace(path.into())),
        Err(e) => Err(io_error("cannot inspect", path, e)),
    }
}

/// Moves the calling thread into the namespace `ns`. Only for threads that end afterwards.
fn enter(ns: &File, path: &Path) -> Result<(), Error> {
    // SAFETY: a plain syscall on a valid fd; it changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        // Another kind of namespace (`/proc/PID/ns/mnt`, ...).
        e if e.raw_os_error() == Some(libc::EINVAL) => Err(Error::NotANamespace(path.into())),
        e => Err(io_error("cannot enter", path, e)),
    }
}

/// Whether `fd` is on nsfs, where every namespace file lives.
fn is_nsfs(fd: RawFd) -> io::Result<bool> {
    // SAFETY: statfs is plain data; fstatfs fills the one we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field and the constant differ in type between glibc and musl.
    Ok(st.f_type as u64 == libc::NSFS_MAGIC as u64)
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> Error {
    match source.kind() {
        io::ErrorKind::NotFound => Error::NotFound(path.into()),
        _ => Error::Io {
            action,
            path: path.into(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CString,
        os::unix::ffi::OsStrExt,
        path::PathBuf,
        sync::mpsc,
        time::{Duration, Instant},
    };

    use super::*;

    fn is_root() -> bool {
        // SAFETY: a plain syscall.
        unsafe { libc::geteuid() == 0 }
    }

    /// A directory of its own under the temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let d =
                std::env::temp_dir().join(format!("tapestry-netns-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a plain syscall with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    /// `run_in(path)` on another thread, failing the test instead of hanging if it blocks.
    fn run_in_soon(path: &Path) -> Result<(), Error> {
        let (tx, rx) = mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || tx.send(run_in(&path, || ())));
        rx.recv_timeout(Duration::from_secs(5))
            .expect("run_in blocked on the path")
    }

    #[test]
    fn a_missing_path_is_not_found() {
        let path = Path::new("/run/netns/tapestry-no-such-ns");
        assert!(matches!(run_in(path, || ()), Err(Error::NotFound(p)) if p == path));
        assert!(matches!(is_own(path), Err(Error::NotFound(_))));
        let mut cmd = Command::new("true");
        let err = command_in(&mut cmd, path).unwrap().status().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = TempDir::new("fifo");
        let fifo = dir.0.join("fifo");
        mkfifo(&fifo);
        let started = Instant::now();
        let err = run_in_soon(&fifo).unwrap_err();
        assert!(
            matches!(&err, Error::NotANamespace(p) if p == &fifo),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!("{} is not a network namespace", fifo.display())
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!is_own(&fifo).unwrap());
        // A child entering it fails before exec, without waiting for a writer either.
        let mut cmd = Command::new("true");
        let err = command_in(&mut cmd, &fifo).unwrap().status().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    }

    #[test]
    fn a_regular_file_and_a_directory_are_no_namespace() {
        let dir = TempDir::new("file");
        let file = dir.0.join("file");
        std::fs::write(&file, "").unwrap();
        for p in [&file, &dir.0] {
            assert!(
                matches!(run_in_soon(p), Err(Error::NotANamespace(_))),
                "{}",
                p.display()
            );
        }
        assert!(matches!(
            run_in("/proc/self/status", || ()),
            Err(Error::NotANamespace(_))
        ));
    }

    #[test]
    fn another_kind_of_namespace_is_no_network_namespace() {
        // nsfs, but a mount namespace: setns(CLONE_NEWNET) refuses it (EINVAL), with or
        // without privileges.
        let err = run_in("/proc/self/ns/mnt", || ()).unwrap_err();
        assert!(matches!(err, Error::NotANamespace(_)), "{err}");
    }

    #[test]
    fn own_namespace_is_recognised() {
        assert!(is_own("/proc/self/ns/net").unwrap());
        assert!(is_own(OWN).unwrap());
    }

    #[test]
    fn work_runs_in_the_namespace_with_borrowed_data() {
        if !is_root() {
            eprintln!("skipped: entering a namespace needs CAP_SYS_ADMIN");
            return;
        }
        // A thread in a namespace of its own, kept alive while the test enters it.
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // SAFETY: plain syscalls; only this thread's namespace changes.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let tid = unsafe { libc::gettid() };
            tx.send(tid).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let theirs = PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()));
        assert!(!is_own(&theirs).unwrap());

        let borrowed = String::from("borrowed");
        let (len, inside) = run_in(&theirs, || (borrowed.len(), is_own(&theirs))).unwrap();
        assert_eq!(len, 8);
        assert!(
            inside.unwrap(),
            "the closure ran in the namespace at the path"
        );
        assert!(
            !is_own(&theirs).unwrap(),
            "the caller's namespace did not change"
        );

        // The same for a child process: its namespace is the one at the path.
        let mut cmd = Command::new("readlink");
        cmd.arg("/proc/self/ns/net");
        let out = command_in(&mut cmd, &theirs).unwrap().output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            std::fs::read_link(&theirs).unwrap().to_string_lossy()
        );

        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller() {
        if !is_root() {
            eprintln!("skipped: entering a namespace needs CAP_SYS_ADMIN");
            return;
        }
        let r = std::panic::catch_unwind(|| run_in("/proc/self/ns/net", || panic!("boom")));
        let panic = r.unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
    }
}
