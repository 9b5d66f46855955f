//! The `saliency-audit` command line. Parsing and printing only: the work is in the library.

use clap::{Parser, Subcommand};
use saliency_audit::engine::batch::catch_libtorch;
use saliency_audit::engine::{self, EngineOptions, InterpolateMode, Rectifiers, TargetArg};
use saliency_audit::logging::{self, LogFormat};
use saliency_audit::run;
use saliency_audit::sample::Status;
use saliency_audit::source::ShardSpec;
use saliency_audit::store::Loc;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::Level;

/// See Cargo.toml: large decode buffers are reused instead of returned to the system.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "saliency-audit",
    version,
    about = "Guided Grad-CAM attributions over image datasets, written to Parquet"
)]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Log lines as text or JSON (one object a line, for cluster log collectors).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job: attribute every sample of the dataset and write Parquet parts.
    Run {
        /// The job spec (TOML).
        job: PathBuf,
        /// Write here instead of the spec's output.path (a folder or an s3://, gs://, az:// URL).
        #[arg(long)]
        output: Option<Loc>,
        #[command(flatten)]
        shard: ShardArgs,
        /// Exit 0, not 1, when the shard is complete but some samples failed (their rows say
        /// why): for schedulers that take any other exit code for a failed task.
        #[arg(long)]
        failed_samples_ok: bool,
        /// Once this shard is complete, run `finalize` on the output: the last shard to finish
        /// writes the dataset's _SUCCESS (the others note which shards are still running).
        #[arg(long)]
        finalize: bool,
        /// Attribute again the samples whose committed rows failed (every failure status but
        /// bad_label and bad_box, which only the manifest decides, or those listed, e.g.
        /// --retry-failed=missing,unreadable): each part holding one is written again with the
        /// new rows, its other rows kept.
        #[arg(long, value_name = "STATUS", num_args = 0.., value_delimiter = ',', require_equals = true)]
        retry_failed: Option<Vec<String>>,
        /// Give a sample whose image or mask the object store fails to read (after its retries)
        /// an `unreadable` or `bad_mask` row, instead of stopping the run with exit 3 for a rerun
        /// to read it: for a store that keeps failing on a few objects (`--retry-failed` redoes
        /// them later).
        #[arg(long)]
        store_failures_as_rows: bool,
    },
    /// Validate a job spec and the model, and print the resolved plan and what the output folder
    /// already holds for the shard (what a run would keep, redo or refuse); computes nothing.
    Validate {
        /// The job spec (TOML).
        job: PathBuf,
        /// Write here instead of the spec's output.path (a folder or an s3://, gs://, az:// URL).
        #[arg(long)]
        output: Option<Loc>,
        #[command(flatten)]
        shard: ShardArgs,
    },
    /// Build the audit report of an output folder: HTML (self-contained), scores as Parquet, and a summary.
    Report {
        /// The run's output folder (or s3://, gs://, az:// URL).
        dir: Loc,
        /// Samples shown per class, ranked by the spurious score.
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// Ranking score: auto (named regions if the job has any, else outside the object),
        /// outside (share outside the object's mask or box), or region:<name>.
        #[arg(long, default_value = "auto")]
        score: saliency_audit::report::ScoreKind,
        /// Largest number of strategy clusters per class.
        #[arg(long, default_value_t = 6, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        max_clusters: usize,
        /// Samples per class the clustering runs on (a deterministic uniform subsample); the
        /// rest join their nearest cluster.
        #[arg(long, default_value_t = 1500, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        cluster_sample: usize,
        /// Where to write the report (default DIR/_report, which dataset readers skip).
        #[arg(long)]
        out: Option<Loc>,
        /// Classes given a section of their own on the page (the most flagged first); the
        /// table and scores.parquet keep every class.
        #[arg(long, default_value_t = 100)]
        max_classes: usize,
    },
    /// Check that every shard of a sharded run completed and write the dataset's _SUCCESS.
    Finalize {
        /// The output folder (or s3://, gs://, az:// URL) all shards wrote into.
        dir: Loc,
    },
    /// Guided Grad-CAM for a preprocessed float32 .npy batch [N, C, H, W].
    Attribute {
        /// TorchScript model following the engine's contract.
        #[arg(long)]
        model: PathBuf,
        /// float32 .npy [N, C, H, W], already preprocessed.
        #[arg(long)]
        input: PathBuf,
        /// int64 .npy of N classes, one integer for all, or `predicted`.
        #[arg(long, allow_negative_numbers = true)]
        target: TargetArg,
        /// Output float32 .npy of the input's shape.
        #[arg(long)]
        out: PathBuf,
        /// Also write the CAM [N, 1, h, w] here.
        #[arg(long)]
        cam_out: Option<PathBuf>,
        /// How the CAM is upsampled to the input's size: nearest (Captum's default), bilinear,
        /// bicubic or area.
        #[arg(long, default_value = "nearest")]
        interpolate_mode: InterpolateMode,
        /// Rectifiers guided backprop clamps: relu, relu6 (hardtanh), leaky_relu; comma separated.
        #[arg(long, default_value = "relu", value_delimiter = ',')]
        guided_rectifiers: Vec<String>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[command(flatten)]
        speed: SpeedArgs,
    },
    /// Throughput: the engine on synthetic input (images/s, peak memory), per device and for
    /// 1..N devices together (scaling efficiency); with --job, the whole pipeline on real files.
    Bench {
        /// TorchScript model following the engine's contract.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Devices, comma separated (cpu, cuda:N) or `all`; the scaling table uses the first 1..N.
        /// Default: cpu with --model, the job's runtime.devices (one row) with --job.
        #[arg(long, value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// Examples a batch (--model only; a job has runtime.batch_size). Default 8.
        #[arg(long)]
        batch_size: Option<i64>,
        /// Timed batches (--model only). Default 6.
        #[arg(long)]
        iters: Option<usize>,
        /// Untimed batches first (--model only). Default 2.
        #[arg(long)]
        warmup: Option<usize>,
        /// Intra-op threads (0 = libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: i32,
        /// Real data: run this job (decode → engine → statistics → Parquet into a temporary
        /// folder) and report images/s and busy time per stage; with --devices, on the first
        /// 1..N of them. The engine's settings (batch size, precision, layout) are the job's.
        #[arg(long)]
        job: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        speed: SpeedArgs,
    },
}

/// Precision and memory layout of the engine (a job sets them in its spec).
#[derive(clap::Args)]
struct SpeedArgs {
    /// fp32 (exact, equal to Captum; the default) or bf16 (forward under bfloat16 autocast).
    #[arg(long, value_parser = ["fp32", "bf16"])]
    precision: Option<String>,
    /// Parameters and input in the channels-last memory format: `--channels-last` or
    /// `--channels-last false`; default on for CUDA devices and with bf16, off for fp32 on the CPU.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    channels_last: Option<bool>,
    /// Float32 convolutions in full IEEE precision on CUDA (no TF32 tensor cores; slower).
    #[arg(long)]
    ieee_fp32: bool,
    /// cuDNN benchmark mode off on CUDA (cuDNN's heuristics pick the convolution algorithms
    /// instead of timing them per shape); a job sets it with `runtime.cudnn_benchmark = false`.
    #[arg(long)]
    no_cudnn_benchmark: bool,
}

impl SpeedArgs {
    fn options(&self, interpolate: InterpolateMode, rectifiers: Rectifiers) -> EngineOptions {
        EngineOptions {
            interpolate,
            rectifiers,
            bf16: self.precision.as_deref() == Some("bf16"),
            channels_last: self.channels_last,
            cudnn_benchmark: !self.no_cudnn_benchmark,
            ieee_fp32: self.ieee_fp32,
        }
    }

    /// The flags given on the command line.
    fn given(&self) -> Vec<&'static str> {
        [
            ("--precision", self.precision.is_some()),
            ("--channels-last", self.channels_last.is_some()),
            ("--ieee-fp32", self.ieee_fp32),
            ("--no-cudnn-benchmark", self.no_cudnn_benchmark),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// Which shard this process runs; else from the scheduler's environment (Kubernetes Indexed
/// Job, Slurm array, AWS Batch array), else the whole dataset.
#[derive(clap::Args)]
struct ShardArgs {
    /// 0-based shard index.
    #[arg(long, requires = "num_shards")]
    shard_index: Option<u32>,
    /// Number of shards.
    #[arg(long, requires = "shard_index")]
    num_shards: Option<u32>,
}

impl ShardArgs {
    fn resolve(&self) -> anyhow::Result<ShardSpec> {
        ShardSpec::from_env_or_args(self.shard_index, self.num_shards, &|k| std::env::var(k).ok())
    }
}

/// `print!` for the command's results: a closed stdout (`validate … | head`) is not an error
/// (the reader has what it wanted, and the command's own outcome stands); another write error
/// is the command's.
macro_rules! out {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*))? };
}

/// [`out!`] with a newline.
macro_rules! outln {
    ($($arg:tt)*) => { write_stdout(format_args!("{}\n", format_args!($($arg)*)))? };
}

fn write_stdout(args: std::fmt::Arguments) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_fmt(args).and_then(|()| o.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose, cli.quiet, cli.log_format);
    saliency_audit::engine::batch::install_panic_hook();
    // A panic that no stage caught (a bug in the source, decode or writer thread: the hook has
    // printed it with its place) ends the run as a failure on the way, exit 3, not Rust's 101:
    // the committed parts are kept, and a rerun resumes.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))).unwrap_or_else(|p| {
        let msg = saliency_audit::engine::batch::panic_message(p.as_ref()).to_owned();
        Err(saliency_audit::exit::RunFailed(anyhow::anyhow!("internal error (a bug; please report it): {msg}")).into())
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            let code = saliency_audit::exit::code(&err);
            if code == saliency_audit::exit::INTERRUPTED {
                logging::say(Level::WARN, &format!("stopped: {err}"));
                return ExitCode::from(code);
            }
            let mut lines = vec![format!("error: {err}")];
            lines.extend(err.chain().skip(1).map(|cause| format!("  caused by: {cause}")));
            if code == saliency_audit::exit::RUN_FAILED {
                lines.push(format!(
                    "(exit {code}: a failure outside the job: the device, storage or network; a retry may pass it, \
                     and a rerun of `run` resumes from the committed parts)"
                ));
            }
            logging::say(Level::ERROR, &lines.join("\n"));
            ExitCode::from(code)
        }
    }
}

/// `run --finalize`: writes the dataset's `_SUCCESS` when every shard is complete; while some are
/// still running, only says which.
fn finalize_after_shard(dir: &Loc) -> anyhow::Result<()> {
    match saliency_audit::sink::finalize(dir) {
        Ok(total) => {
            if !logging::quiet() {
                logging::result_line(&format!(
                    "finalized {dir}: all {} shards complete, {} rows",
                    total.num_shards, total.rows
                ));
            }
            Ok(())
        }
        Err(e) => match e.downcast_ref::<saliency_audit::sink::ShardsUnfinished>() {
            Some(_) if logging::quiet() => Ok(()),
            Some(u) => {
                let missing: Vec<String> = u.missing.iter().map(u32::to_string).collect();
                logging::result_line(&format!(
                    "not finalized yet: shard(s) {} of {} still to finish (the last one finalizes)",
                    missing.join(", "),
                    u.num_shards
                ));
                Ok(())
            }
            None => Err(e.context(format!("this shard is complete, but finalizing {dir} failed"))),
        },
    }
}

/// The statuses `run --retry-failed[=…]` redoes: those named, else [`run::default_retry_statuses`].
fn retry_statuses(names: Option<&[String]>) -> anyhow::Result<BTreeSet<Status>> {
    let failures = || Status::ALL.iter().copied().filter(|&s| s != Status::Ok);
    let Some(names) = names else {
        return Ok(BTreeSet::new());
    };
    if names.is_empty() {
        return Ok(run::default_retry_statuses());
    }
    names
        .iter()
        .map(|n| match Status::parse(n.trim()) {
            // Nothing a retry reads again decides these: the manifest's label and box are part of
            // the job, so a corrected manifest is another job (a new output folder).
            Some(s @ (Status::BadLabel | Status::BadBox)) => anyhow::bail!(
                "--retry-failed: {} rows cannot be redone: the dataset's labels and boxes decide them (its \
                 manifest, or an image folder's class folders), and a corrected dataset is another job (write \
                 it to a new output folder)",
                s.as_str()
            ),
            Some(s) if s != Status::Ok => Ok(s),
            _ => {
                let all: Vec<&str> = failures()
                    .filter(|s| !matches!(s, Status::BadLabel | Status::BadBox))
                    .map(Status::as_str)
                    .collect();
                anyhow::bail!(
                    "--retry-failed: {n:?} is not a failure status a retry can redo; those are {}",
                    all.join(", ")
                )
            }
        })
        .collect()
}

/// `run`'s closing lines (left out with `-q`).
fn print_run_summary(s: &saliency_audit::pipeline::RunSummary) {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let counts: Vec<String> = run::status_counts(s).iter().map(|(st, n)| format!("{st} {n}")).collect();
    logging::result_line(&format!(
        "{} of {} samples processed in {:.1} s ({:.1} images/s){}: {}",
        s.processed(),
        s.pending,
        secs,
        s.processed() as f64 / secs,
        // Stopped early, not every failed row to redo was redone.
        match (s.resumed_rows, s.redone_rows, if s.interrupted { "to redo" } else { "redone" }) {
            (0, 0, _) => String::new(),
            (kept, 0, _) => format!(", {kept} kept from an earlier run"),
            (0, redone, what) => format!(", {redone} failed in an earlier run and {what}"),
            (kept, redone, what) => format!(", {kept} kept from an earlier run, {redone} failed there and {what}"),
        },
        match (counts.is_empty(), s.interrupted) {
            (true, true) => "stopped before a part was complete: none committed".to_owned(),
            (true, false) => "nothing to do".to_owned(),
            (false, _) => counts.join(", "),
        }
    ));
    logging::result_line(&format!(
        "stage busy time: decode {:.1} s, engine {:.1} s, statistics {:.1} s, write {:.1} s",
        s.decode_time.as_secs_f64(),
        s.engine_time.as_secs_f64(),
        s.stats_time.as_secs_f64(),
        s.write_time.as_secs_f64()
    ));
    if let Some(n) = s.batch_after_out_of_memory {
        logging::say(
            Level::WARN,
            &format!(
                "a batch of {} ran out of memory, so a worker went on with batches of {n}: \
                 runtime.batch_size = {n} (or \"auto\") avoids the failed tries",
                s.batch_size
            ),
        );
    }
}

/// `bench --job`: the job run into a temporary folder, on its own devices (`devices` None) or on
/// the first 1..N of `devices`.
fn bench_job(job: &std::path::Path, devices: Option<&[tch::Device]>, json: bool) -> anyhow::Result<ExitCode> {
    let name = |d: &tch::Device| engine::device_name(*d);
    let device_sets: Vec<Option<Vec<String>>> = match devices {
        None => vec![None],
        Some(d) => (1..=d.len()).map(|k| Some(d[..k].iter().map(name).collect())).collect(),
    };
    let mut rows = Vec::new();
    for (k, names) in device_sets.into_iter().enumerate() {
        let tmp = std::env::temp_dir().join(format!("saliency-audit-bench-{}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let stop = Arc::new(AtomicBool::new(false));
        let opts = run::RunOptions { output: Some(Loc::Local(tmp.clone())), ..Default::default() };
        let outcome = run::run_with(job, ShardSpec::default(), opts, names.clone(), stop);
        let _ = std::fs::remove_dir_all(&tmp);
        let outcome = outcome?;
        let names = names.unwrap_or_else(|| outcome.devices.iter().map(name).collect());
        let summary = run::summary_json(&outcome, ShardSpec::default());
        if !json {
            outln!(
                "{}: {:.1} images/s over {} images; stage busy time (s): {}",
                names.join(","),
                summary["images_per_s"].as_f64().unwrap_or(0.0),
                summary["processed"],
                summary["stage_busy_s"]
            );
        }
        rows.push(serde_json::json!({ "devices": names, "summary": summary }));
    }
    if json {
        outln!("{}", serde_json::Value::Array(rows));
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { job, output, shard, failed_samples_ok, finalize, retry_failed, store_failures_as_rows } => {
            let shard = shard.resolve()?;
            let opts = run::RunOptions {
                output,
                retry_statuses: retry_statuses(retry_failed.as_deref())?,
                store_failures_as_rows,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            // The user's own signals, apart from `stop`, which a failing device or store sets
            // too: the first Ctrl-C after such a stop is still the first.
            let pressed = AtomicBool::new(false);
            let _ = ctrlc::set_handler(move || {
                flag.store(true, Ordering::SeqCst);
                if pressed.swap(true, Ordering::SeqCst) {
                    logging::say(Level::WARN, "interrupted again: exiting without committing");
                    // At once, without exit handlers: `exit` would run libtorch's static
                    // destructors while its threads still work (a crash instead of 130).
                    // SAFETY: `_exit` ends the process; nothing after it runs.
                    unsafe { libc::_exit(130) };
                }
                logging::say(
                    Level::WARN,
                    "interrupted: stopping; batches in flight finish and any complete parts are committed \
                     (interrupt again, Ctrl-C or SIGTERM, to quit now)",
                );
            });
            let outcome = run::run(&job, shard, opts, stop)?;
            if !logging::quiet() {
                print_run_summary(&outcome.summary);
            }
            let s = &outcome.summary;
            let json = run::summary_json(&outcome, shard);
            // The parts and markers are committed: a summary that cannot be written does not
            // change how the run ended.
            if let Err(e) = saliency_audit::sink::write_summary(&outcome.output_dir, shard.index, shard.count, &json) {
                tracing::warn!("cannot write the run summary into {}: {e:#}", outcome.output_dir);
            }
            if s.interrupted {
                logging::say(Level::WARN, "stopped early: rerun the same command to finish (committed parts are kept)");
                return Ok(ExitCode::from(130));
            }
            if s.processed() > 0 {
                saliency_audit::sink::warn_if_report_is_stale(&outcome.output_dir, "this run's rows");
            }
            if finalize {
                finalize_after_shard(&outcome.output_dir)?;
            }
            let failed = outcome.shard_failed();
            if failed > 0 {
                // This run's first failures by name (the shard's count includes earlier runs').
                let examples: Vec<String> =
                    s.failed_examples.iter().map(|(path, status)| format!("{path} ({})", status.as_str())).collect();
                let named = match s.failed_examples.len() as u64 {
                    0 => String::new(),
                    n if n == failed => format!(": {}", examples.join(", ")),
                    _ => format!("; this run's first: {}, …", examples.join(", ")),
                };
                logging::say(
                    Level::ERROR,
                    &format!("{failed} sample(s) failed{named} (their rows carry the status and error)"),
                );
            }
            Ok(if failed > 0 && !failed_samples_ok {
                ExitCode::from(saliency_audit::exit::SAMPLES_FAILED)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Validate { job, output, shard } => {
            let (plan, _) = run::plan(&job, shard.resolve()?, output.as_ref())?;
            out!("{plan}");
            // The folder may not be reachable from here (a bucket without credentials): the
            // plan still stands.
            match run::describe_output(&plan) {
                // A pre-submit check fails where the run would.
                Ok(state) if state.refused => {
                    out!("{}", state.text);
                    Ok(ExitCode::from(saliency_audit::exit::CANNOT_RUN))
                }
                Ok(state) => {
                    out!("{}", state.text);
                    Ok(ExitCode::SUCCESS)
                }
                // A store that cannot answer now (a time-out) leaves the state unknown; one that
                // refuses the folder (no such bucket, no access) fails here as the run would.
                Err(e) if !saliency_audit::exit::retryable(&e) => Err(e),
                Err(e) => {
                    outln!("output state: not known: {e:#}");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Report { dir, top, score, max_clusters, cluster_sample, out, max_classes } => {
            let mut opts = saliency_audit::report::ReportOptions { top, score, out, max_classes, ..Default::default() };
            opts.cluster.max_clusters = max_clusters;
            opts.cluster.max_samples = cluster_sample;
            let report = saliency_audit::report::build(&dir, &opts)?;
            let (requests, bytes) = saliency_audit::store::remote_reads();
            if requests > 0 {
                tracing::info!("read {bytes} bytes from the object store in {requests} requests");
            }
            out!("{}", saliency_audit::report::summary_text(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Finalize { dir } => {
            let summary = saliency_audit::sink::finalize(&dir)?;
            saliency_audit::sink::warn_if_report_is_stale(&dir, "some of its parts");
            if logging::json() {
                outln!("{}", serde_json::to_string(&summary)?);
            } else {
                outln!("{}", serde_json::to_string_pretty(&summary)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Attribute {
            model,
            input,
            target,
            out,
            cam_out,
            interpolate_mode,
            guided_rectifiers,
            batch_size,
            device,
            speed,
        } => {
            let device = engine::parse_device(&device)?;
            let rectifiers = Rectifiers::from_names(&guided_rectifiers).map_err(anyhow::Error::msg)?;
            let opts = speed.options(interpolate_mode, rectifiers);
            let r = catch_libtorch(|| {
                engine::attribute_npy(&model, &input, &target, &out, cam_out.as_deref(), batch_size, device, opts)
            })?;
            tracing::info!(examples = r.examples, batches = r.batches, out = %out.display(), "attribution written");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { model, devices, batch_size, iters, warmup, threads, job, json, speed } => {
            let opts = speed.options(InterpolateMode::default(), Rectifiers::default());
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let devices: Option<Vec<tch::Device>> = match devices {
                None => None,
                Some(d) if d.iter().any(|d| d == "all") => Some(match engine::cuda_device_count() {
                    0 => vec![tch::Device::Cpu],
                    n => (0..n).map(tch::Device::Cuda).collect(),
                }),
                Some(d) => Some(d.iter().map(|d| engine::parse_device(d)).collect::<anyhow::Result<_>>()?),
            };
            if let Some(job) = job {
                let mut given = speed.given();
                for (name, g) in [
                    ("--model", model.is_some()),
                    ("--batch-size", batch_size.is_some()),
                    ("--iters", iters.is_some()),
                    ("--warmup", warmup.is_some()),
                ] {
                    if g {
                        given.push(name)
                    }
                }
                if !given.is_empty() {
                    anyhow::bail!(
                        "bench --job runs the job as its spec says (model.path, runtime.batch_size, \
                         attribution.precision, runtime.channels_last, …): {} set the engine of bench --model only",
                        given.join(", ")
                    );
                }
                return bench_job(&job, devices.as_deref(), json);
            }
            let devices = devices.unwrap_or(vec![tch::Device::Cpu]);
            let (batch_size, iters, warmup) = (batch_size.unwrap_or(8), iters.unwrap_or(6), warmup.unwrap_or(2));
            let model =
                model.ok_or_else(|| anyhow::anyhow!("bench needs --model (synthetic input) or --job (real data)"))?;
            let mut singles = Vec::new();
            for d in &devices {
                singles.push(catch_libtorch(|| engine::bench::synthetic(&model, *d, opts, batch_size, iters, warmup))?);
            }
            let scaling = if devices.len() > 1 {
                catch_libtorch(|| {
                    engine::bench::synthetic_scaling(&model, &devices, opts, batch_size as usize, iters, warmup, None)
                })?
            } else {
                Vec::new()
            };
            if json {
                if scaling.is_empty() && singles.len() == 1 {
                    outln!("{}", serde_json::to_string(&singles[0])?);
                } else {
                    outln!("{}", serde_json::json!({ "single": singles, "scaling": scaling }));
                }
            } else {
                for r in &singles {
                    outln!(
                        "{} batch {} threads {}: {:.1} images/s ({:.1} ms/batch){}",
                        r.device,
                        r.batch,
                        r.threads,
                        r.images_per_s,
                        r.s_per_batch * 1e3,
                        r.peak_rss_delta_bytes
                            .map(|b| format!(", peak memory +{:.0} MiB", b as f64 / 1048576.0))
                            .unwrap_or_default()
                    );
                }
                for r in &scaling {
                    outln!(
                        "{} device(s) together: {:.1} images/s (efficiency {:.0}%), per device {:?}",
                        r.devices.len(),
                        r.images_per_s,
                        r.efficiency * 100.0,
                        r.per_device.iter().map(|v| (v * 10.0).round() / 10.0).collect::<Vec<_>>()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
