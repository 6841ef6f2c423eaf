//! Upstream Kubernetes conformance for the kube-proxy replacement: the sig-network Service specs
//! of k8s.io/kubernetes `test/e2e`, run by ginkgo against the real node ([`crate::node`]) with
//! Tapestry installed by its chart and a cluster DNS, as Cilium runs them in its CI.
//!
//! - [`E2e::build`] runs `scripts/build-e2e.sh` (cached: instant when nothing changed): a slim
//!   `e2e.test` (only `test/e2e/network`), the ginkgo CLI, and the images the specs use (agnhost,
//!   busybox, pause under their upstream names, so nothing is pulled) plus CoreDNS.
//! - [`prepare`] imports those images into a started [`Node`], installs Tapestry and deploys the
//!   cluster DNS.
//! - [`run`] runs ginkgo over a focus and writes its JSON report; [`Report`] reads it: every
//!   spec the focus selected, passed, failed (with the failure's message) or skipped by the spec
//!   itself (one node cannot host the specs that need two).
//!
//! The focus and skips live here alone ([`SERVICES_FOCUS`], [`CONFORMANCE_FOCUS`], [`SKIP`]):
//! `make conformance` (src/bin/conformance.rs) runs every Service spec, `make test`
//! (tests/conformance.rs) the `[Conformance]` ones.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::cmd::run as run_cmd;
use crate::k8s;
use crate::node::Node;

/// Every sig-network Service spec.
pub const SERVICES_FOCUS: &str = r"\[sig-network\] Services";
/// The Service specs of the conformance profile (what `make test` runs).
pub const CONFORMANCE_FOCUS: &str = r"\[sig-network\] Services.*\[Conformance\]";
/// What a one-node cluster without a cloud cannot run or is not judged on: LoadBalancer (no
/// cloud provider), ESIPP (externalTrafficPolicy: Local through a load balancer), feature-gated
/// and alpha/beta specs, IPv6 and dual-stack (the datapath is IPv4), and the disruptive and
/// serial specs (they restart or reconfigure the node).
pub const SKIP: &str =
    r"LoadBalancer|ESIPP|Feature:|IPv6|DualStack|\[Disruptive\]|\[Serial\]|\[Alpha\]|\[Beta\]";

/// What `scripts/build-e2e.sh` built.
#[derive(Debug, Clone)]
pub struct E2e {
    /// `<dir>/bin/e2e.test`.
    pub e2e_test: PathBuf,
    /// `<dir>/bin/ginkgo`.
    pub ginkgo: PathBuf,
    /// `(image reference, OCI archive)` of every image the specs use, and CoreDNS.
    pub images: Vec<(String, PathBuf)>,
}

impl E2e {
    /// Runs `scripts/build-e2e.sh` (a no-op when its cache is current) and reads what it built.
    pub fn build() -> Result<E2e> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-e2e.sh");
        let out = run_cmd(Command::new("bash").arg(&script)).with_context(|| {
            format!(
                "building the e2e binaries and images ({})",
                script.display()
            )
        })?;
        let dir = PathBuf::from(out.trim());
        let e2e = E2e::read(&dir)?;
        Ok(e2e)
    }

    /// Reads the output of `scripts/build-e2e.sh` in `dir`.
    pub fn read(dir: &Path) -> Result<E2e> {
        let list = dir.join("images.txt");
        let text =
            fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
        let images: Vec<(String, PathBuf)> = text
            .lines()
            .filter_map(|l| {
                let (name, path) = l.trim().split_once(' ')?;
                Some((name.to_string(), PathBuf::from(path.trim())))
            })
            .collect();
        let e2e = E2e {
            e2e_test: dir.join("bin/e2e.test"),
            ginkgo: dir.join("bin/ginkgo"),
            images,
        };
        for p in [&e2e.e2e_test, &e2e.ginkgo]
            .into_iter()
            .chain(e2e.images.iter().map(|(_, p)| p))
        {
            if !p.is_file() {
                bail!("{} is missing (run scripts/build-e2e.sh)", p.display());
            }
        }
        e2e.coredns()?;
        Ok(e2e)
    }

    /// The CoreDNS image's reference.
    pub fn coredns(&self) -> Result<&str> {
        self.images
            .iter()
            .map(|(n, _)| n.as_str())
            .find(|n| n.contains("/coredns:"))
            .ok_or_else(|| anyhow!("scripts/build-e2e.sh listed no coredns image"))
    }
}

/// Makes a started node ready for the specs: imports Tapestry's images and the e2e images,
/// installs Tapestry with its chart (`extra` values on top of the node's), then deploys the
/// cluster DNS, which answers through Tapestry's ClusterIP.
pub fn prepare(node: &Node, e2e: &E2e, extra: &[(&str, String)]) -> Result<()> {
    node.import_tapestry_images()?;
    for (_, archive) in &e2e.images {
        node.import_image(archive)?;
    }
    node.install_tapestry(extra)?;
    node.deploy_cluster_dns(e2e.coredns()?, Duration::from_secs(120))
}

/// One ginkgo run.
#[derive(Debug, Clone)]
pub struct RunOptions<'a> {
    /// `--focus`.
    pub focus: &'a str,
    /// `--skip`.
    pub skip: &'a str,
    /// Parallel test processes.
    pub procs: u32,
    /// The suite's `--timeout`.
    pub timeout: Duration,
    /// Where the JSON report and ginkgo's output go.
    pub out_dir: &'a Path,
}

/// Runs the specs of `opts.focus` against `node` (its admin kubeconfig, kubectl on PATH,
/// `--provider=skeleton`) and reads the report. ginkgo's output goes to `<out_dir>/ginkgo.log`;
/// a run whose specs fail is still `Ok` (the report says which); an `Err` is a run that produced
/// no report.
pub fn run(node: &Node, e2e: &E2e, opts: &RunOptions) -> Result<Report> {
    fs::create_dir_all(opts.out_dir)?;
    let report = opts.out_dir.join("report.json");
    let _ = fs::remove_file(&report);
    let log_path = opts.out_dir.join("ginkgo.log");
    let log = fs::File::create(&log_path)?;
    let path = format!(
        "{}:{}",
        k8s::bin_dir()?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let t = Instant::now();
    let status = Command::new(&e2e.ginkgo)
        .arg(format!("--procs={}", opts.procs))
        .arg("--no-color")
        .arg("--succinct")
        .arg(format!("--timeout={}s", opts.timeout.as_secs()))
        .arg(format!("--focus={}", opts.focus))
        .arg(format!("--skip={}", opts.skip))
        // Relative: ginkgo puts it under --output-dir.
        .arg("--json-report=report.json")
        .arg(format!("--output-dir={}", opts.out_dir.display()))
        .arg(&e2e.e2e_test)
        .arg("--")
        .arg(format!("--kubeconfig={}", node.kubeconfig().display()))
        .arg("--provider=skeleton")
        .arg(format!("--e2e-output-dir={}", opts.out_dir.display()))
        .env("PATH", path)
        .env("KUBECONFIG", node.kubeconfig())
        .current_dir(opts.out_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running ginkgo")?;
    let elapsed = t.elapsed();
    let mut r = Report::read(&report).with_context(|| {
        format!(
            "ginkgo exited with {status} and wrote no report; its output is in {}",
            log_path.display()
        )
    })?;
    r.seconds = elapsed.as_secs_f64();
    r.focus = opts.focus.to_string();
    r.skip = opts.skip.to_string();
    Ok(r)
}

/// A spec's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    /// Skipped by the spec itself at run time (e2eskipper: e.g. "needs at least 2 nodes").
    Skipped,
}

/// One spec the focus selected.
#[derive(Debug, Clone, Serialize)]
pub struct Spec {
    pub name: String,
    pub outcome: Outcome,
    /// ginkgo's own state (`passed`, `failed`, `timedout`, `panicked`, `skipped`, ...).
    pub state: String,
    pub seconds: f64,
    /// The failure's (or the skip's) message and where it was raised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Spec {
    /// The first line of the reason, or "".
    pub fn first_reason_line(&self) -> &str {
        self.reason
            .as_deref()
            .and_then(|r| r.lines().next())
            .unwrap_or("")
    }
}

/// What `bench/results/conformance.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kubernetes_version: String,
    pub focus: String,
    pub skip: String,
    pub run: usize,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub seconds: f64,
    pub specs: Vec<Spec>,
}

// ginkgo v2's JSON report (types.Report), only the fields read here.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GinkgoSuite {
    #[serde(default)]
    spec_reports: Option<Vec<GinkgoSpec>>,
    /// Nanoseconds.
    #[serde(default)]
    run_time: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GinkgoSpec {
    // Go writes a nil slice as null (suite-level nodes have no containers).
    #[serde(default)]
    container_hierarchy_texts: Option<Vec<String>>,
    #[serde(default)]
    leaf_node_text: Option<String>,
    #[serde(default)]
    leaf_node_type: String,
    state: String,
    /// Nanoseconds (Go's time.Duration).
    #[serde(default)]
    run_time: i64,
    #[serde(default)]
    failure: Option<GinkgoFailure>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GinkgoFailure {
    #[serde(default)]
    message: String,
    #[serde(default)]
    location: Option<GinkgoLocation>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GinkgoLocation {
    #[serde(default)]
    file_name: String,
    #[serde(default)]
    line_number: u64,
}

impl Report {
    /// Reads ginkgo's JSON report. Specs the focus or skip filtered out are left out; a spec
    /// that skipped itself counts as skipped; every other state but `passed` is a failure.
    /// Suite-level nodes (BeforeSuite and the like) count only when they fail.
    pub fn read(path: &Path) -> Result<Report> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Report::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// See [`Report::read`].
    pub fn parse(json: &str) -> Result<Report> {
        let suites: Vec<GinkgoSuite> = serde_json::from_str(json)?;
        let seconds = suites.iter().map(|s| s.run_time).max().unwrap_or(0) as f64 / 1e9;
        let mut specs = Vec::new();
        for s in suites
            .into_iter()
            .flat_map(|s| s.spec_reports.unwrap_or_default())
        {
            let reason = s.failure.as_ref().map(|f| {
                let mut m = f.message.trim().to_string();
                if let Some(l) = f.location.as_ref().filter(|l| !l.file_name.is_empty()) {
                    let file = l
                        .file_name
                        .rsplit("/k8s.io/")
                        .next()
                        .unwrap_or(&l.file_name);
                    m.push_str(&format!(" ({file}:{})", l.line_number));
                }
                m
            });
            let outcome = match s.state.as_str() {
                "passed" => Outcome::Passed,
                // Filtered out by --focus/--skip: no failure record at all.
                "skipped" | "pending" if reason.is_none() => continue,
                "skipped" | "pending" => Outcome::Skipped,
                _ => Outcome::Failed,
            };
            if s.leaf_node_type != "It" && outcome != Outcome::Failed {
                continue;
            }
            let mut name = s.container_hierarchy_texts.unwrap_or_default().join(" ");
            if let Some(leaf) = s.leaf_node_text.filter(|t| !t.is_empty()) {
                if !name.is_empty() {
                    name.push(' ');
                }
                name.push_str(&leaf);
            }
            if name.is_empty() {
                name = s.leaf_node_type.clone();
            }
            specs.push(Spec {
                name,
                outcome,
                state: s.state,
                seconds: s.run_time as f64 / 1e9,
                reason: reason.filter(|r| !r.is_empty()),
            });
        }
        specs.sort_by(|a, b| (a.outcome, &a.name).cmp(&(b.outcome, &b.name)));
        let count = |o: Outcome| specs.iter().filter(|s| s.outcome == o).count();
        Ok(Report {
            kubernetes_version: k8s::kubernetes_version().unwrap_or_default(),
            focus: String::new(),
            skip: String::new(),
            run: count(Outcome::Passed) + count(Outcome::Failed),
            passed: count(Outcome::Passed),
            failed: count(Outcome::Failed),
            skipped: count(Outcome::Skipped),
            seconds,
            specs,
        })
    }

    /// The failed specs, one per line with the first line of their reason.
    pub fn failures(&self) -> String {
        self.specs
            .iter()
            .filter(|s| s.outcome == Outcome::Failed)
            .map(|s| format!("- {} [{}]: {}", s.name, s.state, s.first_reason_line()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A markdown table: the counts, then one row per spec.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# Upstream Service conformance on the real node\n\n\
             Kubernetes {} `e2e.test`, `--focus='{}'`, `--skip='{}'`, one node (kubelet + \
             containerd), Tapestry as the only service proxy. Written by `make conformance`.\n\n\
             | run | passed | failed | skipped by the spec | minutes |\n\
             |---:|---:|---:|---:|---:|\n\
             | {} | {} | {} | {} | {:.1} |\n\n\
             | spec | result | seconds | reason |\n|---|---|---:|---|\n",
            self.kubernetes_version,
            self.focus,
            self.skip,
            self.run,
            self.passed,
            self.failed,
            self.skipped,
            self.seconds / 60.0
        );
        for s in &self.specs {
            let why = s.first_reason_line().replace('|', "\\|");
            out.push_str(&format!(
                "| {} | {} | {:.1} | {why} |\n",
                s.name.replace('|', "\\|"),
                s.state,
                s.seconds
            ));
        }
        out
    }

    /// Writes `<dir>/conformance.json` and `<dir>/conformance.md`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(
            dir.join("conformance.json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        fs::write(dir.join("conformance.md"), self.markdown())?;
        Ok(())
    }

    /// Specs by outcome, for a short summary line.
    pub fn counts(&self) -> BTreeMap<Outcome, usize> {
        let mut m = BTreeMap::new();
        for s in &self.specs {
            *m.entry(s.outcome).or_default() += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_what_ran_and_leaves_out_what_the_filters_skipped() {
        let json = r#"[{"SuiteSucceeded": false, "SpecReports": [
            {"ContainerHierarchyTexts": ["[sig-network] Services"], "LeafNodeText": "should serve a basic endpoint from pods [Conformance]", "LeafNodeType": "It", "State": "passed", "RunTime": 12500000000},
            {"ContainerHierarchyTexts": ["[sig-network] Services"], "LeafNodeText": "should be able to create a functioning NodePort service [Conformance]", "LeafNodeType": "It", "State": "failed", "RunTime": 3000000000,
             "Failure": {"Message": "service is not reachable within 2m0s timeout\nmore", "Location": {"FileName": "/root/go/pkg/mod/k8s.io/kubernetes@v1.37.2/test/e2e/network/service.go", "LineNumber": 1234}}},
            {"ContainerHierarchyTexts": ["[sig-network] Services"], "LeafNodeText": "should work with many nodes", "LeafNodeType": "It", "State": "skipped", "RunTime": 1000,
             "Failure": {"Message": "Requires at least 2 nodes (not 1)"}},
            {"ContainerHierarchyTexts": ["[sig-storage] Volumes"], "LeafNodeText": "filtered out", "LeafNodeType": "It", "State": "skipped"},
            {"LeafNodeType": "SynchronizedBeforeSuite", "State": "passed", "RunTime": 5}
        ]}]"#;
        let r = Report::parse(json).unwrap();
        assert_eq!((r.run, r.passed, r.failed, r.skipped), (2, 1, 1, 1));
        assert_eq!(r.specs.len(), 3);
        let failed = &r.specs[1];
        assert_eq!(failed.outcome, Outcome::Failed);
        assert_eq!(
            failed.reason.as_deref().unwrap().lines().last().unwrap(),
            "more (kubernetes@v1.37.2/test/e2e/network/service.go:1234)"
        );
        assert!(r.failures().contains("functioning NodePort service"));
        assert!(!r.failures().contains("basic endpoint"));
        assert!((r.specs[0].seconds - 12.5).abs() < 1e-9);
        let md = r.markdown();
        assert!(md.contains("| 2 | 1 | 1 | 1 |"), "{md}");
    }

    #[test]
    fn a_failing_suite_node_counts_as_a_failure() {
        let json = r#"[{"SpecReports": [
            {"ContainerHierarchyTexts": null, "LeafNodeType": "SynchronizedBeforeSuite", "State": "failed", "Failure": {"Message": "kube-system pods not ready"}}
        ]}]"#;
        let r = Report::parse(json).unwrap();
        assert_eq!((r.run, r.failed), (1, 1));
        assert_eq!(r.specs[0].name, "SynchronizedBeforeSuite");
    }
}
