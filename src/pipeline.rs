//! Threads and channels wiring the stages: source → decode → engine workers → writer.
//!
//! ```text
//! source thread ──Vec<Sample>──▶ decode thread (rayon pool) ──WorkBatch──▶ worker per replica
//!                                      │ failed samples                      │ rows (stats on the pool)
//!                                      └──────────────Vec<Row>──────────────▶ writer (this thread)
//! ```
//! Every channel is bounded, so memory stays bounded whatever the dataset size and a slow stage
//! back-pressures the others. Workers pull from one shared queue: a faster device takes more.
//! Every sample leaves the pipeline as exactly one row: failures are rows with a status.

use crate::decode::{self, Preprocess};
use crate::engine::batch::{panic_message, Attributor, MapOut, SampleMaps, U8Batch};
use crate::exit::RunFailed;
use crate::sample::{Sample, SampleError, Status};
use crate::sink::{CamMap, PartWriter, Row, ShardLock, ShardSummary, SinkConfig};
use crate::stats::{self, Region};
use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which class each sample is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetMode {
    /// The sample's label (a sample without one gets a `bad_label` row).
    Label,
    /// The model's predicted class.
    Predicted,
    /// One class for every sample.
    Class(i64),
}

/// Everything the pipeline needs besides the samples and the model replicas.
pub struct PipelineConfig {
    pub preprocess: Preprocess,
    pub target: TargetMode,
    pub batch_size: usize,
    /// Threads of the decode/statistics pool (0 = all cores).
    pub decode_threads: usize,
    pub map_size: u32,
    pub regions: Vec<Region>,
    pub sink: SinkConfig,
    /// Identifies the job's output (job, model, samples); a folder holding another job's parts is refused.
    pub fingerprint: String,
    /// A sample whose image or mask the object store fails to give (after its retries) gets its
    /// failed row (`unreadable`, `bad_mask`) instead of stopping the run for a rerun to read it.
    pub store_failures_as_rows: bool,
    /// The shard's lock when the caller took it already (before loading the models); else the
    /// writer takes it.
    pub shard_lock: Option<Arc<ShardLock>>,
}

/// Live counters, for the progress bar and the summary.
#[derive(Default)]
pub struct Progress {
    pub rows: AtomicU64,
    pub failed: AtomicU64,
}

/// How many of a run's failed rows its summary names.
pub const FAILED_EXAMPLES: usize = 3;

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Rows per status written by this run (committed parts from an earlier run excluded).
    pub counts: BTreeMap<Status, u64>,
    /// Rows already committed by an earlier run of the same job (resume).
    pub resumed_rows: u64,
    /// Of the pending samples, those whose committed failed rows are redone (`--retry-failed`).
    pub redone_rows: u64,
    /// Samples this run had to process.
    pub pending: u64,
    pub elapsed: Duration,
    /// Busy time per stage: the wall time of its work, summed over the threads that run the
    /// stage (decode: the decode thread, while the pool decodes its batches in parallel; engine
    /// and statistics: summed over the workers, the statistics on the shared pool; write: the
    /// writer). A measure of where a run waits, not CPU time.
    pub decode_time: Duration,
    pub engine_time: Duration,
    pub stats_time: Duration,
    pub write_time: Duration,
    /// Stopped by a signal before the end: complete parts are committed, the rest is left for a rerun.
    pub interrupted: bool,
    /// Time the workers spent warming up before the pipeline started (not in `elapsed`).
    pub warmup_time: Duration,
    /// Samples per batch (the job's, or the one `auto` found).
    pub batch_size: usize,
    /// Model replicas (workers) that ran.
    pub workers: usize,
    /// Of those, the workers that computed statistics on their device.
    pub stats_on_device: usize,
    /// This run's first failed rows (at most [`FAILED_EXAMPLES`]), in the order written: the
    /// sample's path and status.
    pub failed_examples: Vec<(String, Status)>,
    /// The smallest batch a worker kept to after running out of memory (`None`: none did).
    pub batch_after_out_of_memory: Option<usize>,
    pub shard: Option<ShardSummary>,
}

impl RunSummary {
    pub fn failed(&self) -> u64 {
        self.counts.iter().filter(|(s, _)| **s != Status::Ok).map(|(_, n)| n).sum()
    }
    pub fn processed(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// Why a sample's results cannot be trusted: the model's probabilities, or the attribution (its
/// map, as the engine returned it whole or resized, or its CAM), hold NaN or infinities. The
/// statistics would count such values as 0 and look like a real, empty attribution.
fn non_finite(m: &SampleMaps) -> Option<&'static str> {
    if !(m.predicted_prob.is_finite() && m.target_prob.is_finite()) {
        return Some("the model's output for this image is not finite (NaN or infinite logits)");
    }
    let map = match &m.map {
        MapOut::Full(v) => v,
        MapOut::Reduced { resized, .. } => resized,
    };
    if !map.iter().chain(&m.cam).all(|v| v.is_finite()) {
        return Some("the attribution holds NaN or infinite values (the model's gradients overflow or are undefined for this image)");
    }
    None
}

/// A decoded sample waiting for the engine (its pixels, box and mask go in the batch).
struct Ready {
    sample: Sample,
    target: Option<i64>,
}

/// What decoding gives the engine for one sample: model-input pixels, box and mask.
struct Decoded {
    rgb: Vec<u8>,
    bbox: Option<[f32; 4]>,
    mask: Option<Vec<u8>>,
}

/// A batch for a worker: the samples and their pixels (with boxes and masks).
struct WorkBatch {
    items: Vec<Ready>,
    pixels: U8Batch,
}

#[derive(Default)]
struct StageTimes {
    decode_ns: AtomicU64,
    engine_ns: AtomicU64,
    stats_ns: AtomicU64,
}

fn add(t: &AtomicU64, since: Instant) {
    t.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Runs the pipeline over `samples` (a shard's, in order) with one worker per attributor.
/// `stop` is checked between batches (Ctrl-C). Returns when every pending sample has a row, or
/// after a stop, with complete parts committed.
pub fn run(
    cfg: PipelineConfig,
    samples: Vec<Sample>,
    attributors: Vec<Box<dyn Attributor>>,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    on_start: impl FnOnce(u64, u64),
) -> Result<RunSummary> {
    let start = Instant::now();
    anyhow::ensure!(!attributors.is_empty(), "no model replica to run");
    anyhow::ensure!(cfg.batch_size > 0, "batch size must be at least 1");
    let size = cfg
        .preprocess
        .output_size()
        .context("preprocessing needs a crop or an exact resize, so that every image of a batch has one size")?;
    let (mut writer, resume) = match cfg.shard_lock.clone() {
        Some(lock) => PartWriter::open_locked(cfg.sink.clone(), &cfg.fingerprint, lock)?,
        None => PartWriter::open_or_stop(cfg.sink.clone(), &cfg.fingerprint, &stop)?,
    };
    let pending: Vec<Sample> = samples.into_iter().filter(|s| !resume.is_done(s.index)).collect();
    let mut summary = RunSummary {
        resumed_rows: resume.done_rows,
        redone_rows: resume.redone_rows,
        pending: pending.len() as u64,
        ..Default::default()
    };
    let (pending_len, resumed_rows) = (pending.len() as u64, resume.done_rows);

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.decode_threads)
        .thread_name(|i| format!("decode-{i}"))
        .build()
        .context("starting the decode thread pool")?;
    let workers = attributors.len();
    let (batch_tx, batch_rx) = bounded::<Vec<Sample>>(2);
    let (work_tx, work_rx) = bounded::<WorkBatch>(2 * workers);
    let (row_tx, row_rx) = bounded::<Vec<Row>>(4 * workers + 4);
    let times = StageTimes::default();
    let cfg = &cfg;
    // Why the run stopped early, when a stage stopped it: a failing device or store.
    let run_failure: RunFailure = std::sync::Mutex::new(None);
    let smallest_cap = std::sync::atomic::AtomicUsize::new(cfg.batch_size);
    let (pool, times, stop_ref, run_failure, smallest_cap) = (&pool, &times, &stop, &run_failure, &smallest_cap);

    // Each worker first warms its replica up on its own thread (`Attributor::warm_up_thread`)
    // with the shape of the batches to come; the source and the decode stage start once all
    // have, and that time is the run's warm-up, not part of `elapsed`.
    let warm = (
        cfg.batch_size.min(pending.len()),
        pending.iter().any(|s| s.bbox.is_some()),
        pending.iter().any(|s| s.mask.is_some()),
    );
    // Each worker says when it is warm (a channel, not a barrier: a worker that ends without
    // saying so drops its sender, which ends the wait instead of hanging it).
    let (warm_tx, warm_rx) = bounded::<bool>(workers);
    let mut warmup_time = Duration::ZERO;

    let write_result = std::thread::scope(|s| -> Result<()> {
        // Owned by this closure, so that a panic of the writer below drops the receiver and the
        // stages' sends fail instead of blocking the scope's join forever.
        let row_rx = row_rx;
        let warm_start = Instant::now();
        // One worker per model replica.
        for mut attributor in attributors {
            let (work_rx, row_tx, warm_tx) = (work_rx.clone(), row_tx.clone(), warm_tx.clone());
            s.spawn(move || {
                let _ = warm_tx.send(warm_up_worker(attributor.as_mut(), warm, (size.0 as usize, size.1 as usize)));
                drop(warm_tx);
                // The largest batch known to fit this worker's device (see `attribute_split`);
                // after RETRY_FULL_BATCHES_AFTER batches at a lowered size, the full size is
                // tried again (the memory may have been another worker's passing peak).
                let mut cap = cfg.batch_size;
                let (mut lowest, mut at_cap, mut panics_in_a_row) = (cap, 0usize, 0usize);
                for batch in work_rx {
                    let before = cap;
                    let items = batch.items.iter().map(|r| (r.sample.clone(), r.target)).collect();
                    let (rows, panicked) = rows_or_internal_error(items, || {
                        attribute_batch(cfg, pool, times, attributor.as_mut(), &mut cap, batch)
                    });
                    panics_in_a_row = if panicked { panics_in_a_row + 1 } else { 0 };
                    let rows = match rows {
                        // The same bug on every batch: stop rather than fill every row with it.
                        Ok(_) if panics_in_a_row >= PANICS_BEFORE_STOP => Err(anyhow::anyhow!(
                            "internal error on {panics_in_a_row} batches in a row on {} (a bug; please report \
                             it): stopping; the last batch's samples get no rows (a rerun does them), the \
                             earlier ones' rows say `internal error` (`run --retry-failed` redoes them)",
                            attributor.name()
                        )),
                        rows => rows,
                    };
                    lowest = lowest.min(cap);
                    if cap < before {
                        at_cap = 0;
                    } else if cap < cfg.batch_size {
                        at_cap += 1;
                        if at_cap >= RETRY_FULL_BATCHES_AFTER {
                            tracing::info!(worker = %attributor.name(), "trying batches of {} again", cfg.batch_size);
                            (cap, at_cap) = (cfg.batch_size, 0);
                        }
                    }
                    match rows {
                        Ok(rows) => {
                            if row_tx.send(rows).is_err() {
                                break;
                            }
                        }
                        // The device is failing: this batch gets no rows (a rerun does it), the
                        // run stops as on Ctrl-C and then reports this error.
                        Err(e) => {
                            fail_run(run_failure, stop_ref, e);
                            break;
                        }
                    }
                }
                smallest_cap.fetch_min(lowest, Ordering::Relaxed);
            });
        }
        // The clock (and the progress bar) starts once every worker has warmed up.
        drop(warm_tx);
        let warmed = warm_rx.iter().take(workers).filter(|w| *w).count();
        warmup_time = warm_start.elapsed();
        if warmed > 0 {
            tracing::info!(batch_size = warm.0, workers, secs = warmup_time.as_secs_f64(), "warmed up");
        }
        on_start(pending_len, resumed_rows);
        // Source: pending samples in order, in batches.
        s.spawn(move || {
            for chunk in pending.chunks(cfg.batch_size) {
                if stop_ref.load(Ordering::Relaxed) || batch_tx.send(chunk.to_vec()).is_err() {
                    break;
                }
            }
        });
        // Decode: a batch at a time on the pool; failures go straight to the writer as rows.
        {
            let row_tx = row_tx.clone();
            s.spawn(move || decode_stage(cfg, size, pool, times, batch_rx, work_tx, row_tx, (stop_ref, run_failure)));
        }
        drop(row_tx);
        drop(work_rx);
        // The single writer.
        let mut result = Ok(());
        for rows in row_rx.iter() {
            if result.is_err() {
                continue; // drain so no stage blocks; the error is returned below
            }
            let t = Instant::now();
            for row in rows {
                let st = row.status;
                *summary.counts.entry(st).or_insert(0) += 1;
                progress.rows.fetch_add(1, Ordering::Relaxed);
                if st != Status::Ok {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    if summary.failed_examples.len() < FAILED_EXAMPLES {
                        summary.failed_examples.push((row.sample.path.clone(), st));
                    }
                }
                if let Err(e) = writer.push(row) {
                    stop_ref.store(true, Ordering::Relaxed);
                    result = Err(RunFailed(e).into());
                    break;
                }
            }
            summary.write_time += t.elapsed();
        }
        result
    });
    if let Err(e) = write_result {
        // The part being written is given up (its rows are redone by a rerun); the error is
        // the write's, not the abort's.
        let _ = writer.abort();
        return Err(e);
    }
    let interrupted = stop.load(Ordering::Relaxed) && summary.processed() < summary.pending;
    let t = Instant::now();
    summary.shard = Some(if interrupted {
        // Rows of unfinished parts are dropped (a rerun redoes them): they do not count.
        for (status, n) in writer.buffered_status_counts() {
            if let Some(c) = summary.counts.get_mut(&status) {
                *c = c.saturating_sub(n);
            }
        }
        summary.counts.retain(|_, c| *c > 0);
        writer.abort().map_err(RunFailed)?
    } else {
        // A folder that holds another job's files stays exit 2 inside RunFailed (exit::retryable).
        writer.finish().map_err(RunFailed)?
    });
    summary.write_time += t.elapsed();
    summary.interrupted = interrupted;
    let cap = smallest_cap.load(Ordering::Relaxed);
    summary.batch_after_out_of_memory = (cap < cfg.batch_size).then_some(cap);
    if let Some(e) = run_failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(RunFailed(e).into());
    }
    summary.decode_time = Duration::from_nanos(times.decode_ns.load(Ordering::Relaxed));
    summary.engine_time = Duration::from_nanos(times.engine_ns.load(Ordering::Relaxed));
    summary.stats_time = Duration::from_nanos(times.stats_ns.load(Ordering::Relaxed));
    summary.elapsed = start.elapsed().saturating_sub(warmup_time);
    summary.warmup_time = warmup_time;
    Ok(summary)
}

/// A worker's warm-up on its own thread: `(n, boxes, masks)` of the batches to come (none when
/// `n` is 0: nothing pending). A failure, or a panic, is only a warning: failing batches are
/// split and retried. Returns whether the replica warmed up.
fn warm_up_worker(
    attributor: &mut dyn Attributor,
    (n, boxes, masks): (usize, bool, bool),
    (h, w): (usize, usize),
) -> bool {
    if n == 0 {
        return false;
    }
    let name = attributor.name();
    let warned = |e: &dyn std::fmt::Display| tracing::warn!(worker = %name, "warm-up with a batch of {n} failed ({e}); failing batches will be split and retried");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attributor.warm_up_thread(n, h, w, boxes, masks))) {
        Ok(Ok(warmed)) => warmed,
        Ok(Err(e)) => {
            warned(&format!("{e:#}"));
            false
        }
        Err(p) => {
            warned(&format!("internal error: {}", panic_message(p.as_ref())));
            false
        }
    }
}

fn failed_row(sample: Sample, target: Option<i64>, err: SampleError) -> Row {
    Row {
        sample,
        status: err.status,
        error: Some(err.message),
        target,
        predicted: None,
        predicted_prob: None,
        target_prob: None,
        stats: None,
        cam: None,
        map: None,
    }
}

/// The class a sample is attributed to (`Ok(None)` = predicted), or its bad_label error.
fn resolve_target(mode: TargetMode, s: &Sample) -> Result<Option<i64>, SampleError> {
    if let Some(e) = &s.label_error {
        return Err(SampleError::new(Status::BadLabel, e.clone()));
    }
    if let Some(e) = &s.box_error {
        return Err(SampleError::new(Status::BadBox, e.clone()));
    }
    match mode {
        TargetMode::Predicted => Ok(None),
        TargetMode::Class(c) => Ok(Some(c)),
        TargetMode::Label => match s.label {
            Some(l) => Ok(Some(l)),
            None => Err(SampleError::new(
                Status::BadLabel,
                format!("{}: no label, and the job's target is \"label\"", s.path),
            )),
        },
    }
}

/// A decoded sample and its pixels, or the row of its failure (`transient`: a store's failure,
/// see [`SampleError::transient`]).
type Prepared = Result<(Ready, Decoded), (Box<Row>, bool)>;

fn prepare(cfg: &PipelineConfig, s: Sample) -> Prepared {
    let failure = |s, target, e: SampleError| {
        let transient = e.transient;
        Err((Box::new(failed_row(s, target, e)), transient))
    };
    let target = match resolve_target(cfg.target, &s) {
        Ok(t) => t,
        Err(e) => return failure(s, None, e),
    };
    let decoded = match decode::decode_file(&s.location, &cfg.preprocess) {
        Ok(d) => d,
        Err(e) => return failure(s, target, e),
    };
    // A box wholly outside the crop keeps a share (0): the object is not in view.
    let bbox = s.bbox.map(|b| decoded.geometry.map_box(b).unwrap_or([0.0; 4]));
    let mask = match &s.mask {
        Some(p) => match decode::load_mask(p, &decoded.geometry) {
            Ok(m) => Some(m),
            Err(e) => return failure(s, target, e),
        },
        None => None,
    };
    Ok((Ready { sample: s, target }, Decoded { rgb: decoded.rgb, bbox, mask }))
}

/// [`prepare`]'s result for `s`, checked: a panic in it (a bug: the image decoders' own panics
/// are caught in `decode`) or pixels or a mask of another size than the model input's (`h × w`)
/// give the sample a `decode_error` row ("internal error") instead of ending the run or
/// shifting the batch's other images.
fn prepare_checked(
    s: Sample,
    target: TargetMode,
    (h, w): (usize, usize),
    prep: impl FnOnce(Sample) -> Prepared,
) -> Prepared {
    let keep = s.clone();
    let internal = |why: String| {
        tracing::error!("internal error on sample {:?} (a bug; please report it): {why}", keep.id);
        let target = resolve_target(target, &keep).ok().flatten();
        let err = SampleError::new(Status::DecodeError, format!("{}: internal error: {why}", keep.path));
        Err((Box::new(failed_row(keep.clone(), target, err)), false))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prep(s))) {
        Err(p) => internal(panic_message(p.as_ref()).to_owned()),
        Ok(Ok((_, d))) if d.rgb.len() != h * w * 3 => {
            internal(format!("decoded {} bytes for a {h}×{w} RGB input ({} bytes)", d.rgb.len(), h * w * 3))
        }
        Ok(Ok((_, d))) if d.mask.as_ref().is_some_and(|m| m.len() != h * w) => {
            internal(format!("a mask of {} values for a {h}×{w} input", d.mask.map_or(0, |m| m.len())))
        }
        Ok(r) => r,
    }
}

/// Where a stage that stops the run leaves its error (the first one wins).
type RunFailure = std::sync::Mutex<Option<anyhow::Error>>;

/// Records `e` as the reason the run stops, and stops it as Ctrl-C does.
fn fail_run(failure: &RunFailure, stop: &AtomicBool, e: anyhow::Error) {
    tracing::error!("{e:#}");
    stop.store(true, Ordering::Relaxed);
    failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
}

#[allow(clippy::too_many_arguments)]
fn decode_stage(
    cfg: &PipelineConfig,
    (h, w): (u32, u32),
    pool: &rayon::ThreadPool,
    times: &StageTimes,
    batch_rx: Receiver<Vec<Sample>>,
    work_tx: Sender<WorkBatch>,
    row_tx: Sender<Vec<Row>>,
    (stop, failure): (&AtomicBool, &RunFailure),
) {
    let px = h as usize * w as usize * 3;
    let mut ready: Vec<Ready> = Vec::with_capacity(cfg.batch_size);
    let new_batch = || U8Batch {
        h: h as usize,
        w: w as usize,
        data: Vec::with_capacity(cfg.batch_size * px),
        ..U8Batch::default()
    };
    let mut pixels = new_batch();
    let flush = |ready: &mut Vec<Ready>, pixels: &mut U8Batch| -> bool {
        if ready.is_empty() {
            return true;
        }
        let items = std::mem::take(ready);
        let mut pixels = std::mem::replace(pixels, new_batch());
        pixels.n = items.len();
        pixels.targets = items.iter().map(|r| r.target).collect();
        work_tx.send(WorkBatch { items, pixels }).is_ok()
    };
    for batch in batch_rx {
        let t = Instant::now();
        let results: Vec<Prepared> = pool.install(|| {
            let size = (h as usize, w as usize);
            batch.into_par_iter().map(|s| prepare_checked(s, cfg.target, size, |s| prepare(cfg, s))).collect()
        });
        add(&times.decode_ns, t);
        let mut failed = Vec::new();
        let mut store_failed = false;
        for r in results {
            match r {
                Ok((item, d)) => {
                    pixels.data.extend_from_slice(&d.rgb);
                    pixels.boxes.push(d.bbox);
                    pixels.masks.push(d.mask);
                    ready.push(item);
                    if ready.len() == cfg.batch_size && !flush(&mut ready, &mut pixels) {
                        return;
                    }
                }
                // The store failed, not the file: no row (a rerun reads it); the run stops. Unless
                // asked to give such samples their rows (a store that keeps failing on them).
                Err((row, true)) if cfg.store_failures_as_rows => failed.push(*row),
                Err((row, true)) if store_failed => drop(row),
                Err((row, true)) => {
                    store_failed = true;
                    let msg = row.error.unwrap_or_default();
                    fail_run(
                        failure,
                        stop,
                        anyhow::anyhow!(
                            "sample {:?}: {msg}; stopping: the object store failed (committed parts are kept, \
                             rerun to resume)",
                            row.sample.id
                        ),
                    );
                }
                Err((row, false)) => failed.push(*row),
            }
        }
        if !failed.is_empty() && row_tx.send(failed).is_err() {
            return;
        }
        if store_failed {
            // The samples decoded before it still go to the engine; later ones wait for the rerun.
            flush(&mut ready, &mut pixels);
            return;
        }
    }
    flush(&mut ready, &mut pixels);
}

/// Attributes a batch; a failing batch is split and retried (out of device memory, one bad
/// sample), down to single samples, which get an `attribution_error` row. Nothing is lost.
///
/// `cap` is the worker's largest batch known to fit: later batches go in pieces of at most `cap`
/// instead of failing and being split again. A batch that runs out of memory lowers it once, to
/// the larger half, and when the batch is done, to the largest piece of it that ran, if smaller
/// (a failure for any other reason leaves it as it is; the worker tries the full size again
/// after [`RETRY_FULL_BATCHES_AFTER`] batches). Lowered once per batch, not at every level of
/// the split: with two workers on a device, one's halves can each meet the other's peak and
/// fail down to single images while a size far above that fits a moment later, as the batch's
/// later pieces show.
///
/// A single sample that fails is followed by a health check of the replica (out of memory: a
/// second one after a longer pause); if that fails too, the device is failing (a sticky CUDA
/// error, memory taken by another process), and the error ends the run (`Err`) instead of
/// filling every remaining sample's row with it. A sample that ran out of memory gets one more
/// try after a passing check: the memory was another worker's for a moment.
/// `paths` names the batch's samples in messages.
fn attribute_split(
    attr: &mut dyn Attributor,
    batch: &U8Batch,
    paths: &[&str],
    cap: &mut usize,
) -> Result<Vec<Result<SampleMaps, String>>> {
    let mut fit = Fit { cap: *cap, lowered: false, largest_ok: 0 };
    let out = split_and_retry(attr, batch, paths, 0, &mut fit)?;
    if fit.lowered && fit.largest_ok > 0 {
        fit.cap = fit.cap.min(fit.largest_ok);
    }
    if fit.cap < *cap {
        tracing::warn!(
            worker = %attr.name(),
            "out of memory: from now on this worker attributes at most {} images at a time",
            fit.cap
        );
        *cap = fit.cap;
    }
    Ok(out)
}

/// What splitting one batch has learnt about the device's memory ([`attribute_split`]).
struct Fit {
    /// Pieces are at most this large.
    cap: usize,
    /// Whether running out of memory has lowered `cap` during this batch already.
    lowered: bool,
    /// The largest piece that ran.
    largest_ok: usize,
}

impl Fit {
    /// The results of a piece that ran, noted in `largest_ok`.
    fn ran(&mut self, maps: Vec<SampleMaps>) -> Vec<Result<SampleMaps, String>> {
        self.largest_ok = self.largest_ok.max(maps.len());
        maps.into_iter().map(Ok).collect()
    }
}

/// `batch` is `paths[first..first + batch.n]`'s pixels.
fn split_and_retry(
    attr: &mut dyn Attributor,
    batch: &U8Batch,
    paths: &[&str],
    first: usize,
    fit: &mut Fit,
) -> Result<Vec<Result<SampleMaps, String>>> {
    if batch.n > fit.cap {
        let mut out = Vec::with_capacity(batch.n);
        let mut start = 0;
        while start < batch.n {
            let len = fit.cap.min(batch.n - start);
            out.extend(split_and_retry(attr, &batch.slice(start, len), paths, first + start, fit)?);
            start += len;
        }
        return Ok(out);
    }
    Ok(match attr.attribute(batch) {
        Ok(maps) if maps.len() == batch.n => fit.ran(maps),
        Ok(maps) => vec![Err(format!("the engine returned {} results for {} images", maps.len(), batch.n)); batch.n],
        Err(e) if batch.n == 1 => {
            // One image out of memory: another worker on the same device may hold the memory for
            // a moment (its own batch at its peak), so the image gets one more try first.
            let e = if is_out_of_memory(&e) {
                std::thread::sleep(OUT_OF_MEMORY_PAUSE);
                match attr.attribute(batch) {
                    Ok(maps) if maps.len() == 1 => return Ok(fit.ran(maps)),
                    Ok(_) => e,
                    Err(again) => again,
                }
            } else {
                e
            };
            let mut health = attr.check_health(batch.h, batch.w);
            if health.as_ref().is_err_and(is_out_of_memory) {
                // Out of memory even for the check: another worker's batch may still hold the
                // memory, so a longer pause and one more check before the device counts as failing.
                std::thread::sleep(OUT_OF_MEMORY_PAUSE * 5);
                health = attr.check_health(batch.h, batch.w);
            }
            if let Err(health) = health {
                return Err(health.context(format!(
                    "worker {}: sample {} failed ({e:#}), and so did a health check on a \
                     mid-grey image: the device is failing; stopping (committed parts are kept, rerun to \
                     resume)",
                    attr.name(),
                    paths.get(first).unwrap_or(&"?")
                )));
            }
            // The check ran: memory is free again, so an image that only ran out of it gets one
            // last try (the error row would otherwise wait for `--retry-failed`).
            if is_out_of_memory(&e) {
                if let Ok(maps) = attr.attribute(batch) {
                    if maps.len() == 1 {
                        return Ok(fit.ran(maps));
                    }
                }
            }
            vec![Err(format!("{e:#}"))]
        }
        Err(e) => {
            let half = batch.n / 2;
            tracing::warn!(
                worker = %attr.name(),
                "batch of {} ({} to {}) failed, splitting and retrying: {e:#}",
                batch.n,
                paths.get(first).unwrap_or(&"?"),
                paths.get(first + batch.n - 1).unwrap_or(&"?")
            );
            if is_out_of_memory(&e) && !fit.lowered && batch.n - half < fit.cap {
                fit.cap = batch.n - half;
                fit.lowered = true;
            }
            let mut out = split_and_retry(attr, &batch.slice(0, half), paths, first, fit)?;
            out.extend(split_and_retry(attr, &batch.slice(half, batch.n - half), paths, first + half, fit)?);
            out
        }
    })
}

/// How long a worker waits before it tries a single image that ran out of memory once more.
const OUT_OF_MEMORY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// Batches a worker runs at a size lowered by running out of memory before it tries the full
/// size again: a failed try costs one batch's partial work in this many.
pub const RETRY_FULL_BATCHES_AFTER: usize = 64;

/// Whether an engine error means the device (or host) ran out of memory, so that a smaller batch
/// would fit ([`crate::engine::out_of_memory`]).
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    crate::engine::out_of_memory(&format!("{e:#}"))
}

/// Batches in a row on one worker that panic before the run stops ([`rows_or_internal_error`]).
const PANICS_BEFORE_STOP: usize = 3;

/// `attribute()`'s rows, with a panic in it (a bug: libtorch's own failures are caught in the
/// engine) turned into an `attribution_error` row for each of `items` (the batch's samples and
/// targets), so that no sample goes missing and the other batches go on; and whether it
/// panicked (a bug that every batch meets stops the run after [`PANICS_BEFORE_STOP`]).
fn rows_or_internal_error(
    items: Vec<(Sample, Option<i64>)>,
    attribute: impl FnOnce() -> Result<Vec<Row>>,
) -> (Result<Vec<Row>>, bool) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(attribute)) {
        Ok(rows) => (rows, false),
        Err(p) => {
            let msg = panic_message(p.as_ref());
            tracing::error!("internal error on a batch of {} samples (a bug; please report it): {msg}", items.len());
            let rows = items
                .into_iter()
                .map(|(sample, target)| {
                    let err =
                        SampleError::new(Status::AttributionError, format!("{}: internal error: {msg}", sample.path));
                    failed_row(sample, target, err)
                })
                .collect();
            (Ok(rows), true)
        }
    }
}

fn attribute_batch(
    cfg: &PipelineConfig,
    pool: &rayon::ThreadPool,
    times: &StageTimes,
    attr: &mut dyn Attributor,
    cap: &mut usize,
    batch: WorkBatch,
) -> Result<Vec<Row>> {
    let t = Instant::now();
    let paths: Vec<&str> = batch.items.iter().map(|r| r.sample.path.as_str()).collect();
    let results = attribute_split(attr, &batch.pixels, &paths, cap)?;
    add(&times.engine_ns, t);
    let t = Instant::now();
    let px = &batch.pixels;
    let (h, w) = (px.h, px.w);
    let rows = pool.install(|| {
        batch
            .items
            .into_par_iter()
            .zip(results)
            .enumerate()
            .map(|(i, (item, res))| match res.and_then(|m| non_finite(&m).map_or(Ok(m), |e| Err(e.to_owned()))) {
                Err(msg) => {
                    // Named as a decode error names its file.
                    let msg = format!("{}: {msg}", item.sample.path);
                    failed_row(item.sample, item.target, SampleError::new(Status::AttributionError, msg))
                }
                Ok(m) => {
                    // The whole map is reduced here; a reduced one only needs finishing.
                    let host_sums;
                    let (sums, map) = match &m.map {
                        MapOut::Full(map) => {
                            host_sums = stats::map_sums(map, h, w, px.bbox(i), px.mask(i), &cfg.regions);
                            (&host_sums, stats::encode_map_png(map, h, w, cfg.map_size))
                        }
                        MapOut::Reduced { sums, resized } => {
                            (sums, stats::encode_resized_map_png(resized, cfg.map_size.max(1)))
                        }
                    };
                    let st = stats::finish(sums, h, w, &m.cam, m.cam_h, m.cam_w);
                    Row {
                        sample: item.sample,
                        status: Status::Ok,
                        error: None,
                        target: Some(m.target),
                        predicted: Some(m.predicted),
                        predicted_prob: Some(m.predicted_prob),
                        target_prob: Some(m.target_prob),
                        stats: Some(st),
                        cam: Some(CamMap {
                            f16_le: stats::encode_cam_f16(&m.cam),
                            h: m.cam_h as u32,
                            w: m.cam_w as u32,
                        }),
                        map: Some(map),
                    }
                }
            })
            .collect()
    });
    add(&times.stats_ns, t);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Loc;

    fn sample() -> Sample {
        Sample {
            index: 3,
            id: "a.jpg".into(),
            path: "a.jpg".into(),
            location: Loc::from(std::path::PathBuf::from("a.jpg")),
            label: Some(2),
            label_error: None,
            bbox: None,
            box_error: None,
            mask: None,
        }
    }

    fn decoded(s: Sample, rgb: usize, mask: Option<usize>) -> Prepared {
        let d = Decoded { rgb: vec![0; rgb], bbox: None, mask: mask.map(|n| vec![1; n]) };
        Ok((Ready { sample: s, target: Some(2) }, d))
    }

    /// A bug in the decode stage's own code (a panic, pixels or a mask of the wrong size) gives
    /// the sample a `decode_error` row; it neither ends the run nor shifts the batch's pixels.
    #[test]
    fn a_failing_prepare_gives_the_sample_a_row() {
        let size = (4, 5);
        let ok = prepare_checked(sample(), TargetMode::Label, size, |s| decoded(s, 60, Some(20)));
        assert!(ok.is_ok_and(|(r, d)| r.sample.id == "a.jpg" && d.rgb.len() == 60));
        type Prep = Box<dyn FnOnce(Sample) -> Prepared>;
        let cases: [(&str, Prep); 3] = [
            ("boom", Box::new(|_| panic!("boom"))),
            ("decoded 61 bytes for a 4×5 RGB input", Box::new(|s| decoded(s, 61, None))),
            ("a mask of 19 values", Box::new(|s| decoded(s, 60, Some(19)))),
        ];
        for (why, prep) in cases {
            let Err((row, transient)) = prepare_checked(sample(), TargetMode::Label, size, prep) else {
                panic!("{why}: no failed row")
            };
            assert!(!transient);
            assert_eq!((row.sample.index, row.status, row.target), (3, Status::DecodeError, Some(2)));
            let msg = row.error.unwrap();
            assert!(msg.starts_with(&format!("{}: internal error: ", row.sample.path)) && msg.contains(why), "{msg}");
        }
    }
}
