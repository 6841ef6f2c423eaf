//! The chaining installer: puts a `tapestry-cni` step at the end of the node's primary network
//! configuration, the one container runtimes use, and takes it out again.
//!
//! This module is the pure part, over the bytes of one file: [`insert`] and [`remove`] decide what
//! a file must become, keeping every other plugin and key of the primary as it was, in its order
//! (serde_json's `preserve_order`). [`confdir`] applies that to a conf directory atomically,
//! [`binary`] copies the plugin, [`watch`] keeps it in place while the primary rewrites its file.
//!
//! How runtimes read the conf directory (libcni's `ConfFiles` as containerd, CRI-O and podman
//! call it): every non-directory whose name ends in `.conf`, `.conflist` or `.json`, hidden
//! files included, sorted bytewise; the first one is the network. Only `.conflist` is a list:
//! `.conf` and `.json` hold one plugin (a list in one is refused by containerd).
//!
//! A single-plugin file cannot be chained, so it is converted: `10-x.conf` becomes
//! `10-x.conflist` = `{cniVersion, name, plugins: [<the conf without cniVersion and name>,
//! tapestry-cni], "tapestry.dev/converted-from": {file, content}}` and `10-x.conf` is removed
//! (left in place it would still be first, as `10-x.conf` sorts before `10-x.conflist`). The
//! marker keeps the original's exact text, so [`remove`] gives the same bytes back; runtimes
//! ignore unknown top-level keys of a list. Keeping it in the converted file itself, rather than
//! in a state file beside it, means it disappears with the file when the primary deletes it.
//!
//! A primary that is a symlink (a config mounted from a ConfigMap, or kept elsewhere by its
//! owner) is never written to: replacing the link by a regular file would cut it off from every
//! later update of its target, and writing through it would edit a file the installer does not
//! own (often read-only). Instead the installer writes its own chained copy beside it,
//! [`shadow_name`] (`10-calico.conflist` -> `10-calico-tapestry.conflist`), which sorts right
//! before the link (`-` before `.`), so runtimes use it, and which names its source under
//! [`CHAINED_FROM`]. Every pass re-merges the copy from what the link reads now (the watch also
//! watches the directory of the link's target), and removes it once the link is gone, is no
//! longer a symlink, or no longer the primary; uninstall removes it. This is how Multus and
//! Cilium's chaining mode treat the primary: their own file, sorting first, derived from it.

pub mod binary;
pub mod confdir;
pub mod owner;
pub mod watch;

mod atomic;

use std::{io, path::PathBuf};

use serde_json::{Map, Value};

/// The CNI `type` of the step this installer manages, and the name of the plugin's binary.
pub const PLUGIN_TYPE: &str = "tapestry-cni";

/// The capability that makes containerd pass pod annotations in `runtimeConfig` (how the plugin
/// recognises KubeVirt's VM pods).
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// Top-level key of a list converted from a single-plugin file: `{"file", "content"}` of the
/// original.
pub const CONVERTED_FROM: &str = "tapestry.dev/converted-from";

/// Top-level key of the installer's chained copy of a symlinked primary: `{"file"}`, the name
/// of the link it was made from.
pub const CHAINED_FROM: &str = "tapestry.dev/chained-from";

/// How the name of a chained copy ends.
pub const SHADOW_SUFFIX: &str = "-tapestry.conflist";

/// Prefix of the installer's temporary files. Runtimes skip them: the names end in neither
/// `.conf`, `.conflist` nor `.json`.
pub const TMP_PREFIX: &str = ".tapestry-install.tmp.";

/// Environment variable for `--plugin-config`.
pub const PLUGIN_CONFIG_ENV: &str = "TAPESTRY_CNI_PLUGIN_CONFIG";

/// The first CNI version with `prevResult`, i.e. with chaining.
const CHAINING_SINCE: (u32, u32, u32) = (0, 3, 0);

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "no network config in {}: no .conflist, .conf or .json file (the primary CNI plugin has \
         not written its config yet)",
        dir.display()
    )]
    NoConfig { dir: PathBuf },
    #[error("primary network config {}: not valid JSON: {err}", file.display())]
    NotJson { file: PathBuf, err: String },
    #[error("primary network config {}: names no plugins: {why}", file.display())]
    NoPlugins { file: PathBuf, why: String },
    #[error("primary network config {}: {why}", file.display())]
    Unusable { file: PathBuf, why: String },
    #[error(
        "cannot convert {} into a list: {} already exists and was not written by \
         tapestry-install-cni; remove one of the two",
        file.display(),
        list.display()
    )]
    ListExists { file: PathBuf, list: PathBuf },
    #[error("--plugin-config ({PLUGIN_CONFIG_ENV}): {0}")]
    PluginConfig(String),
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: the network configs kept changing while tapestry-cni was being inserted", dir.display())]
    Busy { dir: PathBuf },
    #[error("{} was removed or renamed: nothing left to watch", dir.display())]
    DirectoryGone { dir: PathBuf },
    #[error("watching {}: {err}", dir.display())]
    Watch { dir: PathBuf, err: String },
}

impl InstallError {
    /// Maps an I/O error on `path` while doing `what`.
    pub fn io(
        path: impl Into<PathBuf>,
        what: &'static str,
    ) -> impl FnOnce(io::Error) -> InstallError {
        let path = path.into();
        move |source| InstallError::Io { path, what, source }
    }
}

/// How runtimes read a file of the conf directory, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `.conflist`: a network configuration list.
    List,
    /// `.conf` or `.json`: one plugin's configuration.
    Single,
}

impl Format {
    /// `None`: not a network config (runtimes do not read it).
    pub fn of(name: &str) -> Option<Format> {
        let (_, ext) = name.rsplit_once('.')?;
        match ext {
            "conflist" => Some(Format::List),
            "conf" | "json" => Some(Format::Single),
            _ => None,
        }
    }
}

/// The step to insert: `{"type": "tapestry-cni", "capabilities": {<annotations>: true}}` with the
/// keys of `plugin_config` (a JSON object) merged in; its `capabilities` are merged into the
/// default ones.
pub fn entry(plugin_config: Option<&Value>) -> Result<Map<String, Value>, InstallError> {
    let mut entry = Map::new();
    entry.insert("type".into(), PLUGIN_TYPE.into());
    let mut capabilities = Map::new();
    capabilities.insert(ANNOTATIONS_CAPABILITY.into(), true.into());
    entry.insert("capabilities".into(), capabilities.into());
    let Some(extra) = plugin_config else {
        return Ok(entry);
    };
    let Value::Object(extra) = extra else {
        return Err(InstallError::PluginConfig(format!(
            "must be a JSON object, got {extra}"
        )));
    };
    for (key, value) in extra {
        match (key.as_str(), value) {
            ("type", Value::String(t)) if t == PLUGIN_TYPE => {}
            ("type", other) => {
                return Err(InstallError::PluginConfig(format!(
                    "\"type\" is always {PLUGIN_TYPE:?}, got {other}"
                )));
            }
            ("capabilities", Value::Object(more)) => {
                let caps = entry["capabilities"]
                    .as_object_mut()
                    .expect("set above as an object");
                for (k, v) in more {
                    caps.insert(k.clone(), v.clone());
                }
            }
            ("capabilities", other) => {
                return Err(InstallError::PluginConfig(format!(
                    "\"capabilities\" must be an object, got {other}"
                )));
            }
            _ => {
                entry.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(entry)
}

/// What the primary file must become for the chain to end in `entry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Insert {
    /// The file already holds exactly `entry` (once): nothing to write.
    Unchanged,
    /// New content for the same file.
    Rewrite(Vec<u8>),
    /// A single-plugin file: write `content` as `list` and remove the original.
    Convert { list: String, content: Vec<u8> },
}

/// What a file must become without the installer's step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remove {
    /// No step and no conversion marker: nothing to do.
    Unchanged,
    /// New content for the same file (the step taken out).
    Rewrite(Vec<u8>),
    /// The installer's chained copy of a symlinked config: remove it.
    Delete,
    /// The list was converted from `file`: write `content` there and remove the list. `exact`:
    /// the original bytes (the list was not edited since); otherwise the single plugin that is
    /// left, as a `.conf`.
    Restore {
        file: String,
        content: Vec<u8>,
        exact: bool,
    },
}

/// Decides what `path` (the primary config, with content `text`) must become so that the chain
/// ends with `entry`. Refuses files a runtime could not run as a chain, with the reason.
pub fn insert(
    path: &std::path::Path,
    text: &[u8],
    entry: &Map<String, Value>,
) -> Result<Insert, InstallError> {
    let name = file_name(path);
    let format = Format::of(&name).unwrap_or(Format::Single);
    let mut obj = parse_object(path, text)?;
    let unusable = |why: String| InstallError::Unusable {
        file: path.to_path_buf(),
        why,
    };
    match format {
        Format::List => {
            let plugins = plugin_list(path, &obj)?;
            chainable(&obj).map_err(unusable)?;
            let ours: Vec<usize> = (0..plugins.len())
                .filter(|&i| is_ours(&plugins[i]))
                .collect();
            if ours.len() == plugins.len() {
                return Err(unusable(only_us()));
            }
            let wanted = Value::Object(entry.clone());
            if let [i] = ours[..]
                && i != 0
                && plugins[i] == wanted
            {
                return Ok(Insert::Unchanged);
            }
            let plugins = obj
                .get_mut("plugins")
                .and_then(Value::as_array_mut)
                .expect("checked by plugin_list");
            // An existing step is updated where it stands (an administrator may have placed it),
            // unless it heads the chain, where it would get no prevResult.
            let keep = ours.first().copied().filter(|&i| i != 0);
            for &i in ours.iter().rev() {
                if Some(i) != keep {
                    plugins.remove(i);
                }
            }
            match keep {
                Some(i) => plugins[i] = wanted,
                None => plugins.push(wanted),
            }
            Ok(Insert::Rewrite(to_bytes(obj)))
        }
        Format::Single => {
            match obj.get("type") {
                Some(Value::String(t)) if !t.is_empty() => {
                    if t == PLUGIN_TYPE {
                        return Err(unusable(only_us()));
                    }
                }
                _ if obj.contains_key("plugins") => {
                    return Err(unusable(
                        "it holds a plugin list, but runtimes read a .conf or .json file as a \
                         single plugin (containerd refuses it): rename it to .conflist"
                            .into(),
                    ));
                }
                _ => {
                    return Err(InstallError::NoPlugins {
                        file: path.to_path_buf(),
                        why: "it has no plugin \"type\"".into(),
                    });
                }
            }
            chainable(&obj).map_err(unusable)?;
            let mut list = list_of_single(std::mem::take(&mut obj));
            list.get_mut("plugins")
                .and_then(Value::as_array_mut)
                .expect("list_of_single makes a list")
                .push(Value::Object(entry.clone()));
            let mut marker = Map::new();
            marker.insert("file".into(), name.clone().into());
            marker.insert(
                "content".into(),
                String::from_utf8_lossy(text).into_owned().into(),
            );
            list.insert(CONVERTED_FROM.into(), marker.into());
            Ok(Insert::Convert {
                list: list_name(&name),
                content: to_bytes(list),
            })
        }
    }
}

/// Decides what `path` (content `text`) must become without the installer's step, undoing a
/// conversion. Files that are not lists never hold the step.
pub fn remove(path: &std::path::Path, text: &[u8]) -> Result<Remove, InstallError> {
    let name = file_name(path);
    if Format::of(&name) != Some(Format::List) {
        return Ok(Remove::Unchanged);
    }
    let mut obj = parse_object(path, text)?;
    if let Some(marker) = obj.get(CHAINED_FROM) {
        if shadow_marker(&name, marker).is_some() {
            return Ok(Remove::Delete);
        }
        // Not ours to follow (hand-edited?): only drop it.
        obj.shift_remove(CHAINED_FROM);
        return Ok(Remove::Rewrite(to_bytes(obj)));
    }
    let mut removed = false;
    if let Some(Value::Array(plugins)) = obj.get_mut("plugins") {
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        removed = plugins.len() != before;
    }
    let Some(marker) = obj.shift_remove(CONVERTED_FROM) else {
        return Ok(if removed {
            Remove::Rewrite(to_bytes(obj))
        } else {
            Remove::Unchanged
        });
    };
    let Some((file, original)) = valid_marker(&name, &marker) else {
        // Not ours to follow (hand-edited?): only drop it.
        return Ok(Remove::Rewrite(to_bytes(obj)));
    };
    let unchanged = serde_json::from_str::<Value>(&original)
        .ok()
        .and_then(|v| match v {
            Value::Object(o) => Some(list_of_single(o)),
            _ => None,
        })
        .is_some_and(|converted| converted == obj);
    if unchanged {
        return Ok(Remove::Restore {
            file,
            content: original.into_bytes(),
            exact: true,
        });
    }
    // Edited since the conversion: a single plugin left still fits a .conf; more stay a list.
    match obj.get("plugins") {
        Some(Value::Array(plugins)) if plugins.len() == 1 && plugins[0].is_object() => {
            let mut single = Map::new();
            for (k, v) in &obj {
                if k == "cniVersion" || k == "name" {
                    single.insert(k.clone(), v.clone());
                }
            }
            for (k, v) in plugins[0].as_object().expect("checked") {
                single.insert(k.clone(), v.clone());
            }
            Ok(Remove::Restore {
                file,
                content: to_bytes(single),
                exact: false,
            })
        }
        _ => Ok(Remove::Rewrite(to_bytes(obj))),
    }
}

/// `10-calico.conflist` -> `10-calico-tapestry.conflist`: the name of the chained copy of a
/// symlinked primary. It sorts right before its source (they share the stem, then `-` comes
/// before `.`), and since nothing sorted before the source, nothing sorts between the two.
pub fn shadow_name(source: &str) -> String {
    let stem = source.rsplit_once('.').map_or(source, |(stem, _)| stem);
    format!("{stem}{SHADOW_SUFFIX}")
}

/// The chained copy of the symlinked primary `path` (content `text`): what [`insert`] makes of
/// it, as a list that names its source under [`CHAINED_FROM`]. `None`: the source already ends
/// with the step, no copy is needed.
pub fn shadow(
    path: &std::path::Path,
    text: &[u8],
    entry: &Map<String, Value>,
) -> Result<Option<Vec<u8>>, InstallError> {
    let content = match insert(path, text, entry)? {
        Insert::Unchanged => return Ok(None),
        Insert::Rewrite(content) | Insert::Convert { content, .. } => content,
    };
    let mut obj = parse_object(path, &content)?;
    // The copy is removed, never restored: a conversion marker has nothing to say here.
    obj.shift_remove(CONVERTED_FROM);
    let mut marker = Map::new();
    marker.insert("file".into(), file_name(path).into());
    obj.insert(CHAINED_FROM.into(), marker.into());
    Ok(Some(to_bytes(obj)))
}

/// The source of the chained copy `list_file` (content `text`), if it is one: a well-formed
/// [`CHAINED_FROM`] marker naming a plain config file whose [`shadow_name`] is `list_file`.
pub fn shadow_source(list_file: &str, text: &[u8]) -> Option<String> {
    if !list_file.ends_with(SHADOW_SUFFIX) {
        return None;
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(text) else {
        return None;
    };
    shadow_marker(list_file, obj.get(CHAINED_FROM)?)
}

fn shadow_marker(list_file: &str, marker: &Value) -> Option<String> {
    let file = marker.get("file")?.as_str()?;
    let plain = !file.is_empty() && !file.contains('/') && file != "." && file != "..";
    (plain && Format::of(file).is_some() && shadow_name(file) == list_file).then(|| file.into())
}

/// Whether a list (its parsed top level) was converted from the single-plugin file `file`.
pub fn converted_from(list_file: &str, text: &[u8], file: &str) -> bool {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(text) else {
        return false;
    };
    obj.get(CONVERTED_FROM)
        .and_then(|m| valid_marker(list_file, m))
        .is_some_and(|(f, _)| f == file)
}

/// A cheap test before parsing: can this text hold the step or a conversion marker at all?
pub fn may_hold_ours(text: &[u8]) -> bool {
    let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    has(PLUGIN_TYPE.as_bytes()) || has(CONVERTED_FROM.as_bytes()) || has(CHAINED_FROM.as_bytes())
}

/// Whether a plugin object is the installer's step.
pub fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// `10-x.conf` -> `10-x.conflist`.
pub fn list_name(single: &str) -> String {
    let stem = single.rsplit_once('.').map_or(single, |(stem, _)| stem);
    format!("{stem}.conflist")
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn only_us() -> String {
    format!(
        "its only plugin is {PLUGIN_TYPE}, which must be chained after a primary plugin \
         (remove the file or put the primary's config first)"
    )
}

fn parse_object(path: &std::path::Path, text: &[u8]) -> Result<Map<String, Value>, InstallError> {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(other) => Err(InstallError::NotJson {
            file: path.to_path_buf(),
            err: format!("expected a JSON object, got {}", kind(&other)),
        }),
        Err(err) if text.iter().all(u8::is_ascii_whitespace) => Err(InstallError::NotJson {
            file: path.to_path_buf(),
            err: format!("the file is empty ({err})"),
        }),
        Err(err) => Err(InstallError::NotJson {
            file: path.to_path_buf(),
            err: err.to_string(),
        }),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn plugin_list<'a>(
    path: &std::path::Path,
    obj: &'a Map<String, Value>,
) -> Result<&'a Vec<Value>, InstallError> {
    let none = |why: String| InstallError::NoPlugins {
        file: path.to_path_buf(),
        why,
    };
    let plugins = match obj.get("plugins") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(none("its \"plugins\" list is empty".into())),
        Some(other) => {
            return Err(none(format!("\"plugins\" is {}, not a list", kind(other))));
        }
        None => return Err(none("it has no \"plugins\" list".into())),
    };
    for (i, p) in plugins.iter().enumerate() {
        match p.get("type") {
            Some(Value::String(t)) if !t.is_empty() => {}
            _ if !p.is_object() => return Err(none(format!("plugins[{i}] is not an object"))),
            _ => return Err(none(format!("plugins[{i}] has no \"type\""))),
        }
    }
    Ok(plugins)
}

/// Chaining needs prevResult, i.e. CNI 0.3.0 or later (the highest of `cniVersion` and
/// `cniVersions`, as the runtime picks it).
fn chainable(obj: &Map<String, Value>) -> Result<(), String> {
    let mut versions: Vec<&str> = Vec::new();
    match obj.get("cniVersion") {
        Some(Value::String(s)) if !s.is_empty() => versions.push(s),
        Some(Value::String(_)) | None => {}
        Some(other) => return Err(format!("\"cniVersion\" {other} is not a string")),
    }
    if let Some(Value::Array(vs)) = obj.get("cniVersions") {
        versions.extend(vs.iter().filter_map(Value::as_str));
    }
    if versions.is_empty() {
        return Err(format!(
            "it names no cniVersion; {PLUGIN_TYPE} can only be chained into 0.3.0 or later"
        ));
    }
    let best = versions
        .iter()
        .filter_map(|v| parse_version(v).map(|p| (p, *v)))
        .max();
    match best {
        None => Err(format!("cniVersion {:?} is not a version", versions[0])),
        Some((p, v)) if p < CHAINING_SINCE => Err(format!(
            "cniVersion {v} predates chaining: {PLUGIN_TYPE} can only be chained into 0.3.0 or \
             later"
        )),
        Some(_) => Ok(()),
    }
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let out = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(out)
}

/// `{cniVersion, name, plugins: [<the rest>]}`: a single-plugin config as a list, with the
/// top-level keys in the order the original had them.
fn list_of_single(single: Map<String, Value>) -> Map<String, Value> {
    let mut list = Map::new();
    let mut plugin = Map::new();
    for (k, v) in single {
        if k == "cniVersion" || k == "cniVersions" || k == "name" {
            list.insert(k, v);
        } else {
            plugin.insert(k, v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
    list
}

/// The original of a converted list, if the marker is well-formed and names a single-plugin file
/// with the list's own stem (so a marker can never make the installer write elsewhere).
fn valid_marker(list_file: &str, marker: &Value) -> Option<(String, String)> {
    let file = marker.get("file")?.as_str()?;
    let content = marker.get("content")?.as_str()?;
    let plain = !file.is_empty() && !file.contains('/') && file != "." && file != "..";
    (plain && Format::of(file) == Some(Format::Single) && list_name(file) == list_file)
        .then(|| (file.to_string(), content.to_string()))
}

fn to_bytes(obj: Map<String, Value>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&Value::Object(obj)).expect("JSON values serialize");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests;
