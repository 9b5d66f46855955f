//! The cluster files in docker/: there is no container engine or cluster here, so the manifests
//! are parsed and checked (indices, GPU requests, the exit-code policy), and the Dockerfile's
//! build follows the README's set-up.

use crate::common::{python, repo};
use std::process::Command;

/// Kubernetes: an Indexed Job and a CronJob with one index per shard, GPU requests, per-index
/// retries, and a pod failure policy that fails the job on exit code 2 (configuration errors).
#[test]
fn kubernetes_manifests() {
    let script = r#"
import json, sys, yaml
out = {}
for name in ["indexed-job", "cronjob"]:
    doc = yaml.safe_load(open(f"{sys.argv[1]}/docker/k8s/{name}.yaml"))
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    c = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    rules = spec.get("podFailurePolicy", {}).get("rules", [])
    fail2 = any(r["action"] == "FailJob" and r["onExitCodes"]["operator"] == "In" and 2 in r["onExitCodes"]["values"]
                and r["onExitCodes"].get("containerName") == c["name"] for r in rules if "onExitCodes" in r)
    retries_exit1 = any(r["action"] == "FailJob" and 1 in r["onExitCodes"]["values"] for r in rules if "onExitCodes" in r)
    out[name] = {
        "kind": doc["kind"], "mode": spec.get("completionMode"), "completions": spec.get("completions"),
        "num_shards": int(env.get("NUM_SHARDS", "0")), "gpu_request": c["resources"]["requests"].get("nvidia.com/gpu"),
        "gpu_limit": c["resources"]["limits"].get("nvidia.com/gpu"), "backoff_per_index": spec.get("backoffLimitPerIndex"),
        "restart": spec["template"]["spec"]["restartPolicy"], "fail_on_2": fail2, "fail_on_1": retries_exit1,
        "replacement": spec.get("podReplacementPolicy"),
        "runs": "run" in " ".join(c.get("args", []) + c.get("command", [])),
        "args": c.get("args", []), "command": c.get("command", []),
        "fail_on": sorted(v for r in rules if "onExitCodes" in r and r["action"] == "FailJob" for v in r["onExitCodes"]["values"]),
        "run_as": spec["template"]["spec"].get("securityContext", {}).get("runAsUser"),
        "fs_group": spec["template"]["spec"].get("securityContext", {}).get("fsGroup"),
        "cpu_limit": c["resources"]["limits"].get("cpu"),
        "grace": spec["template"]["spec"].get("terminationGracePeriodSeconds"),
    }
print(json.dumps(out))
"#;
    let out = Command::new(python()).arg("-c").arg(script).arg(repo()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, kind) in [("indexed-job", "Job"), ("cronjob", "CronJob")] {
        let m = &v[name];
        assert_eq!(m["kind"], kind);
        assert_eq!(m["mode"], "Indexed", "{name}");
        assert_eq!(m["completions"], m["num_shards"], "{name}: one index per shard");
        assert!(m["num_shards"].as_u64().unwrap() >= 2, "{name}");
        assert_eq!(m["gpu_request"], 1, "{name}");
        assert_eq!(m["gpu_limit"], 1, "{name}");
        assert!(m["backoff_per_index"].as_u64().unwrap() >= 1, "{name}: per-index retries");
        assert_eq!(m["restart"], "Never", "{name}: podFailurePolicy needs restartPolicy Never");
        // A retried index's pod waits for the old one to stop: one writer per shard (buckets have
        // no shard lock).
        assert_eq!(m["replacement"], "Failed", "{name}");
        assert_eq!(m["fail_on_2"], true, "{name}: configuration errors are not retried");
        assert_eq!(m["fail_on_1"], false, "{name}: sample failures are not pod failures");
        assert_eq!(m["runs"], true, "{name}");
        // Decode threads follow the CPUs the container may use: a limit keeps them to the pod's share.
        assert!(m["cpu_limit"].is_string(), "{name}: a CPU limit");
        assert!(m["grace"].as_u64().is_some_and(|g| g >= 30), "{name}: time to stop on SIGTERM");
        // Exit 1 would be a pod failure, retried and failing again: the shard exits 0 instead.
        // The last shard to finish writes _SUCCESS. Exit 3 (a failure on the way) is retried.
        let args: Vec<&str> = m["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.contains(&"--failed-samples-ok") && args.contains(&"--finalize"), "{name}: {args:?}");
        assert_eq!(m["fail_on"], serde_json::json!([2]), "{name}: only configuration errors fail the Job");
        // The binary is the container's process (SIGTERM reaches it), and the output folder is
        // the same for every pod and retry of a run (no shell, no clock).
        assert_eq!(m["command"], serde_json::json!([]), "{name}: the image's entrypoint runs");
        assert!(!args.iter().any(|a| a.contains("date")), "{name}: {args:?}");
        // The image's user (Dockerfile: uid 10001) can write the volume.
        assert_eq!((m["run_as"].as_u64(), m["fs_group"].as_u64()), (Some(10001), Some(10001)), "{name}");
    }
}

/// Slurm: an array script that is valid bash, asks for a GPU per task, and treats exit 1
/// (samples failed, recorded in the output) as a completed shard.
#[test]
fn slurm_array_script() {
    let path = repo().join("docker/slurm/audit-array.sbatch");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(Command::new("bash").arg("-n").arg(&path).status().unwrap().success(), "bash syntax");
    assert!(text.contains("#SBATCH --array=0-"));
    assert!(text.contains("#SBATCH --gres=gpu:1"));
    // One exec: the binary gets Slurm's SIGTERM itself and its exit code is the task's; failed
    // samples do not fail the task, and the last task finalizes.
    let exec = text.lines().find(|l| l.starts_with("exec ")).expect("an exec line");
    assert!(exec.contains(" run ") && exec.contains("--failed-samples-ok") && exec.contains("--finalize"), "{exec}");
    // NUM_SHARDS defaults to the array's size, so task i is shard i of it, resubmitted or not.
    let last: u32 = text.split("#SBATCH --array=0-").nth(1).unwrap().lines().next().unwrap().trim().parse().unwrap();
    assert!(text.contains(&format!("export NUM_SHARDS=${{NUM_SHARDS:-{}}}", last + 1)), "NUM_SHARDS != array size");
}

/// The Dockerfile builds as the README's set-up does (pip's torch 2.11.0 in a venv, the
/// .venv/libtorch link, cargo build --release) and runs as a non-root user with the binary as
/// entrypoint.
#[test]
fn dockerfile_follows_the_setup() {
    let text = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    let setup = std::fs::read_to_string(repo().join("scripts/setup.sh")).unwrap();
    assert!(setup.contains("ln -sfn \"$torch_dir\" .venv/libtorch"));
    assert!(text.contains("torch==2.11.0") && text.contains(".venv/libtorch"));
    assert!(text.contains("cargo build --release --bin saliency-audit"));
    // The set-up's build tools are the image's: nasm assembles the JPEG decoder's SIMD code.
    assert!(setup.contains("apt-get install -y -qq nasm"));
    let apt = text.lines().find(|l| l.contains("apt-get install") && l.contains("python3-venv")).unwrap();
    assert!(apt.split_whitespace().any(|w| w == "nasm"), "{apt}");
    assert!(text.contains("AS build") && text.contains("AS runtime"), "multi-stage");
    let user = text.lines().rfind(|l| l.starts_with("USER ")).unwrap();
    assert_ne!(user.trim(), "USER root");
    assert!(text.contains("ENTRYPOINT [\"/opt/saliency-audit/bin/saliency-audit\"]"));
    let req = std::fs::read_to_string(repo().join("scripts/requirements.txt")).unwrap();
    assert!(req.lines().any(|l| l == "torch==2.11.0"), "the Dockerfile's torch is the set-up's");
}
