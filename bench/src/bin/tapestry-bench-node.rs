//! The cost of Tapestry's CNI chain on a real node: pod sandbox-to-started time with the chain
//! (bridge + host-local + tapestry-cni, installed by the Helm chart) against the primary alone,
//! on the real node of tests/src/node.rs (kubelet + containerd, no registry).
//!
//! Definition (bench/NODE.md): for each pod, from containerd's `RunPodSandbox` request for it
//! (the sandbox: netns, CNI ADD of the whole chain, the pause container) to `StartContainer ...
//! returns successfully` for its container, both from containerd's own log (nanosecond
//! timestamps). The kubelet's status report afterwards (PLEG relists every second) is the same for
//! both cases and would only add one-second noise: it is left out. 50 pods per case, created in
//! waves of 10 (each wave waits until its pods run); p99 by nearest rank (of 50: the slowest).
//!
//! Writes `node.json`, `node.md` and merges `node_pod_start_*` keys into `summary.json`
//! (`node_pod_start_ratio_primary` = p99 with the chain / p99 of the primary alone). Benchmarks
//! only report: no threshold, no assertion.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tapestry_bench::cni::Latency;
use tapestry_bench::quick;
use tapestry_bench::report::{merge_summary, write_atomic};
use tapestry_tests::node::{self, Node};

const WAVE_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Parser)]
#[command(
    about = "Pod sandbox-to-started time on a real node: Tapestry's chain vs the primary alone"
)]
struct Args {
    /// Pods per case.
    #[arg(long, default_value_t = 50)]
    pods: usize,
    /// Pods created together (each wave waits for the previous one to run).
    #[arg(long, default_value_t = 10)]
    wave: usize,
    /// Measure the primary alone and stop (no Tapestry images needed; writes node.json and
    /// node.md only, no ratio).
    #[arg(long)]
    primary_only: bool,
    /// Where node.json, node.md and summary.json go.
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): 10 pods per case, in waves of 5.
const QUICK: &[(&str, &str)] = &[("pods", "10"), ("wave", "5"), ("out", quick::QUICK_RESULTS)];

fn main() {
    if let Err(e) = run(quick::parse(QUICK)) {
        eprintln!("tapestry-bench-node: {e:#}");
        std::process::exit(1);
    }
}

/// One pod's timing, from containerd's log.
#[derive(Debug, Clone, Serialize)]
struct PodTiming {
    pod: String,
    /// RunPodSandbox request to its return (CNI ADD is inside).
    sandbox_ms: f64,
    /// RunPodSandbox request to StartContainer returning: the figure compared.
    start_ms: f64,
}

#[derive(Debug, Serialize)]
struct Case {
    name: &'static str,
    description: &'static str,
    start: Latency,
    sandbox: Latency,
    pods: Vec<PodTiming>,
    wall_seconds: f64,
}

fn run(args: Args) -> Result<()> {
    if args.pods == 0 || args.wave == 0 {
        bail!("--pods and --wave must be at least 1");
    }
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root: it runs a kubelet and containerd (try `sudo make bench`)");
    }
    if args.primary_only {
        node::require_node().map_err(|e| anyhow::anyhow!(e))?;
    } else {
        node::require_tapestry().map_err(|e| anyhow::anyhow!("{e} (run `make images` first)"))?;
    }
    let _lock =
        tapestry_bench::lock_single_run("tapestry-bench-node", Duration::from_secs(600), &|| {
            false
        })?;
    std::fs::create_dir_all(&args.out)?;

    eprintln!("tapestry-bench-node: starting the node");
    let mut node = Node::start()?;
    let primary = measure(&node, "primary", &args)?;
    eprintln!(
        "primary alone: p50 {:.1} ms, p99 {:.1} ms",
        primary.start.p50_ms.unwrap_or(f64::NAN),
        primary.start.p99_ms.unwrap_or(f64::NAN)
    );

    if args.primary_only {
        node.stop()?;
        return report(&args, &[primary]);
    }
    node.import_tapestry_images()?;
    node.install_tapestry(&[])?;
    let chain = measure(&node, "chain", &args)?;
    eprintln!(
        "with the chain: p50 {:.1} ms, p99 {:.1} ms",
        chain.start.p50_ms.unwrap_or(f64::NAN),
        chain.start.p99_ms.unwrap_or(f64::NAN)
    );
    node.uninstall_tapestry()?;
    node.stop()?;

    report(&args, &[primary, chain])
}

/// Creates `args.pods` pods in waves, waits for each wave to run, deletes them, and reads their
/// timings from containerd's log.
fn measure(node: &Node, name: &'static str, args: &Args) -> Result<Case> {
    let t = Instant::now();
    let mut names = Vec::new();
    let mut wave = 0;
    while names.len() < args.pods {
        let label = format!("{name}-{wave}");
        let n = args.wave.min(args.pods - names.len());
        let pods: Vec<Value> = (0..n)
            .map(|i| {
                let pod = format!("bench-{name}-{:03}", names.len() + i);
                serde_json::from_str(&node.sleep_pod(&pod, &[("bench-wave", &label)]))
            })
            .collect::<Result<_, _>>()?;
        names.extend(pods.iter().map(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }));
        node.apply(&json!({"apiVersion": "v1", "kind": "List", "items": pods}).to_string())?;
        wait_wave(node, &label, n)?;
        wave += 1;
    }
    let wall_seconds = t.elapsed().as_secs_f64();
    node.kubectl_ok([
        "delete",
        "pods",
        "-l",
        "bench-wave",
        "--grace-period=1",
        "--timeout=120s",
    ])?;
    // containerd writes its log line before it answers; the file is complete.
    let log = node.log("containerd");
    let timings = timings_from_log(&log, &names)?;
    let start: Vec<f64> = timings.iter().map(|t| t.start_ms).collect();
    let sandbox: Vec<f64> = timings.iter().map(|t| t.sandbox_ms).collect();
    Ok(Case {
        name,
        description: match name {
            "primary" => "bridge + host-local alone",
            _ => "bridge + host-local + tapestry-cni (helm install tapestry)",
        },
        start: Latency::of(&start),
        sandbox: Latency::of(&sandbox),
        pods: timings,
        wall_seconds,
    })
}

fn wait_wave(node: &Node, label: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + WAVE_TIMEOUT;
    loop {
        let out = node.kubectl_ok([
            "get",
            "pods",
            "-l",
            &format!("bench-wave={label}"),
            "-o",
            "json",
        ])?;
        let v: Value = serde_json::from_str(&out)?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let running = items
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count();
        if items.len() == n && running == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "wave {label}: {running} of {n} pods Running after {WAVE_TIMEOUT:?}\nkubelet:\n{}",
                node::log_errors(&node.log("kubelet"))
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The quoted value after `key` in a log message: `key \"value\"` (logrus escapes quotes).
fn quoted_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.trim_start().strip_prefix("\\\"")?;
    Some(&rest[..rest.find("\\\"")?])
}

/// `time="..."` of a containerd (logrus) line, as nanoseconds since the epoch.
fn line_time(line: &str) -> Option<i128> {
    let rest = &line[line.find("time=\"")? + 6..];
    parse_rfc3339_ns(&rest[..rest.find('"')?])
}

/// RFC 3339 with optional fraction and `Z` or `±hh:mm`, to nanoseconds since the epoch.
fn parse_rfc3339_ns(s: &str) -> Option<i128> {
    Some(s.parse::<jiff::Timestamp>().ok()?.as_nanosecond())
}

/// Per pod: RunPodSandbox request -> returns (sandbox id) -> CreateContainer in that sandbox
/// returns (container id) -> StartContainer for it returns successfully.
fn timings_from_log(log: &str, pods: &[String]) -> Result<Vec<PodTiming>> {
    let mut sandbox_start: BTreeMap<&str, i128> = BTreeMap::new();
    let mut sandbox_of: BTreeMap<&str, (String, i128)> = BTreeMap::new();
    let mut container_of_sandbox: BTreeMap<String, String> = BTreeMap::new();
    let mut started: BTreeMap<String, i128> = BTreeMap::new();
    for line in log.lines() {
        let Some(t) = line_time(line) else { continue };
        if line.contains("msg=\"RunPodSandbox for &PodSandboxMetadata{Name:") {
            let rest = &line[line.find("{Name:").unwrap_or(0) + 6..];
            let name = &rest[..rest.find(',').unwrap_or(rest.len())];
            let Some(pod) = pods.iter().find(|p| p.as_str() == name) else {
                continue;
            };
            if line.contains("returns sandbox id") {
                if let Some(id) = quoted_after(line, "returns sandbox id") {
                    sandbox_of.insert(pod.as_str(), (id.to_string(), t));
                }
            } else {
                sandbox_start.entry(pod.as_str()).or_insert(t);
            }
        } else if line.contains("msg=\"CreateContainer within sandbox")
            && line.contains("returns container id")
        {
            if let (Some(sid), Some(cid)) = (
                quoted_after(line, "CreateContainer within sandbox"),
                quoted_after(line, "returns container id"),
            ) {
                container_of_sandbox.insert(sid.to_string(), cid.to_string());
            }
        } else if line.contains("msg=\"StartContainer for")
            && line.contains("returns successfully")
            && let Some(cid) = quoted_after(line, "StartContainer for")
        {
            started.entry(cid.to_string()).or_insert(t);
        }
    }
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for pod in pods {
        let p = pod.as_str();
        let timing = (|| {
            let t0 = *sandbox_start.get(p)?;
            let (sid, t1) = sandbox_of.get(p)?;
            let cid = container_of_sandbox.get(sid)?;
            let t2 = *started.get(cid)?;
            Some(PodTiming {
                pod: pod.clone(),
                sandbox_ms: (t1 - t0) as f64 / 1e6,
                start_ms: (t2 - t0) as f64 / 1e6,
            })
        })();
        match timing {
            Some(t) => out.push(t),
            None => missing.push(p),
        }
    }
    if !missing.is_empty() {
        bail!(
            "containerd's log has no complete sandbox-to-started record for {} pod(s): {}",
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(out)
}

fn report(args: &Args, cases: &[Case]) -> Result<()> {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 10_000.0).round() / 10_000.0),
        _ => None,
    };
    let (r99, r50) = match cases {
        [primary, chain] => (
            ratio(chain.start.p99_ms, primary.start.p99_ms),
            ratio(chain.start.p50_ms, primary.start.p50_ms),
        ),
        _ => (None, None),
    };
    let json = json!({
        "definition": "per pod: containerd RunPodSandbox request -> StartContainer returns (containerd log, ns timestamps)",
        "pods_per_case": args.pods,
        "wave": args.wave,
        "cases": cases,
        "p99_ratio_chain_over_primary": r99,
        "p50_ratio_chain_over_primary": r50,
    });
    write_atomic(
        &args.out.join("node.json"),
        &(serde_json::to_string_pretty(&json)? + "\n"),
    )?;

    let f = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let mut md = String::new();
    writeln!(
        md,
        "# Pod start on a real node: Tapestry's chain vs the primary alone\n\n\
         {} pods per case in waves of {}; per pod, containerd's `RunPodSandbox` request to its \
         `StartContainer` returning (containerd's log). p99 by nearest rank (of fewer than 100: \
         the slowest pod). See bench/NODE.md.\n",
        args.pods, args.wave
    )?;
    writeln!(
        md,
        "| case | start p50 ms | start p90 ms | start p99 ms | sandbox p50 ms | sandbox p99 ms |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for c in cases {
        writeln!(
            md,
            "| {} ({}) | {} | {} | {} | {} | {} |",
            c.name,
            c.description,
            f(c.start.p50_ms),
            f(c.start.p90_ms),
            f(c.start.p99_ms),
            f(c.sandbox.p50_ms),
            f(c.sandbox.p99_ms)
        )?;
    }
    writeln!(
        md,
        "\np99 ratio chain / primary: **{}** (target under 1.1); p50 ratio: {}",
        r99.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into()),
        r50.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into())
    )?;
    write_atomic(&args.out.join("node.md"), &md)?;
    print!("{md}");
    if r99.is_none() {
        return Ok(()); // one case: nothing to compare, summary.json untouched
    }

    let mut summary = Map::new();
    summary.insert("node_pod_start_ratio_primary".into(), json!(r99));
    summary.insert("node_pod_start_p50_ratio_primary".into(), json!(r50));
    for c in cases {
        summary.insert(
            format!("node_pod_start_p50_ms_{}", c.name),
            json!(c.start.p50_ms),
        );
        summary.insert(
            format!("node_pod_start_p99_ms_{}", c.name),
            json!(c.start.p99_ms),
        );
        summary.insert(
            format!("node_sandbox_p99_ms_{}", c.name),
            json!(c.sandbox.p99_ms),
        );
    }
    summary.insert("node_pods_per_case".into(), json!(args.pods));
    merge_summary(&args.out.join("summary.json"), &summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let a: Args = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!((a.pods, a.wave), (10, 5));
        assert_eq!(a.out, PathBuf::from(quick::QUICK_RESULTS));
        let a: Args = quick::parse_from(["b"], QUICK);
        assert_eq!((a.pods, a.out), (50, PathBuf::from(quick::RESULTS)));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(
            parse_rfc3339_ns("1970-01-01T00:00:01Z"),
            Some(1_000_000_000)
        );
        assert_eq!(
            parse_rfc3339_ns("2000-03-01T00:00:00.5+01:00"),
            Some((951_868_800 - 3600) as i128 * 1_000_000_000 + 500_000_000)
        );
    }

    #[test]
    fn parses_a_pod_from_containerd_lines() {
        let log = r#"time="2025-11-25T22:23:32.100000000Z" level=info msg="RunPodSandbox for &PodSandboxMetadata{Name:p-1,Uid:u,Namespace:default,Attempt:0,}"
time="2025-11-25T22:23:32.300000000Z" level=info msg="RunPodSandbox for &PodSandboxMetadata{Name:p-1,Uid:u,Namespace:default,Attempt:0,} returns sandbox id \"s1\""
time="2025-11-25T22:23:32.350000000Z" level=info msg="CreateContainer within sandbox \"s1\" for &ContainerMetadata{Name:main,Attempt:0,} returns container id \"c1\""
time="2025-11-25T22:23:32.400000000Z" level=info msg="StartContainer for \"c1\""
time="2025-11-25T22:23:32.500000000Z" level=info msg="StartContainer for \"c1\" returns successfully""#;
        let t = timings_from_log(log, &["p-1".to_string()]).unwrap();
        assert_eq!(t.len(), 1);
        assert!((t[0].sandbox_ms - 200.0).abs() < 1e-6);
        assert!((t[0].start_ms - 400.0).abs() < 1e-6);
        assert!(timings_from_log(log, &["p-2".to_string()]).is_err());
    }
}
