//! A real `tapestryd` process for integration tests and the demo: its own bpffs directory,
//! socket and state file, so several can run at once; restart and `kill -9` on demand.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tapestry_api::{client::blocking::Client, types::Status};

/// Where the workspace's binaries are: `$TAPESTRY_BIN_DIR`, else `target/<profile>` of this
/// workspace (the profile this test crate was built with).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TAPESTRY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join(profile)
}

/// Path of a workspace binary, or an error saying how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the workspace binaries first (`cargo build --workspace --bins`, \
             or `make build`), or set TAPESTRY_BIN_DIR",
            p.display()
        );
    }
    Ok(p)
}

pub struct Daemon {
    pub dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub log_file: PathBuf,
    attach: Vec<String>,
    extra_args: Vec<String>,
    /// The network namespace it runs in (a lab node's); `None`: this process's.
    netns: Option<PathBuf>,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    /// Writes `state_yaml`, starts the daemon attached to `attach`, and waits until the state is
    /// programmed.
    pub fn start(name: &str, state_yaml: &str, attach: &[&str]) -> Result<Daemon> {
        Self::start_with(name, state_yaml, attach, &[])
    }

    pub fn start_with(
        name: &str,
        state_yaml: &str,
        attach: &[&str],
        extra_args: &[&str],
    ) -> Result<Daemon> {
        Self::start_in(None, name, state_yaml, attach, extra_args)
    }

    /// [`Daemon::start_with`] inside the network namespace `netns` (a lab node's: the daemon's
    /// netlink, its attachments and its metrics are that namespace's; bpffs stays visible).
    pub fn start_in(
        netns: Option<&Path>,
        name: &str,
        state_yaml: &str,
        attach: &[&str],
        extra_args: &[&str],
    ) -> Result<Daemon> {
        static N: AtomicU32 = AtomicU32::new(0);
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(sweep_stale_pins);
        let id = format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("tapestry-{id}"));
        fs::create_dir_all(&dir)?;
        let mut d = Daemon {
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/tapestry-{id}")),
            socket: dir.join("tapestryd.sock"),
            // The daemon reads the format from the extension.
            state_file: dir.join(if state_yaml.trim_start().starts_with('{') {
                "state.json"
            } else {
                "state.yaml"
            }),
            log_file: dir.join("tapestryd.log"),
            dir,
            attach: attach.iter().map(|s| s.to_string()).collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(Path::to_owned),
            child: None,
            starts: 0,
        };
        d.write_state(state_yaml)?;
        d.spawn()?;
        d.wait_generation(1, Duration::from_secs(20))?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)?;
        let mut cmd = Command::new(binary("tapestryd")?);
        cmd.arg("--state-file")
            .arg(&self.state_file)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--metrics-addr")
            .arg("")
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for a in &self.attach {
            cmd.arg("--attach").arg(a);
        }
        if let Some(netns) = &self.netns {
            tapestry_netns::command_in(&mut cmd, netns)?;
        }
        self.child = Some(cmd.spawn().context("starting tapestryd")?);
        self.starts += 1;
        Ok(())
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    pub fn status(&self) -> Result<Status> {
        Ok(self.client().status()?)
    }

    /// Replaces the state file atomically (write + rename), as an operator's tooling would.
    /// The text must be in the file's format (JSON for a daemon started with JSON).
    pub fn write_state(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join(".state.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, &self.state_file)?;
        Ok(())
    }

    /// Waits until the daemon answers and has programmed at least `generation` states.
    pub fn wait_generation(&mut self, generation: u64, timeout: Duration) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("tapestryd exited ({status}):\n{}", self.log());
            }
            if let Ok(s) = self.status()
                && s.generation >= generation
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "tapestryd did not reach generation {generation} in {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the status satisfies `pred` (e.g. a rejected state file shows its error).
    pub fn wait_status(&self, timeout: Duration, pred: impl Fn(&Status) -> bool) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status()
                && pred(&s)
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "condition not met in {timeout:?}; last status: {:?}",
                    self.status().ok()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            child.wait()?;
        }
        Ok(())
    }

    /// SIGKILL: no chance to clean up anything.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the daemon again (after `stop` or `kill9`) and waits until it answers with the
    /// state programmed.
    pub fn restart(&mut self) -> Result<Status> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()?;
        self.wait_generation(1, Duration::from_secs(20))
    }

    /// The flags the next [`Daemon::restart`] starts it with, besides the lab's own.
    pub fn set_extra_args(&mut self, args: &[&str]) {
        self.extra_args = args.iter().map(|s| s.to_string()).collect();
    }

    /// Adds flags to those the next [`Daemon::restart`] starts it with.
    pub fn add_extra_args(&mut self, args: &[&str]) {
        self.extra_args.extend(args.iter().map(|s| s.to_string()));
    }

    /// Takes a flag out of those the next [`Daemon::restart`] starts it with.
    pub fn remove_extra_arg(&mut self, arg: &str) {
        self.extra_args.retain(|a| a != arg);
    }

    /// Starts the daemon again without waiting for a desired state (its source may be
    /// unreachable): returns once the API answers.
    pub fn restart_unsynced(&mut self) -> Result<Status> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()?;
        self.wait_generation(0, Duration::from_secs(20))
    }

    /// Opens `count / 2` new TCP connections to `vip`:80 through the daemon's own pinned
    /// load-balancing program (its SYNs, run with `BPF_PROG_TEST_RUN`: nothing is sent), from
    /// distinct clients (10.200.0.0 and up, port 10000 and up): the datapath stores their
    /// forward and reply entries, `count` in all, and counts them, as for any new flow. Returns
    /// the entries stored. The entries are a SYN's: they expire after a minute.
    pub fn fill_conntrack(&self, count: u32, vip: std::net::Ipv4Addr) -> Result<u64> {
        self.fill_conntrack_from(0, count, vip)
    }

    /// [`Daemon::fill_conntrack`] with the clients numbered from `first` (up to 3.6 million
    /// connections in all), so a second fill adds new flows instead of repeating the first one's.
    pub fn fill_conntrack_from(
        &self,
        first: u32,
        count: u32,
        vip: std::net::Ipv4Addr,
    ) -> Result<u64> {
        use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
        let pin = self.bpffs_dir.join("prog_from_endpoint");
        let prog = SchedClassifier::from_pin(&pin)
            .with_context(|| format!("opening the pinned program {}", pin.display()))?;
        let mut stored = 0;
        let mut out = vec![0u8; 128];
        for i in first..first + count / 2 {
            let client = [10, 200 + (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let mut syn = Vec::with_capacity(54);
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4(client, vip.octets(), 64)
                .tcp(10_000 + (i % 50_000) as u16, 80, 1, 64240)
                .syn()
                .write(&mut syn, &[])?;
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&syn),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .context("running the load-balancing program")?;
            // Balanced (on along the chain, or passed to the stack): both entries stored.
            if matches!(r.return_value as i32, -1 | 0) {
                stored += 2;
            }
        }
        Ok(stored)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Starts since creation (1 + restarts).
    pub fn starts(&self) -> u32 {
        self.starts
    }
}

/// Removes the bpffs directories of test daemons whose test process is gone
/// (`/sys/fs/bpf/tapestry-<name>-<pid>-<n>`; a run killed before its `Drop`s). Their interface
/// links went with the lab's interfaces, but their host programs stay on the root cgroup as
/// long as the pins do, and would still translate this namespace's sockets to a dead lab's
/// frontends, which a later lab reuses.
fn sweep_stale_pins() {
    let Ok(entries) = fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tapestry-") else {
            continue;
        };
        let mut parts = rest.rsplitn(3, '-');
        let (Some(n), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if n.parse::<u32>().is_err() {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill9();
        // The pins hold the datapath in place; removing them detaches it everywhere.
        let _ = fs::remove_dir_all(&self.bpffs_dir);
        if std::env::var_os("TAPESTRY_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
