//! Replays every committed input through its target: the seed corpus (`corpus/<target>/`) and
//! the crashes the fuzzer found (`regressions/<target>/`). None may panic, except a regression
//! listed in `regressions/OPEN` (a crash found but not fixed yet), which must still panic: once
//! fixed, its line comes out of OPEN and it guards the fix like any other.

use std::{
    collections::BTreeSet,
    fs,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use tapestry_fuzz_targets::TARGETS;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.expect("reading a corpus directory").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Whether `target` panics on the input at `path`.
fn panics(target: fn(&[u8]), path: &Path) -> bool {
    let data = fs::read(path).expect("reading an input");
    panic::catch_unwind(AssertUnwindSafe(|| target(&data))).is_err()
}

/// `target/file` of each line of regressions/OPEN (text after the first blank is the reason).
fn open_crashes() -> BTreeSet<String> {
    let text = fs::read_to_string(root().join("regressions/OPEN")).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            l.split_whitespace()
                .next()
                .expect("a non-empty line")
                .to_owned()
        })
        .collect()
}

#[test]
fn every_seed_input_passes_its_target() {
    let mut failed = Vec::new();
    for (name, target) in TARGETS {
        let files = inputs(&root().join("corpus").join(name));
        assert!(
            files.len() >= 3,
            "corpus/{name}/ needs a few seeds, has {}",
            files.len()
        );
        for f in files {
            if panics(*target, &f) {
                failed.push(f.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "seed inputs that panic: {failed:#?}");
}

#[test]
fn every_fixed_crash_stays_fixed_and_every_open_one_is_still_open() {
    let open = open_crashes();
    let mut known = BTreeSet::new();
    let mut regressed = Vec::new();
    let mut fixed_but_open = Vec::new();
    for (name, target) in TARGETS {
        for f in inputs(&root().join("regressions").join(name)) {
            let id = format!("{name}/{}", f.file_name().unwrap().to_string_lossy());
            let crashes = panics(*target, &f);
            if open.contains(&id) {
                if !crashes {
                    fixed_but_open.push(id.clone());
                } else {
                    eprintln!("open crash, not fixed yet: regressions/{id}");
                }
            } else if crashes {
                regressed.push(id.clone());
            }
            known.insert(id);
        }
    }
    let missing: Vec<&String> = open.difference(&known).collect();
    assert!(
        missing.is_empty(),
        "regressions/OPEN names inputs that are not there: {missing:?}"
    );
    assert!(
        regressed.is_empty(),
        "fixed crashes that crash again: {regressed:?}"
    );
    assert!(
        fixed_but_open.is_empty(),
        "these no longer crash: take them out of regressions/OPEN: {fixed_but_open:?}"
    );
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let dir = root().join("../fuzz/fuzz_targets");
    let bins: BTreeSet<String> = inputs(&dir)
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    let names: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(bins, names, "fuzz/fuzz_targets/ and TARGETS differ");
}
