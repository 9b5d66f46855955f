//! The `attribute` command's work: .npy in, .npy out, in batches.

use super::batch::catch_libtorch;
use super::{EngineOptions, GuidedGradCam};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where the targets come from.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetArg {
    /// An int64 (or int32) .npy of N classes.
    File(PathBuf),
    /// One class for every example.
    Class(i64),
    /// The model's predicted class.
    Predicted,
}

impl std::str::FromStr for TargetArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "predicted" {
            Ok(Self::Predicted)
        } else if let Ok(c) = s.parse::<i64>() {
            Ok(Self::Class(c))
        } else if s.ends_with(".npy") {
            Ok(Self::File(PathBuf::from(s)))
        } else {
            Err(format!("target {s:?} is neither an integer, `predicted` nor a .npy file"))
        }
    }
}

/// What `attribute` did.
pub struct NpyRun {
    pub examples: i64,
    pub batches: usize,
    pub targets: Vec<i64>,
}

/// Reads a float32 `[N, C, H, W]` .npy, attributes it in batches of `batch_size` and writes
/// the attribution (and the CAM, if asked) as float32 .npy. The arguments are the `attribute`
/// command's flags, one for one.
#[allow(clippy::too_many_arguments)]
pub fn attribute_npy(
    model: &Path,
    input: &Path,
    target: &TargetArg,
    out: &Path,
    cam_out: Option<&Path>,
    batch_size: usize,
    device: Device,
    opts: EngineOptions,
) -> Result<NpyRun> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let x = Tensor::read_npy(input).with_context(|| format!("cannot read {} as .npy", input.display()))?;
    let x = match x.kind() {
        Kind::Float => x,
        // numpy's default float: the values the model computes with are float32 anyway.
        Kind::Double => x.to_kind(Kind::Float),
        k => bail!("{}: dtype {k:?}, expected float32 (x.astype(np.float32))", input.display()),
    };
    let shape = x.size();
    if shape.len() != 4 {
        bail!("{}: shape {shape:?}, expected [N, C, H, W]", input.display());
    }
    // A channels-last array (as PIL and OpenCV give images) by its shape.
    if let Some(c) = super::read_meta(model).ok().flatten().and_then(|m| m.channels) {
        if shape[1] != c && shape[3] == c {
            bail!(
                "{}: shape {shape:?} looks like [N, H, W, C]; the model takes [N, C, H, W] with C = {c} \
                 (np.transpose(x, (0, 3, 1, 2)))",
                input.display()
            );
        }
    }
    let n = shape[0];
    if shape.contains(&0) {
        bail!("{}: shape {shape:?} holds no pixels to attribute", input.display());
    }
    super::check_finite(&x, 0).with_context(|| format!("{}", input.display()))?;
    let targets: Vec<Option<i64>> = match target {
        TargetArg::Predicted => vec![None; n as usize],
        TargetArg::Class(c) => vec![Some(*c); n as usize],
        TargetArg::File(p) => {
            let t = Tensor::read_npy(p).with_context(|| format!("cannot read {} as .npy", p.display()))?;
            if !matches!(t.kind(), Kind::Int64 | Kind::Int) {
                bail!("{}: dtype {:?}, expected int64", p.display(), t.kind());
            }
            if t.size() != [n] {
                bail!(
                    "{}: shape {:?}, expected [{n}] (one target per example of {})",
                    p.display(),
                    t.size(),
                    input.display()
                );
            }
            Vec::<i64>::try_from(t.to_kind(Kind::Int64))?.into_iter().map(Some).collect()
        }
    };
    let engine = GuidedGradCam::load(model, device, opts)?;
    // Every given target checked against the model's classes (one probe) before any batch.
    if targets.iter().any(Option::is_some) {
        let (classes, _) = catch_libtorch(|| engine.probe(shape[1], shape[2], shape[3]))?;
        if let Some((i, t)) =
            targets.iter().enumerate().find_map(|(i, t)| t.filter(|t| *t < 0 || *t >= classes).map(|t| (i, t)))
        {
            let from = match target {
                TargetArg::File(p) => p.display().to_string(),
                _ => "--target".to_owned(),
            };
            bail!(
                "{from}: target {t} of example {i} is out of range: the model has {classes} classes (0..{})",
                classes - 1
            );
        }
    }
    let mut attrs = Vec::new();
    let mut non_finite = Vec::new();
    let mut cams = Vec::new();
    let mut resolved = Vec::with_capacity(n as usize);
    let mut batches = 0;
    let bs = batch_size as i64;
    let mut start = 0i64;
    while start < n {
        let len = bs.min(n - start);
        let xb = x.narrow(0, start, len);
        // libtorch's failures in the ops that do not return errors (the map's upsampling, the
        // copies back) are errors too, with the same hint.
        let (attr, cam, batch_targets) = catch_libtorch(|| {
            let r = engine.attribute(&xb, &targets[start as usize..(start + len) as usize])?;
            let cam = cam_out.is_some().then(|| r.cam.to_device(Device::Cpu));
            Ok((r.attribution.to_device(Device::Cpu), cam, r.targets))
        })
        .map_err(|e| {
            let hint = if super::out_of_memory(&format!("{e:#}")) { " (a smaller --batch-size may fit)" } else { "" };
            e.context(format!("batch of examples {start}..{}{hint}", start + len))
        })?;
        // Examples whose attribution overflowed (NaN or infinite: Captum's numbers too, written
        // as they are), named in a warning.
        let bad = attr.isfinite().logical_not().reshape([len, -1]).any_dim(1, false);
        non_finite.extend(
            Vec::<bool>::try_from(bad)?.into_iter().enumerate().filter(|(_, b)| *b).map(|(i, _)| start + i as i64),
        );
        attrs.push(attr);
        cams.extend(cam);
        resolved.extend(batch_targets);
        batches += 1;
        start += len;
    }
    if !non_finite.is_empty() {
        let shown: Vec<String> = non_finite.iter().take(10).map(i64::to_string).collect();
        tracing::warn!(
            "{} example(s) of {} have NaN or infinite attributions (their logits or gradients overflow float32), \
             written as computed: examples {}{}",
            non_finite.len(),
            input.display(),
            shown.join(", "),
            if non_finite.len() > 10 { ", …" } else { "" }
        );
    }
    Tensor::cat(&attrs, 0).write_npy(out).with_context(|| format!("cannot write {}", out.display()))?;
    if let Some(p) = cam_out {
        Tensor::cat(&cams, 0).write_npy(p).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(NpyRun { examples: n, batches, targets: resolved })
}
