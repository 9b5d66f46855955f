//! From a checked [`JobSpec`] to a [`Job`]: paths, file checks, defaults from the model's metadata.

use std::path::{Path, PathBuf};

use crate::store::{self, Loc};

use crate::engine::{check_torchscript, read_meta, ModelMeta};

use super::error::JobError;
use super::spec::{parse_spec, BatchSizeSpec, DevicesSpec, JobSpec, SizeSpec, TargetSpec};
use super::{BatchSize, DatasetSource, Devices, InterpolateMode, Job, Precision, Preprocess, Resize, Target};

/// Default pixel limit: PIL's decompression-bomb threshold.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;
/// Normalisation mean used for a 3-channel model when neither the spec nor the metadata gives one.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Normalisation std used for a 3-channel model when neither the spec nor the metadata gives one.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

const DEFAULT_MAP_SIZE: u32 = 64;
const DEFAULT_ROWS_PER_PART: u32 = 1024;
/// Most bytes of maps one part may hold in the worst case (an incompressible PNG per row).
const MAX_PART_MAP_BYTES: u64 = 1 << 30;

/// Reads, parses and resolves a job file, reading the model's embedded metadata from the
/// TorchScript archive.
pub fn load(job_file: &Path) -> Result<Job, JobError> {
    // A file without metadata must at least be TorchScript, before its missing metadata is
    // taken for settings the job has to give.
    load_with(job_file, |model| {
        let meta = read_meta(model)?;
        if meta.is_none() {
            check_torchscript(model)?;
        }
        Ok(meta)
    })
}

/// Reads, parses and resolves a job file; `read_meta` gets the resolved model path (checked to
/// be a file) and returns its metadata, `Ok(None)` when it has none.
pub fn load_with<F>(job_file: &Path, read_meta: F) -> Result<Job, JobError>
where
    F: FnOnce(&Path) -> anyhow::Result<Option<ModelMeta>>,
{
    let text = std::fs::read_to_string(job_file)
        .map_err(|e| JobError::file(job_file, format!("cannot read the job file: {e}")))?;
    let spec = parse_spec(&text, job_file)?;
    // Paths in the job are relative to its folder, taken as its real path: however the job file
    // is named (`job.toml` from its folder, `ds/job.toml`, through a link), the resolved paths
    // are the same, and so is the output's fingerprint, which covers the masks' locations.
    let job_dir = &job_dir(job_file);
    let model = model_file(&spec, job_dir)?;
    let meta = read_meta(&model)
        .map_err(|e| spec.error("model.path", format!("cannot read the metadata of {}: {e:#}", model.display())))?;
    resolve(spec, job_dir, meta.as_ref())
}

/// The folder a job file's paths resolve against: the real path of the folder holding it.
fn job_dir(job_file: &Path) -> PathBuf {
    let parent = job_file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf())
}

/// The model path (or `file://` URL) resolved against `job_dir`, checked to be a file.
fn model_file(spec: &JobSpec, job_dir: &Path) -> Result<PathBuf, JobError> {
    let model = match location(spec, "model.path", &spec.model.path, job_dir)? {
        Loc::Local(p) => p,
        Loc::Remote { .. } => {
            return Err(spec.error(
                "model.path",
                format!(
                    "{} is in an object store: libtorch loads a model from a local file; copy it to the node \
                     (or mount it) and give its path",
                    spec.model.path.display()
                ),
            ))
        }
    };
    if !model.is_file() {
        return Err(spec.error("model.path", format!("no model file at {}", model.display())));
    }
    Ok(model)
}

/// A path or URL from the spec: a URL as it is, a local path resolved against `job_dir`.
fn location(spec: &JobSpec, key: &str, value: &Path, job_dir: &Path) -> Result<Loc, JobError> {
    match Loc::parse(&value.to_string_lossy()) {
        // A `file://` URL's path, or the path as written; absolute ones stay as they are.
        Ok(Loc::Local(path)) => Ok(Loc::Local(job_dir.join(path))),
        Ok(remote) => Ok(remote),
        Err(e) => Err(spec.error(key, format!("{e:#}"))),
    }
}

/// Makes a [`Job`] from a checked spec: relative paths resolve against `job_dir` (the job
/// file's folder), the model and the dataset must exist, and what the spec leaves out comes
/// from the model's metadata `meta` (resize, crop from `input_size`, mean, std, class names).
pub fn resolve(spec: JobSpec, job_dir: &Path, meta: Option<&ModelMeta>) -> Result<Job, JobError> {
    let empty = ModelMeta::default();
    let meta = meta.unwrap_or(&empty);

    let model = model_file(&spec, job_dir)?;
    let dataset = match (&spec.dataset.manifest, &spec.dataset.image_folder) {
        (Some(m), _) => {
            let loc = location(&spec, "dataset.manifest", m, job_dir)?;
            match &loc {
                Loc::Local(p) if !p.is_file() => {
                    return Err(spec.error("dataset.manifest", format!("no manifest file at {}", p.display())));
                }
                Loc::Remote { .. } => match store::exists(&loc) {
                    Ok(true) => {}
                    Ok(false) => {
                        let why = format!(
                            "no manifest object at {loc} (or no such bucket: check the name, and AWS_ENDPOINT_URL for \
                             an S3-compatible server)"
                        );
                        return Err(spec.error("dataset.manifest", why));
                    }
                    Err(e) => {
                        // A time-out or a server error may pass on a retry; a refusal will not.
                        let retryable = crate::exit::retryable(&e);
                        return Err(JobError { retryable, ..spec.error("dataset.manifest", format!("{e:#}")) });
                    }
                },
                Loc::Local(_) => {}
            }
            DatasetSource::Manifest(loc)
        }
        (None, Some(f)) => {
            let loc = location(&spec, "dataset.image_folder", f, job_dir)?;
            if let Loc::Local(p) = &loc {
                if !p.is_dir() {
                    return Err(spec.error("dataset.image_folder", format!("no folder at {}", p.display())));
                }
            }
            DatasetSource::ImageFolder(loc)
        }
        (None, None) => return Err(spec.error("dataset", "give one of `manifest` or `image_folder`")),
    };
    // Whether it is a folder is checked once it is known not to be overridden (`Job::check_output`).
    let output = location(&spec, "output.path", &spec.output.path, job_dir)?;

    let preprocess = preprocess(&spec, meta)?;
    let mut warnings = Vec::new();
    if let Some((mh, mw)) = meta_input_size(&spec, meta)? {
        let (h, w) = preprocess.input_size();
        if (h, w) != (mh, mw) {
            let key = if spec.preprocess.crop.is_some() { "preprocess.crop" } else { "preprocess.resize" };
            warnings.push(format!(
                "{key} gives the model {h}x{w} inputs, but its metadata says input_size [{mh}, {mw}]: the \
                 attributions are of the model at a size it may not have been trained at"
            ));
        }
    }

    let class_names = meta.class_names.clone();
    let num_classes = meta.num_classes.or(class_names.as_ref().map(|c| c.len() as i64));
    if let (Some(n), Some(names)) = (meta.num_classes, &class_names) {
        if names.len() as i64 != n {
            return Err(spec.error(
                "model.path",
                format!("the model's metadata lists {} class names but num_classes is {n}", names.len()),
            ));
        }
    }

    let a = &spec.attribution;
    let target = match &a.target {
        None => Target::Label,
        Some(TargetSpec::Name(n)) if n == "predicted" => Target::Predicted,
        Some(TargetSpec::Name(n)) if n == "label" => Target::Label,
        // A class by the name the model's metadata gives it.
        Some(TargetSpec::Name(n)) => match class_names.as_ref().and_then(|names| names.iter().position(|c| c == n)) {
            Some(id) => Target::Class(id as i64),
            None => {
                let known = match &class_names {
                    Some(names) => {
                        let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
                        let more = if names.len() > 10 { ", …" } else { "" };
                        format!("nor a class name of the model ({}{more})", shown.join(", "))
                    }
                    None => "and the model's metadata names no classes (give a class id)".to_owned(),
                };
                return Err(spec
                    .error("attribution.target", format!("\"{n}\" is neither \"label\" nor \"predicted\", {known}")));
            }
        },
        Some(TargetSpec::Class(c)) => {
            if let Some(n) = num_classes {
                if !(0..n).contains(c) {
                    return Err(spec.error(
                        "attribution.target",
                        format!("class {c} is not a class of the model (it has {n} classes: 0..{})", n - 1),
                    ));
                }
            }
            Target::Class(*c)
        }
    };
    let interpolate_mode = match &a.interpolate_mode {
        None => InterpolateMode::Nearest,
        Some(m) => InterpolateMode::parse(m)
            .ok_or_else(|| spec.error("attribution.interpolate_mode", format!("\"{m}\" is not a mode")))?,
    };
    let guided_rectifiers = a.guided_rectifiers.clone().unwrap_or_else(|| vec!["relu".to_owned()]);
    let precision = match a.precision.as_deref() {
        None | Some("fp32") => Precision::Fp32,
        Some("bf16") => Precision::Bf16,
        Some(p) => return Err(spec.error("attribution.precision", format!("\"{p}\" is not a precision"))),
    };
    let devices = match &spec.runtime.devices {
        None => Devices::List(vec!["cpu".to_owned()]),
        Some(DevicesSpec::Name(_)) => Devices::All,
        Some(DevicesSpec::List(l)) => Devices::List(l.clone()),
    };

    let map_size = spec.output.map_size.unwrap_or(DEFAULT_MAP_SIZE);
    let rows_per_part = spec.output.rows_per_part.unwrap_or(DEFAULT_ROWS_PER_PART);
    // A part's map column holds up to rows_per_part PNGs of up to about map_size² bytes each;
    // Arrow's binary column tops out at 2 GiB per part, so keep the worst case within 1 GiB.
    let worst = u64::from(rows_per_part) * u64::from(map_size) * u64::from(map_size);
    if worst > MAX_PART_MAP_BYTES {
        let fits = (MAX_PART_MAP_BYTES / (u64::from(map_size) * u64::from(map_size))).max(1);
        return Err(spec.error(
            if spec.output.rows_per_part.is_some() { "output.rows_per_part" } else { "output.map_size" },
            format!(
                "{rows_per_part} rows per part with maps of {map_size}×{map_size} can hold up to {} MiB of \
                 maps in one part file (at most {} MiB): set output.rows_per_part to {fits} or fewer",
                worst >> 20,
                MAX_PART_MAP_BYTES >> 20
            ),
        ));
    }
    Ok(Job {
        job_file: spec.origin().to_path_buf(),
        job_dir: job_dir.to_path_buf(),
        dataset,
        model,
        preprocess,
        target,
        interpolate_mode,
        guided_rectifiers,
        precision,
        devices,
        batch_size: match &spec.runtime.batch_size {
            None => BatchSize::Fixed(BatchSize::DEFAULT),
            // Validated to be 1..=65536.
            Some(BatchSizeSpec::Fixed(n)) => BatchSize::Fixed(*n as u32),
            Some(BatchSizeSpec::Word(_)) => BatchSize::Auto,
        },
        workers_per_device: spec.runtime.workers_per_device,
        channels_last: spec.runtime.channels_last,
        allow_tf32: spec.runtime.allow_tf32.unwrap_or(true),
        stats_on_device: spec.runtime.stats_on_device,
        cudnn_benchmark: spec.runtime.cudnn_benchmark.unwrap_or(true),
        decode_threads: spec.runtime.decode_threads.unwrap_or(0),
        output,
        map_size,
        rows_per_part,
        regions: spec.regions.iter().map(|r| (r.name.clone(), r.x0, r.y0, r.x1, r.y1)).collect(),
        class_names,
        num_classes,
        spec_text: spec.text().to_owned(),
        warnings,
    })
}

/// The metadata's `input_size` as (height, width), checked.
fn meta_input_size(spec: &JobSpec, meta: &ModelMeta) -> Result<Option<(u32, u32)>, JobError> {
    let Some([h, w]) = meta.input_size else {
        return Ok(None);
    };
    match (u32::try_from(h), u32::try_from(w)) {
        (Ok(h), Ok(w)) if h > 0 && w > 0 => Ok(Some((h, w))),
        _ => Err(spec.error("model.path", format!("the model's metadata has an invalid input_size [{h}, {w}]"))),
    }
}

fn preprocess(spec: &JobSpec, meta: &ModelMeta) -> Result<Preprocess, JobError> {
    let p = &spec.preprocess;
    let input_size = meta_input_size(spec, meta)?;
    let resize = match (p.resize, meta.resize, input_size) {
        (Some(SizeSpec::Side(s)), _, _) => Resize::ShorterSide(s),
        (Some(SizeSpec::HeightWidth(h, w)), _, _) => Resize::Exact { h, w },
        (None, Some(0), _) => {
            return Err(spec.error("preprocess.resize", "not set, and the model's metadata gives resize 0"))
        }
        (None, Some(s), _) => Resize::ShorterSide(s),
        (None, None, Some((h, w))) => Resize::Exact { h, w },
        (None, None, None) => {
            return Err(spec.error(
                "preprocess.resize",
                "not set, and the model's metadata has neither resize nor input_size: set preprocess.resize",
            ))
        }
    };
    let crop = match (p.crop, resize, input_size) {
        (Some(c), _, _) => Some(c.height_width()),
        (None, Resize::Exact { .. }, _) => None,
        (None, Resize::ShorterSide(_), Some(size)) => Some(size),
        (None, Resize::ShorterSide(s), None) => {
            return Err(spec.error(
                "preprocess.crop",
                format!(
                    "not set: resizing the shorter side to {s} leaves images of different sizes, and a batch \
                     needs one size; set preprocess.crop, or give preprocess.resize as [height, width] \
                     (the model's metadata has no input_size to crop to)"
                ),
            ))
        }
    };
    if let (Resize::Exact { h, w }, Some((ch, cw))) = (resize, crop) {
        if ch > h || cw > w {
            return Err(spec.error(
                "preprocess.crop",
                format!("crop {ch}x{cw} is larger than the resized image {h}x{w} (height x width)"),
            ));
        }
    }

    let channels = meta.channels;
    if let Some(c) = channels {
        if c < 1 {
            return Err(spec.error("model.path", format!("the model's metadata has an invalid channels {c}")));
        }
    }
    // Each value with where it came from, for the messages (the spec's own: nothing to add).
    let pick = |key: &str, given: &Option<Vec<f32>>, from_meta: &Option<Vec<f32>>, imagenet: &[f32; 3]| {
        if let Some(v) = given {
            return Ok((v.clone(), ""));
        }
        if let Some(v) = from_meta {
            return Ok((v.clone(), " (from the model's metadata)"));
        }
        match channels {
            None | Some(3) => {
                Ok((imagenet.to_vec(), " (ImageNet's, as neither the job nor the model's metadata sets it)"))
            }
            Some(c) => Err(spec.error(
                key,
                format!("not set, and the model has {c} input channels and no {key} in its metadata: set {key}"),
            )),
        }
    };
    let (mean, mean_origin) = pick("preprocess.mean", &p.mean, &meta.mean, &IMAGENET_MEAN)?;
    let (std, std_origin) = pick("preprocess.std", &p.std, &meta.std, &IMAGENET_STD)?;
    if let Some(c) = channels {
        for (key, v, origin) in [("preprocess.mean", &mean, mean_origin), ("preprocess.std", &std, std_origin)] {
            if v.len() as i64 != c {
                return Err(
                    spec.error(key, format!("has {} values{origin} but the model has {c} input channels", v.len()))
                );
            }
        }
    }
    if mean.len() != std.len() {
        return Err(spec.error(
            "preprocess.std",
            format!(
                "has {} values{} but preprocess.mean has {}{}: one each per input channel",
                std.len(),
                std_origin,
                mean.len(),
                mean_origin
            ),
        ));
    }
    if let Some(x) = std.iter().find(|&&x| !(x > 0.0 && x.is_finite())) {
        return Err(spec.error("preprocess.std", format!("{x}{std_origin} is not above 0")));
    }
    if let Some(x) = mean.iter().find(|x| !x.is_finite()) {
        return Err(spec.error("preprocess.mean", format!("{x}{mean_origin} is not a finite number")));
    }
    // Pixels are scaled to 0..1 before (x − mean) / std, as torchvision's ToTensor does; values
    // on the 0..255 scale (mmcv's convention) would make every input about −2 without an error.
    // A mean above 1 cannot be one of 0..1 pixels; a std above 1 only shrinks the input, so
    // only one wholly above 1 is taken for the 0..255 scale.
    let on_255_scale = |v: &[f32]| v.iter().all(|&x| x > 1.0);
    for (key, v, origin) in [("preprocess.mean", &mean, mean_origin), ("preprocess.std", &std, std_origin)] {
        if on_255_scale(v) {
            let scaled: Vec<String> = v.iter().map(|x| format!("{:.4}", x / 255.0)).collect();
            return Err(spec.error(
                key,
                format!(
                    "{v:?}{origin} is on the 0..255 pixel scale, but pixels are scaled to 0..1 before \
                     normalising (as torchvision's ToTensor does): divide by 255, i.e. [{}]",
                    scaled.join(", ")
                ),
            ));
        }
    }
    if let Some(x) = mean.iter().find(|&&x| x > 1.0) {
        return Err(spec.error(
            "preprocess.mean",
            format!(
                "{x}{mean_origin} is above 1, which no mean of pixels scaled to 0..1 (as torchvision's \
                 ToTensor does) can be"
            ),
        ));
    }
    Ok(Preprocess {
        resize,
        crop,
        mean,
        std,
        max_pixels: p.max_pixels.unwrap_or(DEFAULT_MAX_PIXELS),
        jpeg_dct_scaling: p.jpeg_dct_scaling.unwrap_or(false),
    })
}
