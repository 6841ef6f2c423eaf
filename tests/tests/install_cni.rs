//! `tapestry-install-cni` end to end: the real binary against conf directories shaped like the
//! ones Calico, Flannel, Cilium, kindnet and the reference plugins write (the texts below are
//! theirs), once, watching while the primary rewrites its file, and uninstalling; then the chain
//! it produces executed for real by the spec-exact runtime (`tapestry_tests::cni`) with the
//! reference `ptp` and `bridge` plugins and a running `tapestryd`, at every CNI version.
//!
//! Needs `tapestry-install-cni` and `tapestry-cni` in `tapestry_tests::daemon::bin_dir()`
//! (`cargo build -p tapestry-cni-plugin`); the chain test also needs the lab (root, bpffs, `ip`),
//! a `tapestryd` that can load its datapath (built without `AYA_BUILD_SKIP`), Debian's reference
//! plugins in /usr/lib/cni and v1.10.0 ones for CNI 1.1.0 (scripts/install-cni-plugins.sh).
//! A missing piece skips the test, or fails it under `CI` (tests/src/prereq.rs).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tapestry_tests::cmd::run;
use tapestry_tests::cni::{NetworkConfigList, Runtime, RuntimeConf, version_ge};
use tapestry_tests::daemon::{Daemon, binary};
use tapestry_tests::prereq::available;
use tapestry_tests::{Lab, require_lab};

// ---------------------------------------------------------------------------------------------
// The primaries' configs, as they write them
// ---------------------------------------------------------------------------------------------

/// calico-node's install-cni (0.3.1): calico + portmap + bandwidth; `name` comes first.
const CALICO: (&str, &str) = (
    "10-calico.conflist",
    r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": 0,
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
"#,
);

/// kube-flannel (0.3.1): flannel + portmap.
const FLANNEL: (&str, &str) = (
    "10-flannel.conflist",
    r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#,
);

/// The Cilium agent, 1.14 and later (0.3.1).
const CILIUM: (&str, &str) = (
    "05-cilium.conflist",
    r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {"type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"}
  ]
}
"#,
);

/// Older Cilium agents: one plugin in a .conf (0.3.1).
const CILIUM_CONF: (&str, &str) = (
    "05-cilium.conf",
    "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"cilium\",\n  \"type\": \"cilium-cni\",\n  \"enable-debug\": false\n}\n",
);

/// kind's kindnetd (0.3.1): ptp + portmap, tab-indented.
const KINDNET: (&str, &str) = (
    "10-kindnet.conflist",
    "{\n\t\"cniVersion\": \"0.3.1\",\n\t\"name\": \"kindnet\",\n\t\"plugins\": [\n\t{\n\t\t\"type\": \"ptp\",\n\t\t\"ipMasq\": false,\n\t\t\"ipam\": {\n\t\t\t\"type\": \"host-local\",\n\t\t\t\"dataDir\": \"/run/cni-ipam-state\",\n\t\t\t\"routes\": [ { \"dst\": \"0.0.0.0/0\" } ],\n\t\t\t\"ranges\": [ [ { \"subnet\": \"10.244.0.0/24\" } ] ]\n\t\t}\n\t\t,\n\t\t\"mtu\": 1500\n\t},\n\t{\n\t\t\"type\": \"portmap\",\n\t\t\"capabilities\": { \"portMappings\": true }\n\t}\n\t]\n}\n",
);

/// The reference bridge as a .conf (the CNI README's 10-mynet.conf, 1.0.0).
const BRIDGE_CONF: (&str, &str) = (
    "10-mynet.conf",
    "{\n\t\"cniVersion\": \"1.0.0\",\n\t\"name\": \"mynet\",\n\t\"type\": \"bridge\",\n\t\"bridge\": \"cni0\",\n\t\"isGateway\": true,\n\t\"ipMasq\": true,\n\t\"ipam\": {\n\t\t\"type\": \"host-local\",\n\t\t\"subnet\": \"10.22.0.0/16\",\n\t\t\"routes\": [ { \"dst\": \"0.0.0.0/0\" } ]\n\t}\n}\n",
);

/// containerd's example list for the reference plugins (0.4.0): bridge + portmap.
const BRIDGE_LIST: (&str, &str) = (
    "10-containerd-net.conflist",
    r#"{
  "cniVersion": "0.4.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "promiscMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#,
);

const LOOPBACK: (&str, &str) = (
    "99-loopback.conf",
    "{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"lo\",\n  \"type\": \"loopback\"\n}\n",
);

const PLUGIN_CONFIG: &str =
    r#"{"socket":"/run/tapestry/tapestryd.sock","vm":{"uid":107,"gid":107,"queues":1}}"#;

/// The step the installer inserts with [`PLUGIN_CONFIG`] (the agreed shape).
fn expected_entry() -> Value {
    json!({
        "type": "tapestry-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "socket": "/run/tapestry/tapestryd.sock",
        "vm": {"uid": 107, "gid": 107, "queues": 1},
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct Bins {
    installer: PathBuf,
    plugin: PathBuf,
}

fn bins() -> Option<Bins> {
    let found = (|| -> Result<Bins, String> {
        Ok(Bins {
            installer: binary("tapestry-install-cni").map_err(|e| format!("{e:#}"))?,
            plugin: binary("tapestry-cni").map_err(|e| format!("{e:#}"))?,
        })
    })();
    match found {
        Ok(b) => Some(b),
        Err(why) => {
            available::<()>("binaries", Err(why));
            None
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tapestry-install-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join("net.d")).unwrap();
        fs::create_dir_all(p.join("bin")).unwrap();
        TempDir(p)
    }

    fn conf(&self) -> PathBuf {
        self.0.join("net.d")
    }

    fn bin(&self) -> PathBuf {
        self.0.join("bin")
    }

    fn write(&self, (name, text): (&str, &str)) {
        fs::write(self.conf().join(name), text).unwrap();
    }

    fn json(&self, name: &str) -> Option<Value> {
        serde_json::from_slice(&fs::read(self.conf().join(name)).ok()?).ok()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every file of a directory: bytes and inode.
fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, u64)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let ino = e.metadata().unwrap().ino();
            (
                e.file_name().to_string_lossy().into_owned(),
                (fs::read(e.path()).unwrap(), ino),
            )
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    snapshot(dir).into_keys().collect()
}

/// The file a runtime uses, by the runtimes' own rule (libcni `ConfFiles` + sort): written
/// here independently of the installer.
fn runtime_primary(dir: &Path) -> Option<String> {
    let mut files: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let ext = Path::new(&name).extension()?.to_str()?.to_string();
            (["conf", "conflist", "json"].contains(&ext.as_str()) && !e.path().is_dir())
                .then_some(name)
        })
        .collect();
    files.sort();
    files.into_iter().next()
}

fn steps(list: &Value) -> Vec<Value> {
    list["plugins"].as_array().cloned().unwrap_or_default()
}

fn ours(list: &Value) -> usize {
    steps(list)
        .iter()
        .filter(|p| p["type"] == "tapestry-cni")
        .count()
}

/// Top-level keys in the order a file has them (the tests' serde_json may sort keys).
fn top_key_order(text: &str, keys: &[&str]) -> Vec<String> {
    let mut found: Vec<(usize, String)> = keys
        .iter()
        .filter_map(|k| text.find(&format!("\"{k}\"")).map(|i| (i, k.to_string())))
        .collect();
    found.sort();
    found.into_iter().map(|(_, k)| k).collect()
}

struct Run {
    status: ExitStatus,
    stderr: String,
}

fn install(b: &Bins, t: &TempDir, extra: &[&str]) -> Run {
    let out = Command::new(&b.installer)
        .arg("--cni-conf-dir")
        .arg(t.conf())
        .arg("--cni-bin-dir")
        .arg(t.bin())
        .arg("--plugin-binary")
        .arg(&b.plugin)
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("TAPESTRY_CNI_PLUGIN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The installer in watch mode, its log in a file; killed on drop if still running.
struct Watching {
    child: Child,
    log: PathBuf,
}

impl Watching {
    fn start(b: &Bins, t: &TempDir) -> Watching {
        Self::start_with(b, t, &[], &[])
    }

    /// With extra arguments and environment.
    fn start_with(b: &Bins, t: &TempDir, args: &[&str], env: &[(&str, &Path)]) -> Watching {
        let log = t.0.join("installer.log");
        let f = fs::File::create(&log).unwrap();
        let child = Command::new(&b.installer)
            .args(args)
            .envs(env.iter().copied())
            .arg("--cni-conf-dir")
            .arg(t.conf())
            .arg("--cni-bin-dir")
            .arg(t.bin())
            .arg("--plugin-binary")
            .arg(&b.plugin)
            .env("TAPESTRY_CNI_PLUGIN_CONFIG", PLUGIN_CONFIG)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Watching { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `cond`; panics with the log after `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "installer exited ({status}) waiting for {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, and the exit status.
    fn terminate(mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

/// How a primary rewrites its file.
#[derive(Clone, Copy, Debug)]
enum Rewrite {
    /// open(O_TRUNC), write, close: the same inode.
    InPlace,
    /// A temporary file renamed over it (Calico's and Cilium's way).
    Rename,
    /// Deleted, then written anew.
    Recreate,
}

fn rewrite(dir: &Path, name: &str, text: &str, how: Rewrite) {
    let path = dir.join(name);
    match how {
        Rewrite::InPlace => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .create(true)
                .open(&path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
        Rewrite::Rename => {
            let tmp = dir.join(format!(".{name}.tmp"));
            fs::write(&tmp, text).unwrap();
            fs::rename(&tmp, &path).unwrap();
        }
        Rewrite::Recreate => {
            let _ = fs::remove_file(&path);
            fs::write(&path, text).unwrap();
        }
    }
}

/// Calico's list with a distinguishing MTU, as a restarted calico-node would write it.
fn calico_with_mtu(mtu: u32) -> String {
    CALICO.1.replace("\"mtu\": 0", &format!("\"mtu\": {mtu}"))
}

// ---------------------------------------------------------------------------------------------
// --once and --uninstall
// ---------------------------------------------------------------------------------------------

#[test]
fn once_chains_into_every_primary_and_uninstall_restores_it() {
    let Some(b) = bins() else { return };
    for primary in [
        CALICO,
        FLANNEL,
        CILIUM,
        CILIUM_CONF,
        KINDNET,
        BRIDGE_CONF,
        BRIDGE_LIST,
    ] {
        let ctx = primary.0;
        let t = TempDir::new("once");
        t.write(primary);
        t.write(LOOPBACK);
        fs::write(t.conf().join("calico-kubeconfig"), "apiVersion: v1\n").unwrap();
        for other in ["bridge", "portmap"] {
            fs::write(t.bin().join(other), format!("#!/bin/sh\n# {other}\n")).unwrap();
        }
        let conf_before = snapshot(&t.conf());
        let bin_before = snapshot(&t.bin());

        let r = install(&b, &t, &["--once", "--plugin-config", PLUGIN_CONFIG]);
        assert!(r.status.success(), "{ctx}: {}", r.stderr);
        assert!(r.stderr.contains("chained last"), "{ctx}: {}", r.stderr);

        // The runtime's choice is a list ending with the step; the rest as the primary wrote it.
        let chosen = runtime_primary(&t.conf()).unwrap();
        let original: Value = serde_json::from_str(primary.1).unwrap();
        let list = t.json(&chosen).unwrap();
        let got = steps(&list);
        assert_eq!(got.last(), Some(&expected_entry()), "{ctx}: {list}");
        assert_eq!(ours(&list), 1, "{ctx}");
        assert_eq!(list["name"], original["name"], "{ctx}");
        assert_eq!(list["cniVersion"], original["cniVersion"], "{ctx}");
        if primary.0.ends_with(".conflist") {
            assert_eq!(chosen, primary.0);
            assert_eq!(got[..got.len() - 1], steps(&original)[..], "{ctx}");
            let text = fs::read_to_string(t.conf().join(&chosen)).unwrap();
            let keys = ["name", "cniVersion", "plugins"];
            assert_eq!(
                top_key_order(&text, &keys),
                top_key_order(primary.1, &keys),
                "{ctx}: key order"
            );
        } else {
            let stem = primary.0.trim_end_matches(".conf");
            assert_eq!(chosen, format!("{stem}.conflist"), "{ctx}");
            assert!(!t.conf().join(primary.0).exists(), "{ctx}: .conf left");
            let mut single = original.as_object().unwrap().clone();
            single.remove("cniVersion");
            single.remove("name");
            assert_eq!(got.len(), 2, "{ctx}");
            assert_eq!(got[0], Value::Object(single), "{ctx}");
        }
        // Other files untouched; the binary copied, other binaries untouched.
        let conf_after = snapshot(&t.conf());
        for name in [LOOPBACK.0, "calico-kubeconfig"] {
            assert_eq!(conf_after[name], conf_before[name], "{ctx}: {name}");
        }
        let bin_after = snapshot(&t.bin());
        assert_eq!(
            bin_after.keys().collect::<Vec<_>>(),
            ["bridge", "portmap", "tapestry-cni"],
            "{ctx}"
        );
        for name in ["bridge", "portmap"] {
            assert_eq!(bin_after[name], bin_before[name], "{ctx}: {name}");
        }
        let installed = t.bin().join("tapestry-cni");
        assert_eq!(fs::read(&installed).unwrap(), fs::read(&b.plugin).unwrap());
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            !names(&t.conf())
                .iter()
                .any(|n| n.contains("tapestry-install")),
            "{ctx}: temporary file left: {:?}",
            names(&t.conf())
        );

        // Twice: nothing written (same bytes, same inodes).
        let r = install(&b, &t, &["--once", "--plugin-config", PLUGIN_CONFIG]);
        assert!(r.status.success(), "{ctx}: {}", r.stderr);
        assert_eq!(snapshot(&t.conf()), conf_after, "{ctx}: second run wrote");
        assert_eq!(snapshot(&t.bin()), bin_after, "{ctx}: second run wrote");

        // Uninstall: exactly the original files; a .conf byte for byte, a list the same JSON in
        // the same key order; the binary gone, the others kept.
        let r = install(&b, &t, &["--uninstall"]);
        assert!(r.status.success(), "{ctx}: {}", r.stderr);
        let conf_undone = snapshot(&t.conf());
        assert_eq!(
            conf_undone.keys().collect::<Vec<_>>(),
            conf_before.keys().collect::<Vec<_>>(),
            "{ctx}"
        );
        for (name, (bytes, _)) in &conf_before {
            if name == primary.0 && name.ends_with(".conflist") {
                let text = String::from_utf8(conf_undone[name].0.clone()).unwrap();
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v, original, "{ctx}");
                let keys = ["name", "cniVersion", "plugins"];
                assert_eq!(
                    top_key_order(&text, &keys),
                    top_key_order(primary.1, &keys),
                    "{ctx}"
                );
            } else {
                assert_eq!(&conf_undone[name].0, bytes, "{ctx}: {name}");
            }
        }
        let bin_undone = snapshot(&t.bin());
        assert_eq!(bin_undone, bin_before, "{ctx}: bin dir after uninstall");
    }
}

/// A refusal case: what it is, the primary written (if any), extra arguments, what stderr says.
type Refusal<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a [&'a str], &'a str);

#[test]
fn refusals_exit_non_zero_and_write_nothing() {
    let Some(b) = bins() else { return };
    let cases: [Refusal; 6] = [
        ("empty conf dir", None, &[], "no network config in"),
        (
            "invalid JSON",
            Some((
                "10-calico.conflist",
                "{\"name\": \"k8s-pod-network\", \"plugins\": [",
            )),
            &[],
            "not valid JSON",
        ),
        (
            "empty file",
            Some(("10-flannel.conflist", "")),
            &[],
            "the file is empty",
        ),
        (
            "no plugins",
            Some((
                "10-kindnet.conflist",
                r#"{"cniVersion": "0.3.1", "name": "kindnet"}"#,
            )),
            &[],
            "names no plugins",
        ),
        (
            "a .conf without a type",
            Some((
                "10-mynet.conf",
                r#"{"cniVersion": "1.0.0", "name": "mynet"}"#,
            )),
            &[],
            "names no plugins",
        ),
        (
            "a bad --plugin-config",
            Some(FLANNEL),
            &["--plugin-config", "{\"type\": \"bridge\"}"],
            "--plugin-config",
        ),
    ];
    for (ctx, file, extra, says) in cases {
        let t = TempDir::new("refuse");
        if let Some(f) = file {
            t.write(f);
            // A valid config after the broken primary must not be touched either.
            t.write(LOOPBACK);
        }
        let conf_before = snapshot(&t.conf());
        let mut args = vec!["--once"];
        args.extend_from_slice(extra);
        let r = install(&b, &t, &args);
        assert_eq!(r.status.code(), Some(1), "{ctx}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{ctx}: {}", r.stderr);
        if let Some((name, _)) = file
            && ctx != "a bad --plugin-config"
        {
            assert!(
                r.stderr.contains(name),
                "{ctx}: names the file: {}",
                r.stderr
            );
        }
        assert_eq!(snapshot(&t.conf()), conf_before, "{ctx}: conf dir written");
        assert_eq!(
            names(&t.bin()),
            Vec::<String>::new(),
            "{ctx}: binary written"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Watching
// ---------------------------------------------------------------------------------------------

/// The primary list holds the step once, last, and the primary's content with MTU `mtu`.
fn chained_with_mtu(t: &TempDir, name: &str, mtu: u32) -> bool {
    t.json(name).is_some_and(|l| {
        let s = steps(&l);
        ours(&l) == 1 && s.last() == Some(&expected_entry()) && s[0]["mtu"] == mtu && s.len() == 4
    })
}

#[test]
fn watching_puts_the_step_back_after_every_kind_of_rewrite() {
    let Some(b) = bins() else { return };
    let t = TempDir::new("watch");
    t.write(CALICO);
    let mut w = Watching::start(&b, &t);
    w.wait("first insertion", PATIENCE, || {
        chained_with_mtu(&t, CALICO.0, 0)
    });
    assert!(t.bin().join("tapestry-cni").exists());

    // calico-node restarting, again and again, each time a little different; each rewrite
    // drops the step and it must come back, over the new content.
    let kinds = [Rewrite::InPlace, Rewrite::Rename, Rewrite::Recreate];
    let mut n = 0;
    for i in 1..=30u32 {
        let how = kinds[i as usize % 3];
        rewrite(&t.conf(), CALICO.0, &calico_with_mtu(i), how);
        w.wait(
            &format!("step back after rewrite {i} ({how:?})"),
            PATIENCE,
            || chained_with_mtu(&t, CALICO.0, i),
        );
        n += 1;
    }
    assert_eq!(n, 30);

    // Rewrites back to back, without waiting: the last one's content wins and ends chained.
    for i in 100..=140u32 {
        rewrite(
            &t.conf(),
            CALICO.0,
            &calico_with_mtu(i),
            kinds[i as usize % 3],
        );
    }
    w.wait("step back after a burst of rewrites", PATIENCE, || {
        chained_with_mtu(&t, CALICO.0, 140)
    });

    // Another primary appears and sorts first: the step moves there and leaves Calico's file.
    rewrite(&t.conf(), CILIUM.0, CILIUM.1, Rewrite::Rename);
    w.wait("step moved to the new primary", PATIENCE, || {
        let cilium = t.json(CILIUM.0).unwrap_or_default();
        let calico = t.json(CALICO.0).unwrap_or_default();
        ours(&cilium) == 1 && steps(&cilium).last() == Some(&expected_entry()) && ours(&calico) == 0
    });
    let calico = t.json(CALICO.0).unwrap();
    let expected: Value = serde_json::from_str(&calico_with_mtu(140)).unwrap();
    assert_eq!(
        calico, expected,
        "Calico's file back to what calico-node wrote"
    );

    // And back when it goes.
    fs::remove_file(t.conf().join(CILIUM.0)).unwrap();
    w.wait("step back in Calico's file", PATIENCE, || {
        chained_with_mtu(&t, CALICO.0, 140)
    });
    assert!(
        !names(&t.conf())
            .iter()
            .any(|n| n.contains("tapestry-install")),
        "temporary file left: {:?}",
        names(&t.conf())
    );

    // SIGTERM: a clean exit that leaves the chain in place.
    let log = w.log();
    let status = w.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(chained_with_mtu(&t, CALICO.0, 140));
    assert!(log.contains("chained last"), "{log}");
}

#[test]
fn watching_waits_for_a_config_and_follows_a_conf_primary() {
    let Some(b) = bins() else { return };
    let t = TempDir::new("wait");
    let mut w = Watching::start(&b, &t);
    w.wait("the installer says it waits", PATIENCE, || {
        w_log(&t).contains("waiting for one")
    });
    assert_eq!(names(&t.conf()), Vec::<String>::new());

    // The Cilium agent starts and writes its .conf (temporary file + rename).
    rewrite(&t.conf(), CILIUM_CONF.0, CILIUM_CONF.1, Rewrite::Rename);
    let list = "05-cilium.conflist";
    let converted = |t: &TempDir, debug: bool| {
        !t.conf().join(CILIUM_CONF.0).exists()
            && t.json(list).is_some_and(|l| {
                steps(&l).len() == 2
                    && steps(&l)[0]["enable-debug"] == debug
                    && steps(&l)[1] == expected_entry()
            })
    };
    w.wait("the .conf converted", PATIENCE, || converted(&t, false));

    // It restarts with debugging on and writes its .conf again, in place.
    let newer = CILIUM_CONF.1.replace("false", "true");
    rewrite(&t.conf(), CILIUM_CONF.0, &newer, Rewrite::InPlace);
    w.wait("the new .conf converted", PATIENCE, || converted(&t, true));

    let status = w.terminate();
    assert_eq!(status.code(), Some(0));

    // Uninstall: what the agent wrote last comes back, byte for byte.
    let r = install(&b, &t, &["--uninstall"]);
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(names(&t.conf()), [CILIUM_CONF.0]);
    assert_eq!(
        fs::read_to_string(t.conf().join(CILIUM_CONF.0)).unwrap(),
        newer
    );
    assert_eq!(names(&t.bin()), Vec::<String>::new());
}

#[test]
fn watching_a_symlinked_primary_keeps_the_link_and_follows_its_target() {
    let Some(b) = bins() else { return };
    let t = TempDir::new("link");
    // The primary's owner keeps its list elsewhere and links it into the conf directory.
    let owner = t.0.join("calico");
    fs::create_dir_all(&owner).unwrap();
    fs::write(owner.join("calico.conflist"), calico_with_mtu(0)).unwrap();
    let link = t.conf().join(CALICO.0);
    std::os::unix::fs::symlink(owner.join("calico.conflist"), &link).unwrap();
    let copy = "10-calico-tapestry.conflist";
    let is_link = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());

    let mut w = Watching::start(&b, &t);
    w.wait("the chained copy", PATIENCE, || {
        chained_with_mtu(&t, copy, 0)
    });
    assert_eq!(runtime_primary(&t.conf()).as_deref(), Some(copy));
    assert!(is_link(&link), "the primary's symlink was replaced");
    assert_eq!(
        fs::read_to_string(owner.join("calico.conflist")).unwrap(),
        calico_with_mtu(0),
        "the link's target was written"
    );

    // Its owner rewrites the target, every way: the copy follows, the link stays.
    let kinds = [Rewrite::InPlace, Rewrite::Rename, Rewrite::Recreate];
    for i in 1..=9u32 {
        let how = kinds[i as usize % 3];
        rewrite(&owner, "calico.conflist", &calico_with_mtu(i), how);
        w.wait(
            &format!("the copy follows rewrite {i} ({how:?})"),
            PATIENCE,
            || chained_with_mtu(&t, copy, i),
        );
        assert!(is_link(&link));
    }

    // The link is pointed somewhere else (a ConfigMap update swaps it): the copy follows that.
    let moved = t.0.join("calico-v2");
    fs::create_dir_all(&moved).unwrap();
    fs::write(moved.join("calico.conflist"), calico_with_mtu(20)).unwrap();
    let tmp_link = t.conf().join(".link.tmp");
    std::os::unix::fs::symlink(moved.join("calico.conflist"), &tmp_link).unwrap();
    fs::rename(&tmp_link, &link).unwrap();
    w.wait("the copy follows the new target", PATIENCE, || {
        chained_with_mtu(&t, copy, 20)
    });
    rewrite(
        &moved,
        "calico.conflist",
        &calico_with_mtu(21),
        Rewrite::Rename,
    );
    w.wait(
        "the copy follows the new target's rewrite",
        PATIENCE,
        || chained_with_mtu(&t, copy, 21),
    );

    // The owner replaces the link with a regular file: the copy goes, the file is chained.
    fs::remove_file(&link).unwrap();
    t.write((CALICO.0, &calico_with_mtu(30)));
    w.wait("the file chained in place", PATIENCE, || {
        chained_with_mtu(&t, CALICO.0, 30) && !t.conf().join(copy).exists()
    });

    // Linked again; then uninstall leaves the link and its target as they are.
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(moved.join("calico.conflist"), &link).unwrap();
    w.wait("the copy again", PATIENCE, || {
        chained_with_mtu(&t, copy, 21)
    });
    assert_eq!(w.terminate().code(), Some(0));
    let r = install(&b, &t, &["--uninstall"]);
    assert!(r.status.success(), "{}", r.stderr);
    assert_eq!(names(&t.conf()), [CALICO.0]);
    assert!(is_link(&link));
    assert_eq!(
        fs::read_to_string(moved.join("calico.conflist")).unwrap(),
        calico_with_mtu(21)
    );
}

fn w_log(t: &TempDir) -> String {
    fs::read_to_string(t.0.join("installer.log")).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The installed chain, executed for real
// ---------------------------------------------------------------------------------------------

const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

fn plugin_dirs() -> Result<(PathBuf, PathBuf), String> {
    let debian = PathBuf::from(DEBIAN_PLUGINS);
    if !["bridge", "ptp", "host-local"]
        .iter()
        .all(|p| debian.join(p).exists())
    {
        return Err(format!(
            "reference CNI plugins in {DEBIAN_PLUGINS} (apt-get install containernetworking-plugins)"
        ));
    }
    let v110 = match std::env::var_os("TAPESTRY_CNI_PLUGINS_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("TAPESTRY_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cache/tapestry")
            })
            .join("cni-plugins-v1.10.0"),
    };
    if !["bridge", "ptp", "host-local"]
        .iter()
        .all(|p| v110.join(p).exists())
    {
        return Err(format!(
            "reference CNI plugins v1.10.0 in {} (run scripts/install-cni-plugins.sh)",
            v110.display()
        ));
    }
    Ok((debian, v110))
}

/// The chain the installer made, at every CNI version, with `ptp` and `bridge` as the primary
/// (written as a .conf and as a .conflist in turn): ADD registers the pod with tapestryd and
/// attaches the datapath to its host veth, CHECK passes (0.4.0+), DEL removes it all.
#[test]
fn the_installed_chain_runs_with_the_reference_plugins_at_every_version() {
    require_lab!();
    let Some(b) = bins() else { return };
    let dirs =
        plugin_dirs().and_then(|d| binary("tapestryd").map(|_| d).map_err(|e| format!("{e:#}")));
    if !available("lab", dirs.as_ref().map(|_| ()).map_err(Clone::clone)) {
        return;
    }
    let (debian, v110) = dirs.unwrap();
    let lab = Lab::new("install-cni-chain").unwrap();
    let daemon = Daemon::start("install-cni", "services: []", &[])
        .unwrap_or_else(|e| panic!("starting tapestryd (built without AYA_BUILD_SKIP?): {e:#}"));
    let (net, len) = lab.pod_cidr();
    let o = net.octets();
    let gateway = format!("{}.{}.{}.1", o[0], o[1], o[2]);
    let plugin_config = json!({"socket": daemon.socket, "logLevel": "debug"}).to_string();

    let mut n = 0;
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        for primary in ["ptp", "bridge"] {
            n += 1;
            let ctx = format!("{primary} @ {version}");
            let t = TempDir::new("chain");
            let ipam = json!({
                "type": "host-local",
                "dataDir": t.0.join("ipam"),
                "ranges": [[{"subnet": format!("{net}/{len}"), "gateway": gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            });
            let mut conf = json!({"type": primary, "ipMasq": false, "mtu": 1450, "ipam": ipam});
            if primary == "bridge" {
                conf["bridge"] = json!(format!("{}-br", lab.prefix()));
                conf["isGateway"] = json!(true);
            }
            let network = format!("net-{primary}");
            // Alternately a single-plugin .conf (converted) and a list.
            if n % 2 == 1 {
                let mut single = json!({"cniVersion": version, "name": network});
                for (k, v) in conf.as_object().unwrap() {
                    single[k] = v.clone();
                }
                fs::write(t.conf().join("10-primary.conf"), single.to_string()).unwrap();
            } else {
                let list = json!({"cniVersion": version, "name": network, "plugins": [conf]});
                fs::write(t.conf().join("10-primary.conflist"), list.to_string()).unwrap();
            }
            let r = install(&b, &t, &["--once", "--plugin-config", &plugin_config]);
            assert!(r.status.success(), "{ctx}: {}", r.stderr);

            // What the runtime reads: the first file, as it is now.
            let chosen = runtime_primary(&t.conf()).unwrap();
            assert_eq!(chosen, "10-primary.conflist", "{ctx}");
            let list =
                NetworkConfigList::from_bytes(&fs::read(t.conf().join(&chosen)).unwrap()).unwrap();
            assert_eq!(list.cni_version, version, "{ctx}");
            let types: Vec<&str> = list
                .plugins
                .iter()
                .map(|p| p["type"].as_str().unwrap())
                .collect();
            assert_eq!(types, [primary, "tapestry-cni"], "{ctx}");

            let plugins = if version == "1.1.0" { &v110 } else { &debian };
            let rt = Runtime::new([plugins, &t.bin()], t.0.join("cache"));
            let ns = format!("{}-i{n}", lab.prefix());
            run(Command::new("ip").args(["netns", "add", &ns])).unwrap();
            let netns = PathBuf::from("/run/netns").join(&ns);
            let cid = format!("inst{n}");
            let rc = RuntimeConf::new(&cid, &netns, "eth0")
                .arg("IgnoreUnknown", "1")
                .arg("K8S_POD_NAMESPACE", "default")
                .arg("K8S_POD_NAME", &format!("pod{n}"));

            let result = rt
                .add(&list, &rc)
                .unwrap_or_else(|e| panic!("{ctx}: ADD: {e}\n{}", daemon.log()));
            assert_eq!(result["cniVersion"], version, "{ctx}");
            let history = rt.history();
            assert_eq!(history.len(), 2, "{ctx}");
            assert_eq!(history[1].plugin, "tapestry-cni");
            // The step ran from the plugin directory the installer filled.
            let endpoint = daemon
                .client()
                .endpoints()
                .unwrap()
                .into_iter()
                .find(|e| e.request.container_id == cid)
                .unwrap_or_else(|| panic!("{ctx}: no endpoint\n{}", daemon.log()));
            let host = endpoint.request.host_ifname.clone();
            assert!(
                daemon
                    .client()
                    .attachments()
                    .unwrap()
                    .iter()
                    .any(|a| a.ifname == host),
                "{ctx}: datapath not attached to {host}"
            );
            if version_ge(version, "0.4.0") {
                rt.check(&list, &rc)
                    .unwrap_or_else(|e| panic!("{ctx}: CHECK: {e}"));
            }
            rt.del(&list, &rc)
                .unwrap_or_else(|e| panic!("{ctx}: DEL: {e}\n{}", daemon.log()));
            assert!(
                !daemon
                    .client()
                    .endpoints()
                    .unwrap()
                    .iter()
                    .any(|e| e.request.container_id == cid),
                "{ctx}: endpoint left"
            );
            run(Command::new("ip").args(["netns", "del", &ns])).unwrap();

            // Uninstall leaves the primary as it was written.
            let r = install(&b, &t, &["--uninstall"]);
            assert!(r.status.success(), "{ctx}: {}", r.stderr);
            assert_eq!(names(&t.bin()), Vec::<String>::new(), "{ctx}");
        }
    }
    lab.destroy().unwrap();
}

/// The watching installer's SIGTERM is an uninstall only when its DaemonSet is gone (`helm
/// uninstall`); on a rolling update (the DaemonSet still there) the step stays, so no pod is
/// created without Tapestry while the new pod starts. A real apiserver holds the DaemonSet.
#[test]
fn on_stop_the_step_goes_only_with_its_daemonset() {
    tapestry_tests::require_k8s!();
    let Some(b) = bins() else { return };
    let cp = tapestry_tests::k8s::ControlPlane::start_with(&[tapestry_tests::k8s::Identity::new(
        "uninstalled",
        "system:serviceaccount:tapestry:tapestry-node",
        &[],
    )])
    .unwrap();
    cp.kubectl_ok(["create", "namespace", "tapestry"]).unwrap();
    cp.apply(
        &json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "tapestry-node", "namespace": "tapestry"},
            "spec": {"selector": {"matchLabels": {"app": "t"}},
                     "template": {"metadata": {"labels": {"app": "t"}},
                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
        .to_string(),
    )
    .unwrap();
    let kubeconfig = cp.kubeconfig_path("admin").unwrap();
    let args = [
        "--uninstall-on-exit",
        "--unless-daemonset-remains",
        "tapestry/tapestry-node",
    ];
    let t = TempDir::new("owner");
    t.write(CALICO);

    // One watching installer's life: started as the chart starts it, chained, then SIGTERM.
    let stop_once = |kubeconfig: &Path| -> String {
        let mut w = Watching::start_with(&b, &t, &args, &[("KUBECONFIG", kubeconfig)]);
        w.wait("the watch", PATIENCE, || {
            fs::read_to_string(t.0.join("installer.log")).is_ok_and(|l| l.contains("watching:"))
        });
        w.wait("insertion", PATIENCE, || chained_with_mtu(&t, CALICO.0, 0));
        let status = w.terminate();
        let log = fs::read_to_string(t.0.join("installer.log")).unwrap();
        assert!(status.success(), "{status}: {log}");
        log
    };

    // A rolling update: the DaemonSet is still there.
    let log = stop_once(&kubeconfig);
    assert!(
        chained_with_mtu(&t, CALICO.0, 0),
        "the step stays while the DaemonSet exists:\n{log}"
    );
    assert!(t.bin().join("tapestry-cni").exists(), "{log}");
    assert!(log.contains("still exists"), "{log}");

    // helm uninstall deletes the installer's Role and ServiceAccount right after the DaemonSet,
    // before the pods stop: a 403 (or 401) for the DaemonSet is the uninstall as well.
    let log = stop_once(&cp.kubeconfig_path("uninstalled").unwrap());
    assert_eq!(
        ours(&t.json(CALICO.0).unwrap()),
        0,
        "403 means uninstalled:\n{log}"
    );
    assert!(log.contains("403"), "{log}");

    // helm uninstall: the DaemonSet is deleted first, then its pods stop.
    cp.kubectl_ok(["delete", "daemonset", "-n", "tapestry", "tapestry-node"])
        .unwrap();
    let log = stop_once(&kubeconfig);
    assert_eq!(
        ours(&t.json(CALICO.0).unwrap()),
        0,
        "the step goes with the DaemonSet:\n{log}"
    );
    assert!(!t.bin().join("tapestry-cni").exists(), "{log}");
}
