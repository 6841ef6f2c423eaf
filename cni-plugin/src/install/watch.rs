//! The installer's modes: once, uninstall, and watching: primaries (Calico, Cilium, Flannel)
//! rewrite or replace their config when they restart, dropping the step, so the conf directory is
//! watched with inotify and the step goes back as soon as a rewrite is complete. No debounce:
//! a pass reads a few small files, and a pass over a half-written file refuses it and waits for
//! the writer's close. The installer's own writes come back as events too; the pass they cause
//! finds nothing to change and writes nothing, which ends the loop.

use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::{Format, InstallError, PLUGIN_TYPE, binary, confdir::ConfDir};

/// The conf directory, the plugin directory and the binary to install there.
#[derive(Debug, Clone)]
pub struct Installer {
    pub conf: ConfDir,
    pub bin_dir: PathBuf,
    pub plugin_binary: PathBuf,
}

/// What an inotify event asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Conf,
    Binary,
    /// Events were lost: check both.
    Rescan,
    Gone,
}

impl Installer {
    /// Checks the conf directory first, so a refusal writes nothing; then installs the binary
    /// (before any config names it) and the step.
    pub fn once(&self) -> Result<(), InstallError> {
        self.conf.check()?;
        self.install_binary()?;
        self.reconcile()
    }

    /// Takes the step out of every config (restoring converted files), then removes the binary.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let changes = self.conf.uninstall()?;
        for c in &changes {
            info!(dir = %self.conf.dir().display(), "{c}");
        }
        if changes.is_empty() {
            info!(dir = %self.conf.dir().display(), "no network config holds {PLUGIN_TYPE}");
        }
        if binary::uninstall(&self.bin_dir)? {
            info!(path = %binary::target(&self.bin_dir).display(), "plugin binary removed");
        }
        Ok(())
    }

    /// Installs, then keeps the step in the primary config until `shutdown` completes. Config
    /// problems (no config yet, an invalid primary) are logged and waited out: the next change
    /// of the directory is checked again.
    pub async fn watch(&self, shutdown: impl Future<Output = ()>) -> Result<(), InstallError> {
        let conf_dir = self.conf.dir().to_path_buf();
        if !conf_dir.is_dir() {
            std::fs::create_dir_all(&conf_dir)
                .map_err(InstallError::io(&conf_dir, "creating the conf directory"))?;
            info!(dir = %conf_dir.display(), "created the conf directory");
        }
        std::fs::create_dir_all(&self.bin_dir).map_err(InstallError::io(
            &self.bin_dir,
            "creating the plugin directory",
        ))?;
        // Events carry the watched path joined with the name: compare in the same form.
        let conf_dir =
            std::fs::canonicalize(&conf_dir).map_err(InstallError::io(&conf_dir, "resolving"))?;
        let bin_dir = std::fs::canonicalize(&self.bin_dir)
            .map_err(InstallError::io(&self.bin_dir, "resolving"))?;

        // A full channel means a pass is already due: dropping a signal then loses nothing.
        let (tx, mut rx) = mpsc::channel(64);
        let (cd, bd) = (conf_dir.clone(), bin_dir.clone());
        // Where the symlinked configs point: watched too, their changes are config changes.
        let targets = Arc::new(Mutex::new(BTreeSet::<PathBuf>::new()));
        let tg = targets.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let signal = match res {
                Ok(event) => classify(&event, &cd, &bd, &tg.lock().expect("not poisoned")),
                Err(err) => {
                    warn!(error = %err, "watcher error; checking everything again");
                    Some(Signal::Rescan)
                }
            };
            if let Some(s) = signal {
                let _ = tx.try_send(s);
            }
        })
        .map_err(|e| InstallError::Watch {
            dir: conf_dir.clone(),
            err: e.to_string(),
        })?;
        // Watching starts before the first pass, so a change made during it is not missed.
        for dir in [&conf_dir, &bin_dir] {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| InstallError::Watch {
                    dir: dir.clone(),
                    err: e.to_string(),
                })?;
        }
        info!(
            conf_dir = %conf_dir.display(),
            bin_dir = %bin_dir.display(),
            "watching: {PLUGIN_TYPE} goes back into the primary network config whenever it is rewritten"
        );

        let mut last_error = None;
        self.log_binary();
        self.pass(&mut last_error);
        if self.watch_link_targets(&mut watcher, &targets, &conf_dir) {
            // A change made before the new watch started is not missed.
            self.pass(&mut last_error);
        }

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    info!("stopping the watch");
                    return Ok(());
                }
                first = rx.recv() => {
                    let Some(first) = first else {
                        return Err(InstallError::Watch {
                            dir: conf_dir.clone(),
                            err: "the watcher stopped".into(),
                        });
                    };
                    // Everything queued is handled by one pass.
                    let mut signals = vec![first];
                    while let Ok(s) = rx.try_recv() {
                        signals.push(s);
                    }
                    if signals.contains(&Signal::Gone) {
                        let dir = if conf_dir.is_dir() { bin_dir.clone() } else { conf_dir.clone() };
                        return Err(InstallError::DirectoryGone { dir });
                    }
                    let rescan = signals.contains(&Signal::Rescan);
                    if rescan || signals.contains(&Signal::Binary) {
                        self.log_binary();
                    }
                    if rescan || signals.contains(&Signal::Conf) {
                        self.pass(&mut last_error);
                        if self.watch_link_targets(&mut watcher, &targets, &conf_dir) {
                            self.pass(&mut last_error);
                        }
                    }
                }
            }
        }
    }

    /// Watches the directories the symlinked configs point into (and no longer those they left):
    /// an update of a link's target there must reach the installer's chained copy. `true`: a
    /// directory is newly watched.
    fn watch_link_targets(
        &self,
        watcher: &mut impl Watcher,
        targets: &Mutex<BTreeSet<PathBuf>>,
        conf_dir: &Path,
    ) -> bool {
        let wanted: BTreeSet<PathBuf> = self
            .conf
            .link_target_dirs()
            .into_iter()
            .filter(|d| d != conf_dir)
            .collect();
        // The watcher's callback takes this lock: never hold it while calling the watcher,
        // whose event thread may be waiting on it.
        let watched = targets.lock().expect("not poisoned").clone();
        for gone in watched.difference(&wanted) {
            let _ = watcher.unwatch(gone);
        }
        let mut now = BTreeSet::new();
        let mut added = false;
        for dir in wanted {
            if watched.contains(&dir) {
                now.insert(dir);
                continue;
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    info!(dir = %dir.display(), "watching the target directory of a symlinked network config");
                    now.insert(dir);
                    added = true;
                }
                Err(e) => {
                    warn!(dir = %dir.display(), "cannot watch a symlinked config's target: {e}")
                }
            }
        }
        *targets.lock().expect("not poisoned") = now;
        added
    }

    fn install_binary(&self) -> Result<(), InstallError> {
        if binary::install(&self.plugin_binary, &self.bin_dir)? {
            info!(
                path = %binary::target(&self.bin_dir).display(),
                from = %self.plugin_binary.display(),
                "plugin binary installed"
            );
        }
        Ok(())
    }

    fn log_binary(&self) {
        if let Err(e) = self.install_binary() {
            error!("{e}");
        }
    }

    fn reconcile(&self) -> Result<(), InstallError> {
        let changes = self.conf.reconcile()?;
        let dir = self.conf.dir().display();
        for c in &changes {
            info!(dir = %dir, "{c}");
        }
        if changes.is_empty() {
            debug!(dir = %dir, "the primary network config already ends with {PLUGIN_TYPE}");
        }
        Ok(())
    }

    /// One pass in watch mode; an error is logged once until it changes or clears.
    fn pass(&self, last_error: &mut Option<String>) {
        match self.reconcile() {
            Ok(()) => {
                if last_error.take().is_some() {
                    info!(dir = %self.conf.dir().display(), "the network config is usable again");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    match e {
                        InstallError::NoConfig { .. } => warn!("{msg}; waiting for one"),
                        _ => error!("{msg}; waiting for the file to change"),
                    }
                    *last_error = Some(msg);
                }
            }
        }
    }
}

/// Which events matter: in the conf directory, any change to a network config file (created,
/// closed after writing, renamed to or from, removed, attributes); in the plugin directory, the
/// same for `tapestry-cni`. Plain writes (`IN_MODIFY`) are skipped, the writer's close follows;
/// so are opens and reads, which every pass makes itself.
///
/// In a directory a symlinked config points into (`targets`), any such change counts: the
/// target's name need not look like a config (a ConfigMap's `..data/...`).
fn classify(
    event: &notify::Event,
    conf_dir: &Path,
    bin_dir: &Path,
    targets: &BTreeSet<PathBuf>,
) -> Option<Signal> {
    if event.need_rescan() {
        return Some(Signal::Rescan);
    }
    let relevant = match event.kind {
        EventKind::Access(kind) => kind == AccessKind::Close(AccessMode::Write),
        EventKind::Modify(ModifyKind::Data(_)) => false,
        _ => true,
    };
    if !relevant {
        return None;
    }
    let moved_or_removed = matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    );
    let mut signal = None;
    for path in &event.paths {
        if moved_or_removed && (path == conf_dir || path == bin_dir) {
            return Some(Signal::Gone);
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str()))
        else {
            continue;
        };
        if (parent == conf_dir && Format::of(name).is_some()) || targets.contains(parent) {
            signal = Some(Signal::Conf);
        } else if parent == bin_dir && name == PLUGIN_TYPE && signal.is_none() {
            signal = Some(Signal::Binary);
        }
    }
    signal
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    use super::*;

    fn ev(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn events_that_matter() {
        let (c, b) = (Path::new("/etc/cni/net.d"), Path::new("/opt/cni/bin"));
        let none = BTreeSet::new();
        let close_write = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let moved_to = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        let f = "/etc/cni/net.d/10-calico.conflist";
        assert_eq!(
            classify(&ev(close_write, &[f]), c, b, &none),
            Some(Signal::Conf)
        );
        assert_eq!(
            classify(&ev(moved_to, &[f]), c, b, &none),
            Some(Signal::Conf)
        );
        assert_eq!(
            classify(&ev(EventKind::Remove(RemoveKind::File), &[f]), c, b, &none),
            Some(Signal::Conf)
        );
        assert_eq!(
            classify(&ev(EventKind::Create(CreateKind::File), &[f]), c, b, &none),
            Some(Signal::Conf)
        );
        // The writer has not finished; reads and opens are the installer's own.
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(classify(&ev(data, &[f]), c, b, &none), None);
        let open = EventKind::Access(AccessKind::Open(AccessMode::Any));
        assert_eq!(classify(&ev(open, &[f]), c, b, &none), None);
        let close_read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert_eq!(classify(&ev(close_read, &[f]), c, b, &none), None);
        // Not network configs: the installer's temporary files, other files.
        for other in [
            "/etc/cni/net.d/.tapestry-install.tmp.42",
            "/etc/cni/net.d/calico-kubeconfig",
            "/etc/cni/net.d/10-x.conflist.cilium_bak",
        ] {
            assert_eq!(
                classify(&ev(moved_to, &[other]), c, b, &none),
                None,
                "{other}"
            );
        }
        // The binary, and only it, in the plugin directory.
        assert_eq!(
            classify(
                &ev(
                    EventKind::Remove(RemoveKind::File),
                    &["/opt/cni/bin/tapestry-cni"]
                ),
                c,
                b,
                &none
            ),
            Some(Signal::Binary)
        );
        assert_eq!(
            classify(&ev(close_write, &["/opt/cni/bin/bridge"]), c, b, &none),
            None
        );
        // A rename from a temporary name to a config: the config matters.
        let both = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert_eq!(
            classify(
                &ev(
                    both,
                    &["/etc/cni/net.d/.tmp", "/etc/cni/net.d/05-cilium.conflist"]
                ),
                c,
                b,
                &none
            ),
            Some(Signal::Conf)
        );
        // The directories themselves going away.
        assert_eq!(
            classify(
                &ev(EventKind::Remove(RemoveKind::Folder), &["/etc/cni/net.d"]),
                c,
                b,
                &none
            ),
            Some(Signal::Gone)
        );
        // The directory a symlinked config points into: any file there counts.
        let targets = BTreeSet::from([PathBuf::from("/etc/calico/cni")]);
        let target = "/etc/calico/cni/calico.conflist";
        assert_eq!(classify(&ev(close_write, &[target]), c, b, &none), None);
        assert_eq!(
            classify(&ev(close_write, &[target]), c, b, &targets),
            Some(Signal::Conf)
        );
        assert_eq!(
            classify(&ev(moved_to, &["/etc/calico/cni/..data"]), c, b, &targets),
            Some(Signal::Conf)
        );
        let rescan = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(classify(&rescan, c, b, &none), Some(Signal::Rescan));
    }
}
