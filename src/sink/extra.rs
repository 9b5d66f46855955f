//! Output files besides the part files: the report's HTML and tables, and reading back a
//! run's file metadata. Still the sink's job: every file is written atomically.

use super::files::{parse_part_name, write_atomic};
use crate::store::{self, Loc};
use anyhow::{Context, Result};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::BTreeMap;

/// Writes `bytes` to `dir/name` atomically, creating `dir` if needed.
pub fn write_file(dir: &Loc, name: &str, bytes: &[u8]) -> Result<Loc> {
    store::create_dir_all(dir)?;
    write_atomic(dir, name, |out| Ok(out.write_all(bytes)?))?;
    dir.join(name)
}

/// Writes one record batch as a zstd-compressed Parquet file `dir/name`, atomically.
pub fn write_table(dir: &Loc, name: &str, batch: &RecordBatch, metadata: &[(String, String)]) -> Result<Loc> {
    store::create_dir_all(dir)?;
    let kv = metadata.iter().map(|(k, v)| parquet::file::metadata::KeyValue::new(k.clone(), v.clone())).collect();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_key_value_metadata(Some(kv))
        .build();
    write_atomic(dir, name, |out| {
        let mut w = ArrowWriter::try_new(out, batch.schema(), Some(props))?;
        w.write(batch)?;
        w.close()?;
        Ok(())
    })?;
    dir.join(name)
}

/// The key-value metadata (job spec, class names, …) of the first committed part of the folder
/// `dir`, whose files are `names`.
pub(crate) fn metadata_of(dir: &Loc, names: &[String]) -> Result<BTreeMap<String, String>> {
    let first =
        names.iter().find(|n| parse_part_name(n).is_some()).with_context(|| format!("{dir} holds no part files"))?;
    let path = dir.join(first)?;
    // The footer only: from an object store, a few ranged reads instead of the whole part.
    let file = super::read::open_part_ranged(&path)?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{path} is not Parquet"))?;
    let mut out = BTreeMap::new();
    if let Some(kv) = reader.metadata().file_metadata().key_value_metadata() {
        for e in kv {
            out.insert(e.key.clone(), e.value.clone().unwrap_or_default());
        }
    }
    Ok(out)
}
