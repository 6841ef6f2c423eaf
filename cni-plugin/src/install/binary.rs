//! The plugin's binary in the runtime's plugin directory (`CNI_PATH`, usually `/opt/cni/bin`).

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use super::{
    InstallError, PLUGIN_TYPE,
    atomic::{self, Attrs},
};

/// Where the plugin is installed in `bin_dir`.
pub fn target(bin_dir: &Path) -> PathBuf {
    bin_dir.join(PLUGIN_TYPE)
}

/// Copies `source` to `bin_dir/tapestry-cni` (temporary file + rename, so a runtime never runs a
/// half-written binary and a running one keeps its old inode). Other files are not touched.
/// `Ok(false)`: the same executable was already there.
pub fn install(source: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let content =
        fs::read(source).map_err(InstallError::io(source, "reading the plugin binary"))?;
    let target = target(bin_dir);
    let same = fs::read(&target).is_ok_and(|b| b == content)
        && fs::metadata(&target).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    if same {
        return Ok(false);
    }
    fs::create_dir_all(bin_dir).map_err(InstallError::io(bin_dir, "creating"))?;
    let attrs = Attrs {
        mode: 0o755,
        owner: None,
    };
    let tmp = atomic::write_tmp(bin_dir, "", &content, attrs)
        .map_err(InstallError::io(bin_dir, "writing the plugin binary"))?;
    fs::rename(&tmp, &target).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        InstallError::io(&target, "installing the plugin binary")(e)
    })?;
    atomic::sync_dir(bin_dir).map_err(InstallError::io(bin_dir, "syncing"))?;
    Ok(true)
}

/// Removes `bin_dir/tapestry-cni`. `Ok(false)`: it was not there.
pub fn uninstall(bin_dir: &Path) -> Result<bool, InstallError> {
    let target = target(bin_dir);
    match fs::remove_file(&target) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::io(target, "removing the plugin binary")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_once_and_leaves_other_binaries_alone() {
        let d = std::env::temp_dir().join(format!("tapestry-binary-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let bin = d.join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::write(bin.join("bridge"), b"other plugin").unwrap();
        let src = d.join("tapestry-cni-src");
        fs::write(&src, b"\x7fELF plugin v1").unwrap();

        assert!(install(&src, &bin).unwrap());
        assert_eq!(fs::read(target(&bin)).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(
            fs::metadata(target(&bin)).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(!install(&src, &bin).unwrap(), "same binary: no write");
        fs::write(&src, b"\x7fELF plugin v2").unwrap();
        assert!(install(&src, &bin).unwrap());
        assert_eq!(fs::read(target(&bin)).unwrap(), b"\x7fELF plugin v2");

        let mut names: Vec<_> = fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["bridge", "tapestry-cni"]);
        assert!(uninstall(&bin).unwrap());
        assert!(!uninstall(&bin).unwrap());
        assert_eq!(fs::read(bin.join("bridge")).unwrap(), b"other plugin");

        let err = install(&d.join("missing"), &bin).unwrap_err();
        assert!(
            err.to_string().contains("reading the plugin binary"),
            "{err}"
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
