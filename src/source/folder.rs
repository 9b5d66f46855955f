//! Image folders laid out as torchvision's `ImageFolder`: `root/<class>/**/<image>`.
//!
//! Class folders sorted by name give the class ids 0, 1, 2, …, as in torchvision; when the
//! model's metadata has class names and every class folder is named after one of them, the
//! labels are the model's ids of those names instead, so a folder holding a subset of the
//! classes, or naming them in another order, still gets the model's ids. Hidden entries (names
//! starting with `.`) and the folders an unzipped archive or a file system leaves (`__MACOSX`,
//! `lost+found`) are skipped; a folder without images does not stop the match by name;
//! symbolic links are followed, except one back to a folder above it (a loop).

use std::path::{Path, PathBuf};

use crate::store::{self, Loc};

use anyhow::{bail, Context};

use super::labels::{Classes, RawLabel};
use crate::sample::Sample;

/// Image file extensions, lower case (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 10] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp", "gif"];

/// Folders that are never classes: what macOS's archiver and a file system's root leave.
const NOT_CLASSES: [&str; 2] = ["__MACOSX", "lost+found"];

/// Image files of one class folder: (id relative to the image folder with `/`, location).
type ClassFiles = Vec<(String, Loc)>;

/// Reads an image folder's samples (unsorted) and the names of its label ids.
pub(super) fn read_image_folder(root: &Loc, classes: &Classes) -> anyhow::Result<(Vec<Sample>, Option<Vec<String>>)> {
    let class_dirs = match root {
        Loc::Local(p) => list_local(p)?,
        Loc::Remote { .. } => list_remote(root)?,
    };
    if class_dirs.is_empty() {
        bail!("{root}: no class folders (an image folder holds one sub-folder of images per class)");
    }
    // A folder without images gives no sample: it does not decide whether folders are matched
    // by name. Numbered by position it still counts, as in torchvision's ImageFolder with
    // `allow_empty=True` (empty class folders keep the numbering of a subset), with a warning:
    // torchvision's default refuses it.
    let empty: Vec<&str> = class_dirs.iter().filter(|(_, f)| f.is_empty()).map(|(n, _)| n.as_str()).collect();
    // Matched by name as soon as one folder with images is named after a model class: a stray
    // folder's (`unsorted/`) images then have no label (`bad_label` rows where the target is the
    // label), instead of renumbering every class by position, which would attribute every
    // image to another class than its folder's.
    let by_name = classes.names().is_some()
        && class_dirs.iter().filter(|(_, f)| !f.is_empty()).any(|(n, _)| classes.id_of(n).is_some());
    if !empty.is_empty() && !by_name {
        tracing::warn!(
            "{root}: folder(s) {} hold no image files but are counted as classes in the folders' \
             name order, as torchvision's ImageFolder(allow_empty=True) counts them (its default refuses them)",
            first(&empty, 5),
        );
    }
    if let Some(model_names) = classes.names().map(|names| first(names, 5)) {
        let unknown: Vec<&str> = class_dirs
            .iter()
            .filter(|(n, f)| !f.is_empty() && classes.id_of(n).is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if by_name && !unknown.is_empty() {
            tracing::warn!(
                "{root}: class folder(s) {} are not among the model's class names ({model_names}): their images \
                 have no label (bad_label rows where the target is the label), and the other folders are matched \
                 to the model's classes by name",
                first(&unknown, 5)
            );
        } else if !by_name {
            tracing::warn!(
                "{root}: no class folder is named after one of the model's class names ({model_names}): labels \
                 are the folders' positions in name order (0, 1, 2, …), as torchvision's ImageFolder numbers them"
            );
        }
    }
    let names = if by_name {
        classes.names().map(<[String]>::to_vec)
    } else {
        Some(class_dirs.iter().map(|(n, _)| n.clone()).collect())
    };

    let mut samples = Vec::new();
    for (i, (class, files)) in class_dirs.into_iter().enumerate() {
        // A stray folder's images have no label (not a wrong one): with `target = "label"`
        // they are `bad_label` rows, with `predicted` or a class id they are attributed.
        let (label, label_error) = if by_name {
            (classes.id_of(&class), None)
        } else {
            match classes.resolve(&RawLabel::Id(i as i64)) {
                Ok(id) => (Some(id), None),
                Err(e) => (None, Some(format!("{e} (class folder \"{class}\")"))),
            }
        };
        for (rel, location) in files {
            samples.push(Sample {
                index: 0,
                id: rel.clone(),
                path: rel,
                location,
                label,
                label_error: label_error.clone(),
                bbox: None,
                box_error: None,
                mask: None,
            });
        }
    }
    // Two names that are not UTF-8 can read the same; ids must tell samples apart.
    let mut seen = std::collections::HashMap::new();
    for s in &samples {
        if let Some(first) = seen.insert(s.id.as_str(), &s.location) {
            bail!(
                "{root}: files {first} and {} have the same id \"{}\" (their names are not valid UTF-8 and \
                 read the same); rename one of them",
                s.location,
                s.id
            );
        }
    }
    Ok((samples, names))
}

/// Class folders of a local image folder, sorted by name, with their image files.
fn list_local(root: &Path) -> anyhow::Result<Vec<(String, ClassFiles)>> {
    let mut class_dirs = Vec::new();
    for (name, path) in read_dir(root)? {
        if name.starts_with('.') || NOT_CLASSES.contains(&name.as_str()) {
            continue;
        }
        if std::fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false) {
            class_dirs.push((name, path));
        }
    }
    class_dirs.sort();
    let mut out = Vec::new();
    let mut left_out = Vec::new();
    for (class, dir) in class_dirs {
        let mut files = Vec::new();
        walk(&dir, &class, &mut Vec::new(), &mut files, &mut left_out)?;
        out.push((class, files.into_iter().map(|(rel, p)| (rel, Loc::Local(p))).collect()));
    }
    say_left_out(root.display(), &left_out);
    Ok(out)
}

/// Class "folders" of an image folder in an object store: the first key segment under the
/// prefix. Objects directly under the prefix, and hidden names at any depth, are skipped.
fn list_remote(root: &Loc) -> anyhow::Result<Vec<(String, ClassFiles)>> {
    let mut by_class: std::collections::BTreeMap<String, ClassFiles> = Default::default();
    let mut left_out = Vec::new();
    for rel in store::walk_remote(root)? {
        let segments: Vec<&str> = rel.split('/').collect();
        if segments.len() < 2 || segments.iter().any(|s| s.starts_with('.')) || NOT_CLASSES.contains(&segments[0]) {
            continue;
        }
        if !is_image(&rel) {
            left_out.push(rel);
            continue;
        }
        let location = root.join(&rel)?;
        by_class.entry(segments[0].to_owned()).or_default().push((rel, location));
    }
    say_left_out(root, &left_out);
    Ok(by_class.into_iter().collect())
}

/// The entries of `dir` as (name, path). A name that is not valid UTF-8 (a file copied from an
/// old Latin-1 system, say) is kept, as its path is: only its id and class name show U+FFFD
/// where the bytes are not UTF-8, with a warning.
fn read_dir(dir: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let d = dir.display();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list folder {d}"))? {
        let entry = entry.with_context(|| format!("cannot list folder {d}"))?;
        let name = match entry.file_name().into_string() {
            Ok(name) => name,
            Err(raw) => {
                let lossy = raw.to_string_lossy().into_owned();
                tracing::warn!("{}: the name is not valid UTF-8; its id reads {lossy:?}", entry.path().display());
                lossy
            }
        };
        out.push((name, entry.path()));
    }
    Ok(out)
}

/// Collects image files under `dir`, as (id relative to the image folder with `/`, path).
/// `above` holds the real paths of the folders above `dir` on this walk: a link back to one of
/// them (a loop) is not followed. Other links are, wherever they point: a folder linked into two
/// classes gives its images to both, under two ids, as torchvision's `ImageFolder` does.
fn walk(
    dir: &Path,
    rel: &str,
    above: &mut Vec<PathBuf>,
    out: &mut Vec<(String, PathBuf)>,
    left_out: &mut Vec<String>,
) -> anyhow::Result<()> {
    let real = std::fs::canonicalize(dir).with_context(|| format!("cannot open folder {}", dir.display()))?;
    if above.contains(&real) {
        tracing::warn!("{}: a link back to a folder above it (a loop); not followed", dir.display());
        return Ok(());
    }
    above.push(real);
    for (name, path) in read_dir(dir)? {
        if name.starts_with('.') {
            continue;
        }
        let child = format!("{rel}/{name}");
        // Follows links. A broken link named like an image is a sample (its read gives it a
        // `missing` row, naming it); one named otherwise is left out like any non-image.
        let Ok(meta) = std::fs::metadata(&path) else {
            if is_image(&name) {
                out.push((child, path));
            } else {
                left_out.push(child);
            }
            continue;
        };
        if meta.is_dir() {
            walk(&path, &child, above, out, left_out)?;
        } else if is_image(&name) {
            // A pipe or device named like an image is listed too: reading it gives the sample
            // an `unreadable` row (store::read refuses it without opening it).
            out.push((child, path));
        } else {
            left_out.push(child);
        }
    }
    above.pop();
    Ok(())
}

/// The first `n` names, joined with commas, and "…" after them when there are more.
fn first<S: AsRef<str>>(names: &[S], n: usize) -> String {
    let shown: Vec<&str> = names.iter().take(n).map(AsRef::as_ref).collect();
    format!("{}{}", shown.join(", "), if names.len() > n { ", …" } else { "" })
}

/// Says which files of the class folders are not samples (not named as images; hidden names
/// are left out without a word), so that a dataset that lost files to a name is not silently
/// smaller.
fn say_left_out(root: impl std::fmt::Display, left_out: &[String]) {
    if left_out.is_empty() {
        return;
    }
    tracing::info!(
        "{root}: {} file(s) in the class folders are not images by their names and are left out ({}); image \
         names end in {}",
        left_out.len(),
        first(left_out, 3),
        IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
    );
}

/// Whether `name` has one of [`IMAGE_EXTENSIONS`], in any case.
fn is_image(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}
