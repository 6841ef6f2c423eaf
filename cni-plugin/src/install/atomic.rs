//! Writing files another process rewrites at any moment, without losing its writes.
//!
//! Every write goes to a temporary file in the same directory (a name runtimes skip, see
//! [`TMP_PREFIX`]) and is renamed over the target: a runtime reads the old or the new file,
//! never half of one, and containerd 1.6, which misses files moved in from another directory,
//! sees the rename. A replacement only happens if the target still holds what the caller read:
//! `renameat2(RENAME_EXCHANGE)` swaps the two atomically and the displaced content is compared;
//! if the primary wrote in between, its newer file is swapped back and the caller starts over.

use std::{
    ffi::CString,
    fs::{self, OpenOptions, Permissions},
    io::{self, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use super::TMP_PREFIX;

/// Mode and owner for a new file.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    pub mode: u32,
    pub owner: Option<(u32, u32)>,
}

impl Attrs {
    pub const DEFAULT: Attrs = Attrs {
        mode: 0o644,
        owner: None,
    };

    /// Those of an existing file (the default when it is gone).
    pub fn of(path: &Path) -> Attrs {
        match fs::metadata(path) {
            Ok(m) => Attrs {
                mode: m.mode() & 0o7777,
                owner: Some((m.uid(), m.gid())),
            },
            Err(_) => Attrs::DEFAULT,
        }
    }
}

/// `dir/.tapestry-install.tmp.<pid>.<16 random hex digits><suffix>`: a name nobody can plant
/// something at in advance.
fn tmp_path(dir: &Path, suffix: &str) -> io::Result<PathBuf> {
    let mut random = [0u8; 8];
    // SAFETY: getrandom fills at most `random.len()` bytes of the buffer we own.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        return Err(if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("getrandom returned too few bytes")
        });
    }
    Ok(dir.join(format!(
        "{TMP_PREFIX}{}.{:016x}{suffix}",
        std::process::id(),
        u64::from_ne_bytes(random)
    )))
}

/// Flushes `dir`'s entries (a rename or removal in it) to disk. The directory itself may be
/// reached through a symlink (`/etc/cni/net.d` often is one).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?
        .sync_all()
}

/// Writes `content` to a new temporary file in `dir`, flushed to disk, with `attrs`. The file is
/// created with O_EXCL and O_NOFOLLOW: whatever is at its name (a planted symlink, a file) makes
/// the write fail instead of being followed or overwritten.
pub fn write_tmp(dir: &Path, suffix: &str, content: &[u8], attrs: Attrs) -> io::Result<PathBuf> {
    let tmp = tmp_path(dir, suffix)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(attrs.mode)
        .open(&tmp)?;
    // From here on the file is ours: remove it on failure.
    let result = (|| {
        // The mode given to open is masked by the umask.
        f.set_permissions(Permissions::from_mode(attrs.mode))?;
        if let Some((uid, gid)) = attrs.owner {
            // Only root may give a file away; anyone else keeps its own files, which is fine.
            match std::os::unix::fs::fchown(&f, Some(uid), Some(gid)) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                other => other?,
            }
        }
        f.write_all(content)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths that outlive the call. Through syscall(2) because not
    // every libc (musl before 1.2.5) has the wrapper.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The filesystem (or kernel) has no `renameat2` flags: fall back to check-then-rename.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// Replaces `dir/name` by `content` if it still holds `expected`. `Ok(false)`: it changed or
/// disappeared meanwhile, and is left as the other writer made it.
pub fn replace(dir: &Path, name: &str, expected: &[u8], content: &[u8]) -> io::Result<bool> {
    let target = dir.join(name);
    let tmp = write_tmp(dir, "", content, Attrs::of(&target))?;
    let outcome = exchange_if(&tmp, &target, expected, content);
    let _ = fs::remove_file(&tmp);
    sync_dir(dir)?;
    outcome
}

fn exchange_if(tmp: &Path, target: &Path, expected: &[u8], content: &[u8]) -> io::Result<bool> {
    match renameat2(tmp, target, libc::RENAME_EXCHANGE) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) if unsupported(&e) => {
            // A few microseconds remain between the check and the rename.
            return match fs::read(target) {
                Ok(current) if current == expected => fs::rename(tmp, target).map(|()| true),
                Ok(_) => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            };
        }
        Err(e) => return Err(e),
    }
    // `tmp` now holds what the target held at the swap.
    if fs::read(tmp)? == expected {
        return Ok(true);
    }
    // The other writer got in between: give its file back. Should it have written yet again in
    // between, the newest is the one in `tmp` after this second swap; it goes back too.
    renameat2(tmp, target, libc::RENAME_EXCHANGE)?;
    if fs::read(tmp)? != content {
        fs::rename(tmp, target)?;
    }
    Ok(false)
}

/// Creates `dir/name` with `content` unless it exists. `Ok(false)`: it exists (left alone).
pub fn create(dir: &Path, name: &str, content: &[u8], attrs: Attrs) -> io::Result<bool> {
    let target = dir.join(name);
    let tmp = write_tmp(dir, "", content, attrs)?;
    let outcome = match renameat2(&tmp, &target, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) if unsupported(&e) => match fs::symlink_metadata(&target) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::rename(&tmp, &target).map(|()| true)
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let _ = fs::remove_file(&tmp);
    sync_dir(dir)?;
    outcome
}

/// Removes `dir/name` if it still holds `expected`. `Ok(false)`: it changed (left as it is now)
/// or is already gone.
pub fn remove(dir: &Path, name: &str, expected: &[u8]) -> io::Result<bool> {
    let target = dir.join(name);
    // Moved aside first, so what is compared is exactly what is removed.
    let aside = tmp_path(dir, ".old")?;
    match fs::rename(&target, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    if fs::read(&aside)? == expected {
        fs::remove_file(&aside)?;
        sync_dir(dir)?;
        return Ok(true);
    }
    // A newer file: put it back, unless an even newer one took the name meanwhile.
    match renameat2(&aside, &target, libc::RENAME_NOREPLACE) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => fs::remove_file(&aside)?,
        Err(e) if unsupported(&e) => fs::rename(&aside, &target)?,
        Err(e) => return Err(e),
    }
    sync_dir(dir)?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tapestry-atomic-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replace_only_over_what_was_read_and_keeps_the_mode() {
        let d = tempdir("replace");
        let f = d.join("a.conflist");
        fs::write(&f, "old").unwrap();
        fs::set_permissions(&f, Permissions::from_mode(0o600)).unwrap();
        assert!(replace(&d, "a.conflist", b"old", b"new").unwrap());
        assert_eq!(fs::read(&f).unwrap(), b"new");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        // Someone else's newer content is not overwritten.
        assert!(!replace(&d, "a.conflist", b"old", b"newer").unwrap());
        assert_eq!(fs::read(&f).unwrap(), b"new");
        // Gone: not re-created.
        fs::remove_file(&f).unwrap();
        assert!(!replace(&d, "a.conflist", b"new", b"x").unwrap());
        assert_eq!(names(&d), Vec::<String>::new(), "no temporary file left");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_planted_at_a_temporary_name_is_never_followed() {
        let d = tempdir("planted");
        let outside = tempdir("planted-outside");
        let victim = outside.join("victim");
        fs::write(&victim, "precious").unwrap();
        // What the old predictable name was, and a guess at the new scheme without its suffix.
        let pid = std::process::id();
        let planted = [
            format!("{TMP_PREFIX}{pid}"),
            format!("{TMP_PREFIX}{pid}.old"),
            format!("{TMP_PREFIX}{pid}."),
        ];
        for name in &planted {
            std::os::unix::fs::symlink(&victim, d.join(name)).unwrap();
        }
        fs::write(d.join("a.conflist"), "old").unwrap();
        assert!(replace(&d, "a.conflist", b"old", b"new").unwrap());
        assert!(create(&d, "b.conflist", b"one", Attrs::DEFAULT).unwrap());
        assert!(remove(&d, "b.conflist", b"one").unwrap());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(d.join("a.conflist")).unwrap(), b"new");
        for name in &planted {
            assert!(
                fs::symlink_metadata(d.join(name)).unwrap().is_symlink(),
                "{name} was replaced"
            );
        }
        let mut left = planted.to_vec();
        left.push("a.conflist".into());
        left.sort();
        assert_eq!(names(&d), left);
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn temporary_files_are_new_unpredictable_and_keep_the_mode() {
        let d = tempdir("tmpnames");
        let attrs = Attrs {
            mode: 0o600,
            owner: None,
        };
        let a = write_tmp(&d, "", b"x", attrs).unwrap();
        let b = write_tmp(&d, "", b"x", attrs).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::metadata(&a).unwrap().mode() & 0o777, 0o600);
        let name = a.file_name().unwrap().to_str().unwrap().to_owned();
        let random = name.rsplit_once('.').unwrap().1;
        assert_eq!(random.len(), 16, "{name}");
        assert!(name.starts_with(&format!("{TMP_PREFIX}{}.", std::process::id())));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn create_never_overwrites_and_remove_only_what_was_read() {
        let d = tempdir("create");
        assert!(create(&d, "a.conf", b"one", Attrs::DEFAULT).unwrap());
        assert!(!create(&d, "a.conf", b"two", Attrs::DEFAULT).unwrap());
        assert_eq!(fs::read(d.join("a.conf")).unwrap(), b"one");
        assert!(!remove(&d, "a.conf", b"two").unwrap());
        assert_eq!(fs::read(d.join("a.conf")).unwrap(), b"one");
        assert!(remove(&d, "a.conf", b"one").unwrap());
        assert!(!remove(&d, "a.conf", b"one").unwrap());
        assert_eq!(names(&d), Vec::<String>::new());
        fs::remove_dir_all(&d).unwrap();
    }
}
