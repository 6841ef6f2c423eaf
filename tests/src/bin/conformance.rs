//! `make conformance`: upstream Kubernetes' sig-network Service specs against the real node
//! with Tapestry as its only service proxy (tests/src/conformance.rs). Starts the node, installs
//! Tapestry with its chart and the cluster DNS, runs the specs with ginkgo and writes
//! `conformance.json` and `conformance.md` (default: bench/results/). Exits 1 when a spec
//! failed. Everything is stopped and undone at the end.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use tapestry_tests::conformance::{self, E2e, RunOptions};
use tapestry_tests::node::{self, Node};

#[derive(Debug, Parser)]
#[command(about = "Upstream sig-network Service e2e specs against the real node with Tapestry")]
struct Args {
    /// ginkgo --focus (default: every `[sig-network] Services` spec).
    #[arg(long, default_value = conformance::SERVICES_FOCUS)]
    focus: String,
    /// Only the `[Conformance]` Service specs (what `make test` runs).
    #[arg(long, conflicts_with = "focus")]
    conformance_only: bool,
    /// ginkgo --skip.
    #[arg(long, default_value = conformance::SKIP)]
    skip: String,
    /// Parallel spec processes.
    #[arg(long, default_value_t = 4)]
    procs: u32,
    /// The suite's timeout, in minutes.
    #[arg(long, default_value_t = 40)]
    timeout_minutes: u64,
    /// Where conformance.json and conformance.md go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Keep the node's logs (and ginkgo's) even when every spec passed.
    #[arg(long)]
    keep_logs: bool,
    /// Start nothing: read this ginkgo JSON report (a kept run's `e2e/report.json`) and write
    /// the results from it.
    #[arg(long)]
    from_report: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("conformance: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: Args) -> Result<bool> {
    if let Some(path) = &args.from_report {
        let mut report = conformance::Report::read(path)?;
        report.focus = args.focus.clone();
        report.skip = args.skip.clone();
        report.write(&args.out)?;
        summarize(&report, &args);
        return Ok(report.failed == 0 && report.run > 0);
    }
    if let Err(why) = node::require_tapestry() {
        bail!("{why} (`make conformance` runs scripts/setup.sh and `make images` first)");
    }
    let t0 = Instant::now();
    let e2e = E2e::build()?;
    let mut node = Node::start()?;
    println!("node Ready in {:.1} s", t0.elapsed().as_secs_f64());
    conformance::prepare(&node, &e2e, &[])?;
    println!(
        "Tapestry installed and the cluster DNS answering through it at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let focus = if args.conformance_only {
        conformance::CONFORMANCE_FOCUS.to_string()
    } else {
        args.focus.clone()
    };
    let work = node.dir().join("e2e");
    println!(
        "running ginkgo --focus='{focus}' --skip='{}' (output in {})",
        args.skip,
        work.display()
    );
    let report = conformance::run(
        &node,
        &e2e,
        &RunOptions {
            focus: &focus,
            skip: &args.skip,
            procs: args.procs,
            timeout: Duration::from_secs(args.timeout_minutes * 60),
            out_dir: &work,
        },
    );
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            node.keep_logs();
            return Err(e);
        }
    };
    report.write(&args.out)?;
    summarize(&report, &args);
    if report.failed > 0 || args.keep_logs {
        node.keep_logs();
        println!("logs kept in {}", node.dir().display());
    }
    node.stop()?;
    Ok(report.failed == 0 && report.run > 0)
}

fn summarize(report: &conformance::Report, args: &Args) {
    println!(
        "{} specs run: {} passed, {} failed; {} skipped themselves; {:.1} min. Written to {}",
        report.run,
        report.passed,
        report.failed,
        report.skipped,
        report.seconds / 60.0,
        args.out.join("conformance.{json,md}").display()
    );
    if report.failed > 0 {
        println!("failed:\n{}", report.failures());
    }
}
