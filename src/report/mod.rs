//! `saliency-audit report OUTPUT_DIR`: per-class summaries, samples ranked by a spurious score,
//! class mean maps and strategy clusters (SpRAy), as a self-contained HTML file, a Parquet table
//! of scores and clusters, and a terminal summary.

pub mod cluster;
mod html;

use crate::decode;
use crate::sink;
use crate::stats;
use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float32Array, Int64Array, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use cluster::{ClusterParams, Clustering};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which score ranks samples as likely spurious.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScoreKind {
    /// The job's named regions if it has any, else the share outside the object.
    Auto,
    /// Attribution share outside the object's mask (or, without one, its box).
    OutsideObject,
    /// Attribution share inside the named region.
    Region(String),
}

impl std::str::FromStr for ScoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "outside" | "outside_object" => Ok(Self::OutsideObject),
            _ => match s.strip_prefix("region:") {
                Some(n) if !n.is_empty() => Ok(Self::Region(n.to_owned())),
                _ => Err(format!("unknown score {s:?}: expected auto, outside or region:<name>")),
            },
        }
    }
}

/// Report settings.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Samples shown per class.
    pub top: usize,
    pub score: ScoreKind,
    pub cluster: ClusterParams,
    /// Where the report goes (default OUTPUT_DIR/report).
    pub out: Option<PathBuf>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self { top: 20, score: ScoreKind::Auto, cluster: ClusterParams::default(), out: None }
    }
}

/// One ok row, as the report needs it.
#[derive(Debug, Clone)]
pub struct Record {
    pub index: u64,
    pub id: String,
    pub path: String,
    pub label: Option<i64>,
    pub predicted: Option<i64>,
    pub predicted_prob: Option<f32>,
    pub entropy: Option<f32>,
    pub bbox_share: Option<f32>,
    pub mask_share: Option<f32>,
    pub region_shares: Vec<Option<f32>>,
    /// Dequantised map, `map_side × map_side`.
    pub map: Vec<f32>,
    pub map_side: usize,
    pub cam: Vec<f32>,
    pub cam_h: usize,
    pub cam_w: usize,
    /// The class the sample is grouped under: its label, else its prediction.
    pub class: i64,
    pub score: Option<f32>,
    pub rank: Option<usize>,
    pub cluster: Option<usize>,
    pub flagged: bool,
}

impl Record {
    /// Share of the attribution outside the object (mask preferred over box).
    pub fn outside_object(&self) -> Option<f32> {
        self.mask_share.or(self.bbox_share).map(|s| (1.0 - s).clamp(0.0, 1.0))
    }
    pub fn max_region(&self) -> Option<f32> {
        self.region_shares.iter().flatten().cloned().fold(None, |a: Option<f32>, b| Some(a.map_or(b, |a| a.max(b))))
    }
}

/// One strategy cluster of a class.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub id: usize,
    pub size: usize,
    pub mean_map: Vec<f32>,
    pub side: usize,
    /// Share of the mean map's mass in its top 10% of pixels.
    pub concentration: f32,
    pub mean_outside_object: Option<f32>,
    pub mean_max_region: Option<f32>,
    pub flagged: bool,
    /// Record positions of the members closest to the cluster's mean map.
    pub top_members: Vec<usize>,
}

/// Per-class numbers.
#[derive(Debug, Clone)]
pub struct ClassSummary {
    pub class: i64,
    pub name: String,
    pub count: usize,
    pub accuracy: Option<f32>,
    pub mean_bbox_share: Option<f32>,
    pub mean_mask_share: Option<f32>,
    pub mean_region_shares: Vec<Option<f32>>,
    pub mean_entropy: Option<f32>,
    /// Mean of the normalised maps, `map_side × map_side`.
    pub mean_map: Vec<f32>,
    pub map_side: usize,
    pub clusters: Vec<ClusterInfo>,
    pub eigenvalues: Vec<f64>,
    /// Record positions, best score first, at most `top`.
    pub ranked: Vec<usize>,
}

/// Everything the report shows.
pub struct Report {
    pub dir: PathBuf,
    pub records: Vec<Record>,
    pub classes: Vec<ClassSummary>,
    pub region_names: Vec<String>,
    pub score_label: String,
    pub failed: BTreeMap<String, usize>,
    pub html_path: PathBuf,
    pub table_path: PathBuf,
    pub metadata: BTreeMap<String, String>,
}

fn mean(v: impl Iterator<Item = f32>) -> Option<f32> {
    let (s, n) = v.fold((0f64, 0usize), |(s, n), x| (s + x as f64, n + 1));
    (n > 0).then(|| (s / n as f64) as f32)
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .with_context(|| format!("output has no column {name}"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("column {name} has an unexpected type"))
}

fn opt_f32(a: &Float32Array, i: usize) -> Option<f32> {
    a.is_valid(i).then(|| a.value(i))
}

fn opt_i64(a: &Int64Array, i: usize) -> Option<i64> {
    a.is_valid(i).then(|| a.value(i))
}

/// Reads an output folder's rows: the ok ones as records, failures counted by status.
fn read_records(dir: &Path, region_names: &[String]) -> Result<(Vec<Record>, BTreeMap<String, usize>)> {
    let mut records = Vec::new();
    let mut failed = BTreeMap::new();
    for b in sink::read_rows(dir)? {
        let (index, id, path) =
            (col::<UInt64Array>(&b, "index")?, col::<StringArray>(&b, "id")?, col::<StringArray>(&b, "path")?);
        let (label, predicted) = (col::<Int64Array>(&b, "label")?, col::<Int64Array>(&b, "predicted")?);
        let status = col::<StringArray>(&b, "status")?;
        let (prob, entropy) = (col::<Float32Array>(&b, "predicted_prob")?, col::<Float32Array>(&b, "attr_entropy")?);
        let (bbox, mask) = (col::<Float32Array>(&b, "bbox_mass_share")?, col::<Float32Array>(&b, "mask_mass_share")?);
        let regions: Vec<&Float32Array> =
            region_names.iter().map(|n| col::<Float32Array>(&b, &sink::region_column(n))).collect::<Result<_>>()?;
        let (png, scale) = (col::<BinaryArray>(&b, "map_png")?, col::<Float32Array>(&b, "map_scale")?);
        let (cam, cam_h, cam_w) =
            (col::<BinaryArray>(&b, "cam")?, col::<UInt32Array>(&b, "cam_h")?, col::<UInt32Array>(&b, "cam_w")?);
        for i in 0..b.num_rows() {
            if status.value(i) != "ok" {
                *failed.entry(status.value(i).to_owned()).or_insert(0) += 1;
                continue;
            }
            let (map, mh, mw) = stats::decode_map_png(png.value(i), scale.value(i))
                .with_context(|| format!("sample {}: map_png", id.value(i)))?;
            anyhow::ensure!(mh == mw, "sample {}: map is {mh}×{mw}, expected square", id.value(i));
            let (label, predicted) = (opt_i64(label, i), opt_i64(predicted, i));
            records.push(Record {
                index: index.value(i),
                id: id.value(i).to_owned(),
                path: path.value(i).to_owned(),
                label,
                predicted,
                predicted_prob: opt_f32(prob, i),
                entropy: opt_f32(entropy, i),
                bbox_share: opt_f32(bbox, i),
                mask_share: opt_f32(mask, i),
                region_shares: regions.iter().map(|r| opt_f32(r, i)).collect(),
                map,
                map_side: mh as usize,
                cam: stats::decode_cam_f16(cam.value(i)),
                cam_h: cam_h.value(i) as usize,
                cam_w: cam_w.value(i) as usize,
                class: label.or(predicted).unwrap_or(-1),
                score: None,
                rank: None,
                cluster: None,
                flagged: false,
            });
        }
    }
    Ok((records, failed))
}

/// Normalised to sum 1 (a zero map stays zero).
fn normalised(m: &[f32]) -> Vec<f32> {
    let s: f64 = m.iter().map(|v| *v as f64).sum();
    if s > 0.0 {
        m.iter().map(|v| (*v as f64 / s) as f32).collect()
    } else {
        m.to_vec()
    }
}

/// Share of a map's mass in its top 10% of pixels.
fn concentration(m: &[f32]) -> f32 {
    let total: f64 = m.iter().map(|v| *v as f64).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let mut v = m.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let k = m.len().div_ceil(10);
    (v[..k].iter().map(|x| *x as f64).sum::<f64>() / total) as f32
}

/// A cluster is a Clever-Hans candidate when its mean map is concentrated (its top 10% of
/// pixels hold at least 40% of the mass) and its members' attribution sits away from the
/// object: on average at least 60% outside the object's mask or box, or, where the job names
/// regions, at least twice the class's average share inside one of them (and at least 5%).
fn flag(c: &ClusterInfo, class_region_mean: Option<f32>) -> bool {
    let away_from_object = c.mean_outside_object.is_some_and(|o| o >= 0.6);
    let in_region = match (c.mean_max_region, class_region_mean) {
        (Some(r), Some(m)) => r >= 0.05 && r >= 2.0 * m,
        _ => false,
    };
    c.concentration >= 0.4 && (away_from_object || in_region)
}

/// Builds the report for an output folder.
pub fn build(dir: &Path, opts: &ReportOptions) -> Result<Report> {
    let metadata = sink::read_metadata(dir)?;
    let class_names: Option<Vec<String>> = metadata
        .get("saliency_audit.class_names")
        .and_then(|s| serde_json::from_str::<Option<Vec<String>>>(s).ok())
        .flatten();
    let regions: Vec<(String, f32, f32, f32, f32)> =
        metadata.get("saliency_audit.regions").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let region_names: Vec<String> = regions.iter().map(|r| r.0.clone()).collect();
    let (mut records, failed) = read_records(dir, &region_names)?;

    // The score.
    let kind = match &opts.score {
        ScoreKind::Auto if !region_names.is_empty() => ScoreKind::Region(String::new()),
        ScoreKind::Auto => ScoreKind::OutsideObject,
        k => k.clone(),
    };
    let score_label = match &kind {
        ScoreKind::Region(n) if n.is_empty() => {
            format!("largest share inside a named region ({})", region_names.join(", "))
        }
        ScoreKind::Region(n) => format!("share inside region {n}"),
        _ => "share outside the object's mask or box".to_owned(),
    };
    let region_pos = match &kind {
        ScoreKind::Region(n) if !n.is_empty() => {
            Some(region_names.iter().position(|r| r == n).with_context(|| format!("the run has no region {n:?}"))?)
        }
        _ => None,
    };
    for r in &mut records {
        r.score = match &kind {
            ScoreKind::Region(_) => match region_pos {
                Some(p) => r.region_shares[p],
                None => r.max_region(),
            },
            _ => r.outside_object(),
        };
    }

    let name_of = |c: i64| -> String {
        class_names.as_ref().and_then(|n| n.get(c as usize).cloned()).unwrap_or_else(|| format!("class {c}"))
    };
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        by_class.entry(r.class).or_default().push(i);
    }
    let mut classes = Vec::new();
    for (class, members) in by_class {
        let rs: Vec<&Record> = members.iter().map(|&i| &records[i]).collect();
        let labelled: Vec<&&Record> = rs.iter().filter(|r| r.label.is_some() && r.predicted.is_some()).collect();
        let accuracy = (!labelled.is_empty())
            .then(|| labelled.iter().filter(|r| r.label == r.predicted).count() as f32 / labelled.len() as f32);
        let side = rs[0].map_side;
        let maps: Vec<Vec<f32>> = rs.iter().map(|r| normalised(&r.map)).collect();
        let mut mean_map = vec![0f32; side * side];
        for m in &maps {
            for (a, b) in mean_map.iter_mut().zip(m) {
                *a += b / maps.len() as f32;
            }
        }
        // Strategy clusters (SpRAy) on the normalised maps.
        let Clustering { labels, eigenvalues, mean_maps, sizes, side: cside, .. } =
            cluster::spray(&maps, side, side, &opts.cluster);
        let class_region_mean = mean(rs.iter().filter_map(|r| r.max_region()));
        let mut clusters = Vec::new();
        for (cid, (mm, size)) in mean_maps.iter().zip(&sizes).enumerate() {
            let idx: Vec<usize> = (0..rs.len()).filter(|&i| labels[i] == cid).collect();
            // Members closest to the cluster's mean map.
            let down = |m: &Vec<f32>| cluster::downsample(m, side, side, cside);
            let mut dist: Vec<(f32, usize)> = idx
                .iter()
                .map(|&i| {
                    let d: f32 = down(&maps[i]).iter().zip(mm).map(|(a, b)| (a - b) * (a - b)).sum();
                    (d, members[i])
                })
                .collect();
            dist.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut info = ClusterInfo {
                id: cid,
                size: *size,
                mean_map: mm.clone(),
                side: cside,
                concentration: concentration(mm),
                mean_outside_object: mean(idx.iter().filter_map(|&i| rs[i].outside_object())),
                mean_max_region: mean(idx.iter().filter_map(|&i| rs[i].max_region())),
                flagged: false,
                top_members: dist.iter().take(6).map(|d| d.1).collect(),
            };
            info.flagged = flag(&info, class_region_mean);
            clusters.push(info);
        }
        for (i, &m) in members.iter().enumerate() {
            records[m].cluster = Some(labels[i]);
            records[m].flagged = clusters[labels[i]].flagged;
        }
        let rs: Vec<&Record> = members.iter().map(|&i| &records[i]).collect();
        let summary = ClassSummary {
            class,
            name: name_of(class),
            count: rs.len(),
            accuracy,
            mean_bbox_share: mean(rs.iter().filter_map(|r| r.bbox_share)),
            mean_mask_share: mean(rs.iter().filter_map(|r| r.mask_share)),
            mean_region_shares: (0..region_names.len())
                .map(|k| mean(rs.iter().filter_map(|r| r.region_shares[k])))
                .collect(),
            mean_entropy: mean(rs.iter().filter_map(|r| r.entropy)),
            mean_map,
            map_side: side,
            clusters,
            eigenvalues,
            ranked: Vec::new(),
        };
        let mut ranked: Vec<usize> = members.iter().copied().filter(|&i| records[i].score.is_some()).collect();
        ranked.sort_by(|&a, &b| records[b].score.unwrap().total_cmp(&records[a].score.unwrap()).then(a.cmp(&b)));
        for (rank, &i) in ranked.iter().enumerate() {
            records[i].rank = Some(rank + 1);
        }
        ranked.truncate(opts.top);
        classes.push(ClassSummary { ranked, ..summary });
    }

    let out = opts.out.clone().unwrap_or_else(|| dir.join("_report"));
    let table_path = sink::write_table(&out, "scores.parquet", &scores_table(&records, &class_names)?, &[])?;
    let mut report = Report {
        dir: dir.to_path_buf(),
        records,
        classes,
        region_names,
        score_label,
        failed,
        html_path: out.join("index.html"),
        table_path,
        metadata,
    };
    let images = html::SampleImages::new(&report);
    let page = html::render(&report, &images, &name_of);
    report.html_path = sink::write_file(&out, "index.html", page.as_bytes())?;
    Ok(report)
}

fn scores_table(records: &[Record], names: &Option<Vec<String>>) -> Result<RecordBatch> {
    let class_name = |c: i64| names.as_ref().and_then(|n| n.get(c as usize).cloned());
    let cols: Vec<(Field, ArrayRef)> = vec![
        (
            Field::new("index", DataType::UInt64, false),
            Arc::new(UInt64Array::from_iter_values(records.iter().map(|r| r.index))),
        ),
        (
            Field::new("id", DataType::Utf8, false),
            Arc::new(StringArray::from_iter_values(records.iter().map(|r| r.id.as_str()))),
        ),
        (
            Field::new("class", DataType::Int64, false),
            Arc::new(Int64Array::from_iter_values(records.iter().map(|r| r.class))),
        ),
        (
            Field::new("class_name", DataType::Utf8, true),
            Arc::new(StringArray::from_iter(records.iter().map(|r| class_name(r.class)))),
        ),
        (Field::new("label", DataType::Int64, true), Arc::new(Int64Array::from_iter(records.iter().map(|r| r.label)))),
        (
            Field::new("predicted", DataType::Int64, true),
            Arc::new(Int64Array::from_iter(records.iter().map(|r| r.predicted))),
        ),
        (
            Field::new("spurious_score", DataType::Float32, true),
            Arc::new(Float32Array::from_iter(records.iter().map(|r| r.score))),
        ),
        (
            Field::new("rank_in_class", DataType::UInt32, true),
            Arc::new(UInt32Array::from_iter(records.iter().map(|r| r.rank.map(|x| x as u32)))),
        ),
        (
            Field::new("outside_object_share", DataType::Float32, true),
            Arc::new(Float32Array::from_iter(records.iter().map(Record::outside_object))),
        ),
        (
            Field::new("max_region_share", DataType::Float32, true),
            Arc::new(Float32Array::from_iter(records.iter().map(Record::max_region))),
        ),
        (
            Field::new("cluster", DataType::UInt32, true),
            Arc::new(UInt32Array::from_iter(records.iter().map(|r| r.cluster.map(|c| c as u32)))),
        ),
        (
            Field::new("cluster_flagged", DataType::Boolean, false),
            Arc::new(BooleanArray::from_iter(records.iter().map(|r| Some(r.flagged)))),
        ),
    ];
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = cols.into_iter().unzip();
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// The terminal summary: a line per class, flagged clusters, failures.
pub fn summary_text(r: &Report) -> String {
    let mut s = String::new();
    let pct = |v: Option<f32>| v.map(|v| format!("{:.1}%", v * 100.0)).unwrap_or_else(|| "-".into());
    let num = |v: Option<f32>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    s.push_str(&format!(
        "{:<20} {:>6} {:>9} {:>9} {:>9} {:>8}{}  clusters (size, * = Clever-Hans candidate)\n",
        "class",
        "count",
        "accuracy",
        "bbox",
        "mask",
        "entropy",
        r.region_names.iter().map(|n| format!(" {:>9}", truncate(n, 9))).collect::<String>()
    ));
    for c in &r.classes {
        let clusters: Vec<String> =
            c.clusters.iter().map(|k| format!("{}{}", k.size, if k.flagged { "*" } else { "" })).collect();
        s.push_str(&format!(
            "{:<20} {:>6} {:>9} {:>9} {:>9} {:>8}{}  {}\n",
            truncate(&c.name, 20),
            c.count,
            pct(c.accuracy),
            num(c.mean_bbox_share),
            num(c.mean_mask_share),
            num(c.mean_entropy),
            c.mean_region_shares.iter().map(|v| format!(" {:>9}", num(*v))).collect::<String>(),
            clusters.join(" ")
        ));
    }
    let flagged: usize = r.classes.iter().map(|c| c.clusters.iter().filter(|k| k.flagged).count()).sum();
    s.push_str(&format!(
        "{} samples, {} classes, {} Clever-Hans candidate cluster(s); ranked by {}\n",
        r.records.len(),
        r.classes.len(),
        flagged,
        r.score_label
    ));
    if !r.failed.is_empty() {
        let f: Vec<String> = r.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s.push_str(&format!("failed rows (not in the report): {}\n", f.join(", ")));
    }
    s.push_str(&format!("report: {}\nscores: {}\n", r.html_path.display(), r.table_path.display()));
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// Re-creates a sample's model-input crop from the run's recorded preprocessing.
pub(crate) fn model_input(report: &Report, rec: &Record) -> Option<(Vec<u8>, u32, u32)> {
    let root = report.metadata.get("saliency_audit.dataset_root")?;
    let pre: serde_json::Value = serde_json::from_str(report.metadata.get("saliency_audit.preprocess")?).ok()?;
    let resize = if let Some(s) = pre["resize"]["shorter_side"].as_u64() {
        decode::Resize::ShorterSide(s as u32)
    } else {
        let e = pre["resize"]["exact"].as_array()?;
        decode::Resize::Exact { h: e.first()?.as_u64()? as u32, w: e.get(1)?.as_u64()? as u32 }
    };
    let crop = pre["crop"].as_array().and_then(|c| Some((c.first()?.as_u64()? as u32, c.get(1)?.as_u64()? as u32)));
    let p = decode::Preprocess { resize, crop, max_pixels: pre["max_pixels"].as_u64().unwrap_or(u64::MAX) };
    let path = Path::new(&rec.path);
    let loc = if path.is_absolute() { path.to_path_buf() } else { Path::new(root).join(path) };
    let d = decode::decode_file(&loc, &p).ok()?;
    Some((d.rgb, d.geometry.out_w, d.geometry.out_h))
}
