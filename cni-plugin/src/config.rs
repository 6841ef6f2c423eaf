//! The network config on stdin: the fields the runtime inserts, and tapestry-cni's own.
//!
//! Every tapestry field is optional. Unknown top-level fields are accepted (a conflist step
//! carries others, and runtimes add some); unknown fields inside `vm` and `dns`, which are
//! ours, are refused with code 2 so that a typo does not silently do nothing.
//!
//! ```json
//! {
//!   "type": "tapestry-cni",
//!   "socket": "/run/tapestry/tapestryd.sock",
//!   "vm": {"enabled": false, "tapName": "tap0", "uid": 107, "gid": 107, "queues": 1, "mtu": 1500},
//!   "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "domain": "cluster.local"},
//!   "logLevel": "warn"
//! }
//! ```

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;
use serde_json::Value;
use tapestry_api::types::{AttachmentKey, DEFAULT_SOCKET};

use crate::{
    error::{CniError, Result},
    names::{DEFAULT_TAP_NAME, DEFAULT_TAP_OWNER},
};

/// The whole request config, as the plugin reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: Option<String>,
    pub name: Option<String>,
    /// Path of tapestryd's socket.
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub vm: VmConfig,
    /// DNS handed to guests on top of what prevResult carries.
    pub dns: Option<DnsSettings>,
    #[serde(default)]
    pub log_level: LogLevel,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    pub prev_result: Option<Value>,
    /// GC (1.1.0): the attachments the runtime still has.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// `vm`: how this network treats VM pods.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VmConfig {
    /// Every pod on this network is a VM pod (a network dedicated to VMs; what podman, which
    /// passes no annotations, can use).
    pub enabled: bool,
    /// Name of the tap in the pod's netns. KubeVirt's tap binding expects `tap0` for `eth0`.
    pub tap_name: String,
    /// Owner of the tap: the user that runs the VM process.
    pub uid: u32,
    pub gid: u32,
    /// Queue pairs; above 1 the tap is multi-queue (virtio-net multiqueue).
    pub queues: u32,
    /// MTU of the tap and the guest; default: the pod interface's.
    pub mtu: Option<u32>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            tap_name: DEFAULT_TAP_NAME.to_owned(),
            uid: DEFAULT_TAP_OWNER,
            gid: DEFAULT_TAP_OWNER,
            queues: 1,
            mtu: None,
        }
    }
}

const VM_FIELDS: &[&str] = &["enabled", "tapName", "uid", "gid", "queues", "mtu"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DnsSettings {
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    pub domain: Option<String>,
}

const DNS_FIELDS: &[&str] = &["nameservers", "search", "domain"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    #[default]
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_tracing(self) -> tracing::Level {
        match self {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

/// Capability arguments the runtime inserted; only the ones this plugin reads are typed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RuntimeConfig {
    /// containerd's `io.kubernetes.cri.pod-annotations` capability: every pod annotation (the
    /// conflist step must declare the capability for containerd to pass them).
    #[serde(rename = "io.kubernetes.cri.pod-annotations", default)]
    pub pod_annotations: BTreeMap<String, String>,
    /// The `dns` capability: the pod's DNS as the kubelet computed it.
    #[serde(default)]
    pub dns: Option<RuntimeDns>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct RuntimeDns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl From<ValidAttachment> for AttachmentKey {
    fn from(a: ValidAttachment) -> Self {
        AttachmentKey {
            container_id: a.container_id,
            ifname: a.ifname,
        }
    }
}

impl NetConf {
    /// Parses and validates stdin. Not JSON: code 6; JSON of the wrong shape or values: code 7;
    /// an unknown field in `vm`/`dns`: code 2.
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(stdin).map_err(|source| CniError::Decode {
            what: "the network config on stdin",
            source,
        })?;
        let Some(top) = value.as_object() else {
            return Err(CniError::InvalidConfig(
                "the network config on stdin must be a JSON object".into(),
            ));
        };
        for (section, known) in [("vm", VM_FIELDS), ("dns", DNS_FIELDS)] {
            if let Some(Value::Object(fields)) = top.get(section)
                && let Some((key, val)) = fields.iter().find(|(k, _)| !known.contains(&k.as_str()))
            {
                return Err(CniError::UnsupportedField {
                    field: format!("{section}.{key}"),
                    value: val.to_string(),
                    hint: format!("`{section}` takes {}", known.join(", ")),
                });
            }
        }
        let conf: NetConf = serde_path_to_error::deserialize(value).map_err(|e| {
            CniError::InvalidConfig(format!(
                "the tapestry-cni config is invalid at `{}`: {}",
                e.path(),
                e.inner()
            ))
        })?;
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<()> {
        // The reference skel refuses a config without a valid network name for every command
        // but VERSION.
        let name = self.name.as_deref().unwrap_or("");
        if name.is_empty() {
            return Err(CniError::InvalidConfig(
                "missing network name: the conflist needs a `name`".into(),
            ));
        }
        if !valid_cni_name(name) {
            return Err(CniError::InvalidConfig(format!(
                "invalid characters in network name {name:?}: use letters, digits, `_`, `.` \
                 and `-`, starting with a letter or digit"
            )));
        }
        if let Err(why) = validate_ifname(&self.vm.tap_name) {
            return Err(CniError::InvalidConfig(format!(
                "vm.tapName {:?} is not a usable interface name: {why}",
                self.vm.tap_name
            )));
        }
        if !(1..=256).contains(&self.vm.queues) {
            return Err(CniError::InvalidConfig(format!(
                "vm.queues is {}: give 1 to 256 queue pairs",
                self.vm.queues
            )));
        }
        // 576: every IPv4 host must take datagrams that large, and the DHCP interface-MTU
        // option the daemon hands the guest is refused below it.
        if let Some(mtu) = self.vm.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(CniError::InvalidConfig(format!(
                "vm.mtu is {mtu}: give 576 to 65535"
            )));
        }
        if let Some(dns) = &self.dns {
            for ns in &dns.nameservers {
                if ns.parse::<std::net::IpAddr>().is_err() {
                    return Err(CniError::InvalidConfig(format!(
                        "dns.nameservers has {ns:?}, which is not an IP address"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The daemon's socket: `TAPESTRY_SOCKET`, else `socket`, else the default.
    pub fn socket(&self, env_override: Option<String>) -> PathBuf {
        env_override
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .or_else(|| self.socket.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }
}

/// `[a-zA-Z0-9][a-zA-Z0-9_.-]*`: the reference library's rule for container IDs and network
/// names.
pub fn valid_cni_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The kernel's rule for interface names (net/core/dev.c `dev_valid_name`), as the reference
/// library checks CNI_IFNAME.
pub fn validate_ifname(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 15 {
        return Err("it is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("it is . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("it contains /, : or whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<NetConf> {
        NetConf::parse(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn minimal_config_takes_the_defaults() {
        let c = parse(json!({"cniVersion": "1.0.0", "name": "podnet", "type": "tapestry-cni"}))
            .unwrap();
        assert_eq!(c.vm, VmConfig::default());
        assert_eq!(c.vm.tap_name, "tap0");
        assert_eq!((c.vm.uid, c.vm.gid, c.vm.queues), (107, 107, 1));
        assert_eq!(c.log_level, LogLevel::Warn);
        assert_eq!(c.socket(None), PathBuf::from(DEFAULT_SOCKET));
        assert!(c.prev_result.is_none());
        assert!(c.dns.is_none());
    }

    #[test]
    fn full_config_with_foreign_fields_parses() {
        let c = parse(json!({
            "cniVersion": "1.1.0",
            "name": "vmnet",
            "type": "tapestry-cni",
            "socket": "/tmp/t.sock",
            "vm": {"enabled": true, "tapName": "tap1", "uid": 1000, "gid": 1001, "queues": 4, "mtu": 1400},
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"], "domain": "cluster.local"},
            "logLevel": "debug",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "someOtherPluginsField": {"x": 1},
            "runtimeConfig": {
                "io.kubernetes.cri.pod-annotations": {"kubevirt.io/domain": "vm1"},
                "dns": {"servers": ["10.96.0.10"], "searches": ["ns.svc.cluster.local"], "options": ["ndots:5"]},
                "portMappings": []
            },
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]
        }))
        .unwrap();
        assert_eq!(
            c.vm,
            VmConfig {
                enabled: true,
                tap_name: "tap1".into(),
                uid: 1000,
                gid: 1001,
                queues: 4,
                mtu: Some(1400)
            }
        );
        assert_eq!(
            c.dns.as_ref().unwrap().domain.as_deref(),
            Some("cluster.local")
        );
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.socket(None), PathBuf::from("/tmp/t.sock"));
        assert_eq!(
            c.socket(Some("/run/other.sock".into())),
            PathBuf::from("/run/other.sock")
        );
        assert_eq!(c.socket(Some(String::new())), PathBuf::from("/tmp/t.sock"));
        assert_eq!(
            c.runtime_config.pod_annotations.get("kubevirt.io/domain"),
            Some(&"vm1".to_owned())
        );
        assert_eq!(
            c.runtime_config.dns.as_ref().unwrap().options,
            vec!["ndots:5"]
        );
        assert_eq!(c.valid_attachments.as_ref().unwrap()[0].container_id, "abc");
    }

    #[test]
    fn not_json_is_a_decode_failure() {
        let err = NetConf::parse(b"{\"name\": ").unwrap_err();
        assert_eq!(err.code(), 6);
    }

    #[test]
    fn unknown_fields_in_our_sections_are_unsupported_with_key_and_value() {
        let err = parse(json!({"name": "n", "vm": {"enable": true}})).unwrap_err();
        assert_eq!(err.code(), 2);
        let msg = err.to_string();
        assert!(msg.contains("vm.enable") && msg.contains("true"), "{msg}");
        assert!(msg.contains("tapName"), "{msg}");

        let err = parse(json!({"name": "n", "dns": {"options": ["ndots:5"]}})).unwrap_err();
        assert_eq!(err.code(), 2);
        assert!(err.to_string().contains("dns.options"));
    }

    #[test]
    fn wrong_types_and_values_are_invalid_config_with_the_path() {
        let err = parse(json!({"name": "n", "vm": {"uid": "qemu"}})).unwrap_err();
        assert_eq!(err.code(), 7);
        assert!(err.to_string().contains("vm.uid"), "{err}");

        for (bad, what) in [
            (json!({"name": "n", "vm": {"queues": 0}}), "vm.queues"),
            (json!({"name": "n", "vm": {"mtu": 575}}), "vm.mtu"),
            (json!({"name": "n", "vm": {"tapName": "a/b"}}), "vm.tapName"),
            (
                json!({"name": "n", "vm": {"tapName": "a-very-long-tap-name"}}),
                "vm.tapName",
            ),
            (
                json!({"name": "n", "dns": {"nameservers": ["dns.example"]}}),
                "dns.nameservers",
            ),
            (json!({"name": "n", "logLevel": "loud"}), "logLevel"),
            (json!({"type": "tapestry-cni"}), "network name"),
            (json!({"name": "-bad"}), "network name"),
            (json!(["name"]), "JSON object"),
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.code(), 7, "{what}: {err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn name_and_ifname_rules() {
        assert!(valid_cni_name("a"));
        assert!(valid_cni_name("9f3c_a.b-c"));
        assert!(!valid_cni_name(""));
        assert!(!valid_cni_name("_a"));
        assert!(!valid_cni_name("a/b"));
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("0123456789abcde").is_ok());
        assert!(validate_ifname("0123456789abcdef").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("").is_err());
    }
}
