//! The job spec: a TOML file that names the dataset, the model, preprocessing, attribution
//! settings, devices and output. [`parse_spec`] reads it into the raw [`JobSpec`] (types, ranges
//! and names checked, every error naming key and line); [`resolve`] turns that into a validated
//! [`Job`] (paths resolved against the job file's folder, files checked, defaults filled in from
//! the model's metadata); [`load`] and [`load_with`] do both from a file.

mod error;
mod resolve;
mod spec;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

use crate::store::Loc;

pub use error::JobError;
pub use resolve::{load, load_with, resolve, DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD};
pub use spec::{
    parse_spec, valid_device, AttributionSpec, BatchSizeSpec, DatasetSpec, DevicesSpec, JobSpec, ModelSpec, OutputSpec,
    PreprocessSpec, RegionSpec, RuntimeSpec, SizeSpec, TargetSpec, INTERPOLATE_MODES, MANIFEST_EXTENSIONS, PRECISIONS,
    RECTIFIERS,
};

/// A validated job: what `saliency-audit run` does, with every path resolved and every default
/// filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The job file, as given.
    pub job_file: PathBuf,
    /// The folder its paths resolved against: the job file's folder, as its real path.
    pub job_dir: PathBuf,
    /// Where the samples come from.
    pub dataset: DatasetSource,
    /// The TorchScript model file.
    pub model: PathBuf,
    /// How images become model input.
    pub preprocess: Preprocess,
    /// The class each sample's attribution is for.
    pub target: Target,
    /// How the Grad-CAM map is upsampled to the input size.
    pub interpolate_mode: InterpolateMode,
    /// Rectifier kinds guided backpropagation clamps (`relu`, `relu6`, `leaky_relu`).
    pub guided_rectifiers: Vec<String>,
    /// Compute precision.
    pub precision: Precision,
    /// Devices the engine runs on.
    pub devices: Devices,
    /// Samples per forward/backward pass.
    pub batch_size: BatchSize,
    /// Workers per device; `None`: 2 on CUDA devices, 1 on the CPU.
    pub workers_per_device: Option<u32>,
    /// Parameters and input in the channels-last memory format; `None`: on for CUDA devices and
    /// with bf16, off for fp32 on the CPU.
    pub channels_last: Option<bool>,
    /// cuDNN may use TF32 tensor cores for float32 convolutions on CUDA (PyTorch's default).
    pub allow_tf32: bool,
    /// cuDNN benchmark mode on CUDA devices.
    pub cudnn_benchmark: bool,
    /// Statistics and map resizing on the model's device; `None`: on for CUDA devices, off on
    /// the CPU.
    pub stats_on_device: Option<bool>,
    /// Image decoding threads; 0 means one per core.
    pub decode_threads: u32,
    /// Output folder, or object-store prefix (`s3://bucket/path`, …).
    pub output: Loc,
    /// Side of the stored attribution map, in pixels (at least 1).
    pub map_size: u32,
    /// Rows per Parquet part file (at least 1).
    pub rows_per_part: u32,
    /// Named rectangles in the model-input frame: (name, x0, y0, x1, y1), coordinates 0..1.
    pub regions: Vec<(String, f32, f32, f32, f32)>,
    /// The model's class names, index = class id, from its metadata.
    pub class_names: Option<Vec<String>>,
    /// The model's number of classes, from its metadata (`num_classes`, else the number of
    /// class names).
    pub num_classes: Option<i64>,
    /// The job file's text as read, for the output's file metadata.
    pub spec_text: String,
    /// Settings that are valid but probably not what was meant (shown by `validate`, logged by
    /// `run`).
    pub warnings: Vec<String>,
}

/// Where the samples come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetSource {
    /// A manifest file (CSV, JSONL or Parquet), local or in an object store.
    Manifest(Loc),
    /// A folder (or object-store prefix) with one sub-folder of images per class.
    ImageFolder(Loc),
}

/// The first resize step: the decode stage's own type.
pub use crate::decode::Resize;

/// Preprocessing: resize, optional centre crop, normalisation, pixel limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// The resize.
    pub resize: Resize,
    /// Centre crop after the resize: (height, width).
    pub crop: Option<(u32, u32)>,
    /// Per-channel mean on the 0..1 scale, one per input channel.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation on the 0..1 scale, one per input channel, each above 0.
    pub std: Vec<f32>,
    /// Largest image, in pixels, that is decoded; larger ones are `too_large` rows.
    pub max_pixels: u64,
    /// Large JPEGs are decoded at a reduced scale from their DCT coefficients.
    pub jpeg_dct_scaling: bool,
}

impl Preprocess {
    /// Model input (height, width): the crop, else the exact resize. Validation makes sure
    /// one of them is set, so every sample of a batch has this size.
    pub fn input_size(&self) -> (u32, u32) {
        match (self.crop, self.resize) {
            (Some(c), _) => c,
            (None, Resize::Exact { h, w }) => (h, w),
            // Not produced by `resolve`; a square of the side is the closest meaning.
            (None, Resize::ShorterSide(s)) => (s, s),
        }
    }

    /// Number of input channels (the length of `mean`).
    pub fn channels(&self) -> usize {
        self.mean.len()
    }
}

/// The class each sample's attribution is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The sample's label (samples without one get no attribution).
    Label,
    /// The model's top prediction.
    Predicted,
    /// This class id for every sample.
    Class(i64),
}

/// How the Grad-CAM map is upsampled to the input size (PyTorch's `interpolate` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolateMode {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear.
    Bilinear,
    /// Bicubic.
    Bicubic,
    /// Area averaging.
    Area,
}

impl InterpolateMode {
    /// The spec's name of the mode (`nearest`, `bilinear`, `bicubic`, `area`).
    pub fn as_str(self) -> &'static str {
        match self {
            InterpolateMode::Nearest => "nearest",
            InterpolateMode::Bilinear => "bilinear",
            InterpolateMode::Bicubic => "bicubic",
            InterpolateMode::Area => "area",
        }
    }

    /// The mode named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Nearest, Self::Bilinear, Self::Bicubic, Self::Area].into_iter().find(|m| m.as_str() == s)
    }
}

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit float.
    Fp32,
    /// bfloat16.
    Bf16,
}

impl Precision {
    /// The spec's name (`fp32`, `bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Samples per forward/backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    /// This many (at least 1).
    Fixed(u32),
    /// Found at start-up: on CUDA the largest power of two from 256 down that every worker runs
    /// at once; [`BatchSize::DEFAULT`] on the CPU.
    Auto,
}

impl BatchSize {
    /// The default, and what `auto` means on the CPU.
    pub const DEFAULT: u32 = 32;
}

impl fmt::Display for BatchSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            BatchSize::Fixed(n) => write!(f, "{n}"),
            BatchSize::Auto => f.write_str("auto"),
        }
    }
}

/// Devices the engine runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// Every CUDA device present (the engine decides what that means without one).
    All,
    /// These devices, each `cpu`, `cuda` or `cuda:N`, no repeats.
    List(Vec<String>),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Label => f.write_str("label"),
            Target::Predicted => f.write_str("predicted"),
            Target::Class(c) => write!(f, "class {c}"),
        }
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::All => f.write_str("all"),
            Devices::List(l) => f.write_str(&l.join(", ")),
        }
    }
}

fn list(values: &[f32]) -> String {
    let v: Vec<String> = values.iter().map(|x| x.to_string()).collect();
    format!("[{}]", v.join(", "))
}

impl Job {
    /// An error about the key at `path` found after validation (against the model or the
    /// dataset), naming the job file and the key's line, as the spec's own errors do.
    pub fn error(&self, path: &str, message: impl Into<String>) -> JobError {
        match spec::SpecSource::new(&self.spec_text, &self.job_file) {
            Ok(source) => source.error(path, message),
            Err(_) => JobError { key: Some(path.to_owned()), ..JobError::file(&self.job_file, message) },
        }
    }

    /// Writes to `output` instead of the spec's `output.path` (the `--output` argument), which
    /// then need not be a folder; a local `output` that exists must be one.
    pub fn set_output(&mut self, output: Loc) -> Result<(), JobError> {
        if let Loc::Local(p) = &output {
            if p.exists() && !p.is_dir() {
                let message = format!("--output {}: exists and is not a folder", p.display());
                return Err(JobError::file(&self.job_file, message));
            }
        }
        self.output = output;
        Ok(())
    }

    /// The spec's own output folder, once it is known not to be overridden: a local one that
    /// exists must be a folder.
    pub fn check_output(&self) -> Result<(), JobError> {
        match &self.output {
            Loc::Local(p) if p.exists() && !p.is_dir() => {
                Err(self.error("output.path", format!("{} exists and is not a folder", p.display())))
            }
            _ => Ok(()),
        }
    }
}

/// The resolved plan, as `saliency-audit validate` prints it (one `name: value` line each).
impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "job:          {}", self.job_file.display())?;
        match &self.dataset {
            DatasetSource::Manifest(p) => writeln!(f, "dataset:      manifest {p}")?,
            DatasetSource::ImageFolder(p) => writeln!(f, "dataset:      image folder {p}")?,
        }
        writeln!(f, "model:        {}", self.model.display())?;
        match (&self.class_names, self.num_classes) {
            (Some(names), n) => {
                let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
                let more = if names.len() > 5 { ", ..." } else { "" };
                let n = n.unwrap_or(names.len() as i64);
                writeln!(f, "classes:      {n} ({}{more})", shown.join(", "))?;
            }
            (None, Some(n)) => writeln!(f, "classes:      {n} (no names in the model's metadata)")?,
            (None, None) => writeln!(f, "classes:      unknown (no metadata)")?,
        }
        let p = &self.preprocess;
        let resize = match p.resize {
            Resize::ShorterSide(s) => format!("shorter side to {s}"),
            Resize::Exact { h, w } => format!("to {h}x{w}"),
        };
        let crop = match p.crop {
            Some((h, w)) => format!(", centre crop {h}x{w}"),
            None => String::new(),
        };
        let (h, w) = p.input_size();
        writeln!(f, "preprocess:   resize {resize}{crop} (model input {h}x{w}, {} channels)", p.channels())?;
        writeln!(f, "normalise:    mean {}, std {}", list(&p.mean), list(&p.std))?;
        writeln!(f, "max pixels:   {}", p.max_pixels)?;
        if p.jpeg_dct_scaling {
            writeln!(f, "jpeg:         DCT-domain scaling of large JPEGs")?;
        }
        writeln!(f, "target:       {}", self.target)?;
        let rect = format!("[{}]", self.guided_rectifiers.join(", "));
        writeln!(
            f,
            "attribution:  interpolate {}, guided rectifiers {rect}, precision {}",
            self.interpolate_mode.as_str(),
            self.precision.as_str()
        )?;
        match self.workers_per_device {
            Some(w) => writeln!(f, "devices:      {} ({w} workers each)", self.devices)?,
            None => writeln!(f, "devices:      {} (2 workers per CUDA device, 1 on the CPU)", self.devices)?,
        }
        writeln!(
            f,
            "batch size:   {} (channels last {}, cudnn benchmark {})",
            self.batch_size,
            match self.channels_last {
                Some(true) => "on",
                Some(false) => "off",
                None => "on for CUDA and bf16",
            },
            if self.cudnn_benchmark { "on" } else { "off" }
        )?;
        match self.stats_on_device {
            Some(true) => writeln!(f, "statistics:   on the model's device")?,
            Some(false) => writeln!(f, "statistics:   on the host")?,
            None => writeln!(f, "statistics:   on the device for CUDA, on the host for the CPU")?,
        }
        if self.decode_threads == 0 {
            writeln!(f, "decode:       one thread per core")?;
        } else {
            writeln!(f, "decode:       {} threads", self.decode_threads)?;
        }
        writeln!(
            f,
            "output:       {} (maps {}x{}, {} rows per part)",
            self.output, self.map_size, self.map_size, self.rows_per_part
        )?;
        if self.regions.is_empty() {
            write!(f, "regions:      none")?;
        } else {
            let r: Vec<String> =
                self.regions.iter().map(|(n, x0, y0, x1, y1)| format!("{n} x {x0}..{x1}, y {y0}..{y1}")).collect();
            write!(f, "regions:      {}", r.join("; "))?;
        }
        for w in &self.warnings {
            write!(f, "\nwarning:      {w}")?;
        }
        Ok(())
    }
}
