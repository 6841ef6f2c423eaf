//! The conf directory as a runtime sees it: real files in a temporary directory.

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt, PermissionsExt},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::json;

use super::*;
use crate::install::{CONVERTED_FROM, entry, is_ours, tests::fixtures::*};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tapestry-confdir-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn write(&self, (name, text): (&str, &str)) {
        fs::write(self.0.join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.0.join(name)).unwrap()
    }

    fn json(&self, name: &str) -> Value {
        serde_json::from_slice(&self.read(name)).unwrap()
    }

    /// Every file, with its bytes.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(&self.0)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    fn conf(&self) -> ConfDir {
        ConfDir::new(
            &self.0,
            entry(Some(&json!({"socket": "/run/t.sock"}))).unwrap(),
        )
    }

    /// Whether the file runtimes use ends with the step, and only it holds the step.
    fn assert_chained(&self, ctx: &str) -> String {
        let files = config_files(&self.0).unwrap();
        let primary = files[0].clone();
        assert!(primary.ends_with(".conflist"), "{ctx}: {files:?}");
        let plugins = self.json(&primary)["plugins"].as_array().unwrap().clone();
        assert_eq!(
            plugins.last().unwrap(),
            &Value::Object(self.conf().entry().clone()),
            "{ctx}"
        );
        assert_eq!(plugins.iter().filter(|p| is_ours(p)).count(), 1, "{ctx}");
        for f in &files[1..] {
            let text = self.read(f);
            assert!(
                !String::from_utf8_lossy(&text).contains("tapestry"),
                "{ctx}: {f} still names tapestry"
            );
        }
        primary
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ordered(v: &Value) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
fn runtimes_order_hidden_files_included_directories_and_other_names_excluded() {
    let d = Dir::new("order");
    for name in [
        "10-calico.conflist",
        "99-loopback.conf",
        "05-cilium.conf",
        ".00-hidden.json",
        "calico-kubeconfig",
        "10-calico.conflist.cilium_bak",
        ".tapestry-install.tmp.1",
    ] {
        fs::write(d.0.join(name), "{}").unwrap();
    }
    fs::create_dir(d.0.join("00-dir.conf")).unwrap();
    std::os::unix::fs::symlink(d.0.join("99-loopback.conf"), d.0.join("50-link.conf")).unwrap();
    assert_eq!(
        config_files(&d.0).unwrap(),
        [
            ".00-hidden.json",
            "05-cilium.conf",
            "10-calico.conflist",
            "50-link.conf",
            "99-loopback.conf"
        ]
    );
}

#[test]
fn every_primary_shape_installs_idempotently_and_uninstalls_to_the_original() {
    for primary in PRIMARIES {
        let d = Dir::new("shapes");
        d.write(primary);
        d.write(LOOPBACK);
        fs::write(d.0.join("calico-kubeconfig"), "apiVersion: v1\n").unwrap();
        let before = d.snapshot();
        let conf = d.conf();
        let ctx = primary.0;

        let changes = conf.reconcile().unwrap();
        let chained = d.assert_chained(ctx);
        match Format::of(primary.0).unwrap() {
            Format::List => {
                assert_eq!(
                    changes,
                    [Change::Inserted {
                        file: primary.0.into()
                    }],
                    "{ctx}"
                );
                assert_eq!(chained, primary.0);
            }
            Format::Single => {
                assert_eq!(
                    changes,
                    [Change::Converted {
                        from: primary.0.into(),
                        to: chained.clone()
                    }],
                    "{ctx}"
                );
                assert!(!d.0.join(primary.0).exists(), "{ctx}: the .conf must go");
            }
        }
        // Everything else as it was; no temporary file left.
        let after = d.snapshot();
        for (name, bytes) in &before {
            if name != primary.0 {
                assert_eq!(after.get(name), Some(bytes), "{ctx}: {name}");
            }
        }
        assert_eq!(after.len(), before.len(), "{ctx}: {:?}", after.keys());

        // Second run: nothing written (same inode, same bytes).
        let ino = fs::metadata(d.0.join(&chained)).unwrap().ino();
        assert_eq!(conf.reconcile().unwrap(), [], "{ctx}");
        assert_eq!(
            fs::metadata(d.0.join(&chained)).unwrap().ino(),
            ino,
            "{ctx}"
        );
        assert_eq!(d.snapshot(), after, "{ctx}");

        // Uninstall: the same files; a converted .conf byte for byte, a list the same JSON in
        // the same order.
        let undone = conf.uninstall().unwrap();
        assert_eq!(undone.len(), 1, "{ctx}: {undone:?}");
        let restored = d.snapshot();
        assert_eq!(
            restored.keys().collect::<Vec<_>>(),
            before.keys().collect::<Vec<_>>(),
            "{ctx}"
        );
        for (name, bytes) in &before {
            if name == primary.0 && Format::of(name) == Some(Format::List) {
                let a: Value = serde_json::from_slice(bytes).unwrap();
                let b: Value = serde_json::from_slice(&restored[name]).unwrap();
                assert_eq!(ordered(&a), ordered(&b), "{ctx}");
            } else {
                assert_eq!(&restored[name], bytes, "{ctx}: {name}");
            }
        }
        assert_eq!(conf.uninstall().unwrap(), [], "{ctx}: uninstall twice");
    }
}

#[test]
fn the_step_follows_the_primary_when_another_file_sorts_first() {
    let d = Dir::new("moves");
    d.write(CALICO);
    let conf = d.conf();
    conf.reconcile().unwrap();

    // Cilium comes up and writes its config, which sorts first.
    d.write(CILIUM);
    let changes = conf.reconcile().unwrap();
    assert_eq!(
        changes,
        [
            Change::Inserted {
                file: CILIUM.0.into()
            },
            Change::Removed {
                file: CALICO.0.into()
            }
        ]
    );
    assert_eq!(d.assert_chained("cilium first"), CILIUM.0);
    let calico: Value = serde_json::from_str(CALICO.1).unwrap();
    assert_eq!(ordered(&d.json(CALICO.0)), ordered(&calico));

    // Cilium removed again: back into Calico's.
    fs::remove_file(d.0.join(CILIUM.0)).unwrap();
    conf.reconcile().unwrap();
    assert_eq!(d.assert_chained("calico again"), CALICO.0);
}

#[test]
fn a_converted_file_no_longer_first_gets_its_original_back() {
    let d = Dir::new("demote-conf");
    d.write(BRIDGE_CONF);
    let conf = d.conf();
    conf.reconcile().unwrap();
    let list = crate::install::list_name(BRIDGE_CONF.0);
    assert!(d.0.join(&list).exists());

    d.write(CILIUM);
    let changes = conf.reconcile().unwrap();
    assert_eq!(
        changes,
        [
            Change::Inserted {
                file: CILIUM.0.into()
            },
            Change::Restored {
                from: list.clone(),
                to: BRIDGE_CONF.0.into(),
                exact: true
            }
        ]
    );
    assert_eq!(d.read(BRIDGE_CONF.0), BRIDGE_CONF.1.as_bytes());
    assert!(!d.0.join(&list).exists());
}

#[test]
fn a_primary_that_writes_its_conf_again_is_converted_again() {
    let d = Dir::new("reconvert");
    d.write(CILIUM_CONF);
    let conf = d.conf();
    conf.reconcile().unwrap();
    let list = crate::install::list_name(CILIUM_CONF.0);

    // The agent restarts with debugging on and writes its .conf again.
    let newer = CILIUM_CONF
        .1
        .replace("\"enable-debug\": false", "\"enable-debug\": true");
    fs::write(d.0.join(CILIUM_CONF.0), &newer).unwrap();
    assert_eq!(
        conf.reconcile().unwrap(),
        [Change::Converted {
            from: CILIUM_CONF.0.into(),
            to: list.clone()
        }]
    );
    assert!(!d.0.join(CILIUM_CONF.0).exists());
    assert_eq!(d.json(&list)["plugins"][0]["enable-debug"], true);
    assert_eq!(d.json(&list)[CONVERTED_FROM]["content"], newer.as_str());
    d.assert_chained("re-converted");
    // Uninstall gives back what the agent wrote last.
    conf.uninstall().unwrap();
    assert_eq!(d.read(CILIUM_CONF.0), newer.as_bytes());
    assert!(!d.0.join(&list).exists());
}

#[test]
fn refusals_write_nothing() {
    let conf_of = |d: &Dir| d.conf();
    // No directory, an empty one, one with only non-configs.
    let missing = Dir::new("missing");
    fs::remove_dir(&missing.0).unwrap();
    let err = conf_of(&missing).reconcile().unwrap_err();
    assert!(matches!(err, InstallError::NoConfig { .. }), "{err}");
    assert!(!missing.0.exists());
    assert_eq!(conf_of(&missing).uninstall().unwrap(), []);

    let d = Dir::new("refuse");
    fs::write(d.0.join("calico-kubeconfig"), "x").unwrap();
    let err = conf_of(&d).reconcile().unwrap_err();
    assert!(err.to_string().contains("no network config in"), "{err}");

    // An invalid primary: nothing written anywhere, not even to the valid file after it.
    d.write(("00-broken.conflist", "{\"cniVersion\": \"0.3.1\", "));
    d.write(CALICO);
    let before = d.snapshot();
    let err = conf_of(&d).reconcile().unwrap_err();
    assert!(matches!(err, InstallError::NotJson { .. }), "{err}");
    assert!(err.to_string().contains("00-broken.conflist"), "{err}");
    assert!(conf_of(&d).check().is_err());
    assert_eq!(d.snapshot(), before);

    // A .conf whose .conflist name is taken by someone else's list.
    let d = Dir::new("taken");
    d.write((
        "10-a.conf",
        r#"{"cniVersion": "1.0.0", "name": "a", "type": "ptp"}"#,
    ));
    d.write((
        "10-a.conflist",
        r#"{"cniVersion": "1.0.0", "name": "b", "plugins": [{"type": "bridge"}]}"#,
    ));
    let before = d.snapshot();
    let err = conf_of(&d).reconcile().unwrap_err();
    assert!(matches!(err, InstallError::ListExists { .. }), "{err}");
    assert_eq!(d.snapshot(), before);
}

#[test]
fn mode_of_the_primary_is_kept() {
    let d = Dir::new("mode");
    d.write(CALICO);
    d.write((
        "20-x.conf",
        r#"{"cniVersion": "1.0.0", "name": "x", "type": "ptp"}"#,
    ));
    fs::set_permissions(d.0.join(CALICO.0), fs::Permissions::from_mode(0o600)).unwrap();
    d.conf().reconcile().unwrap();
    assert_eq!(
        fs::metadata(d.0.join(CALICO.0)).unwrap().mode() & 0o777,
        0o600
    );

    let d = Dir::new("mode-conf");
    d.write(CILIUM_CONF);
    fs::set_permissions(d.0.join(CILIUM_CONF.0), fs::Permissions::from_mode(0o640)).unwrap();
    d.conf().reconcile().unwrap();
    let list = crate::install::list_name(CILIUM_CONF.0);
    assert_eq!(fs::metadata(d.0.join(list)).unwrap().mode() & 0o777, 0o640);
}

fn is_symlink(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// A link whose target is being replaced (removed, then created again) still names the
/// directory to watch, or the watching installer never sees the new file (a flake CI found:
/// `watching_a_symlinked_primary_keeps_the_link_and_follows_its_target`, rewrite "Recreate").
#[test]
fn a_dangling_links_target_directory_is_still_watched() {
    let d = Dir::new("dangling");
    let elsewhere = Dir::new("dangling-target");
    std::os::unix::fs::symlink(elsewhere.0.join("gone"), d.0.join("10-calico.conflist")).unwrap();
    let target_dir = fs::canonicalize(&elsewhere.0).unwrap();
    assert_eq!(d.conf().link_target_dirs(), vec![target_dir]);
}

#[test]
fn a_symlinked_primary_stays_a_link_and_its_chained_copy_follows_the_target() {
    for primary in PRIMARIES {
        let ctx = primary.0;
        let d = Dir::new("link");
        let elsewhere = Dir::new("link-target");
        elsewhere.write(("target", primary.1));
        let link = d.0.join(primary.0);
        std::os::unix::fs::symlink(elsewhere.0.join("target"), &link).unwrap();
        d.write(LOOPBACK);
        let conf = d.conf();
        let copy = shadow_name(primary.0);

        assert_eq!(
            conf.reconcile().unwrap(),
            [Change::Shadowed {
                link: primary.0.into(),
                file: copy.clone(),
            }],
            "{ctx}"
        );
        assert!(is_symlink(&link), "{ctx}: the link was replaced");
        assert_eq!(elsewhere.read("target"), primary.1.as_bytes(), "{ctx}");
        assert_eq!(d.assert_chained(ctx), copy);
        assert_eq!(d.json(&copy)["tapestry.dev/chained-from"]["file"], ctx);
        assert!(d.json(&copy).get(CONVERTED_FROM).is_none(), "{ctx}");
        // Idempotent.
        assert_eq!(conf.reconcile().unwrap(), [], "{ctx}");

        // The link's owner updates its target: the copy follows.
        let updated = primary
            .1
            .replacen("\"type\"", "\"updated\": true, \"type\"", 1);
        elsewhere.write(("target", &updated));
        assert_eq!(conf.reconcile().unwrap().len(), 1, "{ctx}");
        assert!(is_symlink(&link), "{ctx}");
        d.assert_chained(ctx);
        assert!(
            String::from_utf8_lossy(&d.read(&copy)).contains("\"updated\": true"),
            "{ctx}"
        );

        // Uninstall removes the copy and leaves the link and its target as they are.
        assert_eq!(
            conf.uninstall().unwrap(),
            [Change::Deleted { file: copy.clone() }],
            "{ctx}"
        );
        assert!(is_symlink(&link), "{ctx}");
        assert_eq!(elsewhere.read("target"), updated.as_bytes(), "{ctx}");
        assert_eq!(config_files(&d.0).unwrap()[0], primary.0, "{ctx}");
    }
}

#[test]
fn the_chained_copy_goes_when_its_link_does() {
    let d = Dir::new("link-gone");
    let elsewhere = Dir::new("link-gone-target");
    elsewhere.write(CALICO);
    let link = d.0.join(CALICO.0);
    std::os::unix::fs::symlink(elsewhere.0.join(CALICO.0), &link).unwrap();
    let conf = d.conf();
    let copy = shadow_name(CALICO.0);
    conf.reconcile().unwrap();
    assert!(d.0.join(&copy).exists());

    // The link becomes a regular file (its owner rewrote it): the copy goes, the file is
    // chained in place.
    fs::remove_file(&link).unwrap();
    d.write(CALICO);
    let changes = conf.reconcile().unwrap();
    assert!(
        changes.contains(&Change::Deleted { file: copy.clone() }),
        "{changes:?}"
    );
    assert_eq!(d.assert_chained("regular"), CALICO.0);
    assert!(!d.0.join(&copy).exists());

    // Back to a link, then the link is removed with nothing else left: no copy survives it.
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(elsewhere.0.join(CALICO.0), &link).unwrap();
    conf.reconcile().unwrap();
    assert!(d.0.join(&copy).exists());
    fs::remove_file(&link).unwrap();
    assert_eq!(
        conf.reconcile().unwrap(),
        [Change::Deleted { file: copy.clone() }]
    );
    assert!(matches!(
        conf.reconcile(),
        Err(InstallError::NoConfig { .. })
    ));

    // A link whose target already ends with the step needs no copy.
    let chained = fs::read(d.0.join(CALICO.0)).ok();
    assert!(chained.is_none());
    let Insert::Rewrite(with_step) =
        crate::install::insert(&link, CALICO.1.as_bytes(), d.conf().entry()).unwrap()
    else {
        panic!("calico gets the step")
    };
    elsewhere.write((CALICO.0, std::str::from_utf8(&with_step).unwrap()));
    std::os::unix::fs::symlink(elsewhere.0.join(CALICO.0), &link).unwrap();
    assert_eq!(conf.reconcile().unwrap(), []);
    assert_eq!(config_files(&d.0).unwrap(), [CALICO.0]);
}
