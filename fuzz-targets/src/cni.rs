//! The plugin's inputs: the network config on stdin (with prevResult), CNI_ARGS, and the
//! installer's merge of our step into the primary's conflist.

use std::path::Path;

use serde_json::{Map, Value};
use tapestry_cni_plugin::install::{self, Insert, Remove};

use crate::{
    args::CniArgs,
    config::NetConf,
    version::{self, CniResult, SUPPORTED},
};

/// The network config as tapestry-cni reads it on stdin: `NetConf::parse`, the version
/// negotiation, and prevResult read at the config's version and at every other supported one.
/// Input that is itself a result (a prevResult alone) is read as one too.
///
/// Asserts of every result that parses: it can be written in every supported version, and what
/// is written reads back in that version as the same result.
pub fn cni_config(data: &[u8]) {
    if let Ok(conf) = NetConf::parse(data) {
        let _ = conf.socket(None);
        if let (Ok(v), Some(prev)) = (
            version::negotiate(conf.cni_version.as_deref()),
            &conf.prev_result,
        ) && let Ok(r) = version::parse_result(prev, v)
        {
            check_result(&r);
        }
    }
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let prev = value.get("prevResult").cloned();
    for raw in [Some(value), prev].into_iter().flatten() {
        for v in SUPPORTED {
            if let Ok(r) = version::parse_result(&raw, v) {
                check_result(&r);
            }
        }
    }
}

fn check_result(r: &CniResult) {
    let read_as = r
        .cni_version
        .as_deref()
        .and_then(version::CniVersion::parse);
    assert!(
        read_as.is_some(),
        "a parsed result names a supported version"
    );
    for ip in r.pod_ips("eth0") {
        assert!(r.ips.contains(ip));
    }
    for out in SUPPORTED {
        let written = version::encode_result(r, out);
        assert_eq!(written["cniVersion"], out.as_str());
        let again = version::parse_result(&written, out).unwrap_or_else(|e| {
            panic!("a result written at {out} does not read back at {out}: {e}\n{written}")
        });
        assert_eq!(
            version::encode_result(&again, out),
            written,
            "a result written at {out} and read back is not the same result"
        );
    }
}

/// CNI_ARGS as the plugin reads it (the variable is UTF-8 or absent: `std::env::var`).
///
/// Asserts of every accepted string: the values it yields, written back as CNI_ARGS, parse to
/// the same arguments.
pub fn cni_args(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(args) = CniArgs::parse(raw) else {
        return;
    };
    if let Some(pod) = args.pod_ref() {
        assert!(!pod.name.is_empty(), "an empty K8S_POD_NAME names no pod");
    }
    let mut pairs = vec![format!("TAPESTRY_VM={}", args.vm)];
    for (key, value) in [
        ("K8S_POD_NAMESPACE", &args.pod_namespace),
        ("K8S_POD_NAME", &args.pod_name),
        ("K8S_POD_UID", &args.pod_uid),
    ] {
        if let Some(v) = value {
            pairs.push(format!("{key}={v}"));
        }
    }
    let written = pairs.join(";");
    assert_eq!(
        CniArgs::parse(&written).ok().as_ref(),
        Some(&args),
        "{raw:?} written back as {written:?}"
    );
}

/// The names the merged file may have on a node: a list, and single-plugin files.
const FILES: [&str; 3] = ["10-primary.conflist", "10-primary.conf", "10-primary.json"];

/// The installer's merge (`install::insert`) of our step into a primary config, with the
/// default step and with one given `--plugin-config`, under a list's and a single plugin's file
/// name; then `install::remove` of the result.
///
/// Asserts: a rewritten or converted file parses, holds our step exactly once, not first, and
/// every other plugin as it was, in its order; merging again changes nothing; a conversion is
/// undone to the original bytes; what `remove` writes holds no step of ours.
pub fn conflist_merge(data: &[u8]) {
    let custom = serde_json::json!({
        "socket": "/run/tapestry/other.sock",
        "capabilities": {"dns": true},
        "vm": {"tapName": "tap1"},
    });
    let entries = [
        install::entry(None).expect("the default step"),
        install::entry(Some(&custom)).expect("a valid plugin config"),
    ];
    for name in FILES {
        let path = Path::new("/etc/cni/net.d").join(name);
        for entry in &entries {
            match install::insert(&path, data, entry) {
                Ok(Insert::Unchanged) => {
                    let before = parse_object(data).expect("Unchanged came from a JSON object");
                    check_chain(&before, &before, entry);
                }
                Ok(Insert::Rewrite(bytes)) => {
                    let before = parse_object(data).expect("a rewrite came from a JSON object");
                    let after = parse_object(&bytes).expect("a rewritten conflist is JSON");
                    check_chain(&before, &after, entry);
                    assert_eq!(
                        install::insert(&path, &bytes, entry).ok(),
                        Some(Insert::Unchanged),
                        "merging into a merged file changes it again"
                    );
                }
                Ok(Insert::Convert { list, content }) => {
                    assert_eq!(list, install::list_name(name));
                    let single = parse_object(data).expect("a conversion came from a JSON object");
                    let after = parse_object(&content).expect("a converted conflist is JSON");
                    let plugins = after["plugins"].as_array().expect("a converted list");
                    assert_eq!(plugins.len(), 2, "the single plugin and ours");
                    let mut rest = single.clone();
                    // The list's own keys move up to the list.
                    for k in ["cniVersion", "cniVersions", "name"] {
                        rest.shift_remove(k);
                    }
                    assert_eq!(
                        plugins[0],
                        Value::Object(rest),
                        "the primary kept as it was"
                    );
                    assert_eq!(plugins[1], Value::Object(entry.clone()));
                    let list_path = path.with_file_name(&list);
                    assert_eq!(
                        install::insert(&list_path, &content, entry).ok(),
                        Some(Insert::Unchanged),
                        "merging into a converted file changes it again"
                    );
                    assert_eq!(
                        install::remove(&list_path, &content).ok(),
                        Some(Remove::Restore {
                            file: name.to_owned(),
                            content: data.to_vec(),
                            exact: true,
                        }),
                        "removing our step from a conversion does not give the original back"
                    );
                }
                Err(_) => {}
            }
        }
        if let Ok(Remove::Rewrite(bytes)) = install::remove(&path, data) {
            let after = parse_object(&bytes).expect("what remove writes is JSON");
            if let Some(Value::Array(plugins)) = after.get("plugins") {
                assert!(
                    !plugins.iter().any(install::is_ours),
                    "remove left our step"
                );
            }
            assert!(after.get(install::CONVERTED_FROM).is_none());
        }
    }
}

fn parse_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// `after` is `before` with our step `entry` in its chain exactly once and not first, every
/// other plugin and top-level key unchanged.
fn check_chain(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
    entry: &Map<String, Value>,
) {
    let plugins = after["plugins"]
        .as_array()
        .expect("a merged file is a list");
    let ours: Vec<usize> = (0..plugins.len())
        .filter(|&i| install::is_ours(&plugins[i]))
        .collect();
    assert_eq!(ours.len(), 1, "our step is in the chain exactly once");
    assert_ne!(
        ours[0], 0,
        "our step heads the chain and would get no prevResult"
    );
    assert_eq!(plugins[ours[0]], Value::Object(entry.clone()));
    let others = |list: &[Value]| -> Vec<Value> {
        list.iter()
            .filter(|p| !install::is_ours(p))
            .cloned()
            .collect()
    };
    let before_plugins = before["plugins"]
        .as_array()
        .expect("the primary was a list");
    assert_eq!(
        others(plugins),
        others(before_plugins),
        "the primary's plugins changed"
    );
    let keys = |m: &Map<String, Value>| -> Vec<(String, Value)> {
        m.iter()
            .filter(|(k, _)| *k != "plugins")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(
        keys(after),
        keys(before),
        "the primary's other keys changed"
    );
}
