//! CNI ADD latency for `tapestry-bench-vm`: a conflist executed the way a runtime executes it,
//! with every plugin exec timed exactly.
//!
//! [`tapestry_tests::cni::Runtime`] is the spec-exact reference (the benchmark drives one pod
//! through it before timing anything, as a check), but its executor polls the plugin every 2 ms,
//! which would add 0-2 ms to every figure. [`Chain`] runs the same list with the same
//! per-plugin configuration (the plugin object with `name` and `cniVersion` injected,
//! `capabilities` removed, `prevResult` = the previous plugin's result on ADD and the final ADD
//! result on DEL, in reverse order) and the same environment ([`Runtime::attachment_env`]), and
//! waits for each plugin on a pidfd: a step's time is spawn to reaped exit, what a runtime pays
//! for it (fork, exec, the plugin's own work and every call it makes, e.g. to tapestryd).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tapestry_tests::cni::{NetworkConfigList, Runtime, RuntimeConf, parse_error_object};

/// One plugin execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// The plugin's `type`.
    pub plugin: String,
    /// Spawn to reaped exit, milliseconds.
    pub ms: f64,
}

/// One ADD or DEL of a whole list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainRun {
    /// Every plugin in execution order.
    pub steps: Vec<Step>,
    /// The whole operation (all steps plus the runtime's own work between them), milliseconds.
    pub total_ms: f64,
}

impl ChainRun {
    /// Time of the step run by `plugin` (the first one, if several).
    pub fn step_ms(&self, plugin: &str) -> Option<f64> {
        self.steps.iter().find(|s| s.plugin == plugin).map(|s| s.ms)
    }
}

/// A network configuration list and the plugin binaries that run it.
pub struct Chain {
    pub list: NetworkConfigList,
    runtime: Runtime,
    plugins: Vec<(String, PathBuf)>,
    timeout: Duration,
}

/// What a plugin printed, how it exited, how long it took.
#[derive(Debug)]
pub struct Exec {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Chain {
    /// `list` (a conflist as JSON) with plugins found in `plugin_dirs`, as `Runtime::new` finds
    /// them; each plugin may run for `timeout`.
    pub fn new(
        list: &Value,
        plugin_dirs: &[PathBuf],
        cache_dir: &Path,
        timeout: Duration,
    ) -> Result<Chain> {
        let list = NetworkConfigList::from_value(list).map_err(anyhow::Error::msg)?;
        let runtime = Runtime::new(plugin_dirs, cache_dir).with_timeout(timeout);
        let mut plugins = Vec::new();
        for p in &list.plugins {
            let ty = p
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let path = runtime.find_plugin(&ty).map_err(anyhow::Error::msg)?;
            plugins.push((ty, path));
        }
        Ok(Chain {
            list,
            runtime,
            plugins,
            timeout,
        })
    }

    /// The spec-exact runtime over the same list (for the reference run).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Plugin types in list order.
    pub fn plugin_types(&self) -> Vec<&str> {
        self.plugins.iter().map(|(t, _)| t.as_str()).collect()
    }

    /// The configuration plugin `i` receives: its object with `name` and `cniVersion` injected,
    /// `capabilities` removed (none of the benchmark's plugins declares one), and `prevResult`.
    fn attachment_conf(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut conf: Map<String, Value> = self.list.plugins[i].clone();
        conf.insert("name".into(), json!(self.list.name));
        conf.insert("cniVersion".into(), json!(self.list.cni_version));
        conf.remove("capabilities");
        conf.remove("runtimeConfig");
        conf.remove("prevResult");
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        Value::Object(conf)
    }

    fn exec(
        &self,
        i: usize,
        command: &str,
        rt: &RuntimeConf,
        prev: Option<&Value>,
    ) -> Result<Exec> {
        let (ty, path) = &self.plugins[i];
        let env = self.runtime.attachment_env(command, rt);
        let stdin = serde_json::to_vec(&self.attachment_conf(i, prev))?;
        let out = exec_timed(path, &env, &stdin, self.timeout)
            .with_context(|| format!("executing {}", path.display()))?;
        if !out.success {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let why = match parse_error_object(&stdout) {
                Some(e) => format!("code {}: {} {}", e.code, e.msg, e.details),
                None => format!("no error object; stdout {:?}", stdout.trim()),
            };
            bail!(
                "plugin {ty} failed ({command}, exit {:?}): {why}; stderr: {}",
                out.code,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// ADD: every plugin in order; returns the final result and the timings.
    pub fn add(&self, rt: &RuntimeConf) -> Result<(Value, ChainRun)> {
        let started = Instant::now();
        let mut prev: Option<Value> = None;
        let mut steps = Vec::new();
        for i in 0..self.plugins.len() {
            let out = self.exec(i, "ADD", rt, prev.as_ref())?;
            let ty = &self.plugins[i].0;
            let result: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("{ty} ADD printed no JSON result"))?;
            tapestry_tests::cni::validate_result(&self.list.cni_version, &result)
                .map_err(|why| anyhow::anyhow!("{ty} ADD result breaks the spec: {why}"))?;
            steps.push(Step {
                plugin: ty.clone(),
                ms: ms(out.elapsed),
            });
            prev = Some(result);
        }
        let total_ms = ms(started.elapsed());
        Ok((
            prev.expect("a list has at least one plugin"),
            ChainRun { steps, total_ms },
        ))
    }

    /// DEL: every plugin in reverse order with the ADD result as `prevResult`.
    pub fn del(&self, rt: &RuntimeConf, added: Option<&Value>) -> Result<ChainRun> {
        let started = Instant::now();
        let mut steps = Vec::new();
        for i in (0..self.plugins.len()).rev() {
            let out = self.exec(i, "DEL", rt, added)?;
            steps.push(Step {
                plugin: self.plugins[i].0.clone(),
                ms: ms(out.elapsed),
            });
        }
        Ok(ChainRun {
            steps,
            total_ms: ms(started.elapsed()),
        })
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `path` with a cleared environment plus `PATH` and `env`, `stdin` on its standard input,
/// and collects its output; killed after `timeout`. The time is spawn to reaped exit: the exit
/// is seen through a pidfd (no polling interval), and the pipes are drained meanwhile so a
/// chatty plugin cannot block.
pub fn exec_timed(
    path: &Path,
    env: &[(String, String)],
    stdin: &[u8],
    timeout: Duration,
) -> Result<Exec> {
    let path_var = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let started = Instant::now();
    let mut child = Command::new(path)
        .env_clear()
        .env("PATH", &path_var)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // SAFETY: plain syscall; the child is ours and not reaped yet, so the pid names it.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if raw < 0 {
        let e = io::Error::last_os_error();
        let _ = child.kill();
        let _ = child.wait();
        return Err(e).context("pidfd_open");
    }
    // SAFETY: pidfd_open returned a new descriptor that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    {
        let mut input = child.stdin.take().context("child stdin")?;
        // A plugin may exit without reading everything: EPIPE is not our concern. The
        // configurations here are a few KiB, below the pipe's capacity.
        let _ = input.write_all(stdin);
    }
    let mut stdout_pipe = child.stdout.take().context("child stdout")?;
    let mut stderr_pipe = child.stderr.take().context("child stderr")?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open, mut exited) = (true, true, false);
    let deadline = started + timeout;
    while out_open || err_open || !exited {
        let mut fds = [
            pollfd(stdout_pipe.as_raw_fd(), out_open),
            pollfd(stderr_pipe.as_raw_fd(), err_open),
            pollfd(pidfd.as_raw_fd(), !exited),
        ];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // SAFETY: signalling our child through its pidfd (never another process).
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            let _ = child.wait();
            bail!("still running after {timeout:?}: killed");
        }
        let ms_left = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms_left) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        let ready = |f: &libc::pollfd| f.fd >= 0 && f.revents != 0;
        if ready(&fds[0]) {
            out_open = drain(&mut stdout_pipe, &mut stdout)?;
        }
        if ready(&fds[1]) {
            err_open = drain(&mut stderr_pipe, &mut stderr)?;
        }
        if ready(&fds[2]) {
            exited = true;
        }
    }
    let status = child.wait()?;
    let elapsed = started.elapsed();
    Ok(Exec {
        success: status.success(),
        code: status.code(),
        stdout,
        stderr,
        elapsed,
    })
}

fn pollfd(fd: RawFd, active: bool) -> libc::pollfd {
    libc::pollfd {
        // A negative fd is ignored by poll.
        fd: if active { fd } else { -1 },
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Reads what is available; `false` at end of file.
fn drain(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<bool> {
    let mut chunk = [0u8; 16384];
    match r.read(&mut chunk) {
        Ok(0) => Ok(false),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e).context("reading a plugin's output"),
    }
}

/// Percentile by nearest rank (`p` in 0..=100) of unsorted values; `None` when empty. p99 of
/// 200 samples is the 198th smallest: the figure 2 of the 200 exceed.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// p50, p99, min, max, mean of a sample, milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub min_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

impl Latency {
    pub fn of(values: &[f64]) -> Latency {
        let n = values.len();
        Latency {
            samples: n,
            p50_ms: percentile(values, 50.0),
            p90_ms: percentile(values, 90.0),
            p99_ms: percentile(values, 99.0),
            min_ms: values.iter().copied().reduce(f64::min),
            max_ms: values.iter().copied().reduce(f64::max),
            mean_ms: (n > 0).then(|| values.iter().sum::<f64>() / n as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(100.0));
        assert_eq!(percentile(&v, 99.0), Some(198.0));
        assert_eq!(percentile(&v, 100.0), Some(200.0));
        assert_eq!(percentile(&[5.0], 99.0), Some(5.0));
        assert_eq!(percentile(&[], 50.0), None);
        let l = Latency::of(&[3.0, 1.0, 2.0]);
        assert_eq!(
            (l.min_ms, l.max_ms, l.mean_ms),
            (Some(1.0), Some(3.0), Some(2.0))
        );
    }

    #[test]
    fn exec_collects_output_and_status() {
        let env = [("X".to_string(), "42".to_string())];
        let out = exec_timed(Path::new("/bin/sh"), &env, b"", Duration::from_secs(10));
        // /bin/sh with no script on stdin exits 0 at once.
        let out = out.unwrap();
        assert!(out.success);
        let out = exec_timed(
            Path::new("/bin/sh"),
            &env,
            b"echo $X; echo err >&2; exit 3\n",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    }

    #[test]
    fn exec_kills_after_timeout() {
        // `exec`: the shell becomes the sleep, so the kill leaves nothing behind.
        let r = exec_timed(
            Path::new("/bin/sh"),
            &[],
            b"exec sleep 30\n",
            Duration::from_millis(200),
        );
        assert!(r.unwrap_err().to_string().contains("killed"));
    }
}
