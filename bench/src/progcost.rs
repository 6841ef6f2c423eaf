//! What Tapestry's own eBPF programs cost in a run: the kernel's run-time statistics
//! (`BPF_ENABLE_STATS`, the `run_cnt` and `run_time_ns` of every program), read before and after
//! a dedicated profiling run. The statistics cost two clock reads per program run, so they are
//! on only while that run goes, never during the measured ones.
//!
//! Only the programs pinned in the daemon's bpffs directory count: another daemon on the machine
//! (a test, a second lab) runs programs of the same names.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};
use aya::programs::ProgramInfo;
use aya::sys::{Stats, enable_stats};
use serde::{Deserialize, Serialize};

/// One program's share of a profiling run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramCost {
    /// The program's name as the kernel keeps it (at most 15 characters).
    pub name: String,
    /// Runs during the profiling run.
    pub runs: u64,
    /// Nanoseconds spent in it during the profiling run (the kernel's own clock around each run).
    pub ns: u64,
}

impl ProgramCost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.ns as f64 / self.runs as f64)
    }
}

/// Statistics switched on, with the counters of the pinned programs as they were then.
pub struct Profiler {
    _stats: OwnedFd,
    dir: std::path::PathBuf,
    before: BTreeMap<u32, (String, u64, u64)>,
}

/// Every program pinned directly under `dir` (the daemon's pins: maps fail to open as programs
/// and are skipped), by id: (name, runs, ns).
fn pinned_programs(dir: &Path) -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        if let Ok(info) = ProgramInfo::from_pin(&path) {
            out.insert(
                info.id(),
                (
                    info.name_as_str().unwrap_or("?").to_string(),
                    info.run_count(),
                    info.run_time().as_nanos() as u64,
                ),
            );
        }
    }
    Ok(out)
}

impl Profiler {
    /// Turns the statistics on (they stay on while the returned value lives) and reads the
    /// counters of the programs pinned under `pin_dir`.
    pub fn start(pin_dir: &Path) -> Result<Profiler> {
        let stats = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
        let before = pinned_programs(pin_dir)?;
        Ok(Profiler {
            _stats: stats,
            dir: pin_dir.to_path_buf(),
            before,
        })
    }

    /// What each program (by name) ran since [`Profiler::start`]; the statistics go off again.
    pub fn finish(self) -> Result<Vec<ProgramCost>> {
        let after = pinned_programs(&self.dir)?;
        let mut by_name: BTreeMap<String, ProgramCost> = BTreeMap::new();
        for (id, (name, runs, ns)) in after {
            let (r0, n0) = self.before.get(&id).map_or((0, 0), |(_, r, n)| (*r, *n));
            let c = by_name.entry(name.clone()).or_insert(ProgramCost {
                name,
                runs: 0,
                ns: 0,
            });
            c.runs += runs.saturating_sub(r0);
            c.ns += ns.saturating_sub(n0);
        }
        Ok(by_name.into_values().filter(|c| c.runs > 0).collect())
    }
}

/// Nanoseconds of program time per transaction of a run that did `transactions`.
pub fn ns_per_transaction(programs: &[ProgramCost], transactions: u64) -> Option<f64> {
    (transactions > 0)
        .then(|| programs.iter().map(|p| p.ns).sum::<u64>() as f64 / transactions as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_transaction_sums_every_program_and_refuses_an_empty_run() {
        let p = [
            ProgramCost {
                name: "a".into(),
                runs: 10,
                ns: 1000,
            },
            ProgramCost {
                name: "b".into(),
                runs: 10,
                ns: 500,
            },
        ];
        assert_eq!(ns_per_transaction(&p, 5), Some(300.0));
        assert_eq!(ns_per_transaction(&p, 0), None);
        assert_eq!(p[0].ns_per_run(), Some(100.0));
    }
}
