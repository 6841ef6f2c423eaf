//! Turning raw runs into medians, ratios, `summary.json`, a markdown table and a gnuplot PNG.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::load::{ClientReport, Mode};

/// One client run of one case in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub round: usize,
    pub case: String,
    pub mode: Mode,
    /// Seconds since the benchmark started, when the run began.
    pub at_s: f64,
    /// `nf_conntrack_count` of the node (root) namespace after the run: shows whether
    /// netfilter's conntrack saw the case's packets.
    pub node_conntrack_entries: Option<u64>,
    pub report: ClientReport,
}

/// Median of the values (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians of one case and mode over the rounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaseStats {
    pub runs: usize,
    pub tps: Option<f64>,
    /// Median transactions per CPU-second of client + server.
    pub per_cpu_s: Option<f64>,
    /// Median share of the wall time the client + server pair was on a CPU.
    pub on_cpu_fraction: Option<f64>,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub errors: u64,
}

/// `runs` of `case` in `mode`, only those that completed transactions.
fn select<'a>(runs: &'a [Run], case: &'a str, mode: Mode) -> impl Iterator<Item = &'a Run> {
    runs.iter()
        .filter(move |r| r.case == case && r.mode == mode && r.report.transactions > 0)
}

pub fn case_stats(runs: &[Run], case: &str, mode: Mode) -> CaseStats {
    let sel: Vec<&Run> = select(runs, case, mode).collect();
    let errors = runs
        .iter()
        .filter(|r| r.case == case && r.mode == mode)
        .map(|r| r.report.errors)
        .sum();
    CaseStats {
        runs: sel.len(),
        tps: median(
            &sel.iter()
                .map(|r| r.report.transactions_per_s)
                .collect::<Vec<_>>(),
        ),
        per_cpu_s: median(
            &sel.iter()
                .filter_map(|r| r.report.transactions_per_cpu_s)
                .collect::<Vec<_>>(),
        ),
        on_cpu_fraction: median(
            &sel.iter()
                .filter_map(|r| r.report.on_cpu_fraction)
                .collect::<Vec<_>>(),
        ),
        p50_us: median(&sel.iter().map(|r| r.report.p50_us).collect::<Vec<_>>()),
        p99_us: median(&sel.iter().map(|r| r.report.p99_us).collect::<Vec<_>>()),
        errors,
    }
}

/// What a ratio compares.
#[derive(Debug, Clone, Copy)]
pub enum Metric {
    /// Transactions per wall-clock second.
    Tps,
    /// Transactions per CPU-second of client + server.
    PerCpu,
}

impl Metric {
    fn of(self, r: &ClientReport) -> Option<f64> {
        match self {
            Metric::Tps => Some(r.transactions_per_s),
            Metric::PerCpu => r.transactions_per_cpu_s,
        }
    }
}

/// Median over rounds of `metric(a) / metric(b)` taken within the same round (paired, so slow
/// drift of the shared machine cancels out); `None` if no round has both.
pub fn paired_ratio_of(runs: &[Run], a: &str, b: &str, mode: Mode, metric: Metric) -> Option<f64> {
    let by_round = |case: &str| -> BTreeMap<usize, f64> {
        select(runs, case, mode)
            .filter_map(|r| Some((r.round, metric.of(&r.report)?)))
            .collect()
    };
    let (ra, rb) = (by_round(a), by_round(b));
    let ratios: Vec<f64> = ra
        .iter()
        .filter_map(|(round, x)| rb.get(round).filter(|y| **y > 0.0).map(|y| x / y))
        .collect();
    median(&ratios)
}

/// How many nanoseconds more a transaction of case `a` takes than one of case `b` (1e9 /
/// `metric`: per second of wall time, or per CPU-second, which other jobs on the machine do not
/// move), paired within a round, median over rounds: what `a`'s datapath adds to every
/// transaction.
pub fn paired_extra_ns(runs: &[Run], a: &str, b: &str, mode: Mode, metric: Metric) -> Option<f64> {
    let by_round = |case: &str| -> BTreeMap<usize, f64> {
        select(runs, case, mode)
            .filter_map(|r| Some((r.round, metric.of(&r.report).filter(|x| *x > 0.0)?)))
            .map(|(round, x)| (round, 1e9 / x))
            .collect()
    };
    let (ra, rb) = (by_round(a), by_round(b));
    let extra: Vec<f64> = ra
        .iter()
        .filter_map(|(round, x)| rb.get(round).map(|y| x - y))
        .collect();
    median(&extra)
}

/// [`paired_ratio_of`] in transactions per second.
pub fn paired_ratio(runs: &[Run], a: &str, b: &str, mode: Mode) -> Option<f64> {
    paired_ratio_of(runs, a, b, mode, Metric::Tps)
}

/// Reads `path` (a flat JSON object, if it exists), sets `updates`, writes it back: keys other
/// benchmarks wrote are kept.
pub fn merge_summary(path: &Path, updates: &Map<String, Value>) -> Result<()> {
    let mut obj = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            _ => bail!("{} exists but is not a JSON object", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Map::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for (k, v) in updates {
        obj.insert(k.clone(), v.clone());
    }
    let text = serde_json::to_string_pretty(&Value::Object(obj))? + "\n";
    write_atomic(path, &text)
}

pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One row of the table and the plot.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: String,
    pub label: String,
    pub rr: CaseStats,
    pub crr: CaseStats,
    /// Paired ratio to the direct path (1.0 for direct itself), per second and per CPU-second.
    pub rr_vs_direct: Option<f64>,
    pub crr_vs_direct: Option<f64>,
    pub rr_cpu_vs_direct: Option<f64>,
    pub crr_cpu_vs_direct: Option<f64>,
    /// Median install / programming time of this case's rules or state, seconds.
    pub setup_s: Option<f64>,
}

fn fmt_k(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}k", x / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

fn fmt_us(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.0}%", x * 100.0))
        .unwrap_or_else(|| "-".into())
}

pub fn markdown(rows: &[Row], header: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{header}\n");
    let _ = writeln!(
        s,
        "| case | TCP_RR/s | vs direct | TCP_CRR/s | vs direct | RR/CPU-s | vs direct | CRR/CPU-s | vs direct | RR p50 us | CRR p50 us | CRR p99 us | on CPU | setup s | errors |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let on_cpu = report_on_cpu(r);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            fmt_k(r.rr.tps),
            fmt_ratio(r.rr_vs_direct),
            fmt_k(r.crr.tps),
            fmt_ratio(r.crr_vs_direct),
            fmt_k(r.rr.per_cpu_s),
            fmt_ratio(r.rr_cpu_vs_direct),
            fmt_k(r.crr.per_cpu_s),
            fmt_ratio(r.crr_cpu_vs_direct),
            fmt_us(r.rr.p50_us),
            fmt_us(r.crr.p50_us),
            fmt_us(r.crr.p99_us),
            fmt_pct(on_cpu),
            r.setup_s
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.rr.errors + r.crr.errors,
        );
    }
    s
}

/// The lower of the RR and CRR on-CPU shares: how much the case was disturbed at worst.
fn report_on_cpu(r: &Row) -> Option<f64> {
    match (r.rr.on_cpu_fraction, r.crr.on_cpu_fraction) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Grouped bars (TCP_RR and TCP_CRR per case) with the values written above the bars, in two
/// panels: per wall-clock second, and per CPU-second of client + server (see README).
pub fn plot(rows: &[Row], title: &str, png: &Path) -> Result<()> {
    let rows: Vec<&Row> = rows
        .iter()
        .filter(|r| r.rr.tps.is_some() || r.crr.tps.is_some())
        .collect();
    if rows.is_empty() {
        bail!("nothing to plot");
    }
    let per_cpu = rows
        .iter()
        .any(|r| r.rr.per_cpu_s.is_some() || r.crr.per_cpu_s.is_some());
    let mut data = String::new();
    for r in &rows {
        let _ = writeln!(
            data,
            "\"{}\" {} {} {} {}",
            // Two-line tick labels: gnuplot turns \n in a quoted data string into a newline.
            r.label.replace('"', "'").replacen(", ", "\\n", 1),
            r.rr.tps.unwrap_or(0.0),
            r.crr.tps.unwrap_or(0.0),
            r.rr.per_cpu_s.unwrap_or(0.0),
            r.crr.per_cpu_s.unwrap_or(0.0),
        );
    }
    let dir = std::env::temp_dir().join(format!("tapestry-bench-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dat = dir.join("datapath.dat");
    std::fs::write(&dat, data)?;
    let width = (300 + 110 * rows.len()).max(960);
    let panel = |rr: u8, crr: u8, ylabel: &str, ptitle: &str| {
        format!(
            r##"set title "{ptitle}"
set ylabel "{ylabel}"
plot "{dat}" using {rr}:xtic(1) title "TCP_RR" lc rgb "#4477aa", \
     "" using {crr} title "TCP_CRR" lc rgb "#ee6677", \
     "" using ($0-1.0/6):{rr}:(sprintf("%.1fk",${rr}/1000)) with labels offset 0,0.7 font "Sans,9" notitle, \
     "" using ($0+1.0/6):{crr}:(sprintf("%.1fk",${crr}/1000)) with labels offset 0,0.7 font "Sans,9" notitle
"##,
            dat = dat.display(),
        )
    };
    let (height, layout, panels) = if per_cpu {
        (
            1040,
            format!("set multiplot layout 2,1 title \"{title}\" font \"Sans,12\"\n"),
            panel(2, 3, "transactions/s", "per wall-clock second (median)")
                + &panel(
                    4,
                    5,
                    "transactions / CPU-s",
                    "per CPU-second of client + server (median; insensitive to other jobs on the vCPU)",
                )
                + "unset multiplot\n",
        )
    } else {
        (
            620,
            String::new(),
            panel(2, 3, "transactions/s (median)", title),
        )
    };
    let script = format!(
        r##"set terminal pngcairo size {width},{height} font "Sans,11" noenhanced
set output "{png}"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set yrange [0:*]
set grid ytics
set key top right
set bmargin 4
set format y "%.0s%c"
set offsets 0, 0, graph 0.1, 0
{layout}{panels}"##,
        png = png.display(),
    );
    let mut child = Command::new("gnuplot")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running gnuplot (apt-get install gnuplot-nox)")?;
    child
        .stdin
        .take()
        .context("gnuplot stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "gnuplot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, case: &str, mode: Mode, tps: f64) -> Run {
        Run {
            round,
            case: case.into(),
            mode,
            at_s: 0.0,
            node_conntrack_entries: None,
            report: ClientReport {
                mode,
                target: String::new(),
                request_size: 1,
                response_size: 1,
                cpu: None,
                elapsed_s: 1.0,
                transactions: tps as u64,
                transactions_per_s: tps,
                errors: 0,
                first_error: None,
                p50_us: 1.0,
                p99_us: 2.0,
                mean_us: 1.0,
                stopped_by: "time".into(),
                client_cpu_s: 0.5,
                peer_cpu_s: Some(0.5),
                transactions_per_cpu_s: Some(tps),
                on_cpu_fraction: Some(1.0),
            },
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn paired_ratios_use_same_round() {
        let runs = vec![
            run(0, "a", Mode::Crr, 10.0),
            run(0, "b", Mode::Crr, 20.0),
            run(1, "a", Mode::Crr, 30.0),
            run(1, "b", Mode::Crr, 30.0),
            run(2, "a", Mode::Crr, 5.0),
        ];
        assert_eq!(paired_ratio(&runs, "a", "b", Mode::Crr), Some(0.75));
        assert_eq!(paired_ratio(&runs, "a", "c", Mode::Crr), None);
        assert_eq!(case_stats(&runs, "a", Mode::Crr).tps, Some(10.0));
        assert_eq!(
            paired_ratio_of(&runs, "a", "b", Mode::Crr, Metric::PerCpu),
            Some(0.75)
        );
    }

    #[test]
    fn summary_merge_keeps_other_keys() {
        let dir = std::env::temp_dir().join(format!("tb-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("summary.json");
        std::fs::write(&p, r#"{"other": 1, "lb_x": 2}"#).unwrap();
        let mut m = Map::new();
        m.insert("lb_x".into(), Value::from(3));
        merge_summary(&p, &m).unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["other"], 1);
        assert_eq!(v["lb_x"], 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
