//! CNI_ARGS: `K=V` pairs separated by `;`, as the runtime sets them for every plugin of the
//! chain.
//!
//! Parsed like the reference library's `types.LoadArgs`: a pair without exactly one `=` is an
//! error, and keys this plugin does not know are an error unless `IgnoreUnknown` is true (every
//! runtime that adds its own keys also sets it: containerd, CRI-O, podman).

use tapestry_api::types::PodRef;

use crate::error::{CniError, Result};

const KNOWN_KEYS: &[&str] = &[
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_UID",
    "K8S_POD_INFRA_CONTAINER_ID",
    "TAPESTRY_VM",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// `TAPESTRY_VM=true`: the runtime says this pod runs a VM.
    pub vm: bool,
}

impl CniArgs {
    pub fn parse(raw: &str) -> Result<Self> {
        let mut args = CniArgs::default();
        let mut ignore_unknown = false;
        let mut unknown = Vec::new();
        if raw.is_empty() {
            return Ok(args);
        }
        for pair in raw.split(';') {
            let mut kv = pair.split('=');
            let (Some(key), Some(value), None) = (kv.next(), kv.next(), kv.next()) else {
                return Err(invalid(format!(
                    "invalid pair {pair:?}: expected KEY=VALUE pairs separated by ';'"
                )));
            };
            match key {
                "IgnoreUnknown" => ignore_unknown = parse_bool(pair, value)?,
                "K8S_POD_NAMESPACE" => args.pod_namespace = non_empty(value),
                "K8S_POD_NAME" => args.pod_name = non_empty(value),
                "K8S_POD_UID" => args.pod_uid = non_empty(value),
                "TAPESTRY_VM" => args.vm = parse_bool(pair, value)?,
                _ if KNOWN_KEYS.contains(&key) => {}
                _ => unknown.push(pair.to_owned()),
            }
        }
        if !unknown.is_empty() && !ignore_unknown {
            return Err(invalid(format!(
                "unknown args {unknown:?}: tapestry-cni reads {}; add IgnoreUnknown=1 to pass \
                 others",
                KNOWN_KEYS.join(", ")
            )));
        }
        Ok(args)
    }

    /// The pod, when the runtime named it. podman names the container (K8S_POD_NAME) but no
    /// namespace; the namespace is then empty.
    pub fn pod_ref(&self) -> Option<PodRef> {
        self.pod_name.as_ref().map(|name| PodRef {
            namespace: self.pod_namespace.clone().unwrap_or_default(),
            name: name.clone(),
            uid: self.pod_uid.clone(),
        })
    }
}

fn non_empty(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_owned())
}

/// The reference library's `UnmarshallableBool`: 1/true and 0/false, any case.
fn parse_bool(pair: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(invalid(format!(
            "in {pair:?}: {value:?} is not a boolean (use true/false or 1/0)"
        ))),
    }
}

fn invalid(msg: String) -> CniError {
    CniError::InvalidEnv {
        var: "CNI_ARGS",
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_args_in_any_order() {
        let a = CniArgs::parse(
            "K8S_POD_INFRA_CONTAINER_ID=9f3c;K8S_POD_UID=1b2c-3d;IgnoreUnknown=1;\
             K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        )
        .unwrap();
        assert_eq!(
            a.pod_ref(),
            Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: Some("1b2c-3d".into())
            })
        );
        assert!(!a.vm);
    }

    #[test]
    fn podman_args_name_the_container_without_a_namespace() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=vm1;MAC=02:00:00:00:00:01").unwrap();
        let pod = a.pod_ref().unwrap();
        assert_eq!((pod.namespace.as_str(), pod.name.as_str()), ("", "vm1"));
        assert_eq!(pod.uid, None);
    }

    #[test]
    fn empty_args_are_fine() {
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        assert_eq!(CniArgs::default().pod_ref(), None);
    }

    #[test]
    fn tapestry_vm_flag() {
        for (raw, vm) in [
            ("TAPESTRY_VM=true", true),
            ("TAPESTRY_VM=1", true),
            ("TAPESTRY_VM=True", true),
            ("TAPESTRY_VM=false", false),
            ("TAPESTRY_VM=0", false),
        ] {
            assert_eq!(CniArgs::parse(raw).unwrap().vm, vm, "{raw}");
        }
        let err = CniArgs::parse("TAPESTRY_VM=yes").unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("CNI_ARGS"));
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        let err = CniArgs::parse("K8S_POD_NAME=a;FOO=bar").unwrap_err();
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("FOO=bar"), "{err}");
        assert!(CniArgs::parse("K8S_POD_NAME=a;FOO=bar;IgnoreUnknown=true").is_ok());
        // IgnoreUnknown=0 keeps the check.
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=0").is_err());
    }

    #[test]
    fn malformed_pairs_are_invalid_env() {
        for raw in ["K8S_POD_NAME", "A=b=c", "K8S_POD_NAME=a;;", "=;"] {
            let err = CniArgs::parse(raw).unwrap_err();
            assert_eq!(err.code(), 4, "{raw}");
        }
    }
}
