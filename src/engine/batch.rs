//! The pipeline's view of the engine: plain-data batches in, plain-data results out.

use super::reduce::{self, Reduction};
use super::{no_grad, shim, EngineOptions, GuidedGradCam};
use crate::stats::MapSums;
use anyhow::{bail, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A batch of decoded images: RGB8, HWC, `n × h × w × 3` bytes, and a target per image
/// (`None` = the predicted class), with what the statistics need of each: its object box
/// (normalised to the model-input frame) and its `h × w` object mask. `boxes` and `masks` may be
/// shorter than `n` (missing entries are None).
#[derive(Debug, Clone, Default)]
pub struct U8Batch {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
    pub targets: Vec<Option<i64>>,
    pub boxes: Vec<Option<[f32; 4]>>,
    pub masks: Vec<Option<Vec<u8>>>,
}

impl U8Batch {
    /// The sub-batch of images `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> U8Batch {
        let px = self.h * self.w * 3;
        let part = |len_of: usize| start.min(len_of)..(start + len).min(len_of);
        U8Batch {
            n: len,
            h: self.h,
            w: self.w,
            data: self.data[start * px..(start + len) * px].to_vec(),
            targets: self.targets[start..start + len].to_vec(),
            boxes: self.boxes[part(self.boxes.len())].to_vec(),
            masks: self.masks[part(self.masks.len())].to_vec(),
        }
    }

    /// Sample i's object box.
    pub fn bbox(&self, i: usize) -> Option<[f32; 4]> {
        self.boxes.get(i).copied().flatten()
    }

    /// Sample i's object mask.
    pub fn mask(&self, i: usize) -> Option<&[u8]> {
        self.masks.get(i).and_then(|m| m.as_deref())
    }
}

/// What the engine returns for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleMaps {
    pub target: i64,
    pub predicted: i64,
    pub predicted_prob: f32,
    pub target_prob: f32,
    /// Guided Grad-CAM reduced over channels by absolute value: whole, or reduced on the device.
    pub map: MapOut,
    /// Grad-CAM at the layer's resolution, cam_h × cam_w.
    pub cam: Vec<f32>,
    pub cam_h: usize,
    pub cam_w: usize,
}

/// A sample's attribution map as the engine returns it.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOut {
    /// The whole map, h × w row-major: its statistics and resize are left to the host.
    Full(Vec<f32>),
    /// Reduced where it was computed ([`Reduction`]): the sums behind its statistics and the map
    /// area-resized to `map_size × map_size`.
    Reduced { sums: MapSums, resized: Vec<f32> },
}

/// What the pipeline's workers talk to: one model replica on one device.
pub trait Attributor: Send {
    /// A name for logs (the device).
    fn name(&self) -> String;
    /// Attributes a batch; one result per image, in order.
    fn attribute(&mut self, batch: &U8Batch) -> Result<Vec<SampleMaps>>;

    /// Whether the replica still works, after a single image failed: attributes one mid-grey
    /// image of `h × w`. An error means the device itself is failing (a sticky CUDA error, no
    /// memory left even for one image), not that image.
    fn check_health(&mut self, h: usize, w: usize) -> Result<()> {
        let probe = U8Batch { n: 1, h, w, data: vec![128; h * w * 3], targets: vec![None], ..U8Batch::default() };
        self.attribute(&probe).map(drop)
    }

    /// Called by the worker on its own thread before its first batch, with the shape of the
    /// batches to come (`boxes`, `masks`: whether samples have them). Returns whether it ran
    /// anything. Default: nothing to prepare.
    fn warm_up_thread(&mut self, _n: usize, _h: usize, _w: usize, _boxes: bool, _masks: bool) -> Result<bool> {
        Ok(false)
    }
}

/// The TorchScript engine as an [`Attributor`]: uploads u8 images, converts and normalises them
/// on the device, attributes, reduces the map over channels on the device and downloads only
/// the small results.
///
/// On a CUDA device each replica runs on its own stream from libtorch's pool, so that two
/// replicas on one device (two workers) overlap: one's upload, download and host-side work run
/// while the other's kernels keep the device busy. Uploads go from page-locked memory, and
/// downloads land in page-locked memory.
pub struct TorchAttributor {
    engine: GuidedGradCam,
    mean: Tensor,
    std: Tensor,
    channels: i64,
    stream: Option<shim::CudaStream>,
    reduction: Option<Reduction>,
    /// The worker's name in logs: the device, and the replica's number on it (`cuda:0#1`).
    label: String,
}

impl TorchAttributor {
    /// Loads a replica of `model` on `device`. `mean` and `std` (0..1 scale) have one value per
    /// model input channel; a 1-channel model gets the images' luminance (ITU-R 601, as PIL's "L").
    pub fn load(model: &Path, device: Device, opts: EngineOptions, mean: &[f32], std: &[f32]) -> Result<Self> {
        if mean.len() != std.len() || mean.is_empty() {
            bail!("mean and std need one value per input channel");
        }
        // What makes every normalised image finite (the batches skip the engine's check): the
        // extremes (0 - m) / s and (1 - m) / s in float32, as the device computes them.
        let finite =
            mean.iter().zip(std).all(|(m, s)| *s > 0.0 && ((0.0 - m) / s).is_finite() && ((1.0 - m) / s).is_finite());
        if !finite {
            bail!("mean {mean:?} and std {std:?} must keep normalised pixels finite (std positive, not tiny)");
        }
        let engine = GuidedGradCam::load(model, device, opts)?;
        let c = mean.len() as i64;
        // libtorch's failures here (the calls do not return errors) are the device's.
        let (mean, std, stream) = catch_libtorch(|| {
            let mean = Tensor::from_slice(mean).view([1, c, 1, 1]).to_device(device);
            let std = Tensor::from_slice(std).view([1, c, 1, 1]).to_device(device);
            let stream = match device {
                Device::Cuda(i) => {
                    // The pool's streams do not wait for the default stream the model was loaded on.
                    tch::Cuda::synchronize(i as i64);
                    Some(
                        shim::CudaStream::from_pool(i)
                            .map_err(|e| anyhow::anyhow!("CUDA stream for {}: {e}", super::device_name(device)))?,
                    )
                }
                _ => None,
            };
            Ok((mean, std, stream))
        })
        .map_err(|e| {
            crate::exit::RunFailed(e.context(format!("setting up a replica on {}", super::device_name(device))))
        })?;
        Ok(Self { engine, mean, std, channels: c, stream, reduction: None, label: super::device_name(device) })
    }

    /// Numbers this replica among those on its device, for the logs: `cuda:0#1` is the second
    /// worker on `cuda:0`.
    pub fn set_replica(&mut self, k: usize) {
        self.label = format!("{}#{k}", super::device_name(self.engine.device()));
    }

    /// With `Some`, every map is reduced on the device ([`MapOut::Reduced`]) instead of copied
    /// back whole ([`MapOut::Full`], the default).
    pub fn set_reduction(&mut self, reduction: Option<Reduction>) {
        self.reduction = reduction;
    }

    /// Runs `n` images of `h × w` (a fixed pattern) through the whole path once: on CUDA this is
    /// when cuDNN's benchmark mode picks its algorithms and the caching allocator grows, and an
    /// error here (out of memory) means a batch of `n` does not fit. With `boxes` or `masks`
    /// (the job's samples have them), every image gets one, so that the statistics' extra work
    /// on the device is part of the trial.
    pub fn warm_up(&mut self, n: usize, h: usize, w: usize, boxes: bool, masks: bool) -> Result<std::time::Duration> {
        let t = std::time::Instant::now();
        let data = (0..n * h * w * 3).map(|i| (i % 251) as u8).collect();
        let boxes = if boxes { vec![Some([0.25, 0.25, 0.75, 0.75]); n] } else { Vec::new() };
        let masks =
            if masks { vec![Some((0..h * w).map(|i| u8::from(i % w < w / 2)).collect()); n] } else { Vec::new() };
        let batch = U8Batch { n, h, w, data, targets: vec![Some(0); n], boxes, masks };
        self.attribute(&batch)?;
        Ok(t.elapsed())
    }

    pub fn engine(&self) -> &GuidedGradCam {
        &self.engine
    }

    fn to_input(&self, batch: &U8Batch) -> Result<Tensor> {
        let (n, h, w) = (batch.n as i64, batch.h as i64, batch.w as i64);
        if batch.data.len() != (n * h * w * 3) as usize {
            bail!("batch holds {} bytes, expected {n}×{h}×{w}×3", batch.data.len());
        }
        let dev = self.engine.device();
        let u8s = if dev == Device::Cpu {
            Tensor::from_slice(&batch.data).view([n, h, w, 3])
        } else {
            // One copy into page-locked memory, then an asynchronous upload on this replica's stream.
            let pinned = shim::empty_pinned_u8(batch.data.len()).map_err(|e| anyhow::anyhow!("pinned buffer: {e}"))?;
            // SAFETY: `pinned` is a fresh contiguous u8 tensor of exactly `batch.data.len()`
            // elements, which nothing else references yet.
            unsafe {
                std::ptr::copy_nonoverlapping(batch.data.as_ptr(), pinned.data_ptr() as *mut u8, batch.data.len());
            }
            pinned.view([n, h, w, 3]).to_device_(dev, Kind::Uint8, true, false)
        };
        let x = no_grad(|| {
            let x = match self.channels {
                3 => u8s.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0,
                1 => luminance(&u8s.permute([0, 3, 1, 2]).to_kind(Kind::Float)) / 255.0,
                c => return Err(anyhow::anyhow!("the model takes {c} channels; images give 3 (RGB) or 1 (luminance)")),
            };
            Ok((x - &self.mean) / &self.std)
        })?;
        // The permuted view of the NHWC bytes is channels-last already, and elementwise ops
        // keep that layout: in channels-last mode the engine takes it as it is, without a copy.
        Ok(if self.engine.options().channels_last == Some(true) { x } else { x.contiguous() })
    }
}

/// PIL's `convert("L")` of `n × 3 × h × w` RGB values 0..=255 (float), as `n × 1 × h × w` grey
/// levels 0..=255: Pillow's own integer arithmetic (weights 19595, 38470, 7471 of 2^16, plus
/// 2^15, shifted right by 16), so a 1-channel model's input equals torchvision's `Grayscale` of
/// the resized, cropped image. Exact in float32: every product and sum stays below 2^24.
pub fn luminance(rgb: &Tensor) -> Tensor {
    let wts = super::upload(Tensor::from_slice(&[19595f32, 38470., 7471.]), rgb.device()).view([1, 3, 1, 1]);
    let sum = (rgb * wts).sum_dim_intlist(&[1i64][..], true, Kind::Float);
    ((sum + 32768.0) / 65536.0).floor()
}

impl Attributor for TorchAttributor {
    fn name(&self) -> String {
        self.label.clone()
    }

    /// tch's infallible calls panic on a libtorch error (out of device memory in a kernel, say):
    /// such a panic becomes this batch's error, so the pipeline splits and retries the batch.
    fn attribute(&mut self, batch: &U8Batch) -> Result<Vec<SampleMaps>> {
        catch_libtorch(|| self.attribute_batch(batch))
    }

    /// On CUDA, one batch of the run's shape on the worker's own thread: libtorch keeps cuDNN's
    /// benchmark-mode algorithm choices for convolutions per thread (its execution-plan cache is
    /// thread-local), so a warm-up on another thread leaves the worker's first batch of each
    /// shape to search again, inside the run. On the CPU there is nothing to warm.
    fn warm_up_thread(&mut self, n: usize, h: usize, w: usize, boxes: bool, masks: bool) -> Result<bool> {
        if !self.engine.device().is_cuda() {
            return Ok(false);
        }
        self.warm_up(n, h, w, boxes, masks).map(|_| true)
    }
}

/// Runs `f`, turning a panic inside it (tch's infallible calls panic on a libtorch error) into
/// an error that carries libtorch's message; such panics stay out of stderr
/// ([`install_panic_hook`]).
pub fn catch_libtorch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    // Calls nest (a replica's load inside `bench`'s): the outer one still catches after the
    // inner one returns.
    let outer = CATCHING.with(|c| c.replace(true));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    caught.unwrap_or_else(|p| Err(anyhow::anyhow!("libtorch: {}", libtorch_message(panic_message(p.as_ref())))))
}

/// The message a panic carries (`panic!`'s text, or tch's `unwrap` of a libtorch error).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

impl TorchAttributor {
    fn attribute_batch(&mut self, batch: &U8Batch) -> Result<Vec<SampleMaps>> {
        let _stream = match &self.stream {
            Some(s) => Some(s.enter().map_err(|e| anyhow::anyhow!("CUDA stream: {e}"))?),
            None => None,
        };
        let x = self.to_input(batch)?;
        // u8 pixels, a finite mean and a positive std (checked at load): finite input.
        let r = self.engine.attribute_finite(&x, &batch.targets)?;
        let (map, cam, probs, predicted) = no_grad(|| {
            let map = r.attribution.abs().sum_dim_intlist(&[1i64][..], false, Kind::Float);
            let probs = r.logits.to_kind(Kind::Float).softmax(1, Kind::Float);
            let predicted = probs.argmax(1, false);
            (map, r.cam.squeeze_dim(1), probs, predicted)
        });
        let tgt = super::upload(Tensor::from_slice(&r.targets), probs.device()).view([-1, 1]);
        let target_prob = probs.gather(1, &tgt, false).view([-1]);
        let pred_prob = probs.gather(1, &predicted.view([-1, 1]), false).view([-1]);
        let cpu = Device::Cpu;
        let pinned = self.stream.is_some();
        let host = |t: &Tensor| shim::to_host_f32(t, pinned).map_err(|e| anyhow::anyhow!("download: {e}"));
        let (ch, cw) = (cam.size()[1] as usize, cam.size()[2] as usize);
        let maps: Vec<MapOut> = match &self.reduction {
            None => {
                let map = host(&map)?;
                let hw = batch.h * batch.w;
                f32_slice(&map, batch.n * hw)?.chunks_exact(hw).map(|m| MapOut::Full(m.to_vec())).collect()
            }
            Some(red) => {
                let dr = reduce::reduce(&map, red, &batch.boxes, &batch.masks)?;
                let resized = host(&dr.resized)?;
                let s2 = red.map_size * red.map_size;
                let resized = f32_slice(&resized, batch.n * s2)?;
                dr.sums_per_sample()?
                    .into_iter()
                    .zip(resized.chunks_exact(s2))
                    .map(|(sums, r)| MapOut::Reduced { sums, resized: r.to_vec() })
                    .collect()
            }
        };
        let cam_host = host(&cam)?;
        let cam = f32_slice(&cam_host, batch.n * ch * cw)?;
        let predicted: Vec<i64> = Vec::try_from(predicted.to_device(cpu))?;
        let target_prob: Vec<f32> = Vec::try_from(target_prob.to_device(cpu))?;
        let pred_prob: Vec<f32> = Vec::try_from(pred_prob.to_device(cpu))?;
        let chw = ch * cw;
        Ok(maps
            .into_iter()
            .enumerate()
            .map(|(i, map)| SampleMaps {
                target: r.targets[i],
                predicted: predicted[i],
                predicted_prob: pred_prob[i],
                target_prob: target_prob[i],
                map,
                cam: cam[i * chw..(i + 1) * chw].to_vec(),
                cam_h: ch,
                cam_w: cw,
            })
            .collect())
    }
}

/// The first line of libtorch's error inside a tch panic message, which reads
/// ``called `Result::unwrap()` on an `Err` value: Torch("<error>\nframe #0: …")`` (the C++
/// frames follow the first escaped newline).
fn libtorch_message(panic: &str) -> &str {
    let inner = panic.split_once("Torch(\"").map_or(panic, |(_, rest)| rest);
    let first = inner.split("\\n").next().unwrap_or(inner);
    first.lines().next().unwrap_or(first).trim_end_matches("\")").trim()
}

thread_local! {
    /// Set while this thread runs a batch whose panics [`TorchAttributor`] turns into errors.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs a panic hook that stays silent for the libtorch failures [`TorchAttributor`]
/// catches (reported as the batch's error, with their C++ frames left out) and hands every
/// other panic, caught or not, to the hook that was there before.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // tch reports a libtorch error as `Torch(…)`; any other panic is a bug, printed with
        // its location even where it is caught.
        let libtorch = panic_message(info.payload()).contains("Torch(");
        if !(libtorch && CATCHING.with(|c| c.get())) {
            previous(info);
        }
    }));
}

/// The elements of a contiguous float32 host tensor, checked to number `numel`.
fn f32_slice(t: &Tensor, numel: usize) -> Result<&[f32]> {
    if t.device() != Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() || t.numel() != numel {
        bail!(
            "engine result has {} elements of {:?} on {:?}, expected {numel} contiguous f32 on the host",
            t.numel(),
            t.kind(),
            t.device()
        );
    }
    // SAFETY: checked above: a contiguous f32 host tensor of `numel` elements, borrowed for as
    // long as `t` is.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, numel) })
}
