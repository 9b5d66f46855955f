//! Reading committed part files back: their footers, their `index` and `status` columns (resume
//! and validation), and whole tables (tests and reports).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

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

fn open_builder(path: &Path) -> anyhow::Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{} is not a readable Parquet file", path.display()))
}

/// Number of rows in a part, from its footer.
pub(crate) fn part_row_count(path: &Path) -> anyhow::Result<u64> {
    let builder = open_builder(path)?;
    let n = builder.metadata().file_metadata().num_rows();
    u64::try_from(n).with_context(|| format!("{} has a negative row count", path.display()))
}

/// Reads a part's `index` and `status` columns, after checking that its schema is `expected`.
pub(crate) fn read_part_contents(path: &Path, expected: &SchemaRef) -> anyhow::Result<PartContents> {
    let builder = open_builder(path)?;
    let found = builder.schema();
    let same =
        found.fields().len() == expected.fields().len()
            && found.fields().iter().zip(expected.fields()).all(|(a, b)| {
                a.name() == b.name() && a.data_type() == b.data_type() && a.is_nullable() == b.is_nullable()
            });
    if !same {
        bail!("{} has a different column layout than this job writes", path.display());
    }
    let footer_rows = builder.metadata().file_metadata().num_rows();
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["index", "status"]);
    let reader = builder.with_projection(mask).build().with_context(|| format!("cannot read {}", path.display()))?;
    let mut contents = PartContents { indices: Vec::new(), status_counts: BTreeMap::new() };
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read rows of {}", path.display()))?;
        let column = |name: &str| {
            batch.column_by_name(name).with_context(|| format!("{} has no `{name}` column", path.display()))
        };
        let index = column("index")?;
        let status = column("status")?;
        let (Some(index), Some(status)) =
            (index.as_any().downcast_ref::<UInt64Array>(), status.as_any().downcast_ref::<StringArray>())
        else {
            bail!("{} has unexpected `index`/`status` column types", path.display());
        };
        if index.null_count() > 0 || status.null_count() > 0 {
            bail!("{} has null `index` or `status` values", path.display());
        }
        contents.indices.extend(index.values().iter().copied());
        for s in status.iter().flatten() {
            if Status::parse(s).is_none() {
                bail!("{} has an unknown status {s:?}", path.display());
            }
            *contents.status_counts.entry(s.to_owned()).or_default() += 1;
        }
    }
    if contents.indices.len() as i64 != footer_rows {
        bail!("{} holds {} rows but its footer says {footer_rows}", path.display(), contents.indices.len());
    }
    Ok(contents)
}

/// Reads every committed part in `dir` (all shards), in file-name order — that is by shard, then
/// by chunk, so rows of one shard come in index order. Temporary and set-aside files are skipped.
pub fn read_rows(dir: &Path) -> anyhow::Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for_each_batch(dir, |b| {
        batches.push(b);
        Ok(())
    })?;
    Ok(batches)
}

/// Streams every committed part in `dir`, in the order of [`read_rows`], one record batch at a
/// time, so a reader of a large output holds one batch in memory.
pub fn for_each_batch(dir: &Path, mut f: impl FnMut(RecordBatch) -> anyhow::Result<()>) -> anyhow::Result<()> {
    for name in list_names(dir)? {
        if parse_part_name(&name).is_none() {
            continue;
        }
        let path = dir.join(&name);
        let reader = open_builder(&path)?.build().with_context(|| format!("cannot read {}", path.display()))?;
        for batch in reader {
            f(batch.with_context(|| format!("cannot read rows of {}", path.display()))?)?;
        }
    }
    Ok(())
}
