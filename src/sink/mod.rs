//! The output stage: the only place saliency-audit writes output files.
//!
//! A shard's samples are split into chunks of `rows_per_part` consecutive indices; chunk k covers
//! indices `[k·R, min((k+1)·R, n))`. [`PartWriter`] takes rows in any order, buffers them per
//! chunk, and commits a chunk as one Parquet part (`part-<shard>-of-<count>-<chunk>.parquet`) as
//! soon as all its rows are in, sorted by index. Every file lands atomically (temporary name in
//! the same folder, fsync, rename, folder fsync), so a crash leaves either a whole part or none.
//!
//! Reopening a folder resumes: committed parts are checked (schema, row count, indices) and their
//! chunks are skipped; anything else is redone. A shard that has all its rows gets a
//! `_SUCCESS-<shard>-of-<count>.json`; [`finalize`] checks all shards and writes `_SUCCESS`.
//!
//! In a local folder the writer holds an exclusive lock on `.lock-<shard>-of-<count>` (a
//! [`ShardLock`], which `run` takes before it loads its replicas and keeps until its summary is
//! written) at least for its life; a second process opening the same shard waits for it (see
//! `files::lock_shard`), so the clean-up of leftover temporary files and the resume check never
//! race another writer.

mod columns;
mod files;
mod read;
mod summary;

#[cfg(test)]
mod tests;

use crate::store::{self, Loc};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow::array::{Array, BooleanArray, UInt64Array};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::sample::{Sample, Status};
use crate::stats::{EncodedMap, MapStats};
use columns::Column;

mod extra;
pub use columns::region_column;
pub use extra::{write_file, write_table};
pub use files::{part_name, LockWaitInterrupted, OutputConflict};
pub use read::{for_each_batch, read_rows, Parts};
pub use summary::{
    finalize, remove_summary, warn_if_report_is_stale, write_summary, Coverage, DatasetSummary, ShardSummary,
    ShardsUnfinished,
};

/// Version of the output table layout; bump when a column is added, removed or changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// The footer key of a part that records the fingerprint of the job (and shard) that wrote it,
/// so that a part is matched to its job without the folder's `_job` file.
pub const FINGERPRINT_KEY: &str = "saliency_audit.fingerprint";

/// How many missing indices an error message lists before summarising the rest.
const MISSING_SHOWN: usize = 10;

/// Grad-CAM at layer resolution, stored as `h·w` float16 values, little-endian, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CamMap {
    /// `h·w·2` bytes.
    pub f16_le: Vec<u8>,
    /// Rows.
    pub h: u32,
    /// Columns.
    pub w: u32,
}

/// One output row: a sample, its status, and whatever attribution results it has.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The sample; `index` places the row, `id`, `path` and `label` are written.
    pub sample: Sample,
    /// `ok`, or the kind of failure.
    pub status: Status,
    /// The failure message (names the file), for rows that are not `ok`.
    pub error: Option<String>,
    /// The class the attribution explains.
    pub target: Option<i64>,
    /// The model's top class.
    pub predicted: Option<i64>,
    /// Probability of the predicted class.
    pub predicted_prob: Option<f32>,
    /// Probability of the target class.
    pub target_prob: Option<f32>,
    /// Map statistics; one region share per configured region.
    pub stats: Option<MapStats>,
    /// The Grad-CAM map.
    pub cam: Option<CamMap>,
    /// The guided Grad-CAM map as PNG.
    pub map: Option<EncodedMap>,
}

/// The Arrow schema of the output table for the given region names (in order).
pub fn schema(regions: &[String]) -> SchemaRef {
    columns::schema_of(&columns::columns(regions))
}

/// Where and what one shard writes.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    /// Output folder (created if missing) or object-store prefix; shared by all shards of the job.
    pub dir: Loc,
    /// This shard, `0..num_shards`.
    pub shard: u32,
    /// Number of shards of the job (at least 1).
    pub num_shards: u32,
    /// Number of samples in this shard (`n`).
    pub total_rows: u64,
    /// Rows per part file (`R`, at least 1).
    pub rows_per_part: u64,
    /// Region names; each gets a `region_<name>_share` column.
    pub regions: Vec<String>,
    /// Parquet key-value metadata written into every part (job spec, model hash, tool version,
    /// schema version, class names); filled by the caller.
    pub metadata: Vec<(String, String)>,
    /// The identity all shards of one output folder share (the caller's hash of model,
    /// settings, shard count and the whole dataset's sample list): a shard of another job, or
    /// of this job over a dataset that has changed since, is refused. Empty: not checked.
    pub job_id: String,
    /// Failure statuses whose committed rows are redone (`run --retry-failed`): their samples
    /// are attributed again, and each part that holds one is written again with the new rows,
    /// its other rows kept as they were. Empty: committed parts are kept whole.
    pub retry_statuses: BTreeSet<Status>,
}

impl SinkConfig {
    /// The indices `[start, end)` of chunk `chunk`.
    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        let start = chunk.saturating_mul(self.rows_per_part).min(self.total_rows);
        let end = start.saturating_add(self.rows_per_part).min(self.total_rows);
        (start, end)
    }
}

/// [`PartWriter::check_part`] for the shard `cfg` with the table `schema`, and for a remote part
/// the bytes read of the bytes it holds.
#[allow(clippy::type_complexity)]
fn check_committed(
    cfg: &SinkConfig,
    schema: &SchemaRef,
    fingerprint: &str,
    name: &str,
    chunk: u64,
) -> anyhow::Result<(anyhow::Result<read::PartContents>, Option<(u64, u64)>)> {
    let path = cfg.dir.join(name)?;
    let unreadable =
        || format!("cannot read committed part {path} to check it before resuming (nothing was moved or removed)");
    let file = read::open_part_ranged(&path).with_context(unreadable)?;
    let ranged = file.ranged();
    let checked = (|| {
        let num_chunks = cfg.total_rows.div_ceil(cfg.rows_per_part);
        if chunk >= num_chunks {
            bail!("chunk {chunk} is past this shard's {num_chunks} chunks");
        }
        let contents = read::read_part_contents(file, &path, schema, Some(fingerprint))?;
        let (start, end) = cfg.chunk_range(chunk);
        let expected = end - start;
        if contents.indices.len() as u64 != expected {
            bail!("it holds {} rows, chunk {chunk} has {expected}", contents.indices.len());
        }
        if !contents.indices.iter().copied().eq(start..end) {
            bail!("its indices are not {start}..{end} in order");
        }
        Ok(contents)
    })();
    // A store's error in the middle (a ranged read): the part may be fine, so stop.
    let mut bytes = None;
    if let Some(r) = ranged {
        if let Some(e) = r.failure() {
            return Err(anyhow::Error::new(e)).with_context(unreadable);
        }
        let (len, read) = r.bytes();
        bytes = Some((read, len));
    }
    // Another job's part (the folder's job file removed, or parts copied in), whatever its
    // layout: not this job's output to resume or to set aside.
    let checked = match checked {
        Err(e) if e.is::<OutputConflict>() => return Err(e),
        checked => checked,
    };
    Ok((checked, bytes))
}

/// What an output folder holds for one shard, read without changing anything (`validate`):
/// what a run of the same job would keep, and what it would do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardState {
    /// Why a run would refuse the folder (it holds another job's output for this shard).
    pub refused: Option<String>,
    /// Parts of this shard a run would keep.
    pub parts: u64,
    /// Parts the shard has in all.
    pub num_parts: u64,
    /// Rows in the parts kept.
    pub rows: u64,
    /// Those rows per status.
    pub status_counts: BTreeMap<Status, u64>,
    /// Parts a run would set aside and write again, with why.
    pub invalid: Vec<String>,
}

/// Reads [`ShardState`] of shard `cfg.shard` in `cfg.dir` for the job `fingerprint`, without
/// locking, creating, moving or removing anything. A folder that does not exist yet holds
/// nothing.
/// The key-value metadata (job spec, model sha256, …) that the first committed part of shard
/// `shard` of `num_shards` in `dir` records of the job that wrote it.
pub fn recorded_metadata(dir: &Loc, shard: u32, num_shards: u32) -> anyhow::Result<BTreeMap<String, String>> {
    let names: Vec<String> = files::list_names(dir)?
        .into_iter()
        .filter(|n| files::parse_part_name(n).is_some_and(|(s, c, _)| (s, c) == (shard, num_shards)))
        .collect();
    extra::metadata_of(dir, &names)
}

pub fn shard_state(cfg: &SinkConfig, fingerprint: &str) -> anyhow::Result<ShardState> {
    check_config(cfg)?;
    let mut state = ShardState { num_parts: cfg.total_rows.div_ceil(cfg.rows_per_part), ..Default::default() };
    if let Loc::Local(p) = &cfg.dir {
        if !p.exists() {
            return Ok(state);
        }
    }
    let names = files::list_names(&cfg.dir)?;
    let (shard, count) = (cfg.shard, cfg.num_shards);
    if let Some(refused) = folder_refusal(cfg, fingerprint, &names)? {
        state.refused = Some(format!("{refused:#}"));
        return Ok(state);
    }
    let schema = schema(&cfg.regions);
    for name in &names {
        let Some((s, c, chunk)) = files::parse_part_name(name) else {
            continue;
        };
        if (s, c) != (shard, count) {
            continue;
        }
        let checked = match check_committed(cfg, &schema, fingerprint, name, chunk) {
            Err(e) if e.is::<OutputConflict>() => {
                state.refused = Some(format!("{e:#}"));
                return Ok(state);
            }
            r => r?.0,
        };
        match checked {
            Ok(contents) => {
                state.parts += 1;
                state.rows += contents.indices.len() as u64;
                for st in contents.statuses {
                    *state.status_counts.entry(st).or_default() += 1;
                }
            }
            Err(e) => state.invalid.push(format!("{name}: {e:#}")),
        }
    }
    Ok(state)
}

/// The job file shard `cfg.shard` of the job `fingerprint` records.
fn job_file(cfg: &SinkConfig, fingerprint: &str) -> JobFile {
    JobFile {
        fingerprint: fingerprint.to_owned(),
        job_id: cfg.job_id.clone(),
        shard: cfg.shard,
        num_shards: cfg.num_shards,
        total_rows: cfg.total_rows,
        rows_per_part: cfg.rows_per_part,
        schema_version: SCHEMA_VERSION,
    }
}

/// Why shard `cfg.shard` of the job `fingerprint` may not write into the folder `cfg.dir`,
/// whose files are `names`: it holds files of another shard count ([`OutputConflict`]), another
/// job's output for this shard, or other shards of another job (`Some`, exit 2 from the CLI).
/// `Err`: a job file that cannot be read. Reads only, so `validate` says what `run` would do.
fn folder_refusal(cfg: &SinkConfig, fingerprint: &str, names: &[String]) -> anyhow::Result<Option<anyhow::Error>> {
    let (dir, shard, count) = (&cfg.dir, cfg.shard, cfg.num_shards);
    let refuse = |message: String| Ok(Some(anyhow::anyhow!(message)));
    // The other shards in the folder: split the same way, and of the same job.
    if let Some((name, s, c)) = files::other_shard_count(names, count) {
        return Ok(Some(
            OutputConflict(format!(
                "output folder {dir} holds shard {s} of {c} ({}), but this run is shard {shard} of \
                 {count}: all shards of one output folder share one shard count (for a Slurm array, \
                 set NUM_SHARDS); run with {c} shards or use another output folder",
                dir.join(name)?
            ))
            .into(),
        ));
    }
    let mut checked = 0;
    for name in names {
        let Some((s, c)) = files::parse_job_name(name) else {
            continue;
        };
        if s == shard || checked == OTHER_SHARDS_CHECKED || cfg.job_id.is_empty() {
            continue;
        }
        checked += 1;
        let path = dir.join(name)?;
        let other: JobFile = files::read_json(&path)?;
        if !other.job_id.is_empty() && other.job_id != cfg.job_id {
            return refuse(format!(
                "output folder {dir} holds shard {s} of {c} of another job ({path} records job {}, \
                 this run is job {}): the model, a setting or the dataset's sample list differs \
                 from when that shard ran; run every shard with one job spec over one dataset, or \
                 use another output folder",
                other.job_id, cfg.job_id
            ));
        }
    }
    let job = job_file(cfg, fingerprint);
    let job_name = files::job_name(shard, count);
    let job_path = dir.join(&job_name)?;
    if names.contains(&job_name) {
        let old: JobFile = files::read_json(&job_path)?;
        // The layout first: it says what differs, where the fingerprint (which covers it too)
        // only says that something does.
        if (old.shard, old.num_shards, old.total_rows, old.rows_per_part, old.schema_version)
            != (job.shard, job.num_shards, job.total_rows, job.rows_per_part, job.schema_version)
        {
            return refuse(format!(
                "output folder {} holds shard {shard} of {count} written with another \
                 layout ({} rows in parts of {} rows, schema {}; now {} rows in \
                 parts of {}, schema {}); use another output folder",
                dir,
                old.total_rows,
                old.rows_per_part,
                old.schema_version,
                job.total_rows,
                job.rows_per_part,
                job.schema_version
            ));
        }
        if old.fingerprint != job.fingerprint {
            return refuse(format!(
                "output folder {} holds another job's output for shard {shard} of {count} \
                 ({} records job {}, this job is {}; a job is its model, its samples as the manifest \
                 gives them (ids, paths, labels, boxes, masks), preprocessing and statistics \
                 settings, so a corrected manifest is another job); use another output folder",
                dir, job_path, old.fingerprint, job.fingerprint
            ));
        }
        if !old.job_id.is_empty() && !job.job_id.is_empty() && old.job_id != job.job_id {
            return refuse(format!(
                "output folder {} holds this shard's output, but the dataset's sample list has \
                 changed since ({} records job {}, this run is job {}): the other shards no longer \
                 match; rerun every shard into another output folder",
                dir, job_path, old.job_id, job.job_id
            ));
        }
    }
    Ok(None)
}

/// How many other shards' `_job` files an `open` reads to check the job id (a folder of
/// another job shows in every one of them); `finalize` reads them all.
const OTHER_SHARDS_CHECKED: usize = 16;

/// What an earlier run of the same job already committed for this shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Chunks whose part is committed and valid (and holds no row to redo).
    pub done_chunks: BTreeSet<u64>,
    /// Rows in those parts, and the rows kept from parts whose failed rows are redone: the rows
    /// a run does not produce again.
    pub done_rows: u64,
    /// Those rows per status name (every status listed, zeros included).
    pub done_status_counts: BTreeMap<String, u64>,
    /// Rows of [`SinkConfig::retry_statuses`] in committed parts, whose samples are redone.
    pub redone_rows: u64,
    /// Per chunk whose part is written again: the indices redone (its other rows are kept and
    /// counted in `done_rows`).
    redo: HashMap<u64, BTreeSet<u64>>,
    rows_per_part: u64,
    total_rows: u64,
}

impl Resume {
    /// Whether the sample with this index is already written (its chunk is committed, and its
    /// row is not one to redo); the pipeline skips such samples, and [`PartWriter::push`]
    /// refuses their rows.
    pub fn is_done(&self, index: u64) -> bool {
        let chunk = index / self.rows_per_part;
        index < self.total_rows
            && (self.done_chunks.contains(&chunk) || self.redo.get(&chunk).is_some_and(|r| !r.contains(&index)))
    }
}

/// The job file: which job a shard's output belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JobFile {
    fingerprint: String,
    /// [`SinkConfig::job_id`] (absent in folders written before it existed).
    #[serde(default)]
    job_id: String,
    shard: u32,
    num_shards: u32,
    total_rows: u64,
    rows_per_part: u64,
    schema_version: u32,
}

/// A chunk whose rows are still arriving; slot i holds index `start + i`.
struct Pending {
    slots: Vec<Option<Row>>,
    /// Slots filled, kept rows included.
    filled: usize,
    /// For a committed part whose failed rows are redone: the rows that stay.
    kept: Option<Kept>,
}

impl Pending {
    fn new(len: usize) -> Pending {
        Pending { slots: (0..len).map(|_| None).collect(), filled: 0, kept: None }
    }

    /// Whether slot `i` has its row (new, or kept from the committed part).
    fn has(&self, i: usize) -> bool {
        self.slots[i].is_some() || self.kept.as_ref().is_some_and(|k| k.stays[i])
    }

    /// The new rows (not the kept ones).
    fn new_rows(&self) -> impl Iterator<Item = &Row> {
        self.slots.iter().flatten()
    }
}

/// A committed part whose failed rows are redone: which of its rows stay. The rows themselves
/// are read from it only when the new part is written (the shard's lock keeps it as it is), so
/// a retry over many parts holds one part's maps at a time.
struct Kept {
    /// Per slot of the chunk: whether its row stays.
    stays: Vec<bool>,
    /// Rows that stay.
    rows: usize,
    /// Their counts per status name.
    counts: BTreeMap<String, u64>,
    /// The counts of the whole committed part (what stays committed if the run stops).
    part_counts: BTreeMap<String, u64>,
}

/// Writes one shard's rows as part files; see the module docs.
pub struct PartWriter {
    cfg: SinkConfig,
    columns: Vec<Column>,
    schema: SchemaRef,
    props: WriterProperties,
    num_chunks: u64,
    done: BTreeSet<u64>,
    pending: HashMap<u64, Pending>,
    rows: u64,
    status_counts: BTreeMap<String, u64>,
    closed: bool,
    /// This shard's lock (local folders), held at least for the writer's life.
    _lock: Arc<ShardLock>,
    /// The job's fingerprint, written into every part's footer and checked in those committed.
    fingerprint: String,
    /// Bytes read and bytes held by the remote parts checked at open (ranged reads).
    remote_check_bytes: std::sync::Mutex<(u64, u64)>,
}

/// Every status name with a zero count.
pub(crate) fn zero_counts() -> BTreeMap<String, u64> {
    Status::ALL.iter().map(|s| (s.as_str().to_owned(), 0)).collect()
}

fn check_config(cfg: &SinkConfig) -> anyhow::Result<()> {
    let dir = &cfg.dir;
    if cfg.num_shards == 0 || cfg.shard >= cfg.num_shards {
        bail!("output {dir}: shard {} is not one of 0..{}", cfg.shard, cfg.num_shards);
    }
    if cfg.num_shards > 99_999 {
        bail!("output {dir}: at most 99999 shards are supported, not {}", cfg.num_shards);
    }
    if cfg.rows_per_part == 0 {
        bail!("output {dir}: rows per part must be at least 1");
    }
    if cfg.total_rows.div_ceil(cfg.rows_per_part) > 1_000_000 {
        bail!(
            "output {dir}: {} rows at {} rows per part would need more than 1000000 parts; \
             raise rows per part",
            cfg.total_rows,
            cfg.rows_per_part
        );
    }
    let mut names = BTreeSet::new();
    for r in &cfg.regions {
        if r.is_empty() {
            bail!("output {dir}: a region has an empty name");
        }
        if !names.insert(r.as_str()) {
            bail!("output {dir}: region {r:?} is named twice");
        }
    }
    Ok(())
}

/// A shard's lock on a local output folder (`.lock-<shard>-of-<count>`; nothing for an object
/// store), taken with [`lock_shard`] before a run loads its model replicas and warms them up, so
/// that a second process of the same shard waits without taking the device's memory for them,
/// and held by the writer and the run until the run's summary is written. Released when the last
/// holder drops it.
#[derive(Debug)]
pub struct ShardLock {
    dir: Loc,
    shard: u32,
    num_shards: u32,
    _file: Option<std::fs::File>,
}

/// Takes the lock of shard `shard` of `num_shards` in `dir` (created if missing), waiting while
/// another process holds it; [`LockWaitInterrupted`] once `stop` is set while waiting.
pub fn lock_shard(dir: &Loc, shard: u32, num_shards: u32, stop: &AtomicBool) -> anyhow::Result<ShardLock> {
    store::create_dir_all(dir).with_context(|| format!("cannot create output folder {dir}"))?;
    let file = files::lock_shard(dir, shard, num_shards, stop)?;
    Ok(ShardLock { dir: dir.clone(), shard, num_shards, _file: file })
}

/// Why a run of the job `fingerprint` would refuse shard `cfg.shard` of `cfg.dir`, from its job
/// files alone (a part's footer can refuse it too, when the writer opens): `None` when it would
/// not. Reads only; a folder that does not exist yet refuses nothing.
pub fn refusal(cfg: &SinkConfig, fingerprint: &str) -> anyhow::Result<Option<anyhow::Error>> {
    check_config(cfg)?;
    if let Loc::Local(p) = &cfg.dir {
        if !p.exists() {
            return Ok(None);
        }
    }
    folder_refusal(cfg, fingerprint, &files::list_names(&cfg.dir)?)
}

impl PartWriter {
    /// Opens (or resumes) shard `cfg.shard`'s output in `cfg.dir`.
    ///
    /// `fingerprint` identifies the job (the caller's hash of job spec, model and sample list).
    /// The first open records it in `_job-<shard>-of-<count>.json`; a later open with another
    /// fingerprint is refused, since the folder then holds another job's output. Stale
    /// temporary files of this shard are removed, and committed parts are checked; a part that
    /// does not hold exactly its chunk's rows is moved aside as `.<name>.corrupt-<time>` (hidden from
    /// dataset readers, as temporary files are) and its
    /// chunk redone. Returns the writer and what is already done.
    pub fn open(cfg: SinkConfig, fingerprint: &str) -> anyhow::Result<(PartWriter, Resume)> {
        Self::open_or_stop(cfg, fingerprint, &AtomicBool::new(false))
    }

    /// [`PartWriter::open`], except that waiting for another process's lock on the shard ends
    /// with [`LockWaitInterrupted`] once `stop` is set (Ctrl-C while waiting).
    pub fn open_or_stop(cfg: SinkConfig, fingerprint: &str, stop: &AtomicBool) -> anyhow::Result<(PartWriter, Resume)> {
        // Before anything is removed or checked: no other process writes this shard meanwhile.
        check_config(&cfg)?;
        let lock = Arc::new(lock_shard(&cfg.dir, cfg.shard, cfg.num_shards, stop)?);
        Self::open_locked(cfg, fingerprint, lock)
    }

    /// [`PartWriter::open`] with the shard's lock already held (see [`ShardLock`]).
    pub fn open_locked(
        cfg: SinkConfig,
        fingerprint: &str,
        lock: Arc<ShardLock>,
    ) -> anyhow::Result<(PartWriter, Resume)> {
        check_config(&cfg)?;
        let dir = cfg.dir.clone();
        let (shard, count) = (cfg.shard, cfg.num_shards);
        anyhow::ensure!(
            (&lock.dir, lock.shard, lock.num_shards) == (&dir, shard, count),
            "the lock held is shard {} of {} in {}, not shard {shard} of {count} in {dir}",
            lock.shard,
            lock.num_shards,
            lock.dir
        );
        let names = files::list_names(&dir)?;
        for name in names.iter().filter(|n| files::is_shard_tmp(n, shard, count)) {
            tracing::info!("removing leftover temporary file {}", dir.join(name)?);
            files::remove_if_exists(&dir, name)?;
        }

        files::warn_foreign(&dir, &names);
        if let Some(refused) = folder_refusal(&cfg, fingerprint, &names)? {
            return Err(refused);
        }
        let columns = columns::columns(&cfg.regions);
        let schema = columns::schema_of(&columns);
        let group_rows = usize::try_from(cfg.rows_per_part).unwrap_or(usize::MAX);
        let mut metadata = cfg.metadata.clone();
        metadata.push((FINGERPRINT_KEY.to_owned(), fingerprint.to_owned()));
        let props = columns::writer_properties(&columns, group_rows, &metadata)?;
        let mut writer = PartWriter {
            num_chunks: cfg.total_rows.div_ceil(cfg.rows_per_part),
            cfg,
            columns,
            schema,
            props,
            done: BTreeSet::new(),
            pending: HashMap::new(),
            rows: 0,
            status_counts: zero_counts(),
            closed: false,
            _lock: lock,
            remote_check_bytes: Default::default(),
            fingerprint: fingerprint.to_owned(),
        };

        let mut invalid = Vec::new();
        let mut redo_parts = Vec::new();
        for name in &names {
            let Some((s, c, chunk)) = files::parse_part_name(name) else {
                continue;
            };
            if (s, c) != (shard, count) {
                continue;
            }
            // A part that cannot be read (a store's time-out, EIO) stops the run: only a part
            // whose content is wrong is set aside and written again.
            match writer.check_part(name, chunk)? {
                Ok(contents) if contents.statuses.iter().any(|s| writer.cfg.retry_statuses.contains(s)) => {
                    redo_parts.push((chunk, contents));
                }
                Ok(contents) => {
                    writer.done.insert(chunk);
                    writer.rows += writer.chunk_len(chunk);
                    for (k, v) in contents.status_counts {
                        *writer.status_counts.entry(k).or_default() += v;
                    }
                }
                Err(e) => invalid.push((name, chunk, e)),
            }
        }

        let (read, held) = *writer.remote_check_bytes.lock().unwrap_or_else(|p| p.into_inner());
        if held > 0 {
            tracing::info!(
                "checked the committed parts in {dir} with ranged reads: {read} of their {held} bytes \
                 (footers, index and status columns)"
            );
        }

        // The job file, once the parts have been found to be this job's (a part of another job
        // stops the run above, leaving the folder as it was), and before anything is changed.
        let job_name = files::job_name(shard, count);
        if !names.contains(&job_name) {
            files::write_json_atomic(&dir, &job_name, &job_file(&writer.cfg, fingerprint))?;
        }

        if (writer.done.len() as u64) < writer.num_chunks {
            // The shard is not complete, so neither it nor the dataset may look finished: the
            // markers go (durably) before any part is set aside.
            let a = files::remove_if_exists(&dir, &files::shard_success_name(shard, count))?;
            let b = files::remove_if_exists(&dir, files::DATASET_SUCCESS)?;
            if let (Loc::Local(d), true) = (&dir, a || b) {
                files::sync_dir(d)?;
            }
        }
        for (name, chunk, e) in invalid {
            let aside = files::move_aside(&dir, name)?;
            tracing::warn!(
                "part {} is not valid ({e:#}); moved it to {} and will write chunk {chunk} again",
                dir.join(name)?,
                aside
            );
        }

        let mut resume = Resume {
            done_chunks: writer.done.clone(),
            done_rows: writer.rows,
            done_status_counts: writer.status_counts.clone(),
            redone_rows: 0,
            redo: HashMap::new(),
            rows_per_part: writer.cfg.rows_per_part,
            total_rows: writer.cfg.total_rows,
        };
        for (chunk, contents) in redo_parts {
            let (start, _) = writer.chunk_range(chunk);
            let mut kept = Kept {
                stays: vec![false; writer.chunk_len(chunk) as usize],
                rows: 0,
                counts: BTreeMap::new(),
                part_counts: contents.status_counts,
            };
            let mut redo = BTreeSet::new();
            // check_part found the indices to be the chunk's, in order.
            for (&index, status) in contents.indices.iter().zip(contents.statuses) {
                if writer.cfg.retry_statuses.contains(&status) {
                    redo.insert(index);
                } else {
                    kept.stays[(index - start) as usize] = true;
                    kept.rows += 1;
                    *kept.counts.entry(status.as_str().to_owned()).or_default() += 1;
                }
            }
            resume.done_rows += kept.rows as u64;
            for (k, v) in &kept.counts {
                *resume.done_status_counts.entry(k.clone()).or_default() += v;
            }
            resume.redone_rows += redo.len() as u64;
            resume.redo.insert(chunk, redo);
            let mut pending = Pending::new(writer.chunk_len(chunk) as usize);
            pending.filled = kept.rows;
            pending.kept = Some(kept);
            writer.pending.insert(chunk, pending);
        }
        if resume.redone_rows > 0 {
            let statuses: Vec<&str> = writer.cfg.retry_statuses.iter().map(|s| s.as_str()).collect();
            tracing::info!(
                "redoing {} sample(s) whose rows are {} in {} part(s); each part is written again \
                 once its samples are done, its other rows kept",
                resume.redone_rows,
                statuses.join(" or "),
                resume.redo.len()
            );
        }
        Ok((writer, resume))
    }

    /// Validates a committed part of `chunk`: `Err` when it cannot be read at all (I/O, the
    /// store), `Ok(Err)` when its content is not that chunk's, else its indices and statuses.
    fn check_part(&self, name: &str, chunk: u64) -> anyhow::Result<anyhow::Result<read::PartContents>> {
        let (checked, bytes) = check_committed(&self.cfg, &self.schema, &self.fingerprint, name, chunk)?;
        if let Some((read, len)) = bytes {
            let mut c = self.remote_check_bytes.lock().unwrap_or_else(|p| p.into_inner());
            c.0 += read;
            c.1 += len;
        }
        Ok(checked)
    }

    fn chunk_range(&self, chunk: u64) -> (u64, u64) {
        self.cfg.chunk_range(chunk)
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        let (start, end) = self.chunk_range(chunk);
        end - start
    }

    fn part_path(&self, chunk: u64) -> String {
        format!("{}/{}", self.cfg.dir, part_name(self.cfg.shard, self.cfg.num_shards, chunk))
    }

    /// The row's shape must match this job's table; a mismatch is a bug upstream.
    fn check_row(&self, row: &Row) -> anyhow::Result<()> {
        let index = row.sample.index;
        let shard = format!("shard {} of {} in {}", self.cfg.shard, self.cfg.num_shards, self.cfg.dir);
        if index >= self.cfg.total_rows {
            bail!("row index {index} (id {:?}) is past the {} rows of {shard}", row.sample.id, self.cfg.total_rows);
        }
        if let Some(stats) = &row.stats {
            if stats.region_shares.len() != self.cfg.regions.len() {
                bail!(
                    "row {index} (id {:?}) has {} region shares, {shard} has {} regions",
                    row.sample.id,
                    stats.region_shares.len(),
                    self.cfg.regions.len()
                );
            }
        }
        if let Some(cam) = &row.cam {
            let want = u64::from(cam.h) * u64::from(cam.w) * 2;
            if cam.f16_le.len() as u64 != want {
                bail!(
                    "row {index} (id {:?}): CAM of {}×{} needs {want} bytes, got {}",
                    row.sample.id,
                    cam.h,
                    cam.w,
                    cam.f16_le.len()
                );
            }
        }
        Ok(())
    }

    /// Adds one row. When it completes its chunk, the chunk is written as a part file before
    /// this returns. A row whose index is out of range, already pushed, or in a committed chunk
    /// is refused with an error (nothing is written twice), as is a row whose region shares or
    /// CAM size do not match the job.
    pub fn push(&mut self, row: Row) -> anyhow::Result<()> {
        if self.closed {
            bail!("output writer for {} is closed", self.cfg.dir);
        }
        self.check_row(&row)?;
        let index = row.sample.index;
        let chunk = index / self.cfg.rows_per_part;
        if self.done.contains(&chunk) {
            bail!(
                "row index {index} (id {:?}) belongs to chunk {chunk}, already written to {}",
                row.sample.id,
                self.part_path(chunk)
            );
        }
        let (start, end) = self.chunk_range(chunk);
        let len = (end - start) as usize;
        let part = self.part_path(chunk);
        let pending = self.pending.entry(chunk).or_insert_with(|| Pending::new(len));
        if pending.kept.as_ref().is_some_and(|k| k.stays[(index - start) as usize]) {
            bail!("row index {index} (id {:?}) is already written to {part}, and kept", row.sample.id);
        }
        let slot = &mut pending.slots[(index - start) as usize];
        if let Some(first) = slot {
            bail!(
                "row index {index} was pushed twice (ids {:?} and {:?}) for {}",
                first.sample.id,
                row.sample.id,
                part
            );
        }
        *slot = Some(row);
        pending.filled += 1;
        if pending.filled == len {
            self.commit(chunk)?;
        }
        Ok(())
    }

    /// Writes complete chunk `chunk` as its part file. On failure the rows stay buffered.
    fn commit(&mut self, chunk: u64) -> anyhow::Result<()> {
        let Some(pending) = self.pending.remove(&chunk) else {
            return Ok(());
        };
        let (start, _) = self.chunk_range(chunk);
        let Pending { slots, filled, kept } = pending;
        let rows: Vec<Row> = slots.into_iter().flatten().collect();
        let result = self.write_part(chunk, &rows, kept.as_ref());
        match result {
            Ok(()) => {
                self.done.insert(chunk);
                self.rows += self.chunk_len(chunk);
                for r in &rows {
                    *self.status_counts.entry(r.status.as_str().to_owned()).or_default() += 1;
                }
                for (k, v) in kept.iter().flat_map(|k| &k.counts) {
                    *self.status_counts.entry(k.clone()).or_default() += v;
                }
                Ok(())
            }
            Err(e) => {
                let mut slots: Vec<Option<Row>> = (0..self.chunk_len(chunk)).map(|_| None).collect();
                for r in rows {
                    let i = (r.sample.index - start) as usize;
                    slots[i] = Some(r);
                }
                self.pending.insert(chunk, Pending { slots, filled, kept });
                Err(e)
            }
        }
    }

    /// Writes chunk `chunk`'s part from its new rows and, for a part whose failed rows were
    /// redone, the rows kept from it, merged in index order.
    fn write_part(&self, chunk: u64, rows: &[Row], kept: Option<&Kept>) -> anyhow::Result<()> {
        let have = rows.len() + kept.map_or(0, |k| k.rows);
        if have as u64 != self.chunk_len(chunk) {
            bail!("internal: chunk {chunk} has {have} rows, expected {}", self.chunk_len(chunk));
        }
        let mut batch = columns::batch(&self.columns, &self.schema, rows)?;
        if let Some(k) = kept {
            let kept_batch = self.kept_rows(chunk, k)?;
            // Slot by slot, the next kept row or the next new one (both in index order).
            let (mut old, mut new) = (0, 0);
            let order: Vec<(usize, usize)> = k
                .stays
                .iter()
                .map(|&stays| {
                    let (source, row) = if stays { (0, &mut old) } else { (1, &mut new) };
                    *row += 1;
                    (source, *row - 1)
                })
                .collect();
            batch = arrow::compute::interleave_record_batch(&[&kept_batch, &batch], &order)?;
        }
        let name = part_name(self.cfg.shard, self.cfg.num_shards, chunk);
        files::write_atomic(&self.cfg.dir, &name, |out| {
            let mut w = ArrowWriter::try_new(&mut *out, self.schema.clone(), Some(self.props.clone()))?;
            w.write(&batch)?;
            w.close()?;
            Ok(())
        })
    }

    /// The rows of `chunk`'s committed part that `kept` keeps, read from it, in index order.
    fn kept_rows(&self, chunk: u64, kept: &Kept) -> anyhow::Result<RecordBatch> {
        let path = self.cfg.dir.join(&part_name(self.cfg.shard, self.cfg.num_shards, chunk))?;
        let batch = read::read_part(&path, &self.schema).with_context(|| {
            format!("cannot read committed part {path} to write it again with its failed rows redone")
        })?;
        let index = batch
            .column_by_name("index")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .with_context(|| format!("{path} has no `index` column of row indices"))?;
        let (start, _) = self.chunk_range(chunk);
        if !index.values().iter().copied().eq(start..start + kept.stays.len() as u64) {
            bail!("{path} no longer holds the rows of chunk {chunk} it held when the run started");
        }
        let keep: BooleanArray = kept.stays.iter().map(|&s| Some(s)).collect();
        Ok(arrow::compute::filter_record_batch(&batch, &keep)?)
    }

    /// Rows still missing, as (count, first few indices).
    fn missing(&self) -> (u64, Vec<u64>) {
        let mut count = 0;
        let mut first = Vec::new();
        for chunk in (0..self.num_chunks).filter(|c| !self.done.contains(c)) {
            let (start, end) = self.chunk_range(chunk);
            let pending = self.pending.get(&chunk);
            for index in start..end {
                let have = pending.is_some_and(|p| p.has((index - start) as usize));
                if !have {
                    count += 1;
                    if first.len() < MISSING_SHOWN {
                        first.push(index);
                    }
                }
            }
        }
        (count, first)
    }

    fn summary(&self) -> ShardSummary {
        ShardSummary {
            shard: self.cfg.shard,
            num_shards: self.cfg.num_shards,
            total_rows: self.cfg.total_rows,
            rows_per_part: self.cfg.rows_per_part,
            rows: self.rows,
            parts: self.done.len() as u64,
            status_counts: self.status_counts.clone(),
            schema_version: SCHEMA_VERSION,
            job_id: self.cfg.job_id.clone(),
        }
    }

    /// Ends the shard: every row must have been pushed. Writes
    /// `_SUCCESS-<shard>-of-<count>.json`, and for a single-shard job also the dataset's
    /// `_SUCCESS` (see [`finalize`]). If rows are missing, returns an error naming the first
    /// few; committed parts are kept, so a rerun resumes.
    pub fn finish(mut self) -> anyhow::Result<ShardSummary> {
        self.closed = true;
        let complete: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.filled == p.slots.len()).map(|(c, _)| *c).collect();
        for chunk in complete {
            self.commit(chunk)?;
        }
        let (count, first) = self.missing();
        if count > 0 {
            let list = first.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
            let more = if count > first.len() as u64 { ", …" } else { "" };
            bail!(
                "shard {} of {} in {} is incomplete: {count} of {} rows were never produced \
                 (indices {list}{more}); the parts written so far are kept and a rerun resumes",
                self.cfg.shard,
                self.cfg.num_shards,
                self.cfg.dir,
                self.cfg.total_rows
            );
        }
        let summary = self.summary();
        let name = files::shard_success_name(self.cfg.shard, self.cfg.num_shards);
        files::write_json_atomic(&self.cfg.dir, &name, &summary)?;
        if self.cfg.num_shards == 1 {
            finalize(&self.cfg.dir)?;
        }
        Ok(summary)
    }

    /// Statuses of the rows buffered for chunks not yet complete (what [`PartWriter::abort`]
    /// would drop).
    pub fn buffered_status_counts(&self) -> BTreeMap<Status, u64> {
        let mut counts = BTreeMap::new();
        for row in self.pending.values().flat_map(Pending::new_rows) {
            *counts.entry(row.status).or_insert(0) += 1;
        }
        counts
    }

    /// Stops early (Ctrl-C): committed parts stay, buffered rows of incomplete chunks are
    /// dropped (a rerun redoes those chunks), and this process's temporary files are removed.
    /// No `_SUCCESS` file is written. Returns what is committed.
    pub fn abort(mut self) -> anyhow::Result<ShardSummary> {
        self.closed = true;
        let dropped: usize = self.pending.values().map(|p| p.new_rows().count()).sum();
        let redoing = self.pending.values().any(|p| p.kept.is_some());
        // Parts whose failed rows were being redone stay committed as they were.
        let kept_parts: Vec<(u64, BTreeMap<String, u64>)> =
            self.pending.iter().filter_map(|(&c, p)| p.kept.as_ref().map(|k| (c, k.part_counts.clone()))).collect();
        for (chunk, counts) in kept_parts {
            self.done.insert(chunk);
            self.rows += self.chunk_len(chunk);
            for (s, n) in counts {
                *self.status_counts.entry(s).or_default() += n;
            }
        }
        self.pending.clear();
        if dropped > 0 {
            tracing::info!(
                "stopping shard {} of {}: {dropped} buffered rows of unfinished parts dropped; \
                 a rerun writes them{}",
                self.cfg.shard,
                self.cfg.num_shards,
                if redoing { " (with --retry-failed again, for failed rows that were being redone)" } else { "" }
            );
        }
        // Only local folders hold temporary files (a remote part is one PUT).
        let suffix = format!("-{}", files::process_token());
        let names = match &self.cfg.dir {
            Loc::Local(_) => files::list_names(&self.cfg.dir)?,
            Loc::Remote { .. } => Vec::new(),
        };
        for name in names {
            if files::is_shard_tmp(&name, self.cfg.shard, self.cfg.num_shards) && name.ends_with(&suffix) {
                files::remove_if_exists(&self.cfg.dir, &name)?;
            }
        }
        Ok(self.summary())
    }
}

impl Drop for PartWriter {
    fn drop(&mut self) {
        if !self.closed {
            let buffered: usize = self.pending.values().map(|p| p.new_rows().count()).sum();
            if buffered > 0 {
                tracing::warn!(
                    "output writer for shard {} of {} in {} dropped without finish or abort; \
                     {buffered} buffered rows were not written",
                    self.cfg.shard,
                    self.cfg.num_shards,
                    self.cfg.dir
                );
            }
        }
    }
}
