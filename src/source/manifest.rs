//! Manifests: CSV (header row), JSONL (one object a line) and Parquet, chosen by extension.
//!
//! Columns: `path` (required), `label`, `id`, `bbox_x0`, `bbox_y0`, `bbox_x1`, `bbox_y1`, `mask`;
//! other columns are ignored. An empty cell or a null is an absent value.

use crate::store::{self, Loc};
use std::collections::HashMap;

use anyhow::{anyhow, bail, Context};
use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::labels::{Classes, RawLabel};
use super::resolve_path;
use crate::sample::Sample;

/// The box columns, in `Sample::bbox` order.
const BBOX: [&str; 4] = ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"];
/// Every column the manifest reader uses.
const COLUMNS: [&str; 8] = ["path", "label", "id", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "mask"];

/// One manifest row as written.
#[derive(Debug, Default)]
struct RawRow {
    /// Where the row is, for messages: `line 5` or `row 3`.
    at: String,
    path: Option<String>,
    id: Option<String>,
    label: Option<RawLabel>,
    bbox: [Option<f64>; 4],
    /// A box value that is not a number (the row's `bad_box`).
    bbox_error: Option<String>,
    mask: Option<String>,
}

/// Reads a manifest's samples, unsorted.
pub(super) fn read_manifest(path: &Loc, classes: &Classes) -> anyhow::Result<Vec<Sample>> {
    let ext = path.extension().unwrap_or_default();
    if !matches!(ext.as_str(), "csv" | "jsonl" | "ndjson" | "parquet") {
        bail!("{path}: not a manifest type: use a .csv, .jsonl, .ndjson or .parquet file");
    }
    let bytes = store::read_all(path).with_context(|| format!("cannot read manifest {path}"))?;
    let rows = match ext.as_str() {
        "csv" => read_csv(path, &bytes)?,
        "parquet" => read_parquet(path, bytes)?,
        _ => read_jsonl(path, &bytes)?,
    };
    to_samples(path, &path.parent(), rows, classes)
}

/// Checks rows and makes samples of them: path present, box complete and ordered, ids unique.
fn to_samples(file: &Loc, base: &Loc, rows: Vec<RawRow>, classes: &Classes) -> anyhow::Result<Vec<Sample>> {
    let f = file;
    let mut seen: HashMap<String, String> = HashMap::with_capacity(rows.len());
    let mut samples = Vec::with_capacity(rows.len());
    for row in rows {
        let at = &row.at;
        let path = row.path.ok_or_else(|| anyhow!("{f} {at}: no path (the `path` column is empty)"))?;
        // A box that cannot be used is the sample's `bad_box`, not the whole job's error.
        let (bbox, box_error) = match (row.bbox_error, row.bbox) {
            (Some(e), _) => (None, Some(format!("{f} {at}: {e}"))),
            (None, [None, None, None, None]) => (None, None),
            (None, [Some(x0), Some(y0), Some(x1), Some(y1)]) => {
                if let Some(i) = [x0, y0, x1, y1].iter().position(|v| !v.is_finite()) {
                    (None, Some(format!("{f} {at}: {} is not a finite number", BBOX[i])))
                } else if x0 >= x1 || y0 >= y1 {
                    let e = format!(
                        "{f} {at}: the box ({x0}, {y0})-({x1}, {y1}) is empty: bbox_x1 must be above bbox_x0 and \
                         bbox_y1 above bbox_y0"
                    );
                    (None, Some(e))
                } else {
                    (Some([x0 as f32, y0 as f32, x1 as f32, y1 as f32]), None)
                }
            }
            (None, partial) => {
                let missing: Vec<&str> =
                    BBOX.iter().zip(partial).filter(|(_, v)| v.is_none()).map(|(n, _)| *n).collect();
                let e = format!(
                    "{f} {at}: {} empty while other box columns are set: give all four of bbox_x0, bbox_y0, \
                     bbox_x1, bbox_y1, or none",
                    missing.join(", ")
                );
                (None, Some(e))
            }
        };
        let id = row.id.unwrap_or_else(|| path.clone());
        if let Some(first) = seen.get(&id) {
            bail!("{f}: duplicate id \"{id}\" at {first} and {at}");
        }
        seen.insert(id.clone(), at.clone());
        let (label, label_error) = match row.label.as_ref().map(|l| classes.resolve(l)) {
            None => (None, None),
            Some(Ok(id)) => (Some(id), None),
            Some(Err(e)) => (None, Some(format!("{f} {at}: {e}"))),
        };
        samples.push(Sample {
            index: 0,
            location: resolve_path(base, &path).with_context(|| format!("{f} {at}"))?,
            id,
            path,
            label,
            label_error,
            bbox,
            box_error,
            mask: row.mask.map(|m| resolve_path(base, &m)).transpose().with_context(|| format!("{f} {at}"))?,
        });
    }
    Ok(samples)
}

/// Refuses a column (or JSON key) named as one of [`COLUMNS`] in other letter case (`ID`,
/// `Label`): read as written it would be silently ignored (ids falling back to paths, boxes
/// incomplete, labels missing).
fn check_case(name: &str) -> anyhow::Result<()> {
    match COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(name) && **c != name) {
        Some(c) => bail!("column `{name}`: column names are lower case; name it `{c}`"),
        None => Ok(()),
    }
}

/// Refuses a header with some of the four box columns but not all: every row would be a
/// `bad_box` for a column that is not there, rather than for a value.
fn box_columns(has: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let (present, absent): (Vec<&str>, Vec<&str>) = BBOX.iter().partition(|name| has(name));
    if !present.is_empty() && !absent.is_empty() {
        bail!(
            "box column(s) {} without {}: give all four of bbox_x0, bbox_y0, bbox_x1, bbox_y1, or none",
            present.join(", "),
            absent.join(", ")
        );
    }
    Ok(())
}

/// A cell's text, `None` when empty.
fn cell(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn read_csv(path: &Loc, bytes: &[u8]) -> anyhow::Result<Vec<RawRow>> {
    let f = path;
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes);
    let headers = reader.headers().map_err(|e| csv_error(path, bytes, e))?.clone();
    let mut col: HashMap<&str, usize> = HashMap::new();
    for (i, h) in headers.iter().enumerate() {
        let h = h.trim();
        check_case(h).map_err(|e| anyhow!("{f} line 1: {e}"))?;
        if let Some(name) = COLUMNS.iter().find(|c| **c == h) {
            if col.insert(name, i).is_some() {
                bail!("{f} line 1: column `{name}` appears twice in the header");
            }
        }
    }
    if !col.contains_key("path") {
        bail!("{f} line 1: no `path` column in the header (found: {})", headers.iter().collect::<Vec<_>>().join(", "));
    }
    box_columns(|name| col.contains_key(name)).map_err(|e| anyhow!("{f} line 1: {e}"))?;
    let mut rows = Vec::new();
    let mut lines = Lines::default();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, bytes, e))?;
        // A record of empty cells only (`,,,`: spreadsheets leave them at the end) is not a row.
        if record.iter().all(|c| c.trim().is_empty()) {
            continue;
        }
        let line = record.position().map_or(0, |p| lines.at(bytes, p));
        let get = |name: &str| col.get(name).and_then(|&i| record.get(i)).and_then(cell);
        let at = format!("line {line}");
        let mut bbox = [None; 4];
        let mut bbox_error = None;
        for (k, name) in BBOX.iter().enumerate() {
            if let Some(v) = get(name) {
                match v.parse::<f64>() {
                    Ok(x) => bbox[k] = Some(x),
                    Err(_) => {
                        bbox_error.get_or_insert(format!("{name} \"{v}\" is not a number"));
                    }
                }
            }
        }
        rows.push(RawRow {
            path: get("path"),
            id: get("id"),
            label: get("label").map(|l| RawLabel::from_text(&l)),
            bbox,
            bbox_error,
            mask: get("mask"),
            at,
        });
    }
    Ok(rows)
}

/// File lines of CSV records, counted from their byte offsets (the csv crate's own line count is
/// one short in files with `\r\n` line ends, where a record's position can be the `\n` that
/// ends the line before it). Records come in file order, so each count goes on from the last.
#[derive(Default)]
struct Lines {
    byte: usize,
    newlines: u64,
}

impl Lines {
    /// The line a record at `p` starts on.
    fn at(&mut self, bytes: &[u8], p: &csv::Position) -> u64 {
        let mut start = (p.byte() as usize).min(bytes.len());
        while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
            start += 1;
        }
        if start < self.byte {
            *self = Lines::default();
        }
        self.newlines += bytes[self.byte..start].iter().filter(|&&b| b == b'\n').count() as u64;
        self.byte = start;
        1 + self.newlines
    }
}

fn csv_error(path: &Loc, bytes: &[u8], e: csv::Error) -> anyhow::Error {
    let f = path;
    // The csv crate's own message carries its record and line numbers, which count differently
    // (one short with `\r\n` line ends): only what is wrong, at the line counted here.
    let what = match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("it has {len} fields, where the lines before it have {expected_len}")
        }
        csv::ErrorKind::Utf8 { err, .. } => format!("field {} is not UTF-8 text", err.field() + 1),
        _ => e.to_string(),
    };
    match e.position() {
        Some(p) => anyhow!("{f} line {}: cannot parse the CSV record: {what}", Lines::default().at(bytes, p)),
        None => anyhow!("{f}: cannot read the CSV manifest: {what}"),
    }
}

fn read_jsonl(path: &Loc, bytes: &[u8]) -> anyhow::Result<Vec<RawRow>> {
    use serde_json::Value;
    let f = path;
    let text = std::str::from_utf8(bytes).with_context(|| format!("manifest {f} is not UTF-8 text"))?;
    // A byte-order mark, as some Windows editors write.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let value: Value = serde_json::from_str(line).map_err(|e| anyhow!("{f} {at}: not valid JSON: {e}"))?;
        let Value::Object(obj) = value else { bail!("{f} {at}: not a JSON object") };
        for key in obj.keys() {
            check_case(key).map_err(|e| anyhow!("{f} {at}: {e}"))?;
        }
        let text_of = |key: &str, numbers_too: bool| -> anyhow::Result<Option<String>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(cell(s)),
                Some(Value::Number(n)) if numbers_too => Ok(Some(n.to_string())),
                Some(other) => bail!("{f} {at}: `{key}` must be a string, not {other}"),
            }
        };
        let label = match obj.get("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => cell(s).map(|s| RawLabel::from_text(&s)),
            Some(Value::Number(n)) => Some(match n.as_i64() {
                Some(id) => RawLabel::Id(id),
                None => n.as_f64().map_or_else(|| RawLabel::Other(n.to_string()), RawLabel::from_float),
            }),
            Some(other) => Some(RawLabel::Other(other.to_string())),
        };
        let mut bbox = [None; 4];
        let mut bbox_error = None;
        for (k, name) in BBOX.iter().enumerate() {
            bbox[k] = match obj.get(*name) {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => n.as_f64(),
                Some(other) => {
                    bbox_error.get_or_insert(format!("{name} must be a number, not {other}"));
                    None
                }
            };
        }
        rows.push(RawRow {
            path: text_of("path", false)?,
            id: text_of("id", true)?,
            label,
            bbox,
            bbox_error,
            mask: text_of("mask", false)?,
            at,
        });
    }
    Ok(rows)
}

fn read_parquet(path: &Loc, bytes: bytes::Bytes) -> anyhow::Result<Vec<RawRow>> {
    let f = path;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(bytes).with_context(|| format!("{f}: not a readable Parquet file"))?;
    let roots: Vec<usize> = builder
        .parquet_schema()
        .root_schema()
        .get_fields()
        .iter()
        .enumerate()
        .filter(|(_, field)| COLUMNS.contains(&field.name()))
        .map(|(i, _)| i)
        .collect();
    for field in builder.parquet_schema().root_schema().get_fields() {
        check_case(field.name()).map_err(|e| anyhow!("{f}: {e}"))?;
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let schema = builder.schema().clone();
    if schema.column_with_name("path").is_none() {
        let names: Vec<&str> = schema.fields().iter().map(|fl| fl.name().as_str()).collect();
        bail!("{f}: no `path` column (found: {})", names.join(", "));
    }
    box_columns(|name| schema.column_with_name(name).is_some()).map_err(|e| anyhow!("{f}: {e}"))?;
    let reader = builder.with_projection(mask).build().with_context(|| format!("{f}: cannot read Parquet"))?;
    let mut rows = Vec::new();
    let mut row_no = 0usize;
    for batch in reader {
        let batch = batch.with_context(|| format!("{f}: cannot read Parquet row group after row {row_no}"))?;
        let column = |name: &str| batch.column_by_name(name).cloned();
        let path_col = strings(path, "path", column("path"), false)?;
        let id_col = strings(path, "id", column("id"), true)?;
        let mask_col = strings(path, "mask", column("mask"), false)?;
        let label_col = labels(path, column("label"))?;
        let mut bbox_cols = Vec::with_capacity(4);
        for name in BBOX {
            bbox_cols.push(floats(path, name, column(name))?);
        }
        for i in 0..batch.num_rows() {
            row_no += 1;
            let text = |c: &Option<ArrayRef>| -> Option<String> {
                let a = c.as_ref()?;
                (!a.is_null(i)).then(|| a.as_string::<i32>().value(i)).and_then(cell)
            };
            let mut bbox = [None; 4];
            for (k, c) in bbox_cols.iter().enumerate() {
                bbox[k] = c.as_ref().and_then(|a| (!a.is_null(i)).then(|| a.as_primitive::<Float64Type>().value(i)));
            }
            rows.push(RawRow {
                at: format!("row {row_no}"),
                path: text(&path_col),
                id: text(&id_col),
                label: label_col.as_ref().and_then(|l| l.get(i)),
                bbox,
                bbox_error: None,
                mask: text(&mask_col),
            });
        }
    }
    Ok(rows)
}

/// The type of a column's values: a dictionary-encoded column (pandas' `category`, pyarrow's
/// `dictionary_encode`) holds its dictionary's type.
fn value_type(t: &DataType) -> &DataType {
    match t {
        DataType::Dictionary(_, v) => value_type(v),
        t => t,
    }
}

fn is_string(t: &DataType) -> bool {
    matches!(value_type(t), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn is_number(t: &DataType) -> bool {
    let t = value_type(t);
    t.is_integer() || t.is_floating() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..))
}

/// A string column (integers too when `integers_too`) cast to Utf8.
fn strings(file: &Loc, name: &str, col: Option<ArrayRef>, integers_too: bool) -> anyhow::Result<Option<ArrayRef>> {
    let Some(col) = col else { return Ok(None) };
    let t = col.data_type();
    if integers_too && value_type(t).is_floating() {
        // pandas writes an integer column with a missing value as floats: whole numbers are
        // the integers they were.
        let f = cast(file, name, &col, &DataType::Float64)?;
        let f = f.as_primitive::<Float64Type>();
        // Above 2^53 a float no longer holds every integer: not an id that was an integer.
        if let Some(v) = f.iter().flatten().find(|v| !v.is_finite() || v.fract() != 0.0 || v.abs() > 2f64.powi(53)) {
            bail!(
                "{file}: column `{name}` has type {t} and holds {v}, not a whole number of at most 2^53; it must \
                 hold strings or integers"
            );
        }
        let whole = cast(file, name, &col, &DataType::Int64)?;
        return cast(file, name, &whole, &DataType::Utf8).map(Some);
    }
    if !(is_string(t) || (integers_too && value_type(t).is_integer())) {
        let want = if integers_too { "strings or integers" } else { "strings" };
        bail!("{}: column `{name}` has type {t}; it must hold {want}", file);
    }
    cast(file, name, &col, &DataType::Utf8).map(Some)
}

/// A numeric column cast to Float64.
fn floats(file: &Loc, name: &str, col: Option<ArrayRef>) -> anyhow::Result<Option<ArrayRef>> {
    let Some(col) = col else { return Ok(None) };
    if !is_number(col.data_type()) {
        bail!("{}: column `{name}` has type {}; it must hold numbers", file, col.data_type());
    }
    cast(file, name, &col, &DataType::Float64).map(Some)
}

fn cast(file: &Loc, name: &str, col: &ArrayRef, to: &DataType) -> anyhow::Result<ArrayRef> {
    arrow::compute::cast(col, to)
        .with_context(|| format!("{}: cannot read column `{name}` of type {} as {to}", file, col.data_type()))
}

/// The label column, whichever type it has.
enum LabelColumn {
    Ids(ArrayRef),
    Floats(ArrayRef),
    Text(ArrayRef),
    Other(ArrayRef),
}

impl LabelColumn {
    fn get(&self, i: usize) -> Option<RawLabel> {
        let a = match self {
            LabelColumn::Ids(a) | LabelColumn::Floats(a) | LabelColumn::Text(a) | LabelColumn::Other(a) => a,
        };
        if a.is_null(i) {
            return None;
        }
        match self {
            LabelColumn::Ids(a) => Some(RawLabel::Id(a.as_primitive::<Int64Type>().value(i))),
            LabelColumn::Floats(a) => Some(RawLabel::from_float(a.as_primitive::<Float64Type>().value(i))),
            LabelColumn::Text(a) => cell(a.as_string::<i32>().value(i)).map(|t| RawLabel::from_text(&t)),
            LabelColumn::Other(a) => {
                let shown = arrow::util::display::array_value_to_string(a, i).unwrap_or_else(|_| "?".to_owned());
                Some(RawLabel::Other(shown))
            }
        }
    }
}

fn labels(file: &Loc, col: Option<ArrayRef>) -> anyhow::Result<Option<LabelColumn>> {
    let Some(col) = col else { return Ok(None) };
    let t = value_type(col.data_type()).clone();
    let out = if t.is_integer() {
        LabelColumn::Ids(cast(file, "label", &col, &DataType::Int64)?)
    } else if t.is_floating() {
        LabelColumn::Floats(cast(file, "label", &col, &DataType::Float64)?)
    } else if is_string(&t) {
        LabelColumn::Text(cast(file, "label", &col, &DataType::Utf8)?)
    } else {
        LabelColumn::Other(cast(file, "label", &col, &t)?)
    };
    Ok(Some(out))
}
