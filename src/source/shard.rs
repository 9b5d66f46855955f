//! Sharding: which part of the samples one process of an array job handles.
//!
//! A sample's shard depends only on its id and the shard count, so every process computes the
//! same split without talking to the others, and the shards together hold every sample once.

use anyhow::{anyhow, bail};
use sha2::{Digest, Sha256};

use crate::sample::Sample;

/// The shard of `id` among `num_shards`: the first 8 bytes of the SHA-256 of the id, as a
/// big-endian u64, modulo `num_shards`. A count of 0 is taken as 1.
pub fn shard_of(id: &str, num_shards: u32) -> u32 {
    let digest = Sha256::digest(id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(num_shards.max(1))) as u32
}

/// Keeps the samples of shard `shard` of `num_shards`, in their order, with `index` numbered
/// 0..n within the shard.
pub fn select_shard(samples: Vec<Sample>, shard: u32, num_shards: u32) -> Vec<Sample> {
    let mut kept: Vec<Sample> = samples.into_iter().filter(|s| shard_of(&s.id, num_shards) == shard).collect();
    for (i, s) in kept.iter_mut().enumerate() {
        s.index = i as u64;
    }
    kept
}

/// This process's shard: `index` of `count`, `index < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// This process's shard, 0-based.
    pub index: u32,
    /// Number of shards.
    pub count: u32,
}

impl Default for ShardSpec {
    fn default() -> Self {
        ShardSpec { index: 0, count: 1 }
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard {} of {}", self.index, self.count)
    }
}

impl ShardSpec {
    /// The shard from explicit arguments (both or neither), else from the environment of an
    /// array job, else 0 of 1. `env` looks up a variable (`|k| std::env::var(k).ok()`).
    ///
    /// Environments, first match wins:
    /// - Kubernetes Indexed Job: `JOB_COMPLETION_INDEX`, with `NUM_SHARDS` set in the pod spec;
    /// - Slurm job array with `NUM_SHARDS` set: index = `SLURM_ARRAY_TASK_ID` (the array's
    ///   indices are the shards', so one task resubmitted alone keeps its shard, and an array
    ///   whose `SLURM_ARRAY_TASK_MAX` is not below `NUM_SHARDS` is refused); an array task
    ///   without `NUM_SHARDS` is not sharded;
    /// - AWS Batch array job: `AWS_BATCH_JOB_ARRAY_INDEX` and `AWS_BATCH_JOB_ARRAY_SIZE`, both
    ///   set by AWS Batch.
    pub fn from_env_or_args(
        index: Option<u32>,
        count: Option<u32>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<ShardSpec> {
        let spec = match (index, count) {
            (Some(index), Some(count)) => ShardSpec { index, count },
            (Some(_), None) => bail!("a shard index was given without a shard count"),
            (None, Some(_)) => bail!("a shard count was given without a shard index"),
            (None, None) => from_env(env)?,
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(self) -> anyhow::Result<()> {
        if self.count == 0 {
            bail!("the shard count is 0; it must be at least 1");
        }
        if self.index >= self.count {
            bail!("shard index {} is not below the shard count {}", self.index, self.count);
        }
        Ok(())
    }
}

fn from_env(env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<ShardSpec> {
    let get = |name: &str| -> anyhow::Result<Option<u64>> {
        match env(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| anyhow!("environment variable {name}={v:?} is not a non-negative integer")),
        }
    };
    let require = |name: &str, because: &str| -> anyhow::Result<u64> {
        get(name)?.ok_or_else(|| anyhow!("environment variable {name} is not set, but {because} is"))
    };
    let shard = |index: u64, count: u64, names: &str| -> anyhow::Result<ShardSpec> {
        let index = u32::try_from(index).map_err(|_| anyhow!("{names}: shard index {index} is too large"))?;
        let count = u32::try_from(count).map_err(|_| anyhow!("{names}: shard count {count} is too large"))?;
        let spec = ShardSpec { index, count };
        spec.check().map_err(|e| anyhow!("{names}: {e}"))?;
        Ok(spec)
    };

    // Kubernetes Indexed Job.
    if let Some(index) = get("JOB_COMPLETION_INDEX")? {
        let count = require("NUM_SHARDS", "JOB_COMPLETION_INDEX")?;
        return shard(index, count, "JOB_COMPLETION_INDEX and NUM_SHARDS");
    }
    // Slurm job array, when NUM_SHARDS says it is sharded: arrays serve other ends too (one
    // job file per task), so an array task without it runs the whole dataset.
    if let Some(id) = get("SLURM_ARRAY_TASK_ID")? {
        let Some(count) = get("NUM_SHARDS")? else {
            tracing::warn!(
                "SLURM_ARRAY_TASK_ID={id} but NUM_SHARDS is not set: the whole dataset, not a shard \
                 (set NUM_SHARDS to shard a job by the array's index)"
            );
            return Ok(ShardSpec::default());
        };
        // The array index is the shard index, so a task resubmitted alone (`--array=3`) still
        // runs shard 3 of NUM_SHARDS; an array whose indices go past the shards (1-based,
        // `--array=1-8`) is refused in every task, not only in its last.
        let spec = shard(id, count, "SLURM_ARRAY_TASK_ID and NUM_SHARDS")?;
        if let Some(max) = get("SLURM_ARRAY_TASK_MAX")?.filter(|max| *max >= count) {
            bail!(
                "SLURM_ARRAY_TASK_MAX={max} is not below NUM_SHARDS={count}: the array's indices are the \
                 shards', 0 to {}; submit it with --array=0-{}",
                count - 1,
                count - 1
            );
        }
        return Ok(spec);
    }
    if get("NUM_SHARDS")?.is_some() {
        bail!("environment variable NUM_SHARDS is set but neither JOB_COMPLETION_INDEX nor SLURM_ARRAY_TASK_ID is");
    }
    // AWS Batch array job.
    if let Some(index) = get("AWS_BATCH_JOB_ARRAY_INDEX")? {
        let count = require("AWS_BATCH_JOB_ARRAY_SIZE", "AWS_BATCH_JOB_ARRAY_INDEX")?;
        return shard(index, count, "AWS_BATCH_JOB_ARRAY_INDEX and AWS_BATCH_JOB_ARRAY_SIZE");
    }
    if get("AWS_BATCH_JOB_ARRAY_SIZE")?.is_some() {
        bail!("environment variable AWS_BATCH_JOB_ARRAY_SIZE is set but AWS_BATCH_JOB_ARRAY_INDEX is not");
    }
    Ok(ShardSpec::default())
}
