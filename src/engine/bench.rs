//! Synthetic-input engine timing for `saliency-audit bench --synthetic`.

use super::{EngineOptions, GuidedGradCam};
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One synthetic benchmark's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyntheticBench {
    pub device: String,
    pub batch: i64,
    pub iters: usize,
    pub threads: i32,
    /// Median seconds per batch.
    pub s_per_batch: f64,
    pub images_per_s: f64,
    /// Peak resident memory of the process minus its resident memory after loading the model
    /// and before the first batch (CPU only; bytes).
    pub peak_rss_delta_bytes: Option<u64>,
}

/// Times `iters` batches (after `warmup`) of random input with per-example targets.
pub fn synthetic(
    model: &Path,
    device: Device,
    opts: EngineOptions,
    batch: i64,
    iters: usize,
    warmup: usize,
) -> Result<SyntheticBench> {
    if batch < 1 || iters < 1 {
        bail!("batch and iters must be at least 1");
    }
    let engine = GuidedGradCam::load(model, device, opts)?;
    let meta = engine.meta().clone();
    let [h, w] = meta.input_size.unwrap_or([224, 224]);
    let c = meta.channels.unwrap_or(3);
    let (classes, _) = engine.probe(c, h, w)?;
    tch::manual_seed(0);
    let x = Tensor::randn([batch, c, h, w], (Kind::Float, device));
    let targets: Vec<Option<i64>> = (0..batch).map(|i| Some((i * 7919) % classes)).collect();
    let rss0 = rss_bytes();
    reset_peak_rss();
    for _ in 0..warmup {
        engine.attribute(&x, &targets)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let r = engine.attribute(&x, &targets)?;
        // Wait for the device: reading one value synchronises.
        let _ = r.attribution.get(0).get(0).get(0).get(0).double_value(&[]);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let s = times[times.len() / 2];
    let peak = peak_rss_bytes();
    Ok(SyntheticBench {
        device: format!("{device:?}"),
        batch,
        iters,
        threads: tch::get_num_threads(),
        s_per_batch: s,
        images_per_s: batch as f64 / s,
        peak_rss_delta_bytes: match (device, rss0, peak) {
            (Device::Cpu, Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    })
}

fn status_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Resets the kernel's peak-RSS counter (VmHWM) of this process, so the peak is measured from now.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
