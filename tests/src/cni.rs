//! A CNI runtime for tests: executes a network configuration list the way the CNI
//! specification (SPEC.md, section 3 "Execution of Network Configurations") and libcni
//! (`libcni/api.go`) do, so plugins can be tested exactly as kubelet/containerd, CRI-O or podman
//! would drive them, without any of those.
//!
//! ```no_run
//! use serde_json::json;
//! use tapestry_tests::cni::{NetworkConfigList, Runtime, RuntimeConf};
//!
//! let rt = Runtime::new(["/usr/lib/cni"], "/tmp/cni-cache");
//! let list = NetworkConfigList::from_value(&json!({
//!     "cniVersion": "1.0.0", "name": "net1",
//!     "plugins": [{"type": "bridge", "bridge": "br-test", "ipam": {"type": "host-local",
//!         "ranges": [[{"subnet": "10.99.0.0/24"}]]}}]
//! })).unwrap();
//! let conf = RuntimeConf::new("c1", "/run/netns/c1", "eth0");
//! let result = rt.add(&list, &conf).unwrap(); // the final plugin's result, cached
//! rt.check(&list, &conf).unwrap();            // prevResult = the cached result
//! rt.del(&list, &conf).unwrap();              // reverse order, prevResult = cached result
//! ```
//!
//! What it does, operation by operation (spec section 3, libcni where the spec is silent):
//! - **ADD**: plugins in order; each gets the plugin object with `name` and `cniVersion` injected,
//!   `prevResult` = the previous plugin's result (absent for the first), `runtimeConfig` = the
//!   capability arguments the plugin declares in `capabilities` (only when non-empty), and
//!   `capabilities` removed (spec: "must not be set"; libcni leaves it in). Stops at the first
//!   error. The last result is cached in `<cache_dir>/results/<net>-<containerID>-<ifname>` in
//!   libcni's `cniCacheV1` format.
//! - **DEL**: plugins in reverse order with `prevResult` = the cached ADD result (from 0.4.0;
//!   converted to the list's version), stops at the first error, then removes the cache entry.
//!   Without a cache entry the plugins get no `prevResult` (they must still succeed).
//! - **CHECK** (0.4.0+; refused below): plugins in order with `prevResult` = the cached result;
//!   stops at the first error; `disableCheck` makes it a no-op. Refused without a cached result
//!   (spec: a runtime must not CHECK a container that was not added).
//! - **GC** (libcni's `GCNetworkList`): unless `disableGC`, first DELs every cached attachment of
//!   this network not in the valid list, then (1.1.0+) calls GC on every plugin with
//!   `cni.dev/valid-attachments` injected (only the spec's key: libcni also sends the misnamed
//!   `cni.dev/attachments`), continuing past errors and returning all of them.
//! - **STATUS** (1.1.0+; refused below, where libcni silently succeeds): every plugin in order,
//!   stops at the first error.
//! - **VERSION**: `{"cniVersion": "1.1.0"}` on stdin, only `CNI_COMMAND` set.
//!
//! Environment: plugins run with a cleared environment plus `PATH`, the `CNI_*` variables the
//! spec defines for the command (ADD/DEL/CHECK: all six, `CNI_ARGS` as `K=V;K=V`; GC and STATUS:
//! `CNI_COMMAND` and `CNI_PATH` only; VERSION: `CNI_COMMAND` only) and whatever
//! [`Runtime::with_env`] adds, so nothing leaks from the test's environment. `CNI_PATH` is the
//! runtime's plugin directories joined with `:`; a plugin is the first executable named after its
//! `type` in those directories.
//!
//! Failures are [`CniError`]s: a plugin that exits non-zero is [`CniError::Plugin`], with its
//! error object (code, msg, details) parsed when stdout has one ([`CniError::code`]); a
//! successful run whose output breaks the spec (wrong `cniVersion`, malformed
//! `ips`/`interfaces`; see [`validate_result`]) is [`CniError::BadResult`]; the runtime's own
//! refusals are [`CniError::Runtime`]. Every invocation is recorded ([`Runtime::history`]).

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

/// The highest CNI version this runtime implements.
pub const MAX_VERSION: &str = "1.1.0";
/// Every released CNI version, oldest first.
pub const SPEC_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// libcni's cache record kind.
const CACHE_KIND: &str = "cniCacheV1";
/// Default time a plugin may run.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Versions
// ---------------------------------------------------------------------------------------------

/// `(major, minor, patch)` of a version string like `"0.3.1"`.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    if it.next().is_some() {
        return None;
    }
    Some(r)
}

/// `a >= b` for version strings; unparseable versions compare as false.
pub fn version_ge(a: &str, b: &str) -> bool {
    match (parse_version(a), parse_version(b)) {
        (Some(a), Some(b)) => a >= b,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A CNI error object (spec section 5 "Error").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorObject {
    pub cni_version: Option<String>,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// A plugin run that failed, or succeeded with output that breaks the spec.
#[derive(Debug, Clone)]
pub struct PluginFailure {
    /// The plugin's `type`.
    pub plugin: String,
    /// `CNI_COMMAND`.
    pub command: String,
    pub exit_code: Option<i32>,
    /// The error object the plugin printed on stdout, if it printed one.
    pub error: Option<ErrorObject>,
    /// Why a successful run's output is refused ([`CniError::BadResult`]).
    pub reason: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone)]
pub enum CniError {
    /// The plugin exited non-zero; `error` holds its error object when stdout had one (without
    /// one, libcni reports code 0 and "netplugin failed ...").
    Plugin(Box<PluginFailure>),
    /// The plugin succeeded but its output breaks the spec.
    BadResult(Box<PluginFailure>),
    /// The runtime refused: bad configuration or parameters, plugin not found, an operation the
    /// list's version lacks, a cache problem, a timeout.
    Runtime(String),
    /// GC runs every plugin and reports every failure.
    Multiple(Vec<CniError>),
}

impl CniError {
    /// The plugin's error code, if the plugin printed an error object.
    pub fn code(&self) -> Option<u32> {
        self.error_object().map(|e| e.code)
    }

    /// The plugin's error object, if it printed one.
    pub fn error_object(&self) -> Option<&ErrorObject> {
        match self {
            CniError::Plugin(f) => f.error.as_ref(),
            CniError::Multiple(v) => v.iter().find_map(|e| e.error_object()),
            _ => None,
        }
    }

    /// The plugin that failed (`None` for the runtime's own errors).
    pub fn plugin(&self) -> Option<&str> {
        match self {
            CniError::Plugin(f) | CniError::BadResult(f) => Some(&f.plugin),
            CniError::Multiple(v) => v.iter().find_map(|e| e.plugin()),
            CniError::Runtime(_) => None,
        }
    }

    fn runtime(msg: impl Into<String>) -> Self {
        CniError::Runtime(msg.into())
    }

    fn bad_result(plugin: &str, command: &str, reason: String, stdout: String) -> Self {
        CniError::BadResult(Box::new(PluginFailure {
            plugin: plugin.into(),
            command: command.into(),
            exit_code: Some(0),
            error: None,
            reason: Some(reason),
            stdout,
            stderr: String::new(),
        }))
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CniError::Plugin(p) => {
                write!(
                    f,
                    "plugin type={:?} failed ({}, exit {:?}): ",
                    p.plugin, p.command, p.exit_code
                )?;
                match &p.error {
                    Some(e) => {
                        write!(f, "code {}: {}", e.code, e.msg)?;
                        if !e.details.is_empty() {
                            write!(f, ": {}", e.details)?;
                        }
                    }
                    None => write!(f, "no error object; stdout: {:?}", p.stdout.trim())?,
                }
                if !p.stderr.trim().is_empty() {
                    write!(f, "\nstderr: {}", p.stderr.trim())?;
                }
                Ok(())
            }
            CniError::BadResult(p) => write!(
                f,
                "plugin type={:?} ({}) printed output that breaks the spec: {}; stdout: {}",
                p.plugin,
                p.command,
                p.reason.as_deref().unwrap_or_default(),
                p.stdout.trim()
            ),
            CniError::Runtime(m) => write!(f, "cni runtime: {m}"),
            CniError::Multiple(v) => {
                write!(f, "{} errors:", v.len())?;
                for e in v {
                    write!(f, "\n- {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CniError {}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// A parsed network configuration list (spec section 1).
#[derive(Debug, Clone)]
pub struct NetworkConfigList {
    pub name: String,
    /// The version selected from `cniVersion` and `cniVersions` (the highest not above
    /// [`MAX_VERSION`], as libcni selects it).
    pub cni_version: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// The plugin configuration objects, unchanged.
    pub plugins: Vec<Map<String, Value>>,
    bytes: Vec<u8>,
}

impl NetworkConfigList {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::runtime(format!("error parsing configuration list: {e}")))?;
        let mut list = Self::from_value(&v)?;
        list.bytes = bytes.to_vec();
        Ok(list)
    }

    pub fn from_value(v: &Value) -> Result<Self, CniError> {
        let err = |m: String| CniError::runtime(format!("error parsing configuration list: {m}"));
        let obj = v.as_object().ok_or_else(|| err("not an object".into()))?;
        let name = match obj.get("name") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(err(format!("invalid name {other}"))),
            None => return Err(err("no name".into())),
        };
        let mut cni_version = match obj.get("cniVersion") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(err(format!("invalid cniVersion {other}"))),
            None => String::new(),
        };
        if let Some(vs) = obj.get("cniVersions") {
            let vs = vs
                .as_array()
                .ok_or_else(|| err("invalid type for cniVersions".into()))?;
            let mut candidates = Vec::new();
            for v in vs {
                let s = v
                    .as_str()
                    .ok_or_else(|| err(format!("invalid cniVersions entry {v}")))?;
                if parse_version(s).is_none() {
                    return Err(err(format!("invalid cniVersions entry {s}")));
                }
                if version_ge(MAX_VERSION, s) {
                    candidates.push(s.to_string());
                }
            }
            if !cni_version.is_empty() && version_ge(MAX_VERSION, &cni_version) {
                candidates.push(cni_version.clone());
            }
            candidates.sort_by_key(|s| parse_version(s));
            if let Some(best) = candidates.pop() {
                cni_version = best;
            }
        }
        if cni_version.is_empty() {
            // libcni's default for a configuration without a version.
            cni_version = "0.1.0".into();
        }
        if parse_version(&cni_version).is_none() {
            return Err(err(format!("invalid cniVersion {cni_version:?}")));
        }
        let read_bool = |key: &str| -> Result<bool, CniError> {
            match obj.get(key) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
                Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
                Some(other) => Err(err(format!("invalid value {other} for {key}"))),
            }
        };
        let disable_check = read_bool("disableCheck")?;
        let disable_gc = read_bool("disableGC")?;
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or_else(|| err("no 'plugins' list".into()))?;
        if plugins.is_empty() {
            return Err(err("no plugins in list".into()));
        }
        let mut out = Vec::new();
        for (i, p) in plugins.iter().enumerate() {
            let p = p
                .as_object()
                .ok_or_else(|| err(format!("plugin {i} is not an object")))?;
            match p.get("type") {
                Some(Value::String(t)) if !t.is_empty() && !t.contains('/') => {}
                _ => return Err(err(format!("plugin {i}: missing or invalid type"))),
            }
            out.push(p.clone());
        }
        Ok(NetworkConfigList {
            name,
            cni_version,
            disable_check,
            disable_gc,
            plugins: out,
            bytes: serde_json::to_vec(v).unwrap_or_default(),
        })
    }

    /// The same list forced to another `cniVersion` (dropping `cniVersions`).
    pub fn with_version(&self, version: &str) -> Result<Self, CniError> {
        let mut v: Value = serde_json::from_slice(&self.bytes)
            .map_err(|e| CniError::runtime(format!("re-reading list: {e}")))?;
        v["cniVersion"] = json!(version);
        if let Some(o) = v.as_object_mut() {
            o.remove("cniVersions");
        }
        Self::from_value(&v)
    }

    fn plugin_type(plugin: &Map<String, Value>) -> &str {
        plugin.get("type").and_then(Value::as_str).unwrap_or("")
    }
}

/// The per-attachment parameters (spec section 3 "Attachment Parameters").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeConf {
    pub container_id: String,
    /// Path of the network namespace (`CNI_NETNS`).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` pairs, in order.
    pub args: Vec<(String, String)>,
    /// Capability arguments: keys a plugin declares in `capabilities` end up in its
    /// `runtimeConfig`.
    pub capability_args: Map<String, Value>,
}

impl RuntimeConf {
    pub fn new(container_id: &str, netns: impl AsRef<Path>, ifname: &str) -> Self {
        RuntimeConf {
            container_id: container_id.into(),
            netns: netns.as_ref().to_string_lossy().into_owned(),
            ifname: ifname.into(),
            ..Default::default()
        }
    }

    pub fn arg(mut self, key: &str, value: &str) -> Self {
        self.args.push((key.into(), value.into()));
        self
    }

    pub fn capability(mut self, key: &str, value: Value) -> Self {
        self.capability_args.insert(key.into(), value);
        self
    }

    /// `CNI_ARGS`: `K=V;K=V`.
    pub fn args_string(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// An entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A plugin's answer to VERSION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

impl VersionInfo {
    pub fn supports(&self, v: &str) -> bool {
        self.supported_versions.iter().any(|s| s == v)
    }
}

/// An attachment found in the result cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAttachment {
    pub network: String,
    pub conf: RuntimeConf,
    pub result: Option<Value>,
}

/// One plugin execution, as recorded by the runtime.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub plugin: String,
    /// The `CNI_*` variables and [`Runtime::with_env`] extras (not `PATH`).
    pub env: Vec<(String, String)>,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    pub duration: Duration,
}

impl Invocation {
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn command(&self) -> &str {
        self.env("CNI_COMMAND").unwrap_or("")
    }

    pub fn stdin_json(&self) -> Option<Value> {
        serde_json::from_str(&self.stdin).ok()
    }
}

/// What a plugin process did.
#[derive(Debug, Clone)]
pub struct RawOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// The runtime
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Runtime {
    plugin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
    extra_env: Vec<(String, String)>,
    timeout: Duration,
    strict: bool,
    history: Mutex<Vec<Invocation>>,
}

impl Runtime {
    /// A runtime finding plugins in `plugin_dirs` (in order) and caching results under
    /// `cache_dir/results`.
    pub fn new<P: AsRef<Path>>(
        plugin_dirs: impl IntoIterator<Item = P>,
        cache_dir: impl AsRef<Path>,
    ) -> Self {
        Runtime {
            plugin_dirs: plugin_dirs
                .into_iter()
                .map(|p| p.as_ref().to_path_buf())
                .collect(),
            cache_dir: cache_dir.as_ref().to_path_buf(),
            extra_env: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            strict: true,
            history: Mutex::new(Vec::new()),
        }
    }

    /// Adds a variable to every plugin's environment (e.g. `RUST_LOG`).
    pub fn with_env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.extra_env
            .push((key.into(), value.as_ref().to_string_lossy().into_owned()));
        self
    }

    /// How long a plugin may run before it is killed and the operation fails (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Accepts ADD results that break the spec (by default they fail the operation, see
    /// [`validate_result`]).
    pub fn lenient(mut self) -> Self {
        self.strict = false;
        self
    }

    pub fn plugin_dirs(&self) -> &[PathBuf] {
        &self.plugin_dirs
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// `CNI_PATH`: the plugin directories joined with `:`.
    pub fn cni_path(&self) -> String {
        self.plugin_dirs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Every plugin execution so far, oldest first.
    pub fn history(&self) -> Vec<Invocation> {
        self.history.lock().unwrap().clone()
    }

    pub fn clear_history(&self) {
        self.history.lock().unwrap().clear();
    }

    /// Path of the first executable called `plugin` in the plugin directories.
    pub fn find_plugin(&self, plugin: &str) -> Result<PathBuf, CniError> {
        if plugin.is_empty() || plugin.contains('/') {
            return Err(CniError::runtime(format!("invalid plugin type {plugin:?}")));
        }
        for dir in &self.plugin_dirs {
            let p = dir.join(plugin);
            if let Ok(m) = fs::metadata(&p)
                && m.is_file()
                && m.permissions().mode() & 0o111 != 0
            {
                return Ok(p);
            }
        }
        Err(CniError::runtime(format!(
            "failed to find plugin {plugin:?} in path {:?}",
            self.plugin_dirs
        )))
    }

    /// The environment the spec defines for an attachment command (ADD, DEL, CHECK).
    pub fn attachment_env(&self, command: &str, rt: &RuntimeConf) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), rt.container_id.clone()),
            ("CNI_NETNS".into(), rt.netns.clone()),
            ("CNI_IFNAME".into(), rt.ifname.clone()),
            ("CNI_ARGS".into(), rt.args_string()),
            ("CNI_PATH".into(), self.cni_path()),
        ]
    }

    /// Runs `plugin` with exactly `env` (plus `PATH` and the [`Runtime::with_env`] extras) and
    /// `stdin`, and returns what it did. For tests of a plugin's own input handling (bad
    /// environment, bad JSON); the operations below use [`Runtime::invoke`].
    pub fn exec_raw(
        &self,
        plugin: &str,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<RawOutput, CniError> {
        let path = self.find_plugin(plugin)?;
        let mut full_env = self.extra_env.clone();
        full_env.extend(env.iter().cloned());
        let started = Instant::now();
        let out = run_with_timeout(&path, &full_env, stdin, self.timeout)
            .map_err(|e| CniError::runtime(format!("executing {}: {e}", path.display())))?;
        self.history.lock().unwrap().push(Invocation {
            plugin: plugin.into(),
            env: full_env,
            stdin: String::from_utf8_lossy(stdin).into_owned(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit_code: out.status.code(),
            duration: started.elapsed(),
        });
        Ok(out)
    }

    /// [`Runtime::exec_raw`] and interpretation of the outcome: a non-zero exit is an error
    /// (parsed from the error object on stdout when there is one); on success, the JSON on
    /// stdout (`None` when it printed nothing).
    pub fn invoke(
        &self,
        plugin: &str,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<Option<Value>, CniError> {
        let command = env
            .iter()
            .find(|(k, _)| k == "CNI_COMMAND")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let out = self.exec_raw(plugin, env, stdin)?;
        interpret(plugin, &command, &out)
    }

    /// ADD: every plugin in order, each given the previous one's result; returns (and caches)
    /// the final result.
    pub fn add(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<Value, CniError> {
        validate_container_id(&rt.container_id)?;
        validate_network_name(&list.name)?;
        validate_ifname(&rt.ifname)?;
        let mut prev: Option<Value> = None;
        for plugin in &list.plugins {
            let ty = NetworkConfigList::plugin_type(plugin);
            let conf = build_attachment_conf(list, plugin, prev.as_ref(), rt);
            let env = self.attachment_env("ADD", rt);
            let stdin = serde_json::to_vec(&conf).expect("serializable");
            let mut result = match self.invoke(ty, &env, &stdin)? {
                Some(r) => r,
                None => {
                    return Err(CniError::bad_result(
                        ty,
                        "ADD",
                        "no result on stdout".into(),
                        String::new(),
                    ));
                }
            };
            if self.strict {
                validate_result(&list.cni_version, &result).map_err(|reason| {
                    CniError::bad_result(ty, "ADD", reason, result.to_string())
                })?;
            } else if result.get("cniVersion").is_none() {
                // libcni: a result without a version is taken as the config's version.
                result["cniVersion"] = json!(list.cni_version);
            }
            prev = Some(result);
        }
        let result = prev.expect("a list has at least one plugin");
        self.cache_add(list, rt, &result)?;
        Ok(result)
    }

    /// DEL: every plugin in reverse order with the cached ADD result as `prevResult` (0.4.0+),
    /// then drops the cache entry.
    pub fn del(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        let cached = if version_ge(&list.cni_version, "0.4.0") {
            match self.cached_result(list, rt) {
                Ok(r) => r,
                Err(_) => {
                    let _ = self.cache_del(&list.name, rt);
                    None
                }
            }
        } else {
            None
        };
        for plugin in list.plugins.iter().rev() {
            let ty = NetworkConfigList::plugin_type(plugin);
            let conf = build_attachment_conf(list, plugin, cached.as_ref(), rt);
            let env = self.attachment_env("DEL", rt);
            self.invoke(ty, &env, &serde_json::to_vec(&conf).expect("serializable"))?;
        }
        let _ = self.cache_del(&list.name, rt);
        Ok(())
    }

    /// CHECK: every plugin in order with the cached ADD result as `prevResult`.
    pub fn check(&self, list: &NetworkConfigList, rt: &RuntimeConf) -> Result<(), CniError> {
        if !version_ge(&list.cni_version, "0.4.0") {
            return Err(CniError::runtime(format!(
                "configuration version {:?} does not support the CHECK command",
                list.cni_version
            )));
        }
        if list.disable_check {
            return Ok(());
        }
        let cached = self.cached_result(list, rt)?.ok_or_else(|| {
            CniError::runtime(format!(
                "no cached result for {}/{}/{}: CHECK needs a preceding ADD",
                list.name, rt.container_id, rt.ifname
            ))
        })?;
        for plugin in &list.plugins {
            let ty = NetworkConfigList::plugin_type(plugin);
            let conf = build_attachment_conf(list, plugin, Some(&cached), rt);
            let env = self.attachment_env("CHECK", rt);
            self.invoke(ty, &env, &serde_json::to_vec(&conf).expect("serializable"))?;
        }
        Ok(())
    }

    /// GC: DEL for every cached attachment of this network not in `valid`, then (1.1.0+) GC on
    /// every plugin with `cni.dev/valid-attachments`; every failure is reported.
    pub fn gc(&self, list: &NetworkConfigList, valid: &[Attachment]) -> Result<(), CniError> {
        if list.disable_gc {
            return Ok(());
        }
        let valid_set: HashSet<&Attachment> = valid.iter().collect();
        let mut errors = Vec::new();
        match self.cached_attachments() {
            Ok(cached) => {
                for a in cached {
                    if a.network != list.name || valid_set.contains(&a.conf.attachment()) {
                        continue;
                    }
                    if let Err(e) = self.del(list, &a.conf) {
                        errors.push(e);
                    }
                }
            }
            Err(e) => errors.push(e),
        }
        if version_ge(&list.cni_version, "1.1.0") {
            for plugin in &list.plugins {
                let ty = NetworkConfigList::plugin_type(plugin);
                let mut conf = base_conf(list, plugin);
                conf.insert("cni.dev/valid-attachments".into(), json!(valid));
                let env = vec![
                    ("CNI_COMMAND".to_string(), "GC".to_string()),
                    ("CNI_PATH".to_string(), self.cni_path()),
                ];
                if let Err(e) = self.invoke(ty, &env, &serde_json::to_vec(&conf).unwrap()) {
                    errors.push(e);
                }
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.pop().unwrap()),
            _ => Err(CniError::Multiple(errors)),
        }
    }

    /// STATUS (1.1.0+): every plugin in order; the first error is returned.
    pub fn status(&self, list: &NetworkConfigList) -> Result<(), CniError> {
        if !version_ge(&list.cni_version, "1.1.0") {
            return Err(CniError::runtime(format!(
                "configuration version {:?} does not support the STATUS command",
                list.cni_version
            )));
        }
        for plugin in &list.plugins {
            let ty = NetworkConfigList::plugin_type(plugin);
            let conf = base_conf(list, plugin);
            let env = vec![
                ("CNI_COMMAND".to_string(), "STATUS".to_string()),
                ("CNI_PATH".to_string(), self.cni_path()),
            ];
            self.invoke(ty, &env, &serde_json::to_vec(&conf).unwrap())?;
        }
        Ok(())
    }

    /// VERSION of one plugin.
    pub fn version(&self, plugin: &str) -> Result<VersionInfo, CniError> {
        let env = vec![("CNI_COMMAND".to_string(), "VERSION".to_string())];
        let stdin = json!({ "cniVersion": MAX_VERSION }).to_string();
        let out = self.invoke(plugin, &env, stdin.as_bytes())?;
        let bad = |reason: &str, v: &Option<Value>| {
            CniError::bad_result(
                plugin,
                "VERSION",
                reason.into(),
                v.as_ref().map(|v| v.to_string()).unwrap_or_default(),
            )
        };
        let v = out.as_ref().ok_or_else(|| bad("no output", &out))?;
        let supported = v
            .get("supportedVersions")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no supportedVersions list", &out))?
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("supportedVersions has a non-string", &out))?;
        Ok(VersionInfo {
            cni_version: v
                .get("cniVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            supported_versions: supported,
        })
    }

    // --- cache ---------------------------------------------------------------------------------

    fn cache_path(&self, net: &str, rt: &RuntimeConf) -> Result<PathBuf, CniError> {
        if net.is_empty() || rt.container_id.is_empty() || rt.ifname.is_empty() {
            return Err(CniError::runtime(format!(
                "cache file path requires network name ({net:?}), container ID ({:?}), and \
                 interface name ({:?})",
                rt.container_id, rt.ifname
            )));
        }
        Ok(self
            .cache_dir
            .join("results")
            .join(format!("{net}-{}-{}", rt.container_id, rt.ifname)))
    }

    fn cache_add(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
        result: &Value,
    ) -> Result<(), CniError> {
        let path = self.cache_path(&list.name, rt)?;
        let mut rec = json!({
            "kind": CACHE_KIND,
            "containerId": rt.container_id,
            // Go marshals []byte as base64: the file stays readable by libcni.
            "config": base64(&list.bytes),
            "ifName": rt.ifname,
            "networkName": list.name,
            "result": result,
        });
        if !rt.netns.is_empty() {
            rec["netns"] = json!(rt.netns);
        }
        if !rt.args.is_empty() {
            rec["cniArgs"] = json!(rt.args.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>());
        }
        if !rt.capability_args.is_empty() {
            rec["capabilityArgs"] = Value::Object(rt.capability_args.clone());
        }
        let dir = path.parent().expect("results dir");
        let io = |e: std::io::Error| CniError::runtime(format!("caching result: {e}"));
        fs::create_dir_all(dir).map_err(io)?;
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().unwrap().to_string_lossy()
        ));
        fs::write(&tmp, serde_json::to_vec(&rec).unwrap()).map_err(io)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)
    }

    fn cache_del(&self, net: &str, rt: &RuntimeConf) -> std::io::Result<()> {
        match self.cache_path(net, rt) {
            Ok(p) => fs::remove_file(p),
            Err(_) => Ok(()),
        }
    }

    /// The cached ADD result of an attachment, converted to the list's version; `None` when
    /// nothing is cached.
    pub fn cached_result(
        &self,
        list: &NetworkConfigList,
        rt: &RuntimeConf,
    ) -> Result<Option<Value>, CniError> {
        let path = self.cache_path(&list.name, rt)?;
        let Ok(bytes) = fs::read(&path) else {
            return Ok(None);
        };
        let rec: Value = serde_json::from_slice(&bytes).map_err(|e| {
            CniError::runtime(format!(
                "failed to unmarshal cached network {:?}: {e}",
                list.name
            ))
        })?;
        if rec.get("kind").and_then(Value::as_str) != Some(CACHE_KIND) {
            return Err(CniError::runtime(format!(
                "cached network {:?} has the wrong kind",
                list.name
            )));
        }
        let Some(result) = rec.get("result") else {
            return Ok(None);
        };
        convert_result(result, &list.cni_version)
            .map(Some)
            .map_err(|e| {
                CniError::runtime(format!(
                    "failed to convert cached result to config version {:?}: {e}",
                    list.cni_version
                ))
            })
    }

    /// Every attachment in the result cache (any network).
    pub fn cached_attachments(&self) -> Result<Vec<CachedAttachment>, CniError> {
        let dir = self.cache_dir.join("results");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CniError::runtime(format!("reading {}: {e}", dir.display()))),
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(bytes) = fs::read(entry.path()) else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            if rec.get("kind").and_then(Value::as_str) != Some(CACHE_KIND) {
                continue;
            }
            let s = |k: &str| {
                rec.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let args = rec
                .get("cniArgs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|kv| {
                            Some((
                                kv.get(0)?.as_str()?.to_string(),
                                kv.get(1)?.as_str()?.to_string(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(CachedAttachment {
                network: s("networkName"),
                conf: RuntimeConf {
                    container_id: s("containerId"),
                    netns: s("netns"),
                    ifname: s("ifName"),
                    args,
                    capability_args: rec
                        .get("capabilityArgs")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default(),
                },
                result: rec.get("result").cloned(),
            });
        }
        out.sort_by(|a, b| {
            (&a.network, &a.conf.container_id, &a.conf.ifname).cmp(&(
                &b.network,
                &b.conf.container_id,
                &b.conf.ifname,
            ))
        });
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Request configuration (spec section 3 "Deriving request configuration")
// ---------------------------------------------------------------------------------------------

/// The plugin object with `name` and `cniVersion` injected and the runtime's reserved
/// `cni.dev/` keys dropped (GC and STATUS use this as is).
fn base_conf(list: &NetworkConfigList, plugin: &Map<String, Value>) -> Map<String, Value> {
    let mut conf: Map<String, Value> = plugin
        .iter()
        .filter(|(k, _)| !k.starts_with("cni.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    conf.insert("cniVersion".into(), json!(list.cni_version));
    conf.insert("name".into(), json!(list.name));
    conf
}

/// ADD/DEL/CHECK: [`base_conf`] plus `prevResult` (when given) and `runtimeConfig` (declared
/// capabilities the runtime has arguments for), without `capabilities`.
fn build_attachment_conf(
    list: &NetworkConfigList,
    plugin: &Map<String, Value>,
    prev: Option<&Value>,
    rt: &RuntimeConf,
) -> Map<String, Value> {
    let mut conf = base_conf(list, plugin);
    let capabilities = conf.remove("capabilities");
    conf.remove("runtimeConfig");
    conf.remove("prevResult");
    let mut rc = Map::new();
    if let Some(Value::Object(caps)) = capabilities {
        for (cap, on) in caps {
            if on == Value::Bool(true)
                && let Some(arg) = rt.capability_args.get(&cap)
            {
                rc.insert(cap, arg.clone());
            }
        }
    }
    if !rc.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(rc));
    }
    if let Some(p) = prev {
        conf.insert("prevResult".into(), p.clone());
    }
    conf
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// libcni's `ValidateContainerID`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::runtime("missing containerID"));
    }
    if !valid_identifier(id) {
        return Err(CniError::runtime(format!(
            "invalid characters in containerID {id:?}"
        )));
    }
    Ok(())
}

/// libcni's `ValidateNetworkName`.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::runtime("missing network name"));
    }
    if !valid_identifier(name) {
        return Err(CniError::runtime(format!(
            "invalid characters in network name {name:?}"
        )));
    }
    Ok(())
}

/// libcni's `ValidateInterfaceName`.
pub fn validate_ifname(ifname: &str) -> Result<(), CniError> {
    if ifname.is_empty() {
        return Err(CniError::runtime("interface name is empty"));
    }
    if ifname.len() > 15 {
        return Err(CniError::runtime(format!(
            "interface name {ifname:?} is too long"
        )));
    }
    if ifname == "." || ifname == ".." {
        return Err(CniError::runtime(format!(
            "interface name {ifname:?} is not allowed"
        )));
    }
    if ifname
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(CniError::runtime(format!(
            "interface name {ifname:?} contains / or : or whitespace"
        )));
    }
    Ok(())
}

/// `"10.1.2.3/24"` -> `(10.1.2.3, 24)`.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

/// Checks an ADD result against the spec's result type for `version` (section 5 and the older
/// specs): `cniVersion` equal to the configuration's, and for 0.3.0+ `interfaces` entries with a
/// `name`, `ips` entries with a CIDR `address`, an `interface` index inside `interfaces`, a
/// `gateway` of the same family, `version` "4"/"6" matching the address below 1.0.0; `routes`
/// with a CIDR `dst`; for 0.1.0/0.2.0 `ip4`/`ip6` objects with a CIDR `ip`.
pub fn validate_result(version: &str, result: &Value) -> Result<(), String> {
    let obj = result.as_object().ok_or("result is not an object")?;
    match obj.get("cniVersion").and_then(Value::as_str) {
        Some(v) if v == version => {}
        Some(v) => {
            return Err(format!(
                "cniVersion {v:?}, the configuration said {version:?}"
            ));
        }
        None => return Err("no cniVersion".into()),
    }
    if !version_ge(version, "0.3.0") {
        for key in ["ip4", "ip6"] {
            if let Some(ipc) = obj.get(key) {
                let ip = ipc.get("ip").and_then(Value::as_str).unwrap_or_default();
                if parse_cidr(ip).is_none() {
                    return Err(format!("{key}.ip {ip:?} is not CIDR"));
                }
            }
        }
        return Ok(());
    }
    let interfaces = match obj.get("interfaces") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => return Err(format!("interfaces is not a list: {other}")),
    };
    for (i, itf) in interfaces.iter().enumerate() {
        match itf.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {}
            _ => return Err(format!("interfaces[{i}] has no name")),
        }
    }
    let ips = match obj.get("ips") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => return Err(format!("ips is not a list: {other}")),
    };
    for (i, ipc) in ips.iter().enumerate() {
        let addr = ipc
            .get("address")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (ip, _) = parse_cidr(addr).ok_or(format!("ips[{i}].address {addr:?} is not CIDR"))?;
        if let Some(idx) = ipc.get("interface")
            && !idx.is_null()
        {
            let n = idx
                .as_u64()
                .ok_or(format!("ips[{i}].interface {idx} is not an index"))?;
            if n as usize >= interfaces.len() {
                return Err(format!(
                    "ips[{i}].interface {n} is outside interfaces (len {})",
                    interfaces.len()
                ));
            }
        }
        if let Some(gw) = ipc.get("gateway").and_then(Value::as_str) {
            let gw: IpAddr = gw
                .parse()
                .map_err(|_| format!("ips[{i}].gateway {gw:?} is not an address"))?;
            if gw.is_ipv4() != ip.is_ipv4() {
                return Err(format!(
                    "ips[{i}].gateway {gw} is of another family than {ip}"
                ));
            }
        }
        if !version_ge(version, "1.0.0") {
            let want = if ip.is_ipv4() { "4" } else { "6" };
            match ipc.get("version").and_then(Value::as_str) {
                Some(v) if v == want => {}
                other => {
                    return Err(format!(
                        "ips[{i}].version is {other:?}, a {version} result needs {want:?}"
                    ));
                }
            }
        }
    }
    if let Some(routes) = obj.get("routes").and_then(Value::as_array) {
        for (i, r) in routes.iter().enumerate() {
            let dst = r.get("dst").and_then(Value::as_str).unwrap_or_default();
            if parse_cidr(dst).is_none() {
                return Err(format!("routes[{i}].dst {dst:?} is not CIDR"));
            }
        }
    }
    Ok(())
}

/// Converts a result to another version (libcni's `GetAsVersion`) within the 0.3.0+ family:
/// sets `cniVersion`, adds `ips[].version` below 1.0.0 and removes it from 1.0.0 on. Results of
/// 0.1.0/0.2.0 only "convert" to their own version.
pub fn convert_result(result: &Value, to: &str) -> Result<Value, String> {
    let from = result
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("0.1.0")
        .to_string();
    if from == to {
        return Ok(result.clone());
    }
    if !version_ge(&from, "0.3.0") || !version_ge(to, "0.3.0") {
        return Err(format!("cannot convert a {from} result to {to}"));
    }
    let mut out = result.clone();
    out["cniVersion"] = json!(to);
    if let Some(ips) = out.get_mut("ips").and_then(Value::as_array_mut) {
        for ipc in ips {
            let Some(o) = ipc.as_object_mut() else {
                continue;
            };
            if version_ge(to, "1.0.0") {
                o.remove("version");
            } else {
                let v4 = o
                    .get("address")
                    .and_then(Value::as_str)
                    .and_then(parse_cidr)
                    .map(|(ip, _)| ip.is_ipv4())
                    .unwrap_or(true);
                o.insert("version".into(), json!(if v4 { "4" } else { "6" }));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Process execution
// ---------------------------------------------------------------------------------------------

fn interpret(plugin: &str, command: &str, out: &RawOutput) -> Result<Option<Value>, CniError> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(CniError::Plugin(Box::new(PluginFailure {
            plugin: plugin.into(),
            command: command.into(),
            exit_code: out.status.code(),
            error: parse_error_object(&stdout),
            reason: None,
            stdout,
            stderr,
        })));
    }
    if stdout.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&stdout).map(Some).map_err(|e| {
        CniError::bad_result(plugin, command, format!("stdout is not JSON: {e}"), stdout)
    })
}

/// A CNI error object: a JSON object with a numeric `code` and a string `msg`.
pub fn parse_error_object(s: &str) -> Option<ErrorObject> {
    let v: Value = serde_json::from_str(s.trim()).ok()?;
    let code = v.get("code")?.as_u64()?;
    Some(ErrorObject {
        cni_version: v
            .get("cniVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
        code: u32::try_from(code).ok()?,
        msg: v.get("msg")?.as_str()?.to_string(),
        details: v
            .get("details")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
    })
}

/// Runs `path` with a cleared environment plus `PATH` and `env`, feeding `stdin`, collecting
/// stdout and stderr; kills it after `timeout`. Retries "text file busy" (a binary being
/// written by a concurrent build) like libcni.
fn run_with_timeout(
    path: &Path,
    env: &[(String, String)],
    stdin: &[u8],
    timeout: Duration,
) -> std::io::Result<RawOutput> {
    let path_var = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut attempts = 0;
    let mut child = loop {
        let mut cmd = Command::new(path);
        cmd.env_clear()
            .env("PATH", &path_var)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 25 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    };
    let mut child_stdin = child.stdin.take().expect("piped stdin");
    let mut child_stdout = child.stdout.take().expect("piped stdout");
    let mut child_stderr = child.stderr.take().expect("piped stderr");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        // A plugin may exit without reading stdin (VERSION): ignore EPIPE.
        let _ = child_stdin.write_all(&input);
    });
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = child_stdout.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = child_stderr.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("plugin still running after {timeout:?}: killed"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(RawOutput {
        status,
        stdout,
        stderr,
    })
}

/// Standard base64 with padding (what Go's encoding/json does with `[]byte`).
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_ge("1.0.0", "0.4.0"));
        assert!(version_ge("0.10.0", "0.4.0"));
        assert!(!version_ge("0.3.1", "0.4.0"));
        assert!(!version_ge("x", "0.1.0"));
    }

    #[test]
    fn list_selects_highest_supported_version() {
        let l = NetworkConfigList::from_value(&json!({
            "name": "n", "cniVersion": "0.4.0", "cniVersions": ["1.0.0", "0.3.1", "9.0.0"],
            "plugins": [{"type": "a"}]
        }))
        .unwrap();
        assert_eq!(l.cni_version, "1.0.0");
        assert!(NetworkConfigList::from_value(&json!({"name": "n", "plugins": []})).is_err());
        assert!(
            NetworkConfigList::from_value(&json!({"name": "n", "plugins": [{"type": "a/b"}]}))
                .is_err()
        );
    }

    #[test]
    fn request_conf_injects_and_filters() {
        let list = NetworkConfigList::from_value(&json!({
            "name": "net", "cniVersion": "1.0.0",
            "plugins": [{"type": "p", "x": 1, "capabilities": {"portMappings": true, "mac": false},
                         "cni.dev/foo": 1}]
        }))
        .unwrap();
        let rt = RuntimeConf::new("c", "/n", "eth0")
            .capability("portMappings", json!([1]))
            .capability("mac", json!("aa"))
            .capability("other", json!(2));
        let prev = json!({"cniVersion": "1.0.0"});
        let c = Value::Object(build_attachment_conf(
            &list,
            &list.plugins[0],
            Some(&prev),
            &rt,
        ));
        assert_eq!(
            c,
            json!({"type": "p", "x": 1, "name": "net", "cniVersion": "1.0.0",
                   "runtimeConfig": {"portMappings": [1]}, "prevResult": prev})
        );
        let c = build_attachment_conf(&list, &list.plugins[0], None, &RuntimeConf::default());
        assert!(!c.contains_key("runtimeConfig") && !c.contains_key("prevResult"));
    }

    #[test]
    fn result_validation() {
        let ok = json!({"cniVersion": "0.4.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"version": "4", "address": "10.0.0.2/24", "gateway": "10.0.0.1",
                     "interface": 0}]});
        validate_result("0.4.0", &ok).unwrap();
        assert!(
            validate_result("1.0.0", &ok)
                .unwrap_err()
                .contains("cniVersion")
        );
        let mut no_ver = ok.clone();
        no_ver["ips"][0].as_object_mut().unwrap().remove("version");
        assert!(validate_result("0.4.0", &no_ver).is_err());
        let mut bad_idx = ok.clone();
        bad_idx["ips"][0]["interface"] = json!(1);
        assert!(validate_result("0.4.0", &bad_idx).is_err());
        let conv = convert_result(&ok, "1.0.0").unwrap();
        assert!(conv["ips"][0].get("version").is_none());
        validate_result("1.0.0", &conv).unwrap();
        assert_eq!(
            convert_result(&conv, "0.3.1").unwrap()["ips"][0]["version"],
            "4"
        );
        assert!(convert_result(&json!({"cniVersion": "0.2.0"}), "0.4.0").is_err());
    }

    #[test]
    fn error_objects() {
        let e = parse_error_object(r#"{"code": 7, "msg": "bad", "details": "d"}"#).unwrap();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (7, "bad", "d")
        );
        assert!(parse_error_object("oops").is_none());
        assert!(parse_error_object(r#"{"msg": "no code"}"#).is_none());
    }

    #[test]
    fn base64_matches_go() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"{\"a\":1}"), "eyJhIjoxfQ==");
    }

    #[test]
    fn identifiers() {
        validate_container_id("abc-1.2_3").unwrap();
        assert!(validate_container_id("-abc").is_err());
        assert!(validate_ifname("eth0:1").is_err());
        assert!(validate_ifname("0123456789abcdef").is_err());
    }
}
