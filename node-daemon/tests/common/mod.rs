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

/// A small deterministic generator (xorshift64*) for the differential tests: the same seed gives
/// the same packets, so a mismatch can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// RFC 1624 incremental update of an Internet checksum for one 16-bit word changed from `old`
/// to `new`: HC' = ~(~HC + ~m + m').
pub fn csum_replace2(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// [`csum_replace2`] for a 32-bit field (two words).
pub fn csum_replace4(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let w = |b: [u8; 4], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let c = csum_replace2(csum, w(old, 0), w(new, 0));
    csum_replace2(c, w(old, 2), w(new, 2))
}

/// Checksums equal as one's-complement numbers (0x0000 and 0xffff are both zero).
pub fn csum_eq(a: u16, b: u16) -> bool {
    a == b || (a | b == 0xffff && (a == 0 || b == 0))
}
