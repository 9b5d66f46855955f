//! The job spec's error type: the file, the key path and the line it is about.

use std::fmt;
use std::path::{Path, PathBuf};

/// A problem with a job spec. Its message names the job file, and where it can, the key path
/// (`runtime.batch_size`, `regions[1].x0`) and the line the key is on:
/// `job.toml line 12: runtime.batch_size: must be at least 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    /// The job file the problem is in.
    pub file: PathBuf,
    /// The key path the problem is about, when there is one.
    pub key: Option<String>,
    /// The 1-based line of that key (or of the syntax error), when known.
    pub line: Option<usize>,
    /// What is wrong, and where it helps, what is allowed.
    pub message: String,
    /// The check itself failed (a storage error while looking for an input), so a retry may
    /// pass it.
    pub retryable: bool,
}

impl JobError {
    /// An error about the job file as a whole (no key, no line).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        JobError { file: file.to_path_buf(), key: None, line: None, message: message.into(), retryable: false }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}
