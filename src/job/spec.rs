//! The raw job spec as written in the TOML file (`JobSpec`), its parser and its checks that
//! need no file system and no model: types, ranges, names, and which keys go together.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::error::JobError;

/// Manifest file extensions the source stage reads, lower case, without the dot.
pub const MANIFEST_EXTENSIONS: [&str; 4] = ["csv", "jsonl", "ndjson", "parquet"];
/// Names accepted by `attribution.interpolate_mode`.
pub const INTERPOLATE_MODES: [&str; 4] = ["nearest", "bilinear", "bicubic", "area"];
/// Names accepted in `attribution.guided_rectifiers`.
pub const RECTIFIERS: [&str; 3] = ["relu", "relu6", "leaky_relu"];
/// Names accepted by `attribution.precision`.
pub const PRECISIONS: [&str; 2] = ["fp32", "bf16"];

/// A job spec as written: every table and key of the TOML file, checked for types, ranges and
/// consistency, but with paths not yet resolved and defaults not yet filled in. Made by
/// [`parse_spec`]; [`super::resolve`] turns it into a [`super::Job`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `[dataset]`: where the samples come from.
    pub dataset: DatasetSpec,
    /// `[model]`: the TorchScript model.
    pub model: ModelSpec,
    /// `[preprocess]`: how images become model input; defaults from the model's metadata.
    #[serde(default)]
    pub preprocess: PreprocessSpec,
    /// `[attribution]`: what is attributed and how.
    #[serde(default)]
    pub attribution: AttributionSpec,
    /// `[runtime]`: devices, batching and decode threads.
    #[serde(default)]
    pub runtime: RuntimeSpec,
    /// `[output]`: where the Parquet parts go and what they hold.
    pub output: OutputSpec,
    /// `[[regions]]`: named rectangles whose share of the attribution becomes a column each.
    #[serde(default)]
    pub regions: Vec<RegionSpec>,
    /// The file's text, name and key positions, for messages and for the output's metadata.
    #[serde(skip)]
    pub(crate) source: SpecSource,
}

/// `[dataset]`: exactly one of `manifest` and `image_folder`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// A manifest file: `.csv`, `.jsonl`/`.ndjson` or `.parquet`, relative to the job file's folder.
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// A folder with one sub-folder of images per class, relative to the job file's folder.
    #[serde(default)]
    pub image_folder: Option<PathBuf>,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The TorchScript file, relative to the job file's folder.
    pub path: PathBuf,
}

/// `[preprocess]`: every key optional; what is left out comes from the model's metadata.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// Resize: a number is the shorter side (aspect kept), `[h, w]` an exact size.
    #[serde(default)]
    pub resize: Option<SizeSpec>,
    /// Centre crop after the resize: a number is a square side, `[h, w]` a rectangle.
    #[serde(default)]
    pub crop: Option<SizeSpec>,
    /// Per-channel normalisation mean, on the 0..1 pixel scale.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// Per-channel normalisation standard deviation, on the 0..1 pixel scale; each above 0.
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// Images with more pixels than this are rows with status `too_large` (decompression-bomb
    /// guard); default 89478485.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Decode JPEGs at least twice the resize target at 1/8 … 4/8 scale straight from the
    /// DCT coefficients (much faster for large photos; pixels differ slightly from a full
    /// decode and resize); default false.
    #[serde(default)]
    pub jpeg_dct_scaling: Option<bool>,
}

/// `[attribution]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributionSpec {
    /// The class attributed: `"label"`, `"predicted"` or a class id; default `"label"`.
    #[serde(default)]
    pub target: Option<TargetSpec>,
    /// How the Grad-CAM map is upsampled to the input size: nearest, bilinear, bicubic or area;
    /// default nearest.
    #[serde(default)]
    pub interpolate_mode: Option<String>,
    /// The rectifier kinds whose backward pass guided backpropagation clamps: relu, relu6,
    /// leaky_relu; default `["relu"]`.
    #[serde(default)]
    pub guided_rectifiers: Option<Vec<String>>,
    /// Compute precision: fp32 or bf16; default fp32.
    #[serde(default)]
    pub precision: Option<String>,
}

/// `[runtime]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// Devices: a list of `cpu`, `cuda` or `cuda:N`, or the string `"all"`; default `["cpu"]`.
    #[serde(default)]
    pub devices: Option<DevicesSpec>,
    /// Samples per forward/backward pass: a number, at least 1, or `"auto"` (on CUDA, the
    /// largest of 256, 128, 64, … that runs on every worker at once; 32 on CPU); default 32.
    #[serde(default)]
    pub batch_size: Option<BatchSizeSpec>,
    /// Workers (model replicas, each on its own CUDA stream) per device, 1 to 8: with two, one
    /// worker's uploads, downloads and host-side work overlap the other's kernels; default 2 on
    /// CUDA devices, 1 on the CPU.
    #[serde(default)]
    pub workers_per_device: Option<u32>,
    /// Image decoding threads, 0 to 1024; 0 (the default) means one per core.
    #[serde(default)]
    pub decode_threads: Option<u32>,
    /// Model parameters and input in the channels-last memory format; default on for CUDA
    /// devices and with `precision = "bf16"`, off for fp32 on the CPU (where it is slower).
    #[serde(default)]
    pub channels_last: Option<bool>,
    /// cuDNN may run float32 convolutions on TF32 tensor cores (PyTorch's default, so also
    /// Captum's); `false` for full IEEE float32 on CUDA, slower. Default true.
    #[serde(default)]
    pub allow_tf32: Option<bool>,
    /// cuDNN benchmark mode (fastest convolution algorithm per input shape) on CUDA devices;
    /// default on.
    #[serde(default)]
    pub cudnn_benchmark: Option<bool>,
    /// Per-sample statistics and the map's resize run on the model's device, so that only they
    /// (a few hundred bytes and the `map_size²` map) are copied back instead of the whole map;
    /// `false` computes them on the host's thread pool from the whole map. Default on for CUDA
    /// devices, off on the CPU (where the host's pool is as close to the map and faster). A
    /// device whose reduction does not match the host's on test maps at start-up computes them
    /// on the host instead, with a warning.
    #[serde(default)]
    pub stats_on_device: Option<bool>,
}

/// Largest `output.map_size`: each row stores a map of this side.
pub const MAX_MAP_SIZE: u32 = 1024;

/// `[output]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The output folder, relative to the job file's folder.
    pub path: PathBuf,
    /// Side of the stored attribution map, in pixels; 1 to 1024; default 64.
    #[serde(default)]
    pub map_size: Option<u32>,
    /// Rows per Parquet part file; at least 1; default 1024.
    #[serde(default)]
    pub rows_per_part: Option<u32>,
}

/// `[[regions]]`: a rectangle in the model-input frame, coordinates 0..1 of width and height.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// Name, `[a-z0-9_]+`, unique; the column is `region_<name>_share`.
    pub name: String,
    /// Left edge, 0..1 of the width.
    pub x0: f32,
    /// Top edge, 0..1 of the height.
    pub y0: f32,
    /// Right edge, above `x0`, at most 1.
    pub x1: f32,
    /// Bottom edge, above `y0`, at most 1.
    pub y1: f32,
}

/// A size as written: one number or `[h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    /// One number.
    Side(u32),
    /// `[h, w]`.
    HeightWidth(u32, u32),
}

/// `attribution.target` as written: a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// A string; `label` and `predicted` are the valid ones.
    Name(String),
    /// A class id.
    Class(i64),
}

/// `runtime.batch_size` as written: a number or a word (`auto` is the valid one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchSizeSpec {
    /// A number (validated to be at least 1).
    Fixed(i64),
    /// A string; `auto` is the valid one.
    Word(String),
}

impl<'de> Deserialize<'de> for BatchSizeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = BatchSizeSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of samples or \"auto\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<BatchSizeSpec, E> {
                Ok(BatchSizeSpec::Fixed(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<BatchSizeSpec, E> {
                Ok(BatchSizeSpec::Fixed(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BatchSizeSpec, E> {
                Ok(BatchSizeSpec::Word(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `runtime.devices` as written: a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicesSpec {
    /// A string; `all` is the valid one.
    Name(String),
    /// A list of device strings.
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for SizeSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SizeSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in pixels or [height, width]")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeSpec, E> {
                u32::try_from(v).map(SizeSpec::Side).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeSpec, E> {
                u32::try_from(v).map(SizeSpec::Side).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SizeSpec, A::Error> {
                let h: u32 = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let w: u32 = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(SizeSpec::HeightWidth(h, w))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for TargetSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"label\", \"predicted\" or a class id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TargetSpec, E> {
                Ok(TargetSpec::Class(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TargetSpec, E> {
                i64::try_from(v)
                    .map(TargetSpec::Class)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TargetSpec, E> {
                Ok(TargetSpec::Name(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for DevicesSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DevicesSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of devices (\"cpu\", \"cuda\", \"cuda:N\") or \"all\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DevicesSpec, E> {
                Ok(DevicesSpec::Name(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DevicesSpec, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    list.push(item);
                }
                Ok(DevicesSpec::List(list))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where a key sits in the job file.
#[derive(Debug, Clone)]
struct KeySpan {
    /// Dotted key path, array items as `[i]`: `regions[1].x0`.
    path: String,
    /// Byte range of the key (for an array item, of the item).
    key: Range<usize>,
    /// Byte range of the value.
    value: Range<usize>,
}

/// The job file's name and text and where each key is, for messages naming key and line.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecSource {
    /// The job file, as given.
    pub(crate) origin: PathBuf,
    /// The job file's text.
    pub(crate) text: String,
    keys: Vec<KeySpan>,
}

impl SpecSource {
    pub(crate) fn new(text: &str, origin: &Path) -> Result<Self, JobError> {
        let table = toml::de::DeTable::parse(text).map_err(|e| {
            let line = e.span().map(|s| line_at(text, s.start));
            let mut message = e.message().trim().to_owned();
            // The parser's "duplicate key" points at the key but does not name it.
            let quoted =
                e.span().and_then(|s| text.get(s)).map(str::trim).filter(|k| !k.is_empty() && !k.contains('\n'));
            if let (true, Some(key)) = (message == "duplicate key", quoted) {
                message = format!("duplicate key `{key}` (a key or table may be given once)");
            }
            JobError { file: origin.to_path_buf(), key: None, line, message, retryable: false }
        })?;
        let mut keys = Vec::new();
        index_table("", table.get_ref(), &mut keys);
        Ok(SpecSource { origin: origin.to_path_buf(), text: text.to_owned(), keys })
    }

    /// The line of `path`, or of the nearest enclosing key that is written in the file.
    pub(crate) fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(k) = self.keys.iter().find(|k| k.path == p) {
                return Some(line_at(&self.text, k.key.start));
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// An error about the key at `path`, with its line.
    pub(crate) fn error(&self, path: &str, message: impl Into<String>) -> JobError {
        JobError {
            file: self.origin.clone(),
            key: Some(path.to_owned()),
            line: self.line_of(path),
            message: message.into(),
            retryable: false,
        }
    }

    /// The innermost key whose key or value range holds `span`.
    fn key_at(&self, span: &Range<usize>) -> Option<&KeySpan> {
        let holds = |r: &Range<usize>| r.start <= span.start && span.end <= r.end;
        self.keys
            .iter()
            .filter_map(|k| {
                [&k.key, &k.value].into_iter().filter(|r| holds(r)).map(|r| (r.len(), k)).min_by_key(|(len, _)| *len)
            })
            .min_by_key(|(len, _)| *len)
            .map(|(_, k)| k)
    }

    /// Turns a deserialisation error into one naming the key and line.
    fn de_error(&self, e: &toml::de::Error) -> JobError {
        let message = plain_types(e.message().trim());
        // No span, or an empty one (the document root): an error about the file as a whole.
        let Some(span) = e.span().filter(|s| !s.is_empty()) else {
            // A whole section missing at the top level: say what to add.
            let missing = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`'));
            let message = match missing {
                Some(section @ ("dataset" | "model" | "output")) => {
                    format!("missing field `{section}`: the job file needs a [{section}] section")
                }
                _ => message,
            };
            return JobError::file(&self.origin, message);
        };
        match self.key_at(&span) {
            Some(k) => JobError {
                file: self.origin.clone(),
                key: Some(k.path.clone()),
                line: Some(line_at(&self.text, span.start)),
                message,
                retryable: false,
            },
            None => JobError::file(&self.origin, message),
        }
    }
}

/// serde's "expected u32" and the like in words a job file's author reads.
fn plain_types(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, words) in [
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected u32", "expected a whole number (0 or more)"),
        ("expected u16", "expected a whole number (0 or more)"),
        ("expected usize", "expected a whole number (0 or more)"),
        ("expected i64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        m = m.replace(rust, words);
    }
    m
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn index_table(prefix: &str, table: &toml::de::DeTable<'_>, out: &mut Vec<KeySpan>) {
    for (k, v) in table.iter() {
        let path = join_key(prefix, k.get_ref());
        out.push(KeySpan { path: path.clone(), key: k.span(), value: v.span() });
        index_value(&path, v.get_ref(), out);
    }
}

fn index_value(path: &str, value: &toml::de::DeValue<'_>, out: &mut Vec<KeySpan>) {
    match value {
        toml::de::DeValue::Table(t) => index_table(path, t, out),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let p = format!("{path}[{i}]");
                out.push(KeySpan { path: p.clone(), key: item.span(), value: item.span() });
                index_value(&p, item.get_ref(), out);
            }
        }
        _ => {}
    }
}

/// 1-based line of byte offset `at`.
fn line_at(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Parses and checks a job spec. `origin` is the job file's path, used in messages only.
///
/// Errors name the file, the key path and its line: unknown keys, wrong types, and values out of
/// range or not among the allowed names. Checks that need the model's metadata or the file
/// system are [`super::resolve`]'s.
pub fn parse_spec(text: &str, origin: &Path) -> Result<JobSpec, JobError> {
    let source = SpecSource::new(text, origin)?;
    let mut spec: JobSpec = toml::from_str(text).map_err(|e| source.de_error(&e))?;
    spec.source = source;
    spec.check()?;
    Ok(spec)
}

impl JobSpec {
    /// The job file's text as read.
    pub fn text(&self) -> &str {
        &self.source.text
    }

    /// The job file's path, as given to [`parse_spec`].
    pub fn origin(&self) -> &Path {
        &self.source.origin
    }

    /// An error about the key at `path`, naming the file and the key's line.
    pub fn error(&self, path: &str, message: impl Into<String>) -> JobError {
        self.source.error(path, message)
    }

    fn check(&self) -> Result<(), JobError> {
        let s = &self.source;
        // [dataset]
        match (&self.dataset.manifest, &self.dataset.image_folder) {
            (Some(_), Some(_)) => return Err(s.error("dataset", "give either `manifest` or `image_folder`, not both")),
            (None, None) => return Err(s.error("dataset", "give one of `manifest` or `image_folder`")),
            (Some(m), None) => {
                let ext = m.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                if !ext.as_deref().is_some_and(|e| MANIFEST_EXTENSIONS.contains(&e)) {
                    return Err(s.error(
                        "dataset.manifest",
                        format!(
                            "\"{}\" is not a manifest type: use a .csv, .jsonl, .ndjson or .parquet file",
                            m.display()
                        ),
                    ));
                }
            }
            (None, Some(_)) => {}
        }
        // [preprocess]
        let p = &self.preprocess;
        for (key, size) in [("preprocess.resize", p.resize), ("preprocess.crop", p.crop)] {
            match size {
                Some(SizeSpec::Side(0)) => return Err(s.error(key, "must be at least 1 pixel")),
                Some(SizeSpec::HeightWidth(h, w)) if h == 0 || w == 0 => {
                    return Err(s.error(key, "height and width must be at least 1 pixel"))
                }
                _ => {}
            }
        }
        if let (Some(SizeSpec::HeightWidth(rh, rw)), Some(crop)) = (p.resize, p.crop) {
            let (ch, cw) = crop.height_width();
            if ch > rh || cw > rw {
                return Err(s.error(
                    "preprocess.crop",
                    format!("crop {ch}x{cw} is larger than the resized image {rh}x{rw} (height x width)"),
                ));
            }
        }
        for (key, values) in [("preprocess.mean", &p.mean), ("preprocess.std", &p.std)] {
            if let Some(v) = values {
                if v.is_empty() {
                    return Err(s.error(key, "needs one value per input channel"));
                }
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(s.error(&format!("{key}[{i}]"), "must be a finite number"));
                }
            }
        }
        if let Some(std) = &p.std {
            if let Some(i) = std.iter().position(|&x| x <= 0.0) {
                return Err(s.error(&format!("preprocess.std[{i}]"), format!("must be above 0, not {}", std[i])));
            }
        }
        if let (Some(mean), Some(std)) = (&p.mean, &p.std) {
            if mean.len() != std.len() {
                return Err(s.error(
                    "preprocess.std",
                    format!(
                        "has {} values but preprocess.mean has {}: one each per input channel",
                        std.len(),
                        mean.len()
                    ),
                ));
            }
        }
        if p.max_pixels == Some(0) {
            return Err(s.error("preprocess.max_pixels", "must be at least 1"));
        }
        // [attribution]
        let a = &self.attribution;
        // A name other than "label" and "predicted" is a class name, checked against the
        // model's when the job is resolved.
        match &a.target {
            Some(TargetSpec::Class(c)) if *c < 0 => {
                return Err(s.error("attribution.target", format!("class id {c} is negative")))
            }
            _ => {}
        }
        if let Some(m) = &a.interpolate_mode {
            if !INTERPOLATE_MODES.contains(&m.as_str()) {
                return Err(s.error(
                    "attribution.interpolate_mode",
                    format!("\"{m}\" is not an interpolation mode: use one of {}", quoted(&INTERPOLATE_MODES)),
                ));
            }
        }
        if let Some(list) = &a.guided_rectifiers {
            let mut seen = HashSet::new();
            for (i, r) in list.iter().enumerate() {
                let key = format!("attribution.guided_rectifiers[{i}]");
                if !RECTIFIERS.contains(&r.as_str()) {
                    return Err(
                        s.error(&key, format!("\"{r}\" is not a rectifier kind: use any of {}", quoted(&RECTIFIERS)))
                    );
                }
                if !seen.insert(r.as_str()) {
                    return Err(s.error(&key, format!("\"{r}\" is listed twice")));
                }
            }
        }
        if let Some(pr) = &a.precision {
            if !PRECISIONS.contains(&pr.as_str()) {
                return Err(s.error(
                    "attribution.precision",
                    format!("\"{pr}\" is not a precision: use one of {}", quoted(&PRECISIONS)),
                ));
            }
        }
        // [runtime]
        let r = &self.runtime;
        match &r.devices {
            Some(DevicesSpec::Name(n)) if n != "all" => {
                return Err(s.error(
                    "runtime.devices",
                    format!("\"{n}\" is not a device list: write a list such as [\"{n}\"], or \"all\""),
                ))
            }
            Some(DevicesSpec::List(list)) => {
                if list.is_empty() {
                    return Err(
                        s.error("runtime.devices", "the list is empty: name at least one device, or use \"all\"")
                    );
                }
                let mut seen = HashSet::new();
                for (i, d) in list.iter().enumerate() {
                    let key = format!("runtime.devices[{i}]");
                    if !valid_device(d) {
                        return Err(s.error(
                            &key,
                            format!("\"{d}\" is not a device: use \"cpu\", \"cuda\" or \"cuda:N\" (N = 0, 1, ...)"),
                        ));
                    }
                    // "cuda" is "cuda:0": one device listed twice would get two sets of replicas.
                    let device = match d.strip_prefix("cuda:").and_then(|n| n.parse::<u32>().ok()) {
                        Some(n) => format!("cuda:{n}"),
                        None if d == "cuda" => "cuda:0".to_owned(),
                        None => d.clone(),
                    };
                    if !seen.insert(device.clone()) {
                        return Err(s.error(&key, format!("\"{d}\" is listed twice (as {device})")));
                    }
                }
            }
            _ => {}
        }
        match &r.batch_size {
            Some(BatchSizeSpec::Fixed(n)) if *n < 1 => return Err(s.error("runtime.batch_size", "must be at least 1")),
            Some(BatchSizeSpec::Fixed(n)) if *n > 65536 => {
                return Err(s.error("runtime.batch_size", "must be at most 65536"))
            }
            Some(BatchSizeSpec::Word(w)) if w != "auto" => {
                return Err(s.error("runtime.batch_size", format!("\"{w}\" is not a batch size: a number or \"auto\"")))
            }
            _ => {}
        }
        if matches!(r.workers_per_device, Some(n) if !(1..=8).contains(&n)) {
            return Err(s.error("runtime.workers_per_device", "must be 1 to 8"));
        }
        if matches!(r.decode_threads, Some(n) if n > 1024) {
            return Err(s.error("runtime.decode_threads", "must be 0 (one per core) to 1024"));
        }
        // [output]
        if self.output.path.as_os_str().is_empty() {
            return Err(s.error("output.path", "is empty: name the output folder"));
        }
        if self.output.map_size == Some(0) {
            return Err(s.error("output.map_size", "must be at least 1"));
        }
        if matches!(self.output.map_size, Some(n) if n > MAX_MAP_SIZE) {
            return Err(s.error("output.map_size", format!("must be at most {MAX_MAP_SIZE} (a map per row)")));
        }
        if self.output.rows_per_part == Some(0) {
            return Err(s.error("output.rows_per_part", "must be at least 1"));
        }
        // [[regions]]
        let mut names = HashSet::new();
        for (i, reg) in self.regions.iter().enumerate() {
            let key = |k: &str| format!("regions[{i}].{k}");
            if reg.name.is_empty()
                || !reg.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(s.error(
                    &key("name"),
                    format!("\"{}\" is not a region name: use lower-case letters, digits and _", reg.name),
                ));
            }
            if !names.insert(reg.name.as_str()) {
                return Err(s.error(&key("name"), format!("region name \"{}\" is used twice", reg.name)));
            }
            for (k, v) in [("x0", reg.x0), ("y0", reg.y0), ("x1", reg.x1), ("y1", reg.y1)] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(s.error(&key(k), format!("{v} is outside 0..1 (a fraction of the model input)")));
                }
            }
            if reg.x0 >= reg.x1 {
                return Err(s.error(&key("x1"), format!("x1 ({}) must be above x0 ({})", reg.x1, reg.x0)));
            }
            if reg.y0 >= reg.y1 {
                return Err(s.error(&key("y1"), format!("y1 ({}) must be above y0 ({})", reg.y1, reg.y0)));
            }
        }
        Ok(())
    }
}

impl SizeSpec {
    /// Height and width; one number is a square.
    pub fn height_width(self) -> (u32, u32) {
        match self {
            SizeSpec::Side(s) => (s, s),
            SizeSpec::HeightWidth(h, w) => (h, w),
        }
    }
}

/// Whether `d` is `cpu`, `cuda` or `cuda:N`.
pub fn valid_device(d: &str) -> bool {
    match d.strip_prefix("cuda:") {
        Some(n) => !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u32>().is_ok(),
        None => d == "cpu" || d == "cuda",
    }
}

fn quoted(names: &[&str]) -> String {
    names.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", ")
}
