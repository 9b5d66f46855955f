//! `saliency-audit run` and `validate`: job file → plan → model replicas → pipeline → summary.

use crate::decode;
use crate::engine::batch::{catch_libtorch, Attributor, TorchAttributor};
use crate::engine::reduce::{self, Reduction};
use crate::engine::{self, EngineOptions, Rectifiers};
use crate::exit::RunFailed;
use crate::job::{self, BatchSize, DatasetSource, Devices, Job, Precision, Target};
use crate::pipeline::{self, PipelineConfig, Progress, RunSummary, TargetMode};
use crate::sample::{Sample, Status};
use crate::sink::{SinkConfig, SCHEMA_VERSION};
use crate::source::{self, ShardSpec};
use crate::stats::Region;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::store::{self, Loc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A job ready to run: validated spec, its samples (this shard's), and the model facts.
pub struct Plan {
    pub job: Job,
    pub shard: ShardSpec,
    /// All samples of the dataset (before sharding).
    pub total_samples: usize,
    /// This shard's samples, in order.
    pub samples: Vec<Sample>,
    pub class_names: Option<Vec<String>>,
    pub num_classes: i64,
    pub devices: Vec<tch::Device>,
    pub model_sha256: String,
    /// SHA-256 over every sample of the dataset (before sharding): what all shards must share.
    pub dataset_sha256: String,
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = self.job.to_string();
        write!(f, "{job}")?;
        if !job.ends_with('\n') {
            writeln!(f)?;
        }
        // With the label as the target, a sample without one is a bad_label row too.
        let unlabelled_bad = self.job.target == Target::Label;
        let bad =
            self.samples.iter().filter(|s| s.label_error.is_some() || (unlabelled_bad && s.label.is_none())).count();
        let labelled = self.samples.iter().filter(|s| s.label.is_some()).count();
        let bad_boxes: Vec<&Sample> = self.samples.iter().filter(|s| s.box_error.is_some()).collect();
        writeln!(f, "samples: {} in the dataset", self.total_samples)?;
        writeln!(
            f,
            "shard: {} of {} ({} samples, {} labelled, {} with a bad label, {} with a bad box)",
            self.shard.index,
            self.shard.count,
            self.samples.len(),
            labelled,
            bad,
            bad_boxes.len()
        )?;
        if let Some(first) = bad_boxes.first().and_then(|s| s.box_error.as_deref()) {
            writeln!(f, "first bad box: {first}")?;
        }
        writeln!(f, "model classes: {}", self.num_classes)?;
        writeln!(f, "model sha256: {}", self.model_sha256)?;
        let names: Vec<String> = self.devices.iter().map(|d| engine::device_name(*d)).collect();
        writeln!(f, "devices resolved: {}", names.join(", "))
    }
}

/// The failure statuses `run --retry-failed` redoes when none is named: all but `bad_label` and
/// `bad_box`, which come from the manifest, which cannot change under one output folder (the
/// job id covers it), so their samples would only fail again.
pub fn default_retry_statuses() -> BTreeSet<Status> {
    Status::ALL.iter().copied().filter(|s| !matches!(s, Status::Ok | Status::BadLabel | Status::BadBox)).collect()
}

/// What `validate` says of the output folder.
pub struct OutputState {
    /// What this shard's committed parts hold and what a run would do with them, in lines.
    pub text: String,
    /// Whether a run would refuse the folder (exit 2, as `validate` then exits too).
    pub refused: bool,
}

/// What `validate` says of the output folder: what this shard's committed parts hold and what a
/// run would do with them. Reads only.
pub fn describe_output(plan: &Plan) -> Result<OutputState> {
    let cfg = sink_config(plan, Vec::new(), BTreeSet::new());
    let st = crate::sink::shard_state(&cfg, &fingerprint(plan))?;
    if let Some(why) = st.refused {
        let why = with_differences(plan, &cfg, anyhow::anyhow!("{why}"));
        let text = format!("output state: a run would refuse this folder (exit 2): {why}\n");
        return Ok(OutputState { text, refused: true });
    }
    let mut text = String::new();
    if st.parts == 0 && st.invalid.is_empty() {
        text.push_str("output state: nothing committed for this shard yet\n");
    } else {
        let failed: Vec<String> = st
            .status_counts
            .iter()
            .filter(|(s, n)| **s != Status::Ok && **n > 0)
            .map(|(s, n)| format!("{} {n}", s.as_str()))
            .collect();
        let ok = st.status_counts.get(&Status::Ok).copied().unwrap_or(0);
        text.push_str(&format!(
            "output state: {} of {} parts of this shard committed, {} rows ({ok} ok{}); ",
            st.parts,
            st.num_parts,
            st.rows,
            if failed.is_empty() { String::new() } else { format!(", failed: {}", failed.join(", ")) }
        ));
        let rest = cfg.total_rows.saturating_sub(st.rows);
        text.push_str(&if rest == 0 {
            "the shard is complete\n".to_owned()
        } else {
            format!("a run attributes the other {rest} samples\n")
        });
        let retried: u64 = default_retry_statuses().iter().filter_map(|s| st.status_counts.get(s)).sum();
        if retried > 0 {
            text.push_str(&format!("  run --retry-failed would redo {retried} of the failed samples\n"));
        }
    }
    if let Some(first) = st.invalid.first() {
        text.push_str(&format!(
            "  {} part(s) not valid, which a run sets aside and writes again; the first: {first}\n",
            st.invalid.len()
        ));
    }
    Ok(OutputState { text, refused: false })
}

/// The output stage's settings for this plan's shard.
fn sink_config(plan: &Plan, metadata: Vec<(String, String)>, retry_statuses: BTreeSet<Status>) -> SinkConfig {
    let job = &plan.job;
    SinkConfig {
        dir: job.output.clone(),
        shard: plan.shard.index,
        num_shards: plan.shard.count,
        total_rows: plan.samples.len() as u64,
        rows_per_part: job.rows_per_part as u64,
        regions: job.regions.iter().map(|r| r.0.clone()).collect(),
        metadata,
        job_id: job_id(plan),
        retry_statuses,
    }
}

fn resolve_devices(d: &Devices) -> Result<Vec<tch::Device>> {
    let devices = resolve_device_list(d)?;
    if devices.iter().all(|d| !d.is_cuda()) {
        if let (Devices::List(_), Some(why)) = (d, gpu_assigned_here()) {
            tracing::warn!(
                "runtime.devices names only the CPU, although {why}: this run does not use the GPU \
                 (runtime.devices = \"all\" uses every GPU the node gives)"
            );
        }
    }
    Ok(devices)
}

fn resolve_device_list(d: &Devices) -> Result<Vec<tch::Device>> {
    match d {
        Devices::All => {
            let n = engine::cuda_device_count();
            if n == 0 {
                if let Some(why) = gpu_assigned_here() {
                    return Err(RunFailed(anyhow::anyhow!(
                        "runtime.devices = \"all\": {why}, but libtorch sees no CUDA device (this build's \
                         torch 2.11.0+cu130 needs an NVIDIA driver for CUDA 13: 580 or newer); set \
                         runtime.devices = [\"cpu\"] to run on the CPU"
                    ))
                    .into());
                }
                return Ok(vec![tch::Device::Cpu]);
            }
            Ok((0..n).map(tch::Device::Cuda).collect())
        }
        Devices::List(list) => list
            .iter()
            .map(|s| {
                engine::parse_device(s).map_err(|e| {
                    let e = e.context("runtime.devices");
                    // A node that was given a GPU and cannot use it (a driver fault) fails this
                    // run, which a retry elsewhere may get past; elsewhere the job asks for a
                    // device this machine does not have.
                    // Only when libtorch sees no GPU at all: an index past those it sees is the
                    // job's mistake on any node.
                    let none_seen = s.starts_with("cuda") && engine::cuda_device_count() == 0;
                    match (none_seen, gpu_assigned_here()) {
                        (true, Some(why)) => RunFailed(anyhow::anyhow!(
                            "{e:#}, although {why}: this node's GPU cannot be used (this build's torch \
                             2.11.0+cu130 needs an NVIDIA driver for CUDA 13: 580 or newer)"
                        ))
                        .into(),
                        _ => e,
                    }
                })
            })
            .collect(),
    }
}

/// [`gpu_assigned`] for this process: its environment and this machine's /dev.
fn gpu_assigned_here() -> Option<String> {
    let env = |k: &str| std::env::var(k).ok();
    let dev_nodes = std::fs::read_dir("/dev")
        .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_str().is_some_and(is_nvidia_gpu_node)));
    gpu_assigned(&env, dev_nodes)
}

/// Why this process looks as if it was given a GPU (Slurm's or the launcher's
/// `CUDA_VISIBLE_DEVICES`, NVIDIA device nodes in /dev as the container runtime mounts them), or
/// `None`: then running on the CPU is what was asked for.
fn gpu_assigned(env: &dyn Fn(&str) -> Option<String>, nvidia_dev_nodes: bool) -> Option<String> {
    if let Some(v) = env("CUDA_VISIBLE_DEVICES") {
        let v = v.trim();
        if !v.is_empty() && !v.starts_with('-') && v != "NoDevFiles" {
            return Some(format!("CUDA_VISIBLE_DEVICES is {v:?}"));
        }
    }
    nvidia_dev_nodes.then(|| "/dev has NVIDIA GPU device nodes".to_owned())
}

/// `nvidia0`, `nvidia1`, …: a GPU's device node (not `nvidiactl`, `nvidia-uvm`).
fn is_nvidia_gpu_node(name: &str) -> bool {
    name.strip_prefix("nvidia").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn file_sha256(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn engine_options(job: &Job) -> Result<EngineOptions> {
    Ok(EngineOptions {
        interpolate: job.interpolate_mode.as_str().parse().map_err(anyhow::Error::msg)?,
        rectifiers: Rectifiers::from_names(&job.guided_rectifiers).map_err(anyhow::Error::msg)?,
        bf16: job.precision == Precision::Bf16,
        channels_last: job.channels_last,
        cudnn_benchmark: job.cudnn_benchmark,
        ieee_fp32: !job.allow_tf32,
    })
}

/// Validates the job file, loads one model replica to check the contract, and lists the samples.
/// Returns the plan and the loaded replica (reused by `run`).
pub fn plan(job_file: &Path, shard: ShardSpec, output: Option<&Loc>) -> Result<(Plan, TorchAttributor)> {
    plan_with(job_file, shard, output, None)
}

/// [`plan`] with the job's devices replaced (for `bench --job`).
pub fn plan_with(
    job_file: &Path,
    shard: ShardSpec,
    output: Option<&Loc>,
    devices: Option<Vec<String>>,
) -> Result<(Plan, TorchAttributor)> {
    let mut job = job::load(job_file)?;
    for w in &job.warnings {
        tracing::warn!("{}: {w}", job_file.display());
    }
    match output {
        Some(o) => job.set_output(o.clone())?,
        None => job.check_output()?,
    }
    let from_command_line = devices.is_some();
    if let Some(d) = devices {
        job.devices = Devices::List(d);
    }
    store::check_settings()?;
    let opts = engine_options(&job)?;
    // A device the job names that this machine does not have is the job's error, named with
    // its file and line (a node's failing GPU stays the run's failure, exit 3).
    let devices = resolve_devices(&job.devices).map_err(|e| match e.is::<RunFailed>() || from_command_line {
        true => e,
        false => job.error("runtime.devices", e.root_cause().to_string()).into(),
    })?;
    let first = TorchAttributor::load(&job.model, devices[0], opts, &job.preprocess.mean, &job.preprocess.std)?;
    let (h, w) = job.preprocess.input_size();
    // libtorch's failures inside are errors, not a crash; running out of device memory here is
    // the machine's state (another process on the GPU), which a retry may not meet.
    let (classes, act) = catch_libtorch(|| first.engine().probe(job.preprocess.channels() as i64, h as i64, w as i64))
        .map_err(|e| {
            let e = e.context(format!("checking model {} on a {h}×{w} input", job.model.display()));
            let msg = format!("{e:#}");
            if engine::out_of_memory(&msg) || (first.engine().device().is_cuda() && engine::device_failure(&msg)) {
                RunFailed(e).into()
            } else {
                e
            }
        })?;
    tracing::debug!(classes, layer_size = ?act, "model contract checked");
    if let Some(names) = &job.class_names {
        if names.len() as i64 != classes {
            bail!(
                "{}: the metadata names {} classes but the model has {classes} outputs",
                job.model.display(),
                names.len()
            );
        }
    }
    if let Target::Class(c) = job.target {
        if c < 0 || c >= classes {
            let why = format!("class {c} is not a class of the model (it has {classes} classes: 0..{})", classes - 1);
            return Err(job.error("attribution.target", why).into());
        }
    }
    let set = source::load_samples(&job.dataset, job.class_names.as_deref(), Some(classes))?;
    let total = set.samples.len();
    if job.target == Target::Label
        && total > 0
        && set.samples.iter().all(|s| s.label.is_none() && s.label_error.is_none())
    {
        bail!(
            "attribution.target = \"label\", but no sample of {} has a label (no `label` column, or every value \
             empty): give the labels, or set attribution.target to \"predicted\" or a class index",
            match &job.dataset {
                job::DatasetSource::Manifest(l) | job::DatasetSource::ImageFolder(l) => l,
            }
        );
    }
    let mut h = Sha256::new();
    let base = KeyBase::of(&job);
    for s in &set.samples {
        h.update(sample_key(s, &base));
    }
    let dataset_sha256 = hex::encode(h.finalize());
    let samples = source::select_shard(set.samples, shard.index, shard.count);
    // A bucket whose store cannot be set up fails every sample in it the same way: the job's error.
    store::check_stores(samples.iter().flat_map(|s| std::iter::once(&s.location).chain(s.mask.as_ref())))?;
    let model_sha256 = file_sha256(&job.model)?;
    let plan = Plan {
        job,
        shard,
        total_samples: total,
        samples,
        class_names: set.class_names,
        num_classes: classes,
        devices,
        model_sha256,
        dataset_sha256,
    };
    Ok((plan, first))
}

/// The output's identity: a folder holding parts of another job (other model, samples,
/// preprocessing or statistics settings) is refused instead of mixed.
fn fingerprint(p: &Plan) -> String {
    let mut h = Sha256::new();
    h.update(format!("{}|{}/{}", settings_key(p), p.shard.index, p.shard.count));
    let base = KeyBase::of(&p.job);
    for s in &p.samples {
        h.update(sample_key(s, &base));
    }
    hex::encode(h.finalize())
}

/// The identity every shard of one output folder shares: the settings, the shard count and the
/// whole dataset's samples. A shard run with another model, other settings or a dataset that
/// changed since the other shards ran is refused (see [`SinkConfig::job_id`]).
fn job_id(p: &Plan) -> String {
    let mut h = Sha256::new();
    h.update(format!("{}|of {}|{}", settings_key(p), p.shard.count, p.dataset_sha256));
    hex::encode(h.finalize())
}

/// Where a job's files are, for [`sample_key`]: keys name them relative to the job's folder, as
/// a run from that folder always did, so that the output's identity does not depend on where the
/// dataset and the output folder are (moved, or mounted elsewhere on another node).
struct KeyBase {
    /// The job's folder, as paths in the job resolve against it, with a trailing `/`.
    job_dir: String,
    /// The manifest, as label errors name it before their line.
    manifest: Option<String>,
}

impl KeyBase {
    fn of(job: &job::Job) -> KeyBase {
        let manifest = match &job.dataset {
            DatasetSource::Manifest(m) => Some(m.to_string()),
            DatasetSource::ImageFolder(_) => None,
        };
        KeyBase { job_dir: format!("{}/", job.job_dir.display()), manifest }
    }

    /// `text` with the job's folder left out where it starts with it.
    fn relative<'a>(&self, text: &'a str) -> &'a str {
        text.strip_prefix(self.job_dir.as_str()).unwrap_or(text)
    }
}

fn sample_key(s: &Sample, base: &KeyBase) -> String {
    // A label error as the label resolution words it, without the manifest's file and line
    // that its row's message starts with (as keys were before rows carried them).
    let label_error = s.label_error.as_deref().map(|e| match &base.manifest {
        Some(m) => e.strip_prefix(m.as_str()).and_then(|rest| rest.split_once(": ")).map_or(e, |(_, msg)| msg),
        None => e,
    });
    let mask = s.mask.as_ref().map(|m| match m {
        Loc::Local(p) => Loc::Local(PathBuf::from(base.relative(&p.to_string_lossy()))),
        remote => remote.clone(),
    });
    let key = format!("\n{}|{}|{}|{:?}|{:?}|{:?}|{:?}", s.index, s.id, s.path, s.label, label_error, s.bbox, mask);
    // Only where there is one, so that outputs written before box errors were rows keep their key.
    match &s.box_error {
        Some(e) => format!("{key}|{}", base.relative(e)),
        None => key,
    }
}

/// The model and every setting that changes what is written.
fn settings_key(p: &Plan) -> String {
    let j = &p.job;
    format!(
        "v{SCHEMA_VERSION}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|tf32 {}|channels_last {:?}|{}|{}|{:?}",
        p.model_sha256,
        j.preprocess,
        j.target,
        j.interpolate_mode,
        j.guided_rectifiers,
        j.precision,
        j.allow_tf32,
        j.channels_last,
        j.map_size,
        j.rows_per_part,
        j.regions,
    )
}

/// A refusal of a folder that holds another job's output, with what tells the two jobs apart
/// added: the job spec's settings that differ (from the spec the folder's first part records),
/// the model file, or else the samples. Other refusals, and folders whose parts record nothing
/// readable, are returned as they are.
fn with_differences(plan: &Plan, cfg: &SinkConfig, refused: anyhow::Error) -> anyhow::Error {
    let text = refused.to_string();
    if !text.contains("holds another job's output") {
        return refused;
    }
    let Ok(recorded) = crate::sink::recorded_metadata(&cfg.dir, cfg.shard, cfg.num_shards) else {
        return refused;
    };
    let samples = "so its samples do (their ids, paths, labels, boxes or masks, as the manifest or the image \
                   folder gives them)";
    // Parts record the settings' own hash (those written by earlier versions only their spec,
    // whose text may differ where the settings do not: a default written out).
    let said = match recorded.get(SETTINGS_KEY) {
        Some(h) if *h == settings_hash(plan) => format!("its model and settings are that job's, {samples}"),
        recorded_hash => {
            let mut differs = Vec::new();
            if recorded.get("saliency_audit.model_sha256").is_some_and(|m| *m != plan.model_sha256) {
                differs.push("the model file (its sha256)".to_owned());
            }
            if let Some(spec) = recorded.get("saliency_audit.job_spec") {
                differs.extend(spec_differences(spec, &plan.job.spec_text));
            }
            match (differs.is_empty(), recorded_hash.is_some()) {
                (false, _) => format!("it differs from that job in {}", differs.join(", ")),
                (true, true) => "its settings as resolved (with the model's metadata as defaults) differ from that \
                                 job's"
                    .to_owned(),
                (true, false) => format!("neither its spec's settings nor its model differ from that job's, {samples}"),
            }
        }
    };
    anyhow::anyhow!("{text}; {said}")
}

/// The part metadata key of [`settings_hash`].
const SETTINGS_KEY: &str = "saliency_audit.settings_sha256";

/// The hash of the model and every setting that changes what is written ([`settings_key`]).
fn settings_hash(p: &Plan) -> String {
    hex::encode(Sha256::digest(settings_key(p).as_bytes()))
}

/// The job spec's keys (dotted, `regions` as a whole) whose values differ between two spec
/// texts, `key (old → new)`, leaving out those that do not change what is written (the run's
/// devices, threads and batch size, cuDNN's benchmark mode, where the statistics are computed,
/// the output's path) and the paths of the model and the dataset (the model's sha256 and the
/// samples stand for what they hold).
fn spec_differences(old: &str, new: &str) -> Vec<String> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) if prefix != "regions" => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            v => {
                out.insert(prefix.to_owned(), v.to_string());
            }
        }
    }
    let table = |text: &str| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Ok(v) = text.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(v), &mut out);
        }
        out
    };
    const NOT_WRITTEN: [&str; 10] = [
        "model.path",
        "dataset.manifest",
        "dataset.image_folder",
        "runtime.devices",
        "runtime.batch_size",
        "runtime.workers_per_device",
        "runtime.decode_threads",
        "runtime.cudnn_benchmark",
        "runtime.stats_on_device",
        "output.path",
    ];
    let (a, b) = (table(old), table(new));
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| !NOT_WRITTEN.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .map(|k| {
            let shown = |v: Option<&String>| v.map_or("unset".to_owned(), |v| v.clone());
            format!("{k} ({} → {})", shown(a.get(k)), shown(b.get(k)))
        })
        .collect()
}

/// How a run ended, for the exit code.
pub struct Outcome {
    pub summary: RunSummary,
    pub plan_samples: usize,
    pub output_dir: Loc,
    /// The devices the run used.
    pub devices: Vec<tch::Device>,
    /// The shard's lock, held until the caller has written the run's summary (and finalized)
    /// and drops this: a process waiting for the shard does not start while those are written.
    pub shard_lock: Arc<crate::sink::ShardLock>,
}

impl Outcome {
    /// Failed rows of the whole shard: this run's and those committed by earlier runs.
    pub fn shard_failed(&self) -> u64 {
        match &self.summary.shard {
            Some(s) => s.status_counts.iter().filter(|(k, _)| k.as_str() != "ok").map(|(_, v)| v).sum(),
            None => self.summary.failed(),
        }
    }
}

/// What `run` changes for one run, apart from the job spec.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Write here instead of the spec's `output.path`.
    pub output: Option<Loc>,
    /// Failure statuses whose committed rows are redone ([`SinkConfig::retry_statuses`]).
    pub retry_statuses: BTreeSet<Status>,
    /// A sample whose image or mask the object store fails to give (after its retries) gets a
    /// failed row (`unreadable`, `bad_mask`) instead of stopping the run.
    pub store_failures_as_rows: bool,
}

/// Runs a job: all replicas are loaded before any pipeline thread starts.
pub fn run(job_file: &Path, shard: ShardSpec, opts: RunOptions, stop: Arc<AtomicBool>) -> Result<Outcome> {
    run_with(job_file, shard, opts, None, stop)
}

/// [`run`] with the job's devices replaced (for `bench --job`).
pub fn run_with(
    job_file: &Path,
    shard: ShardSpec,
    run_opts: RunOptions,
    devices: Option<Vec<String>>,
    stop: Arc<AtomicBool>,
) -> Result<Outcome> {
    let (mut plan, first) = plan_with(job_file, shard, run_opts.output.as_ref(), devices)?;
    let job = &plan.job;
    tracing::info!(
        samples = plan.samples.len(),
        shard = %format!("{}/{}", plan.shard.index, plan.shard.count),
        devices = %plan.devices.iter().map(|d| engine::device_name(*d)).collect::<Vec<_>>().join(","),
        "job planned"
    );
    // The shard's lock once the job has proved runnable (the plan, which loaded one replica to
    // check the model, writes nothing) and before the other replicas load and warm up (the
    // probe behind batch_size = "auto" takes most of a GPU): a second process of this shard
    // (started twice, or requeued while the first still runs) waits here. An output folder of
    // another job is refused before any of that.
    let output = sink_config(&plan, Vec::new(), BTreeSet::new());
    let shard_lock = Arc::new(crate::sink::lock_shard(&output.dir, output.shard, output.num_shards, &stop)?);
    if let Some(refused) = crate::sink::refusal(&output, &fingerprint(&plan))? {
        return Err(with_differences(&plan, &output, refused));
    }
    if let Err(e) = crate::sink::remove_summary(&output.dir, output.shard, output.num_shards) {
        tracing::warn!("cannot remove the report of an earlier run: {e:#}");
    }
    let opts = engine_options(job)?;
    // Every replica is loaded before any pipeline thread starts (each worker warms its own up).
    let mut loaded = vec![first];
    for (k, d) in plan.devices.iter().enumerate() {
        let workers = job.workers_per_device.unwrap_or(if d.is_cuda() { 2 } else { 1 });
        for _ in usize::from(k == 0)..workers as usize {
            // The model loaded once already (the plan's replica): a failure here is the device's.
            crate::exit::check_stop(&stop, "loading the model replicas")?;
            let replica = TorchAttributor::load(&job.model, *d, opts, &job.preprocess.mean, &job.preprocess.std)
                .map_err(|e| RunFailed(e.context(format!("loading a replica on {}", engine::device_name(*d)))))?;
            loaded.push(replica);
        }
    }
    // Replicas are numbered per device in the logs once there is more than one on it.
    for d in &plan.devices {
        let on: Vec<&mut TorchAttributor> = loaded.iter_mut().filter(|r| r.engine().device() == *d).collect();
        if on.len() > 1 {
            for (k, r) in on.into_iter().enumerate() {
                r.set_replica(k);
            }
        }
    }
    let regions: Vec<Region> = job
        .regions
        .iter()
        .map(|(name, x0, y0, x1, y1)| Region { name: name.clone(), x0: *x0, y0: *y0, x1: *x1, y1: *y1 })
        .collect();
    let (h, w) = job.preprocess.input_size();
    let reduction = Reduction { map_size: job.map_size as usize, regions: regions.clone() };
    // A device is trusted with the statistics once its reduction has matched the host's.
    let mut checked: Vec<(tch::Device, bool)> = Vec::new();
    let mut stats_on_device = 0;
    for r in loaded.iter_mut() {
        let device = r.engine().device();
        let mut on = job.stats_on_device.unwrap_or(device.is_cuda());
        if on {
            on = match checked.iter().find(|(d, _)| *d == device) {
                Some(&(_, ok)) => ok,
                None => {
                    let t = Instant::now();
                    let name = engine::device_name(device);
                    let check = catch_libtorch(|| reduce::self_check(device, &reduction, h as usize, w as usize));
                    if check.is_ok() {
                        tracing::info!(
                            device = %name,
                            secs = t.elapsed().as_secs_f64(),
                            "statistics on the device match the host's on the test maps"
                        );
                    }
                    match &check {
                        Err(e) if e.is::<reduce::Disagreement>() => tracing::warn!(
                            "statistics computed on {name} do not match the host's ({e:#}); \
                             the workers on {name} compute them on the host"
                        ),
                        Err(e) => tracing::warn!(
                            "statistics could not be computed on {name} ({e:#}); \
                             the workers on {name} compute them on the host"
                        ),
                        Ok(()) => {}
                    }
                    checked.push((device, check.is_ok()));
                    check.is_ok()
                }
            };
        }
        tracing::debug!(device = %engine::device_name(device), stats_on_device = on, "statistics placement");
        r.set_reduction(on.then(|| reduction.clone()));
        stats_on_device += usize::from(on);
    }
    crate::exit::check_stop(&stop, "checking the statistics on the devices")?;
    let warm = Instant::now();
    let boxes = plan.samples.iter().any(|s| s.bbox.is_some());
    let masks = plan.samples.iter().any(|s| s.mask.is_some());
    let shape = [h as usize, w as usize];
    let batch_size = find_batch_size(job.batch_size, &mut loaded, shape, boxes, masks, plan.samples.len(), &stop)?;
    let warmup_time = warm.elapsed();
    let replicas_len = loaded.len();
    let replicas: Vec<Box<dyn Attributor>> = loaded.into_iter().map(|r| Box::new(r) as Box<dyn Attributor>).collect();
    let metadata = vec![
        ("saliency_audit.version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("saliency_audit.schema_version".to_owned(), SCHEMA_VERSION.to_string()),
        ("saliency_audit.job_spec".to_owned(), job.spec_text.clone()),
        ("saliency_audit.model_sha256".to_owned(), plan.model_sha256.clone()),
        (SETTINGS_KEY.to_owned(), settings_hash(&plan)),
        ("saliency_audit.class_names".to_owned(), serde_json::to_string(&plan.class_names)?),
        ("saliency_audit.shard".to_owned(), format!("{}/{}", plan.shard.index, plan.shard.count)),
        ("saliency_audit.dataset_root".to_owned(), dataset_root(&job.dataset).to_string()),
        ("saliency_audit.preprocess".to_owned(), preprocess_json(&job.preprocess).to_string()),
        ("saliency_audit.regions".to_owned(), serde_json::to_string(&job.regions)?),
    ];
    let sink = sink_config(&plan, metadata, run_opts.retry_statuses);
    let cfg = PipelineConfig {
        preprocess: decode_preprocess(&job.preprocess),
        target: match job.target {
            Target::Label => TargetMode::Label,
            Target::Predicted => TargetMode::Predicted,
            Target::Class(c) => TargetMode::Class(c),
        },
        batch_size,
        decode_threads: job.decode_threads as usize,
        map_size: job.map_size,
        regions,
        sink,
        fingerprint: fingerprint(&plan),
        store_failures_as_rows: run_opts.store_failures_as_rows,
        shard_lock: Some(shard_lock.clone()),
    };
    let progress = Arc::new(Progress::default());
    let total = plan.samples.len();
    let (output_dir, devices) = (job.output.clone(), plan.devices.clone());
    // The pipeline takes the list (one copy of a shard's samples in memory, not two).
    let samples = std::mem::take(&mut plan.samples);
    let done = Arc::new(AtomicBool::new(false));
    let summary = std::thread::scope(|s| {
        // Set on the way out, panics included, so that the progress thread ends and the scope
        // can join it.
        struct SetOnDrop<'a>(&'a AtomicBool);
        impl Drop for SetOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _done = SetOnDrop(&done);
        let (progress2, done2) = (progress.clone(), done.clone());
        let (pending_tx, pending_rx) = crossbeam_channel::bounded::<(u64, u64)>(1);
        s.spawn(move || report_progress(pending_rx, &progress2, &done2));
        let r = pipeline::run(cfg, samples, replicas, stop, progress.clone(), |pending, resumed| {
            if resumed > 0 {
                tracing::info!(resumed, pending, "resuming: committed parts are kept");
            }
            let _ = pending_tx.send((pending, resumed));
        });
        r
    })?;
    // The batch-size search's time, and the workers' warm-up.
    let warmup_time = warmup_time + summary.warmup_time;
    let summary = RunSummary { warmup_time, batch_size, workers: replicas_len, stats_on_device, ..summary };
    Ok(Outcome { summary, plan_samples: total, output_dir, devices, shard_lock })
}

/// The batch sizes `batch_size = "auto"` tries, largest first: 256, 128, … 1, no larger than
/// the power of two that holds the shard's `samples` (a shard of 10 starts at 16).
fn auto_candidates(samples: usize) -> Vec<usize> {
    let largest = samples.max(1).next_power_of_two().min(256);
    (0..=8).map(|k| 256 >> k).filter(|&n| n <= largest).collect()
}

/// The batch size: the job's, or with `auto` the one found by running a batch through every
/// CUDA replica at once (with an object box and mask per image where the job's samples have
/// them), trying 256, 128, … down to 1 (from the power of two that holds the shard's `samples`)
/// and taking the first that all run (32 without a CUDA device); an error other than running
/// out of memory that a batch of 1 meets too ends the search. The warm-up proper (cuDNN's
/// algorithm search, the allocator's growth) is each pipeline worker's, on its own thread,
/// before the clock starts (`Attributor::warm_up_thread`): libtorch keeps cuDNN's choices per
/// thread, so the search's threads here leave them to the workers.
fn find_batch_size(
    batch: BatchSize,
    replicas: &mut [TorchAttributor],
    [h, w]: [usize; 2],
    boxes: bool,
    masks: bool,
    samples: usize,
    stop: &AtomicBool,
) -> Result<usize> {
    let mut cuda: Vec<&mut TorchAttributor> = replicas.iter_mut().filter(|r| r.engine().device().is_cuda()).collect();
    let candidates: Vec<usize> = match batch {
        BatchSize::Fixed(n) => return Ok(n as usize),
        BatchSize::Auto if !cuda.is_empty() => auto_candidates(samples),
        BatchSize::Auto => {
            tracing::info!(batch_size = BatchSize::DEFAULT, "batch_size = \"auto\" without a CUDA device");
            vec![BatchSize::DEFAULT as usize]
        }
    };
    if cuda.is_empty() {
        return Ok(candidates[0]);
    }
    let mut last_error = String::new();
    // Whether a batch of 1 ran: then an error other than out of memory at a larger size is
    // that size's (a cuDNN limit on large tensors, say), and the search goes on.
    let mut one_runs = false;
    for &n in &candidates {
        crate::exit::check_stop(stop, "warming up the model replicas")?;
        let t = Instant::now();
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = cuda.iter_mut().map(|r| s.spawn(move || r.warm_up(n, h, w, boxes, masks))).collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("a warm-up thread panicked".to_owned()),
                })
                .collect()
        });
        let Some(err) = errors.into_iter().next() else {
            tracing::info!(batch_size = n, workers = cuda.len(), secs = t.elapsed().as_secs_f64(), "batch size found");
            return Ok(n);
        };
        if !engine::out_of_memory(&err) && !one_runs {
            // Not a size that does not fit? A batch of 1 tells: if it fails too, every size
            // would, after a cuDNN search each; say so now.
            let one = n > 1 && cuda.iter_mut().all(|r| r.warm_up(1, h, w, boxes, masks).is_ok());
            if !one {
                return Err(RunFailed(anyhow::anyhow!(
                    "batch_size = \"auto\": the warm-up with a batch of {n} failed, not for lack of memory, \
                     and so does a batch of 1: {err}"
                ))
                .into());
            }
            one_runs = true;
        }
        tracing::info!("a batch of {n} does not run on every worker at once: {err}");
        last_error = err;
    }
    // The device, not the job: a retry (on another machine) may pass.
    Err(RunFailed(anyhow::anyhow!("batch_size = \"auto\": not even a batch of 1 runs on every worker: {last_error}"))
        .into())
}

/// The folder (or object-store prefix) that rows' `path` values are relative to.
fn dataset_root(d: &job::DatasetSource) -> Loc {
    let root = match d {
        job::DatasetSource::Manifest(p) => p.parent(),
        job::DatasetSource::ImageFolder(p) => p.clone(),
    };
    match root {
        Loc::Local(p) => Loc::Local(std::fs::canonicalize(&p).unwrap_or(p)),
        remote => remote,
    }
}

/// The preprocessing, as recorded in the output's file metadata (the report re-creates the
/// model-input crops from it).
pub fn preprocess_json(p: &job::Preprocess) -> serde_json::Value {
    let resize = match p.resize {
        job::Resize::ShorterSide(s) => serde_json::json!({ "shorter_side": s }),
        job::Resize::Exact { h, w } => serde_json::json!({ "exact": [h, w] }),
    };
    serde_json::json!({
        "resize": resize,
        "crop": p.crop.map(|(h, w)| [h, w]),
        "max_pixels": p.max_pixels,
        "jpeg_dct_scaling": p.jpeg_dct_scaling,
        "mean": p.mean,
        "std": p.std,
    })
}

/// The decode stage's preprocessing from the job's.
pub fn decode_preprocess(p: &job::Preprocess) -> decode::Preprocess {
    decode::Preprocess {
        resize: p.resize,
        crop: p.crop,
        max_pixels: p.max_pixels,
        jpeg_dct_scaling: p.jpeg_dct_scaling,
    }
}

/// Progress: a bar on a terminal (images/s, ETA), a log line every 10 s otherwise.
fn report_progress(start_rx: crossbeam_channel::Receiver<(u64, u64)>, progress: &Progress, done: &AtomicBool) {
    let Ok((pending, _resumed)) = start_rx.recv() else {
        return;
    };
    let target = if crate::logging::quiet() {
        indicatif::ProgressDrawTarget::hidden()
    } else {
        indicatif::ProgressDrawTarget::stderr()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(pending), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images  {rate}  ETA {eta}  {msg}",
        )
        .expect("valid template")
        // indicatif's own {per_sec} shows four decimals ("9.9007/s").
        .with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.1} images/s", s.per_sec());
        }),
    );
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    crate::logging::set_progress_bar(Some(bar.clone()));
    let started = Instant::now();
    let mut last_log = Instant::now();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let rows = progress.rows.load(Ordering::Relaxed);
        let failed = progress.failed.load(Ordering::Relaxed);
        bar.set_position(rows);
        if failed > 0 {
            bar.set_message(format!("{failed} failed"));
        }
        if !tty && last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            let rate = rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let images_per_s = (rate * 10.0).round() / 10.0;
            tracing::info!(done = rows, of = pending, failed, images_per_s, "progress");
        }
    }
    crate::logging::set_progress_bar(None);
    bar.finish_and_clear();
}

/// The final summary, as text lines and as JSON (written beside the shard's parts).
pub fn summary_json(o: &Outcome, shard: ShardSpec) -> serde_json::Value {
    let s = &o.summary;
    let counts: serde_json::Map<String, serde_json::Value> =
        s.counts.iter().map(|(k, v)| (k.as_str().to_owned(), (*v).into())).collect();
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    serde_json::json!({
        "shard": shard.index,
        "num_shards": shard.count,
        "samples": o.plan_samples,
        "resumed_rows": s.resumed_rows,
        // Failed rows this run set out to redo; how many it did is known only when it finished.
        "to_redo_rows": s.redone_rows,
        "redone_rows": (!s.interrupted).then_some(s.redone_rows),
        "processed": s.processed(),
        "counts": counts,
        "failed": s.failed(),
        // The whole shard's committed rows (this run's and earlier runs'): what the exit code
        // counts. Null where the run stopped before the shard's parts were read.
        "shard_counts": s.shard.as_ref().map(|sh| {
            sh.status_counts.iter().filter(|(_, n)| **n > 0).map(|(k, n)| (k.clone(), (*n).into())).collect::<serde_json::Map<_, _>>()
        }),
        "shard_failed": s.shard.as_ref().map(|_| o.shard_failed()),
        "interrupted": s.interrupted,
        "elapsed_s": secs,
        "images_per_s": s.processed() as f64 / secs,
        "warmup_s": s.warmup_time.as_secs_f64(),
        "batch_size": s.batch_size,
        "workers": s.workers,
        "workers_with_stats_on_device": s.stats_on_device,
        "batch_size_after_out_of_memory": s.batch_after_out_of_memory,
        "stage_busy_s": {
            "decode": s.decode_time.as_secs_f64(),
            "engine": s.engine_time.as_secs_f64(),
            "stats": s.stats_time.as_secs_f64(),
            "write": s.write_time.as_secs_f64(),
        },
    })
}

/// Counts in `Status::ALL` order, for printing.
pub fn status_counts(s: &RunSummary) -> Vec<(Status, u64)> {
    Status::ALL.iter().filter_map(|st| s.counts.get(st).map(|n| (*st, *n))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_that_was_assigned_is_noticed() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(gpu_assigned(&env(&[]), false), None);
        assert_eq!(gpu_assigned(&env(&[("CUDA_VISIBLE_DEVICES", "")]), false), None);
        assert_eq!(gpu_assigned(&env(&[("CUDA_VISIBLE_DEVICES", "-1")]), false), None);
        assert!(gpu_assigned(&env(&[("CUDA_VISIBLE_DEVICES", "0,1")]), false).unwrap().contains("\"0,1\""));
        assert!(gpu_assigned(&env(&[]), true).unwrap().contains("/dev"));
        assert!(is_nvidia_gpu_node("nvidia0") && is_nvidia_gpu_node("nvidia12"));
        assert!(!is_nvidia_gpu_node("nvidiactl") && !is_nvidia_gpu_node("nvidia-uvm") && !is_nvidia_gpu_node("nvidia"));
    }

    #[test]
    fn the_auto_batch_search_starts_no_larger_than_the_shard() {
        assert_eq!(auto_candidates(100_000), [256, 128, 64, 32, 16, 8, 4, 2, 1]);
        assert_eq!(auto_candidates(256), [256, 128, 64, 32, 16, 8, 4, 2, 1]);
        assert_eq!(auto_candidates(10), [16, 8, 4, 2, 1]);
        assert_eq!(auto_candidates(16), [16, 8, 4, 2, 1]);
        assert_eq!(auto_candidates(1), [1]);
        assert_eq!(auto_candidates(0), [1]);
    }
}
