//! The fuzz targets' regression cases, on the stable toolchain: every file kept under
//! `fuzz/regressions/TARGET/` (inputs that once crashed a target, kept when fixed) and
//! `fuzz/seeds/TARGET/` (the starting corpus) goes to the same function the libFuzzer target
//! `TARGET` calls (`fuzz/src/lib.rs`, included here). A folder naming no target is an error,
//! so a renamed target cannot silently drop its cases.
use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

fn fuzz_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz").join(sub)
}

#[test]
fn every_regression_case_passes_its_target() {
    let n = run_cases(&fuzz_dir("regressions"));
    eprintln!("{n} regression cases");
}

#[test]
fn every_seed_passes_its_target() {
    assert!(run_cases(&fuzz_dir("seeds")) > 0, "no seed under fuzz/seeds");
}

/// Runs every file of `root/TARGET/` through `TARGET`; the number of files.
fn run_cases(root: &Path) -> usize {
    let mut total = 0;
    if !root.exists() {
        return 0;
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().and_then(|n| n.to_str()).expect("a UTF-8 folder name").to_string();
        let Some((_, run)) = targets::TARGETS.iter().find(|(t, _)| *t == name) else {
            panic!("{}: no fuzz target of that name (fuzz/src/lib.rs TARGETS); rename or remove the folder", dir.display());
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
            // A panic names the case: re-run it alone with `cargo fuzz run TARGET FILE`.
            eprintln!("{name}: {}", f.display());
            run(&data);
            total += 1;
        }
    }
    total
}

#[test]
fn every_target_has_a_fuzz_target_file() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for (name, _) in targets::TARGETS {
        let f = dir.join(format!("{name}.rs"));
        assert!(f.is_file(), "{}: missing (each entry of TARGETS is a cargo-fuzz target)", f.display());
    }
}
