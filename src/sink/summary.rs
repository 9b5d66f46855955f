//! Completion markers: per-shard `_SUCCESS-<shard>-of-<count>.json` and the dataset's `_SUCCESS`.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::Loc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::files::{self, list_names, parse_job_name, parse_part_name, parse_shard_success_name, OutputConflict};
use super::{zero_counts, SCHEMA_VERSION};

/// What one shard has committed; the content of its `_SUCCESS-<shard>-of-<count>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSummary {
    /// The shard.
    pub shard: u32,
    /// Number of shards of the job.
    pub num_shards: u32,
    /// Rows the shard has in all.
    pub total_rows: u64,
    /// Rows per part file.
    pub rows_per_part: u64,
    /// Rows committed.
    pub rows: u64,
    /// Part files committed.
    pub parts: u64,
    /// Committed rows per status name (every status listed).
    pub status_counts: BTreeMap<String, u64>,
    /// [`SCHEMA_VERSION`] of the parts.
    pub schema_version: u32,
    /// The job that wrote the shard ([`super::SinkConfig::job_id`]; absent in markers written
    /// before it was recorded): `finalize` and the report refuse a folder whose shards
    /// record different jobs, even where a shard's `_job` file was not copied with its parts.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub job_id: String,
}

/// The whole dataset's counts; the content of `_SUCCESS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Number of shards.
    pub num_shards: u32,
    /// Part files in all.
    pub parts: u64,
    /// Rows in all.
    pub rows: u64,
    /// Rows per status name (every status listed).
    pub status_counts: BTreeMap<String, u64>,
    /// [`SCHEMA_VERSION`] of the parts.
    pub schema_version: u32,
}

/// [`finalize`] found shards that have not finished (yet).
#[derive(Debug, thiserror::Error)]
#[error(
    "output in {dir} is not complete: shard(s) {} of {num_shards} have not finished (no \
     _SUCCESS-<shard>-of-{num_shards:05}.json)",
    missing.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
)]
pub struct ShardsUnfinished {
    /// The output folder.
    pub dir: Loc,
    /// The shards without their `_SUCCESS-<shard>-of-<count>.json`.
    pub missing: Vec<u32>,
    /// The job's shard count.
    pub num_shards: u32,
}

/// Checks that every shard of the job in `dir` has finished and that the parts on disk match
/// their shards' counts, then writes `_SUCCESS` (atomically) and returns the totals.
///
/// Errors name the folder and what is wrong: no output, files of jobs with different shard
/// counts, shards without their `_SUCCESS-<shard>-of-<count>.json` (listed), or parts whose
/// rows do not add up.
pub fn finalize(dir: impl Into<Loc>) -> anyhow::Result<DatasetSummary> {
    let dir = &dir.into();
    let names = list_names(dir)?;
    files::warn_foreign(dir, &names);
    let num_shards = one_shard_count(dir, &names)?;
    let mut parts: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
    for (name, (shard, _, chunk)) in names.iter().filter_map(|n| parse_part_name(n).map(|p| (n, p))) {
        parts.entry(shard).or_default().push((chunk, name.clone()));
    }
    let missing = unfinished_shards(&names, num_shards);
    if !missing.is_empty() {
        return Err(ShardsUnfinished { dir: dir.clone(), missing, num_shards }.into());
    }
    let mut markers = read_markers(dir, &names)?;
    // Every shard of the job over the same dataset.
    one_job(dir, &names, &markers)?;

    let mut total =
        DatasetSummary { num_shards, parts: 0, rows: 0, status_counts: zero_counts(), schema_version: SCHEMA_VERSION };
    for shard in 0..num_shards {
        // Gone since the listing: a rerun of that shard has started (it removes its marker
        // before it changes anything), so the shard is unfinished again.
        let Some((path, s)) = markers.remove(&shard) else {
            return Err(ShardsUnfinished { dir: dir.clone(), missing: vec![shard], num_shards }.into());
        };
        if (s.shard, s.num_shards) != (shard, num_shards) {
            bail!("{} describes shard {} of {}", path, s.shard, s.num_shards);
        }
        if s.schema_version != SCHEMA_VERSION {
            bail!("{} was written with schema version {}, this build writes {SCHEMA_VERSION}", path, s.schema_version);
        }
        let status_rows: u64 = s.status_counts.values().sum();
        if s.rows != s.total_rows || status_rows != s.rows {
            bail!("{} is inconsistent: {} of {} rows, {status_rows} by status", path, s.rows, s.total_rows);
        }
        let mut shard_parts = parts.remove(&shard).unwrap_or_default();
        shard_parts.sort();
        if shard_parts.len() as u64 != s.parts
            || shard_parts.iter().enumerate().any(|(i, (chunk, _))| *chunk != i as u64)
        {
            bail!(
                "shard {shard} of {num_shards} in {}: {} says {} parts, the folder has {} \
                 (chunks {})",
                dir,
                path,
                s.parts,
                shard_parts.len(),
                shard_parts.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        let mut rows = 0u64;
        for (_, name) in &shard_parts {
            rows += match super::read::part_row_count(&dir.join(name)?) {
                Ok(n) => n,
                // Set aside since the listing, by a rerun of that shard: unfinished again.
                Err(e) if is_not_found(&e) => {
                    return Err(ShardsUnfinished { dir: dir.clone(), missing: vec![shard], num_shards }.into());
                }
                Err(e) => return Err(e),
            };
        }
        if rows != s.rows {
            bail!("shard {shard} of {num_shards} in {}: parts hold {rows} rows, {} says {}", dir, path, s.rows);
        }
        total.parts += s.parts;
        total.rows += s.rows;
        for (k, v) in s.status_counts {
            *total.status_counts.entry(k).or_default() += v;
        }
    }
    if let Some((shard, _)) = parts.first_key_value() {
        return Err(
            OutputConflict(format!("{dir} holds parts of shard {shard}, which is not one of 0..{num_shards}")).into()
        );
    }
    files::write_json_atomic(dir, files::DATASET_SUCCESS, &total)
        .with_context(|| format!("cannot mark output in {} complete", dir))?;
    // A shard that reopened since the listing removes its marker before it changes anything, and
    // `_SUCCESS` after that: looking at the markers again now that `_SUCCESS` is written, the
    // folder never stays marked complete while a shard is not.
    let missing = unfinished_shards(&list_names(dir)?, num_shards);
    if !missing.is_empty() {
        files::remove_if_exists(dir, files::DATASET_SUCCESS)?;
        return Err(ShardsUnfinished { dir: dir.clone(), missing, num_shards }.into());
    }
    Ok(total)
}

/// Whether `e` is a file's absence (a shard marker or part gone since the listing).
fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// The shard count of the job whose files `names` (of folder `dir`) are; an error when there
/// are none, or files of jobs split into different shard counts.
fn one_shard_count(dir: &Loc, names: &[String]) -> anyhow::Result<u32> {
    let counts: BTreeSet<u32> = names
        .iter()
        .filter_map(|n| {
            parse_part_name(n)
                .map(|(_, c, _)| c)
                .or_else(|| parse_shard_success_name(n).map(|(_, c)| c))
                .or_else(|| parse_job_name(n).map(|(_, c)| c))
        })
        .collect();
    match counts.len() {
        0 => bail!("{} holds no saliency-audit output", dir),
        1 => Ok(counts.first().copied().unwrap_or_default()),
        _ => Err(OutputConflict(format!(
            "{dir} mixes output of jobs split into different shard counts ({}); use one output folder per job",
            counts.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        ))
        .into()),
    }
}

/// The shards' completion markers `_SUCCESS-<shard>-of-<count>.json` among `names`, each read
/// once, by shard, with their paths; a marker gone since the listing (a rerun of its shard has
/// started) is left out.
fn read_markers(dir: &Loc, names: &[String]) -> anyhow::Result<BTreeMap<u32, (Loc, ShardSummary)>> {
    let mut markers = BTreeMap::new();
    for (name, (shard, _)) in names.iter().filter_map(|n| parse_shard_success_name(n).map(|p| (n, p))) {
        let path = dir.join(name)?;
        match files::read_json::<ShardSummary>(&path) {
            Ok(m) => {
                markers.insert(shard, (path, m));
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(markers)
}

/// The shards' `_job-*.json` files, by shard; an error when they, or the shards' completion
/// `markers` (from [`read_markers`]), record different jobs.
fn one_job(
    dir: &Loc,
    names: &[String],
    markers: &BTreeMap<u32, (Loc, ShardSummary)>,
) -> anyhow::Result<BTreeMap<u32, super::JobFile>> {
    let mut jobs = BTreeMap::new();
    let mut job_ids: BTreeMap<String, Loc> = BTreeMap::new();
    for (name, (shard, _)) in names.iter().filter_map(|n| parse_job_name(n).map(|p| (n, p))) {
        let path = dir.join(name)?;
        let job: super::JobFile = files::read_json(&path)?;
        if !job.job_id.is_empty() {
            job_ids.entry(job.job_id.clone()).or_insert(path);
        }
        jobs.insert(shard, job);
    }
    for (path, marker) in markers.values() {
        if !marker.job_id.is_empty() {
            job_ids.entry(marker.job_id.clone()).or_insert_with(|| path.clone());
        }
    }
    let mut ids = job_ids.iter();
    if let (Some(a), Some(b)) = (ids.next(), ids.next()) {
        return Err(OutputConflict(format!(
            "{dir} mixes shards of different jobs: {} records job {}, {} records job {} (the model, a \
             setting or the dataset's sample list changed between shards); rerun every shard into \
             another output folder",
            a.1, a.0, b.1, b.0
        ))
        .into());
    }
    Ok(jobs)
}

/// How much of its dataset an output folder holds, as its markers say: for readers (the
/// report) that must not take part of a dataset for all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coverage {
    /// The job's shard count.
    pub num_shards: u32,
    /// Rows the whole dataset has, when every shard has started (its `_job-*.json` is there).
    pub expected_rows: Option<u64>,
    /// Shards without their `_SUCCESS-<shard>-of-<count>.json`.
    pub unfinished: Vec<u32>,
}

/// Reads the markers of the folder `dir`, whose files are `names`, into a [`Coverage`]. Errors
/// as [`finalize`]'s for a folder that mixes jobs (its rows would be counted twice).
pub(crate) fn coverage_of(dir: &Loc, names: &[String]) -> anyhow::Result<Coverage> {
    let num_shards = one_shard_count(dir, names)?;
    let jobs = one_job(dir, names, &read_markers(dir, names)?)?;
    let expected_rows = (0..num_shards).map(|s| jobs.get(&s).map(|j| j.total_rows)).sum::<Option<u64>>();
    Ok(Coverage { num_shards, expected_rows, unfinished: unfinished_shards(names, num_shards) })
}

/// The shards of `0..num_shards` without their `_SUCCESS-<shard>-of-<count>.json` in `names`.
fn unfinished_shards(names: &[String], num_shards: u32) -> Vec<u32> {
    let successes: BTreeSet<u32> = names.iter().filter_map(|n| parse_shard_success_name(n)).map(|(s, _)| s).collect();
    (0..num_shards).filter(|s| !successes.contains(s)).collect()
}

/// Writes the caller's report of one run of a shard (timings, counts, whether it was
/// interrupted) to `dir/_run-<shard>-of-<count>.json`, atomically, replacing the previous run's.
/// Returns the file's path.
pub fn write_summary(dir: &Loc, shard: u32, num_shards: u32, summary: &serde_json::Value) -> anyhow::Result<Loc> {
    let name = files::run_summary_name(shard, num_shards);
    files::write_json_atomic(dir, &name, summary)?;
    dir.join(&name)
}

/// Says when `dir` holds a report (`_report/index.html`, the report command's default place)
/// older than one of its parts: rows written since (a run, a retry, a shard that completed) have
/// left it behind; the report reads the output once, when it is made. (Only parts count: a rerun
/// of a complete shard writes its marker again, and nothing else.)
pub fn warn_if_report_is_stale(dir: &Loc, what: &str) {
    let Ok(index) = dir.join("_report/index.html") else { return };
    let Ok(Some(made)) = crate::store::modified(&index) else { return };
    let newest = crate::store::list_modified(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| files::parse_part_name(name).is_some())
        .map(|(_, time)| time)
        .max();
    if newest.is_some_and(|t| t > made) {
        tracing::warn!(
            "{dir}: its _report is older than {what}; run `saliency-audit report {dir}` again for a report of what \
             it holds now"
        );
    }
}

/// Removes the shard's report of an earlier run, as a run starts: a run that then fails leaves
/// no report, rather than one of another run.
pub fn remove_summary(dir: &Loc, shard: u32, num_shards: u32) -> anyhow::Result<()> {
    crate::store::remove_if_exists(&dir.join(&files::run_summary_name(shard, num_shards))?)?;
    Ok(())
}
