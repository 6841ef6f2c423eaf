//! Where the desired state comes from: a standalone state file, or the Kubernetes API
//! ([`crate::kubernetes`]).
//!
//! A source publishes complete [`DesiredState`]s on a `watch` channel; the reconciler only ever
//! sees valid states. Invalid input is reported through [`SourceStatus`] and logs, and the last
//! good state stays in force, so a typo in the file never flushes the datapath.

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tapestry_api::state::{self, DesiredState, StateError};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

/// A producer of desired states.
pub trait StateSource: Send + 'static {
    /// For logs and the status API, e.g. `file /etc/tapestry/state.yaml`.
    fn describe(&self) -> String;

    /// Runs until cancelled (the task is aborted) or until every receiver of `updates` is gone,
    /// publishing each new valid state on `updates`. The first valid state is always published
    /// (generation 1), even if equal to the channel's initial value, so a consumer can wait for
    /// it before touching the datapath; later ones only when they differ. Returns an error only
    /// when the source cannot go on (e.g. its directory cannot be watched).
    fn run(
        self,
        updates: watch::Sender<Arc<DesiredState>>,
        status: watch::Sender<SourceStatus>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What a source has done so far; updated after every load attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// [`StateSource::describe`].
    pub source: String,
    /// Valid states published; 0 means none yet (the datapath should be left as it is).
    pub generation: u64,
    /// Why the current input is not in force (invalid, missing), or `None` when it is.
    pub last_error: Option<String>,
    /// When input was last read and found valid, whether or not it changed anything.
    pub last_loaded: Option<SystemTime>,
    /// The node this daemon runs on, when the source names it (Kubernetes mode's
    /// `--node-name`); the views fall back to the hostname.
    pub node: Option<String>,
}

/// Quiet time after the last file event before reloading: an editor's save is several events
/// (truncate, writes, close, rename) and the file is complete only after the last one.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Kubernetes' atomic writer (ConfigMap and Secret volumes) swaps a `..data` symlink rather
/// than touching the file's own name.
const KUBERNETES_DATA_LINK: &str = "..data";

/// The standalone state file (YAML or JSON, see [`tapestry_api::state`]).
#[derive(Debug, Clone)]
pub struct StandaloneFile {
    path: PathBuf,
}

impl StandaloneFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StandaloneFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What the watcher thread tells the source task.
#[derive(Debug)]
enum Signal {
    Reload,
    DirectoryGone,
}

impl StateSource for StandaloneFile {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn run(
        self,
        updates: watch::Sender<Arc<DesiredState>>,
        status: watch::Sender<SourceStatus>,
    ) -> anyhow::Result<()> {
        let describe = self.describe();
        let Some(name) = self.path.file_name().map(OsString::from) else {
            bail!("{describe}: not a path to a file");
        };
        // The directory, not the file: editors and `mv` replace the file (a new inode), and a
        // watch on the old inode would go quiet.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Absolute, as the paths in events are.
        let dir = std::path::absolute(&dir)
            .with_context(|| format!("{describe}: resolving directory {}", dir.display()))?;

        // Filtering happens on the watcher's thread so the channel only carries signals that
        // matter; when it is full a reload is already pending, so dropping one loses nothing.
        let (tx, mut rx) = mpsc::channel(16);
        let watched_dir = dir.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let signal = match res {
                Ok(event) => classify(&event, &watched_dir, &name),
                Err(err) => {
                    // Events may have been lost: reload to be safe.
                    warn!(error = %err, "file watcher error");
                    Some(Signal::Reload)
                }
            };
            if let Some(signal) = signal {
                let _ = tx.try_send(signal);
            }
        })
        .with_context(|| format!("{describe}: creating the file watcher"))?;
        // Watch before the first load, so a change made while loading is not missed.
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("{describe}: watching directory {}", dir.display()))?;

        let mut publisher = Publisher::new(describe.clone(), updates, status);
        publisher.reload(&self.path).await;

        let debounce = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(debounce);
        let mut pending = false;
        loop {
            tokio::select! {
                () = publisher.updates.closed() => {
                    debug!(source = %describe, "no consumer left; stopping");
                    return Ok(());
                }
                signal = rx.recv() => match signal {
                    Some(Signal::Reload) => {
                        pending = true;
                        debounce.as_mut().reset(tokio::time::Instant::now() + DEBOUNCE);
                    }
                    Some(Signal::DirectoryGone) => bail!(
                        "{describe}: directory {} was removed or renamed; the file is no longer watched",
                        dir.display()
                    ),
                    None => bail!("{describe}: file watcher stopped"),
                },
                () = &mut debounce, if pending => {
                    pending = false;
                    publisher.reload(&self.path).await;
                }
            }
        }
    }
}

/// Which events concern the file: an entry of that name created, closed after writing, renamed
/// to or from, removed, or its permissions changed. Plain writes (`IN_MODIFY`) are ignored: the
/// writer still has the file open and a reload could see it half written (an empty file is a
/// valid, empty state); its close follows. Reads and opens are ignored too, as a reload makes them.
fn classify(event: &notify::Event, dir: &Path, name: &OsStr) -> Option<Signal> {
    if event.need_rescan() {
        return Some(Signal::Reload);
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
    if moved_or_removed && event.paths.iter().any(|p| p == dir) {
        return Some(Signal::DirectoryGone);
    }
    let ours = event.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n == name || n == KUBERNETES_DATA_LINK)
    });
    ours.then_some(Signal::Reload)
}

/// Publishes states and keeps the status in step.
pub(crate) struct Publisher {
    describe: String,
    updates: watch::Sender<Arc<DesiredState>>,
    status: watch::Sender<SourceStatus>,
    last: Option<Arc<DesiredState>>,
    generation: u64,
}

impl Publisher {
    pub(crate) fn new(
        describe: String,
        updates: watch::Sender<Arc<DesiredState>>,
        status: watch::Sender<SourceStatus>,
    ) -> Self {
        // send_* variants that store the value even while nobody is subscribed.
        status.send_modify(|s| s.source = describe.clone());
        Publisher {
            describe,
            updates,
            status,
            last: None,
            generation: 0,
        }
    }

    async fn reload(&mut self, path: &Path) {
        let owned = path.to_path_buf();
        let result = match tokio::task::spawn_blocking(move || state::load(&owned)).await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // The runtime is shutting down.
            Err(_) => return,
        };
        match result {
            Ok(state) => {
                self.publish(state);
                self.set_status(None, Some(SystemTime::now()));
            }
            Err(err) if err.is_not_found() => self.missing(),
            Err(err) => self.reject(&err),
        }
    }

    /// Publishes `state` unless it equals the last one published.
    pub(crate) fn publish(&mut self, state: DesiredState) {
        let services = state.services.len();
        if self.last.as_deref() == Some(&state) {
            debug!(source = %self.describe, services, "desired state unchanged");
            return;
        }
        let state = Arc::new(state);
        self.last = Some(state.clone());
        self.updates.send_replace(state);
        self.generation += 1;
        info!(source = %self.describe, services, generation = self.generation, "desired state published");
    }

    fn missing(&mut self) {
        let message = if self.last.is_none() {
            warn!(source = %self.describe, "state file does not exist; using an empty state until it appears");
            self.publish(DesiredState::default());
            "file does not exist; an empty state is in force until it appears".to_string()
        } else {
            // Often transient (a rename in progress); flushing every service would be worse.
            warn!(source = %self.describe, "state file was removed; keeping the last good state until it reappears");
            "file was removed; the last good state stays in force until it reappears".to_string()
        };
        self.set_status(Some(message), None);
    }

    fn reject(&mut self, err: &StateError) {
        if self.last.is_some() {
            error!(source = %self.describe, "invalid desired state, keeping the last good one: {err}");
        } else {
            error!(source = %self.describe, "invalid desired state, nothing published yet: {err}");
        }
        self.set_status(Some(err.to_string()), None);
    }

    /// Names the node this daemon runs on (see [`SourceStatus::node`]).
    pub(crate) fn set_node(&self, node: &str) {
        self.status.send_modify(|s| s.node = Some(node.to_owned()));
    }

    /// `loaded` is `Some` when input was read and valid; otherwise the previous time is kept.
    pub(crate) fn set_status(&self, last_error: Option<String>, loaded: Option<SystemTime>) {
        let generation = self.generation;
        self.status.send_modify(|s| {
            s.generation = generation;
            s.last_error = last_error;
            if loaded.is_some() {
                s.last_loaded = loaded;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tapestry_api::state::{BackendSpec, ServiceSpec};

    use super::*;

    /// A fresh directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tapestry-source-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn state_with(backends: &[[u8; 4]]) -> DesiredState {
        let mut svc = ServiceSpec::new("web", [10, 96, 0, 10].into(), 80);
        svc.backends = backends
            .iter()
            .map(|ip| BackendSpec::new((*ip).into()))
            .collect();
        DesiredState {
            services: vec![svc],
        }
    }

    struct Running {
        updates: watch::Receiver<Arc<DesiredState>>,
        status: watch::Receiver<SourceStatus>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    fn start(path: &Path) -> Running {
        let (utx, updates) = watch::channel(Arc::new(DesiredState::default()));
        let (stx, status) = watch::channel(SourceStatus::default());
        let task = tokio::spawn(StandaloneFile::new(path).run(utx, stx));
        Running {
            updates,
            status,
            task,
        }
    }

    impl Running {
        async fn wait(
            &mut self,
            what: &str,
            pred: impl FnMut(&SourceStatus) -> bool,
        ) -> SourceStatus {
            let waited = tokio::time::timeout(Duration::from_secs(10), self.status.wait_for(pred))
                .await
                .map(|r| r.map(|status| status.clone()));
            match waited {
                Ok(Ok(status)) => return status,
                Ok(Err(_)) => panic!("source stopped while waiting for {what}: {:?}", self.task),
                Err(_) => {}
            }
            panic!(
                "timed out waiting for {what}; status {:?}",
                *self.status.borrow()
            );
        }

        fn current(&self) -> DesiredState {
            (**self.updates.borrow()).clone()
        }
    }

    #[tokio::test]
    async fn missing_file_is_empty_then_a_new_file_publishes() {
        let dir = TempDir::new();
        let path = dir.0.join("state.yaml");
        let mut src = start(&path);
        let st = src.wait("first state", |s| s.generation == 1).await;
        assert_eq!(st.source, format!("file {}", path.display()));
        assert!(
            st.last_error.as_deref().unwrap().contains("does not exist"),
            "{st:?}"
        );
        assert_eq!(st.last_loaded, None);
        assert_eq!(src.current(), DesiredState::default());

        std::fs::write(&path, state_with(&[[10, 200, 0, 2]]).to_yaml()).unwrap();
        let st = src.wait("the new file", |s| s.generation == 2).await;
        assert_eq!(st.last_error, None);
        assert!(st.last_loaded.is_some());
        assert_eq!(src.current(), state_with(&[[10, 200, 0, 2]]));
        src.task.abort();
    }

    #[tokio::test]
    async fn invalid_write_keeps_the_last_good_state() {
        let dir = TempDir::new();
        let path = dir.0.join("state.yaml");
        let good = state_with(&[[10, 200, 0, 2]]);
        std::fs::write(&path, good.to_yaml()).unwrap();
        let mut src = start(&path);
        src.wait("first state", |s| s.generation == 1).await;
        assert_eq!(src.current(), good);

        let bad = good
            .to_yaml()
            .replace("- ip: 10.200.0.2", "- ip: 10.200.0.2\n    port: 0");
        assert_ne!(bad, good.to_yaml());
        std::fs::write(&path, bad).unwrap();
        let st = src.wait("the error", |s| s.last_error.is_some()).await;
        let err = st.last_error.unwrap();
        assert!(err.contains("services[0].backends[0].port"), "{err}");
        assert_eq!(st.generation, 1);
        assert_eq!(src.current(), good);

        // Fixing the file publishes again and clears the error.
        let fixed = state_with(&[[10, 200, 0, 3]]);
        std::fs::write(&path, fixed.to_yaml()).unwrap();
        let st = src.wait("the fix", |s| s.generation == 2).await;
        assert_eq!(st.last_error, None);
        assert_eq!(src.current(), fixed);
        src.task.abort();
    }

    #[tokio::test]
    async fn atomic_replace_and_removal() {
        let dir = TempDir::new();
        let path = dir.0.join("state.json");
        std::fs::write(&path, state_with(&[[10, 200, 0, 2]]).to_json()).unwrap();
        let mut src = start(&path);
        src.wait("first state", |s| s.generation == 1).await;

        // As editors and `kubectl cp`-style tools do: write elsewhere, rename over.
        let replaced = state_with(&[[10, 200, 0, 2], [10, 200, 0, 3]]);
        let tmp = dir.0.join(".state.json.tmp");
        std::fs::write(&tmp, replaced.to_json()).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        src.wait("the replaced file", |s| s.generation == 2).await;
        assert_eq!(src.current(), replaced);

        // Removal keeps the state in force.
        std::fs::remove_file(&path).unwrap();
        let st = src
            .wait("the removal", |s| {
                s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("removed"))
            })
            .await;
        assert_eq!(st.generation, 2);
        assert_eq!(src.current(), replaced);

        // ...until the file comes back.
        let back = state_with(&[[10, 200, 0, 4]]);
        std::fs::write(&path, back.to_json()).unwrap();
        let st = src
            .wait("the file to come back", |s| s.generation == 3)
            .await;
        assert_eq!(st.last_error, None);
        assert_eq!(src.current(), back);
        src.task.abort();
    }

    #[tokio::test]
    async fn a_file_being_written_is_not_loaded_before_it_is_closed() {
        use std::io::Write;

        let dir = TempDir::new();
        let path = dir.0.join("state.yaml");
        let old = state_with(&[[10, 200, 0, 2]]);
        std::fs::write(&path, old.to_yaml()).unwrap();
        let mut src = start(&path);
        let first = src.wait("first state", |s| s.generation == 1).await;

        let new = state_with(&[[10, 200, 0, 3]]).to_yaml();
        let (head, tail) = new.split_at(new.len() / 2);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(head.as_bytes()).unwrap();
        file.flush().unwrap();
        // Well past the debounce: a reload now would see half a file.
        tokio::time::sleep(DEBOUNCE * 6).await;
        assert_eq!(
            *src.status.borrow(),
            first,
            "reloaded a file still being written"
        );
        file.write_all(tail.as_bytes()).unwrap();
        drop(file);
        let st = src.wait("the closed file", |s| s.generation == 2).await;
        assert_eq!(st.last_error, None);
        assert_eq!(src.current(), state_with(&[[10, 200, 0, 3]]));
        src.task.abort();
    }

    #[tokio::test]
    async fn identical_rewrite_does_not_publish() {
        let dir = TempDir::new();
        let path = dir.0.join("state.yaml");
        let state = state_with(&[[10, 200, 0, 2]]);
        std::fs::write(&path, state.to_yaml()).unwrap();
        let mut src = start(&path);
        let first = src.wait("first state", |s| s.generation == 1).await;
        let mut updates = src.updates.clone();
        updates.mark_unchanged();

        // Same content, different text: reloaded, found equal, not published.
        std::fs::write(&path, format!("# rewritten\n{}", state.to_yaml())).unwrap();
        let st = src
            .wait("the reload", |s| s.last_loaded != first.last_loaded)
            .await;
        assert_eq!(st.generation, 1);
        // Let any trailing event's reload run too.
        tokio::time::sleep(DEBOUNCE * 4).await;
        assert_eq!(src.status.borrow().generation, 1);
        assert!(!updates.has_changed().unwrap());
        src.task.abort();
    }

    #[tokio::test]
    async fn invalid_file_at_start_publishes_nothing() {
        let dir = TempDir::new();
        let path = dir.0.join("state.yaml");
        std::fs::write(
            &path,
            "services:\n- name: web\n  vip: 10.96.0.10\n  prot: 80\n",
        )
        .unwrap();
        let mut src = start(&path);
        let st = src.wait("the error", |s| s.last_error.is_some()).await;
        assert!(st.last_error.unwrap().contains("services[0].prot"));
        assert_eq!(st.generation, 0);
        assert!(!src.updates.has_changed().unwrap());
        src.task.abort();
    }

    #[tokio::test]
    async fn unrelated_files_are_ignored_and_the_source_stops_without_consumers() {
        let dir = TempDir::new();
        let path = dir.0.join("state.yaml");
        std::fs::write(&path, state_with(&[]).to_yaml()).unwrap();
        let mut src = start(&path);
        let first = src.wait("first state", |s| s.generation == 1).await;
        std::fs::write(dir.0.join("other.yaml"), "not: [valid").unwrap();
        tokio::time::sleep(DEBOUNCE * 4).await;
        assert_eq!(
            *src.status.borrow(),
            first,
            "an unrelated file caused a reload"
        );

        let Running { updates, task, .. } = src;
        drop(updates);
        let result = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("source did not stop")
            .unwrap();
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn missing_directory_is_an_error() {
        let dir = TempDir::new();
        let path = dir.0.join("absent").join("state.yaml");
        let (utx, _urx) = watch::channel(Arc::new(DesiredState::default()));
        let (stx, _srx) = watch::channel(SourceStatus::default());
        let err = StandaloneFile::new(&path).run(utx, stx).await.unwrap_err();
        assert!(format!("{err:#}").contains("watching directory"), "{err:#}");
    }
}
