//! `tapestry-bench-install`: how long a node runs without the tapestry-cni step after the primary
//! plugin rewrites its network config, i.e. `tapestry-install-cni`'s re-insert latency.
//!
//! The installer watches a temporary conf directory holding Calico's conflist; the benchmark
//! rewrites that file `--rewrites` times, alternating an in-place write (open with O_TRUNC,
//! write, close) and a temporary file renamed over it (as calico-node and the Cilium agent do),
//! each with new content. For each rewrite it measures from the moment the write is complete to
//! the moment the file holds the step again over that new content, detected with inotify on the
//! directory (no polling sleeps). Needs no root.
//!
//! Outputs in bench/results/: install-cni.json (every sample), install-cni.md, and
//! `install_cni_reinsert_p50_ms` / `install_cni_reinsert_p99_ms` merged into summary.json.
//! Benchmarks only report: no threshold, no assertion (the issue's target is p99 < 100 ms).

use std::ffi::CString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Map, Value, json};
use tapestry_bench::cni::Latency;
use tapestry_bench::quick;
use tapestry_bench::report::{merge_summary, write_atomic};

#[derive(Parser)]
#[command(
    about = "tapestry-install-cni: time to put the step back after the primary rewrites its config"
)]
struct Args {
    /// Rewrites of the primary's file (half in place, half renamed over it).
    #[arg(long, default_value_t = 200)]
    rewrites: usize,
    /// Where tapestry-install-cni and tapestry-cni are (default: next to this binary, else
    /// $TAPESTRY_BIN_DIR, else the workspace's target directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Longest wait for one re-insert before it counts as missed, milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Where install-cni.json, install-cni.md and summary.json go.
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): 20 rewrites.
const QUICK: &[(&str, &str)] = &[("rewrites", "20"), ("out", quick::QUICK_RESULTS)];

/// calico-node's conflist (0.3.1); `MTU` is replaced so that every rewrite is new content.
const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-1",
      "mtu": MTU,
      "ipam": {"type": "calico-ipam"},
      "policy": {"type": "k8s"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
"#;
const PRIMARY: &str = "10-calico.conflist";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    InPlace,
    Rename,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::InPlace => "in-place write",
            Kind::Rename => "temporary file + rename",
        }
    }
}

/// inotify on one directory: the events that can mean "the file changed".
struct Inotify(OwnedFd);

impl Inotify {
    fn watch(dir: &Path) -> Result<Inotify> {
        // SAFETY: plain syscalls; the fd is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_init1");
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(dir.as_os_str().as_bytes())?;
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_CREATE | libc::IN_DELETE;
        // SAFETY: a valid fd and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_add_watch");
        }
        Ok(Inotify(fd))
    }

    /// Discards every queued event.
    fn drain(&self) {
        let mut buf = [0u8; 8192];
        // SAFETY: reading into a buffer of the given size from a non-blocking fd.
        while unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// Waits up to `timeout` for events (then discards them); `false` on timeout.
    fn wait(&self, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(true);
            }
            return Err(e).context("poll");
        }
        if rc > 0 {
            self.drain();
        }
        Ok(rc > 0)
    }
}

/// Whether the primary holds the step once, last, over the content with `mtu`.
fn chained(path: &Path, mtu: usize) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    let Some(plugins) = v["plugins"].as_array() else {
        return false;
    };
    plugins.len() == 4
        && plugins[0]["mtu"] == mtu
        && plugins[3]["type"] == "tapestry-cni"
        && plugins
            .iter()
            .filter(|p| p["type"] == "tapestry-cni")
            .count()
            == 1
}

fn write_primary(dir: &Path, mtu: usize, kind: Kind) -> Result<()> {
    let text = CALICO.replace("MTU", &mtu.to_string());
    let path = dir.join(PRIMARY);
    match kind {
        Kind::InPlace => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)?;
            f.write_all(text.as_bytes())?;
        }
        Kind::Rename => {
            let tmp = dir.join(".calico.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    Ok(())
}

fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let has_both =
        |d: &Path| d.join("tapestry-install-cni").is_file() && d.join("tapestry-cni").is_file();
    let mut tried = Vec::new();
    if let Some(d) = explicit {
        tried.push(d.to_path_buf());
    } else {
        if let Some(d) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            tried.push(d);
        }
        tried.push(tapestry_tests::daemon::bin_dir());
    }
    tried
        .iter()
        .find(|d| has_both(d))
        .cloned()
        .with_context(|| {
            format!(
                "tapestry-install-cni and tapestry-cni not found in {tried:?}: \
             `cargo build --release -p tapestry-cni-plugin`, or pass --bin-dir"
            )
        })
}

struct Installer {
    child: Child,
    log: PathBuf,
}

impl Installer {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) -> Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("tapestry-install-cni exited with {status}:\n{}", self.log());
        }
        Ok(())
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    if let Err(e) = run(quick::parse(QUICK)) {
        eprintln!("tapestry-bench-install: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let bin_dir = find_bin_dir(args.bin_dir.as_deref())?;
    let root = std::env::temp_dir().join(format!("tapestry-bench-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (conf, bin) = (root.join("net.d"), root.join("bin"));
    std::fs::create_dir_all(&conf)?;
    std::fs::create_dir_all(&bin)?;
    let result = measure(&args, &bin_dir, &root, &conf, &bin);
    let _ = std::fs::remove_dir_all(&root);
    let (samples, misses) = result?;

    let all: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
    let of = |k: Kind| -> Vec<f64> {
        samples
            .iter()
            .filter(|(kind, _)| *kind == k)
            .map(|(_, ms)| *ms)
            .collect()
    };
    let overall = Latency::of(&all);
    let in_place = Latency::of(&of(Kind::InPlace));
    let rename = Latency::of(&of(Kind::Rename));
    let round = |v: Option<f64>| v.map(|x| (x * 1000.0).round() / 1000.0);

    std::fs::create_dir_all(&args.out)?;
    let report = json!({
        "rewrites": args.rewrites,
        "missed": misses,
        "timeoutMs": args.timeout_ms,
        "tempDir": std::env::temp_dir(),
        "overall": overall,
        "inPlace": in_place,
        "rename": rename,
        "samplesMs": samples.iter().map(|(k, ms)| json!({"kind": format!("{k:?}"), "ms": ms})).collect::<Vec<_>>(),
    });
    write_atomic(
        &args.out.join("install-cni.json"),
        &(serde_json::to_string_pretty(&report)? + "\n"),
    )?;

    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
    let mut md = String::new();
    writeln!(
        md,
        "# tapestry-install-cni: re-insert latency\n\n\
         Time from the end of a rewrite of the primary's conflist (Calico's, new content each \
         time) to the moment the file holds the `tapestry-cni` step again, seen through inotify. \
         {} rewrites, alternating the two ways primaries write; {} missed (no re-insert within \
         {} ms). Target: p99 under 100 ms.\n\n\
         | rewrite | samples | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|",
        args.rewrites, misses, args.timeout_ms
    )?;
    for (label, l) in [
        (Kind::InPlace.label(), &in_place),
        (Kind::Rename.label(), &rename),
        ("all", &overall),
    ] {
        writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} |",
            l.samples,
            fmt(l.p50_ms),
            fmt(l.p90_ms),
            fmt(l.p99_ms),
            fmt(l.max_ms)
        )?;
    }
    write_atomic(&args.out.join("install-cni.md"), &md)?;

    let mut m = Map::new();
    m.insert(
        "install_cni_reinsert_p50_ms".into(),
        json!(round(overall.p50_ms)),
    );
    m.insert(
        "install_cni_reinsert_p99_ms".into(),
        json!(round(overall.p99_ms)),
    );
    merge_summary(&args.out.join("summary.json"), &m)?;
    println!(
        "install-cni re-insert: p50 {} ms, p99 {} ms, max {} ms over {} rewrites ({misses} missed)",
        fmt(overall.p50_ms),
        fmt(overall.p99_ms),
        fmt(overall.max_ms),
        overall.samples
    );
    Ok(())
}

/// `(kind, milliseconds)` per re-insert seen, and the number missed.
fn measure(
    args: &Args,
    bin_dir: &Path,
    root: &Path,
    conf: &Path,
    bin: &Path,
) -> Result<(Vec<(Kind, f64)>, usize)> {
    std::fs::write(conf.join(PRIMARY), CALICO.replace("MTU", "0"))?;
    let log = root.join("installer.log");
    let child = Command::new(bin_dir.join("tapestry-install-cni"))
        .arg("--cni-conf-dir")
        .arg(conf)
        .arg("--cni-bin-dir")
        .arg(bin)
        .arg("--plugin-binary")
        .arg(bin_dir.join("tapestry-cni"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting tapestry-install-cni")?;
    let installer = Installer { child, log };
    let inotify = Inotify::watch(conf)?;
    let path = conf.join(PRIMARY);
    let timeout = Duration::from_millis(args.timeout_ms);

    let wait_chained = |mtu: usize, start: Instant| -> Result<Option<Duration>> {
        loop {
            if chained(&path, mtu) {
                return Ok(Some(start.elapsed()));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            inotify.wait(left)?;
        }
    };
    if wait_chained(0, Instant::now())?.is_none() {
        bail!(
            "the installer did not chain the first config within {timeout:?}:\n{}",
            installer.log()
        );
    }

    let mut samples = Vec::with_capacity(args.rewrites);
    let mut misses = 0;
    for i in 0..args.rewrites {
        let kind = if i % 2 == 0 {
            Kind::InPlace
        } else {
            Kind::Rename
        };
        let mtu = i + 1;
        inotify.drain();
        write_primary(conf, mtu, kind)?;
        let written = Instant::now();
        match wait_chained(mtu, written)? {
            Some(d) => samples.push((kind, d.as_secs_f64() * 1000.0)),
            None => misses += 1,
        }
    }
    installer.stop()?;
    Ok((samples, misses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let a: Args = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!(
            (a.rewrites, a.out),
            (20, PathBuf::from(quick::QUICK_RESULTS))
        );
        let a: Args = quick::parse_from(["b"], QUICK);
        assert_eq!((a.rewrites, a.out), (200, PathBuf::from(quick::RESULTS)));
    }
}
