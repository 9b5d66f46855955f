//! File names of the output folder and the one way files get there: atomically (see
//! [`write_atomic`]), in a local folder or under an object-store prefix.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::store::{self, Loc};

use anyhow::Context;

/// Prefix of every temporary file the sink writes.
pub(crate) const TMP_PREFIX: &str = ".tmp-";
/// Name of the dataset-level completion marker.
pub(crate) const DATASET_SUCCESS: &str = "_SUCCESS";

/// `<shard:05>-of-<count:05>`, the shard tag in every per-shard file name.
pub(crate) fn shard_tag(shard: u32, num_shards: u32) -> String {
    format!("{shard:05}-of-{num_shards:05}")
}

/// `part-<shard:05>-of-<count:05>-<chunk:06>.parquet`.
pub fn part_name(shard: u32, num_shards: u32, chunk: u64) -> String {
    format!("part-{}-{chunk:06}.parquet", shard_tag(shard, num_shards))
}

/// `_job-<shard:05>-of-<count:05>.json`.
pub(crate) fn job_name(shard: u32, num_shards: u32) -> String {
    format!("_job-{}.json", shard_tag(shard, num_shards))
}

/// `_SUCCESS-<shard:05>-of-<count:05>.json`.
pub(crate) fn shard_success_name(shard: u32, num_shards: u32) -> String {
    format!("_SUCCESS-{}.json", shard_tag(shard, num_shards))
}

/// `_run-<shard:05>-of-<count:05>.json`: the latest run's report for a shard.
pub(crate) fn run_summary_name(shard: u32, num_shards: u32) -> String {
    format!("_run-{}.json", shard_tag(shard, num_shards))
}

/// `.lock-<shard:05>-of-<count:05>`: held (flock) by the process writing that shard into a
/// local folder.
pub(crate) fn shard_lock_name(shard: u32, num_shards: u32) -> String {
    format!(".lock-{}", shard_tag(shard, num_shards))
}

/// Takes the exclusive lock on shard `shard`'s lock file in a local output folder, waiting for
/// another process that holds it (a shard started twice, a requeued job whose first copy is
/// still stopping) to let go: the lock is what makes the leftover-file clean-up and the resume
/// check safe, since with it no other process writes this shard's files. The lock goes with the
/// returned file (or the process). Object-store prefixes have no lock (`None`): there each file
/// is one PUT, and two writers of a shard write the same parts. A file system without locks
/// (some network mounts) only gets a warning.
///
/// The wait polls the lock (every 100 ms) and gives up with [`LockWaitInterrupted`] once `stop`
/// is set (Ctrl-C), having written nothing.
pub(crate) fn lock_shard(dir: &Loc, shard: u32, num_shards: u32, stop: &AtomicBool) -> anyhow::Result<Option<File>> {
    let Loc::Local(d) = dir else {
        return Ok(None);
    };
    let path = d.join(shard_lock_name(shard, num_shards));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => {
            tracing::warn!(
                "shard {shard} of {num_shards} in {} is being written by another process (it holds {}); \
                 waiting for it to stop, then resuming from its parts",
                d.display(),
                path.display()
            );
            let t = std::time::Instant::now();
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(fs::TryLockError::WouldBlock) if stop.load(Ordering::Relaxed) => {
                        return Err(LockWaitInterrupted { path }.into());
                    }
                    Err(fs::TryLockError::WouldBlock) => std::thread::sleep(std::time::Duration::from_millis(100)),
                    Err(fs::TryLockError::Error(e)) => {
                        return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                    }
                }
            }
            tracing::info!(waited_s = t.elapsed().as_secs_f64(), "took the lock of shard {shard} of {num_shards}");
            Ok(Some(file))
        }
        Err(fs::TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {} ({e}); nothing stops a second process from writing shard {shard} of \
                 {num_shards} at the same time",
                path.display()
            );
            Ok(None)
        }
    }
}

/// A run stopped (Ctrl-C) while it waited for another process's shard lock; it wrote nothing.
#[derive(Debug, thiserror::Error)]
#[error("interrupted while waiting for the lock {} held by another process; nothing was written", .path.display())]
pub struct LockWaitInterrupted {
    /// The lock file.
    pub path: std::path::PathBuf,
}

/// The output folder holds files of another job, or of this job split another way, that no
/// run or `finalize` can reconcile: the same command fails the same way (exit 2, not retried).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OutputConflict(pub String);

/// The first shard file (part, job file, shard marker) of a shard count other than `count`:
/// its name, shard and count.
pub(crate) fn other_shard_count(names: &[String], count: u32) -> Option<(&str, u32, u32)> {
    names.iter().find_map(|n| {
        let (s, c) = parse_part_name(n)
            .map(|(s, c, _)| (s, c))
            .or_else(|| parse_shard_success_name(n))
            .or_else(|| parse_job_name(n))?;
        (c != count).then_some((n.as_str(), s, c))
    })
}

/// Names in the output folder that the sink did not write but that folder readers (pyarrow,
/// Spark) read as data: anything not hidden (`.`) or marked as metadata (`_`) that is not a
/// committed part.
pub(crate) fn foreign_names(names: &[String]) -> Vec<&str> {
    names.iter().filter(|n| !n.starts_with(['.', '_']) && parse_part_name(n).is_none()).map(String::as_str).collect()
}

/// Warns, once per folder and process, about [`foreign_names`] in `dir`.
pub(crate) fn warn_foreign(dir: &Loc, names: &[String]) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let foreign = foreign_names(names);
    let Some(first) = foreign.first() else {
        return;
    };
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.contains(&dir.to_string()) {
        return;
    }
    warned.push(dir.to_string());
    tracing::warn!(
        "output folder {dir} holds {} file(s) that saliency-audit did not write ({first}{}): runs, \
         the report and finalize leave them out, but readers of the folder (pyarrow, Spark) take \
         them for rows of the dataset; move them elsewhere",
        foreign.len(),
        if foreign.len() > 1 { ", …" } else { "" }
    );
}

/// Parses `<5 digits>-of-<5 digits>` at the start of `s`; returns (shard, count, rest).
fn parse_tag(s: &str) -> Option<(u32, u32, &str)> {
    let digits = |t: &str| t.len() == 5 && t.bytes().all(|b| b.is_ascii_digit());
    let (shard, rest) = (s.get(..5)?, s.get(5..)?);
    let rest = rest.strip_prefix("-of-")?;
    let (count, rest) = (rest.get(..5)?, rest.get(5..)?);
    if !digits(shard) || !digits(count) {
        return None;
    }
    Some((shard.parse().ok()?, count.parse().ok()?, rest))
}

/// Parses a committed part's name into (shard, count, chunk).
pub(crate) fn parse_part_name(name: &str) -> Option<(u32, u32, u64)> {
    let (shard, count, rest) = parse_tag(name.strip_prefix("part-")?)?;
    let chunk = rest.strip_prefix('-')?.strip_suffix(".parquet")?;
    if chunk.len() != 6 || !chunk.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((shard, count, chunk.parse().ok()?))
}

/// Parses a shard's completion marker name into (shard, count).
pub(crate) fn parse_shard_success_name(name: &str) -> Option<(u32, u32)> {
    let (shard, count, rest) = parse_tag(name.strip_prefix("_SUCCESS-")?)?;
    (rest == ".json").then_some((shard, count))
}

/// Parses a job file name into (shard, count).
pub(crate) fn parse_job_name(name: &str) -> Option<(u32, u32)> {
    let (shard, count, rest) = parse_tag(name.strip_prefix("_job-")?)?;
    (rest == ".json").then_some((shard, count))
}

/// Whether `name` is a temporary file of shard `shard` of `num_shards`, left by any process.
pub(crate) fn is_shard_tmp(name: &str, shard: u32, num_shards: u32) -> bool {
    let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
        return false;
    };
    let tag = shard_tag(shard, num_shards);
    rest.starts_with(&format!("part-{tag}-"))
        || rest.starts_with(&format!("_SUCCESS-{tag}.json-"))
        || rest.starts_with(&format!("_job-{tag}.json-"))
        || rest.starts_with(&format!("_run-{tag}.json-"))
}

/// The temporary name under which `name` is written by this process.
pub(crate) fn tmp_name(name: &str) -> String {
    format!("{TMP_PREFIX}{name}-{}", process_token())
}

/// This process's mark in temporary names: its pid and the time it first needed one, so that
/// two processes with the same pid (each the first process of its own container, writing into
/// one shared volume, say two shards finalizing at once) never share a temporary file.
pub(crate) fn process_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("{}-{:x}", std::process::id(), nanos as u64)
    })
}

/// File names in `dir` (for a local folder, entries whose name is not UTF-8 are skipped: the
/// sink never writes them).
pub(crate) fn list_names(dir: &Loc) -> anyhow::Result<Vec<String>> {
    store::list_names(dir).with_context(|| format!("cannot list output folder {dir}"))
}

/// Flushes a local folder's entries (new names, renames) to disk.
pub(crate) fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync output folder {}", dir.display()))
}

/// Writes `dir/name` atomically, so that a reader (or a resuming run) sees the whole file or
/// none of it.
///
/// Local folder: `write` fills `dir/.tmp-<name>-<pid>-<time>`, which is synced, renamed to `dir/name`,
/// and the folder synced; on any error the temporary file is removed and `dir/name` is
/// untouched. Object store: `write` fills memory, which is stored with one PUT, which the
/// store makes visible whole or not at all.
pub(crate) fn write_atomic(
    dir: &Loc,
    name: &str,
    write: impl FnOnce(&mut (dyn Write + Send)) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let Loc::Local(dir) = dir else {
        let target = dir.join(name)?;
        let mut buf = Vec::with_capacity(1 << 20);
        write(&mut buf).with_context(|| format!("cannot write {target}"))?;
        return store::put_remote(&target, buf);
    };
    let tmp = dir.join(tmp_name(name));
    let target = dir.join(name);
    let result = (|| -> anyhow::Result<()> {
        let file = File::create(&tmp).with_context(|| format!("cannot create temporary file {}", tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out).with_context(|| format!("cannot write {}", target.display()))?;
        let file =
            out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        drop(file);
        fs::rename(&tmp, &target)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), target.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Writes `value` as pretty JSON to `dir/name`, atomically.
pub(crate) fn write_json_atomic<T: serde::Serialize>(dir: &Loc, name: &str, value: &T) -> anyhow::Result<()> {
    write_atomic(dir, name, |out| {
        serde_json::to_writer_pretty(&mut *out, value)?;
        out.write_all(b"\n")?;
        Ok(())
    })
}

/// Reads and parses a JSON file the sink wrote, with an error naming the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(loc: &Loc) -> anyhow::Result<T> {
    let bytes = store::read_all(loc)?;
    serde_json::from_slice(&bytes).with_context(|| format!("{loc} is not a valid saliency-audit file"))
}

/// Moves a part that failed validation aside as `.<name>.corrupt-<unix time>` (never overwriting
/// an earlier one); returns the new location.
pub(crate) fn move_aside(dir: &Loc, name: &str) -> anyhow::Result<Loc> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Hidden (a leading dot), so that dataset readers (pyarrow, Spark) skip it, as they skip
    // temporary files; it no longer parses as a part.
    let mut aside = dir.join(&format!(".{name}.corrupt-{now}"))?;
    let mut n = 1;
    while store::exists(&aside)? {
        aside = dir.join(&format!(".{name}.corrupt-{now}-{n}"))?;
        n += 1;
    }
    store::rename(&dir.join(name)?, &aside)?;
    if let Loc::Local(d) = dir {
        sync_dir(d)?;
    }
    Ok(aside)
}

/// Removes `dir/name` if it exists.
pub(crate) fn remove_if_exists(dir: &Loc, name: &str) -> anyhow::Result<bool> {
    store::remove_if_exists(&dir.join(name)?)
}
