//! Output files besides the part files: the report's HTML and tables, and reading back a
//! run's file metadata. Still the sink's job: every file is written atomically.

use super::files::{list_names, parse_part_name, write_atomic};
use anyhow::{Context, Result};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `dir/name` atomically, creating `dir` if needed.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomic(dir, name, |out| Ok(out.write_all(bytes)?))?;
    Ok(dir.join(name))
}

/// Writes one record batch as a zstd-compressed Parquet file `dir/name`, atomically.
pub fn write_table(dir: &Path, name: &str, batch: &RecordBatch, metadata: &[(String, String)]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
    Ok(dir.join(name))
}

/// The key-value metadata of the first committed part in `dir` (job spec, class names, …).
pub fn read_metadata(dir: &Path) -> Result<BTreeMap<String, String>> {
    let names = list_names(dir)?;
    let first = names
        .iter()
        .find(|n| parse_part_name(n).is_some())
        .with_context(|| format!("{} holds no part files", dir.display()))?;
    let path = dir.join(first);
    let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = SerializedFileReader::new(file).with_context(|| format!("{} is not Parquet", path.display()))?;
    let mut out = BTreeMap::new();
    if let Some(kv) = reader.metadata().file_metadata().key_value_metadata() {
        for e in kv {
            out.insert(e.key.clone(), e.value.clone().unwrap_or_default());
        }
    }
    Ok(out)
}
