//! The prepared benchmark scripts. A GPU machine is lent for minutes, so `benches/gpu-check.sh`
//! must not first fail there: it runs here on the CPU with small sizes, the same code paths
//! (peers, engine variants, errors against Captum, pipeline variants, agreement of their rows)
//! except those that need CUDA. This checks the scripts and what they report, not speed.

use crate::common::{bin, python, repo};
use serde_json::Value;
use std::process::Command;

fn field<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

#[test]
fn gpu_check_runs_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(repo().join("benches/gpu-check.sh"))
        .envs([
            ("DEVICE", "cpu"),
            ("MODELS", "resnet18"),
            ("PIPELINE_MODEL", "resnet18"),
            ("JPEGS", "8"),
            ("BATCH", "2"),
            ("SIZE", "64"),
            ("ITERS", "1"),
            ("WARMUP", "1"),
            // Not the default any more, but still there for a longer GPU session.
            ("ENGINE_FLAGS", "--ablation --unfolded"),
        ])
        .env("PYTHON", python())
        .env("BIN", bin())
        .env("OUT", out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "gpu-check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("gpu-check: ") && stdout.contains(" s in all"), "{stdout}");

    // Pipeline step: the four variants, every sample processed, statistics where each asked.
    let p: Value = serde_json::from_slice(&std::fs::read(out.path().join("pipeline_resnet18.json")).unwrap()).unwrap();
    assert!(field(&p, &["engine", "images_per_s"]).as_f64().unwrap() > 0.0);
    let runs = p["pipeline"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["variant"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["pipeline (defaults)", "one worker per device", "batch_size = auto", "statistics in libtorch (CPU)"]
    );
    for r in runs {
        assert_eq!(field(r, &["run", "processed"]).as_u64(), Some(8), "{r}");
        assert!(field(r, &["run", "images_per_s"]).as_f64().unwrap() > 0.0, "{r}");
    }
    let on_device = |i: usize| field(&runs[i], &["run", "workers_with_stats_on_device"]).as_u64();
    assert_eq!(on_device(0), Some(0), "the CPU default computes statistics on the host");
    assert_eq!(on_device(3), Some(1), "stats_on_device = true computes them in libtorch");
    // Every variant gives the same rows as the defaults.
    let agree = p["agreement"].as_array().unwrap();
    assert_eq!(agree.len(), 3);
    for a in agree {
        assert_eq!(a["same_ids"], true, "{a}");
        assert_eq!(a["status_differs"], 0, "{a}");
        for (k, tol) in [("target_prob", 1e-6), ("attr_total_rel", 1e-5), ("gini", 1e-5), ("map_scale_rel", 1e-5)] {
            assert!(a[k].as_f64().unwrap() <= tol, "{k}: {a}");
        }
    }

    // Engine step: peers and engine variants timed, errors measured against Captum.
    let e: Value = serde_json::from_slice(&std::fs::read(out.path().join("engine_resnet18.json")).unwrap()).unwrap();
    let rows = e["rows"].as_array().unwrap();
    let variants: Vec<&str> = rows.iter().map(|r| r["variant"].as_str().unwrap()).collect();
    for v in [
        "captum GuidedGradCam",
        "captum, cuDNN benchmark on",
        "lean one-forward PyTorch",
        "saliency-audit engine",
        "engine bf16",
    ] {
        assert!(variants.contains(&v), "{v} missing from {variants:?}");
    }
    for r in rows {
        let t = r["s_per_batch"].as_f64().unwrap();
        assert!(t.is_finite() && t > 0.0, "{r}");
        assert!(r["vs_captum_cudnn_benchmark"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    let err = |k: &str| e["rel_l2_errors"][k].as_f64().unwrap_or_else(|| panic!("no error {k:?} in {e}"));
    assert!(err("engine fp32 vs Captum (cpu defaults)") < 1e-4, "{e}");
    assert!(err("engine fp32, BN not folded, vs Captum (cpu defaults)") < 1e-5, "{e}");
    // bf16 really ran (differs from fp32) and stays near it.
    let bf16 = err("engine bf16 vs engine fp32");
    assert!(bf16 > 1e-4 && bf16 < 0.2, "bf16 vs fp32: {bf16}");
}
