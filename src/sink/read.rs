//! Reading committed part files back: their footers, their `index` and `status` columns (resume
//! and validation), and whole tables (tests and reports).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;

use bytes::Bytes;
use parquet::file::reader::{ChunkReader, Length};

use crate::store::{self, Loc};

use anyhow::{bail, Context};
use arrow::array::{Array, StringArray, UInt64Array};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::files::{list_names, parse_part_name};
use crate::sample::Status;

/// What a committed part holds, as far as resuming needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartContents {
    /// Row indices in file order.
    pub indices: Vec<u64>,
    /// Row counts per status name.
    pub status_counts: BTreeMap<String, u64>,
    /// Row statuses in file order.
    pub statuses: Vec<Status>,
}

/// A committed part's bytes: a local file read in place, a remote object fetched whole (to read
/// every column), or a remote object read by ranged GETs (footer and a few columns: resume,
/// validation and `finalize` then fetch a small share of each part).
pub(crate) enum PartFile {
    Local(File),
    Remote(Bytes),
    Ranged(RangedObject),
}

/// A remote object read range by range; remembers a failed request, so that a store's error is
/// told apart from a damaged file, and counts the bytes fetched. Clones share both.
#[derive(Clone)]
pub(crate) struct RangedObject {
    loc: Loc,
    len: u64,
    /// The first failed request's error: its kind (which says whether a retry may get past it)
    /// and message.
    failed: std::sync::Arc<std::sync::Mutex<Option<(std::io::ErrorKind, String)>>>,
    /// Bytes fetched so far.
    fetched: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RangedObject {
    fn get(&self, range: std::ops::Range<u64>) -> parquet::errors::Result<Bytes> {
        self.fetched.fetch_add(range.end - range.start, std::sync::atomic::Ordering::Relaxed);
        store::read_remote_range(&self.loc, range).map_err(|e| {
            let first = (e.kind(), e.to_string());
            self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(first);
            parquet::errors::ParquetError::External(Box::new(e))
        })
    }

    /// The store's error, when a ranged read failed (the file itself may be fine), of the kind
    /// the store gave, so that one a retry may get past exits as such.
    pub(crate) fn failure(&self) -> Option<std::io::Error> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.as_ref().map(|(kind, msg)| std::io::Error::new(*kind, msg.clone()))
    }

    /// The object's size, and the bytes fetched from it so far.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.len, self.fetched.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl PartFile {
    /// A handle on the remote object being read by ranges (sharing its failure and byte count);
    /// `None` for files read whole, whose reads fail before parsing starts.
    pub(crate) fn ranged(&self) -> Option<RangedObject> {
        match self {
            PartFile::Ranged(r) => Some(r.clone()),
            _ => None,
        }
    }
}

impl Length for PartFile {
    fn len(&self) -> u64 {
        match self {
            PartFile::Local(f) => f.len(),
            PartFile::Remote(b) => Length::len(b),
            PartFile::Ranged(r) => r.len,
        }
    }
}

impl ChunkReader for PartFile {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(match self {
            PartFile::Local(f) => Box::new(f.get_read(start)?),
            PartFile::Remote(b) => Box::new(b.get_read(start)?),
            PartFile::Ranged(r) => Box::new(RangeReader { obj: r.clone(), pos: start.min(r.len), buf: Bytes::new() }),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        match self {
            PartFile::Local(f) => f.get_bytes(start, length),
            PartFile::Remote(b) => b.get_bytes(start, length),
            PartFile::Ranged(r) => {
                let end = start.saturating_add(length as u64);
                if end > r.len {
                    return Err(parquet::errors::ParquetError::EOF(format!(
                        "{}: bytes {start}..{end} are past its end ({})",
                        r.loc, r.len
                    )));
                }
                r.get(start..end)
            }
        }
    }
}

/// A reader from an offset of a [`RangedObject`] that fetches 512 bytes at a time as it is
/// read: the page reader reads each page's header (tens of bytes) through one of these, and
/// then the page itself with one ranged read.
struct RangeReader {
    obj: RangedObject,
    pos: u64,
    buf: Bytes,
}

impl Read for RangeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        const WINDOW: u64 = 512;
        if self.buf.is_empty() && self.pos < self.obj.len {
            let end = (self.pos + WINDOW).min(self.obj.len);
            self.buf = self.obj.get(self.pos..end).map_err(std::io::Error::other)?;
            self.pos = end;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        bytes::Buf::advance(&mut self.buf, n);
        Ok(n)
    }
}

/// Opens a part to read its footer and a few columns: a local file, or a remote object read by
/// ranged GETs (its size from one HEAD).
pub(crate) fn open_part_ranged(loc: &Loc) -> anyhow::Result<PartFile> {
    match loc {
        Loc::Local(_) => open_part(loc),
        Loc::Remote { .. } => {
            let len = store::remote_size(loc).with_context(|| format!("cannot read {loc}"))?;
            Ok(PartFile::Ranged(RangedObject {
                loc: loc.clone(),
                len,
                failed: Default::default(),
                fetched: Default::default(),
            }))
        }
    }
}

/// Opens a Parquet file in a local folder or an object store.
pub(crate) fn open_part(loc: &Loc) -> anyhow::Result<PartFile> {
    Ok(match loc {
        Loc::Local(p) => PartFile::Local(File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        Loc::Remote { .. } => PartFile::Remote(store::read_all(loc)?),
    })
}

/// Reads the footer of `file` (the part at `path`).
fn builder_of(file: PartFile, path: &Loc) -> anyhow::Result<ParquetRecordBatchReaderBuilder<PartFile>> {
    ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{path} is not a readable Parquet file"))
}

/// The fingerprint of the job that wrote a part, from its footer (none in parts written before
/// it was recorded).
fn footer_fingerprint(meta: &parquet::file::metadata::ParquetMetaData) -> Option<String> {
    let kv = meta.file_metadata().key_value_metadata()?;
    kv.iter().find(|k| k.key == super::FINGERPRINT_KEY).and_then(|k| k.value.clone())
}

/// Number of rows in a part, from its footer.
pub(crate) fn part_row_count(path: &Loc) -> anyhow::Result<u64> {
    let builder = builder_of(open_part_ranged(path)?, path)?;
    let n = builder.metadata().file_metadata().num_rows();
    u64::try_from(n).with_context(|| format!("{} has a negative row count", path))
}

/// Reads a whole committed part as one batch of the schema `expected` (a part whose failed rows
/// are redone: the rest of it is written again with the new rows).
pub(crate) fn read_part(path: &Loc, expected: &SchemaRef) -> anyhow::Result<RecordBatch> {
    let reader = builder_of(open_part(path)?, path)?.build().with_context(|| format!("cannot read {path}"))?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read rows of {path}"))?;
        batches.push(
            RecordBatch::try_new(expected.clone(), batch.columns().to_vec())
                .with_context(|| format!("{path} has a different column layout than this job writes"))?,
        );
    }
    Ok(arrow::compute::concat_batches(expected, &batches)?)
}

/// Reads a part's `index` and `status` columns, after checking that its schema is `expected`.
/// Refused first, before anything about its content, when its footer records another
/// job than `fingerprint` ([`OutputConflict`](super::OutputConflict)).
pub(crate) fn read_part_contents(
    file: PartFile,
    path: &Loc,
    expected: &SchemaRef,
    fingerprint: Option<&str>,
) -> anyhow::Result<PartContents> {
    let builder = builder_of(file, path)?;
    if let (Some(want), Some(found)) = (fingerprint, footer_fingerprint(builder.metadata())) {
        if want != found {
            return Err(super::OutputConflict(format!(
                "committed part {path} was written by another job (its footer records job {found}, this \
                 job is {want}), although the folder's job file does not say so; use another output folder"
            ))
            .into());
        }
    }
    let found = builder.schema();
    let same =
        found.fields().len() == expected.fields().len()
            && found.fields().iter().zip(expected.fields()).all(|(a, b)| {
                a.name() == b.name() && a.data_type() == b.data_type() && a.is_nullable() == b.is_nullable()
            });
    if !same {
        bail!("{} has a different column layout than this job writes", path);
    }
    let footer_rows = builder.metadata().file_metadata().num_rows();
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["index", "status"]);
    let reader = builder.with_projection(mask).build().with_context(|| format!("cannot read {}", path))?;
    let mut contents = PartContents { indices: Vec::new(), status_counts: BTreeMap::new(), statuses: Vec::new() };
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read rows of {}", path))?;
        let column =
            |name: &str| batch.column_by_name(name).with_context(|| format!("{} has no `{name}` column", path));
        let index = column("index")?;
        let status = column("status")?;
        let (Some(index), Some(status)) =
            (index.as_any().downcast_ref::<UInt64Array>(), status.as_any().downcast_ref::<StringArray>())
        else {
            bail!("{} has unexpected `index`/`status` column types", path);
        };
        if index.null_count() > 0 || status.null_count() > 0 {
            bail!("{} has null `index` or `status` values", path);
        }
        contents.indices.extend(index.values().iter().copied());
        for s in status.iter().flatten() {
            let Some(parsed) = Status::parse(s) else {
                bail!("{} has an unknown status {s:?}", path);
            };
            contents.statuses.push(parsed);
            *contents.status_counts.entry(s.to_owned()).or_default() += 1;
        }
    }
    if contents.indices.len() as i64 != footer_rows {
        bail!("{} holds {} rows but its footer says {footer_rows}", path, contents.indices.len());
    }
    Ok(contents)
}

/// Reads every committed part in `dir` (all shards), in file-name order — that is by shard, then
/// by chunk, so rows of one shard come in index order. Temporary and set-aside files are skipped.
pub fn read_rows(dir: impl Into<Loc>) -> anyhow::Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for_each_batch(dir, |b| {
        batches.push(b);
        Ok(())
    })?;
    Ok(batches)
}

/// Streams every committed part in `dir`, in the order of [`read_rows`], one record batch at a
/// time, so a reader of a large output holds one batch in memory.
pub fn for_each_batch(dir: impl Into<Loc>, f: impl FnMut(RecordBatch) -> anyhow::Result<()>) -> anyhow::Result<()> {
    Parts::list(dir.into(), false)?.for_each_batch(f)
}

/// The committed parts of an output folder, listed once, for a reader that goes over them more
/// than once (the report's two passes) and must see the same parts each time. In an object store
/// each part is downloaded once: the first pass keeps a copy in a local temporary folder (removed
/// with the `Parts`), which later passes read, so a remote output costs one download, not one
/// per pass.
pub struct Parts {
    dir: Loc,
    /// Every file the folder held when listed.
    listed: Vec<String>,
    names: Vec<String>,
    /// Local copies of remote parts; `None` for a local folder.
    spool: Option<tempfile::TempDir>,
}

impl Parts {
    /// Lists the committed parts of `dir` (temporary and set-aside files are skipped). With
    /// `keep_copies`, remote parts are kept in a local temporary folder for the next pass.
    pub fn list(dir: impl Into<Loc>, keep_copies: bool) -> anyhow::Result<Parts> {
        let dir = dir.into();
        let listed = list_names(&dir)?;
        super::files::warn_foreign(&dir, &listed);
        let names = listed.iter().filter(|n| parse_part_name(n).is_some()).cloned().collect();
        let spool = match &dir {
            Loc::Remote { .. } if keep_copies => Some(
                tempfile::Builder::new()
                    .prefix("saliency-audit-parts-")
                    .tempdir()
                    .context("cannot make a temporary folder for the parts read from the object store")?,
            ),
            _ => None,
        };
        Ok(Parts { dir, listed, names, spool })
    }

    /// The key-value metadata of the first part (job spec, class names, …), from this listing.
    pub fn metadata(&self) -> anyhow::Result<BTreeMap<String, String>> {
        super::extra::metadata_of(&self.dir, &self.listed)
    }

    /// Which shards are complete, from this listing: the same files the passes over the parts
    /// read.
    pub fn coverage(&self) -> anyhow::Result<super::Coverage> {
        super::summary::coverage_of(&self.dir, &self.listed)
    }

    /// Reads every part, in file-name order (by shard, then by chunk), one record batch at a time.
    /// The parts of one shard must have been written by one job (their footers' fingerprints):
    /// a part copied in from another job's output is an [`OutputConflict`](super::OutputConflict).
    pub fn for_each_batch(&self, mut f: impl FnMut(RecordBatch) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let mut jobs: BTreeMap<(u32, u32), (String, &str)> = BTreeMap::new();
        for name in &self.names {
            let path = self.dir.join(name)?;
            let file = match &self.spool {
                None => open_part(&path)?,
                Some(spool) => {
                    let copy = spool.path().join(name);
                    if copy.exists() {
                        PartFile::Local(File::open(&copy).with_context(|| format!("cannot open {}", copy.display()))?)
                    } else {
                        let bytes = store::read_all(&path)?;
                        let tmp = spool.path().join(format!(".tmp-{name}"));
                        // Without a copy (a full disk, say) the next pass downloads the part again.
                        if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &copy)) {
                            let _ = std::fs::remove_file(&tmp);
                            tracing::warn!("cannot keep a local copy of {path} in {}: {e}", spool.path().display());
                        }
                        PartFile::Remote(bytes)
                    }
                }
            };
            let builder = builder_of(file, &path)?;
            if let (Some(fp), Some((shard, count, _))) = (footer_fingerprint(builder.metadata()), parse_part_name(name))
            {
                match jobs.get(&(shard, count)) {
                    Some((first_fp, first)) if *first_fp != fp => {
                        return Err(super::OutputConflict(format!(
                            "{path} was written by another job than {} (their footers record jobs {fp} and \
                             {first_fp}): the folder mixes two jobs' parts of shard {shard} of {count}",
                            self.dir.join(first)?
                        ))
                        .into());
                    }
                    Some(_) => {}
                    None => {
                        jobs.insert((shard, count), (fp, name));
                    }
                }
            }
            let reader = builder.build().with_context(|| format!("cannot read {}", path))?;
            for batch in reader {
                f(batch.with_context(|| format!("cannot read rows of {}", path))?)?;
            }
        }
        Ok(())
    }
}
