//! What the in-kernel test files share. Each test binary uses a part of it.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

/// Root and bpffs: required in CI (fail loudly), skipped with a reason elsewhere.
pub fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")))
        .unwrap_or(false);
    if root && bpffs {
        return true;
    }
    let why = if !root {
        "not root"
    } else {
        "bpffs not mounted on /sys/fs/bpf (run scripts/setup.sh)"
    };
    if std::env::var_os("CI").is_some() {
        panic!("in-kernel tests need root and bpffs: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// A fresh directory under /sys/fs/bpf for one test's pinned maps; removed with everything
/// pinned in it when dropped.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(what: &str) -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/tapestry-test-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        PinDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
