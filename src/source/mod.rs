//! The source stage: a manifest (CSV, JSONL, Parquet) or an image folder becomes the ordered
//! list of [`Sample`]s, and [`select_shard`] keeps one shard's part of it.
//!
//! Samples are sorted by id, so the order, and each sample's shard, do not depend on the order
//! of the manifest's rows or of the file listing. Row-level problems (a label that is not a
//! class of the model) stay with the sample as `label_error`; structural problems (a missing
//! file or column, an unparsable line, a duplicate id, a partial box, no samples at all) fail the
//! whole run with a message naming the file and the line or row.

mod folder;
mod labels;
mod manifest;
mod shard;
#[cfg(test)]
mod tests;

use crate::store::Loc;

use crate::job::DatasetSource;
use crate::sample::Sample;

pub use folder::IMAGE_EXTENSIONS;
pub use shard::{select_shard, shard_of, ShardSpec};

/// The samples of a dataset, in id order, `index` = position.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    /// The samples, sorted by id, `index` 0..N.
    pub samples: Vec<Sample>,
    /// Names of the label ids, index = class id: the model's class names for a manifest (as
    /// given), and for an image folder whose class folders are all named after model classes;
    /// otherwise the image folder's sorted class-folder names.
    pub class_names: Option<Vec<String>>,
}

/// Reads the samples of `src`. `class_names` (index = class id) resolves labels written as
/// names; `num_classes` (else the number of class names) bounds labels written as ids. Either
/// may be unknown (`None`), and then that check is not made.
pub fn load_samples(
    src: &DatasetSource,
    class_names: Option<&[String]>,
    num_classes: Option<i64>,
) -> anyhow::Result<SampleSet> {
    let classes = labels::Classes::new(class_names, num_classes);
    let (mut samples, names) = match src {
        DatasetSource::Manifest(path) => {
            (manifest::read_manifest(path, &classes)?, class_names.map(<[String]>::to_vec))
        }
        DatasetSource::ImageFolder(root) => folder::read_image_folder(root, &classes)?,
    };
    // An empty dataset is a mistake in the job (the wrong file or folder), not a finished run.
    if samples.is_empty() {
        match src {
            DatasetSource::Manifest(path) => anyhow::bail!("{path}: the manifest has no rows"),
            DatasetSource::ImageFolder(root) => anyhow::bail!(
                "{root}: no image files in its class folders (names ending in {})",
                IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
            ),
        }
    }
    order(&mut samples);
    Ok(SampleSet { samples, class_names: names })
}

/// Sorts by id and numbers `index` 0..N in that order.
fn order(samples: &mut [Sample]) {
    samples.sort_by(|a, b| a.id.cmp(&b.id));
    for (i, s) in samples.iter_mut().enumerate() {
        s.index = i as u64;
    }
}

/// `path` resolved against `base` (the manifest's folder); an absolute `path` or a URL stays
/// as it is.
fn resolve_path(base: &Loc, path: &str) -> anyhow::Result<Loc> {
    base.join(path)
}
