//! The conf directory: which file is the primary, and bringing the directory to "the primary ends
//! with tapestry-cni, no other file holds it" (or, on uninstall, "no file holds it").

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};
use tracing::warn;

use super::{
    Format, Insert, InstallError, Remove,
    atomic::{self, Attrs},
    converted_from, insert, may_hold_ours, remove, shadow, shadow_name, shadow_source,
};

/// How often a plan is retried when another writer changes a file under it.
const ATTEMPTS: usize = 10;

/// One change made to the conf directory (logged, and returned for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The step appended to (or updated in) the primary list.
    Inserted { file: String },
    /// A single-plugin primary turned into a list ending with the step.
    Converted { from: String, to: String },
    /// The step taken out of a list (no longer the primary, or uninstall).
    Removed { file: String },
    /// The primary `link` is a symlink: left alone, the step chained into the installer's own
    /// copy `file`, which sorts before it.
    Shadowed { link: String, file: String },
    /// The installer's copy of a symlinked config removed (its source is gone, no longer a
    /// symlink or no longer the primary; or uninstall).
    Deleted { file: String },
    /// A converted list turned back into its single-plugin file; `exact`: the original bytes.
    Restored {
        from: String,
        to: String,
        exact: bool,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Inserted { file } => write!(f, "{file}: tapestry-cni chained last"),
            Change::Converted { from, to } => write!(
                f,
                "{from}: converted into {to}, with tapestry-cni chained last ({from} removed)"
            ),
            Change::Removed { file } => write!(f, "{file}: tapestry-cni taken out"),
            Change::Shadowed { link, file } => write!(
                f,
                "{link} is a symlink, left alone: tapestry-cni chained last in {file}, a copy \
                 that sorts before it and follows its target"
            ),
            Change::Deleted { file } => write!(f, "{file}: tapestry-cni's chained copy removed"),
            Change::Restored { from, to, exact } => write!(
                f,
                "{from}: tapestry-cni taken out and {to} restored{} ({from} removed)",
                if *exact {
                    ""
                } else {
                    " from the list as edited since"
                }
            ),
        }
    }
}

/// The network config files of `dir` in the order runtimes consider them (libcni `ConfFiles`:
/// non-directories named `*.conf`, `*.conflist`, `*.json`, hidden ones included, sorted
/// bytewise); the first is the one they use.
pub fn config_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if Format::of(&name).is_none() {
            continue;
        }
        let ty = entry.file_type()?;
        // A symlink counts unless it points at a directory (libcni looks at the link itself;
        // reading a directory would fail there anyway).
        if ty.is_dir() || (ty.is_symlink() && fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()))
        {
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// A conf directory and the step that belongs at the end of its primary config.
#[derive(Debug, Clone)]
pub struct ConfDir {
    dir: PathBuf,
    entry: Map<String, Value>,
}

/// What one pass will write, with what each file held when read (written only if unchanged).
#[derive(Debug)]
struct Plan {
    primary: Option<PrimaryWrite>,
    demote: Vec<Demote>,
}

#[derive(Debug)]
enum PrimaryWrite {
    Rewrite {
        file: String,
        read: Vec<u8>,
        content: Vec<u8>,
    },
    Convert {
        from: String,
        read: Vec<u8>,
        to: String,
        /// The list already there (written by an earlier conversion of `from`).
        existing: Option<Vec<u8>>,
        content: Vec<u8>,
    },
    /// The primary `link` is a symlink: its chained copy `file`.
    Shadow {
        link: String,
        file: String,
        /// The copy already there (an earlier pass's).
        existing: Option<Vec<u8>>,
        content: Vec<u8>,
    },
}

#[derive(Debug)]
struct Demote {
    file: String,
    read: Vec<u8>,
    remove: Remove,
}

/// A file vanished or changed between reading and writing: plan again.
struct Conflict;

impl ConfDir {
    pub fn new(dir: impl Into<PathBuf>, entry: Map<String, Value>) -> ConfDir {
        ConfDir {
            dir: dir.into(),
            entry,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entry(&self) -> &Map<String, Value> {
        &self.entry
    }

    /// Whether the directory can take the step, without writing anything: the refusals of
    /// [`ConfDir::reconcile`].
    pub fn check(&self) -> Result<(), InstallError> {
        for _ in 0..ATTEMPTS {
            if let Ok(_plan) = self.plan()? {
                return Ok(());
            }
        }
        Err(InstallError::Busy {
            dir: self.dir.clone(),
        })
    }

    /// Puts the step at the end of the primary config and takes it out of every other file.
    /// Writes nothing when that is already so. Refuses (writing nothing) when there is no
    /// config, or the primary is not JSON or names no plugins.
    pub fn reconcile(&self) -> Result<Vec<Change>, InstallError> {
        let mut changes = Vec::new();
        for _ in 0..ATTEMPTS {
            let Ok(plan) = self.plan()? else { continue };
            if self.apply(plan, &mut changes)?.is_ok() {
                return Ok(changes);
            }
        }
        Err(InstallError::Busy {
            dir: self.dir.clone(),
        })
    }

    /// Takes the step out of every list of the directory, turning converted lists back into
    /// their original file. A missing directory has nothing to undo.
    pub fn uninstall(&self) -> Result<Vec<Change>, InstallError> {
        let mut changes = Vec::new();
        'attempt: for _ in 0..ATTEMPTS {
            let files = match config_files(&self.dir) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changes),
                Err(e) => return Err(InstallError::io(&self.dir, "listing")(e)),
            };
            for file in files {
                let Some(d) = self.demotion(&file)? else {
                    continue;
                };
                if self.demote(d, &mut changes)?.is_err() {
                    continue 'attempt;
                }
            }
            return Ok(changes);
        }
        Err(InstallError::Busy {
            dir: self.dir.clone(),
        })
    }

    /// `Ok(Err(Conflict))`: a file changed while it was read; try again.
    fn plan(&self) -> Result<Result<Plan, Conflict>, InstallError> {
        let files = config_files(&self.dir).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                InstallError::NoConfig {
                    dir: self.dir.clone(),
                }
            } else {
                InstallError::io(&self.dir, "listing")(e)
            }
        })?;
        // The installer's own copies of symlinked configs sort first: the primary is the first
        // file that is not one.
        let mut shadows = Vec::new();
        let mut primary = None;
        for file in &files {
            if file.ends_with(super::SHADOW_SUFFIX) {
                let Some(text) = self.read(file)? else {
                    return Ok(Err(Conflict));
                };
                if let Some(source) = shadow_source(file, &text) {
                    shadows.push((file.clone(), text, source));
                    continue;
                }
            }
            primary = Some(file);
            break;
        }
        let Some(primary) = primary else {
            if shadows.is_empty() {
                return Err(InstallError::NoConfig {
                    dir: self.dir.clone(),
                });
            }
            // Only copies whose sources are gone: remove them, runtimes must not use them.
            let demote = shadows
                .into_iter()
                .map(|(file, read, _)| Demote {
                    file,
                    read,
                    remove: Remove::Delete,
                })
                .collect();
            return Ok(Ok(Plan {
                primary: None,
                demote,
            }));
        };
        let Some(read) = self.read(primary)? else {
            return Ok(Err(Conflict));
        };
        let path = self.dir.join(primary);
        let (write, keep) = if self.is_symlink(primary) {
            let file = shadow_name(primary);
            let existing = shadows
                .iter()
                .find(|(f, _, source)| *f == file && source == primary)
                .map(|(_, text, _)| text.clone());
            match shadow(&path, &read, &self.entry)? {
                // The link's target already ends with the step: no copy is needed.
                None => (None, None),
                Some(content) if existing.as_ref() == Some(&content) => (None, Some(file)),
                Some(content) => (
                    Some(PrimaryWrite::Shadow {
                        link: primary.clone(),
                        file: file.clone(),
                        existing,
                        content,
                    }),
                    Some(file),
                ),
            }
        } else {
            match insert(&path, &read, &self.entry)? {
                Insert::Unchanged => (None, None),
                Insert::Rewrite(content) => (
                    Some(PrimaryWrite::Rewrite {
                        file: primary.clone(),
                        read,
                        content,
                    }),
                    None,
                ),
                Insert::Convert { list, content } => {
                    let existing = if files.contains(&list) {
                        let Some(text) = self.read(&list)? else {
                            return Ok(Err(Conflict));
                        };
                        if !converted_from(&list, &text, primary) {
                            return Err(InstallError::ListExists {
                                file: path,
                                list: self.dir.join(&list),
                            });
                        }
                        Some(text)
                    } else {
                        None
                    };
                    let to = list.clone();
                    (
                        Some(PrimaryWrite::Convert {
                            from: primary.clone(),
                            read,
                            to,
                            existing,
                            content,
                        }),
                        Some(list),
                    )
                }
            }
        };
        let mut demote = Vec::new();
        for file in &files {
            if file == primary || Some(file) == keep.as_ref() {
                continue;
            }
            if let Some(d) = self.demotion(file)? {
                if let Remove::Restore { file: original, .. } = &d.remove
                    && original < primary
                {
                    // Restoring it would make it the primary and undo this very pass.
                    warn!(
                        file = %d.file,
                        "not restoring {original}: it would sort before the primary {primary}"
                    );
                    continue;
                }
                demote.push(d);
            }
        }
        Ok(Ok(Plan {
            primary: write,
            demote,
        }))
    }

    /// What a file other than the primary must become; `None`: nothing (or not readable as
    /// JSON, which is then left alone).
    fn demotion(&self, file: &str) -> Result<Option<Demote>, InstallError> {
        if Format::of(file) != Some(Format::List) {
            return Ok(None);
        }
        let Some(read) = self.read(file)? else {
            return Ok(None);
        };
        if !may_hold_ours(&read) {
            return Ok(None);
        }
        match remove(&self.dir.join(file), &read) {
            Ok(Remove::Unchanged) => Ok(None),
            // Rewriting a symlink would replace it by a regular file, cut off from its target.
            Ok(_) if self.is_symlink(file) => {
                warn!(
                    file,
                    "left alone: it is a symlink (runtimes do not use it, the file sorts after \
                     the primary)"
                );
                Ok(None)
            }
            Ok(remove) => Ok(Some(Demote {
                file: file.to_owned(),
                read,
                remove,
            })),
            Err(e) => {
                warn!(file, "left alone: {e}");
                Ok(None)
            }
        }
    }

    fn apply(
        &self,
        plan: Plan,
        changes: &mut Vec<Change>,
    ) -> Result<Result<(), Conflict>, InstallError> {
        let dir = &self.dir;
        match plan.primary {
            None => {}
            Some(PrimaryWrite::Rewrite {
                file,
                read,
                content,
            }) => {
                if !atomic::replace(dir, &file, &read, &content)
                    .map_err(InstallError::io(dir.join(&file), "writing"))?
                {
                    return Ok(Err(Conflict));
                }
                changes.push(Change::Inserted { file });
            }
            Some(PrimaryWrite::Convert {
                from,
                read,
                to,
                existing,
                content,
            }) => {
                let written = match &existing {
                    Some(old) if *old == content => true,
                    Some(old) => atomic::replace(dir, &to, old, &content)
                        .map_err(InstallError::io(dir.join(&to), "writing"))?,
                    None => atomic::create(dir, &to, &content, Attrs::of(&dir.join(&from)))
                        .map_err(InstallError::io(dir.join(&to), "writing"))?,
                };
                if !written {
                    return Ok(Err(Conflict));
                }
                if !atomic::remove(dir, &from, &read)
                    .map_err(InstallError::io(dir.join(&from), "removing"))?
                {
                    // Rewritten (or removed) by its owner meanwhile: the next pass converts the
                    // new content.
                    return Ok(Err(Conflict));
                }
                changes.push(Change::Converted { from, to });
            }
            Some(PrimaryWrite::Shadow {
                link,
                file,
                existing,
                content,
            }) => {
                let written = match &existing {
                    Some(old) => atomic::replace(dir, &file, old, &content),
                    // The mode of what the link points at.
                    None => atomic::create(dir, &file, &content, Attrs::of(&dir.join(&link))),
                }
                .map_err(InstallError::io(dir.join(&file), "writing"))?;
                if !written {
                    return Ok(Err(Conflict));
                }
                changes.push(Change::Shadowed { link, file });
            }
        }
        for d in plan.demote {
            if self.demote(d, changes)?.is_err() {
                return Ok(Err(Conflict));
            }
        }
        Ok(Ok(()))
    }

    fn demote(
        &self,
        d: Demote,
        changes: &mut Vec<Change>,
    ) -> Result<Result<(), Conflict>, InstallError> {
        let dir = &self.dir;
        let path = dir.join(&d.file);
        match d.remove {
            Remove::Unchanged => {}
            Remove::Rewrite(content) => {
                if !atomic::replace(dir, &d.file, &d.read, &content)
                    .map_err(InstallError::io(&path, "writing"))?
                {
                    return Ok(Err(Conflict));
                }
                changes.push(Change::Removed { file: d.file });
            }
            Remove::Delete => {
                if !atomic::remove(dir, &d.file, &d.read)
                    .map_err(InstallError::io(&path, "removing"))?
                {
                    return Ok(Err(Conflict));
                }
                changes.push(Change::Deleted { file: d.file });
            }
            Remove::Restore {
                file,
                content,
                exact,
            } => {
                // If the owner wrote the original again meanwhile, its new file wins.
                atomic::create(dir, &file, &content, Attrs::of(&path))
                    .map_err(InstallError::io(dir.join(&file), "writing"))?;
                if !atomic::remove(dir, &d.file, &d.read)
                    .map_err(InstallError::io(&path, "removing"))?
                {
                    return Ok(Err(Conflict));
                }
                changes.push(Change::Restored {
                    from: d.file,
                    to: file,
                    exact,
                });
            }
        }
        Ok(Ok(()))
    }

    fn is_symlink(&self, file: &str) -> bool {
        fs::symlink_metadata(self.dir.join(file)).is_ok_and(|m| m.file_type().is_symlink())
    }

    /// The directories holding the targets of the symlinked config files: a change there is a
    /// change of the config (the watch watches them too).
    pub fn link_target_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = config_files(&self.dir)
            .unwrap_or_default()
            .iter()
            .filter(|f| self.is_symlink(f))
            .filter_map(|f| {
                let link = self.dir.join(f);
                if let Ok(target) = fs::canonicalize(&link) {
                    return target.parent().map(Into::into);
                }
                // A dangling link (its target being replaced: removed, then created again):
                // the directory it points into is still the one to watch, or the new file
                // would never be seen.
                let target = fs::read_link(&link).ok()?;
                let target = if target.is_absolute() {
                    target
                } else {
                    self.dir.join(target)
                };
                let parent = target.parent()?;
                Some(fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf()))
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// A file's bytes; `None` when it vanished since the listing.
    fn read(&self, file: &str) -> Result<Option<Vec<u8>>, InstallError> {
        let path = self.dir.join(file);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            // Gone since the listing, unless a dangling symlink is still there.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(&path).is_err() =>
            {
                Ok(None)
            }
            Err(e) => Err(InstallError::io(path, "reading")(e)),
        }
    }
}

#[cfg(test)]
mod tests;
