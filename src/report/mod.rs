//! `saliency-audit report OUTPUT_DIR`: per-class summaries, samples ranked by a spurious score,
//! class mean maps and strategy clusters (SpRAy), as a self-contained HTML file, a Parquet table
//! of scores and clusters, and a terminal summary.

pub mod cluster;
mod html;

use crate::decode;
use crate::sink;
use crate::stats;
use crate::store::Loc;
use anyhow::{bail, Context, Result};
use arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Float32Array, Int64Array, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use cluster::{ClusterParams, Clustering};
use rayon::prelude::*;
use std::collections::BTreeMap;
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
    pub out: Option<Loc>,
    /// Classes the page gives a section of their own (cluster maps, ranked samples): those
    /// with the most samples in flagged clusters, then the highest mean score. Every class
    /// stays in the page's table and in `scores.parquet`.
    pub max_classes: usize,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self { top: 20, score: ScoreKind::Auto, cluster: ClusterParams::default(), out: None, max_classes: 100 }
    }
}

/// A sample's maps, kept only for the samples the page shows.
#[derive(Debug, Clone)]
pub struct Maps {
    /// Dequantised map, `map_side × map_side`.
    pub map: Vec<f32>,
    pub map_side: usize,
    pub cam: Vec<f32>,
    pub cam_h: usize,
    pub cam_w: usize,
}

/// A sample's maps as the output stores them: kept through the second pass for the samples the
/// page may show, and decoded only for those of the classes it details.
struct EncodedMaps {
    png: Vec<u8>,
    scale: f32,
    cam: Vec<u8>,
    cam_h: usize,
    cam_w: usize,
}

impl EncodedMaps {
    fn decode(&self, id: &str) -> Result<Maps> {
        let (map, map_side) = decode_square_map(&self.png, self.scale, id)?;
        let cam = stats::decode_cam_f16(&self.cam);
        let (cam_h, cam_w) = (self.cam_h, self.cam_w);
        anyhow::ensure!(
            cam.len() == cam_h.saturating_mul(cam_w),
            "sample {id}: cam holds {} values, cam_h × cam_w is {cam_h}×{cam_w}",
            cam.len()
        );
        Ok(Maps { map, map_side, cam, cam_h, cam_w })
    }
}

/// Sample `id`'s stored map (`map_png`, `map_scale`) dequantised, and its side.
fn decode_square_map(png: &[u8], scale: f32, id: &str) -> Result<(Vec<f32>, usize)> {
    let (map, h, w) = stats::decode_map_png(png, scale).with_context(|| format!("sample {id}: map_png"))?;
    anyhow::ensure!(h == w, "sample {id}: map is {h}×{w}, expected square");
    Ok((map, h as usize))
}

/// One ok row, as the report needs it.
#[derive(Debug, Clone)]
pub struct Record {
    pub index: u64,
    pub id: String,
    pub path: String,
    pub label: Option<i64>,
    /// The class the map explains.
    pub target: Option<i64>,
    pub predicted: Option<i64>,
    pub predicted_prob: Option<f32>,
    pub entropy: Option<f32>,
    pub bbox_share: Option<f32>,
    pub mask_share: Option<f32>,
    pub region_shares: Vec<Option<f32>>,
    /// The class the sample is grouped under: the class its map explains (its target), so that
    /// one class's maps are compared with maps of the same class; else its label, else its
    /// prediction.
    pub class: i64,
    pub score: Option<f32>,
    pub rank: Option<usize>,
    pub cluster: Option<usize>,
    /// Its cluster is a Clever-Hans candidate.
    pub flagged: bool,
    /// It is in such a cluster and its own attribution takes the shortcut ([`shows_shortcut`]):
    /// a flagged cluster may hold members that do not (a class whose maps do not fall apart).
    pub shortcut: bool,
    pub maps: Option<Maps>,
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
    /// Per named region, the members' mean share inside it.
    pub mean_region_shares: Vec<Option<f32>>,
    /// Members whose map is all zeros (no attribution to share out).
    pub without_mass: usize,
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
    pub dir: Loc,
    pub records: Vec<Record>,
    pub classes: Vec<ClassSummary>,
    /// The classes (`ClassSummary::class`) that get a section of their own on the page.
    pub detailed: std::collections::BTreeSet<i64>,
    /// Set when the output holds only part of its dataset (shards unfinished): says how much.
    pub incomplete: Option<String>,
    pub region_names: Vec<String>,
    pub score_label: String,
    pub failed: BTreeMap<String, usize>,
    pub html_path: Loc,
    pub table_path: Loc,
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

/// A statistic, or `None` where it is null or not a finite number (the pipeline writes null,
/// but a file written by other means might hold NaN, which would top every ranking).
fn opt_f32(a: &Float32Array, i: usize) -> Option<f32> {
    a.is_valid(i).then(|| a.value(i)).filter(|v| v.is_finite())
}

fn opt_i64(a: &Int64Array, i: usize) -> Option<i64> {
    a.is_valid(i).then(|| a.value(i))
}

/// The columns of one record batch the report reads.
struct Cols<'a> {
    index: &'a UInt64Array,
    id: &'a StringArray,
    path: &'a StringArray,
    label: &'a Int64Array,
    target: &'a Int64Array,
    predicted: &'a Int64Array,
    status: &'a StringArray,
    prob: &'a Float32Array,
    entropy: &'a Float32Array,
    bbox: &'a Float32Array,
    mask: &'a Float32Array,
    regions: Vec<&'a Float32Array>,
    png: &'a BinaryArray,
    scale: &'a Float32Array,
    cam: &'a BinaryArray,
    cam_h: &'a UInt32Array,
    cam_w: &'a UInt32Array,
}

impl<'a> Cols<'a> {
    fn of(b: &'a RecordBatch, region_names: &[String]) -> Result<Self> {
        Ok(Self {
            index: col(b, "index")?,
            id: col(b, "id")?,
            path: col(b, "path")?,
            label: col(b, "label")?,
            target: col(b, "target")?,
            predicted: col(b, "predicted")?,
            status: col(b, "status")?,
            prob: col(b, "predicted_prob")?,
            entropy: col(b, "attr_entropy")?,
            bbox: col(b, "bbox_mass_share")?,
            mask: col(b, "mask_mass_share")?,
            regions: region_names
                .iter()
                .map(|n| col::<Float32Array>(b, &sink::region_column(n)))
                .collect::<Result<_>>()?,
            png: col(b, "map_png")?,
            scale: col(b, "map_scale")?,
            cam: col(b, "cam")?,
            cam_h: col(b, "cam_h")?,
            cam_w: col(b, "cam_w")?,
        })
    }

    fn map(&self, i: usize) -> Result<(Vec<f32>, usize)> {
        decode_square_map(self.png.value(i), self.scale.value(i), self.id.value(i))
    }

    /// Row i's maps as stored (a few KB), to be decoded only if the page shows them.
    fn encoded_maps(&self, i: usize) -> EncodedMaps {
        EncodedMaps {
            png: self.png.value(i).to_vec(),
            scale: self.scale.value(i),
            cam: self.cam.value(i).to_vec(),
            cam_h: self.cam_h.value(i) as usize,
            cam_w: self.cam_w.value(i) as usize,
        }
    }

    fn record(&self, i: usize) -> Record {
        let (label, target, predicted) = (opt_i64(self.label, i), opt_i64(self.target, i), opt_i64(self.predicted, i));
        Record {
            index: self.index.value(i),
            id: self.id.value(i).to_owned(),
            path: self.path.value(i).to_owned(),
            label,
            target,
            predicted,
            predicted_prob: opt_f32(self.prob, i),
            entropy: opt_f32(self.entropy, i),
            bbox_share: opt_f32(self.bbox, i),
            mask_share: opt_f32(self.mask, i),
            region_shares: self.regions.iter().map(|r| opt_f32(r, i)).collect(),
            class: target.or(label).or(predicted).unwrap_or(-1),
            score: None,
            rank: None,
            cluster: None,
            flagged: false,
            shortcut: false,
            maps: None,
        }
    }
}

/// Per-class state of the first pass: the running mean map and a uniform, deterministic
/// subsample (the `max_samples` smallest hashes of the sample id) of clustering features.
struct ClassScan {
    sum: Vec<f64>,
    side: usize,
    count: usize,
    /// (hash, record position) of the kept samples; the largest hash on top.
    kept: std::collections::BinaryHeap<(u64, usize)>,
    features: std::collections::HashMap<usize, Vec<f32>>,
}

/// A stable hash of a sample id: the subsample, and the order the clustering sees it in, depend
/// on the ids only, so an output written in shards gives the clusters of one written whole.
fn id_hash(id: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(id.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What the first pass returns: records, failed rows per status, per-class state.
type Scanned = (Vec<Record>, BTreeMap<String, usize>, BTreeMap<i64, ClassScan>);

/// First pass over the output, one batch at a time: the ok rows as records (without maps),
/// failures counted by status, class mean maps, and a bounded subsample of clustering features
/// per class. Memory grows with the number of rows by their scalar fields, and with the number
/// of classes by a mean map and up to `max_samples` clustering features (`side²` floats) each.
fn scan(parts: &sink::Parts, region_names: &[String], p: &ClusterParams) -> Result<Scanned> {
    let mut records = Vec::new();
    let mut failed = BTreeMap::new();
    let mut classes: BTreeMap<i64, ClassScan> = BTreeMap::new();
    let cap = p.max_samples.max(1);
    parts.for_each_batch(|b| {
        let c = Cols::of(&b, region_names)?;
        for i in 0..b.num_rows() {
            if c.status.value(i) != "ok" {
                *failed.entry(c.status.value(i).to_owned()).or_insert(0) += 1;
                continue;
            }
            let rec = c.record(i);
            let (map, side) = c.map(i)?;
            let e = classes.entry(rec.class).or_insert_with(|| ClassScan {
                sum: vec![0.0; side * side],
                side,
                count: 0,
                kept: Default::default(),
                features: Default::default(),
            });
            anyhow::ensure!(side == e.side, "sample {}: map size differs from the class's other maps", rec.id);
            let norm = normalised(&map);
            for (a, v) in e.sum.iter_mut().zip(&norm) {
                *a += *v as f64;
            }
            e.count += 1;
            let pos = records.len();
            let h = splitmix(id_hash(&rec.id) ^ p.seed);
            if e.kept.len() < cap || e.kept.peek().is_some_and(|top| h < top.0) {
                if e.kept.len() == cap {
                    let (_, out) = e.kept.pop().expect("full");
                    e.features.remove(&out);
                }
                e.kept.push((h, pos));
                e.features.insert(pos, cluster::downsample(&map, side, side, p.side));
            }
            records.push(rec);
        }
        Ok(())
    })?;
    Ok((records, failed, classes))
}

/// Normalised to sum 1, with negative and non-finite values (a map of a file not written by
/// this tool, a NaN `map_scale`) taken as 0, as the clustering takes them, so that one such map
/// cannot spoil a class's mean map; a zero map stays zero.
fn normalised(m: &[f32]) -> Vec<f32> {
    let s: f64 = m.iter().map(|&v| crate::stats::clean(v) as f64).sum();
    if s > 0.0 {
        m.iter().map(|&v| (crate::stats::clean(v) as f64 / s) as f32).collect()
    } else {
        vec![0.0; m.len()]
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
/// regions, in one region k at least 5% and at least twice both what an even spread would put
/// there (`region_areas[k]`, the region's share of the image) and the average of the rest of
/// the class there (`rest_region_means[k]`; `None` when the cluster is the whole class, which
/// then needs only the first two: a shortcut most of a class takes is still a shortcut). At
/// least half its members must have attribution at all: a cluster of mostly all-zero maps
/// (a class the model gives no gradient) says nothing about where the rest look.
fn flag(c: &ClusterInfo, rest_region_means: &[Option<f32>], region_areas: &[f32]) -> bool {
    if c.without_mass * 2 > c.size {
        return false;
    }
    let (away_from_object, in_regions) = shortcuts(c, rest_region_means, region_areas);
    c.concentration >= 0.4 && (away_from_object || !in_regions.is_empty())
}

/// The shortcuts a cluster's members take on average, as [`flag`] judges them: away from the
/// object, and the named regions (their indices) it sits in.
fn shortcuts(c: &ClusterInfo, rest_region_means: &[Option<f32>], region_areas: &[f32]) -> (bool, Vec<usize>) {
    let away_from_object = c.mean_outside_object.is_some_and(|o| o >= 0.6);
    let in_regions = (0..c.mean_region_shares.len())
        .filter(|&k| {
            let area = region_areas.get(k).copied().unwrap_or(0.0);
            let rest = rest_region_means.get(k).copied().flatten();
            c.mean_region_shares[k].is_some_and(|r| r >= 0.05 && r >= 2.0 * area && rest.is_none_or(|m| r >= 2.0 * m))
        })
        .collect();
    (away_from_object, in_regions)
}

/// Whether a sample's own attribution takes its flagged cluster's shortcut, `(away from the
/// object, regions)` as [`shortcuts`] found it: at least 60% outside the object, or in one of
/// those regions at least 5% and twice the region's share of the image.
fn shows_shortcut(r: &Record, (away_from_object, in_regions): &(bool, Vec<usize>), region_areas: &[f32]) -> bool {
    let in_region = in_regions.iter().any(|&k| {
        let area = region_areas.get(k).copied().unwrap_or(0.0);
        r.region_shares.get(k).copied().flatten().is_some_and(|s| s >= 0.05 && s >= 2.0 * area)
    });
    (*away_from_object && r.outside_object().is_some_and(|o| o >= 0.6)) || in_region
}

/// Set when no sample has a score, which happens when the output has no object boxes or masks
/// and the job names no regions: says so, since every ranking is then empty.
pub fn unranked_note(r: &Report) -> Option<String> {
    if r.records.is_empty() {
        return Some("no row succeeded, so there is nothing to rank or cluster".to_owned());
    }
    (!r.records.iter().any(|x| x.score.is_some())).then(|| {
        format!(
            "no sample has a {} (the output has no object boxes or masks{}), so none is ranked; the \
             clusters still show each class's strategies",
            r.score_label,
            if r.region_names.is_empty() { ", and the job names no regions" } else { "" }
        )
    })
}

/// Maps smaller than this side (the job's `output.map_size`) are too coarse for the clusters
/// and for the concentration test that flags Clever-Hans candidates.
pub const MIN_MAP_SIDE: usize = 8;

/// Set when the stored maps are smaller than [`MIN_MAP_SIDE`]: says that clusters and flags
/// cannot be trusted (a 1×1 map is uniform; no cluster is ever concentrated).
pub fn coarse_maps_note(r: &Report) -> Option<String> {
    let side = r.records.iter().find_map(|x| x.maps.as_ref().map(|m| m.map_side))?;
    (side < MIN_MAP_SIDE).then(|| {
        format!(
            "the maps are stored at {side}x{side} (output.map_size): too coarse to tell strategies apart, so \
             clusters and Clever-Hans flags mean little (they need a map_size of {MIN_MAP_SIDE} or more); the \
             scores from boxes, masks and regions are computed at full size and stand"
        )
    })
}

/// What is missing from an output that holds `rows_read` rows, or `None` when it is whole.
fn incomplete_note(c: &sink::Coverage, rows_read: u64) -> Option<String> {
    let unfinished = || c.unfinished.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    match c.expected_rows {
        Some(expected) if rows_read == expected => None,
        Some(expected) if rows_read > expected => Some(format!(
            "the output holds {rows_read} rows, more than the dataset's {expected}: parts that are not this \
             job's were added to the folder; the numbers cover them all"
        )),
        Some(expected) if c.unfinished.is_empty() => Some(format!(
            "incomplete output: {rows_read} of the dataset's {expected} rows, although every shard finished: \
             parts are missing from the folder; the numbers cover only those rows"
        )),
        Some(expected) => Some(format!(
            "incomplete output: {rows_read} of the dataset's {expected} rows (shard(s) {} of {} not finished); \
             the numbers cover only those rows",
            unfinished(),
            c.num_shards
        )),
        None if c.unfinished.is_empty() => None,
        None => Some(format!(
            "incomplete output: {rows_read} rows, shard(s) {} of {} not finished; the numbers cover only those rows",
            unfinished(),
            c.num_shards
        )),
    }
}

/// The classes that get a section on the page: up to `max` of them, those with the most
/// samples in flagged clusters first, then the highest mean score, then the largest.
fn detailed_classes(classes: &[ClassSummary], records: &[Record], max: usize) -> std::collections::BTreeSet<i64> {
    let mut score_sums: BTreeMap<i64, (f64, usize)> = BTreeMap::new();
    for r in records {
        if let Some(v) = r.score {
            let e = score_sums.entry(r.class).or_default();
            (e.0, e.1) = (e.0 + v as f64, e.1 + 1);
        }
    }
    let mut order: Vec<(usize, f32, usize, i64)> = classes
        .iter()
        .map(|c| {
            let flagged: usize = c.clusters.iter().filter(|k| k.flagged).map(|k| k.size).sum();
            let mean_score = score_sums.get(&c.class).map_or(0.0, |&(s, n)| (s / n as f64) as f32);
            (flagged, mean_score, c.count, c.class)
        })
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3)));
    order.into_iter().take(max).map(|o| o.3).collect()
}

/// Numbers each class's clusters again by their size once every sample has joined one, largest
/// first (the clustering numbers them by their size within its subsample), in the records,
/// the clusterings and the `closest` lists; returns the lists under their new numbers.
fn renumber_by_size(
    records: &mut [Record],
    clusterings: &mut BTreeMap<i64, Clustering>,
    closest: BTreeMap<(i64, usize), Vec<(f32, usize)>>,
) -> BTreeMap<(i64, usize), Vec<(f32, usize)>> {
    let mut sizes: BTreeMap<(i64, usize), usize> = BTreeMap::new();
    for r in records.iter() {
        if let Some(c) = r.cluster {
            *sizes.entry((r.class, c)).or_default() += 1;
        }
    }
    let mut new_of: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (class, cl) in clusterings.iter_mut() {
        let size = |c: usize| sizes.get(&(*class, c)).copied().unwrap_or(0);
        let mut order: Vec<usize> = (0..cl.mean_maps.len()).collect();
        order.sort_by_key(|&c| (std::cmp::Reverse(size(c)), c));
        let mut map = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            map[old] = new;
        }
        cl.mean_maps = order.iter().map(|&o| std::mem::take(&mut cl.mean_maps[o])).collect();
        cl.sizes = order.iter().map(|&o| size(o)).collect();
        for l in &mut cl.labels {
            *l = map.get(*l).copied().unwrap_or(*l);
        }
        new_of.insert(*class, map);
    }
    let renumber = |class: i64, c: usize| new_of.get(&class).and_then(|m| m.get(c)).copied().unwrap_or(c);
    for r in records.iter_mut() {
        r.cluster = r.cluster.map(|c| renumber(r.class, c));
    }
    closest.into_iter().map(|((class, c), list)| ((class, renumber(class, c)), list)).collect()
}

/// Refuses a report folder `out` that would put its files among the output's parts: the folder
/// itself, or one inside it whose name does not start with `_` or `.` (which folder readers such
/// as pyarrow skip; the default is `_report`).
fn check_out(dir: &Loc, out: &Loc) -> Result<()> {
    let inside: Option<Vec<String>> = match (dir, out) {
        (Loc::Local(d), Loc::Local(o)) => {
            let (d, o) = (std::path::absolute(d)?, std::path::absolute(o)?);
            let norm = |p: &std::path::Path| -> Vec<String> {
                let mut v: Vec<String> = Vec::new();
                for c in p.components() {
                    match c {
                        std::path::Component::ParentDir => {
                            v.pop();
                        }
                        std::path::Component::Normal(n) => v.push(n.to_string_lossy().into_owned()),
                        _ => {}
                    }
                }
                v
            };
            let (d, o) = (norm(&d), norm(&o));
            o.starts_with(&d).then(|| o[d.len()..].to_vec())
        }
        (Loc::Remote { bucket: b1, key: k1 }, Loc::Remote { bucket: b2, key: k2 }) if b1 == b2 => {
            let (d, o): (Vec<&str>, Vec<&str>) =
                (k1.split('/').filter(|s| !s.is_empty()).collect(), k2.split('/').filter(|s| !s.is_empty()).collect());
            o.starts_with(&d).then(|| o[d.len()..].iter().map(|s| s.to_string()).collect())
        }
        _ => None,
    };
    match inside.as_deref() {
        Some([]) => bail!("--out {out} is the output folder itself: the report's files would be read as its parts"),
        Some([first, ..]) if !first.starts_with('_') && !first.starts_with('.') => bail!(
            "--out {out} is inside the output folder under a name that folder readers take for data (`{first}`): \
             give it a name starting with `_` (the default is `_report`) or put it elsewhere"
        ),
        _ => Ok(()),
    }
}

/// Builds the report for an output folder in two streaming passes: the first collects every
/// row's scalars, class mean maps and a bounded subsample per class for clustering; the second
/// assigns every other sample to its nearest cluster and keeps the maps of the samples shown.
pub fn build(dir: impl Into<Loc>, opts: &ReportOptions) -> Result<Report> {
    let dir = &dir.into();
    if let Some(out) = &opts.out {
        check_out(dir, out)?;
    }
    // One listing for the metadata, the shards' coverage and both passes over the parts: from
    // an object store, each part is downloaded once.
    let parts = sink::Parts::list(dir, true)?;
    let metadata = parts.metadata()?;
    let class_names: Option<Vec<String>> = metadata
        .get("saliency_audit.class_names")
        .and_then(|s| serde_json::from_str::<Option<Vec<String>>>(s).ok())
        .flatten();
    let regions: Vec<(String, f32, f32, f32, f32)> =
        metadata.get("saliency_audit.regions").and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default();
    let region_names: Vec<String> = regions.iter().map(|r| r.0.clone()).collect();
    // What an even spread of attribution puts into each region.
    let region_areas: Vec<f32> = regions.iter().map(|r| ((r.3 - r.1) * (r.4 - r.2)).clamp(0.0, 1.0)).collect();
    let p = &opts.cluster;
    let coverage = parts.coverage()?;
    let (mut records, failed, scans) = scan(&parts, &region_names, p)?;
    let rows_read = records.len() as u64 + failed.values().sum::<usize>() as u64;
    let incomplete = incomplete_note(&coverage, rows_read);
    if let Some(note) = &incomplete {
        tracing::warn!("{dir}: {note}");
    }

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
            Some(region_names.iter().position(|r| r == n).with_context(|| match region_names.is_empty() {
                true => format!("the run has no region {n:?} (its job names no regions)"),
                false => format!("the run has no region {n:?} (its regions: {})", region_names.join(", ")),
            })?)
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

    // Ranking (scalars only) and the clustering of each class's subsample.
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        by_class.entry(r.class).or_default().push(i);
    }
    let mut ranked_of: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    let mut wanted = std::collections::HashSet::new();
    for (class, members) in &by_class {
        let mut ranked: Vec<usize> = members.iter().copied().filter(|&i| records[i].score.is_some()).collect();
        // Equal scores in id order, which does not depend on how the output was sharded.
        ranked.sort_by(|&a, &b| {
            records[b]
                .score
                .unwrap()
                .total_cmp(&records[a].score.unwrap())
                .then_with(|| records[a].id.cmp(&records[b].id))
        });
        for (rank, &i) in ranked.iter().enumerate() {
            records[i].rank = Some(rank + 1);
        }
        ranked.truncate(opts.top);
        wanted.extend(ranked.iter().copied());
        ranked_of.insert(*class, ranked);
    }
    // The classes are clustered in parallel (each one's eigen-decomposition is the report's
    // largest cost).
    let clustered: Vec<(i64, Vec<usize>, Clustering)> = scans
        .par_iter()
        .map(|(class, sc)| {
            // In hash order: the same samples in the same order however the rows were split.
            let mut kept: Vec<(u64, usize)> = sc.kept.iter().copied().collect();
            kept.sort_unstable();
            let pos: Vec<usize> = kept.into_iter().map(|(_, q)| q).collect();
            let feats: Vec<&[f32]> = pos.iter().map(|q| sc.features[q].as_slice()).collect();
            let side = p.side.max(1);
            (*class, pos, cluster::spray(&feats, side, side, p))
        })
        .collect();
    let mut clusterings: BTreeMap<i64, Clustering> = BTreeMap::new();
    for (class, pos, cl) in clustered {
        for (k, q) in pos.iter().enumerate() {
            records[*q].cluster = Some(cl.labels[k]);
        }
        clusterings.insert(class, cl);
    }

    // Second pass: every other sample to its nearest cluster; the members closest to each
    // cluster's mean; the maps of the samples the page shows.
    const MEMBERS: usize = 6;
    let mut closest: BTreeMap<(i64, usize), Vec<(f32, usize)>> = BTreeMap::new();
    let mut kept_maps: std::collections::HashMap<usize, EncodedMaps> = Default::default();
    let mut pos = 0usize;
    parts.for_each_batch(|b| {
        let c = Cols::of(&b, &region_names)?;
        for i in 0..b.num_rows() {
            if c.status.value(i) != "ok" {
                continue;
            }
            let rec = &mut records[pos];
            anyhow::ensure!(rec.index == c.index.value(i), "the output changed while the report was read");
            let cl = &clusterings[&rec.class];
            let (map, side) = c.map(i)?;
            let feat = cluster::downsample(&map, side, side, cl.side);
            let dist = |m: &Vec<f32>| feat.iter().zip(m).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
            let label = match rec.cluster {
                Some(l) => l,
                None => {
                    let l = (0..cl.mean_maps.len())
                        .min_by(|&a, &b| dist(&cl.mean_maps[a]).total_cmp(&dist(&cl.mean_maps[b])));
                    let l = l.unwrap_or(0);
                    rec.cluster = Some(l);
                    l
                }
            };
            let d = cl.mean_maps.get(label).map(dist).unwrap_or(0.0);
            let list = closest.entry((rec.class, label)).or_default();
            let keep = list.len() < MEMBERS || list.last().is_some_and(|l| d < l.0);
            if keep {
                list.push((d, pos));
                list.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                if list.len() > MEMBERS {
                    let (_, out) = list.pop().expect("longer than MEMBERS");
                    if !wanted.contains(&out) {
                        kept_maps.remove(&out);
                    }
                }
            }
            if wanted.contains(&pos) || keep {
                kept_maps.insert(pos, c.encoded_maps(i));
            }
            pos += 1;
        }
        Ok(())
    })?;
    anyhow::ensure!(pos == records.len(), "the output changed while the report was read");
    drop(parts); // the local copies of remote parts go now
    let closest = renumber_by_size(&mut records, &mut clusterings, closest);

    let mut classes = Vec::new();
    for (class, members) in by_class {
        let sc = &scans[&class];
        let cl = &clusterings[&class];
        let rs: Vec<&Record> = members.iter().map(|&i| &records[i]).collect();
        let labelled: Vec<&&Record> = rs.iter().filter(|r| r.label.is_some() && r.predicted.is_some()).collect();
        let accuracy = (!labelled.is_empty())
            .then(|| labelled.iter().filter(|r| r.label == r.predicted).count() as f32 / labelled.len() as f32);
        let mut clusters = Vec::new();
        // Per cluster, the shortcuts its members take on average (a member's card is marked
        // where it takes one of them itself).
        let mut taken = Vec::new();
        for (cid, mm) in cl.mean_maps.iter().enumerate() {
            let idx: Vec<&&Record> = rs.iter().filter(|r| r.cluster == Some(cid)).collect();
            let mut info = ClusterInfo {
                id: cid,
                size: idx.len(),
                mean_map: mm.clone(),
                side: cl.side,
                concentration: concentration(mm),
                mean_outside_object: mean(idx.iter().filter_map(|r| r.outside_object())),
                mean_max_region: mean(idx.iter().filter_map(|r| r.max_region())),
                mean_region_shares: (0..region_names.len())
                    .map(|k| mean(idx.iter().filter_map(|r| r.region_shares[k])))
                    .collect(),
                // An all-zero map has no entropy (nor any share).
                without_mass: idx.iter().filter(|r| r.entropy.is_none()).count(),
                flagged: false,
                top_members: closest.get(&(class, cid)).map(|l| l.iter().map(|x| x.1).collect()).unwrap_or_default(),
            };
            let rest_region_means: Vec<Option<f32>> = (0..region_names.len())
                .map(|k| mean(rs.iter().filter(|r| r.cluster != Some(cid)).filter_map(|r| r.region_shares[k])))
                .collect();
            info.flagged = flag(&info, &rest_region_means, &region_areas);
            taken.push(shortcuts(&info, &rest_region_means, &region_areas));
            clusters.push(info);
        }
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
            mean_map: sc.sum.iter().map(|v| (*v / sc.count.max(1) as f64) as f32).collect(),
            map_side: sc.side,
            eigenvalues: cl.eigenvalues.clone(),
            ranked: ranked_of.remove(&class).unwrap_or_default(),
            clusters,
        };
        for &m in &members {
            let c = records[m].cluster.unwrap_or(0);
            records[m].flagged = summary.clusters.get(c).is_some_and(|k| k.flagged);
            records[m].shortcut =
                records[m].flagged && taken.get(c).is_some_and(|t| shows_shortcut(&records[m], t, &region_areas));
        }
        classes.push(summary);
    }

    let out = match &opts.out {
        Some(o) => o.clone(),
        None => dir.join("_report")?,
    };
    let table_path = sink::write_table(&out, "scores.parquet", &scores_table(&records, &class_names)?, &[])?;
    let detailed = detailed_classes(&classes, &records, opts.max_classes);
    for (q, m) in kept_maps {
        if detailed.contains(&records[q].class) {
            records[q].maps = Some(m.decode(&records[q].id)?);
        }
    }
    let mut report = Report {
        dir: dir.clone(),
        records,
        classes,
        detailed,
        incomplete,
        region_names,
        score_label,
        failed,
        html_path: out.join("index.html")?,
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
            Field::new("target", DataType::Int64, true),
            Arc::new(Int64Array::from_iter(records.iter().map(|r| r.target))),
        ),
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
        (
            Field::new("shows_shortcut", DataType::Boolean, false),
            Arc::new(BooleanArray::from_iter(records.iter().map(|r| Some(r.shortcut)))),
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
        r.region_names.iter().map(|n| format!(" {}", fit(n, 9, true))).collect::<String>()
    ));
    for c in &r.classes {
        let clusters: Vec<String> =
            c.clusters.iter().map(|k| format!("{}{}", k.size, if k.flagged { "*" } else { "" })).collect();
        s.push_str(&format!(
            "{} {:>6} {:>9} {:>9} {:>9} {:>8}{}  {}\n",
            fit(&c.name, 20, false),
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
    if let Some(note) = unranked_note(r) {
        s.push_str(&format!("{note}\n"));
    }
    if let Some(note) = coarse_maps_note(r) {
        s.push_str(&format!("warning: {note}\n"));
    }
    if !r.failed.is_empty() {
        let f: Vec<String> = r.failed.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s.push_str(&format!("failed rows (not in the report): {}\n", f.join(", ")));
    }
    if let Some(note) = &r.incomplete {
        s.push_str(&format!("warning: {note}\n"));
    }
    if r.detailed.len() < r.classes.len() {
        s.push_str(&format!(
            "the page details {} of {} classes (--max-classes): those with the most samples in flagged \
             clusters, then the highest mean score\n",
            r.detailed.len(),
            r.classes.len()
        ));
    }
    s.push_str(&format!("report: {}\nscores: {}\n", r.html_path, r.table_path));
    s
}

/// `s` cut to `n` columns of a terminal (a CJK character or an emoji takes two) and padded to
/// them, on the left (`right`: aligned right).
fn fit(s: &str, n: usize, right: bool) -> String {
    let cut = console::truncate_str(s, n, "…");
    let align = if right { console::Alignment::Right } else { console::Alignment::Left };
    console::pad_str(&cut, n, align, None).into_owned()
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
    let p = decode::Preprocess {
        resize,
        crop,
        max_pixels: pre["max_pixels"].as_u64().unwrap_or(u64::MAX),
        jpeg_dct_scaling: pre["jpeg_dct_scaling"].as_bool().unwrap_or(false),
    };
    let loc = Loc::parse(root).ok()?.join(&rec.path).ok()?;
    let d = decode::decode_file(loc, &p).ok()?;
    Some((d.rgb, d.geometry.out_w, d.geometry.out_h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_folder_among_the_parts_is_refused() {
        let local = |p: &str| Loc::Local(std::path::PathBuf::from(p));
        let dir = local("/data/out");
        assert!(check_out(&dir, &local("/data/out/_report")).is_ok());
        assert!(check_out(&dir, &local("/data/out/.r")).is_ok());
        assert!(check_out(&dir, &local("/data/report")).is_ok());
        assert!(check_out(&dir, &local("/data/outside")).is_ok(), "a sibling whose name starts alike");
        let e = check_out(&dir, &local("/data/out/")).unwrap_err().to_string();
        assert!(e.contains("the output folder itself"), "{e}");
        let e = check_out(&dir, &local("/data/x/../out/html")).unwrap_err().to_string();
        assert!(e.contains("`html`"), "{e}");
        let remote = |k: &str| Loc::Remote { bucket: "s3://b".into(), key: k.into() };
        assert!(check_out(&remote("runs/a"), &remote("runs/a/_report")).is_ok());
        assert!(check_out(&remote("runs/a"), &remote("runs/a")).is_err());
        assert!(check_out(&remote("runs/a"), &remote("runs/a/report")).is_err());
        assert!(check_out(&remote("runs/a"), &remote("runs/ab")).is_ok());
    }

    fn cluster(size: usize, concentration: f32, outside: Option<f32>, region: Option<f32>) -> ClusterInfo {
        ClusterInfo {
            id: 0,
            size,
            mean_map: vec![],
            side: 1,
            concentration,
            mean_outside_object: outside,
            mean_max_region: region,
            mean_region_shares: vec![region],
            without_mass: 0,
            flagged: false,
            top_members: vec![],
        }
    }

    /// The terminal summary's columns hold names in wide scripts: padded and cut by columns.
    #[test]
    fn summary_columns_fit_wide_names() {
        let width = console::measure_text_width;
        // Two columns a character: the padding counts columns, not characters.
        assert_eq!(width(&super::fit("猫と犬", 20, false)), 20);
        assert!(super::fit("猫と犬", 20, false).starts_with("猫と犬 "));
        let long = super::fit(&"長い名前".repeat(10), 20, false);
        assert!(width(&long) == 20 && long.contains('…'), "{long:?}");
        assert_eq!(super::fit("mark", 9, true), "     mark");
    }

    /// The region rule compares a cluster with the rest of its class and with an even spread,
    /// region by region, so a shortcut that most (or all) of a class takes is flagged; one the
    /// rest of the class shares, or one no stronger than an even spread, is not.
    #[test]
    fn flag_rule() {
        // The demo's mark region.
        let area = [0.18 * 0.18];
        // The whole class in one cluster, 45% in the region: flagged (the old rule, twice the
        // class mean, could never flag a cluster holding more than half its class).
        assert!(flag(&cluster(60, 0.66, None, Some(0.447)), &[None], &area));
        // Most of the class, against a rest at 0.2%: flagged.
        assert!(flag(&cluster(40, 0.66, None, Some(0.447)), &[Some(0.002)], &area));
        // The rest of the class has as much there: not flagged.
        assert!(!flag(&cluster(40, 0.66, None, Some(0.447)), &[Some(0.3)], &area));
        // No more than an even spread would give a region of a quarter of the image.
        assert!(!flag(&cluster(60, 0.66, None, Some(0.3)), &[None], &[0.25]));
        // Spread out (not concentrated), or under 5%: not flagged.
        assert!(!flag(&cluster(60, 0.2, None, Some(0.447)), &[None], &area));
        assert!(!flag(&cluster(60, 0.66, None, Some(0.04)), &[Some(0.0)], &[0.001]));
        // Each region against its own area: a large second region (60% of the image, 1% of the
        // attribution) does not hide the small one.
        let two =
            ClusterInfo { mean_region_shares: vec![Some(0.447), Some(0.01)], ..cluster(60, 0.66, None, Some(0.447)) };
        assert!(flag(&two, &[None, None], &[area[0], 0.6]));
        // Away from the object.
        assert!(flag(&cluster(10, 0.5, Some(0.7), None), &[], &[]));
        assert!(!flag(&cluster(10, 0.5, Some(0.5), None), &[], &[]));
        // Mostly all-zero maps (28 of 30): the two with attribution do not flag the thirty.
        assert!(!flag(&ClusterInfo { without_mass: 28, ..cluster(30, 0.5, Some(0.9), None) }, &[], &[]));
        assert!(flag(&ClusterInfo { without_mass: 15, ..cluster(30, 0.5, Some(0.9), None) }, &[], &[]));
    }

    #[test]
    fn incomplete_outputs_are_named() {
        let cov =
            |expected, unfinished: Vec<u32>| sink::Coverage { num_shards: 3, expected_rows: expected, unfinished };
        assert_eq!(incomplete_note(&cov(Some(90), vec![]), 90), None);
        let note = incomplete_note(&cov(Some(90), vec![1, 2]), 30).unwrap();
        assert!(note.contains("30 of the dataset's 90 rows") && note.contains("shard(s) 1, 2 of 3"), "{note}");
        let note = incomplete_note(&cov(None, vec![2]), 60).unwrap();
        assert!(note.contains("60 rows") && note.contains("shard(s) 2 of 3"), "{note}");
        assert_eq!(incomplete_note(&cov(None, vec![]), 60), None);
        // A NaN or negative value counts as 0 in a normalised map.
        assert_eq!(normalised(&[1.0, f32::NAN, -1.0, 3.0]), [0.25, 0.0, 0.0, 0.75]);
        assert_eq!(normalised(&[f32::NAN, f32::INFINITY]), [0.0, 0.0]);
        // Every shard finished but rows are missing, or there are more rows than the dataset.
        let note = incomplete_note(&cov(Some(90), vec![]), 60).unwrap();
        assert!(note.contains("60 of the dataset's 90 rows, although every shard finished"), "{note}");
        let note = incomplete_note(&cov(Some(90), vec![]), 120).unwrap();
        assert!(note.contains("120 rows, more than the dataset's 90"), "{note}");
    }

    #[test]
    fn detailed_classes_are_the_most_flagged_then_the_highest_scored() {
        let class = |class: i64, count: usize, flagged: usize| ClassSummary {
            class,
            name: format!("c{class}"),
            count,
            accuracy: None,
            mean_bbox_share: None,
            mean_mask_share: None,
            mean_region_shares: vec![],
            mean_entropy: None,
            mean_map: vec![],
            map_side: 1,
            eigenvalues: vec![],
            clusters: vec![ClusterInfo { flagged: flagged > 0, ..cluster(flagged.max(1), 0.5, None, None) }],
            ranked: vec![],
        };
        let record = |class: i64, score: f32| Record {
            index: 0,
            id: String::new(),
            path: String::new(),
            label: Some(class),
            target: Some(class),
            predicted: None,
            predicted_prob: None,
            entropy: None,
            bbox_share: None,
            mask_share: None,
            region_shares: vec![],
            class,
            score: Some(score),
            rank: None,
            cluster: None,
            flagged: false,
            shortcut: false,
            maps: None,
        };
        let classes = [class(0, 10, 0), class(1, 10, 3), class(2, 10, 0), class(3, 10, 5)];
        let records = [record(0, 0.1), record(1, 0.2), record(2, 0.9), record(3, 0.1)];
        let pick = |max| detailed_classes(&classes, &records, max).into_iter().collect::<Vec<_>>();
        assert_eq!(pick(2), [1, 3]);
        assert_eq!(pick(3), [1, 2, 3]);
        assert_eq!(pick(10), [0, 1, 2, 3]);
    }
}
