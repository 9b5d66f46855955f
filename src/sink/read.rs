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
}

/// A committed part's bytes: a local file read in place, or a remote object fetched whole.
pub(crate) enum PartFile {
    Local(File),
    Remote(Bytes),
}

impl Length for PartFile {
    fn len(&self) -> u64 {
        match self {
            PartFile::Local(f) => f.len(),
            PartFile::Remote(b) => Length::len(b),
        }
    }
}

impl ChunkReader for PartFile {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(match self {
            PartFile::Local(f) => Box::new(f.get_read(start)?),
            PartFile::Remote(b) => Box::new(b.get_read(start)?),
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        match self {
            PartFile::Local(f) => f.get_bytes(start, length),
            PartFile::Remote(b) => b.get_bytes(start, length),
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

fn open_builder(path: &Loc) -> anyhow::Result<ParquetRecordBatchReaderBuilder<PartFile>> {
    ParquetRecordBatchReaderBuilder::try_new(open_part(path)?)
        .with_context(|| format!("{path} is not a readable Parquet file"))
}

/// Number of rows in a part, from its footer.
pub(crate) fn part_row_count(path: &Loc) -> anyhow::Result<u64> {
    let builder = open_builder(path)?;
    let n = builder.metadata().file_metadata().num_rows();
    u64::try_from(n).with_context(|| format!("{} has a negative row count", path))
}

/// Reads a part's `index` and `status` columns, after checking that its schema is `expected`.
pub(crate) fn read_part_contents(file: PartFile, path: &Loc, expected: &SchemaRef) -> anyhow::Result<PartContents> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{path} is not a readable Parquet file"))?;
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
    let mut contents = PartContents { indices: Vec::new(), status_counts: BTreeMap::new() };
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
            if Status::parse(s).is_none() {
                bail!("{} has an unknown status {s:?}", path);
            }
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
pub fn for_each_batch(dir: impl Into<Loc>, mut f: impl FnMut(RecordBatch) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let dir = dir.into();
    for name in list_names(&dir)? {
        if parse_part_name(&name).is_none() {
            continue;
        }
        let path = dir.join(&name)?;
        let reader = open_builder(&path)?.build().with_context(|| format!("cannot read {}", path))?;
        for batch in reader {
            f(batch.with_context(|| format!("cannot read rows of {}", path))?)?;
        }
    }
    Ok(())
}
