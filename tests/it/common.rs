//! Fixtures shared by the topic modules: the project's Python (.venv), generated cases, tolerances.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project's Python, with torch, torchvision and Captum (scripts/setup.sh makes it).
pub fn python() -> PathBuf {
    let p = repo().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_saliency-audit"))
}

/// The installed versions of the libraries the fixture scripts compute references with (their
/// `*.dist-info` folder names in the project's .venv): a fixture made with other versions is
/// made again.
fn library_versions() -> String {
    let mut names: Vec<String> = std::fs::read_dir(repo().join(".venv/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|py| std::fs::read_dir(py.path().join("site-packages")).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.ends_with(".dist-info")
                && ["torch-", "torchvision-", "pillow-", "captum-", "numpy-"]
                    .iter()
                    .any(|p| n.to_lowercase().starts_with(p))
        })
        .collect();
    names.sort();
    names.join(",")
}

/// Runs a Python script of the repo once per test run, making `out` (skipped when `out/stamp`
/// exists from an earlier run with the same script contents and library versions).
pub fn generate_once(cell: &'static OnceLock<PathBuf>, script: &str, name: &str) -> &'static Path {
    cell.get_or_init(|| {
        let script_path = repo().join(script);
        let text = std::fs::read(&script_path).expect("read fixture script");
        let mut extra = Vec::new();
        // The export helper is part of every fixture.
        extra.extend(std::fs::read(repo().join("scripts/export_model.py")).unwrap_or_default());
        extra.extend(library_versions().into_bytes());
        let stamp = format!("{:016x}", fnv(&[text.as_slice(), extra.as_slice()].concat()));
        let out = repo().join("target/test-fixtures").join(name);
        if std::fs::read_to_string(out.join("stamp")).ok().as_deref() == Some(stamp.as_str()) {
            return out;
        }
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        let status = Command::new(python())
            .arg(&script_path)
            .arg(&out)
            .env("PYTHONWARNINGS", "ignore")
            .status()
            .expect("run python");
        assert!(status.success(), "{script} failed");
        std::fs::write(out.join("stamp"), stamp).unwrap();
        out
    })
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Relative L2 error ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut num = 0f64;
    let mut den = 0f64;
    for (x, y) in a.iter().zip(b) {
        num += ((*x - *y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    assert!(den > 0.0, "reference is all zeros: the case checks nothing");
    (num / den).sqrt()
}

pub fn engine_cases() -> &'static Path {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    generate_once(&CELL, "scripts/make_engine_cases.py", "engine-cases")
}
