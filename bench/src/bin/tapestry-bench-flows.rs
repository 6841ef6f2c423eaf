//! `tapestry-bench-flows`: what flow events cost. TCP_CRR through a Tapestry VIP with the
//! daemon's flow events off and on (interleaved rounds, medians of paired ratios), and the
//! events per second a `tapestry flows --follow` reader receives meanwhile. Reports only: no
//! threshold anywhere. Writes bench/results/flows.{json,md} and merges
//! `flow_events_crr_cost_ratio` (on / off) and `flow_events_per_s` into summary.json.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Map, json};
use tapestry_bench::{
    load::ClientReport,
    quick,
    report::{median, merge_summary},
};
use tapestry_tests::{Lab, daemon::Daemon, require_root_and_bpffs};

#[derive(Parser)]
#[command(about = "Flow events: TCP_CRR cost with events on vs off, and events/s to a reader")]
struct Args {
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Seconds of each CRR run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// CPU for client and server (same vCPU, as the datapath benchmark).
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// New connections/s of the paced run (events on): a reader that keeps up loses none.
    #[arg(long, default_value_t = 10_000.0)]
    paced_rate: f64,
    #[arg(long, default_value = quick::RESULTS)]
    out: PathBuf,
    #[arg(long, help = quick::HELP)]
    quick: bool,
}

/// `--quick` (bench/README.md): one round (events off and on) of 1 s runs.
const QUICK: &[(&str, &str)] = &[
    ("rounds", "1"),
    ("seconds", "1"),
    ("out", quick::QUICK_RESULTS),
];

fn main() -> Result<()> {
    let args: Args = quick::parse(QUICK);
    if let Err(why) = require_root_and_bpffs() {
        bail!("{why}");
    }
    let bin = tapestry_tests::daemon::bin_dir();
    let load = bin.join("tapestry-load");
    let cli = tapestry_tests::daemon::binary("tapestry")?;
    let mut lab = Lab::new("bench-flows")?;
    let client = lab.add_pod("client")?;
    let server = lab.add_pod("server")?;
    for p in [&client, &server] {
        p.set_sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    let vip = lab.service_ip(0);
    let mut srv = server
        .spawn(
            Command::new(&load)
                .args(["serve", "--port", "8080", "--cpu"])
                .arg(args.cpu.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .context("starting the load server")?;
    std::thread::sleep(Duration::from_millis(300));
    let state = json!({"services": [{"name": "flows", "vip": vip.to_string(), "port": 80,
        "backends": [{"ip": server.ip.to_string(), "port": 8080}]}]})
    .to_string();
    let ifaces = [client.host_ifname.as_str(), server.host_ifname.as_str()];

    let setup = Setup {
        cli: &cli,
        load: &load,
        client: &client,
        state: &state,
        ifaces: &ifaces,
        target: format!("{vip}:80"),
        seconds: args.seconds,
        cpu: args.cpu,
    };
    let mut runs = Vec::new();
    let (mut ratios, mut rates) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let mut tps = [0.0f64; 2];
        // Alternate which mode goes first, so drift on the shared machine cancels out.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for events in order {
            let r = setup.run(events, None)?;
            tps[usize::from(events)] = r.report.transactions_per_s;
            if events {
                rates.push(r.delivered as f64 / r.elapsed);
            }
            println!(
                "  [{round}] flow events {}: crr {:.1}k/s{}",
                if events { "on " } else { "off" },
                r.report.transactions_per_s / 1e3,
                if events {
                    format!(
                        ", {} events to the reader ({:.0}/s), {} lost",
                        r.delivered,
                        r.delivered as f64 / r.elapsed,
                        r.lost
                    )
                } else {
                    String::new()
                }
            );
            runs.push(r.json(round));
        }
        if tps[0] > 0.0 {
            ratios.push(tps[1] / tps[0]);
        }
    }
    // The case: new flows at a fixed rate a reader should keep up with.
    let paced = setup.run(true, Some(args.paced_rate))?;
    let paced_flows = paced.report.transactions_per_s;
    let paced_delivered = paced.delivered as f64 / paced.elapsed;
    println!(
        "  paced at {}/s: crr {:.0}/s, {} events to the reader ({paced_delivered:.0}/s), {} lost",
        args.paced_rate, paced_flows, paced.delivered, paced.lost
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let ratio = median(&ratios);
    let rate = median(&rates);
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("flows.json"),
        serde_json::to_vec_pretty(&json!({"runs": runs, "crrCostRatio": ratio,
            "eventsPerS": rate, "paced": paced.json(0), "pacedRate": args.paced_rate}))?,
    )?;
    std::fs::write(
        args.out.join("flows.md"),
        format!(
            "# Flow events\n\nTCP_CRR through a Tapestry VIP, {} rounds x {} s, client and server on CPU {}, \
             medians of per-round ratios.\n\n| figure | value |\n|---|---:|\n| CRR with events on / off | {:.3} |\n\
             | events/s delivered to `tapestry flows --follow` | {:.0} |\n\
             | paced at {}/s: new flows/s | {:.0} |\n\
             | paced: events/s delivered | {:.0} |\n\
             | paced: events lost | {} |\n",
            args.rounds,
            args.seconds,
            args.cpu,
            ratio.unwrap_or(f64::NAN),
            rate.unwrap_or(f64::NAN),
            args.paced_rate,
            paced_flows,
            paced_delivered,
            paced.lost
        ),
    )?;
    let mut m = Map::new();
    m.insert(
        "flow_events_crr_cost_ratio".into(),
        json!(ratio.map(|r| (r * 1e4).round() / 1e4)),
    );
    m.insert("flow_events_per_s".into(), json!(rate.map(f64::round)));
    m.insert(
        "flow_events_paced_new_flows_per_s".into(),
        json!(paced_flows.round()),
    );
    m.insert(
        "flow_events_paced_delivered_per_s".into(),
        json!(paced_delivered.round()),
    );
    m.insert("flow_events_paced_lost".into(), json!(paced.lost));
    merge_summary(&args.out.join("summary.json"), &m)?;
    println!(
        "flow events: CRR on/off {:.3}, {:.0} events/s to the reader",
        ratio.unwrap_or(f64::NAN),
        rate.unwrap_or(f64::NAN)
    );
    Ok(())
}

/// What every run shares: the lab, the binaries, the Service.
struct Setup<'a> {
    cli: &'a std::path::Path,
    load: &'a std::path::Path,
    client: &'a tapestry_tests::Pod,
    state: &'a str,
    ifaces: &'a [&'a str],
    target: String,
    seconds: f64,
    cpu: usize,
}

/// One CRR run and what the reader saw.
struct Run {
    events: bool,
    report: ClientReport,
    delivered: u64,
    elapsed: f64,
    lost: u64,
}

impl Run {
    fn json(&self, round: usize) -> serde_json::Value {
        json!({"round": round, "flowEvents": self.events,
            "crrPerS": self.report.transactions_per_s, "errors": self.report.errors,
            "eventsDelivered": self.delivered, "seconds": self.elapsed, "lost": self.lost})
    }
}

impl Setup<'_> {
    /// A daemon with flow events on or off, a `tapestry flows --follow` reader when on, and
    /// one CRR client run through the VIP (paced at `rate` new connections/s when given).
    fn run(&self, events: bool, rate: Option<f64>) -> Result<Run> {
        let extra: &[&str] = if events { &["--flow-events"] } else { &[] };
        let d = Daemon::start_with("bench-flows", self.state, self.ifaces, extra)?;
        let received = Arc::new(AtomicU64::new(0));
        let mut reader = None;
        if events {
            let mut child = Command::new(self.cli)
                .args(["flows", "--follow", "-o", "json", "--socket"])
                .arg(&d.socket)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting `tapestry flows --follow`")?;
            let out = child.stdout.take().expect("piped");
            let n = received.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    if line.is_err() {
                        break;
                    }
                    n.fetch_add(1, Ordering::Relaxed);
                }
            });
            reader = Some(child);
            std::thread::sleep(Duration::from_millis(300));
        }
        let before = received.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut cmd = Command::new(self.load);
        cmd.args(["crr", "--target", &self.target])
            .arg("--seconds")
            .arg(self.seconds.to_string())
            .arg("--cpu")
            .arg(self.cpu.to_string());
        if let Some(r) = rate {
            cmd.arg("--rate").arg(r.to_string());
        }
        let out = self
            .client
            .run(&mut cmd)
            .context("running the CRR client")?;
        // Give the reader one poll interval to catch up before counting.
        std::thread::sleep(Duration::from_millis(400));
        let elapsed = started.elapsed().as_secs_f64();
        let delivered = received.load(Ordering::Relaxed) - before;
        if let Some(mut c) = reader {
            let _ = c.kill();
            let _ = c.wait();
        }
        let report: ClientReport = serde_json::from_slice(
            out.stdout
                .split(|b| *b == b'\n')
                .rfind(|l| !l.is_empty())
                .unwrap_or_default(),
        )
        .with_context(|| {
            format!(
                "parsing the client's report: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let lost = d.client().flows(0).map(|f| f.lost).unwrap_or(0);
        Ok(Run {
            events,
            report,
            delivered,
            elapsed,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults() {
        let a: Args = quick::parse_from(["b", "--quick"], QUICK);
        assert_eq!((a.rounds, a.seconds), (1, 1.0));
        assert_eq!(a.out, PathBuf::from(quick::QUICK_RESULTS));
        let a: Args = quick::parse_from(["b"], QUICK);
        assert_eq!((a.rounds, a.out), (4, PathBuf::from(quick::RESULTS)));
    }
}
