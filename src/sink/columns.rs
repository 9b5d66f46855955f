//! The output table's columns, defined once: name, type, nullability, how a row fills it, and how
//! it is stored (compression, dictionary). The Arrow schema, the record batches and the Parquet
//! writer properties are all derived from [`columns`], so a new column is one entry here.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Float32Builder, Int64Builder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::Row;
use crate::stats::MapStats;

/// zstd level for the table columns: level 3 is zstd's default trade-off; the columns are small
/// next to the PNG blobs, so a higher level buys little.
const ZSTD_LEVEL: i32 = 3;

/// How a column's pages are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// zstd at [`ZSTD_LEVEL`]: everything except the blobs.
    Zstd,
    /// Snappy: for the float16 CAM bytes. Grad-CAM maps are ReLU'd, so many values are zero;
    /// on 10 000 7×7 maps snappy stores 64 B/row against 102 B/row uncompressed, for ~0.2 µs/row.
    Snappy,
    /// No compression: PNG bytes are already deflated.
    Plain,
}

/// Builds one column's array from a part's rows (sorted by index).
type BuildFn = Box<dyn Fn(&[Row]) -> ArrayRef + Send + Sync>;

/// One output column.
pub(crate) struct Column {
    pub name: String,
    pub data_type: DataType,
    pub nullable: bool,
    pub codec: Codec,
    /// Dictionary encoding: on only for low-cardinality columns (status, class ids, errors).
    pub dictionary: bool,
    pub build: BuildFn,
}

impl Column {
    fn new(
        name: impl Into<String>,
        data_type: DataType,
        nullable: bool,
        build: impl Fn(&[Row]) -> ArrayRef + Send + Sync + 'static,
    ) -> Column {
        Column { name: name.into(), data_type, nullable, codec: Codec::Zstd, dictionary: false, build: Box::new(build) }
    }

    fn dictionary(mut self) -> Column {
        self.dictionary = true;
        self
    }

    fn codec(mut self, codec: Codec) -> Column {
        self.codec = codec;
        self
    }
}

fn u64_col(rows: &[Row], f: impl Fn(&Row) -> u64) -> ArrayRef {
    let mut b = UInt64Builder::with_capacity(rows.len());
    rows.iter().for_each(|r| b.append_value(f(r)));
    Arc::new(b.finish())
}

fn u32_col(rows: &[Row], f: impl Fn(&Row) -> Option<u32>) -> ArrayRef {
    let mut b = UInt32Builder::with_capacity(rows.len());
    rows.iter().for_each(|r| b.append_option(f(r)));
    Arc::new(b.finish())
}

fn i64_col(rows: &[Row], f: impl Fn(&Row) -> Option<i64>) -> ArrayRef {
    let mut b = Int64Builder::with_capacity(rows.len());
    rows.iter().for_each(|r| b.append_option(f(r)));
    Arc::new(b.finish())
}

fn f32_col(rows: &[Row], f: impl Fn(&Row) -> Option<f32>) -> ArrayRef {
    let mut b = Float32Builder::with_capacity(rows.len());
    rows.iter().for_each(|r| b.append_option(f(r)));
    Arc::new(b.finish())
}

fn str_col(rows: &[Row], f: impl Fn(&Row) -> Option<&str>) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 32);
    rows.iter().for_each(|r| b.append_option(f(r)));
    Arc::new(b.finish())
}

fn bin_col(rows: &[Row], f: impl Fn(&Row) -> Option<&[u8]>) -> ArrayRef {
    let bytes = rows.iter().filter_map(&f).map(<[u8]>::len).sum();
    let mut b = BinaryBuilder::with_capacity(rows.len(), bytes);
    rows.iter().for_each(|r| b.append_option(f(r)));
    Arc::new(b.finish())
}

/// A nullable Float32 column read from the row's stats; null when the row has no stats.
fn stat(name: &str, f: fn(&MapStats) -> Option<f32>) -> Column {
    Column::new(name, DataType::Float32, true, move |rows| f32_col(rows, |r| r.stats.as_ref().and_then(f)))
}

/// Name of the column holding the attribution share of region `name`.
pub fn region_column(name: &str) -> String {
    format!("region_{name}_share")
}

/// All output columns, in order, for the given region names.
pub(crate) fn columns(regions: &[String]) -> Vec<Column> {
    use DataType::*;
    let mut cols = vec![
        Column::new("index", UInt64, false, |rows| u64_col(rows, |r| r.sample.index)),
        Column::new("id", Utf8, false, |rows| str_col(rows, |r| Some(&r.sample.id))),
        Column::new("path", Utf8, false, |rows| str_col(rows, |r| Some(&r.sample.path))),
        Column::new("label", Int64, true, |rows| i64_col(rows, |r| r.sample.label)).dictionary(),
        Column::new("target", Int64, true, |rows| i64_col(rows, |r| r.target)).dictionary(),
        Column::new("predicted", Int64, true, |rows| i64_col(rows, |r| r.predicted)).dictionary(),
        Column::new("predicted_prob", Float32, true, |rows| f32_col(rows, |r| r.predicted_prob)),
        Column::new("target_prob", Float32, true, |rows| f32_col(rows, |r| r.target_prob)),
        Column::new("status", Utf8, false, |rows| str_col(rows, |r| Some(r.status.as_str()))).dictionary(),
        Column::new("error", Utf8, true, |rows| str_col(rows, |r| r.error.as_deref())).dictionary(),
        stat("attr_total", |s| Some(s.attr_total)),
        stat("attr_max", |s| Some(s.attr_max)),
        stat("attr_entropy", |s| s.attr_entropy),
        stat("attr_gini", |s| s.attr_gini),
        stat("attr_top5_share", |s| s.attr_top5_share),
        stat("attr_com_x", |s| s.attr_com_x),
        stat("attr_com_y", |s| s.attr_com_y),
        stat("attr_peak_x", |s| s.attr_peak_x),
        stat("attr_peak_y", |s| s.attr_peak_y),
        stat("cam_max", |s| Some(s.cam_max)),
        stat("cam_com_x", |s| s.cam_com_x),
        stat("cam_com_y", |s| s.cam_com_y),
        stat("bbox_mass_share", |s| s.bbox_mass_share),
        stat("mask_mass_share", |s| s.mask_mass_share),
    ];
    for (i, region) in regions.iter().enumerate() {
        cols.push(Column::new(region_column(region), Float32, true, move |rows| {
            f32_col(rows, |r| r.stats.as_ref().and_then(|s| s.region_shares.get(i).copied().flatten()))
        }));
    }
    cols.extend([
        Column::new("cam", Binary, true, |rows| bin_col(rows, |r| r.cam.as_ref().map(|c| c.f16_le.as_slice())))
            .codec(Codec::Snappy),
        Column::new("cam_h", UInt32, true, |rows| u32_col(rows, |r| r.cam.as_ref().map(|c| c.h))),
        Column::new("cam_w", UInt32, true, |rows| u32_col(rows, |r| r.cam.as_ref().map(|c| c.w))),
        Column::new("map_png", Binary, true, |rows| bin_col(rows, |r| r.map.as_ref().map(|m| m.png.as_slice())))
            .codec(Codec::Plain),
        Column::new("map_scale", Float32, true, |rows| f32_col(rows, |r| r.map.as_ref().map(|m| m.scale))),
    ]);
    cols
}

/// The Arrow schema of the given columns.
pub(crate) fn schema_of(cols: &[Column]) -> SchemaRef {
    Arc::new(Schema::new(
        cols.iter().map(|c| Field::new(c.name.clone(), c.data_type.clone(), c.nullable)).collect::<Vec<_>>(),
    ))
}

/// One record batch of `rows` (already sorted by index).
pub(crate) fn batch(cols: &[Column], schema: &SchemaRef, rows: &[Row]) -> anyhow::Result<RecordBatch> {
    let arrays = cols.iter().map(|c| (c.build)(rows)).collect::<Vec<_>>();
    Ok(RecordBatch::try_new(schema.clone(), arrays)?)
}

/// Parquet writer properties: per-column codec and dictionary from the table, statistics on,
/// one row group of up to `rows_per_group` rows, and the caller's key-value metadata.
pub(crate) fn writer_properties(
    cols: &[Column],
    rows_per_group: usize,
    metadata: &[(String, String)],
) -> anyhow::Result<WriterProperties> {
    let zstd = Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?);
    let mut b = WriterProperties::builder()
        .set_compression(zstd)
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .set_created_by(format!("saliency-audit sink (schema {})", super::SCHEMA_VERSION))
        .set_key_value_metadata(Some(metadata.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect()));
    for c in cols {
        let path = ColumnPath::from(c.name.as_str());
        let codec = match c.codec {
            Codec::Zstd => zstd,
            Codec::Snappy => Compression::SNAPPY,
            Codec::Plain => Compression::UNCOMPRESSED,
        };
        b = b.set_column_compression(path.clone(), codec).set_column_dictionary_enabled(path.clone(), c.dictionary);
        if c.data_type == DataType::Binary {
            // Min/max of map bytes says nothing: no page index, chunk statistics only
            // (null count; min/max truncated to 64 bytes).
            b = b.set_column_statistics_enabled(path, EnabledStatistics::Chunk);
        }
    }
    Ok(b.build())
}
