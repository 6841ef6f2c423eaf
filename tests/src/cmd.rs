//! Running `ip` and reading/writing sysctls. Test-only helpers.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd` with stdin closed and returns its stdout; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` in the calling process's network namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// An `unreachable` route in the host's namespace for as long as it lives: ClusterIPs a test
/// sets, so a packet the datapath did not translate is refused here instead of leaving by the
/// default route.
pub struct UnreachableRoute(String);

impl UnreachableRoute {
    /// `ip route replace unreachable PREFIX` (`10.96.78.0/24`, `10.96.1.5/32`).
    pub fn new(prefix: &str) -> Result<UnreachableRoute> {
        ip(&["route", "replace", "unreachable", prefix])?;
        Ok(UnreachableRoute(prefix.to_owned()))
    }
}

impl Drop for UnreachableRoute {
    fn drop(&mut self) {
        let _ = ip(&["route", "del", "unreachable", &self.0]);
    }
}

/// Runs `ip [-n NETNS] [-force] -batch -` with `script` on stdin (one `ip` command per line).
pub(crate) fn ip_batch(netns: Option<&str>, force: bool, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("spawning ip -batch")?;
    {
        let mut stdin = child.stdin.take().context("ip -batch stdin")?;
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip{} -batch failed ({}): {}\nscript:\n{script}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `/proc/sys` path of a dotted sysctl key (`net.ipv4.ip_forward`). Keys whose components contain
/// dots (interface names like `eth0.100`) must be written with [`sysctl_path_parts`] instead.
pub fn sysctl_path(key: &str) -> PathBuf {
    let mut p = PathBuf::from("/proc/sys");
    p.extend(key.split('.'));
    p
}

/// `/proc/sys` path from explicit components, e.g. `["net", "ipv4", "conf", ifname, "rp_filter"]`.
pub fn sysctl_path_parts(parts: &[&str]) -> PathBuf {
    let mut p = PathBuf::from("/proc/sys");
    p.extend(parts);
    p
}

/// Reads a sysctl of the calling thread's network namespace (`/proc/sys/net` follows the
/// namespace of the thread that opens it).
pub fn read_sysctl(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key))?
        .trim()
        .to_string())
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(sysctl_path(key), value)
}
