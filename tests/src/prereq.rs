//! Prerequisites of lab tests, and the skip-or-fail policy every integration test applies.

use std::process::{Command, Stdio};

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks that this process can build labs and load eBPF programs: effective uid 0,
/// `/sys/fs/bpf` mounted as bpffs, and `ip` (iproute2) runnable. The error names every missing
/// prerequisite.
pub fn require_root_and_bpffs() -> Result<(), String> {
    let mut missing = Vec::new();
    // SAFETY: plain syscall.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        missing.push(format!("root (running with euid {euid})"));
    }
    match bpffs_mounted("/sys/fs/bpf") {
        Ok(true) => {}
        Ok(false) => missing.push("bpffs mounted at /sys/fs/bpf (something else is there)".into()),
        Err(e) => missing.push(format!("bpffs mounted at /sys/fs/bpf ({e})")),
    }
    let ip_ok = Command::new("ip")
        .arg("-V")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ip_ok {
        missing.push("the `ip` command (iproute2)".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing prerequisite: {}", missing.join("; ")))
    }
}

fn bpffs_mounted(path: &str) -> std::io::Result<bool> {
    let c = std::ffi::CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// The skip-or-fail policy of every test prerequisite: `true` when `check` passed. Otherwise,
/// with the environment variable `CI` set (any value) it panics naming what is missing (`what`:
/// "lab", "guest", "Kubernetes"); without it, it prints `skipped: <why>` and returns `false`.
pub fn available<T>(what: &str, check: Result<T, String>) -> bool {
    match check {
        Ok(_) => true,
        Err(why) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set and a {what} prerequisite is missing: {why}");
            }
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// The policy behind [`require_lab!`](crate::require_lab), for root, bpffs and `ip`.
pub fn lab_available() -> bool {
    available("lab", require_root_and_bpffs())
}

/// First line of every integration test that needs root, bpffs and `ip`:
///
/// ```no_run
/// #[test]
/// fn my_test() {
///     tapestry_tests::require_lab!();
///     // ...
/// }
///
/// #[test]
/// fn my_fallible_test() -> anyhow::Result<()> {
///     tapestry_tests::require_lab!(Ok(()));
///     Ok(())
/// }
/// ```
///
/// Returns early (with `()` or the given value) after printing `skipped: <why>` when a
/// prerequisite is missing, or panics if the environment variable `CI` is set.
#[macro_export]
macro_rules! require_lab {
    () => {
        if !$crate::lab_available() {
            return;
        }
    };
    ($ret:expr) => {
        if !$crate::lab_available() {
            return $ret;
        }
    };
}
