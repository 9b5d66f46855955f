//! Exit codes, as a scheduler sees them, and which errors a rerun may get past.
//!
//! - 0: every sample is ok (or, with `run --failed-samples-ok`, the shard is complete);
//! - 1: the shard is complete, but some samples failed (their rows say why);
//! - 2: the job cannot run as given (spec, model, dataset listing, an output folder of another
//!   job): the same command fails the same way, so a scheduler should not retry it;
//! - 3: the run failed on the way for a reason outside the job (the device, the network, the
//!   disk): committed parts are kept, and a retry resumes;
//! - 130: interrupted (Ctrl-C, SIGTERM), or stopped while waiting for another process's lock.

use std::io;

use crate::job::JobError;
use crate::sink::{LockWaitInterrupted, OutputConflict};

pub const SAMPLES_FAILED: u8 = 1;
pub const CANNOT_RUN: u8 = 2;
pub const RUN_FAILED: u8 = 3;
pub const INTERRUPTED: u8 = 130;

/// A failure part-way through a run that a retry may not meet again: the device stopped
/// working, or the output could not be written. Shown as the error it wraps.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct RunFailed(#[from] pub anyhow::Error);

/// A run stopped (Ctrl-C, SIGTERM) while it loaded its model replicas or warmed them up, before
/// any pipeline thread started: it wrote nothing. Checked between those steps, so that a
/// scheduler's grace period is not spent on a start whose run would stop at once.
#[derive(Debug, thiserror::Error)]
#[error("interrupted while {0}; nothing was written")]
pub struct StartInterrupted(pub &'static str);

/// Errors with [`StartInterrupted`] once `stop` is set.
pub fn check_stop(stop: &std::sync::atomic::AtomicBool, doing: &'static str) -> Result<(), StartInterrupted> {
    if stop.load(std::sync::atomic::Ordering::Relaxed) {
        Err(StartInterrupted(doing))
    } else {
        Ok(())
    }
}

/// The exit code for a command that ended with `err`: [`RUN_FAILED`] when a retry may succeed
/// (a [`RunFailed`], an I/O or storage error other than a missing or forbidden file, a
/// storage error while checking the job's inputs; never an [`OutputConflict`], nor access
/// refused, however wrapped),
/// [`INTERRUPTED`] for a stopped lock wait, else [`CANNOT_RUN`].
pub fn code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<LockWaitInterrupted>().is_some() || err.downcast_ref::<StartInterrupted>().is_some() {
        return INTERRUPTED;
    }
    if retryable(err) {
        RUN_FAILED
    } else {
        CANNOT_RUN
    }
}

/// Whether a cause in `err`'s chain, or in the chain of a [`RunFailed`] there (which, being
/// transparent, shows its inner error's causes but not that error itself), meets `pred`.
fn any_cause(err: &anyhow::Error, pred: impl Fn(&(dyn std::error::Error + 'static)) -> bool) -> bool {
    err.chain().any(|c| pred(c) || c.downcast_ref::<RunFailed>().is_some_and(|r| r.0.chain().any(&pred)))
}

/// Whether an error of type `T` is in `err`'s chain (see [`any_cause`]).
fn in_chain<T: std::error::Error + Send + Sync + 'static>(err: &anyhow::Error) -> bool {
    any_cause(err, |c| c.is::<T>())
}

/// Whether a retry may get past `err` (see [`code`]). Never for an output folder that holds
/// another job's files ([`OutputConflict`]), however it is wrapped.
pub fn retryable(err: &anyhow::Error) -> bool {
    if in_chain::<OutputConflict>(err) {
        return false;
    }
    // Access refused (a store's 403, a read-only mount) stays refused, however it is wrapped
    // (a part the writer may not store fails the run: a retry meets the same refusal).
    let refused = any_cause(err, |c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| matches!(e.kind(), io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem))
    });
    if refused {
        return false;
    }
    err.chain().any(|c| {
        c.is::<RunFailed>()
            || c.downcast_ref::<JobError>().is_some_and(|e| e.retryable)
            || c.downcast_ref::<io::Error>().is_some_and(|e| transient(e.kind()))
    })
}

/// I/O errors about the file asked for (missing, forbidden, malformed, too large, on a
/// read-only mount) stay the same on a retry; the others (time-outs, lost connections, a store's server errors, a full
/// or failing disk) may not.
pub fn transient(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::*;
    !matches!(
        kind,
        NotFound
            | PermissionDenied
            | AlreadyExists
            | InvalidInput
            | InvalidData
            | Unsupported
            | FileTooLarge
            | IsADirectory
            | NotADirectory
            | DirectoryNotEmpty
            | InvalidFilename
            | ReadOnlyFilesystem
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use std::path::PathBuf;

    #[test]
    fn codes() {
        let spec = JobError {
            file: PathBuf::from("j.toml"),
            key: None,
            line: Some(3),
            message: "bad".into(),
            retryable: false,
        };
        assert_eq!(code(&anyhow::Error::new(spec.clone()).context("loading")), CANNOT_RUN);
        let store = JobError { retryable: true, ..spec };
        assert_eq!(code(&anyhow::Error::new(store)), RUN_FAILED);
        let read_only = io::Error::from(io::ErrorKind::ReadOnlyFilesystem);
        assert_eq!(code(&anyhow::Error::new(read_only).context("cannot create out/")), CANNOT_RUN);
        let missing = io::Error::new(io::ErrorKind::NotFound, "model.pt");
        assert_eq!(code(&anyhow::Error::new(missing).context("cannot open model.pt")), CANNOT_RUN);
        let timeout: Result<(), io::Error> = Err(io::Error::other("s3://b/x: Generic S3 error: 503"));
        assert_eq!(code(&timeout.context("listing s3://b").unwrap_err()), RUN_FAILED);
        let device = RunFailed(anyhow::anyhow!("CUDA error: an illegal memory access"));
        let e = anyhow::Error::new(device).context("worker cuda:0");
        assert_eq!(code(&e), RUN_FAILED);
        // Shown as what it wraps.
        assert_eq!(format!("{:#}", anyhow::Error::new(RunFailed(anyhow::anyhow!("x").context("y")))), "y: x");
        assert_eq!(code(&anyhow::anyhow!("the model returned a single tensor, not a tuple")), CANNOT_RUN);
        // A store that refuses to take a part: not retried, though the writer's failure is a RunFailed.
        let forbidden = io::Error::new(io::ErrorKind::PermissionDenied, "s3://b/part-0.parquet: 403 Forbidden");
        let e = anyhow::Error::new(RunFailed(anyhow::Error::new(forbidden).context("cannot write part")));
        assert_eq!(code(&e.context("writer")), CANNOT_RUN);
        // Another job's files in the output folder: not retried, however it is wrapped.
        let conflict = || anyhow::Error::new(OutputConflict("out/ mixes shard counts (1, 2)".into()));
        assert_eq!(code(&conflict().context("finishing shard 0")), CANNOT_RUN);
        assert_eq!(code(&anyhow::Error::new(RunFailed(conflict()))), CANNOT_RUN);
        assert_eq!(code(&anyhow::Error::new(RunFailed(conflict().context("finishing"))).context("run")), CANNOT_RUN);
    }
}
