//! The installer's decisions over the configs primaries really ship, as they write them.

use std::path::Path;

use serde_json::{Value, json};

use super::*;

/// Network configs as the primaries write them (text kept as shipped: key order, tabs, the odd
/// comma placement), each with the file name it has on a node.
pub(crate) mod fixtures {
    /// calico-node's install-cni, CNI 0.3.1: calico + portmap + bandwidth, `name` before
    /// `cniVersion`.
    pub const CALICO: (&str, &str) = (
        "10-calico.conflist",
        r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "/etc/cni/net.d/calico-kubeconfig"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    },
    {
      "type": "bandwidth",
      "capabilities": {"bandwidth": true}
    }
  ]
}
"#,
    );

    /// kube-flannel's cni-conf.json, CNI 0.3.1: flannel + portmap.
    pub const FLANNEL: (&str, &str) = (
        "10-flannel.conflist",
        r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#,
    );

    /// The Cilium agent (1.14+), CNI 0.3.1.
    pub const CILIUM: (&str, &str) = (
        "05-cilium.conflist",
        r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {
       "type": "cilium-cni",
       "enable-debug": false,
       "log-file": "/var/run/cilium/cilium-cni.log"
    }
  ]
}
"#,
    );

    /// Older Cilium agents: a single-plugin .conf, CNI 0.3.1.
    pub const CILIUM_CONF: (&str, &str) = (
        "05-cilium.conf",
        r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "type": "cilium-cni",
  "enable-debug": false,
  "log-file": "/var/run/cilium/cilium-cni.log"
}
"#,
    );

    /// kind's kindnetd, CNI 0.3.1: ptp + portmap, tab-indented.
    pub const KINDNET: (&str, &str) = (
        "10-kindnet.conflist",
        "{\n\t\"cniVersion\": \"0.3.1\",\n\t\"name\": \"kindnet\",\n\t\"plugins\": [\n\t{\n\t\t\"type\": \"ptp\",\n\t\t\"ipMasq\": false,\n\t\t\"ipam\": {\n\t\t\t\"type\": \"host-local\",\n\t\t\t\"dataDir\": \"/run/cni-ipam-state\",\n\t\t\t\"routes\": [\n\t\t\t\t{ \"dst\": \"0.0.0.0/0\" }\n\t\t\t],\n\t\t\t\"ranges\": [\n\t\t\t\t[ { \"subnet\": \"10.244.0.0/24\" } ]\n\t\t\t]\n\t\t}\n\t\t,\n\t\t\"mtu\": 1500\n\t},\n\t{\n\t\t\"type\": \"portmap\",\n\t\t\"capabilities\": {\n\t\t\t\"portMappings\": true\n\t\t}\n\t}\n\t]\n}\n",
    );

    /// The reference bridge as a single-plugin .conf (the CNI README's example), CNI 1.0.0.
    pub const BRIDGE_CONF: (&str, &str) = (
        "10-mynet.conf",
        "{\n\t\"cniVersion\": \"1.0.0\",\n\t\"name\": \"mynet\",\n\t\"type\": \"bridge\",\n\t\"bridge\": \"cni0\",\n\t\"isGateway\": true,\n\t\"ipMasq\": true,\n\t\"ipam\": {\n\t\t\"type\": \"host-local\",\n\t\t\"subnet\": \"10.22.0.0/16\",\n\t\t\"routes\": [\n\t\t\t{ \"dst\": \"0.0.0.0/0\" }\n\t\t]\n\t}\n}\n",
    );

    /// containerd's example for the reference plugins, CNI 0.4.0: dual-stack bridge + portmap.
    pub const BRIDGE_LIST: (&str, &str) = (
        "10-containerd-net.conflist",
        r#"{
  "cniVersion": "0.4.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [{
            "subnet": "10.88.0.0/16"
          }],
          [{
            "subnet": "2001:4860:4860::/64"
          }]
        ],
        "routes": [
          { "dst": "0.0.0.0/0" },
          { "dst": "::/0" }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
"#,
    );

    /// The loopback config old set-ups keep beside the primary.
    pub const LOOPBACK: (&str, &str) = (
        "99-loopback.conf",
        "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"lo\",\n  \"type\": \"loopback\"\n}\n",
    );

    pub const PRIMARIES: [(&str, &str); 7] = [
        CALICO,
        FLANNEL,
        CILIUM,
        CILIUM_CONF,
        KINDNET,
        BRIDGE_CONF,
        BRIDGE_LIST,
    ];
}

use fixtures::*;

fn parse(text: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice(text).unwrap() {
        Value::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

fn keys(m: &Map<String, Value>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

/// Equal values with the same key order at every level (serialization follows the order).
fn assert_same_ordered(a: &Value, b: &Value, ctx: &str) {
    assert_eq!(
        serde_json::to_string(a).unwrap(),
        serde_json::to_string(b).unwrap(),
        "{ctx}"
    );
}

fn default_entry() -> Map<String, Value> {
    entry(None).unwrap()
}

#[test]
fn every_primary_gets_the_step_last_and_keeps_everything_else_in_order() {
    let entry = default_entry();
    for (name, text) in PRIMARIES {
        let path = Path::new("/etc/cni/net.d").join(name);
        let original = parse(text.as_bytes());
        let (out_name, out) = match insert(&path, text.as_bytes(), &entry).unwrap() {
            Insert::Rewrite(c) => {
                assert_eq!(Format::of(name), Some(Format::List), "{name}");
                (name.to_string(), c)
            }
            Insert::Convert { list, content } => {
                assert_eq!(Format::of(name), Some(Format::Single), "{name}");
                (list, content)
            }
            Insert::Unchanged => panic!("{name}: nothing inserted"),
        };
        let list = parse(&out);
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(
            plugins.last().unwrap(),
            &Value::Object(entry.clone()),
            "{name}"
        );

        if Format::of(name) == Some(Format::List) {
            // Every key where it was, the plugins unchanged and in order, one more at the end.
            assert_eq!(keys(&list), keys(&original), "{name}");
            let before = original["plugins"].as_array().unwrap();
            assert_eq!(plugins.len(), before.len() + 1, "{name}");
            for (a, b) in before.iter().zip(plugins) {
                assert_same_ordered(a, b, name);
            }
            for (k, v) in &original {
                if k != "plugins" {
                    assert_same_ordered(v, &list[k], name);
                }
            }
        } else {
            // {cniVersion, name, plugins: [the conf without them, the step], marker}.
            assert_eq!(out_name, list_name(name));
            assert!(out_name.ends_with(".conflist"), "{out_name}");
            assert_eq!(
                keys(&list),
                ["cniVersion", "name", "plugins", CONVERTED_FROM],
                "{name}"
            );
            assert_eq!(list["cniVersion"], original["cniVersion"]);
            assert_eq!(list["name"], original["name"]);
            let mut plugin = original.clone();
            plugin.shift_remove("cniVersion");
            plugin.shift_remove("name");
            assert_eq!(plugins.len(), 2, "{name}");
            assert_same_ordered(&plugins[0], &Value::Object(plugin), name);
            assert_eq!(
                list[CONVERTED_FROM],
                json!({"file": name, "content": text}),
                "{name}"
            );
        }

        // Idempotent: the result already holds the step.
        let out_path = Path::new("/etc/cni/net.d").join(&out_name);
        assert_eq!(
            insert(&out_path, &out, &entry).unwrap(),
            Insert::Unchanged,
            "{name}"
        );

        // And removing it gives the original back: the same JSON in the same order for a list,
        // the very bytes for a converted file.
        match remove(&out_path, &out).unwrap() {
            Remove::Rewrite(c) => {
                assert_eq!(out_name, name);
                assert_same_ordered(
                    &Value::Object(parse(&c)),
                    &Value::Object(original.clone()),
                    name,
                );
            }
            Remove::Restore {
                file,
                content,
                exact,
            } => {
                assert_eq!(file, name);
                assert_eq!(content, text.as_bytes(), "{name}: bytes of the original");
                assert!(exact);
            }
            Remove::Unchanged | Remove::Delete => panic!("{name}: nothing removed"),
        }
    }
}

#[test]
fn the_step_carries_the_plugin_config() {
    let e = entry(Some(&json!({
        "socket": "/run/tapestry/tapestryd.sock",
        "vm": {"uid": 107, "gid": 107, "queues": 1},
        "capabilities": {"dns": true},
        "type": "tapestry-cni",
    })))
    .unwrap();
    assert_eq!(
        Value::Object(e.clone()),
        json!({
            "type": "tapestry-cni",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true, "dns": true},
            "socket": "/run/tapestry/tapestryd.sock",
            "vm": {"uid": 107, "gid": 107, "queues": 1},
        })
    );
    assert_eq!(keys(&e), ["type", "capabilities", "socket", "vm"]);
    // The annotations capability can be turned off explicitly.
    let off = entry(Some(
        &json!({"capabilities": {ANNOTATIONS_CAPABILITY: false}}),
    ))
    .unwrap();
    assert_eq!(off["capabilities"][ANNOTATIONS_CAPABILITY], false);

    for (bad, says) in [
        (json!({"type": "bridge"}), "\"type\" is always"),
        (json!(["socket"]), "must be a JSON object"),
        (
            json!({"capabilities": true}),
            "\"capabilities\" must be an object",
        ),
    ] {
        let err = entry(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains(says), "{bad}: {err}");
        assert!(err.contains("--plugin-config"), "{err}");
    }
}

#[test]
fn a_changed_plugin_config_updates_the_step_in_place() {
    let (name, text) = FLANNEL;
    let path = Path::new(name);
    let Insert::Rewrite(v1) = insert(path, text.as_bytes(), &default_entry()).unwrap() else {
        panic!()
    };
    let e2 = entry(Some(&json!({"socket": "/run/other.sock"}))).unwrap();
    let Insert::Rewrite(v2) = insert(path, &v1, &e2).unwrap() else {
        panic!("a different step must be rewritten")
    };
    let plugins = parse(&v2)["plugins"].as_array().unwrap().clone();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2], Value::Object(e2.clone()));
    assert_eq!(insert(path, &v2, &e2).unwrap(), Insert::Unchanged);
}

#[test]
fn an_administrators_placement_is_kept_duplicates_go_and_the_head_is_never_ours() {
    let e = default_entry();
    let ours = Value::Object(e.clone());
    let stale = json!({"type": "tapestry-cni", "socket": "/old.sock"});
    let list = |plugins: Value| {
        serde_json::to_vec(&json!({"cniVersion": "1.0.0", "name": "n", "plugins": plugins}))
            .unwrap()
    };
    let types = |content: &[u8]| -> Vec<String> {
        parse(content)["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect()
    };
    let path = Path::new("10-n.conflist");

    // Placed before portmap by hand: updated there.
    let placed = list(json!([{"type": "ptp"}, stale, {"type": "portmap"}]));
    let Insert::Rewrite(c) = insert(path, &placed, &e).unwrap() else {
        panic!()
    };
    assert_eq!(types(&c), ["ptp", "tapestry-cni", "portmap"]);
    assert_eq!(parse(&c)["plugins"][1], ours);
    assert_eq!(insert(path, &c, &e).unwrap(), Insert::Unchanged);

    // Twice: one left, the first.
    let twice = list(json!([{"type": "ptp"}, ours, {"type": "portmap"}, ours]));
    let Insert::Rewrite(c) = insert(path, &twice, &e).unwrap() else {
        panic!()
    };
    assert_eq!(types(&c), ["ptp", "tapestry-cni", "portmap"]);

    // At the head of the chain it would get no prevResult: moved to the end.
    let head = list(json!([ours, {"type": "ptp"}]));
    let Insert::Rewrite(c) = insert(path, &head, &e).unwrap() else {
        panic!()
    };
    assert_eq!(types(&c), ["ptp", "tapestry-cni"]);
}

#[test]
fn refusals_say_what_is_wrong() {
    let e = default_entry();
    let cases: [(&str, &str, &str); 13] = [
        (
            "10-a.conflist",
            "{\"cniVersion\": \"0.3.1\", \"plugins\": [",
            "not valid JSON",
        ),
        ("10-a.conflist", "", "the file is empty"),
        (
            "10-a.conflist",
            "[1, 2]",
            "expected a JSON object, got an array",
        ),
        (
            "10-a.conflist",
            r#"{"cniVersion": "0.3.1", "name": "a"}"#,
            "names no plugins: it has no \"plugins\" list",
        ),
        (
            "10-a.conflist",
            r#"{"cniVersion": "0.3.1", "name": "a", "plugins": []}"#,
            "names no plugins: its \"plugins\" list is empty",
        ),
        (
            "10-a.conflist",
            r#"{"cniVersion": "0.3.1", "name": "a", "plugins": {}}"#,
            "\"plugins\" is an object, not a list",
        ),
        (
            "10-a.conflist",
            r#"{"cniVersion": "0.3.1", "name": "a", "plugins": [{"ipam": {}}]}"#,
            "plugins[0] has no \"type\"",
        ),
        (
            "10-a.conf",
            r#"{"cniVersion": "0.3.1", "name": "a"}"#,
            "names no plugins: it has no plugin \"type\"",
        ),
        (
            "10-a.conf",
            r#"{"cniVersion": "0.3.1", "name": "a", "plugins": [{"type": "ptp"}]}"#,
            "rename it to .conflist",
        ),
        (
            "10-a.conf",
            r#"{"cniVersion": "0.2.0", "name": "a", "type": "bridge"}"#,
            "0.2.0 predates chaining",
        ),
        (
            "10-a.conf",
            r#"{"name": "a", "type": "bridge"}"#,
            "names no cniVersion",
        ),
        (
            "10-a.conflist",
            r#"{"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "tapestry-cni"}]}"#,
            "must be chained after a primary plugin",
        ),
        (
            "10-a.json",
            r#"{"cniVersion": "1.0.0", "name": "a", "type": "tapestry-cni"}"#,
            "must be chained after a primary plugin",
        ),
    ];
    for (name, text, says) in cases {
        let path = Path::new("/etc/cni/net.d").join(name);
        let err = insert(&path, text.as_bytes(), &e).unwrap_err().to_string();
        assert!(err.contains(says), "{name} {text:?}: {err}");
        assert!(
            err.contains(&*path.to_string_lossy()),
            "names the file: {err}"
        );
    }
    // cniVersions: the runtime takes the highest.
    let ok = r#"{"cniVersions": ["0.2.0", "1.0.0"], "name": "a", "plugins": [{"type": "ptp"}]}"#;
    assert!(matches!(
        insert(Path::new("a.conflist"), ok.as_bytes(), &e).unwrap(),
        Insert::Rewrite(_)
    ));
}

#[test]
fn a_json_file_is_a_single_plugin_and_converts() {
    let text = "{\"cniVersion\":\"1.0.0\",\"name\":\"n\",\"type\":\"ptp\"}";
    let Insert::Convert { list, content } =
        insert(Path::new("20-n.json"), text.as_bytes(), &default_entry()).unwrap()
    else {
        panic!()
    };
    assert_eq!(list, "20-n.conflist");
    assert_eq!(
        remove(Path::new(&list), &content).unwrap(),
        Remove::Restore {
            file: "20-n.json".into(),
            content: text.as_bytes().to_vec(),
            exact: true
        }
    );
}

/// What the fuzzer found (fuzz-targets/regressions/conflist_merge): a single-plugin file that
/// names its versions in `cniVersions` (CNI 1.1) converts to a list carrying them at the list's
/// level, which the installer then accepts as its own file again, and restores exactly.
#[test]
fn a_single_plugin_with_cni_versions_converts_with_them_on_the_list() {
    let text = "{\"cniVersions\":[\"1.0.0\"],\"name\":\"a\",\"type\":\"bridge\"}";
    let Insert::Convert { list, content } =
        insert(Path::new("10-a.conf"), text.as_bytes(), &default_entry()).unwrap()
    else {
        panic!()
    };
    let converted = parse(&content);
    assert_eq!(converted["cniVersions"], serde_json::json!(["1.0.0"]));
    assert!(converted["plugins"][0].get("cniVersions").is_none());
    // Inserting into the converted list again is a no-op, not a refusal.
    assert!(insert(Path::new(&list), &content, &default_entry()).is_ok());
    assert_eq!(
        remove(Path::new(&list), &content).unwrap(),
        Remove::Restore {
            file: "10-a.conf".into(),
            content: text.as_bytes().to_vec(),
            exact: true
        }
    );
}

#[test]
fn a_converted_list_edited_since_is_restored_as_it_now_is() {
    let (name, text) = CILIUM_CONF;
    let e = default_entry();
    let Insert::Convert { list, content } = insert(Path::new(name), text.as_bytes(), &e).unwrap()
    else {
        panic!()
    };
    // An administrator turned debugging on: the .conf comes back with that edit.
    let mut edited = parse(&content);
    edited["plugins"][0]["enable-debug"] = json!(true);
    let edited = serde_json::to_vec(&edited).unwrap();
    let Remove::Restore {
        file,
        content: restored,
        exact,
    } = remove(Path::new(&list), &edited).unwrap()
    else {
        panic!()
    };
    assert_eq!(file, name);
    assert!(!exact);
    let restored = parse(&restored);
    let mut expected = parse(text.as_bytes());
    expected["enable-debug"] = json!(true);
    assert_same_ordered(&Value::Object(restored), &Value::Object(expected), name);

    // Another plugin added: no longer a single plugin, so it stays a list (without the marker).
    let mut grown = parse(&content);
    grown["plugins"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!({"type": "portmap"}));
    let grown = serde_json::to_vec(&grown).unwrap();
    let Remove::Rewrite(c) = remove(Path::new(&list), &grown).unwrap() else {
        panic!()
    };
    let c = parse(&c);
    assert_eq!(keys(&c), ["cniVersion", "name", "plugins"]);
    assert_eq!(c["plugins"].as_array().unwrap().len(), 2);
}

#[test]
fn a_marker_never_points_elsewhere() {
    // A marker naming another directory or another stem is dropped, not followed.
    for file in [
        "../../etc/passwd.conf",
        "99-other.conf",
        "10-a.conflist",
        "",
    ] {
        let text = serde_json::to_vec(&json!({
            "cniVersion": "1.0.0", "name": "a",
            "plugins": [{"type": "ptp"}, {"type": "tapestry-cni"}],
            CONVERTED_FROM: {"file": file, "content": "{}"},
        }))
        .unwrap();
        let Remove::Rewrite(c) = remove(Path::new("10-a.conflist"), &text).unwrap() else {
            panic!("{file}")
        };
        assert_eq!(
            Value::Object(parse(&c)),
            json!({"cniVersion": "1.0.0", "name": "a", "plugins": [{"type": "ptp"}]})
        );
        assert!(!converted_from("10-a.conflist", &text, file));
    }
}

#[test]
fn files_that_never_hold_the_step() {
    assert_eq!(
        remove(Path::new(LOOPBACK.0), LOOPBACK.1.as_bytes()).unwrap(),
        Remove::Unchanged
    );
    assert_eq!(
        remove(Path::new(CALICO.0), CALICO.1.as_bytes()).unwrap(),
        Remove::Unchanged
    );
    assert!(!may_hold_ours(CALICO.1.as_bytes()));
}

#[test]
fn names() {
    assert_eq!(Format::of("10-a.conflist"), Some(Format::List));
    assert_eq!(Format::of("10-a.conf"), Some(Format::Single));
    assert_eq!(Format::of("10-a.json"), Some(Format::Single));
    assert_eq!(Format::of(".hidden.conf"), Some(Format::Single));
    assert_eq!(Format::of("10-a.conflist.cilium_bak"), None);
    assert_eq!(Format::of("calico-kubeconfig"), None);
    assert_eq!(Format::of(&format!("{TMP_PREFIX}42")), None);
    assert_eq!(Format::of(&format!("{TMP_PREFIX}42.old")), None);
    assert_eq!(list_name("05-cilium.conf"), "05-cilium.conflist");
    assert_eq!(list_name("20-n.json"), "20-n.conflist");
}
