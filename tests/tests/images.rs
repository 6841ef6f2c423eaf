//! The images of `make images` (scripts/build-images.sh), run with podman the way the chart runs
//! them: the install-cni image's init container and sidecar, with exactly the command, arguments
//! and security context of the committed manifests (deploy/manifests/tapestry.yaml), against a
//! temporary host conf dir and bin dir bind-mounted where the DaemonSet mounts the node's.
//!
//! Needs root, podman and runc, the musl target and musl-gcc (scripts/setup.sh installs them);
//! skipped (or failed under `CI=...`) without them. The first run builds the static binaries
//! (several minutes); later runs reuse the archive in ~/.cache/tapestry/images.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tapestry_tests::{poll, prereq};

const INSTALL_CNI: &str = "install-cni";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn workspace_version() -> Result<String> {
    let text = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let mut in_package = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_package = l == "[workspace.package]";
        } else if in_package && let Some(v) = l.strip_prefix("version") {
            return Ok(v
                .trim_start_matches([' ', '='])
                .trim()
                .trim_matches('"')
                .into());
        }
    }
    bail!("no [workspace.package] version in Cargo.toml")
}

fn program_runs(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// What building and running the images needs; the error names everything missing.
fn require_podman() -> Result<(), String> {
    let mut missing = Vec::new();
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (podman runs the images with host bind mounts)".to_string());
    }
    for (prog, args, hint) in [
        ("podman", &["--version"][..], "apt-get install podman"),
        ("runc", &["--version"][..], "apt-get install runc"),
        ("musl-gcc", &["--version"][..], "apt-get install musl-tools"),
        ("file", &["--version"][..], "apt-get install file"),
    ] {
        if !program_runs(prog, args) {
            missing.push(format!("{prog} ({hint})"));
        }
    }
    let musl = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == "x86_64-unknown-linux-musl")
        });
    if !musl {
        missing.push("the Rust target x86_64-unknown-linux-musl (rustup target add)".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing image prerequisite: {}",
            missing.join("; ")
        ))
    }
}

/// Builds (or reuses) images with scripts/build-images.sh; returns the archives' directory.
fn build_images(names: &[&str]) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(root().join("scripts/build-images.sh"))
        .args(names)
        .current_dir(root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running scripts/build-images.sh")?;
    ensure!(
        out.status.success(),
        "scripts/build-images.sh {names:?} failed ({})",
        out.status
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// The committed manifests' DaemonSet pod spec (the chart with its default values).
fn daemonset_pod() -> Result<Value> {
    let path = root().join("deploy/manifests/tapestry.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if v["kind"] == "DaemonSet" && v["metadata"]["name"] == "tapestry-node" {
            return Ok(v["spec"]["template"]["spec"].clone());
        }
    }
    bail!("no DaemonSet tapestry-node in {}", path.display())
}

fn container(pod: &Value, list: &str, name: &str) -> Result<Value> {
    pod[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .cloned()
        .with_context(|| format!("no {list} {name} in the DaemonSet"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "tapestry-images-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// podman with this machine's workarounds (toolchain notes, section 5): runc, cgroupfs.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .stdin(Stdio::null());
    c
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A container that is removed on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The host side of the node: a conf dir with a primary network (the reference bridge, the
/// first file by name) and an unrelated later one, and a bin dir with another plugin in it.
struct Host {
    dir: TempDir,
    primary: Value,
    other: String,
}

const PRIMARY_FILE: &str = "10-bridge.conflist";
const OTHER_FILE: &str = "99-other.conflist";

impl Host {
    fn new(tag: &str) -> Result<Host> {
        let dir = TempDir::new(tag)?;
        std::fs::create_dir_all(dir.join("net.d"))?;
        std::fs::create_dir_all(dir.join("bin"))?;
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.85.0.0/16"}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        let other = "{\"cniVersion\": \"1.0.0\", \"name\": \"other\", \"plugins\": [{\"type\": \"ptp\"}]}\n".to_string();
        let host = Host {
            dir,
            primary,
            other,
        };
        host.write_primary()?;
        std::fs::write(host.conf_dir().join(OTHER_FILE), &host.other)?;
        std::fs::write(host.bin_dir().join("bridge"), b"not really bridge\n")?;
        Ok(host)
    }

    fn conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// What the primary CNI writes (also when it rewrites its file and drops our step).
    fn write_primary(&self) -> Result<()> {
        let path = self.conf_dir().join(PRIMARY_FILE);
        let tmp = self.conf_dir().join(".primary.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.primary)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn primary_now(&self) -> Result<Value> {
        let path = self.conf_dir().join(PRIMARY_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{PRIMARY_FILE} is not JSON: {text}"))
    }

    /// Checks the other files are untouched and no temporary file is left.
    fn check_rest(&self) -> Result<()> {
        assert_eq!(
            std::fs::read_to_string(self.conf_dir().join(OTHER_FILE))?,
            self.other
        );
        assert_eq!(
            std::fs::read(self.bin_dir().join("bridge"))?,
            b"not really bridge\n"
        );
        let mut conf: Vec<String> = std::fs::read_dir(self.conf_dir())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        conf.sort();
        assert_eq!(conf, [PRIMARY_FILE, OTHER_FILE], "files in the conf dir");
        Ok(())
    }

    /// `podman run` arguments that give a container of the DaemonSet the host dirs where the
    /// chart mounts the node's, and the container's security context.
    fn run_args(&self, c: &Value, pod: &Value) -> Result<Vec<String>> {
        let mut a = Vec::new();
        for m in c["volumeMounts"].as_array().context("volumeMounts")? {
            let vol = pod["volumes"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["name"] == m["name"]))
                .context("volume of a mount")?;
            let host = match vol["hostPath"]["path"].as_str() {
                Some("/etc/cni/net.d") => self.conf_dir(),
                Some("/opt/cni/bin") => self.bin_dir(),
                other => bail!("the installer mounts an unexpected host path {other:?}"),
            };
            a.push(format!(
                "--volume={}:{}",
                host.display(),
                m["mountPath"].as_str().context("mountPath")?
            ));
        }
        let sc = &c["securityContext"];
        if let Some(uid) = sc["runAsUser"].as_u64() {
            a.push(format!("--user={uid}"));
        }
        if sc["readOnlyRootFilesystem"] == true {
            a.push("--read-only".into());
        }
        if sc["allowPrivilegeEscalation"] == false {
            a.push("--security-opt=no-new-privileges".into());
        }
        for cap in strings(&sc["capabilities"]["drop"]) {
            a.push(format!("--cap-drop={cap}"));
        }
        for cap in strings(&sc["capabilities"]["add"]) {
            a.push(format!("--cap-add={cap}"));
        }
        ensure!(
            sc["privileged"] != true,
            "the installer must not be privileged"
        );
        Ok(a)
    }
}

/// Limits no higher than ours (podman here cannot raise them: no CAP_SYS_RESOURCE).
fn ulimits() -> Vec<String> {
    let limit = |res| {
        // SAFETY: getrlimit fills a plain struct.
        let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
        unsafe { libc::getrlimit(res, &mut r) };
        r.rlim_max.min(4096)
    };
    let (nofile, nproc) = (limit(libc::RLIMIT_NOFILE), limit(libc::RLIMIT_NPROC));
    vec![
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ]
}

fn container_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "tapestry-images-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The step the chart's plugin config gives, after the primary's own plugins.
fn check_chained(host: &Host, now: &Value, plugin_config: &Value) -> Result<()> {
    let plugins = now["plugins"].as_array().context("plugins")?;
    let before = host.primary["plugins"].as_array().context("plugins")?;
    assert_eq!(plugins.len(), before.len() + 1, "{now}");
    assert_eq!(
        &plugins[..before.len()],
        &before[..],
        "the primary's plugins changed: {now}"
    );
    for key in ["cniVersion", "name"] {
        assert_eq!(now[key], host.primary[key], "{key}");
    }
    let ours = plugins.last().context("no step")?;
    assert_eq!(ours["type"], "tapestry-cni", "{ours}");
    assert_eq!(
        ours["capabilities"]["io.kubernetes.cri.pod-annotations"], true,
        "{ours}"
    );
    for (k, v) in plugin_config.as_object().context("plugin config")? {
        assert_eq!(&ours[k], v, "{k} of the step: {ours}");
    }
    Ok(())
}

/// The installed binary is executable and, run on the host as a runtime would, answers VERSION.
fn check_binary(host: &Host) -> Result<()> {
    let bin = host.bin_dir().join("tapestry-cni");
    let meta =
        std::fs::metadata(&bin).with_context(|| format!("{} not installed", bin.display()))?;
    assert!(
        meta.permissions().mode() & 0o111 != 0,
        "{} is not executable",
        bin.display()
    );
    let out = Command::new(&bin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .context("running the installed tapestry-cni")?;
    assert!(out.status.success(), "tapestry-cni VERSION: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let supported = strings(&v["supportedVersions"]);
    for want in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.iter().any(|s| s == want), "{want} missing: {v}");
    }
    Ok(())
}

fn has_step(v: &Value) -> bool {
    v["plugins"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["type"] == "tapestry-cni"))
}

/// The image is built and named as the chart expects; the archive names it for `ctr import`.
#[test]
fn install_cni_image_is_built_and_named() -> Result<()> {
    if !prereq::available("podman", require_podman()) {
        return Ok(());
    }
    let version = workspace_version()?;
    let dir = build_images(&[INSTALL_CNI])?;
    let reference = format!("localhost/tapestry/{INSTALL_CNI}:{version}");
    let archive = dir.join(format!("{INSTALL_CNI}-{version}.oci.tar"));
    ensure!(archive.is_file(), "no archive {}", archive.display());
    // containerd names an imported image after this annotation (a full reference is kept).
    let index = run_ok(
        Command::new("tar")
            .arg("-xOf")
            .arg(&archive)
            .arg("index.json"),
    )?;
    let index: Value = serde_json::from_str(&index)?;
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        reference.as_str(),
        "{index}"
    );
    // The chart's default image is this one.
    let pod = daemonset_pod()?;
    assert_eq!(
        container(&pod, "initContainers", INSTALL_CNI)?["image"],
        reference.as_str()
    );
    // FROM scratch: the two static binaries and nothing else.
    let inspect = run_ok(podman().args(["image", "inspect", &reference]))?;
    let inspect: Value = serde_json::from_str(&inspect)?;
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().map(Vec::len),
        Some(1),
        "{inspect}"
    );
    let started = Instant::now();
    build_images(&[INSTALL_CNI])?;
    eprintln!(
        "a second build-images.sh run (cached) took {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The init container: chains tapestry-cni into the primary conflist and installs the binary,
/// under the chart's security context (no capability, read-only root); a second run changes
/// nothing; the uninstall command restores the primary.
#[test]
fn install_cni_init_container_chains_the_plugin() -> Result<()> {
    if !prereq::available("podman", require_podman()) {
        return Ok(());
    }
    let version = workspace_version()?;
    build_images(&[INSTALL_CNI])?;
    let pod = daemonset_pod()?;
    let init = container(&pod, "initContainers", INSTALL_CNI)?;
    let args = strings(&init["args"]);
    assert!(args.iter().any(|a| a == "--once"), "{args:?}");
    let plugin_config: Value = serde_json::from_str(
        args.iter()
            .find_map(|a| a.strip_prefix("--plugin-config="))
            .context("no --plugin-config")?,
    )?;
    let host = Host::new("init")?;

    let run_init = |host: &Host, args: &[String]| -> Result<Output> {
        let mut cmd = podman();
        cmd.args([
            "run",
            "--rm",
            "--network=none",
            "--name",
            &container_name("init"),
        ])
        .args(ulimits())
        .args(host.run_args(&init, &pod)?)
        .arg(format!(
            "--entrypoint={}",
            init["command"][0].as_str().context("command")?
        ))
        .arg(format!("localhost/tapestry/{INSTALL_CNI}:{version}"))
        .args(args);
        run(&mut cmd)
    };
    let out = run_init(&host, &args)?;
    assert!(
        out.status.success(),
        "the init container failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now = host.primary_now()?;
    check_chained(&host, &now, &plugin_config)?;
    check_binary(&host)?;
    host.check_rest()?;

    // Idempotent: the same bytes after a second run.
    let first = std::fs::read(host.conf_dir().join(PRIMARY_FILE))?;
    let out = run_init(&host, &args)?;
    assert!(
        out.status.success(),
        "second run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(host.conf_dir().join(PRIMARY_FILE))?, first);

    // The one-shot uninstall with the init container's arguments: the primary as it was, no
    // binary.
    let mut uninstall: Vec<String> = args
        .iter()
        .filter(|a| a.as_str() != "--once" && !a.starts_with("--plugin-config"))
        .cloned()
        .collect();
    uninstall.push("--uninstall".into());
    let out = run_init(&host, &uninstall)?;
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host.primary_now()?, host.primary);
    assert!(
        !host.bin_dir().join("tapestry-cni").exists(),
        "the binary is still there"
    );
    host.check_rest()?;

    // With no network config at all, --once refuses and writes nothing.
    let empty = Host::new("empty")?;
    std::fs::remove_file(empty.conf_dir().join(PRIMARY_FILE))?;
    std::fs::remove_file(empty.conf_dir().join(OTHER_FILE))?;
    let out = run_init(&empty, &args)?;
    assert!(
        !out.status.success(),
        "--once succeeded without a network config"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no network config"), "{stderr}");
    assert!(!empty.bin_dir().join("tapestry-cni").exists());
    Ok(())
}

/// The sidecar: puts the step back when the primary rewrites its file; and when the pod stops
/// (SIGTERM) with no API server to say its DaemonSet is gone, the step and the binary stay (a
/// stop it cannot tell from a rolling update).
#[test]
fn install_cni_sidecar_keeps_the_step_until_stopped() -> Result<()> {
    if !prereq::available("podman", require_podman()) {
        return Ok(());
    }
    let version = workspace_version()?;
    build_images(&[INSTALL_CNI])?;
    let pod = daemonset_pod()?;
    let side = container(&pod, "containers", "install-cni-watch")?;
    let args = strings(&side["args"]);
    assert!(!args.iter().any(|a| a == "--once"), "{args:?}");
    let plugin_config: Value = serde_json::from_str(
        args.iter()
            .find_map(|a| a.strip_prefix("--plugin-config="))
            .context("no --plugin-config")?,
    )?;
    let host = Host::new("sidecar")?;
    let name = container_name("sidecar");
    let mut cmd = podman();
    cmd.args(["run", "--detach", "--network=none", "--name", &name])
        .args(ulimits())
        .args(host.run_args(&side, &pod)?)
        .arg(format!(
            "--entrypoint={}",
            side["command"][0].as_str().context("command")?
        ))
        .arg(format!("localhost/tapestry/{INSTALL_CNI}:{version}"))
        .args(&args);
    run_ok(&mut cmd)?;
    let ctr = Container(name.clone());
    let logs = || {
        run(podman().args(["logs", &ctr.0]))
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    };

    poll(
        Duration::from_secs(20),
        "the sidecar to chain the plugin",
        || Ok(host.primary_now().ok().filter(has_step)),
    )
    .with_context(logs)?;
    check_chained(&host, &host.primary_now()?, &plugin_config)?;
    check_binary(&host)?;

    // The primary rewrites its file (a restart of Calico, Flannel, ...): the step comes back.
    for _ in 0..3 {
        host.write_primary()?;
        let now = poll(Duration::from_secs(10), "the step to come back", || {
            Ok(host.primary_now().ok().filter(has_step))
        })
        .with_context(logs)?;
        check_chained(&host, &now, &plugin_config)?;
    }
    host.check_rest()?;

    // The pod stops: SIGTERM. The chart's --uninstall-on-exit removes the step only when the
    // installer's DaemonSet is gone (helm uninstall; tests/tests/install_cni.rs and the real
    // node cover that); here no API server can say, so the step and the binary stay, as they
    // must on a rolling update.
    assert!(args.iter().any(|a| a == "--uninstall-on-exit"), "{args:?}");
    assert!(
        args.iter()
            .any(|a| a.starts_with("--unless-daemonset-remains=")),
        "{args:?}"
    );
    run_ok(podman().args(["stop", "--time", "10", &ctr.0]))?;
    let state = run_ok(podman().args(["inspect", "--format", "{{.State.ExitCode}}", &ctr.0]))?;
    assert_eq!(state.trim(), "0", "the sidecar's exit code:\n{}", logs());
    let now = host.primary_now()?;
    check_chained(&host, &now, &plugin_config)?;
    check_binary(&host)?;
    assert!(logs().contains("keeping the step"), "{}", logs());
    host.check_rest()?;
    Ok(())
}

/// Removes a bpffs pin directory on drop (whatever the daemon left).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET path` on 127.0.0.1:port; the body of a 200 answer.
fn http_get(port: u16, path: &str) -> Result<Option<String>> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return Ok(None);
    };
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .starts_with("HTTP/1.1 200")
        .then(|| text.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// The daemon image under the DaemonSet's security context (not privileged, exactly the chart's
/// capabilities, read-only root, the runtime's default seccomp profile), in the host network with
/// bpffs mounted host-to-container as the chart mounts it: it loads, pins and attaches the
/// datapath, balances a Service between two lab pods, and a restarted container takes the pinned
/// datapath over; `tapestryd --uninstall` from the image removes the pins.
#[test]
fn tapestryd_image_runs_with_the_charts_capabilities() -> Result<()> {
    if !prereq::available("podman", require_podman()) {
        return Ok(());
    }
    tapestry_tests::require_lab!(Ok(()));
    let version = workspace_version()?;
    build_images(&["tapestryd"])?;
    let image = format!("localhost/tapestry/tapestryd:{version}");
    let pod = daemonset_pod()?;
    let d = container(&pod, "containers", "tapestryd")?;
    assert_eq!(d["image"], image.as_str());
    let sc = &d["securityContext"];
    ensure!(
        sc["privileged"] != true,
        "the daemon must not be privileged"
    );
    let mut security = vec![format!(
        "--user={}",
        sc["runAsUser"].as_u64().context("runAsUser")?
    )];
    if sc["readOnlyRootFilesystem"] == true {
        security.push("--read-only".into());
    }
    for cap in strings(&sc["capabilities"]["drop"]) {
        security.push(format!("--cap-drop={cap}"));
    }
    for cap in strings(&sc["capabilities"]["add"]) {
        security.push(format!("--cap-add={cap}"));
    }
    let bpffs_mount = d["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == "/sys/fs/bpf"))
        .context("no /sys/fs/bpf mount")?;
    assert_eq!(bpffs_mount["mountPropagation"], "HostToContainer");
    // The host's cgroup hierarchy, where the chart mounts it (the host services' programs go
    // on its v2 root).
    let cgroup_mount = d["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "cgroup"))
        .context("no cgroup mount")?;
    let cgroup_at = cgroup_mount["mountPath"]
        .as_str()
        .context("cgroup mountPath")?;
    assert_eq!(cgroup_mount["readOnly"], true);
    let cgroup_arg = format!("--cgroup-root={cgroup_at}");
    assert!(
        strings(&d["args"]).contains(&cgroup_arg),
        "the daemon is not given {cgroup_arg}: {}",
        d["args"]
    );

    let mut lab = tapestry_tests::Lab::new("images-daemon")?;
    let client = lab.add_pod("client")?;
    let backends = [lab.add_pod("be0")?, lab.add_pod("be1")?];
    let _servers = backends
        .iter()
        .map(|b| b.serve_tcp_name(8080))
        .collect::<Result<Vec<_>>>()?;
    let vip = lab.service_ip(0);
    let dir = TempDir::new("daemon")?;
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::create_dir_all(dir.join("run"))?;
    let mut state =
        format!("services:\n  - name: web\n    vip: {vip}\n    port: 80\n    backends:\n");
    for b in &backends {
        state.push_str(&format!(
            "      - {{ip: {}, port: 8080, name: {}}}\n",
            b.ip, b.name
        ));
    }
    std::fs::write(dir.join("etc/state.yaml"), state)?;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/tapestry-{}",
        lab.prefix()
    )));
    let port = free_port()?;
    let daemon_args = |extra: &[String]| -> Vec<String> {
        let mut a = vec![
            "--network=host".to_string(),
            // HostToContainer is rslave.
            "--volume=/sys/fs/bpf:/sys/fs/bpf:rslave".into(),
            format!("--volume={}:/run/tapestry", dir.join("run").display()),
            format!("--volume={}:/etc/tapestry:ro", dir.join("etc").display()),
            format!("--volume=/sys/fs/cgroup:{cgroup_at}:ro"),
        ];
        a.extend(ulimits());
        a.extend(security.iter().cloned());
        a.push(format!(
            "--entrypoint={}",
            d["command"][0].as_str().unwrap_or("")
        ));
        a.push(image.clone());
        a.push(format!("--bpffs-dir={}", pins.0.display()));
        a.extend(extra.iter().cloned());
        a
    };
    let mut run_args = vec![
        "--source=file".to_string(),
        "--state-file=/etc/tapestry/state.yaml".into(),
        "--socket=/run/tapestry/tapestryd.sock".into(),
        "--state-dir=/run/tapestry".into(),
        format!("--metrics-addr=127.0.0.1:{port}"),
        cgroup_arg.clone(),
    ];
    for p in lab.pods() {
        run_args.push(format!("--attach={}", p.host_ifname));
    }
    let name = container_name("daemon");
    run_ok(
        podman()
            .args(["run", "--detach", "--name", &name])
            .args(daemon_args(&run_args)),
    )?;
    let ctr = Container(name);
    let logs = || {
        run(podman().args(["logs", &ctr.0]))
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    };
    let through_vip = || -> Result<std::collections::BTreeMap<String, u32>> {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..20 {
            let name = client
                .tcp_request(
                    std::net::SocketAddrV4::new(vip, 80),
                    b"hi\n",
                    Duration::from_secs(2),
                )
                .context("a request through the VIP")?;
            *seen.entry(name).or_insert(0) += 1;
        }
        Ok(seen)
    };

    poll(Duration::from_secs(30), "the daemon's /healthz", || {
        http_get(port, "/healthz")
    })
    .with_context(logs)?;
    let seen = through_vip().with_context(logs)?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["be0", "be1"], "{seen:?}");
    // The host network (this test, like the daemon's container) reaches the VIP too: the
    // chart's capabilities and cgroup mount are enough for the host services.
    let from_host = tapestry_tests::tcp_request(
        std::net::SocketAddrV4::new(vip, 80),
        b"hi\n",
        Duration::from_secs(2),
    )
    .with_context(logs)?;
    assert!(["be0", "be1"].contains(&from_host.as_str()), "{from_host}");
    for f in ["TAPESTRY_SERVICES", "TAPESTRY_CT"] {
        assert!(
            pins.0.join(f).exists(),
            "{f} not pinned in {}",
            pins.0.display()
        );
    }
    // The CLI of the image, on the daemon's socket.
    let status = run_ok(podman().args([
        "exec",
        &ctr.0,
        "/usr/bin/tapestry",
        "--socket",
        "/run/tapestry/tapestryd.sock",
        "status",
        "-o",
        "json",
    ]))?;
    let status: Value = serde_json::from_str(&status)?;
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );

    // A restart (new process, same pins) takes the datapath over.
    run_ok(podman().args(["restart", "--time", "5", &ctr.0]))?;
    poll(
        Duration::from_secs(30),
        "the restarted daemon's /healthz",
        || Ok(http_get(port, "/healthz")?.filter(|_| logs().contains("re-attached"))),
    )
    .with_context(logs)?;
    let seen = through_vip().with_context(logs)?;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["be0", "be1"], "{seen:?}");

    // The chart's uninstall path (daemon.uninstallOnStop): the pins go, the VIP stops answering.
    run_ok(podman().args(["rm", "--force", "--time", "5", &ctr.0]))?;
    let name = container_name("uninstall");
    run_ok(
        podman()
            .args(["run", "--rm", "--name", &name])
            .args(daemon_args(&["--uninstall".to_string()])),
    )?;
    assert!(
        !pins.0.exists(),
        "{} still exists after --uninstall",
        pins.0.display()
    );
    // Without the datapath the VIP is an address like any other: its packets go out of the
    // host's default route, where whatever the network has may answer, but no backend does.
    // The kernel detaches a link whose last pin went from a work queue, a moment later.
    poll(
        Duration::from_secs(10),
        "no backend behind the VIP with the datapath removed",
        || {
            let reply = client.tcp_request(
                std::net::SocketAddrV4::new(vip, 80),
                b"hi\n",
                Duration::from_millis(500),
            );
            Ok(match reply {
                Ok(r) if ["be0", "be1"].contains(&r.as_str()) => None,
                _ => Some(()),
            })
        },
    )?;
    Ok(())
}
